"""Task files: the format, --fraction subsets, the committed suite, and deterministic generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from timebill.bench.generate import SuiteConfig, completion_lines, generate_suite, stdlib_python_files
from timebill.bench.suite import Task, default_suite_path, read_suite, select_fraction, suite_header, write_suite
from timebill.errors import InvalidInputError


def _write(path: Path, lines: list[object]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _task(i: int, kind: str = "qa", **extra: object) -> dict:
    return {"id": f"{kind}-{i}", "kind": kind, "metric": "qa_f1", "prompt": f"question {i}?", "references": ["a"]} | {
        "max_new_tokens": 8,
        **extra,
    }


def test_a_headerless_file_of_tasks_is_a_suite(tmp_path: Path) -> None:
    suite = read_suite(_write(tmp_path / "s.jsonl", [_task(1), _task(2, references="b")]))
    assert [t.id for t in suite.tasks] == ["qa-1", "qa-2"]
    assert suite.tasks[1].references == ("b",) and suite.tasks[1].chat  # chat template unless "chat": false
    assert suite.header == {} and len(suite.sha256) == 64 and suite.name == "s"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"id": "x", "metric": "qa_f1", "prompt": "p", "references": ["a"]}, "missing max_new_tokens"),
        (_task(1, metric="bleu"), "metric must be one of"),
        (_task(1, references=[]), "references"),
        (_task(1, max_new_tokens=0), "max_new_tokens"),
        (_task(1, prompt="  "), "prompt"),
        (_task(1, id="a|b"), "id must be"),
        (_task(1, chat="no"), "chat must be"),
    ],
)
def test_bad_tasks_are_named_by_file_and_line(tmp_path: Path, bad: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message) as info:
        read_suite(_write(tmp_path / "s.jsonl", [_task(0), bad]))
    assert "s.jsonl:2" in str(info.value)


def test_duplicate_ids_late_headers_and_other_formats_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="appears twice"):
        read_suite(_write(tmp_path / "a.jsonl", [_task(1), _task(1)]))
    header = suite_header("x", 1, {}, {})
    with pytest.raises(InvalidInputError, match="only come first"):
        read_suite(_write(tmp_path / "b.jsonl", [_task(1), header]))
    with pytest.raises(InvalidInputError, match="reads"):
        read_suite(_write(tmp_path / "c.jsonl", [header | {"format_version": 99}, _task(1)]))
    with pytest.raises(InvalidInputError, match="Cannot read"):
        read_suite(tmp_path / "missing.jsonl")


def test_fraction_keeps_every_kind_spreads_lengths_and_keeps_file_order() -> None:
    tasks = [
        Task(f"{kind}-{i}", kind, "qa_f1", "p", ("a",), 8, prompt_tokens=100 * i)
        for kind, n in (("retrieval", 60), ("code", 50), ("chat", 50))
        for i in range(n)
    ]
    small = select_fraction(tasks, 0.02)
    assert len(small) == 3 and {t.kind for t in small} == {"retrieval", "code", "chat"}
    assert small == sorted(small, key=tasks.index)
    tenth = select_fraction(tasks, 0.1)
    assert len(tenth) == 16 and select_fraction(tasks, 0.1) == tenth
    lengths = sorted(t.prompt_tokens or 0 for t in tenth if t.kind == "retrieval")
    assert lengths[0] < 1500 and lengths[-1] > 4500  # short and long prompts both present
    assert select_fraction(tasks, 1.0) == tasks
    with pytest.raises(InvalidInputError):
        select_fraction(tasks, 0.0)


def test_the_committed_suite_has_the_issue_composition() -> None:
    suite = read_suite(default_suite_path())
    counts = suite.counts()
    assert sum(counts.values()) >= 150 and set(counts) == {"retrieval", "code", "chat"}
    assert suite.header["seed"] is not None and suite.header["counts"] == counts
    n_max = {"retrieval": {32}, "code": {64}, "chat": {128, 256, 512}}
    for task in suite.tasks:
        assert task.max_new_tokens in n_max[task.kind]
        assert task.prompt_tokens is not None and 500 <= task.prompt_tokens <= 8192 - task.max_new_tokens
    for kind in counts:
        lengths = [t.prompt_tokens or 0 for t in suite.tasks if t.kind == kind]
        assert min(lengths) < 1024 and max(lengths) > 4096  # spread over the range, not clustered


def test_code_completion_lines_skip_strings_comments_and_short_lines() -> None:
    text = (
        "def function(x):\n"
        '    """Docstring line that is long enough\n    and a second docstring line, long too."""\n'
        "    # a comment line here\n"
        "    x = x + 1\n"
        "    return helper(x) + 1\n"
        '    value = "a # b" + x\n'
    )
    # Kept: the def and the return. Dropped: docstring lines, the comment, a short line, a line with "#".
    assert completion_lines(text) == [0, 5]


def test_generation_is_deterministic_for_a_seed(engine, tmp_path: Path) -> None:
    config = SuiteConfig(seed=11, retrieval=3, code=3, chat=3)
    header, tasks = generate_suite(config, engine.tokenizer, "m")
    again = generate_suite(config, engine.tokenizer, "m")
    assert write_suite(tmp_path / "a.jsonl", header, tasks).read_bytes() == (
        write_suite(tmp_path / "b.jsonl", *again).read_bytes()
    )
    other = generate_suite(SuiteConfig(seed=12, retrieval=3, code=3, chat=3), engine.tokenizer, "m")[1]
    assert [t.prompt for t in other] != [t.prompt for t in tasks]
    suite = read_suite(tmp_path / "a.jsonl")
    assert suite.counts() == {"retrieval": 3, "code": 3, "chat": 3}
    root, _ = stdlib_python_files()
    for task in suite.tasks:
        assert task.prompt_tokens == len(engine.encode(task.prompt, chat=task.chat))  # as the engine counts
        if task.kind == "retrieval":
            assert f"is {task.references[0]}." in task.prompt  # the needle is in the haystack
        if task.kind == "code":  # the reference is the line right after the context, in the real file
            lines = (root / task.source["file"]).read_text().splitlines(keepends=True)
            assert lines[task.source["line"] - 1].strip() == task.references[0]
            assert task.prompt == "".join(lines[: task.source["line"] - 1]) and not task.chat  # the file's head
