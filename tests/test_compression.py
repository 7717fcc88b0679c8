"""Prompt compression before prefill (``timebill.compression``, ``Engine.compress``, ``Engine.generate(ρ)``).

Everything runs on the real embedded model and its tokenizer (the session ``engine`` fixture); only the
greedy-selection unit tests use hand-built layouts. Each property is checked against an independent
reading of the prompt (the tokenizer's own offsets, the template's special-token ids, the rendered text),
not against the layout code's own bookkeeping, so a layout that drifts from the prompt fails here.
"""

from __future__ import annotations

import functools
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest
import torch

from timebill.bench.metrics import score as metric_score
from timebill.bench.suite import Task, default_suite_path, read_suite
from timebill.compression import (
    COMPRESSOR_NAMES,
    BM25Compressor,
    Chunk,
    CompressedPrompt,
    PromptLayout,
    make_compressor,
    prompt_layout,
    select_chunks,
    target_kept_tokens,
)
from timebill.compression.bm25 import terms
from timebill.engine import Engine
from timebill.errors import InvalidInputError, PromptTooLongError
from timebill.options import RequestOptions, check_compressor, check_prompt_compression

TAIL = 32  # the layout's protected tail window (DEFAULT_TAIL_TOKENS), restated: the tests pin the contract

# Twelve distinct sentences, each longer than a chunk's minimum, two to a line: a chunk should be exactly one.
SENTENCES = [
    "The harbour office opens at seven and closes at noon on Sundays.",
    "Fishing boats must register with the harbour master before leaving.",
    "The old lighthouse was built in 1870 by a mason from Aberdeen.",
    "A bakery near the pier sells rye bread and cinnamon buns every morning.",
    "The ferry to the island leaves at nine and returns at five.",
    "Tourists often photograph the red cranes at the container terminal.",
    "The gift shop on the promenade sells polished quartz pebbles.",
    "The museum keeps a brass telescope that belonged to Captain Moreau.",
    "Children learn to sail in the sheltered bay during the summer holidays.",
    "The zebra quartz vault sits beneath the chapel of Saint Odran.",
    "Local musicians play folk songs in the square on Friday evenings.",
    "The railway station is a short walk from the northern breakwater.",
]
QUESTION = "Where is the zebra quartz vault?"
NOTES = "\n".join(" ".join(SENTENCES[i : i + 2]) for i in range(0, len(SENTENCES), 2)) + "\n\n" + QUESTION

CHAT = [
    {"role": "system", "content": "You are a terse assistant. Answer in one short line and never apologise."},
    {"role": "user", "content": " ".join(SENTENCES[:6])},
    {
        "role": "assistant",
        "content": " ".join(SENTENCES[6:10]) + " I have read all of your notes about the harbour carefully.",
    },
    {"role": "user", "content": "Which captain owned the brass telescope in the museum?"},
]

SHORT_NEEDLE_TASKS = 6  # the shortest retrieval tasks of the suite (~510-650 tokens): cheap to lay out and compress


# --------------------------------------------------------------------------------------------- helpers
@functools.cache
def retrieval_tasks() -> tuple[Task, ...]:
    """The suite's needle tasks, shortest first."""
    tasks = [t for t in read_suite(default_suite_path()).tasks if t.kind == "retrieval"]
    assert tasks, "the default suite has no retrieval tasks"
    return tuple(sorted(tasks, key=lambda t: (t.prompt_tokens or 0, t.id)))


@pytest.fixture(scope="module")
def needle() -> Task:
    """A short needle prompt (~520 tokens) the uncompressed model answers (checked where it matters)."""
    task = next(t for t in retrieval_tasks() if t.id == "retrieval-057")
    assert 400 <= (task.prompt_tokens or 0) <= 900
    return task


def template_ids(engine: Engine) -> set[int]:
    """Every special or added token of the tokenizer (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``...)."""
    tok = engine.tokenizer
    ids = set(tok.all_special_ids) | {int(i) for i in tok.added_tokens_decoder}
    ids |= {int(i) for i in tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])}
    return ids


