"""Resizing: narrower (or differently sized) copies of a model, per alignment space.

Widths are chosen per space (a factor, or an absolute width); features are kept by selection
(the first ones, or the highest-scoring ones when scores are given). Structure is respected: heads
are kept and dims within each head are reduced (attention), per-block widths of depthwise convs are
kept while their block count follows the input space, and concatenation segments shrink separately.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from alignment import discover
from alignment.errors import SpaceMismatchError
from alignment.graph import Graph, tree_size

from alignment.maps import correct_query_key, permutation_plan, plan_maps

from .engine import SpaceMap, apply_maps

WidthSpec = float | int | Mapping[str, float | int]


class WidthError(ValueError):
    """A requested width is not usable for a space."""


def _leaf_width(key: str, n: int, width: WidthSpec) -> int:
    spec = width.get(key, width.get("*", 1.0)) if isinstance(width, Mapping) else width
    if isinstance(spec, bool) or not isinstance(spec, (int, float)):
        raise WidthError(f"width for space {key!r} must be a factor (float) or a width (int), got {spec!r}")
    if isinstance(spec, float):
        if spec <= 0:
            raise WidthError(f"width factor for space {key!r} must be positive, got {spec}")
        k = max(1, int(round(n * spec)))
    else:
        k = int(spec)
    if k < 1:
        raise WidthError(f"width for space {key!r} must be at least 1, got {k}")
    return k


def selection_indices(
    graph: Graph,
    width: WidthSpec = 0.5,
    scores: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
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
    kinds = {s.name: s.kind for s in graph.spaces}
    trees = {s.name: s.tree for s in graph.spaces}
    cache: dict[str, torch.Tensor] = {}

    def choose(key: str, n: int, keep_all: bool = False, factor: float | None = None) -> torch.Tensor:
        if key in cache:
            return cache[key]
        if keep_all:
            k = n
        elif factor is not None:
            k = max(1, int(round(n * factor)))
        else:
            k = _leaf_width(key, n, width)
        if scores is not None and key in scores:
            sc = torch.as_tensor(scores[key]).flatten().double()
            if sc.numel() != n:
                raise WidthError(f"scores for space {key!r} have {sc.numel()} entries, expected {n}")
            order = torch.argsort(sc, descending=True)
            idx = torch.cat([torch.sort(order[:min(k, n)]).values, order[: max(k - n, 0)]]) if k > n \
                else torch.sort(order[:k]).values
        else:
            # widening repeats features (cyclically): copies split their consumers' weights
            idx = torch.arange(k) % n
        cache[key] = idx
        return idx

    def select(tree, keep_all=False, factor=None, name=None) -> torch.Tensor:
        kind = tree[0]
        if kind == "fixed":
            return torch.arange(tree[1])
        if kind == "leaf":
            return choose(tree[1], tree[2], keep_all, factor)
        if kind == "cat":
            out, off = [], 0
            for sub in tree[1]:
                out.append(select(sub, keep_all, factor) + off)
                off += tree_size(sub)
            return torch.cat(out)
        _, hkey, nh, parts = tree
        d = tree_size(parts[0])
        if kinds.get(hkey) == "heads":
            # attention: keep every head, shrink the dims within each head
            heads = choose(hkey, nh, keep_all=True)
            inner_all = keep_all
            if not keep_all and name is not None:
                per_head = _leaf_width(name, nh * d, width) / nh
                if per_head != int(per_head):
                    raise WidthError(f"space {name!r}: a width of {per_head * nh:g} does not split into {nh} heads")
                factor = per_head / d
        else:
            # blocks indexed by another feature space (depthwise conv): follow its selection
            own = trees.get(hkey)
            heads = select(own, name=hkey) if own is not None else choose(hkey, nh)
            inner_all = True
        return torch.cat([int(h) * d + select(parts[int(h)], inner_all, factor) for h in heads])

    result = {}
    for s in graph.spaces:
        result[s.name] = cache[s.name] if s.name in cache else select(s.tree, name=s.name)
        cache.setdefault(s.name, result[s.name])
    return result


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
    weights between the copies, so a widened model computes the same function (Net2Net). Attention
    logits keep their scale when head_dim changes (see :func:`alignment.maps.correct_query_key`).

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
        The resized model (same class, narrower widths).
    """
    if graph is None:
        if example_input is None:
            raise ValueError("resize needs example_input (or a graph from alignment.discover)")
        graph = discover(model, example_input)
    idx = selection_indices(graph, width, scores)
    maps = {s.name: plan_maps([permutation_plan(idx[s.name], s.width)], [1.0]) for s in graph.spaces if s.members}
    return apply_maps([model], [graph], correct_query_key(maps, [graph], [1.0]), alpha=[1.0])


def target_widths(graph: Graph) -> dict[str, int]:
    """Width of every space of a graph (for pairing a source with a target model by name)."""
    return {s.name: s.width for s in graph.spaces}


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
    want = {s.name: g_tgt[s.name].width for s in g_src.spaces}
    idx = selection_indices(g_src, want, scores)
    maps: dict[str, SpaceMap] = {}
    for s in g_src.spaces:
        if not s.members:
            continue
        if len(idx[s.name]) != g_tgt[s.name].width:
            raise WidthError(
                f"space {s.name!r}: the target's width {g_tgt[s.name].width} is not reachable by selection "
                f"from {s.width} with this structure"
            )
        maps[s.name] = plan_maps([permutation_plan(idx[s.name], s.width)], [1.0])
    return apply_maps([model], [g_src], correct_query_key(maps, [g_src], [1.0]), alpha=[1.0], target=target)
