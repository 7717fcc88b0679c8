"""Command line: translates flags into engine/facade calls and results into text or JSON.

No logic lives here. Errors raised on purpose (:class:`TimeBillError`) become a one-line message
on stderr and exit code 2 — never a traceback.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from timebill.errors import InfeasibleBudgetError, TimeBillError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="TimeBill: time-budgeted LLM inference.")


@app.callback()
def _root() -> None:
    """TimeBill: time-budgeted LLM inference."""


EXIT_BAD_INPUT = 2
EXIT_INFEASIBLE = 3


def _fail(exc: TimeBillError) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(EXIT_INFEASIBLE if isinstance(exc, InfeasibleBudgetError) else EXIT_BAD_INPUT)


def _read_prompt(prompt: str) -> str:
    if prompt == "-":
        return sys.stdin.read()
    return prompt


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt text, or '-' to read it from stdin.")],
    alpha: Annotated[float, typer.Option(help="Fraction of the prompt KV cache to evict, in [0, 1).")] = 0.0,
    press: Annotated[str, typer.Option(help="Eviction press: snapkv | streaming | knorm.")] = "snapkv",
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", help="Stop after this many tokens.")
    ] = 256,
    deadline: Annotated[
        float | None, typer.Option(help="Hard deadline in seconds from request start (guard stops early).")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="HF model dir, .gguf file or hub id (default: SmolLM2-135M).")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="torch intra-op threads (default: all cores).")] = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Do not apply the model's chat template.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the whole result as one JSON object.")
    ] = False,
) -> None:
    """Generate an answer with a fixed eviction ratio and an optional deadline."""
    from timebill.engine import Engine, validate_request

    try:
        text = _read_prompt(prompt)
        validate_request(text, alpha, max_new_tokens, deadline, press)
        engine = Engine.load(model, threads=threads)
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
        )
    except TimeBillError as exc:
        _fail(exc)
        return
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
    else:
        typer.echo(result.text)
        typer.echo(result.summary_line(), err=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
