"""Tests for the planner's maths (method §3–§4): pure Python, no model, no GPU, a second or two."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from functools import lru_cache

import pytest

from timebill.errors import InvalidInputError
from timebill.planner import (
    Plan,
    TimeCoefficients,
    decode_phase_s,
    e2e_s,
    kept_kv_tokens,
    least_time_s,
    plan,
    replan_alpha,
    solve_alpha,
    solve_alpha_bruteforce,
    wcet_s,
    worst_case_length,
)

ALPHA_MAX = 0.95
GRID_STEPS = 4001  # brute-force resolution ALPHA_MAX / 4000 ~ 2.4e-4, enough to tell formulas apart
GRID_STEP = ALPHA_MAX / (GRID_STEPS - 1)

# Plausible for a 7B model on one datacenter GPU: 32k-token prefill ~ 10 s, a decode step 20-70 ms.
REALISTIC = TimeCoefficients(a=8e-9, b=6e-5, c=0.03, p=1.2e-6, q=0.025)


def nominal_total_s(coef: TimeCoefficients, n_x: int, alpha: float, n_worst: int, t_predict_s: float) -> float:
    """Independent restatement of the constraint's left side with the nominal (1-alpha)*N_x kept tokens."""
    kv0 = (1.0 - alpha) * n_x
    decode = sum(coef.p * (kv0 + i - 1) + coef.q for i in range(1, n_worst))
    return t_predict_s + coef.a * n_x**2 + coef.b * n_x + coef.c + decode


def log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def random_coefficients(rng: random.Random) -> TimeCoefficients:
    """Coefficients spanning several orders of magnitude, so a dimensionally wrong formula cannot pass.

    p stays far from 1 s/token: at p = 1 the misprinted Eq. 11 happens to coincide with the right one.
    """
    return TimeCoefficients(
        a=log_uniform(rng, 1e-11, 1e-7),
        b=log_uniform(rng, 1e-6, 1e-3),
        c=log_uniform(rng, 1e-3, 0.2),
        p=log_uniform(rng, 1e-8, 1e-4),
        q=log_uniform(rng, 1e-3, 0.1),
    )


Case = tuple[TimeCoefficients, int, int, float, float, str]


@lru_cache(maxsize=1)
def random_cases() -> tuple[Case, ...]:
    """240 random (coef, n_x, n_worst, t_predict, budget, kind); kinds cycle interior/zero/infeasible."""
    rng = random.Random(20251221)
    cases: list[Case] = []
    kinds = ("interior", "zero_fits", "infeasible")
    for index in range(240):
        coef = random_coefficients(rng)
        n_x = int(log_uniform(rng, 1, 32768))
        n_worst = rng.randint(2, 4096)
        t_predict = rng.choice([0.0, rng.uniform(0.0, 0.05)])
        at_zero = nominal_total_s(coef, n_x, 0.0, n_worst, t_predict)
        at_max = nominal_total_s(coef, n_x, ALPHA_MAX, n_worst, t_predict)
        kind = kinds[index % 3]
        if kind == "interior":
            budget = rng.uniform(at_max, at_zero)
        elif kind == "zero_fits":
            budget = at_zero * rng.uniform(1.0001, 3.0)
        else:
            budget = at_max * rng.uniform(0.3, 0.999)
        cases.append((coef, n_x, n_worst, t_predict, budget, kind))
    return tuple(cases)


@lru_cache(maxsize=1)
def bruteforce_answers() -> tuple[float, ...]:
    return tuple(
        solve_alpha_bruteforce(coef, n_x, budget, n_worst, t_predict, ALPHA_MAX, steps=GRID_STEPS)
        for coef, n_x, n_worst, t_predict, budget, _ in random_cases()
    )


def agrees_with_bruteforce(alpha: float, brute: float) -> bool:
    """The true minimum lies in (brute - one grid step, brute]; the closed form must be that minimum."""
    return brute - GRID_STEP - 1e-9 <= alpha <= brute + 1e-9


# --- time model ---------------------------------------------------------------------------------------


def test_prefill_and_step_follow_the_flops_shape() -> None:
    coef = TimeCoefficients(a=2.0, b=3.0, c=5.0, p=7.0, q=11.0)
    assert coef.prefill_s(10) == pytest.approx(2.0 * 100 + 3.0 * 10 + 5.0)
    assert coef.step_s(4.5) == pytest.approx(7.0 * 4.5 + 11.0)


