"""Overrun policies and run bookkeeping on synthetic traces: Kill, Skip-Next, guard, budgets, run files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from timebill.bench.methods import STOP_REFUSED, Scorer, outcome
from timebill.bench.policies import Guard, JobOutcome, Kill, PolicySummary, SkipNext
from timebill.bench.runner import BenchError, RunStore, choose_budgets, read_runs, run_key
from timebill.bench.suite import Task


def _job(task_id: str, finished: bool, busy_s: float, full: float = 1.0, partial: float = 0.5) -> JobOutcome:
    return JobOutcome(task_id, finished, full if finished else 0.0, partial, answered=True, busy_s=busy_s)


def test_kill_scores_overruns_zero_and_counts_only_finished_jobs() -> None:
    jobs = [_job("a", True, 0.5, full=0.8), _job("b", False, 3.0), _job("c", True, 0.9, full=0.4)]
    scores = Kill().apply(jobs, period_s=1.0)
    assert [s.score for s in scores] == [0.8, 0.0, 0.4]
    assert [s.completed for s in scores] == [True, False, True]
    summary = PolicySummary.of("kill", scores)
    assert summary.avg_score == pytest.approx(40.0)  # (0.8 + 0 + 0.4) / 3 × 100
    assert summary.completion_rate == pytest.approx(2 / 3)


def test_guard_scores_the_partial_answer_but_does_not_call_it_completed() -> None:
    jobs = [_job("a", True, 0.5, full=0.8), _job("b", False, 3.0, partial=0.3)]
    jobs.append(JobOutcome("c", False, 0.0, 0.0, answered=False, busy_s=0.01))  # refused: nothing at all
    scores = Guard().apply(jobs, period_s=1.0)
    assert [s.score for s in scores] == [0.8, 0.3, 0.0]
    assert [s.completed for s in scores] == [True, False, False]


def test_skip_next_skips_jobs_released_while_an_overrun_runs() -> None:
    # T = 1 s, releases at 0, 1, 2, ...: b runs 1 → 3.5 s (overrun) and blocks the releases at 2 and 3;
    # e's release at 4 finds the processor free and runs 4 → 7.2 s (overrun), so f (released at 5) is skipped.
    jobs = [
        _job("a", True, 0.5),
        _job("b", False, 2.5),
        _job("c", True, 0.5),
        _job("d", True, 0.4),
        _job("e", False, 3.2),
        _job("f", True, 0.5),
    ]
    scores = SkipNext().apply(jobs, period_s=1.0)
    assert [s.skipped for s in scores] == [False, False, True, True, False, True]
    assert [s.score for s in scores] == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert [s.completed for s in scores] == [True, False, False, False, False, False]
    assert PolicySummary.of("skip-next", scores).skipped == 3


def test_skip_next_starts_a_job_released_exactly_when_the_previous_one_ends() -> None:
    scores = SkipNext().apply([_job("a", False, 2.0), _job("b", True, 0.1), _job("c", True, 0.1)], period_s=1.0)
    assert [s.skipped for s in scores] == [False, True, False]  # b at 1.0 < 2.0 skipped; c at 2.0 starts


def _task(metric: str = "qa_f1", refs: tuple[str, ...] = ("silver lantern",)) -> Task:
    return Task(id="t1", kind="retrieval", metric=metric, prompt="q", references=refs, max_new_tokens=8)


WORDS = {1: "The", 2: "passphrase", 3: "silver", 4: "lantern", 0: ""}


def _decode(ids: list[int]) -> str:
    return " ".join(WORDS[i] for i in ids)


def test_a_trace_read_at_a_budget_gives_finished_full_and_partial_scores() -> None:
    record = {
        "key": "vanilla|t1",
        "token_ids": [1, 2, 3, 4],
        "token_times_s": [0.5, 0.7, 0.9, 1.1],
        "stop_reason": "eos",
        "e2e_s": 1.1,
        "text": "The passphrase silver lantern",
    }
    scorer = Scorer(_decode)
    late = outcome(record, _task(), 1.0, scorer)
    # By 1.0 s three tokens are out: "The passphrase silver" → tokens {passphrase, silver}: P = 1/2, R = 1/2.
    assert not late.finished and late.answered and late.full_score == 0.0
    assert late.partial_score == pytest.approx(0.5)
    assert late.busy_s == 1.1  # a trace ran to its end: that is how long it holds the processor
    on_time = outcome(record, _task(), 1.1, scorer)
    assert on_time.finished and on_time.full_score == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    too_soon = outcome(record, _task(), 0.4, scorer)
    assert not too_soon.answered and too_soon.partial_score == 0.0
    assert Kill().apply([late, on_time], 1.0)[0].score == 0.0


def test_deadline_stopped_and_refused_runs_never_count_as_finished() -> None:
    scorer = Scorer(_decode)
    cut = {"key": "tb|t1|1", "token_ids": [3], "token_times_s": [0.6], "stop_reason": "deadline", "e2e_s": 0.6}
    cut["text"] = "silver"
    job = outcome(cut, _task(), 1.0, scorer)
    assert not job.finished and job.answered and job.partial_score == pytest.approx(2 / 3)
    refused = {"key": "tb|t1|0.1", "token_ids": [], "token_times_s": [], "stop_reason": STOP_REFUSED, "e2e_s": 0.002}
    job = outcome(refused, _task(), 0.1, scorer)
    assert not job.finished and not job.answered and job.busy_s == pytest.approx(0.002)


def test_budgets_are_quantiles_of_vanilla_times_from_tight_to_loose() -> None:
    times = [float(i) for i in range(1, 101)]
    budgets, note = choose_budgets(times)
    assert budgets == sorted(budgets) and len(budgets) == 6
    assert budgets[0] == pytest.approx(20.8) and budgets[-1] == pytest.approx(95.05, abs=0.1)
    assert sum(t <= budgets[0] for t in times) / len(times) <= 0.25  # vanilla misses most at the tightest
    assert sum(t <= budgets[-1] for t in times) / len(times) >= 0.9  # and finishes nearly all at the loosest
    assert "percentiles" in note and "vanilla finishes" in note
    with pytest.raises(BenchError):
        choose_budgets([])


def test_run_files_skip_a_torn_last_line_and_reject_corruption(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.append("vanilla", {"key": run_key("vanilla", "a", None), "e2e_s": 1.0})
    store.append("vanilla", {"key": run_key("vanilla", "b", None), "e2e_s": 2.0})
    path = store.path("vanilla")
    with path.open("ab") as f:
        f.write(b'{"key": "vanilla|c", "e2e')  # killed mid-append
    assert set(read_runs(path)) == {"vanilla|a", "vanilla|b"}
    assert set(store.load("vanilla")) == {"vanilla|a", "vanilla|b"}  # load repairs the file
    assert path.read_bytes().endswith(b"}\n")
    store.append("vanilla", {"key": "vanilla|c", "e2e_s": 3.0})
    assert len(read_runs(path)) == 3
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "not json", lines[2]]) + "\n")
    with pytest.raises(BenchError, match="line 2 is corrupt"):
        read_runs(path)


def test_a_later_record_for_the_same_key_wins(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"key": "k", "v": 1}) + "\n" + json.dumps({"key": "k", "v": 2}) + "\n")
    assert read_runs(path)["k"]["v"] == 2
    assert run_key("timebill", "t1", 2.5) == "timebill|t1|2.5"
