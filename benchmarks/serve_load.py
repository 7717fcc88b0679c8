"""Load test of ``timebill serve``: concurrent clients with mixed time budgets, loopback only.

Starts the server in this process on 127.0.0.1 (a free port) and runs ``--clients`` closed-loop clients
(one thread and one httpx connection each) for ``--duration-s`` seconds, at most ``--max-requests``
requests. Each client picks a prompt (a question, an instruction, or a long document), a budget
(``--budgets``), a ``max_tokens`` and whether to stream, sends the request, waits for the answer, thinks
for up to ``--think-s`` seconds, and repeats.

Every request must be answered: completed (eos / max_tokens), guard-stopped (``finish_reason=length``,
``stop_reason=deadline``) or refused with 429 — none lost (timeout, connection error, 5xx), none late
without saying so (``deadline_met`` true while the measured end-to-end time exceeds the budget). The
table gives p50/p99 of (measured e2e − budget) over the answered requests (server-measured from arrival,
and client-measured wall time), the rejection rate and throughput.

    flock /tmp/timebill-cpu.lock python benchmarks/serve_load.py --out docs/results/serve_load.txt
    python benchmarks/serve_load.py --predictor constant:64 --clients 4 --duration-s 30   # smoke

``--targets single,ray-default,ray-deadline`` runs the same load, one after another in one run, against the
single-node server (1 replica × ``--threads``), Ray Serve with its default router (``--replicas`` replicas ×
``--replica-threads``) and Ray Serve with TimeBill's deadline-aware router (same shape), and adds a comparison
table: goodput (answers within their deadline per second), 429 rate, misses, lost, e2e − budget. Ray targets
need the ``[ray]`` extra and a profile for ``--replica-threads``.

``--predictor shipped`` (default) loads the shipped length predictor (``TimeBill.load``);
``constant:N`` predicts N tokens for every prompt (a stand-in until the predictor ships). Needs a
profile for the setup (``timebill profile``). No network beyond 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import uvicorn

from timebill.estimator.store import cpu_signature
from timebill.serve import create_app, load_timebill
from timebill.serve.cluster import ReplicaConfig

TARGETS = ("single", "ray-default", "ray-deadline")

DOCUMENT = (
    "A robot arm on an assembly line picks a part from a tray, checks it with a camera, and places it "
    "on a conveyor belt. When the camera sees a scratch, the arm puts the part in a reject bin instead. "
    "The controller logs each decision with a timestamp so that engineers can audit the line later. "
)
PROMPTS = (
    "What is the capital of France?",
    "Name three primary colours.",
    "Give one tip for writing clear emails.",
    "Explain in two sentences what a deadline is.",
    "Write a haiku about a conveyor belt.",
    "List the steps to boil an egg.",
    "Summarise this log in one sentence:\n" + DOCUMENT * 4,
    "What does the arm do with scratched parts? Answer briefly.\n" + DOCUMENT * 10,
    "Write three questions an auditor might ask about this line:\n" + DOCUMENT * 25,
)
MAX_TOKENS = (32, 64, 128)
CLIENT_SLACK_S = 0.05  # loopback HTTP and JSON between the server's clock and the client's


@dataclass
class Outcome:
    """One request as the client saw it."""

    client: int
    budget_s: float
    max_tokens: int
    stream: bool
    prompt_index: int
    status: int  # HTTP status; 0 when no answer came (lost)
    kind: str  # completed | guard_stopped | rejected | invalid | lost
    wall_s: float  # client-measured: request sent → answer complete
    e2e_s: float | None = None  # server-measured from arrival (timebill.measured_e2e_s)
    deadline_met: bool | None = None
    stop_reason: str | None = None
    tokens: int = 0
    alpha: float | None = None
    waited_s: float | None = None
    earliest_feasible_budget_s: float | None = None
    error: str | None = None


def _classify(status: int, info: dict | None) -> str:
    if status == 200 and info is not None:
        return "guard_stopped" if info.get("stop_reason") == "deadline" else "completed"
    if status == 429:
        return "rejected"
    if status in (400, 422):
        return "invalid"
    return "lost"


def _one_request(http: httpx.Client, url: str, body: dict, client: int, prompt_index: int) -> Outcome:
    base = {
        "client": client,
        "budget_s": body["time_budget"],
        "max_tokens": body["max_tokens"],
        "stream": body["stream"],
        "prompt_index": prompt_index,
    }
    t0 = time.perf_counter()
    try:
        if body["stream"]:
            info, status, text, err = None, 0, "", None
            with http.stream("POST", url, json=body) as resp:
                status = resp.status_code
                if status != 200:
                    text = resp.read().decode()
                else:
                    for line in resp.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:  # refused or failed after the stream started
                            status, text = chunk["error"].get("status", 500), json.dumps(chunk)
                        elif chunk["choices"] and chunk["choices"][0]["finish_reason"] is not None:
                            info = chunk.get("timebill")
            wall = time.perf_counter() - t0
        else:
            resp = http.post(url, json=body)
            wall = time.perf_counter() - t0
            status, text = resp.status_code, resp.text
            info = resp.json().get("timebill") if status == 200 else None
            err = None
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        return Outcome(**base, status=0, kind="lost", wall_s=time.perf_counter() - t0, error=repr(exc))
    out = Outcome(**base, status=status, kind=_classify(status, info), wall_s=wall, error=err)
    if info is not None:
        out.e2e_s = info["measured_e2e_s"]
        out.deadline_met = info["deadline_met"]
        out.stop_reason = info["stop_reason"]
        out.tokens = info["tokens_generated"]
        out.alpha = info["alpha_final"]
        out.waited_s = info["waited_s"]
    elif status == 429:
        try:
            out.earliest_feasible_budget_s = json.loads(text)["error"]["earliest_feasible_budget_s"]
        except (ValueError, KeyError, TypeError):
            out.error = text[:200]
    elif status != 200:
        out.error = text[:200]
    return out


def _client(
    index: int, url: str, args: argparse.Namespace, stop_at: float, counter: list[int], lock: threading.Lock, out: list
) -> None:
    rng = random.Random(args.seed * 1000 + index)
    with httpx.Client(timeout=max(args.budgets) + 60.0) as http:
        while time.perf_counter() < stop_at:
            with lock:
                if counter[0] >= args.max_requests:
                    return
                counter[0] += 1
            prompt_index = rng.randrange(len(PROMPTS))
            body = {
                "model": "timebill",
                "messages": [{"role": "user", "content": PROMPTS[prompt_index]}],
                "max_tokens": rng.choice(MAX_TOKENS),
                "time_budget": rng.choice(args.budgets),
                "stream": rng.random() < args.stream_share,
            }
            outcome = _one_request(http, url, body, index, prompt_index)
            with lock:
                out.append(outcome)
            time.sleep(rng.uniform(0.0, args.think_s))


def _serve(app) -> tuple[uvicorn.Server, threading.Thread, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        if time.monotonic() - t0 > 60 or not thread.is_alive():
            sys.exit("the server did not start")
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


def _config(args: argparse.Namespace, threads: int) -> tuple[ReplicaConfig, str]:
    if args.predictor == "shipped":
        return ReplicaConfig(threads=threads), "shipped (TimeBill.load)"
    if not args.predictor.startswith("constant:"):
        sys.exit(f"--predictor must be 'shipped' or 'constant:N', got {args.predictor!r}")
    used = f"{args.predictor} (stand-in: the shipped predictor was not used)"
    return ReplicaConfig(threads=threads, predictor=args.predictor), used


class _Target:
    """One server under test: started, loaded, and torn down again, so targets run one after another."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name, self.cluster = name, None
        if name == "single":
            config, self.predictor_used = _config(args, args.threads)
            timebill = load_timebill(loader=config.load)
            app = create_app(timebill)
            self.shape = f"1 replica x {args.threads} threads, {timebill.engine.decode_path}"
        else:
            from timebill.serve.cluster import create_cluster_app

            config, self.predictor_used = _config(args, args.replica_threads)
            router = name.removeprefix("ray-")
            app, self.cluster = create_cluster_app(config, args.replicas, router=router)
            self.shape = f"Ray Serve, {args.replicas} replicas x {args.replica_threads} thread(s), {router} router"
        self.server, self.thread, self.base = _serve(app)

    def close(self) -> str:
        metrics = httpx.get(self.base + "/metrics").text
        self.server.should_exit = True
        self.thread.join(30)
        if self.cluster is not None:
            import ray
            from ray import serve

            self.cluster.shutdown()
            serve.shutdown()
            ray.shutdown()
        return metrics


