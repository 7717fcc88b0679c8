"""ETE accuracy on this machine: the profile's held-out MAPE, then end-to-end error on real requests.

Part 1 prints the profile's held-out MAPE (grid points not used for fitting) next to the measured
noise floor. Part 2 runs ``--prompts`` real prompts (Python standard-library documentation, wrapped in
varied instructions, 50-3000 tokens), generates greedily through ``Engine.generate`` and compares the
measured request time with t̂_e2e(N_x, α, N) evaluated at the *true* number of generated tokens N:

    error = |t̂_e2e − t_e2e| / t_e2e

Two estimates are reported: the static profile, and the profile with online recalibration (each
request is estimated *before* its own measurement is observed). Requests cycle through ``--alphas``.

    flock /tmp/timebill-cpu.lock python benchmarks/ete_accuracy.py

Needs a profile for the setup (``timebill profile``). No network.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from timebill.engine import Engine
from timebill.estimator import ExecutionTimeEstimator, format_profile_report
from timebill.estimator.profiler import ContentionMeter, wait_for_quiet

INSTRUCTIONS = (
    "Summarise the following documentation in a few sentences.",
    "Explain what the following Python documentation describes to a beginner.",
    "List the three most important points of this text.",
    "Write one question a student might ask after reading this, then answer it.",
    "What is the main purpose of the module described below?",
    "Rewrite the following text as a short bulleted list.",
)
STDLIB_PACKAGES = (
    "argparse", "asyncio", "collections", "concurrent", "contextlib", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email", "enum", "fractions", "functools", "heapq", "http", "inspect",
    "ipaddress", "itertools", "json", "logging", "multiprocessing", "pathlib", "pickle", "pprint",
    "queue", "random", "re", "sched", "secrets", "shutil", "socket", "sqlite3", "statistics", "string",
    "subprocess", "tarfile", "textwrap", "threading", "timeit", "typing", "unittest", "urllib", "uuid",
    "xml", "zipfile",
)  # fmt: skip


def stdlib_documents() -> list[str]:
    """Docstrings of standard-library modules, classes and functions: real, varied English (no I/O)."""
    docs: list[str] = []
    seen: set[int] = set()
    for name in STDLIB_PACKAGES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        modules = [mod]
        for info in pkgutil.iter_modules(getattr(mod, "__path__", []) or [], prefix=f"{name}."):
            if "test" in info.name or info.name.endswith("__main__"):
                continue
            try:
                modules.append(importlib.import_module(info.name))
            except Exception:  # noqa: BLE001 - some submodules need optional C extensions
                continue
        for m in modules:
            for obj in [
                m,
                *(v for _, v in inspect.getmembers(m) if inspect.isclass(v) or inspect.isfunction(v)),
            ]:
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 200 and id(doc) not in seen:
                    seen.add(id(doc))
                    docs.append(doc)
    return docs


def real_prompts(engine: Engine, count: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    """``count`` chat-formatted prompts with prompt lengths spread log-uniformly over [lo, hi] tokens."""
    rng = random.Random(seed)
    docs = stdlib_documents()
    rng.shuffle(docs)
    pool = "\n\n".join(docs)
    pool_ids = engine.tokenizer.encode(pool, add_special_tokens=False)
    prompts = []
    for i in range(count):
        target = round(lo * (hi / lo) ** (i / max(1, count - 1)))
        start = rng.randrange(0, max(1, len(pool_ids) - hi))
        instruction = INSTRUCTIONS[i % len(INSTRUCTIONS)]
        body_len = max(8, target - 40)  # chat template + instruction take ~40 tokens
        body = engine.tokenizer.decode(pool_ids[start : start + body_len])
        prompts.append(engine.encode(f"{instruction}\n\n{body}"))
    rng.shuffle(prompts)  # lengths in random order: slow drift of the machine does not follow N_x
    return prompts


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", help="profile JSON (default: the saved one for this setup)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--min-tokens", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=3000)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--alphas", default="0,0.25,0.5,0.75")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=10.0,
        help="seconds to wait for neighbours to go quiet per request",
    )
    parser.add_argument("--json", help="write per-request results here")
    args = parser.parse_args()

    print("$ " + " ".join(shlex.quote(a) for a in ["python", *sys.argv]))
    engine = Engine.load(None, threads=args.threads)
    print(f"torch.get_num_threads() = {torch.get_num_threads()}   decode path = {engine.decode_path}")
    est = ExecutionTimeEstimator.for_engine(engine, path=args.profile)
    assert est.profile is not None
    print("\n=== Part 1: the profile (held-out grid points) ===")
    print(format_profile_report(est.profile))

    alphas = [float(a) for a in args.alphas.split(",")]
    prompts = real_prompts(engine, args.prompts, args.min_tokens, args.max_tokens, args.seed)
    print(f"\n=== Part 2: {len(prompts)} real prompts, greedy, max_new_tokens={args.max_new_tokens} ===")
    print(
        f"{'#':>3} {'N_x':>5} {'alpha':>5} {'kept':>5} {'N':>4} {'stop':>10} {'t_e2e s':>8} "
        f"{'static s':>8} {'err %':>6} {'recal s':>8} {'err %':>6} {'others':>6}"
    )
    rows = []
    meter = ContentionMeter()
    t_run = time.perf_counter()
    for i, ids in enumerate(prompts):
        alpha = alphas[i % len(alphas)]
        if args.quiet_wait > 0:
            wait_for_quiet(0.2, args.quiet_wait)
        meter.start()
        result = engine.generate(ids, alpha=alpha, max_new_tokens=args.max_new_tokens)
        others = meter.stop()
        n_x, n = result.prompt_tokens, result.tokens_generated
        static = est.e2e_s(n_x, alpha, n, recalibrated=False)
        recal = est.e2e_s(n_x, alpha, n)  # before this request is observed
        scales = est.scales()
        est.observe(result)
        err_s = (static - result.total_s) / result.total_s
        err_r = (recal - result.total_s) / result.total_s
        rows.append(
            {
                "n_x": n_x,
                "alpha": alpha,
                "kept": result.kept_kv_tokens,
                "n": n,
                "stop": result.stop_reason,
                "t_e2e_s": result.total_s,
                "prefill_s": result.prefill_s,
                "evict_s": result.evict_s,
                "decode_s": result.decode_s,
                "static_s": static,
                "recal_s": recal,
                "err_static": err_s,
                "err_recal": err_r,
                "others_cores": others,
                "est_prefill_s": est.prefill_s(n_x, recalibrated=False),
                "scale_prefill": scales["prefill"],
                "scale_step": scales["step"],
            }
        )
        print(
            f"{i:>3} {n_x:>5} {alpha:>5.2f} {result.kept_kv_tokens:>5} {n:>4} {result.stop_reason:>10} "
            f"{result.total_s:>8.3f} {static:>8.3f} {100 * err_s:>+6.1f} {recal:>8.3f} {100 * err_r:>+6.1f} "
            f"{others:>6.2f}",
            flush=True,
        )

    def summary(label: str, key: str, subset: list[dict]) -> None:
        errs = [abs(r[key]) for r in subset]
        signed = [r[key] for r in subset]
        print(
            f"  {label:<34} n={len(subset):>2}  median {100 * statistics.median(errs):5.2f}%  "
            f"p90 {100 * pct(errs, 0.9):5.2f}%  mean {100 * statistics.fmean(errs):5.2f}%  "
            f"bias {100 * statistics.median(signed):+5.2f}%"
        )

    print(f"\nend-to-end |t̂_e2e − t_e2e| / t_e2e with the true length N ({time.perf_counter() - t_run:.0f} s):")
    summary("static profile", "err_static", rows)
    summary("recalibrated online", "err_recal", rows)
    quiet = [r for r in rows if r["others_cores"] <= 0.2]
    if quiet and len(quiet) < len(rows):
        summary("static, uncontended requests only", "err_static", quiet)
    for alpha in alphas:
        summary(f"static, alpha={alpha:g}", "err_static", [r for r in rows if r["alpha"] == alpha])
    pre_err = [abs(r["est_prefill_s"] - r["prefill_s"]) / r["prefill_s"] for r in rows]
    print(f"  prefill alone (static): median {100 * statistics.median(pre_err):.2f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
