"""Shared fixtures: one real default model per test session (loading it twice would double the cost)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def engine():
    from timebill.engine import Engine

    torch.manual_seed(0)
    return Engine.load(None, threads=2)


@pytest.fixture(scope="session")
def estimator(engine):
    """A real profile of this machine, small grid (seconds), as the facade's time model."""
    from timebill.estimator import ExecutionTimeEstimator, profile_engine
    from timebill.estimator.profiler import ProfileGrid

    grid = ProfileGrid(
        name="test",
        prefill_n=(16, 64, 128, 256, 512, 1024, 1536),
        decode_n_kv=(16, 128, 512, 1536),
        evict_alphas=(0.5,),
        repeats=1,
        decode_repeats=1,
        steps_per_sample=3,
        max_retries=0,
        max_wait_s=0.0,
    )
    return ExecutionTimeEstimator.from_profile(profile_engine(engine, grid, progress=False))
