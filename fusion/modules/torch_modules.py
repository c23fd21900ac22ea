"""Attribute handlers for torch.nn modules (subclasses included), registered on import.

* Linear, Bilinear, Embedding, EmbeddingBag, PReLU: sizes from ``weight``.
* Conv1d/2d/3d and ConvTranspose1d/2d/3d: depthwise convs keep ``groups == in_channels``; other
  grouped convs keep ``groups`` and are validated.
* BatchNorm*/SyncBatchNorm/InstanceNorm* (``_NormBase``), LayerNorm, RMSNorm, GroupNorm
  (``num_groups`` kept, validated); torchvision's FrozenBatchNorm2d stores no width.
* MultiheadAttention (heads from ``num_heads=``, ``head_dim`` derived).
"""

from __future__ import annotations

from typing import Iterator

from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from .core import (
    AttributeSyncError, GroupsNotDivisibleError, SyncContext, is_tensor, module_check, path_label,
    register_attribute_sync, register_width_free,
)

__all__: list[str] = []  # nothing to import: the handlers are registered on import


def _first_tensor(m: nn.Module, names: tuple[str, ...], min_dim: int = 0):
    """The first of the tensors ``names`` of ``m`` that exists and has at least ``min_dim`` dims."""
    return next((t for t in (getattr(m, n, None) for n in names) if is_tensor(t) and t.dim() >= min_dim), None)


def _mismatches(m: nn.Module, names: tuple[str, ...], expected: tuple, stored: str, min_dim: int = 0) -> Iterator[str]:
    """A message for each tensor of ``names`` (with at least ``min_dim`` dims) whose shape is not ``expected``."""
    for name in names:
        t = getattr(m, name, None)
        if is_tensor(t) and t.dim() >= min_dim and tuple(t.shape) != expected:
            yield f"{name} {tuple(t.shape)} but {stored}"


def _weight_dims(attrs: tuple[str, ...], label: str, bias_attr: str | None = None):
    """``(sync, check)`` for modules whose int attributes ``attrs`` are the dims of ``weight`` (and
    whose bias, with ``bias_attr``, has ``getattr(module, bias_attr)`` elements)."""

    def sync(m: nn.Module, path: str, ctx: SyncContext) -> None:
        if is_tensor(m.weight):
            for attr, size in zip(attrs, m.weight.shape):
                setattr(m, attr, int(size))

    @module_check
    def check(m: nn.Module) -> Iterator[str]:
        if not is_tensor(m.weight):
            return
        stored = tuple(getattr(m, a) for a in attrs)
        if tuple(m.weight.shape) != stored:
            yield f"weight {tuple(m.weight.shape)} but {label}={stored}"
        if bias_attr is not None:
            width = getattr(m, bias_attr)
            yield from _mismatches(m, ("bias",), (width,), f"{bias_attr}={width}")

    return sync, check


_LINEAR = ("out_features", "in_features")
_sync_linear, _check_linear = _weight_dims(_LINEAR, "(out_features, in_features)", "out_features")
register_attribute_sync(nn.Linear, check=_check_linear, managed_attrs=_LINEAR)(_sync_linear)

_BILINEAR = ("out_features", "in1_features", "in2_features")
_sync_bilinear, _check_bilinear = _weight_dims(_BILINEAR, "(out, in1, in2)")
register_attribute_sync(nn.Bilinear, check=_check_bilinear, managed_attrs=_BILINEAR)(_sync_bilinear)

_EMBEDDING = ("num_embeddings", "embedding_dim")
_sync_embedding_dims, _check_embedding = _weight_dims(_EMBEDDING, "(num_embeddings, embedding_dim)")


@register_attribute_sync(nn.Embedding, nn.EmbeddingBag, check=_check_embedding,
                         managed_attrs={*_EMBEDDING, "padding_idx"})
def _sync_embedding(m: nn.Embedding, path: str, ctx: SyncContext) -> None:
    _sync_embedding_dims(m, path, ctx)
    if m.padding_idx is not None and not (0 <= m.padding_idx < m.num_embeddings):
        raise ValueError(
            f"{path_label(path)}: padding_idx={m.padding_idx} out of range for num_embeddings={m.num_embeddings}")


@module_check
def _check_prelu(m: nn.PReLU) -> Iterator[str]:
    if m.weight.numel() != m.num_parameters:
        yield f"weight has {m.weight.numel()} elements but num_parameters={m.num_parameters}"


