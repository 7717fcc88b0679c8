"""Engine speed, side by side in one run: prefill and decode tok/s at several prompt lengths.

Rows: our engine at α=0, HF ``model.generate`` on the same model, our engine at α=0.5 and α=0.9
(SnapKV). Decode tok/s is 1 / median per-token step time; prefill tok/s is N / prefill time.
EOS is disabled for the measurement so every run decodes the same number of steps.

    flock /tmp/timebill-cpu.lock python benchmarks/engine_speed.py --threads 2

The machine is shared and noisy: every configuration is measured ``--repeats`` times, interleaved,
and the median is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

from timebill.engine import Engine


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
    _, _, step_times, _ = engine.decode(state, max_new_tokens=steps + 1)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024, 2048])
    parser.add_argument("--steps", type=int, default=32, help="decode steps per run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    engine = Engine.load(None, threads=args.threads)
    engine.stop_ids = set()  # measure a fixed number of steps
    print(
        f"# engine_speed  threads={torch.get_num_threads()}  model={engine.source.model_id}  "
        f"torch={torch.__version__}"
    )
    print(f"# command: {' '.join(sys.argv)}")
    configs = ["engine a=0", "hf generate", "engine a=0.5", "engine a=0.9"]
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for n in args.lengths:
        ids = real_text_ids(engine, n)
        for _ in range(args.repeats):
            for name in configs:
                if name == "hf generate":
                    r = hf_run(engine, ids, args.steps)
                else:
                    r = engine_run(engine, ids, float(name.split("=")[1]), args.steps)
                results.setdefault((name, n), []).append(r)

    def med(name: str, n: int, i: int) -> float:
        return statistics.median(r[i] for r in results[(name, n)])

    print()
    print(f"{'config':<14}" + "".join(f"{'N=' + str(n):>22}" for n in args.lengths))
    print(f"{'':<14}" + "".join(f"{'prefill/decode tok/s':>22}" for _ in args.lengths))
    for name in configs:
        cells = "".join(f"{med(name, n, 0):>13.0f} /{med(name, n, 1):>6.1f}" for n in args.lengths)
        print(f"{name:<14}{cells}")
    print()
    print("ratios (decode tok/s):")
    for n in args.lengths:
        base = med("hf generate", n, 1)
        e0 = med("engine a=0", n, 1)
        e5 = med("engine a=0.5", n, 1)
        e9 = med("engine a=0.9", n, 1)
        print(
            f"  N={n:<5} engine/hf = {e0 / base:5.3f}   a=0.5/a=0 = {e5 / e0:5.3f}   "
            f"a=0.9/a=0 = {e9 / e0:5.3f}   "
            f"(step ms: a=0 {1e3 / e0:.1f}, a=0.9 {1e3 / e9:.1f}, hf {1e3 / base:.1f})"
        )


if __name__ == "__main__":
    main()
