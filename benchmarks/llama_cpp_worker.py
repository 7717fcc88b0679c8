"""llama.cpp timings in a process of its own, for ``engine_speed.py --llama-cpp``.

Why a separate process: llama-cpp-python's OpenMP thread pool and PyTorch's share one process badly
(``llama_decode`` segfaults here once torch is imported), and a process of its own also keeps the two
engines' allocators and thread pools from disturbing each other's timings.

Reads one JSON object on stdin: ``{"model": path, "threads": int, "steps": int, "n_ctx": int,
"prompts": [[token ids], ...]}`` and prints one JSON list, ``[[prefill tok/s, decode tok/s], ...]``
per prompt: the prompt is evaluated in one call (n_batch 512), then ``steps`` single-token evals.
"""

from __future__ import annotations

import json
import statistics
import sys
import time


def main() -> None:
    job = json.load(sys.stdin)
    from llama_cpp import Llama

    llm = Llama(
        model_path=job["model"],
        n_ctx=job["n_ctx"],
        n_threads=job["threads"],
        n_threads_batch=job["threads"],
        n_batch=512,
        verbose=False,
    )
    out = []
    for ids in job["prompts"]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t_prefill = time.perf_counter() - t0
        token = ids[-1]
        steps = []
        for _ in range(job["steps"]):
            t = time.perf_counter()
            llm.eval([token])
            steps.append(time.perf_counter() - t)
        out.append([len(ids) / t_prefill, 1.0 / statistics.median(steps)])
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
