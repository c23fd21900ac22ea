"""Attribute handlers for timm modules, registered on import (by dotted class name: timm is not imported).

Covered: Attention, AttentionRope, AttentionPoolLatent, VisionTransformer and Eva (its ViT attributes), ResNet, ConvNeXt,
every other timm model of the 0.9+ convention by its attributes (EfficientNet, MobileNetV3/V4,
RegNet, ByobNet, ...: ``num_features``, ``head_hidden_size`` and ``feature_info`` from a run on
the meta device), ClassifierHead, NormMlpClassifierHead, ClNormMlpClassifierHead, RmsNorm*/SimpleNorm* (as
``nn.LayerNorm``), EvoNorm2dS* (groups validated); the norm classes deriving from torch norms
(LayerNorm, LayerNorm2d, BatchNormAct2d, GroupNorm, GroupNormAct, ...) via their base; width-free
modules (PatchEmbed, LayerScale, Mlp, Block, BasicBlock, ...). ``feature_info[*]["num_chs"]`` of
these models is updated too. Families whose blocks store widths: CSPNet CrossStage(3), DLA (and
DlaTree, DlaBottle2neck), GhostNet (GhostModule, GhostModuleV2, GhostModuleV3 and
GhostBottleneckV3), ReXNet LinearBottleneck, Xception (Pre)XceptionModule, TResNet, FastViT
(MobileOneBlock, ReparamLargeKernelConv, RepMixer, RepConditionalPosEnc, Attention), BlurPool2d,
MobileViT (MobileVitBlock, MobileVitV2Block: width-free; MobileViTv2 LinearSelfAttention), LeViT
Attention / AttentionDownsample, EfficientFormer and TinyViT Attention, EfficientViT (MSRA)
CascadedGroupAttention, EfficientFormerV2 Attention2d(Downsample) (``key_dim`` / ``val_dim`` per head).

Attribute names in the installed timm (1.0.31) that these handlers rely on:
``timm.layers.Attention`` has ``num_heads``, ``head_dim``, ``attn_dim`` (used in the output
reshape) and ``scale``. The fused path calls ``F.scaled_dot_product_attention`` without ``scale=``
(i.e. it uses ``q.size(-1) ** -0.5`` implicitly); the non-fused path multiplies by ``self.scale``,
so ``scale`` must be kept in sync.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from alignment.runner import model_dtype

from . import torch_modules as _torch_modules  # noqa: F401  (registers nn.LayerNorm, whose handler is reused below)
from .core import (
    AttributeSyncError, GroupsNotDivisibleError, HeadsNotDivisibleError, SyncContext, UnknownModuleError, check_scale,
    divide_heads, is_int, is_tensor, lookup, module_check, out_width, path_label, per_head_key_value, qualname,
    register_attribute_sync, register_attribute_sync_by, register_derived_width, register_width_free, unknown_module,
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


# --------------------------------------------------------------------------- weight-standardised convs


_STD_CONVS = ("timm.layers.std_conv.StdConv2d", "timm.layers.std_conv.StdConv2dSame",
              "timm.layers.std_conv.ScaledStdConv2d", "timm.layers.std_conv.ScaledStdConv2dSame")


@register_attribute_sync(*_STD_CONVS, check=_torch_modules._check_conv,
                         managed_attrs={"in_channels", "out_channels", "groups"})
def _sync_std_conv(m: nn.Module, path: str, ctx: SyncContext) -> None:
    """A weight-standardised conv (NormFreeNet, BiT) normalises each filter over its inputs before use:
    a change of its input width changes every filter's standardisation (repeating inputs and
    splitting their weights, as widening does, is no longer the same function; ScaledStdConv2d's
    ``scale`` depends on the fan-in), so it is refused; output widths follow as for any conv."""
    old = (ctx.old_shapes or {}).get(f"{path}.weight" if path else "weight")
    if old is not None and len(old) == m.weight.dim() and int(old[1]) != int(m.weight.shape[1]):
        raise UnknownModuleError(
            f"{path_label(path)}: {type(m).__name__} standardises each filter over its {int(old[1])} inputs per group; "
            f"changing them to {int(m.weight.shape[1])} changes what it computes (no handler can keep it): resize "
            f"only spaces this layer does not read, or fuse at the models' own widths",
            [(path, type(m), ["in_channels"])])
    _torch_modules._sync_conv(m, path, ctx)


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


def _rows(m: nn.Module | None, axis: int = 0) -> int | None:
    """Axis ``axis`` of a weight of ``m`` (a Linear, a conv, LeViT's Linear/ConvNorm, a Sequential
    or EfficientFormerV2's LocalGlobalQuery): the first weight's input (``axis=1``), the last
    weight's output (``axis=0``)."""
    if m is None:
        return None
    ws = [t for k, t in m.state_dict().items() if k.endswith("weight") and t.dim() >= 2]
    return None if not ws else int((ws[-1] if axis == 0 else ws[0]).shape[axis])


def _val_attr(m: nn.Module) -> str:
    """The attribute holding the value dims per head (``val_dim``; EfficientFormerV2: ``d``)."""
    return "val_dim" if hasattr(m, "val_dim") else "d"


def _key_value_dims(m: nn.Module) -> tuple[int, int] | None:
    """``(key_dim, val_dim)`` per head of LeViT-style attention, from its tensors: the output
    projection reads ``heads * val_dim`` features; ``qkv`` writes ``heads * (2 key_dim + val_dim)``,
    each of ``qkvs`` ``2 key_dim + val_dim`` (EfficientViT's cascaded heads), or ``q`` writes
    ``heads * key_dim`` (separate projections; attention that downsamples)."""
    heads, values = m.num_heads, _rows(getattr(m, "proj", None), 1)
    if getattr(m, "qkv", None) is not None:
        return per_head_key_value(heads, values, qkv=_rows(m.qkv) or 0)
    if isinstance(getattr(m, "qkvs", None), nn.ModuleList) and len(m.qkvs):  # one projection per head
        return per_head_key_value(heads, values, qkv=heads * (_rows(m.qkvs[0]) or 0))
    return per_head_key_value(heads, values, q=_rows(getattr(m, "q", None)))


def _key_value_totals(m: nn.Module, key: int, val: int) -> dict[str, int]:
    """The all-heads widths such attention stores, for per-head sizes ``key`` and ``val``:
    ``key_attn_dim``, ``val_attn_dim`` / ``dh`` (values), and ``out_dim``: TinyViT's values width,
    or (EfficientFormerV2's downsampling attention) the output projection's width."""
    h = m.num_heads
    out = {a: h * (key if a == "key_attn_dim" else val)
           for a in ("key_attn_dim", "val_attn_dim", "dh") if hasattr(m, a)}
    if hasattr(m, "out_dim"):
        out["out_dim"] = h * val if hasattr(m, "val_dim") else _rows(m.proj, 0)
    return out


@module_check
def _check_key_value_attention(m: nn.Module) -> Iterator[str]:
    dims = _key_value_dims(m)
    held = (m.key_dim, getattr(m, _val_attr(m)))
    if dims is None:
        yield f"its tensors do not split into {m.num_heads} heads of keys, queries and values"
    elif dims != held:
        yield f"key_dim, {_val_attr(m)} = {held[0]}, {held[1]} but its tensors hold {dims[0]}, {dims[1]} per head"
    else:
        for attr, want in _key_value_totals(m, *dims).items():
            if getattr(m, attr) != want:
                yield f"{attr}={getattr(m, attr)} but its tensors give {want}"


@register_attribute_sync("timm.models.levit.Attention", "timm.models.levit.AttentionDownsample",
                         "timm.models.efficientformer.Attention", "timm.models.tiny_vit.Attention",
                         "timm.models.efficientvit_msra.CascadedGroupAttention",
                         "timm.models.efficientformer_v2.Attention2d",
                         "timm.models.efficientformer_v2.Attention2dDownsample", check=_check_key_value_attention)
def _sync_key_value_attention(m: nn.Module, path: str, ctx: SyncContext) -> None:
    """LeViT, EfficientFormer(V2), TinyViT and EfficientViT (MSRA) attention: per head, ``key_dim``
    query and key dims and ``val_dim`` (``d``) value dims (its forward splits or reshapes each head
    at them); heads keep their count, the softmax scale follows ``key_dim`` (unless kept, see
    :attr:`SyncContext.kept_scales`)."""
    heads = ctx.heads(path, m.num_heads)
    m.num_heads = heads
    dims = _key_value_dims(m)
    if dims is None:
        raise HeadsNotDivisibleError(f"{path_label(path)}: its q/k/v and output widths do not split into {heads} "
                                     f"heads (key_dim per head for queries and keys, val_dim for values)")
    key, val = dims
    ctx.rescale(m, path, m.key_dim, key)
    for attr, v in _key_value_totals(m, key, val).items():
        setattr(m, attr, v)
    m.key_dim = key
    setattr(m, _val_attr(m), val)
    if hasattr(m, "attn_ratio"):
        m.attn_ratio = val / key


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


@register_attribute_sync("timm.models.eva.Eva", check=_check_timm_vit)  # (EVA-02, ViTs with rotary embeddings)
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


# --------------------------------------------------------------------------- other timm models


def _is_timm_model(m: nn.Module) -> bool:
    """A timm model class of the 0.9+ convention (``timm.models`` package, int ``num_features``,
    ``get_classifier`` and ``forward_features``) that no handler of its own names."""
    nf = vars(m).get("num_features")
    return (type(m).__module__.startswith("timm.models.") and is_int(nf)
            and callable(getattr(m, "get_classifier", None)) and callable(getattr(m, "forward_features", None)))


# parameter hooks (old-style weight / spectral norm) compute weights during the trace; other module
# hooks (a user's recorder) must not see it
try:
    from torch.nn.utils.spectral_norm import SpectralNorm as _SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm as _WeightNorm

    _PARAM_HOOK_TYPES: tuple[type, ...] = (_WeightNorm, _SpectralNorm)
except ImportError:  # pragma: no cover - a torch without them
    _PARAM_HOOK_TYPES = ()
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


@contextlib.contextmanager
def _on_meta(model: nn.Module) -> Iterator[None]:
    """``model`` with every parameter and buffer swapped for a meta tensor of its shape and dtype
    (tying kept), in eval mode, without its modules' hooks (parameter hooks kept); everything,
    tensor attributes set by the forward included, is restored on exit."""
    saved: list[tuple[dict, str, Any]] = []
    memo: dict[int, torch.Tensor] = {}
    modules = list(model.modules())
    state = [(mod, mod.training, {k: v for k, v in vars(mod).items() if isinstance(v, torch.Tensor)},
              {k: mod.__dict__[k] for k in _HOOK_DICTS if k in mod.__dict__}) for mod in modules]
    try:
        for mod, _, _, hooks in state:
            mod.training = False
            for k, d in hooks.items():
                kept = type(d)((i, h) for i, h in d.items() if k == "_forward_pre_hooks"
                               and isinstance(h, _PARAM_HOOK_TYPES))
                object.__setattr__(mod, k, kept)
            for store in (mod._parameters, mod._buffers):
                for k, t in store.items():
                    if t is None:
                        continue
                    if not is_tensor(t):
                        raise TypeError("uninitialised (lazy) tensor")
                    if id(t) not in memo:
                        memo[id(t)] = torch.empty(t.shape, dtype=t.dtype, device="meta")
                    saved.append((store, k, t))
                    store[k] = memo[id(t)]
        yield
    finally:
        for store, k, t in saved:
            store[k] = t
        for mod, training, tensors, hooks in state:
            mod.training = training
            for k, d in hooks.items():
                object.__setattr__(mod, k, d)
            for k, v in list(vars(mod).items()):
                if isinstance(v, torch.Tensor) and k not in tensors and v.is_meta:
                    delattr(mod, k)
            for k, v in tensors.items():
                if mod.__dict__.get(k) is not v:
                    object.__setattr__(mod, k, v)


def _channels(t: Any, nhwc: bool) -> int | None:
    """Channel count of a feature tensor: dim 1 of an NCHW map, else the last dim (NHWC, NLC, NC)."""
    if not isinstance(t, torch.Tensor) or t.dim() < 2:
        return None
    return int(t.shape[1] if t.dim() == 4 and not nhwc else t.shape[-1])


def _input_sizes(m: nn.Module) -> Iterator[tuple[int, int]]:
    """(channels, size) of the square inputs to try on ``m``: its ``in_chans`` (else its first conv's
    input channels) at the size its ``pretrained_cfg`` declares (224 without one), then at its
    ``img_size`` or its first submodule's (a model built for other images)."""
    chans = vars(m).get("in_chans")
    if not is_int(chans) or chans <= 0:
        conv = next((c for c in m.modules() if isinstance(c, _ConvNd)), None)
        chans = conv.in_channels if conv is not None else None
    if chans is None:
        return
    cfg = getattr(m, "pretrained_cfg", None) or getattr(m, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    sizes = [int(size[-1]) if isinstance(size, (tuple, list)) and size else 224]
    # (the model's, else its patch embedding's, wherever that is: a Mixer's ``stem``)
    img = next((v for mod in m.modules() if (v := vars(mod).get("img_size")) is not None), None)
    img = img[-1] if isinstance(img, (tuple, list)) and img else img
    if is_int(img) and img > 0 and img not in sizes:
        sizes.append(img)
    for hw in sizes:
        yield chans, hw


def _trace_timm_model(m: nn.Module, errors: list[str] | None = None) -> dict[str, Any] | None:
    """Shapes of a timm model run on the meta device (no memory, no compute, nothing changed):
    ``{"num_features": channels of forward_features' output, "pre_logits": width of
    forward_head(..., pre_logits=True) or None, "feature_info": {module name: channels}}``, or
    None when the model does not run so (data-dependent code, an input size it refuses, a module
    whose stale attributes no longer fit its tensors, ...; why: appended to ``errors``)."""
    fmt = getattr(m, "output_fmt", "NCHW")
    nhwc = str(getattr(fmt, "value", fmt)).upper() == "NHWC"
    for chans, hw in _input_sizes(m):
        widths: dict[str, int] = {}
        handles = []
        try:
            dtype = model_dtype(m)
            with _on_meta(m), torch.no_grad():
                for entry in _feature_info(m):
                    name = str(entry["module"])
                    try:
                        sub = m.get_submodule(name)
                    except AttributeError:
                        continue
                    handles.append(sub.register_forward_hook(
                        lambda _mod, _inp, out, name=name: widths.__setitem__(name, c)
                        if (c := _channels(out, nhwc)) is not None else None))
                feats = m.forward_features(torch.empty(2, chans, hw, hw, dtype=dtype, device="meta"))
                nf = _channels(feats, nhwc)
                try:
                    pre = m.forward_head(feats, pre_logits=True)
                except Exception:  # noqa: BLE001 - no forward_head(pre_logits=): the classifier tells
                    pre = None
        except Exception as exc:  # noqa: BLE001 - any failure means: the shapes cannot be traced so
            if errors is not None:
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
            continue
        finally:
            for h in handles:
                h.remove()
        if nf is None:
            if errors is not None:
                errors.append(f"forward_features returned {type(feats).__name__}, not a feature map")
            return None
        pre_logits = int(pre.shape[-1]) if isinstance(pre, torch.Tensor) and pre.dim() == 2 else None
        return {"num_features": nf, "pre_logits": pre_logits, "feature_info": widths}
    return None


def _timm_head_hidden(m: nn.Module, trace: dict[str, Any] | None) -> tuple[int | None, str]:
    """``head_hidden_size`` of a timm model: the input width of its classifier, or (no Linear or
    conv classifier: ``num_classes=0``) the width of its pre-logits features."""
    try:
        width = _in_width(m.get_classifier())
    except Exception:  # noqa: BLE001 - a get_classifier that needs arguments: no classifier to read
        width = None
    if width is not None:
        return width, "classifier input width"
    return (trace or {}).get("pre_logits"), "pre-logits width"


def _changed_sizes(m: nn.Module, path: str, ctx: SyncContext) -> set[int]:
    """Old sizes of the tensors of ``m`` (at ``path``) whose shapes changed (empty: not known)."""
    out: set[int] = set()
    for name, t in m.state_dict(keep_vars=True).items():
        old = ctx.old_shape(path, name)
        if old is None or not is_tensor(t) or tuple(old) == tuple(t.shape):
            continue
        same_dims = len(old) == t.dim()
        out.update(int(o) for o, n in zip(old, t.shape if same_dims else [None] * len(old)) if o != n)
    return out


@module_check
def _check_timm_model(m: nn.Module) -> Iterator[str]:
    trace = _trace_timm_model(m)
    if trace is not None and m.num_features != trace["num_features"]:
        yield f"num_features={m.num_features} but forward_features outputs {trace['num_features']} channels"
    hh, what = _timm_head_hidden(m, trace)
    if hh is not None and is_int(vars(m).get("head_hidden_size")) and m.head_hidden_size != hh:
        yield f"head_hidden_size={m.head_hidden_size} but {what} is {hh}"
    # only what the run shows: a module it does not call, or one that outputs several maps (HRNet
    # stages), is not checked
    traced = (trace or {}).get("feature_info", {})
    for entry in _feature_info(m):
        w = traced.get(str(entry["module"]))
        if w is not None and w != entry["num_chs"]:
            yield f"feature_info[{entry['module']!r}].num_chs={entry['num_chs']} but module outputs {w}"


@register_attribute_sync_by(_is_timm_model, check=_check_timm_model, managed_attrs=("num_features", "head_hidden_size"))
def _sync_timm_model(m: nn.Module, path: str, ctx: SyncContext) -> None:
    """Any timm model of the 0.9+ convention without a handler of its own (EfficientNet,
    MobileNetV3/V4, RegNet, ByobNet, ...): ``num_features`` becomes the channels of
    ``forward_features``' output and ``head_hidden_size`` the input width of ``get_classifier()``
    (or the pre-logits width), both found by running the model on the meta device (shapes only),
    and ``feature_info[*]["num_chs"]`` the channels each listed module outputs there (an entry
    whose module that run does not call, or that outputs several maps, is left alone). A model that
    does not run so while its ``num_features`` or ``head_hidden_size`` held a width that changed is
    refused (:class:`UnknownModuleError`): its widths cannot be derived."""
    errors: list[str] = []
    trace = _trace_timm_model(m, errors)
    hh, _ = _timm_head_hidden(m, trace)
    unknown = [] if trace is not None else ["num_features"]
    if hh is None and is_int(vars(m).get("head_hidden_size")):
        unknown.append("head_hidden_size")
    stale = [k for k in unknown if getattr(m, k) in _changed_sizes(m, path, ctx)]
    if stale:
        why = f": {errors[-1]}" if errors else ""
        raise unknown_module(
            path, m, stale,
            f"{' and '.join(stale)} cannot be derived: the model does not run on the meta device at its new "
            f"widths{why} (a module whose attributes were not synced, or code that needs values). Register a handler "
            f"for the offending type with `@register_attribute_sync(...)` (from fusion.modules)")
    if trace is not None:
        m.num_features = trace["num_features"]
        for entry in _feature_info(m):
            w = trace["feature_info"].get(str(entry["module"]))
            if w is not None:
                entry["num_chs"] = w
    if hh is not None and "head_hidden_size" in vars(m):
        m.head_hidden_size = hh


# --------------------------------------------------------------------------- families whose blocks store widths


def _convs(m: nn.Module) -> list[_ConvNd]:
    return [c for c in m.modules() if isinstance(c, _ConvNd)]


def _conv_in(*mods: nn.Module | None) -> int | None:
    """Input channels of the first conv in ``mods`` (registration order), or None."""
    return next((int(c.weight.shape[1]) * c.groups for m in mods if m is not None for c in _convs(m)), None)


def _conv_out(m: nn.Module | None) -> int | None:
    """Output channels of the last conv in ``m`` (registration order), or None."""
    convs = _convs(m) if m is not None else []
    return int(convs[-1].weight.shape[0]) if convs else None


def _old_rows(ctx: SyncContext, path: str, sub: str, m: nn.Module) -> int | None:
    """Old output channels of the conv at ``sub`` below the module at ``path`` (its current ones when
    the old shapes are not known)."""
    old = ctx.old_shape(f"{path}.{sub}" if path else sub, "weight")
    if old is not None:
        return int(old[0])
    conv = m.get_submodule(sub)
    return int(conv.weight.shape[0])


def _timm_model_and(extra: Callable[[nn.Module, str, SyncContext], None]) -> Callable:
    """The handler of timm models by their attributes (:func:`_sync_timm_model`), then ``extra``
    for the model's own width attributes."""

    def sync(m: nn.Module, path: str, ctx: SyncContext) -> None:
        _sync_timm_model(m, path, ctx)
        extra(m, path, ctx)

    sync.__doc__ = extra.__doc__
    return sync


@module_check
def _check_cross_stage(m: nn.Module) -> Iterator[str]:
    exp = _conv_out(m.conv_exp)
    if exp is not None and m.expand_chs != exp:
        yield f"expand_chs={m.expand_chs} but conv_exp outputs {exp} channels"


@register_attribute_sync("timm.models.cspnet.CrossStage", "timm.models.cspnet.CrossStage3", check=_check_cross_stage)
def _sync_cross_stage(m: nn.Module, path: str, ctx: SyncContext) -> None:
    """CSPNet ``CrossStage`` / ``CrossStage3`` split ``conv_exp``'s output in two halves of
    ``expand_chs // 2`` channels (one read by the blocks, one concatenated to their output):
    ``expand_chs`` is ``conv_exp``'s output width, which must be twice the width the blocks read
    (both halves resized alike; halves of other widths cannot be expressed: refused)."""
    exp = _conv_out(m.conv_exp)
    if exp is None:
        return
    half = _conv_in(m.blocks, getattr(m, "conv_transition_b", None)) if len(m.blocks) or \
        getattr(m, "conv_transition_b", None) is not None else None
    if exp % 2 or (half is not None and exp != 2 * half):
        raise unknown_module(path, m, ["expand_chs"],
                      f"splits conv_exp's {exp} output channels into two equal halves (expand_chs // 2), but its "
                      f"blocks read {half}: the two halves were given different widths, which this split cannot "
                      f"express; give both spaces of the split the same width")
    m.expand_chs = exp


def _dla_channels(m: nn.Module, path: str, ctx: SyncContext) -> None:
    """``channels`` (each level's output width, as ``feature_info``); ``base_width`` and
    ``cardinality`` are the ratios of the Res2Net blocks' widths, no widths: kept."""
    widths = [e["num_chs"] for e in _feature_info(m)]
    if isinstance(m.channels, (tuple, list)) and len(widths) == len(m.channels):
        m.channels = type(m.channels)(widths)


@module_check
def _check_dla(m: nn.Module) -> Iterator[str]:
    yield from _check_timm_model.__wrapped__(m)  # its messages, without a second path prefix
    widths = [e["num_chs"] for e in _feature_info(m)]
    if isinstance(m.channels, (tuple, list)) and len(widths) == len(m.channels) and list(m.channels) != widths:
        yield f"channels={tuple(m.channels)} but the levels output {tuple(widths)}"


register_attribute_sync("timm.models.dla.DLA", check=_check_dla)(_timm_model_and(_dla_channels))


def _dla_root_dim(m: nn.Module) -> int | None:
    """The ``root_dim`` of a ``DlaTree`` from its tensors (and its last subtree's ``root_dim``)."""
    if getattr(m, "root", None) is not None:
        return _conv_in(m.root)
    if isinstance(getattr(m, "tree2", None), nn.Module) and is_int(getattr(m.tree2, "root_dim", None)):
        out = _conv_out(m.tree1)
        return m.tree2.root_dim - out if out is not None else None
    return None


register_derived_width("timm.models.dla.DlaTree", attr="root_dim", width=_dla_root_dim,
                       source="the root that aggregates this tree reads channels:",
                       doc="DLA ``DlaTree.root_dim`` (a constructor value, not read by the forward): the input width "
                           "of the root that aggregates this tree (its own root, or that of its last subtree less the "
                           "width this tree adds to it).")


@module_check
def _check_dla_bottle2neck(m: nn.Module) -> Iterator[str]:
    if m.convs[0].in_channels != m.width or m.conv1.out_channels != m.width * m.scale:
        yield (f"width={m.width}, scale={m.scale} but convs[0] reads {m.convs[0].in_channels} of "
               f"conv1's {m.conv1.out_channels} channels")


@register_attribute_sync("timm.models.dla.DlaBottle2neck", check=_check_dla_bottle2neck)
def _sync_dla_bottle2neck(m: nn.Module, path: str, ctx: SyncContext) -> None:
    """DLA's Res2Net block splits ``conv1``'s output into ``scale`` pieces of ``width`` channels:
    ``width`` is what its scale convs read, and the pieces must stay equal (refused otherwise)."""
    width, total = int(m.convs[0].in_channels), int(m.conv1.out_channels)
    if width * m.scale != total:
        raise unknown_module(path, m, ["width"], f"splits conv1's {total} output channels into {m.scale} pieces of "
                                          f"`width` channels, but its scale convs read {width}: the pieces were "
                                          f"given different widths, which this split cannot express")
    m.width = width


def _ghost_widths(m: nn.Module) -> tuple[int, int]:
    """(primary, primary + cheap) channels of a ``GhostModule`` (V2): what it concatenates before
    keeping the first ``out_chs``."""
    primary = _conv_out(m.primary_conv)
    return primary, primary + _conv_out(m.cheap_operation)


def _ghost_out_fits(out_chs: int, primary: int, total: int) -> bool:
    """Whether a ghost module of ``primary`` primary and ``total`` channels can have been built for
    ``out_chs`` (timm builds ``ceil(out_chs / ratio)`` primary channels, ``ratio`` channels each, and
    keeps the first ``out_chs``)."""
    ratio = total // primary if primary and total % primary == 0 else 1
    return total - ratio < out_chs <= total


def _ghost_out_chs_messages(m: nn.Module, primary: int, total: int, short: int | None) -> Iterator[str]:
    """What is stale in a ghost module's ``out_chs``: the width of its gate (``short_conv``, which
    multiplies ``out_chs`` channels) when it has one, else the channels it computes."""
    if short is not None and m.out_chs != short:
        yield f"out_chs={m.out_chs} but short_conv outputs {short} channels"
    elif short is None and not _ghost_out_fits(m.out_chs, primary, total):
        yield f"out_chs={m.out_chs} but the module computes {total} channels ({primary} primary)"


def _sync_ghost_out_chs(m: nn.Module, path: str, primary: int, total: int, short: int | None) -> None:
    """A ghost module's ``out_chs`` from its gate's width (a gate wider than its channels refused),
    else, when the old value no longer fits its channels, all of them."""
    if short is not None:
        if short > total:
            raise unknown_module(path, m, ["out_chs"], f"gates {short} channels (short_conv) but computes only {total}")
        m.out_chs = short
    elif not _ghost_out_fits(m.out_chs, primary, total):
        m.out_chs = total


@module_check
def _check_ghost_module(m: nn.Module) -> Iterator[str]:
    primary, total = _ghost_widths(m)
    yield from _ghost_out_chs_messages(m, primary, total, _conv_out(getattr(m, "short_conv", None)))


@register_attribute_sync("timm.models.ghostnet.GhostModule", "timm.models.ghostnet.GhostModuleV2",
                         check=_check_ghost_module)
def _sync_ghost_module(m: nn.Module, path: str, ctx: SyncContext) -> None:
    """GhostNet's ``GhostModule`` (V2) keeps the first ``out_chs`` of its primary and cheap
    channels. V2 multiplies them by a gate of ``out_chs`` channels (``short_conv``'s width). V1:
    when it kept all of them it keeps all of the new ones; a module that dropped some (an odd
    ``out_chs``) is refused when its widths change (how many to keep is not in its tensors);
    without the old shapes, an ``out_chs`` that its tensors cannot have been built with becomes
    all of them (the layout a width change keeps)."""
    primary, total = _ghost_widths(m)
    short = _conv_out(getattr(m, "short_conv", None))
    if short is not None or ctx.old_shapes is None:
        _sync_ghost_out_chs(m, path, primary, total, short)
        return
    old = _old_rows(ctx, path, "primary_conv.0", m) + _old_rows(ctx, path, "cheap_operation.0", m)
    if m.out_chs >= old:
        m.out_chs = total
    elif total != old:
        raise unknown_module(path, m, ["out_chs"], f"keeps the first out_chs={m.out_chs} of its {old} channels; how many "
                                            f"of its {total} new channels to keep cannot be derived")


def _ghostnet_pool_dim(m: nn.Module, path: str, ctx: SyncContext) -> None:
    """GhostNet's ``pool_dim``: the width of its last stage (``num_features``)."""
    m.pool_dim = m.num_features


@module_check
def _check_ghostnet(m: nn.Module) -> Iterator[str]:
    yield from _check_timm_model.__wrapped__(m)  # its messages, without a second path prefix
    width = _conv_out(getattr(m, "blocks", None))
    if width is not None and m.pool_dim != width:
        yield f"pool_dim={m.pool_dim} but the last stage outputs {width} channels"


register_attribute_sync("timm.models.ghostnet.GhostNet", check=_check_ghostnet)(_timm_model_and(_ghostnet_pool_dim))


def _first_conv(m: nn.Module, *names: str) -> _ConvNd | None:
    """The first conv under the first of ``m``'s children ``names`` that holds one (reparameterisable
    blocks hold their convs in branches, and after ``reparameterize()`` in other children)."""
    return next((c for n in names if isinstance(child := getattr(m, n, None), nn.Module) for c in _convs(child)),
                None)


def _ghost_v3_widths(m: nn.Module) -> tuple[int, int, int] | None:
    """(primary channels, primary + cheap channels, groups of the cheap conv) of a ``GhostModuleV3``,
    from its branches (or, reparameterised, from the convs that replaced them); None without them."""
    primary = _first_conv(m, "primary_rpr_conv", "primary_conv")
    cheap = _first_conv(m, "cheap_rpr_conv", "cheap_operation")
    if primary is None or cheap is None:
        return None
    p = int(primary.weight.shape[0])
    return p, p + int(cheap.weight.shape[0]), int(cheap.groups)


def _stale_id_tensor(m: nn.Module) -> tuple[int, ...] | None:
    """Shape of the identity kernel that ``m`` (a GhostNetV3 block) cached in ``id_tensor`` when it
    no longer fits ``in_channels``/``groups``/``kernel_size`` (``None``: none cached, or it fits)."""
    t = vars(m).get("id_tensor")
    if not is_tensor(t):
        return None
    groups = vars(m).get("groups", None)
    want = (m.in_channels, m.in_channels // groups if is_int(groups) and groups else None)
    have = tuple(int(d) for d in t.shape)
    return have if have[0] != want[0] or (want[1] is not None and have[1] != want[1]) else None


@module_check
def _check_ghost_module_v3(m: nn.Module) -> Iterator[str]:
    widths = _ghost_v3_widths(m)
    if widths is not None:
        primary, total, groups = widths
        if m.in_channels != primary:
            yield f"in_channels={m.in_channels} but its primary branch outputs {primary} channels"
        if m.groups != groups:
            yield f"groups={m.groups} but its cheap conv has groups={groups}"
        yield from _ghost_out_chs_messages(m, primary, total,
                                           _conv_out(m.short_conv) if m.mode == "shortcut" else None)
    if (stale := _stale_id_tensor(m)) is not None:
        yield f"id_tensor {stale} (cached identity kernel) does not fit in_channels={m.in_channels}"


@register_attribute_sync("timm.models.ghostnet.GhostModuleV3", check=_check_ghost_module_v3)
def _sync_ghost_module_v3(m: nn.Module, path: str, ctx: SyncContext) -> None:
    """GhostNetV3's ``GhostModuleV3``: ``in_channels`` and ``groups`` (read by ``reparameterize()``
    for the identity kernel of its cheap branch's BatchNorm skip) are the width of its primary
    branch and the groups of its cheap conv; ``out_chs`` is the width of the gate (``short_conv``)
    in ``shortcut`` mode, which keeps the first ``out_chs`` of its channels (a gate wider than
    them is refused), else (all its channels are returned: ``out_chs`` is read by nothing) the
    channels it computes when the old value no longer fits them. A cached identity kernel
    (``id_tensor``) that no longer fits is dropped (``reparameterize()`` rebuilds it)."""
    widths = _ghost_v3_widths(m)
    if widths is not None:
        primary, total, groups = widths
        m.in_channels, m.groups = primary, groups
        _sync_ghost_out_chs(m, path, primary, total, _conv_out(m.short_conv) if m.mode == "shortcut" else None)
    if _stale_id_tensor(m) is not None:
        del m.id_tensor


@module_check
def _check_ghost_bottleneck_v3(m: nn.Module) -> Iterator[str]:
    conv = _first_conv(m, "dw_rpr_conv", "conv_dw")
    if "in_channels" in vars(m) and conv is not None and m.in_channels != int(conv.weight.shape[0]):
        yield f"in_channels={m.in_channels} but its depthwise conv outputs {int(conv.weight.shape[0])} channels"
    if "in_channels" in vars(m) and (stale := _stale_id_tensor(m)) is not None:
        yield f"id_tensor {stale} (cached identity kernel) does not fit in_channels={m.in_channels}"


@register_attribute_sync("timm.models.ghostnet.GhostBottleneckV3", check=_check_ghost_bottleneck_v3)
def _sync_ghost_bottleneck_v3(m: nn.Module, path: str, ctx: SyncContext) -> None:
    """GhostNetV3's ``GhostBottleneckV3`` with a stride stores ``in_channels`` (read by
    ``reparameterize()``): the width of its depthwise conv (its branches, or the conv that replaced
    them); a cached identity kernel that no longer fits is dropped."""
    conv = _first_conv(m, "dw_rpr_conv", "conv_dw")
    if "in_channels" in vars(m) and conv is not None:
        m.in_channels = int(conv.weight.shape[0])
        if _stale_id_tensor(m) is not None:
            del m.id_tensor


@module_check
def _check_in_out_channels(m: nn.Module) -> Iterator[str]:
    first, last = _in_out_convs(m)
    if first is not None and m.in_channels != first:
        yield f"in_channels={m.in_channels} but its first conv reads {first}"
    if last is not None and m.out_channels != last:
        yield f"out_channels={m.out_channels} but its last conv outputs {last}"


def _in_out_convs(m: nn.Module) -> tuple[int | None, int | None]:
    if hasattr(m, "conv_pwl"):  # ReXNet: conv_exp (optional), conv_dw, se, conv_pwl
        return _conv_in(getattr(m, "conv_exp", None), m.conv_dw), _conv_out(m.conv_pwl)
    return _conv_in(m.stack), _conv_out(m.stack)  # (Pre)XceptionModule: the stack of separable convs


@register_attribute_sync("timm.models.rexnet.LinearBottleneck", "timm.models.xception_aligned.XceptionModule",
                         "timm.models.xception_aligned.PreXceptionModule", check=_check_in_out_channels)
def _sync_in_out_channels(m: nn.Module, path: str, ctx: SyncContext) -> None:
    """ReXNet ``LinearBottleneck`` (whose residual adds its input to the first ``in_channels`` of
    its output) and Xception ``XceptionModule`` / ``PreXceptionModule`` (pre-activation):
    ``in_channels`` and ``out_channels`` are the widths its convs read and write."""
    first, last = _in_out_convs(m)
    if first is not None:
        m.in_channels = first
    if last is not None:
        m.out_channels = last


def _tresnet_planes(m: nn.Module, path: str, ctx: SyncContext) -> None:
    """TResNet's ``planes`` (the stem conv's width; also ``feature_info``'s entry for the root, which
    a run of ``forward_features`` does not show) and ``inplanes`` (what ``_make_layer`` left: the
    last stage's width, ``num_features``)."""
    planes = _conv_out(getattr(getattr(m, "body", None), "conv1", None))
    if planes is not None:
        m.planes = planes
        for entry in _feature_info(m):
            if entry["module"] == "":
                entry["num_chs"] = planes
    m.inplanes = m.num_features


@module_check
def _check_tresnet(m: nn.Module) -> Iterator[str]:
    yield from _check_timm_model.__wrapped__(m)
    planes = _conv_out(getattr(getattr(m, "body", None), "conv1", None))
    if planes is not None and m.planes != planes:
        yield f"planes={m.planes} but the stem conv outputs {planes} channels"
    for entry in _feature_info(m):
        if planes is not None and entry["module"] == "" and entry["num_chs"] != planes:
            yield f"feature_info[''].num_chs={entry['num_chs']} but the stem conv outputs {planes} channels"
    if m.inplanes != m.num_features:  # (num_features is checked against a run above)
        yield f"inplanes={m.inplanes} but num_features={m.num_features} (the last stage's width)"


register_attribute_sync("timm.models.tresnet.TResNet", check=_check_tresnet)(_timm_model_and(_tresnet_planes))


# reparameterisable blocks: (input width, output width, branches holding their conv, first present
# wins): ``in/out`` and ``groups`` are what ``reparameterize()`` builds its single conv with
_REPARAM_BLOCKS = {
    "timm.models.fastvit.MobileOneBlock": ("in_chs", "out_chs", ("reparam_conv", "conv_kxk", "conv_scale", "identity")),
    "timm.models.fastvit.ReparamLargeKernelConv": ("in_chs", "out_chs", ("reparam_conv", "large_conv", "small_conv")),
    "timm.models.fastvit.RepMixer": ("dim", None, ("reparam_conv", "mixer", "norm")),
    "timm.models.fastvit.RepConditionalPosEnc": ("dim", "dim_out", ("reparam_conv", "pos_enc")),
}


def _reparam_widths(m: nn.Module) -> dict[str, int] | None:
    """The width attributes of a reparameterisable block from the branch that holds its conv (or,
    with no conv branch, its identity BatchNorm: a depthwise or ungrouped block stays so)."""
    in_attr, out_attr, branches = _REPARAM_BLOCKS[qualname(type(m))]
    for name in branches:
        branch = getattr(m, name, None)
        if not isinstance(branch, nn.Module):
            continue
        convs = _convs(branch)
        if convs:
            conv = convs[0]
            widths = {in_attr: int(conv.in_channels), out_attr: int(conv.out_channels), "groups": int(conv.groups)}
        else:
            width = out_width(branch)
            if width is None:
                continue
            widths = {in_attr: width, out_attr: width}
            groups = vars(m).get("groups")
            if is_int(groups):  # depthwise (groups equal to its old or new width) or ungrouped
                if groups != 1 and groups not in (vars(m).get(in_attr), width):
                    return None
                widths["groups"] = 1 if groups == 1 else width
        return {k: v for k, v in widths.items() if k is not None and is_int(vars(m).get(k))}
    return {}


@module_check
def _check_reparam_block(m: nn.Module) -> Iterator[str]:
    widths = _reparam_widths(m)
    if widths is None:
        in_attr = _REPARAM_BLOCKS[qualname(type(m))][0]
        yield f"groups={m.groups} of a block with no conv branch is neither 1 nor {in_attr}={getattr(m, in_attr)}"
    for k, v in (widths or {}).items():
        if getattr(m, k) != v:
            yield f"{k}={getattr(m, k)} but its branches give {v}"


@register_attribute_sync(*_REPARAM_BLOCKS, check=_check_reparam_block)
def _sync_reparam_block(m: nn.Module, path: str, ctx: SyncContext) -> None:
    """FastViT's reparameterisable blocks (``MobileOneBlock``, ``ReparamLargeKernelConv``,
    ``RepMixer``, ``RepConditionalPosEnc``): their widths and ``groups`` (read by
    ``reparameterize()``, not by the forward) are those of the conv of their branches."""
    widths = _reparam_widths(m)
    if widths is None:
        raise unknown_module(path, m, ["groups"], f"groups={m.groups} of a block with no conv branch is neither 1 nor its "
                                           f"width: its new groups cannot be derived")
    for k, v in widths.items():
        setattr(m, k, v)


register_attribute_sync("timm.models.fastvit.Attention", check=_check_timm_attention)(_sync_timm_attention)


def _linear_self_attention_widths(m: nn.Module) -> tuple[int, int]:
    """(channels of ``qkv_proj``'s output, input channels of ``out_proj``) of a MobileViTv2
    ``LinearSelfAttention``, from their weights."""
    out = m.out_proj
    return int(m.qkv_proj.weight.shape[0]), int(out.weight.shape[1]) * int(out.groups)


@module_check
def _check_linear_self_attention(m: nn.Module) -> Iterator[str]:
    qkv, kv = _linear_self_attention_widths(m)
    if qkv != 1 + 2 * m.embed_dim:
        yield f"embed_dim={m.embed_dim} but qkv_proj outputs {qkv} channels (1 + 2*embed_dim: query, key, value)"
    if kv != m.embed_dim:
        yield f"embed_dim={m.embed_dim} but out_proj reads {kv} channels"


@register_attribute_sync("timm.models.mobilevit.LinearSelfAttention", check=_check_linear_self_attention)
def _sync_linear_self_attention(m: nn.Module, path: str, ctx: SyncContext) -> None:
    """MobileViTv2's ``LinearSelfAttention`` splits ``qkv_proj``'s output into a 1-channel query and
    a key and a value of ``embed_dim`` channels (key and value multiply channel by channel, and
    ``out_proj`` reads the value's channels): ``embed_dim`` is ``out_proj``'s input width; a split
    of other widths (a resized query, key and value of different widths) cannot be expressed:
    refused."""
    qkv, kv = _linear_self_attention_widths(m)
    if qkv != 1 + 2 * kv:
        raise unknown_module(path, m, ["embed_dim"],
                      f"splits qkv_proj's {qkv} output channels into a 1-channel query and a key and a value of "
                      f"embed_dim channels each, but out_proj reads {kv}: the split was given other widths, which "
                      f"it cannot express; give the key/value space one width and keep the query's single channel")
    m.embed_dim = kv


@module_check
def _check_blur_pool(m: nn.Module) -> Iterator[str]:
    filt = getattr(m, "filt", None)
    if m.channels is not None and is_tensor(filt) and m.channels != filt.shape[0]:
        yield f"channels={m.channels} but filt holds {int(filt.shape[0])} filters"


@register_attribute_sync("timm.layers.blur_pool.BlurPool2d", check=_check_blur_pool)
def _sync_blur_pool(m: nn.Module, path: str, ctx: SyncContext) -> None:
    """timm ``BlurPool2d`` with ``channels`` runs a depthwise blur of ``filt`` (one filter per channel)."""
    if m.channels is not None and is_tensor(getattr(m, "filt", None)):
        m.channels = int(m.filt.shape[0])


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
    # MobileViT blocks store their patch size only (their widths are their tensors'); MobileViT
    # (v1) attention is timm's Attention
    "models.mobilevit": ("MobileVitBlock", "MobileVitV2Block", "LinearTransformerBlock"),
}.items() for name in names))
