"""OpenAI-compatible HTTP API with per-request time budgets (``timebill serve``).

Clients talk to TimeBill the way they talk to vLLM or llama.cpp: the standard OpenAI request shape,
plus extra JSON fields (``time_budget`` or ``time_budget_ms``, ``k``, ``alpha_max``, ``bound``,
``press``). The answer is the standard shape plus a ``timebill`` object: the plan and what was measured.

This module translates. The time logic (length prediction, plans, feasibility, eviction, the deadline
guard) is the facade's; what lives here is the one thing a server adds — a queue:

- **One model, one request at a time.** Two cores run one request fastest; two requests at once would
  each take twice as long and break both plans. The model runs in one worker thread (torch releases the
  GIL), so the event loop never waits on it.
- **Earliest deadline first.** Waiting requests are ordered by their absolute deadline (arrival +
  budget). A request's budget counts from its arrival, so time spent queued is time it no longer has.
- **Admission control, at once.** On arrival the length predictor runs (in a short-lived admission
  thread, not the model's; not at all when the prefill alone cannot fit) and the request is planned
  with what will be left of its budget when its turn comes: ``budget - elapsed - backlog``, where the
  *backlog* is the predicted time of the work that runs before it — the rest of the running request
  and every queued request with an earlier deadline, each counted at its expected end-to-end time (N̂
  tokens at its planned α; see :attr:`RequestPlan.expected_e2e_s`), capped by its own deadline (the
  guard never lets a request run past it). If the plan is infeasible even at α_max, the answer is HTTP
  429 with the earliest feasible budget, before any generation. A request whose expected time would
  push an already-admitted, later-deadline request past its latest start is refused too: promises
  already made come first.
- **Never silently late.** Expected times are estimates, so a queued request is re-checked while it
  waits: once it can no longer start in time to fit at α_max (its *latest start*), it is refused with
  429 there and then; the worker checks again when it picks the request up. A request that runs is
  planned by the facade on its measured elapsed time, and the deadline guard stops it before it would be
  late (``finish_reason="length"``, ``timebill.stop_reason="deadline"``).
- **Client disconnects cancel.** A queued request is dropped; a running one stops at the next token
  (``should_stop``), freeing the model.

**One torch thread.** torch's CPU backend (OpenMP, libgomp) gives every thread that runs torch work its
own pool of worker threads, alive as long as that thread. With two such pools alive on a 2-core machine,
libgomp stops letting idle workers spin and *every* pool runs ~35 % slower (measured here: a 576×6144
matvec takes 250 µs alone, 347 µs while another thread's pool merely exists). So the model runs in the
model thread only, :func:`load_timebill` loads it in a thread that then exits, and admission work (the
length predictor may run torch) runs in a short-lived thread per request, never in a long-lived pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from timebill.engine import STOP_CANCELLED, STOP_DEADLINE, STOP_EOS
from timebill.errors import InfeasibleBudgetError, InvalidInputError, TimeBillError
from timebill.facade import LengthPredictionLike, Prompt, RequestPlan, TimeBill, TimeBillResult, parse_budget

logger = logging.getLogger(__name__)

DEFAULT_BUDGET_S = 10.0  # when a request names none: an ordinary client still gets a deadline-aware answer
MAX_BUDGET_S = 3600.0  # a larger budget is a mistake (ms given as s), not a deadline
DEFAULT_MAX_TOKENS = 256
DISCONNECT_POLL_S = 0.1  # how often a waiting handler checks that its client is still there
PLANNING_BUDGET_S = 1e6  # a budget nothing exceeds: planning with it gives a request's least need

# How a stop reason reads to an OpenAI client: the guard's stop is a cut-off answer, like max_tokens.
FINISH_REASONS = {STOP_EOS: "stop", "max_tokens": "length", STOP_DEADLINE: "length", STOP_CANCELLED: "stop"}


# ---------------------------------------------------------------------------------------------- requests
class _ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    role: str
    content: str | list[_ContentPart]


class _BudgetedRequest(BaseModel):
    """Fields both endpoints share. Unknown fields are ignored (clients send many), wrong types are 422."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # the newer OpenAI name of max_tokens
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stream: bool = False
    n: int | None = None
    stop: str | list[str] | None = None
    time_budget: float | None = None
    time_budget_ms: float | None = None
    k: float | None = None
    alpha_max: float | None = None
    bound: str | None = None
    press: str | None = None


