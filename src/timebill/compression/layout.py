"""Which prompt tokens a compressor may drop: the prompt as chunks of text, with its protected parts.

A compressor removes whole chunks (sentences or lines) of the *content* of a prompt. Never removable:
the chat template's own tokens (role markers, special tokens), the **query** (the part of the prompt that
is the request), and a **tail window** of the last content tokens (the next line of code depends mostly on
the recent lines; a question's last words sit there too). Everything works on the token ids the engine
would prefill, mapped to characters through the fast tokenizer's offsets, so a compressed prompt is the
original token sequence with some runs of tokens left out, in their original order.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from timebill.errors import InvalidInputError

#: Content tokens at the end of the prompt that are never dropped.
DEFAULT_TAIL_TOKENS = 32
#: A piece shorter than this many characters is merged into the next one (a chunk is a sentence or line,
#: not a stray "Yes," whose score says nothing).
MIN_CHUNK_CHARS = 24
#: A piece longer than this (a minified line) is split at whitespace, so one chunk never dominates ρ.
MAX_CHUNK_CHARS = 400
#: The default query of a single prompt is its last non-empty line; if that line is longer than this, its
#: last sentence.
MAX_DEFAULT_QUERY_CHARS = 300

# A piece ends after a newline, or after sentence punctuation (and closing quotes/brackets), before the
# spaces: this tokenizer attaches a space to the next word (" Fishing"), so the next piece starts there.
_BOUNDARY = re.compile(r"\n|(?<=[.!?])[\"')\]]*(?=[ \t])")


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens ``ids[start:end]`` — one sentence or line of content, removable as a unit."""

    start: int
    end: int
    text: str

    @property
    def n_tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class PromptLayout:
    """The prompt's token ids, its removable chunks (in order) and the query the chunks are scored against."""

    ids: tuple[int, ...]
    chunks: tuple[Chunk, ...]
    query: str

    @property
    def n_tokens(self) -> int:
        return len(self.ids)

    @property
    def removable_tokens(self) -> int:
        return sum(c.n_tokens for c in self.chunks)

    @property
    def protected_tokens(self) -> int:
        return self.n_tokens - self.removable_tokens


