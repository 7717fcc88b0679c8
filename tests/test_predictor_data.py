"""Predictor data: recovering the truncated ShareGPT file, splits, and crash-safe resumable labelling."""

from __future__ import annotations

import json

import pytest

from timebill.errors import PredictorError
from timebill.predictor.batch_decode import compare_with_engine, generate_lengths
from timebill.predictor.data import (
    Conversation,
    load_sharegpt,
    parse_truncated_array,
    recovery_stats,
    split_conversations,
)
from timebill.predictor.labelling import label_lengths
from timebill.predictor.labels import LengthLabel, read_label_file


def _chat(human: str, reply: str, first_role: str = "human") -> dict:
    return {
        "id": "x",
        "conversations": [{"from": first_role, "value": human}, {"from": "gpt", "value": reply}],
    }


def _word_count(prompts):
    return [len(p.split()) for p in prompts]


# ------------------------------------------------------------------------------------------ parsing
def test_parser_keeps_every_complete_element_and_stops_at_the_cut():
    elements = [_chat(f"question {i}?", f"answer {i}") for i in range(5)]
    items = [json.dumps(e, indent=2) for e in elements]
    text = "[\n" + ",\n".join(items) + "\n]\n"
    assert parse_truncated_array(text) == (elements, False)
    cut = text.index("answer 4") + 3  # inside the last element's last string
    assert parse_truncated_array(text[:cut]) == (elements[:4], True)
    # Cut right after a complete element, before the comma that would follow it.
    after_third = len("[\n" + ",\n".join(items[:3]))
    assert parse_truncated_array(text[:after_third]) == (elements[:3], True)
    assert parse_truncated_array(text[: after_third + 2]) == (elements[:3], True)


def test_parser_rejects_a_file_that_is_not_an_array():
    with pytest.raises(PredictorError, match="JSON array"):
        parse_truncated_array('{"id": 1}')


def test_load_filters_and_counts_from_a_truncated_file(tmp_path):
    elements = [
        _chat("What is RoPE?", "Rotary embeddings."),  # 0 kept
        _chat("  what is   rope? ", "dup"),  # 1 duplicate after normalising
        _chat("   ", "empty prompt"),  # 2 empty
        _chat("Hello", "Hi", first_role="gpt"),  # 3 opens with the assistant: not a pair
        _chat("word " * 3000, "long"),  # 4 too long
        _chat("Name a prime.", "Seven."),  # 5 kept
        _chat("torn", "this one is cut"),  # 6 torn by the truncation
    ]
    text = json.dumps(elements)
    path = tmp_path / "sharegpt.json"
    path.write_text(text[: text.index("this one is cut")], encoding="utf-8")

    conversations = load_sharegpt(max_prompt_tokens=100, path=path, count_tokens=_word_count)
    assert conversations == [
        Conversation(0, "What is RoPE?", "Rotary embeddings."),
        Conversation(5, "Name a prime.", "Seven."),
    ]
    stats = recovery_stats(max_prompt_tokens=100, path=path, count_tokens=_word_count)
    assert (stats.conversations_recovered, stats.truncated, stats.usable_pairs) == (6, True, 2)
    assert (stats.duplicate, stats.empty, stats.not_a_pair, stats.too_long) == (1, 1, 1, 1)


def test_split_is_deterministic_disjoint_and_independent_of_input_order():
    conversations = [Conversation(i, f"p{i}", f"r{i}") for i in range(50)]
    sizes = {"test": 5, "calibration": 5, "train": 20}
    a = split_conversations(conversations, sizes, seed=1)
    b = split_conversations(list(reversed(conversations)), sizes, seed=1)
    assert a == b
    assert [len(a[k]) for k in ("test", "calibration", "train", "pool")] == [5, 5, 20, 20]
    ids = [c.index for split in a.values() for c in split]
    assert sorted(ids) == list(range(50))
    assert split_conversations(conversations, sizes, seed=2)["test"] != a["test"]
    with pytest.raises(PredictorError, match="only 50"):
        split_conversations(conversations, {"train": 51})


# -------------------------------------------------------------------------------------- labelling
PROMPTS = [
    "Hi!",
    "What is 2+2?",
    "Name a colour.",
    "Say yes.",
    "Count to three.",
    "What is the capital of France?",
]
CONVERSATIONS = [Conversation(100 + i, p, "") for i, p in enumerate(PROMPTS)]
CAP = 8


