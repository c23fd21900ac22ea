"""Resizing helper: narrower copies that run, with consistent module attributes."""

from __future__ import annotations

import math
import warnings

import pytest
import timm
import torch
from torch import nn

from alignment import discover
from fusion.modules import check_consistency
from fusion.resize import WidthError, resize, resize_like, selection_indices
from tests import tiny_models
from tests.conftest import rel_err
from tests.tiny_models import logits


def _params(m):
    return sum(p.numel() for p in m.parameters())


def test_halve_timm_resnet18(tiny):
    model, x = tiny("timm_resnet18")
    small = resize(model, 0.5, x)
    assert small.layer1[0].conv1.out_channels == 8 and small.layer4[1].bn2.num_features == 64
    assert small.fc.in_features == 64 and small.num_features == 64
    assert check_consistency(small) == []
    with torch.no_grad():
        assert logits(small(x)).shape == (2, 10)
    assert model.layer1[0].conv1.out_channels == 16  # input untouched


def test_halve_timm_vit(tiny):
    model, x = tiny("timm_vit")
    small = resize(model, 0.5, x)
    attn = small.blocks[0].attn
    assert small.embed_dim == 32 and small.num_features == 32
    assert (attn.num_heads, attn.head_dim) == (4, 8) and attn.scale == pytest.approx(8 ** -0.5)
    assert small.blocks[0].mlp.fc1.out_features == 128 and small.norm.normalized_shape == (32,)
    assert check_consistency(small) == []
    with torch.no_grad():
        assert logits(small(x)).shape == (2, 10)


def test_halve_hf_vit(tiny):
    model, x = tiny("hf_vit")
    small = resize(model, 0.5, x)
    assert small.config.hidden_size == 32 and small.config.intermediate_size == 64
    assert check_consistency(small) == []
    with torch.no_grad():
        assert logits(small(x)).shape == (2, 10)
    assert model.config.hidden_size == 64


def test_resize_keeps_first_features_exactly():
    model = tiny_models.TinyMLP(width=8).eval()
    x = torch.randn(3, 1, 8, 8)
    small = resize(model, 0.5, x)
    assert torch.equal(small.fc1.weight, model.fc1.weight[:4])
    assert torch.equal(small.fc2.weight, model.fc2.weight[:4, :4])
    assert torch.equal(small.fc3.weight, model.fc3.weight[:, :4])


def test_scores_choose_features():
    model = tiny_models.TinyMLP(width=8).eval()
    x = torch.randn(3, 1, 8, 8)
    graph = discover(model, x)
    scores = {"fc1": torch.tensor([0, 9, 0, 8, 0, 0, 7, 0.0])}
    idx = selection_indices(graph, {"fc1": 3, "*": 1.0}, scores)
    assert idx["fc1"].tolist() == [1, 3, 6]
    assert selection_indices(graph, 0.5)["fc1"].tolist() == [0, 1, 2, 3]


def test_resize_into_user_built_target(tiny):
    model, x = tiny("timm_resnet18")
    target = tiny_models.timm_resnet18((8, 16, 32, 64)).eval()
    out = resize_like(model, target, x)
    assert type(out) is type(target)
    for (n, a), (_, b) in zip(out.state_dict().items(), target.state_dict().items()):
        assert a.shape == b.shape, n
    assert torch.equal(out.layer1[0].conv1.weight, model.layer1[0].conv1.weight[:8])


def test_width_errors():
    model = tiny_models.TinyMLP(width=8).eval()
    x = torch.randn(3, 1, 8, 8)
    with pytest.raises(WidthError, match="positive"):
        resize(model, -0.5, x)
    with pytest.raises(ValueError, match="example_input"):
        resize(model, 0.5)


@pytest.mark.parametrize("name", ["mlp", "cnn", "timm_resnet18", "timm_vit", "hf_vit"])
def test_widening_repeats_units_and_keeps_the_function(tiny, name):
    # Net2Net: copies split their consumers' weights; attention logits keep their scale
    model, x = tiny(name)
    wide = resize(model, 2.0, x)
    graph, wgraph = discover(model, x), discover(wide, x)
    assert all(wgraph[s.name].width == 2 * s.width for s in graph.spaces if s.kind == "features")
    with torch.no_grad():
        assert rel_err(tiny_models.logits(model(x)), tiny_models.logits(wide(x))) < 1e-5


def test_uneven_widening_under_a_layernorm_warns_and_bn_networks_stay_exact(tiny):
    """Guards the promise that a widened model computes the same function: it holds for BatchNorm
    networks at any factor and for LayerNorm ones at integer factors; a ViT widened by 1.5 changes
    its logits (the LayerNorm statistics see uneven repeats), and resize says so, naming the norm."""
    from alignment.errors import FusionWarning

    cnn, xc = tiny("timm_resnet18")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FusionWarning)
        wide = resize(cnn, 1.5, xc)
        with torch.no_grad():
            assert rel_err(tiny_models.logits(cnn(xc)), tiny_models.logits(wide(xc))) < 1e-5
        vit, xv = tiny("timm_vit")
        resize(vit, 2.0, xv)
    with pytest.warns(FusionWarning, match=r"LayerNorm 'blocks\.0\.norm1' normalises over space .* 64 units are "
                                           r"repeated unevenly to 96"):
        uneven = resize(vit, 1.5, xv)
    with torch.no_grad():
        assert rel_err(tiny_models.logits(vit(xv)), tiny_models.logits(uneven(xv))) > 1e-3


def test_a_width_factor_rounds_head_dim_and_an_absolute_width_must_split_into_heads(tiny):
    """Guards: heads keep their count; a factor (0.3 of 64 dims in 4 heads) rounds head_dim (16 ->
    5) instead of failing on a width (19) that 4 heads cannot split; an int width must split."""
    vit, x = tiny("timm_vit")
    small = resize(vit, 0.3, x)
    assert small.blocks[0].attn.num_heads == 4 and small.blocks[0].attn.head_dim == 5
    assert small.blocks[0].attn.qkv.out_features == 3 * 20
    with torch.no_grad():
        assert tiny_models.logits(small(x)).shape == (2, 10)
    with pytest.raises(WidthError, match="a width of 19 does not split into 4 heads; give a multiple of 4"):
        resize(vit, {"blocks.0.attn.qkv#0": 19, "*": 1.0}, x)


