"""Core of attribute sync: the handler registry, :class:`SyncContext`, :func:`replace_tensor`,
:func:`sync_module_attributes`, :func:`check_consistency`, the error and warning types, and the
helpers that the handlers of every library (``torch_modules``, ``timm_modules``, ``hf_modules``) share.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd

from alignment.errors import FusionError, FusionWarning

__all__ = [
    "AttributeSyncError", "AttributeSyncWarning", "GroupsNotDivisibleError", "HeadsNotDivisibleError", "SyncContext",
    "SyncHandler", "UnknownModuleError", "UnknownTensorError", "builds_like", "changed_sizes", "check_consistency",
    "check_scale", "config_rebuilds", "derive_size_fields",
    "divide_heads", "handler_for", "is_int", "is_tensor", "lookup", "module_check", "out_width", "path_label",
    "per_head_key_value", "qualname",
    "register_attribute_sync", "register_attribute_sync_by", "register_config_fallback", "register_config_sync",
    "register_derived_width", "register_width_free", "replace_tensor", "sync_config_by_shapes", "sync_module_attributes",
    "unknown_module", "unregister_attribute_sync",
]

SyncFn = Callable[[nn.Module, str, "SyncContext"], None]
CheckFn = Callable[[nn.Module, str], list[str]]


# --------------------------------------------------------------------------- errors


class UnknownTensorError(FusionError, KeyError):
    """``replace_tensor`` was given a name that is no parameter or buffer of the model."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class AttributeSyncError(FusionError, RuntimeError):
    """Base class of errors raised while synchronising module attributes."""


class UnknownModuleError(AttributeSyncError):
    """A module of an unknown type stores a width that changed; no handler can fix it.

    Attributes:
        modules: ``[(path, type, [attribute names]), ...]`` of every offending module.
    """

    def __init__(self, message: str, modules: list[tuple[str, type, list[str]]] | None = None):
        super().__init__(message)
        self.modules = modules or []


class HeadsNotDivisibleError(AttributeSyncError, ValueError):
    """The new attention width is not divisible by the number of heads."""


class GroupsNotDivisibleError(AttributeSyncError, ValueError):
    """A grouped convolution / group norm width is not divisible by its groups."""


class AttributeSyncWarning(FusionWarning):
    """Something could be synced only partially (e.g. a config that cannot express it)."""


# --------------------------------------------------------------------------- replace_tensor


