"""Tests of fusion.experiments.train and the benchmarks/train_zoo.py script."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fusion.experiments.data import calibration_subset, load_digits
from fusion.experiments.evaluate import evaluate_loss_and_accuracy
from fusion.experiments.train import (
    RESNET_RECIPE,
    VIT_RECIPE,
    TrainingDivergedError,
    augment_batch,
    get_recipe,
    recipe_for_arch,
    train_model,
)

REPO = Path(__file__).resolve().parents[1]


def _tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


SMALL_SGD = {"base": "resnet", "batch_size": 32, "lr": 0.05, "max_shift": 1}


def test_recipes_match_readme() -> None:
    """The recipe README.md documents is the one the code trains with (numbers read from README)."""
    import re
    from pathlib import Path

    from fusion.experiments.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD

    text = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    section = text[text.index("## Training recipe"):]
    section = " ".join(section[:section.index("\n## ", 5)].split())

    def number(pattern: str) -> float:
        m = re.search(pattern, section)
        assert m, pattern
        return float(m.group(1))

    assert number(r"mean (\d\.\d+)") == FASHION_MNIST_MEAN and number(r"std (\d\.\d+)") == FASHION_MNIST_STD
    for recipe in (RESNET_RECIPE, VIT_RECIPE):
        assert number(r"batch (\d+)") == recipe.batch_size
        assert number(r"shifts of up to (\d+) pixels") == recipe.max_shift and recipe.flip
        assert number(r"(\d+)% warm-up") / 100 == recipe.warmup_fraction
    resnets, vits = section.split("ResNets:")[1].split("ViTs:")
    assert RESNET_RECIPE.optimizer == "sgd" and "SGD" in resnets and RESNET_RECIPE.nesterov
    assert float(re.search(r"momentum (\d\.\d+)", resnets).group(1)) == RESNET_RECIPE.momentum
    assert float(re.search(r"peak learning rate ([\d.e-]+)", resnets).group(1)) == RESNET_RECIPE.lr
    assert float(re.search(r"weight decay ([\d.e-]+\d)", resnets).group(1)) == RESNET_RECIPE.weight_decay
    assert VIT_RECIPE.optimizer == "adamw" and "AdamW" in vits
    assert float(re.search(r"peak learning rate ([\d.e-]+\d)", vits).group(1)) == VIT_RECIPE.lr
    assert float(re.search(r"weight decay ([\d.e-]+\d)", vits).group(1)) == VIT_RECIPE.weight_decay
    assert float(re.search(r"label smoothing ([\d.]+\d)", vits).group(1)) == VIT_RECIPE.label_smoothing
    assert recipe_for_arch({"name": "vit_tiny_patch16_224"}) is VIT_RECIPE
    assert recipe_for_arch({"name": "resnet18"}) is RESNET_RECIPE


def test_get_recipe() -> None:
    assert get_recipe("vit") is VIT_RECIPE
    custom = get_recipe({"base": "resnet", "batch_size": 8})
    assert custom.batch_size == 8 and custom.lr == 0.1
    with pytest.raises(ValueError, match="Unknown recipe 'cnn'"):
        get_recipe("cnn")
    with pytest.raises(ValueError, match=r"Unknown recipe fields \['lr_max'\]"):
        get_recipe({"lr_max": 1.0})
    with pytest.raises(ValueError, match="optimizer"):
        get_recipe({"optimizer": "lamb", "lr": 1.0, "weight_decay": 0.0})


def test_augment_batch_flip_and_roll() -> None:
    x = torch.randn(64, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    original = x.clone()
    flipped = augment_batch(x, torch.Generator().manual_seed(1), flip=True, max_shift=0)
    assert torch.equal(x, original)  # input untouched
    same = [torch.equal(a, b) for a, b in zip(flipped, x)]
    mirrored = [torch.equal(a, b.flip(-1)) for a, b in zip(flipped, x)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 10 < sum(mirrored) < 54

    shifted = augment_batch(x, torch.Generator().manual_seed(2), flip=False, max_shift=2)
    found = set()
    for a, b in zip(shifted, x):
        matches = [
            (dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if torch.equal(a, torch.roll(b, (dy, dx), dims=(-2, -1)))
        ]
        assert matches, "every image must be a roll of its input by at most 2 pixels"
        found.add(matches[0])
    assert len(found) > 5


def test_train_model_learns_and_is_deterministic() -> None:
    data = calibration_subset(load_digits("train"), 256, seed=0)
    model = _tiny_cnn()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    before = evaluate_loss_and_accuracy(model, data)["loss"]
    result = train_model(model, data, SMALL_SGD, epochs=3, seed=0, progress=False)
    after = evaluate_loss_and_accuracy(model, data)["loss"]
    assert result.steps == 3 * 8 and len(result.epoch_loss) == 3
    assert result.epoch_loss[-1] < result.epoch_loss[0]
    assert after < before
    assert not model.training
    assert not torch.equal(start["0.weight"], model.state_dict()["0.weight"])

    twin = _tiny_cnn()
    train_model(twin, data, SMALL_SGD, epochs=3, seed=0, progress=False)
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in model.state_dict().items())


def test_train_model_adamw_and_lone_last_example() -> None:
    data = calibration_subset(load_digits("train"), 65, seed=1)  # 2 batches of 32 + 1 -> folded
    model = _tiny_cnn(1)
    result = train_model(model, data, {"base": "vit", "batch_size": 32}, epochs=1, seed=0, progress=False)
    assert result.steps == 2


def test_train_model_errors() -> None:
    data = TensorDataset(torch.full((4, 1, 8, 8), float("nan")), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TrainingDivergedError, match="epoch 0, step 0"):
        train_model(_tiny_cnn(), data, SMALL_SGD, epochs=1, seed=0, progress=False)
    with pytest.raises(ValueError, match="epochs must be positive"):
        train_model(_tiny_cnn(), data, SMALL_SGD, epochs=0, seed=0, progress=False)


# --------------------------------------------------------------------------- benchmarks/train_zoo.py


def _train_zoo_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_zoo", REPO / "benchmarks" / "train_zoo.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_default_spec_matches_reference_zoo() -> None:
    env = os.environ.get("FUSION_ZOO")
    zoo = Path(env) if env else REPO.parent / "shared" / "zoo"
    if not (zoo / "manifest.json").is_file():
        pytest.skip("model zoo not available (set FUSION_ZOO)")
    manifest = json.loads((zoo / "manifest.json").read_text())
    spec = _train_zoo_script().DEFAULT_SPEC
    assert sorted(spec) == sorted(manifest)
    for name, entry in manifest.items():
        assert spec[name]["arch"] == entry["arch"], name
        assert spec[name]["classes"] == entry["classes"], name
        assert (spec[name]["seed"], spec[name]["epochs"]) == (entry["seed"], entry["epochs"]), name


@pytest.mark.slow
def test_train_zoo_smoke(tmp_path: Path) -> None:
    from fusion.experiments.data import DatasetNotFoundError, find_fashion_mnist
    from fusion.experiments.zoo import load_manifest, load_model

    try:
        find_fashion_mnist("train")
    except DatasetNotFoundError:
        pytest.skip("Fashion-MNIST not installed")
    script = _train_zoo_script()
    out = tmp_path / "zoo"
    rc = script.main(["--out", str(out), "--only", "r18w16-s2", "--epochs", "1", "--limit-train", "300", "--no-progress"])
    assert rc == 0
    entry = load_manifest(out)["r18w16-s2"]
    assert entry.epochs == 1 and entry.extra["limit_train"] == 300
    assert 0.0 <= entry.test_accuracy <= 1.0
    model, _ = load_model("r18w16-s2", out)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
