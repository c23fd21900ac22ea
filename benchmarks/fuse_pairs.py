"""Benchmark: fuse zoo pairs with every permutation-family method and repair.

For each pair: endpoint accuracies, output ensemble, and for naive averaging, weight matching and
activation matching, each with no repair, BatchNorm reset (BN networks) and REPAIR: test accuracy
and the wall time of every stage. Writes a markdown table.

    python benchmarks/fuse_pairs.py --zoo ../shared/zoo --out benchmarks/results/fuse_pairs.md
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import fusion
from results_file import footer, write_results
from fusion.experiments.data import calibration_subset, load_fashion_mnist
from fusion.experiments.evaluate import accuracy, ensemble_accuracy
from fusion.experiments.zoo import load_model

PAIRS = [("r18w32-s0", "r18w32-s1"), ("vit128-s0", "vit128-s1")]
METHODS = ["average", "weight_matching", "permute"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default=None, help="zoo folder (default: $FUSION_ZOO)")
    ap.add_argument("--out", default="benchmarks/results/fuse_pairs.md")
    ap.add_argument("--calibration-size", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wm-seeds", default="1,2,3",
                    help="extra seeds for weight matching without repair (its coordinate descent visits "
                         "spaces in a random order: the spread across seeds; empty for none)")
    ap.add_argument("--pairs", default=None, help="comma-separated a/b pairs (default: the two zoo pairs)")
    args = ap.parse_args()
    pairs = [tuple(p.split("/")) for p in args.pairs.split(",")] if args.pairs else PAIRS
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    cal = calibration_subset(train, args.calibration_size, seed=args.seed)
    lines = [
        "# Fusing zoo pairs (permutation family)",
        "",
        f"Fashion-MNIST test accuracy (10,000 images) of the fused model; {args.calibration_size} calibration "
        f"images from the training split (seed {args.seed}). Times are wall seconds per stage "
        "(discover / collect / match / apply / repair).",
        "",
        "| pair | method | repair | accuracy | discover | collect | match | apply | repair | total |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a_name, b_name in pairs:
        a, _ = load_model(a_name, args.zoo)
        b, _ = load_model(b_name, args.zoo)
        pair = f"{a_name} + {b_name}"
        lines.append(f"| {pair} | endpoint A | - | {100 * accuracy(a, test):.2f} | | | | | | |")
        lines.append(f"| {pair} | endpoint B | - | {100 * accuracy(b, test):.2f} | | | | | | |")
        lines.append(f"| {pair} | output ensemble | - | {100 * ensemble_accuracy([a, b], test):.2f} | | | | | | |")
        has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in a.modules())
        repairs = ["none", "reset_bn", "repair"] if has_bn else ["none", "repair"]
        for method in METHODS:
            for rep in repairs:
                t = time.perf_counter()
                fused = fusion.fuse([a, b], cal, method=method, repair=rep, seed=args.seed)
                total = time.perf_counter() - t
                acc = accuracy(fused, test)
                s = fused.fusion_report.seconds
                cells = [f"{s.get(k, 0.0):.2f}" for k in ("discover", "collect", "match", "apply", "repair")]
                lines.append(f"| {pair} | {method} | {rep} | {100 * acc:.2f} | " + " | ".join(cells) + f" | {total:.1f} |")
                print(lines[-1], flush=True)
        for seed in [int(v) for v in args.wm_seeds.split(",") if v.strip()]:
            fused = fusion.fuse([a, b], cal, method="weight_matching", repair="none", seed=seed)
            lines.append(f"| {pair} | weight_matching, seed {seed} | none | {100 * accuracy(fused, test):.2f} "
                         "| | | | | | |")
            print(lines[-1], flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines += footer(f"python benchmarks/fuse_pairs.py --calibration-size {args.calibration_size} --seed {args.seed} "
                    f"--wm-seeds {args.wm_seeds}", f"; peak RSS {peak:.0f} MiB")
    write_results(lines, args.out)


if __name__ == "__main__":
    main()