# ------------------------------------------------------------------------------------------ chunking
def split_pieces(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Character spans of the sentences/lines of ``text[start:end]`` (short ones merged, long ones split)."""
    cuts = [m.end() for m in _BOUNDARY.finditer(text, start, end)]  # finditer(pos=) gives absolute offsets
    spans: list[tuple[int, int]] = []
    begin = start
    for cut in [*cuts, end]:
        if cut <= begin:
            continue
        spans.extend(_split_long(text, begin, cut))
        begin = cut
    merged: list[tuple[int, int]] = []
    pending: int | None = None
    for a, b in spans:
        a = a if pending is None else pending
        if b - a < MIN_CHUNK_CHARS:
            pending = a
            continue
        merged.append((a, b))
        pending = None
    if pending is not None:
        if merged:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((pending, end))
    return merged


def _split_long(text: str, start: int, end: int) -> list[tuple[int, int]]:
    spans = []
    while end - start > MAX_CHUNK_CHARS:
        cut = text.rfind(" ", start + MAX_CHUNK_CHARS // 2, start + MAX_CHUNK_CHARS)
        cut = start + MAX_CHUNK_CHARS if cut <= start else cut + 1
        spans.append((start, cut))
        start = cut
    spans.append((start, end))
    return spans


def default_query_span(text: str, start: int, end: int) -> tuple[int, int]:
    """The last non-empty line of ``text[start:end]``; its last sentence if that line is very long."""
    stripped_end = start + len(text[start:end].rstrip())
    line_start = text.rfind("\n", start, stripped_end) + 1
    line_start = max(line_start, start)
    while line_start < stripped_end and text[line_start].isspace():
        line_start += 1
    if stripped_end - line_start > MAX_DEFAULT_QUERY_CHARS:
        boundaries = [m.end() for m in _BOUNDARY.finditer(text, line_start, stripped_end - 1)]
        if boundaries:
            line_start = boundaries[-1]
            while line_start < stripped_end and text[line_start].isspace():
                line_start += 1
    if stripped_end - line_start > MAX_DEFAULT_QUERY_CHARS:  # one long sentence: its last words
        cut = text.find(" ", stripped_end - MAX_DEFAULT_QUERY_CHARS, stripped_end)
        line_start = cut + 1 if cut >= 0 else stripped_end - MAX_DEFAULT_QUERY_CHARS
    return line_start, stripped_end


# -------------------------------------------------------------------------------------------- layout
def build_layout(
    tokenizer: Any,
    text: str,
    ids: Sequence[int],
    content_spans: Sequence[tuple[int, int]],
    query_span: tuple[int, int] | None,
    query: str,
    *,
    add_special_tokens: bool,
    tail_tokens: int = DEFAULT_TAIL_TOKENS,
) -> PromptLayout:
    """Map ``text``'s removable character spans onto ``ids`` (the engine's own tokenisation of ``text``).

    ``content_spans``: the character spans a compressor may remove from (minus the query span and the
    tail window); everything else is protected. Raises ``InvalidInputError`` if the tokenizer cannot give
    offsets, or gives different ids than the engine (compressing them would prefill a different prompt).
    """
    try:
        encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError) as exc:
        raise InvalidInputError(f"prompt compression needs a fast tokenizer with offsets: {exc}") from exc
    if list(encoded["input_ids"]) != list(ids):
        raise InvalidInputError(
            "prompt compression: the tokenizer's offsets do not describe the engine's token ids for this prompt"
        )
    offsets = [tuple(o) for o in encoded["offset_mapping"]]
    # Tokens with text, in order (their start offsets are sorted): a piece's tokens are found by bisection.
    real = [i for i, (a, b) in enumerate(offsets) if b > a]
    starts = [offsets[i][0] for i in real]
    # The tail window: the last `tail_tokens` tokens that start inside content are never dropped.
    content_tokens = [i for i in real if _inside(offsets[i][0], content_spans)]
    tail_from = len(offsets)
    if tail_tokens and content_tokens:
        tail_from = content_tokens[-min(tail_tokens, len(content_tokens))]
    chunks: list[Chunk] = []
    for span_start, span_end in content_spans:
        for a, b in split_pieces(text, span_start, span_end):
            if query_span is not None and a < query_span[1] and b > query_span[0]:
                continue  # a piece that overlaps the query is the query's
            lo, hi = bisect.bisect_left(starts, a), bisect.bisect_left(starts, b)
            if hi <= lo:
                continue
            first, last = real[lo], min(real[hi - 1] + 1, tail_from)
            if last > first:
                chunks.append(Chunk(first, last, text[a:b]))
    return PromptLayout(tuple(int(i) for i in ids), tuple(chunks), query)


def _inside(pos: int, spans: Sequence[tuple[int, int]]) -> bool:
    return any(a <= pos < b for a, b in spans)


def locate_contents(text: str, contents: Sequence[str]) -> list[tuple[int, int] | None]:
    """Character span of each message content inside the rendered chat text, in order (None if absent).

    A chat template may strip a content's surrounding whitespace; a content not found at all (a template
    that rewrites it) is left protected rather than guessed at.
    """
    spans: list[tuple[int, int] | None] = []
    cursor = 0
    for content in contents:
        needle = content.strip()
        at = text.find(needle, cursor) if needle else -1
        if at < 0:
            spans.append(None)
            continue
        spans.append((at, at + len(needle)))
        cursor = at + len(needle)
    return spans


def find_question(text: str, span: tuple[int, int], question: str) -> tuple[int, int] | None:
    """The last occurrence of ``question`` inside ``text[span]`` (None if the prompt does not contain it)."""
    needle = question.strip()
    if not needle:
        raise InvalidInputError("question is empty; leave it out to use the prompt's last line or turn")
    at = text.rfind(needle, span[0], span[1])
    return None if at < 0 else (at, at + len(needle))
