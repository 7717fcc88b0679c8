"""The expected-score planner's claims (issue #30), checked per budget level: ``claims.json`` beside results.md.

- **Kill**: ``timebill-kill`` / the best budget-independent configuration *in hindsight* at that level (over every
  one the run recorded: vanilla, each α, int8, int4, each fixed ρ), ≥ 1.10 at the four tightest levels and
  ≥ 1.0 at the two loosest, with completion ≥ that configuration's.
- **Guard**: ``timebill-guard`` / vanilla-with-cut-off ≥ 1.10, and ≥ 1.0 against every other configuration
  with cut-off, at every level.

Each ratio carries the paired bootstrap 90 % interval over tasks (:func:`paired_ratio_interval`), since with
tens of tasks a ratio moves by tenths from the task sample alone. The best-in-hindsight pick is made on the
full sample, which favours it slightly.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from timebill.bench.methods import FixedAlpha, Method
from timebill.bench.stats import Evaluation, paired_ratio_interval
from timebill.paths import write_bytes_atomically

KILL_METHOD = "timebill-kill"
GUARD_METHOD = "timebill-guard"
KILL_TARGET_TIGHT = 1.10  # the four tightest levels
KILL_TARGET_LOOSE = 1.0  # the two loosest: time no longer binds there
GUARD_TARGET_VANILLA = 1.10
GUARD_TARGET_OTHERS = 1.0
TIGHT_LEVELS = 4
PLANNING_OVERHEAD_MAX = 0.02  # of the budget, every run
CLAIMS_VERSION = 1


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else (math.inf if a > 0 else 1.0)


def _finite(x: float | None) -> float | None:
    return None if x is None or math.isinf(x) or math.isnan(x) else round(x, 4)


def _interval(jobs: dict, method: str, reference: str, key: float) -> list[float | None] | None:
    a, b = jobs.get((method, key)), jobs.get((reference, key))
    ci = None if a is None or b is None else paired_ratio_interval(a, b)
    return None if ci is None else [_finite(ci[0]), _finite(ci[1])]


def claims(
    ev: Evaluation,
    methods: Sequence[Method],
    *,
    kill_method: str = KILL_METHOD,
    guard_method: str = GUARD_METHOD,
    fixed: Sequence[str] | None = None,
    records: dict[str, dict[str, dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Per level and policy: TimeBill's score, the reference's name and score, the ratio, its CI, completions.

    ``fixed``: the budget-independent configurations to compare with (default: every :class:`FixedAlpha`).
    ``records`` (method → run key → record): the planner's runs, whose measured ``plan_s`` (tokenising and
    choosing, on the request's clock) against their budget is the planning-overhead claim (≤ 2 % of T).
    """
    if fixed is None:
        fixed = [m.name for m in methods if isinstance(m, FixedAlpha)]
    fixed = list(fixed)
    levels: list[dict[str, Any]] = []
    n_cols = len(ev.columns)
    for i, col in enumerate(ev.columns):
        key = col.key
        loose = i >= min(TIGHT_LEVELS, n_cols)
        entry: dict[str, Any] = {"level": col.header, "key": key}
        tb = ev.cells.get((kill_method, key, "kill"))
        present = [m for m in fixed if (m, key, "kill") in ev.cells]
        if tb is not None and present:
            best = max(present, key=lambda m: ev.cells[(m, key, "kill")].avg_score)
            ref = ev.cells[(best, key, "kill")]
            ratio = _ratio(tb.avg_score, ref.avg_score)
            target = KILL_TARGET_LOOSE if loose else KILL_TARGET_TIGHT
            entry["kill"] = {
                "method": kill_method,
                "score": round(tb.avg_score, 3),
                "completion": round(tb.completion_rate, 4),
                "best_fixed": best,
                "best_fixed_score": round(ref.avg_score, 3),
                "best_fixed_completion": round(ref.completion_rate, 4),
                "ratio": _finite(ratio),
                "ratio_ci90": _interval(ev.kill_jobs, kill_method, best, key),
                "target": target,
                "met": ratio >= target and tb.completion_rate >= ref.completion_rate,
            }
        tg = ev.cells.get((guard_method, key, "guard"))
        van = ev.cells.get(("vanilla", key, "guard"))
        others = [m for m in fixed if m != "vanilla" and (m, key, "guard") in ev.cells]
        if tg is not None and van is not None:
            ratio_v = _ratio(tg.avg_score, van.avg_score)
            worst = min(others, key=lambda m: _ratio(tg.avg_score, ev.cells[(m, key, "guard")].avg_score), default=None)
            ratio_w = _ratio(tg.avg_score, ev.cells[(worst, key, "guard")].avg_score) if worst else math.inf
            entry["guard"] = {
                "method": guard_method,
                "score": round(tg.avg_score, 3),
                "completion": round(tg.completion_rate, 4),
                "vanilla_score": round(van.avg_score, 3),
                "ratio_vs_vanilla": _finite(ratio_v),
                "ratio_vs_vanilla_ci90": _interval(ev.guard_jobs, guard_method, "vanilla", key),
                "strongest_other": worst,
                "strongest_other_score": round(ev.cells[(worst, key, "guard")].avg_score, 3) if worst else None,
                "ratio_vs_strongest_other": _finite(ratio_w),
                "ratio_vs_strongest_other_ci90": _interval(ev.guard_jobs, guard_method, worst, key) if worst else None,
                "met": ratio_v >= GUARD_TARGET_VANILLA and ratio_w >= GUARD_TARGET_OTHERS,
            }
        levels.append(entry)
    overhead = []
    for name in (kill_method, guard_method):
        for r in (records or {}).get(name, {}).values():
            if r.get("plan_s") is not None and r.get("budget_s"):
                overhead.append(float(r["plan_s"]) / float(r["budget_s"]))
    overhead.sort()
    planning = None
    if overhead:
        planning = {
            "runs": len(overhead),
            "median_fraction_of_budget": round(overhead[len(overhead) // 2], 5),
            "max_fraction_of_budget": round(overhead[-1], 5),
            "target": PLANNING_OVERHEAD_MAX,
            "met": overhead[-1] <= PLANNING_OVERHEAD_MAX,
        }
    return {
        "format": "timebill-claims",
        "format_version": CLAIMS_VERSION,
        "targets": {
            "kill": f"{kill_method} / best fixed configuration in hindsight >= {KILL_TARGET_TIGHT} at the "
            f"{TIGHT_LEVELS} tightest levels, >= {KILL_TARGET_LOOSE} at the others; completion >= its",
            "guard": f"{guard_method} / vanilla (cut off at T) >= {GUARD_TARGET_VANILLA} and >= "
            f"{GUARD_TARGET_OTHERS} against every other fixed configuration, at every level",
        },
        "fixed_configurations": fixed,
        "levels": levels,
        "planning_overhead": planning,
    }


def claims_lines(data: dict[str, Any]) -> list[str]:
    """The claims as two markdown tables (results.md's "Claims: expected-score planner")."""

    def ci(v: list | None) -> str:
        if not v:
            return ""
        lo, hi = (("∞" if x is None else f"{x:.2f}") for x in v)
        return f" ({lo}–{hi})"

    lines = [
        "| level | timebill-kill | best fixed in hindsight | ratio (90 % CI) | target | completion (best's) | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for lv in data["levels"]:
        k = lv.get("kill")
        if k is None:
            continue
        ratio = "∞" if k["ratio"] is None else f"{k['ratio']:.2f}"
        lines.append(
            f"| {lv['level']} | {k['score']:.1f} | {k['best_fixed']} ({k['best_fixed_score']:.1f}) | "
            f"{ratio}{ci(k['ratio_ci90'])} | ≥ {k['target']:.2f} | {100 * k['completion']:.0f} % "
            f"({100 * k['best_fixed_completion']:.0f} %) | {'yes' if k['met'] else '**no**'} |"
        )
    lines += [
        "",
        "| level | timebill-guard | vanilla cut off at T | ratio (90 % CI) | strongest other (score) "
        "| ratio (90 % CI) | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for lv in data["levels"]:
        g = lv.get("guard")
        if g is None:
            continue
        rv = "∞" if g["ratio_vs_vanilla"] is None else f"{g['ratio_vs_vanilla']:.2f}"
        rw = "∞" if g["ratio_vs_strongest_other"] is None else f"{g['ratio_vs_strongest_other']:.2f}"
        lines.append(
            f"| {lv['level']} | {g['score']:.1f} | {g['vanilla_score']:.1f} | {rv}{ci(g['ratio_vs_vanilla_ci90'])} | "
            f"{g['strongest_other']} ({g['strongest_other_score']:.1f}) | "
            f"{rw}{ci(g['ratio_vs_strongest_other_ci90'])} | "
            f"{'yes' if g['met'] else '**no**'} |"
        )
    p = data.get("planning_overhead")
    if p:
        lines += [
            "",
            f"Planning overhead (tokenising + choosing, on the request's clock) over {p['runs']} planned runs: median "
            f"{100 * p['median_fraction_of_budget']:.2f} %, max {100 * p['max_fraction_of_budget']:.2f} % of the "
            f"budget (target ≤ {100 * p['target']:.0f} %: {'met' if p['met'] else '**missed**'}).",
        ]
    return lines


def write_claims(out_dir: str | os.PathLike[str], data: dict[str, Any]) -> Path:
    """``claims.json`` in ``out_dir``, atomically."""
    path = Path(out_dir) / "claims.json"
    write_bytes_atomically(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode())
    return path
