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


@pytest.fixture(scope="session")
def trained_pair():
    """Two small timm ResNets trained briefly from different seeds (the project's recipe, a few
    thousand Fashion-MNIST images, or scikit-learn's digits when Fashion-MNIST is not installed):
    a trained zoo that CI builds in seconds. Returns ``(models, calibration, test)``."""
    import timm

    from fusion.experiments.data import DatasetNotFoundError, calibration_subset, load_digits, load_fashion_mnist
    from fusion.experiments.train import train_model

    try:
        train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
        n_train = 4000
    except DatasetNotFoundError:
        train, test = load_digits("train"), load_digits("test")
        n_train = len(train)
    subset = calibration_subset(train, n_train, seed=123)
    # two short epochs with small batches: about 80% test accuracy in about 20 s on 2 CPU cores
    recipe = {"optimizer": "sgd", "lr": 0.05, "weight_decay": 5e-4, "batch_size": 64, "flip": False, "max_shift": 0}
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1,
                              channels=(8, 16, 32, 64), stem_width=8)
        train_model(m, subset, recipe, epochs=2, seed=seed, progress=False)
        models.append(m.eval())
    cal = calibration_subset(train, 500, seed=7)
    test = calibration_subset(test, 1000, seed=0)
    return models, cal, test


def pytest_configure(config):
    """Under pytest-xdist (``-n auto``), each worker gets its share of the cores for torch's
    intra-op threads: N workers of as many threads as cores each oversubscribe the machine (the
    default suite took 535 s with ``-n 2`` at two threads per worker on 2 cores, 190 s at one).
    A run without workers keeps torch's default."""
    import os

    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if os.environ.get("PYTEST_XDIST_WORKER") and workers:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // int(workers)))


def pytest_collection_modifyitems(config, items):
    """Tests on the trained zoo (the ``zoo_dir`` fixture) are slow: they load checkpoints and
    evaluate on thousands of images; CI runs the session's tiny trained pair instead."""
    for item in items:
        if "zoo_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
