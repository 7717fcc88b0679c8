"""Calibrated upper bounds on the response length: split-conformal on the calibration split.

The paper bounds the length by k·N̂ with a hand-tuned k = 5. Instead, ``upper(δ)`` returns a length
U(x) with P(N > U(x)) ≤ δ, marginally over prompts drawn like the calibration split. Split-conformal
prediction gives that with a finite-sample guarantee and no assumption on the predictor: compute a
*nonconformity score* s_i on each of the n calibration prompts (never seen in training), take

    q̂(δ) = the ⌈(n+1)(1−δ)⌉-th smallest s_i      (+∞ when that rank exceeds n),

and return the smallest bound whose score would be ≤ q̂. Then P(s_test ≤ q̂) ≥ 1−δ, so
P(N ≤ U) ≥ 1−δ (Vovk et al. 2005; Angelopoulos & Bates 2021, §1–3). Two scores:

- ``ratio``: s = N / N̂. U = ⌈N̂·q̂⌉. Works for any point predictor (regression too); the bound is a
  calibrated multiple of N̂ — the paper's k·N̂ with k = q̂(δ) chosen from data.
- ``cdf``: s = F̂(N⁻), the predicted probability mass of the buckets *below* the true one. U = the upper
  edge of the last bucket b with F̂(below b) ≤ q̂: a calibrated quantile of the predicted bucket
  distribution. It adapts to each prompt (a confident prediction gets a tight bound, an uncertain one
  a loose bound) where ``ratio`` scales every N̂ alike. Needs a distribution (classifiers only).

Which one is tighter at equal coverage is an empirical question; training picks per predictor by a
two-fold split of the calibration set (:func:`choose_method`), and the benchmark reports both.
All bounds are capped at N_max: the target never generates more, so the cap costs no coverage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from timebill.errors import InvalidInputError, PredictorError

METHODS = ("ratio", "cdf")


def validate_delta(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not (0.0 < delta < 1.0):
        raise InvalidInputError(f"delta (allowed miss probability) must be in (0, 1), got {delta!r}")
    return float(delta)


def conformal_quantile(scores: np.ndarray, delta: float) -> float:
    """The ⌈(n+1)(1−δ)⌉-th smallest score (1-based); +inf when that rank is past n."""
    delta = validate_delta(delta)
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(scores)
    rank = math.ceil((n + 1) * (1.0 - delta) - 1e-9)  # tolerance: (n+1)(1−δ) is often an integer
    if n == 0 or rank > n:
        return math.inf
    return float(scores[rank - 1])


def mass_below(probs: np.ndarray) -> np.ndarray:
    """F̂(below c) for each class c: the probability of all classes before c (rows = prompts)."""
    probs = np.asarray(probs, dtype=np.float64)
    return np.cumsum(probs, axis=-1) - probs


def ratio_scores(true_lengths: np.ndarray, points: np.ndarray) -> np.ndarray:
    return np.asarray(true_lengths, dtype=np.float64) / np.maximum(np.asarray(points, dtype=np.float64), 1.0)


def cdf_scores(true_classes: np.ndarray, probs: np.ndarray) -> np.ndarray:
    below = mass_below(probs)
    return below[np.arange(len(below)), np.asarray(true_classes, dtype=np.int64)]


def ratio_bounds(points: np.ndarray, q: float, n_max: int) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if not math.isfinite(q):
        return np.full(points.shape, n_max, dtype=np.int64)
    return np.minimum(n_max, np.ceil(points * q - 1e-9)).astype(np.int64)


def cdf_bounds(probs: np.ndarray, edges: np.ndarray, q: float, n_max: int) -> np.ndarray:
    """Upper edge of the last class whose mass-below is ≤ q (always ≥ the first class's edge)."""
    below = mass_below(np.atleast_2d(probs))
    # mass_below is non-decreasing, so the admissible classes are a prefix; count them.
    last = np.maximum((below <= q + 1e-12).sum(axis=-1) - 1, 0)
    return np.minimum(n_max, np.asarray(edges, dtype=np.int64)[last])


@dataclass(frozen=True)
class ConformalBound:
    """The calibration scores of one predictor and how to turn them into a bound."""

    method: str
    scores: tuple[float, ...]  # sorted calibration scores
    n_max: int

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PredictorError(f"Unknown conformal method {self.method!r}; use one of {METHODS}.")

    @classmethod
    def fit(
        cls,
        method: str,
        true_lengths: np.ndarray,
        n_max: int,
        points: np.ndarray | None = None,
        probs: np.ndarray | None = None,
        true_classes: np.ndarray | None = None,
    ) -> ConformalBound:
        if method == "ratio":
            scores = ratio_scores(true_lengths, points)
        elif method == "cdf":
            if probs is None or true_classes is None:
                raise PredictorError("The cdf conformal bound needs a bucket distribution.")
            scores = cdf_scores(true_classes, probs)
        else:
            raise PredictorError(f"Unknown conformal method {method!r}; use one of {METHODS}.")
        return cls(method, tuple(float(s) for s in np.sort(scores)), int(n_max))

    @property
    def n(self) -> int:
        return len(self.scores)

    def quantile(self, delta: float) -> float:
        return conformal_quantile(np.asarray(self.scores), delta)

    def bounds(
        self,
        delta: float,
        points: np.ndarray,
        probs: np.ndarray | None = None,
        edges: np.ndarray | None = None,
    ) -> np.ndarray:
        """Bounds U for many prompts at once (benchmarks); :meth:`bound` for one."""
        q = self.quantile(delta)
        if self.method == "ratio":
            return ratio_bounds(points, q, self.n_max)
        if probs is None or edges is None:
            raise PredictorError("This predictor's bound is calibrated on its bucket distribution (cdf).")
        if not math.isfinite(q):
            return np.full(len(np.atleast_2d(probs)), self.n_max, dtype=np.int64)
        return cdf_bounds(probs, edges, q, self.n_max)

    def bound(
        self, delta: float, point: float, probs: np.ndarray | None = None, edges: np.ndarray | None = None
    ) -> int:
        one = None if probs is None else np.asarray(probs)[None]
        return int(self.bounds(delta, np.asarray([point]), one, edges)[0])

    def to_dict(self) -> dict:
        return {"method": self.method, "scores": list(self.scores), "n_max": self.n_max}

    @classmethod
    def from_dict(cls, data: dict) -> ConformalBound:
        try:
            return cls(str(data["method"]), tuple(float(s) for s in data["scores"]), int(data["n_max"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise PredictorError(f"The predictor's conformal calibration is malformed ({exc}).") from exc


def coverage(true_lengths: np.ndarray, bounds: np.ndarray) -> float:
    """Fraction of prompts whose true length is ≤ its bound."""
    return float(np.mean(np.asarray(true_lengths) <= np.asarray(bounds)))


def choose_method(
    true_lengths: np.ndarray,
    points: np.ndarray,
    n_max: int,
    probs: np.ndarray | None = None,
    true_classes: np.ndarray | None = None,
    edges: np.ndarray | None = None,
    deltas: Sequence[float] = (0.05, 0.1),
    seed: int = 0,
) -> str:
    """The method with the smaller mean bound, by two-fold cross-fitting on the calibration set.

    Each half calibrates, the other half measures the mean bound; the test split is never used.
    """
    if probs is None:
        return "ratio"
    n = len(true_lengths)
    order = np.random.default_rng(seed).permutation(n)
    halves = (order[: n // 2], order[n // 2 :])
    mean_bound = {}
    for method in METHODS:
        total = 0.0
        for fit_idx, eval_idx in (halves, halves[::-1]):
            cb = ConformalBound.fit(
                method, true_lengths[fit_idx], n_max, points[fit_idx], probs[fit_idx], true_classes[fit_idx]
            )
            for delta in deltas:
                total += float(np.mean(cb.bounds(delta, points[eval_idx], probs[eval_idx], edges)))
        mean_bound[method] = total
    return min(mean_bound, key=mean_bound.get)
