"""Tests for fusion.modules: replace_tensor / sync_module_attributes / check_consistency."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from fusion.modules import (
    GroupsNotDivisibleError,
    HeadsNotDivisibleError,
    AttributeSyncWarning,
    UnknownModuleError,
    UnknownTensorError,
    check_consistency,
    register_attribute_sync,
    replace_tensor,
    sync_module_attributes,
    unregister_attribute_sync,
)

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


# --------------------------------------------------------------------------- helpers


def _resize(t: torch.Tensor, axes: list[int], factor: float) -> torch.Tensor:
    out = t.detach()
    for a in axes:
        n = out.shape[a]
        if factor < 1:
            out = out.narrow(a, 0, int(n * factor))
        else:  # widen by repeating the tensor along the axis
            out = torch.cat([out] * int(factor), dim=a)
    return out.clone()


def resize_widths(model: nn.Module, axes_fn, factor: float = 0.5) -> dict[str, torch.Size]:
    """Resize every hidden-width axis (as told by ``axes_fn(name, tensor)``); return old shapes."""
    state = model.state_dict(keep_vars=True)
    old_shapes = {n: t.shape for n, t in state.items()}
    for name, t in state.items():
        axes = axes_fn(name, t)
        if axes:
            replace_tensor(model, name, _resize(t, axes, factor))
    return old_shapes


def timm_resnet_axes(name: str, t: torch.Tensor) -> list[int]:
    if t.dim() == 0:  # num_batches_tracked
        return []
    if name == "conv1.weight":  # input channels untouched
        return [0]
    if name.startswith("fc."):  # classes untouched
        return [1] if name.endswith("weight") else []
    return [0, 1] if t.dim() == 4 else [0]


def timm_vit_axes(name: str, t: torch.Tensor) -> list[int]:
    if name in ("cls_token", "pos_embed"):  # (1, tokens, dim): tokens untouched
        return [2]
    if name.startswith("patch_embed.proj"):
        return [0]
    if name.startswith("head."):
        return [1] if name.endswith("weight") else []
    # qkv.weight (3*dim, dim): halving axis 0 keeps it a multiple of 3
    return [0, 1] if t.dim() == 2 else [0]


def hf_vit_axes(name: str, t: torch.Tensor) -> list[int]:
    if name.endswith(("cls_token", "position_embeddings")):
        return [2]
    if "patch_embeddings.projection" in name:
        return [0]
    if name.startswith("classifier."):
        return [1] if name.endswith("weight") else []
    return [0, 1] if t.dim() == 2 else [0]


def hf_resnet_axes(name: str, t: torch.Tensor) -> list[int]:
    if t.dim() == 0:
        return []
    if name == "resnet.embedder.embedder.convolution.weight":
        return [0]
    if name.startswith("classifier."):
        return [1] if name.endswith("weight") else []
    return [0, 1] if t.dim() == 4 else [0]


def make_timm_resnet():
    torch.manual_seed(0)
    return timm.create_model(
        "resnet18", pretrained=False, channels=(16, 32, 64, 128), stem_width=16, in_chans=1, num_classes=10
    ).eval()


def make_timm_vit(**kw):
    torch.manual_seed(0)
    args = dict(img_size=28, patch_size=7, embed_dim=64, depth=2, num_heads=4, in_chans=1, num_classes=10)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval()


def make_hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        image_size=28, patch_size=7, num_channels=1, num_labels=10,
    )
    return ViTForImageClassification(cfg).eval()


def make_hf_resnet(layer_type="basic"):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    if layer_type == "basic":
        cfg = ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1],
                           layer_type="basic", num_labels=10)
    else:
        cfg = ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1],
                           layer_type="bottleneck", num_labels=10)
    return ResNetForImageClassification(cfg).eval()


X = torch.randn(2, 1, 28, 28)


# --------------------------------------------------------------------------- replace_tensor


def test_replace_tensor_keeps_kind_and_flags():
    m = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    m[0].weight.requires_grad_(False)
    m[1].register_buffer("extra", torch.zeros(8), persistent=False)

    replace_tensor(m, "0.weight", torch.randn(3, 4))
    assert isinstance(m[0].weight, nn.Parameter) and not m[0].weight.requires_grad
    assert m[0].weight.shape == (3, 4)
    replace_tensor(m, "0.bias", torch.randn(3))
    assert isinstance(m[0].bias, nn.Parameter) and m[0].bias.requires_grad

    replace_tensor(m, "1.running_mean", torch.zeros(3))
    assert "running_mean" in m[1]._buffers and not isinstance(m[1].running_mean, nn.Parameter)
    assert "1.running_mean" in m.state_dict()
    replace_tensor(m, "1.extra", torch.ones(3))
    assert m[1].extra.shape == (3,) and "1.extra" not in m.state_dict()


def test_replace_tensor_top_level_and_tied():
    vit = make_timm_vit()
    replace_tensor(vit, "cls_token", torch.zeros(1, 1, 32))
    assert isinstance(vit.cls_token, nn.Parameter) and vit.cls_token.shape == (1, 1, 32)

    emb = nn.Embedding(10, 8)
    head = nn.Linear(8, 10, bias=False)
    head.weight = emb.weight
    m = nn.ModuleDict({"emb": emb, "head": head})
    replace_tensor(m, "emb.weight", torch.randn(10, 4))
    assert m["head"].weight is m["emb"].weight and m["head"].weight.shape == (10, 4)


def test_replace_tensor_unknown_name():
    m = nn.Sequential(nn.Linear(4, 8))
    for bad in ("0.weights", "1.weight", "nope"):
        with pytest.raises(UnknownTensorError) as exc:
            replace_tensor(m, bad, torch.zeros(1))
        assert isinstance(exc.value, KeyError)
        assert bad in str(exc.value)


# --------------------------------------------------------------------------- timm


def test_timm_resnet_halved():
    m = make_timm_resnet()
    old = resize_widths(m, timm_resnet_axes)
    assert check_consistency(m)  # stale attributes are reported before syncing
    sync_module_attributes(m, old_shapes=old)
    assert check_consistency(m) == []
    assert m(X).shape == (2, 10)
    assert m.conv1.out_channels == 32 and m.bn1.num_features == 32
    assert (m.layer1[0].conv1.in_channels, m.layer1[0].conv1.out_channels) == (32, 8)
    assert m.layer4[1].bn2.num_features == 64
    assert m.num_features == 64 and m.head_hidden_size == 64 and m.fc.in_features == 64
    assert [f["num_chs"] for f in m.feature_info] == [32, 8, 16, 32, 64]


def test_timm_resnet_features_after_sync():
    m = make_timm_resnet()
    sync_module_attributes(m, old_shapes=resize_widths(m, timm_resnet_axes))
    feats = m.forward_features(X)
    assert feats.shape[1] == m.num_features


def _vit_state_roundtrip(m, **kw):
    """A natively built model of the new widths loads the state dict and computes the same."""
    ref = make_timm_vit(**kw)
    ref.load_state_dict(m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ref(X), m(X))


def test_timm_vit_halved_keeps_heads():
    m = make_timm_vit()
    old = resize_widths(m, timm_vit_axes)
    problems = check_consistency(m)
    assert any("blocks.0.attn" in p for p in problems)
    sync_module_attributes(m, old_shapes=old)
    assert check_consistency(m) == []
    assert m(X).shape == (2, 10)
    for blk in m.blocks:
        a = blk.attn
        assert (a.num_heads, a.head_dim, a.attn_dim) == (4, 8, 32)
        assert math.isclose(a.scale, 8 ** -0.5)
        assert blk.norm1.normalized_shape == (32,)
        assert (blk.mlp.fc1.in_features, blk.mlp.fc1.out_features) == (32, 128)
    assert m.embed_dim == m.num_features == m.head_hidden_size == 32
    assert [f["num_chs"] for f in m.feature_info] == [32, 32]
    assert m.head.in_features == 32 and m.patch_embed.proj.out_channels == 32
    _vit_state_roundtrip(m, embed_dim=32, num_heads=4)


def test_timm_vit_scale_used_by_unfused_path():
    m = make_timm_vit()
    sync_module_attributes(m, old_shapes=resize_widths(m, timm_vit_axes))
    with torch.no_grad():
        fused = m(X)
        for blk in m.blocks:
            blk.attn.fused_attn = False
        torch.testing.assert_close(m(X), fused)


def test_timm_vit_num_heads_override():
    m = make_timm_vit()
    old = resize_widths(m, timm_vit_axes)
    sync_module_attributes(m, num_heads={"blocks.0.attn": 2, "blocks.1.attn": 2}, old_shapes=old)
    assert check_consistency(m) == []
    for blk in m.blocks:
        assert (blk.attn.num_heads, blk.attn.head_dim) == (2, 16)
        assert math.isclose(blk.attn.scale, 16 ** -0.5)
    _vit_state_roundtrip(m, embed_dim=32, num_heads=2)


def test_timm_vit_heads_not_divisible():
    m = make_timm_vit()
    old = resize_widths(m, timm_vit_axes)
    with pytest.raises(HeadsNotDivisibleError, match="blocks.0.attn"):
        sync_module_attributes(m, num_heads={"blocks.0.attn": 3}, old_shapes=old)


def test_timm_vit_default_heads_not_divisible():
    m = make_timm_vit()
    # qkv 3*64 -> 3*30: 30 is not divisible by the kept 4 heads
    idx = torch.cat([torch.arange(0, 30), torch.arange(64, 94), torch.arange(128, 158)])
    replace_tensor(m, "blocks.0.attn.qkv.weight", m.blocks[0].attn.qkv.weight[idx])
    replace_tensor(m, "blocks.0.attn.qkv.bias", m.blocks[0].attn.qkv.bias[idx])
    replace_tensor(m, "blocks.0.attn.proj.weight", m.blocks[0].attn.proj.weight[:, :30])
    with pytest.raises(HeadsNotDivisibleError, match="not divisible by num_heads=4"):
        sync_module_attributes(m)


def test_unused_num_heads_key_is_an_error():
    m = make_timm_vit()
    with pytest.raises(ValueError, match="blocks.9.attn"):
        sync_module_attributes(m, num_heads={"blocks.9.attn": 2})


def test_timm_vit_widened_without_old_shapes():
    m = make_timm_vit()
    resize_widths(m, timm_vit_axes, factor=2)
    sync_module_attributes(m)  # no old_shapes: every known module is re-derived
    assert check_consistency(m) == []
    assert m(X).shape == (2, 10)
    assert m.embed_dim == 128 and m.blocks[0].attn.head_dim == 32
    assert math.isclose(m.blocks[0].attn.scale, 32 ** -0.5)


def test_sync_is_noop_on_unchanged_model():
    m = make_timm_vit()
    before = {n: dict(vars(mod)) for n, mod in m.named_modules()}
    old = {n: t.shape for n, t in m.state_dict().items()}
    sync_module_attributes(m, old_shapes=old)
    sync_module_attributes(m)
    for n, mod in m.named_modules():
        for k, v in before[n].items():
            if isinstance(v, (int, float, tuple)):
                assert getattr(mod, k) == v, (n, k)


# --------------------------------------------------------------------------- transformers


def test_hf_vit_halved():
    from transformers import ViTForImageClassification

    m = make_hf_vit()
    old = resize_widths(m, hf_vit_axes)
    assert check_consistency(m)
    sync_module_attributes(m, old_shapes=old)
    assert check_consistency(m) == []
    assert m(X).logits.shape == (2, 10)
    cfg = m.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads) == (32, 64, 4)
    for layer in m.vit.layers:
        att = layer.attention
        assert (att.num_attention_heads, att.head_dim) == (4, 8)
        assert math.isclose(att.scaling, 8 ** -0.5)
    ref = ViTForImageClassification(copy.deepcopy(cfg)).eval()
    ref.load_state_dict(m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ref(X).logits, m(X).logits)


def test_hf_vit_num_heads_override():
    m = make_hf_vit()
    old = resize_widths(m, hf_vit_axes)
    heads = {f"vit.layers.{i}.attention": 2 for i in range(2)}
    sync_module_attributes(m, num_heads=heads, old_shapes=old)
    assert check_consistency(m) == []
    assert m.config.num_attention_heads == 2
    att = m.vit.layers[0].attention
    assert (att.num_attention_heads, att.head_dim) == (2, 16) and math.isclose(att.scaling, 16 ** -0.5)
    assert m(X).logits.shape == (2, 10)


@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_hf_resnet_halved(layer_type):
    from transformers import ResNetForImageClassification

    m = make_hf_resnet(layer_type)
    old_sizes = list(m.config.hidden_sizes)
    old = resize_widths(m, hf_resnet_axes)
    sync_module_attributes(m, old_shapes=old)
    assert check_consistency(m) == []
    assert m(X).logits.shape == (2, 10)
    assert m.config.embedding_size == 8
    assert m.config.hidden_sizes == [s // 2 for s in old_sizes]
    ref = ResNetForImageClassification(copy.deepcopy(m.config)).eval()
    ref.load_state_dict(m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ref(X).logits, m(X).logits)


# --------------------------------------------------------------------------- torch.nn


def test_torch_nn_layers():
    torch.manual_seed(0)
    m = nn.ModuleDict({
        "conv": nn.Conv2d(1, 16, 3, padding=1),
        "gn": nn.GroupNorm(4, 16),
        "dw": nn.Conv2d(16, 16, 3, padding=1, groups=16),
        "grouped": nn.Conv2d(16, 16, 3, padding=1, groups=2),
        "up": nn.ConvTranspose2d(16, 8, 2, stride=2),
        "bn": nn.BatchNorm2d(8),
        "emb": nn.Embedding(5, 16),
        "ln": nn.LayerNorm(16),
        "mha": nn.MultiheadAttention(16, 4, batch_first=True),
    })
    axes = {
        "conv.weight": [0], "conv.bias": [0], "gn.weight": [0], "gn.bias": [0],
        "dw.weight": [0], "dw.bias": [0], "grouped.weight": [0, 1], "grouped.bias": [0],
        "up.weight": [0, 1], "up.bias": [0], "bn.weight": [0], "bn.bias": [0],
        "bn.running_mean": [0], "bn.running_var": [0], "emb.weight": [1], "ln.weight": [0], "ln.bias": [0],
        "mha.in_proj_weight": [0, 1], "mha.in_proj_bias": [0], "mha.out_proj.weight": [0, 1],
        "mha.out_proj.bias": [0],
    }
    old = resize_widths(m, lambda n, t: axes.get(n, []))
    sync_module_attributes(m, old_shapes=old)
    assert check_consistency(m) == []
    assert (m["dw"].in_channels, m["dw"].out_channels, m["dw"].groups) == (8, 8, 8)
    assert (m["grouped"].in_channels, m["grouped"].out_channels, m["grouped"].groups) == (8, 8, 2)
    assert (m["up"].in_channels, m["up"].out_channels) == (8, 4)
    assert m["gn"].num_channels == 8 and m["gn"].num_groups == 4
    assert m["emb"].embedding_dim == 8 and m["ln"].normalized_shape == (8,)
    assert (m["mha"].embed_dim, m["mha"].num_heads, m["mha"].head_dim) == (8, 4, 2)
    y = m["grouped"](m["dw"](m["gn"](m["conv"](X))))
    assert m["bn"](m["up"](y)).shape == (2, 4, 56, 56)
    tok = m["ln"](m["emb"](torch.tensor([[0, 1, 2]])))
    assert m["mha"](tok, tok, tok)[0].shape == (1, 3, 8)


def test_group_divisibility_errors():
    conv = nn.Conv2d(8, 8, 3, groups=4)
    replace_tensor(conv, "weight", torch.randn(6, 2, 3, 3))
    replace_tensor(conv, "bias", torch.randn(6))
    with pytest.raises(GroupsNotDivisibleError, match="groups=4"):
        sync_module_attributes(conv)

    gn = nn.GroupNorm(4, 8)
    replace_tensor(gn, "weight", torch.ones(6))
    replace_tensor(gn, "bias", torch.zeros(6))
    with pytest.raises(GroupsNotDivisibleError, match="num_groups=4"):
        sync_module_attributes(gn)


# --------------------------------------------------------------------------- unknown modules / registry


class Scale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.kernel = 3
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.weight.view(1, self.dim)


class WideLinear(nn.Linear):
    def __init__(self, i, o):
        super().__init__(i, o)
        self.hidden = o


def _custom_model(cls=Scale):
    return nn.Sequential(nn.Linear(4, 16), cls(16), nn.Linear(16, 2))


_CUSTOM_AXES = {"0.weight": [0], "0.bias": [0], "1.weight": [0], "2.weight": [1]}


class Count(nn.Module):
    """Stores its width under a name that says nothing of widths (``n``): it cannot be inferred."""

    def __init__(self, dim: int):
        super().__init__()
        self.n = dim
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.weight.view(1, self.n)


def test_unknown_module_widths_are_set_from_its_tensors_or_refused():
    """Guards: a module with no handler whose width-named attribute (``Scale.dim``) held a width that
    changed gets the new width of its own tensor (before: refused), warned with the module type and
    attribute; ``kernel`` (no width name) is left as it is, and the model runs. An attribute whose
    name says nothing of widths (``Count.n``) is refused with ``UnknownModuleError`` naming the
    module, its type and the attribute; without old shapes nothing is detected (the model stays
    broken)."""
    m = _custom_model()
    old = resize_widths(m, lambda n, t: _CUSTOM_AXES.get(n, []))
    with pytest.warns(AttributeSyncWarning, match=r"Scale\.dim \(16->8\)"):
        sync_module_attributes(m, old_shapes=old)
    assert (m[1].dim, m[1].kernel) == (8, 3) and m(torch.randn(3, 4)).shape == (3, 2)
    m = _custom_model(Count)
    old = resize_widths(m, lambda n, t: _CUSTOM_AXES.get(n, []))
    with pytest.raises(UnknownModuleError) as exc:
        sync_module_attributes(m, old_shapes=old)
    msg = str(exc.value)
    assert "'1'" in msg and "Count" in msg and "register_attribute_sync" in msg and "['n']" in msg
    assert exc.value.modules[0][0] == "1"
    sync_module_attributes(m)
    with pytest.raises(RuntimeError):
        m(torch.randn(3, 4))


def test_unknown_module_not_reported_when_unchanged():
    m = _custom_model()
    old = {n: t.shape for n, t in m.state_dict().items()}
    replace_tensor(m, "2.weight", torch.randn(3, 16))
    replace_tensor(m, "2.bias", torch.randn(3))
    sync_module_attributes(m, old_shapes=old)
    assert m[2].out_features == 3 and m[1].dim == 16


def test_an_unknown_subclass_attribute_is_set_from_its_tensors():
    """Guards: an attribute a subclass of a known type adds (``WideLinear.hidden``, its out width) is
    not managed by the base type's handler: it is set from the module's new sizes and warned."""
    m = nn.Sequential(nn.Linear(4, 16), WideLinear(16, 16))
    old = resize_widths(m, lambda n, t: {"0.weight": [0], "0.bias": [0], "1.weight": [0, 1], "1.bias": [0]}.get(n, []))
    with pytest.warns(AttributeSyncWarning, match=r"WideLinear\.hidden"):
        sync_module_attributes(m, old_shapes=old)
    assert m[1].hidden == m[1].out_features == 8


def test_registered_handler_is_used():
    calls = []

    @register_attribute_sync(Scale, check=lambda mod, path: [] if mod.dim == mod.weight.shape[0] else [f"{path}: dim"])
    def _sync_scale(module, path, ctx):
        calls.append(path)
        module.dim = int(module.weight.shape[0])

    try:
        m = _custom_model()
        old = resize_widths(m, lambda n, t: _CUSTOM_AXES.get(n, []))
        assert check_consistency(m) == ["0: weight (8, 4) but (out_features, in_features)=(16, 4)",
                                        "0: bias (8,) but out_features=16", "1: dim",
                                        "2: weight (2, 8) but (out_features, in_features)=(2, 16)"]
        sync_module_attributes(m, old_shapes=old)
        assert calls == ["1"] and m[1].dim == 8
        assert check_consistency(m) == []
        assert m(torch.randn(3, 4)).shape == (3, 2)
    finally:
        unregister_attribute_sync(Scale)


# --------------------------------------------------------------------------- more timm families


def _halve_sizes(widths: set[int]):
    """Axes whose size is one of ``widths`` (works when widths do not collide with other dims)."""
    return lambda name, t: [a for a, s in enumerate(t.shape) if s in widths] if t.dim() else []


def test_timm_convnext_halved():
    torch.manual_seed(0)
    m = timm.create_model("convnextv2_atto", pretrained=False, dims=(16, 32, 64, 128), depths=(1, 1, 1, 1),
                          in_chans=1, num_classes=10).eval()
    old = resize_widths(m, _halve_sizes({16, 32, 64, 128, 256, 512}))
    sync_module_attributes(m, old_shapes=old)
    assert check_consistency(m) == []
    assert m(torch.randn(2, 1, 64, 64)).shape == (2, 10)  # stride-32 network: 28x28 is too small
    assert m.num_features == m.head_hidden_size == m.head.in_features == 64
    assert m.stages[0].blocks[0].conv_dw.groups == 8  # depthwise stays depthwise
    assert [f["num_chs"] for f in m.feature_info] == [8, 16, 32, 64]


def test_timm_vit_attention_pool_latent():
    m = make_timm_vit(global_pool="map")
    old = resize_widths(m, _halve_sizes({64, 128, 192, 256}))
    sync_module_attributes(m, num_heads={"attn_pool": 2}, old_shapes=old)
    assert check_consistency(m) == []
    assert m(X).shape == (2, 10)
    pool = m.attn_pool
    assert (pool.num_heads, pool.head_dim, pool.latent_dim, pool.out_features) == (2, 16, 32, 32)
    assert math.isclose(pool.scale, 16 ** -0.5)


def test_hf_configs_describe_the_fused_model_after_separate_heads():
    """Guards: an HF ViT fused with separate heads (a classifier of both models' outputs) gets a config
    that rebuilds it (``num_labels`` 20, which its ViT handler does not set), and
    ``sync_config_by_shapes`` leaves a config that already rebuilds its model untouched; the sources'
    configs are not changed."""
    import fusion
    from fusion.modules.core import config_rebuilds, sync_config_by_shapes
    from tests.tiny_models import build

    a, x = build("hf_vit", 0)
    b, _ = build("hf_vit", 1)
    fused = fusion.fuse([a, b], torch.randn(16, *x.shape[1:]), heads="separate", repair="none")
    assert fused.config.num_labels == 20 and config_rebuilds(fused, fused.config)
    assert a.config.num_labels == 10 and b.config.num_labels == 10
    before = fused.config.to_dict()
    assert sync_config_by_shapes(fused, fused.config) and fused.config.to_dict() == before
    fused.config.hidden_size = 3  # no old shapes to map from: cannot sync
    assert not config_rebuilds(fused, fused.config) and not sync_config_by_shapes(fused, fused.config)


def test_a_config_field_equal_to_a_width_by_chance_does_not_stop_the_config_sync():
    """Guards: a transformers model with no config handler (ViTMSN) whose ``image_size`` equals its
    ``hidden_size`` (32) compresses to a config that rebuilds it: ``hidden_size`` follows the
    weights, ``image_size`` stays (before: changing both at once failed to build, so nothing was
    synced and the config described the old widths)."""
    import warnings

    import transformers

    import fusion
    from fusion.modules import AttributeSyncWarning
    from fusion.modules.core import config_rebuilds

    cfg = transformers.ViTMSNConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64, num_labels=5)
    torch.manual_seed(0)
    model = transformers.ViTMSNForImageClassification(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", AttributeSyncWarning)
        half = fusion.fuse([model], torch.randn(16, 3, 32, 32), method="magnitude", width=0.5)
    assert (half.config.hidden_size, half.config.image_size) == (16, 32) and config_rebuilds(half, half.config)
    assert check_consistency(half) == []


# --------------------------------------------------------------------------- transformers attention by attributes


def make_hf_attention_model(name: str):
    """A small random DINOv2 / DINOv2-with-registers / BEiT classifier (skipped where the installed
    transformers lacks it): attention classes that no handler names, of the ViT layout."""
    config, model = {"dinov2": ("Dinov2Config", "Dinov2ForImageClassification"),
                     "dinov2_with_registers": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersForImageClassification"),
                     "beit": ("BeitConfig", "BeitForImageClassification")}[name]
    if not hasattr(transformers, config) or not hasattr(transformers, model):
        pytest.skip(f"transformers {transformers.__version__} has no {model}")
    extra = {"dinov2_with_registers": dict(num_register_tokens=2),
             "beit": dict(intermediate_size=128, use_relative_position_bias=True)}.get(name, {})
    cfg = getattr(transformers, config)(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                                        patch_size=7, num_channels=1, num_labels=10, **extra)
    torch.manual_seed(0)
    from tests.tiny_models import randomize

    return randomize(getattr(transformers, model)(cfg).eval())


def _hf_attentions(model: nn.Module) -> list[nn.Module]:
    return [mod for mod in model.modules() if isinstance(getattr(mod, "q_proj", None), nn.Linear)]


def _reloaded_logits(model: nn.Module, path, x: torch.Tensor) -> torch.Tensor:
    model.save_pretrained(path)
    with torch.no_grad():
        return type(model).from_pretrained(path).eval()(x).logits


def _resize_quietly(model, factor, x):
    """``fusion.resize.resize`` with its warnings silenced (uneven LayerNorm repeats and the like)."""
    from fusion.resize import resize

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return resize(model, factor, x)


@pytest.mark.parametrize("factor", [2.0, 0.5])
@pytest.mark.parametrize("name", ["dinov2", "dinov2_with_registers", "beit"])
def test_hf_attention_by_attributes_resized(name, factor, tmp_path):
    """Guards: transformers attention modules that no handler names (DINOv2, DINOv2 with registers,
    BEiT) are synced by their attributes: after resizing, the heads keep their count, ``head_dim``
    and ``scaling`` follow the q/k/v width (no other number of heads run silently), widening by 2
    keeps the function exactly, and the ``save_pretrained`` folder (config with the new sizes)
    reloads the same model."""
    m = make_hf_attention_model(name)
    x = torch.randn(4, 1, 28, 28)
    r = _resize_quietly(m, factor, x)
    head_dim = int(16 * factor)
    for att in _hf_attentions(r):
        assert (att.num_attention_heads, att.head_dim, att.q_proj.out_features) == (4, head_dim, 4 * head_dim)
        assert math.isclose(att.scaling, head_dim ** -0.5)
    assert check_consistency(r) == []
    assert (r.config.hidden_size, r.config.num_attention_heads) == (int(64 * factor), 4)
    with torch.no_grad():
        y, yr = m(x).logits, r(x).logits
    if factor > 1:
        assert float((y - yr).norm() / y.norm()) < 1e-4
    torch.testing.assert_close(_reloaded_logits(r, tmp_path / "r", x), yr)


def test_hf_attention_rounded_head_dim_config(tmp_path):
    """Guards: a factor that rounds head_dim away from ``hidden_size / heads`` (BEiT by 0.3: hidden
    19, q/k/v width 4*5=20) gives attention modules of that head_dim and a config that rebuilds the
    model (``head_dim`` and ``hidden_size`` written), so the saved folder reloads the same model."""
    from fusion.modules.core import config_rebuilds
    from fusion.resize import resize

    m = make_hf_attention_model("beit")
    x = torch.randn(4, 1, 28, 28)
    r = resize(m, 0.3, x)
    att = _hf_attentions(r)[0]
    assert (att.num_attention_heads, att.head_dim, att.q_proj.out_features, att.q_proj.in_features) == (4, 5, 20, 19)
    assert (r.config.hidden_size, r.config.head_dim, r.config.num_attention_heads) == (19, 5, 4)
    assert config_rebuilds(r, r.config) and check_consistency(r) == []
    with torch.no_grad():
        yr = r(x).logits
    torch.testing.assert_close(_reloaded_logits(r, tmp_path / "r", x), yr)


def test_hf_attention_by_attributes_num_heads_override():
    """Guards: ``num_heads`` reaches attention modules synced by their attributes (DINOv2), the
    config gets the new ``num_attention_heads``, and ``config_rebuilds`` refuses a config whose
    model has the same shapes but other heads."""
    from fusion.modules.core import config_rebuilds

    m = make_hf_attention_model("dinov2")
    old = resize_widths(m, _halve_sizes({64, 128, 256}))  # hidden, classifier input (cls + patch mean), MLP
    heads = {f"dinov2.encoder.layer.{i}.attention": 2 for i in range(2)}
    sync_module_attributes(m, num_heads=heads, old_shapes=old)
    att = m.dinov2.encoder.layer[0].attention
    assert (att.num_attention_heads, att.head_dim) == (2, 16) and math.isclose(att.scaling, 16 ** -0.5)
    assert (m.config.hidden_size, m.config.num_attention_heads) == (32, 2)
    assert config_rebuilds(m, m.config) and check_consistency(m) == []
    other = copy.deepcopy(m.config)
    other.num_attention_heads = 4  # q/k/v shapes (32, 32) either way: 4 heads of 8
    assert not config_rebuilds(m, other)


class StaleHeadsAttention(nn.Module):
    """Attention of the ViT layout outside transformers: nothing knows its ``head_dim``."""

    def __init__(self, dim: int = 16, num_heads: int = 2):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = (p(x).unflatten(-1, (-1, self.head_dim)).transpose(-2, -3) for p in (self.q_proj, self.k_proj,
                                                                                      self.v_proj))
        return nn.functional.scaled_dot_product_attention(q, k, v).transpose(-2, -3).flatten(-2)


def test_an_unknown_attention_gets_the_head_dim_of_its_new_width():
    """Guards: a module of an unknown type whose per-head size (``head_dim`` 8, equal to no old width:
    only ``num_heads * head_dim`` was the old width 16) would be left stale by a width change gets
    ``new width / heads`` (heads keep their count), so it computes what the same attention built at
    width 8 with the resized weights computes (before: refused); a softmax ``scale`` of the old
    ``head_dim ** -0.5`` follows it."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 16), StaleHeadsAttention(16, 2), nn.Linear(16, 2))
    m[1].scale = 8 ** -0.5
    old = resize_widths(m, _halve_sizes({16}))
    with pytest.warns(AttributeSyncWarning, match=r"StaleHeadsAttention\.head_dim \(8->4\)"):
        sync_module_attributes(m, old_shapes=old)
    assert (m[1].num_heads, m[1].head_dim) == (2, 4) and m[1].scale == 4 ** -0.5
    built = StaleHeadsAttention(8, 2)
    built.load_state_dict(m[1].state_dict())
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(m[1](x), built(x))


class ScaleOnlyAttention(nn.Module):
    """Stores its softmax scale and head count but no per-head size (timm Swin's WindowAttention)."""

    def __init__(self, dim: int = 16, num_heads: int = 2):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
        return (attn @ v).transpose(1, 2).flatten(-2)


def test_an_unknown_attention_storing_only_its_scale_gets_the_scale_of_its_new_head_dim():
    """Guards: a softmax scale ``head_dim ** -0.5`` stored without a ``head_dim`` (timm Swin) follows
    the new head dim (heads keep their count), so the resized module computes what one built at the
    new width computes (before: the old scale stayed, and widening Swin by 2 was off by 7%)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 16), ScaleOnlyAttention(16, 2), nn.Linear(16, 2))
    old = resize_widths(m, _halve_sizes({16, 48}))
    with pytest.warns(AttributeSyncWarning, match=r"ScaleOnlyAttention"):
        sync_module_attributes(m, old_shapes=old)
    assert m[1].num_heads == 2 and m[1].scale == 4 ** -0.5
    built = ScaleOnlyAttention(8, 2)
    built.load_state_dict(m[1].state_dict())
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(m[1](x), built(x))


# --------------------------------------------------------------------------- timm models by their attributes

_TIMM_CNNS = ["mobilenetv3_small_050", "efficientnet_b0", "regnetx_002", "resnext26ts"]
_GROUPED = {"regnetx_002", "resnext26ts"}  # grouped (not depthwise) convs


def make_timm_cnn(name: str) -> nn.Module:
    """A random timm CNN (1 input channel, 10 classes) whose BatchNorms are not the identity (timm
    zero-inits the last one of a residual branch)."""
    torch.manual_seed(0)
    return _live_norms(timm.create_model(name, pretrained=False, num_classes=10, in_chans=1).eval())


def _live_norms(m: nn.Module) -> nn.Module:
    """``m`` with random BatchNorm statistics and affines (timm zero-inits the last one of a residual
    branch) and LayerScale gammas of 0.2-0.5 (FastViT's are 1e-5): no layer is (nearly) the identity."""
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 2)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
            elif type(mod).__name__.startswith("LayerScale"):
                mod.gamma.uniform_(0.2, 0.5)
    return m


def _timm_widths(m: nn.Module, x: torch.Tensor) -> tuple[int, int, list[int]]:
    """(channels of forward_features, width of the pre-logits, channels of each feature_info module)
    from a real forward pass."""
    seen: dict[str, int] = {}
    handles = [m.get_submodule(e["module"]).register_forward_hook(
        lambda _m, _i, out, name=e["module"]: seen.__setitem__(name, out.shape[1])) for e in m.feature_info]
    try:
        with torch.no_grad():
            feats = m.forward_features(x)
            pre = m.forward_head(feats, pre_logits=True)
    finally:
        for h in handles:
            h.remove()
    return feats.shape[1], pre.shape[-1], [seen[e["module"]] for e in m.feature_info]


@pytest.mark.parametrize("factor", [0.5, 2.0])
@pytest.mark.parametrize("name", _TIMM_CNNS)
def test_timm_models_by_attributes_resized(name, factor):
    """Guards: timm models with no handler of their own (MobileNetV3, EfficientNet, RegNet, ByobNet)
    resize instead of raising UnknownModuleError at their root: ``num_features`` is the channels of
    ``forward_features``, ``head_hidden_size`` the classifier's input width (so
    ``reset_classifier`` builds a head that runs) and ``feature_info`` the channels of its modules;
    widening by 2 keeps the function exactly (models without grouped convs)."""
    m = make_timm_cnn(name)
    x = torch.randn(2, 1, 32, 32)
    r = _resize_quietly(m, factor, x)
    assert check_consistency(r) == []
    nf, pre, info = _timm_widths(r, x)
    assert (r.num_features, r.head_hidden_size) == (nf, pre) == (nf, r.get_classifier().in_features)
    assert [e["num_chs"] for e in r.feature_info] == info
    assert nf == int(m.num_features * factor)
    with torch.no_grad():
        y, yr = m(x), r(x)
    assert yr.shape == (2, 10)
    if factor > 1 and name not in _GROUPED:
        assert float((y - yr).norm() / y.norm()) < 1e-4
    r.reset_classifier(5)
    with torch.no_grad():
        assert r(x).shape == (2, 5)


def test_timm_model_by_attributes_saved_and_reloaded(tmp_path):
    """Guards: a compressed timm MobileNetV3 (root synced by its attributes) saved with its widths
    reloads as the same model, attributes included."""
    from fusion.io import load_model_file, resized_widths, save_model
    from fusion.resize import resize

    arch = {"library": "timm", "name": "mobilenetv3_small_050", "kwargs": {"in_chans": 1}}
    m = make_timm_cnn("mobilenetv3_small_050")
    x = torch.randn(2, 1, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = resize(m, 0.5, x)
    save_model(r, tmp_path / "r", arch, 10, widths=resized_widths(r, arch, 10))
    loaded, _ = load_model_file(tmp_path / "r")
    assert check_consistency(loaded) == []
    assert (loaded.num_features, loaded.head_hidden_size) == (r.num_features, r.head_hidden_size)
    assert [e["num_chs"] for e in loaded.feature_info] == [e["num_chs"] for e in r.feature_info]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), r(x))


