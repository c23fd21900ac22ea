"""Refinement: the stage between applying maps and norm repair (a registry, like methods).

A refinement improves the fused weights on calibration data. It receives the same
:class:`~fusion.repair.RepairContext` as a repair (the fused model, the sources, their graphs, the
maps, the weights and the data) and changes ``ctx.fused`` in place.

* ``"none"``.
* ``"lstsq"`` (the least-squares half of PLeaS, Nasery et al., solved in closed form): every layer
  with weights (``Linear``, ``Conv2d`` including grouped and depthwise ones, and with
  ``norms=True`` the affine of LayerNorm/GroupNorm layers), in execution order, is refitted so that
  its outputs on the fused model's own inputs reproduce the merged outputs of the source layers,
  ``Y = sum_i M_i (W_i x_i)`` (``M_i``: the merge maps of the layer's output space; the
  interpolation weights for fixed outputs such as logits). The Gram sums stream over the data
  (:mod:`fusion.lstsq`) and the solve is a ridge toward the mapped weights. With
  ``inputs="merged"`` the inputs are the merged source inputs instead (as in the PLeaS paper's code),
  which needs no pass of the fused model. A convolution followed by a BatchNorm is fitted to the
  sources' post-BN outputs with the norm folded in (``batchnorm="fold"``), after which the norm's
  running statistics are the refitted conv's measured statistics (population variances) and its
  affine undoes them, so the pair computes the fitted ``z + b``. Fitted on the fused model's own
  inputs (the default), those are the fused model's statistics, and a later BatchNorm reset (the
  default repair) leaves these norms as they are (``RepairContext.frozen``): re-estimating them the
  way torch does, averaging each batch's unbiased variance, would break that pair by about
  1/(positions per batch) (a model fused with its permuted copy moved by up to 6% where feature
  maps are 1x1). With ``inputs="merged"`` the reset does re-estimate them, re-standardising the
  fused model's own outputs to the merged statistics. Or (``batchnorm="stats"``) it is fitted to
  the pre-BN outputs with the norm's statistics set from the Gram, estimates that a later reset
  re-estimates. Passes never recompute a finished part of the model
  (:mod:`fusion.replay`), so refining every layer costs about one forward pass of each model plus
  the Grams and solves.

  Subclasses with a ``forward`` of their own are checked on one call before anything is fitted
  (:func:`_rule`): a convolution that pads its input itself (timm ``Conv2dSame``, TensorFlow "same"
  padding) is fitted on patches padded the same way; a BatchNorm that applies an activation or a
  drop after normalising (timm ``BatchNormAct2d``) has only its normalisation folded, the targets
  taken before the activation; a LayerNorm over the channels of NCHW maps (timm ``LayerNorm2d``) is
  fitted per channel. A layer that no rule reproduces (timm ``StdConv2d``, ``LayerNormAct2d``) keeps
  its mapped weights, and a BatchNorm none reproduces is not folded; both are listed in the fusion
  report. Layers fitted on fewer calibration rows than inputs are listed there too.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from alignment.errors import CalibrationError, InvalidOptionError, UnknownNameError
from alignment.maps import axis_matrix
from alignment.permute import weight_norm_dim, weight_norm_tensors
from alignment.registry import Registry
from alignment.runner import batches, model_device, modes, plain_precision, runnable

from .engine import head_tensors, set_weight
from .lstsq import LayerGram, RidgeSolution, output_moments, ridge_solve
from .replay import Replay, record
from .repair import RepairContext

__all__ = ["REFINEMENTS", "UnknownRefinementError", "register_refinement", "run_refinement", "refine_lstsq"]


class UnknownRefinementError(UnknownNameError, ValueError):
    """No refinement is registered under the given name."""


REFINEMENTS = Registry("refinement", UnknownRefinementError)


def register_refinement(name: str, check: Callable[[dict[str, Any]], None] | None = None) -> Callable:
    """Register a refinement ``fn(ctx: RepairContext, *, options...)`` (modifies ``ctx.fused``);
    ``check(options)`` validates option values before any work."""
    return REFINEMENTS.register(name, check)


@plain_precision
def run_refinement(name: str, ctx: RepairContext, **options: Any) -> nn.Module:
    """The refine stage: run refinement ``name`` with checked options; returns ``ctx.fused``."""
    REFINEMENTS.call(name, ctx, options)
    return ctx.fused


@register_refinement("none")
def _none(ctx: RepairContext) -> None:
    """No refinement."""


_BN = nn.modules.batchnorm._BatchNorm


@dataclass
class _Layer:
    """One refinement step: a layer (and the BatchNorm after it, when there is one).

    Attributes:
        path: the layer's module path.
        kind: ``"linear"``, ``"conv"`` or ``"norm"``.
        bn: the BatchNorm folded into a convolution (None: none).
        dim: the feature axis of the layer's inputs and outputs (-1: features last; 1: channels
            first, as a convolution's, a GroupNorm's or a channels-first LayerNorm's).
        pad: a convolution's zero padding ``(left, right, top, bottom)`` when its forward pads the
            input itself (TensorFlow "same" padding, timm ``Conv2dSame``); None: the module's own.
        bn_extra: the BatchNorm applies more after its normalisation (an activation, a drop: timm
            ``BatchNormAct2d``): only the normalisation is folded, and the targets are the sources'
            normalised outputs, before what follows it.
    """

    path: str
    kind: str  # "linear", "conv" or "norm"
    bn: str | None = None
    dim: int = -1
    pad: tuple[int, int, int, int] | None = None
    bn_extra: bool = False


def _close(out: Any, ref: Callable[[], torch.Tensor], tol: float = 1e-2) -> bool:
    """Whether a module's output ``out`` is ``ref()`` (same shape, every element within ``tol`` of the
    largest magnitude: loose enough for another convolution algorithm or TF32, far below what an
    activation or another padding changes); False when ``ref()`` fails (inputs of another layout)."""
    if not isinstance(out, torch.Tensor):
        return False
    try:
        ref = ref()
    except (RuntimeError, ValueError, IndexError, TypeError):
        return False
    if not isinstance(ref, torch.Tensor) or out.shape != ref.shape:
        return False
    if not ref.numel():
        return True
    gap = float((out.float() - ref.float()).abs().max())
    return gap == gap and gap <= tol * float(ref.abs().max()) + 1e-6  # (NaN: not the same)


def _same_padding(conv: nn.Conv2d, size: Sequence[int]) -> tuple[int, int, int, int]:
    """TensorFlow "same" zero padding ``(left, right, top, bottom)`` of a convolution on inputs of
    spatial ``size`` (timm ``pad_same``: the odd padding unit goes after)."""
    pads = []
    for n, k, s, d in zip(size, conv.kernel_size, conv.stride, conv.dilation):
        p = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads.append((p // 2, p - p // 2))
    (top, bottom), (left, right) = pads
    return left, right, top, bottom


def _conv_reference(conv: nn.Conv2d, x: torch.Tensor, pad: Sequence[int] | None) -> torch.Tensor:
    """The plain convolution of ``x`` by the module's weights, with its own padding (``pad`` None)
    or the zero padding ``pad`` ``(left, right, top, bottom)``."""
    mode = conv.padding_mode if pad is None else "zeros"
    pad = tuple(conv._reversed_padding_repeated_twice) if pad is None else tuple(pad)
    if any(pad):
        x = F.pad(x, pad, mode="constant" if mode == "zeros" else mode)
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


def _rule(module: nn.Module, x: torch.Tensor, out: Any) -> dict[str, Any] | None:
    """How refinement models a layer, checked against one call of it (its input ``x`` and output
    ``out``); None when no model of it reproduces the call (the layer is then left as mapped, or a
    BatchNorm not folded).

    A module whose class keeps torch's ``forward`` (and has no submodules) is the plain operation.
    Any other (a subclass that overrides ``forward``, such as timm ``Conv2dSame``, ``StdConv2d``,
    ``BatchNormAct2d`` or ``LayerNorm2d``) is checked: a Linear must be ``F.linear`` of its weights; a
    convolution the plain convolution with its own padding or with TensorFlow "same" padding of the
    input; a LayerNorm a norm over the last axis or over axis 1 (channels first); a GroupNorm
    ``F.group_norm``; a BatchNorm its normalisation followed by its submodules (if any) in order.

    Returns:
        ``{"dim": d}`` for linear layers and norms (the feature axis), ``{"pad": p}`` for a
        convolution (None: its own padding), ``{"extra": bool}`` for a BatchNorm (whether
        submodules run after the normalisation).
    """
    stock = {nn.Linear: nn.Linear.forward, nn.Conv2d: nn.Conv2d.forward, _BN: _BN.forward,
             nn.LayerNorm: nn.LayerNorm.forward, nn.GroupNorm: nn.GroupNorm.forward}
    base = next(b for b in stock if isinstance(module, b))
    children = [c for n, c in module.named_children() if n != "parametrizations"]  # (weight norm: not a step)
    plain = type(module).forward is stock[base] and not children
    if isinstance(module, nn.Linear):
        return {"dim": -1} if plain or _close(out, lambda: F.linear(x, module.weight, module.bias)) else None
    if isinstance(module, nn.Conv2d):
        if plain:
            return {"pad": None}
        if x.dim() != 4:
            return None
        if _close(out, lambda: _conv_reference(module, x, None)):
            return {"pad": None}
        same = _same_padding(module, x.shape[-2:])
        return {"pad": same} if _close(out, lambda: _conv_reference(module, x, same)) else None
    if isinstance(module, _BN):
        if plain:
            return {"extra": False}

        def then_children() -> torch.Tensor:
            y = _normalise(module, x)
            for c in children:
                y = c(y.clone())
            return y

        if _close(out, then_children):
            return {"extra": bool(children)}
        return {"extra": False} if children and _close(out, lambda: _normalise(module, x)) else None
    if isinstance(module, nn.LayerNorm):
        ns, w, b, eps = module.normalized_shape, module.weight, module.bias, module.eps
        if plain or _close(out, lambda: F.layer_norm(x, ns, w, b, eps)):
            return {"dim": -1}
        if x.dim() > 2 and len(ns) == 1 and \
                _close(out, lambda: F.layer_norm(x.movedim(1, -1), ns, w, b, eps).movedim(-1, 1)):
            return {"dim": 1}
        return None
    if plain or _close(out, lambda: F.group_norm(x, module.num_groups, module.weight, module.bias, module.eps)):
        return {"dim": 1}
    return None


def _probe(model: nn.Module, tape, x: torch.Tensor) -> dict[str, dict[str, Any] | None]:
    """:func:`_rule` of every Linear, Conv2d, BatchNorm, LayerNorm and GroupNorm called in ``tape``,
    from its first call in one forward pass of ``model`` on ``x`` (the tape's input)."""
    kinds = (nn.Linear, nn.Conv2d, _BN, nn.LayerNorm, nn.GroupNorm)
    modules = dict(model.named_modules())
    paths = {modules[c.path]: c.path for c in tape.calls if isinstance(modules.get(c.path), kinds)}
    rules: dict[str, dict[str, Any] | None] = {}
    inputs: dict[str, torch.Tensor | None] = {}

    def pre(mod, args, kwargs):
        p = paths[mod]
        if p not in rules and p not in inputs:
            t = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), None)
            inputs[p] = t.clone() if t is not None else None  # (the forward may change it in place)

    def post(mod, args, kwargs, out):
        p = paths[mod]
        if p in inputs:
            t = inputs.pop(p)
            rules[p] = _rule(mod, t, out) if t is not None else None

    handles = []
    try:
        for m in paths:
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True, prepend=True))
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return rules


