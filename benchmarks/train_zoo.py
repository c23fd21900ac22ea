"""Retrain the Fashion-MNIST model zoo with its documented recipe.

Writes ``<out>/<name>.safetensors`` and ``<out>/manifest.json`` (entries are added
to or replace those of an existing manifest in ``--out``). The default spec below
mirrors the reference zoo: names, architectures, classes, seeds and epochs.

Recipe (``fusion.experiments.train``): inputs scaled to [0, 1] and normalised (mean 0.2860, std
0.3530); batch 256; random horizontal flip and random shift of up to 2 pixels via
``torch.roll``; ResNets: SGD Nesterov, momentum 0.9, weight decay 5e-4, one-cycle
learning rate peaking at 0.1 with 20% warm-up; ViTs: AdamW, weight decay 0.05,
one-cycle peaking at 2e-3, label smoothing 0.1. Seeds via ``torch.manual_seed`` and
``numpy.random.seed``.

Examples::

    python benchmarks/train_zoo.py --out runs/zoo                        # everything (hours on 2 cores)
    python benchmarks/train_zoo.py --out runs/zoo --only vit64-s2
    python benchmarks/train_zoo.py --out /tmp/smoke --only r18w16-s2 --epochs 1 --limit-train 512
    python benchmarks/train_zoo.py --out runs/zoo3 --only r18w32-T1-s6 --only r18w32-T2-s7 --only r18w32-T3-s8 \
        --only r18w32-s9
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any, Sequence

try:
    import fusion  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from fusion.experiments.data import calibration_subset, load_fashion_mnist
from fusion.experiments.evaluate import accuracy
from fusion.experiments.train import recipe_for_arch, train_model
from fusion.experiments.zoo import ZooEntry, write_manifest
from fusion.io import build_model, save_weights

_ALL = list(range(10))
_A = [0, 1, 2, 3, 4]
_B = [5, 6, 7, 8, 9]


def _resnet(width: int) -> dict[str, Any]:
    return {
        "library": "timm",
        "name": "resnet18",
        "kwargs": {"channels": [width, 2 * width, 4 * width, 8 * width], "in_chans": 1, "stem_width": width},
    }


def _vit(dim: int) -> dict[str, Any]:
    return {
        "library": "timm",
        "name": "vit_tiny_patch16_224",
        "kwargs": {"depth": 6, "embed_dim": dim, "img_size": 28, "in_chans": 1, "num_heads": 4, "patch_size": 7},
    }


DEFAULT_SPEC: dict[str, dict[str, Any]] = {
    "r18w16-s2": {"arch": _resnet(16), "classes": _ALL, "seed": 2, "epochs": 8},
    "r18w32-A-s4": {"arch": _resnet(32), "classes": _A, "seed": 4, "epochs": 8},
    "r18w32-B-s5": {"arch": _resnet(32), "classes": _B, "seed": 5, "epochs": 8},
    "r18w32-s0": {"arch": _resnet(32), "classes": _ALL, "seed": 0, "epochs": 8},
    "r18w32-s1": {"arch": _resnet(32), "classes": _ALL, "seed": 1, "epochs": 8},
    "r18w64-s3": {"arch": _resnet(64), "classes": _ALL, "seed": 3, "epochs": 8},
    "vit128-A-s4": {"arch": _vit(128), "classes": _A, "seed": 4, "epochs": 15},
    "vit128-B-s5": {"arch": _vit(128), "classes": _B, "seed": 5, "epochs": 15},
    "vit128-s0": {"arch": _vit(128), "classes": _ALL, "seed": 0, "epochs": 15},
    "vit128-s1": {"arch": _vit(128), "classes": _ALL, "seed": 1, "epochs": 15},
    "vit64-s2": {"arch": _vit(64), "classes": _ALL, "seed": 2, "epochs": 15},
}
"""Names, architectures, classes (head order), seeds and epochs of the reference zoo."""

EXTRA_SPEC: dict[str, dict[str, Any]] = {
    "r18w32-T1-s6": {"arch": _resnet(32), "classes": [0, 1, 2], "seed": 6, "epochs": 8},
    "r18w32-T2-s7": {"arch": _resnet(32), "classes": [3, 4, 5], "seed": 7, "epochs": 8},
    "r18w32-T3-s8": {"arch": _resnet(32), "classes": [6, 7, 8, 9], "seed": 8, "epochs": 8},
    "r18w32-s9": {"arch": _resnet(32), "classes": _ALL, "seed": 9, "epochs": 8},
}
"""Models beyond the reference zoo, for zipping more than two models: a three-task split (classes
0-2, 3-5, 6-9) and a fourth same-task r18w32 (``--only r18w32-T1-s6`` etc.)."""


def train_entry(
    name: str,
    spec: dict[str, Any],
    out: Path,
    epochs: int | None = None,
    limit_train: int | None = None,
    data_root: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> ZooEntry:
    """Trains one zoo model and writes ``<out>/<name>.safetensors``.

    Args:
        name: Model name.
        spec: ``{"arch", "classes", "seed", "epochs"}``.
        out: Output zoo folder.
        epochs: Override of the spec's epochs.
        limit_train: Train on a seeded random subset of this many images (smoke runs).
        data_root: Fashion-MNIST folder.
        device: Training device (default CPU).
        progress: Show progress bars.

    Returns:
        The manifest entry (with measured ``test_accuracy`` and ``train_seconds``).
    """
    classes = list(spec["classes"])
    seed = int(spec["seed"])
    n_epochs = int(epochs if epochs is not None else spec["epochs"])
    train = load_fashion_mnist("train", root=data_root, classes=classes, remap=True)
    if limit_train is not None and limit_train < len(train):
        train = calibration_subset(train, limit_train, seed=seed)
    test = load_fashion_mnist("test", root=data_root, classes=classes, remap=True)

    torch.manual_seed(seed)
    np.random.seed(seed)
    model = build_model(spec["arch"], len(classes))
    recipe = recipe_for_arch(spec["arch"])
    result = train_model(model, train, recipe, n_epochs, seed, device=device, progress=progress)
    test_acc = accuracy(model, test)
    save_weights(model.cpu(), out / f"{name}.safetensors", overwrite=True)  # (retraining replaces an entry)
    extra: dict[str, Any] = {"train_seconds": round(result.seconds)}
    if limit_train is not None:
        extra["limit_train"] = int(limit_train)
    return ZooEntry(
        name=name,
        library=spec["arch"]["library"],
        arch_name=spec["arch"]["name"],
        kwargs=copy.deepcopy(spec["arch"].get("kwargs", {})),
        num_classes=len(classes),
        classes=classes,
        seed=seed,
        epochs=n_epochs,
        test_accuracy=round(test_acc, 4),
        weights=out / f"{name}.safetensors",
        extra=extra,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        Process exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output zoo folder")
    parser.add_argument("--only", action="append", default=None, metavar="NAME", help="train only NAME (repeatable)")
    parser.add_argument("--epochs", type=int, default=None, help="override every entry's epochs")
    parser.add_argument("--limit-train", type=int, default=None, metavar="N", help="train on N random images (smoke run)")
    parser.add_argument("--data-root", default=None, help="Fashion-MNIST folder")
    parser.add_argument("--device", default=None, help="training device, e.g. cpu or cuda")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)

    specs = {**DEFAULT_SPEC, **EXTRA_SPEC}
    names = args.only or list(DEFAULT_SPEC)
    unknown = [n for n in names if n not in specs]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(specs)}")
    if args.epochs is not None and args.epochs <= 0:
        parser.error("--epochs must be positive")
    if args.limit_train is not None and args.limit_train <= 0:
        parser.error("--limit-train must be positive")

    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        start = time.perf_counter()
        entry = train_entry(
            name,
            specs[name],
            args.out,
            epochs=args.epochs,
            limit_train=args.limit_train,
            data_root=args.data_root,
            device=args.device,
            progress=not args.no_progress,
        )
        write_manifest(args.out, {name: entry})
        print(
            f"{name}: test accuracy {entry.test_accuracy:.4f} after {entry.epochs} epochs "
            f"({time.perf_counter() - start:.0f}s) -> {entry.weights}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
