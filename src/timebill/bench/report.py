"""The benchmark's report: ``results.md`` (tables, claims checked, how budgets were chosen) and PNG plots.

Everything here is derived from the run records (:mod:`timebill.bench.runner`) by the overrun policies
(:mod:`timebill.bench.policies`); nothing is measured. Plots follow the paper: score and completion
vs budget per method (Fig. 7), score vs k (Fig. 8), predicted vs measured end-to-end time with the WCET
(Fig. 6).

A run split into parts (``--part I/N``, one machine each) is merged by :func:`combine`: each part has
its own budgets (the same percentiles of *its* vanilla times), so columns become budget *levels* and a
cell is the job-weighted mean of the parts' cells at that level (Skip-Next streams stay per part).
"""

from __future__ import annotations

import itertools
import math
import os
import platform
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from timebill.bench.methods import DEFAULT_K, STOP_REFUSED, Method, Scorer, finished_by, outcome
from timebill.bench.policies import POLICIES, PolicySummary
from timebill.bench.runner import BenchData, BenchError, budget_quantiles, machine_id, run_key
from timebill.paths import write_bytes_atomically
from timebill.planner import DEFAULT_ALPHA_MAX

PAPER_SCORE_RATIO = 1.10  # the target: TimeBill ≥ 1.10 × the best fixed α, at every budget
COMPLETION_REFERENCE = "snapkv-0.95"


@dataclass(frozen=True)
class Column:
    """One budget column: ``key`` indexes the cells (a budget in s, or a level when parts are combined)."""

    key: float
    header: str  # "T = 2.76 s", or "p20: 2.7–3.1 s" for a level
    x: float  # where the column sits on a plot's x axis


@dataclass
class Evaluation:
    """Summaries by (method, column key, policy); ``missing`` lists cells with runs not (yet) done."""

    cells: dict[tuple[str, float, str], PolicySummary]
    k_cells: dict[int, PolicySummary]
    missing: list[str]
    columns: list[Column] = field(default_factory=list)
    x_label: str = "time budget T (s)"
    tightest: str = ""  # the k sweep's budget, in words
    diagnostics: dict[float, dict[str, tuple[int, int] | None]] = field(default_factory=dict)
    # Kill-policy score of every job, by (method, column key): what the claims' bootstrap resamples.
    kill_jobs: dict[tuple[str, float], list[tuple[str, float]]] = field(default_factory=dict)


def _records_at(data: BenchData, method: Method, budget_s: float) -> list[dict[str, Any]] | None:
    runs = data.records.get(method.name, {})
    found = [runs.get(run_key(method.name, t.id, budget_s if method.budgeted else None)) for t in data.tasks]
    return None if any(r is None for r in found) else found  # type: ignore[return-value]


def evaluate(data: BenchData, scorer: Scorer) -> Evaluation:
    """Apply every policy to every method at every budget (jobs in suite order, period = T)."""
    columns = [Column(b, f"T = {b:g} s", b) for b in data.budgets]
    tightest_words = f"T = {data.budgets[0]:g} s" if data.budgets else ""
    cells: dict[tuple[str, float, str], PolicySummary] = {}
    kill_jobs: dict[tuple[str, float], list[tuple[str, float]]] = {}
    missing: list[str] = []
    for method in data.methods:
        for budget in data.budgets:
            records = _records_at(data, method, budget)
            if records is None:
                missing.append(f"{method.name} at {budget:g} s")
                continue
            jobs = [outcome(r, t, budget, scorer) for r, t in zip(records, data.tasks, strict=True)]
            for name, policy in POLICIES.items():
                scores = policy.apply(jobs, budget)
                cells[(method.name, budget, name)] = PolicySummary.of(name, scores)
                if name == "kill":
                    kill_jobs[(method.name, budget)] = [(j.task_id, j.score) for j in scores]
    k_cells: dict[int, PolicySummary] = {}
    if data.budgets:
        tightest = data.budgets[0]
        for method in data.k_methods:
            records = _records_at(data, method, tightest)
            if records is None:
                missing.append(f"{method.name} (k sweep) at {tightest:g} s")
                continue
            jobs = [outcome(r, t, tightest, scorer) for r, t in zip(records, data.tasks, strict=True)]
            k_cells[int(method.k)] = POLICIES["kill"].summarise(jobs, tightest)  # type: ignore[attr-defined]
    diagnostics = {b: _diagnostic_counts(data, b) for b in data.budgets}
    return Evaluation(
        cells, k_cells, missing, columns, tightest=tightest_words, diagnostics=diagnostics, kill_jobs=kill_jobs
    )


def _merge(summaries: Sequence[PolicySummary]) -> PolicySummary:
    """Job-weighted mean of the parts' summaries (each part's average is over its own jobs)."""
    jobs = sum(s.jobs for s in summaries)
    if jobs == 0:
        return PolicySummary(summaries[0].policy, 0, float("nan"), float("nan"), 0)
    return PolicySummary(
        policy=summaries[0].policy,
        jobs=jobs,
        avg_score=sum(s.avg_score * s.jobs for s in summaries) / jobs,
        completion_rate=sum(s.completion_rate * s.jobs for s in summaries) / jobs,
        skipped=sum(s.skipped for s in summaries),
    )


def budget_levels(parts: Sequence[BenchData]) -> list[Column]:
    """Columns of a combined report: level i = every part's i-th budget (the same vanilla percentile)."""
    counts = {len(p.budgets) for p in parts}
    if len(counts) != 1:
        raise BenchError(f"the parts have different numbers of budgets ({sorted(counts)}); they cannot be combined")
    columns = []
    for level, q in enumerate(budget_quantiles(counts.pop())):
        seconds = [p.budgets[level] for p in parts]
        span = f"{min(seconds):g} s" if min(seconds) == max(seconds) else f"{min(seconds):g}–{max(seconds):g} s"
        columns.append(Column(level, f"p{100 * q:.0f}: {span}", 100 * q))
    return columns


