"""How much does "the best fixed configuration in hindsight" owe to hindsight? Leave-one-part-out, from the runs.

Why: issue #30's Kill target compares the planner with the best of eleven budget-independent configurations
picked *on the evaluation tasks themselves*. When those configurations' true scores lie within a few points of
each other (they do on a 135M model), the maximum of eleven noisy means is biased upward: the pick is partly
whichever configuration the task sample happened to favour, which no user could have known beforehand. A user
without hindsight picks a fixed configuration on other tasks. This script measures that gap on the same runs:
for each part, the fixed configuration with the best score on the *other* parts' tasks (same budget level,
same policy) is scored on this part's tasks; the concatenation over parts is "a fixed configuration chosen
without seeing the task" — nothing is re-run, no model timing is involved.

    python benchmarks/hindsight_bias.py docs/results/bench-v3/p00 ... docs/results/bench-v3/p15

Prints, per budget level and policy (Kill, guard): the in-hindsight pick and score, the leave-one-part-out
score (and how often each configuration was picked), the planner's score, and the planner's ratio to both,
with the paired bootstrap 90 % interval (:func:`timebill.bench.stats.paired_ratio_interval`). Scores are the
ones ``timebill bench-combine`` reports (same scorer, same policies), so the Kill hindsight column reproduces
``claims.json``; for guard the pick is over every fixed configuration, vanilla included (``claims.json``
names vanilla separately from the strongest other).
"""

from __future__ import annotations

import argparse
import collections
import statistics
from pathlib import Path

from timebill.bench.claims import GUARD_METHOD, KILL_METHOD
from timebill.bench.methods import FixedAlpha
from timebill.bench.simulate import load_traces
from timebill.bench.stats import combine, paired_ratio_interval
from timebill.errors import TimeBillError


def _mean(jobs: list[tuple[str, float]], tasks: set[str] | None = None) -> float:
    vals = [s for t, s in jobs if tasks is None or t in tasks]
    return statistics.fmean(vals) if vals else float("nan")


def _ci(a: list[tuple[str, float]], b: list[tuple[str, float]]) -> str:
    ci = paired_ratio_interval(a, b)
    return "–" if ci is None else f"{ci[0]:.2f}–{ci[1]:.2f}"


def leave_one_part_out(
    jobs: dict[str, list[tuple[str, float]]], part_tasks: list[set[str]]
) -> tuple[list[tuple[str, float]], collections.Counter[str]]:
    """Each part's jobs from the configuration with the best mean on the *other* parts; and the picks.

    ``jobs``: configuration → (task id, score) per job at one level and policy. Ties go to the configuration
    listed first, as ``max`` does in the claims.
    """
    loo: list[tuple[str, float]] = []
    picks: collections.Counter[str] = collections.Counter()
    for i, held in enumerate(part_tasks):
        rest = set().union(*(t for j, t in enumerate(part_tasks) if j != i))
        pick = max(jobs, key=lambda m: _mean(jobs[m], rest))
        picks[pick] += 1
        loo.extend((t, s) for t, s in jobs[pick] if t in held)
    return loo, picks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="+", type=Path)
    ap.add_argument("--suite", type=Path, default=None, help="task file, if it moved since the parts ran")
    args = ap.parse_args(argv)
    if len(args.parts) < 2:
        ap.error("leave-one-part-out needs at least two parts")

    try:  # the tokenizer alone decodes the answers the scorer reads: no model is loaded
        data, scorer = load_traces(args.parts, args.suite)
        ev, _ = combine(data, scorer)
    except TimeBillError as exc:  # not a bench folder, another suite, overlapping parts: say so, no traceback
        ap.error(str(exc))
    part_tasks = [{t.id for t in d.tasks} for d in data]
    fixed = [m.name for m in data[0].methods if isinstance(m, FixedAlpha)]

    print(f"{len(data)} parts, {sum(map(len, part_tasks))} tasks, {len(fixed)} fixed configurations")
    print(
        "level | policy | hindsight pick (score) | left-one-part-out fixed score [picks] | planner | "
        "planner / hindsight [90 %] | planner / left-out [90 %]"
    )
    for col in ev.columns:
        for policy, planner, jobs_of in (("kill", KILL_METHOD, ev.kill_jobs), ("guard", GUARD_METHOD, ev.guard_jobs)):
            mine = jobs_of.get((planner, col.key))
            present = [m for m in fixed if (m, col.key) in jobs_of]
            if mine is None or not present:
                continue
            best = max(present, key=lambda m: _mean(jobs_of[(m, col.key)]))
            loo, picks = leave_one_part_out({m: jobs_of[(m, col.key)] for m in present}, part_tasks)
            hind = jobs_of[(best, col.key)]
            print(
                f"{col.header} | {policy} | {best} ({100 * _mean(hind):.1f}) | {100 * _mean(loo):.1f} "
                f"[{', '.join(f'{m} {n}' for m, n in picks.most_common())}] | {100 * _mean(mine):.1f} | "
                f"{_mean(mine) / _mean(hind):.2f} [{_ci(mine, hind)}] | "
                f"{_mean(mine) / _mean(loo):.2f} [{_ci(mine, loo)}]"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
