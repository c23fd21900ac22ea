"""Structure trees of alignment spaces, and the one walk over them that every solver uses.

A space's features are not always freely permutable. Its *structure tree* says how they may be
matched:

* :class:`Leaf`: a plain run of features (any correspondence); leaves with the same ``key`` are the
  same features (e.g. one dims-within-head axis shared by every head);
* :class:`Fixed`: features that must stay where they are;
* :class:`Cat`: concatenation segments, each matched on its own;
* :class:`Heads`: attention heads: whole heads correspond (one head assignment per ``key``, shared
  by the query-key and value-output spaces of one attention block), then dims within heads;
* :class:`Blocks`: blocks indexed by another feature space (a depthwise conv's channels follow its
  input space; a flatten's channels x positions follow the channels): one block per feature of that
  space, so the block count follows its width, while the features within a block keep their place.

:class:`Walk` is the only code that walks these trees. Given the graphs of N models, a target graph
(the fused widths) and a leaf solver, it returns per space and model a non-negative *plan*
(``n x n_i``, see :mod:`alignment.maps`). Permutation matching, optimal transport, merging,
magnitude selection, random permutations and resizing are all this walk with another leaf solver.

Heads follow one rule for every method and width: each model's heads are matched to a reference
model's heads by the minimum total cost of an exact transport between the two heads' dims (an
assignment when head dims agree), summed over the spaces the heads structure. Zipping instead pools
every model's heads and merges them whole on that same cost (``merge_heads``), then zips the dims of
each fused head's member heads.
"""

from __future__ import annotations

import itertools
import math
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence, Union

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .errors import SpaceMismatchError

__all__ = [
    "Leaf", "Fixed", "Cat", "Heads", "Blocks", "Node", "tree_size", "tree_keys", "from_tuple",
    "LeafProblem", "GramView", "BlockGram", "Walk", "submatrix", "gram_diagonal", "RowPlan", "dense_plan",
    "plan_argmax", "plans_equal", "check_structures", "space_blocks",
]


@dataclass(frozen=True)
class Leaf:
    """A plain run of ``size`` features; leaves with equal ``key`` hold the same features."""

    key: str
    size: int


@dataclass(frozen=True)
class Fixed:
    """``size`` features that keep their place."""

    size: int


@dataclass(frozen=True)
class Cat:
    """Concatenated segments, matched separately."""

    parts: tuple


@dataclass(frozen=True)
class Heads:
    """``count`` attention heads (the head index is the heads space ``key``), one subtree per head."""

    key: str
    count: int
    parts: tuple


@dataclass(frozen=True)
class Blocks:
    """``count`` blocks indexed by the feature space ``key`` (depthwise convs, flattened channels x
    positions), one subtree per block; ``count`` is that space's width."""

    key: str
    count: int
    parts: tuple


Node = Union[Leaf, Fixed, Cat, Heads, Blocks]


def tree_size(tree: Node) -> int:
    """Number of features a structure tree describes."""
    if isinstance(tree, (Leaf, Fixed)):
        return tree.size
    if isinstance(tree, Cat):
        return sum(tree_size(t) for t in tree.parts)
    return tree.count * tree_size(tree.parts[0])


def tree_keys(tree: Node) -> list[str]:
    """Keys of the leaves (and heads/blocks indices) a tree contains, in order."""
    if isinstance(tree, Leaf):
        return [tree.key]
    if isinstance(tree, Cat):
        return [k for t in tree.parts for k in tree_keys(t)]
    if isinstance(tree, (Heads, Blocks)):
        return [tree.key] + [k for t in tree.parts for k in tree_keys(t)]
    return []


def from_tuple(tree: tuple, heads_keys: set[str]) -> Node:
    """Typed tree from discovery's tuple form; ``heads_keys`` names the spaces of kind ``heads``."""
    kind = tree[0]
    if kind == "fixed":
        return Fixed(int(tree[1]))
    if kind == "leaf":
        return Leaf(tree[1], int(tree[2]))
    if kind == "cat":
        return Cat(tuple(from_tuple(t, heads_keys) for t in tree[1]))
    _, key, count, parts = tree
    cls = Heads if key in heads_keys else Blocks
    return cls(key, int(count), tuple(from_tuple(t, heads_keys) for t in parts))


# -------------------------------------------------------------------------------------------------
class RowPlan:
    """A plan with exactly one entry per row, kept as indices: fused feature ``k`` takes ``vals[k]``
    of model feature ``idx[k]`` (permutations, one-to-one matchings into a wider model, the anchor's
    identity). The dense ``n x n_i`` float64 plan of a wide space costs ``8 n n_i`` bytes per model
    (ViT-B's MLP spaces: 75 MB each); :func:`alignment.maps.plan_maps` reads this form without building it.

    Attributes:
        idx: the model feature of each fused feature (``n``, long).
        vals: the plan's entry in each row (``n``, float64, positive).
        shape: ``(n, n_i)``.
    """

    __slots__ = ("idx", "vals", "shape")

    def __init__(self, idx: torch.Tensor, vals: torch.Tensor, cols: int) -> None:
        idx, vals = torch.as_tensor(idx).long().cpu(), torch.as_tensor(vals, dtype=torch.float64).cpu()
        if idx.dim() != 1 or vals.shape != idx.shape:
            raise ValueError(f"a row plan needs one index and one value per row, got {tuple(idx.shape)} and "
                             f"{tuple(vals.shape)}")
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= cols):
            raise ValueError(f"a row plan's indices must lie in 0..{cols - 1}")
        self.idx, self.vals, self.shape = idx, vals, torch.Size((len(idx), int(cols)))

    @property
    def dtype(self) -> torch.dtype:
        """The entries' dtype (float64)."""
        return self.vals.dtype

    def dense(self) -> torch.Tensor:
        """The ``n x n_i`` plan as a matrix."""
        T = torch.zeros(self.shape, dtype=self.vals.dtype)
        T[torch.arange(self.shape[0]), self.idx] = self.vals
        return T

    def __repr__(self) -> str:
        return f"RowPlan(shape={tuple(self.shape)})"


