"""Streaming activation statistics for N models at once.

One pass over calibration data runs every model on the same batches with forward hooks at the
graph's observation points and accumulates, per space and observation point, float64 running sums of
the features of all models concatenated: ``sum f`` and ``sum f f^T`` over every sample (conv features
count every spatial position, ViT features every token). Memory is bounded by the statistics (never
the stored activations), so it does not grow with the calibration size.
"""

from __future__ import annotations

import functools
import itertools
import math
import sys
import time
import warnings
import weakref
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
from torch import nn

from .errors import CalibrationError, FallbackWarning, FusionError, InvalidOptionError, SpaceMismatchError
from .graph import Graph, Observation, Space, module_of
from .runner import all_finite, first_batch, model_device, modes, plain_precision, runnable, stream
from .structure import BlockGram

__all__ = ["POINT_POLICIES", "observation_points", "PointStats", "Statistics", "StatisticsMismatchError", "collect",
           "check_inputs", "add_gram", "add_promoted_", "live_weight", "LIVE_SPAN"]


POINT_POLICIES = ("auto", "consumers", "normalized", "producers", "both", "outputs", "all")


class StatisticsMismatchError(FusionError, ValueError):
    """Statistics collected with different settings (positions per image, precision) cannot be
    merged: their sums mean different things."""


def observation_points(space: Space, graph: Graph, policy: str = "auto") -> list[Observation]:
    """The hook points used to read a space's features.

    Policies:
        ``"consumers"``: the inputs of the layers that consume the features (as the next layer sees
        them); ``"producers"``: the outputs of the layers producing them; ``"both"``: the two;
        ``"normalized"``: consumers plus the space's norm-layer outputs; ``"outputs"``: every module
        output holding the space (pre-norm, post-norm, post-activation); ``"all"``: every point.
        ``"auto"`` (default): ``"outputs"`` for spaces with BatchNorm statistics, else
        ``"consumers"`` (measured on the zoo: ResNet-18 pairs fuse ~2 pt better with module
        outputs, ViT pairs ~5 pt better with consumer inputs; see benchmarks/results), and where
        a space has none of those (attention query-key dims have no consuming layer) the producers'
        outputs, then every point.
        A policy named explicitly falls back the same way where it finds no point; :func:`collect`
        reports that (see :func:`_policy_points`).
    """
    return _policy_points(space, graph, policy)[0]


def _policy_points(space: Space, graph: Graph, policy: str) -> tuple[list[Observation], str | None]:
    """:func:`observation_points` and the fallback taken: None (the policy's own points),
    ``"producers"`` (the producers' outputs) or ``"all"`` (every point)."""
    if policy not in POINT_POLICIES:
        raise InvalidOptionError(f"points={policy!r} is no observation policy; use one of {', '.join(POINT_POLICIES)}")
    if policy == "auto":
        has_bn = any(m.tensor.endswith("running_mean") for m in space.members)
        policy = "outputs" if has_bn else "consumers"
    # (observations name a module shared under several names by its first: graph.hook_path)
    consumers = {graph.hook_path(module_of(m.tensor)) for m in space.members if m.role == "in"}
    producers = {graph.hook_path(module_of(m.tensor)) for m in space.members
                 if m.role == "out" and len(graph.shapes[m.tensor]) >= 2 and m.axis == 0}
    obs = []
    if policy == "consumers":
        obs = [o for o in space.observations if o.io == "input" and o.module in consumers]
    elif policy == "normalized":
        norms = {graph.hook_path(module_of(m.tensor)) for m in space.members
                 if m.tensor.endswith(".weight") and len(graph.shapes[m.tensor]) == 1}
        obs = [o for o in space.observations if (o.io == "input" and o.module in consumers)
               or (o.io == "output" and o.module in norms)]
    elif policy == "producers":
        obs = [o for o in space.observations if o.io == "output" and o.module in producers]
    elif policy == "both":
        obs = [o for o in space.observations if (o.io == "input" and o.module in consumers)
               or (o.io == "output" and o.module in producers)]
    elif policy == "outputs":
        obs = [o for o in space.observations if o.io == "output"]
    elif policy == "all":
        obs = list(space.observations)
    fallback = None
    if not obs and space.observations:
        obs = [o for o in space.observations if o.io == "output" and o.module in producers]
        fallback = "producers"
        if not obs:
            obs, fallback = list(space.observations), "all"
    seen, out = set(), []
    for o in obs:
        key = (o.module, o.io, o.call, o.start)
        if key not in seen:
            seen.add(key)
            out.append(o)
    return out, fallback


def _point_key(o: Observation, rank: int) -> tuple:
    return (o.module, o.io, o.call, rank)


Pairs = Optional[Sequence[Tuple[int, int]]]


def _all_pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i, n)]