def combine(parts: Sequence[BenchData], scorer: Scorer) -> tuple[Evaluation, BenchData]:
    """Merge the parts of a split run by budget level; returns the evaluation and the union's data.

    The union's ``budgets`` are empty (each part keeps its own); its records and tasks serve the
    tables that do not depend on a budget (sanity) and the Fig. 6 scatter.
    """
    if not parts:
        raise BenchError("nothing to combine")
    if len({p.suite.sha256 for p in parts}) != 1:
        raise BenchError("the parts were run on different task files; they cannot be combined")
    seen: set[str] = set()
    for p in parts:
        ids = {t.id for t in p.tasks}
        if ids & seen:
            raise BenchError(f"the parts overlap (e.g. task {sorted(ids & seen)[0]}); combine disjoint parts only")
        seen |= ids
    names = [m.name for m in parts[0].methods]
    if any([m.name for m in p.methods] != names for p in parts):
        raise BenchError("the parts ran different methods; combine parts of one run")
    columns = budget_levels(parts)
    evs = [evaluate(p, scorer) for p in parts]
    cells: dict[tuple[str, float, str], PolicySummary] = {}
    kill_jobs: dict[tuple[str, float], list[tuple[str, float]]] = {}
    missing: list[str] = []
    for method in parts[0].methods:
        for col in columns:
            found_jobs = [
                ev.kill_jobs.get((method.name, p.budgets[int(col.key)])) for ev, p in zip(evs, parts, strict=True)
            ]
            if all(j is not None for j in found_jobs):
                kill_jobs[(method.name, col.key)] = [job for jobs in found_jobs for job in jobs]  # type: ignore[union-attr]
            for policy in POLICIES:
                found = [
                    ev.cells.get((method.name, p.budgets[int(col.key)], policy))
                    for ev, p in zip(evs, parts, strict=True)
                ]
                if any(f is None for f in found):
                    if policy == "kill":
                        missing.append(f"{method.name} at level {col.header}")
                    continue
                cells[(method.name, col.key, policy)] = _merge(found)  # type: ignore[arg-type]
    k_cells = {
        k: _merge([ev.k_cells[k] for ev in evs]) for k in sorted(evs[0].k_cells) if all(k in ev.k_cells for ev in evs)
    }
    diagnostics: dict[float, dict[str, tuple[int, int] | None]] = {}
    for col in columns:
        counts = [ev.diagnostics[p.budgets[int(col.key)]] for ev, p in zip(evs, parts, strict=True)]
        diagnostics[col.key] = {}
        for name in _DIAGNOSTICS:
            found = [c[name] for c in counts if c.get(name) is not None]
            whole = len(found) == len(counts)  # a share over some parts only would mislead
            diagnostics[col.key][name] = (sum(h for h, _ in found), sum(n for _, n in found)) if whole else None
    order = {t.id: i for i, t in enumerate(parts[0].suite.tasks)}
    union = BenchData(
        suite=parts[0].suite,
        tasks=sorted((t for p in parts for t in p.tasks), key=lambda t: order.get(t.id, 0)),
        budgets=[],
        budget_note="",
        methods=list(parts[0].methods),
        k_methods=list(parts[0].k_methods),
        records={m: {k: r for p in parts for k, r in p.records.get(m, {}).items()} for m in parts[0].records},
        meta=dict(parts[0].meta),
    )
    ev = Evaluation(
        cells,
        k_cells,
        missing,
        columns,
        x_label="budget level: percentile of each part's vanilla end-to-end times",
        tightest=f"the tightest level, {columns[0].header}",
        diagnostics=diagnostics,
        kill_jobs=kill_jobs,
    )
    return ev, union


# ------------------------------------------------------------------------------------------ tables
def _fmt(summary: PolicySummary | None) -> str:
    if summary is None or math.isnan(summary.avg_score):
        return "–"
    return f"{summary.avg_score:.1f} ({100 * summary.completion_rate:.0f} %)"


def _policy_table(methods: Sequence[Method], ev: Evaluation, policy: str) -> list[str]:
    header = "| method | " + " | ".join(c.header for c in ev.columns) + " |"
    lines = [header, "|---|" + "---|" * len(ev.columns)]
    for method in methods:
        cells = [_fmt(ev.cells.get((method.name, c.key, policy))) for c in ev.columns]
        lines.append(f"| {method.name} | " + " | ".join(cells) + " |")
    return lines


def _sanity_table(data: BenchData, scorer: Scorer) -> list[str]:
    """Vanilla with no deadline, per task kind: can the default model do these tasks at all?"""
    vanilla = data.records.get("vanilla", {})
    lines = [
        "| kind | tasks | score (×100) | prompt tokens (median) | e2e s (median) | tokens (mean) | stopped at N_max |",
        "|---|---|---|---|---|---|---|",
    ]
    kinds = sorted({t.kind for t in data.tasks})
    for kind in [*kinds, "all"]:
        tasks = [t for t in data.tasks if kind in ("all", t.kind)]
        recs = [(t, vanilla.get(run_key("vanilla", t.id, None))) for t in tasks]
        recs = [(t, r) for t, r in recs if r is not None]
        if not recs:
            continue
        scores = [scorer.full(r["key"], t, r) for t, r in recs]
        lines.append(
            f"| {kind} | {len(recs)} | {100 * statistics.fmean(scores):.1f} | "
            f"{statistics.median(r.get('prompt_tokens', 0) for _, r in recs):.0f} | "
            f"{statistics.median(r['e2e_s'] for _, r in recs):.2f} | "
            f"{statistics.fmean(len(r['token_ids']) for _, r in recs):.0f} | "
            f"{100 * sum(r['stop_reason'] == 'max_tokens' for _, r in recs) / len(recs):.0f} % |"
        )
    return lines


