"""Does the calibration's partial-answer curve hold on the evaluation? The same curve, measured on a run's traces.

Why: the guard objective scores a configuration that T will cut by what its answer prefix is worth — the
quality file's per-kind curve g(f) = score of vanilla's answer cut to ⌈f·n⌉ tokens / score of the full answer,
measured on the calibration suites. If the evaluation's answers lose more when cut than calibration's did, the
guard planner lets too many answers be cut at tight budgets. This script measures g(f) on the benchmark
folders' own no-deadline traces (same definition, same scorer: the ratio of summed scores over a kind's tasks)
and prints it beside the quality file's, per kind and traced configuration. Nothing is re-run.

    python benchmarks/partial_transfer.py docs/results/bench-v3/p00 ... docs/results/bench-v3/p15 \
        [--methods vanilla,compress-0.5] [--quality PATH]
"""

from __future__ import annotations

import argparse
import collections
import math
from pathlib import Path

from timebill.bench.simulate import load_traces
from timebill.errors import TimeBillError
from timebill.quality import DEFAULT_QUALITY_FILE, load_quality

FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def prefix_curve(pairs: list[tuple[float, list[float]]]) -> list[float]:
    """g(f) per fraction: summed prefix scores over the summed full scores (nan when every full score is 0).

    ``pairs``: per answer, its full score and its prefix scores at :data:`FRACTIONS`. A ratio of sums, not a
    mean of ratios, as calibration fits it: an answer scoring 0 in full carries no weight instead of a 0/0.
    """
    full = sum(f for f, _ in pairs)
    return [sum(p[i] for _, p in pairs) / full if full > 0 else math.nan for i in range(len(FRACTIONS))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="+", type=Path)
    ap.add_argument("--methods", default="vanilla", help="traced configurations to read, comma-separated")
    ap.add_argument("--quality", default=None, help="quality file to compare with (default: the shipped one)")
    ap.add_argument("--suite", type=Path, default=None, help="task file, if it moved since the parts ran")
    args = ap.parse_args(argv)

    quality = load_quality(args.quality or DEFAULT_QUALITY_FILE)
    try:  # the tokenizer alone decodes the answer prefixes the scorer reads: no model is loaded
        data, scorer = load_traces(args.parts, args.suite)
    except TimeBillError as exc:  # not a bench folder, another suite, missing runs: say so, no traceback
        ap.error(str(exc))
    print(f"{len(data)} parts; g(f) at f = " + ", ".join(f"{f:g}" for f in FRACTIONS))
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        per_kind: dict[str, list[tuple[float, list[float]]]] = collections.defaultdict(list)
        for d in data:
            tasks = {t.id: t for t in d.tasks}
            for key, r in d.records.get(method, {}).items():
                task, n = tasks[r["task_id"]], len(r.get("token_ids", []))
                if n == 0:
                    continue
                prefixes = [scorer.prefix(key, task, r, math.ceil(f * n)) for f in FRACTIONS]
                per_kind[task.kind].append((scorer.full(key, task, r), prefixes))
        if not per_kind:
            print(f"{method}: no traces in these folders")
            continue
        for kind, pairs in sorted(per_kind.items()):
            measured = prefix_curve(pairs)
            shipped = [quality.partial(kind, f) for f in FRACTIONS]
            print(f"{method:<14} {kind:<10} ({len(pairs):>3} answers) eval  " + " ".join(f"{g:5.2f}" for g in measured))
            print(f"{'':<14} {'':<10} {'':<13} calib " + " ".join(f"{g:5.2f}" for g in shipped))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
