"""The seam between the estimator and its callers: what the facade (plan, re-plan, observe) and the bench
ask of a time model. :class:`~timebill.estimator.estimator.ExecutionTimeEstimator` is the implementation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from timebill.engine import GenerationResult
    from timebill.planner import TimeCoefficients


@runtime_checkable
class TimeModel(Protocol):
    """Predicted times of a request's phases, in seconds, and the online correction from measured ones.

    ``recalibrated=False`` asks for the static profile's number (without the online correction factor).
    """

    def coefficients(self, recalibrated: bool = True) -> TimeCoefficients:
        """Paper-form coefficients (a, b, c, p, q) for the planner's closed form for α."""
        ...

    def prefill_s(self, n_x: int, recalibrated: bool = True) -> float:
        """Prefill of an ``n_x``-token prompt."""
        ...

    def step_s(self, n_kv: float, recalibrated: bool = True) -> float:
        """One decode step with ``n_kv`` tokens already cached."""
        ...

    def decode_phase_s(self, n_kv0: float, n_tokens: int, recalibrated: bool = True) -> float:
        """Decode steps 1..n_tokens-1 starting from ``n_kv0`` cached prompt tokens."""
        ...

    def evict_s(self, n_x: int, alpha: float, recalibrated: bool = True) -> float:
        """Eviction of a fraction ``alpha`` of an ``n_x``-token prompt's KV after prefill."""
        ...

    def setup_s(self, n_kv0: float, n_tokens: int, recalibrated: bool = True) -> float:
        """Moving the kept KV into the decode path's cache before the first step."""
        ...

    def compress_s(self, compressor: str, n_x: int, recalibrated: bool = True) -> float:
        """The named prompt compressor's own time on an ``n_x``-token prompt."""
        ...

    def e2e_s(self, n_x: int, alpha: float, n_tokens: int, press_min_kept: int = 0, recalibrated: bool = True) -> float:
        """Prefill + eviction + decode set-up + decode phase of one request."""
        ...

    def observe(self, result: GenerationResult) -> None:
        """Feed one finished request's measured times to the online correction."""
        ...
