"""Trace-driven simulation of planners (#30): a planner picks one recorded budget-independent configuration per
task and budget, and that configuration's trace, read at T by the benchmark's own :func:`outcome`, is the job.

Planners see a :class:`TaskView` (what is known before running: prompt length, N_max, a length prediction,
time models fitted from the folder's *other* tasks' traces), never the task's own trace — except those
registered with ``hindsight=True`` (``oracle``, an upper bound), which also get every configuration's outcome.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from timebill.bench.methods import DEFAULT_K, STOP_REFUSED, Method, Resources, Scorer, outcome
from timebill.bench.policies import POLICIES, JobOutcome
from timebill.bench.report import policy_table
from timebill.bench.runner import BenchData, BenchError, load_manifest, load_part, run_key, runs_predictor
from timebill.bench.stats import Column, Evaluation, combine, evaluate
from timebill.bench.suite import Task
from timebill.errors import InvalidInputError
from timebill.estimator.fit import LinFit, QuadFit, fit_decode, fit_prefill
from timebill.paths import write_bytes_atomically

log = logging.getLogger(__name__)

SIM_PREFIX = "sim:"


# ----------------------------------------------------------------------------------------- time models
@dataclass(frozen=True)
class ConfigTimeModel:
    """One configuration's times, fitted from traces: first token vs uncompressed prompt tokens, step vs KV length.

    ``first_token`` includes the compressor, prefill, eviction and the first token (the trace's first stamp);
    ``ratios`` are measured / predicted end-to-end times (at the generated length) of the runs fitted, sorted.
    """

    config: str
    first_token: QuadFit
    step: LinFit
    kv_fraction: float  # kept KV tokens / uncompressed prompt tokens (median over the runs)
    ratios: tuple[float, ...]

    def first_token_s(self, n_prompt: float) -> float:
        return float(self.first_token.predict(n_prompt))

    def step_s(self, n_kv: float) -> float:
        return float(self.step.predict(n_kv))

    def kept_kv(self, n_prompt: float) -> float:
        return self.kv_fraction * n_prompt

    def e2e_s(self, n_prompt: float, n_tokens: int) -> float:
        """Predicted time to the ``n_tokens``-th token: first token, then steps at KV kept + 1 … kept + n − 1."""
        return self.first_token_s(n_prompt) + self.step.sum_steps(self.kept_kv(n_prompt) + 1, max(0, n_tokens - 1))

    def ratio_quantile(self, q: float) -> float:
        """The q-quantile (nearest rank) of measured / predicted; 1.0 when nothing was fitted."""
        if not self.ratios:
            return 1.0
        return self.ratios[min(len(self.ratios) - 1, max(0, math.ceil(q * len(self.ratios)) - 1))]


def uncompressed_prompt_tokens(record: Mapping[str, Any]) -> int:
    """The prompt's length before any compression (a compress-ρ record's ``prompt_tokens`` is what it kept)."""
    return int(record.get("original_prompt_tokens") or record.get("prompt_tokens") or 0)


def fit_time_model(config: str, records: Sequence[Mapping[str, Any]]) -> ConfigTimeModel:
    """Least squares of the estimator's forms (:mod:`timebill.estimator.fit`) over one configuration's traces.

    A decode point is one run's median gap between tokens at its middle KV length (one point per run, so a
    long answer does not outweigh short ones; the median ignores a stray slow step, as the report's does).
    """
    firsts: list[tuple[float, float]] = []
    steps: list[tuple[float, float]] = []
    fractions: list[float] = []
    usable = []
    for r in records:
        times, n = r.get("token_times_s") or [], uncompressed_prompt_tokens(r)
        if not times or n <= 0 or not times[0] > 0:
            continue
        usable.append(r)
        kept = float(r.get("kept_kv_tokens") or n)
        firsts.append((n, float(times[0])))
        fractions.append(kept / n)
        gaps = [b - a for a, b in zip(times, times[1:], strict=False) if b > a]
        if len(gaps) >= 2:
            steps.append((kept + len(times) / 2, statistics.median(gaps)))
    if not firsts:
        raise BenchError(f"configuration {config!r} has no traces with tokens to fit a time model to")
    try:
        first = fit_prefill(*zip(*firsts, strict=True))
    except InvalidInputError:  # fewer than three prompt lengths: a constant
        first = QuadFit(0.0, 0.0, statistics.median(t for _, t in firsts))
    try:
        step = fit_decode(*zip(*steps, strict=True))
    except (InvalidInputError, TypeError):  # fewer than two KV lengths (or none)
        step = LinFit(0.0, statistics.median(t for _, t in steps) if steps else 0.0)
    model = ConfigTimeModel(config, first, step, statistics.median(fractions), ())
    ratios = []
    for r in usable:
        predicted = model.e2e_s(uncompressed_prompt_tokens(r), len(r["token_times_s"]))
        if predicted > 0:
            ratios.append(float(r["token_times_s"][-1]) / predicted)
    return replace(model, ratios=tuple(sorted(ratios)))


# ------------------------------------------------------------------------------------------ planners
@dataclass(frozen=True)
class TaskView:
    """What a planner may know about a task before running it."""

    task_id: str
    kind: str
    prompt_tokens: int  # uncompressed prompt length
    max_new_tokens: int  # N_max
    time_models: Mapping[str, ConfigTimeModel]  # per configuration, fitted without this task's traces
    length: Mapping[str, Any] | None = None  # a length predictor's output: "point", "probs", "class_lengths"
    hindsight: Mapping[str, JobOutcome] | None = None  # this task's real outcomes; hindsight planners only


Planner = Callable[[TaskView, float, str, Sequence[str]], "str | None"]
PLANNERS: dict[str, Planner] = {}
_HINDSIGHT: set[str] = set()


def register_planner(name: str, fn: Planner, *, hindsight: bool = False) -> None:
    """Add a planner under ``name``; ``hindsight=True`` gives it the task's real outcomes (label it an upper bound)."""
    if not name or name.startswith("fixed:") or "," in name:
        raise InvalidInputError(f"a planner name must be non-empty, without ',' and not 'fixed:…', got {name!r}")
    PLANNERS[name] = fn
    (_HINDSIGHT.add if hindsight else _HINDSIGHT.discard)(name)