def test_timm_explicit_handlers_win_over_attributes():
    """Guards: timm ResNet, ConvNeXt and ViT keep their own handlers; the handler matched by
    attributes takes only timm models that none names."""
    from fusion.modules import timm_modules
    from fusion.modules.core import handler_for

    resnet = make_timm_resnet()
    convnext = timm.create_model("convnext_atto", pretrained=False, num_classes=10)
    for model, sync in ((resnet, timm_modules._sync_timm_resnet), (convnext, timm_modules._sync_timm_convnext),
                        (make_timm_vit(), timm_modules._sync_timm_vit)):
        assert handler_for(model)[0].sync is sync
    assert handler_for(timm.create_model("mobilenetv3_small_050", pretrained=False))[0].sync \
        is timm_modules._sync_timm_model


def test_timm_model_trace_changes_nothing():
    """Guards: the meta-device run that derives a timm model's widths leaves the model as it was:
    its tensors (objects and values), training flags and hooks, and a forward hook of the user
    is not called by it."""
    m = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10, in_chans=1)
    m.train()
    m.blocks[0].eval()
    before = {k: (v, v.clone()) for k, v in m.state_dict(keep_vars=True).items()}
    modes = [mod.training for mod in m.modules()]
    calls = []
    m.conv_head.register_forward_hook(lambda *a: calls.append(1))
    assert check_consistency(m) == []
    assert calls == [] and [mod.training for mod in m.modules()] == modes
    after = m.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for k, (t, v) in before.items():
        assert after[k] is t and not t.is_meta and torch.equal(t, v), k
    assert not any(isinstance(v, torch.Tensor) and v.is_meta for mod in m.modules() for v in vars(mod).values())
    with torch.no_grad():
        m.eval()(torch.randn(2, 1, 32, 32))
    assert calls == [1]


