"""Run a request with the configuration the expected-score planner picks (weights × ρ × α), on real engines.

:mod:`timebill.selection` is the maths; this module wires it: one :class:`~timebill.engine.Engine` per
weights mode loaded side by side (they share the tokenizer; a 135M model costs ~0.5 GB in fp32 and a
fraction of that quantised), each with its own profiled :class:`~timebill.estimator.ExecutionTimeEstimator`,
and a :class:`~timebill.quality.QualityModel` measured on the calibration suite. Per request:

1. tokenise once (the weights modes share the tokenizer) and build every candidate's predicted time;
2. :func:`timebill.selection.choose` under the request's overrun policy, with the calibration suite's
   length distribution for the request's kind (the shipped probe predictor reads prefill's hidden state,
   so it cannot inform a choice that must be made *before* prefill: weights and ρ change the prefill);
3. run the chosen engine with the deadline guard on, its clock started at the request's start, so the
   planning time counts against the budget like everything else.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from timebill.compression.base import target_kept_tokens
from timebill.errors import InfeasibleBudgetError, InvalidInputError, ProfileError
from timebill.options import DEFAULT_COMPRESSOR, check_max_new_tokens
from timebill.selection import (
    DEFAULT_ALPHAS,
    DEFAULT_RHOS,
    DEFAULT_WEIGHTS,
    Candidate,
    Choice,
    Knobs,
    LengthDistribution,
    TimeError,
    TimeErrorWindow,
    choose,
    predicted_token_s,
)

log = logging.getLogger(__name__)

#: measured/predicted end-to-end time of every finished TimeBill run of the full benchmark run (1982 runs,
#: docs/results/bench-full/p*/runs/timebill*.jsonl, e2e_s / (predicted_e2e_s + t_predict_s)), summarised by
#: 9 mid-quantiles (``TimeError.from_samples``): p50 1.00, p90 ≈ 1.06. The default until a host measures its own.
DEFAULT_TIME_ERROR = TimeError((0.927, 0.965, 0.982, 0.992, 1.0, 1.009, 1.02, 1.039, 1.085))


@dataclass(frozen=True)
class EstimatorTime:
    """A :class:`~timebill.selection.CandidateTime` from one weights mode's estimator and the knobs ρ, α."""

    estimator: Any  # ExecutionTimeEstimator of the weights mode
    rho: float = 0.0
    alpha: float = 0.0
    compressor: str = DEFAULT_COMPRESSOR

    def _prefilled(self, n_prompt: int) -> int:
        return target_kept_tokens(n_prompt, self.rho) if self.rho > 0 else n_prompt

    def first_token_s(self, n_prompt: int) -> float:
        n = self._prefilled(n_prompt)
        compress = self.estimator.compress_s(self.compressor, n_prompt) if self.rho > 0 else 0.0
        kept = self.estimator.kept_kv_tokens(n, self.alpha)
        return (
            compress
            + self.estimator.prefill_s(n)
            + self.estimator.evict_s(n, self.alpha)
            + (self.estimator.setup_s(kept, 2))
        )

    def step_s(self, n_kv: float) -> float:
        return self.estimator.step_s(n_kv)

    def kept_kv_tokens(self, n_prompt: int) -> int:
        return self.estimator.kept_kv_tokens(self._prefilled(n_prompt), self.alpha)


