"""The execution-time estimator (ETE, method §3): fitted time models → request-level predictions.

Three parts, Vidur-style (the profiler measures, this module fits and predicts, the planner reads):

* :func:`fit_profile` turns raw profiling samples into a :class:`~timebill.estimator.store.Profile`:
  per-point medians, a deterministic fit / held-out split of the grid, the paper's forms (quadratic
  prefill, linear decode step) and a one-knot hinge variant of each, chosen by leave-one-out error on
  the fit points (the paper form is kept unless the hinge is >10 % better), held-out MAPE of both,
  eviction and decode set-up cost models, the noise measurement, and the FLOPs check.
* :class:`ExecutionTimeEstimator` predicts prefill, decode-step, decode-phase, eviction,
  end-to-end and worst-case times, using the number of KV tokens the press really keeps.
* Online recalibration: :meth:`ExecutionTimeEstimator.observe` feeds each finished request's
  measured prefill and step times to windowed median ratios, which scale the static profile when the
  machine drifts (another process on a core, frequency changes).

Nothing here imports torch: the estimator runs next to the planner, off the model's critical path.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from timebill.errors import InvalidInputError, ProfileError
from timebill.estimator.fit import (
    PAPER_KINDS,
    Fit,
    LinFit,
    OnlineRecalibrator,
    PiecewiseLinFit,
    PiecewiseQuadFit,
    QuadFit,
    fit_decode,
    fit_decode_piecewise,
    fit_from_dict,
    fit_prefill,
    fit_prefill_piecewise,
    mape,
    split_holdout,
)
from timebill.estimator.flops import ModelShape, flops_coefficients
from timebill.estimator.store import (
    Profile,
    ProfileKey,
    _finite_or_none,
    default_profile_path,
    device_string,
    find_profile,
    list_profiles,
)
from timebill.planner import TimeCoefficients, worst_case_length

if TYPE_CHECKING:
    from timebill.engine import Engine, GenerationResult

#: Bytes of one weight / one KV element per dtype, for the bandwidth view of the decode coefficients.
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


# --------------------------------------------------------------------------------------------------
# Fitting a profile from raw samples
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PointStats:
    """All repeats of one grid point, summarised."""

    n: float
    median_s: float
    samples: int
    mad_rel: float  # median absolute deviation / median: robust repeat-to-repeat spread
    cv: float  # standard deviation / mean (0 with one sample)


def _point_stats(rows: Iterable[Sequence[float]], n_col: int, t_col: int, group_col: int) -> list[PointStats]:
    groups: dict[float, list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        groups[float(row[group_col])].append((float(row[n_col]), float(row[t_col])))
    stats = []
    for _, pairs in sorted(groups.items()):
        times = [t for _, t in pairs]
        med = statistics.median(times)
        mad = statistics.median(abs(t - med) for t in times)
        cv = statistics.stdev(times) / statistics.fmean(times) if len(times) > 1 else 0.0
        stats.append(
            PointStats(
                n=statistics.fmean(n for n, _ in pairs),
                median_s=med,
                samples=len(times),
                mad_rel=mad / med if med > 0 else 0.0,
                cv=cv,
            )
        )
    return stats


def _noise_summary(points: list[PointStats], holdout: np.ndarray) -> dict[str, float]:
    """Spread of repeats, and the MAPE a *perfect* model would score against the held-out medians.

    With a robust per-point standard deviation σ ≈ 1.4826·MAD and r repeats, the median's standard error
    is ≈ 1.2533·σ/√r and the mean absolute deviation of a normal is √(2/π) of its σ, so the expected
    |median − truth| / truth is ≈ σ/(m·√r): the floor below which no time model can go on this data.
    """
    multi = [p for p in points if p.samples > 1]
    if not multi:
        return {"mad_rel_pct": 0.0, "cv_pct": 0.0, "floor_mape_pct": 0.0}
    held = [p for p, h in zip(points, holdout, strict=True) if h and p.samples > 1] or multi
    floor = statistics.fmean(1.4826 * p.mad_rel / math.sqrt(p.samples) for p in held)
    return {
        "mad_rel_pct": 100 * statistics.median(p.mad_rel for p in multi),
        "cv_pct": 100 * statistics.median(p.cv for p in multi),
        "cv_max_pct": 100 * max(p.cv for p in multi),
        "floor_mape_pct": 100 * floor,
    }


def _loo_mape(fitter: Any, n: np.ndarray, t: np.ndarray) -> float:
    """Leave-one-out MAPE (%) of a fitting procedure over grid points (inf if a fold cannot be fitted)."""
    errors = []
    for i in range(n.size):
        keep = np.arange(n.size) != i
        try:
            fit = fitter(n[keep], t[keep])
        except InvalidInputError:
            return math.inf
        errors.append(abs(float(fit.predict(n[i])) - t[i]) / t[i])
    return 100.0 * float(np.mean(errors))


def _fit_family(
    points: list[PointStats], paper: Any, piecewise: Any, min_piecewise: int
) -> tuple[Fit, Fit, dict[str, Any], np.ndarray]:
    """Fit the paper form and its hinge variant on the fit points; report both on the held-out points.

    The form is chosen by leave-one-out cross-validation **on the fit points only**, so the held-out
    points stay untouched by fitting and by model selection. The hinge must beat the paper form's
    LOO MAPE by more than 10 %: the paper's forms follow from the FLOPs analysis, have fewer
    parameters and give the α solver its closed form, so a marginal gain does not justify a knot.
    """
    n = np.array([p.n for p in points])
    t = np.array([p.median_s for p in points])
    fit_mask, hold_mask = split_holdout(n)
    if not hold_mask.any():  # too few points to hold any out: score on the fit points (reported as such)
        hold_mask = fit_mask.copy()
    n_fit, t_fit = n[fit_mask], t[fit_mask]
    paper_fit = paper(n_fit, t_fit)
    candidates: list[Fit] = [paper_fit]
    loo = {paper_fit.kind: _loo_mape(paper, n_fit, t_fit)}
    if np.unique(n_fit).size >= min_piecewise + 1:
        hinge = piecewise(n_fit, t_fit)
        candidates.append(hinge)
        loo[hinge.kind] = _loo_mape(piecewise, n_fit, t_fit)
        chosen = hinge if loo[hinge.kind] < 0.9 * loo[paper_fit.kind] else paper_fit
    else:
        chosen = paper_fit
    scores = {c.kind: mape(c.predict(n[hold_mask]), t[hold_mask]) for c in candidates}
    report = {
        "chosen": chosen.kind,
        "mape_holdout_pct": scores,
        "mape_loo_pct": loo,
        "mape_fit_pct": mape(chosen.predict(n[fit_mask]), t[fit_mask]),
        "max_ape_holdout_pct": float(
            np.max(np.abs(np.asarray(chosen.predict(n[hold_mask])) - t[hold_mask]) / t[hold_mask]) * 100
        ),
        "n_fit_points": int(fit_mask.sum()),
        "n_holdout_points": int(hold_mask.sum()),
        "holdout_n": n[hold_mask].tolist(),
        "range": [float(n.min()), float(n.max())],
    }
    return chosen, paper_fit, report, hold_mask


def _flops_check(shape: ModelShape, prefill: QuadFit, decode: LinFit, dtype: str) -> dict[str, Any]:
    """Seconds per FLOP of each fitted term, as throughput, and the decode terms as memory bandwidth.

    If time followed FLOPs exactly, every term would run at one throughput. Prefill terms are
    compute-bound (GFLOP/s comparable), decode-step terms are memory-bound (each step streams all
    weights, ``q``, and the whole KV cache, ``p``), so for them bytes/s is the physical check.
    """
    k = flops_coefficients(shape)
    width = _DTYPE_BYTES.get(dtype, 4)
    kv_bytes_per_token = shape.num_layers * 2 * shape.num_kv_heads * shape.head_dim * width
    weight_bytes = shape.matmul_params() * width

    def rate(flops: float, seconds: float) -> float | None:
        return flops / seconds / 1e9 if seconds > 0 else None

    out: dict[str, Any] = {
        "flops": k,
        "gflops_per_s": {
            "a (attention N^2)": rate(k["a"], prefill.a),
            "b (proj+FFN per token)": rate(k["b"], prefill.b),
            "c (LM head + fixed)": rate(k["c"], prefill.c),
            "p (attention per cached token)": rate(k["p"], decode.p),
            "q (per step)": rate(k["q"], decode.q),
        },
        "gbytes_per_s": {
            "p (KV read per cached token)": kv_bytes_per_token / decode.p / 1e9 if decode.p > 0 else None,
            "q (weights per step)": weight_bytes / decode.q / 1e9 if decode.q > 0 else None,
        },
        "kv_bytes_per_token": kv_bytes_per_token,
        "weight_bytes": weight_bytes,
    }
    a_rate, b_rate = out["gflops_per_s"]["a (attention N^2)"], out["gflops_per_s"]["b (proj+FFN per token)"]
    out["a_over_b_throughput"] = a_rate / b_rate if a_rate and b_rate else None
    return out


def _fit_linear_cost(points: list[PointStats]) -> tuple[Fit | None, dict[str, Any]]:
    """A ``p·N + q`` cost model (eviction, decode set-up) with its held-out MAPE; None without data."""
    if len(points) < 3:
        return None, {}
    n = np.array([p.n for p in points])
    t = np.array([p.median_s for p in points])
    fit_mask, hold_mask = split_holdout(n)
    if not hold_mask.any():
        hold_mask = fit_mask.copy()
    fit = fit_decode(n[fit_mask], t[fit_mask])
    return fit, {
        "chosen": fit.kind,
        "mape_holdout_pct": {fit.kind: mape(fit.predict(n[hold_mask]), t[hold_mask])},
        "max_ape_holdout_pct": float(
            np.max(np.abs(np.asarray(fit.predict(n[hold_mask])) - t[hold_mask]) / t[hold_mask]) * 100
        ),
        "n_holdout_points": int(hold_mask.sum()),
        "holdout_n": n[hold_mask].tolist(),
        "range": [float(n.min()), float(n.max())],
    }


def fit_profile(key: ProfileKey, measurements: dict[str, Any], shape: ModelShape | None = None) -> Profile:
    """Fit the ETE from :meth:`ProfileRun.measurements` rows; held-out MAPE and noise go in the report.

    Rows are ``[grid_n, n, seconds, repeat, others_cores, retries]`` (evict:
    ``[n, alpha, seconds, ...]``). Each grid point is summarised by the median of its repeats.
    """
    for kind in ("prefill", "decode"):
        if not measurements.get(kind):
            raise ProfileError(f"profile measurements lack {kind!r} samples")
    pre_pts = _point_stats(measurements["prefill"], n_col=1, t_col=2, group_col=0)
    dec_pts = _point_stats(measurements["decode"], n_col=1, t_col=2, group_col=0)
    try:
        pre_fit, pre_paper, pre_rep, pre_hold = _fit_family(pre_pts, fit_prefill, fit_prefill_piecewise, 5)
        dec_fit, dec_paper, dec_rep, dec_hold = _fit_family(dec_pts, fit_decode, fit_decode_piecewise, 4)
    except InvalidInputError as exc:
        raise ProfileError(f"cannot fit the profile: {exc}") from exc

    # Eviction cost depends on the prompt length (scoring, top-k and gather over N_x per layer); α moves
    # it only a little (the gather copies (1-α)·N_x), so one line over N_x, all α pooled.
    ev_pts = _point_stats(measurements.get("evict") or [], n_col=0, t_col=2, group_col=0)
    evict_fit, evict_rep = _fit_linear_cost(ev_pts)
    # Decode set-up (the kept KV copied into the decode path's cache): a copy, linear in kept tokens.
    setup_pts = _point_stats(measurements.get("setup") or [], n_col=1, t_col=2, group_col=0)
    setup_fit, setup_rep = _fit_linear_cost(setup_pts)

    def contention(kind: str) -> dict[str, float]:
        rows = measurements.get(kind) or []
        threshold = float(measurements.get("grid", {}).get("contention_cores", math.inf))
        if not rows:
            return {}
        others = [float(r[4]) for r in rows]
        return {
            "others_cores_mean": statistics.fmean(others),
            "contended_share": sum(o > threshold for o in others) / len(others),
            "retries": int(sum(int(r[5]) for r in rows)),
        }

    noise = {
        "prefill": {**_noise_summary(pre_pts, pre_hold), **contention("prefill")},
        "decode": {**_noise_summary(dec_pts, dec_hold), **contention("decode")},
    }
    if ev_pts:
        noise["evict"] = {**_noise_summary(ev_pts, np.zeros(len(ev_pts), dtype=bool)), **contention("evict")}
    if setup_pts:
        noise["setup"] = _noise_summary(setup_pts, np.zeros(len(setup_pts), dtype=bool))

    report: dict[str, Any] = {
        "prefill": pre_rep,
        "decode": dec_rep,
        "evict": evict_rep,
        "setup": setup_rep,
        "paper_fits": {"prefill": pre_paper.to_dict(), "decode": dec_paper.to_dict()},
        "points": {
            "prefill": [[p.n, p.median_s, p.mad_rel, p.samples] for p in pre_pts],
            "decode": [[p.n, p.median_s, p.mad_rel, p.samples] for p in dec_pts],
        },
    }
    if shape is not None:
        assert isinstance(pre_paper, QuadFit) and isinstance(dec_paper, LinFit)
        report["flops_check"] = _flops_check(shape, pre_paper, dec_paper, key.dtype)
    return Profile(
        key=key,
        prefill=pre_fit.to_dict(),
        decode=dec_fit.to_dict(),
        eviction=None if evict_fit is None else evict_fit.to_dict(),
        measurements=measurements,
        noise=noise,
        report=_finite_or_none(report),  # diagnostics: an undefined MAPE is null, not inf
        setup=None if setup_fit is None else setup_fit.to_dict(),
    )


# --------------------------------------------------------------------------------------------------
# Keys and lookup
# --------------------------------------------------------------------------------------------------


def profile_key_for(engine: Engine, press: str = "snapkv") -> ProfileKey:
    """The key of ``engine``'s current setup: model + weights, dtype, threads, press, device name."""
    return ProfileKey.current(
        model_id=engine.source.model_id,
        model_sha=engine.source.fingerprint,
        dtype=engine.dtype,
        threads=engine.threads,
        press=press,
        device=device_string(str(engine.device)),
        decode_path=getattr(engine, "decode_path", "hf"),
    )