def test_timm_model_that_cannot_be_traced_is_refused():
    """Guards: a timm model whose widths cannot be derived (its forward_features does not run on the
    meta device) is refused with UnknownModuleError at its root instead of keeping stale
    ``num_features`` / ``head_hidden_size``."""
    import types

    from fusion.resize import resize

    def forward_features(self, x):
        if x.is_meta:
            raise NotImplementedError("data-dependent")
        return type(self).forward_features(self, x)

    m = make_timm_cnn("mobilenetv3_small_050")
    m.forward_features = types.MethodType(forward_features, m)
    with pytest.raises(UnknownModuleError, match="cannot be derived") as exc, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resize(m, 0.5, torch.randn(2, 1, 32, 32))
    assert exc.value.modules[0][:2] == ("", type(m))


@pytest.mark.parametrize("conv", ["StdConv2d", "ScaledStdConv2d"])
def test_weight_standardised_convs_refuse_a_new_input_width(conv):
    """Guards: a weight-standardised conv (timm StdConv2d, ScaledStdConv2d: NormFreeNet, BiT) whose
    input width would change is refused (widening by repeats and split weights changed its function
    by 0.3-0.7 with no warning: the standardisation is over the inputs); one whose inputs keep their
    width resizes its outputs as any conv."""
    import timm.layers

    from fusion.modules.core import UnknownModuleError
    from fusion.resize import resize

    cls = getattr(timm.layers, conv)
    x = torch.randn(4, 1, 8, 8)
    reads_resized = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), cls(8, 8, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    with pytest.raises(UnknownModuleError, match=f"{conv} standardises each filter"):
        resize(reads_resized, 2.0, x)
    reads_input = nn.Sequential(cls(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                nn.Linear(8, 3)).eval()
    wide = resize(reads_input, 2.0, x)
    assert wide[0].out_channels == 16
    with torch.no_grad():
        assert float((wide(x) - reads_input(x)).norm() / reads_input(x).norm()) < 1e-5


def test_is_int_takes_ints_and_no_bools():
    """Guards ``fusion.modules.core.is_int``, which tells width and head attributes from flags:
    ``True`` is an int in Python but no width."""
    from fusion.modules.core import is_int

    assert is_int(3) and is_int(0) and is_int(-2)
    assert not any(is_int(v) for v in (True, False, 3.0, "3", None))


# --------------------------------------------------------------------------- timm families whose blocks store widths

_GHOST_CFGS = [[[3, 16, 16, 0, 1]], [[3, 48, 24, 0, 2]], [[3, 72, 24, 0, 1]], [[5, 72, 40, 0.25, 2]]]
# V3: its third block (shortcut mode: a gate) strides (GhostBottleneckV3 stores in_channels) and
# squeezes-excites; V3 blocks hold three branches each: three stages, not four
_GHOST_V3_CFGS = [[[3, 16, 16, 0, 1]], [[3, 48, 24, 0, 1]], [[5, 72, 40, 0.25, 2]]]
_XCEPTION_BLOCKS = [(64, 32, 2, {}), (32, 32, 1, {}), (32, (32, 48, 48), 2, {}),
                    (48, (64, 64, 96), 1, dict(no_skip=True, start_with_relu=False))]


def _mul(value, k):
    return tuple(v * k for v in value) if isinstance(value, tuple) else value * k


def _csp_kwargs(name: str, k: int) -> dict:
    """Two-stage CSPNets of widths times ``k``: CrossStage3 (cs3darknet) or CrossStage (cspresnet)."""
    from timm.models.cspnet import CspStagesCfg, CspStemCfg

    if name == "cs3darknet_s":
        return dict(stem=CspStemCfg(out_chs=(8 * k, 16 * k), kernel_size=3, stride=2, pool=""),
                    stages=CspStagesCfg(depth=(1, 1), out_chs=(32 * k, 64 * k), stride=2, block_ratio=0.5,
                                        stage_type="cs3", block_type="dark"))
    return dict(stem=CspStemCfg(out_chs=16 * k, kernel_size=3, stride=2, pool=""),
                stages=CspStagesCfg(depth=(1, 1), out_chs=(32 * k, 64 * k), stride=(1, 2), expand_ratio=2.0,
                                    bottle_ratio=0.5, cross_linear=True))


def _family_kwargs(name: str, k: int) -> dict:
    """Constructor kwargs of the smallest model of each family, at its widths times ``k`` (1 or 2)."""
    if name in ("cs3darknet_s", "cspresnet50"):
        return _csp_kwargs(name, k)
    if name == "dla60_res2net":  # base_width 64: Res2Net pieces of half the block width (any width halves)
        return dict(levels=(1, 1, 1, 2, 1, 1), channels=_mul((4, 8, 16, 32, 32, 64), k), base_width=64)
    if name.startswith("xception41"):  # xception41p: pre-activation blocks, which take no start_with_relu
        return dict(block_cfg=[dict(in_chs=i * k if i != 64 else 64, out_chs=_mul(o, k), stride=s,
                                    **{a: v for a, v in kw.items() if name == "xception41" or a == "no_skip"})
                               for i, o, s, kw in _XCEPTION_BLOCKS])
    if name == "rexnet_100":
        return dict(width_mult=0.5 * k, depth_mult=0.2)
    if name == "tresnet_m":
        return dict(layers=(1, 1, 1, 1), width_factor=0.125 * k)
    if name == "fastvit_sa12":  # RepMixer stages, then attention with a RepConditionalPosEnc
        return dict(layers=(1, 1, 1, 1), embed_dims=_mul((8, 16, 32, 64), k))
    if name.startswith("mobilevit"):  # ByobNet's kwargs overlay its config: an inverted residual, a MobileViT stage
        from timm.models.mobilevit import _inverted_residual_block, _mobilevit_block, _mobilevitv2_block

        if name == "mobilevit_xxs":  # timm's Attention, 4 heads
            return dict(blocks=(_inverted_residual_block(d=1, c=8 * k, s=1, br=2.0),
                                _mobilevit_block(d=1, c=16 * k, s=2, transformer_dim=16 * k, transformer_depth=1,
                                                 patch_size=2, br=2.0)),
                        stem_chs=8 * k, num_features=32 * k)
        # LinearSelfAttention of transformer_dim make_divisible(in_chs / 2, 8)
        return dict(blocks=(_inverted_residual_block(d=1, c=16 * k, s=1, br=2.0),
                            _mobilevitv2_block(d=1, c=32 * k, s=2, transformer_depth=1)), stem_chs=8 * k)
    raise KeyError(name)


def make_family_model(name: str, k: int = 2) -> nn.Module:
    """A random timm model of ``name``'s family (1 input channel, 5 classes) whose BatchNorms and
    layer scales are not the identity (timm zero-inits some, and FastViT's layer scales are 1e-5)."""
    torch.manual_seed(0)
    if name.startswith("ghostnet"):  # its factory fixes the block config: the class, with a shorter one
        from timm.models.ghostnet import GhostNet

        cfgs = _GHOST_V3_CFGS if name == "ghostnetv3" else _GHOST_CFGS
        m = GhostNet(cfgs, num_classes=5, in_chans=1, width=0.5 * k,
                     version={"ghostnetv2": "v2", "ghostnetv3": "v3"}.get(name, "v1"))
    else:
        m = timm.create_model(name, pretrained=False, num_classes=5, in_chans=1, **_family_kwargs(name, k))
    return _live_norms(m.eval())


# the width attributes that the handlers of timm_modules keep, by class name
_FAMILY_ATTRS = {
    "CrossStage": ("expand_chs",), "CrossStage3": ("expand_chs",),
    "DLA": ("channels",), "DlaTree": ("root_dim",), "DlaBottle2neck": ("width",),
    "GhostModule": ("out_chs",), "GhostModuleV2": ("out_chs",), "GhostNet": ("pool_dim",),
    "LinearBottleneck": ("in_channels", "out_channels"), "XceptionModule": ("in_channels", "out_channels"),
    "PreXceptionModule": ("in_channels", "out_channels"),
    "TResNet": ("planes", "inplanes"), "BlurPool2d": ("channels",),
    "MobileOneBlock": ("in_chs", "out_chs", "groups"), "ReparamLargeKernelConv": ("in_chs", "out_chs", "groups"),
    "RepMixer": ("dim",), "RepConditionalPosEnc": ("dim", "dim_out", "groups"), "Attention": ("head_dim",),
    "GhostModuleV3": ("out_chs", "in_channels", "groups"), "GhostBottleneckV3": ("in_channels",),
    "LinearSelfAttention": ("embed_dim",),
}
_FAMILIES = {  # model: (input size, classes whose width attributes it must hold)
    "cs3darknet_s": (32, {"CrossStage3"}),
    "cspresnet50": (32, {"CrossStage"}),
    "dla60_res2net": (32, {"DLA", "DlaTree", "DlaBottle2neck"}),
    "ghostnet": (32, {"GhostModule", "GhostNet"}),
    "ghostnetv2": (32, {"GhostModule", "GhostModuleV2", "GhostNet"}),
    "rexnet_100": (32, {"LinearBottleneck"}),
    "xception41": (32, {"XceptionModule"}),
    "xception41p": (32, {"PreXceptionModule"}),
    "tresnet_m": (32, {"TResNet", "BlurPool2d"}),
    "fastvit_sa12": (64, {"MobileOneBlock", "ReparamLargeKernelConv", "RepMixer", "RepConditionalPosEnc",
                          "Attention"}),
    "ghostnetv3": (32, {"GhostModuleV3", "GhostBottleneckV3", "GhostNet"}),
    "mobilevit_xxs": (32, {"Attention"}),  # MobileVitBlock stores no width
    "mobilevitv2_050": (32, {"LinearSelfAttention"}),
}
# timm builds them at half width
_NATIVE_HALF = {"cs3darknet_s", "cspresnet50", "dla60_res2net", "mobilevit_xxs", "mobilevitv2_050"}
_ODD_WIDTHS = {"rexnet_100"}  # widths that halve to no exact half
# widened by default (the others under -m slow): families whose forward splits, slices or adds
# channels by their width attributes
_WIDENED = {"cs3darknet_s", "ghostnetv2", "ghostnetv3", "rexnet_100", "mobilevitv2_050"}
_RESIZED: dict[tuple[str, float], tuple] = {}


def family_resized(name: str, factor: float) -> tuple[nn.Module, torch.Tensor, nn.Module]:
    """``(model, input, model resized by factor)`` of ``name``'s family: copies of what is built
    and resized once per session (resizing dominates the cost of these tests)."""
    if (name, factor) not in _RESIZED:
        size = _FAMILIES[name][0]
        m = make_family_model(name)
        x = torch.randn(2, 1, size, size, generator=torch.Generator().manual_seed(0))
        _RESIZED[name, factor] = (m, x, _resize_quietly(m, factor, x))
    m, x, r = _RESIZED[name, factor]
    return copy.deepcopy(m), x.clone(), copy.deepcopy(r)


def _family_attrs(model: nn.Module) -> dict[tuple[str, str], object]:
    return {(path, attr): getattr(mod, attr) for path, mod in model.named_modules()
            for attr in _FAMILY_ATTRS.get(type(mod).__name__, ()) if getattr(mod, attr, None) is not None}


def _expected(old, factor: float):
    if old == 1:  # the image's channel, or the groups of an ungrouped conv (a depthwise one's follow its width)
        return 1
    return tuple(int(v * factor) for v in old) if isinstance(old, tuple) else int(old * factor)


def _int_attrs(model: nn.Module) -> dict[tuple[str, str], int | tuple[int, ...]]:
    """Every int (or tuple of ints) attribute of every module of ``model``, by (path, name)."""
    def is_ints(v) -> bool:
        return all(isinstance(i, int) and not isinstance(i, bool) for i in (v if isinstance(v, tuple) else [v]))

    return {(path, k): v for path, mod in model.named_modules() for k, v in vars(mod).items()
            if not k.startswith("_") and isinstance(v, (int, tuple)) and is_ints(v)}


@pytest.mark.parametrize("name, factor", [
    pytest.param(name, factor, id=f"{name}-{factor}",
                 marks=() if factor < 1 or name in _WIDENED else pytest.mark.slow)
    for name in _FAMILIES for factor in (0.5, 2.0)])
def test_timm_families_storing_widths_resized(name, factor):
    """Guards the handlers of timm blocks that store widths (CSPNet CrossStage/CrossStage3, DLA and
    its trees and Res2Net blocks, GhostNet and GhostModule(V2), GhostNetV3's GhostModuleV3 and
    GhostBottleneckV3, ReXNet LinearBottleneck, Xception (Pre)XceptionModule, TResNet and BlurPool2d,
    FastViT's reparameterisable blocks and attention, MobileViT's attention and MobileViTv2's
    LinearSelfAttention):
    resizing the smallest model of each family (halving, or widening by 2) raised
    UnknownModuleError before them. The resized model runs, passes the attribute checks, every
    width attribute is the old one times the factor (heads kept: FastViT's ``head_dim`` follows),
    widening keeps the function exactly (the attributes that split, slice and add channels are
    right), and a stale attribute is reported by the check of its module."""
    from fusion.modules.core import handler_for

    m, x, r = family_resized(name, factor)
    assert check_consistency(r) == []
    with torch.no_grad():
        y, yr = m(x), r(x)
    assert yr.shape == (2, 5)
    if factor > 1:
        assert float((y - yr).norm() / y.norm()) < 1e-4
    old, new = _family_attrs(m), _family_attrs(r)
    assert {type(r.get_submodule(p)).__name__ for p, _ in new} >= _FAMILIES[name][1]
    assert new.keys() == old.keys()
    if factor > 1 or name not in _ODD_WIDTHS:
        assert new == {k: _expected(v, factor) for k, v in old.items()}
    for (path, attr), value in new.items():  # a stale width is reported
        mod = r.get_submodule(path)
        if value == old[(path, attr)]:
            continue
        check = handler_for(mod)[0].check
        assert check is not None, f"{type(mod).__name__} registers no check of {attr}"
        setattr(mod, attr, old[(path, attr)])
        try:
            problems = check(mod, path)
        finally:
            setattr(mod, attr, value)
        assert problems, f"{path}.{attr}={old[(path, attr)]} (stale) is not reported"


@pytest.mark.parametrize("name", sorted(_NATIVE_HALF))
def test_timm_families_halved_as_built_at_half_width(name):
    """Guards: a CSPNet (CrossStage3, CrossStage), a DLA (trees, Res2Net blocks) and a MobileViT
    (v1: attention heads; v2: LinearSelfAttention) halved by resizing hold the attributes of the
    model timm builds at half width, which loads its state dict and computes the same."""
    _, x, r = family_resized(name, 0.5)
    native = make_family_model(name, k=1)
    assert _int_attrs(r) == _int_attrs(native)
    native.load_state_dict(r.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(native(x), r(x))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_timm_ghost_module_of_odd_width(version):
    """Guards: a GhostModule that keeps 7 of the 8 channels it computes (``out_chs`` odd) is refused
    when resized (how many of its new channels to keep is in no tensor); a GhostModuleV2 takes
    ``out_chs`` from its gate (``short_conv``): widened, it keeps as many channels as its consumer
    reads and the function."""
    from timm.models.ghostnet import GhostModule, GhostModuleV2

    from fusion.resize import resize

    torch.manual_seed(0)
    ghost = (GhostModule if version == "v1" else GhostModuleV2)(8, 7)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), ghost, nn.Conv2d(7, 4, 1), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten()).eval()
    x = torch.randn(2, 1, 8, 8)
    if version == "v1":
        with pytest.raises(UnknownModuleError, match="keeps the first out_chs=7 of its 8 channels"):
            resize(m, 2.0, x)
        return
    r = resize(m, 2.0, x)
    assert r[1].out_chs == r[2].in_channels > 7 and check_consistency(r) == []
    with torch.no_grad():
        torch.testing.assert_close(r(x), m(x), rtol=1e-4, atol=1e-6)


def test_timm_ghost_module_widened_without_old_shapes():
    """Guards: a GhostModule widened by hand is reported stale (``out_chs`` 8 of 16 channels), and
    synced without old shapes (every known module re-derived) it keeps all of its channels."""
    from timm.models.ghostnet import GhostModule

    g = GhostModule(4, 8).eval()
    resize_widths(g, lambda name, t: [0] if t.dim() else [], factor=2)
    assert any("out_chs=8 but the module computes 16 channels" in p for p in check_consistency(g))
    sync_module_attributes(g)
    assert g.out_chs == 16 and check_consistency(g) == []
    assert g(torch.randn(1, 4, 5, 5)).shape == (1, 16, 5, 5)


def _reparameterized(model: nn.Module) -> nn.Module:
    from timm.utils.model import reparameterize_model

    return reparameterize_model(copy.deepcopy(model))


def _halved_and_reparameterized(name: str) -> tuple[nn.Module, torch.Tensor, nn.Module, nn.Module]:
    """``(model, x, halved, halved and reparameterised)``, the last checked consistent and computing
    what the halved model computes."""
    m, x, r = family_resized(name, 0.5)
    rep = _reparameterized(r)
    assert check_consistency(rep) == []
    with torch.no_grad():
        torch.testing.assert_close(rep(x), r(x), rtol=1e-4, atol=1e-5)
    return m, x, r, rep


def test_timm_fastvit_reparameterize_after_resizing():
    """Guards: a halved FastViT (MobileOneBlock, ReparamLargeKernelConv, RepMixer,
    RepConditionalPosEnc, attention) reparameterises (its blocks build their single conv from
    ``in_chs``/``out_chs``/``dim``/``groups``) into a model that computes the same, whose convs
    have the resized widths and groups; resizing the reparameterised model gives the same model."""
    m, x, r, rep = _halved_and_reparameterized("fastvit_sa12")
    with torch.no_grad():
        y = r(x)
    blocks = [mod for mod in rep.modules() if hasattr(mod, "reparameterize")]
    assert len(blocks) > 10 and all(isinstance(b.reparam_conv, nn.Conv2d) for b in blocks)
    mixer = rep.stages[1].blocks[0].token_mixer
    assert mixer.reparam_conv.weight.shape == (16, 1, 3, 3) and mixer.reparam_conv.groups == 16
    cpe = rep.stages[3].pos_emb
    assert cpe.reparam_conv.weight.shape == (64, 1, 7, 7) and cpe.reparam_conv.groups == 64
    with torch.no_grad():
        torch.testing.assert_close(_resize_quietly(_reparameterized(m), 0.5, x)(x), y, rtol=1e-4, atol=1e-5)


def test_timm_family_model_saved_and_reloaded(tmp_path):
    """Guards: a halved FastViT saved with its widths reloads (from its constructor and the widths)
    as a model with the same attributes that computes the same, and reparameterises alike."""
    from fusion.io import load_model_file, resized_widths, save_model

    arch = {"library": "timm", "name": "fastvit_sa12",
            "kwargs": {"in_chans": 1, **{k: list(v) for k, v in _family_kwargs("fastvit_sa12", 2).items()}}}
    _, x, r = family_resized("fastvit_sa12", 0.5)
    save_model(r, tmp_path / "r", arch, 5, widths=resized_widths(r, arch, 5))
    loaded, _ = load_model_file(tmp_path / "r")
    assert check_consistency(loaded) == []
    assert _int_attrs(loaded) == _int_attrs(r)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), r(x))
        torch.testing.assert_close(_reparameterized(loaded)(x), r(x), rtol=1e-4, atol=1e-5)


