"""Quality of the quantised decode modes against fp32, read from a ``timebill bench`` run directory.

    timebill bench --fraction 0.125 --methods vanilla,int8,int4 --no-k-sweep --out DIR --threads 2
    python benchmarks/quant_quality.py DIR

Prints, per method, the no-deadline score per task kind (the suite's LongBench metrics), the median
decode rate, how many answers are token-for-token the fp32 answer, and how many tokens in the answers
stay identical before they first diverge. Scores are the suite's metrics recomputed from the stored
answer text, so any run directory with ``runs/vanilla.jsonl`` and the quantised methods' files works.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
from pathlib import Path

from timebill.bench.metrics import score as metric_score
from timebill.bench.suite import default_suite_path, read_suite


def first_divergence(a: list[int], b: list[int]) -> int:
    """Tokens the two answers share before they first differ."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--suite", type=Path, default=None)
    parser.add_argument("--methods", nargs="+", default=["vanilla", "int8", "int4"])
    args = parser.parse_args()
    tasks = {t.id: t for t in read_suite(args.suite or default_suite_path()).tasks}
    answers: dict[str, dict[str, list[int]]] = {}
    print(f"# quant_quality  run={args.run_dir}")
    for method in args.methods:
        records = [json.loads(line) for line in (args.run_dir / "runs" / f"{method}.jsonl").read_text().splitlines()]
        by_kind: dict[str, list[float]] = collections.defaultdict(list)
        for r in records:
            task = tasks[r["task_id"]]
            by_kind[r["kind"]].append(metric_score(task.metric, r["text"], task.references))
        answers[method] = {r["task_id"]: r["token_ids"] for r in records}
        rates = [(len(r["token_ids"]) - 1) / r["decode_s"] for r in records if len(r["token_ids"]) > 8]
        scores = [s for v in by_kind.values() for s in v]
        kinds = "  ".join(f"{k} {100 * statistics.mean(v):5.1f}" for k, v in sorted(by_kind.items()))
        print(
            f"{method:<8} score×100: {kinds}  all {100 * statistics.mean(scores):5.1f}  (n={len(scores)})  "
            f"median decode {statistics.median(rates):5.1f} tok/s"
        )
    ref = answers.get("vanilla")
    for method in args.methods:
        if method == "vanilla" or ref is None:
            continue
        common = [t for t in answers[method] if t in ref]
        same = sum(answers[method][t] == ref[t] for t in common)
        shared = statistics.mean(first_divergence(answers[method][t], ref[t]) for t in common)
        print(f"{method}: {same}/{len(common)} answers identical to fp32; {shared:.1f} tokens shared before divergence")


if __name__ == "__main__":
    main()
