"""Tests of fusion.experiments.zoo: the manifest, loading zoo models by name; the real zoo."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fusion.experiments import zoo as fzoo
from fusion.experiments.zoo import (
    ModelNotInZooError,
    ZooEntry,
    ZooNotFoundError,
    find_zoo,
    load_manifest,
    load_model,
    write_manifest,
)
from fusion.io import CheckpointMismatchError, CheckpointNotFoundError, build_model, save_weights
from tests.test_io import TINY_RESNET, TINY_VIT, _logits, _x

def shared_zoo() -> Path | None:
    """The real zoo: $FUSION_ZOO or <repo>/../shared/zoo, if present."""
    env = os.environ.get("FUSION_ZOO")
    path = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "zoo"
    return path if (path / "manifest.json").is_file() else None


# --------------------------------------------------------------------------- find_zoo / manifest


def test_find_zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FUSION_ZOO", raising=False)
    with pytest.raises(ZooNotFoundError, match="FUSION_ZOO"):
        find_zoo()
    monkeypatch.setenv("FUSION_ZOO", str(tmp_path))
    with pytest.raises(ZooNotFoundError, match="manifest.json"):
        find_zoo()
    (tmp_path / "manifest.json").write_text("{}")
    assert find_zoo() == tmp_path.resolve()
    assert find_zoo(tmp_path) == tmp_path.resolve()


def _make_zoo(folder: Path) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(TINY_RESNET, 5)
    save_weights(model, folder / "tiny-B.safetensors")
    entry = {
        "arch": TINY_RESNET,
        "num_classes": 5,
        "classes": [5, 6, 7, 8, 9],
        "seed": 3,
        "epochs": 1,
        "test_accuracy": 0.5,
        "train_seconds": 12,
    }
    write_manifest(folder, {"tiny-B": entry})
    return model


def test_manifest_and_load_model_roundtrip(tmp_path: Path) -> None:
    model = _make_zoo(tmp_path)
    manifest = load_manifest(tmp_path)
    entry = manifest["tiny-B"]
    assert entry.classes == [5, 6, 7, 8, 9] and entry.num_classes == 5
    assert entry.arch == TINY_RESNET and entry.seed == 3 and entry.test_accuracy == 0.5
    assert entry.extra == {"train_seconds": 12}
    assert entry.weights == tmp_path.resolve() / "tiny-B.safetensors"
    assert entry.to_dict() == json.loads((tmp_path / "manifest.json").read_text())["tiny-B"]

    loaded, same = load_model("tiny-B", tmp_path)
    assert same == entry and not loaded.training
    x = _x()
    assert torch.equal(_logits(loaded, x), _logits(model, x))
    loaded2, _ = load_model(entry)
    assert torch.equal(_logits(loaded2, x), _logits(model, x))

    with pytest.raises(ModelNotInZooError) as info:
        load_model("nope", tmp_path)
    assert "'nope'" in str(info.value) and "tiny-B" in str(info.value)


def test_write_manifest_merges(tmp_path: Path) -> None:
    _make_zoo(tmp_path)
    write_manifest(tmp_path, {"other": {"arch": TINY_VIT, "num_classes": 2, "classes": [0, 1]}})
    assert sorted(load_manifest(tmp_path)) == ["other", "tiny-B"]


def test_manifest_errors(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"m": {"arch": TINY_RESNET, "num_classes": 3, "classes": [0, 1]}}))
    with pytest.raises(fzoo.ManifestError, match="'m'.*2 classes.*num_classes is 3"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"m": {"num_classes": 3}}))
    with pytest.raises(fzoo.ManifestError, match="'arch'"):
        load_manifest(tmp_path)


def test_checkpoint_mismatch_names_keys(tmp_path: Path) -> None:
    model = _make_zoo(tmp_path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    del state["fc.weight"]
    state["extra.bias"] = torch.zeros(2)
    save_file(state, str(tmp_path / "tiny-B.safetensors"))
    with pytest.raises(CheckpointMismatchError) as info:
        load_model("tiny-B", tmp_path)
    message = str(info.value)
    assert "missing keys (1): fc.weight" in message and "unexpected keys (1): extra.bias" in message

    save_weights(build_model(TINY_RESNET, 7), tmp_path / "tiny-B.safetensors", overwrite=True)
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatches \(2\): fc.weight: checkpoint \(7, 8\) vs model \(5, 8\)"):
        load_model("tiny-B", tmp_path)

    (tmp_path / "tiny-B.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match="tiny-B"):
        load_model("tiny-B", tmp_path)


# --------------------------------------------------------------------------- real zoo


def test_real_zoo_manifest() -> None:
    zoo = shared_zoo()
    if zoo is None:
        pytest.skip("model zoo not available (set FUSION_ZOO)")
    manifest = load_manifest(zoo)
    assert len(manifest) >= 11
    assert manifest["r18w32-A-s4"].classes == [0, 1, 2, 3, 4]
    assert manifest["vit128-B-s5"].classes == [5, 6, 7, 8, 9]
    assert all(isinstance(e, ZooEntry) and e.weights.is_file() for e in manifest.values())


def test_real_zoo_checkpoint_accuracy() -> None:
    zoo = shared_zoo()
    if zoo is None:
        pytest.skip("model zoo not available (set FUSION_ZOO)")
    from fusion.experiments.data import DatasetNotFoundError, load_fashion_mnist
    from fusion.experiments.evaluate import accuracy

    try:
        test = load_fashion_mnist("test")
    except DatasetNotFoundError:
        pytest.skip("Fashion-MNIST not installed")
    model, entry = load_model("r18w16-s2", zoo)
    subset = torch.utils.data.TensorDataset(test.tensors[0][:1000], test.tensors[1][:1000])
    acc = accuracy(model, subset)
    assert acc > 0.87, acc
    assert abs(acc - entry.test_accuracy) < 0.03


@pytest.mark.slow
def test_real_zoo_every_checkpoint_reproduces() -> None:
    zoo = shared_zoo()
    if zoo is None:
        pytest.skip("model zoo not available (set FUSION_ZOO)")
    from fusion.experiments.data import load_fashion_mnist
    from fusion.experiments.evaluate import accuracy

    for name, entry in load_manifest(zoo).items():
        model, _ = load_model(entry)
        acc = accuracy(model, load_fashion_mnist("test", classes=entry.classes))
        assert abs(100 * (acc - entry.test_accuracy)) <= 0.1, (name, acc, entry.test_accuracy)
