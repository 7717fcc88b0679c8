"""The methods the benchmark compares: small classes behind one interface, one run record each.

| method | family | budget-aware | what runs | paper |
|---|---|---|---|---|
| ``vanilla`` | :class:`FixedAlpha` | no | α = 0, fp32 | Vanilla |
| ``snapkv-0.25`` … ``snapkv-0.95`` | :class:`FixedAlpha` | no | SnapKV at a fixed α | fixed α |
| ``int8`` | :class:`FixedAlpha` | no | α = 0, int8 dynamic quantisation of the linear layers | AWQ (CPU counterpart) |
| ``int4`` | :class:`FixedAlpha` | no | α = 0, the GGUF's 4-bit (Q4_1) layer weights, int8 LM head | AWQ-like 4-bit |
| ``compress-0.25`` … ``compress-0.9`` | :class:`FixedAlpha` | no | BM25 prompt compression at a fixed ρ, α = 0 | ours |
| ``timebill`` | :class:`TimeBillMethod` | yes | k = 5 bound, no re-planning | TimeBill |
| ``timebill-conformal`` | :class:`TimeBillMethod` | yes | the predictor's calibrated upper(δ = 0.05) bound | ours |
| ``timebill-replan`` | :class:`TimeBillMethod` | yes | k = 5 and closed-loop re-planning | ours |
| ``timebill-k1`` … ``timebill-k8`` | :class:`TimeBillMethod` | yes | the k sweep (k = 5 is ``timebill``) | Fig. 8 |

A budget-independent method runs **once per task** with no deadline and keeps its per-token timestamps
(measured from the request's start) and token ids; every budget and overrun policy is then applied to
that trace (:func:`outcome`); a fixed-ρ method's timestamps include its compressor's time, which runs
before prefill on the request's path. A TimeBill method runs once per task *and budget*, since its plan depends
on T; the engine's deadline guard is always on for it. Both kinds leave the same record fields
(``token_ids``, ``token_times_s``, ``stop_reason``, ``e2e_s``, ``text``), so one function reads any
record at any budget.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from timebill.bench.metrics import score as metric_score
from timebill.bench.policies import JobOutcome
from timebill.bench.suite import Task
from timebill.errors import InfeasibleBudgetError, InvalidInputError
from timebill.options import DEFAULT_COMPRESSOR
from timebill.predictor.constant import parse_constant_spec

DEFAULT_K = 5
FIXED_ALPHAS = (0.25, 0.5, 0.75, 0.95)
#: ρ of the fixed prompt-compression methods (fraction of prompt tokens removed before prefill).
FIXED_RHOS = (0.25, 0.5, 0.75, 0.9)
K_SWEEP = tuple(range(1, 9))
FINISHED_STOPS = ("eos", "max_tokens")
STOP_REFUSED = "refused"  # TimeBill refused the request before any work (prefill alone exceeds T)


# ---------------------------------------------------------------------------------- length predictor
def predictor_label(spec: str | None) -> str:
    """How reports name the length predictor; also what marks TimeBill runs made with another one.

    A file is named with a hash of its bytes, so retraining it in place makes old TimeBill runs stale.
    """
    length = parse_constant_spec(spec) if spec else None
    if length is not None:
        return f"constant:{length} (stand-in: N̂ = {length} tokens for every prompt; not the trained predictor)"
    from timebill.predictor import DEFAULT_PREDICTOR_FILE, DEFAULT_PROBE_FILE, DEFAULT_RLP_FILE

    shipped = {"rlp": DEFAULT_RLP_FILE, "probe": DEFAULT_PROBE_FILE}
    path = DEFAULT_PREDICTOR_FILE if spec is None else shipped.get(spec, Path(spec))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else "missing"
    return f"{path.name} (sha256 {digest})"


# ------------------------------------------------------------------------------------------ resources
class Resources:
    """What methods run on: the fp32 engine, lazily loaded int8/int4 engines, a lazily built TimeBill.

    Loading is deferred so a run that asks for neither pays for neither; tests pass their fixtures.
    """

    def __init__(
        self,
        engine: Any,  # timebill.engine.Engine (fp32)
        *,
        load_engine: Callable[[str], Any] | None = None,  # weights -> Engine
        make_timebill: Callable[[Any], Any] | None = None,  # fp32 Engine -> TimeBill
        predictor_label: str = "",
        make_selector: Callable[[Resources], Any] | None = None,  # -> timebill.selector.Selector
        quality_label: str = "",  # the expected-score planner's quality file (name and hash); "": any
    ) -> None:
        self.engine = engine
        self._engines: dict[str, Any] = {engine.weights: engine}
        self._load_engine = load_engine
        self._make_timebill = make_timebill
        self._timebill: Any = None
        self.predictor_label = predictor_label
        self.quality_label = quality_label
        self._make_selector = make_selector
        self._selector: Any = None

    def engine_for(self, weights: str) -> Any:
        if weights not in self._engines:
            if self._load_engine is None:
                raise InvalidInputError(f"no {weights} engine is available to this benchmark run")
            self._engines[weights] = self._load_engine(weights)
        return self._engines[weights]

    def timebill(self) -> Any:
        if self._timebill is None:
            if self._make_timebill is None:
                raise InvalidInputError("TimeBill methods need an estimator profile and a length predictor")
            self._timebill = self._make_timebill(self.engine)
        return self._timebill

    def selector(self) -> Any:
        """The expected-score planner's engines (every weights mode, loaded side by side) and quality model."""
        if self._selector is None:
            if self._make_selector is None:
                raise InvalidInputError("expected-score TimeBill methods need profiles and a quality model")
            self._selector = self._make_selector(self)
        return self._selector

    def decode_paths(self) -> dict[str, str]:
        return {weights: engine.decode_path for weights, engine in self._engines.items()}

    def decode(self, token_ids: list[int]) -> str:
        """Text of some generated tokens, exactly as the engine builds a result's text (stop tokens dropped)."""
        stops = self.engine.stop_ids
        return self.engine.tokenizer.decode([t for t in token_ids if t not in stops], skip_special_tokens=True)


