"""Map solvers for any widths: optimal transport, rectangular matching, merging and magnitude selection.

These solvers return per-space *plans* (see :mod:`alignment.maps`): for model ``i`` a non-negative
``n x n_i`` matrix from its features to the ``n`` fused features, where ``n`` is the width of the
space in the *target graph* (a model the user built, a resized copy, or the first model). They all
share one structure walk (:class:`PlanWalk`):

* concatenation segments are solved separately;
* attention heads are kept (the head count must agree) and matched as blocks to a reference model's
  heads, then the dims within each head are solved (so head_dim may change);
* blocks indexed by another space (depthwise convs) follow that space's plan;
* a leaf (a plain run of features) is given to a *leaf solver*: OT against an anchor, rectangular
  Hungarian, agglomerative correlation merge, or magnitude selection.

Units are compared through a Gram matrix over the features of all models pooled (activation
correlation, activation second moments, or inner products of weight vectors), so anchors that are
not a model's own features (a barycenter, a cluster centre) are linear combinations of units and
every cost is computed from the Gram matrix alone.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .errors import FusionError, SpaceMismatchError
from .graph import Graph, ranked_members, tree_size
from .maps import plan_maps

PLAN_SOLVERS = ("emd", "sinkhorn", "hungarian")
COSTS = ("auto", "correlation", "distance", "weights")


class TransportError(FusionError, ValueError):
    """An optimal-transport option is invalid or the problem has no solution."""


# -------------------------------------------------------------------------------------------------
# plans between two sets of units
def transport_plan(cost: torch.Tensor, solver: str = "emd", reg: float = 0.01,
                   a: torch.Tensor | None = None, b: torch.Tensor | None = None,
                   num_iter: int = 10000) -> torch.Tensor:
    """A transport plan between ``n`` target and ``m`` source units.

    Args:
        cost: ``n x m`` ground cost (target units x source units).
        solver: ``"emd"`` (exact OT, POT's network simplex), ``"sinkhorn"`` (entropic OT in the log
            domain) or ``"hungarian"`` (a 0/1 one-to-one matching of ``min(n, m)`` pairs).
        reg: entropic regularisation for Sinkhorn, relative to the cost scale (costs are divided by
            their largest value first, so ``reg`` means the same on every space).
        a: target masses (default uniform, total 1).
        b: source masses (default uniform, total 1).
        num_iter: iteration cap of the OT solvers.

    Returns:
        The plan (float64, ``n x m``).
    """
    import ot

    C = cost.detach().double().cpu()
    n, m = C.shape
    if not torch.isfinite(C).all():
        C = torch.nan_to_num(C, nan=float(C[torch.isfinite(C)].max()) if torch.isfinite(C).any() else 0.0)
    if solver == "hungarian":
        r, c = linear_sum_assignment(C.numpy())
        T = torch.zeros(n, m, dtype=torch.float64)
        T[torch.as_tensor(r), torch.as_tensor(c)] = 1.0 / max(n, m)
        return T
    a = torch.full((n,), 1.0 / n, dtype=torch.float64) if a is None else a.double().cpu() / a.sum()
    b = torch.full((m,), 1.0 / m, dtype=torch.float64) if b is None else b.double().cpu() / b.sum()
    scale = float(C.abs().max())
    Cn = (C / scale if scale > 0 else C).numpy()
    if solver == "emd":
        T = ot.emd(a.numpy(), b.numpy(), Cn, numItermax=max(num_iter, 100000))
    elif solver == "sinkhorn":
        if not reg > 0:
            raise TransportError(f"Sinkhorn needs reg > 0, got {reg}; use solver='emd' for exact OT")
        T = ot.sinkhorn(a.numpy(), b.numpy(), Cn, reg, method="sinkhorn_log", numItermax=num_iter, stopThr=1e-10)
    else:
        raise TransportError(f"unknown OT solver {solver!r}; use one of {', '.join(PLAN_SOLVERS)}")
    return torch.as_tensor(np.asarray(T), dtype=torch.float64)


def gram_cost(A: torch.Tensor, G: torch.Tensor, cols: torch.Tensor, kind: str) -> torch.Tensor:
    """Cost between anchors ``A @ units`` (rows of ``A`` over pooled units) and the units ``cols``.

    ``kind="correlation"``: ``1 - cos`` in the Gram geometry (for a correlation Gram, one minus the
    correlation); otherwise the Euclidean distance.
    """
    AG = A @ G[:, cols]
    aa = (A @ G * A).sum(1).clamp_min(0)
    gg = G[cols, cols].clamp_min(0)
    if kind == "correlation":
        den = (aa[:, None] * gg[None, :]).sqrt()
        return 1.0 - torch.where(den > 1e-300, AG / den.clamp_min(1e-300), torch.zeros_like(AG))
    return (aa[:, None] + gg[None, :] - 2 * AG).clamp_min(0).sqrt()


def _cosine(A: torch.Tensor, G: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return 1.0 - gram_cost(A, G, cols, "correlation")


# -------------------------------------------------------------------------------------------------
# leaf solvers: pooled Gram of one leaf in, per-model plans out
class Leaf:
    """One leaf problem: ``n`` fused units from the units of every model, pooled.

    Attributes:
        G: Gram matrix over the pooled units (model 0's first, then model 1's, ...).
        sizes: number of units of each model.
        n: fused width.
        alpha: model weights.
        anchor: a model whose units define the fused ones (its size is ``n``), or None.
        scores: optional per-unit scores (pooled), e.g. weight magnitudes.
        seed: seed for randomised solvers.
        cost: the Gram's geometry: ``"correlation"`` (compare directions) or ``"distance"``.
    """

    def __init__(self, G, sizes, n, alpha, anchor=None, scores=None, seed=0, cost="correlation"):
        self.G, self.sizes, self.n, self.alpha = G, list(sizes), int(n), list(alpha)
        self.anchor, self.scores, self.seed, self.cost = anchor, scores, seed, cost
        offs = [0]
        for s in self.sizes:
            offs.append(offs[-1] + s)
        self.cols = [torch.arange(offs[i], offs[i + 1]) for i in range(len(self.sizes))]


def ot_leaf(leaf: Leaf, solver: str = "emd", reg: float = 0.01, cost: str | None = None,
            iterations: int | None = None) -> tuple[list[torch.Tensor], float]:
    """OT of every model's units onto ``n`` anchors; anchors refined as the barycenter.

    The anchors are the units of ``leaf.anchor`` when given, else seeded by balanced greedy merging
    of the pooled units (:func:`merge_leaf`). Each iteration transports every model onto the anchors and moves the anchors to the fused
    units those plans define (a free-support Wasserstein barycenter; with one model and fewer anchors
    than units, balanced k-means). ``iterations`` defaults to 0 with a model anchor (OTFusion) and
    20 otherwise; iterations stop early once the plans no longer change. A model narrower than the
    target, when another model has the target width, is transported partially: each of its units
    goes (in total) to one fused unit's worth of mass, and fused units it does not match take
    nothing from it.

    Returns:
        (plans, mean matched cosine similarity).
    """
    G, n = leaf.G, leaf.n
    cost = cost or leaf.cost
    P = G.shape[0]
    if leaf.anchor is not None:
        A = torch.zeros(n, P, dtype=torch.float64)
        A[torch.arange(n), leaf.cols[leaf.anchor]] = 1.0
        iters = 0 if iterations is None else iterations
    elif n < P:
        # seed the barycenter with balanced greedy merging (exact when units come in copies)
        A = torch.cat(plan_maps(merge_leaf(leaf)[0], leaf.alpha).merge, dim=1)
        iters = 20 if iterations is None else iterations
    else:
        # widening beyond every unit: anchors are the units, repeated
        A = torch.zeros(n, P, dtype=torch.float64)
        A[torch.arange(n), torch.arange(n) % P] = 1.0
        iters = 20 if iterations is None else iterations
    # a model narrower than the target while another model covers every fused unit sends each unit
    # once (partial transport: a zero-cost dummy source fills the rest), instead of splitting every
    # unit over several fused units of which only one matches it
    covered = max(leaf.sizes) >= n

    def plan(C: torch.Tensor) -> torch.Tensor:
        m = C.shape[1]
        if solver == "hungarian" or m >= n or not covered:
            return transport_plan(C, solver, reg)
        Cd = torch.cat([C, torch.zeros(n, 1, dtype=C.dtype)], dim=1)
        b = torch.cat([torch.full((m,), 1.0 / n, dtype=torch.float64), torch.tensor([(n - m) / n], dtype=torch.float64)])
        return transport_plan(Cd, solver, reg, b=b)[:, :m]

    plans: list[torch.Tensor] = []
    for it in range(iters + 1):
        new = [plan(gram_cost(A, G, c, cost)) for c in leaf.cols]
        done = plans and all(torch.allclose(x, y, atol=1e-12) for x, y in zip(new, plans))
        plans = new
        if done or it == iters:
            break
        maps = plan_maps(plans, leaf.alpha)
        A = torch.cat(maps.merge, dim=1)
    return plans, _score(plans, A, G, leaf.cols)


def _score(plans, A, G, cols) -> float:
    total, mass = 0.0, 0.0
    for T, c in zip(plans, cols):
        total += float((T * _cosine(A, G, c)).sum())
        mass += float(T.sum())
    return total / mass if mass > 0 else float("nan")


def merge_leaf(leaf: Leaf, balanced: bool = True) -> tuple[list[torch.Tensor], float]:
    """Agglomerative merge of the most similar units (average linkage on cosine similarity).

    Pooled units of all models (and of one model, for compression) are merged, most similar groups
    first, within one model or across models, until ``n`` groups remain; each group is one fused unit.
    ``balanced`` caps groups at ``ceil(P / n)`` units (``P`` pooled units; the cap grows only if
    no allowed merge is left), so halving a width merges pairs, as in ZipIt, instead of growing a
    few large blobs.
    """
    G, n = leaf.G, leaf.n
    P = G.shape[0]
    if n > P:
        raise SpaceMismatchError(f"merging cannot widen: {P} units into {n}; use method='ot' to widen")
    eye = torch.eye(P, dtype=torch.float64)
    S = _cosine(eye, G, torch.arange(P))
    S.fill_diagonal_(-math.inf)
    size = torch.ones(P, dtype=torch.float64)
    label = torch.arange(P)
    alive = torch.ones(P, dtype=torch.bool)
    cap = math.ceil(P / n) if balanced else P
    for _ in range(P - n):
        while True:
            too_big = (size[:, None] + size[None, :]) > cap
            masked = S.masked_fill(too_big, -math.inf)
            k = int(torch.argmax(masked))
            a, b = divmod(k, P)
            if a != b and alive[a] and alive[b] and masked[a, b] > -math.inf:
                break
            cap += 1
        if a > b:
            a, b = b, a
        row = (size[a] * S[a] + size[b] * S[b]) / (size[a] + size[b])
        S[a], S[:, a] = row, row
        S[a, a] = -math.inf
        S[b], S[:, b] = -math.inf, -math.inf
        size[a] += size[b]
        label[label == b] = a
        alive[b] = False
    groups = torch.nonzero(alive).flatten()
    cluster = {int(g): k for k, g in enumerate(groups)}
    member = torch.zeros(n, P, dtype=torch.float64)
    for u in range(P):
        member[cluster[int(label[u])], u] = 1.0
    plans = [member[:, c].clone() for c in leaf.cols]
    A = torch.cat(plan_maps(plans, leaf.alpha).merge, dim=1)
    return plans, _score(plans, A, G, leaf.cols)


def magnitude_leaf(leaf: Leaf) -> tuple[list[torch.Tensor], float]:
    """Keep the ``n`` units of largest score (weight L1 norm) of the one model (structured pruning)."""
    if len(leaf.sizes) != 1:
        raise SpaceMismatchError("magnitude pruning compresses one model; give a single model (or use 'ot')")
    if leaf.scores is None:
        raise SpaceMismatchError("magnitude pruning needs unit scores")
    if leaf.n > leaf.sizes[0]:
        raise SpaceMismatchError(f"pruning cannot widen: {leaf.sizes[0]} units into {leaf.n}")
    keep = torch.sort(torch.topk(leaf.scores.double(), leaf.n).indices).values
    T = torch.zeros(leaf.n, leaf.sizes[0], dtype=torch.float64)
    T[torch.arange(leaf.n), keep] = 1.0
    return [T], float("nan")


# -------------------------------------------------------------------------------------------------
# the structure walk
class PlanWalk:
    """Per-space plans for N models onto a target graph, following each space's structure.

    Args:
        graphs: the models' graphs.
        target: the target graph (fused widths and structure); spaces pair by name.
        alpha: model weights.
        gram: ``gram(space) -> (G, offsets, geometry)``: Gram over the pooled features of all models
            and how to compare in it (``"correlation"`` or ``"distance"``).
        leaf_solver: ``solver(Leaf) -> (plans, score)``.
        anchor: a model index whose units anchor every leaf of its size (default: the first model
            whose leaf has the target size).
        scores: optional ``scores(space) -> pooled unit scores``.
        seed: seed for randomised leaf solvers.
    """

    def __init__(self, graphs: Sequence[Graph], target: Graph, alpha: Sequence[float],
                 gram: Callable[[str], tuple[torch.Tensor, list[int], str]], leaf_solver,
                 anchor: int | None = None, scores: Callable[[str], torch.Tensor] | None = None,
                 seed: int = 0):
        self.graphs, self.target, self.alpha = list(graphs), target, list(alpha)
        self.gram, self.leaf_solver, self.anchor = gram, leaf_solver, anchor
        self.scores_fn, self.seed = scores, seed
        self.cache: dict[str, list[torch.Tensor]] = {}
        self.plans: dict[str, list[torch.Tensor]] = {}
        self.costs: dict[str, float] = {}
        self._leaf_scores: dict[str, list[float]] = {}
        self.groups: dict[str, list[str]] = {}
        for s in target.spaces:
            if s.tree and s.tree[0] == "heads" and target[s.tree[1]].kind == "heads":
                self.groups.setdefault(s.tree[1], []).append(s.name)

    # -- public ----------------------------------------------------------------------------------
    def order(self) -> list[str]:
        """Spaces with members, plain feature spaces first (others may follow them)."""
        def rank(s):
            if s.kind != "features":
                return 3
            return 2 if s.tree and s.tree[0] == "heads" else 1
        return [s.name for s in sorted(self.target.spaces, key=rank) if s.members]

    def solve(self, name: str) -> list[torch.Tensor]:
        """Per-model plans (``n x n_i``) of one space (solved once, then cached)."""
        if name in self.plans:
            return self.plans[name]
        for i, g in enumerate(self.graphs):
            if name not in g:
                raise SpaceMismatchError(f"space {name!r} is missing from model {i}; models must be of one family")
        G, off, geometry = self.gram(name)
        idx = [off[i] + torch.arange(g[name].width) for i, g in enumerate(self.graphs)]
        scores = self.scores_fn(name) if self.scores_fn is not None else None
        self._leaf_scores[name] = []
        self._geometry = geometry
        plans = self._walk(name, self.target[name].tree, [g[name].tree for g in self.graphs], idx, G, scores)
        self.plans[name] = plans
        vals = [v for v in self._leaf_scores[name] if not math.isnan(v)]
        self.costs[name] = sum(vals) / len(vals) if vals else float("nan")
        return plans

    def solve_all(self) -> dict[str, list[torch.Tensor]]:
        """Plans of every space with members."""
        for name in self.order():
            self.solve(name)
        return {k: v for k, v in self.plans.items()}

    def reset(self, name: str) -> None:
        """Forget a space's plans (and its leaves) so the next :meth:`solve` recomputes them."""
        self.plans.pop(name, None)
        for key in _tree_keys(self.target[name].tree):
            self.cache.pop(key, None)

    # -- walk ------------------------------------------------------------------------------------
    def _walk(self, space, ttree, strees, idx, G, scores):
        kind = ttree[0]
        for i, st in enumerate(strees):
            if st[0] != kind and not (kind == "leaf" and st[0] == "fixed") and not (kind == "fixed" and st[0] == "leaf"):
                raise SpaceMismatchError(
                    f"space {space!r}: model {i} has structure {st[0]!r} where the target has {kind!r}; "
                    f"models and target must be of one family")
        n = tree_size(ttree)
        if kind == "fixed" or any(st[0] == "fixed" for st in strees):
            for i, st in enumerate(strees):
                if tree_size(st) != n:
                    raise SpaceMismatchError(f"space {space!r}: a fixed range has {tree_size(st)} features in "
                                             f"model {i} but {n} in the target")
            return [torch.eye(n, dtype=torch.float64) for _ in strees]
        if kind == "leaf":
            key = ttree[1]
            if key not in self.cache:
                self.cache[key] = self._leaf(space, n, idx, G, scores)
            return self.cache[key]
        if kind == "cat":
            segs = ttree[1]
            for i, st in enumerate(strees):
                if len(st[1]) != len(segs):
                    raise SpaceMismatchError(f"space {space!r}: model {i} concatenates {len(st[1])} segments, "
                                             f"the target {len(segs)}")
            per_seg = []
            offs = [0] * len(strees)
            for j, sub in enumerate(segs):
                sub_s = [st[1][j] for st in strees]
                sub_idx = []
                for i, st in enumerate(sub_s):
                    w = tree_size(st)
                    sub_idx.append(idx[i][offs[i]:offs[i] + w])
                    offs[i] += w
                per_seg.append(self._walk(space, sub, sub_s, sub_idx, G, scores))
            return [torch.block_diag(*[p[i] for p in per_seg]) for i in range(len(strees))]
        _, hkey, nh, parts = ttree
        for i, st in enumerate(strees):
            if st[2] != nh:
                raise SpaceMismatchError(
                    f"space {space!r}: model {i} has {st[2]} heads (or blocks) where the target has {nh}; "
                    f"heads are kept when widths change (head_dim changes), so head counts must agree")
        d = tree_size(parts[0])
        if self.target[hkey].kind != "heads":
            # blocks indexed by another feature space (depthwise conv): follow that space's plan
            outer = self.solve(hkey)
            out = []
            for i, st in enumerate(strees):
                di = tree_size(st[3][0])
                if di != d:
                    raise SpaceMismatchError(f"space {space!r}: blocks of {di} features in model {i} but {d} in "
                                             f"the target (per-block widths of grouped convs must not change)")
                out.append(torch.kron(outer[i], torch.eye(d, dtype=torch.float64)))
            return out
        pis = self._heads(hkey)
        plans = [torch.zeros(n, tree_size(st), dtype=torch.float64) for st in strees]
        for h in range(nh):
            sub_s, sub_idx, cols = [], [], []
            for i, st in enumerate(strees):
                g = int(pis[i][h])
                di = tree_size(st[3][0])
                sub_s.append(st[3][g])
                sub_idx.append(idx[i][g * di:(g + 1) * di])
                cols.append((g * di, (g + 1) * di))
            sub = self._walk(space, parts[h], sub_s, sub_idx, G, scores)
            for i, (a, b) in enumerate(cols):
                plans[i][h * d:(h + 1) * d, a:b] = sub[i]
        return plans

    def _leaf(self, space, n, idx, G, scores):
        pool = torch.cat(idx)
        sizes = [len(x) for x in idx]
        anchor = self.anchor if self.anchor is not None and sizes[self.anchor] == n else None
        if anchor is None and self.anchor is None:
            anchor = next((i for i, s in enumerate(sizes) if s == n), None)
        sc = scores[pool] if scores is not None else None
        leaf = Leaf(G[pool][:, pool], sizes, n, self.alpha, anchor, sc, self.seed, self._geometry)
        plans, score = self.leaf_solver(leaf)
        self._leaf_scores[space].append(score)
        return plans

    def _heads(self, hkey: str) -> list[torch.Tensor]:
        """Per model, fused head ``h`` <- model head ``pi[h]``: matched to a reference model's heads."""
        if hkey in self.cache:
            return self.cache[hkey]
        group = self.groups.get(hkey, [])
        nh = self.target[hkey].width
        ref = self.anchor
        if ref is None:
            ref = next((i for i, g in enumerate(self.graphs)
                        if all(g[s].width == self.target[s].width for s in group)), 0)
        pis = []
        for i, g in enumerate(self.graphs):
            if i == ref:
                pis.append(torch.arange(nh))
                continue
            cost = torch.zeros(nh, nh, dtype=torch.float64)
            for s in group:
                G, off, geometry = self.gram(s)
                dr, di = self.graphs[ref][s].width // nh, g[s].width // nh
                for a in range(nh):
                    ra = off[ref] + torch.arange(a * dr, (a + 1) * dr)
                    A = torch.zeros(dr, G.shape[0], dtype=torch.float64)
                    A[torch.arange(dr), ra] = 1.0
                    for b in range(nh):
                        cb = off[i] + torch.arange(b * di, (b + 1) * di)
                        C = gram_cost(A, G, cb, geometry)
                        T = transport_plan(C, "emd")
                        cost[a, b] += float((T * C).sum())
            r, c = linear_sum_assignment(cost.numpy())
            pi = torch.empty(nh, dtype=torch.long)
            pi[torch.as_tensor(r)] = torch.as_tensor(c, dtype=torch.long)
            pis.append(pi)
        self.cache[hkey] = pis
        return pis


