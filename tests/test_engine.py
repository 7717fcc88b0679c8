"""The engine on the real embedded model: exactness at α=0, real eviction, the deadline guard, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from timebill.cli import app
from timebill.engine import STOP_DEADLINE, Engine
from timebill.errors import InvalidInputError, ModelLoadError, PromptTooLongError

PROMPTS = [
    "Explain KV caches in two sentences.",
    "Write a haiku about a robot that is always on time.",
    "List three prime numbers greater than 50 and say why they are prime.",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_alpha_zero_equals_greedy_model_generate(engine: Engine, prompt: str) -> None:
    ids = engine.encode(prompt)
    ref = engine.model.generate(
        torch.tensor([ids]),
        max_new_tokens=24,
        do_sample=False,
        eos_token_id=sorted(engine.stop_ids),
        pad_token_id=sorted(engine.stop_ids)[0],
    )[0, len(ids) :].tolist()
    ours = engine.generate(prompt, alpha=0.0, max_new_tokens=24)
    assert ours.token_ids == ref
    assert ours.kept_kv_tokens == ours.prompt_tokens


def test_half_eviction_keeps_half_the_prompt_kv_and_decodes(engine: Engine) -> None:
    prompt = "Summarise: " + "The robot arm picks a part, checks it, and places it on the belt. " * 12
    result = engine.generate(prompt, alpha=0.5, max_new_tokens=16)
    n = result.prompt_tokens
    assert result.kept_kv_tokens == int(n * 0.5)
    # every layer holds the kept prompt tokens (nothing generated is in the cache at this point)
    assert result.kv_tokens_per_layer == [int(n * 0.5)] * engine.model.config.num_hidden_layers
    assert result.tokens_generated >= 1
    assert result.text.strip()
    assert all(0 <= t < engine.model.config.vocab_size for t in result.token_ids)


def test_eviction_changes_the_cache_contents_not_just_its_length(engine: Engine) -> None:
    ids = engine.encode("Describe a lighthouse at night. " * 10)
    full = engine.prefill(ids, capture=True)
    keys_before = full.cache.layers[3].keys.clone()
    engine.evict(full, 0.75)
    kept = full.cache.layers[3].keys
    assert kept.shape[2] == int(len(ids) * 0.25)
    # each kept key row must be one of the original rows (a gather, not a truncation or garbage)
    for head in range(kept.shape[1]):
        originals = keys_before[0, head]
        for row in kept[0, head]:
            assert torch.isclose(originals, row).all(dim=-1).any()
    assert torch.isfinite(full.first_logits).all()


@pytest.mark.parametrize("press", ["streaming", "knorm"])
def test_other_presses_evict(engine: Engine, press: str) -> None:
    result = engine.generate("Tell me about trains. " * 20, alpha=0.5, press=press, max_new_tokens=4)
    assert result.kept_kv_tokens == int(result.prompt_tokens * 0.5)
    assert result.press == press


def test_deadline_guard_stops_early_with_partial_text(engine: Engine) -> None:
    prompt = "Write a long story about a dragon."
    # the deadline sits a few steps past this host's own prefill, measured now: a fixed 0.6 s left no time
    # for a first token when the 2 cores were shared (the guard then rightly emitted nothing)
    probe = engine.generate(prompt, max_new_tokens=4)
    deadline = 3 * probe.token_times_s[0] + 0.5  # x3: a shared host can slow the next prefill as much
    result = engine.generate(prompt, max_new_tokens=400, deadline_s=deadline)
    assert result.stop_reason == STOP_DEADLINE
    assert 0 < result.tokens_generated < 400
    assert result.text.strip()
    # the guard stops before the token that would cross the deadline (one step of slack for noise)
    slack = max(result.step_times_s) if result.step_times_s else 0.0
    assert result.token_times_s[-1] <= deadline + slack


def test_token_timestamps_are_monotone_and_match_steps(engine: Engine) -> None:
    result = engine.generate("Count from one to ten.", max_new_tokens=12)
    times = result.token_times_s
    assert all(b > a for a, b in zip(times, times[1:], strict=False))
    assert len(result.step_times_s) == len(times) - 1
    assert math.isclose(times[0], result.prefill_s + result.evict_s, rel_tol=0.5, abs_tol=0.05)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": ""}, "empty"),
        ({"prompt": "   "}, "empty"),
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": 1.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"deadline_s": 0.0}, "deadline"),
        ({"deadline_s": -1.0}, "deadline"),
        ({"deadline_s": float("nan")}, "deadline"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"press": "nope"}, "Unknown press"),
    ],
)
def test_bad_input_gives_clear_error(engine: Engine, kwargs: dict, message: str) -> None:
    args = {"prompt": "hello", **kwargs}
    with pytest.raises(InvalidInputError, match=message):
        engine.generate(**args)


def test_prompt_longer_than_context_says_both_numbers(engine: Engine) -> None:
    text = "word " * (engine.context_length + 10)
    with pytest.raises(PromptTooLongError) as info:
        engine.generate(text)
    assert str(engine.context_length) in str(info.value)


def test_unknown_model_path_is_a_clear_error() -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        Engine.load("./no/such/model")


runner = CliRunner()


@pytest.mark.parametrize(
    "args",
    [
        ["generate", ""],
        ["generate", "hi", "--alpha", "1.5"],
        ["generate", "hi", "--deadline", "-2"],
        ["generate", "hi", "--max-new-tokens", "0"],
        ["generate", "hi", "--press", "bogus"],
        ["generate", "hi", "--model", "/no/such/dir"],
    ],
)
def test_cli_bad_input_exits_2_without_traceback(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "error:" in result.output


def test_cli_json_output_parses_and_reads_stdin() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "timebill.cli",
            "generate",
            "-",
            "--max-new-tokens",
            "6",
            "--json",
            "--alpha",
            "0.5",
        ],
        input="Name a colour.",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    assert data["tokens_generated"] >= 1
    assert data["stop_reason"] in {"eos", "max_tokens", "deadline"}
    assert data["kept_kv_tokens"] < data["prompt_tokens"]
    assert len(data["token_times_s"]) == data["tokens_generated"]


def test_cli_prompt_too_long_exits_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "timebill.cli", "generate", "-", "--max-new-tokens", "2"],
        input="word " * 9000,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "8192" in proc.stderr


@pytest.mark.parametrize(
    "flags",
    [["--k", "0.5"], ["--bound", "magic"], ["--alpha-max", "1"], ["--infeasible-slack", "-1"], ["--top-p", "0"]],
)
def test_cli_bad_budgeted_options_exit_2_before_loading_anything(flags: list[str]) -> None:
    result = runner.invoke(app, ["generate", "hi", "--budget", "5", "--model", "/no/such/dir", *flags])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "not found" not in result.output  # the options failed first


def test_cli_budgeted_dry_run_prints_the_plan_record(estimator, tmp_path) -> None:
    from timebill.estimator import save_profile

    profile = save_profile(estimator.profile, tmp_path / "profile.json")
    args = ["generate", "Name a colour.", "--budget", "30", "--dry-run", "--json", "--max-new-tokens", "40"]
    result = runner.invoke(app, [*args, "--k", "2", "--profile", str(profile)])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output.strip().splitlines()[-1])
    assert plan["budget_s"] == 30.0 and plan["feasible"] and plan["n_worst"] <= 40
    assert plan["n_worst"] == min(40, math.ceil(2 * plan["n_hat"]))  # --k reached the planner