# -------------------------------------------------------------------------------------------- methods
class Method(ABC):
    """One way of answering a task; ``run`` returns a JSON-able record (timings, tokens, text)."""

    name: str
    budgeted: bool  # True: runs once per budget; False: once per task, budgets applied to its trace

    @abstractmethod
    def run(self, resources: Resources, task: Task, budget_s: float | None) -> dict[str, Any]: ...

    def stale(self, record: dict[str, Any], resources: Resources) -> str | None:
        """Why ``record`` no longer counts as this method's run with ``resources`` (None: it counts).

        A budget-independent run depends only on the engine; a planned run also on what it planned with.
        """
        return None

    @abstractmethod
    def describe(self) -> str: ...


@dataclass(frozen=True)
class FixedAlpha(Method):
    """One fixed configuration, whatever the budget: evict a fraction α of the prompt KV (SnapKV) after
    prefill, on ``weights``, after removing a fraction ρ (``prompt_compression``) of the prompt's tokens
    with ``compressor`` before it. α = ρ = 0 on fp32 is vanilla decoding.
    """

    name: str
    alpha: float
    weights: str = "fp32"
    press: str = "snapkv"
    budgeted: bool = False
    prompt_compression: float = 0.0
    compressor: str = DEFAULT_COMPRESSOR

    def run(self, resources: Resources, task: Task, budget_s: float | None) -> dict[str, Any]:
        engine = resources.engine_for(self.weights)
        result = engine.generate(
            task.prompt,
            alpha=self.alpha,
            max_new_tokens=task.max_new_tokens,
            press=self.press,
            chat=task.chat,
            prompt_compression=self.prompt_compression,
            compressor=self.compressor,
        )
        times = list(result.token_times_s)
        compressed = {}
        if self.prompt_compression > 0:  # prompt_tokens is then what was prefilled (the kept tokens)
            compressed = {
                "original_prompt_tokens": result.original_prompt_tokens,
                "prompt_compression": result.prompt_compression,  # ρ reached, not asked
                "compressor": result.compressor,
                "compress_s": result.compress_s,
            }
        return {
            "text": result.text,
            "token_ids": list(result.token_ids),
            "token_times_s": times,
            "stop_reason": result.stop_reason,
            "e2e_s": times[-1] if times else result.total_s,
            "prompt_tokens": result.prompt_tokens,
            "kept_kv_tokens": result.kept_kv_tokens,
            "alpha": result.alpha,
            "prefill_s": result.prefill_s,
            "evict_s": result.evict_s,
            "decode_s": result.decode_s,
            "decode_path": result.decode_path,
            **compressed,
        }

    def describe(self) -> str:
        what = "vanilla" if self.alpha == 0 else f"SnapKV α = {self.alpha:g}"
        if self.prompt_compression > 0:
            rho = f"{self.compressor} prompt compression ρ = {self.prompt_compression:g} before prefill"
            what = rho if self.alpha == 0 else f"{rho}, then {what}"
        return f"{what}, {self.weights} weights (one run per task; budgets applied to its trace)"


