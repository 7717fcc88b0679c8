"""benchmarks/hindsight_bias.py, partial_transfer.py, planner_breakdown.py: their pure parts, on hand-built scores
(no model, no runs)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def _load(script: str) -> ModuleType:
    """A benchmark script by path (they are not a package); importing one stays light (no model)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{script}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{script}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


hb = _load("hindsight_bias")
pt = _load("partial_transfer")
pb = _load("planner_breakdown")


def test_each_part_is_scored_by_the_pick_made_without_it() -> None:
    # "lucky" wins in hindsight only because of part 0; without part 0 "steady" is best, and vice versa
    parts = [{"a0", "a1"}, {"b0", "b1"}, {"c0", "c1"}]
    jobs = {
        "steady": [("a0", 0.3), ("a1", 0.3), ("b0", 0.3), ("b1", 0.3), ("c0", 0.3), ("c1", 0.3)],
        "lucky": [("a0", 1.0), ("a1", 1.0), ("b0", 0.1), ("b1", 0.1), ("c0", 0.2), ("c1", 0.2)],
    }
    assert max(jobs, key=lambda m: hb._mean(jobs[m])) == "lucky"  # 0.433 vs 0.3 in hindsight
    loo, picks = hb.leave_one_part_out(jobs, parts)
    # part 0 held out: steady 0.3 vs lucky 0.15 → steady; part 1 held out: lucky 0.6 → lucky; part 2: lucky 0.55
    assert picks == {"steady": 1, "lucky": 2}
    assert sorted(loo) == sorted([("a0", 0.3), ("a1", 0.3), ("b0", 0.1), ("b1", 0.1), ("c0", 0.2), ("c1", 0.2)])
    assert hb._mean(loo) < hb._mean(jobs["lucky"])  # the out-of-sample pick scores below the hindsight pick


def test_the_partial_curve_is_a_ratio_of_sums_like_calibrations() -> None:
    k = len(pt.FRACTIONS)
    # an answer scoring 0 in full weighs nothing; a mean of per-answer ratios would be 0/0 there
    curve = pt.prefix_curve([(1.0, [0.5] * k), (0.0, [0.0] * k), (0.5, [0.5] * k)])
    assert curve == [1.0 / 1.5] * k
    assert all(g != g for g in pt.prefix_curve([(0.0, [0.0] * k)]))  # nothing scored: nan, not 0


def test_the_diagnostic_quality_file_reads_the_evaluations_own_ratios(tmp_path: Path) -> None:
    from timebill.quality import DEFAULT_QUALITY_FILE, load_quality

    fixed = {
        "vanilla": {"code": [0.2, 0.4], "chat": [0.1, 0.1]},
        "compress-0.75": {"code": [0.3, 0.6], "chat": [0.05, 0.05]},
    }
    out = tmp_path / "q.json"
    pb._write_eval_quality(fixed, DEFAULT_QUALITY_FILE, out)
    shipped, q = load_quality(DEFAULT_QUALITY_FILE), load_quality(out)
    assert abs(q.kinds["code"].relative["rho:0.75"] - 1.5) < 1e-6  # 0.45 / 0.3
    assert abs(q.kinds["chat"].relative["rho:0.75"] - 0.5) < 1e-6
    assert abs(q.kinds["all"].relative["rho:0.75"] - 1.25) < 1e-6  # (0.9 + 0.1) / (0.6 + 0.2), every task pooled
    assert q.kinds["retrieval"].relative == shipped.kinds["retrieval"].relative  # no runs of that kind: unchanged
    assert q.kinds["code"].relative["rho:0.5"] == shipped.kinds["code"].relative["rho:0.5"]  # not measured here
    assert "diagnostic" in q.extra["combine"]
