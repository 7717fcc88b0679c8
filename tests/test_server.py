"""The HTTP API on the real model, through uvicorn and the clients users have (openai, httpx).

One server for the module (127.0.0.1, a free port), a stand-in length predictor (the shipped one may not
exist yet), the session's real model and profile. The EDF ordering test drives the queue alone with a
deliberately slow fake step: ordering does not need the model.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import openai
import pytest
from typer.testing import CliRunner

from http_server import serving
from length_predictors import ConstantPredictor
from timebill.errors import PredictorError
from timebill.facade import TimeBill
from timebill.serve import EDFQueue, Job, create_app

CHAT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def server(engine, estimator) -> Iterator[SimpleNamespace]:
    estimator.reset_recalibration()
    timebill = TimeBill(engine, estimator, ConstantPredictor(24), arrangement="sequential")
    with serving(create_app(timebill)) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
        yield SimpleNamespace(base=base, client=client, engine=engine)


def _metric(base: str, name: str) -> float:
    """Sum of a metric's series in the Prometheus text (all labels)."""
    text = httpx.get(base + "/metrics").text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def test_chat_completion_with_a_time_budget_returns_the_plan(server) -> None:
    resp = server.client.chat.completions.create(
        model="anything", messages=CHAT, max_tokens=16, extra_body={"time_budget": 20.0}
    )
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > 0 and 1 <= resp.usage.completion_tokens <= 16
    tb = resp.model_extra["timebill"]
    assert tb["n_hat"] == 24 and tb["n_worst"] == 16  # min(k·N̂, max_tokens)
    assert tb["budget_s"] == 20.0 and tb["alpha_star"] == 0.0  # roomy: nothing evicted
    for key in ("predicted_prefill_s", "measured_prefill_s", "predicted_decode_s", "measured_decode_s"):
        assert tb[key] > 0
    assert tb["deadline_met"] and 0 < tb["measured_e2e_s"] <= 20.0
    assert tb["stop_reason"] in ("eos", "max_tokens") and tb["plan"]["feasible"]


def test_streaming_sends_the_plan_first_and_timings_in_the_final_chunk(server) -> None:
    body = {"model": "x", "messages": CHAT, "max_tokens": 16, "extra_body": {"time_budget_ms": 20000}}
    chunks = list(server.client.chat.completions.create(stream=True, **body))
    first, last = chunks[0], chunks[-1]
    assert first.choices[0].delta.role == "assistant"
    assert first.model_extra["timebill"]["plan"]["n_worst"] == 16
    assert last.choices[0].finish_reason in ("stop", "length")
    assert last.model_extra["timebill"]["measured_e2e_s"] > 0 and last.model_extra["timebill"]["deadline_met"]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert len(chunks) >= 4 and streamed.strip()
    whole = server.client.chat.completions.create(**body)  # greedy, same plan: the same answer
    assert streamed == whole.choices[0].message.content


def test_impossible_budget_is_refused_with_429_before_any_generation(server) -> None:
    ran_before = _metric(server.base, "timebill_requests_completed_total")
    t0 = time.perf_counter()
    with pytest.raises(openai.RateLimitError) as info:
        server.client.chat.completions.create(
            model="x", messages=CHAT, max_tokens=16, extra_body={"time_budget": 0.001}
        )
    assert time.perf_counter() - t0 < 2.0
    error = info.value.body
    assert info.value.status_code == 429 and error["type"] == "infeasible_budget"
    assert error["earliest_feasible_budget_s"] > 0.001 and "alpha_max" in error["message"]
    with pytest.raises(openai.RateLimitError):  # a stream is refused the same way, before it starts
        list(
            server.client.chat.completions.create(
                model="x", messages=CHAT, stream=True, extra_body={"time_budget": 0.01}
            )
        )
    assert _metric(server.base, "timebill_requests_completed_total") == ran_before
    assert _metric(server.base, "timebill_requests_rejected_total") >= 2


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ("{not json", 400, "not valid JSON"),
        ("[1, 2]", 400, "JSON object"),
        ('{"messages": []}', 422, "messages"),
        ('{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', 422, "temperature"),
        ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1.5}', 422, "max_tokens"),
        ('{"messages": [{"role": "user", "content": "hi"}], "time_budget": -1}', 400, "positive"),
        ('{"messages": [{"role": "user", "content": "hi"}], "time_budget": NaN}', 400, "positive"),
        ('{"messages": [{"role": "user", "content": "hi"}], "time_budget": 1e9}', 400, "limit"),
        (
            '{"messages": [{"role": "user", "content": "hi"}], "time_budget": 1, "time_budget_ms": 1000}',
            400,
            "not both",
        ),
        ('{"messages": [{"role": "user", "content": "  "}]}', 400, "empty"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', 400, "role"),
        ('{"messages": [{"role": "user", "content": "hi"}], "bound": "magic"}', 400, "bound"),
        ('{"messages": [{"role": "user", "content": "hi"}], "press": "magic"}', 400, "press"),
        ('{"messages": [{"role": "user", "content": "hi"}], "n": 2}', 400, "n must be 1"),
        ('{"messages": [{"role": "user", "content": "hi"}], "prompt_compression": -0.1}', 400, "prompt_compression"),
        ('{"messages": [{"role": "user", "content": "hi"}], "prompt_compression": 1.0}', 400, "prompt_compression"),
        ('{"messages": [{"role": "user", "content": "hi"}], "prompt_compression": NaN}', 400, "prompt_compression"),
        ('{"messages": [{"role": "user", "content": "hi"}], "compressor": "llmlingua"}', 400, "Unknown compressor"),
        (json.dumps({"messages": CHAT, "prompt_compression": 0.5, "question": " "}), 400, "question is empty"),
        (json.dumps({"messages": [{"role": "user", "content": "word " * 9000}]}), 400, "context"),
    ],
)
def test_malformed_requests_get_a_clear_400_or_422(server, body: str, status: int, says: str) -> None:
    resp = httpx.post(
        server.base + "/v1/chat/completions", content=body, headers={"content-type": "application/json"}, timeout=30
    )
    assert resp.status_code == status, resp.text
    assert says in resp.json()["error"]["message"]
    assert httpx.get(server.base + "/health").json()["status"] == "ok"  # the server lives on


