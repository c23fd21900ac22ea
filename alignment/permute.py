"""Applying permutations of alignment spaces to a model (the simplest use of the maps engine)."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from .errors import FusionWarning, SpaceMismatchError
from .graph import Graph
from .runner import plain_precision

__all__ = ["permute", "permute_state", "model_tensors", "reset_caches", "weight_norm_dim", "weight_norm_tensors",
           "is_weight_norm_gain", "weight_norms", "effective_weights", "copy_model", "check_graph_fits"]

_RUN_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
              "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def copy_model(model: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """A deep copy of ``model`` (``memo``: objects to substitute, as for ``copy.deepcopy``).

    A hook the user registered may hold an object that cannot be copied (a lock, a file): the copy
    is then made without the forward and backward hooks of the model's modules, with a warning
    naming them (the user's model keeps its hooks)."""
    try:
        return copy.deepcopy(model, dict(memo or {}))
    except Exception as exc:  # noqa: BLE001 - whatever an uncopyable attribute raises
        memo = dict(memo or {})
        hooked = []
        for path, m in model.named_modules():
            for attr in _RUN_HOOKS:
                hooks = m.__dict__.get(attr)
                if hooks:
                    memo[id(hooks)] = type(hooks)()
                    hooked.append(path or "<root>")
        if not hooked:
            raise
        copied = copy.deepcopy(model, memo)
        warnings.warn(f"the hooks of {', '.join(dict.fromkeys(hooked))} cannot be copied ({type(exc).__name__}: "
                      f"{exc}); the toolkit's copies of the model (traced, fused) run without them",
                      FusionWarning, stacklevel=2)
        return copied


def check_graph_fits(model: nn.Module, graph: Any) -> None:
    """Raise :class:`SpaceMismatchError` unless ``graph`` is an alignment graph of ``model``'s
    tensors (the names and shapes it was discovered with)."""
    if not isinstance(graph, Graph):
        raise SpaceMismatchError(f"graph must be an alignment.Graph (from alignment.discover on this model), "
                                 f"got {type(graph).__name__}")
    tensors = model_tensors(model)
    missing = [n for n in graph.shapes if n not in tensors]
    if missing:
        raise SpaceMismatchError(f"the graph describes tensors the model does not have ({', '.join(missing[:3])}"
                                 f"{', ...' if len(missing) > 3 else ''}): it was discovered on another model; "
                                 f"discover the graph on this model")


def permute_state(state: dict[str, torch.Tensor], graph: Graph, perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Permute every tensor of a state dict that the graph describes; others are copied as is.

    Args:
        state: a ``state_dict`` of the model the graph was discovered on.
        graph: its alignment graph.
        perms: a permutation for every space (see :meth:`Graph.random_permutations`).

    Returns:
        A new state dict; the input tensors are not modified.
    """
    from .maps import fuse_tensors, permutation_map

    for name, t in state.items():
        if name in graph.shapes and tuple(t.shape) != graph.shapes[name]:
            raise SpaceMismatchError(
                f"tensor {name!r} has shape {tuple(t.shape)} but the graph was discovered with "
                f"{graph.shapes[name]}; discover the graph on this model")
    maps = {s.name: permutation_map([perms[s.name]], [1.0]) for s in graph.spaces if s.members}
    names = [n for n in state if n in graph.shapes]
    out = fuse_tensors([state], [graph], maps, [1.0], names=names)
    return {n: out[n] if n in out else t.clone() for n, t in state.items()}


@plain_precision
def permute(model: nn.Module, graph: Graph, perms: dict[str, torch.Tensor]) -> nn.Module:
    """Return a copy of ``model`` with the hidden features of every space permuted.

    A model's function is unchanged by any valid permutation (see
    :meth:`Graph.random_permutations`); this is how the toolkit checks its discovery.

    Args:
        model: the model the graph was discovered on (not modified).
        graph: its alignment graph.
        perms: a permutation for every space, keyed by space name; spaces left out keep their order.

    Returns:
        A new model of the same class with permuted parameters and buffers.
    """
    check_graph_fits(model, graph)
    full = graph.identity_permutations()
    unknown = set(perms) - set(full)
    if unknown:
        raise SpaceMismatchError(
            f"permutations given for spaces this graph does not have: {sorted(unknown)[:5]}; "
            f"see graph.summary() for the space names"
        )
    full.update({k: torch.as_tensor(v) for k, v in perms.items()})
    graph.validate_permutations(full)
    new = copy_model(model)
    state = permute_state(model_tensors(model), graph, full)
    with torch.no_grad():
        for name, t in model_tensors(new).items():
            if name in state and t.shape == state[name].shape:
                t.copy_(state[name])
    reset_caches(new)
    return new


def reset_caches(model: nn.Module, training: bool | None = None) -> None:
    """Drop tensors a model caches from its own weights (e.g. timm's attention-bias caches).

    Such modules clear their caches when switched to training mode, so a round trip through
    ``train()`` leaves the new model computing from its new weights. Afterwards every module has
    its own train/eval flag back (a BatchNorm kept in eval mode inside a model in training mode
    stays so), or, with ``training`` given, the whole model is in that mode.
    """
    saved = [(m, m.training) for m in model.modules()]
    model.train(True)
    if training is not None:
        model.train(training)
        return
    for m, flag in saved:  # parents first (modules() order), so each child ends with its own flag
        m.train(flag)


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` by dotted name, non-persistent buffers included."""
    out = dict(model.named_parameters(remove_duplicate=False))
    out.update(dict(model.named_buffers(remove_duplicate=False)))
    return out


def weight_norm_dim(module: nn.Module, name: str = "weight") -> int | None:
    """The ``dim`` of ``module``'s ``name`` tensor when it is parametrised by
    ``torch.nn.utils.parametrizations.weight_norm`` alone (``w = g v / ||v||``), else None."""
    chains = getattr(module, "parametrizations", None)
    chain = chains[name] if chains is not None and name in chains else None
    if chain is not None and len(chain) == 1 and type(chain[0]).__name__ == "_WeightNorm":
        return chain[0].dim
    return None


def weight_norm_tensors(path: str, name: str = "weight") -> tuple[str, str]:
    """The state names ``(g, v)`` of the weight-normalised tensor ``name`` of the module at ``path``
    (``"c1"`` -> ``("c1.parametrizations.weight.original0", "c1.parametrizations.weight.original1")``);
    ``v`` has the weight's axes."""
    pre = f"{path}.parametrizations.{name}." if path else f"parametrizations.{name}."
    return pre + "original0", pre + "original1"


def is_weight_norm_gain(name: str) -> bool:
    """Whether a state name is the gain ``g`` of a weight-normalised tensor (see
    :func:`weight_norm_tensors`)."""
    parts = name.split(".")
    return len(parts) >= 3 and parts[-1] == "original0" and parts[-3] == "parametrizations"


def weight_norms(model: nn.Module) -> dict[str, tuple[str, int]]:
    """Weights parametrised by ``torch.nn.utils.parametrizations.weight_norm`` (``w = g v / ||v||``):
    the name of each ``v`` tensor (``...parametrizations.weight.original1``) -> (the name of its ``g``,
    the ``dim`` its norm keeps)."""
    out = {}
    for path, mod in model.named_modules():
        for attr in getattr(mod, "parametrizations", {}):
            dim = weight_norm_dim(mod, attr)
            if dim is not None:
                g, v = weight_norm_tensors(path, attr)
                out[v] = (g, dim)
    return out


def effective_weights(tensors: dict[str, torch.Tensor], norms: dict[str, tuple[str, int]]) -> dict[str, torch.Tensor]:
    """``tensors`` with each weight-normalised pair ``(g, v)`` of ``norms`` (see :func:`weight_norms`)
    rewritten as ``v = w``, ``g = ||w||``: the same layer, whose ``v`` is now the weight itself, so
    maps act on the weights as on a plain layer's (a new dict; ``tensors`` is not modified).

    Without this, maps that split or merge ``v``'s entries (Net2Net widening, zipping, narrowing)
    change ``||v||`` and so rescale the rest of the layer; after fusion ``g`` is set to the norm of
    the fused ``v``, so the fused weight is the maps applied to the models' weights."""
    if not norms:
        return tensors
    out = dict(tensors)
    for v, (g, dim) in norms.items():
        if v in tensors and g in tensors:
            w = torch._weight_norm(tensors[v], tensors[g], dim)
            out[v], out[g] = w, torch.norm_except_dim(w, 2, dim)
    return out
