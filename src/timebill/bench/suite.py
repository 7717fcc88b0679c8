"""Benchmark task files: one JSON object per line, an optional header first (``docs/bench-suite-format.md``).

The benchmark reads tasks only through this module, so any file in this format can be fed to
``timebill bench --suite FILE`` — the generated LongBench-style suite (:mod:`timebill.bench.generate`)
is one such file, versioned under ``benchmarks/suites/``. A task is self-contained: the full prompt,
the references, the metric and the longest answer allowed (N_max); nothing is looked up at run time.

Task order matters: the Skip-Next policy releases jobs periodically *in file order*.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from timebill.bench.metrics import METRICS
from timebill.errors import InvalidInputError

SUITE_FORMAT = "timebill-bench-suite"
SUITE_FORMAT_VERSION = 1
DEFAULT_SUITE_NAME = "longbench-style-v1"
#: The committed suite, relative to the repository root (not package data: it is a benchmark input).
DEFAULT_SUITE_RELPATH = Path("benchmarks") / "suites" / f"{DEFAULT_SUITE_NAME}.jsonl"


@dataclass(frozen=True)
class Task:
    """One benchmark job: answer ``prompt`` in at most ``max_new_tokens`` tokens, scored by ``metric``."""

    id: str
    kind: str  # retrieval | code | chat (free text for other files: used to group the sanity table)
    metric: str  # a key of timebill.bench.metrics.METRICS
    prompt: str  # the user turn; the engine wraps it in the model's chat template
    references: tuple[str, ...]
    max_new_tokens: int  # N_max
    prompt_tokens: int | None = None  # length as the engine encodes it, with the generating tokenizer (informative)
    source: dict[str, Any] = field(default_factory=dict)  # provenance (file, depth, conversation index...)
    chat: bool = True  # wrap the prompt in the model's chat template (False: raw text completion)

    def to_json(self) -> str:
        data = asdict(self)
        data["references"] = list(self.references)
        return json.dumps(data, ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> Task:
        """Validate one task object; ``where`` (file:line) goes into every error message."""
        if not isinstance(data, dict):
            raise InvalidInputError(f"{where}: a task must be a JSON object")
        missing = [k for k in ("id", "metric", "prompt", "references", "max_new_tokens") if k not in data]
        if missing:
            raise InvalidInputError(f"{where}: task is missing {', '.join(missing)}")
        task_id, metric, prompt, refs, n_max = (
            data["id"],
            data["metric"],
            data["prompt"],
            data["references"],
            data["max_new_tokens"],
        )
        if not isinstance(task_id, str) or not task_id or any(c in task_id for c in "@|\n"):
            raise InvalidInputError(f"{where}: id must be a non-empty string without '@', '|' or newlines")
        if metric not in METRICS:
            raise InvalidInputError(f"{where}: metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidInputError(f"{where}: prompt must be a non-empty string")
        if isinstance(refs, str):
            refs = [refs]
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r.strip() for r in refs):
            raise InvalidInputError(f"{where}: references must be a non-empty list of non-empty strings")
        if isinstance(n_max, bool) or not isinstance(n_max, int) or n_max < 1:
            raise InvalidInputError(f"{where}: max_new_tokens must be an integer >= 1, got {n_max!r}")
        prompt_tokens = data.get("prompt_tokens")
        if prompt_tokens is not None and (isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int)):
            raise InvalidInputError(f"{where}: prompt_tokens must be an integer when given")
        source = data.get("source") or {}
        if not isinstance(source, dict):
            raise InvalidInputError(f"{where}: source must be an object when given")
        chat = data.get("chat", True)
        if not isinstance(chat, bool):
            raise InvalidInputError(f"{where}: chat must be true or false when given")
        return cls(
            id=task_id,
            kind=str(data.get("kind") or metric),
            metric=metric,
            prompt=prompt,
            references=tuple(refs),
            max_new_tokens=n_max,
            prompt_tokens=prompt_tokens,
            source=source,
            chat=chat,
        )


@dataclass(frozen=True)
class Suite:
    """A task file's header (may be empty) and tasks, with the file's SHA-256 (runs are keyed by it)."""

    header: dict[str, Any]
    tasks: tuple[Task, ...]
    sha256: str
    path: str

    @property
    def name(self) -> str:
        return str(self.header.get("name") or Path(self.path).stem)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for task in self.tasks:
            counts[task.kind] = counts.get(task.kind, 0) + 1
        return counts


def default_suite_path() -> Path:
    """The committed suite in a source checkout (``src/timebill/bench`` → the repository root)."""
    return Path(__file__).resolve().parents[3] / DEFAULT_SUITE_RELPATH


def suite_header(name: str, seed: int | None, counts: dict[str, int], generator: dict[str, Any]) -> dict[str, Any]:
    """The first line of a generated suite. No timestamp: the same seed must give the same bytes."""
    return {
        "format": SUITE_FORMAT,
        "format_version": SUITE_FORMAT_VERSION,
        "name": name,
        "seed": seed,
        "counts": counts,
        "generator": generator,
    }


def write_suite(path: str | os.PathLike[str], header: dict[str, Any], tasks: Iterable[Task]) -> Path:
    """Write header + tasks, atomically (temp file + rename), so a reader never sees half a suite."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(header, ensure_ascii=False, sort_keys=True) + "\n")
        for task in tasks:
            f.write(task.to_json() + "\n")
    os.replace(tmp, path)
    return path