@dataclass
class PointStats:
    """Running sums at one observation point, over the features of all models concatenated.

    Sums are taken of the features minus a per-feature ``shift`` (the first batch's mean), so that
    covariances do not cancel digits when means are large: ``s1`` sums the shifted features, ``sq``
    their squares (every model), and ``blocks[(i, j)]`` (``i <= j``) the products ``f_i^T f_j`` of
    the model pairs collected: all pairs (the joint matrix) or only those a method needs (each model
    against a reference). Allocated eagerly (:meth:`zeros`) so that statistics collected on
    different data shards or processes have the same shapes and merge by addition.
    """

    widths: list[int]
    count: int
    s1: torch.Tensor
    sq: torch.Tensor
    blocks: dict[tuple[int, int], torch.Tensor]
    shift: torch.Tensor

    @classmethod
    def zeros(cls, widths: Sequence[int], device: str | torch.device | None = None,
              pairs: Pairs = None) -> "PointStats":
        """Empty sums for models of these widths (``pairs``: the model pairs whose products are
        kept; default all)."""
        n = sum(widths)
        pairs = _all_pairs(len(widths)) if pairs is None else sorted({(min(p), max(p)) for p in pairs})
        z = functools.partial(torch.zeros, dtype=torch.float64, device=device)
        return cls(list(widths), 0, z(n), z(n), {(i, j): z(widths[i], widths[j]) for i, j in pairs}, z(n))

    def offsets(self) -> list[int]:
        """Start of each model's block in the joint matrices (and the total at the end)."""
        return [sum(self.widths[:i]) for i in range(len(self.widths) + 1)]

    def products(self, feats: list[torch.Tensor], shift: torch.Tensor | None = None) -> tuple:
        """One batch's sums, per model from a ``(width, samples)`` feature matrix: products in the
        features' dtype (float32 on the CPU), summed over batches in float64 by :meth:`add` (the
        in-place sum promotes them; no float64 copy of each product is made).
        ``shift``: the features are already centred on it (the caller's copies, e.g. the collection
        reader's, centred as they were copied); None: they are centred here on the point's shift
        (the first batch's mean when none yet)."""
        if shift is None:
            shift = self.shift if self.count else torch.cat([f.mean(1).double() for f in feats]).to(self.shift.device)
            o = self.offsets()
            feats = [f - shift[o[i]:o[i + 1]].to(f)[:, None] for i, f in enumerate(feats)]
        s1 = torch.cat([f.sum(1) for f in feats])
        # one product per pair (stacking every model's features first costs a copy of them all, and
        # one product of the stack computes both triangles: no faster); a model with itself: the
        # upper block triangle only
        blocks = {k: _self_product(feats[k[0]]) if k[0] == k[1] else feats[k[0]] @ feats[k[1]].t()
                  for k in self.blocks}
        sq = torch.cat([blocks[(i, i)].diagonal() if (i, i) in blocks else _row_squares(f)
                        for i, f in enumerate(feats)])
        return feats[0].shape[1], shift, s1, sq, blocks

    def add(self, sums: tuple) -> None:
        """Add the sums of :meth:`products`."""
        count, shift, s1, sq, blocks = sums
        shift = shift.to(self.s1.device)
        if not self.count:
            self.shift = shift.clone()
        elif not torch.equal(shift, self.shift):
            count, shift, s1, sq, blocks = _reshift(self, sums, self.shift)
        add_promoted_(self.s1, s1.to(self.s1.device))
        add_promoted_(self.sq, sq.to(self.sq.device))
        for k, b in blocks.items():
            add_promoted_(self.blocks[k], b.to(self.blocks[k].device))
        self.count += count

    def update(self, feats: list[torch.Tensor]) -> None:
        """Add one batch: per model, a ``(samples, width)`` feature matrix."""
        self.add(self.products([f.t() for f in feats]))

    def sums(self) -> tuple:
        """``(count, shift, s1, sq, blocks)``: the sums as :meth:`add` takes them."""
        return self.count, self.shift, self.s1, self.sq, self.blocks

    def unshift(self) -> None:
        """Re-express the sums around zero (raw moments; e.g. before summing across processes)."""
        _, self.shift, self.s1, self.sq, self.blocks = _reshift(self, self.sums(), torch.zeros_like(self.shift))

    def merge(self, other: "PointStats") -> "PointStats":
        """Sums over the data of both (a new object)."""
        if self.widths != other.widths or set(self.blocks) != set(other.blocks):
            raise SpaceMismatchError(f"cannot merge statistics of widths {self.widths} (pairs {sorted(self.blocks)}) "
                                     f"and {other.widths} (pairs {sorted(other.blocks)})")
        out = PointStats.zeros(self.widths, self.s1.device, list(self.blocks))
        for p in (self, other):
            if p.count:
                out.add(p.sums())  # add() moves the sums to out's device and onto out's shift
        return out

    def known(self) -> torch.Tensor:
        """Boolean mask of the joint matrix entries that were collected (diagonal always)."""
        o, n = self.offsets(), sum(self.widths)
        mask = torch.eye(n, dtype=torch.bool, device=self.s1.device)
        for i, j in self.blocks:
            mask[o[i]:o[i + 1], o[j]:o[j + 1]] = True
            mask[o[j]:o[j + 1], o[i]:o[i + 1]] = True
        return mask

    def _assemble(self, blocks: dict, diagonal: torch.Tensor) -> torch.Tensor:
        o, n = self.offsets(), sum(self.widths)
        S = torch.zeros(n, n, dtype=torch.float64, device=self.s1.device)
        for (i, j), b in blocks.items():
            S[o[i]:o[i + 1], o[j]:o[j + 1]] = b
            if i != j:
                S[o[j]:o[j + 1], o[i]:o[i + 1]] = b.t()
        S.diagonal().copy_(diagonal)
        return S

    @property
    def s2(self) -> torch.Tensor:
        """The joint raw second-moment sums ``sum f f^T`` (zero where a pair was not collected)."""
        _, _, _, sq, blocks = _reshift(self, self.sums(), torch.zeros_like(self.shift))
        S = self._assemble(blocks, sq)
        return S if self._complete() else torch.where(self.known(), S, torch.zeros_like(S))

    def _complete(self) -> bool:
        return len(self.blocks) == len(_all_pairs(len(self.widths)))

    def mean(self) -> torch.Tensor:
        """Mean of every feature."""
        return self.shift + self.s1 / max(self.count, 1)

    def covariance(self) -> torch.Tensor:
        """Covariance matrix (population; zero between models whose pair was not collected)."""
        n = max(self.count, 1)
        d = self.s1 / n
        # in place: the joint matrices of many models are large, and every temporary costs its pages
        cov = self._assemble(self.blocks, self.sq).div_(n).addr_(d, d, alpha=-1)
        return cov if self._complete() else cov.masked_fill_(~self.known(), 0.0)

    def covariance_blocks(self) -> BlockGram:
        """The covariance's known entries without the joint matrix: the diagonal and the block of
        each model pair collected (the same numbers as :meth:`covariance` there, to rounding: bit
        for bit where the joint matrix's width is a multiple of the CPU's vector length)."""
        n = max(self.count, 1)
        d = self.s1 / n
        o = self.offsets()
        blocks = {(i, j): b.div(n).addcmul_(d[o[i]:o[i + 1], None], d[None, o[j]:o[j + 1]], value=-1)
                  for (i, j), b in self.blocks.items() if i != j}
        return BlockGram(blocks, self.variance(), o)

    def variance(self) -> torch.Tensor:
        """Every feature's variance (population), from the sums alone."""
        n = max(self.count, 1)
        d = self.s1 / n
        return self.sq.div(n).addcmul_(d, d, value=-1)

    def _std(self, var: torch.Tensor, eps: float, rtol: float) -> torch.Tensor:
        # standard deviations divided by sqrt(constant_weight): zero for constant units, larger than
        # the deviation for units near the rounding-noise floor (see correlation)
        std = var.clamp_min(0).sqrt()
        w = live_weight(std / self.mean().abs(), rtol)
        w = w.masked_fill(std <= eps * std.max().clamp_min(1e-300), 0.0)
        return torch.where(w > 0, std / w.sqrt(), torch.zeros_like(std))

    def constant(self, eps: float = 1e-12, rtol: float = 3e-5) -> bool:
        """Whether every unit of every model is constant here (see :meth:`correlation`)."""
        return not bool((self._std(self.variance(), eps, rtol) > 0).any())

    def correlation(self, eps: float = 1e-12, rtol: float = 3e-5) -> torch.Tensor:
        """Correlation matrix, with constant (dead) units correlating with nothing (zero rows).

        float32 features carry rounding errors of about 1e-6 of their magnitude (more after long
        sums), so the correlations of a unit whose variation is that small relative to its mean are
        rounding noise, and two copies of one model disagree on them (global averages of noise
        images through a random network vary by 1e-6 to 1e-4 of their mean). A unit counts as
        constant when its standard deviation is below ``eps`` times the largest, or below
        ``rtol / 3`` times its mean's magnitude; above ``3 rtol`` it is live; in between its
        correlations are scaled by ``sqrt(w)`` with ``w`` (see :func:`live_weight`) rising smoothly
        from 0 to 1, so that its diagonal is ``w`` and the rest (``1 - w``) goes to the shared
        "constant" dimension that :func:`alignment.grams.activation_gram` tells apart by weights.
        A hard threshold put the two copies' near-threshold units on different sides: torchvision
        mobilenet_v3_small (32 px) fused 5% off at rtol 1e-4, 494 vs 492 of its 1024 classifier
        units counting as constant; random-init timm lcnet_050 (32 noise images) paired 4 of 1280
        head units wrongly at a threshold of 2e-5."""
        cov = self.covariance()
        std = self._std(cov.diagonal(), eps, rtol)
        return _divide_outer_(cov, std, std)

    def correlation_blocks(self, eps: float = 1e-12, rtol: float = 3e-5) -> BlockGram:
        """:meth:`correlation`'s known entries (see :meth:`covariance_blocks`) without the joint
        matrix."""
        g = self.covariance_blocks()
        std = self._std(g.diag, eps, rtol)
        o = g.offsets
        for (i, j), B in g.blocks.items():
            _divide_outer_(B, std[o[i]:o[i + 1]], std[o[j]:o[j + 1]])
        denom = std * std
        dead = denom <= 0
        g.diag.div_(denom.masked_fill_(dead, 1.0)).masked_fill_(dead, 0.0)
        return g