def _refinable(module: nn.Module, norms: bool) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv"
    if norms and isinstance(module, nn.LayerNorm) and module.weight is not None and len(module.normalized_shape) == 1:
        return "norm"
    if norms and isinstance(module, nn.GroupNorm) and module.weight is not None:
        return "norm"
    return None


def _plan_layers(fused: nn.Module, tape, batchnorm: str, norms: bool,
                 rules: dict[str, dict[str, Any] | None]) -> tuple[list[_Layer], list[str]]:
    """The layers to refit in execution order, and the weighted modules left as they are (with why).

    ``rules`` (from :func:`_probe`) says how each layer computes. A layer whose forward no rule
    reproduces is left as mapped (listed with why); a BatchNorm after a convolution that no rule
    reproduces is not folded (the convolution is fitted to its own outputs, listed too)."""
    modules = dict(fused.named_modules())
    layers, skipped, seen = [], [], set()
    owners: dict[int, list[str]] = defaultdict(list)  # a parameter -> the modules holding it
    for path, mod in modules.items():
        for prm in mod._parameters.values():
            if prm is not None:
                owners[id(prm)].append(path)

    def sharing(path: str) -> list[str]:
        """The modules outside ``path`` that hold one of its parameters (tied weights)."""
        inside = (path + ".") if path else ""
        return sorted({o for prm in modules[path].parameters() for o in owners[id(prm)]
                       if o != path and not o.startswith(inside)})

    for k, c in enumerate(tape.calls):
        m = modules.get(c.path)
        # a layer owns a `weight` (embeddings, tokens and other loose parameters are not layers)
        if m is None or c.path in seen:
            continue
        seen.add(c.path)
        if not (isinstance(getattr(m, "weight", None), nn.Parameter) or weight_norm_dim(m) is not None):
            if isinstance(getattr(m, "weight", None), torch.Tensor):  # computed from others: no fit writes it
                skipped.append(f"{c.path} ({type(m).__name__}: its weight is computed from other tensors "
                               f"(a parametrisation other than weight norm), kept as mapped)")
            continue
        kind = _refinable(m, norms)
        if kind is None:
            if not isinstance(m, (_BN, nn.LayerNorm, nn.GroupNorm)):
                skipped.append(f"{c.path} ({type(m).__name__}: no least-squares rule)")
            continue
        if tape.count(c.path) > 1:
            skipped.append(f"{c.path} (called {tape.count(c.path)} times per forward pass: shared weights)")
            continue
        tied = sharing(c.path)
        if tied:  # one fit per module would overwrite the other's in the shared tensor
            skipped.append(f"{c.path} (shares parameters with {', '.join(tied[:3])}: tied weights, kept as mapped)")
            continue
        how = rules.get(c.path)
        if how is None:
            what = {"linear": "F.linear of its weights", "conv": "a zero-, copy- or TensorFlow-'same'-padded "
                    "convolution by its weights", "norm": "a norm over the features, last or first after the "
                    "batch axis"}[kind]
            skipped.append(f"{c.path} ({type(m).__name__}: its forward is not {what}: no least-squares rule)")
            continue
        bn, extra = None, False
        if kind == "conv":
            after = tape.consumers_of(k)
            if len(after) == 1 and isinstance(modules.get(tape.calls[after[0]].path), _BN):
                path = tape.calls[after[0]].path
                norm = modules[path]
                if norm.track_running_stats and norm.affine and tape.count(path) == 1 and not sharing(path):
                    if rules.get(path) is None:
                        skipped.append(f"{path} ({type(norm).__name__}: its forward is not its normalisation followed "
                                       f"by its submodules: not folded, {c.path} fitted to its own outputs)")
                    else:
                        bn, extra = path, bool(rules[path]["extra"])
        layers.append(_Layer(c.path, kind, bn, dim=how.get("dim", 1), pad=how.get("pad"), bn_extra=extra))
    return layers, skipped