def test_decode_phase_equals_explicit_sum_of_steps() -> None:
    rng = random.Random(7)
    for _ in range(300):
        coef = random_coefficients(rng)
        n_kv0 = rng.choice([0.0, float(rng.randint(1, 40000)), rng.uniform(0.0, 40000.0)])
        n_tokens = rng.randint(0, 3000)
        expected = sum(coef.step_s(n_kv0 + i - 1) for i in range(1, n_tokens))
        assert decode_phase_s(coef, n_kv0, n_tokens) == pytest.approx(expected, rel=1e-10, abs=1e-15)


@pytest.mark.parametrize("n_tokens", [0, 1])
def test_decode_phase_is_zero_when_prefill_produces_the_only_token(n_tokens: int) -> None:
    assert decode_phase_s(REALISTIC, 1000.0, n_tokens) == 0.0


def test_e2e_and_wcet_use_real_kept_tokens_and_worst_case_length() -> None:
    n_x, alpha, min_kept = 1000, 0.9995, 64
    kept = kept_kv_tokens(n_x, alpha, min_kept)
    assert kept == 64
    expected = REALISTIC.prefill_s(n_x) + decode_phase_s(REALISTIC, kept, 300)
    assert e2e_s(REALISTIC, n_x, alpha, 300, min_kept) == pytest.approx(expected)
    # n_hat=60, k=5 -> N_W=300
    assert wcet_s(REALISTIC, n_x, alpha, 60.0, 5.0, 8192, min_kept) == pytest.approx(expected)


def test_coefficients_reject_nan_and_inf() -> None:
    with pytest.raises(InvalidInputError, match="TimeCoefficients.p"):
        TimeCoefficients(a=0.0, b=0.0, c=0.0, p=float("nan"), q=0.0)
    with pytest.raises(InvalidInputError, match="TimeCoefficients.c"):
        TimeCoefficients(a=0.0, b=0.0, c=float("inf"), p=0.0, q=0.0)


# --- kept tokens ----------------------------------------------------------------------------------------


def test_kept_tokens_never_below_kvpress_count_and_at_most_one_above() -> None:
    """kvpress keeps max(1, int(n*(1-alpha))); we keep n - floor(alpha*n): same or one more (safe side)."""
    rng = random.Random(11)
    for _ in range(5000):
        n_x = rng.randint(1, 40000)
        alpha = rng.choice([rng.uniform(0.0, 0.99), rng.randint(0, 99) / 100, rng.randint(0, n_x - 1) / n_x])
        kvpress_kept = max(1, int(n_x * (1 - alpha)))
        ours = kept_kv_tokens(n_x, alpha)
        assert kvpress_kept <= ours <= kvpress_kept + 1
        assert ours >= (1.0 - alpha) * n_x - 1e-9


def test_kept_tokens_exact_values() -> None:
    assert kept_kv_tokens(1000, 0.0) == 1000
    assert kept_kv_tokens(1000, 0.5) == 500
    assert kept_kv_tokens(1000, 0.5005) == 500  # nominal 499.5 rounds up
    assert kept_kv_tokens(1000, 0.95) == 50
    assert kept_kv_tokens(1000, 0.95, min_kept=64) == 64  # the observation window survives
    assert kept_kv_tokens(40, 0.95, min_kept=64) == 40  # a prompt shorter than the window is kept whole
    assert kept_kv_tokens(10, 0.95) == 1


# --- closed form vs brute force ---------------------------------------------------------------------


def test_random_cases_cover_every_regime() -> None:
    outcomes = {"interior": 0, "zero_fits": 0, "infeasible": 0}
    for coef, n_x, n_worst, t_predict, budget, kind in random_cases():
        alpha, feasible = solve_alpha(coef, n_x, budget, n_worst, t_predict, ALPHA_MAX)
        if not feasible:
            outcomes["infeasible"] += 1
            assert kind == "infeasible"
        elif alpha == 0.0:
            outcomes["zero_fits"] += 1
            assert kind == "zero_fits"
        else:
            outcomes["interior"] += 1
            assert kind == "interior"
    assert all(count >= 70 for count in outcomes.values()), outcomes


