"""Stage times of a fusion at real widths: a random-init timm model fused with a randomly permuted
copy of itself (the fused model must be the model again: the relative logit error is reported), by
one or more methods (``--methods permute,ot,zip``: each must recover the model). With ``--pair
independent`` the model is fused with a second, independently initialised one instead: the plans
are then no permutations (zip and merge average clusters, OT splits mass), which is the work of a
real fusion; the error column is then the fused model's logit error against the first model, for
information only.

No dataset or checkpoint is needed: inputs are Gaussian noise, so the numbers measure the cost of
each stage (statistics, matching, applying the maps) at the widths of ViT-B/16 or ResNet-50, not
accuracy.

    python benchmarks/wide.py --models vit_base_patch16_224 --image-size 64 --calibration-size 128
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_file import footer, write_results  # noqa: E402


def run(name: str, image_size: int, samples: int, seed: int, method: str = "permute",
        pair: str = "copy") -> dict:
    """Fuse ``name`` (random init) with a permuted copy (``pair="copy"``) or an independently
    initialised model (``"independent"``) by ``method``; stage seconds, total and logit error."""
    import timm

    import fusion
    from alignment import discover, permute

    kw = {"img_size": image_size} if "vit" in name else {}
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, image_size, image_size, generator=g)
    graph = discover(model, x)
    if pair == "copy":
        copy = permute(model, graph, graph.random_permutations(seed=seed + 1))
    else:
        torch.manual_seed(seed + 1)
        copy = timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()
    cal = torch.randn(samples, 3, image_size, image_size, generator=g)
    t = time.perf_counter()
    fused = fusion.fuse([model, copy], cal, method=method, repair="none")
    total = time.perf_counter() - t
    with torch.no_grad():
        y = model(x)
        err = float((fused(x) - y).norm() / y.norm())
    return {"seconds": dict(fused.fusion_report.seconds), "total": total, "error": err,
            "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    """Run the models named on the command line and write the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit_base_patch16_224", help="comma-separated timm model names")
    ap.add_argument("--methods", default="permute", help="comma-separated methods (permute, ot, zip, merge, ...)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--calibration-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pair", choices=("copy", "independent"), default="copy",
                    help="fuse with a permuted copy (default) or an independently initialised model")
    ap.add_argument("--out", default="benchmarks/results/wide.md")
    args = ap.parse_args()
    title = "its permuted copy" if args.pair == "copy" else "an independently initialised model"
    error = ("relative logit error of the fused model against the model (0 = recovered exactly)" if args.pair == "copy"
             else "relative logit error of the fused model against the first model (information only)")
    lines = [f"# Fusion at real widths: a model with {title}", "",
             f"Random-init timm models, {args.calibration_size} Gaussian calibration images at "
             f"{args.image_size} px, no repair; seconds per stage from the fusion report; "
             f"error: {error}.", "",
             "| model | method | parameters | discover s | collect s | match s | apply s | total s | error |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in args.models.split(","):
        for method in args.methods.split(","):
            r = run(name, args.image_size, args.calibration_size, args.seed, method, args.pair)
            s = r["seconds"]
            row = (f"| {name} | {method} | {r['params'] / 1e6:.1f}M | {s.get('discover', 0):.1f} | "
                   f"{s.get('collect', 0):.1f} | {s.get('match', 0):.1f} | {s.get('apply', 0):.1f} | {r['total']:.1f} | "
                   f"{r['error']:.1e} |")
            print(row, flush=True)
            lines.append(row)
    cmd = " ".join(["python benchmarks/wide.py"] + sys.argv[1:])
    write_results(lines + footer(cmd), args.out)


if __name__ == "__main__":
    main()
