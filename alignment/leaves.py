"""Leaf solvers: the pluggable part of the structure walk (:class:`alignment.structure.Walk`).

A leaf solver takes a :class:`~alignment.structure.LeafProblem` (``n`` fused features from the
pooled features of N models, with a Gram matrix over the pooled features) and returns one plan per
model (``n x n_i``, non-negative; see :mod:`alignment.maps`) and a matching score (mean cosine
similarity of what was matched; NaN when meaningless):

* :func:`ot_leaf`: optimal transport onto anchors (a model of the target width: OTFusion; else a
  free-support barycenter), exact, entropic or one-to-one (``solver="hungarian"``: permutation
  matching, rectangular when widths differ);
* :func:`merge_leaf`: agglomerative merging of the most similar features (within and across models);
* :func:`zip_leaf`: ZipIt's greedy pair merging (within and across models, merged features
  discouraged from merging again);
* :func:`magnitude_leaf`: keep the features of largest score (structured pruning);
* :func:`select_leaf`: keep the first features, or the best-scoring ones (resizing);
* :func:`random_leaf`: a random permutation.

Units are compared through the Gram matrix (activation correlation, activation second moments or
weight inner products), so anchors that are combinations of units (barycenters, cluster centres)
are costed from the Gram alone (:func:`gram_cost`).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .errors import InvalidOptionError, SpaceMismatchError
from .maps import permutation_plan, plan_maps
from .merging import greedy_merge
from .runner import all_finite
from .structure import BlockGram, LeafProblem, RowPlan, dense_plan, gram_diagonal, submatrix

__all__ = [
    "PLAN_SOLVERS", "GEOMETRIES", "transport_plan", "gram_cost", "ot_leaf", "merge_leaf", "zip_leaf",
    "zip_labels", "magnitude_leaf", "select_leaf", "random_leaf",
]

PLAN_SOLVERS = ("emd", "sinkhorn", "hungarian")
GEOMETRIES = ("correlation", "distance", "inner")


def transport_plan(cost: torch.Tensor, solver: str = "emd", reg: float = 0.01,
                   a: torch.Tensor | None = None, b: torch.Tensor | None = None,
                   num_iter: int = 10000, note: Callable[[str], None] | None = None,
                   where: str = "", rows: bool = False) -> "torch.Tensor | RowPlan":
    """A transport plan between ``n`` target and ``m`` source units.

    Args:
        cost: ``n x m`` ground cost (target units x source units).
        solver: ``"emd"`` (exact OT, POT's network simplex), ``"sinkhorn"`` (entropic OT in the log
            domain) or ``"hungarian"`` (a 0/1 one-to-one matching of ``min(n, m)`` pairs, mass
            ``1 / max(n, m)`` each).
        reg: entropic regularisation for Sinkhorn, relative to the cost scale (costs are divided by
            their largest value first, so ``reg`` means the same on every space).
        a: target masses (default uniform, total 1).
        b: source masses (default uniform, total 1).
        num_iter: iteration cap of the Sinkhorn solver.
        note: ``note(message)`` records a fallback (non-finite costs, an unconverged Sinkhorn plan).
        where: what the plan is for (named in notes).
        rows: return a :class:`alignment.structure.RowPlan` (indices, no ``n x m`` matrix) when the
            plan has one entry per row (a Hungarian matching with ``n <= m``).

    Returns:
        The plan (float64, ``n x m``; a RowPlan with ``rows`` where it applies).
    """
    C = cost.detach().double().cpu()
    n, m = C.shape
    if not all_finite(C):
        big = float(C[torch.isfinite(C)].abs().max()) if torch.isfinite(C).any() else 0.0
        if note is not None:
            note(f"{where or 'a plan'}: {int((~torch.isfinite(C)).sum())} non-finite costs (NaN or infinite "
                 f"statistics?) replaced by the largest finite cost")
        C = torch.nan_to_num(C, nan=big, posinf=big, neginf=-big)
    if solver == "hungarian":
        r, c = linear_sum_assignment(C.numpy())
        if rows and n <= m:  # (every row is assigned, in order)
            return RowPlan(torch.as_tensor(c), torch.full((n,), 1.0 / max(n, m), dtype=torch.float64), m)
        T = torch.zeros(n, m, dtype=torch.float64)
        T[torch.as_tensor(r), torch.as_tensor(c)] = 1.0 / max(n, m)
        return T
    import ot  # imported here: POT's import takes seconds and Hungarian matching needs none of it

    a = torch.full((n,), 1.0 / n, dtype=torch.float64) if a is None else a.double().cpu() / a.sum()
    b = torch.full((m,), 1.0 / m, dtype=torch.float64) if b is None else b.double().cpu() / b.sum()
    scale = float(C.abs().max())
    Cn = (C / scale if scale > 0 else C).numpy()
    if solver == "emd":
        # POT's default cap (100,000 pivots) stops short of the optimum from about 2,000 units on
        # (ViT-B's MLP spaces: 3,072); the simplex stops at the optimum, the cap bounds a failure.
        # (scipy's Hungarian solver, exact too, is no faster in general: 0.8 s against 3.7 s on
        # random correlation costs of 3,072 units, 15 s against 6.4 s on a random-init ViT-B's
        # distance costs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # (reported below, in the fusion report)
            T, log = ot.emd(a.numpy(), b.numpy(), Cn, numItermax=max(num_iter, 100000, 4 * n * m), log=True)
        if note is not None and log.get("result_code") != 1:
            note(f"{where or 'a plan'}: the exact transport solver stopped before the optimum "
                 f"({log.get('warning') or 'result code ' + str(log.get('result_code'))}); the plan is approximate")
    elif solver == "sinkhorn":
        if not reg > 0:
            raise InvalidOptionError(f"Sinkhorn needs reg > 0, got {reg}; use solver='emd' for exact OT")
        with np.errstate(over="ignore", under="ignore"):  # (an unconverged plan is reported below)
            T, log = ot.sinkhorn(a.numpy(), b.numpy(), Cn, reg, method="sinkhorn_log", numItermax=num_iter,
                                 stopThr=1e-9, log=True, warn=False)
        err = log.get("err", [0.0])
        # marginals off by more than 1e-6 (relative to unit total mass) change the maps visibly; one
        # note per space (not per head or re-solve: the error value would make each one new)
        if note is not None and err and float(err[-1]) > 1e-6:
            note(f"{where or 'a plan'}: Sinkhorn did not converge in {num_iter} iterations (marginal error above "
                 f"1e-6 at reg={reg}); the plan is approximate: raise reg or use solver='emd'")
    else:
        raise InvalidOptionError(f"unknown OT solver {solver!r}; use one of {', '.join(PLAN_SOLVERS)}")
    return torch.as_tensor(np.asarray(T), dtype=torch.float64)


def gram_cost(A: torch.Tensor, G: torch.Tensor, cols: torch.Tensor, geometry: str) -> torch.Tensor:
    """Cost between anchors ``A @ units`` (rows of ``A`` over pooled units, or a LongTensor of
    pooled unit indices) and the units ``cols``.

    ``"correlation"``: ``1 - cos`` in the Gram geometry (for a correlation Gram, one minus the
    correlation); ``"distance"``: the Euclidean distance; ``"inner"``: minus the inner product.
    Returns a new tensor (never a view of ``G``).
    """
    if A.dtype == torch.long:
        # anchors that are units themselves (indices): no products with the whole Gram (and no
        # copy of it when anchors and units are runs of consecutive units)
        AG = submatrix(G, A, cols)
        aa = gram_diagonal(G, A).clamp_min(0)
    elif isinstance(G, BlockGram):
        raise SpaceMismatchError("anchors that mix units need every entry of the Gram, but only the blocks "
                                 f"between model pairs {sorted(G.blocks)} were collected")
    elif A.shape[1] >= 512 and int((A != 0).sum()) * 10 < A.numel():
        # anchors averaging a few units each (MergeMany's means of matched units): a sparse product
        # of A with the whole Gram costs (nonzeros x units) instead of (anchors x units^2)
        AGall = torch.sparse.mm(A.to_sparse(), G)
        AG = AGall[:, cols]
        aa = (AGall * A).sum(1).clamp_min(0)
    else:
        AG = A @ G[:, cols]
        aa = (A @ G * A).sum(1).clamp_min(0)
    if geometry == "inner":
        return -AG
    gg = gram_diagonal(G, cols).clamp_min(0)
    # in place on one fresh n x m buffer (wide spaces: every pass costs its size in memory traffic);
    # the same arithmetic, in the same order, as the plain expressions in the comments
    if geometry == "correlation":
        # 1 - where(den > 1e-300, AG / den, 0) with den = sqrt(aa gg^T)
        out = torch.outer(aa, gg).sqrt_()
        tiny = out <= 1e-300 if out.numel() and float(out.min()) <= 1e-300 else None
        torch.div(AG, out.clamp_min_(1e-300), out=out)
        if tiny is not None:
            out.masked_fill_(tiny, 0.0)
        return out.neg_().add_(1.0)
    # sqrt(max(aa + gg^T - 2 AG, 0))
    out = torch.add(aa[:, None], gg[None, :])
    return out.sub_(AG, alpha=2).clamp_min_(0).sqrt_()


def _cosine(A: torch.Tensor, G: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return gram_cost(A, G, cols, "correlation").neg_().add_(1.0)  # 1 - cost, on gram_cost's fresh buffer


def _score(plans, A, G, cols, skip: int | None = None, costs=None) -> float:
    # costs[i]: model i's correlation cost against A when already computed (else None)
    total, mass = 0.0, 0.0
    for i, (T, c) in enumerate(zip(plans, cols)):
        if i == skip:
            continue
        C = costs[i] if costs is not None and costs[i] is not None else gram_cost(A, G, c, "correlation")
        # sum(T * (1 - C)) without two plan-sized temporaries
        if isinstance(T, RowPlan):
            m = float(T.vals.sum())
            total += m - float(torch.dot(T.vals, C[torch.arange(len(T.idx)), T.idx]))
        else:
            m = float(T.sum())
            total += m - float(torch.vdot(T.reshape(-1), C.reshape(-1)))
        mass += m
    return total / mass if mass > 0 else float("nan")


def _need_gram(leaf: LeafProblem, who: str, blocks: bool = False) -> torch.Tensor:
    # ``blocks``: the solver reads only the blocks between the anchor and each model (a BlockGram will do)
    if leaf.G is None:
        raise SpaceMismatchError(f"{who} needs a similarity (Gram) for space {leaf.space!r}")
    if isinstance(leaf.G, BlockGram) and not blocks:
        raise SpaceMismatchError(f"{who} needs the similarities of every pair of units of space {leaf.space!r}, "
                                 f"but only the blocks between model pairs {sorted(leaf.G.blocks)} were collected")
    return leaf.G


def ot_leaf(leaf: LeafProblem, solver: str = "emd", reg: float = 0.01, iterations: int | None = None
            ) -> tuple[list[torch.Tensor], float]:
    """Transport every model's units onto ``n`` anchors; anchors refined as the barycenter.

    The anchors are the units of ``leaf.anchor`` when given (OTFusion; the anchor model's own plan
    is the identity), else seeded by balanced greedy merging of the pooled units
    (:func:`merge_leaf`). Each iteration transports every model onto the anchors and moves the
    anchors to the fused units those plans define (a free-support Wasserstein barycenter; with
    ``solver="hungarian"`` and several models of one width this is MergeMany-style rematching; with
    one model and fewer anchors than units, balanced k-means). ``iterations`` defaults to 0 with a
    model anchor and 20 otherwise; iterations stop early once the plans no longer change. A model
    narrower than the target, when another model has the target width, is transported partially:
    each of its units goes (in total) to one fused unit's worth of mass, and fused units it does not
    match take nothing from it.

    Returns:
        (plans, mean matched cosine similarity of the non-anchor models).
    """
    G = _need_gram(leaf, "optimal transport", blocks=leaf.anchor is not None)
    n, cols = leaf.n, leaf.cols
    P = G.shape[0]
    if leaf.anchor is not None:
        A = cols[leaf.anchor]  # the anchor's units, by index
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
    where = f"space {leaf.space!r}"
    # exact ties: an anchor that averages two units is as near to one as to the other (in either
    # geometry), and the exact solvers break ties by index, so that a model with its units
    # relabelled compressed otherwise; the more central unit is preferred instead
    tie = _centrality(G) if leaf.anchor is None and solver != "sinkhorn" else None

    def plan(C: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if tie is not None:
            C = C - (TIE_BREAK * float(C.abs().max())) * tie[c][None, :]
        m = C.shape[1]
        if solver == "hungarian" or m >= n or not covered:
            return transport_plan(C, solver, reg, note=leaf.note, where=where, rows=True)
        Cd = torch.cat([C, torch.zeros(n, 1, dtype=C.dtype)], dim=1)
        b = torch.cat([torch.full((m,), 1.0 / n, dtype=torch.float64),
                       torch.tensor([(n - m) / n], dtype=torch.float64)])
        return transport_plan(Cd, solver, reg, b=b, note=leaf.note, where=where)[:, :m]

    plans: list[torch.Tensor] = []
    fixed = leaf.anchor if iters == 0 else None
    # MergeMany: one-to-one rematching of each model against the mean of the *other* models
    leave_one_out = solver == "hungarian" and len(cols) > 2
    for it in range(iters + 1):
        new, costs = [], []  # costs: each plan's cost against the anchors A (None: not against A)
        for i, c in enumerate(cols):
            if i == fixed:
                # the anchor's units are the fused units
                new.append(RowPlan(torch.arange(n), torch.full((n,), 1.0 / n, dtype=torch.float64), n))
                costs.append(None)
            elif it > 0 and leave_one_out:
                # Gauss-Seidel: against the others' newest plans
                current = new + plans[len(new):]
                new.append(plan(gram_cost(_others_mean(current, leaf.alpha, i), G, c, leaf.geometry), c))
                costs.append(None)
            else:
                C = gram_cost(A, G, c, leaf.geometry)
                new.append(plan(C, c))
                costs.append(C if leaf.geometry == "correlation" else None)
        done = plans and all(_plans_close(x, y) for x, y in zip(new, plans))
        plans = new
        if done or it == iters:
            break
        A = torch.cat(plan_maps(plans, leaf.alpha).merge, dim=1)
    return plans, _score(plans, A, G, cols, skip=fixed, costs=costs)


TIE_BREAK = 1e-9
"""Costs within this fraction of the largest cost are ties, broken by :func:`_centrality`."""


def _centrality(G: torch.Tensor) -> torch.Tensor:
    """Each pooled unit's sum of squared cosines with every pooled unit, over the largest (in
    [0, 1]): a property of the unit that no relabelling changes, to break exact ties of cost by."""
    r = gram_diagonal(G, torch.arange(G.shape[0])).double().clamp_min(1e-300).rsqrt()
    # sum_k (G_jk / sqrt(G_jj G_kk))^2, each cosine clamped to [-1, 1] (a unit silent on the data has
    # a zero diagonal), in row chunks: no second matrix of the Gram's size
    c = torch.cat([(G[i:i + 1024].double() * r[i:i + 1024, None] * r[None, :]).clamp_(-1, 1).square_().sum(1)
                   for i in range(0, G.shape[0], 1024)])
    return c / c.max().clamp_min(1e-300)


def _plans_close(a, b) -> bool:
    # plans equal to 1e-12 (the barycenter iterations stop when no plan changes)
    if isinstance(a, RowPlan) and isinstance(b, RowPlan):
        return torch.equal(a.idx, b.idx) and torch.allclose(a.vals, b.vals, atol=1e-12)
    return torch.allclose(dense_plan(a), dense_plan(b), atol=1e-12)


def _others_mean(plans: list[torch.Tensor], alpha: list[float], i: int) -> torch.Tensor:
    """Fused units as the weighted mean of every model's matched units but model ``i``'s."""
    keep = [j for j in range(len(plans)) if j != i]
    total = sum(alpha[j] for j in keep)
    w = [alpha[j] / total if total > 0 else 1.0 / len(keep) for j in keep]
    merged = plan_maps([plans[j] for j in keep], w).merge
    blocks = []
    for j, T in enumerate(plans):
        blocks.append(torch.zeros(T.shape[0], T.shape[1], dtype=torch.float64) if j == i else merged[keep.index(j)])
    return torch.cat(blocks, dim=1)


def merge_leaf(leaf: LeafProblem, balanced: bool = True) -> tuple[list[torch.Tensor], float]:
    """Agglomerative merge of the most similar units (average linkage on cosine similarity).

    Pooled units of all models (and of one model, for compression) are merged, most similar groups
    first, within one model or across models, until ``n`` groups remain; each group is one fused
    unit (fused units ordered by their first member). ``balanced`` caps groups at ``ceil(P / n)``
    units (``P`` pooled units; the cap grows only if no allowed merge is left), so halving a width
    merges pairs, as in ZipIt, instead of growing a few large blobs.
    """
    G = _need_gram(leaf, "merging")
    n = leaf.n
    P = G.shape[0]
    if n > P:
        raise SpaceMismatchError(f"space {leaf.space!r}: merging cannot widen {P} units into {n}; use "
                                 f"method='ot' to widen")
    S = _cosine(torch.arange(P), G, torch.arange(P))  # units as index anchors: no P^3 products
    return _group_plans(leaf, G, greedy_merge(S, n, balanced=balanced, overwrite=True))


def zip_labels(S: torch.Tensor, sizes: Sequence[int], n: int, within: float, remerge: float,
               where: str = "a space", overwrite: bool = False) -> torch.Tensor:
    """ZipIt's greedy merging of pooled units into ``n`` groups: the group of each unit.

    Args:
        S: similarity of the pooled units (model 0's first, ``sizes[i]`` units of model ``i``).
        sizes: units per model.
        n: number of groups.
        within: weight of a merge inside one model against a merge across models (similarities of
            two units of one model are multiplied by it; 0 forbids such merges). Ignored for one model.
            With ``within=0`` and three or more models, the models are zipped in order (see
            :func:`_zip_in_order`): merging all of them at once can leave only groups that share a
            model before ``n`` is reached.
        remerge: factor applied to the similarities of a group that holds its share of units
            (``ceil(P / n)`` of the ``P`` pooled units: a pair when two models zip into one width;
            ZipIt's linkage: the smaller of its parts' similarities, times this); 0 lets a group grow
            past its share only when nothing else is left, 1 is plain complete linkage.
        where: what is being merged (named in errors).
        overwrite: work in ``S`` itself (it is overwritten; see :func:`greedy_merge`).
    """
    decay_from = max(2, math.ceil(S.shape[0] / n))
    if within == 0 and len(sizes) > 2:
        return _zip_in_order(S, sizes, n, remerge, decay_from)
    if not overwrite:
        S = S.clone()
    if len(sizes) > 1 and within != 1.0:
        o = [0]
        for s in sizes:
            o.append(o[-1] + int(s))
        for a, b in zip(o[:-1], o[1:]):  # each model's own block
            if within > 0:
                S[a:b, a:b].mul_(within)
            else:
                S[a:b, a:b].fill_(-math.inf)
    try:
        return greedy_merge(S, n, balanced=False, linkage="min", decay=remerge, decay_from=decay_from, overwrite=True)
    except RuntimeError:  # (not reached: two models' groups always leave a merge across them)
        raise SpaceMismatchError(f"{where}: with within=0 no merge is left that keeps every group to one unit per "
                                 f"model before reaching width {n}; allow merges inside a model (within > 0)") from None


def _zip_in_order(S: torch.Tensor, sizes: Sequence[int], n: int, remerge: float, decay_from: int) -> torch.Tensor:
    """ZipIt's merging with no merge inside a model (``within=0``) for three or more models, one model
    at a time: model ``i``'s units are zipped into the groups formed from models ``0..i-1`` (greedy,
    most similar first, ZipIt's linkage), merging only as much as keeps at most ``n`` groups.

    Pooling every model at once can end with groups that each share a model with all the others
    before ``n`` groups are reached (three models zipped into their width: a group holding units of
    models 0 and 1 cannot take a group holding units of 1 and 2). In order, a stage that must merge
    always has a unit of model ``i`` and a group without one, so it never stalls. A group's
    similarity to a unit or group is the smallest over their members' pairs, times ``remerge`` for
    each unit it holds from its share (``decay_from`` units) on, as in :func:`greedy_merge`.
    """
    S = S.detach().to("cpu", torch.float64)
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + int(s))
    lab = torch.arange(offsets[1])  # group of each unit placed so far (models 0..i-1)
    owner = torch.zeros(offsets[1], dtype=torch.long)
    k = offsets[1]
    for i in range(1, len(sizes)):
        a, b = offsets[i], offsets[i + 1]
        done = torch.arange(a)
        size = torch.bincount(lab, minlength=k).double()
        has = torch.zeros(k, len(sizes), dtype=torch.bool)
        has[lab, owner] = True
        factor = remerge ** (size - decay_from + 1).clamp_min(0)
        # every group's smallest similarity to every unit, then to every group
        to_unit = torch.full((k, S.shape[1]), math.inf, dtype=torch.float64)
        to_unit.scatter_reduce_(0, lab[:, None].expand(-1, S.shape[1]), S[done], "amin")
        to_group = torch.full((k, k), math.inf, dtype=torch.float64)
        to_group.scatter_reduce_(1, lab[None, :].expand(k, -1), to_unit[:, done], "amin")
        M = torch.full((k + b - a, k + b - a), -math.inf, dtype=torch.float64)
        M[:k, :k] = _decayed(to_group, factor[:, None] * factor[None, :])
        M[:k, :k][(has.double() @ has.double().T) > 0] = -math.inf  # groups sharing a model
        M[:k, k:] = _decayed(to_unit[:, a:b], factor[:, None])
        M[k:, :k] = M[:k, k:].T
        target = min(n, k + b - a)
        new = greedy_merge(M, target, balanced=False, linkage="min", decay=remerge, decay_from=decay_from,
                           overwrite=True, sizes=torch.cat([size, torch.ones(b - a, dtype=torch.float64)]).tolist())
        lab = torch.cat([new[lab], new[k:]])
        owner = torch.cat([owner, torch.full((b - a,), i, dtype=torch.long)])
        k = target
    first = torch.full((k,), lab.numel(), dtype=torch.long).scatter_reduce_(0, lab, torch.arange(lab.numel()), "amin")
    rank = torch.empty(k, dtype=torch.long)
    rank[torch.argsort(first)] = torch.arange(k)
    return rank[lab]  # groups numbered by their smallest member, as greedy_merge numbers them


def _decayed(sim: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``sim`` times ``factor`` where it is finite (ZipIt's decay of a merged group's similarities)."""
    return torch.where(torch.isfinite(sim), sim * factor, sim)


def zip_leaf(leaf: LeafProblem, within: float = 1.0, remerge: float = 0.3) -> tuple[list[torch.Tensor], float]:
    """ZipIt's zipping: the most correlated pair of pooled features is merged first, within one model
    or across models, until ``n`` fused features remain (see :func:`zip_labels` for the controls).

    Each fused feature is the (model-weighted) mean of its group. With a model and its permuted copy
    and ``within=0`` this is the permutation; with one model it compresses by merging.
    """
    G = _need_gram(leaf, "zipping")
    n, P = leaf.n, G.shape[0]
    if n > P:
        raise SpaceMismatchError(f"space {leaf.space!r}: zipping cannot widen {P} units into {n}; use method='ot' to widen")
    if within == 0 and len(leaf.sizes) > 1 and n < max(leaf.sizes):
        raise SpaceMismatchError(f"space {leaf.space!r}: within=0 keeps every fused unit to one unit per model, so the "
                                 f"fused width {n} cannot be below the widest model's {max(leaf.sizes)}; use within > 0")
    S = _cosine(torch.arange(P), G, torch.arange(P))
    labels = zip_labels(S, leaf.sizes, n, within, remerge, where=f"space {leaf.space!r}", overwrite=True)
    return _group_plans(leaf, G, labels)


def _group_plans(leaf: LeafProblem, G: torch.Tensor, labels: torch.Tensor) -> tuple[list[torch.Tensor], float]:
    """Plans of a clustering of the pooled units (fused unit ``k`` = group ``k``) and their score."""
    plans = []
    for c in leaf.cols:  # (each model's plan built on its own: no n x P matrix to gather columns from)
        T = torch.zeros(leaf.n, len(c), dtype=torch.float64)
        T[labels[c], torch.arange(len(c))] = 1.0
        plans.append(T)
    return plans, _group_score(G, labels, leaf.sizes, leaf.alpha, leaf.n)


def _group_score(G: torch.Tensor, labels: torch.Tensor, sizes: Sequence[int], alpha: Sequence[float], n: int) -> float:
    """:func:`_score` of the plans of a clustering against their fused units (the mean cosine
    similarity, in ``G``, of every pooled unit with its group's fused unit), from the pairs of units
    that share a group only: the fused unit of group ``k`` is ``sum_m a_m u_m`` over its members
    with :func:`alignment.maps.plan_maps`'s merge weights ``a_m``, so each unit's cosine needs
    ``G`` on its own group alone (not a product of every fused unit with the whole Gram)."""
    P = len(labels)
    owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.as_tensor(list(sizes)))
    # plan_maps' merge weights, alpha_i / (model i's members in the group), up to a factor per group
    # (the models present in it), which no cosine depends on
    cnt = torch.bincount(labels * len(sizes) + owner, minlength=n * len(sizes)).view(n, len(sizes)).double()
    a = torch.as_tensor([float(x) for x in alpha], dtype=torch.float64)[owner] / cnt[labels, owner]
    # every (unit j, member m of j's group) pair
    order = torch.argsort(labels, stable=True)
    size = torch.bincount(labels, minlength=n)
    start = torch.cumsum(size, 0) - size
    reps = size[labels]
    j = torch.repeat_interleave(torch.arange(P), reps)
    within = torch.arange(len(j)) - torch.repeat_interleave(torch.cumsum(reps, 0) - reps, reps)
    m = order[start[labels[j]] + within]
    g = G[m, j]
    ag = torch.zeros(P, dtype=torch.float64).index_add_(0, j, a[m] * g)
    aa = torch.zeros(n, dtype=torch.float64).index_add_(0, labels[j], a[j] * a[m] * g).clamp_min(0)
    den = (aa[labels] * G.diagonal().clamp_min(0)).sqrt()
    cos = torch.where(den > 1e-300, ag / den.clamp_min(1e-300), torch.zeros_like(ag))
    return float(cos.mean()) if P else float("nan")