def test_closed_form_matches_bruteforce_on_random_coefficients() -> None:
    for case, brute in zip(random_cases(), bruteforce_answers(), strict=True):
        coef, n_x, n_worst, t_predict, budget, kind = case
        alpha, feasible = solve_alpha(coef, n_x, budget, n_worst, t_predict, ALPHA_MAX)
        assert agrees_with_bruteforce(alpha, brute), (case, alpha, brute)
        assert feasible == (nominal_total_s(coef, n_x, alpha, n_worst, t_predict) <= budget * (1 + 1e-9))
        if kind == "infeasible":
            assert (alpha, feasible, brute) == (ALPHA_MAX, False, ALPHA_MAX)
        elif kind == "zero_fits":
            assert (alpha, feasible, brute) == (0.0, True, 0.0)
        else:
            # an interior optimum spends exactly the whole budget
            total = nominal_total_s(coef, n_x, alpha, n_worst, t_predict)
            assert total == pytest.approx(budget, rel=1e-9)


def misprinted_eq11(
    coef: TimeCoefficients, n_x: int, budget_s: float, n_worst: int, t_predict_s: float, alpha_max: float
) -> float:
    """The paper's printed Eq. 11: p wrongly divides the middle term (N_W-2)/(2 N_x)."""
    raw = (
        1.0
        - (budget_s - coef.prefill_s(n_x) - t_predict_s) / (coef.p * n_x * (n_worst - 1))
        + (n_worst - 2) / (2.0 * coef.p * n_x)
        + coef.q / (coef.p * n_x)
    )
    return min(max(raw, 0.0), alpha_max)


@pytest.mark.parametrize(
    "wrong_solver",
    [
        pytest.param(misprinted_eq11, id="printed-eq11"),
        pytest.param(
            lambda coef, n_x, budget, n_worst, t_predict, alpha_max: min(
                max(
                    1.0
                    - (budget - coef.prefill_s(n_x) - t_predict) / (coef.p * n_x * (n_worst - 1))
                    + (n_worst - 2) / (2.0 * n_x),
                    0.0,
                ),
                alpha_max,
            ),
            id="missing-q-term",
        ),
    ],
)
def test_bruteforce_check_rejects_wrong_closed_forms(wrong_solver: Callable[..., float]) -> None:
    """Guards the guard: the comparison above would fail for a plausible wrong formula."""
    disagreements = sum(
        not agrees_with_bruteforce(wrong_solver(coef, n_x, budget, n_worst, t_predict, ALPHA_MAX), brute)
        for (coef, n_x, n_worst, t_predict, budget, _), brute in zip(random_cases(), bruteforce_answers(), strict=True)
    )
    assert disagreements >= 30


def test_misprinted_formula_breaks_the_deadline_on_realistic_coefficients() -> None:
    n_x, n_worst, budget = 8000, 1000, 30.0
    alpha, feasible = solve_alpha(REALISTIC, n_x, budget, n_worst)
    assert feasible and 0.0 < alpha < ALPHA_MAX
    wrong = misprinted_eq11(REALISTIC, n_x, budget, n_worst, 0.0, ALPHA_MAX)
    assert abs(wrong - alpha) > 0.1


# --- monotonicity ------------------------------------------------------------------------------------


def test_alpha_is_non_increasing_in_budget() -> None:
    n_x, n_hat = 12000, 200.0
    budgets = [0.5 + 0.05 * i for i in range(1200)]
    alphas = [plan(REALISTIC, n_x, budget, n_hat, n_max=8192).alpha for budget in budgets]
    assert all(later <= earlier + 1e-12 for earlier, later in zip(alphas, alphas[1:], strict=False))
    assert alphas[0] == ALPHA_MAX and alphas[-1] == 0.0
    assert len(set(alphas)) > 100  # the sweep crosses the interior, not only the clipped ends


