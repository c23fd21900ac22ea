"""Keep module *attributes* consistent with (re-shaped) parameter tensors.

Another part of the toolkit computes new parameter/buffer tensors whose hidden
widths differ from the original model (usually narrower, sometimes wider) and
writes them into a deep copy of the model with :func:`replace_tensor`.  After
that, attributes such as ``nn.Linear.in_features``, ``BatchNorm2d.num_features``,
timm ``Attention.num_heads/head_dim/scale`` or a Hugging Face ``config`` still
describe the *old* widths.  :func:`sync_module_attributes` walks the model and
re-derives every width-describing attribute from the current tensor shapes;
:func:`check_consistency` reports what is still inconsistent.

Typical use::

    fused = copy.deepcopy(model)
    old_shapes = {n: t.shape for n, t in fused.state_dict(keep_vars=True).items()}
    for name, tensor in new_tensors.items():
        replace_tensor(fused, name, tensor)
    sync_module_attributes(fused, num_heads=None, old_shapes=old_shapes)
    assert not check_consistency(fused)

Extending: a module type that stores widths and is not covered here can be
supported with::

    @register_attribute_sync(MyBlock)
    def _sync_my_block(module, path, ctx):
        module.hidden = module.fc1.out_features

Handlers run children-first (a module's descendants are already synced when its
handler runs).  ``register_attribute_sync`` also accepts the dotted
``"package.module.ClassName"`` of a class, which avoids importing the package.

Covered module types (subclasses included):

* torch.nn: Linear, Bilinear, Conv1d/2d/3d and ConvTranspose1d/2d/3d (depthwise
  convs keep ``groups == in_channels``; other grouped convs keep ``groups`` and
  are validated), BatchNorm*/SyncBatchNorm/InstanceNorm* (``_NormBase``),
  LayerNorm, RMSNorm, GroupNorm (``num_groups`` kept, validated), Embedding,
  EmbeddingBag, PReLU, MultiheadAttention.
* timm: Attention, AttentionRope, AttentionPoolLatent, VisionTransformer,
  ResNet, ConvNeXt, ClassifierHead, NormMlpClassifierHead,
  ClNormMlpClassifierHead, RmsNorm*/SimpleNorm*, EvoNorm2dS* (groups
  validated); the norm classes deriving from torch norms (LayerNorm,
  LayerNorm2d, BatchNormAct2d, GroupNorm, GroupNormAct, ...) via their base;
  width-free modules (PatchEmbed, LayerScale, Mlp, Block, BasicBlock, ...).
  ``feature_info[*]["num_chs"]`` of ViT/ResNet/ConvNeXt is updated too.
* transformers: ViT/DeiT attention (5.x ``ViTAttention``, 4.x
  ``ViTSelfAttention``/``ViTSdpaSelfAttention``), ``ResNetBackbone.num_features``,
  and ``config`` of model_type ``vit``/``deit``/``resnet``.

Attribute names in the installed library versions (timm 1.0.31, transformers
5.x) that this module relies on:

* ``timm.layers.Attention``: ``num_heads``, ``head_dim``, ``attn_dim`` (used in the
  output reshape) and ``scale``.  The fused path calls
  ``F.scaled_dot_product_attention`` without ``scale=`` (i.e. it uses
  ``q.size(-1) ** -0.5`` implicitly); the non-fused path multiplies by
  ``self.scale``, so ``scale`` must be kept in sync.
* transformers 5.x ``ViTAttention`` (``q_proj/k_proj/v_proj/o_proj``, there is no
  ``ViTSelfAttention`` any more): ``num_attention_heads``, ``head_dim`` and
  ``scaling``; ``scaling`` is passed explicitly to every attention backend, so a
  stale value silently changes results.  The 4.x layout (``ViTSelfAttention``
  with ``query/key/value``, ``attention_head_size``, ``all_head_size``) is also
  handled.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

__all__ = [
    "AttributeSyncError",
    "AttributeSyncWarning",
    "GroupsNotDivisibleError",
    "HeadsNotDivisibleError",
    "SyncContext",
    "UnknownModuleError",
    "UnknownTensorError",
    "check_consistency",
    "register_attribute_sync",
    "register_config_sync",
    "replace_tensor",
    "sync_module_attributes",
    "unregister_attribute_sync",
]


# --------------------------------------------------------------------------- errors


class UnknownTensorError(KeyError):
    """``replace_tensor`` was given a name that is no parameter or buffer of the model."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class AttributeSyncError(RuntimeError):
    """Base class of errors raised while synchronising module attributes."""


class UnknownModuleError(AttributeSyncError):
    """A module of an unknown type stores a width that changed; no handler can fix it."""

    def __init__(self, message: str, modules: list[tuple[str, type, list[str]]] | None = None):
        super().__init__(message)
        #: ``[(path, type, [attribute names]), ...]`` of every offending module
        self.modules = modules or []


class HeadsNotDivisibleError(AttributeSyncError, ValueError):
    """The new attention width is not divisible by the number of heads."""


class GroupsNotDivisibleError(AttributeSyncError, ValueError):
    """A grouped convolution / group norm width is not divisible by its groups."""


class AttributeSyncWarning(UserWarning):
    """Something could be synced only partially (e.g. a config that cannot express it)."""


# --------------------------------------------------------------------------- replace_tensor


