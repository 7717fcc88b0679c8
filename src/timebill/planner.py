"""Choose what a request runs with so that its worst case fits its time budget (method §3–§4).

Pure maths, stdlib only: fitted time coefficients (estimator) + predicted length (predictor) + budget in,
a :class:`Plan` (the chosen :class:`Configuration`, today the eviction ratio α) out, plus the mid-decode
re-plan (:func:`replan_alpha`). Every decision about α lives here; the facade only measures and applies.

Model (all times in seconds)::

    t_prefill(N_x)        = a*N_x**2 + b*N_x + c
    t_step(N_kv)          = p*N_kv + q                        one decode step over N_kv cached tokens
    t_decode_phase(K, N)  = sum_{i=1}^{N-1} t_step(K + i - 1)  K = prompt tokens kept after eviction
    N_W                   = min(ceil(k*N_hat), N_max)          worst-case length, at least 1
    WCET(alpha)           = t_prefill(N_x) + t_decode_phase(kept(alpha), N_W)
    choose the smallest alpha in [0, alpha_max] with  t_predict + WCET(alpha) <= T

Quality is assumed non-increasing in alpha, which is why the *smallest* fitting alpha is the goal.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

from timebill.errors import InvalidInputError
from timebill.options import DEFAULT_ALPHA_MAX, DEFAULT_INFEASIBLE_SLACK, DEFAULT_K

__all__ = [
    "DEFAULT_ALPHA_MAX",
    "DEFAULT_INFEASIBLE_SLACK",
    "DEFAULT_K",
    "Configuration",
    "Plan",
    "TimeCoefficients",
    "decode_phase_s",
    "e2e_s",
    "kept_kv_tokens",
    "least_time_s",
    "plan",
    "replan_alpha",
    "solve_alpha",
    "solve_alpha_bruteforce",
    "wcet_s",
    "worst_case_length",
]

#: Relative slack when comparing a predicted time with the budget. The closed form lands exactly on the
#: budget, so float round-off alone could make an exact solution look like a 1e-16 s overrun; the slack
#: is 1e-12 s for budgets up to 1 s and scales with the budget above that (round-off scales with it).
_FIT_TOLERANCE_REL = 1e-12

# DEFAULT_K (paper: 5), DEFAULT_ALPHA_MAX (paper: 0.95) and DEFAULT_INFEASIBLE_SLACK (ours: when no alpha
# fits, the smallest alpha whose worst case is within 2 % of alpha_max's; the paper's rule is 0) come from
# ``timebill.options``, the request options' one home.


# --------------------------------------------------------------------------------------------------
# Validation helpers: every user-reachable bad input becomes an InvalidInputError that names the
# argument, the value received and what is accepted, so a caller can fix the request without reading code.
# --------------------------------------------------------------------------------------------------


def _check_real(name: str, value: object) -> float:
    """Return ``value`` as a finite float, or raise naming the argument (NaN/inf would poison the maths)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InvalidInputError(f"{name} must be a real number, got {value!r} ({type(value).__name__}).")
    as_float = float(value)
    if not math.isfinite(as_float):
        raise InvalidInputError(f"{name} must be finite, got {value!r}.")
    return as_float


