"""TimeBill's request path: predict length ∥ prefill → plan α* → evict → decode under the deadline.

This module only wires the pieces (§4 of the method): the engine runs the model, the predictor gives
N̂ (and a calibrated upper bound), the estimator turns token counts into seconds, the planner (pure
maths) picks α*. Two things go beyond the paper:

- **Feasibility first**: a budget below the predicted prefill alone is refused before any work
  (:class:`~timebill.errors.InfeasibleBudgetError`), with the earliest feasible budget.
- **Closed-loop re-planning**: every ``replan_every`` tokens the measured pace is compared with what
  the remaining worst-case tokens need; if the request is behind (machine slowed down, length
  under-predicted) more of the prompt KV is evicted mid-decode so the remaining steps get cheaper.
  If it is ahead, nothing changes. The deadline guard stays on regardless.

Planning after prefill uses the *measured* elapsed time (prefill, prediction) rather than its
prediction: the budget counts from the request's arrival, and what has been spent is known.

A prompt is a text (the chat template wraps it as one user turn) or a list of chat messages (what an
OpenAI-style client sends). For a server, :meth:`TimeBill.generate` also takes a prediction made
earlier (admission control), streams tokens (``on_token``), reports the plan before decoding
(``on_plan``) and stops when asked (``should_stop``).
"""

from __future__ import annotations

import math
import re
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from timebill import planner
from timebill.engine import STOP_DEADLINE, Engine, GenerationResult, PrefillState, SamplingConfig
from timebill.errors import InfeasibleBudgetError, InvalidInputError
from timebill.presses import make_press

ARRANGEMENTS = ("probe", "parallel", "sequential")
BOUNDS = ("k", "conformal")

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


@dataclass
class RequestPlan:
    """The plan for one request (also what ``--dry-run`` prints)."""

    n_x: int
    n_hat: float
    bound: str
    n_worst: int
    alpha: float
    predicted_prefill_s: float
    predicted_decode_s: float
    predicted_wcet_s: float
    t_predict_s: float
    feasible: bool
    earliest_feasible_budget_s: float
    budget_s: float
    # Predicted end-to-end time at N̂ tokens (the expected case; the WCET is at N̂_W): what a server
    # counts for queued work ahead of a new request.
    expected_e2e_s: float = 0.0

    def summary_line(self) -> str:
        return (
            f"plan: N_x={self.n_x} N̂={self.n_hat:.0f} bound={self.bound} N̂_W={self.n_worst} "
            f"α*={self.alpha:.3f} WCET={self.predicted_wcet_s:.3f}s budget={self.budget_s:.3f}s "
            f"feasible={self.feasible}"
        )


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
    replans: list[dict[str, float]] = field(default_factory=list)
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

    def to_dict(self) -> dict[str, Any]:
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
            "budget_s": self.plan.budget_s,
            "tokens_generated": gen["tokens_generated"],
            "replans": self.replans,
            "arrangement": self.arrangement,
            "plan_compute_s": self.plan_compute_s,
            "overhead_s": self.overhead_s,
            "waited_s": self.waited_s,
            "predicted_e2e_s": self.predicted_e2e_s,
            "plan": asdict(self.plan),
            "generation": gen,
        }

    def summary_line(self) -> str:
        return (
            f"{self.plan.summary_line()} | measured e2e={self.measured_e2e_s:.3f}s tokens="
            f"{self.generation.tokens_generated} stop={self.stop_reason} met={self.deadline_met} "
            f"replans={len(self.replans)}"
        )


