"""Shared fixtures: one real default model per test session (loading it twice would double the cost)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def engine():
    from timebill.engine import Engine

    torch.manual_seed(0)
    return Engine.load(None, threads=2)
