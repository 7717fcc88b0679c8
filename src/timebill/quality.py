"""The quality model Q(θ | kind): expected score of a configuration θ = (weights, ρ, α), measured offline.

``timebill calibrate`` runs the budget-independent bench methods (vanilla, int8/int4, SnapKV at fixed α,
BM25 compression at fixed ρ) on the *calibration* suites (``benchmarks/suites/calibration-v1.jsonl``,
``calibration-v2.jsonl`` and ``calibration-v3.jsonl``, 24 tasks each, all disjoint from the evaluation suite),
and :func:`fit_quality_many` combines their run records (each suite's runs in their own directory) into one
JSON file per model:
per task kind, vanilla's mean score, each knob's score relative to vanilla, the score of vanilla's answer
cut short (for the guard policy's partial answers) and vanilla's answer lengths (a length prior).

Per-kind factors are shrunk toward the pooled one (empirical Bayes, :func:`shrink_toward_pooled`): with 8
calibration tasks per kind a kind's raw factor carries a standard error of 5-15 %, as large as the differences
between configurations the planner must tell apart, and choosing the argmax of such noisy estimates pays the
winner's curse (``docs/results/simulate-expected/FINDINGS.md``). A kind keeps its own factor only as far as
the spread between kinds exceeds what their standard errors explain.
"""

from __future__ import annotations

import bisect
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from timebill.errors import InvalidInputError, TimeBillError
from timebill.selection import LengthDistribution

QUALITY_FORMAT = "timebill-quality"
# v2: per-kind factors shrunk toward the pooled one; raw factors and SEs kept. v3: fitted from several
# calibration suites at once ("suites": a list of name / sha256 / runs directory / tasks).
QUALITY_FORMAT_VERSION = 4  # 4: lengths carry a censored flag (an answer cut at its N_max); prompt-length buckets
#: Prompt-length bucket edges (uncompressed prompt tokens) of the length adjustment: short below, long from it.
#: 2048 is the calibration suites' median prompt and SmolLM2's pre-training context length.
PROMPT_EDGES = (2048,)
#: The shipped quality model of the default model (written by ``timebill calibrate``).
DEFAULT_QUALITY_FILE = Path(__file__).parent / "data" / "quality-smollm2-135m.json"
DEFAULT_CALIBRATION_SUITES = (
    Path("benchmarks") / "suites" / "calibration-v1.jsonl",
    Path("benchmarks") / "suites" / "calibration-v2.jsonl",
    Path("benchmarks") / "suites" / "calibration-v3.jsonl",
)
DEFAULT_CALIBRATION_SUITE = DEFAULT_CALIBRATION_SUITES[0]
#: The evaluation suite's name: calibrating on it would leak the evaluated tasks into the planner.
EVALUATION_SUITE_NAME = "longbench-style-v1"
CALIBRATION_METHODS = (
    "vanilla",
    "int8",
    "int4",
    "snapkv-0.25",
    "snapkv-0.5",
    "snapkv-0.75",
    "snapkv-0.95",
    "compress-0.25",
    "compress-0.5",
    "compress-0.75",
    "compress-0.9",
)
PARTIAL_FRACTIONS = tuple(round(0.1 * i, 1) for i in range(1, 11))
ALL = "all"


class QualityError(TimeBillError):
    """A quality-model file is missing, corrupt, of another format, or made for another model."""


def knob_of(method: str) -> str | None:
    """The quality-model key a budget-independent bench method measures (``None``: vanilla, the reference).

    ``int8`` → ``weights:int8``, ``snapkv-0.75`` → ``alpha:0.75``, ``compress-0.5`` → ``rho:0.5``; anything
    else (budgeted methods, unknown names, combined knobs) is an :class:`InvalidInputError`.
    """
    from timebill.bench.methods import FixedAlpha, method_registry

    spec = method_registry().get(method)
    if not isinstance(spec, FixedAlpha) or spec.budgeted:
        raise InvalidInputError(
            f"{method!r} is not a budget-independent method; calibrate with {', '.join(CALIBRATION_METHODS)}"
        )
    moved = [
        key
        for key, on in (
            (f"weights:{spec.weights}", spec.weights != "fp32"),
            (f"alpha:{spec.alpha:g}", spec.alpha > 0),
            (f"rho:{spec.prompt_compression:g}", spec.prompt_compression > 0),
        )
        if on
    ]
    if len(moved) > 1:
        raise InvalidInputError(f"{method!r} moves more than one knob; the quality model measures one at a time")
    return moved[0] if moved else None


