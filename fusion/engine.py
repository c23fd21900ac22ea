"""Building fused models: per-space merge/unmerge maps applied to models' parameters.

For models ``i = 1..N`` and a space ``s`` of fused width ``n``, a :class:`SpaceMap` holds, per model,
a merge map ``M_i`` (``n x n_i``: fused features ~ sum_i M_i f_i) and an unmerge map ``U_i``
(``n_i x n``: model i's features ~ U_i f_fused). Every fused tensor is

    W* = sum_i  M_i[out] . W_i . U_i[in]

along the axes that belong to spaces: axes that index a space's features (role ``out``) take ``M_i``,
axes summed against a space's incoming features (role ``in``) take ``U_i``. The merge maps carry the
models' interpolation weights (for a permutation, ``M_i = alpha_i P_i``); a tensor none of whose
output axes is in a space (a classifier's logits) takes ``alpha_i`` itself, so every tensor is
weighted exactly once. The tensor arithmetic is :func:`alignment.maps.fuse_tensors`; this module
writes the result into a model whose module attributes match the new widths.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from alignment.errors import SpaceMismatchError
from alignment.graph import Graph
from alignment.maps import SpaceMap, fuse_tensors
from alignment.permute import model_tensors, reset_caches

from .modules import replace_tensor, sync_module_attributes

__all__ = ["build_model", "apply_maps"]


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
