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

``--predictor shipped`` (default) loads the shipped length predictor (``TimeBill.load``);
``constant:N`` predicts N tokens for every prompt (a stand-in until the predictor ships). Needs a
profile for the setup (``timebill profile``). No network beyond 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import math
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

from timebill.facade import TimeBill
from timebill.predictor import ConstantLengthPredictor
from timebill.serve import create_app, load_timebill

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


def constant_length_predictor(length: float) -> ConstantLengthPredictor:
    """The stand-in predictor: the same length for every prompt (a training-set median, say).

    Its upper(δ) is 2·N·(1 + ln(1/δ)/3), a spread that grows as δ shrinks, as a calibrated bound's does.
    """
    return ConstantLengthPredictor(length, spread=2.0, log_divisor=3.0)


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


def _start_server(timebill: TimeBill) -> tuple[uvicorn.Server, threading.Thread, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(timebill), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        if time.monotonic() - t0 > 60 or not thread.is_alive():
            sys.exit("the server did not start")
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


def _load(args: argparse.Namespace) -> tuple[TimeBill, str]:
    if args.predictor == "shipped":
        return load_timebill(threads=args.threads), "shipped (TimeBill.load)"
    if not args.predictor.startswith("constant:"):
        sys.exit(f"--predictor must be 'shipped' or 'constant:N', got {args.predictor!r}")
    length = float(args.predictor.split(":", 1)[1])

    def loader() -> TimeBill:
        from timebill.engine import Engine
        from timebill.estimator import ExecutionTimeEstimator

        engine = Engine.load(None, threads=args.threads)
        estimator = ExecutionTimeEstimator.for_engine(engine)
        return TimeBill(engine, estimator, constant_length_predictor(length), arrangement="sequential")

    return load_timebill(loader), f"constant:{length:g} (stand-in: the shipped predictor was not used)"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration-s", type=float, default=300.0, help="stop issuing requests after this")
    parser.add_argument("--max-requests", type=int, default=5000, help="stop issuing requests after this many")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0, 8.0, 16.0], help="seconds")
    parser.add_argument("--stream-share", type=float, default=0.25, help="share of streaming requests")
    parser.add_argument("--think-s", type=float, default=0.5, help="each client waits U(0, think) between requests")
    parser.add_argument("--predictor", default="shipped", help="'shipped' or 'constant:N'")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the table here (and the raw data as .json)")
    args = parser.parse_args()
    if not (1 <= args.clients <= 64 and 0 < args.duration_s <= 3600 and args.max_requests >= 1):
        sys.exit("need 1 <= --clients <= 64, 0 < --duration-s <= 3600, --max-requests >= 1")

    timebill, predictor_used = _load(args)
    print(f"length predictor: {predictor_used}", flush=True)
    server, thread, base = _start_server(timebill)
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
    duration = time.perf_counter() - t0
    stuck = sum(c.is_alive() for c in clients)
    metrics = httpx.get(base + "/metrics").text
    server.should_exit = True
    thread.join(30)

    summary = summarise(outcomes, duration)
    summary["clients_stuck"] = stuck
    by_budget = {b: summarise([o for o in outcomes if o.budget_s == b], duration) for b in args.budgets}
    header = (
        f"serve_load: {args.clients} clients, {duration:.0f} s, budgets {args.budgets} s, "
        f"max_tokens {list(MAX_TOKENS)}, {args.stream_share:.0%} streamed, predictor {predictor_used}, "
        f"{timebill.engine.decode_path}, {timebill.engine.threads} threads"
    )
    text = table(summary, by_budget, header)
    print(text)
    server_lines = [ln for ln in metrics.splitlines() if ln.startswith("timebill_") and "_bucket" not in ln]
    print("\nserver /metrics:\n" + "\n".join(server_lines))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n\nserver /metrics:\n" + "\n".join(server_lines) + "\n")
        raw = {"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary}
        raw["by_budget"] = {str(b): s for b, s in by_budget.items()}
        raw["outcomes"] = [asdict(o) for o in outcomes]
        args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
        print(f"\nwrote {args.out} and {args.out.with_suffix('.json')}")
    if summary["lost"] or summary["late_unflagged"] or stuck:
        sys.exit(1)


if __name__ == "__main__":
    main()
