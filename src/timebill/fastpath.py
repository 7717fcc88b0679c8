"""A fast decode step for Llama-family and Qwen2/Qwen3 models on CPU: static KV cache, fused weights, no
per-step rebuilding.

Why: HF's decode step rebuilds masks, position tensors and cache bookkeeping every token and walks
~10 Python modules per layer; on a 135M model that overhead is as large as the arithmetic. So the
step is one module written in the TorchScript subset and scripted (its ~25 ops per layer run in
TorchScript's interpreter, not Python; eager if scripting fails). Decode is memory-bound, so the
other lever is bytes per token: optional int8 (fbgemm) or int4 (the GGUF's own Q4_1 blocks) weights.

What stays the same as HF in fp32 (so α = 0 gives the same greedy tokens, which tests pin):
the same RMSNorm arithmetic (fp32, ``x * rsqrt(mean(x²) + eps) * w``), the same RoPE tables (taken
from the model's own rotary embedding), the same attention kernel (``scaled_dot_product_attention``
with grouped-query heads), and the same weights. Prefill and eviction still run through the HF model
and kvpress; this module only takes the resulting (compressed) cache and decodes from it.

Architectures (:data:`MODEL_TYPES`): Llama/SmolLM/Mistral, Qwen2 and Qwen3 share one decoder layer
(RMSNorm, RoPE, grouped-query attention, SwiGLU MLP); what differs is handled by flags, not copies:
Qwen2's q/k/v biases (added with HF's own ``F.linear(x, W, b)``, so fp32 stays bit-exact), Qwen3's
per-head RMSNorm of q and k before RoPE, an explicit ``head_dim``, and an untied LM head (read from
``lm_head`` either way). Sliding-window attention is refused (:class:`FastPathUnsupported`, so the
engine falls back to HF) only where a layer uses it: Qwen configs carry ``sliding_window`` but apply
it only with ``use_sliding_window`` (``layer_types`` in transformers 5 says which layers).

Layout (gpt-fast style): one preallocated buffer per K and V, shaped
``[layers, kv_heads, capacity, head_dim]`` (bf16 in the quantised modes where the CPU has native
bf16); a decode step writes one slot per layer and attends over ``[:length]``. Capacity overflow
raises :class:`~timebill.errors.CacheCapacityError`.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from kvpress.utils import compute_n_kept
from torch import nn

from timebill.errors import CacheCapacityError

logger = logging.getLogger(__name__)

WEIGHT_MODES = ("fp32", "int8", "int4")
# HF ``model_type`` values whose decoder layer the steps below implement (see the module docstring).
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class FastPathUnsupported(Exception):
    """The model's architecture is not one the fast path implements; the engine falls back to HF."""


def _weight(weight: torch.Tensor, mode: str) -> Any:
    """A matmul weight in the chosen storage: an fp32 matrix, or fbgemm-packed int8 with per-channel scales.

    Weight-only storage is int8, symmetric per output channel; fbgemm's dynamic linear quantises the
    activation row on the fly and runs an int8 GEMV (AVX512-VNNI here). Measured on this machine it
    is 3-5x faster than an fp32 GEMV of the same shape and far faster than
    ``aten._weight_int8pack_mm`` (whose M=1 CPU kernel is slower than fp32) or
    ``aten._weight_int4pack_mm_for_cpu`` with fp32 activations.
    """
    weight = weight.detach().contiguous().float()
    if mode == "fp32":
        return weight
    if mode == "int4":
        return _int4_groups(weight)
    scales = (weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0).double()
    zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated, fbgemm's kernels are not yet replaced
        warnings.filterwarnings("ignore", message=".*quantize_per.*deprecated", category=UserWarning)
        q = torch.quantize_per_channel(weight, scales, zero_points, axis=0, dtype=torch.qint8)
    return torch.ops.quantized.linear_prepack(q, None)


INT4_GROUP = 32
INT4_N_MULTIPLE = 16  # ``_convert_weight_to_int4pack_for_cpu`` packs output channels in blocks of 16


