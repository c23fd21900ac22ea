"""Per-space merge/unmerge maps: what every solver produces and the engine applies.

For models ``i = 1..N`` and a space of fused width ``n``, a :class:`SpaceMap` holds, per model, a
merge map ``M_i`` (``n x n_i``: fused features ~ sum_i M_i f_i) and an unmerge map ``U_i``
(``n_i x n``: model i's features ~ U_i f_fused). Solvers describe a correspondence by *plans*: per
model a non-negative ``n x n_i`` matrix ``T_i`` saying how much of model i's feature ``j`` goes to
fused feature ``k`` (a permutation matrix, a selection, a transport plan, a cluster membership).
:func:`plan_maps` turns plans and interpolation weights into maps:

* ``M_i[k] = alpha_i T_i[k] / sum_j T_i[k, j]``, renormalised over the models that send anything
  to ``k`` (a fused feature that only some models match is the weighted mean of those);
* ``U_i[j] = T_i[:, j] / sum_k T_i[k, j]`` (a model feature is the mean of the fused features it
  went to; a feature sent nowhere is dropped: its row of ``U_i`` is zero).

For a permutation these give ``M_i = alpha_i P_i`` and ``U_i = P_i^T``.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .errors import InvalidOptionError, PermutationError, SpaceMismatchError
from .graph import Graph
from .structure import RowPlan, dense_plan

__all__ = [
    "SpaceMap", "permutation_plan", "as_plan", "plan_maps", "permutation_map", "selection_map", "axis_roles",
    "axis_matrix", "map_tensor", "sparse_entries", "SPARSE", "fuse_tensors", "query_key_spaces", "correct_query_key",
]


class SpaceMap:
    """Merge and unmerge maps of one space for each of N models.

    Attributes:
        merge: per model, ``M_i`` of shape ``(n, n_i)`` (weights included).
        unmerge: per model, ``U_i`` of shape ``(n_i, n)``.

    Maps built from sparse plans (:meth:`from_entries`: permutations, selections, repeats, cluster
    memberships of zipping and merging, exact transport plans) keep their nonzero entries and build
    the dense matrices only when ``merge`` or ``unmerge`` is read: applied to weights, they are index
    gathers and scatter-adds (wide spaces: an ``n x n_i`` float64 matrix per model and map, and a
    dense product with every weight, is what applying them costs otherwise).
    """

    def __init__(self, merge: Sequence[torch.Tensor], unmerge: Sequence[torch.Tensor]) -> None:
        """Raises :class:`~alignment.errors.SpaceMismatchError` (a ``ValueError``) when the maps do
        not fit: not one merge and one unmerge map per model, a map that is no matrix, shapes other
        than ``(n, n_i)`` and ``(n_i, n)``, or merge maps of different fused widths ``n``."""
        if len(merge) != len(unmerge):
            raise SpaceMismatchError(f"SpaceMap got {len(merge)} merge and {len(unmerge)} unmerge maps: give one of "
                                     f"each per model")
        for i, (m, u) in enumerate(zip(merge, unmerge)):
            if not (isinstance(m, torch.Tensor) and isinstance(u, torch.Tensor)) or m.dim() != 2 or u.dim() != 2:
                raise SpaceMismatchError(
                    f"model {i}: merge and unmerge maps must be matrices (tensors of shapes (n, n_i) and (n_i, n)), "
                    f"got {_shape_of(m)} and {_shape_of(u)}")
            if m.shape[0] != u.shape[1] or m.shape[1] != u.shape[0]:
                raise SpaceMismatchError(
                    f"model {i}: merge map {tuple(m.shape)} and unmerge map {tuple(u.shape)} do not fit "
                    f"(expected (n, n_i) and (n_i, n))"
                )
            if m.shape[0] != merge[0].shape[0]:
                raise SpaceMismatchError(f"model {i}: merge map {tuple(m.shape)} gives {m.shape[0]} fused features but "
                                         f"model 0's gives {merge[0].shape[0]}; every model's maps must share the "
                                         f"fused width n")
        self._setup(list(merge), list(unmerge), [int(m.shape[1]) for m in merge],
                    int(merge[0].shape[0]) if merge else 0, {})

    def _setup(self, merge: list, unmerge: list, sizes: list[int], width: int, entries: dict) -> None:
        self._merge: list[torch.Tensor | None] = merge
        self._unmerge: list[torch.Tensor | None] = unmerge
        self._sizes, self._width, self._entries = sizes, width, entries

    @classmethod
    def from_entries(cls, sizes: Sequence[int], width: int, merge: Sequence[Entries],
                     unmerge: Sequence[Entries]) -> "SpaceMap":
        """Maps given by their nonzero entries (see :meth:`entries`): per model of width
        ``sizes[i]``, ``M_i`` and ``U_i^T`` (both ``width x sizes[i]``) as ``(rows, cols, vals)``."""
        if not (len(sizes) == len(merge) == len(unmerge)) or not sizes:
            raise SpaceMismatchError("from_entries needs one size, merge and unmerge entry list per model")
        for i, (w, em, eu) in enumerate(zip(sizes, merge, unmerge)):
            for rows, cols, vals in (em, eu):
                if not len(rows) == len(cols) == len(vals):
                    raise SpaceMismatchError(f"model {i}: rows, cols and vals of an entry list differ in length")
                if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= width
                                  or int(cols.min()) < 0 or int(cols.max()) >= w):
                    raise SpaceMismatchError(f"model {i}: an entry does not fit a map of shape ({width}, {w})")
                if bool((vals == 0).any()):
                    raise SpaceMismatchError(f"model {i}: an entry list holds a zero entry")
        self = cls.__new__(cls)
        entries = {(i, m): tuple(e) for i, pair in enumerate(zip(merge, unmerge)) for m, e in zip((True, False), pair)}
        self._setup([None] * len(sizes), [None] * len(sizes), [int(w) for w in sizes], int(width), entries)
        return self

    @classmethod
    def from_gathers(cls, sizes: Sequence[int], merge: Sequence[tuple[torch.Tensor, torch.Tensor]],
                     unmerge: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> "SpaceMap":
        """Maps given as gathers (see :meth:`gather`): per model of width ``sizes[i]``, ``M_i`` and
        ``U_i^T`` as ``(idx, vals)`` of length ``n`` (every row one nonzero entry)."""
        if not (len(sizes) == len(merge) == len(unmerge)) or not sizes:
            raise SpaceMismatchError("from_gathers needs one size, merge and unmerge gather per model")
        n = len(merge[0][0])
        for i, (w, gm, gu) in enumerate(zip(sizes, merge, unmerge)):
            if any(len(idx) != n or len(vals) != n for idx, vals in (gm, gu)):
                raise SpaceMismatchError(f"model {i}: a gather does not fit a map of shape ({n}, {w})")
        rows = torch.arange(n)  # (from_entries checks the columns and the zero entries)
        return cls.from_entries(sizes, n, [(rows, *g) for g in merge], [(rows, *g) for g in unmerge])

    def _dense(self, i: int, merge: bool) -> torch.Tensor:
        rows, cols, vals = self._entries[(i, merge)]
        A = torch.zeros(self._width, self._sizes[i], dtype=vals.dtype)
        A[rows, cols] = vals
        return A

    @property
    def merge(self) -> list[torch.Tensor]:
        """Per model, ``M_i`` (``n x n_i``). Once read, these matrices are the maps: a change made to
        them in place is what gets applied (their entries are found again)."""
        self._materialise(True)
        return self._merge

    @property
    def unmerge(self) -> list[torch.Tensor]:
        """Per model, ``U_i`` (``n_i x n``); once read, as :attr:`merge`."""
        self._materialise(False)
        return self._unmerge

    def _materialise(self, merge: bool) -> None:
        dense = self._merge if merge else self._unmerge
        for i, m in enumerate(dense):
            if m is None:
                A = self._dense(i, merge)
                dense[i] = A if merge else A.t()
            self._entries.pop((i, merge), None)  # found again from the matrix

    @property
    def sizes(self) -> list[int]:
        """Each model's width ``n_i``."""
        return list(self._sizes)

    def entries(self, i: int, merge: bool) -> Entries | None:
        """Model ``i``'s merge map ``M_i`` (``merge``) or transposed unmerge map ``U_i^T`` by its
        nonzero entries ``(rows, cols, vals)`` in row-major order, or None when the map is dense
        (more than one entry in :data:`SPARSE` of the matrix nonzero: applied as a product)."""
        key = (i, merge)
        if key not in self._entries:
            A = self._merge[i] if merge else self._unmerge[i].t()
            self._entries[key] = sparse_entries(A.to(torch.float64).cpu())
        return self._entries[key]

    def gather(self, i: int, merge: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Model ``i``'s merge map ``M_i`` (``merge``) or transposed unmerge map ``U_i^T`` as a
        gather: ``(idx, vals)`` with row ``k`` equal to ``vals[k]`` at column ``idx[k]`` and zero
        elsewhere, or None when some row has more or less than one entry (permutations, selections
        and repeats are applied to weights as index gathers)."""
        e = self.entries(i, merge)
        if e is None or not _one_per_row(e[0], self._width):
            return None
        return e[1], e[2]

    @property
    def width(self) -> int:
        """Fused width ``n``."""
        return self._width


Entries = tuple  # (rows, cols, vals): the nonzero entries of a map (LongTensor, LongTensor, values)

SPARSE = 8
"""A map is applied by its entries when at most one in ``SPARSE`` of its entries is nonzero (one per
row or column: permutations, clusters, exact transport plans), else as a dense product."""


def _one_per_row(rows: torch.Tensor, n: int) -> bool:
    # whether entries with these (row-major) rows have exactly one entry in each of n rows: a gather
    return len(rows) == n and torch.equal(rows, torch.arange(n))


def sparse_entries(A: torch.Tensor) -> Entries | None:
    """``(rows, cols, vals)`` of the nonzero entries of ``A`` in row-major order, or None when more
    than one in :data:`SPARSE` of its entries are nonzero (a dense map)."""
    nnz = int(torch.count_nonzero(A))
    if nnz * SPARSE > A.numel() and nnz > max(A.shape, default=0):
        return None  # (a dense plan: no index list of all its entries)
    rows, cols = A.nonzero().unbind(1)
    return rows, cols, A[rows, cols]


def _shape_of(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else f"a {type(x).__name__}"


def _indices(perm, what: str) -> torch.Tensor:
    """``perm`` as a 1-D long tensor on the CPU (:class:`PermutationError` for anything else)."""
    try:
        p = torch.as_tensor(perm)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise PermutationError(f"{what} must be a 1-D tensor of feature indices, got a {type(perm).__name__} "
                               f"({exc})") from None
    whole = not (p.dtype == torch.bool or p.is_complex()) and (not p.is_floating_point() or bool((p == p.round()).all()))
    if p.dim() != 1 or not whole:
        raise PermutationError(f"{what} must be a 1-D tensor of integer feature indices, got {p.dtype} of shape "
                               f"{tuple(p.shape)}")
    return p.long().cpu()


def permutation_plan(perm: torch.Tensor, n_source: int | None = None) -> torch.Tensor:
    """0/1 plan of a permutation or selection: fused feature ``k`` is model feature ``perm[k]``.

    Raises:
        PermutationError: ``perm`` is no 1-D vector of indices in ``0..n_source - 1``.
    """
    p = _indices(perm, "a permutation or selection")
    n = n_source if n_source is not None else len(p)
    if len(p) and (int(p.min()) < 0 or int(p.max()) >= n):
        bad = int(p[(p < 0) | (p >= n)][0])
        raise PermutationError(f"index {bad} of a permutation or selection is not a feature of a model of width {n}; "
                               f"give indices in 0..{n - 1}")
    T = torch.zeros(len(p), n, dtype=torch.float64)
    T[torch.arange(len(p)), p] = 1.0
    return T


def as_plan(T, where: str = "a plan") -> "torch.Tensor | RowPlan":
    """A plan in a form :func:`plan_maps` reads: a :class:`RowPlan` as it is; a tensor dense (a sparse
    layout converted) and floating (integer and boolean plans as float64); any other array-like
    (a numpy array, nested lists) as a float64 tensor.

    Raises:
        SpaceMismatchError: ``T`` (named by ``where``) is no ``n x n_i`` matrix of real numbers.
    """
    if isinstance(T, RowPlan):
        return T
    if isinstance(T, torch.Tensor):
        if T.layout != torch.strided:  # (sparse COO/CSR: most ops the maps use have no sparse kernel)
            T = T.to_dense()
        if T.is_complex():
            raise SpaceMismatchError(f"{where} is complex ({T.dtype}); plans are non-negative real n x n_i matrices")
        if not T.is_floating_point():
            T = T.to(torch.float64)
    else:
        try:
            T = torch.as_tensor(T, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise SpaceMismatchError(f"{where} is a {type(T).__name__}, which is no matrix ({str(exc)[:100]}); give an "
                                     f"n x n_i tensor (or numpy array), or an alignment.structure.RowPlan") from None
    if T.dim() != 2:
        raise SpaceMismatchError(f"{where} has shape {tuple(T.shape)}; a plan is an n x n_i matrix (fused features x "
                                 f"the model's features; for an index vector p use alignment.maps.permutation_plan(p, "
                                 f"n_i))")
    return T


def plan_maps(plans: Sequence["torch.Tensor | RowPlan"], alpha: Sequence[float], allow_empty: bool = False) -> SpaceMap:
    """Merge/unmerge maps from per-model plans (``n x n_i`` matrices or :class:`RowPlan`; array-likes
    are read by :func:`as_plan`) and interpolation weights.

    See the module docstring for the formulas. Every fused feature must receive something from at
    least one model, unless ``allow_empty`` (such features get zero merge rows: e.g. one model's
    view of a fused basis that other models' units complete).

    Raises:
        SpaceMismatchError: no plans, a plan that is no matrix, plans of different fused widths,
            negative entries, or a fused feature no model sends anything to.
        InvalidOptionError: not one interpolation weight per plan.
    """
    if not len(plans):
        raise SpaceMismatchError("plan_maps got no plans: give one n x n_i plan per model (and one weight each)")
    plans = [as_plan(T, f"plan {i}") for i, T in enumerate(plans)]
    plans = [T if isinstance(T, RowPlan) else T.to(torch.float64).cpu() for T in plans]
    if len(alpha) != len(plans):
        raise InvalidOptionError(f"{len(alpha)} interpolation weights for {len(plans)} plans: give one per model")
    n = plans[0].shape[0]
    if any(T.shape[0] != n for T in plans):
        raise SpaceMismatchError(f"plans give different fused widths: {[tuple(T.shape) for T in plans]}")
    if any(bool(((T.vals if isinstance(T, RowPlan) else T) < 0).any()) for T in plans):
        raise SpaceMismatchError("a plan has negative entries; plans are non-negative (a permutation is a 0/1 plan)")
    rows = [T.vals if isinstance(T, RowPlan) else T.sum(1) for T in plans]
    sends = [(r > 0).double() for r in rows]
    weight = sum(float(a) * s for a, s in zip(alpha, sends))
    count = sum(sends)
    if bool((count == 0).any()) and not allow_empty and any(float(a) != 0 for a in alpha):
        k = int(torch.nonzero(count == 0)[0])
        raise SpaceMismatchError(f"fused feature {k} receives nothing from any model (empty plan row)")
    # a fused feature whose models all weigh 0 (zip or merge at alpha = (1, 0): a cluster of the
    # second model's units only) takes the limit of the formula as their weights go to 0 together:
    # the equal-weight mean of what they send (any positive weight of theirs gives the same row)
    limit = (weight == 0) & (count > 0) if any(float(a) != 0 for a in alpha) else None
    if limit is not None and not bool(limit.any()):
        limit = None
    weight = torch.where(weight != 0, weight, torch.ones_like(weight))
    parts = []
    for T, r, a, s in zip(plans, rows, alpha, sends):
        safe = torch.where(r > 0, r, torch.ones_like(r))
        scale = float(a) / safe / weight
        if limit is not None:
            scale = torch.where(limit, s / safe / torch.where(count > 0, count, torch.ones_like(count)), scale)
        c = _column_sums(T)
        inv_c = 1.0 / torch.where(c > 0, c, torch.ones_like(c))
        em = eu = None
        e = (torch.arange(n), T.idx, T.vals) if isinstance(T, RowPlan) else sparse_entries(T)
        if e is not None:
            # a sparse plan: the products below on its entries only (the same bits)
            r_, c_, v = e
            em, eu = (r_, c_, v * scale[r_]), (r_, c_, v * inv_c[c_])
            if bool((em[2] == 0).any()):
                keep = em[2] != 0  # a zero weight (alpha 0): no entry
                em = (r_[keep], c_[keep], em[2][keep])
        parts.append((T, scale, inv_c, em, eu))
    if all(em is not None for *_, em, _ in parts):
        return SpaceMap.from_entries([T.shape[1] for T in plans], n, [p[3] for p in parts], [p[4] for p in parts])
    # one scaled copy per map (wide spaces: every pass over an n x n_i plan costs its pages)
    parts = [(dense_plan(T), *rest) for T, *rest in parts]
    sm = SpaceMap([T * scale[:, None] for T, scale, *_ in parts],
                  [torch.mul(T.t(), inv_c[:, None], out=torch.empty(T.shape[1], T.shape[0], dtype=T.dtype))
                   for T, _, inv_c, *_ in parts])
    for i, (*_, em, eu) in enumerate(parts):  # (the support of M_i and U_i^T is the plan's)
        if em is not None:
            sm._entries[(i, True)], sm._entries[(i, False)] = em, eu
    return sm


def _column_sums(T: "torch.Tensor | RowPlan") -> torch.Tensor:
    """``T.sum(0)``; for a :class:`RowPlan`, each column's entries added in row order (as the
    matrix's sum does: bit for bit where a column has at most one entry)."""
    if not isinstance(T, RowPlan):
        return T.sum(0)
    return torch.zeros(T.shape[1], dtype=T.vals.dtype).index_add_(0, T.idx, T.vals)


def permutation_map(perms: Sequence[torch.Tensor], alpha: Sequence[float]) -> SpaceMap:
    """Maps for permutation alignment: ``M_i = alpha_i P_i``, ``U_i = P_i^T``.

    Args:
        perms: per model, a permutation (fused feature ``k`` is model i's feature ``perms[i][k]``).
        alpha: interpolation weight of each model.

    Raises:
        PermutationError: an entry of ``perms`` is not a permutation of ``0..n-1`` (a selection or a
            repeat: use :func:`selection_map` or :func:`plan_maps`), or the models' widths differ.
    """
    checked = []
    for i, p in enumerate(perms):
        p = _indices(p, f"permutation {i}")
        if not torch.equal(torch.sort(p).values, torch.arange(len(p))):
            raise PermutationError(f"permutation {i} is not a permutation of 0..{len(p) - 1} (it repeats or skips "
                                   f"features); to keep a subset use selection_map, for any other correspondence "
                                   f"plan_maps")
        if checked and len(p) != len(checked[0]):
            raise PermutationError(f"permutation {i} has {len(p)} entries but permutation 0 has {len(checked[0])}; "
                                   f"permuted models have equal widths")
        checked.append(p)
    return plan_maps([permutation_plan(p) for p in checked], alpha)


def selection_map(indices: torch.Tensor, n_source: int) -> SpaceMap:
    """Maps for keeping a subset of one model's features (width reduction by selection).

    Raises:
        PermutationError: an index outside ``0..n_source - 1``.
    """
    return plan_maps([permutation_plan(indices, n_source)], [1.0])


def axis_roles(graph: Graph) -> dict[tuple[str, int], str]:
    """Role of every (tensor, axis) that holds a space: ``"in"`` or ``"out"``."""
    roles: dict[tuple[str, int], str] = {}
    for s in graph.spaces:
        for m in s.members:
            key = (m.tensor, m.axis)
            if roles.get(key) != "in":
                roles[key] = m.role
    return roles


def axis_matrix(pieces, maps: dict[str, SpaceMap], i: int, role: str, primary: bool, alpha_i: float,
                name: str, ax: int) -> torch.Tensor:
    """The matrix applied to one axis of model ``i``'s tensor ``name`` (block diagonal over its ranges).

    ``pieces`` is the axis' layout (see :meth:`Graph.layout`); the primary output axis takes merge maps
    (and ``alpha_i`` on fixed ranges), every other axis the transposed unmerge maps.
    """
    blocks = []
    for start, stop, sp in pieces:
        if sp is None:
            eye = torch.eye(stop - start, dtype=torch.float64)
            blocks.append(eye * alpha_i if primary else eye)
            continue
        if sp not in maps:
            raise SpaceMismatchError(f"no map given for space {sp!r} (used by {name!r} axis {ax})")
        sm = maps[sp]
        m = sm.merge[i] if (role == "out" and primary) else sm.unmerge[i].t()
        if m.shape[1] != stop - start:
            raise SpaceMismatchError(
                f"map for space {sp!r} expects {m.shape[1]} features of model {i}, but {name!r} axis {ax} "
                f"has {stop - start} there"
            )
        blocks.append(m.to(torch.float64).cpu())
    return torch.block_diag(*blocks)


def map_tensor(t: torch.Tensor, graph: Graph, name: str, roles: dict[tuple[str, int], str],
               maps: dict[str, SpaceMap], i: int, alpha_i: float, skip_axis: int | None = None) -> torch.Tensor:
    """Model ``i``'s tensor ``name`` carried into the fused basis (float64): ``M_i[out] . W_i . U_i[in]``.

    Args:
        t: the tensor.
        graph: model ``i``'s graph.
        name: the tensor's name in the graph.
        roles: :func:`axis_roles` of the graph.
        maps: maps of every space on the tensor's axes.
        i: the model's index in the maps.
        alpha_i: the model's interpolation weight (applied once: on the primary output axis, or to the
            whole tensor when no output axis is in a space).
        skip_axis: leave this axis as it is (solvers compare units along it).
    """
    t = t.detach().to(torch.float64)
    layout = graph.layout(name)
    out_axes = [ax for ax, pcs in enumerate(layout)
                if any(sp is not None for *_, sp in pcs) and roles.get((name, ax)) == "out"]
    for ax, pieces in enumerate(layout):
        if ax == skip_axis or all(sp is None for *_, sp in pieces):
            continue
        primary = bool(out_axes) and ax == out_axes[0]
        role = roles.get((name, ax), "out")
        A = _axis_entries(pieces, maps, i, role, primary, alpha_i)
        if A is None:
            A = axis_matrix(pieces, maps, i, role, primary, alpha_i, name, ax)
        t = _apply_axis(A, t, ax)
    if not out_axes:
        t = t * alpha_i
    return t


def _axis_entries(pieces, maps: dict[str, SpaceMap], i: int, role: str, primary: bool, alpha_i: float
                  ) -> AxisEntries | None:
    """:func:`axis_matrix` by its nonzero entries ``(rows, cols, vals, n_out)`` when every piece's map
    is sparse (see :meth:`SpaceMap.entries`), without building the block-diagonal matrix; else None."""
    rows, cols, vals, col, row = [], [], [], 0, 0
    for start, stop, sp in pieces:
        w = stop - start
        if sp is None:
            r_ = c_ = torch.arange(w)
            v = torch.full((w,), alpha_i if primary else 1.0, dtype=torch.float64)
            n = w
        else:
            if sp not in maps:
                return None  # axis_matrix names the missing map
            e = maps[sp].entries(i, role == "out" and primary)
            if e is None or maps[sp].sizes[i] != w:
                return None
            r_, c_, v = e
            n = maps[sp].width
        rows.append(row + r_)
        cols.append(col + c_)
        vals.append(v)
        col += w
        row += n
    return torch.cat(rows), torch.cat(cols), torch.cat(vals), row


AxisEntries = tuple  # (rows, cols, vals, n_out): an axis map by its nonzero entries


def _apply_axis(A, t: torch.Tensor, ax: int) -> torch.Tensor:
    """``A`` applied to axis ``ax`` of ``t``: by its entries ``(rows, cols, vals, n_out)`` (see
    :func:`_axis_entries`: a gather where every row has one entry, as permutations, selections and
    repeats: exact; else a gather and a scatter-add: clusters, exact transport plans; far cheaper
    than a product either way) or a matrix (multiplied: :func:`map_tensor` builds one only when some
    piece's map is dense)."""
    if not isinstance(A, tuple):
        return torch.movedim(torch.tensordot(A.to(t.device), t, dims=([1], [ax])), 0, ax)
    rows, cols, vals, n_out = A
    out = t.index_select(ax, cols.to(t.device))
    if not bool((vals == 1).all()):
        shape = [1] * t.dim()
        shape[ax] = -1
        out = out * vals.to(t.device).view(shape)
    if _one_per_row(rows, n_out):
        return out  # one entry per row: the gather is the product
    shape = list(t.shape)
    shape[ax] = n_out
    return torch.zeros(shape, dtype=out.dtype, device=out.device).index_add_(ax, rows.to(t.device), out)


def fuse_tensors(
    tensors: Sequence[dict[str, torch.Tensor]],
    graphs: Sequence[Graph],
    maps: dict[str, SpaceMap],
    alpha: Sequence[float],
    names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Apply maps to the tensors of N models: ``W* = sum_i M_i[out] . W_i . U_i[in]``.

    This is the one place where maps meet weights (fusion, permutation, resizing).

    Args:
        tensors: per model, its parameters and buffers by name (see
            :func:`alignment.permute.model_tensors`).
        graphs: per model, its alignment graph (spaces pair by name across models).
        maps: a :class:`SpaceMap` for every space on the tensors' axes (a missing one is an error).
        alpha: interpolation weight of each model (used for tensors with no output space axis).
        names: tensors to fuse (default: every tensor of the first graph).

    Returns:
        Fused tensors (float tensors in the first model's dtype and device). An integer or boolean
        tensor is copied from the first model where no space indexes it (counters, index tables),
        else carried through the maps like a float one: every fused entry must then be the one
        value its members hold (a permuted mask, or members that agree), else
        :class:`SpaceMismatchError` (such values cannot be averaged).
    """
    if len(tensors) != len(graphs) or not tensors:
        raise SpaceMismatchError(f"fuse_tensors got {len(tensors)} tensor dict(s) and {len(graphs)} graph(s): give one "
                                 f"graph per model (alignment.discover_all(models, example))")
    if len(alpha) != len(tensors):
        raise InvalidOptionError(f"fuse_tensors got {len(alpha)} interpolation weight(s) for {len(tensors)} models: "
                                 f"give one weight per model")
    roles = [axis_roles(g) for g in graphs]
    names = list(names) if names is not None else list(graphs[0].shapes)
    out: dict[str, torch.Tensor] = {}
    twins = _aliases(names, tensors[0], graphs[0])
    for name in names:
        if twins.get(name, name) != name:
            continue  # another name of a tensor fused under its first name (below)
        t0 = tensors[0][name]
        if not t0.is_floating_point():
            spaced = _in_spaces(graphs[0], name)
            out[name] = _fuse_discrete(name, tensors, graphs, roles, maps, alpha) if spaced else t0.clone()
            continue
        out[name] = _mapped_sum(name, tensors, graphs, roles, maps, alpha).to(device=t0.device, dtype=t0.dtype)
    for name, first in twins.items():
        out[name] = out[first]
    return out


def _in_spaces(graph: Graph, name: str) -> bool:
    """Whether some axis of tensor ``name`` holds a space."""
    return any(sp is not None for pcs in graph.layout(name) for *_, sp in pcs)


def _mapped_sum(name: str, tensors, graphs, roles, maps: dict[str, SpaceMap], alpha: Sequence[float],
                of: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``sum_i map_tensor(of(t_i))`` over the models' tensors ``name`` (float64; ``of``: identity)."""
    total = None
    for i, (tens, g) in enumerate(zip(tensors, graphs)):
        if name not in tens or name not in g.shapes:
            raise SpaceMismatchError(f"model {i} has no tensor {name!r}; models must be of one family")
        t = map_tensor(tens[name] if of is None else of(tens[name]), g, name, roles[i], maps, i, alpha[i])
        total = t if total is None else total + t.to(total.device)
    return total


def _aliases(names: Sequence[str], tensors: dict[str, torch.Tensor], graph: Graph) -> dict[str, str]:
    """Names of one tensor (a module registered under two names) -> the name it is fused under: the
    one whose axes the graph puts in spaces (discovery traces one name and keeps the others fixed),
    else the first."""
    groups: dict[tuple, list[str]] = {}
    for n in names:
        t = tensors.get(n)
        if t is not None and t.numel():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            groups.setdefault(key, []).append(n)
    out: dict[str, str] = {}
    for group in groups.values():
        if len(group) > 1:
            spaced = [n for n in group if _in_spaces(graph, n)]
            first = spaced[0] if spaced else group[0]
            out.update({n: first for n in group})
    return out


def _fuse_discrete(name: str, tensors, graphs, roles, maps: dict[str, SpaceMap], alpha: Sequence[float]) -> torch.Tensor:
    """An integer or boolean tensor on space axes, fused: each fused entry is the weighted mean of
    its members' values, which must all be one value (its weighted variance zero)."""
    t0 = tensors[0][name]
    total, weight, squares = (_mapped_sum(name, tensors, graphs, roles, maps, alpha, of)
                              for of in (torch.Tensor.double, lambda t: torch.ones_like(t, dtype=torch.float64),
                                         lambda t: t.double() ** 2))
    lone = weight.abs() < 1e-12
    mean = total / weight.masked_fill(lone, 1.0)
    spread = (squares / weight.masked_fill(lone, 1.0) - mean * mean).abs()
    bad = lone | (spread > 1e-9 * mean.abs().clamp_min(1.0) ** 2) | ((mean - mean.round()).abs() > 1e-6)
    if bool(bad.any()):
        at = [int(k) for k in bad.nonzero()[0]]
        raise SpaceMismatchError(
            f"tensor {name!r} ({t0.dtype}) is indexed by fused units whose members hold different values (first at "
            f"index {at}): integer and boolean values cannot be averaged; fuse models that agree on it (or make it a "
            f"float buffer)")
    return mean.round().to(device=t0.device, dtype=t0.dtype)


def query_key_spaces(graph: Graph) -> list[str]:
    """Spaces holding attention queries and keys: features that two tensors computed from the
    inputs are contracted over (``q @ k.T``, ``scaled_dot_product_attention``, an einsum), with one
    head or many, as discovery traced them (``Space.query_key``). A space that a weight also reads
    (an ``in`` member: linear attention that ties queries, keys and values into one space, as
    EfficientViT's) is left out: rescaling its features would change what that weight reads."""
    return [s.name for s in graph.spaces if s.query_key and all(m.role == "out" for m in s.members)]


def _query_key_index(space) -> torch.Tensor:
    """Indices of a space's features in its query-key ranges."""
    return torch.cat([torch.arange(a, b) for a, b in space.query_key])


def correct_query_key(maps: dict[str, SpaceMap], graphs: Sequence[Graph], alpha: Sequence[float]) -> dict[str, SpaceMap]:
    """Rescale query-key maps so attention logits survive merges, splits and head_dim changes.

    Queries and keys both take merge maps, so ``q* . k*`` approximates ``sum_i alpha_i q_i . k_i``
    only for permutations. In general ``q_i . k_i ~ q*^T U_i^T U_i k*``, and the logit scale
    ``head_dim**-0.5`` changes with the fused head_dim; both are folded into the merge maps:
    ``M_i <- D^(1/2) M_i`` with ``D = sum_i alpha_i sqrt(d / d_i) U_i^T U_i`` (``d_i``, ``d``: source
    and fused head dims; ``D`` is block-diagonal over heads). Only the features in the space's
    query-key ranges are rescaled (a head laid out as ``[q, k, v]`` keeps its values' maps); the
    fused ones are those whose unmerge columns read them. Permutations give ``D = I`` (no change).
    Returns new maps.
    """
    out = dict(maps)
    for name in query_key_spaces(graphs[0]):
        if name not in maps:
            continue
        sm = maps[name]
        sources = [_query_key_index(g[name]) for g in graphs]
        # fused query-key features: those some model's unmerge map reads from its query-key rows
        read = torch.zeros(sm.width, dtype=torch.bool)
        for i, rows in enumerate(sources):
            read |= _reads(sm, i, rows)
        fused = read.nonzero().flatten()
        # each model's weight in D: alpha_i sqrt(d / d_i) (head dims are in a fixed ratio to the
        # number of query-key features, which the head count divides)
        weights = [float(a) * math.sqrt(len(fused) / len(rows)) for a, rows in zip(alpha, sources)]
        if _identity_correction(sm, weights, fused):
            continue
        D = torch.zeros(len(fused), len(fused), dtype=torch.float64)
        for U, w in zip(sm.unmerge, weights):
            U = U.double().cpu()[:, fused]
            D += w * (U.t() @ U)
        if torch.allclose(D, torch.eye(len(fused), dtype=torch.float64), atol=1e-12):
            continue
        evals, evecs = torch.linalg.eigh((D + D.t()) / 2)
        root = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.t()
        merge = []
        for M in sm.merge:
            M = M.double().cpu().clone()
            M[fused] = root @ M[fused]
            merge.append(M)
        out[name] = SpaceMap(merge, list(sm.unmerge))
    return out


def _identity_correction(sm: SpaceMap, weights: Sequence[float], fused: torch.Tensor) -> bool:
    """Whether ``D = sum_i weights_i U_i^T U_i`` is the identity (to 1e-12) on the ``fused``
    features, known from the maps' gather forms without building ``D``: when every ``U_i^T`` is a
    gather onto distinct features (permutations, selections), ``D`` is diagonal. False when that
    cannot be told this way."""
    diag = torch.zeros(len(fused), dtype=torch.float64)
    for i, w in enumerate(weights):
        g = sm.gather(i, merge=False)
        if g is None or len(torch.unique(g[0][fused])) != len(fused):
            return False
        diag += w * g[1][fused].double().cpu() ** 2
    return bool(((diag - 1.0).abs() <= 1e-12).all())


def _reads(sm: SpaceMap, i: int, rows: torch.Tensor) -> torch.Tensor:
    """Which fused features model ``i``'s unmerge map reads from its features ``rows`` (a mask)."""
    e = sm.entries(i, merge=False)
    if e is not None:  # U_i^T by its entries: (fused, source, value)
        hit = torch.isin(e[1].cpu(), rows) & (e[2].cpu() != 0)
        out = torch.zeros(sm.width, dtype=torch.bool)
        out[e[0].cpu()[hit]] = True
        return out
    return (sm.unmerge[i].detach().cpu()[rows] != 0).any(0)
