"""Axis rules for ATen ops: how each op relates the axes of its inputs and outputs.

A rule receives the tracer, the FX node and its bound arguments and returns the output's axes (a list
of :class:`Dim`, a list of those for ops returning several tensors, or None for non-tensors). It
unifies axes that index the same features, fixes axes tied to positions, and records checks for
axes that must turn out fixed (an op that mixes features along them cannot be followed).

Users extend the table with :func:`register_op_rule`.
"""

from __future__ import annotations

import operator
import re
from typing import Callable

from ._axes import Dim, Struct

RULES: dict[str, Callable] = {}


def register_op_rule(*names: str):
    """Register an axis rule for ops, by name (``"aten.cumsum"`` or a custom ``"mylib.op"``).

    The decorated function is called as ``rule(tracer, node, args)`` and returns the output axes.
    Besides functions, two ready rules can be registered by name with :func:`register_op_kind`.

    Example:
        >>> @register_op_rule("mylib.scale")
        ... def _scale(tr, node, args):
        ...     return tr.elementwise(node, [args["self"]])
    """

    def deco(fn):
        for n in names:
            RULES[n] = fn
        return fn

    return deco


def register_op_kind(name: str, kind: str) -> None:
    """Register a ready rule for op ``name``: ``"elementwise"`` (acts per element, with
    broadcasting over its tensor arguments) or ``"fixed"`` (every axis it touches is positional and
    must not be permuted)."""
    if kind == "elementwise":
        RULES[name] = lambda tr, node, a: tr.elementwise(node, tr.tensor_args(node))
    elif kind == "fixed":
        RULES[name] = _fixed_op
    else:
        raise ValueError(f"unknown op kind {kind!r}: use 'elementwise' or 'fixed'")


def _fixed_op(tr, node, a):
    for x in tr.tensor_args(node):
        for d in tr.dims(x):
            tr.A.fix_dim(d, f"used by {tr.opname(node)}")
    return tr.fresh_like(node, "output of a fixed op")


