"""Closed-loop re-planning vs the paper's one-shot plan, under a slowdown that starts mid-decode.

The paper picks α once, after prefill. If the machine then slows down (another process takes a core),
the one-shot plan's decode no longer fits: the deadline guard cuts the answer. Re-planning compares
the measured pace with the plan every few tokens and evicts more prompt KV when behind, which makes
each remaining step cheaper (t_step = p·N_kv + q: the p·N_kv share is what eviction removes).

Setup, one run: real ShareGPT prompts of 1.5-2k tokens (long prompts, so that the KV share of a step
is large enough to win back a slowdown), N_max tokens, budget = the estimator's e2e time at α = 0 for
N_max tokens (vanilla would just fit on a quiet machine). From decode token 8 on, every step is slowed
by ``--slowdown`` × its predicted time (a sleep in the step hook: deterministic, same for both). The
estimator's online correction is reset before each request, so both start from the same plan.

    flock /tmp/timebill-cpu.lock python benchmarks/replanning.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from timebill.engine import STOP_DEADLINE, STOP_EOS, STOP_MAX_TOKENS, Engine
from timebill.estimator import ExecutionTimeEstimator
from timebill.facade import TimeBill
from timebill.predictor import DEFAULT_PROBE_FILE, load_predictor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from planner_overhead import prompts_by_length  # noqa: E402 - sibling benchmark script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--slowdown", type=float, default=0.15, help="added sleep per step, × the predicted step time")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--out", default="docs/results/replanning.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("$ python " + shlex.join(sys.argv))
    print(f"torch.get_num_threads() = {torch.get_num_threads()}   {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")

    engine = Engine.load(None, threads=args.threads)
    estimator = ExecutionTimeEstimator.for_engine(engine)
    probe = load_predictor(DEFAULT_PROBE_FILE, engine)
    n_max = args.max_new_tokens
    prompts = prompts_by_length(engine, 1536, 2048, args.prompts, args.seed)
    rows = []
    for prompt, n_x in prompts:
        budget = estimator.e2e_s(n_x, 0.0, n_max, recalibrated=False)
        for replan in (False, True):
            estimator.reset_recalibration()
            tb = TimeBill(engine, estimator, probe, arrangement="probe")
            kv = {"n": n_x}

            def slow(i: int, state_kv: dict = kv) -> None:
                if i >= 8:
                    time.sleep(args.slowdown * estimator.step_s(state_kv["n"] + i, recalibrated=False))

            r = tb.generate(prompt, budget, max_new_tokens=n_max, replan=replan, step_hook=slow)
            rows.append(
                {
                    "n_x": n_x,
                    "replan": replan,
                    "budget_s": budget,
                    "e2e_s": r.measured_e2e_s,
                    "stop_reason": r.stop_reason,
                    "completed": r.deadline_met and r.stop_reason in (STOP_EOS, STOP_MAX_TOKENS),
                    "guard_stop": r.stop_reason == STOP_DEADLINE,
                    "late": not r.deadline_met,
                    "tokens": r.generation.tokens_generated,
                    "alpha_plan": r.plan.alpha,
                    "alpha_final": r.alpha,
                    "replans": len(r.replans),
                }
            )
    print(
        f"\n{len(prompts)} real prompts of 1536-2048 tokens, N_max {n_max}, budget = t̂_e2e(α=0, N_max); "
        f"from token 8 each step sleeps {args.slowdown:.0%} of its predicted time"
    )
    print("   plan          completed  guard-stopped  late  tokens (median)  α planned → final (median)  re-plans")
    summary = {}
    for replan in (False, True):
        rs = [r for r in rows if r["replan"] == replan]
        name = "re-planning" if replan else "one-shot"
        summary[name] = {
            "completed": sum(r["completed"] for r in rs),
            "guard_stopped": sum(r["guard_stop"] for r in rs),
            "late": sum(r["late"] for r in rs),
            "tokens_median": statistics.median(r["tokens"] for r in rs),
            "alpha_plan_median": statistics.median(r["alpha_plan"] for r in rs),
            "alpha_final_median": statistics.median(r["alpha_final"] for r in rs),
            "replans": sum(r["replans"] for r in rs),
            "n": len(rs),
        }
        s = summary[name]
        print(
            f"   {name:<12}  {s['completed']:>3}/{s['n']:<3}     {s['guard_stopped']:>3}          {s['late']:>3}"
            f"   {s['tokens_median']:>8.0f}         {s['alpha_plan_median']:.2f} → {s['alpha_final_median']:.2f}"
            f"              {s['replans']}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps({"summary": summary, "rows": rows, "slowdown": args.slowdown}, indent=1))
    tmp.replace(out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
