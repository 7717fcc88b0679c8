"""Profiling: time the engine's *own* prefill, eviction and decode step over grids of token counts.

What is timed is exactly what a request runs, not a stand-in loop:

* prefill — :meth:`Engine.prefill` with ``capture=True`` (the facade's call: SnapKV scores are
  recorded during the forward because α is chosen only after it), same attention implementation,
  same threads;
* eviction — :meth:`Engine.evict` on that prefill's state (α cycling over ``evict_alphas``; scoring for
  key-only presses + the per-head gather); it sits on the request's critical path;
* decode set-up — :meth:`Engine.begin_decode` (the fast path copies the kept KV into its static cache);
* decode step — :meth:`Engine.decode_step`, the method :meth:`Engine.decode` loops over, on a cache
  of ``N_kv`` real tokens (a prefix of one long prefill, copied into a fresh cache the way prefill
  builds one), followed by the same ``argmax → int`` the loop does.

Noise controls, because this machine is shared (2 cores, other people's jobs):

* warm-up before measuring, ``gc.collect()`` before each sample (cheap: survivors are frozen first),
  threads pinned to the engine's;
* every (point, repeat) sample runs in a random order (seeded), so slow drift of the machine is
  spread over the grid as noise instead of bending the curve;
* each sample is checked for **contention**: ``/proc/stat`` says how much CPU *other* processes used
  while we timed; a sample during which others used more than ``contention_cores`` is re-measured
  (up to ``max_retries`` times, after waiting — from a bounded budget — for the neighbours to go quiet;
  the least-contended attempt is kept and counted);
* decode steps are fast (tens of ms), so one sample is the **mean** of ``steps_per_sample``
  consecutive steps (the cache grows by one token per step; the sample is placed at their mean
  ``N_kv``). The mean, not the median, because a request's decode time is the *sum* of its steps:
  the occasional slow step (a page fault, a scheduler hiccup) is part of it, and the median of 8 steps
  runs ~1.5 % below their mean here. Samples hit by a neighbour are rejected by the median *across*
  repeats;
* per point the median over repeats is what gets fitted; the spread (MAD/median, CV) is kept as the
  noise measurement and turned into a MAPE *noise floor* (what a perfect model would score).

On a GPU every timed region is bracketed by :meth:`Engine.synchronize`, so the clock measures the
kernels, not their launch.
"""

from __future__ import annotations

import gc
import inspect
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from timebill.errors import InvalidInputError
from timebill.options import COMPRESSOR_NAMES, check_compressor
from timebill.progress import progress_bar

if TYPE_CHECKING:  # the engine imports torch; the estimator package must stay importable without it
    from timebill.engine import Engine
    from timebill.estimator.store import Profile

#: Default longest response the profile must cover (the engine's default ``max_new_tokens``): prefill is
#: profiled up to ``context - DEFAULT_N_MAX`` so that a profiled prompt still leaves room to answer.
DEFAULT_N_MAX = 256

# Modules whose docstrings are the profiling text: real English prose, on every Python install, no I/O.
_TEXT_MODULES = (
    "argparse",
    "asyncio",
    "collections",
    "concurrent.futures",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "email",
    "functools",
    "http.client",
    "inspect",
    "json",
    "logging",
    "multiprocessing",
    "pathlib",
    "pickle",
    "random",
    "re",
    "shutil",
    "socket",
    "sqlite3",
    "statistics",
    "subprocess",
    "tarfile",
    "threading",
    "typing",
    "unittest",
    "urllib.request",
    "zipfile",
)


# --------------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------------


def _dedupe_sorted(values: Sequence[float]) -> tuple[int, ...]:
    return tuple(sorted({int(round(v)) for v in values}))


def _tail(start: int, high: int, n: int) -> list[float]:
    """``n`` evenly spaced points after ``start`` up to ``high`` (none when ``high`` is not beyond it)."""
    return np.linspace(start, high, n + 1)[1:].tolist() if high > start else []


