"""How far this host's profiles are from a bench run's real times: measured / predicted, by prompt length.

A plan is only as good as its time model, and a profile is one quiet-machine measurement over a grid. This
replays the budget-independent traces of bench folders (vanilla, α, int8/int4, ρ: each ran with no deadline)
against the profiles in a directory and prints, per prompt-length band, the prefill's measured / predicted
ratio, and per weights mode the decode steps' (sum of measured steps / sum of predicted, per run). Nothing
runs on the model; the profiles must be of the host the traces were recorded on (the script checks the
cpu signature in each folder's manifest against the profiles' keys).

    python benchmarks/time_model_error.py --profiles ~/.cache/timebill/profiles docs/results/bench-v2/p02

Use it to see whether a profile's grid covers the prompts a suite sends (an extrapolated quadratic shows as a
ratio growing with the band) and whether real decode runs at the profiled speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from timebill.estimator import ExecutionTimeEstimator
from timebill.estimator.store import load_profile

BANDS = ((0, 2048), (2048, 3072), (3072, 4096), (4096, 6144), (6144, 1 << 20))


def _weights_of(method: str) -> str:
    return method if method in ("int8", "int4") else "fp32"


def load_estimators(directory: Path, threads: int) -> tuple[dict[str, ExecutionTimeEstimator], set[str]]:
    """The ``threads``-thread profile of each weights mode in ``directory`` (by its decode path), and their cpus."""
    out: dict[str, ExecutionTimeEstimator] = {}
    cpus: set[str] = set()
    for path in sorted(directory.glob("*.json")):
        profile = load_profile(path)
        if profile.key.threads != threads:
            continue
        path_name = profile.key.decode_path
        weights = "int8" if path_name.endswith("int8") else "int4" if path_name.endswith("int4") else "fp32"
        out[weights] = ExecutionTimeEstimator.from_profile(profile)
        cpus.add(profile.key.device)
    return out, cpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="bench output folders (their runs/*.jsonl)")
    parser.add_argument("--profiles", type=Path, required=True, help="directory of profile JSON files")
    parser.add_argument("--threads", type=int, default=2, help="thread count of the profiles to use")
    args = parser.parse_args(argv)
    estimators, cpus = load_estimators(args.profiles, args.threads)
    if "fp32" not in estimators:
        parser.error(f"no {args.threads}-thread fp32 profile in {args.profiles}")
    print(f"profiles: {', '.join(sorted(estimators))} from {args.profiles} ({'; '.join(sorted(cpus))})")
    prefill: dict[tuple[int, int], list[float]] = {band: [] for band in BANDS}
    steps: dict[str, list[float]] = {}
    for folder in args.folders:
        manifest = json.loads((folder / "manifest.json").read_text())
        machine = manifest.get("machine", "?")
        if not any(machine.rsplit(", ", 1)[0] in cpu for cpu in cpus):
            print(f"warning: {folder} was recorded on {machine}, not the profiles' host", file=sys.stderr)
        for runs in sorted((folder / "runs").glob("*.jsonl")):
            method = runs.stem
            if method.startswith("timebill"):
                continue  # planned runs stop at their deadline; the traces to compare are the free-running ones
            est = estimators.get(_weights_of(method))
            if est is None:
                continue
            for line in runs.read_text().splitlines():
                run = json.loads(line)
                n = int(run["prompt_tokens"])  # what was prefilled (after any compression)
                ratio = run["prefill_s"] / est.prefill_s(n, recalibrated=False)
                next(prefill[b] for b in BANDS if b[0] <= n < b[1]).append(ratio)
                times = run["token_times_s"]
                if len(times) > 9:  # step 0 also covers the decode set-up: skipped, as the recalibrator does
                    kv = int(run["kept_kv_tokens"])
                    measured = times[-1] - times[1]
                    predicted = sum(est.step_s(kv + i, recalibrated=False) for i in range(1, len(times) - 1))
                    steps.setdefault(_weights_of(method), []).append(measured / predicted)
    print("| prompt tokens | runs | prefill measured/predicted median | max |")
    print("|---|---|---|---|")
    for (lo, hi), values in prefill.items():
        if values:
            top = "…" if hi >= 1 << 20 else str(hi)
            print(f"| {lo}–{top} | {len(values)} | {statistics.median(values):.2f} | {max(values):.2f} |")
    print("\n| weights | runs | decode steps measured/predicted median | p90 |")
    print("|---|---|---|---|")
    for weights, values in sorted(steps.items()):
        p90 = statistics.quantiles(values, n=10)[-1] if len(values) > 1 else values[0]
        print(f"| {weights} | {len(values)} | {statistics.median(values):.2f} | {p90:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