def magnitude_leaf(leaf: LeafProblem) -> tuple[list[torch.Tensor], float]:
    """Keep the ``n`` units of one model with the largest scores (in their original order)."""
    if leaf.scores is None:
        raise SpaceMismatchError(f"magnitude selection needs unit scores for space {leaf.space!r}")
    if leaf.n > leaf.sizes[0]:
        raise SpaceMismatchError(f"space {leaf.space!r}: magnitude pruning cannot widen {leaf.sizes[0]} units "
                                 f"into {leaf.n}; use method='ot' to widen")
    keep = torch.sort(torch.topk(leaf.scores.double(), leaf.n).indices).values
    return [permutation_plan(keep, leaf.sizes[0])], float("nan")


def select_leaf(leaf: LeafProblem) -> tuple[list[torch.Tensor], float]:
    """Resizing by selection: keep the first ``n`` units of one model, or its best-scoring ones
    (in their original order); widening repeats units (cyclically, or the best-scoring first)."""
    m, k = leaf.sizes[0], leaf.n
    if leaf.scores is not None:
        order = torch.argsort(leaf.scores.double(), descending=True, stable=True)
        keep = torch.sort(order[:min(k, m)]).values
        idx = torch.cat([keep, order[:max(k - m, 0)]]) if k > m else keep
    else:
        idx = torch.arange(k) % m
    return [permutation_plan(idx, m)], float("nan")


def random_leaf(leaf: LeafProblem) -> tuple[list[torch.Tensor], float]:
    """An independent random permutation for every model (equal widths)."""
    return [permutation_plan(torch.randperm(s, generator=leaf.generator), s) for s in leaf.sizes], float("nan")
