"""TimeBill's request path on the real model: plan, feasibility, the deadline, re-planning, bad input."""

from __future__ import annotations

import time

import pytest

from length_predictors import ConstantPredictor
from timebill.errors import InfeasibleBudgetError, InvalidInputError
from timebill.facade import TimeBill, parse_budget

PROMPT = "Summarise this: " + "The robot arm picks a part, checks it and places it on the conveyor belt. " * 20


@pytest.fixture
def timebill(engine, estimator) -> TimeBill:
    estimator.reset_recalibration()
    return TimeBill(engine, estimator, ConstantPredictor(24), arrangement="sequential")


def test_budget_parsing() -> None:
    assert parse_budget("4.5") == 4.5
    assert parse_budget("4500ms") == 4.5
    assert parse_budget("2s") == 2.0
    assert parse_budget(0.25) == 0.25
    for bad in ("", "fast", "-1", "0", "nan", "1.5 h", float("nan"), float("inf"), -2.0, 0.0):
        with pytest.raises(InvalidInputError):
            parse_budget(bad)


def test_generate_meets_a_roomy_budget_and_reports_the_plan(timebill: TimeBill) -> None:
    result = timebill.generate(PROMPT, time_budget=20.0, max_new_tokens=32)
    plan = result.plan
    assert plan.n_x == result.generation.prompt_tokens
    assert plan.n_worst == min(24 * 5, 32)  # k = 5, capped by N_max = max_new_tokens
    assert plan.feasible and plan.alpha == 0.0  # plenty of time: no eviction
    assert result.deadline_met and result.measured_e2e_s <= 20.0
    d = result.to_record()
    for key in ("n_hat", "n_worst", "alpha_star", "predicted_wcet_s", "measured_e2e_s", "t_predict_s", "feasible"):
        assert key in d


def test_tight_budget_evicts_and_still_meets_the_deadline(timebill: TimeBill, estimator) -> None:
    long_prompt = PROMPT * 4  # ~1.5k tokens: enough KV that α moves the decode time
    n_x = len(timebill.engine.encode(long_prompt))
    # A budget whose predicted worst case fits at α ≈ 0.45: the plan must evict, with margin to both ends.
    budget = estimator.wcet_s(n_x, 0.45, 24, k=5, n_max=128) + estimator.evict_s(n_x, 0.5)
    plan = timebill.plan(long_prompt, time_budget=budget, max_new_tokens=128)
    assert plan.feasible and 0.0 < plan.alpha < 0.95
    # The real request re-plans on its *measured* prefill, and the profile above is one sample per size, so
    # that prefill can come in well under the prediction (a CI run saw > 30 %), leaving room for α = 0.
    # Taking 30 % of the predicted prefill off the budget keeps eviction necessary unless the prefill runs
    # far faster than that (~60 % with the failing run's numbers). Whatever the machine does, the request
    # evicts and is never silently late: it meets the budget, or the guard stopped it (a prefill slower
    # than the budget itself).
    tight = budget - 0.3 * plan.predicted_prefill_s
    result = timebill.generate(long_prompt, time_budget=tight, max_new_tokens=128, replan=False)
    assert result.plan.alpha > 0.0
    assert result.generation.kept_kv_tokens < n_x
    assert result.deadline_met or result.stop_reason == "deadline"
    if result.generation.tokens_generated:
        assert result.measured_e2e_s <= tight * 1.05  # the guard stops before the token that would be late


