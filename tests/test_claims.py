"""claims.json: per level, the planner vs the best fixed configuration in hindsight (Kill) and vs vanilla (guard)."""

from __future__ import annotations

import json
from pathlib import Path

from timebill.bench.claims import claims, claims_lines, write_claims
from timebill.bench.simulate import load_traces
from timebill.bench.stats import evaluate

FOLDER = Path(__file__).resolve().parents[1] / "docs" / "results" / "bench-compress-f025"


def test_claims_pick_the_best_in_hindsight_and_compare_like_the_tables(tmp_path: Path) -> None:
    (part,), scorer = load_traces([FOLDER])
    ev = evaluate(part, scorer)
    fixed = [m.name for m in part.methods]
    # stand int4's runs in for the planner: its ratios are then int4 / the best at each level
    data = claims(ev, part.methods, kill_method="int4", guard_method="int4", fixed=fixed)
    assert [lv["key"] for lv in data["levels"]] == part.budgets
    for lv in data["levels"]:
        b, kill, guard = lv["key"], lv["kill"], lv["guard"]
        best = max(fixed, key=lambda m: ev.cells[(m, b, "kill")].avg_score)
        assert kill["best_fixed"] == best
        want = ev.cells[("int4", b, "kill")].avg_score / ev.cells[(best, b, "kill")].avg_score
        assert abs(kill["ratio"] - want) < 1e-3
        lo, hi = kill["ratio_ci90"]
        assert lo <= kill["ratio"] + 1e-9 and (hi is None or hi >= kill["ratio"] - 1e-9)
        assert kill["met"] == (want >= kill["target"] and kill["completion"] >= kill["best_fixed_completion"])
        vanilla = ev.cells[("vanilla", b, "guard")].avg_score
        assert abs(guard["ratio_vs_vanilla"] - ev.cells[("int4", b, "guard")].avg_score / vanilla) < 1e-3
        # the strongest other is the one the planner's ratio is lowest against (int4 itself is among them: ≤ 1)
        mine = ev.cells[("int4", b, "guard")].avg_score
        others = [m for m in fixed if m != "vanilla"]
        lowest = min(mine / ev.cells[(m, b, "guard")].avg_score for m in others)
        assert abs(guard["ratio_vs_strongest_other"] - lowest) < 1e-3 and lowest <= 1.0 + 1e-9
    assert [lv["kill"]["target"] for lv in data["levels"]] == [1.1, 1.1, 1.1, 1.1, 1.0, 1.0]
    path = write_claims(tmp_path, data)
    assert json.loads(path.read_text())["format"] == "timebill-claims"
    assert not list(tmp_path.glob("*.tmp*"))
    lines = claims_lines(data)
    assert sum(line.startswith("| T = ") for line in lines) == 2 * len(part.budgets)
