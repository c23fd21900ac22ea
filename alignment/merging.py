"""Fast, exact average-linkage agglomerative merging of units (the merge loop of correlation merging).

:func:`greedy_merge` groups ``P`` units into ``n`` groups by repeatedly merging the most similar pair
of groups (average linkage: a merged group's similarity to any other group is the size-weighted mean
of its two parts' similarities), optionally capping group sizes at ``ceil(P / n)`` so that halving a
width merges pairs (as in ZipIt) instead of growing a few large blobs.

It returns exactly the grouping of the straightforward loop that re-masks and argmaxes the whole
``P x P`` matrix at every merge (cubic in ``P``), including its tie-breaking, but in about ``O(P^2)``
work: the matrix is kept together with each row's best allowed partner, and after a merge only the
two changed columns are folded into the other rows' bests; a row is rescanned only when its best
partner was one of the two merged groups. A merged-away group is masked instead of having its
column cleared, and a merge that fills a group (no group can join it until the cap grows: every
merge when halving a width) defers its row and column writes until they are read. The reference
semantics, for a similarity matrix ``S``:

* the diagonal is ignored; a pair ``(r, c)`` is *allowed* when ``size[r] + size[c] <= cap``;
* each step merges the first maximum, in row-major order, of ``S`` restricted to allowed pairs of
  live groups (``torch.argmax`` of the masked matrix), ``a < b`` after swapping, into group ``a``;
  the new row ``(size[a] * S[a] + size[b] * S[b]) / (size[a] + size[b])`` is computed with the same
  floating-point operations, so values (and hence ties) are bit-identical;
* if no allowed pair with a similarity above ``-inf`` is left, ``cap`` grows (the reference grows it
  by one until a pair is allowed; here it jumps straight to that value, which is the same).

ZipIt's linkage (``linkage="min"``, ``decay``): a merged group's similarity to any other group is the
smaller of its two parts' similarities, times ``decay`` (ZipIt's ``alpha``) once the group holds
``decay_from`` units, so a feature already merged is discouraged from merging again; the same
incremental bookkeeping applies.

Only ``torch`` and ``numpy`` are used; the work is done on the CPU.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

__all__ = ["greedy_merge", "LINKAGES"]

LINKAGES = ("average", "min")


def greedy_merge(S: torch.Tensor, n: int, balanced: bool = True, linkage: str = "average",
                 decay: float = 1.0, decay_from: int = 2, overwrite: bool = False,
                 sizes=None) -> torch.Tensor:
    """Agglomerative merging of P units into n groups (average linkage, or ZipIt's scaled minimum).

    Exact (same merges, same tie-breaking, bit-identical merged similarities) equivalent of the
    reference loop that, ``P - n`` times, masks out pairs whose merged size would exceed ``cap``,
    takes the first maximum of the whole masked ``P x P`` matrix in row-major order (growing ``cap``
    by one while no allowed pair is left) and merges that pair, replacing the lower-indexed group's
    row and column by the size-weighted average of the two rows. It runs in roughly ``O(P^2)`` time
    instead of ``O(P^3)``.

    Args:
        S: ``P x P`` similarity matrix (e.g. cosine similarities of units), normally symmetric; the
            diagonal is ignored. Off-diagonal entries must not be NaN or ``+inf``; ``-inf`` marks a
            pair that may never be merged directly. float64 (what the reference is specified for)
            and float32 are used as they are (with float32 the reference's float32 arithmetic is
            reproduced); other dtypes are converted to float64. The input is not modified.
            A non-symmetric matrix is handled exactly as the reference handles it.
        n: Number of groups to produce, ``1 <= n <= P``.
        balanced: If true, groups are capped at ``ceil(P / n)`` units (the cap grows only when no
            allowed merge is left); otherwise any two groups may merge.
        linkage: ``"average"`` (the merged row is the size-weighted mean of the two rows) or
            ``"min"`` (ZipIt: the elementwise minimum of the two rows, times ``decay``).
        decay: for ``linkage="min"``, the factor in ``[0, 1]`` applied to a merged group's
            similarities (``-inf`` entries stay ``-inf``); 1 is plain complete linkage.
        decay_from: the factor applies to merges that make a group of at least this many units
            (2: every merge, as in ZipIt for two models; ``N`` for N models zipped into one width, so
            that a group is discouraged only once it holds its share).
        overwrite: work in ``S`` itself when it is a contiguous float32/float64 CPU matrix (it is
            overwritten): no copy of a ``P x P`` matrix (wide spaces: hundreds of MB). Default: ``S``
            is left as it is.
        sizes: how many units each of the ``P`` rows already stands for (default: one each): the
            sizes that the cap and ``decay_from`` compare and that average linkage weights by, for
            continuing a merge from groups formed earlier.

    Returns:
        CPU ``LongTensor`` of length ``P``: the group of each unit, with values ``0..n-1`` and groups
        numbered by their smallest member in increasing order.

    Raises:
        ValueError: If ``S`` is not a square matrix, contains NaN or ``+inf`` off the diagonal,
            ``n`` is not an integer in ``[1, P]``, or ``linkage``/``decay`` are not allowed.
        RuntimeError: If the remaining groups cannot be merged because every pair of them has
            similarity ``-inf`` (the reference loop would never terminate).
    """
    S = torch.as_tensor(S)
    if S.dim() != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"S must be a square matrix, got shape {tuple(S.shape)}")
    P = S.shape[0]
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= int(n) <= P:
        raise ValueError(f"n must be an integer in [1, {P}], got {n!r}")
    n = int(n)
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r}")
    if not 0.0 <= float(decay) <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay!r}")
    if S.dtype not in (torch.float32, torch.float64):
        S = S.to(torch.float64)
    S = S.detach().to("cpu", copy=not overwrite).contiguous()
    S.fill_diagonal_(-math.inf)
    if not bool(torch.all(S < math.inf)):  # false for NaN and +inf
        raise ValueError("S must not contain NaN or +inf off the diagonal")

    if sizes is None:
        sizen = np.ones(P, dtype=np.float64)
    else:
        sizen = np.asarray(sizes, dtype=np.float64).copy()
        if sizen.shape != (P,) or not bool(np.all(sizen >= 1)) or not bool(np.all(sizen == np.floor(sizen))):
            raise ValueError(f"sizes must be {P} positive integers, got {sizes!r}")
    total = float(sizen.sum())
    neg = -math.inf
    label = torch.arange(P)
    cap = math.ceil(total / n) if balanced else total
    # The merged rows are computed with torch, exactly as in the reference; the bookkeeping runs on
    # numpy views of the same memory (much lower per-call overhead for the O(P) updates).
    Sn, labeln = S.numpy(), label.numpy()

    dead = np.zeros(P, dtype=Sn.dtype)  # -inf at merged-away groups: added to a row, masks them
    largest = [float(sizen.max())]  # the largest live group

    def scan(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Best allowed partner of each of ``rows``: (value, first column attaining it)."""
        sub = Sn[rows] + dead
        room = cap - sizen[rows]
        if bool((room < largest[0]).any()):  # some live group is too large to join some row
            np.putmask(sub, sizen[None, :] > room[:, None], neg)  # sizes are exact integers
        c = sub.argmax(axis=1)  # first maximum
        return sub[np.arange(len(rows)), c], c

    def merged_row(a: int, b: int, size_a: float, size_b: float) -> np.ndarray:
        # the reference's new row of group a after merging b into it (sizes before the merge)
        if linkage == "average":
            return ((size_a * S[a] + size_b * S[b]) / (size_a + size_b)).numpy()
        row = np.minimum(Sn[a], Sn[b])
        if decay != 1.0 and size_a + size_b >= decay_from:
            np.multiply(row, decay, out=row, where=row > neg)
        return row

    def write(a: int, b: int, row: np.ndarray) -> None:
        # the reference's writes of a merge; column b is not cleared: a merged-away group is masked
        # in every scan (``dead``) and never taken (size +inf) instead (a strided column write per
        # merge is the loop's largest cost on wide matrices)
        Sn[a] = row
        Sn[:, a] = row
        Sn[a, a] = neg
        Sn[b] = neg

    # Merges that fill a group (size >= cap: no group can join it until cap grows) are deferred: the
    # group's row and column are masked in every scan meanwhile, so their values are only needed
    # once cap grows or a merge that leaves room reads them; then the deferred merges are replayed
    # in order, which gives the reference's matrix exactly. Halving a width (cap 2) thus merges
    # without writing the matrix at all.
    pending: list[tuple[int, int, float, float]] = []

    def flush() -> None:
        for a, b, size_a, size_b in pending:
            write(a, b, merged_row(a, b, size_a, size_b))
        pending.clear()

    # best[r] / bestval[r]: first column of the maximum of row r over allowed partners (-inf: none).
    bestval, best = scan(np.arange(P))
    merges = 0
    while merges < P - n:
        r = int(bestval.argmax())  # first row holding the maximum = row-major first maximum
        if not bestval[r] > neg:
            # No allowed pair left: grow cap to the smallest merged size of a mergeable pair (the
            # reference grows it one by one until such a pair is allowed).
            flush()
            sums = sizen[:, None] + sizen[None, :]
            sums[~(Sn > neg)] = math.inf
            smallest = float(sums.min())
            if smallest == math.inf:
                raise RuntimeError("no pair of remaining groups has a similarity above -inf")
            cap = max(cap + 1, int(smallest))
            rows = np.flatnonzero(sizen < math.inf)  # the live groups
            bestval[rows], best[rows] = scan(rows)
            continue
        a, b = r, int(best[r])
        if a > b:
            a, b = b, a
        size_a, size_b = float(sizen[a]), float(sizen[b])
        full = size_a + size_b >= cap
        if full:
            pending.append((a, b, size_a, size_b))
        else:
            flush()
            write(a, b, merged_row(a, b, size_a, size_b))
        sizen[a] += sizen[b]
        sizen[b] = math.inf  # dead: masked in every scan, never taken
        dead[b] = neg
        largest[0] = max(largest[0], float(sizen[a]))
        labeln[labeln == b] = a
        merges += 1
        if merges == P - n:
            break

        bestval[b], best[b] = neg, P
        # Rows whose best partner was a or b (and row a itself) are rescanned; every other row only
        # saw column a change (column b was not its best, so dropping it changes nothing): column a
        # becomes its best if allowed and larger, or equal and earlier than the current best (a full
        # group is allowed with none).
        need = (best == a) | (best == b)
        need[a] = True
        if not full:
            col = Sn[a]  # equals column a (both were set from ``row``)
            take = (col > bestval) | ((col == bestval) & (best > a))
            take &= col > neg
            take &= (sizen + sizen[a]) <= cap
            take &= ~need
            bestval[take] = col[take]
            best[take] = a
        rows = np.flatnonzero(need)
        bestval[rows], best[rows] = scan(rows)

    _, out = torch.unique(label, return_inverse=True)
    return out