def _missing_profile_message(key: ProfileKey, path: Path) -> str:
    others = [k for _, k in list_profiles(path.parent) if k is not None and k.model_id == key.model_id]
    hint = ""
    if others:
        hint = (
            " Profiles exist for other setups of this model: "
            + "; ".join(f"threads={k.threads} dtype={k.dtype} press={k.press} device={k.device}" for k in others)
            + "."
        )
    flags = f"--threads {key.threads} --press {key.press}"
    weights = key.decode_path.removeprefix("fast-")
    if key.decode_path.startswith("fast-") and weights != "fp32":
        flags += f" --weights {weights}"
    return (
        f"no estimator profile for {key.describe()} (looked for {path}).{hint} To create it, "
        f"run `timebill profile {flags}` (add --quick for a rougher one in about a minute)."
    )


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


# --------------------------------------------------------------------------------------------------
# The estimator
# --------------------------------------------------------------------------------------------------


class DriftTracker:
    """The online correction factor of one kind of time ('prefill' or 'step'): two windows, one answer.

    A single window has to choose between reacting fast (short: but then it chases noise — on this
    machine one request's step times drift by a few percent, and copying that onto the next request
    made the e2e error *worse* than the static profile) and averaging noise out (long: but then a real
    change, such as another process taking a core, is followed only after half the window). So both are
    kept, each an :class:`~timebill.estimator.fit.OnlineRecalibrator` (median of measured/predicted
    ratios, clipped): the long window's factor is used, unless the short window disagrees with it by
    more than ``switch`` (relative) — a real shift, larger than the request-to-request noise — in which
    case the short one is. Once the short window is full and still disagrees, the shift is sustained:
    the long window's history describes a machine that is gone (after a 15× slowdown ends, half a
    window of 15× ratios would hold its median high for dozens of requests), so it is restarted from
    the short window's observations.

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
        self.profile = profile
        self.prefill_range = prefill_range or (0.0, 8192.0)
        self.decode_range = decode_range or (0.0, 8192.0)
        self._prefill_rec = DriftTracker("prefill", *prefill_windows, switch=drift_switch, clip=recalibration_clip)
        self._step_rec = DriftTracker("step", *step_windows, switch=drift_switch, clip=recalibration_clip)

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

    # ------------------------------------------------------------------ predictions
    def prefill_s(self, n_x: int, recalibrated: bool = True) -> float:
        """Prefill time of an ``n_x``-token prompt (first token included, SnapKV scores captured)."""
        _check_tokens("n_x", n_x, 1)
        return float(self.prefill_fit.predict(n_x)) * self._prefill_scale(recalibrated)

    def step_s(self, n_kv: float, recalibrated: bool = True) -> float:
        """One decode step with ``n_kv`` tokens already cached."""
        if not (math.isfinite(n_kv) and n_kv >= 0):
            raise InvalidInputError(f"n_kv must be a finite number >= 0, got {n_kv!r}")
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


# --------------------------------------------------------------------------------------------------
# Reports: text and plot
# --------------------------------------------------------------------------------------------------


def _fmt_fit(fit: Fit) -> str:
    d = fit.to_dict()
    return f"{d.pop('kind')}: " + ", ".join(f"{k}={v:.4g}" for k, v in d.items())


def format_profile_report(profile: Profile) -> str:
    """A human-readable summary: setup, coefficients, held-out MAPE vs noise floor, FLOPs check."""
    rep, noise = profile.report or {}, profile.noise or {}
    grid = profile.measurements.get("grid", {})
    lines = [
        f"setup     : {profile.key.describe()}",
        f"host      : {profile.key.host}",
        f"versions  : {', '.join(f'{k} {v}' for k, v in profile.key.versions.items())}",
        f"created   : {profile.created}   grid: {grid.get('name', '?')} "
        f"({len(grid.get('prefill_n', []))} prompt lengths, {len(grid.get('decode_n_kv', []))} cache "
        f"lengths, {grid.get('repeats', '?')} repeats; measured in "
        f"{profile.measurements.get('wall_s', '?')} s, {profile.measurements.get('waited_s', 0)} s of it waiting "
        "for other processes to go quiet)",
        "",
        "time models (seconds; N = prompt tokens, N_kv = cached tokens):",
        f"  prefill  {_fmt_fit(profile.prefill_fit())}",
        f"  decode   {_fmt_fit(profile.decode_fit())}",
    ]
    ev = profile.eviction_fit()
    if ev is not None:
        lines.append(f"  evict    {_fmt_fit(ev)}  (t = p·N_x + q, all α pooled)")
    su = profile.setup_fit()
    if su is not None:
        lines.append(f"  setup    {_fmt_fit(su)}  (decode set-up, t = p·kept + q)")
    paper = rep.get("paper_fits", {})
    if rep.get("prefill", {}).get("chosen") not in PAPER_KINDS and "prefill" in paper:
        lines.append(f"  (paper-form prefill  {_fmt_fit(fit_from_dict(paper['prefill']))})")
    if rep.get("decode", {}).get("chosen") not in PAPER_KINDS and "decode" in paper:
        lines.append(f"  (paper-form decode   {_fmt_fit(fit_from_dict(paper['decode']))})")
    lines += ["", "accuracy on held-out grid points (not used for fitting) vs measurement noise:"]
    header = (
        f"  {'model':<9}{'chosen':<18}{'MAPE held-out':>14}{'max APE':>9}{'points':>8}"
        f"{'noise MAD':>11}{'CV':>7}{'floor':>8}{'contended':>11}{'LOO (fit pts)':>15}"
    )
    lines.append(header)
    for kind in ("prefill", "decode", "evict", "setup"):
        r, nz = rep.get(kind) or {}, noise.get(kind) or {}
        if not r:
            continue
        chosen = r["chosen"]
        lines.append(
            f"  {kind:<9}{chosen:<18}{r['mape_holdout_pct'][chosen]:>13.2f}%"
            f"{r.get('max_ape_holdout_pct', float('nan')):>8.2f}%{r['n_holdout_points']:>8d}"
            f"{nz.get('mad_rel_pct', float('nan')):>10.2f}%{nz.get('cv_pct', float('nan')):>6.2f}%"
            f"{nz.get('floor_mape_pct', float('nan')):>7.2f}%{100 * nz.get('contended_share', 0.0):>10.1f}%"
            + (f"{r['mape_loo_pct'][chosen]:>14.2f}%" if r.get("mape_loo_pct", {}).get(chosen) is not None else "")
        )
        others = {k: v for k, v in r["mape_holdout_pct"].items() if k != chosen}
        for kind2, value in others.items():
            loo = r.get("mape_loo_pct", {}).get(kind2)
            lines.append(
                f"  {'':<9}{'(' + kind2 + ')':<18}{value:>13.2f}%"
                + (f"{'':>54}{loo:>14.2f}%" if loo is not None else "")
            )
    lines.append("  noise MAD/CV: median over grid points of the repeat-to-repeat spread; floor: expected MAPE of a")
    lines.append("  perfect model against the held-out medians (≈ σ/√repeats); contended: samples during which other")
    lines.append("  processes used the CPU (re-measured up to the retry limit); LOO: leave-one-out MAPE on the fit")
    lines.append("  points, which chooses the form (a hinge must beat the paper form by >10 %).")
    contended = max((noise.get(k) or {}).get("contended_share", 0.0) for k in ("prefill", "decode"))
    if contended > 0.1:
        lines.append(
            f"  WARNING: {100 * contended:.0f}% of samples ran while other processes used the CPU; this "
            "profile is slower and noisier than the machine — re-run `timebill profile` when it is quiet."
        )
    fc = rep.get("flops_check")
    if fc:
        lines += ["", "FLOPs check (fitted paper-form coefficient vs FLOPs of the same term):"]
        for term, value in fc["gflops_per_s"].items():
            flops = fc["flops"][term[0]]
            text = f"{value:8.1f} GFLOP/s" if value else "     n/a (coefficient is 0)"
            lines.append(f"  {term:<32} {flops:>12.4g} FLOPs  -> {text}")
        for term, value in fc["gbytes_per_s"].items():
            text = f"{value:8.1f} GB/s" if value else "     n/a"
            lines.append(f"  {term:<32} {'':>12}        -> {text}")
        if fc.get("a_over_b_throughput"):
            lines.append(
                f"  attention N² runs at {fc['a_over_b_throughput']:.2f}× the matmul throughput of the "
                "per-token term (FLOPs counted for the full N×N square; a causal kernel skips ~half)."
            )
    return "\n".join(lines)


def plot_profile(profile: Profile, path: str | Path) -> Path:
    """PNG of measured vs fitted prefill and decode-step times, with relative residuals (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = profile.report or {}
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), sharex="col", gridspec_kw={"height_ratios": [3, 1.3]})
    for col, (kind, fit, label) in enumerate(
        (
            ("prefill", profile.prefill_fit(), "prompt tokens N_x"),
            ("decode", profile.decode_fit(), "cached tokens N_kv"),
        )
    ):
        ax, res = axes[0][col], axes[1][col]
        raw = np.array([[r[1], r[2]] for r in profile.measurements.get(kind, [])], dtype=float)
        pts = np.array(rep.get("points", {}).get(kind, []), dtype=float)
        hold = set(rep.get(kind, {}).get("holdout_n", []))
        scale, unit = (1.0, "s") if kind == "prefill" else (1e3, "ms")
        if raw.size:
            ax.scatter(raw[:, 0], raw[:, 1] * scale, s=6, color="0.7", label="each repeat", zorder=1)
        xs = np.linspace(0, max(raw[:, 0].max() if raw.size else 1.0, 1.0), 400)
        ax.plot(xs, np.asarray(fit.predict(xs)) * scale, color="C3", label=f"fit ({fit.kind})", zorder=3)
        paper = rep.get("paper_fits", {}).get(kind)
        if paper and paper.get("kind") != fit.kind:
            pf = fit_from_dict(paper)
            ax.plot(xs, np.asarray(pf.predict(xs)) * scale, "--", color="C0", label="paper form", zorder=2)
        if pts.size:
            is_hold = np.array([p in hold for p in pts[:, 0]])
            for mask, marker, name in ((~is_hold, "o", "median (fit)"), (is_hold, "s", "median (held out)")):
                ax.scatter(pts[mask, 0], pts[mask, 1] * scale, marker=marker, s=28, label=name, zorder=4)
                rel = (pts[mask, 1] - np.asarray(fit.predict(pts[mask, 0]))) / pts[mask, 1] * 100
                res.errorbar(pts[mask, 0], rel, yerr=pts[mask, 2] * 100, fmt=marker, ms=5, capsize=2, label=name)
        mape_h = rep.get(kind, {}).get("mape_holdout_pct", {}).get(fit.kind)
        title = f"{kind}: held-out MAPE {mape_h:.2f}%" if mape_h is not None else kind
        ax.set_title(title)
        ax.set_ylabel(f"time ({unit})")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        res.axhline(0, color="0.3", lw=0.8)
        res.set_xlabel(label)
        res.set_ylabel("measured − fit (%)")
        res.grid(alpha=0.3)
    fig.suptitle(f"TimeBill ETE profile — {profile.key.describe()}", fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