def _apply_features(A: torch.Tensor, t: torch.Tensor, dim: int) -> torch.Tensor:
    """``A`` (n x n_i) applied to the feature axis ``dim`` of ``t``."""
    return torch.movedim(torch.tensordot(A, t, dims=([1], [dim])), 0, dim)


def _tap_spans(n: int, k: int, s: int, d: int, lo: int, hi: int) -> list[tuple[int, int, int, int]]:
    """Along one spatial axis of a zero-padded convolution (input size ``n``, kernel ``k``, stride
    ``s``, dilation ``d``, padding ``lo``/``hi``): runs ``(first output, end output, first tap, end tap)``
    of output positions whose kernel taps reading the input (not padding) are the same range."""
    out = (n + lo + hi - d * (k - 1) - 1) // s + 1
    runs: list[list[int]] = []
    for r in range(out):
        live = [t for t in range(k) if 0 <= r * s + t * d - lo <= n - 1]
        span = (live[0], live[-1] + 1) if live else (0, 0)
        if runs and (runs[-1][2], runs[-1][3]) == span:
            runs[-1][1] = r + 1
        else:
            runs.append([r, r + 1, *span])
    return [tuple(r) for r in runs]


def _coarse(spans: list[tuple[int, int, int, int]], saving: float = 0.25) -> list[tuple[int, int, int, int]]:
    """Keep an axis' tap spans split only when that saves at least ``saving`` of the axis' share of
    the Gram's work (sum of positions x taps^2); otherwise one span over all positions, reading the
    union of the taps (on large maps the border is a small share, and each class costs a few
    operations of its own)."""
    live = [sp for sp in spans if sp[3] > sp[2]]
    if len(spans) == 1 or not live:
        return spans
    t0, t1 = min(sp[2] for sp in live), max(sp[3] for sp in live)
    split = sum((r1 - r0) * (a1 - a0) ** 2 for r0, r1, a0, a1 in spans)
    whole = (spans[-1][1] - spans[0][0]) * (t1 - t0) ** 2
    return spans if split <= (1 - saving) * whole else [(spans[0][0], spans[-1][1], t0, t1)]


