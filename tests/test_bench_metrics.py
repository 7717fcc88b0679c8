"""LongBench-style metrics against hand-computed cases (normalisation, token F1, ROUGE-L, edit similarity)."""

from __future__ import annotations

import random

import pytest

from timebill.bench.metrics import (
    code_sim,
    first_code_line,
    lcs_length,
    normalize_answer,
    qa_f1,
    rouge_l,
    rouge_tokens,
    score,
)
from timebill.errors import InvalidInputError


def test_normalisation_drops_case_punctuation_articles_and_extra_space() -> None:
    assert normalize_answer("The  Cat's hat!") == "cats hat"
    assert normalize_answer("An apple, a pear; THE plum.") == "apple pear plum"
    assert normalize_answer("theme another") == "theme another"  # articles only as whole words


def test_qa_f1_hand_computed() -> None:
    # "secret passphrase for lisbon is silver lantern" (7 tokens) vs "silver lantern": P = 2/7, R = 1, F1 = 4/9.
    assert qa_f1("The secret passphrase for Lisbon is silver lantern.", "silver lantern") == pytest.approx(4 / 9)
    assert qa_f1("Silver lantern", "silver lantern") == 1.0
    assert qa_f1("red red", "red") == pytest.approx(2 / 3)  # multiset overlap: P = 1/2, R = 1
    assert qa_f1("blue", "silver lantern") == 0.0
    assert qa_f1("", "silver lantern") == 0.0
    assert qa_f1("the", "the") == 0.0  # both normalise to nothing


def test_rouge_l_hand_computed() -> None:
    # LCS of "the cat sat on the mat" / "the cat is on the mat" is "the cat on the mat" (5): P = R = 5/6.
    assert rouge_l("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS "a c" = 2 of 3 predicted and 4 reference tokens: F = 2·(2/3)·(1/2) / (2/3 + 1/2) = 4/7.
    assert rouge_l("a b c", "a c d e") == pytest.approx(4 / 7)
    assert rouge_l("Hello, World!", "hello world") == 1.0
    assert rouge_l("nothing shared", "completely different") == 0.0
    assert rouge_tokens("It's 42-fold") == ["it", "s", "42", "fold"]


def _lcs_table(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a, 1):
        for j, y in enumerate(b, 1):
            table[i][j] = table[i - 1][j - 1] + 1 if x == y else max(table[i - 1][j], table[i][j - 1])
    return table[-1][-1]


def test_bit_parallel_lcs_equals_the_dynamic_programme() -> None:
    rng = random.Random(7)
    for _ in range(300):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 40))]
        b = [rng.choice("abcdef") for _ in range(rng.randint(0, 40))]
        assert lcs_length(a, b) == _lcs_table(a, b)


def test_code_sim_takes_longbench_first_code_line() -> None:
    assert first_code_line("```python\n    x = foo(1)\n```") == "    x = foo(1)"
    assert first_code_line("\n\n# the next line\n// or this\nreturn a + b") == "return a + b"
    assert first_code_line("```\n# only comments\n```") == ""
    assert code_sim("```python\n    x = foo(1)\n```", "x = foo(1)") == 1.0  # indentation stripped on both sides
    assert code_sim("abcd", "abce") == pytest.approx(0.75)  # SequenceMatcher: 2·3 matches / 8 characters
    assert code_sim("", "return x") == 0.0


def test_score_takes_the_best_reference_and_rejects_unknown_metrics() -> None:
    assert score("qa_f1", "silver lantern", ["gold key", "silver lantern"]) == 1.0
    assert score("rouge_l", "   ", ["anything"]) == 0.0
    with pytest.raises(InvalidInputError, match="unknown metric"):
        score("bleu", "x", ["x"])