def test_timm_ghostnetv3_reparameterize_after_resizing():
    """Guards: a halved GhostNetV3 reparameterises (GhostModuleV3 builds the identity kernel of its
    cheap branch's skip from ``in_channels``/``groups``) into a model that computes the same, whose
    cheap convs are depthwise at the halved widths; the reparameterised model (which caches those
    identity kernels in ``id_tensor``) resized gives the same model, with no stale cached kernel
    left, and a stale one is reported."""
    from timm.models.ghostnet import GhostModuleV3

    m, x, r, rep = _halved_and_reparameterized("ghostnetv3")
    with torch.no_grad():
        y = r(x)
    ghosts = [g for g in rep.modules() if isinstance(g, GhostModuleV3)]
    assert len(ghosts) == 6 and all(g.infer_mode for g in ghosts)
    g = rep.blocks[1][0].ghost1  # 48 channels (24 primary) at k=2, halved
    assert (g.in_channels, g.groups, g.cheap_operation[0].weight.shape) == (12, 12, (12, 1, 3, 3))
    deployed = _reparameterized(m)
    cached = [vars(g).get("id_tensor") for g in deployed.modules() if isinstance(g, GhostModuleV3)]
    assert len(cached) == 6 and all(isinstance(t, torch.Tensor) for t in cached)
    rd = _resize_quietly(deployed, 0.5, x)
    assert check_consistency(rd) == []
    assert not any("id_tensor" in vars(mod) for mod in rd.modules())
    with torch.no_grad():
        torch.testing.assert_close(rd(x), y, rtol=1e-4, atol=1e-5)
    g = rd.blocks[1][0].ghost1
    g.id_tensor = torch.zeros(24, 1, 3, 3)  # the kernel cached at the old width
    assert any("id_tensor (24, 1, 3, 3)" in p for p in check_consistency(g))


