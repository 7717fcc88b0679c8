"""The deadline-aware routing decision as a pure function: hand-built replica states → replica or refusal.

No model, no Ray: time models are planner coefficients with a decode step that grows with the cache (so α
has leverage), and replica states are lists of committed work.
"""

from __future__ import annotations

import math

import pytest

from timebill.planner import TimeCoefficients
from timebill.serve.queue import EDFQueue, Job
from timebill.serve.routing import (
    Demand,
    Ledger,
    Quote,
    ReplicaView,
    Work,
    choose,
    coefficients_from,
    combine,
    prefill_fits,
    published_work,
    quote,
    route,
)

# prefill of 500 tokens ≈ 0.135 s; a step at 500 cached tokens ≈ 20 ms, at 50 ≈ 11 ms
COEF = TimeCoefficients(a=1e-7, b=2e-4, c=0.01, p=2e-5, q=0.01)


def demand(budget_s: float, elapsed_s: float = 0.0, n_x: int = 500, n_hat: float = 50, n_worst: int = 250) -> Demand:
    return Demand(budget_s=budget_s, elapsed_s=elapsed_s, n_x=n_x, n_hat=n_hat, n_worst=n_worst, n_max=256)


def idle(name: str) -> ReplicaView:
    return ReplicaView(name, COEF)


def test_an_idle_replica_beats_a_busy_one_when_the_busy_one_would_have_to_evict() -> None:
    d = demand(6.0)
    busy = ReplicaView("busy", COEF, running_left_s=2.0)
    q_busy, q_idle = quote(d, busy), quote(d, idle("idle"))
    assert q_idle.feasible and q_idle.alpha == 0.0
    assert q_busy.feasible and q_busy.alpha > 0.0  # it fits there only by evicting
    decision = route(d, [busy, idle("idle")])
    assert decision.replica_id == "idle"
    assert decision.chosen == q_idle


def test_quality_comes_before_slack() -> None:
    """A replica that answers at α = 0 wins over one with more slack that would have to evict."""
    evicting = Quote("roomy", True, 0.5, 1.0, 1.0, 0.0, 9.0, 1.0)  # 8 s to spare, but half the prompt gone
    exact = Quote("tight", True, 0.0, 2.0, 2.0, 3.0, 2.5, 2.0)  # 0.5 s to spare
    assert evicting.slack_s > exact.slack_s and exact.quality > evicting.quality
    assert choose([evicting, exact]).replica_id == "tight"
    assert choose([exact, evicting]).replica_id == "tight"
    infeasible = Quote("best", False, 0.0, 1.0, 1.0, 0.0, 0.5, 3.0, "no")
    assert choose([infeasible, evicting]).replica_id == "roomy"  # only replicas where it fits compete


def test_equal_quality_goes_to_the_most_slack() -> None:
    d = demand(20.0)
    a = ReplicaView("a", COEF, running_left_s=1.0)
    b = ReplicaView("b", COEF, running_left_s=0.2)
    qa, qb = quote(d, a), quote(d, b)
    assert qa.alpha == qb.alpha == 0.0 and qb.slack_s > qa.slack_s
    assert route(d, [a, b]).replica_id == "b"
    assert route(d, [b, a]).replica_id == "b"  # not the order they are listed in


def test_no_replica_can_serve_it_refuses_with_the_least_earliest_budget() -> None:
    d = demand(3.0)
    a = ReplicaView("a", COEF, running_left_s=2.5)
    b = ReplicaView("b", COEF, running_left_s=4.0)
    decision = route(d, [a, b])
    assert decision.replica_id is None and decision.chosen is None
    qa, qb = decision.quotes
    assert not qa.feasible and not qb.feasible and qa.reason and qb.reason
    assert decision.earliest_feasible_budget_s == pytest.approx(
        min(qa.earliest_feasible_budget_s, qb.earliest_feasible_budget_s)
    )
    # the earliest budget is honest: the same request with that budget fits on replica a
    assert quote(demand(decision.earliest_feasible_budget_s + 1e-6), a).feasible


def test_elapsed_time_counts_against_the_budget() -> None:
    assert quote(demand(6.0), idle("a")).feasible
    late = quote(demand(6.0, elapsed_s=5.5), idle("a"))
    assert not late.feasible and late.earliest_feasible_budget_s > 6.0


def test_a_request_that_would_make_a_queued_one_late_is_not_sent_there() -> None:
    """A queued request due just after the newcomer, with no slack left: the newcomer would push it late."""
    d = demand(6.0, n_hat=40, n_worst=120)
    tight = Work(deadline=6.5, expected_s=3.0, min_need_s=6.0)  # latest start 0.5 s from now
    crowded = ReplicaView("crowded", COEF, queued=(tight,))
    q = quote(d, crowded)
    assert not q.feasible and "miss its deadline" in q.reason
    assert route(d, [crowded, idle("free")]).replica_id == "free"


