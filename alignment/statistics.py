"""Streaming activation statistics for N models at once.

One pass over calibration data runs every model on the same batches with forward hooks at the
graph's observation points and accumulates, per space and observation point, float64 running sums of
the features of all models concatenated: ``sum f`` and ``sum f f^T`` over every sample (conv features
count every spatial position, ViT features every token). Memory is bounded by the statistics (never
the stored activations), so it does not grow with the calibration size.
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from .errors import SpaceMismatchError
from .graph import Graph, Observation, Space
from .runner import model_device, stream

__all__ = ["POINT_POLICIES", "observation_points", "PointStats", "Statistics", "collect"]


POINT_POLICIES = ("auto", "consumers", "normalized", "producers", "both", "outputs", "all")


def observation_points(space: Space, graph: Graph, policy: str = "auto") -> list[Observation]:
    """The hook points used to read a space's features.

    Policies:
        ``"consumers"``: the inputs of the layers that consume the features (as the next layer sees
        them); ``"producers"``: the outputs of the layers producing them; ``"both"``: the two;
        ``"normalized"``: consumers plus the space's norm-layer outputs; ``"outputs"``: every module
        output holding the space (pre-norm, post-norm, post-activation); ``"all"``: every point.
        ``"auto"`` (default): ``"outputs"`` for spaces with BatchNorm statistics, else
        ``"consumers"`` (measured on the zoo: ResNet-18 pairs fuse ~2 pt better with module
        outputs, ViT pairs ~5 pt better with consumer inputs; see benchmarks/results).
        Policies fall back to the producers' outputs, then to every point, when they find none.
    """
    if policy not in POINT_POLICIES:
        raise ValueError(f"unknown observation policy {policy!r}; use one of {', '.join(POINT_POLICIES)}")
    if policy == "auto":
        has_bn = any(m.tensor.endswith("running_mean") for m in space.members)
        policy = "outputs" if has_bn else "consumers"
    consumers = {m.tensor.rsplit(".", 1)[0] for m in space.members if m.role == "in"}
    producers = {m.tensor.rsplit(".", 1)[0] for m in space.members
                 if m.role == "out" and len(graph.shapes[m.tensor]) >= 2 and m.axis == 0}
    obs = []
    if policy == "consumers":
        obs = [o for o in space.observations if o.io == "input" and o.module in consumers]
    elif policy == "normalized":
        norms = {m.tensor.rsplit(".", 1)[0] for m in space.members
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
    if not obs:
        obs = [o for o in space.observations if o.io == "output" and o.module in producers]
    if not obs:
        obs = list(space.observations)
    seen, out = set(), []
    for o in obs:
        key = (o.module, o.io, o.call, o.start)
        if key not in seen:
            seen.add(key)
            out.append(o)
    return out


def _point_key(o: Observation, rank: int) -> tuple:
    return (o.module, o.io, o.call, rank)


@dataclass
class PointStats:
    """Running sums at one observation point, over the features of all models concatenated.

    Allocated eagerly (:meth:`zeros`) so that statistics collected on different data shards or
    processes have the same shapes and merge by addition.
    """

    widths: list[int]
    count: int
    s1: torch.Tensor
    s2: torch.Tensor

    @classmethod
    def zeros(cls, widths: Sequence[int], device: str | torch.device | None = None) -> "PointStats":
        """Empty sums for models of these widths."""
        n = sum(widths)
        return cls(list(widths), 0, torch.zeros(n, dtype=torch.float64, device=device),
                   torch.zeros(n, n, dtype=torch.float64, device=device))

    def update(self, feats: list[torch.Tensor]) -> None:
        """Add one batch: per model, a ``(samples, width)`` feature matrix."""
        f = torch.cat([x.to(torch.float64) for x in feats], dim=1)
        self.s1 += f.sum(0).to(self.s1.device)
        self.s2 += (f.t() @ f).to(self.s2.device)
        self.count += f.shape[0]

    def merge(self, other: "PointStats") -> "PointStats":
        """Sums over the data of both (a new object)."""
        if self.widths != other.widths:
            raise SpaceMismatchError(f"cannot merge statistics of widths {self.widths} and {other.widths}")
        return PointStats(list(self.widths), self.count + other.count, self.s1 + other.s1.to(self.s1.device),
                          self.s2 + other.s2.to(self.s2.device))

    def mean(self) -> torch.Tensor:
        """Mean of every feature."""
        return self.s1 / max(self.count, 1)

    def covariance(self) -> torch.Tensor:
        """Covariance matrix (population)."""
        mu = self.mean()
        return self.s2 / max(self.count, 1) - torch.outer(mu, mu)

    def correlation(self, eps: float = 1e-12) -> torch.Tensor:
        """Correlation matrix; constant (dead) units correlate with nothing (zero rows)."""
        cov = self.covariance()
        std = cov.diagonal().clamp_min(0).sqrt()
        denom = torch.outer(std, std)
        live = denom > eps * denom.max().clamp_min(1e-300)
        return torch.where(live, cov / torch.where(live, denom, torch.ones_like(denom)), torch.zeros_like(cov))


@dataclass
class Statistics:
    """Per-space activation statistics of N models (see :func:`collect`).

    Attributes:
        points: per space name, the statistics of each observation point used.
        widths: per space name, the width of the space in each model.
        seconds: wall time of the collection pass.
        samples: number of calibration examples seen.
    """

    points: dict[str, list[PointStats]] = field(default_factory=dict)
    widths: dict[str, list[int]] = field(default_factory=dict)
    seconds: float = 0.0
    samples: int = 0

    def merge(self, other: "Statistics") -> "Statistics":
        """Statistics over the data of both (e.g. collected on two shards, with the same spaces)."""
        if set(self.points) != set(other.points) or any(len(v) != len(other.points[k]) for k, v in self.points.items()):
            raise SpaceMismatchError("cannot merge statistics collected at different observation points")
        return Statistics(
            points={k: [a.merge(b) for a, b in zip(v, other.points[k])] for k, v in self.points.items()},
            widths=dict(self.widths), seconds=self.seconds + other.seconds, samples=self.samples + other.samples)

    def all_reduce(self) -> "Statistics":
        """Sum the statistics over the processes of the default ``torch.distributed`` group (in
        place; a no-op when no process group is initialised)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        for pts in self.points.values():
            for p in pts:
                dist.all_reduce(p.s1)
                dist.all_reduce(p.s2)
                c = torch.tensor([float(p.count)], dtype=torch.float64, device=p.s1.device)
                dist.all_reduce(c)
                p.count = int(c.item())
        n = torch.tensor([float(self.samples)], dtype=torch.float64)
        dist.all_reduce(n)
        self.samples = int(n.item())
        return self

    def _points(self, space: str) -> list[PointStats]:
        if space not in self.points or not self.points[space]:
            raise SpaceMismatchError(f"no statistics were collected for space {space!r} (no observation point)")
        return self.points[space]

    def offsets(self, space: str) -> list[int]:
        """Start of each model's block in the joint matrices (and the total at the end)."""
        w = self.widths[space]
        return [sum(w[:i]) for i in range(len(w) + 1)]

    def _average(self, space: str, fn) -> torch.Tensor:
        # points weigh by their number of samples: a pooled point (one sample per image) counts
        # less than a spatial one (one sample per position)
        pts = self._points(space)
        total = sum(p.count for p in pts)
        return sum(fn(p) * (p.count / total) for p in pts)

    def correlation(self, space: str) -> torch.Tensor:
        """Joint correlation matrix (all models' features), averaged over observation points."""
        return self._average(space, PointStats.correlation)

    def covariance(self, space: str) -> torch.Tensor:
        """Joint covariance matrix, averaged over observation points."""
        return self._average(space, PointStats.covariance)

    def mean(self, space: str) -> torch.Tensor:
        """Joint mean vector, averaged over observation points."""
        return self._average(space, PointStats.mean)

    def block(self, matrix: torch.Tensor, space: str, i: int, j: int) -> torch.Tensor:
        """The (model i, model j) block of a joint matrix of ``space``."""
        o = self.offsets(space)
        return matrix[o[i]:o[i + 1], o[j]:o[j + 1]]


