"""KV-cache eviction through kvpress, split into *score at prefill* and *evict later*.

kvpress applies a press as forward hooks during prefill with a compression ratio fixed up front.
TimeBill cannot do that: the eviction ratio α* is only known *after* prefill (the planner needs
the predicted length, which is computed in parallel with prefill). So we reuse kvpress's scoring
(``press.score``) and its pruning (``ScorerPress.compress``: top-k by score, gather per KV head)
but separate them in time:

1. :func:`capture_scores` registers kvpress's own hook mechanism during prefill and records, per
   layer, each prompt token's importance score (SnapKV needs the prefill's hidden states of the
   observation window, which only exist during prefill).
2. :func:`evict` later prunes a fraction α of the *prompt* part of the cache, possibly several
   times (closed-loop re-planning evicts more mid-decode); generated tokens are never evicted.

Presses whose scores depend only on the cached keys (KNorm, StreamingLLM) are scored at eviction
time, so prefill pays nothing for them.

Pinned SnapKV settings: observation window 32 tokens, average pooling kernel 5 — the original
SnapKV paper's values (kvpress defaults to a 64-token window). The smaller window matters on short
chat prompts, where the window would otherwise be most of the prompt and SnapKV could not evict.
Prompts no longer than the window use a window of ``n_x - 1`` tokens.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from kvpress import BasePress, KnormPress, ScorerPress, SnapKVPress, StreamingLLMPress
from kvpress.utils import compute_n_kept
from torch import nn
from transformers import Cache

from timebill.options import check_press

SNAPKV_WINDOW = 32
SNAPKV_KERNEL = 5
STREAMING_SINKS = 4


def make_press(name: str) -> ScorerPress:
    """Build the kvpress press behind one of our press names (settings pinned here, documented above)."""
    if name == "snapkv":
        return SnapKVPress(window_size=SNAPKV_WINDOW, kernel_size=SNAPKV_KERNEL)
    if name == "streaming":
        return StreamingLLMPress(n_sink=STREAMING_SINKS)
    if check_press(name) == "knorm":
        return KnormPress()
    raise AssertionError(f"press {name!r} is in PRESS_NAMES but has no builder")


def scores_need_prefill(press: ScorerPress) -> bool:
    """Whether the press's scores need prefill activations (True) or only the cached keys (False)."""
    return isinstance(press, SnapKVPress)


@dataclass
class _ScoreRecorder(BasePress):
    """A kvpress press that records ``inner.score`` per layer and leaves the cache untouched."""

    inner: ScorerPress = field(default_factory=SnapKVPress)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    owner: int | None = None  # the thread whose prefill is recorded

    def forward_hook(self, module, input, kwargs, output):  # noqa: ANN001, ANN201 - torch hook API
        """kvpress's hook, for the owner thread's cached forwards only.

        Hooks live on the (shared) modules, not on a thread: when the paper's RLP runs on the same
        backbone in a thread beside the prefill (the ``parallel`` arrangement), its forward passes
        through these hooks too and must neither be recorded nor touch a cache it does not have.
        """
        if (self.owner is not None and threading.get_ident() != self.owner) or kwargs.get("past_key_values") is None:
            return output
        return super().forward_hook(module, input, kwargs, output)

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):  # noqa: ANN001 - kvpress API
        q_len = hidden_states.shape[1]
        inner = self.inner
        if isinstance(inner, SnapKVPress) and q_len <= inner.window_size:
            if q_len < 2:
                return keys, values  # nothing to score against: the token is kept
            inner = dataclasses.replace(inner, window_size=q_len - 1)
        self.scores[module.layer_idx] = inner.score(module, hidden_states, keys, values, attentions, kwargs)
        return keys, values


@contextmanager
def capture_scores(model: nn.Module, press: ScorerPress) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, a prefill forward records per-layer scores into the yielded dict."""
    recorder = _ScoreRecorder(inner=press, owner=threading.get_ident())
    with recorder(model):
        yield recorder.scores


@dataclass
class _StoredScores(ScorerPress):
    """Lets kvpress's own ``ScorerPress.compress`` prune with scores computed earlier."""

    stored: dict[int, torch.Tensor] = field(default_factory=dict)

    def score(self, module, hidden_states, keys, values, attentions, kwargs):  # noqa: ANN001 - kvpress API
        return self.stored[module.layer_idx]


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    inner = model.model.language_model if hasattr(model.model, "language_model") else model.model
    return [layer.self_attn for layer in inner.layers]


def score_from_cache(
    model: nn.Module, press: ScorerPress, cache: Cache, prompt_len: int, alpha: float
) -> dict[int, torch.Tensor]:
    """Scores for key-only presses (KNorm, StreamingLLM), computed from the cached prompt keys."""
    press = dataclasses.replace(press, compression_ratio=alpha)
    scores: dict[int, torch.Tensor] = {}
    for module in _attention_modules(model):
        layer = cache.layers[module.layer_idx]
        keys = layer.keys[:, :, :prompt_len]
        if isinstance(press, StreamingLLMPress) and keys.shape[2] <= press.n_sink:
            scores[module.layer_idx] = torch.ones_like(keys[..., 0])
            continue
        scores[module.layer_idx] = press.score(module, None, keys, layer.values[:, :, :prompt_len], None, {})
    return scores


def evict(
    model: nn.Module, cache: Cache, scores: dict[int, torch.Tensor], prompt_kv_len: int, alpha: float
) -> tuple[int, dict[int, torch.Tensor]]:
    """Keep the top ``(1-α)`` share of the first ``prompt_kv_len`` cached tokens in every layer.

    ``scores[layer]`` scores exactly those ``prompt_kv_len`` tokens. Tokens after them (generated
    ones) are kept as they are. Returns ``(new_prompt_kv_len, kept_scores)`` so that a later call
    can evict further from what is left. Keys already carry RoPE, so reordering them is harmless:
    a decode step attends to every cached token with no positional mask.
    """
    if alpha <= 0.0 or prompt_kv_len == 0:
        return prompt_kv_len, scores
    pruner = _StoredScores(compression_ratio=alpha, stored={})
    kept_scores: dict[int, torch.Tensor] = {}
    new_len = prompt_kv_len
    for module in _attention_modules(model):
        idx = module.layer_idx
        layer = cache.layers[idx]
        if idx not in scores:
            continue
        keys, values = layer.keys, layer.values
        prompt_k, prompt_v = keys[:, :, :prompt_kv_len], values[:, :, :prompt_kv_len]
        pruner.stored = {idx: scores[idx]}
        new_k, new_v = pruner.compress(module, None, prompt_k, prompt_v, None, {})
        n_kept = compute_n_kept(prompt_kv_len, alpha)
        top = scores[idx].topk(n_kept, dim=-1).indices  # same selection compress() made
        kept_scores[idx] = scores[idx].gather(-1, top)
        layer.keys = torch.cat([new_k, keys[:, :, prompt_kv_len:]], dim=2) if keys.shape[2] > prompt_kv_len else new_k
        layer.values = (
            torch.cat([new_v, values[:, :, prompt_kv_len:]], dim=2) if values.shape[2] > prompt_kv_len else new_v
        )
        new_len = n_kept
    return new_len, kept_scores
