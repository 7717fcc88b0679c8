"""Fitting the ETE's time models (method §3): non-negative least squares of the paper's forms and hinges.

* ``QuadFit``            t = a·N² + b·N + c                      (paper's prefill form)
* ``LinFit``             t = p·N + q                             (paper's decode-step form)
* ``PiecewiseQuadFit``   t = a·N² + b·N + c + b2·max(0, N − knot)
* ``PiecewiseLinFit``    t = p·N + q + p2·max(0, N − knot)       (continuous, one knot)
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Literal

import numpy as np

from timebill.errors import InvalidInputError

log = logging.getLogger(__name__)

Weighting = Literal["relative", "absolute"]
ArrayLike = float | int | Sequence[float] | np.ndarray


def _as_float_array(name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values, dtype=float).reshape(-1)
    if arr.size == 0:
        raise InvalidInputError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise InvalidInputError(f"{name} contains non-finite values")
    return arr


def _check_xy(n: Any, t: Any, min_points: int, weighting: Weighting) -> tuple[np.ndarray, np.ndarray]:
    n_arr = _as_float_array("n", n)
    t_arr = _as_float_array("t", t)
    if n_arr.shape != t_arr.shape:
        raise InvalidInputError(f"n and t differ in length ({n_arr.size} vs {t_arr.size})")
    if np.any(n_arr < 0):
        raise InvalidInputError("token counts must be non-negative")
    if weighting == "relative" and np.any(t_arr <= 0):
        raise InvalidInputError("relative-error fitting needs strictly positive timings")
    if weighting not in ("relative", "absolute"):
        raise InvalidInputError(f"weighting must be 'relative' or 'absolute', got {weighting!r}")
    if np.unique(n_arr).size < min_points:
        raise InvalidInputError(f"need at least {min_points} distinct token counts, got {np.unique(n_arr).size}")
    return n_arr, t_arr


def _nnls_small(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, float]:
    """Exact weighted NNLS for a handful of unknowns by enumerating which ones are free.

    All coefficients are constrained to be ≥ 0: time cannot decrease with more tokens, and a negative
    intercept would predict negative times for short inputs. The problems have ≤ 4 unknowns, so the exact
    solution is found by enumerating active sets (numpy only, no scipy).
    The NNLS optimum is the unconstrained LS solution on its support, and that solution is feasible, so
    the best feasible candidate over all supports is the optimum. Columns are scaled to unit max norm
    first because N² and 1 differ by ~10⁹ and would otherwise wreck the conditioning.
    Returns (coefficients, weighted residual sum of squares).
    """
    xw = x * w[:, None]
    yw = y * w
    scale = np.max(np.abs(xw), axis=0)
    scale[scale == 0] = 1.0
    xs = xw / scale
    k = x.shape[1]
    best_coef = np.zeros(k)
    best_rss = float(yw @ yw)
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            cols = list(support)
            sol, *_ = np.linalg.lstsq(xs[:, cols], yw, rcond=None)
            if np.any(sol < 0):
                continue
            resid = yw - xs[:, cols] @ sol
            rss = float(resid @ resid)
            if rss < best_rss - 1e-15 * max(best_rss, 1e-300):
                coef = np.zeros(k)
                coef[cols] = sol
                best_coef, best_rss = coef, rss
    return best_coef / scale, best_rss


def _weights(t: np.ndarray, weighting: Weighting) -> np.ndarray:
    """Row weights: by default 1/t, so fits minimise the **relative** squared error.

    MAPE is the metric the paper reports, and with absolute errors the long prompts (seconds) would
    dominate and the short prompts (milliseconds) would be fitted with tens of percent error.
    """
    return 1.0 / t if weighting == "relative" else np.ones_like(t)


def _scalar_or_array(n: ArrayLike, values: np.ndarray) -> float | np.ndarray:
    return float(values.reshape(-1)[0]) if np.ndim(n) == 0 else values


def _hinge(n: np.ndarray, knot: float) -> np.ndarray:
    """``max(0, N − knot)``: on CPUs the per-token cost can step up once the KV cache or activations spill
    out of a cache level; one hinge captures that without the over-fitting of free polynomials."""
    return np.maximum(0.0, n - knot)


def _hinge_sum(start: float, steps: int, knot: float) -> float:
    """Σ_{i=0}^{steps-1} max(0, start + i − knot) in closed form."""
    first = max(0, math.floor(knot - start) + 1)
    m = steps - first
    if m <= 0:
        return 0.0
    return m * (start + first - knot) + m * (m - 1) / 2


@dataclass(frozen=True)
class _Fit:
    kind: ClassVar[str] = ""

    def _eval(self, n: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict(self, n: ArrayLike) -> float | np.ndarray:
        """Predicted seconds for token count(s) ``n`` (float for a scalar, ndarray for a sequence)."""
        arr = np.asarray(n, dtype=float)
        return _scalar_or_array(n, self._eval(arr.reshape(-1)).reshape(arr.shape))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``kind`` tells :func:`fit_from_dict` which class to rebuild."""
        return {"kind": self.kind, **{k: float(v) for k, v in asdict(self).items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        """Inverse of :meth:`to_dict`; raises ``InvalidInputError`` on a wrong kind or missing field."""
        if data.get("kind") != cls.kind:
            raise InvalidInputError(f"expected a fit of kind {cls.kind!r}, got {data.get('kind')!r}")
        names = [f.name for f in fields(cls)]
        missing = [name for name in names if name not in data]
        if missing:
            raise InvalidInputError(f"{cls.kind} fit lacks field(s) {missing}")
        try:
            values = {name: float(data[name]) for name in names}
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"{cls.kind} fit has a non-numeric coefficient: {exc}") from exc
        if not all(math.isfinite(v) for v in values.values()):
            raise InvalidInputError(f"{cls.kind} fit has a non-finite coefficient")
        return cls(**values)


@dataclass(frozen=True)
class QuadFit(_Fit):
    """Prefill time t = a·N² + b·N + c (paper's form)."""

    kind: ClassVar[str] = "quad"
    a: float
    b: float
    c: float

    def _eval(self, n: np.ndarray) -> np.ndarray:
        return (self.a * n + self.b) * n + self.c


@dataclass(frozen=True)
class PiecewiseQuadFit(_Fit):
    """Prefill time t = a·N² + b·N + c + b2·max(0, N − knot)."""

    kind: ClassVar[str] = "piecewise_quad"
    a: float
    b: float
    c: float
    b2: float
    knot: float

    def _eval(self, n: np.ndarray) -> np.ndarray:
        return (self.a * n + self.b) * n + self.c + self.b2 * _hinge(n, self.knot)


@dataclass(frozen=True)
class LinFit(_Fit):
    """Decode-step time t = p·N_kv + q (paper's form)."""

    kind: ClassVar[str] = "linear"
    p: float
    q: float

    def _eval(self, n: np.ndarray) -> np.ndarray:
        return self.p * n + self.q

    def sum_steps(self, n_kv_start: float, steps: int) -> float:
        """Σ_{i=0}^{steps-1} t(n_kv_start + i): the decode phase's time in closed form (method §3)."""
        if steps <= 0:
            return 0.0
        return steps * (self.p * n_kv_start + self.q) + self.p * steps * (steps - 1) / 2


@dataclass(frozen=True)
class PiecewiseLinFit(_Fit):
    """Decode-step time t = p·N_kv + q + p2·max(0, N_kv − knot): continuous, slope p + p2 past the knot."""

    kind: ClassVar[str] = "piecewise_linear"
    p: float
    q: float
    p2: float
    knot: float

    def _eval(self, n: np.ndarray) -> np.ndarray:
        return self.p * n + self.q + self.p2 * _hinge(n, self.knot)

    def sum_steps(self, n_kv_start: float, steps: int) -> float:
        """Σ_{i=0}^{steps-1} t(n_kv_start + i) in closed form (so WCET stays O(1) with a knot)."""
        if steps <= 0:
            return 0.0
        linear = steps * (self.p * n_kv_start + self.q) + self.p * steps * (steps - 1) / 2
        return linear + self.p2 * _hinge_sum(n_kv_start, steps, self.knot)


Fit = QuadFit | PiecewiseQuadFit | LinFit | PiecewiseLinFit
_FIT_CLASSES: dict[str, type[_Fit]] = {cls.kind: cls for cls in (QuadFit, PiecewiseQuadFit, LinFit, PiecewiseLinFit)}
PAPER_KINDS = frozenset({"quad", "linear"})


def fit_from_dict(data: dict[str, Any]) -> Fit:
    """Rebuild any fit from its :meth:`to_dict` output, dispatching on ``kind``."""
    if not isinstance(data, dict):
        raise InvalidInputError(f"a fit must be a dict, got {type(data).__name__}")
    cls = _FIT_CLASSES.get(data.get("kind"))  # type: ignore[arg-type]
    if cls is None:
        raise InvalidInputError(f"unknown fit kind {data.get('kind')!r}; known: {sorted(_FIT_CLASSES)}")
    return cls.from_dict(data)


def fit_prefill(n: Any, t: Any, weighting: Weighting = "relative") -> QuadFit:
    """Fit t = a·N² + b·N + c with a, b, c ≥ 0 (relative squared error by default, see module doc)."""
    n_arr, t_arr = _check_xy(n, t, 3, weighting)
    x = np.column_stack([n_arr**2, n_arr, np.ones_like(n_arr)])
    coef, _ = _nnls_small(x, t_arr, _weights(t_arr, weighting))
    return QuadFit(*(float(v) for v in coef))


def fit_decode(n_kv: Any, t: Any, weighting: Weighting = "relative") -> LinFit:
    """Fit t = p·N_kv + q with p, q ≥ 0 (relative squared error by default, see module doc)."""
    n_arr, t_arr = _check_xy(n_kv, t, 2, weighting)
    x = np.column_stack([n_arr, np.ones_like(n_arr)])
    coef, _ = _nnls_small(x, t_arr, _weights(t_arr, weighting))
    return LinFit(*(float(v) for v in coef))


def _candidate_knots(n_arr: np.ndarray, breakpoints: Iterable[float] | None) -> list[float]:
    """Knots to try: given ones, else interior data points leaving ≥ 2 distinct N on each side.

    Two points per side keep the hinge slope identifiable from more than a single (noisy) point.
    """
    if breakpoints is not None:
        knots = sorted({float(k) for k in breakpoints})
        if not knots:
            raise InvalidInputError("breakpoints is empty")
        return knots
    uniq = np.unique(n_arr)
    return [float(k) for k in uniq[1:-2]]


def _fit_hinge(
    x_base: np.ndarray, n_arr: np.ndarray, t_arr: np.ndarray, w: np.ndarray, knots: list[float]
) -> tuple[np.ndarray, float]:
    best: tuple[np.ndarray, float] | None = None
    best_rss = math.inf
    for knot in knots:
        x = np.column_stack([x_base, _hinge(n_arr, knot)])
        coef, rss = _nnls_small(x, t_arr, w)
        if rss < best_rss:
            best, best_rss = (coef, knot), rss
    assert best is not None
    return best


def fit_decode_piecewise(
    n_kv: Any, t: Any, breakpoints: Iterable[float] | None = None, weighting: Weighting = "relative"
) -> PiecewiseLinFit:
    """Fit a continuous one-knot piecewise-linear decode model; the knot is grid-searched.

    ``breakpoints`` are the candidate knots (default: interior measured N_kv values). All coefficients,
    including the extra slope p2, are ≥ 0: the effect modelled is a cost *increase* once data spills out
    of a cache level. If no knot helps, p2 comes out 0 and the fit equals :func:`fit_decode`.
    """
    n_arr, t_arr = _check_xy(n_kv, t, 4 if breakpoints is None else 3, weighting)
    x_base = np.column_stack([n_arr, np.ones_like(n_arr)])
    coef, knot = _fit_hinge(x_base, n_arr, t_arr, _weights(t_arr, weighting), _candidate_knots(n_arr, breakpoints))
    return PiecewiseLinFit(p=float(coef[0]), q=float(coef[1]), p2=float(coef[2]), knot=float(knot))


def fit_prefill_piecewise(
    n: Any, t: Any, breakpoints: Iterable[float] | None = None, weighting: Weighting = "relative"
) -> PiecewiseQuadFit:
    """Fit a·N² + b·N + c + b2·max(0, N − knot) with all coefficients ≥ 0; knot grid-searched."""
    n_arr, t_arr = _check_xy(n, t, 5 if breakpoints is None else 4, weighting)
    x_base = np.column_stack([n_arr**2, n_arr, np.ones_like(n_arr)])
    coef, knot = _fit_hinge(x_base, n_arr, t_arr, _weights(t_arr, weighting), _candidate_knots(n_arr, breakpoints))
    return PiecewiseQuadFit(a=float(coef[0]), b=float(coef[1]), c=float(coef[2]), b2=float(coef[3]), knot=float(knot))


def mape(pred: Any, true: Any) -> float:
    """Mean absolute percentage error, in percent (the paper's ETE metric)."""
    p = _as_float_array("pred", pred)
    y = _as_float_array("true", true)
    if p.shape != y.shape:
        raise InvalidInputError(f"pred and true differ in length ({p.size} vs {y.size})")
    if np.any(y == 0):
        raise InvalidInputError("MAPE is undefined when a true value is 0")
    return float(np.mean(np.abs(p - y) / np.abs(y)) * 100.0)


def split_holdout(n_values: Any, every: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic fit/held-out split of a profiling grid: boolean masks ``(fit, holdout)``.

    Distinct N values are ranked; every ``every``-th one starting from the second (ranks 1, 1+every, …)
    is held out, and the smallest and largest N always stay in the fit set, so held-out error measures
    interpolation, not extrapolation. Repeated measurements of one N fall on the same side, so a noisy
    repeat never leaks into the held-out score. Deterministic so profile reports are reproducible.
    """
    if every < 2:
        raise InvalidInputError(f"every must be ≥ 2, got {every}")
    n_arr = _as_float_array("n_values", n_values)
    uniq = np.unique(n_arr)
    ranks = np.searchsorted(uniq, n_arr)
    holdout = (ranks % every == 1) & (ranks < uniq.size - 1)
    return ~holdout, holdout


def select_model(candidates: Sequence[Fit], n_holdout: Any, t_holdout: Any) -> Fit:
    """Pick the fit with the best held-out MAPE, preferring the paper's form.

    A non-paper form (piecewise) wins only if its held-out MAPE is more than 10 % lower (relative) than
    the paper form's. The paper's forms follow from the FLOPs analysis, have fewer parameters, and give
    the α solver its closed form; a marginal held-out gain is within the profiling noise and does not
    justify the extra knot.
    """
    if not candidates:
        raise InvalidInputError("select_model needs at least one candidate")
    scores = [mape(fit.predict(np.asarray(n_holdout, dtype=float)), t_holdout) for fit in candidates]
    best = int(np.argmin(scores))
    paper = [i for i, fit in enumerate(candidates) if fit.kind in PAPER_KINDS]
    chosen = best
    if paper:
        p = min(paper, key=lambda i: scores[i])
        chosen = best if scores[best] < 0.9 * scores[p] else p
    log.debug(
        "select_model: %s -> %s",
        {f"{i}:{c.kind}": round(s, 3) for i, (c, s) in enumerate(zip(candidates, scores, strict=True))},
        candidates[chosen].kind,
    )
    return candidates[chosen]
