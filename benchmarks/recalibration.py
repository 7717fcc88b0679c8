"""Online recalibration under drift: a busy process takes a core mid-run; static vs corrected estimate.

A fixed stream of requests runs in three phases: quiet, then with a CPU-bound busy loop pinned to the
last core (``--duty`` of each 10 ms period spinning), then quiet again. Before each request the
estimator predicts its end-to-end time at the true length twice — from the static profile, and with
the online correction learnt from the requests so far — and after it, ``observe(result)`` feeds the
measured prefill and step times to the recalibrator. The static error jumps when the load starts;
the corrected one follows within a request or two and recovers when the load stops.

    flock /tmp/timebill-cpu.lock python benchmarks/recalibration.py

Bounded time: ``--per-phase`` requests of ~``--prompt-tokens`` tokens and ``--max-new-tokens`` tokens.
The ``others`` column is the CPU (in cores) that processes *other than this one* used during the
request, as /proc/stat saw it: the busy loop shows as ~1.0, and so does any neighbour's job.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import time

import torch

from timebill.engine import Engine
from timebill.estimator import ExecutionTimeEstimator
from timebill.estimator.profiler import ContentionMeter, prompt_ids

BUSY_LOOP = """
import os, sys, time
cpu, duty = int(sys.argv[1]), float(sys.argv[2])
os.sched_setaffinity(0, {cpu})
period = 0.01
while True:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < duty * period:
        pass
    if duty < 1.0:
        time.sleep((1.0 - duty) * period)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", help="profile JSON (default: the saved one for this setup)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--per-phase", type=int, default=10, help="requests per phase")
    parser.add_argument("--prompt-tokens", type=int, default=600)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--duty", type=float, default=1.0, help="busy fraction of the loading process")
    args = parser.parse_args()

    print("$ " + " ".join(shlex.quote(a) for a in ["python", *sys.argv]))
    engine = Engine.load(None, threads=args.threads)
    print(f"torch.get_num_threads() = {torch.get_num_threads()}   decode path = {engine.decode_path}")
    # A busy loop next to a 2-thread OpenMP team can slow it far more than 2× (barriers wait for the
    # descheduled thread), so the correction may exceed the estimator's default 4× bound here.
    est = ExecutionTimeEstimator.for_engine(engine, path=args.profile, recalibration_clip=(0.25, 16.0))
    cpus = sorted(os.sched_getaffinity(0))
    ids = prompt_ids(engine, args.prompt_tokens + 64)

    phases = ["quiet"] * args.per_phase + ["loaded"] * args.per_phase + ["quiet after"] * args.per_phase
    print(
        f"{'#':>3} {'phase':<11} {'N_x':>5} {'N':>3} {'t_e2e s':>8} {'static s':>8} {'err %':>7} "
        f"{'recal s':>8} {'err %':>7} {'scale pre':>9} {'scale step':>10} {'others':>6}"
    )
    meter = ContentionMeter()
    busy: subprocess.Popen | None = None
    rows = []
    t_run = time.perf_counter()
    try:
        for i, phase in enumerate(phases):
            if phase == "loaded" and busy is None:
                busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(cpus[-1]), str(args.duty)])
                time.sleep(0.5)
                print(f"--- busy loop started on cpu {cpus[-1]} (duty {args.duty:g}) ---")
            if phase == "quiet after" and busy is not None:
                busy.kill()
                busy.wait()
                busy = None
                print("--- busy loop stopped ---")
            n_x = args.prompt_tokens + (i % 4) * 16  # a little variety; same order every run
            prompt = ids[i % 64 : i % 64 + n_x]
            meter.start()
            result = engine.generate(prompt, alpha=args.alpha, max_new_tokens=args.max_new_tokens)
            others = meter.stop()
            n = result.tokens_generated
            static = est.e2e_s(n_x, args.alpha, n, recalibrated=False)
            recal = est.e2e_s(n_x, args.alpha, n)
            scales = est.scales()
            est.observe(result)
            err_s = 100 * (static - result.total_s) / result.total_s
            err_r = 100 * (recal - result.total_s) / result.total_s
            rows.append((phase, err_s, err_r))
            print(
                f"{i:>3} {phase:<11} {n_x:>5} {n:>3} {result.total_s:>8.3f} {static:>8.3f} {err_s:>+7.1f} "
                f"{recal:>8.3f} {err_r:>+7.1f} {scales['prefill']:>9.2f} {scales['step']:>10.2f} {others:>6.2f}",
                flush=True,
            )
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()

    print(f"\nmedian |error| per phase ({time.perf_counter() - t_run:.0f} s):")
    print(f"  {'phase':<12} {'static':>8} {'recalibrated':>13}   (after the first 2 requests of a phase)")
    for phase in ("quiet", "loaded", "quiet after"):
        sel = [r for r in rows if r[0] == phase][2:]
        if sel:
            s = statistics.median(abs(r[1]) for r in sel)
            c = statistics.median(abs(r[2]) for r in sel)
            print(f"  {phase:<12} {s:>7.1f}% {c:>12.1f}%")


if __name__ == "__main__":
    main()
