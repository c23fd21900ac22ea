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

from typing import Sequence

import torch
from torch import nn

from alignment.errors import FusionError, InvalidOptionError, SpaceMismatchError
from alignment.graph import Graph, module_of
from alignment.maps import SpaceMap, axis_roles, fuse_tensors, map_tensor
from alignment.permute import (
    copy_model, effective_weights, model_tensors, reset_caches, weight_norm_dim, weight_norms,
)
from alignment.runner import plain_precision

from .modules import replace_tensor, sync_module_attributes

__all__ = ["build_model", "apply_maps", "scales_kept", "set_weight", "check_heads", "head_tensors", "HeadsError", "HEADS"]

HEADS = ("merged", "separate")


class HeadsError(FusionError, ValueError):
    """``heads="separate"`` needs a classifier whose output axis is the model's output."""


def check_heads(heads: object) -> None:
    """Raise :class:`HeadsError` unless ``heads`` is one of :data:`HEADS`."""
    if not isinstance(heads, str) or heads not in HEADS:
        raise HeadsError(f"heads={heads!r}; use one of {', '.join(map(repr, HEADS))}")


def head_tensors(graph: Graph) -> list[str]:
    """The classifier's tensors: those whose first axis is wholly a model output (e.g. ``fc.weight``,
    ``fc.bias``), in the graph's tensor order."""
    out = []
    for f in graph.fixed:
        if f.axis == 0 and f.reason == "model output" and f.start == 0 and f.stop == graph.shapes[f.tensor][0]:
            if f.tensor not in out:
                out.append(f.tensor)
    return [t for t in graph.shapes if t in out]


def scales_kept(graph: Graph) -> set[str]:
    """Paths of the modules whose softmax scale a change of width keeps: modules whose tensors write
    features (a space's ``out`` members), none of them queries or keys (``Space.query_key``).

    A query-key logit is a sum over the head's features, and its scale ``head_dim ** -0.5`` follows
    the head size (with :func:`alignment.maps.correct_query_key`). Attention over other axes (DaViT's
    channel attention, ``softmax(k^T v)`` summed over tokens) has logits that repeated features leave
    as they are, so its scale stays (recomputed, widening a DaViT by 2 was up to 17% off).
    """
    writes: set[str] = set()
    query_key: set[str] = set()
    for s in graph.spaces:
        for m in s.members:
            if m.role != "out":
                continue
            parts = module_of(m.tensor).split(".")
            paths = {".".join(parts[:i]) for i in range(len(parts) + 1)}  # the module and its ancestors
            writes |= paths
            if s.query_key:
                query_key |= paths
    return writes - query_key


def build_model(template: nn.Module, tensors: dict[str, torch.Tensor], num_heads: dict[str, int] | None = None,
                kept_scales: Sequence[str] | set[str] = ()) -> nn.Module:
    """A copy of ``template`` holding ``tensors`` (of any widths), with module attributes synced.

    Args:
        template: model whose architecture (and any tensor not in ``tensors``) is copied.
        tensors: new parameters and buffers by name.
        num_heads: new head counts of attention modules (module path -> heads), if they change.
        kept_scales: modules whose softmax scale keeps its value (:func:`scales_kept`).
    """
    new = copy_model(template)
    old = {n: tuple(t.shape) for n, t in model_tensors(new).items()}
    with torch.no_grad():
        for name, t in tensors.items():
            cur = model_tensors(new)[name]
            if tuple(cur.shape) == tuple(t.shape):
                cur.copy_(t.to(cur.dtype))
            else:
                replace_tensor(new, name, t.to(device=cur.device, dtype=cur.dtype))
    if any(old[n] != tuple(t.shape) for n, t in tensors.items()):
        sync_module_attributes(new, num_heads=num_heads, old_shapes={n: torch.Size(s) for n, s in old.items()},
                               kept_scales=kept_scales)
    reset_caches(new)
    return new


