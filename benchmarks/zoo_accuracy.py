"""Re-measure every checkpoint of a model zoo on Fashion-MNIST and compare with its manifest.

Each model is loaded through ``fusion.experiments.zoo`` and evaluated with ``fusion.experiments.data`` and
``fusion.experiments.evaluate`` on the Fashion-MNIST test images of its classes (labels
remapped to head order, so the -A/-B split models are scored on their five
classes). A markdown table is printed and written to ``--out``.

Usage::

    python benchmarks/zoo_accuracy.py --zoo /path/to/zoo \
        --out benchmarks/results/zoo_accuracy.md

Exit status 1 if any checkpoint differs from its manifest accuracy by more than
``--tolerance`` points.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

try:
    import fusion  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from fusion.experiments.data import find_fashion_mnist, load_fashion_mnist
from fusion.experiments.evaluate import accuracy
from fusion.experiments.zoo import ZooEntry, find_zoo, load_manifest, load_model

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "zoo_accuracy.md"


def describe_arch(entry: ZooEntry) -> str:
    """Short human-readable description of an entry's architecture.

    Args:
        entry: The zoo entry.

    Returns:
        E.g. ``"timm resnet18 channels=32-64-128-256"``.
    """
    kw = entry.kwargs
    details = []
    if "channels" in kw:
        details.append("channels=" + "-".join(str(c) for c in kw["channels"]))
    for key in ("embed_dim", "depth", "num_heads", "patch_size", "hidden_size", "num_hidden_layers"):
        if key in kw:
            details.append(f"{key}={kw[key]}")
    return " ".join([entry.library, entry.arch_name, *details])


def _classes_label(classes: Sequence[int]) -> str:
    classes = list(classes)
    if classes == list(range(classes[0], classes[-1] + 1)):
        return f"{classes[0]}-{classes[-1]}"
    return ",".join(str(c) for c in classes)


def measure(
    zoo_dir: Path, data_root: str | None, only: Sequence[str] | None, batch_size: int
) -> list[dict[str, Any]]:
    """Evaluates the zoo's checkpoints.

    Args:
        zoo_dir: Zoo folder.
        data_root: Fashion-MNIST folder (``None``: the usual search order).
        only: Names to evaluate (``None``: all).
        batch_size: Evaluation batch size.

    Returns:
        One row per model with name, arch, classes, manifest and measured accuracy,
        difference in points, number of test images and seconds.

    Raises:
        fusion.experiments.zoo.ModelNotInZooError: If a name in ``only`` is not in the zoo.
    """
    from fusion.experiments.zoo import ModelNotInZooError

    manifest = load_manifest(zoo_dir)
    names = list(manifest) if not only else list(only)
    missing = [n for n in names if n not in manifest]
    if missing:
        raise ModelNotInZooError(
            f"{missing} not in the zoo {zoo_dir}; available: {', '.join(manifest)}."
        )
    rows = []
    for name in names:
        entry = manifest[name]
        start = time.perf_counter()
        model, _ = load_model(entry)
        data = load_fashion_mnist("test", root=data_root, classes=entry.classes, remap=True)
        measured = accuracy(model, data, batch_size=batch_size)
        seconds = time.perf_counter() - start
        recorded = entry.test_accuracy
        rows.append(
            {
                "name": name,
                "arch": describe_arch(entry),
                "classes": _classes_label(entry.classes),
                "manifest": recorded,
                "measured": measured,
                "diff_pt": None if recorded is None else 100.0 * (measured - recorded),
                "n": len(data),
                "seconds": seconds,
            }
        )
        diff = "n/a" if recorded is None else f"{100.0 * (measured - recorded):+.2f} pt"
        print(f"{name:14s} measured {measured:.4f}  manifest {recorded}  diff {diff}  ({seconds:.1f}s)", flush=True)
    return rows


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} logical CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python "
        f"{platform.python_version()}"
    )


def render_markdown(rows: list[dict[str, Any]], zoo_dir: Path, command: str, tolerance: float, data_file: str) -> str:
    """Formats the results as a markdown document.

    Args:
        rows: Output of :func:`measure`.
        zoo_dir: Zoo folder evaluated.
        command: Command line that produced the table.
        tolerance: Allowed absolute difference, in points.
        data_file: Test-images file used.

    Returns:
        The markdown text.
    """
    lines = [
        "# Zoo checkpoint accuracy",
        "",
        "Each checkpoint is loaded with `fusion.experiments.zoo.load_model` and evaluated with "
        "`fusion.experiments.evaluate.accuracy` on the Fashion-MNIST test images of its classes "
        "(`fusion.experiments.data.load_fashion_mnist('test', classes=entry.classes)`, labels remapped to "
        "head order, inputs normalised with mean 0.2860 / std 0.3530).",
        "",
        "| name | arch | classes | test images | manifest acc | measured acc | diff (pt) | within tolerance |",
        "|---|---|---|---:|---:|---:|---:|:---:|",
    ]
    for row in rows:
        manifest = "n/a" if row["manifest"] is None else f"{100 * row['manifest']:.2f}"
        diff = "n/a" if row["diff_pt"] is None else f"{row['diff_pt']:+.2f}"
        ok = "n/a" if row["diff_pt"] is None else ("yes" if abs(row["diff_pt"]) <= tolerance else "**no**")
        lines.append(
            f"| {row['name']} | {row['arch']} | {row['classes']} | {row['n']} | {manifest} | "
            f"{100 * row['measured']:.2f} | {diff} | {ok} |"
        )
    lines += [
        "",
        f"Accuracies in percent; tolerance {tolerance} pt.",
        "",
        f"- Command: `{command}`",
        f"- Zoo: `{zoo_dir}`",
        f"- Test data: `{data_file}`",
        f"- Machine: {_machine()}",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Total evaluation time: {sum(r['seconds'] for r in rows):.0f} s",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        0 if every checkpoint is within tolerance, 1 otherwise.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", default=None, help="zoo folder (default: $FUSION_ZOO)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown file to write")
    parser.add_argument("--data-root", default=None, help="Fashion-MNIST folder (default: $FUSION_DATA_DIR, then Debian)")
    parser.add_argument("--only", action="append", default=None, metavar="NAME", help="evaluate only NAME (repeatable)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--tolerance", type=float, default=0.1, help="allowed |difference| in points")
    args = parser.parse_args(argv)

    zoo_dir = find_zoo(args.zoo)
    rows = measure(zoo_dir, args.data_root, args.only, args.batch_size)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    data_file = str(find_fashion_mnist("test", root=args.data_root)[0])
    text = render_markdown(rows, zoo_dir, command, args.tolerance, data_file)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print()
    print(text)
    print(f"Wrote {args.out}")
    bad = [r["name"] for r in rows if r["diff_pt"] is not None and abs(r["diff_pt"]) > args.tolerance]
    if bad:
        print(f"Outside tolerance ({args.tolerance} pt): {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
