"""Quick ETE profile of the default model's architecture on a CUDA GPU, and its held-out MAPE.

Why random weights: execution time depends on the shapes (config), not on the values of the weights,
and the machines we borrow GPUs on cannot receive the 98 MB GGUF. So the script builds the model
from the default model's ``config.json`` (and tokenizer, for real prompt text) with random weights,
in fp32 on the GPU, and times the engine's own production code path (HF prefill + kvpress scoring,
eviction, HF decode step; the CPU fast path does not run on CUDA) with CUDA synchronisation around
every timed region. With real weights (``--model``), the same script profiles them.

    python benchmarks/gpu_profile.py --config-dir DIR_WITH_CONFIG_AND_TOKENIZER [--out OUTDIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from timebill.engine import Engine
from timebill.errors import ProfileError
from timebill.estimator import profile_engine
from timebill.estimator.profiler import ProfileGrid
from timebill.estimator.report import format_profile_report
from timebill.estimator.store import save_profile
from timebill.loading import ModelSource


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-dir", required=True, help="directory with config.json and tokenizer files")
    parser.add_argument("--out", default=".", help="where to write the profile JSON and report")
    parser.add_argument("--grid", choices=["tiny", "quick", "full"], default="quick")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device: this script profiles a GPU")

    t0 = time.perf_counter()
    config = AutoConfig.from_pretrained(args.config_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.config_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(args.device).eval()
    source = ModelSource(f"{Path(args.config_dir).name}-random-init", args.config_dir, None, "random-init")
    engine = Engine(model, tokenizer, source, threads=torch.get_num_threads(), fast=False)
    engine.warmup()
    grids = {"tiny": ProfileGrid.tiny, "quick": ProfileGrid.quick, "full": ProfileGrid.full}
    grid = grids[args.grid]() if args.grid == "tiny" else grids[args.grid](engine.context_length)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"# gpu_profile on {name}  torch={torch.__version__}  grid={grid.name}")
    print(f"# command: {' '.join(sys.argv)}")
    profile = profile_engine(engine, grid, progress=False)
    print(format_profile_report(profile))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        save_profile(profile, out / "gpu_profile.json")
    except ProfileError as exc:  # e.g. a held-out MAPE of inf on a grid too small to hold points out
        print(f"profile not saved: {exc}")
    (out / "gpu_report.json").write_text(json.dumps(profile.report, indent=1, default=str))
    print(f"total wall time {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