class _Crash(RuntimeError):
    pass


def _crash_after_first_batch(new):
    raise _Crash


def _indices(path):
    header, records = read_label_file(path)
    return header, sorted(r.index for r in records), records


@pytest.mark.slow
def test_resume_after_a_crash_loses_and_duplicates_nothing(engine, tmp_path):
    out = tmp_path / "labels.jsonl"
    with pytest.raises(_Crash):
        label_lengths(
            engine, [CONVERSATIONS], out, CAP, batch_size=2, on_batch=_crash_after_first_batch, progress=False
        )
    _, first, first_records = _indices(out)
    assert 1 <= len(first) < len(CONVERSATIONS)

    seen = []
    records = label_lengths(engine, [CONVERSATIONS], out, CAP, batch_size=2, on_batch=seen.extend, progress=False)
    assert len(seen) == len(CONVERSATIONS) - len(first)  # only the missing ones ran
    assert not {r.index for r in seen} & set(first)
    header, indices, on_disk = _indices(out)
    assert indices == [c.index for c in CONVERSATIONS]
    assert sorted(records, key=lambda r: r.index) == sorted(on_disk, key=lambda r: r.index)
    assert on_disk[: len(first)] == first_records  # appended, never rewritten
    assert header["cap_tokens"] == CAP and header["decoding"]["greedy"] is True
    assert all(1 <= r.length <= CAP and r.stop_reason in ("eos", "max_tokens") for r in on_disk)
    assert all(r.length == CAP for r in on_disk if r.stop_reason == "max_tokens")

    # A torn last line (killed mid-write) is cut away and that prompt is labelled again, once.
    raw = out.read_bytes()
    out.write_bytes(raw[: len(raw) - 10])
    torn_index = on_disk[-1].index
    label_lengths(engine, [CONVERSATIONS], out, CAP, batch_size=2, progress=False)
    _, indices, repaired = _indices(out)
    assert indices == [c.index for c in CONVERSATIONS]
    assert repaired[-1].index == torn_index and repaired[:-1] == on_disk[:-1]
    assert out.read_bytes().endswith(b"\n")

    # Nothing left to do: the file is unchanged.
    before = out.read_bytes()
    label_lengths(engine, [CONVERSATIONS], out, CAP, batch_size=2, progress=False)
    assert out.read_bytes() == before


@pytest.mark.slow
def test_header_mismatch_is_a_clear_error(engine, tmp_path):
    out = tmp_path / "labels.jsonl"
    label_lengths(engine, [CONVERSATIONS[:1]], out, CAP, batch_size=1, progress=False)
    with pytest.raises(PredictorError, match="cap_tokens: file has 8, this run has 9"):
        label_lengths(engine, [CONVERSATIONS], out, CAP + 1, batch_size=1, progress=False)


@pytest.mark.slow
def test_batched_lengths_match_the_engine_single_stream(engine):
    prompts = [*PROMPTS, "Reply with one word: ok."]
    rate, pairs = compare_with_engine(engine, prompts, cap_tokens=24, max_rows=3)
    assert rate == 1.0, pairs
    assert any(n < 24 for n, _ in pairs)  # some responses end by EOS, not only by the cap
    assert engine.model.config._attn_implementation == "sdpa"  # restored after labelling
    static = generate_lengths(engine, [engine.encode(p) for p in prompts[:3]], 24)
    assert [n for n, _ in static] == [n for _, n in pairs[:3]]


def test_a_corrupt_line_before_the_last_is_an_error_not_a_silent_drop(tmp_path):
    out = tmp_path / "labels.jsonl"
    good = LengthLabel(1, 5, "eos", 20).to_json()
    out.write_text(json.dumps({"format_version": 1}) + "\n" + "{not json\n" + good + "\n")
    with pytest.raises(PredictorError, match="line 2 is corrupt"):
        read_label_file(out)
    out.write_text(json.dumps({"format_version": 1}) + "\n" + good + "\n" + good + "\n")
    with pytest.raises(PredictorError, match="labelled twice"):
        read_label_file(out)


