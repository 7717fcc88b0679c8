"""One per-request options type, validated once where it is made (vLLM's ``SamplingParams`` pattern).

The CLI, the server, the benchmark and the facade all build a :class:`RequestOptions`; every layer after
that trusts it. Stdlib only (no torch), so the server's schemas and the planner's callers can use it freely.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Literal, get_args

from timebill.errors import InvalidInputError

__all__ = [
    "BOUNDS",
    "PRESS_NAMES",
    "Bound",
    "RequestOptions",
    "SamplingConfig",
    "COMPRESSOR_NAMES",
    "DEFAULT_COMPRESSOR",
    "check_alpha",
    "check_compressor",
    "check_max_new_tokens",
    "check_press",
    "check_prompt_compression",
]

#: How the worst-case length N̂_W is bounded: ``k`` (k·N̂, the paper's) or ``conformal`` (the predictor's
#: calibrated upper(δ) bound).
Bound = Literal["k", "conformal"]
BOUNDS: tuple[str, ...] = get_args(Bound)
#: Eviction presses (``timebill.presses`` builds them; the names live here so validation needs no torch).
PRESS_NAMES = ("snapkv", "streaming", "knorm")
#: Prompt compressors (``timebill.compression`` builds them), cheapest first; ``bm25`` is the default.
COMPRESSOR_NAMES = ("truncate", "bm25", "embedding", "gemfilter")
DEFAULT_COMPRESSOR = "bm25"

# Defaults of the planner's knobs (the paper's k = 5 and α_max = 0.95; the 2 % slack rule is ours, see
# ``timebill.planner.plan``). ``timebill.planner`` re-exports them: one value, one place.
DEFAULT_K = 5.0
DEFAULT_ALPHA_MAX = 0.95
DEFAULT_INFEASIBLE_SLACK = 0.02
DEFAULT_MAX_NEW_TOKENS = 256


def check_max_new_tokens(max_new_tokens: object) -> int:
    """A token count the decoder can honour: an integer >= 1 (a bool or 3.5 is a caller bug)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, Integral) or max_new_tokens < 1:
        raise InvalidInputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    return int(max_new_tokens)


def check_alpha(alpha: object) -> float:
    """A fixed eviction ratio: the fraction of the prompt KV to evict, in [0, 1) (1 would evict all of it)."""
    if isinstance(alpha, bool) or not (isinstance(alpha, Real) and math.isfinite(alpha) and 0.0 <= alpha < 1.0):
        raise InvalidInputError(f"alpha (eviction ratio) must be in [0, 1), got {alpha}")
    return float(alpha)


def check_press(press: object) -> str:
    """One of :data:`PRESS_NAMES`; checked before any work so a typo never costs a prefill."""
    if press not in PRESS_NAMES:
        raise InvalidInputError(f"Unknown press {press!r}; choose one of: {', '.join(PRESS_NAMES)}.")
    return str(press)


def check_prompt_compression(rho: object) -> float:
    """ρ, the fraction of prompt tokens removed before prefill, in [0, 1) (same convention as α)."""
    if isinstance(rho, bool) or not (isinstance(rho, Real) and math.isfinite(rho) and 0.0 <= rho < 1.0):
        raise InvalidInputError(f"prompt_compression (fraction of prompt tokens removed) must be in [0, 1), got {rho}")
    return float(rho)


def check_compressor(name: object) -> str:
    """One of :data:`COMPRESSOR_NAMES`; checked before any model work."""
    if name not in COMPRESSOR_NAMES:
        raise InvalidInputError(f"Unknown compressor {name!r}; choose one of: {', '.join(COMPRESSOR_NAMES)}.")
    return str(name)


