"""Resizing: narrower (or wider) copies of a model, per alignment space.

Widths are chosen per space (a factor, or an absolute width); features are kept by selection
(the first ones, or the highest-scoring ones when scores are given), through the same structure walk
as every fusion method (:class:`alignment.structure.Walk` with :func:`alignment.leaves.select_leaf`):
heads are kept and dims within each head are reduced (attention), per-block widths of depthwise
convs (and the positions of each channel a flatten lays out) are kept while their block count follows
the space indexing them, and concatenation segments resize separately. Widening repeats features and splits their consumers' weights (Net2Net).
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Any, Mapping

import torch
from torch import nn

from alignment import discover
from alignment.errors import FusionError, FusionWarning, SpaceMismatchError
from alignment.graph import Graph
from alignment.leaves import select_leaf
from alignment.maps import correct_query_key, plan_maps
from alignment.partial import parameter_count
from alignment.permute import check_graph_fits, model_tensors
from alignment.runner import plain_precision
from alignment.structure import Blocks, Cat, Fixed, Heads, Leaf, Node, Walk, plan_argmax, space_blocks, tree_size

from .checks import check_runs
from .engine import apply_maps

__all__ = ["WidthError", "WidthSpec", "check_width", "module_widths", "resized_graph", "selection_indices", "resize",
           "resize_like", "check_memory"]

WidthSpec = float | int | Mapping[str, float | int]


class WidthError(FusionError, ValueError):
    """A requested width is not usable for a space."""


def _factor_or_width(spec: Any, where: str) -> float | int:
    if isinstance(spec, bool) or not isinstance(spec, (int, float)):
        raise WidthError(f"width for {where} must be a factor (float, e.g. 0.5) or a width (int >= 1), got {spec!r}")
    if isinstance(spec, float) and not (math.isfinite(spec) and spec > 0):
        raise WidthError(f"width factor for {where} must be a positive finite number, got {spec}")
    if isinstance(spec, int) and spec < 1:
        raise WidthError(f"width for {where} must be at least 1, got {spec}")
    return spec


def check_width(width: WidthSpec, graph: Graph | None = None) -> WidthSpec:
    """Validate a width spec (before any expensive work); with ``graph``, dict keys must name spaces.

    Raises:
        WidthError: naming the bad value or the unknown space.
    """
    if isinstance(width, Mapping):
        for k, v in width.items():
            _factor_or_width(v, f"space {k!r}")
            if graph is not None and k != "*" and k not in graph:
                raise WidthError(f"width given for unknown space {k!r}; see graph.summary() for the space names "
                                 f"(or use '*' for every other space)")
        return width
    if isinstance(width, int) and not isinstance(width, bool) and width == 1:
        raise WidthError("width=1 is ambiguous: as an int it means one unit per space; use 1.0 for the same widths, "
                         "an int >= 2 for a width, or a dict {space: 1} for one unit in a named space")
    return _factor_or_width(width, "every space")


def _spec_of(key: str, width: WidthSpec) -> float | int:
    """What ``width`` asks for space ``key``: its own entry, else ``"*"``'s, else the same width."""
    return width.get(key, width.get("*", 1.0)) if isinstance(width, Mapping) else width


def _leaf_width(key: str, n: int, width: WidthSpec) -> int:
    spec = _factor_or_width(_spec_of(key, width), f"space {key!r}")
    return max(1, int(round(n * spec))) if isinstance(spec, float) else int(spec)