class TimeBill:
    """Time-budgeted generation: ``TimeBill.load().generate(prompt, time_budget=2.5)``."""

    def __init__(
        self,
        engine: Engine,
        estimator: Any,  # timebill.estimator.ExecutionTimeEstimator
        predictor: LengthPredictorLike,
        *,
        k: float = planner.DEFAULT_K,
        alpha_max: float = planner.DEFAULT_ALPHA_MAX,
        bound: str = "k",
        delta: float = 0.05,
        replan: bool = True,
        infeasible_slack: float = planner.DEFAULT_INFEASIBLE_SLACK,
        replan_every: int = 4,
        arrangement: str = "probe",
        press: str = "snapkv",
    ) -> None:
        self.engine = engine
        self.estimator = estimator
        self.predictor = predictor
        self.defaults = {
            "k": k,
            "alpha_max": alpha_max,
            "bound": bound,
            "delta": delta,
            "replan": replan,
            "infeasible_slack": infeasible_slack,
        }
        self.replan_every = int(replan_every)
        if arrangement not in ARRANGEMENTS:
            raise InvalidInputError(f"arrangement must be one of {ARRANGEMENTS}, got {arrangement!r}")
        if arrangement == "probe" and not getattr(predictor, "uses_prefill_hidden", False):
            arrangement = "parallel"
        self.arrangement = arrangement
        self.press = press
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
        estimator = ExecutionTimeEstimator.for_engine(engine, path=profile, press=options.get("press", "snapkv"))
        return cls(engine, estimator, load_default_predictor(engine, predictor), **options)

    # ------------------------------------------------------------------ validation
    def _options(self, **given: Any) -> dict[str, Any]:
        opts = {**self.defaults, **{k: v for k, v in given.items() if v is not None}}
        k, alpha_max, delta = opts["k"], opts["alpha_max"], opts["delta"]
        if not (isinstance(k, (int, float)) and math.isfinite(k) and k >= 1):
            raise InvalidInputError(f"k must be a number >= 1, got {k!r}")
        if not (isinstance(alpha_max, (int, float)) and 0 < alpha_max < 1):
            raise InvalidInputError(f"alpha_max must be in (0, 1), got {alpha_max!r}")
        if opts["bound"] not in BOUNDS:
            raise InvalidInputError(f"bound must be one of {BOUNDS}, got {opts['bound']!r}")
        if not (isinstance(delta, (int, float)) and 0 < delta < 1):
            raise InvalidInputError(f"delta must be in (0, 1), got {delta!r}")
        slack = opts["infeasible_slack"]
        if isinstance(slack, bool) or not (isinstance(slack, (int, float)) and math.isfinite(slack) and slack >= 0):
            raise InvalidInputError(f"infeasible_slack must be a number >= 0 (0: the paper's rule), got {slack!r}")
        return opts

    def _n_worst(self, prediction: LengthPredictionLike, opts: dict[str, Any], n_max: int) -> tuple[float, int]:
        n_hat = max(float(prediction.point), 1.0)
        if opts["bound"] == "conformal":
            return n_hat, max(1, min(int(math.ceil(prediction.upper(opts["delta"]))), n_max))
        return n_hat, planner.worst_case_length(n_hat, opts["k"], n_max)

    def _coefficients(self, elapsed_s: float | None) -> planner.TimeCoefficients:
        """Planner coefficients; after prefill, the measured elapsed time replaces the prefill model."""
        coef = self.estimator.coefficients()
        if elapsed_s is None:
            return coef
        return planner.TimeCoefficients(a=0.0, b=0.0, c=elapsed_s, p=coef.p, q=coef.q)

    def _make_plan(
        self,
        n_x: int,
        budget_s: float,
        prediction: LengthPredictionLike,
        opts: dict[str, Any],
        n_max: int,
        t_predict_s: float,
        elapsed_s: float | None,
    ) -> RequestPlan:
        n_hat, n_worst = self._n_worst(prediction, opts, n_max)
        coef = self._coefficients(elapsed_s)
        # Eviction and the decode set-up are on the critical path too: reserve their predicted cost.
        overhead = self.estimator.evict_s(n_x, 0.5) + self.estimator.setup_s(n_x, n_worst)
        coef = planner.TimeCoefficients(a=coef.a, b=coef.b, c=coef.c + overhead, p=coef.p, q=coef.q)
        p = planner.plan(
            coef,
            n_x,
            budget_s,
            n_hat,
            k=opts["k"],
            n_max=n_max,
            t_predict_s=t_predict_s if elapsed_s is None else 0.0,
            alpha_max=opts["alpha_max"],
            bound=opts["bound"],
            n_worst=n_worst,
            infeasible_slack=opts["infeasible_slack"],
        )
        n_expected = max(1, min(math.ceil(n_hat), n_max))
        expected = (p.t_predict_s + planner.e2e_s(coef, n_x, p.alpha, n_expected)) if p.feasible else p.predicted_wcet_s
        return RequestPlan(
            n_x=n_x,
            n_hat=n_hat,
            bound=opts["bound"],
            n_worst=p.n_worst,
            alpha=p.alpha,
            predicted_prefill_s=self.estimator.prefill_s(n_x),
            predicted_decode_s=p.predicted_decode_s,
            predicted_wcet_s=p.predicted_wcet_s,
            t_predict_s=t_predict_s,
            feasible=p.feasible,
            earliest_feasible_budget_s=p.earliest_feasible_budget_s,
            budget_s=budget_s,
            expected_e2e_s=min(expected, budget_s),
        )

    def _check_prefill_fits(self, n_x: int, budget_s: float, spent_s: float = 0.0) -> None:
        """Refuse before any work when the prefill alone cannot fit what is left of the budget.

        ``spent_s`` is the part of the budget already gone when the request reaches the model (time in a
        server's queue): the budget counts from arrival, so only ``budget_s - spent_s`` is left.
        """
        prefill = self.estimator.prefill_s(n_x)
        spent_s = max(0.0, spent_s)
        if prefill >= budget_s - spent_s:
            spent = f" ({spent_s:.3f} s of it already spent waiting)" if spent_s > 1e-3 else ""
            earliest = spent_s + prefill
            raise InfeasibleBudgetError(
                f"Infeasible: the budget {budget_s:.3f} s{spent} is below the predicted prefill of {n_x} prompt "
                f"tokens ({prefill:.3f} s) on this machine; give at least {earliest * 1.1:.3f} s or shorten the "
                "prompt.",
                earliest_feasible_s=earliest,
            )

    def _encode(self, prompt: Prompt, chat: bool) -> tuple[list[int], str]:
        """Token ids of the prompt, and the text the length predictor reads.

        For chat messages the predictor reads the last user turn: the shipped predictors were trained on
        single prompts (first user turns), and the last user turn is what the answer responds to.
        """
        if isinstance(prompt, str):
            return self.engine.encode(prompt, chat=chat), prompt
        ids = self.engine.encode_messages(prompt)
        users = [m["content"] for m in prompt if m.get("role") == "user" and m["content"].strip()]
        text = users[-1] if users else "\n\n".join(m["content"] for m in prompt if m["content"].strip())
        return ids, text

    def predict_length(
        self, prompt: Prompt, *, chat: bool = True, time_budget: float | None = None
    ) -> LengthPredictionLike:
        """Run the length predictor alone, e.g. for a server's admission control while the model is busy.

        Pass the result to :meth:`plan` and :meth:`generate` (``prediction=``) so it is made once. Probe
        predictors run their own prefill here (they cannot share the request's later one). With
        ``time_budget`` (seconds; ≤ 0 allowed), a prompt whose prefill alone cannot fit it is refused
        first (:class:`InfeasibleBudgetError`): an overloaded server then pays no prediction for it.
        """
        ids, text = self._encode(prompt, chat)
        if time_budget is not None:
            with self._estimator_lock:
                self._check_prefill_fits(len(ids), max(float(time_budget), 0.0))
        return self.predictor.predict(text)

    # ------------------------------------------------------------------ public API
    def plan(
        self,
        prompt: Prompt,
        time_budget: float | str,
        *,
        max_new_tokens: int = 256,
        k: float | None = None,
        alpha_max: float | None = None,
        bound: str | None = None,
        delta: float | None = None,
        chat: bool = True,
        prediction: LengthPredictionLike | None = None,
        infeasible_slack: float | None = None,
    ) -> RequestPlan:
        """The plan without generating (the prediction runs unless ``prediction`` is given; the model does not)."""
        budget_s = parse_budget(time_budget)
        opts = self._options(k=k, alpha_max=alpha_max, bound=bound, delta=delta, infeasible_slack=infeasible_slack)
        _check_max_new_tokens(max_new_tokens)
        ids, text = self._encode(prompt, chat)
        with self._estimator_lock:
            self._check_prefill_fits(len(ids), budget_s)
        t_predict = 0.0
        if prediction is None:
            t0 = time.perf_counter()
            prediction = self.predictor.predict(text)
            t_predict = 0.0 if self.arrangement == "probe" else time.perf_counter() - t0
        with self._estimator_lock:
            return self._make_plan(len(ids), budget_s, prediction, opts, max_new_tokens, t_predict, None)

    def generate(
        self,
        prompt: Prompt,
        time_budget: float | str,
        *,
        max_new_tokens: int = 256,
        k: float | None = None,
        alpha_max: float | None = None,
        bound: str | None = None,
        delta: float | None = None,
        replan: bool | None = None,
        chat: bool = True,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        step_hook: Callable[[int], None] | None = None,
        t_start: float | None = None,
        prediction: LengthPredictionLike | None = None,
        press: str | None = None,
        on_plan: Callable[[RequestPlan], None] | None = None,
        on_token: Callable[[int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        infeasible_slack: float | None = None,
    ) -> TimeBillResult:
        """Answer ``prompt`` within ``time_budget`` seconds (from ``t_start``, default: now).

        ``step_hook(i)`` runs before decode step ``i`` (benchmarks use it to inject slowdowns).
        A ``t_start`` in the past (a request that waited in a queue) leaves less of the budget; a request
        whose prefill no longer fits what is left is refused before any work.
        ``prediction``: a length prediction made earlier for this prompt (:meth:`predict_length`); the
        predictor is then not run again and costs nothing on the critical path.
        ``press``: the eviction method for this request (default: this TimeBill's); the time model stays
        the profiled one. ``on_plan(plan)`` runs once after planning, before the first decode step;
        ``on_token(token_id)`` as each token is produced; ``should_stop()`` between tokens (True ends the
        answer with ``stop_reason="cancelled"``). ``infeasible_slack``: when no α fits the budget, run at the
        smallest α whose worst case is within this fraction of α_max's (default 0.02; 0 is the paper's
        rule, α_max).
        """
        t_called = time.perf_counter()
        t_start = t_called if t_start is None else t_start
        budget_s = parse_budget(time_budget)
        opts = self._options(
            k=k, alpha_max=alpha_max, bound=bound, delta=delta, replan=replan, infeasible_slack=infeasible_slack
        )
        _check_max_new_tokens(max_new_tokens)
        sampling = SamplingConfig(temperature, top_p, seed)
        sampling.validate()
        press = self.press if press is None else press
        make_press(press)  # an unknown name is a clear error before any work
        ids, text = self._encode(prompt, chat)
        n_x = len(ids)
        self._check_prefill_fits(n_x, budget_s, time.perf_counter() - t_start)

        if prediction is None:
            state, prediction, t_predict = self._prefill_and_predict(text, ids, t_start, press)
        else:
            state, t_predict = self.engine.prefill(ids, press=press, capture=True, t_start=t_start), 0.0
        t_plan = time.perf_counter()
        req_plan = self._make_plan(n_x, budget_s, prediction, opts, max_new_tokens, t_predict, t_plan - t_start)
        plan_compute_s = time.perf_counter() - t_plan
        if on_plan is not None:
            on_plan(req_plan)
        self.engine.evict(state, req_plan.alpha)
        kv_per_layer = [int(layer.keys.shape[2]) for layer in state.cache.layers]

        replans: list[dict[str, float]] = []
        hook = self._replanner(state, req_plan, budget_s, opts, replans, step_hook) if opts["replan"] else None
        if hook is None and step_hook is not None:

            def hook(i: int, now: float, st: PrefillState) -> None:
                step_hook(i)

        t_decode = time.perf_counter()
        tokens, times, steps, stop = self.engine.decode(
            state, max_new_tokens, budget_s, sampling, on_step=hook, on_token=on_token, should_stop=should_stop
        )
        t_end = time.perf_counter()
        gen = self.engine.make_result(state, tokens, times, steps, stop, kv_per_layer, t_decode, t_end, budget_s)
        predicted_e2e = t_predict + self.estimator.e2e_s(n_x, req_plan.alpha, len(tokens))
        with self._estimator_lock:
            self.estimator.observe(gen)
        e2e = times[-1] if times else t_end - t_start
        return TimeBillResult(
            text=gen.text,
            stop_reason=stop,
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
        self, prompt: str, ids: list[int], t_start: float, press: str | None = None
    ) -> tuple[PrefillState, LengthPredictionLike, float]:
        """Run prefill and the length prediction in the configured arrangement.

        ``t_predict`` is only the part of the prediction *not* hidden behind prefill (§4).
        """
        engine = self.engine
        press = self.press if press is None else press
        if self.arrangement == "probe":
            state = engine.prefill(ids, press=press, capture=True, t_start=t_start, capture_hidden=True)
            t0 = time.perf_counter()
            prediction = self.predictor.predict_hidden(state.extra["last_hidden"])
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
        state: PrefillState,
        req_plan: RequestPlan,
        budget_s: float,
        opts: dict[str, Any],
        replans: list[dict[str, float]],
        step_hook: Callable[[int], None] | None,
    ) -> Callable[[int, float, PrefillState], None]:
        """The between-tokens hook: if the remaining worst case no longer fits, evict more prompt KV."""
        every = max(1, self.replan_every)
        last_now: list[float] = []
        measured: list[tuple[int, float]] = []  # (kv tokens during the step, seconds)
        estimator = self.estimator
        alpha_max = opts["alpha_max"]
        slack = float(opts["infeasible_slack"])

        def hook(i: int, now: float, st: PrefillState) -> None:
            if last_now:
                measured.append((st.kv_len - 1, now - last_now[-1]))
            last_now.append(now)
            if step_hook is not None:
                step_hook(i)
                now = time.perf_counter()  # the hook's time counts against the budget
            if i % every or len(measured) < 2:
                return
            remaining_tokens = req_plan.n_worst - i
            if remaining_tokens <= 0:
                return
            recent = measured[-8:]
            # Pace factor: measured recent steps vs the estimator's prediction for them.
            pace = statistics.median(sec / max(estimator.step_s(kv), 1e-9) for kv, sec in recent)
            remaining_s = st.t_start + budget_s - now
            kv = st.kv_len
            need_s = pace * estimator.decode_phase_s(kv, remaining_tokens + 1)
            if need_s <= remaining_s:
                return  # on time or ahead: nothing changes
            coef = estimator.coefficients()
            p, q = coef.p * pace, coef.q * pace
            r = remaining_tokens
            if p <= 0:
                return
            kv_allowed = (remaining_s - r * q - p * r * (r - 1) / 2) / (p * r)
            generated = kv - st.prompt_kv_len
            prompt_allowed = kv_allowed - generated
            current_alpha = st.alpha
            max_extra = 1.0 - (1.0 - alpha_max) / (1.0 - current_alpha) if current_alpha < alpha_max else 0.0
            if max_extra <= 0 or st.prompt_kv_len <= 1:
                return
            kept_at_max = st.prompt_kv_len * (1.0 - max_extra)
            if slack > 0 and prompt_allowed < kept_at_max:
                # Even α_max cannot make it: as in the plan, evict only as far as buys more than `slack`
                # of the remaining time (on a short prompt that is nothing; the guard ends the answer).
                fixed_s = r * q + p * r * (r - 1) / 2
                t_at_max = fixed_s + p * r * (kept_at_max + generated)
                prompt_allowed = max(prompt_allowed, (t_at_max * (1 + slack) - fixed_s) / (p * r) - generated)
            extra = 1.0 - max(prompt_allowed, 0.0) / st.prompt_kv_len
            extra = min(max(extra, 0.0), max_extra)
            if extra * st.prompt_kv_len < 1.0:
                return
            before = st.prompt_kv_len
            self.engine.evict(st, extra)
            replans.append(
                {
                    "token": float(i),
                    "extra_alpha": extra,
                    "alpha": st.alpha,
                    "prompt_kv_before": float(before),
                    "prompt_kv_after": float(st.prompt_kv_len),
                    "pace": pace,
                    "remaining_s": remaining_s,
                    "needed_s": need_s,
                }
            )

        return hook


def _check_max_new_tokens(max_new_tokens: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InvalidInputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")


__all__ = ["TimeBill", "TimeBillResult", "RequestPlan", "Prompt", "parse_budget", "STOP_DEADLINE"]