@register_attribute_sync(nn.PReLU, check=_check_prelu, managed_attrs={"num_parameters"})
def _sync_prelu(m: nn.PReLU, path: str, ctx: SyncContext) -> None:
    m.num_parameters = int(m.weight.numel())


@module_check
def _check_conv(m: _ConvNd) -> Iterator[str]:
    w = m.weight
    if not is_tensor(w):
        return
    if m.in_channels % m.groups or m.out_channels % m.groups:
        yield f"in_channels={m.in_channels}/out_channels={m.out_channels} not divisible by groups={m.groups}"
        return
    transposed = isinstance(m, _ConvTransposeNd) or getattr(m, "transposed", False)
    # weight: (out, in / groups, *k), or (in, out / groups, *k) when transposed
    first, grouped = (m.in_channels, m.out_channels) if transposed else (m.out_channels, m.in_channels)
    if tuple(w.shape[:2]) != (first, grouped // m.groups):
        yield (f"weight {tuple(w.shape)} but in_channels={m.in_channels}, out_channels={m.out_channels}, "
               f"groups={m.groups}")
    yield from _mismatches(m, ("bias",), (m.out_channels,), f"out_channels={m.out_channels}")


@register_attribute_sync(_ConvNd, check=_check_conv, managed_attrs={"in_channels", "out_channels", "groups"})
def _sync_conv(m: _ConvNd, path: str, ctx: SyncContext) -> None:
    w = m.weight
    if not is_tensor(w):
        return
    p = path_label(path)
    transposed = isinstance(m, _ConvTransposeNd) or getattr(m, "transposed", False)
    old_in, old_out, groups = m.in_channels, m.out_channels, m.groups
    depthwise = groups > 1 and groups == old_in
    if not transposed:
        new_out = int(w.shape[0])
        if depthwise:
            if w.shape[1] != 1:
                raise GroupsNotDivisibleError(f"{p}: depthwise conv (groups == in_channels == {old_in}) got weight "
                                              f"{tuple(w.shape)}; expected shape[1] == 1")
            mult = old_out // groups
            if mult <= 0 or new_out % mult:
                raise GroupsNotDivisibleError(
                    f"{p}: depthwise conv with channel multiplier {mult} cannot have out_channels={new_out}")
            new_groups = new_in = new_out // mult
        else:
            new_groups = groups
            new_in = int(w.shape[1]) * groups
        if new_out % new_groups:
            raise GroupsNotDivisibleError(f"{p}: out_channels={new_out} is not divisible by groups={new_groups}")
    else:  # weight: (in, out / groups, *k)
        new_in = int(w.shape[0])
        new_groups = new_in if depthwise else groups
        new_out = int(w.shape[1]) * new_groups
        if new_in % new_groups:
            raise GroupsNotDivisibleError(f"{p}: in_channels={new_in} is not divisible by groups={new_groups}")
    m.in_channels, m.out_channels, m.groups = new_in, new_out, new_groups


_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")


@module_check
def _check_norm_base(m: _NormBase) -> Iterator[str]:
    return _mismatches(m, _NORM_TENSORS, (m.num_features,), f"num_features={m.num_features}", min_dim=1)


@register_attribute_sync(_NormBase, check=_check_norm_base, managed_attrs={"num_features"})
def _sync_norm_base(m: _NormBase, path: str, ctx: SyncContext) -> None:
    t = _first_tensor(m, _NORM_TENSORS, min_dim=1)
    if t is not None:
        m.num_features = int(t.shape[0])


@module_check
def _check_normalized_shape(m: nn.Module) -> Iterator[str]:
    shape = tuple(m.normalized_shape)
    return _mismatches(m, ("weight", "bias"), shape, f"normalized_shape={shape}")


# timm's RmsNorm*/SimpleNorm* share this handler (see timm_modules)
@register_attribute_sync(nn.LayerNorm, *([nn.RMSNorm] if hasattr(nn, "RMSNorm") else []),
                         check=_check_normalized_shape, managed_attrs=set())
def _sync_normalized_shape(m: nn.Module, path: str, ctx: SyncContext) -> None:
    t = _first_tensor(m, ("weight", "bias"))
    if t is not None:  # without affine tensors the width cannot be derived from this module alone
        m.normalized_shape = tuple(int(s) for s in t.shape)


@module_check
def _check_group_norm(m: nn.GroupNorm) -> Iterator[str]:
    if m.num_channels % m.num_groups:
        yield f"num_channels={m.num_channels} not divisible by num_groups={m.num_groups}"
    yield from _mismatches(m, ("weight", "bias"), (m.num_channels,), f"num_channels={m.num_channels}")


@register_attribute_sync(nn.GroupNorm, check=_check_group_norm, managed_attrs={"num_groups", "num_channels"})
def _sync_group_norm(m: nn.GroupNorm, path: str, ctx: SyncContext) -> None:
    t = _first_tensor(m, ("weight", "bias"))
    if t is None:
        return
    c = int(t.shape[0])
    if c % m.num_groups:
        raise GroupsNotDivisibleError(
            f"{path_label(path)}: num_channels={c} is not divisible by num_groups={m.num_groups}")
    m.num_channels = c


register_width_free("torchvision.ops.misc.FrozenBatchNorm2d")


def _mha_dims(m: nn.MultiheadAttention) -> tuple[int, int, int, int]:
    """(embed_dim, projected q width, kdim, vdim) from the tensors."""
    if m.in_proj_weight is not None:
        e = int(m.in_proj_weight.shape[1])
        return e, int(m.in_proj_weight.shape[0]) // 3, e, e
    e = int(m.q_proj_weight.shape[1])
    return e, int(m.q_proj_weight.shape[0]), int(m.k_proj_weight.shape[1]), int(m.v_proj_weight.shape[1])


@module_check
def _check_mha(m: nn.MultiheadAttention) -> Iterator[str]:
    e, q_width, kdim, vdim = _mha_dims(m)
    if (m.embed_dim, m.kdim, m.vdim) != (e, kdim, vdim) or q_width != e:
        yield (f"embed_dim/kdim/vdim=({m.embed_dim}, {m.kdim}, {m.vdim}) but projections imply ({e}, {kdim}, {vdim}), "
               f"q width {q_width}")
    if m.num_heads * m.head_dim != m.embed_dim:
        yield f"num_heads*head_dim={m.num_heads * m.head_dim} but embed_dim={m.embed_dim}"


@register_attribute_sync(nn.MultiheadAttention, check=_check_mha,
                         managed_attrs={"embed_dim", "kdim", "vdim", "num_heads", "head_dim"})
def _sync_mha(m: nn.MultiheadAttention, path: str, ctx: SyncContext) -> None:
    e, q_width, kdim, vdim = _mha_dims(m)
    if q_width != e:
        raise AttributeSyncError(
            f"{path_label(path)}: nn.MultiheadAttention needs the projected q/k/v width ({q_width}) to equal "
            f"embed_dim ({e}), the width of its query input; resize the spaces of its q/k/v projection rows "
            f"({path + '.' if path else ''}in_proj_weight or q/k/v_proj_weight: see graph.spaces) with that input: "
            f"give them the input's width, e.g. width={{'*': 0.5, '<space name>': 1.0}} when the input keeps its "
            f"width")
    ctx.set_heads(m, path, e, scale=None, what="embed_dim")
    m.embed_dim, m.kdim, m.vdim = e, kdim, vdim


_RNN_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


@module_check
def _check_rnn(m: nn.RNNBase) -> Iterator[str]:
    gates, h = _RNN_GATES.get(m.mode, 1), m.hidden_size
    directions = 2 if m.bidirectional else 1
    for layer in range(m.num_layers):
        width = m.input_size if layer == 0 else directions * h
        for suffix in ("", "_reverse")[:directions]:
            for name, shape in ((f"weight_ih_l{layer}{suffix}", (gates * h, width)),
                                (f"weight_hh_l{layer}{suffix}", (gates * h, h))):
                w = getattr(m, name, None)
                if is_tensor(w) and tuple(w.shape) != shape:
                    yield f"{name} {tuple(w.shape)} but input_size={m.input_size}, hidden_size={h} imply {shape}"


@register_attribute_sync(nn.RNNBase, check=_check_rnn, managed_attrs={"hidden_size", "input_size"})
def _sync_rnn(m: nn.RNNBase, path: str, ctx: SyncContext) -> None:
    if m.proj_size:
        raise AttributeSyncError(f"{path_label(path)}: recurrent layers with projections (proj_size) cannot change width")
    m.hidden_size = int(m.weight_hh_l0.shape[1])
    m.input_size = int(m.weight_ih_l0.shape[1])
    m._init_flat_weights()  # the flat weight list the forward reads must hold the new tensors
