"""Tests of the benchmark scripts that need no dataset (benchmarks/wide.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_wide_benchmark_recovers_the_model_from_its_permuted_copy_and_times_every_stage():
    """Property: the wide benchmark's fusion of a model with its permuted copy is the model again
    (so its timings are of a correct fusion) and reports each stage's seconds."""
    wide = _script("wide")
    for method in ("permute", "zip"):
        r = wide.run("vit_tiny_patch16_224", image_size=32, samples=16, seed=0, method=method)
        assert r["error"] < 1e-5, method
        assert {"discover", "collect", "match", "apply"} <= set(r["seconds"])
        assert r["total"] >= r["seconds"]["match"] > 0