def collect(
    models: Sequence[nn.Module],
    graphs: Sequence[Graph],
    data: Any,
    spaces: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    max_batches: int | None = None,
    progress: bool = False,
    points: str = "auto",
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

    Returns:
        :class:`Statistics` with per-space, per-point running sums.
    """
    t0 = time.perf_counter()
    dev = torch.device(device) if device is not None else model_device(models[0])
    runs = []
    for m in models:
        # the same object twice (fusing a model with itself) needs its own hooks
        dup = any(m is r for r in models[: len(runs)])
        runs.append(copy.deepcopy(m).to(dev) if dup or model_device(m) != dev else m)
    names = list(spaces) if spaces is not None else [s.name for s in graphs[0].spaces if s.observations]
    stats = Statistics()
    # per model: module -> list of (space, point index, observation)
    plans: list[dict[str, list[tuple[str, int, Observation]]]] = [defaultdict(list) for _ in models]
    for name in names:
        per_model = []
        for g in graphs:
            if name not in g:
                raise SpaceMismatchError(f"space {name!r} is missing from one model's graph; models must be of one family")
            per_model.append(observation_points(g[name], g, points))
        common = _pair_points(per_model)
        if not common:
            continue
        stats.widths[name] = [g[name].width for g in graphs]
        stats.points[name] = [PointStats.zeros(stats.widths[name], dev) for _ in common]
        for k, obs_per_model in enumerate(common):
            for i, o in enumerate(obs_per_model):
                plans[i][o.module].append((name, k, o))
    buffers: list[dict[tuple[str, int], torch.Tensor]] = [dict() for _ in models]
    calls: dict[int, int] = {}  # id(module) -> its calls so far in the current forward pass
    hooks = []
    for i, (m, plan) in enumerate(zip(runs, plans)):
        mods = dict(m.named_modules())
        for path, items in plan.items():
            if path not in mods:
                raise SpaceMismatchError(f"observation module {path!r} not found in model {i}")
            hooks.extend(_install(mods[path], items, buffers[i], calls))

    def before(i: int) -> None:
        buffers[i].clear()
        calls.clear()

    def on_batch(x, outs) -> None:
        for name, pts in stats.points.items():
            for k, ps in enumerate(pts):
                feats = [buffers[i].get((name, k)) for i in range(len(runs))]
                if any(f is None for f in feats):
                    raise SpaceMismatchError(
                        f"observation point {k} of space {name!r} did not fire in every model; "
                        f"the forward pass differs from the traced one")
                ps.update(feats)

    try:
        stats.samples = stream(runs, data, device=dev, on_batch=on_batch, before_model=before,
                               max_batches=max_batches, progress=progress, desc="statistics")
    finally:
        for h in hooks:
            h.remove()
    stats.seconds = time.perf_counter() - t0
    return stats


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


def _features(t: torch.Tensor, o: Observation) -> torch.Tensor:
    dim = o.dim if t.dim() == o.ndim or o.ndim == 0 else o.dim - o.ndim + t.dim()
    t = t.detach().movedim(dim, -1)
    # copy: an in-place op later in the forward (ReLU(inplace=True)) must not change what we read
    return t.reshape(-1, t.shape[-1])[:, o.start:o.stop].clone()


def _install(module: nn.Module, items: list[tuple[str, int, Observation]], buf: dict, calls: dict[int, int]):
    outs = [it for it in items if it[2].io == "output"]
    ins = [it for it in items if it[2].io == "input"]
    handles = []
    key = id(module)

    def pre(mod, args):
        call = calls.get(key, 0)
        for name, k, o in ins:
            if o.call == call and args and isinstance(args[0], torch.Tensor):
                buf[(name, k)] = _features(args[0], o)
        if not outs:
            calls[key] = call + 1

    def post(mod, args, out):
        call = calls.get(key, 0)
        t = out[0] if isinstance(out, (tuple, list)) else getattr(out, "last_hidden_state", out)
        for name, k, o in outs:
            if o.call == call and isinstance(t, torch.Tensor):
                buf[(name, k)] = _features(t, o)
        calls[key] = call + 1

    if ins:
        handles.append(module.register_forward_pre_hook(pre))
    if outs:
        handles.append(module.register_forward_hook(post))
    return handles