# ------------------------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class KindQuality:
    """The measurements of one task kind (or of all tasks pooled)."""

    n: int  # tasks with a vanilla run
    base: float  # vanilla's mean full score, in [0, 1]
    relative: dict[str, float]  # "weights:int8" / "rho:0.5" / "alpha:0.75" → the factor the planner reads
    partial: list[tuple[float, float]]  # (fraction f, score of vanilla cut to ceil(f·len) tokens / base)
    lengths: list[int]  # vanilla's answer lengths in tokens (an empirical length prior)
    # What ``relative`` was shrunk from: mean(config) / mean(vanilla) over the kind's paired tasks, its
    # standard error (None: fewer than two pairs), and the weight w the kind's own factor kept (1 = unshrunk).
    relative_raw: dict[str, float] = field(default_factory=dict)
    relative_se: dict[str, float | None] = field(default_factory=dict)
    shrink_weight: dict[str, float] = field(default_factory=dict)
    # Per length: True where vanilla was stopped by its task's N_max, not by EOS (the length is a lower bound).
    lengths_censored: list[bool] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "base": round(self.base, 6),
            "relative": {k: round(v, 6) for k, v in self.relative.items()},
            "relative_raw": {k: round(v, 6) for k, v in self.relative_raw.items()},
            "relative_se": {k: None if v is None else round(v, 6) for k, v in self.relative_se.items()},
            "shrink_weight": {k: round(v, 6) for k, v in self.shrink_weight.items()},
            "partial": [[f, round(g, 6)] for f, g in self.partial],
            "lengths": list(self.lengths),
            "lengths_censored": list(self.lengths_censored or [False] * len(self.lengths)),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> KindQuality:
        try:
            n, base = int(data["n"]), float(data["base"])
            relative = {str(k): float(v) for k, v in data["relative"].items()}
            partial = [(float(f), float(g)) for f, g in data["partial"]]
            lengths = [int(x) for x in data["lengths"]]
            raw = {str(k): float(v) for k, v in data.get("relative_raw", {}).items()}
            se = {str(k): None if v is None else float(v) for k, v in data.get("relative_se", {}).items()}
            weight = {str(k): float(v) for k, v in data.get("shrink_weight", {}).items()}
            censored = [bool(x) for x in data["lengths_censored"]]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise QualityError(f"{where} is malformed ({exc!r}); rebuild it with `timebill calibrate`") from exc
        bad = [k for k in relative if k.split(":", 1)[0] not in ("weights", "rho", "alpha")]
        if bad or not all(math.isfinite(v) and v >= 0 for v in [base, *relative.values()]):
            raise QualityError(f"{where} holds invalid values; rebuild it with `timebill calibrate`")
        if len(censored) != len(lengths):
            raise QualityError(f"{where} has {len(censored)} censored flags for {len(lengths)} lengths")
        return cls(n, base, relative, sorted(partial), lengths, raw, se, weight, censored)

    def knob_points(self, knob: str) -> list[tuple[float, float]]:
        """Measured (value, factor) of ``rho`` or ``alpha``, sorted, without the implicit (0, 1)."""
        prefix = f"{knob}:"
        return sorted((float(k[len(prefix) :]), r) for k, r in self.relative.items() if k.startswith(prefix))