@pytest.mark.parametrize("case", ["linear_self_attention", "ghost_v3_gate"])
def test_timm_mobilevit_and_ghostnetv3_splits_refused(case):
    """Guards: widths that the forward's split cannot express are refused, not synced into a wrong
    model: a MobileViTv2 LinearSelfAttention whose qkv_proj no longer outputs a 1-channel query and
    a key and a value of out_proj's width (it splits by ``embed_dim``), and a GhostModuleV3 whose
    gate (short_conv) is wider than the channels it computes (it keeps the first ``out_chs``)."""
    from timm.models.ghostnet import GhostModuleV3
    from timm.models.mobilevit import LinearSelfAttention

    torch.manual_seed(0)
    if case == "linear_self_attention":
        m, prefix, message = LinearSelfAttention(8), "qkv_proj", "splits qkv_proj's 34 output channels"
    else:
        m, prefix, message = GhostModuleV3(4, 8, mode="shortcut"), "short_conv", "gates 16 channels"
    old = resize_widths(m, lambda name, t: [0] if name.startswith(prefix) and t.dim() else [], factor=2)
    assert check_consistency(m)
    with pytest.raises(UnknownModuleError, match=message):
        sync_module_attributes(m, old_shapes=old)


def test_register_derived_width_syncs_and_checks_one_attribute():
    """Guards ``register_derived_width``: the handler sets the attribute to the derived width (and
    leaves it when nothing is derived), and the check reports a stale value with its source."""
    from fusion.modules import core

    class Stores(nn.Module):
        def __init__(self, width: int):
            super().__init__()
            self.norm = nn.LayerNorm(width)
            self.dim = width

    sync = core.register_derived_width(Stores, attr="dim", width=lambda m: m.norm.normalized_shape[0],
                                       source="its norm normalises", doc="Stores.dim: its norm's width.")
    try:
        m = Stores(8)
        m.norm = nn.LayerNorm(4)
        assert core.check_consistency(m) == ["<root>: dim=8 but its norm normalises 4"]
        sync(m, "", None)
        assert m.dim == 4 and core.check_consistency(m) == [] and sync.__doc__ == "Stores.dim: its norm's width."
        none = core.register_derived_width(Stores, attr="dim", width=lambda m: None, source="-", doc="-")
        m.dim = 9
        none(m, "", None)
        assert m.dim == 9 and core.check_consistency(m) == []
    finally:
        core.unregister_attribute_sync(Stores)


