"""Design the quality model without touching the evaluation suite: fit on one calibration suite, plan on the other.

Why: the expected-score planner's choices are only as good as its quality factors, and two calibration
suites of 24 tasks disagree about them (`benchmarks/quality_agreement.py`). Comparing ways of *using* the
factors on the evaluation traces would tune the planner on what it is scored on; the calibration suites
are `timebill bench` folders with no-deadline traces too, so the simulator can replay one of them with a
quality model fitted on the other. For each variant of the quality file —

- ``as-fitted``: the file as `timebill calibrate` wrote it (per-kind factors shrunk toward the pooled ones);
- ``pooled``: every kind reads the pooled factors (per-kind base scores and partial-answer curves kept);
- ``flat``: every factor 1.0 (the planner maximises the chance of finishing, quality-blind);
- ``cautious``: each factor minus its standard error (a knob must be measurably good to be chosen) —

it prints, per budget and direction (A→B: fit on A, replay B), the planner's score against the best fixed
configuration in hindsight (Kill) and against vanilla with a cut-off and the strongest fixed configuration
(guard), as `timebill bench-simulate` computes them.

    python benchmarks/quality_crossfit.py --fit-a docs/results/calibration-split/quality-v1-only.json \
        --runs-a docs/results/calibration-v1 --fit-b docs/results/calibration-split/quality-v2-only.json \
        --runs-b docs/results/calibration-v2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = ("as-fitted", "pooled", "flat", "cautious")


def variant(quality: dict, name: str) -> dict:
    """``quality`` (a parsed quality file) with its per-kind factors replaced as ``name`` says."""
    out = json.loads(json.dumps(quality))
    pooled = out["kinds"]["all"]["relative"]
    for kind in out["kinds"].values():
        if name == "pooled":
            kind["relative"] = dict(pooled)
        elif name == "flat":
            kind["relative"] = {k: 1.0 for k in kind["relative"]}
        elif name == "cautious":
            se = kind.get("relative_se", {})
            kind["relative"] = {k: max(0.0, v - se.get(k, 0.0)) for k, v in kind["relative"].items()}
        elif name != "as-fitted":
            raise ValueError(name)
    return out


def simulate(runs: str, quality_path: Path, out: Path) -> dict:
    cmd = [
        sys.executable, "-m", "timebill.cli", "bench-simulate", runs,
        "--planner", "expected-kill,expected-guard", "--quality", str(quality_path), "--out", str(out),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "simulated.json").read_text())


def ratios(sim: dict) -> list[tuple[float, float, float, float]]:
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
    ap.add_argument("--fit-a", required=True)
    ap.add_argument("--runs-a", required=True)
    ap.add_argument("--fit-b", required=True)
    ap.add_argument("--runs-b", required=True)
    args = ap.parse_args(argv)
    fits = {"A": json.loads(Path(args.fit_a).read_text()), "B": json.loads(Path(args.fit_b).read_text())}
    directions = (("A→B", "A", args.runs_b), ("B→A", "B", args.runs_a))
    print("ratio = planner / comparator; Kill vs best fixed in hindsight, guard vs vanilla cut off | vs best other")
    with tempfile.TemporaryDirectory() as tmp:
        for name in VARIANTS:
            kills: list[float] = []
            guards: list[float] = []
            for label, fit, runs in directions:
                qpath = Path(tmp) / f"{name}-{fit}.json"
                qpath.write_text(json.dumps(variant(fits[fit], name)))
                rows = ratios(simulate(runs, qpath, Path(tmp) / f"sim-{name}-{fit}"))
                kill = " ".join(f"{r[0]:.2f}" for r in rows)
                guard = " ".join(f"{r[1]:.2f}|{r[2]:.2f}" for r in rows)
                print(f"{name:10} {label}  Kill {kill}   guard {guard}")
                kills += [r[0] for r in rows[:4]]
                guards += [r[2] for r in rows]
            print(
                f"{name:10} mean over both directions: Kill / best fixed at the four tightest budgets "
                f"{sum(kills) / len(kills):.3f}, guard / best other fixed at every budget "
                f"{sum(guards) / len(guards):.3f}"
            )


if __name__ == "__main__":
    main()
