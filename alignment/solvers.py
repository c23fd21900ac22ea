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
from .graph import Graph, Space, ranked_members, tree_size
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
        maps: per space name, a :class:`alignment.maps.SpaceMap` (methods whose maps do not depend on
            the interpolation weights).
        plans: per model, per space name, a non-negative ``n x n_i`` plan from the model's features to
            the fused ones (see :func:`alignment.maps.plan_maps`); used by methods for any widths.
        costs: per space name, a matching score (higher is better; e.g. mean matched correlation).
    """

    perms: list[dict[str, torch.Tensor]] | None = None
    maps: dict[str, Any] | None = None
    plans: list[dict[str, torch.Tensor]] | None = None
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
    for g in list(ctx.graphs[1:]) + ([ctx.target_graph] if ctx.target_graph is not None else []):
        for s in g0.spaces:
            if s.name not in g:
                raise SpaceMismatchError(f"{method}: space {s.name!r} missing from a model; models must be of one family")
            if g[s.name].width != s.width:
                raise SpaceMismatchError(
                    f"{method}: space {s.name!r} has widths {s.width} and {g[s.name].width}; permutation "
                    f"{method} needs equal widths (use method='ot', 'merge' or 'permute' for different widths)"
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
    When the models' widths differ from the target's, matching is one-to-one on rectangular
    correlation matrices against an anchor model of the target width: the best-matched units are
    kept and the others dropped (or, when widening, fused units matched by fewer models average
    those that match them).
    """
    if not _same_widths_as_target(ctx):
        return _rect_permute(ctx)
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
    members_i = {(m.tensor, m.axis, r): m for r, m in ranked_members(si.members)}
    for r, m in ranked_members(s0.members):
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


# -------------------------------------------------------------------------------------------------
# map-based methods: any widths (see alignment.transport)
def _target(ctx: MatchContext) -> Graph:
    return ctx.target_graph if ctx.target_graph is not None else ctx.graphs[0]


def _same_widths_as_target(ctx: MatchContext) -> bool:
    t = _target(ctx)
    return all(s.name in g and g[s.name].width == s.width for g in ctx.graphs for s in t.spaces)


def _activation_or_weight_gram(ctx: MatchContext, cost: str, walk_plans):
    from .transport import activation_gram, weight_gram

    tensors = [{k: v.detach().double().cpu() for k, v in model_tensors(m).items()} for m in ctx.models]
    wgram = weight_gram(ctx.graphs, _target(ctx), tensors, walk_plans)
    if cost == "weights":
        return wgram
    stats = ctx.statistics()
    g0 = ctx.graphs[0]

    def kind(name: str) -> str:
        if cost != "auto":
            return cost
        # measured on the zoo: BatchNorm spaces match best by correlation (BN rescales units),
        # spaces without it (ViT residual streams, MLPs) by Euclidean distance (scale matters)
        return "correlation" if any(m.tensor.endswith("running_mean") for m in g0[name].members) else "distance"

    agram = activation_gram(stats, kind)

    def gram(name):
        # spaces with no observation point (rare) are compared by their weights
        return agram(name) if name in stats.points else wgram(name)
    return gram


def _option(ctx: MatchContext, name: str, default, allowed=None):
    v = ctx.options.get(name, default)
    if allowed is not None and v not in allowed:
        raise SpaceMismatchError(f"option {name}={v!r} is not one of {', '.join(map(str, allowed))}")
    return v


def _plan_method(ctx: MatchContext, leaf_solver, cost: str, scores=None, sweeps: int = 1) -> MatchResult:
    from .transport import PlanWalk

    t0 = time.perf_counter()
    target = _target(ctx)
    for i, g in enumerate(ctx.graphs):
        missing = [s.name for s in target.spaces if s.members and s.name not in g]
        if missing:
            raise SpaceMismatchError(f"model {i} has no space(s) {missing[:4]} of the target; models and target "
                                     f"must be of one family")
    anchor = ctx.options.get("anchor")
    if anchor is not None and not (isinstance(anchor, int) and 0 <= anchor < len(ctx.models)):
        raise SpaceMismatchError(f"anchor={anchor!r} is not a model index (0..{len(ctx.models) - 1})")
    holder: dict[str, Any] = {"walk": None, "prev": {}}

    def plans_of(name):
        # the newest plan of a space: solved in this sweep, else in the last one (Gauss-Seidel)
        w = holder["walk"]
        if w is not None and name in w.plans:
            return w.plans[name]
        return holder["prev"].get(name)

    gram = _activation_or_weight_gram(ctx, cost, plans_of)
    walk = None
    for _ in range(max(1, sweeps)):
        walk = PlanWalk(ctx.graphs, target, ctx.alpha, gram, leaf_solver, anchor=anchor, scores=scores,
                        seed=ctx.seed)
        holder["walk"] = walk
        new = walk.solve_all()
        prev = holder["prev"]
        changed = not prev or any(not all(torch.allclose(a, b) for a, b in zip(new[k], prev[k])) for k in new)
        holder["prev"] = dict(new)
        if not changed:
            break
    return MatchResult(plans=[{k: v[i] for k, v in walk.plans.items()} for i in range(len(ctx.models))],
                       costs=dict(walk.costs), seconds=time.perf_counter() - t0)


