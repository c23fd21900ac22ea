"""Layer-by-layer passes over calibration data that never recompute a finished part of a model.

Sequential refinement solves layer 1 on the whole calibration set, then needs layer 2's inputs
*through the refined layer 1*, and so on: one pass over the data per layer. Run naively, pass ``k``
recomputes layers ``1..k-1``, so refining ``L`` layers costs about ``L / 2`` forward passes.

A :class:`Replay` avoids that for any ``nn.Module``, without tracing: it records the tree of module
calls of one forward pass (every module call's enter and exit order and its enclosing call), then
runs each pass only up to a *stop* (a layer's input or output) and keeps, per batch, the outputs of
the largest module calls that finished before the stop. The next pass serves those calls from the
cache (their modules' ``forward`` is replaced for the call, hooks still see it) and computes only
what lies between the two stops. Every pass still sees the right values: a cached call finished
before the previous stop, so every layer inside it or before it was final when it ran.

The calibration batches are materialised once (the cache is indexed by batch), so any re-iterable
data works, shuffled loaders included. Memory is the cached outputs: a few activations of the whole
calibration set, at the widest point of the network.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map_only

from alignment.errors import FusionError
from alignment.graph import in_parametrization
from alignment.runner import modes

__all__ = ["Call", "Tape", "Replay", "ReplayError", "record"]


class ReplayError(FusionError, RuntimeError):
    """A model's forward pass calls its modules differently from one batch to the next."""


class _Stop(FusionError):
    """Raised by a hook to end a forward pass at the stop (caught by :meth:`Replay.run`; a model whose
    forward swallows it ends in :class:`ReplayError`)."""


@dataclass
class Call:
    """One call of a module in one forward pass.

    Attributes:
        path: the module's dotted path ('' for the root).
        index: which call of that module (0 for the first) within the forward pass.
        enter: event number of the call's start (events count starts and ends of every call).
        exit: event number of its end.
        parent: index of the enclosing call in :attr:`Tape.calls` (-1 for the root call).
        input_id: ``id`` of its first tensor input during recording (to pair producers and consumers).
        input_shape: shape of that input during recording (empty when the call had no tensor input).
        output_id: ``id`` of its output during recording.
        mutators: calls inside which the output was later modified in place (e.g. by an in-place
            ReLU, or a residual ``x += shortcut`` in the enclosing block's code); a served output is
            copied only when one of them runs.
        readers: the innermost calls running an operation that reads the output (-1: code of no
            module call); once all of them are served or skipped, the output's values are never read
            again and the replay keeps a placeholder of its shape instead.
    """

    path: str
    index: int
    enter: int
    exit: int = -1
    parent: int = -1
    input_id: int = 0
    input_shape: tuple[int, ...] = ()
    output_id: int = 0
    mutators: set[int] = field(default_factory=set)
    readers: set[int] = field(default_factory=set)


@dataclass
class Tape:
    """The calls of one forward pass, in the order they start.

    Attributes:
        calls: every module call.
        by_key: ``(path, index)`` -> position in ``calls``.
        descendants: per call, the paths of the calls nested in it (with repetition).
    """

    calls: list[Call]
    by_key: dict[tuple[str, int], int] = field(default_factory=dict)
    descendants: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.by_key = {(c.path, c.index): k for k, c in enumerate(self.calls)}
        self.descendants = [[] for _ in self.calls]
        for k, c in enumerate(self.calls):
            p = c.parent
            while p >= 0:
                self.descendants[p].append(c.path)
                p = self.calls[p].parent

    def call(self, path: str, index: int = 0) -> int:
        """Position of the ``index``-th call of module ``path``."""
        try:
            return self.by_key[(path, index)]
        except KeyError:
            raise ReplayError(f"module {path!r} is not called {index + 1} time(s) in the forward pass") from None

    def count(self, path: str) -> int:
        """How many times module ``path`` is called in one forward pass."""
        return sum(1 for c in self.calls if c.path == path)

    def consumers_of(self, k: int) -> list[int]:
        """Calls whose first input is call ``k``'s output (as recorded)."""
        oid = self.calls[k].output_id
        return [j for j, c in enumerate(self.calls) if c.input_id == oid and j != k and c.parent != k]


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
    return None


def _paths(model: nn.Module) -> dict[nn.Module, str]:
    # modules of the data flow; a parametrisation (``c1.parametrizations.weight``: weight norm) runs
    # whenever its weight is read, inside a layer's forward or outside one, so it is not a call
    out: dict[nn.Module, str] = {}
    for name, m in model.named_modules():
        if not in_parametrization(name):
            out.setdefault(m, name)
    return out


@contextlib.contextmanager
def _hooks(model: nn.Module, pre, post) -> Iterator[None]:
    handles = []
    try:
        for m in _paths(model):
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True, prepend=True))
        yield
    finally:
        for h in handles:
            h.remove()


