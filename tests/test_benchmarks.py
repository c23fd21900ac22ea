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
    # an independently initialised second model: a real fusion (the fused model is neither model)
    r = wide.run("vit_tiny_patch16_224", image_size=32, samples=16, seed=0, method="zip", pair="independent")
    assert 0.05 < r["error"] < 10
    assert r["total"] >= r["seconds"]["apply"] > 0


def test_architecture_benchmark_passes_a_model_and_reports_a_failing_one(tmp_path, monkeypatch):
    """Property: the coverage table marks a model whose permuted copy fuses back as passing, and a
    model that cannot be built (or fused) as a failure with its exception, without stopping the
    other rows; the exit status says a row failed."""
    arch = _script("architectures")

    def broken():
        raise RuntimeError("no such model")

    deit = next(e for e in arch.ENTRIES if e[0] == "hf:DeiT")
    monkeypatch.setattr(arch, "ENTRIES", [("broken", broken, 32), deit])
    out = tmp_path / "architectures.md"
    assert arch.main(["--out", str(out)]) == 1
    text = out.read_text()
    assert "| broken | 32 | | | | | **RuntimeError**: no such model |" in text
    row = next(line for line in text.splitlines() if line.startswith("| hf:DeiT |"))
    assert row.endswith("| pass |") and "1 of 2 pass." in text
    assert float(row.split("|")[5]) < 1e-4  # the fused model's error


def test_architecture_benchmark_prepares_weights_and_batchnorm_statistics():
    """Property: `prepare` draws every weight matrix at scale 1/sqrt(fan-in) (a zero classifier
    gives zero logits, whose relative errors are 0/0), sets BatchNorm running statistics, and
    leaves vectors (biases) as they are."""
    import torch
    from torch import nn

    arch = _script("architectures")
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.Flatten(), nn.LazyLinear(5))
    model(torch.randn(2, 3, 8, 8))
    nn.init.zeros_(model[3].weight)
    nn.init.constant_(model[0].weight, 7.0)
    bias = model[0].bias.detach().clone()
    arch.prepare(model, 8, seed=0)
    assert not model.training and model[3].weight.any()
    assert abs(model[0].weight.std().item() - 27 ** -0.5) < 0.02
    assert torch.equal(model[0].bias, bias)
    assert not torch.equal(model[1].running_var, torch.ones(64))


def test_speed_benchmark_job_passes_its_positions_per_image_to_fuse(monkeypatch):
    """Property: a speed job's fourth field (``a,b:method:repair:K``) is the fusion's
    ``positions_per_image`` (a subsampled job must time the subsampled statistics) and is named in
    its row; without it, statistics read every position."""
    import torch

    import fusion
    from tests.tiny_models import build

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # (its results_file helper)
    speed = _script("speed")
    seen = []
    real = fusion.fuse

    def spy(*args, **kw):
        seen.append(kw.get("positions_per_image"))
        return real(*args, **kw)
    monkeypatch.setattr(speed.fusion, "fuse", spy)
    a, x = build("cnn", seed=0)
    b, _ = build("cnn", seed=1)
    cal = torch.randn(8, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    row = speed.run_job("a + b", [a, b], cal, None, "permute", "none", 1, "cpu", 2)
    assert seen == [2] and "(positions_per_image=2)" in row
    speed.run_job("a + b", [a, b], cal, None, "permute", "none", 1, "cpu")
    assert seen == [2, None]


def test_resize_survey_reports_a_resized_model_a_refusal_and_a_bug(tmp_path, monkeypatch):
    """Property: the compression table marks a model that resizes as passing with the timm arguments
    that rebuild it, a model the toolkit refuses with its FusionError, and any other exception as a
    failure (exit status 1), without stopping the other rows."""
    survey = _script("resize_survey")
    tiny = {"img_size": 32, "patch_size": 8, "depth": 1}
    monkeypatch.setattr(survey, "MODELS", [("vit_tiny_patch16_224", tiny), ("nest_tiny", {"img_size": 32}),
                                           "no_such_model"])
    out = tmp_path / "survey.md"
    assert survey.main(["--out", str(out)]) == 1
    rows = {line.split(" | ")[0][2:]: line for line in out.read_text().splitlines() if line.startswith("| ")}
    assert " | pass | " in rows["vit_tiny_patch16_224"] and "{'embed_dim': 96}" in rows["vit_tiny_patch16_224"]
    assert "refused: SpaceMismatchError" in rows["nest_tiny"]
    assert "**RuntimeError**" in rows["no_such_model"]
    assert "1 of 3 resize; 1 refused with a FusionError; 1 other failures." in out.read_text()