class ChatCompletionRequest(_BudgetedRequest):
    messages: list[_Message] = Field(min_length=1)


class CompletionRequest(_BudgetedRequest):
    prompt: str | list[str]


@dataclass
class RequestSpec:
    """One validated request, in the facade's terms."""

    prompt: Prompt
    chat: bool
    budget_s: float
    stream: bool
    options: dict[str, Any]  # max_new_tokens, k, alpha_max, bound, temperature, top_p, seed, press
    endpoint: str = "chat"  # chat | completions (metrics labels)


class RejectedError(TimeBillError):
    """The request cannot meet its budget (given the queue ahead of it): HTTP 429."""

    def __init__(self, message: str, earliest_feasible_budget_s: float, stage: str) -> None:
        super().__init__(message)
        self.earliest_feasible_budget_s = earliest_feasible_budget_s
        self.stage = stage  # admission | queued


# ---------------------------------------------------------------------------------------------- the queue
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
        return max(0.0, min(job.started_at + job.expected_s, job.deadline) - now)

    def backlog_s(self, deadline: float, now: float) -> float:
        """Predicted model time before a request with ``deadline`` would start (see the module docstring)."""
        with self._cond:
            ahead = [j for _, _, j in self._heap if j.state == QUEUED and j.deadline <= deadline]
            return self._running_left_s(now) + sum(_capped_expected(j, now) for j in ahead)

    def total_backlog_s(self, now: float) -> float:
        """Predicted model time of everything admitted: a request placed after all of it waits this long."""
        return self.backlog_s(math.inf, now)

    def slack_after_s(self, deadline: float, now: float) -> float:
        """How much a new request with ``deadline`` may delay the queued requests due after it.

        For each of them: its latest start minus its predicted start today; the smallest of these (inf if
        none) is what a newcomer's expected time must not exceed.
        """
        with self._cond:
            queued = sorted((d, s, j) for d, s, j in self._heap if j.state == QUEUED)
            start = now + self._running_left_s(now)
            slack = math.inf
            for d, _, job in queued:
                if d > deadline:
                    slack = min(slack, job.latest_start - start)
                start += _capped_expected(job, start)
            return slack

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


def _capped_expected(job: Job, start: float) -> float:
    """A job's expected model time if it starts at ``start``: never past its deadline (the guard stops it)."""
    return max(0.0, min(job.expected_s, job.deadline - start))


