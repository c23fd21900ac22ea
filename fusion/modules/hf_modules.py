"""Attribute and config handlers for transformers models, registered on import (by dotted class
name: transformers is not imported).

Covered: ViT/DeiT attention (5.x ``ViTAttention``, 4.x ``ViTSelfAttention``/``ViTSdpaSelfAttention``)
and, by their attributes, every transformers attention module of the same layout (DINOv2,
DINOv2 with registers, BEiT, Data2Vec vision, I-JEPA, ViViT, VideoMAE, YOLOS, CLIP, ...:
:func:`_is_hf_attention`), ``ResNetBackbone.num_features``, the width-free ViT/DeiT/ResNet modules,
the ``config`` of model_type ``vit``/``deit`` (``hidden_size``, ``intermediate_size``,
``num_attention_heads``[, ``head_dim``], ``pooler_output_size``) and ``resnet`` (``embedding_size``,
``hidden_sizes``), and for other model types the config's ``num_attention_heads``[, ``head_dim``]
(:func:`_sync_hf_heads_config`, with the shape-based sync of the core).

Attribute names in the installed transformers (5.x) that these handlers rely on: ``ViTAttention``
(``q_proj/k_proj/v_proj/o_proj``; there is no ``ViTSelfAttention`` any more) has
``num_attention_heads``, ``head_dim`` and ``scaling``; ``scaling`` is passed explicitly to every
attention backend, so a stale value silently changes results. The 4.x layout (``ViTSelfAttention``
with ``query/key/value``, ``attention_head_size``, ``all_head_size``) is also handled, and so are
``num_heads`` for the number of heads and ``scale`` for the softmax scale (CLIP-style attention).
The attention classes of most vision models share these names (``Dinov2Attention``,
``BeitAttention``, ``Data2VecVisionSelfAttention``, ...), and the number of heads and the per-head
size split the q/k/v widths in ``forward`` (``view(..., -1, head_dim)``): a stale per-head size
silently runs another number of heads.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator

from torch import nn

from .core import (
    AttributeSyncError, SyncContext, check_scale, config_rebuilds, handler_for, is_int, is_tensor, module_check, out_width,
    path_label, register_attribute_sync, register_attribute_sync_by, register_config_fallback, register_config_sync,
    register_width_free, sync_config_by_shapes,
)

__all__: list[str] = []  # nothing to import: the handlers are registered on import

_VIT_LIKE = ("transformers.models.vit.modeling_vit.ViT", "transformers.models.deit.modeling_deit.DeiT")
_HF_RESNET = "transformers.models.resnet.modeling_resnet"

register_width_free(
    *(f"{prefix}{name}" for prefix in _VIT_LIKE for name in (
        "Layer", "MLP", "Embeddings", "PatchEmbeddings", "Model", "Pooler", "Encoder", "Intermediate", "Output",
        "SelfOutput", "ForImageClassification", "ForMaskedImageModeling", "ForImageClassificationWithTeacher",
    )),
    *(f"{_HF_RESNET}.ResNet{name}" for name in (
        "ConvLayer", "Embeddings", "ShortCut", "BasicLayer", "BottleNeckLayer", "Stage", "Encoder", "Model",
        "ForImageClassification",
    )),
)


# --------------------------------------------------------------------------- attention


_HEADS = ("num_attention_heads", "num_heads")  # the number of heads (5.x ViT-style / CLIP-style)
_HEAD_DIMS = ("head_dim", "attention_head_size")  # the per-head size (5.x / 4.x)
_SCALES = ("scaling", "scale")  # the softmax scale


def _hf_qkv(m: nn.Module) -> tuple[Any, Any, Any]:
    """The q, k, v projections of 5.x (``q_proj``, ...) or 4.x (``query``, ...) attention."""
    def first(*names):
        return next((v for v in (getattr(m, n, None) for n in names) if v is not None), None)

    return first("q_proj", "query"), first("k_proj", "key"), first("v_proj", "value")


def _heads_attr(m: nn.Module) -> str:
    """The name of ``m``'s number of heads (``num_attention_heads`` when it has none)."""
    return next((a for a in _HEADS if is_int(getattr(m, a, None))), _HEADS[0])


def _head_dim(m: nn.Module) -> int | None:
    """``m``'s per-head size (``head_dim``, or 4.x ``attention_head_size``), or ``None``."""
    return next((v for v in (getattr(m, a, None) for a in _HEAD_DIMS) if is_int(v)), None)


def _scale_attr(m: nn.Module) -> str | None:
    """The name of ``m``'s softmax scale (a float ``scaling`` or ``scale``), or ``None``."""
    return next((a for a in _SCALES if isinstance(getattr(m, a, None), float)), None)