def refused_record(exc: InfeasibleBudgetError, t0: float, **extra: Any) -> dict[str, Any]:
    """The run record of a request refused before any work: no tokens, the refusal's words, time to refuse."""
    return {
        "text": "",
        "token_ids": [],
        "token_times_s": [],
        "stop_reason": STOP_REFUSED,
        "e2e_s": time.perf_counter() - t0,
        "refused": str(exc),
        **extra,
    }


#: A TimeBill run's record field ← the :meth:`TimeBillResult.to_record` field it holds. The run files
#: predate that record and keep their own (shorter) names, so that old and new runs read alike.
_RECORD_FIELDS = {
    "text": "text",
    "stop_reason": "stop_reason",
    "e2e_s": "measured_e2e_s",
    "prompt_tokens": "prompt_tokens",
    "kept_kv_tokens": "kept_kv_tokens",
    "alpha": "alpha_final",
    "alpha_star": "alpha_star",
    "n_hat": "n_hat",
    "n_worst": "n_worst",
    "feasible": "feasible",
    "predicted_prefill_s": "predicted_prefill_s",
    "predicted_wcet_s": "predicted_wcet_s",
    "prefill_s": "measured_prefill_s",
    "decode_s": "measured_decode_s",
    "t_predict_s": "t_predict_s",
    "decode_path": "decode_path",
}


@dataclass(frozen=True)
class TimeBillMethod(Method):
    """TimeBill's request path at budget T: predict N̂, plan α*, evict, decode under the guard."""

    name: str
    k: float = DEFAULT_K
    bound: str = "k"
    replan: bool = False
    budgeted: bool = True
    # The paper's rule when no α fits (run at α_max); the library's default picks a smaller α instead.
    infeasible_slack: float = 0.0

    def run(self, resources: Resources, task: Task, budget_s: float | None) -> dict[str, Any]:
        if budget_s is None:
            raise InvalidInputError(f"{self.name} needs a time budget")
        tb = resources.timebill()
        options = tb.request_options(
            max_new_tokens=task.max_new_tokens,
            k=self.k,
            bound=self.bound,
            replan=self.replan,
            infeasible_slack=self.infeasible_slack,
        )
        t0 = time.perf_counter()
        try:
            result = tb.generate(task.prompt, budget_s, options, chat=task.chat)
        except InfeasibleBudgetError as exc:
            return refused_record(exc, t0, predictor=resources.predictor_label)
        full = result.to_record()
        gen = result.generation
        record = {name: full[source] for name, source in _RECORD_FIELDS.items()}
        record["token_ids"] = list(gen.token_ids)
        record["token_times_s"] = list(gen.token_times_s)
        record["replans"] = len(result.replans)
        record["predictor"] = resources.predictor_label
        # For the Fig. 6 plot: the time model's e2e (with its online correction, as the plan used it) at the
        # length actually generated and the final α.
        try:
            record["predicted_e2e_s"] = tb.estimator.e2e_s(
                gen.prompt_tokens, min(gen.alpha, 0.999999), max(1, gen.tokens_generated)
            )
        except InvalidInputError:
            record["predicted_e2e_s"] = None
        return record

    def stale(self, record: dict[str, Any], resources: Resources) -> str | None:
        if record.get("predictor") != resources.predictor_label:
            return "made with another length predictor"
        return None

    def describe(self) -> str:
        bound = "calibrated upper(δ) bound" if self.bound == "conformal" else f"k = {self.k:g}"
        return f"TimeBill, {bound}, re-planning {'on' if self.replan else 'off'} (one run per task and budget)"


