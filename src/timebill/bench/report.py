"""The benchmark's report: ``results.md`` (tables, claims checked, how budgets were chosen) and PNG plots.

Everything here is derived from the run records (:mod:`timebill.bench.runner`) by the overrun policies
(:mod:`timebill.bench.policies`); nothing is measured. Plots follow the paper: score and completion
vs budget per method (Fig. 7), score vs k (Fig. 8), predicted vs measured end-to-end time with the WCET
(Fig. 6).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from timebill.bench.methods import DEFAULT_K, STOP_REFUSED, Method, Scorer, outcome
from timebill.bench.policies import POLICIES, PolicySummary
from timebill.bench.runner import BenchData, run_key

PAPER_SCORE_RATIO = 1.10  # the target: TimeBill ≥ 1.10 × the best fixed α, at every budget
COMPLETION_REFERENCE = "snapkv-0.95"


@dataclass
class Evaluation:
    """Summaries by (method, budget, policy); ``missing`` lists cells with runs not (yet) done."""

    cells: dict[tuple[str, float, str], PolicySummary]
    k_cells: dict[int, PolicySummary]
    missing: list[str]


def _records_at(data: BenchData, method: Method, budget_s: float) -> list[dict[str, Any]] | None:
    runs = data.records.get(method.name, {})
    found = [runs.get(run_key(method.name, t.id, budget_s if method.budgeted else None)) for t in data.tasks]
    return None if any(r is None for r in found) else found  # type: ignore[return-value]


def evaluate(data: BenchData, scorer: Scorer) -> Evaluation:
    """Apply every policy to every method at every budget (jobs in suite order, period = T)."""
    cells: dict[tuple[str, float, str], PolicySummary] = {}
    missing: list[str] = []
    for method in data.methods:
        for budget in data.budgets:
            records = _records_at(data, method, budget)
            if records is None:
                missing.append(f"{method.name} at {budget:g} s")
                continue
            jobs = [outcome(r, t, budget, scorer) for r, t in zip(records, data.tasks, strict=True)]
            for name, policy in POLICIES.items():
                cells[(method.name, budget, name)] = policy.summarise(jobs, budget)
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
    return Evaluation(cells, k_cells, missing)


# ------------------------------------------------------------------------------------------ tables
def _fmt(summary: PolicySummary | None) -> str:
    if summary is None or math.isnan(summary.avg_score):
        return "–"
    return f"{summary.avg_score:.1f} ({100 * summary.completion_rate:.0f} %)"


def _policy_table(data: BenchData, ev: Evaluation, policy: str) -> list[str]:
    header = "| method | " + " | ".join(f"T = {b:g} s" for b in data.budgets) + " |"
    lines = [header, "|---|" + "---|" * len(data.budgets)]
    for method in data.methods:
        cells = [_fmt(ev.cells.get((method.name, b, policy))) for b in data.budgets]
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


def _claims(data: BenchData, ev: Evaluation, policy: str) -> list[str]:
    """The issue's numbers to reach, checked per budget: TimeBill vs the best fixed α, and vs α = 0.95's completion."""
    fixed = [m.name for m in data.methods if m.name.startswith("snapkv-")]
    if "timebill" not in {m.name for m in data.methods} or not fixed:
        return ["(needs the timebill method and at least one fixed-α method)"]
    lines = [
        "| T | TimeBill score | best fixed α (score) | ratio | ≥ 1.10× | TimeBill completion "
        "| α = 0.95 completion | ≥ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b in data.budgets:
        tb = ev.cells.get(("timebill", b, policy))
        present = [m for m in fixed if (m, b, policy) in ev.cells]
        ref = ev.cells.get((COMPLETION_REFERENCE, b, policy))
        if tb is None or not present:
            lines.append(f"| {b:g} s | – | – | – | – | – | – | – |")
            continue
        best_name = max(present, key=lambda m: ev.cells[(m, b, policy)].avg_score)
        best_summary = ev.cells[(best_name, b, policy)]
        ratio = tb.avg_score / best_summary.avg_score if best_summary.avg_score > 0 else math.inf
        score_ok = "yes" if ratio >= PAPER_SCORE_RATIO else "**no**"
        comp_ok = "–" if ref is None else ("yes" if tb.completion_rate >= ref.completion_rate else "**no**")
        lines.append(
            f"| {b:g} s | {tb.avg_score:.1f} | {best_name} ({best_summary.avg_score:.1f}) | {ratio:.2f} | {score_ok} | "
            f"{100 * tb.completion_rate:.0f} % | {'–' if ref is None else f'{100 * ref.completion_rate:.0f} %'} | "
            f"{comp_ok} |"
        )
    return lines


def _diagnostics(data: BenchData) -> list[str]:
    """Why a budget is hard: jobs TimeBill refused (prefill alone over T), jobs even α = 0.95 overruns."""
    lines = [
        "| T | vanilla overruns | α = 0.95 overruns | TimeBill refused (prefill > T) | TimeBill guard-stopped |",
        "|---|---|---|---|---|",
    ]
    n = len(data.tasks)
    for b in data.budgets:

        def share(method: str, budget: float | None, predicate: Any, b: float = b) -> str:
            runs = data.records.get(method, {})
            recs = [runs.get(run_key(method, t.id, budget)) for t in data.tasks]
            if any(r is None for r in recs) or not n:
                return "–"
            return f"{100 * sum(bool(predicate(r, b)) for r in recs) / n:.0f} %"

        lines.append(
            f"| {b:g} s | {share('vanilla', None, lambda r, b: r['e2e_s'] > b)} | "
            f"{share('snapkv-0.95', None, lambda r, b: r['e2e_s'] > b)} | "
            f"{share('timebill', b, lambda r, b: r['stop_reason'] == STOP_REFUSED)} | "
            f"{share('timebill', b, lambda r, b: r['stop_reason'] == 'deadline')} |"
        )
    return lines


# ------------------------------------------------------------------------------------------- plots
def _plot_fig7(data: BenchData, ev: Evaluation, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for policy in POLICIES:
        fig, (ax_s, ax_c) = plt.subplots(1, 2, figsize=(11, 4.2))
        for method in data.methods:
            pts = [(b, ev.cells.get((method.name, b, policy))) for b in data.budgets]
            pts = [(b, s) for b, s in pts if s is not None]
            if not pts:
                continue
            style = "-o" if method.budgeted else "--s"
            ax_s.plot([b for b, _ in pts], [s.avg_score for _, s in pts], style, label=method.name, ms=4)
            ax_c.plot([b for b, _ in pts], [100 * s.completion_rate for _, s in pts], style, label=method.name, ms=4)
        ax_s.set(xlabel="time budget T (s)", ylabel="average score (×100)", title=f"score vs budget ({policy})")
        ax_c.set(xlabel="time budget T (s)", ylabel="completion rate (%)", title=f"completion vs budget ({policy})")
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


def _plot_fig8(data: BenchData, ev: Evaluation, out: Path) -> Path | None:
    if not ev.k_cells:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(ev.k_cells)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(ks, [ev.k_cells[k].avg_score for k in ks], "-o", label="average score")
    ax.set(
        xlabel="pessimistic factor k", ylabel="average score (×100)", title=f"k sweep, Kill, T = {data.budgets[0]:g} s"
    )
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


def _plot_fig6(data: BenchData, out: Path) -> Path | None:
    """Measured e2e vs the time model's e2e at the generated length, and the plan's WCET (loosest budget)."""
    if not data.budgets:
        return None
    loosest = data.budgets[-1]
    runs = data.records.get("timebill", {})
    recs = [runs.get(run_key("timebill", t.id, loosest)) for t in data.tasks]
    recs = [r for r in recs if r is not None and r.get("stop_reason") != STOP_REFUSED and r.get("predicted_e2e_s")]
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
def machine_description(threads: int) -> str:
    from timebill.estimator.store import cpu_model_name

    return f"{cpu_model_name()}, {os.cpu_count()} logical CPUs, {threads} torch threads, {platform.platform()}"


def _method_lines(data: BenchData, predictor_label: str) -> list[str]:
    lines = []
    for method in [*data.methods, *[m for m in data.k_methods if m.name not in {x.name for x in data.methods}]]:
        lines.append(f"- `{method.name}`: {method.describe()}")
    if any(m.budgeted for m in [*data.methods, *data.k_methods]):
        lines.append(f"- Length predictor for every TimeBill method: **{predictor_label}**")
    return lines


def write_report(data: BenchData, out_dir: str | os.PathLike[str], scorer: Scorer, info: dict[str, Any]) -> Path:
    """Write ``results.md`` and the plots into ``out_dir``; returns the markdown's path.

    ``info``: command, threads, torch, model_id, predictor (label), when (ISO date; default now).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ev = evaluate(data, scorer)
    when = info.get("when") or datetime.now(timezone.utc).isoformat(timespec="seconds")
    counts = data.suite.counts()
    selected: dict[str, int] = {}
    for t in data.tasks:
        selected[t.kind] = selected.get(t.kind, 0) + 1
    predictor = str(info.get("predictor", "?"))
    md: list[str] = [
        f"# TimeBill time-budget benchmark — {data.suite.name}",
        "",
        f"- Command: `{info.get('command') or data.meta.get('command', '?')}`",
        f"- Date: {when}",
        f"- Machine: {machine_description(int(info.get('threads', 0)))}",
        f"- Model: {info.get('model_id', '?')}, torch {info.get('torch', '?')}, decode paths "
        + ", ".join(f"{w}: {p}" for w, p in sorted(data.meta.get("decode_paths", {}).items())),
        f"- Suite: `{data.suite.path}` (sha256 {data.suite.sha256[:16]}…), "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        + f"; this run: {len(data.tasks)} tasks ("
        + ", ".join(f"{k} {v}" for k, v in sorted(selected.items()))
        + f", --fraction {data.meta.get('fraction', 1.0):g})",
        f"- Length predictor: **{predictor}**",
        "",
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
        "",
        "## Methods",
        "",
        *_method_lines(data, predictor),
        "",
        "## Budgets",
        "",
        data.budget_note or "–",
        "",
        "## Sanity: vanilla (α = 0, no deadline) per task kind",
        "",
        *_sanity_table(data, scorer),
        "",
    ]
    for policy in POLICIES:
        md += [f"## Average score (completion rate) — {policy}", "", *_policy_table(data, ev, policy), ""]
    md += [
        "## The paper's claims, checked (Kill)",
        "",
        f"Target: at every budget TimeBill's average score ≥ {PAPER_SCORE_RATIO:.2f} × the best fixed-α baseline's, "
        f"with completion ≥ fixed α = 95 %'s.",
        "",
        *_claims(data, ev, "kill"),
        "",
        "Skip-Next:",
        "",
        *_claims(data, ev, "skip-next"),
        "",
        "What makes a budget hard (share of jobs):",
        "",
        *_diagnostics(data),
        "",
    ]
    if ev.k_cells:
        ks = sorted(ev.k_cells)
        md += [
            f"## k sweep (Kill, T = {data.budgets[0]:g} s)",
            "",
            "| k | " + " | ".join(str(k) for k in ks) + " |",
            "|---|" + "---|" * len(ks),
            "| score | " + " | ".join(f"{ev.k_cells[k].avg_score:.1f}" for k in ks) + " |",
            "| completion | " + " | ".join(f"{100 * ev.k_cells[k].completion_rate:.0f} %" for k in ks) + " |",
            "",
            f"(k = {DEFAULT_K} is the `timebill` method's runs at this budget.)",
            "",
        ]
    plots = [*_plot_fig7(data, ev, out), _plot_fig8(data, ev, out), _plot_fig6(data, out)]
    md += ["## Plots", ""]
    md += [f"- `{p.name}`" for p in plots if p is not None]
    md += ["", "![score and completion vs budget, Kill](fig7_kill.png)", ""]
    if ev.missing:
        md += ["## Missing runs (cells shown as –)", "", *[f"- {m}" for m in ev.missing], ""]
    path = out / "results.md"
    path.write_text("\n".join(md))
    return path


def summary_lines(data: BenchData, scorer: Scorer, policy: str = "kill") -> list[str]:
    """A compact text version of the main table for the terminal."""
    ev = evaluate(data, scorer)
    lines = [f"{policy}: average score ×100 (completion %) per budget"]
    width = max((len(m.name) for m in data.methods), default=8)
    lines.append(" " * width + "  " + "  ".join(f"{b:>12g}s" for b in data.budgets))
    for method in data.methods:
        cells = [_fmt(ev.cells.get((method.name, b, policy))) for b in data.budgets]
        lines.append(f"{method.name:<{width}}  " + "  ".join(f"{c:>13}" for c in cells))
    return lines
