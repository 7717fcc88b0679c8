"""Decode-step attention of the labelling batch: masked over the padded width vs each row's own span.

A :class:`timebill.predictor.batch_decode.ContinuousBatch` is as wide as its longest row; rows are
right-aligned. This times, side by side in one run, the attention of one decode step over all
layers (SmolLM2-135M shapes: 3 KV heads x 3 query heads each, head dim 64, 30 layers) done
(a) as one SDPA call with the padding mask, as HF does, and (b) as the labeller now does it
(:func:`timebill.predictor.batch_decode._grouped_sdpa`: one unpadded call per row).

    python benchmarks/labelling_attention.py --threads 1 --rows 32 --width 2000
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from timebill.predictor.batch_decode import _grouped_sdpa


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--width", type=int, default=2000)
    parser.add_argument("--min-real", type=int, default=300, help="shortest row (tokens); rows are uniform up to width")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kv_heads, groups, dim = 3, 3, 64
    module = torch.nn.Module()
    module.num_key_value_groups = groups
    query = torch.randn(args.rows, kv_heads * groups, 1, dim)
    key = torch.randn(args.rows, kv_heads, args.width, dim)
    value = torch.randn(args.rows, kv_heads, args.width, dim)
    lengths = torch.randint(args.min_real, args.width + 1, (args.rows,))
    mask = (torch.arange(args.width)[None, :] >= (args.width - lengths)[:, None])[:, None, None, :]
    scale = dim**-0.5
    grouped = query.reshape(args.rows, kv_heads, groups, dim)

    def masked() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scale)

    def per_row() -> torch.Tensor:
        return _grouped_sdpa(module, query, key, value, mask, scaling=scale)[0]

    diff = (masked().reshape(args.rows, 1, -1, dim) - per_row()).abs().max().item()
    times: dict[str, list[float]] = {"masked, padded width": [], "per row, own span": []}
    for _ in range(args.repeats):  # interleaved, so drift in the machine's load hits both alike
        for name, fn in (("masked, padded width", masked), ("per row, own span", per_row)):
            t0 = time.perf_counter()
            for _ in range(args.layers):
                fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    real = lengths.sum().item() / (args.rows * args.width)
    print(f"rows {args.rows}, width {args.width}, real columns {real:.0%}, {args.threads} thread(s)")
    print(f"max |difference| between the two: {diff:.1e}")
    base = statistics.median(times["masked, padded width"])
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:22s} {med:8.1f} ms per step ({args.layers} layers), {base / med:.2f}x")


if __name__ == "__main__":
    main()