def offsets(engine: Engine, prompt: str | Sequence[Mapping[str, Any]], chat: bool = True) -> list[tuple[int, int]]:
    rendered = engine.render(prompt, chat=chat)
    encoded = engine.tokenizer(
        rendered.text, add_special_tokens=rendered.add_special_tokens, return_offsets_mapping=True
    )
    return [tuple(o) for o in encoded["offset_mapping"]]


def content_spans(engine: Engine, prompt: str | Sequence[Mapping[str, Any]], chat: bool = True) -> list[tuple]:
    """(role, start, end) of each turn's content in the rendered text, found by plain search."""
    rendered = engine.render(prompt, chat=chat)
    spans, cursor = [], 0
    for turn in rendered.turns:
        needle = turn["content"].strip()
        at = rendered.text.find(needle, cursor)
        assert at >= 0, f"turn content not found in the rendered prompt: {needle[:40]!r}"
        spans.append((turn["role"], at, at + len(needle)))
        cursor = at + len(needle)
    return spans


def chunk_positions(layout: PromptLayout) -> set[int]:
    return {i for c in layout.chunks for i in range(c.start, c.end)}


def assert_layout_is_sound(
    engine: Engine,
    prompt: str | Sequence[Mapping[str, Any]],
    layout: PromptLayout,
    *,
    chat: bool = True,
    query_text: str | None = None,
) -> None:
    """Chunks in order, disjoint, inside non-system content, clear of template tokens, the query and the tail."""
    text = engine.render(prompt, chat=chat).text
    offs = offsets(engine, prompt, chat=chat)
    assert len(offs) == layout.n_tokens
    assert layout.chunks, "nothing is removable: the test prompt is too short to say anything"
    previous_end = 0
    for c in layout.chunks:
        assert previous_end <= c.start < c.end <= layout.n_tokens, f"chunks out of order or overlapping at {c}"
        previous_end = c.end
    specials = template_ids(engine)
    spans = content_spans(engine, prompt, chat=chat)
    removable = [(a, b) for role, a, b in spans if role != "system"]
    system = [(a, b) for role, a, b in spans if role == "system"]
    for c in layout.chunks:
        ids = layout.ids[c.start : c.end]
        assert not specials & set(ids), f"a chunk holds template tokens: {c.text!r}"
        for i in range(c.start, c.end):
            a, b = offs[i]
            assert b > a, f"token {i} of chunk {c.text!r} has no text"
            assert any(s <= a < e for s, e in removable), f"token {i} ({text[a:b]!r}) is outside every content turn"
            assert not any(s <= a < e for s, e in system), f"token {i} ({text[a:b]!r}) is in the system turn"
    positions = chunk_positions(layout)
    if query_text is not None:
        qa = text.rfind(query_text.strip())
        assert qa >= 0
        qb = qa + len(query_text.strip())
        query_tokens = {i for i, (a, b) in enumerate(offs) if a < qb and b > qa}
        assert query_tokens and not query_tokens & positions, "a chunk overlaps the query"
    content_tokens = [i for i, (a, b) in enumerate(offs) if b > a and any(s <= a < e for s, e in removable)]
    assert not set(content_tokens[-TAIL:]) & positions, "a chunk overlaps the last 32 content tokens"


def assert_whole_chunks_removed(layout: PromptLayout, kept: Sequence[int]) -> None:
    """``kept`` is the layout's ids with some whole chunks left out (so everything else is there, in order)."""
    ids, chunks = layout.ids, layout.chunks
    bounds = [0] + [x for c in chunks for x in (c.start, c.end)] + [len(ids)]
    kept = tuple(kept)

    @functools.cache
    def matches(k: int, j: int) -> bool:  # protected run k, then chunk k (kept or dropped), from kept[j]
        a, b = bounds[2 * k], bounds[2 * k + 1]
        if kept[j : j + b - a] != ids[a:b]:
            return False
        j += b - a
        if k == len(chunks):
            return j == len(kept)
        c = chunks[k]
        take = kept[j : j + c.n_tokens] == ids[c.start : c.end] and matches(k + 1, j + c.n_tokens)
        return take or matches(k + 1, j)

    assert matches(0, 0), "the compressed ids are not the original ids minus whole chunks, in order"