class _Buffers:
    """Tensors kept from one batch to the next, by key and shape (allocating fresh large tensors
    every batch costs page faults that can take as long as the copies into them)."""

    def __init__(self):
        self.kept: dict[tuple, torch.Tensor] = {}

    def __call__(self, key: Any, shape: Sequence[int], like: torch.Tensor, zero: bool = False) -> torch.Tensor:
        """The kept tensor for ``key`` of this shape, with ``like``'s dtype and device (``zero``:
        zeroed when first made)."""
        k = (key, tuple(shape))
        buf = self.kept.get(k)
        if buf is None:
            buf = self.kept[k] = (torch.zeros if zero else torch.empty)(tuple(shape), dtype=like.dtype,
                                                                        device=like.device)
        return buf


class _ConvPatches:
    """The patch rows of a convolution, split into classes of output positions that read the same
    kernel taps (interior, edges, corners), each class copying only the taps that read the input.

    A tap that reads zero padding at an output position contributes nothing to that row's products,
    so the Gram of the whole patches is the sum of the classes' smaller Grams placed in their tap
    blocks (exact). Taps that read only padding everywhere (``taps``) drop out of the regression
    altogether: their Gram rows and columns are zero, so the ridge solution keeps their weights. On
    small feature maps this removes most of the work (a 3x3 convolution on a 2x2 map: every output
    position reads 4 of the 9 taps; on a 1x1 map only the centre).

    Args:
        conv: the convolution (zero padding; other padding modes read every tap).
        size: the input's spatial size ``(H, W)``.
        pad: zero padding ``(left, right, top, bottom)`` that the convolution's forward applies
            itself (TensorFlow "same" padding); None: the module's own padding.
    """

    def __init__(self, conv: nn.Conv2d, size: Sequence[int], pad: Sequence[int] | None = None):
        self.conv, self.pad = conv, pad
        kh, kw = conv.kernel_size
        left, right, top, bottom = conv._reversed_padding_repeated_twice if pad is None else pad
        if conv.padding_mode != "zeros" and pad is None:
            # padding by copies of the input: every tap reads input values (spans of the padded input)
            size, (left, right, top, bottom) = (size[0] + top + bottom, size[1] + left + right), (0, 0, 0, 0)
        rows = _coarse(_tap_spans(size[0], kh, conv.stride[0], conv.dilation[0], top, bottom))
        cols = _coarse(_tap_spans(size[1], kw, conv.stride[1], conv.dilation[1], left, right))
        live_r = [r for r in rows if r[3] > r[2]] or rows
        live_c = [c for c in cols if c[3] > c[2]] or cols
        h0, h1 = min(r[2] for r in live_r), max(r[3] for r in live_r)
        w0, w1 = min(c[2] for c in live_c), max(c[3] for c in live_c)
        self.taps = (slice(h0, h1), slice(w0, w1))
        cg = conv.in_channels // conv.groups
        self.layout = (h1 - h0, w1 - w0, cg)
        mask = torch.zeros(kh, kw, cg, dtype=torch.bool)
        mask[self.taps] = True
        self.live = mask.reshape(-1)  # over the whole patch columns (kernel row, kernel column, channel)
        self._buffer = _Buffers()
        self.classes = [(slice(r0, r1), slice(c0, c1), slice(max(a0, h0) - h0, max(a1, h0) - h0),
                         slice(max(b0, w0) - w0, max(b1, w0) - w0))
                        for r0, r1, a0, a1 in rows for c0, c1, b0, b1 in cols]

    @property
    def inputs(self) -> int:
        """Inputs per group of the regression (live taps x channels per group)."""
        return self.layout[0] * self.layout[1] * self.layout[2]

    def add(self, gram: LayerGram, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add one batch to ``gram``: convolution inputs ``x`` (N, C, H, W) and targets ``y`` (N, O, OH, OW)."""
        conv, g = self.conv, self.conv.groups
        v = _patch_view(conv, x, self._buffer, self.pad)  # (groups, N, OH, OW, kh, kw, C / g)
        v = v[:, :, :, :, self.taps[0], self.taps[1]]
        y = y.permute(0, 2, 3, 1)
        for k, (rs, cs, th, tw) in enumerate(self.classes):
            xc = v[:, :, rs, cs, th, tw]
            xc = self._buffer(("x", k), xc.shape, xc).copy_(xc)
            yc = y[:, rs, cs]
            yc = self._buffer(("y", k), yc.shape, yc).copy_(yc).view(-1, y.shape[-1])
            whole = (th.stop - th.start, tw.stop - tw.start) == self.layout[:2]
            gram.add(xc.view(g, yc.shape[0], -1), _group_rows(yc, g), None if whole else (self.layout, th, tw))


def _patch_view(conv: nn.Conv2d, x: torch.Tensor, buffer: Callable | None = None,
                pad: Sequence[int] | None = None) -> torch.Tensor:
    """A strided view ``(groups, N, OH, OW, kh, kw, C / groups)`` of the convolution's input patches
    over a padded channels-last copy of ``x`` (one copy; into ``buffer(key, shape, like, zero=True)``'s
    tensor when given, whose padding stays zero from one batch to the next). ``pad``: zero padding
    ``(left, right, top, bottom)`` in place of the module's own (one its forward applies itself)."""
    zeros = pad is not None or conv.padding_mode == "zeros"
    pad = tuple(conv._reversed_padding_repeated_twice) if pad is None else tuple(pad)
    if any(pad) and zeros:
        # zero padding and the channels-last copy in one write
        left, right, top, bottom = pad
        b, c, h, w = x.shape
        shape = (b, h + top + bottom, w + left + right, c)
        padded = buffer("padded", shape, x, zero=True) if buffer is not None else x.new_zeros(shape)
        padded[:, top:top + h, left:left + w] = x.permute(0, 2, 3, 1)
        x = padded
    else:
        if any(pad):
            x = F.pad(x, pad, mode=conv.padding_mode)
        x = x.permute(0, 2, 3, 1).contiguous()
    B, H, W, C = x.shape
    (kh, kw), (sh, sw), (dh, dw), g = conv.kernel_size, conv.stride, conv.dilation, conv.groups
    oh, ow = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
    s = x.stride()
    return x.as_strided((g, B, oh, ow, kh, kw, C // g),
                        (C // g, s[0], s[1] * sh, s[2] * sw, s[1] * dh, s[2] * dw, 1))


def _conv_rows(conv: nn.Conv2d, x: torch.Tensor, taps: tuple[slice, slice] | None = None,
               pad: Sequence[int] | None = None) -> torch.Tensor:
    """Input patches of a convolution: ``(groups, rows, kh * kw * in_channels / groups)``, rows ordered
    (image, output row, output column), columns (kernel row, kernel column, channel): channels last,
    so the copy moves contiguous runs of channels (the weights are permuted to match). With ``taps``
    only those kernel rows and columns are copied; ``pad`` as in :func:`_patch_view`."""
    v = _patch_view(conv, x, pad=pad)
    if taps is not None:
        v = v[:, :, :, :, taps[0], taps[1]]
    g, B, oh, ow = v.shape[:4]
    return v.reshape(g, B * oh * ow, -1)


def _conv_weight(w: torch.Tensor, groups: int) -> torch.Tensor:
    """Conv weights ``(out, in/g, kh, kw)`` as ``(groups, out/g, kh * kw * in/g)`` (the patch column order)."""
    return w.permute(0, 2, 3, 1).reshape(groups, w.shape[0] // groups, -1)


def _conv_weight_back(w: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`_conv_weight`."""
    out, cin, kh, kw = shape
    return w.reshape(out, kh, kw, cin).permute(0, 3, 1, 2)


def _feature_rows(layer: _Layer, y: torch.Tensor) -> torch.Tensor:
    """A layer output as ``(rows, features)`` (features last; rows in the order of :func:`_in_rows`)."""
    if layer.dim == -1:
        return y.reshape(-1, y.shape[-1])
    return y.movedim(layer.dim, -1).reshape(-1, y.shape[layer.dim])


def _group_rows(y: torch.Tensor, groups: int) -> torch.Tensor:
    """``(rows, features)`` as ``(groups, rows, features / groups)``."""
    return y.reshape(y.shape[0], groups, -1).transpose(0, 1)


def _in_rows(layer: _Layer, module: nn.Module, x: torch.Tensor,
             taps: tuple[slice, slice] | None = None) -> torch.Tensor:
    """A layer input as the regression's ``(groups, rows, inputs)``: a linear layer's features, a
    convolution's patches (with the padding it applies), a norm's normalised features (one group
    per feature, features on ``layer.dim``)."""
    if layer.kind == "linear":
        return x.reshape(1, -1, x.shape[-1])
    if layer.kind == "conv":
        return _conv_rows(module, x, taps, layer.pad)
    if isinstance(module, nn.LayerNorm):
        # (a channels-first LayerNorm normalises axis 1: moved last, rows ordered as _feature_rows')
        xn = F.layer_norm(x.movedim(layer.dim, -1), module.normalized_shape, eps=module.eps)
        return xn.reshape(-1, xn.shape[-1]).t().unsqueeze(-1)
    xn = F.group_norm(x, module.num_groups, eps=module.eps)
    return xn.reshape(xn.shape[0], xn.shape[1], -1).permute(1, 0, 2).reshape(xn.shape[1], -1, 1)


def _shape(kind: str, module: nn.Module) -> tuple[int, int, int]:
    """(groups, inputs per group, outputs per group) of a layer's regression."""
    if kind == "linear":
        return 1, module.in_features, module.out_features
    if kind == "conv":
        g = module.groups
        return g, module.in_channels // g * module.kernel_size[0] * module.kernel_size[1], module.out_channels // g
    return module.weight.numel(), 1, 1


def _anchor(kind: str, module: nn.Module, bn: nn.Module | None, groups: int):
    """Current weights ``(groups, o, d)`` and bias ``(groups, o)`` (BatchNorm folded in when given)."""
    w = module.weight.detach().double()
    b = module.bias.detach().double() if getattr(module, "bias", None) is not None else None
    if kind == "norm":
        return w.reshape(-1, 1, 1), (b if b is not None else torch.zeros_like(w)).reshape(-1, 1)
    out = w.shape[0]
    if bn is not None:
        s = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
        w = w * s.view(-1, *([1] * (w.dim() - 1)))
        b = bn.bias.detach().double() - s * bn.running_mean.double() + (s * b if b is not None else 0.0)
    w = _conv_weight(w, groups) if kind == "conv" else w.reshape(groups, out // groups, -1)
    return w, (b.reshape(groups, out // groups) if b is not None else None)


def _check_lstsq(options: dict[str, Any]) -> None:
    k = options["positions_per_image"]
    if k is not None and k < 1:
        raise InvalidOptionError(f"refinement 'lstsq': positions_per_image={k} must be a positive integer or None")
    if options["ridge"] < 0:
        raise InvalidOptionError(f"refinement 'lstsq': ridge={options['ridge']} must be >= 0 (0: plain least squares)")
    if not options["max_gram_gib"] > 0:
        raise InvalidOptionError(f"refinement 'lstsq': max_gram_gib={options['max_gram_gib']} must be > 0 (GiB)")


@register_refinement("lstsq", check=_check_lstsq)
def refine_lstsq(ctx: RepairContext, *, inputs: Literal["sequential", "merged"] = "sequential",
                 batchnorm: Literal["fold", "stats"] = "fold", norms: bool = False, ridge: float = 1e-4,
                 precision: Literal["float32", "float64"] = "float32",
                 positions_per_image: int | None = None, max_gram_gib: float = 2.0) -> None:
    """Least-squares refinement (PLeaS in closed form): each layer refitted to the merged sources' outputs.

    Args:
        ctx: the fused model (changed in place), sources, graphs, maps, weights and data.
        inputs: ``"sequential"``: a layer's inputs are the fused model's own activations, earlier layers
            already refined; ``"merged"``: the merged inputs of the source layers.
        batchnorm: ``"fold"``: fit a conv followed by BatchNorm to the post-BN outputs; ``"stats"``:
            fit pre-BN outputs and set the norm's running statistics from the Gram.
        norms: also refit LayerNorm/GroupNorm affines (a per-feature least squares on the
            normalised inputs). Off by default: a norm followed by a refitted linear layer gains
            nothing from it (the layer's fit absorbs any affine of its inputs; measured on the zoo's
            ViT pair, November 2026: 85.56 with and without).
        ridge: strength of the pull toward the mapped weights, relative to the mean diagonal of the
            Gram ``X^T X`` (0: plain least squares).
        precision: per-batch products in ``"float32"`` (summed in float64) or ``"float64"``.
        positions_per_image: fit each layer on at most this many random positions (conv output
            pixels, tokens) per image (None: all); fewer Gram rows, faster on large inputs.
        max_gram_gib: a layer whose float64 Gram would exceed this many GiB is left as mapped
            (recorded in the fusion report): solving it takes a few times that memory (e.g. the
            first classifier layer of a 224-pixel VGG, 25,088 inputs: 4.7 GiB).
    """
    fused = ctx.fused
    dev = torch.device(ctx.device) if ctx.device is not None else model_device(fused)
    xs = list(batches(ctx.data))
    odd = next((k for k, x in enumerate(xs) if x.shape[1:] != xs[0].shape[1:]), None)
    if odd is not None:  # (convolution Grams leave out padding taps per position class of one input size)
        raise CalibrationError(f"refine='lstsq' needs calibration batches of one input shape: batch {odd} has "
                               f"{tuple(xs[odd].shape[1:])}, batch 0 {tuple(xs[0].shape[1:])}; resize the inputs to one "
                               f"size (statistics and repairs take mixed sizes)")
    gen = torch.Generator().manual_seed(0)
    sources = runnable(ctx.sources, dev, avoid=[fused])
    models = [fused] + sources
    t0 = time.perf_counter()
    with modes(models), torch.no_grad():
        x0 = xs[0].to(dev)
        # the call structure needs only a couple of samples (shapes keep their batch size of 2)
        tapes = [record(m, x0[:2]) for m in models]
        # how each layer computes, checked on one call (subclasses with their own forward included)
        layers, skipped = _plan_layers(fused, tapes[0], batchnorm, norms, _probe(fused, tapes[0], x0[:2]))
        if ctx.until is not None:
            # partial zipping: the layers after the cut are not part of the fused model
            end = tapes[0].calls[tapes[0].call(ctx.until)].exit
            layers = [la for la in layers if tapes[0].calls[tapes[0].call(la.bn or la.path)].exit <= end]
        replays = [Replay(m, t, len(xs)) for m, t in zip(models, tapes)]
        fmods = dict(fused.named_modules())
        smods = [dict(m.named_modules()) for m in sources]
        few: list[str] = []  # layers fitted on fewer rows than inputs
        unstratified: list[str] = []  # layers whose positions could not be drawn per image
        details: list[dict[str, Any]] = []
        largest = (0, "")
        with contextlib.ExitStack() as stack:
            for r in replays:
                stack.enter_context(r.session())
            steps: Any = layers
            if ctx.progress:
                from tqdm.auto import tqdm

                steps = tqdm(layers, desc="refinement (layers)", total=len(layers), leave=False)
            for layer in steps:
                t1 = time.perf_counter()
                module = fmods[layer.path]
                bn = fmods[layer.bn] if layer.bn is not None else None
                fold = bn is not None and batchnorm == "fold"
                A, Bm = _merge_matrices(ctx, layer, module, dev, inputs == "merged")
                if inputs == "merged" and Bm is None:
                    skipped.append(f"{layer.path} (grouped convolution: merged inputs need one input space)")
                    continue
                groups, d, o = _shape(layer.kind, module)
                patches, live = None, None
                if layer.kind == "conv":
                    patches = _ConvPatches(module, tapes[0].calls[tapes[0].call(layer.path)].input_shape[-2:],
                                           layer.pad)
                    if patches.inputs == 0:
                        skipped.append(f"{layer.path} (reads only padding: its output is its bias)")
                        continue
                    live = None if bool(patches.live.all()) else patches.live.to(dev)
                fit = patches.inputs if patches is not None else d
                has_bias = getattr(module, "bias", None) is not None or bn is not None
                gib = groups * (fit + has_bias) ** 2 * 8 / 2 ** 30
                if gib > max_gram_gib:
                    skipped.append(f"{layer.path} (its Gram of {fit + has_bias} inputs would take {gib:.3g} GiB, over "
                                   f"max_gram_gib={max_gram_gib:g}: raise it to refit this layer)")
                    continue
                gram = LayerGram(groups, fit, o, has_bias, dev, precision)
                if gram.xx.shape[1] > largest[0]:
                    largest = (gram.xx.shape[1], layer.path)
                # stops: the fused model before the layer; each source after the layer (or its norm; a
                # norm that applies more after normalising is applied here, its normalisation only)
                own_stop = (tapes[0].call(layer.path), "in")
                if inputs == "sequential":
                    replays[0].plan(own_stop)
                src_stops = []
                norm_only = [mods[layer.bn] for mods in smods] if fold and layer.bn_extra else None
                for r, t in zip(replays[1:], tapes[1:]):
                    stop = t.call(layer.bn if fold and norm_only is None else layer.path)
                    cap = [(t.call(layer.path), "in")] if inputs == "merged" else []
                    r.plan((stop, "out"), cap)
                    src_stops.append((stop, t.call(layer.path)))
                fdim = layer.dim
                merge = _OutputMerge(A, fdim)
                for b, x in enumerate(xs):
                    x = x.to(dev)
                    ys, xis = [], []
                    for i, (r, (stop, own)) in enumerate(zip(replays[1:], src_stops)):
                        got = r.run(x, b)
                        y = got[(stop, "out")]
                        ys.append(y if norm_only is None else _normalise(norm_only[i], y))
                        if inputs == "merged":
                            xis.append(got[(own, "in")])
                    Y = merge(ys)
                    if inputs == "sequential":
                        X = replays[0].run(x, b)[own_stop]
                    else:
                        X = sum(_apply_features(Bm[i], xi.float(), fdim) for i, xi in enumerate(xis))
                    if patches is not None and positions_per_image is None:
                        patches.add(gram, X, Y)
                        continue
                    Y = _feature_rows(layer, Y)
                    Xr = _in_rows(layer, module, X, patches.taps if patches is not None else None)
                    if positions_per_image is not None and layer.kind != "norm":
                        grid = tuple(X.shape[:-1]) if layer.kind == "linear" else (len(x), Xr.shape[1] // len(x))
                        keep, per_image = _sample_rows(grid, len(x), positions_per_image, gen, dev)
                        if not per_image and layer.path not in unstratified:
                            unstratified.append(layer.path)
                        if keep is not None:
                            Xr, Y = Xr[:, keep], Y[keep]
                    gram.add(Xr, _group_rows(Y, groups))
                if gram.rows < gram.xx.shape[1]:
                    # fewer rows than unknowns: the fit interpolates the calibration data and only the ridge
                    # ties it to the mapped weights elsewhere (still refitted: keeping such layers as mapped
                    # helps some models and hurts others; reported)
                    few.append(f"{layer.path} ({gram.rows} rows, {gram.xx.shape[1]} inputs)")
                w0, b0 = _anchor(layer.kind, module, bn if fold else None, groups)
                # taps that only ever read padding keep their weights (the full problem's exact solution);
                # the ridge stays relative to the mean diagonal of the full Gram
                sol = ridge_solve(gram, w0[:, :, live] if live is not None else w0, b0, ridge=ridge * fit / d)
                full = sol.weight
                if live is not None:
                    full = w0.clone()
                    full[:, :, live] = sol.weight
                if sol.fallback_groups:
                    ctx.notes.append(f"refinement 'lstsq': {layer.path}: {sol.fallback_groups} group(s) solved by "
                                     f"the pseudo-inverse (Gram not positive definite)")
                _write(layer, module, bn, fold, sol, gram, full)
                if fold and inputs == "sequential":
                    # fitted on the fused model's own inputs, its statistics are that model's and part
                    # of the fitted affine (BN(z) = z + b): a later BatchNorm reset leaves it as it is
                    # (fitted on the merged sources' inputs, a reset re-standardises the fused model's
                    # own outputs to the merged statistics, as REPAIR does: 88.83 against 87.68
                    # frozen on the zoo's r18 pair)
                    ctx.frozen.append(bn)
                details.append({"layer": layer.path, "rows": gram.rows, "inputs": gram.xx.shape[1],
                                "loss_before": sol.loss_before, "loss_after": sol.loss_after,
                                "seconds": time.perf_counter() - t1})
    if unstratified:
        ctx.notes.append(f"refinement 'lstsq': positions_per_image={positions_per_image}: the inputs of "
                         f"{len(unstratified)} layer(s) have no axis of the batch's images, so their rows were drawn "
                         f"at random without regard to images: " + ", ".join(unstratified[:6])
                         + (" ..." if len(unstratified) > 6 else ""))
    if few:
        ctx.notes.append(f"refinement 'lstsq' fitted {len(few)} layer(s) on fewer calibration rows than inputs "
                         f"(underdetermined: the fit reproduces the calibration data but may generalise poorly; give "
                         f"more calibration data or a larger ridge): " + "; ".join(few[:6])
                         + (" ..." if len(few) > 6 else ""))
    if skipped:
        ctx.notes.append(f"refinement 'lstsq' left {len(skipped)} weighted module(s) as mapped: "
                         + "; ".join(skipped[:6]) + (" ..." if len(skipped) > 6 else ""))
    ctx.details["refine"] = {"layers": details, "largest_gram": {"layer": largest[1], "size": largest[0]},
                             "skipped": skipped, "underdetermined": few, "seconds": time.perf_counter() - t0}


def _normalise(bn: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """A BatchNorm's normalisation alone (running statistics and affine) of ``y``, without what its
    forward applies after it (timm ``BatchNormAct2d``'s drop and activation)."""
    return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


class _OutputMerge:
    """``sum_i A_i y_i`` over the feature axis ``dim`` of the sources' layer outputs, in their own layout
    (before they are turned into rows, so each source costs one channel gather instead of a transposing
    copy, a gather and a product). A map with at most one entry per fused feature (a permutation, a
    selection, a head's placement) is applied as a scaled gather; any other map as a dense product."""

    def __init__(self, A: list[torch.Tensor], dim: int):
        self.dim, self.parts, self._buffer = dim, [], _Buffers()
        for M in A:
            if bool(((M != 0).sum(1) <= 1).all()):
                idx = M.abs().argmax(1)
                self.parts.append((idx, M.gather(1, idx[:, None])[:, 0]))
            else:
                self.parts.append((None, M))

    def __call__(self, ys: list[torch.Tensor]) -> torch.Tensor:
        out = None
        for y, (idx, M) in zip(ys, self.parts):
            y = y.float()
            if idx is None:
                part = _apply_features(M, y, self.dim)
                out = part if out is None else out.add_(part)
                continue
            shape = [1] * y.dim()
            shape[self.dim] = -1
            # gathered into tensors kept for the next batches (fresh large tensors cost page faults)
            dim = self.dim % y.dim()
            size = (*y.shape[:dim], len(idx), *y.shape[dim + 1:])
            if out is None:
                out = torch.index_select(y, self.dim, idx, out=self._buffer("out", size, y)).mul_(M.view(shape))
            else:
                sel = torch.index_select(y, self.dim, idx, out=self._buffer("sel", size, y))
                out.addcmul_(sel, M.view(shape))
        return out


def _sample_rows(grid: tuple[int, ...], images: int, k: int, gen: torch.Generator,
                 dev: torch.device) -> tuple[torch.Tensor | None, bool]:
    """Row indices keeping ``k`` random positions of every image, the rows being the entries of a
    tensor of shape ``grid`` in row-major order whose first axis of size ``images`` indexes the
    images (image-major rows, or a sequence-first ``(tokens, images)`` grid), and whether they were
    drawn per image. Where no axis of ``grid`` has the batch's size, ``images * k`` rows are drawn
    without regard to images (False: the caller reports it). The indices are None when every row is
    kept (no image has more than ``k`` positions, or there are no more rows than would be drawn)."""
    rows = math.prod(grid)
    axis = next((a for a, n in enumerate(grid) if n == images), None)
    if axis is None:
        if rows <= images * k:
            return None, False
        return torch.randperm(rows, generator=gen)[:images * k].sort().values.to(dev), False
    per = rows // images
    if per <= k:
        return None, True
    order = torch.arange(rows).reshape(grid).movedim(axis, 0).reshape(images, per)
    pos = torch.stack([torch.randperm(per, generator=gen)[:k] for _ in range(images)])
    return order.gather(1, pos).reshape(-1).to(dev), True


def _merge_matrices(ctx: RepairContext, layer: _Layer, module: nn.Module, dev: torch.device, merged_inputs: bool):
    """Per source, the matrix merging its layer outputs into the fused features (``A_i``), and the one
    merging its layer inputs (``B_i``; None when not asked, or for a grouped convolution)."""
    # a weight-normalised layer's v has the weight's axes
    name = weight_norm_tensors(layer.path)[1] if weight_norm_dim(module) is not None else f"{layer.path}.weight"
    A, B = [], []
    separate = ctx.heads == "separate" and name in head_tensors(ctx.graphs[0])
    sizes = [g.shapes[name][0] for g in ctx.graphs] if separate else []
    for i, g in enumerate(ctx.graphs):
        lay = g.layout(name)
        if separate:
            # each model's own classifier: its outputs go to its slot of the concatenated outputs
            place = torch.zeros(sum(sizes), sizes[i])
            place[sum(sizes[:i]):sum(sizes[:i + 1])] = torch.eye(sizes[i])
            A.append(place.to(dev))
        else:
            A.append(axis_matrix(lay[0], ctx.maps, i, "out", True, ctx.alpha[i], name, 0).float().to(dev))
        if not merged_inputs:
            continue
        if layer.kind == "norm" or (layer.kind == "conv" and module.groups == module.in_channels == module.out_channels):
            B.append(A[-1])
        elif layer.kind == "conv" and module.groups > 1:
            return A, None
        else:
            B.append(axis_matrix(lay[1], ctx.maps, i, "out", True, ctx.alpha[i], name, 1).float().to(dev))
    return A, (B if merged_inputs else [])


def _write(layer: _Layer, module: nn.Module, bn: nn.Module | None, fold: bool, sol: RidgeSolution, gram: LayerGram,
           w: torch.Tensor) -> None:
    """Write a solution into the fused layer (and its BatchNorm); ``w`` is the whole weight
    ``(groups, outputs, inputs)`` (``sol.weight`` with any taps left out of the fit)."""
    if layer.kind == "norm":
        set_weight(module, w.reshape(-1))
        if module.bias is not None:
            module.bias.copy_(sol.bias.reshape(-1))
        return
    if layer.kind == "conv":
        set_weight(module, _conv_weight_back(w, module.weight.shape))
    else:
        set_weight(module, w.reshape(module.weight.shape))
    if bn is None:
        if module.bias is not None:
            module.bias.copy_(sol.bias.reshape(-1))
        return
    # statistics of the refitted conv's output z = W x over the calibration rows
    mu, var = (t.reshape(-1) for t in output_moments(gram, sol))
    b = sol.bias.reshape(-1)
    if fold:
        # BN(z) = z + b: statistics of z, an affine that undoes them (a later reset keeps it)
        if module.bias is not None:
            module.bias.zero_()
        bn.running_mean.copy_(mu)
        bn.running_var.copy_(var)
        bn.weight.copy_(torch.sqrt(var + bn.eps))
        bn.bias.copy_(mu + b)
    else:
        # pre-BN fit: the norm keeps its affine and normalises with the refitted conv's statistics
        if module.bias is not None:
            module.bias.copy_(b)
            mu = mu + b
        bn.running_mean.copy_(mu)
        bn.running_var.copy_(var)
