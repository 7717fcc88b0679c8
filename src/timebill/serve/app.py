"""The FastAPI app: OpenAI-compatible routes (``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``,
``/health``, ``/metrics``) that translate HTTP to the service and back; no time logic of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError

from timebill.errors import InvalidInputError, TimeBillError
from timebill.facade import TimeBill, parse_budget
from timebill.serve.protocol import (
    DEFAULT_BUDGET_S,
    MAX_BUDGET_S,
    BudgetedRequest,
    ChatCompletionRequest,
    CompletionRequest,
    ContentPart,
    RejectedError,
)
from timebill.serve.service import Service
from timebill.serve.streaming import full_response, stream_events

logger = logging.getLogger(__name__)


def _error(status: int, message: str, kind: str, **extra: Any) -> JSONResponse:
    """An error in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``)."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": kind, **extra}}
    return JSONResponse(body, status_code=status)


def create_app(
    timebill: TimeBill,
    *,
    model_name: str | None = None,
    default_budget_s: float = DEFAULT_BUDGET_S,
    max_budget_s: float = MAX_BUDGET_S,
    service: Any = None,
) -> FastAPI:
    """The FastAPI app serving ``timebill`` (see ``timebill.serve`` for the queue and admission).

    ``model_name``: the id reported by ``/v1/models`` and in responses (default: the engine's model id);
    requests may name any model, they are all answered by this one. ``default_budget_s``: the budget of
    a request that gives none. ``max_budget_s``: larger budgets are refused as mistakes. ``service``: what
    answers the requests (default: a single-node :class:`Service` on ``timebill``; ``timebill serve
    --replicas`` passes a :class:`~timebill.serve.cluster.RoutedService`).
    """
    parse_budget(default_budget_s)
    parse_budget(max_budget_s)
    source = getattr(timebill.engine, "source", None)
    name = model_name or (source.model_id if source is not None else "timebill")
    if service is None:
        service = Service(timebill, name, default_budget_s, max_budget_s)
    engine = timebill.engine

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.stop)

    app = FastAPI(title="TimeBill", summary="Time-budgeted LLM inference, OpenAI-compatible.", lifespan=lifespan)
    app.state.service = service

    async def read_body(request: Request, model: type[BudgetedRequest]) -> BudgetedRequest | JSONResponse:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error(400, f"The request body is not valid JSON: {exc}", "invalid_request_error")
        if not isinstance(body, dict):
            return _error(400, "The request body must be a JSON object.", "invalid_request_error")
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
                for err in exc.errors(include_url=False)
            )
            return _error(422, f"Invalid request: {problems}", "invalid_request_error")

    async def handle(request: Request, endpoint: str, model: type[BudgetedRequest]) -> Response:
        arrival = time.perf_counter()  # the budget counts from here: parsing and queueing are in it
        service.metrics.inc("timebill_requests_total", endpoint=endpoint)
        req = await read_body(request, model)
        if isinstance(req, JSONResponse):
            service.metrics.inc("timebill_requests_invalid_total", endpoint=endpoint)
            return req
        try:
            if isinstance(req, ChatCompletionRequest):
                messages = [{"role": m.role, "content": _content_text(m.content)} for m in req.messages]
                spec = service.admission.spec(req, messages, chat=True)
            else:
                assert isinstance(req, CompletionRequest)
                prompt = req.prompt if isinstance(req.prompt, str) else _single_prompt(req.prompt)
                spec = service.admission.spec(req, prompt, chat=False)
            job = await service.admit_async(spec, arrival)
        except RejectedError as exc:
            service.metrics.inc("timebill_requests_rejected_total", stage=exc.stage)
            return _rejected(exc)
        except TimeBillError as exc:
            service.metrics.inc("timebill_requests_invalid_total", endpoint=endpoint)
            return _error(400, str(exc), "invalid_request_error")
        except Exception as exc:  # a bug, not bad input: say so, and keep serving
            logger.exception("admission failed")
            service.metrics.inc("timebill_requests_failed_total")
            return _error(500, f"Admission failed: {type(exc).__name__}: {exc}", "server_error")
        kind, value = await service.next_event(request, job, until_started=True)
        if kind != "started":
            return _outcome_error(kind, value)
        rid = ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        if spec.stream:
            stream = stream_events(service, request, job, rid, endpoint)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        while True:
            kind, value = await service.next_event(request, job, until_started=False)
            if kind in ("plan", "token"):
                continue
            if kind != "done":
                return _outcome_error(kind, value)
            return JSONResponse(full_response(service, value, rid, endpoint))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        """Chat completion (OpenAI shape) within ``time_budget`` seconds; ``stream: true`` for SSE."""
        return await handle(request, "chat", ChatCompletionRequest)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        """Text completion of a raw prompt (no chat template) within ``time_budget`` seconds."""
        return await handle(request, "completions", CompletionRequest)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        """The one model this server runs."""
        return {
            "object": "list",
            "data": [{"id": service.model_name, "object": "model", "created": service.created, "owned_by": "timebill"}],
        }

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while the model worker is alive, with the queue's state."""
        ok = service.queue.alive
        body = {
            "status": "ok" if ok else "error",
            "model": service.model_name,
            "queue_depth": service.queue.depth,
            "busy": service.queue.busy,
            "context_length": engine.context_length,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        """Prometheus text: requests, deadlines met/missed, guard stops, rejections, queue, time errors."""
        gauges = {"timebill_queue_depth": float(service.queue.depth), "timebill_engine_busy": float(service.queue.busy)}
        return PlainTextResponse(service.metrics.render(gauges), media_type="text/plain; version=0.0.4")

    return app


def _content_text(content: str | list[ContentPart]) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


def _single_prompt(prompts: list[str]) -> str:
    if len(prompts) != 1:
        raise InvalidInputError(f"prompt must be one string (batches are not supported), got a list of {len(prompts)}")
    return prompts[0]


def _rejected(exc: RejectedError) -> JSONResponse:
    return _error(
        429,
        str(exc),
        "infeasible_budget",
        earliest_feasible_budget_s=round(exc.earliest_feasible_budget_s, 4),
        stage=exc.stage,
    )


def _outcome_error(kind: str, value: Any) -> Response:
    """The HTTP answer for a job that did not produce a result."""
    if kind == "rejected":
        return _rejected(value)
    if kind == "cancelled":
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it
    if isinstance(value, TimeBillError):
        return _error(400, str(value), "invalid_request_error")
    return _error(500, f"Generation failed: {type(value).__name__}: {value}", "server_error")