def _is_hf_attention(m: nn.Module) -> bool:
    """Whether ``m`` is a transformers attention module of the ViT layout that
    :func:`_sync_hf_attention` keeps consistent: a class of the ``transformers`` package with an int
    ``num_attention_heads`` or ``num_heads``, an int ``head_dim`` or ``attention_head_size``, and
    ``nn.Linear`` q, k and v projections (``q_proj``/``query``, ...). Grouped-query attention (a
    ``num_key_value_heads`` other than the number of heads) is not of this layout."""
    if not type(m).__module__.startswith("transformers.") or _head_dim(m) is None:
        return False
    heads = getattr(m, _heads_attr(m), None)
    if not is_int(heads):
        return False
    kv_heads = getattr(m, "num_key_value_heads", heads)
    return kv_heads == heads and all(isinstance(p, nn.Linear) for p in _hf_qkv(m))


@module_check
def _check_hf_attention(m: nn.Module) -> Iterator[str]:
    q, k, v = _hf_qkv(m)
    head_dim = _head_dim(m)
    if not isinstance(q, nn.Linear) or head_dim is None:
        return
    heads = _heads_attr(m)
    total = getattr(m, heads) * head_dim
    for name, proj in (("q", q), ("k", k), ("v", v)):
        if isinstance(proj, nn.Linear) and proj.out_features != total:
            yield f"{heads}*head_dim={total} but {name} projection out_features={proj.out_features}"
    for name in _HEAD_DIMS:
        if is_int(getattr(m, name, None)) and getattr(m, name) != head_dim:
            yield f"{name}={getattr(m, name)} but head_dim={head_dim}"
    if hasattr(m, "all_head_size") and m.all_head_size != total:
        yield f"all_head_size={m.all_head_size} but {heads}*attention_head_size={total}"
    scale = _scale_attr(m)
    if scale is not None:
        yield from check_scale(scale, getattr(m, scale), head_dim)


@register_attribute_sync_by(_is_hf_attention, check=_check_hf_attention,
                            managed_attrs=(*_HEADS, *_HEAD_DIMS, "all_head_size"))
@register_attribute_sync(*(f"{prefix}{name}" for prefix in _VIT_LIKE
                           for name in ("Attention", "SelfAttention", "SdpaSelfAttention")), check=_check_hf_attention)
def _sync_hf_attention(m: nn.Module, path: str, ctx: SyncContext) -> None:
    """HF ViT-style attention: 5.x ``ViTAttention`` (head_dim, scaling) and 4.x
    ``ViTSelfAttention`` (attention_head_size, all_head_size[, scaling]), and every module of that
    layout (:func:`_is_hf_attention`: ``Dinov2Attention``, ``BeitAttention``, CLIP's ``num_heads``
    and ``scale``, ...). The heads keep their count (unless ``num_heads`` says otherwise) and the
    per-head size becomes the new q/k/v width over it; a softmax scale that was ``head_dim**-0.5``
    follows it. Other int attributes of a module matched by its attributes (an ``embed_dim``) are
    not managed: one equal to an old width is reported as unknown."""
    q, k, v = _hf_qkv(m)
    if not isinstance(q, nn.Linear):
        return  # e.g. 4.x ViTAttention wrapper: its children carry the widths
    width = int(q.weight.shape[0])
    for name, proj in (("key", k), ("value", v)):
        if isinstance(proj, nn.Linear) and proj.weight.shape[0] != width:
            raise AttributeSyncError(
                f"{path_label(path)}: {name} projection width {proj.weight.shape[0]} differs from query width {width}; "
                f"HF ViT attention needs equal q/k/v widths"
            )
    ctx.set_heads(m, path, width, _heads_attr(m), _HEAD_DIMS, _scale_attr(m))
    if hasattr(m, "all_head_size"):
        m.all_head_size = width


def _hf_attention_modules(owner: nn.Module) -> list[nn.Module]:
    """The attention modules in ``owner`` (with q/k/v projections) that :func:`_sync_hf_attention` handles."""
    out = []
    for mod in owner.modules():
        entry = handler_for(mod)[0]
        if entry is not None and entry.sync is _sync_hf_attention and isinstance(_hf_qkv(mod)[0], nn.Linear):
            out.append(mod)
    return out


def _hf_attention_heads(owner: nn.Module) -> list[tuple[int, int]]:
    """``(heads, head_dim)`` of every attention module in ``owner`` that :func:`_sync_hf_attention` handles."""
    return [(getattr(mod, _heads_attr(mod)), _head_dim(mod)) for mod in _hf_attention_modules(owner)]


