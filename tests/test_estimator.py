"""The execution-time estimator: fitting a profile, request-level estimates, profile lookup, recalibration.

Most tests fit synthetic measurements (fast, exact expectations); one profiles the real default model on
a tiny grid to pin that the production code path can be timed end to end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from timebill.errors import InvalidInputError, ProfileError
from timebill.estimator import (
    ExecutionTimeEstimator,
    LinFit,
    ModelShape,
    PiecewiseLinFit,
    PiecewiseQuadFit,
    ProfileGrid,
    QuadFit,
    fit_profile,
    format_profile_report,
    plot_profile,
    profile_key_for,
    save_profile,
)
from timebill.estimator.store import ProfileKey, default_profile_path

A, B, C = 1.7e-7, 1.1e-3, 0.06  # prefill  a·N² + b·N + c  (seconds; SmolLM2 on 2 cores, roughly)
P, Q = 4.5e-6, 0.03  # decode step  p·N_kv + q
SMOLLM2 = {
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
}


# The user's cache root before the tests isolate it: the CLI test loads the real model from there.
_REAL_CACHE_DIR = os.environ.get("TIMEBILL_CACHE_DIR")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIMEBILL_CACHE_DIR", str(tmp_path / "cache"))


def _fake_engine(**overrides: object) -> SimpleNamespace:
    """What profile lookup reads from an engine, without loading a model."""
    fields = {
        "source": SimpleNamespace(model_id="SmolLM2-135M-Instruct", fingerprint="abc123"),
        "dtype": "float32",
        "threads": 2,
        "device": "cpu",
        "decode_path": "fast-fp32",
    }
    fields.update(overrides)
    return SimpleNamespace(**fields)


def _measurements(rel_noise: float = 0.003, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {"prefill": [], "decode": [], "evict": [], "setup": []}
    for n in (16, 32, 64, 128, 256, 512, 1024, 1536, 2048, 3072, 4096, 5120, 6144, 7168, 7936):
        for r in range(3):
            noise = 1 + rel_noise * rng.standard_normal()
            rows["prefill"].append([n, n, (A * n * n + B * n + C) * noise, r, 0.0, 0])
            rows["evict"].append([n, 0.5, (2e-5 * n + 1e-3) * noise, r, 0.0, 0])
    for n in (16, 64, 256, 512, 1024, 2048, 3072, 4096, 5120, 6144, 7168, 8180):
        for r in range(3):
            noise = 1 + rel_noise * rng.standard_normal()
            rows["decode"].append([n, n + 4.5, (P * (n + 4.5) + Q) * noise, r, 0.0, 0])
            rows["setup"].append([n, n, (1e-6 * n + 2e-3) * noise, r, 0.0, 0])
    rows["grid"] = {"name": "synthetic", "repeats": 3, "contention_cores": 0.2}
    return rows


def _key() -> ProfileKey:
    return profile_key_for(_fake_engine())  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def fitted():
    return fit_profile(_key(), _measurements(), shape=ModelShape.from_config(SMOLLM2))


# ---------------------------------------------------------------- fitting a profile


def test_fit_profile_recovers_paper_coefficients_and_scores_held_out_points(fitted) -> None:
    pre, dec = fitted.prefill_fit(), fitted.decode_fit()
    assert isinstance(pre, QuadFit) and isinstance(dec, LinFit)  # no knot in the data: paper form kept
    assert (pre.a, pre.b, pre.c) == pytest.approx((A, B, C), rel=0.05)
    assert (dec.p, dec.q) == pytest.approx((P, Q), rel=0.05)
    rep = fitted.report
    for kind in ("prefill", "decode"):
        assert rep[kind]["n_holdout_points"] >= 3
        assert rep[kind]["mape_holdout_pct"][rep[kind]["chosen"]] < 1.0
        held = set(rep[kind]["holdout_n"])
        assert min(rep[kind]["range"]) not in held and max(rep[kind]["range"]) not in held
    # the noise floor reflects the 0.3 % noise put in
    assert 0.05 < fitted.noise["prefill"]["floor_mape_pct"] < 1.0
    assert fitted.eviction_fit() is not None and fitted.setup_fit() is not None


def test_fit_profile_takes_a_hinge_when_the_data_has_one() -> None:
    data = _measurements(rel_noise=0.002)
    knot = 3000.0
    for row in data["decode"]:
        row[2] += 6e-6 * max(0.0, row[1] - knot)
    profile = fit_profile(_key(), data)
    assert isinstance(profile.decode_fit(), PiecewiseLinFit)
    mapes = profile.report["decode"]["mape_holdout_pct"]
    assert mapes["piecewise_linear"] < 0.9 * mapes["linear"]


def test_flops_check_reports_throughput_per_term(fitted) -> None:
    check = fitted.report["flops_check"]
    rates = check["gflops_per_s"]
    assert all(v is not None and v > 0 for v in rates.values())
    # b: 2.12e8 FLOPs per token in 1.1 ms → ~193 GFLOP/s
    assert rates["b (proj+FFN per token)"] == pytest.approx(2.123e8 / B / 1e9, rel=0.05)
    assert check["gbytes_per_s"]["q (weights per step)"] > 0
    text = format_profile_report(fitted)
    assert "held-out" in text and "GFLOP/s" in text and "floor" in text


def test_fit_profile_without_samples_is_a_clear_error() -> None:
    with pytest.raises(ProfileError, match="decode"):
        fit_profile(_key(), {"prefill": _measurements()["prefill"], "decode": []})


def test_plot_is_written(fitted, tmp_path: Path) -> None:
    path = plot_profile(fitted, tmp_path / "plots" / "ete.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- estimates


def test_estimate_is_monotone_in_prompt_and_length_and_decreasing_in_alpha(fitted) -> None:
    est = ExecutionTimeEstimator.from_profile(fitted)
    lengths = [1, 2, 10, 100, 500]
    prompts = [2, 50, 500, 2000, 6000]
    for alpha in (0.0, 0.3, 0.9):
        for n in lengths:
            times = [est.e2e_s(n_x, alpha, n) for n_x in prompts]
            assert all(b > a for a, b in zip(times, times[1:], strict=False)), (alpha, n, times)
        for n_x in prompts:
            times = [est.e2e_s(n_x, alpha, n) for n in lengths]
            assert all(b > a for a, b in zip(times, times[1:], strict=False)), (alpha, n_x, times)
    alphas = [0.05, 0.25, 0.5, 0.75, 0.95]
    for n_x in (100, 2000, 6000):
        times = [est.e2e_s(n_x, alpha, 200) for alpha in alphas]
        assert all(b < a for a, b in zip(times, times[1:], strict=False)), (n_x, times)
        # α = 0 runs no eviction step; without that step's cost it is the slowest of all
        assert est.e2e_s(n_x, 0.0, 200) > est.e2e_s(n_x, 0.05, 200) - est.evict_s(n_x, 0.05)


def test_e2e_is_prefill_plus_eviction_plus_decode_over_kept_tokens(fitted) -> None:
    est = ExecutionTimeEstimator.from_profile(fitted)
    n_x, alpha, n = 1000, 0.5, 64
    kept = est.kept_kv_tokens(n_x, alpha)
    steps = sum(est.step_s(kept + i) for i in range(n - 1))
    expected = est.prefill_s(n_x) + est.evict_s(n_x, alpha) + est.setup_s(kept, n) + steps
    assert est.e2e_s(n_x, alpha, n) == pytest.approx(expected, rel=1e-12)
    assert est.e2e_s(n_x, alpha, 1) == pytest.approx(est.prefill_s(n_x) + est.evict_s(n_x, alpha))
    # WCET is the e2e estimate at N_W = min(ceil(k·N̂), N_max)
    assert est.wcet_s(n_x, alpha, n_hat=20, k=5, n_max=64) == est.e2e_s(n_x, alpha, 64)
    assert est.wcet_s(n_x, alpha, n_hat=10, k=5, n_max=512) == est.e2e_s(n_x, alpha, 50)
    with pytest.raises(InvalidInputError):
        est.e2e_s(0, 0.5, 10)
    with pytest.raises(InvalidInputError):
        est.e2e_s(100, 1.0, 10)


def test_kept_tokens_are_kvpress_counts() -> None:
    from kvpress.utils import compute_n_kept

    for n_x in (1, 2, 3, 7, 31, 32, 33, 100, 999, 4097):
        for alpha in (0.0, 0.01, 0.1, 0.25, 1 / 3, 0.5, 0.7, 0.95, 0.99):
            expected = n_x if alpha == 0.0 or n_x <= 1 else compute_n_kept(n_x, alpha)
            assert ExecutionTimeEstimator.kept_kv_tokens(n_x, alpha) == expected
    assert ExecutionTimeEstimator.kept_kv_tokens(100, 0.9, press_min_kept=32) == 32
    assert ExecutionTimeEstimator.kept_kv_tokens(20, 0.9, press_min_kept=32) == 20


def test_coefficients_for_the_planner(fitted) -> None:
    est = ExecutionTimeEstimator.from_profile(fitted)
    coef = est.coefficients()
    pre, dec = fitted.prefill_fit(), fitted.decode_fit()
    assert (coef.a, coef.b, coef.c, coef.p, coef.q) == (pre.a, pre.b, pre.c, dec.p, dec.q)
    # hinge fits become their chord over the profiled range: exact at the ends, never below inside
    hinged = ExecutionTimeEstimator(
        PiecewiseQuadFit(1e-7, 1e-3, 0.05, 5e-4, 2000.0),
        PiecewiseLinFit(4e-6, 0.03, 8e-6, 3000.0),
        prefill_range=(16.0, 7936.0),
        decode_range=(16.0, 8180.0),
    )
    c2 = hinged.coefficients()
    for n in np.linspace(16, 7936, 50):
        assert c2.prefill_s(n) >= hinged.prefill_s(int(n)) - 1e-12
    for n in np.linspace(16, 8180, 50):
        assert c2.step_s(n) >= hinged.step_s(float(n)) - 1e-12
    assert c2.prefill_s(7936) == pytest.approx(hinged.prefill_s(7936))
    assert c2.step_s(16) == pytest.approx(hinged.step_s(16.0))


def test_observe_tracks_a_machine_twice_as_slow(fitted) -> None:
    from timebill.engine import GenerationResult

    est = ExecutionTimeEstimator.from_profile(fitted)
    static = est.e2e_s(800, 0.5, 100)

    def slow_result(n_x: int) -> GenerationResult:
        kept = est.kept_kv_tokens(n_x, 0.5)
        steps = [2 * est.step_s(kept + j, recalibrated=False) for j in range(99)]
        return GenerationResult(
            text="",
            token_ids=list(range(100)),
            prompt_tokens=n_x,
            kept_kv_tokens=kept,
            kv_tokens_per_layer=[kept] * 30,
            alpha=0.5,
            press="snapkv",
            prefill_s=2 * est.prefill_s(n_x, recalibrated=False),
            evict_s=0.0,
            decode_s=sum(steps),
            total_s=0.0,
            token_times_s=[],
            step_times_s=steps,
            stop_reason="max_tokens",
            deadline_s=None,
            threads=2,
            model_id="SmolLM2-135M-Instruct",
        )

    est.observe(slow_result(500))
    assert est.scales()["step"] == pytest.approx(2.0)
    assert est.scales()["prefill"] == 1.0  # one prefill is not enough evidence yet
    for n_x in (700, 900):
        est.observe(slow_result(n_x))
    assert est.scales() == pytest.approx({"prefill": 2.0, "step": 2.0})
    assert est.e2e_s(800, 0.5, 100) == pytest.approx(2 * static, rel=0.01)
    assert est.e2e_s(800, 0.5, 100, recalibrated=False) == static
    assert est.coefficients().q == pytest.approx(2 * est.coefficients(recalibrated=False).q)
    est.reset_recalibration()
    assert est.e2e_s(800, 0.5, 100) == static


def test_drift_tracker_ignores_noise_and_follows_a_real_shift() -> None:
    from timebill.estimator import DriftTracker

    rng = np.random.default_rng(0)
    tracker = DriftTracker("step", long_window=1024, short_window=64)
    assert tracker.scale() == 1.0
    for i in range(300):  # the machine runs 3 % slower than profiled, with ±3 % noise
        tracker.observe(100 + i, 0.0309 * (1 + 0.03 * rng.standard_normal()), 0.03)
    assert tracker.scale() == pytest.approx(1.03, abs=0.01)
    for i in range(64):  # another process takes a core: 3x slower
        tracker.observe(400 + i, 0.09, 0.03)
    assert tracker.scale() == pytest.approx(3.0)
    for i in range(64):  # and leaves: the short window takes the scale back at once
        tracker.observe(464 + i, 0.0309, 0.03)
    assert tracker.scale() == pytest.approx(1.03, abs=0.01)
    assert tracker.restarts == 1  # the slowdown restarted the long window; on recovery it agreed again


def test_drift_tracker_restarts_its_long_window_after_a_sustained_shift() -> None:
    from timebill.estimator import DriftTracker

    tracker = DriftTracker("step", long_window=128, short_window=8)
    for i in range(100):
        tracker.observe(i, 0.0309, 0.03)
    for i in range(60):  # a long 15x slowdown: the long window fills with it
        tracker.observe(i, 0.45, 0.03)
    assert tracker.scale() == pytest.approx(4.0)  # clipped at the default bound
    assert tracker.restarts == 1
    for i in range(8):  # the slowdown ends: within one short window the scale is back
        tracker.observe(i, 0.0309, 0.03)
    assert tracker.scale() == pytest.approx(1.03)
    assert tracker.restarts == 2
    tracker.reset()
    assert tracker.scale() == 1.0
    with pytest.raises(InvalidInputError):
        DriftTracker("decode", 10, 5)
    with pytest.raises(InvalidInputError):
        DriftTracker("step", 5, 10)


# ---------------------------------------------------------------- finding profiles


def test_profile_round_trip_through_the_engine_lookup(fitted) -> None:
    path = save_profile(fitted)
    assert path == default_profile_path(fitted.key)
    est = ExecutionTimeEstimator.for_engine(_fake_engine())  # type: ignore[arg-type]
    assert est.profile == fitted
    assert est.e2e_s(1000, 0.5, 50) == ExecutionTimeEstimator.from_profile(fitted).e2e_s(1000, 0.5, 50)


def test_missing_profile_says_how_to_make_one(fitted) -> None:
    with pytest.raises(ProfileError, match=r"run `timebill profile --threads 2 --press snapkv`"):
        ExecutionTimeEstimator.for_engine(_fake_engine())  # type: ignore[arg-type]
    save_profile(fitted)
    # another setup of the same model: the message lists what exists
    with pytest.raises(ProfileError, match=r"no estimator profile.*threads=1.*other setups.*threads=2"):
        ExecutionTimeEstimator.for_engine(_fake_engine(threads=1))  # type: ignore[arg-type]


def test_stale_profile_lists_the_differences(fitted) -> None:
    save_profile(fitted)
    new_weights = _fake_engine(source=SimpleNamespace(model_id="SmolLM2-135M-Instruct", fingerprint="fff"))
    with pytest.raises(ProfileError, match=r"stale profile: model_sha: profile abc123, now fff"):
        ExecutionTimeEstimator.for_engine(new_weights)  # type: ignore[arg-type]


def test_corrupt_profile_is_a_clear_error(fitted, tmp_path: Path) -> None:
    path = save_profile(fitted)
    path.write_text(path.read_text()[:100])
    with pytest.raises(ProfileError, match="not valid JSON.*re-run profiling"):
        ExecutionTimeEstimator.for_engine(_fake_engine())  # type: ignore[arg-type]
    data = fitted.to_dict()
    data["decode"] = {"kind": "linear", "p": "fast"}
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="'decode' is not a valid fit"):
        ExecutionTimeEstimator.for_engine(_fake_engine(), path=other)  # type: ignore[arg-type]


def test_a_prediction_past_the_profiled_range_warns_once(caplog) -> None:
    est = ExecutionTimeEstimator(
        QuadFit(A, B, C), LinFit(4e-6, 0.03), prefill_range=(16.0, 2048.0), decode_range=(16.0, 4096.0)
    )
    with caplog.at_level("WARNING", logger="timebill.estimator.estimator"):
        est.prefill_s(2200)  # within 10 % of the grid: no warning
        est.step_s(4400.0)
        assert not caplog.records
        est.prefill_s(5000)
        est.prefill_s(7000)
        est.step_s(8000.0)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "prefill time for 5000 tokens is extrapolated" in messages[0] and "2048" in messages[0]
    assert "decode time for 8000 tokens" in messages[1]


def test_grids_fit_the_context_and_refuse_bad_values() -> None:
    full, quick = ProfileGrid.full(8192), ProfileGrid.quick(8192)
    full.check_fits(8192)
    quick.check_fits(8192)
    assert max(full.prefill_n) == 8192 - 256 and len(full.prefill_n) >= 20 and len(full.decode_n_kv) >= 20
    # quick is sparse, not short: it reaches the longest prompt the engine accepts, so no plan extrapolates
    assert max(quick.prefill_n) == 8192 - 256 and max(quick.decode_n_kv) + quick.steps_consumed < 8192
    assert max(quick.decode_n_kv) > 8000 and len(quick.prefill_n) < len(full.prefill_n)
    assert quick.prefill_repeats(7936) == 2 and quick.prefill_repeats(2048) == 3 and quick.prefill_repeats(64) == 5
    small = ProfileGrid.quick(1024)  # a short-context model: no tail beyond the dense part, still fits
    small.check_fits(1024)
    assert max(small.prefill_n) == 1024 - 256
    with pytest.raises(InvalidInputError):
        full.check_fits(4096)
    with pytest.raises(InvalidInputError):
        ProfileGrid("bad", (16, 32), (16, 32))


# ---------------------------------------------------------------- the real model


def test_tiny_profile_of_the_real_model_has_positive_coefficients(engine, tmp_path: Path) -> None:
    from timebill.estimator import profile_engine

    profile = profile_engine(engine, ProfileGrid.tiny(), progress=False)
    assert profile.key.model_id == engine.source.model_id and profile.key.threads == engine.threads
    assert profile.key.decode_path == engine.decode_path
    for fit in (profile.prefill_fit(), profile.decode_fit()):
        values = [v for k, v in fit.to_dict().items() if k not in ("kind", "knot")]
        assert all(v >= 0 for v in values) and any(v > 0 for v in values)
    est = ExecutionTimeEstimator.from_profile(profile)
    assert est.prefill_s(128) >= est.prefill_s(16) > 0  # non-negative a, b: monotone even on a noisy machine
    assert est.step_s(100) > 0 and est.e2e_s(300, 0.5, 20) > est.prefill_s(300)
    assert len(profile.measurements["prefill"]) == len(ProfileGrid.tiny().prefill_n)
    # the profile's own file round-trips
    path = save_profile(profile, tmp_path / "p.json")
    assert ExecutionTimeEstimator.for_engine(engine, path=path).profile == profile


def test_cli_show_without_a_profile_explains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from timebill.cli import app

    # the model itself comes from the real cache (converting it again would take ~20 s); --out keeps
    # the profile lookup inside tmp_path
    if _REAL_CACHE_DIR is None:
        monkeypatch.delenv("TIMEBILL_CACHE_DIR")
    else:
        monkeypatch.setenv("TIMEBILL_CACHE_DIR", _REAL_CACHE_DIR)

    result = CliRunner().invoke(app, ["profile", "--show", "--out", str(tmp_path / "none.json")])
    assert result.exit_code == 2
    assert "run `timebill profile" in result.output.replace("\n", " ")


def test_an_unconfirmed_correction_fades_back_to_the_profile():
    """A load spike must not lock a server out: refused requests bring no measurements to lower it."""
    from timebill.estimator import DriftTracker

    now = [0.0]
    tracker = DriftTracker("prefill", long_window=16, short_window=4, stale_after_s=60.0, clock=lambda: now[0])
    for i in range(6):
        tracker.observe(100 + i, 0.3, 0.1)  # 3x slower than the profile
    assert tracker.scale() == pytest.approx(3.0)
    now[0] = 59.0
    assert tracker.scale() == pytest.approx(3.0)  # recent: kept in full
    now[0] = 120.0
    assert tracker.scale() == pytest.approx(3.0**0.5)  # one half-life past stale
    now[0] = 1200.0
    assert tracker.scale() == pytest.approx(1.0, abs=1e-3)
    tracker.observe(200, 0.3, 0.1)  # the slowdown is still there: the next measurement restores it
    assert tracker.scale() == pytest.approx(3.0)
