"""The benchmark's report: ``results.md`` (tables, claims checked, how budgets were chosen), for one run or a
run split into parts. The numbers come from :mod:`timebill.bench.stats`, the PNGs from :mod:`timebill.bench.plots`.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from timebill.bench.methods import DEFAULT_K, Method, Scorer
from timebill.bench.plots import loosest_timebill_records, plot_fig6, plot_fig7, plot_fig8
from timebill.bench.policies import POLICIES, PolicySummary
from timebill.bench.runner import BenchData, machine_id, run_key
from timebill.bench.stats import (
    BOOTSTRAP_LEVEL,
    BOOTSTRAP_RESAMPLES,
    DIAGNOSTICS,
    Evaluation,
    completion_gap,
    decode_costs,
    evaluate,
    paired_ratio_interval,
    plan_stats,
    timebill_outcomes_by_kind,
)
from timebill.paths import write_bytes_atomically
from timebill.planner import DEFAULT_ALPHA_MAX

PAPER_SCORE_RATIO = 1.10  # the target: TimeBill ≥ 1.10 × the best fixed α, at every budget
COMPLETION_REFERENCE = "snapkv-0.95"


# ------------------------------------------------------------------------------------------ tables
def _fmt(summary: PolicySummary | None) -> str:
    if summary is None or math.isnan(summary.avg_score):
        return "–"
    return f"{summary.avg_score:.1f} ({100 * summary.completion_rate:.0f} %)"


def policy_table(methods: Sequence[Method], ev: Evaluation, policy: str) -> list[str]:
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


def _diagnostics(ev: Evaluation) -> list[str]:
    """Why a budget is hard: jobs TimeBill refused (prefill alone over T), jobs even α = 0.95 overruns."""
    lines = ["| T | " + " | ".join(DIAGNOSTICS) + " |", "|---|" + "---|" * len(DIAGNOSTICS)]
    for col in ev.columns:
        counts = ev.diagnostics.get(col.key, {})
        shares = [
            "–" if not (c := counts.get(name)) or not c[1] else f"{100 * c[0] / c[1]:.0f} %" for name in DIAGNOSTICS
        ]
        lines.append(f"| {col.header} | " + " | ".join(shares) + " |")
    return lines


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
        md += [f"## Average score (completion rate) — {policy}", "", *policy_table(data.methods, ev, policy), ""]
    if "timebill" in {m.name for m in data.methods}:  # the paper's planner ran: check the paper's own claims
        md += [
            "## The paper's claims, checked (Kill)",
            "",
            f"Target: at every budget TimeBill's average score ≥ {PAPER_SCORE_RATIO:.2f} × the best fixed-α "
            f"baseline's, with completion ≥ fixed α = 95 %'s.",
            "",
            *_claims(data.methods, ev, "kill"),
            "",
            "Skip-Next:",
            "",
            *_claims(data.methods, ev, "skip-next"),
            "",
        ]
    md += [
        *_expected_claims(data, ev, out),
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
    plots = [*plot_fig7(data.methods, ev, out), plot_fig8(ev, out), fig6]
    md += ["## Plots", ""]
    md += [f"- `{p.name}`" for p in plots if p is not None]
    md += ["", "![score and completion vs budget, Kill](fig7_kill.png)", ""]
    if ev.missing:
        md += ["## Missing runs (cells shown as –)", "", *[f"- {m}" for m in ev.missing], ""]
    return md


def _expected_claims(bench: BenchData, ev: Evaluation, out: Path) -> list[str]:
    """The expected-score planner's claims (:mod:`timebill.bench.claims`), also written as ``claims.json``."""
    from timebill.bench.claims import GUARD_METHOD, KILL_METHOD, claims, claims_lines, write_claims

    names = {m.name for m in bench.methods}
    if not names & {KILL_METHOD, GUARD_METHOD}:
        return []
    data = claims(ev, bench.methods, records=bench.records)
    write_claims(out, data)
    return [
        "## The expected-score planner's claims (Kill and guard; `claims.json`)",
        "",
        f"Kill: {data['targets']['kill']}. Guard: {data['targets']['guard']}.",
        "",
        *claims_lines(data),
        "",
    ]


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
    fig6 = plot_fig6(loosest_timebill_records(data), data.budgets[-1] if data.budgets else None, out)
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
    recs = [r for p in parts for r in loosest_timebill_records(p)]
    budget_lines = [f"- part {p.meta.get('part') or i}: {p.budget_note or '–'}" for i, p in enumerate(parts)]
    md += _results(union, ev, scorer, out, predictor, budget_lines, plot_fig6(recs, None, out))
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