def _spread(low: int, knee: int, high: int, n_linear: int) -> tuple[int, ...]:
    """Doublings from ``low`` to ``knee``, then ``n_linear`` evenly spaced points up to ``high``.

    Short inputs are cheap and have the largest *relative* errors (fixed costs dominate), so they get
    geometric spacing; long inputs are expensive and the quadratic term lives there, so they are spaced
    evenly to pin its curvature.
    """
    geometric: list[float] = []
    n = float(low)
    while n < knee:
        geometric.append(n)
        n *= 2
    linear = np.linspace(knee, high, n_linear + 1) if high > knee else np.array([float(knee)])
    return _dedupe_sorted([*geometric, *linear.tolist()])


@dataclass(frozen=True)
class ProfileGrid:
    """What to measure and how often (token counts are prompt lengths / cached-token counts).

    Repeats are spent where they are cheap: on this class of machine one sample varies by ~4 % (prefill)
    to ~5 % (median of 8 decode steps) from neighbours and host-level drift, so a point's median needs
    many repeats to be precise, and short prompts and decode steps cost little. ``repeat_tiers`` gives
    prompt lengths up to a bound more repeats; longer prompts get ``repeats``.
    """

    name: str
    prefill_n: tuple[int, ...]
    decode_n_kv: tuple[int, ...]
    evict_alphas: tuple[float, ...] = (0.25, 0.75)  # one per prefill sample, cycling with the repeat
    repeats: int = 5
    repeat_tiers: tuple[tuple[int, int], ...] = ()  # (largest prompt length, repeats), ascending
    decode_repeats: int = 5
    steps_per_sample: int = 8
    warmup_steps: int = 1
    max_retries: int = 2
    contention_cores: float = 0.2
    # Total time the run may wait for neighbours to go quiet before retries (a sample hit by another
    # process is worthless, so a run waits out a burst rather than record it; bounded so it ends).
    max_wait_s: float = 60.0
    seed: int = 0
    # Prompt compressors whose cost (layout + scoring + selection at ρ = 0.5) is profiled, on every other
    # prompt length of the grid, ``compress_repeats`` times each (their cost is small next to a prefill,
    # except gemfilter's early-exit forward).
    compressors: tuple[str, ...] = COMPRESSOR_NAMES
    compress_repeats: int = 2

    def __post_init__(self) -> None:
        if len(set(self.prefill_n)) < 3 or len(set(self.decode_n_kv)) < 2:
            raise InvalidInputError("a profile grid needs >= 3 prompt lengths and >= 2 cache lengths to fit")
        if min(self.prefill_n) < 2 or min(self.decode_n_kv) < 1:
            raise InvalidInputError("prompt lengths must be >= 2 tokens and cache lengths >= 1")
        if not all(0.0 < a < 1.0 for a in self.evict_alphas):
            raise InvalidInputError(f"evict_alphas must lie in (0, 1), got {self.evict_alphas}")
        for name in self.compressors:
            check_compressor(name)
        for name in ("repeats", "decode_repeats", "steps_per_sample", "compress_repeats"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be >= 1")
        if any(r < 1 for _, r in self.repeat_tiers):
            raise InvalidInputError("repeat_tiers repeats must be >= 1")
        if self.warmup_steps < 0 or self.max_retries < 0 or self.max_wait_s < 0 or self.contention_cores <= 0:
            raise InvalidInputError("warmup_steps, max_retries and max_wait_s must be >= 0, contention_cores > 0")

    def prefill_repeats(self, n: int) -> int:
        """Repeats for a prompt of ``n`` tokens (the first tier whose bound covers it, else ``repeats``)."""
        for bound, repeats in sorted(self.repeat_tiers):
            if n <= bound:
                return repeats
        return self.repeats

    @property
    def compress_n(self) -> tuple[int, ...]:
        """Prompt lengths the compressors are timed at: every other grid length from 64 up, and the longest."""
        lengths = sorted(n for n in set(self.prefill_n) if n >= 64) or sorted(set(self.prefill_n))
        return _dedupe_sorted([*lengths[::2], lengths[-1]])

    @property
    def steps_consumed(self) -> int:
        """Cache growth during one decode sample (warm-up + timed steps)."""
        return self.warmup_steps + self.steps_per_sample

    def check_fits(self, context_length: int) -> None:
        """Refuse a grid that would run past the model's context (RoPE positions beyond it are untrained)."""
        if max(self.prefill_n) >= context_length:
            raise InvalidInputError(
                f"grid prompt length {max(self.prefill_n)} does not fit the context ({context_length})"
            )
        if max(self.decode_n_kv) + self.steps_consumed >= context_length:
            raise InvalidInputError(
                f"grid cache length {max(self.decode_n_kv)} + {self.steps_consumed} decode steps does "
                f"not fit the context ({context_length})"
            )

    @classmethod
    def quick(cls, context_length: int, n_max: int = DEFAULT_N_MAX) -> ProfileGrid:
        """A few minutes on SmolLM2-135M / 2 CPU cores: the whole usable range, sparsely beyond 2048 tokens.

        Dense (3-5 repeats) up to 2048 prompt / 4096 cached tokens, then three evenly spaced prompt
        lengths up to ``context - n_max`` and two cache lengths up to the context, 2 repeats each. The
        tail is not optional: a fit that stops at 2048 extrapolates its quadratic to the 4-8k-token
        prompts a long-context suite sends, and on AMD EPYC family 25 it under-predicted their prefill
        by up to 1.9x (measured on bench-v2 part 1/2, 2026-12-04) — a plan built on that is late.
        """
        top_prefill = max(64, context_length - n_max)
        dense_prefill = min(2048, top_prefill)
        warmup_steps, steps_per_sample = 1, 6
        top_decode = max(64, context_length - warmup_steps - steps_per_sample - 1)
        dense_decode = min(4096, top_decode)
        return cls(
            name="quick",
            prefill_n=_dedupe_sorted([*_spread(16, 256, dense_prefill, 5), *_tail(dense_prefill, top_prefill, 3)]),
            decode_n_kv=_dedupe_sorted([*_spread(16, 256, dense_decode, 5), *_tail(dense_decode, top_decode, 2)]),
            repeats=2,
            repeat_tiers=((256, 5), (2048, 3)),
            decode_repeats=5,
            steps_per_sample=steps_per_sample,
            warmup_steps=warmup_steps,
            max_wait_s=15.0,
        )

    @classmethod
    def full(cls, context_length: int, n_max: int = DEFAULT_N_MAX) -> ProfileGrid:
        """The whole usable range: prompts up to ``context - n_max``, caches up to the context.

        21 prompt lengths (11 repeats up to 512 tokens, 7 up to 2048, 5 beyond) and 22 cache lengths
        (12 repeats of 8 steps): ~12 minutes on SmolLM2-135M / 2 CPU cores on a quiet machine, most of
        it long prefills; up to 10 minutes more when other processes' bursts have to be waited out.
        """
        top_prefill = max(1024, min(context_length - n_max, context_length - 1))
        warmup_steps, steps_per_sample = 1, 8
        top_decode = context_length - warmup_steps - steps_per_sample - 1
        extra = tuple(n for n in (384, 768) if n < top_prefill)
        return cls(
            name="full",
            prefill_n=_dedupe_sorted([*_spread(16, 512, top_prefill, 13), *extra]),
            decode_n_kv=_spread(16, 512, top_decode, 16),
            repeats=5,
            repeat_tiers=((512, 11), (2048, 7)),
            decode_repeats=12,
            steps_per_sample=steps_per_sample,
            warmup_steps=warmup_steps,
            max_wait_s=600.0,
        )

    @classmethod
    def tiny(cls) -> ProfileGrid:
        """A few seconds: for tests and smoke checks only (too few points for a trustworthy fit)."""
        return cls(
            name="tiny",
            prefill_n=(16, 32, 64, 96, 128),
            decode_n_kv=(16, 64, 128),
            evict_alphas=(0.5,),
            repeats=1,
            decode_repeats=1,
            steps_per_sample=3,
            max_retries=0,
            max_wait_s=0.0,
            compress_repeats=1,
        )


# --------------------------------------------------------------------------------------------------
# Contention: did another process use the CPU while we timed?
# --------------------------------------------------------------------------------------------------


def _read_cpu_ticks() -> tuple[int, int] | None:
    """(busy ticks of all CPUs, ticks of this process) from /proc; None where /proc is unavailable."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = fh.readline().split()
        # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait; steal is
        # time the hypervisor gave our vCPU to someone else, which slows us exactly like a neighbour.
        values = [int(v) for v in fields[1:9]]
        busy = sum(values) - values[3] - values[4]
        with open("/proc/self/stat", encoding="ascii") as fh:
            stat = fh.read()
        own = stat[stat.rindex(")") + 2 :].split()
        mine = int(own[11]) + int(own[12])  # utime, stime (fields 14, 15 of proc(5))
    except (OSError, ValueError, IndexError):
        return None
    return busy, mine


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class ContentionMeter:
    """Average number of cores *other* processes kept busy between :meth:`start` and :meth:`stop`.

    Tick accounting has 1/CLK_TCK (10 ms) resolution, so it is meaningful for samples of ≳100 ms (every
    prefill sample, and decode samples of several steps). Returns 0.0 where /proc is unavailable.
    """

    def __init__(self) -> None:
        self._t0 = 0.0
        self._ticks0: tuple[int, int] | None = None

    def start(self) -> None:
        self._ticks0 = _read_cpu_ticks()
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        wall = time.perf_counter() - self._t0
        ticks1 = _read_cpu_ticks()
        if self._ticks0 is None or ticks1 is None or wall <= 0:
            return 0.0
        others = (ticks1[0] - self._ticks0[0]) - (ticks1[1] - self._ticks0[1])
        return max(0.0, others / _CLOCK_TICKS / wall)


def others_cores_now(window_s: float = 0.3) -> float:
    """Cores other processes are using right now (measured over ``window_s`` while we sleep)."""
    meter = ContentionMeter()
    meter.start()
    time.sleep(window_s)
    return meter.stop()


def wait_for_quiet(threshold_cores: float, max_wait_s: float, window_s: float = 0.3) -> float:
    """Sleep until other processes use at most ``threshold_cores`` (or ``max_wait_s`` passes).

    Returns the seconds waited. Used before re-measuring a contended sample, and by the benchmarks
    before each request: on a shared machine, a neighbour's burst is noise, not the thing measured.
    """
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait_s:
        if others_cores_now(window_s) <= threshold_cores:
            break
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------
# Measurement records
# --------------------------------------------------------------------------------------------------


@dataclass
class _Sample:
    kind: str  # prefill | decode | evict | setup
    n: float  # prompt tokens (prefill, evict) or mean cached tokens over the timed steps (decode)
    seconds: float
    repeat: int
    contention: float  # other processes' cores during the sample
    retries: int
    alpha: float = 0.0
    grid_n: int = 0  # the grid point the sample belongs to (decode: the cache length at its start)
    compressor: str = ""  # compress samples: which compressor


@dataclass
class ProfileRun:
    """Raw result of :func:`measure`: every sample plus the conditions it was taken under."""

    grid: ProfileGrid
    samples: list[_Sample] = field(default_factory=list)
    threads: int = 0
    device: str = "cpu"
    wall_s: float = 0.0
    contention_threshold: float = 0.0
    n_max: int = DEFAULT_N_MAX  # new-token capacity the decode samples' caches were sized for
    waited_s: float = 0.0  # time spent waiting for neighbours to go quiet (included in wall_s)

    def measurements(self) -> dict[str, Any]:
        """JSON-ready raw data (what :class:`~timebill.estimator.store.Profile` keeps for audit/refit)."""

        def rows(kind: str) -> list[list[float]]:
            return [
                [s.grid_n, round(s.n, 3), s.seconds, s.repeat, round(s.contention, 3), s.retries]
                for s in self.samples
                if s.kind == kind
            ]

        return {
            "columns": ["grid_n", "n", "seconds", "repeat", "others_cores", "retries"],
            "prefill": rows("prefill"),
            "decode": rows("decode"),
            "setup": rows("setup"),
            "evict": [
                [s.grid_n, s.alpha, s.seconds, s.repeat, round(s.contention, 3), s.retries]
                for s in self.samples
                if s.kind == "evict"
            ],
            "evict_columns": ["n", "alpha", "seconds", "repeat", "others_cores", "retries"],
            # Per compressor, rows like prefill's: n is the original prompt length it compressed.
            "compress": {
                name: [
                    [s.grid_n, s.n, s.seconds, s.repeat, round(s.contention, 3), s.retries]
                    for s in self.samples
                    if s.kind == "compress" and s.compressor == name
                ]
                for name in self.grid.compressors
            },
            "grid": {
                "name": self.grid.name,
                "prefill_n": list(self.grid.prefill_n),
                "decode_n_kv": list(self.grid.decode_n_kv),
                "evict_alphas": list(self.grid.evict_alphas),
                "repeats": self.grid.repeats,
                "repeat_tiers": [list(t) for t in self.grid.repeat_tiers],
                "decode_repeats": self.grid.decode_repeats,
                "steps_per_sample": self.grid.steps_per_sample,
                "warmup_steps": self.grid.warmup_steps,
                "max_retries": self.grid.max_retries,
                "contention_cores": self.grid.contention_cores,
                "max_wait_s": self.grid.max_wait_s,
                "seed": self.grid.seed,
                "compressors": list(self.grid.compressors),
                "compress_n": list(self.grid.compress_n),
                "compress_repeats": self.grid.compress_repeats,
            },
            "threads": self.threads,
            "device": self.device,
            "n_max": self.n_max,
            "wall_s": round(self.wall_s, 2),
            "waited_s": round(self.waited_s, 2),
        }


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


def profiling_text() -> str:
    """Real English prose (standard-library docstrings) to tokenise into prompts of exact lengths."""
    import importlib

    parts: list[str] = []
    for name in _TEXT_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # pragma: no cover - a stripped Python install
            continue
        doc = inspect.getdoc(module)
        if doc:
            parts.append(doc)
    text = "\n\n".join(parts)
    if not text.strip():  # pragma: no cover
        text = "The quick brown fox jumps over the lazy dog. " * 100
    return text


def prompt_ids(engine: Engine, n_tokens: int) -> list[int]:
    """Exactly ``n_tokens`` ids of real text (repeated if the text is shorter)."""
    ids = list(engine.tokenizer.encode(profiling_text(), add_special_tokens=False))
    if not ids:  # pragma: no cover
        raise InvalidInputError("the tokenizer produced no tokens for the profiling text")
    while len(ids) < n_tokens:
        ids = ids + ids
    return ids[:n_tokens]


def prompt_text(engine: Engine, ids: list[int]) -> str:
    """Text of about ``len(ids)`` tokens (decoded ids; re-tokenising may shift the count by a few)."""
    return engine.tokenizer.decode(ids, skip_special_tokens=True)


def _clone_cache(cache: Any, length: int | None = None) -> Any:
    """A fresh DynamicCache holding copies of the first ``length`` tokens of every layer.

    Built through ``Cache.update`` — the call the attention layers make during prefill — so the result
    has the same layout (contiguous tensors created by ``torch.cat``) as a prefill of ``length`` tokens.
    """
    from transformers import DynamicCache

    fresh = DynamicCache()
    for idx, layer in enumerate(cache.layers):
        keys, values = layer.keys, layer.values
        if length is not None:
            keys, values = keys[:, :, :length], values[:, :, :length]
        fresh.update(keys.clone(), values.clone(), idx)
    return fresh


def _timed(engine: Engine, fn: Callable[[], Any], meter: ContentionMeter) -> tuple[float, float, Any]:
    """(seconds, others' cores, result) of ``fn()``, synchronised on both sides (GPU-correct)."""
    gc.collect()
    engine.synchronize()
    meter.start()
    t0 = time.perf_counter()
    out = fn()
    engine.synchronize()
    seconds = time.perf_counter() - t0
    return seconds, meter.stop(), out


class _WaitBudget:
    """Total seconds a profiling run may spend waiting for other processes to go quiet."""

    def __init__(self, seconds: float) -> None:
        self.left = seconds
        self.used = 0.0

    def wait(self, threshold: float) -> None:
        if self.left <= 0:
            return
        waited = wait_for_quiet(threshold, min(self.left, 60.0))
        self.left -= waited
        self.used += waited


def _with_retries(
    grid: ProfileGrid, attempt: Callable[[], tuple[float, float, Any]], budget: _WaitBudget | None = None
) -> tuple[float, float, int, Any]:
    """Run ``attempt`` until a sample is uncontended (or retries run out); keep the least contended one.

    Before a retry, wait (from a bounded budget) until the neighbours are quiet: an immediate retry would
    mostly hit the same burst.
    """
    best: tuple[float, float, Any] | None = None
    retries = 0
    for i in range(grid.max_retries + 1):
        seconds, contention, out = attempt()
        if best is None or contention < best[1]:
            best = (seconds, contention, out)
        if contention <= grid.contention_cores:
            break
        retries = i + 1
        if i < grid.max_retries and budget is not None:
            budget.wait(grid.contention_cores)
    assert best is not None
    return best[0], best[1], retries, best[2]


class _Progress:
    """A work-weighted progress bar on stderr (tqdm), or nothing."""

    def __init__(self, enabled: bool, total: float, desc: str) -> None:
        self._bar = None
        if enabled:
            self._bar = progress_bar(
                total,
                "work",
                desc,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {postfix}",
                dynamic_ncols=True,
            )

    def update(self, work: float, note: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(min(work, self._bar.total - self._bar.n))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def measure(
    engine: Engine,
    grid: ProfileGrid,
    press: str = "snapkv",
    progress: bool = True,
    n_max: int = DEFAULT_N_MAX,
) -> ProfileRun:
    """Time prefill, eviction and decode steps over ``grid`` on ``engine`` (see the module docstring)."""
    import torch

    from timebill.presses import make_press

    make_press(press)  # clear error for an unknown press before any work
    grid.check_fits(engine.context_length)
    if torch.get_num_threads() != engine.threads:
        torch.set_num_threads(engine.threads)  # another library may have changed it since load
    run = ProfileRun(grid=grid, threads=torch.get_num_threads(), device=str(engine.device), n_max=n_max)
    run.contention_threshold = grid.contention_cores
    t_run = time.perf_counter()
    meter = ContentionMeter()
    budget = _WaitBudget(grid.max_wait_s)
    longest = max(max(grid.prefill_n), max(grid.decode_n_kv))
    ids = prompt_ids(engine, longest + grid.steps_consumed + 1)

    # Work units for the progress bar: roughly proportional to time (prefill ~ N + N²/4000, the eviction
    # after it ~5 % more; a decode sample ~40 ms per step).
    def prefill_work(n: int) -> float:
        return 0.05 + n / 1000 + n * n / 4e6

    tasks = [("prefill", n, r) for n in grid.prefill_n for r in range(grid.prefill_repeats(n))]
    tasks += [("decode", n, r) for n in grid.decode_n_kv for r in range(grid.decode_repeats)]
    repeats = range(grid.compress_repeats)
    tasks += [(f"compress:{c}", n, r) for c in grid.compressors for n in grid.compress_n for r in repeats]
    random.Random(grid.seed).shuffle(tasks)
    texts = {n: prompt_text(engine, ids[:n]) for n in grid.compress_n} if grid.compressors else {}
    decode_work = 0.04 * grid.steps_consumed

    def work(kind: str, n: int) -> float:
        if kind == "prefill":
            return prefill_work(n) * 1.05
        if kind == "decode":
            return decode_work
        return prefill_work(n) * (0.45 if kind == "compress:gemfilter" else 0.05)

    total_work = prefill_work(max(grid.decode_n_kv)) + sum(work(kind, n) for kind, n, _ in tasks)
    bar = _Progress(progress, total_work, f"profiling ({grid.name})")
    # A full garbage collection of a process holding torch + transformers takes ~0.2 s. Collect once,
    # then freeze the survivors, so the collection before each sample (which keeps a GC pause out of
    # the timed region) only scans the few objects made since: the run stays short.
    gc.collect()
    gc.freeze()
    try:
        with torch.inference_mode():
            # Warm-up: one-off allocations and lazy initialisation must not land in a sample.
            engine.evict(engine.prefill(ids[: min(256, longest)], press=press, capture=True), 0.5)
            for name in grid.compressors:
                engine.compressor(name)  # built and warmed once, as a serving engine does before requests
            # The cache every decode sample copies its prefix from: one real prefill of the longest length.
            base_len = max(grid.decode_n_kv) + 1
            base = engine.prefill(ids[:base_len], press=press, capture=False).cache
            bar.update(prefill_work(base_len), "decode base cache")
            for kind, n, rep in tasks:
                if kind == "prefill":
                    _measure_prefill(engine, grid, press, ids[:n], rep, meter, run, budget)
                    bar.update(prefill_work(n) * 1.05, f"prefill N={n}")
                elif kind == "decode":
                    _measure_decode(engine, grid, press, base, ids, n, rep, meter, run, n_max, budget)
                    bar.update(decode_work, f"decode N_kv={n}")
                else:
                    name = kind.split(":", 1)[1]
                    _measure_compress(engine, grid, name, texts[n], n, rep, meter, run, budget)
                    bar.update(work(kind, n), f"{name} N={n}")
    finally:
        gc.unfreeze()
        bar.close()
    run.wall_s = time.perf_counter() - t_run
    run.waited_s = budget.used
    return run


def _measure_prefill(
    engine: Engine,
    grid: ProfileGrid,
    press: str,
    ids: list[int],
    rep: int,
    meter: ContentionMeter,
    run: ProfileRun,
    budget: _WaitBudget,
) -> None:
    n = len(ids)
    seconds, contention, retries, state = _with_retries(
        grid, lambda: _timed(engine, lambda: engine.prefill(ids, press=press, capture=True), meter), budget
    )
    run.samples.append(_Sample("prefill", n, seconds, rep, contention, retries, grid_n=n))
    # The eviction that follows this prefill in a request: one α per sample, cycling over the repeats.
    # The state is not needed afterwards, so it is evicted in place (no copy on the timed path).
    alpha = grid.evict_alphas[rep % len(grid.evict_alphas)]
    ev_seconds, ev_contention, _ = _timed(engine, lambda: engine.evict(state, alpha), meter)
    run.samples.append(_Sample("evict", n, ev_seconds, rep, ev_contention, 0, alpha=alpha, grid_n=n))


def _measure_compress(
    engine: Engine,
    grid: ProfileGrid,
    name: str,
    text: str,
    grid_n: int,
    rep: int,
    meter: ContentionMeter,
    run: ProfileRun,
    budget: _WaitBudget,
) -> None:
    """One compressor sample: :meth:`Engine.compress` at ρ = 0.5 on real text (what a request pays)."""
    seconds, contention, retries, out = _with_retries(
        grid, lambda: _timed(engine, lambda: engine.compress(text, 0.5, name, chat=False), meter), budget
    )
    sample = _Sample("compress", out.original_tokens, seconds, rep, contention, retries, grid_n=grid_n, compressor=name)
    run.samples.append(sample)


def _measure_decode(
    engine: Engine,
    grid: ProfileGrid,
    press: str,
    base: Any,
    ids: list[int],
    n_kv: int,
    rep: int,
    meter: ContentionMeter,
    run: ProfileRun,
    n_max: int,
    budget: _WaitBudget,
) -> None:
    """One decode sample: an ``n_kv``-token cache → ``begin_decode`` (timed) → warm-up → timed steps.

    The state is what :meth:`Engine.decode` receives after prefill and eviction, and the calls are the
    ones it makes: :meth:`Engine.begin_decode` (moving the KV into the decode path's cache, sized for
    ``n_max`` new tokens — on the request's critical path, so it is timed too), then
    :meth:`Engine.decode_step` + ``argmax``.
    """
    from timebill.engine import PrefillState

    def attempt() -> tuple[float, float, Any]:
        state = PrefillState(
            cache=_clone_cache(base, n_kv),
            prompt_tokens=n_kv,
            prompt_kv_len=n_kv,
            first_token=ids[n_kv],
            scores=None,
            t_start=0.0,
            prefill_s=0.0,
            press_name=press,
        )
        gc.collect()
        engine.synchronize()
        t0 = time.perf_counter()
        engine.begin_decode(state, min(n_max, engine.context_length - n_kv))
        engine.synchronize()
        setup_s = time.perf_counter() - t0
        token, position = ids[n_kv], n_kv
        for _ in range(grid.warmup_steps):
            token = int(engine.decode_step(state, token, position).argmax())
            position += 1
        gc.collect()
        start_kv = position
        times: list[float] = []
        engine.synchronize()
        meter.start()
        for _ in range(grid.steps_per_sample):
            t0 = time.perf_counter()
            token = int(engine.decode_step(state, token, position).argmax())  # as Engine.decode does
            times.append(time.perf_counter() - t0)
            position += 1
        contention = meter.stop()
        mean_kv = start_kv + (grid.steps_per_sample - 1) / 2
        return statistics.fmean(times), contention, (mean_kv, setup_s)

    seconds, contention, retries, (mean_kv, setup_s) = _with_retries(grid, attempt, budget)
    run.samples.append(_Sample("decode", mean_kv, seconds, rep, contention, retries, grid_n=n_kv))
    run.samples.append(_Sample("setup", n_kv, setup_s, rep, contention, retries, grid_n=n_kv))


def profile_engine(
    engine: Engine,
    grid: ProfileGrid | None = None,
    press: str = "snapkv",
    progress: bool = True,
    n_max: int = DEFAULT_N_MAX,
) -> Profile:
    """Measure ``engine`` over ``grid`` (default: the full grid) and fit the ETE: a ready-to-save Profile."""
    from timebill.estimator.profile_fit import fit_profile, profile_key_for

    grid = grid or ProfileGrid.full(engine.context_length, n_max)
    run = measure(engine, grid, press=press, progress=progress, n_max=n_max)
    shape = None
    try:
        from timebill.estimator.flops import ModelShape

        shape = ModelShape.from_config(engine.model.config)
    except InvalidInputError:  # pragma: no cover - a non-Llama config: fit still works, no FLOPs check
        shape = None
    return fit_profile(profile_key_for(engine, press), run.measurements(), shape=shape)


__all__ = [
    "DEFAULT_N_MAX",
    "ContentionMeter",
    "others_cores_now",
    "wait_for_quiet",
    "ProfileGrid",
    "ProfileRun",
    "measure",
    "profile_engine",
    "profiling_text",
    "prompt_ids",
    "prompt_text",
]
