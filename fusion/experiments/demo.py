"""``fusion demo``: fuse two real trained models on a fresh machine, with nothing to download.

The demo gets data (Fashion-MNIST from ``$FUSION_DATA_DIR``, the Debian package's folder, or
torchvision's downloader when asked and the network allows; otherwise scikit-learn's bundled digits,
said in the output), trains two small models from different seeds with the project's recipe
(:mod:`fusion.experiments.train`; cached in the user's cache folder, so a second run starts at
once), fuses them with the main methods and prints one table: each source model, their ensemble,
naive averaging and each method, with accuracy and seconds. It writes the table as JSON and the
interpolation curves (accuracy and loss along the weights, with their barriers) next to it, in a
fresh folder that it never overwrites.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from alignment.errors import FusionError

__all__ = ["DemoError", "DEMO_ARCHS", "DEMO_RUNS", "DemoRow", "demo_data", "cache_dir", "check_cache_folder",
           "fresh_folder", "run_demo", "format_table"]


class DemoError(FusionError, ValueError):
    """A demo setting that cannot be used (an unknown architecture, an output folder in use)."""


def _arch(kind: str, image_size: int) -> dict[str, Any]:
    if kind == "resnet":
        return {"library": "timm", "name": "resnet18",
                "kwargs": {"channels": [16, 32, 64, 128], "in_chans": 1, "stem_width": 16}}
    patch = 7 if image_size % 7 == 0 else 2
    return {"library": "timm", "name": "vit_tiny_patch16_224",
            "kwargs": {"depth": 4, "embed_dim": 64, "img_size": image_size, "in_chans": 1, "num_heads": 4,
                       "patch_size": patch}}


DEMO_RUNS: dict[str, dict[str, Any]] = {
    "naive averaging": {"method": "average"},
    "permute": {"method": "permute"},
    "zip": {"method": "zip"},
    "permute + lstsq (recommended)": {"method": "permute", "refine": "lstsq"},
    "zip + lstsq": {"method": "zip", "refine": "lstsq"},
}
"""The fused rows of the demo's table: name -> :func:`fusion.fuse` arguments (with the family's repair)."""

DEMO_ARCHS = ("resnet", "vit")
"""Architectures the demo trains: a timm ResNet-18 at width 16 (default) or a 4-block timm ViT."""


@dataclass
class DemoRow:
    """One line of the demo's table."""

    name: str
    accuracy: float
    seconds: float | None = None
    note: str = ""


@dataclass
class DemoResult:
    """What the demo measured and wrote."""

    data: str
    rows: list[DemoRow] = field(default_factory=list)
    folder: Path | None = None
    seconds: float = 0.0


def demo_data(download: bool = False, root: str | None = None):
    """``(train, test, description)``: Fashion-MNIST when it can be found (or downloaded with
    ``download``), else scikit-learn's bundled digits."""
    from .data import DatasetNotFoundError, load_digits, load_fashion_mnist

    try:
        return (load_fashion_mnist("train", root=root, download=download),
                load_fashion_mnist("test", root=root, download=download), "Fashion-MNIST")
    except DatasetNotFoundError as exc:
        why = str(exc).splitlines()[0]
        return load_digits("train"), load_digits("test"), f"scikit-learn digits (Fashion-MNIST not found: {why})"