def test_completions_refuse_a_bad_compression_with_400(server) -> None:
    for extra, says in (({"prompt_compression": 2}, "prompt_compression"), ({"compressor": "zip"}, "compressor")):
        resp = httpx.post(server.base + "/v1/completions", json={"prompt": "Once upon a time", **extra}, timeout=30)
        assert resp.status_code == 400, resp.text
        assert says in resp.json()["error"]["message"]


def test_prompt_compression_prefills_fewer_tokens_and_the_response_says_how_many(server) -> None:
    from test_cli_compression import long_prompt

    messages = [{"role": "user", "content": long_prompt()}]
    extra = {"time_budget": 30.0, "prompt_compression": 0.5, "compressor": "bm25"}
    resp = server.client.chat.completions.create(model="x", messages=messages, max_tokens=4, extra_body=extra)
    tb = resp.model_extra["timebill"]
    assert tb["original_prompt_tokens"] >= 300 and tb["prompt_tokens"] < tb["original_prompt_tokens"]
    assert 0.3 < tb["prompt_compression"] < 0.7 and tb["compressor"] == "bm25" and tb["compress_s"] > 0
    assert tb["deadline_met"] and resp.usage.prompt_tokens == tb["prompt_tokens"]


def test_completions_models_health_and_metrics_endpoints(server) -> None:
    resp = server.client.completions.create(
        model="x", prompt="The capital of France is", max_tokens=8, extra_body={"time_budget_ms": 20000}
    )
    assert resp.choices[0].text and resp.model_extra["timebill"]["budget_s"] == 20.0
    models = server.client.models.list()
    assert [m.id for m in models.data] == [server.engine.source.model_id]
    health = httpx.get(server.base + "/health").json()
    assert health["status"] == "ok" and health["queue_depth"] == 0
    metrics = httpx.get(server.base + "/metrics").text
    for name in (
        "timebill_requests_total",
        "timebill_deadline_met_total",
        "timebill_deadline_missed_total",
        "timebill_guard_stops_total",
        "timebill_requests_rejected_total",
        "timebill_queue_depth",
        'timebill_time_error_seconds_count{phase="e2e"}',
    ):
        assert name in metrics
    assert _metric(server.base, "timebill_deadline_met_total") >= 1


def test_queued_time_counts_and_a_disconnect_frees_the_engine(server) -> None:
    """A long request holds the model; a short-budget one behind it is refused in time, never run late.

    Then the long request's client goes away: its generation is cancelled and the model is free again.
    """
    engine = server.engine
    stop_ids = engine.stop_ids
    engine.stop_ids = set()  # the long request cannot end early at EOS
    cancelled_before = _metric(server.base, "timebill_requests_cancelled_total")
    long_body = {"messages": CHAT, "max_tokens": 400, "time_budget": 120, "stream": True}
    try:
        with httpx.stream("POST", server.base + "/v1/chat/completions", json=long_body, timeout=60) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            while '"content": "' not in (line := next(lines)) or '"role"' in line:
                pass  # up to the first text delta: the model is busy with this request now
            budget_s = 1.5
            t0 = time.perf_counter()
            resp = httpx.post(
                server.base + "/v1/chat/completions",
                json={"messages": CHAT, "max_tokens": 16, "time_budget": budget_s},
                timeout=30,
            )
            waited = time.perf_counter() - t0
            assert resp.status_code == 429, resp.text
            error = resp.json()["error"]
            assert error["stage"] in ("admission", "queued") and error["earliest_feasible_budget_s"] > budget_s
            assert waited < budget_s + 0.5  # refused by its deadline, not after the long request
        # leaving the block closed the connection mid-stream
        t_closed = time.perf_counter()
        while _metric(server.base, "timebill_requests_cancelled_total") <= cancelled_before:
            assert time.perf_counter() - t_closed < 10, "the disconnect did not cancel the generation"
            time.sleep(0.05)
    finally:
        engine.stop_ids = stop_ids
    t0 = time.perf_counter()
    resp = server.client.chat.completions.create(model="x", messages=CHAT, max_tokens=4, extra_body={"time_budget": 30})
    assert resp.model_extra["timebill"]["waited_s"] < 1.0 and time.perf_counter() - t0 < 10


