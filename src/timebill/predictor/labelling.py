"""Length labels: how many tokens the target model itself answers each training prompt with (§2 of the method).

:func:`label_lengths` is the labelling job: prompts in batches through :mod:`~timebill.predictor.batch_decode`,
records appended to a label file (:mod:`~timebill.predictor.labels`) as responses end, resumable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path

from timebill.cpulock import cpu_lock as cpu_lock_of
from timebill.engine import Engine
from timebill.errors import PredictorError
from timebill.predictor.batch_decode import iter_continuous
from timebill.predictor.data import Conversation
from timebill.predictor.labels import (
    DEFAULT_CAP_TOKENS,
    LengthLabel,
    append_labels,
    check_header,
    label_header,
    read_label_file,
)
from timebill.progress import progress_bar

DEFAULT_BATCH_SIZE = 16


def label_lengths(
    engine: Engine,
    groups: Sequence[Sequence[Conversation]],
    out: str | os.PathLike[str],
    cap_tokens: int = DEFAULT_CAP_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    cpu_lock: str | os.PathLike[str] | None = None,
    on_batch: Callable[[list[LengthLabel]], None] | None = None,
    progress: bool = True,
    skip: set[int] | None = None,
) -> list[LengthLabel]:
    """Label every conversation of ``groups`` into ``out`` (resuming it); returns all its records.

    Groups are labelled in order (e.g. test, calibration, train: a run stopped early still has whole
    evaluation splits); within a group prompts are sorted by length so that batches pad little.
    ``on_batch`` runs after each appended group of records is on disk (a test uses it to simulate a
    crash). ``batch_size`` is the number of rows decoding together; ``cpu_lock`` is held per chunk of
    decode steps only (a few seconds), so others on a shared machine can take turns.

    The records of responses that ended are appended and fsync'd after every chunk of decode steps, so
    a killed run loses only the responses in flight; a resumed run checks the header, repairs a torn
    last line, skips the indices already labelled and never writes one twice.
    """
    if isinstance(cap_tokens, bool) or not isinstance(cap_tokens, int) or cap_tokens < 1:
        raise PredictorError(f"cap_tokens must be an integer >= 1, got {cap_tokens!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PredictorError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    expected = label_header(engine, cap_tokens)
    header, records = read_label_file(out, repair=True)
    if header is not None:
        check_header(header, expected, out)
    done = {r.index for r in records} | (skip or set())  # skip: labelled in another file (shards)

    prompts: list[tuple[Conversation, list[int]]] = []
    queued: set[int] = set()
    for group in groups:
        pending = []
        for conversation in group:
            if conversation.index in done or conversation.index in queued:
                continue
            queued.add(conversation.index)
            pending.append((conversation, engine.encode(conversation.prompt)))
        pending.sort(key=lambda item: len(item[1]))
        prompts += pending

    with (
        out.open("ab") as f,
        cpu_lock_of(cpu_lock) as hold,
        progress_bar(len(prompts), "prompt", "labelling", progress) as bar,
    ):
        if header is None:
            f.write((json.dumps(expected) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        # closing(): a callback that raises must not leave the model in grouped-attention mode.
        tagged = [((conversation, len(ids)), ids) for conversation, ids in prompts]
        with closing(iter_continuous(engine, tagged, cap_tokens, batch_size, hold)) as runs:
            for finished in runs:
                new = [
                    LengthLabel(conversation.index, length, stop, prompt_tokens)
                    for (conversation, prompt_tokens), length, stop in finished
                ]
                append_labels(f, new)
                records += new
                bar.update(len(new))
                if on_batch is not None:
                    on_batch(new)
    return records