# ---------------------------------------------------------------------------------------------- metrics
ERROR_BUCKETS_S = (-1.0, -0.5, -0.25, -0.1, -0.05, -0.025, 0.0, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    """Counters and histograms for ``GET /metrics`` (Prometheus text format, written by hand)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._hist: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]] = {}  # buckets..., sum, count

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0.0) + value

    def observe(self, name: str, value: float, **labels: str) -> None:
        if not math.isfinite(value):
            return
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            h = self._hist.setdefault(key, [0.0] * (len(ERROR_BUCKETS_S) + 2))
            for i, bound in enumerate(ERROR_BUCKETS_S):
                if value <= bound:
                    h[i] += 1
            h[-2] += value
            h[-1] += 1

    def get(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters.get((name, tuple(sorted(labels.items()))), 0.0)

    def render(self, gauges: dict[str, float]) -> str:
        helps = {
            "timebill_requests_total": ("counter", "Requests received, by endpoint."),
            "timebill_requests_invalid_total": ("counter", "Requests refused as malformed (HTTP 400/422)."),
            "timebill_requests_rejected_total": (
                "counter",
                "Requests refused with HTTP 429 because the budget cannot be met (stage: admission or queued).",
            ),
            "timebill_requests_completed_total": ("counter", "Requests the model ran, by stop reason."),
            "timebill_deadline_met_total": ("counter", "Completed requests answered within their budget."),
            "timebill_deadline_missed_total": ("counter", "Completed requests answered late (or with no token)."),
            "timebill_guard_stops_total": ("counter", "Answers the deadline guard cut short (finish_reason=length)."),
            "timebill_requests_cancelled_total": ("counter", "Requests whose client went away (queued or running)."),
            "timebill_requests_failed_total": ("counter", "Requests that failed inside the server (HTTP 500)."),
            "timebill_queue_wait_seconds_total": ("counter", "Time completed requests spent queued, summed."),
        }
        lines: list[str] = []
        with self._lock:
            counters = dict(self._counters)
            hists = {k: list(v) for k, v in self._hist.items()}
        for name, (kind, text) in helps.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            series = [(lab, v) for (n, lab), v in counters.items() if n == name] or [((), 0.0)]
            lines += [f"{name}{_labels(lab)} {_num(v)}" for lab, v in sorted(series)]
        gauge_help = {
            "timebill_queue_depth": "Requests waiting for the model.",
            "timebill_engine_busy": "1 while the model runs a request.",
        }
        for name, value in gauges.items():
            lines += [f"# HELP {name} {gauge_help.get(name, name)}", f"# TYPE {name} gauge", f"{name} {_num(value)}"]
        name = "timebill_time_error_seconds"
        lines += [
            f"# HELP {name} Measured minus predicted time (the estimator's error; queue wait excluded), by phase.",
            f"# TYPE {name} histogram",
        ]
        for (_, lab), h in sorted((k, v) for k, v in hists.items() if k[0] == name):
            for bound, count in zip(ERROR_BUCKETS_S, h, strict=False):
                lines.append(f"{name}_bucket{_labels((*lab, ('le', _num(bound))))} {_num(count)}")
            lines.append(f"{name}_bucket{_labels((*lab, ('le', '+Inf')))} {_num(h[-1])}")
            lines.append(f"{name}_sum{_labels(lab)} {_num(h[-2])}")
            lines.append(f"{name}_count{_labels(lab)} {_num(h[-1])}")
        return "\n".join(lines) + "\n"


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# ---------------------------------------------------------------------------------------------- the service
def _error(status: int, message: str, kind: str, **extra: Any) -> JSONResponse:
    """An error in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``)."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": kind, **extra}}
    return JSONResponse(body, status_code=status)


