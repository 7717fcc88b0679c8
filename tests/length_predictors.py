"""Stand-in length predictors for tests of the request path (the real ones need trained files)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class _Prediction:
    point: float
    spread: float = 2.0

    def upper(self, delta: float) -> float:
        return self.point * self.spread * (1 + math.log(1 / delta) / 3)


class ConstantPredictor:
    """The simplest real length predictor: always the same length (a training-set median, say)."""

    uses_prefill_hidden = False

    def __init__(self, length: float) -> None:
        self.length = length
        self.calls = 0

    def predict(self, prompt: str) -> _Prediction:
        self.calls += 1
        return _Prediction(self.length)
