"""``timebill serve --replicas N``: TimeBill replicas as a Ray Serve deployment, behind the same HTTP API.

Why Ray Serve: it already runs replicas on one machine or a cluster, restarts the ones that die, and (since
its custom request router API) lets us choose the replica per request. Its default router (power of two
choices) balances queue *lengths*; a deadline needs *time*. So:

- Each **replica** (:class:`TimeBillReplica`) is today's single-node server without HTTP: its own engine,
  profile, length predictor, EDF queue, admission and online recalibration (``threads`` = cores / N). It
  publishes, through Ray's ``record_routing_stats``, its recalibrated time model and the work it has
  committed to (running + queued, as "due in d seconds").
- The **front door** is this process: the same FastAPI app as ``timebill serve`` (OpenAI routes,
  streaming, the ``timebill`` plan object, ``/metrics``), whose service (:class:`RoutedService`) predicts
  the length once, plans the request against every replica (:mod:`timebill.serve.routing`, what the
  single-node admission computes) and sends it to the best, or answers 429 before any generation.
  Ray's HTTP proxy is not used: the front door needs the length predictor, and one hop fewer is time saved.
- The **router** (:class:`DeadlineRouter`, a ``ray.serve.request_router.RequestRouter``) owns the
  decision and the ledger of what it sent where; ``choose_replicas`` sends each request to the replica the
  decision named (or, if that replica died in between, to the least loaded live one, whose own admission
  then decides). ``--router default`` keeps Ray's router, for comparison.

The replica's own admission stays authoritative: if the router's view was stale, the replica refuses (429)
rather than run late.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from timebill.errors import InfeasibleBudgetError, InvalidInputError, TimeBillError
from timebill.facade import LengthPredictionLike, TimeBill
from timebill.predictor.constant import ConstantPrediction
from timebill.serve import routing
from timebill.serve.admission import RequestParser
from timebill.serve.metrics import Metrics
from timebill.serve.protocol import DEFAULT_BUDGET_S, MAX_BUDGET_S, RejectedError, RequestSpec
from timebill.serve.queue import DONE, QUEUED, RUNNING, Job
from timebill.serve.routing import (
    Decision,
    Demand,
    Ledger,
    ReplicaView,
    coefficients_from,
    combine,
    published_work,
    route,
)
from timebill.serve.service import DISCONNECT_POLL_S, Service, in_fresh_thread, load_timebill, record_result

logger = logging.getLogger(__name__)

ROUTERS = ("deadline", "default")
APP_NAME = "timebill"
DEPLOYMENT_NAME = "TimeBillReplica"
#: How often each replica publishes its time model and committed work (the router's own ledger is immediate).
ROUTING_STATS_PERIOD_S = 0.5
#: Ray must not queue requests in front of a replica: its EDF queue and admission are the queue.
MAX_ONGOING_REQUESTS = 256
_TERMINAL = ("done", "rejected", "error", "cancelled")


def ray_available() -> bool:
    """Whether the ``[ray]`` extra is installed."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        return False
    return True


def _require_ray() -> None:
    if not ray_available():
        raise InvalidInputError(
            "`timebill serve --replicas` needs Ray Serve, an optional extra: pip install -e '.[ray]'"
        )


# ------------------------------------------------------------------------------------------ replica config
@dataclass(frozen=True)
class ReplicaConfig:
    """How a replica (and the front door) loads its TimeBill; plain data, so Ray can ship it to any node.

    ``predictor``: a predictor file, ``None`` (the shipped one) or ``constant:N`` (N tokens for every
    prompt: a stand-in for benchmarks and tests, labelled as such).
    """

    model: str | None = None
    threads: int | None = None
    weights: str = "fp32"
    profile: str | None = None
    predictor: str | None = None
    default_budget_s: float = DEFAULT_BUDGET_S
    max_budget_s: float = MAX_BUDGET_S

    def load(self) -> TimeBill:
        """The TimeBill this configuration describes (ProfileError / PredictorError when files are missing)."""
        if self.predictor is not None and self.predictor.startswith("constant:"):
            from timebill.engine import Engine
            from timebill.estimator import ExecutionTimeEstimator

            length = _constant_length(self.predictor)
            engine = Engine.load(self.model, threads=self.threads, weights=self.weights)
            estimator = ExecutionTimeEstimator.for_engine(engine, path=self.profile)
            return TimeBill(engine, estimator, constant_length_predictor(length), arrangement="sequential")
        return TimeBill.load(
            self.model, threads=self.threads, weights=self.weights, profile=self.profile, predictor=self.predictor
        )


