"""Peak memory of statistics collection versus the number of calibration batches.

Collects joint statistics of two zoo models over 8, then 32, then 128 batches in one process and
prints the peak resident memory after each; streaming sums keep it flat.

    python benchmarks/collect_memory.py --zoo ../shared/zoo --out benchmarks/results/collect_memory.md
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from pathlib import Path

import torch

from alignment import discover
from alignment.statistics import collect
from fusion.experiments.data import load_fashion_mnist
from fusion.experiments.zoo import load_model


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default=None)
    ap.add_argument("--pair", default="r18w32-s0/r18w32-s1")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/collect_memory.md")
    args = ap.parse_args()
    a_name, b_name = args.pair.split("/")
    a, _ = load_model(a_name, args.zoo)
    b, _ = load_model(b_name, args.zoo)
    x = load_fashion_mnist("train").tensors[0]
    graphs = [discover(m, x[:2]) for m in (a, b)]
    rows = []
    for n in (8, 32, 128):
        batches = (x[i * args.batch_size:(i + 1) * args.batch_size] for i in range(n))
        t = time.perf_counter()
        stats = collect([a, b], graphs, batches)
        rows.append((n, stats.samples, time.perf_counter() - t, peak_mib()))
        print(rows[-1], flush=True)
    lines = [
        "# Statistics collection: peak memory versus calibration size",
        "",
        f"Pair {args.pair}, batches of {args.batch_size} images, one process, runs in increasing order "
        "(peak RSS is monotone, so a growing footprint would show as growth).",
        "",
        "| batches | images | seconds | peak RSS (MiB) |",
        "|---:|---:|---:|---:|",
    ] + [f"| {n} | {s} | {t:.1f} | {m:.0f} |" for n, s, t, m in rows] + [
        "",
        f"- Command: `python benchmarks/collect_memory.py --pair {args.pair}`",
        f"- Machine: {platform.system()} {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
