"""The one seam every prompt compressor sits behind (kvpress style: a compressor only scores chunks).

A :class:`Compressor` gives each removable chunk of a :class:`~timebill.compression.layout.PromptLayout` a
score (higher = keep); the shared mechanics — the token budget ρ implies, the greedy choice, the original
order, what could not be reached, timing — live once here in :meth:`Compressor.compress`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from timebill.compression.layout import PromptLayout
from timebill.options import check_prompt_compression


@dataclass(frozen=True)
class CompressedPrompt:
    """What a compressor kept: the token ids to prefill and how close it came to the requested ρ."""

    ids: tuple[int, ...]
    original_tokens: int
    requested: float  # ρ asked for
    compressor: str
    compress_s: float  # the compressor's own time (scoring + selection), on the request's critical path
    chunks_total: int
    chunks_kept: int
    removable_tokens: int  # the most any compressor could remove from this prompt

    @property
    def kept_tokens(self) -> int:
        return len(self.ids)

    @property
    def reached(self) -> float:
        """The ρ actually reached: 1 − kept / original."""
        return 1.0 - self.kept_tokens / self.original_tokens if self.original_tokens else 0.0

    @property
    def shortfall(self) -> str | None:
        """Why the requested ρ was not reached (None when it was, within one chunk)."""
        removed = self.original_tokens - self.kept_tokens
        wanted = self.original_tokens - target_kept_tokens(self.original_tokens, self.requested)
        if self.chunks_kept > 0 or removed >= wanted:
            return None
        return (
            f"reached ρ = {self.reached:.3f} of the requested {self.requested:g}: only {self.removable_tokens} of "
            f"{self.original_tokens} prompt tokens may be removed (the query, the chat template and the tail "
            "window are kept)"
        )

    def to_record(self) -> dict:
        return {
            "compressor": self.compressor,
            "prompt_compression": self.requested,
            "prompt_compression_reached": round(self.reached, 6),
            "original_prompt_tokens": self.original_tokens,
            "compressed_prompt_tokens": self.kept_tokens,
            "compress_s": self.compress_s,
            "chunks_kept": self.chunks_kept,
            "chunks_total": self.chunks_total,
            "compression_shortfall": self.shortfall,
        }


def target_kept_tokens(n_tokens: int, rho: float) -> int:
    """Tokens a ρ compression keeps: ``n − round(ρ·n)`` (ρ = 0 keeps all; at least one token)."""
    return max(1, n_tokens - int(round(rho * n_tokens)))


def select_chunks(layout: PromptLayout, scores: np.ndarray, rho: float) -> list[int]:
    """Indices of the chunks to keep (in prompt order) for a ρ compression, greedily by score.

    Chunks are taken best first while they fit the token budget; a chunk that does not fit is skipped and
    smaller ones after it may still fill the gap, so the kept count ends below the target by less than the
    smallest skipped chunk (within one chunk). Ties go to the later chunk (recency).
    """
    budget = target_kept_tokens(layout.n_tokens, rho) - layout.protected_tokens
    n = len(layout.chunks)
    if n == 0 or budget <= 0:
        return []
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (n,) or not np.all(np.isfinite(scores)):
        raise ValueError(f"a compressor must give one finite score per chunk ({n}), got shape {scores.shape}")
    order = sorted(range(n), key=lambda i: (-scores[i], -i))
    kept: list[int] = []
    for i in order:
        size = layout.chunks[i].n_tokens
        if size <= budget:
            kept.append(i)
            budget -= size
            if budget == 0:
                break
    return sorted(kept)


class Compressor(ABC):
    """Scores the removable chunks of a prompt; :meth:`compress` turns the scores into a shorter prompt."""

    name: ClassVar[str]

    @abstractmethod
    def score(self, layout: PromptLayout) -> np.ndarray:
        """One score per chunk of ``layout`` (higher = more worth keeping)."""

    def warmup(self) -> None:
        """Pay one-off costs (loading an encoder, first-call allocations) before any request is timed."""
        return None  # noqa: B027 - most compressors have nothing to warm up

    def compress(self, layout: PromptLayout, rho: float) -> CompressedPrompt:
        """Remove about ``rho`` of the prompt's tokens; ρ = 0 returns the ids untouched (no scoring)."""
        rho = check_prompt_compression(rho)
        t0 = time.perf_counter()
        if rho == 0.0 or not layout.chunks:
            keep = list(range(len(layout.chunks)))
        else:
            keep = select_chunks(layout, self.score(layout), rho)
        ids = _assemble(layout, keep)
        return CompressedPrompt(
            ids=ids,
            original_tokens=layout.n_tokens,
            requested=rho,
            compressor=self.name,
            compress_s=time.perf_counter() - t0,
            chunks_total=len(layout.chunks),
            chunks_kept=len(keep),
            removable_tokens=layout.removable_tokens,
        )


def _assemble(layout: PromptLayout, keep: list[int]) -> tuple[int, ...]:
    """The prompt's ids without the dropped chunks, in the original order."""
    if len(keep) == len(layout.chunks):
        return layout.ids
    mask = np.ones(layout.n_tokens, dtype=bool)
    keep_set = set(keep)
    for i, chunk in enumerate(layout.chunks):
        if i not in keep_set:
            mask[chunk.start : chunk.end] = False
    return tuple(int(t) for t, m in zip(layout.ids, mask, strict=True) if m)


def positional_scores(layout: PromptLayout) -> np.ndarray:
    """Head-and-tail scores: a chunk scores by its token distance to the nearer end of the removable text."""
    if not layout.chunks:
        return np.zeros(0)
    first, last = layout.chunks[0].start, layout.chunks[-1].end
    middle = np.array([(c.start + c.end) / 2 for c in layout.chunks])
    return -np.minimum(middle - first, last - middle)


def with_tie_breaker(scores: np.ndarray, layout: PromptLayout, weight: float) -> np.ndarray:
    """``scores`` plus ``weight`` × head-and-tail order scaled to [0, 1]: chunks a compressor cannot tell
    apart go the way ``truncate`` would send them (``weight`` is far below a real score difference)."""
    position = positional_scores(layout)
    span = max(float(np.ptp(position)), 1.0) if position.size else 1.0
    return scores + weight * (position - (position.min() if position.size else 0.0)) / span