def test_infeasible_budget_is_refused_before_any_work(timebill: TimeBill, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(timebill.engine, "prefill", lambda *a, **k: calls.append(1))
    t0 = time.perf_counter()
    with pytest.raises(InfeasibleBudgetError, match="prefill") as info:
        timebill.generate(PROMPT, time_budget="1ms")
    assert calls == []
    assert info.value.earliest_feasible_s and info.value.earliest_feasible_s > 0.001
    assert time.perf_counter() - t0 < 1.0


def test_an_infeasible_short_prompt_is_not_gutted_for_nothing(engine, estimator) -> None:
    """No α fits (a 1024-token worst case in 3 s): by default keep the prompt, since α_max buys ~nothing."""
    estimator.reset_recalibration()
    tb = TimeBill(engine, estimator, ConstantPredictor(1024), arrangement="sequential")
    budget = estimator.prefill_s(40) + 20 * estimator.step_s(40)  # prefill fits, 1024 steps do not
    ours = tb.plan("Explain KV caches in one paragraph.", time_budget=budget, max_new_tokens=1024)
    paper = tb.plan("Explain KV caches in one paragraph.", time_budget=budget, max_new_tokens=1024, infeasible_slack=0)
    assert not ours.feasible and not paper.feasible
    assert paper.alpha == 0.95 and ours.alpha < 0.5
    assert ours.predicted_wcet_s <= paper.predicted_wcet_s * 1.02 + 1e-9


def test_dry_run_plan_does_not_generate(timebill: TimeBill) -> None:
    # Room for the worst case at α = 0 on this machine today, twice over: a fixed "5 s" was below the
    # predicted prefill alone on a host with one of its two cores busy, and planning refused it.
    n_x = len(timebill.engine.encode(PROMPT))
    roomy = 2.0 * timebill.estimator.wcet_s(n_x, 0.0, 24, k=5, n_max=64)
    plan = timebill.plan(PROMPT, time_budget=roomy, max_new_tokens=64)
    assert plan.n_worst == min(24 * 5, 64) and 0.0 <= plan.alpha <= 0.95
    assert timebill.predictor.calls == 1


def test_replanning_evicts_more_when_steps_slow_down(timebill: TimeBill) -> None:
    """Inject a deterministic slowdown (each step sleeps): re-planning must shrink the KV mid-decode.

    Under the paper's rule (``infeasible_slack=0``): a 3x slowdown cannot be absorbed by eviction, and
    whether our default rule evicts anyway depends on how much of a step this host spends per cached
    token (on the family-26 EPYC a 300-token prompt is ~3 % of a step, so it rightly keeps the prompt;
    the next test covers that rule). The mechanism under test here is the mid-decode eviction itself.
    """
    engine = timebill.engine
    n_x = len(engine.encode(PROMPT))
    stop_ids = engine.stop_ids
    engine.stop_ids = set()  # a fixed number of tokens, so the test does not depend on where EOS falls
    try:
        # The budget comes from a measured run at this moment's machine speed, with 25 % slack.
        free = timebill.generate(PROMPT, time_budget=60.0, max_new_tokens=48, replan=False)
        step = sorted(free.generation.step_times_s)[len(free.generation.step_times_s) // 2]
        budget = free.measured_e2e_s * 1.25

        def slow(i: int) -> None:
            if i >= 4:
                time.sleep(step * 2.0)

        result = timebill.generate(
            PROMPT, time_budget=budget, max_new_tokens=48, step_hook=slow, replan=True, infeasible_slack=0
        )
    finally:
        engine.stop_ids = stop_ids
    assert result.replans, "a 3x slowdown must trigger re-planning"
    assert result.generation.kept_kv_tokens < n_x
    assert result.alpha > result.plan.alpha
    first = result.replans[0]
    assert first.prompt_kv_after < first.prompt_kv_before
    assert result.measured_e2e_s <= budget * 1.05


def test_replanning_does_not_gut_a_short_prompt_for_nothing(timebill: TimeBill) -> None:
    """Behind schedule on a 20-token prompt: the paper's rule evicts toward α_max, ours keeps the prompt."""
    engine = timebill.engine
    prompt = "Name a colour."
    n_x = len(engine.encode(prompt))
    stop_ids = engine.stop_ids
    engine.stop_ids = set()
    try:
        free = timebill.generate(prompt, time_budget=60.0, max_new_tokens=32, replan=False)
        step = sorted(free.generation.step_times_s)[len(free.generation.step_times_s) // 2]
        budget = free.measured_e2e_s * 1.5  # room at the start (α = 0), not after a 5x slowdown

        def slow(i: int) -> None:
            if i >= 4:
                time.sleep(step * 4.0)

        kwargs = {"time_budget": budget, "max_new_tokens": 32, "step_hook": slow, "replan": True}
        paper = timebill.generate(prompt, infeasible_slack=0.0, **kwargs)
        ours = timebill.generate(prompt, **kwargs)
    finally:
        engine.stop_ids = stop_ids
    assert paper.plan.alpha == 0.0 and ours.plan.alpha == 0.0
    assert paper.replans and paper.generation.kept_kv_tokens < n_x  # evicted toward α_max mid-decode
    assert not ours.replans and ours.generation.kept_kv_tokens == n_x
    for result in (paper, ours):
        assert result.deadline_met or result.stop_reason == "deadline"


def test_no_replanning_when_on_time(timebill: TimeBill) -> None:
    result = timebill.generate(PROMPT, time_budget=30.0, max_new_tokens=24, replan=True)
    assert result.replans == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"time_budget": 0},
        {"time_budget": -1.0},
        {"time_budget": float("nan")},
        {"time_budget": 5.0, "k": 0.5},
        {"time_budget": 5.0, "alpha_max": 1.0},
        {"time_budget": 5.0, "alpha_max": 0.0},
        {"time_budget": 5.0, "bound": "magic"},
        {"time_budget": 5.0, "max_new_tokens": 0},
        {"time_budget": 5.0, "infeasible_slack": -0.5},
        {"time_budget": 5.0, "infeasible_slack": float("nan")},
    ],
)
def test_bad_inputs_are_clear_errors(timebill: TimeBill, kwargs: dict) -> None:
    with pytest.raises(InvalidInputError):
        timebill.generate(PROMPT, **kwargs)


