"""Admission control: turn a request into a :class:`RequestSpec`, and admit it to the queue or refuse it (429).

On arrival the length predictor runs (not at all when the prefill alone cannot fit, or would already push an
admitted request past its latest start) and the request is planned against what will be left of its budget
when its turn comes: ``budget - elapsed - backlog``. If even α_max
cannot fit, or it would push an already-admitted request past its latest start, the answer is 429 at once,
with the earliest feasible budget: promises already made come first. (The worker's ``generate`` is in ``service``.)
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from timebill.errors import InfeasibleBudgetError, InvalidInputError
from timebill.facade import LengthPredictionLike, Prompt, RequestPlan, TimeBill, parse_budget
from timebill.predictor.constant import ConstantPrediction
from timebill.serve.protocol import DEFAULT_MAX_TOKENS, BudgetedRequest, RejectedError, RequestSpec
from timebill.serve.queue import EDFQueue, Job


@dataclass
class JobPayload:
    """What the model worker and the waiting handler share about one admitted request."""

    spec: RequestSpec
    prediction: LengthPredictionLike
    admission_plan: RequestPlan
    events: asyncio.Queue


class RequestParser:
    """Maps requests onto the facade's terms (what a front door whose queues are on replicas needs)."""

    def __init__(self, timebill: TimeBill, default_budget_s: float, max_budget_s: float) -> None:
        self.timebill = timebill
        self.default_budget_s = default_budget_s
        self.max_budget_s = max_budget_s

    def spec(self, req: BudgetedRequest, prompt: Prompt, chat: bool) -> RequestSpec:
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
        options = self.timebill.request_options(  # validated here: a bad value is a 400 now, not in the worker
            max_new_tokens=max_tokens,
            k=req.k,
            alpha_max=req.alpha_max,
            bound=req.bound,
            temperature=0.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
            press=req.press,
            prompt_compression=req.prompt_compression,
            compressor=req.compressor,
        )
        if req.question is not None and not req.question.strip():
            raise InvalidInputError("question is empty; leave it out to use the prompt's last line or user turn")
        endpoint = "chat" if chat else "completions"
        return RequestSpec(prompt, chat, budget_s, req.stream, options, endpoint, question=req.question)


class Admission(RequestParser):
    """Maps requests onto the facade's terms and decides, before any generation, whether each can be served."""

    def __init__(self, timebill: TimeBill, queue: EDFQueue, default_budget_s: float, max_budget_s: float) -> None:
        super().__init__(timebill, default_budget_s, max_budget_s)
        self.queue = queue

    def admit(
        self,
        spec: RequestSpec,
        arrival: float,
        prediction: LengthPredictionLike | None = None,
        key: str | None = None,
    ) -> Job:
        """Predict (unless a router already did: ``prediction``), plan against what the queue leaves of the
        budget, and queue, or raise RejectedError."""
        tb = self.timebill
        opts = spec.options
        deadline = arrival + spec.budget_s
        now = time.perf_counter()
        backlog = self.queue.backlog_s(deadline, now)
        if prediction is None:  # nor may the prefill alone exceed the slack of the requests queued behind it
            need = tb.prefill_need(spec.prompt, opts, chat=spec.chat)
            if need.seconds <= deadline - now - backlog and need.seconds > self.queue.slack_after_s(deadline, now):
                longest = ConstantPrediction(float(opts.max_new_tokens))
                enough = tb.least_time(spec.prompt, opts, prediction=longest, chat=spec.chat)
                raise RejectedError(
                    f"Infeasible: fitting even the {need.n_x}-token prompt's prefill ({need.seconds:.3f} s) ahead "
                    f"of the queue within this request's {spec.budget_s:.3f} s budget would make an already-admitted "
                    "request miss its deadline. Give a larger time_budget.",
                    earliest_feasible_budget_s=(now - arrival) + self.queue.total_backlog_s(now) + enough.seconds,
                    stage="admission",
                )
        try:  # the prefill alone must fit what the queue leaves: checked before paying for a prediction
            if prediction is None:
                prediction = tb.predict_length(
                    spec.prompt, chat=spec.chat, time_budget=deadline - now - backlog, options=opts
                )
            else:
                tb.check_prefill_fits(spec.prompt, deadline - now - backlog, opts, chat=spec.chat)
        except InfeasibleBudgetError as exc:
            # No prediction was made, so the hint plans for the longest answer: a budget that surely fits.
            longest = ConstantPrediction(float(opts.max_new_tokens))  # upper(δ) = the point: "runs to max_tokens"
            enough = tb.least_time(spec.prompt, opts, prediction=longest, chat=spec.chat)
            ahead = f" after {backlog:.3f} s of queued work ahead of it" if backlog > 0 else ""
            earliest = (now - arrival) + backlog + enough.seconds
            raise RejectedError(
                f"Infeasible: the budget {spec.budget_s:.3f} s cannot be met{ahead}: what is left does not even "
                f"cover the predicted prefill of the {enough.n_x}-token prompt ({enough.predicted_prefill_s:.3f} s). "
                f"A budget of {earliest:.3f} s fits even a {longest.point:.0f}-token answer at alpha_max; or shorten "
                "the prompt.",
                earliest_feasible_budget_s=earliest,
                stage="admission",
            ) from exc
        least = tb.least_time(spec.prompt, opts, prediction=prediction, chat=spec.chat)
        min_need_s = least.seconds
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
            plan = tb.plan(spec.prompt, left, opts, chat=spec.chat, prediction=prediction, question=spec.question)
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
        job = Job(arrival=arrival, deadline=deadline, expected_s=expected, min_need_s=min_need_s, key=key)
        job.payload = JobPayload(spec=spec, prediction=prediction, admission_plan=plan, events=asyncio.Queue())
        self.queue.push(job)
        return job