def get_planner(name: str) -> Planner:
    """A registered planner, or ``fixed:<config>`` (always that configuration)."""
    if name.startswith("fixed:"):
        config = name.split(":", 1)[1]
        return lambda view, budget_s, policy, configs: config
    if name not in PLANNERS:
        raise InvalidInputError(f"unknown planner {name!r}; choose from {', '.join(sorted(PLANNERS))} or fixed:CONFIG")
    return PLANNERS[name]


def sees_hindsight(name: str) -> bool:
    return name in _HINDSIGHT


def planner_label(name: str) -> str:
    """How tables name a simulated planner; a hindsight planner says so."""
    return SIM_PREFIX + name + (" (hindsight)" if sees_hindsight(name) else "")


def policy_score(job: JobOutcome, policy: str) -> float:
    """One job's own score under ``policy`` (Skip-Next's own score is Kill's; what it skips is the stream's)."""
    if job.finished:
        return job.full_score
    return job.partial_score if policy == "guard" and job.answered else 0.0


def oracle_planner(view: TaskView, budget_s: float, policy: str, configs: Sequence[str]) -> str | None:
    """Best score in hindsight, then completion, then least processor time; refuse when nothing scores or ends.

    Exactly optimal per stream too: a chosen finished job holds the processor ≤ T (skips nothing), and a
    refusal holds it for no longer than any trace would.
    """
    if view.hindsight is None:
        raise InvalidInputError("the oracle needs hindsight outcomes (register it with hindsight=True)")
    best: tuple[float, bool, float] | None = None
    choice = None
    for config in configs:
        job = view.hindsight[config]
        key = (policy_score(job, policy), job.finished, -job.busy_s)
        if (key[0] > 0 or job.finished) and (best is None or key > best):  # else refusing is as good, and free
            best, choice = key, config
    return choice


def config_alpha(config: str) -> float | None:
    """α of a vanilla / snapkv-α configuration name; None for any other configuration."""
    if config == "vanilla":
        return 0.0
    if config.startswith("snapkv-"):
        try:
            return float(config.removeprefix("snapkv-"))
        except ValueError:
            return None
    return None


