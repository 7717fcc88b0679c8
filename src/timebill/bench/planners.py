"""The expected-score planner as a simulator planner: the same :func:`timebill.selection.choose` the engine
uses, fed from recorded traces instead of profiles.

``timebill bench-simulate DIR --planner expected-kill`` replays it: for each task and budget it sees only what
the real request path sees before running (kind, uncompressed prompt length, N_max, each configuration's time
model fitted from the *other* tasks' traces and its measured/predicted spread), picks one of the recorded
budget-independent configurations, and the simulator reads that configuration's trace at T. The quality model
and length prior are the calibration suite's (:mod:`timebill.quality`), never the evaluated tasks'.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from timebill.bench.methods import FixedAlpha, method_registry
from timebill.selection import Candidate, Knobs, TimeError, choose


@dataclass(frozen=True)
class TraceTime:
    """A :class:`~timebill.selection.CandidateTime` from the simulator's fitted :class:`ConfigTimeModel`."""

    model: Any  # timebill.bench.simulate.ConfigTimeModel

    def first_token_s(self, n_prompt: int) -> float:
        return self.model.first_token_s(n_prompt)

    def step_s(self, n_kv: float) -> float:
        return self.model.step_s(n_kv)

    def kept_kv_tokens(self, n_prompt: int) -> int:
        return max(1, round(self.model.kept_kv(n_prompt)))


def config_knobs(config: str) -> Knobs | None:
    """The knobs of a recorded budget-independent method (``int4`` → weights int4, ``compress-0.5`` → ρ 0.5)."""
    method = method_registry().get(config)
    if not isinstance(method, FixedAlpha):
        return None
    return Knobs(method.weights, float(method.prompt_compression), float(method.alpha), method.compressor)


def expected_planner(quality: Any, policy: str | None = None) -> Callable[[Any, float, str, Sequence[str]], str | None]:
    """A simulator planner maximising expected score; ``policy`` fixes the objective (None: the one scored)."""

    def plan(view: Any, budget_s: float, scored_policy: str, configs: Sequence[str]) -> str | None:
        objective = policy or scored_policy
        candidates = []
        names = {}
        for config in configs:
            knobs = config_knobs(config)
            model = view.time_models.get(config)
            if knobs is None or model is None:
                continue
            names[knobs] = config
            q = quality.score(view.kind, knobs.weights, knobs.rho, knobs.alpha, view.prompt_tokens)
            error = TimeError.from_samples(model.ratios) if model.ratios else None
            candidates.append(Candidate(knobs, TraceTime(model), q, error))
        if not candidates:
            return None
        length = quality.length_distribution(view.kind, view.max_new_tokens)
        choice = choose(
            candidates,
            n_prompt=view.prompt_tokens,
            budget_s=budget_s,
            length=length,
            policy=objective,
            partial=lambda f: quality.partial(view.kind, f),
        )
        return names[choice.best.knobs] if choice.best is not None else None

    return plan


def register_expected_planners(quality: Any) -> None:
    """Register ``expected`` (the scored policy's objective), ``expected-kill`` and ``expected-guard``."""
    from timebill.bench.simulate import register_planner

    register_planner("expected", expected_planner(quality))
    register_planner("expected-kill", expected_planner(quality, "kill"))
    register_planner("expected-guard", expected_planner(quality, "guard"))