def _tree_keys(tree) -> list[str]:
    k = tree[0]
    if k == "leaf":
        return [tree[1]]
    if k == "cat":
        return [x for t in tree[1] for x in _tree_keys(t)]
    if k == "heads":
        return [x for t in tree[3] for x in _tree_keys(t)]
    return []


# -------------------------------------------------------------------------------------------------
# Gram matrices
def activation_gram(stats, kind: str | Callable[[str], str] = "correlation"
                    ) -> Callable[[str], tuple[torch.Tensor, list[int], str]]:
    """``gram(space)`` from collected statistics: the pooled correlation (``kind="correlation"``), or
    second moments (covariance plus the outer product of the means: Euclidean distances between
    activations, ``kind="distance"``); ``kind`` may be a function of the space name."""
    def gram(name: str):
        k = kind(name) if callable(kind) else kind
        if k == "correlation":
            G = stats.correlation(name).double()
            # units that are constant on the calibration data (dead ReLUs) correlate with nothing;
            # an extra shared dimension makes them alike (two dead units pair with each other, not
            # with a live unit) and gives every unit unit norm
            e = (1.0 - G.diagonal()).clamp(0, 1).sqrt()
            G = G + torch.outer(e, e)
        else:
            mu = stats.mean(name)
            G = stats.covariance(name) + torch.outer(mu, mu)
        return G.double().cpu(), stats.offsets(name), k
    return gram


