"""The length-label file: JSON Lines, a header that pins how labels were made, then one record per prompt.

Read, repaired and appended crash-safely here; also merged from shards, and exported for (and compared
with) labelling on another machine. :mod:`timebill.predictor.labelling` writes the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from timebill.engine import STOP_EOS, STOP_MAX_TOKENS, Engine
from timebill.errors import PredictorError
from timebill.paths import write_bytes_atomically
from timebill.predictor.batch_decode import pad_id
from timebill.predictor.data import Conversation

FORMAT_VERSION = 1
DEFAULT_CAP_TOKENS = 1024
DEFAULT_LABELS_FILE = Path(__file__).resolve().parent.parent / "data" / "labels-smollm2-135m.jsonl"
STOP_REASONS = (STOP_EOS, STOP_MAX_TOKENS)
EXPORT_FORMAT = "timebill-label-prompts/1"
# Header fields that must match for a resumed run to append to a file ("created" may differ).
_IDENTITY_FIELDS = (
    "format_version",
    "model_id",
    "model_fingerprint",
    "cap_tokens",
    "chat_template_sha256",
    "decoding",
)


@dataclass(frozen=True)
class LengthLabel:
    """The target's own response to one prompt: its length in tokens (EOS included) and why it stopped."""

    index: int  # Conversation.index
    # Generated tokens up to and including the first stop token (EOS / end of turn), i.e. the engine's
    # ``GenerationResult.tokens_generated`` for the same request; == cap (stop reason max_tokens) when cut.
    length: int
    stop_reason: str  # eos | max_tokens
    prompt_tokens: int  # chat-templated prompt length
    # Where the label was made when not this package's CPU labeller (e.g. "cuda" for
    # scripts/label_on_accelerator.py); omitted from the record when None.
    device: str | None = None

    def to_json(self) -> str:
        data = asdict(self)
        if data["device"] is None:
            del data["device"]
        return json.dumps(data, separators=(",", ":"))


