"""Fast tests of the estimator's math and profile storage (no model is loaded)."""

from __future__ import annotations

import inspect
import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from timebill.errors import InvalidInputError, ProfileError
from timebill.estimator import (
    ExecutionTimeEstimator,
    LinFit,
    ModelShape,
    OnlineRecalibrator,
    PiecewiseLinFit,
    PiecewiseQuadFit,
    Profile,
    ProfileKey,
    QuadFit,
    check_key,
    decode_step_flops,
    default_profile_path,
    find_profile,
    fit_decode,
    fit_decode_piecewise,
    fit_from_dict,
    fit_prefill,
    fit_prefill_piecewise,
    flops_coefficients,
    format_flops_table,
    load_profile,
    mape,
    prefill_flops,
    save_profile,
    select_model,
    split_holdout,
)
from timebill.estimator.timemodel import TimeModel
from timebill.paths import cache_dir

SMOLLM2_135M = {
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIMEBILL_CACHE_DIR", str(tmp_path / "cache"))


def _noisy(t: np.ndarray, rel: float = 0.005, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return t * (1.0 + rel * rng.standard_normal(t.shape))


# ---------------------------------------------------------------- fitting


def test_fit_prefill_recovers_coefficients() -> None:
    a, b, c = 2e-9, 3e-5, 0.02
    n = np.repeat(np.linspace(16, 8192, 24).round(), 3)
    t = _noisy(a * n**2 + b * n + c)
    fit = fit_prefill(n, t)
    assert fit.a == pytest.approx(a, rel=0.05)
    assert fit.b == pytest.approx(b, rel=0.05)
    assert fit.c == pytest.approx(c, rel=0.05)
    assert mape(fit.predict(n), a * n**2 + b * n + c) < 0.5


def test_fit_decode_recovers_coefficients() -> None:
    p, q = 4e-7, 0.015
    n = np.repeat(np.linspace(0, 16384, 20).round(), 3)
    t = _noisy(p * n + q, seed=1)
    fit = fit_decode(n, t)
    assert fit.p == pytest.approx(p, rel=0.03)
    assert fit.q == pytest.approx(q, rel=0.01)


def test_absolute_weighting_also_works() -> None:
    n = np.linspace(10, 1000, 12)
    fit = fit_prefill(n, 1e-6 * n**2 + 1e-3 * n + 0.01, weighting="absolute")
    assert (fit.a, fit.b, fit.c) == pytest.approx((1e-6, 1e-3, 0.01), rel=1e-6)


def test_non_negativity_enforced() -> None:
    n = np.linspace(100, 4000, 15)
    # Concave data: unconstrained LS would give a < 0.
    t = 0.01 + 1e-4 * n - 1e-8 * n**2
    assert np.polyfit(n, t, 2)[0] < 0
    fit = fit_prefill(n, t)
    assert fit.a == 0.0 and fit.b >= 0 and fit.c >= 0
    # Decreasing decode timings: slope is clipped to 0, intercept is the (weighted) level.
    n2 = np.linspace(0, 1000, 10)
    fit2 = fit_decode(n2, 0.02 - 1e-6 * n2)
    assert fit2.p == 0.0 and fit2.q > 0
    # Data through the origin with a negative-intercept tendency: c clipped to 0.
    fit3 = fit_decode(n2[1:], 1e-5 * n2[1:] - 1e-4)
    assert fit3.q == 0.0 and fit3.p > 0
    assert all(v >= 0 for v in (fit3.p, fit3.q))


def test_fit_input_validation() -> None:
    with pytest.raises(InvalidInputError):
        fit_prefill([1, 2], [1.0, 2.0])  # too few distinct points
    with pytest.raises(InvalidInputError):
        fit_decode([1, 2, 3], [1.0, 2.0])
    with pytest.raises(InvalidInputError):
        fit_decode([1, 2, 3], [1.0, 0.0, 2.0])  # relative weighting needs t > 0
    with pytest.raises(InvalidInputError):
        fit_decode([1, 2, 3], [1.0, float("nan"), 2.0])


def test_piecewise_decode_finds_planted_knot() -> None:
    p, q, p2, knot = 2e-7, 0.01, 6e-7, 4096.0
    n = np.arange(0, 16385, 512, dtype=float)
    t = _noisy(p * n + q + p2 * np.maximum(0, n - knot), seed=2)
    fit = fit_decode_piecewise(n, t)
    assert isinstance(fit, PiecewiseLinFit)
    assert fit.knot == pytest.approx(knot, abs=512)
    assert fit.p2 == pytest.approx(p2, rel=0.15)
    lin = fit_decode(n, t)
    assert mape(fit.predict(n), t) < 0.5 * mape(lin.predict(n), t)


def test_piecewise_prefill_finds_planted_knot() -> None:
    a, b, c, b2, knot = 1e-9, 2e-5, 0.01, 8e-5, 3000.0
    n = np.arange(100, 8200, 250, dtype=float)
    t = _noisy(a * n**2 + b * n + c + b2 * np.maximum(0, n - knot), seed=3)
    fit = fit_prefill_piecewise(n, t)
    assert isinstance(fit, PiecewiseQuadFit)
    assert fit.knot == pytest.approx(knot, abs=300)
    assert fit.b2 == pytest.approx(b2, rel=0.2)
    # explicit breakpoints restrict the search
    fit2 = fit_prefill_piecewise(n, t, breakpoints=[1100.0, 3100.0, 6100.0])
    assert fit2.knot == 3100.0


def test_sum_steps_matches_brute_force() -> None:
    lin = LinFit(p=3e-7, q=0.012)
    pw = PiecewiseLinFit(p=2e-7, q=0.01, p2=5e-7, knot=1000.5)
    for fit in (lin, pw):
        for start, steps in [(0, 1), (10, 0), (900, 300), (1200, 50), (0, 5000)]:
            brute = float(np.sum(fit.predict(np.arange(start, start + steps, dtype=float)))) if steps else 0.0
            assert fit.sum_steps(start, steps) == pytest.approx(brute, rel=1e-12, abs=1e-15)


def test_predict_scalar_and_array() -> None:
    fit = QuadFit(a=1.0, b=2.0, c=3.0)
    assert isinstance(fit.predict(2), float) and fit.predict(2) == 11.0
    out = fit.predict([0, 1, 2])
    assert isinstance(out, np.ndarray) and out.tolist() == [3.0, 6.0, 11.0]


def test_fit_dict_round_trip() -> None:
    fits = [
        QuadFit(1e-9, 2e-5, 0.01),
        LinFit(1e-7, 0.02),
        PiecewiseLinFit(1e-7, 0.02, 3e-7, 2048.0),
        PiecewiseQuadFit(1e-9, 2e-5, 0.01, 1e-6, 512.0),
    ]
    for fit in fits:
        d = json.loads(json.dumps(fit.to_dict()))
        assert d["kind"] == fit.kind
        assert fit_from_dict(d) == fit
        assert type(fit).from_dict(d) == fit
    with pytest.raises(InvalidInputError):
        fit_from_dict({"kind": "cubic"})
    with pytest.raises(InvalidInputError):
        fit_from_dict({"kind": "linear", "p": 1.0})
    with pytest.raises(InvalidInputError):
        LinFit.from_dict(QuadFit(1, 2, 3).to_dict())


def test_mape_and_holdout_split() -> None:
    assert mape([110.0, 90.0], [100.0, 100.0]) == pytest.approx(10.0)
    assert mape(1.0, 1.0) == 0.0
    with pytest.raises(InvalidInputError):
        mape([1.0], [0.0])
    grid = np.arange(10) * 100
    fit_mask, hold_mask = split_holdout(grid, every=3)
    assert grid[hold_mask].tolist() == [100, 400, 700]
    assert not np.any(fit_mask & hold_mask) and np.all(fit_mask | hold_mask)
    assert fit_mask[0] and fit_mask[-1]
    # repeats of the same N stay on one side; order of the input does not matter
    rep = np.concatenate([grid[::-1], grid[[1, 4, 5]]])
    f2, h2 = split_holdout(rep)
    assert sorted(set(rep[h2].tolist())) == [100, 400, 700]
    assert not set(rep[h2].tolist()) & set(rep[f2].tolist())
    assert split_holdout(grid)[1].tolist() == hold_mask.tolist()  # deterministic


def test_select_model_prefers_paper_form() -> None:
    n = np.arange(0, 16385, 512, dtype=float)
    fit_mask, hold_mask = split_holdout(n)
    # Pure linear data: the piecewise fit is no better, so the paper form is kept.
    t_lin = _noisy(3e-7 * n + 0.01, seed=4)
    cands = [fit_decode(n[fit_mask], t_lin[fit_mask]), fit_decode_piecewise(n[fit_mask], t_lin[fit_mask])]
    assert select_model(cands, n[hold_mask], t_lin[hold_mask]).kind == "linear"
    # Planted knot: the piecewise fit is much better and wins.
    t_pw = _noisy(2e-7 * n + 0.01 + 8e-7 * np.maximum(0, n - 6000), seed=5)
    cands = [fit_decode(n[fit_mask], t_pw[fit_mask]), fit_decode_piecewise(n[fit_mask], t_pw[fit_mask])]
    assert select_model(cands, n[hold_mask], t_pw[hold_mask]).kind == "piecewise_linear"
    # Within 10 %: paper form kept even if slightly worse.
    paper, other = LinFit(1.0, 0.0), LinFit(1.0, 0.0)
    better = PiecewiseLinFit(1.0, 0.0, 0.0, 0.0)
    assert select_model([paper, better], [1.0, 2.0], [1.05, 2.1]) is paper
    assert select_model([other], [1.0], [1.0]) is other
    with pytest.raises(InvalidInputError):
        select_model([], [1.0], [1.0])


def test_recalibrator() -> None:
    rec = OnlineRecalibrator()
    for i in range(3):
        rec.observe_step(100 + i, measured_s=0.02, predicted_s=0.01)
    assert rec.scale("step") == 1.0  # fewer than min_obs
    rec.observe_step(103, measured_s=0.02, predicted_s=0.01)
    assert rec.scale("step") == pytest.approx(2.0)
    assert rec.scale("prefill") == 1.0  # kinds are independent
    # robust to a spike
    rec.observe_step(104, measured_s=5.0, predicted_s=0.01)
    assert rec.scale("step") == pytest.approx(2.0)
    # bounded window: old observations age out
    for i in range(64):
        rec.observe_prefill(1000 + i, measured_s=0.5, predicted_s=1.0)
    assert rec.count("step") == 0 and rec.scale("prefill") == pytest.approx(0.5)
    # clipping and ignoring garbage
    rec2 = OnlineRecalibrator(min_obs=1)
    rec2.observe_prefill(10, measured_s=100.0, predicted_s=1.0)
    rec2.observe_prefill(10, measured_s=0.0, predicted_s=1.0)
    rec2.observe_prefill(10, measured_s=float("nan"), predicted_s=1.0)
    assert rec2.count("prefill") == 1 and rec2.scale("prefill") == 4.0
    with pytest.raises(InvalidInputError):
        rec2.scale("decode")


def test_execution_time_estimator_implements_time_model() -> None:
    """The facade and bench call the estimator through TimeModel: every member exists, same signature."""
    members = [name for name, value in vars(TimeModel).items() if callable(value) and not name.startswith("_")]
    assert set(members) >= {"coefficients", "prefill_s", "step_s", "decode_phase_s", "evict_s", "setup_s", "e2e_s"}
    assert "observe" in members
    for name in members:
        assert hasattr(ExecutionTimeEstimator, name), f"ExecutionTimeEstimator lost {name}()"
        assert inspect.signature(getattr(ExecutionTimeEstimator, name)) == inspect.signature(getattr(TimeModel, name))
    estimator = ExecutionTimeEstimator(QuadFit(a=1e-8, b=1e-4, c=1e-3), LinFit(p=1e-6, q=1e-2))
    assert isinstance(estimator, TimeModel)


# ---------------------------------------------------------------- FLOPs


def test_model_shape_from_config() -> None:
    shape = ModelShape.from_config(SMOLLM2_135M)
    assert shape.num_kv_heads == 3 and shape.head_dim == 64

    class Cfg:
        num_hidden_layers = 2
        hidden_size = 128
        intermediate_size = 256
        num_attention_heads = 4
        num_key_value_heads = None
        head_dim = None
        vocab_size = 1000

    s2 = ModelShape.from_config(Cfg())
    assert s2.head_dim == 32 and s2.num_kv_heads == 4
    assert ModelShape.from_config({"text_config": SMOLLM2_135M}) == shape
    with pytest.raises(InvalidInputError):
        ModelShape.from_config({"hidden_size": 10})


def test_flops_shapes_match_coefficients() -> None:
    shape = ModelShape.from_config(SMOLLM2_135M)
    k = flops_coefficients(shape)
    for n in (1, 2, 17, 1000, 32768):
        assert prefill_flops(shape, n).total == k["a"] * n * n + k["b"] * n + k["c"]
    for n in (0, 1, 17, 1000, 32768):
        assert decode_step_flops(shape, n).total == k["p"] * n + k["q"]
    # decode linear in n_kv: constant first difference; prefill quadratic: constant second difference
    d = [decode_step_flops(shape, n).total for n in range(0, 50, 7)]
    assert len(set(np.diff(d).tolist())) == 1
    pf = [prefill_flops(shape, n).total for n in range(1, 100, 9)]
    assert len(set(np.diff(pf, 2).tolist())) == 1
    assert prefill_flops(shape, 0).total == 0
    with pytest.raises(InvalidInputError):
        decode_step_flops(shape, -1)


def test_smollm2_flops_split() -> None:
    shape = ModelShape.from_config(SMOLLM2_135M)
    L, h, i, H, Hkv, d, V = 30, 576, 1536, 9, 3, 64, 49152
    layer_params = h * H * d + 2 * h * Hkv * d + H * d * h + 3 * h * i
    lm_head_params = h * V
    params = L * layer_params + lm_head_params
    assert shape.matmul_params() == params
    assert params == pytest.approx(134.5e6, rel=0.001)

    dc = decode_step_flops(shape, 0)
    assert dc.attention_proj == 2 * L * (h * H * d + 2 * h * Hkv * d + H * d * h)
    assert dc.ffn == 2 * L * 3 * h * i
    assert dc.lm_head == 2 * lm_head_params
    assert dc.attention_scores == 4 * L * H * d  # the new token attends to itself
    assert dc.attention_proj + dc.ffn + dc.lm_head == 2 * params
    assert dc.total == pytest.approx(0.27e9, rel=0.01)

    n = 1024
    pf = prefill_flops(shape, n)
    assert pf.attention_scores == 4 * L * H * d * n * n
    assert pf.attention_proj + pf.ffn == 2 * n * L * layer_params
    assert pf.lm_head == 2 * lm_head_params  # one token: logits_to_keep=1

    table = format_flops_table(shape, [128, 1024])
    assert "1024" in table and "coefficients" in table


# ---------------------------------------------------------------- profile store


def _key(**overrides: object) -> ProfileKey:
    key = ProfileKey.current(
        model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        model_sha="abc123",
        dtype="float32",
        threads=2,
        press="snapkv",
        device="cpu:Test CPU",
    )
    return replace(key, **overrides)  # type: ignore[arg-type]


def _profile(key: ProfileKey) -> Profile:
    return Profile(
        key=key,
        prefill=QuadFit(1e-9, 2e-5, 0.01).to_dict(),
        decode=LinFit(1e-7, 0.02).to_dict(),
        eviction=LinFit(1e-6, 0.001).to_dict(),
        measurements={"prefill": [[128, 0.02], [256, 0.03]], "decode": [[0, 0.02]]},
        noise={"prefill_cv": 0.004},
    )


def test_key_current_fills_environment() -> None:
    key = _key()
    assert set(key.versions) == {"torch", "transformers", "kvpress", "timebill"}
    assert key.versions["torch"] != "absent"
    assert "cores=" in key.host and "ram_gib=" in key.host
    assert "/" not in key.slug()
    # one file per setup: every hard field except the weights fingerprint is in the name
    changes = ({"threads": 8}, {"dtype": "bfloat16"}, {"press": "knorm"}, {"device": "cuda:H100"})
    for change in (*changes, {"decode_path": "fast-int8"}):
        assert _key(**change).slug() != key.slug()
    assert _key(model_sha="other").slug() == key.slug()
    assert _key(versions={"torch": "0"}, host="elsewhere").slug() == key.slug()


def test_profile_round_trip_default_path(tmp_path: Path) -> None:
    prof = _profile(_key())
    path = save_profile(prof)
    assert path == default_profile_path(prof.key)
    assert path.parent == cache_dir() / "profiles"
    assert str(cache_dir()).startswith(str(tmp_path))
    loaded = load_profile(path)
    assert loaded == prof
    assert loaded.prefill_fit() == QuadFit(1e-9, 2e-5, 0.01)
    assert loaded.decode_fit() == LinFit(1e-7, 0.02)
    assert loaded.eviction_fit() == LinFit(1e-6, 0.001)
    assert find_profile(prof.key) == prof
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp files left


def test_atomic_write_replaces_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "p.json"
    save_profile(_profile(_key()), target)
    save_profile(_profile(_key(threads=4)), target)
    assert load_profile(target).key.threads == 4
    assert [p.name for p in target.parent.iterdir()] == ["p.json"]
    # a failed serialisation leaves the old file intact and no temp file behind
    bad = _profile(_key())
    bad.noise["x"] = math.nan
    with pytest.raises(ProfileError):
        save_profile(bad, target)
    assert load_profile(target).key.threads == 4
    assert [p.name for p in target.parent.iterdir()] == ["p.json"]


def test_load_profile_errors(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="no estimator profile"):
        load_profile(tmp_path / "missing.json")
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"schema_version": 1, "key": ')
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_profile(corrupt)
    good = _profile(_key()).to_dict()
    cases = {
        "schema version": {**good, "schema_version": 99},
        "lacks field": {k: v for k, v in good.items() if k != "decode"},
        "threads": {**good, "key": {**good["key"], "threads": "two"}},
        "not a valid fit": {**good, "prefill": {"kind": "quad", "a": 1.0}},
    }
    for match, data in cases.items():
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(data))
        with pytest.raises(ProfileError, match=match):
            load_profile(path)


def test_find_profile_mismatch(caplog: pytest.LogCaptureFixture) -> None:
    assert find_profile(_key()) is None  # nothing saved yet
    save_profile(_profile(_key(model_sha="abc123")))
    now = _key(model_sha="def456")  # same model id, new weights: same file, stale contents
    assert check_key(load_profile(default_profile_path(now)), now) == ["model_sha: profile abc123, now def456"]
    with pytest.raises(ProfileError, match=r"stale profile: model_sha: profile abc123, now def456"):
        find_profile(now)
    # another setup has its own file: not stale, just not profiled yet
    assert find_profile(_key(threads=1)) is None
    # an explicit path is checked against the whole key
    with pytest.raises(ProfileError, match="dtype"):
        find_profile(_key(dtype="bfloat16"), default_profile_path(_key()))
    # library version drift only warns
    drift = _key(versions={**_key().versions, "torch": "0.0.1"})
    with caplog.at_level(logging.WARNING, logger="timebill.estimator.store"):
        assert find_profile(drift) is not None
    assert any("versions.torch" in r.getMessage() for r in caplog.records)


def test_cpu_profile_key_tells_apart_generations_that_share_a_name() -> None:
    from timebill.estimator.store import cpu_signature, device_string

    # The key names the CPU by its signature (family/model/stepping on x86), not the bare marketing name.
    assert device_string("cpu") == f"cpu:{cpu_signature()}"
    assert (
        cpu_signature()
        in ProfileKey.current(
            model_id="m", model_sha="s", dtype="float32", threads=2, press="snapkv", device="cpu"
        ).host
    )
    # Two VMs both called "AMD EPYC" but two generations apart: the other's profile is refused by path.
    zen1 = _key(device="cpu:AMD EPYC (cpu family 23, model 1, stepping 2)")
    zen5 = _key(device="cpu:AMD EPYC (cpu family 26, model 2, stepping 1)")
    assert zen1.slug() != zen5.slug()
    save_profile(_profile(zen1))
    assert find_profile(zen5) is None
    with pytest.raises(ProfileError, match="device"):
        find_profile(zen5, default_profile_path(zen1))