def read_suite(path: str | os.PathLike[str]) -> Suite:
    """Parse and validate a task file. Errors name the file and line, and say what to fix."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidInputError(
            f"Cannot read the task file {path}: {exc.strerror or exc}. Generate one with `timebill bench-suite`."
        ) from exc
    header: dict[str, Any] = {}
    tasks: list[Task] = []
    seen: set[str] = set()
    for number, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            data = json.loads(line)
        except ValueError as exc:
            raise InvalidInputError(f"{where}: not JSON ({exc})") from exc
        if isinstance(data, dict) and "format" in data and "prompt" not in data:
            if tasks or header:
                raise InvalidInputError(f"{where}: a header line may only come first")
            if data.get("format") != SUITE_FORMAT or data.get("format_version") != SUITE_FORMAT_VERSION:
                raise InvalidInputError(
                    f"{where}: header says {data.get('format')!r} v{data.get('format_version')!r}; "
                    f"this TimeBill reads {SUITE_FORMAT!r} v{SUITE_FORMAT_VERSION}"
                )
            header = data
            continue
        task = Task.from_dict(data, where)
        if task.id in seen:
            raise InvalidInputError(f"{where}: task id {task.id!r} appears twice")
        seen.add(task.id)
        tasks.append(task)
    if not tasks:
        raise InvalidInputError(f"{path} holds no tasks")
    return Suite(header=header, tasks=tuple(tasks), sha256=hashlib.sha256(raw).hexdigest(), path=str(path))


def select_fraction(tasks: Sequence[Task], fraction: float) -> list[Task]:
    """A deterministic subset of about ``fraction`` of the tasks, every kind represented, lengths spread.

    Each kind gets its share (largest remainder, at least one task of each kind while the total allows);
    within a kind the picks are evenly spaced over its tasks sorted by prompt length, so a 2 % run still
    spans short and long prompts. The subset keeps the file's order (Skip-Next releases jobs in it).
    """
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise InvalidInputError(f"--fraction must be in (0, 1], got {fraction!r}")
    if fraction >= 1:
        return list(tasks)
    by_kind: dict[str, list[Task]] = {}
    for task in tasks:
        by_kind.setdefault(task.kind, []).append(task)
    total = max(1, round(fraction * len(tasks)))
    exact = {kind: fraction * len(group) for kind, group in by_kind.items()}
    share = {kind: min(len(by_kind[kind]), int(math.floor(x))) for kind, x in exact.items()}
    # Every kind at least once (in order of size) while the total allows, then largest remainders.
    for kind in sorted(by_kind, key=lambda k: -len(by_kind[k])):
        if share[kind] == 0 and sum(share.values()) < total:
            share[kind] = 1
    for kind in sorted(exact, key=lambda k: exact[k] - math.floor(exact[k]), reverse=True):
        if sum(share.values()) >= total:
            break
        if share[kind] < len(by_kind[kind]):
            share[kind] += 1
    chosen: set[str] = set()
    for kind, group in by_kind.items():
        n = share[kind]
        if n <= 0:
            continue
        ordered = sorted(group, key=lambda t: (t.prompt_tokens or len(t.prompt), t.id))
        chosen.update(ordered[min(len(ordered) - 1, int((i + 0.5) * len(ordered) / n))].id for i in range(n))
    return [t for t in tasks if t.id in chosen]


def parse_part(text: str) -> tuple[int, int]:
    """``"I/N"`` (0-based, like ``rlp label --shard``) → (I, N); a clear error for anything else."""
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise InvalidInputError(f"--part must look like I/N (e.g. 0/4), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise InvalidInputError(f"--part {text}: need N >= 1 and 0 <= I < N")
    return index, count


def select_part(tasks: Sequence[Task], index: int, count: int) -> list[Task]:
    """Part ``index`` of ``count`` disjoint parts that together hold every task, each a miniature suite.

    Why parts: a full benchmark run can take longer than one machine is available, and timings from two
    machines must not share budgets. Each part runs on one machine with budgets from its own vanilla
    times, and ``timebill bench-combine`` merges the parts by budget *level*. So each part should look
    like the whole suite: within a kind, tasks sorted by prompt length are dealt out in turn
    (task j → part j mod count), so every part spans short and long prompts of every kind. The part
    keeps the file's order (Skip-Next releases jobs in it).
    """
    if count < 1 or not 0 <= index < count:
        raise InvalidInputError(f"part {index}/{count}: need count >= 1 and 0 <= index < count")
    if count > len(tasks):
        raise InvalidInputError(f"cannot split {len(tasks)} tasks into {count} parts")
    by_kind: dict[str, list[Task]] = {}
    for task in tasks:
        by_kind.setdefault(task.kind, []).append(task)
    chosen: set[str] = set()
    offset = 0  # continue dealing where the previous kind stopped, so part sizes differ by at most one
    for group in by_kind.values():
        ordered = sorted(group, key=lambda t: (t.prompt_tokens or len(t.prompt), t.id))
        chosen.update(t.id for j, t in enumerate(ordered) if (j + offset) % count == index)
        offset += len(ordered)
    return [t for t in tasks if t.id in chosen]
