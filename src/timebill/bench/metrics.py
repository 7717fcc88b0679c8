"""LongBench's scoring functions, reimplemented without their dependencies (each scores in [0, 1]).

LongBench (``metrics.py`` of THUDM/LongBench) scores QA with token F1 after SQuAD-style normalisation,
summaries and chats with ROUGE-L, and code with an edit similarity of the first code line. We reimplement
all three here rather than depend on ``fuzzywuzzy`` and ``rouge``; where we differ, it is said below and
in ``docs/bench-suite-format.md``:

- :func:`qa_f1` — exactly LongBench's ``qa_f1_score`` (``normalize_answer`` + bag-of-tokens F1).
- :func:`rouge_l` — ROUGE-L F1 of the two texts as single token sequences, tokenised as Google's
  ``rouge_score`` does (lower case, runs of ``[a-z0-9]``). LongBench calls the ``rouge`` package
  (pltrdy), which splits at every ``.``, unions per-sentence LCSs over *sets* of words and returns 0 when
  its recursive LCS overflows on long texts; the plain sequence LCS is the textbook ROUGE-L and is
  stable on the long chat replies we score. The LCS is bit-parallel (Hyyrö), so a 512-token answer
  against a 2,000-token reference costs microseconds.
- :func:`code_sim` — LongBench's ``code_sim_score`` line rule (the first line of the answer without a
  backtick, ``#`` or ``//``) and ``difflib.SequenceMatcher.ratio()``, which is what ``fuzz.ratio``
  computes (fuzzywuzzy rounds it to a whole percent; we do not). Both lines are compared with surrounding
  whitespace stripped: a chat model's reply drops indentation that LongBench's base-model completions keep.

Task files name a metric per task (``qa_f1``, ``rouge_l``, ``code_sim``); :func:`score` takes the best
match over the task's references, as LongBench does.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from difflib import SequenceMatcher

from timebill.errors import InvalidInputError

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")


def normalize_answer(text: str) -> str:
    """LongBench/SQuAD normalisation: lower case, drop punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """F1 of two bags of tokens (multiset overlap); 0 when either is empty."""
    overlap = sum((Counter(prediction) & Counter(reference)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction)
    recall = overlap / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str) -> float:
    """LongBench's ``qa_f1_score``: token F1 of the normalised answer against the normalised reference."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def rouge_tokens(text: str) -> list[str]:
    """Google ``rouge_score``'s default tokeniser (no stemming): lower-cased runs of letters and digits."""
    return _ROUGE_TOKEN.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, bit-parallel (Hyyrö 2004): one big-int update per token of b.

    Bit ``i`` of ``v`` is 0 where the LCS so far "uses" position ``i`` of ``a``; the count of zeros is the
    LCS length. Same result as the O(len(a)·len(b)) table, at a small fraction of the Python cost.
    """
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for i, token in enumerate(a):
        masks[token] = masks.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        match = masks.get(token)
        if match is None:
            continue
        u = v & match
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (β = 1) of the prediction's and the reference's token sequences."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def first_code_line(prediction: str) -> str:
    """LongBench's pick: the first line (after leading newlines) with no backtick, ``#`` or ``//``; else ""."""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def code_sim(prediction: str, reference: str) -> float:
    """Edit similarity (``SequenceMatcher.ratio``) of the answer's first code line and the reference line."""
    return SequenceMatcher(None, first_code_line(prediction).strip(), reference.strip()).ratio()


METRICS: dict[str, Callable[[str, str], float]] = {"qa_f1": qa_f1, "rouge_l": rouge_l, "code_sim": code_sim}


def score(metric: str, prediction: str, references: Sequence[str]) -> float:
    """Best score of ``prediction`` over ``references`` under ``metric`` (0 for an empty answer)."""
    fn = METRICS.get(metric)
    if fn is None:
        raise InvalidInputError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if not prediction.strip():
        return 0.0
    return max((fn(prediction, ref) for ref in references), default=0.0)