def _int4_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed int4 weight, [K/32, N, 2] bf16 scales and zeros) for ``_weight_int4pack_mm_for_cpu``.

    Per group of 32 inputs: ``w = (q - 8) * scale + zero`` with ``scale = (max - min) / 15`` and
    ``zero = min + 8 * scale``. For Q4_1 weights (``w = d*q + m``, where llama.cpp's quantiser puts
    the block's min at q = 0 and its max at q = 15) this recovers ``q``, ``d`` and ``m`` exactly.
    """
    out_f, in_f = weight.shape
    if in_f % INT4_GROUP:
        raise FastPathUnsupported(f"int4 needs input sizes divisible by {INT4_GROUP}, got {in_f}")
    if out_f % INT4_N_MULTIPLE:  # the CPU packing kernel's own limit (it raises an opaque RuntimeError)
        raise FastPathUnsupported(f"int4 needs output sizes divisible by {INT4_N_MULTIPLE}, got {out_f}")
    groups = weight.view(out_f, in_f // INT4_GROUP, INT4_GROUP)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((groups - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(out_f, in_f)
    scales_zeros = torch.stack([scale, lo + 8 * scale], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), scales_zeros


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
        """A view shaped like an HF cache (``.layers[i].keys`` as ``[1, heads, length, dim]``, fp32) for scoring."""
        n = self.length
        return SimpleNamespace(
            layers=[
                SimpleNamespace(
                    keys=self.k[i, :, :n].unsqueeze(0).float(), values=self.v[i, :, :n].unsqueeze(0).float()
                )
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


@dataclass(frozen=True)
class _Layer:
    """One decoder layer as the step modules read it; matmul weights in the mode's storage (:func:`_weight`)."""

    w_in: torch.Tensor  # input RMSNorm weight
    qkv: Any  # q | k | v projections stacked by output: one matmul instead of three
    o: Any
    w_post: torch.Tensor  # post-attention RMSNorm weight
    gate_up: Any  # gate | up stacked
    down: Any
    qkv_bias: torch.Tensor | None = None  # q | k | v biases (Qwen2), fp32
    q_norm: torch.Tensor | None = None  # per-head RMSNorm weights of q and k before RoPE (Qwen3), [head_dim]
    k_norm: torch.Tensor | None = None


def _optional(values: list[torch.Tensor | None], what: str) -> tuple[bool, list[torch.Tensor]]:
    """(present, per-layer tensors) for a weight some architectures have (a bias, a q/k norm).

    The steps keep a plain list attribute (empty when absent) and a flag in ``__constants__``: TorchScript
    then compiles the branch for an absent weight away: a Llama step's graph has no trace of Qwen's extras.
    """
    present = [v is not None for v in values]
    if any(present) and not all(present):
        raise FastPathUnsupported(f"{what} in only some layers is not implemented")
    return all(present) and bool(values), [v for v in values if v is not None]


class _Step(nn.Module):
    """What both steps share: the model's shapes, embedding, RoPE tables and the optional per-layer weights."""

    __constants__ = ["has_qkv_bias", "has_qk_norm"]

    def __init__(self, dec: FastDecoder, layers: list[_Layer], lm_head: Any) -> None:
        super().__init__()
        self.n_layers = len(layers)
        self.lm_head = lm_head
        self.embed, self.cos = dec.embed, dec.cos
        self.n_heads, self.n_kv, self.head_dim, self.hidden = dec.n_heads, dec.n_kv, dec.head_dim, dec.hidden
        self.q_size, self.kv_size, self.inter, self.eps = dec.q_size, dec.kv_size, dec.inter, dec.eps
        self.has_qkv_bias, self.qkv_bias = _optional([x.qkv_bias for x in layers], "a q/k/v bias")
        self.has_qk_norm, self.q_norm = _optional([x.q_norm for x in layers], "a q/k norm")
        self.k_norm = _optional([x.k_norm for x in layers], "a q/k norm")[1]


class _ExactStep(_Step):
    """The fp32 step with HF's exact arithmetic (bit-for-bit the same greedy tokens as HF).

    Written in the TorchScript subset: :class:`FastDecoder` scripts it, which runs the ~25 small ops
    per layer in TorchScript's C++ interpreter instead of Python (measured here: a third of the step
    time on a 135M model); if scripting fails, the same module runs eagerly. The q/k/v bias goes into
    the fused projection's ``F.linear`` (one ``addmm``, as HF's three ``nn.Linear`` each do): each
    output element is the same dot product plus the same bias, so the bits match HF's.
    """

    def __init__(self, dec: FastDecoder, layers: list[_Layer], lm_head: torch.Tensor) -> None:
        super().__init__(dec, layers, lm_head)
        self.w_in = [x.w_in for x in layers]
        self.qkv = [x.qkv for x in layers]
        self.o = [x.o for x in layers]
        self.w_post = [x.w_post for x in layers]
        self.gate_up = [x.gate_up for x in layers]
        self.down = [x.down for x in layers]
        self.final_norm, self.sin = dec.final_norm, dec.sin

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return weight * (x * torch.rsqrt(variance + self.eps))

    def _rotate_half(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def forward(self, k: torch.Tensor, v: torch.Tensor, token: int, position: int, n: int) -> torch.Tensor:
        """Feed ``token`` at ``position`` with ``n`` valid cache slots; writes slot ``n``; returns logits."""
        hd, nh, nkv, qs, kvs = self.head_dim, self.n_heads, self.n_kv, self.q_size, self.kv_size
        cos, sin = self.cos[position], self.sin[position]
        x = self.embed[token].view(1, self.hidden)
        for i in range(self.n_layers):
            h = self._rms(x, self.w_in[i])
            if self.has_qkv_bias:
                qkv = F.linear(h, self.qkv[i], self.qkv_bias[i])
            else:
                qkv = F.linear(h, self.qkv[i])
            q = qkv[:, :qs].view(nh, hd)
            kk = qkv[:, qs : qs + kvs].view(nkv, hd)
            if self.has_qk_norm:
                q = self._rms(q, self.q_norm[i])
                kk = self._rms(kk, self.k_norm[i])
            q = q * cos + self._rotate_half(q) * sin
            k[i, :, n] = kk * cos + self._rotate_half(kk) * sin
            v[i, :, n] = qkv[:, qs + kvs :].view(nkv, hd)
            attn = F.scaled_dot_product_attention(
                q.view(1, nh, 1, hd),
                k[i, :, : n + 1].unsqueeze(0),
                v[i, :, : n + 1].unsqueeze(0),
                scale=float(hd) ** -0.5,
                enable_gqa=True,
            )
            x = x + F.linear(attn.view(1, qs), self.o[i])
            gate, up = F.linear(self._rms(x, self.w_post[i]), self.gate_up[i]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, self.down[i])
        return F.linear(self._rms(x, self.final_norm), self.lm_head)[0]


class _LeanStep(_Step):
    """The quantised (int8) step: fewest ops per layer, since quantised weights have no bit-exactness to keep.

    - RMSNorm as ``normalize(x) * (w·√d)``: two ops instead of eight (eps only matters for a residual
      stream with rms below ~3e-3, which never occurs); Qwen3's per-head q/k norms the same way, one
      ``normalize`` over all q and k heads with their weights stacked.
    - RoPE for all query and key heads as one 64×64 matmul per layer (the rotation matrix is built once
      per step), instead of multiply, roll and add.
    - The q/k/v bias (Qwen2) added after the projection, the same for both quantised kernels.
    - The KV cache in ``kv_dtype`` (bfloat16 where the CPU has native bf16): attention over a long
      prompt is a read of the whole cache every step, and SDPA's bf16 kernel reads half the bytes.
    Scripted like :class:`_ExactStep`.
    """

    def __init__(self, dec: FastDecoder, layers: list[_Layer], lm_head: Any) -> None:
        super().__init__(dec, layers, lm_head)
        root_d = float(dec.hidden) ** 0.5
        self.w_in = [x.w_in * root_d for x in layers]
        self.w_post = [x.w_post * root_d for x in layers]
        # Layer i's linears are lin[4i] (qkv), lin[4i+1] (o), lin[4i+2] (gate|up), lin[4i+3] (down).
        self.lin = [w for x in layers for w in (x.qkv, x.o, x.gate_up, x.down)]
        self.final_norm = dec.final_norm * root_d
        root_hd = float(dec.head_dim) ** 0.5
        self.qk_norm = [  # [heads + kv_heads, head_dim]: q's weight for each query head, then k's for each kv head
            torch.cat([q.expand(dec.n_heads, -1), k.expand(dec.n_kv, -1)]) * root_hd
            for q, k in zip(self.q_norm, self.k_norm, strict=True)
        ]
        half = dec.head_dim // 2
        self.signed_sin = torch.cat([-dec.sin[:, :half], dec.sin[:, half:]], dim=-1).contiguous()
        self.roll = torch.roll(torch.eye(dec.head_dim), half, 1)  # x @ roll == torch.roll(x, half, -1)

    def _linear(self, x: torch.Tensor, j: int) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.lin[j], True)

    def forward(self, k: torch.Tensor, v: torch.Tensor, token: int, position: int, n: int) -> torch.Tensor:
        """Same contract as :meth:`_ExactStep.forward`."""
        hd, nh, nkv, qs, kvs, inter = self.head_dim, self.n_heads, self.n_kv, self.q_size, self.kv_size, self.inter
        rot = torch.diag(self.cos[position]) + self.roll * self.signed_sin[position]
        x = self.embed[token].view(1, self.hidden)
        for i in range(self.n_layers):
            qkv = self._linear(F.normalize(x) * self.w_in[i], 4 * i)
            if self.has_qkv_bias:
                qkv = qkv + self.qkv_bias[i]
            qk = qkv[0, : qs + kvs].view(nh + nkv, hd)
            if self.has_qk_norm:
                qk = F.normalize(qk, dim=-1) * self.qk_norm[i]
            qk = torch.mm(qk, rot)
            k[i, :, n] = qk[nh:]
            v[i, :, n] = qkv[0, qs + kvs :].view(nkv, hd)
            attn = F.scaled_dot_product_attention(
                qk[:nh].view(1, nh, 1, hd).to(k.dtype),
                k[i, :, : n + 1].unsqueeze(0),
                v[i, :, : n + 1].unsqueeze(0),
                scale=float(hd) ** -0.5,
                enable_gqa=True,
            )
            x = x + self._linear(attn.view(1, qs).float(), 4 * i + 1)
            gu = self._linear(F.normalize(x) * self.w_post[i], 4 * i + 2)
            x = x + self._linear(F.silu(gu[:, :inter]) * gu[:, inter:], 4 * i + 3)
        return torch.ops.quantized.linear_dynamic(F.normalize(x) * self.final_norm, self.lm_head, True)[0]


class _Int4Step(_LeanStep):
    """The lean step with 4-bit layer weights (groups of 32, a scale and a zero per group).

    For a model loaded from a Q4_1 GGUF (the default model) the groups *are* the file's Q4_1 blocks,
    recovered exactly from the dequantised fp32 weights, so this mode decodes with the weights as
    shipped; the only rounding is the kernel's bf16 (activations, scales and zeros). (A K-quant GGUF
    such as Q4_K_M is re-quantised: its 32-weight sub-blocks are affine too, but its quantiser does not
    put each block's min and max on the grid's ends.) PyTorch's CPU int4 kernel
    (``_weight_int4pack_mm_for_cpu``, bf16 activations) reads half the bytes of int8 and measured
    25-40 % faster than fbgemm's int8 GEMV per layer here. The LM head stays int8 (in the GGUF it is Q8_0).
    """

    def __init__(self, dec: FastDecoder, layers: list[_Layer], lm_head: Any) -> None:
        packed = [replace(x, qkv=x.qkv[0], o=x.o[0], gate_up=x.gate_up[0], down=x.down[0]) for x in layers]
        super().__init__(dec, packed, lm_head)
        self.scales_zeros = [w[1] for x in layers for w in (x.qkv, x.o, x.gate_up, x.down)]

    def _linear(self, x: torch.Tensor, j: int) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.lin[j], 32, self.scales_zeros[j])
        return y.float()


