"""Deadline-aware routing across TimeBill replicas: which replica meets this request's deadline best.

Pure time arithmetic, no Ray and no torch, so the decision is testable on hand-built replica states. A
replica is described by its time model (the planner's :class:`~timebill.planner.TimeCoefficients`, already
recalibrated by that replica) and the work it has committed to (the request it runs and its EDF queue).
For every replica the request is planned exactly as the single-node admission plans it against its own
queue (:mod:`timebill.serve.admission`): what the queue leaves of the budget must cover the worst case at
α_max, and the expected time must not push an already-admitted request past its latest start. Among the
replicas where it fits, the one with the best expected quality wins, ties to the most slack; where it fits
nowhere, the answer is a refusal with the smallest earliest feasible budget over the replicas.

*Expected quality* is, for now, the planner's own ordering: less eviction (a smaller α*) is a better
answer. A quality model of the configuration replaces this key when the planner grows one.

Times here are seconds relative to "now" (the router's clock), never absolute clock readings: replicas on
other machines publish their work as "due in d seconds", which survives clocks that disagree.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from timebill import planner
from timebill.planner import TimeCoefficients
from timebill.serve.queue import backlog_s, running_left_s, slack_after_s

#: Two plans whose α* differ by less than this are the same quality: the tie goes to the most slack.
QUALITY_TIE = 1e-6

#: The routers alive in this process, by (app, deployment): Ray builds them, the front door asks them.
LIVE_ROUTERS: dict[tuple[str, str], object] = {}


@dataclass(frozen=True)
class Work:
    """One request a replica has committed to, in seconds from now: due in ``deadline`` seconds, expected to
    hold the model ``expected_s``, needing at least ``min_need_s`` once started."""

    deadline: float
    expected_s: float
    min_need_s: float


@dataclass(frozen=True)
class ReplicaView:
    """What the router knows of one replica: its time model and the work ahead of a new request there.

    ``coefficients`` None means the replica has not published its time model yet: the router then plans
    with its own (same profile) ``fallback`` coefficients.
    """

    replica_id: str
    coefficients: TimeCoefficients | None
    running_left_s: float = 0.0
    queued: tuple[Work, ...] = ()

    def backlog_s(self, deadline: float) -> float:
        """Model time before a request due in ``deadline`` seconds would start here (EDF order)."""
        return backlog_s(self.running_left_s, self.queued, deadline, 0.0)

    def total_backlog_s(self) -> float:
        return self.backlog_s(math.inf)

    def slack_after_s(self, deadline: float) -> float:
        return slack_after_s(self.running_left_s, self.queued, deadline, 0.0)


@dataclass(frozen=True)
class Demand:
    """A request in the planner's terms, the same on every replica: prompt tokens (after any compression),
    the length prediction's point and worst case, the options the planner reads, the overhead reserved
    before decode (eviction, decode set-up, a compressor), and how much of the budget is already gone."""

    budget_s: float
    elapsed_s: float
    n_x: int
    n_hat: float
    n_worst: int
    n_max: int
    k: float = planner.DEFAULT_K
    alpha_max: float = planner.DEFAULT_ALPHA_MAX
    bound: str = "k"
    overhead_s: float = 0.0
    infeasible_slack: float = 0.0

    @property
    def deadline(self) -> float:
        """Seconds from now to the deadline."""
        return self.budget_s - self.elapsed_s


@dataclass(frozen=True)
class Quote:
    """The request planned against one replica."""

    replica_id: str
    feasible: bool
    alpha: float
    expected_s: float
    min_need_s: float
    backlog_s: float
    left_s: float
    earliest_feasible_budget_s: float
    reason: str = ""

    @property
    def quality(self) -> float:
        """Expected quality, higher is better (for now 1 − α*: see the module docstring)."""
        return 1.0 - self.alpha

    @property
    def slack_s(self) -> float:
        """Seconds to spare at the deadline in the expected case."""
        return self.left_s - self.expected_s


@dataclass(frozen=True)
class Decision:
    """The replica to send the request to, or None (refuse: 429) with the least budget that would fit."""

    replica_id: str | None
    quotes: tuple[Quote, ...]
    earliest_feasible_budget_s: float
    message: str = ""

    @property
    def chosen(self) -> Quote | None:
        return next((q for q in self.quotes if q.replica_id == self.replica_id), None)


def _coefficients(view: ReplicaView, fallback: TimeCoefficients | None) -> TimeCoefficients:
    """The replica's published time model, else the router's own (same profile)."""
    coef = view.coefficients or fallback
    if coef is None:
        raise ValueError(f"replica {view.replica_id} has no time model and no fallback was given")
    return coef


def quote(demand: Demand, view: ReplicaView, fallback: TimeCoefficients | None = None) -> Quote:
    """Plan ``demand`` against one replica's queue and time model, as the single-node admission does."""
    coef = _coefficients(view, fallback)
    deadline = demand.deadline
    backlog = view.backlog_s(deadline)
    left = deadline - backlog
    min_need = planner.least_time_s(
        coef, demand.n_x, demand.n_worst, alpha_max=demand.alpha_max, overhead_s=demand.overhead_s
    )
    earliest = demand.elapsed_s + backlog + min_need

    def refuse(reason: str, earliest_s: float = earliest, alpha: float = demand.alpha_max) -> Quote:
        return Quote(view.replica_id, False, alpha, min_need, min_need, backlog, left, earliest_s, reason)

    if left < min_need:
        return refuse(f"needs {min_need:.3f} s at alpha_max, {max(left, 0.0):.3f} s left after {backlog:.3f} s queued")
    p = planner.plan(
        coef,
        demand.n_x,
        left,
        demand.n_hat,
        k=demand.k,
        n_max=demand.n_max,
        alpha_max=demand.alpha_max,
        bound=demand.bound,
        n_worst=demand.n_worst,
        infeasible_slack=demand.infeasible_slack,
        overhead_s=demand.overhead_s,
    )
    if not p.feasible:
        return refuse("infeasible at alpha_max", demand.elapsed_s + backlog + p.earliest_feasible_budget_s)
    expected = min(p.expected_e2e_s, left)
    if expected > view.slack_after_s(deadline):
        later = demand.elapsed_s + view.total_backlog_s() + min_need
        return refuse("would make an admitted request miss its deadline", later, p.alpha)
    return Quote(view.replica_id, True, p.alpha, expected, min_need, backlog, left, earliest)


