"""The fast decode path must be the reference path, only faster: same tokens, same eviction, clear limits."""

from __future__ import annotations

import logging

import pytest
import torch

from timebill.engine import Engine
from timebill.errors import CacheCapacityError
from timebill.fastpath import FastDecoder
from tiny_models import TinyTokenizer

PROMPTS = [
    "Explain KV caches in two sentences.",
    "Write a short poem about a lighthouse keeper who never sleeps.",
    "Summarise: " + "Trains leave the station every ten minutes and arrive on time. " * 15,
]


@pytest.fixture(scope="module")
def reference(engine: Engine) -> Engine:
    """The same weights decoded through the HF model (the reference path)."""
    return Engine(engine.model, engine.tokenizer, engine.source, engine.threads, fast=False)


def test_engine_uses_the_fast_path_by_default(engine: Engine) -> None:
    assert engine.decode_path == "fast-fp32"


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_fast_path_equals_reference_token_for_token(
    engine: Engine, reference: Engine, prompt: str, alpha: float
) -> None:
    fast = engine.generate(prompt, alpha=alpha, max_new_tokens=32)
    ref = reference.generate(prompt, alpha=alpha, max_new_tokens=32)
    assert fast.token_ids == ref.token_ids
    assert fast.kept_kv_tokens == ref.kept_kv_tokens


def test_mid_decode_eviction_matches_reference(engine: Engine, reference: Engine) -> None:
    """Evicting more prompt KV after some tokens (re-planning) does the same on both caches."""
    ids = engine.encode(PROMPTS[2])

    def run(eng: Engine) -> list[int]:
        state = eng.prefill(ids, capture=True)
        eng.evict(state, 0.25)

        def replan(i: int, now: float, st) -> None:
            if i == 6:
                eng.evict(st, 0.5)

        tokens = eng.decode(state, max_new_tokens=20, on_step=replan).token_ids
        assert state.prompt_kv_len == int(int(len(ids) * 0.75) * 0.5)
        return tokens

    assert run(engine) == run(reference)


def test_static_cache_overflow_is_a_clear_error(engine: Engine) -> None:
    ids = engine.encode("Hello there.")
    state = engine.prefill(ids, capture=False)
    engine.begin_decode(state, max_new_tokens=1)
    capacity = state.static.capacity
    with pytest.raises(CacheCapacityError, match="full"):
        for i in range(capacity + 1):
            engine.decode_step(state, 5, len(ids) + i)


def test_unsupported_architecture_falls_back_with_logged_reason(caplog: pytest.LogCaptureFixture) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    tiny = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32)).eval()
    with caplog.at_level(logging.WARNING, logger="timebill.engine"):
        eng = Engine(tiny, tokenizer=TinyTokenizer(), source=None, threads=1)
    assert eng.decode_path == "hf"
    assert "gpt2" in (eng.fast_fallback_reason or "")
    assert any("fast decode path unavailable" in r.message for r in caplog.records)
    state = eng.prefill([1, 2, 3, 4], capture=False)
    tokens = eng.decode(state, max_new_tokens=3).token_ids
    assert len(tokens) == 3


def test_int8_weights_mode_runs_and_stays_close(engine: Engine) -> None:
    """Weight-only int8 is an opt-in quality trade: it must decode sensibly, not identically."""
    dec = FastDecoder(engine.model, weights="int8")
    ref = FastDecoder(engine.model, weights="fp32")
    ids = engine.encode(PROMPTS[0])
    state = engine.prefill(ids, capture=False)
    layers = state.cache.layers
    keys, values = [x.keys for x in layers], [x.values for x in layers]
    c8 = dec.new_cache(keys, values, len(ids) + 4)
    c32 = ref.new_cache(keys, values, len(ids) + 4)
    a = dec.step(c8, state.first_token, len(ids))
    b = ref.step(c32, state.first_token, len(ids))
    assert torch.isfinite(a).all()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.99


