"""Partial zipping (fuse(..., zip_until=...)): a fused trunk, then each model's own layers and head."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fusion
from alignment import discover
from alignment.errors import InvalidOptionError
from fusion.engine import HeadsError
from fusion.io import SidecarError, load_model_file, save_zipped
from fusion.zipped import CutError, ZippedModel, cut_points, forward_flops, resolve_cut
from tests.conftest import rel_err
from tests.tiny_models import build, logits

ARCHS = {
    "timm_resnet18": {"library": "timm", "name": "resnet18",
                      "kwargs": {"in_chans": 1, "channels": [16, 32, 64, 128], "stem_width": 16}},
    "timm_vit": {"library": "timm", "name": "vit_tiny_patch16_224",
                 "kwargs": {"img_size": 28, "patch_size": 7, "embed_dim": 64, "depth": 2, "num_heads": 4, "in_chans": 1}},
    "hf_vit": {"library": "transformers", "name": "ViTForImageClassification",
               "kwargs": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
                          "image_size": 28, "patch_size": 7, "num_channels": 1}},
}
MIDDLE = {"timm_resnet18": "layer2", "timm_vit": "blocks.0", "hf_vit": "vit.layers.0"}


def _pair(name):
    a, x = build(name, seed=0)
    b, _ = build(name, seed=1)
    cal = torch.randn(32, *x.shape[1:], generator=torch.Generator().manual_seed(5))
    return a, b, x, cal


@pytest.mark.parametrize("name", ["timm_resnet18", "timm_vit", "hf_vit"])
@pytest.mark.parametrize("heads", ["separate", "merged"])
def test_cut_at_input_is_the_ensemble_and_at_output_full_zipping(name, heads):
    """The two ends of partial zipping: nothing fused (each model whole: concatenated or averaged
    logits) and everything fused (the fully zipped model's output)."""
    a, b, x, cal = _pair(name)
    al = fusion.align([a, b], cal, method="zip")
    full = al.build(heads=heads)
    ens = al.build(heads=heads, zip_until="input")
    out = al.build(heads=heads, zip_until="output")
    assert isinstance(ens, ZippedModel) and ens.trunk is None
    with torch.no_grad():
        ya, yb = logits(a(x)), logits(b(x))
        want = torch.cat([ya, yb], -1) if heads == "separate" else (ya + yb) / 2
        assert rel_err(want, ens(x)) < 1e-6
        assert rel_err(logits(full(x)), out(x)) < 1e-5
        assert rel_err(want, out(x)) > 1e-2  # (the two ends differ)


def test_branches_do_not_run_the_layers_before_the_cut():
    """Every conv before the cut runs once (in the trunk); after it, once per model; nothing else."""
    a, b, x, cal = _pair("timm_resnet18")
    z = fusion.fuse([a, b], cal, method="zip", zip_until="layer2")
    ran: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, p=p: ran.append(p))
             for p, m in z.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        z(x)
    for h in hooks:
        h.remove()
    early = ("conv1", "layer1.", "layer2.")
    want = [f"trunk.{p}" for p, m in a.named_modules() if isinstance(m, nn.Conv2d) and p.startswith(early)]
    for i in range(2):
        want += [f"branches.{i}.{p}" for p, m in a.named_modules() if isinstance(m, nn.Conv2d) and not p.startswith(early)]
    assert sorted(ran) == sorted(want)
    rep = z.fusion_report.zip
    assert rep["cut"]["module"] == "layer2"
    assert rep["source_flops"][0] < rep["flops"] < 2 * rep["source_flops"][0]
    assert rep["params"] == sum(p.numel() for p in z.parameters())
    assert forward_flops(z, x) == rep["flops"]


@pytest.mark.parametrize("name", ["timm_resnet18", "timm_vit", "hf_vit"])
def test_zipped_model_saves_reloads_and_gives_the_same_logits(name, tmp_path):
    a, b, x, cal = _pair(name)
    z = fusion.fuse([a, b], cal, method="zip", zip_until=MIDDLE[name], heads="separate",
                    repair="reset_bn" if "resnet" in name else "none")
    branches = [{"arch": ARCHS[name], "num_classes": 10}] * 2
    path = save_zipped(z, tmp_path / "zipped", ARCHS[name], branches, list(range(10)) * 2, extra={"method": "zip"})
    loaded, spec = load_model_file(path)
    assert isinstance(loaded, ZippedModel) and spec.extra["method"] == "zip"
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), z(x))
    assert sum(p.numel() for p in loaded.parameters()) == z.fusion_report.zip["params"]