def prefill_fits(
    view: ReplicaView,
    deadline: float,
    n_x: int,
    extra_s: float = 0.0,
    fallback: TimeCoefficients | None = None,
) -> bool:
    """Whether a request due in ``deadline`` seconds could still be admitted on ``view`` with its prefill (and
    ``extra_s``, a compressor's cost) alone — the least any plan's expected time can be.

    A necessary condition for :func:`quote` to accept, for any length prediction: its worst case needs at
    least this (``left`` must cover it) and its expected time is at least this (it must not exceed the slack
    of the requests queued behind it). So a request that fails here everywhere is refused before the length
    predictor runs: under overload most refusals are of this kind, and a probe predictor costs a prefill.
    """
    coef = _coefficients(view, fallback)
    need = coef.prefill_s(n_x) + max(extra_s, 0.0)
    return need <= deadline - view.backlog_s(deadline) and need <= view.slack_after_s(deadline)


def choose(quotes: Sequence[Quote]) -> Decision:
    """Best expected quality among the replicas where the request fits, ties to the most slack; else refuse."""
    quotes = tuple(quotes)
    if not quotes:
        return Decision(None, (), math.inf, "no replica is alive")
    fits = [q for q in quotes if q.feasible]
    earliest = min(q.earliest_feasible_budget_s for q in quotes)
    if not fits:
        reasons = "; ".join(f"{q.replica_id}: {q.reason}" for q in quotes)
        return Decision(None, quotes, earliest, f"no replica can meet the deadline ({reasons})")
    best_quality = max(q.quality for q in fits)
    top = [q for q in fits if q.quality >= best_quality - QUALITY_TIE]
    best = max(top, key=lambda q: (q.slack_s, -q.backlog_s))
    return Decision(best.replica_id, quotes, earliest)


def route(demand: Demand, views: Iterable[ReplicaView], fallback: TimeCoefficients | None = None) -> Decision:
    """:func:`quote` on every replica, then :func:`choose`."""
    return choose([quote(demand, v, fallback) for v in views])


# ---------------------------------------------------------------------------------------------- the ledger
@dataclass(eq=False)
class _Entry:
    replica_id: str
    deadline: float  # monotonic clock of the router's process
    expected_s: float
    min_need_s: float
    started_at: float | None = None


