"""The benchmark's figures, after the paper: score and completion vs budget per method (Fig. 7), score vs k
(Fig. 8), predicted vs measured end-to-end time with the WCET (Fig. 6). The only bench module that uses
matplotlib, imported when a figure is drawn so that reading results needs no plotting stack.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from timebill.bench.methods import STOP_REFUSED, Method
from timebill.bench.policies import POLICIES
from timebill.bench.runner import BenchData, run_key
from timebill.bench.stats import Evaluation


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (benchmarks run on machines with no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_fig7(methods: Sequence[Method], ev: Evaluation, out: Path) -> list[Path]:
    """Score and completion vs budget per method, one PNG per overrun policy (Fig. 7)."""
    plt = _pyplot()
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


def plot_fig8(ev: Evaluation, out: Path) -> Path | None:
    """Kill score and completion vs the pessimistic factor k at the tightest budget (Fig. 8); None without a sweep."""
    if not ev.k_cells:
        return None
    plt = _pyplot()
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


def loosest_timebill_records(data: BenchData) -> list[dict[str, Any]]:
    """TimeBill's runs at the loosest budget that planned and ran (Fig. 6's points)."""
    if not data.budgets:
        return []
    runs = data.records.get("timebill", {})
    recs = [runs.get(run_key("timebill", t.id, data.budgets[-1])) for t in data.tasks]
    return [r for r in recs if r is not None and r.get("stop_reason") != STOP_REFUSED and r.get("predicted_e2e_s")]


def plot_fig6(recs: Sequence[dict[str, Any]], loosest: float | None, out: Path) -> Path | None:
    """Measured e2e vs the time model's e2e at the generated length, and the plan's WCET (loosest budget)."""
    if not recs:
        return None
    plt = _pyplot()
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
