"""Benchmark: fusion across widths and one-shot compression by width reduction.

1. Fusion across widths: r18w32-s0 + r18w16-s2 and vit128-s0 + vit64-s2, fused into the small
   width (the architecture of the narrow model) and into the large width (the wide model's), with
   optimal transport, rectangular Hungarian matching (best-matched units kept) and correlation
   merging.
2. Compression: r18w32-s0 -> width 16 and vit128-s0 -> width 64 in one shot (N = 1), by OT onto
   fewer units, correlation merging, rectangular Hungarian, and the baseline: structured L1
   magnitude pruning; compared with the model of that width trained from scratch.

Every row uses the same repair per family (BatchNorm reset for ResNets; none for ViTs, which have no
running statistics). Test accuracy on the 10k Fashion-MNIST test images; wall seconds per fusion.

    python benchmarks/fuse_widths.py --zoo ../shared/zoo --out benchmarks/results/fuse_widths.md
"""

from __future__ import annotations

import argparse
import resource
import time


import fusion
from results_file import footer, write_results
from fusion.experiments.data import calibration_subset, load_fashion_mnist
from fusion.experiments.evaluate import accuracy, ensemble_accuracy
from fusion.experiments.zoo import load_model

FAMILIES = {
    # alt_cost: the OT cost that cost="auto" does not pick for this family (shown for comparison)
    "r18": {"wide": "r18w32-s0", "narrow": "r18w16-s2", "repair": "reset_bn", "alt_cost": "distance"},
    "vit": {"wide": "vit128-s0", "narrow": "vit64-s2", "repair": "none", "alt_cost": "correlation"},
}


def fuse_methods(spec):
    return [("ot", {}), ("ot", {"cost": spec["alt_cost"]}), ("permute", {}), ("merge", {})]


def compress_methods(spec):
    return [("magnitude", {}), *fuse_methods(spec)]


def _label(method: str, opts: dict) -> str:
    names = {"ot": "OT (exact", "permute": "Hungarian (rectangular)", "merge": "correlation merge",
             "magnitude": "L1 magnitude pruning"}
    if method == "ot":
        return names[method] + ", " + (", ".join(f"{k}={v}" for k, v in opts.items()) or "cost=auto") + ")"
    return names[method]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default=None, help="zoo folder (default: $FUSION_ZOO)")
    ap.add_argument("--out", default="benchmarks/results/fuse_widths.md")
    ap.add_argument("--calibration-size", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--families", default="r18,vit")
    args = ap.parse_args()
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    cal = calibration_subset(train, args.calibration_size, seed=args.seed)
    fuse_rows, comp_rows = [], []

    def run(sources, target, method, opts, repair):
        t = time.perf_counter()
        fused = fusion.fuse(sources, cal, method=method, repair=repair, target=target, seed=args.seed, **opts)
        seconds = time.perf_counter() - t
        return 100 * accuracy(fused, test), seconds

    for fam in args.families.split(","):
        spec = FAMILIES[fam]
        wide, _ = load_model(spec["wide"], args.zoo)
        narrow, _ = load_model(spec["narrow"], args.zoo)
        rep = spec["repair"]
        acc_w, acc_n = 100 * accuracy(wide, test), 100 * accuracy(narrow, test)
        pair = f"{spec['wide']} + {spec['narrow']}"
        fuse_rows.append(f"| {pair} | endpoints (wide / narrow) | - | - | {acc_w:.2f} / {acc_n:.2f} | |")
        fuse_rows.append(f"| {pair} | output ensemble (both models run) | - | - | "
                         f"{100 * ensemble_accuracy([wide, narrow], test):.2f} | |")
        for size, target in (("small", narrow), ("large", wide)):
            for method, opts in fuse_methods(spec):
                acc, sec = run([wide, narrow], target, method, opts, rep)
                fuse_rows.append(f"| {pair} | {_label(method, opts)} | {size} | {rep} | {acc:.2f} | {sec:.1f} |")
                print(fuse_rows[-1], flush=True)
        src = spec["wide"]
        comp_rows.append(f"| {src} | source model (wide) | - | {acc_w:.2f} | |")
        comp_rows.append(f"| {src} | {spec['narrow']}: trained from scratch at the small width | - | {acc_n:.2f} | |")
        for method, opts in compress_methods(spec):
            acc, sec = run([wide], narrow, method, opts, rep)
            comp_rows.append(f"| {src} | {_label(method, opts)} | {rep} | {acc:.2f} | {sec:.1f} |")
            print(comp_rows[-1], flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines = [
        "# Fusion across widths and compression by width reduction",
        "",
        f"Fashion-MNIST test accuracy (10,000 images); {args.calibration_size} calibration images from the "
        f"training split (seed {args.seed}); the same repair for every row of a family (`reset_bn` for the "
        "BatchNorm ResNets, `none` for the ViTs). Seconds: wall time of the whole `fusion.fuse` call "
        "(discovery, statistics, matching, building, repair) on the CPU.",
        "",
        "## Fusing models of different widths",
        "",
        "`small` writes into the narrow model's architecture, `large` into the wide one's "
        "(`fusion.fuse([wide, narrow], cal, method=..., target=t)`).",
        "",
        "| models | method | fused width | repair | accuracy | seconds |",
        "|---|---|---|---|---:|---:|",
        *fuse_rows,
        "",
        "## One-shot compression to half width",
        "",
        "`fusion.fuse([wide], cal, method=..., target=narrow_architecture)` (no training).",
        "",
        "| source | method | repair | accuracy | seconds |",
        "|---|---|---|---:|---:|",
        *comp_rows,
    ]
    lines += footer(f"python benchmarks/fuse_widths.py --calibration-size {args.calibration_size} --seed {args.seed}",
                    f"; peak RSS {peak:.0f} MiB")
    write_results(lines, args.out)


if __name__ == "__main__":
    main()