LIVE_SPAN = 3.0
"""A unit is constant below ``rtol / LIVE_SPAN`` relative variation and live above ``rtol * LIVE_SPAN``."""


def live_weight(spread: torch.Tensor, rtol: float = 3e-5) -> torch.Tensor:
    """How much of a unit's correlation is signal, from its relative variation ``spread`` (standard
    deviation over the mean's magnitude; inf for a zero mean): 0 below ``rtol / LIVE_SPAN``, 1 above
    ``rtol * LIVE_SPAN``, and a smoothstep in ``log(spread)`` between (continuous, so that two
    copies of a unit whose spreads differ by rounding get weights that differ by as little)."""
    lo = math.log(rtol / LIVE_SPAN)
    t = ((spread.log() - lo) / (2 * math.log(LIVE_SPAN))).nan_to_num(nan=0.0).clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _divide_outer_(M: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``M / (r c^T)`` in place, zero where the denominator is 0. A band of rows at a time: on wide
    joint matrices a full-size temporary costs its pages on every call."""
    step = max(1, (1 << 21) // max(M.shape[1], 1))
    for a in range(0, M.shape[0], step):
        denom = torch.outer(r[a:a + step], c)
        dead = denom <= 0
        M[a:a + step].div_(denom.masked_fill_(dead, 1.0)).masked_fill_(dead, 0.0)
    return M


def _block_edges(d: int, blocks: int) -> list[tuple[int, int]]:
    # row bands of a symmetric d x d product computed by its upper block triangle
    edges = [d * i // blocks for i in range(blocks + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _self_product(f: torch.Tensor, blocks: int = 4, min_width: int = 256) -> torch.Tensor:
    """``f @ f.T`` for a ``(width, samples)`` matrix from its upper block triangle (about 60% of the
    flops for 4 blocks), mirrored: the same numbers as the full product (each entry is one dot
    product over the samples either way)."""
    d = f.shape[0]
    if d < min_width:
        return f @ f.t()
    out = torch.empty(d, d, dtype=f.dtype, device=f.device)
    for a, b in _block_edges(d, blocks):
        part = f[a:b] @ f[a:].t()
        out[a:b, a:] = part
        if b < d:
            out[b:, a:b] = part[:, b - a:].t()
    return out


def add_gram(acc: torch.Tensor, x: torch.Tensor, blocks: int = 4, min_width: int = 256) -> None:
    """``acc += x^T x`` per group (``x``: ``(groups, rows, d)``, ``acc``: ``(groups, d, d)``, any
    dtype: the products are in ``x``'s), computing only the upper block triangle of the symmetric
    product (about 60% of the full product's flops for 4 blocks) and mirroring it."""
    d = x.shape[2]
    if d < min_width:
        add_promoted_(acc, torch.bmm(x.transpose(1, 2), x))
        return
    for a, b in _block_edges(d, blocks):
        part = torch.bmm(x[:, :, a:b].transpose(1, 2), x[:, :, a:])
        add_promoted_(acc[:, a:b, a:], part)
        if b < d:
            add_promoted_(acc[:, b:, a:b], part[:, :, b - a:].transpose(1, 2))


def add_promoted_(acc: torch.Tensor, x: torch.Tensor, chunk: int = 1 << 18) -> torch.Tensor:
    """``acc += x`` in place, the same bits, for ``x`` of a narrower dtype (float32 products into
    float64 sums): on the CPU, converted a slice at a time. Torch's in-place add of a float32
    tensor into a float64 one runs a scalar loop (5-8x slower on 2048 x 2048 blocks), and a
    converted copy of the whole of ``x`` costs its pages on every call."""
    if x.dtype == acc.dtype or acc.device.type != "cpu" or x.shape != acc.shape:
        return acc.add_(x)
    if acc.numel() <= chunk:
        return acc.add_(x.to(acc.dtype))
    # slices of dimension k, each index of the dimensions before it at a time, of about ``chunk`` entries
    k = next(k for k in range(acc.dim()) if math.prod(acc.shape[k + 1:]) <= chunk)
    step = max(1, chunk // max(math.prod(acc.shape[k + 1:]), 1))
    for lead in itertools.product(*(range(n) for n in acc.shape[:k])):
        a, b = acc[lead], x[lead]
        for i in range(0, a.shape[0], step):
            a[i:i + step].add_(b[i:i + step].to(acc.dtype))
    return acc


def _row_squares(f: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """``(f * f).sum(1)`` in float64, in float32 runs of samples summed in float64 (one float32
    sum over a whole row of tens of thousands of samples drifts: 4.8e-5 relative on a trained
    ResNet stem's 50,176 positions per batch, where half the ReLU outputs repeat one centred value,
    whose rounding errors add up; the error grows with the run: about 2e-7 in runs of 256),
    without a temporary of ``f``'s size. Rows contiguous in memory: squared norms of runs of
    ``chunk`` (a reduction kernel several times faster than ``vecdot``); a token-major copy (``f.T``
    contiguous): column sums of squares of runs of ``4 * chunk`` rows (eight times faster than
    ``vecdot`` on its strided rows); any other layout: ``vecdot``."""
    width, k = f.shape
    if f.stride(-1) == 1:
        n = k // chunk
        head = n * chunk
        out = torch.linalg.vector_norm(f[:, :head].reshape(width, n, chunk), dim=2).double().square_().sum(1)
        if head < k:
            out += torch.linalg.vector_norm(f[:, head:], dim=1).double().square_()
        return out
    if f.t().is_contiguous():
        rows = f.t()
        out = torch.zeros(width, dtype=torch.float64, device=f.device)
        for s in range(0, k, 4 * chunk):
            part = rows[s:s + 4 * chunk]
            out += (part * part).sum(0).double()
        return out
    return torch.linalg.vecdot(f, f, dim=1).double()


def _reshift(p: PointStats, sums: tuple, new: torch.Tensor) -> tuple:
    """The same sums around shift ``new``: with ``d = old - new``, ``f - new = (f - old) + d``."""
    count, old, s1, sq, blocks = sums
    d = (old.to(new.device) - new).double()
    s1, sq = s1.to(new.device), sq.to(new.device)
    o = p.offsets()
    out = {}
    for (i, j), b in blocks.items():
        di, dj = d[o[i]:o[i + 1]], d[o[j]:o[j + 1]]
        si, sj = s1[o[i]:o[i + 1]], s1[o[j]:o[j + 1]]
        out[(i, j)] = b.to(new.device) + torch.outer(di, sj) + torch.outer(si, dj) + count * torch.outer(di, dj)
    return count, new.clone(), s1 + count * d, sq + 2 * d * s1 + count * d * d, out


@dataclass
class Statistics:
    """Per-space activation statistics of N models (see :func:`collect`).

    Attributes:
        points: per space name, the statistics of each observation point used.
        widths: per space name, the width of the space in each model.
        seconds: wall time of the collection pass.
        samples: number of calibration examples seen.
        positions_per_image: the subsampling of positions/tokens used (None: all).
        precision: dtype of the per-batch products.
        notes: where collection did something other than asked (an explicit observation policy
            that found no point of a space, points not in every model), each also warned; the
            fusion report lists them.
    """

    points: dict[str, list[PointStats]] = field(default_factory=dict)
    widths: dict[str, list[int]] = field(default_factory=dict)
    seconds: float = 0.0
    samples: int = 0
    positions_per_image: int | None = None
    precision: str = "float32"
    notes: list[str] = field(default_factory=list)

    def merge(self, other: "Statistics") -> "Statistics":
        """Statistics over the data of both (e.g. collected on two shards, with the same spaces and
        settings).

        Raises:
            InvalidOptionError: ``other`` is no :class:`Statistics`.
            SpaceMismatchError: other spaces or observation points.
            StatisticsMismatchError: another ``positions_per_image`` (a sum over every position
                and one over a few per image weigh images and positions differently) or another
                ``precision`` (the result could state neither).
        """
        if not isinstance(other, Statistics):
            raise InvalidOptionError(f"Statistics.merge takes another Statistics (collected with the same spaces and "
                                     f"settings, e.g. on another shard of the data), got {type(other).__name__}")
        for what in ("positions_per_image", "precision"):
            mine, theirs = getattr(self, what), getattr(other, what)
            if mine != theirs:
                raise StatisticsMismatchError(
                    f"cannot merge statistics collected with {what}={mine!r} and {what}={theirs!r}: the sums "
                    f"would mix two meanings; collect every shard with the same {what}")
        if set(self.points) != set(other.points) or any(len(v) != len(other.points[k]) for k, v in self.points.items()):
            raise SpaceMismatchError("cannot merge statistics collected at different observation points")
        return Statistics(
            points={k: [a.merge(b) for a, b in zip(v, other.points[k])] for k, v in self.points.items()},
            widths=dict(self.widths), seconds=self.seconds + other.seconds, samples=self.samples + other.samples,
            positions_per_image=self.positions_per_image, precision=self.precision,
            notes=list(dict.fromkeys(self.notes + other.notes)))

    def all_reduce(self) -> "Statistics":
        """Sum the statistics over the processes of the default ``torch.distributed`` group (in
        place; a no-op when no process group is initialised)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        for pts in self.points.values():
            for p in pts:
                p.unshift()  # shifts differ across processes: sum raw moments
                for t in (p.s1, p.sq, *p.blocks.values()):
                    dist.all_reduce(t)
                c = torch.tensor([float(p.count)], dtype=torch.float64, device=p.s1.device)
                dist.all_reduce(c)
                p.count = int(c.item())
        n = torch.tensor([float(self.samples)], dtype=torch.float64)
        dist.all_reduce(n)
        self.samples = int(n.item())
        return self

    def _points(self, space: str) -> list[PointStats]:
        """The points of a space that the averages read: a point at which no unit of any model
        varies (the output of a BatchNorm with zero gains, as timm initialises each residual block's
        last one) tells nothing about any unit and is left out; when every point is so, all are
        kept."""
        if space not in self.points or not self.points[space]:
            raise SpaceMismatchError(f"no statistics were collected for space {space!r} (no observation point)")
        pts = self.points[space]
        live = [p for p in pts if not p.constant()]
        return live or pts

    def offsets(self, space: str) -> list[int]:
        """Start of each model's block in the joint matrices (and the total at the end)."""
        w = self.widths[space]
        return [sum(w[:i]) for i in range(len(w) + 1)]

    def _average(self, space: str, fn) -> torch.Tensor:
        # points weigh by their number of samples: a pooled point (one sample per image) counts
        # less than a spatial one (one sample per position)
        pts = self._points(space)
        total = sum(p.count for p in pts)
        out = None
        for p in pts:
            m = fn(p).mul_(p.count / total)
            out = m if out is None else out.add_(m)
        return out

    def complete(self, space: str) -> bool:
        """Whether the products of every model pair were collected for ``space`` (else only those
        a method named, see :func:`collect`'s ``pairs``)."""
        return all(p._complete() for p in self._points(space))

    def correlation(self, space: str) -> torch.Tensor:
        """Joint correlation matrix (all models' features), averaged over observation points."""
        return self._average(space, PointStats.correlation)

    def correlation_blocks(self, space: str) -> BlockGram:
        """The correlation's diagonal and collected model-pair blocks, averaged over observation
        points, without the joint matrix (:meth:`PointStats.correlation_blocks`)."""
        return self._average(space, PointStats.correlation_blocks)

    def covariance(self, space: str) -> torch.Tensor:
        """Joint covariance matrix, averaged over observation points."""
        return self._average(space, PointStats.covariance)

    def covariance_blocks(self, space: str) -> BlockGram:
        """The covariance's diagonal and collected model-pair blocks, averaged over observation
        points (:meth:`PointStats.covariance_blocks`)."""
        return self._average(space, PointStats.covariance_blocks)

    def mean(self, space: str) -> torch.Tensor:
        """Joint mean vector, averaged over observation points."""
        return self._average(space, PointStats.mean)

    def block(self, matrix: torch.Tensor, space: str, i: int, j: int) -> torch.Tensor:
        """The (model i, model j) block of a joint matrix of ``space``."""
        o = self.offsets(space)
        return matrix[o[i]:o[i + 1], o[j]:o[j + 1]]


PRECISIONS = ("float32", "float64")


@plain_precision
def collect(
    models: Sequence[nn.Module],
    graphs: Sequence[Graph],
    data: Any,
    spaces: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    max_batches: int | None = None,
    progress: bool = False,
    points: str = "auto",
    pairs: Pairs | Callable[[str], Pairs] = None,
    precision: str = "float32",
    positions_per_image: int | None = None,
    seed: int = 0,
    check: bool = True,
) -> Statistics:
    """Collect joint activation statistics of N models in one streaming pass.

    Args:
        models: models of one family (spaces pair by name); run in eval mode, not modified.
        graphs: their alignment graphs.
        data: calibration inputs (see :func:`alignment.runner.batches`).
        spaces: names of the spaces to collect (default: every space with observation points).
        device: where to run (default: the first model's device); models on another device are
            copied there, the inputs are never changed.
        max_batches: stop after this many batches.
        progress: show a progress bar.
        points: observation policy (see :func:`observation_points`).
        pairs: the model pairs ``(i, j)`` whose cross products are kept, for every space or as a
            function of the space name (None: all pairs, the joint matrix; methods matching each
            model against a reference need only the pairs with the reference). Every model's
            per-feature sums and squares are always kept.
        precision: dtype of each batch's products (``"float32"``, the default, or ``"float64"``);
            batches are always summed in float64. Features of float64 models stay float64.
        positions_per_image: keep at most this many spatial positions (or tokens) per image at each
            point, drawn at random for each image (the same for every model and every point of a
            space); None keeps all. The image axis is the
            first axis of the batch's size (sequence-first tensors too).
        seed: seed of that draw.
        check: first run every model on two samples of the first batch (:func:`check_inputs`), so
            that data a model cannot take raises :class:`~alignment.errors.CalibrationError` naming
            the model. :func:`fusion.align` has checked the data already and passes False.

    Returns:
        :class:`Statistics` with per-space, per-point running sums. A tensor read at two points of a
        space (e.g. a module's output and the next module's input) is multiplied out once, and an
        eval-mode BatchNorm's output whose input was read at another point of the space is neither
        copied nor multiplied: its sums are that point's, scaled per feature (exact). Where
        collection reads other points than asked (an explicit ``points`` policy that finds none
        of a space, points that not every model has, a point with no axis of the batch's images
        where ``positions_per_image`` cannot draw positions per image), :attr:`Statistics.notes`
        says so and a :class:`~alignment.errors.FallbackWarning` is issued.

    Raises:
        SpaceMismatchError: not one graph per model, or graphs that do not fit the models.
        CalibrationError: data that is empty or unusable, or that a model cannot take.
        InvalidOptionError: an unknown ``precision`` or a bad ``positions_per_image``.
    """
    if len(graphs) != len(models) or not models:
        raise SpaceMismatchError(f"collect got {len(models)} model(s) and {len(graphs)} graph(s): one graph per model is "
                                 f"needed, in the models' order (alignment.discover_all(models, example))")
    if precision not in PRECISIONS:
        raise InvalidOptionError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if positions_per_image is not None and (isinstance(positions_per_image, bool)
                                            or not isinstance(positions_per_image, int) or positions_per_image < 1):
        raise InvalidOptionError(f"positions_per_image must be a positive integer or None, got {positions_per_image!r}")
    t0 = time.perf_counter()
    if check:
        check_inputs(models, first_batch(data)[:2])
    dev = torch.device(device) if device is not None else model_device(models[0])
    runs = runnable(models, dev)  # the same object twice (a model fused with itself) needs its own hooks
    names = list(spaces) if spaces is not None else [s.name for s in graphs[0].spaces if s.observations]
    stats = Statistics(positions_per_image=positions_per_image, precision=precision)
    # per model: module -> list of (space, point index, observation)
    plans: list[dict[str, list[tuple[str, int, Observation]]]] = [defaultdict(list) for _ in models]
    fell_back: dict[str, list[str]] = defaultdict(list)  # fallback -> spaces (an explicit policy's only)
    for name in names:
        per_model = []
        for g in graphs:
            if name not in g:
                raise SpaceMismatchError(f"space {name!r} is missing from one model's graph; models must be of one family")
            obs, fallback = _policy_points(g[name], g, points)
            if fallback is not None and points != "auto" and name not in fell_back[fallback]:
                fell_back[fallback].append(name)
            per_model.append(obs)
        common = _pair_points(per_model)
        dropped = sum(len(obs) for obs in per_model) - len(common) * len(per_model)
        if dropped:
            stats.notes.append(f"space {name!r}: {dropped} observation point(s) are not in every model's graph and "
                               f"are left out ({len(common)} read in every model)")
        if not common:
            continue
        stats.widths[name] = [g[name].width for g in graphs]
        space_pairs = pairs(name) if callable(pairs) else pairs
        stats.points[name] = [PointStats.zeros(stats.widths[name], dev, space_pairs) for _ in common]
        for k, obs_per_model in enumerate(common):
            for i, o in enumerate(obs_per_model):
                plans[i][o.module].append((name, k, o))
    where = {"producers": "the outputs of the layers producing them", "all": "every point where they can be read"}
    policy_notes = []
    for fallback in ("producers", "all"):
        spaces_ = fell_back.get(fallback)
        if spaces_:
            listed = ", ".join(repr(n) for n in spaces_[:4]) + (f" and {len(spaces_) - 4} more" if len(spaces_) > 4 else "")
            policy_notes.append(f"points={points!r}: {len(spaces_)} space(s) have no observation point of that policy "
                                f"and are read at {where[fallback]} instead: {listed} (points='auto' chooses per "
                                f"space)")
    stats.notes[:0] = policy_notes
    for msg in stats.notes:
        warnings.warn(msg, FallbackWarning, stacklevel=3)
    dtype = torch.float64 if precision == "float64" else torch.float32
    reader = _Reader(dtype, positions_per_image, seed)
    buffers: list[dict[tuple[str, int], torch.Tensor]] = [dict() for _ in models]
    calls: dict[int, int] = {}  # id(module) -> its calls so far in the current forward pass
    hooks = []
    for i, (m, plan) in enumerate(zip(runs, plans)):
        mods = dict(m.named_modules())
        for path, items in plan.items():
            if path not in mods:
                raise SpaceMismatchError(f"observation module {path!r} not found in model {i}")
            hooks.extend(_install(mods[path], items, buffers[i], calls, reader, i))

    def before(i: int) -> None:
        buffers[i].clear()
        calls.clear()
        reader.clear()

    def on_batch(x, outs) -> None:
        for name, pts in stats.points.items():
            done: dict[tuple, tuple] = {}
            sums: dict[int, tuple] = {}
            affine = []
            for k, ps in enumerate(pts):
                got = [buffers[i].get((name, k)) for i in range(len(runs))]
                if any(f is None for f in got):
                    raise SpaceMismatchError(
                        f"observation point {k} of space {name!r} did not fire in every model (or its "
                        f"module gave no tensor of the traced rank and feature size); the forward pass "
                        f"differs from the traced one")
                if any(isinstance(f, _Affine) for f in got):
                    affine.append((k, ps, got))
                    continue
                # the same tensor read at two points of the space: one product, added twice
                key = tuple(id(f) for f in got)
                if key not in done:
                    # the reader's copies are centred already, on shifts it took from the first batch
                    shift = torch.cat([reader.shifts[(name, k, i)] for i in range(len(runs))]).double()
                    done[key] = ps.products(got, shift=shift)
                sums[k] = done[key]
                ps.add(done[key])
            for k, ps, got in affine:
                src = {f.point if isinstance(f, _Affine) else None for f in got}
                if len(src) == 1 and None not in src:  # every model's: an image of one read point's sums
                    ps.add(_affine_sums(sums[src.pop()], got, ps.offsets()))
                else:  # some models' only: their features made from the point they are an image of
                    raw = [f.of(buffers[i][(name, f.point)], reader.shifts[(name, f.point, i)]) if isinstance(f, _Affine)
                           else f + reader.shifts[(name, k, i)].to(f)[:, None] for i, f in enumerate(got)]
                    ps.add(ps.products(raw))
        reader.batch += 1

    try:
        stats.samples = stream(runs, data, device=dev, on_batch=on_batch, before_model=before,
                               before_batch=lambda x: setattr(reader, "batch_size", len(x)),
                               max_batches=max_batches, progress=progress, desc="statistics")
    finally:
        for h in hooks:
            h.remove()
    for msg in reader.notes:
        stats.notes.append(msg)
        warnings.warn(msg, FallbackWarning, stacklevel=3)
    overflowed = [name for name, pts in stats.points.items()
                  if not all(all_finite(t) for p in pts for t in (p.s1, p.sq, *p.blocks.values()))]
    if overflowed:
        where = ", ".join(map(repr, overflowed[:4])) + (f" and {len(overflowed) - 4} more" if len(overflowed) > 4 else "")
        if precision != "float64":  # (float32 squares overflow above about 1.8e19)
            msg = (f"the float32 products of {len(overflowed)} space(s) overflowed ({where}: activations above about "
                   f"1e19): the statistics were collected again in float64")
            warnings.warn(msg, FallbackWarning, stacklevel=3)
            again = collect(models, graphs, data, spaces=spaces, device=device, max_batches=max_batches,
                            progress=progress, points=points, pairs=pairs, precision="float64",
                            positions_per_image=positions_per_image, seed=seed, check=False)
            again.notes.insert(0, msg)
            again.seconds = time.perf_counter() - t0
            return again
        raise CalibrationError(f"the activation statistics of space(s) {where} are not finite: the models' activations "
                               f"there are infinite or NaN on the calibration data (an overflow); check the models' "
                               f"weights and the scale of the data")
    stats.seconds = time.perf_counter() - t0
    return stats


def check_inputs(models: Sequence[nn.Module], sample: torch.Tensor, what: str = "calibration") -> list[int | None]:
    """Run every model on ``sample`` (each on its own device, in eval mode, without gradients; modes
    restored) and return the size of each one's output along its last axis (None where the output
    is no tensor with axes; a ``logits`` attribute or the first of a tuple is read).

    Raises:
        CalibrationError: naming the first model that cannot take the sample, its shape and why
            (``what`` names the data: ``"calibration"``, ``"test"``).
    """
    sizes = []
    for i, m in enumerate(models):
        dev = next((t.device for t in m.parameters()), torch.device("cpu"))
        try:
            with modes([m]), torch.no_grad():
                out = m(sample.to(dev))
        except Exception as exc:  # the model cannot take this input: say which and with what shape
            first = (str(exc).splitlines() or [""])[0][:200]
            raise CalibrationError(f"model {i} ({type(m).__name__}) fails on {what} inputs of shape "
                                   f"{tuple(sample.shape)} ({type(exc).__name__}: {first}); give inputs the model "
                                   f"accepts") from None
        out = getattr(out, "logits", out)
        out = out[0] if isinstance(out, (tuple, list)) else out
        sizes.append(int(out.shape[-1]) if isinstance(out, torch.Tensor) and out.dim() else None)
    return sizes


def _pair_points(per_model: list[list[Observation]]) -> list[list[Observation]]:
    """Observation points present in every model, paired by (module, io, call, rank in module)."""
    keyed = []
    for obs in per_model:
        ranks: dict[tuple, int] = defaultdict(int)
        d = {}
        for o in obs:
            k = (o.module, o.io, o.call)
            d[_point_key(o, ranks[k])] = o
            ranks[k] += 1
        keyed.append(d)
    common = [k for k in keyed[0] if all(k in d for d in keyed[1:])]
    return [[d[k] for d in keyed] for k in common]


class _Reader:
    """Reads an observation point's features from a hooked tensor as a ``(width, samples)`` matrix
    (channel-major: for NCHW maps the copy keeps contiguous runs of positions) in the products'
    dtype, centred on the point's shift as it is copied (one pass over the tensor; the shift is each
    feature's mean over the first batch, kept in :attr:`shifts` per ``(space, point, model)``),
    optionally a random subset of positions per image. The copy is the reader's own: an in-place op
    later in the forward (such as ``ReLU(inplace=True)``) cannot change what was read. A tensor read
    again in the same forward pass (a module's output is the next one's input) is not copied again."""

    def __init__(self, dtype: torch.dtype, positions: int | None, seed: int):
        self.dtype, self.positions, self.seed = dtype, positions, seed
        self.batch = 0
        self.batch_size: int | None = None  # images in the current batch (set by collect)
        self.notes: dict[str, None] = {}  # points where positions could not be subsampled per image
        self.seen: dict[tuple, tuple] = {}
        self.shifts: dict[tuple[str, int, int], torch.Tensor] = {}
        self.origin: dict[tuple, tuple[str, int]] = {}  # a read tensor's key -> the (space, point) reading it first
        self.derived: dict[tuple, tuple] = {}  # an affine image's key -> (tensor ref, version, space, _Affine)

    def clear(self) -> None:
        """Forget the tensors of the last forward pass."""
        self.seen.clear()
        self.origin.clear()
        self.derived.clear()

    @staticmethod
    def _key(t: torch.Tensor, o: Observation) -> tuple:
        return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.storage_offset(), o.dim, o.start, o.stop)

    @staticmethod
    def _current(hit: tuple | None, t: torch.Tensor) -> bool:
        # the same storage, still alive (so not reused) and not modified since
        return hit is not None and hit[0]() is not None and hit[1] == t._version

    def affine(self, t: torch.Tensor, o: Observation, where: tuple[str, int, int], module: nn.Module,
               args: tuple) -> "_Affine | None":
        """An :class:`_Affine` marker when ``t``'s features at ``o`` are a per-feature affine
        image of features this forward pass read at another point of the same space: the output
        of an eval-mode BatchNorm without activation (:func:`_eval_batchnorm`) whose input was
        read there, or that output read again at a later point (a Sequential ending in the norm).
        None: read ``t`` itself."""
        key = self._key(t, o)
        hit = self.derived.get(key)
        if self._current(hit, t):
            return hit[3] if hit[2] == where[0] else None
        if o.io != "output" or not _eval_batchnorm(module) or not args or not isinstance(args[0], torch.Tensor):
            return None
        x = args[0]
        dim = o.dim if t.dim() == o.ndim or o.ndim == 0 else o.dim - o.ndim + t.dim()
        key_in = self._key(x, o)
        src = self.origin.get(key_in)
        if (dim != 1 or x.shape != t.shape or src is None or src[0] != where[0]
                or not self._current(self.seen.get(key_in), x)):
            return None
        with torch.no_grad():
            var = module.running_var.detach().double()
            scale = (var + module.eps).rsqrt()
            if module.weight is not None:
                scale = scale * module.weight.detach().double()
            offset = -module.running_mean.detach().double() * scale
            if module.bias is not None:
                offset = offset + module.bias.detach().double()
        mark = _Affine(src[1], scale[o.start:o.stop], offset[o.start:o.stop])
        self.derived[key] = (weakref.ref(t), t._version, where[0], mark)
        return mark

    def _images_first(self, v: torch.Tensor, o: Observation, where: tuple[str, int, int], shape: tuple) -> torch.Tensor:
        """``v`` (features first) with its image axis second, so that positions are drawn per
        image: the first axis of the batch's size (a sequence-first ``(tokens, images, features)``
        tensor has it third). Without such an axis positions cannot be drawn per image: all are
        kept there, and noted."""
        n = self.batch_size
        if n is None or v.shape[1] == n:
            return v
        axes = [k for k in range(2, v.dim()) if v.shape[k] == n]
        if axes:
            return v.movedim(axes[0], 1)
        self.notes[f"positions_per_image={self.positions}: space {where[0]!r} is read at the {o.io} of "
                   f"{o.module or 'the model'!r}, of shape {list(shape)}, which has no axis of the batch's {n} "
                   f"images; every position is read there"] = None
        return v.reshape(v.shape[0], -1)

    def __call__(self, t: torch.Tensor, o: Observation, where: tuple[str, int, int]) -> torch.Tensor:
        key = self._key(t, o)
        hit = self.seen.get(key)
        if self._current(hit, t):  # the same features
            self.shifts.setdefault(where, hit[3])  # the same tensor: the same first-batch mean
            return hit[2]
        self.origin[key] = where[:2]
        src, version, name = weakref.ref(t), t._version, where[0]
        dim = o.dim if t.dim() == o.ndim or o.ndim == 0 else o.dim - o.ndim + t.dim()
        v = t.detach().movedim(dim, 0)[o.start:o.stop]
        dtype = torch.float64 if v.dtype == torch.float64 else self.dtype
        if self.positions is not None and v.dim() >= 2:
            v = self._images_first(v, o, where, tuple(t.shape))
        if self.positions is not None and v.dim() > 2:
            # each image its own positions, the same for every model and point of a space: drawn
            # from (seed, batch, space)
            per = v.shape[2:].numel()
            if per > self.positions:
                gen = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{self.batch}:{name}".encode()))
                idx = torch.rand(v.shape[1], per, generator=gen).argsort(1)[:, : self.positions].to(v.device)
                # gathered in the tensor's memory order (a token-major (images, tokens, features)
                # tensor read feature-first is a transposed view: a gather in that order reads
                # scattered memory, about ten times slower), then viewed feature-first again
                v = v.reshape(v.shape[0], v.shape[1], per)
                order = sorted(range(3), key=lambda d: -v.stride(d))
                shape = [v.shape[d] if d != 2 else self.positions for d in order]
                index = idx.view(1, v.shape[1], self.positions).permute(order).expand(shape)
                v = v.permute(order).gather(order.index(2), index).permute([order.index(d) for d in range(3)])
        # the copy keeps the layout a (width, samples) view of the tensor has, else channel-major
        try:
            g = v.view(v.shape[0], -1)
        except RuntimeError:
            g = None
        if g is None:
            out, x = torch.empty(v.shape, dtype=dtype, device=v.device), v
        elif g.dtype == dtype and g.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
            out, x = g, g  # already a copy (subsampled positions): centred in place
        else:
            out, x = torch.empty_like(g, dtype=dtype), g
        f = out.view(out.shape[0], -1)
        shift = self.shifts.get(where)
        if shift is None:  # first batch: centred on its own mean
            if out is not x:
                out.copy_(x)
            shift = self.shifts[where] = f.mean(1)
            f.sub_(shift[:, None])
        else:
            torch.sub(x, shift.view(-1, *[1] * (x.dim() - 1)), out=out)
        self.seen[key] = (src, version, f, shift)
        return f


def _install(module: nn.Module, items: list[tuple[str, int, Observation]], buf: dict, calls: dict[int, int],
             read: _Reader, model: int):
    outs = [it for it in items if it[2].io == "output"]
    ins = [it for it in items if it[2].io == "input"]
    handles = []
    key = id(module)

    def take(t, o, where, mod, args):
        mark = read.affine(t, o, where, mod, args)
        buf[where[:2]] = mark if mark is not None else read(t, o, where)

    def pre(mod, args):
        call = calls.get(key, 0)
        for name, k, o in ins:
            t = o.read(args) if o.call == call else None
            if t is not None:
                take(t, o, (name, k, model), mod, args)
        if not outs:
            calls[key] = call + 1

    def post(mod, args, out):
        call = calls.get(key, 0)
        for name, k, o in outs:
            t = o.read(out) if o.call == call else None
            if t is not None:
                take(t, o, (name, k, model), mod, args)
        calls[key] = call + 1

    if ins:
        handles.append(module.register_forward_pre_hook(pre))
    if outs:
        handles.append(module.register_forward_hook(post))
    return handles


def _eval_batchnorm(module: nn.Module) -> bool:
    """A per-feature affine map: a BatchNorm in eval mode with running statistics whose forward is
    torch's own, or timm's BatchNormAct2d whose activation and dropout are identities (with an
    activation it is not affine)."""
    bn = nn.modules.batchnorm._BatchNorm
    if not isinstance(module, bn) or module.training or module.running_mean is None or module.running_var is None:
        return False
    forward = type(module).forward
    if forward is bn.forward:
        return True
    timm_norm = sys.modules.get("timm.layers.norm_act")  # (loaded wherever a model holds one)
    return (timm_norm is not None and forward is getattr(getattr(timm_norm, "BatchNormAct2d", None), "forward", None)
            and all(isinstance(getattr(module, a, None), nn.Identity) for a in ("act", "drop")))


@dataclass(frozen=True)
class _Affine:
    """Features that are ``scale * f + offset`` per feature, ``f`` the features the same forward
    pass read at point ``point`` of the same space (float64 ``scale`` and ``offset``)."""

    point: int
    scale: torch.Tensor
    offset: torch.Tensor

    def of(self, centred: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """These features (not centred) from the point's centred copy and its shift."""
        scale = self.scale.to(centred)[:, None]
        return torch.addcmul((self.scale * shift.double() + self.offset).to(centred)[:, None], centred, scale)


def _affine_sums(sums: tuple, marks: Sequence[_Affine], offsets: list[int]) -> tuple:
    """One batch's sums (:meth:`PointStats.products`) of per-feature affine images ``a f + b`` of
    features whose sums are ``sums``: centred on ``a shift + b`` they are ``a (f - shift)``, so every
    sum scales (``s1`` by ``a``, squares by ``a^2``, the block of models i, j by ``a_i a_j^T``), in
    float64, without reading the features again."""
    count, shift, s1, sq, blocks = sums
    a = torch.cat([m.scale for m in marks]).to(shift.device)
    b = torch.cat([m.offset for m in marks]).to(shift.device)
    o = offsets
    scaled = {(i, j): blk.double() * a[o[i]:o[i + 1], None] * a[None, o[j]:o[j + 1]] for (i, j), blk in blocks.items()}
    return count, a * shift + b, a * s1.double(), a * a * sq.double(), scaled