def unit_weight_rows(graphs: Sequence[Graph], tensors: Sequence[dict[str, torch.Tensor]], name: str,
                     maps: Sequence[dict]) -> list[torch.Tensor]:
    """Per model, one row per unit of space ``name``: the unit's weights on every member tensor,
    with the tensors' other axes carried into the fused basis by ``maps[i]`` (single-model maps).

    Members pair across models by (tensor, axis, rank); members missing from a model are skipped.
    """
    from .maps import axis_roles, map_tensor

    ranked = [{(m.tensor, m.axis, r): m for r, m in ranked_members(g[name].members)} for g in graphs]
    keys = [k for k in ranked[0] if all(k in rk for rk in ranked[1:])]
    out = []
    for i, g in enumerate(graphs):
        roles = axis_roles(g)
        rows = []
        for k in keys:
            m = ranked[i][k]
            t = map_tensor(tensors[i][m.tensor], g, m.tensor, roles, maps[i], 0, 1.0, skip_axis=m.axis)
            rows.append(t.movedim(m.axis, 0)[m.start:m.stop].reshape(m.stop - m.start, -1))
        out.append(torch.cat(rows, dim=1) if rows else torch.zeros(g[name].width, 0, dtype=torch.float64))
    widths = {r.shape[1] for r in out}
    if len(widths) > 1:
        raise SpaceMismatchError(f"space {name!r}: weight rows of different lengths {sorted(widths)} across models")
    return out


