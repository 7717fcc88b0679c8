"""The expected-score planner (timebill.selection): pure maths on hand-built time/length/quality inputs."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from timebill.errors import InvalidInputError
from timebill.selection import (
    Candidate,
    Knobs,
    LengthDistribution,
    TimeError,
    TimeErrorWindow,
    choose,
    evaluate,
    knob_grid,
    predicted_token_s,
    tokens_by,
)


@dataclass(frozen=True)
class LinearTime:
    """first token after ``per_token * n_prompt + c``; a step costs ``q + p * n_kv``."""

    per_token: float = 0.001
    c: float = 0.05
    q: float = 0.02
    p: float = 0.0
    keep: float = 1.0

    def first_token_s(self, n_prompt: int) -> float:
        return self.per_token * n_prompt + self.c

    def step_s(self, n_kv: float) -> float:
        return self.q + self.p * n_kv

    def kept_kv_tokens(self, n_prompt: int) -> int:
        return max(1, round(self.keep * n_prompt))


def brute_tokens(time: LinearTime, n_prompt: int, n_max: int, budget: float, ratio: float, spent: float) -> int:
    t = spent + ratio * time.first_token_s(n_prompt)
    if t > budget:
        return 0
    n, kv = 1, time.kept_kv_tokens(n_prompt)
    while n < n_max:
        t += ratio * time.step_s(kv + n - 1)
        if t > budget:
            break
        n += 1
    return n


def test_tokens_by_matches_a_step_by_step_count() -> None:
    rng = random.Random(3)
    for _ in range(300):
        time = LinearTime(
            per_token=rng.uniform(1e-4, 2e-3),
            c=rng.uniform(0, 0.2),
            q=rng.uniform(0.005, 0.05),
            p=rng.uniform(0, 2e-5),
            keep=rng.choice([1.0, 0.5, 0.05]),
        )
        n_prompt, n_max = rng.randint(10, 4000), rng.choice([1, 32, 64, 512])
        budget, ratio, spent = rng.uniform(0.01, 8.0), rng.uniform(0.8, 1.3), rng.uniform(0, 0.3)
        got = tokens_by(time, n_prompt, n_max, budget, ratio=ratio, spent_s=spent)
        want = brute_tokens(time, n_prompt, n_max, budget, ratio, spent)
        # float summation order may move a token sitting exactly on T; anything else is a bug
        assert abs(got - want) <= 1, (got, want)


def test_kill_takes_the_answer_that_finishes_guard_the_better_partial() -> None:
    length = LengthDistribution.point(100)
    # slow but good: first token at 0.1 s, 0.02 s a step -> 80 tokens by T = 1.68 s
    slow = Candidate(Knobs("fp32"), LinearTime(per_token=0.0, c=0.1, q=0.02), quality=1.0)
    # fast but worse: finishes 100 tokens in ~1.04 s
    fast = Candidate(Knobs("int4"), LinearTime(per_token=0.0, c=0.05, q=0.01), quality=0.5)
    budget = 0.1 + 79 * 0.02 + 1e-9
    assert tokens_by(slow.time, 1000, 100, budget) == 80
    kill = choose([slow, fast], n_prompt=1000, budget_s=budget, length=length, policy="kill")
    guard = choose([slow, fast], n_prompt=1000, budget_s=budget, length=length, policy="guard")
    assert kill.best is not None and kill.best.knobs.weights == "int4"
    assert guard.best is not None and guard.best.knobs.weights == "fp32"
    assert guard.best.expected_score == pytest.approx(0.8)  # partial(f) = f by default
    assert kill.best.expected_score == pytest.approx(0.5)
    # Skip-Next is planned as Kill
    skip = choose([slow, fast], n_prompt=1000, budget_s=budget, length=length, policy="skip-next")
    assert skip.best is not None and skip.best.knobs == kill.best.knobs


def test_partial_curve_changes_the_guard_choice() -> None:
    length = LengthDistribution.point(100)
    slow = Candidate(Knobs("fp32"), LinearTime(per_token=0.0, c=0.1, q=0.02), quality=1.0)
    fast = Candidate(Knobs("int4"), LinearTime(per_token=0.0, c=0.05, q=0.01), quality=0.5)
    budget = 0.1 + 79 * 0.02 + 1e-9
    # an answer whose value is all at its end (code: the completed line) makes a partial worthless
    guard = choose([slow, fast], n_prompt=1000, budget_s=budget, length=length, partial=lambda f: f**8)
    assert guard.best is not None and guard.best.knobs.weights == "int4"


def test_more_budget_never_lowers_the_expected_score() -> None:
    rng = random.Random(11)
    candidates = [
        Candidate(
            k,
            LinearTime(per_token=rng.uniform(2e-4, 1e-3), c=0.05, q=rng.uniform(0.01, 0.04), keep=1 - k.alpha),
            quality=rng.uniform(0.2, 1.0),
        )
        for k in knob_grid(rhos=(0.0,))
    ]
    length = LengthDistribution.from_weights([(16, 0.2), (64, 0.5), (128, 0.3)], n_max=128)
    error = TimeError((0.95, 1.0, 1.1))
    for policy in ("kill", "guard"):
        last = 0.0
        for i in range(1, 120):
            choice = choose(
                candidates, n_prompt=2000, budget_s=0.05 * i, length=length, policy=policy, time_error=error
            )
            score = choice.best.expected_score if choice.best else 0.0
            assert score >= last - 1e-12, (policy, 0.05 * i)
            last = score
        assert last > 0


def test_time_error_makes_an_exact_fit_a_coin_flip() -> None:
    time = LinearTime(per_token=0.0, c=0.1, q=0.01)
    candidate = Candidate(Knobs(), time, quality=1.0)
    budget = 0.1 + 31 * 0.01 + 1e-12  # the median prediction lands exactly on T for 32 tokens
    length = LengthDistribution.point(32)
    sure = evaluate(candidate, n_prompt=10, budget_s=budget, length=length, policy="kill")
    spread = evaluate(
        candidate, n_prompt=10, budget_s=budget, length=length, policy="kill", time_error=TimeError((0.97, 1.03))
    )
    assert sure.p_finish == 1.0
    assert spread.p_finish == pytest.approx(0.5)
    assert spread.expected_score == pytest.approx(0.5)


def test_min_p_finish_is_a_constraint_and_refusal_when_nothing_fits() -> None:
    length = LengthDistribution.from_weights([(10, 0.5), (100, 0.5)], n_max=100)
    good = Candidate(Knobs("fp32"), LinearTime(per_token=0.0, c=0.1, q=0.02), quality=1.0)  # finishes 10 only
    safe = Candidate(Knobs("int4"), LinearTime(per_token=0.0, c=0.05, q=0.005), quality=0.4)  # finishes 100
    budget = 0.6
    free = choose([good, safe], n_prompt=1, budget_s=budget, length=length, policy="kill")
    assert free.best is not None and free.best.knobs.weights == "fp32"  # 0.5 × 1.0 > 1.0 × 0.4
    bound = choose([good, safe], n_prompt=1, budget_s=budget, length=length, policy="kill", min_p_finish=0.9)
    assert bound.best is not None and bound.best.knobs.weights == "int4"
    assert bound.runners_up(1)[0].knobs.weights == "fp32"
    none = choose([good, safe], n_prompt=1, budget_s=0.01, length=length, policy="guard")
    assert none.best is None and len(none.ranked) == 2


def test_length_distribution_from_buckets_clips_to_n_max() -> None:
    dist = LengthDistribution.from_classes([0.25, 0.25, 0.5], [16, 48, 1024], n_max=32)
    assert dist.lengths == (16, 32)
    assert dist.probs == pytest.approx((0.25, 0.75))
    assert dist.cdf(15) == 0.0 and dist.cdf(16) == 0.25 and dist.cdf(32) == pytest.approx(1.0)
    prior = LengthDistribution.from_samples([4, 4, 32, 32], n_max=32)
    assert dist.mix(prior, 0.5).cdf(4) == pytest.approx(0.25)


def test_kaplan_meier_counts_an_answer_cut_at_its_limit_as_longer_not_as_ending() -> None:
    # by hand: at 2 one of 5 ends (S 0.8); 3 is cut (3 left at risk); at 5 two of 3 end (S 0.8/3); 8 is cut
    samples = [(2, False), (3, True), (5, False), (5, False), (8, True)]
    dist = LengthDistribution.from_censored(samples, n_max=10)
    assert dist.lengths == (2, 5, 10)
    assert dist.probs == pytest.approx((0.2, 0.8 * 2 / 3, 0.8 / 3))
    assert dist.cdf(4) == pytest.approx(0.2) and dist.cdf(9) == pytest.approx(0.2 + 0.8 * 2 / 3)
    assert LengthDistribution.from_censored(samples, n_max=4).probs == pytest.approx((0.2, 0.8))  # clipped
    # the shipped suites' chat prior: one answer ended (97 tokens), fifteen were cut at 128 / 256 / 512
    chat = [(97, False)] + [(128, True)] * 5 + [(256, True)] * 4 + [(512, True)] * 6
    assert LengthDistribution.from_censored(chat, n_max=512).cdf(150) == pytest.approx(1 / 16)
    assert LengthDistribution.from_samples([n for n, _ in chat], n_max=512).cdf(150) == pytest.approx(6 / 16)
    # no censoring: the plain empirical distribution; everything cut: the worst case
    plain = [(4, False), (4, False), (9, False), (30, False)]
    assert LengthDistribution.from_censored(plain, 16) == LengthDistribution.from_samples([4, 4, 9, 30], 16)
    assert LengthDistribution.from_censored([(8, True), (64, True)], 32) == LengthDistribution.point(32)
    with pytest.raises(InvalidInputError):
        LengthDistribution.from_censored([], 32)


def test_time_error_quantiles() -> None:
    error = TimeError.from_samples([1.0 + 0.01 * i for i in range(101)], points=5)
    assert error.ratios == pytest.approx((1.1, 1.3, 1.5, 1.7, 1.9))
    assert TimeError.from_samples([]).ratios == (1.0,)


def test_predicted_token_time_is_the_clock_tokens_by_counts_against() -> None:
    time = LinearTime(per_token=0.001, c=0.05, q=0.02, p=1e-5)
    for n in (1, 2, 17, 300):
        t = predicted_token_s(time, 500, n)
        assert tokens_by(time, 500, 1000, t + 1e-9) == n  # exactly n tokens fit in their own predicted time
        assert tokens_by(time, 500, 1000, t - 1e-6) == n - 1
    with pytest.raises(InvalidInputError):
        predicted_token_s(time, 500, 0)


def test_a_hosts_measured_spread_replaces_the_prior_and_follows_the_host() -> None:
    prior = TimeError((0.97, 1.0, 1.03))
    window = TimeErrorWindow(prior, window=8, min_samples=4)
    for _ in range(3):
        window.observe(1.5, 1.0)
    window.observe(float("nan"), 1.0)  # a glitch carries no information
    window.observe(1.0, 0.0)
    assert window.current() is prior and len(window) == 3  # too few runs: the prior
    window.observe(1.5, 1.0)
    assert window.current().ratios == pytest.approx((1.5,) * 4)
    for _ in range(8):  # the host gets quiet again: the window forgets the slow runs
        window.observe(1.0, 1.0)
    assert window.current().ratios == pytest.approx((1.0,) * 8)
    with pytest.raises(InvalidInputError):
        TimeErrorWindow(prior, window=4, min_samples=5)


def test_a_measured_slow_host_makes_kill_choose_the_configuration_that_still_finishes() -> None:
    # the fast configuration's median plan lands at 0.86 T; on a host whose runs take 1.3x their prediction
    # it no longer finishes, and Kill must take the cheaper one that does
    length = LengthDistribution.point(64)
    good = Candidate(Knobs("fp32"), LinearTime(per_token=0.0, c=0.1, q=0.02), quality=1.0)
    cheap = Candidate(Knobs("int4"), LinearTime(per_token=0.0, c=0.05, q=0.01), quality=0.8)
    budget = (0.1 + 63 * 0.02) / 0.86
    prior = TimeError((0.97, 1.0, 1.03))
    quiet = choose([good, cheap], n_prompt=1, budget_s=budget, length=length, policy="kill", time_error=prior)
    assert quiet.best is not None and quiet.best.knobs.weights == "fp32"
    window = TimeErrorWindow(prior, min_samples=4)
    for r in (1.25, 1.3, 1.3, 1.35):
        window.observe(r, 1.0)
    slow = [Candidate(c.knobs, c.time, c.quality, time_error=window.current()) for c in (good, cheap)]
    busy = choose(slow, n_prompt=1, budget_s=budget, length=length, policy="kill", time_error=prior)
    assert busy.best is not None and busy.best.knobs.weights == "int4" and busy.best.p_finish == 1.0
    assert busy.ranked[1].p_finish == 0.0


def test_bad_inputs_are_clear_errors() -> None:
    candidate = Candidate(Knobs(), LinearTime(), quality=1.0)
    length = LengthDistribution.point(8)
    with pytest.raises(InvalidInputError, match="policy"):
        evaluate(candidate, n_prompt=10, budget_s=1.0, length=length, policy="maybe")
    with pytest.raises(InvalidInputError, match="budget_s"):
        evaluate(candidate, n_prompt=10, budget_s=0.0, length=length)
    with pytest.raises(InvalidInputError, match="rho"):
        Knobs(rho=1.0)
    with pytest.raises(InvalidInputError, match="sum to 1"):
        LengthDistribution((1, 2), (0.5, 0.6))
    with pytest.raises(InvalidInputError, match="at least one candidate"):
        choose([], n_prompt=1, budget_s=1.0, length=length)
    assert Knobs("int4", 0.5, 0.75).label == "int4+rho0.5+a0.75"


def test_a_prefill_that_may_overrun_is_not_chosen_while_a_safe_one_exists() -> None:
    spread = TimeError((0.9, 1.0, 1.2))
    length = LengthDistribution.point(5)
    big = Candidate(Knobs("fp32"), LinearTime(per_token=0.0, c=0.9, q=0.01), quality=1.0)  # first token 0.9 s
    small = Candidate(Knobs("int4"), LinearTime(per_token=0.0, c=0.3, q=0.01), quality=0.5)
    kw = dict(n_prompt=1, budget_s=1.0, length=length, policy="guard", time_error=spread)
    unguarded = choose([big, small], first_token_guard=False, **kw)
    assert unguarded.best is not None and unguarded.best.knobs.weights == "fp32"  # 2/3 × 1.0 > 0.5
    assert not unguarded.best.first_token_safe  # at 1.2 × its prefill ends at 1.08 s > T
    guarded = choose([big, small], **kw)
    assert guarded.best is not None and guarded.best.knobs.weights == "int4" and guarded.best.first_token_safe
    assert guarded.ranked[1].knobs.weights == "fp32" and guarded.ranked[1].to_dict()["first_token_safe"] is False
    alone = choose([big], **kw)  # nothing safe: the best expected score is still the answer
    assert alone.best is not None and alone.best.knobs.weights == "fp32"