def _script(module: nn.Module) -> tuple[nn.Module, str | None]:
    """``torch.jit.script(module)``, or the eager module and the reason scripting failed.

    TorchScript is deprecated in favour of ``torch.compile``, but on CPU it is what removes the
    per-op Python cost here: inductor cannot trace fbgemm's packed int8 weights (a graph break per
    linear), and a compile of the fp32 step measured no gain at a 93 s compile. Scripting takes
    milliseconds and its profiling executor settles within the engine's warm-up.
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=UserWarning)
            return torch.jit.script(module), None
    except Exception as exc:  # noqa: BLE001 - any scripting failure means: run the same module eagerly
        reason = f"TorchScript unavailable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        logger.warning("fast decode step runs eagerly: %s", reason)
        return module, reason


def _native_bf16() -> bool:
    """Whether this CPU has native bf16 matmul (AVX512-BF16/AMX), which makes a bf16 KV cache pay."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _sliding_layers(cfg: Any) -> list[int]:
    """The layers that do not attend over the whole cache (sliding window, or any other non-full kind).

    transformers 5 configs say so per layer in ``layer_types``: Qwen2/Qwen3 carry a ``sliding_window``
    but derive ``layer_types`` from ``use_sliding_window`` and ``max_window_layers`` (all
    ``"full_attention"`` unless sliding is on). A config without ``layer_types`` (Mistral) applies a
    set ``sliding_window`` to every layer.
    """
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:
        return [i for i, kind in enumerate(layer_types) if kind != "full_attention"]
    return list(range(cfg.num_hidden_layers)) if getattr(cfg, "sliding_window", None) else []