@register_method("ot")
def optimal_transport(ctx: MatchContext) -> MatchResult:
    """Optimal-transport fusion (OTFusion) for any widths, soft or exact.

    Every model's units are transported onto the target's units with uniform masses; the merge map
    of a fused unit averages what was sent to it, the unmerge map spreads a model unit over where it
    went. The target units are those of an *anchor* model of the target width (the first such model,
    or option ``anchor``); where no model has the target width (compression, or fusion into a new
    width) they are a free-support barycenter of all models' units, seeded by k-means++.

    Options:
        cost: ``"auto"`` (default: correlation for spaces with BatchNorm, distance elsewhere;
            measured on the zoo, see benchmarks/results/fuse_widths.md), ``"correlation"`` (one
            minus activation correlation), ``"distance"`` (Euclidean distance between activations)
            or ``"weights"`` (between weight vectors; no calibration data needed).
        solver: ``"emd"`` (exact, default) or ``"sinkhorn"`` (entropic).
        reg: Sinkhorn regularisation relative to the largest cost (default 0.01).
        anchor: index of the anchor model.
        iterations: barycenter iterations (default 0 with an anchor model, else 20).
        sweeps: for ``cost="weights"``, passes over all spaces (each uses the others' last plans;
            default 5).
    """
    from functools import partial

    from .transport import COSTS, ot_leaf

    cost = _option(ctx, "cost", "auto", COSTS)
    solver = _option(ctx, "solver", "emd", ("emd", "sinkhorn"))
    reg = float(ctx.options.get("reg", 0.01))
    iterations = ctx.options.get("iterations")
    leaf = partial(ot_leaf, solver=solver, reg=reg, iterations=iterations)
    sweeps = int(ctx.options.get("sweeps", 5)) if cost == "weights" else 1
    return _plan_method(ctx, leaf, cost, sweeps=sweeps)


def _rect_permute(ctx: MatchContext) -> MatchResult:
    """Hungarian matching for different widths: one-to-one pairs, the best-matched units kept."""
    from functools import partial

    from .transport import ot_leaf

    leaf = partial(ot_leaf, solver="hungarian", iterations=ctx.options.get("iterations"))
    return _plan_method(ctx, leaf, "correlation")


@register_method("merge")
def correlation_merge(ctx: MatchContext) -> MatchResult:
    """Merge the most correlated features (agglomerative, average linkage) down to the target width.

    Units of every model are pooled and the most similar groups merged first, within one model or
    across models, until the target width remains; a fused unit is the (model-weighted) mean of its
    group. With one model this is compression by merging redundant features.

    Options:
        cost: ``"correlation"`` (default) or ``"weights"`` (cosine of weight vectors).
    """
    from .transport import merge_leaf

    cost = _option(ctx, "cost", "correlation", ("correlation", "weights"))
    return _plan_method(ctx, merge_leaf, cost)


@register_method("magnitude")
def magnitude_pruning(ctx: MatchContext) -> MatchResult:
    """Structured magnitude pruning of one model: keep the units of largest L1 weight norm.

    The baseline for compression. A unit's score sums the L1 norms of its rows in every weight matrix
    that produces the space (every conv or linear writing to a residual stream). Needs no data.
    """
    from .transport import magnitude_leaf, magnitude_scores

    if len(ctx.models) != 1:
        raise SpaceMismatchError(f"magnitude pruning compresses one model, got {len(ctx.models)}; "
                                 f"use method='ot' or 'merge' to fuse several")
    tensors = model_tensors(ctx.models[0])
    g = ctx.graphs[0]
    return _plan_method(ctx, magnitude_leaf, "weights", scores=lambda name: magnitude_scores(g, tensors, name))
