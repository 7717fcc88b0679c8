"""FLOPs analysis of a Llama-style decoder, the physical basis of the ETE's time model (method §3).

The paper models prefill time as ``a·N_x² + b·N_x + c`` and one decode step as ``p·N_kv + q`` because
that is the shape of the FLOPs count. This module computes that count exactly for a given HF config so a
fitted time model can be checked term by term: ``time_coefficient / flops_coefficient`` is the seconds
per FLOP that each term achieves (attention scores, projections + FFN, LM head), which exposes fits whose
coefficients are not physical (e.g. a quadratic term far slower per FLOP than the matmuls).

Counting conventions:

* A multiply-add is 2 FLOPs; a ``(m×k)·(k×n)`` matmul is ``2·m·k·n`` FLOPs.
* Only matmuls are counted. RMSNorm, RoPE, softmax, SiLU, residual adds and the embedding lookup are
  O(N·hidden) elementwise work, a fraction of a percent of the total, and are memory-bound anyway.
* Gated SiLU MLP as in Llama: gate, up (hidden→intermediate) and down (intermediate→hidden).
* Grouped-query attention changes the K/V projection sizes but not the score FLOPs: every query head
  still computes its own ``QKᵀ`` and ``AV``.
* Causal prefill scores: we count the **full N×N square** for ``QKᵀ`` and ``AV``. PyTorch's SDPA on CPU
  (math and flash-attention-for-CPU paths with an explicit mask) computes the full square and masks it;
  kernels with causal block skipping do about half. The choice only rescales the fitted ``a``'s
  seconds-per-FLOP by 2, so we pick the convention that matches the CPU engine.
* The LM head runs on ONE token at prefill, because the engine calls the model with ``logits_to_keep=1``.
* Decode step: ``n_kv`` is the number of tokens already in the KV cache before the step (the method's
  ``N_kv,i``). The new token's query attends to ``n_kv + 1`` keys (the cache plus itself), so the
  score term is ``4·L·H·d·(n_kv + 1)``; the ``+1`` lands in ``q``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from timebill.errors import InvalidInputError


@dataclass(frozen=True)
class ModelShape:
    """The config fields that determine a Llama-style decoder's FLOPs."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidInputError(f"ModelShape.{name} must be a positive integer, got {value!r}")

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Build from an HF ``PretrainedConfig`` or a plain dict with the same field names.

        ``head_dim`` defaults to ``hidden_size // num_attention_heads`` and ``num_key_value_heads`` to
        ``num_attention_heads`` (multi-head attention), as in transformers' Llama. A config that nests
        its text model (``text_config``, as multimodal configs do) is unwrapped.
        """

        def get(name: str) -> Any:
            if isinstance(config, Mapping):
                return config.get(name)
            return getattr(config, name, None)

        if get("num_hidden_layers") is None:
            nested = get("text_config")
            if nested is not None:
                return cls.from_config(nested)
        required = (
            "num_hidden_layers",
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "vocab_size",
        )
        missing = [name for name in required if get(name) is None]
        if missing:
            raise InvalidInputError(f"model config lacks field(s) needed for FLOPs analysis: {missing}")
        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        kv_heads = get("num_key_value_heads")
        head_dim = get("head_dim")
        return cls(
            num_layers=int(get("num_hidden_layers")),
            hidden_size=hidden,
            intermediate_size=int(get("intermediate_size")),
            num_heads=heads,
            num_kv_heads=int(kv_heads) if kv_heads is not None else heads,
            head_dim=int(head_dim) if head_dim is not None else hidden // heads,
            vocab_size=int(get("vocab_size")),
        )

    def layer_matmul_params(self) -> int:
        """Weights of one decoder layer's linear maps (Q, K, V, O, gate, up, down); norms excluded."""
        h, d = self.hidden_size, self.head_dim
        attn = h * self.num_heads * d * 2 + h * self.num_kv_heads * d * 2
        return attn + 3 * h * self.intermediate_size

    def lm_head_params(self) -> int:
        """Weights of the LM head (counted even when tied to the embedding: it is still a matmul)."""
        return self.hidden_size * self.vocab_size

    def matmul_params(self) -> int:
        """All weights a token is multiplied with: layers' linear maps plus the LM head."""
        return self.num_layers * self.layer_matmul_params() + self.lm_head_params()


