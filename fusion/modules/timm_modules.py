"""Attribute handlers for timm modules, registered on import (by dotted class name: timm is not imported).

Covered: Attention, AttentionRope, AttentionPoolLatent, VisionTransformer, ResNet, ConvNeXt,
ClassifierHead, NormMlpClassifierHead, ClNormMlpClassifierHead, RmsNorm*/SimpleNorm* (as
``nn.LayerNorm``), EvoNorm2dS* (groups validated); the norm classes deriving from torch norms
(LayerNorm, LayerNorm2d, BatchNormAct2d, GroupNorm, GroupNormAct, ...) via their base; width-free
modules (PatchEmbed, LayerScale, Mlp, Block, BasicBlock, ...). ``feature_info[*]["num_chs"]`` of
ViT/ResNet/ConvNeXt is updated too.

Attribute names in the installed timm (1.0.31) that these handlers rely on:
``timm.layers.Attention`` has ``num_heads``, ``head_dim``, ``attn_dim`` (used in the output
reshape) and ``scale``. The fused path calls ``F.scaled_dot_product_attention`` without ``scale=``
(i.e. it uses ``q.size(-1) ** -0.5`` implicitly); the non-fused path multiplies by ``self.scale``,
so ``scale`` must be kept in sync.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterator

from torch import nn
from torch.nn.modules.conv import _ConvNd

from . import torch_modules as _torch_modules  # noqa: F401  (registers nn.LayerNorm, whose handler is reused below)
from .core import (
    AttributeSyncError, GroupsNotDivisibleError, HeadsNotDivisibleError, SyncContext, check_scale, divide_heads,
    is_tensor, lookup, module_check, out_width, path_label, register_attribute_sync, register_width_free,
)

__all__: list[str] = []  # nothing to import: the handlers are registered on import


def _linear_out(m: Any) -> int | None:
    if isinstance(m, nn.Linear):
        return int(m.weight.shape[0])
    return int(m.out_channels) if isinstance(m, _ConvNd) else None


def _in_width(fc: Any) -> int | None:
    """Input width of a classifier ``fc`` (Linear or 1x1 conv), from its attributes."""
    if isinstance(fc, nn.Linear):
        return fc.in_features
    return fc.in_channels if isinstance(fc, _ConvNd) else None


def _feat_mult(m: nn.Module) -> int:
    gp = getattr(m, "global_pool", None)
    if gp is not None and hasattr(gp, "feat_mult"):
        try:
            return int(gp.feat_mult())
        except Exception:  # pragma: no cover - defensive
            return 1
    return 1


def _feature_width(root: nn.Module, path: str) -> int | None:
    """Channels produced by the submodule at ``path`` (a parameter-free module such as an
    activation inherits the width of the preceding sibling)."""
    try:
        mod = root.get_submodule(path)
    except AttributeError:
        return None
    w = out_width(mod)
    if w is not None:
        return w
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    last = None
    for child_name, child in parent.named_children():
        if child_name == name:
            break
        last = cw if (cw := out_width(child)) is not None else last
    return last


def _feature_info(m: nn.Module) -> list[dict]:
    """The entries of ``m.feature_info`` that name a module and its channels."""
    info = getattr(m, "feature_info", None)
    if not isinstance(info, list):
        return []
    return [e for e in info if isinstance(e, dict) and "num_chs" in e and "module" in e]


def _sync_feature_info(m: nn.Module, override: Callable[[dict], int | None] | None = None) -> None:
    for entry in _feature_info(m):
        w = override(entry) if override is not None else None
        if w is None:
            w = _feature_width(m, entry["module"])
        if w is not None:
            entry["num_chs"] = int(w)


def _check_feature_info(m: nn.Module) -> Iterator[str]:
    for entry in _feature_info(m):
        w = _feature_width(m, entry["module"])
        if w is not None and w != entry["num_chs"]:
            yield f"feature_info[{entry['module']!r}].num_chs={entry['num_chs']} but module outputs {w}"


# --------------------------------------------------------------------------- attention


@module_check
def _check_timm_attention(m: nn.Module) -> Iterator[str]:
    width = m.num_heads * m.head_dim
    attn_dim = getattr(m, "attn_dim", width)
    if width != attn_dim:
        yield f"num_heads*head_dim={width} but attn_dim={attn_dim}"
    qkv, q, k, proj, gate = (getattr(m, n, None) for n in ("qkv", "q_proj", "k_proj", "proj", "gate"))
    if isinstance(qkv, nn.Linear):
        if qkv.out_features % 3 or width != qkv.out_features // 3:
            yield f"num_heads*head_dim={width} but qkv.out_features/3={qkv.out_features / 3:g}"
    else:
        if isinstance(q, nn.Linear) and q.out_features != width:
            yield f"num_heads*head_dim={width} but q_proj.out_features={q.out_features}"
        if isinstance(k, nn.Linear) and hasattr(m, "num_kv_heads") and k.out_features != m.num_kv_heads * m.head_dim:
            yield f"num_kv_heads*head_dim={m.num_kv_heads * m.head_dim} but k_proj.out_features={k.out_features}"
    if isinstance(proj, nn.Linear) and proj.in_features != attn_dim:
        yield f"attn_dim={attn_dim} but proj.in_features={proj.in_features}"
    if isinstance(gate, nn.Linear) and gate.out_features != attn_dim:
        yield f"attn_dim={attn_dim} but gate.out_features={gate.out_features}"
    for name, attr, expected in (("q_norm", "head_dim", m.head_dim), ("k_norm", "head_dim", m.head_dim),
                                 ("norm", "attn_dim", attn_dim)):
        w = getattr(getattr(m, name, None), "weight", None)
        if is_tensor(w) and w.shape[-1] != expected:
            yield f"{attr}={expected} but {name}.weight {tuple(w.shape)}"
    yield from check_scale("scale", getattr(m, "scale", None), m.head_dim)


@register_attribute_sync("timm.layers.attention.Attention", "timm.layers.attention.AttentionRope",
                         check=_check_timm_attention)
def _sync_timm_attention(m: nn.Module, path: str, ctx: SyncContext) -> None:
    """timm.layers.Attention / AttentionRope (fused ``qkv`` or ``q_proj/k_proj/v_proj``)."""
    qkv = getattr(m, "qkv", None)
    if isinstance(qkv, nn.Linear):
        total = int(qkv.weight.shape[0])
        if total % 3:
            raise HeadsNotDivisibleError(f"{path_label(path)}: qkv.out_features={total} is not divisible by 3")
        attn_dim = kv_dim = total // 3
    else:
        attn_dim = _linear_out(getattr(m, "q_proj", None))
        if attn_dim is None:
            return
        kv_dim = _linear_out(getattr(m, "k_proj", None))
        kv_dim = kv_dim if kv_dim is not None else attn_dim
    heads, head_dim = ctx.set_heads(m, path, attn_dim)
    if hasattr(m, "attn_dim"):
        m.attn_dim = attn_dim
    if hasattr(m, "num_kv_heads"):
        kv_heads = divide_heads(kv_dim, head_dim, path_label(path), "k/v width (in units of head_dim)")
        if heads % kv_heads:
            raise HeadsNotDivisibleError(
                f"{path_label(path)}: num_heads={heads} not divisible by num_kv_heads={kv_heads}")
        m.num_kv_heads = kv_heads
        if hasattr(m, "num_kv_groups"):
            m.num_kv_groups = heads // kv_heads
        if hasattr(m, "kv_dim"):
            m.kv_dim = kv_dim


@module_check
def _check_timm_attn_pool_latent(m: nn.Module) -> Iterator[str]:
    width = m.num_heads * m.head_dim
    if width * 2 != m.kv.out_features:
        yield f"num_heads*head_dim={width} but kv.out_features/2={m.kv.out_features / 2:g}"
    if m.kv.in_features != width:
        yield f"attention width {width} must equal input width kv.in_features={m.kv.in_features}"
    yield from check_scale("scale", m.scale, m.head_dim)
    if is_tensor(getattr(m, "latent", None)) and m.latent.shape[-1] != m.latent_dim:
        yield f"latent_dim={m.latent_dim} but latent {tuple(m.latent.shape)}"


@register_attribute_sync("timm.layers.attention_pool.AttentionPoolLatent", check=_check_timm_attn_pool_latent)
def _sync_timm_attn_pool_latent(m: nn.Module, path: str, ctx: SyncContext) -> None:
    total = int(m.kv.weight.shape[0])
    if total % 2:
        raise HeadsNotDivisibleError(f"{path_label(path)}: kv.out_features={total} is not divisible by 2")
    ctx.set_heads(m, path, total // 2)
    if is_tensor(getattr(m, "latent", None)):
        m.latent_dim, m.latent_len = int(m.latent.shape[-1]), int(m.latent.shape[1])
    proj_out = _linear_out(getattr(m, "proj", None))
    m.out_features = proj_out if proj_out is not None else total // 2


# --------------------------------------------------------------------------- models


def _vit_embed_dim(m: nn.Module) -> int | None:
    for name in ("cls_token", "reg_token", "pos_embed"):
        t = getattr(m, name, None)
        if is_tensor(t):
            return int(t.shape[-1])
    return _linear_out(getattr(getattr(m, "patch_embed", None), "proj", None))


@module_check
def _check_timm_vit(m: nn.Module) -> Iterator[str]:
    dim = _vit_embed_dim(m)
    if dim is not None and m.embed_dim != dim:
        yield f"embed_dim={m.embed_dim} but tokens/patch embedding have width {dim}"
    if dim is not None and m.num_features != dim:
        yield f"num_features={m.num_features} but embed width is {dim}"
    head = getattr(m, "head", None)
    if isinstance(head, nn.Linear) and head.in_features != m.head_hidden_size:
        yield f"head_hidden_size={m.head_hidden_size} but head.in_features={head.in_features}"
    for entry in getattr(m, "feature_info", None) or []:
        in_blocks = isinstance(entry, dict) and str(entry.get("module", "")).startswith("blocks")
        if in_blocks and entry.get("num_chs") != m.embed_dim:
            yield f"feature_info[{entry['module']!r}].num_chs={entry.get('num_chs')} but embed_dim={m.embed_dim}"


@register_attribute_sync("timm.models.vision_transformer.VisionTransformer", check=_check_timm_vit)
def _sync_timm_vit(m: nn.Module, path: str, ctx: SyncContext) -> None:
    dim = _vit_embed_dim(m)
    if dim is None:
        return
    m.embed_dim = m.num_features = dim
    head = getattr(m, "head", None)
    if isinstance(head, nn.Linear):
        m.head_hidden_size = int(head.weight.shape[1])
    elif getattr(m, "attn_pool", None) is not None and hasattr(m.attn_pool, "out_features"):
        m.head_hidden_size = int(m.attn_pool.out_features)
    else:
        m.head_hidden_size = dim
    _sync_feature_info(m, lambda entry: dim if str(entry["module"]).startswith("blocks") else None)


def _stage_model(num_features: Callable[[nn.Module], int | None],
                 head_hidden: Callable[[nn.Module, int], tuple[int | None, str | None]]):
    """``(sync, check)`` for CNNs whose ``num_features`` is the output width of the last stage.

    ``head_hidden(model, num_features)`` gives the ``head_hidden_size`` to set (``None``: none) and
    what it derives from, for messages (``None``: not checked)."""

    def sync(m: nn.Module, path: str, ctx: SyncContext) -> None:
        nf = num_features(m)
        if nf is None:
            return
        m.num_features = nf
        hh = head_hidden(m, nf)[0]
        if hh is not None:
            m.head_hidden_size = hh
        _sync_feature_info(m)

    @module_check
    def check(m: nn.Module) -> Iterator[str]:
        nf = num_features(m)
        if nf is not None and m.num_features != nf:
            yield f"num_features={m.num_features} but the last stage outputs {nf}"
        hh, what = head_hidden(m, m.num_features)
        if what is not None and m.head_hidden_size != hh:
            yield f"head_hidden_size={m.head_hidden_size} but {what}={hh}"
        fc, width = getattr(m, "fc", None), m.num_features * _feat_mult(m)
        if isinstance(fc, nn.Linear) and fc.in_features != width:
            yield f"fc.in_features={fc.in_features} but num_features*feat_mult={width}"
        yield from _check_feature_info(m)

    return sync, check


def _resnet_num_features(m: nn.Module) -> int | None:
    stages = [c for n, c in m.named_children() if re.fullmatch(r"layer\d+", n)]
    w = out_width(stages[-1]) if stages else None
    if w is not None:
        return w
    width = _in_width(getattr(m, "fc", None))
    return width // _feat_mult(m) if width is not None else None


def _resnet_head_hidden(m: nn.Module, nf: int) -> tuple[int | None, str | None]:
    return (nf * _feat_mult(m), "num_features*feat_mult") if hasattr(m, "head_hidden_size") else (None, None)


def _convnext_num_features(m: nn.Module) -> int | None:
    stages = getattr(m, "stages", None)
    return out_width(stages[-1]) if isinstance(stages, nn.Sequential) and len(stages) else None


def _convnext_head_hidden(m: nn.Module, nf: int) -> tuple[int | None, str | None]:
    head_nf = getattr(getattr(m, "head", None), "num_features", None)
    return (head_nf, "head.num_features") if isinstance(head_nf, int) else (nf, None)


_sync_timm_resnet, _check_timm_resnet = _stage_model(_resnet_num_features, _resnet_head_hidden)
register_attribute_sync("timm.models.resnet.ResNet", check=_check_timm_resnet)(_sync_timm_resnet)
_sync_timm_convnext, _check_timm_convnext = _stage_model(_convnext_num_features, _convnext_head_hidden)
register_attribute_sync("timm.models.convnext.ConvNeXt", check=_check_timm_convnext)(_sync_timm_convnext)


# --------------------------------------------------------------------------- heads and norms


@module_check
def _check_timm_classifier_head(m: nn.Module) -> Iterator[str]:
    width = _in_width(getattr(m, "fc", None))
    if width is not None and (m.num_features != width or m.in_features * _feat_mult(m) != width):
        yield f"in_features={m.in_features}, num_features={m.num_features} but fc input width is {width}"


@register_attribute_sync("timm.layers.classifier.ClassifierHead", check=_check_timm_classifier_head)
def _sync_timm_classifier_head(m: nn.Module, path: str, ctx: SyncContext) -> None:
    fc = getattr(m, "fc", None)
    width = int(fc.weight.shape[1]) if isinstance(fc, nn.Linear) else _in_width(fc)
    if width is None:
        return
    fm = _feat_mult(m)
    if width % fm:
        raise AttributeSyncError(
            f"{path_label(path)}: classifier input width {width} not divisible by pooling feat_mult={fm}")
    m.in_features, m.num_features = width // fm, width


@module_check
def _check_timm_norm_mlp_head(m: nn.Module) -> Iterator[str]:
    fc = getattr(m, "fc", None)
    if isinstance(fc, nn.Linear) and fc.in_features != m.num_features:
        yield f"num_features={m.num_features} but fc.in_features={fc.in_features}"


@register_attribute_sync("timm.layers.classifier.NormMlpClassifierHead",
                         "timm.layers.classifier.ClNormMlpClassifierHead", check=_check_timm_norm_mlp_head)
def _sync_timm_norm_mlp_head(m: nn.Module, path: str, ctx: SyncContext) -> None:
    pre_fc = getattr(getattr(m, "pre_logits", None), "fc", None)
    fc = getattr(m, "fc", None)
    norm_w = getattr(getattr(m, "norm", None), "weight", None)
    if is_tensor(norm_w):
        m.in_features = int(norm_w.shape[0])
    elif isinstance(pre_fc, nn.Linear):
        m.in_features = int(pre_fc.weight.shape[1])
    elif isinstance(fc, nn.Linear):
        m.in_features = int(fc.weight.shape[1])
    if isinstance(pre_fc, (nn.Linear, _ConvNd)):
        m.hidden_size = m.num_features = _linear_out(pre_fc)
    else:
        m.num_features = m.in_features


@module_check
def _check_timm_evonorm_s(m: nn.Module) -> Iterator[str]:
    if m.weight.shape[0] % m.groups:
        yield f"{m.weight.shape[0]} channels not divisible by groups={m.groups}"


@register_attribute_sync(*(f"timm.layers.evo_norm.EvoNorm2dS{i}" for i in range(3)), check=_check_timm_evonorm_s)
def _sync_timm_evonorm_s(m: nn.Module, path: str, ctx: SyncContext) -> None:
    problems = _check_timm_evonorm_s(m, path)
    if problems:
        raise GroupsNotDivisibleError(problems[0])


_LAYER_NORM = lookup(nn.LayerNorm)[0]
register_attribute_sync(
    *(f"timm.layers.norm.{name}" for name in ("RmsNorm", "RmsNorm2d", "RmsNormFp32", "RmsNorm2dFp32",
                                              "SimpleNorm", "SimpleNorm2d", "SimpleNormFp32", "SimpleNorm2dFp32")),
    check=_LAYER_NORM.check,
    managed_attrs=_LAYER_NORM.managed_attrs,
)(_LAYER_NORM.sync)

# modules that store no width (their tensors alone define it)
register_width_free(*(f"timm.{module}.{name}" for module, names in {
    "layers.layer_scale": ("LayerScale", "LayerScale2d"),
    "layers.patch_embed": ("PatchEmbed",),
    "layers.mlp": ("Mlp", "GluMlp", "SwiGLU", "GatedMlp", "ConvMlp", "GlobalResponseNormMlp"),
    "layers.grn": ("GlobalResponseNorm",),
    "layers.evo_norm": ("EvoNorm2dB0", "EvoNorm2dB1", "EvoNorm2dB2"),
    "layers.filter_response_norm": ("FilterResponseNormAct2d", "FilterResponseNormTlu2d"),
    "layers.norm_act": ("FrozenBatchNormAct2d",),
    "layers.adaptive_avgmax_pool": ("SelectAdaptivePool2d",),
    "models.vision_transformer": ("Block", "ResPostBlock"),
    "models.resnet": ("BasicBlock", "Bottleneck"),
    "models.convnext": ("ConvNeXtStage", "ConvNeXtBlock"),
}.items() for name in names))