@dataclass(frozen=True)
class ExpectedScoreMethod(Method):
    """TimeBill's expected-score planner at budget T: choose weights × ρ × α for the policy, run it guarded.

    One method per overrun policy, since the objective depends on it (``timebill-kill`` maximises
    Q·P(finish), ``timebill-guard`` the expected score of what is delivered by T); the report reads each
    under every policy, and the claims compare each under its own.
    """

    name: str
    policy: str = "kill"
    budgeted: bool = True

    def run(self, resources: Resources, task: Task, budget_s: float | None) -> dict[str, Any]:
        if budget_s is None:
            raise InvalidInputError(f"{self.name} needs a time budget")
        selector = resources.selector()
        t0 = time.perf_counter()
        try:
            out = selector.generate(
                task.prompt,
                budget_s,
                policy=self.policy,
                kind=task.kind,
                max_new_tokens=task.max_new_tokens,
                chat=task.chat,
                t_start=t0,
            )
        except InfeasibleBudgetError as exc:
            return refused_record(exc, t0, planner="expected")
        gen = out.generation
        times = list(gen.token_times_s)
        best = out.selection.choice.best
        assert best is not None
        return {
            "text": gen.text,
            "token_ids": list(gen.token_ids),
            "token_times_s": times,
            "stop_reason": gen.stop_reason,
            "e2e_s": times[-1] if times else gen.total_s,
            "prompt_tokens": gen.prompt_tokens,
            "kept_kv_tokens": gen.kept_kv_tokens,
            "alpha": gen.alpha,
            "weights": best.knobs.weights,
            "prompt_compression": best.knobs.rho,
            "configuration": best.knobs.label,
            "p_finish": best.p_finish,
            "expected_score": best.expected_score,
            "plan_s": out.selection.plan_s,
            "prefill_s": gen.prefill_s,
            "decode_s": gen.decode_s,
            "decode_path": gen.decode_path,
            "compress_s": getattr(gen, "compress_s", 0.0),
            "planner": "expected",
            "quality": resources.quality_label,
            "selection": out.selection.to_record(),
        }

    def stale(self, record: dict[str, Any], resources: Resources) -> str | None:
        """Planned with another quality model (this planner reads no length predictor: its lengths are the
        quality model's per-kind prior). Only a run that will plan compares labels: reading a folder
        (``--report-only``, ``bench-combine``, the simulator) keeps whatever the runs were made with."""
        if resources.quality_label and record.get("quality") != resources.quality_label:
            return "planned with another quality model"
        return None

    def describe(self) -> str:
        return (
            f"TimeBill's expected-score planner for {self.policy}: weights × ρ × α chosen per request "
            "(one run per task and budget, deadline guard on)"
        )


