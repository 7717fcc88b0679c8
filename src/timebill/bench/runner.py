"""Run the benchmark: every (method, task[, budget]) once, resumable, appended to per-method JSONL files.

Layout of ``--out DIR``::

    manifest.json          settings a resumed run must share (suite hash, model, threads, part, machine)
                           + chosen budgets
    runs/<method>.jsonl    one line per finished run (a record of timings, token ids and stamps, text)
    results.md, *.png      the report (:mod:`timebill.bench.report`), rebuilt at the end of every run

Order: budget-independent methods first (vanilla, fixed α, int8 — one run per task), then the budgets
are chosen from vanilla's measured end-to-end times (unless given), then TimeBill's methods per budget,
then the k sweep at the tightest budget. Each run's record is appended, flushed and fsync'd the moment
it ends, so killing the process loses at most the run in flight; a restart reads the files, ignores a
torn last line (cutting it off before appending) and skips every key already there. A planned record made
with something else (the paper planner's length predictor, the expected-score planner's quality model) does not
count as done (:meth:`Method.stale`): swapping either reruns only the methods that read it.

Timings from two machines cannot share budgets, so a directory belongs to the machine that started it:
resuming its missing runs elsewhere is refused (rebuilding the report anywhere is fine). A full run
longer than one machine is lent splits into ``--part I/N`` directories (each a stratified miniature of
the suite with budgets from its own vanilla times), merged by ``timebill bench-combine``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from timebill.bench.methods import K_SWEEP, Method, Resources, k_sweep_method, method_registry
from timebill.bench.suite import Suite, Task, parse_part, read_suite, select_fraction, select_part
from timebill.cpulock import holding
from timebill.errors import InvalidInputError, TimeBillError
from timebill.paths import fsync_dir, write_bytes_atomically
from timebill.progress import progress_bar

MANIFEST_VERSION = 1
BUDGET_QUANTILES = (0.2, 0.35, 0.5, 0.65, 0.8, 0.95)
_IDENTITY = ("suite_sha256", "model_id", "model_fingerprint", "threads", "part")


class BenchError(TimeBillError):
    """The output directory or its run files cannot be used as asked."""


@dataclass
class BenchOptions:
    """What to run (the CLI's flags after parsing)."""

    methods: list[str]
    budgets: list[float] | None = None  # None: chosen from vanilla's times
    n_budgets: int = len(BUDGET_QUANTILES)
    k_sweep: Sequence[int] = K_SWEEP  # empty: no sweep
    cpu_lock: str | None = None
    progress: bool = True
    command: str = ""
    fraction: float = 1.0
    part: str | None = None  # "I/N" when this directory holds one part of a split run
    run_missing: bool = True  # False: only read what is there (``--report-only``)

    def validate(self) -> None:
        known = method_registry()
        unknown = [m for m in self.methods if m not in known]
        if unknown:
            raise InvalidInputError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(known)}")
        if not self.methods:
            raise InvalidInputError("no methods to run")
        if self.budgets is not None and (not self.budgets or any(not (b > 0) for b in self.budgets)):
            raise InvalidInputError(f"budgets must be positive seconds, got {self.budgets}")
        if self.budgets is None and not 2 <= self.n_budgets <= 20:
            raise InvalidInputError(f"--n-budgets must be in 2..20, got {self.n_budgets}")
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.k_sweep):
            raise InvalidInputError(f"k sweep values must be integers >= 1, got {list(self.k_sweep)}")


@dataclass
class BenchData:
    """Everything the report needs: tasks, budgets, and records by method name then key."""

    suite: Suite
    tasks: list[Task]
    budgets: list[float]
    budget_note: str
    methods: list[Method]
    k_methods: list[Method]
    records: dict[str, dict[str, dict[str, Any]]]
    meta: dict[str, Any] = field(default_factory=dict)


def run_key(method: str, task_id: str, budget_s: float | None) -> str:
    """Stable key of one run: ``method|task`` or ``method|task|T`` (T to 6 significant digits)."""
    return f"{method}|{task_id}" if budget_s is None else f"{method}|{task_id}|{budget_s:.6g}"