def resized_graph(graph: Graph, width: WidthSpec) -> Graph:
    """The graph of ``graph``'s model at new widths (structure kept; members as in ``graph``).

    Heads keep their count and change head_dim (a factor also keeps the spaces that index heads,
    :meth:`alignment.graph.Graph.head_axes`); blocks indexed by a resized space (depthwise convs, a flatten's channels x
    positions) follow its width, one block per feature, and keep their per-block width;
    concatenation segments and leaves resize by the same rule.
    """
    check_width(width, graph)
    sizes: dict[str, int] = {}
    new_trees: dict[str, Node] = {}
    # heads whose query and key dims are fixed (rotary embeddings pair them with a frequency table)
    # keep the values' head dims too under a factor: one head size reshapes queries, keys and values
    # (queries and keys: one space written twice, two row ranges of a qkv weight or two projections;
    # VOLO's outlook weights, fixed taps written once, are no such pair)
    fixed_heads = {s.tree.key for s in graph.spaces
                   if isinstance(s.tree, Heads) and all(isinstance(p, Fixed) for p in s.tree.parts)
                   and _written_twice(s, graph)}
    # (head axes named in a width dict with an int take that width)
    axes = graph.head_axes()
    for name in axes:
        if isinstance(_spec_of(name, width), float):
            sizes[name] = graph[name].width

    def leaf(key: str, n: int, factor: float | None) -> int:
        if key not in sizes:
            sizes[key] = n if factor == 1.0 else (max(1, int(round(n * factor))) if factor is not None
                                                   else _leaf_width(key, n, width))
        return sizes[key]

    def tree_of(name: str) -> Node:
        if name not in new_trees:
            new_trees[name] = resize_tree(graph[name].tree, name)
        return new_trees[name]

    def resize_tree(t: Node, name: str | None, factor: float | None = None) -> Node:
        if isinstance(t, Fixed):
            return t
        if isinstance(t, Leaf):
            return Leaf(t.key, leaf(t.key, t.size, factor))
        if isinstance(t, Cat):
            return Cat(tuple(resize_tree(p, None, factor) for p in t.parts))
        if isinstance(t, Blocks):
            # blocks follow the width of the space indexing them; per-block widths are kept, unless
            # the features within a block are a space (bilinear pooling): then they follow it too
            count = tree_size(tree_of(t.key)) if t.key in graph else t.count
            if space_blocks(t, graph):
                return Blocks(t.key, count, (tree_of(t.parts[0].key),) * count)
            if t.key in axes and count == t.count:
                # values in heads that a head axis indexes (talking heads): their dims are head dims
                factor = head_factor(t, name, factor)
                return Blocks(t.key, count, tuple(resize_tree(p, None, factor) for p in t.parts))
            return Blocks(t.key, count, tuple(t.parts[i % t.count] for i in range(count)))
        factor = head_factor(t, name, factor)
        return Heads(t.key, t.count, tuple(resize_tree(p, None, factor) for p in t.parts))

    def head_factor(t: Heads | Blocks, name: str | None, factor: float | None) -> float | None:
        d = tree_size(t.parts[0])
        if factor is None and name is not None:
            spec = _spec_of(name, width)
            if isinstance(spec, float) and t.key in fixed_heads:
                per_head = float(d)
            elif isinstance(spec, float):
                # a factor scales head_dim (rounded): heads keep their count
                per_head = float(max(1, int(round(d * spec))))
            else:
                per_head = _leaf_width(name, t.count * d, width) / t.count
                if per_head != int(per_head):
                    raise WidthError(f"space {name!r}: a width of {per_head * t.count:g} does not split into "
                                     f"{t.count} heads; give a multiple of {t.count} (or a factor, which rounds "
                                     f"head_dim)")
            factor = per_head / d
        return factor

    spaces = []
    order = sorted(graph.spaces, key=lambda s: 0 if s.kind == "features" and not isinstance(s.tree, Heads)
                   else 1 if s.kind == "features" else 2)
    for s in order:
        if s.kind == "heads":
            t = s.tree
        else:
            t = tree_of(s.name)
        new_trees[s.name] = t
    for s in graph.spaces:
        t = new_trees[s.name]
        # a space in heads or blocks records their count and per-head (per-block) width: the new tree's
        blocks = {"num_heads": t.count, "head_dim": tree_size(t.parts[0])} \
            if s.num_heads is not None and isinstance(t, (Heads, Blocks)) else {}
        spaces.append(dataclasses.replace(s, width=tree_size(t), tree=t, **blocks))
    return Graph(spaces=spaces, fixed=list(graph.fixed), shapes=dict(graph.shapes), notes=list(graph.notes),
                 model_class=graph.model_class, modules=list(graph.modules), buffers=list(graph.buffers),
                 aliases=dict(graph.aliases))


def _written_twice(space, graph: Graph) -> bool:
    """Whether two weight row ranges write ``space`` (queries and keys of one qkv weight, or of
    two projections)."""
    rows = [(m.tensor, m.start) for m in space.members
            if m.role == "out" and m.axis == 0 and len(graph.shapes.get(m.tensor, ())) >= 2]
    return len(set(rows)) >= 2


