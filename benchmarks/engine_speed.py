"""Engine speed, side by side in one run: prefill and decode tok/s at several prompt lengths.

Rows, per model (``--models default qwen2.5-coder-0.5b``): HF ``model.generate`` on the same model;
our engine on the HF path, and on the fast path in fp32 (bit-exact with HF), int8 and int4 weights with
the per-host kernel choice (``timebill.kernels``: bf16 prefill and a bf16 KV cache where this CPU
runs them faster), int4 with an fp32 prefill and int4 with an fp32 KV cache (what each choice gained),
int4 after SnapKV α = 0.9; with ``--llama-cpp``, llama.cpp on the same GGUF (``make bench-install``;
it runs in a process of its own, see ``llama_cpp_worker.py``). Also printed: this machine's matmul
peak per dtype (prefill's roof) and read bandwidth (decode's floor), and the issue's targets as MET /
MISSED. Decode tok/s is 1 / median
per-token step time; prefill tok/s is N / prefill time. EOS is disabled for the measurement so
every run decodes the same number of steps.
The one-off cost of building each fast engine (weight packing, TorchScript scripting, warm-up) is
printed too: it is paid at load, never inside a request.

    flock /tmp/timebill-cpu.lock python benchmarks/engine_speed.py --threads 2 --llama-cpp \
        --models default qwen2.5-coder-0.5b

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
from timebill.estimator.flops import ModelShape, prefill_flops
from timebill.estimator.store import cpu_model_name, cpu_signature
from timebill.kernels import cpu_capability


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


def llama_cpp_run(gguf: str, ids: list[int], steps: int, threads: int, n_ctx: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) for llama.cpp on the same GGUF, in a fresh process (its OpenMP
    pool and torch's crash when they share one)."""
    job = {"model": gguf, "threads": threads, "steps": steps, "n_ctx": n_ctx, "prompts": [ids]}
    worker = Path(__file__).with_name("llama_cpp_worker.py")
    out = subprocess.run(
        [sys.executable, str(worker)], input=json.dumps(job), capture_output=True, text=True, check=True
    )
    prefill, decode = json.loads(out.stdout)[0]
    return prefill, decode


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of a large square ``torch.mm`` per dtype (best of ``repeats``): the compute roof prefill
    is measured against. int8 uses ``torch._int_mm`` where this build has a CPU kernel for it."""
    out: dict[str, float] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8", torch.int8)):
        try:
            if dtype == torch.int8:
                a = torch.randint(-64, 64, (size, size), dtype=dtype)
                b = torch.randint(-64, 64, (size, size), dtype=dtype)

                def mm(a=a, b=b):
                    return torch._int_mm(a, b)
            else:
                a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)

                def mm(a=a, b=b):
                    return a @ b

            mm()
            best = math.inf
            for _ in range(repeats):
                t = time.perf_counter()
                mm()
                best = min(best, time.perf_counter() - t)
            out[name] = 2 * size**3 / best / 1e9
        except (RuntimeError, NotImplementedError) as exc:
            print(f"# matmul peak: {name} unavailable here ({str(exc).splitlines()[0][:80]})")
    return out


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


def model_gguf(engine: Engine) -> str | None:
    """The GGUF file the engine's weights came from (llama.cpp runs the same file), if any."""
    src = engine.source
    return str(Path(src.location) / src.gguf_file) if src is not None and src.gguf_file else None