def test_cut_points_and_names(tiny):
    """Cuts come from the topology: stage and block boundaries are valid, a point inside a residual
    block is not; a cut is named by module, space or depth fraction."""
    model, x = tiny("timm_resnet18")
    graph = discover(model, x)
    cuts = [c.module for c in cut_points(model, graph, x)]
    assert cuts[0] is None and {"layer1", "layer2", "layer3", "layer4"} <= set(cuts)
    assert "layer2.0.conv1" not in cuts and "layer2.0.act1" not in cuts
    depths = [c.depth for c in cut_points(model, graph, x)]
    assert depths == sorted(depths) and depths[0] == 0.0 and depths[-1] < 1.0
    assert resolve_cut("layer3", model, graph, x).module == "layer3"
    assert resolve_cut("layer3.0.conv2", model, graph, x).module == "layer3"  # the stage's residual space
    assert resolve_cut(0.0, model, graph, x).at_input
    mid = resolve_cut(0.5, model, graph, x)
    assert mid.depth <= 0.5 and mid.module in cuts
    with pytest.raises(CutError, match="valid cuts"):
        resolve_cut("layer2.0.conv1", model, graph, x)
    with pytest.raises(CutError, match="neither"):
        resolve_cut("nope", model, graph, x)
    with pytest.raises(CutError, match=r"\[0, 1\]"):
        resolve_cut(1.5, model, graph, x)


def test_refined_cut_maps_reproduce_each_models_features():
    """With refine='lstsq' the unmerge maps at the cut are fitted by least squares to each model's own
    features (lower regression loss), and the branches keep their BatchNorm statistics."""
    a, b, x, cal = _pair("timm_resnet18")
    z = fusion.fuse([a, b], cal, method="zip", zip_until="layer2", refine="lstsq")
    fit = z.fusion_report.zip["fit"]
    assert len(fit) == 2 and all(f["loss_after"] < f["loss_before"] for f in fit)
    torch.testing.assert_close(z.branches[0].layer3[0].bn1.running_mean, a.layer3[0].bn1.running_mean)
    assert not torch.equal(z.trunk.layer1[0].bn1.running_mean, a.layer1[0].bn1.running_mean)


def test_zip_until_errors(tiny):
    a, b, x, cal = _pair("timm_resnet18")
    with pytest.raises(InvalidOptionError, match="reset_bn"):
        fusion.fuse([a, b], cal, method="zip", zip_until="layer2", repair="repair")
    with pytest.raises(CutError):
        fusion.fuse([a, b], cal, method="zip", zip_until=["layer2"])
    five = build("timm_resnet18")[0]
    five.reset_classifier(5)
    with pytest.raises(HeadsError, match="separate"):
        fusion.fuse([a, five], cal, method="zip", zip_until="layer2")


def test_a_zipped_model_changes_dtype_and_takes_the_sources_keyword_input():
    """Guards: a partially zipped ViT converts to float64 and bfloat16 like any model (its stand-ins'
    meta copies follow the dtype; before: a conv bias stayed float32), its unmerge maps are in the
    sources' dtype, and an HF zipped model takes ``pixel_values=`` as its sources do."""
    a, b, x, cal = _pair("timm_vit")
    z = fusion.fuse([a, b], cal, method="zip", zip_until=MIDDLE["timm_vit"], repair="none")
    with torch.no_grad():
        want = z(x)
        assert rel_err(z.double()(x.double()), want.double()) < 1e-5
        assert z.bfloat16()(x.bfloat16()).dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for n, t in z.named_buffers() if n.startswith("unmerge"))
    a64, b64 = a.double(), b.double()
    z64 = fusion.fuse([a64, b64], cal.double(), method="zip", zip_until=MIDDLE["timm_vit"], repair="none")
    assert {t.dtype for n, t in z64.named_buffers() if n.startswith("unmerge")} == {torch.float64}
    ha, hb, hx, hcal = _pair("hf_vit")
    hz = fusion.fuse([ha, hb], hcal, method="zip", zip_until=MIDDLE["hf_vit"], repair="none")
    with torch.no_grad():
        assert torch.equal(hz(pixel_values=hx), hz(hx))


