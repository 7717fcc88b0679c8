"""benchmarks/prompt_compression.py without a model: task choice, run order, runs file, tables and targets.

The script is not a package module, so it is loaded from its path; importing it must stay light (no torch).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from timebill.bench.suite import Task
from timebill.errors import InvalidInputError

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "prompt_compression.py"
_spec = importlib.util.spec_from_file_location("bench_prompt_compression", _PATH)
assert _spec is not None and _spec.loader is not None
pc = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = pc  # dataclasses look their module up by name
_spec.loader.exec_module(pc)


def _task(kind: str, i: int, tokens: int) -> Task:
    return Task(
        id=f"{kind}-{i}",
        kind=kind,
        metric="qa_f1",
        prompt="p",
        references=("a",),
        max_new_tokens=32,
        prompt_tokens=tokens,
    )


def _run(task: str, kind: str, method: str, rho: float, *, score: float, prefill: float, tokens: int = 3000, **kw):
    """A hand-built record with the fields the report reads."""
    record = {
        "task_id": task,
        "kind": kind,
        "method": method,
        "rho": rho,
        "key": f"{method}@{rho:g}",
        "original_prompt_tokens": tokens,
        "rho_reached": rho,
        "short": False,
        "compress_s": 0.0,
        "prefill_s": prefill,
        "evict_s": 0.0,
        "first_token_s": prefill,
        "score": score,
        "cpu_share": 0.99,
    }
    return record | kw


def test_tasks_are_spread_over_prompt_length_per_kind() -> None:
    tasks = [_task("retrieval", i, 500 + 100 * i) for i in range(60)] + [_task("code", i, 400 + i) for i in range(50)]
    chosen = pc.select_tasks(tasks, 6, ["retrieval"])
    lengths = [t.prompt_tokens for t in chosen]
    assert len(chosen) == 6 and all(t.kind == "retrieval" for t in chosen)
    assert lengths == sorted(lengths) and min(lengths) < 1500 and max(lengths) > 5000  # short and long alike
    assert pc.select_tasks(tasks, 6, ["retrieval"]) == chosen  # deterministic
    assert len(pc.select_tasks(tasks, 100, ["code"])) == 50  # capped at what the kind has
    with pytest.raises(InvalidInputError, match="no 'chat' tasks"):
        pc.select_tasks(tasks, 1, ["chat"])


def test_configs_and_a_reproducible_shuffled_order_per_task() -> None:
    configs = pc.make_configs(["truncate", "bm25"], [0.5, 0.9])
    assert [c.key for c in configs] == [
        "uncompressed@0",
        "truncate@0.5",
        "truncate@0.9",
        "bm25@0.5",
        "bm25@0.9",
        "snapkv@0.5",
        "snapkv@0.9",
    ]
    order = pc.run_order("chat-1", configs, seed=0)
    assert order == pc.run_order("chat-1", configs, seed=0) and sorted(order, key=configs.index) == configs
    orders = {tuple(c.key for c in pc.run_order(f"t{i}", configs, 0)) for i in range(20)}
    assert len(orders) > 1  # each task gets its own order
    assert len(pc.make_configs(["bm25"], [0.5], snapkv=False)) == 2


def test_flag_parsing_refuses_bad_values() -> None:
    assert pc.parse_rhos("0, 0.5,0.25,0.5") == [0.25, 0.5]  # 0 dropped (the baseline always runs)
    assert pc.parse_compressors("bm25,truncate") == ["truncate", "bm25"]
    with pytest.raises(InvalidInputError):
        pc.parse_rhos("1.0")
    with pytest.raises(InvalidInputError, match="unknown"):
        pc.parse_compressors("bm25,zip")
    chat, retrieval = Task("c", "chat", "rouge_l", "p", ("a",), 512), _task("retrieval", 0, 900)
    assert pc.max_new_tokens(chat, 128) == 128 and pc.max_new_tokens(retrieval, 16) == 32  # only chat is capped


def test_runs_file_drops_a_torn_last_line_and_refuses_damage_elsewhere(tmp_path: Path) -> None:
    path = tmp_path / "runs.jsonl"
    pc.append_run(path, {"task_id": "a", "key": "k"})
    pc.append_run(path, {"task_id": "b", "key": "k"})
    with path.open("a") as f:
        f.write('{"task_id": "c", "ke')  # a crash mid-write
    assert [r["task_id"] for r in pc.read_runs(path)] == ["a", "b"]
    pc.append_run(path, {"task_id": "c", "key": "k"})  # appends cleanly after the cut
    assert [r["task_id"] for r in pc.read_runs(path)] == ["a", "b", "c"]
    path.write_text('{"task_id": "a"}\nnot json\n{"task_id": "b"}\n')
    with pytest.raises(InvalidInputError, match=":2: not JSON"):
        pc.read_runs(path)


def test_resume_is_refused_on_another_host_or_other_settings(tmp_path: Path) -> None:
    meta = {"host": "cpu A", "threads": 2, "chat_max_tokens": 128, "suite_sha256": "x", "seed": 0}
    pc.check_meta(meta, dict(meta), tmp_path)
    with pytest.raises(InvalidInputError, match="never mix hosts"):
        pc.check_meta(meta, meta | {"host": "cpu B"}, tmp_path)
    with pytest.raises(InvalidInputError, match="threads"):
        pc.check_meta(meta, meta | {"threads": 4}, tmp_path)


def _records() -> list[dict]:
    """Two retrieval tasks (one long, one short) and one code task: baseline, truncate, bm25, SnapKV at 0.5."""
    out = []
    for task, kind, tokens in (("r1", "retrieval", 3000), ("r2", "retrieval", 1000), ("c1", "code", 4000)):
        out += [
            _run(task, kind, "uncompressed", 0.0, score=1.0, prefill=2.0, tokens=tokens),
            _run(task, kind, "truncate", 0.5, score=0.0 if kind == "retrieval" else 0.5, prefill=0.9, tokens=tokens),
            _run(task, kind, "bm25", 0.5, score=1.0, prefill=0.9, compress_s=0.1, tokens=tokens),
            _run(task, kind, "snapkv", 0.5, score=0.5, prefill=2.1, evict_s=0.02, tokens=tokens),
        ]
    return out


def test_scores_are_paired_with_the_same_tasks_baseline() -> None:
    records = _records() + [_run("r3", "retrieval", "bm25", 0.5, score=0.0, prefill=1.0)]  # no baseline: left out
    rows = pc.score_rows(records)
    bm25 = next(r for r in rows if r["kind"] == "retrieval" and r["method"] == "bm25")
    assert bm25["n"] == 2 and bm25["mean_score"] == 1.0 and bm25["ratio"] == 1.0
    truncate = next(r for r in rows if r["kind"] == "code" and r["method"] == "truncate")
    assert truncate["ratio"] == 0.5
    assert [r["kind"] for r in rows if r["method"] == "uncompressed"] == ["retrieval", "code"]


def test_time_ratios_are_paired_and_split_by_prompt_length() -> None:
    rows = pc.time_rows(_records())
    bm25_all = next(r for r in rows if r["method"] == "bm25" and r["subset"] == "all")
    bm25_long = next(r for r in rows if r["method"] == "bm25" and r["subset"] == "long")
    assert bm25_all["n"] == 3 and bm25_long["n"] == 2  # r2 has 1000 prompt tokens
    assert bm25_all["median_ratio"] == pytest.approx(0.5) and bm25_all["mean_compress_s"] == pytest.approx(0.1)
    snapkv = next(r for r in rows if r["method"] == "snapkv" and r["subset"] == "all")
    assert snapkv["median_ratio"] == pytest.approx(2.12 / 2.0)  # eviction counts, and no prefill is saved
    assert pc.quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.9) == pytest.approx(4.6) and math.isnan(pc.quantile([], 0.9))


def test_a_contended_run_is_left_out_of_the_time_ratios_only() -> None:
    records = _records()
    records[2] = records[2] | {"cpu_share": 0.4, "prefill_s": 9.0}  # r1's bm25 run shared its cores
    row = next(r for r in pc.time_rows(records) if r["method"] == "bm25" and r["subset"] == "all")
    assert row["n"] == 2 and row["contended"] == 1 and row["median_ratio"] == pytest.approx(0.5)
    assert pc.contended_runs(records) == ["r1 bm25@0.5"]
    assert next(r for r in pc.score_rows(records) if r["method"] == "bm25")["n"] == 2  # scores keep it


def test_targets_pass_miss_and_the_best_compressor() -> None:
    results = pc.build_results(_records(), {"host": "h", "threads": 2, "chat_max_tokens": 128})
    t = results["targets"]
    time_check = {c["compressor"]: c for c in t["time"]}
    assert time_check["bm25"]["median_ratio"] == pytest.approx(0.5) and time_check["bm25"]["pass"] is True
    assert time_check["truncate"]["pass"] is True
    retrieval = {c["compressor"]: c for c in t["retrieval"]}
    assert retrieval["bm25"]["pass"] is True and retrieval["bm25"]["above_truncate"] is True
    assert retrieval["truncate"]["pass"] is False  # 0 < 0.9 × 1.0
    assert t["best"] == "bm25" and "snapkv" not in t["mean_over_kinds"]

    slow = [r | {"compress_s": 1.0} if r["method"] == "bm25" else r for r in _records()]
    t = pc.build_results(slow, {})["targets"]
    assert {c["compressor"]: c["pass"] for c in t["time"]}["bm25"] is False
    assert t["best"] == "truncate"  # the only one meeting the time target


def test_report_renders_and_json_is_standard(tmp_path: Path) -> None:
    records = [r for r in _records() if r["task_id"] == "r2"]  # no long prompt: the time target is not measured
    (tmp_path / "meta.json").write_text(json.dumps({"host": "h", "threads": 2, "chat_max_tokens": 128}))
    for r in records:
        pc.append_run(tmp_path / "runs.jsonl", r)
    results = pc.write_report(tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "N_max: chat tasks capped at 128" in md and "Time target not measured" in md
    assert "| retrieval | bm25 | 0.5 | 1 | 1.000 | 1.000 |" in md
    data = json.loads((tmp_path / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert data["targets"]["best"] is None and results["n_runs"] == 4
    with pytest.raises(InvalidInputError, match="no meta.json"):
        pc.write_report(tmp_path / "missing")
