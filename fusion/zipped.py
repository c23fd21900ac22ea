"""Partial zipping: a fused trunk up to a cut, then each model's own remaining layers and head.

Zipping every layer forces models trained on different tasks to share features that only one of
them has. ZipIt's partial zipping stops at a chosen depth: the fused model computes the layers
before a *cut* once, and after it every source model keeps its own layers, fed with the fused
features through its unmerge map (``f_i ~ U_i f``), and its own head. A cut at the input is the
ensemble of the models; a cut at the output (after the last hidden layer) is full zipping.

The cut comes from the graph's topology, with no per-architecture code: a cut point is the output
of a module call that holds the whole of one alignment space (an observation point of discovery),
and it is *valid* when nothing computed before it but that output is used after it (checked on
the model itself: its branch, with everything before the cut skipped and the cut's output handed
in, must reproduce the model exactly; values standing in for the skipped work must not matter).

:class:`ZippedModel` is one ``nn.Module``: its trunk is the fused model with every module that runs
only after the cut removed, and its branches are copies of the source models with every module
that runs only before the cut replaced by a stand-in that computes nothing (it returns zeros of
the right shape, found on the ``meta`` device), so no model's early layers run. Its state dict holds
only the weights it uses; :func:`zipped_from_parts` rebuilds the same structure from the
architectures to load them.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map_only

from alignment.errors import FusionError
from alignment.graph import Graph
from alignment.runner import model_dtype, modes

from .replay import Tape, record

__all__ = ["Cut", "CutError", "ZippedModel", "cut_points", "resolve_cut", "zip_model", "zipped_from_parts",
           "fit_cut", "forward_flops", "parameter_total"]


class CutError(FusionError, ValueError):
    """``zip_until`` names no valid cut of the model."""


@dataclass(frozen=True)
class Cut:
    """Where the fused trunk ends.

    Attributes:
        module: the module whose output is the last fused feature map (None: the input, i.e. nothing
            is fused and every model runs whole).
        space: the alignment space of that output.
        dim: the axis of the output holding the space's features.
        depth: the fraction of the model's parameterised modules that run before the cut.
    """

    module: str | None = None
    space: str | None = None
    dim: int = 1
    depth: float = 0.0

    @property
    def at_input(self) -> bool:
        """Whether the cut is at the input (the ensemble)."""
        return self.module is None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Cut":
        """The cut :meth:`to_dict` described."""
        return cls(module=d.get("module"), space=d.get("space"), dim=int(d.get("dim", 1)),
                   depth=float(d.get("depth", 0.0)))


class _CutReached(FusionError):
    """Ends the trunk's forward pass at the cut, carrying the cut's output."""

    def __init__(self, value):
        super().__init__("cut reached")
        self.value = value


def _first(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


@dataclass(frozen=True)
class _Like:
    """The shape and dtype of a stand-in's output tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype


class _Skipped(nn.Module):
    """Stands for a branch module whose work the trunk does: returns zeros shaped like its output.

    The shapes come from a copy of the module on the ``meta`` device (no memory, no compute), once
    per input shape; the copy is not a submodule, so it holds no parameters of the branch.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.training = module.training
        self.__dict__["_meta"] = _meta_copy(module)
        self.__dict__["_shapes"] = {}
        self.__dict__["fill"] = "zeros"  # "noise" only while checking that the stand-in values do not matter

    def _like(self, args, kwargs) -> Any:
        leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        # (int(): under torch.jit.trace a tensor's sizes read as 0-dim tensors)
        key = tuple((tuple(int(n) for n in t.shape), t.dtype) for t in leaves)
        if key not in self._shapes:
            margs, mkw = tree_map_only(torch.Tensor, lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"),
                                       (args, kwargs))
            with torch.no_grad(), _untraced():
                out = self._meta(*margs, **mkw)
            # plain sizes, not meta tensors (a tracer would record a size read as a meta constant)
            self._shapes[key] = tree_map_only(torch.Tensor, lambda t: _Like(tuple(t.shape), t.dtype), out)
        device = leaves[0].device if leaves else torch.device("cpu")
        make = torch.randn if self.fill == "noise" else torch.zeros
        return tree_map_only(_Like, lambda t: make(t.shape, dtype=t.dtype, device=device), self._shapes[key])

    def _apply(self, fn, recurse=True):
        # a dtype change of the model (.double(), .half(), .to("cuda", torch.bfloat16)) reaches the
        # meta copy, whose shapes and dtypes the stand-in returns; device moves do not (it stays on
        # meta). The change is read off an empty tensor of the copy's own floating dtype (a call
        # that names no dtype keeps it), converted the way the model's tensors are.
        current = next((t.dtype for t in self.__dict__["_meta"].state_dict().values() if t.is_floating_point()),
                       torch.get_default_dtype())
        try:
            dtype = fn(torch.empty(0, dtype=current)).dtype
        except Exception:  # noqa: BLE001 - e.g. a move to a device this process cannot reach
            dtype = None
        if dtype is not None and dtype.is_floating_point and dtype != current:
            self.__dict__["_meta"] = self.__dict__["_meta"].to(dtype=dtype)
            self.__dict__["_shapes"] = {}
        return super()._apply(fn, recurse)

    def __getattr__(self, name: str) -> Any:
        # code around a skipped module may read its attributes (e.g. a weight's dtype): the meta copy answers
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_meta"], name)

    def forward(self, *args, **kwargs):
        return self._like(args, kwargs)


@contextlib.contextmanager
def _untraced():
    """Pauses a ``torch.jit.trace`` in progress (a stand-in's meta-device shape run is not part of the
    model's computation, and the tracer cannot record meta tensors)."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


class _Injected(_Skipped):
    """The branch's cut module: returns the features handed in (the trunk's, unmerged) in its output's place."""

    def forward(self, *args, **kwargs):
        value = self.__dict__.pop("value", None)
        out = self._like(args, kwargs)
        if value is None and self.fill == "noise":  # (probing the branch on its own: any features will do)
            value = _first(tree_map_only(torch.Tensor, torch.randn_like, out))
        if value is None:
            raise CutError("a branch of a ZippedModel ran without the trunk's features; call the ZippedModel itself")
        if isinstance(out, torch.Tensor):
            return value
        return type(out)([value, *out[1:]])


def _calls(tape: Tape) -> dict[str, list]:
    out: dict[str, list] = {}
    for c in tape.calls:
        out.setdefault(c.path, []).append(c)
    return out


def _outermost(model: nn.Module, calls: dict[str, list], pick) -> list[str]:
    """The outermost submodules whose every call satisfies ``pick`` (modules never called, such as
    containers iterated by their parent, are descended into)."""
    found = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            cs = calls.get(path, [])
            if cs and all(pick(c) for c in cs):
                found.append(path)
            else:
                visit(child, path + ".")
    visit(model, "")
    return found


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` on the meta device, made without copying any tensor data."""
    memo: dict[int, Any] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def _copy_replacing(model: nn.Module, paths: list[str], make) -> nn.Module:
    """A deep copy of ``model`` in which the module at each path is ``make(path, module)`` (the
    replaced modules' tensors are never copied)."""
    memo = {id(model.get_submodule(p)): make(p, model.get_submodule(p)) for p in paths}
    return copy.deepcopy(model, memo)


def _exit_of(tape: Tape, module: str) -> int:
    k = tape.call(module, 0)
    return tape.calls[k].exit


def _branch(model: nn.Module, tape: Tape, cut: Cut) -> nn.Module:
    """A copy of ``model`` that skips everything before the cut and takes the cut's output as given."""
    if cut.at_input:
        return copy.deepcopy(model)
    end = _exit_of(tape, cut.module)
    paths = _outermost(model, _calls(tape), lambda c: c.exit <= end)
    if cut.module not in paths:
        raise CutError(f"cut {cut.module!r}: the module runs inside another module that ends at the same point; "
                       f"cut after the outer module")
    return _copy_replacing(model, paths, lambda path, m: _Injected(m) if path == cut.module else _Skipped(m))


def _unused_as_buffers(module: nn.Module, run) -> list[str]:
    """Turn the parameters of ``module`` that its output ``run(module)`` does not depend on into
    non-persistent buffers (same values), and return their names.

    A branch still holds the parameters that the code around its skipped modules reads but whose
    result is thrown away (a ViT's class token and position embedding are added to the features
    the cut replaces): as parameters they would get no gradient (``DistributedDataParallel``
    needs ``find_unused_parameters`` for that), be saved, and be counted in the zipped model's
    size. A parameter is unused when autograd finds no path from it to the output; the output is
    checked to stay the same with those tensors replaced by noise (else they are kept).
    """
    named = dict(module.named_parameters(remove_duplicate=False))
    if not named:
        return []
    flags = {id(p): p.requires_grad for p in named.values()}
    try:
        for p in named.values():
            p.requires_grad_(True)
        with modes([module]), torch.enable_grad():
            out = run(module)
            params = list({id(p): p for p in named.values()}.values())
            grads = torch.autograd.grad(out.float().sum(), params, allow_unused=True)
    except Exception:  # noqa: BLE001 - code that cannot run with gradients: keep every parameter
        return []
    finally:
        for p in named.values():
            p.requires_grad_(flags[id(p)])
    unused = {id(p) for p, g in zip(params, grads) if g is None}
    names = [n for n, p in named.items() if id(p) in unused]
    if not names:
        return []
    with modes([module]), torch.no_grad():
        want = run(module).clone()
        saved = {n: named[n].detach().clone() for n in names}
        for n in names:
            named[n].data.normal_()
        same = torch.equal(run(module), want)
        for n in names:
            named[n].data.copy_(saved[n])
    if not same:
        return []
    for n in names:
        owner, _, attr = n.rpartition(".")
        m = module.get_submodule(owner)
        value = getattr(m, attr).detach()
        delattr(m, attr)
        m.register_buffer(attr, value, persistent=False)
    return names


def _trunk(fused: nn.Module, tape: Tape, cut: Cut) -> nn.Module:
    """A copy of the fused model in which the modules that run only after the cut are stand-ins (no
    parameters; the trunk's own output is not used, its features are read at the cut)."""
    end = _exit_of(tape, cut.module)
    return _copy_replacing(fused, _outermost(fused, _calls(tape), lambda c: c.enter > end), lambda path, m: _Skipped(m))


def _logits(out: Any) -> torch.Tensor:
    return getattr(out, "logits", out) if not isinstance(out, torch.Tensor) else out


def _unmerge(f: torch.Tensor, U: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.movedim(torch.movedim(f, dim, -1) @ U.t().to(f.dtype), -1, dim)


class ZippedModel(nn.Module):
    """A fused trunk up to a cut, then each source model's own layers and head (see the module doc).

    Args:
        trunk: the fused model with the modules after the cut removed (None for a cut at the input).
        branches: per source model, a copy whose modules before the cut are skipped.
        unmerge: per model, the unmerge map ``U_i`` (``n_i x n``) of the cut's space (with an offset
            ``c_i``, zero unless fitted by :func:`fit_cut`: model ``i`` gets ``U_i f + c_i``).
        cut: where the trunk ends.
        heads: ``"merged"``: the output is the alpha-weighted sum of the branches' logits (models with
            one label set); ``"separate"``: the branches' logits concatenated in the models' order.
        alpha: the models' weights (for ``"merged"``).

    Its output is a logits tensor.
    """

    def __init__(self, trunk: nn.Module | None, branches: Sequence[nn.Module], unmerge: Sequence[torch.Tensor] | None,
                 cut: Cut, heads: str = "merged", alpha: Sequence[float] | None = None):
        super().__init__()
        self.trunk = trunk
        self.branches = nn.ModuleList(branches)
        # the container's own train/eval flag follows its parts' (each part keeps its modules' own)
        self.training = self.branches.training = (trunk if trunk is not None else branches[0]).training
        self.cut, self.heads = cut, heads
        self.alpha = list(alpha) if alpha is not None else [1.0 / len(branches)] * len(branches)
        # the maps in the models' floating dtype (float64, bfloat16 models: no mixed dtypes)
        dtype = model_dtype(*([trunk] if trunk is not None else []), *branches)
        for i, U in enumerate(unmerge or []):
            self.register_buffer(f"unmerge_{i}", U.detach().to(dtype).clone())
            self.register_buffer(f"unmerge_bias_{i}", torch.zeros(U.shape[0], device=U.device, dtype=dtype))

    def trunk_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The fused features at the cut for the input (as the source models take it).

        The trunk runs to its end (its modules after the cut are stand-ins that return zeros) rather
        than being stopped at the cut, so that ``torch.export`` and ``torch.jit.trace`` can follow it.
        """
        seen: list[torch.Tensor | None] = []
        handle = self.trunk.get_submodule(self.cut.module).register_forward_hook(lambda m, a, out: seen.append(_first(out)))
        try:
            self.trunk(*args, **kwargs)
        finally:
            handle.remove()
        if not seen or seen[0] is None:
            raise CutError(f"the trunk's forward pass never reached {self.cut.module!r}")
        return seen[0]

    def branch_input(self, f: torch.Tensor, i: int) -> torch.Tensor:
        """Model ``i``'s features at the cut from the fused ones: ``U_i f + c_i`` along the cut's axis."""
        out = _unmerge(f, getattr(self, f"unmerge_{i}"), self.cut.dim)
        c = getattr(self, f"unmerge_bias_{i}").to(out.dtype)
        return out + c.view([-1 if d == self.cut.dim % out.dim() else 1 for d in range(out.dim())])

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Logits for the input, given as the source models take it (``model(x)``, an HF model's
        ``pixel_values=x``)."""
        if "labels" in kwargs:
            raise CutError("a ZippedModel returns logits and computes no loss: call it without labels= and compute "
                           "the loss from its output (with heads='separate', over the concatenated label sets)")
        f = self.trunk_features(*args, **kwargs) if self.trunk is not None else None
        outs = []
        for i, br in enumerate(self.branches):
            if f is not None:
                br.get_submodule(self.cut.module).__dict__["value"] = self.branch_input(f, i)
            outs.append(_logits(br(*args, **kwargs)))
        if self.heads == "separate":
            return torch.cat(outs, dim=-1)
        return sum(a * o for a, o in zip(self.alpha, outs))


class _Checker:
    """Checks cuts of one model: a cut is valid when the model's branch at the cut, handed the model's
    own output there, gives the model's logits exactly, whatever the skipped modules return."""

    def __init__(self, model: nn.Module, tape: Tape, x: torch.Tensor, modules: Sequence[str]):
        self.model, self.tape, self.x = model, tape, x
        self.outputs: dict[str, torch.Tensor | None] = {}
        def grab(m: str, o: Any) -> None:
            t = _first(o)  # copied: code after the module may change its output in place
            self.outputs[m] = t.clone() if t is not None else None
        handles = [model.get_submodule(m).register_forward_hook(lambda mod, a, o, m=m: grab(m, o)) for m in modules]
        try:
            with modes([model]), torch.no_grad():
                self.want = _logits(model(x))
        finally:
            for h in handles:
                h.remove()
        self.known: dict[str, bool] = {}

    def __call__(self, cut: Cut) -> bool:
        if cut.module not in self.known:
            self.known[cut.module] = self._check(cut)
        return self.known[cut.module]

    def _check(self, cut: Cut) -> bool:
        f = self.outputs.get(cut.module)
        if f is None:
            return False
        try:
            br = _branch(self.model, self.tape, cut)
        except CutError:
            return False
        skipped = [m for m in br.modules() if isinstance(m, _Skipped)]
        want = self.want
        with modes([br]), torch.no_grad():
            for fill in ("zeros", "noise"):
                for m in skipped:
                    m.__dict__["fill"] = fill
                br.get_submodule(cut.module).__dict__["value"] = f.clone()  # code after the cut may change it in place
                try:
                    got = _logits(br(self.x))
                except Exception:  # a stand-in value fed code that needs real values: not a cut
                    return False
                if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5,
                                                                 atol=1e-6 * float(want.abs().max())):
                    return False
        return True


def _candidates(graph: Graph, tape: Tape) -> list[list[Cut]]:
    """Module outputs holding a whole space, grouped by position in the forward pass (modules that
    end together, innermost first), in execution order, with their depth."""
    calls = _calls(tape)
    found: dict[str, tuple[str, int]] = {}
    for s in graph.spaces:
        if s.kind != "features":
            continue
        for o in s.observations:
            if (o.io == "output" and o.start == 0 and o.stop == s.width and o.call == 0 and o.module
                    and len(calls.get(o.module, [])) == 1):
                found.setdefault(o.module, (s.name, o.dim))
    exits = sorted((calls[m][0].exit, m) for m in found)
    enters = sorted(c.enter for c in tape.calls)
    layers = [p for p in graph.modules if p in calls]
    first_exit = {p: calls[p][0].exit for p in layers}
    groups: list[list[Cut]] = []
    last = None
    for e, m in exits:
        depth = sum(1 for p in layers if first_exit[p] <= e) / max(len(layers), 1)
        cut = Cut(module=m, space=found[m][0], dim=found[m][1], depth=depth)
        # nothing starts between the previous candidate's exit and this one: the same point
        if last is not None and not any(last < x < e for x in enters):
            groups[-1].append(cut)
        else:
            groups.append([cut])
        last = e
    return groups


def _valid(groups: list[list[Cut]], check: "_Checker") -> list[Cut]:
    """Per position, the outermost valid cut (positions with none are left out)."""
    out = []
    for group in groups:
        ok = next((c for c in reversed(group) if check(c)), None)
        if ok is not None:
            out.append(ok)
    return out


def _checker(model: nn.Module, example: torch.Tensor, graph: Graph) -> tuple[list[list[Cut]], "_Checker"]:
    tape = record(model, example)
    groups = _candidates(graph, tape)
    return groups, _Checker(model, tape, example, [c.module for g in groups for c in g])


def cut_points(model: nn.Module, graph: Graph, example: torch.Tensor) -> list[Cut]:
    """Every valid cut of ``model``, in execution order: the input first, then each point after which
    only one space's features are carried on (a block or stage boundary), up to the last hidden layer."""
    groups, check = _checker(model, example, graph)
    return [Cut()] + _valid(groups, check)


def resolve_cut(zip_until: Any, model: nn.Module, graph: Graph, example: torch.Tensor) -> Cut:
    """The cut ``zip_until`` names.

    Args:
        zip_until: ``"input"`` (or 0.0: the ensemble), ``"output"`` (or 1.0: full zipping), a depth
            fraction in ``[0, 1]`` (the deepest valid cut with at most that fraction of the
            parameterised modules before it), a module path (cut after that module), or a space name
            (cut after the last point where that space's features are the model's state).
        model, graph, example: the first source model, its graph and an example input.

    Raises:
        CutError: an unknown name, a module that is no valid cut, or a fraction outside ``[0, 1]``.
    """
    if zip_until == "input":
        return Cut()
    groups, valid = _checker(model, example, graph)
    cands = [c for g in groups for c in g]

    def listing() -> str:
        ok = [c.module for c in _valid(groups, valid)]
        return ", ".join(repr(m) for m in ok[:12]) + (" ..." if len(ok) > 12 else "")
    if zip_until == "output":
        zip_until = 1.0
    if isinstance(zip_until, (int, float)) and not isinstance(zip_until, bool):
        f = float(zip_until)
        if not 0.0 <= f <= 1.0:
            raise CutError(f"zip_until={zip_until!r}: a depth fraction must lie in [0, 1]")
        for group in reversed(groups):
            if group[0].depth <= f + 1e-12:
                ok = next((c for c in reversed(group) if valid(c)), None)
                if ok is not None:
                    return ok
        return Cut()
    if not isinstance(zip_until, str):
        raise CutError(f"zip_until={zip_until!r}: give 'input', 'output', a depth fraction, a module path or a space name")
    by_module = {c.module: c for c in cands}
    if zip_until in by_module and valid(by_module[zip_until]):
        return by_module[zip_until]
    if zip_until in graph:
        for c in reversed(cands):
            if c.space == zip_until and valid(c):
                return c
        raise CutError(f"zip_until={zip_until!r}: no valid cut carries only this space's features; valid cuts: "
                       f"{listing()}")
    if zip_until in dict(model.named_modules()):
        raise CutError(f"zip_until={zip_until!r}: more than this module's output is used after it (or it does not hold "
                       f"a whole alignment space); valid cuts: {listing()}")
    raise CutError(f"zip_until={zip_until!r} is neither a module nor a space of {type(model).__name__}; valid cuts: "
                   f"{listing()}")


def zip_model(models: Sequence[nn.Module], fused: nn.Module, unmerge: Sequence[torch.Tensor] | None, cut: Cut,
              example: torch.Tensor, heads: str = "merged", alpha: Sequence[float] | None = None) -> ZippedModel:
    """The :class:`ZippedModel` of a fully fused model cut at ``cut``.

    Args:
        models: the source models (copied, not modified).
        fused: the fully fused model (copied, not modified); its layers before the cut form the trunk.
        unmerge: per model, the unmerge map of the cut's space (None for a cut at the input).
        cut: from :func:`resolve_cut`.
        example: an example input (to record which modules run before and after the cut).
        heads: see :class:`ZippedModel`.
        alpha: the models' weights.
    """
    if cut.at_input:
        return ZippedModel(None, [copy.deepcopy(m) for m in models], None, cut, heads, alpha)
    trunk = _trunk(fused, record(fused, example), cut)
    _unused_as_buffers(trunk, lambda t: _output_at(t, cut.module, example))
    branches = [_branch(m, record(m, example), cut) for m in models]
    for br in branches:
        _unused_as_buffers(br, lambda b: _branch_logits(b, cut, example))
    return ZippedModel(trunk, branches, unmerge, cut, heads, alpha)


def _branch_logits(branch: nn.Module, cut: Cut, example: torch.Tensor) -> torch.Tensor:
    """A branch's logits on ``example`` with noise in place of the trunk's features."""
    skipped = [m for m in branch.modules() if isinstance(m, _Skipped)]
    for m in skipped:
        m.__dict__["fill"] = "noise"
    try:
        with torch.random.fork_rng(devices=[]):  # the same noise on every call; the caller's generator untouched
            torch.manual_seed(0)
            return _logits(branch(example))
    finally:
        for m in skipped:
            m.__dict__["fill"] = "zeros"


def zipped_from_parts(trunk: nn.Module | None, branches: Sequence[nn.Module], widths: Sequence[int], cut: Cut,
                      example: torch.Tensor, heads: str = "merged", alpha: Sequence[float] | None = None) -> ZippedModel:
    """A :class:`ZippedModel` of freshly built models (the fused architecture and each source's), ready
    for ``load_state_dict`` (unmerge maps are zero until loaded).

    Args:
        trunk: a model of the fused architecture (None for a cut at the input).
        branches: a model of each source architecture.
        widths: the cut space's width in each source model.
        cut, example, heads, alpha: as for :func:`zip_model`.
    """
    if cut.at_input:
        return ZippedModel(None, list(branches), None, cut, heads, alpha)
    with modes([trunk]), torch.no_grad():
        n = _output_at(trunk, cut.module, example).shape[cut.dim]
    unmerge = [torch.zeros(w, n) for w in widths]
    return zip_model(branches, trunk, unmerge, cut, example, heads, alpha)


def fit_cut(zipped: ZippedModel, sources: Sequence[nn.Module], data: Any, device: torch.device | str | None = None,
            ridge: float = 1e-4, precision: str = "float32") -> list[dict[str, float]]:
    """Refit each model's map at the cut (``U_i``, ``c_i``) by least squares, so that ``U_i f + c_i``
    reproduces model ``i``'s own features there on the calibration data (a ridge toward the current
    map, as in :func:`fusion.lstsq.ridge_solve`). Changes ``zipped`` in place.

    Returns:
        Per model, the relative regression loss before and after.
    """
    from alignment.runner import batches, model_device

    from .lstsq import LayerGram, ridge_solve

    cut = zipped.cut
    dev = torch.device(device) if device is not None else model_device(zipped)
    n = getattr(zipped, "unmerge_0").shape[1]
    grams = [LayerGram(1, n, getattr(zipped, f"unmerge_{i}").shape[0], True, dev, precision) for i in range(len(sources))]

    def rows(t: torch.Tensor) -> torch.Tensor:
        return torch.movedim(t, cut.dim, -1).reshape(1, -1, t.shape[cut.dim])
    with modes([zipped, *sources]), torch.no_grad():
        for x in batches(data):
            x = x.to(dev)
            X = rows(zipped.trunk_features(x).float())
            for i, src in enumerate(sources):
                grams[i].add(X, rows(_output_at(src, cut.module, x).float()))
    out = []
    for i, gram in enumerate(grams):
        U, c = getattr(zipped, f"unmerge_{i}"), getattr(zipped, f"unmerge_bias_{i}")
        sol = ridge_solve(gram, U.double()[None], c.double()[None], ridge=ridge)
        U.copy_(sol.weight[0].to(U.dtype))
        c.copy_(sol.bias[0].to(c.dtype))
        out.append({"loss_before": sol.loss_before, "loss_after": sol.loss_after})
    return out


def _output_at(model: nn.Module, module: str, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The output of ``model``'s module ``module`` on the input (the pass stops there)."""
    def stop(m, args, out):
        raise _CutReached(_first(out))
    handle = model.get_submodule(module).register_forward_hook(stop)
    try:
        model(*args, **kwargs)
    except _CutReached as reached:
        return reached.value
    finally:
        handle.remove()
    raise CutError(f"the forward pass never reached {module!r}")


def parameter_total(model: nn.Module) -> int:
    """Number of parameters (shared ones once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def forward_flops(model: nn.Module, example: torch.Tensor) -> float:
    """Floating-point operations of one forward pass per example (``torch.utils.flop_counter``:
    matrix products and convolutions), in eval mode."""
    from torch.utils.flop_counter import FlopCounterMode

    with modes([model]), torch.no_grad():
        model(example)  # stand-ins find their shapes first, so the count has no meta work
        with FlopCounterMode(display=False) as counter:
            model(example)
    return counter.get_total_flops() / example.shape[0]