def test_alpha_is_non_decreasing_in_prompt_length() -> None:
    lengths = sorted({int(1.01**i) for i in range(0, 1046)})  # 1 .. ~32k
    for budget in (3.0, 8.0, 14.0):
        alphas = [plan(REALISTIC, n_x, budget, 20.0, n_max=8192).alpha for n_x in lengths]
        assert all(later >= earlier - 1e-12 for earlier, later in zip(alphas, alphas[1:], strict=False))
        assert alphas[0] == 0.0 and alphas[-1] > 0.5
        assert len(set(alphas)) > 10  # the sweep crosses the interior, not only the clipped ends


def test_alpha_is_non_decreasing_in_predicted_length() -> None:
    n_x, budget = 10000, 10.0
    n_hats = [float(i) for i in range(0, 2000, 3)]
    alphas = [plan(REALISTIC, n_x, budget, n_hat, n_max=8192).alpha for n_hat in n_hats]
    assert all(later >= earlier - 1e-12 for earlier, later in zip(alphas, alphas[1:], strict=False))
    assert alphas[0] == 0.0 and alphas[-1] == ALPHA_MAX


def test_prediction_time_that_is_not_hidden_costs_budget() -> None:
    without = plan(REALISTIC, 10000, 8.0, 40.0, n_max=8192)
    with_predict = plan(REALISTIC, 10000, 8.0, 40.0, n_max=8192, t_predict_s=0.5)
    assert without.feasible and with_predict.feasible
    assert 0.0 < without.alpha < with_predict.alpha < ALPHA_MAX
    assert with_predict.predicted_wcet_s <= 8.0 + 1e-9


# --- worst-case length ----------------------------------------------------------------------------


def test_worst_case_length_scales_prediction_by_k() -> None:
    assert worst_case_length(100.0, 5.0, 8192) == 500
    assert worst_case_length(100.4, 1.0, 8192) == 101  # rounds up: a fraction of a token is a token


def test_worst_case_length_is_capped_at_n_max() -> None:
    assert worst_case_length(2000.0, 5.0, 8192) == 8192
    assert worst_case_length(2000.0, 5.0, 512) == 512


def test_zero_predicted_length_means_one_token_and_no_eviction() -> None:
    assert worst_case_length(0.0, 5.0, 8192) == 1
    fits = plan(REALISTIC, 20000, 10.0, 0.0, n_max=8192)
    assert (fits.n_worst, fits.alpha, fits.feasible, fits.predicted_decode_s) == (1, 0.0, True, 0.0)
    assert fits.predicted_wcet_s == pytest.approx(REALISTIC.prefill_s(20000))
    # prefill alone is over budget: eviction cannot help, so alpha stays 0 and the plan is infeasible
    too_slow = plan(REALISTIC, 20000, 1.0, 0.0, n_max=8192)
    assert (too_slow.alpha, too_slow.feasible) == (0.0, False)


def test_plan_caps_worst_case_and_uses_it() -> None:
    capped = plan(REALISTIC, 5000, 60.0, 5000.0, n_max=1024)
    assert capped.n_worst == 1024
    assert capped.predicted_decode_s == pytest.approx(
        decode_phase_s(REALISTIC, kept_kv_tokens(5000, capped.alpha), 1024)
    )


def test_explicit_worst_case_overrides_k_and_is_capped() -> None:
    conformal = plan(REALISTIC, 5000, 20.0, 100.0, n_max=8192, n_worst=777, bound="conformal")
    assert (conformal.n_worst, conformal.bound) == (777, "conformal")
    assert plan(REALISTIC, 5000, 20.0, 100.0, n_max=512, n_worst=777).n_worst == 512


# --- infeasible budgets ---------------------------------------------------------------------------


def test_infeasible_budget_runs_at_alpha_max_and_reports_needed_budget() -> None:
    n_x, n_hat = 30000, 1000.0
    result = plan(REALISTIC, n_x, 5.0, n_hat, n_max=8192, t_predict_s=0.01)
    assert result.feasible is False
    assert result.alpha == ALPHA_MAX
    expected = 0.01 + wcet_s(REALISTIC, n_x, ALPHA_MAX, n_hat, 5.0, 8192)
    assert result.earliest_feasible_budget_s == pytest.approx(expected)
    assert result.predicted_wcet_s == pytest.approx(expected)
    assert result.earliest_feasible_budget_s > 5.0
    # the reported budget is enough: asking for it gives a feasible plan
    retry = plan(REALISTIC, n_x, result.earliest_feasible_budget_s, n_hat, n_max=8192, t_predict_s=0.01)
    assert retry.feasible