def test_int4_groups_are_the_ggufs_own_q4_1_blocks(engine: Engine) -> None:
    """The default model is a Q4_1 GGUF: int4 mode must hold its weights exactly (up to bf16 scales)."""
    from timebill.fastpath import INT4_GROUP, _int4_groups

    w = engine.model.model.layers[2].mlp.down_proj.weight.detach().float()
    groups = w.view(w.shape[0], -1, INT4_GROUP)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    q = (groups - lo) / ((hi - lo) / 15)
    assert (q - q.round()).abs().max() < 1e-3  # every weight sits on its block's 16-level grid
    packed, scales_zeros = _int4_groups(w)
    x = torch.randn(3, w.shape[1])
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, INT4_GROUP, scales_zeros).float()
    ref = x.bfloat16().float() @ w.T
    assert (y - ref).abs().max() / ref.abs().max() < 0.02  # bf16 scales/activations only


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantised_modes_greedy_decode_tracks_fp32(engine: Engine, weights: str) -> None:
    """A quantised mode decodes the same text for a while and agrees with fp32 on most next tokens.

    Its prefill is pinned to fp32: this checks the decode step (with the KV dtype chosen here); what the
    per-host bf16 prefill costs is measured on the benchmark suite (``benchmarks/prefill_quality.py``).
    """
    eng = Engine(engine.model, engine.tokenizer, engine.source, engine.threads, weights=weights, prefill="float32")
    assert eng.decode_path == f"fast-{weights}"
    assert eng.fast is not None and eng.fast.scripted
    ids = engine.encode(PROMPTS[0])
    ref = engine.generate(ids, max_new_tokens=24)
    out = eng.generate(ids, max_new_tokens=24)
    assert out.token_ids[:4] == ref.token_ids[:4]
    # teacher-forced agreement: feed the fp32 tokens, compare each argmax
    state = eng.prefill(ids, capture=False)
    eng.begin_decode(state, max_new_tokens=len(ref.token_ids))
    agree = sum(
        int(eng.decode_step(state, tok, len(ids) + i).argmax()) == nxt
        for i, (tok, nxt) in enumerate(zip(ref.token_ids, ref.token_ids[1:], strict=False))
    )
    assert agree >= 0.8 * (len(ref.token_ids) - 1)


@pytest.mark.parametrize("weights", ["fp32", "int4"])
def test_eager_fallback_when_torchscript_fails_gives_the_same_logits(
    engine: Engine, weights: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    scripted = FastDecoder(engine.model, weights=weights)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no TorchScript here")

    monkeypatch.setattr(torch.jit, "script", broken)
    with caplog.at_level(logging.WARNING, logger="timebill.fastpath"):
        eager = FastDecoder(engine.model, weights=weights)
    assert scripted.scripted and not eager.scripted
    assert "no TorchScript here" in (eager.script_fallback_reason or "")
    assert any("runs eagerly" in r.message for r in caplog.records)
    ids = engine.encode(PROMPTS[1])
    state = engine.prefill(ids, capture=False)
    keys, values = [x.keys for x in state.cache.layers], [x.values for x in state.cache.layers]
    a = scripted.step(scripted.new_cache(keys, values, len(ids) + 2), state.first_token, len(ids))
    b = eager.step(eager.new_cache(keys, values, len(ids) + 2), state.first_token, len(ids))
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("press", ["snapkv", "knorm"])
def test_int4_mid_decode_eviction_on_the_bf16_cache(engine: Engine, press: str) -> None:
    """Re-planning evicts from the quantised path's bf16 cache (KNorm scores its keys as fp32)."""
    eng = Engine(engine.model, engine.tokenizer, engine.source, engine.threads, weights="int4")
    ids = engine.encode(PROMPTS[2])
    state = eng.prefill(ids, press=press, capture=True)
    eng.evict(state, 0.25)

    def replan(i: int, now: float, st) -> None:  # noqa: ANN001 - the engine's on_step signature
        if i == 4:
            eng.evict(st, 0.5)

    tokens = eng.decode(state, max_new_tokens=12, on_step=replan).token_ids
    assert state.static is not None and state.static.k.dtype == eng.fast.kv_dtype
    assert state.prompt_kv_len == int(int(len(ids) * 0.75) * 0.5)
    assert len(tokens) == 12 or tokens[-1] in eng.stop_ids
    # every token but the last was fed back (the first came from prefill's logits)
    assert state.static.length == state.prompt_kv_len + len(tokens) - 1