# --------------------------------------------------------------------------- ResNet


def _hf_resnet_widths(m: nn.Module) -> tuple[int | None, list[int]]:
    """(stem output width, output width of every stage)."""
    emb = None
    stages: list[int] = []
    for mod in m.modules():
        name = type(mod).__name__
        if name == "ResNetEmbeddings" and emb is None:
            emb = out_width(mod)
        elif name == "ResNetStage":
            w = out_width(mod)
            if w is not None:
                stages.append(w)
    return emb, stages


@module_check
def _check_hf_resnet_backbone(m: nn.Module) -> Iterator[str]:
    emb, stages = _hf_resnet_widths(m)
    if list(m.num_features) != [emb, *stages]:
        yield f"num_features={list(m.num_features)} but stages output {[emb, *stages]}"


@register_attribute_sync(f"{_HF_RESNET}.ResNetBackbone", check=_check_hf_resnet_backbone)
def _sync_hf_resnet_backbone(m: nn.Module, path: str, ctx: SyncContext) -> None:
    emb, stages = _hf_resnet_widths(m)
    if emb is not None and stages:
        m.num_features = [emb] + stages


# --------------------------------------------------------------------------- configs


def _set_config(config: Any, name: str, value: Any) -> None:
    if getattr(config, name, object()) != value:
        setattr(config, name, value)


def _hf_vit_summary(owner: nn.Module) -> dict[str, Any]:
    hidden = None
    inter: list[int] = []
    pooler = None
    for mod in owner.modules():
        name = type(mod).__name__
        if hidden is None and name.endswith("Embeddings") and is_tensor(getattr(mod, "cls_token", None)):
            hidden = int(mod.cls_token.shape[-1])
        if name.endswith("MLP") and isinstance(getattr(mod, "fc1", None), nn.Linear):
            inter.append(mod.fc1.out_features)
        elif name.endswith("Intermediate") and isinstance(getattr(mod, "dense", None), nn.Linear):
            inter.append(mod.dense.out_features)
        elif name.endswith("Pooler") and isinstance(getattr(mod, "dense", None), nn.Linear):
            pooler = mod.dense.out_features
    return {"hidden": hidden, "attn": _hf_attention_heads(owner), "inter": inter, "pooler": pooler}


