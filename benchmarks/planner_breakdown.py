"""Where does the planner's score go? Per kind: each fixed configuration's score vs the planner's choices.

Why: a combined report says the planner trails the best fixed configuration in hindsight at some budget
level, but not why. Its choices are recorded in every run (``configuration``), and each budget-independent
configuration's no-deadline answer is a trace in the same folders, so the gap splits per kind into "what the
planner picked" and "what that pick scores" against "what the best configuration scores" — from the runs
themselves, no model loaded, nothing re-run.

    python benchmarks/planner_breakdown.py docs/results/bench-v2/p00 ... docs/results/bench-v2/p15

Prints (1) each fixed configuration's mean no-deadline score ×100 per kind over all the parts' tasks, and its
answers' mean length and how many ended by EOS (a configuration can change how long the model answers; the planner's
length prior is vanilla's), (2) per budget level (the parts' k-th budget) and policy, the planner's configurations
per kind with its Kill / guard score there, and per kind how many of each fixed configuration's answers were
complete by T (the paper's completion). Scores use the benchmark's metrics (``timebill.bench.metrics``); a Kill job
scores only when its answer ended by itself (EOS or N_max) by T, a guard job scores the text the engine returned
(its guard stops decoding at T). Every planner's runs are also scored "as guard" (the Kill planner's runs stop at T
too), with the count of answers that did not end by themselves (cut at T or refused).

``--eval-quality OUT`` also writes a *diagnostic* quality file: ``--quality`` (default: the shipped one) with
every kind's factors replaced by this evaluation's own no-deadline ratios (config / vanilla, per kind and
pooled). Replayed with ``timebill bench-simulate … --quality OUT`` it bounds what a per-kind quality model could
give the planner on these tasks if calibration transferred perfectly — in-sample, so never a claim, only a
measure of how much of a gap is the calibration's transfer and how much is left to a per-task model.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import statistics
import sys
from pathlib import Path

from timebill.bench.methods import finished_by
from timebill.bench.metrics import score
from timebill.bench.runner import load_manifest
from timebill.bench.suite import Task, default_suite_path, read_suite
from timebill.quality import ALL, DEFAULT_QUALITY_FILE, knob_of, load_quality, save_quality


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _text_score(task: Task, record: dict) -> float:
    return score(task.metric, record.get("text", ""), task.references)


def _mean100(xs: list[float]) -> float:
    return 100 * statistics.mean(xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="+", type=Path)
    ap.add_argument("--suite", type=Path, default=default_suite_path())
    ap.add_argument("--eval-quality", type=Path, help="write the diagnostic quality file here (see above)")
    ap.add_argument("--quality", type=Path, default=DEFAULT_QUALITY_FILE, help="quality file it starts from")
    args = ap.parse_args(argv)
    tasks = {t.id: t for t in read_suite(args.suite).tasks}
    fixed: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    planned: dict[tuple[int, str], list[dict]] = collections.defaultdict(list)
    # per fixed configuration and kind, (record, the part's budgets): completion at each level
    traces: dict[str, dict[str, list[tuple[dict, list[float]]]]] = collections.defaultdict(
        lambda: collections.defaultdict(list)
    )
    for part in args.parts:
        manifest = load_manifest(part)
        if manifest is None:
            sys.exit(f"{part}: not a `timebill bench` output directory (no manifest.json)")
        budgets = sorted(float(b) for b in manifest["budgets"])
        for run in sorted((part / "runs").glob("*.jsonl")):
            for r in _records(run):
                task = tasks.get(r.get("task_id", ""))
                if task is None:
                    sys.exit(f"{run}: task {r.get('task_id')!r} is not in {args.suite}")
                if run.stem.startswith("timebill-"):
                    planned[(budgets.index(float(r["budget_s"])), run.stem.removeprefix("timebill-"))].append(r)
                else:
                    fixed[run.stem][task.kind].append(score(task.metric, r.get("text", ""), task.references))
                    traces[run.stem][task.kind].append((r, budgets))
    kinds = sorted({k for per in fixed.values() for k in per})
    print("no-deadline score x100 per kind (tasks)")
    print(f"{'configuration':<16}" + "".join(f"{k:>12}" for k in kinds) + f"{'all':>8}")
    for name, per in sorted(fixed.items(), key=lambda kv: -statistics.mean(s for v in kv[1].values() for s in v)):
        cells = "".join(f"{100 * statistics.mean(per[k]):>7.1f} ({len(per[k])})" for k in kinds)
        print(f"{name:<16}{cells}{100 * statistics.mean(s for v in per.values() for s in v):>8.1f}")
    print("\nno-deadline answers per kind: mean tokens, ended by EOS (of answers)")
    for name in sorted(traces):
        cells = "".join(
            f"{statistics.mean(len(r.get('token_ids', [])) for r, _ in traces[name][k]):>7.0f} tok, EOS "
            f"{sum(r.get('stop_reason') == 'eos' for r, _ in traces[name][k])}/{len(traces[name][k]):<4}"
            for k in kinds
        )
        print(f"{name:<16}{cells}")
    for (level, policy), recs in sorted(planned.items()):
        print(f"\nlevel {level + 1} of {len(budgets)}, {policy}:")
        for kind in kinds:
            rs = [r for r in recs if tasks[r["task_id"]].kind == kind]
            # Kill scores only an answer that ended by itself by T; under guard the engine stopped the run at T,
            # so its text is the answer delivered by T.
            scores = [
                _text_score(tasks[r["task_id"]], r) if policy != "kill" or finished_by(r, float(r["budget_s"])) else 0.0
                for r in rs
            ]
            # the same runs scored as guard (the text delivered by T, cut or not): says whether one planner's
            # choices would also have served the other policy, and how many of its answers T cut
            as_guard = [_text_score(tasks[r["task_id"]], r) for r in rs]
            cut = sum(r.get("stop_reason") not in ("eos", "max_tokens") for r in rs)
            picks = collections.Counter(r.get("configuration", r.get("stop_reason", "?")) for r in rs)
            top = ", ".join(f"{c} {n}" for c, n in picks.most_common(4))
            print(
                f"  {kind:<10} score {_mean100(scores):5.1f}  as guard {_mean100(as_guard):5.1f} (not ended by itself "
                f"{cut}/{len(rs)})  picks: {top}"
            )
        if policy == "kill":  # completion does not depend on the policy; print it once per level
            for kind in kinds:
                done = ", ".join(
                    f"{name} {sum(finished_by(r, b[level]) for r, b in traces[name][kind])}/{len(traces[name][kind])}"
                    for name in sorted(traces)
                )
                print(f"  {kind:<10} fixed, complete by T: {done}")
    if args.eval_quality is not None:
        _write_eval_quality(fixed, args.quality, args.eval_quality)
        print(f"\ndiagnostic quality file (this evaluation's own factors, in-sample): {args.eval_quality}")
    return 0


def _write_eval_quality(fixed: dict[str, dict[str, list[float]]], start: Path, out: Path) -> None:
    """``start`` with each kind's factors set to mean(config) / mean(vanilla) over this run's tasks of that kind."""
    if "vanilla" not in fixed:
        sys.exit("--eval-quality needs vanilla's runs (the reference every factor is relative to)")
    model = load_quality(start)

    def mean_of(name: str, kind: str) -> float:
        per = fixed[name]
        return statistics.mean(s for v in per.values() for s in v) if kind == ALL else statistics.mean(per[kind])

    kinds = {}
    for kind, k in model.kinds.items():
        if kind != ALL and kind not in fixed["vanilla"]:
            kinds[kind] = k
            continue
        ref = mean_of("vanilla", kind)
        relative = dict(k.relative)
        for name in fixed:
            knob = knob_of(name) if name != "vanilla" else None
            if knob is not None and ref > 0:
                relative[knob] = mean_of(name, kind) / ref
        kinds[kind] = dataclasses.replace(k, relative=relative)
    extra = {"combine": "diagnostic: factors from an evaluation's own no-deadline runs (in-sample, not a calibration)"}
    save_quality(dataclasses.replace(model, kinds=kinds, extra=extra), out)


if __name__ == "__main__":
    raise SystemExit(main())
