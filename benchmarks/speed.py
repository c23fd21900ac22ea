"""Benchmark: how close a whole fusion comes to the forward passes it cannot avoid.

For each job (models, method, repair) it measures, in one process, the *forward floor* (every
source model run once over the calibration data, eval mode, no gradients, the runner's batch size)
and each stage of ``fusion.fuse`` (discover / collect / match / apply / refine / repair), and reports
the ratio total / floor (median of ``--repeats`` runs). ``--many N`` adds a job fusing N ResNet-18s
(the zoo's two same-task models and randomly permuted copies of them: the work is the same as for N
independently trained models).

    python benchmarks/speed.py --zoo ../shared/zoo --out benchmarks/results/speed.md
"""

from __future__ import annotations

import argparse
import time

import torch

import fusion
from results_file import footer, write_results
from alignment import discover, permute
from alignment.runner import stream
from fusion.experiments.data import calibration_subset, load_fashion_mnist
from fusion.experiments.evaluate import accuracy
from fusion.experiments.zoo import load_model

STAGES = ("discover", "collect", "match", "apply", "refine", "repair")
JOBS = ["r18w32-s0,r18w32-s1:permute:reset_bn", "vit128-s0,vit128-s1:permute:none"]


def floor_seconds(models, data, device) -> float:
    """Wall time of every model's forward pass over ``data`` (the runner, no hooks)."""
    t = time.perf_counter()
    stream(models, data, device=device)
    return time.perf_counter() - t


def many_models(zoo: str, n: int) -> list[torch.nn.Module]:
    """``n`` ResNet-18 (width 32) models: the two zoo seeds, then permuted copies of them."""
    base = [load_model(name, zoo)[0] for name in ("r18w32-s0", "r18w32-s1")]
    graph = discover(base[0], torch.randn(2, 1, 28, 28))
    out = list(base)
    for k in range(n - len(base)):
        out.append(permute(base[k % 2], graph, graph.random_permutations(seed=100 + k)))
    return out[:n]


def run_job(label, models, cal, test, method, repair, repeats, device, positions_per_image=None):
    rows = []
    for _ in range(repeats):
        floor = floor_seconds(models, cal, device)
        t = time.perf_counter()
        fused = fusion.fuse(models, cal, method=method, repair=repair, device=device,
                            positions_per_image=positions_per_image)
        total = time.perf_counter() - t
        # a repair that reads the fused model's activations needs one more pass: the job's own floor
        extra = floor_seconds([fused], cal, device) if repair != "none" else 0.0
        rows.append((total / floor, floor, total, dict(fused.fusion_report.seconds), fused, floor + extra))
    rows.sort(key=lambda r: r[0])
    ratio, floor, total, sec, fused, job_floor = rows[len(rows) // 2]
    acc = 100 * accuracy(fused, test, device=device) if test is not None else float("nan")
    cells = " | ".join(f"{sec.get(k, 0.0):.2f}" for k in STAGES)
    spread = f"{min(r[0] for r in rows):.2f}-{max(r[0] for r in rows):.2f}"
    if positions_per_image is not None:
        label += f" (positions_per_image={positions_per_image})"
    return (f"| {label} | {len(models)} | {method} + {repair} | {floor:.2f} | {cells} | {total:.2f} | "
            f"**{ratio:.2f}x** ({spread}) | {job_floor:.2f} | {total / job_floor:.2f}x | {acc:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default=None, help="zoo folder (default: $FUSION_ZOO)")
    ap.add_argument("--out", default="benchmarks/results/speed.md")
    ap.add_argument("--calibration-size", type=int, default=2000)
    ap.add_argument("--jobs", default=";".join(JOBS),
                    help="';'-separated 'a,b[,...]:method:repair[:K]' jobs (zoo names; K: statistics on K "
                         "random positions or tokens per image)")
    ap.add_argument("--many", type=int, default=8, help="also fuse this many ResNet-18s (0: skip)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the test-set accuracy column")
    args = ap.parse_args()
    train = load_fashion_mnist("train")
    test = None if args.no_accuracy else load_fashion_mnist("test")
    cal = calibration_subset(train, args.calibration_size, seed=0)
    lines = [
        "# Speed: whole fusion against the forward floor",
        "",
        f"{args.calibration_size} Fashion-MNIST calibration images; *floor*: every source model run once "
        "over them (eval, no gradients, the runner's batches); stages from the fusion report; ratio = "
        f"total / floor, median of {args.repeats} runs (range in brackets), floor and total measured "
        "back to back in one process. *job floor*: the floor plus, for a repair that reads the fused model's "
        "activations (BatchNorm reset), one pass of the fused model, and the total against it. Accuracy: the "
        "fused model on the 10,000 test images.",
        "",
        "| models | N | method + repair | floor s | " + " | ".join(f"{k} s" for k in STAGES)
        + " | total s | ratio | job floor s | total / job floor | accuracy |",
        "|---|---:|---|---:|" + "---:|" * len(STAGES) + "---:|---:|---:|---:|---:|",
    ]
    for job in [j for j in args.jobs.split(";") if j.strip()]:
        names, method, repair, *ppi = job.split(":")
        models = [load_model(n, args.zoo)[0] for n in names.split(",")]
        lines.append(run_job(names.replace(",", " + "), models, cal, test, method, repair, args.repeats, args.device,
                             int(ppi[0]) if ppi else None))
        print(lines[-1], flush=True)
    if args.many:
        models = many_models(args.zoo, args.many)
        lines.append(run_job(f"r18w32 x {args.many} (s0, s1 and permuted copies)", models, cal, test, "permute",
                             "reset_bn", args.repeats, args.device))
        print(lines[-1], flush=True)
    jobs = f" --jobs '{args.jobs}'" if args.jobs != ";".join(JOBS) else ""
    lines += footer(f"python benchmarks/speed.py --calibration-size {args.calibration_size} --many {args.many} "
                    f"--repeats {args.repeats} --device {args.device}{jobs}",
                    f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else "")
    write_results(lines, args.out)


if __name__ == "__main__":
    main()