def test_unknown_module_names_the_module_its_type_and_the_attributes():
    """Guards ``fusion.modules.core.unknown_module``: the refusal a handler raises names the module's
    path and dotted type before the reason, and lists the offending attributes."""
    from fusion.modules import core

    err = core.unknown_module("blocks.0", nn.Linear(2, 3), ["width"], "its split cannot be expressed")
    assert isinstance(err, core.UnknownModuleError) and err.modules == [("blocks.0", nn.Linear, ["width"])]
    assert str(err).startswith("module 'blocks.0' of type torch.nn.modules.linear.Linear: its split cannot")
    assert core.qualname(nn.Linear) == "torch.nn.modules.linear.Linear"
    assert "<root>" in str(core.unknown_module("", nn.Linear(2, 3), ["width"], "why"))


def test_changed_sizes_and_derive_size_fields():
    """Guards the shared search behind HF config sync and ``fusion.io.timm_kwargs``: ``changed_sizes``
    maps each old size to its one new size (a size that became two, or stayed, is left out);
    ``derive_size_fields`` changes the int, int-list and ratio fields holding them, leaves out a field
    whose change alone the constructor rejects (``base``, equal to a width by chance) and one the
    shapes do not need (``spare``), and gives None when no change rebuilds the model."""
    from fusion.modules.core import changed_sizes, derive_size_fields

    old = {"a": (16, 4), "b": (16, 64), "c": (8, 3), "d": (8,)}
    new = {"a": (8, 4), "b": (8, 32), "c": (4, 3), "d": (6,)}
    assert changed_sizes(old, new) == {16: 8, 64: 32}

    class Net(nn.Module):
        def __init__(self, width=16, ratio=4.0, base=16, spare=64):
            super().__init__()
            if base != 16:
                raise ValueError("base must be 16")
            self.fc1, self.fc2 = nn.Linear(3, width), nn.Linear(width, int(width * ratio))

    owner = Net(8, 2.0)  # width 16 -> 8, hidden 64 -> 16: the ratio changes too
    values = {"width": 16, "ratio": 4.0, "base": 16, "spare": 64}
    sizes = {16: 8, 64: 16}
    assert derive_size_fields(owner, values, sizes, lambda ch: Net(**{**values, **ch})) == {"width": 8, "ratio": 2.0}
    assert derive_size_fields(Net(16), values, sizes, lambda ch: Net(**{**values, **ch})) == {}
    assert derive_size_fields(nn.Linear(2, 2), values, sizes, lambda ch: Net(**{**values, **ch})) is None


