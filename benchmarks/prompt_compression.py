"""Prompt compression before prefill (issue #27): score and time of every compressor at ρ, per task kind.

On the benchmark suite, with no deadline, every chosen task is answered uncompressed (ρ = 0, the
baseline), by every compressor (truncate, bm25, embedding, gemfilter) at every ρ > 0, and — for
comparison — by SnapKV eviction at α = ρ (which shortens decode but saves no prefill). The report gives,
per kind × method × ρ, the mean score and its ratio to the uncompressed score; per method × ρ the
*paired* time ratio (prefill + compressor + eviction) / uncompressed prefill of the same task; how much
of ρ was reached; and the issue's targets (time ≤ 0.55 of prefill at ρ = 0.5 on prompts ≥ 2k tokens;
retrieval score ≥ 0.9× uncompressed and above truncate's).

    python benchmarks/prompt_compression.py --threads 2                     # full run (hours), resumable
    python benchmarks/prompt_compression.py --report-only docs/results/prompt_compression

Why paired and back to back: the machine is shared and drifts over an hour; a ratio of one task's
compressed run to *its own* baseline, measured seconds apart (the task's configurations run back to back
in a seeded shuffled order, under the CPU lock), cancels drift that would swamp a ratio of means.
Why ``--chat-max-tokens``: chat tasks allow up to 512 answer tokens, which alone would take most of a
session's time; capping N_max for every configuration alike keeps the comparison fair (stated in the
output). Retrieval and code keep their own N_max (32 and 64).

Runs are appended to OUT/runs.jsonl one JSON line each (fsync'd), so an interrupted run resumes where it
stopped; OUT/meta.json records the host, and a directory timed on another host is refused (one
benchmark's numbers never mix machines). The compressors' query is the default (the prompt's last line).
The CPU lock (``--cpu-lock``) keeps out only jobs that take it too, so each run records its process CPU
share; a run below 0.8 of (wall × threads) was contended, is left out of the time ratios, and
``--rerun-contended`` redoes it (scores are unaffected: no deadline, greedy decoding).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import math
import os
import random
import shlex
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from timebill.bench.metrics import score as metric_score
from timebill.bench.runner import machine_id
from timebill.bench.suite import Task, default_suite_path, read_suite
from timebill.cpulock import holding
from timebill.errors import InvalidInputError, TimeBillError
from timebill.options import COMPRESSOR_NAMES, check_prompt_compression
from timebill.paths import finite_or_none, write_bytes_atomically
from timebill.progress import progress_bar

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "results" / "prompt_compression"
KINDS = ("retrieval", "code", "chat")
DEFAULT_RHOS = (0.25, 0.5, 0.75, 0.9)
BASELINE = "uncompressed"  # the ρ = 0 run every other configuration of a task is paired with
SNAPKV = "snapkv"  # KV eviction at α = ρ after a full prefill: the comparison that saves no prefill
#: Prompts at least this long (original tokens) are the "long" subset the time target is stated on.
LONG_PROMPT_TOKENS = 2048
#: The issue's targets, at this ρ.
TARGET_RHO = 0.5
TARGET_TIME_RATIO = 0.55
TARGET_RETRIEVAL_RATIO = 0.9
#: A run "fell short" of ρ when it removed less than ρ − this fraction of the prompt (a compressor keeps at
#: most the target count, so only protected tokens — query, template, tail — make it fall short; SnapKV's
#: rounding differs by a token, which this tolerance absorbs).
SHORT_TOLERANCE = 0.005
#: For the ETA: one decode step costs about as much as prefilling this many prompt tokens (2 threads,
#: SmolLM2-135M: ~30 ms per step vs ~1.1 ms per prompt token at 2k tokens); only the ETA uses it.
DECODE_STEP_PROMPT_TOKENS = 30
DEFAULT_CPU_LOCK = "/tmp/timebill-cpu.lock"
#: A run whose process CPU time was below this share of (wall time × threads) had its cores taken by another
#: process (the CPU lock only keeps out jobs that take it too); the report counts and names such runs.
CONTENDED_CPU_SHARE = 0.8


# ------------------------------------------------------------------------------------------ configs
@dataclass(frozen=True)
class Config:
    """One way of answering a task: ``method`` (BASELINE, a compressor, or SNAPKV) at ``rho`` (α for SnapKV)."""

    method: str
    rho: float

    @property
    def key(self) -> str:
        return f"{self.method}@{self.rho:g}"


def parse_list(text: str, flag: str) -> list[str]:
    """A comma-separated flag value → its non-empty items (a clear error when there are none)."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise InvalidInputError(f"{flag} needs at least one value")
    return items


