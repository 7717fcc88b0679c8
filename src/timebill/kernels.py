"""Per-host kernel choice, measured not guessed: which prefill precision, and which KV-cache dtype for the
quantised decode steps, run fastest on *this* CPU.

Why: the machine under this project (and under a user) changes. A 2048² ``torch.mm`` ran at 282 GFLOP/s
in fp32 and 2331 GFLOP/s in bf16 on an Intel Xeon with AMX (cpu family 6, model 167), so a bf16 prefill
there is several times faster; on an AMD EPYC without AVX512-BF16, bf16 is emulated and slower than
fp32. Reading CPU flags would guess; timing the real model's prefill in each precision for a few
seconds once per (host, model, threads, torch) settles it, and the choice is cached so later loads
cost nothing.

What "keeps the mode's quality" means: the fp32 weights mode promises greedy tokens identical to HF's
``model.generate``, so it always prefills in fp32 (unless the caller asks otherwise). The quantised
modes (int8, int4) already trade exactness for speed; for them a bf16 prefill is a candidate, and its
quality cost is measured on the benchmark suite by ``benchmarks/prefill_quality.py``.

A candidate that cannot run here (no bf16 support compiled in, an op missing) is skipped with its
reason recorded; the safe default is fp32.

Not a candidate, measured: an int8 (VNNI) prefill through PyTorch's dynamic quantisation. On the family-26
EPYC it ran only 1.04-1.25x faster than the bf16 prefill while moving the last-token logits to a cosine of
0.84-0.99 against fp32's (bf16: >= 0.9998), and changed the greedy next token in 3 of 6 cases
(``benchmarks/int8_prefill_cost.py``; ``docs/results/int8_prefill_cost*.txt``): its per-tensor
activation scale does not keep the quantised modes' quality.

The thread count is chosen the same way where the caller does not fix it (``Engine.load(threads=None)``):
all available CPUs, unless half of them (SMT siblings share a core's matmul units) prefill clearly faster.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from timebill.paths import cache_dir, write_bytes_atomically

logger = logging.getLogger(__name__)

PREFILL_DTYPES = ("float32", "bfloat16")
PREFILL_CHOICES = ("auto", *PREFILL_DTYPES)
# A faster candidate must beat fp32 by this much to be chosen: below it the measurement cannot tell
# them apart on a noisy shared host, and fp32 is the more exact of the two.
MIN_GAIN = 1.10
# Tokens in the timed prefill: long enough that matmuls dominate (as in a real prompt), short enough
# that the whole choice takes a few seconds.
PROBE_TOKENS = 256
CHOICE_VERSION = 1
KV_DTYPES = ("float32", "bfloat16")
KV_CHOICES = ("auto", *KV_DTYPES)
# Prompt tokens in the cache of the timed decode steps: where attention's cache read is a visible part of
# a step (budgeted requests carry prompts of hundreds to thousands of tokens).
KV_PROBE_CONTEXT = 1024


@dataclass(frozen=True)
class KernelChoice:
    """The chosen prefill precision, with every candidate's measured time and why any was skipped."""

    prefill_dtype: str
    timings_ms: dict[str, float] = field(default_factory=dict)  # candidate -> best-of-N prefill time
    skipped: dict[str, str] = field(default_factory=dict)  # candidate -> why it was not measured
    probe_tokens: int = PROBE_TOKENS
    host: str = ""
    reason: str = ""  # one line: why this candidate won

    def to_dict(self) -> dict[str, Any]:
        return {"version": CHOICE_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Any) -> KernelChoice:
        if not isinstance(data, dict) or data.get("version") != CHOICE_VERSION:
            raise ValueError("not a kernel choice of this version")
        if data.get("prefill_dtype") not in PREFILL_DTYPES:
            raise ValueError(f"unknown prefill dtype {data.get('prefill_dtype')!r}")
        return cls(
            prefill_dtype=data["prefill_dtype"],
            timings_ms={str(k): float(v) for k, v in dict(data.get("timings_ms", {})).items()},
            skipped={str(k): str(v) for k, v in dict(data.get("skipped", {})).items()},
            probe_tokens=int(data.get("probe_tokens", PROBE_TOKENS)),
            host=str(data.get("host", "")),
            reason=str(data.get("reason", "")),
        )


