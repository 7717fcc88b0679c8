"""The paper's Response Length Predictor (§2 of the method): a small decoder LM + a bucket classifier.

Backbone: any HF causal LM with the Llama layout (``.model.layers``, ``.model.norm``); by default the
target itself (SmolLM2-135M), whose weights are already in memory, so the RLP costs no second model.
The backbone is *frozen* and a small head is trained on its pooled hidden states
(:mod:`timebill.predictor.features`, :mod:`timebill.predictor.heads`): on 2 CPU cores a frozen-feature
head trains in seconds once features are cached, where fine-tuning even the top layers means a
backward pass per prompt per epoch. Input compression: the prompt is cut to its first and last
N_p/2 tokens (:func:`truncate_head_tail`), so the RLP's forward is bounded whatever the prompt length
and finishes within the target's prefill of the full prompt (the benchmark measures it).

Output: a distribution over buckets of width B (⌈N_cap/B⌉ classes); N̂ = min(N_max, n̂·B) with n̂ the
most probable bucket (the paper's rule). The regression variant (Table 1's first line) predicts N̂
directly. ``upper(δ)`` is calibrated by split-conformal on the calibration split.

One file per trained predictor (:func:`timebill.predictor.base.save_payload`): head weights, feature
and bucket configuration, calibration scores and the identity of the target (whose lengths it
learned) and of the backbone (whose features it reads). Loading checks both identities.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from timebill.errors import PredictorError
from timebill.predictor.base import (
    LengthPrediction,
    LengthPredictor,
    check_identity,
    check_ids,
    load_payload,
    save_payload,
)
from timebill.predictor.buckets import BucketSpec
from timebill.predictor.conformal import ConformalBound
from timebill.predictor.features import (
    DEFAULT_N_PROMPT_TOKENS,
    TARGET_BLOCKS,
    FeatureConfig,
    target_feature_row,
    truncate_head_tail,
)
from timebill.predictor.heads import Head, head_from_state, head_state

POINT_RULES = ("argmax", "median")


def identity(engine: object) -> dict:
    """The model identity a predictor file records (``ModelSource.model_id`` and ``fingerprint``)."""
    source = getattr(engine, "source", None)
    if source is None:
        raise PredictorError("The engine has no model source (identity); load it with Engine.load().")
    return {"model_id": source.model_id, "fingerprint": source.fingerprint}


def points_from_probs(probs: np.ndarray, class_lengths: np.ndarray, rule: str = "argmax") -> np.ndarray:
    """N̂ per row: the most probable class's length (paper), or the distribution's median class."""
    probs = np.atleast_2d(probs)
    if rule == "argmax":
        return np.asarray(class_lengths)[probs.argmax(-1)]
    if rule == "median":
        return np.asarray(class_lengths)[(np.cumsum(probs, -1) < 0.5).sum(-1).clip(max=probs.shape[1] - 1)]
    raise PredictorError(f"point rule must be one of {POINT_RULES}, got {rule!r}")


class TargetHeadPredictor(LengthPredictor):
    """A trained head over a causal LM's pooled hidden states; base of the RLP and the probe."""

    kind = "target-head"
    uses_prefill_hidden = False

    def __init__(
        self,
        engine: object,  # timebill.engine.Engine: the backbone (model, tokenizer, encode)
        head: Head,
        features: FeatureConfig,
        buckets: BucketSpec | None,  # None: regression head
        calibration: ConformalBound | None = None,
        n_prompt_tokens: int = DEFAULT_N_PROMPT_TOKENS,
        target: dict | None = None,  # identity of the model whose lengths were learned
        point_rule: str = "argmax",
        n_max: int | None = None,
        training: dict | None = None,  # provenance: label counts, command, history (saved, not used)
    ) -> None:
        self.engine = engine
        self.head = head
        self.features = features
        self.buckets = buckets
        self.calibration = calibration
        self.n_prompt_tokens = int(n_prompt_tokens)
        self.target = target or identity(engine)
        self.backbone = identity(engine)
        if point_rule not in POINT_RULES:
            raise PredictorError(f"point rule must be one of {POINT_RULES}, got {point_rule!r}")
        self.point_rule = point_rule
        cap = buckets.cap_tokens if buckets is not None else int(head.config.target_scale)
        self.cap_tokens = cap
        self.n_max = int(n_max or cap)
        self.training = training or {}
        hidden = int(engine.model.config.hidden_size)
        if head.config.in_dim != features.dim(hidden):
            raise PredictorError(
                f"The head reads {head.config.in_dim} features but this backbone gives "
                f"{features.dim(hidden)} (hidden size {hidden}): the file belongs to another backbone."
            )

    # ------------------------------------------------------------------ prediction
    def encode(self, prompt: str) -> list[int]:
        return self.engine.encode(prompt)

    @property
    def class_lengths(self) -> np.ndarray | None:
        return None if self.buckets is None else self.buckets.upper_edges(self.n_max)

    def predict_rows(self, rows: np.ndarray, prompt_tokens: np.ndarray) -> list[LengthPrediction]:
        """Predictions from target feature rows ``(n, len(TARGET_BLOCKS), hidden)`` (cached or live)."""
        return self.predict_vectors(self.features.vectors(rows, prompt_tokens))

    def predict_vectors(self, x: np.ndarray) -> list[LengthPrediction]:
        """Predictions from head inputs ``(n, features.dim(hidden))``."""
        return [self._prediction(o) for o in self.head.infer(x)]

    def _prediction(self, out: np.ndarray) -> LengthPrediction:
        if self.buckets is None:
            point = int(np.clip(np.rint(out), 1, self.n_max))
            return LengthPrediction(point, self.n_max, calibration=self.calibration)
        lengths = self.class_lengths
        point = int(points_from_probs(out, lengths, self.point_rule)[0])
        return LengthPrediction(point, self.n_max, out, lengths, self.calibration)

    def live_row(self, ids: Sequence[int]) -> np.ndarray:
        """Target feature row of ``ids`` as this predictor's input (truncated for the RLP)."""
        short = truncate_head_tail(ids, self.n_prompt_tokens) if self.features.source == "trunc" else ids
        return target_feature_row(self.engine.model, short)

    def predict_ids(self, ids: Sequence[int]) -> LengthPrediction:
        ids = check_ids(ids)
        return self.predict_rows(self.live_row(ids)[None], np.array([len(ids)]))[0]

    # ------------------------------------------------------------------ files
    def payload(self) -> dict:
        return {
            "kind": self.kind,
            "head": head_state(self.head),
            "features": self.features.to_dict(),
            "buckets": None
            if self.buckets is None
            else {"width": self.buckets.width, "cap_tokens": self.buckets.cap_tokens},
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "n_prompt_tokens": self.n_prompt_tokens,
            "point_rule": self.point_rule,
            "target": self.target,
            "backbone": self.backbone,
            "training": self.training,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        return save_payload(path, self.payload())

    @classmethod
    def from_payload(
        cls, payload: dict, engine: object, path: str | os.PathLike[str], target_engine: object | None = None
    ) -> TargetHeadPredictor:
        """Rebuild from a file's payload; ``engine`` is the backbone, ``target_engine`` the target
        (None: the backbone is the target). PredictorError on any mismatch or malformed field."""
        here = identity(engine)
        check_identity(path, "backbone", payload.get("backbone", {}), here["model_id"], here["fingerprint"])
        target_here = identity(target_engine) if target_engine is not None else here
        check_identity(path, "target", payload.get("target", {}), target_here["model_id"], target_here["fingerprint"])
        try:
            buckets = payload["buckets"]
            return cls(
                engine,
                head_from_state(payload["head"]),
                FeatureConfig.from_dict(payload["features"]),
                None if buckets is None else BucketSpec(int(buckets["width"]), int(buckets["cap_tokens"])),
                None if payload["calibration"] is None else ConformalBound.from_dict(payload["calibration"]),
                int(payload["n_prompt_tokens"]),
                dict(payload["target"]),
                str(payload.get("point_rule", "argmax")),
                training=dict(payload.get("training") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PredictorError(f"{path} is malformed ({type(exc).__name__}: {exc}); retrain it.") from exc

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], engine: object, target_engine: object | None = None
    ) -> TargetHeadPredictor:
        return cls.from_payload(load_payload(path, kinds=(cls.kind,)), engine, path, target_engine)


class RLPredictor(TargetHeadPredictor):
    """The paper's RLP: separate forward of the (frozen) backbone on the head+tail truncated prompt."""

    kind = "rlp"


__all__ = ["RLPredictor", "TargetHeadPredictor", "TARGET_BLOCKS", "points_from_probs", "identity"]
