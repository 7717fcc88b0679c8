"""The planner simulator on committed run folders: fixed planners reproduce the report, the oracle bounds them."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from timebill.bench.policies import POLICIES
from timebill.bench.report import _fmt
from timebill.bench.simulate import (
    PLANNERS,
    ConfigTimeModel,
    TaskView,
    config_alpha,
    fit_time_model,
    load_traces,
    paper_planner,
    planner_label,
    register_planner,
    simulate,
)
from timebill.bench.stats import combine, evaluate
from timebill.cli import app
from timebill.errors import InvalidInputError
from timebill.estimator.fit import LinFit, QuadFit

ROOT = Path(__file__).resolve().parents[1] / "docs" / "results"
P03, P04 = str(ROOT / "bench-full" / "p03"), str(ROOT / "bench-full" / "p04")
COMPRESS = str(ROOT / "bench-compress-f025")
FIXED = ("vanilla", "int4", "snapkv-0.75")

register_planner("test-refuse", lambda view, budget_s, policy, configs: None)
PLANNED = [*(f"fixed:{c}" for c in FIXED), "oracle", "paper", "test-refuse"]


@pytest.fixture(scope="module", params=[P03, COMPRESS], ids=["p03", "compress-f025"])
def folder(request):
    parts, scorer = load_traces([request.param])
    return request.param, parts, scorer, simulate(parts, scorer, PLANNED)


def _committed_table(results_md: Path, policy: str) -> dict[str, list[str]]:
    lines = results_md.read_text().splitlines()
    start = lines.index(f"## Average score (completion rate) — {policy}") + 4
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_fixed_planners_reproduce_the_evaluation_and_the_committed_report(folder) -> None:
    path, parts, scorer, sim = folder
    ev = evaluate(parts[0], scorer)
    for policy in POLICIES:
        committed = _committed_table(Path(path) / "results.md", policy)
        for config in FIXED:
            row = [sim.evaluation.cells[(planner_label(f"fixed:{config}"), b, policy)] for b in parts[0].budgets]
            assert row == [ev.cells[(config, b, policy)] for b in parts[0].budgets]
            assert [_fmt(s) for s in row] == committed[config]


def test_fixed_planners_reproduce_combined_parts_by_level() -> None:
    parts, scorer = load_traces([P03, P04])
    sim = simulate(parts, scorer, ["fixed:int4"])
    ev, _ = combine(parts, scorer)
    assert len(sim.evaluation.columns) == 6
    for col in ev.columns:
        for policy in POLICIES:
            assert sim.evaluation.cells[("sim:fixed:int4", col.key, policy)] == ev.cells[("int4", col.key, policy)]


def test_parts_with_and_without_recorded_planners_simulate_together(tmp_path: Path) -> None:
    """bench-v2 part 3 recorded the planner methods; a copy of part 4 keeps only the budget-independent ones."""
    v2 = ROOT / "bench-v2"
    p04 = tmp_path / "p04"
    shutil.copytree(v2 / "p04", p04, ignore=shutil.ignore_patterns("timebill-*.jsonl"))
    parts, scorer = load_traces([str(v2 / "p03"), str(p04)])
    assert {m.name for m in parts[0].methods} != {m.name for m in parts[1].methods}
    sim = simulate(parts, scorer, ["fixed:int4"])
    stripped = [replace(p, methods=[m for m in p.methods if not m.budgeted]) for p in parts]
    ev, _ = combine(stripped, scorer)
    assert all(not m.budgeted for m in parts[0].methods if m.name in sim.recorded)
    for col in ev.columns:
        for policy in POLICIES:
            assert sim.evaluation.cells[("sim:fixed:int4", col.key, policy)] == ev.cells[("int4", col.key, policy)]


def test_the_oracle_is_at_least_every_recorded_configuration(folder) -> None:
    _, parts, _, sim = folder
    configs = [m.name for m in parts[0].methods if not m.budgeted]
    oracle = planner_label("oracle")
    assert oracle.endswith("(hindsight)")
    for b in parts[0].budgets:
        for policy in POLICIES:
            best = sim.evaluation.cells[(oracle, b, policy)]
            for config in configs:
                assert best.avg_score >= sim.evaluation.cells[(config, b, policy)].avg_score - 1e-9


def test_paper_chooses_only_kv_eviction_configurations(folder) -> None:
    _, _, _, sim = folder
    chosen = {c for (planner, _, _), tally in sim.choices.items() if planner == "paper" for c in tally}
    assert chosen and all(config_alpha(c) is not None for c in chosen)


def test_refusing_scores_zero_and_completes_nothing(folder) -> None:
    _, parts, _, sim = folder
    for b in parts[0].budgets:
        for policy in POLICIES:
            cell = sim.evaluation.cells[("sim:test-refuse", b, policy)]
            assert cell.avg_score == 0 and cell.completion_rate == 0 and cell.jobs == len(parts[0].tasks)


def test_an_unknown_configuration_or_planner_is_a_clear_error() -> None:
    parts, scorer = load_traces([P03])
    with pytest.raises(InvalidInputError, match="chose 'int3'.*recorded configurations are vanilla"):
        simulate(parts, scorer, ["fixed:int3"])
    with pytest.raises(InvalidInputError, match="unknown planner 'nope'"):
        simulate(parts, scorer, ["nope"])
    assert "oracle" in PLANNERS and "paper" in PLANNERS


def test_planning_overhead_shifts_every_trace() -> None:
    parts, scorer = load_traces([P03])
    sim = simulate(parts, scorer, ["fixed:vanilla"], overhead_s=1000.0)
    assert all(s.avg_score == 0 for (m, _, _), s in sim.evaluation.cells.items() if m == "sim:fixed:vanilla")


def _model(config: str, first_s: float, step_s: float, kv_fraction: float = 1.0) -> ConfigTimeModel:
    return ConfigTimeModel(config, QuadFit(0.0, 0.0, first_s), LinFit(0.0, step_s), kv_fraction, (1.0,))


def test_paper_takes_the_smallest_alpha_that_fits_and_the_largest_when_none_does() -> None:
    models = {"vanilla": _model("vanilla", 1.0, 0.1), "snapkv-0.5": _model("snapkv-0.5", 1.0, 0.05),
              "int4": _model("int4", 0.1, 0.01)}  # fmt: skip
    configs = list(models)
    view = TaskView("t", "chat", 100, 100, models)  # no prediction: N_W = N_max = 100
    assert paper_planner(view, 12.0, "kill", configs) == "vanilla"  # 1 + 99 × 0.1 = 10.9 s
    assert paper_planner(view, 7.0, "kill", configs) == "snapkv-0.5"  # 1 + 99 × 0.05 = 5.95 s
    assert paper_planner(view, 2.0, "kill", configs) == "snapkv-0.5"  # nothing fits: the largest α, never int4
    short = TaskView("t", "chat", 100, 100, models, length={"point": 4})  # N_W = 20
    assert paper_planner(short, 3.0, "kill", configs) == "vanilla"  # 1 + 19 × 0.1 = 2.9 s


def test_fitted_time_models_predict_the_traces() -> None:
    parts, _ = load_traces([COMPRESS])
    data = parts[0]
    for config in ("vanilla", "compress-0.5"):
        runs = list(data.records[config].values())
        model = fit_time_model(config, runs)
        assert 0.8 < model.ratio_quantile(0.5) < 1.25
        assert model.ratio_quantile(0.9) >= model.ratio_quantile(0.5)
    assert fit_time_model("compress-0.5", list(data.records["compress-0.5"].values())).kv_fraction < 0.6


def test_cli_writes_markdown_and_json(tmp_path) -> None:
    result = CliRunner().invoke(app, ["bench-simulate", P03, "--planner", "oracle,paper", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "kill: average score" in result.output and "guard: average score" in result.output
    md = (tmp_path / "simulated.md").read_text()
    assert "sim:oracle (hindsight)" in md and "## Average score (completion rate) — skip-next" in md
    record = json.loads((tmp_path / "simulated.json").read_text())
    assert {c["method"] for c in record["cells"]} >= {"sim:paper", "sim:oracle (hindsight)", "vanilla"}
    bad = CliRunner().invoke(app, ["bench-simulate", P03, "--planner", "paper", "--policy", "nope"])
    assert bad.exit_code == 2 and "unknown policy" in bad.output


def test_predictions_round_trip_and_reach_the_view(tmp_path) -> None:
    from types import SimpleNamespace

    import numpy as np

    from timebill.bench.simulate import prediction_row, read_predictions, write_predictions

    pred = SimpleNamespace(point=7, probs=np.array([0.25, 0.75]), class_lengths=np.array([16, 64]))
    path = write_predictions(tmp_path / "p.jsonl", [prediction_row("chat-001", pred)])
    assert read_predictions(path) == {"chat-001": {"point": 7, "probs": [0.25, 0.75], "class_lengths": [16.0, 64.0]}}
    parts, scorer = load_traces([P03])
    seen = []
    register_planner("test-spy", lambda view, budget_s, policy, configs: seen.append(view.length) or "vanilla")
    try:
        task = parts[0].tasks[0].id
        simulate(parts, scorer, ["test-spy"], predictions={task: {"point": 3}})
    finally:
        PLANNERS.pop("test-spy")
    assert {"point": 3} in seen and None in seen
