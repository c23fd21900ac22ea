"""Benchmark: least-squares refinement (PLeaS in closed form), partial matching budgets, compression.

Sections (``--sections``, comma-separated):

* ``budgets``: accuracy against the parameter budget (1.0, 1.2, 1.5, 2.0), without and with
  ``refine="lstsq"``, for the zoo's same-task pairs and its 5+5 class splits (each model keeping its
  own head: per-task mean and joint accuracy).
* ``compression``: one model to 0.5x and 0.75x width (OT, with and without refinement) against L1
  magnitude pruning and against the models trained at that width.
* ``adam``: the closed-form solve against PLeaS's procedure (400 Adam steps) on the same rows of
  chosen layers: final regression loss and seconds of each.
* ``speed``: refining the r18 pair against the forward floor (both models over the calibration
  data), as a ratio measured in one process.
* ``memory``: the largest Gram of a random-init timm ResNet-50 pair (64 images of 64x64), and the
  process' peak memory.
* ``options``: the refinement's variants on the same-task pairs and the r18 split: inputs from the
  fused model (sequential) or the merged sources (PLeaS's code), BatchNorm folded or refitted from
  the Gram's statistics, LayerNorm affines refitted or not.

    python benchmarks/refine.py --zoo ../shared/zoo --out benchmarks/results/refine.md
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import fusion
from fusion.experiments.evaluate import accuracy, ensemble_accuracy, heads_accuracy, split_task_accuracy
from fusion.experiments.zoo import load_model
from fusion.lstsq import LayerGram, ridge_solve
from fusion.refine import _conv_rows, _conv_weight
from results_file import fashion_mnist_setup, footer, write_results, zoo_arguments

SAME_TASK = [("r18w32-s0", "r18w32-s1"), ("vit128-s0", "vit128-s1")]
SPLITS = [("r18w32-A-s4", "r18w32-B-s5"), ("vit128-A-s4", "vit128-B-s5")]
BUDGETS = [1.0, 1.2, 1.5, 2.0]


def _repair(model) -> str:
    return "reset_bn" if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()) else "none"


def _scorer(ea, eb, test):
    """``(split, class lists, score)`` for a pair of zoo entries: a split pair (different classes)
    scores per-task mean / joint accuracy of separate heads, a same-task pair plain accuracy."""
    split = list(ea.classes) != list(eb.classes)
    lists = [list(ea.classes), list(eb.classes)] if split else None

    def score(m, joint: bool = True) -> str:
        if split:
            r = heads_accuracy(m, lists, test)
            return f"{100 * r['task_mean']:.2f}" + (f" / {100 * r['joint']:.2f}" if joint else "")
        return f"{100 * accuracy(m, test):.2f}"
    return split, lists, score


def budgets(args, cal, test, lines) -> None:
    lines += ["## Accuracy against the parameter budget", "",
              "`fusion.align(models, cal, method='permute', budget=b)` then `.build(refine=..., repair=...)` "
              "(`reset_bn` for the ResNets, `none` for the ViTs); split pairs use `heads='separate'` and report "
              "per-task mean / joint accuracy. *params*: fused parameters over the fully matched model's.", "",
              "| models | budget | params | one-shot | + lstsq | seconds (align / build lstsq) |",
              "|---|---:|---:|---:|---:|---:|"]
    pairs = [tuple(p.split("/")) for p in args.pairs.split(",")] if args.pairs else SAME_TASK + SPLITS
    for a_name, b_name in pairs:
        a, ea = load_model(a_name, args.zoo)
        b, eb = load_model(b_name, args.zoo)
        split, lists, score = _scorer(ea, eb, test)
        pair = f"{a_name} + {b_name}"
        if split:
            ens = split_task_accuracy([a, b], lists, test)
            lines.append(f"| {pair} | ensemble | 2.00 | {100 * ens['task_mean']:.2f} / {100 * ens['joint']:.2f} | | |")
        else:
            lines.append(f"| {pair} | ensemble | 2.00 | {100 * ensemble_accuracy([a, b], test):.2f} | | |")
        print(lines[-1], flush=True)
        heads = "separate" if split else "merged"
        for budget in [float(b) for b in args.budgets.split(",")]:
            t = time.perf_counter()
            al = fusion.align([a, b], cal, method="permute", budget=budget, seed=args.seed)
            t_align = time.perf_counter() - t
            one = al.build(repair=_repair(a), heads=heads)
            t = time.perf_counter()
            ref = al.build(repair=_repair(a), heads=heads, refine="lstsq")
            t_ref = time.perf_counter() - t
            params = al.report.partial.get("parameters")
            ratio = params[0] / params[1] if params else 1.0
            lines.append(f"| {pair} | {budget:.1f} | {ratio:.2f} | {score(one)} | {score(ref)} | "
                         f"{t_align:.1f} / {t_ref:.1f} |")
            print(lines[-1], flush=True)


OPTIONS = [("sequential, fold (default)", {}), ("merged inputs", {"inputs": "merged"}),
           ("pre-BN targets, BN statistics from the Gram", {"batchnorm": "stats"}),
           ("merged inputs, BN statistics", {"inputs": "merged", "batchnorm": "stats"}),
           ("LayerNorm affines refitted too", {"norms": True})]


def options(args, cal, test, lines) -> None:
    lines += ["", "## Refinement variants", "",
              "`fusion.align(models, cal, method='permute').build(refine='lstsq', refine_options=...)` at budget 1.0 "
              "(`reset_bn` for the ResNets, `none` for the ViTs; the split pair keeps separate heads: per-task mean). "
              "BatchNorm variants apply to the ResNets only, the LayerNorm one to the ViT.", "",
              "| models | variant | accuracy | seconds |", "|---|---|---:|---:|"]
    for a_name, b_name in SAME_TASK + SPLITS[:1]:
        a, ea = load_model(a_name, args.zoo)
        b, eb = load_model(b_name, args.zoo)
        split, _, score = _scorer(ea, eb, test)
        al = fusion.align([a, b], cal, method="permute", seed=args.seed)
        vit = not any(isinstance(m, torch.nn.BatchNorm2d) for m in a.modules())
        for label, opts in OPTIONS:
            if ("batchnorm" in opts and vit) or ("norms" in opts and not vit):
                continue
            t = time.perf_counter()
            m = al.build(repair=_repair(a), heads="separate" if split else "merged", refine="lstsq",
                         refine_options=opts)
            sec = time.perf_counter() - t
            lines.append(f"| {a_name} + {b_name} | {label} | {score(m, joint=False)} | {sec:.1f} |")
            print(lines[-1], flush=True)


def memory(args, lines) -> None:
    import timm

    torch.manual_seed(args.seed)
    a, b = (timm.create_model("resnet50", pretrained=False, num_classes=10) for _ in range(2))
    data = torch.randn(64, 3, 64, 64)
    t = time.perf_counter()
    fused = fusion.fuse([a, b], data, method="permute", refine="lstsq")
    sec = time.perf_counter() - t
    big = fused.fusion_report.refinement["largest_gram"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines += ["", "## Memory", "",
              f"timm ResNet-50 pair (random init, 64 random images of 64x64), permute + lstsq: the largest Gram is "
              f"{big['layer']}'s {big['size']} x {big['size']} ({big['size'] ** 2 * 8 / 2 ** 20:.0f} MiB in float64; "
              f"`report.refinement['largest_gram']`); Grams are made and solved one layer at a time. Whole fusion "
              f"{sec:.1f} s; peak RSS of the process {peak:.0f} MiB."]
    print(lines[-1], flush=True)


def compression(args, cal, test, lines) -> None:
    lines += ["", "## Compression of one model", "",
              "`fusion.fuse([model], cal, method=..., width=w, refine=...)`; *target* rows write into the "
              "narrow zoo architecture instead (`target=` the zoo model, whose ResNet stem stays 64 wide).", "",
              "| model | width | method | one-shot | + lstsq | seconds (+ lstsq) |", "|---|---|---|---:|---:|---:|"]
    for name, narrow in (("r18w32-s0", "r18w16-s2"), ("vit128-s0", "vit64-s2")):
        m, _ = load_model(name, args.zoo)
        small, _ = load_model(narrow, args.zoo)
        rep = _repair(m)
        lines.append(f"| {name} | 1.0 | source model | {100 * accuracy(m, test):.2f} | | |")
        lines.append(f"| {name} | 0.5 | {narrow} trained from scratch | {100 * accuracy(small, test):.2f} | | |")
        jobs = [(w, "ot", {"width": w}) for w in (0.5, 0.75)] + [(w, "magnitude", {"width": w}) for w in (0.5, 0.75)]
        jobs.append(("target " + narrow, "ot", {"target": small}))
        for w, method, kw in jobs:
            one = fusion.fuse([m], cal, method=method, repair=rep, seed=args.seed, **kw)
            t = time.perf_counter()
            ref = fusion.fuse([m], cal, method=method, repair=rep, seed=args.seed, refine="lstsq", **kw)
            sec = time.perf_counter() - t
            lines.append(f"| {name} | {w} | {method} | {100 * accuracy(one, test):.2f} | "
                         f"{100 * accuracy(ref, test):.2f} | {sec:.1f} |")
            print(lines[-1], flush=True)


def _layer_rows(args, cal, layer: str, max_rows: int | None = None):
    """Inputs of ``layer`` in the one-shot fused r18 pair and the merged source outputs (post-BN)."""
    a, _ = load_model("r18w32-s0", args.zoo)
    b, _ = load_model("r18w32-s1", args.zoo)
    al = fusion.align([a, b], cal, method="permute", seed=args.seed)
    maps = al.maps()
    fused = al.build(repair="reset_bn")
    mod = fused.get_submodule(layer)
    bn_name = layer.replace("conv", "bn") if "conv" in layer else None
    xs, ys = [], []
    from alignment.maps import axis_matrix

    A = [axis_matrix(g.layout(f"{layer}.weight")[0], maps, i, "out", True, 0.5, layer, 0).float()
         for i, g in enumerate(al.graphs)]
    caps = {}
    hooks = [mod.register_forward_pre_hook(lambda m, a_: caps.__setitem__("x", a_[0]))]
    for i, src in enumerate((a, b)):
        out_mod = src.get_submodule(bn_name if bn_name else layer)
        hooks.append(out_mod.register_forward_hook(lambda m, a_, o, i=i: caps.__setitem__(f"y{i}", o)))
    with torch.no_grad():
        for xb in torch.split(torch.stack([cal[k][0] for k in range(len(cal))]), 256):
            fused(xb), a(xb), b(xb)
            x = caps["x"]
            xr = _conv_rows(mod, x)[0] if isinstance(mod, torch.nn.Conv2d) else x.reshape(-1, x.shape[-1])
            y = sum((caps[f"y{i}"].movedim(1, -1).reshape(-1, caps[f"y{i}"].shape[1]) if caps[f"y{i}"].dim() == 4
                     else caps[f"y{i}"]) @ A[i].t() for i in range(2))
            xs.append(xr)
            ys.append(y)
    for h in hooks:
        h.remove()
    return mod, torch.cat(xs), torch.cat(ys)


def adam(args, cal, lines) -> None:
    lines += ["", "## Closed form against 400 Adam steps (PLeaS's procedure)", "",
              "Same rows for both: the one-shot fused r18w32-s0/s1's inputs to the layer, targets the merged "
              "sources' (post-BN) outputs. Closed form: float32 products summed in float64, ridge 1e-4, "
              "Cholesky. Adam: 400 steps on random mini-batches of 4,096 rows (all rows when fewer), "
              "from the mapped weights, lr 1e-3, a bias for every layer. Loss: ||XW^T - Y||^2 / ||Y||^2.", "",
              "| layer | rows x inputs | closed-form loss | Adam loss | closed-form s | Adam s | speed-up |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for layer in ("layer1.0.conv1", "layer3.0.conv2", "fc"):
        mod, X, Y = _layer_rows(args, cal, layer)
        d = X.shape[1]
        w0 = (_conv_weight(mod.weight.detach(), 1)[0] if isinstance(mod, torch.nn.Conv2d) else mod.weight.detach())
        b0 = mod.bias.detach() if mod.bias is not None else torch.zeros(w0.shape[0])
        t = time.perf_counter()
        g = LayerGram(1, d, Y.shape[1], True, "cpu")
        for xs, ys in zip(torch.split(X, 16384), torch.split(Y, 16384)):
            g.add(xs[None], ys[None])
        sol = ridge_solve(g, w0[None], b0[None], ridge=1e-4)
        t_cf = time.perf_counter() - t
        w = torch.nn.Parameter(w0.clone())
        b = torch.nn.Parameter(b0.clone())
        opt = torch.optim.Adam([w, b], lr=1e-3)
        gen = torch.Generator().manual_seed(args.seed)
        t = time.perf_counter()
        for _ in range(400):
            idx = torch.randint(0, X.shape[0], (min(4096, X.shape[0]),), generator=gen)
            opt.zero_grad()
            loss = ((X[idx] @ w.t() + b - Y[idx]) ** 2).mean()
            loss.backward()
            opt.step()
        t_adam = time.perf_counter() - t
        with torch.no_grad():
            adam_loss = float(((X @ w.t() + b - Y) ** 2).sum() / (Y ** 2).sum())
        lines.append(f"| {layer} | {X.shape[0]} x {d + 1} | {sol.loss_after:.4f} | {adam_loss:.4f} | {t_cf:.2f} | "
                     f"{t_adam:.2f} | {t_adam / t_cf:.1f}x |")
        print(lines[-1], flush=True)


def speed(args, cal, lines) -> None:
    from speed import floor_seconds

    a, _ = load_model("r18w32-s0", args.zoo)
    b, _ = load_model("r18w32-s1", args.zoo)
    al = fusion.align([a, b], cal, method="permute", seed=args.seed)
    rows = []
    for _ in range(args.repeats):
        floor = floor_seconds([a, b], cal, None)
        fused = al.build(repair="reset_bn", refine="lstsq")
        rows.append((fused.fusion_report.seconds["refine"] / floor, floor, fused.fusion_report.seconds["refine"]))
    rows.sort()
    ratio, floor, ref = rows[len(rows) // 2]
    lines += ["", "## Cost of refinement against the forward floor", "",
              f"r18w32-s0/s1, every layer refined (Grams and solves): {ref:.1f} s against a floor of {floor:.2f} s "
              f"(both models over the calibration data): **{ratio:.1f}x** (median of {args.repeats}; "
              f"ratios {', '.join(f'{r[0]:.1f}' for r in rows)})."]
    print(lines[-1], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    zoo_arguments(ap, "benchmarks/results/refine.md", "budgets,compression,adam,speed")
    ap.add_argument("--pairs", default=None, help="budgets: comma-separated a/b pairs (default: the zoo's four)")
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="budgets: comma-separated factors")
    args = ap.parse_args()
    cal, test, lines = fashion_mnist_setup(args, "Least-squares refinement, partial matching and compression")
    sections = args.sections.split(",")
    if "budgets" in sections:
        budgets(args, cal, test, lines)
    if "compression" in sections:
        compression(args, cal, test, lines)
    if "adam" in sections:
        adam(args, cal, lines)
    if "speed" in sections:
        speed(args, cal, lines)
    if "memory" in sections:
        memory(args, lines)
    if "options" in sections:
        options(args, cal, test, lines)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    extra = ((f" --pairs {args.pairs}" if args.pairs else "") + (f" --budgets {args.budgets}" if "budgets" in sections else "")
             + (f" --repeats {args.repeats}" if "speed" in sections else ""))
    lines += footer(f"python benchmarks/refine.py --zoo ../shared/zoo --calibration-size {args.calibration_size} "
                    f"--seed {args.seed} --sections {args.sections}{extra}", f"; peak RSS {peak:.0f} MiB")
    write_results(lines, args.out)


if __name__ == "__main__":
    main()