def _check_hf_vit_config(owner: nn.Module, path: str, config: Any) -> list[str]:
    out = []
    p = f"{path_label(path)}.config"
    s = _hf_vit_summary(owner)
    if s["hidden"] is not None and config.hidden_size != s["hidden"]:
        out.append(f"{p}: hidden_size={config.hidden_size} but embeddings have width {s['hidden']}")
    if s["inter"] and config.intermediate_size != max(s["inter"]):
        out.append(f"{p}: intermediate_size={config.intermediate_size} but MLP widths are {sorted(set(s['inter']))}")
    if s["attn"]:
        heads, head_dim = s["attn"][0]
        if config.num_attention_heads != heads:
            out.append(f"{p}: num_attention_heads={config.num_attention_heads} but attention modules have {heads}")
        cfg_hd = getattr(config, "head_dim", config.hidden_size // max(config.num_attention_heads, 1))
        if cfg_hd != head_dim:
            out.append(f"{p}: head_dim (config) {cfg_hd} but attention modules have head_dim={head_dim}")
    return out


@register_config_sync("vit", "deit", check=_check_hf_vit_config)
def _sync_hf_vit_config(owner: nn.Module, path: str, config: Any, ctx: SyncContext) -> None:
    p = f"{path_label(path)}.config"
    s = _hf_vit_summary(owner)
    old_hidden = getattr(config, "hidden_size", None)
    if s["hidden"] is not None:
        _set_config(config, "hidden_size", int(s["hidden"]))
    hidden = config.hidden_size
    if s["inter"]:
        if len(set(s["inter"])) > 1:
            ctx.warn(f"{p}: per-layer intermediate sizes {s['inter']} cannot be expressed by "
                     f"intermediate_size; set to the maximum {max(s['inter'])}")
        _set_config(config, "intermediate_size", int(max(s["inter"])))
    if s["attn"]:
        if len(set(s["attn"])) > 1:
            ctx.warn(f"{p}: per-layer (num_heads, head_dim) {s['attn']} cannot be expressed by the "
                     f"config; num_attention_heads set from the first layer")
        heads, head_dim = s["attn"][0]
        _set_config(config, "num_attention_heads", int(heads))
        if hasattr(config, "head_dim") or heads * head_dim != hidden:
            _set_config(config, "head_dim", int(head_dim))
    if hasattr(config, "pooler_output_size"):
        if s["pooler"] is not None:
            _set_config(config, "pooler_output_size", int(s["pooler"]))
        elif config.pooler_output_size == old_hidden:
            _set_config(config, "pooler_output_size", int(hidden))


def _check_hf_heads_config(owner: nn.Module, path: str, config: Any) -> list[str]:
    attn = _hf_attention_heads(owner)
    heads, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    if not attn or not is_int(heads) or not is_int(hidden):
        return []
    out = []
    p = f"{path_label(path)}.config"
    if heads != attn[0][0]:
        out.append(f"{p}: num_attention_heads={heads} but attention modules have {attn[0][0]}")
    cfg_hd = getattr(config, "head_dim", None) or hidden // max(heads, 1)
    if cfg_hd != attn[0][1]:
        out.append(f"{p}: head_dim (config) {cfg_hd} but attention modules have head_dim={attn[0][1]}")
    return out


@register_config_fallback(check=_check_hf_heads_config)
def _sync_hf_heads_config(owner: nn.Module, path: str, config: Any, ctx: SyncContext) -> None:
    """Configs of model types with no handler of their own (DINOv2, BEiT, Data2Vec vision, ...):
    ``num_attention_heads`` from the attention modules of :func:`_sync_hf_attention`, and the sizes
    by :func:`sync_config_by_shapes`; where that does not rebuild the model (a head_dim that a
    factor rounded: q/k/v widths other than ``hidden_size``), also ``head_dim`` (which these models
    read when the config has one) and then ``hidden_size`` from the q/k/v input width (an old width
    that went to two new ones, which the shapes alone cannot tell apart). Kept only if the model
    built from the config has the model's shapes, heads and per-head sizes; otherwise the config is
    left to the shape-based sync."""
    attn = _hf_attention_modules(owner)
    if not attn or not is_int(getattr(config, "num_attention_heads", None)) or config_rebuilds(owner, config):
        return
    # the first layer's; per-stage head dims (MobileViT) follow the sizes, and per-layer numbers of
    # heads that the config cannot express fail the rebuild (the core then warns)
    n, head_dim = _hf_attention_heads(owner)[0]
    hidden = {int(_hf_qkv(mod)[0].in_features) for mod in attn}
    trial = copy.deepcopy(config)
    _set_config(trial, "num_attention_heads", int(n))
    if is_int(getattr(trial, "head_dim", None)):
        _set_config(trial, "head_dim", int(head_dim))
    synced = sync_config_by_shapes(owner, trial, path, ctx.old_shapes)
    if not synced and not is_int(getattr(trial, "head_dim", None)):
        trial.head_dim = int(head_dim)
        synced = sync_config_by_shapes(owner, trial, path, ctx.old_shapes)
    if not synced and len(hidden) == 1 and is_int(getattr(trial, "hidden_size", None)):
        _set_config(trial, "hidden_size", hidden.pop())
        synced = sync_config_by_shapes(owner, trial, path, ctx.old_shapes)
    if synced:
        for key, value in vars(trial).items():
            _set_config(config, key, value)


def _check_hf_resnet_config(owner: nn.Module, path: str, config: Any) -> list[str]:
    out = []
    emb, stages = _hf_resnet_widths(owner)
    if emb is not None and config.embedding_size != emb:
        out.append(f"{path_label(path)}.config: embedding_size={config.embedding_size} but the stem outputs {emb}")
    if stages and list(config.hidden_sizes) != stages:
        out.append(f"{path_label(path)}.config: hidden_sizes={list(config.hidden_sizes)} but stages output {stages}")
    return out


@register_config_sync("resnet", check=_check_hf_resnet_config)
def _sync_hf_resnet_config(owner: nn.Module, path: str, config: Any, ctx: SyncContext) -> None:
    emb, stages = _hf_resnet_widths(owner)
    if emb is not None:
        _set_config(config, "embedding_size", int(emb))
    if stages:
        if len(stages) != len(config.hidden_sizes):
            ctx.warn(f"{path_label(path)}.config: found {len(stages)} stages but hidden_sizes has "
                     f"{len(config.hidden_sizes)}")
        _set_config(config, "hidden_sizes", [int(w) for w in stages])
    # bottleneck inner width is hard-wired to out_channels // 4 in HF ResNet
    for mod in owner.modules():
        if type(mod).__name__ == "ResNetBottleNeckLayer":
            inner = out_width(mod.layer[0])
            outw = out_width(mod.layer[-1])
            if inner is not None and outw is not None and inner != outw // 4:
                ctx.warn(f"{path_label(path)}.config: a bottleneck inner width {inner} != out/4={outw // 4}; "
                         f"ResNetConfig cannot express it (rebuilding from the config will not match the weights)")
                break
