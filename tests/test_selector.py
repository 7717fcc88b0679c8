"""The expected-score planner on the real engine: the chosen θ is what runs, the guard holds, refusals are clear."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest

from timebill.bench.methods import ExpectedScoreMethod, Resources, Scorer, outcome
from timebill.bench.suite import Task
from timebill.errors import InfeasibleBudgetError, InvalidInputError
from timebill.quality import KindQuality, QualityModel
from timebill.selector import Selector

PROMPT = (
    "Here are some notes about the harbour.\n"
    + " ".join(f"Line {i}: the boats in the harbour were painted blue and green." for i in range(60))
    + "\nQuestion: what colours were the boats?"
)


def _quality(alpha_factor: float) -> QualityModel:
    """Measurements as a calibration run would record them; ``alpha:0.75`` scaled by ``alpha_factor``."""
    kq = KindQuality(
        n=4,
        base=0.5,
        relative={
            "weights:int8": 0.9,
            "weights:int4": 0.9,
            "alpha:0.25": 1.0,
            "alpha:0.5": 1.0,
            "alpha:0.75": alpha_factor,
            "alpha:0.95": 0.3,
            "rho:0.5": 0.8,
        },
        partial=[(0.5, 0.5), (1.0, 1.0)],
        lengths=[8, 12, 16, 16],
    )
    return QualityModel("SmolLM2-135M-Instruct", "test", [{"name": "hand-built", "sha256": "0"}], {"all": kq})


def test_the_chosen_configuration_is_what_runs(engine, estimator) -> None:
    # a profile without the compressor's timing cannot price ρ > 0: those candidates are left out
    untimed = copy.copy(estimator)
    untimed.compressor_fits = {}
    selector = Selector({"fp32": engine}, {"fp32": untimed}, _quality(alpha_factor=1.2))
    assert {c.knobs.rho for c in selector.candidates(None)} == {0.0}
    assert {c.knobs.rho for c in Selector({"fp32": engine}, {"fp32": estimator}, _quality(1.0)).candidates(None)} == {
        0.0,
        0.25,
        0.5,
        0.75,
        0.9,
    }
    # by default one knob at a time (what calibration measured): vanilla + 4 ρ + 4 α on one weights mode
    assert len(Selector({"fp32": engine}, {"fp32": estimator}, _quality(1.0)).candidates(None)) == 9
    assert (
        len(Selector({"fp32": engine}, {"fp32": estimator}, _quality(1.0), combine_knobs=True).candidates(None)) == 25
    )
    out = selector.generate(PROMPT, 60.0, policy="kill", max_new_tokens=16)
    best = out.selection.choice.best
    assert best is not None and best.knobs.alpha == 0.75  # the quality model says α = 0.75 is best here
    gen = out.generation
    assert gen.alpha == 0.75 and gen.kept_kv_tokens < gen.prompt_tokens  # and the engine really evicted
    assert out.deadline_met and len(gen.token_ids) >= 1
    record = out.to_record()
    assert record["plan"]["chosen"]["configuration"] == "fp32+a0.75"
    assert len(record["plan"]["runners_up"]) == 3
    assert 0.0 < out.selection.plan_s < 1.0
    assert "P(finish)" in out.summary_line()


def test_quality_decides_and_vanilla_wins_when_eviction_costs(engine, estimator) -> None:
    selector = Selector({"fp32": engine}, {"fp32": estimator}, _quality(alpha_factor=0.5), rhos=(0.0,))
    selection, _ = selector.plan(PROMPT, 60.0, policy="guard", max_new_tokens=16)
    assert selection.knobs is not None and selection.knobs.alpha in (0.0, 0.25, 0.5)  # all score 1.0 × base
    assert selection.choice.best.expected_score == pytest.approx(0.5)


def test_a_budget_nothing_fits_is_refused_before_any_work(engine, estimator) -> None:
    selector = Selector({"fp32": engine}, {"fp32": estimator}, _quality(alpha_factor=1.0))
    with pytest.raises(InfeasibleBudgetError) as info:
        selector.generate(PROMPT, 0.001, max_new_tokens=16)
    assert info.value.earliest_feasible_s > 0.001
    with pytest.raises(InvalidInputError, match="positive"):
        selector.generate(PROMPT, -1.0)
    with pytest.raises(InvalidInputError):
        Selector({"fp32": engine}, {}, _quality(1.0))


def test_a_kill_budget_no_answer_can_finish_in_is_refused_saying_so(engine, estimator) -> None:
    # every calibration answer of this kind was 400 tokens long: by T the first tokens arrive, but no
    # configuration emits 400, so under Kill every P(finish) is 0 — the refusal must say that, not "no token"
    q = _quality(alpha_factor=1.0)
    long = QualityModel(
        q.model_id,
        q.model_fingerprint,
        q.suites,
        {"all": KindQuality(n=4, base=0.5, relative={}, partial=[(1.0, 1.0)], lengths=[400, 400, 400, 400])},
    )
    selector = Selector({"fp32": engine}, {"fp32": estimator}, long, rhos=(0.0,), alphas=(0.0,))
    n_prompt = len(engine.encode(PROMPT, chat=True))
    budget = estimator.prefill_s(n_prompt) + 20 * estimator.step_s(n_prompt)  # ~20 tokens, far from 400
    with pytest.raises(InfeasibleBudgetError, match="no configuration is expected to deliver") as info:
        selector.generate(PROMPT, budget, policy="kill", max_new_tokens=400)
    assert "400 tokens" in str(info.value) and "emits a token" not in str(info.value)
    assert info.value.earliest_feasible_s > budget  # the budget that would let 400 tokens arrive
    # the same budget under guard plans (a partial answer counts), and a budget that fits 400 tokens under Kill
    selection, _ = selector.plan(PROMPT, budget, policy="guard", max_new_tokens=400)
    assert selection.choice.best is not None
    selection, _ = selector.plan(PROMPT, 1.5 * info.value.earliest_feasible_s, policy="kill", max_new_tokens=400)
    assert selection.choice.best is not None and selection.choice.best.p_finish > 0


def test_the_bench_method_records_the_choice_and_reads_like_any_run(engine, estimator) -> None:
    selector = Selector({"fp32": engine}, {"fp32": estimator}, _quality(alpha_factor=1.2), rhos=(0.0,))
    resources = Resources(engine, make_selector=lambda res: selector)
    task = Task("t1", "retrieval", "qa_f1", PROMPT, ("blue and green",), 16)
    record = ExpectedScoreMethod("timebill-kill", policy="kill").run(resources, task, 60.0)
    assert record["configuration"] == "fp32+a0.75" and record["planner"] == "expected"
    assert 0 < record["p_finish"] <= 1 and record["token_times_s"][-1] <= 60.0
    job = outcome({**record, "key": "k"}, task, 60.0, Scorer(resources.decode))
    assert job.answered and job.finished == (record["stop_reason"] in ("eos", "max_tokens"))
    refused = ExpectedScoreMethod("timebill-kill").run(resources, task, 0.001)
    assert refused["stop_reason"] == "refused" and refused["token_ids"] == []


def test_a_run_recalibrates_the_chosen_modes_time_model(engine, estimator) -> None:
    # a profile that thinks decode steps take a quarter of their real time: the runs this host makes must
    # correct it (online recalibration, as the facade does), or every later plan keeps trusting it
    from timebill.estimator import LinFit

    fast = copy.deepcopy(estimator)
    fast.reset_recalibration()
    fast.decode_fit = LinFit(0.0, estimator.step_s(256.0, recalibrated=False) / 4)
    selector = Selector({"fp32": engine}, {"fp32": fast}, _quality(1.0), rhos=(0.0,), alphas=(0.0,))
    assert fast.scales()["step"] == 1.0
    out = selector.generate("Count from 1 to 200, separated by commas.", 120.0, policy="guard", max_new_tokens=40)
    assert len(out.generation.token_ids) >= 30  # enough steps for the recalibrator's chunks
    assert fast.scales()["step"] > 2.0  # measured ≈ 4x the profile's step (a busy CI host only raises it)
    # and the run's time against what its plan predicted is the first sample of the host's spread
    assert len(selector.time_errors["fp32"]) == 1
    window = selector.time_errors["fp32"]
    assert window.current() is window.prior  # one run is not a distribution yet
    assert min(window.samples) > 1.5  # steps 4x slower than planned: the whole run clearly slower


_NO_ENGINE = SimpleNamespace(weights="fp32")  # staleness reads no engine


def test_a_planned_run_is_stale_only_against_another_quality_model(tmp_path) -> None:
    """A bench resumed with a refitted quality file reruns the planner's runs; reading a folder keeps them.

    The expected-score planner reads no length predictor (its lengths are the quality model's prior), so a
    predictor label must not mark its runs stale — that once dropped every planned run from `bench-combine`.
    """
    from timebill.quality import quality_label

    method = ExpectedScoreMethod("timebill-kill", policy="kill")
    path = tmp_path / "quality.json"
    path.write_text('{"a": 1}')
    label = quality_label(path)
    assert label.startswith("quality.json (sha256 ") and label != quality_label(tmp_path / "none.json")
    record = {"key": "timebill-kill|t1|5", "quality": label, "predictor": None}
    planning = Resources(_NO_ENGINE, predictor_label="probe.pt (sha256 1)", quality_label=label)
    assert method.stale(record, planning) is None  # another predictor label: irrelevant to this planner
    path.write_text('{"a": 2}')  # refitted in place
    assert (
        method.stale(record, Resources(_NO_ENGINE, quality_label=quality_label(path)))
        == "planned with another quality model"
    )
    assert method.stale({"key": "old"}, Resources(_NO_ENGINE, quality_label=label)) is not None  # unlabelled: rerun
    assert method.stale({"key": "old"}, Resources(_NO_ENGINE)) is None  # reading (combine, simulate): kept
