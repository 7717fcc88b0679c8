"""Choose the configuration θ = (weights, prompt compression ρ, eviction α) with the highest expected score.

The paper's planner (:mod:`timebill.planner`) takes the *smallest* α whose worst case (k·N̂ clipped to
N_max) fits the budget. The full benchmark run showed why that loses to a plain cut-off on a CPU: the
worst case is always N_max, quality hardly falls with α until the cap, and α cannot touch prefill. This
module replaces "smallest α that fits the worst case" with "largest expected score":

* **Time** per candidate θ comes from a :class:`CandidateTime` (the estimator per weights mode and
  compressor, or a simulator's fitted traces) and a :class:`TimeError` — the measured distribution of
  measured/predicted time, not only its median — so a plan that lands exactly on T is worth what its
  chance of finishing says, not 1.
* **Length** is a :class:`LengthDistribution` (the predictor's bucket probabilities, or an empirical
  prior), not k·N̂: ``P(finish by T | θ) = P(N ≤ tokens θ can emit by T)``.
* **Quality** is a number per candidate (``timebill.quality`` measures it offline on a calibration suite),
  plus a ``partial`` curve: the share of a full answer's score that its first fraction f keeps.
* **Objective**: Kill (and Skip-Next, where the engine's guard keeps a job from running into the next)
  maximises ``Q(θ)·P(finish)``; guard maximises the expected score of what is delivered by T, where a
  partial answer scores ``Q(θ)·partial(emitted/N)``.

Pure maths, stdlib only (no torch): the engine, the simulator and the tests call the same code.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from timebill.errors import InvalidInputError

__all__ = [
    "POLICIES",
    "Candidate",
    "CandidateTime",
    "Choice",
    "Evaluation",
    "Knobs",
    "LengthDistribution",
    "TimeError",
    "choose",
    "evaluate",
    "knob_grid",
    "tokens_by",
]

#: Overrun policies the objective knows; ``skip-next`` is planned as ``kill`` (the guard stops a job at T,
#: so a TimeBill job never runs into the next release, and an unfinished one scores 0 as under Kill).
POLICIES = ("kill", "guard", "skip-next")

#: Default knob grids: every weights mode the engine has, the fixed ρ and α of the benchmark's methods.
DEFAULT_WEIGHTS = ("fp32", "int8", "int4")
DEFAULT_RHOS = (0.0, 0.25, 0.5, 0.75, 0.9)
DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 0.95)


@dataclass(frozen=True, order=True)
class Knobs:
    """One configuration θ: what the engine runs a request with."""

    weights: str = "fp32"
    rho: float = 0.0  # fraction of prompt tokens a compressor removes before prefill
    alpha: float = 0.0  # fraction of the (compressed) prompt's KV evicted after prefill
    compressor: str = "bm25"

    def __post_init__(self) -> None:
        """Reject ratios outside [0, 1): 1 would remove the whole prompt."""
        for name in ("rho", "alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise InvalidInputError(f"Knobs.{name} must be in [0, 1), got {value!r}")

    @property
    def label(self) -> str:
        """A short name, e.g. ``int4+rho0.5+a0.75`` (``fp32`` alone for plain vanilla)."""
        parts = [self.weights]
        if self.rho:
            parts.append(f"rho{self.rho:g}" + ("" if self.compressor == "bm25" else f"/{self.compressor}"))
        if self.alpha:
            parts.append(f"a{self.alpha:g}")
        return "+".join(parts)


def knob_grid(
    weights: Iterable[str] = DEFAULT_WEIGHTS,
    rhos: Iterable[float] = DEFAULT_RHOS,
    alphas: Iterable[float] = DEFAULT_ALPHAS,
    compressor: str = "bm25",
) -> tuple[Knobs, ...]:
    """Every combination of the given knob values (75 with the defaults; evaluating one costs microseconds)."""
    return tuple(Knobs(w, float(r), float(a), compressor) for w in weights for r in rhos for a in alphas)


class CandidateTime(Protocol):
    """The predicted time of one configuration, in seconds (median: :class:`TimeError` carries the spread)."""

    def first_token_s(self, n_prompt: int) -> float:
        """Request start to first token: compressor + prefill of what is kept + eviction."""
        ...

    def step_s(self, n_kv: float) -> float:
        """One decode step over ``n_kv`` cached tokens."""
        ...

    def kept_kv_tokens(self, n_prompt: int) -> int:
        """Prompt tokens left in the KV cache after compression and eviction."""
        ...


@dataclass(frozen=True)
class Candidate:
    """A configuration the planner may choose, with its time model and expected full-answer score."""

    knobs: Knobs
    time: CandidateTime
    quality: float  # expected score of the full answer, in [0, 1]
    time_error: TimeError | None = None  # this configuration's own measured/predicted spread (None: the caller's)


@dataclass(frozen=True)
class LengthDistribution:
    """A discrete distribution of the response length in tokens (support ascending, probabilities sum to 1)."""

    lengths: tuple[int, ...]
    probs: tuple[float, ...]
    _cum: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Validate once; keep the cumulative sums so ``cdf`` is a bisection."""
        if not self.lengths or len(self.lengths) != len(self.probs):
            raise InvalidInputError("a length distribution needs as many probabilities as lengths, at least one")
        if any(b <= a for a, b in zip(self.lengths, self.lengths[1:], strict=False)) or self.lengths[0] < 1:
            raise InvalidInputError(f"lengths must be ascending integers >= 1, got {self.lengths[:8]}…")
        if any(p < 0 or not math.isfinite(p) for p in self.probs):
            raise InvalidInputError("length probabilities must be finite and >= 0")
        total = sum(self.probs)
        if not math.isclose(total, 1.0, rel_tol=1e-6, abs_tol=1e-9):
            raise InvalidInputError(f"length probabilities must sum to 1, got {total}")
        cum, acc = [], 0.0
        for p in self.probs:
            acc += p
            cum.append(acc)
        object.__setattr__(self, "_cum", tuple(cum))

    @classmethod
    def from_weights(cls, pairs: Iterable[tuple[int, float]], n_max: int) -> LengthDistribution:
        """Merge (length, weight) pairs, clip lengths to [1, n_max] (generation stops at N_max) and normalise."""
        if n_max < 1:
            raise InvalidInputError(f"n_max must be >= 1, got {n_max}")
        mass: dict[int, float] = {}
        for length, weight in pairs:
            n = max(1, min(int(length), n_max))
            mass[n] = mass.get(n, 0.0) + float(weight)
        total = sum(mass.values())
        if total <= 0:
            raise InvalidInputError("a length distribution needs positive total weight")
        keys = sorted(mass)
        return cls(tuple(keys), tuple(mass[k] / total for k in keys))

    @classmethod
    def from_classes(cls, probs: Sequence[float], class_lengths: Sequence[float], n_max: int) -> LengthDistribution:
        """A bucketed predictor's output: each bucket's mass at its upper edge (pessimistic within a bucket)."""
        if len(probs) != len(class_lengths):
            raise InvalidInputError("probs and class_lengths differ in length")
        return cls.from_weights(((math.ceil(edge), p) for p, edge in zip(probs, class_lengths, strict=True)), n_max)

    @classmethod
    def from_samples(cls, samples: Iterable[int], n_max: int) -> LengthDistribution:
        """The empirical distribution of observed lengths (e.g. a calibration prior per task kind)."""
        return cls.from_weights(((n, 1.0) for n in samples), n_max)

    @classmethod
    def from_censored(cls, samples: Iterable[tuple[int, bool]], n_max: int) -> LengthDistribution:
        """Kaplan–Meier estimate from (length, censored) samples; censored = stopped at its own N_max, not by EOS.

        Why not :meth:`from_samples`: a calibration answer cut at its task's N_max = 128 says only "longer than
        128", yet counted as a length it claims the answer *ends* at 128, so a request with N_max = 512 would
        be told it finishes by 128 tokens whenever that calibration answer did. On the shipped suites 15 of 16
        chat answers were cut that way; read as lengths they gave P(N ≤ 150) = 6/16, the planner's 0.36, where
        8 % of such plans finished in the full run. A censored sample stays at risk up to its cut and then
        leaves the risk set; the survival left after the last observed end goes to ``n_max`` (an answer
        nobody saw end runs to the limit), and every length is then clipped to ``n_max`` as usual.
        """
        data = sorted((max(1, int(n)), bool(c)) for n, c in samples)
        if not data:
            raise InvalidInputError("a length distribution needs at least one sample")
        at_risk, survival, pairs = len(data), 1.0, []
        for n, tied in itertools.groupby(data, key=lambda x: x[0]):  # the samples tied at n: ends before cuts
            flags = [c for _, c in tied]
            cuts = sum(flags)
            ends = len(flags) - cuts
            if ends:
                mass = survival * ends / at_risk
                pairs.append((n, mass))
                survival -= mass
            at_risk -= ends + cuts
        if survival > 1e-12:
            pairs.append((n_max, survival))
        return cls.from_weights(pairs, n_max)

    @classmethod
    def point(cls, n: int) -> LengthDistribution:
        """All mass at one length (a known length, or the paper's worst case N_W)."""
        return cls((max(1, int(n)),), (1.0,))

    def mix(self, other: LengthDistribution, weight_other: float) -> LengthDistribution:
        """``(1-w)·self + w·other``: blend a per-prompt prediction with a prior when the predictor is weak."""
        if not 0.0 <= weight_other <= 1.0:
            raise InvalidInputError(f"a mixture weight must be in [0, 1], got {weight_other}")
        pairs = [(n, (1 - weight_other) * p) for n, p in zip(self.lengths, self.probs, strict=True)]
        pairs += [(n, weight_other * p) for n, p in zip(other.lengths, other.probs, strict=True)]
        return LengthDistribution.from_weights(pairs, max(self.lengths[-1], other.lengths[-1]))

    def cdf(self, n: int) -> float:
        """P(N ≤ n)."""
        i = bisect.bisect_right(self.lengths, n)
        return self._cum[i - 1] if i else 0.0

    @property
    def n_max(self) -> int:
        """The longest length with mass."""
        return self.lengths[-1]


