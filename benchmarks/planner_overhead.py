"""What planning costs a request, and whether the deadline holds: the numbers of the request-path issue.

Three parts, one run, real ShareGPT prompts the predictors were not trained on (test split and pool):

1. **α\\* computation**: the planner's closed form (``planner.plan``) timed over many random requests.
2. **Arrangements** of the length prediction and the prefill, on prompts of ≥ 1k tokens: ``probe``
   (a head on the target's own last prompt state: no second model), ``parallel`` (the paper's
   RLP in a thread beside the prefill; on 2 cores they compete) and ``sequential`` (RLP, then
   prefill). Overhead = everything between the request's start and its first decode step except
   the prefill itself (prediction not hidden by the prefill, α\\*, eviction, decode set-up), as a
   share of the budget.
3. **The deadline**, over ``--requests`` real prompts at tight budgets (the hard guard on): how many
   ran past their budget (must be 0), how many the guard stopped (partial answers), how many were
   refused up front as infeasible.

    flock /tmp/timebill-cpu.lock python benchmarks/planner_overhead.py --threads 2

Needs the profile (``timebill profile``) and the shipped predictors (``timebill rlp train``).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from timebill import planner
from timebill.engine import STOP_DEADLINE, Engine
from timebill.errors import InfeasibleBudgetError
from timebill.estimator import ExecutionTimeEstimator
from timebill.facade import TimeBill
from timebill.predictor import DEFAULT_PROBE_FILE, DEFAULT_RLP_FILE, load_predictor
from timebill.predictor.data import load_sharegpt, split_conversations


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def time_alpha_star(estimator: ExecutionTimeEstimator, n: int, seed: int) -> dict[str, float]:
    coef = estimator.coefficients()
    rng = random.Random(seed)
    cases = [
        (rng.randint(16, 6000), rng.uniform(0.2, 20.0), rng.uniform(1, 400), rng.choice([64, 256, 1024]))
        for _ in range(n)
    ]
    samples = []
    for n_x, budget, n_hat, n_max in cases:
        t0 = time.perf_counter()
        planner.plan(coef, n_x, budget, n_hat, n_max=n_max)
        samples.append(time.perf_counter() - t0)
    return {"median_us": statistics.median(samples) * 1e6, "p99_us": pct(samples, 0.99) * 1e6, "n": n}


def prompts_by_length(engine: Engine, lo: int, hi: int, count: int, seed: int) -> list[tuple[str, int]]:
    """Real first-turn ShareGPT prompts (test split, then the unlabelled pool) of lo..hi template tokens."""
    splits = split_conversations(load_sharegpt())
    pool = list(splits["test"]) + list(splits["pool"])
    random.Random(seed).shuffle(pool)
    out = []
    for conv in pool:
        n = len(engine.encode(conv.prompt))
        if lo <= n <= hi:
            out.append((conv.prompt, n))
            if len(out) == count:
                break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=100, help="Deadline part: real prompts at tight budgets.")
    ap.add_argument("--long-prompts", type=int, default=10, help="Arrangement part: prompts of >= 1k tokens.")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/results/planner_overhead.json")
    ap.add_argument("--skip-arrangements", action="store_true", help="Parts 1 and 3 only (part 2 takes ~7 min).")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("$ python " + shlex.join(sys.argv))
    print(f"torch.get_num_threads() = {torch.get_num_threads()}   {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")

    engine = Engine.load(None, threads=args.threads)
    estimator = ExecutionTimeEstimator.for_engine(engine)
    probe = load_predictor(DEFAULT_PROBE_FILE, engine)
    rlp = load_predictor(DEFAULT_RLP_FILE, engine)
    report: dict = {"threads": args.threads, "decode_path": engine.decode_path}

    # 1. alpha* computation ------------------------------------------------------------------------
    alpha = time_alpha_star(estimator, 20_000, args.seed)
    report["alpha_star"] = alpha
    print(f"\n1. α* closed form: median {alpha['median_us']:.1f} µs, p99 {alpha['p99_us']:.1f} µs ({alpha['n']} plans)")

    # 2. arrangements on >= 1k-token prompts ------------------------------------------------------
    long_prompts = [] if args.skip_arrangements else prompts_by_length(engine, 1024, 2048, args.long_prompts, args.seed)
    n_max = args.max_new_tokens
    arrangements = {"probe": probe, "parallel": rlp, "sequential": rlp}
    rows: dict[str, list[dict]] = {name: [] for name in arrangements}
    for prompt, n_x in long_prompts:
        # A budget that fits the full N_max at α = 0 with some room: the overhead share is then honest
        # (a budget cut down to the bone would inflate it), and every arrangement gets the same one.
        budget = 1.25 * estimator.e2e_s(n_x, 0.0, n_max)
        for name, predictor in arrangements.items():
            tb = TimeBill(engine, estimator, predictor, arrangement=name, replan=False)
            r = tb.generate(prompt, budget, max_new_tokens=n_max)
            rows[name].append(
                {
                    "n_x": n_x,
                    "budget_s": budget,
                    "overhead_s": r.overhead_s,
                    "t_predict_s": r.t_predict_s,
                    "plan_compute_s": r.plan_compute_s,
                    "prefill_s": r.measured_prefill_s,
                    "e2e_s": r.measured_e2e_s,
                    "n_hat": r.plan.n_hat,
                    "alpha": r.plan.alpha,
                    "deadline_met": r.deadline_met,
                }
            )
    if args.skip_arrangements:
        rows = {}
    print(f"\n2. arrangements, {len(long_prompts)} real prompts of 1024-2048 tokens, N_max {n_max}, budget 1.25×t̂(α=0)")
    print(
        "   arrangement  overhead med/max (ms)  overhead/budget med/max  t_predict med (ms)  prefill med (s)"
        "  e2e med (s)"
    )
    summary = {}
    for name, rs in rows.items():
        over = [r["overhead_s"] for r in rs]
        share = [r["overhead_s"] / r["budget_s"] for r in rs]
        summary[name] = {
            "overhead_ms_median": statistics.median(over) * 1e3,
            "overhead_ms_max": max(over) * 1e3,
            "overhead_share_median": statistics.median(share),
            "overhead_share_max": max(share),
            "t_predict_ms_median": statistics.median(r["t_predict_s"] for r in rs) * 1e3,
            "prefill_s_median": statistics.median(r["prefill_s"] for r in rs),
            "e2e_s_median": statistics.median(r["e2e_s"] for r in rs),
        }
        s = summary[name]
        print(
            f"   {name:<11}  {s['overhead_ms_median']:8.1f} / {s['overhead_ms_max']:7.1f}      "
            f"{s['overhead_share_median']:6.2%} / {s['overhead_share_max']:6.2%}     {s['t_predict_ms_median']:10.1f}"
            f"       {s['prefill_s_median']:8.3f}       {s['e2e_s_median']:7.3f}"
        )

    def cost_s(name: str) -> float:
        return summary[name]["e2e_s_median"] + summary[name]["overhead_ms_median"] / 1e3

    fastest = min(summary, key=cost_s) if summary else "skipped"
    print(f"   fastest arrangement (lowest median overhead + e2e): {fastest}")
    report["arrangements"] = {"summary": summary, "rows": rows, "fastest": fastest}

    # 3. the deadline at tight budgets -------------------------------------------------------------
    prompts = prompts_by_length(engine, 16, 2048, args.requests, args.seed + 1)
    tb = TimeBill(engine, estimator, probe, arrangement="probe")
    taus = (0.15, 0.3, 0.5)  # share of the α = 0 decode time the budget leaves beyond prefill
    results = []
    for i, (prompt, n_x) in enumerate(prompts):
        tau = taus[i % len(taus)]
        budget = estimator.prefill_s(n_x) * 1.15 + tau * estimator.decode_phase_s(n_x, n_max)
        try:
            r = tb.generate(prompt, budget, max_new_tokens=n_max)
        except InfeasibleBudgetError:
            results.append({"n_x": n_x, "tau": tau, "budget_s": budget, "refused": True})
            continue
        results.append(
            {
                "n_x": n_x,
                "tau": tau,
                "budget_s": budget,
                "refused": False,
                "e2e_s": r.measured_e2e_s,
                "late_s": r.measured_e2e_s - budget,
                "deadline_met": r.deadline_met,
                "guard_stop": r.stop_reason == STOP_DEADLINE,
                "stop_reason": r.stop_reason,
                "alpha": r.alpha,
                "replans": len(r.replans),
                "feasible": r.plan.feasible,
                "tokens": r.generation.tokens_generated,
            }
        )
    ran = [r for r in results if not r["refused"]]
    late = [r for r in ran if not r["deadline_met"]]
    guard = [r for r in ran if r["guard_stop"]]
    slack = [r["budget_s"] - r["e2e_s"] for r in ran]
    deadline = {
        "requests": len(results),
        "refused_infeasible": len(results) - len(ran),
        "ran": len(ran),
        "late": len(late),
        "guard_stopped": len(guard),
        "guard_share": len(guard) / max(1, len(ran)),
        "replanned": sum(r["replans"] > 0 for r in ran),
        "slack_s_median": statistics.median(slack) if slack else float("nan"),
        "slack_s_min": min(slack) if slack else float("nan"),
        "alpha_median": statistics.median(r["alpha"] for r in ran) if ran else float("nan"),
    }
    print(f"\n3. deadline, {len(results)} real prompts (16-2048 tokens), N_max {n_max}, budgets = 1.15×t̂_prefill")
    print(f"   + τ×t̂_decode(α=0) with τ in {taus} (tight: vanilla would need τ = 1), probe arrangement, re-planning on")
    print(
        f"   ran {deadline['ran']}, refused up front {deadline['refused_infeasible']}, LATE {deadline['late']}, "
        f"guard-stopped {deadline['guard_stopped']} ({deadline['guard_share']:.1%}), re-planned {deadline['replanned']}"
    )
    print(
        f"   slack (budget − e2e): median {deadline['slack_s_median']:.3f} s, min {deadline['slack_s_min']:.4f} s; "
        f"median α {deadline['alpha_median']:.2f}"
    )
    report["deadline"] = {"summary": deadline, "rows": results}

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
