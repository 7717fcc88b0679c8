"""The report's own statistics: decode cost per method (paired with vanilla), TimeBill's plan stats, the
paired bootstrap interval of the claims' score ratio, the per-kind breakdown, and where TimeBill's
completion falls short of fixed α = 0.95's.

Hand-built run records with known timestamps, so every number below is computed by hand.
"""

from __future__ import annotations

import math

import pytest

from timebill.bench.methods import STOP_REFUSED, method_registry
from timebill.bench.report import _by_kind_scores, _ratio_text, decode_paths
from timebill.bench.runner import BenchData, run_key
from timebill.bench.stats import (
    Column,
    Evaluation,
    completion_gap,
    decode_costs,
    paired_ratio_interval,
    plan_stats,
    timebill_outcomes_by_kind,
)
from timebill.bench.suite import Suite, Task

TASKS = [Task(f"t{i}", "chat", "rouge", "p", ("r",), 8) for i in range(2)]


def _trace(task: Task, method: str, step_s: float, n: int, start: float = 2.0, **extra) -> dict:
    """A run whose first token lands at ``start`` and the next ones every ``step_s``."""
    return {
        "key": run_key(method, task.id, None),
        "task_id": task.id,
        "token_ids": list(range(n)),
        "token_times_s": [start + i * step_s for i in range(n)],
        "stop_reason": "max_tokens" if n == task.max_new_tokens else "eos",
        "prefill_s": start,
        **extra,
    }


def _by_key(*records: dict) -> dict[str, dict]:
    return {r["key"]: r for r in records}


def _data(records: dict[str, dict[str, dict]], methods: list[str]) -> BenchData:
    registry = method_registry()
    suite = Suite({}, tuple(TASKS), "0" * 64, "costs.jsonl")
    return BenchData(suite, list(TASKS), [5.0], "", [registry[m] for m in methods], [], records)


def test_decode_cost_is_the_median_gap_and_its_ratio_to_vanilla_is_paired_by_task() -> None:
    a, b = TASKS
    records = {
        # vanilla: task a steps at 100 ms, task b at 200 ms (a longer prompt, say)
        "vanilla": _by_key(
            _trace(a, "vanilla", 0.1, 8, kept_kv_tokens=100), _trace(b, "vanilla", 0.2, 4, kept_kv_tokens=300)
        ),
        # α = 0.5: 80 ms on a (0.8×) and 100 ms on b (0.5×); one slow outlier gap on b does not move b's median
        "snapkv-0.5": _by_key(
            _trace(a, "snapkv-0.5", 0.08, 3, kept_kv_tokens=50),
            {**_trace(b, "snapkv-0.5", 0.1, 4, kept_kv_tokens=150), "token_times_s": [2.0, 2.1, 2.2, 9.0]},
        ),
        "snapkv-0.95": {},  # asked for but not run: left out, not a row of zeros
    }
    rows = {c.method: c for c in decode_costs(_data(records, ["vanilla", "snapkv-0.5", "snapkv-0.95", "timebill"]))}
    assert set(rows) == {"vanilla", "snapkv-0.5"}  # timebill is budgeted: not a trace method
    van, half = rows["vanilla"], rows["snapkv-0.5"]
    assert van.step_ms == pytest.approx(150.0) and van.step_vs_vanilla == pytest.approx(1.0)
    assert half.step_ms == pytest.approx(90.0)  # median of 80 and 100
    # paired: median(80/100, 100/200) = 0.65; the unpaired 90/150 = 0.60 would mix prompt lengths in
    assert half.step_vs_vanilla == pytest.approx(0.65)
    assert (half.runs, half.kept_kv, half.tokens) == (2, 100, 3.5)
    assert van.at_n_max == pytest.approx(0.5) and half.at_n_max == 0  # a's vanilla run hit N_max = 8
    assert van.prefill_s == pytest.approx(2.0)


def _planned(task: Task, budget: float, **fields) -> dict:
    return {
        "key": run_key("timebill", task.id, budget),
        "task_id": task.id,
        "max_new_tokens": task.max_new_tokens,
        "stop_reason": "eos",
        **fields,
    }


