"""Benchmark: ZipIt zipping, partial zipping, PLeaS budgets and ensembles, with parameters and FLOPs.

Sections (``--sections``, comma-separated):

* ``pairs``: for the zoo's 5+5 class splits (each model keeping its own head: per-task mean / joint
  accuracy) and same-task pairs (accuracy): the ensemble, permutation, full zip, partial zip at each
  stage boundary (the cut after that stage; after it each model runs its own layers), and PLeaS
  budgets (permutation, partial matching), each one-shot and with ``refine="lstsq"``; parameters
  and FLOPs relative to one source model. Writes a plot of accuracy against FLOPs per pair.
* ``many``: more than two models in one zip: three same-task models of two widths (into the first
  one's), and with ``--zoo3`` (``benchmarks/train_zoo.py --only r18w32-T1-s6 ... --only r18w32-s9``)
  three and four same-task ResNets and a three-task split (each model keeping its own head).
* ``timing``: the zip matching time against Hungarian matching (``method="permute"``) on the r18
  pairs (median of ``--repeats``; statistics collection excluded).

    python benchmarks/zip.py --zoo ../shared/zoo --zoo3 runs/zoo3 --out benchmarks/results/zip.md
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import torch

import fusion
from alignment.errors import FusionError
from fusion.experiments.evaluate import accuracy, ensemble_accuracy, heads_accuracy, split_task_accuracy
from fusion.experiments.zoo import load_model
from alignment.runner import first_batch
from fusion.zipped import forward_flops, parameter_total
from results_file import fashion_mnist_setup, footer, write_results, zoo_arguments

PAIRS = [("r18w32-A-s4", "r18w32-B-s5"), ("vit128-A-s4", "vit128-B-s5"), ("r18w32-s0", "r18w32-s1"),
         ("vit128-s0", "vit128-s1")]
CUTS = {"r18": ["layer1", "layer2", "layer3"], "vit": [f"blocks.{k}" for k in range(5)]}
BUDGETS = [1.2, 1.5, 2.0]


def _repair(model) -> str:
    return "reset_bn" if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()) else "none"


def _cost(model, sources, example) -> tuple[float, float]:
    """(parameters, FLOPs) relative to the first source model."""
    return (parameter_total(model) / parameter_total(sources[0]),
            forward_flops(model, example) / forward_flops(sources[0], example))


def pairs(args, cal, test, lines, plots) -> None:
    lines += ["## Pairs", "",
              "Per-task mean / joint accuracy for the split pairs (each model keeps its own head, "
              "`heads='separate'`), accuracy for same-task pairs. *partial zip @ X*: `zip_until='X'` (fused up to "
              "and including X, then each model's own layers; with `lstsq` the layers before the cut are refitted "
              "and the cut's unmerge maps fitted by least squares). *PLeaS b*: `method='permute', budget=b`. "
              "*params*, *FLOPs*: relative to one source model (FLOPs from `torch.utils.flop_counter`). "
              "BatchNorm reset for ResNets.", "",
              "| models | row | params | FLOPs | one-shot | + lstsq | seconds (one-shot / lstsq) |",
              "|---|---|---:|---:|---:|---:|---:|"]
    chosen = [tuple(p.split("/")) for p in args.pairs.split(",")] if args.pairs else PAIRS
    ex = first_batch(cal)[:2]
    for a_name, b_name in chosen:
        a, ea = load_model(a_name, args.zoo)
        b, eb = load_model(b_name, args.zoo)
        split = list(ea.classes) != list(eb.classes)
        heads = "separate" if split else "merged"
        lists = [list(ea.classes), list(eb.classes)]
        rep = _repair(a)
        pair = f"{a_name} + {b_name}"
        points = []

        def score(m) -> tuple[str, float]:
            if split:
                r = heads_accuracy(m, lists, test)
                return f"{100 * r['task_mean']:.2f} / {100 * r['joint']:.2f}", 100 * r["task_mean"]
            acc = 100 * accuracy(m, test)
            return f"{acc:.2f}", acc

        def row(name: str, build, kind: str) -> None:
            t = time.perf_counter()
            one = build(False)
            t_one = time.perf_counter() - t
            s_one, v_one = score(one)
            t = time.perf_counter()
            ref = build(True)
            t_ref = time.perf_counter() - t
            s_ref, v_ref = score(ref)
            params, flops = _cost(one, [a, b], ex)
            lines.append(f"| {pair} | {name} | {params:.2f} | {flops:.2f} | {s_one} | {s_ref} | {t_one:.1f} / {t_ref:.1f} |")
            print(lines[-1], flush=True)
            points.append((kind, flops, v_one, v_ref))

        if split:
            ens = split_task_accuracy([a, b], lists, test)
            s, v = f"{100 * ens['task_mean']:.2f} / {100 * ens['joint']:.2f}", 100 * ens["task_mean"]
        else:
            v = 100 * ensemble_accuracy([a, b], test)
            s = f"{v:.2f}"
        lines.append(f"| {pair} | ensemble | 2.00 | 2.00 | {s} | | |")
        print(lines[-1], flush=True)
        points.append(("ensemble", 2.0, v, None))
        perm = fusion.align([a, b], cal, method="permute", seed=args.seed)
        zipped = fusion.align([a, b], cal, method="zip", seed=args.seed)

        def refine(flag: bool) -> str:
            return "lstsq" if flag else "none"
        row("permutation", lambda r: perm.build(repair=rep, heads=heads, refine=refine(r)), "permutation")
        row("zip", lambda r: zipped.build(repair=rep, heads=heads, refine=refine(r)), "zip")
        family = "r18" if a_name.startswith("r18") else "vit"
        for cut in CUTS[family]:
            row(f"partial zip @ {cut}", lambda r, c=cut: zipped.build(repair=rep, heads=heads, refine=refine(r),
                                                                      zip_until=c), "partial zip")
        for budget in BUDGETS:
            al = fusion.align([a, b], cal, method="permute", budget=budget, seed=args.seed)
            row(f"PLeaS {budget}", lambda r, al=al: al.build(repair=rep, heads=heads, refine=refine(r)), "PLeaS budget")
        plots.append((pair, "per-task mean" if split else "accuracy", points))


def _plot(plots, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(plots), figsize=(4.2 * len(plots), 3.8), squeeze=False)
    styles = {"ensemble": ("k", "*"), "permutation": ("tab:blue", "o"), "zip": ("tab:red", "s"),
              "partial zip": ("tab:orange", "D"), "PLeaS budget": ("tab:green", "^")}
    for ax, (pair, metric, points) in zip(axes[0], plots):
        for kind, (color, marker) in styles.items():
            pts = [p for p in points if p[0] == kind]
            if not pts:
                continue
            ax.scatter([p[1] for p in pts], [p[2] for p in pts], marker=marker, facecolors="none", edgecolors=color,
                       label=f"{kind} (one-shot)")
            ref = [p for p in pts if p[3] is not None]
            if ref:
                ax.scatter([p[1] for p in ref], [p[3] for p in ref], color=color, marker=marker, label=f"{kind} + lstsq")
        ax.set_title(pair, fontsize=9)
        ax.set_xlabel("FLOPs / one model")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def many(args, cal, test, lines) -> None:
    lines += ["## More than two models", "",
              "One `fusion.fuse(models, cal, method=...)` over all models (same-task: accuracy of the averaged "
              "merged model; with different label sets: `heads='separate'`, per-task mean over the models' "
              "own tasks). Widths differ in the first group: the fused model has the first model's widths.", "",
              "| models | ensemble | permutation | zip | zip + lstsq |", "|---|---:|---:|---:|---:|"]
    groups = [(["r18w32-s0", "r18w32-s1", "r18w16-s2"], [args.zoo] * 3),
              (["vit128-s0", "vit128-s1", "vit64-s2"], [args.zoo] * 3)]
    if args.zoo3:
        groups += [(["r18w32-s0", "r18w32-s1", "r18w32-s9"], [args.zoo, args.zoo, args.zoo3]),
                   (["r18w32-s0", "r18w32-s1", "r18w32-s9", "r18w16-s2"], [args.zoo, args.zoo, args.zoo3, args.zoo]),
                   (["r18w32-T1-s6", "r18w32-T2-s7", "r18w32-T3-s8"], [args.zoo3] * 3)]
    for names, zoos in groups:
        loaded = [load_model(n, z) for n, z in zip(names, zoos)]
        models = [m for m, _ in loaded]
        lists = [list(e.classes) for _, e in loaded]
        split = any(cl != lists[0] for cl in lists)
        heads = "separate" if split else "merged"
        rep = _repair(models[0])

        def score(m) -> str:
            if split:
                return f"{100 * heads_accuracy(m, lists, test)['task_mean']:.2f}"
            return f"{100 * accuracy(m, test):.2f}"
        ens = (f"{100 * split_task_accuracy(models, lists, test)['task_mean']:.2f}" if split
               else f"{100 * ensemble_accuracy(models, test):.2f}")
        cells = [ens]
        for method, refine in [("permute", "none"), ("zip", "none"), ("zip", "lstsq")]:
            try:
                cells.append(score(fusion.fuse(models, cal, method=method, repair=rep, heads=heads, refine=refine,
                                               seed=args.seed)))
            except FusionError as exc:  # e.g. a method that needs equal widths
                cells.append(f"n/a ({type(exc).__name__})")
        lines.append(f"| {' + '.join(names)} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    if args.zoo3:
        lines += ["", f"The extra models (not in the reference zoo): `python benchmarks/train_zoo.py --out {args.zoo3} "
                      f"--only r18w32-T1-s6 --only r18w32-T2-s7 --only r18w32-T3-s8 --only r18w32-s9`."]
    lines.append("")


def timing(args, cal, lines) -> None:
    lines += ["## Matching time", "",
              "`report.seconds['match']` (statistics collection excluded), median of "
              f"{args.repeats} runs.", "", "| models | permute (Hungarian) | zip | zip / permute |", "|---|---:|---:|---:|"]
    for a_name, b_name in [("r18w32-s0", "r18w32-s1"), ("r18w32-A-s4", "r18w32-B-s5"), ("vit128-s0", "vit128-s1")]:
        a, _ = load_model(a_name, args.zoo)
        b, _ = load_model(b_name, args.zoo)
        times = {}
        for method in ("permute", "zip"):
            runs = []
            for _ in range(args.repeats):
                runs.append(fusion.align([a, b], cal, method=method, seed=args.seed).report.seconds["match"])
            times[method] = statistics.median(runs)
        lines.append(f"| {a_name} + {b_name} | {times['permute']:.2f} s | {times['zip']:.2f} s | "
                     f"{times['zip'] / times['permute']:.1f}x |")
        print(lines[-1], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    zoo_arguments(ap, "benchmarks/results/zip.md", "pairs,many,timing")
    ap.add_argument("--zoo3", default=None, help="folder holding the three-task split (optional)")
    ap.add_argument("--plot", default="benchmarks/results/zip_accuracy_flops.png")
    ap.add_argument("--pairs", default=None, help="pairs: comma-separated a/b pairs (default: the zoo's four)")
    args = ap.parse_args()
    cal, test, lines = fashion_mnist_setup(args, "Zipping, partial zipping, budgets and ensembles")
    sections = args.sections.split(",")
    plots: list = []
    if "pairs" in sections:
        pairs(args, cal, test, lines, plots)
        if plots:
            _plot(plots, Path(args.plot))
            lines += ["", f"Plot: `{args.plot}` (accuracy against FLOPs; hollow: one-shot, filled: + lstsq).", ""]
    if "many" in sections:
        many(args, cal, test, lines)
    if "timing" in sections:
        timing(args, cal, lines)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    extra = (f" --pairs {args.pairs}" if args.pairs else "") + (f" --zoo3 {args.zoo3}" if args.zoo3 else "")
    lines += footer(f"python benchmarks/zip.py --zoo ../shared/zoo --calibration-size {args.calibration_size} "
                    f"--seed {args.seed} --sections {args.sections}{extra}", f"; peak RSS {peak:.0f} MiB")
    write_results(lines, args.out)


if __name__ == "__main__":
    main()
