"""Building a profile: raw profiling samples → fitted time models, held-out accuracy, noise, FLOPs check.

The profiler measures; this module fits (the paper's forms and a hinge variant, chosen by leave-one-out
error) and keys the result to the setup it was measured on. Nothing here imports torch.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from timebill.errors import InvalidInputError, ProfileError
from timebill.estimator.fit import (
    Fit,
    LinFit,
    QuadFit,
    fit_decode,
    fit_decode_piecewise,
    fit_prefill,
    fit_prefill_piecewise,
    mape,
    split_holdout,
)
from timebill.estimator.flops import ModelShape, flops_coefficients
from timebill.estimator.store import Profile, ProfileKey, device_string, list_profiles
from timebill.paths import finite_or_none

if TYPE_CHECKING:
    from timebill.engine import Engine

#: Bytes of one weight / one KV element per dtype, for the bandwidth view of the decode coefficients.
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


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


def _fit_linear_cost(
    points: list[PointStats], fitter: Any = fit_decode, min_fit_points: int = 2
) -> tuple[Fit | None, dict[str, Any]]:
    """A ``p·N + q`` cost model (eviction, decode set-up) with its held-out MAPE; None without data."""
    if len(points) < 3:
        return None, {}
    n = np.array([p.n for p in points])
    t = np.array([p.median_s for p in points])
    fit_mask, hold_mask = split_holdout(n)
    if not hold_mask.any():
        hold_mask = fit_mask.copy()
    if len(set(n[fit_mask].tolist())) < min_fit_points:  # too few to hold any out: fit all, report in-sample
        fit_mask = hold_mask = np.ones(len(n), dtype=bool)
    fit = fitter(n[fit_mask], t[fit_mask])
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


def _fit_quadratic_cost(points: list[PointStats]) -> tuple[Fit | None, dict[str, Any]]:
    """An ``a·N² + b·N + c`` cost model (a partial forward over the prompt), as :func:`_fit_linear_cost`."""
    return _fit_linear_cost(points, fit_prefill, min_fit_points=3)


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

    # Prompt compressors: linear in the prompt (chunking, BM25, a small encoder over the chunks) except
    # gemfilter, whose early-exit forward through the target's first layers grows like a prefill.
    compressor_fits: dict[str, dict[str, Any]] = {}
    compressor_reports: dict[str, Any] = {}
    for name, rows in (measurements.get("compress") or {}).items():
        points = _point_stats(rows, n_col=1, t_col=2, group_col=0)
        fit, rep = _fit_linear_cost(points) if name != "gemfilter" else _fit_quadratic_cost(points)
        if fit is not None:
            compressor_fits[name] = fit.to_dict()
            compressor_reports[name] = rep

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
        "compress": compressor_reports,
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
        report=finite_or_none(report),  # diagnostics: an undefined MAPE is null, not inf
        setup=None if setup_fit is None else setup_fit.to_dict(),
        compressors=compressor_fits,
    )


# --------------------------------------------------------------------------------------------------
# Keys and lookup
# --------------------------------------------------------------------------------------------------


def profile_key_for(engine: Engine, press: str = "snapkv") -> ProfileKey:
    """The key of ``engine``'s current setup: model + weights, dtype, threads, press, device name."""
    return ProfileKey.current(
        model_id=engine.source.model_id,
        model_sha=engine.source.fingerprint,
        dtype=getattr(engine, "profile_dtype", engine.dtype),
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
        f"run `timebill profile {flags}` (add --quick for a rougher one in a few minutes)."
    )
