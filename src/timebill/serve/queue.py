"""The earliest-deadline-first queue in front of the one model worker; testable without FastAPI.

One model, one request at a time (two at once on two cores would each take twice as long and break both
plans). Waiting requests are ordered by absolute deadline (arrival + budget): time queued is budget gone.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from timebill.errors import InvalidInputError

logger = logging.getLogger(__name__)

QUEUED, RUNNING, DROPPED, DONE = "queued", "running", "dropped", "done"


@dataclass(eq=False)
class Job:
    """A request admitted to the queue: its deadline and what the queue needs to reason about time.

    ``expected_s``: predicted time the request will hold the model (its expected end-to-end time);
    ``min_need_s``: the least time it needs once started (its WCET at α_max, i.e. the plan's earliest
    feasible budget). ``deadline`` and ``arrival`` are ``time.perf_counter()`` values.
    """

    arrival: float
    deadline: float
    expected_s: float
    min_need_s: float
    payload: Any = None
    state: str = QUEUED
    started_at: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    key: str | None = None  # the router's name for it, when a router sent it (see :meth:`EDFQueue.snapshot`)

    @property
    def latest_start(self) -> float:
        """After this moment the request cannot fit even at α_max: it must be refused, not started."""
        return self.deadline - self.min_need_s


class EDFQueue:
    """Earliest-deadline-first queue in front of one worker thread that runs ``runner(job)`` per job.

    Thread-safe: admission threads push, handlers on the event loop drop, the worker pops.
    Dropped jobs stay in the heap until popped (lazy deletion) but are not counted or run.
    """

    def __init__(
        self, runner: Callable[[Job], None], name: str = "timebill-model", on_start: Callable[[], None] | None = None
    ) -> None:
        self._runner = runner
        self._name = name
        self._on_start = on_start
        self._heap: list[tuple[float, int, Job]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._running: Job | None = None
        self._queued = 0
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop taking work: drop what waits, cancel what runs, wait for the worker."""
        with self._cond:
            self._closed = True
            for _, _, job in self._heap:
                if job.state == QUEUED:
                    job.state = DROPPED
                job.cancel.set()
            self._heap.clear()
            self._queued = 0
            if self._running is not None:
                self._running.cancel.set()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def depth(self) -> int:
        """Requests waiting (not the one running)."""
        return self._queued

    @property
    def busy(self) -> bool:
        return self._running is not None

    def push(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise InvalidInputError("The server is shutting down; try again later.")
            heapq.heappush(self._heap, (job.deadline, next(self._seq), job))
            self._queued += 1
            self._cond.notify()

    def drop(self, job: Job) -> bool:
        """Take a waiting job out (client gone, or past its latest start). False if it already started."""
        with self._cond:
            if job.state != QUEUED:
                return False
            job.state = DROPPED
            self._queued -= 1
            return True

    def _running_left_s(self, now: float) -> float:
        job = self._running
        if job is None or job.started_at is None:
            return 0.0
        return running_left_s(job.started_at, job.expected_s, job.deadline, now)

    def _queued_jobs(self) -> list[Job]:
        """Waiting jobs in the order the worker will take them (deadline, then arrival)."""
        return [j for _, _, j in sorted(self._heap, key=lambda e: e[:2]) if j.state == QUEUED]

    def backlog_s(self, deadline: float, now: float) -> float:
        """Predicted model time before a request with ``deadline`` would start (running + queued due no later)."""
        with self._cond:
            return backlog_s(self._running_left_s(now), self._queued_jobs(), deadline, now)

    def total_backlog_s(self, now: float) -> float:
        """Predicted model time of everything admitted: a request placed after all of it waits this long."""
        return self.backlog_s(math.inf, now)

    def slack_after_s(self, deadline: float, now: float) -> float:
        """How much a new request with ``deadline`` may delay the queued requests due after it (see
        :func:`slack_after_s`)."""
        with self._cond:
            return slack_after_s(self._running_left_s(now), self._queued_jobs(), deadline, now)

    def snapshot(self, now: float) -> dict[str, Any]:
        """What this queue has promised, in seconds from ``now`` (clock-free, so another process can use it):
        ``running`` = ``[key, predicted time left]`` (or None) and ``queued`` = ``[key, deadline, expected_s,
        min_need_s]`` per waiting request, ``key`` being the router's name for it (None if no router sent it).

        A replica publishes this for a router that plans requests against several queues.
        """
        with self._cond:
            queued = [[j.key, j.deadline - now, j.expected_s, j.min_need_s] for j in self._queued_jobs()]
            job = self._running
            running = None if job is None else [job.key, self._running_left_s(now)]
            return {"running": running, "queued": queued}

    def _next(self) -> Job | None:
        with self._cond:
            while True:
                while self._heap and not self._closed:
                    _, _, job = heapq.heappop(self._heap)
                    if job.state == QUEUED:
                        job.state = RUNNING
                        job.started_at = time.perf_counter()
                        self._queued -= 1
                        self._running = job
                        return job
                if self._closed:
                    return None
                self._cond.wait()

    def _loop(self) -> None:
        if self._on_start is not None:
            self._on_start()
        while (job := self._next()) is not None:
            try:
                self._runner(job)
            except BaseException:  # the worker must outlive any one request
                logger.exception("request failed in the model worker")
            finally:
                with self._cond:
                    job.state = DONE
                    self._running = None


class Commitment(Protocol):
    """What the time arithmetic needs of an admitted request (a :class:`Job`, or a router's ledger entry)."""

    deadline: float
    expected_s: float
    min_need_s: float


def running_left_s(started_at: float, expected_s: float, deadline: float, now: float) -> float:
    """Predicted time the running request still holds the model: never past its deadline (the guard stops it)."""
    return max(0.0, min(started_at + expected_s, deadline) - now)


def _capped_expected(job: Commitment, start: float) -> float:
    """A job's expected model time if it starts at ``start``: never past its deadline (the guard stops it)."""
    return max(0.0, min(job.expected_s, job.deadline - start))


def backlog_s(running_left: float, queued: Iterable[Commitment], deadline: float, now: float) -> float:
    """Predicted model time before a request with ``deadline`` would start on one EDF worker: what the
    running request has left plus the queued requests due no later (each capped at its own deadline)."""
    return running_left + sum(_capped_expected(j, now) for j in queued if j.deadline <= deadline)


def slack_after_s(running_left: float, queued: Iterable[Commitment], deadline: float, now: float) -> float:
    """How much a new request with ``deadline`` may delay the queued requests due after it.

    For each of them: its latest start (deadline − min_need_s) minus its predicted start today; the smallest
    of these (inf if none) is what a newcomer's expected time must not exceed.
    """
    start = now + running_left
    slack = math.inf
    for job in sorted(queued, key=lambda j: j.deadline):
        if job.deadline > deadline:
            slack = min(slack, job.deadline - job.min_need_s - start)
        start += _capped_expected(job, start)
    return slack
