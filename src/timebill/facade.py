"""TimeBill's request path: predict length ∥ prefill → plan → evict → decode under the deadline.

This module wires the pieces; it decides nothing itself. The planner (pure maths) chooses α before decoding
and again when re-planning mid-decode; the facade measures (elapsed time, pace), asks, and applies.
"""

from __future__ import annotations

import math
import re
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from timebill import planner
from timebill.engine import STOP_DEADLINE, Engine, GenerationResult, PrefillState, with_compression
from timebill.errors import InfeasibleBudgetError, InvalidInputError
from timebill.options import BOUNDS, RequestOptions

if TYPE_CHECKING:
    from timebill.compression import CompressedPrompt
    from timebill.estimator import TimeModel

ARRANGEMENTS = ("probe", "parallel", "sequential")

#: What :meth:`TimeBill.generate` answers: a text, or chat messages ``[{"role": ..., "content": ...}]``.
Prompt = str | Sequence[Mapping[str, Any]]


class LengthPredictionLike(Protocol):
    """What the facade needs from a prediction: a point estimate and a calibrated upper bound."""

    point: float

    def upper(self, delta: float) -> float: ...


class LengthPredictorLike(Protocol):
    """A response-length predictor. Probes read the target's own last hidden state from prefill."""

    uses_prefill_hidden: bool

    def predict(self, prompt: str) -> LengthPredictionLike: ...