def test_empty_prompt_is_a_clear_error(timebill: TimeBill) -> None:
    with pytest.raises(InvalidInputError, match="empty"):
        timebill.generate("  ", time_budget=5.0)


def test_parallel_rlp_on_the_shared_backbone_does_not_disturb_the_prefill(engine, estimator):
    """The paper's arrangement: the RLP's forward runs on the same model in a thread beside the
    prefill, whose kvpress hooks must ignore it (they once crashed on its cache-less forward)."""
    from timebill.predictor import DEFAULT_RLP_FILE, load_predictor

    rlp = load_predictor(DEFAULT_RLP_FILE, engine)
    tb = TimeBill(engine, estimator, rlp, arrangement="parallel", replan=False)
    result = tb.generate(PROMPT, 30.0, max_new_tokens=8, alpha_max=0.5)
    assert result.arrangement == "parallel"
    assert result.plan.n_hat == max(rlp.predict(PROMPT).point, 1.0)  # the prediction was not disturbed
    vanilla = engine.generate(PROMPT, alpha=result.alpha, max_new_tokens=8)
    assert result.generation.token_ids == vanilla.token_ids  # nor was the prefill's KV and its eviction


def test_least_time_answers_what_a_plan_at_a_huge_budget_would_and_runs_nothing(timebill: TimeBill) -> None:
    """A server's admission asks "the least time this request needs" directly (it used to plan at 1e6 s)."""
    prediction = ConstantPredictor(24).predict(PROMPT)
    least = timebill.least_time(PROMPT, prediction=prediction, max_new_tokens=64)
    huge = timebill.plan(PROMPT, 1e6, prediction=prediction, max_new_tokens=64)
    assert least.seconds == huge.earliest_feasible_budget_s and least.seconds > least.predicted_prefill_s > 0
    assert (least.n_x, least.n_worst) == (huge.n_x, huge.n_worst)
    assert timebill.predictor.calls == 0


def test_options_object_and_keyword_overrides_plan_alike(timebill: TimeBill) -> None:
    from timebill.options import RequestOptions

    prediction = ConstantPredictor(24).predict(PROMPT)
    by_object = timebill.plan(PROMPT, 1.0, RequestOptions(max_new_tokens=40, k=2), prediction=prediction)
    by_keyword = timebill.plan(PROMPT, 1.0, prediction=prediction, max_new_tokens=40, k=2)
    assert by_object.plan == by_keyword.plan and by_object.n_worst == 40
    with pytest.raises(InvalidInputError, match="unknown request option"):
        timebill.plan(PROMPT, 1.0, prediction=prediction, max_tokens=40)


def test_plan_record_is_flat_json_with_the_documented_keys(timebill: TimeBill) -> None:
    import json

    record = timebill.plan(PROMPT, 5.0, max_new_tokens=32).to_record()
    assert json.loads(json.dumps(record)) == record
    assert list(record) == [
        "n_x", "n_hat", "bound", "n_worst", "alpha", "predicted_prefill_s", "predicted_decode_s",
        "predicted_wcet_s", "t_predict_s", "feasible", "earliest_feasible_budget_s", "budget_s", "expected_e2e_s",
        "original_n_x", "prompt_compression", "compressor", "predicted_compress_s",
    ]  # fmt: skip
