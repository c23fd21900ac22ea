"""The maps engine: applies per-space merge/unmerge maps to models' parameters.

For models ``i = 1..N`` and a space ``s`` of fused width ``n``, a :class:`SpaceMap` holds, per model,
a merge map ``M_i`` (``n x n_i``: fused features ~ sum_i M_i f_i) and an unmerge map ``U_i``
(``n_i x n``: model i's features ~ U_i f_fused). Every fused tensor is

    W* = sum_i  M_i[out] . W_i . U_i[in]

along the axes that belong to spaces: axes that index a space's features (role ``out``) take ``M_i``,
axes summed against a space's incoming features (role ``in``) take ``U_i``. The merge maps carry the
models' interpolation weights (for a permutation, ``M_i = alpha_i P_i``); a tensor none of whose
output axes is in a space (a classifier's logits) takes ``alpha_i`` itself, so every tensor is
weighted exactly once.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from alignment.errors import SpaceMismatchError
from alignment.graph import Graph
from alignment.permute import model_tensors, reset_caches

from .modules import replace_tensor, sync_module_attributes


@dataclass
class SpaceMap:
    """Merge and unmerge maps of one space for each of N models.

    Attributes:
        merge: per model, ``M_i`` of shape ``(n, n_i)`` (weights included).
        unmerge: per model, ``U_i`` of shape ``(n_i, n)``.
    """

    merge: list[torch.Tensor]
    unmerge: list[torch.Tensor]

    @property
    def width(self) -> int:
        """Fused width ``n``."""
        return int(self.merge[0].shape[0])

    def __post_init__(self) -> None:
        if len(self.merge) != len(self.unmerge):
            raise ValueError("merge and unmerge need one map per model")
        for i, (m, u) in enumerate(zip(self.merge, self.unmerge)):
            if m.shape[0] != u.shape[1] or m.shape[1] != u.shape[0]:
                raise ValueError(
                    f"model {i}: merge map {tuple(m.shape)} and unmerge map {tuple(u.shape)} do not fit "
                    f"(expected (n, n_i) and (n_i, n))"
                )


def permutation_map(perms: Sequence[torch.Tensor], alpha: Sequence[float]) -> SpaceMap:
    """Maps for permutation alignment: ``M_i = alpha_i P_i``, ``U_i = P_i^T``.

    Args:
        perms: per model, a permutation (fused feature ``k`` is model i's feature ``perms[i][k]``).
        alpha: interpolation weight of each model.
    """
    merge, unmerge = [], []
    for p, a in zip(perms, alpha):
        p = torch.as_tensor(p).long().cpu()
        P = torch.zeros(len(p), len(p), dtype=torch.float64)
        P[torch.arange(len(p)), p] = 1.0
        merge.append(a * P)
        unmerge.append(P.t().clone())
    return SpaceMap(merge, unmerge)


def selection_map(indices: torch.Tensor, n_source: int) -> SpaceMap:
    """Maps for keeping a subset of one model's features (width reduction by selection)."""
    idx = torch.as_tensor(indices).long().cpu()
    S = torch.zeros(len(idx), n_source, dtype=torch.float64)
    S[torch.arange(len(idx)), idx] = 1.0
    return SpaceMap([S], [S.t().clone()])


def axis_roles(graph: Graph) -> dict[tuple[str, int], str]:
    """Role of every (tensor, axis) that holds a space: ``"in"`` or ``"out"``."""
    roles: dict[tuple[str, int], str] = {}
    for s in graph.spaces:
        for m in s.members:
            key = (m.tensor, m.axis)
            if roles.get(key) != "in":
                roles[key] = m.role
    return roles


def fuse_tensors(
    tensors: Sequence[dict[str, torch.Tensor]],
    graphs: Sequence[Graph],
    maps: dict[str, SpaceMap],
    alpha: Sequence[float],
    names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Apply maps to the tensors of N models.

    Args:
        tensors: per model, its parameters and buffers by name (see
            :func:`alignment.permute.model_tensors`).
        graphs: per model, its alignment graph (spaces pair by name across models).
        maps: a :class:`SpaceMap` for every space that has members (spaces missing here are an error).
        alpha: interpolation weight of each model (used for tensors with no output space axis).
        names: tensors to fuse (default: every tensor of the first graph).

    Returns:
        Fused tensors (float tensors in the first model's dtype; integer buffers from the first model).
    """
    if not (len(tensors) == len(graphs) == len(alpha)):
        raise ValueError("tensors, graphs and alpha need one entry per model")
    roles = [axis_roles(g) for g in graphs]
    names = list(names) if names is not None else list(graphs[0].shapes)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        t0 = tensors[0][name]
        if not t0.is_floating_point():
            out[name] = t0.clone()
            continue
        total = None
        for i, (tens, g) in enumerate(zip(tensors, graphs)):
            if name not in tens or name not in g.shapes:
                raise SpaceMismatchError(f"model {i} has no tensor {name!r}; models must be of one family")
            t = tens[name].detach().to(torch.float64)
            layout = g.layout(name)
            out_axes = [ax for ax, pcs in enumerate(layout)
                        if any(sp is not None for *_, sp in pcs) and roles[i].get((name, ax)) == "out"]
            for ax, pieces in enumerate(layout):
                if all(sp is None for *_, sp in pieces):
                    continue
                primary = bool(out_axes) and ax == out_axes[0]
                role = roles[i].get((name, ax), "out")
                A = _axis_matrix(pieces, maps, i, role, primary, alpha[i], name, ax)
                t = torch.movedim(torch.tensordot(A.to(t.device), t, dims=([1], [ax])), 0, ax)
            if not out_axes:
                t = t * alpha[i]
            total = t if total is None else total + t
        out[name] = total.to(t0.dtype)
    return out


def _axis_matrix(pieces, maps, i, role, primary, alpha_i, name, ax) -> torch.Tensor:
    blocks = []
    for start, stop, sp in pieces:
        if sp is None:
            eye = torch.eye(stop - start, dtype=torch.float64)
            blocks.append(eye * alpha_i if primary else eye)
            continue
        if sp not in maps:
            raise SpaceMismatchError(f"no map given for space {sp!r} (used by {name!r} axis {ax})")
        sm = maps[sp]
        m = sm.merge[i] if (role == "out" and primary) else sm.unmerge[i].t()
        if m.shape[1] != stop - start:
            raise SpaceMismatchError(
                f"map for space {sp!r} expects {m.shape[1]} features of model {i}, but {name!r} axis {ax} "
                f"has {stop - start} there"
            )
        blocks.append(m.to(torch.float64).cpu())
    return torch.block_diag(*blocks)


def build_model(template: nn.Module, tensors: dict[str, torch.Tensor], num_heads: dict[str, int] | None = None) -> nn.Module:
    """A copy of ``template`` holding ``tensors`` (of any widths), with module attributes synced.

    Args:
        template: model whose architecture (and any tensor not in ``tensors``) is copied.
        tensors: new parameters and buffers by name.
        num_heads: new head counts of attention modules (module path -> heads), if they change.
    """
    new = copy.deepcopy(template)
    old = {n: tuple(t.shape) for n, t in model_tensors(new).items()}
    with torch.no_grad():
        for name, t in tensors.items():
            cur = model_tensors(new)[name]
            if tuple(cur.shape) == tuple(t.shape):
                cur.copy_(t.to(cur.dtype))
            else:
                replace_tensor(new, name, t.to(device=cur.device, dtype=cur.dtype))
    if any(old[n] != tuple(t.shape) for n, t in tensors.items()):
        sync_module_attributes(new, num_heads=num_heads, old_shapes={n: torch.Size(s) for n, s in old.items()})
    reset_caches(new, template.training)
    return new


def apply_maps(
    models: Sequence[nn.Module],
    graphs: Sequence[Graph],
    maps: dict[str, SpaceMap],
    alpha: Sequence[float] | None = None,
    target: nn.Module | None = None,
    num_heads: dict[str, int] | None = None,
) -> nn.Module:
    """Fuse N models with per-space maps into a new model.

    Args:
        models: the models (not modified).
        graphs: their alignment graphs.
        maps: per space, merge/unmerge maps (fused widths may differ from the models' widths).
        alpha: interpolation weights (default: uniform).
        target: a model of the fused widths to write into (not modified; a copy is returned); by
            default a copy of the first model, resized to the maps' widths.
        num_heads: new head counts of attention modules, when the maps change them.

    Returns:
        The fused model, in the first model's train/eval mode.
    """
    alpha = list(alpha) if alpha is not None else [1.0 / len(models)] * len(models)
    tensors = [model_tensors(m) for m in models]
    fused = fuse_tensors(tensors, graphs, maps, alpha)
    template = target if target is not None else models[0]
    if target is not None:
        want = model_tensors(target)
        for n, t in fused.items():
            if n in want and tuple(want[n].shape) != tuple(t.shape):
                raise SpaceMismatchError(
                    f"fused tensor {n!r} has shape {tuple(t.shape)} but the target model has {tuple(want[n].shape)}; "
                    f"the maps' widths must match the target's spaces"
                )
    new = build_model(template, fused, num_heads=num_heads)
    new.train(models[0].training)
    return new