def paper_planner(view: TaskView, budget_s: float, policy: str, configs: Sequence[str]) -> str | None:
    """The paper's rule over the recorded α: the smallest α whose predicted worst case with
    N_W = min(k·N̂, N_max) fits T (N̂ = N_max without a prediction); if none fits, the largest α."""
    ladder = sorted((a, c) for c in configs if (a := config_alpha(c)) is not None)
    if not ladder:
        return None
    point = (view.length or {}).get("point")
    n_hat = float(point) if point is not None else float(view.max_new_tokens)
    n_worst = max(1, math.ceil(min(DEFAULT_K * n_hat, view.max_new_tokens)))
    for _, config in ladder:
        if view.time_models[config].e2e_s(view.prompt_tokens, n_worst) <= budget_s:
            return config
    return ladder[-1][1]


register_planner("oracle", oracle_planner, hindsight=True)
register_planner("paper", paper_planner)


# ------------------------------------------------------------------------------------------ simulation
@dataclass(frozen=True)
class SimulatedMethod(Method):
    """A planner's jobs under one policy, as a budget-aware method whose records are copies of traces."""

    name: str
    planner: str = ""
    policy: str = ""
    budgeted: bool = True

    def run(self, resources: Resources, task: Task, budget_s: float | None) -> dict[str, Any]:
        raise InvalidInputError("a simulated planner's jobs come from recorded traces; it cannot be run")

    def describe(self) -> str:
        return f"planner {self.planner!r} simulated on the recorded traces ({self.policy})"


@dataclass
class Simulation:
    """Cells by (row name, column key, policy) for the recorded methods and the simulated planners."""

    evaluation: Evaluation
    recorded: list[str]  # recorded methods, report order
    planners: list[str]  # planner names, as asked
    choices: dict[tuple[str, str, float], dict[str, int]] = field(default_factory=dict)  # (planner, policy, key)
    overhead_s: float = 0.0
    in_sample: bool = False

    def recorded_fixed(self) -> list[str]:
        """The recorded budget-independent configurations (the claims' references)."""
        from timebill.bench.methods import FixedAlpha, method_registry

        registry = method_registry()
        return [n for n in self.recorded if isinstance(registry.get(n), FixedAlpha)]

    def rows(self) -> list[Method]:
        names = [*self.recorded, *(planner_label(p) for p in self.planners)]
        return [SimulatedMethod(n) for n in names]


def _shifted(record: Mapping[str, Any], overhead_s: float) -> dict[str, Any]:
    """The trace as if planning took ``overhead_s`` first (same key: its scores are the same answers')."""
    out = dict(record)
    if overhead_s:
        out["token_times_s"] = [t + overhead_s for t in record.get("token_times_s", [])]
        out["e2e_s"] = float(record.get("e2e_s", math.inf)) + overhead_s
    return out


def _refused(name: str, task: Task, overhead_s: float) -> dict[str, Any]:
    empty: dict[str, Any] = {"text": "", "token_ids": [], "token_times_s": []}
    return {"key": f"{name}|{task.id}|refused", **empty, "stop_reason": STOP_REFUSED, "e2e_s": overhead_s}


def _view_prompt_tokens(task: Task, traces: Mapping[str, Mapping[str, Any]]) -> int:
    if "vanilla" in traces and traces["vanilla"].get("prompt_tokens"):
        return int(traces["vanilla"]["prompt_tokens"])
    found = [uncompressed_prompt_tokens(r) for r in traces.values() if uncompressed_prompt_tokens(r)]
    return found[0] if found else int(task.prompt_tokens or 0)


