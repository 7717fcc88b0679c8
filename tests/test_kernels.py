"""The per-host prefill kernel choice: measured, cached, safe when a kernel is missing, and really used."""

from __future__ import annotations

import json

import pytest
import torch

from timebill.engine import Engine
from timebill.errors import InvalidInputError
from timebill.kernels import (
    DecodeChoice,
    KernelChoice,
    ThreadChoice,
    choose_kv,
    choose_prefill,
    choose_threads,
    measure_kv_choice,
    measure_prefill_choice,
    measure_thread_choice,
    prefill_model,
    thread_candidates,
)


def _timer(times: dict[str, float], missing: tuple[str, ...] = ()):
    """A prefill timer that reports ``times[dtype]`` seconds, or fails like a missing kernel would."""

    def timer(model, tokens: int, repeats: int) -> float:
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        if dtype in missing:
            raise RuntimeError(f'"addmm_impl_cpu_" not implemented for {dtype}')
        return times[dtype]

    return timer


def test_the_faster_precision_wins_only_by_a_clear_margin(engine: Engine) -> None:
    fast = measure_prefill_choice(engine.model, timer=_timer({"float32": 0.30, "bfloat16": 0.10}))
    assert fast.prefill_dtype == "bfloat16"
    assert fast.timings_ms == {"float32": pytest.approx(300.0), "bfloat16": pytest.approx(100.0)}
    close = measure_prefill_choice(engine.model, timer=_timer({"float32": 0.30, "bfloat16": 0.29}))
    assert close.prefill_dtype == "float32"  # 3 % is within a noisy host's spread: keep the exact one
    slower = measure_prefill_choice(engine.model, timer=_timer({"float32": 0.30, "bfloat16": 0.90}))
    assert slower.prefill_dtype == "float32"  # emulated bf16 (no AVX512-BF16) is slower: measured, not guessed


def test_a_missing_kernel_is_skipped_with_its_reason_and_fp32_is_the_default(engine: Engine) -> None:
    choice = measure_prefill_choice(engine.model, timer=_timer({"float32": 0.3}, missing=("bfloat16",)))
    assert choice.prefill_dtype == "float32"
    assert "bfloat16" in choice.skipped and "not implemented" in choice.skipped["bfloat16"]
    assert "bfloat16" not in choice.timings_ms


def test_the_choice_is_cached_per_host_and_a_corrupt_cache_is_measured_again(
    engine: Engine, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIMEBILL_CACHE_DIR", str(tmp_path))
    first = choose_prefill(engine.model, "fp-test", threads=2)
    files = list((tmp_path / "kernels").glob("*.json"))
    assert len(files) == 1
    assert KernelChoice.from_dict(json.loads(files[0].read_text())) == first
    assert first.host and set(first.timings_ms) == {"float32", "bfloat16"}  # both ran on this CPU
    # A second call reads the file: change it on disk and the change comes back.
    data = json.loads(files[0].read_text())
    data["prefill_dtype"] = "float32" if first.prefill_dtype == "bfloat16" else "bfloat16"
    files[0].write_text(json.dumps(data))
    assert choose_prefill(engine.model, "fp-test", threads=2).prefill_dtype == data["prefill_dtype"]
    files[0].write_text("{not json")
    again = choose_prefill(engine.model, "fp-test", threads=2)
    assert again.prefill_dtype in ("float32", "bfloat16")
    assert KernelChoice.from_dict(json.loads(files[0].read_text())) == again  # rewritten, atomically


def test_fp32_weights_keep_an_fp32_prefill_and_hf_path_refuses_bf16(engine: Engine) -> None:
    assert engine.prefill_dtype == "float32" and engine.kernel_choice is None
    assert engine.profile_dtype == "float32"
    with pytest.raises(InvalidInputError, match="fast decode path"):
        Engine(engine.model, engine.tokenizer, engine.source, engine.threads, fast=False, prefill="bfloat16")
    with pytest.raises(InvalidInputError, match="prefill must be one of"):
        Engine(engine.model, engine.tokenizer, engine.source, engine.threads, prefill="fp8")


def test_bf16_prefill_really_runs_in_bf16_and_keeps_answers_close(engine: Engine) -> None:
    def int4(prefill: str) -> Engine:
        return Engine(
            engine.model,
            engine.tokenizer,
            engine.source,
            engine.threads,
            weights="int4",
            prefill=prefill,
            kv_cache="float32",
        )

    bf16, fp32 = int4("bfloat16"), int4("float32")
    assert next(bf16.prefill_model.parameters()).dtype == torch.bfloat16
    assert bf16.prefill_model is prefill_model(engine.model, "bfloat16")  # one copy shared by every engine
    assert fp32.prefill_model is engine.model
    assert bf16.profile_dtype == "float32+prefill-bfloat16"  # its profile is not the fp32-prefill one
    prompt = "Summarise: " + "Trains leave the station every ten minutes and arrive on time. " * 20
    ids = bf16.encode(prompt)
    state = bf16.prefill(ids)
    layer0 = state.cache.layers[0].keys
    assert layer0.dtype == torch.bfloat16
    ref = fp32.prefill(ids)
    # Same first token; keys near the fp32 ones (measured 4 % relative error: bf16 rounds weights, activations
    # and RoPE tables; a wrong cache, e.g. another prompt's or misplaced positions, is off by ~100 %).
    assert state.first_token == ref.first_token
    keys = ref.cache.layers[0].keys
    assert float((layer0.float() - keys).norm() / keys.norm()) < 0.1
    for alpha in (0.0, 0.5):
        a = bf16.generate(prompt, alpha=alpha, max_new_tokens=24)
        b = fp32.generate(prompt, alpha=alpha, max_new_tokens=24)
        assert a.kept_kv_tokens == b.kept_kv_tokens
        shared = next(
            (i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=False)) if x != y), len(a.token_ids)
        )
        assert shared >= 8, (alpha, a.text, b.text)