@pytest.mark.slow
def test_refilled_slots_widening_and_compaction_keep_every_row_exact(engine, monkeypatch):
    """More prompts than rows, a long joiner arriving after short ones (the cache must widen), rows
    refilled into dead slots, and the tail compacted: each length still equals single-stream decoding."""
    from timebill.predictor.batch_decode import ContinuousBatch, iter_continuous

    long_prompt = "Summarise: " + " ".join(f"Step {i}: the robot moves part {i} to bin {i % 7}." for i in range(40))
    prompts = [*PROMPTS[:4], long_prompt, "Reply with one word: ok.", "List two fruits."]
    items = [(i, engine.encode(p)) for i, p in enumerate(prompts)]
    assert len(items[4][1]) > 3 * max(len(ids) for _, ids in items[:4])  # forces the widening path
    copies: list[dict] = []
    reassign = ContinuousBatch._reassign

    def counting_reassign(self, columns=None, keep=None, start=0):
        copies.append({"widen": columns is not None, "compact": keep is not None, "trim": start > 0})
        return reassign(self, columns=columns, keep=keep, start=start)

    monkeypatch.setattr(ContinuousBatch, "_reassign", counting_reassign)
    batched: dict[int, tuple[int, str]] = {}
    for finished in iter_continuous(engine, items, cap_tokens=20, max_rows=4, steps_per_hold=4):
        batched.update({i: (n, stop) for i, n, stop in finished})
    single = [engine.generate(p, max_new_tokens=20) for p in prompts]
    assert [batched[i][0] for i in range(len(prompts))] == [r.tokens_generated for r in single]
    assert [batched[i][1] for i in range(len(prompts))] == [r.stop_reason for r in single]
    assert any(c["widen"] for c in copies) and any(c["compact"] for c in copies), copies
    assert len(copies) < len(prompts)  # refills reuse dead slots in place: not one full copy per response


def test_labelling_order_grows_every_split_together():
    from timebill.predictor.data import labelling_groups

    splits = {
        "test": [Conversation(i, f"t{i}", "") for i in range(10)],
        "calibration": [Conversation(100 + i, f"c{i}", "") for i in range(10)],
        "train": [Conversation(200 + i, f"r{i}", "") for i in range(80)],
        "pool": [Conversation(900 + i, f"p{i}", "") for i in range(5)],
    }
    first = [c.index for g in labelling_groups(splits, 20) for c in g]
    assert first == [0, 100, *range(200, 208), 1, 101, *range(208, 216)]  # a stopped run has some of each
    everything = [c.index for g in labelling_groups(splits, 10_000) for c in g]
    assert sorted(everything) == sorted(c.index for s in splits.values() for c in s)  # all, once
    assert everything[-5:] == list(range(900, 905))  # the pool comes last


def test_merging_shard_files_adds_only_missing_labels_and_refuses_other_settings(tmp_path):
    from timebill.predictor.labels import merge_label_files

    header = {"format_version": 1, "model_id": "m", "model_fingerprint": "f", "cap_tokens": 8}
    main, shard, other = tmp_path / "main.jsonl", tmp_path / "shard.jsonl", tmp_path / "other.jsonl"
    main.write_text(json.dumps(header) + "\n" + LengthLabel(1, 5, "eos", 20).to_json() + "\n")
    shard.write_text(
        json.dumps({**header, "created": "later"})
        + "\n"
        + "".join(LengthLabel(i, 8, "max_tokens", 9).to_json() + "\n" for i in (1, 2, 3))
    )
    assert merge_label_files(main, [shard]) == (2, 1)
    assert [r.index for r in read_label_file(main)[1]] == [1, 2, 3]
    assert read_label_file(main)[1][0].length == 5  # the file merged into wins on a duplicate
    assert merge_label_files(main, [shard]) == (0, 3)  # idempotent
    other.write_text(json.dumps({**header, "cap_tokens": 16}) + "\n")
    with pytest.raises(PredictorError, match="cap_tokens"):
        merge_label_files(main, [other])


