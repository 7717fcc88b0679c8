"""A fast decode step for Llama-family models on CPU: static KV cache, fused weights, no per-step rebuilding.

Why: HF's decode step rebuilds masks, position tensors and cache bookkeeping every token and walks
~10 Python modules per layer; on a 135M model that overhead is as large as the arithmetic. Decode
is memory-bound, so the other lever is bytes per token: optional weight-only int8 linears.

What stays the same as HF (so α = 0 in fp32 gives the same greedy tokens, which tests pin):
the same RMSNorm arithmetic (fp32, ``x * rsqrt(mean(x²) + eps) * w``), the same RoPE tables (taken
from the model's own rotary embedding), the same attention kernel (``scaled_dot_product_attention``
with grouped-query heads), and the same weights. Prefill and eviction still run through the HF model
and kvpress; this module only takes the resulting (compressed) cache and decodes from it.

Layout (gpt-fast style): one preallocated buffer per K and V, shaped
``[layers, kv_heads, capacity, head_dim]``; a decode step writes one slot per layer and attends over
``[:length]``. Capacity overflow raises :class:`~timebill.errors.CacheCapacityError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from kvpress.utils import compute_n_kept
from torch import nn

from timebill.errors import CacheCapacityError

logger = logging.getLogger(__name__)

WEIGHT_MODES = ("fp32", "int8")


class FastPathUnsupported(Exception):
    """The model's architecture is not one the fast path implements; the engine falls back to HF."""


@dataclass
class _Linear:
    """A weight in the chosen storage: an fp32 matrix, or fbgemm-packed int8 with per-channel scales."""

    weight: Any  # torch.Tensor (fp32) or fbgemm's packed int8 LinearPackedParams

    @classmethod
    def make(cls, weight: torch.Tensor, mode: str) -> _Linear:
        weight = weight.detach().contiguous()
        if mode == "fp32":
            return cls(weight.float())
        # Weight-only storage is int8, symmetric per output channel; fbgemm's dynamic linear quantises
        # the activation row on the fly and runs an int8 GEMV (AVX512-VNNI here). Measured on this
        # machine, it is 3-5x faster than an fp32 GEMV of the same shape and far faster than
        # aten._weight_int8pack_mm, whose M=1 CPU kernel is slower than fp32.
        scales = (weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0).double()
        zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
        q = torch.quantize_per_channel(weight.float(), scales, zero_points, axis=0, dtype=torch.qint8)
        return cls(torch.ops.quantized.linear_prepack(q, None))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.weight, torch.Tensor):
            return F.linear(x, self.weight)
        return torch.ops.quantized.linear_dynamic(x, self.weight, True)


class StaticKVCache:
    """Preallocated K/V for all layers; ``length`` tokens are valid (the same count in every layer)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype) -> None:
        self.capacity = capacity
        self.k = torch.zeros(layers, kv_heads, capacity, head_dim, dtype=dtype)
        self.v = torch.zeros(layers, kv_heads, capacity, head_dim, dtype=dtype)
        self.length = 0

    def load(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Copy per-layer ``[1, kv_heads, n, head_dim]`` tensors (an HF cache after eviction) in."""
        n = int(keys[0].shape[2])
        if n > self.capacity:
            raise CacheCapacityError(f"KV cache capacity {self.capacity} tokens is smaller than the {n} to load.")
        for i, (k, v) in enumerate(zip(keys, values, strict=True)):
            if k.shape[2] != n:
                raise CacheCapacityError("The fast path needs the same KV length in every layer.")
            self.k[i, :, :n].copy_(k[0])
            self.v[i, :, :n].copy_(v[0])
        self.length = n

    def as_layers(self) -> SimpleNamespace:
        """A view shaped like an HF cache (``.layers[i].keys`` as ``[1, heads, length, dim]``) for scoring."""
        n = self.length
        return SimpleNamespace(
            layers=[
                SimpleNamespace(keys=self.k[i, :, :n].unsqueeze(0), values=self.v[i, :, :n].unsqueeze(0))
                for i in range(self.k.shape[0])
            ]
        )

    def evict_prompt(
        self, scores: dict[int, torch.Tensor], prompt_len: int, alpha: float
    ) -> tuple[int, dict[int, torch.Tensor]]:
        """Keep the top ``(1-α)`` of the first ``prompt_len`` slots per layer/head by ``scores`` (kvpress's
        ScorerPress rule and ``compute_n_kept`` count); generated tokens stay. Returns (kept, kept scores)."""
        n_kept = compute_n_kept(prompt_len, alpha)
        layers = sorted(scores)
        if len(layers) != self.k.shape[0]:
            raise ValueError("scores must cover every layer")
        top = [scores[i].topk(n_kept, dim=-1).indices[0] for i in layers]  # each [heads, n_kept]
        self.keep(torch.stack(top), prompt_len)
        kept_scores = {i: scores[i].gather(-1, t.unsqueeze(0)) for i, t in zip(layers, top, strict=True)}
        return n_kept, kept_scores

    def keep(self, layer_indices: torch.Tensor, prompt_len: int) -> None:
        """Compact the cache: per layer and head keep ``layer_indices[l, h, :]`` of the first ``prompt_len``
        slots (in that order), followed by every slot after ``prompt_len`` (generated tokens)."""
        n_keep = int(layer_indices.shape[-1])
        tail = self.length - prompt_len
        idx = layer_indices.unsqueeze(-1).expand(-1, -1, -1, self.k.shape[-1])
        new_k = self.k[:, :, :prompt_len].gather(2, idx)
        new_v = self.v[:, :, :prompt_len].gather(2, idx)
        if tail > 0:
            tail_k = self.k[:, :, prompt_len : self.length].clone()
            tail_v = self.v[:, :, prompt_len : self.length].clone()
            self.k[:, :, n_keep : n_keep + tail].copy_(tail_k)
            self.v[:, :, n_keep : n_keep + tail].copy_(tail_v)
        self.k[:, :, :n_keep].copy_(new_k)
        self.v[:, :, :n_keep].copy_(new_v)
        self.length = n_keep + tail