def test_edf_queue_runs_a_queued_burst_earliest_deadline_first() -> None:
    release = threading.Event()
    ran: list[float] = []

    def runner(job: Job) -> None:
        if job.payload == "blocker":
            release.wait(10)
            return
        time.sleep(0.02)  # a slow fake step: ordering only, no model
        ran.append(job.payload)

    queue = EDFQueue(runner)
    queue.start()
    try:
        now = time.perf_counter()
        queue.push(Job(arrival=now, deadline=now + 100, expected_s=1.0, min_need_s=0.1, payload="blocker"))
        while not queue.busy:
            time.sleep(0.005)
        burst = [Job(arrival=now, deadline=now + d, expected_s=0.5, min_need_s=0.1, payload=d) for d in (5, 1, 4, 2, 3)]
        for job in burst:
            queue.push(job)
        assert queue.depth == 5
        # Work ahead of a deadline of +3 s: what is left of the running job (≤ 1 s) plus jobs due at +1, +2, +3.
        backlog = queue.backlog_s(now + 3, time.perf_counter())
        assert 1.5 <= backlog <= 2.5
        assert queue.drop(burst[2]) and not queue.drop(burst[2])  # the +4 s job's client went away
        release.set()
        t0 = time.monotonic()
        while len(ran) < 4 and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        assert ran == [1, 2, 3, 5]
    finally:
        release.set()
        queue.close()


def test_serve_without_a_length_predictor_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from timebill.cli import app

    def missing(*args: object, **kwargs: object) -> TimeBill:
        raise PredictorError("Length-predictor file not found: predictor.pt. Train one with `timebill rlp train`.")

    monkeypatch.setattr(TimeBill, "load", missing)
    result = CliRunner().invoke(app, ["serve", "--port", "8123"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: Length-predictor file not found: predictor.pt. Train one with `timebill rlp train`."
    ]


def test_a_prefill_that_would_make_a_queued_request_late_is_refused_without_predicting(engine, estimator) -> None:
    """Under overload most refusals are of this kind, and a probe predictor costs a prefill: none is paid.

    A queued (never started) request can give a newcomer only half the newcomer's predicted prefill; a
    newcomer due before it goes ahead of it (EDF), so even its prefill would make the queued one late, though
    its budget covers the prefill several times. The same request due after the queued one is predicted and
    admitted. (Times scale with this session's profile: the test holds on a slow or a fast host.)
    """
    from timebill.serve.admission import Admission
    from timebill.serve.protocol import ChatCompletionRequest, RejectedError

    calls: list[str] = []

    class Counting(type(ConstantPredictor(24))):  # type: ignore[misc]
        def predict(self, text: str):  # noqa: ANN201 - the predictor's own return type
            calls.append(text)
            return super().predict(text)

    estimator.reset_recalibration()
    timebill = TimeBill(engine, estimator, Counting(24, spread=2.0, log_divisor=3.0), arrangement="sequential")
    queue = EDFQueue(lambda job: None)  # not started: what is pushed stays queued
    admission = Admission(timebill, queue, default_budget_s=10.0, max_budget_s=1e6)
    prompt = [{"role": "user", "content": "Summarise this. " + "The river runs past the old mill. " * 20}]
    need = timebill.prefill_need(prompt).seconds
    budget = 4 * need + 1.0
    now = time.perf_counter()
    due = now + budget + 1.0
    queue.push(Job(arrival=now, deadline=due, expected_s=0.1, min_need_s=due - now - need / 2, payload="queued"))

    def spec(budget_s: float):
        request = ChatCompletionRequest(messages=prompt, max_tokens=16, time_budget=budget_s)
        return admission.spec(request, prompt, True)

    with pytest.raises(RejectedError) as info:
        admission.admit(spec(budget), time.perf_counter())
    assert "miss its deadline" in str(info.value) and not calls
    # the hint is honest: after everything queued, there is room for the longest answer
    assert info.value.earliest_feasible_budget_s > 0.1 + need
    job = admission.admit(spec(budget + 2.0 + 20 * need), time.perf_counter())  # due after the queued one
    assert len(calls) == 1 and job.deadline > due
