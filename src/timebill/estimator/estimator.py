"""The execution-time estimator (ETE, method §3): a fitted profile → request-level predictions.

:class:`ExecutionTimeEstimator` predicts prefill, decode-step, decode-phase, eviction, end-to-end and
worst-case times from the KV tokens the press really keeps, corrected online by measured requests.
Nothing here imports torch: the estimator runs next to the planner, off the model's critical path.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from timebill.errors import InvalidInputError, ProfileError
from timebill.estimator.fit import Fit, LinFit, PiecewiseLinFit, PiecewiseQuadFit, QuadFit
from timebill.estimator.profile_fit import _missing_profile_message, profile_key_for
from timebill.estimator.recalibration import DriftTracker
from timebill.estimator.store import Profile, default_profile_path, find_profile
from timebill.planner import TimeCoefficients, worst_case_length

if TYPE_CHECKING:
    from timebill.engine import Engine, GenerationResult

log = logging.getLogger(__name__)

#: How far past the longest profiled length a prediction may reach before it is called an extrapolation.
EXTRAPOLATION_SLACK = 1.1


def _chord(fit: Fit, lo: float, hi: float) -> tuple[float, float]:
    """(slope, intercept) of the chord of the fit's hinge term over [lo, hi]; (0, 0) without a hinge."""
    if isinstance(fit, PiecewiseQuadFit):
        extra, knot = fit.b2, fit.knot
    elif isinstance(fit, PiecewiseLinFit):
        extra, knot = fit.p2, fit.knot
    else:
        return 0.0, 0.0
    if hi <= lo:
        return 0.0, 0.0
    h_lo, h_hi = max(0.0, lo - knot), max(0.0, hi - knot)
    slope = (h_hi - h_lo) / (hi - lo)
    return extra * slope, extra * (h_lo - slope * lo)