def _selection(graph: Graph, target: Graph, scores: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    def score(name: str):
        if scores is None or name not in scores:
            return None
        sc = torch.as_tensor(scores[name]).flatten().double()
        if sc.numel() != graph[name].width:
            raise WidthError(f"scores for space {name!r} have {sc.numel()} entries, expected {graph[name].width}")
        return sc
    walk = Walk([graph], target, select_leaf, scores=score if scores is not None else None)
    return {k: v[0] for k, v in walk.solve_all([s.name for s in target.spaces]).items()}


def selection_indices(graph: Graph, width: WidthSpec = 0.5,
                      scores: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Indices of the features each space keeps.

    Args:
        graph: the model's alignment graph.
        width: a factor for every space (``0.5``), an absolute width (``int``), or a dict from space
            name to factor/width (key ``"*"`` for the rest). Widths larger than a space repeat its
            features (the first ones, or the highest-scoring ones, again).
        scores: optional per-space feature scores (length = width); the highest-scoring features are
            kept (in their original order). Without scores, the first features are kept.

    Returns:
        Per space, a ``LongTensor`` of kept feature indices (sorted, then any repeats).
    """
    plans = _selection(graph, resized_graph(graph, width), scores)
    return {k: plan_argmax(T) for k, T in plans.items()}


def _apply_selection(model: nn.Module, graph: Graph, plans: dict[str, torch.Tensor], target: nn.Module | None = None):
    maps = {s.name: plan_maps([plans[s.name]], [1.0]) for s in graph.spaces if s.members}
    return apply_maps([model], [graph], correct_query_key(maps, [graph], [1.0]), alpha=[1.0], target=target)


@plain_precision
def module_widths(model: nn.Module, graph: Graph, width: WidthSpec) -> WidthSpec:
    """``width`` with the widths the model's modules impose on spaces that ``width`` alone would
    give another: an ``nn.MultiheadAttention`` projects queries, keys and values to its
    ``embed_dim``, the width of its query input, so the spaces of its projection rows take the
    (resized) width of that input; where it differs from what ``width`` gives them, a
    :class:`~alignment.errors.FusionWarning` names the module and the spaces (e.g. the pooling head
    of a SigLIP vision model, whose query input is the model's output and keeps its width).

    Returns:
        ``width`` itself when nothing is imposed, else a per-space dict (``"*"``: ``width``).
    """
    target = None
    imposed: dict[str, int] = {}
    for path, m in model.named_modules():
        if not isinstance(m, nn.MultiheadAttention):
            continue
        prefix = f"{path}." if path else ""
        rows = ["in_proj_weight"] if m.in_proj_weight is not None else ["q_proj_weight", "k_proj_weight",
                                                                        "v_proj_weight"]
        source = prefix + rows[0]
        if source not in graph.shapes:
            continue
        target = target if target is not None else resized_graph(graph, width)
        into = next((s.name for s in graph.spaces
                     if any(x.tensor == source and x.axis == 1 and x.role == "in" for x in s.members)), None)
        need = target[into].width if into is not None else int(graph.shapes[source][1])
        spaces = [s.name for s in graph.spaces
                  if any(x.tensor in {prefix + r for r in rows} and x.axis == 0 for x in s.members)]
        moved = {n: target[n].width for n in spaces if target[n].width != need}
        if moved:
            imposed.update({n: need for n in moved})
            warnings.warn(f"nn.MultiheadAttention {path or '<root>'!r} projects queries, keys and values to its "
                          f"embed_dim, the width of its query input ({need}): space(s) "
                          f"{', '.join(repr(n) for n in moved)} take width {need} instead of "
                          f"{', '.join(str(w) for w in moved.values())}", FusionWarning, stacklevel=3)
    if not imposed:
        return width
    spec = dict(width) if isinstance(width, Mapping) else {"*": width}
    spec.update(imposed)
    return spec


def resize(
    model: nn.Module,
    width: WidthSpec = 0.5,
    example_input: Any = None,
    *,
    graph: Graph | None = None,
    scores: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """A narrower (or wider) copy of ``model``, keeping a subset of the features of every space.

    Narrowing keeps the selected features; widening repeats features and splits their consumers'
    weights between the copies, so a widened model computes the same function (Net2Net), except where
    a LayerNorm, GroupNorm or RMSNorm normalises over a space widened by a non-integer factor: its
    statistics change with uneven repeats (a :class:`alignment.errors.FusionWarning` says so; a norm
    without an affine weight is not detected). Attention heads keep their count: a factor rounds
    head_dim, an absolute width must split into the heads. Attention logits keep their scale when
    head_dim changes (see :func:`alignment.maps.correct_query_key`). Widths a module imposes (an
    ``nn.MultiheadAttention``'s projections have its query input's width) win, with a warning (see
    :func:`module_widths`).

    Module attributes (``in_features``, ``num_features``, attention head sizes, timm ``embed_dim``,
    HF config widths...) are updated so the copy runs; an unknown module whose attributes store a
    width raises :class:`fusion.modules.UnknownModuleError`.

    Args:
        model: the model (not modified).
        width: factor, absolute width, or per-space dict (see :func:`selection_indices`).
        example_input: an input batch for discovery (needed unless ``graph`` is given).
        graph: the model's alignment graph, if already discovered.
        scores: optional per-space feature scores; the highest-scoring features are kept.

    Returns:
        The resized model (same class, new widths).

    Raises:
        ModelError: the resized model does not run on ``example_input`` (its forward fixes a width
            that resizing changed: a literal split size, a reshape to constant channels).
    """
    check_width(width)
    if graph is None:
        if example_input is None:
            raise WidthError("resize needs example_input (or a graph from alignment.discover)")
        graph = discover(model, example_input)
    check_graph_fits(model, graph)
    width = module_widths(model, graph, width)
    target = resized_graph(graph, width)
    _warn_uneven_norms(model, graph, target)
    resized = _apply_selection(model, graph, _selection(graph, target, scores))
    if example_input is not None:
        check_runs(resized, example_input, "resizing")  # (a forward fixing a width: an error here, not the caller's)
    return resized


def _template(model: nn.Module, width: WidthSpec, graph: Graph) -> nn.Module:
    """A model of ``model``'s family at new widths, as a template for weights written later (a
    fusion's target, a checkpoint's architecture): :func:`resize` without its function check."""
    target = resized_graph(graph, width)
    check_memory(model, graph, target)
    return _apply_selection(model, graph, _selection(graph, target, None))


def check_memory(model: nn.Module, graph: Graph, target: Graph) -> int:
    """The bytes ``model``'s tensors take at ``target``'s widths (its resized graph); a width that
    would not fit in this machine's memory is refused before anything is allocated.

    Raises:
        WidthError: the resized tensors alone would take more than the machine's memory.
    """
    tensors = model_tensors(model)
    # (the elements at the new widths, each weighted by its tensor's element size)
    total = parameter_count(graph, {s.name: s.width for s in target.spaces},
                            uses={n: tensors[n].element_size() for n in graph.shapes if n in tensors}, buffers=True)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # (not a POSIX system: not checked)
        return total
    if total > memory:
        raise WidthError(f"at these widths the model's tensors alone would take {total / 2 ** 30:.3g} GiB, more than "
                         f"this machine's {memory / 2 ** 30:.3g} GiB of memory; give a smaller width")
    return total


_NORMS = (nn.LayerNorm, nn.GroupNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


def _warn_uneven_norms(model: nn.Module, graph: Graph, target: Graph) -> None:
    # widening repeats units; a norm over the space (LayerNorm, GroupNorm, RMSNorm) sees the same
    # statistics only when every unit is repeated equally often
    import warnings

    from alignment.errors import FusionWarning

    for s in graph.spaces:
        new = target[s.name].width
        if not s.members or new <= s.width or new % s.width == 0:
            continue
        for m in s.members:
            path, _, leaf = m.tensor.rpartition(".")
            try:
                mod = model.get_submodule(path)
            except AttributeError:
                continue
            if leaf == "weight" and (isinstance(mod, _NORMS) or type(mod).__name__.endswith(("LayerNorm", "RMSNorm"))):
                warnings.warn(f"resize: the widened model does not compute the same function: {type(mod).__name__} "
                              f"{path!r} normalises over space {s.name!r}, whose {s.width} units are repeated unevenly "
                              f"to {new}; widen it by an integer factor (e.g. {2 * s.width}) to keep the function",
                              FusionWarning, stacklevel=3)
                break


@plain_precision
def resize_like(model: nn.Module, target: nn.Module, example_input: Any,
                scores: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Copy of ``model`` narrowed (by selection) to the widths of ``target``, written into a copy of it.

    Spaces pair by name; ``target`` is typically the same family built narrower (e.g.
    ``timm.create_model("resnet18", channels=(16, 32, 64, 128), stem_width=16)``).
    """
    g_src = discover(model, example_input)
    g_tgt = discover(target, example_input)
    missing = [s.name for s in g_src.spaces if s.name not in g_tgt]
    if missing:
        raise SpaceMismatchError(
            f"target model has no space(s) {missing[:4]} of the source; build it from the same family"
        )
    return _apply_selection(model, g_src, _selection(g_src, g_tgt, scores), target=target)
