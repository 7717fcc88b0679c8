"""The benchmark's fixed-ρ compression methods: budget-independent traces whose records say what was cut."""

from __future__ import annotations

from test_cli_compression import long_prompt
from timebill.bench.methods import FIXED_RHOS, FixedAlpha, Resources, method_registry, outcome
from timebill.bench.suite import Task


def test_compress_methods_are_fixed_configurations_after_int4() -> None:
    registry = method_registry()
    names = list(registry)
    compress = [f"compress-{rho:g}" for rho in FIXED_RHOS]
    assert compress == ["compress-0.25", "compress-0.5", "compress-0.75", "compress-0.9"]
    assert names[names.index("int4") + 1 : names.index("int4") + 5] == compress
    for name, rho in zip(compress, FIXED_RHOS, strict=True):
        method = registry[name]
        assert isinstance(method, FixedAlpha) and not method.budgeted
        config = (method.alpha, method.weights, method.prompt_compression, method.compressor)
        assert config == (0.0, "fp32", rho, "bm25")
        assert f"ρ = {rho:g}" in method.describe() and "bm25" in method.describe()
    assert "compression" not in registry["vanilla"].describe()


def test_a_compress_run_records_the_compression_and_reads_at_any_budget(engine) -> None:
    from timebill.bench.methods import Scorer

    task = Task(
        id="qa-long",
        kind="retrieval",
        metric="qa_f1",
        prompt=long_prompt(),
        references=("figs",),
        max_new_tokens=4,
    )
    resources = Resources(engine)
    record = method_registry()["compress-0.5"].run(resources, task, None)
    assert record["original_prompt_tokens"] >= 300
    assert record["prompt_tokens"] < record["original_prompt_tokens"]
    assert 0.3 < record["prompt_compression"] < 0.7 and record["compressor"] == "bm25"
    assert 0 < record["compress_s"] < record["token_times_s"][0]  # the trace's clock includes the compressor
    assert len(record["token_ids"]) == len(record["token_times_s"]) >= 1
    job = outcome(record, task, record["e2e_s"] + 1.0, Scorer(resources.decode))
    assert job.answered
    vanilla = method_registry()["vanilla"].run(resources, task, None)
    assert "original_prompt_tokens" not in vanilla and vanilla["prompt_tokens"] == record["original_prompt_tokens"]