def _pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarise(outcomes: list[Outcome], duration_s: float) -> dict:
    kinds = {
        k: sum(o.kind == k for o in outcomes) for k in ("completed", "guard_stopped", "rejected", "invalid", "lost")
    }
    answered = [o for o in outcomes if o.kind in ("completed", "guard_stopped")]
    over = [o.e2e_s - o.budget_s for o in answered if o.e2e_s is not None]
    wall_over = [o.wall_s - o.budget_s for o in answered]
    late_unflagged = [o for o in answered if o.deadline_met and o.e2e_s is not None and o.e2e_s > o.budget_s]
    late_flagged = [o for o in answered if o.deadline_met is False]
    client_late = [o for o in answered if o.wall_s > o.budget_s + CLIENT_SLACK_S]
    in_time = [o for o in answered if o.deadline_met and o.wall_s <= o.budget_s + CLIENT_SLACK_S]
    total = len(outcomes)
    return {
        "requests": total,
        **kinds,
        "late_flagged": len(late_flagged),
        "late_unflagged": len(late_unflagged),
        "client_late": len(client_late),
        "rejection_rate": kinds["rejected"] / total if total else math.nan,
        "e2e_minus_budget_p50_s": _pct(over, 0.50),
        "e2e_minus_budget_p99_s": _pct(over, 0.99),
        "e2e_minus_budget_max_s": max(over) if over else math.nan,
        "wall_minus_budget_p50_s": _pct(wall_over, 0.50),
        "wall_minus_budget_p99_s": _pct(wall_over, 0.99),
        "answered_per_s": len(answered) / duration_s,
        "goodput_per_s": len(in_time) / duration_s,
        "completed_in_time_per_s": sum(o.kind == "completed" for o in in_time) / duration_s,
        "tokens_per_s": sum(o.tokens for o in answered) / duration_s,
        "mean_alpha": statistics.fmean(o.alpha for o in answered) if answered else math.nan,
        "mean_queue_wait_s": statistics.fmean(o.waited_s for o in answered) if answered else math.nan,
    }