def replace_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace the parameter or buffer at dotted ``name`` by ``tensor`` (any shape).

    * A parameter stays an ``nn.Parameter`` with the old ``requires_grad``.
    * A buffer stays a buffer with its persistent flag.
    * Tied parameters/buffers (the same tensor object registered at several
      places) are replaced everywhere, so tying survives.
    * ``tensor`` is used as given (dtype/device are not changed); it is detached.

    Raises :class:`UnknownTensorError` (a ``KeyError``) if ``name`` does not exist.
    """
    module_path, _, attr = name.rpartition(".")
    try:
        owner = model.get_submodule(module_path) if module_path else model
    except AttributeError:
        raise UnknownTensorError(f"model has no parameter or buffer named {name!r} (no module {module_path!r})") from None
    if attr in owner._parameters:
        kind = "param"
        old = owner._parameters[attr]
    elif attr in owner._buffers:
        kind = "buffer"
        old = owner._buffers[attr]
    else:
        raise UnknownTensorError(f"model has no parameter or buffer named {name!r}")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"replace_tensor({name!r}): expected a torch.Tensor, got {type(tensor).__name__}")

    data = tensor.detach()
    if kind == "param":
        requires_grad = old.requires_grad if old is not None else True
        if not (data.is_floating_point() or data.is_complex()):
            requires_grad = False
        new: torch.Tensor = nn.Parameter(data, requires_grad=requires_grad)
    else:
        new = data

    # every (module, attr) slot that holds the very same tensor object (tying)
    slots = [(owner, attr)]
    if old is not None:
        for mod in model.modules():
            store = mod._parameters if kind == "param" else mod._buffers
            for key, value in store.items():
                if value is old and not (mod is owner and key == attr):
                    slots.append((mod, key))
    for mod, key in slots:
        if kind == "param":
            setattr(mod, key, new)  # goes through register_parameter
        else:
            setattr(mod, key, new)  # buffer: _non_persistent_buffers_set is untouched


# --------------------------------------------------------------------------- registry


@dataclass
class _Entry:
    sync: Callable[[nn.Module, str, "SyncContext"], None] | None
    check: Callable[[nn.Module, str], list[str]] | None
    # integer attributes this handler keeps in sync; used to detect extra width
    # attributes of *subclasses* (None: trust the handler with every attribute)
    managed_attrs: frozenset[str] | None


_REGISTRY: dict[Any, _Entry] = {}
_CONFIG_REGISTRY: dict[str, tuple[Callable, Callable | None]] = {}


def register_attribute_sync(
    module_type: type | str,
    *,
    check: Callable[[nn.Module, str], list[str]] | None = None,
    managed_attrs: Iterable[str] | None = None,
) -> Callable:
    """Decorator registering ``fn(module, path, ctx)`` as attribute handler for ``module_type``.

    ``module_type`` is a class or its dotted name ``"pkg.mod.ClassName"``.  The
    handler applies to subclasses too (nearest registered class in the MRO
    wins).  ``fn`` must re-derive the module's width attributes from its current
    tensors / (already synced) children; ``ctx`` is a :class:`SyncContext`.
    ``check(module, path) -> list[str]`` optionally adds inconsistency reports to
    :func:`check_consistency`.  ``managed_attrs`` lists the int attributes the
    handler maintains: a subclass that adds *other* int attributes equal to an
    old width is then reported as :class:`UnknownModuleError`.

    Registering ``fn=None``-like no-op handlers (``lambda m, p, c: None``) marks a
    type as known (it stores no widths).
    """

    def deco(fn):
        _REGISTRY[module_type] = _Entry(fn, check, frozenset(managed_attrs) if managed_attrs is not None else None)
        return fn

    return deco


def unregister_attribute_sync(module_type: type | str) -> None:
    """Remove a handler registered with :func:`register_attribute_sync`."""
    _REGISTRY.pop(module_type, None)


def register_config_sync(model_type: str, *, check: Callable | None = None) -> Callable:
    """Decorator registering ``fn(owner, path, config, ctx)`` for HF configs of ``model_type``.

    ``owner`` is the shallowest module holding the config (``module.config``).
    """

    def deco(fn):
        _CONFIG_REGISTRY[model_type] = (fn, check)
        return fn

    return deco


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _lookup(cls: type) -> tuple[_Entry | None, type | None]:
    for klass in cls.__mro__:
        if klass is nn.Module or klass is object:
            break
        entry = _REGISTRY.get(klass)
        if entry is None:
            entry = _REGISTRY.get(_qualname(klass))
        if entry is not None:
            return entry, klass
    return None, None


def _noop(module, path, ctx) -> None:
    return None


# --------------------------------------------------------------------------- context


@dataclass
class SyncContext:
    """State shared by the handlers of one :func:`sync_module_attributes` call."""

    model: nn.Module
    num_heads: Mapping[str, int] = field(default_factory=dict)
    old_shapes: Mapping[str, torch.Size] | None = None
    warnings: list[str] = field(default_factory=list)
    used_heads: set[str] = field(default_factory=set)

    def heads(self, path: str, default: int) -> int:
        """New number of heads of the attention module at ``path`` (``default``: keep)."""
        if path in self.num_heads:
            self.used_heads.add(path)
            value = self.num_heads[path]
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"num_heads[{path!r}] must be a positive int, got {value!r}")
            return value
        return int(default)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        warnings.warn(message, AttributeSyncWarning, stacklevel=3)

    def old_shape(self, path: str, tensor_name: str) -> torch.Size | None:
        if self.old_shapes is None:
            return None
        return self.old_shapes.get(_join(path, tensor_name))


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _divide(width: int, heads: int, path: str, what: str = "attention width") -> int:
    if heads <= 0 or width % heads:
        raise HeadsNotDivisibleError(
            f"{path}: {what} {width} is not divisible by num_heads={heads}; pass "
            f"num_heads={{{path!r}: h}} with h dividing {width}"
        )
    return width // heads


def _default_scale(old_scale: Any, old_head_dim: Any, new_head_dim: int, path: str, ctx: SyncContext, attr: str):
    """New softmax scale: head_dim**-0.5 unless the old one was custom (then kept)."""
    if old_scale is None:
        return None
    try:
        was_default = math.isclose(float(old_scale), float(old_head_dim) ** -0.5, rel_tol=1e-6)
    except (TypeError, ValueError, ZeroDivisionError):
        was_default = False
    if was_default or old_head_dim == new_head_dim:
        return float(new_head_dim) ** -0.5 if was_default else old_scale
    ctx.warn(f"{path}: {attr}={old_scale} is not head_dim**-0.5 (head_dim was {old_head_dim}); kept unchanged")
    return old_scale


# --------------------------------------------------------------------------- width helpers


def _is_tensor(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and not isinstance(t, nn.parameter.UninitializedTensorMixin)


def _own_out_width(m: nn.Module) -> int | None:
    """Output width of a single leaf-ish module (attributes assumed synced)."""
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, _ConvNd):
        return m.out_channels
    if isinstance(m, _NormBase):
        return m.num_features
    if isinstance(m, nn.GroupNorm):
        return m.num_channels
    if isinstance(m, nn.Embedding):
        return m.embedding_dim
    for name in ("weight", "gamma"):
        t = m._parameters.get(name)
        if t is None:
            t = m._buffers.get(name)
        if _is_tensor(t) and t.dim() == 1:
            return int(t.shape[0])
    return None


def _out_width(module: nn.Module) -> int | None:
    """Output width of ``module``: width of the last width-bearing submodule (registration order)."""
    last = None
    for m in module.modules():
        w = _own_out_width(m)
        if w is not None:
            last = w
    return last


def _feature_width(root: nn.Module, path: str) -> int | None:
    """Channels produced by the submodule at ``path`` (a parameter-free module such as an
    activation inherits the width of the preceding sibling)."""
    try:
        mod = root.get_submodule(path)
    except AttributeError:
        return None
    w = _out_width(mod)
    if w is not None:
        return w
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    last = None
    for child_name, child in parent.named_children():
        if child_name == name:
            break
        cw = _out_width(child)
        if cw is not None:
            last = cw
    return last


def _sync_feature_info(m: nn.Module, override: Callable[[dict], int | None] | None = None) -> None:
    info = getattr(m, "feature_info", None)
    if not isinstance(info, list):
        return
    for entry in info:
        if isinstance(entry, dict) and "num_chs" in entry and "module" in entry:
            w = override(entry) if override is not None else None
            if w is None:
                w = _feature_width(m, entry["module"])
            if w is not None:
                entry["num_chs"] = int(w)


def _check_feature_info(m: nn.Module, path: str) -> list[str]:
    out = []
    info = getattr(m, "feature_info", None)
    if not isinstance(info, list):
        return out
    for entry in info:
        if isinstance(entry, dict) and "num_chs" in entry and "module" in entry:
            w = _feature_width(m, entry["module"])
            if w is not None and w != entry["num_chs"]:
                out.append(f"{path or '<root>'}: feature_info[{entry['module']!r}].num_chs={entry['num_chs']} but module outputs {w}")
    return out


def _ref(path: str) -> str:
    return path or "<root>"


# --------------------------------------------------------------------------- torch.nn handlers


def _sync_linear(m: nn.Linear, path: str, ctx: SyncContext) -> None:
    if not _is_tensor(m.weight):
        return
    m.out_features, m.in_features = int(m.weight.shape[0]), int(m.weight.shape[1])


def _check_linear(m: nn.Linear, path: str) -> list[str]:
    out = []
    if not _is_tensor(m.weight):
        return out
    if tuple(m.weight.shape) != (m.out_features, m.in_features):
        out.append(f"{_ref(path)}: weight {tuple(m.weight.shape)} but (out_features, in_features)=({m.out_features}, {m.in_features})")
    if m.bias is not None and tuple(m.bias.shape) != (m.out_features,):
        out.append(f"{_ref(path)}: bias {tuple(m.bias.shape)} but out_features={m.out_features}")
    return out


register_attribute_sync(nn.Linear, check=_check_linear, managed_attrs={"in_features", "out_features"})(_sync_linear)


def _sync_bilinear(m: nn.Bilinear, path: str, ctx: SyncContext) -> None:
    m.out_features, m.in1_features, m.in2_features = (int(s) for s in m.weight.shape)


def _check_bilinear(m: nn.Bilinear, path: str) -> list[str]:
    if tuple(m.weight.shape) != (m.out_features, m.in1_features, m.in2_features):
        return [f"{_ref(path)}: weight {tuple(m.weight.shape)} but (out, in1, in2)=({m.out_features}, {m.in1_features}, {m.in2_features})"]
    return []


register_attribute_sync(nn.Bilinear, check=_check_bilinear, managed_attrs={"in1_features", "in2_features", "out_features"})(_sync_bilinear)


def _sync_conv(m: _ConvNd, path: str, ctx: SyncContext) -> None:
    w = m.weight
    if not _is_tensor(w):
        return
    transposed = isinstance(m, _ConvTransposeNd) or getattr(m, "transposed", False)
    old_in, old_out, groups = m.in_channels, m.out_channels, m.groups
    depthwise = groups > 1 and groups == old_in
    if not transposed:
        new_out = int(w.shape[0])
        if depthwise:
            if w.shape[1] != 1:
                raise GroupsNotDivisibleError(
                    f"{_ref(path)}: depthwise conv (groups == in_channels == {old_in}) got weight {tuple(w.shape)}; "
                    f"expected shape[1] == 1"
                )
            mult = old_out // groups
            if mult <= 0 or new_out % mult:
                raise GroupsNotDivisibleError(
                    f"{_ref(path)}: depthwise conv with channel multiplier {mult} cannot have out_channels={new_out}"
                )
            new_groups = new_out // mult
            new_in = new_groups
        else:
            new_groups = groups
            new_in = int(w.shape[1]) * groups
        if new_out % new_groups:
            raise GroupsNotDivisibleError(f"{_ref(path)}: out_channels={new_out} is not divisible by groups={new_groups}")
    else:  # weight: (in, out / groups, *k)
        new_in = int(w.shape[0])
        new_groups = new_in if depthwise else groups
        new_out = int(w.shape[1]) * new_groups
        if new_in % new_groups:
            raise GroupsNotDivisibleError(f"{_ref(path)}: in_channels={new_in} is not divisible by groups={new_groups}")
    m.in_channels, m.out_channels, m.groups = new_in, new_out, new_groups


def _check_conv(m: _ConvNd, path: str) -> list[str]:
    out = []
    w = m.weight
    if not _is_tensor(w):
        return out
    transposed = isinstance(m, _ConvTransposeNd) or getattr(m, "transposed", False)
    if m.in_channels % m.groups or m.out_channels % m.groups:
        out.append(f"{_ref(path)}: in_channels={m.in_channels}/out_channels={m.out_channels} not divisible by groups={m.groups}")
        return out
    expected = (m.in_channels, m.out_channels // m.groups) if transposed else (m.out_channels, m.in_channels // m.groups)
    if tuple(w.shape[:2]) != expected:
        out.append(f"{_ref(path)}: weight {tuple(w.shape)} but in_channels={m.in_channels}, out_channels={m.out_channels}, groups={m.groups}")
    if m.bias is not None and tuple(m.bias.shape) != (m.out_channels,):
        out.append(f"{_ref(path)}: bias {tuple(m.bias.shape)} but out_channels={m.out_channels}")
    return out


register_attribute_sync(_ConvNd, check=_check_conv, managed_attrs={"in_channels", "out_channels", "groups"})(_sync_conv)


def _sync_norm_base(m: _NormBase, path: str, ctx: SyncContext) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(m, name, None)
        if _is_tensor(t) and t.dim() >= 1:
            m.num_features = int(t.shape[0])
            return


def _check_norm_base(m: _NormBase, path: str) -> list[str]:
    out = []
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(m, name, None)
        if _is_tensor(t) and t.dim() >= 1 and tuple(t.shape) != (m.num_features,):
            out.append(f"{_ref(path)}: {name} {tuple(t.shape)} but num_features={m.num_features}")
    return out


register_attribute_sync(_NormBase, check=_check_norm_base, managed_attrs={"num_features"})(_sync_norm_base)


def _sync_normalized_shape(m: nn.Module, path: str, ctx: SyncContext) -> None:
    for name in ("weight", "bias"):
        t = getattr(m, name, None)
        if _is_tensor(t):
            m.normalized_shape = tuple(int(s) for s in t.shape)
            return
    # no affine tensors: the width cannot be derived from this module alone


def _check_normalized_shape(m: nn.Module, path: str) -> list[str]:
    out = []
    for name in ("weight", "bias"):
        t = getattr(m, name, None)
        if _is_tensor(t) and tuple(t.shape) != tuple(m.normalized_shape):
            out.append(f"{_ref(path)}: {name} {tuple(t.shape)} but normalized_shape={tuple(m.normalized_shape)}")
    return out


register_attribute_sync(nn.LayerNorm, check=_check_normalized_shape, managed_attrs=set())(_sync_normalized_shape)
if hasattr(nn, "RMSNorm"):
    register_attribute_sync(nn.RMSNorm, check=_check_normalized_shape, managed_attrs=set())(_sync_normalized_shape)
for _name in ("RmsNorm", "RmsNorm2d", "RmsNormFp32", "RmsNorm2dFp32", "SimpleNorm", "SimpleNorm2d", "SimpleNormFp32", "SimpleNorm2dFp32"):
    register_attribute_sync(f"timm.layers.norm.{_name}", check=_check_normalized_shape, managed_attrs=set())(_sync_normalized_shape)


def _sync_group_norm(m: nn.GroupNorm, path: str, ctx: SyncContext) -> None:
    t = m.weight if _is_tensor(m.weight) else m.bias
    if not _is_tensor(t):
        return
    c = int(t.shape[0])
    if c % m.num_groups:
        raise GroupsNotDivisibleError(f"{_ref(path)}: num_channels={c} is not divisible by num_groups={m.num_groups}")
    m.num_channels = c


def _check_group_norm(m: nn.GroupNorm, path: str) -> list[str]:
    out = []
    if m.num_channels % m.num_groups:
        out.append(f"{_ref(path)}: num_channels={m.num_channels} not divisible by num_groups={m.num_groups}")
    for name in ("weight", "bias"):
        t = getattr(m, name, None)
        if _is_tensor(t) and tuple(t.shape) != (m.num_channels,):
            out.append(f"{_ref(path)}: {name} {tuple(t.shape)} but num_channels={m.num_channels}")
    return out


register_attribute_sync(nn.GroupNorm, check=_check_group_norm, managed_attrs={"num_groups", "num_channels"})(_sync_group_norm)


def _sync_embedding(m: nn.Embedding, path: str, ctx: SyncContext) -> None:
    m.num_embeddings, m.embedding_dim = int(m.weight.shape[0]), int(m.weight.shape[1])
    if m.padding_idx is not None and not (0 <= m.padding_idx < m.num_embeddings):
        raise ValueError(f"{_ref(path)}: padding_idx={m.padding_idx} out of range for num_embeddings={m.num_embeddings}")


def _check_embedding(m: nn.Embedding, path: str) -> list[str]:
    if tuple(m.weight.shape) != (m.num_embeddings, m.embedding_dim):
        return [f"{_ref(path)}: weight {tuple(m.weight.shape)} but (num_embeddings, embedding_dim)=({m.num_embeddings}, {m.embedding_dim})"]
    return []


register_attribute_sync(nn.Embedding, check=_check_embedding, managed_attrs={"num_embeddings", "embedding_dim", "padding_idx"})(_sync_embedding)
register_attribute_sync(nn.EmbeddingBag, check=_check_embedding, managed_attrs={"num_embeddings", "embedding_dim", "padding_idx"})(_sync_embedding)


def _sync_prelu(m: nn.PReLU, path: str, ctx: SyncContext) -> None:
    m.num_parameters = int(m.weight.numel())


register_attribute_sync(nn.PReLU, check=lambda m, p: [] if m.weight.numel() == m.num_parameters else [f"{_ref(p)}: weight has {m.weight.numel()} elements but num_parameters={m.num_parameters}"], managed_attrs={"num_parameters"})(_sync_prelu)


def _mha_dims(m: nn.MultiheadAttention) -> tuple[int, int, int, int]:
    """(embed_dim, projected q width, kdim, vdim) from the tensors."""
    if m.in_proj_weight is not None:
        e = int(m.in_proj_weight.shape[1])
        return e, int(m.in_proj_weight.shape[0]) // 3, e, e
    e = int(m.q_proj_weight.shape[1])
    return e, int(m.q_proj_weight.shape[0]), int(m.k_proj_weight.shape[1]), int(m.v_proj_weight.shape[1])


def _sync_mha(m: nn.MultiheadAttention, path: str, ctx: SyncContext) -> None:
    e, q_width, kdim, vdim = _mha_dims(m)
    if q_width != e:
        raise AttributeSyncError(
            f"{_ref(path)}: nn.MultiheadAttention needs the projected q/k/v width ({q_width}) to equal embed_dim ({e})"
        )
    heads = ctx.heads(path, m.num_heads)
    head_dim = _divide(e, heads, _ref(path), "embed_dim")
    m.embed_dim, m.kdim, m.vdim, m.num_heads, m.head_dim = e, kdim, vdim, heads, head_dim


def _check_mha(m: nn.MultiheadAttention, path: str) -> list[str]:
    out = []
    e, q_width, kdim, vdim = _mha_dims(m)
    if (m.embed_dim, m.kdim, m.vdim) != (e, kdim, vdim) or q_width != e:
        out.append(f"{_ref(path)}: embed_dim/kdim/vdim=({m.embed_dim}, {m.kdim}, {m.vdim}) but projections imply ({e}, {kdim}, {vdim}), q width {q_width}")
    if m.num_heads * m.head_dim != m.embed_dim:
        out.append(f"{_ref(path)}: num_heads*head_dim={m.num_heads * m.head_dim} but embed_dim={m.embed_dim}")
    return out


register_attribute_sync(nn.MultiheadAttention, check=_check_mha, managed_attrs={"embed_dim", "kdim", "vdim", "num_heads", "head_dim"})(_sync_mha)


# --------------------------------------------------------------------------- timm handlers


def _linear_out(m: Any) -> int | None:
    if isinstance(m, nn.Linear):
        return int(m.weight.shape[0])
    if isinstance(m, _ConvNd):
        return int(m.out_channels)
    return None


def _sync_timm_attention(m: nn.Module, path: str, ctx: SyncContext) -> None:
    """timm.layers.Attention / AttentionRope (fused ``qkv`` or ``q_proj/k_proj/v_proj``)."""
    qkv = getattr(m, "qkv", None)
    if isinstance(qkv, nn.Linear):
        total = int(qkv.weight.shape[0])
        if total % 3:
            raise HeadsNotDivisibleError(f"{_ref(path)}: qkv.out_features={total} is not divisible by 3")
        attn_dim = total // 3
        kv_dim = attn_dim
    else:
        attn_dim = _linear_out(getattr(m, "q_proj", None))
        kv_dim = _linear_out(getattr(m, "k_proj", None))
        if attn_dim is None:
            return
        kv_dim = kv_dim if kv_dim is not None else attn_dim
    old_heads, old_head_dim = m.num_heads, m.head_dim
    heads = ctx.heads(path, old_heads)
    head_dim = _divide(attn_dim, heads, _ref(path))
    m.num_heads, m.head_dim = heads, head_dim
    if hasattr(m, "attn_dim"):
        m.attn_dim = attn_dim
    if hasattr(m, "num_kv_heads"):
        kv_heads = _divide(kv_dim, head_dim, _ref(path), "k/v width (in units of head_dim)")
        if heads % kv_heads:
            raise HeadsNotDivisibleError(f"{_ref(path)}: num_heads={heads} not divisible by num_kv_heads={kv_heads}")
        m.num_kv_heads = kv_heads
        if hasattr(m, "num_kv_groups"):
            m.num_kv_groups = heads // kv_heads
        if hasattr(m, "kv_dim"):
            m.kv_dim = kv_dim
    if hasattr(m, "scale"):
        m.scale = _default_scale(m.scale, old_head_dim, head_dim, _ref(path), ctx, "scale")


def _check_timm_attention(m: nn.Module, path: str) -> list[str]:
    out = []
    p = _ref(path)
    attn_dim = getattr(m, "attn_dim", m.num_heads * m.head_dim)
    if m.num_heads * m.head_dim != attn_dim:
        out.append(f"{p}: num_heads*head_dim={m.num_heads * m.head_dim} but attn_dim={attn_dim}")
    qkv = getattr(m, "qkv", None)
    if isinstance(qkv, nn.Linear):
        if qkv.out_features % 3 or m.num_heads * m.head_dim != qkv.out_features // 3:
            out.append(f"{p}: num_heads*head_dim={m.num_heads * m.head_dim} but qkv.out_features/3={qkv.out_features / 3:g}")
    else:
        q = getattr(m, "q_proj", None)
        if isinstance(q, nn.Linear) and q.out_features != m.num_heads * m.head_dim:
            out.append(f"{p}: num_heads*head_dim={m.num_heads * m.head_dim} but q_proj.out_features={q.out_features}")
        k = getattr(m, "k_proj", None)
        if isinstance(k, nn.Linear) and hasattr(m, "num_kv_heads") and k.out_features != m.num_kv_heads * m.head_dim:
            out.append(f"{p}: num_kv_heads*head_dim={m.num_kv_heads * m.head_dim} but k_proj.out_features={k.out_features}")
    proj = getattr(m, "proj", None)
    if isinstance(proj, nn.Linear) and proj.in_features != attn_dim:
        out.append(f"{p}: attn_dim={attn_dim} but proj.in_features={proj.in_features}")
    gate = getattr(m, "gate", None)
    if isinstance(gate, nn.Linear) and gate.out_features != attn_dim:
        out.append(f"{p}: attn_dim={attn_dim} but gate.out_features={gate.out_features}")
    for name in ("q_norm", "k_norm"):
        w = getattr(getattr(m, name, None), "weight", None)
        if _is_tensor(w) and w.shape[-1] != m.head_dim:
            out.append(f"{p}: head_dim={m.head_dim} but {name}.weight {tuple(w.shape)}")
    w = getattr(getattr(m, "norm", None), "weight", None)
    if _is_tensor(w) and w.shape[-1] != attn_dim:
        out.append(f"{p}: attn_dim={attn_dim} but norm.weight {tuple(w.shape)}")
    scale = getattr(m, "scale", None)
    if isinstance(scale, float) and m.head_dim > 0 and not math.isclose(scale, m.head_dim ** -0.5, rel_tol=1e-6):
        out.append(f"{p}: scale={scale:g} but head_dim**-0.5={m.head_dim ** -0.5:g}")
    return out


register_attribute_sync("timm.layers.attention.Attention", check=_check_timm_attention)(_sync_timm_attention)
register_attribute_sync("timm.layers.attention.AttentionRope", check=_check_timm_attention)(_sync_timm_attention)


def _sync_timm_attn_pool_latent(m: nn.Module, path: str, ctx: SyncContext) -> None:
    total = int(m.kv.weight.shape[0])
    if total % 2:
        raise HeadsNotDivisibleError(f"{_ref(path)}: kv.out_features={total} is not divisible by 2")
    embed_dim = total // 2
    old_head_dim = m.head_dim
    heads = ctx.heads(path, m.num_heads)
    head_dim = _divide(embed_dim, heads, _ref(path))
    m.num_heads, m.head_dim = heads, head_dim
    m.scale = _default_scale(m.scale, old_head_dim, head_dim, _ref(path), ctx, "scale")
    if _is_tensor(getattr(m, "latent", None)):
        m.latent_dim = int(m.latent.shape[-1])
        m.latent_len = int(m.latent.shape[1])
    proj_out = _linear_out(getattr(m, "proj", None))
    m.out_features = proj_out if proj_out is not None else embed_dim


def _check_timm_attn_pool_latent(m: nn.Module, path: str) -> list[str]:
    out = []
    p = _ref(path)
    if m.num_heads * m.head_dim * 2 != m.kv.out_features:
        out.append(f"{p}: num_heads*head_dim={m.num_heads * m.head_dim} but kv.out_features/2={m.kv.out_features / 2:g}")
    if m.kv.in_features != m.num_heads * m.head_dim:
        out.append(f"{p}: attention width {m.num_heads * m.head_dim} must equal input width kv.in_features={m.kv.in_features}")
    if not math.isclose(m.scale, m.head_dim ** -0.5, rel_tol=1e-6):
        out.append(f"{p}: scale={m.scale:g} but head_dim**-0.5={m.head_dim ** -0.5:g}")
    if _is_tensor(getattr(m, "latent", None)) and m.latent.shape[-1] != m.latent_dim:
        out.append(f"{p}: latent_dim={m.latent_dim} but latent {tuple(m.latent.shape)}")
    return out


register_attribute_sync("timm.layers.attention_pool.AttentionPoolLatent", check=_check_timm_attn_pool_latent)(_sync_timm_attn_pool_latent)


def _vit_embed_dim(m: nn.Module) -> int | None:
    for name in ("cls_token", "reg_token", "pos_embed"):
        t = getattr(m, name, None)
        if _is_tensor(t):
            return int(t.shape[-1])
    proj = getattr(getattr(m, "patch_embed", None), "proj", None)
    return _linear_out(proj)


def _sync_timm_vit(m: nn.Module, path: str, ctx: SyncContext) -> None:
    dim = _vit_embed_dim(m)
    if dim is None:
        return
    m.embed_dim = dim
    m.num_features = dim
    head = getattr(m, "head", None)
    if isinstance(head, nn.Linear):
        m.head_hidden_size = int(head.weight.shape[1])
    elif getattr(m, "attn_pool", None) is not None and hasattr(m.attn_pool, "out_features"):
        m.head_hidden_size = int(m.attn_pool.out_features)
    else:
        m.head_hidden_size = dim
    _sync_feature_info(m, lambda entry: dim if str(entry["module"]).startswith("blocks") else None)


def _check_timm_vit(m: nn.Module, path: str) -> list[str]:
    out = []
    p = _ref(path)
    dim = _vit_embed_dim(m)
    if dim is not None:
        if m.embed_dim != dim:
            out.append(f"{p}: embed_dim={m.embed_dim} but tokens/patch embedding have width {dim}")
        if m.num_features != dim:
            out.append(f"{p}: num_features={m.num_features} but embed width is {dim}")
    head = getattr(m, "head", None)
    if isinstance(head, nn.Linear) and head.in_features != m.head_hidden_size:
        out.append(f"{p}: head_hidden_size={m.head_hidden_size} but head.in_features={head.in_features}")
    for entry in getattr(m, "feature_info", None) or []:
        if isinstance(entry, dict) and str(entry.get("module", "")).startswith("blocks") and entry.get("num_chs") != m.embed_dim:
            out.append(f"{p}: feature_info[{entry['module']!r}].num_chs={entry.get('num_chs')} but embed_dim={m.embed_dim}")
    return out


register_attribute_sync("timm.models.vision_transformer.VisionTransformer", check=_check_timm_vit)(_sync_timm_vit)


def _feat_mult(m: nn.Module) -> int:
    gp = getattr(m, "global_pool", None)
    if gp is not None and hasattr(gp, "feat_mult"):
        try:
            return int(gp.feat_mult())
        except Exception:  # pragma: no cover - defensive
            return 1
    return 1


def _timm_resnet_num_features(m: nn.Module) -> int | None:
    stages = [c for n, c in m.named_children() if re.fullmatch(r"layer\d+", n)]
    if stages:
        w = _out_width(stages[-1])
        if w is not None:
            return w
    fc = getattr(m, "fc", None)
    if isinstance(fc, (nn.Linear, _ConvNd)):
        width = fc.in_features if isinstance(fc, nn.Linear) else fc.in_channels
        return width // _feat_mult(m)
    return None


def _sync_timm_resnet(m: nn.Module, path: str, ctx: SyncContext) -> None:
    nf = _timm_resnet_num_features(m)
    if nf is None:
        return
    m.num_features = nf
    if hasattr(m, "head_hidden_size"):
        m.head_hidden_size = nf * _feat_mult(m)
    _sync_feature_info(m)


def _check_timm_resnet(m: nn.Module, path: str) -> list[str]:
    out = []
    p = _ref(path)
    nf = _timm_resnet_num_features(m)
    if nf is not None and m.num_features != nf:
        out.append(f"{p}: num_features={m.num_features} but the last stage outputs {nf}")
    hh = getattr(m, "head_hidden_size", None)
    if hh is not None and hh != m.num_features * _feat_mult(m):
        out.append(f"{p}: head_hidden_size={hh} but num_features*feat_mult={m.num_features * _feat_mult(m)}")
    fc = getattr(m, "fc", None)
    if isinstance(fc, nn.Linear) and fc.in_features != m.num_features * _feat_mult(m):
        out.append(f"{p}: fc.in_features={fc.in_features} but num_features*feat_mult={m.num_features * _feat_mult(m)}")
    out.extend(_check_feature_info(m, path))
    return out


register_attribute_sync("timm.models.resnet.ResNet", check=_check_timm_resnet)(_sync_timm_resnet)


def _sync_timm_convnext(m: nn.Module, path: str, ctx: SyncContext) -> None:
    stages = getattr(m, "stages", None)
    nf = _out_width(stages[-1]) if isinstance(stages, nn.Sequential) and len(stages) else None
    if nf is None:
        return
    m.num_features = nf
    head_nf = getattr(getattr(m, "head", None), "num_features", None)
    m.head_hidden_size = head_nf if isinstance(head_nf, int) else nf
    _sync_feature_info(m)


def _check_timm_convnext(m: nn.Module, path: str) -> list[str]:
    out = []
    stages = getattr(m, "stages", None)
    nf = _out_width(stages[-1]) if isinstance(stages, nn.Sequential) and len(stages) else None
    if nf is not None and m.num_features != nf:
        out.append(f"{_ref(path)}: num_features={m.num_features} but the last stage outputs {nf}")
    head_nf = getattr(getattr(m, "head", None), "num_features", None)
    if isinstance(head_nf, int) and m.head_hidden_size != head_nf:
        out.append(f"{_ref(path)}: head_hidden_size={m.head_hidden_size} but head.num_features={head_nf}")
    out.extend(_check_feature_info(m, path))
    return out


register_attribute_sync("timm.models.convnext.ConvNeXt", check=_check_timm_convnext)(_sync_timm_convnext)


def _sync_timm_classifier_head(m: nn.Module, path: str, ctx: SyncContext) -> None:
    fc = getattr(m, "fc", None)
    fm = _feat_mult(m)
    if isinstance(fc, nn.Linear):
        width = int(fc.weight.shape[1])
    elif isinstance(fc, _ConvNd):
        width = fc.in_channels
    else:
        return
    if width % fm:
        raise AttributeSyncError(f"{_ref(path)}: classifier input width {width} not divisible by pooling feat_mult={fm}")
    m.in_features = width // fm
    m.num_features = width


def _check_timm_classifier_head(m: nn.Module, path: str) -> list[str]:
    fc = getattr(m, "fc", None)
    width = fc.in_features if isinstance(fc, nn.Linear) else fc.in_channels if isinstance(fc, _ConvNd) else None
    if width is not None and (m.num_features != width or m.in_features * _feat_mult(m) != width):
        return [f"{_ref(path)}: in_features={m.in_features}, num_features={m.num_features} but fc input width is {width}"]
    return []


register_attribute_sync("timm.layers.classifier.ClassifierHead", check=_check_timm_classifier_head)(_sync_timm_classifier_head)


def _sync_timm_norm_mlp_head(m: nn.Module, path: str, ctx: SyncContext) -> None:
    pre_fc = getattr(getattr(m, "pre_logits", None), "fc", None)
    fc = getattr(m, "fc", None)
    norm_w = getattr(getattr(m, "norm", None), "weight", None)
    if _is_tensor(norm_w):
        m.in_features = int(norm_w.shape[0])
    elif isinstance(pre_fc, nn.Linear):
        m.in_features = int(pre_fc.weight.shape[1])
    elif isinstance(fc, nn.Linear):
        m.in_features = int(fc.weight.shape[1])
    if isinstance(pre_fc, (nn.Linear, _ConvNd)):
        m.hidden_size = _linear_out(pre_fc)
        m.num_features = m.hidden_size
    else:
        m.num_features = m.in_features


def _check_timm_norm_mlp_head(m: nn.Module, path: str) -> list[str]:
    fc = getattr(m, "fc", None)
    if isinstance(fc, nn.Linear) and fc.in_features != m.num_features:
        return [f"{_ref(path)}: num_features={m.num_features} but fc.in_features={fc.in_features}"]
    return []


register_attribute_sync("timm.layers.classifier.NormMlpClassifierHead", check=_check_timm_norm_mlp_head)(_sync_timm_norm_mlp_head)
register_attribute_sync("timm.layers.classifier.ClNormMlpClassifierHead", check=_check_timm_norm_mlp_head)(_sync_timm_norm_mlp_head)


def _sync_timm_evonorm_s(m: nn.Module, path: str, ctx: SyncContext) -> None:
    c = int(m.weight.shape[0])
    if c % m.groups:
        raise GroupsNotDivisibleError(f"{_ref(path)}: {c} channels not divisible by groups={m.groups}")


for _name in ("EvoNorm2dS0", "EvoNorm2dS1", "EvoNorm2dS2"):
    register_attribute_sync(
        f"timm.layers.evo_norm.{_name}",
        check=lambda m, p: [f"{_ref(p)}: {m.weight.shape[0]} channels not divisible by groups={m.groups}"] if m.weight.shape[0] % m.groups else [],
    )(_sync_timm_evonorm_s)

# timm modules that store no width (their tensors alone define it)
for _qn in (
    "timm.layers.layer_scale.LayerScale",
    "timm.layers.layer_scale.LayerScale2d",
    "timm.layers.patch_embed.PatchEmbed",
    "timm.layers.mlp.Mlp",
    "timm.layers.mlp.GluMlp",
    "timm.layers.mlp.SwiGLU",
    "timm.layers.mlp.GatedMlp",
    "timm.layers.mlp.ConvMlp",
    "timm.layers.mlp.GlobalResponseNormMlp",
    "timm.layers.grn.GlobalResponseNorm",
    "timm.layers.evo_norm.EvoNorm2dB0",
    "timm.layers.evo_norm.EvoNorm2dB1",
    "timm.layers.evo_norm.EvoNorm2dB2",
    "timm.layers.filter_response_norm.FilterResponseNormAct2d",
    "timm.layers.filter_response_norm.FilterResponseNormTlu2d",
    "timm.layers.norm_act.FrozenBatchNormAct2d",
    "timm.layers.adaptive_avgmax_pool.SelectAdaptivePool2d",
    "timm.models.vision_transformer.Block",
    "timm.models.vision_transformer.ResPostBlock",
    "timm.models.resnet.BasicBlock",
    "timm.models.resnet.Bottleneck",
    "timm.models.convnext.ConvNeXtStage",
    "timm.models.convnext.ConvNeXtBlock",
    "torchvision.ops.misc.FrozenBatchNorm2d",
):
    register_attribute_sync(_qn)(_noop)


# --------------------------------------------------------------------------- transformers handlers


def _hf_qkv(m: nn.Module) -> tuple[Any, Any, Any]:
    def first(*names):
        for n in names:
            v = getattr(m, n, None)
            if v is not None:
                return v
        return None

    return first("q_proj", "query"), first("k_proj", "key"), first("v_proj", "value")


def _sync_hf_attention(m: nn.Module, path: str, ctx: SyncContext) -> None:
    """HF ViT-style attention: 5.x ``ViTAttention`` (head_dim, scaling) and 4.x
    ``ViTSelfAttention`` (attention_head_size, all_head_size[, scaling])."""
    q, k, v = _hf_qkv(m)
    if not isinstance(q, nn.Linear):
        return  # e.g. 4.x ViTAttention wrapper: its children carry the widths
    width = int(q.weight.shape[0])
    for name, proj in (("key", k), ("value", v)):
        if isinstance(proj, nn.Linear) and proj.weight.shape[0] != width:
            raise AttributeSyncError(
                f"{_ref(path)}: {name} projection width {proj.weight.shape[0]} differs from query width {width}; "
                f"HF ViT attention needs equal q/k/v widths"
            )
    old_head_dim = getattr(m, "head_dim", getattr(m, "attention_head_size", None))
    heads = ctx.heads(path, m.num_attention_heads)
    head_dim = _divide(width, heads, _ref(path))
    m.num_attention_heads = heads
    if hasattr(m, "head_dim"):
        m.head_dim = head_dim
    if hasattr(m, "attention_head_size"):
        m.attention_head_size = head_dim
    if hasattr(m, "all_head_size"):
        m.all_head_size = width
    if hasattr(m, "scaling"):
        m.scaling = _default_scale(m.scaling, old_head_dim, head_dim, _ref(path), ctx, "scaling")


def _check_hf_attention(m: nn.Module, path: str) -> list[str]:
    out = []
    p = _ref(path)
    q, k, v = _hf_qkv(m)
    if not isinstance(q, nn.Linear):
        return out
    head_dim = getattr(m, "head_dim", getattr(m, "attention_head_size", None))
    if head_dim is None:
        return out
    total = m.num_attention_heads * head_dim
    for name, proj in (("q", q), ("k", k), ("v", v)):
        if isinstance(proj, nn.Linear) and proj.out_features != total:
            out.append(f"{p}: num_attention_heads*head_dim={total} but {name} projection out_features={proj.out_features}")
    if hasattr(m, "all_head_size") and m.all_head_size != total:
        out.append(f"{p}: all_head_size={m.all_head_size} but num_attention_heads*attention_head_size={total}")
    scaling = getattr(m, "scaling", None)
    if isinstance(scaling, float) and not math.isclose(scaling, head_dim ** -0.5, rel_tol=1e-6):
        out.append(f"{p}: scaling={scaling:g} but head_dim**-0.5={head_dim ** -0.5:g}")
    return out


for _arch, _prefix in (("vit", "ViT"), ("deit", "DeiT")):
    _mod = f"transformers.models.{_arch}.modeling_{_arch}"
    for _name in ("Attention", "SelfAttention", "SdpaSelfAttention"):
        register_attribute_sync(f"{_mod}.{_prefix}{_name}", check=_check_hf_attention)(_sync_hf_attention)
    for _name in (
        "Layer", "MLP", "Embeddings", "PatchEmbeddings", "Model", "Pooler", "Encoder", "Intermediate", "Output",
        "SelfOutput", "ForImageClassification", "ForMaskedImageModeling", "ForImageClassificationWithTeacher",
    ):
        register_attribute_sync(f"{_mod}.{_prefix}{_name}")(_noop)

_HF_RESNET = "transformers.models.resnet.modeling_resnet"
for _name in (
    "ResNetConvLayer", "ResNetEmbeddings", "ResNetShortCut", "ResNetBasicLayer", "ResNetBottleNeckLayer",
    "ResNetStage", "ResNetEncoder", "ResNetModel", "ResNetForImageClassification",
):
    register_attribute_sync(f"{_HF_RESNET}.{_name}")(_noop)


def _hf_resnet_widths(m: nn.Module) -> tuple[int | None, list[int]]:
    emb = None
    stages: list[int] = []
    for mod in m.modules():
        name = type(mod).__name__
        if name == "ResNetEmbeddings" and emb is None:
            emb = _out_width(mod)
        elif name == "ResNetStage":
            w = _out_width(mod)
            if w is not None:
                stages.append(w)
    return emb, stages


def _sync_hf_resnet_backbone(m: nn.Module, path: str, ctx: SyncContext) -> None:
    emb, stages = _hf_resnet_widths(m)
    if emb is not None and stages:
        m.num_features = [emb] + stages


register_attribute_sync(
    f"{_HF_RESNET}.ResNetBackbone",
    check=lambda m, p: [] if list(m.num_features) == [w for w in [_hf_resnet_widths(m)[0], *_hf_resnet_widths(m)[1]]] else [f"{_ref(p)}: num_features={list(m.num_features)} but stages output {[_hf_resnet_widths(m)[0], *_hf_resnet_widths(m)[1]]}"],
)(_sync_hf_resnet_backbone)


# ---- configs


def _set_config(config: Any, name: str, value: Any) -> None:
    if getattr(config, name, object()) != value:
        setattr(config, name, value)


def _hf_vit_summary(owner: nn.Module) -> dict[str, Any]:
    hidden = None
    attn: list[tuple[int, int]] = []
    inter: list[int] = []
    pooler = None
    for mod in owner.modules():
        name = type(mod).__name__
        if hidden is None and name.endswith("Embeddings") and _is_tensor(getattr(mod, "cls_token", None)):
            hidden = int(mod.cls_token.shape[-1])
        entry = _lookup(type(mod))[0]
        if entry is not None and entry.sync is _sync_hf_attention:
            q, _, _ = _hf_qkv(mod)
            if isinstance(q, nn.Linear):
                hd = getattr(mod, "head_dim", getattr(mod, "attention_head_size", None))
                attn.append((mod.num_attention_heads, hd))
        if name.endswith("MLP") and isinstance(getattr(mod, "fc1", None), nn.Linear):
            inter.append(mod.fc1.out_features)
        elif name.endswith("Intermediate") and isinstance(getattr(mod, "dense", None), nn.Linear):
            inter.append(mod.dense.out_features)
        elif name.endswith("Pooler") and isinstance(getattr(mod, "dense", None), nn.Linear):
            pooler = mod.dense.out_features
    return {"hidden": hidden, "attn": attn, "inter": inter, "pooler": pooler}


def _sync_hf_vit_config(owner: nn.Module, path: str, config: Any, ctx: SyncContext) -> None:
    s = _hf_vit_summary(owner)
    old_hidden = getattr(config, "hidden_size", None)
    if s["hidden"] is not None:
        _set_config(config, "hidden_size", int(s["hidden"]))
    hidden = config.hidden_size
    if s["inter"]:
        if len(set(s["inter"])) > 1:
            ctx.warn(f"{_ref(path)}.config: per-layer intermediate sizes {s['inter']} cannot be expressed by "
                     f"intermediate_size; set to the maximum {max(s['inter'])}")
        _set_config(config, "intermediate_size", int(max(s["inter"])))
    if s["attn"]:
        if len(set(s["attn"])) > 1:
            ctx.warn(f"{_ref(path)}.config: per-layer (num_heads, head_dim) {s['attn']} cannot be expressed by the "
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


def _check_hf_vit_config(owner: nn.Module, path: str, config: Any) -> list[str]:
    out = []
    p = f"{_ref(path)}.config"
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


register_config_sync("vit", check=_check_hf_vit_config)(_sync_hf_vit_config)
register_config_sync("deit", check=_check_hf_vit_config)(_sync_hf_vit_config)


def _sync_hf_resnet_config(owner: nn.Module, path: str, config: Any, ctx: SyncContext) -> None:
    emb, stages = _hf_resnet_widths(owner)
    if emb is not None:
        _set_config(config, "embedding_size", int(emb))
    if stages:
        if len(stages) != len(config.hidden_sizes):
            ctx.warn(f"{_ref(path)}.config: found {len(stages)} stages but hidden_sizes has {len(config.hidden_sizes)}")
        _set_config(config, "hidden_sizes", [int(w) for w in stages])
    # bottleneck inner width is hard-wired to out_channels // 4 in HF ResNet
    for mod in owner.modules():
        if type(mod).__name__ == "ResNetBottleNeckLayer":
            inner = _out_width(mod.layer[0])
            outw = _out_width(mod.layer[-1])
            if inner is not None and outw is not None and inner != outw // 4:
                ctx.warn(f"{_ref(path)}.config: a bottleneck inner width {inner} != out/4={outw // 4}; "
                         f"ResNetConfig cannot express it (rebuilding from the config will not match the weights)")
                break


def _check_hf_resnet_config(owner: nn.Module, path: str, config: Any) -> list[str]:
    out = []
    emb, stages = _hf_resnet_widths(owner)
    if emb is not None and config.embedding_size != emb:
        out.append(f"{_ref(path)}.config: embedding_size={config.embedding_size} but the stem outputs {emb}")
    if stages and list(config.hidden_sizes) != stages:
        out.append(f"{_ref(path)}.config: hidden_sizes={list(config.hidden_sizes)} but stages output {stages}")
    return out


register_config_sync("resnet", check=_check_hf_resnet_config)(_sync_hf_resnet_config)


def _configs(model: nn.Module) -> list[tuple[str, nn.Module, Any]]:
    """(owner path, owner, config) for every distinct HF-style config, shallowest owner first."""
    seen: set[int] = set()
    out = []
    for path, mod in model.named_modules():
        cfg = mod.__dict__.get("config")
        if cfg is None or isinstance(cfg, nn.Module) or id(cfg) in seen or not hasattr(cfg, "model_type"):
            continue
        seen.add(id(cfg))
        out.append((path, mod, cfg))
    return out


# --------------------------------------------------------------------------- unknown modules

_WIDTH_NAME = re.compile(r"(dim|feature|channel|chs|width|hidden|size|planes|heads|embed)", re.I)
_NOT_WIDTH_NAME = re.compile(r"(patch|kernel|img|image|window|grid|stride|batch|seq|len|vocab|class|label|pool|stage|depth)", re.I)


def _int_attrs(mod: nn.Module) -> dict[str, int]:
    return {k: v for k, v in vars(mod).items() if isinstance(v, int) and not isinstance(v, bool) and not k.startswith("__")}


def _changed_dims(old: torch.Size, new: torch.Size) -> set[int]:
    old, new = tuple(old), tuple(new)
    if len(old) != len(new):
        return {int(d) for d in old}
    return {int(o) for o, n in zip(old, new) if o != n}


def _detect_unknown(model: nn.Module, old_shapes: Mapping[str, torch.Size]) -> None:
    mods = list(model.named_modules())
    direct: dict[str, set[int]] = {}
    for path, mod in mods:
        dims: set[int] = set()
        for store in (mod._parameters, mod._buffers):
            for name, t in store.items():
                key = _join(path, name)
                if t is None or key not in old_shapes or not _is_tensor(t):
                    continue
                if tuple(old_shapes[key]) != tuple(t.shape):
                    dims |= _changed_dims(old_shapes[key], t.shape)
        if dims:
            direct[path] = dims
    offenders: list[tuple[str, type, list[str]]] = []
    for path, mod in mods:
        entry, matched = _lookup(type(mod))
        own = direct.get(path, set())
        below: set[int] = set()
        prefix = path + "." if path else ""
        for p, d in direct.items():
            if p != path and p.startswith(prefix):
                below |= d
        if not own and not below:
            continue
        ints = _int_attrs(mod)
        bad: list[str] = []
        if entry is None:
            for k, v in ints.items():
                if v in own or (v in below and _WIDTH_NAME.search(k) and not _NOT_WIDTH_NAME.search(k)):
                    bad.append(k)
        elif matched is not type(mod) and entry.managed_attrs is not None:
            # subclass of a known type: int attributes the base handler does not manage are unknown
            for k, v in ints.items():
                if k in entry.managed_attrs:
                    continue
                if v in own or (v in below and _WIDTH_NAME.search(k) and not _NOT_WIDTH_NAME.search(k)):
                    bad.append(k)
        if bad:
            offenders.append((path, type(mod), sorted(set(bad))))
    if offenders:
        path, cls, attrs = offenders[0]
        more = "" if len(offenders) == 1 else f" (and {len(offenders) - 1} more: " + ", ".join(f"{p or '<root>'} ({c.__name__})" for p, c, _ in offenders[1:]) + ")"
        raise UnknownModuleError(
            f"module {path or '<root>'!r} of type {_qualname(cls)} has tensors whose shapes changed and int attribute(s) "
            f"{attrs} equal to an old width; its attributes cannot be synced automatically{more}. Register a handler: "
            f"`@register_attribute_sync({cls.__name__})` on `def fn(module, path, ctx): ...` (from fusion.modules) "
            f"that recomputes those attributes from the module's tensors.",
            offenders,
        )


# --------------------------------------------------------------------------- entry points


def sync_module_attributes(
    model: nn.Module,
    num_heads: Mapping[str, int] | None = None,
    old_shapes: Mapping[str, torch.Size] | None = None,
) -> nn.Module:
    """Update, in place, every width-describing module attribute from the current tensor shapes.

    Args:
        model: the model (the caller's own copy) whose tensors were replaced
            with :func:`replace_tensor`.
        num_heads: ``{attention module path: new number of heads}``.  Attention
            modules not listed keep their number of heads and get
            ``head_dim = new q/k width / heads`` (:class:`HeadsNotDivisibleError`
            if not divisible).  Keys that name no attention module raise
            ``ValueError``.
        old_shapes: optional ``{tensor name: shape before replacement}`` (e.g.
            ``{n: t.shape for n, t in model.state_dict(keep_vars=True).items()}``
            taken before :func:`replace_tensor`).  When given, (1) modules whose
            tensors (own or descendants') did not change shape are left alone,
            and (2) a module of an unknown type that owns changed tensors and
            stores an int attribute equal to an old width raises
            :class:`UnknownModuleError` (register a handler with
            :func:`register_attribute_sync`).  When ``None`` every known module
            is re-derived (handlers are idempotent) and no unknown-module
            detection is done.

    Also updates Hugging Face ``config`` objects (ViT/DeiT: ``hidden_size``,
    ``intermediate_size``, ``num_attention_heads``[, ``head_dim``],
    ``pooler_output_size``; ResNet: ``embedding_size``, ``hidden_sizes``)
    derived from the weights.  Returns ``model``.
    """
    num_heads = dict(num_heads or {})
    ctx = SyncContext(model=model, num_heads=num_heads, old_shapes=old_shapes)
    if old_shapes is not None:
        _detect_unknown(model, old_shapes)

    modules = list(model.named_modules())
    affected: set[str] | None = None
    if old_shapes is not None:
        affected = set()

        def mark(module_path: str) -> None:
            parts = module_path.split(".") if module_path else []
            affected.update(".".join(parts[:i]) for i in range(len(parts) + 1))

        for key in num_heads:
            mark(key)
        current = {}
        for path, mod in modules:
            for store in (mod._parameters, mod._buffers):
                for name, t in store.items():
                    if _is_tensor(t):
                        current[_join(path, name)] = t.shape
        for name, shape in current.items():
            if name in old_shapes and tuple(old_shapes[name]) != tuple(shape):
                mark(name.rpartition(".")[0])

    # children first: reversed pre-order visits every descendant before its ancestor
    for path, mod in reversed(modules):
        if affected is not None and path not in affected:
            continue
        entry, _ = _lookup(type(mod))
        if entry is not None and entry.sync is not None:
            entry.sync(mod, path, ctx)

    for path, owner, cfg in _configs(model):
        if affected is not None and path not in affected:
            continue
        handler = _CONFIG_REGISTRY.get(getattr(cfg, "model_type", None))
        if handler is not None:
            handler[0](owner, path, cfg, ctx)
        elif affected is not None:
            ctx.warn(f"{_ref(path)}.config (model_type={getattr(cfg, 'model_type', None)!r}) is not synced: no config handler")

    unused = set(num_heads) - ctx.used_heads
    if unused:
        raise ValueError(f"num_heads names no known attention module: {sorted(unused)}")
    return model


def check_consistency(model: nn.Module) -> list[str]:
    """Human-readable inconsistencies between attributes and tensor shapes (known types only)."""
    problems: list[str] = []
    for path, mod in model.named_modules():
        entry, _ = _lookup(type(mod))
        if entry is not None and entry.check is not None:
            problems.extend(entry.check(mod, path))
    for path, owner, cfg in _configs(model):
        handler = _CONFIG_REGISTRY.get(getattr(cfg, "model_type", None))
        if handler is not None and handler[1] is not None:
            problems.extend(handler[1](owner, path, cfg))
    return problems