def method_registry() -> dict[str, Method]:
    """Every method the CLI's ``--methods`` accepts, in report order."""
    methods: dict[str, Method] = {"vanilla": FixedAlpha("vanilla", 0.0)}
    for alpha in FIXED_ALPHAS:
        methods[f"snapkv-{alpha:g}"] = FixedAlpha(f"snapkv-{alpha:g}", alpha)
    methods["int8"] = FixedAlpha("int8", 0.0, weights="int8")
    methods["int4"] = FixedAlpha("int4", 0.0, weights="int4")
    for rho in FIXED_RHOS:
        methods[f"compress-{rho:g}"] = FixedAlpha(f"compress-{rho:g}", 0.0, prompt_compression=rho)
    methods["timebill"] = TimeBillMethod("timebill")
    methods["timebill-conformal"] = TimeBillMethod("timebill-conformal", bound="conformal")
    methods["timebill-replan"] = TimeBillMethod("timebill-replan", replan=True)
    methods["timebill-kill"] = ExpectedScoreMethod("timebill-kill", policy="kill")
    methods["timebill-guard"] = ExpectedScoreMethod("timebill-guard", policy="guard")
    return methods


#: Other names ``--methods`` accepts. Why: issue #30 names the paper-faithful planner ``timebill-paper`` beside
#: the expected-score ``timebill-kill``/``-guard``, while its committed runs are filed as ``timebill``.
METHOD_ALIASES = {"timebill-paper": "timebill"}


def resolve_method_names(names: Sequence[str]) -> list[str]:
    """``names`` with aliases replaced by the registry's names, first occurrence kept, order kept."""
    out: list[str] = []
    for name in names:
        name = METHOD_ALIASES.get(name, name)
        if name not in out:
            out.append(name)
    return out


def k_sweep_method(k: int) -> TimeBillMethod:
    """TimeBill at pessimistic factor ``k``; k = 5 *is* ``timebill`` (same runs, same records)."""
    return TimeBillMethod("timebill" if k == DEFAULT_K else f"timebill-k{k}", k=k)


# ------------------------------------------------------------------------------------- reading records
class Scorer:
    """Scores answers and answer prefixes, caching both (a trace is read at many budgets)."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self._cache: dict[tuple[str, str, int], float] = {}

    def full(self, key: str, task: Task, record: dict[str, Any]) -> float:
        cache_key = (key, task.id, -1)
        if cache_key not in self._cache:
            self._cache[cache_key] = metric_score(task.metric, record.get("text", ""), task.references)
        return self._cache[cache_key]

    def prefix(self, key: str, task: Task, record: dict[str, Any], n_tokens: int) -> float:
        ids = record.get("token_ids", [])
        if n_tokens >= len(ids):
            return self.full(key, task, record)
        cache_key = (key, task.id, n_tokens)
        if cache_key not in self._cache:
            self._cache[cache_key] = metric_score(task.metric, self.decode(ids[:n_tokens]), task.references)
        return self._cache[cache_key]


def finished_by(record: dict[str, Any], budget_s: float) -> bool:
    """The run's full answer (ended by EOS or N_max, not cut) had come by ``budget_s``: the paper's completion."""
    e2e = float(record.get("e2e_s", math.inf))
    return record.get("stop_reason") in FINISHED_STOPS and bool(record.get("token_times_s")) and e2e <= budget_s


def outcome(record: dict[str, Any], task: Task, budget_s: float, scorer: Scorer) -> JobOutcome:
    """Read one run record at budget T: finished by T? full and partial scores, processor time held.

    ``finished``: the answer ended by itself (EOS or N_max) and its last token came by T. The partial
    answer is the tokens stamped at or before T. ``busy_s`` is the record's end-to-end time: a trace ran
    to its end (what Skip-Next lets an overrunning job do); a TimeBill run stopped where its guard stopped it.
    """
    times = record.get("token_times_s", [])
    e2e = float(record.get("e2e_s", math.inf))
    finished = finished_by(record, budget_s)
    n_by_deadline = bisect.bisect_right(times, budget_s)
    key = str(record.get("key", ""))
    full = scorer.full(key, task, record) if finished else 0.0
    partial = scorer.prefix(key, task, record, n_by_deadline) if n_by_deadline else 0.0
    return JobOutcome(
        task_id=task.id,
        finished=finished,
        full_score=full,
        partial_score=partial,
        answered=n_by_deadline > 0,
        busy_s=e2e,
    )