class FastDecoder:
    """Decode-step implementation for Llama-like HF models (Llama, SmolLM, Mistral, Qwen2 without bias)."""

    def __init__(self, model: nn.Module, weights: str = "fp32") -> None:
        if weights not in WEIGHT_MODES:
            raise ValueError(f"weights must be one of {WEIGHT_MODES}, got {weights!r}")
        cfg = model.config
        supported = getattr(cfg, "model_type", "") in {"llama", "mistral"}
        if not supported:
            raise FastPathUnsupported(f"model_type {getattr(cfg, 'model_type', '?')!r} is not implemented")
        if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
            raise FastPathUnsupported("attention/MLP biases are not implemented")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise FastPathUnsupported(f"activation {cfg.hidden_act!r} is not implemented")
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise FastPathUnsupported(f"rope_type {rope.get('rope_type')!r} is not implemented")
        if getattr(cfg, "sliding_window", None):
            raise FastPathUnsupported("sliding-window attention is not implemented")
        param = next(model.parameters())
        if param.dtype != torch.float32 or param.device.type != "cpu":
            raise FastPathUnsupported(f"the fast path runs fp32 on CPU (model is {param.dtype} on {param.device})")

        inner = model.model
        self.weights = weights
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hidden = cfg.hidden_size
        self.inter = cfg.intermediate_size
        self.eps = float(cfg.rms_norm_eps)
        self.max_positions = int(cfg.max_position_embeddings)
        self.q_size = self.n_heads * self.head_dim
        self.kv_size = self.n_kv * self.head_dim

        self.embed = inner.embed_tokens.weight.detach()
        self.final_norm = inner.norm.weight.detach()
        self.lm_head = _Linear.make(model.lm_head.weight, weights)
        self.layers = []
        for layer in inner.layers:
            att, mlp = layer.self_attn, layer.mlp
            qkv = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight], dim=0)
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)
            self.layers.append(
                (
                    layer.input_layernorm.weight.detach(),
                    _Linear.make(qkv, weights),
                    _Linear.make(att.o_proj.weight, weights),
                    layer.post_attention_layernorm.weight.detach(),
                    _Linear.make(gate_up, weights),
                    _Linear.make(mlp.down_proj.weight, weights),
                )
            )
        # RoPE tables from the model's own rotary module, so values match HF bit for bit.
        with torch.no_grad():
            positions = torch.arange(self.max_positions).unsqueeze(0)
            cos, sin = inner.rotary_emb(self.embed[:1].unsqueeze(0), positions)
        self.cos = cos[0].contiguous()  # [max_positions, head_dim]
        self.sin = sin[0].contiguous()
        # Lean-step tables: rotate_half(x) * sin == roll(x, half) * signed_sin, one op fewer per use.
        half = self.head_dim // 2
        self.signed_sin = torch.cat([-self.sin[:, :half], self.sin[:, half:]], dim=-1).contiguous()
        # int8 mode has no bit-exactness to keep, so it takes the step with fewer, fused ops.
        self.step = self._step_lean if weights == "int8" else self._step_exact

    # --------------------------------------------------------------- cache management
    def new_cache(self, keys: list[torch.Tensor], values: list[torch.Tensor], capacity: int) -> StaticKVCache:
        """Allocate a cache of ``capacity`` tokens and load the (evicted) prefill KV into it."""
        cache = StaticKVCache(self.n_layers, self.n_kv, self.head_dim, capacity, torch.float32)
        cache.load(keys, values)
        return cache

    # --------------------------------------------------------------- the step
    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return weight * (x * torch.rsqrt(variance + self.eps))

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def _check_room(self, cache: StaticKVCache) -> int:
        n = cache.length
        if n >= cache.capacity:
            raise CacheCapacityError(
                f"KV cache full ({cache.capacity} tokens): allocate more capacity (max_new_tokens) for this request."
            )
        return n

    @torch.inference_mode()
    def _step_lean(self, cache: StaticKVCache, token: int, position: int) -> torch.Tensor:
        """The int8 step: fused RMSNorm, RoPE on q and k at once, attention as two small batched matmuls
        (for one query, cheaper than SDPA's kernel set-up), the softmax scale folded into the query."""
        n = self._check_room(cache)
        hd, nkv = self.head_dim, self.n_kv
        groups = self.n_heads // nkv
        half = hd // 2
        n_qk = self.n_heads + nkv
        cos, sin = self.cos[position], self.signed_sin[position]
        scale = hd**-0.5
        x = self.embed[token].view(1, self.hidden)
        eps, shape = self.eps, (self.hidden,)
        for i, (w_in, qkv_w, o_w, w_post, gu_w, down_w) in enumerate(self.layers):
            qkv = qkv_w(F.rms_norm(x, shape, w_in, eps))
            qk = qkv[0, : self.q_size + self.kv_size].view(n_qk, hd)
            qk = torch.addcmul(qk * cos, qk.roll(half, -1), sin)
            cache.k[i, :, n] = qk[self.n_heads :]
            cache.v[i, :, n] = qkv[0, self.q_size + self.kv_size :].view(nkv, hd)
            q = qk[: self.n_heads].view(nkv, groups, hd)
            scores = torch.bmm(q, cache.k[i, :, : n + 1].transpose(1, 2)).mul_(scale)
            attn = torch.bmm(torch.softmax(scores, dim=-1), cache.v[i, :, : n + 1])
            x = x + o_w(attn.view(1, self.q_size))
            gu = gu_w(F.rms_norm(x, shape, w_post, eps))
            x = x + down_w(F.silu(gu[:, : self.inter]) * gu[:, self.inter :])
        cache.length = n + 1
        return self.lm_head(F.rms_norm(x, shape, self.final_norm, eps))[0]

    @torch.inference_mode()
    def _step_exact(self, cache: StaticKVCache, token: int, position: int) -> torch.Tensor:
        """One token through all layers with HF's exact arithmetic; appends its K/V to ``cache``; returns
        the logits ``[vocab]``."""
        n = self._check_room(cache)
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv
        cos = self.cos[position]
        sin = self.sin[position]
        x = self.embed[token].view(1, self.hidden)
        for i, (w_in, qkv_w, o_w, w_post, gu_w, down_w) in enumerate(self.layers):
            h = self._rms(x, w_in)
            qkv = qkv_w(h)
            q = qkv[:, : self.q_size].view(nh, hd)
            k = qkv[:, self.q_size : self.q_size + self.kv_size].view(nkv, hd)
            v = qkv[:, self.q_size + self.kv_size :].view(nkv, hd)
            q = q * cos + self._rotate_half(q) * sin
            k = k * cos + self._rotate_half(k) * sin
            cache.k[i, :, n] = k
            cache.v[i, :, n] = v
            attn = F.scaled_dot_product_attention(
                q.view(1, nh, 1, hd),
                cache.k[i, :, : n + 1].unsqueeze(0),
                cache.v[i, :, : n + 1].unsqueeze(0),
                scale=hd**-0.5,
                enable_gqa=True,
            )
            x = x + o_w(attn.view(1, self.q_size))
            h = self._rms(x, w_post)
            gate, up = gu_w(h).chunk(2, dim=-1)
            x = x + down_w(F.silu(gate) * up)
        cache.length = n + 1
        return self.lm_head(self._rms(x, self.final_norm))[0]
