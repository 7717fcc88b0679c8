"""The deadline guard's learned factor: pure window maths, and the engine really stopping by it."""

from __future__ import annotations

import pytest

from timebill.engine import STOP_DEADLINE, Engine
from timebill.errors import InvalidInputError
from timebill.guard import GUARD_FLOOR, GuardMargin


def test_the_factor_is_the_floor_until_measured_then_a_high_quantile() -> None:
    guard = GuardMargin(min_samples=100, window=1000, refresh=10)
    for _ in range(99):
        guard.observe(0.15, 0.1)  # every step 1.5x its predecessors
    assert guard.factor() == GUARD_FLOOR  # too few samples to trust
    guard.observe(0.0, 0.1)  # glitches and a fresh engine's first step teach nothing
    guard.observe(0.1, 0.0)
    guard.observe(0.15, 0.1)
    assert len(guard) == 100 and guard.factor() == pytest.approx(1.5)


def test_a_quiet_host_keeps_the_floor_and_rare_spikes_set_the_factor() -> None:
    guard = GuardMargin(window=4000, min_samples=256, refresh=1)
    for i in range(4000):
        guard.observe(0.0505 if i % 2 else 0.0495, 0.05)  # ±1 % jitter: the floor is the factor
    assert guard.factor() == GUARD_FLOOR
    for i in range(4000):  # one step in 500 takes 2x: the 99.9th percentile sees them
        guard.observe(0.1 if i % 500 == 0 else 0.05, 0.05)
    assert guard.factor() == pytest.approx(2.0)
    for _ in range(4000):  # a swap storm: bounded by the cap
        guard.observe(1.0, 0.05)
    assert guard.factor() == guard.cap == 4.0


def test_bad_settings_are_clear_errors() -> None:
    for kwargs in ({"floor": 0.9}, {"floor": 5.0}, {"quantile": 0.0}, {"min_samples": 0}, {"refresh": 0}):
        with pytest.raises(InvalidInputError):
            GuardMargin(**kwargs)


def test_the_engine_learns_from_its_steps_and_stops_by_the_learned_factor(engine: Engine) -> None:
    saved = engine.guard
    try:
        engine.guard = GuardMargin()
        free = engine.generate("Write a long story about a dragon.", max_new_tokens=40, deadline_s=30.0)
        assert free.tokens_generated == 40 and len(engine.guard) >= 38  # every step but the first observed
        # a host whose steps were measured jumping 10^7x: no step (a fast host's ~1 ms included: 10^4 s)
        # can be trusted to end before a 30 s deadline, so the guard stops after the first token instead
        # of decoding the 40 it just did. (1000x was not enough: on a fast CI host 1000 x 3 ms fits in 30 s.)
        jumpy = GuardMargin(cap=1e8, min_samples=1, refresh=1)
        jumpy.observe(1e7, 1.0)
        engine.guard = jumpy
        stopped = engine.generate("Write a long story about a dragon.", max_new_tokens=40, deadline_s=30.0)
        assert stopped.stop_reason == STOP_DEADLINE and stopped.tokens_generated == 1
    finally:
        engine.guard = saved