class _Service:
    """The state behind the endpoints: the TimeBill, the queue, admission, the metrics."""

    def __init__(self, timebill: TimeBill, model_name: str, default_budget_s: float, max_budget_s: float) -> None:
        self.timebill = timebill
        self.model_name = model_name
        self.default_budget_s = default_budget_s
        self.max_budget_s = max_budget_s
        self.metrics = Metrics()
        self.queue = EDFQueue(self._run, on_start=getattr(timebill.engine, "use_in_this_thread", None))
        # Admissions run one at a time (each sees the queue entries of those before it), beside the model
        # rather than behind it; each in a fresh thread (see "One torch thread" above).
        self._admission_lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.created = int(time.time())

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue.start()

    def stop(self) -> None:
        self.queue.close()

    async def admit_async(self, spec: RequestSpec, arrival: float) -> Job:
        """:meth:`admit` in a short-lived thread, so the event loop never waits on the predictor."""

        def serialized() -> Job:
            with self._admission_lock:
                return self.admit(spec, arrival)

        return await _in_fresh_thread(serialized, "timebill-admission")

    # ------------------------------------------------------------------ request → spec
    def spec(self, req: _BudgetedRequest, prompt: Prompt, chat: bool) -> RequestSpec:
        """Map an OpenAI request onto the facade's arguments; InvalidInputError (HTTP 400) when it cannot."""
        extra = req.model_extra or {}
        if req.n not in (None, 1):
            raise InvalidInputError(f"n must be 1 (one answer per request), got {req.n}")
        if req.stop:
            raise InvalidInputError("stop sequences are not supported; the model stops at its end-of-turn token")
        for name in ("logprobs", "tools", "functions"):
            if extra.get(name):
                raise InvalidInputError(f"{name} is not supported by this server")
        if req.time_budget is not None and req.time_budget_ms is not None:
            raise InvalidInputError("give time_budget (seconds) or time_budget_ms, not both")
        if req.time_budget_ms is not None:
            budget_s = parse_budget(req.time_budget_ms / 1000.0)
        elif req.time_budget is not None:
            budget_s = parse_budget(req.time_budget)
        else:
            budget_s = self.default_budget_s
        if budget_s > self.max_budget_s:
            raise InvalidInputError(
                f"time budget {budget_s:g} s is over this server's limit of {self.max_budget_s:g} s "
                "(time_budget is in seconds; use time_budget_ms for milliseconds)"
            )
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise InvalidInputError("give max_tokens or max_completion_tokens, not both")
        max_tokens = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
        max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        if req.seed is not None and not 0 <= req.seed < 2**63:
            raise InvalidInputError(f"seed must be an integer in [0, 2^63), got {req.seed}")
        context = self.timebill.engine.context_length
        if not 1 <= max_tokens <= context:
            raise InvalidInputError(
                f"max_tokens must be between 1 and the model's context ({context}), got {max_tokens}"
            )
        options = {
            "max_new_tokens": max_tokens,
            "k": req.k,
            "alpha_max": req.alpha_max,
            "bound": req.bound,
            "temperature": 0.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "seed": req.seed,
            "press": req.press,
        }
        endpoint = "chat" if chat else "completions"
        return RequestSpec(prompt, chat, budget_s, req.stream, options, endpoint)

    # ------------------------------------------------------------------ admission (admission threads)
    def admit(self, spec: RequestSpec, arrival: float) -> Job:
        """Predict, plan against what the queue leaves of the budget, and queue, or raise RejectedError."""
        tb = self.timebill
        opts = spec.options
        plan_opts = {k: opts[k] for k in ("max_new_tokens", "k", "alpha_max", "bound")}
        _validate_sampling(opts)  # a bad value is a 400 now, not a failure in the worker later
        deadline = arrival + spec.budget_s
        now = time.perf_counter()
        backlog = self.queue.backlog_s(deadline, now)
        try:  # the prefill alone must fit what the queue leaves: checked before paying for a prediction
            prediction = tb.predict_length(spec.prompt, chat=spec.chat, time_budget=deadline - now - backlog)
        except InfeasibleBudgetError as exc:
            # No prediction was made, so the hint plans for the longest answer: a budget that surely fits.
            longest = _LongestAnswer(float(opts["max_new_tokens"]))
            enough = tb.plan(spec.prompt, PLANNING_BUDGET_S, chat=spec.chat, prediction=longest, **plan_opts)
            ahead = f" after {backlog:.3f} s of queued work ahead of it" if backlog > 0 else ""
            earliest = (now - arrival) + backlog + enough.earliest_feasible_budget_s
            raise RejectedError(
                f"Infeasible: the budget {spec.budget_s:.3f} s cannot be met{ahead}: what is left does not even "
                f"cover the predicted prefill of the {enough.n_x}-token prompt ({enough.predicted_prefill_s:.3f} s). "
                f"A budget of {earliest:.3f} s fits even a {longest.point:.0f}-token answer at alpha_max; or shorten "
                "the prompt.",
                earliest_feasible_budget_s=earliest,
                stage="admission",
            ) from exc
        least = tb.plan(spec.prompt, PLANNING_BUDGET_S, chat=spec.chat, prediction=prediction, **plan_opts)
        min_need_s = least.earliest_feasible_budget_s
        now = time.perf_counter()
        elapsed = now - arrival
        backlog = self.queue.backlog_s(deadline, now)
        left = deadline - now - backlog
        if left < min_need_s:
            ahead = f" after {backlog:.3f} s of queued work ahead of it" if backlog > 0 else ""
            raise RejectedError(
                f"Infeasible: the budget {spec.budget_s:.3f} s cannot be met{ahead}: this request needs at least "
                f"{min_need_s:.3f} s of model time even at alpha_max ({least.n_x} prompt tokens, "
                f"worst case {least.n_worst} new tokens). Give a larger time_budget, a shorter prompt or "
                "a smaller max_tokens.",
                earliest_feasible_budget_s=elapsed + backlog + min_need_s,
                stage="admission",
            )
        try:
            plan = tb.plan(spec.prompt, left, chat=spec.chat, prediction=prediction, **plan_opts)
        except InfeasibleBudgetError as exc:  # prefill alone: only possible at the edge of min_need_s
            raise RejectedError(str(exc), elapsed + backlog + min_need_s, "admission") from exc
        if not plan.feasible:  # the online recalibration moved between the two plans: rare, and a refusal
            raise RejectedError(
                f"Infeasible: the budget {spec.budget_s:.3f} s cannot be met (plan: {plan.summary_line()}).",
                earliest_feasible_budget_s=elapsed + backlog + plan.earliest_feasible_budget_s,
                stage="admission",
            )
        expected = min(plan.expected_e2e_s, left)
        if expected > self.queue.slack_after_s(deadline, now):
            raise RejectedError(
                f"Infeasible: fitting this request's {spec.budget_s:.3f} s budget ahead of the queue would make "
                "an already-admitted request miss its deadline. Give a larger time_budget.",
                earliest_feasible_budget_s=elapsed + self.queue.total_backlog_s(now) + min_need_s,
                stage="admission",
            )
        job = Job(arrival=arrival, deadline=deadline, expected_s=expected, min_need_s=min_need_s)
        job.payload = _JobPayload(spec=spec, prediction=prediction, admission_plan=plan, events=asyncio.Queue())
        self.queue.push(job)
        return job

    # ------------------------------------------------------------------ running (model worker thread)
    def _emit(self, job: Job, kind: str, value: Any = None) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed under us (shutdown)
            loop.call_soon_threadsafe(job.payload.events.put_nowait, (kind, value))

    def _run(self, job: Job) -> None:
        payload: _JobPayload = job.payload
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
                chat=spec.chat,
                t_start=job.arrival,
                prediction=payload.prediction,
                on_plan=lambda plan: self._emit(job, "plan", plan),
                on_token=(lambda token: self._emit(job, "token", token)) if spec.stream else None,
                should_stop=job.cancel.is_set,
                **spec.options,
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
            self._record(job, result)
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

    def _record(self, job: Job, result: TimeBillResult) -> None:
        m = self.metrics
        m.inc("timebill_requests_completed_total", stop_reason=result.stop_reason)
        if result.stop_reason == STOP_CANCELLED:
            m.inc("timebill_requests_cancelled_total")
            return
        m.inc("timebill_deadline_met_total" if result.deadline_met else "timebill_deadline_missed_total")
        if result.stop_reason == STOP_DEADLINE:
            m.inc("timebill_guard_stops_total")
        m.inc("timebill_queue_wait_seconds_total", result.waited_s)
        m.observe(
            "timebill_time_error_seconds", result.measured_prefill_s - result.plan.predicted_prefill_s, phase="prefill"
        )
        if result.generation.tokens_generated:
            e2e_error = result.measured_e2e_s - result.waited_s - result.predicted_e2e_s
            m.observe("timebill_time_error_seconds", e2e_error, phase="e2e")

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