def test_widening_with_scores_repeats_the_best_units():
    g = discover(tiny_models.TinyMLP(width=4).eval(), torch.randn(2, 1, 8, 8))
    idx = selection_indices(g, 6, scores={"fc1": torch.tensor([0.1, 0.9, 0.5, 0.2])})
    assert idx["fc1"].tolist() == [0, 1, 2, 3, 1, 2]


def _conv_flatten(c: int, pool: bool, seed: int = 0, positions: int = 4) -> torch.nn.Sequential:
    """Conv -> Flatten -> Linear (a LeNet/VGG-style classifier): the flattened space is the conv's
    channels x ``positions**2`` positions (after an adaptive pool, else the 4 x 4 input's 16)."""
    torch.manual_seed(seed)
    nn = torch.nn
    pool_layers = [nn.AdaptiveAvgPool2d(positions)] if pool else []
    return nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), *pool_layers, nn.Flatten(),
                         nn.Linear(c * (positions ** 2 if pool else 16), 6), nn.ReLU(), nn.Linear(6, 3)).eval()


@pytest.mark.parametrize("pool", [True, False], ids=["avgpool_flatten", "flatten"])
def test_a_flatten_after_a_conv_resizes_with_its_channels(pool):
    """Guards: the flattened space (channels x positions, blocks indexed by the channel space)
    follows its channels at any width: narrowing keeps exactly the selected channels' blocks of the
    consumer's weights, and widening by 2 or 1.5 keeps the function (Net2Net), as for other layers."""
    model = _conv_flatten(8, pool)
    x = torch.randn(6, 1, 4, 4)
    idx = torch.tensor([1, 3, 4, 6])
    small = resize(model, {"0": 4, "*": 1.0}, x, scores={"0": torch.tensor([0, 5, 0, 4, 3, 0, 2, 0.0])})
    fc = len(model) - 3
    assert torch.equal(small[0].weight, model[0].weight[idx])
    assert torch.equal(small[fc].weight, model[fc].weight.view(6, 8, 16)[:, idx].reshape(6, 64))
    for factor in (2.0, 1.5):
        wide = resize(model, factor, x)
        assert wide[fc].in_features == int(round(8 * factor)) * 16
        with torch.no_grad():
            assert rel_err(model(x), wide(x)) < 1e-5


@pytest.mark.parametrize("pool", [True, False], ids=["avgpool_flatten", "flatten"])
def test_a_flatten_after_a_conv_fuses_across_widths(pool):
    """Guards: models whose flattened space differs in channel count fuse with ot, permute and merge
    (the flattened blocks follow the rectangular channel plan), a model fuses with a permuted copy
    of itself exactly, and fusing one model into a wider target keeps its function."""
    import fusion
    from alignment.permute import permute

    x = torch.randn(12, 1, 4, 4)
    wide, narrow = _conv_flatten(8, pool, seed=0), _conv_flatten(4, pool, seed=1)
    fc = len(wide) - 3
    for method in ("ot", "permute", "merge"):
        fused = fusion.fuse([wide, narrow], x, method=method, repair="none")
        assert fused[fc].in_features == 8 * 16 and fused[0].out_channels == 8
        with torch.no_grad():
            assert fused(x).shape == (12, 3)
    graph = discover(wide, x)
    copy = permute(wide, graph, graph.random_permutations(seed=2))
    with torch.no_grad():
        y = wide(x)
        assert rel_err(y, fusion.fuse([wide, copy], x, method="permute", repair="none")(x)) < 1e-5
        assert rel_err(y, fusion.fuse([wide], x, method="ot", width=2.0, repair="none")(x)) < 1e-5


def test_a_flatten_of_other_positions_is_refused_before_any_leaf_is_solved():
    """Guards: a genuine mismatch of a flattened space (the same channels laid out over 16 positions
    in one model and 4 in the other) is a SpaceMismatchError naming the space from the structure
    check on the graphs alone (no statistics needed; a walk runs it when made, before any leaf is
    solved), while other channel counts pass it."""
    from alignment.errors import SpaceMismatchError
    from alignment.leaves import select_leaf
    from alignment.structure import Walk, check_structures

    x = torch.randn(2, 1, 4, 4)
    g16, g4 = discover(_conv_flatten(8, True), x), discover(_conv_flatten(8, True, positions=2), x)
    g_narrow = discover(_conv_flatten(4, True), x)
    check_structures([g16, g_narrow], g16)
    check_structures([g_narrow], g16)
    flat = next(s.name for s in g16.spaces if s.width == 128)
    with pytest.raises(SpaceMismatchError, match=rf"space '{flat}': blocks of 4 features in model 1 but 16"):
        check_structures([g16, g4], g16)
    with pytest.raises(SpaceMismatchError, match="blocks of 4 features in model 0 but 16"):
        Walk([g4], g16, select_leaf)


def _grouped(c: int = 8, groups: int = 2, seed: int = 0) -> torch.nn.Sequential:
    """1x1 conv -> grouped 3x3 conv -> grouped 1x1 conv -> pool -> linear (ResNeXt/RegNet-style),
    with random BatchNorm statistics and affine weights (so no rescaling of a space hides)."""
    torch.manual_seed(seed)
    nn = torch.nn
    m = nn.Sequential(nn.Conv2d(1, c, 1), nn.BatchNorm2d(c), nn.ReLU(),
                      nn.Conv2d(c, c, 3, padding=1, groups=groups), nn.BatchNorm2d(c), nn.ReLU(),
                      nn.Conv2d(c, c, 1, groups=groups), nn.BatchNorm2d(c), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 3))
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.1)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.normal_(0, 0.1)
    return m.eval()