def _check_int(name: str, value: object, minimum: int) -> int:
    """Return ``value`` as an int >= ``minimum``; token counts are integers, so 3.5 tokens is a caller bug."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise InvalidInputError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    as_int = int(value)
    if as_int < minimum:
        raise InvalidInputError(f"{name} must be >= {minimum}, got {as_int}.")
    return as_int


def _check_alpha(name: str, value: object, *, upper_inclusive: bool) -> float:
    """Return an eviction ratio in [0, 1) (or [0, 1]); alpha is a fraction of the prompt KV to evict."""
    alpha = _check_real(name, value)
    if alpha < 0.0 or alpha > 1.0 or (alpha == 1.0 and not upper_inclusive):
        accepted = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise InvalidInputError(f"{name} must be in {accepted}, got {alpha!r}.")
    return alpha


def _check_alpha_max(alpha_max: object) -> float:
    """alpha_max must lie strictly in (0, 1): 0 leaves nothing to choose, 1 evicts the whole prompt."""
    value = _check_real("alpha_max", alpha_max)
    if not 0.0 < value < 1.0:
        raise InvalidInputError(f"alpha_max must be in the open interval (0, 1), e.g. 0.95; got {value!r}.")
    return value


def _check_budget(budget_s: object) -> float:
    """The budget is a deadline in seconds; it must be positive and finite to be meetable at all."""
    value = _check_real("budget_s", budget_s)
    if value <= 0.0:
        raise InvalidInputError(f"budget_s must be > 0 seconds, got {value!r}.")
    return value


def _check_non_negative(name: str, value: object, what: str) -> float:
    """A time or a count that cannot be negative; a negative one would silently enlarge the budget."""
    as_float = _check_real(name, value)
    if as_float < 0.0:
        raise InvalidInputError(f"{name} ({what}) must be >= 0, got {as_float!r}.")
    return as_float


def _check_t_predict(t_predict_s: object) -> float:
    """Predictor time that is not hidden behind prefill."""
    return _check_non_negative("t_predict_s", t_predict_s, "seconds")


def _check_n_hat(n_hat: object) -> float:
    """A predicted length is a non-negative token count (0 means "only the prefill token")."""
    return _check_non_negative("n_hat", n_hat, "predicted response length, tokens")


def _check_k(k: object) -> float:
    """k < 1 would shrink the prediction, i.e. plan for less than the expected length."""
    value = _check_real("k", k)
    if value < 1.0:
        raise InvalidInputError(f"k (pessimistic factor) must be >= 1, got {value!r}; use 1 for no margin.")
    return value


def _fits(total_s: float, budget_s: float) -> bool:
    """True when a predicted time meets the budget, allowing only float round-off (see _FIT_TOLERANCE_REL)."""
    return total_s <= budget_s + _FIT_TOLERANCE_REL * max(1.0, abs(budget_s))


# --------------------------------------------------------------------------------------------------
# Time model (§3)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimeCoefficients:
    """Fitted coefficients of the execution-time estimator, in seconds.

    ``t_prefill(N) = a*N**2 + b*N + c`` follows the FLOPs shape of prefill (attention quadratic in the
    prompt, FFN linear, LM head constant); ``t_step(N_kv) = p*N_kv + q`` is one decode step (attention
    linear in the cached tokens, everything else constant). Signs are not restricted because a least
    squares fit may return a slightly negative constant; only finiteness is required.
    """

    a: float
    b: float
    c: float
    p: float
    q: float

    def __post_init__(self) -> None:
        """Reject NaN/inf early: a poisoned coefficient would make every plan silently wrong."""
        for field in dataclasses.fields(self):
            _check_real(f"TimeCoefficients.{field.name}", getattr(self, field.name))

    def prefill_s(self, n_x: int) -> float:
        """Predicted prefill time (prompt of ``n_x`` tokens, producing the first output token)."""
        n = float(n_x)
        return self.a * n * n + self.b * n + self.c

    def step_s(self, n_kv: float) -> float:
        """Predicted time of one decode step attending over ``n_kv`` cached tokens."""
        return self.p * float(n_kv) + self.q


def worst_case_length(n_hat: float, k: float, n_max: int) -> int:
    """Pessimistic response length ``N_W = min(ceil(k*N_hat), N_max)``, at least 1.

    The predictor's N_hat is a point estimate; k >= 1 inflates it so that the deadline holds for most
    responses longer than predicted. Generation never exceeds N_max, hence the cap. At least one token
    is always produced (by prefill), hence the floor of 1. ``ceil`` may round a product such as
    ``1.1*100 = 110.00000000000001`` up to 111: one token too many errs on the safe side.
    """
    n_hat_f = _check_n_hat(n_hat)
    k_f = _check_k(k)
    n_max_i = _check_int("n_max", n_max, 1)
    return max(1, min(math.ceil(k_f * n_hat_f), n_max_i))


def kept_kv_tokens(n_x: int, alpha: float, min_kept: int = 0) -> int:
    """Number of prompt tokens left in the KV cache after evicting a fraction ``alpha`` of ``n_x``.

    Returns ``max(min(n_x, min_kept), n_x - floor(alpha*n_x))``.

    * ``n_x - floor(alpha*n_x)`` is ``ceil((1-alpha)*n_x)``: it is never smaller than kvpress's
      ``compute_n_kept`` (``max(1, int(n_x*(1-alpha)))``, a floor) and exceeds it by at most one token.
      Over-estimating the kept tokens over-estimates time, which is the safe direction for a deadline,
      and it also covers a press that rounds the other way.
    * ``min_kept`` models a press that always keeps its observation window (SnapKV keeps the last
      ``window_size`` prompt tokens); a prompt shorter than the window is kept whole.

    Because of both effects the real count can exceed the nominal ``(1-alpha)*n_x`` that the closed form
    of §4 assumes; :func:`plan` corrects for that.
    """
    n_x_i = _check_int("n_x", n_x, 1)
    alpha_f = _check_alpha("alpha", alpha, upper_inclusive=True)
    min_kept_i = _check_int("min_kept", min_kept, 0)
    nominal_kept = n_x_i - math.floor(alpha_f * n_x_i)
    return max(min(n_x_i, min_kept_i), nominal_kept)


def decode_phase_s(coef: TimeCoefficients, n_kv0: float, n_tokens: int) -> float:
    """Predicted time of decode steps 1..n_tokens-1 when ``n_kv0`` prompt tokens remain cached.

    Step i attends over ``n_kv0 + i - 1`` tokens (the prompt KV plus the tokens generated so far), so::

        sum_{i=1}^{n-1} [p*(n_kv0 + i - 1) + q] = (n-1)*(p*n_kv0 + q) + p*(n-1)*(n-2)/2

    The first output token comes from prefill, hence 0 when ``n_tokens <= 1``.
    """
    n_kv0_f = _check_real("n_kv0", n_kv0)
    if n_kv0_f < 0.0:
        raise InvalidInputError(f"n_kv0 (cached prompt tokens) must be >= 0, got {n_kv0_f!r}.")
    n = _check_int("n_tokens", n_tokens, 0)
    if n <= 1:
        return 0.0
    steps = n - 1
    return steps * (coef.p * n_kv0_f + coef.q) + coef.p * steps * (n - 2) / 2.0


def e2e_s(coef: TimeCoefficients, n_x: int, alpha: float, n_tokens: int, min_kept: int = 0) -> float:
    """Predicted end-to-end time (prefill + decode phase) for ``n_tokens`` output tokens at ratio ``alpha``.

    Uses the tokens the press really keeps (:func:`kept_kv_tokens`), not the nominal ``(1-alpha)*n_x``.
    """
    kept = kept_kv_tokens(n_x, alpha, min_kept)
    return coef.prefill_s(n_x) + decode_phase_s(coef, kept, n_tokens)


def wcet_s(
    coef: TimeCoefficients,
    n_x: int,
    alpha: float,
    n_hat: float,
    k: float,
    n_max: int,
    min_kept: int = 0,
) -> float:
    """Worst-case execution time: :func:`e2e_s` at the pessimistic length ``N_W`` (excludes t_predict)."""
    return e2e_s(coef, n_x, alpha, worst_case_length(n_hat, k, n_max), min_kept)


def _nominal_total_s(coef: TimeCoefficients, n_x: int, alpha: float, n_worst: int, front_s: float) -> float:
    """``front_s`` + the decode phase with the nominal (continuous) kept count ``(1-alpha)*n_x``."""
    return front_s + decode_phase_s(coef, (1.0 - alpha) * n_x, n_worst)


def _real_total_s(coef: TimeCoefficients, n_x: int, alpha: float, n_worst: int, front_s: float, min_kept: int) -> float:
    """``front_s`` + the decode phase with the integer count the press really keeps: what the deadline sees."""
    return front_s + decode_phase_s(coef, kept_kv_tokens(n_x, alpha, min_kept), n_worst)


def _front_s(coef: TimeCoefficients, n_x: int, t_predict_s: float, spent_s: float | None, overhead_s: float) -> float:
    """Time on the critical path before the first decode step.

    Before prefill: the predictor's unhidden time + predicted prefill + ``overhead_s`` (eviction and decode
    set-up). After prefill (``spent_s`` given): what has really been spent of the budget + ``overhead_s`` —
    the budget counts from the request's arrival and the prefill's measured time replaces its prediction.
    """
    if spent_s is not None:
        return spent_s + overhead_s
    return t_predict_s + coef.prefill_s(n_x) + overhead_s


# --------------------------------------------------------------------------------------------------
# Choosing alpha (§4)
# --------------------------------------------------------------------------------------------------


def _solve_alpha_front(
    coef: TimeCoefficients, n_x: int, budget_s: float, n_worst: int, front_s: float, alpha_cap: float
) -> tuple[float, bool]:
    """The closed form of :func:`solve_alpha` with everything before decode folded into ``front_s``."""
    if n_worst <= 1:
        alpha = 0.0  # no decode step: eviction cannot save time, so keep the whole prompt
    elif coef.p <= 0.0:
        fits_at_zero = _fits(_nominal_total_s(coef, n_x, 0.0, n_worst, front_s), budget_s)
        alpha = 0.0 if fits_at_zero else alpha_cap
    else:
        steps = n_worst - 1
        p_nx = coef.p * n_x
        slack_s = budget_s - front_s
        raw = 1.0 - slack_s / (p_nx * steps) + (n_worst - 2) / (2.0 * n_x) + coef.q / p_nx
        alpha = min(max(raw, 0.0), alpha_cap)
    return alpha, _fits(_nominal_total_s(coef, n_x, alpha, n_worst, front_s), budget_s)


def _solver_args(
    coef: TimeCoefficients, n_x: object, budget_s: object, n_worst: object, t_predict_s: object, alpha_max: object
) -> tuple[int, float, int, float, float]:
    """Validated (n_x, budget, n_worst, front time before decode, alpha_max) of the two alpha solvers."""
    n_x_i = _check_int("n_x", n_x, 1)
    budget = _check_budget(budget_s)
    n_worst_i = _check_int("n_worst", n_worst, 1)
    front = _check_t_predict(t_predict_s) + coef.prefill_s(n_x_i)
    return n_x_i, budget, n_worst_i, front, _check_alpha_max(alpha_max)


def solve_alpha(
    coef: TimeCoefficients,
    n_x: int,
    budget_s: float,
    n_worst: int,
    t_predict_s: float = 0.0,
    alpha_max: float = DEFAULT_ALPHA_MAX,
) -> tuple[float, bool]:
    """Smallest alpha in [0, alpha_max] with ``t_predict + WCET(alpha) <= budget`` (nominal kept tokens).

    Solving ``t_predict + t_prefill + (N_W-1)*(p*(1-alpha)*N_x + q) + p*(N_W-1)*(N_W-2)/2 <= T`` for alpha
    gives the corrected closed form of §4 (the printed Eq. 11 divides the middle term by p, which is
    dimensionally wrong)::

        alpha* = clip(1 - (T - t_prefill - t_predict) / (p*N_x*(N_W-1))
                        + (N_W-2)/(2*N_x) + q/(p*N_x),  0, alpha_max)

    Edge cases: ``N_W <= 1`` has no decode step, so alpha cannot help: alpha 0, feasible iff prefill and
    t_predict fit. ``p <= 0`` means eviction does not shorten decoding: alpha 0 if it fits, otherwise
    alpha_max (the paper's policy: run at alpha_max and let the overrun policy act) reported infeasible.

    Returns ``(alpha, feasible)`` where ``feasible`` says whether ``t_predict + WCET(alpha)`` with the
    nominal ``(1-alpha)*N_x`` kept tokens meets the budget.
    """
    n_x_i, budget, n_worst_i, front, alpha_cap = _solver_args(coef, n_x, budget_s, n_worst, t_predict_s, alpha_max)
    return _solve_alpha_front(coef, n_x_i, budget, n_worst_i, front, alpha_cap)


def solve_alpha_bruteforce(
    coef: TimeCoefficients,
    n_x: int,
    budget_s: float,
    n_worst: int,
    t_predict_s: float = 0.0,
    alpha_max: float = DEFAULT_ALPHA_MAX,
    steps: int = 20001,
) -> float:
    """Reference solver for tests: the smallest alpha on a uniform grid of [0, alpha_max] that fits.

    Uses the same nominal kept count as :func:`solve_alpha`; returns alpha_max when no grid point fits.
    It is independent of the closed form, so agreement (within one grid step) checks the algebra.
    """
    n_x_i, budget, n_worst_i, front, alpha_cap = _solver_args(coef, n_x, budget_s, n_worst, t_predict_s, alpha_max)
    n_steps = _check_int("steps", steps, 2)
    for i in range(n_steps):
        alpha = alpha_cap * i / (n_steps - 1)
        if _fits(_nominal_total_s(coef, n_x_i, alpha, n_worst_i, front), budget):
            return alpha
    return alpha_cap


@dataclass(frozen=True)
class Configuration:
    """One candidate θ: what a request runs with. Today the eviction ratio; new knobs are new fields."""

    alpha: float = 0.0

    def __post_init__(self) -> None:
        """An eviction ratio is a fraction of the prompt KV."""
        _check_alpha("alpha", self.alpha, upper_inclusive=False)


@dataclass(frozen=True)
class Plan:
    """The planner's decision for one request, with the predictions that justify it.

    All predicted times use the tokens the press really keeps. ``predicted_wcet_s`` is everything on the
    critical path: before prefill ``t_predict + prefill + overhead + decode``; after it (``spent_s`` set)
    ``spent + overhead + decode``. ``earliest_feasible_budget_s`` is the same total at alpha_max: when
    ``feasible`` is False it tells the caller how large the budget would have to be (the request still
    runs, and the overrun policy decides its fate). ``expected_e2e_s`` is the same total at N̂ tokens (the
    expected case; the WCET when infeasible), capped by the budget because the guard never lets a request
    run longer: what a server counts for queued work ahead of a new request.
    """

    config: Configuration
    n_hat: float
    n_worst: int
    bound: str
    predicted_prefill_s: float
    predicted_decode_s: float
    predicted_wcet_s: float
    t_predict_s: float
    feasible: bool
    earliest_feasible_budget_s: float
    expected_e2e_s: float = 0.0
    spent_s: float | None = None
    overhead_s: float = 0.0

    @property
    def alpha(self) -> float:
        """The eviction ratio chosen (α*)."""
        return self.config.alpha

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form for logs: the configuration's fields inline, beside the predictions."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "config"}
        return {**dataclasses.asdict(self.config), **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Inverse of :meth:`to_dict`."""
        names = {f.name for f in dataclasses.fields(Configuration)}
        config = Configuration(**{k: v for k, v in data.items() if k in names})
        return cls(config=config, **{k: v for k, v in data.items() if k not in names})


def _smallest_passing(passes: Callable[[float], bool], low: float, high: float) -> float:
    """Bisection to float precision for a predicate monotone in alpha: ``low`` fails, ``high`` passes."""
    while True:
        mid = (low + high) / 2.0
        if mid <= low or mid >= high:
            return high
        if passes(mid):
            high = mid
        else:
            low = mid


def _checked_front(
    coef: TimeCoefficients, n_x: int, t_predict_s: object, spent_s: object, overhead_s: object
) -> tuple[float, float | None, float, float]:
    """Validated (t_predict, spent, overhead) and the front time they make (see :func:`_front_s`)."""
    t_predict = _check_t_predict(t_predict_s)
    spent = None if spent_s is None else _check_non_negative("spent_s", spent_s, "seconds already spent")
    overhead = _check_non_negative("overhead_s", overhead_s, "seconds of eviction and decode set-up")
    return t_predict, spent, overhead, _front_s(coef, n_x, t_predict, spent, overhead)


def least_time_s(
    coef: TimeCoefficients,
    n_x: int,
    n_worst: int,
    *,
    alpha_max: float = DEFAULT_ALPHA_MAX,
    t_predict_s: float = 0.0,
    spent_s: float | None = None,
    overhead_s: float = 0.0,
    min_kept: int = 0,
) -> float:
    """The least budget a request needs: its worst case (``n_worst`` tokens) at alpha_max.

    This is :attr:`Plan.earliest_feasible_budget_s` without choosing an alpha, for callers (a server's
    admission control) that only ask "can this request fit at all?".
    """
    n_x_i = _check_int("n_x", n_x, 1)
    n_worst_i = _check_int("n_worst", n_worst, 1)
    alpha_cap = _check_alpha_max(alpha_max)
    min_kept_i = _check_int("min_kept", min_kept, 0)
    front = _checked_front(coef, n_x_i, t_predict_s, spent_s, overhead_s)[3]
    return _real_total_s(coef, n_x_i, alpha_cap, n_worst_i, front, min_kept_i)


def plan(
    coef: TimeCoefficients,
    n_x: int,
    budget_s: float,
    n_hat: float,
    *,
    k: float = DEFAULT_K,
    n_max: int,
    t_predict_s: float = 0.0,
    alpha_max: float = DEFAULT_ALPHA_MAX,
    bound: str = "k",
    n_worst: int | None = None,
    min_kept: int = 0,
    infeasible_slack: float = 0.0,
    spent_s: float | None = None,
    overhead_s: float = 0.0,
) -> Plan:
    """Choose alpha for one request: the smallest eviction ratio whose real worst case fits ``budget_s``.

    1. ``N_W`` is ``min(ceil(k*n_hat), n_max)``, unless ``n_worst`` is given (a calibrated/conformal
       bound computed elsewhere); an explicit ``n_worst`` is still capped at ``n_max`` because generation
       never runs longer. ``bound`` only labels which bound was used.
    2. alpha comes from the closed form (:func:`solve_alpha`), which assumes ``(1-alpha)*N_x`` kept tokens.
    3. The press really keeps :func:`kept_kv_tokens` tokens, never fewer than the nominal count (ceil
       rounding, and at least ``min_kept`` such as SnapKV's observation window). More kept tokens mean
       more time, so if the real WCET at the closed-form alpha overshoots, alpha is raised by bisection
       on the real WCET, which is a non-increasing step function of alpha (when ``p > 0``), up to
       alpha_max. Since the real count is never below the nominal one, no smaller alpha can fit, so the
       result is the smallest alpha that fits with the real count (to float precision).
    4. If even alpha_max does not fit, the plan says ``feasible=False`` with alpha = alpha_max (the
       paper's rule), unless ``infeasible_slack`` > 0: then alpha is the smallest one whose real worst
       case is within that fraction of alpha_max's. Why: an infeasible request's fate is decided by the
       overrun policy and the guard, and alpha_max buys it almost nothing when the prompt is short or the
       decode step is dominated by the weights (evicting 37 of a 39-token prompt saves ~1 % of a step)
       while it throws away nearly all of the prompt the answer depends on.

    ``spent_s``: planning after prefill — that much of the budget is already gone (queue, prefill,
    prediction), measured, so it replaces ``t_predict + t_prefill``. ``overhead_s``: eviction and decode
    set-up, reserved on the critical path either way.
    """
    n_x_i = _check_int("n_x", n_x, 1)
    budget = _check_budget(budget_s)
    n_hat_f = _check_n_hat(n_hat)
    k_f = _check_k(k)
    n_max_i = _check_int("n_max", n_max, 1)
    alpha_cap = _check_alpha_max(alpha_max)
    min_kept_i = _check_int("min_kept", min_kept, 0)
    slack = _check_real("infeasible_slack", infeasible_slack)
    if slack < 0.0:
        raise InvalidInputError(f"infeasible_slack must be >= 0 (0: the paper's alpha_max rule), got {slack!r}.")
    if not isinstance(bound, str) or not bound:
        raise InvalidInputError(f"bound must be a non-empty label such as 'k' or 'conformal', got {bound!r}.")
    t_predict, spent, overhead, front = _checked_front(coef, n_x_i, t_predict_s, spent_s, overhead_s)

    if n_worst is None:
        n_worst_i = worst_case_length(n_hat_f, k_f, n_max_i)
    else:
        n_worst_i = min(_check_int("n_worst", n_worst, 1), n_max_i)

    alpha, _ = _solve_alpha_front(coef, n_x_i, budget, n_worst_i, front, alpha_cap)

    def total_at(candidate: float) -> float:
        return _real_total_s(coef, n_x_i, candidate, n_worst_i, front, min_kept_i)

    def real_fits(candidate: float) -> bool:
        return _fits(total_at(candidate), budget)

    if not real_fits(alpha) and coef.p > 0.0 and n_worst_i > 1:
        alpha = _smallest_passing(real_fits, alpha, alpha_cap) if real_fits(alpha_cap) else alpha_cap

    earliest = total_at(alpha_cap)
    # (With p <= 0 or a single token, eviction buys no time at all, and α = 0 passes the first check.)
    if slack > 0.0 and alpha == alpha_cap and not real_fits(alpha_cap):
        target = earliest * (1.0 + slack)

        def near_cap(candidate: float) -> bool:
            return total_at(candidate) <= target

        alpha = 0.0 if near_cap(0.0) else _smallest_passing(near_cap, 0.0, alpha_cap)

    kept = kept_kv_tokens(n_x_i, alpha, min_kept_i)
    decode = decode_phase_s(coef, kept, n_worst_i)
    wcet_total = front + decode
    feasible = _fits(wcet_total, budget)
    n_expected = max(1, min(math.ceil(n_hat_f), n_max_i))
    expected = front + decode_phase_s(coef, kept, n_expected) if feasible else wcet_total
    return Plan(
        config=Configuration(alpha=alpha),
        n_hat=n_hat_f,
        n_worst=n_worst_i,
        bound=bound,
        predicted_prefill_s=coef.prefill_s(n_x_i),
        predicted_decode_s=decode,
        predicted_wcet_s=wcet_total,
        t_predict_s=t_predict,
        feasible=feasible,
        earliest_feasible_budget_s=earliest,
        expected_e2e_s=min(expected, budget),
        spent_s=spent,
        overhead_s=overhead,
    )


# --------------------------------------------------------------------------------------------------
# Re-planning during decode (ours)
# --------------------------------------------------------------------------------------------------


def replan_alpha(
    coef: TimeCoefficients,
    *,
    pace: float,
    remaining_s: float,
    needed_s: float,
    remaining_tokens: int,
    kv_len: int,
    prompt_kv_len: int,
    alpha: float,
    alpha_max: float = DEFAULT_ALPHA_MAX,
    infeasible_slack: float = 0.0,
) -> float | None:
    """How much more of the prompt KV to evict mid-decode, or None to change nothing.

    ``needed_s`` is the estimator's time for the ``remaining_tokens`` worst-case steps at the current
    cache, already scaled by ``pace`` (measured recent steps / their prediction); ``remaining_s`` is what
    is left of the budget. On time or ahead: None. Behind: solve
    ``sum_{i<r} pace*(p*(kv_allowed + i) + q) <= remaining_s`` for the prompt tokens that may stay, and
    return the extra fraction of the *remaining* prompt KV to evict, so that the total ratio never passes
    ``alpha_max`` (``alpha`` is the ratio applied so far). When even alpha_max cannot make it and
    ``infeasible_slack`` > 0, evict only as far as buys more than that fraction of the remaining time (on a
    short prompt that is nothing; the deadline guard then ends the answer), as :func:`plan` does.
    Less than one token's worth of eviction is not worth a prune: None.
    """
    if needed_s <= remaining_s:
        return None
    p, q = coef.p * pace, coef.q * pace
    r = remaining_tokens
    if p <= 0 or r <= 0:
        return None
    kv_allowed = (remaining_s - r * q - p * r * (r - 1) / 2) / (p * r)
    generated = kv_len - prompt_kv_len
    prompt_allowed = kv_allowed - generated
    max_extra = 1.0 - (1.0 - alpha_max) / (1.0 - alpha) if alpha < alpha_max else 0.0
    if max_extra <= 0 or prompt_kv_len <= 1:
        return None
    kept_at_max = prompt_kv_len * (1.0 - max_extra)
    if infeasible_slack > 0 and prompt_allowed < kept_at_max:
        fixed_s = r * q + p * r * (r - 1) / 2
        t_at_max = fixed_s + p * r * (kept_at_max + generated)
        prompt_allowed = max(prompt_allowed, (t_at_max * (1 + infeasible_slack) - fixed_s) / (p * r) - generated)
    extra = 1.0 - max(prompt_allowed, 0.0) / prompt_kv_len
    extra = min(max(extra, 0.0), max_extra)
    if extra * prompt_kv_len < 1.0:
        return None
    return extra