def test_plan_stats_count_capped_worst_cases_alpha_choices_and_time_model_error() -> None:
    a, b = TASKS
    runs = [
        _planned(a, 5.0, alpha=0.0, n_hat=64.0, n_worst=8, feasible=True, prefill_s=2.0, predicted_prefill_s=1.0,
                 e2e_s=3.0, predicted_e2e_s=3.0),
        _planned(b, 5.0, alpha=0.95, n_hat=1.0, n_worst=5, feasible=False, prefill_s=1.0, predicted_prefill_s=1.0,
                 e2e_s=2.0, predicted_e2e_s=4.0),
        _planned(a, 9.0, alpha=0.3, n_hat=16.0, n_worst=8, feasible=True, prefill_s=3.0, predicted_prefill_s=2.0,
                 e2e_s=4.0, predicted_e2e_s=4.0),
        {"key": run_key("timebill", b.id, 9.0), "task_id": b.id, "stop_reason": STOP_REFUSED},
        {"key": run_key("timebill", "other", 9.0), "task_id": "other", "stop_reason": STOP_REFUSED},  # not a task here
    ]  # fmt: skip
    stats = plan_stats(_data({"timebill": _by_key(*runs)}, ["timebill"]))
    assert stats is not None
    assert (stats.planned, stats.refused) == (3, 1)
    assert stats.capped == pytest.approx(2 / 3)  # n_worst == N_max = 8 in two of three
    assert stats.n_hat_over_n_max == pytest.approx(2.0)  # median of 8, 1/8, 2
    assert (stats.alpha_zero, stats.alpha_top, stats.infeasible) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert stats.prefill_ratio == pytest.approx((1.5, 2.0))  # ratios 2, 1, 1.5
    assert stats.e2e_ratio == pytest.approx((1.0, 1.0))  # ratios 1, 0.5, 1


def test_plan_stats_without_runs_is_none_and_with_only_refusals_has_no_ratios() -> None:
    assert plan_stats(_data({}, ["timebill"])) is None
    refused = {"key": run_key("timebill", "t0", 5.0), "task_id": "t0", "stop_reason": STOP_REFUSED}
    stats = plan_stats(_data({"timebill": _by_key(refused)}, ["timebill"]))
    assert stats is not None and (stats.planned, stats.refused) == (0, 1)
    assert math.isnan(stats.prefill_ratio[0]) and math.isnan(stats.n_hat_over_n_max)


def test_decode_paths_come_from_the_records_not_only_from_the_engines_loaded_now() -> None:
    a, b = TASKS
    records = {
        "vanilla": _by_key(_trace(a, "vanilla", 0.1, 3, decode_path="fast-fp32")),
        # a run resumed on an install whose fast path was off: both paths are named, not the last one
        "snapkv-0.5": _by_key(
            _trace(a, "snapkv-0.5", 0.1, 3, decode_path="fast-fp32"), _trace(b, "snapkv-0.5", 0.1, 3, decode_path="hf")
        ),
        "int8": _by_key(_trace(a, "int8", 0.05, 3, decode_path="fast-int8")),
    }
    data = _data(records, ["vanilla", "snapkv-0.5", "int8", "int4"])
    data.meta["decode_paths"] = {"fp32": "fast-fp32", "int4": "fast-int4"}  # a rebuild loaded no int8 engine
    assert decode_paths(data) == {"fp32": "fast-fp32 + hf", "int8": "fast-int8", "int4": "fast-int4"}


def test_the_ratio_interval_is_paired_by_task() -> None:
    # Tasks of very different difficulty, and a method exactly 1.5x the other on each: resampling
    # tasks in pairs gives no spread at all (an unpaired bootstrap would be wide).
    b = [(f"t{i}", 0.05 if i % 2 else 0.6) for i in range(20)]
    a = [(t, 1.5 * x) for t, x in b]
    assert paired_ratio_interval(a, b) == pytest.approx((1.5, 1.5))
    assert paired_ratio_interval(b, b) == pytest.approx((1.0, 1.0))
    # a task only one side scored does not count (a huge score there would move the ratio)
    assert paired_ratio_interval([*a, ("extra", 100.0)], b) == pytest.approx((1.5, 1.5))