def parse_rhos(text: str) -> list[float]:
    """``--rhos`` → the sorted ρ > 0 values (0 is dropped: the baseline always runs)."""
    rhos: set[float] = set()
    for item in parse_list(text, "--rhos"):
        try:
            value = float(item)
        except ValueError:
            raise InvalidInputError(f"--rhos: {item!r} is not a number") from None
        rho = check_prompt_compression(value)
        if rho > 0:
            rhos.add(rho)
    return sorted(rhos)


def parse_compressors(text: str) -> list[str]:
    """``--compressors`` → names in the canonical order; an unknown name is refused before any model work."""
    names = parse_list(text, "--compressors")
    unknown = [n for n in names if n not in COMPRESSOR_NAMES]
    if unknown:
        raise InvalidInputError(
            f"--compressors: unknown {', '.join(unknown)}; choose from {', '.join(COMPRESSOR_NAMES)}"
        )
    return [n for n in COMPRESSOR_NAMES if n in names]


def make_configs(compressors: Sequence[str], rhos: Sequence[float], snapkv: bool = True) -> list[Config]:
    """The baseline, every compressor at every ρ > 0, and SnapKV at α = ρ (unless ``snapkv`` is False)."""
    configs = [Config(BASELINE, 0.0)]
    configs += [Config(c, r) for c in compressors for r in rhos]
    if snapkv:
        configs += [Config(SNAPKV, r) for r in rhos]
    return configs


def run_order(task_id: str, configs: Sequence[Config], seed: int) -> list[Config]:
    """The task's configurations in a shuffled order that depends only on (seed, task id): reproducible,
    and no configuration is always first (first after another task) or always last."""
    order = list(configs)
    random.Random(f"{seed}:{task_id}").shuffle(order)
    return order


def select_tasks(tasks: Sequence[Task], per_kind: int, kinds: Sequence[str]) -> list[Task]:
    """``per_kind`` tasks of each kind, evenly spaced over that kind's tasks sorted by prompt length.

    Pick i of n is the task at the middle of the i-th of n equal slices (as ``select_fraction`` does), so a
    6-per-kind run spans ~500 to ~6k tokens and has prompts ≥ 2k tokens of every kind. File order is kept.
    """
    if per_kind < 1:
        raise InvalidInputError(f"--per-kind must be >= 1, got {per_kind}")
    chosen: set[str] = set()
    for kind in kinds:
        group = sorted((t for t in tasks if t.kind == kind), key=lambda t: (t.prompt_tokens or len(t.prompt), t.id))
        if not group:
            raise InvalidInputError(
                f"the suite holds no {kind!r} tasks (kinds there: {sorted({t.kind for t in tasks})})"
            )
        n = min(per_kind, len(group))
        chosen.update(group[min(len(group) - 1, int((i + 0.5) * len(group) / n))].id for i in range(n))
    return [t for t in tasks if t.id in chosen]


def max_new_tokens(task: Task, chat_cap: int) -> int:
    """The task's N_max, capped at ``chat_cap`` for chat tasks (every configuration alike)."""
    return min(task.max_new_tokens, chat_cap) if task.kind == "chat" else task.max_new_tokens


def run_weight(task: Task, chat_cap: int) -> float:
    """A run's expected cost in prompt-token units (prefill + decode steps), for the ETA only."""
    return (task.prompt_tokens or len(task.prompt) / 4) + DECODE_STEP_PROMPT_TOKENS * max_new_tokens(task, chat_cap)