def native_bf16() -> bool:
    """Whether oneDNN reports native bf16 (AVX512-BF16 or AMX): a hint recorded beside the measurement."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_capability() -> str:
    """What ATen's CPU kernels dispatch to here (``AVX512``, ``AVX2``, ``DEFAULT``) and whether oneDNN has native
    bf16: the first thing to read when a host's quantised or bf16 kernels are unexpectedly slow."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = "unknown"
    return f"ATen {capability}, native bf16 {'yes' if native_bf16() else 'no'}"


_BF16_COPIES: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def prefill_model(model: Any, dtype: str) -> Any:
    """``model`` itself for fp32, else one cached copy of it in ``dtype`` (shared by every engine on it).

    Engines for fp32/int8/int4 wrap the same HF model side by side; a copy each would triple the memory.
    """
    if dtype == "float32":
        return model
    copy = _BF16_COPIES.get(model)
    if copy is None:
        import copy as copy_mod

        copy = copy_mod.deepcopy(model).to(getattr(torch, dtype))
        copy.eval()
        _BF16_COPIES[model] = copy
    return copy


def _time_prefill(model: Any, tokens: int, repeats: int) -> float:
    """Best-of-``repeats`` seconds of one prefill forward of ``tokens`` tokens (after one warm-up)."""
    vocab = int(model.config.vocab_size)
    ids = torch.arange(tokens, dtype=torch.long).mul_(7919).remainder_(vocab).unsqueeze(0)
    best = math.inf
    with torch.inference_mode():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
            if i:  # the first run pays one-off allocation and kernel selection
                best = min(best, time.perf_counter() - t0)
    return best


def measure_prefill_choice(
    model: Any,
    candidates: tuple[str, ...] = PREFILL_DTYPES,
    tokens: int = PROBE_TOKENS,
    repeats: int = 3,
    timer: Callable[[Any, int, int], float] = _time_prefill,
) -> KernelChoice:
    """Time a prefill in each candidate precision and pick the fastest that beats fp32 by ``MIN_GAIN``."""
    from timebill.estimator.store import host_fingerprint

    tokens = min(tokens, int(getattr(model.config, "max_position_embeddings", tokens)) - 1)
    timings: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for dtype in candidates:
        try:
            timings[dtype] = 1e3 * timer(prefill_model(model, dtype), tokens, repeats)
        except (RuntimeError, NotImplementedError, TypeError) as exc:  # a kernel missing for this dtype here
            skipped[dtype] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
            _BF16_COPIES.pop(model, None)
    base = timings.get("float32", math.inf)
    chosen, reason = "float32", "fp32 is the safe default"
    for dtype, ms in sorted(timings.items(), key=lambda kv: kv[1]):
        if dtype == "float32":
            reason = "no candidate beat fp32 by 10 %" if len(timings) > 1 else reason
            break
        if ms * MIN_GAIN <= base:
            chosen = dtype
            reason = f"{dtype} prefill {base / ms:.2f}x faster than fp32 here"
            break
    if chosen == "float32":
        _BF16_COPIES.pop(model, None)  # do not keep a copy nobody will use
    return KernelChoice(chosen, timings, skipped, tokens, host_fingerprint(), reason)


def _cached_choice(
    kind: str, key_parts: tuple[str, ...], parse: Callable[[Any], Any], measure: Callable[[], Any]
) -> Any:
    """The choice cached for ``key_parts`` on this host (and torch, and choice version), else ``measure()``'d
    and saved atomically. A corrupt or old file is measured again, never trusted; a read-only cache costs a
    re-measure next time, nothing else."""
    from timebill.estimator.store import host_fingerprint

    key = "\0".join((host_fingerprint(), *key_parts, torch.__version__, str(CHOICE_VERSION)))
    path = cache_dir() / "kernels" / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        try:
            return parse(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError, OSError) as exc:  # wrong-typed fields included
            logger.warning("ignoring unreadable kernel choice %s (%s); measuring again", path, exc)
    choice = measure()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomically(path, (json.dumps(choice.to_dict(), indent=2) + "\n").encode())
    except OSError as exc:
        logger.warning("could not cache the kernel choice at %s: %s", path, exc)
    return choice


def choose_prefill(model: Any, model_fingerprint: str, threads: int) -> KernelChoice:
    """The cached prefill choice for this host/model/threads/torch, or a fresh measurement (saved atomically)."""

    def measure() -> KernelChoice:
        torch.set_num_threads(threads)
        choice = measure_prefill_choice(model)
        logger.info("prefill kernel choice here: %s (%s) %s", choice.prefill_dtype, choice.reason, choice.timings_ms)
        return choice

    return _cached_choice("prefill", (model_fingerprint, str(threads)), KernelChoice.from_dict, measure)


