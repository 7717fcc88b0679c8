"""Feature extraction for `timebill rlp train`: one forward per input vs the batched path, side by side.

The RLP and the probe train heads over the frozen target's pooled states, so `rlp train` first runs
the target over every labelled prompt: the full prompt, and for a prompt over N_p tokens its head+tail
truncation. That is hours of CPU for 5,000 prompts. This compares, on a seeded sample of the labelling
prompts and in the same process (alternating, so machine noise hits both):

- ``one-by-one``: one forward per input (the full prompt, then the truncated one when it differs);
- ``batched``: what :func:`timebill.predictor.features.extract_target_features` does — short prompts
  sorted by length in right-padded batches, a long prompt's truncated input run on the full forward's
  cache cropped to the head.

It prints both times, their ratio, and the largest difference between the two feature sets.

    python benchmarks/feature_extraction.py --n 96 --threads 2
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch

from timebill.engine import Engine
from timebill.predictor import features as F
from timebill.predictor.data import labelling_groups, load_sharegpt, split_conversations


def one_by_one(engine: Engine, inputs: list[list[int]], n_keep: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rows = []
    for ids in inputs:
        full = F.target_feature_row(engine.model, ids)
        short = F.truncate_head_tail(ids, n_keep)
        rows.append((full, full if len(short) == len(ids) else F.target_feature_row(engine.model, short)))
    return rows


def batched(engine: Engine, inputs: list[list[int]], n_keep: int) -> list[tuple[np.ndarray, np.ndarray]]:
    full, trunc = F.feature_rows(inputs, engine.model, n_keep)
    return list(zip(full, trunc, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=96, help="prompts sampled from the 5,000 labelling prompts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts = [c for g in labelling_groups(split_conversations(load_sharegpt()), 5000) for c in g]
    sample = random.Random(args.seed).sample(prompts, args.n)
    engine = Engine.load()
    inputs = [engine.encode(c.prompt) for c in sample]
    n_keep = F.DEFAULT_N_PROMPT_TOKENS
    print(
        f"{args.n} prompts, {sum(map(len, inputs))} tokens, {sum(len(i) > n_keep for i in inputs)} over "
        f"N_p = {n_keep}; torch threads {args.threads}"
    )
    for rep in range(args.repeats):
        start = time.perf_counter()
        a = one_by_one(engine, inputs, n_keep)
        t_one = time.perf_counter() - start
        start = time.perf_counter()
        b = batched(engine, inputs, n_keep)
        t_batch = time.perf_counter() - start
        print(f"repeat {rep + 1}: one-by-one {t_one:.1f} s, batched {t_batch:.1f} s, ratio {t_one / t_batch:.2f}x")
    diff = max(float(np.abs(x[k] - y[k]).max()) for x, y in zip(a, b, strict=True) for k in (0, 1))
    scale = max(float(np.abs(x[0]).max()) for x in a)
    print(f"largest feature difference {diff:.2e} (largest feature magnitude {scale:.1f})")


if __name__ == "__main__":
    main()
