"""Online recalibration (method §3): measured/predicted ratios of finished requests scale the static
profile when the machine drifts (another process on a core, frequency changes).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from timebill.errors import InvalidInputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Observation:
    kind: str
    n: float
    measured_s: float
    predicted_s: float


class OnlineRecalibrator:
    """Corrects the offline profile with recent measured/predicted ratios.

    The factor is **multiplicative** because the usual cause of drift on a CPU host — other processes
    stealing cores, thermal or frequency changes, memory-bandwidth contention — slows every matmul and
    attention kernel by about the same proportion, i.e. scales the whole curve. It is the **median** of
    the ratios in a bounded window (default 64) because single observations can be one-off spikes (a
    page fault, a GC pause, a preempted thread); the median ignores them while the window tracks a
    sustained change. The factor is clipped to [0.25, 4] so a burst of garbage cannot make the estimator
    absurd, and it is 1.0 until ``min_obs`` observations of that kind exist.
    """

    KINDS = ("prefill", "step")

    def __init__(self, window: int = 64, min_obs: int = 4, clip: tuple[float, float] = (0.25, 4.0)) -> None:
        if window < 1 or min_obs < 1:
            raise InvalidInputError("window and min_obs must be ≥ 1")
        if not 0 < clip[0] <= 1.0 <= clip[1]:
            raise InvalidInputError(f"clip must satisfy 0 < low ≤ 1 ≤ high, got {clip}")
        self.min_obs = min_obs
        self.clip = clip
        self._obs: deque[_Observation] = deque(maxlen=window)

    def _observe(self, kind: str, n: float, measured_s: float, predicted_s: float) -> None:
        # A non-positive or non-finite time is a clock or caller glitch; it carries no information
        # about speed and would poison the ratio, so it is dropped rather than raised mid-generation.
        if not (math.isfinite(measured_s) and math.isfinite(predicted_s)) or measured_s <= 0 or predicted_s <= 0:
            log.debug("recalibrator: ignoring %s observation %r/%r", kind, measured_s, predicted_s)
            return
        self._obs.append(_Observation(kind, float(n), float(measured_s), float(predicted_s)))

    def observe_prefill(self, n_x: int, measured_s: float, predicted_s: float) -> None:
        """Record a prefill of ``n_x`` tokens that took ``measured_s`` against ``predicted_s``."""
        self._observe("prefill", n_x, measured_s, predicted_s)

    def observe_step(self, n_kv: int, measured_s: float, predicted_s: float) -> None:
        """Record one decode step at cache length ``n_kv``."""
        self._observe("step", n_kv, measured_s, predicted_s)

    def count(self, kind: str) -> int:
        """Observations of ``kind`` currently in the window."""
        return sum(1 for o in self._obs if o.kind == kind)

    def scale(self, kind: str) -> float:
        """Correction factor for ``kind`` ('prefill' or 'step'): multiply predictions by it."""
        if kind not in self.KINDS:
            raise InvalidInputError(f"kind must be one of {self.KINDS}, got {kind!r}")
        ratios = [o.measured_s / o.predicted_s for o in self._obs if o.kind == kind]
        if len(ratios) < self.min_obs:
            return 1.0
        return float(min(max(statistics.median(ratios), self.clip[0]), self.clip[1]))

    def reset(self) -> None:
        """Forget all observations (e.g. after re-profiling)."""
        self._obs.clear()


class DriftTracker:
    """The online correction factor of one kind of time ('prefill' or 'step'): two windows, one answer.

    A single window has to choose between reacting fast (short: but then it chases noise — on this machine
    one request's step times drift by a few percent, and copying that onto the next request made the e2e
    error *worse* than the static profile) and averaging noise out (long: but then a real change, such as
    another process taking a core, is followed only after half the window). So both are kept, each an
    :class:`OnlineRecalibrator` (median of measured/predicted ratios, clipped): the long window's factor is
    used, unless the short window disagrees with it by more than ``switch`` (relative) — a real shift,
    larger than the request-to-request noise — in which case the short one is. Once the short window is full
    and still disagrees, the shift is sustained: the long window's history describes a machine that is gone
    (after a 15× slowdown ends, half a window of 15× ratios would hold its median high for dozens of
    requests), so it is restarted from the short window's observations.

    A correction nothing has confirmed for ``stale_after_s`` fades (geometrically, one half-life per
    ``stale_after_s``) back to the static profile. Without that, a load spike could lock a deadline
    server out for good: the raised factor makes every request look infeasible, refused requests are
    never measured, and the factor never comes down. If the slowdown is still there, the next request
    that runs re-establishes it (and the deadline guard protects that request meanwhile).
    """

    def __init__(
        self,
        kind: str,
        long_window: int,
        short_window: int,
        switch: float = 0.15,
        clip: tuple[float, float] = (0.25, 4.0),
        stale_after_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if kind not in OnlineRecalibrator.KINDS:
            raise InvalidInputError(f"kind must be one of {OnlineRecalibrator.KINDS}, got {kind!r}")
        if not 1 <= short_window <= long_window or switch <= 0:
            raise InvalidInputError("need 1 <= short_window <= long_window and switch > 0")
        self.kind = kind
        self.switch = switch
        self._long = OnlineRecalibrator(window=long_window, min_obs=min(3, long_window), clip=clip)
        self._short = OnlineRecalibrator(window=short_window, min_obs=min(2, short_window), clip=clip)
        self._recent: deque[tuple[int, float, float]] = deque(maxlen=short_window)
        self.restarts = 0  # how many sustained shifts were detected (for reports and tests)
        if not stale_after_s > 0:
            raise InvalidInputError(f"stale_after_s must be > 0, got {stale_after_s!r}")
        self.stale_after_s = stale_after_s
        self._clock = clock
        self._last_obs_t: float | None = None

    def _feed(self, rec: OnlineRecalibrator, n: int, measured_s: float, predicted_s: float) -> None:
        if self.kind == "prefill":
            rec.observe_prefill(n, measured_s, predicted_s)
        else:
            rec.observe_step(n, measured_s, predicted_s)

    def observe(self, n: int, measured_s: float, predicted_s: float) -> None:
        if not (math.isfinite(measured_s) and math.isfinite(predicted_s) and measured_s > 0 and predicted_s > 0):
            return  # the recalibrators drop such glitches too; keep the windows in step
        self._recent.append((n, measured_s, predicted_s))
        self._last_obs_t = self._clock()
        self._feed(self._long, n, measured_s, predicted_s)
        self._feed(self._short, n, measured_s, predicted_s)
        full = len(self._recent) == self._recent.maxlen
        if full and self._long.count(self.kind) > len(self._recent) and self._disagree():
            self._long.reset()
            for obs in self._recent:
                self._feed(self._long, *obs)
            self.restarts += 1

    def _disagree(self) -> bool:
        long_scale, short_scale = self._long.scale(self.kind), self._short.scale(self.kind)
        return abs(short_scale / long_scale - 1.0) > self.switch

    def scale(self) -> float:
        """Multiply static predictions by this (1.0 until there are observations)."""
        long_scale, short_scale = self._long.scale(self.kind), self._short.scale(self.kind)
        scale = short_scale if abs(short_scale / long_scale - 1.0) > self.switch else long_scale
        if self._last_obs_t is None:
            return scale
        age = self._clock() - self._last_obs_t
        if age <= self.stale_after_s:
            return scale
        return scale ** (0.5 ** ((age - self.stale_after_s) / self.stale_after_s))

    def reset(self) -> None:
        self._long.reset()
        self._short.reset()
        self._recent.clear()
        self._last_obs_t = None
