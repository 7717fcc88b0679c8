"""Quality and speed of a lower-precision (bf16) prefill against fp32, on the benchmark suite, side by side.

    flock /tmp/timebill-cpu.lock python benchmarks/prefill_quality.py --fraction 0.25 --out DIR --threads 2

Every configuration (weights × prefill precision) answers the same tasks with no deadline, greedy, one
after the other per task (so drift hits every configuration alike). Printed per configuration: the
suite's score per task kind (the LongBench metrics), the median prefill time and its ratio to the same
weights' fp32 prefill, how many answers are token-for-token the reference configuration's, and the
paired score difference to the reference with a 90 % bootstrap interval. Records go to
``DIR/records.jsonl`` as they are produced (one line per task × configuration), and a rerun with the
same ``--out`` skips what is there, so a killed run resumes. The summary is written atomically to
``DIR/summary.txt``.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from timebill.bench.metrics import score as metric_score
from timebill.bench.suite import default_suite_path, read_suite, select_fraction
from timebill.engine import Engine
from timebill.estimator.store import cpu_model_name
from timebill.paths import write_bytes_atomically

DEFAULT_CONFIGS = ["fp32/float32", "fp32/bfloat16", "int4/float32", "int4/bfloat16", "int8/bfloat16"]


def first_divergence(a: list[int], b: list[int]) -> int:
    """Tokens the two answers share before they first differ."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def bootstrap_ci(diffs: list[float], rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    """90 % percentile interval of the mean of paired differences."""
    rng = random.Random(seed)
    means = sorted(statistics.mean(rng.choices(diffs, k=len(diffs))) for _ in range(rounds))
    return means[int(0.05 * rounds)], means[int(0.95 * rounds) - 1]


def summarise(records: list[dict], configs: list[str], tasks: dict) -> str:
    by = {(r["config"], r["task_id"]): r for r in records}
    ref_name = configs[0]
    lines = [f"reference: {ref_name}", ""]
    for cfg in configs:
        rows = [by[(cfg, t)] for t in tasks if (cfg, t) in by]
        if not rows:
            continue
        kinds: dict[str, list[float]] = collections.defaultdict(list)
        for r in rows:
            kinds[r["kind"]].append(r["score"])
        weights = cfg.split("/")[0]
        fp32_key = f"{weights}/float32"
        base = [by[(fp32_key, r["task_id"])]["prefill_s"] for r in rows if (fp32_key, r["task_id"]) in by]
        pre = statistics.median(r["prefill_s"] for r in rows)
        ratio = f"  {statistics.median(base) / pre:4.2f}x vs {weights}/float32" if base else ""
        per_kind = "  ".join(f"{k} {100 * statistics.mean(v):5.1f}" for k, v in sorted(kinds.items()))
        line = (
            f"{cfg:<15} score×100: {per_kind}  all {100 * statistics.mean(r['score'] for r in rows):5.1f} "
            f"(n={len(rows)})  median prefill {1e3 * pre:6.1f} ms{ratio}"
        )
        lines.append(line)
        if cfg != ref_name:
            pairs = [(r, by[(ref_name, r["task_id"])]) for r in rows if (ref_name, r["task_id"]) in by]
            if pairs:
                same = sum(a["token_ids"] == b["token_ids"] for a, b in pairs)
                shared = statistics.mean(first_divergence(a["token_ids"], b["token_ids"]) for a, b in pairs)
                diffs = [100 * (a["score"] - b["score"]) for a, b in pairs]
                lo, hi = bootstrap_ci(diffs)
                lines.append(
                    f"{'':<15} vs {ref_name}: {same}/{len(pairs)} answers identical, {shared:.1f} tokens shared "
                    f"before divergence, score diff {statistics.mean(diffs):+.2f} (90 % CI {lo:+.2f} .. {hi:+.2f})"
                )
        # Same weights, the two prefill precisions: what the prefill alone changes.
        other = f"{weights}/float32"
        if cfg != other and cfg.endswith("/bfloat16") and other != ref_name and any((other, t) in by for t in tasks):
            pairs = [(r, by[(other, r["task_id"])]) for r in rows if (other, r["task_id"]) in by]
            same = sum(a["token_ids"] == b["token_ids"] for a, b in pairs)
            diffs = [100 * (a["score"] - b["score"]) for a, b in pairs]
            lo, hi = bootstrap_ci(diffs)
            lines.append(
                f"{'':<15} vs {other}: {same}/{len(pairs)} answers identical, score diff "
                f"{statistics.mean(diffs):+.2f} (90 % CI {lo:+.2f} .. {hi:+.2f})"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", type=Path, default=None)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument(
        "--configs", nargs="+", default=DEFAULT_CONFIGS, help="weights/prefill pairs; the first is the reference"
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    suite = read_suite(args.suite or default_suite_path())
    tasks = {t.id: t for t in select_fraction(suite.tasks, args.fraction)}
    base = Engine.load(args.model, threads=args.threads)
    engines = {}
    for cfg in args.configs:
        weights, prefill = cfg.split("/")
        eng = (
            base
            if (weights, prefill) == ("fp32", "float32")
            else Engine(base.model, base.tokenizer, base.source, args.threads, weights=weights, prefill=prefill)
        )
        eng.warmup()
        engines[cfg] = eng
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "records.jsonl"
    records = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
    done = {(r["config"], r["task_id"]) for r in records}
    header = (
        f"# prefill_quality  host={cpu_model_name()}  threads={torch.get_num_threads()}  torch={torch.__version__}  "
        f"model={base.source.model_id}  suite={suite.name} fraction={args.fraction} ({len(tasks)} tasks)\n"
        f"# command: {' '.join(sys.argv)}\n# started {time.strftime('%Y-%m-%d %H:%M')}"
    )
    print(header, flush=True)
    with path.open("a") as out:
        for i, task in enumerate(tasks.values()):
            for cfg, eng in engines.items():
                if (cfg, task.id) in done:
                    continue
                r = eng.generate(task.prompt, max_new_tokens=task.max_new_tokens, chat=task.chat)
                rec = {
                    "config": cfg,
                    "task_id": task.id,
                    "kind": task.kind,
                    "score": metric_score(task.metric, r.text, task.references),
                    "token_ids": list(r.token_ids),
                    "prompt_tokens": r.prompt_tokens,
                    "prefill_s": r.prefill_s,
                    "decode_s": r.decode_s,
                }
                out.write(json.dumps(rec) + "\n")
                out.flush()
                records.append(rec)
            print(f"  task {i + 1}/{len(tasks)} {task.id}", file=sys.stderr, flush=True)
    text = header + "\n" + summarise(records, args.configs, tasks) + "\n"
    write_bytes_atomically(args.out / "summary.txt", text.encode())
    print(text)


if __name__ == "__main__":
    main()