@dataclass(frozen=True)
class TimeError:
    """Equal-weight samples of measured/predicted time: the estimator's error distribution.

    ``(1.0,)`` trusts the median model; quantiles of measured runs (e.g. p10…p90 of 1.00…1.08) make a
    plan that lands on T count as a coin flip instead of a certainty.
    """

    ratios: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        """Ratios are positive and finite."""
        if not self.ratios or any(not (math.isfinite(r) and r > 0) for r in self.ratios):
            raise InvalidInputError(f"time error ratios must be finite and > 0, got {self.ratios}")

    @classmethod
    def from_samples(cls, samples: Iterable[float], points: int = 9) -> TimeError:
        """Summarise measured/predicted ratios by ``points`` evenly spaced quantiles (mid-quantile rule)."""
        values = sorted(float(s) for s in samples if math.isfinite(s) and s > 0)
        if not values:
            return cls()
        m = max(1, min(points, len(values)))
        picks = []
        for j in range(m):
            q = (j + 0.5) / m * (len(values) - 1)
            lo, frac = int(math.floor(q)), q - math.floor(q)
            hi = min(lo + 1, len(values) - 1)
            picks.append(values[lo] * (1 - frac) + values[hi] * frac)
        return cls(tuple(picks))


def _token_clock(time: CandidateTime, n_prompt: int, ratio: float) -> Callable[[int], float]:
    """Token n's predicted time after the request's start (n >= 1) when the run takes ``ratio`` × the model.

    Token 1 arrives at the end of prefill; token i + 1 after i decode steps over the kept KV plus i - 1
    generated tokens. The step cost is linear in the cache, so the sum of steps is quadratic in n.
    """
    first = ratio * time.first_token_s(n_prompt)
    kept = time.kept_kv_tokens(n_prompt)
    step0, slope = time.step_s(kept), time.step_s(kept + 1) - time.step_s(kept)

    def end_s(n: int) -> float:
        steps = n - 1
        return first + ratio * (steps * step0 + slope * steps * (steps - 1) / 2.0)

    return end_s


