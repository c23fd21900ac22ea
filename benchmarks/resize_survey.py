"""Compression coverage: random-init timm models resized to half width (``fusion.resize.resize``,
``width=0.5``) on one Gaussian-noise image. A row passes when the resized model runs and its module
attributes are consistent (``fusion.modules.check_consistency``); a model the toolkit refuses gives
its ``FusionError`` (any other exception is a bug). The warnings column lists the attributes set
from the new tensor sizes of modules no handler knows; the timm form column the ``create_model``
arguments that rebuild the result (``fusion.io.timm_kwargs``; none: only the sidecar does).

    python benchmarks/resize_survey.py                      # every model (about 25 min on 2 cores)
    python benchmarks/resize_survey.py --only swin,mixer    # models whose name contains a string
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_file import footer, write_results  # noqa: E402

MODELS = [
    "vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "swin_tiny_patch4_window7_224", "beit_base_patch16_224",
    "maxvit_tiny_tf_224", "davit_tiny", "xcit_nano_12_p16_224", "tnt_s_patch16_224", "twins_svt_small", "pvt_v2_b0",
    "fastvit_t8", "edgenext_xx_small", "mobilevit_xxs", "vit_relpos_small_patch16_224", "poolformer_s12", "mixer_s16_224", "resmlp_12_224", "gmlp_ti16_224", "sequencer2d_s",
    "convnext_atto", "efficientnet_b0", "mobilenetv3_small_050", "regnetx_002", "resnext26ts",
    "levit_128s", "coat_lite_tiny", "focalnet_tiny_srf", "efficientformer_l1", "volo_d1_224",
    "eva02_tiny_patch14_224", "cait_xxs24_224", "nest_tiny", "swinv2_tiny_window8_256", "swinv2_cr_tiny_ns_224",
    "convit_tiny", "tiny_vit_5m_224", "efficientvit_m0", "efficientformerv2_s0",
]


def run(name: str, seed: int, **kwargs) -> dict:
    """Resize one model (``timm.create_model(name, **kwargs)``) to half width; its result, warnings
    and timm form."""
    import timm

    from alignment.errors import FusionError
    from fusion.io import timm_kwargs
    from fusion.modules import check_consistency
    from fusion.resize import resize

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    c, h, w = model.pretrained_cfg.get("input_size", (3, 224, 224))
    hw = kwargs.get("img_size")  # (a model built for other images)
    x = torch.randn(1, c, *((hw, hw) if hw else (h, w)))
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            half = resize(model, 0.5, x)
            with torch.no_grad():
                half(x)
        except FusionError as e:
            return {"result": f"refused: {type(e).__name__}: {str(e)[:150]}", "ok": None,
                    "seconds": time.perf_counter() - t0}
    problems = check_consistency(half)
    inferred = [str(w.message).split(": ", 1)[1].split(" (register")[0] for w in caught
                if "no handler" in str(w.message)]
    form = timm_kwargs(half, {"library": "timm", "name": name, "kwargs": kwargs}, 10)
    return {"result": "pass" if not problems else f"**inconsistent**: {problems[:2]}", "ok": not problems,
            "inferred": "; ".join(inferred)[:200], "form": form, "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    """Run the models (or those whose name contains one of ``--only``), print and write the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None, help="comma-separated substrings of the model names to run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/resize_survey.md")
    args = ap.parse_args(argv)
    only = args.only.split(",") if args.only else None
    entries = [(m, {}) if isinstance(m, str) else m for m in MODELS]  # (a name, or a name and its kwargs)
    models = [(m, kw) for m, kw in entries if only is None or any(o in m for o in only)]
    lines = ["# Compression coverage: timm models resized to half width", "",
             "Random init, one Gaussian-noise image at the model's input size, `resize(model, 0.5, x)`, then one "
             "forward. *inferred*: attributes of modules with no handler set from their tensors' new sizes (warned). "
             "*timm form*: `create_model` arguments that rebuild the result.", "",
             "| model | result | inferred | timm form | seconds |", "|---|---|---|---|---:|"]
    bugs = 0
    for name, kwargs in models:
        try:
            r = run(name, args.seed, **kwargs)
            row = (f"| {name} | {r['result']} | {r.get('inferred', '')} | "
                   f"{'' if r['ok'] is None else r.get('form')} | {r['seconds']:.0f} |")
            bugs += r["ok"] is False
        except Exception as e:  # not a FusionError: a bug, listed so that one model does not hide the others
            bugs += 1
            row = f"| {name} | **{type(e).__name__}**: {str(e)[:150]} | | | |"
        print(row, flush=True)
        lines.append(row.replace("\n", " "))
    passed = sum(" | pass | " in line for line in lines)
    lines += ["", f"{passed} of {len(models)} resize; {len(models) - passed - bugs} refused with a FusionError; "
              f"{bugs} other failures."]
    cmd = "python benchmarks/resize_survey.py" + (f" --only {args.only}" if args.only else "")
    write_results(lines + footer(cmd), args.out)
    return 1 if bugs else 0


if __name__ == "__main__":
    sys.exit(main())
