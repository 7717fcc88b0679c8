"""The benchmark's statistics: policy summaries per method and budget, merged parts, and the numbers behind the claims.

Everything here is derived from the run records (:mod:`timebill.bench.runner`) by the overrun policies
(:mod:`timebill.bench.policies`); nothing is measured, and nothing here draws or writes markdown.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from timebill.bench.methods import STOP_REFUSED, Method, Scorer, finished_by, outcome
from timebill.bench.policies import POLICIES, JobOutcome, PolicySummary
from timebill.bench.runner import BenchData, BenchError, budget_quantiles, run_key
from timebill.planner import DEFAULT_ALPHA_MAX


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
    # The same for the guard policy (a partial answer counts): its claims are bootstrapped too.
    guard_jobs: dict[tuple[str, float], list[tuple[str, float]]] = field(default_factory=dict)


def _records_at(data: BenchData, method: Method, budget_s: float) -> list[dict[str, Any]] | None:
    runs = data.records.get(method.name, {})
    found = [runs.get(run_key(method.name, t.id, budget_s if method.budgeted else None)) for t in data.tasks]
    return None if any(r is None for r in found) else found  # type: ignore[return-value]


def _jobs_at(data: BenchData, method: Method, budget_s: float, scorer: Scorer) -> list[JobOutcome] | None:
    """Every task's job for ``method`` at ``budget_s``, in suite order; None while any run is missing."""
    records = _records_at(data, method, budget_s)
    if records is None:
        return None
    return [outcome(r, t, budget_s, scorer) for r, t in zip(records, data.tasks, strict=True)]


def evaluate(data: BenchData, scorer: Scorer) -> Evaluation:
    """Apply every policy to every method at every budget (jobs in suite order, period = T)."""
    columns = [Column(b, f"T = {b:g} s", b) for b in data.budgets]
    tightest_words = f"T = {data.budgets[0]:g} s" if data.budgets else ""
    cells: dict[tuple[str, float, str], PolicySummary] = {}
    kill_jobs: dict[tuple[str, float], list[tuple[str, float]]] = {}
    guard_jobs: dict[tuple[str, float], list[tuple[str, float]]] = {}
    missing: list[str] = []
    for method in data.methods:
        for budget in data.budgets:
            jobs = _jobs_at(data, method, budget, scorer)
            if jobs is None:
                missing.append(f"{method.name} at {budget:g} s")
                continue
            for name, policy in POLICIES.items():
                scores = policy.apply(jobs, budget)
                cells[(method.name, budget, name)] = PolicySummary.of(name, scores)
                if name in ("kill", "guard"):
                    jobs_of = kill_jobs if name == "kill" else guard_jobs
                    jobs_of[(method.name, budget)] = [(j.task_id, j.score) for j in scores]
    k_cells: dict[int, PolicySummary] = {}
    if data.budgets:
        tightest = data.budgets[0]
        for method in data.k_methods:
            k_jobs = _jobs_at(data, method, tightest, scorer)
            if k_jobs is None:
                missing.append(f"{method.name} (k sweep) at {tightest:g} s")
                continue
            k_cells[int(method.k)] = POLICIES["kill"].summarise(k_jobs, tightest)  # type: ignore[attr-defined]
    diagnostics = {b: _diagnostic_counts(data, b) for b in data.budgets}
    return Evaluation(
        cells,
        k_cells,
        missing,
        columns,
        tightest=tightest_words,
        diagnostics=diagnostics,
        kill_jobs=kill_jobs,
        guard_jobs=guard_jobs,
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

    Each part (``--part I/N``, one machine each) has its own budgets, the same percentiles of *its*
    vanilla times, so columns become budget *levels* and a cell is the job-weighted mean of the parts'
    cells at that level (Skip-Next streams stay per part).

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
    guard_jobs: dict[tuple[str, float], list[tuple[str, float]]] = {}
    missing: list[str] = []
    for method in parts[0].methods:
        for col in columns:
            for mine, theirs in ((kill_jobs, "kill_jobs"), (guard_jobs, "guard_jobs")):
                found_jobs = [
                    getattr(ev, theirs).get((method.name, p.budgets[int(col.key)]))
                    for ev, p in zip(evs, parts, strict=True)
                ]
                if all(j is not None for j in found_jobs):
                    mine[(method.name, col.key)] = [job for jobs in found_jobs for job in jobs]  # type: ignore[union-attr]
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
        for name in DIAGNOSTICS:
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
        guard_jobs=guard_jobs,
    )
    return ev, union


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


DIAGNOSTICS = ("vanilla overruns", "α = 0.95 overruns", "TimeBill refused (prefill > T)", "TimeBill guard-stopped")


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
    return dict(zip(DIAGNOSTICS, found, strict=True))


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
