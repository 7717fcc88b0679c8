"""``bm25``: a lexical query-aware chunk selector (Okapi BM25 of each chunk against the query; no model).

BM25 in numpy rather than ``rank_bm25``: the "corpus" is one prompt's few hundred chunks, built and scored
once per request, so an index library buys nothing; ``rank_bm25`` (unmaintained since 2022) scores in
Python loops, and the term-frequency matrix here is a few vectorised lines. Costs ~ms on 8k-token prompts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from timebill.compression.base import Compressor, with_tie_breaker
from timebill.compression.layout import PromptLayout

_WORD = re.compile(r"[a-z0-9]+")
# Words that say nothing about which chunk answers (BM25's IDF discounts frequent words, but on a short
# prompt "the" may be rare enough to count).
_STOP = frozenset(
    "a an and are as at be by do does for from has have how i in is it its me my of on or please reply "
    "that the this to was what when where which who why will with you your only words word".split()
)


def terms(text: str) -> list[str]:
    """Lower-cased alphanumeric words minus stop words; ``snake_case`` and ``camelCase`` split into parts."""
    text = re.sub(r"([a-z])([A-Z])", r"\1 \2", text).lower()
    return [w for w in _WORD.findall(text) if w not in _STOP]


@dataclass
class BM25Compressor(Compressor):
    """Okapi BM25 (k1, b) of each chunk against the query; chunks with no query term keep recency order."""

    k1: float = 1.5
    b: float = 0.75
    name = "bm25"

    def score(self, layout: PromptLayout) -> np.ndarray:
        chunks = [terms(c.text) for c in layout.chunks]
        query = sorted(set(terms(layout.query)))
        bm25 = np.zeros(len(chunks))
        if query and chunks:
            index = {t: j for j, t in enumerate(query)}
            tf = np.zeros((len(chunks), len(query)))
            for i, words in enumerate(chunks):
                for w in words:
                    j = index.get(w)
                    if j is not None:
                        tf[i, j] += 1
            lengths = np.array([max(len(w), 1) for w in chunks], dtype=np.float64)
            df = (tf > 0).sum(axis=0)
            idf = np.log((len(chunks) - df + 0.5) / (df + 0.5) + 1.0)
            norm = self.k1 * (1 - self.b + self.b * lengths / lengths.mean())
            bm25 = (tf * (self.k1 + 1) / (tf + norm[:, None]) * idf).sum(axis=1)
        return with_tie_breaker(bm25, layout, 1e-3)
