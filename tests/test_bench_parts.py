"""A benchmark run split into parts (one machine each) and merged by budget level; runs bound to their machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from length_predictors import ConstantPredictor
from timebill.bench.methods import Resources, Scorer
from timebill.bench.policies import PolicySummary
from timebill.bench.runner import BenchError, BenchOptions, load_manifest, run_benchmark, save_manifest
from timebill.bench.stats import combine, evaluate
from timebill.bench.suite import Task, parse_part, read_suite, select_part
from timebill.cli import app
from timebill.errors import InvalidInputError
from timebill.facade import TimeBill


def _tasks() -> list[Task]:
    return [
        Task(f"{kind}-{i}", kind, "qa_f1", "p", ("a",), 8, prompt_tokens=(37 * i) % 101)
        for kind, n in (("retrieval", 60), ("code", 50), ("chat", 50))
        for i in range(n)
    ]


def test_parts_are_disjoint_cover_the_suite_and_each_looks_like_it() -> None:
    tasks = _tasks()
    parts = [select_part(tasks, i, 7) for i in range(7)]
    ids = [t.id for p in parts for t in p]
    assert sorted(ids) == sorted(t.id for t in tasks) and len(ids) == len(set(ids))  # a partition
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    for part in parts:
        assert part == sorted(part, key=tasks.index)  # the file's order (Skip-Next releases jobs in it)
        for kind in ("retrieval", "code", "chat"):
            lengths = sorted(t.prompt_tokens or 0 for t in part if t.kind == kind)
            assert len(lengths) >= 7 and lengths[0] < 20 and lengths[-1] > 80  # short and long prompts
    assert select_part(tasks, 3, 7) == parts[3]  # deterministic
    assert select_part(tasks, 0, 1) == tasks


@pytest.mark.parametrize("text", ["3", "a/b", "2/2", "-1/3", "0/0", "1/2/3"])
def test_bad_part_specs_are_clear_errors(text: str) -> None:
    with pytest.raises(InvalidInputError, match="--part"):
        parse_part(text)


def test_more_parts_than_tasks_is_an_error() -> None:
    with pytest.raises(InvalidInputError, match="cannot split"):
        select_part(_tasks()[:3], 0, 4)


TASKS = [
    {"id": "qa-1", "kind": "retrieval", "metric": "qa_f1", "prompt": "The code word is red. Code word?",
     "references": ["red"], "max_new_tokens": 4, "prompt_tokens": 10},
    {"id": "qa-2", "kind": "retrieval", "metric": "qa_f1",
     "prompt": "Maria lives in Lisbon and works in Porto. Where does Maria live? Answer with the city only.",
     "references": ["Lisbon"], "max_new_tokens": 5, "prompt_tokens": 20},
    {"id": "code-1", "kind": "code", "metric": "code_sim", "prompt": "def add(a, b):\n",
     "references": ["return a + b"], "max_new_tokens": 24, "chat": False, "prompt_tokens": 7},
    {"id": "code-2", "kind": "code", "metric": "code_sim", "prompt": "def is_even(n):\n    # True if n is even\n",
     "references": ["return n % 2 == 0"], "max_new_tokens": 24, "chat": False, "prompt_tokens": 15},
]  # fmt: skip


@pytest.fixture(scope="module")
def two_parts(engine, estimator, tmp_path_factory):
    """Both halves of a four-task suite, run as parts 0/2 and 1/2 with their own budgets."""
    tmp = tmp_path_factory.mktemp("parts")
    suite_path = tmp / "four.jsonl"
    suite_path.write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    suite = read_suite(suite_path)
    estimator.reset_recalibration()
    resources = Resources(
        engine,
        make_timebill=lambda e: TimeBill(e, estimator, ConstantPredictor(4), arrangement="sequential"),
        predictor_label="constant test",
    )
    data = []
    for i in range(2):
        options = BenchOptions(
            methods=["vanilla", "snapkv-0.5", "timebill"], n_budgets=2, k_sweep=(), progress=False, part=f"{i}/2"
        )
        tasks = select_part(list(suite.tasks), i, 2)
        data.append(run_benchmark(resources, suite, tasks, tmp / f"part{i}", options, log=lambda _: None))
    return tmp, resources, data


def test_combined_cells_are_job_weighted_means_of_the_parts_by_budget_level(two_parts) -> None:
    tmp, resources, (a, b) = two_parts
    assert {t.kind for t in a.tasks} == {t.kind for t in b.tasks} == {"retrieval", "code"}
    scorer = Scorer(resources.decode)
    ev, union = combine([a, b], scorer)
    assert len(union.tasks) == 4 and [c.key for c in ev.columns] == [0, 1]
    assert ev.columns[0].header.startswith("p20: ") and ev.columns[1].header.startswith("p95: ")
    ev_a, ev_b = evaluate(a, scorer), evaluate(b, scorer)
    for level in (0, 1):
        for method in ("vanilla", "snapkv-0.5", "timebill"):
            for policy in ("kill", "skip-next", "guard"):
                x: PolicySummary = ev_a.cells[(method, a.budgets[level], policy)]
                y: PolicySummary = ev_b.cells[(method, b.budgets[level], policy)]
                merged = ev.cells[(method, level, policy)]
                assert merged.jobs == x.jobs + y.jobs == 4
                assert merged.avg_score == pytest.approx((x.avg_score * x.jobs + y.avg_score * y.jobs) / 4)
                assert merged.completion_rate == pytest.approx((x.completion_rate + y.completion_rate) / 2)
            jobs = ev.kill_jobs[(method, level)]  # what the claims' bootstrap resamples: every part's jobs
            assert sorted(t for t, _ in jobs) == sorted(t.id for t in union.tasks)
            assert 100 * sum(score for _, score in jobs) / 4 == pytest.approx(
                ev.cells[(method, level, "kill")].avg_score
            )
    with pytest.raises(BenchError, match="overlap"):
        combine([a, a], scorer)


def test_cli_combines_part_directories_into_one_report(two_parts) -> None:
    tmp, _, _ = two_parts
    out = tmp / "combined"
    result = CliRunner().invoke(app, ["bench-combine", str(tmp / "part0"), str(tmp / "part1"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = (out / "results.md").read_text()
    assert "2 parts combined" in report and "| 0/2 |" in report and "| 1/2 |" in report
    assert "| timebill |" in report and "p95: " in report and "constant test" in report
    assert (out / "fig7_kill.png").stat().st_size > 1000
    missing = CliRunner().invoke(app, ["bench-combine", str(tmp / "nowhere"), "--out", str(out)])
    assert missing.exit_code != 0 and "manifest.json" in missing.output


def test_runs_timed_on_another_machine_are_not_resumed_here(two_parts, tmp_path: Path) -> None:
    tmp, resources, (a, _) = two_parts
    manifest = load_manifest(tmp / "part0")
    assert manifest is not None and manifest["machine"] and manifest["part"] == "0/2"
    moved = tmp_path / "moved"
    (moved / "runs").mkdir(parents=True)
    for f in (tmp / "part0" / "runs").glob("*.jsonl"):
        (moved / "runs" / f.name).write_bytes(f.read_bytes())
    save_manifest(moved, {**manifest, "machine": "Some Other CPU (64 logical CPUs)"})
    options = BenchOptions(methods=["vanilla", "snapkv-0.5", "timebill"], n_budgets=2, k_sweep=(), progress=False)
    options.part = "0/2"
    # Everything is done: reading (and reporting) on another machine is fine.
    again = run_benchmark(resources, a.suite, a.tasks, moved, options, log=lambda _: None)
    assert again.budgets == a.budgets and again.meta["machine"] == "Some Other CPU (64 logical CPUs)"
    # One run missing: adding it here would mix machines.
    lines = (moved / "runs" / "vanilla.jsonl").read_text().splitlines()
    (moved / "runs" / "vanilla.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(BenchError, match="timed on Some Other CPU"):
        run_benchmark(resources, a.suite, a.tasks, moved, options, log=lambda _: None)


def test_machine_signature_tells_apart_cpus_that_share_a_generic_name() -> None:
    from timebill.estimator.store import cpu_signature

    block = (
        "processor\t: {p}\nvendor_id\t: AuthenticAMD\ncpu family\t: {f}\nmodel\t\t: {m}\n"
        "model name\t: AMD EPYC\nstepping\t: 2\n"
    )
    zen1 = block.format(p=0, f=23, m=1) + "\n" + block.format(p=1, f=23, m=1)
    zen3 = block.format(p=0, f=25, m=1)
    assert cpu_signature(zen1) == "AMD EPYC (cpu family 23, model 1, stepping 2)"
    assert cpu_signature(zen1) != cpu_signature(zen3)
    # Without the numbers (not x86, or no /proc) it is the name as before.
    assert cpu_signature("model name\t: Some  CPU\n") == "Some CPU"


def test_timebill_paper_names_the_paper_planner_runs() -> None:
    """`--methods timebill-paper` runs (and reads) the committed `timebill` records, once even if named twice."""
    from timebill.bench.methods import TimeBillMethod, method_registry, resolve_method_names

    names = resolve_method_names(["vanilla", "timebill-paper", "timebill", "int4"])
    assert names == ["vanilla", "timebill", "int4"]
    assert isinstance(method_registry()[names[1]], TimeBillMethod)
    BenchOptions(methods=names).validate()
    with pytest.raises(Exception, match="unknown method"):
        BenchOptions(methods=resolve_method_names(["timebill-papers"])).validate()
