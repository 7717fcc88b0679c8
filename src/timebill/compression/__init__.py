"""Prompt compression before prefill: feed the model fewer prompt tokens, so prefill itself gets shorter.

KV eviction (α, ``timebill.presses``) shortens decode steps after a full prefill; prompt compression (ρ,
the fraction of prompt tokens removed, same convention as α) removes whole chunks of the prompt's
content *before* prefill. Each compressor is one small class behind :class:`Compressor` (it only scores
chunks); :func:`prompt_layout` says what may be removed (never the query, the chat template's tokens or a
tail window).

| compressor | what scores a chunk | cost | paper |
|---|---|---|---|
| ``truncate`` | distance to the nearer end (keep head and tail) | ~0 | — (the by-hand baseline) |
| ``bm25`` (default) | Okapi BM25 against the query | ~ms | Robertson & Zaragoza 2009 |
| ``embedding`` | MiniLM-L6 cosine similarity to the query | one small-encoder pass | — (dense retrieval) |
| ``gemfilter`` | last tokens' attention at an early layer of the target | ~0.44 prefill | GemFilter, Shi 2024 |
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from timebill.compression.base import CompressedPrompt, Compressor, select_chunks, target_kept_tokens
from timebill.compression.bm25 import BM25Compressor
from timebill.compression.embedding import EmbeddingCompressor
from timebill.compression.layout import (
    DEFAULT_TAIL_TOKENS,
    Chunk,
    PromptLayout,
    build_layout,
    default_query_span,
    find_question,
    locate_contents,
)
from timebill.compression.truncate import TruncateCompressor
from timebill.options import COMPRESSOR_NAMES, DEFAULT_COMPRESSOR, check_compressor

if TYPE_CHECKING:
    from timebill.engine import Engine

__all__ = [
    "COMPRESSOR_NAMES",
    "DEFAULT_COMPRESSOR",
    "BM25Compressor",
    "Chunk",
    "CompressedPrompt",
    "Compressor",
    "EmbeddingCompressor",
    "PromptLayout",
    "TruncateCompressor",
    "make_compressor",
    "prompt_layout",
    "select_chunks",
    "target_kept_tokens",
]


def make_compressor(name: str, model: Any = None) -> Compressor:
    """The compressor called ``name``; ``gemfilter`` needs the target ``model`` (a transformers causal LM)."""
    check_compressor(name)
    if name == "truncate":
        return TruncateCompressor()
    if name == "bm25":
        return BM25Compressor()
    if name == "embedding":
        return EmbeddingCompressor()
    from timebill.compression.gemfilter import GemFilterCompressor

    if model is None:
        raise ValueError("the gemfilter compressor needs the target model")
    return GemFilterCompressor(model)


def prompt_layout(
    engine: Engine,
    prompt: str | Sequence[Mapping[str, Any]],
    *,
    chat: bool = True,
    question: str | None = None,
    tail_tokens: int = DEFAULT_TAIL_TOKENS,
) -> PromptLayout:
    """What of ``prompt`` (a text or chat messages) a compressor may remove, and the query to score against.

    The query: ``question`` if given (protected where the prompt contains it; scored against either way);
    otherwise a chat's last user turn when there are earlier turns (those are compressible), else the last
    line (or last sentence) of the single prompt. System turns are instructions and are never compressed.
    The ids are exactly :meth:`Engine.encode` / :meth:`Engine.encode_messages`'s (not length-checked here: a
    prompt longer than the context may still be compressed into it).
    """
    rendered = engine.render(prompt, chat=chat)
    ids = engine.tokenize(rendered, check=False)
    text = rendered.text
    spans = locate_contents(text, [t["content"] for t in rendered.turns])
    roles = [t["role"] for t in rendered.turns]
    users = [i for i, role in enumerate(roles) if role == "user" and spans[i] is not None]
    content: list[tuple[int, int]] = [s for s, r in zip(spans, roles, strict=True) if s is not None and r != "system"]
    query_span: tuple[int, int] | None = None
    query = question.strip() if question is not None else ""
    last = spans[users[-1]] if users else None
    if question is not None:
        query_span = find_question(text, last if last is not None else (0, len(text)), question)
    elif last is not None and len([r for r in roles if r != "system"]) > 1:
        query_span = last  # the last user turn is the request; earlier turns are context
    elif last is not None:
        query_span = default_query_span(text, *last)
    if query_span is not None and not query:
        query = text[query_span[0] : query_span[1]]
    return build_layout(
        engine.tokenizer,
        text,
        ids,
        content,
        query_span,
        query,
        add_special_tokens=rendered.add_special_tokens,
        tail_tokens=tail_tokens,
    )