def test_the_ratio_interval_covers_the_observed_ratio_and_is_reproducible() -> None:
    b = [(f"t{i}", s) for i, s in enumerate([0, 1, 0.5, 0, 1, 0.2, 0.8, 0, 1, 0.4])]
    a = [(f"t{i}", s) for i, s in enumerate([1, 0, 0.5, 0, 1, 0, 0.8, 0.3, 1, 0])]
    observed = sum(x for _, x in a) / sum(y for _, y in b)
    lo, hi = paired_ratio_interval(a, b)
    assert lo < observed < hi and hi - lo > 0.2  # disagreeing tasks: a real spread
    wide = paired_ratio_interval(a, b, level=0.99)
    assert wide[0] <= lo and wide[1] >= hi
    assert paired_ratio_interval(a, b) == (lo, hi)  # seeded


def test_the_ratio_interval_is_none_without_enough_to_resample() -> None:
    assert paired_ratio_interval([("t0", 1.0)], [("t0", 1.0)]) is None
    assert paired_ratio_interval([("t0", 1.0), ("t1", 1.0)], [("u0", 1.0), ("u1", 1.0)]) is None  # nothing pairs
    assert paired_ratio_interval([("t0", 0.0), ("t1", 0.0)], [("t0", 0.0), ("t1", 0.0)]) is None  # 0 / 0


def test_a_reference_that_scored_on_one_task_only_gives_an_open_upper_end_printed_as_infinity() -> None:
    # The reference scored on 1 task of 4, so a resample draws none of it with chance (3/4)^4 ≈ 0.32 (a
    # quarter of the kept resamples, once the all-zero ones are dropped), far above the 5 % tail: the
    # upper end is infinite, and the report prints it as ∞, not "inf".
    b = [("t0", 1.0), ("t1", 0.0), ("t2", 0.0), ("t3", 0.0)]
    a = [("t0", 0.5), ("t1", 1.0), ("t2", 0.0), ("t3", 0.0)]
    lo, hi = paired_ratio_interval(a, b)
    assert math.isinf(hi) and math.isfinite(lo)
    assert _ratio_text(hi) == "∞" and _ratio_text(lo) == f"{lo:.2f}"


def _budgeted(task: Task, budget: float, stop: str, e2e: float, alpha: float | None = None) -> dict:
    rec = {
        "key": run_key("timebill", task.id, budget),
        "task_id": task.id,
        "budget_s": budget,
        "stop_reason": stop,
        "e2e_s": e2e,
        "token_times_s": [] if stop == STOP_REFUSED else [e2e],
    }
    return rec if alpha is None else {**rec, "alpha": alpha}


def test_outcomes_by_kind_judge_vanilla_at_each_runs_own_budget_and_count_rescues_refusals_and_stops() -> None:
    chat = Task("c", "chat", "rouge", "p", ("r",), 8)
    code = Task("k", "code", "edit_sim", "p", ("r",), 8)
    vanilla = {  # chat ends at 6 s, code at 3 s
        "vanilla": _by_key({**_trace(chat, "vanilla", 0.5, 9, start=2.0), "e2e_s": 6.0, "stop_reason": "max_tokens"}),
    }
    vanilla["vanilla"].update(_by_key({**_trace(code, "vanilla", 0.1, 3, start=2.8), "e2e_s": 3.0}))
    runs = [
        _budgeted(chat, 4.0, STOP_REFUSED, 0.01),  # vanilla late at 4 s too
        _budgeted(chat, 5.0, "max_tokens", 4.9, alpha=0.95),  # rescued: vanilla needs 6 s
        _budgeted(chat, 7.0, "max_tokens", 6.0, alpha=0.0),  # both in time
        _budgeted(code, 2.5, "deadline", 2.5, alpha=0.95),  # both late
        _budgeted(code, 3.5, "eos", 3.6, alpha=0.5),  # ended by itself but after T: not in time
    ]
    records = {**vanilla, "timebill": _by_key(*runs)}
    suite = Suite({}, (chat, code), "0" * 64, "kinds.jsonl")
    registry = method_registry()
    data = BenchData(suite, [chat, code], [], "", [registry["vanilla"], registry["timebill"]], [], records)
    rows = {o.kind: o for o in timebill_outcomes_by_kind(data)}
    c, k = rows["chat"], rows["code"]
    assert (c.jobs, c.vanilla_in_time, c.in_time, c.rescued, c.refused, c.guard_stopped) == (3, 1, 2, 1, 1, 0)
    assert (c.alpha_zero, c.alpha_top) == (1, 1)  # the refused job is in neither
    assert (k.jobs, k.vanilla_in_time, k.in_time, k.rescued, k.refused, k.guard_stopped) == (2, 1, 0, 0, 0, 1)
    assert (k.alpha_zero, k.alpha_top) == (0, 1)  # α = 0.5 is neither 0 nor the cap


