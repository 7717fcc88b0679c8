"""``gemfilter``: the target model's own early layers pick what to keep (GemFilter, Shi et al. 2024).

GemFilter runs the first few layers of the LLM over the whole prompt, reads which prompt tokens the last
query tokens attend to at a filter layer, and then prefills the full model on the selected tokens only.
Here the attention is SnapKV's window attention (kvpress's ``SnapKVPress.compute_window_attention``: the
last ``window`` positions' queries against every earlier key, softmax, averaged over heads and window),
taken at layer ``layer`` during a forward that stops right after that layer's attention. A chunk's score is
its tokens' mean attention (a density, so the greedy token budget favours the chunks the model reads).

Differences from the paper, on purpose: selection is by chunk (sentence or line), not single tokens, so
the kept text stays readable and a needle sentence survives whole. The early-exit forward is the
compressor's whole cost (~44 % of a prefill at the default layer); ``benchmarks/prompt_compression.py``
measures whether it pays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from kvpress import SnapKVPress
from transformers import DynamicCache

from timebill.compression.base import Compressor
from timebill.compression.layout import PromptLayout
from timebill.errors import InvalidInputError

DEFAULT_WINDOW = 32
#: Filter layer as a fraction of the depth: 13 of 30 on SmolLM2-135M (the paper: 13 of 32 on Llama-3.1-8B).
#: Measured on 12 needle prompts at ρ = 0.5 (2026-12-03, Intel Xeon family 6 model 167): layer 5 kept
#: 9/12 needles, 9 kept 6/12, 13 kept 10/12, 19 kept 12/12 at ~¼ / ⅓ / ½ / ⅔ of a full prefill's time.
DEFAULT_DEPTH = 0.44


class _StopForward(Exception):
    """Raised by the filter layer's hook: nothing after it is needed."""


def _decoder_layers(model: Any) -> Any:
    inner = model.model.language_model if hasattr(model.model, "language_model") else model.model
    return inner.layers


@dataclass
class GemFilterCompressor(Compressor):
    """Scores chunks by the attention of the last ``window`` prompt positions at decoder layer ``layer``."""

    model: Any  # the engine's transformers causal LM
    layer: int | None = None  # 0-based filter layer; None = DEFAULT_DEPTH of the depth
    window: int = DEFAULT_WINDOW
    name = "gemfilter"

    def __post_init__(self) -> None:
        n_layers = len(_decoder_layers(self.model))
        if self.layer is None:
            self.layer = max(0, int(DEFAULT_DEPTH * n_layers))
        if not 0 <= int(self.layer) < n_layers:
            raise InvalidInputError(f"gemfilter layer must be in [0, {n_layers}), got {self.layer}")
        self.layer = int(self.layer)

    def warmup(self) -> None:
        self.token_scores(list(range(10, 10 + 2 * self.window)))

    @torch.inference_mode()
    def token_scores(self, ids: list[int]) -> np.ndarray:
        """Per-token attention mass from the last window's queries at the filter layer (window tokens: max)."""
        n = len(ids)
        window = min(self.window, n - 1)
        if window < 1:
            return np.ones(n)
        attention = _decoder_layers(self.model)[self.layer].self_attn
        box: dict[str, torch.Tensor] = {}

        def hook(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
            keys = kwargs["past_key_values"].layers[module.layer_idx].keys
            weights = SnapKVPress.compute_window_attention(
                module, kwargs["hidden_states"], keys, window, kwargs["position_embeddings"]
            )
            box["scores"] = weights.mean(dim=(0, 1, 2))  # (n - window,)
            raise _StopForward

        handle = attention.register_forward_hook(hook, with_kwargs=True)
        device = next(self.model.parameters()).device
        try:
            self.model(input_ids=torch.tensor([ids], device=device), past_key_values=DynamicCache(), use_cache=True)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if "scores" not in box:
            raise RuntimeError("gemfilter: the filter layer's attention never ran")
        scores = box["scores"].float().cpu().numpy()
        return np.concatenate([scores, np.full(window, scores.max() + 1.0 if scores.size else 1.0)])

    def score(self, layout: PromptLayout) -> np.ndarray:
        per_token = self.token_scores(list(layout.ids))
        return np.array([per_token[c.start : c.end].mean() for c in layout.chunks], dtype=np.float64)