def test_infeasible_flag_matches_wcet_at_alpha_max_on_random_cases() -> None:
    for coef, n_x, n_worst, t_predict, budget, _ in random_cases():
        result = plan(coef, n_x, budget, 1.0, n_max=8192, n_worst=n_worst, t_predict_s=t_predict)
        at_max = t_predict + e2e_s(coef, n_x, ALPHA_MAX, n_worst)
        assert result.earliest_feasible_budget_s == pytest.approx(at_max, rel=1e-12)
        assert result.feasible == (at_max <= budget * (1 + 1e-12))
        if not result.feasible:
            assert result.alpha == ALPHA_MAX


# SmolLM2-135M on this CPU, roughly: a decode step ~26 ms, almost all of it weights (q).
SMALL_CPU = TimeCoefficients(a=2e-8, b=4e-4, c=0.02, p=6e-6, q=0.026)


def test_infeasible_short_prompt_keeps_the_prompt_when_eviction_buys_nothing() -> None:
    """A 39-token prompt and a 5 s budget that 1024 worst-case tokens cannot meet: α_max saves <1 % of a step."""
    paper = plan(SMALL_CPU, 39, 5.0, 1024.0, n_max=1024, infeasible_slack=0.0)
    ours = plan(SMALL_CPU, 39, 5.0, 1024.0, n_max=1024, infeasible_slack=0.02)
    assert not paper.feasible and paper.alpha == ALPHA_MAX
    assert not ours.feasible and ours.alpha == 0.0
    assert ours.predicted_wcet_s <= paper.predicted_wcet_s * 1.02
    assert ours.earliest_feasible_budget_s == paper.earliest_feasible_budget_s


def test_infeasible_long_prompt_takes_the_smallest_alpha_within_the_slack() -> None:
    """Where eviction does buy time, the rule stops at the knee, not at α = 0 and not at α_max."""
    n_x, n_hat, budget, slack = 30000, 1000.0, 5.0, 0.02
    result = plan(REALISTIC, n_x, budget, n_hat, n_max=8192, infeasible_slack=slack)
    at_max = plan(REALISTIC, n_x, budget, n_hat, n_max=8192, infeasible_slack=0.0)
    assert not result.feasible and 0.0 < result.alpha < ALPHA_MAX
    n_worst = worst_case_length(n_hat, 5.0, 8192)
    target = at_max.predicted_wcet_s * (1 + slack)
    assert e2e_s(REALISTIC, n_x, result.alpha, n_worst) <= target
    assert e2e_s(REALISTIC, n_x, result.alpha - 1e-3, n_worst) > target  # minimal, up to rounding
    assert result.earliest_feasible_budget_s == pytest.approx(at_max.earliest_feasible_budget_s)


def test_slack_never_changes_a_feasible_plan_and_must_be_non_negative() -> None:
    for coef, n_x, n_worst, t_predict, budget, _ in random_cases():
        kwargs = {"n_max": 8192, "n_worst": n_worst, "t_predict_s": t_predict}
        paper = plan(coef, n_x, budget, 1.0, infeasible_slack=0.0, **kwargs)
        ours = plan(coef, n_x, budget, 1.0, infeasible_slack=0.05, **kwargs)
        assert ours.feasible == paper.feasible
        if paper.feasible:
            assert ours == paper
        else:
            assert ours.alpha <= paper.alpha
    with pytest.raises(InvalidInputError, match="infeasible_slack"):
        plan(REALISTIC, 100, 1.0, 10.0, n_max=64, infeasible_slack=-0.1)


def test_no_benefit_from_eviction_when_step_time_is_flat() -> None:
    flat = TimeCoefficients(a=0.0, b=1e-5, c=0.01, p=0.0, q=0.02)
    assert solve_alpha(flat, 1000, 10.0, 100) == (0.0, True)
    assert solve_alpha(flat, 1000, 1.0, 100) == (ALPHA_MAX, False)


# --- real kept tokens (rounding, observation window) ---------------------------------------------


