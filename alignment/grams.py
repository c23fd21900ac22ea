"""Similarities between the units of N models: Gram matrices over their pooled features.

A Gram matrix ``G`` over the features of all models concatenated (model 0's first) is what every
Gram-based leaf solver compares units with (:class:`alignment.structure.GramView`):

* :func:`activation_gram`: from collected activation statistics: correlation, or second moments
  (Euclidean distances between activations);
* :func:`weight_gram`: from weights: inner products of the units' weight rows, with the other axes
  of each weight carried into the fused basis by the current plans (weight matching);
* :func:`magnitude_scores`: per-unit L1 norms (structured pruning scores).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .errors import SpaceMismatchError
from .graph import Graph, ranked_members
from .permute import is_weight_norm_gain
from .leaves import gram_cost
from .maps import axis_roles, map_tensor, plan_maps
from .structure import BlockGram, GramView, plans_equal

__all__ = ["activation_gram", "weight_gram", "unit_weight_rows", "initial_plan", "magnitude_scores"]


def activation_gram(stats, kind: str | Callable[[str], str] = "correlation",
                    dead_gram: Callable[[str], GramView] | None = None) -> Callable[[str], GramView]:
    """``gram(space)`` from collected statistics.

    Args:
        stats: :class:`alignment.statistics.Statistics`.
        kind: ``"correlation"`` (pooled correlation; compares directions) or ``"distance"``
            (second moments, covariance plus the outer product of the means: Euclidean distances
            between activations); may be a function of the space name.
        dead_gram: ``dead_gram(space, units)``: a Gram over those pooled units that tells apart
            the units the data cannot (e.g. the :func:`weight_gram`'s): units constant on the
            calibration data (for ``"distance"``: silent ones, :func:`_separate_silent`), and for
            ``"correlation"`` units tied by their correlations (one within ``TIE`` of 1 with two
            units of one model, or with another unit of its own, as ReLU units active on the same
            few entries of a fixed coordinate table are); without it, such units are alike.
    """
    def gram(name: str) -> GramView:
        k = kind(name) if callable(kind) else kind
        # statistics collected only against an anchor model: the known blocks, no joint matrix
        blocks = not stats.complete(name)
        if k == "correlation":
            G = stats.correlation_blocks(name) if blocks else stats.correlation(name).double()
            # units that are constant on the calibration data (dead ReLUs) correlate with nothing
            # (near-constant ones, with a diagonal w < 1, only in part: see PointStats.correlation);
            # an extra shared dimension of weight e = sqrt(1 - w) makes them alike (two dead units
            # pair with each other, not with a live unit) and gives every unit unit norm
            e = (1.0 - (G.diag if blocks else G.diagonal())).clamp(0, 1).sqrt()
            short = e.nonzero().flatten()  # (a fresh matrix: added in place, on the units concerned)
            # ... and on that dimension they are told apart by ``dead_gram``'s cosine, D = (1 + cos)
            # / 2 in [0, 1] (the dead block becomes D: still unit diagonal, still positive
            # semi-definite, still closer to each other than to any live unit); units whose share
            # is rounding (e <= SHORT) keep the plain shared dimension
            weighed = short[e[short] > SHORT] if dead_gram is not None else short[:0]
            if len(short):
                outer = torch.outer(e[short], e[short])
                if len(weighed) > 1:
                    idx = torch.arange(len(weighed))
                    cos = 1.0 - gram_cost(idx, dead_gram(name, weighed).G.double(), idx, "correlation")
                    cos.diagonal().fill_(1.0)
                    pos = torch.searchsorted(short, weighed)  # (short is sorted)
                    outer[pos[:, None], pos[None, :]] *= 0.5 * (1.0 + cos.clamp(-1, 1))
                _index_update(G, short, outer, add=True)
            if dead_gram is not None:
                _break_ties(G, stats.offsets(name), e >= 1.0, lambda units: dead_gram(name, units))
        else:
            mu = stats.mean(name)
            if blocks:
                G = stats.covariance_blocks(name)
                o = G.offsets
                for (i, j), B in G.blocks.items():
                    B.add_(torch.outer(mu[o[i]:o[i + 1]], mu[o[j]:o[j + 1]]))
                G.diag.add_(mu * mu)
            else:
                G = stats.covariance(name) + torch.outer(mu, mu)
            if dead_gram is not None:
                _separate_silent(G, lambda units: dead_gram(name, units))
        return GramView(G.to(dtype=torch.float64, device="cpu"), stats.offsets(name), k)
    return gram


SILENT = 1e-10
"""A unit whose second moment is below this fraction of the largest in its space is silent on the
calibration data (a dead ReLU): for distances, every silent unit is at distance 0 from the others."""


def _separate_silent(G: torch.Tensor | BlockGram, weights: Callable[[torch.Tensor], GramView]) -> None:
    """Tell apart, in place, the units of a second-moment Gram (distance geometry) that are silent on
    the calibration data: they get ``eps * cos`` (``cos``: their weight cosines, ``eps`` a millionth
    of the live units' mean second moment), so that the distance between two silent units is ``2 eps
    (1 - cos)`` (ordered by their weights, not paired at random) and still far below the distance
    of a silent unit to a live one."""
    diag = G.diag if isinstance(G, BlockGram) else G.diagonal()
    d = diag.double()
    top = float(d.max()) if len(d) else 0.0
    if top <= 0:
        return
    silent = (d <= SILENT * top).nonzero().flatten()
    if len(silent) < 2:
        return
    live = d[d > SILENT * top]
    eps = 1e-6 * float(live.mean())
    idx = torch.arange(len(silent))
    cos = 1.0 - gram_cost(idx, weights(silent).G.double(), idx, "correlation")
    cos.diagonal().fill_(1.0)
    _index_update(G, silent, (eps * cos.clamp(-1, 1)).to(diag.dtype), add=True)


def _index_update(G: torch.Tensor | BlockGram, units: torch.Tensor, values: torch.Tensor, add: bool = False) -> None:
    """``G[units][:, units] = values`` (``add``: ``+= values``) in place, on the entries ``G`` holds
    (a :class:`BlockGram`: its diagonal and blocks between models)."""
    if not isinstance(G, BlockGram):
        if add:
            G[units[:, None], units[None, :]] += values
        else:
            G[units[:, None], units[None, :]] = values
        return
    o = G.offsets
    pos = torch.arange(len(units))
    parts = [((units >= o[i]) & (units < o[i + 1])).nonzero().flatten() for i in range(len(o) - 1)]
    for (i, j), B in G.blocks.items():
        pi, pj = pos[parts[i]], pos[parts[j]]
        r, c = units[pi, None] - o[i], units[None, pj] - o[j]
        v = values[pi[:, None], pj[None, :]]
        B[r, c] = B[r, c] + v if add else v
    d = values.diagonal()
    G.diag[units] = G.diag[units] + d if add else d


SHORT = 1e-4
"""A unit whose correlations hold less than 1 - SHORT**2 of its norm (see activation_gram) is told
apart from the other such units by its weights; below, the shortfall is rounding."""

TIE = 1e-5
"""Correlations within this of 1 are ties (float32 products leave errors of a few 1e-6 there)."""


def _break_ties(G: torch.Tensor | BlockGram, offsets: list[int], dead: torch.Tensor,
                weights: Callable[[torch.Tensor], GramView]) -> None:
    """Order tied correlations by weights, in place: among the live units tied to another unit
    (a unit within :data:`TIE` of 1 with two units of one model, or with another unit of its own
    model, and the units it is tied with), every correlation above ``1 - TIE`` becomes
    ``1 - TIE * (1 - cos) / 2`` with ``cos`` the units' weight cosine: still above every untied
    correlation, and ordered by the weights instead of by rounding noise. Units near exactly one
    unit of each other model (a unique match) are left as they are. On a :class:`BlockGram` only
    the correlations between models are known, and only those are compared."""
    if isinstance(G, BlockGram):
        _break_block_ties(G, dead, weights)
        return
    near = G > 1.0 - TIE
    near.fill_diagonal_(False)
    near[dead] = False
    near[:, dead] = False
    r, c = near.nonzero().unbind(1)  # (few: about one per unit and other model)
    if not len(r):
        return
    bounds = torch.tensor(offsets[1:-1], dtype=torch.long)
    model_r, model_c = torch.bucketize(r, bounds, right=True), torch.bucketize(c, bounds, right=True)
    m = len(offsets) - 1
    per_model = torch.bincount(r * m + model_c, minlength=len(G) * m).view(len(G), m)
    ambiguous = (per_model >= 2).any(1)
    ambiguous[r[model_r == model_c]] = True  # a duplicate inside one model
    if not ambiguous.any():
        return
    tied = ambiguous.clone()
    tied[c[ambiguous[r]]] = True
    units = tied.nonzero().flatten()
    block = G[units[:, None], units[None, :]]
    G[units[:, None], units[None, :]] = torch.where(near[units[:, None], units[None, :]],
                                                    _tie_values(units, weights), block)


def _tie_values(units: torch.Tensor, weights: Callable[[torch.Tensor], GramView]) -> torch.Tensor:
    # the correlation a tie between two of ``units`` is given: 1 - TIE (1 - cos) / 2
    idx = torch.arange(len(units))
    cos = 1.0 - gram_cost(idx, weights(units).G.double(), idx, "correlation")
    return 1.0 - TIE * (1.0 - cos.clamp(-1, 1)) / 2


def _break_block_ties(G: BlockGram, dead: torch.Tensor, weights: Callable[[torch.Tensor], GramView]) -> None:
    # _break_ties on the blocks between models: the same ties, found and ordered block by block
    o, P = G.offsets, G.offsets[-1]
    per_model = torch.zeros(P, len(o) - 1, dtype=torch.long)
    near = {}
    for (i, j), B in G.blocks.items():
        N = B > 1.0 - TIE
        N[dead[o[i]:o[i + 1]]] = False
        N[:, dead[o[j]:o[j + 1]]] = False
        r, c = N.nonzero().unbind(1)  # (few: about one per unit)
        if len(r):
            near[(i, j)] = (r, c)
            per_model[o[i]:o[i + 1], j] += torch.bincount(r, minlength=o[i + 1] - o[i])
            per_model[o[j]:o[j + 1], i] += torch.bincount(c, minlength=o[j + 1] - o[j])
    ambiguous = (per_model >= 2).any(1)
    if not ambiguous.any():
        return
    tied = ambiguous.clone()
    for (i, j), (r, c) in near.items():
        tied[o[j] + c[ambiguous[o[i] + r]]] = True
        tied[o[i] + r[ambiguous[o[j] + c]]] = True
    units = tied.nonzero().flatten()
    new = _tie_values(units, weights)
    pos = torch.full((P,), -1, dtype=torch.long)
    pos[units] = torch.arange(len(units))
    for (i, j), (r, c) in near.items():
        keep = tied[o[i] + r] & tied[o[j] + c]
        r, c = r[keep], c[keep]
        G.blocks[(i, j)][r, c] = new[pos[o[i] + r], pos[o[j] + c]]


def unit_weight_rows(graphs: Sequence[Graph], tensors: Sequence[dict[str, torch.Tensor]], name: str,
                     maps: Sequence[dict], note: Callable[[str], None] | None = None,
                     units: Sequence[torch.Tensor] | None = None):
    """Per member tensor of space ``name`` (paired across models by (tensor, axis, rank)), one row
    per unit and model: the unit's weights on that tensor, with the tensor's other axes carried
    into the fused basis by ``maps[i]`` (single-model maps). Yields one list (a matrix per model)
    per member; members missing from a model are skipped (and noted). ``units``: per model, the
    units to give rows for (default all), taken before the other axes are mapped.
    """
    # a weight-normalised layer's gain g is the norm of its weight rows (see MatchContext.tensors):
    # the weight compares the units; g would weigh their norms twice
    ranked = [{(m.tensor, m.axis, r): m for r, m in ranked_members(g[name].members)
               if not is_weight_norm_gain(m.tensor)} for g in graphs]
    keys = [k for k in ranked[0] if all(k in rk for rk in ranked[1:])]
    if note is not None and len(keys) < max(len(r) for r in ranked):
        note(f"space {name!r}: {max(len(r) for r in ranked) - len(keys)} member tensor(s) missing from some "
             f"model are left out of the weight similarity")
    roles = [axis_roles(g) for g in graphs]
    outputs = {f.tensor for f in graphs[0].fixed if f.reason == "model output"}
    for k in keys:
        rows = []
        for i, g in enumerate(graphs):
            m = ranked[i][k]
            t = tensors[i][m.tensor]
            if units is not None:
                t = t.index_select(m.axis, units[i].to(t.device) + m.start)
            else:
                t = t.narrow(m.axis, m.start, m.stop - m.start)
            t = map_tensor(t, g, m.tensor, roles[i], maps[i], 0, 1.0, skip_axis=m.axis)
            t = t.movedim(m.axis, 0)
            rows.append(t.reshape(t.shape[0], t.shape[1:].numel()))  # (no -1: a model may have no such unit)
        if len({r.shape[1] for r in rows}) > 1:
            if k[0] in outputs:
                # a classifier of models trained on different class counts (each keeps its head):
                # its rows are no comparison of the units
                if note is not None:
                    note(f"space {name!r}: {k[0]!r} has {sorted({r.shape[1] for r in rows})} outputs across models "
                         f"and is left out of the weight similarity")
                continue
            raise SpaceMismatchError(f"space {name!r}: rows of {k[0]!r} have different lengths "
                                     f"{sorted({r.shape[1] for r in rows})} across models")
        yield rows


def initial_plan(n: int, n_i: int) -> torch.Tensor:
    """Identity plan between widths ``n`` and ``n_i`` (first units kept; units tiled when widening)."""
    T = torch.zeros(n, n_i, dtype=torch.float64)
    T[torch.arange(n), torch.arange(n) % n_i] = 1.0
    return T


def weight_gram(graphs: Sequence[Graph], target: Graph, tensors: Sequence[dict[str, torch.Tensor]],
                plans: Callable[[str], list[torch.Tensor] | None], geometry: str = "distance",
                note: Callable[[str], None] | None = None, anchor: int | None = None) -> Callable[[str], GramView]:
    """``gram(space)`` from weights: inner products of units' weight rows in the fused basis.

    ``plans(space)`` gives the current per-model plans of a space (None: not solved yet, the identity
    plan is used), so the Gram of a space depends on the alignment of its neighbours. ``geometry``
    says how leaf solvers compare in it (``"inner"``: weight matching's inner product). With
    ``anchor``, only what matching against that model needs is computed: the anchor's rows and
    columns against the other models, and every unit's norm (the other entries are zero).
    """
    cache: dict[tuple[int, str], tuple[int, object]] = {}

    def space_map(i: int, s) -> object:
        p = plans(s.name)
        T = p[i] if p is not None else None
        hit = cache.get((i, s.name))
        if hit is not None and hit[0] == id(T):
            return hit[1]
        # one model's view of the fused basis: fused units it has no part in (matched only in
        # other models) are zero in its rows
        m = plan_maps([T if T is not None else initial_plan(s.width, graphs[i][s.name].width)], [1.0],
                      allow_empty=True)
        cache[(i, s.name)] = (id(T), m)
        return m

    def maps_for(i: int, spaces: set[str]) -> dict:
        return {s.name: space_map(i, s) for s in target.spaces if s.name in spaces and s.name in graphs[i]}

    grams: dict[str, tuple[list, GramView]] = {}

    def gram(name: str, units: torch.Tensor | None = None) -> GramView:
        """The Gram of a space, or with ``units`` (pooled indices) only over those units."""
        # only the spaces on the member tensors' other axes are needed
        touched = sorted({sp for m in graphs[0][name].members for pcs in graphs[0].layout(m.tensor)
                          for *_, sp in pcs if sp is not None})
        if units is not None:
            return _gram(name, set(touched), units)
        # coordinate descent revisits a space whose neighbours' plans may not have changed: reuse
        used = [plans(s) for s in touched]
        hit = grams.get(name)
        if hit is not None and all(_same_plans(a, b) for a, b in zip(hit[0], used)):
            return hit[1]
        gv = _gram(name, set(touched))
        grams[name] = ([None if p is None else list(p) for p in used], gv)
        return gv

    def _gram(name: str, touched: set[str], units: torch.Tensor | None = None) -> GramView:
        maps = [maps_for(i, touched) for i in range(len(graphs))]
        widths = [g[name].width for g in graphs]
        local = None
        if units is not None:
            start = torch.tensor([0] + widths).cumsum(0)
            local = [units[(units >= start[i]) & (units < start[i + 1])] - start[i] for i in range(len(graphs))]
            widths = [len(u) for u in local]
        off = [0]
        for w in widths:
            off.append(off[-1] + w)
        G = torch.zeros(off[-1], off[-1], dtype=torch.float64)
        # accumulate member by member: the concatenated rows of a wide space are large
        for rows in unit_weight_rows(graphs, tensors, name, maps, note, local):
            for i, Ri in enumerate(rows):
                for j in range(i, len(rows)):
                    if anchor is not None and i == j:
                        # leaf solvers matching against the anchor need only each unit's norm here
                        G[off[i]:off[i + 1], off[i]:off[i + 1]].diagonal().add_((Ri * Ri).sum(1))
                        continue
                    if anchor is not None and anchor not in (i, j):
                        continue
                    B = Ri @ rows[j].t()
                    G[off[i]:off[i + 1], off[j]:off[j + 1]] += B
                    if j != i:
                        G[off[j]:off[j + 1], off[i]:off[i + 1]] += B.t()
        return GramView(G, off, geometry)

    return gram


def _same_plans(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return len(a) == len(b) and all(x is y or plans_equal(x, y) for x, y in zip(a, b))


def magnitude_scores(graph: Graph, tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """L1 norm of every unit of a space over the weight matrices producing it (structured pruning
    score; every member counts when the space has no producing weight matrix)."""
    s = graph[name]
    members = [m for m in s.members if m.role == "out" and len(graph.shapes[m.tensor]) >= 2] or list(s.members)
    score = torch.zeros(s.width, dtype=torch.float64)
    for m in members:
        t = tensors[m.tensor].detach().double().movedim(m.axis, 0)[m.start:m.stop]
        score += t.abs().reshape(t.shape[0], -1).sum(1).cpu()
    return score

