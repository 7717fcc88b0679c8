"""`timebill generate --prompt-compression`: bad knobs exit 2 before any model loads; a real run shows what was cut."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from timebill.cli import app

runner = CliRunner()

_COLOURS = ("red", "green", "blue", "amber", "violet", "silver")
_ANIMALS = ("fox", "heron", "otter", "lynx", "badger", "falcon", "stoat")
_CITIES = ("Oslo", "Lima", "Perth", "Quito", "Tunis")
_FOODS = ("figs", "rye bread", "clams", "plums", "barley", "cheese", "honey", "leeks")


def long_prompt(n_facts: int = 30) -> str:
    """Varied sentences (≈15 tokens each) and a final question line: a prompt BM25 can cut down."""
    facts = [
        f"Fact {i}: the {_COLOURS[i % 6]} {_ANIMALS[i % 7]} of {_CITIES[i % 5]} eats {_FOODS[i % 8]} every morning."
        for i in range(n_facts)
    ]
    return " ".join(facts) + "\nWhat does the red fox of Oslo eat?"


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--prompt-compression", "-0.1"], "prompt_compression"),
        (["--prompt-compression", "1.0"], "prompt_compression"),
        (["--prompt-compression", "nan"], "prompt_compression"),
        (["--compressor", "llmlingua"], "Unknown compressor"),
        (["--prompt-compression", "0.5", "--question", "  "], "question is empty"),
        (["--budget", "5", "--prompt-compression", "1.0"], "prompt_compression"),
        (["--budget", "5", "--compressor", "magic"], "Unknown compressor"),
        (["--budget", "5", "--prompt-compression", "0.5", "--question", ""], "question is empty"),
    ],
)
def test_bad_compression_options_exit_2_before_loading_a_model(flags: list[str], says: str) -> None:
    result = runner.invoke(app, ["generate", "Name a colour.", "--model", "/no/such/dir", *flags])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], result.output
    assert "not found" not in result.output  # the options failed first: no model was looked for


def test_an_empty_prompt_with_compression_exits_2() -> None:
    result = runner.invoke(app, ["generate", "  ", "--prompt-compression", "0.5", "--model", "/no/such/dir"])
    assert result.exit_code == 2, result.output
    assert "empty" in result.output and "Traceback" not in result.output


def test_generate_with_compression_prefills_fewer_tokens_and_says_so() -> None:
    args = ["generate", long_prompt(), "--prompt-compression", "0.5", "--max-new-tokens", "4", "--threads", "2"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert data["original_prompt_tokens"] >= 300
    assert data["prompt_tokens"] < data["original_prompt_tokens"]
    assert 0.3 < data["prompt_compression"] < 0.7 and data["compressor"] == "bm25"
    assert data["compress_s"] > 0 and data["token_times_s"][0] > data["compress_s"]  # timed from the request start

    human = runner.invoke(app, [*args, "--compressor", "truncate", "--question", "What does the red fox of Oslo eat?"])
    assert human.exit_code == 0, human.output
    summary = human.output.strip().splitlines()[-1]
    assert "compressor=truncate" in summary and "original_prompt_tokens=" in summary and "rho=0." in summary


def test_budgeted_generate_plans_for_the_kept_tokens_and_reports_the_compression(estimator, tmp_path) -> None:
    from timebill.estimator import save_profile

    profile = save_profile(estimator.profile, tmp_path / "profile.json")
    args = ["generate", long_prompt(), "--budget", "30", "--json", "--max-new-tokens", "4", "--threads", "2"]
    args += ["--profile", str(profile), "--prompt-compression", "0.5", "--question", "What does the red fox eat?"]
    dry = runner.invoke(app, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.output.strip().splitlines()[-1])
    assert plan["original_n_x"] >= 300 and plan["n_x"] < plan["original_n_x"] and plan["compressor"] == "bm25"

    result = runner.invoke(app, [*args, "--compressor", "truncate"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    gen = record["generation"]
    assert gen["compressor"] == "truncate" and gen["prompt_tokens"] < gen["original_prompt_tokens"]
    assert record["plan"]["n_x"] == gen["prompt_tokens"] and 0.3 < gen["prompt_compression"] < 0.7