@plain_precision
def apply_maps(
    models: Sequence[nn.Module],
    graphs: Sequence[Graph],
    maps: dict[str, SpaceMap],
    alpha: Sequence[float] | None = None,
    target: nn.Module | None = None,
    num_heads: dict[str, int] | None = None,
    heads: str = "merged",
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
        heads: ``"merged"``: one classifier, the weighted merge of the models'; ``"separate"``: each
            model keeps its own classifier, fed from the fused features through its unmerge map; the
            fused model returns the classifiers' outputs concatenated in the models' order (models may
            then have different class counts).

    Returns:
        The fused model, in the first model's train/eval mode.

    Raises:
        HeadsError: ``heads="separate"`` on a model without a classifier (a layer whose output axis
            is the model output), or an unknown ``heads``.
        SpaceMismatchError: not one graph per model, or maps that do not fit the models.
        InvalidOptionError: not one interpolation weight per model.
    """
    models = list(models)
    if len(graphs) != len(models):
        raise SpaceMismatchError(f"apply_maps got {len(models)} model(s) and {len(graphs)} graph(s): give one graph per "
                                 f"model, in the models' order (alignment.discover_all(models, example))")
    alpha = list(alpha) if alpha is not None else [1.0 / len(models)] * len(models)
    if len(alpha) != len(models):
        raise InvalidOptionError(f"apply_maps got {len(alpha)} interpolation weight(s) (alpha) for {len(models)} "
                                 f"models: give one weight per model")
    norms = weight_norms(models[0])
    tensors = [effective_weights(model_tensors(m), norms) for m in models]
    check_heads(heads)
    names = None
    separate: dict[str, torch.Tensor] = {}
    if heads == "separate":
        head = head_tensors(graphs[0])
        if not head:
            raise HeadsError(f"heads='separate': {graphs[0].model_class} has no classifier whose output axis is the "
                             f"model output; use heads='merged'")
        names = [n for n in graphs[0].shapes if n not in head]
        separate = separate_heads(tensors, graphs, maps, head)
    else:
        outs = [g.shapes[t][0] for g in graphs for t in head_tensors(g)[:1]]
        if len(set(outs)) > 1:
            raise HeadsError(f"the models' classifiers have {', '.join(map(str, outs))} outputs: one merged classifier "
                             f"needs equal class counts; use heads='separate' (each model keeps its own classifier)")
    fused = fuse_tensors(tensors, graphs, maps, alpha, names=names)
    fused.update(separate)
    for v, (g, dim) in norms.items():
        if v in fused:
            fused[g] = torch.norm_except_dim(fused[v], 2, dim)
    template = target if target is not None else models[0]
    if target is not None:
        want = model_tensors(target)
        for n, t in fused.items():
            if n in want and n not in separate and tuple(want[n].shape) != tuple(t.shape):
                raise SpaceMismatchError(
                    f"fused tensor {n!r} has shape {tuple(t.shape)} but the target model has {tuple(want[n].shape)}; "
                    f"the maps' widths must match the target's spaces"
                )
    new = build_model(template, fused, num_heads=num_heads, kept_scales=scales_kept(graphs[0]))
    if heads == "separate":
        _join_label_names(new, models)
    # the first model's train/eval flag per module (a frozen BatchNorm in a training model stays so)
    flags = {path: m.training for path, m in models[0].named_modules()}
    for path, m in new.named_modules():  # parents first: each child ends with its own flag
        m.train(flags.get(path, models[0].training))
    return new


def _join_label_names(fused: nn.Module, models: Sequence[nn.Module]) -> None:
    """With separate heads, a transformers config's class names are the models' in output order
    (resizing its ``num_labels`` alone would rename them ``LABEL_k``)."""
    done = set()
    for path, m in fused.named_modules():
        config = getattr(m, "config", None)
        if id(config) in done or not isinstance(getattr(config, "id2label", None), dict):
            continue
        done.add(id(config))
        sources = [getattr(model.get_submodule(path), "config", None) for model in models]
        if not all(isinstance(getattr(c, "id2label", None), dict) for c in sources):
            continue
        names = [c.id2label[k] for c in sources for k in sorted(c.id2label)]
        if len(names) == config.num_labels:
            config.id2label = dict(enumerate(names))
            config.label2id = {v: k for k, v in reversed(list(config.id2label.items()))}


def set_weight(module: nn.Module, w: torch.Tensor, name: str = "weight") -> None:
    """Write ``w`` as ``module``'s weight: into the parameter, or for a weight-normalised weight as
    ``v = w``, ``g = ||w||`` (so that ``g v / ||v|| = w``)."""
    dim = weight_norm_dim(module, name)
    if dim is None:
        getattr(module, name).copy_(w)
        return
    chain = module.parametrizations[name]
    chain.original1.copy_(w)
    chain.original0.copy_(torch.norm_except_dim(w, 2, dim))


def separate_heads(tensors, graphs: Sequence[Graph], maps: dict[str, SpaceMap], head: Sequence[str]) -> dict[str, torch.Tensor]:
    """Each model's classifier tensors carried onto the fused features (``W_i . U_i[in]``), stacked along
    the output axis in the models' order."""
    out = {}
    heads = [head_tensors(g) for g in graphs]
    roles = [axis_roles(g) for g in graphs]
    for name in head:
        parts = []
        for i, (tens, g) in enumerate(zip(tensors, graphs)):
            if name not in tens or name not in heads[i]:
                raise HeadsError(f"heads='separate': model {i} has no classifier tensor {name!r}")
            parts.append(map_tensor(tens[name], g, name, roles[i], maps, i, 1.0))
        t0 = tensors[0][name]
        out[name] = torch.cat(parts, 0).to(device=t0.device, dtype=t0.dtype)
    return out