def greedy_reference(engine: Engine, ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy generate on ``ids`` (what tests/test_engine.py checks α = 0 against)."""
    out = engine.model.generate(
        torch.tensor([list(ids)]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=sorted(engine.stop_ids),
        pad_token_id=sorted(engine.stop_ids)[0],
    )
    return out[0, len(ids) :].tolist()


def long_needle_prompt(engine: Engine) -> tuple[str, str]:
    """A needle prompt longer than the model's context: several suite haystacks, one Hobart needle, its question."""
    tasks = {t.id: t for t in retrieval_tasks()}
    first = tasks["retrieval-020"]  # holds "The secret passphrase for Hobart is golden badger."
    question = first.prompt.rstrip().rsplit("\n", 1)[1]
    parts = [first.prompt.rstrip().rsplit("\n", 1)[0]]
    for task in sorted(retrieval_tasks(), key=lambda t: -(t.prompt_tokens or 0)):
        if sum(len(engine.tokenizer.encode(p)) for p in parts) > engine.context_length + 800:
            break
        if task.id != first.id:
            parts.append(task.prompt.rstrip().rsplit("\n", 1)[0])
    prompt = "\n\n".join(parts[1:] + parts[:1]) + "\n\n" + question
    assert prompt.count("passphrase for Hobart") == 2, "the long prompt must hold exactly one Hobart needle"
    return prompt, first.references[0]


# ---------------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("chat", [True, False], ids=["chat", "raw"])
def test_layout_of_a_prompt_is_the_engines_tokens_with_safe_chunks(engine: Engine, chat: bool) -> None:
    layout = prompt_layout(engine, NOTES, chat=chat)
    assert layout.ids == tuple(engine.encode(NOTES, chat=chat))
    assert layout.query == QUESTION  # a single prompt's query: its last line
    assert_layout_is_sound(engine, NOTES, layout, chat=chat, query_text=QUESTION)


def test_layout_of_a_real_needle_prompt(engine: Engine, needle: Task) -> None:
    layout = prompt_layout(engine, needle.prompt)
    assert layout.ids == tuple(engine.encode(needle.prompt))
    last_line = needle.prompt.rstrip().rsplit("\n", 1)[1]
    assert layout.query == last_line
    assert_layout_is_sound(engine, needle.prompt, layout, query_text=last_line)


def test_layout_of_a_chat_compresses_earlier_turns_and_queries_the_last_user_turn(engine: Engine) -> None:
    layout = prompt_layout(engine, CHAT)
    assert layout.ids == tuple(engine.encode_messages(CHAT))
    assert layout.query == CHAT[-1]["content"]
    assert_layout_is_sound(engine, CHAT, layout, query_text=CHAT[-1]["content"])
    texts = [c.text for c in layout.chunks]
    assert any(t in CHAT[1]["content"] for t in texts), "the first user turn should be compressible"
    assert any(t in CHAT[2]["content"] for t in texts), "the assistant turn should be compressible"
    assert not any(t in CHAT[0]["content"] for t in texts)


@pytest.mark.parametrize(
    "prompt", [NOTES, CHAT, SENTENCES[0] + " " + SENTENCES[1] + "\n" + NOTES], ids=["notes", "chat", "offset"]
)
def test_chunks_are_whole_sentences_and_their_text_is_their_tokens(engine: Engine, prompt: Any) -> None:
    """A chunk is one sentence here (every sentence is long enough), wherever its turn starts in the chat text.

    The needle sentence of a retrieval prompt must be one chunk: split across two, BM25 scores the half with
    the question's words and drops the half with the answer.
    """
    layout = prompt_layout(engine, prompt)
    assert len(layout.chunks) >= 4
    for c in layout.chunks[:-1]:  # the last one may be cut short by the tail window
        assert c.text.strip() in SENTENCES, f"chunk is not a sentence: {c.text!r}"


def test_a_chunks_tokens_are_its_text(engine: Engine) -> None:
    """What a compressor scores (``Chunk.text``) is what dropping the chunk removes (its token range)."""
    layout = prompt_layout(engine, NOTES)
    for c in layout.chunks[:-1]:
        assert engine.tokenizer.decode(list(layout.ids[c.start : c.end])).strip() == c.text.strip()


@pytest.mark.parametrize("compressor", ["truncate", "bm25"])
def test_a_question_in_the_prompt_is_never_dropped(engine: Engine, compressor: str) -> None:
    question = SENTENCES[4]  # the middle of the prompt: what truncate drops first
    layout = prompt_layout(engine, NOTES, question=question)
    assert layout.query == question
    assert_layout_is_sound(engine, NOTES, layout, query_text=question)
    compressed = engine.compress(NOTES, 0.9, compressor, question=question)
    assert compressed.kept_tokens < layout.n_tokens // 2
    assert question in engine.tokenizer.decode(list(compressed.ids))


def test_a_question_not_in_the_prompt_is_still_the_query(engine: Engine) -> None:
    question = "Which captain owned the brass telescope?"  # the prompt's own last line asks about the vault
    assert question not in NOTES
    layout = prompt_layout(engine, NOTES, question=question)
    assert layout.query == question
    scores = BM25Compressor().score(layout)
    best = layout.chunks[int(np.argmax(scores))]
    assert "telescope" in best.text
    kept = engine.tokenizer.decode(list(engine.compress(NOTES, 0.5, "bm25", question=question).ids))
    assert "brass telescope that belonged to Captain Moreau." in kept


@pytest.mark.parametrize("question", ["", "   \n"])
def test_an_empty_question_is_invalid(engine: Engine, question: str) -> None:
    with pytest.raises(InvalidInputError, match="question"):
        prompt_layout(engine, NOTES, question=question)
    with pytest.raises(InvalidInputError, match="question"):
        engine.compress(NOTES, 0.5, "bm25", question=question)
    with pytest.raises(InvalidInputError, match="question"):
        engine.generate(NOTES, prompt_compression=0.5, question=question, max_new_tokens=1)


# ------------------------------------------------------------------------------------- every compressor
@pytest.mark.parametrize("rho", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("name", COMPRESSOR_NAMES)
def test_compressor_removes_whole_chunks_close_to_rho(engine: Engine, needle: Task, name: str, rho: float) -> None:
    layout = prompt_layout(engine, needle.prompt)
    n = layout.n_tokens
    wanted = int(round(rho * n))
    assert layout.removable_tokens >= wanted, "premise: this prompt can reach ρ"
    compressed = engine.compress(needle.prompt, rho, name)
    assert isinstance(compressed, CompressedPrompt)
    assert compressed.compressor == name
    assert compressed.original_tokens == n and compressed.requested == rho
    assert compressed.chunks_total == len(layout.chunks)
    assert compressed.removable_tokens == layout.removable_tokens
    assert_whole_chunks_removed(layout, compressed.ids)
    specials = template_ids(engine)
    before = Counter(t for t in layout.ids if t in specials)
    assert Counter(t for t in compressed.ids if t in specials) == before and before
    assert layout.query in engine.tokenizer.decode(list(compressed.ids))
    removed = n - compressed.kept_tokens
    assert abs(removed - wanted) <= max(c.n_tokens for c in layout.chunks), (removed, wanted)
    assert math.isclose(compressed.reached, removed / n)
    assert compressed.shortfall is None
    assert compressed.compress_s > 0
    record = compressed.to_record()
    assert record["compressed_prompt_tokens"] == compressed.kept_tokens
    assert record["compression_shortfall"] is None


@pytest.mark.parametrize("name", COMPRESSOR_NAMES)
def test_compressor_at_rho_zero_returns_the_original_ids(engine: Engine, needle: Task, name: str) -> None:
    compressed = engine.compress(needle.prompt, 0.0, name)
    assert compressed.ids == tuple(engine.encode(needle.prompt))
    assert compressed.reached == 0.0 and compressed.shortfall is None
    assert compressed.chunks_kept == compressed.chunks_total


@pytest.mark.parametrize("name", COMPRESSOR_NAMES)
def test_compressor_says_when_rho_cannot_be_reached(engine: Engine, name: str) -> None:
    layout = prompt_layout(engine, NOTES)
    assert layout.protected_tokens > target_kept_tokens(layout.n_tokens, 0.9), "premise: ρ = 0.9 is out of reach"
    compressed = engine.compress(NOTES, 0.9, name)
    assert compressed.chunks_kept == 0
    assert compressed.kept_tokens == layout.protected_tokens
    assert_whole_chunks_removed(layout, compressed.ids)
    assert compressed.reached < 0.9
    assert isinstance(compressed.shortfall, str) and "0.9" in compressed.shortfall
    assert compressed.to_record()["compression_shortfall"] == compressed.shortfall


# --------------------------------------------------------------------------------- through Engine.generate
def test_rho_zero_generate_is_the_uncompressed_request_bit_for_bit(engine: Engine) -> None:
    reference = greedy_reference(engine, engine.encode(NOTES), 16)
    plain = engine.generate(NOTES, max_new_tokens=16)
    zero = engine.generate(NOTES, max_new_tokens=16, prompt_compression=0.0, compressor="gemfilter", question="x")
    assert plain.token_ids == reference
    assert zero.token_ids == reference
    assert zero.prompt_tokens == plain.prompt_tokens == len(engine.encode(NOTES))
    assert zero.original_prompt_tokens is None and zero.compressor is None and zero.compress_s == 0.0


def test_compressed_generate_prefills_exactly_the_kept_ids(engine: Engine) -> None:
    compressed = engine.compress(NOTES, 0.5, "bm25")
    result = engine.generate(NOTES, prompt_compression=0.5, max_new_tokens=16)
    assert result.token_ids == greedy_reference(engine, compressed.ids, 16)
    assert result.prompt_tokens == compressed.kept_tokens < len(engine.encode(NOTES))
    assert result.original_prompt_tokens == len(engine.encode(NOTES))
    assert result.prompt_compression == pytest.approx(compressed.reached)
    assert result.compressor == "bm25"
    assert 0 < result.compress_s <= result.token_times_s[0]  # timestamps count from the request's start


def test_short_needles_survive_bm25_at_half(engine: Engine) -> None:
    lost = []
    for task in retrieval_tasks()[:SHORT_NEEDLE_TASKS]:
        kept = engine.tokenizer.decode(list(engine.compress(task.prompt, 0.5, "bm25").ids))
        if task.references[0] not in kept:
            lost.append(task.id)
    assert not lost, f"bm25 at ρ = 0.5 dropped the needle of {lost}"


def test_needle_is_answered_after_bm25_at_half(engine: Engine, needle: Task) -> None:
    reference = needle.references[0]
    plain = engine.generate(needle.prompt, max_new_tokens=16)
    # premise: the uncompressed model answers (qa_f1 > 0; F1 is diluted by the model's full-sentence answer)
    assert reference in plain.text.lower() and metric_score(needle.metric, plain.text, needle.references) > 0, (
        plain.text
    )
    compressed = engine.compress(needle.prompt, 0.5, "bm25")
    assert compressed.reached == pytest.approx(0.5, abs=0.05)
    assert reference in engine.tokenizer.decode(list(compressed.ids))
    answer = engine.generate(needle.prompt, prompt_compression=0.5, max_new_tokens=16)
    assert answer.prompt_tokens == compressed.kept_tokens
    assert reference in answer.text.lower(), answer.text


# ------------------------------------------------------------------------------------------------ BM25
def test_bm25_ranks_the_chunk_with_the_querys_rare_terms_first(engine: Engine) -> None:
    layout = prompt_layout(engine, NOTES)  # query: "Where is the zebra quartz vault?"
    assert set(terms(layout.query)) == {"zebra", "quartz", "vault"}
    scores = BM25Compressor().score(layout)
    assert scores.shape == (len(layout.chunks),) and np.all(np.isfinite(scores))
    texts = [c.text for c in layout.chunks]
    vault = next(i for i, t in enumerate(texts) if "zebra" in t)
    pebbles = next(i for i, t in enumerate(texts) if "pebbles" in t)  # one query term
    unrelated = [i for i in range(len(texts)) if i not in (vault, pebbles)]
    assert scores[vault] > scores[pebbles] + 0.1
    assert scores[pebbles] > max(scores[i] for i in unrelated) + 0.1
    assert max(scores[i] for i in unrelated) < 0.01  # no query term: only the positional tie-breaker


def test_bm25_terms_split_identifiers_and_drop_stop_words() -> None:
    assert terms("What is the parseConfig of max_tokens?") == ["parse", "config", "max", "tokens"]


# ----------------------------------------------------------------------------------- greedy selection
def hand_layout(n_tokens: int, sizes: Sequence[int]) -> PromptLayout:
    """A layout of ``n_tokens`` ids whose chunks have ``sizes`` back to back from token 2 (no model)."""
    chunks, at = [], 2
    for size in sizes:
        chunks.append(Chunk(at, at + size, f"chunk of {size}"))
        at += size
    assert at <= n_tokens
    return PromptLayout(tuple(range(100, 100 + n_tokens)), tuple(chunks), "query")


def test_select_chunks_greedy_skips_what_does_not_fit_and_fills_the_budget() -> None:
    layout = hand_layout(24, [6, 3, 2, 5])  # 8 protected tokens
    rho = 0.46  # removes round(11.04) = 11 → keeps 13 → budget 5 for chunks
    assert target_kept_tokens(24, rho) - layout.protected_tokens == 5
    assert select_chunks(layout, np.array([4.0, 3.0, 2.0, 1.0]), rho) == [1, 2]  # 6 skipped, 3 + 2 fill it
    assert select_chunks(layout, np.array([1.0, 2.0, 3.0, 4.0]), rho) == [3]  # best first, in prompt order
    assert select_chunks(layout, np.array([4.0, 3.0, 2.0, 1.0]), 0.0) == [0, 1, 2, 3]


def test_select_chunks_ties_go_to_the_later_chunk() -> None:
    layout = hand_layout(10, [4, 4])  # 2 protected; ρ = 0.4 keeps 6 → room for one chunk
    assert select_chunks(layout, np.array([1.0, 1.0]), 0.4) == [1]
    assert select_chunks(layout, np.array([1.5, 1.0]), 0.4) == [0]


def test_select_chunks_keeps_nothing_without_a_budget() -> None:
    layout = hand_layout(20, [5, 5, 5])  # 5 protected; ρ = 0.8 keeps 4 < 5
    assert target_kept_tokens(20, 0.8) <= layout.protected_tokens
    assert select_chunks(layout, np.array([3.0, 2.0, 1.0]), 0.8) == []
    assert select_chunks(PromptLayout(tuple(range(5)), (), "q"), np.zeros(0), 0.5) == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_select_chunks_refuses_a_non_finite_score(bad: float) -> None:
    layout = hand_layout(24, [6, 3, 2, 5])
    with pytest.raises(ValueError, match="finite"):
        select_chunks(layout, np.array([1.0, bad, 2.0, 3.0]), 0.3)
    with pytest.raises(ValueError):
        select_chunks(layout, np.array([1.0, 2.0]), 0.3)  # one score per chunk


def test_target_kept_tokens_rounds_and_keeps_at_least_one() -> None:
    assert target_kept_tokens(10, 0.0) == 10
    assert target_kept_tokens(10, 0.26) == 7
    assert target_kept_tokens(3, 0.99) == 1


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("rho", [-0.1, 1.0, 1.5, float("nan"), float("inf"), True, "0.5"])
def test_bad_rho_is_invalid_everywhere(engine: Engine, rho: Any) -> None:
    with pytest.raises(InvalidInputError, match="prompt_compression"):
        check_prompt_compression(rho)
    with pytest.raises(InvalidInputError, match="prompt_compression"):
        engine.generate(NOTES, prompt_compression=rho, max_new_tokens=1)
    with pytest.raises(InvalidInputError, match="prompt_compression"):
        engine.compress(NOTES, rho)
    with pytest.raises(InvalidInputError, match="prompt_compression"):
        RequestOptions(prompt_compression=rho)


def test_unknown_compressor_is_invalid(engine: Engine) -> None:
    with pytest.raises(InvalidInputError, match="compressor"):
        check_compressor("zip")
    with pytest.raises(InvalidInputError, match="compressor"):
        make_compressor("zip")
    with pytest.raises(InvalidInputError, match="compressor"):
        engine.compress(NOTES, 0.5, "zip")
    for rho in (0.0, 0.5):
        with pytest.raises(InvalidInputError, match="compressor"):
            engine.generate(NOTES, prompt_compression=rho, compressor="zip", max_new_tokens=1)
    with pytest.raises(InvalidInputError, match="compressor"):
        RequestOptions(compressor="zip")


def test_empty_or_token_id_prompts_cannot_be_compressed(engine: Engine) -> None:
    for empty in ("", "  \n "):
        with pytest.raises(InvalidInputError, match="empty"):
            engine.generate(empty, prompt_compression=0.5, max_new_tokens=1)
        with pytest.raises(InvalidInputError, match="empty"):
            engine.compress(empty, 0.5)
    with pytest.raises(InvalidInputError, match="token ids"):
        engine.generate(engine.encode(NOTES), prompt_compression=0.5, max_new_tokens=1)
    assert engine.generate(engine.encode(NOTES), prompt_compression=0.0, max_new_tokens=1).tokens_generated == 1


def test_request_options_refuse_rho_one() -> None:
    with pytest.raises(InvalidInputError, match="prompt_compression"):
        RequestOptions(prompt_compression=1.0)
    assert RequestOptions(prompt_compression=0.5, compressor="truncate").prompt_compression == 0.5


# ------------------------------------------------------------------------------ longer than the context
def test_a_prompt_longer_than_the_context_compresses_into_it(engine: Engine) -> None:
    prompt, reference = long_needle_prompt(engine)
    with pytest.raises(PromptTooLongError):
        engine.encode(prompt)
    t0 = time.perf_counter()
    compressed = engine.compress(prompt, 0.9, "bm25")  # no prefill: layout and BM25 only
    elapsed = time.perf_counter() - t0
    assert compressed.original_tokens > engine.context_length
    assert compressed.kept_tokens < engine.context_length
    assert compressed.shortfall is None
    assert reference in engine.tokenizer.decode(list(compressed.ids))
    assert elapsed < 2.0, f"layout + bm25 of {compressed.original_tokens} tokens took {elapsed:.2f} s"
    with pytest.raises(PromptTooLongError):
        engine.compress(prompt, 0.01, "bm25")  # the kept tokens still do not fit
    with pytest.raises(PromptTooLongError):
        engine.compress(prompt, 0.9, "gemfilter")  # gemfilter reads the whole prompt with the model