# --------------------------------------------------------------------------------------- run files
def read_runs(path: Path, repair: bool = False) -> dict[str, dict[str, Any]]:
    """Records of one run file by key (a later line wins). A torn last line is ignored (and cut with ``repair``).

    A corrupt line *before* the last is an error: it cannot come from a killed append, so the file was
    edited or damaged, and silently dropping runs would bias the results.
    """
    if not path.exists():
        return {}
    raw = path.read_bytes()
    complete, _, tail = raw.rpartition(b"\n")
    lines = complete.split(b"\n") if complete else []
    torn = bool(tail)
    if lines:
        try:
            json.loads(lines[-1])
        except ValueError:
            lines.pop()
            torn = True
    if torn and repair:
        write_bytes_atomically(path, b"".join(line + b"\n" for line in lines))
    records: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key = record["key"]
        except (ValueError, KeyError, TypeError) as exc:
            raise BenchError(
                f"{path} line {number} is corrupt ({exc}); move the file away to rerun that method."
            ) from exc
        records[key] = record
    return records


class RunStore:
    """Append-only run files under ``DIR/runs``, one per method."""

    def __init__(self, out_dir: Path) -> None:
        self.directory = out_dir / "runs"
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, method: str) -> Path:
        return self.directory / f"{method}.jsonl"

    def load(self, method: str) -> dict[str, dict[str, Any]]:
        return read_runs(self.path(method), repair=True)

    def append(self, method: str, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), allow_nan=False).encode() + b"\n"
        path = self.path(method)
        new = not path.exists()
        with path.open("ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if new:
            fsync_dir(self.directory)


# ------------------------------------------------------------------------------------------ manifest
def load_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / "manifest.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise BenchError(f"{path} is not JSON ({exc}); delete it (runs are kept) to start a new manifest.") from exc


def save_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    write_bytes_atomically(out_dir / "manifest.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


def check_manifest(found: dict[str, Any], expected: dict[str, Any], out_dir: Path) -> None:
    diffs = [
        f"{k}: {found.get(k)!r} there, {expected.get(k)!r} now" for k in _IDENTITY if found.get(k) != expected.get(k)
    ]
    if diffs:
        raise BenchError(
            f"{out_dir} holds runs made with other settings (" + "; ".join(diffs) + "). Use another --out directory."
        )


def machine_id() -> str:
    """What timings depend on beyond the settings in the manifest: the CPU (name, family, model,
    stepping) and how many there are."""
    from timebill.estimator.store import cpu_signature

    return f"{cpu_signature()}, {os.cpu_count()} logical CPUs"


def check_machine(manifest: dict[str, Any], out_dir: Path) -> None:
    """Refuse to add runs measured on another machine to a directory (their times would share budgets)."""
    here = machine_id()
    there = manifest.get("machine")
    if there is not None and there != here:
        raise BenchError(
            f"{out_dir} holds runs timed on {there}; this machine is {here}. Budgets come from vanilla's times, "
            "so runs from two machines cannot be mixed: finish on that machine, or start another --out "
            "(split a long run with --part I/N and merge the parts with `timebill bench-combine`)."
        )


def _selection_sha(tasks: Sequence[Task]) -> str:
    return hashlib.sha256("\n".join(t.id for t in tasks).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------- budgets
def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of already sorted values."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _round_sig(x: float, digits: int = 3) -> float:
    return float(f"{x:.{digits}g}")


def budget_quantiles(n: int) -> list[float]:
    """The ``n`` evenly spaced quantiles (20th … 95th percentile) budgets are chosen at."""
    lo, hi = BUDGET_QUANTILES[0], BUDGET_QUANTILES[-1]
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)] if n > 1 else [lo]


def choose_budgets(vanilla_e2e_s: Sequence[float], n: int = len(BUDGET_QUANTILES)) -> tuple[list[float], str]:
    """Budgets at evenly spaced quantiles (20th … 95th percentile) of vanilla's end-to-end times.

    At the 20th percentile vanilla misses ~80 % of jobs (the tightest budget); at the 95th it finishes
    ~95 % (the loosest). Returns the budgets (3 significant digits, duplicates dropped) and a sentence
    saying how they were chosen and what vanilla completes at each.
    """
    values = sorted(v for v in vanilla_e2e_s if v == v)
    if not values:
        raise BenchError("no vanilla runs to choose budgets from; pass --budgets or include the vanilla method")
    quantiles = budget_quantiles(n)
    budgets = sorted({_round_sig(_quantile(values, q)) for q in quantiles})
    done = [sum(v <= b for v in values) / len(values) for b in budgets]
    note = (
        f"Budgets are the {', '.join(f'{100 * q:.0f}' for q in quantiles)}th percentiles of vanilla's measured "
        f"end-to-end times over {len(values)} tasks (min {values[0]:.2f} s, median {_quantile(values, 0.5):.2f} s, "
        f"max {values[-1]:.2f} s), to 3 significant digits: "
        + ", ".join(f"{b:g} s (vanilla finishes {100 * d:.0f} %)" for b, d in zip(budgets, done, strict=True))
        + "."
    )
    return budgets, note


# ----------------------------------------------------------------------------------------- the loop
class _Progress:
    """A tqdm bar over the runs still to do (ETA included), or nothing when disabled.

    The ETA uses the mean rate since the start (``smoothing=0``), not tqdm's default moving average:
    run times swing 1000-fold between phases (a refused TimeBill run takes milliseconds, a long chat
    answer minutes), and a moving average made the ETA jump between minutes and hours.
    """

    def __init__(self, enabled: bool, total: int) -> None:
        self.bar = None
        if enabled:
            self.bar = progress_bar(total, "run", "bench", dynamic_ncols=True, smoothing=0.0)

    def write(self, message: str, log: Callable[[str], None]) -> None:
        """A message above the bar (printing past a live bar would splice the two on one line)."""
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            log(message)

    def set_total(self, total: int) -> None:
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def step(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_tasks_fit(engine: Any, tasks: Sequence[Task]) -> None:
    """Every prompt must fit the context with room for one token: a clear error now beats one hours in."""
    bad = []
    for task in tasks:
        try:
            engine.encode(task.prompt, chat=task.chat)
        except TimeBillError as exc:
            bad.append(f"{task.id}: {exc}")
    if bad:
        raise BenchError("some tasks cannot run on this model:\n  " + "\n  ".join(bad[:10]))


def run_benchmark(
    resources: Resources,
    suite: Suite,
    tasks: list[Task],
    out_dir: str | os.PathLike[str],
    options: BenchOptions,
    log: Callable[[str], None] = print,
) -> BenchData:
    """Run whatever is missing and return every record the report needs (see the module docstring)."""
    options.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    engine = resources.engine
    source = getattr(engine, "source", None)
    identity = {
        "suite_sha256": suite.sha256,
        "model_id": getattr(source, "model_id", "?"),
        "model_fingerprint": getattr(source, "fingerprint", "?"),
        "threads": engine.threads,
        "part": options.part,
    }
    manifest = load_manifest(out)
    if manifest is None:
        manifest = {
            "format_version": MANIFEST_VERSION,
            **identity,
            "suite_path": suite.path,
            "fraction": options.fraction,
            "machine": machine_id(),
            "command": options.command,
        }
    else:
        check_manifest(manifest, identity, out)
    save_manifest(out, manifest)
    _check_tasks_fit(engine, tasks)

    registry = method_registry()
    methods = [registry[m] for m in registry if m in options.methods]  # report order
    trace_methods = [m for m in methods if not m.budgeted]
    budget_methods = [m for m in methods if m.budgeted]
    k_methods = [k_sweep_method(k) for k in sorted(set(options.k_sweep))] if "timebill" in options.methods else []
    if options.budgets is None and budget_methods and not any(m.name == "vanilla" for m in trace_methods):
        trace_methods.insert(0, registry["vanilla"])  # budgets come from vanilla's times
        log("note: adding the vanilla method: budgets are chosen from its times (or pass --budgets)")
    store = RunStore(out)
    records: dict[str, dict[str, dict[str, Any]]] = {}
    all_methods = {m.name: m for m in [*trace_methods, *budget_methods, *k_methods]}
    stale: dict[str, int] = {}
    for name, method in all_methods.items():
        loaded = store.load(name)
        fresh = {}
        for key, record in loaded.items():
            why = method.stale(record, resources)
            if why is None:
                fresh[key] = record
            else:
                stale[why] = stale.get(why, 0) + 1
        records[name] = fresh
    for why, count in stale.items():
        log(f"note: {count} TimeBill runs were {why}; they will be rerun")

    def pending(method: Method, budgets: Sequence[float | None]) -> list[tuple[Method, Task, float | None]]:
        done = records[method.name]
        return [(method, task, b) for b in budgets for task in tasks if run_key(method.name, task.id, b) not in done]

    selection = _selection_sha(tasks)
    budgets: list[float] | None = options.budgets
    note = "Budgets given on the command line." if budgets is not None else ""
    if budgets is None and manifest.get("budget_selection") == selection and manifest.get("budgets"):
        budgets, note = list(manifest["budgets"]), str(manifest.get("budget_note", ""))
    n_budgets = len(budgets) if budgets is not None else options.n_budgets
    trace_todo = [item for m in trace_methods for item in pending(m, [None])]
    # Interleave methods per task, so slow drift of a shared machine hits every method alike.
    position = {task.id: i for i, task in enumerate(tasks)}
    trace_todo.sort(key=lambda item: position[item[1].id])
    estimate = len(trace_todo) + len(budget_methods) * len(tasks) * n_budgets + len(k_methods) * len(tasks)
    progress = _Progress(options.progress and options.run_missing, estimate)

    def execute(items: Sequence[tuple[Method, Task, float | None]]) -> None:
        if not options.run_missing or not items:
            return
        check_machine(manifest, out)
        if "machine" not in manifest:  # a directory from before machines were recorded
            manifest["machine"] = machine_id()
            save_manifest(out, manifest)
        for method, task, budget in items:
            key = run_key(method.name, task.id, budget)
            # The lock is held around each run, so timed runs never overlap another job's.
            with holding(options.cpu_lock, pause_s=0.0):
                record = method.run(resources, task, budget)
            record.update(
                key=key,
                method=method.name,
                task_id=task.id,
                kind=task.kind,
                budget_s=budget,
                max_new_tokens=task.max_new_tokens,
                finished_at=time.time(),
            )
            store.append(method.name, record)
            records[method.name][key] = record
            progress.step(f"{method.name} {task.id}" + ("" if budget is None else f" T={budget:g}s"))

    try:
        if trace_todo and options.run_missing:
            names = ", ".join(m.name for m in trace_methods)
            progress.write(f"budget-independent runs: {len(trace_todo)} to do ({names})", log)
        execute(trace_todo)
        if budgets is None:
            vanilla = records.get("vanilla", {})
            e2e = [vanilla[k]["e2e_s"] for k in (run_key("vanilla", t.id, None) for t in tasks) if k in vanilla]
            if len(e2e) == len(tasks):  # the budget-independent methods are scored at these budgets too
                budgets, note = choose_budgets(e2e, options.n_budgets)
                progress.write(note, log)
            elif budget_methods:
                raise BenchError("vanilla has not run on every task yet, so no budgets can be chosen; run first")
            else:
                budgets, note = [], "No budgeted methods were run, and vanilla did not run on every task."
        if options.run_missing or not manifest.get("budgets"):
            manifest.update(budgets=budgets, budget_note=note, budget_selection=selection)
            save_manifest(out, manifest)
        budget_todo = [item for b in budgets for m in budget_methods for item in pending(m, [b])]
        budget_todo.sort(key=lambda item: (budgets.index(item[2]), position[item[1].id]))  # type: ignore[arg-type]
        planned = {run_key(m.name, t.id, b) for m, t, b in budget_todo}
        k_todo = [item for m in k_methods for item in pending(m, budgets[:1])] if budgets else []
        k_todo = [(m, t, b) for m, t, b in k_todo if run_key(m.name, t.id, b) not in planned]
        k_todo.sort(key=lambda item: position[item[1].id])
        progress.set_total((progress.bar.n if progress.bar else 0) + len(budget_todo) + len(k_todo))
        if budget_todo and options.run_missing:
            progress.write(f"TimeBill runs: {len(budget_todo)} to do over {len(budgets)} budgets", log)
        execute(budget_todo)
        if k_todo and options.run_missing:
            progress.write(f"k sweep at T = {budgets[0]:g} s: {len(k_todo)} runs to do", log)
        execute(k_todo)
    finally:
        progress.close()
    return BenchData(
        suite=suite,
        tasks=tasks,
        budgets=list(budgets),
        budget_note=note,
        methods=[*trace_methods, *budget_methods],
        k_methods=k_methods,
        records=records,
        meta={
            # The command that timed the runs; a report rebuilt later names its own command separately.
            "command": manifest.get("command") or options.command,
            "rebuilt_by": None if options.run_missing else options.command,
            "fraction": options.fraction,
            "part": options.part,
            "machine": manifest.get("machine"),
            "threads": engine.threads,
            "decode_paths": resources.decode_paths(),
        },
    )


def runs_predictor(out_dir: str | os.PathLike[str]) -> str | None:
    """The length predictor most of a directory's TimeBill runs were made with (None: no TimeBill runs)."""
    from collections import Counter

    labels = Counter(r.get("predictor") for r in read_runs(Path(out_dir) / "runs" / "timebill.jsonl").values())
    return labels.most_common(1)[0][0] if labels else None


def _recorded_suite(manifest: Mapping[str, Any]) -> str:
    """The manifest's suite file, or the project's committed copy of it when that path is gone.

    Why: runs are taken in a frozen worktree whose absolute path is recorded and later removed; the
    committed ``benchmarks/suites/`` file of the same name serves when its sha256 is the recorded one.
    """
    recorded = Path(str(manifest["suite_path"]))
    if recorded.exists():
        return str(recorded)
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        candidate = root / "benchmarks" / "suites" / recorded.name
        if candidate.exists() and hashlib.sha256(candidate.read_bytes()).hexdigest() == manifest.get("suite_sha256"):
            return str(candidate)
    return str(recorded)  # read_suite names the missing file and what to do


def load_part(
    resources: Resources,
    out_dir: str | os.PathLike[str],
    suite_path: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] = print,
) -> BenchData:
    """Read a finished ``timebill bench`` directory (a part of a split run, or a whole run); runs nothing.

    The tasks are re-selected from the suite as the manifest says (fraction, part), the methods are those
    with run files, and the budgets are the manifest's. ``resources.predictor_label`` picks which TimeBill
    runs count (see :func:`runs_predictor`).
    """
    out = Path(out_dir)
    manifest = load_manifest(out)
    if manifest is None:
        raise BenchError(f"{out} has no manifest.json: it is not a `timebill bench` output directory")
    if not manifest.get("budgets"):
        raise BenchError(f"{out} has no budgets yet: its vanilla runs are not finished")
    suite = read_suite(suite_path or _recorded_suite(manifest))
    tasks = select_fraction(suite.tasks, float(manifest.get("fraction", 1.0)))
    if manifest.get("part"):
        tasks = select_part(tasks, *parse_part(str(manifest["part"])))
    if manifest.get("budget_selection") != _selection_sha(tasks):
        raise BenchError(f"{out}: the manifest's budgets were chosen for other tasks (was the suite changed?)")
    present = {p.stem for p in (out / "runs").glob("*.jsonl")}
    methods = [name for name in method_registry() if name in present]
    swept = any(k_sweep_method(k).name in present - {"timebill"} for k in K_SWEEP)
    k_sweep = K_SWEEP if swept else ()
    options = BenchOptions(
        methods=methods,
        k_sweep=k_sweep,
        progress=False,
        fraction=float(manifest.get("fraction", 1.0)),
        part=manifest.get("part"),
        run_missing=False,
    )
    return run_benchmark(resources, suite, tasks, out, options, log=log)