def _part_with_planners(
    data: BenchData,
    scorer: Scorer,
    planners: Sequence[str],
    overhead_s: float,
    predictions: Mapping[str, Mapping[str, Any]],
    in_sample: bool,
    choices: dict[tuple[str, str, float], dict[str, int]],
    level_of: Callable[[float], float],
) -> BenchData:
    """``data`` plus one :class:`SimulatedMethod` per (planner, policy), its records the chosen traces."""
    configs = [m.name for m in data.methods if not m.budgeted]
    traces = {t.id: {c: data.records[c][run_key(c, t.id, None)] for c in configs} for t in data.tasks}
    all_runs = {c: [traces[t.id][c] for t in data.tasks] for c in configs}
    shared = {c: fit_time_model(c, all_runs[c]) for c in configs} if in_sample else None
    methods = list(data.methods)
    records = {k: dict(v) for k, v in data.records.items()}
    for planner in planners:
        for policy in POLICIES:
            name = f"{SIM_PREFIX}{planner}@{policy}"
            methods.append(SimulatedMethod(name, planner, policy))
            records[name] = {}
    for task in data.tasks:
        if shared is not None:
            models = shared
        else:  # leave this task out: the planner must not learn its own trace
            others = [i for i, t in enumerate(data.tasks) if t.id != task.id]
            models = {c: fit_time_model(c, [all_runs[c][i] for i in others]) for c in configs}
        shifted = {c: _shifted(traces[task.id][c], overhead_s) for c in configs}
        n_prompt = _view_prompt_tokens(task, traces[task.id])
        base = TaskView(task.id, task.kind, n_prompt, task.max_new_tokens, models, predictions.get(task.id))
        for budget in data.budgets:
            outcomes = {c: outcome(shifted[c], task, budget, scorer) for c in configs}
            for planner in planners:
                fn, hindsight = get_planner(planner), sees_hindsight(planner)
                view = replace(base, hindsight=outcomes) if hindsight else base
                for policy in POLICIES:
                    choice = fn(view, budget, policy, configs)
                    if choice is not None and choice not in configs:
                        raise InvalidInputError(
                            f"planner {planner!r} chose {choice!r} for task {task.id} at T = {budget:g} s ({policy}); "
                            f"the recorded configurations are {', '.join(configs)}"
                        )
                    name = f"{SIM_PREFIX}{planner}@{policy}"
                    rec = _refused(name, task, overhead_s) if choice is None else dict(shifted[choice])
                    rec.update(budget_s=budget, chosen=choice)
                    records[name][run_key(name, task.id, budget)] = rec
                    tally = choices.setdefault((planner, policy, level_of(budget)), {})
                    tally[choice or "refuse"] = tally.get(choice or "refuse", 0) + 1
    return replace(data, methods=methods, records=records)


def _common_methods(parts: Sequence[BenchData]) -> list[BenchData]:
    """Each part cut to the methods every part has, so parts that differ only in extra recorded rows combine.

    Why: a part may have recorded planner methods that another part (run budget-independent only) lacks;
    the simulated planners are the comparison, and a row that not every part has cannot be pooled by level.
    """
    common = set.intersection(*({m.name for m in p.methods} for p in parts))
    dropped = sorted({m.name for p in parts for m in p.methods} - common)
    if dropped:
        log.info("simulating over the methods every part ran; left out: %s", ", ".join(dropped))
    return [replace(p, methods=[m for m in p.methods if m.name in common]) for p in parts]


def simulate(
    parts: Sequence[BenchData],
    scorer: Scorer,
    planners: Sequence[str],
    *,
    overhead_s: float = 0.0,
    predictions: Mapping[str, Mapping[str, Any]] | None = None,
    in_sample: bool = False,
) -> Simulation:
    """Every planner on every part's traces, summarised as the report does (one part: by budget; several: by level).

    ``in_sample=True`` fits each folder's time models once over all its tasks instead of leaving each task out.
    """
    if not parts:
        raise BenchError("nothing to simulate")
    if not math.isfinite(overhead_s) or overhead_s < 0:
        raise InvalidInputError(f"the planning overhead must be >= 0 s, got {overhead_s}")
    if not planners:
        raise InvalidInputError("no planners to simulate")
    for p in planners:
        get_planner(p)
    choices: dict[tuple[str, str, float], dict[str, int]] = {}
    extended = []
    for part in parts:
        index = {b: float(i) for i, b in enumerate(part.budgets)}
        level_of = (lambda b, index=index: index[b]) if len(parts) > 1 else (lambda b: b)
        extended.append(
            _part_with_planners(part, scorer, planners, overhead_s, predictions or {}, in_sample, choices, level_of)
        )
    extended = _common_methods(extended)
    ev = evaluate(extended[0], scorer) if len(extended) == 1 else combine(extended, scorer)[0]
    recorded = [m.name for m in extended[0].methods if not m.name.startswith(SIM_PREFIX)]
    cells = {k: v for k, v in ev.cells.items() if k[0] in recorded}
    for planner in planners:
        for col in ev.columns:
            for policy in POLICIES:
                found = ev.cells.get((f"{SIM_PREFIX}{planner}@{policy}", col.key, policy))
                if found is not None:
                    cells[(planner_label(planner), col.key, policy)] = found
    jobs: dict[str, dict[tuple[str, float], list[tuple[str, float]]]] = {"kill": {}, "guard": {}}
    for policy, source in (("kill", ev.kill_jobs), ("guard", ev.guard_jobs)):
        for (name, key), found in source.items():
            if name in recorded:
                jobs[policy][(name, key)] = found
        for planner in planners:  # a planner's jobs under the policy it was scored by
            for col in ev.columns:
                found = source.get((f"{SIM_PREFIX}{planner}@{policy}", col.key))
                if found is not None:
                    jobs[policy][(planner_label(planner), col.key)] = found
    shown = Evaluation(
        cells,
        {},
        [m for m in ev.missing if not m.startswith(SIM_PREFIX)],
        ev.columns,
        ev.x_label,
        kill_jobs=jobs["kill"],
        guard_jobs=jobs["guard"],
    )
    return Simulation(shown, recorded, list(planners), choices, overhead_s, in_sample)


