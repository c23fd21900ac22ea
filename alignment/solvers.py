"""Solvers: statistics or weights of the spaces in, per-space merge/unmerge maps out.

Every method is registered by name (``@register_method("permute")``) and called as
``method(ctx) -> MatchResult``. Permutation methods share :func:`solve_permutations`, which walks each
space's structure: concatenation segments are matched separately, attention heads are matched as
blocks (a head-to-head score sums, over the query-key and value-output spaces sharing the heads,
the best within-head assignment), then dims within matched heads; blocks indexed by another feature
space (depthwise convs) follow that space's permutation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .errors import FusionError, SpaceMismatchError
from .graph import Graph, Space, tree_size
from .permute import axis_index, model_tensors

METHODS: dict[str, Callable[["MatchContext"], "MatchResult"]] = {}


class UnknownMethodError(FusionError, KeyError):
    """No fusion method is registered under the given name."""

    def __str__(self) -> str:
        return self.args[0]


def register_method(name: str):
    """Register a fusion method (a function ``ctx -> MatchResult``) under ``name``."""

    def deco(fn):
        METHODS[name] = fn
        fn.method_name = name
        return fn

    return deco


def list_methods() -> list[str]:
    """Names of the registered fusion methods."""
    return sorted(METHODS)


def get_method(name: str):
    """The method registered under ``name``."""
    if name not in METHODS:
        raise UnknownMethodError(f"unknown fusion method {name!r}; registered methods: {', '.join(list_methods())}")
    return METHODS[name]


@dataclass
class MatchContext:
    """What a method may use: models, graphs, lazily collected statistics, weights and options."""

    models: Sequence[nn.Module]
    graphs: Sequence[Graph]
    alpha: Sequence[float]
    statistics: Callable[[], Any] | None = None
    target_graph: Graph | None = None
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class MatchResult:
    """Per-space permutations (or maps) chosen by a method, with per-space costs for the report.

    Attributes:
        perms: per model, per space name, ``perm`` with fused feature ``k`` = model feature ``perm[k]``
            (None for methods that return general maps).
        maps: per space name, a :class:`fusion.engine.SpaceMap` (filled by map-based methods).
        costs: per space name, a matching score (higher is better; e.g. mean matched correlation).
    """

    perms: list[dict[str, torch.Tensor]] | None = None
    maps: dict[str, Any] | None = None
    costs: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


# -------------------------------------------------------------------------------------------------
# the structure-aware permutation solver
def _lsa(S: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Maximum-weight assignment of rows to columns; returns (cols per row, total weight)."""
    A = S.detach().cpu().double().numpy()
    if not np.isfinite(A).all():
        A = np.nan_to_num(A, nan=0.0, posinf=0.0, neginf=0.0)
    r, c = linear_sum_assignment(A, maximize=True)
    perm = torch.empty(A.shape[0], dtype=torch.long)
    perm[torch.as_tensor(r)] = torch.as_tensor(c, dtype=torch.long)
    return perm, float(A[r, c].sum())


def _solve_tree(tree, S: torch.Tensor, cache: dict[str, torch.Tensor], groups) -> torch.Tensor:
    kind = tree[0]
    if kind == "fixed":
        return torch.arange(tree[1])
    if kind == "leaf":
        key = tree[1]
        if key not in cache:
            cache[key] = _lsa(S)[0]
        return cache[key]
    if kind == "cat":
        out, off = [], 0
        for sub in tree[1]:
            n = tree_size(sub)
            out.append(_solve_tree(sub, S[off:off + n, off:off + n], cache, groups) + off)
            off += n
        return torch.cat(out)
    _, hkey, nh, parts = tree
    d = tree_size(parts[0])
    if hkey not in cache:
        raise SpaceMismatchError(f"internal: heads {hkey!r} must be solved before the spaces they structure")
    pi = cache[hkey]
    keys = {p[1] for p in parts if p[0] == "leaf"}
    if len(keys) == 1 and all(p[0] == "leaf" for p in parts) and next(iter(keys)) not in cache:
        # one inner class shared by every head: one assignment over all matched head blocks
        total = sum(S[h * d:(h + 1) * d, int(pi[h]) * d:(int(pi[h]) + 1) * d] for h in range(nh))
        cache[next(iter(keys))] = _lsa(total)[0]
    out = []
    for h in range(nh):
        g = int(pi[h])
        inner = _solve_tree(parts[h], S[h * d:(h + 1) * d, g * d:(g + 1) * d], cache, groups)
        out.append(g * d + inner)
    return torch.cat(out)


def _head_groups(graph: Graph) -> dict[str, list[Space]]:
    """Spaces structured by each attention heads space (heads spaces of kind 'heads')."""
    groups: dict[str, list[Space]] = {}
    for s in graph.spaces:
        if s.tree and s.tree[0] == "heads" and graph[s.tree[1]].kind == "heads":
            groups.setdefault(s.tree[1], []).append(s)
    return groups


