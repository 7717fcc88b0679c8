"""Design the quality model without touching the evaluation suite: fit on some calibration suites, plan on another.

Why: the expected-score planner's choices are only as good as its quality factors, and calibration suites
of 24 tasks disagree about them (`benchmarks/quality_agreement.py`). Comparing ways of *using* the
factors on the evaluation traces would tune the planner on what it is scored on; the calibration suites
are `timebill bench` folders with no-deadline traces too, so the simulator can replay one of them with a
quality model fitted on the others. With ``--suite S --runs R`` given three or more times this is
leave-one-suite-out: each suite is replayed with the model `timebill calibrate --fit-only` fits on all the
others (and, for ``consensus``, on each of the others alone). For each variant of the quality file —

- ``as-fitted``: the file as `timebill calibrate` wrote it (per-kind factors shrunk toward the pooled ones,
  adjusted per prompt-length bucket);
- ``kind-only``: the same without the prompt-length adjustment (the planner before it);
- ``length-only``: every kind reads the pooled factors, adjusted per prompt-length bucket;
- ``pooled``: every kind reads the pooled factors (per-kind base scores and partial-answer curves kept);
- ``flat``: every factor 1.0 (the planner maximises the chance of finishing, quality-blind);
- ``cautious``: each factor minus its standard error (a knob must be measurably good to be chosen);
- ``consensus``: a factor moves away from 1 only as far as *every* fitting suite alone moved it the same
  way (the one nearest 1; 1 where two suites disagree on the direction) — a knob must help in every
  replication to be believed;
- ``shrunk``: the pooled factors shrunk toward 1 by empirical Bayes, ``1 + (r − 1)·τ²/(τ² + se²)`` with the
  spread τ² of the true factors estimated from all knobs but α = 0.95 (their variance less the mean se²);
  every kind reads them —

(every variant but ``as-fitted`` and ``length-only`` drops the prompt-length adjustment)

it prints, per budget and held-out suite, the planner's score against the best fixed configuration in
hindsight (Kill) and against vanilla with a cut-off and the strongest fixed configuration (guard), as
`timebill bench-simulate` computes them, and the means over all held-out suites.

    python benchmarks/quality_crossfit.py --suite benchmarks/suites/calibration-v1.jsonl \
        --runs docs/results/calibration-v1 --suite benchmarks/suites/calibration-v2.jsonl \
        --runs docs/results/calibration-v2 --suite benchmarks/suites/calibration-v3.jsonl \
        --runs docs/results/calibration-v3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from timebill.quality import consensus_factor

VARIANTS = ("as-fitted", "kind-only", "length-only", "pooled", "flat", "cautious", "consensus", "shrunk")
LARGE_KNOWN = "alpha:0.95"  # the one effect every suite agrees on: kept out of the spread estimate


def shrunk_factors(pooled: dict[str, float], se: dict[str, float | None]) -> dict[str, float]:
    """Empirical-Bayes shrinkage of the pooled factors toward 1 (see the module docstring)."""
    known = [(r, s) for k, r in pooled.items() if k != LARGE_KNOWN and (s := se.get(k)) is not None]
    if len(known) < 3:
        return dict(pooled)
    spread = statistics.pvariance([r - 1 for r, _ in known], mu=0.0)
    tau2 = max(0.0, spread - statistics.fmean(s * s for _, s in known))
    out = {}
    for k, r in pooled.items():
        s = se.get(k)
        out[k] = r if s is None or tau2 + s * s == 0 else 1 + (r - 1) * tau2 / (tau2 + s * s)
    return out


def variant(quality: dict, name: str, singles: list[dict] | None = None) -> dict:
    """``quality`` (a parsed quality file) with its per-kind factors replaced as ``name`` says."""
    out = json.loads(json.dumps(quality))
    pooled = out["kinds"]["all"]["relative"]
    shrunk = shrunk_factors(pooled, out["kinds"]["all"].get("relative_se", {})) if name == "shrunk" else {}
    if name not in ("as-fitted", "length-only"):
        out.pop("prompt_buckets", None)
    for kind_name, kind in out["kinds"].items():
        if name in ("as-fitted", "kind-only"):
            continue
        if name in ("pooled", "length-only"):
            kind["relative"] = dict(pooled)
        elif name == "flat":
            kind["relative"] = {k: 1.0 for k in kind["relative"]}
        elif name == "cautious":
            se = kind.get("relative_se", {})
            kind["relative"] = {k: max(0.0, v - (se.get(k) or 0.0)) for k, v in kind["relative"].items()}
        elif name == "consensus":
            if not singles or len(singles) < 2:
                raise ValueError("consensus needs at least two single-suite fits")
            kind["relative"] = {
                k: consensus_factor([s["kinds"][kind_name]["relative"].get(k, v) for s in singles])
                for k, v in kind["relative"].items()
            }
        elif name == "shrunk":
            kind["relative"] = dict(shrunk)
        else:
            raise ValueError(name)
    return out


def fit(pairs: list[tuple[str, str]], out: Path) -> dict:
    """`timebill calibrate --fit-only` on these (suite, runs) pairs, parsed."""
    cmd = [sys.executable, "-m", "timebill.cli", "calibrate", "--fit-only", "--combine", "pooled", "--out", str(out)]
    for suite, runs in pairs:
        cmd += ["--suite", suite, "--runs", runs]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def simulate(runs: str, quality_path: Path, out: Path) -> dict:
    cmd = [
        sys.executable, "-m", "timebill.cli", "bench-simulate", runs,
        "--planner", "expected-kill,expected-guard", "--quality", str(quality_path), "--out", str(out),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "simulated.json").read_text())


def ratios(sim: dict) -> list[tuple[float, float, float, str]]:
    """Per column: Kill planner / best fixed, guard planner / vanilla, guard planner / best other fixed."""
    cells = {(c["method"], c["column"], c["policy"]): c["avg_score"] for c in sim["cells"]}
    fixed = sim["recorded"]
    rows = []
    for col in sim["columns"]:
        key = col["key"]
        best_kill = max(cells[(m, key, "kill")] for m in fixed)
        best_guard = max(cells[(m, key, "guard")] for m in fixed if m != "vanilla")
        kill = cells[("sim:expected-kill", key, "kill")]
        guard = cells[("sim:expected-guard", key, "guard")]
        rows.append((kill / best_kill, guard / cells[("vanilla", key, "guard")], guard / best_guard, key))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", action="append", required=True, help="A calibration suite (repeat, with --runs).")
    ap.add_argument("--runs", action="append", required=True, help="Its `timebill calibrate` runs folder.")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args(argv)
    if len(args.suite) != len(args.runs) or len(args.suite) < 2:
        sys.exit("give --suite and --runs in pairs, at least two of each")
    pairs = list(zip(args.suite, args.runs, strict=True))
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    print("ratio = planner / comparator; Kill vs best fixed in hindsight, guard vs vanilla cut off | vs best other")
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        singles_all = [fit([p], tmp / f"single-{i}.json") for i, p in enumerate(pairs)]
        folds = []
        for i, (suite, runs) in enumerate(pairs):
            others = [p for j, p in enumerate(pairs) if j != i]
            fitted = fit(others, tmp / f"fit-without-{i}.json")
            singles = [s for j, s in enumerate(singles_all) if j != i]
            folds.append((Path(suite).stem, runs, fitted, singles))
        for name in names:
            kills: list[float] = []
            guards: list[float] = []
            for label, runs, fitted, singles in folds:
                if name == "consensus" and len(singles) < 2:
                    continue
                qpath = tmp / f"{name}-{label}.json"
                qpath.write_text(json.dumps(variant(fitted, name, singles)))
                rows = ratios(simulate(runs, qpath, tmp / f"sim-{name}-{label}"))
                kill = " ".join(f"{r[0]:.2f}" for r in rows)
                guard = " ".join(f"{r[1]:.2f}|{r[2]:.2f}" for r in rows)
                print(f"{name:10} replay {label:16} Kill {kill}   guard {guard}")
                kills += [r[0] for r in rows[:4]]
                guards += [r[2] for r in rows]
            if kills:
                print(
                    f"{name:10} mean over the held-out suites: Kill / best fixed at the four tightest budgets "
                    f"{statistics.fmean(kills):.3f}, guard / best other fixed at every budget "
                    f"{statistics.fmean(guards):.3f}"
                )


if __name__ == "__main__":
    main()
