"""Tests for :func:`alignment.merging.greedy_merge`: exact agreement with the cubic reference loop."""

from __future__ import annotations

import math

import pytest
import torch

from alignment.merging import greedy_merge


def reference(S, n, balanced=True, linkage="average", decay=1.0, decay_from=2, sizes=None):
    """The original O(P^3) merge loop (copied verbatim; plus a guard instead of looping forever,
    ZipIt's linkage as an option: see reference_min, and rows that start as groups of ``sizes``)."""
    P = S.shape[0]
    S = S.clone()
    S.fill_diagonal_(-math.inf)
    size = torch.ones(P, dtype=torch.float64) if sizes is None else torch.tensor(sizes, dtype=torch.float64)
    label = torch.arange(P)
    alive = torch.ones(P, dtype=torch.bool)
    total = int(size.sum())
    cap = math.ceil(total / n) if balanced else total
    for _ in range(P - n):
        while True:
            too_big = (size[:, None] + size[None, :]) > cap
            masked = S.masked_fill(too_big, -math.inf)
            k = int(torch.argmax(masked))
            a, b = divmod(k, P)
            if a != b and alive[a] and alive[b] and masked[a, b] > -math.inf:
                break
            cap += 1
            if cap > 2 * total:  # guard (not in the original): every remaining pair is -inf
                raise RuntimeError("reference would loop forever")
        if a > b:
            a, b = b, a
        if linkage == "average":
            row = (size[a] * S[a] + size[b] * S[b]) / (size[a] + size[b])
        else:
            row = torch.minimum(S[a], S[b])
            if size[a] + size[b] >= decay_from:
                row = torch.where(row > -math.inf, row * decay, row)
        S[a], S[:, a] = row, row
        S[a, a] = -math.inf
        S[b], S[:, b] = -math.inf, -math.inf
        size[a] += size[b]
        size[b] = 0
        alive[b] = False
        label[label == b] = a
    _, out = torch.unique(label, return_inverse=True)
    return out


def _cosine(X: torch.Tensor) -> torch.Tensor:
    X = X / X.norm(dim=1, keepdim=True)
    S = X @ X.T
    return (S + S.T) / 2  # exactly symmetric