# ------------------------------------------------------------------------------------ runs on disk
def read_runs(path: Path) -> list[dict[str, Any]]:
    """Records of ``runs.jsonl``; a torn last line (a crash mid-write) is cut off the file, anything else
    unreadable is an error (the file is appended to, never rewritten, so damage elsewhere is not ours)."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    records: list[dict[str, Any]] = []
    offset = 0
    lines = raw.split(b"\n")
    for number, line in enumerate(lines, start=1):
        last = number == len(lines)
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                if not last:
                    raise InvalidInputError(f"{path}:{number}: not JSON; fix or remove that line") from None
                print(f"note: dropping a torn last line of {path} ({len(line)} bytes)", file=sys.stderr)
                with path.open("r+b") as f:
                    f.truncate(offset)
                break
        offset += len(line) + 1
    return records


def append_run(path: Path, record: dict[str, Any]) -> None:
    """Append one record as a line, flushed and fsync'd, so a crash loses at most the run in flight."""
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_json_atomically(path: Path, data: Any) -> None:
    """``data`` as indented JSON, replacing ``path`` atomically (temp file + rename)."""
    text = json.dumps(finite_or_none(data), indent=2, ensure_ascii=False, sort_keys=True, allow_nan=False)
    write_bytes_atomically(path, (text + "\n").encode())


#: meta.json fields that must match to add runs to a directory (the rest describe the session).
MATCHING_META = ("host", "threads", "chat_max_tokens", "suite_sha256", "seed")


def check_meta(existing: dict[str, Any], current: dict[str, Any], out_dir: Path) -> None:
    """Refuse to resume in ``out_dir`` when its runs were measured on another host or with other settings."""
    if existing.get("host") != current["host"]:
        raise InvalidInputError(
            f"{out_dir} holds runs timed on {existing.get('host')!r}; this host is {current['host']!r}. "
            "A benchmark's runs never mix hosts: finish on that host, or choose another --out."
        )
    diffs = [
        f"{k}: {existing.get(k)!r} there, {current[k]!r} now" for k in MATCHING_META if existing.get(k) != current[k]
    ]
    if diffs:
        raise InvalidInputError(
            f"{out_dir} holds runs made with other settings ({'; '.join(diffs)}); rerun with the same settings "
            "or choose another --out."
        )


# ------------------------------------------------------------------------------------------ report
def is_contended(record: dict[str, Any]) -> bool:
    """Whether another process took this run's cores (its CPU share below :data:`CONTENDED_CPU_SHARE`)."""
    share = record.get("cpu_share")
    return share is not None and share < CONTENDED_CPU_SHARE


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile with linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def _by_key(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str, float], dict[str, Any]]:
    """(task id, method, ρ) → record (a later duplicate wins: it is the one a resumed run kept)."""
    return {(r["task_id"], r["method"], float(r["rho"])): r for r in records}


def methods_and_rhos(records: Sequence[dict[str, Any]]) -> tuple[list[str], list[float]]:
    """Methods (canonical order: compressors, then SnapKV) and the ρ > 0 values present in ``records``."""
    present = {r["method"] for r in records}
    methods = [m for m in (*COMPRESSOR_NAMES, SNAPKV) if m in present]
    rhos = sorted({float(r["rho"]) for r in records if r["method"] != BASELINE})
    return methods, rhos


def time_ratio(run: dict[str, Any], baseline: dict[str, Any]) -> float:
    """(prefill + compressor + eviction) of ``run`` over the uncompressed prefill of the same task."""
    return (run["prefill_s"] + run["compress_s"] + run["evict_s"]) / baseline["prefill_s"]


