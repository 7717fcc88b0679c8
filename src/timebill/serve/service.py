"""The state behind the endpoints: one model worker thread, the EDF queue, admission, the metrics.

**One torch thread.** torch's CPU backend (OpenMP, libgomp) gives every thread that runs torch work its own
pool of worker threads, alive as long as that thread; with two pools alive on a 2-core machine *every* pool
ran ~35 % slower here (a 576×6144 matvec: 250 µs alone, 347 µs beside another pool). So the model runs in
the model thread only, :func:`load_timebill` loads it in a thread that then exits, and admission (the
predictor may run torch) runs in a short-lived thread per request, never in a long-lived pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import Request

from timebill.engine import STOP_CANCELLED, STOP_DEADLINE
from timebill.errors import InfeasibleBudgetError, TimeBillError
from timebill.facade import LengthPredictionLike, TimeBill, TimeBillResult
from timebill.serve.admission import Admission, JobPayload
from timebill.serve.metrics import Metrics
from timebill.serve.protocol import RejectedError, RequestSpec
from timebill.serve.queue import QUEUED, EDFQueue, Job

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.1  # how often a waiting handler checks that its client is still there


class Service:
    """The TimeBill, its queue and worker, admission and metrics; what every endpoint talks to.

    **Never silently late**: a queued request is re-checked while it waits; once it can no longer start in
    time to fit at α_max (its latest start) it is refused with 429 there and then, and the worker checks
    again when it picks the request up. **Client disconnects cancel**: a queued request is dropped, a
    running one stops at the next token.
    """

    def __init__(self, timebill: TimeBill, model_name: str, default_budget_s: float, max_budget_s: float) -> None:
        self.timebill = timebill
        self.model_name = model_name
        self.metrics = Metrics()
        self.queue = EDFQueue(self._run, on_start=getattr(timebill.engine, "use_in_this_thread", None))
        self.admission = Admission(timebill, self.queue, default_budget_s, max_budget_s)
        # Admissions run one at a time (each sees the queue entries of those before it), beside the model
        # rather than behind it; each in a fresh thread (see "One torch thread" in this module's docstring).
        self._admission_lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.created = int(time.time())

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue.start()

    def stop(self) -> None:
        self.queue.close()

    async def admit_async(
        self,
        spec: RequestSpec,
        arrival: float,
        prediction: LengthPredictionLike | None = None,
        key: str | None = None,
    ) -> Job:
        """Admission in a short-lived thread, so the event loop never waits on the predictor. ``prediction``
        and ``key``: from a router that predicted the length and names the request (a replica's case)."""

        def serialized() -> Job:
            with self._admission_lock:
                return self.admission.admit(spec, arrival, prediction, key)

        return await in_fresh_thread(serialized, "timebill-admission")

    # ------------------------------------------------------------------ running (model worker thread)
    def _emit(self, job: Job, kind: str, value: Any = None) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed under us (shutdown)
            loop.call_soon_threadsafe(job.payload.events.put_nowait, (kind, value))

    def _run(self, job: Job) -> None:
        payload: JobPayload = job.payload
        spec = payload.spec
        now = time.perf_counter()
        if job.cancel.is_set():
            self.metrics.inc("timebill_requests_cancelled_total")
            return
        if now > job.latest_start:
            self.metrics.inc("timebill_requests_rejected_total", stage="queued")
            self._emit(job, "rejected", self._expired(job, now))
            return
        self._emit(job, "started")
        try:
            result = self.timebill.generate(
                spec.prompt,
                spec.budget_s,
                spec.options,
                chat=spec.chat,
                question=spec.question,
                t_start=job.arrival,
                prediction=payload.prediction,
                on_plan=lambda plan: self._emit(job, "plan", plan),
                on_token=(lambda token: self._emit(job, "token", token)) if spec.stream else None,
                should_stop=job.cancel.is_set,
            )
        except InfeasibleBudgetError as exc:
            self.metrics.inc("timebill_requests_rejected_total", stage="queued")
            earliest = exc.earliest_feasible_s or (time.perf_counter() - job.arrival + job.min_need_s)
            self._emit(job, "rejected", RejectedError(str(exc), earliest, "queued"))
            return
        except TimeBillError as exc:
            self.metrics.inc("timebill_requests_invalid_total", endpoint=spec.endpoint)
            self._emit(job, "error", exc)
            return
        except BaseException as exc:  # the handler must hear back whatever happened
            logger.exception("generation failed")
            self.metrics.inc("timebill_requests_failed_total")
            self._emit(job, "error", exc)
            if not isinstance(exc, Exception):
                raise
            return
        try:
            record_result(self.metrics, result)
        except Exception:  # metrics must never cost an answer
            logger.exception("recording metrics failed")
        self._emit(job, "done", result)

    def _expired(self, job: Job, now: float) -> RejectedError:
        waited = now - job.arrival
        return RejectedError(
            f"Infeasible: after {waited:.3f} s in the queue, the {job.payload.spec.budget_s:.3f} s budget no longer "
            f"leaves the {job.min_need_s:.3f} s this request needs even at alpha_max (the work ahead of it ran "
            "longer than predicted). Give a larger time_budget.",
            earliest_feasible_budget_s=waited + job.min_need_s,
            stage="queued",
        )

    # ------------------------------------------------------------------ waiting (event loop)
    async def next_event(self, request: Request, job: Job, until_started: bool) -> tuple[str, Any]:
        """The job's next event; ``("cancelled", None)`` if the client went away.

        While the job waits (``until_started``), its latest start is watched: past it, the job is dropped
        and refused here and now, instead of being run late.
        """
        events: asyncio.Queue = job.payload.events
        while True:
            timeout = DISCONNECT_POLL_S
            if until_started and job.state == QUEUED:
                timeout = max(0.0, min(timeout, job.latest_start - time.perf_counter()))
            try:
                return await asyncio.wait_for(events.get(), timeout=timeout)
            except asyncio.TimeoutError:
                pass
            if await request.is_disconnected():
                self.cancel(job)
                return "cancelled", None
            now = time.perf_counter()
            if until_started and now > job.latest_start and self.queue.drop(job):
                self.metrics.inc("timebill_requests_rejected_total", stage="queued")
                return "rejected", self._expired(job, now)

    def cancel(self, job: Job) -> None:
        job.cancel.set()
        if self.queue.drop(job):
            self.metrics.inc("timebill_requests_cancelled_total")


def record_result(m: Metrics, result: TimeBillResult) -> None:
    """Count a finished request: its stop reason, deadline met or missed, guard stops, time in the queue,
    and the estimator's errors (prefill, end to end)."""
    m.inc("timebill_requests_completed_total", stop_reason=result.stop_reason)
    if result.stop_reason == STOP_CANCELLED:
        m.inc("timebill_requests_cancelled_total")
        return
    m.inc("timebill_deadline_met_total" if result.deadline_met else "timebill_deadline_missed_total")
    if result.stop_reason == STOP_DEADLINE:
        m.inc("timebill_guard_stops_total")
    m.inc("timebill_queue_wait_seconds_total", result.waited_s)
    prefill_error = result.measured_prefill_s - result.plan.predicted_prefill_s
    m.observe("timebill_time_error_seconds", prefill_error, phase="prefill")
    if result.generation.tokens_generated:
        e2e_error = result.measured_e2e_s - result.waited_s - result.predicted_e2e_s
        m.observe("timebill_time_error_seconds", e2e_error, phase="e2e")


_T = TypeVar("_T")


async def in_fresh_thread(fn: Callable[[], _T], name: str) -> _T:
    """Run ``fn`` in a new thread that exits afterwards (its torch thread pool, if any, goes with it)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            future.set_result(value) if ok else future.set_exception(value)

    def run() -> None:
        try:
            value = fn()
        except BaseException as exc:  # delivered to the awaiting handler
            loop.call_soon_threadsafe(settle, False, exc)
        else:
            loop.call_soon_threadsafe(settle, True, value)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await future


def load_timebill(loader: Callable[[], TimeBill] | None = None, **options: Any) -> TimeBill:
    """``TimeBill.load(**options)`` (or ``loader()``) for a server: run in a thread that exits before serving.

    Loading warms the model up, which creates the loading thread's torch pool; were that the main thread,
    the pool would live on beside the model thread's and slow both (see "One torch thread" in this module's docstring).
    """
    load = loader if loader is not None else (lambda: TimeBill.load(**options))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="timebill-load") as pool:
        return pool.submit(load).result()