def record(model: nn.Module, x: torch.Tensor) -> Tape:
    """The :class:`Tape` of ``model`` on input ``x`` (one forward pass in eval mode, no gradients)."""
    paths = _paths(model)
    calls: list[Call] = []
    stack: list[int] = []
    counts: dict[str, int] = {}
    keep: list[Any] = []  # keeps recorded tensors alive, so their ids stay unique
    event = [0]
    versions: list[tuple[int, torch.Tensor, int]] = []  # (call, output tensor, version at exit)
    producer: dict[int, list[int]] = {}  # id of a recorded output tensor -> the calls that returned it

    def mutated(inside: int) -> None:
        # outputs changed in place since the last event were changed by code running inside `inside`
        for j, (k, t, v) in enumerate(versions):
            if t._version != v:
                calls[k].mutators.add(inside)
                versions[j] = (k, t, t._version)

    def pre(mod, args, kwargs):
        mutated(stack[-1] if stack else -1)
        path = paths[mod]
        t = _first_tensor(args, kwargs)
        keep.append(t)
        calls.append(Call(path, counts.get(path, 0), event[0], parent=stack[-1] if stack else -1,
                          input_id=id(t) if t is not None else 0,
                          input_shape=tuple(t.shape) if t is not None else ()))
        counts[path] = counts.get(path, 0) + 1
        stack.append(len(calls) - 1)
        event[0] += 1

    def post(mod, args, kwargs, output):
        k = stack.pop()
        mutated(k)
        calls[k].exit = event[0]
        calls[k].output_id = id(output)
        keep.append(output)
        for t in tree_leaves(output):
            if isinstance(t, torch.Tensor):
                versions.append((k, t, t._version))
                producer.setdefault(id(t), []).append(k)
        event[0] += 1

    class Reads(TorchFunctionMode):
        # every torch operation on a recorded output marks the call running it as a reader
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if getattr(func, "__name__", "") != "__get__":  # attribute reads (shape, dtype) read no values
                for t in tree_leaves((args, kwargs)):
                    if isinstance(t, torch.Tensor):
                        for k in producer.get(id(t), ()):
                            calls[k].readers.add(stack[-1] if stack else -1)
            return func(*args, **kwargs)

    with _hooks(model, pre, post), modes([model]), torch.no_grad(), Reads():
        model(x)
    mutated(-1)
    return Tape(calls)


def _placeholder(out: Any) -> Any:
    """Tensors of ``out`` replaced by one-element tensors expanded to their shapes (a served output
    that no running code reads)."""
    return tree_map_only(torch.Tensor, lambda t: t if t.numel() <= 1 else t.new_zeros(()).expand(t.shape), out)


def _clone(out: Any) -> Any:
    return tree_map_only(torch.Tensor, lambda t: t.clone(), out)