def test_plan_fits_with_real_kept_tokens_on_random_cases() -> None:
    rng = random.Random(99)
    bumped = 0
    for index, (coef, n_x, n_worst, t_predict, budget, _) in enumerate(random_cases()):
        min_kept = (0, 32, 64, 512)[index % 4]
        result = plan(coef, n_x, budget, 1.0, n_max=8192, n_worst=n_worst, t_predict_s=t_predict, min_kept=min_kept)
        closed, _ = solve_alpha(coef, n_x, budget, n_worst, t_predict, ALPHA_MAX)
        real_total = t_predict + e2e_s(coef, n_x, result.alpha, n_worst, min_kept)
        assert result.predicted_wcet_s == pytest.approx(real_total, rel=1e-12)
        assert result.alpha >= closed
        if result.feasible:
            assert real_total <= budget * (1 + 1e-12)
            if result.alpha > closed:
                bumped += 1
                # minimal: a slightly smaller alpha keeps one more token and overruns
                smaller = max(closed, result.alpha - 1e-9 * rng.uniform(1.0, 2.0))
                assert t_predict + e2e_s(coef, n_x, smaller, n_worst, min_kept) > budget
        else:
            assert result.alpha == ALPHA_MAX
    assert bumped >= 10


def test_rounding_up_kept_tokens_raises_alpha_just_enough() -> None:
    """Nominal kept 4999.5 tokens fit exactly; the press keeps 5000, so alpha must rise to keep 4999."""
    n_x, n_worst = 10000, 2001
    coef = TimeCoefficients(a=0.0, b=0.0, c=0.0, p=1e-6, q=0.0)
    budget = nominal_total_s(coef, n_x, 0.50005, n_worst, 0.0)
    closed, feasible = solve_alpha(coef, n_x, budget, n_worst)
    assert feasible and closed == pytest.approx(0.50005, abs=1e-12)
    result = plan(coef, n_x, budget, 1.0, n_max=8192, n_worst=n_worst)
    assert result.feasible
    assert kept_kv_tokens(n_x, result.alpha) == 4999
    assert result.alpha == pytest.approx(0.5001, abs=1e-12)


def test_observation_window_can_make_budget_infeasible() -> None:
    """Nominally 2% of a 2000-token prompt (40 tokens) would fit, but the 64-token window stays."""
    n_x, n_worst = 2000, 4001
    coef = TimeCoefficients(a=0.0, b=0.0, c=0.0, p=1e-6, q=0.0)
    budget = nominal_total_s(coef, n_x, 0.98, n_worst, 0.0)
    assert solve_alpha(coef, n_x, budget, n_worst, alpha_max=0.99) == pytest.approx((0.98, True))
    without_window = plan(coef, n_x, budget, 1.0, n_max=8192, n_worst=n_worst, alpha_max=0.99)
    assert without_window.feasible
    with_window = plan(coef, n_x, budget, 1.0, n_max=8192, n_worst=n_worst, alpha_max=0.99, min_kept=64)
    assert (with_window.feasible, with_window.alpha) == (False, 0.99)
    assert with_window.earliest_feasible_budget_s == pytest.approx(decode_phase_s(coef, 64, n_worst))


# --- validation and output ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"budget_s": 0.0}, "budget_s"),
        ({"budget_s": -1.0}, "budget_s"),
        ({"budget_s": float("nan")}, "budget_s"),
        ({"budget_s": float("inf")}, "budget_s"),
        ({"k": 0.5}, "k"),
        ({"k": float("nan")}, "k"),
        ({"alpha_max": 0.0}, "alpha_max"),
        ({"alpha_max": 1.0}, "alpha_max"),
        ({"alpha_max": 1.5}, "alpha_max"),
        ({"alpha_max": -0.1}, "alpha_max"),
        ({"n_x": 0}, "n_x"),
        ({"n_x": -5}, "n_x"),
        ({"n_x": 10.5}, "n_x"),
        ({"n_max": 0}, "n_max"),
        ({"n_hat": -1.0}, "n_hat"),
        ({"n_hat": float("nan")}, "n_hat"),
        ({"n_hat": float("inf")}, "n_hat"),
        ({"t_predict_s": -0.1}, "t_predict_s"),
        ({"min_kept": -1}, "min_kept"),
        ({"n_worst": 0}, "n_worst"),
        ({"bound": ""}, "bound"),
    ],
)
def test_plan_rejects_bad_inputs_with_named_argument(overrides: dict[str, object], message: str) -> None:
    kwargs: dict[str, object] = {"n_x": 1000, "budget_s": 5.0, "n_hat": 100.0, "n_max": 8192}
    kwargs.update(overrides)
    with pytest.raises(InvalidInputError, match=message):
        plan(REALISTIC, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "call",
    [
        lambda: solve_alpha(REALISTIC, 0, 5.0, 100),
        lambda: solve_alpha(REALISTIC, 1000, float("nan"), 100),
        lambda: solve_alpha(REALISTIC, 1000, 5.0, 100, alpha_max=1.0),
        lambda: worst_case_length(10.0, 0.99, 100),
        lambda: worst_case_length(-1.0, 5.0, 100),
        lambda: kept_kv_tokens(0, 0.5),
        lambda: kept_kv_tokens(100, 1.5),
        lambda: decode_phase_s(REALISTIC, -1.0, 10),
    ],
)
def test_helpers_reject_bad_inputs(call: Callable[[], object]) -> None:
    with pytest.raises(InvalidInputError):
        call()


