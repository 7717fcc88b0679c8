"""The HTTP API's request schemas (pydantic) and what a validated request becomes: a :class:`RequestSpec`.

No FastAPI and no torch here: the OpenAI request shapes plus TimeBill's extra fields (``time_budget`` or
``time_budget_ms``, ``k``, ``alpha_max``, ``bound``, ``press``, and prompt compression: ``prompt_compression``
(ρ), ``compressor``, ``question``), and the constants the other modules share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from timebill.engine import STOP_CANCELLED, STOP_DEADLINE, STOP_EOS
from timebill.errors import TimeBillError
from timebill.facade import Prompt
from timebill.options import DEFAULT_MAX_NEW_TOKENS, RequestOptions

DEFAULT_BUDGET_S = 10.0  # when a request names none: an ordinary client still gets a deadline-aware answer
MAX_BUDGET_S = 3600.0  # a larger budget is a mistake (ms given as s), not a deadline
DEFAULT_MAX_TOKENS = DEFAULT_MAX_NEW_TOKENS  # OpenAI's name for the same default

# How a stop reason reads to an OpenAI client: the guard's stop is a cut-off answer, like max_tokens.
FINISH_REASONS = {STOP_EOS: "stop", "max_tokens": "length", STOP_DEADLINE: "length", STOP_CANCELLED: "stop"}


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: str
    content: str | list[ContentPart]


class BudgetedRequest(BaseModel):
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
    prompt_compression: float | None = None  # ρ: fraction of the prompt's tokens removed before prefill
    compressor: str | None = None
    question: str | None = None  # the part of the prompt that is the request (default: last user turn / line)


class ChatCompletionRequest(BudgetedRequest):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(BudgetedRequest):
    prompt: str | list[str]


@dataclass(frozen=True)
class RequestSpec:
    """One validated request, in the facade's terms."""

    prompt: Prompt
    chat: bool
    budget_s: float
    stream: bool
    options: RequestOptions
    endpoint: str = "chat"  # chat | completions (metrics labels)
    # Per prompt, not a request option: what prompt compression keeps and scores chunks against.
    question: str | None = None


class RejectedError(TimeBillError):
    """The request cannot meet its budget (given the queue ahead of it): HTTP 429."""

    def __init__(self, message: str, earliest_feasible_budget_s: float, stage: str) -> None:
        super().__init__(message)
        self.earliest_feasible_budget_s = earliest_feasible_budget_s
        self.stage = stage  # admission | queued