def predicted_token_s(time: CandidateTime, n_prompt: int, n_tokens: int) -> float:
    """The median model's time from the end of planning to token ``n_tokens`` (what a run is compared to)."""
    if n_tokens < 1:
        raise InvalidInputError(f"n_tokens must be >= 1, got {n_tokens!r}")
    return _token_clock(time, n_prompt, 1.0)(n_tokens)


def tokens_by(
    time: CandidateTime, n_prompt: int, n_max: int, budget_s: float, *, ratio: float = 1.0, spent_s: float = 0.0
) -> int:
    """How many tokens ``time``'s configuration emits by ``budget_s`` when it runs ``ratio`` × its prediction.

    ``spent_s`` (already elapsed: predictor, planning) is measured, so it is not scaled. The decode time of
    n tokens is quadratic in n (linear step cost), so the count is found by bisection.
    """
    room = budget_s - spent_s
    end_s = _token_clock(time, n_prompt, ratio)
    if end_s(1) > room:
        return 0
    lo, hi = 1, n_max
    if end_s(hi) <= room:
        return hi
    while hi - lo > 1:  # invariant: end_s(lo) <= room < end_s(hi)
        mid = (lo + hi) // 2
        if end_s(mid) <= room:
            lo = mid
        else:
            hi = mid
    return lo