def bench_model(model: str | None, args: argparse.Namespace, peaks: dict[str, float], bw: float) -> None:
    """Every row for one model, interleaved per length and repeat; prints the table, ratios and targets."""
    engine = Engine.load(model, threads=args.threads)
    hf_path = Engine(engine.model, engine.tokenizer, engine.source, args.threads, fast=False)
    hf_path.warmup()
    build_s: dict[str, float] = {}
    engines: dict[str, Engine] = {}
    for name, weights, prefill, kv in (
        ("fp32", "fp32", "auto", "auto"),
        ("int8", "int8", "auto", "auto"),
        ("int4", "int4", "auto", "auto"),
        ("int4 fp32-prefill", "int4", "float32", "auto"),
        ("int4 fp32-kv", "int4", "auto", "float32"),
    ):
        t0 = time.perf_counter()
        eng = Engine(
            engine.model, engine.tokenizer, engine.source, args.threads, weights=weights, prefill=prefill, kv_cache=kv
        )
        eng.warmup()
        build_s[name] = time.perf_counter() - t0
        engines[name] = eng
    for eng in (*engines.values(), hf_path):
        eng.stop_ids = set()  # measure a fixed number of steps
    runners = {
        "hf generate": lambda ids: hf_run(engine, ids, args.steps),
        "ours hf-path a=0": lambda ids: engine_run(hf_path, ids, 0.0, args.steps),
    }
    for name, eng in engines.items():
        runners[f"ours {name} a=0"] = lambda ids, eng=eng: engine_run(eng, ids, 0.0, args.steps)
    runners["ours int4 a=0.9"] = lambda ids: engine_run(engines["int4"], ids, 0.9, args.steps)
    llama_note = "llama.cpp: not run (--llama-cpp to include it)"
    gguf = model_gguf(engine)
    if args.llama_cpp and gguf is not None:
        import importlib.metadata

        version = importlib.metadata.version("llama-cpp-python")  # raises if not installed: say so, loudly
        n_ctx = max(args.lengths) + args.steps + 8
        runners["llama.cpp"] = lambda ids: llama_cpp_run(gguf, ids, args.steps, args.threads, n_ctx)
        llama_note = f"llama.cpp: llama-cpp-python {version}, the same GGUF ({Path(gguf).name}), n_batch 512"

    print()
    print(f"## model={engine.source.model_id}  ({model or 'default'})")
    print(f"# {llama_note}")
    scripted = {w: bool(e.fast is not None and e.fast.scripted) for w, e in engines.items()}
    print(
        "# one-off build cost per fast engine (pack weights + TorchScript + kernel choice + warm-up, paid at load): "
        + ", ".join(f"{w} {build_s[w]:.1f} s (scripted={scripted[w]})" for w in build_s)
    )
    print(f"# decode paths: {', '.join(f'{w}={e.decode_path}' for w, e in engines.items())}")
    for w, e in engines.items():
        choice = e.kernel_choice
        picked = (
            f"prefill {e.prefill_dtype} (measured here: "
            + ", ".join(f"{k} {v:.0f} ms" for k, v in choice.timings_ms.items())
            + f" for {choice.probe_tokens} tokens; {choice.reason})"
            if choice is not None
            else f"prefill {e.prefill_dtype} (fixed: {'fp32 weights keep HF-exact tokens' if w == 'fp32' else 'asked'})"
        )
        kv = str(e.fast.kv_dtype).removeprefix("torch.") if e.fast is not None else "n/a"
        kv_choice = e.kv_choice
        kv_how = (
            " (measured here: "
            + ", ".join(f"{k} {v:.1f} ms/step" for k, v in kv_choice.timings_ms.items())
            + f" at {kv_choice.context} tokens; {kv_choice.reason})"
            if kv_choice is not None
            else " (fixed)"
        )
        print(f"# kernels {w}: {picked}; KV cache {kv}{kv_how}")
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for n in args.lengths:
        ids = real_text_ids(engine, n)
        for _ in range(args.repeats):
            for name, run in runners.items():  # interleaved, so drift hits every row alike
                results.setdefault((name, n), []).append(run(ids))

    def med(name: str, n: int, i: int) -> float:
        return statistics.median(r[i] for r in results[(name, n)])

    print()
    print(f"{'config':<24}" + "".join(f"{'N=' + str(n):>20}" for n in args.lengths))
    print(f"{'':<24}" + "".join(f"{'prefill / decode':>20}" for _ in args.lengths))
    for name in runners:
        cells = "".join(f"{med(name, n, 0):>12.0f} /{med(name, n, 1):>6.1f}" for n in args.lengths)
        print(f"{name:<24}{cells}")
    print("(tok/s; decode = 1 / median per-token step time)")
    print()
    shape = ModelShape.from_config(engine.model.config)
    print("ratios:")
    for n in args.lengths:
        base = med("hf generate", n, 1)
        e0 = med("ours fp32 a=0", n, 1)
        i8, i4 = med("ours int8 a=0", n, 1), med("ours int4 a=0", n, 1)
        line = (
            f"  N={n:<5} decode: fp32/generate={e0 / base:5.3f}  int8/generate={i8 / base:5.3f}  "
            f"int4/generate={i4 / base:5.3f}  int4 step/fp32 step={e0 / i4:5.3f}"
        )
        if "llama.cpp" in runners:
            lc, lcp = med("llama.cpp", n, 1), med("llama.cpp", n, 0)
            best = max(e0, i8, i4)
            line += (
                f"  best ours/llama.cpp={best / lc:5.3f}  int4/llama.cpp={i4 / lc:5.3f}"
                f"  | prefill int4/llama.cpp={med('ours int4 a=0', n, 0) / lcp:5.2f}"
                f"  fp32/llama.cpp={med('ours fp32 a=0', n, 0) / lcp:5.2f}"
            )
        print(line)
    print()
    print("prefill against this machine's matmul peak (model FLOPs at N / measured time):")
    for n in args.lengths:
        flops = prefill_flops(shape, n).total
        cells = []
        for name, peak_key in (("ours fp32 a=0", "fp32"), ("ours int4 a=0", "bf16"), ("llama.cpp", None)):
            if name not in runners:
                continue
            gflops = flops * med(name, n, 0) / n / 1e9
            roof = f" = {100 * gflops / peaks[peak_key]:4.1f} % of {peak_key} peak" if peak_key in peaks else ""
            cells.append(f"{name.removeprefix('ours ').removesuffix(' a=0')} {gflops:6.1f} GFLOP/s{roof}")
        print(f"  N={n:<5} " + "  |  ".join(cells))
    print()
    print("decode against the memory-bandwidth floor (weights read per token):")
    for weights in ("fp32", "int8", "int4"):
        b = weight_bytes_per_token(engine, weights)
        kv = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * 2048 * 4
        print(
            f"  {weights}: weights {b / 1e9:.3f} GB/token -> floor {1e3 * b / bw / 1e9:.1f} ms/token "
            f"({bw * 1e9 / b:.0f} tok/s), plus KV {kv / 1e9:.3f} GB at N=2048 fp32 (half in bf16); "
            f"measured at N={args.lengths[0]}: {1e3 / med(f'ours {weights} a=0', args.lengths[0], 1):.1f} ms/token"
        )
    if "llama.cpp" in runners:
        print()
        print("targets (issue #28):")
        for n in args.lengths:
            best = max(med(f"ours {w} a=0", n, 1) for w in ("fp32", "int8", "int4"))
            lc = med("llama.cpp", n, 1)
            pre = med("ours int4 a=0", n, 0) / med("llama.cpp", n, 0)
            met = "MET" if best / lc >= 1.2 else "MISSED"
            print(
                f"  N={n:<5} decode best ours/llama.cpp {best / lc:5.3f} (>= 1.2: {met})"
                f"   prefill int4 (auto kernels)/llama.cpp {pre:5.2f} (>= 2: {'MET' if pre >= 2 else 'MISSED'})"
            )
    r = med("ours fp32 a=0", args.lengths[0], 1) / med("ours int4 a=0", args.lengths[0], 1)
    print(f"  int4 step / fp32 step at N={args.lengths[0]}: {r:5.3f} (<= 0.6: {'MET' if r <= 0.6 else 'MISSED'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["default"], help="'default' (SmolLM2-135M) or any --model")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024, 2048])
    parser.add_argument("--steps", type=int, default=32, help="decode steps per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--llama-cpp",
        action="store_true",
        help="also run llama.cpp (make bench-install: built -march=native for this CPU, minus AMX kernels, "
        "which segfaulted on an AMX host)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# engine_speed  host={cpu_model_name()} ({cpu_signature()})  threads={torch.get_num_threads()}  "
        f"torch={torch.__version__}  date={time.strftime('%Y-%m-%d %H:%M')}"
    )
    print(f"# command: {' '.join(sys.argv)}")
    print(f"# CPU kernels: {cpu_capability()}")
    bw = memory_bandwidth_gbs()
    peaks = matmul_peak_gflops()
    print(f"# memory read bandwidth (fp32 sum of 512 MiB, best of 5): {bw:.1f} GB/s")
    print("# matmul peak (2048^3 torch.mm, best of 5): " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))
    for model in args.models:
        bench_model(None if model == "default" else model, args, peaks, bw)


if __name__ == "__main__":
    main()
