"""Registries of named, typed callables: fusion methods, repairs and refinements.

A registered function takes a context first and its options as keyword-only arguments with type
annotations and defaults; the registry checks option names and values before anything runs, in the
style of timm's ``@register_model`` (and mergekit's typed merge methods)::

    @register_method("ot")
    def optimal_transport(ctx, *, solver: Literal["emd", "sinkhorn"] = "emd", reg: float = 0.01): ...

An unknown option raises :class:`~alignment.errors.InvalidOptionError` naming it and listing the
valid ones; a value of the wrong type, or outside a ``Literal``, says what is allowed. A ``check``
hook given at registration checks what types cannot (ranges, options that exclude each other, a
model index against the number of models) before any work.
"""

from __future__ import annotations

import inspect
import math
import numbers
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal

from .errors import InvalidOptionError, UnknownNameError

__all__ = ["CHECK_CONTEXT", "Option", "Entry", "Registry"]

_NONE = type(None)

CHECK_CONTEXT = ("given", "models")
"""Keywords a ``check`` hook may declare to receive, besides the options: ``given``, the names of
the options the caller gave (a frozenset; the others hold their defaults), and ``models``, the
number of models (None when the caller does not know it yet)."""


@dataclass(frozen=True)
class Option:
    """One keyword option of a registered function.

    Attributes:
        name: the keyword.
        default: its default value.
        annotation: its type (``int``, ``float``, ``bool``, ``str``, ``Literal[...]``, optionally
            ``| None``).
    """

    name: str
    default: Any
    annotation: Any

    def allowed(self) -> str:
        """The allowed values, in words."""
        parts = []
        for t in _alternatives(self.annotation):
            if t is _NONE:
                parts.append("None")
            elif typing.get_origin(t) is Literal:
                parts.extend(repr(v) for v in typing.get_args(t))
            else:
                parts.append(getattr(t, "__name__", str(t)))
        return " or ".join(parts)

    def check(self, value: Any, owner: str) -> Any:
        """``value`` if the option allows it (ints are accepted for floats), else an error."""
        for t in _alternatives(self.annotation):
            if t is Any:
                return value
            if t is _NONE and value is None:
                return value
            if typing.get_origin(t) is Literal and any(value == v and type(value) is type(v)
                                                       for v in typing.get_args(t)):
                return value
            if t is bool and isinstance(value, bool):
                return value
            if t is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
                return int(value)  # (numpy integers too)
            if t is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
                if not math.isfinite(value):
                    raise InvalidOptionError(f"{owner}: option {self.name}={value!r} must be a finite number")
                return float(value)
            if t is str and isinstance(value, str):
                return value
            if isinstance(t, type) and t not in (bool, int, float, str) and isinstance(value, t):
                return value  # (list, dict, tuple or a class of the registrant's)
        raise InvalidOptionError(f"{owner}: option {self.name}={value!r} is not allowed; use {self.allowed()}")


def _check_context(check: Callable[..., None], owner: str) -> frozenset[str]:
    """The keywords of :data:`CHECK_CONTEXT` that ``check`` declares (all for ``**kwargs``)."""
    if not callable(check):
        raise InvalidOptionError(f"{owner}: check={check!r} is not callable")
    try:
        params = inspect.signature(check).parameters
    except (TypeError, ValueError):  # (a builtin without a signature: options only)
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return frozenset(CHECK_CONTEXT)
    return frozenset(k for k in CHECK_CONTEXT if k in params
                     and params[k].kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))


def _alternatives(annotation: Any) -> tuple:
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return typing.get_args(annotation)
    return (annotation,)


@dataclass(frozen=True)
class Entry:
    """A registered function and its options."""

    name: str
    fn: Callable[..., Any]
    options: tuple[Option, ...]
    check: Callable[..., None] | None = None
    check_context: frozenset[str] = frozenset()
    """The keywords of :data:`CHECK_CONTEXT` that ``check`` takes."""

    @property
    def summary(self) -> str:
        """First line of the function's docstring."""
        lines = (inspect.getdoc(self.fn) or "").strip().splitlines()
        return lines[0] if lines else ""