def _interpolate(points: Sequence[tuple[float, float]], x: float) -> float:
    """Piecewise-linear through ``points`` (sorted by x); constant beyond either end."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return points[-1][1]


@dataclass(frozen=True)
class QualityModel:
    """Q(θ | kind) = base_kind × r_weights × r_ρ × r_α — one factor per knob, measured one at a time."""

    model_id: str
    model_fingerprint: str
    suites: list[dict[str, Any]]  # per calibration suite: name, sha256, runs_dir, tasks (with a vanilla run)
    kinds: dict[str, KindQuality]  # "retrieval", "code", "chat", ..., and "all"
    command: str = ""
    created: str = ""
    machine: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # The prompt-length adjustment: bucket edges (prompt tokens) and, per bucket, the tasks of every kind in it
    # fitted like a kind and shrunk toward ``all``. Empty: no adjustment (a model fitted without prompt lengths).
    prompt_edges: tuple[int, ...] = ()
    prompt_buckets: tuple[KindQuality, ...] = ()

    def kind(self, kind: str | None) -> KindQuality:
        """The measurements of ``kind``; an unknown kind (or None) reads the pooled ``all``."""
        return self.kinds.get(kind or ALL) or self.kinds[ALL]

    def _factor(self, k: KindQuality, knob: str, value: float) -> float:
        if not (isinstance(value, (int, float)) and 0 <= value < 1):
            raise InvalidInputError(f"{knob} must be in [0, 1), got {value!r}")
        if value == 0:
            return 1.0
        points = k.knob_points(knob) or self.kinds[ALL].knob_points(knob)
        if not points:
            raise InvalidInputError(
                f"the quality model has no {knob} measurement; rebuild it with `timebill calibrate` "
                f"including a {'compress' if knob == 'rho' else 'snapkv'}-* method"
            )
        return _interpolate([(0.0, 1.0), *points], float(value))

    def _weights_factor(self, k: KindQuality, weights: str) -> float:
        if weights == "fp32":
            return 1.0
        key = f"weights:{weights}"
        found = k.relative.get(key, self.kinds[ALL].relative.get(key))
        if found is None:
            measured = sorted({"fp32", *(x.split(":", 1)[1] for x in k.relative if x.startswith("weights:"))})
            raise InvalidInputError(
                f"the quality model has no measurement for {weights} weights (measured: {', '.join(measured)}); "
                f"rebuild it with `timebill calibrate --methods vanilla,{weights},...`"
            )
        return found

    def _relative(self, k: KindQuality, weights: str, rho: float, alpha: float) -> float:
        return self._weights_factor(k, weights) * self._factor(k, "rho", rho) * self._factor(k, "alpha", alpha)

    def prompt_bucket(self, n_prompt: int) -> int:
        """Index of the prompt-length bucket ``n_prompt`` tokens fall in (``bisect`` over the edges)."""
        return bisect.bisect_right(self.prompt_edges, int(n_prompt))

    def score(self, kind: str | None, weights: str, rho: float, alpha: float, n_prompt: int | None = None) -> float:
        """Expected full-answer score of (weights, ρ, α) on a task of ``kind`` with an ``n_prompt``-token prompt.

        Q = base_kind × r_kind(θ) × r_bucket(θ) / r_all(θ): the kind's factors, adjusted by how the pooled
        factors differ for prompts of this length. Why a prompt-length term: what a knob costs depends on the
        prompt more than on the kind — compressing a 6k-token prompt for a 135M model removes distraction,
        compressing a 700-token one removes the answer (calibration v1 + v2: ρ 0.75 at 0.97× vanilla below
        2048 prompt tokens, 1.32× from 2048 on). ``n_prompt`` None, or a model without buckets: no adjustment.
        """
        k = self.kind(kind)
        q = k.base * self._relative(k, weights, rho, alpha)
        if n_prompt is not None and self.prompt_buckets:
            pooled = self.kinds[ALL]
            bucket = self.prompt_buckets[self.prompt_bucket(n_prompt)]
            denominator = self._relative(pooled, weights, rho, alpha)
            if denominator > 0:
                q *= self._relative(bucket, weights, rho, alpha) / denominator
        return min(1.0, max(0.0, q))

    def partial(self, kind: str | None, fraction: float) -> float:
        """Score of an answer cut to ``fraction`` of its tokens, relative to the whole answer's, in [0, 1]."""
        points = [(0.0, 0.0), *self.kind(kind).partial]
        return min(1.0, max(0.0, _interpolate(points, min(1.0, max(0.0, float(fraction))))))

    def length_prior(self, kind: str | None) -> list[tuple[int, bool]]:
        """Vanilla's (answer length, cut at N_max) on calibration tasks of ``kind`` (all tasks when it has none)."""
        k = self.kind(kind)
        k = k if k.lengths else self.kinds[ALL]
        return list(zip(k.lengths, k.lengths_censored or [False] * len(k.lengths), strict=True))

    def length_distribution(self, kind: str | None, n_max: int) -> LengthDistribution:
        """P(answer length) for a request of ``kind`` with limit ``n_max``: Kaplan–Meier over the prior.

        An answer the calibration run cut at its own N_max counts as "longer than that", not as ending there
        (:meth:`LengthDistribution.from_censored` says why); with no prior, the worst case (all at ``n_max``).
        """
        prior = self.length_prior(kind)
        return LengthDistribution.from_censored(prior, n_max) if prior else LengthDistribution.point(n_max)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": QUALITY_FORMAT,
            "format_version": QUALITY_FORMAT_VERSION,
            "model_id": self.model_id,
            "model_fingerprint": self.model_fingerprint,
            "suites": [dict(x) for x in self.suites],
            "command": self.command,
            "created": self.created,
            "machine": self.machine,
            **({"extra": self.extra} if self.extra else {}),
            "kinds": {name: k.to_dict() for name, k in self.kinds.items()},
            "prompt_buckets": {"edges": list(self.prompt_edges), "buckets": [b.to_dict() for b in self.prompt_buckets]},
        }