def initial_plan(n: int, n_i: int) -> torch.Tensor:
    """Identity plan between widths ``n`` and ``n_i`` (first units kept; units tiled when widening)."""
    T = torch.zeros(n, n_i, dtype=torch.float64)
    T[torch.arange(n), torch.arange(n) % n_i] = 1.0
    return T


def weight_gram(graphs: Sequence[Graph], target: Graph, tensors: Sequence[dict[str, torch.Tensor]],
                plans: Callable[[str], list[torch.Tensor] | None]) -> Callable[[str], tuple[torch.Tensor, list[int], str]]:
    """``gram(space)`` from weights: inner products of units' weight rows in the fused basis.

    ``plans(space)`` gives the current per-model plans of a space (None: not solved yet, the identity
    plan is used), so the Gram of a space depends on the alignment of its neighbours.
    """
    from .maps import SpaceMap

    def maps_for(i: int) -> dict:
        out = {}
        for s in target.spaces:
            if not s.members or s.name not in graphs[i]:
                continue
            p = plans(s.name)
            T = p[i] if p is not None else initial_plan(s.width, graphs[i][s.name].width)
            m = plan_maps([T], [1.0])
            out[s.name] = SpaceMap(m.merge, m.unmerge)
        return out

    def gram(name: str):
        R = unit_weight_rows(graphs, tensors, name, [maps_for(i) for i in range(len(graphs))])
        Rc = torch.cat(R, dim=0)
        off = [0]
        for r in R:
            off.append(off[-1] + r.shape[0])
        return Rc @ Rc.t(), off, "distance"

    return gram


def magnitude_scores(graph: Graph, tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """L1 norm of every unit of a space over the weight matrices producing it (structured pruning
    score; falls back to every member when the space has no producing weight matrix)."""
    s = graph[name]
    members = [m for m in s.members if m.role == "out" and len(graph.shapes[m.tensor]) >= 2] or list(s.members)
    score = torch.zeros(s.width, dtype=torch.float64)
    for m in members:
        t = tensors[m.tensor].detach().double().movedim(m.axis, 0)[m.start:m.stop]
        score += t.abs().reshape(t.shape[0], -1).sum(1).cpu()
    return score