def _norm(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


# ---------------------------------------------------------------------------------------------
# elementwise and same-shape ops
_UNARY = """abs acos acosh alias asin asinh atan atanh bitwise_not ceil celu clamp clamp_max clamp_min clone
contiguous cos cosh detach elu erf erfc erfinv exp exp2 expm1 fill floor frac gelu hardsigmoid hardswish
hardtanh isinf isnan leaky_relu lift_fresh_copy log log10 log1p log2 log_sigmoid logical_not logit mish nan_to_num
neg positive pow reciprocal relu relu6 round rrelu rsqrt selu sigmoid sign sgn silu sin sinh softplus softshrink
sqrt square tan tanh threshold trunc _to_copy to dropout alpha_dropout feature_dropout native_dropout
_softmax softmax log_softmax _log_softmax hardshrink glu_jvp special_erfcx type_as bernoulli""".split()
_BINARY = """add sub rsub mul div true_divide floor_divide remainder fmod maximum minimum max_other min_other eq ne lt le gt ge
logical_and logical_or logical_xor bitwise_and bitwise_or bitwise_xor where masked_fill addcmul addcdiv lerp
atan2 hypot xlogy copy fmax fmin heaviside""".split()


def _register_elementwise():
    for n in _UNARY + _BINARY:
        for suffix in ("", "_"):
            RULES[f"aten.{n}{suffix}"] = _elementwise
    RULES["aten.type_as"] = lambda tr, node, a: tr.dims(a["self"])
    RULES["aten.native_dropout"] = lambda tr, node, a: [tr.dims(a["input"]), tr.dims(a["input"])]
    RULES["aten.bernoulli"] = RULES["aten.bernoulli_"] = lambda tr, node, a: tr.fresh_like(node, "random")


def _elementwise(tr, node, a):
    if tr.opname(node) in ("aten.softmax", "aten._softmax", "aten.log_softmax", "aten._log_softmax"):
        return tr.dims(a["self"])
    return tr.elementwise(node, tr.tensor_args(node))


_register_elementwise()


# uniform constants: any permutation leaves them unchanged, so their axes are free
_UNIFORM_OPS = ("aten.zeros", "aten.ones", "aten.full", "aten.empty", "aten.new_zeros", "aten.new_ones",
               "aten.new_full", "aten.new_empty", "aten.zeros_like", "aten.ones_like", "aten.full_like",
               "aten.empty_like", "aten.scalar_tensor", "aten.empty_strided", "aten.new_empty_strided")


@register_op_rule(*_UNIFORM_OPS)
def _uniform(tr, node, a):
    return [tr.A.fresh(int(s)) for s in tr.shape(node)]


@register_op_rule("aten.arange", "aten.linspace", "aten.rand", "aten.randn", "aten.randint", "aten.rand_like",
                  "aten.randn_like", "aten.randint_like", "aten.randperm", "aten.eye", "aten.tensor",
                  "aten.scalar_tensor_like", "aten._tensor_constant")
def _positional_constant(tr, node, a):
    return tr.fresh_like(node, "constant")


# ---------------------------------------------------------------------------------------------
# linear algebra
@register_op_rule("aten.linear")
def _linear(tr, node, a):
    x, w = tr.dims(a["input"]), tr.dims(a["weight"])
    out = list(x[:-1])
    tr.A.unify(x, len(x) - 1, w, 1)
    tr.mark_contracted(w, 1)
    if len(w) == 2:
        out.append(w[0])
    if a.get("bias") is not None:
        b = tr.dims(a["bias"])
        tr.A.unify(w, 0, b, 0)
    return out


@register_op_rule("aten.addmm")
def _addmm(tr, node, a):
    m1, m2 = tr.dims(a["mat1"]), tr.dims(a["mat2"])
    tr.A.unify(m1, 1, m2, 0)
    tr.mark_contracted(m1, 1)
    tr.mark_contracted(m2, 0)
    out = [m1[0], m2[1]]
    return tr.elementwise(node, [a["self"]], base=out)


@register_op_rule("aten.mm", "aten.bmm", "aten.matmul")
def _matmul(tr, node, a):
    other = a["mat2"] if "mat2" in a else a["other"]
    x = tr.dims(a["self"])
    tr.mark_query_key(a["self"], other, x[-1])
    return tr.matmul(x, tr.dims(other), node)


@register_op_rule("aten.baddbmm")
def _baddbmm(tr, node, a):
    x = tr.dims(a["batch1"])
    tr.mark_query_key(a["batch1"], a["batch2"], x[-1])
    out = tr.matmul(x, tr.dims(a["batch2"]), node)
    return tr.elementwise(node, [a["self"]], base=out)


@register_op_rule("aten.einsum")
def _einsum(tr, node, a):
    eq = a["equation"].replace(" ", "")
    ops = [tr.dims(t) for t in a["tensors"]]
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if "..." in eq:
        raise tr.unfollowable(node, "einsum with '...' is not supported")
    if not rhs:
        counts = {}
        for t in terms:
            for ch in t:
                counts[ch] = counts.get(ch, 0) + 1
        rhs = "".join(sorted(ch for ch, n in counts.items() if n == 1))
    first: dict[str, tuple[list[Dim], int]] = {}
    for t, dims, x in zip(terms, ops, a["tensors"]):
        for i, ch in enumerate(t):
            if ch not in rhs:
                tr.mark_contracted(dims, i)
                for u, other in zip(terms, a["tensors"]):
                    if other is not x and ch in u:
                        tr.mark_query_key(x, other, dims[i])
            if ch in first:
                fx, fi = first[ch]
                tr.A.unify(fx, fi, dims, i)
            else:
                first[ch] = (dims, i)
    return tr.A.sanitize([first[ch][0][first[ch][1]] for ch in rhs])


def _conv(tr, node, a, transposed=False):
    x, w = tr.dims(a["input"]), tr.dims(a["weight"])
    groups = int(a.get("groups", 1) or 1)
    transposed = transposed or bool(a.get("transposed", False))
    nsp = len(w) - 2
    batched = len(x) == nsp + 2
    cdim = 1 if batched else 0
    shape = tr.shape(node)
    for k in range(2, len(w)):
        tr.A.fix_dim(w[k], "kernel")
    for d in x[len(x) - nsp:]:
        tr.A.fix_dim(d, "spatial")
    w_in, w_out = (0, 1) if transposed else (1, 0)
    tr.mark_contracted(w, w_in)
    cin, cout = x[cdim], None
    if groups == 1:
        tr.A.unify(x, cdim, w, w_in)
        cout = w[w_out] if not transposed else w[w_out]
    else:
        # weight (Cout, Cin/g, k...): its in-axis is shared by all groups, its out-axis holds every
        # output channel; transposed, (Cin, Cout/g, k...): the other way round
        if transposed:
            tr.A.unify(x, cdim, w, w_in)
            cin = x[cdim]
        cin_p = tr.A.collapse(cin) if not cin.plain else cin
        outer, parts = tr.C.factor(cin_p.cls, groups)
        if not transposed and tr.C.size[tr.C.find(parts[0])] > 1:
            # the same inner permutation in each group
            for p in parts[1:]:
                tr.C.union(parts[0], p)
            tr.C.union(parts[0], w[w_in].cls)
        n_out = shape[cdim]
        if n_out == groups:
            cout = Dim(n_out, outer)
        else:
            inner = [tr.C.new(n_out // groups) for _ in range(groups)]
            if transposed:  # the same inner permutation in each output group
                for p in inner:
                    tr.C.union(p, w[w_out].cls)
            flat = tr.C.new(n_out)
            tr.C.struct[flat] = Struct(outer, inner)
            cout = Dim(n_out, flat)
        if not transposed:
            tr.C.union(w[0].cls, cout.cls)
    if a.get("bias") is not None:
        tr.C.union(tr.dims(a["bias"])[0].cls, cout.cls)
    out = []
    if batched:
        out.append(x[0])
    out.append(cout)
    out.extend(tr.A.fresh(int(s), "spatial") for s in shape[len(out):])
    return tr.A.sanitize(out)


for _n in ("aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.convolution", "aten._convolution"):
    RULES[_n] = _conv
for _n in ("aten.conv_transpose1d", "aten.conv_transpose2d", "aten.conv_transpose3d"):
    RULES[_n] = lambda tr, node, a: _conv(tr, node, a, transposed=True)


# ---------------------------------------------------------------------------------------------
# normalisation
def _channel_params(tr, x, cdim, names, a):
    for n in names:
        t = a.get(n)
        if t is not None and tr.is_tensor(t):
            d = tr.dims(t)
            tr.A.unify(x, cdim, d, 0)


@register_op_rule("aten.batch_norm", "aten.native_batch_norm", "aten._native_batch_norm_legit",
                  "aten._native_batch_norm_legit_no_training", "aten._native_batch_norm_legit_functional",
                  "aten.cudnn_batch_norm", "aten.miopen_batch_norm", "aten.instance_norm")
def _batch_norm(tr, node, a):
    x = tr.dims(a["input"])
    cdim = 1 if len(x) > 1 else 0
    _channel_params(tr, x, cdim, ("weight", "bias", "running_mean", "running_var"), a)
    if tr.opname(node) in ("aten.batch_norm", "aten.instance_norm"):
        return x
    # tuple outputs: (out, save_mean, save_rstd, ...) – statistics indexed by channel
    n_out = len(node.meta["val"]) if isinstance(node.meta.get("val"), (tuple, list)) else 1
    res = [x]
    for v in list(node.meta["val"])[1:n_out]:
        if v is not None and hasattr(v, "shape") and len(v.shape) == 1 and v.shape[0] == x[cdim].size:
            res.append([x[cdim]])
        else:
            res.append(tr.fresh_like_val(v, "statistics"))
    return res


@register_op_rule("aten.layer_norm", "aten.native_layer_norm", "aten.rms_norm", "aten._fused_rms_norm")
def _layer_norm(tr, node, a):
    x = tr.dims(a["input"])
    k = len(a["normalized_shape"])
    for n in ("weight", "bias"):
        t = a.get(n)
        if t is not None and tr.is_tensor(t):
            d = tr.dims(t)
            for i in range(k):
                tr.A.unify(x, len(x) - k + i, d, i)
    if tr.opname(node) in ("aten.layer_norm", "aten.rms_norm"):
        return x
    vals = list(node.meta["val"])
    return [x] + [tr.fresh_like_val(v, "statistics") for v in vals[1:]]


@register_op_rule("aten._weight_norm", "aten._weight_norm_interface")
def _weight_norm(tr, node, a):
    # w = g * v / ||v|| (norm over every axis but ``dim``): w has v's axes, g (size 1 elsewhere)
    # shares axis ``dim``; the norm sums over the other axes, which permutations leave unchanged
    v, g = tr.dims(a["v"]), tr.dims(a["g"])
    d = _norm(int(a.get("dim", 0)), len(v))
    if len(g) == len(v):
        tr.A.unify(v, d, g, d)
    elif len(g) == 1:
        tr.A.unify(v, d, g, 0)
    if tr.opname(node) == "aten._weight_norm":
        return v
    return [v, g]


@register_op_rule("aten.group_norm", "aten.native_group_norm")
def _group_norm(tr, node, a):
    x = tr.dims(a["input"])
    groups = int(a.get("num_groups", a.get("group", 1)))
    c = x[1]
    if groups > 1:
        c = tr.A.collapse(c)
        tr.C.factor(c.cls, groups)
        x = [x[0], c, *x[2:]]
    _channel_params(tr, x, 1, ("weight", "bias"), a)
    if tr.opname(node) == "aten.group_norm":
        return x
    vals = list(node.meta["val"])
    return [x] + [tr.fresh_like_val(v, "statistics") for v in vals[1:]]


# ---------------------------------------------------------------------------------------------
# pooling and resampling: batch and channel axes kept, spatial axes new
def _spatial(tr, node, a, nsp=None):
    x = tr.dims(a.get("self", a.get("input")))
    shape = tr.shape_of_val(_first_val(node))
    if nsp is None:
        m = re.search(r"(\d)d", tr.opname(node))
        nsp = int(m.group(1)) if m else len(x) - 2
    keep = x[: len(x) - nsp]
    for d in x[len(x) - nsp:]:
        tr.A.fix_dim(d, "spatial")
    out = list(keep) + [tr.A.fresh(int(s), "spatial") for s in shape[len(keep):]]
    return out


def _first_val(node):
    v = node.meta.get("val")
    return v[0] if isinstance(v, (tuple, list)) else v


for _n in ("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
           "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d",
           "lp_pool1d", "lp_pool2d", "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
           "upsample_bilinear2d", "upsample_bicubic2d", "upsample_linear1d", "upsample_trilinear3d",
           "_upsample_nearest_exact1d", "_upsample_nearest_exact2d", "_upsample_nearest_exact3d",
           "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa", "reflection_pad1d", "reflection_pad2d",
           "reflection_pad3d", "replication_pad1d", "replication_pad2d", "replication_pad3d"):
    RULES[f"aten.{_n}"] = _spatial


@register_op_rule("aten.max_pool2d_with_indices", "aten.max_pool1d_with_indices", "aten.max_pool3d_with_indices",
                  "aten.adaptive_max_pool1d", "aten.adaptive_max_pool2d", "aten.adaptive_max_pool3d")
def _pool_indices(tr, node, a):
    out = _spatial(tr, node, a)
    return [out, out]


@register_op_rule("aten.upsample_nearest2d.vec", "aten.interpolate")
def _interp(tr, node, a):
    return _spatial(tr, node, a, nsp=len(tr.shape(node)) - 2)


# ---------------------------------------------------------------------------------------------
# reductions
def _reduce_dims(a, ndim):
    dim = a.get("dim", None)
    if dim is None:
        return list(range(ndim))
    if isinstance(dim, int):
        dim = [dim]
    dim = list(dim)
    if not dim:
        return list(range(ndim))
    return [_norm(int(d), ndim) for d in dim]


def _reduce(tr, node, a, track_index=False):
    x = tr.dims(a.get("self", a.get("input")))
    dims = _reduce_dims(a, len(x))
    keepdim = bool(a.get("keepdim", False))
    if track_index:
        for d in dims:
            tr.require_fixed(x[d], node, "returns positions along this axis")
    keep: list = []
    for i, d in enumerate(x):
        if i in dims:
            if keepdim:
                keep.append(tr.A.fresh(1))
        else:
            keep.append(i)
    out = tr.A.project(x, keep)
    vals = node.meta.get("val")
    if isinstance(vals, (tuple, list)):
        return [out for _ in vals]
    return out


for _n in ("mean", "sum", "amax", "amin", "var", "std", "var_mean", "std_mean", "prod", "logsumexp", "norm",
           "linalg_vector_norm", "all", "any", "nansum", "nanmean", "count_nonzero", "aminmax"):
    RULES[f"aten.{_n}"] = _reduce
def _max_like(tr, node, a):
    if "other" in a:
        return tr.elementwise(node, tr.tensor_args(node))
    op = tr.opname(node)
    if op in ("aten.argmax", "aten.argmin"):
        return _reduce(tr, node, a, track_index=True)
    # values are invariant; the indices output is positional, so it must not be used on features
    uses_indices = any(u.target is operator.getitem and u.args[1] == 1 and u.users for u in node.users)
    return _reduce(tr, node, a, track_index=uses_indices)


for _n in ("argmax", "argmin", "max", "min", "median", "nanmedian", "mode"):
    RULES[f"aten.{_n}"] = _max_like


@register_op_rule("aten.cumsum", "aten.cumprod", "aten.cummax", "aten.cummin", "aten.logcumsumexp")
def _cumulative(tr, node, a):
    x = tr.dims(a["self"])
    d = _norm(int(a["dim"]), len(x))
    tr.require_fixed(x[d], node, "accumulates along this axis in order")
    vals = node.meta.get("val")
    return [x, x] if isinstance(vals, (tuple, list)) else x


@register_op_rule("aten.sort", "aten.argsort", "aten.topk", "aten.kthvalue", "aten.msort")
def _sort(tr, node, a):
    x = tr.dims(a["self"])
    d = _norm(int(a.get("dim", -1)), len(x))
    tr.require_fixed(x[d], node, "orders values along this axis")
    shape = tr.shape_of_val(_first_val(node))
    out = [xd if i != d else tr.A.fresh(int(shape[i]), "sorted") for i, xd in enumerate(x)]
    if len(shape) < len(x):
        out = [o for i, o in enumerate(out) if i != d]
    vals = node.meta.get("val")
    return [out for _ in vals] if isinstance(vals, (tuple, list)) else out


@register_op_rule("aten.tril", "aten.triu", "aten.tril_", "aten.triu_")
def _tri(tr, node, a):
    x = tr.dims(a["self"])
    for d in x[-2:]:
        tr.require_fixed(d, node, "masks by position along this axis")
    return x


@register_op_rule("aten.roll", "aten.flip")
def _roll(tr, node, a):
    x = tr.dims(a["self"])
    dims = a.get("dims")
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        dims = list(range(len(x)))
    dims = [dims] if isinstance(dims, int) else dims
    for d in dims:
        tr.require_fixed(x[_norm(int(d), len(x))], node, "moves values by position along this axis")
    return x


@register_op_rule("aten.unfold")
def _unfold(tr, node, a):
    # sliding windows along one axis (HaloNet's neighbourhoods): the axis becomes (windows, size)
    x = tr.dims(a["self"])
    d = _norm(int(a["dimension"]), len(x))
    shape = tr.shape(node)
    tr.require_fixed(x[d], node, "takes sliding windows by position along this axis")
    out = list(x)
    out[d] = tr.A.fresh(int(shape[d]), "sliding windows")
    return tr.A.sanitize(out + [tr.A.fresh(int(shape[-1]), "sliding windows")])


@register_op_rule("aten.im2col")
def _im2col(tr, node, a):
    # nn.Unfold: (B, C, H, W) -> (B, C * kh * kw, L), column index c * kh * kw + k
    x = tr.dims(a["self"])
    shape = tr.shape(node)
    for d in x[-2:]:
        tr.require_fixed(d, node, "takes sliding patches by position along this axis")
    taps = int(shape[-2]) // x[-3].size
    expanded = list(x[:-2]) + [tr.A.fresh(taps, "kernel taps")]
    out = list(x[:-3]) + [tr.A.merge(expanded, [len(x) - 3, len(x) - 2]), tr.A.fresh(int(shape[-1]), "patches")]
    return tr.A.sanitize(out)


@register_op_rule("aten.col2im")
def _col2im(tr, node, a):
    # nn.Fold: (B, C * kh * kw, L) -> (B, C, H, W), summing overlapping taps by position
    x = tr.dims(a["self"])
    shape = tr.shape(node)
    channels = int(shape[-3])
    tr.require_fixed(x[-1], node, "places patches by position along this axis")
    c, taps = tr.A.split(x[-2], [channels, x[-2].size // channels])
    tr.A.fix_dim(taps, "kernel taps")  # tap k of a channel lands at position k of its patch
    return tr.A.sanitize(list(x[:-2]) + [c] + [tr.A.fresh(int(s), "folded positions") for s in shape[-2:]])


@register_op_rule("aten.repeat_interleave")
def _repeat_interleave(tr, node, a):
    x = tr.dims(a.get("self"))
    shape = tr.shape(node)
    reps, dim = a.get("repeats"), a.get("dim")
    if not x or not isinstance(reps, int) or dim is None:
        # repeats per index, or the flattened tensor: copies by position
        for d in x:
            tr.require_fixed(d, node, "repeats indices of this axis by position")
        return [tr.A.fresh(int(s), "repeated by position") for s in shape]
    d = _norm(int(dim), len(x))
    # index i * r + k holds element i: the axis is (features, r) flattened
    expanded = list(x)
    expanded.insert(d + 1, tr.A.fresh(reps, "repeated"))
    out = list(x)
    out[d] = tr.A.merge(expanded, [d, d + 1])
    return tr.A.sanitize(out)


@register_op_rule("aten.one_hot")
def _one_hot(tr, node, a):
    # integer indices to a new trailing axis of classes (positions)
    x = tr.dims(a["self"])
    return x + [tr.A.fresh(int(tr.shape(node)[-1]), "one-hot classes")]


@register_op_rule("aten.constant_pad_nd", "aten.pad")
def _pad(tr, node, a):
    x = tr.dims(a["self"] if "self" in a else a["input"])
    pad = list(a["pad"])
    shape = tr.shape(node)
    constant = a.get("mode", "constant") == "constant"
    out = list(x)
    for i in range(len(pad) // 2):
        d = len(x) - 1 - i
        lo, hi = int(pad[2 * i]), int(pad[2 * i + 1])
        if lo == 0 and hi == 0:
            continue
        if not constant:
            # reflect / replicate / circular copy values by position
            tr.require_fixed(out[d], node, "pads this axis by copying values by position")
            out[d] = tr.A.fresh(int(shape[d]), "padded")
            continue
        # constant padding is a concatenation of constant blocks around the (cropped) axis: the
        # kept indices stay the input's, the blocks are new fixed axes
        n = out[d].size
        start, stop = max(0, -lo), n - max(0, -hi)
        if (start, stop) != (0, n):
            out = _slice_range(tr, out, d, start, stop)
        parts = ([tr.C.new(lo, "constant padding")] if lo > 0 else []) + [tr.A.collapse(out[d]).cls] \
            + ([tr.C.new(hi, "constant padding")] if hi > 0 else [])
        out[d] = Dim(int(shape[d]), tr.C.concat(parts))
        out = tr.A.sanitize(out)
    return out


# ---------------------------------------------------------------------------------------------
# shape ops
@register_op_rule("aten.view", "aten.reshape", "aten._unsafe_view", "aten.view_copy", "aten.flatten",
                  "aten.unflatten", "aten.squeeze", "aten.unsqueeze", "aten.squeeze_copy", "aten.unsqueeze_copy",
                  "aten._reshape_alias", "aten.reshape_as", "aten.view_as", "aten.ravel")
def _reshape(tr, node, a):
    src = a.get("self", a.get("input"))
    return tr.reshape(tr.dims(src), tr.shape_of(src), tr.shape(node))


@register_op_rule("aten.permute", "aten.permute_copy")
def _permute(tr, node, a):
    x = tr.dims(a["self"])
    return [x[_norm(int(d), len(x))] for d in a["dims"]]


@register_op_rule("aten.transpose", "aten.swapaxes", "aten.swapdims", "aten.transpose_copy")
def _transpose(tr, node, a):
    x = list(tr.dims(a["self"]))
    i = _norm(int(a.get("dim0", a.get("axis0", 0))), len(x))
    j = _norm(int(a.get("dim1", a.get("axis1", 1))), len(x))
    x[i], x[j] = x[j], x[i]
    return x


@register_op_rule("aten.t", "aten.numpy_T", "aten.mT", "aten.adjoint")
def _t(tr, node, a):
    x = list(tr.dims(a["self"]))
    if len(x) >= 2:
        x[-1], x[-2] = x[-2], x[-1]
    return x


@register_op_rule("aten.movedim", "aten.moveaxis")
def _movedim(tr, node, a):
    x = list(tr.dims(a["self"]))
    src, dst = a["source"], a["destination"]
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    src = [_norm(s, len(x)) for s in src]
    dst = [_norm(d, len(x)) for d in dst]
    order = [i for i in range(len(x)) if i not in src]
    for d, s in sorted(zip(dst, src)):
        order.insert(d, s)
    return [x[i] for i in order]


@register_op_rule("aten.expand", "aten.expand_as", "aten.expand_copy", "aten.broadcast_to")
def _expand(tr, node, a):
    x = tr.dims(a["self"])
    shape = tr.shape(node)
    lead = len(shape) - len(x)
    out = []
    for i, s in enumerate(shape):
        if i < lead:
            out.append(tr.A.fresh(int(s)))
        else:
            d = x[i - lead]
            out.append(d if d.size == s else tr.A.fresh(int(s)))
    return out


@register_op_rule("aten.repeat", "aten.tile")
def _repeat(tr, node, a):
    x = tr.dims(a["self"])
    reps = list(a.get("repeats", a.get("dims")))
    shape = tr.shape(node)
    reps = [1] * (len(shape) - len(reps)) + reps  # tile: fewer repeats than axes repeat the last ones
    lead = len(shape) - len(x)
    out = [tr.A.fresh(int(s)) for s in shape[:lead]]
    for i, d in enumerate(x):
        r = int(reps[lead + i])
        if r == 1 or d.size == 1:
            out.append(d if r == 1 else tr.A.fresh(int(shape[lead + i])))
        else:
            dd = tr.A.collapse(d)
            flat = tr.C.concat([dd.cls] * r)
            tr.C.fix(flat, "tiled") if tr.C.is_fixed(dd.cls) else None
            out.append(Dim(int(shape[lead + i]), flat))
    return out


@register_op_rule("aten.cat", "aten.concat", "aten.concatenate")
def _cat(tr, node, a):
    ts = [t for t in a["tensors"] if tr.shape_of(t) != (0,)]
    dims_list = [tr.dims(t) for t in ts]
    shape = tr.shape(node)
    d = _norm(int(a.get("dim", 0)), len(shape))
    base = dims_list[0]
    for other in dims_list[1:]:
        for i in range(len(shape)):
            if i != d:
                tr.A.unify(base, i, other, i, {k: k for k in range(len(shape)) if k != d})
    parts = [tr.A.collapse(x[d]).cls for x in dims_list]
    out = list(base)
    out[d] = Dim(int(shape[d]), tr.C.concat(parts))
    return tr.A.sanitize(out)


@register_op_rule("aten.stack")
def _stack(tr, node, a):
    dims_list = [tr.dims(t) for t in a["tensors"]]
    shape = tr.shape(node)
    d = _norm(int(a.get("dim", 0)), len(shape))
    base = dims_list[0]
    for other in dims_list[1:]:
        for i in range(len(base)):
            tr.A.unify(base, i, other, i, {k: k for k in range(len(base))})
    out = list(base)
    out.insert(d, tr.A.fresh(int(shape[d]), "stacked"))
    return out


def _segments(tr, x, d, sizes):
    """Split axis d of x into consecutive segments of the given sizes; returns output tensors."""
    dim = x[d]
    outs = []
    if dim.plain:
        start = 0
        for s in sizes:
            c = tr.C.range_class(dim.cls, start, start + s)
            o = list(x)
            o[d] = Dim(s, c)
            outs.append(tr.A.sanitize(o))
            start += s
        return outs
    dd = tr.A.collapse(dim)
    x2 = list(x)
    x2[d] = dd
    return _segments(tr, tr.A.sanitize(x2), d, sizes)


@register_op_rule("aten.split", "aten.split_with_sizes", "aten.chunk", "aten.unsafe_split",
                  "aten.unsafe_chunk", "aten.tensor_split", "aten.split_copy", "aten.split_with_sizes_copy")
def _split(tr, node, a):
    x = tr.dims(a["self"])
    d = _norm(int(a.get("dim", 0)), len(x))
    sizes = [int(v.shape[d]) for v in node.meta["val"]]
    return _segments(tr, x, d, sizes)


@register_op_rule("aten.unbind", "aten.unbind_copy")
def _unbind(tr, node, a):
    x = tr.dims(a["self"])
    d = _norm(int(a.get("dim", 0)), len(x))
    n = x[d].size
    outs = []
    tr.A.fix_dim(x[d], "indexed")
    for i in range(n):
        keep = [k for k in range(len(x)) if k != d]
        outs.append(tr.A.project(x, keep, select={d: i}))
    return outs


@register_op_rule("aten.select", "aten.select_copy")
def _select(tr, node, a):
    x = tr.dims(a["self"])
    d = _norm(int(a["dim"]), len(x))
    idx = int(a["index"])
    idx = idx + x[d].size if idx < 0 else idx
    dim = x[d]
    if not dim.plain or not tr.C.is_fixed(dim.cls):
        if dim.plain and dim.size > 1:
            st = tr.C.get_struct(dim.cls)
            part = _part_at(tr.C, st, idx) if st is not None and st.outer is None else None
            if part is not None and (tr.C.size[tr.C.find(part)] == 1 or tr.C.is_fixed(part)):
                # a token picked from a concatenation of tokens (the class token among register
                # and patch tokens): the axis is kept in place (register tokens, which could be
                # permuted among themselves, are not aligned)
                tr.C.fix(dim.cls, "a position of it is picked (class token)")
            else:
                tr.C.range_class(dim.cls, idx, idx + 1)
                tr.require_fixed(dim, node, "picks one position of this axis")
    keep = [k for k in range(len(x)) if k != d]
    return tr.A.project(x, keep, select={d: idx})


def _part_at(C, st, idx: int) -> int:
    """The part of a concatenation structure holding position ``idx``."""
    pos = 0
    for p in st.parts:
        n = C.size[C.find(p)]
        if pos <= idx < pos + n:
            return p
        pos += n
    raise AssertionError("position outside its axis")


@register_op_rule("aten.slice", "aten.slice_copy", "aten.narrow", "aten.narrow_copy")
def _slice(tr, node, a):
    x = tr.dims(a["self"])
    d = _norm(int(a.get("dim", 0)), len(x))
    n = x[d].size
    if tr.opname(node).startswith("aten.narrow"):
        start, stop, step = int(a["start"]), int(a["start"]) + int(a["length"]), 1
    else:
        start = a.get("start")
        stop = a.get("end")
        step = int(a.get("step", 1) or 1)
        start = 0 if start is None else int(start)
        stop = n if stop is None else int(stop)
        start = max(0, start + n if start < 0 else start)
        stop = min(n, stop + n if stop < 0 else stop)
    if start == 0 and stop >= n and step == 1:
        return x
    shape = tr.shape(node)
    if step != 1:
        tr.require_fixed(x[d], node, "takes every k-th position of this axis")
        out = list(x)
        out[d] = tr.A.fresh(int(shape[d]), "strided slice")
        return out
    return _slice_range(tr, x, d, start, stop)


def _slice_range(tr, x, d, start, stop):
    dim = x[d]
    if not dim.plain:
        dim = tr.A.collapse(dim)
        x = list(x)
        x[d] = dim
        x = tr.A.sanitize(x)
    c = tr.C.range_class(dim.cls, start, stop)
    out = list(x)
    out[d] = Dim(stop - start, c)
    return tr.A.sanitize(out)


@register_op_rule("aten.index", "aten._unsafe_index")
def _index(tr, node, a):
    x = tr.dims(a["self"])
    idx = list(a["indices"])
    shape = tr.shape(node)
    used = [i for i, t in enumerate(idx) if t is not None]
    for i in used:
        tr.A.fix_dim(x[i], "indexed by position")
        for d in tr.dims(idx[i]):
            tr.A.fix_dim(d, "index")
    # advanced indices broadcast together; the result replaces the indexed axes
    idx_shapes = [tr.shape_of(idx[i]) for i in used]
    nb = max(len(s) for s in idx_shapes) if idx_shapes else 0
    rest = [i for i in range(len(x)) if i not in used]
    consecutive = used == list(range(used[0], used[-1] + 1)) if used else True
    new = [tr.A.fresh(int(s), "indexed") for s in shape]
    # map the non-indexed axes back to their input axes
    if consecutive and used:
        before = [i for i in rest if i < used[0]]
        after = [i for i in rest if i > used[-1]]
        out = [x[i] for i in before] + new[len(before): len(before) + nb] + [x[i] for i in after]
    else:
        out = new[:nb] + [x[i] for i in rest]
    return tr.A.sanitize(out)


@register_op_rule("aten.index_select")
def _index_select(tr, node, a):
    x = tr.dims(a["self"])
    d = _norm(int(a["dim"]), len(x))
    tr.A.fix_dim(x[d], "indexed by position")
    out = list(x)
    out[d] = tr.A.fresh(int(tr.shape(node)[d]), "indexed")
    return tr.A.sanitize(out)


@register_op_rule("aten.gather", "aten.take_along_dim")
def _gather(tr, node, a):
    x = tr.dims(a["self"])
    d = _norm(int(a.get("dim", 0)), len(x))
    tr.A.fix_dim(x[d], "indexed by position")
    ix = tr.dims(a["index"])
    out = []
    for i, s in enumerate(tr.shape(node)):
        if i == d or x[i].size != s:
            out.append(tr.A.fresh(int(s), "indexed"))
        else:
            tr.A.unify(x, i, ix, i)
            out.append(x[i])
    return tr.A.sanitize(out)


@register_op_rule("aten.embedding")
def _embedding(tr, node, a):
    w, ix = tr.dims(a["weight"]), tr.dims(a["indices"])
    tr.A.fix_dim(w[0], "embedding rows")
    return list(ix) + [w[1]]


@register_op_rule("aten.scaled_dot_product_attention")
def _sdpa(tr, node, a):
    q, k, v = tr.dims(a["query"]), tr.dims(a["key"]), tr.dims(a["value"])
    n = len(q)
    pm = {i: i for i in range(n)}
    for i in range(n - 2):
        tr.A.unify(q, i, k, i, pm)
        tr.A.unify(q, i, v, i, pm)
    tr.A.unify(q, n - 1, k, n - 1, pm)  # contraction of queries with keys
    tr.mark_query_key(a["query"], a["key"], q[-1])
    tr.A.unify(k, n - 2, v, n - 2, pm)  # keys and values share the key positions
    mask = a.get("attn_mask")
    if mask is not None and tr.is_tensor(mask):
        m = tr.dims(mask)
        scores = list(q[:-1]) + [k[-2]]
        off = len(scores) - len(m)
        for i, md in enumerate(m):
            tr.A.unify(scores, off + i, m, i, {p: p - off for p in range(off, len(scores))})
    # output: query's batch/head/position axes with value's feature axis (which depends on heads)
    out = list(q[:-1]) + [v[-1]]
    if not v[-1].plain:
        # re-key the value feature axis on the query's head axes (unified above)
        dep_pos = [next(i for i, d in enumerate(v) if d is x) for x in v[-1].deps]
        out[-1] = Dim(v[-1].size, deps=tuple(q[p] for p in dep_pos), table=dict(v[-1].table))
    return tr.A.sanitize(out)


_GATES = {"aten.lstm": 4, "aten.gru": 3, "aten.rnn_tanh": 1, "aten.rnn_relu": 1}


@register_op_rule(*_GATES)
def _recurrent(tr, node, a):
    """``aten.lstm/gru/rnn_*`` (input, hx, params, has_biases, num_layers, dropout, train,
    bidirectional, batch_first): each layer and direction has a hidden space; the gate rows of its
    weights are that space repeated once per gate, the recurrent weights read it back, and the
    output concatenates the last layer's directions."""
    x = tr.dims(a["input"])
    hx = a["hx"] if isinstance(a["hx"], (list, tuple)) else [a["hx"]]
    params = list(a["params"])
    layers, directions = int(a["num_layers"]), 2 if a["bidirectional"] else 1
    per = len(params) // (layers * directions)
    gates = _GATES[tr.opname(node)]
    if per not in (2, 4):  # a projection (LSTM proj_size) adds a fifth weight per layer
        raise tr.unfollowable(node, "recurrent layers with projections (proj_size) are not supported")
    hidden = tr.dims(params[1])[1].size
    feat = x[-1]
    k = 0
    states = []
    for _ in range(layers):
        outs = []
        for _ in range(directions):
            w_ih, w_hh = tr.dims(params[k]), tr.dims(params[k + 1])
            h = tr.A.fresh(hidden)
            rows = Dim(gates * hidden, tr.C.concat([h.cls] * gates)) if gates > 1 else h
            tr.activation_classes.add(rows.cls)  # the gates' pre-activations, inside the op
            tr.A.unify(w_ih, 0, [rows], 0)
            tr.A.unify(w_hh, 0, [rows], 0)
            tr.A.unify(w_hh, 1, [h], 0)
            tr.A.unify(w_ih, 1, [feat], 0)
            for b in params[k + 2:k + per]:
                tr.A.unify(tr.dims(b), 0, [rows], 0)
            outs.append(h)
            states.append(h)
            k += per
        feat = outs[0] if directions == 1 else Dim(directions * hidden, tr.C.concat([o.cls for o in outs]))
        tr.activation_classes.add(feat.cls)  # the layer's output, inside the op but for the last
    for t in hx:
        if tr.is_tensor(t) and tr.opname(t) not in _UNIFORM_OPS:
            # a given initial state is read in each layer's hidden order
            for h in states:
                tr.A.unify(tr.dims(t), 2, [h], 0)
    shapes = [tuple(int(s) for s in v.shape) for v in node.meta["val"]]
    out = list(x[:-1]) + [feat]
    final = []
    for shape in shapes[1:]:
        index = tr.A.fresh(shape[0], "layers and directions")
        last = Dim(hidden, deps=(index,), table={(i,): h.cls for i, h in enumerate(states)})
        final.append([index, tr.A.fresh(shape[1], "batch"), last])
    return [out] + final


@register_op_rule("aten.prelu", "aten._prelu_kernel")
def _prelu(tr, node, a):
    x, w = tr.dims(a["self"]), tr.dims(a["weight"])
    if len(x) > 1 and w and w[0].size == x[1].size:
        tr.A.unify(x, 1, w, 0)
    return x


@register_op_rule("aten.fill_", "aten.zero_")
def _fill_(tr, node, a):
    return tr.dims(a["self"])


# ops with no tensor output that carry no feature relation
IGNORED = {
    "aten._assert_tensor_metadata", "aten._assert_scalar", "aten.sym_constrain_range", "aten.sym_size",
    "aten.sym_numel", "aten.sym_stride", "aten._local_scalar_dense", "aten.item", "aten.sym_constrain_range_for_size",
    "aten._assert_async", "aten.detach_", "aten._functional_assert_async", "aten.set_grad_enabled",
    "aten.size", "aten.dim", "aten.is_nonzero",
}

PY_OPS = {operator.getitem}
