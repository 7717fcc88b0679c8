"""What the decode KV cache's dtype costs per step, on this host, at the benchmark's context lengths.

    flock /tmp/timebill-cpu.lock python benchmarks/kv_dtype_cost.py --threads 2 [--model M]

Why this exists: in the full benchmark run the int8 and int4 decode steps took 0.39x / 0.51x of the fp32
step on a family-23 AMD EPYC but 0.95x / 0.95x on a family-26 one (results.md, "Decode cost", ~1.9k
kept tokens). The quantised steps then kept their KV cache in bf16 wherever oneDNN reported native bf16
(family 26 has AVX512-BF16, family 23 does not), so every step read the whole cache through SDPA's bf16
kernel. This script times the same steps with the cache in fp32 and in bf16 beside the fp32 step, so the
size of that effect is a measurement on whatever host runs it, not a guess; the engine's per-host
choice (``kv_cache="auto"``) now makes the same measurement at load and keeps bf16 only where it wins.

Every configuration decodes the same real text prompt at each context, interleaved per repeat (drift
hits all alike); a step is the median gap between tokens. Prints ms/step and the ratio to fp32's step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from timebill.engine import Engine
from timebill.estimator.store import host_fingerprint
from timebill.kernels import cpu_capability

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_speed import real_text_ids  # noqa: E402 - sibling benchmark script

CONFIGS = (
    ("fp32", "fp32", "float32"),
    ("int8 kv-fp32", "int8", "float32"),
    ("int8 kv-bf16", "int8", "bfloat16"),
    ("int4 kv-fp32", "int4", "float32"),
    ("int4 kv-bf16", "int4", "bfloat16"),
)


def step_ms(engine: Engine, ids: list[int], steps: int) -> float:
    """Median decode step (ms) after a full prefill of ``ids`` (α = 0)."""
    state = engine.prefill(ids, press="snapkv", capture=False)
    engine.evict(state, 0.0)
    return 1e3 * statistics.median(engine.decode(state, max_new_tokens=steps + 1).step_times_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 1024, 1939])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    base = Engine.load(args.model, threads=args.threads)
    engines = {"fp32": base}
    for name, weights, kv in CONFIGS[1:]:
        engines[name] = Engine(base.model, base.tokenizer, base.source, args.threads, weights=weights, kv_cache=kv)
        engines[name].warmup()
    for eng in engines.values():
        eng.stop_ids = set()  # a fixed number of steps per run
    print(
        f"# kv_dtype_cost  host={host_fingerprint()}  {cpu_capability()}  threads={args.threads}  "
        f"torch={torch.__version__}  model={base.source.model_id}  date={time.strftime('%Y-%m-%d %H:%M')}"
    )
    print(f"# command: {' '.join(sys.argv)}")
    print(f"# the engine's own choice here (kv_cache=auto): {engines_auto_choice(base)}")
    times: dict[tuple[str, int], list[float]] = {}
    for n in args.lengths:
        ids = real_text_ids(base, n)
        for _ in range(args.repeats):
            for name, eng in engines.items():
                times.setdefault((name, n), []).append(step_ms(eng, ids, args.steps))
    print()
    print(f"{'config':<14}" + "".join(f"{'N=' + str(n):>22}" for n in args.lengths))
    for name in engines:
        cells = []
        for n in args.lengths:
            ms = statistics.median(times[(name, n)])
            ratio = ms / statistics.median(times[("fp32", n)])
            cells.append(f"{ms:8.1f} ms ({ratio:4.2f}x)")
        print(f"{name:<14}" + "".join(f"{c:>22}" for c in cells))
    print("(ms per decode step, median of repeats of the median step; in brackets: / the fp32 step at that N)")
    for w in ("int8", "int4"):
        slow = [
            statistics.median(times[(f"{w} kv-bf16", n)]) / statistics.median(times[(f"{w} kv-fp32", n)])
            for n in args.lengths
        ]
        print(f"{w}: bf16 KV step / fp32 KV step = " + " / ".join(f"{s:.2f}" for s in slow) + f" at N={args.lengths}")


def engines_auto_choice(base: Engine) -> str:
    """Which KV dtype ``kv_cache="auto"`` picks for int8 on this host, with the times it picked by."""
    eng = Engine(base.model, base.tokenizer, base.source, base.threads, weights="int8")
    choice = eng.kv_choice
    if choice is None:
        return str(eng.fast.kv_dtype if eng.fast is not None else "n/a")
    timings = ", ".join(f"{k} {v:.1f} ms/step" for k, v in choice.timings_ms.items())
    return f"{choice.kv_dtype} ({timings} at {choice.context} tokens; {choice.reason})"


if __name__ == "__main__":
    main()