def test_per_head_key_value_splits_the_widths_of_levit_style_attention():
    """Guards: the shared split of LeViT-style attention widths into per-head key and value dims
    (timm's LeViT / EfficientFormer / TinyViT / EfficientViT handler and transformers' LeViT one):
    4 heads of 16 key dims and 32 value dims write 4 * (16 + 16 + 32) = 256 fused rows, or 64 query
    rows, and their projection reads 128 values; widths that do not split give None."""
    from fusion.modules.core import per_head_key_value

    assert per_head_key_value(4, 128, qkv=256) == (16, 32)
    assert per_head_key_value(4, 128, q=64) == (16, 32)
    assert per_head_key_value(4, 130, qkv=258) is None  # values not a multiple of the heads
    assert per_head_key_value(4, 128, qkv=132) is None  # 4 key rows: no query and key dims per head
    assert per_head_key_value(4, 128, qkv=128) is None  # no keys at all
    assert per_head_key_value(4, None, q=64) is None


def test_sync_context_rescale_keeps_kept_and_custom_scales():
    """Guards: ``SyncContext.rescale`` (used by ``set_heads`` and the per-head attention handlers)
    gives a default scale the new head size's, keeps the scale of a module whose logits are no
    query-key product (``kept_scales``), and keeps a custom scale with a warning naming it."""
    from fusion.modules.core import SyncContext

    attn = nn.Module()
    ctx = SyncContext(model=attn, kept_scales=frozenset({"kept"}))
    attn.scale = 16 ** -0.5
    ctx.rescale(attn, "a", 16, 4)
    assert attn.scale == pytest.approx(0.5)
    attn.scale = 16 ** -0.5
    ctx.rescale(attn, "kept", 16, 4)
    assert attn.scale == pytest.approx(0.25)
    attn.scale = 0.1
    with pytest.warns(AttributeSyncWarning, match=r"a: scale=0.1 is not head_dim\*\*-0.5"):
        ctx.rescale(attn, "a", 16, 4)
    assert attn.scale == 0.1
    ctx.rescale(nn.Module(), "a", 16, 4)  # (no scale attribute: nothing to set)