def constant_length_predictor(length: float) -> Any:
    """The stand-in predictor: ``length`` tokens for every prompt; upper(δ) = 2·N·(1 + ln(1/δ)/3)."""
    from timebill.predictor import ConstantLengthPredictor

    return ConstantLengthPredictor(length, spread=2.0, log_divisor=3.0)


def _constant_length(spec: str) -> float:
    try:
        length = float(spec.split(":", 1)[1])
    except ValueError:
        length = math.nan
    if not (math.isfinite(length) and length >= 1):
        raise InvalidInputError(f"predictor {spec!r}: expected constant:N with N >= 1 tokens")
    return length


def threads_per_replica(replicas: int, threads: int | None = None, cores: int | None = None) -> int:
    """``threads`` if given, else this machine's cores shared out (at least one each)."""
    if threads is not None:
        return threads
    return max(1, (cores or os.cpu_count() or 1) // replicas)


# ------------------------------------------------------------------------------------------ the replica
@dataclass(frozen=True)
class RoutedRequest:
    """What the front door sends a replica: the validated request, its length prediction (made once), how
    much of its budget was gone when it left (``elapsed_s`` at wall-clock ``sent_at``), and the replica the
    deadline router chose (``target``; None under Ray's default router)."""

    spec: RequestSpec
    prediction: Any
    elapsed_s: float
    sent_at: float
    key: str
    target: str | None = None


class _NeverDisconnected:
    """A replica hears of a client that left as a cancelled call, not by polling a socket."""

    async def is_disconnected(self) -> bool:
        return False


class TimeBillReplica:
    """One Ray Serve replica: a single-node TimeBill service (engine, profile, predictor, EDF queue)."""

    def __init__(self, config: ReplicaConfig) -> None:
        timebill = load_timebill(loader=config.load)
        source = getattr(timebill.engine, "source", None)
        name = source.model_id if source is not None else "timebill"
        self.service = Service(timebill, name, config.default_budget_s, config.max_budget_s)
        self._started = False
        self._start_lock = threading.Lock()

    def _ensure_started(self) -> None:
        with self._start_lock:
            if not self._started:
                self.service.start()  # binds the worker's events to this (the replica's) event loop
                self._started = True

    async def ping(self) -> str:
        """This replica's id (the front door waits for every replica to answer before serving)."""
        self._ensure_started()
        return replica_id_here()

    async def run(self, routed: RoutedRequest) -> AsyncIterator[tuple[str, Any]]:
        """Admit the request to this replica's queue and stream its events: ``started``, ``plan``, ``token``
        …, then one of ``done`` (the result), ``rejected`` (message, earliest budget, stage) or ``error``."""
        self._ensure_started()
        service = self.service
        gone = routed.elapsed_s + max(0.0, time.time() - routed.sent_at)
        arrival = time.perf_counter() - gone
        try:
            job = await service.admit_async(routed.spec, arrival, routed.prediction, key=routed.key)
        except RejectedError as exc:
            service.metrics.inc("timebill_requests_rejected_total", stage=exc.stage)
            yield "rejected", (str(exc), exc.earliest_feasible_budget_s, exc.stage)
            return
        except Exception as exc:
            yield "error", _error_value(exc)
            return
        waiting = _NeverDisconnected()
        until_started = True
        try:
            while True:
                kind, value = await service.next_event(waiting, job, until_started=until_started)  # type: ignore[arg-type]
                if kind == "started":
                    until_started = False
                    yield kind, None
                elif kind in ("plan", "token", "done"):
                    yield kind, value
                elif kind == "rejected":
                    yield kind, (str(value), value.earliest_feasible_budget_s, value.stage)
                elif kind == "error":
                    yield kind, _error_value(value)
                if kind in _TERMINAL:
                    return
        finally:
            if job.state in (QUEUED, RUNNING):  # the front door cancelled (client gone): free the model
                service.cancel(job)

    def record_routing_stats(self) -> dict[str, Any]:
        """Ray's hook: the time model (recalibrated) and the committed work, for the deadline router."""
        service = self.service
        return {
            "coefficients": dataclasses.asdict(service.timebill.time_coefficients()),
            **service.queue.snapshot(time.perf_counter()),
            "reported_at": time.time(),
            "alive": service.queue.alive or not self._started,
        }

    def check_health(self) -> None:
        """Ray's health check: a replica whose model worker died is replaced."""
        if self._started and not self.service.queue.alive:
            raise RuntimeError("the model worker thread is not running")


def _error_value(exc: BaseException) -> tuple[bool, str]:
    """An exception as plain data (custom exceptions do not always survive pickling): (bad input?, message)."""
    if isinstance(exc, TimeBillError):
        return True, str(exc)
    return False, f"{type(exc).__name__}: {exc}"


def replica_id_here() -> str:
    from ray import serve

    return str(serve.get_replica_context().replica_id.unique_id)


# ------------------------------------------------------------------------------------------ the router
def _request_router_base() -> type:
    try:
        from ray.serve.request_router import RequestRouter
    except ImportError:  # no [ray] extra: the class below still imports, and says so when used
        return object
    return RequestRouter


class DeadlineRouter(_request_router_base()):  # type: ignore[misc]
    """Ray Serve request router that sends each request where :mod:`timebill.serve.routing` decided.

    The decision itself (:meth:`decide`) is made by the front door before the call, so that a request no
    replica can serve is refused with 429 without a call. The router instance lives in the front door's
    process (Ray builds one per deployment handle); :meth:`for_deployment` finds it.
    """

    def initialize_state(self, **kwargs: Any) -> None:
        self.ledger = Ledger()
        # Not a class attribute: Ray ships this class with cloudpickle, and unpickling it again in this
        # process resets the class's attributes to their pickled (empty) state. A module is pickled by name.
        routing.LIVE_ROUTERS[(self._deployment_id.app_name, self._deployment_id.name)] = self

    @staticmethod
    def for_deployment(app: str = APP_NAME, deployment: str = DEPLOYMENT_NAME) -> DeadlineRouter | None:
        """The router Ray built in this process for ``app``'s deployment (None before the first handle call)."""
        return routing.LIVE_ROUTERS.get((app, deployment))

    # ------------------------------------------------------------------ state
    def replica_ids(self) -> list[str]:
        return [str(rid.unique_id) for rid in list(self.curr_replicas)]

    def views(self) -> list[ReplicaView]:
        """Every live replica as the router sees it: the busier of its ledger and its published work."""
        now_wall = time.time()
        views = []
        for replica in list(self.curr_replicas.values()):
            rid = str(replica.replica_id.unique_id)
            stats = replica.routing_stats or {}
            if stats and not stats.get("alive", True):
                continue
            age = now_wall - float(stats.get("reported_at", now_wall))
            foreign = published_work(stats, age, self.ledger.knows)
            views.append(combine(rid, coefficients_from(stats), self.ledger.work(rid), foreign))
        return views

    def decide(self, demand: Demand, fallback: Any = None) -> Decision:
        """Plan ``demand`` on every live replica and pick one (or refuse): :func:`routing.route`."""
        return route(demand, self.views(), fallback)

    # ------------------------------------------------------------------ Ray's hooks
    async def choose_replicas(self, candidate_replicas: list, pending_request: Any = None) -> list[list]:
        routed = _routed_of(pending_request)
        if routed is not None and routed.target is not None:
            for replica in candidate_replicas:
                if str(replica.replica_id.unique_id) == routed.target:
                    return [[replica]]

        # No decision (a ping), or the chosen replica is gone: least committed work first.
        def load(replica: Any) -> float:
            rid = str(replica.replica_id.unique_id)
            running, queued = self.ledger.work(rid)
            return running + sum(w.expected_s for w in queued)

        return [sorted(candidate_replicas, key=load)] if candidate_replicas else []

    def on_replica_actor_died(self, replica_id: Any) -> None:
        super().on_replica_actor_died(replica_id)
        self.ledger.drop_replica(str(replica_id.unique_id))

    def mark_dead(self, unique_id: str) -> None:
        """A call to this replica failed with its actor gone: stop routing to it now, not at Ray's next
        replica update (the controller starts a replacement, which joins through ``update_replicas``)."""
        for rid in list(self.curr_replicas):
            if str(rid.unique_id) == unique_id:
                self.on_replica_actor_died(rid)


def _routed_of(pending_request: Any) -> RoutedRequest | None:
    args = getattr(pending_request, "args", None) or ()
    return args[0] if args and isinstance(args[0], RoutedRequest) else None


# ------------------------------------------------------------------------------------------ the front door
class _RemoteCancel(threading.Event):
    """``job.cancel`` for a request running on a replica: setting it also cancels the remote call."""

    def __init__(self) -> None:
        super().__init__()
        self.on_set: Callable[[], None] | None = None

    def set(self) -> None:
        first = not self.is_set()
        super().set()
        if first and self.on_set is not None:
            self.on_set()


@dataclass
class _RemotePayload:
    spec: RequestSpec
    events: asyncio.Queue
    key: str
    task: asyncio.Task | None = None


class _LedgerQueue:
    """What ``/health`` and ``/metrics`` read of "the queue", for the requests out on replicas."""

    def __init__(self, service: RoutedService) -> None:
        self._service = service

    @property
    def alive(self) -> bool:
        router = self._service.router()
        return router is None or bool(router.replica_ids())

    @property
    def depth(self) -> int:
        """Requests out on replicas that have not started yet."""
        return sum(queued for _, queued in self._counts())

    @property
    def busy(self) -> bool:
        return any(running for running, _ in self._counts())

    def _counts(self) -> list[tuple[int, int]]:
        router = self._service.router()
        ids = (router.replica_ids() if router is not None else []) + [""]
        return [self._service.ledger.counts(rid) for rid in ids]


class RoutedService:
    """The service behind the HTTP app when the model runs on Ray Serve replicas (see the module docstring).

    It offers what :func:`timebill.serve.create_app` uses of :class:`~timebill.serve.service.Service`:
    ``admission.spec``, ``admit_async``, ``next_event``, ``cancel``, ``metrics``, ``queue`` (depth, busy,
    alive), ``start``/``stop``. ``timebill`` is the front door's own copy (tokenizer, length predictor,
    profile): it predicts and plans, it never generates.
    """

    def __init__(
        self,
        timebill: TimeBill,
        handle: Any,
        *,
        router: str = "deadline",
        model_name: str,
        default_budget_s: float = DEFAULT_BUDGET_S,
        max_budget_s: float = MAX_BUDGET_S,
    ) -> None:
        if router not in ROUTERS:
            raise InvalidInputError(f"router must be one of {', '.join(ROUTERS)}, got {router!r}")
        self.timebill = timebill
        self.handle = handle
        self.router_kind = router
        self.model_name = model_name
        self.metrics = Metrics()
        self.admission = RequestParser(timebill, default_budget_s, max_budget_s)  # the queues are on replicas
        self._own_ledger = Ledger()  # the default router's requests (no DeadlineRouter to hold them)
        self.queue = _LedgerQueue(self)
        self._admission_lock = threading.Lock()
        self.created = int(time.time())

    def router(self) -> DeadlineRouter | None:
        """The deadline router (in this process), or None under Ray's default router."""
        return DeadlineRouter.for_deployment() if self.router_kind == "deadline" else None

    @property
    def ledger(self) -> Ledger:
        """Where the requests out on replicas are booked: the deadline router's ledger, or our own."""
        router = self.router()
        return router.ledger if router is not None else self._own_ledger

    def start(self) -> None:
        """Nothing to start here: each replica starts its own model worker."""

    def stop(self) -> None:
        """Nothing to stop here: the replicas belong to Ray (``timebill serve`` shuts Serve down on exit)."""

    # ------------------------------------------------------------------ admission (a fresh thread)
    def _demand(self, spec: RequestSpec, arrival: float, prediction: LengthPredictionLike) -> Demand:
        """The request in the planner's terms, the same on every replica, planned from ``arrival``."""
        opts = spec.options
        inputs = self.timebill.plan_inputs(spec.prompt, opts, prediction=prediction, chat=spec.chat)
        return Demand(
            budget_s=spec.budget_s,
            elapsed_s=time.perf_counter() - arrival,
            n_x=inputs.n_x,
            n_hat=inputs.n_hat,
            n_worst=inputs.n_worst,
            n_max=opts.max_new_tokens,
            k=opts.k,
            alpha_max=opts.alpha_max,
            bound=opts.bound,
            overhead_s=inputs.overhead_s,
            infeasible_slack=opts.infeasible_slack,
        )

    def _decide(self, spec: RequestSpec, arrival: float) -> tuple[LengthPredictionLike, str | None, str, Job]:
        """Predict, plan on every replica, reserve the chosen one in the ledger: (prediction, target, key, job)."""
        tb = self.timebill
        opts = spec.options
        router = self.router()
        if self.router_kind == "deadline" and router is None:
            raise TimeBillError("the deadline router is not running yet (no request reached the replicas)")
        views = router.views() if router is not None else []
        elapsed = time.perf_counter() - arrival
        longest = ConstantPrediction(float(opts.max_new_tokens))  # upper(δ) = the point: "runs to max_tokens"
        if router is not None and views:  # can the prefill alone be admitted anywhere? (no prediction yet)
            fallback = tb.time_coefficients()
            need = tb.prefill_need(spec.prompt, opts, chat=spec.chat)
            deadline_in = spec.budget_s - elapsed
            if not any(routing.prefill_fits(v, deadline_in, need.n_x, need.compress_s, fallback) for v in views):
                # No prediction was made, so the hint plans for the longest answer: a budget that surely fits.
                decision = router.decide(self._demand(spec, arrival, longest), fallback=fallback)
                raise RejectedError(
                    f"Infeasible: the budget {spec.budget_s:.3f} s cannot be met on any of the {len(views)} "
                    f"replicas: on each, the {need.n_x}-token prompt's prefill ({need.seconds:.3f} s) either does "
                    "not fit what the queued work leaves or would make an admitted request miss its deadline. "
                    f"A budget of {decision.earliest_feasible_budget_s:.3f} s fits even a "
                    f"{longest.point:.0f}-token answer at alpha_max.",
                    earliest_feasible_budget_s=decision.earliest_feasible_budget_s,
                    stage="admission",
                )
        least_backlog = min((v.backlog_s(spec.budget_s) for v in views), default=0.0)
        try:
            prediction = tb.predict_length(
                spec.prompt, chat=spec.chat, time_budget=spec.budget_s - elapsed - least_backlog, options=opts
            )
        except InfeasibleBudgetError as exc:
            enough = tb.least_time(spec.prompt, opts, prediction=longest, chat=spec.chat)
            earliest = elapsed + least_backlog + enough.seconds
            raise RejectedError(
                f"Infeasible: the budget {spec.budget_s:.3f} s cannot be met on any replica: what is left does "
                f"not even cover the predicted prefill of the {enough.n_x}-token prompt "
                f"({enough.predicted_prefill_s:.3f} s). A budget of {earliest:.3f} s fits even a "
                f"{longest.point:.0f}-token answer at alpha_max; or shorten the prompt.",
                earliest_feasible_budget_s=earliest,
                stage="admission",
            ) from exc
        demand = self._demand(spec, arrival, prediction)
        key = uuid.uuid4().hex
        deadline = arrival + spec.budget_s
        if router is None:  # Ray's router picks; the replica's admission decides
            self._own_ledger.reserve(key, "", demand.deadline, 0.0, 0.0)
            return prediction, None, key, Job(arrival=arrival, deadline=deadline, expected_s=0.0, min_need_s=0.0)
        decision = router.decide(demand, fallback=tb.time_coefficients())
        chosen = decision.chosen
        if chosen is None:
            raise RejectedError(
                f"Infeasible: the budget {spec.budget_s:.3f} s cannot be met on any of the {len(decision.quotes)} "
                f"replicas: {decision.message}. Give a larger time_budget.",
                earliest_feasible_budget_s=decision.earliest_feasible_budget_s,
                stage="admission",
            )
        router.ledger.reserve(key, chosen.replica_id, demand.deadline, chosen.expected_s, chosen.min_need_s)
        job = Job(arrival=arrival, deadline=deadline, expected_s=chosen.expected_s, min_need_s=chosen.min_need_s)
        return prediction, chosen.replica_id, key, job

    async def admit_async(self, spec: RequestSpec, arrival: float) -> Job:
        """Predict, route (or refuse with RejectedError), and start the call to the chosen replica."""

        def serialized() -> tuple[LengthPredictionLike, str | None, str, Job]:
            with self._admission_lock:
                return self._decide(spec, arrival)

        prediction, target, key, job = await in_fresh_thread(serialized, "timebill-routing")
        job.cancel = _RemoteCancel()
        events: asyncio.Queue = asyncio.Queue()
        payload = _RemotePayload(spec, events, key)
        job.payload = payload
        routed = RoutedRequest(spec, prediction, time.perf_counter() - arrival, time.time(), key, target)
        payload.task = asyncio.get_running_loop().create_task(self._pump(job, routed))
        loop = asyncio.get_running_loop()
        job.cancel.on_set = lambda: loop.call_soon_threadsafe(_cancel_task, payload.task)
        return job

    async def _pump(self, job: Job, routed: RoutedRequest) -> None:
        """Relay the replica's events into the job's queue; a replica that fails answers with an error."""
        payload: _RemotePayload = job.payload
        put = payload.events.put_nowait
        ledger = self.ledger
        try:
            stream = self.handle.options(stream=True).run.remote(routed)
            async for kind, value in stream:
                if kind == "started":
                    job.state, job.started_at = RUNNING, time.perf_counter()
                    ledger.start(payload.key)
                    put((kind, value))
                elif kind == "done":
                    with contextlib.suppress(Exception):  # metrics must never cost an answer
                        record_result(self.metrics, value)
                    put((kind, value))
                elif kind == "rejected":
                    message, earliest, stage = value
                    self.metrics.inc("timebill_requests_rejected_total", stage=stage)
                    put((kind, RejectedError(message, earliest, stage)))
                elif kind == "error":
                    invalid, message = value
                    self.metrics.inc("timebill_requests_invalid_total" if invalid else "timebill_requests_failed_total")
                    put((kind, InvalidInputError(message) if invalid else RuntimeError(message)))
                else:
                    put((kind, value))
                if kind in _TERMINAL:
                    return
            put(("error", RuntimeError("the replica ended the request without an answer")))
        except asyncio.CancelledError:
            put(("cancelled", None))
            raise
        except Exception as exc:  # the replica died (or Ray failed): the request is answered, not lost
            logger.warning("request %s failed on its replica: %s", routed.key, exc)
            self.metrics.inc("timebill_requests_failed_total")
            router = self.router()
            if router is not None and routed.target is not None and _actor_gone(exc):
                router.mark_dead(routed.target)
            put(("error", RuntimeError(f"the replica serving this request failed: {type(exc).__name__}: {exc}")))
        finally:
            job.state = DONE
            ledger.release(payload.key)
            self._own_ledger.release(payload.key)

    async def next_event(self, request: Request, job: Job, until_started: bool) -> tuple[str, Any]:
        """The job's next event from its replica; ``("cancelled", None)`` if the client went away."""
        events: asyncio.Queue = job.payload.events
        while True:
            try:
                return await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                pass
            if await request.is_disconnected():
                self.cancel(job)
                return "cancelled", None

    def cancel(self, job: Job) -> None:
        if not job.cancel.is_set():
            self.metrics.inc("timebill_requests_cancelled_total")
        job.cancel.set()


def _actor_gone(exc: BaseException) -> bool:
    from ray.exceptions import ActorUnavailableError, RayActorError

    return isinstance(exc, (RayActorError, ActorUnavailableError))


def _cancel_task(task: asyncio.Task | None) -> None:
    if task is not None and not task.done():
        task.cancel()


# ------------------------------------------------------------------------------------------ starting it
@dataclass
class Cluster:
    """A running deployment: the handle the front door calls, and how to stop it."""

    handle: Any
    replicas: int
    router: str
    replica_ids: list[str]

    def shutdown(self) -> None:
        """Delete the deployment (Ray itself keeps running: ``serve.shutdown()``/``ray.shutdown()`` stop it)."""
        from ray import serve

        routing.LIVE_ROUTERS.pop((APP_NAME, DEPLOYMENT_NAME), None)  # a later deployment builds its own
        with contextlib.suppress(Exception):
            serve.delete(APP_NAME)


def start_cluster(
    config: ReplicaConfig,
    replicas: int,
    *,
    router: str = "deadline",
    address: str | None = None,
    num_cpus: int | None = None,
    ready_timeout_s: float = 600.0,
) -> Cluster:
    """Start (or join, with ``address``) Ray, deploy ``replicas`` TimeBill replicas, and wait until each
    has loaded its model and answered: a user's first request never pays a replica's start-up."""
    _require_ray()
    if replicas < 1:
        raise InvalidInputError(f"--replicas must be >= 1, got {replicas}")
    if router not in ROUTERS:
        raise InvalidInputError(f"--router must be one of {', '.join(ROUTERS)}, got {router!r}")
    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    if not ray.is_initialized():
        init: dict[str, Any] = {"namespace": "timebill", "include_dashboard": False, "log_to_driver": False}
        if address is None:
            init["num_cpus"] = num_cpus or os.cpu_count() or 1
        ray.init(address=address, **init)
    serve.start(proxy_location="Disabled")
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "num_replicas": replicas,
        "max_ongoing_requests": MAX_ONGOING_REQUESTS,
        "ray_actor_options": {"num_cpus": config.threads or 1},
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 30.0,
    }
    if router == "deadline":
        options["request_router_config"] = RequestRouterConfig(
            request_router_class="timebill.serve.cluster:DeadlineRouter",
            request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
            request_routing_stats_timeout_s=10.0,
        )
    deployment = serve.deployment(TimeBillReplica, **options)
    try:
        handle = serve.run(deployment.bind(config), name=APP_NAME, route_prefix=None, blocking=False)
    except Exception as exc:  # a replica failed to construct: Ray's exception carries its remote traceback
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise TimeBillError(f"the TimeBill replicas did not start: {first}") from exc
    deadline = time.monotonic() + ready_timeout_s
    seen: set[str] = set()
    while len(seen) < replicas:  # a ping per live replica (the router spreads pings by load: least first)
        if time.monotonic() > deadline:
            raise TimeBillError(f"only {len(seen)} of {replicas} replicas answered within {ready_timeout_s:.0f} s")
        seen.update(handle.ping.remote().result() for _ in range(replicas))
    if router == "deadline":
        while (r := DeadlineRouter.for_deployment()) is None or len(r.views()) < replicas:
            if time.monotonic() > deadline:
                raise TimeBillError("the deadline router did not see every replica")
            time.sleep(0.1)
    return Cluster(handle, replicas, router, sorted(seen))


def create_cluster_app(
    config: ReplicaConfig,
    replicas: int,
    *,
    router: str = "deadline",
    address: str | None = None,
    num_cpus: int | None = None,
) -> tuple[Any, Cluster]:
    """The HTTP app (same routes as :func:`~timebill.serve.create_app`) in front of a new deployment."""
    from timebill.serve.app import create_app

    # The front door's copy first: a missing profile or predictor is a one-line error here, before Ray starts,
    # rather than a replica that fails to construct inside Ray.
    timebill = load_timebill(loader=config.load)
    cluster = start_cluster(config, replicas, router=router, address=address, num_cpus=num_cpus)
    source = getattr(timebill.engine, "source", None)
    name = source.model_id if source is not None else "timebill"
    service = RoutedService(
        timebill,
        cluster.handle,
        router=router,
        model_name=name,
        default_budget_s=config.default_budget_s,
        max_budget_s=config.max_budget_s,
    )
    app = create_app(
        timebill,
        model_name=name,
        default_budget_s=config.default_budget_s,
        max_budget_s=config.max_budget_s,
        service=service,
    )
    return app, cluster