def test_widening_a_grouped_conv_keeps_the_function_and_equal_groups():
    """Guards: a grouped (not depthwise) conv's input space is structured in groups like heads but is
    no attention query-key space (the conv consumes it through its dims-within-group axis), so
    widening by 2 or 1.5 keeps the function exactly (it used to be rescaled by the query-key logit
    correction, silently: rel. error 1e-2); every width keeps the group count with equal groups, and
    an absolute width that the groups cannot split is refused."""
    from alignment.maps import query_key_spaces

    model, x = _grouped(), torch.randn(4, 1, 8, 8)
    for factor, c in ((2.0, 16), (1.5, 12), (0.5, 4)):
        resized = resize(model, factor, x)
        for i in (3, 6):
            assert (resized[i].groups, resized[i].in_channels, resized[i].out_channels) == (2, c, c)
        assert resized[11].in_features == c
        if factor > 1:
            with torch.no_grad():
                assert rel_err(model(x), resized(x)) < 1e-5
    assert query_key_spaces(discover(model, x)) == []
    with pytest.raises(WidthError, match="does not split into 2 heads"):
        resize(model, {"0": 9, "*": 1.0}, x)


def test_grouped_conv_fuses_across_widths_and_with_its_permuted_copy():
    """Guards: grouped-conv models of different widths fuse with ot, a model fuses exactly with a
    permuted copy of itself, and fusing one model into a wider target (ot) keeps its function."""
    import fusion
    from alignment.permute import permute

    x = torch.randn(12, 1, 8, 8)
    wide, narrow = _grouped(8, seed=0), _grouped(4, seed=1)
    fused = fusion.fuse([wide, narrow], x, method="ot", repair="none")
    assert (fused[3].groups, fused[3].out_channels) == (2, 8)
    with torch.no_grad():
        assert torch.isfinite(fused(x)).all()
    graph = discover(wide, x)
    copy = permute(wide, graph, graph.random_permutations(seed=2))
    with torch.no_grad():
        y = wide(x)
        assert rel_err(y, copy(x)) < 1e-5
        assert rel_err(y, fusion.fuse([wide, copy], x, method="permute", repair="none")(x)) < 1e-5
        assert rel_err(y, fusion.fuse([wide], x, method="ot", width=2.0, repair="none")(x)) < 1e-5


# --------------------------------------------------------------------------- transformers Swin, CLIP, SigLIP

_VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=2, num_channels=1)
_SWIN = dict(image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4, num_channels=1)