# ---------------------------------------------------------------------------------------------- output
def policy_lines(sim: Simulation, policy: str) -> list[str]:
    return policy_table(sim.rows(), sim.evaluation, policy)


def _choice_lines(sim: Simulation, columns: Sequence[Column]) -> list[str]:
    md: list[str] = []
    for planner in sim.planners:
        for policy in POLICIES:
            tallies = [sim.choices.get((planner, policy, c.key), {}) for c in columns]
            order = {n: i for i, n in enumerate([*sim.recorded, "refuse"])}
            names = sorted({n for t in tallies for n in t}, key=lambda n: order.get(n, -1))
            header = "| choice | " + " | ".join(c.header for c in columns) + " |"
            md += [f"`{planner}` under {policy} (share of jobs):", "", header, "|---|" + "---|" * len(columns)]
            for n in names:
                cells = [f"{100 * t.get(n, 0) / max(1, sum(t.values())):.0f} %" for t in tallies]
                md.append(f"| {n} | " + " | ".join(cells) + " |")
            md.append("")
    return md


def simulation_markdown(sim: Simulation, dirs: Sequence[str], command: str) -> str:
    ev = sim.evaluation
    md = [
        "# Simulated planners on recorded traces",
        "",
        f"- Command: `{command}`",
        f"- Run folders ({len(dirs)}): " + ", ".join(f"`{d}`" for d in dirs),
        f"- Planners: {', '.join(f'`{p}`' for p in sim.planners)}; planning overhead {sim.overhead_s:g} s added "
        "to every chosen trace",
        "- Time models: per folder and configuration, fitted to "
        + (
            "all its tasks' traces (in sample)" if sim.in_sample else "the folder's other tasks' traces (leave one out)"
        ),
        "",
        "A simulated job is the chosen configuration's recorded trace (one run per task, no deadline) read at T "
        "by the benchmark's own rules, so Kill, Skip-Next and guard apply unchanged; a refusal scores 0. "
        "Rows without `sim:` are the recorded methods, as in results.md. "
        + ("Columns are budget levels (job-weighted over the folders). " if len(dirs) > 1 else "")
        + "A `(hindsight)` planner saw each task's real outcomes: an upper bound, not a planner.",
        "",
    ]
    for policy in POLICIES:
        md += [f"## Average score (completion rate) — {policy}", "", *policy_lines(sim, policy), ""]
    md += ["## What the planners chose", "", *_choice_lines(sim, ev.columns)]
    kill, guard = planner_label("expected-kill"), planner_label("expected-guard")
    rows = {m.name for m in sim.rows()}
    if kill in rows or guard in rows:
        from timebill.bench.claims import claims, claims_lines

        data = claims(ev, sim.rows(), kill_method=kill, guard_method=guard, fixed=sim.recorded_fixed())
        md += ["", "## The expected-score planner's claims, simulated", "", *claims_lines(data)]
    return "\n".join(md)


def simulation_record(sim: Simulation, dirs: Sequence[str], command: str) -> dict[str, Any]:
    ev = sim.evaluation
    return {
        "command": command,
        "dirs": list(dirs),
        "planners": sim.planners,
        "recorded": sim.recorded,
        "overhead_s": sim.overhead_s,
        "in_sample": sim.in_sample,
        "x_label": ev.x_label,
        "columns": [{"key": c.key, "header": c.header} for c in ev.columns],
        "cells": [
            {
                "method": m,
                "column": k,
                "policy": p,
                "avg_score": s.avg_score,
                "completion_rate": s.completion_rate,
                "jobs": s.jobs,
                "skipped": s.skipped,
            }
            for (m, k, p), s in ev.cells.items()
        ],
        "choices": [
            {"planner": pl, "policy": po, "column": k, "counts": dict(sorted(c.items()))}
            for (pl, po, k), c in sim.choices.items()
        ],
    }