def test_plan_to_dict_is_plain_data() -> None:
    result = plan(REALISTIC, 8000, 8.0, 120.0, n_max=8192, t_predict_s=0.002)
    data = result.to_dict()
    assert set(data) == {
        "alpha",
        "n_hat",
        "n_worst",
        "bound",
        "predicted_prefill_s",
        "predicted_decode_s",
        "predicted_wcet_s",
        "t_predict_s",
        "feasible",
        "earliest_feasible_budget_s",
        "expected_e2e_s",
        "spent_s",
        "overhead_s",
    }
    assert json.loads(json.dumps(data)) == data
    assert Plan.from_dict(data) == result
    assert data["predicted_wcet_s"] == pytest.approx(
        data["t_predict_s"] + data["predicted_prefill_s"] + data["predicted_decode_s"]
    )


# --- planning after prefill, the least time, re-planning ---------------------------------------------


def test_spent_time_replaces_the_predicted_prefill_and_prediction_on_random_cases() -> None:
    """After prefill the budget's spent part is measured: the plan must equal one whose prefill model *is*
    that measurement (the arithmetic the facade used to fake with a=b=0, c=spent)."""
    rng = random.Random(7)
    for coef, n_x, n_worst, t_predict, budget, _ in random_cases()[:90]:
        spent = rng.uniform(0.0, budget)
        overhead = rng.uniform(0.0, 0.01)
        faked = TimeCoefficients(a=0.0, b=0.0, c=spent + overhead, p=coef.p, q=coef.q)
        ours = plan(
            coef,
            n_x,
            budget,
            10.0,
            n_max=n_worst,
            n_worst=n_worst,
            t_predict_s=t_predict,
            spent_s=spent,
            overhead_s=overhead,
        )
        old = plan(faked, n_x, budget, 10.0, n_max=n_worst, n_worst=n_worst)
        assert ours.alpha == pytest.approx(old.alpha, abs=1e-9)
        assert ours.feasible == old.feasible
        assert ours.predicted_wcet_s == pytest.approx(old.predicted_wcet_s, rel=1e-12)
        assert ours.predicted_prefill_s == coef.prefill_s(n_x)  # the model's, reported; not what is charged
        assert ours.spent_s == spent and ours.overhead_s == overhead


def test_overhead_is_charged_before_decode_like_a_longer_prefill() -> None:
    coef, n_x, n_worst, t_predict, budget, _ = random_cases()[0]
    shifted = TimeCoefficients(a=coef.a, b=coef.b, c=coef.c + 0.004, p=coef.p, q=coef.q)
    ours = plan(coef, n_x, budget, 10.0, n_max=n_worst, n_worst=n_worst, t_predict_s=t_predict, overhead_s=0.004)
    folded = plan(shifted, n_x, budget, 10.0, n_max=n_worst, n_worst=n_worst, t_predict_s=t_predict)
    assert ours.alpha == pytest.approx(folded.alpha, abs=1e-9)
    assert ours.predicted_wcet_s == pytest.approx(folded.predicted_wcet_s, rel=1e-12)