def test_scores_by_kind_average_only_that_kinds_jobs_per_column() -> None:
    registry = method_registry()
    cols = [Column(0, "p20", 20.0), Column(1, "p50", 50.0)]
    kill = {
        ("timebill", 0): [("a", 1.0), ("b", 0.0), ("c", 0.5)],
        ("timebill", 1): [("a", 1.0), ("b", 1.0), ("c", 0.0)],
        # vanilla has no runs at p50 yet: a dash, not a 0
        ("vanilla", 0): [("a", 0.0), ("b", 0.0), ("c", 0.25)],
    }
    ev = Evaluation({}, {}, [], cols, kill_jobs=kill)
    md = _by_kind_scores([registry["vanilla"], registry["timebill"]], ev, {"a": "chat", "b": "chat", "c": "code"})
    text = "\n".join(md)
    assert "**chat** (2 tasks)" in text and "**code** (1 task)" in text
    chat_rows = md[md.index("**chat** (2 tasks), average score ×100 under Kill:") :]
    assert "| vanilla | 0.0 | – |" in chat_rows[4] and "| timebill | 50.0 | 100.0 |" in chat_rows[5]
    code_rows = md[md.index("**code** (1 task), average score ×100 under Kill:") :]
    assert "| vanilla | 25.0 | – |" in code_rows[4] and "| timebill | 50.0 | 0.0 |" in code_rows[5]


def test_completion_gap_sorts_the_jobs_only_alpha_095_completed_by_how_timebill_ended() -> None:
    tasks = [Task(f"g{i}", "code", "edit_sim", "p", ("r",), 8) for i in range(6)]
    # α = 0.95's trace ends at 3 s on every task: in time at T = 4 s, late at T = 2.5 s
    ref = _by_key(*({**_trace(t, "snapkv-0.95", 0.1, 8, start=2.3), "e2e_s": 3.0} for t in tasks))
    runs = [
        _budgeted(tasks[0], 4.0, STOP_REFUSED, 0.01),  # refused where the trace made it
        _budgeted(tasks[1], 4.0, "deadline", 4.0, alpha=0.95),  # stopped at the cap
        _budgeted(tasks[2], 4.0, "deadline", 4.0, alpha=0.3),  # stopped below the cap
        _budgeted(tasks[3], 4.0, "eos", 4.2, alpha=0.0),  # ended by itself, after T: other
        _budgeted(tasks[4], 4.0, "eos", 3.5, alpha=0.0),  # both in time: no gap
        _budgeted(tasks[5], 2.5, "eos", 2.4, alpha=0.0),  # TimeBill in time, the trace late: the reverse
    ]
    suite = Suite({}, tuple(tasks), "0" * 64, "gap.jsonl")
    registry = method_registry()
    records = {"snapkv-0.95": ref, "timebill": _by_key(*runs)}
    data = BenchData(suite, tasks, [], "", [registry["snapkv-0.95"], registry["timebill"]], [], records)
    g = completion_gap(data)
    assert g is not None
    assert (g.jobs, g.reference_only, g.method_only) == (6, 4, 1)
    assert (g.refused, g.stopped_at_cap, g.stopped_below_cap, g.other) == (1, 1, 1, 1)
    assert completion_gap(BenchData(suite, tasks, [], "", [], [], {"timebill": _by_key(*runs)})) is None
