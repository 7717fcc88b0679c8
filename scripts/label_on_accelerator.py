"""Label exported prompts with the target model's greedy response lengths on a CUDA GPU.

Why this exists: a label is the target's own response length (§2 of the method), ~600 generated
tokens per ShareGPT prompt for SmolLM2-135M — about 6 hours of this project's 2-core CPU for 5,000
prompts, minutes on one GPU. GPU machines we borrow run their own torch/transformers and cannot see
PyPI, so this script needs only ``torch`` and ``transformers`` (+ ``gguf`` for a GGUF model) and no
``timebill`` import: ``timebill rlp export`` writes the prompts already tokenized by the project's
engine, this script writes a label file in the project's format, and ``timebill rlp merge`` takes it
back (printing how often GPU and CPU labels of the same prompt agree).

Fidelity: float32 weights and activations, TF32 off (Hopper would otherwise round matmul inputs to
10 mantissa bits), greedy argmax, the export's stop ids and pad id, length counted up to and including
the first stop token, ``cap`` when none came. Batched GPU arithmetic still differs from the CPU's in
the last bits, so near-ties can flip a greedy continuation: the merge reports the agreement rate.

Speed: one ``model.generate`` per static batch of similar-length prompts (sorted, so padding is
small); most batches run to the cap anyway (58 % of SmolLM2's answers hit 1024 tokens), so continuous
batching would buy little. A decode step of a 135M model is CPU-bound (kernel launches), so several
worker processes share the GPU. Batches are shuffled within each priority tier so a run cut short
leaves a random, not a length-biased, subset; ``--time-limit`` stops taking batches in time to write
everything back. Resumable: rerun with the same ``--out`` and labelled prompts are skipped.

    python scripts/label_on_accelerator.py --prompts prompts.jsonl --gguf model.gguf --out labels.jsonl

On a borrowed GPU machine (what a first attempt, 2026-11-28, learned the hard way — it labelled nothing):
- ``gguf`` must arrive as an installed distribution (a wheel, or the package folder plus a
  ``gguf-<version>.dist-info/METADATA``): transformers reads its version from the metadata and
  fails with "Invalid version: 'N/A'" on a bare copy of the package;
- run a probe first (``--limit 512 --time-limit 60``): the ``ms/step`` lines show within a minute
  whether the full run fits the time left;
- leave no background process holding the command's stdout (a ``while sleep`` monitor kept a
  finished command alive until its timeout).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import random
import sys
import time
from pathlib import Path


def read_prompts(path: Path) -> tuple[dict, list[dict]]:
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    if header.get("format") != "timebill-label-prompts/1":
        sys.exit(f"{path} is not a `timebill rlp export` file")
    return header, [json.loads(line) for line in lines[1:] if line.strip()]


def done_indices(out: Path) -> set[int]:
    """Indices already in ``out``; a torn last line (killed mid-write) is dropped from the file."""
    if not out.exists():
        return set()
    raw = out.read_bytes()
    complete, _, tail = raw.rpartition(b"\n")
    if tail:
        out.write_bytes(complete + b"\n")
    lines = complete.split(b"\n")[1:] if complete else []
    return {json.loads(line)["index"] for line in lines if line.strip()}


def make_batches(prompts: list[dict], cap: int, token_budget: int, max_rows: int, first: int) -> list[list[dict]]:
    """Length-sorted batches with rows x (longest + cap) <= token_budget (the KV cache's size)."""
    tiers = [prompts[:first], prompts[first:]]
    rng = random.Random(0)
    batches: list[list[dict]] = []
    for tier in tiers:
        batch: list[dict] = []
        found: list[list[dict]] = []
        for p in sorted(tier, key=lambda p: len(p["ids"])):
            rows = len(batch) + 1
            if batch and (rows > max_rows or rows * (len(p["ids"]) + cap) > token_budget):
                found.append(batch)
                batch = []
            batch.append(p)
        if batch:
            found.append(batch)
        rng.shuffle(found)
        batches += found
    return batches


def worker(rank: int, args: argparse.Namespace, header: dict, tasks, results, deadline: float) -> None:  # noqa: ANN001
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, StoppingCriteria
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_num_threads(1)  # the GPU does the work; spinning OpenMP pools starve the launching threads
    device = torch.device(args.device)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).to(device).eval()
    stop_ids = list(header["stop_token_ids"])
    pad = int(header["pad_token_id"])
    cap = int(header["label_header"]["cap_tokens"])
    config = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=cap, eos_token_id=stop_ids, pad_token_id=pad, disable_compile=True
    )

    class StepReporter(StoppingCriteria):
        """Never stops generation; reports the decode step rate so a slow setup shows within a minute."""

        def __init__(self) -> None:
            self.steps, self.t0 = 0, time.time()

        def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:  # noqa: ANN001, ANN003
            self.steps += 1
            if self.steps % args.report_every == 0:
                per_step = (time.time() - self.t0) / self.steps
                results.put(("steps", rank, self.steps, per_step, input_ids.shape[0]))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def run(batch: list[dict]) -> list[tuple[int, int, str, int]]:
        longest = max(len(p["ids"]) for p in batch)
        ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, longest - len(p["ids"]) :] = torch.tensor(p["ids"])
            mask[row, longest - len(p["ids"]) :] = 1
        try:
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    generation_config=config,
                    stopping_criteria=[StepReporter()],
                )
        except torch.OutOfMemoryError:
            if len(batch) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(batch) // 2
            return run(batch[:half]) + run(batch[half:])
        labels = []
        for p, row in zip(batch, out[:, longest:].tolist(), strict=True):
            first = next((i for i, t in enumerate(row) if t in stop_ids), None)
            if first is None:
                labels.append((p["index"], cap, "max_tokens", len(p["ids"])))
            else:
                labels.append((p["index"], first + 1, "eos", len(p["ids"])))
        return labels

    results.put(("ready", rank, time.time()))
    durations: list[float] = []
    errors = 0
    while True:
        try:
            batch = tasks.get(timeout=1)
        except queue.Empty:
            break
        expected = max(durations) if durations else 0.0
        if time.time() + expected > deadline:
            results.put(("stopped", rank, len(batch)))
            break
        t0 = time.time()
        try:
            labels = run(batch)
        except Exception as exc:  # noqa: BLE001 - report it, keep the other batches going
            errors += 1
            results.put(("error", rank, f"{type(exc).__name__}: {exc}"[:2000]))
            if errors >= 3:
                break
            continue
        durations.append(time.time() - t0)
        results.put(("labels", rank, labels, durations[-1]))
    results.put(("done", rank, None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", required=True, type=Path, help="file written by `timebill rlp export`")
    parser.add_argument("--gguf", required=True, help="the target model's .gguf file")
    parser.add_argument("--gguf-sha256", help="refuse to run unless the file has this SHA-256")
    parser.add_argument("--out", required=True, type=Path, help="label file to write (resumed if present)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workers", type=int, default=4, help="processes sharing the GPU")
    parser.add_argument("--work-dir", type=Path, help="where to put the converted model (default: beside --out)")
    parser.add_argument("--report-every", type=int, default=128, help="decode steps between progress lines")
    parser.add_argument("--token-budget", type=int, default=262144, help="rows x (prompt + cap) per batch")
    parser.add_argument("--max-rows", type=int, default=256)
    parser.add_argument("--first", type=int, default=5000, help="label these first (then the rest)")
    parser.add_argument("--limit", type=int, help="label at most this many prompts (smoke runs)")
    parser.add_argument("--time-limit", type=float, default=1e9, help="seconds; stop taking batches before")
    args = parser.parse_args()
    start = time.time()

    if args.gguf_sha256:
        digest = hashlib.sha256(Path(args.gguf).read_bytes()).hexdigest()
        if digest != args.gguf_sha256:
            sys.exit(f"{args.gguf}: SHA-256 {digest} is not the expected {args.gguf_sha256}")
    header, prompts = read_prompts(args.prompts)
    if args.limit is not None:
        prompts = prompts[: args.limit]
    done = done_indices(args.out)
    pending = [p for p in prompts if p["index"] not in done]
    cap = int(header["label_header"]["cap_tokens"])
    batches = make_batches(pending, cap, args.token_budget, args.max_rows, max(0, args.first - len(done)))
    print(f"{len(pending)} prompts to label ({len(done)} already), {len(batches)} batches", flush=True)

    import multiprocessing as mp

    import torch
    import transformers

    # Dequantize the GGUF once here; workers load the float32 HF copy (eight workers dequantizing at once,
    # each with a full OpenMP pool, once stalled a 16-core machine for minutes).
    from transformers import AutoModelForCausalLM

    gguf = Path(args.gguf)
    args.model_dir = str((args.work_dir or args.out.parent) / "model-fp32")
    AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).save_pretrained(
        args.model_dir
    )
    print(f"model converted after {time.time() - start:.1f} s", flush=True)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"  # inherited by the spawned workers
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    label_header = dict(header["label_header"])
    label_header["labelled_on"] = f"{name}; torch {torch.__version__}; transformers {transformers.__version__}"
    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for batch in batches:
        tasks.put(batch)
    deadline = start + args.time_limit
    workers = [
        ctx.Process(target=worker, args=(rank, args, header, tasks, results, deadline), daemon=True)
        for rank in range(max(1, min(args.workers, len(batches))))
    ]
    for w in workers:
        w.start()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    new_file = not args.out.exists()
    labelled, running, steps_time = 0, len(workers), 0.0
    with args.out.open("a") as f:
        if new_file:
            f.write(json.dumps(label_header) + "\n")
            f.flush()
            os.fsync(f.fileno())
        while running:
            try:
                message = results.get(timeout=30)
            except queue.Empty:
                if not any(w.is_alive() for w in workers):
                    print("all workers died", flush=True)
                    break
                continue
            kind, rank = message[0], message[1]
            if kind == "ready":
                print(f"worker {rank} ready after {message[2] - start:.1f} s", flush=True)
            elif kind == "labels":
                for index, length, stop, prompt_tokens in message[2]:
                    record = {"index": index, "length": length, "stop_reason": stop, "prompt_tokens": prompt_tokens}
                    record["device"] = "cuda" if args.device.startswith("cuda") else args.device
                    f.write(json.dumps(record, separators=(",", ":")) + "\n")
                f.flush()
                os.fsync(f.fileno())
                labelled += len(message[2])
                steps_time += message[3]
                elapsed = time.time() - start
                print(
                    f"[{elapsed:6.1f} s] worker {rank}: {len(message[2])} labels in {message[3]:.1f} s; "
                    f"{labelled}/{len(pending)} ({labelled / elapsed * 60:.0f}/min)",
                    flush=True,
                )
            elif kind == "steps":
                print(
                    f"worker {rank}: step {message[2]} of a {message[4]}-row batch, {message[3] * 1e3:.0f} ms/step",
                    flush=True,
                )
            elif kind == "error":
                print(f"worker {rank}: batch failed: {message[2]}", flush=True)
            elif kind == "stopped":
                print(f"worker {rank}: time limit, left a batch of {message[2]}", flush=True)
            elif kind == "done":
                running -= 1
    for w in workers:
        w.join(timeout=10)
    summary = {
        "labelled": labelled,
        "pending_before": len(pending),
        "elapsed_s": round(time.time() - start, 1),
        "workers": len(workers),
        "device": label_header["labelled_on"],
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