class ExecutionTimeEstimator:
    """Predicts a request's times from a fitted profile, corrected online by measured requests.

    Every prediction method takes ``recalibrated`` (default True): False gives the static profile's
    number, which is what the recalibration benchmark compares against.
    """

    #: Decode steps per recalibration observation (see :meth:`observe`).
    STEP_CHUNK = 8

    def __init__(
        self,
        prefill: Fit,
        decode: Fit,
        eviction: Fit | None = None,
        *,
        setup: Fit | None = None,
        compressors: dict[str, Fit] | None = None,
        profile: Profile | None = None,
        prefill_range: tuple[float, float] | None = None,
        decode_range: tuple[float, float] | None = None,
        step_windows: tuple[int, int] = (128, 8),
        prefill_windows: tuple[int, int] = (16, 4),
        drift_switch: float = 0.15,
        recalibration_clip: tuple[float, float] = (0.25, 4.0),
    ) -> None:
        """``*_range`` is the profiled span of N (for the closed-form linearisation of hinge fits).

        Recalibration (see :class:`DriftTracker`): ``(long, short)`` windows of decode-step chunks
        (:attr:`STEP_CHUNK` steps each, so 1024 and 64 steps) and of prefills; ``drift_switch`` is the
        relative disagreement at which the short window takes over, ``recalibration_clip`` the bounds of
        the correction factors.
        """
        self.prefill_fit = prefill
        self.decode_fit = decode
        self.eviction_fit = eviction
        self.setup_fit = setup
        self.compressor_fits = dict(compressors or {})
        self.profile = profile
        self.prefill_range = prefill_range or (0.0, 8192.0)
        self.decode_range = decode_range or (0.0, 8192.0)
        self._prefill_rec = DriftTracker("prefill", *prefill_windows, switch=drift_switch, clip=recalibration_clip)
        self._step_rec = DriftTracker("step", *step_windows, switch=drift_switch, clip=recalibration_clip)
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_profile(cls, profile: Profile, **options: Any) -> ExecutionTimeEstimator:
        """Estimator for a loaded profile; ``options`` go to the constructor (recalibration windows, clip)."""
        report = profile.report or {}
        return cls(
            profile.prefill_fit(),
            profile.decode_fit(),
            profile.eviction_fit(),
            setup=profile.setup_fit(),
            compressors=profile.compressor_fits(),
            profile=profile,
            prefill_range=tuple(report.get("prefill", {}).get("range", (0.0, 8192.0))),  # type: ignore[arg-type]
            decode_range=tuple(report.get("decode", {}).get("range", (0.0, 8192.0))),  # type: ignore[arg-type]
            **options,
        )

    @classmethod
    def for_engine(
        cls, engine: Engine, path: str | Path | None = None, press: str = "snapkv", **options: Any
    ) -> ExecutionTimeEstimator:
        """Load the profile for ``engine``'s setup; ``ProfileError`` when it is missing, stale or corrupt."""
        key = profile_key_for(engine, press)
        target = Path(path) if path is not None else default_profile_path(key)
        profile = find_profile(key, target)
        if profile is None:
            raise ProfileError(_missing_profile_message(key, target))
        return cls.from_profile(profile, **options)

    # ------------------------------------------------------------------ scales
    def scales(self) -> dict[str, float]:
        """Current online correction factors (1.0 = the machine runs as profiled)."""
        return {"prefill": self._prefill_rec.scale(), "step": self._step_rec.scale()}

    def _prefill_scale(self, recalibrated: bool) -> float:
        return self._prefill_rec.scale() if recalibrated else 1.0

    def _step_scale(self, recalibrated: bool) -> float:
        return self._step_rec.scale() if recalibrated else 1.0

    def _note_extrapolation(self, what: str, n: float, profiled_max: float) -> None:
        """Warn once per estimator when a prediction reaches well past the profiled lengths.

        A fit is only measured inside its grid; quick profiles made before the grid covered the whole
        context under-predicted 4-8k-token prefills by up to 1.9x. The number is still returned (a plan
        must be made), but the user is told which profile to re-measure.
        """
        if n <= profiled_max * EXTRAPOLATION_SLACK or what in self._warned:
            return
        self._warned.add(what)
        setup = self.profile.key.describe() if self.profile is not None else ""
        log.warning(
            "%s time for %d tokens is extrapolated beyond the profiled range (up to %d tokens)%s; "
            "re-run `timebill profile` so the grid covers it",
            what,
            int(n),
            int(profiled_max),
            f" of {setup}" if setup else "",
        )

    # ------------------------------------------------------------------ predictions
    def prefill_s(self, n_x: int, recalibrated: bool = True) -> float:
        """Prefill time of an ``n_x``-token prompt (first token included, SnapKV scores captured)."""
        _check_tokens("n_x", n_x, 1)
        self._note_extrapolation("prefill", n_x, self.prefill_range[1])
        return float(self.prefill_fit.predict(n_x)) * self._prefill_scale(recalibrated)

    def step_s(self, n_kv: float, recalibrated: bool = True) -> float:
        """One decode step with ``n_kv`` tokens already cached."""
        if not (math.isfinite(n_kv) and n_kv >= 0):
            raise InvalidInputError(f"n_kv must be a finite number >= 0, got {n_kv!r}")
        self._note_extrapolation("decode", n_kv, self.decode_range[1])
        return float(self.decode_fit.predict(n_kv)) * self._step_scale(recalibrated)

    def decode_phase_s(self, n_kv0: float, n_tokens: int, recalibrated: bool = True) -> float:
        """Decode steps 1..n_tokens-1 with ``n_kv0`` prompt tokens cached (step i sees n_kv0 + i - 1)."""
        if not (math.isfinite(n_kv0) and n_kv0 >= 0):
            raise InvalidInputError(f"n_kv0 must be a finite number >= 0, got {n_kv0!r}")
        n = _check_tokens("n_tokens", n_tokens, 0)
        if n <= 1:
            return 0.0
        assert isinstance(self.decode_fit, (LinFit, PiecewiseLinFit))
        return self.decode_fit.sum_steps(n_kv0, n - 1) * self._step_scale(recalibrated)

    def evict_s(self, n_x: int, alpha: float, recalibrated: bool = True) -> float:
        """The eviction step after prefill (0 when nothing is evicted or no eviction model was profiled).

        Scaled with the prefill factor: both are bulk tensor work over the prompt on the same cores.
        """
        _check_tokens("n_x", n_x, 1)
        _check_alpha(alpha)
        if alpha == 0.0 or n_x <= 1 or self.eviction_fit is None:
            return 0.0
        return float(self.eviction_fit.predict(n_x)) * self._prefill_scale(recalibrated)

    def setup_s(self, n_kv0: float, n_tokens: int, recalibrated: bool = True) -> float:
        """Moving the kept KV into the decode path's cache before the first step (0 if nothing decodes).

        On the fast CPU path this is a copy into a preallocated static cache, linear in the kept tokens.
        Scaled with the step factor: it is memory traffic like a decode step.
        """
        if n_tokens <= 1 or self.setup_fit is None:
            return 0.0
        return float(self.setup_fit.predict(n_kv0)) * self._step_scale(recalibrated)

    def compress_s(self, compressor: str, n_x: int, recalibrated: bool = True) -> float:
        """The prompt compressor's own time on an ``n_x``-token prompt (before prefill, on the critical path).

        Scaled with the prefill factor (bulk CPU work over the prompt). A profile without this compressor's
        cost (made before prompt compression existed, or with it left out) is a clear error, not a guess.
        """
        _check_tokens("n_x", n_x, 1)
        fit = self.compressor_fits.get(compressor)
        if fit is None:
            have = ", ".join(sorted(self.compressor_fits)) or "none"
            raise ProfileError(
                f"this machine's profile has no timing for the {compressor!r} prompt compressor (profiled: {have}); "
                "re-run `timebill profile` to measure it"
            )
        return max(0.0, float(fit.predict(n_x))) * self._prefill_scale(recalibrated)

    @staticmethod
    def kept_kv_tokens(n_x: int, alpha: float, press_min_kept: int = 0) -> int:
        """Prompt KV tokens the engine keeps: kvpress's own count, ``max(1, int(n_x·(1−α)))``.

        This is exactly :func:`kvpress.utils.compute_n_kept` (pinned by a test; reimplemented so the
        estimator does not import torch). ``α = 0`` and one-token prompts evict nothing.
        ``press_min_kept`` models a press that never goes below a floor (e.g. one that always keeps its
        observation window): the count is then at least ``min(n_x, press_min_kept)``.
        """
        n = _check_tokens("n_x", n_x, 1)
        _check_alpha(alpha)
        kept = n if alpha == 0.0 or n <= 1 else max(1, int(n * (1 - alpha)))
        return max(min(n, int(press_min_kept)), kept)

    def e2e_s(self, n_x: int, alpha: float, n_tokens: int, press_min_kept: int = 0, recalibrated: bool = True) -> float:
        """t̂_e2e(N_x, α, N) = prefill + eviction + decode set-up + decode phase over the kept tokens (§3).

        The eviction and set-up terms are ours (the paper's form has neither): both are on the critical
        path, so both are counted. Eviction makes e2e jump up slightly from α = 0 (no eviction) to any
        α > 0; for α > 0 the estimate is non-increasing in α.
        """
        kept = self.kept_kv_tokens(n_x, alpha, press_min_kept)
        return (
            self.prefill_s(n_x, recalibrated)
            + self.evict_s(n_x, alpha, recalibrated)
            + self.setup_s(kept, n_tokens, recalibrated)
            + self.decode_phase_s(kept, n_tokens, recalibrated)
        )

    def wcet_s(
        self,
        n_x: int,
        alpha: float,
        n_hat: float,
        k: float = 5.0,
        n_max: int = 8192,
        press_min_kept: int = 0,
        recalibrated: bool = True,
    ) -> float:
        """t̂_WCET: :meth:`e2e_s` at the pessimistic length N̂_W = min(⌈k·N̂⌉, N_max) (§3)."""
        return self.e2e_s(n_x, alpha, worst_case_length(n_hat, k, n_max), press_min_kept, recalibrated)

    def coefficients(self, recalibrated: bool = True) -> TimeCoefficients:
        """The paper-form coefficients (a, b, c, p, q) for the planner's closed form for α (§4).

        A paper-form fit is returned as is. A hinge fit (chosen when the data demanded it) is replaced
        by its **chord linearisation over the profiled range**: the hinge term ``x·max(0, N − knot)`` is
        convex, so the chord between the profiled ends is exact at both ends and never below the fit
        inside the range — the planner errs on the safe (slower) side. Online scales are applied.
        """
        pre, dec = self.prefill_fit, self.decode_fit
        s_pre, s_step = self._prefill_scale(recalibrated), self._step_scale(recalibrated)
        if isinstance(pre, QuadFit):
            a, b, c = pre.a, pre.b, pre.c
        else:
            assert isinstance(pre, PiecewiseQuadFit)
            slope, intercept = _chord(pre, *self.prefill_range)
            a, b, c = pre.a, pre.b + slope, pre.c + intercept
        if isinstance(dec, LinFit):
            p, q = dec.p, dec.q
        else:
            assert isinstance(dec, PiecewiseLinFit)
            slope, intercept = _chord(dec, *self.decode_range)
            p, q = dec.p + slope, dec.q + intercept
        return TimeCoefficients(a=a * s_pre, b=b * s_pre, c=c * s_pre, p=p * s_step, q=q * s_step)

    # ------------------------------------------------------------------ online recalibration
    def observe(self, result: GenerationResult) -> None:
        """Feed one finished request's measured times (prefill, decode steps) to the recalibrator.

        Step ``j`` (0-based) of ``result.step_times_s`` ran with ``kept_kv_tokens + j`` tokens cached.
        Step 0 is skipped: the engine's clock for it also covers the decode set-up. The other steps go in
        as chunks of :attr:`STEP_CHUNK`, one ratio ``sum(measured) / sum(predicted)`` per chunk: the
        profile predicts a step's *mean* time (what a sum of steps needs), and a chunk's sum keeps the
        occasional slow step in, where a median over single steps would drop it and bias the factor
        low. Ratios are taken against the *static* profile, so the factor is absolute, not compounding.
        """
        n_x = int(result.prompt_tokens)
        if n_x >= 1 and result.prefill_s > 0:
            self._prefill_rec.observe(n_x, result.prefill_s, self.prefill_s(n_x, recalibrated=False))
        kept = int(result.kept_kv_tokens)
        steps = list(result.step_times_s[1:])
        for start in range(0, len(steps) - self.STEP_CHUNK + 1, self.STEP_CHUNK):
            chunk = steps[start : start + self.STEP_CHUNK]
            first_kv = kept + 1 + start
            predicted = sum(self.step_s(first_kv + j, recalibrated=False) for j in range(len(chunk)))
            self._step_rec.observe(first_kv + len(chunk) // 2, sum(chunk), predicted)

    def reset_recalibration(self) -> None:
        """Forget online observations (e.g. after re-profiling)."""
        self._prefill_rec.reset()
        self._step_rec.reset()


def _check_tokens(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InvalidInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha < 1.0:
        raise InvalidInputError(f"alpha (eviction ratio) must be in [0, 1), got {alpha!r}")
    return float(alpha)
