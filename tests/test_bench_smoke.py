"""`timebill bench` end to end on the default model: two short tasks, every method, report and plots, resume."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from length_predictors import ConstantPredictor
from timebill.bench.methods import ExpectedScoreMethod, Resources, Scorer, method_registry
from timebill.bench.report import write_report
from timebill.bench.runner import BenchOptions, run_benchmark
from timebill.bench.suite import read_suite
from timebill.cli import app
from timebill.estimator import save_profile
from timebill.facade import TimeBill

TASKS = [
    {
        "id": "qa-short",
        "kind": "retrieval",
        "metric": "qa_f1",
        "prompt": "The secret passphrase for Oslo is silver lantern. What is the passphrase for Oslo? Answer briefly.",
        "references": ["silver lantern"],
        "max_new_tokens": 6,
    },
    {
        "id": "code-short",
        "kind": "code",
        "metric": "code_sim",
        "prompt": "def add(a, b):\n",
        "references": ["return a + b"],
        "max_new_tokens": 6,
        "chat": False,
    },
]


def _suite(tmp_path: Path) -> Path:
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    return path


def _lines(directory: Path) -> dict[str, int]:
    return {p.stem: len(p.read_text().splitlines()) for p in sorted((directory / "runs").glob("*.jsonl"))}


def test_cli_bench_two_tasks_end_to_end_and_resumes(
    engine, estimator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    profile = save_profile(estimator.profile, tmp_path / "profile.json")
    out = tmp_path / "out"
    args = ["bench", "--suite", str(_suite(tmp_path)), "--out", str(out), "--predictor", "constant:4"]
    args += ["--profile", str(profile), "--threads", str(engine.threads), "--n-budgets", "2", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    runs = _lines(out)
    n_budgets = len(json.loads((out / "manifest.json").read_text())["budgets"])
    assert n_budgets in (1, 2)  # two quantiles of two vanilla times (equal only if the times tie)
    for name, method in method_registry().items():  # k = 5 of the sweep *is* `timebill` at the tightest budget
        if isinstance(method, ExpectedScoreMethod):  # opt-in (needs every weights mode profiled + quality model)
            assert name not in runs
            continue
        assert runs[name] == 2 * (n_budgets if method.budgeted else 1)
    assert {f"timebill-k{k}" for k in (1, 2, 3, 4, 6, 7, 8)} <= set(runs)  # the k sweep (k = 5 is `timebill`)
    report = (out / "results.md").read_text()
    for needed in ("constant:4", "## Sanity", "kill", "skip-next", "guard", "k sweep", "do not depend on the budget"):
        assert needed in report
    assert "## Where the time goes" in report and "How `timebill` planned" in report
    for png in ("fig7_kill.png", "fig7_skip-next.png", "fig7_guard.png", "fig8_k_sweep.png"):
        assert (out / png).stat().st_size > 1000
    record = json.loads((out / "runs" / "vanilla.jsonl").read_text().splitlines()[0])
    assert len(record["token_times_s"]) == len(record["token_ids"]) >= 1

    again = CliRunner().invoke(app, args)  # resumable: every key is done, nothing runs twice
    assert again.exit_code == 0, again.output
    assert _lines(out) == runs

    monkeypatch.setattr(sys, "argv", ["timebill", *args, "--report-only"])  # what the report quotes
    rebuilt = CliRunner().invoke(app, [*args, "--report-only"])  # runs nothing; names both commands
    assert rebuilt.exit_code == 0, rebuilt.output
    assert _lines(out) == runs
    header = (out / "results.md").read_text().split("\n## ")[0]
    assert f"- Command: `{json.loads((out / 'manifest.json').read_text())['command']}`" in header
    assert "- Report rebuilt by: `timebill bench " in header and "--report-only`" in header
    assert "; runs timed 20" in header and " UTC" in header


def test_bench_api_with_a_stand_in_predictor_and_given_budgets(engine, estimator, tmp_path: Path) -> None:
    estimator.reset_recalibration()
    resources = Resources(
        engine,
        make_timebill=lambda e: TimeBill(e, estimator, ConstantPredictor(4), arrangement="sequential"),
        predictor_label="constant test",
    )
    suite = read_suite(_suite(tmp_path))
    options = BenchOptions(
        methods=["vanilla", "snapkv-0.5", "timebill"], budgets=[0.5, 30.0], k_sweep=(), progress=False
    )
    data = run_benchmark(resources, suite, list(suite.tasks), tmp_path / "api", options, log=lambda _: None)
    assert data.budgets == [0.5, 30.0] and "command line" in data.budget_note
    assert _lines(tmp_path / "api") == {"snapkv-0.5": 2, "timebill": 4, "vanilla": 2}
    path = write_report(data, tmp_path / "api", Scorer(resources.decode), {"predictor": "constant test"})
    assert "| timebill |" in path.read_text() and "## The paper's claims, checked" in path.read_text()
    # without the paper's planner in the run its claims section is left out, not printed as a placeholder
    without = dataclasses.replace(data, methods=[m for m in data.methods if m.name != "timebill"])
    text = write_report(without, tmp_path / "api-no-paper", Scorer(resources.decode), {"predictor": "x"}).read_text()
    assert "| snapkv-0.5 |" in text and "## The paper's claims" not in text and "needs the timebill" not in text
