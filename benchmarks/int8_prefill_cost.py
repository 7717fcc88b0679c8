"""Is an int8 prefill (VNNI) a candidate for the per-host choice? Speed and fidelity against fp32 and bf16.

    flock /tmp/timebill-cpu.lock python benchmarks/int8_prefill_cost.py --threads 2 [--model M]

Why this exists: issue #28 lists "fp32 vs bf16 / int8 prefill matmuls where native" among the per-host
candidates, and on a CPU with AVX512-VNNI a large int8 ``torch._int_mm`` runs well above bf16's peak.
The library's int8 linear for activations that are not known in advance is PyTorch's dynamic quantisation
(``torch.ao.quantization.quantize_dynamic``: fbgemm, int8 weights per channel, the activation quantised
per tensor on the fly). This script builds that copy of the model's decoder layers beside fp32 and bf16
copies and times one prefill forward of the same real text in each (best of ``--repeats``, interleaved),
and compares each one's last-token logits with fp32's: cosine similarity and whether the greedy next
token is the same. A candidate that is faster but moves the logits far more than bf16 does is not one that
"keeps the mode's quality", so the choice (``timebill.kernels``) only offers what this shows is safe.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from timebill.engine import Engine
from timebill.estimator.store import host_fingerprint
from timebill.kernels import cpu_capability

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_speed import real_text_ids  # noqa: E402 - sibling benchmark script


def int8_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose decoder-layer linears are fbgemm dynamic-int8 (the LM head stays fp32)."""
    q = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
        torch.ao.quantization.quantize_dynamic(q.model.layers, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return q.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.load(args.model, threads=args.threads, prefill="float32")
    models = {"fp32": engine.model, "bf16": copy.deepcopy(engine.model).to(torch.bfloat16).eval()}
    models["int8"] = int8_copy(engine.model)
    print(
        f"# int8_prefill_cost  host={host_fingerprint()}  {cpu_capability()}  threads={args.threads}  "
        f"torch={torch.__version__}  model={engine.source.model_id}  date={time.strftime('%Y-%m-%d %H:%M')}"
    )
    print(f"# command: {' '.join(sys.argv)}")
    print()
    header = ("N", "config", "prefill ms", "x fp32", "x bf16", "logit cos", "same next token")
    print(" ".join(f"{h:{w}}" for h, w in zip(header, (">6", "<6", ">11", ">7", ">7", ">10", ">16"), strict=True)))
    for n in args.lengths:
        ids = torch.tensor([real_text_ids(engine, n)])
        best = dict.fromkeys(models, float("inf"))
        logits: dict[str, torch.Tensor] = {}
        with torch.inference_mode():
            for model in models.values():  # warm-up: one-off allocation and kernel selection
                model(input_ids=ids, use_cache=True, logits_to_keep=1)
            for _ in range(args.repeats):
                for name, model in models.items():
                    t0 = time.perf_counter()
                    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                    best[name] = min(best[name], time.perf_counter() - t0)
                    logits[name] = out.logits[0, -1].float()
        for name in models:
            cos = float(nn.functional.cosine_similarity(logits[name], logits["fp32"], dim=0))
            same = int(logits[name].argmax()) == int(logits["fp32"].argmax())
            print(
                f"{n:>6} {name:<6} {1e3 * best[name]:>11.0f} {best['fp32'] / best[name]:>7.2f} "
                f"{best['bf16'] / best[name]:>7.2f} {cos:>10.4f} {'yes' if same else 'no':>16}"
            )
    print("(prefill: best of repeats of one forward, logits_to_keep=1; cos: last-token logits vs fp32's)")


if __name__ == "__main__":
    main()