# ------------------------------------------------------------------------------------- decode: KV dtype
@dataclass(frozen=True)
class DecodeChoice:
    """The chosen KV-cache dtype of a quantised decode step, with each candidate's measured step time.

    Why measured: a decode step over a long prompt reads the whole cache; SDPA's bf16 kernel reads half
    the bytes, which pays where the CPU converts bf16 natively and costs where it is emulated. The int8
    and int4 steps already round to bf16 (int4's activations) or ~8 bits, so a bf16 cache keeps the
    mode's quality; fp32 weights keep an fp32 cache (their contract is HF's exact tokens).
    """

    kv_dtype: str
    weights: str
    timings_ms: dict[str, float] = field(default_factory=dict)  # candidate -> median step time at ``context``
    skipped: dict[str, str] = field(default_factory=dict)
    context: int = KV_PROBE_CONTEXT
    host: str = ""
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"version": CHOICE_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Any) -> DecodeChoice:
        if not isinstance(data, dict) or data.get("version") != CHOICE_VERSION:
            raise ValueError("not a kernel choice of this version")
        if data.get("kv_dtype") not in KV_DTYPES:
            raise ValueError(f"unknown KV dtype {data.get('kv_dtype')!r}")
        return cls(
            kv_dtype=data["kv_dtype"],
            weights=str(data.get("weights", "")),
            timings_ms={str(k): float(v) for k, v in dict(data.get("timings_ms", {})).items()},
            skipped={str(k): str(v) for k, v in dict(data.get("skipped", {})).items()},
            context=int(data.get("context", KV_PROBE_CONTEXT)),
            host=str(data.get("host", "")),
            reason=str(data.get("reason", "")),
        )


def _time_kv(decoder: Any, dtype: str, context: int, steps: int) -> float:
    """Median seconds of one decode step of ``decoder`` over a ``context``-token cache held in ``dtype``."""
    from timebill.fastpath import StaticKVCache

    dt = getattr(torch, dtype)
    cache = StaticKVCache(decoder.n_layers, decoder.n_kv, decoder.head_dim, context + steps + 2, dt)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        cache.k[:, :, :context].normal_()
        cache.v[:, :, :context].normal_()
    cache.length = context
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        decoder.step(cache, 1 + i, context + i)
        if i:  # the first step pays one-off kernel selection
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_kv_choice(
    decoder: Any,
    candidates: tuple[str, ...] = KV_DTYPES,
    context: int = KV_PROBE_CONTEXT,
    steps: int = 12,
    timer: Callable[[Any, str, int, int], float] = _time_kv,
) -> DecodeChoice:
    """Time a quantised decode step with the cache in each candidate dtype; bf16 only if it is clearly faster.

    fp32 is both the safe default and the tie-breaker (exact values, no conversion per step).
    """
    from timebill.estimator.store import host_fingerprint

    context = max(1, min(context, int(decoder.max_positions) - steps - 2))
    timings: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for dtype in candidates:
        try:
            timings[dtype] = 1e3 * timer(decoder, dtype, context, steps)
        except (RuntimeError, NotImplementedError, TypeError) as exc:  # no kernel for this dtype here
            skipped[dtype] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
    base = timings.get("float32", math.inf)
    chosen, reason = "float32", "fp32 is the safe default"
    fastest = min(timings, key=timings.__getitem__, default="float32")
    if fastest != "float32" and timings[fastest] * MIN_GAIN <= base:
        chosen, reason = (
            fastest,
            f"{fastest} KV step {base / timings[fastest]:.2f}x faster than fp32 at {context} tokens",
        )
    elif len(timings) > 1:
        reason = "no candidate beat an fp32 cache by 10 %"
    return DecodeChoice(chosen, decoder.weights, timings, skipped, context, host_fingerprint(), reason)


def choose_kv(decoder: Any, model_fingerprint: str, threads: int) -> DecodeChoice:
    """The cached KV-dtype choice for this host/model/weights/threads/torch, or a fresh measurement."""

    def measure() -> DecodeChoice:
        torch.set_num_threads(threads)
        choice = measure_kv_choice(decoder)
        logger.info(
            "KV cache choice here (%s): %s (%s) %s", decoder.weights, choice.kv_dtype, choice.reason, choice.timings_ms
        )
        return choice

    return _cached_choice("decode", (model_fingerprint, decoder.weights, str(threads)), DecodeChoice.from_dict, measure)