@dataclass
class Ledger:
    """What this router has sent to each replica and not yet heard back about (thread-safe).

    The router's own book is exact and immediate for the requests that pass through it; a replica's
    published work (its routing stats, :func:`published_work`) also holds requests from other routers, but
    arrives late. A view adds to the book only the published requests this router does not know: neither
    booked nor released within :attr:`forget_after_s` (a stale report still lists a request that has ended).
    """

    clock: object = time.monotonic
    forget_after_s: float = 10.0
    _entries: dict[str, _Entry] = field(default_factory=dict)
    _released: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def reserve(self, key: str, replica_id: str, deadline_in_s: float, expected_s: float, min_need_s: float) -> None:
        now = self.clock()  # type: ignore[operator]
        with self._lock:
            self._entries[key] = _Entry(replica_id, now + deadline_in_s, expected_s, min_need_s)

    def start(self, key: str) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.started_at is None:
                entry.started_at = self.clock()  # type: ignore[operator]

    def release(self, key: str) -> None:
        now = self.clock()  # type: ignore[operator]
        with self._lock:
            if self._entries.pop(key, None) is not None:
                self._released[key] = now
            for old in [k for k, t in self._released.items() if now - t > self.forget_after_s]:
                del self._released[old]

    def drop_replica(self, replica_id: str) -> None:
        with self._lock:
            for key in [k for k, e in self._entries.items() if e.replica_id == replica_id]:
                del self._entries[key]

    def knows(self, key: str | None) -> bool:
        """Whether ``key`` is booked here or was released lately (so a replica's report of it is old news)."""
        if key is None:
            return False
        now = self.clock()  # type: ignore[operator]
        with self._lock:
            released = self._released.get(key)
            return key in self._entries or (released is not None and now - released <= self.forget_after_s)

    def __len__(self) -> int:
        return len(self._entries)

    def counts(self, replica_id: str) -> tuple[int, int]:
        """(running, queued) requests this router has on ``replica_id``."""
        with self._lock:
            mine = [e for e in self._entries.values() if e.replica_id == replica_id]
        running = sum(1 for e in mine if e.started_at is not None)
        return running, len(mine) - running

    def work(self, replica_id: str) -> tuple[float, tuple[Work, ...]]:
        """``(running_left_s, queued)`` on ``replica_id`` as this router's book has it, relative to now."""
        now = self.clock()  # type: ignore[operator]
        with self._lock:
            mine = [e for e in self._entries.values() if e.replica_id == replica_id]
        running = sum(
            running_left_s(e.started_at, e.expected_s, e.deadline, now) for e in mine if e.started_at is not None
        )
        queued = tuple(Work(e.deadline - now, e.expected_s, e.min_need_s) for e in mine if e.started_at is None)
        return running, queued


def combine(
    replica_id: str,
    coefficients: TimeCoefficients | None,
    booked: tuple[float, tuple[Work, ...]],
    foreign: tuple[float, tuple[Work, ...]] = (0.0, ()),
) -> ReplicaView:
    """A replica's view: this router's book plus the published work it did not send (other front doors)."""
    queued = tuple(sorted(booked[1] + foreign[1], key=lambda w: w.deadline))
    return ReplicaView(replica_id, coefficients, booked[0] + foreign[0], queued)


def published_work(stats: dict, age_s: float, known: Callable[[str | None], bool]) -> tuple[float, tuple[Work, ...]]:
    """The work in a replica's routing stats (see ``EDFQueue.snapshot``) that ``known`` does not claim, aged by
    ``age_s`` seconds (the report's age). Requests no router sent (key None) count: someone sent them."""
    age = max(0.0, age_s)
    running = 0.0
    run = (stats or {}).get("running")
    if run and not known(run[0]):
        running = max(0.0, float(run[1]) - age)
    queued = tuple(
        Work(float(d) - age, float(e), float(m)) for k, d, e, m in (stats or {}).get("queued", ()) if not known(k)
    )
    return running, queued


def coefficients_from(stats: dict) -> TimeCoefficients | None:
    """The time model a replica published, or None (not yet, or unreadable)."""
    raw = (stats or {}).get("coefficients")
    if not isinstance(raw, dict):
        return None
    try:
        return TimeCoefficients(**{k: float(raw[k]) for k in ("a", "b", "c", "p", "q")})
    except (KeyError, TypeError, ValueError):
        return None
