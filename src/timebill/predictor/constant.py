"""A stand-in length predictor: the same length N̂ for every prompt, with a fixed rule for upper(δ).

Used where no trained predictor is wanted or none exists: ``--predictor constant:N`` in ``generate``,
``serve``, the benchmark and load test (a model other than the default ships no trained predictor), tests
of the request path, and the server's "plan for the longest answer" hint. Stdlib only (no torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from timebill.errors import InvalidInputError
from timebill.options import DEFAULT_K


@dataclass(frozen=True)
class ConstantPrediction:
    """N̂ = ``point``; with no calibration data, upper(δ) = point·spread·(1 + ln(1/δ)/log_divisor).

    ``log_divisor=None`` drops the δ term, so upper(δ) = point·spread whatever δ (the benchmark's k·N̂;
    with ``spread=1`` the answer "runs to ``point``" that the server plans a refusal hint with).
    """

    point: float
    spread: float = 1.0
    log_divisor: float | None = None

    def upper(self, delta: float) -> float:
        if self.log_divisor is None:
            return self.point * self.spread
        return self.point * self.spread * (1 + math.log(1 / delta) / self.log_divisor)


class ConstantLengthPredictor:
    """Predicts ``length`` tokens for every prompt (a training-set median, say); counts its ``calls``.

    Reports must label runs made with it: TimeBill numbers measured with it say nothing about the
    trained predictor.
    """

    uses_prefill_hidden = False

    def __init__(self, length: float, *, spread: float = 1.0, log_divisor: float | None = None) -> None:
        self.length = length
        self.spread = spread
        self.log_divisor = log_divisor
        self.calls = 0  # tests read it: whether a request path asked for a prediction

    def predict(self, prompt: str) -> ConstantPrediction:
        self.calls += 1
        return ConstantPrediction(self.length, self.spread, self.log_divisor)


def constant_length_predictor(length: int) -> ConstantLengthPredictor:
    """The stand-in length predictor of ``--predictor constant:N``: N̂ = N for every prompt.

    Reports label it loudly: TimeBill numbers measured with it say nothing about a trained predictor.
    With no calibration data its "calibrated" bound upper(δ) is k = 5 times N, so ``--bound conformal``
    plans as the default k bound does.
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise InvalidInputError(f"a constant length prediction must be an integer >= 1, got {length!r}")
    return ConstantLengthPredictor(float(length), spread=float(DEFAULT_K))


def parse_constant_spec(spec: str) -> int | None:
    """``"constant:64"`` → 64; anything else → None (a predictor file or shipped name)."""
    if not spec.startswith("constant:"):
        return None
    try:
        return int(spec.split(":", 1)[1])
    except ValueError as exc:
        raise InvalidInputError(f"--predictor constant:N needs an integer N, got {spec!r}") from exc