def dense_plan(T: "torch.Tensor | RowPlan") -> torch.Tensor:
    """A plan as a matrix (a :class:`RowPlan` is built; a matrix is returned as it is)."""
    return T.dense() if isinstance(T, RowPlan) else T


def plan_argmax(T: "torch.Tensor | RowPlan") -> torch.Tensor:
    """The model feature each fused feature takes most of (exact for permutations and selections)."""
    return T.idx.clone() if isinstance(T, RowPlan) else T.argmax(1)


def plans_equal(a: "torch.Tensor | RowPlan | None", b: "torch.Tensor | RowPlan | None") -> bool:
    """Whether two plans are equal entry for entry (either form)."""
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, RowPlan) and isinstance(b, RowPlan):
        return a.shape == b.shape and torch.equal(a.idx, b.idx) and torch.equal(a.vals, b.vals)
    return tuple(a.shape) == tuple(b.shape) and torch.equal(dense_plan(a), dense_plan(b))


@dataclass
class GramView:
    """Similarity of the pooled units of every model for one space.

    Attributes:
        G: Gram matrix over the features of all models concatenated (model 0's first), or a
            :class:`BlockGram` when only the blocks between some model pairs are known.
        offsets: start of each model's block in ``G`` (and the total at the end).
        geometry: ``"correlation"`` (compare directions) or ``"distance"`` (Euclidean).
    """

    G: "torch.Tensor | BlockGram"
    offsets: list[int]
    geometry: str = "correlation"