def replace_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace, in ``model``, the parameter or buffer at dotted ``name`` by ``tensor`` (any shape).

    A parameter stays an ``nn.Parameter`` with the old ``requires_grad`` (off for integer tensors);
    a buffer stays a buffer with its persistent flag. Tied parameters or buffers (the same tensor
    object registered at several places) are replaced everywhere, so tying survives. ``tensor`` is
    used as given (dtype and device are not changed); it is detached.

    Raises:
        UnknownTensorError: ``name`` is no parameter or buffer of ``model`` (a ``KeyError``).
        TypeError: ``tensor`` is not a ``torch.Tensor``.
    """
    module_path, _, attr = name.rpartition(".")
    try:
        owner = model.get_submodule(module_path) if module_path else model
    except AttributeError:
        raise UnknownTensorError(
            f"model has no parameter or buffer named {name!r} (no module {module_path!r})") from None
    store = next((s for s in ("_parameters", "_buffers") if attr in getattr(owner, s)), None)
    if store is None:
        raise UnknownTensorError(f"model has no parameter or buffer named {name!r}")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"replace_tensor({name!r}): expected a torch.Tensor, got {type(tensor).__name__}")

    old = getattr(owner, store)[attr]
    new = tensor.detach()
    if store == "_parameters":
        requires_grad = old.requires_grad if old is not None else True
        new = nn.Parameter(new, requires_grad=requires_grad and (new.is_floating_point() or new.is_complex()))
    # every (module, attr) slot that holds the very same tensor object (tying)
    slots = [(owner, attr)]
    if old is not None:
        slots += [(mod, key) for mod in model.modules() for key, value in getattr(mod, store).items()
                  if value is old and not (mod is owner and key == attr)]
    for mod, key in slots:
        setattr(mod, key, new)  # a parameter goes through register_parameter; a buffer keeps its persistent flag


# --------------------------------------------------------------------------- registry


@dataclass
class SyncHandler:
    """What is registered for a module type.

    Attributes:
        sync: ``sync(module, path, ctx)`` re-derives the module's width attributes (``None``: it stores none).
        check: ``check(module, path) -> list[str]`` reports inconsistencies, or ``None``.
        managed_attrs: the int attributes ``sync`` keeps in sync, used to detect extra width attributes
            of *subclasses* (``None``: trust the handler with every attribute).
    """

    sync: SyncFn | None
    check: CheckFn | None
    managed_attrs: frozenset[str] | None


_REGISTRY: dict[Any, SyncHandler] = {}
_MATCHERS: list[tuple[Callable[[nn.Module], bool], SyncHandler]] = []
_CONFIG_REGISTRY: dict[str, tuple[Callable, Callable | None]] = {}
_CONFIG_FALLBACKS: list[tuple[Callable, Callable | None]] = []


def register_attribute_sync(*module_types: type | str, check: CheckFn | None = None,
                            managed_attrs: Iterable[str] | None = None) -> Callable[[SyncFn], SyncFn]:
    """Decorator registering ``fn(module, path, ctx)`` as the attribute handler of ``module_types``.

    The handler applies to subclasses too (the nearest registered class in the MRO wins). ``fn``
    must re-derive the module's width attributes from its current tensors and (already synced)
    children; ``ctx`` is a :class:`SyncContext`. Types that store no widths: :func:`register_width_free`.

    Args:
        *module_types: classes, or their dotted names ``"pkg.mod.ClassName"`` (no import needed).
        check: ``check(module, path) -> list[str]`` adds reports to :func:`check_consistency`.
        managed_attrs: the int attributes the handler maintains: a subclass that adds *other*
            int attributes equal to an old width is then reported as :class:`UnknownModuleError`.
    """
    if not module_types:
        raise TypeError("register_attribute_sync needs at least one module type")
    managed = frozenset(managed_attrs) if managed_attrs is not None else None

    def deco(fn: SyncFn) -> SyncFn:
        for module_type in module_types:
            _REGISTRY[module_type] = SyncHandler(fn, check, managed)
        return fn

    return deco


def register_attribute_sync_by(match: Callable[[nn.Module], bool], *, managed_attrs: Iterable[str],
                               check: CheckFn | None = None) -> Callable[[SyncFn], SyncFn]:
    """Decorator registering ``fn(module, path, ctx)`` as the attribute handler of every module for
    which ``match(module)`` is true and whose type has no handler of its own (a handler registered
    for the type or a base class with :func:`register_attribute_sync` wins; matchers are tried in
    registration order). For families of library classes that share an attribute layout (e.g.
    transformers attention modules) and that a list of class names would never cover.

    Args:
        match: ``match(module) -> bool``, on the module instance (its attributes and children).
        managed_attrs: the int attributes ``fn`` maintains; any *other* int attribute of a matched
            module equal to an old width (or a stale per-head size) is reported as
            :class:`UnknownModuleError`.
        check: as for :func:`register_attribute_sync`.
    """
    managed = frozenset(managed_attrs)

    def deco(fn: SyncFn) -> SyncFn:
        _MATCHERS.append((match, SyncHandler(fn, check, managed)))
        return fn

    return deco


def register_derived_width(*module_types: type | str, attr: str, width: Callable[[nn.Module], int | None],
                           source: str, doc: str) -> SyncFn:
    """Register the handler and the check of module types whose one stored width attribute ``attr``
    is what ``width(module)`` derives from its tensors (None: nothing to derive, left as it is).

    Args:
        *module_types: classes or dotted names, as for :func:`register_attribute_sync`.
        attr: the attribute (e.g. ``"num_features"``, ``"embed_dim"``).
        width: derives the width from the module's current tensors and children.
        source: what the derived width is, for the check's message (``"<attr>=<old> but <source>
            <width>"``, e.g. ``"its final layernorm normalises"``).
        doc: the handler's docstring (what the attribute is in the library).

    Returns:
        The registered handler.
    """

    def check_fn(m: nn.Module) -> Iterator[str]:
        w = width(m)
        if w is not None and getattr(m, attr) != w:
            yield f"{attr}={getattr(m, attr)} but {source} {w}"

    def sync(m: nn.Module, path: str, ctx: "SyncContext") -> None:
        w = width(m)
        if w is not None:
            setattr(m, attr, w)

    sync.__doc__ = doc
    register_attribute_sync(*module_types, check=module_check(check_fn))(sync)
    return sync


def register_width_free(*module_types: type | str) -> None:
    """Mark module types (classes or dotted names) as known that store no widths (their tensors define them)."""
    for module_type in module_types:
        _REGISTRY[module_type] = SyncHandler(None, None, None)


def unregister_attribute_sync(*module_types: type | str) -> None:
    """Remove the handlers registered for ``module_types`` (classes or dotted names; unknown ones are ignored)."""
    for module_type in module_types:
        _REGISTRY.pop(module_type, None)


def register_config_sync(*model_types: str, check: Callable | None = None) -> Callable:
    """Decorator registering ``fn(owner, path, config, ctx)`` for HF configs whose ``model_type`` is in ``model_types``.

    ``owner`` is the shallowest module holding the config (``module.config``), ``path`` its dotted path;
    ``check(owner, path, config) -> list[str]`` adds reports to :func:`check_consistency`.
    """

    def deco(fn):
        for model_type in model_types:
            _CONFIG_REGISTRY[model_type] = (fn, check)
        return fn

    return deco


def register_config_fallback(check: Callable | None = None) -> Callable:
    """Decorator registering ``fn(owner, path, config, ctx)`` for HF configs whose ``model_type`` has
    no handler of its own (:func:`register_config_sync`); fallbacks run in registration order,
    before the shape-based sync of such configs (:func:`sync_config_by_shapes`), and should change
    only what they can derive from the modules. ``check(owner, path, config) -> list[str]`` adds
    reports to :func:`check_consistency`.
    """

    def deco(fn):
        _CONFIG_FALLBACKS.append((fn, check))
        return fn

    return deco


def lookup(cls: type) -> tuple[SyncHandler | None, type | None]:
    """The handler that applies to module class ``cls``.

    Returns:
        ``(handler, class)`` for the nearest class in ``cls.__mro__`` registered (by class or dotted
        name), or ``(None, None)``.
    """
    for klass in cls.__mro__:
        if klass is nn.Module or klass is object:
            break
        entry = _REGISTRY.get(klass) or _REGISTRY.get(qualname(klass))
        if entry is not None:
            return entry, klass
    return None, None


def handler_for(module: nn.Module) -> tuple[SyncHandler | None, type | None]:
    """The handler that applies to the instance ``module``: that of its type (:func:`lookup`), else
    the first one registered with :func:`register_attribute_sync_by` whose ``match`` accepts it.

    Returns:
        ``(handler, class)`` as :func:`lookup` for a handler of the type; ``(handler, None)`` for a
        handler matched by attributes; ``(None, None)``.
    """
    entry, matched = lookup(type(module))
    if entry is not None:
        return entry, matched
    for match, entry in _MATCHERS:
        if match(module):
            return entry, None
    return None, None


# --------------------------------------------------------------------------- shared helpers


def qualname(cls: type) -> str:
    """``"module.ClassName"`` of a class: the dotted name handlers are registered under."""
    return f"{cls.__module__}.{cls.__qualname__}"


def unknown_module(path: str, module: nn.Module, attrs: list[str], why: str) -> UnknownModuleError:
    """The :class:`UnknownModuleError` of a handler that cannot derive ``attrs`` of ``module`` (at
    ``path``): its message names the module and its type, then says ``why``."""
    return UnknownModuleError(f"module {path_label(path)!r} of type {qualname(type(module))}: {why}",
                              [(path, type(module), attrs)])


def path_label(path: str) -> str:
    """``path``, or ``"<root>"`` for the root module (for messages)."""
    return path or "<root>"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def is_int(value: Any) -> bool:
    """Whether ``value`` is an int and no bool (a width, a head count, a size field)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_tensor(t: Any) -> bool:
    """Whether ``t`` is a materialised tensor (not ``None`` and not a lazy module's placeholder)."""
    return isinstance(t, torch.Tensor) and not isinstance(t, nn.parameter.UninitializedTensorMixin)