def test_least_time_is_the_plans_earliest_feasible_budget() -> None:
    for coef, n_x, n_worst, t_predict, budget, _ in random_cases()[:60]:
        for spent in (None, budget / 3):
            kwargs = {"t_predict_s": t_predict, "spent_s": spent, "overhead_s": 0.002, "min_kept": 32}
            full = plan(coef, n_x, budget, 1.0, n_max=n_worst, n_worst=n_worst, **kwargs)
            assert least_time_s(coef, n_x, n_worst, **kwargs) == full.earliest_feasible_budget_s


def test_expected_time_is_at_the_predicted_length_and_capped_by_the_budget() -> None:
    roomy = plan(REALISTIC, 4000, 1e3, 20.0, n_max=512)
    assert roomy.expected_e2e_s == pytest.approx(roomy.predicted_prefill_s + decode_phase_s(REALISTIC, 4000, 20))
    assert roomy.expected_e2e_s < roomy.predicted_wcet_s
    hopeless = plan(REALISTIC, 4000, 0.5, 20.0, n_max=512)
    assert not hopeless.feasible and hopeless.expected_e2e_s == 0.5


def remaining_time_s(coef: TimeCoefficients, pace: float, prompt_kv: float, generated: int, r: int) -> float:
    """Independent restatement: r more steps, step j attends over prompt_kv + generated + j tokens."""
    return sum(pace * (coef.p * (prompt_kv + generated + j) + coef.q) for j in range(r))


REPLAN = {"pace": 1.5, "remaining_tokens": 60, "kv_len": 3040, "prompt_kv_len": 3000, "alpha": 0.0}


def test_replan_does_nothing_when_on_time() -> None:
    needed = remaining_time_s(REALISTIC, 1.5, 3000, 40, 60)
    assert replan_alpha(REALISTIC, remaining_s=needed * 1.01, needed_s=needed, **REPLAN) is None


def test_replan_evicts_just_enough_to_meet_the_remaining_time() -> None:
    needed = remaining_time_s(REALISTIC, 1.5, 3000, 40, 60)
    at_max = remaining_time_s(REALISTIC, 1.5, 3000 * 0.05, 40, 60)
    remaining = (needed + at_max) / 2
    extra = replan_alpha(REALISTIC, remaining_s=remaining, needed_s=needed, **REPLAN)
    assert extra is not None and 0.0 < extra < 0.95
    kept = 3000 * (1 - extra)
    assert remaining_time_s(REALISTIC, 1.5, kept, 40, 60) == pytest.approx(remaining, rel=1e-9)  # exactly fits
    assert remaining_time_s(REALISTIC, 1.5, kept + 1, 40, 60) > remaining  # a token less eviction would not


def test_replan_never_passes_alpha_max_and_honours_the_slack_rule() -> None:
    needed = remaining_time_s(REALISTIC, 1.5, 3000, 40, 60)
    hopeless = remaining_time_s(REALISTIC, 1.5, 0, 40, 60) / 2
    state = {**REPLAN, "alpha": 0.5}
    extra = replan_alpha(REALISTIC, remaining_s=hopeless, needed_s=needed, alpha_max=0.95, **state)
    assert 1 - (1 - 0.5) * (1 - extra) == pytest.approx(0.95)  # the total ratio stops at alpha_max
    # With the slack rule, a step dominated by its constant q buys nothing from eviction: keep the prompt.
    flat = TimeCoefficients(a=0.0, b=0.0, c=0.0, p=1e-9, q=0.02)
    needed_flat = remaining_time_s(flat, 1.5, 3000, 40, 60)
    assert (
        replan_alpha(flat, remaining_s=needed_flat / 2, needed_s=needed_flat, infeasible_slack=0.02, **REPLAN) is None
    )
    assert replan_alpha(flat, remaining_s=needed_flat / 2, needed_s=needed_flat, **REPLAN) == pytest.approx(0.95)
    # Already at alpha_max, or an eviction worth less than one token: nothing to do.
    assert replan_alpha(REALISTIC, remaining_s=hopeless, needed_s=needed, **{**REPLAN, "alpha": 0.95}) is None
    tiny = remaining_time_s(REALISTIC, 1.5, 2999.5, 40, 60)
    assert replan_alpha(REALISTIC, remaining_s=tiny, needed_s=needed, **REPLAN) is None