def test_the_prefill_check_refuses_only_what_no_length_prediction_could_fit() -> None:
    """``prefill_fits`` runs before the length predictor: where it says no, ``quote`` must refuse whatever
    the prediction turns out to be, and it must say no where only the queue's slack rules the request out."""
    import random

    rng = random.Random(7)
    checked = refused_early = 0
    for _ in range(400):
        queued = tuple(
            sorted(
                (
                    Work(
                        deadline=rng.uniform(0.5, 20.0),
                        expected_s=rng.uniform(0.2, 4.0),
                        min_need_s=rng.uniform(0.3, 6.0),
                    )
                    for _ in range(rng.randrange(4))
                ),
                key=lambda w: w.deadline,
            )
        )
        view = ReplicaView("r", COEF, running_left_s=rng.uniform(0.0, 3.0), queued=queued)
        budget, n_x, extra = rng.uniform(0.1, 12.0), rng.randrange(1, 4000), rng.choice([0.0, 0.05])
        if prefill_fits(view, budget, n_x, extra):
            continue
        refused_early += 1
        for n_hat in (1, 5, 50, 250):
            d = Demand(
                budget_s=budget,
                elapsed_s=0.0,
                n_x=n_x,
                n_hat=n_hat,
                n_worst=min(256, 5 * n_hat),
                n_max=256,
                overhead_s=extra,
            )
            assert not quote(d, view).feasible
            checked += 1
    assert refused_early > 20 and checked == 4 * refused_early
    # The slack alone rules it out: plenty of time left before the deadline, but a queued request due later
    # has only 0.05 s to give; a 500-token prefill (~0.135 s) would take more.
    tight = Work(deadline=8.0, expected_s=1.0, min_need_s=7.95)
    view = ReplicaView("crowded", COEF, queued=(tight,))
    assert not prefill_fits(view, 6.0, 500) and prefill_fits(view, 6.0, 50)
    assert prefill_fits(idle("free"), 6.0, 500)
    with pytest.raises(ValueError):
        prefill_fits(ReplicaView("new", None), 6.0, 500)
    assert prefill_fits(ReplicaView("new", None), 6.0, 500, fallback=COEF)


def test_no_replicas_is_a_refusal_and_a_view_without_a_time_model_uses_the_fallback() -> None:
    assert choose([]).replica_id is None and math.isinf(choose([]).earliest_feasible_budget_s)
    unknown = ReplicaView("new", None)
    with pytest.raises(ValueError):
        quote(demand(6.0), unknown)
    assert quote(demand(6.0), unknown, fallback=COEF) == quote(demand(6.0), idle("new"))


def test_the_view_of_a_queue_snapshot_matches_the_queue_itself() -> None:
    """The router's arithmetic on a published snapshot is the single-node admission's on the queue."""
    queue = EDFQueue(lambda job: None)  # never started: the jobs stay queued
    now = 100.0
    for deadline, expected, need in ((104.0, 1.5, 1.0), (102.0, 0.5, 0.4), (110.0, 3.0, 2.0)):
        queue.push(Job(arrival=now, deadline=deadline, expected_s=expected, min_need_s=need))
    snap = queue.snapshot(now)
    assert snap["running"] is None and [w[0] for w in snap["queued"]] == [None, None, None]
    running, queued = published_work(snap, 0.0, lambda key: False)
    view = ReplicaView("r", COEF, running, queued)
    for deadline in (101.0, 103.0, 105.0, 200.0):
        assert view.backlog_s(deadline - now) == pytest.approx(queue.backlog_s(deadline, now))
        assert view.slack_after_s(deadline - now) == pytest.approx(queue.slack_after_s(deadline, now))


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_the_ledger_books_running_and_queued_work_per_replica() -> None:
    clock = FakeClock()
    ledger = Ledger(clock=clock)
    ledger.reserve("x", "a", deadline_in_s=5.0, expected_s=2.0, min_need_s=1.0)
    ledger.reserve("y", "a", deadline_in_s=8.0, expected_s=1.0, min_need_s=0.5)
    ledger.reserve("z", "b", deadline_in_s=3.0, expected_s=1.0, min_need_s=0.5)
    assert ledger.counts("a") == (0, 2)
    ledger.start("x")
    clock.t += 0.5
    running, queued = ledger.work("a")
    assert running == pytest.approx(1.5)  # started 0.5 s ago, expected 2 s
    assert queued == (Work(7.5, 1.0, 0.5),)
    clock.t += 10.0  # past x's deadline: the guard has stopped it, whatever was expected
    assert ledger.work("a")[0] == 0.0
    ledger.release("x")
    ledger.drop_replica("b")
    assert ledger.counts("a") == (0, 1) and ledger.counts("b") == (0, 0) and len(ledger) == 1


def test_a_view_adds_only_the_published_work_this_router_does_not_know() -> None:
    clock = FakeClock()
    ledger = Ledger(clock=clock, forget_after_s=5.0)
    ledger.reserve("mine", "a", deadline_in_s=9.0, expected_s=2.0, min_need_s=1.0)
    ledger.reserve("done", "a", deadline_in_s=9.0, expected_s=2.0, min_need_s=1.0)
    ledger.start("done")
    ledger.release("done")  # finished; a stale report still shows it running
    stats = {
        "running": ["done", 1.5],
        "queued": [["mine", 8.0, 2.0, 1.0], ["other", 5.0, 1.0, 0.5], [None, 6.0, 1.0, 0.5]],
        "coefficients": {"a": 1e-7, "b": 2e-4, "c": 0.01, "p": 2e-5, "q": 0.01},
    }
    foreign = published_work(stats, age_s=0.5, known=ledger.knows)
    assert foreign == (0.0, (Work(4.5, 1.0, 0.5), Work(5.5, 1.0, 0.5)))  # not "mine", not the finished one
    view = combine("a", coefficients_from(stats), ledger.work("a"), foreign)
    assert view.coefficients == COEF and view.running_left_s == 0.0
    assert [w.deadline for w in view.queued] == [4.5, 5.5, 9.0]  # EDF order over both accounts
    clock.t += 6.0  # long after its release, a report of "done" is someone else's
    assert published_work(stats, 0.0, ledger.knows)[0] == 1.5
    # a report of another router's running request counts; an unreadable or empty report adds nothing
    assert published_work({"running": ["x", 2.0], "queued": []}, 0.5, ledger.knows) == (1.5, ())
    assert published_work({}, 0.0, ledger.knows) == (0.0, ())
    assert coefficients_from({"coefficients": {"a": "x"}}) is None and coefficients_from({}) is None