class Registry:
    """Named functions of one kind (``"method"``, ``"repair"``, ``"refinement"``).

    Args:
        kind: what the registry holds, used in messages.
        error: exception type raised for an unknown name.
        reserved: names an option may not have (the keywords of the function that passes options
            on, e.g. ``fusion.fuse``'s own, which would never reach the option).
    """

    def __init__(self, kind: str, error: type[UnknownNameError] = UnknownNameError, reserved: typing.Iterable[str] = ()):
        self.kind, self.error = kind, error
        self.reserved = frozenset(reserved)
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, check: Callable[..., None] | None = None,
                 replace: bool = False) -> Callable:
        """Decorator registering ``fn(ctx, *, option: type = default, ...)`` under ``name``.

        ``check(options)``, when given, checks option values beyond their types (e.g. ranges) and
        raises :class:`~alignment.errors.InvalidOptionError`; it runs in :meth:`validate`, before
        any work. ``options`` holds every option, defaults filled in; a hook that declares the
        keyword arguments ``given`` and/or ``models`` (:data:`CHECK_CONTEXT`) also receives the
        names of the options given explicitly (to refuse one that has no effect with the others,
        while its default says nothing) and the number of models (to check a model index; None
        when :meth:`validate` was not told). A name that is registered already is refused unless
        ``replace``.

        Raises:
            InvalidOptionError: a name that is no non-empty string or is taken, a function that is
                not callable, an option that is not keyword-only with a default of its own type, or
                a reserved option name."""
        if not isinstance(name, str) or not name.strip():
            raise InvalidOptionError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries and not replace:
            raise InvalidOptionError(f"a {self.kind} named {name!r} is registered already; choose another name "
                                     f"(or register it with replace=True)")
        context = _check_context(check, f"{self.kind} {name!r}") if check is not None else frozenset()

        def deco(fn):
            if not callable(fn):
                raise InvalidOptionError(f"{self.kind} {name!r}: {fn!r} is not callable")
            hints = typing.get_type_hints(fn)
            opts = []
            for p in list(inspect.signature(fn).parameters.values())[1:]:
                if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.default is inspect.Parameter.empty:
                    raise InvalidOptionError(f"{self.kind} {name!r}: options must be keyword-only with defaults "
                                             f"({p.name})")
                if p.name in self.reserved:
                    raise InvalidOptionError(f"{self.kind} {name!r}: an option may not be named {p.name!r} (a keyword "
                                             f"of the call that passes options on); rename it")
                opt = Option(p.name, p.default, hints.get(p.name, Any))
                opt.check(p.default, f"{self.kind} {name!r} (its default)")
                opts.append(opt)
            self._entries[name] = Entry(name, fn, tuple(opts), check, context)
            fn.registered_name = name
            return fn
        return deco

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self.names())

    def get(self, name: str) -> Entry:
        """The entry registered under ``name``."""
        if not isinstance(name, str) or name not in self._entries:
            raise self.error(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        return self._entries[name]

    def validate(self, name: str, options: dict[str, Any], models: int | None = None) -> dict[str, Any]:
        """Checked options of ``name`` (defaults filled in). ``models``: the number of models, for
        checks that depend on it (e.g. a model index); None skips those (the function checks
        again when it runs)."""
        entry = self.get(name)
        known = {o.name: o for o in entry.options}
        unknown = [k for k in options if k not in known]
        if unknown:
            valid = ", ".join(known) if known else "none"
            raise InvalidOptionError(f"{self.kind} {name!r} has no option {unknown[0]!r}; its options: {valid}")
        out = {o.name: o.default for o in entry.options}
        for k, v in options.items():
            out[k] = known[k].check(v, f"{self.kind} {name!r}")
        if entry.check is not None:
            context = {"given": frozenset(options), "models": models}
            entry.check(out, **{k: v for k, v in context.items() if k in entry.check_context})
        return out

    def call(self, name: str, ctx: Any, options: dict[str, Any]) -> Any:
        """Run ``name`` on ``ctx`` with checked options."""
        return self.get(name).fn(ctx, **self.validate(name, options))

    def describe(self) -> str:
        """Every registered name with its summary, options and defaults (for ``fusion methods``)."""
        lines = []
        for n in self.names():
            e = self._entries[n]
            lines.append(f"{n}: {e.summary}")
            for o in e.options:
                lines.append(f"    {o.name} = {o.default!r}  ({o.allowed()})")
        return "\n".join(lines)