@dataclass
class Selection:
    """What was chosen for one request, and the inputs it was chosen from (the plan object)."""

    choice: Choice
    n_prompt: int
    budget_s: float
    policy: str
    kind: str | None
    plan_s: float  # tokenising + choosing, measured
    length: LengthDistribution

    @property
    def knobs(self) -> Knobs | None:
        return self.choice.best.knobs if self.choice.best else None

    def summary_line(self) -> str:
        best = self.choice.best
        if best is None:
            return f"plan: nothing emits a token within {self.budget_s:.3f} s (N_x={self.n_prompt})"
        return (
            f"plan ({self.policy}): {best.knobs.label} N_x={self.n_prompt} P(finish)={best.p_finish:.2f} "
            f"E[score]={best.expected_score:.3f} (quality {best.quality:.3f}) budget={self.budget_s:.3f}s "
            f"planned in {self.plan_s * 1e3:.1f} ms"
        )

    def to_record(self) -> dict[str, Any]:
        best = self.choice.best
        return {
            "planner": "expected",
            "policy": self.policy,
            "kind": self.kind,
            "n_x": self.n_prompt,
            "budget_s": self.budget_s,
            "plan_s": self.plan_s,
            "chosen": best.to_dict() if best else None,
            "runners_up": [e.to_dict() for e in self.choice.runners_up(3)],
        }


@dataclass
class SelectedResult:
    """The answer, the selection, and the engine's measured result."""

    text: str
    selection: Selection
    generation: Any  # GenerationResult
    t_start: float

    @property
    def deadline_met(self) -> bool:
        times = self.generation.token_times_s
        return bool(times) and times[-1] <= self.selection.budget_s

    def to_record(self) -> dict[str, Any]:
        """The CLI's ``--json``: the answer, the selection (chosen θ, P(finish), runners-up), the measurements."""
        gen = self.generation.to_dict()
        times = self.generation.token_times_s
        return {
            "text": self.text,
            "stop_reason": self.generation.stop_reason,
            "measured_e2e_s": times[-1] if times else None,
            "deadline_met": self.deadline_met,
            "plan": self.selection.to_record(),
            "generation": gen,
        }

    def summary_line(self) -> str:
        return f"{self.selection.summary_line()} | measured e2e={self.to_record()['measured_e2e_s']} " + (
            f"tokens={len(self.generation.token_ids)} stop={self.generation.stop_reason} met={self.deadline_met}"
        )