def quality_label(path: str | os.PathLike[str]) -> str:
    """How run records name the quality model they were planned with: file name and a hash of its bytes.

    Refitting the file in place changes the hash, so the expected-score runs made with the old one are stale.
    """
    import hashlib

    path = Path(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else "missing"
    return f"{path.name} (sha256 {digest})"


def save_quality(model: QualityModel, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` as JSON, atomically (a reader sees the old file or the new one, never half)."""
    from timebill.paths import write_bytes_atomically

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(path, (json.dumps(model.to_dict(), indent=1) + "\n").encode())
    return path


def load_quality(path: str | os.PathLike[str], *, model_fingerprint: str | None = None) -> QualityModel:
    """Read a quality file; with ``model_fingerprint``, refuse one measured on other weights."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QualityError(f"no quality model at {path}; build one with `timebill calibrate`") from None
    except OSError as exc:
        raise QualityError(f"cannot read the quality model {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise QualityError(f"{path} is not JSON ({exc}); rebuild it with `timebill calibrate`") from exc
    if not isinstance(data, dict) or data.get("format") != QUALITY_FORMAT:
        raise QualityError(f"{path} is not a TimeBill quality model (format {QUALITY_FORMAT!r})")
    if data.get("format_version") != QUALITY_FORMAT_VERSION:
        raise QualityError(
            f"{path} is quality format v{data.get('format_version')!r}; this TimeBill reads "
            f"v{QUALITY_FORMAT_VERSION}: rebuild it with `timebill calibrate`"
        )
    kinds_raw = data.get("kinds")
    if not isinstance(kinds_raw, dict) or ALL not in kinds_raw:
        raise QualityError(f"{path} has no pooled 'all' measurements; rebuild it with `timebill calibrate`")
    kinds = {str(name): KindQuality.from_dict(k, f"{path} kinds.{name}") for name, k in kinds_raw.items()}
    edges, buckets = _read_prompt_buckets(data.get("prompt_buckets"), str(path))
    model = QualityModel(
        model_id=str(data.get("model_id", "?")),
        model_fingerprint=str(data.get("model_fingerprint", "?")),
        suites=[dict(x) for x in data.get("suites") or [] if isinstance(x, dict)],
        kinds=kinds,
        command=str(data.get("command", "")),
        created=str(data.get("created", "")),
        machine=str(data.get("machine", "")),
        extra=dict(data.get("extra") or {}),
        prompt_edges=edges,
        prompt_buckets=buckets,
    )
    if model_fingerprint is not None and model.model_fingerprint != model_fingerprint:
        raise QualityError(
            f"{path} was made for model {model.model_id} ({model.model_fingerprint}), this is {model_fingerprint}; "
            "rebuild with `timebill calibrate`"
        )
    return model


def _read_prompt_buckets(raw: Any, where: str) -> tuple[tuple[int, ...], tuple[KindQuality, ...]]:
    """The file's prompt-length adjustment; absent or empty: none. Edges must ascend, one bucket more than edges."""
    if not raw:
        return (), ()
    try:
        edges = tuple(int(x) for x in raw["edges"])
        buckets = tuple(KindQuality.from_dict(b, f"{where} prompt_buckets[{i}]") for i, b in enumerate(raw["buckets"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise QualityError(
            f"{where} has malformed prompt_buckets ({exc!r}); rebuild it with `timebill calibrate`"
        ) from exc
    if not buckets:
        return (), ()
    if len(buckets) != len(edges) + 1 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise QualityError(f"{where} has {len(buckets)} prompt buckets for edges {list(edges)}; rebuild it")
    return edges, buckets


# ------------------------------------------------------------------------------------------- fitting
def check_calibration_suite(suite: Any) -> None:
    """Refuse the evaluation suite: a quality model measured on it would leak the evaluated tasks."""
    header = suite.header or {}
    if header.get("name") == EVALUATION_SUITE_NAME or header.get("purpose") == "evaluation":
        raise InvalidInputError(
            f"{suite.path} is the evaluation suite ({EVALUATION_SUITE_NAME}); calibrating on it would leak its tasks "
            f"into the planner. Use the calibration suite ({DEFAULT_CALIBRATION_SUITE.as_posix()})."
        )


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _prefix_tokens(fraction: float, length: int) -> int:
    """ceil(f · len), robust to float noise (0.3 × 10 is 3.0000000000000004, which must stay 3)."""
    return math.ceil(fraction * length - 1e-9)


def _was_cut(record: dict[str, Any], n: int) -> bool:
    """Whether a no-deadline run stopped at its N_max (or anything but EOS) rather than ending by itself."""
    reason = record.get("stop_reason")
    if reason is not None:
        return reason != "eos"
    limit = record.get("max_new_tokens")
    return limit is not None and n >= int(limit)


@dataclass(frozen=True)
class _TaskScores:
    """One calibration task's measurements: what every fit reads, scored once (task ids of two suites may collide)."""

    kind: str
    prompt_tokens: int  # the task's uncompressed prompt length (the prompt-length buckets read it)
    vanilla: float  # vanilla's full score
    length: int  # vanilla's answer tokens
    censored: bool  # vanilla stopped at the task's N_max, not by EOS: the answer is at least ``length`` long
    partial: dict[float, float]  # f → score of vanilla's answer cut to ceil(f·len) tokens
    knobs: dict[str, float]  # "rho:0.5" → that configuration's full score on this task


def _score_tasks(tasks: Sequence[Any], runs: dict[str, dict[str, dict[str, Any]]], scorer: Any) -> list[_TaskScores]:
    """Score each task with a vanilla run (tasks without one say nothing relative to vanilla)."""
    from timebill.bench.runner import run_key

    vanilla = runs.get("vanilla", {})
    knob_runs = [(knob, method, records) for method, records in runs.items() if (knob := knob_of(method)) is not None]
    out = []
    for t in tasks:
        v = vanilla.get(run_key("vanilla", t.id, None))
        if v is None:
            continue
        n = len(v.get("token_ids", []))
        out.append(
            _TaskScores(
                kind=t.kind,
                prompt_tokens=int(v.get("prompt_tokens") or t.prompt_tokens or 0),  # the model's own count
                vanilla=scorer.full(v["key"], t, v),
                length=n,
                censored=_was_cut(v, n),
                partial={f: scorer.prefix(v["key"], t, v, _prefix_tokens(f, n)) for f in PARTIAL_FRACTIONS},
                knobs={
                    knob: scorer.full(rec["key"], t, rec)
                    for knob, method, records in knob_runs
                    if (rec := records.get(run_key(method, t.id, None))) is not None
                },
            )
        )
    return out


def _fit_kind(done: Sequence[_TaskScores]) -> KindQuality | None:
    if not done:
        return None
    base = _mean([t.vanilla for t in done])
    relative: dict[str, float] = {}
    standard_errors: dict[str, float | None] = {}
    for knob in sorted({k for t in done for k in t.knobs}):
        pairs = [(t.knobs[knob], t.vanilla) for t in done if knob in t.knobs]
        relative[knob], standard_errors[knob] = _ratio_of_means(pairs)
    partial = []
    for f in PARTIAL_FRACTIONS:
        if base > 0:
            partial.append((f, min(1.0, _mean([t.partial[f] for t in done]) / base)))
        else:
            partial.append((f, f))  # no signal: a neutral straight line
    return KindQuality(
        n=len(done),
        base=base,
        relative=relative,
        partial=partial,
        lengths=[t.length for t in done],
        lengths_censored=[t.censored for t in done],
        relative_raw=dict(relative),
        relative_se=standard_errors,
        shrink_weight={k: 1.0 for k in relative},
    )


def _ratio_of_means(pairs: Sequence[tuple[float, float]]) -> tuple[float, float | None]:
    """(mean(config) / mean(vanilla), its standard error) over paired per-task scores.

    The standard error is the delta method's for a ratio of paired means: the spread of the per-task residuals
    ``s_i - r·b_i`` over ``sqrt(n)·mean(b)``. None with fewer than two pairs, or when vanilla scored 0 on all
    (the ratio is then 1 by convention and says nothing).
    """
    mean_base = _mean([b for _, b in pairs])
    if mean_base <= 0:
        return 1.0, None
    ratio = _mean([s for s, _ in pairs]) / mean_base
    n = len(pairs)
    if n < 2:
        return ratio, None
    residuals = [s - ratio * b for s, b in pairs]
    return ratio, math.sqrt(sum(d * d for d in residuals) / (n - 1) / n) / mean_base


def shrink_toward_pooled(kinds: dict[str, KindQuality], pooled: KindQuality) -> dict[str, KindQuality]:
    """Each kind's factors pulled toward the pooled ones by how much of their spread is noise (empirical Bayes).

    For each knob measured in two or more kinds: the between-kind variance of the true factors is estimated by
    the method of moments, ``τ² = max(0, var(r_k) - mean(se_k²))``, and kind k keeps ``w_k = τ² / (τ² + se_k²)``
    of its own deviation: ``r̃_k = r_pool + w_k (r_k - r_pool)``. Kinds that differ no more than their standard
    errors explain all get the pooled factor (τ² = 0); a factor measured far more precisely than the spread
    keeps its own. A kind without a standard error (one paired task) gets the pooled factor, and a knob only
    one kind measures keeps that kind's (it *is* the pooled measurement). The pooled factors are not changed.
    """
    out = dict(kinds)
    knobs = sorted({knob for k in kinds.values() for knob in k.relative_raw})
    for knob in knobs:
        pooled_r = pooled.relative_raw.get(knob)
        members = [name for name, k in kinds.items() if knob in k.relative_raw]
        if pooled_r is None or len(members) < 2:
            continue
        measured = [(kinds[m].relative_raw[knob], kinds[m].relative_se.get(knob)) for m in members]
        with_se = [(r, se) for r, se in measured if se is not None]
        tau2 = 0.0
        if len(with_se) >= 2:
            mean_r = _mean([r for r, _ in with_se])
            spread = sum((r - mean_r) ** 2 for r, _ in with_se) / (len(with_se) - 1)
            tau2 = max(0.0, spread - _mean([se * se for _, se in with_se]))
        for name in members:
            k = out[name]
            raw, se = k.relative_raw[knob], k.relative_se.get(knob)
            weight = 0.0 if se is None or tau2 == 0.0 else tau2 / (tau2 + se * se)
            out[name] = replace(
                k,
                relative={**k.relative, knob: pooled_r + weight * (raw - pooled_r)},
                shrink_weight={**k.shrink_weight, knob: weight},
            )
    return out


def _read_calibration_runs(
    runs_dir: str | os.PathLike[str], suite: Any, fingerprint: str, methods: Sequence[str] | None
) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, Any]]:
    """One suite's run records by method (budgeted methods' files skipped), after checking its manifest."""
    from timebill.bench.runner import load_manifest, read_runs

    check_calibration_suite(suite)
    out = Path(runs_dir)
    manifest = load_manifest(out) or {}
    for key, expected in (("suite_sha256", suite.sha256), ("model_fingerprint", fingerprint)):
        if key in manifest and manifest[key] != expected:
            raise QualityError(f"{out} holds runs with {key} {manifest[key]}, not {expected}: use another --runs")
    names = list(methods) if methods is not None else [p.stem for p in sorted((out / "runs").glob("*.jsonl"))]
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    for name in names:
        if name != "vanilla":
            try:
                knob_of(name)
            except InvalidInputError:
                continue  # budgeted methods' files (a bench dir may hold them) say nothing about θ alone
        records = read_runs(out / "runs" / f"{name}.jsonl")
        if records:
            runs[name] = records
    if "vanilla" not in runs:
        raise QualityError(f"{out}/runs has no vanilla runs: the quality model is relative to vanilla")
    return runs, manifest


def fit_quality_many(
    sources: Sequence[tuple[str | os.PathLike[str], Any]],  # (runs directory, timebill.bench.suite.Suite)
    tokenizer_decode: Callable[[list[int]], str],
    model_id: str,
    fingerprint: str,
    *,
    methods: Sequence[str] | None = None,
    command: str = "",
    combine: str = "consensus",
) -> QualityModel:
    """Fit Q(θ | kind) from several calibration suites' run directories (``DIR/runs/<method>.jsonl``), pooled.

    ``combine``: ``"pooled"`` reads every factor from all suites' tasks together (and adjusts by prompt
    length, :func:`_fit_prompt_buckets`); ``"consensus"`` (the default) then moves each factor away from 1
    only as far as *every* suite fitted alone moved it the same way (:func:`consensus_factor`), and uses no
    prompt-length adjustment. Why: on three disjoint 24-task suites, leave-one-suite-out (fit on two, replay
    the third in the simulator, ``benchmarks/quality_crossfit.py``, ``docs/results/calibration-split/``)
    consensus planned best of the rules tried — Kill 1.036× the best fixed configuration in hindsight at the
    four tightest budgets and guard 0.992× the strongest other fixed one, against 1.003 / 0.967 pooled with
    the prompt-length adjustment and 0.996 / 0.954 pooled without it — because a knob whose benefit one suite
    saw and another did not (int4 on code: raw 1.07, 1.88 and 1.05 in v1, v2, v3) is mostly noise. With one
    suite the two agree.

    Every task of every suite counts once, as one more paired measurement: more calibration tasks is the
    only thing that shrinks the factors' standard errors, and the suites are disjoint from the evaluation
    suite alike. Scores with the benchmark's own :class:`~timebill.bench.methods.Scorer` (``tokenizer_decode``
    turns a token-id prefix into text, as ``Resources.decode`` does); one scorer per suite, since two suites
    may name different tasks alike. Each directory's manifest, when present, must be of its suite and model.
    """
    from timebill.bench.methods import Scorer

    if not sources:
        raise InvalidInputError("fit_quality_many needs at least one (runs directory, suite)")
    if combine not in ("pooled", "consensus"):
        raise InvalidInputError(f"combine must be 'pooled' or 'consensus', got {combine!r}")
    names = [suite.name for _, suite in sources]
    if len(set(names)) != len(names):
        raise InvalidInputError(f"a calibration suite is named twice: {', '.join(names)}")
    scored: list[_TaskScores] = []
    per_suite: list[list[_TaskScores]] = []
    described: list[dict[str, Any]] = []
    machines: list[str] = []
    for runs_dir, suite in sources:
        runs, manifest = _read_calibration_runs(runs_dir, suite, fingerprint, methods)
        tasks = _score_tasks(list(suite.tasks), runs, Scorer(tokenizer_decode))
        if not tasks:
            raise QualityError(f"no vanilla run in {runs_dir} is of a task of {suite.path}")
        scored.extend(tasks)
        per_suite.append(tasks)
        described.append({"name": suite.name, "sha256": suite.sha256, "runs_dir": str(runs_dir), "tasks": len(tasks)})
        if manifest.get("machine") and manifest["machine"] not in machines:
            machines.append(str(manifest["machine"]))
    kinds = _fit_kinds(scored)
    edges, buckets = _fit_prompt_buckets(scored, kinds[ALL])
    extra: dict[str, Any] = {"combine": "pooled"}
    if combine == "consensus" and len(per_suite) > 1:
        kinds = _consensus(kinds, [_fit_kinds(tasks) for tasks in per_suite])
        edges, buckets, extra = (), (), {"combine": "consensus"}
    return QualityModel(
        model_id=model_id,
        model_fingerprint=fingerprint,
        suites=described,
        kinds=kinds,
        command=command,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        machine="; ".join(machines),  # quality does not depend on the host; the runs' timings do
        prompt_edges=edges,
        prompt_buckets=buckets,
        extra=extra,
    )


def _fit_kinds(scored: Sequence[_TaskScores]) -> dict[str, KindQuality]:
    """Each kind's fit shrunk toward the pooled one, and the pooled one as ``all`` (``scored`` not empty)."""
    kinds: dict[str, KindQuality] = {}
    for kind in sorted({t.kind for t in scored}):
        fitted = _fit_kind([t for t in scored if t.kind == kind])
        if fitted is not None:
            kinds[kind] = fitted
    pooled = _fit_kind(scored)
    assert pooled is not None  # scored is not empty
    kinds = shrink_toward_pooled(kinds, pooled)
    kinds[ALL] = pooled
    return kinds


def consensus_factor(values: Sequence[float]) -> float:
    """The value nearest 1 if all lie on the same side of 1, else 1 (the suites disagree on the direction)."""
    if all(v >= 1 for v in values) or all(v <= 1 for v in values):
        return min(values, key=lambda v: abs(v - 1))
    return 1.0


def _consensus(pooled: dict[str, KindQuality], singles: Sequence[dict[str, KindQuality]]) -> dict[str, KindQuality]:
    """``pooled``'s kinds with each factor replaced by the consensus of the single-suite fits that measured it.

    A factor fewer than two suites measured (for that kind) keeps its pooled value: there is nothing to agree.
    Base scores, partial-answer curves, length priors and the raw factors stay the pooled ones.
    """
    out = {}
    for name, k in pooled.items():
        relative = {}
        for knob, r in k.relative.items():
            values = [s[name].relative[knob] for s in singles if name in s and knob in s[name].relative]
            relative[knob] = consensus_factor(values) if len(values) > 1 else r
        out[name] = replace(k, relative=relative)
    return out


def _fit_prompt_buckets(
    scored: Sequence[_TaskScores], pooled: KindQuality
) -> tuple[tuple[int, ...], tuple[KindQuality, ...]]:
    """Per prompt-length bucket, every kind's tasks in it fitted as one, shrunk toward ``pooled`` (as kinds are).

    Empirical Bayes decides how much of a bucket's difference is kept: buckets that differ no more than their
    standard errors explain read the pooled factors, i.e. no adjustment. Any bucket without a task: none.
    """
    groups = [
        [t for t in scored if bisect.bisect_right(PROMPT_EDGES, t.prompt_tokens) == i]
        for i in range(len(PROMPT_EDGES) + 1)
    ]
    fits = [_fit_kind(g) for g in groups]
    if any(f is None for f in fits):
        return (), ()
    named = {str(i): f for i, f in enumerate(fits) if f is not None}
    shrunk = shrink_toward_pooled(named, pooled)
    return PROMPT_EDGES, tuple(shrunk[str(i)] for i in range(len(fits)))


def fit_quality(
    runs_dir: str | os.PathLike[str],
    suite: Any,  # timebill.bench.suite.Suite
    tokenizer_decode: Callable[[list[int]], str],
    model_id: str,
    fingerprint: str,
    *,
    methods: Sequence[str] | None = None,
    command: str = "",
) -> QualityModel:
    """:func:`fit_quality_many` of one calibration suite."""
    return fit_quality_many(
        [(runs_dir, suite)], tokenizer_decode, model_id, fingerprint, methods=methods, command=command
    )


def default_runs_dir(out: str | os.PathLike[str], suite_name: str | None = None) -> Path:
    """Where ``timebill calibrate`` keeps a suite's bench runs by default: the cache, named after the quality file.

    Not beside the file: the shipped quality file lives in the package's data folder, and hundreds of run
    records do not belong in an installed package (the shipped model's runs are in docs/results instead).
    """
    from timebill.paths import cache_dir

    folder = cache_dir() / "calibration" / (Path(out).stem + "-runs")
    return folder / suite_name if suite_name else folder


def calibrate(
    resources: Any,  # timebill.bench.methods.Resources
    sources: Sequence[tuple[str | os.PathLike[str], Any]],  # (runs directory, suite) per calibration suite
    out: str | os.PathLike[str],
    *,
    methods: Sequence[str] = CALIBRATION_METHODS,
    cpu_lock: str | None = None,
    progress: bool = True,
    fit_only: bool = False,
    command: str = "",
    log: Callable[[str], None] = print,
    combine: str = "consensus",
) -> tuple[QualityModel, Path]:
    """Run the budget-independent methods on each calibration suite (resumable), fit, write ``out`` atomically."""
    from timebill.bench.runner import BenchOptions, run_benchmark

    for _, suite in sources:
        check_calibration_suite(suite)
    methods = list(methods)
    if "vanilla" not in methods:
        raise InvalidInputError("--methods must include vanilla: every factor is relative to it")
    for name in methods:
        knob_of(name)
    if not fit_only:
        options = BenchOptions(
            methods=methods, k_sweep=(), cpu_lock=cpu_lock, progress=progress, command=command, n_budgets=6
        )
        for runs_dir, suite in sources:
            run_benchmark(resources, suite, list(suite.tasks), runs_dir, options, log=log)
    source = getattr(resources.engine, "source", None)
    model = fit_quality_many(
        sources,
        resources.decode,
        getattr(source, "model_id", "?"),
        getattr(source, "fingerprint", "?"),
        methods=methods,
        command=command,
        combine=combine,
    )
    return model, save_quality(model, out)