def _random_sym(P: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return _cosine(torch.randn(P, max(2, P // 2), generator=g, dtype=torch.float64))


def _check(S: torch.Tensor, n: int, balanced: bool) -> None:
    got = greedy_merge(S, n, balanced)
    want = reference(S, n, balanced)
    assert got.dtype == torch.long and got.shape == (S.shape[0],)
    assert torch.equal(got, want), (n, balanced)


def _ns(P: int) -> list[int]:
    """All n for small P; for larger P a spread over 1..P with the edges and cap boundaries (the
    reference is cubic, so testing every n would take too long)."""
    if P <= 12:
        return list(range(1, P + 1))
    cuts = {1, 3, P // 3, P // 2 - 1, P // 2, P // 2 + 1, P - 1, P}
    return sorted(k for k in cuts if 1 <= k <= P)


@pytest.mark.parametrize("P", [2, 3, 7, 40, 120])
@pytest.mark.parametrize("balanced", [True, False])
def test_matches_reference_random(P, balanced):
    """Same labels as the reference on random symmetric cosine matrices, for every (or a spread of) n."""
    S = _random_sym(P, seed=P)
    for n in _ns(P):
        _check(S, n, balanced)


@pytest.mark.parametrize("balanced", [True, False])
def test_ties_duplicated_units(balanced):
    """Tie-breaking: units that are exact copies (identical rows, many equal maxima) merge in the reference order."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 4, generator=g, dtype=torch.float64)
    idx = torch.randint(0, 6, (24,), generator=g)  # 24 units, only 6 distinct
    S = _cosine(base)[idx][:, idx]  # copies have bit-identical rows and columns
    for n in range(1, 25):
        _check(S, n, balanced)


@pytest.mark.parametrize("balanced", [True, False])
def test_ties_rounded(balanced):
    """Tie-breaking: similarities rounded to one decimal (and small integers) give exact ties, also in merged rows."""
    S = torch.round(_random_sym(36, 2) * 10) / 10
    for n in _ns(36):
        _check(S, n, balanced)
    g = torch.Generator().manual_seed(4)
    M = torch.randint(-2, 3, (20, 20), generator=g).double()
    S = M + M.T
    for n in range(1, 21):
        _check(S, n, balanced)


def test_all_equal():
    """Tie-breaking when every similarity is equal: first row-major maximum at every step."""
    S = torch.ones(12, 12, dtype=torch.float64)
    for balanced in (True, False):
        for n in range(1, 13):
            _check(S, n, balanced)


def test_cap_grows():
    """The balanced cap grows (here 3 -> 4) only when no allowed merge is left, as in the reference."""
    # five tight pairs: with n=4 the cap ceil(10/4)=3 is reached by five pairs, then one pair of pairs merges
    P = 10
    pair = torch.arange(P) // 2
    S = torch.where(pair[:, None] == pair[None, :], 0.9, 0.0).double() + _random_sym(P, 5) * 0.01
    S = (S + S.T) / 2
    got = greedy_merge(S, 4)
    assert torch.equal(got, reference(S, 4))
    assert torch.bincount(got).max() == 4
    for n in range(1, P + 1):
        _check(S, n, True)


def test_no_merges():
    """n == P (and P == 1) merges nothing: every unit is its own group, labels 0..P-1."""
    assert torch.equal(greedy_merge(torch.zeros(1, 1, dtype=torch.float64), 1), torch.tensor([0]))
    S = _random_sym(6, 0)
    for balanced in (True, False):
        assert torch.equal(greedy_merge(S, 6, balanced), torch.arange(6))
        assert torch.equal(greedy_merge(torch.ones(1, 1), 1, balanced), reference(torch.ones(1, 1), 1, balanced))


def test_labels_numbered_by_smallest_member():
    """Labels are 0..n-1 with groups numbered by their smallest member in increasing order."""
    S = _random_sym(50, 6)
    lab = greedy_merge(S, 13)
    assert set(lab.tolist()) == set(range(13))
    firsts = [int(torch.nonzero(lab == k)[0]) for k in range(13)]
    assert firsts == sorted(firsts)


def test_nonsymmetric_and_float32():
    """Inputs outside the spec (non-symmetric, float32) still follow the reference exactly."""
    g = torch.Generator().manual_seed(7)
    A = torch.randn(12, 12, generator=g, dtype=torch.float64)
    for n in range(1, 13):
        _check(A, n, True)
        _check(A, n, False)
    S32 = _random_sym(24, 8).float()
    for n in _ns(24):
        _check(S32, n, True)


def test_forbidden_pairs():
    """-inf entries are never merged directly; if only -inf pairs remain an error is raised instead of looping."""
    g = torch.Generator().manual_seed(9)
    S = _random_sym(16, 9)
    forbid = torch.rand(16, 16, generator=g) < 0.1
    S = S.masked_fill(forbid | forbid.T, -math.inf)
    for balanced in (True, False):
        for n in range(1, 17):
            try:
                want = reference(S, n, balanced)
            except RuntimeError:
                with pytest.raises(RuntimeError):
                    greedy_merge(S, n, balanced)
            else:
                assert torch.equal(greedy_merge(S, n, balanced), want)


def test_input_untouched_and_validation():
    """The input matrix is not modified; bad shapes, n out of range and NaN are rejected."""
    S = _random_sym(12, 10)
    before = S.clone()
    greedy_merge(S, 5)
    assert torch.equal(S, before)
    with pytest.raises(ValueError):
        greedy_merge(S, 0)
    with pytest.raises(ValueError):
        greedy_merge(S, 13)
    with pytest.raises(ValueError):
        greedy_merge(S[:, :5], 2)
    bad = S.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError):
        greedy_merge(bad, 2)


def reference_min(S, n, decay, decay_from=2):
    """ZipIt's merge loop, written plainly (cubic): merge the first row-major maximum; the merged row is
    the elementwise minimum of the two rows, times ``decay`` once the group holds ``decay_from`` units
    (-inf stays -inf)."""
    P = S.shape[0]
    size = [1] * P
    S = S.clone()
    S.fill_diagonal_(-math.inf)
    label = torch.arange(P)
    for _ in range(P - n):
        k = int(torch.argmax(S))
        a, b = divmod(k, P)
        if not S[a, b] > -math.inf:
            raise RuntimeError("no pair left")
        if a > b:
            a, b = b, a
        row = torch.minimum(S[a], S[b])
        size[a] += size[b]
        if size[a] >= decay_from:
            row = torch.where(row > -math.inf, row * decay, row)
        S[a], S[:, a] = row, row
        S[a, a] = -math.inf
        S[b], S[:, b] = -math.inf, -math.inf
        label[label == b] = a
    _, out = torch.unique(label, return_inverse=True)
    return out


@pytest.mark.parametrize("decay", [1.0, 0.3, 0.0])
@pytest.mark.parametrize("decay_from", [2, 3])
def test_min_linkage_matches_zipit_loop(decay, decay_from):
    """ZipIt's linkage (minimum of the two rows, scaled by ``decay`` from ``decay_from`` units on) gives
    the plain loop's groups, including ties and forbidden (-inf) pairs."""
    for P, seed in [(9, 0), (40, 1), (101, 2)]:
        S = _random_sym(P, seed)
        for n in _ns(P):
            assert torch.equal(greedy_merge(S, n, balanced=False, linkage="min", decay=decay, decay_from=decay_from),
                               reference_min(S, n, decay, decay_from)), (P, n)
    S = torch.round(_random_sym(30, 3) * 5) / 5  # many exact ties
    S[:10, :10] = -math.inf  # units 0..9 may not merge with each other
    for n in range(10, 31):
        assert torch.equal(greedy_merge(S, n, balanced=False, linkage="min", decay=decay), reference_min(S, n, decay))


def test_min_linkage_discourages_remerging():
    """With decay < 1 a merged pair does not absorb a third unit that it resembles, a fresh pair merges
    instead; with decay 1 the triple forms."""
    S = torch.tensor([[0, .9, .8, 0], [.9, 0, .8, 0], [.8, .8, 0, .5], [0, 0, .5, 0]], dtype=torch.float64)
    assert greedy_merge(S, 2, balanced=False, linkage="min", decay=1.0).tolist() == [0, 0, 0, 1]
    assert greedy_merge(S, 2, balanced=False, linkage="min", decay=0.5).tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError):
        greedy_merge(S, 2, linkage="max")
    with pytest.raises(ValueError):
        greedy_merge(S, 2, linkage="min", decay=1.5)


@pytest.mark.parametrize("linkage", ["average", "min"])
def test_deferred_full_groups_replay_exactly_when_the_cap_grows(linkage):
    """Property: merges that fill a group (halving: cap 2) skip the matrix writes until they are
    needed; when the cap grows (here 6 units that may not pair with each other are left over) the
    deferred merges are replayed in order, and the groups are the
    reference loop's, ties included."""
    P = 40
    S = torch.round(_random_sym(P, 12) * 8) / 8  # ties across deferred and live rows
    # units 0..5 resemble nothing (they are merged last) and may not pair with each other: once the
    # other 34 are paired (deferred), the cap grows and they join pairs, chosen by the pairs' rows
    S[:6] = S[:6] / 4 - 0.75
    S[:, :6] = S[:6].t()
    forbid = torch.zeros(P, P, dtype=torch.bool)
    forbid[:6, :6] = True
    forbid.fill_diagonal_(False)
    S = S.masked_fill(forbid, -math.inf)
    grew = False
    for n in (20, 19, 14, 8, 6):
        got = greedy_merge(S, n, balanced=True, linkage=linkage, decay=0.5)
        assert torch.equal(got, reference(S, n, True, linkage, 0.5)), n
        grew |= int(torch.bincount(got).max()) > math.ceil(P / n)
    assert grew  # the cap did grow (the replay ran)


@pytest.mark.parametrize("linkage", ["average", "min"])
@pytest.mark.parametrize("balanced", [True, False])
def test_rows_that_start_as_groups_match_the_loop(linkage, balanced):
    """Property: ``sizes=`` (rows standing for groups formed earlier) weighs average linkage, the cap
    and ZipIt's decay threshold by those sizes exactly as the loop started from such groups does."""
    for P, seed in [(9, 4), (40, 5)]:
        S = _random_sym(P, seed)
        sizes = [1 + (i * 7) % 3 for i in range(P)]
        for n in _ns(P):
            got = greedy_merge(S, n, balanced=balanced, linkage=linkage, decay=0.5, decay_from=3, sizes=sizes)
            want = reference(S, n, balanced, linkage, 0.5, 3, sizes=sizes)
            assert torch.equal(got, want), (P, n)
    with pytest.raises(ValueError, match="sizes"):
        greedy_merge(_random_sym(4, 0), 2, sizes=[1, 0, 1, 1])