def _check_fraction(name: str, value: object, hint: str = "") -> float:
    """A number strictly inside (0, 1): α_max and δ are both probabilities/fractions with open ends."""
    if isinstance(value, bool) or not (isinstance(value, Real) and 0.0 < value < 1.0):
        raise InvalidInputError(f"{name} must be in (0, 1){hint}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SamplingConfig:
    """Greedy when temperature == 0; otherwise temperature/top-p sampling from a seeded generator."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        """Reject values the sampler would turn into NaN probabilities or an empty nucleus."""
        t, p = self.temperature, self.top_p
        if isinstance(t, bool) or not (isinstance(t, Real) and math.isfinite(t) and t >= 0.0):
            raise InvalidInputError(f"temperature must be a finite number >= 0, got {t}")
        if isinstance(p, bool) or not (isinstance(p, Real) and 0.0 < p <= 1.0):
            raise InvalidInputError(f"top_p must be in (0, 1], got {p}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, Integral)):
            raise InvalidInputError(f"seed must be an integer, got {self.seed!r}")


@dataclass(frozen=True)
class RequestOptions:
    """Everything a budgeted request may set besides its prompt and budget; checked in ``__post_init__``."""

    #: Generation never runs longer than this (N_max of the method; the planner's cap on N̂_W).
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    #: Pessimistic factor of the paper's bound N̂_W = min(ceil(k·N̂), N_max); >= 1.
    k: float = DEFAULT_K
    #: Largest eviction ratio the planner may choose, in (0, 1).
    alpha_max: float = DEFAULT_ALPHA_MAX
    #: Which worst-case length bound plans use.
    bound: Bound = "k"
    #: Miss probability of the ``conformal`` bound, in (0, 1).
    delta: float = 0.05
    #: When no α fits: the smallest α whose worst case is within this fraction of α_max's (0: the paper's α_max).
    infeasible_slack: float = DEFAULT_INFEASIBLE_SLACK
    #: Closed-loop re-planning during decode (evict more when behind the plan's pace).
    replan: bool = True
    #: Eviction press; None means the TimeBill instance's own (the one its profile was measured with).
    press: str | None = None
    #: ρ: fraction of the prompt's tokens removed before prefill (0 = the prompt as given), in [0, 1).
    prompt_compression: float = 0.0
    #: Which prompt compressor removes them (see ``timebill.compression``).
    compressor: str = DEFAULT_COMPRESSOR
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        """Validate every field once; later layers (facade, planner, engine, server) trust the object."""
        check_max_new_tokens(self.max_new_tokens)
        k = self.k
        if isinstance(k, bool) or not (isinstance(k, Real) and math.isfinite(k) and k >= 1):
            raise InvalidInputError(f"k must be a number >= 1, got {k!r}")
        _check_fraction("alpha_max", self.alpha_max, ", e.g. 0.95")
        if self.bound not in BOUNDS:
            raise InvalidInputError(f"bound must be one of {BOUNDS}, got {self.bound!r}")
        _check_fraction("delta", self.delta)
        slack = self.infeasible_slack
        if isinstance(slack, bool) or not (isinstance(slack, Real) and math.isfinite(slack) and slack >= 0):
            raise InvalidInputError(f"infeasible_slack must be a number >= 0 (0: the paper's rule), got {slack!r}")
        if not isinstance(self.replan, bool):
            raise InvalidInputError(f"replan must be true or false, got {self.replan!r}")
        if self.press is not None:
            check_press(self.press)
        check_prompt_compression(self.prompt_compression)
        check_compressor(self.compressor)
        self.sampling  # noqa: B018 - builds (and so validates) the sampling settings

    @property
    def sampling(self) -> SamplingConfig:
        """The decoder's sampling settings."""
        return SamplingConfig(self.temperature, self.top_p, self.seed)

    def with_overrides(self, **given: Any) -> RequestOptions:
        """A copy with the given fields replaced; a ``None`` value means "not given" (CLI flags, JSON fields).

        An unknown name is a clear error rather than a silently ignored option.
        """
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(given) - names)
        if unknown:
            raise InvalidInputError(
                f"unknown request option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        changes = {name: value for name, value in given.items() if value is not None}
        return dataclasses.replace(self, **changes) if changes else self