class Selector:
    """Engines per weights mode + their estimators + a quality model → the expected-score choice, run."""

    def __init__(
        self,
        engines: Mapping[str, Any],
        estimators: Mapping[str, Any],
        quality: Any,  # timebill.quality.QualityModel
        *,
        rhos: Sequence[float] = DEFAULT_RHOS,
        alphas: Sequence[float] = DEFAULT_ALPHAS,
        compressor: str = DEFAULT_COMPRESSOR,
        time_error: TimeError = DEFAULT_TIME_ERROR,
        press: str = "snapkv",
        combine_knobs: bool = False,
    ) -> None:
        """``combine_knobs=False`` (default): only configurations that turn one knob at a time (vanilla, each
        weights mode, each ρ, each α: what the calibration suite measured directly). True also offers their
        combinations (int4 + ρ 0.5 + α 0.75 …), whose quality is the product of the one-knob factors: an
        assumption the calibration does not check, so it is opt-in."""
        modes = [w for w in engines if w in estimators]
        if not modes:
            raise InvalidInputError("a Selector needs at least one weights mode with both an engine and a profile")
        self.engines = {w: engines[w] for w in modes}
        self.estimators = {w: estimators[w] for w in modes}
        self.quality = quality
        self.rhos = tuple(rhos)
        self.alphas = tuple(alphas)
        self.compressor = compressor
        self.time_error = time_error
        # per weights mode: the spread of this host's real runs around their (recalibrated) predictions,
        # the prior ``time_error`` until 16 runs of that mode are measured
        self.time_errors = {w: TimeErrorWindow(time_error) for w in modes}
        self.press = press
        self.combine_knobs = combine_knobs
        self.tokenizer_engine = self.engines.get("fp32") or next(iter(self.engines.values()))
        # generate() feeds each finished run to its weights mode's estimator (online recalibration, as the
        # facade does); a concurrent plan() must not read the recalibration windows mid-update
        self._estimator_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        model: str | None = None,
        *,
        threads: int | None = None,
        weights: Sequence[str] = DEFAULT_WEIGHTS,
        quality: str | None = None,
        engines: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Selector:
        """Load each weights mode that has a profile on this machine (a mode without one is left out, logged)."""
        from timebill.engine import Engine
        from timebill.estimator import ExecutionTimeEstimator
        from timebill.quality import DEFAULT_QUALITY_FILE, load_quality

        loaded: dict[str, Any] = dict(engines or {})
        estimators: dict[str, Any] = {}
        for w in weights:
            if w not in loaded:
                loaded[w] = Engine.load(model, threads=threads, weights=w)
            try:
                estimators[w] = ExecutionTimeEstimator.for_engine(loaded[w], press=options.get("press", "snapkv"))
            except ProfileError as exc:
                log.warning("weights %s left out of the choice: %s", w, exc)
        fp = next(iter(loaded.values()))
        fingerprint = getattr(getattr(fp, "source", None), "fingerprint", None)
        q = load_quality(quality or DEFAULT_QUALITY_FILE, model_fingerprint=fingerprint)
        return cls(loaded, estimators, q, **options)

    # ------------------------------------------------------------------ planning
    def candidates(self, kind: str | None, n_prompt: int | None = None) -> list[Candidate]:
        out = []
        errors = {w: window.current() for w, window in self.time_errors.items()}
        for w, est in self.estimators.items():
            # a profile without this compressor's timing cannot price ρ > 0: those candidates are left out
            timed = self.compressor in getattr(est, "compressor_fits", {})
            for rho in self.rhos if timed else [r for r in self.rhos if r == 0]:
                for alpha in self.alphas:
                    if not self.combine_knobs and (w != "fp32") + (rho > 0) + (alpha > 0) > 1:
                        continue
                    knobs = Knobs(w, rho, alpha, self.compressor)
                    q = self.quality.score(kind, w, rho, alpha, n_prompt)
                    model = EstimatorTime(est, rho, alpha, self.compressor)
                    out.append(Candidate(knobs, model, q, time_error=errors[w]))
        return out

    def length_distribution(self, kind: str | None, max_new_tokens: int) -> LengthDistribution:
        return self.quality.length_distribution(kind, max_new_tokens)

    def select(
        self,
        n_prompt: int,
        budget_s: float,
        *,
        policy: str = "guard",
        kind: str | None = None,
        max_new_tokens: int = 256,
        spent_s: float = 0.0,
        length: LengthDistribution | None = None,
    ) -> Choice:
        """The ranked candidates for a prompt of ``n_prompt`` tokens (no model work: pure planning)."""
        length = length or self.length_distribution(kind, max_new_tokens)
        with self._estimator_lock:
            return choose(
                self.candidates(kind, n_prompt),
                n_prompt=n_prompt,
                budget_s=budget_s,
                length=length,
                policy=policy,
                time_error=self.time_error,
                partial=lambda f: self.quality.partial(kind, f),
                spent_s=spent_s,
            )

    # ------------------------------------------------------------------ running
    def plan(
        self,
        prompt: str,
        time_budget: float,
        *,
        policy: str = "guard",
        kind: str | None = None,
        max_new_tokens: int = 256,
        chat: bool = True,
        t_start: float | None = None,
    ) -> tuple[Selection, list[int]]:
        """The choice for this request without running it (``--dry-run``), and the prompt's token ids."""
        from timebill.facade import parse_budget

        t_start = time.perf_counter() if t_start is None else t_start
        budget_s = parse_budget(time_budget)
        ids = self.tokenizer_engine.encode(prompt, chat=chat)
        length = self.length_distribution(kind, check_max_new_tokens(max_new_tokens))
        choice = self.select(
            len(ids),
            budget_s,
            policy=policy,
            kind=kind,
            spent_s=time.perf_counter() - t_start,
            length=length,
        )
        plan_s = time.perf_counter() - t_start
        return Selection(choice, len(ids), budget_s, policy, kind, plan_s, length), ids

    def _refusal(self, selection: Selection, time_budget: float) -> InfeasibleBudgetError:
        """Why nothing was chosen, in the user's terms, with the budget that would have been accepted.

        Two different cases: no configuration emits even its first token by T (the prompt is too long for
        the budget), or tokens do arrive but no configuration is expected to deliver an answer that scores —
        under Kill, every one's P(finish) is 0 because the shortest answer length the prior gives this kind
        needs more time than T leaves. Saying "no token" in the second case sent users to shorten a prompt
        that was not the problem (all ten refusals of bench-v3 parts 0-7 were this case).
        """
        ranked = selection.choice.ranked
        fastest = selection.plan_s + min(e.first_token_s for e in ranked)
        if all(e.tokens_by_deadline == 0 for e in ranked):
            return InfeasibleBudgetError(
                f"Infeasible: no configuration emits a token within {time_budget:.3f} s on this machine "
                f"(fastest first token {fastest:.3f} s); give at least {fastest * 1.1:.3f} s or shorten the prompt.",
                earliest_feasible_s=fastest,
            )
        shortest = min(n for n, pn in zip(selection.length.lengths, selection.length.probs, strict=True) if pn > 0)
        most = max(ranked, key=lambda e: e.tokens_by_deadline)
        # the earliest budget at which some configuration's median run emits the shortest likely answer
        earliest = selection.plan_s + min(
            predicted_token_s(c.time, selection.n_prompt, shortest)
            for c in self.candidates(selection.kind, selection.n_prompt)
        )
        what = f"answers of kind {selection.kind!r}" if selection.kind else "answers"
        return InfeasibleBudgetError(
            f"Infeasible under the {selection.policy} policy: tokens arrive within {time_budget:.3f} s, but no "
            f"configuration is expected to deliver an answer that scores — the most any emits by then is "
            f"{most.tokens_by_deadline} ({most.knobs.label}), and the shortest length the length prior gives "
            f"{what} is {shortest} tokens. Give at least {earliest * 1.1:.3f} s, or use the guard policy "
            "(its partial answer counts).",
            earliest_feasible_s=earliest,
        )

    def generate(
        self,
        prompt: str,
        time_budget: float,
        *,
        policy: str = "guard",
        kind: str | None = None,
        max_new_tokens: int = 256,
        chat: bool = True,
        t_start: float | None = None,
    ) -> SelectedResult:
        """Choose θ for this request and run it under the deadline guard; refuse when nothing emits a token."""
        t_start = time.perf_counter() if t_start is None else t_start
        selection, ids = self.plan(
            prompt, time_budget, policy=policy, kind=kind, max_new_tokens=max_new_tokens, chat=chat, t_start=t_start
        )
        best = selection.choice.best
        if best is None:
            raise self._refusal(selection, time_budget)
        k = best.knobs
        gen = self.engines[k.weights].generate(
            prompt if k.rho > 0 else ids,
            alpha=k.alpha,
            max_new_tokens=max_new_tokens,
            deadline_s=float(time_budget),
            press=self.press,
            chat=chat,
            prompt_compression=k.rho,
            compressor=k.compressor,
            t_start=t_start,
        )
        # The profile is one quiet-machine measurement; the runs this host really makes correct it (a
        # weights mode whose real steps run 1.2x its profile on a busy host is planned with that next time).
        times = gen.token_times_s
        with self._estimator_lock:
            if times:  # against what the plan assumed: this estimator before this run's observation
                model = EstimatorTime(self.estimators[k.weights], k.rho, k.alpha, k.compressor)
                predicted = predicted_token_s(model, selection.n_prompt, len(times))
                self.time_errors[k.weights].observe(times[-1] - selection.plan_s, predicted)
            self.estimators[k.weights].observe(gen)
        return SelectedResult(gen.text, selection, gen, t_start)