def write_simulation(sim: Simulation, out_dir: str | os.PathLike[str], dirs: Sequence[str], command: str) -> Path:
    """``simulated.md`` and ``simulated.json`` in ``out_dir``, each written atomically; returns the markdown's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "simulated.md"
    write_bytes_atomically(path, (simulation_markdown(sim, dirs, command) + "\n").encode())
    record = simulation_record(sim, dirs, command)
    write_bytes_atomically(out / "simulated.json", (json.dumps(record, indent=1, allow_nan=False) + "\n").encode())
    return path


# --------------------------------------------------------------------------------------------- loading
class _TraceEngine:
    """What :func:`load_part` and the scorer ask of an engine, without loading weights: the manifest's
    identity and the model's tokenizer (loaded on first decode)."""

    weights = "fp32"
    decode_path = "–"

    def __init__(self, manifest: Mapping[str, Any], model: str | None) -> None:
        self.source = SimpleNamespace(model_id=manifest.get("model_id"), fingerprint=manifest.get("model_fingerprint"))
        self.threads = manifest.get("threads")
        self._model = model
        self._tokenizer: Any = None
        self._stop_ids: set[int] | None = None

    def encode(self, prompt: str, chat: bool = True) -> None:  # the prompts ran already: nothing to check
        return None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from timebill.loading import load_tokenizer, resolve_model

            self._tokenizer = load_tokenizer(resolve_model(self._model))
        return self._tokenizer

    @property
    def stop_ids(self) -> set[int]:
        """The engine's stop tokens as far as the tokenizer knows them (EOS and end-of-turn markers)."""
        if self._stop_ids is None:
            tok = self.tokenizer
            ids = {int(tok.eos_token_id)} if tok.eos_token_id is not None else set()
            for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
                tid = tok.convert_tokens_to_ids(marker)
                if isinstance(tid, int) and tid >= 0 and tid != tok.unk_token_id:
                    ids.add(tid)
            self._stop_ids = ids
        return self._stop_ids


def load_traces(
    dirs: Sequence[str | os.PathLike[str]], suite: str | None = None, model: str | None = None
) -> tuple[list[BenchData], Scorer]:
    """Read ``timebill bench`` folders without loading a model; the scorer decodes with the model's tokenizer."""
    parts, scorer = [], None
    for d in dirs:
        manifest = load_manifest(Path(d))
        if manifest is None:
            raise BenchError(f"{d} has no manifest.json: it is not a `timebill bench` output directory")
        resources = Resources(_TraceEngine(manifest, model), predictor_label=runs_predictor(d) or "")
        if scorer is None:
            scorer = Scorer(resources.decode)  # one tokenizer for every folder (one model, checked below)
        parts.append(load_part(resources, d, suite, log=lambda m: print(m, file=sys.stderr)))
    models = {(m.get("model_id"), m.get("model_fingerprint")) for m in map(load_manifest, map(Path, dirs)) if m}
    if len(models) > 1:
        raise BenchError(f"the folders' runs come from different models ({sorted(map(str, models))})")
    assert scorer is not None
    return parts, scorer


def read_predictions(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """``{"task_id", "point", "probs", "class_lengths"}`` lines, by task id."""
    found: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            found[str(row["task_id"])] = {k: v for k, v in row.items() if k != "task_id"}
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidInputError(f"{path} line {number} is not a prediction ({exc})") from exc
    return found


def prediction_row(task_id: str, prediction: Any) -> dict[str, Any]:
    """One ``--predictions`` line from a :class:`~timebill.predictor.base.LengthPrediction`.

    Made with the facade's own path, e.g. ``prediction_row(t.id, tb.predict_length(t.prompt, chat=t.chat))``
    for a ``TimeBill`` built as ``timebill bench`` builds it (same predictor text as a real request's).
    """
    row: dict[str, Any] = {"task_id": task_id, "point": int(prediction.point)}
    if getattr(prediction, "probs", None) is not None:
        row["probs"] = [float(p) for p in prediction.probs]
        row["class_lengths"] = [float(c) for c in prediction.class_lengths]
    return row


def write_predictions(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``--predictions`` lines atomically (what :func:`read_predictions` reads back)."""
    target = Path(path)
    write_bytes_atomically(target, "".join(json.dumps(dict(r), allow_nan=False) + "\n" for r in rows).encode())
    return target