def _solve_heads(spaces: list[Space], sims: dict[str, torch.Tensor]) -> torch.Tensor:
    """Head assignment maximising, over coupled spaces, the best within-head assignment."""
    nh = spaces[0].tree[2]
    score = torch.zeros(nh, nh, dtype=torch.float64)
    for s in spaces:
        d = s.width // nh
        S = sims[s.name]
        for a in range(nh):
            for b in range(nh):
                score[a, b] += _lsa(S[a * d:(a + 1) * d, b * d:(b + 1) * d])[1]
    return _lsa(score)[0]


def solve_permutations(graph: Graph, sims: Callable[[str], torch.Tensor], spaces: Sequence[Space] | None = None,
                       cache: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Permutations of every space of one model onto a reference, from per-space similarities.

    Args:
        graph: the reference model's graph (defines structure and fused order).
        sims: ``sims(space_name)`` -> similarity matrix (reference features x model features).
        spaces: the spaces to solve (default: all); others must already be in ``cache``.
        cache: permutations already fixed (by space or internal key); updated in place.

    Returns:
        (perm per space name, mean matched similarity per space).
    """
    cache = {} if cache is None else cache
    todo = list(graph.spaces if spaces is None else spaces)
    groups = _head_groups(graph)
    S_cache: dict[str, torch.Tensor] = {}

    def S(name):
        if name not in S_cache:
            S_cache[name] = sims(name)
        return S_cache[name]

    perms: dict[str, torch.Tensor] = {}
    costs: dict[str, float] = {}
    # 1. plain feature spaces; 2. attention heads (jointly per heads space); 3. the rest
    def rank(s: Space) -> int:
        if s.kind != "features":
            return 3
        if s.tree and s.tree[0] == "heads":
            return 2
        return 1

    for s in sorted(todo, key=rank):
        if s.kind == "heads":
            continue
        if s.tree[0] == "heads" and s.tree[1] not in cache:
            hkey = s.tree[1]
            group = [g for g in groups.get(hkey, [s]) if g in todo or g.name == s.name]
            cache[hkey] = _solve_heads(group, {g.name: S(g.name) for g in group})
        if s.kind == "inner" and s.name in cache:
            perms[s.name] = cache[s.name]
            continue
        p = _solve_tree(s.tree, S(s.name), cache, groups)
        perms[s.name] = p
        cache.setdefault(s.name, p)
        Sm = S(s.name)
        costs[s.name] = float(Sm[torch.arange(len(p)), p].mean()) if Sm.shape[0] == Sm.shape[1] else float("nan")
    for s in todo:
        if s.kind == "heads":
            perms[s.name] = cache.get(s.name, torch.arange(s.width))
        elif s.name not in perms:
            perms[s.name] = cache.get(s.name, torch.arange(s.width))
    return perms, costs


# -------------------------------------------------------------------------------------------------
# methods
def _check_same_widths(ctx: MatchContext, method: str) -> None:
    g0 = ctx.graphs[0]
    for g in ctx.graphs[1:]:
        for s in g0.spaces:
            if s.name not in g:
                raise SpaceMismatchError(f"{method}: space {s.name!r} missing from a model; models must be of one family")
            if g[s.name].width != s.width:
                raise SpaceMismatchError(
                    f"{method}: space {s.name!r} has widths {s.width} and {g[s.name].width}; permutation "
                    f"matching needs equal widths (use method='ot', or a target model, for different widths)"
                )


@register_method("average")
def average(ctx: MatchContext) -> MatchResult:
    """Plain weight averaging: every model's features are taken in their own order."""
    t0 = time.perf_counter()
    _check_same_widths(ctx, "average")
    perms = [{s.name: torch.arange(s.width) for s in ctx.graphs[0].spaces} for _ in ctx.models]
    return MatchResult(perms=perms, seconds=time.perf_counter() - t0)


@register_method("permute")
def activation_matching(ctx: MatchContext) -> MatchResult:
    """Hungarian matching of hidden units on the correlation of their activations (Git Re-Basin).

    Every model is matched to the first (the reference); options ``iterations`` (default 0 for two
    models, 3 for more) then rematch each model to the others in the fused order (MergeMany).
    """
    t0 = time.perf_counter()
    _check_same_widths(ctx, "permute")
    stats = ctx.statistics()
    g0 = ctx.graphs[0]
    n = len(ctx.models)
    corr = {s.name: stats.correlation(s.name) for s in g0.spaces if s.name in stats.points}

    def sim_pair(i, j):
        def f(name):
            if name not in corr:
                w = g0[name].width
                return torch.eye(w, dtype=torch.float64)
            return stats.block(corr[name], name, i, j)
        return f

    perms = [{s.name: torch.arange(s.width) for s in g0.spaces}]
    costs: dict[str, float] = {}
    for i in range(1, n):
        p, c = solve_permutations(g0, sim_pair(0, i))
        perms.append(p)
        for k, v in c.items():
            costs[k] = costs.get(k, 0.0) + v / (n - 1)
    iterations = int(ctx.options.get("iterations", 0 if n == 2 else 3))
    for _ in range(iterations):
        changed = False
        for i in range(n):
            def sim(name, i=i):
                if name not in corr:
                    return torch.eye(g0[name].width, dtype=torch.float64)
                total = 0
                for j in range(n):
                    if j != i:
                        total = total + stats.block(corr[name], name, j, i)[perms[j][name]]
                return total
            new, _ = solve_permutations(g0, sim)
            changed |= any(not torch.equal(new[k], perms[i][k]) for k in new)
            perms[i] = new
        if not changed:
            break
    return MatchResult(perms=perms, costs=costs, seconds=time.perf_counter() - t0)


@register_method("weight_matching")
def weight_matching(ctx: MatchContext) -> MatchResult:
    """Git Re-Basin weight matching: coordinate descent over spaces, no data.

    Options: ``max_iter`` (default 100) sweeps over the spaces in random order (``seed``).
    """
    t0 = time.perf_counter()
    _check_same_widths(ctx, "weight_matching")
    g0 = ctx.graphs[0]
    tens = [{k: v.detach().double() for k, v in model_tensors(m).items()} for m in ctx.models]
    max_iter = int(ctx.options.get("max_iter", 100))
    gen = torch.Generator().manual_seed(ctx.seed)
    perms = [{s.name: torch.arange(s.width) for s in g0.spaces}]
    costs: dict[str, float] = {}
    groups = _head_groups(g0)
    units: list[list[Space]] = []
    grouped = {s.name for ss in groups.values() for s in ss}
    for s in g0.spaces:
        if s.kind == "features" and s.name not in grouped and s.tree[0] != "heads":
            units.append([s])
    units.extend(groups.values())
    units.extend([[s] for s in g0.spaces if s.kind == "features" and s.tree[0] == "heads" and s.name not in grouped])
    for i in range(1, len(ctx.models)):
        cache: dict[str, torch.Tensor] = {}
        current = {s.name: torch.arange(s.width) for s in g0.spaces}

        def sim(name, i=i):
            return _weight_similarity(g0, ctx.graphs[i], name, tens[0], tens[i], current)

        for it in range(max_iter):
            changed = False
            order = torch.randperm(len(units), generator=gen).tolist()
            for u in order:
                unit = units[u]
                for s in unit:
                    for key in _keys(s.tree):
                        cache.pop(key, None)
                new, c = solve_permutations(g0, sim, spaces=unit, cache=cache)
                for s in unit:
                    if not torch.equal(new[s.name], current[s.name]):
                        changed = True
                    current[s.name] = new[s.name]
                    cache[s.name] = new[s.name]
                    costs[s.name] = c.get(s.name, float("nan"))
                _sync_derived(g0, cache, current)
            if not changed:
                break
        perms.append(dict(current))
    return MatchResult(perms=perms, costs=costs, seconds=time.perf_counter() - t0)


def _keys(tree) -> list[str]:
    k = tree[0]
    if k == "leaf":
        return [tree[1]]
    if k == "cat":
        return [x for t in tree[1] for x in _keys(t)]
    if k == "heads":
        return [tree[1]] + [x for t in tree[3] for x in _keys(t)]
    return []


def _sync_derived(graph: Graph, cache, current) -> None:
    for s in graph.spaces:
        if s.kind != "features" and s.name in cache:
            current[s.name] = cache[s.name]


def _weight_similarity(g0: Graph, gi: Graph, name: str, t0: dict, ti: dict, perms: dict) -> torch.Tensor:
    """Sum over the space's member axes of W0 . (Wi with its other axes permuted)^T."""
    s0, si = g0[name], gi[name]
    total = torch.zeros(s0.width, si.width, dtype=torch.float64)
    members_i = {(m.tensor, m.axis, r): m for r, m in _ranked(si.members)}
    for r, m in _ranked(s0.members):
        mi = members_i.get((m.tensor, m.axis, r))
        if mi is None:
            continue
        A = t0[m.tensor]
        B = ti[mi.tensor]
        for ax in range(B.dim()):
            if ax == m.axis:
                continue
            idx = axis_index(gi, mi.tensor, ax, perms)
            if idx is not None:
                B = B.index_select(ax, idx)
        A = A.movedim(m.axis, 0)[m.start:m.stop].reshape(m.stop - m.start, -1)
        B = B.movedim(mi.axis, 0)[mi.start:mi.stop].reshape(mi.stop - mi.start, -1)
        if A.shape[1] == B.shape[1]:
            total += A @ B.t()
    return total


def _ranked(members):
    seen: dict[tuple, int] = {}
    for m in members:
        k = (m.tensor, m.axis)
        r = seen.get(k, 0)
        seen[k] = r + 1
        yield r, m
