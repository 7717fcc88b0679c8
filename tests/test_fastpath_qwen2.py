"""The fast decode path on Qwen2 (q/k/v biases, untied LM head, sliding window configured but off) and Qwen3
(per-head q/k RMSNorm, an explicit head_dim).

Tiny random models pin each architecture in CI (they must decode exactly as HF does, token for token and
logit for logit); the real Qwen2.5-Coder-0.5B, when installed, pins Qwen2 on trained weights. (No Qwen3
checkpoint was at hand: Qwen3 is pinned by the tiny model only.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from timebill.engine import Engine
from timebill.fastpath import FastDecoder, FastPathUnsupported, _int4_groups
from tiny_models import TinyTokenizer, randomise

PROMPTS = [
    "Explain KV caches in two sentences.",
    "Summarise: " + "Trains leave the station every ten minutes and arrive on time. " * 3,
]
REAL_MODEL = "qwen2.5-coder-0.5b"
REAL_PROMPT = "Write a Python function that checks whether a number is prime."
ARCHITECTURES = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}


def tiny(arch: str = "qwen2", **overrides: Any) -> PreTrainedModel:
    """2 layers, 4 query / 2 KV heads, an untied LM head, sizes int4's kernel packs; Qwen3 with head_dim 32, so
    its attention width (128) is not the hidden size (64)."""
    config_cls, model_cls = ARCHITECTURES[arch]
    config = {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 256,
        "vocab_size": 1000,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        **({"head_dim": 32} if arch == "qwen3" else {}),
        **overrides,
    }
    return randomise(model_cls(config_cls(**config)))


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def model(request: pytest.FixtureRequest) -> PreTrainedModel:
    return tiny(request.param)


@pytest.fixture(scope="module")
def fast(model: PreTrainedModel) -> Engine:
    return Engine(model, TinyTokenizer(), source=None, threads=1)


@pytest.fixture(scope="module")
def reference(model: PreTrainedModel) -> Engine:
    return Engine(model, TinyTokenizer(), source=None, threads=1, fast=False)


def test_the_tiny_models_have_what_their_architecture_adds(model: PreTrainedModel) -> None:
    """Guards the tests below: HF initialises biases to zero and norms to one, which would hide a fast path
    that skipped them, and a tied head would not test reading lm_head."""
    att = model.model.layers[0].self_attn
    projections = (att.q_proj, att.k_proj, att.v_proj)
    if model.config.model_type == "qwen2":
        assert all(p.bias is not None and p.bias.abs().min() > 0 for p in projections)
    else:
        assert all(p.bias is None for p in projections)
        assert all((norm.weight != 1).all() for norm in (att.q_norm, att.k_norm))
        assert att.q_proj.out_features != model.config.hidden_size
    assert att.o_proj.bias is None
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.config.layer_types == ["full_attention"] * 2


def test_the_model_takes_the_scripted_fast_path(fast: Engine) -> None:
    assert fast.decode_path == "fast-fp32"
    assert fast.fast is not None and fast.fast.scripted


def test_first_step_logits_are_bit_exact(fast: Engine, reference: Engine) -> None:
    """Bias or q/k norms, RoPE and the untied head all as HF computes them: equal bits, not just argmax."""
    ids = fast.encode(PROMPTS[0])
    state = reference.prefill(ids, capture=False)
    keys, values = [x.keys for x in state.cache.layers], [x.values for x in state.cache.layers]
    cache = fast.fast.new_cache(keys, values, len(ids) + 1)  # copies the prefill KV before HF's step appends
    logits = fast.fast.step(cache, state.first_token, len(ids))
    assert torch.equal(logits, reference.decode_step(state, state.first_token, len(ids)))


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_fast_path_equals_reference_token_for_token(fast: Engine, reference: Engine, prompt: str, alpha: float) -> None:
    out = fast.generate(prompt, alpha=alpha, max_new_tokens=24)
    ref = reference.generate(prompt, alpha=alpha, max_new_tokens=24)
    assert out.token_ids == ref.token_ids
    assert out.kept_kv_tokens == ref.kept_kv_tokens


def test_mid_decode_eviction_matches_reference(fast: Engine, reference: Engine) -> None:
    ids = fast.encode(PROMPTS[1])

    def run(eng: Engine) -> list[int]:
        state = eng.prefill(ids, capture=True)
        eng.evict(state, 0.25)

        def replan(i: int, now: float, st: Any) -> None:
            if i == 6:
                eng.evict(st, 0.5)

        tokens = eng.decode(state, max_new_tokens=20, on_step=replan).token_ids
        assert state.prompt_kv_len == int(int(len(ids) * 0.75) * 0.5)
        return tokens

    assert run(fast) == run(reference)


def teacher_forced_agreement(dec: FastDecoder, fp32: Engine, ids: list[int], tokens: list[int]) -> float:
    """Share of next tokens ``dec`` predicts as fp32 did, fed fp32's own tokens from fp32's prefill KV.

    ``dec`` decodes from fp32's HF prefill, so this compares the quantised decode step alone (an engine may
    prefill a quantised mode in bf16, which flips a random model's narrow logit margins by itself).
    """
    state = fp32.prefill(ids, capture=False)
    keys, values = [x.keys for x in state.cache.layers], [x.values for x in state.cache.layers]
    cache = dec.new_cache(keys, values, len(ids) + len(tokens))
    agree = sum(
        int(dec.step(cache, tok, len(ids) + i).argmax()) == nxt
        for i, (tok, nxt) in enumerate(zip(tokens, tokens[1:], strict=False))
    )
    return agree / (len(tokens) - 1)


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantised_modes_track_fp32(model: PreTrainedModel, fast: Engine, weights: str) -> None:
    """Quantised weights plus the fp32 bias or q/k norms: most next tokens as fp32 (the SmolLM2 tests' 80 %).

    The decoder is built directly (it is what the engine decodes with): an engine in a quantised mode also
    measures and caches a prefill precision per model, which is no part of what this checks.
    """
    dec = FastDecoder(model, weights=weights)
    assert dec.scripted
    ids = fast.encode(PROMPTS[0])
    assert teacher_forced_agreement(dec, fast, ids, fast.generate(ids, max_new_tokens=24).token_ids) >= 0.8


@pytest.mark.parametrize(
    "sliding",
    [
        {"use_sliding_window": False, "sliding_window": 16},  # Qwen2.5's shipped configs: a window, not used
        {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2},  # on, but for no layer
    ],
)
def test_a_sliding_window_not_in_use_keeps_the_fast_path(sliding: dict[str, Any]) -> None:
    eng = Engine(tiny("qwen2", **sliding), TinyTokenizer(), source=None, threads=1)
    assert eng.decode_path == "fast-fp32"


def test_a_sliding_window_in_use_falls_back_with_logged_reason(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1)
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    with caplog.at_level(logging.WARNING, logger="timebill.engine"):
        eng = Engine(model, TinyTokenizer(), source=None, threads=1)
    assert eng.decode_path == "hf"
    assert "sliding-window" in (eng.fast_fallback_reason or "")
    assert "from layer 1" in (eng.fast_fallback_reason or "")
    assert any("fast decode path unavailable" in r.message for r in caplog.records)
    assert len(eng.decode(eng.prefill([1, 2, 3, 4], capture=False), max_new_tokens=3).token_ids) == 3


def test_int4_refuses_output_sizes_its_kernel_cannot_pack() -> None:
    """``_convert_weight_to_int4pack_for_cpu`` packs 16 output channels at a time: say so, not a RuntimeError."""
    with pytest.raises(FastPathUnsupported, match="output sizes divisible by 16"):
        _int4_groups(torch.randn(40, 64))


def _installed_real_model() -> str | None:
    try:
        from timebill.models import installed_path
    except ImportError:
        return None
    path = installed_path(REAL_MODEL)
    return None if path is None else str(path)


@pytest.fixture(scope="module")
def real() -> Iterator[Engine]:
    """The installed Qwen2.5-Coder-0.5B (its first load dequantises the GGUF once, ~1 min; later ones ~3 s).

    One thread: on a host shared with other jobs, two OpenMP threads on a busy two-core machine spun ~1 s
    per 0.5B decode step here, one thread ~0.15 s. The session's thread count is restored afterwards.
    """
    path = _installed_real_model()
    if path is None:
        pytest.skip(f"{REAL_MODEL} is not installed (`timebill models add {REAL_MODEL}`)")
    threads = torch.get_num_threads()
    try:
        yield Engine.load(path, threads=1)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_real_qwen2_fast_path_equals_reference(real: Engine) -> None:
    """Qwen2.5-Coder-0.5B (biases, rope_theta 1e6, vocab 152k): the fast path decodes exactly as HF."""
    assert real.model.config.model_type == "qwen2" and real.decode_path == "fast-fp32"
    reference = Engine(real.model, real.tokenizer, real.source, real.threads, fast=False)
    for alpha in (0.0, 0.5):
        out = real.generate(REAL_PROMPT, alpha=alpha, max_new_tokens=12)
        ref = reference.generate(REAL_PROMPT, alpha=alpha, max_new_tokens=12)
        assert out.token_ids == ref.token_ids
        assert out.kept_kv_tokens == ref.kept_kv_tokens


@pytest.mark.slow
def test_real_qwen2_int4_tracks_fp32(real: Engine) -> None:
    """A Q4_K_M GGUF's weights re-quantised to int4 groups, plus the bias: most next tokens as fp32.

    (int8 runs the same bias code; the tiny model covers it.)
    """
    ids = real.encode(REAL_PROMPT)
    tokens = real.generate(ids, max_new_tokens=16).token_ids
    assert teacher_forced_agreement(FastDecoder(real.model, weights="int4"), real, ids, tokens) >= 0.8


def test_alpha_zero_fp32_equals_model_generate(model: PreTrainedModel, fast: Engine) -> None:
    """The contract users see: greedy tokens identical to HF's own ``model.generate`` (not only our HF path)."""
    ids = fast.encode(PROMPTS[1])
    out = fast.generate(ids, max_new_tokens=20)
    with torch.inference_mode():
        gen = model.generate(
            torch.tensor([ids]), do_sample=False, max_new_tokens=20, eos_token_id=None, pad_token_id=0
        )[0, len(ids) :].tolist()
    assert out.token_ids == gen[: len(out.token_ids)]
    if out.stop_reason == "max_tokens":
        assert len(out.token_ids) == len(gen)
