"""Stand-in length predictors for tests of the request path (the real ones need trained files)."""

from __future__ import annotations

from timebill.predictor import ConstantLengthPredictor


def ConstantPredictor(length: float) -> ConstantLengthPredictor:  # noqa: N802 - reads like the class it builds
    """The simplest real length predictor: always ``length``; upper(δ) = 2·length·(1 + ln(1/δ)/3)."""
    return ConstantLengthPredictor(length, spread=2.0, log_divisor=3.0)