@dataclass(frozen=True)
class FlopsBreakdown:
    """FLOPs of one forward pass split by component (all in FLOPs, multiply-add = 2)."""

    attention_proj: int
    attention_scores: int
    ffn: int
    lm_head: int
    total: int


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise InvalidInputError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _proj_per_token(shape: ModelShape) -> int:
    h, d = shape.hidden_size, shape.head_dim
    return shape.num_layers * 2 * h * (2 * shape.num_heads * d + 2 * shape.num_kv_heads * d)


def _ffn_per_token(shape: ModelShape) -> int:
    return shape.num_layers * 2 * 3 * shape.hidden_size * shape.intermediate_size


def _scores_per_query_key(shape: ModelShape) -> int:
    # QK^T and AV: 2·d FLOPs each per (query, key) pair per head.
    return shape.num_layers * 4 * shape.num_heads * shape.head_dim


def _breakdown(proj: int, scores: int, ffn: int, lm_head: int) -> FlopsBreakdown:
    return FlopsBreakdown(proj, scores, ffn, lm_head, proj + scores + ffn + lm_head)


def prefill_flops(shape: ModelShape, n_x: int) -> FlopsBreakdown:
    """FLOPs of prefilling ``n_x`` prompt tokens (full N² scores, LM head on the last token only)."""
    n = _check_count("n_x", n_x)
    lm_head = 2 * shape.lm_head_params() if n > 0 else 0
    return _breakdown(
        _proj_per_token(shape) * n, _scores_per_query_key(shape) * n * n, _ffn_per_token(shape) * n, lm_head
    )


def decode_step_flops(shape: ModelShape, n_kv: int) -> FlopsBreakdown:
    """FLOPs of one decode step with ``n_kv`` tokens already cached (the query attends ``n_kv + 1``)."""
    n = _check_count("n_kv", n_kv)
    return _breakdown(
        _proj_per_token(shape),
        _scores_per_query_key(shape) * (n + 1),
        _ffn_per_token(shape),
        2 * shape.lm_head_params(),
    )


def flops_coefficients(shape: ModelShape) -> dict[str, int]:
    """Exact FLOPs coefficients of the paper's time-model forms.

    ``prefill_flops(n).total == a·n² + b·n + c`` for n ≥ 1 and
    ``decode_step_flops(n_kv).total == p·n_kv + q``. Dividing a fitted time coefficient by the matching
    entry gives that term's seconds per FLOP.
    """
    scores = _scores_per_query_key(shape)
    per_token = _proj_per_token(shape) + _ffn_per_token(shape)
    lm_head = 2 * shape.lm_head_params()
    return {"a": scores, "b": per_token, "c": lm_head, "p": scores, "q": per_token + scores + lm_head}


def format_flops_table(shape: ModelShape, n_values: Iterable[int]) -> str:
    """A plain-text table of prefill and decode-step GFLOPs per component, for the CLI."""
    header = (
        f"{'N':>8} | {'prefill GFLOP':>13} {'attn proj':>10} {'scores':>10} {'ffn':>10} "
        f"{'lm_head':>8} | {'decode step @N_kv':>17} {'scores':>8}"
    )
    lines = [header, "-" * len(header)]
    for n in n_values:
        pf = prefill_flops(shape, n)
        dc = decode_step_flops(shape, n)
        lines.append(
            f"{n:>8d} | {pf.total / 1e9:>13.3f} {pf.attention_proj / 1e9:>10.3f} "
            f"{pf.attention_scores / 1e9:>10.3f} {pf.ffn / 1e9:>10.3f} {pf.lm_head / 1e9:>8.3f} | "
            f"{dc.total / 1e9:>17.4f} {dc.attention_scores / 1e9:>8.4f}"
        )
    coeffs = flops_coefficients(shape)
    lines.append("")
    lines.append("coefficients (FLOPs): " + ", ".join(f"{k}={v:.4g}" for k, v in coeffs.items()))
    return "\n".join(lines)
