"""Engine speed, side by side in one run: prefill and decode tok/s at several prompt lengths.

Rows: HF ``model.generate`` on the same model; our engine on the HF path, and on the fast path in
fp32 (bit-exact with HF), int8 and int4 weights, at α=0 and with SnapKV eviction; with
``--llama-cpp``, llama.cpp on the same GGUF (``make bench-install``; it runs in a process of its own,
see ``llama_cpp_worker.py``). Decode tok/s is 1 / median per-token step time; prefill tok/s is
N / prefill time. EOS is disabled for the measurement so every run decodes the same number of steps.
The one-off cost of building each fast engine (weight packing, TorchScript scripting, warm-up) is
printed too: it is paid at load, never inside a request.

    flock /tmp/timebill-cpu.lock python benchmarks/engine_speed.py --threads 2 --llama-cpp

The machine is shared and noisy: every configuration is measured ``--repeats`` times, interleaved,
and the median is reported.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

from timebill.engine import Engine
from timebill.estimator.flops import ModelShape
from timebill.loading import default_gguf_path


def real_text_ids(engine: Engine, n_tokens: int) -> list[int]:
    """Exactly ``n_tokens`` token ids of real English text (Python's own licence and docs on disk)."""
    sources = [Path(sysconfig.get_paths()["stdlib"]) / name for name in ("LICENSE.txt", "../LICENSE.txt")]
    text = ""
    for path in sources:
        if path.is_file():
            text = path.read_text(errors="ignore")
            break
    if not text:
        import inspect
        import json as json_mod

        text = inspect.getsource(json_mod)
    ids = engine.tokenizer.encode(text)
    while len(ids) < n_tokens:
        ids = ids + ids
    return ids[:n_tokens]


def engine_run(engine: Engine, ids: list[int], alpha: float, steps: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) for one request through the production path."""
    state = engine.prefill(ids, press="snapkv", capture=alpha > 0)
    engine.evict(state, alpha)
    step_times = engine.decode(state, max_new_tokens=steps + 1).step_times_s
    return len(ids) / state.prefill_s, 1.0 / statistics.median(step_times)


class _TimingStreamer:
    """Records a timestamp each time ``generate`` emits a token (its first call carries the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_run(engine: Engine, ids: list[int], steps: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) for ``model.generate``, timed per token through a streamer."""
    streamer = _TimingStreamer()
    t0 = time.perf_counter()
    engine.model.generate(
        torch.tensor([ids]),
        max_new_tokens=steps + 1,
        min_new_tokens=steps + 1,
        do_sample=False,
        pad_token_id=0,
        streamer=streamer,
    )
    token_times = streamer.times[1:]  # drop the prompt echo
    step_times = [b - a for a, b in zip(token_times, token_times[1:], strict=False)]
    return len(ids) / (token_times[0] - t0), 1.0 / statistics.median(step_times)


def llama_cpp_run(ids: list[int], steps: int, threads: int, n_ctx: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) for llama.cpp on the same GGUF, in a fresh process (its OpenMP
    pool and torch's crash when they share one)."""
    job = {"model": str(default_gguf_path()), "threads": threads, "steps": steps, "n_ctx": n_ctx, "prompts": [ids]}
    worker = Path(__file__).with_name("llama_cpp_worker.py")
    out = subprocess.run(
        [sys.executable, str(worker)], input=json.dumps(job), capture_output=True, text=True, check=True
    )
    prefill, decode = json.loads(out.stdout)[0]
    return prefill, decode


def memory_bandwidth_gbs(size_mb: int = 512, repeats: int = 5) -> float:
    """Read bandwidth (GB/s) of a large fp32 sum, the bound for a memory-bound decode step."""
    a = torch.ones(size_mb * (1 << 20) // 4)
    a.sum()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return a.numel() * 4 / best / 1e9


def weight_bytes_per_token(engine: Engine, weights: str) -> float:
    """Bytes of weights a decode step reads (matmul weights; embeddings read one row).

    int4: 4 bits per layer weight plus a bf16 scale and zero per group of 32; the LM head is int8.
    """
    shape = ModelShape.from_config(engine.model.config)
    if weights == "int4":
        layers = shape.num_layers * shape.layer_matmul_params()
        return layers * (0.5 + 4 / 32) + shape.lm_head_params()
    return shape.matmul_params() * (1 if weights == "int8" else 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024, 2048])
    parser.add_argument("--steps", type=int, default=32, help="decode steps per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--llama-cpp",
        action="store_true",
        help="also run llama.cpp (make bench-install; a -march=native build with AMX kernels segfaulted here, "
        "so bench-install builds with GGML_NATIVE=OFF and AVX512)",
    )
    args = parser.parse_args()

    engine = Engine.load(None, threads=args.threads)
    hf_path = Engine(engine.model, engine.tokenizer, engine.source, args.threads, fast=False)
    hf_path.warmup()
    build_s: dict[str, float] = {}
    engines = {"fp32": engine}
    for weights in ("fp32", "int8", "int4"):
        t0 = time.perf_counter()
        eng = Engine(engine.model, engine.tokenizer, engine.source, args.threads, weights=weights)
        eng.warmup()
        build_s[weights] = time.perf_counter() - t0
        engines[weights] = eng
    for eng in (*engines.values(), hf_path):
        eng.stop_ids = set()  # measure a fixed number of steps
    fp32, int8, int4 = engines["fp32"], engines["int8"], engines["int4"]
    runners = {
        "hf generate": lambda ids: hf_run(engine, ids, args.steps),
        "ours hf-path a=0": lambda ids: engine_run(hf_path, ids, 0.0, args.steps),
        "ours fp32 a=0": lambda ids: engine_run(fp32, ids, 0.0, args.steps),
        "ours fp32 a=0.5": lambda ids: engine_run(fp32, ids, 0.5, args.steps),
        "ours fp32 a=0.9": lambda ids: engine_run(fp32, ids, 0.9, args.steps),
        "ours int8 a=0": lambda ids: engine_run(int8, ids, 0.0, args.steps),
        "ours int8 a=0.9": lambda ids: engine_run(int8, ids, 0.9, args.steps),
        "ours int4 a=0": lambda ids: engine_run(int4, ids, 0.0, args.steps),
        "ours int4 a=0.9": lambda ids: engine_run(int4, ids, 0.9, args.steps),
    }
    llama_note = "llama.cpp: not run (--llama-cpp to include it)"
    if args.llama_cpp:
        import importlib.metadata

        version = importlib.metadata.version("llama-cpp-python")  # raises if not installed: say so, loudly
        n_ctx = max(args.lengths) + args.steps + 8
        runners["llama.cpp Q4_1"] = lambda ids: llama_cpp_run(ids, args.steps, args.threads, n_ctx)
        llama_note = f"llama.cpp: llama-cpp-python {version}, same GGUF (Q4_1), n_batch 512, own process"

    print(
        f"# engine_speed  threads={torch.get_num_threads()}  model={engine.source.model_id}  "
        f"torch={torch.__version__}  date={time.strftime('%Y-%m-%d %H:%M')}"
    )
    print(f"# command: {' '.join(sys.argv)}")
    print(f"# {llama_note}")
    scripted = {w: bool(e.fast is not None and e.fast.scripted) for w, e in engines.items()}
    print(
        "# one-off build cost per fast engine (pack weights + TorchScript + warm-up, paid at load): "
        + ", ".join(f"{w} {build_s[w]:.1f} s (scripted={scripted[w]})" for w in build_s)
    )
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for n in args.lengths:
        ids = real_text_ids(engine, n)
        for _ in range(args.repeats):
            for name, run in runners.items():  # interleaved, so drift hits every row alike
                results.setdefault((name, n), []).append(run(ids))

    def med(name: str, n: int, i: int) -> float:
        return statistics.median(r[i] for r in results[(name, n)])

    print()
    print(f"{'config':<18}" + "".join(f"{'N=' + str(n):>20}" for n in args.lengths))
    print(f"{'':<18}" + "".join(f"{'prefill / decode':>20}" for _ in args.lengths))
    for name in runners:
        cells = "".join(f"{med(name, n, 0):>12.0f} /{med(name, n, 1):>6.1f}" for n in args.lengths)
        print(f"{name:<18}{cells}")
    print("(tok/s; decode = 1 / median per-token step time)")
    print()
    print("ratios (decode tok/s):")
    for n in args.lengths:
        base = med("hf generate", n, 1)
        own = med("ours hf-path a=0", n, 1)
        e0 = med("ours fp32 a=0", n, 1)
        e9 = med("ours fp32 a=0.9", n, 1)
        i8 = med("ours int8 a=0", n, 1)
        i4 = med("ours int4 a=0", n, 1)
        line = (
            f"  N={n:<5} hf-path/generate={own / base:5.3f}  fp32/generate={e0 / base:5.3f}  "
            f"a0.9/a0={e9 / e0:5.3f}  int8/generate={i8 / base:5.3f}  int4/generate={i4 / base:5.3f}"
        )
        if "llama.cpp Q4_1" in runners:
            lc = med("llama.cpp Q4_1", n, 1)
            line += f"  int4/llama.cpp={i4 / lc:5.3f}  int8/llama.cpp={i8 / lc:5.3f}  fp32/llama.cpp={e0 / lc:5.3f}"
        print(line)
    print()
    bw = memory_bandwidth_gbs()
    print(f"memory read bandwidth (fp32 sum of 512 MiB, best of 5): {bw:.1f} GB/s")
    for weights in ("fp32", "int8", "int4"):
        b = weight_bytes_per_token(engine, weights)
        print(
            f"  {weights}: weights {b / 1e9:.3f} GB/token -> floor {1e3 * b / bw / 1e9:.1f} ms/token "
            f"({bw * 1e9 / b:.0f} tok/s), plus KV {46 * 1024 * 2048 / 1e9:.3f} GB at N=2048 fp32 (half in bf16)"
        )


if __name__ == "__main__":
    main()
