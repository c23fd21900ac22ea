"""The ``fusion`` command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import torch

EPILOG_SPACES = """\b
Example:
  fusion spaces r18w32-s0 --zoo ../shared/zoo
  fusion spaces runs/fused.safetensors
"""
EPILOG_EVAL = """\b
Example:
  fusion eval r18w32-s0 --zoo ../shared/zoo
  fusion eval r18w32-A-s4 --zoo ../shared/zoo --limit 1000
"""
EPILOG_ZOO = """\b
Example:
  fusion zoo --zoo ../shared/zoo
"""


def resolve_model(spec: str, zoo: str | None = None):
    """Load a model from a zoo name, a saved ``.safetensors`` (with JSON sidecar) or an HF directory.

    Returns:
        ``(model, entry)``; ``entry`` is the zoo/sidecar entry (None for HF directories).
    """
    from . import zoo as zoo_mod

    path = Path(spec)
    if path.is_dir() and (path / "config.json").exists():
        import transformers

        model = transformers.AutoModelForImageClassification.from_pretrained(str(path), local_files_only=True)
        return model.eval(), None
    if path.suffix in (".safetensors", ".json") or path.with_suffix(".json").exists():
        return zoo_mod.load_model_file(path)
    return zoo_mod.load_model(spec, zoo)


def _example_input(entry, model) -> torch.Tensor:
    chans = 1
    if entry is not None:
        chans = int(entry.kwargs.get("in_chans", entry.kwargs.get("num_channels", 1)))
    size = 28
    return torch.randn(2, chans, size, size)


@click.group()
def main() -> None:
    """Fuse independently trained vision models by aligning their hidden units."""


@main.command(epilog=EPILOG_ZOO)
@click.option("--zoo", "zoo_dir", default=None, help="Zoo folder (default: $FUSION_ZOO).")
def zoo(zoo_dir: str | None) -> None:
    """List the checkpoints of a model zoo."""
    from .zoo import load_manifest

    for name, e in load_manifest(zoo_dir).items():
        classes = f"{min(e.classes)}-{max(e.classes)}" if e.classes else "?"
        acc = f"{100 * e.test_accuracy:.2f}%" if e.test_accuracy is not None else "-"
        click.echo(f"{name:16s} {e.library}:{e.arch_name:24s} classes {classes:5s} test acc {acc}")


@main.command(epilog=EPILOG_SPACES)
@click.argument("model")
@click.option("--zoo", "zoo_dir", default=None, help="Zoo folder for zoo names (default: $FUSION_ZOO).")
def spaces(model: str, zoo_dir: str | None) -> None:
    """Discover and print the alignment spaces of MODEL."""
    from alignment import discover

    m, entry = resolve_model(model, zoo_dir)
    graph = discover(m, _example_input(entry, m))
    click.echo(graph.summary())


@main.command(name="eval", epilog=EPILOG_EVAL)
@click.argument("model")
@click.option("--zoo", "zoo_dir", default=None, help="Zoo folder for zoo names (default: $FUSION_ZOO).")
@click.option("--data", "data_root", default=None, help="Fashion-MNIST folder (default: $FUSION_DATA_DIR or the Debian path).")
@click.option("--limit", type=int, default=None, help="Evaluate on the first N test images only.")
@click.option("--device", default=None, help="Device to evaluate on (e.g. cuda).")
def eval_cmd(model: str, zoo_dir: str | None, data_root: str | None, limit: int | None, device: str | None) -> None:
    """Test accuracy of MODEL on Fashion-MNIST (the classes it was trained on)."""
    from torch.utils.data import Subset

    from .data import load_fashion_mnist
    from .evaluate import accuracy

    m, entry = resolve_model(model, zoo_dir)
    classes = list(entry.classes) if entry is not None and entry.classes else None
    data = load_fashion_mnist("test", root=data_root, classes=classes)
    if limit:
        data = Subset(data, range(min(limit, len(data))))
    acc = accuracy(m, data, device=device)
    click.echo(f"{model}: accuracy {100 * acc:.2f}% on {len(data)} test images")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
