"""One interface for every length predictor: ``predict(prompt) -> LengthPrediction``.

A :class:`LengthPrediction` carries the point estimate N̂ (what the paper's planner uses), the bucket
distribution when the predictor has one, and ``upper(δ)``: a length the true one exceeds with
probability ≤ δ, calibrated on held-out prompts (:mod:`timebill.predictor.conformal`). The paper's
pessimistic bound min(k·N̂, N_max) stays available as :meth:`LengthPrediction.worst_case`.

Predictor files (one small file per trained predictor) are written and read here, so every kind
fails the same way on a missing, corrupt or foreign file: :class:`PredictorError` with what to do.
"""

from __future__ import annotations

import math
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from timebill.errors import InvalidInputError, PredictorError
from timebill.predictor.conformal import ConformalBound

FILE_FORMAT = "timebill-length-predictor"
FILE_VERSION = 1


@dataclass(frozen=True)
class LengthPrediction:
    """A predicted response length (tokens) with its uncertainty."""

    point: int  # N̂, tokens (≥ 1, ≤ n_max)
    n_max: int  # the longest response the target may generate (bounds never exceed it)
    probs: np.ndarray | None = None  # distribution over the predictor's classes, or None (regression)
    class_lengths: np.ndarray | None = None  # upper edge (tokens) of each class of ``probs``
    calibration: ConformalBound | None = field(default=None, repr=False)

    def upper(self, delta: float) -> int:
        """A length the true length exceeds with probability ≤ ``delta`` (split-conformal, marginal)."""
        if self.calibration is None:
            raise PredictorError(
                "This predictor was not calibrated, so it has no upper(δ); use worst_case(k) or retrain "
                "with a calibration split (`timebill rlp train`)."
            )
        return self.calibration.bound(delta, self.point, self.probs, self.class_lengths)

    def worst_case(self, k: float = 5.0) -> int:
        """The paper's pessimistic length min(k·N̂, N_max) (k = 5 by default)."""
        if not (isinstance(k, (int, float)) and math.isfinite(k) and k >= 1.0):
            raise InvalidInputError(f"the pessimistic factor k must be a number >= 1, got {k!r}")
        return int(min(self.n_max, math.ceil(k * self.point)))


class LengthPredictor(ABC):
    """Base of all length predictors. Subclasses implement :meth:`predict_ids` (and :meth:`encode`)."""

    kind: str = "abstract"

    @abstractmethod
    def encode(self, prompt: str) -> list[int]:
        """Token ids of ``prompt`` as this predictor reads it."""

    @abstractmethod
    def predict_ids(self, ids: Sequence[int]) -> LengthPrediction:
        """Predict from token ids (for the RLP and probe: the target's chat-templated prompt)."""

    def predict(self, prompt: str) -> LengthPrediction:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidInputError("The prompt is empty; give some text to predict a length for.")
        return self.predict_ids(self.encode(prompt))


def check_ids(ids: Sequence[int]) -> list[int]:
    ids = list(ids)
    if not ids:
        raise InvalidInputError("The prompt is empty (no tokens); give some text to predict a length for.")
    return ids


# ------------------------------------------------------------------------------------------- files
def save_payload(path: str | os.PathLike[str], payload: dict) -> Path:
    """Write a predictor file atomically (temp file in the same directory, fsync, rename)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FILE_FORMAT, "version": FILE_VERSION, **payload}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a packaged file must be readable by everyone
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_payload(path: str | os.PathLike[str], kinds: Sequence[str] | None = None) -> dict:
    """Read a predictor file (tensors and plain data only: ``weights_only``), with clear errors."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise PredictorError(
            f"Length-predictor file not found: {path}. Train one with `timebill rlp train --out {path}`."
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
        raise PredictorError(
            f"{path} is not a readable length-predictor file ({type(exc).__name__}: {exc}); "
            "retrain it with `timebill rlp train`."
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
        raise PredictorError(f"{path} is not a TimeBill length-predictor file.")
    if payload.get("version") != FILE_VERSION:
        raise PredictorError(
            f"{path} has predictor format {payload.get('version')}, this TimeBill reads {FILE_VERSION}; "
            "retrain it with `timebill rlp train`."
        )
    if kinds is not None and payload.get("kind") not in kinds:
        raise PredictorError(f"{path} holds a {payload.get('kind')!r} predictor, expected one of {list(kinds)}.")
    return payload


def check_identity(path: str | os.PathLike[str], role: str, expected: dict, found_id: str, found_fp: str) -> None:
    """PredictorError unless a predictor file's recorded model identity is the model in use."""
    if expected.get("model_id") != found_id or expected.get("fingerprint") != found_fp:
        raise PredictorError(
            f"{path} was trained for {role} model {expected.get('model_id')!r} "
            f"(fingerprint {expected.get('fingerprint')}), but the {role} model here is {found_id!r} "
            f"(fingerprint {found_fp}). Lengths differ between models: train a predictor for this one "
            "(`timebill rlp label` then `timebill rlp train --model ...`)."
        )


def summarise(predictions: Sequence[LengthPrediction]) -> np.ndarray:
    """Point estimates as an array (for evaluation code)."""
    return np.array([p.point for p in predictions], dtype=np.int64)