@dataclass
class BlockGram:
    """A pooled Gram known only on its diagonal and on the blocks between some pairs of models: what a
    method that compares every model with one anchor model needs, and all that its statistics
    collect (see :meth:`alignment.statistics.PointStats.correlation_blocks`). No joint matrix is
    built: for wide spaces it would be several times the size of the blocks. Entries between two
    units of one model (off the diagonal), or between models whose pair was not collected, are
    unknown: reading them raises :class:`SpaceMismatchError`, never gives a zero.

    Attributes:
        blocks: ``(i, j) -> block`` with ``i < j``: rows are model ``i``'s units, columns model ``j``'s.
        diag: the diagonal over the pooled units (model 0's first).
        offsets: start of each model's units in the pooled order (and the total at the end).
    """

    blocks: dict[tuple[int, int], torch.Tensor]
    diag: torch.Tensor
    offsets: list[int]

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the pooled Gram."""
        return (self.offsets[-1], self.offsets[-1])

    @property
    def dtype(self) -> torch.dtype:
        """The entries' dtype."""
        return self.diag.dtype

    def _model(self, idx: torch.Tensor) -> int:
        """The model whose units the pooled indices ``idx`` (not empty) are (an error when they span
        several)."""
        lo, hi = int(idx.min()), int(idx.max())
        for i in range(len(self.offsets) - 1):
            if self.offsets[i] <= lo and hi < self.offsets[i + 1]:
                return i
        raise SpaceMismatchError(f"units {lo}..{hi} span several models of a Gram collected by model pairs "
                                 f"(models start at {self.offsets[:-1]}); only blocks between two models are known")

    def sub(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``G[rows][:, cols]`` for rows of one model and columns of another (a view of the block when
        both are runs of consecutive units; callers must not write into it)."""
        if not len(rows) or not len(cols):
            return torch.zeros(len(rows), len(cols), dtype=self.diag.dtype, device=self.diag.device)
        i, j = self._model(rows), self._model(cols)
        o = self.offsets
        if i == j or (min(i, j), max(i, j)) not in self.blocks:
            what = "the units of one model" if i == j else f"models {min(i, j)} and {max(i, j)}"
            raise SpaceMismatchError(f"the similarities between {what} were not collected (the statistics hold "
                                     f"only the model pairs {sorted(self.blocks)}); collect the joint "
                                     f"statistics for a method that compares them")
        if i < j:
            return submatrix(self.blocks[(i, j)], rows - o[i], cols - o[j])
        return submatrix(self.blocks[(j, i)].t(), rows - o[i], cols - o[j])

    def restrict(self, idx: Sequence[torch.Tensor]) -> "BlockGram":
        """The Gram over the pooled units ``idx[i]`` of each model ``i`` (in that order): views of
        the blocks where the units are runs of consecutive units."""
        o = self.offsets
        blocks = {(i, j): submatrix(B, idx[i] - o[i], idx[j] - o[j]) for (i, j), B in self.blocks.items()}
        offsets = [0, *itertools.accumulate(len(x) for x in idx)]
        pool = torch.cat(list(idx))
        span = _span(pool)
        return BlockGram(blocks, self.diag[span] if span is not None else self.diag[pool], offsets)

    def _combine(self, other: "BlockGram", fn) -> None:
        if self.offsets != other.offsets or set(self.blocks) != set(other.blocks):
            raise SpaceMismatchError(f"cannot combine Grams of models at {self.offsets} (pairs {sorted(self.blocks)}) "
                                     f"and {other.offsets} (pairs {sorted(other.blocks)})")
        for k, B in self.blocks.items():
            fn(B, other.blocks[k])
        fn(self.diag, other.diag)

    def add_(self, other: "BlockGram") -> "BlockGram":
        """Add ``other`` (same models and pairs) in place."""
        self._combine(other, lambda a, b: a.add_(b))
        return self

    def mul_(self, value: float) -> "BlockGram":
        """Multiply every known entry by ``value`` in place."""
        for B in self.blocks.values():
            B.mul_(value)
        self.diag.mul_(value)
        return self

    def __add__(self, other: "BlockGram | int") -> "BlockGram":
        if isinstance(other, int) and other == 0:
            return self.to(copy=True)
        if not isinstance(other, BlockGram):
            return NotImplemented
        return self.to(copy=True).add_(other)

    __radd__ = __add__

    def to(self, *args, **kwargs) -> "BlockGram":
        """The Gram with every tensor converted by ``Tensor.to(*args, **kwargs)``."""
        return BlockGram({k: B.to(*args, **kwargs) for k, B in self.blocks.items()}, self.diag.to(*args, **kwargs),
                         list(self.offsets))

    def dense(self) -> torch.Tensor:
        """The pooled matrix with zeros where entries are unknown (for display and tests)."""
        o, n = self.offsets, self.offsets[-1]
        G = torch.zeros(n, n, dtype=self.diag.dtype, device=self.diag.device)
        for (i, j), B in self.blocks.items():
            G[o[i]:o[i + 1], o[j]:o[j + 1]] = B
            G[o[j]:o[j + 1], o[i]:o[i + 1]] = B.t()
        G.diagonal().copy_(self.diag)
        return G


def gram_diagonal(G: "torch.Tensor | BlockGram", idx: torch.Tensor) -> torch.Tensor:
    """The diagonal entries ``G[idx, idx]`` of a pooled Gram (dense or :class:`BlockGram`)."""
    if isinstance(G, BlockGram):
        return G.diag[idx]
    return G[idx, idx]


@dataclass
class LeafProblem:
    """One leaf to solve: ``n`` fused features from the features of every model.

    Attributes:
        space: the space being solved (for messages).
        key: the leaf's key.
        n: fused width.
        sizes: number of features of each model.
        alpha: model weights.
        G: Gram over the pooled features (model 0's first; a :class:`BlockGram` when only the
            blocks between the anchor and the other models are known), or None for solvers that
            need none.
        geometry: how to compare in ``G``.
        anchor: a model whose features define the fused ones (its size is ``n``), or None.
        scores: optional pooled per-feature scores (e.g. weight magnitudes).
        generator: random generator for randomised solvers.
        seed: the fusion seed.
        note: ``note(message)`` records a fallback in the fusion report.
    """

    space: str
    key: str
    n: int
    sizes: list[int]
    alpha: list[float]
    G: "torch.Tensor | BlockGram | None" = None
    geometry: str = "correlation"
    anchor: int | None = None
    scores: torch.Tensor | None = None
    generator: torch.Generator | None = None
    seed: int = 0
    note: Callable[[str], None] = field(default=lambda msg: None, repr=False)

    @property
    def cols(self) -> list[torch.Tensor]:
        """Pooled indices of each model's features."""
        out, off = [], 0
        for s in self.sizes:
            out.append(torch.arange(off, off + s))
            off += s
        return out


def _span(idx: torch.Tensor) -> slice | None:
    """``idx`` as a slice when it is a run of consecutive indices, else None."""
    if idx.dtype != torch.long or idx.dim() != 1 or len(idx) == 0:
        return None
    a = int(idx[0])
    if int(idx[-1]) - a != len(idx) - 1 or (len(idx) > 1 and not bool((idx.diff() == 1).all())):
        return None
    return slice(a, a + len(idx))


def submatrix(G: "torch.Tensor | BlockGram", rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``G[rows][:, cols]``; a view (no copy) when ``rows`` and ``cols`` are runs of consecutive
    indices, as a leaf's units over a whole space are (wide spaces: each copy of a pooled Gram
    costs its size in memory traffic). Callers must not write into the result. For a
    :class:`BlockGram`, rows and columns must be units of two models whose pair was collected."""
    if isinstance(G, BlockGram):
        return G.sub(rows, cols)
    r, c = _span(rows), _span(cols)
    if r is not None and c is not None:
        return G[r, c]
    out = G.index_select(0, rows) if r is None else G[r]
    return out.index_select(1, cols) if c is None else out[:, c]


LeafSolver = Callable[[LeafProblem], "tuple[list[torch.Tensor], float]"]


def _transport_cost(C: torch.Tensor) -> float:
    """Minimum cost of an exact transport with uniform masses over cost matrix ``C``: for equal
    sizes the optimal assignment's mean cost (exact OT between uniform equal-size sets is an
    assignment), else ``ot.emd``'s."""
    from .leaves import transport_plan

    if C.shape[0] == C.shape[1]:
        r, c = linear_sum_assignment(C.numpy())
        return float(C[torch.as_tensor(r), torch.as_tensor(c)].sum()) / C.shape[0]
    return float((transport_plan(C, "emd") * C).sum())


def _head_costs(gv: GramView, rows: list[torch.Tensor], cols: list[torch.Tensor], pairs
                ) -> dict[tuple[int, int], float]:
    """The cost of matching head ``p`` with head ``q`` (the minimum cost of an exact transport
    between their dims, :func:`_transport_cost`) for each pair in ``pairs``; head ``p`` is the
    pooled units ``rows[p]``, head ``q`` the pooled units ``cols[q]``. One cost matrix between all
    the row heads' units and all the column heads' units, sliced per pair: the same numbers as one
    product per pair, without a product per pair."""
    from .leaves import gram_cost

    C = gram_cost(torch.cat(rows), gv.G, torch.cat(cols), gv.geometry)
    rs, cs = ([0, *itertools.accumulate(len(u) for u in units)] for units in (rows, cols))
    return {(p, q): _transport_cost(C[rs[p]:rs[p + 1], cs[q]:cs[q + 1]]) for p, q in pairs}