def cache_dir() -> Path:
    """Where trained demo models are kept: ``$FUSION_CACHE``, else ``$XDG_CACHE_HOME/fusion-toolkit``,
    else ``~/.cache/fusion-toolkit``."""
    if os.environ.get("FUSION_CACHE"):
        return Path(os.environ["FUSION_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fusion-toolkit"


def check_cache_folder(folder: str | os.PathLike[str]) -> Path:
    """The demo's cache folder, checked before any work: it must be a folder or not exist yet, and
    nothing on its path may be a file (else saving the trained models would fail only after
    training).

    Raises:
        DemoError: naming the folder (and the file in its way) and what to do.
    """
    folder = Path(folder).expanduser()
    where = "the cache folder (cache= or $FUSION_CACHE)"
    for part in (folder, *folder.parents):
        if part.exists() and not part.is_dir():
            what = "is a file" if part == folder else f"lies under {part}, which is a file"
            raise DemoError(f"{where} {folder} {what}; choose a folder (FUSION_CACHE=DIR), or run without a "
                            f"cache (--no-cache / cache=False)")
        if part.exists():
            break
    return folder


def fresh_folder(out: str | os.PathLike[str] | None, stem: str = "fusion-demo") -> Path:
    """The output folder, created now (so that a run started meanwhile cannot take it): ``out`` when
    it does not exist or is empty (else :class:`DemoError`); with no ``out``, the first of ``stem``,
    ``stem-2``, ... that does not exist in the current folder."""
    if out is not None:
        folder = Path(out)
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise DemoError(f"{folder} exists and is not an empty folder; the demo never overwrites: choose another --out")
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    k = 1
    while True:
        folder = Path(f"{stem}{'' if k == 1 else f'-{k}'}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            k += 1


def _trained(arch: dict, train, n_classes: int, seed: int, epochs: int, size: int, data_name: str,
             cache: Path | None, progress: bool, say: Callable[[str], None], batch_size: int):
    """A model trained with the project's recipe (from the cache when it holds it) and its training seconds."""
    from fusion.io import build_model, load_weights, save_weights

    from .data import calibration_subset
    from .train import recipe_for_arch, train_model

    key = hashlib.sha256(json.dumps([arch, n_classes, seed, epochs, size, batch_size, data_name.split(" (")[0]],
                                    sort_keys=True).encode()).hexdigest()[:16]
    path = cache / f"demo-{key}.safetensors" if cache is not None else None
    torch.manual_seed(seed)
    model = build_model(arch, n_classes)
    if path is not None and path.is_file():
        say(f"model seed {seed}: from the cache ({path})")
        return load_weights(model, path).eval(), None
    subset = calibration_subset(train, min(size, len(train)), seed=100 + seed)
    # a small dataset (the digits fallback) gets as many steps as the asked size would have had
    epochs = min(100, epochs * max(1, round(size / len(subset))))
    say(f"model seed {seed}: training {arch['name']} on {len(subset)} images for {epochs} epoch(s)")
    t = time.perf_counter()
    recipe = dataclasses.replace(recipe_for_arch(arch), batch_size=batch_size)
    train_model(model, subset, recipe, epochs, seed, progress=progress)
    seconds = time.perf_counter() - t
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_weights(model.cpu(), path)
    return model.eval(), seconds


def run_demo(arch: str = "resnet", out: str | os.PathLike[str] | None = None, train_size: int = 20000,
             epochs: int = 4, calibration_size: int = 1000, test_size: int | None = None,
             cache: str | os.PathLike[str] | None | bool = True, download: bool = False,
             data_root: str | None = None, progress: bool = True, curves: bool = True, batch_size: int = 128,
             methods: Sequence[str] | None = None, say: Callable[[str], None] = print) -> DemoResult:
    """Train two models from different seeds, fuse them with the main methods and report.

    Args:
        arch: ``"resnet"`` or ``"vit"``.
        out: output folder (must not exist or be empty); default a fresh ``fusion-demo*`` folder in
            the current directory.
        train_size: training images per model (a random subset of the training split).
        epochs: training epochs.
        calibration_size: calibration images for fusion.
        test_size: test images (None: the whole test split).
        cache: True for :func:`cache_dir`, a folder, or False/None to always train.
        download: let torchvision download Fashion-MNIST when it is not installed.
        data_root: a Fashion-MNIST folder to use first.
        progress: progress bars.
        curves: also compute the interpolation curves and their plot.
        batch_size: training batch size (the recipe's other settings are the zoo's).
        methods: names of the fused rows to run (default all of :data:`DEMO_RUNS`).
        say: where progress lines go.

    Returns:
        A :class:`DemoResult` (its table is also written as ``demo.json`` in the folder).

    Raises:
        DemoError: for an unknown ``arch`` or row, an output folder in use, or a cache folder that is
            a file or lies under one (all before any work).
    """
    import fusion
    from fusion.interpolate import interpolation_report
    from fusion.repair import has_batchnorm

    from .data import calibration_subset, first_examples
    from .evaluate import accuracy, ensemble_accuracy

    if arch not in DEMO_ARCHS:
        raise DemoError(f"arch={arch!r}: the demo trains one of {', '.join(DEMO_ARCHS)}")
    unknown = [m for m in (methods or []) if m not in DEMO_RUNS]
    if unknown:
        raise DemoError(f"unknown demo row(s) {unknown}; choose from {', '.join(DEMO_RUNS)}")
    cache_folder = check_cache_folder(cache_dir() if cache is True else cache) if cache else None
    folder = fresh_folder(out)
    try:
        t_all = time.perf_counter()
        train, test, data_name = demo_data(download, data_root)
        say(f"data: {data_name}")
        if test_size is not None:
            test = first_examples(test, test_size)
        image = int(train[0][0].shape[-1])
        spec = _arch(arch, image)
        n_classes = 10
        models, rows = [], []
        for seed in (0, 1):
            m, sec = _trained(spec, train, n_classes, seed, epochs, train_size, data_name, cache_folder, progress, say,
                              batch_size)
            models.append(m)
            rows.append(DemoRow(f"model seed {seed}", accuracy(m, test), sec, "training" if sec is not None else "cached"))
        cal = calibration_subset(train, min(calibration_size, len(train)), seed=7)
        repair = "reset_bn" if has_batchnorm(models[0]) else "none"  # (what repair="auto" does, named in the table)
        t = time.perf_counter()
        rows.append(DemoRow("ensemble (both models run)", ensemble_accuracy(models, test), time.perf_counter() - t))
        for name, kw in DEMO_RUNS.items():
            if methods is not None and name not in methods:
                continue
            t = time.perf_counter()
            fused = fusion.fuse(models, cal, repair=repair, **kw)
            sec = time.perf_counter() - t
            rows.append(DemoRow(name, accuracy(fused, test), sec, f"repair={repair}"))
            say(f"{name}: {100 * rows[-1].accuracy:.2f}% ({sec:.1f} s)")
        if curves:
            curve_test = first_examples(test, min(len(test), 2000))
            interpolation_report(models, cal, curve_test, methods=("average", "permute"), repairs=("none", repair),
                                 alphas=[0.0, 0.25, 0.5, 0.75, 1.0], out=folder, progress=progress)
        result = DemoResult(data=data_name, rows=rows, folder=folder, seconds=time.perf_counter() - t_all)
        with open(folder / "demo.json", "x") as f:  # (never replaces a file)
            f.write(json.dumps({
                "data": data_name, "arch": spec, "train_size": train_size, "epochs": epochs,
                "calibration_size": calibration_size, "test_images": len(test), "seconds": result.seconds,
                "rows": [row.__dict__ for row in rows]}, indent=1) + "\n")
        return result
    except BaseException:
        if folder.is_dir() and not any(folder.iterdir()):  # (claimed at the start; nothing written)
            folder.rmdir()
        raise


def format_table(result: DemoResult) -> str:
    """The demo's table as text."""
    lines = [f"{'model':<31} {'accuracy':>9} {'seconds':>8}  note", "-" * 64]
    for r in result.rows:
        sec = f"{r.seconds:8.1f}" if r.seconds is not None else f"{'-':>8}"
        lines.append(f"{r.name:<31} {100 * r.accuracy:8.2f}% {sec}  {r.note}")
    return "\n".join(lines)
