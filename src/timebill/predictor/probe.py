"""Zero-overhead length probe (beyond the paper): a head on the target's own last prompt-token state.

The target's prefill computes the final-norm hidden state of every prompt token anyway; with
``Engine.prefill(..., capture_hidden=True)`` a forward hook keeps the last one
(``state.last_hidden``). A trained head on that vector predicts the length for the cost of
one small matrix product — no second model, nothing beside the prefill on the critical path, and it
reads the *whole* prompt (no truncation). Its price: it needs the prefill to have run (the facade's
``probe`` arrangement), and it only exists for the model it was trained on.

Same head, buckets, conformal bound and file format as the RLP (:class:`TargetHeadPredictor`); the
features are the ``full``-prompt ``last`` block, which is exactly what the engine's hook captures.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from timebill.errors import PredictorError
from timebill.predictor.base import LengthPrediction, check_ids
from timebill.predictor.rlp import TargetHeadPredictor


class ProbePredictor(TargetHeadPredictor):
    kind = "probe"
    uses_prefill_hidden = True

    def predict_hidden(
        self, last_hidden: torch.Tensor | np.ndarray, prompt_tokens: int | None = None
    ) -> LengthPrediction:
        """Predict from the hidden state the engine's prefill captured (``state.last_hidden``)."""
        if self.features.blocks != ("last",) or self.features.source != "full":
            raise PredictorError("This probe reads more than the last hidden state; use predict_ids().")
        if self.features.log_prompt_tokens and prompt_tokens is None:
            raise PredictorError("This probe also reads the prompt length: pass prompt_tokens.")
        x = torch.as_tensor(last_hidden).detach().float().cpu().numpy().reshape(1, -1)
        if self.features.log_prompt_tokens:
            x = np.concatenate([x, np.log1p(np.array([[prompt_tokens]], dtype=np.float32))], axis=1)
        return self.predict_vectors(x)[0]

    def predict_state(self, state: object) -> LengthPrediction:
        """Predict from a :class:`~timebill.engine.PrefillState` made with ``capture_hidden=True``."""
        hidden = getattr(state, "last_hidden", None)
        if hidden is None:
            raise PredictorError("The prefill did not capture the last hidden state: pass capture_hidden=True.")
        return self.predict_hidden(hidden, state.prompt_tokens)

    def predict_ids(self, ids: Sequence[int]) -> LengthPrediction:
        """Standalone use: runs the target's prefill (the facade instead reuses its own prefill)."""
        ids = check_ids(ids)
        state = self.engine.prefill(ids, capture=False, capture_hidden=True)
        return self.predict_state(state)