def table(summary: dict, by_budget: dict[float, dict], header: str) -> str:
    lines = [
        header,
        "",
        "| requests | completed | guard-stopped | rejected 429 | invalid | lost | late: flagged / unflagged "
        f"| answer after budget + {CLIENT_SLACK_S * 1e3:.0f} ms (client clock) |",
        "|---|---|---|---|---|---|---|---|",
        f"| {summary['requests']} | {summary['completed']} | {summary['guard_stopped']} | {summary['rejected']} "
        f"| {summary['invalid']} | {summary['lost']} | {summary['late_flagged']} / {summary['late_unflagged']} "
        f"| {summary['client_late']} |",
        "",
        "| e2e − budget p50 / p99 / max (server) | wall − budget p50 / p99 (client) | rejection rate "
        "| answered/s | tokens/s | mean α | mean queue wait |",
        "|---|---|---|---|---|---|---|",
        f"| {summary['e2e_minus_budget_p50_s']:+.3f} / {summary['e2e_minus_budget_p99_s']:+.3f} / "
        f"{summary['e2e_minus_budget_max_s']:+.3f} s | {summary['wall_minus_budget_p50_s']:+.3f} / "
        f"{summary['wall_minus_budget_p99_s']:+.3f} s | {summary['rejection_rate']:.1%} "
        f"| {summary['answered_per_s']:.2f} | {summary['tokens_per_s']:.1f} | {summary['mean_alpha']:.3f} "
        f"| {summary['mean_queue_wait_s']:.3f} s |",
        "",
        "| budget (s) | requests | completed | guard-stopped | rejected | e2e − budget p50 / p99 (s) |",
        "|---|---|---|---|---|---|",
    ]
    for budget, s in sorted(by_budget.items()):
        lines.append(
            f"| {budget:g} | {s['requests']} | {s['completed']} | {s['guard_stopped']} | {s['rejected']} "
            f"| {s['e2e_minus_budget_p50_s']:+.3f} / {s['e2e_minus_budget_p99_s']:+.3f} |"
        )
    return "\n".join(lines)


def run_load(base: str, args: argparse.Namespace) -> tuple[list[Outcome], float, int]:
    """The closed-loop clients against ``base`` until the duration or the request count is reached."""
    url = base + "/v1/chat/completions"
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    counter = [0]
    t0 = time.perf_counter()
    stop_at = t0 + args.duration_s
    clients = [
        threading.Thread(target=_client, args=(i, url, args, stop_at, counter, lock, outcomes), daemon=True)
        for i in range(args.clients)
    ]
    for c in clients:
        c.start()
    for c in clients:
        c.join(args.duration_s + max(args.budgets) + 120.0)
    return outcomes, time.perf_counter() - t0, sum(c.is_alive() for c in clients)


