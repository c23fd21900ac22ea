"""Shared fixtures: tiny random-init models, built once per session."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests import tiny_models


def _zoo_dir() -> Path | None:
    import os

    env = os.environ.get("FUSION_ZOO")
    cands = [Path(env)] if env else []
    cands.append(Path(__file__).resolve().parents[1].parent / "shared" / "zoo")
    for c in cands:
        if (c / "manifest.json").exists():
            return c
    return None


@pytest.fixture(scope="session")
def zoo_dir() -> Path:
    """The shared model zoo (skips the test when it is not on this machine)."""
    z = _zoo_dir()
    if z is None:
        pytest.skip("no model zoo here (set FUSION_ZOO)")
    return z


_CACHE: dict[str, tuple] = {}


@pytest.fixture
def tiny(request):
    """``tiny(name)`` -> (fresh copy of a randomised tiny model, example input)."""

    def get(name: str):
        if name not in _CACHE:
            _CACHE[name] = tiny_models.build(name)
        m, x = _CACHE[name]
        return copy.deepcopy(m), x.clone()

    return get


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||a||."""
    return float((a - b).norm() / a.norm())