def space_blocks(tree: Blocks, graph) -> bool:
    """Whether the features within every block of ``tree`` are themselves the features of a space
    of ``graph`` (bilinear pooling's channels x channels), so that they follow its plan and width."""
    inner = tree.parts[0]
    return isinstance(inner, Leaf) and inner.key in graph and all(p == inner for p in tree.parts)


def _check_blocks(space: str, ttree: Blocks, st: Blocks, i: int, target=None, graph=None) -> None:
    """Model ``i``'s blocks fit the target's: the block counts may differ (they follow the width of
    the space indexing them), the features within a block (a grouped conv's group width, a flatten's
    positions) may not, unless they are a space of the ``target`` graph (:func:`space_blocks`) or
    the blocks are heads (indexed by a head axis of model ``i``'s ``graph``, see
    :meth:`alignment.graph.Graph.head_axes`: their dims are matched as heads' are)."""
    d, di = tree_size(ttree.parts[0]), tree_size(st.parts[0])
    if target is not None and space_blocks(ttree, target) and isinstance(st.parts[0], Leaf) \
            and st.parts[0].key == ttree.parts[0].key:
        return
    if di != d and not (graph is not None and ttree.key in graph.head_axes()):
        raise SpaceMismatchError(f"space {space!r}: blocks of {di} features in model {i} but {d} in the target "
                                 f"(per-block widths of grouped convs, and the positions a flatten lays out per "
                                 f"channel, must not change)")


def _check_tree(space: str, ttree: Node, st: Node, i: int, target, graph) -> None:
    """Model ``i``'s structure tree of ``space`` fits the target's wherever the walk reads it without a
    plan (see :func:`check_structures`)."""
    plain = (Leaf, Fixed)
    if type(st) is not type(ttree) and not (isinstance(st, plain) and isinstance(ttree, plain)):
        raise SpaceMismatchError(f"space {space!r}: model {i} has structure {type(st).__name__} where the target has "
                                 f"{type(ttree).__name__}; models and target must be of one family")
    if isinstance(ttree, Fixed) or isinstance(st, Fixed):
        if tree_size(st) != tree_size(ttree):
            raise SpaceMismatchError(f"space {space!r}: a fixed range has {tree_size(st)} features in model {i} but "
                                     f"{tree_size(ttree)} in the target")
    elif isinstance(ttree, Cat):
        if len(st.parts) != len(ttree.parts):
            raise SpaceMismatchError(f"space {space!r}: model {i} concatenates {len(st.parts)} segments, the target "
                                     f"{len(ttree.parts)}")
        for a, b in zip(ttree.parts, st.parts):
            _check_tree(space, a, b, i, target, graph)
    elif isinstance(ttree, Heads):
        # the subtrees of heads are paired by the head assignment, known only when solved
        if st.count != ttree.count:
            raise SpaceMismatchError(f"space {space!r}: model {i} has {st.count} heads where the target has "
                                     f"{ttree.count}; heads are kept when widths change (head_dim changes), so "
                                     f"head counts must agree")
    elif isinstance(ttree, Blocks):
        _check_blocks(space, ttree, st, i, target, graph)
        for who, tree, g in (("the target", ttree, target), (f"model {i}", st, graph)):
            if tree.key in g and tree.count != g[tree.key].width:
                raise SpaceMismatchError(f"space {space!r}: {who} has {tree.count} blocks indexed by space "
                                         f"{tree.key!r} of width {g[tree.key].width}; a block count must equal the "
                                         f"width of the space indexing the blocks")


def check_structures(graphs: Sequence, target) -> None:
    """Check that every model's structure trees fit the target's, before any statistics or solve.

    The walk pairs the models' trees with the target's: types, fixed ranges, concatenation segments
    and head counts must agree, and blocks (a depthwise conv's channels, a flatten's channels x
    positions) must have the per-block widths of the target's and one block per feature of the space
    indexing them. Widths of leaves, head dims and block counts may differ (they follow plans).
    Spaces the walk never solves (no members, or missing from a model: :meth:`Walk.solve` names
    those) are not checked.

    Args:
        graphs: the models' graphs.
        target: the graph of the fused model.

    Raises:
        SpaceMismatchError: naming the space, the model and what differs.
    """
    for s in target.spaces:
        if not s.members or s.kind == "heads" or any(s.name not in g for g in graphs):
            continue
        for i, g in enumerate(graphs):
            _check_tree(s.name, s.tree, g[s.name].tree, i, target, g)