def divide_heads(width: int, heads: int, path: str, what: str = "attention width") -> int:
    """``width // heads`` for the module labelled ``path`` (``what``: the width's name in the message).

    Raises:
        HeadsNotDivisibleError: ``heads`` does not divide ``width``.
    """
    if heads <= 0 or width % heads:
        raise HeadsNotDivisibleError(
            f"{path}: {what} {width} is not divisible by num_heads={heads}; pass "
            f"num_heads={{{path!r}: h}} with h dividing {width}"
        )
    return width // heads


def per_head_key_value(heads: int, values: int | None, qkv: int | None = None,
                       q: int | None = None) -> tuple[int, int] | None:
    """``(key_dim, value dims)`` per head of attention whose heads hold ``key_dim`` query and key
    dims and their own value dims (LeViT-style), from its widths: ``values``, every head's values
    (what the output projection reads); ``qkv``, the rows writing every head's queries, keys and
    values, or else ``q``, those writing its queries only. None when the widths do not split so."""
    if values is None or heads <= 0 or values % heads:
        return None
    val = values // heads
    if qkv is not None:
        keys = qkv - values
        return (keys // (2 * heads), val) if keys > 0 and keys % (2 * heads) == 0 else None
    return (q // heads, val) if q is not None and q % heads == 0 else None


def check_scale(attr: str, scale: Any, head_dim: int) -> Iterator[str]:
    """Yield a message if the softmax scale ``attr`` is a float other than ``head_dim**-0.5``."""
    if isinstance(scale, float) and head_dim > 0 and not math.isclose(scale, head_dim ** -0.5, rel_tol=1e-6):
        yield f"{attr}={scale:g} but head_dim**-0.5={head_dim ** -0.5:g}"


def module_check(fn: Callable[[nn.Module], Iterable[str]]) -> CheckFn:
    """Decorator turning ``fn(module)``, which yields messages, into a check for :func:`register_attribute_sync`.

    Returns:
        ``check(module, path) -> list[str]`` whose messages start with ``"<path>: "``.
    """

    @functools.wraps(fn)
    def check(m: nn.Module, path: str) -> list[str]:
        return [f"{path_label(path)}: {message}" for message in fn(m)]

    return check


_WIDTH_ATTR = ((nn.Linear, "out_features"), (_ConvNd, "out_channels"), (_NormBase, "num_features"),
               (nn.GroupNorm, "num_channels"), (nn.Embedding, "embedding_dim"))


def _own_out_width(m: nn.Module) -> int | None:
    """Output width of a single leaf-ish module (attributes assumed synced)."""
    for cls, attr in _WIDTH_ATTR:
        if isinstance(m, cls):
            return getattr(m, attr)
    for name in ("weight", "gamma"):
        t = m._parameters.get(name)
        if t is None:
            t = m._buffers.get(name)
        if is_tensor(t) and t.dim() == 1:
            return int(t.shape[0])
    return None


def out_width(module: nn.Module) -> int | None:
    """Output width of ``module``: that of its last width-bearing submodule (registration order),
    or ``None`` if it has none."""
    last = None
    for m in module.modules():
        w = _own_out_width(m)
        if w is not None:
            last = w
    return last


# --------------------------------------------------------------------------- context


@dataclass
class SyncContext:
    """State shared by the handlers of one :func:`sync_module_attributes` call.

    ``kept_scales``: paths of modules whose softmax scale keeps its value whatever their new head
    size (see :func:`sync_module_attributes`)."""

    model: nn.Module
    num_heads: Mapping[str, int] = field(default_factory=dict)
    old_shapes: Mapping[str, torch.Size] | None = None
    warnings: list[str] = field(default_factory=list)
    used_heads: set[str] = field(default_factory=set)
    kept_scales: frozenset[str] = frozenset()

    def heads(self, path: str, default: int) -> int:
        """New number of heads of the attention module at ``path`` (``default``: keep).

        Raises:
            ValueError: the number requested in ``num_heads`` is not a positive int.
        """
        if path in self.num_heads:
            self.used_heads.add(path)
            value = self.num_heads[path]
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"num_heads[{path!r}] must be a positive int, got {value!r}")
            return value
        return int(default)

    def set_heads(self, m: nn.Module, path: str, width: int, heads: str = "num_heads",
                  head_dim: tuple[str, ...] = ("head_dim",), scale: str | None = "scale",
                  what: str = "attention width") -> tuple[int, int]:
        """Split the new attention ``width`` of module ``m`` at ``path`` into heads; return ``(heads, head_dim)``.

        Sets ``m.<heads>`` (see :meth:`heads`), each attribute in ``head_dim`` that ``m`` has, and its
        softmax scale ``m.<scale>`` if it has one: ``head_dim**-0.5`` if the old scale was the default,
        else kept (with a warning when the head dim changed); kept as well for a module of
        :attr:`kept_scales` (its attention logits are no product of queries and keys).

        Raises:
            HeadsNotDivisibleError: the number of heads does not divide ``width`` (``what``, in the message).
        """
        old_head_dim = next((getattr(m, a) for a in head_dim if hasattr(m, a)), None)
        n = self.heads(path, getattr(m, heads))
        d = divide_heads(width, n, path_label(path), what)
        setattr(m, heads, n)
        for attr in head_dim:
            if hasattr(m, attr):
                setattr(m, attr, d)
        if scale is not None:
            self.rescale(m, path, old_head_dim, d, scale)
        return n, d

    def rescale(self, m: nn.Module, path: str, old_head_dim: Any, head_dim: int, attr: str = "scale") -> None:
        """Set the softmax scale ``m.<attr>`` of the attention module at ``path`` for its new
        ``head_dim``: ``head_dim**-0.5`` if it was the default for ``old_head_dim``, else kept (with a
        warning when the head dim changed); kept as well for a module of :attr:`kept_scales` or
        without such an attribute."""
        if hasattr(m, attr) and path not in self.kept_scales:
            setattr(m, attr, self._rescaled(path, getattr(m, attr), old_head_dim, head_dim, attr))

    def _rescaled(self, path: str, old_scale: Any, old_head_dim: Any, head_dim: int, attr: str) -> Any:
        if old_scale is None:
            return None
        try:
            was_default = math.isclose(float(old_scale), float(old_head_dim) ** -0.5, rel_tol=1e-6)
        except (TypeError, ValueError, ZeroDivisionError):
            was_default = False
        if was_default:
            return float(head_dim) ** -0.5
        if old_head_dim != head_dim:
            self.warn(f"{path_label(path)}: {attr}={old_scale} is not head_dim**-0.5 (head_dim was {old_head_dim}); "
                      f"kept unchanged")
        return old_scale

    def warn(self, message: str) -> None:
        """Record ``message`` and issue it as an :class:`AttributeSyncWarning`."""
        self.warnings.append(message)
        warnings.warn(message, AttributeSyncWarning, stacklevel=3)

    def old_shape(self, path: str, tensor_name: str) -> torch.Size | None:
        """Shape before replacement of tensor ``tensor_name`` of the module at ``path`` (if known)."""
        return None if self.old_shapes is None else self.old_shapes.get(_join(path, tensor_name))


# --------------------------------------------------------------------------- unknown modules

_WIDTH_NAME = re.compile(r"(dim|feature|channel|chs|width|hidden|size|planes|heads|embed)", re.I)
_SPLIT_NAME = re.compile(r"split", re.I)  # (split sizes: a list of widths, whatever it splits)
_NOT_WIDTH_NAME = re.compile(
    r"(patch|kernel|img|image|window|grid|stride|batch|seq|len|vocab|class|label|pool|stage|depth)", re.I)
# attention attributes: a number of heads, and a per-head size (a width divided by the heads: it
# equals no old width, so only its product with the heads reveals it as stale)
_HEADS_ATTRS = ("num_heads", "num_attention_heads", "num_key_value_heads", "n_heads", "n_head", "heads")
_HEAD_SIZE_ATTRS = ("head_dim", "attention_head_size", "attention_head_dim", "head_size", "dim_head", "d_head")
_SCALE_ATTRS = ("scaling", "scale")


def _stale_head_sizes(mod: nn.Module, sizes: set[int]) -> set[str]:
    """Per-head size attributes of ``mod`` that, times one of its head counts (times 1, 2 or 3: q, kv
    or qkv projections), give an old size in ``sizes``: the width they divide changed."""
    attrs = vars(mod)
    heads = [v for k in _HEADS_ATTRS if is_int(v := attrs.get(k)) and v > 0]
    return {k for k in _HEAD_SIZE_ATTRS if is_int(v := attrs.get(k)) and v > 0
            and any(h * v * r in sizes for h in heads for r in (1, 2, 3))}


def _scale_head_dim(scale: Any) -> int | None:
    """The per-head size ``d`` of a softmax scale ``d ** -0.5`` (None: no such scale)."""
    if not isinstance(scale, float) or scale <= 0:
        return None
    d = round(scale ** -2)
    return d if d > 0 and math.isclose(scale, d ** -0.5, rel_tol=1e-6) else None


def _stale_scales(mod: nn.Module, sizes: set[int]) -> set[str]:
    """Softmax scales ``d ** -0.5`` of ``mod`` with no per-head size attribute beside them (the
    ``head_dim`` that :func:`_stale_head_sizes` finds sets its scale) whose ``d``, times one of its
    head counts (times 1, 2 or 3), gives an old size in ``sizes``."""
    attrs = vars(mod)
    if any(is_int(attrs.get(k)) for k in _HEAD_SIZE_ATTRS):
        return set()
    heads = [v for k in _HEADS_ATTRS if is_int(v := attrs.get(k)) and v > 0]
    return {k for k in _SCALE_ATTRS if (d := _scale_head_dim(attrs.get(k))) is not None
            and any(h * d * r in sizes for h in heads for r in (1, 2, 3))}


def _new_head_size(d: int, heads: Iterable[tuple[int, int]], sizes: Mapping[int, int]) -> int | None:
    """The new per-head size of an old one ``d`` whose product with a head count (old, new in
    ``heads``) times 1, 2 or 3 (q, kv, qkv) was a width of ``sizes``: the new width over the new
    product, where that is one whole number (else None)."""
    got = {sizes[h * d * r] // (n * r) for h, n in heads for r in (1, 2, 3)
           if h * d * r in sizes and sizes[h * d * r] % (n * r) == 0}
    return got.pop() if len(got) == 1 else None


def _is_width_name(name: str) -> bool:
    return bool(_WIDTH_NAME.search(name)) and not _NOT_WIDTH_NAME.search(name)


def _infer_attributes(mod: nn.Module, path: str, names: set[str], ctx: SyncContext) -> tuple[dict[str, Any], set[str]]:
    """New values of the attributes ``names`` of a module that no handler syncs, from the sizes its
    own tensors (and its descendants') changed between (:func:`changed_sizes`, each old size to one
    new size): a width-named int or int tuple holding an old size gets the new one; split sizes
    (a list named ``*split*``) summing to an old size get each width among them replaced, when
    they then sum to that size's new value; a per-head size
    (``head_dim``) whose product with the module's head count (times 1, 2 or 3: q, kv, qkv) was a
    width gets the new width over the same product and the new head count, and a softmax scale
    equal to the old ``head_dim ** -0.5`` (stored with or without ``head_dim``) the new one, unless
    the module is one of ``ctx.kept_scales``. A head
    count keeps its value unless it is itself a size that changed (a head axis that talking heads
    mix is a space of its own). Returns
    ``(values, names that cannot be inferred)``: a name that is no width (``kernel``, ``window``),
    an old size that became several."""
    prefix = path + "." if path else ""
    new = {k: tuple(t.shape) for k, t in mod.state_dict().items() if is_tensor(t)}
    old = ctx.old_shapes or {}
    sizes = changed_sizes({k: old[prefix + k] for k in new if prefix + k in old}, new)
    attrs = vars(mod)
    # head counts first: a head axis that is itself a space (talking heads mix them) changes its count
    heads = {k: (v, sizes.get(v, v) if k in names else v) for k in _HEADS_ATTRS if is_int(v := attrs.get(k)) and v > 0}
    values: dict[str, Any] = {k: n for k, (v, n) in heads.items() if n != v}
    left = {k for k, (v, n) in heads.items() if k in names and v not in sizes}
    for k in sorted(names - set(heads), key=lambda k: k in _HEAD_SIZE_ATTRS):
        v = attrs[k]
        if k in _HEAD_SIZE_ATTRS and is_int(v):
            if (new := _new_head_size(v, heads.values(), sizes)) is not None:
                values[k] = new
                for scale in _SCALE_ATTRS:
                    if (isinstance(attrs.get(scale), float) and path not in ctx.kept_scales
                            and math.isclose(attrs[scale], v ** -0.5, rel_tol=1e-6)):
                        values[scale] = new ** -0.5
                continue
        elif k in _SCALE_ATTRS and (d := _scale_head_dim(v)) is not None:
            if path in ctx.kept_scales:
                continue  # (no product of queries and keys: the scale is no function of the head size)
            if (new := _new_head_size(d, heads.values(), sizes)) is not None:
                values[k] = new ** -0.5
                continue
        elif (k == "shape" or _is_width_name(k)) and is_int(v) and v in sizes:
            values[k] = sizes[v]
            continue
        elif (k == "shape" or _is_width_name(k)) and isinstance(v, (tuple, list)) and any(i in sizes for i in v):
            values[k] = type(v)(sizes.get(i, i) for i in v)
            continue
        elif _SPLIT_NAME.search(k) and isinstance(v, (tuple, list)) and sum(v) in sizes:
            # split sizes: each old width its new one, summing to the split axis's new size
            split = type(v)(sizes.get(i, i) for i in v)
            if sum(split) == sizes[sum(v)]:
                values[k] = split
                continue
        left.add(k)
    return values, left


def _changed_modules(modules: list[tuple[str, nn.Module]], old_shapes: Mapping[str, torch.Size]) -> dict[str, set[int]]:
    """``{module path: old sizes that changed}`` for every module owning a tensor whose shape changed
    (all old sizes when the number of dims changed)."""
    changed: dict[str, set[int]] = {}
    for path, mod in modules:
        for name, t in [*mod._parameters.items(), *mod._buffers.items()]:
            key = _join(path, name)
            if is_tensor(t) and key in old_shapes and tuple(old_shapes[key]) != tuple(t.shape):
                old, new = tuple(old_shapes[key]), tuple(t.shape)
                dims = old if len(old) != len(new) else [o for o, n in zip(old, new) if o != n]
                changed.setdefault(path, set()).update(int(d) for d in dims)
    return changed


def _detect_unknown(modules: list[tuple[str, nn.Module]], changed: Mapping[str, set[int]], ctx: SyncContext) -> None:
    """Find the modules with no handler for an attribute that held a width that changed; set each such
    attribute from the sizes of the module's own tensors (:func:`_infer_attributes`, warned), and
    raise :class:`UnknownModuleError` for those that cannot be inferred."""
    offenders: list[tuple[str, type, list[str]]] = []
    inferred: dict[tuple[str, str], list[str]] = {}
    for path, mod in modules:
        own = changed.get(path, set())
        prefix = path + "." if path else ""
        below = set().union(*(d for p, d in changed.items() if p != path and p.startswith(prefix)))
        if not own and not below:
            continue
        entry, matched = handler_for(mod)
        if entry is None:
            managed: frozenset[str] = frozenset()
        elif matched is not type(mod) and entry.managed_attrs is not None:
            # subclass of a known type, or a module matched by its attributes: int attributes the
            # handler does not manage are unknown
            managed = entry.managed_attrs
        else:
            continue
        bad = {
            k for k, v in vars(mod).items()
            if is_int(v) and not k.startswith("__") and k not in managed
            and (v in own or (v in below and _WIDTH_NAME.search(k) and not _NOT_WIDTH_NAME.search(k)))
        }
        bad |= _stale_head_sizes(mod, own | below) - managed
        bad |= _stale_scales(mod, own | below) - managed
        # int tuples holding a width of the module's own tensors (shapes, widths), and split sizes of
        # an axis of its own or its submodules' tensors (FocalNet's ``input_split``, of its ``f``)
        shapes = {k for k, v in vars(mod).items()
                  if k not in managed and isinstance(v, (tuple, list)) and v and all(is_int(i) for i in v)
                  and ((any(i in own for i in v) and (k == "shape" or _is_width_name(k)))
                       or (_SPLIT_NAME.search(k) and sum(v) in own | below))}
        if not bad and not shapes:
            continue
        values, left = _infer_attributes(mod, path, bad | shapes, ctx)
        left -= shapes  # (an int tuple is set where it can be, never refused: it was not checked before)
        if left:
            offenders.append((path, type(mod), sorted(left)))
            continue
        for k, v in values.items():
            was = vars(mod)[k]
            inferred.setdefault((type(mod).__name__, k), []).append(
                f"{was:.4g}->{v:.4g}" if isinstance(v, float) else f"{was}->{v}")
            setattr(mod, k, v)
    if inferred and not offenders:
        listed = [f"{cls}.{k} ({', '.join(sorted(set(v)))})" for (cls, k), v in inferred.items()]
        ctx.warn("attributes of modules with no handler were set from the new sizes of their tensors: "
                 + "; ".join(listed[:8]) + (f" and {len(listed) - 8} more" if len(listed) > 8 else "")
                 + " (register a handler with fusion.modules.register_attribute_sync to set them yourself)")
    if offenders:
        path, cls, attrs = offenders[0]
        others = ", ".join(f"{path_label(p)} ({c.__name__})" for p, c, _ in offenders[1:])
        more = f" (and {len(offenders) - 1} more: {others})" if others else ""
        raise UnknownModuleError(
            f"module {path_label(path)!r} of type {qualname(cls)} has tensors whose shapes changed and int "
            f"attribute(s) {attrs} equal to an old width (or an old per-head size); its attributes cannot be "
            f"synced automatically{more}. "
            f"Register a handler: `@register_attribute_sync({cls.__name__})` on `def fn(module, path, ctx): ...` "
            f"(from fusion.modules) "
            f"that recomputes those attributes from the module's tensors.",
            offenders,
        )


# --------------------------------------------------------------------------- entry points


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


def _sync_num_classes(modules: list[tuple[str, nn.Module]], affected: set[str] | None) -> None:
    # timm's convention: a model with ``num_classes`` and ``get_classifier()`` (a classifier of
    # other outputs: models fused with separate heads)
    for path, m in modules:
        n, get = getattr(m, "num_classes", None), getattr(m, "get_classifier", None)
        if (affected is not None and path not in affected) or not is_int(n) or not callable(get):
            continue
        try:
            head = get()
        except Exception:  # noqa: BLE001 - a get_classifier that needs arguments or state: not this convention
            continue
        if isinstance(head, nn.Linear) and head.out_features != n:
            m.num_classes = int(head.out_features)


def _head_attrs(model: nn.Module) -> dict[str, Any]:
    """``{module path.attribute: value}`` of every module's head counts, per-head sizes and softmax
    scales (the attributes that split equal tensor shapes into other heads)."""
    out: dict[str, Any] = {}
    for path, mod in model.named_modules():
        attrs = vars(mod)
        for k in (*_HEADS_ATTRS, *_HEAD_SIZE_ATTRS):
            if is_int(attrs.get(k)):
                out[_join(path, k)] = attrs[k]
        for k in _SCALE_ATTRS:
            if isinstance(attrs.get(k), float):
                out[_join(path, k)] = attrs[k]
    return out


def _same_head_attrs(have: Mapping[str, Any], got: Mapping[str, Any]) -> bool:
    return all(k not in got or (got[k] == v if is_int(v) else math.isclose(got[k], v, rel_tol=1e-6))
               for k, v in have.items())


def config_rebuilds(owner: nn.Module, config: Any) -> bool:
    """Whether ``type(owner)(config)`` builds tensors of the names and shapes ``owner`` has, and
    modules with ``owner``'s numbers of heads, per-head sizes and softmax scales (equal shapes can
    hold other heads); built on the meta device: no memory, no initialisation cost. False when the
    constructor fails."""
    return builds_like(owner, lambda: type(owner)(config))


def builds_like(owner: nn.Module, build: Callable[[], nn.Module]) -> bool:
    """Whether ``build()``, run on the meta device (no memory, no initialisation cost), gives a model
    with the tensor names and shapes ``owner`` has and modules with ``owner``'s numbers of heads,
    per-head sizes and softmax scales (equal shapes can hold other heads). False when ``build``
    raises."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            built = build()
    except Exception:  # any constructor failure means: these arguments do not describe the model
        return False
    have = {k: tuple(v.shape) for k, v in owner.state_dict().items() if is_tensor(v)}
    got = {k: tuple(v.shape) for k, v in built.state_dict().items() if is_tensor(v)}
    return have == got and _same_head_attrs(_head_attrs(owner), _head_attrs(built))


def changed_sizes(old_shapes: Mapping[str, Iterable[int]], new_shapes: Mapping[str, Iterable[int]]) -> dict[int, int]:
    """``{old size: new size}`` for every size that changed to one new size in every tensor of both
    ``{name: shape}`` maps (tensors of one rank; a size that became two different ones is left out)."""
    seen: dict[int, set[int]] = {}
    for key, new in new_shapes.items():
        old = old_shapes.get(key)
        if old is not None and len(tuple(old)) == len(tuple(new)):
            for o, n in zip(old, new):
                seen.setdefault(int(o), set()).add(int(n))
    return {o: next(iter(n)) for o, n in seen.items() if len(n) == 1 and o not in n}


def _size_fields(values: Mapping[str, Any], sizes: Mapping[int, int]) -> dict[str, Any]:
    """The int fields (and lists/tuples of ints) of ``values`` holding an old size of ``sizes``, with
    every such size replaced by its new one; and the float fields that are the ratio of a changed size
    to another size or int field (an MLP's ``mlp_ratio``: hidden over embedding width), with the
    ratio of the new sizes where that is one value."""
    out: dict[str, Any] = {}
    bases = sorted({*sizes, *(v for v in values.values() if is_int(v) and v > 0)})
    for key, value in values.items():
        if is_int(value) and value in sizes:
            out[key] = sizes[value]
        elif (isinstance(value, (list, tuple)) and value and all(is_int(v) for v in value)
              and any(v in sizes for v in value)):
            out[key] = type(value)(sizes.get(v, v) for v in value)
        elif isinstance(value, float) and value > 0 and math.isfinite(value):
            ratios = {sizes[b] / sizes.get(a, a) for a in bases for b in sizes
                      if math.isclose(a * value, b, rel_tol=1e-9) and sizes[b] / sizes.get(a, a) != value}
            if len(ratios) == 1:
                out[key] = ratios.pop()
    return out


def derive_size_fields(owner: nn.Module, values: Mapping[str, Any], sizes: Mapping[int, int],
                       build: Callable[[Mapping[str, Any]], nn.Module]) -> dict[str, Any] | None:
    """The changes of a constructor's arguments (``values``: a config's fields, a timm model's
    keyword arguments) that describe ``owner``'s new widths: ``{field: new value}`` for which
    ``build(changes)`` gives ``owner``'s tensor shapes and heads (:func:`builds_like`), or None where
    no change of the size fields does; ``{}`` when ``build({})`` already does.

    The size fields (see :func:`_size_fields`: ints and int lists holding an old size of ``sizes``,
    ratios of two sizes) whose change alone the constructor rejects are left out (an argument equal
    to a width by chance: a ResNet's ``base_width``), the rest changed at once; where that does not
    rebuild, every change but one is tried (an ``image_size`` equal to a width, whose position table
    would then have other rows). A change not needed to rebuild is then left out.
    """
    def rebuilds(changes: Mapping[str, Any]) -> bool:
        return builds_like(owner, lambda: build(changes))

    def accepted(key: str, value: Any) -> bool:
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                build({key: value})
        except Exception:  # the constructor rejects this change on its own
            return False
        return True

    if rebuilds({}):
        return {}
    fields = {k: v for k, v in _size_fields(values, sizes).items() if accepted(k, v)}
    if not fields:
        return None
    if not rebuilds(fields):
        for key in list(fields):
            but = {k: v for k, v in fields.items() if k != key}
            if rebuilds(but):
                fields = but
                break
        else:
            return None
    for key in list(fields):  # keep only the changes the shapes need
        but = {k: v for k, v in fields.items() if k != key}
        if rebuilds(but):
            fields = but
    return fields


def sync_config_by_shapes(owner: nn.Module, config: Any, path: str = "",
                          old_shapes: Mapping[str, torch.Size] | None = None) -> bool:
    """Update a Hugging Face-style ``config`` (``owner.config``; ``type(owner)(config)`` builds the
    model) to the widths of ``owner``'s tensors, for configs no handler knows.

    Every size that changed from ``old_shapes`` (``{dotted tensor name in the whole model: shape}``,
    ``path``: ``owner``'s path in it) to one new size everywhere gives an ``old -> new`` map; the
    config's size fields (:func:`derive_size_fields`: top-level int fields and int lists holding an
    old size, ratios of two sizes) get the new sizes, and the result is kept only if the model built
    from it (on the meta device) has ``owner``'s tensor shapes (and heads: :func:`config_rebuilds`).
    Returns whether the config now rebuilds ``owner`` (True, untouched, when it did already); on
    False the config is unchanged.
    """
    import copy

    def build(changes: Mapping[str, Any]) -> nn.Module:
        trial = copy.deepcopy(config)
        for key, value in changes.items():
            setattr(trial, key, value)
        return type(owner)(trial)

    if config_rebuilds(owner, config):
        return True
    if not old_shapes:
        return False
    prefix = path + "." if path else ""
    new = {k: tuple(t.shape) for k, t in owner.state_dict().items() if is_tensor(t)}
    sizes = changed_sizes({k: old_shapes[prefix + k] for k in new if prefix + k in old_shapes}, new)
    values = dict(vars(config))
    labels = getattr(config, "num_labels", None)  # (a property over id2label in transformers)
    if is_int(labels):
        values["num_labels"] = labels
    fields = derive_size_fields(owner, values, sizes, build)
    if fields is None:
        return False
    for key, value in fields.items():
        setattr(config, key, value)
    return True


def sync_module_attributes(model: nn.Module, num_heads: Mapping[str, int] | None = None,
                           old_shapes: Mapping[str, torch.Size] | None = None,
                           kept_scales: Iterable[str] = ()) -> nn.Module:
    """Update, in place, every width-describing module attribute from the current tensor shapes.

    Also updates Hugging Face ``config`` objects (ViT/DeiT: ``hidden_size``,
    ``intermediate_size``, ``num_attention_heads``[, ``head_dim``], ``pooler_output_size``;
    ResNet: ``embedding_size``, ``hidden_sizes``) derived from the weights; a config of another
    model type (ConvNeXt, DINOv2, Swin, ...) with the fallbacks of :func:`register_config_fallback`
    (attention heads) and :func:`sync_config_by_shapes` when ``old_shapes`` is given (a warning when
    no change of its size fields rebuilds the model's shapes and heads).

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
        kept_scales: paths of attention modules whose softmax scale keeps
            its value when their per-head size changes: attention whose logits
            are no product of queries and keys (DaViT's channel attention,
            ``softmax(k^T v)``, whose logits widening by repeated features
            leaves as they are; see :func:`fusion.engine.scales_kept`).

    Returns:
        ``model``.

    Raises:
        UnknownModuleError: see ``old_shapes``.
        HeadsNotDivisibleError: an attention width is not divisible by its number of heads.
        GroupsNotDivisibleError: a grouped conv or group norm width is not divisible by its groups.
        ValueError: ``num_heads`` names no attention module, or a value is not a positive int.
    """
    num_heads = dict(num_heads or {})
    ctx = SyncContext(model=model, num_heads=num_heads, old_shapes=old_shapes, kept_scales=frozenset(kept_scales))
    modules = list(model.named_modules())
    affected: set[str] | None = None
    if old_shapes is not None:
        changed = _changed_modules(modules, old_shapes)
        _detect_unknown(modules, changed, ctx)
        affected = set()
        for module_path in [*num_heads, *changed]:  # a module and all its ancestors
            parts = module_path.split(".") if module_path else []
            affected.update(".".join(parts[:i]) for i in range(len(parts) + 1))

    # children first: reversed pre-order visits every descendant before its ancestor
    for path, mod in reversed(modules):
        if affected is not None and path not in affected:
            continue
        entry, _ = handler_for(mod)
        if entry is not None and entry.sync is not None:
            entry.sync(mod, path, ctx)

    _sync_num_classes(modules, affected)
    for path, owner, cfg in _configs(model):
        if affected is not None and path not in affected:
            continue
        handler = _CONFIG_REGISTRY.get(getattr(cfg, "model_type", None))
        for fn, _ in [handler] if handler is not None else _CONFIG_FALLBACKS:
            fn(owner, path, cfg, ctx)
        # what a handler does not express (a classifier of other outputs: separate heads) and
        # configs with no handler: from the shapes (a handler's result is kept when that fails:
        # the owner may be a wrapper that its config does not construct)
        synced = affected is None or sync_config_by_shapes(owner, cfg, path, ctx.old_shapes)
        if handler is None and not synced:
            ctx.warn(f"{path_label(path)}.config (model_type={getattr(cfg, 'model_type', None)!r}) is not synced: "
                     f"no config handler, and no change of its size fields to the new widths rebuilds the "
                     f"model's shapes and heads")

    unused = set(num_heads) - ctx.used_heads
    if unused:
        raise ValueError(f"num_heads names no known attention module: {sorted(unused)}")
    return model


def check_consistency(model: nn.Module) -> list[str]:
    """Human-readable inconsistencies between attributes and tensor shapes (known types only).

    Returns:
        One message per inconsistency, naming the module; empty when all is consistent.
    """
    problems: list[str] = []
    for path, mod in model.named_modules():
        entry, _ = handler_for(mod)
        if entry is not None and entry.check is not None:
            problems.extend(entry.check(mod, path))
    for path, owner, cfg in _configs(model):
        handler = _CONFIG_REGISTRY.get(getattr(cfg, "model_type", None))
        for _, check in [handler] if handler is not None else _CONFIG_FALLBACKS:
            if check is not None:
                problems.extend(check(owner, path, cfg))
    return problems