def _check_supported(model: nn.Module) -> None:
    """Raise :class:`FastPathUnsupported` with the reason (which the engine logs) unless the steps implement
    ``model``'s decoder exactly: anything they would compute differently must fall back to HF instead."""
    cfg = model.config
    model_type = getattr(cfg, "model_type", "?")
    if model_type not in MODEL_TYPES:
        raise FastPathUnsupported(f"model_type {model_type!r} is not implemented")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise FastPathUnsupported(f"activation {cfg.hidden_act!r} is not implemented")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise FastPathUnsupported(f"rope_type {rope.get('rope_type')!r} is not implemented")
    sliding = _sliding_layers(cfg)
    if sliding:
        kinds = sorted({cfg.layer_types[i] for i in sliding}) if getattr(cfg, "layer_types", None) else ["sliding"]
        raise FastPathUnsupported(
            f"sliding-window attention is not implemented ({len(sliding)} of {cfg.num_hidden_layers} layers "
            f"from layer {sliding[0]} use {', '.join(kinds)}, window {getattr(cfg, 'sliding_window', None)})"
        )
    for layer in model.model.layers:  # biases read from the modules: config flags differ per family
        att, mlp = layer.self_attn, layer.mlp
        if any(m.bias is not None for m in (att.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
            raise FastPathUnsupported("biases on o_proj or the MLP are not implemented (only on q/k/v)")
    param = next(model.parameters())
    if param.dtype != torch.float32 or param.device.type != "cpu":
        raise FastPathUnsupported(f"the fast path runs fp32 on CPU (model is {param.dtype} on {param.device})")


def _layer_weights(layer: nn.Module, mode: str) -> _Layer:
    """One HF decoder layer's weights for the steps: q/k/v and gate/up stacked, each matmul in ``mode``."""
    att, mlp = layer.self_attn, layer.mlp
    projections = (att.q_proj, att.k_proj, att.v_proj)
    qkv_bias = None
    if any(p.bias is not None for p in projections):
        biases = [p.bias if p.bias is not None else p.weight.new_zeros(p.out_features) for p in projections]
        qkv_bias = torch.cat(biases).detach().float()
    q_norm, k_norm = getattr(att, "q_norm", None), getattr(att, "k_norm", None)
    return _Layer(
        w_in=layer.input_layernorm.weight.detach(),
        qkv=_weight(torch.cat([p.weight for p in projections]), mode),
        o=_weight(att.o_proj.weight, mode),
        w_post=layer.post_attention_layernorm.weight.detach(),
        gate_up=_weight(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), mode),
        down=_weight(mlp.down_proj.weight, mode),
        qkv_bias=qkv_bias,
        q_norm=None if q_norm is None else q_norm.weight.detach(),
        k_norm=None if k_norm is None else k_norm.weight.detach(),
    )


class FastDecoder:
    """Decode-step implementation for the HF decoders in :data:`MODEL_TYPES` (Llama, SmolLM, Mistral, Qwen2,
    Qwen3); anything else raises :class:`FastPathUnsupported` and the engine decodes through HF."""

    def __init__(self, model: nn.Module, weights: str = "fp32") -> None:
        if weights not in WEIGHT_MODES:
            raise ValueError(f"weights must be one of {WEIGHT_MODES}, got {weights!r}")
        _check_supported(model)
        cfg = model.config
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
        layers = [_layer_weights(layer, weights) for layer in inner.layers]
        # The LM head as the model has it: tied to the embedding (SmolLM2) or its own (bigger Qwen, and
        # Qwen2.5-0.5B as transformers loads its GGUF).
        lm_head = _weight(model.lm_head.weight, "int8" if weights == "int4" else weights)
        # RoPE tables from the model's own rotary module, so values match HF bit for bit.
        with torch.no_grad():
            positions = torch.arange(self.max_positions).unsqueeze(0)
            cos, sin = inner.rotary_emb(self.embed[:1].unsqueeze(0), positions)
        self.cos = cos[0].contiguous()  # [max_positions, head_dim]
        self.sin = sin[0].contiguous()
        if weights in ("int8", "int4"):
            self.kv_dtype = torch.bfloat16 if _native_bf16() else torch.float32
            step: nn.Module = (_Int4Step if weights == "int4" else _LeanStep)(self, layers, lm_head)
        else:
            self.kv_dtype = torch.float32
            step = _ExactStep(self, layers, lm_head)
        self._step, self.script_fallback_reason = _script(step)
        self.scripted = self.script_fallback_reason is None

    # --------------------------------------------------------------- cache management
    def new_cache(self, keys: list[torch.Tensor], values: list[torch.Tensor], capacity: int) -> StaticKVCache:
        """Allocate a cache of ``capacity`` tokens and load the (evicted) prefill KV into it."""
        cache = StaticKVCache(self.n_layers, self.n_kv, self.head_dim, capacity, self.kv_dtype)
        cache.load(keys, values)
        return cache

    # --------------------------------------------------------------- the step
    def _check_room(self, cache: StaticKVCache) -> int:
        n = cache.length
        if n >= cache.capacity:
            raise CacheCapacityError(
                f"KV cache full ({cache.capacity} tokens): allocate more capacity (max_new_tokens) for this request."
            )
        return n

    @torch.inference_mode()
    def step(self, cache: StaticKVCache, token: int, position: int) -> torch.Tensor:
        """One token through all layers at RoPE ``position``; appends its K/V to ``cache``; returns the
        logits ``[vocab]``."""
        n = self._check_room(cache)
        logits = self._step(cache.k, cache.v, int(token), int(position), n)
        cache.length = n + 1
        return logits
