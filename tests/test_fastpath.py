"""The fast decode path must be the reference path, only faster: same tokens, same eviction, clear limits."""

from __future__ import annotations

import logging

import pytest
import torch

from timebill.engine import Engine
from timebill.errors import CacheCapacityError
from timebill.fastpath import FastDecoder

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

        tokens, _, _, _ = eng.decode(state, max_new_tokens=20, on_step=replan)
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
        eng = Engine(tiny, tokenizer=_TinyTokenizer(), source=None, threads=1)
    assert eng.decode_path == "hf"
    assert "gpt2" in (eng.fast_fallback_reason or "")
    assert any("fast decode path unavailable" in r.message for r in caplog.records)
    state = eng.prefill([1, 2, 3, 4], capture=False)
    tokens, _, _, _ = eng.decode(state, max_new_tokens=3)
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


class _TinyTokenizer:
    unk_token_id = 0
    eos_token_id = 63
    chat_template = None

    def convert_tokens_to_ids(self, token: str) -> int:
        return 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [1 + (ord(c) % 60) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(65 + i % 26) for i in ids)
