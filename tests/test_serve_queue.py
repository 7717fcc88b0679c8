"""The EDF queue's time accounting, driven by hand-made jobs (no FastAPI, no model; one test starts the worker)."""

from __future__ import annotations

import math
import threading
import time

import pytest

from timebill.errors import InvalidInputError
from timebill.serve import EDFQueue, Job
from timebill.serve.queue import DONE, DROPPED


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


def test_close_drops_and_cancels_every_waiting_job() -> None:
    waiting = [Job(arrival=0.0, deadline=d, expected_s=1.0, min_need_s=1.0) for d in (5.0, 6.0)]
    queue = _queue_with(*waiting)
    queue.close(timeout_s=0.1)
    assert queue.depth == 0 and queue.total_backlog_s(now=0.0) == 0.0
    assert all(job.state == DROPPED and job.cancel.is_set() for job in waiting)


def test_the_worker_outlives_a_request_that_raises() -> None:
    ran: list[str] = []
    finished = threading.Event()

    def runner(job: Job) -> None:
        if job.payload == "boom":
            raise RuntimeError("a bug in one request")
        ran.append(job.payload)
        finished.set()

    queue = EDFQueue(runner)
    queue.start()
    try:
        now = time.perf_counter()
        boom = Job(arrival=now, deadline=now + 1.0, expected_s=0.1, min_need_s=0.1, payload="boom")
        fine = Job(arrival=now, deadline=now + 2.0, expected_s=0.1, min_need_s=0.1, payload="fine")
        queue.push(boom)
        queue.push(fine)
        assert finished.wait(5.0), "the worker stopped after the failing request"
        assert ran == ["fine"] and boom.state == DONE and queue.alive
    finally:
        queue.close()
