"""Shared ending of the benchmark scripts: the command, machine and date lines, and writing the file."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from pathlib import Path

import torch


def footer(command: str, machine_extra: str = "") -> list[str]:
    """The lines that close a results table: the command that reproduces it, the machine (with
    ``machine_extra`` appended, e.g. peak memory) and the UTC date."""
    return [
        "",
        f"- Command: `{command}`",
        f"- Machine: {platform.system()} {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}{machine_extra}",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
    ]


def write_results(lines: list[str], out: str | Path) -> Path:
    """Write the markdown lines to ``out`` (creating its folder) and say where."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return out


def zoo_arguments(ap, out: str, sections: str) -> None:
    """The options every zoo benchmark takes: --zoo, --out, --calibration-size, --seed, --repeats and
    --sections (defaults: ``out``, ``sections``)."""
    ap.add_argument("--zoo", default=None, help="zoo folder (default: $FUSION_ZOO)")
    ap.add_argument("--out", default=out)
    ap.add_argument("--calibration-size", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sections", default=sections)


def fashion_mnist_setup(args, title: str):
    """``(calibration, test, lines)``: the calibration subset of Fashion-MNIST's training split, its test
    split, and a results file's first lines under ``title``."""
    from fusion.experiments.data import calibration_subset, load_fashion_mnist

    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    cal = calibration_subset(train, args.calibration_size, seed=args.seed)
    lines = [f"# {title}", "",
             f"Fashion-MNIST test accuracy (10,000 images); {args.calibration_size} calibration images from the "
             f"training split (seed {args.seed}); CPU.", ""]
    return cal, test, lines