def parse_budget(text: str | float) -> float:
    """``"4.5"``, ``"4.5s"`` or ``"4500ms"`` → seconds; a clear error for anything else or ≤ 0."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s)?\s*", str(text))
        if not match:
            raise InvalidInputError(f"time budget must look like 4.5, 4.5s or 4500ms, got {text!r}")
        value = float(match.group(1)) / (1000.0 if match.group(2) == "ms" else 1.0)
    if not (math.isfinite(value) and value > 0):
        raise InvalidInputError(f"time budget must be a positive number of seconds, got {text!r}")
    return value


@dataclass(frozen=True)
class RequestPlan:
    """The planner's :class:`~timebill.planner.Plan` for one request, with the request it was made for.

    ``predicted_prefill_s`` is the estimator's prefill time for ``n_x`` tokens (after prefill the plan
    itself counts the measured time instead); ``t_predict_s`` the predictor's measured unhidden time.
    """

    n_x: int  # prompt tokens prefilled (after prompt compression, if any)
    budget_s: float
    plan: planner.Plan
    predicted_prefill_s: float
    t_predict_s: float
    original_n_x: int | None = None  # before prompt compression (None: not compressed)
    prompt_compression: float = 0.0  # ρ reached
    compressor: str | None = None
    predicted_compress_s: float = 0.0  # the estimator's compressor time (reserved before prefill)

    @property
    def alpha(self) -> float:
        """α*, the eviction ratio chosen before decoding."""
        return self.plan.alpha

    @property
    def n_hat(self) -> float:
        return self.plan.n_hat

    @property
    def n_worst(self) -> int:
        return self.plan.n_worst

    @property
    def bound(self) -> str:
        return self.plan.bound

    @property
    def feasible(self) -> bool:
        return self.plan.feasible

    @property
    def predicted_decode_s(self) -> float:
        return self.plan.predicted_decode_s

    @property
    def predicted_wcet_s(self) -> float:
        return self.plan.predicted_wcet_s

    @property
    def earliest_feasible_budget_s(self) -> float:
        return self.plan.earliest_feasible_budget_s

    @property
    def expected_e2e_s(self) -> float:
        """Predicted end-to-end time at N̂ tokens, capped by the budget (a server's backlog unit)."""
        return self.plan.expected_e2e_s

    def to_record(self) -> dict[str, Any]:
        """Plain JSON (``--dry-run --json``, the server's plan event, the ``plan`` of a result record)."""
        return {
            "n_x": self.n_x,
            "n_hat": self.n_hat,
            "bound": self.bound,
            "n_worst": self.n_worst,
            "alpha": self.alpha,
            "predicted_prefill_s": self.predicted_prefill_s,
            "predicted_decode_s": self.predicted_decode_s,
            "predicted_wcet_s": self.predicted_wcet_s,
            "t_predict_s": self.t_predict_s,
            "feasible": self.feasible,
            "earliest_feasible_budget_s": self.earliest_feasible_budget_s,
            "budget_s": self.budget_s,
            "expected_e2e_s": self.expected_e2e_s,
            "original_n_x": self.original_n_x,
            "prompt_compression": self.prompt_compression,
            "compressor": self.compressor,
            "predicted_compress_s": self.predicted_compress_s,
        }

    def summary_line(self) -> str:
        compressed = ""
        if self.original_n_x is not None:
            compressed = f"{self.compressor} ρ={self.prompt_compression:.3f} of {self.original_n_x} tokens → "
        return compressed + (
            f"plan: N_x={self.n_x} N̂={self.n_hat:.0f} bound={self.bound} N̂_W={self.n_worst} "
            f"α*={self.alpha:.3f} WCET={self.predicted_wcet_s:.3f}s budget={self.budget_s:.3f}s "
            f"feasible={self.feasible}"
        )


@dataclass(frozen=True)
class LeastTime:
    """The least budget a request needs (its worst case at α_max), and what that rests on."""

    n_x: int
    n_worst: int
    predicted_prefill_s: float
    seconds: float


@dataclass(frozen=True)
class PrefillNeed:
    """What a request needs before its first token, known without a length prediction: the tokens to
    prefill (at the compressor's target), the compressor's predicted cost, and the predicted prefill here.
    A lower bound on any plan's expected time, so a server can refuse a hopeless request without paying for
    the predictor (which, for a probe predictor, is a prefill of its own)."""

    n_x: int
    compress_s: float
    prefill_s: float

    @property
    def seconds(self) -> float:
        return self.prefill_s + self.compress_s


@dataclass(frozen=True)
class PlanInputs:
    """A request in the planner's terms before any budget is known: what a router needs to plan it on
    several replicas (each with its own time model) without the model."""

    n_x: int
    n_hat: float
    n_worst: int
    overhead_s: float
    options: RequestOptions


@dataclass(frozen=True)
class Replan:
    """One mid-decode re-plan: before ``token``, ``extra_alpha`` more of the prompt KV was evicted."""

    token: int
    extra_alpha: float
    alpha: float  # the total ratio after it
    prompt_kv_before: int
    prompt_kv_after: int
    pace: float  # measured recent steps / their prediction
    remaining_s: float
    needed_s: float


@dataclass
class TimeBillResult:
    """One budgeted request: the answer, the plan, and what was measured."""

    text: str
    stop_reason: str
    plan: RequestPlan
    generation: GenerationResult
    t_predict_s: float
    measured_prefill_s: float
    measured_decode_s: float
    measured_e2e_s: float
    deadline_met: bool
    replans: list[Replan] = field(default_factory=list)
    arrangement: str = "probe"
    plan_compute_s: float = 0.0  # computing α* (the planner's closed form and its checks)
    overhead_s: float = 0.0  # everything between request start and the first decode step except prefill
    waited_s: float = 0.0  # from t_start to the call (a server's queue); part of measured_e2e_s
    # The estimator's time for the work that ran (prefill of N_x, eviction at α*, the tokens actually
    # generated): measured_e2e_s - waited_s - predicted_e2e_s is the time model's error, free of the
    # length predictor's.
    predicted_e2e_s: float = 0.0

    @property
    def alpha(self) -> float:
        """The eviction ratio finally applied (α* plus any re-planning)."""
        return self.generation.alpha

    def to_record(self) -> dict[str, Any]:
        """The one flat JSON form of a result: the CLI's ``--json``, the server's ``timebill`` object, the bench."""
        gen = self.generation.to_dict()
        return {
            "text": self.text,
            "stop_reason": self.stop_reason,
            "n_x": self.plan.n_x,
            "n_hat": self.plan.n_hat,
            "bound": self.plan.bound,
            "n_worst": self.plan.n_worst,
            "alpha_star": self.plan.alpha,
            "alpha_final": self.alpha,
            "kept_kv_tokens": gen["kept_kv_tokens"],
            "predicted_prefill_s": self.plan.predicted_prefill_s,
            "predicted_decode_s": self.plan.predicted_decode_s,
            "predicted_wcet_s": self.plan.predicted_wcet_s,
            "measured_prefill_s": self.measured_prefill_s,
            "measured_decode_s": self.measured_decode_s,
            "measured_e2e_s": self.measured_e2e_s,
            "t_predict_s": self.t_predict_s,
            "feasible": self.plan.feasible,
            "deadline_met": self.deadline_met,
            "guard_stopped": self.stop_reason == STOP_DEADLINE,
            "budget_s": self.plan.budget_s,
            "tokens_generated": gen["tokens_generated"],
            "prompt_tokens": gen["prompt_tokens"],
            "original_prompt_tokens": gen["original_prompt_tokens"],
            "prompt_compression": gen["prompt_compression"],
            "compressor": gen["compressor"],
            "compress_s": gen["compress_s"],
            "decode_path": gen["decode_path"],
            "replans": [asdict(r) for r in self.replans],
            "arrangement": self.arrangement,
            "plan_compute_s": self.plan_compute_s,
            "overhead_s": self.overhead_s,
            "waited_s": self.waited_s,
            "predicted_e2e_s": self.predicted_e2e_s,
            "plan": self.plan.to_record(),
            "generation": gen,
        }

    def summary_line(self) -> str:
        return (
            f"{self.plan.summary_line()} | measured e2e={self.measured_e2e_s:.3f}s tokens="
            f"{self.generation.tokens_generated} stop={self.stop_reason} met={self.deadline_met} "
            f"replans={len(self.replans)}"
        )


@dataclass(frozen=True)
class _Prepared:
    """A request's prompt tokens before prefill, and what prompt compression did (or will do) to them."""

    ids: list[int] | None  # None: only predicted (the compressor has not run)
    text: str  # what the length predictor reads
    n_x: int  # tokens to prefill (the compressor's target when only predicted)
    original_n_x: int | None = None  # before compression; None: no compression
    reached: float = 0.0
    compressor: str | None = None
    predicted_compress_s: float = 0.0
    compressed: CompressedPrompt | None = None


class TimeBill:
    """Time-budgeted generation: ``TimeBill.load().generate(prompt, time_budget=2.5)``.

    Two things go beyond the paper. **Feasibility first**: a budget below the predicted prefill alone is
    refused before any work (:class:`~timebill.errors.InfeasibleBudgetError`, with the earliest feasible
    budget). **Closed-loop re-planning**: every ``replan_every`` tokens the measured pace is compared with
    what the remaining worst-case tokens need, and if the request is behind, more prompt KV is evicted.
    """

    def __init__(
        self,
        engine: Engine,
        estimator: TimeModel,
        predictor: LengthPredictorLike,
        *,
        options: RequestOptions | None = None,
        replan_every: int = 4,
        arrangement: str = "probe",
        **option_overrides: Any,
    ) -> None:
        """``options`` (or keyword overrides of its fields, e.g. ``k=3, replan=False``): per-request defaults."""
        self.engine = engine
        self.estimator = estimator
        self.predictor = predictor
        options = (options or RequestOptions()).with_overrides(**option_overrides)
        self.press = options.press or "snapkv"
        self.options = options.with_overrides(press=self.press)
        self.replan_every = int(replan_every)
        if arrangement not in ARRANGEMENTS:
            raise InvalidInputError(f"arrangement must be one of {ARRANGEMENTS}, got {arrangement!r}")
        if arrangement == "probe" and not getattr(predictor, "uses_prefill_hidden", False):
            arrangement = "parallel"
        self.arrangement = arrangement
        # observe() updates the estimator's recalibration windows at the end of generate(); plan() may run
        # meanwhile in another thread (a server's admission control) and must not read them mid-update.
        self._estimator_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        model: str | None = None,
        *,
        threads: int | None = None,
        weights: str = "fp32",
        profile: str | None = None,
        predictor: str | None = None,
        **options: Any,
    ) -> TimeBill:
        """Engine + its profile (``timebill profile`` makes it) + the shipped length predictor."""
        from timebill.estimator import ExecutionTimeEstimator
        from timebill.predictor import load_default_predictor

        engine = Engine.load(model, threads=threads, weights=weights)
        press = getattr(options.get("options"), "press", None) or options.get("press") or "snapkv"
        estimator = ExecutionTimeEstimator.for_engine(engine, path=profile, press=press)
        return cls(engine, estimator, load_default_predictor(engine, predictor), **options)

    # ------------------------------------------------------------------ helpers
    def request_options(self, options: RequestOptions | None = None, **overrides: Any) -> RequestOptions:
        """This request's options: ``options`` (default: this TimeBill's) with ``overrides`` applied."""
        base = self.options if options is None else options.with_overrides(press=options.press or self.press)
        return base.with_overrides(**overrides)

    def _n_worst(self, prediction: LengthPredictionLike, opts: RequestOptions) -> tuple[float, int]:
        """N̂ (at least 1) and the worst-case length the chosen bound gives, capped at N_max."""
        n_hat = max(float(prediction.point), 1.0)
        n_max = opts.max_new_tokens
        if opts.bound == "conformal":
            return n_hat, max(1, min(int(math.ceil(prediction.upper(opts.delta))), n_max))
        return n_hat, planner.worst_case_length(n_hat, opts.k, n_max)

    def _overhead_s(self, n_x: int, n_worst: int) -> float:
        """Eviction and the decode set-up are on the critical path too: their predicted cost is reserved."""
        return self.estimator.evict_s(n_x, 0.5) + self.estimator.setup_s(n_x, n_worst)

    def _make_plan(
        self,
        prep: _Prepared,
        budget_s: float,
        prediction: LengthPredictionLike,
        opts: RequestOptions,
        t_predict_s: float,
        spent_s: float | None,
    ) -> RequestPlan:
        """Ask the planner; ``spent_s`` (after prefill) is the measured part of the budget already gone.

        Before prefill (``spent_s`` None) the compressor's predicted time is reserved with the other
        overheads; after it, the compressor's measured time is inside ``spent_s``.
        """
        n_x = prep.n_x
        n_hat, n_worst = self._n_worst(prediction, opts)
        overhead = self._overhead_s(n_x, n_worst) + (prep.predicted_compress_s if spent_s is None else 0.0)
        p = planner.plan(
            self.estimator.coefficients(),
            n_x,
            budget_s,
            n_hat,
            k=opts.k,
            n_max=opts.max_new_tokens,
            t_predict_s=t_predict_s if spent_s is None else 0.0,
            alpha_max=opts.alpha_max,
            bound=opts.bound,
            n_worst=n_worst,
            infeasible_slack=opts.infeasible_slack,
            spent_s=spent_s,
            overhead_s=overhead,
        )
        return RequestPlan(
            n_x=n_x,
            budget_s=budget_s,
            plan=p,
            predicted_prefill_s=self.estimator.prefill_s(n_x),
            t_predict_s=t_predict_s,
            original_n_x=prep.original_n_x,
            prompt_compression=prep.reached,
            compressor=prep.compressor,
            predicted_compress_s=prep.predicted_compress_s,
        )

    def _check_prefill_fits(self, n_x: int, budget_s: float, spent_s: float = 0.0, extra_s: float = 0.0) -> None:
        """Refuse before any work when the prefill alone cannot fit what is left of the budget.

        ``spent_s`` is the part of the budget already gone when the request reaches the model (time in a
        server's queue): the budget counts from arrival, so only ``budget_s - spent_s`` is left. ``extra_s``
        is work still to come before prefill (a prompt compressor's predicted time).
        """
        prefill = self.estimator.prefill_s(n_x) + extra_s
        spent_s = max(0.0, spent_s)
        if prefill >= budget_s - spent_s:
            spent = f" ({spent_s:.3f} s of it already spent waiting)" if spent_s > 1e-3 else ""
            what = f"prefill of {n_x} prompt tokens" + (" plus the prompt compressor" if extra_s > 0 else "")
            earliest = spent_s + prefill
            raise InfeasibleBudgetError(
                f"Infeasible: the budget {budget_s:.3f} s{spent} is below the predicted {what} ({prefill:.3f} s) "
                f"on this machine; give at least {earliest * 1.1:.3f} s or shorten the prompt.",
                earliest_feasible_s=earliest,
            )

    def _prepare(
        self, prompt: Prompt, opts: RequestOptions, chat: bool, question: str | None, compress: bool
    ) -> _Prepared:
        """The request's prompt tokens, and what prompt compression (ρ > 0) did or will do to them.

        ``compress=False`` only predicts: the kept length is the compressor's token target (an admission
        check pays no compressor); ``compress=True`` runs the compressor (timed by the engine).
        """
        rho = opts.prompt_compression
        if rho == 0.0:
            ids, text = self._encode(prompt, chat)
            return _Prepared(ids, text, len(ids))
        from timebill.compression import target_kept_tokens

        rendered = self.engine.render(prompt, chat=chat)  # validates the prompt before anything reads it
        text = self._predictor_text(prompt)
        if not compress:
            n_orig = len(self.engine.tokenize(rendered, check=False))
            predicted = self.estimator.compress_s(opts.compressor, n_orig)
            n_x = target_kept_tokens(n_orig, rho)
            return _Prepared(None, text, n_x, n_orig, rho, opts.compressor, predicted)
        out = self.engine.compress(prompt, rho, opts.compressor, chat=chat, question=question)
        predicted = self.estimator.compress_s(opts.compressor, out.original_tokens)
        return _Prepared(
            list(out.ids), text, out.kept_tokens, out.original_tokens, out.reached, out.compressor, predicted, out
        )

    def _encode(self, prompt: Prompt, chat: bool) -> tuple[list[int], str]:
        """Token ids of the prompt, and the text the length predictor reads (:meth:`_predictor_text`)."""
        if isinstance(prompt, str):
            return self.engine.encode(prompt, chat=chat), prompt
        return self.engine.encode_messages(prompt), self._predictor_text(prompt)

    @staticmethod
    def _predictor_text(prompt: Prompt) -> str:
        """For chat messages the predictor reads the last user turn: the shipped predictors were trained on
        single prompts (first user turns), and the last user turn is what the answer responds to."""
        if isinstance(prompt, str):
            return prompt
        users = [m["content"] for m in prompt if m.get("role") == "user" and str(m.get("content", "")).strip()]
        return users[-1] if users else "\n\n".join(str(m.get("content", "")) for m in prompt)

    # ------------------------------------------------------------------ public API
    def predict_length(
        self,
        prompt: Prompt,
        *,
        chat: bool = True,
        time_budget: float | None = None,
        options: RequestOptions | None = None,
    ) -> LengthPredictionLike:
        """Run the length predictor alone, e.g. for a server's admission control while the model is busy.

        Pass the result to :meth:`plan`, :meth:`least_time` and :meth:`generate` (``prediction=``) so it is
        made once. Probe predictors run their own prefill here (they cannot share the request's later one).
        With ``time_budget`` (seconds; ≤ 0 allowed), a prompt whose prefill alone cannot fit it is refused
        first (:class:`InfeasibleBudgetError`): an overloaded server then pays no prediction for it.
        ``options`` with prompt compression: the check uses the compressed length and the compressor's cost.
        """
        prep = self._prepare(prompt, self.request_options(options), chat, None, compress=False)
        if time_budget is not None:
            self._check_prepared_fits(prep, time_budget)
        return self.predictor.predict(prep.text)

    def time_coefficients(self) -> planner.TimeCoefficients:
        """The planner's time model now (recalibrated): what a replica publishes to a router."""
        with self._estimator_lock:
            return self.estimator.coefficients()

    def check_prefill_fits(
        self, prompt: Prompt, time_budget: float, options: RequestOptions | None = None, *, chat: bool = True
    ) -> None:
        """:class:`InfeasibleBudgetError` when the prefill alone (and any compressor) cannot fit ``time_budget``
        seconds (≤ 0 allowed): the check :meth:`predict_length` makes, for a prediction made elsewhere."""
        self._check_prepared_fits(self._prepare(prompt, self.request_options(options), chat, None, False), time_budget)

    def _check_prepared_fits(self, prep: _Prepared, time_budget: float) -> None:
        with self._estimator_lock:
            self._check_prefill_fits(prep.n_x, max(float(time_budget), 0.0), extra_s=prep.predicted_compress_s)

    def prefill_need(self, prompt: Prompt, options: RequestOptions | None = None, *, chat: bool = True) -> PrefillNeed:
        """The time this request needs before any decode (see :class:`PrefillNeed`); no model run."""
        prep = self._prepare(prompt, self.request_options(options), chat, None, compress=False)
        with self._estimator_lock:
            return PrefillNeed(prep.n_x, prep.predicted_compress_s, self.estimator.prefill_s(prep.n_x))

    def plan_inputs(
        self,
        prompt: Prompt,
        options: RequestOptions | None = None,
        *,
        prediction: LengthPredictionLike,
        chat: bool = True,
    ) -> PlanInputs:
        """The request in the planner's terms (prompt tokens at the compressor's target, N̂, the worst case,
        the overhead reserved before decode, the compressor's predicted cost included); no model run."""
        opts = self.request_options(options)
        prep = self._prepare(prompt, opts, chat, None, compress=False)
        n_hat, n_worst = self._n_worst(prediction, opts)
        with self._estimator_lock:
            overhead = self._overhead_s(prep.n_x, n_worst) + prep.predicted_compress_s
        return PlanInputs(prep.n_x, n_hat, n_worst, overhead, opts)

    def least_time(
        self,
        prompt: Prompt,
        options: RequestOptions | None = None,
        *,
        prediction: LengthPredictionLike,
        chat: bool = True,
        **overrides: Any,
    ) -> LeastTime:
        """The least budget this request needs (its worst case at α_max), planned from arrival; no model run.

        A server's admission control asks this to refuse a request before queueing it. With prompt
        compression the prompt counts at the compressor's token target and its predicted cost is added (the
        compressor itself does not run here).
        """
        inputs = self.plan_inputs(prompt, self.request_options(options, **overrides), prediction=prediction, chat=chat)
        with self._estimator_lock:
            seconds = planner.least_time_s(
                self.estimator.coefficients(),
                inputs.n_x,
                inputs.n_worst,
                alpha_max=inputs.options.alpha_max,
                overhead_s=inputs.overhead_s,
            )
            return LeastTime(inputs.n_x, inputs.n_worst, self.estimator.prefill_s(inputs.n_x), seconds)

    def plan(
        self,
        prompt: Prompt,
        time_budget: float | str,
        options: RequestOptions | None = None,
        *,
        chat: bool = True,
        prediction: LengthPredictionLike | None = None,
        question: str | None = None,
        **overrides: Any,
    ) -> RequestPlan:
        """The plan without generating (the prediction runs unless ``prediction`` is given; the model does not).

        ``options`` / keyword ``overrides`` (e.g. ``max_new_tokens=64``): see :class:`RequestOptions`. With
        prompt compression the compressor runs (the plan is for the tokens it keeps); ``question``: see
        :meth:`generate`.
        """
        budget_s = parse_budget(time_budget)
        opts = self.request_options(options, **overrides)
        prep = self._prepare(prompt, opts, chat, question, compress=opts.prompt_compression > 0)
        with self._estimator_lock:
            self._check_prefill_fits(prep.n_x, budget_s, extra_s=prep.predicted_compress_s)
        t_predict = 0.0
        if prediction is None:
            t0 = time.perf_counter()
            prediction = self.predictor.predict(prep.text)
            t_predict = 0.0 if self.arrangement == "probe" else time.perf_counter() - t0
        with self._estimator_lock:
            return self._make_plan(prep, budget_s, prediction, opts, t_predict, None)

    def generate(
        self,
        prompt: Prompt,
        time_budget: float | str,
        options: RequestOptions | None = None,
        *,
        chat: bool = True,
        step_hook: Callable[[int], None] | None = None,
        t_start: float | None = None,
        prediction: LengthPredictionLike | None = None,
        on_plan: Callable[[RequestPlan], None] | None = None,
        on_token: Callable[[int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        question: str | None = None,
        **overrides: Any,
    ) -> TimeBillResult:
        """Answer ``prompt`` within ``time_budget`` seconds (from ``t_start``, default: now).

        ``options`` / keyword ``overrides`` (``max_new_tokens``, ``k``, ``alpha_max``, ``bound``, ``delta``,
        ``infeasible_slack``, ``replan``, ``press``, ``temperature``, ``top_p``, ``seed``): see
        :class:`RequestOptions`; the time model stays the profiled one whatever the press.
        ``step_hook(i)`` runs before decode step ``i`` (benchmarks use it to inject slowdowns).
        A ``t_start`` in the past (a request that waited in a queue) leaves less of the budget; a request
        whose prefill no longer fits what is left is refused before any work.
        ``prediction``: a length prediction made earlier for this prompt (:meth:`predict_length`); the
        predictor is then not run again and costs nothing on the critical path.
        ``on_plan(plan)`` runs once after planning, before the first decode step; ``on_token(token_id)`` as
        each token is produced; ``should_stop()`` between tokens (True ends the answer with
        ``stop_reason="cancelled"``).
        ``prompt_compression`` / ``compressor`` (options): remove that fraction of the prompt's tokens before
        prefill; ``question`` is the part of the prompt that is the request (never removed; default the
        chat's last user turn or the prompt's last line). The compressor's time counts against the budget.
        """
        t_called = time.perf_counter()
        t_start = t_called if t_start is None else t_start
        budget_s = parse_budget(time_budget)
        opts = self.request_options(options, **overrides)
        press = opts.press or self.press
        prep = self._prepare(prompt, opts, chat, question, compress=False)
        self._check_prefill_fits(prep.n_x, budget_s, time.perf_counter() - t_start, prep.predicted_compress_s)
        if opts.prompt_compression > 0:
            prep = self._prepare(prompt, opts, chat, question, compress=True)
            self._check_prefill_fits(prep.n_x, budget_s, time.perf_counter() - t_start)
        ids, text, n_x = prep.ids, prep.text, prep.n_x
        assert ids is not None

        if prediction is None:
            state, prediction, t_predict = self._prefill_and_predict(text, ids, t_start, press)
        else:
            state, t_predict = self.engine.prefill(ids, press=press, capture=True, t_start=t_start), 0.0
        t_plan = time.perf_counter()
        req_plan = self._make_plan(prep, budget_s, prediction, opts, t_predict, t_plan - t_start)
        plan_compute_s = time.perf_counter() - t_plan
        if on_plan is not None:
            on_plan(req_plan)
        self.engine.evict(state, req_plan.alpha)

        replans: list[Replan] = []
        hook = self._replanner(req_plan, budget_s, opts, replans, step_hook) if opts.replan else None
        if hook is None and step_hook is not None:

            def hook(i: int, now: float, st: PrefillState) -> None:
                step_hook(i)

        t_decode = time.perf_counter()
        decoded = self.engine.decode(
            state,
            opts.max_new_tokens,
            budget_s,
            opts.sampling,
            on_step=hook,
            on_token=on_token,
            should_stop=should_stop,
        )
        gen = with_compression(self.engine.make_result(state, decoded, budget_s), prep.compressed)
        tokens, times = decoded.token_ids, decoded.token_times_s
        predicted_e2e = t_predict + prep.predicted_compress_s + self.estimator.e2e_s(n_x, req_plan.alpha, len(tokens))
        with self._estimator_lock:
            self.estimator.observe(gen)
        e2e = times[-1] if times else decoded.ended_at - t_start
        return TimeBillResult(
            text=gen.text,
            stop_reason=decoded.stop_reason,
            plan=req_plan,
            generation=gen,
            t_predict_s=t_predict,
            measured_prefill_s=state.prefill_s,
            measured_decode_s=gen.decode_s,
            measured_e2e_s=e2e,
            deadline_met=bool(times) and e2e <= budget_s,
            replans=replans,
            arrangement=self.arrangement,
            plan_compute_s=plan_compute_s,
            overhead_s=t_decode - t_start - state.prefill_s,
            waited_s=max(0.0, t_called - t_start),
            predicted_e2e_s=predicted_e2e,
        )

    # ------------------------------------------------------------------ internals
    def _prefill_and_predict(
        self, prompt: str, ids: list[int], t_start: float, press: str
    ) -> tuple[PrefillState, LengthPredictionLike, float]:
        """Run prefill and the length prediction in the configured arrangement.

        ``t_predict`` is only the part of the prediction *not* hidden behind prefill (§4).
        """
        engine = self.engine
        if self.arrangement == "probe":
            state = engine.prefill(ids, press=press, capture=True, t_start=t_start, capture_hidden=True)
            t0 = time.perf_counter()
            prediction = self.predictor.predict_hidden(state.last_hidden)
            return state, prediction, time.perf_counter() - t0
        if self.arrangement == "sequential":
            t0 = time.perf_counter()
            prediction = self.predictor.predict(prompt)
            t_predict = time.perf_counter() - t0
            state = engine.prefill(ids, press=press, capture=True, t_start=t_start)
            return state, prediction, t_predict
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["prediction"] = self.predictor.predict(prompt)
            except BaseException as exc:  # re-raised in the caller's thread
                box["error"] = exc
            box["done"] = time.perf_counter()

        worker = threading.Thread(target=run, name="timebill-predictor")
        worker.start()
        state = engine.prefill(ids, press=press, capture=True, t_start=t_start)
        prefill_done = time.perf_counter()
        worker.join()
        if "error" in box:
            raise box["error"]
        return state, box["prediction"], max(0.0, box["done"] - prefill_done)

    def _replanner(
        self,
        req_plan: RequestPlan,
        budget_s: float,
        opts: RequestOptions,
        replans: list[Replan],
        step_hook: Callable[[int], None] | None,
    ) -> Callable[[int, float, PrefillState], None]:
        """The between-tokens hook: measure the pace, ask the planner, apply its eviction (if any)."""
        every = max(1, self.replan_every)
        last_now: list[float] = []  # the previous step's end (empty before the first)
        measured: deque[tuple[int, float]] = deque(maxlen=8)  # recent (kv tokens during the step, seconds)
        estimator = self.estimator
        coef = estimator.coefficients()  # fixed for the request: recalibration only moves after it ends

        def hook(i: int, now: float, st: PrefillState) -> None:
            if last_now:
                measured.append((st.kv_len - 1, now - last_now[0]))
            last_now[:] = [now]
            if step_hook is not None:
                step_hook(i)
                now = time.perf_counter()  # the hook's time counts against the budget
            remaining_tokens = req_plan.n_worst - i
            if i % every or len(measured) < 2 or remaining_tokens <= 0:
                return
            # Pace factor: measured recent steps vs the estimator's prediction for them.
            pace = statistics.median(sec / max(estimator.step_s(kv), 1e-9) for kv, sec in measured)
            remaining_s = st.t_start + budget_s - now
            needed_s = pace * estimator.decode_phase_s(st.kv_len, remaining_tokens + 1)
            extra = planner.replan_alpha(
                coef,
                pace=pace,
                remaining_s=remaining_s,
                needed_s=needed_s,
                remaining_tokens=remaining_tokens,
                kv_len=st.kv_len,
                prompt_kv_len=st.prompt_kv_len,
                alpha=st.alpha,
                alpha_max=opts.alpha_max,
                infeasible_slack=opts.infeasible_slack,
            )
            if extra is None:
                return
            before = st.prompt_kv_len
            self.engine.evict(st, extra)
            replans.append(Replan(i, extra, st.alpha, before, st.prompt_kv_len, pace, remaining_s, needed_s))

        return hook


__all__ = [
    "BOUNDS",
    "STOP_DEADLINE",
    "LeastTime",
    "PrefillNeed",
    "Prompt",
    "Replan",
    "RequestOptions",
    "RequestPlan",
    "TimeBill",
    "TimeBillResult",
    "parse_budget",
]