def score_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per kind × method × ρ: mean score, and its ratio to the uncompressed mean *of the same tasks*."""
    runs = _by_key(records)
    base = {t: r for (t, m, _), r in runs.items() if m == BASELINE}
    methods, rhos = methods_and_rhos(records)
    kinds = [k for k in KINDS if any(r["kind"] == k for r in base.values())]
    kinds += sorted({r["kind"] for r in base.values()} - set(kinds))
    rows = []
    for kind in kinds:
        kind_base = {t: r for t, r in base.items() if r["kind"] == kind}
        rows.append(
            {
                "kind": kind,
                "method": BASELINE,
                "rho": 0.0,
                "n": len(kind_base),
                "mean_score": _mean([r["score"] for r in kind_base.values()]),
                "baseline_mean": _mean([r["score"] for r in kind_base.values()]),
                "ratio": 1.0 if kind_base else math.nan,
            }
        )
        for method in methods:
            for rho in rhos:
                pairs = [(runs[(t, method, rho)], b) for t, b in kind_base.items() if (t, method, rho) in runs]
                if not pairs:
                    continue
                mean = _mean([r["score"] for r, _ in pairs])
                base_mean = _mean([b["score"] for _, b in pairs])
                rows.append(
                    {
                        "kind": kind,
                        "method": method,
                        "rho": rho,
                        "n": len(pairs),
                        "mean_score": mean,
                        "baseline_mean": base_mean,
                        "ratio": mean / base_mean if base_mean > 0 else math.nan,
                    }
                )
    return rows


def time_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method × ρ and subset (all tasks / prompts ≥ 2048 tokens): median and p90 of the paired time
    ratio, and the mean compressor time; also the paired first-token ratio (median), which counts decode's
    first step and everything before it. A pair with a contended run (:func:`is_contended`) is left out and
    counted in ``contended``: another process's load is not the compressor's cost."""
    runs = _by_key(records)
    base = {t: r for (t, m, _), r in runs.items() if m == BASELINE}
    methods, rhos = methods_and_rhos(records)
    rows = []
    for method in methods:
        for rho in rhos:
            for subset in ("all", "long"):
                pairs = [
                    (runs[(t, method, rho)], b)
                    for t, b in base.items()
                    if (t, method, rho) in runs
                    and (subset == "all" or b["original_prompt_tokens"] >= LONG_PROMPT_TOKENS)
                ]
                clean = [(r, b) for r, b in pairs if not (is_contended(r) or is_contended(b))]
                contended, pairs = len(pairs) - len(clean), clean
                ratios = [time_ratio(r, b) for r, b in pairs]
                first = [
                    r["first_token_s"] / b["first_token_s"]
                    for r, b in pairs
                    if r["first_token_s"] and b["first_token_s"]
                ]
                rows.append(
                    {
                        "method": method,
                        "rho": rho,
                        "subset": subset,
                        "n": len(pairs),
                        "contended": contended,
                        "median_ratio": statistics.median(ratios) if ratios else math.nan,
                        "p90_ratio": quantile(ratios, 0.9),
                        "mean_compress_s": _mean([r["compress_s"] for r, _ in pairs]),
                        "median_first_token_ratio": statistics.median(first) if first else math.nan,
                    }
                )
    return rows


