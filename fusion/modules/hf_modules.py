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

Also: the ``embed_dim`` of CLIP-style attention (the q projection's input width); a number of
heads that per-head tensors hold (Swin V2's ``logit_scale`` and position-bias MLP, relative position
bias tables); Swin / Swin V2 (``SwinModel.num_features``, ``SwinBackbone.num_features``,
``Swinv2Stage.dim``, ``Swinv2PatchMerging.dim`` and the ``swin``/``swinv2`` config: ``embed_dim``,
``num_heads``, ``mlp_ratio``, ``hidden_size``); CLIP / SigLIP (``embed_dim`` of the encoder layers
and vision embeddings, ``CLIPModel``'s projection widths, the ``clip_vision_model`` /
``siglip_vision_model`` config: ``hidden_size``, ``intermediate_size``, ``num_attention_heads``,
``projection_dim``, and the composite ``clip``/``siglip`` configs through their towers); LeViT
attention (``LevitAttention``, ``LevitAttentionSubsample``: ``key_dim``, ``attention_ratio``,
``out_dim_projection``, ``out_dim_keys_values``, ``scale``; the ``levit`` config: ``hidden_sizes``,
``key_dim`` and the subsampling attention's key dims in ``down_ops``). A config
that cannot describe the resized widths (Swin stage widths that do not double, CLIP attention
narrower than ``hidden_size``, Swin V2's position-bias MLP, fixed at 512 units by transformers) is
left with an :class:`AttributeSyncWarning` naming what it cannot express: the model itself reads
none of these fields and runs as resized, and ``fusion.io`` writes no ``.hf`` folder for it.

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
import warnings
from typing import Any, Iterator

import torch
from torch import nn

from .core import (
    AttributeSyncError, SyncContext, check_scale, config_rebuilds, handler_for, is_int, is_tensor, module_check,
    out_width, path_label, per_head_key_value, register_attribute_sync, register_attribute_sync_by,
    register_config_fallback, register_config_sync, register_derived_width, register_width_free, sync_config_by_shapes,
    unknown_module,
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


def _tensor_heads(m: nn.Module) -> dict[str, int]:
    """The number of heads that ``m``'s per-head tensors hold, by tensor: Swin V2's ``logit_scale``
    (one temperature per head) and the output of its ``continuous_position_bias_mlp`` (one bias per
    head), and a relative position bias table's last axis (Swin, BEiT)."""
    out = {}
    scale = m._parameters.get("logit_scale")
    if is_tensor(scale) and scale.dim() >= 1:
        out["logit_scale"] = int(scale.shape[0])
    cpb = getattr(m, "continuous_position_bias_mlp", None)
    last = [mod for mod in cpb.modules() if isinstance(mod, nn.Linear)][-1:] if isinstance(cpb, nn.Module) else []
    if last and is_tensor(last[0].weight):
        out["continuous_position_bias_mlp"] = int(last[0].weight.shape[0])
    for owner, name in ((m, "relative_position_bias_table"),
                        (getattr(m, "relative_position_bias", None), "relative_position_bias_table")):
        table = owner._parameters.get(name) if isinstance(owner, nn.Module) else None
        if is_tensor(table) and table.dim() == 2:
            out[name if owner is m else f"relative_position_bias.{name}"] = int(table.shape[-1])
    return out


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
    for name, n in _tensor_heads(m).items():
        if n != getattr(m, heads):
            yield f"{heads}={getattr(m, heads)} but {name} holds {n} heads"
    embed_dim = getattr(m, "embed_dim", None)
    if is_int(embed_dim) and embed_dim != q.in_features:
        yield f"embed_dim={embed_dim} but the q projection reads {q.in_features} features"


@register_attribute_sync_by(_is_hf_attention, check=_check_hf_attention,
                            managed_attrs=(*_HEADS, *_HEAD_DIMS, "all_head_size", "embed_dim"))
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
    heads = _heads_attr(m)
    per_head = _tensor_heads(m)
    if len(set(per_head.values())) > 1:
        raise AttributeSyncError(f"{path_label(path)}: its per-head tensors hold different numbers of heads "
                                 f"{per_head}; resize the space of its heads as one")
    if per_head and path not in ctx.num_heads:
        # heads removed whole (a width given to the space of Swin V2's logit_scale, which indexes them)
        setattr(m, heads, next(iter(per_head.values())))
    n, _ = ctx.set_heads(m, path, width, heads, _HEAD_DIMS, _scale_attr(m))
    if per_head and n != next(iter(per_head.values())):
        raise AttributeSyncError(f"{path_label(path)}: num_heads asks for {n} heads but its per-head tensors "
                                 f"{per_head} hold {next(iter(per_head.values()))}")
    if hasattr(m, "all_head_size"):
        m.all_head_size = width
    if is_int(getattr(m, "embed_dim", None)):
        _sync_attention_embed_dim(m, path, ctx, q)


def _sync_attention_embed_dim(m: nn.Module, path: str, ctx: SyncContext, q: nn.Linear) -> None:
    """``embed_dim`` of CLIP-style attention (``CLIPAttention``, ``SiglipAttention``, ...): the
    model's hidden size (``config.hidden_size``), which these classes use as the q projection's input
    width (and, at construction, as its width too: ``nn.Linear(embed_dim, embed_dim)``). It follows
    the q projection's input width; one that was the q width and not its input width follows the q
    width; one that was neither (something else of the same size) is refused."""
    name = next(n for n in ("q_proj", "query") if getattr(m, n, None) is q)
    old = ctx.old_shape(f"{path}.{name}" if path else name, "weight")
    if old is None or len(old) != 2:  # nothing to compare: the convention of these classes
        m.embed_dim = int(q.in_features)
        return
    old_width, old_in = int(old[0]), int(old[1])
    if m.embed_dim == old_in:
        m.embed_dim = int(q.in_features)
    elif m.embed_dim == old_width:
        m.embed_dim = int(q.out_features)
    elif (old_width, old_in) != (q.out_features, q.in_features):
        raise unknown_module(
            path, m, ["embed_dim"],
            f"embed_dim={m.embed_dim} is neither the input width ({old_in}) nor the width ({old_width}) its q "
            f"projection had, so what it measures is unknown and it cannot be synced; register a handler for this "
            f"type (`@register_attribute_sync`) that recomputes it from the module's tensors")


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


# --------------------------------------------------------------------------- Swin, Swin V2

_SWIN = ("transformers.models.swin.modeling_swin.Swin", "transformers.models.swinv2.modeling_swinv2.Swinv2")


def _norm_width(norm: Any) -> int | None:
    """The width a LayerNorm normalises (its weight's, else its ``normalized_shape``), or ``None``."""
    if not isinstance(norm, nn.LayerNorm):
        return None
    return int(norm.weight.shape[-1]) if is_tensor(norm.weight) else int(norm.normalized_shape[-1])


def _swin_stage_width(stage: nn.Module) -> int | None:
    """The residual width a Swin (V2) stage's blocks run at (their ``layernorm_before``)."""
    return next((w for w in (_norm_width(getattr(b, "layernorm_before", None)) for b in stage.blocks)
                 if w is not None), None)


def _swin_stages(m: nn.Module) -> list[nn.Module]:
    return [mod for mod in m.modules() if type(mod).__name__ in ("SwinStage", "Swinv2Stage")]


register_derived_width(
    *(f"{prefix}Model" for prefix in _SWIN), attr="num_features", width=lambda m: _norm_width(m.layernorm),
    source="its final layernorm normalises",
    doc="``SwinModel``/``Swinv2Model.num_features``: the last stage's width (that of the final ``layernorm``, "
        "which the pooler and the classifier read).")


def _swin_backbone_widths(m: nn.Module) -> list[int | None]:
    emb = next((out_width(mod.projection) for mod in m.modules()
                if type(mod).__name__ in ("SwinPatchEmbeddings", "Swinv2PatchEmbeddings")), None)
    return [emb, *(_swin_stage_width(stage) for stage in _swin_stages(m))]


@module_check
def _check_swin_backbone(m: nn.Module) -> Iterator[str]:
    widths = _swin_backbone_widths(m)
    if None not in widths and list(m.num_features) != widths:
        yield f"num_features={list(m.num_features)} but the patch embeddings and stages have widths {widths}"


@register_attribute_sync(*(f"{prefix}Backbone" for prefix in _SWIN), check=_check_swin_backbone)
def _sync_swin_backbone(m: nn.Module, path: str, ctx: SyncContext) -> None:
    """``SwinBackbone``/``Swinv2Backbone.num_features``: the patch embeddings' width, then each stage's."""
    widths = _swin_backbone_widths(m)
    if None not in widths:
        m.num_features = widths


register_derived_width("transformers.models.swinv2.modeling_swinv2.Swinv2Stage", attr="dim", width=_swin_stage_width,
                       source="its blocks run at width",
                       doc="``Swinv2Stage.dim``: the width its blocks run at (stored, read by no forward).")


@module_check
def _check_swinv2_patch_merging(m: nn.Module) -> Iterator[str]:
    if m.reduction.in_features != 4 * m.dim:
        yield f"dim={m.dim} but the reduction reads {m.reduction.in_features} = 4*dim features"


@register_attribute_sync("transformers.models.swinv2.modeling_swinv2.Swinv2PatchMerging",
                         check=_check_swinv2_patch_merging)
def _sync_swinv2_patch_merging(m: nn.Module, path: str, ctx: SyncContext) -> None:
    """``Swinv2PatchMerging.dim``: the width C of the stage it merges (its reduction reads the 4*C
    features of a 2x2 patch; the output width, 2*C at construction, is the reduction's own and may
    be any: nothing reads ``dim`` in the forward)."""
    n = int(m.reduction.weight.shape[1])
    if n % 4:
        raise AttributeSyncError(
            f"{path_label(path)}: Swinv2PatchMerging concatenates the C features of 4 pixels, but its reduction "
            f"reads {n} features, not a multiple of 4; resize the stage's space, not the merged features")
    m.dim = n // 4


# --------------------------------------------------------------------------- LeViT

_LEVIT = "transformers.models.levit.modeling_levit."


def _levit_dims(m: nn.Module) -> tuple[int, int] | None:
    """``(key_dim, value dims)`` per head of transformers LeViT attention, from its tensors: the
    projection reads ``heads * value`` features; ``queries_keys_values`` writes ``heads * (2
    key_dim + value)``, or ``queries`` ``heads * key_dim`` (attention that subsamples)."""
    h, values = m.num_attention_heads, int(m.projection.linear.weight.shape[1])
    if hasattr(m, "queries_keys_values"):
        return per_head_key_value(h, values, qkv=int(m.queries_keys_values.linear.weight.shape[0]))
    return per_head_key_value(h, values, q=int(m.queries.linear.weight.shape[0]))


@module_check
def _check_levit_attention(m: nn.Module) -> Iterator[str]:
    dims = _levit_dims(m)
    if dims is None:
        yield f"its tensors do not split into {m.num_attention_heads} heads of queries, keys and values"
        return
    key, val = dims
    if m.key_dim != key or m.attention_ratio * key != val:
        yield f"key_dim={m.key_dim}, attention_ratio={m.attention_ratio} but its tensors hold {key}, {val} per head"
    if m.out_dim_projection != m.num_attention_heads * val:
        yield f"out_dim_projection={m.out_dim_projection} but the projection reads {m.num_attention_heads * val}"


@register_attribute_sync(f"{_LEVIT}LevitAttention", f"{_LEVIT}LevitAttentionSubsample", check=_check_levit_attention)
def _sync_levit_attention(m: nn.Module, path: str, ctx: SyncContext) -> None:
    """transformers ``LevitAttention`` / ``LevitAttentionSubsample``: per head, ``key_dim`` query
    and key dims and ``attention_ratio * key_dim`` value dims (its forward splits each head at
    them); heads keep their count, the softmax scale follows ``key_dim``. A width whose value dims
    are no integer multiple of the key dims has no ``attention_ratio`` and is refused."""
    m.num_attention_heads = ctx.heads(path, m.num_attention_heads)
    dims = _levit_dims(m)
    if dims is None or dims[1] % dims[0]:
        raise AttributeSyncError(f"{path_label(path)}: its q/k/v and projection widths do not split into "
                                 f"{m.num_attention_heads} heads of key_dim query and key dims and an integer "
                                 f"attention_ratio times key_dim value dims; keep its attention spaces' ratio")
    key, val = dims
    ctx.rescale(m, path, m.key_dim, key)
    h = m.num_attention_heads
    m.key_dim, m.attention_ratio = key, val // key
    m.out_dim_projection = h * val
    m.out_dim_keys_values = h * (val + (2 if hasattr(m, "queries_keys_values") else 1) * key)


def _levit_summary(owner: nn.Module) -> dict[str, list[int]]:
    """Per stage, the width and attention ``key_dim`` of a transformers LeViT; per subsampling
    attention (in order), its ``key_dim``."""
    out: dict[str, list[int]] = {"hidden_sizes": [], "key_dim": [], "down": []}
    for mod in owner.modules():
        name = type(mod).__name__
        if name == "LevitStage":
            attn = next((a for a in mod.modules() if type(a).__name__ == "LevitAttention"), None)
            if attn is not None:
                out["hidden_sizes"].append(int(attn.projection.linear.weight.shape[0]))
                out["key_dim"].append(int(attn.key_dim))
        elif name == "LevitAttentionSubsample":
            out["down"].append(int(mod.key_dim))
    return out


@register_config_sync("levit")
def _sync_levit_config(owner: nn.Module, path: str, config: Any, ctx: SyncContext) -> None:
    """transformers LeViT config: ``hidden_sizes`` and ``key_dim`` per stage, and the key dims of
    its subsampling attention (``down_ops[i][1]``), from the modules; head counts, attention and
    MLP ratios are kept (a width factor keeps them). What it cannot describe is warned and no
    ``.hf`` form is written."""
    s = _levit_summary(owner)
    if len(s["hidden_sizes"]) == len(config.hidden_sizes):
        _set_config(config, "hidden_sizes", [int(w) for w in s["hidden_sizes"]])
    if len(s["key_dim"]) == len(config.key_dim):
        _set_config(config, "key_dim", [int(k) for k in s["key_dim"]])
    subsample = [op for op in config.down_ops if op and op[0] == "Subsample"]
    if len(subsample) == len(s["down"]):
        for op, key in zip(subsample, s["down"]):
            op[1] = key
    if not config_rebuilds(owner, config):
        _warn_once(ctx, f"{path_label(path)}.config (model_type='levit'): {_rebuild_mismatch(owner, config)}; "
                        f"{_NOT_REBUILT}")


# --------------------------------------------------------------------------- CLIP, SigLIP

_CLIP_LIKE = ("transformers.models.clip.modeling_clip.CLIP", "transformers.models.siglip.modeling_siglip.Siglip")


register_derived_width(
    *(f"{prefix}EncoderLayer" for prefix in _CLIP_LIKE), attr="embed_dim", width=lambda m: _norm_width(m.layer_norm1),
    source="layer_norm1 normalises",
    doc="``CLIPEncoderLayer``/``SiglipEncoderLayer.embed_dim``: the residual width (``layer_norm1``'s).")


register_derived_width(
    *(f"{prefix}VisionEmbeddings" for prefix in _CLIP_LIKE), attr="embed_dim",
    width=lambda m: out_width(m.patch_embedding), source="patch_embedding outputs",
    doc="``CLIPVisionEmbeddings``/``SiglipVisionEmbeddings.embed_dim``: the patch embedding's width (that of the "
        "class and position embeddings too).")


def _clip_model_widths(m: nn.Module) -> dict[str, int]:
    out = {}
    for attr, proj, side in (("vision_embed_dim", "visual_projection", 1), ("text_embed_dim", "text_projection", 1),
                             ("projection_dim", "visual_projection", 0)):
        p = getattr(m, proj, None)
        if isinstance(p, nn.Linear) and is_int(getattr(m, attr, None)):
            out[attr] = int(p.weight.shape[side])
    return out


@module_check
def _check_clip_model(m: nn.Module) -> Iterator[str]:
    for attr, width in _clip_model_widths(m).items():
        if getattr(m, attr) != width:
            yield f"{attr}={getattr(m, attr)} but the projections imply {width}"


@register_attribute_sync("transformers.models.clip.modeling_clip.CLIPModel", check=_check_clip_model)
def _sync_clip_model(m: nn.Module, path: str, ctx: SyncContext) -> None:
    """``CLIPModel``: ``vision_embed_dim``/``text_embed_dim`` (the inputs of ``visual_projection``/
    ``text_projection``: the towers' widths) and ``projection_dim`` (their width)."""
    for attr, width in _clip_model_widths(m).items():
        setattr(m, attr, width)


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


def _warn_once(ctx: SyncContext, message: str) -> None:
    """A warning of ``ctx`` unless it was given already (a config reached through its parent's too)."""
    if message not in ctx.warnings:
        ctx.warn(message)


def _rebuild_mismatch(owner: nn.Module, config: Any, limit: int = 3) -> str:
    """What the model that ``config`` builds (on the meta device) has other than ``owner``: the first
    tensors of other shapes, for a warning."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            built = type(owner)(config)
    except Exception as e:  # noqa: BLE001 - any constructor failure: say which
        return f"building the model from it fails ({type(e).__name__}: {e})"
    have = {k: tuple(v.shape) for k, v in owner.state_dict().items() if is_tensor(v)}
    got = {k: tuple(v.shape) for k, v in built.state_dict().items() if is_tensor(v)}
    diff = [f"{k} {have[k]} (the config builds {got.get(k)})" for k in have if have[k] != got.get(k)]
    if not diff:
        return "its fields do not rebuild the model's heads"
    more = f" and {len(diff) - limit} more" if len(diff) > limit else ""
    return f"its fields do not rebuild the model's shapes: {', '.join(diff[:limit])}{more}"


_NOT_REBUILT = ("the model runs as resized, but this config does not describe it: save_pretrained/from_pretrained "
                "would not load its weights, and fusion.io writes no .hf folder for it (the toolkit's own files "
                "rebuild it)")


# Swin and Swin V2: the stage widths are embed_dim * 2**i, every block's MLP int(mlp_ratio * width),
# and every attention has the stage's width in num_heads[i] heads.


def _swin_summary(owner: nn.Module) -> dict[str, Any]:
    emb = next((out_width(mod.projection) for mod in owner.modules()
                if type(mod).__name__ in ("SwinPatchEmbeddings", "Swinv2PatchEmbeddings")), None)
    stages = []
    for stage in _swin_stages(owner):
        mlp, qkv = [], []
        for block in stage.blocks:
            # Swin: mlp.fc1; Swin V2: intermediate.dense
            fc = getattr(getattr(block, "mlp", None), "fc1", None) or \
                getattr(getattr(block, "intermediate", None), "dense", None)
            if isinstance(fc, nn.Linear):
                mlp.append(int(fc.weight.shape[0]))
            qkv.extend(int(_hf_qkv(mod)[0].weight.shape[0]) for mod in _hf_attention_modules(block))
        stages.append({"width": _swin_stage_width(stage), "heads": [h for h, _ in _hf_attention_heads(stage)],
                       "mlp": mlp, "qkv": qkv})
    return {"embed_dim": emb, "stages": stages}


def _swin_mlp_ratio(config: Any, stages: list[dict[str, Any]]) -> float | None:
    """An ``mlp_ratio`` giving every block's MLP width as ``int(mlp_ratio * stage width)`` (the
    config's own first), or ``None``."""
    pairs = [(s["width"], w) for s in stages for w in s["mlp"] if s["width"]]
    if not pairs:
        return getattr(config, "mlp_ratio", None)
    for ratio in (getattr(config, "mlp_ratio", None), pairs[0][1] / pairs[0][0]):
        if isinstance(ratio, (int, float)) and all(int(ratio * d) == w for d, w in pairs):
            return ratio
    return None


def _swin_problems(config: Any, s: dict[str, Any]) -> list[str]:
    """What the Swin config (its ``embed_dim``, ``num_heads``, ``mlp_ratio``) cannot express of the
    widths in ``s``, or disagrees with."""
    out = []
    emb, stages = s["embed_dim"], s["stages"]
    if emb is not None and config.embed_dim != emb:
        out.append(f"embed_dim={config.embed_dim} but the patch embeddings output {emb} features")
    widths = [st["width"] for st in stages]
    expected = [int(config.embed_dim * 2 ** i) for i in range(len(stages))]
    if None not in widths and widths != expected:
        out.append(f"stage widths {widths} are not embed_dim * 2**i = {expected} (the only stage widths the config "
                   f"can express: every stage doubles its predecessor's)")
    for i, st in enumerate(stages):
        if st["width"] is not None and any(q != st["width"] for q in st["qkv"]):
            out.append(f"stage {i} attention widths {sorted(set(st['qkv']))} differ from the stage width "
                       f"{st['width']} (the config builds q/k/v of the stage's width)")
    heads = [st["heads"] for st in stages]
    if any(len(set(h)) > 1 for h in heads):
        out.append(f"blocks of one stage have different numbers of heads {heads}")
    elif all(heads) and list(config.num_heads)[:len(heads)] != [h[0] for h in heads]:
        out.append(f"num_heads={list(config.num_heads)} but the stages' attention has {[h[0] for h in heads]}")
    ratio = _swin_mlp_ratio(config, stages)
    if ratio is None or ratio != config.mlp_ratio:
        mlp = [st["mlp"] for st in stages]
        out.append(f"MLP widths {mlp} are not int(mlp_ratio * stage width) for mlp_ratio={config.mlp_ratio}"
                   + ("" if ratio is not None else " or any other one ratio"))
    return out


def _check_swin_config(owner: nn.Module, path: str, config: Any) -> list[str]:
    s = _swin_summary(owner)
    out = _swin_problems(config, s)
    last = s["stages"][-1]["width"] if s["stages"] else None
    if last is not None and is_int(getattr(config, "hidden_size", None)) and config.hidden_size != last:
        out.append(f"hidden_size={config.hidden_size} but the last stage has width {last}")
    return [f"{path_label(path)}.config: {message}" for message in out]


@register_config_sync("swin", "swinv2", check=_check_swin_config)
def _sync_swin_config(owner: nn.Module, path: str, config: Any, ctx: SyncContext) -> None:
    """Swin / Swin V2 configs: ``embed_dim`` (the patch embeddings' width), ``num_heads`` (each
    stage's), ``mlp_ratio`` (one that gives every MLP width) and ``hidden_size`` (the last stage's
    width). Stage widths other than ``embed_dim * 2**i``, attention widths other than their stage's,
    per-block numbers of heads or MLP ratios cannot be expressed: the model (whose modules read none
    of these) keeps them and runs as resized; the config is left describing what it can, with a
    warning that names what it cannot."""
    s = _swin_summary(owner)
    if s["embed_dim"] is not None:
        _set_config(config, "embed_dim", int(s["embed_dim"]))
    stages = s["stages"]
    heads = [st["heads"][0] for st in stages if st["heads"]]
    if len(heads) == len(stages) and len(list(config.num_heads)) == len(heads):
        _set_config(config, "num_heads", type(config.num_heads)(int(h) for h in heads))
    ratio = _swin_mlp_ratio(config, stages)
    if ratio is not None:
        _set_config(config, "mlp_ratio", ratio)
    if stages and stages[-1]["width"] is not None and is_int(getattr(config, "hidden_size", None)):
        _set_config(config, "hidden_size", int(stages[-1]["width"]))
    problems = _swin_problems(config, s)
    if problems or not config_rebuilds(owner, config):
        why = "; ".join(problems) or _rebuild_mismatch(owner, config)
        _warn_once(ctx, f"{path_label(path)}.config (model_type={config.model_type!r}): {why}; {_NOT_REBUILT}")


# CLIP and SigLIP vision towers: hidden_size, intermediate_size and num_attention_heads; the
# attention's q/k/v width is hidden_size (CLIPAttention/SiglipAttention: nn.Linear(hidden_size,
# hidden_size), head_dim = hidden_size // num_attention_heads: there is no head_dim field).


def _clip_summary(owner: nn.Module) -> dict[str, Any]:
    hidden = None
    inter: list[int] = []
    mha: list[int] = []
    for mod in owner.modules():
        if hidden is None and type(mod).__name__.endswith("VisionEmbeddings"):
            hidden = out_width(mod.patch_embedding) if isinstance(getattr(mod, "patch_embedding", None),
                                                                  nn.Module) else None
        if type(mod).__name__.endswith("MLP") and isinstance(getattr(mod, "fc1", None), nn.Linear):
            inter.append(int(mod.fc1.weight.shape[0]))
        elif isinstance(mod, nn.MultiheadAttention):  # SigLIP's attention pooling head
            mha.append(int(mod.num_heads))
    attn = _hf_attention_modules(owner)
    return {"hidden": hidden, "inter": inter, "heads": [h for h, _ in _hf_attention_heads(owner)] + mha,
            "qkv": [int(_hf_qkv(mod)[0].weight.shape[0]) for mod in attn]}


def _clip_problems(config: Any, s: dict[str, Any]) -> list[str]:
    out = []
    if s["hidden"] is not None and config.hidden_size != s["hidden"]:
        out.append(f"hidden_size={config.hidden_size} but the patch embeddings output {s['hidden']} features")
    if any(q != config.hidden_size for q in s["qkv"]):
        out.append(f"attention widths {sorted(set(s['qkv']))} differ from hidden_size={config.hidden_size} (the "
                   f"config builds q/k/v projections of width hidden_size: keep the attention spaces at the "
                   f"residual stream's width to get a model it describes)")
    if s["inter"] and (len(set(s["inter"])) > 1 or config.intermediate_size != s["inter"][0]):
        out.append(f"intermediate_size={config.intermediate_size} but the MLP widths are {s['inter']}")
    if s["heads"] and (len(set(s["heads"])) > 1 or config.num_attention_heads != s["heads"][0]):
        out.append(f"num_attention_heads={config.num_attention_heads} but the attention modules have "
                   f"{s['heads']} heads")
    return out


def _check_clip_config(owner: nn.Module, path: str, config: Any) -> list[str]:
    return [f"{path_label(path)}.config: {message}" for message in _clip_problems(config, _clip_summary(owner))]


_CLIP_VISION_TYPES = ("clip_vision_model", "siglip_vision_model")


@register_config_sync(*_CLIP_VISION_TYPES, check=_check_clip_config)
def _sync_clip_config(owner: nn.Module, path: str, config: Any, ctx: SyncContext) -> None:
    """CLIP / SigLIP vision configs (``CLIPVisionModel``, ``CLIPVisionModelWithProjection``,
    ``SiglipVisionModel`` and the vision tower of the composite models): ``hidden_size`` (the patch
    embeddings' width), ``intermediate_size`` (the MLPs'; the largest, with a warning, when they
    differ) and ``num_attention_heads`` (the first layer's). Attention widths other than
    ``hidden_size`` (the residual stream is a model output of ``CLIPVisionModel``: only the attention
    and the MLP narrow) and per-layer sizes cannot be expressed: the model runs as resized and the
    config is left with a warning naming what it cannot describe."""
    s = _clip_summary(owner)
    if s["hidden"] is not None:
        _set_config(config, "hidden_size", int(s["hidden"]))
    if s["inter"]:
        _set_config(config, "intermediate_size", int(max(s["inter"])))
    if s["heads"]:
        _set_config(config, "num_attention_heads", int(s["heads"][0]))
    proj = getattr(owner, "visual_projection", None)
    if isinstance(proj, nn.Linear) and is_int(getattr(config, "projection_dim", None)):
        _set_config(config, "projection_dim", int(proj.weight.shape[0]))
    problems = _clip_problems(config, s)
    if problems or not config_rebuilds(owner, config):
        why = "; ".join(problems) or _rebuild_mismatch(owner, config)
        _warn_once(ctx, f"{path_label(path)}.config (model_type={config.model_type!r}): {why}; {_NOT_REBUILT}")


def _check_clip_composite_config(owner: nn.Module, path: str, config: Any) -> list[str]:
    # (the towers' sub-configs are their modules' configs: check_consistency checks them there)
    proj = getattr(owner, "visual_projection", None)
    if isinstance(proj, nn.Linear) and is_int(getattr(config, "projection_dim", None)) \
            and config.projection_dim != proj.weight.shape[0]:
        return [f"{path_label(path)}.config: projection_dim={config.projection_dim} but visual_projection outputs "
                f"{proj.weight.shape[0]} features"]
    return []


def _sub_configs(owner: nn.Module, path: str, config: Any) -> list[tuple[str, nn.Module, Any]]:
    """``(path, module, sub-config)`` of every module below ``owner`` whose config is one of
    ``config``'s ``vision_config``/``text_config`` (the towers of a composite CLIP / SigLIP model)."""
    subs = {id(c): c for c in (getattr(config, "vision_config", None), getattr(config, "text_config", None))
            if c is not None}
    out = []
    for sub_path, mod in owner.named_modules():
        c = mod.__dict__.get("config")
        if mod is not owner and c is not None and id(c) in subs:
            out.append((f"{path}.{sub_path}" if path else sub_path, mod, subs.pop(id(c))))
    return out


@register_config_sync("clip", "siglip", check=_check_clip_composite_config)
def _sync_clip_composite_config(owner: nn.Module, path: str, config: Any, ctx: SyncContext) -> None:
    """Composite CLIP / SigLIP configs (``CLIPForImageClassification``, ``SiglipForImageClassification``,
    ``CLIPModel``, ...): the towers' sub-configs are those of their modules (``vision_model.config`` is
    ``config.vision_config``), synced here through those modules, before the composite is checked
    to rebuild the model (a text tower with no handler of its own: by the heads fallback and its
    shapes)."""
    for sub_path, sub, sub_config in _sub_configs(owner, path, config):
        if getattr(sub_config, "model_type", None) in _CLIP_VISION_TYPES:
            _sync_clip_config(sub, sub_path, sub_config, ctx)
        else:
            _sync_hf_heads_config(sub, sub_path, sub_config, ctx)
            sync_config_by_shapes(sub, sub_config, sub_path, ctx.old_shapes)
    proj = getattr(owner, "visual_projection", None)
    if isinstance(proj, nn.Linear) and is_int(getattr(config, "projection_dim", None)):
        _set_config(config, "projection_dim", int(proj.weight.shape[0]))
    if not config_rebuilds(owner, config) and not any(m.startswith(f"{path_label(p)}.config")
                                                      for p, _, _ in _sub_configs(owner, path, config)
                                                      for m in ctx.warnings):
        _warn_once(ctx, f"{path_label(path)}.config (model_type={config.model_type!r}): "
                        f"{_rebuild_mismatch(owner, config)}; {_NOT_REBUILT}")
