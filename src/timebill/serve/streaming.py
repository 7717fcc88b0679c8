"""Responses: the OpenAI JSON answer, and the SSE stream (the plan first, text deltas, a final chunk).

Both carry a ``timebill`` object: the plan and what was measured (:meth:`TimeBillResult.to_record` less the
text and the per-token lists).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from timebill.errors import TimeBillError
from timebill.facade import TimeBillResult
from timebill.serve.protocol import FINISH_REASONS, RejectedError
from timebill.serve.queue import Job
from timebill.serve.service import Service

#: What prompt compression did (the generation's fields), lifted into the ``timebill`` object, which leaves
#: the generation record out: a client that asked for ρ can see what it got without the per-token lists.
COMPRESSION_FIELDS = ("original_prompt_tokens", "prompt_compression", "compressor", "compress_s")


def timebill_info(result: TimeBillResult) -> dict[str, Any]:
    """The ``timebill`` object of a response: the plan and what was measured (no text, no per-token lists)."""
    record = result.to_record()
    info = {k: v for k, v in record.items() if k not in ("text", "generation")}
    generation = record.get("generation") or {}
    if generation.get("original_prompt_tokens") is not None:  # compressed: say how much, and at what cost
        for name in COMPRESSION_FIELDS:
            info.setdefault(name, generation.get(name))
    return info


def usage(result: TimeBillResult, stop_ids: set[int]) -> dict[str, int]:
    """OpenAI's token counts (the end-of-turn token is not part of the answer)."""
    completion = sum(1 for t in result.generation.token_ids if t not in stop_ids)
    prompt = result.generation.prompt_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _TextStream:
    """Token ids → text deltas, decoding the whole answer each time so multi-byte characters come out whole."""

    def __init__(self, tokenizer: Any, stop_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token: int) -> str:
        if token in self.stop_ids:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""  # an incomplete character (or a re-merge): wait for the next token
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def finish(self, final_text: str) -> str:
        """What the final answer has beyond what was sent (so the deltas add up to the final text)."""
        delta = final_text[len(self.sent) :] if final_text.startswith(self.sent) else ""
        self.sent = final_text
        return delta


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def full_response(service: Service, result: TimeBillResult, rid: str, endpoint: str) -> dict[str, Any]:
    finish = FINISH_REASONS.get(result.stop_reason, "stop")
    if endpoint == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": service.model_name,
        "choices": [choice],
        "usage": usage(result, service.timebill.engine.stop_ids),
        "timebill": timebill_info(result),
    }


async def stream_events(service: Service, request: Request, job: Job, rid: str, endpoint: str) -> AsyncIterator[str]:
    """SSE: the plan first (with the role), text deltas, then a final chunk with finish_reason and timings."""
    engine = service.timebill.engine
    text = _TextStream(engine.tokenizer, engine.stop_ids)
    created = int(time.time())
    obj = "chat.completion.chunk" if endpoint == "chat" else "text_completion"

    def chunk(delta: str | None, finish: str | None = None, role: bool = False, **extra: Any) -> dict[str, Any]:
        if endpoint == "chat":
            d: dict[str, Any] = {"role": "assistant"} if role else {}
            if delta is not None:
                d["content"] = delta
            choice: dict[str, Any] = {"index": 0, "delta": d, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": obj, "created": created, "model": service.model_name, "choices": [choice], **extra}

    try:
        while True:
            kind, value = await service.next_event(request, job, until_started=False)
            if kind == "plan":
                yield _sse(chunk("", role=True, timebill={"plan": value.to_record(), "queued_s": _queued_s(job)}))
            elif kind == "token":
                delta = text.push(value)
                if delta:
                    yield _sse(chunk(delta))
            elif kind == "done":
                result: TimeBillResult = value
                rest = text.finish(result.text)
                if rest:
                    yield _sse(chunk(rest))
                finish = FINISH_REASONS.get(result.stop_reason, "stop")
                counts = usage(result, engine.stop_ids)
                yield _sse(chunk(None, finish, usage=counts, timebill=timebill_info(result)))
                yield "data: [DONE]\n\n"
                return
            elif kind == "cancelled":
                return
            else:  # rejected at the worker, or failed: the status line is sent, so say it in the stream
                err = value
                status = 429 if kind == "rejected" else (400 if isinstance(err, TimeBillError) else 500)
                body = {"error": {"message": str(err), "type": "infeasible_budget" if status == 429 else "error"}}
                if isinstance(err, RejectedError):
                    body["error"]["earliest_feasible_budget_s"] = round(err.earliest_feasible_budget_s, 4)
                body["error"]["status"] = status
                yield _sse(body)
                return
    finally:
        job.cancel.set()  # the client left mid-stream (or the stream ended): free the model at the next token


def _queued_s(job: Job) -> float:
    return (job.started_at - job.arrival) if job.started_at is not None else 0.0