def _kv_timer(times: dict[str, float], missing: tuple[str, ...] = ()):
    def timer(decoder, dtype: str, context: int, steps: int) -> float:
        if dtype in missing:
            raise RuntimeError(f"no SDPA kernel for {dtype}")
        return times[dtype]

    return timer


def test_the_kv_dtype_is_measured_and_fp32_wins_ties_and_missing_kernels(engine: Engine) -> None:
    from timebill.fastpath import FastDecoder

    decoder = FastDecoder(engine.model, weights="int8")
    assert measure_kv_choice(decoder, timer=_kv_timer({"float32": 0.02, "bfloat16": 0.012})).kv_dtype == "bfloat16"
    assert measure_kv_choice(decoder, timer=_kv_timer({"float32": 0.02, "bfloat16": 0.019})).kv_dtype == "float32"
    assert measure_kv_choice(decoder, timer=_kv_timer({"float32": 0.02, "bfloat16": 0.05})).kv_dtype == "float32"
    missing = measure_kv_choice(decoder, timer=_kv_timer({"float32": 0.02}, missing=("bfloat16",)))
    assert missing.kv_dtype == "float32" and "no SDPA kernel" in missing.skipped["bfloat16"]
    # The real timer on this CPU: both dtypes run, over a cache of the probe's length.
    real = measure_kv_choice(decoder, context=256, steps=3)
    assert set(real.timings_ms) == {"float32", "bfloat16"} and all(ms > 0 for ms in real.timings_ms.values())
    assert real.context == 256 and real.weights == "int8"