class Replay:
    """Staged passes of one model over materialised batches, with cached finished calls.

    Args:
        model: the model (its modules get hooks during :meth:`session`, removed afterwards).
        tape: its recorded calls (:func:`record`).
        num_batches: how many batches every pass runs over.
    """

    def __init__(self, model: nn.Module, tape: Tape, num_batches: int):
        self.model, self.tape, self.num_batches = model, tape, num_batches
        self.paths = _paths(model)
        self.modules = {p: m for m, p in self.paths.items()}
        self.stored: dict[int, list[Any]] = {}  # call -> output per batch
        self.cached: set[int] = set()
        self.copied: set[int] = set()  # cached calls whose outputs are served as copies
        self.store: set[int] = set()
        self.dead: set[int] = set()  # stored as placeholders by the pass planned
        self.shapes_only: set[int] = set()  # calls whose stored outputs are placeholders
        self.frontier = -1
        self.stop: tuple[int, str] | None = None
        self.capture: set[tuple[int, str]] = set()
        self.captured: dict[tuple[int, str], Any] = {}
        self._stack: list[int] = []
        self._counts: dict[str, int] = {}
        self._batch = 0

    # -- planning ----------------------------------------------------------------------------
    def plan(self, stop: tuple[int, str], capture: Sequence[tuple[int, str]] = ()) -> None:
        """Set the next passes' stop (``(call, "in")`` before the call runs, or ``(call, "out")``
        after it) and what to capture (``(call, "in" | "out")`` pairs). Stops must move forward."""
        call, where = stop
        c = self.tape.calls[call]
        # events before the frontier have happened when the pass stops: an "out" stop ends after the
        # call's exit, so the call itself is finished (its output is kept, not computed again)
        frontier = c.enter if where == "in" else c.exit + 1
        if frontier < self.frontier:
            raise ReplayError(f"stops must move forward through the model ({c.path!r} comes earlier)")
        self.frontier, self.stop, self.capture = frontier, stop, set(capture) | {stop}
        calls = self.tape.calls

        def done(k: int) -> bool:
            return calls[k].exit < frontier

        def top_done(k: int) -> bool:  # finished, inside no finished call
            p = calls[k].parent
            return done(k) and (p < 0 or not done(p))

        # serve the largest finished calls that are stored; store the largest finished calls this pass
        # computes, for the passes that follow
        self.cached = set()
        for k in self.stored:
            if done(k) and not any(p in self.stored and done(p) for p in self._ancestors(k)):
                self.cached.add(k)
        covered = set(self.cached)
        for k in sorted(self.cached):
            covered.update(self._inside(k))
        self.store = {k for k in range(len(calls)) if top_done(k) and k not in covered}
        # outputs whose readers all finish in this pass are never read by a later one: keep their shapes
        self.dead = {k for k in self.store if calls[k].readers and all(0 <= r and done(r) for r in calls[k].readers)}
        # a served output is copied only if code that modifies it in place will run (-1: the root's own code)
        self.copied = {k for k in self.cached if any(m < 0 or m not in covered for m in calls[k].mutators)}
        # an output whose every reader is served or skipped is never read again: keep only its shape
        for k in self.cached - self.shapes_only:
            if calls[k].readers and all(r in covered for r in calls[k].readers):
                self.stored[k] = [_placeholder(o) for o in self.stored[k]]
                self.shapes_only.add(k)
        for k in list(self.stored):
            if k not in self.cached:
                del self.stored[k]
        self.shapes_only &= self.cached
        self.shapes_only |= self.dead  # stored as placeholders by this pass

    def _ancestors(self, k: int) -> Iterator[int]:
        p = self.tape.calls[k].parent
        while p >= 0:
            yield p
            p = self.tape.calls[p].parent

    def _inside(self, k: int) -> list[int]:
        c = self.tape.calls[k]
        return [j for j in range(k + 1, len(self.tape.calls)) if self.tape.calls[j].exit < c.exit]

    # -- running ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self) -> Iterator["Replay"]:
        """Install the hooks (and restore the model on exit)."""
        patched: dict[nn.Module, Any] = {}
        try:
            with _hooks(self.model, self._pre, self._post):
                for mod in self.modules.values():
                    own = mod.__dict__.get("forward")
                    patched[mod] = own
                    mod.forward = self._serving(mod, own if own is not None else type(mod).forward.__get__(mod))
                yield self
        finally:
            for mod, own in patched.items():
                if own is None:
                    mod.__dict__.pop("forward", None)
                else:
                    mod.forward = own
            self.stored.clear()
            self.shapes_only.clear()

    def _serving(self, mod: nn.Module, forward):
        def run(*args, **kwargs):
            k = self._stack[-1] if self._stack else -1
            if k in self.cached:
                out = self.stored[k][self._batch]
                return _clone(out) if k in self.copied else out
            return forward(*args, **kwargs)
        return run

    def _pre(self, mod, args, kwargs):
        path = self.paths[mod]
        n = self._counts.get(path, 0)
        self._counts[path] = n + 1
        k = self.tape.by_key.get((path, n))
        if k is None:
            raise ReplayError(f"module {path!r} was called {n + 1} times in a forward pass, but {n} times when "
                              f"recorded: layer-by-layer passes (refinement, REPAIR) need a forward pass that "
                              f"calls the same modules on every batch")
        self._stack.append(k)
        if (k, "in") in self.capture:
            self.captured[(k, "in")] = _first_tensor(args, kwargs)
        if self.stop == (k, "in"):
            raise _Stop
        if k in self.cached:
            for p in self.tape.descendants[k]:
                self._counts[p] = self._counts.get(p, 0) + 1

    def _post(self, mod, args, kwargs, output):
        k = self._stack.pop()
        if k in self.store:
            if k in self.dead:
                keep = _placeholder(output)
            else:
                keep = _clone(output) if self.tape.calls[k].mutators else output
            self.stored.setdefault(k, [None] * self.num_batches)[self._batch] = keep
        if (k, "out") in self.capture:
            self.captured[(k, "out")] = output
        if self.stop == (k, "out"):
            raise _Stop

    def run(self, x: torch.Tensor, batch: int) -> dict[tuple[int, str], Any]:
        """Run batch number ``batch`` (input ``x``) up to the stop; returns the captured tensors."""
        if self.stop is None:
            raise ReplayError("plan() a stop before running")
        self._batch, self._stack, self._counts, self.captured = batch, [], {}, {}
        try:
            self.model(x)
        except _Stop:
            pass
        else:
            raise ReplayError(f"the forward pass ended before reaching {self.tape.calls[self.stop[0]].path!r}")
        return self.captured