@pytest.mark.parametrize("name", ["timm_vit", "hf_vit", "timm_resnet18"])
def test_every_parameter_of_a_zipped_model_gets_a_gradient(name, tmp_path):
    """Guards: fine-tuning a partially zipped model trains every parameter it holds (before: a timm
    ViT's branches kept the class token and position embedding, added to the features the cut
    replaces, as parameters with no gradient, which DistributedDataParallel refuses without
    find_unused_parameters; they were saved and counted in the report's size); those tensors
    stay in the module as unsaved buffers, and a file saved with them (older versions) still loads."""
    a, b, x, cal = _pair(name)
    z = fusion.fuse([a, b], cal, method="zip", zip_until=MIDDLE[name], heads="separate", repair="none")
    z(x).square().sum().backward()
    assert [n for n, p in z.named_parameters() if p.grad is None] == []
    assert z.fusion_report.zip["params"] == sum(p.numel() for p in z.parameters())
    if name == "timm_vit":
        assert not any(k.startswith("branches.") and k.endswith(("cls_token", "pos_embed")) for k in z.state_dict())
        assert {"branches.0.cls_token", "branches.1.pos_embed"} <= {n for n, _ in z.named_buffers()}
        assert sum(p.numel() for p in z.parameters()) < sum(p.numel() for p in a.parameters()) * 2
        branches = [{"arch": ARCHS[name], "num_classes": 10}] * 2
        path = save_zipped(z, tmp_path / "zipped", ARCHS[name], branches, list(range(20)), extra={"method": "zip"})
        import safetensors.torch
        state = safetensors.torch.load_file(str(path.with_suffix(".safetensors")))
        state["branches.0.cls_token"] = torch.randn_like(z.branches[0].cls_token)
        safetensors.torch.save_file(state, str(path.with_suffix(".safetensors")))
        import hashlib, json
        side = json.loads(path.with_suffix(".json").read_text())
        side["weights_sha256"] = hashlib.sha256(path.with_suffix(".safetensors").read_bytes()).hexdigest()
        path.with_suffix(".json").write_text(json.dumps(side))
        loaded, _ = load_model_file(path)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), z(x))


