"""Architecture coverage: random-init timm, torchvision and transformers models, each fused with a
randomly permuted copy of itself (``method="permute"``, no repair). Discovery must find the model's
spaces, the permuted copy must compute the same function, and the fused model must be the model
again: both relative logit errors are reported, and a row passes when both are below 1e-4.

No dataset or checkpoint is needed (Gaussian-noise inputs). Weight matrices are drawn at random
(scale 1/sqrt(fan-in)) and BatchNorm running statistics set by two training-mode passes first, so
that the logits are neither zero nor underflowing.

    python benchmarks/architectures.py                  # every entry (about 10 min on 2 cores)
    python benchmarks/architectures.py --only tv:swin   # entries whose id contains a string
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_file import footer, write_results  # noqa: E402


def _timm(name: str, **kw) -> Callable[[], Any]:
    def build():
        import timm

        return timm.create_model(name, pretrained=False, num_classes=7, **kw)
    return build


def _tv(name: str, **kw) -> Callable[[], Any]:
    def build():
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=7, **kw)
    return build


def _hf(config: str, model: str, **kw) -> Callable[[], Any]:
    def build():
        import transformers

        return getattr(transformers, model)(getattr(transformers, config)(num_labels=7, **kw))
    return build


_VIT = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=96)
_PYRAMID = dict(hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2])

# (id, builder, image size): small sizes where the architecture allows them
ENTRIES: list[tuple[str, Callable[[], Any], int]] = [
    ("timm:test_vit (dynamic_img_size)", _timm("test_vit"), 160),
    ("timm:efficientformerv2_s0", _timm("efficientformerv2_s0"), 224),
    ("timm:efficientformer_l1", _timm("efficientformer_l1"), 224),
    ("timm:tiny_vit_5m_224", _timm("tiny_vit_5m_224"), 64),
    ("timm:focalnet_tiny_srf", _timm("focalnet_tiny_srf"), 64),
    ("timm:mixer_s32_224", _timm("mixer_s32_224", img_size=64), 64),
    ("timm:resmlp_12_224", _timm("resmlp_12_224", img_size=64), 64),
    ("timm:gmlp_ti16_224", _timm("gmlp_ti16_224", img_size=64), 64),
    ("timm:ghostnetv2_100", _timm("ghostnetv2_100"), 64),
    ("timm:bat_resnext26ts", _timm("bat_resnext26ts"), 256),
    ("timm:mvitv2_tiny", _timm("mvitv2_tiny", img_size=64), 64),
    ("timm:mobilenetv4_conv_small", _timm("mobilenetv4_conv_small"), 64),
    ("timm:efficientvit_m0", _timm("efficientvit_m0", img_size=64), 64),
    ("timm:convit_tiny", _timm("convit_tiny", img_size=64), 64),
    ("timm:nextvit_small", _timm("nextvit_small"), 64),
    ("timm:resnest14d", _timm("resnest14d"), 64),
    ("timm:repvgg_a0", _timm("repvgg_a0"), 64),
    ("timm:mobileone_s0", _timm("mobileone_s0"), 64),
    ("timm:caformer_s18", _timm("caformer_s18"), 64),
    ("timm:hiera_tiny_224", _timm("hiera_tiny_224", img_size=64), 64),
    ("timm:fastvit_t8", _timm("fastvit_t8"), 64),
    ("timm:levit_128s", _timm("levit_128s", img_size=64), 64),
    ("timm:twins_svt_small", _timm("twins_svt_small", img_size=64), 64),
    ("timm:xcit_nano_12_p16_224", _timm("xcit_nano_12_p16_224", img_size=64), 64),
    ("timm:lcnet_050", _timm("lcnet_050"), 64),
    ("tv:densenet121", _tv("densenet121"), 64),
    ("tv:mnasnet0_5", _tv("mnasnet0_5"), 64),
    ("tv:convnext_tiny", _tv("convnext_tiny"), 64),
    ("tv:swin_t", _tv("swin_t"), 64),
    ("tv:swin_v2_t", _tv("swin_v2_t"), 64),
    ("tv:maxvit_t", _tv("maxvit_t"), 224),
    ("tv:inception_v3", _tv("inception_v3", aux_logits=False, init_weights=True), 96),
    ("tv:efficientnet_v2_s", _tv("efficientnet_v2_s"), 64),
    ("tv:resnext50_32x4d", _tv("resnext50_32x4d"), 64),
    ("tv:vit_b_16", _tv("vit_b_16"), 224),
    ("hf:DeiT", _hf("DeiTConfig", "DeiTForImageClassification", **_VIT), 32),
    ("hf:Data2VecVision", _hf("Data2VecVisionConfig", "Data2VecVisionForImageClassification", **_VIT), 32),
    ("hf:ConvNextV2", _hf("ConvNextV2Config", "ConvNextV2ForImageClassification", hidden_sizes=[16, 32, 32, 48],
                          depths=[1, 1, 1, 1]), 64),
    ("hf:EfficientNet", _hf("EfficientNetConfig", "EfficientNetForImageClassification", image_size=64,
                            width_coefficient=0.25, depth_coefficient=0.2, hidden_dim=320), 64),
    ("hf:RegNet", _hf("RegNetConfig", "RegNetForImageClassification", hidden_sizes=[16, 32], depths=[1, 1],
                      embedding_size=16, groups_width=8), 32),
    ("hf:BiT", _hf("BitConfig", "BitForImageClassification", hidden_sizes=[32, 64, 64, 64], depths=[1, 1, 1, 1],
                   embedding_size=32, num_groups=8), 64),
    ("hf:FocalNet", _hf("FocalNetConfig", "FocalNetForImageClassification", image_size=32, patch_size=2,
                        embed_dim=16, depths=[1, 1], focal_levels=[2, 2], focal_windows=[3, 3]), 32),
    ("hf:PVTv2", _hf("PvtV2Config", "PvtV2ForImageClassification", image_size=64, **_PYRAMID), 64),
    ("hf:SegFormer", _hf("SegformerConfig", "SegformerForImageClassification", decoder_hidden_size=32,
                         **_PYRAMID), 64),
    ("hf:SwiftFormer", _hf("SwiftFormerConfig", "SwiftFormerForImageClassification", depths=[1, 1, 1, 1],
                           embed_dims=[16, 24, 32, 48]), 64),
    ("hf:Hiera", _hf("HieraConfig", "HieraForImageClassification", embed_dim=16, image_size=[64, 64],
                     patch_size=[7, 7], patch_stride=[4, 4], patch_padding=[3, 3], depths=[1, 1, 1, 1],
                     num_heads=[1, 1, 2, 2], mlp_ratio=2.0, masked_unit_size=[8, 8], query_stride=[2, 2]), 64),
    ("hf:Dinov2WithRegisters", _hf("Dinov2WithRegistersConfig", "Dinov2WithRegistersForImageClassification",
                                   num_register_tokens=2, **_VIT), 32),
    ("hf:MobileNetV2", _hf("MobileNetV2Config", "MobileNetV2ForImageClassification", image_size=64,
                           depth_multiplier=0.35), 64),
]


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def prepare(model: torch.nn.Module, size: int, seed: int) -> torch.nn.Module:
    """Draw every weight matrix at random with scale 1/sqrt(fan-in) (libraries initialise some to
    zero, e.g. classifier heads, and some initialisations make the logits underflow, e.g.
    transformers' EfficientNet: relative errors would be 0/0), set BatchNorm statistics by two
    training-mode passes on noise, and return the model in eval mode. Vectors (biases, norm
    affines, layer scales) are left as they are."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)
        model.train()
        for _ in range(2):
            model(torch.randn(8, 3, size, size, generator=g))
    return model.eval()


def run(build: Callable[[], Any], size: int, seed: int, samples: int) -> dict:
    """Fuse one model with a permuted copy; spaces, both relative errors and seconds."""
    import fusion
    from alignment import discover, permute

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = prepare(build(), size, seed)
    x = torch.randn(samples, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    graph = discover(model, x[:2])
    copy = permute(model, graph, graph.random_permutations(seed=seed + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = fusion.fuse([model, copy], x, method="permute", repair="none")
    with torch.no_grad():
        y, y_copy, y_fused = (_logits(m(x)) for m in (model, copy, fused))
    err = lambda a: ((a - y).norm() / y.norm()).item()  # noqa: E731
    return {"spaces": len(graph.spaces), "copy": err(y_copy), "fused": err(y_fused),
            "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    """Run the entries (or those whose id contains ``--only``), print and write the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None, help="run the entries whose id contains this string")
    ap.add_argument("--samples", type=int, default=8, help="calibration images (Gaussian noise)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/architectures.md")
    args = ap.parse_args(argv)
    entries = [e for e in ENTRIES if args.only is None or args.only in e[0]]
    lines = ["# Architecture coverage: each model fused with a permuted copy of itself", "",
             "Random init, Gaussian-noise inputs, `method=\"permute\"`, no repair. `copy` and `fused`: relative "
             "logit error of the permuted copy and of the fused model against the model (pass: both < 1e-4).", "",
             "| model | image size | spaces | copy | fused | seconds | result |", "|---|---:|---:|---:|---:|---:|---|"]
    failed = 0
    for name, build, size in entries:
        try:
            r = run(build, size, args.seed, args.samples)
            ok = max(r["copy"], r["fused"]) < 1e-4
            row = (f"| {name} | {size} | {r['spaces']} | {r['copy']:.1e} | {r['fused']:.1e} | {r['seconds']:.0f} | "
                   f"{'pass' if ok else '**FAIL**'} |")
        except Exception as e:  # a row per failure, so that one model does not hide the others
            ok = False
            row = f"| {name} | {size} | | | | | **{type(e).__name__}**: {str(e)[:120]} |"
        failed += not ok
        print(row, flush=True)
        lines.append(row)
    lines.append("")
    lines.append(f"{len(entries) - failed} of {len(entries)} pass.")
    cmd = "python benchmarks/architectures.py" + (f" --only {args.only}" if args.only else "")
    write_results(lines + footer(cmd), args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