@dataclass(frozen=True)
class _LongestAnswer:
    """A length 'prediction' that the answer runs to max_tokens: a plan with it needs no predictor and errs long."""

    point: float

    def upper(self, delta: float) -> float:
        return self.point


_T = TypeVar("_T")


async def _in_fresh_thread(fn: Callable[[], _T], name: str) -> _T:
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
    the pool would live on beside the model thread's and slow both (see "One torch thread" above).
    """
    load = loader if loader is not None else (lambda: TimeBill.load(**options))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="timebill-load") as pool:
        return pool.submit(load).result()


@dataclass
class _JobPayload:
    spec: RequestSpec
    prediction: LengthPredictionLike
    admission_plan: RequestPlan
    events: asyncio.Queue


def _validate_sampling(options: dict[str, Any]) -> None:
    from timebill.engine import SamplingConfig
    from timebill.presses import make_press

    SamplingConfig(options["temperature"], options["top_p"], options["seed"]).validate()
    if options["press"] is not None:
        make_press(options["press"])


# ---------------------------------------------------------------------------------------------- responses
def _timebill_info(result: TimeBillResult) -> dict[str, Any]:
    """The ``timebill`` object of a response: the plan and what was measured (no text, no per-token lists)."""
    info = result.to_dict()
    info.pop("text")
    gen = info.pop("generation")
    info["prompt_tokens"] = gen["prompt_tokens"]
    info["decode_path"] = gen["decode_path"]
    info["guard_stopped"] = result.stop_reason == STOP_DEADLINE
    return info


def _usage(result: TimeBillResult, stop_ids: set[int]) -> dict[str, int]:
    completion = sum(1 for t in result.generation.token_ids if t not in stop_ids)
    prompt = result.generation.prompt_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _TextStream:
    """Token ids → text deltas, decoding the whole answer each time so multi-byte characters come out whole."""

    def __init__(self, tokenizer: Any, stop_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token: int) -> str:
        if token in self.stop_ids:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""  # an incomplete character (or a re-merge): wait for the next token
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def finish(self, final_text: str) -> str:
        """What the final answer has beyond what was sent (so the deltas add up to the final text)."""
        delta = final_text[len(self.sent) :] if final_text.startswith(self.sent) else ""
        self.sent = final_text
        return delta


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def create_app(
    timebill: TimeBill,
    *,
    model_name: str | None = None,
    default_budget_s: float = DEFAULT_BUDGET_S,
    max_budget_s: float = MAX_BUDGET_S,
) -> FastAPI:
    """The FastAPI app serving ``timebill`` (see the module docstring for the queue and admission).

    ``model_name``: the id reported by ``/v1/models`` and in responses (default: the engine's model id);
    requests may name any model, they are all answered by this one. ``default_budget_s``: the budget of
    a request that gives none. ``max_budget_s``: larger budgets are refused as mistakes.
    """
    parse_budget(default_budget_s)
    parse_budget(max_budget_s)
    source = getattr(timebill.engine, "source", None)
    name = model_name or (source.model_id if source is not None else "timebill")
    service = _Service(timebill, name, default_budget_s, max_budget_s)
    engine = timebill.engine

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.stop)

    app = FastAPI(title="TimeBill", summary="Time-budgeted LLM inference, OpenAI-compatible.", lifespan=lifespan)
    app.state.service = service

    async def read_body(request: Request, model: type[_BudgetedRequest]) -> _BudgetedRequest | JSONResponse:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error(400, f"The request body is not valid JSON: {exc}", "invalid_request_error")
        if not isinstance(body, dict):
            return _error(400, "The request body must be a JSON object.", "invalid_request_error")
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
                for err in exc.errors(include_url=False)
            )
            return _error(422, f"Invalid request: {problems}", "invalid_request_error")

    async def handle(request: Request, endpoint: str, model: type[_BudgetedRequest]) -> Response:
        arrival = time.perf_counter()  # the budget counts from here: parsing and queueing are in it
        service.metrics.inc("timebill_requests_total", endpoint=endpoint)
        req = await read_body(request, model)
        if isinstance(req, JSONResponse):
            service.metrics.inc("timebill_requests_invalid_total", endpoint=endpoint)
            return req
        try:
            if isinstance(req, ChatCompletionRequest):
                messages = [{"role": m.role, "content": _content_text(m.content)} for m in req.messages]
                spec = service.spec(req, messages, chat=True)
            else:
                assert isinstance(req, CompletionRequest)
                prompt = req.prompt if isinstance(req.prompt, str) else _single_prompt(req.prompt)
                spec = service.spec(req, prompt, chat=False)
            job = await service.admit_async(spec, arrival)
        except RejectedError as exc:
            service.metrics.inc("timebill_requests_rejected_total", stage=exc.stage)
            return _rejected(exc)
        except TimeBillError as exc:
            service.metrics.inc("timebill_requests_invalid_total", endpoint=endpoint)
            return _error(400, str(exc), "invalid_request_error")
        except Exception as exc:  # a bug, not bad input: say so, and keep serving
            logger.exception("admission failed")
            service.metrics.inc("timebill_requests_failed_total")
            return _error(500, f"Admission failed: {type(exc).__name__}: {exc}", "server_error")
        kind, value = await service.next_event(request, job, until_started=True)
        if kind != "started":
            return _outcome_error(kind, value)
        rid = ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        if spec.stream:
            stream = _stream(service, request, job, rid, endpoint)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        while True:
            kind, value = await service.next_event(request, job, until_started=False)
            if kind in ("plan", "token"):
                continue
            if kind != "done":
                return _outcome_error(kind, value)
            return JSONResponse(_full_response(service, value, rid, endpoint))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        """Chat completion (OpenAI shape) within ``time_budget`` seconds; ``stream: true`` for SSE."""
        return await handle(request, "chat", ChatCompletionRequest)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        """Text completion of a raw prompt (no chat template) within ``time_budget`` seconds."""
        return await handle(request, "completions", CompletionRequest)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        """The one model this server runs."""
        return {
            "object": "list",
            "data": [{"id": service.model_name, "object": "model", "created": service.created, "owned_by": "timebill"}],
        }

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while the model worker is alive, with the queue's state."""
        ok = service.queue.alive
        body = {
            "status": "ok" if ok else "error",
            "model": service.model_name,
            "queue_depth": service.queue.depth,
            "busy": service.queue.busy,
            "context_length": engine.context_length,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        """Prometheus text: requests, deadlines met/missed, guard stops, rejections, queue, time errors."""
        gauges = {"timebill_queue_depth": float(service.queue.depth), "timebill_engine_busy": float(service.queue.busy)}
        return PlainTextResponse(service.metrics.render(gauges), media_type="text/plain; version=0.0.4")

    return app


def _content_text(content: str | list[_ContentPart]) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


def _single_prompt(prompts: list[str]) -> str:
    if len(prompts) != 1:
        raise InvalidInputError(f"prompt must be one string (batches are not supported), got a list of {len(prompts)}")
    return prompts[0]


def _rejected(exc: RejectedError) -> JSONResponse:
    return _error(
        429,
        str(exc),
        "infeasible_budget",
        earliest_feasible_budget_s=round(exc.earliest_feasible_budget_s, 4),
        stage=exc.stage,
    )


def _outcome_error(kind: str, value: Any) -> Response:
    """The HTTP answer for a job that did not produce a result."""
    if kind == "rejected":
        return _rejected(value)
    if kind == "cancelled":
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it
    if isinstance(value, TimeBillError):
        return _error(400, str(value), "invalid_request_error")
    return _error(500, f"Generation failed: {type(value).__name__}: {value}", "server_error")


def _full_response(service: _Service, result: TimeBillResult, rid: str, endpoint: str) -> dict[str, Any]:
    finish = FINISH_REASONS.get(result.stop_reason, "stop")
    if endpoint == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": service.model_name,
        "choices": [choice],
        "usage": _usage(result, service.timebill.engine.stop_ids),
        "timebill": _timebill_info(result),
    }


async def _stream(service: _Service, request: Request, job: Job, rid: str, endpoint: str) -> AsyncIterator[str]:
    """SSE: the plan first (with the role), text deltas, then a final chunk with finish_reason and timings."""
    engine = service.timebill.engine
    text = _TextStream(engine.tokenizer, engine.stop_ids)
    created = int(time.time())
    obj = "chat.completion.chunk" if endpoint == "chat" else "text_completion"

    def chunk(delta: str | None, finish: str | None = None, role: bool = False, **extra: Any) -> dict[str, Any]:
        if endpoint == "chat":
            d: dict[str, Any] = {"role": "assistant"} if role else {}
            if delta is not None:
                d["content"] = delta
            choice: dict[str, Any] = {"index": 0, "delta": d, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": obj, "created": created, "model": service.model_name, "choices": [choice], **extra}

    try:
        while True:
            kind, value = await service.next_event(request, job, until_started=False)
            if kind == "plan":
                yield _sse(chunk("", role=True, timebill={"plan": asdict(value), "queued_s": _queued_s(job)}))
            elif kind == "token":
                delta = text.push(value)
                if delta:
                    yield _sse(chunk(delta))
            elif kind == "done":
                result: TimeBillResult = value
                rest = text.finish(result.text)
                if rest:
                    yield _sse(chunk(rest))
                finish = FINISH_REASONS.get(result.stop_reason, "stop")
                usage = _usage(result, engine.stop_ids)
                yield _sse(chunk(None, finish, usage=usage, timebill=_timebill_info(result)))
                yield "data: [DONE]\n\n"
                return
            elif kind == "cancelled":
                return
            else:  # rejected at the worker, or failed: the status line is sent, so say it in the stream
                err = value
                status = 429 if kind == "rejected" else (400 if isinstance(err, TimeBillError) else 500)
                body = {"error": {"message": str(err), "type": "infeasible_budget" if status == 429 else "error"}}
                if isinstance(err, RejectedError):
                    body["error"]["earliest_feasible_budget_s"] = round(err.earliest_feasible_budget_s, 4)
                body["error"]["status"] = status
                yield _sse(body)
                return
    finally:
        job.cancel.set()  # the client left mid-stream (or the stream ended): free the model at the next token


def _queued_s(job: Job) -> float:
    return (job.started_at - job.arrival) if job.started_at is not None else 0.0


__all__ = [
    "create_app",
    "load_timebill",
    "EDFQueue",
    "Job",
    "Metrics",
    "RejectedError",
    "DEFAULT_BUDGET_S",
    "MAX_BUDGET_S",
]