@pytest.mark.slow
def test_prompts_labelled_elsewhere_match_the_cpu_labeller_and_merge_back(engine, tmp_path):
    """The export → scripts/label_on_accelerator.py → merge path gives the CPU labeller's labels.

    Runs the script for real (``--device cpu``: CI has no GPU; the GPU difference is the device string).
    """
    import subprocess
    import sys
    from pathlib import Path

    from timebill.predictor.labels import export_prompts, label_agreement, merge_label_files

    prompts, cpu, remote = tmp_path / "prompts.jsonl", tmp_path / "cpu.jsonl", tmp_path / "remote.jsonl"
    conversations = CONVERSATIONS[:3]
    assert export_prompts(engine, [conversations[:2], conversations[1:]], prompts, CAP) == 3  # duplicates once
    lines = [json.loads(line) for line in prompts.read_text().splitlines()]
    assert lines[0]["label_header"]["cap_tokens"] == CAP
    assert [line["ids"] for line in lines[1:]] == [engine.encode(c.prompt) for c in conversations]

    script = Path(__file__).resolve().parent.parent / "scripts" / "label_on_accelerator.py"
    gguf = Path(engine.source.location) / engine.source.gguf_file
    command = [sys.executable, str(script), "--prompts", str(prompts), "--gguf", str(gguf), "--out", str(remote)]
    done = subprocess.run(
        [*command, "--device", "cpu", "--workers", "1", "--max-rows", "2"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    header, remote_labels = read_label_file(remote)
    assert header["labelled_on"].startswith("cpu;") and {r.device for r in remote_labels} == {"cpu"}

    cpu_labels = label_lengths(engine, [conversations[:1]], cpu, CAP, batch_size=2, progress=False)
    agreement = label_agreement(cpu_labels, remote_labels)
    assert agreement.common == 1 and agreement.same_length == 1, agreement
    assert merge_label_files(cpu, [remote]) == (2, 1)
    merged = read_label_file(cpu)[1]
    assert sorted(r.index for r in merged) == sorted(c.index for c in conversations)
    assert [r.device for r in merged] == [None, "cpu", "cpu"]  # provenance survives the merge


def test_label_records_round_trip_the_optional_device_field():
    plain, remote = LengthLabel(1, 5, "eos", 20), LengthLabel(2, 8, "max_tokens", 9, device="cuda")
    assert "device" not in plain.to_json()
    from timebill.predictor.labels import _parse_record

    assert _parse_record(plain.to_json()) == plain and _parse_record(remote.to_json()) == remote
    with pytest.raises(ValueError):
        _parse_record('{"index":1,"length":5,"stop_reason":"eos","prompt_tokens":2,"device":3}')


def test_per_row_decode_attention_skips_padding_and_equals_the_masked_call():
    """Rows attending to different suffixes go through one unpadded call each; the result equals the
    masked batched SDPA (to float rounding), and a mask that is not a suffix falls back to it."""
    import torch

    from timebill.predictor.batch_decode import _grouped_sdpa, _suffix_starts

    torch.manual_seed(0)
    batch, kv_heads, groups, dim, width = 4, 3, 3, 16, 40
    module = torch.nn.Module()
    module.num_key_value_groups = groups
    query = torch.randn(batch, kv_heads * groups, 1, dim)
    key, value = torch.randn(batch, kv_heads, width, dim), torch.randn(batch, kv_heads, width, dim)
    starts = [0, 5, 39, 17]
    mask = (torch.arange(width)[None, :] >= torch.tensor(starts)[:, None])[:, None, None, :]
    assert _suffix_starts(mask, width) == starts
    out, _ = _grouped_sdpa(module, query, key, value, mask, scaling=dim**-0.5)
    full_key = key.repeat_interleave(groups, dim=1)
    full_value = value.repeat_interleave(groups, dim=1)
    reference = torch.nn.functional.scaled_dot_product_attention(
        query, full_key, full_value, attn_mask=mask, scale=dim**-0.5
    ).transpose(1, 2)
    assert torch.allclose(out, reference, atol=1e-6)
    holey = mask.clone()
    holey[1, 0, 0, 20] = False  # a hole inside row 1's span: not a suffix
    assert _suffix_starts(holey, width) is None
    out, _ = _grouped_sdpa(module, query, key, value, holey, scaling=dim**-0.5)
    reference = torch.nn.functional.scaled_dot_product_attention(
        query, full_key, full_value, attn_mask=holey, scale=dim**-0.5
    ).transpose(1, 2)
    assert torch.allclose(out, reference, atol=1e-6)
