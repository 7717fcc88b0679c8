"""The quality model: fitted from hand-built run records, saved/loaded, read by the planner; the calibration suite."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from timebill.bench.generate import ExcludedSources
from timebill.bench.suite import Task, read_suite, write_suite
from timebill.cli import app
from timebill.errors import InvalidInputError, TimeBillError
from timebill.quality import (
    DEFAULT_QUALITY_FILE,
    KindQuality,
    QualityError,
    QualityModel,
    _ratio_of_means,
    consensus_factor,
    fit_quality,
    fit_quality_many,
    load_quality,
    save_quality,
    shrink_toward_pooled,
)
from timebill.selection import LengthDistribution

ROOT = Path(__file__).resolve().parents[1]
EVAL_SUITE = ROOT / "benchmarks" / "suites" / "longbench-style-v1.jsonl"
CALIBRATION_SUITES = [ROOT / "benchmarks" / "suites" / f"calibration-v{i}.jsonl" for i in (1, 2, 3)]

WORDS = {1: "amber", 2: "anchor", 3: "brave", 4: "badger", 5: "foo", 6: "the", 7: "cat", 8: "sat"}


def decode(ids: list[int]) -> str:
    return " ".join(WORDS[i] for i in ids)


def _suite(tmp_path: Path):
    tasks = [
        Task("r1", "retrieval", "qa_f1", "Q1?", ("amber anchor",), 32),
        Task("r2", "retrieval", "qa_f1", "Q2?", ("brave badger",), 32),
        Task("c1", "chat", "rouge_l", "Chat?", ("the cat sat on the mat",), 64),
    ]
    header = {"format": "timebill-bench-suite", "format_version": 1, "name": "tiny-calibration"}
    return read_suite(write_suite(tmp_path / "tiny.jsonl", header, tasks))


def _write_runs(tmp_path: Path, runs: dict[str, dict[str, list[int]]]) -> Path:
    folder = tmp_path / "cal-runs" / "runs"
    folder.mkdir(parents=True)
    for method, answers in runs.items():
        lines = [
            json.dumps({"key": f"{method}|{task}", "task_id": task, "text": decode(ids), "token_ids": ids})
            for task, ids in answers.items()
        ]
        (folder / f"{method}.jsonl").write_text("\n".join(lines) + "\n")
    return folder.parent


@pytest.fixture
def fitted(tmp_path: Path) -> QualityModel:
    runs = _write_runs(
        tmp_path,
        {
            "vanilla": {"r1": [1, 2], "r2": [3, 5], "c1": [6, 7, 8]},  # F1 1, 0.5; ROUGE-L 2/3
            "int8": {"r1": [1, 2], "r2": [5]},  # F1 1, 0
            "snapkv-0.5": {"r1": [1]},  # F1 2/3
            "compress-0.5": {"c1": [7]},  # ROUGE-L 2/7
        },
    )
    return fit_quality(runs, _suite(tmp_path), decode, "tiny-model", "fp123", command="test")


def test_fit_relative_factors_are_ratios_of_mean_scores_over_shared_tasks(fitted: QualityModel) -> None:
    retrieval, chat, pooled = fitted.kinds["retrieval"], fitted.kinds["chat"], fitted.kinds["all"]
    assert retrieval.n == 2 and retrieval.base == pytest.approx(0.75)
    assert retrieval.relative == pytest.approx({"weights:int8": 0.5 / 0.75, "alpha:0.5": 2 / 3})
    assert chat.base == pytest.approx(2 / 3)
    assert chat.relative == pytest.approx({"rho:0.5": (2 / 7) / (2 / 3)})
    assert pooled.n == 3 and pooled.base == pytest.approx((1 + 0.5 + 2 / 3) / 3)
    assert pooled.relative["weights:int8"] == pytest.approx(2 / 3)  # over r1, r2 only: c1 has no int8 run
    assert retrieval.lengths == [2, 2] and chat.lengths == [3] and sorted(pooled.lengths) == [2, 2, 3]
    assert fitted.model_fingerprint == "fp123" and fitted.suites[0]["name"] == "tiny-calibration"
    assert fitted.suites[0]["tasks"] == 3


def test_fit_flags_answers_cut_at_their_limit_and_the_prior_treats_them_as_censored(tmp_path: Path) -> None:
    runs = _write_runs(tmp_path, {"vanilla": {"r1": [1, 2], "r2": [3, 5], "c1": [6, 7, 8]}})
    records = (runs / "runs" / "vanilla.jsonl").read_text().splitlines()
    reasons = {"r1": "eos", "r2": "max_tokens"}  # c1 has no stop reason: cut if it reached max_new_tokens (3)
    rows = [json.loads(line) for line in records]
    for row in rows:
        if row["task_id"] in reasons:
            row["stop_reason"] = reasons[row["task_id"]]
        else:
            row["max_new_tokens"] = 3
    (runs / "runs" / "vanilla.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    q = fit_quality(runs, _suite(tmp_path), decode, "tiny-model", "fp123", command="test")
    assert q.kinds["retrieval"].lengths_censored == [False, True] and q.kinds["chat"].lengths_censored == [True]
    assert q.length_prior("retrieval") == [(2, False), (2, True)]
    # r2 was cut at 2 tokens: a request allowed 8 finishes by 2 tokens only with r1's half, not with both
    assert q.length_distribution("retrieval", 8).cdf(2) == pytest.approx(0.5)
    assert q.length_distribution("chat", 8) == LengthDistribution.point(8)
    path = tmp_path / "q.json"
    path.write_text(json.dumps(q.to_dict()))
    assert load_quality(path).kinds["retrieval"].lengths_censored == [False, True]  # survives the file
    data = q.to_dict()
    del data["kinds"]["chat"]["lengths_censored"]
    path.write_text(json.dumps(data))
    with pytest.raises(QualityError, match="malformed"):
        load_quality(path)


def test_fit_partial_curve_scores_vanilla_cut_to_ceil_f_len_tokens(fitted: QualityModel) -> None:
    partial = dict(fitted.kinds["retrieval"].partial)
    # f <= 0.5 keeps ceil(f·2) = 1 token: "amber" → F1 2/3, "brave" → 2/3; over base 0.75
    assert partial[0.1] == pytest.approx((2 / 3) / 0.75)
    assert partial[0.5] == pytest.approx((2 / 3) / 0.75)
    assert partial[0.6] == pytest.approx(1.0) and partial[1.0] == pytest.approx(1.0)
    chat = dict(fitted.kinds["chat"].partial)
    # 0.3 × 3 tokens keeps 1 ("the": ROUGE-L 2/7), 0.4 keeps 2 ("the cat": 1/2)
    assert chat[0.3] == pytest.approx((2 / 7) / (2 / 3))
    assert chat[0.4] == pytest.approx(0.5 / (2 / 3))
    assert fitted.partial("retrieval", 0.05) == pytest.approx(0.5 * (2 / 3) / 0.75)  # (0, 0) → (0.1, g)


def test_fit_needs_vanilla(tmp_path: Path) -> None:
    runs = _write_runs(tmp_path, {"int8": {"r1": [1, 2]}})
    with pytest.raises(QualityError, match="no vanilla runs"):
        fit_quality(runs, _suite(tmp_path), decode, "m", "f")


def test_fit_pools_suites_whose_task_ids_collide(tmp_path: Path) -> None:
    """Two calibration suites both name a task "r1": each counts once, with its own answers (not a cache hit)."""
    first = tmp_path / "one"
    second = tmp_path / "two"
    first.mkdir()
    second.mkdir()
    runs_a = _write_runs(first, {"vanilla": {"r1": [1, 2], "r2": [3, 5], "c1": [6, 7, 8]}, "int8": {"r1": [1, 2]}})
    runs_b = _write_runs(second, {"vanilla": {"r1": [5], "r2": [3, 4]}, "int8": {"r1": [1, 2], "r2": [3, 4]}})
    tasks = [
        Task("r1", "retrieval", "qa_f1", "Q1?", ("amber anchor",), 32),
        Task("r2", "retrieval", "qa_f1", "Q2?", ("brave badger",), 32),
    ]
    header = {"format": "timebill-bench-suite", "format_version": 1, "name": "tiny-calibration-2"}
    other = read_suite(write_suite(second / "tiny2.jsonl", header, tasks))
    model = fit_quality_many([(runs_a, _suite(first)), (runs_b, other)], decode, "tiny-model", "fp123")
    retrieval = model.kinds["retrieval"]
    # vanilla F1: suite one r1 1, r2 0.5; suite two r1 0 ("foo"), r2 1
    assert retrieval.n == 4 and retrieval.base == pytest.approx(2.5 / 4)
    # int8 pairs: (1, 1) in suite one; (1, 0) and (1, 1) in suite two
    assert retrieval.relative_raw["weights:int8"] == pytest.approx(3 / 2)
    assert model.kinds["all"].n == 5
    assert [(x["name"], x["tasks"]) for x in model.suites] == [("tiny-calibration", 3), ("tiny-calibration-2", 2)]
    # consensus (the default): suite one alone says int8 is 1.0 (r1: 1 vs 1), suite two 2.0 (mean 1 vs 0.5), both
    # >= 1: the one nearest 1 is believed; pooled reads all three pairs together (3/2)
    assert model.extra["combine"] == "consensus" and model.prompt_buckets == ()
    assert retrieval.relative["weights:int8"] == pytest.approx(1.0)
    pooled = fit_quality_many([(runs_a, _suite(first)), (runs_b, other)], decode, "m", "f", combine="pooled")
    assert pooled.kinds["retrieval"].relative["weights:int8"] == pytest.approx(3 / 2)
    assert pooled.extra["combine"] == "pooled"
    with pytest.raises(InvalidInputError, match="combine"):
        fit_quality_many([(runs_a, _suite(first))], decode, "m", "f", combine="mean")
    with pytest.raises(InvalidInputError, match="named twice"):
        fit_quality_many([(runs_a, _suite(first)), (runs_a, _suite(first))], decode, "m", "f")


def test_calibrate_needs_one_runs_directory_per_suite(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "calibrate",
            "--suite",
            str(CALIBRATION_SUITES[0]),
            "--suite",
            str(CALIBRATION_SUITES[1]),
            "--runs",
            str(tmp_path),
            "--fit-only",
            "--out",
            str(tmp_path / "q.json"),
        ],
    )
    assert result.exit_code == 2 and "one runs directory per suite" in result.output
    assert not (tmp_path / "q.json").exists()


def test_save_load_round_trip_is_atomic(fitted: QualityModel, tmp_path: Path) -> None:
    path = save_quality(fitted, tmp_path / "q" / "quality.json")
    assert [p.name for p in path.parent.iterdir()] == ["quality.json"]  # no temp file left behind
    again = load_quality(path, model_fingerprint="fp123")
    assert again.to_dict() == fitted.to_dict()
    data = json.loads(path.read_text())
    assert data["format"] == "timebill-quality" and data["format_version"] == 4
    assert set(data["kinds"]) == {"retrieval", "chat", "all"}


def test_load_errors_say_what_to_do(fitted: QualityModel, tmp_path: Path) -> None:
    with pytest.raises(QualityError, match="no quality model at .*timebill calibrate"):
        load_quality(tmp_path / "missing.json")
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not json")
    with pytest.raises(QualityError, match="not JSON"):
        load_quality(corrupt)
    path = save_quality(fitted, tmp_path / "quality.json")
    data = json.loads(path.read_text())
    old = tmp_path / "old.json"
    old.write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(QualityError, match="v99"):
        load_quality(old)
    with pytest.raises(QualityError, match="made for model tiny-model .*this is other.*timebill calibrate"):
        load_quality(path, model_fingerprint="other")
    assert issubclass(QualityError, TimeBillError)


def test_the_shipped_quality_file_is_for_the_shipped_model_and_a_missing_one_is_a_clear_error(tmp_path: Path) -> None:
    assert DEFAULT_QUALITY_FILE.name == "quality-smollm2-135m.json"
    manifest = json.loads((ROOT / "docs" / "results" / "calibration-v1" / "manifest.json").read_text())
    shipped = load_quality(DEFAULT_QUALITY_FILE, model_fingerprint=manifest["model_fingerprint"])
    assert [s["name"] for s in shipped.suites] == ["calibration-v1", "calibration-v2", "calibration-v3"]
    assert shipped.extra["combine"] == "consensus"
    for entry in shipped.suites:  # each suite's runs are committed, of that very suite file
        runs_manifest = json.loads((ROOT / entry["runs_dir"] / "manifest.json").read_text())
        assert (
            runs_manifest["suite_sha256"]
            == entry["sha256"]
            == read_suite(ROOT / "benchmarks" / "suites" / f"{entry['name']}.jsonl").sha256
        )
        assert runs_manifest["model_fingerprint"] == manifest["model_fingerprint"]
    assert set(shipped.kinds) == {"retrieval", "code", "chat", "all"} and shipped.kinds["all"].n == 72
    for kind in shipped.kinds:  # every one-knob configuration the planner offers is priced
        for w, rho, alpha in [("int8", 0, 0), ("int4", 0, 0), ("fp32", 0.9, 0), ("fp32", 0, 0.95)]:
            assert 0.0 <= shipped.score(kind, w, rho, alpha) <= 1.0
    with pytest.raises(QualityError, match="timebill calibrate"):
        load_quality(tmp_path / "nowhere.json")


def _hand_model() -> QualityModel:
    def kind(base: float, relative: dict[str, float]) -> KindQuality:
        return KindQuality(4, base, relative, [(0.5, 0.4), (1.0, 1.0)], [10, 20])

    return QualityModel(
        "m",
        "f",
        [{"name": "s", "sha256": "0"}],
        {
            "code": kind(0.5, {"weights:int8": 0.9, "alpha:0.5": 0.8, "alpha:0.75": 0.6}),
            "all": kind(0.4, {"weights:int8": 0.95, "rho:0.5": 0.7, "alpha:0.5": 0.9}),
        },
    )


def test_score_is_base_times_one_factor_per_knob() -> None:
    q = _hand_model()
    assert q.score("code", "fp32", 0, 0) == pytest.approx(0.5)
    assert q.score("code", "int8", 0, 0.5) == pytest.approx(0.5 * 0.9 * 0.8)
    assert q.score("code", "int8", 0.5, 0.75) == pytest.approx(0.5 * 0.9 * 0.7 * 0.6)  # ρ from "all"
    assert q.score("code", "fp32", 0, 0.25) == pytest.approx(0.5 * 0.9)  # halfway from (0, 1) to (0.5, 0.8)
    assert q.score("code", "fp32", 0, 0.625) == pytest.approx(0.5 * 0.7)
    assert q.score("code", "fp32", 0, 0.95) == pytest.approx(0.5 * 0.6)  # past the last measurement: held
    assert q.score("summary", "int8", 0, 0) == pytest.approx(0.4 * 0.95)  # unknown kind → all
    assert q.score(None, "fp32", 0.25, 0) == pytest.approx(0.4 * 0.85)
    with pytest.raises(InvalidInputError, match="int4"):
        q.score("code", "int4", 0, 0)
    with pytest.raises(InvalidInputError):
        q.score("code", "fp32", 1.0, 0)


def test_prompt_length_buckets_adjust_the_kind_factor_by_the_bucket_over_the_pooled_one(tmp_path: Path) -> None:
    hand = _hand_model()
    short = KindQuality(
        2, 0.4, {"weights:int8": 0.95 * 1.2, "rho:0.5": 0.7 * 0.5}, [(1.0, 1.0)], [10], lengths_censored=[False]
    )
    long = KindQuality(
        2, 0.4, {"weights:int8": 0.95, "rho:0.5": 0.7 * 1.5}, [(1.0, 1.0)], [10], lengths_censored=[False]
    )
    q = replace(hand, prompt_edges=(2048,), prompt_buckets=(short, long))
    assert q.prompt_bucket(2047) == 0 and q.prompt_bucket(2048) == 1
    assert q.score("code", "int8", 0, 0, n_prompt=100) == pytest.approx(0.5 * 0.9 * 1.2)
    assert q.score("code", "int8", 0, 0, n_prompt=5000) == pytest.approx(0.5 * 0.9)
    assert q.score("code", "fp32", 0.5, 0, n_prompt=5000) == pytest.approx(0.5 * 0.7 * 1.5)  # ρ from "all"
    assert q.score("code", "int8", 0, 0) == pytest.approx(0.5 * 0.9)  # no prompt length: no adjustment
    assert hand.score("code", "int8", 0, 0, n_prompt=100) == pytest.approx(0.5 * 0.9)  # no buckets: none
    path = tmp_path / "q.json"
    path.write_text(json.dumps({**q.to_dict(), "format_version": 4}))
    assert load_quality(path).score("code", "int8", 0, 0, n_prompt=100) == pytest.approx(0.5 * 0.9 * 1.2)
    data = q.to_dict()
    data["prompt_buckets"]["edges"] = [2048, 4096]  # three edges' worth of buckets expected, two given
    path.write_text(json.dumps(data))
    with pytest.raises(QualityError, match="prompt buckets"):
        load_quality(path)


def test_fit_buckets_tasks_by_the_vanilla_runs_prompt_length(tmp_path: Path) -> None:
    runs = _write_runs(
        tmp_path,
        {"vanilla": {"r1": [1, 2], "r2": [3, 5], "c1": [6, 7, 8]}, "int8": {"r1": [1, 2], "r2": [5], "c1": [6]}},
    )
    lengths = {"r1": 3000, "r2": 100, "c1": 5000}  # the model's own counts, as the run records them
    for method in ("vanilla", "int8"):
        path = runs / "runs" / f"{method}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({**r, "prompt_tokens": lengths[r["task_id"]]}) + "\n" for r in rows))
    q = fit_quality(runs, _suite(tmp_path), decode, "tiny-model", "fp123", command="test")
    short, long = q.prompt_buckets
    assert q.prompt_edges == (2048,) and (short.n, long.n) == (1, 2)
    assert short.relative_raw["weights:int8"] == pytest.approx(0.0 / 0.5)  # r2: F1 0 against vanilla's 0.5
    assert long.relative_raw["weights:int8"] == pytest.approx((1 + 2 / 7) / (1 + 2 / 3))  # r1 1 vs 1, c1 2/7 vs 2/3
    # r2 alone has no standard error: its bucket reads the pooled factor (no adjustment), as a kind would
    assert short.relative["weights:int8"] == pytest.approx(q.kinds["all"].relative["weights:int8"])
    one_bucket = fit_quality(
        _write_runs(tmp_path / "b", {"vanilla": {"r1": [1, 2]}}), _suite(tmp_path), decode, "m", "f"
    )
    assert one_bucket.prompt_buckets == ()  # every task in one bucket: nothing to adjust by


def test_partial_and_length_prior() -> None:
    q = _hand_model()
    assert q.partial("code", 0.25) == pytest.approx(0.2)
    assert q.partial("code", 0.75) == pytest.approx(0.7)
    assert q.partial("code", 2.0) == 1.0 and q.partial(None, -1) == 0.0
    assert q.length_prior("chat") == [(10, False), (20, False)]  # no flags in the file: read as ended


# ------------------------------------------------------------------------------ the calibration suite
def _rows(path: Path) -> tuple[dict, list[dict]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[0], rows[1:]


@pytest.mark.parametrize("version", [1, 2, 3])
def test_calibration_suite_is_marked_and_names_the_suite_it_excludes(version: int) -> None:
    header, tasks = _rows(CALIBRATION_SUITES[version - 1])
    eval_suite = read_suite(EVAL_SUITE)
    assert header["purpose"] == "calibration" and header["name"] == f"calibration-v{version}"
    excludes = {"name": "longbench-style-v1", "sha256": eval_suite.sha256}
    if version < 3:
        assert header["excludes"] == excludes
    else:  # v3 also avoids v1's and v2's files and conversations (their essays it may reuse)
        earlier = [read_suite(path) for path in CALIBRATION_SUITES[:2]]
        assert header["excludes"] == [excludes, *({"name": x.name, "sha256": x.sha256} for x in earlier)]
    assert {k: sum(t["kind"] == k for t in tasks) for k in ("retrieval", "code", "chat")} == {
        "retrieval": 8,
        "code": 8,
        "chat": 8,
    }
    assert all(512 <= t["prompt_tokens"] <= 8192 - t["max_new_tokens"] for t in tasks)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_calibration_suite_shares_no_source_with_the_evaluation_suite(version: int) -> None:
    _, cal = _rows(CALIBRATION_SUITES[version - 1])
    _, ev = _rows(EVAL_SUITE)

    def used(tasks: list[dict], kind: str, field: str) -> set:
        out: set = set()
        for t in tasks:
            if t["kind"] == kind:
                value = t["source"][field]
                out.update(value if isinstance(value, list) else [value])
        return out

    assert not used(cal, "code", "file") & used(ev, "code", "file")
    assert not used(cal, "chat", "sharegpt_index") & used(ev, "chat", "sharegpt_index")
    assert not used(cal, "retrieval", "essays") & used(ev, "retrieval", "essays")
    assert len(used(cal, "code", "file")) == 8 and len(used(cal, "chat", "sharegpt_index")) == 8


@pytest.mark.parametrize(("a", "b"), [(1, 2), (1, 3), (2, 3)])
def test_the_calibration_suites_are_different_tasks(a: int, b: int) -> None:
    """Each suite adds measurements, not copies: no stdlib file, conversation or prompt of another again (the 7
    essays outside the evaluation suite are all there is, so the haystacks reuse them with new needles and depths)."""
    (_, first), (_, second) = (_rows(CALIBRATION_SUITES[i - 1]) for i in (a, b))
    for kind, field in (("code", "file"), ("chat", "sharegpt_index")):
        assert not {t["source"][field] for t in first if t["kind"] == kind} & {
            t["source"][field] for t in second if t["kind"] == kind
        }
    assert not {t["prompt"] for t in first} & {t["prompt"] for t in second}


def test_bench_suite_rebuilds_the_third_calibration_suite_from_its_command(tmp_path: Path) -> None:
    """The committed v3 is what its documented command writes (so a reader can rebuild and audit it)."""
    suites = ROOT / "benchmarks" / "suites"
    out = tmp_path / "calibration-v3.jsonl"
    args = ["bench-suite", "--out", str(out), "--seed", "9", "--retrieval", "8", "--code", "8", "--chat", "8"]
    args += ["--exclude-sources-of", str(EVAL_SUITE)]
    args += [
        "--reuse-essays-of",
        str(suites / "calibration-v1.jsonl"),
        "--reuse-essays-of",
        str(suites / "calibration-v2.jsonl"),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == CALIBRATION_SUITES[2].read_bytes()
    # --reuse-essays-of alone would drop the evaluation suite's exclusion: refused
    bad = CliRunner().invoke(app, ["bench-suite", "--out", str(out), "--reuse-essays-of", str(EVAL_SUITE)])
    assert bad.exit_code == 2 and "--exclude-sources-of" in bad.output


def test_excluded_sources_keep_each_suites_name_and_hash_paired() -> None:
    """Union keeps (name, sha256) pairs as pairs, so a suite name with " + " or "," in it survives into the header."""
    a = ExcludedSources((("eval + extra", "h1"),), essays=frozenset({"e1"}))
    b = ExcludedSources((("cal,v1", "h2"),), code_files=frozenset({"x.py"})).reusing_essays()
    both = a | b
    assert both.suites == (("eval + extra", "h1"), ("cal,v1", "h2"))
    assert both.names == "eval + extra + cal,v1" and both.reused_essays_of == ("cal,v1",)
    assert both.essays == {"e1"} and both.code_files == {"x.py"}


def test_bench_suite_refuses_a_calibration_suite_named_like_a_suite_it_excludes(tmp_path: Path) -> None:
    other = CALIBRATION_SUITES[0]  # not the default suite name, so only the excluded-names check can refuse it
    args = ["bench-suite", "--out", str(tmp_path / "c.jsonl"), "--exclude-sources-of", str(EVAL_SUITE)]
    args += ["--reuse-essays-of", str(other), "--name", read_suite(other).name]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "needs its own --name" in result.output and not (tmp_path / "c.jsonl").exists()


def test_calibrate_refuses_the_evaluation_suite(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["calibrate", "--suite", str(EVAL_SUITE), "--fit-only", "--runs", str(tmp_path), "--out", str(tmp_path / "q")],
    )
    assert result.exit_code == 2
    assert "evaluation suite" in result.output and "leak" in result.output
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize(
    ("values", "expected"), [([1.2, 1.05, 1.4], 1.05), ([0.7, 0.9], 0.9), ([1.3, 0.8], 1.0), ([1.0, 1.5], 1.0)]
)
def test_consensus_factor_believes_only_the_smallest_move_all_suites_agree_on(values, expected) -> None:
    assert consensus_factor(values) == pytest.approx(expected)


def test_ratio_of_means_standard_error_is_the_delta_method_one() -> None:
    pairs = [(1.0, 1.0), (0.0, 0.5)]  # r = 1 / 1.5; residuals ±1/3; se = sqrt((2/9) / 1 / 2) / 0.75
    ratio, se = _ratio_of_means(pairs)
    assert ratio == pytest.approx(2 / 3) and se == pytest.approx((1 / 3) / 0.75)
    assert _ratio_of_means([(0.4, 0.8)]) == (pytest.approx(0.5), None)  # one pair: no standard error
    assert _ratio_of_means([(0.4, 0.0), (0.1, 0.0)]) == (1.0, None)  # vanilla scored 0: no signal
    identical = _ratio_of_means([(0.3, 0.3), (0.6, 0.6)])
    assert identical == (pytest.approx(1.0), pytest.approx(0.0))


def _kq(raw: dict[str, float], se: dict[str, float | None]) -> KindQuality:
    return KindQuality(8, 0.3, dict(raw), [(1.0, 1.0)], [10], relative_raw=dict(raw), relative_se=dict(se))


def test_shrinkage_pulls_noise_level_differences_to_the_pooled_factor() -> None:
    # Kinds 0.8 / 1.2 apart with standard errors 0.3: their spread (var 0.04 of the means) is below
    # what noise explains (mean se² 0.09), so tau² = 0 and every kind gets the pooled 1.0.
    kinds = {"a": _kq({"rho:0.5": 0.8}, {"rho:0.5": 0.3}), "b": _kq({"rho:0.5": 1.2}, {"rho:0.5": 0.3})}
    pooled = _kq({"rho:0.5": 1.0}, {"rho:0.5": 0.2})
    out = shrink_toward_pooled(kinds, pooled)
    assert out["a"].relative["rho:0.5"] == pytest.approx(1.0) and out["b"].relative["rho:0.5"] == pytest.approx(1.0)
    assert out["a"].shrink_weight["rho:0.5"] == 0.0
    assert out["a"].relative_raw["rho:0.5"] == 0.8  # the measurement itself is kept beside the shrunk factor


def test_shrinkage_keeps_differences_far_larger_than_their_errors() -> None:
    # 0.5 vs 1.5 with se 0.05: var of the means 0.5, mean se² 0.0025 → tau² ≈ 0.4975, w ≈ 0.995.
    kinds = {"a": _kq({"alpha:0.95": 0.5}, {"alpha:0.95": 0.05}), "b": _kq({"alpha:0.95": 1.5}, {"alpha:0.95": 0.05})}
    out = shrink_toward_pooled(kinds, _kq({"alpha:0.95": 1.0}, {"alpha:0.95": 0.03}))
    tau2 = 0.5 - 0.0025
    w = tau2 / (tau2 + 0.0025)
    assert out["a"].shrink_weight["alpha:0.95"] == pytest.approx(w)
    assert out["a"].relative["alpha:0.95"] == pytest.approx(1.0 + w * (0.5 - 1.0))
    assert out["b"].relative["alpha:0.95"] == pytest.approx(1.0 + w * (1.5 - 1.0))


def test_shrinkage_with_a_missing_standard_error_or_a_single_kind() -> None:
    kinds = {
        "a": _kq({"weights:int8": 0.5, "rho:0.9": 0.7}, {"weights:int8": 0.05, "rho:0.9": 0.1}),
        "b": _kq({"weights:int8": 1.5}, {"weights:int8": 0.05}),
        "c": _kq({"weights:int8": 2.0}, {"weights:int8": None}),  # one paired task: no error, no trust
    }
    pooled = _kq({"weights:int8": 1.0, "rho:0.9": 0.7}, {"weights:int8": 0.03, "rho:0.9": 0.1})
    out = shrink_toward_pooled(kinds, pooled)
    assert out["c"].relative["weights:int8"] == pytest.approx(1.0) and out["c"].shrink_weight["weights:int8"] == 0.0
    assert out["b"].relative["weights:int8"] > 1.4  # tau² from a and b only
    assert out["a"].relative["rho:0.9"] == 0.7  # only kind a measures rho 0.9: it is the pooled measurement


def test_the_shipped_quality_file_is_the_consensus_of_the_three_suites_fitted_alone(tmp_path: Path) -> None:
    """Rebuilt from the committed runs: each suite alone (its kinds shrunk toward its pooled factors where the
    kinds differ no more than noise explains), then each shipped factor the consensus of the three."""
    shipped = load_quality(DEFAULT_QUALITY_FILE)
    singles = []
    for entry in shipped.suites:
        out = tmp_path / f"{entry['name']}.json"
        suite = ROOT / "benchmarks" / "suites" / f"{entry['name']}.jsonl"
        args = ["calibrate", "--fit-only", "--combine", "pooled", "--suite", str(suite)]
        result = CliRunner().invoke(app, [*args, "--runs", str(ROOT / entry["runs_dir"]), "--out", str(out)])
        assert result.exit_code == 0, result.output
        single = load_quality(out)
        for name, k in single.kinds.items():
            if name == "all":
                continue
            pooled = single.kinds["all"]
            for knob, r in k.relative.items():
                w = k.shrink_weight[knob]
                assert 0.0 <= w <= 1.0
                expected = pooled.relative[knob] + w * (k.relative_raw[knob] - pooled.relative[knob])
                assert r == pytest.approx(expected, abs=1e-5)
        singles.append(single)
    for name, k in shipped.kinds.items():
        for knob, r in k.relative.items():
            assert r == pytest.approx(consensus_factor([s.kinds[name].relative[knob] for s in singles]), abs=1e-5)