def _upper_rank(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank q-quantile of sorted values (an observed value, not an interpolation between two)."""
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_LEVEL = 0.90


def paired_ratio_interval(
    a: Sequence[tuple[str, float]],
    b: Sequence[tuple[str, float]],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = BOOTSTRAP_LEVEL,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile-bootstrap interval of mean(a) / mean(b) over the tasks both scored, resampled in pairs.

    ``a`` and ``b`` are (task id, score) per job. Why paired: both methods answered the same tasks, so
    resampling a task moves both means together and the interval shows the methods' difference, not
    how hard the drawn tasks were. Why it matters here: with tens of tasks per budget and a 135M model
    whose greedy answers flip between right and wrong, a ratio can move by 0.2 from the task sample
    alone. None when fewer than two tasks pair up or most resamples have both means 0.
    """
    other = dict(b)
    pairs = [(x, other[t]) for t, x in a if t in other]
    n = len(pairs)
    if n < 2:
        return None
    rng = random.Random(seed)
    ratios = []
    for _ in range(resamples):
        sa = sb = 0.0
        for _ in range(n):
            x, y = pairs[rng.randrange(n)]
            sa += x
            sb += y
        if sb > 0:
            ratios.append(sa / sb)
        elif sa > 0:
            ratios.append(math.inf)
    if len(ratios) < resamples / 2:
        return None
    ratios.sort()
    tail = (1 - level) / 2
    return ratios[int(tail * len(ratios))], _upper_rank(ratios, 1 - tail)


def _claims(methods: Sequence[Method], ev: Evaluation, policy: str) -> list[str]:
    """The issue's numbers to reach, checked per budget: TimeBill vs the best fixed α, and vs α = 0.95's completion."""
    fixed = [m.name for m in methods if m.name.startswith("snapkv-")]
    if "timebill" not in {m.name for m in methods} or not fixed:
        return ["(needs the timebill method and at least one fixed-α method)"]
    with_ci = policy == "kill"  # Kill scores jobs independently, so tasks can be resampled; Skip-Next's cannot
    ratio_header = f"ratio ({100 * BOOTSTRAP_LEVEL:.0f} % CI)" if with_ci else "ratio"
    lines = [
        f"| T | TimeBill score | best fixed α (score) | {ratio_header} | ≥ 1.10× | TimeBill completion "
        "| α = 0.95 completion | ≥ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    open_ended = False  # some interval's upper end is ∞: the footnote then says what that means
    for col in ev.columns:
        b = col.key
        tb = ev.cells.get(("timebill", b, policy))
        present = [m for m in fixed if (m, b, policy) in ev.cells]
        ref = ev.cells.get((COMPLETION_REFERENCE, b, policy))
        if tb is None or not present:
            lines.append(f"| {col.header} | – | – | – | – | – | – | – |")
            continue
        best_name = max(present, key=lambda m: ev.cells[(m, b, policy)].avg_score)
        best_summary = ev.cells[(best_name, b, policy)]
        ratio = tb.avg_score / best_summary.avg_score if best_summary.avg_score > 0 else math.inf
        ratio_words = _ratio_text(ratio)
        if with_ci and (ci := _ratio_ci(ev, "timebill", best_name, b)) is not None:
            ratio_words += f" ({_ratio_text(ci[0])}–{_ratio_text(ci[1])})"
            open_ended = open_ended or math.isinf(ci[1])
        score_ok = "yes" if ratio >= PAPER_SCORE_RATIO else "**no**"
        comp_ok = "–" if ref is None else ("yes" if tb.completion_rate >= ref.completion_rate else "**no**")
        lines.append(
            f"| {col.header} | {tb.avg_score:.1f} | {best_name} ({best_summary.avg_score:.1f}) | {ratio_words} | "
            f"{score_ok} | "
            f"{100 * tb.completion_rate:.0f} % | {'–' if ref is None else f'{100 * ref.completion_rate:.0f} %'} | "
            f"{comp_ok} |"
        )
    if with_ci:
        lines += [
            "",
            f"CI: paired percentile bootstrap over tasks ({BOOTSTRAP_RESAMPLES} resamples, seed 0). An interval wholly "
            "below 1.10 means the shortfall is not an accident of the task sample; the best fixed α is picked on the "
            "full sample, which favours it slightly.",
        ]
        if open_ended:
            lines[-1] += (
                f" An upper end of ∞ means at least {100 * (1 - BOOTSTRAP_LEVEL) / 2:.0f} % of resamples drew only "
                "tasks where the best fixed α scored 0."
            )
    return lines


def _ratio_text(ratio: float) -> str:
    """A score ratio for the claims table; ∞ (the best fixed α scored 0) reads better than Python's "inf"."""
    return "∞" if math.isinf(ratio) else f"{ratio:.2f}"


def _ratio_ci(ev: Evaluation, method: str, reference: str, key: float) -> tuple[float, float] | None:
    a, b = ev.kill_jobs.get((method, key)), ev.kill_jobs.get((reference, key))
    return None if a is None or b is None else paired_ratio_interval(a, b)


_DIAGNOSTICS = ("vanilla overruns", "α = 0.95 overruns", "TimeBill refused (prefill > T)", "TimeBill guard-stopped")


def _diagnostic_counts(data: BenchData, b: float) -> dict[str, tuple[int, int] | None]:
    """Why budget ``b`` is hard, as (jobs, of n): overruns of vanilla and α = 0.95, TimeBill refusals and stops."""

    def count(method: str, budget: float | None, predicate: Any) -> tuple[int, int] | None:
        runs = data.records.get(method, {})
        recs = [runs.get(run_key(method, t.id, budget)) for t in data.tasks]
        if any(r is None for r in recs) or not recs:
            return None
        return sum(bool(predicate(r)) for r in recs), len(recs)

    found = (
        count("vanilla", None, lambda r: r["e2e_s"] > b),
        count("snapkv-0.95", None, lambda r: r["e2e_s"] > b),
        count("timebill", b, lambda r: r["stop_reason"] == STOP_REFUSED),
        count("timebill", b, lambda r: r["stop_reason"] == "deadline"),
    )
    return dict(zip(_DIAGNOSTICS, found, strict=True))


def _diagnostics(ev: Evaluation) -> list[str]:
    """Why a budget is hard: jobs TimeBill refused (prefill alone over T), jobs even α = 0.95 overruns."""
    lines = ["| T | " + " | ".join(_DIAGNOSTICS) + " |", "|---|" + "---|" * len(_DIAGNOSTICS)]
    for col in ev.columns:
        counts = ev.diagnostics.get(col.key, {})
        shares = [
            "–" if not (c := counts.get(name)) or not c[1] else f"{100 * c[0] / c[1]:.0f} %" for name in _DIAGNOSTICS
        ]
        lines.append(f"| {col.header} | " + " | ".join(shares) + " |")
    return lines


@dataclass(frozen=True)
class CompletionGap:
    """Jobs that one method completed and the other did not, over every budget, by how TimeBill's job ended.

    Why it exists: the claim wants TimeBill's completion ≥ fixed α = 0.95's, and a shortfall of a few
    points is only actionable once one knows whether it comes from refusals, from runs at the cap (the
    baseline's own α, so the same plan timed again) or from plans below the cap that fit on paper.
    """

    jobs: int  # TimeBill runs (task × budget) with the reference's trace present
    reference_only: int  # the reference's full answer came by T, TimeBill's did not
    refused: int  # ... of which TimeBill refused (predicted prefill alone over T)
    stopped_at_cap: int  # ... guard-stopped with α at the cap
    stopped_below_cap: int  # ... guard-stopped with a smaller α
    other: int  # ... anything else (an answer that ended by itself after T)
    method_only: int  # the reverse: TimeBill in time, the reference not


def completion_gap(data: BenchData, method: str = "timebill", reference: str = "snapkv-0.95") -> CompletionGap | None:
    """Pair each of ``method``'s runs with ``reference``'s trace judged at the run's own T (works on combined runs).

    Only runs of ``data.tasks`` count, as in :func:`plan_stats` and the per-kind table: a run directory may
    hold runs of tasks outside the selection being reported.
    """
    ids = {t.id for t in data.tasks}
    ref_runs = data.records.get(reference, {})
    n = dict.fromkeys(CompletionGap.__dataclass_fields__, 0)
    for r in data.records.get(method, {}).values():
        ref = ref_runs.get(run_key(reference, str(r.get("task_id")), None))
        if r.get("task_id") not in ids or ref is None or "budget_s" not in r:
            continue
        budget = float(r["budget_s"])
        ok, ref_ok = finished_by(r, budget), finished_by(ref, budget)
        n["jobs"] += 1
        n["method_only"] += ok and not ref_ok
        if ok or not ref_ok:
            continue
        n["reference_only"] += 1
        if r.get("stop_reason") == STOP_REFUSED:
            n["refused"] += 1
        elif r.get("stop_reason") == "deadline" and _planned(r):
            n["stopped_at_cap" if _at_cap(r["alpha"]) else "stopped_below_cap"] += 1
        else:
            n["other"] += 1
    return CompletionGap(**n) if n["jobs"] else None


def _completion_gap_lines(data: BenchData) -> list[str]:
    g = completion_gap(data)
    if g is None:
        return []
    return [
        f"Where fixed α = 0.95 completed a job and `timebill` did not (every task at every budget, {g.jobs} jobs): "
        f"**{g.reference_only}** ({100 * g.reference_only / g.jobs:.1f} %): {g.refused} refused (predicted prefill "
        f"over T), {g.stopped_at_cap} guard-stopped at the α cap, {g.stopped_below_cap} guard-stopped below the cap, "
        f"{g.other} other. The reverse (`timebill` in time, α = 0.95 not): **{g.method_only}**.",
        "",
    ]


# ----------------------------------------------------------------------------------- where time goes
@dataclass(frozen=True)
class DecodeCost:
    """What one budget-independent method's runs cost: the numbers that say how much α can buy.

    ``step_vs_vanilla`` is paired (the median over tasks of this method's step time over vanilla's on
    the same task), so prompt lengths that differ between tasks do not pass for an effect of α.
    """

    method: str
    runs: int
    kept_kv: float  # median KV tokens kept after prefill (the prompt's, after eviction)
    prefill_s: float  # median
    step_ms: float  # median over runs of the run's median gap between consecutive tokens
    step_vs_vanilla: float | None
    tokens: float  # mean generated tokens
    at_n_max: float  # share of runs that stopped at N_max, not at EOS


def _step_ms(record: dict[str, Any]) -> float | None:
    times = record.get("token_times_s") or []
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return 1000 * statistics.median(gaps) if gaps else None


def decode_costs(data: BenchData) -> list[DecodeCost]:
    """Per budget-independent method, over its runs on ``data.tasks`` (methods with no runs are left out)."""
    vanilla = data.records.get("vanilla", {})
    base = {t.id: _step_ms(r) for t in data.tasks if (r := vanilla.get(run_key("vanilla", t.id, None)))}
    rows = []
    for method in data.methods:
        if method.budgeted:
            continue
        runs = data.records.get(method.name, {})
        recs = [(t, r) for t in data.tasks if (r := runs.get(run_key(method.name, t.id, None))) is not None]
        steps = [(t, s) for t, r in recs if (s := _step_ms(r)) is not None]
        if not recs or not steps:
            continue
        paired = [s / b for t, s in steps if (b := base.get(t.id))]
        rows.append(
            DecodeCost(
                method=method.name,
                runs=len(recs),
                kept_kv=statistics.median(r.get("kept_kv_tokens", r.get("prompt_tokens", 0)) for _, r in recs),
                prefill_s=statistics.median(r.get("prefill_s", 0.0) for _, r in recs),
                step_ms=statistics.median(s for _, s in steps),
                step_vs_vanilla=statistics.median(paired) if paired else None,
                tokens=statistics.fmean(len(r["token_ids"]) for _, r in recs),
                at_n_max=sum(r["stop_reason"] == "max_tokens" for _, r in recs) / len(recs),
            )
        )
    return rows


@dataclass(frozen=True)
class PlanStats:
    """How the ``timebill`` method planned over all its runs: where k·N̂ lands, and how good the time model was."""

    planned: int  # runs that planned (not refused)
    refused: int
    capped: float  # share of planned runs whose N̂_W = min(k·N̂, N_max) is N_max
    n_hat_over_n_max: float  # median N̂ / N_max
    alpha_zero: float  # share that chose α = 0
    alpha_top: float  # share that chose α at the cap (the planner's default α_max)
    infeasible: float  # share whose worst case did not fit even at the cap
    prefill_ratio: tuple[float, float]  # measured / predicted prefill: median, 90th percentile
    e2e_ratio: tuple[float, float]  # measured / predicted e2e at the generated length: median, 90th percentile


def _median_p90(values: Sequence[float]) -> tuple[float, float]:
    ordered = sorted(values)
    if not ordered:
        return math.nan, math.nan
    return statistics.median(ordered), _upper_rank(ordered, 0.9)


def _planned(record: dict[str, Any]) -> bool:
    """A TimeBill run that made a plan (a refused one never chose an α)."""
    return record.get("stop_reason") != STOP_REFUSED and "alpha" in record


def _at_cap(alpha: float) -> bool:
    return alpha >= DEFAULT_ALPHA_MAX - 1e-9


def plan_stats(data: BenchData, method: str = "timebill") -> PlanStats | None:
    """Over every run of ``method`` on ``data.tasks`` at any budget; None when it has no runs."""
    ids = {t.id for t in data.tasks}
    recs = [r for r in data.records.get(method, {}).values() if r.get("task_id") in ids]
    if not recs:
        return None
    planned = [r for r in recs if _planned(r)]
    n = max(len(planned), 1)

    def ratios(measured: str, predicted: str) -> tuple[float, float]:
        return _median_p90([r[measured] / r[predicted] for r in planned if r.get(predicted) and measured in r])

    return PlanStats(
        planned=len(planned),
        refused=len(recs) - len(planned),
        capped=sum(r.get("n_worst") == r.get("max_new_tokens") for r in planned) / n,
        n_hat_over_n_max=_median_p90([r["n_hat"] / r["max_new_tokens"] for r in planned if "n_hat" in r])[0],
        alpha_zero=sum(r["alpha"] == 0 for r in planned) / n,
        alpha_top=sum(_at_cap(r["alpha"]) for r in planned) / n,
        infeasible=sum(r.get("feasible") is False for r in planned) / n,
        prefill_ratio=ratios("prefill_s", "predicted_prefill_s"),
        e2e_ratio=ratios("e2e_s", "predicted_e2e_s"),
    )


def _where_time_goes(data: BenchData) -> list[str]:
    """Measured costs behind the claims: how much a decode step gets cheaper with α, and how TimeBill planned."""
    rows = decode_costs(data)
    md: list[str] = []
    if rows:
        md += [
            "Decode cost per method (runs with no deadline; a step is the median gap between consecutive tokens):",
            "",
            "| method | runs | kept KV (median) | prefill s (median) | decode ms/step (median) "
            "| step vs vanilla (paired median) | tokens (mean) | stopped at N_max |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in rows:
            paired = "–" if c.step_vs_vanilla is None else f"{c.step_vs_vanilla:.2f}×"
            md.append(
                f"| {c.method} | {c.runs} | {c.kept_kv:.0f} | {c.prefill_s:.2f} | {c.step_ms:.1f} | {paired} | "
                f"{c.tokens:.0f} | {100 * c.at_n_max:.0f} % |"
            )
        md.append("")
    stats = plan_stats(data)
    if stats is not None:
        md += [
            f"How `timebill` planned ({stats.planned} planned runs, {stats.refused} refused, all budgets):",
            "",
            f"- N̂_W = min(k·N̂, N_max) was N_max in **{100 * stats.capped:.0f} %** of planned runs "
            f"(median N̂ / N_max = {stats.n_hat_over_n_max:.2f}), so the plan budgets the longest answer allowed.",
            f"- α chosen: 0 in {100 * stats.alpha_zero:.0f} %, the cap {DEFAULT_ALPHA_MAX:g} in "
            f"{100 * stats.alpha_top:.0f} %; the worst case did not fit even at the cap in "
            f"{100 * stats.infeasible:.0f} %.",
            f"- Time model, measured / predicted: prefill {stats.prefill_ratio[0]:.2f} (median), "
            f"{stats.prefill_ratio[1]:.2f} (p90); end to end at the generated length "
            f"{stats.e2e_ratio[0]:.2f} (median), {stats.e2e_ratio[1]:.2f} (p90).",
            "",
        ]
    return md


# ------------------------------------------------------------------------------------------- by kind
def _by_kind_scores(methods: Sequence[Method], ev: Evaluation, kinds: dict[str, str]) -> list[str]:
    """Kill score per task kind and budget: the suite mixes answers of 16 to 512 tokens, and an average over
    them can hide that a method wins on one kind and loses on another. ``kinds``: task id -> kind."""
    md: list[str] = []
    for kind in sorted(set(kinds.values())):
        n = sum(k == kind for k in kinds.values())
        md += [
            f"**{kind}** ({n} task{'' if n == 1 else 's'}), average score ×100 under Kill:",
            "",
            "| method | " + " | ".join(c.header for c in ev.columns) + " |",
            "|---|" + "---|" * len(ev.columns),
        ]
        for method in methods:
            cells = []
            for col in ev.columns:
                scores = [s for tid, s in ev.kill_jobs.get((method.name, col.key), []) if kinds.get(tid) == kind]
                cells.append(f"{100 * statistics.fmean(scores):.1f}" if scores else "–")
            md.append(f"| {method.name} | " + " | ".join(cells) + " |")
        md.append("")
    return md


@dataclass(frozen=True)
class KindOutcomes:
    """How the ``timebill`` method's jobs of one task kind ended, over every budget, beside vanilla's trace."""

    kind: str
    jobs: int  # TimeBill runs (task × budget)
    vanilla_in_time: int  # vanilla's full answer came by the same T
    in_time: int  # TimeBill's full answer came by T
    rescued: int  # in time where vanilla was late: what planning bought
    refused: int  # predicted prefill alone exceeds T
    guard_stopped: int  # planned, then stopped by the deadline guard
    alpha_zero: int  # planned runs that chose α = 0
    alpha_top: int  # planned runs that chose α at the cap


def timebill_outcomes_by_kind(data: BenchData, method: str = "timebill") -> list[KindOutcomes]:
    """Per task kind, over all of ``method``'s runs on ``data.tasks``: in time, rescued, refused, guard-stopped.

    Budgets come from each record (``budget_s``), so this works on a combined run whose parts had
    different budgets. Vanilla's trace is judged at the same T; a kind without TimeBill runs is left out.
    """
    kind_of = {t.id: t.kind for t in data.tasks}
    vanilla = data.records.get("vanilla", {})
    counts: dict[str, list[int]] = {}
    for r in data.records.get(method, {}).values():
        kind = kind_of.get(str(r.get("task_id")))
        if kind is None or "budget_s" not in r:
            continue
        budget = float(r["budget_s"])
        van = vanilla.get(run_key("vanilla", str(r["task_id"]), None))
        van_ok = van is not None and finished_by(van, budget)
        ok = finished_by(r, budget)
        planned = _planned(r)
        c = counts.setdefault(kind, [0] * 8)
        flags = (
            True,
            van_ok,
            ok,
            ok and not van_ok,
            r.get("stop_reason") == STOP_REFUSED,
            r.get("stop_reason") == "deadline",
            planned and r["alpha"] == 0,
            planned and _at_cap(r["alpha"]),
        )
        for i, flag in enumerate(flags):
            c[i] += bool(flag)
    return [KindOutcomes(kind, *c) for kind, c in sorted(counts.items())]


def _by_kind(methods: Sequence[Method], ev: Evaluation, data: BenchData) -> list[str]:
    md = _by_kind_scores(methods, ev, {t.id: t.kind for t in data.tasks})
    rows = timebill_outcomes_by_kind(data)
    if rows:
        md += [
            "How `timebill`'s jobs ended, per kind (every task at every budget; vanilla's trace judged at the same T):",
            "",
            "| kind | jobs | vanilla in time | TimeBill in time | in time where vanilla was late | refused "
            "| guard-stopped | α = 0 | α at the cap |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for o in rows:
            shares = [o.vanilla_in_time, o.in_time, o.rescued, o.refused, o.guard_stopped, o.alpha_zero, o.alpha_top]
            md.append(f"| {o.kind} | {o.jobs} | " + " | ".join(f"{100 * x / o.jobs:.0f} %" for x in shares) + " |")
        md += [
            "",
            "Shares are of all jobs of the kind; a refused job plans nothing, so it is in neither α column.",
            "",
        ]
    return md


# ------------------------------------------------------------------------------------------- plots
def _plot_fig7(methods: Sequence[Method], ev: Evaluation, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for policy in POLICIES:
        fig, (ax_s, ax_c) = plt.subplots(1, 2, figsize=(11, 4.2))
        for method in methods:
            pts = [(c.x, ev.cells.get((method.name, c.key, policy))) for c in ev.columns]
            pts = [(b, s) for b, s in pts if s is not None]
            if not pts:
                continue
            style = "-o" if method.budgeted else "--s"
            ax_s.plot([b for b, _ in pts], [s.avg_score for _, s in pts], style, label=method.name, ms=4)
            ax_c.plot([b for b, _ in pts], [100 * s.completion_rate for _, s in pts], style, label=method.name, ms=4)
        ax_s.set(xlabel=ev.x_label, ylabel="average score (×100)", title=f"score vs budget ({policy})")
        ax_c.set(xlabel=ev.x_label, ylabel="completion rate (%)", title=f"completion vs budget ({policy})")
        ax_c.set_ylim(-2, 102)
        for ax in (ax_s, ax_c):
            ax.grid(alpha=0.3)
        ax_c.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        path = out / f"fig7_{policy}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _plot_fig8(ev: Evaluation, out: Path) -> Path | None:
    if not ev.k_cells:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(ev.k_cells)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(ks, [ev.k_cells[k].avg_score for k in ks], "-o", label="average score")
    ax.set(xlabel="pessimistic factor k", ylabel="average score (×100)", title=f"k sweep, Kill, {ev.tightest}")
    ax2 = ax.twinx()
    ax2.plot(ks, [100 * ev.k_cells[k].completion_rate for k in ks], "--s", color="tab:orange", label="completion")
    ax2.set_ylabel("completion rate (%)")
    ax.grid(alpha=0.3)
    fig.legend(loc="lower center", fontsize=8, ncol=2)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path = out / "fig8_k_sweep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _loosest_timebill_records(data: BenchData) -> list[dict[str, Any]]:
    """TimeBill's runs at the loosest budget that planned and ran (Fig. 6's points)."""
    if not data.budgets:
        return []
    runs = data.records.get("timebill", {})
    recs = [runs.get(run_key("timebill", t.id, data.budgets[-1])) for t in data.tasks]
    return [r for r in recs if r is not None and r.get("stop_reason") != STOP_REFUSED and r.get("predicted_e2e_s")]


def _plot_fig6(recs: Sequence[dict[str, Any]], loosest: float | None, out: Path) -> Path | None:
    """Measured e2e vs the time model's e2e at the generated length, and the plan's WCET (loosest budget)."""
    if not recs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    actual = [r["e2e_s"] for r in recs]
    ax.scatter(actual, [r["predicted_e2e_s"] for r in recs], s=12, label="predicted e2e (at the generated length)")
    ax.scatter(actual, [r["predicted_wcet_s"] for r in recs], s=12, marker="^", label="WCET (plan, at N̂_W)")
    top = max([*actual, *(r["predicted_wcet_s"] for r in recs)]) * 1.05
    ax.plot([0, top], [0, top], "k:", lw=1, label="y = x")
    if loosest is not None:
        ax.axhline(loosest, color="tab:red", lw=0.8, ls="--", label=f"budget {loosest:g} s")
    ax.set(xlabel="measured end-to-end time (s)", ylabel="predicted time (s)", title="TimeBill: predicted vs measured")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "fig6_e2e.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ report
def _runs_timed(data: BenchData) -> str:
    """The header's "; runs timed <first> to <last> UTC", from the records' finish stamps ("" if none).

    Why: a report rebuilt later (``--report-only``, a new report section) is dated the day it was
    written, and a reader must still see when, and over how long, the timings were taken.
    """
    stamps = [
        float(r["finished_at"])
        for by_key in data.records.values()
        for r in by_key.values()
        if isinstance(r.get("finished_at"), (int, float))
    ]
    if not stamps:
        return ""
    first, last = (
        datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M") for t in (min(stamps), max(stamps))
    )
    return f"; runs timed {first} to {last} UTC"


def machine_description(threads: int, recorded: str | None = None) -> str:
    """The machine the runs were timed on, as the manifest recorded it ("": this one, None: not recorded).

    "This one" is named by the runner's :func:`machine_id` (CPU signature and count), the same words a
    manifest records, so two reports never describe one host in two ways.
    """
    if recorded:
        return f"{recorded}, {threads} torch threads"
    if recorded is None:
        return f"not recorded (these runs predate it); this report was built on {machine_id()}"
    return f"{machine_id()}, {threads} torch threads, {platform.platform()}"


def decode_paths(data: BenchData) -> dict[str, str]:
    """Decode path per weight format, as the run records say (the engines that made them may not be loaded now).

    A rebuilt report (``--report-only``, ``bench-combine``) loads no int8/int4 engine, so the manifest's
    live view would miss them; the records carry the path each run really took. Two paths for one format
    (a run resumed on an older install) are both named.
    """
    found: dict[str, set[str]] = {}
    for method in [*data.methods, *data.k_methods]:
        weights = getattr(method, "weights", "fp32")
        for record in data.records.get(method.name, {}).values():
            if record.get("decode_path"):
                found.setdefault(weights, set()).add(str(record["decode_path"]))
    for weights, path in data.meta.get("decode_paths", {}).items():
        found.setdefault(weights, {path})  # a format with no runs yet: what the live engine would use
    return {w: " + ".join(sorted(paths)) for w, paths in found.items()}


def _decode_path_words(data: BenchData) -> str:
    paths = decode_paths(data)
    return ", ".join(f"{w}: {p}" for w, p in sorted(paths.items())) if paths else "–"


def _method_lines(data: BenchData, predictor_label: str) -> list[str]:
    lines = []
    for method in [*data.methods, *[m for m in data.k_methods if m.name not in {x.name for x in data.methods}]]:
        lines.append(f"- `{method.name}`: {method.describe()}")
    if any(m.budgeted for m in [*data.methods, *data.k_methods]):
        lines.append(f"- Length predictor for every TimeBill method: **{predictor_label}**")
    return lines


_HOW_TO_READ = [
    "## How to read this",
    "",
    "- **Vanilla, fixed-α and int8 runs do not depend on the budget**: each ran once per task with no "
    "deadline, keeping its per-token timestamps (from the request's start) and token ids; every budget and "
    "policy below is applied to that trace. TimeBill's methods ran once per task *and* budget (their plan "
    "depends on T), with the engine's deadline guard on.",
    "- **Completion** (the paper's): the full answer — ended by EOS or N_max, not cut by a deadline — was "
    "delivered within T, and the job was not skipped. A TimeBill job its guard stopped at T is *not* "
    "completed (under Kill it scores 0; under guard its partial answer is scored). A job TimeBill refused "
    "because even its predicted prefill exceeds T is not completed and scores 0.",
    "- **Kill**: a job that would overrun is terminated at T, score 0. **Skip-Next**: jobs are released "
    "every T seconds in suite order; an overrunning job runs to its end (score 0) and jobs released "
    "meanwhile are skipped (score 0). TimeBill jobs never run past their guard, so they skip nothing. "
    "**guard** (ours): the job stops at T and its partial answer is scored as is.",
    "- Cells are *average score ×100 (completion rate)*, averaged over all jobs. Metrics: QA F1 "
    "(retrieval), code edit similarity (code), ROUGE-L (chat), as LongBench computes them "
    "(`timebill.bench.metrics` says where ours differ).",
]


def _suite_line(data: BenchData, tasks_note: str) -> str:
    counts = data.suite.counts()
    selected: dict[str, int] = {}
    for t in data.tasks:
        selected[t.kind] = selected.get(t.kind, 0) + 1
    return (
        f"- Suite: `{data.suite.path}` (sha256 {data.suite.sha256[:16]}…), "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        + f"; this run: {len(data.tasks)} tasks ("
        + ", ".join(f"{k} {v}" for k, v in sorted(selected.items()))
        + f"{tasks_note})"
    )


def _results(
    data: BenchData, ev: Evaluation, scorer: Scorer, out: Path, predictor: str, budgets: list[str], fig6: Path | None
) -> list[str]:
    """Everything after the header: methods, budgets, sanity, tables per policy, claims, k sweep, plots."""
    md = ["", *_HOW_TO_READ, "", "## Methods", "", *_method_lines(data, predictor), "", "## Budgets", "", *budgets]
    md += ["", "## Sanity: vanilla (α = 0, no deadline) per task kind", "", *_sanity_table(data, scorer), ""]
    for policy in POLICIES:
        md += [f"## Average score (completion rate) — {policy}", "", *_policy_table(data.methods, ev, policy), ""]
    md += [
        "## The paper's claims, checked (Kill)",
        "",
        f"Target: at every budget TimeBill's average score ≥ {PAPER_SCORE_RATIO:.2f} × the best fixed-α baseline's, "
        f"with completion ≥ fixed α = 95 %'s.",
        "",
        *_claims(data.methods, ev, "kill"),
        "",
        "Skip-Next:",
        "",
        *_claims(data.methods, ev, "skip-next"),
        "",
        "What makes a budget hard (share of jobs):",
        "",
        *_diagnostics(ev),
        "",
        *_completion_gap_lines(data),
        "## Where the time goes",
        "",
        *_where_time_goes(data),
        "## By task kind",
        "",
        *_by_kind(data.methods, ev, data),
    ]
    if ev.k_cells:
        ks = sorted(ev.k_cells)
        md += [
            f"## k sweep (Kill, {ev.tightest})",
            "",
            "| k | " + " | ".join(str(k) for k in ks) + " |",
            "|---|" + "---|" * len(ks),
            "| score | " + " | ".join(f"{ev.k_cells[k].avg_score:.1f}" for k in ks) + " |",
            "| completion | " + " | ".join(f"{100 * ev.k_cells[k].completion_rate:.0f} %" for k in ks) + " |",
            "",
            f"(k = {DEFAULT_K} is the `timebill` method's runs at this budget.)",
            "",
        ]
    plots = [*_plot_fig7(data.methods, ev, out), _plot_fig8(ev, out), fig6]
    md += ["## Plots", ""]
    md += [f"- `{p.name}`" for p in plots if p is not None]
    md += ["", "![score and completion vs budget, Kill](fig7_kill.png)", ""]
    if ev.missing:
        md += ["## Missing runs (cells shown as –)", "", *[f"- {m}" for m in ev.missing], ""]
    return md


def write_report(data: BenchData, out_dir: str | os.PathLike[str], scorer: Scorer, info: dict[str, Any]) -> Path:
    """Write ``results.md`` and the plots into ``out_dir``; returns the markdown's path.

    ``info``: command, threads, torch, model_id, predictor (label), when (ISO date; default now).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ev = evaluate(data, scorer)
    when = info.get("when") or datetime.now(timezone.utc).isoformat(timespec="seconds")
    predictor = str(info.get("predictor", "?"))
    part = data.meta.get("part")
    md: list[str] = [
        f"# TimeBill time-budget benchmark — {data.suite.name}" + (f" (part {part})" if part else ""),
        "",
        f"- Command: `{data.meta.get('command') or info.get('command', '?')}`",
        *([f"- Report rebuilt by: `{data.meta['rebuilt_by']}`"] if data.meta.get("rebuilt_by") else []),
        f"- Date: {when}" + _runs_timed(data),
        f"- Machine: {machine_description(int(info.get('threads', 0)), data.meta.get('machine', ''))}",
        f"- Model: {info.get('model_id', '?')}, torch {info.get('torch', '?')}, decode paths "
        + _decode_path_words(data),
        _suite_line(data, f", --fraction {data.meta.get('fraction', 1.0):g}" + (f", --part {part}" if part else "")),
        f"- Length predictor: **{predictor}**",
    ]
    fig6 = _plot_fig6(_loosest_timebill_records(data), data.budgets[-1] if data.budgets else None, out)
    md += _results(data, ev, scorer, out, predictor, [data.budget_note or "–"], fig6)
    path = out / "results.md"
    write_bytes_atomically(path, "\n".join(md).encode())
    return path


def write_combined_report(
    parts: Sequence[BenchData],
    combined: tuple[Evaluation, BenchData],
    out_dir: str | os.PathLike[str],
    scorer: Scorer,
    info: dict[str, Any],
) -> Path:
    """``results.md`` and plots for a run split into parts; returns the markdown's path.

    ``combined``: what :func:`combine` returned for ``parts``. ``info``: command, torch, model_id,
    predictor, when, and ``dirs`` (the parts' directories, in order).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ev, union = combined
    when = info.get("when") or datetime.now(timezone.utc).isoformat(timespec="seconds")
    predictor = str(info.get("predictor", "?"))
    dirs = list(info.get("dirs") or ["?"] * len(parts))
    md: list[str] = [
        f"# TimeBill time-budget benchmark — {union.suite.name} ({len(parts)} parts combined)",
        "",
        f"- Command: `{info.get('command', '?')}`",
        f"- Date: {when}",
        f"- Model: {info.get('model_id', '?')}, torch {info.get('torch', '?')}, decode paths "
        + _decode_path_words(union),
        _suite_line(union, f", in {len(parts)} parts"),
        f"- Length predictor: **{predictor}**",
        "",
        "Each part ran on one machine, with budgets chosen from its own vanilla times at the same percentiles; "
        "a column is a budget *level* (that percentile) and a cell is the job-weighted mean over the parts "
        "(Skip-Next streams run per part, at that part's T).",
        "",
        "| part | directory | machine | threads | tasks | command | budgets (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for p, d in zip(parts, dirs, strict=True):
        md.append(
            f"| {p.meta.get('part') or '–'} | `{d}` | {p.meta.get('machine') or '?'} | {p.meta.get('threads', '?')} | "
            f"{len(p.tasks)} | `{p.meta.get('command') or '?'}` | {', '.join(f'{b:g}' for b in p.budgets)} |"
        )
    recs = [r for p in parts for r in _loosest_timebill_records(p)]
    budget_lines = [f"- part {p.meta.get('part') or i}: {p.budget_note or '–'}" for i, p in enumerate(parts)]
    md += _results(union, ev, scorer, out, predictor, budget_lines, _plot_fig6(recs, None, out))
    path = out / "results.md"
    write_bytes_atomically(path, "\n".join(md).encode())
    return path


def summary_lines(data: BenchData, scorer: Scorer, policy: str = "kill", ev: Evaluation | None = None) -> list[str]:
    """A compact text version of the main table for the terminal (``ev``: a combined evaluation)."""
    ev = ev or evaluate(data, scorer)
    lines = [f"{policy}: average score ×100 (completion %) per budget"]
    width = max((len(m.name) for m in data.methods), default=8)
    cell = max([13, *(len(c.header) for c in ev.columns)])
    lines.append(" " * width + "  " + "  ".join(f"{c.header:>{cell}}" for c in ev.columns))
    for method in data.methods:
        cells = [_fmt(ev.cells.get((method.name, c.key, policy))) for c in ev.columns]
        lines.append(f"{method.name:<{width}}  " + "  ".join(f"{c:>{cell}}" for c in cells))
    return lines