class TimeErrorWindow:
    """The measured/predicted ratios of a host's recent runs of one configuration family, as a :class:`TimeError`.

    A profile is one quiet-machine measurement and the shipped default spread came from another host; the
    runs this host really makes say how far its plans land from their predictions. Until ``min_samples``
    runs are in, ``current`` is the prior; after, the window's own quantiles (the last ``window`` runs, so
    a host that changes speed or noise is followed). Ratios are taken against the prediction the plan
    used (already recalibrated), so this is the residual spread recalibration leaves, not its median shift.
    """

    def __init__(self, prior: TimeError, *, window: int = 64, min_samples: int = 16) -> None:
        """``min_samples`` ≤ ``window``; both ≥ 1."""
        if not 1 <= min_samples <= window:
            raise InvalidInputError(f"need 1 <= min_samples <= window, got {min_samples}, {window}")
        self.prior = prior
        self.min_samples = min_samples
        self._ratios: deque[float] = deque(maxlen=window)

    def observe(self, measured_s: float, predicted_s: float) -> None:
        """One run: its measured time to its last token against the prediction for that many tokens."""
        if math.isfinite(measured_s) and math.isfinite(predicted_s) and measured_s > 0 and predicted_s > 0:
            self._ratios.append(measured_s / predicted_s)

    def __len__(self) -> int:
        return len(self._ratios)

    @property
    def samples(self) -> tuple[float, ...]:
        """The measured/predicted ratios in the window, oldest first (for reports and tests)."""
        return tuple(self._ratios)

    def current(self) -> TimeError:
        """The prior until enough runs are measured, then their quantiles."""
        if len(self._ratios) < self.min_samples:
            return self.prior
        return TimeError.from_samples(self._ratios)


@dataclass(frozen=True)
class Evaluation:
    """What one candidate is expected to do under one budget."""

    knobs: Knobs
    quality: float  # expected full-answer score
    p_finish: float  # P(the full answer is delivered by T)
    expected_score: float  # the policy's objective
    tokens_by_deadline: int  # at the median time ratio
    first_token_s: float  # predicted (median) time to the first token
    # The first token (compressor + prefill) arrives by T even at the time error's largest ratio: a prefill
    # cannot be stopped, so one that overruns makes the answer late whatever the overrun policy.
    first_token_safe: bool = True

    def to_dict(self) -> dict[str, object]:
        """The plan object's ``candidates`` entries (server, ``--dry-run``)."""
        return {
            "configuration": self.knobs.label,
            "weights": self.knobs.weights,
            "prompt_compression": self.knobs.rho,
            "alpha": self.knobs.alpha,
            "quality": round(self.quality, 4),
            "p_finish": round(self.p_finish, 4),
            "expected_score": round(self.expected_score, 4),
            "tokens_by_deadline": self.tokens_by_deadline,
            "first_token_safe": self.first_token_safe,
        }


