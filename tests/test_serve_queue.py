"""The EDF queue's time accounting, driven by hand-made jobs (no FastAPI, no model, no worker thread)."""

from __future__ import annotations

import math

import pytest

from timebill.errors import InvalidInputError
from timebill.serve import EDFQueue, Job


def _queue_with(*jobs: Job) -> EDFQueue:
    queue = EDFQueue(lambda job: None)  # never started: the jobs stay queued
    for job in jobs:
        queue.push(job)
    return queue


def test_backlog_counts_only_work_due_no_later_each_capped_by_its_deadline() -> None:
    early = Job(arrival=0.0, deadline=10.0, expected_s=2.0, min_need_s=1.0)
    late = Job(arrival=0.0, deadline=30.0, expected_s=5.0, min_need_s=1.0)
    doomed = Job(arrival=0.0, deadline=1.5, expected_s=4.0, min_need_s=1.0)  # the guard stops it at 1.5 s
    queue = _queue_with(early, late, doomed)
    assert queue.depth == 3
    assert queue.backlog_s(deadline=20.0, now=1.0) == pytest.approx(2.0 + 0.5)
    assert queue.total_backlog_s(now=1.0) == pytest.approx(2.0 + 5.0 + 0.5)


def test_slack_after_is_the_tightest_later_jobs_latest_start_minus_its_predicted_start() -> None:
    first = Job(arrival=0.0, deadline=5.0, expected_s=1.0, min_need_s=1.0)
    second = Job(arrival=0.0, deadline=8.0, expected_s=1.0, min_need_s=3.0)  # latest start 5.0
    queue = _queue_with(first, second)
    # A newcomer due at 6 s runs before `second` only: second starts at 1.0 today, may start as late as 5.0.
    assert queue.slack_after_s(deadline=6.0, now=0.0) == pytest.approx(4.0)
    assert queue.slack_after_s(deadline=9.0, now=0.0) == math.inf  # nobody is due after it


def test_a_dropped_job_leaves_the_accounting_and_cannot_be_dropped_twice() -> None:
    a = Job(arrival=0.0, deadline=5.0, expected_s=1.0, min_need_s=1.0)
    b = Job(arrival=0.0, deadline=6.0, expected_s=2.0, min_need_s=1.0)
    queue = _queue_with(a, b)
    assert queue.drop(a) and not queue.drop(a)
    assert queue.depth == 1 and queue.total_backlog_s(now=0.0) == pytest.approx(2.0)


def test_a_closed_queue_refuses_new_work() -> None:
    queue = _queue_with()
    queue.close(timeout_s=0.1)
    with pytest.raises(InvalidInputError, match="shutting down"):
        queue.push(Job(arrival=0.0, deadline=1.0, expected_s=0.1, min_need_s=0.1))
