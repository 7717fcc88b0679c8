"""``timebill serve --replicas``: a real local Ray Serve deployment of 2 TimeBill replicas on the real model.

The front door (our FastAPI app with the deadline router) runs in this process under uvicorn, as the CLI
runs it; the replicas are Ray actors, each loading the default model with the session's profile and a
stand-in length predictor. Each replica gets the profile's two threads (the profile is keyed by thread
count), so the cores are oversubscribed: the tests check behaviour, never speed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import openai
import pytest

pytest.importorskip("ray.serve", reason="the [ray] extra is not installed")

from http_server import serving  # noqa: E402
from timebill.estimator.store import save_profile  # noqa: E402
from timebill.serve.cluster import DeadlineRouter, ReplicaConfig, create_cluster_app  # noqa: E402

CHAT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def cluster(engine, estimator, tmp_path_factory) -> Iterator[SimpleNamespace]:
    import ray
    from ray import serve

    profile = save_profile(estimator.profile, tmp_path_factory.mktemp("cluster") / "profile.json")
    config = ReplicaConfig(threads=2, profile=str(profile), predictor="constant:24", default_budget_s=30.0)
    app, cl = create_cluster_app(config, 2, router="deadline", num_cpus=4)
    router = DeadlineRouter.for_deployment()
    assert router is not None
    try:
        with serving(app) as base:
            client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
            yield SimpleNamespace(base=base, client=client, cluster=cl, router=router)
    finally:
        cl.shutdown()
        serve.shutdown()
        ray.shutdown()


def test_both_replicas_are_up_and_the_router_sees_their_time_models(cluster) -> None:
    assert len(cluster.cluster.replica_ids) == 2
    views = cluster.router.views()
    assert sorted(v.replica_id for v in views) == cluster.cluster.replica_ids
    deadline = time.monotonic() + 30  # the first routing stats arrive within a stats period or two
    while any(v.coefficients is None for v in cluster.router.views()):
        assert time.monotonic() < deadline, "a replica never published its time model"
        time.sleep(0.2)
    health = httpx.get(cluster.base + "/health").json()
    assert health["status"] == "ok" and health["queue_depth"] == 0


def test_a_feasible_request_is_answered_with_the_plan(cluster) -> None:
    resp = cluster.client.chat.completions.create(
        model="anything", messages=CHAT, max_tokens=16, extra_body={"time_budget": 30.0}
    )
    choice = resp.choices[0]
    assert choice.message.content.strip() and choice.finish_reason in ("stop", "length")
    tb = resp.model_extra["timebill"]
    assert tb["n_hat"] == 24 and tb["n_worst"] == 16 and tb["plan"]["feasible"]
    assert tb["deadline_met"] and 0 < tb["measured_e2e_s"] <= 30.0
    assert len(cluster.router.ledger) == 0  # the booking is released with the answer
    raw = httpx.post(
        cluster.base + "/v1/completions",
        json={"prompt": "Once upon a time", "max_tokens": 8, "time_budget": 30.0},
        timeout=60,
    )
    assert raw.status_code == 200 and raw.json()["choices"][0]["text"]
    assert raw.json()["timebill"]["plan"]["feasible"]


def test_an_infeasible_request_gets_429_before_any_generation(cluster) -> None:
    with pytest.raises(openai.RateLimitError) as info:
        cluster.client.chat.completions.create(
            model="anything", messages=CHAT, max_tokens=16, extra_body={"time_budget": 0.002}
        )
    err = info.value.body
    assert err["code"] == "infeasible_budget" and err["earliest_feasible_budget_s"] > 0.002
    assert "replica" in err["message"]
    text = httpx.get(cluster.base + "/metrics").text
    assert 'timebill_requests_rejected_total{stage="admission"}' in text


def test_a_replica_that_dies_mid_run_answers_with_an_error_and_is_routed_around(cluster) -> None:
    import ray

    router = cluster.router
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Write a long story about a robot arm on an assembly line."}],
        "max_tokens": 256,
        "stream": True,
        "time_budget": 120.0,
    }
    events: list[dict] = []
    with httpx.stream("POST", cluster.base + "/v1/chat/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        killed = None
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events.append(json.loads(line[len("data: ") :]))
            if killed is None and len(events) >= 3:  # the plan and two text deltas: it is running somewhere
                running = [rid for rid in router.replica_ids() if router.ledger.counts(rid)[0]]
                assert len(running) == 1
                killed = running[0]
                replica = next(r for r in router.curr_replicas if str(r.unique_id) == killed)
                ray.kill(ray.get_actor(replica.to_full_id_str(), namespace="serve"), no_restart=True)
    last = events[-1]
    assert "error" in last and last["error"]["status"] == 500 and "replica" in last["error"]["message"]
    assert killed not in router.replica_ids()  # out of the routing table at once
    resp = cluster.client.chat.completions.create(
        model="anything", messages=CHAT, max_tokens=8, extra_body={"time_budget": 60.0}
    )
    assert resp.choices[0].message.content.strip()  # served by the survivor (or the replacement)
    text = httpx.get(cluster.base + "/metrics").text
    assert "timebill_requests_failed_total" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--replicas", "0"], "--replicas must be >= 1"),
        (["--address", "ray://nowhere:10001"], "--address needs --replicas"),
        (["--replicas", "2", "--router", "fastest"], "--router must be one of deadline, default"),
    ],
)
def test_serve_replicas_bad_options_exit_2_before_anything_starts(args, message) -> None:
    from typer.testing import CliRunner

    from timebill.cli import app

    result = CliRunner().invoke(app, ["serve", *args])
    assert result.exit_code == 2 and message in result.output


def test_replica_config_and_thread_shares() -> None:
    from timebill.errors import InvalidInputError
    from timebill.serve.cluster import threads_per_replica

    assert threads_per_replica(2, cores=2) == 1 and threads_per_replica(3, cores=2) == 1
    assert threads_per_replica(2, cores=16) == 8 and threads_per_replica(4, threads=3) == 3
    for bad in ("constant:0", "constant:x", "constant:nan"):
        with pytest.raises(InvalidInputError, match="constant:N"):
            ReplicaConfig(predictor=bad).load()