# ------------------------------------------------------------------------------------- thread count
THREAD_PROBE_TOKENS = 128


@dataclass(frozen=True)
class ThreadChoice:
    """The chosen torch intra-op thread count, with each candidate's measured prefill time.

    Why measured: on a host with SMT, two threads on one core share its vector units, and a compute-bound
    prefill can run as fast (or faster, with less contention) on one thread per core; on a plain vCPU
    machine every thread is a core. Which holds is a property of the host, so it is timed, not assumed.
    """

    threads: int
    timings_ms: dict[str, float] = field(default_factory=dict)  # str(thread count) -> best prefill time
    probe_tokens: int = THREAD_PROBE_TOKENS
    host: str = ""
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"version": CHOICE_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Any) -> ThreadChoice:
        if not isinstance(data, dict) or data.get("version") != CHOICE_VERSION:
            raise ValueError("not a kernel choice of this version")
        threads = data.get("threads")
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ValueError(f"bad thread count {threads!r}")
        return cls(
            threads=threads,
            timings_ms={str(k): float(v) for k, v in dict(data.get("timings_ms", {})).items()},
            probe_tokens=int(data.get("probe_tokens", THREAD_PROBE_TOKENS)),
            host=str(data.get("host", "")),
            reason=str(data.get("reason", "")),
        )


def thread_candidates(available: int | None = None) -> tuple[int, ...]:
    """All available CPUs, and half of them (one thread per core where SMT pairs them), largest first."""
    from timebill.estimator.store import usable_cpus

    n = max(1, usable_cpus() if available is None else int(available))
    return tuple(sorted({n, max(1, n // 2)}, reverse=True))


def _time_prefill_at(model: Any, threads: int, tokens: int, repeats: int) -> float:
    torch.set_num_threads(threads)
    return _time_prefill(model, tokens, repeats)


def measure_thread_choice(
    model: Any,
    candidates: tuple[int, ...] | None = None,
    tokens: int = THREAD_PROBE_TOKENS,
    repeats: int = 2,
    rounds: int = 2,
    timer: Callable[[Any, int, int, int], float] = _time_prefill_at,
) -> ThreadChoice:
    """Time an fp32 prefill at each candidate thread count (interleaved ``rounds`` times, so drift hits all
    alike) and keep the most threads unless fewer are faster by ``MIN_GAIN``. torch's setting is restored."""
    from timebill.estimator.store import host_fingerprint

    candidates = tuple(sorted(set(candidates or thread_candidates()), reverse=True))
    if not candidates or min(candidates) < 1:
        raise ValueError(f"thread candidates must be >= 1, got {candidates}")
    tokens = min(tokens, int(getattr(model.config, "max_position_embeddings", tokens)) - 1)
    before = torch.get_num_threads()
    best = dict.fromkeys(candidates, math.inf)
    try:
        for _ in range(rounds):
            for n in candidates:
                best[n] = min(best[n], timer(model, n, tokens, repeats))
    finally:
        torch.set_num_threads(before)
    most = candidates[0]
    chosen, reason = most, "all available CPUs"
    fastest = min(best, key=best.__getitem__)
    if fastest != most and best[fastest] * MIN_GAIN <= best[most]:
        chosen = fastest
        reason = f"{fastest} threads prefill {best[most] / best[fastest]:.2f}x faster than {most} here"
    elif len(candidates) > 1:
        reason = f"all {most} available CPUs (fewer threads were not 10 % faster)"
    timings = {str(n): 1e3 * t for n, t in best.items()}
    return ThreadChoice(chosen, timings, tokens, host_fingerprint(), reason)


def choose_threads(model: Any, model_fingerprint: str) -> ThreadChoice:
    """The cached thread-count choice for this host/model/torch and CPU set, or a fresh measurement."""
    candidates = thread_candidates()

    def measure() -> ThreadChoice:
        choice = measure_thread_choice(model, candidates)
        logger.info("thread count choice here: %d (%s) %s", choice.threads, choice.reason, choice.timings_ms)
        return choice

    key = (model_fingerprint, ",".join(map(str, candidates)))
    return _cached_choice("threads", key, ThreadChoice.from_dict, measure)