class Walk:
    """Per-space plans for N models onto a target graph, following each space's structure tree.

    The models' trees are checked against the target's when the walk is made
    (:func:`check_structures`), so a structure that cannot fit fails before any leaf is solved.

    Args:
        graphs: the models' graphs (spaces pair by name).
        target: the graph of the fused model (its widths and structure).
        leaf_solver: ``solver(LeafProblem) -> (plans, score)``.
        alpha: model weights (default uniform).
        gram: ``gram(space) -> GramView`` (None for solvers that need no similarity).
        anchor: a model whose features anchor every leaf of its size, and the reference for heads
            (default: the first model of the target's size).
        scores: ``scores(space) -> pooled per-feature scores`` (optional).
        seed: seed of the walk's random generator (randomised solvers and random heads).
        random_heads: draw head assignments at random instead of matching them (random
            permutations).
        note: ``note(message)`` records a fallback in the fusion report.
        merge_heads: ``merge_heads(S, sizes, n, where) -> labels``: instead of matching heads one to
            one, pool every model's heads and group them into the target's head count from their
            similarity ``S`` (heads of one model may then share a fused head; the dims of a fused
            head's heads are pooled for the leaf solver).
        workers: in :meth:`solve_all`, spaces that are one plain leaf have their leaf solver run on
            up to this many threads while the walk prepares the next spaces (the Hungarian and exact
            transport solvers are single-threaded native code that releases the GIL). The plans
            are those of a sequential walk: Grams are still built in order on the calling thread,
            and a Gram that reads a neighbour's plan (:meth:`planned`) waits for it. Such a leaf's
            problem gets its own random generator (seeded from the walk's seed and the leaf key),
            and its solver's notes are recorded when its plans are collected (in walk order).
    """

    def __init__(self, graphs: Sequence, target, leaf_solver: LeafSolver, alpha: Sequence[float] | None = None,
                 gram: Callable[[str], GramView] | None = None, anchor: int | None = None,
                 scores: Callable[[str], torch.Tensor] | None = None, seed: int = 0,
                 random_heads: bool = False, note: Callable[[str], None] | None = None,
                 merge_heads: Callable[..., torch.Tensor] | None = None, workers: int = 1):
        self.graphs, self.target = list(graphs), target
        self.leaf_solver, self.gram_fn, self.anchor = leaf_solver, gram, anchor
        self.alpha = list(alpha) if alpha is not None else [1.0 / len(self.graphs)] * len(self.graphs)
        self.scores_fn, self.seed, self.random_heads = scores, seed, random_heads
        self.note = note or (lambda msg: None)
        self.merge_heads = merge_heads
        self.generator = torch.Generator().manual_seed(seed)
        self.cache: dict[str, list[torch.Tensor]] = {}   # leaf key -> per-model plans
        self.head_plans: dict[str, list[torch.Tensor]] = {}   # heads key -> per-model head plans
        self.plans: dict[str, list[torch.Tensor]] = {}
        self.costs: dict[str, float] = {}
        self._scores: dict[str, list[float]] = {}
        self._grams: dict[str, GramView | None] = {}
        self.groups: dict[str, list[str]] = {}
        self.workers = max(1, int(workers))
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: dict[str, _InFlight] = {}   # space -> leaf solve running on the pool
        for s in target.spaces:
            if isinstance(s.tree, Heads):
                self.groups.setdefault(s.tree.key, []).append(s.name)
        check_structures(self.graphs, target)

    # -- public ----------------------------------------------------------------------------------
    def order(self) -> list[str]:
        """Spaces with members (and heads spaces, whose assignment :meth:`permutations` reports): plain
        feature spaces first, then head-structured ones, then the rest."""
        def rank(s) -> int:
            if s.kind != "features":
                return 3
            return 2 if isinstance(s.tree, Heads) else 1
        return [s.name for s in sorted(self.target.spaces, key=rank) if s.members or s.kind == "heads"]

    def solve(self, name: str) -> list[torch.Tensor]:
        """Per-model plans (``n x n_i``) of one space (solved once, then cached)."""
        self._collect(name)
        if name in self.plans:
            return self.plans[name]
        for i, g in enumerate(self.graphs):
            if name not in g:
                raise SpaceMismatchError(f"space {name!r} is missing from model {i}; models must be of one family")
        self._scores[name] = []
        if self.target[name].kind == "heads":
            # a head index (e.g. rows of a per-head bias table) follows the head assignment
            plans = list(self._heads(name))
        else:
            plans = self._walk(name, self.target[name].tree, [g[name].tree for g in self.graphs],
                               self._pooled(name))
        self._record(name, plans)
        return plans

    def _record(self, name: str, plans: list[torch.Tensor]) -> None:
        # a space's plans, and its cost: the mean of its leaves' scores
        self.plans[name] = plans
        vals = [v for v in self._scores[name] if not math.isnan(v)]
        self.costs[name] = sum(vals) / len(vals) if vals else float("nan")

    def solve_all(self, order: Sequence[str] | None = None) -> dict[str, list[torch.Tensor]]:
        """Plans of every space with members (in ``order`` when given; see ``workers``)."""
        names = order if order is not None else self.order()
        if self.workers <= 1:
            for name in names:
                self.solve(name)
            return dict(self.plans)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="walk-leaf")
        try:
            for name in names:
                if not self._submit(name):
                    self.solve(name)
            self._drain()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._inflight.clear()
        return dict(self.plans)

    def planned(self, name: str) -> list[torch.Tensor] | None:
        """The plans of a space solved so far (waiting for its leaf solve when it is running), else
        None."""
        self._collect(name)
        return self.plans.get(name)

    def reset(self, name: str) -> None:
        """Forget a space's plans (and its leaves) so the next :meth:`solve` recomputes them."""
        self._collect(name)
        self.plans.pop(name, None)
        self._grams.pop(name, None)
        tree = self.target[name].tree
        for key in tree_keys(tree):
            if not isinstance(tree, Blocks) or key != tree.key:
                self.cache.pop(key, None)
                self.head_plans.pop(key, None)

    def permutations(self, model: int = 0) -> dict[str, torch.Tensor]:
        """The solved plans of one model as permutations (fused feature ``k`` = feature ``perm[k]``)."""
        self._drain()
        return {name: plan_argmax(plans[model]) for name, plans in self.plans.items()}

    # -- internals -------------------------------------------------------------------------------
    def _gram(self, name: str) -> GramView | None:
        if name not in self._grams:
            self._grams[name] = self.gram_fn(name) if self.gram_fn is not None else None
        return self._grams[name]

    def _pooled(self, name: str) -> list[torch.Tensor]:
        # each model's units in the pooled order of the space's Gram (model 0's first); the Gram
        # itself is computed only when a leaf is solved over it (a space whose plan follows another
        # space's, as blocks, fixed ranges or an inner axis already solved, never needs it)
        off = [0]
        for g in self.graphs:
            off.append(off[-1] + g[name].width)
        return [off[i] + torch.arange(g[name].width) for i, g in enumerate(self.graphs)]

    def _check(self, space: str, ttree: Node, strees: list[Node]) -> None:
        for i, st in enumerate(strees):
            plain = (Leaf, Fixed)
            if type(st) is not type(ttree) and not (isinstance(st, plain) and isinstance(ttree, plain)):
                raise SpaceMismatchError(
                    f"space {space!r}: model {i} has structure {type(st).__name__} where the target has "
                    f"{type(ttree).__name__}; models and target must be of one family")

    def _walk(self, space: str, ttree: Node, strees: list[Node], idx: list[torch.Tensor]) -> list[torch.Tensor]:
        self._check(space, ttree, strees)
        n = tree_size(ttree)
        if isinstance(ttree, Fixed) or any(isinstance(st, Fixed) for st in strees):
            for i, st in enumerate(strees):
                if tree_size(st) != n:
                    raise SpaceMismatchError(f"space {space!r}: a fixed range has {tree_size(st)} features in "
                                             f"model {i} but {n} in the target")
            return [torch.eye(n, dtype=torch.float64) for _ in strees]
        if isinstance(ttree, Leaf):
            if self._is_heads(ttree.key):
                # a head index read as the inner axis of another factorisation (NesT flattens its
                # attention output dims-major, (dims, heads)): it follows the head assignment
                return self._heads(ttree.key)
            for other, job in list(self._inflight.items()):
                if job.key == ttree.key:  # the same features, solved for another space
                    self._collect(other)
            if ttree.key not in self.cache:
                self.cache[ttree.key] = self._leaf(space, ttree.key, n, idx)
            return self.cache[ttree.key]
        if isinstance(ttree, Cat):
            return self._cat(space, ttree, strees, idx)
        if isinstance(ttree, Blocks):
            return self._blocks(space, ttree, strees, idx)
        return self._heads_walk(space, ttree, strees, idx)

    def _cat(self, space, ttree: Cat, strees, idx):
        for i, st in enumerate(strees):
            if len(st.parts) != len(ttree.parts):
                raise SpaceMismatchError(f"space {space!r}: model {i} concatenates {len(st.parts)} segments, "
                                         f"the target {len(ttree.parts)}")
        per_seg, offs = [], [0] * len(strees)
        for j, sub in enumerate(ttree.parts):
            subs = [st.parts[j] for st in strees]
            sub_idx = []
            for i, st in enumerate(subs):
                w = tree_size(st)
                sub_idx.append(idx[i][offs[i]:offs[i] + w])
                offs[i] += w
            per_seg.append(self._walk(space, sub, subs, sub_idx))
        return [torch.block_diag(*[dense_plan(p[i]) for p in per_seg]) for i in range(len(strees))]

    def _blocks(self, space, ttree: Blocks, strees, idx):
        # blocks indexed by another feature space (a depthwise conv's channels, a flatten's channels x
        # positions): fused block c takes model block c' as that space's plan takes feature c', at any
        # widths (the outer plan is n x n_i); the features within a block keep their place, unless
        # they are a feature space themselves (bilinear pooling's channels x channels): then fused
        # entry (c, e) takes (c', e') as both plans take theirs
        for i, st in enumerate(strees):
            _check_blocks(space, ttree, st, i, self.target, self.graphs[i])
        d = tree_size(ttree.parts[0])
        outer = self.solve(ttree.key)
        if space_blocks(ttree, self.target):
            return [torch.kron(dense_plan(o), dense_plan(p)) for o, p in zip(outer, self.solve(ttree.parts[0].key))]
        if any(tree_size(st.parts[0]) != d for st in strees):
            # heads (values whose heads a head axis indexes: talking heads) of another head width
            # (_check_blocks allowed no other blocks): the head assignment is that axis's plan, the
            # dims within heads are matched as heads' are
            return self._heads_walk(space, Heads(ttree.key, ttree.count, ttree.parts),
                                    [Heads(st.key, st.count, st.parts) for st in strees], idx,
                                    [dense_plan(o) for o in outer])
        out = []
        for i, st in enumerate(strees):
            T = dense_plan(outer[i])
            if tuple(T.shape) != (ttree.count, st.count):
                raise SpaceMismatchError(f"space {space!r}: its {ttree.count} blocks in the target and {st.count} in "
                                         f"model {i} are indexed by space {ttree.key!r}, whose plan is "
                                         f"{tuple(T.shape)[0]} x {tuple(T.shape)[1]}; a block count must equal the "
                                         f"width of the space indexing the blocks")
            out.append(torch.kron(T, torch.eye(d, dtype=torch.float64)))
        return out

    def _heads_walk(self, space, ttree: Heads, strees, idx, H: list[torch.Tensor] | None = None):
        # H: per model, the head assignment (default: the plan of the heads space ``ttree.key``)
        nh = ttree.count
        for i, st in enumerate(strees):
            if st.count != nh:
                raise SpaceMismatchError(
                    f"space {space!r}: model {i} has {st.count} heads where the target has {nh}; heads are "
                    f"kept when widths change (head_dim changes), so head counts must agree")
        H = self._heads(ttree.key) if H is None else H
        n = tree_size(ttree)
        d = n // nh
        sizes = [tree_size(st.parts[0]) for st in strees]
        members = [[torch.nonzero(H[i][h]).flatten().tolist() for i in range(len(strees))] for h in range(nh)]
        shared = self._shared_leaf(ttree, strees)
        if shared is not None and shared not in self.cache and not self._is_heads(shared):
            # one dims-within-head axis shared by every head: solved once over all matched heads
            pis = [torch.tensor([members[h][i][0] for h in range(nh)]) for i in range(len(strees))]
            self.cache[shared] = self._leaf(space, shared, d, [idx[i][:sizes[i]] for i in range(len(strees))],
                                            heads=(pis, sizes, nh, idx))
        plans = [torch.zeros(n, tree_size(st), dtype=torch.float64) for st in strees]
        for h in range(nh):
            subs, sub_idx, cols = [], [], []
            for i, st in enumerate(strees):
                di, got = sizes[i], members[h][i]
                cols_i = torch.cat([torch.arange(g * di, (g + 1) * di) for g in got]) if got else \
                    torch.zeros(0, dtype=torch.long)
                if len(got) == 1:
                    subs.append(st.parts[got[0]])
                elif all(isinstance(st.parts[g], Leaf) for g in got):
                    # several heads of one model zipped into one fused head (or none): their dims are pooled
                    subs.append(Leaf(f"{space}/head{h}/model{i}", di * len(got)))
                else:
                    raise SpaceMismatchError(f"space {space!r}: heads with inner structure can only be matched one "
                                             f"to one, but fused head {h} takes {len(got)} heads of model {i}")
                sub_idx.append(idx[i][cols_i])
                cols.append(cols_i)
            sub = self._walk(space, ttree.parts[h], subs, sub_idx)
            for i, c in enumerate(cols):
                block = dense_plan(sub[i])
                if tuple(block.shape) != (d, len(c)):
                    keys = ", ".join(tree_keys(ttree.parts[h]))
                    raise SpaceMismatchError(
                        f"space {space!r}: fused head {h} is {d} wide but the plan of its dims ({keys}) is "
                        f"{block.shape[0]} x {block.shape[1]}: the dims within a head are also a space of another "
                        f"width (heads laid out dims-major, or a head count kept where it is read as a width); "
                        f"give these spaces one width")
                plans[i][h * d:(h + 1) * d, c] = block
        return plans

    def _is_heads(self, key: str) -> bool:
        return key in self.target and self.target[key].kind == "heads"

    @staticmethod
    def _shared_leaf(ttree: Heads, strees) -> str | None:
        keys = {p.key for p in ttree.parts if isinstance(p, Leaf)}
        if len(keys) == 1 and all(isinstance(p, Leaf) for p in ttree.parts):
            return next(iter(keys))
        return None

    def _leaf(self, space: str, key: str, n: int, idx: list[torch.Tensor], heads=None) -> list[torch.Tensor]:
        plans, score = self.leaf_solver(self._problem(space, key, n, idx, heads))
        self._scores.setdefault(space, []).append(score)
        return plans

    def _submit(self, name: str) -> bool:
        """Start the leaf solve of a space that is one plain leaf on the pool (False: the space has
        more structure, or its leaf is known already, so it is walked here)."""
        if name in self._inflight:
            return True
        if name in self.plans or any(name not in g for g in self.graphs):
            return False
        tree = self.target[name].tree
        strees = [g[name].tree for g in self.graphs]
        if (not isinstance(tree, Leaf) or self._is_heads(tree.key) or tree.key in self.cache
                or any(job.key == tree.key for job in self._inflight.values())
                or not all(isinstance(st, Leaf) for st in strees)):
            return False
        # at most ``workers`` solves in flight: each holds its cost matrices (wide spaces: hundreds of MB)
        while len(self._inflight) >= self.workers:
            self._collect(next(iter(self._inflight)))
        notes: list[str] = []
        gen = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{tree.key}".encode()))
        problem = self._problem(name, tree.key, tree.size, self._pooled(name), None, gen, notes.append)
        self._inflight[name] = _InFlight(tree.key, self._pool.submit(self.leaf_solver, problem), notes)
        return True

    def _drain(self) -> None:
        """Wait for every leaf solve in flight and record its plans."""
        while self._inflight:
            self._collect(next(iter(self._inflight)))

    def _collect(self, name: str) -> None:
        """Wait for a space's leaf solve (and for those started before it) and record its plans
        (nothing when it is not in flight)."""
        while name in self._inflight:
            first = next(iter(self._inflight))
            job = self._inflight.pop(first)
            plans, score = job.future.result()
            for msg in job.notes:
                self.note(msg)
            self.cache[job.key] = plans
            self._scores[first] = [score]
            self._record(first, plans)

    def _problem(self, space: str, key: str, n: int, idx: list[torch.Tensor], heads=None,
                 generator: torch.Generator | None = None, note: Callable[[str], None] | None = None
                 ) -> LeafProblem:
        sizes = [len(x) for x in idx]
        anchor = self.anchor if self.anchor is not None and sizes[self.anchor] == n else None
        if anchor is None and self.anchor is None:
            anchor = next((i for i, s in enumerate(sizes) if s == n), None)
        elif anchor is None:
            (note or self.note)(f"space {space!r}: the anchor model {self.anchor} has {sizes[self.anchor]} units where "
                                f"the fused model has {n}, so no model anchors them: matched to their barycenter")
        gv = self._gram(space)
        G = geometry = None
        if gv is not None:
            geometry = gv.geometry
            if heads is None:
                G = _pooled_gram(gv.G, idx)
            else:
                # the Gram of a shared axis sums the Grams of the matched heads' blocks
                pis, hsizes, nh, full = heads
                G = 0
                for h in range(nh):
                    G = G + _pooled_gram(gv.G, [full[i][int(pis[i][h]) * hsizes[i]:(int(pis[i][h]) + 1) * hsizes[i]]
                                                for i in range(len(full))])
        sc = None
        if self.scores_fn is not None:
            pooled = self.scores_fn(space)
            sc = pooled[torch.cat(idx)] if pooled is not None else None
        return LeafProblem(space=space, key=key, n=n, sizes=sizes, alpha=self.alpha, G=G,
                           geometry=geometry or "correlation", anchor=anchor, scores=sc,
                           generator=generator or self.generator, seed=self.seed, note=note or self.note)

    def _heads(self, key: str) -> list[torch.Tensor]:
        """Per model, the head plan (``nh x nh_i``, 0/1): fused head ``h`` takes model head ``g`` where
        ``plan[h, g] = 1`` (a permutation, unless heads are merged with :attr:`merge_heads`)."""
        if key in self.head_plans:
            return self.head_plans[key]
        nh = self.target[key].width
        group = self.groups.get(key, [])
        if self.random_heads:
            plans = [_perm_plan(torch.randperm(nh, generator=self.generator)) for _ in self.graphs]
        elif self.merge_heads is not None and group and len(self.graphs) > 1:
            if any(self._shared_leaf(self.target[s].tree, None) is not None for s in group):
                self.note(f"heads {key!r}: a dims-within-head axis is shared by every head, so heads are matched "
                          f"one to one instead of merged")
                plans = self._matched_heads(key, nh, group)
            else:
                plans = self._merged_heads(key, nh, group)
        else:
            plans = self._matched_heads(key, nh, group)
        self.head_plans[key] = plans
        return plans

    def _merged_heads(self, key: str, nh: int, group: list[str]) -> list[torch.Tensor]:
        """Heads of every model pooled and merged into ``nh`` groups by :attr:`merge_heads`, on the
        mean similarity (one minus the head cost) over the spaces the heads structure."""
        heads = [(i, a) for i in range(len(self.graphs)) for a in range(nh)]
        S = torch.zeros(len(heads), len(heads), dtype=torch.float64)
        used = 0
        for s in group:
            gv = self._gram(s)
            if gv is None:
                continue
            used += 1
            rng = []
            for i, a in heads:
                di = self.graphs[i][s].width // nh
                rng.append(gv.offsets[i] + torch.arange(a * di, (a + 1) * di))
            pairs = [(p, q) for p in range(len(heads)) for q in range(p + 1, len(heads))]
            for (p, q), c in _head_costs(gv, rng, rng, pairs).items():
                S[p, q] += 1.0 - c
                S[q, p] += 1.0 - c
        if used:
            S /= used
        S = torch.nan_to_num(S, nan=-1.0)
        labels = self.merge_heads(S, [nh] * len(self.graphs), nh, f"heads {key!r}")
        plans = []
        for i in range(len(self.graphs)):
            T = torch.zeros(nh, nh, dtype=torch.float64)
            T[labels[i * nh:(i + 1) * nh], torch.arange(nh)] = 1.0
            plans.append(T)
        return plans

    def _matched_heads(self, key: str, nh: int, group: list[str]) -> list[torch.Tensor]:
        """Every model's heads matched one to one to a reference model's (Hungarian on head costs)."""
        ref = self.anchor
        if ref is None:
            ref = next((i for i, g in enumerate(self.graphs)
                        if all(g[s].width == self.target[s].width for s in group)), 0)
        pis = []
        for i, g in enumerate(self.graphs):
            if i == ref or not group:
                pis.append(torch.arange(nh))
                continue
            cost = np.zeros((nh, nh))
            for s in group:
                gv = self._gram(s)
                if gv is None:
                    continue
                off = gv.offsets
                dr, di = self.graphs[ref][s].width // nh, g[s].width // nh
                rows = [off[ref] + torch.arange(a * dr, (a + 1) * dr) for a in range(nh)]
                cols = [off[i] + torch.arange(b * di, (b + 1) * di) for b in range(nh)]
                pairs = [(a, b) for a in range(nh) for b in range(nh)]
                for (a, b), c in _head_costs(gv, rows, cols, pairs).items():
                    cost[a, b] += c
            if not np.isfinite(cost).all():
                self.note(f"heads {key!r}: non-finite head costs (NaN statistics?) counted as the largest cost")
                cost = np.nan_to_num(cost, nan=np.nanmax(cost[np.isfinite(cost)]) if np.isfinite(cost).any() else 0.0)
            r, c = linear_sum_assignment(cost)
            pi = torch.empty(nh, dtype=torch.long)
            pi[torch.as_tensor(r)] = torch.as_tensor(c, dtype=torch.long)
            pis.append(pi)
        return [_perm_plan(pi) for pi in pis]


@dataclass
class _InFlight:
    """A leaf solve running on the walk's pool: its leaf key, future and buffered notes."""

    key: str
    future: Future
    notes: list[str]


def _pooled_gram(G: "torch.Tensor | BlockGram", idx: Sequence[torch.Tensor]) -> "torch.Tensor | BlockGram":
    """The Gram over the pooled units ``idx[i]`` of each model (a view where they are runs)."""
    if isinstance(G, BlockGram):
        return G.restrict(idx)
    pool = torch.cat(list(idx))
    return submatrix(G, pool, pool)


def _perm_plan(perm: torch.Tensor) -> torch.Tensor:
    T = torch.zeros(len(perm), len(perm), dtype=torch.float64)
    T[torch.arange(len(perm)), perm] = 1.0
    return T