def comparison(results: dict[str, dict]) -> str:
    """One row per target; goodput also as a ratio to Ray's default router where both ran."""
    ref = results.get("ray-default", {}).get("goodput_per_s")
    lines = [
        "| target | shape | requests | goodput (in time /s) | completed in time /s | vs ray-default | 429 rate "
        "| late (flagged / unflagged / client) | lost | e2e − budget p50 / p99 (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in results.items():
        ratio = f"{s['goodput_per_s'] / ref:.2f}x" if ref else "—"
        lines.append(
            f"| {name} | {s['shape']} | {s['requests']} | {s['goodput_per_s']:.3f} "
            f"| {s['completed_in_time_per_s']:.3f} "
            f"| {ratio} | {s['rejection_rate']:.1%} | {s['late_flagged']} / {s['late_unflagged']} / {s['client_late']} "
            f"| {s['lost']} | {s['e2e_minus_budget_p50_s']:+.3f} / {s['e2e_minus_budget_p99_s']:+.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration-s", type=float, default=300.0, help="stop issuing requests after this")
    parser.add_argument("--max-requests", type=int, default=5000, help="stop issuing requests after this many")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0, 8.0, 16.0], help="seconds")
    parser.add_argument("--stream-share", type=float, default=0.25, help="share of streaming requests")
    parser.add_argument("--think-s", type=float, default=0.5, help="each client waits U(0, think) between requests")
    parser.add_argument("--predictor", default="shipped", help="'shipped' or 'constant:N'")
    parser.add_argument("--threads", type=int, default=2, help="the single-node server's threads")
    parser.add_argument("--targets", default="single", help=f"comma-separated, of {', '.join(TARGETS)}")
    parser.add_argument("--replicas", type=int, default=2, help="Ray targets: replicas")
    parser.add_argument("--replica-threads", type=int, default=1, help="Ray targets: threads per replica")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the table here (and the raw data as .json)")
    args = parser.parse_args()
    if not (1 <= args.clients <= 64 and 0 < args.duration_s <= 3600 and args.max_requests >= 1):
        sys.exit("need 1 <= --clients <= 64, 0 < --duration-s <= 3600, --max-requests >= 1")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not targets or any(t not in TARGETS for t in targets):
        sys.exit(f"--targets: comma-separated names of {', '.join(TARGETS)}, got {args.targets!r}")

    host = f"{cpu_signature()}, {os.cpu_count()} logical CPUs"  # family/model: hosts differ between sessions
    sections, results = [], {}
    raw: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "host": host, "targets": {}}
    failed = False
    for name in targets:
        target = _Target(name, args)
        print(f"[{name}] {target.shape}; length predictor: {target.predictor_used}", flush=True)
        outcomes, duration, stuck = run_load(target.base, args)
        metrics = target.close()
        summary = summarise(outcomes, duration)
        summary["clients_stuck"], summary["shape"] = stuck, target.shape
        by_budget = {b: summarise([o for o in outcomes if o.budget_s == b], duration) for b in args.budgets}
        header = (
            f"serve_load [{name}]: {target.shape}; {args.clients} clients, {duration:.0f} s, budgets {args.budgets} s, "
            f"max_tokens {list(MAX_TOKENS)}, {args.stream_share:.0%} streamed, predictor {target.predictor_used}; "
            f"host {host}"
        )
        text = table(summary, by_budget, header)
        server_lines = [ln for ln in metrics.splitlines() if ln.startswith("timebill_") and "_bucket" not in ln]
        section = text + "\n\nserver /metrics:\n" + "\n".join(server_lines)
        print(section, flush=True)
        sections.append(section)
        results[name] = summary
        raw["targets"][name] = {
            "summary": summary,
            "by_budget": {str(b): s for b, s in by_budget.items()},
            "outcomes": [asdict(o) for o in outcomes],
        }
        failed = failed or bool(summary["lost"] or summary["late_unflagged"] or stuck)
    report = "\n\n".join(sections)
    if len(targets) > 1:
        report = f"## Comparison (host {host})\n\n" + comparison(results) + "\n\n" + report
        print("\n" + comparison(results))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(args.out, report + "\n")
        _write_atomic(args.out.with_suffix(".json"), json.dumps(raw, indent=1))
        print(f"\nwrote {args.out} and {args.out.with_suffix('.json')}")
    if failed:
        sys.exit(1)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