# ------------------------------------------------------------------------------------------ header
def label_header(engine: Engine, cap_tokens: int) -> dict:
    """The header line of a label file: which model, which settings; a resumed run must match it.

    The settings it pins: the prompt goes through the model's chat template (as :meth:`Engine.encode`
    does), α = 0 (no eviction), greedy decoding, float32 weights, at most ``cap_tokens`` new tokens.
    """
    template = getattr(engine.tokenizer, "chat_template", None) or ""
    return {
        "format_version": FORMAT_VERSION,
        "model_id": engine.source.model_id,
        "model_fingerprint": engine.source.fingerprint,
        "cap_tokens": int(cap_tokens),
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()[:16],
        "decoding": {
            "greedy": True,
            "alpha": 0.0,
            "dtype": engine.dtype,
            "chat_template": bool(template),
            "stop_token_ids": sorted(int(t) for t in engine.stop_ids),
            "length_counts_stop_token": True,
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def check_header(found: dict, expected: dict, path: Path) -> None:
    diffs = [
        f"{key}: file has {found.get(key)!r}, this run has {expected.get(key)!r}"
        for key in _IDENTITY_FIELDS
        if found.get(key) != expected.get(key)
    ]
    if diffs:
        raise PredictorError(
            f"{path} holds labels made with other settings, so this run cannot resume it ("
            + "; ".join(diffs)
            + "). Pass another --out file, or delete this one to start over."
        )


# ------------------------------------------------------------------------------------- label files
def _parse_record(line: str) -> LengthLabel:
    data = json.loads(line)
    label = LengthLabel(
        index=data["index"],
        length=data["length"],
        stop_reason=data["stop_reason"],
        prompt_tokens=data["prompt_tokens"],
        device=data.get("device"),
    )
    if label.device is not None and not isinstance(label.device, str):
        raise ValueError(f"not a valid label record (device must be a string): {line!r}")
    ints_ok = all(
        isinstance(v, int) and not isinstance(v, bool) for v in (label.index, label.length, label.prompt_tokens)
    )
    if not ints_ok or label.length < 1 or label.stop_reason not in STOP_REASONS:
        raise ValueError(f"not a valid label record: {line!r}")
    return label


def _rewrite_atomically(path: Path, data: bytes) -> None:
    write_bytes_atomically(path, data, mode=path.stat().st_mode & 0o777 if path.exists() else 0o644)


def read_label_file(path: str | os.PathLike[str], repair: bool = False) -> tuple[dict | None, list[LengthLabel]]:
    """(header, records) of a label file; (None, []) when it does not exist or is empty.

    A torn last line (a run killed mid-write) is ignored, and with ``repair`` cut from the file.
    Anything else unreadable — a corrupt line before the last, a duplicated index — is a
    :class:`PredictorError`: silently dropping labels would hide a bug.
    """
    path = Path(path)
    if not path.exists():
        return None, []
    raw = path.read_bytes()
    complete, _, tail = raw.rpartition(b"\n")
    lines = complete.split(b"\n") if complete else []
    torn = bool(tail)  # bytes after the last newline: a line whose write did not finish
    if lines:
        try:
            json.loads(lines[-1])
        except ValueError:
            lines.pop()  # a last line cut inside (e.g. the tail of a block lost on power failure)
            torn = True
    if torn and repair:
        _rewrite_atomically(path, b"".join(line + b"\n" for line in lines))
    if not lines:
        return None, []
    try:
        header = json.loads(lines[0])
    except ValueError as exc:
        raise PredictorError(f"{path}: the header line is not JSON ({exc}); delete the file to start over.") from exc
    if not isinstance(header, dict) or "format_version" not in header:
        raise PredictorError(f"{path} is not a TimeBill label file (no header line).")
    if header["format_version"] != FORMAT_VERSION:
        raise PredictorError(
            f"{path} has label format {header['format_version']}, this TimeBill reads {FORMAT_VERSION}."
        )
    records: list[LengthLabel] = []
    seen: set[int] = set()
    for number, line in enumerate(lines[1:], start=2):
        try:
            record = _parse_record(line.decode("utf-8"))
        except (ValueError, KeyError, TypeError) as exc:
            raise PredictorError(f"{path} line {number} is corrupt ({exc}); the file cannot be trusted.") from exc
        if record.index in seen:
            raise PredictorError(f"{path} line {number}: index {record.index} is labelled twice.")
        seen.add(record.index)
        records.append(record)
    return header, records


def append_labels(f, records: Sequence[LengthLabel]) -> None:  # noqa: ANN001 - binary file object
    """Append records durably (flushed and fsync'd): the file is append-only, a header line then records."""
    f.write("".join(r.to_json() + "\n" for r in records).encode())
    f.flush()
    os.fsync(f.fileno())


def merge_label_files(into: str | os.PathLike[str], sources: Sequence[str | os.PathLike[str]]) -> tuple[int, int]:
    """Append the records of ``sources`` (e.g. shard files of a parallel run) that ``into`` lacks.

    Headers must describe the same labelling (model, cap, template, decoding); ``into`` is rewritten
    through a temporary file and ``os.replace``, so a crash leaves either the old or the merged file.
    Returns (records added, records already present).
    """
    into = Path(into)
    header, records = read_label_file(into, repair=True)
    if header is None:
        raise PredictorError(f"{into} has no labels to merge into.")
    have = {r.index for r in records}
    added: list[LengthLabel] = []
    duplicates = 0
    for source in sources:
        src_header, src_records = read_label_file(source)
        if src_header is None:
            continue
        check_header(src_header, header, Path(source))
        for record in src_records:
            if record.index in have:
                duplicates += 1
                continue
            have.add(record.index)
            added.append(record)
    if added:
        _rewrite_atomically(into, into.read_bytes() + "".join(r.to_json() + "\n" for r in added).encode())
    return len(added), duplicates


# ------------------------------------------------------------------------- labelling elsewhere
def export_prompts(
    engine: Engine,
    groups: Sequence[Sequence[Conversation]],
    out: str | os.PathLike[str],
    cap_tokens: int = DEFAULT_CAP_TOKENS,
    skip: set[int] | None = None,
) -> int:
    """Write the chat-templated token ids of ``groups`` for labelling on another machine; returns the count.

    Why: labelling is ~600 generated tokens per prompt, hours on a 2-core CPU but minutes on a GPU,
    and a GPU machine may lack this package's pins (kvpress, transformers) and the tokenizer files.
    So the prompts travel already tokenized by *this* engine (the same ids the CPU labeller would
    feed), with the label-file header the results must carry to be merged back
    (``timebill rlp merge``), and ``scripts/label_on_accelerator.py`` needs only torch + transformers.
    The file is JSON Lines: a header line, then ``{"index", "group", "ids"}`` per prompt, in
    labelling order (``group`` = position of its labelling group: earlier groups matter more).
    """
    if isinstance(cap_tokens, bool) or not isinstance(cap_tokens, int) or cap_tokens < 1:
        raise PredictorError(f"cap_tokens must be an integer >= 1, got {cap_tokens!r}")
    lines = [
        json.dumps(
            {
                "format": EXPORT_FORMAT,
                "label_header": label_header(engine, cap_tokens),
                "pad_token_id": pad_id(engine),
                "stop_token_ids": sorted(int(t) for t in engine.stop_ids),
                "context_length": int(engine.context_length),
            }
        )
    ]
    seen = set(skip or ())
    for number, group in enumerate(groups):
        for conversation in group:
            if conversation.index in seen:
                continue
            seen.add(conversation.index)
            ids = engine.encode(conversation.prompt)
            if len(ids) + cap_tokens > engine.context_length:
                raise PredictorError(
                    f"Prompt {conversation.index} has {len(ids)} tokens; with {cap_tokens} new tokens it "
                    f"exceeds the model's context ({engine.context_length})."
                )
            lines.append(json.dumps({"index": conversation.index, "group": number, "ids": ids}, separators=(",", ":")))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(out, ("\n".join(lines) + "\n").encode())
    return len(lines) - 1


@dataclass(frozen=True)
class LabelAgreement:
    """How two label files agree on the prompts both labelled (e.g. CPU vs GPU labels)."""

    common: int
    same_length: int
    same_stop_reason: int
    mean_abs_diff: float

    def describe(self) -> str:
        if not self.common:
            return "no prompt labelled in both"
        return (
            f"{self.common} prompts in both: {self.same_length / self.common:.1%} same length, "
            f"{self.same_stop_reason / self.common:.1%} same stop reason, mean |Δlength| {self.mean_abs_diff:.1f}"
        )


def label_agreement(a: Sequence[LengthLabel], b: Sequence[LengthLabel]) -> LabelAgreement:
    """Agreement of two labellings; greedy decoding diverges at near-ties when arithmetic differs."""
    by_index = {r.index: r for r in a}
    pairs = [(by_index[r.index], r) for r in b if r.index in by_index]
    if not pairs:
        return LabelAgreement(0, 0, 0, 0.0)
    return LabelAgreement(
        common=len(pairs),
        same_length=sum(x.length == y.length for x, y in pairs),
        same_stop_reason=sum(x.stop_reason == y.stop_reason for x, y in pairs),
        mean_abs_diff=sum(abs(x.length - y.length) for x, y in pairs) / len(pairs),
    )