def test_a_zipped_model_moves_with_device_and_dtype_and_keeps_its_modes():
    """Guards: ``.to(device, dtype)`` (the usual ``model.to("cuda", torch.bfloat16)``) converts a
    zipped ViT's stand-ins too (before: the device argument hid the dtype change, and a call naming no
    dtype turned a float64 model's stand-ins to float32); a zipped model of eval-mode sources is in
    eval mode itself (before: the container was left in training mode, so code restoring
    ``model.training`` switched every BatchNorm to training); a ``labels=`` call is refused plainly."""
    a, b, x, cal = _pair("timm_vit")
    z = fusion.fuse([a, b], cal, method="zip", zip_until=MIDDLE["timm_vit"], repair="none")
    assert z.training is False and not any(m.training for m in z.modules())
    with torch.no_grad():
        want = z(x)
        z64 = copy.deepcopy(z).to("cpu", torch.float64)
        assert rel_err(z64(x.double()), want.double()) < 1e-5
        assert z64.to(memory_format=torch.contiguous_format)(x.double()).dtype == torch.float64
        assert copy.deepcopy(z).to(device="cpu", dtype=torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16
    a.train(), b.train()
    assert fusion.fuse([a, b], cal, method="zip", zip_until=MIDDLE["timm_vit"], repair="none").training is True
    with pytest.raises(CutError, match="labels="):
        z(x, labels=torch.zeros(len(x), dtype=torch.long))


def test_refinement_with_a_cut_at_the_input_is_skipped_and_reported():
    """Guards: ``zip_until="input"`` keeps every model whole, so ``refine="lstsq"`` has nothing to
    refine: it is skipped and listed as a fallback (before: a whole fused model was refitted, thrown
    away, and the report listed its refined layers)."""
    a, b, x, cal = _pair("timm_resnet18")
    with pytest.warns(UserWarning, match="skipped"):
        z = fusion.fuse([a, b], cal, method="zip", zip_until="input", refine="lstsq", heads="separate",
                       repair="none")
    assert any("refine='lstsq' skipped" in f for f in z.fusion_report.fallbacks)
    assert not z.fusion_report.refinement
    with torch.no_grad():
        assert rel_err(torch.cat([logits(a(x)), logits(b(x))], -1), z(x)) < 1e-6


def test_save_zipped_checks_what_it_is_given_and_a_loaded_resized_model_saves_again(tmp_path):
    """Guards: save_zipped refuses a model that is not zipped and a ``classes`` list that does not
    label every output (before: a raw AttributeError, and a file whose evaluation scored nonsense);
    a loaded zipped model of resized trunk widths can be saved again (before: the loader did not
    restore the trunk widths, so the second save was a shape mismatch)."""
    a, b, x, cal = _pair("timm_resnet18")
    z = fusion.fuse([a, b], cal, method="zip", zip_until=MIDDLE["timm_resnet18"], heads="separate", width=0.5)
    branches = [{"arch": ARCHS["timm_resnet18"], "num_classes": 10}] * 2
    with pytest.raises(SidecarError, match="save_model"):
        save_zipped(a, tmp_path / "plain", ARCHS["timm_resnet18"], branches, list(range(20)))
    with pytest.raises(SidecarError, match="20 outputs"):
        save_zipped(z, tmp_path / "short", ARCHS["timm_resnet18"], branches, list(range(10)))
    with pytest.raises(SidecarError, match="one entry per source model"):
        save_zipped(z, tmp_path / "one", ARCHS["timm_resnet18"], branches[:1], list(range(10)))
    path = save_zipped(z, tmp_path / "z", ARCHS["timm_resnet18"], branches, list(range(20)))
    loaded, _ = load_model_file(path)
    again = save_zipped(loaded, tmp_path / "again", ARCHS["timm_resnet18"], branches, list(range(20)))
    with torch.no_grad():
        torch.testing.assert_close(load_model_file(again)[0](x), z(x))


@pytest.mark.parametrize("name", ["timm_resnet18", "timm_vit", "hf_vit"])
def test_a_zipped_model_exports_and_traces(name):
    """Deployment: ``torch.export`` and ``torch.jit.trace`` follow a zipped model (the trunk runs to its
    end through parameter-free stand-ins instead of being stopped by an exception at the cut, and the
    stand-ins' shape runs are kept out of a trace), and what they capture computes its logits on
    another input."""
    a, b, x, cal = _pair(name)
    z = fusion.fuse([a, b], cal, method="zip", zip_until=MIDDLE[name], heads="separate", repair="none")
    other = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = z(other)
        exported = torch.export.export(z, (x,)).module()
        torch.testing.assert_close(exported(other), want)
        traced = torch.jit.trace(z, x)
        torch.testing.assert_close(traced(other), want)


def test_a_reset_after_refined_zipping_keeps_the_trunks_folded_norms():
    """Guards: the trunk is a copy of the refined fused model, and the norms refinement folded there
    stay as fitted through the default reset (they were matched by object, so the copy's were
    reset: the zipped model moved by 0.25% on batches of 8)."""
    a, b, x, _ = _pair("timm_resnet18")
    cal = [torch.randn(8, *x.shape[1:], generator=torch.Generator().manual_seed(s)) for s in range(4)]
    held_out = torch.randn(16, *x.shape[1:], generator=torch.Generator().manual_seed(9))
    al = fusion.align([a, b], cal, method="permute")
    reset = al.build(zip_until="layer2", refine="lstsq", repair="reset_bn")
    kept = al.build(zip_until="layer2", refine="lstsq", repair="none")
    assert reset.fusion_report.repaired == "none"
    with torch.no_grad():
        assert rel_err(reset(held_out), kept(held_out)) < 1e-6