def _check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise InvalidInputError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    return "kill" if policy == "skip-next" else policy


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def evaluate(
    candidate: Candidate,
    *,
    n_prompt: int,
    budget_s: float,
    length: LengthDistribution,
    policy: str = "guard",
    time_error: TimeError = TimeError(),
    partial: Callable[[float], float] = lambda f: f,
    spent_s: float = 0.0,
    tail_cache: dict[int, float] | None = None,
) -> Evaluation:
    """Expected score and P(finish) of one candidate (see the module docstring for the objective).

    ``tail_cache`` (m → the guard's partial-answer term) lets :func:`choose` share that sum between
    candidates that emit the same number of tokens by T; it depends only on ``length`` and ``partial``.
    """
    policy = _check_policy(policy)
    if not (math.isfinite(budget_s) and budget_s > 0):
        raise InvalidInputError(f"budget_s must be > 0 seconds, got {budget_s!r}")
    n_max = length.n_max
    q = min(1.0, max(0.0, float(candidate.quality)))
    p_total = score_total = 0.0
    time_error = candidate.time_error or time_error
    for r in time_error.ratios:
        m = tokens_by(candidate.time, n_prompt, n_max, budget_s, ratio=r, spent_s=spent_s)
        p = length.cdf(m)
        p_total += p
        if policy == "kill" or m == 0:
            score_total += q * p
            continue
        # guard: the lengths above m deliver m of their n tokens; partial() says what that prefix is worth
        cut = tail_cache.get(m) if tail_cache is not None else None
        if cut is None:
            start = bisect.bisect_right(length.lengths, m)
            tail = zip(length.lengths[start:], length.probs[start:], strict=True)
            cut = sum(pn * min(1.0, max(0.0, partial(m / n))) for n, pn in tail)
            if tail_cache is not None:
                tail_cache[m] = cut
        score_total += q * (p + cut)
    k = len(time_error.ratios)
    median_ratio = _median(time_error.ratios)
    return Evaluation(
        knobs=candidate.knobs,
        quality=q,
        p_finish=p_total / k,
        expected_score=score_total / k,
        tokens_by_deadline=tokens_by(candidate.time, n_prompt, n_max, budget_s, ratio=median_ratio, spent_s=spent_s),
        first_token_s=candidate.time.first_token_s(n_prompt),
        first_token_safe=spent_s + max(time_error.ratios) * candidate.time.first_token_s(n_prompt) <= budget_s,
    )


@dataclass(frozen=True)
class Choice:
    """The chosen candidate (None: nothing can deliver a token by T) and every candidate ranked."""

    best: Evaluation | None
    ranked: tuple[Evaluation, ...]

    def runners_up(self, n: int = 3) -> tuple[Evaluation, ...]:
        """The next ``n`` candidates after the chosen one (what ``--dry-run`` shows)."""
        return self.ranked[1 : 1 + n] if self.best is not None else self.ranked[:n]


def choose(
    candidates: Iterable[Candidate],
    *,
    n_prompt: int,
    budget_s: float,
    length: LengthDistribution,
    policy: str = "guard",
    time_error: TimeError = TimeError(),
    partial: Callable[[float], float] = lambda f: f,
    spent_s: float = 0.0,
    min_p_finish: float | None = None,
    first_token_guard: bool = True,
) -> Choice:
    """Rank candidates by expected score (ties: higher P(finish), then the earlier first token).

    ``min_p_finish`` makes the chance of finishing a constraint as well (a user who wants "finish with 90 %"
    rather than "best expected score"); candidates below it are ranked but never chosen.

    ``first_token_guard``: where some candidate's first token arrives by T even at the time error's largest
    ratio (:attr:`Evaluation.first_token_safe`), only those are chosen. Why: the objective scores a prefill
    that overruns T as 0, but the engine cannot stop a prefill, so the answer also arrives *late*, which a
    deadline system counts as a fault beyond a lost score (the full run's one late answer of 1920 was an
    int4 prefill of 7172 tokens that took 6.03 s at T = 5.34 s). Where no candidate is safe, the best
    expected score is still chosen: nothing better can be done.
    """
    if min_p_finish is not None and not 0.0 <= min_p_finish <= 1.0:
        raise InvalidInputError(f"min_p_finish must be in [0, 1], got {min_p_finish!r}")
    tails: dict[int, float] = {}
    evaluations = [
        evaluate(
            c,
            n_prompt=n_prompt,
            budget_s=budget_s,
            length=length,
            policy=policy,
            time_error=time_error,
            partial=partial,
            spent_s=spent_s,
            tail_cache=tails,
        )
        for c in candidates
    ]
    if not evaluations:
        raise InvalidInputError("choose() needs at least one candidate configuration")
    ranked = tuple(sorted(evaluations, key=lambda e: (-e.expected_score, -e.p_finish, e.first_token_s, e.knobs)))
    eligible = [e for e in ranked if e.expected_score > 0 and (min_p_finish is None or e.p_finish >= min_p_finish)]
    if first_token_guard and any(e.first_token_safe for e in eligible):
        eligible = [e for e in eligible if e.first_token_safe]
    best = eligible[0] if eligible else None
    if best is not None:
        ranked = (best, *(e for e in ranked if e is not best))
    return Choice(best=best, ranked=ranked)