def reach_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method × ρ: mean ρ reached (α reached for SnapKV) and how many runs fell short of ρ."""
    methods, rhos = methods_and_rhos(records)
    rows = []
    for method in methods:
        for rho in rhos:
            group = [r for r in records if r["method"] == method and float(r["rho"]) == rho]
            if group:
                rows.append(
                    {
                        "method": method,
                        "rho": rho,
                        "n": len(group),
                        "mean_reached": _mean([r["rho_reached"] for r in group]),
                        "short": sum(bool(r["short"]) for r in group),
                    }
                )
    return rows


def contended_runs(records: Sequence[dict[str, Any]]) -> list[str]:
    """``task config`` of the kept runs whose cores were partly taken by other processes (timings suspect)."""
    return [f"{r['task_id']} {r['key']}" for r in _by_key(records).values() if is_contended(r)]


def _find(rows: Sequence[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def targets(
    scores: Sequence[dict[str, Any]], times: Sequence[dict[str, Any]], compressors: Sequence[str]
) -> dict[str, Any]:
    """The issue's targets at ρ = 0.5, per compressor, and the best compressor.

    Time: the median over prompts ≥ 2048 tokens of the paired (prefill + compressor) / uncompressed prefill
    ratio must be ≤ 0.55. Retrieval: the mean retrieval score must be ≥ 0.9× the uncompressed mean of the same
    tasks and above truncate's (truncate itself: only the first part). Best: the highest mean over kinds
    (each kind's mean score weighs the same) at ρ = 0.5 among compressors meeting the time target.
    """
    time_checks, retrieval_checks, macro = [], [], {}
    truncate = _find(scores, kind="retrieval", method="truncate", rho=TARGET_RHO)
    for name in compressors:
        t = _find(times, method=name, rho=TARGET_RHO, subset="long")
        value = t["median_ratio"] if t and t["n"] else math.nan
        time_checks.append(
            {
                "compressor": name,
                "n": t["n"] if t else 0,
                "median_ratio": value,
                "p90_ratio": t["p90_ratio"] if t else math.nan,
                "pass": bool(value <= TARGET_TIME_RATIO) if not math.isnan(value) else None,
            }
        )
        s = _find(scores, kind="retrieval", method=name, rho=TARGET_RHO)
        ratio = s["ratio"] if s else math.nan
        over = None
        if s and truncate and name != "truncate":
            over = bool(s["mean_score"] > truncate["mean_score"])
        # Compared as score ≥ 0.9 × baseline, not through the ratio: a baseline mean of 0 has no ratio.
        ok = (
            None
            if not s
            else bool(s["mean_score"] >= TARGET_RETRIEVAL_RATIO * s["baseline_mean"] and over is not False)
        )
        retrieval_checks.append(
            {
                "compressor": name,
                "n": s["n"] if s else 0,
                "mean_score": s["mean_score"] if s else math.nan,
                "ratio": ratio,
                "baseline_mean": s["baseline_mean"] if s else math.nan,
                "truncate_score": truncate["mean_score"] if truncate else math.nan,
                "above_truncate": over,
                "pass": ok,
            }
        )
        kind_means = [r["mean_score"] for r in scores if r["method"] == name and r["rho"] == TARGET_RHO]
        if kind_means:
            macro[name] = _mean(kind_means)
    measured = any(c["pass"] is not None for c in time_checks)
    meeting = [c["compressor"] for c in time_checks if c["pass"] and c["compressor"] in macro]
    best = max(meeting, key=lambda n: macro[n]) if meeting else None
    fallback = max(macro, key=lambda n: macro[n]) if macro and best is None else None
    return {
        "rho": TARGET_RHO,
        "time": time_checks,
        "retrieval": retrieval_checks,
        "mean_over_kinds": macro,
        "time_measured": measured,
        "best": best,
        "best_without_time_target": fallback,
        "rule": (
            f"best = highest mean over kinds (each kind weighs the same) of the mean score at ρ = {TARGET_RHO:g}, "
            f"among compressors whose median (prefill + compressor) / uncompressed prefill on prompts ≥ "
            f"{LONG_PROMPT_TOKENS} tokens is ≤ {TARGET_TIME_RATIO:g}"
        ),
    }


def build_results(records: Sequence[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """Every number of the report, as plain data (results.json; results.md is rendered from it)."""
    scores, times = score_rows(records), time_rows(records)
    methods, _ = methods_and_rhos(records)
    tasks: dict[str, set[str]] = {}
    for r in records:
        tasks.setdefault(r["kind"], set()).add(r["task_id"])
    long_tasks = {
        r["task_id"] for r in records if r["method"] == BASELINE and r["original_prompt_tokens"] >= LONG_PROMPT_TOKENS
    }
    return {
        "meta": meta,
        "n_runs": len(records),
        "tasks_per_kind": {k: len(v) for k, v in sorted(tasks.items())},
        "long_prompt_tasks": len(long_tasks),
        "long_prompt_tokens": LONG_PROMPT_TOKENS,
        "scores": scores,
        "time": times,
        "reach": reach_rows(records),
        "contended_runs": contended_runs(records),
        "contended_cpu_share": CONTENDED_CPU_SHARE,
        "targets": targets(scores, times, [m for m in methods if m != SNAPKV]),
    }


def _f(value: float | None, spec: str = ".3f") -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("PASS" if ok else "MISS")


def render_markdown(results: dict[str, Any]) -> str:
    """results.md: header, scores, time, ρ reached, targets (all from :func:`build_results`)."""
    meta = results["meta"]
    counts = ", ".join(f"{k} {v}" for k, v in results["tasks_per_kind"].items())
    lines = [
        "# Prompt compression before prefill (issue #27)",
        "",
        f"- host: {meta.get('host')}",
        f"- threads: {meta.get('threads')}; torch {meta.get('torch')}, transformers {meta.get('transformers')}; "
        f"model {meta.get('model_id')} ({meta.get('decode_path')}), fp32",
        f"- suite: {meta.get('suite')} (sha256 {str(meta.get('suite_sha256'))[:12]}); tasks: {counts} "
        f"({results['long_prompt_tasks']} with ≥ {results['long_prompt_tokens']} prompt tokens); "
        f"{results['n_runs']} runs",
        f"- N_max: chat tasks capped at {meta.get('chat_max_tokens')} tokens for every configuration alike; "
        "retrieval and code keep their own (32, 64). No deadline; greedy decoding.",
        f"- started {meta.get('date')}: `{meta.get('command')}`",
    ]
    lines += [f"- resumed {s['date']}: `{s['command']}`" for s in meta.get("resumed", [])]
    contended = results["contended_runs"]
    lines.append(
        f"- contended runs (process CPU < {results['contended_cpu_share']:g} × wall × threads: other processes "
        f"took cores): {len(contended)}, left out of the time ratios; `--rerun-contended` redoes them"
        + (f" — {', '.join(contended)}" if contended else "")
    )
    lines += [
        "",
        "## 1. Score per kind (mean; ratio to the uncompressed mean of the same tasks)",
        "",
        "SnapKV rows evict α = ρ of the KV after a full prefill (they save decode time, no prefill).",
        "",
        "| kind | method | ρ | n | mean score | ratio to ρ=0 |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["scores"]:
        lines.append(
            f"| {r['kind']} | {r['method']} | {r['rho']:g} | {r['n']} | {_f(r['mean_score'])} | {_f(r['ratio'])} |"
        )
    lines += [
        "",
        "## 2. Time: (prefill + compressor + eviction) / uncompressed prefill, paired per task",
        "",
        f"Median and p90 over tasks; 'long' = prompts ≥ {results['long_prompt_tokens']} original tokens. "
        "First token: time to the first answer token over the uncompressed one (median).",
        "",
        "| method | ρ | tasks | n | contended (left out) | median | p90 | mean compress_s | first token |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["time"]:
        lines.append(
            f"| {r['method']} | {r['rho']:g} | {r['subset']} | {r['n']} | {r['contended']} | {_f(r['median_ratio'])} | "
            f"{_f(r['p90_ratio'])} | {_f(r['mean_compress_s'], '.4f')} | {_f(r['median_first_token_ratio'])} |"
        )
    lines += [
        "",
        "## 3. ρ reached",
        "",
        f"A run falls short when it removed less than ρ − {SHORT_TOLERANCE:g} of the prompt (the query, chat "
        "template and tail window are never removed). SnapKV: α reached on the prompt KV.",
        "",
        "| method | ρ | n | mean ρ reached | fell short |",
        "|---|---|---|---|---|",
    ]
    for r in results["reach"]:
        lines.append(f"| {r['method']} | {r['rho']:g} | {r['n']} | {_f(r['mean_reached'])} | {r['short']} |")
    t = results["targets"]
    lines += [
        "",
        f"## 4. Targets (ρ = {t['rho']:g})",
        "",
        f"Time: median over prompts ≥ {results['long_prompt_tokens']} tokens of (prefill + compressor) / "
        f"uncompressed prefill ≤ {TARGET_TIME_RATIO:g}.",
        "",
        "| compressor | n | median | p90 | target |",
        "|---|---|---|---|---|",
    ]
    for c in t["time"]:
        lines.append(
            f"| {c['compressor']} | {c['n']} | {_f(c['median_ratio'])} | {_f(c['p90_ratio'])} | {_verdict(c['pass'])} |"
        )
    lines += [
        "",
        f"Retrieval: mean score ≥ {TARGET_RETRIEVAL_RATIO:g}× uncompressed (same tasks) and above truncate's "
        "(truncate itself: the first condition only).",
        "",
        "| compressor | n | mean score | ρ=0 mean | ratio | truncate | above truncate | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in t["retrieval"]:
        above = "—" if c["above_truncate"] is None else ("yes" if c["above_truncate"] else "no")
        lines.append(
            f"| {c['compressor']} | {c['n']} | {_f(c['mean_score'])} | {_f(c['baseline_mean'])} | {_f(c['ratio'])} | "
            f"{_f(c['truncate_score'])} | {above} | {_verdict(c['pass'])} |"
        )
    macro = ", ".join(f"{n} {v:.3f}" for n, v in t["mean_over_kinds"].items()) or "—"
    lines += ["", f"Mean score over kinds at ρ = {t['rho']:g}: {macro}.", "", f"Rule: {t['rule']}."]
    if t["best"]:
        lines.append(f"**Best compressor: {t['best']}.**")
    elif t["best_without_time_target"] and not t["time_measured"]:
        lines.append(
            f"Time target not measured (no prompts ≥ {results['long_prompt_tokens']} tokens); the highest score: "
            f"{t['best_without_time_target']}."
        )
    elif t["best_without_time_target"]:
        lines.append(
            f"**No compressor meets the time target**; the highest score without it: {t['best_without_time_target']}."
        )
    else:
        lines.append(f"No compressor was run at ρ = {t['rho']:g}.")
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path) -> dict[str, Any]:
    """Read OUT/runs.jsonl and OUT/meta.json, write OUT/results.md and OUT/results.json (atomically)."""
    meta_path, runs_path = out_dir / "meta.json", out_dir / "runs.jsonl"
    if not meta_path.exists() or not runs_path.exists():
        raise InvalidInputError(
            f"{out_dir} has no meta.json and runs.jsonl; run the benchmark with --out {out_dir} first"
        )
    records = read_runs(runs_path)
    if not records:
        raise InvalidInputError(f"{runs_path} holds no runs yet")
    results = build_results(records, json.loads(meta_path.read_text()))
    markdown = render_markdown(results)
    write_bytes_atomically(out_dir / "results.md", markdown.encode())
    write_json_atomically(out_dir / "results.json", results)
    print(markdown)
    return results


# ----------------------------------------------------------------------------------------- measuring
def run_record(engine: Any, task: Task, config: Config, n_max: int) -> dict[str, Any]:
    """Answer ``task`` under ``config`` and return the record of the run (timings, lengths, text, score)."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if config.method == BASELINE:
        result = engine.generate(task.prompt, max_new_tokens=n_max, chat=task.chat)
    elif config.method == SNAPKV:
        result = engine.generate(task.prompt, alpha=config.rho, max_new_tokens=n_max, chat=task.chat)
    else:
        result = engine.generate(
            task.prompt, max_new_tokens=n_max, chat=task.chat, prompt_compression=config.rho, compressor=config.method
        )
    cpu_share = (time.process_time() - cpu0) / ((time.perf_counter() - wall0) * engine.threads)
    original = result.original_prompt_tokens or result.prompt_tokens
    if config.method == SNAPKV:
        reached = 1.0 - result.kept_kv_tokens / result.prompt_tokens if result.prompt_tokens else 0.0
    else:
        reached = result.prompt_compression
    return {
        "task_id": task.id,
        "kind": task.kind,
        "method": config.method,
        "rho": config.rho,
        "key": config.key,
        "max_new_tokens": n_max,
        "original_prompt_tokens": original,
        "kept_prompt_tokens": result.prompt_tokens,
        "kept_kv_tokens": result.kept_kv_tokens,
        "rho_reached": reached,
        "short": bool(config.rho > 0 and reached < config.rho - SHORT_TOLERANCE),
        "compress_s": result.compress_s,
        "prefill_s": result.prefill_s,
        "evict_s": result.evict_s,
        "decode_s": result.decode_s,
        "total_s": result.total_s,
        "first_token_s": result.token_times_s[0] if result.token_times_s else None,
        "tokens": result.tokens_generated,
        "stop_reason": result.stop_reason,
        "text": result.text,
        "score": metric_score(task.metric, result.text, task.references),
        "cpu_share": round(cpu_share, 3),
        "finished_at": _dt.datetime.now().isoformat(timespec="seconds"),
    }


def warm_up(engine: Any, compressors: Sequence[str], snapkv: bool) -> None:
    """Pay every one-off cost before timing: build and warm each compressor, then one short request through
    each path (compression layout, SnapKV capture), so the first timed run is not the first of its kind."""
    text = " ".join(f"Sentence {i} says that the code word for city {i} is word{i}." for i in range(40))
    prompt = text + "\nWhat is the code word for city 7?"
    for name in compressors:
        engine.compressor(name)
        engine.generate(prompt, max_new_tokens=2, prompt_compression=0.5, compressor=name)
    if snapkv:
        engine.generate(prompt, alpha=0.5, max_new_tokens=2)
    engine.generate(prompt, max_new_tokens=2)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _hms(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def measure(args: argparse.Namespace) -> None:
    """Load the engine, run every (task, configuration) not yet in OUT/runs.jsonl, then write the report."""
    import torch
    import transformers

    from timebill.engine import Engine

    suite = read_suite(args.suite)
    kinds = parse_list(args.kinds, "--kinds")
    compressors = parse_compressors(args.compressors)
    rhos = parse_rhos(args.rhos)
    if args.chat_max_tokens < 1:
        raise InvalidInputError(f"--chat-max-tokens must be >= 1, got {args.chat_max_tokens}")
    tasks = select_tasks(suite.tasks, args.per_kind, kinds)
    if args.limit_tasks is not None:
        if args.limit_tasks < 1:
            raise InvalidInputError(f"--limit-tasks must be >= 1, got {args.limit_tasks}")
        tasks = tasks[: args.limit_tasks]
    configs = make_configs(compressors, rhos, snapkv=not args.no_snapkv)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    runs_path, meta_path = out / "runs.jsonl", out / "meta.json"
    now = _dt.datetime.now().isoformat(timespec="seconds")
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    current = {
        "host": machine_id(),
        "threads": args.threads,
        "chat_max_tokens": args.chat_max_tokens,
        "suite_sha256": suite.sha256,
        "seed": args.seed,
    }
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        check_meta(meta, current, out)
        meta.setdefault("resumed", []).append({"date": now, "command": command})
    else:
        meta = {
            **current,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "timebill": _version("timebill"),
            "suite": suite.name,
            "date": now,
            "command": command,
        }
    records = read_runs(runs_path)
    # The last record of a (task, config) is the one kept; --rerun-contended redoes those that were contended.
    latest = {(r["task_id"], r["key"]): r for r in records}
    done = {k for k, r in latest.items() if not (args.rerun_contended and is_contended(r))}

    engine = Engine.load(None, threads=args.threads)
    torch.set_num_threads(args.threads)
    meta.update(model_id=engine.source.model_id, decode_path=engine.decode_path)
    write_json_atomically(meta_path, meta)
    print(
        f"# prompt_compression  threads={torch.get_num_threads()}  torch={torch.__version__}  "
        f"model={engine.source.model_id} ({engine.decode_path})  host={current['host']}"
    )
    print(
        f"# {len(tasks)} tasks ({', '.join(f'{k} {sum(t.kind == k for t in tasks)}' for k in kinds)}), "
        f"{len(configs)} configurations each; chat N_max capped at {args.chat_max_tokens}; out={out}"
    )

    todo = [(t, c) for t in tasks for c in run_order(t.id, configs, args.seed) if (t.id, c.key) not in done]
    print(f"# {len(todo)} runs to do ({len(tasks) * len(configs) - len(todo)} already in {runs_path})", flush=True)
    total_weight = sum(run_weight(t, args.chat_max_tokens) for t, _ in todo)
    with holding(args.cpu_lock or None):
        warm_up(engine, compressors, not args.no_snapkv)
        t0, weight_done = time.perf_counter(), 0.0
        with progress_bar(len(todo), "run", "prompt compression", smoothing=0) as bar:
            for i, (task, config) in enumerate(todo):
                bar.set_postfix_str(f"{task.id} {config.key}")
                record = run_record(engine, task, config, max_new_tokens(task, args.chat_max_tokens))
                append_run(runs_path, record)
                bar.update(1)
                weight_done += run_weight(task, args.chat_max_tokens)
                if i + 1 == len(todo) or todo[i + 1][0].id != task.id:  # a task finished: print the ETA
                    elapsed = time.perf_counter() - t0
                    eta = elapsed / weight_done * (total_weight - weight_done)
                    bar.write(
                        f"{task.id} ({task.kind}, {task.prompt_tokens} tok) done: {i + 1}/{len(todo)} runs, "
                        f"elapsed {_hms(elapsed)}, ETA {_hms(eta)} (weighted by prompt and answer length)"
                    )
    write_report(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", type=Path, default=default_suite_path())
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--report-only", type=Path, default=None, metavar="OUT", help="only rewrite OUT's report")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--per-kind", type=int, default=6, help="tasks per kind, spread over prompt length")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--compressors", default=",".join(COMPRESSOR_NAMES))
    parser.add_argument("--rhos", default=",".join(f"{r:g}" for r in DEFAULT_RHOS), help="ρ > 0 (ρ = 0 always runs)")
    parser.add_argument("--no-snapkv", action="store_true", help="skip the SnapKV α = ρ comparison")
    parser.add_argument("--chat-max-tokens", type=int, default=128, help="N_max cap for chat tasks (all configs)")
    parser.add_argument("--limit-tasks", type=int, default=None, help="first K selected tasks only (smoke runs)")
    parser.add_argument(
        "--rerun-contended", action="store_true", help="redo runs whose cores another process took (kept: the new one)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds each task's configuration order")
    parser.add_argument("--cpu-lock", default=DEFAULT_CPU_LOCK, help="flock held while measuring ('' = none)")
    args = parser.parse_args()
    try:
        if args.report_only is not None:
            write_report(args.report_only)
        else:
            measure(args)
    except TimeBillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