def test_the_kv_choice_is_cached_per_weights_mode_and_really_used(
    engine: Engine, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIMEBILL_CACHE_DIR", str(tmp_path))
    eng = Engine(engine.model, engine.tokenizer, engine.source, engine.threads, weights="int4", prefill="float32")
    assert eng.kv_choice is not None and eng.kv_choice.weights == "int4"
    files = list((tmp_path / "kernels").glob("decode-*.json"))
    assert len(files) == 1 and DecodeChoice.from_dict(json.loads(files[0].read_text())) == eng.kv_choice
    assert choose_kv(eng.fast, engine.source.fingerprint, engine.threads) == eng.kv_choice  # read back, not re-measured
    # The chosen dtype is what the decode cache holds, and the profile key says so.
    assert str(eng.fast.kv_dtype) == f"torch.{eng.kv_choice.kv_dtype}"
    state = eng.prefill(eng.encode("Name three rivers."))
    eng.decode(state, max_new_tokens=2)
    assert state.static.k.dtype == eng.fast.kv_dtype
    assert eng.profile_dtype == ("float32" if eng.kv_choice.kv_dtype == "float32" else "float32+kv-bfloat16")
    forced = Engine(
        engine.model,
        engine.tokenizer,
        engine.source,
        engine.threads,
        weights="int8",
        prefill="float32",
        kv_cache="bfloat16",
    )
    assert forced.kv_choice is None and forced.fast.kv_dtype == torch.bfloat16
    assert f"KV cache {eng.kv_choice.kv_dtype} (measured here" in eng.kernels_summary()
    assert "prefill float32 (fixed), KV cache bfloat16 (fixed)" in forced.kernels_summary()
    assert forced.profile_dtype == "float32+kv-bfloat16"
    assert len(list((tmp_path / "kernels").glob("decode-*.json"))) == 1  # asked for: nothing measured
    with pytest.raises(InvalidInputError, match="int8 or int4"):
        Engine(engine.model, engine.tokenizer, engine.source, engine.threads, kv_cache="bfloat16")
    with pytest.raises(InvalidInputError, match="kv_cache must be one of"):
        Engine(engine.model, engine.tokenizer, engine.source, engine.threads, weights="int8", kv_cache="fp8")


# ------------------------------------------------------------------------------------- thread count
def _thread_timer(times: dict[int, float], seen: list[int]):
    def timer(model, threads: int, tokens: int, repeats: int) -> float:
        seen.append(threads)
        torch.set_num_threads(threads)  # as the real timer does: the choice must restore it
        return times[threads]

    return timer


def test_thread_candidates_are_all_cpus_and_half() -> None:
    assert thread_candidates(16) == (16, 8)
    assert thread_candidates(2) == (2, 1)
    assert thread_candidates(1) == (1,)


def test_fewer_threads_win_only_by_a_clear_margin_and_torch_threads_are_restored(engine: Engine) -> None:
    before = torch.get_num_threads()
    seen: list[int] = []
    smt = measure_thread_choice(engine.model, (8, 4), timer=_thread_timer({8: 0.30, 4: 0.20}, seen))
    assert smt.threads == 4 and "1.50x" in smt.reason
    assert seen == [8, 4, 8, 4]  # interleaved rounds: drift hits both alike
    assert torch.get_num_threads() == before
    close = measure_thread_choice(engine.model, (8, 4), timer=_thread_timer({8: 0.30, 4: 0.29}, []))
    assert close.threads == 8  # within noise: keep every CPU
    slower = measure_thread_choice(engine.model, (8, 4), timer=_thread_timer({8: 0.10, 4: 0.20}, []))
    assert slower.threads == 8 and slower.timings_ms == {"8": pytest.approx(100.0), "4": pytest.approx(200.0)}
    with pytest.raises(ValueError):
        ThreadChoice.from_dict({**slower.to_dict(), "threads": 0})


def test_load_without_threads_measures_caches_and_uses_the_thread_count(
    engine: Engine, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIMEBILL_CACHE_DIR", str(tmp_path))
    first = choose_threads(engine.model, "fp-threads")
    assert first.threads in thread_candidates()
    assert set(first.timings_ms) == {str(n) for n in thread_candidates()}  # every candidate really ran
    files = list((tmp_path / "kernels").glob("threads-*.json"))
    assert len(files) == 1 and ThreadChoice.from_dict(json.loads(files[0].read_text())) == first
    files[0].write_text("[]")  # corrupt: measured again and rewritten, never trusted
    again = choose_threads(engine.model, "fp-threads")
    assert ThreadChoice.from_dict(json.loads(files[0].read_text())) == again

    before = torch.get_num_threads()
    try:
        loaded = Engine.load(threads=None, warmup=False)
        assert loaded.thread_choice is not None and loaded.threads == loaded.thread_choice.threads
        assert torch.get_num_threads() == loaded.threads
        assert f"threads {loaded.threads} (measured here" in loaded.kernels_summary()
    finally:
        torch.set_num_threads(before)
    fixed = Engine(engine.model, engine.tokenizer, engine.source, 1)
    assert fixed.thread_choice is None  # a caller's count is never second-guessed