def _hf_build(name: str, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """A tiny random transformers vision model (its parameters randomised: no symmetric unit; not its
    buffers, which are fixed tables that no file stores, e.g. Swin V2's coordinates) and its
    fusion.io arch spec."""
    import transformers as T

    model_cls, config_cls, kwargs = {
        "swin": ("SwinForImageClassification", "SwinConfig", dict(_SWIN, num_labels=5)),
        # (4 heads, which a width factor keeps: halving gives 4 heads of size 2)
        "swinv2": ("Swinv2ForImageClassification", "Swinv2Config", dict(_SWIN, num_heads=[4, 4], num_labels=5)),
        "clip": ("CLIPForImageClassification", "CLIPConfig", dict(vision_config=_VISION, num_labels=5)),
        "clip_vision": ("CLIPVisionModel", "CLIPVisionConfig", dict(_VISION)),
        "siglip": ("SiglipForImageClassification", "SiglipConfig", dict(vision_config=_VISION, num_labels=5)),
        "siglip_vision": ("SiglipVisionModel", "SiglipVisionConfig", dict(_VISION)),
    }[name]
    torch.manual_seed(seed)
    model = getattr(T, model_cls)(getattr(T, config_cls)(**kwargs))
    arch = {"library": "transformers", "name": model_cls,
            "kwargs": {k: v for k, v in kwargs.items() if k != "num_labels"}}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval(), arch


def _hf_out(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The logits of a classifier; the last hidden states and the pooled output of a vision tower."""
    with torch.no_grad():
        y = model(x)
    if getattr(y, "logits", None) is not None:
        return y.logits
    return torch.cat([y.last_hidden_state.flatten(1), y.pooler_output.flatten(1)], 1)


def _spaces_named(model: torch.nn.Module, x: torch.Tensor, *words: str) -> dict[str, float]:
    """``{space: 1.0}`` for every space of ``model`` whose name holds one of ``words`` (kept at its width)."""
    return {s.name: 1.0 for s in discover(model, x).spaces if any(w in s.name for w in words)}


def _attention_layout(model: torch.nn.Module) -> list[tuple[int, int, int]]:
    """``(heads, head_dim, q width)`` of every attention module the transformers handler keeps in sync."""
    from fusion.modules.hf_modules import _head_dim, _heads_attr, _hf_attention_modules, _hf_qkv

    return [(getattr(m, _heads_attr(m)), _head_dim(m), _hf_qkv(m)[0].out_features)
            for m in _hf_attention_modules(model)]


def _check_swin(half, model):
    assert half.swin.num_features == half.swin.layernorm.normalized_shape[0] == 16
    assert half.config.embed_dim == 8 and half.config.hidden_size == 16 and list(half.config.num_heads) == [2, 2]
    assert _attention_layout(half) == [(2, 4, 8), (2, 8, 16)]
    assert half.classifier.in_features == 16 and model.swin.num_features == 32


def _check_swinv2(half, model):
    # Swin V2's heads are indexed by logit_scale's space (a head axis): the factor keeps their count
    stages = half.swinv2.encoder.layers
    assert [s.dim for s in stages] == [8, 16] and stages[0].downsample.dim == 8 and half.swinv2.num_features == 16
    assert _attention_layout(half) == [(4, 2, 8), (4, 4, 16)]
    assert [s.blocks[0].attention.self.logit_scale.shape[0] for s in stages] == [4, 4]
    assert half.config.embed_dim == 8 and list(half.config.num_heads) == [4, 4]


def _check_clip(half, model):
    layer = half.vision_model.encoder.layers[0]
    assert half.vision_model.embeddings.embed_dim == layer.embed_dim == layer.self_attn.embed_dim == 16
    assert (layer.self_attn.num_heads, layer.self_attn.head_dim) == (2, 8)
    assert layer.self_attn.scale == pytest.approx(8 ** -0.5)
    assert (half.config.vision_config.hidden_size, half.config.vision_config.intermediate_size) == (16, 32)
    assert model.vision_model.encoder.layers[0].embed_dim == 32


def _check_vision_mlp_only(half, model):
    # the residual stream is a model output (last_hidden_state): it keeps its width
    layer = half.encoder.layers[0]
    assert half.embeddings.embed_dim == layer.embed_dim == layer.self_attn.embed_dim == 32
    assert (half.config.hidden_size, half.config.intermediate_size, half.config.num_attention_heads) == (32, 32, 2)


def _check_siglip(half, model):
    layer = half.vision_model.encoder.layers[0]
    assert half.vision_model.embeddings.embed_dim == layer.embed_dim == layer.self_attn.embed_dim == 16
    assert (layer.self_attn.num_heads, layer.self_attn.head_dim) == (2, 8)
    assert (half.config.vision_config.hidden_size, half.config.vision_config.intermediate_size) == (16, 32)


# (family, width: 0.5 for every space but those named by these words, kept; attribute checks)
_HF_HALVED = [
    ("swin", (), _check_swin),
    ("swinv2", ("continuous_position_bias_mlp",), _check_swinv2),  # its 512 hidden units are no config field
    ("clip", (), _check_clip),
    ("clip_vision", ("self_attn",), _check_vision_mlp_only),  # attention as wide as the (fixed) residual
    ("siglip", (), _check_siglip),
    ("siglip_vision", ("self_attn", "head.attention"), _check_vision_mlp_only),
]


@pytest.mark.parametrize("name,keep,check", _HF_HALVED, ids=[c[0] for c in _HF_HALVED])
def test_halved_hf_swin_clip_siglip_are_the_models_their_resized_configs_build(name, keep, check, tmp_path):
    """Guards: transformers Swin, Swin V2, CLIP and SigLIP compress (they were refused with
    UnknownModuleError: SwinModel.num_features, CLIPEncoderLayer.embed_dim, ...); every width
    attribute follows the tensors (check_consistency finds nothing, no config warning), and the
    .hf folder that fusion.io writes (the resized config and weights) loads with transformers into a
    model with the same outputs."""
    import fusion
    from fusion import io as fio
    from fusion.modules import AttributeSyncWarning

    model, arch = _hf_build(name)
    x = torch.randn(16, 1, 32, 32)
    width = {"*": 0.5, **_spaces_named(model, x, *keep)}
    with warnings.catch_warnings():
        warnings.simplefilter("error", AttributeSyncWarning)
        half = fusion.fuse([model], x, method="magnitude", width=width, repair="none")
    assert check_consistency(half) == []
    check(half, model)
    written = fio.save_library_forms(half, tmp_path / "m", arch, 5)
    assert written == [tmp_path / "m.hf"]
    with fio.transformers_progress(False):
        rebuilt = type(half).from_pretrained(str(written[0])).eval()
    assert rel_err(_hf_out(half, x), _hf_out(rebuilt, x)) < 1e-5


def _widen_swin_stage0(model, x):
    from fusion.resize import resize

    return resize(model, {"swin.embeddings.patch_embeddings.projection": 2.0, "*": 1.0}, x)


def _halve(model, x):
    import fusion

    return fusion.fuse([model], x, method="magnitude", width=0.5, repair="none")


# (family, resizing, the warning: what the config cannot express)
_HF_NOT_IN_CONFIG = [
    ("swin", _widen_swin_stage0, r"stage widths \[32, 32\] are not embed_dim \* 2\*\*i = \[32, 64\]"),
    ("swinv2", _halve, r"continuous_position_bias_mlp\.0\.weight \(256, 2\) \(the config builds \(512, 2\)\)"),
    ("clip_vision", _halve, r"attention widths \[16\] differ from hidden_size=32"),
]


@pytest.mark.parametrize("name,resize_fn,message", _HF_NOT_IN_CONFIG, ids=[c[0] for c in _HF_NOT_IN_CONFIG])
def test_resized_hf_models_their_config_cannot_describe_run_and_reload_from_the_toolkit_files(
        name, resize_fn, message, tmp_path):
    """Guards: widths that the config cannot express but the modules run at (Swin stages that do not
    double: transformers' PatchMerging reads any 4*C and writes any width; Swin V2's position-bias
    MLP, 512 units in every config; CLIP attention narrower than its fixed residual stream) give a
    model whose attributes follow its tensors, with a warning naming what the config cannot
    describe; fusion.io writes no .hf folder that would not load, and the toolkit's own files
    rebuild the model (same outputs). Widening one Swin stage keeps the function (Net2Net), so the
    non-doubling stages are computed right."""
    from fusion import io as fio
    from fusion.modules import AttributeSyncWarning

    model, arch = _hf_build(name)
    x = torch.randn(16, 1, 32, 32)
    with pytest.warns(AttributeSyncWarning, match=message):
        resized = resize_fn(model, x)
    assert [p for p in check_consistency(resized) if ".config:" not in p] == []
    if resize_fn is _widen_swin_stage0:
        assert rel_err(_hf_out(model, x), _hf_out(resized, x)) < 1e-5
    assert fio.save_library_forms(resized, tmp_path / "m", arch, 5) == []
    assert not (tmp_path / "m.hf").exists()
    with pytest.warns(AttributeSyncWarning, match=message):  # (the toolkit resizes the arch's model alike)
        fio.save_model(resized, tmp_path / "m", arch, 5, widths=fio.resized_widths(resized, arch, 5))
        rebuilt, _ = fio.load_model_file(tmp_path / "m")
    assert rel_err(_hf_out(resized, x), _hf_out(rebuilt, x)) < 1e-5


@pytest.mark.parametrize("name", ["swin", "swinv2", "clip", "siglip"])
def test_hf_swin_clip_siglip_fuse_with_a_narrower_model(name):
    """Guards: a model fuses (ot) with a half-width model of its family into the narrower one's
    widths; the result runs, its attributes agree with its tensors and its config rebuilds it."""
    import fusion
    from fusion.modules.core import config_rebuilds

    model, _ = _hf_build(name, seed=0)
    other, _ = _hf_build(name, seed=1)
    x = torch.randn(16, 1, 32, 32)
    keep = _spaces_named(other, x, "continuous_position_bias_mlp")  # (Swin V2: 512 units in every config)
    half = fusion.fuse([other], x, method="magnitude", width={"*": 0.5, **keep}, repair="none")
    fused = fusion.fuse([model, half], x, method="ot", target=half, repair="none")
    assert torch.isfinite(_hf_out(fused, x)).all()
    assert check_consistency(fused) == [] and config_rebuilds(fused, fused.config)
    assert [p.shape for p in fused.parameters()] == [p.shape for p in half.parameters()]


@pytest.mark.parametrize("name", ["clip_vision", "siglip_vision"])
def test_hf_clip_and_siglip_fuse_with_their_permuted_copies(name):
    """Guards: a CLIP / SigLIP vision tower (SigLIP's with its attention-pooling head) fused with a
    randomly permuted copy of itself (method="permute", full width) computes the model's hidden
    states and pooled output (Swin and Swin V2: test_architectures' sweep)."""
    import fusion
    from alignment.permute import permute

    model, _ = _hf_build(name)
    x = torch.randn(4, 1, 32, 32)
    graph = discover(model, x)
    copy = permute(model, graph, graph.random_permutations(seed=1))
    fused = fusion.fuse([model, copy], torch.randn(32, 1, 32, 32), method="permute", repair="none")
    y = _hf_out(model, x)
    assert rel_err(y, _hf_out(copy, x)) < 1e-5
    assert rel_err(y, _hf_out(fused, x)) < 1e-5


def test_hf_attention_embed_dim_of_unknown_meaning_is_refused():
    """Guards the refusal: an attention ``embed_dim`` that is neither its q projection's input width
    nor its width is UnknownModuleError naming it (not guessed)."""
    from fusion.modules import UnknownModuleError

    model, _ = _hf_build("clip")
    model.vision_model.encoder.layers[0].self_attn.embed_dim = 64  # neither 32 (in) nor 32 (out)
    x = torch.randn(8, 1, 32, 32)
    with pytest.raises(UnknownModuleError, match=r"self_attn'.*embed_dim=64 is neither the input width \(32\)"):
        _halve(model, x)


@pytest.mark.parametrize("how", ["fuse", "resize"])
def test_a_multihead_attention_keeps_the_width_of_its_query_input(how, tmp_path):
    """Guards: an nn.MultiheadAttention projects q, k and v to its embed_dim, the width of its query
    input: a SigLIP vision tower halved as a whole (its pooling head's query input is the model's
    output, kept at 32) keeps the head's q/k/v spaces at 32 with a warning naming the module, and
    the result runs, is consistent and computes what the model built from its files computes
    (before: AttributeSyncError, or a width dict naming the head's spaces by hand). The rest is
    halved as asked."""
    import fusion
    from alignment.errors import FusionWarning
    from fusion import io as fio
    from fusion.resize import resize

    siglip, arch = _hf_build("siglip_vision")
    x = torch.randn(8, 1, 32, 32)
    with pytest.warns(FusionWarning, match=r"MultiheadAttention 'head\.attention' .* query input \(32\): "
                                           r"space\(s\) 'head\.attention\.in_proj_weight#0', "
                                           r"'head\.attention\.in_proj_weight#2' take width 32 instead of 16, 16"):
        half = _halve(siglip, x) if how == "fuse" else resize(siglip, 0.5, x)
    # (the encoder's attention narrower than hidden_size is what its config cannot describe: warned)
    assert [p for p in check_consistency(half) if ".config:" not in p] == []
    tower = getattr(half, "vision_model", half)
    head = tower.head
    assert (head.attention.embed_dim, head.attention.in_proj_weight.shape) == (32, (96, 32))
    assert tower.encoder.layers[0].mlp.fc1.out_features == 32  # (64 halved)
    with warnings.catch_warnings():  # (the config cannot describe attention narrower than hidden_size: warned)
        warnings.simplefilter("ignore")
        fio.save_model(half, tmp_path / "m", arch, 5, widths=fio.resized_widths(half, arch, 5))
        rebuilt, _ = fio.load_model_file(tmp_path / "m")
    assert rel_err(_hf_out(half, x), _hf_out(rebuilt, x)) < 1e-5


class DimsMajorAttention(nn.Module):
    """Attention whose output lays the channels out dims-major (channel = dim * heads + head, as timm
    NesT's ``permute(0, 2, 3, 4, 1)``), so the dims within a head are a space of their own."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj, self.head = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, 3)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)  # b, heads, n, d
        return self.head(self.proj(out.permute(0, 2, 3, 1).reshape(b, n, c)).mean(1))


def test_heads_laid_out_dims_major_are_refused_at_other_widths_not_a_crash():
    """Guards: an attention whose output is laid out dims-major (NesT) keeps a head count where its
    dims are read as a width; resizing it is a ``SpaceMismatchError`` naming the space (before: a
    raw ``RuntimeError`` from a tensor assignment inside the structure walk), while permuting it
    keeps its function."""
    import alignment
    from alignment.errors import SpaceMismatchError

    torch.manual_seed(0)
    model, x = DimsMajorAttention().eval(), torch.randn(4, 5, 16)
    graph = alignment.discover(model, x)
    permuted = alignment.permute(model, graph, graph.random_permutations(seed=1))
    torch.testing.assert_close(permuted(x), model(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(SpaceMismatchError, match="qkv#2"):
        resize(model, 0.5, x)


class _HeadMajorAttention(nn.Module):
    """Attention whose qkv rows are laid out head by head, ``[q, k, v]`` within each head (timm
    MaxViT's ``AttentionCl``), between two linear layers; the logits are made large so that a wrong
    logit scale shows."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.inp = nn.Linear(8, dim)
        self.attn = __import__("timm.models.maxxvit", fromlist=["AttentionCl"]).AttentionCl(dim, dim_head=dim // heads)
        self.out = nn.Linear(dim, 3)
        with torch.no_grad():
            self.attn.qkv.weight.mul_(4.0)

    def forward(self, x):
        return self.out(self.attn(self.inp(x)).mean(1))


def _one_head_vit():
    model = tiny_models.randomize(tiny_models.timm_vit(embed_dim=32, heads=1).eval())
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(4.0)
    return model, torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", ["one head", "heads laid out [q, k, v]", "cross-covariance attention",
                                  "channel attention"])
def test_widening_attention_keeps_the_logits_of_one_head_and_of_head_major_qkv(case):
    """Guards: the query-key logit correction finds a one-head attention (no heads axis to see: it
    was left out, and widening a one-head ViT by 2 was 13% off) and rescales only the queries and
    keys of a head laid out ``[q, k, v]`` (its values were rescaled too: MaxViT widened by 2 was
    20% off). Discovery marks exactly the query and key features (``Space.query_key``), and only
    where the logits are bilinear in two layers' outputs: XCiT's attention over features of
    normalised queries and keys has none (they were rescaled: widened by 2, 2% off). DaViT's channel
    attention (``softmax(k^T v)``) keeps its softmax scale (``fusion.engine.scales_kept``): it was
    recomputed from the new head size as for queries and keys (widened by 2, 0.9% off here)."""
    from alignment.maps import query_key_spaces
    from fusion.engine import scales_kept

    if case == "cross-covariance attention":
        torch.manual_seed(0)
        model = timm.create_model("xcit_nano_12_p16_224", pretrained=False, num_classes=10, img_size=32, depth=2,
                                  in_chans=1).eval()
        x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
        # its class-attention blocks are ordinary query-key attention; its XCA blocks are not
        assert query_key_spaces(discover(model, x)) == ["cls_attn_blocks.0.attn.q", "cls_attn_blocks.1.attn.q"]
    elif case == "channel attention":
        torch.manual_seed(0)
        model = timm.create_model("davit_tiny", pretrained=False, num_classes=10, in_chans=1, depths=(1, 1),
                                  embed_dims=(16, 32), num_heads=(1, 2)).eval()
        with torch.no_grad():
            for block in model.stages:
                for attn in (block.blocks[0][0].attn, block.blocks[0][1].attn):
                    attn.qkv.weight.mul_(4.0)
        x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
        graph = discover(model, x)
        # window attention (blocks.0.0) is query-key; channel attention (blocks.0.1) is not
        assert query_key_spaces(graph) == ["stages.0.blocks.0.0.attn.qkv#0", "stages.1.blocks.0.0.attn.qkv#0"]
        kept = scales_kept(graph)
        assert {"stages.0.blocks.0.1.attn", "stages.1.blocks.0.1.attn"} <= kept
        assert not kept & {"stages.0.blocks.0.0.attn", "stages.1.blocks.0.0.attn"}
    elif case == "one head":
        model, x = _one_head_vit()
        graph = discover(model, x)
        assert query_key_spaces(graph) == ["blocks.0.attn.qkv#0", "blocks.1.attn.qkv#0"]
        assert graph["blocks.0.attn.qkv#0"].query_key == ((0, 32),)
        assert graph["blocks.0.attn.qkv#2"].query_key == ()  # the values
    else:
        torch.manual_seed(0)
        model, x = _HeadMajorAttention().eval(), torch.randn(4, 5, 8)
        graph = discover(model, x)
        assert query_key_spaces(graph) == ["attn.qkv"]
        assert graph["attn.qkv"].query_key == ((0, 16), (24, 40))  # per head of 24: q 8, k 8, v 8
    wide = resize(model, 2.0, x)
    with torch.no_grad():
        assert rel_err(logits(model(x)), logits(wide(x))) < 1e-5


def test_talking_heads_keep_their_count_and_values_their_head_width():
    """Guards: CaiT's talking heads (``proj_l``, ``proj_w``: linear maps over the heads of the
    logits and of the attention) index heads, so a width factor keeps them, as it keeps every head
    count, and the values, blocks indexed by ``proj_w``, change their per-head width as the queries
    and keys do. Before, the factor halved the head axes (4 -> 2 heads for the logits, 4 for the
    queries) and the model was refused ("num_heads equal to an old width")."""
    torch.manual_seed(0)
    model = timm.create_model("cait_xxs24_224", pretrained=False, num_classes=10, img_size=32, patch_size=8, depth=2,
                              depth_token_only=1, embed_dim=64, num_heads=4, in_chans=1).eval()
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    graph = discover(model, x)
    assert graph.head_axes() == {f"blocks.{i}.attn.{p}" for i in (0, 1) for p in ("proj_l", "proj_w")}
    wide = resize(model, 2.0, x)  # widening repeats features: the function is kept
    with torch.no_grad():
        assert rel_err(logits(model(x)), logits(wide(x))) < 1e-5
    half = resize(model, 0.5, x)
    attn = half.blocks[0].attn
    assert attn.num_heads == 4 and tuple(attn.proj_l.weight.shape) == (4, 4)
    assert tuple(attn.qkv.weight.shape) == (96, 32) and tuple(attn.proj.weight.shape) == (32, 32)
    assert math.isclose(attn.scale, 8 ** -0.5)
    with torch.no_grad():
        assert torch.isfinite(half(x)).all()


def test_rotary_attention_keeps_its_head_size_under_a_width_factor():
    """Guards: rotary embeddings pair each head's query and key dims with a frequency table (fixed
    dims), and one head size reshapes queries, keys and values, so a width factor keeps the values'
    head size too and changes the residual and MLP widths around the attention (a timm ViT with
    rotary embeddings, an ``Eva`` model, was refused: "attention width 512 is not divisible by
    num_heads=6", the values halved or doubled beside fixed queries and keys)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_rope_224", pretrained=False, num_classes=10, depth=2,
                              img_size=32, patch_size=8).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(4.0)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    wide = resize(model, 2.0, x)
    assert tuple(wide.blocks[0].attn.qkv.weight.shape) == (1152, 768) and wide.embed_dim == 768
    with torch.no_grad():
        assert rel_err(logits(model(x)), logits(wide(x))) < 1e-5
    half = resize(model, 0.5, x)
    assert tuple(half.blocks[0].attn.qkv.weight.shape) == (1152, 192) and half.num_features == 192
    with torch.no_grad():
        assert torch.isfinite(half(x)).all()


def _per_head_written(family: str) -> nn.Module:
    """Attention whose heads a layer writes one value each (random init, 32x32 inputs): two-stage
    Swin V2 models with 2 then 4 heads (cosine attention; a position-bias MLP), a two-block timm ViT
    with an MLP of relative positions, a ConViT (gated positional attention)."""
    kw = dict(embed_dim=16, depths=(1, 1), num_heads=(2, 4), window_size=4, num_classes=5, img_size=32)
    if family == "torchvision swin v2":
        from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

        return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=[4, 4],
                               num_classes=5, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2)
    if family == "timm vit relpos":
        return timm.create_model("vit_relpos_small_patch16_224", pretrained=False, num_classes=5, img_size=32,
                                 patch_size=8, embed_dim=32, num_heads=4, depth=2)
    if family == "timm convit":
        return timm.create_model("convit_tiny", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                                 embed_dim=32, num_heads=4, depth=3, local_up_to_layer=2)
    name = {"timm swin v2": "swinv2_tiny_window8_256", "timm swin v2 cr": "swinv2_cr_tiny_ns_224"}[family]
    return timm.create_model(name, pretrained=False, **kw)


def _head_counts(model: nn.Module) -> list[int]:
    """Every ``num_heads`` attribute of ``model``'s modules."""
    return [m.num_heads for m in model.modules() if isinstance(getattr(m, "num_heads", None), int)]


_PER_HEAD = ["timm swin v2", "timm swin v2 cr", "torchvision swin v2", "timm vit relpos", "timm convit"]


@pytest.mark.parametrize("family", _PER_HEAD)
def test_heads_a_layer_writes_values_for_keep_their_count_under_a_width_factor(family):
    """Guards: a layer that writes one value per attention head (Swin V2's position-bias MLP into
    its ``logit_scale``'s space, a relative-position MLP's bias, ConViT's positional projection)
    makes the heads a feature space, and discovery marks it as indexing heads (two input-dependent
    tensors are contracted within its blocks); a width factor keeps that count and changes the
    head size, as for any attention. Before, the factor applied to the heads: widening Swin V2 by
    2 doubled its heads, halving it was refused (timm) or gave a model whose forward failed
    (torchvision: "shape '[8, 64, 3, 2, 24]' is invalid"), the relative-position ViT was refused at
    any factor, and a ConViT widened by 2 changed its function (5e-4: the gated layers doubled their
    heads, the others kept theirs)."""
    torch.manual_seed(0)
    model = _per_head_written(family).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    heads = _head_counts(model)
    assert heads and len(set(heads)) <= 2
    for factor in (2.0, 0.5):
        resized = resize(model, factor, x)
        assert _head_counts(resized) == heads and check_consistency(resized) == []
        with torch.no_grad():
            out = logits(resized(x))
        if factor == 2.0:
            assert rel_err(logits(model(x)), out) < 1e-5
        assert torch.isfinite(out).all()
    qkv = [m for name, m in resized.named_modules() if name.endswith("attn.qkv")]
    if family.startswith(("timm swin", "torchvision")):
        assert [q.weight.shape[0] for q in qkv] == [24, 48]  # 3 x 8 and 3 x 16: head sizes 4 halved to 2


def test_split_sizes_of_a_submodule_axis_follow_its_new_width():
    """Guards: a module with no handler whose forward splits its submodule's output at stored sizes
    (FocalNet's ``FocalModulation.input_split``: ``[dim, dim, focal_level + 1]`` over ``f``'s
    output) gets split sizes that sum to that output's new width, the widths among them replaced and
    the rest kept (it was refused: "split_sizes=[96, 96, 3]" at any factor); widening by 2 keeps the
    function."""
    torch.manual_seed(0)
    from timm.models.focalnet import FocalNet

    model = FocalNet(num_classes=5, embed_dim=16, depths=(1, 1), focal_levels=(2, 2), focal_windows=(3, 3)).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    splits = lambda m: [list(f.input_split) for f in m.modules() if hasattr(f, "input_split")]  # noqa: E731
    assert splits(model) == [[16, 16, 3], [32, 32, 3]]
    with pytest.warns(match=r"FocalModulation\.input_split"):
        wide = resize(model, 2.0, x)
    assert splits(wide) == [[32, 32, 3], [64, 64, 3]] and check_consistency(wide) == []
    with torch.no_grad():
        assert rel_err(logits(model(x)), logits(wide(x))) < 1e-5
    half = resize(model, 0.5, x)
    assert splits(half) == [[8, 8, 3], [16, 16, 3]]


def _key_value_attention(family: str) -> tuple[nn.Module, torch.Tensor]:
    """Narrow random LeViT (linear and conv forms: attention with and without downsampling),
    EfficientFormer (its last stage's attention), EfficientFormerV2 (talking heads; attention that
    downsamples), TinyViT and EfficientViT (MSRA, one projection per head) models and an input batch."""
    from timm.models.efficientformer import EfficientFormer
    from timm.models.levit import Levit

    if family == "efficientformer":
        model = EfficientFormer(depths=(1, 1, 1, 2), embed_dims=(16, 16, 24, 32), num_vit=1, num_classes=5)
    elif family == "efficientformer v2":
        model = timm.create_model("efficientformerv2_s0", pretrained=False, num_classes=5, depths=(1, 1, 2, 2),
                                  embed_dims=(16, 24, 32, 48), num_vit=1)
    elif family == "efficientvit":
        model = timm.create_model("efficientvit_m0", pretrained=False, num_classes=5, embed_dim=(16, 32, 48),
                                  depth=(1, 1, 1), num_heads=(2, 2, 3), key_dim=(8, 8, 8))
    elif family == "tiny vit":
        model = timm.create_model("tiny_vit_5m_224", pretrained=False, num_classes=5, embed_dims=(16, 32, 48, 64),
                                  depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4))
    else:
        model = Levit(embed_dim=(32, 48), key_dim=8, depth=(1, 1), num_heads=(2, 3), num_classes=5,
                      use_conv=family == "levit conv")
    # (224 x 224: their attention biases are sized for it)
    return model.eval(), torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", ["levit", "levit conv", "efficientformer", "tiny vit",
                                    *(pytest.param(f, marks=pytest.mark.slow) for f in ("efficientformer v2",
                                                                                         "efficientvit"))])
def test_key_and_value_head_sizes_follow_a_width_factor(family):
    """Guards: LeViT, EfficientFormer(V2), TinyViT and EfficientViT (MSRA) attention split each head at
    ``key_dim`` query and key dims and ``val_dim`` value dims (stored attributes): a width factor
    keeps the heads and gives both
    new per-head sizes, from the module's tensors, and the softmax scale follows ``key_dim``; the
    models were refused at any factor ("split_sizes=[16, 16, 32]"). Widening by 2 keeps the function:
    LeViT's queries and keys pass an inference BatchNorm after their Linear, a per-feature affine
    map that keeps their product a query-key product (logits corrected for the new scale)."""
    torch.manual_seed(0)
    model, x = _key_value_attention(family)
    attns = lambda m: [(a.num_heads, a.key_dim, getattr(a, "val_dim", getattr(a, "d", None)),  # noqa: E731
                        round(a.scale ** -2)) for a in m.modules() if hasattr(a, "key_dim") and hasattr(a, "scale")]
    before = attns(model)
    assert before
    wide = resize(model, 2.0, x)
    assert attns(wide) == [(h, 2 * k, 2 * v, 2 * k) for h, k, v, _ in before] and check_consistency(wide) == []
    with torch.no_grad():
        assert rel_err(logits(model(x)), logits(wide(x))) < 1e-5
    half = resize(model, 0.5, x)
    assert attns(half) == [(h, k // 2, v // 2, k // 2) for h, k, v, _ in before] and check_consistency(half) == []


def test_outlook_attention_follows_its_unfolded_channels_in_heads():
    """Guards: VOLO's outlook attention views an im2col of its values (channels x taps) as heads x
    channels x taps and folds the result back to channels x taps; discovery follows both views (the
    channels split into the heads, each keeping its taps, and back), where it kept the values fixed
    ("incompatible reshape") and every width factor was refused. Its attention weights (fixed taps
    per head, written once) are no rotary query-key pair: the values' head size follows the factor.
    A permuted copy fuses back exactly and widening by 2 keeps the function."""
    import fusion
    from alignment import permute
    from timm.models.volo import VOLO

    torch.manual_seed(0)
    model = VOLO(layers=(1, 1, 1, 1), embed_dims=(32, 64, 64, 64), num_heads=(2, 4, 4, 4), num_classes=5).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    graph = discover(model, x)
    assert not [f for f in graph.fixed if f.tensor.startswith("network.0.0.attn.v.")]
    with torch.no_grad():
        ref = logits(model(x))
    copy = permute(model, graph, graph.random_permutations(seed=3))
    fused = fusion.fuse([model, copy], x, method="permute", repair="none")
    wide = resize(model, 2.0, x, graph=graph)
    outlook = lambda m: [(a.num_heads, a.v.out_features) for a in m.modules()  # noqa: E731
                         if type(a).__name__ == "OutlookAttention"]
    assert outlook(wide) == [(2, 64)] and check_consistency(wide) == []
    with torch.no_grad():
        assert rel_err(ref, logits(fused(x))) < 1e-5
        assert rel_err(ref, logits(wide(x))) < 1e-5
    assert outlook(resize(model, 0.5, x, graph=graph)) == [(2, 16)]


def test_transformers_levit_attention_follows_a_width_factor(tmp_path):
    """Guards: transformers LeViT attention (``LevitAttention``, ``LevitAttentionSubsample``) splits
    each head at ``key_dim`` and ``attention_ratio * key_dim``; a width factor keeps the heads and
    halves both, its scale following ``key_dim``. Without a handler the resized model failed on the
    example input ("split_sizes=[8, 8, 16]"), which resize now refuses with a ModelError; widening
    by 2 keeps the function. Its config follows (``hidden_sizes``, ``key_dim``, the subsampling key
    dims in ``down_ops``; the source's untouched), so the .hf folder fusion.io writes reloads with
    transformers into the same model."""
    import transformers as T
    from fusion import io as fio
    from fusion.modules import AttributeSyncWarning

    cfg = T.LevitConfig(image_size=64, hidden_sizes=[32, 48], num_attention_heads=[2, 3], depths=[1, 1],
                        key_dim=[8, 8], drop_path_rate=0, down_ops=[["Subsample", 8, 2, 4, 2, 2]], num_labels=5)
    torch.manual_seed(0)
    model = T.LevitForImageClassification(cfg).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    attns = lambda m: [(a.num_attention_heads, a.key_dim, a.attention_ratio, round(a.scale ** -2))  # noqa: E731
                       for a in m.modules() if type(a).__name__.startswith("LevitAttention")]
    assert attns(model) == [(2, 8, 2, 8), (2, 8, 4, 8), (3, 8, 2, 8)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", AttributeSyncWarning)
        wide, half = resize(model, 2.0, x), resize(model, 0.5, x)
    assert attns(wide) == [(2, 16, 2, 16), (2, 16, 4, 16), (3, 16, 2, 16)] and check_consistency(wide) == []
    assert attns(half) == [(2, 4, 2, 4), (2, 4, 4, 4), (3, 4, 2, 4)] and check_consistency(half) == []
    assert (half.config.hidden_sizes, half.config.key_dim, half.config.down_ops[0][1]) == ([16, 24], [4, 4], 4)
    assert (model.config.hidden_sizes, model.config.key_dim, model.config.down_ops[0][1]) == ([32, 48], [8, 8], 8)
    with torch.no_grad():
        assert rel_err(model(x).logits, wide(x).logits) < 1e-5
        assert torch.isfinite(half(x).logits).all()
    fields = ("image_size", "hidden_sizes", "num_attention_heads", "depths", "key_dim", "drop_path_rate", "down_ops")
    arch = {"library": "transformers", "name": "LevitForImageClassification",
            "kwargs": {k: v for k, v in cfg.to_dict().items() if k in fields}}
    written = fio.save_library_forms(half, tmp_path / "m", arch, 5)
    assert written == [tmp_path / "m.hf"]
    with fio.transformers_progress(False):
        rebuilt = T.LevitForImageClassification.from_pretrained(str(written[0])).eval()
    with torch.no_grad():
        assert rel_err(half(x).logits, rebuilt(x).logits) < 1e-5
