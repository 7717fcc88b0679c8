"""The deadline guard's safety factor, learned from the engine's own step-to-step surprises.

The guard (:meth:`timebill.engine.Engine.decode`) stops before a decode step whose expected end would pass
the deadline, expecting the step to take up to ``factor × the longest of the last few steps``. A fixed
factor of 1.1 was enough on a quiet host (1 of 100 tight requests 0.2 ms late without it), but two
replicas sharing two cores under a closed-loop load had one step in about a thousand take ~1.5x its
predecessors, and each such step at the end of a guard-stopped answer is a late answer (serve_load on AMD
EPYC family 25: one flagged under each router, +53 ms and +166 ms). How jumpy steps are is a property of
the host and its load, so the factor is measured: every step's duration over the guard's expectation
(the longest of the steps before it) goes into a window, and the factor is a high quantile of that
window, never below the fixed floor. A quiet host keeps ~1.1; a contended one stops a step or two earlier.
"""

from __future__ import annotations

import math
from collections import deque

from timebill.errors import InvalidInputError

#: The factor before anything is measured, and its floor after (what a quiet machine needs).
GUARD_FLOOR = 1.1


class GuardMargin:
    """A window of ``step / expected step`` ratios → the factor the deadline guard multiplies by.

    ``quantile`` 0.999: a guard-stopped answer is late when its last step exceeds the factor, so the
    factor is set where one step in a thousand does. ``min_samples`` before the window is trusted
    (decode produces tens of steps per second, so it fills within a few requests); ``cap`` bounds what
    a burst of pathological steps (a swap storm) can make the guard do. The quantile is recomputed every
    ``refresh`` observations, not per step: the guard runs between tokens and must stay cheap.
    """

    def __init__(
        self,
        *,
        floor: float = GUARD_FLOOR,
        quantile: float = 0.999,
        window: int = 4096,
        min_samples: int = 256,
        cap: float = 4.0,
        refresh: int = 64,
    ) -> None:
        """Validate: ``1 <= floor <= cap``, ``0 < quantile <= 1``, ``1 <= min_samples <= window``, ``refresh >= 1``."""
        if not (math.isfinite(floor) and math.isfinite(cap) and 1.0 <= floor <= cap):
            raise InvalidInputError(f"need 1 <= floor <= cap, got floor={floor!r}, cap={cap!r}")
        if not 0.0 < quantile <= 1.0:
            raise InvalidInputError(f"quantile must lie in (0, 1], got {quantile!r}")
        if not 1 <= min_samples <= window or refresh < 1:
            raise InvalidInputError("need 1 <= min_samples <= window and refresh >= 1")
        self.floor, self.quantile, self.cap = floor, quantile, cap
        self.min_samples, self.refresh = min_samples, refresh
        self._ratios: deque[float] = deque(maxlen=window)
        self._since_refresh = 0
        self._factor = floor

    def observe(self, step_s: float, expected_s: float) -> None:
        """One decode step of ``step_s`` seconds where the guard expected up to ``expected_s`` (before margin)."""
        if not (math.isfinite(step_s) and math.isfinite(expected_s)) or step_s <= 0 or expected_s <= 0:
            return  # no expectation yet (a fresh engine's first step) or a clock glitch: nothing learned
        self._ratios.append(step_s / expected_s)
        self._since_refresh += 1
        if self._since_refresh >= self.refresh:
            self._refresh()

    def _refresh(self) -> None:
        self._since_refresh = 0
        n = len(self._ratios)
        if n < self.min_samples:
            self._factor = self.floor
            return
        ordered = sorted(self._ratios)
        high = ordered[min(n - 1, math.ceil(self.quantile * n) - 1)]  # nearest rank: an observed ratio
        self._factor = min(self.cap, max(self.floor, high))

    def factor(self) -> float:
        """The multiplier for the guard's expected step (the floor until ``min_samples`` are in)."""
        return self._factor

    def __len__(self) -> int:
        return len(self._ratios)
