"""Streaming activation statistics for N models at once.

One pass over calibration data runs every model on the same batches with forward hooks at the
graph's observation points and accumulates, per space and observation point, float64 running sums of
the features of all models concatenated: ``sum f`` and ``sum f f^T`` over every sample (conv features
count every spatial position, ViT features every token). Memory is bounded by the statistics (never
the stored activations), so it does not grow with the calibration size.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .errors import SpaceMismatchError
from .graph import Graph, Observation, Space


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
    """Running sums at one observation point, over the features of all models concatenated."""

    widths: list[int]
    count: int = 0
    s1: torch.Tensor | None = None
    s2: torch.Tensor | None = None

    def update(self, feats: list[torch.Tensor]) -> None:
        f = torch.cat([x.to(torch.float64) for x in feats], dim=1)
        if self.s1 is None:
            n = f.shape[1]
            self.s1 = torch.zeros(n, dtype=torch.float64, device=f.device)
            self.s2 = torch.zeros(n, n, dtype=torch.float64, device=f.device)
        self.s1 += f.sum(0)
        self.s2 += f.t() @ f
        self.count += f.shape[0]

    def mean(self) -> torch.Tensor:
        return self.s1 / self.count

    def covariance(self) -> torch.Tensor:
        mu = self.mean()
        return self.s2 / self.count - torch.outer(mu, mu)

    def correlation(self, eps: float = 1e-12) -> torch.Tensor:
        cov = self.covariance()
        std = cov.diagonal().clamp_min(0).sqrt()
        denom = torch.outer(std, std)
        # dead (constant) units correlate with nothing; live units have exactly 1 on the diagonal
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

    def _points(self, space: str) -> list[PointStats]:
        if space not in self.points or not self.points[space]:
            raise SpaceMismatchError(f"no statistics were collected for space {space!r} (no observation point)")
        return self.points[space]

    def offsets(self, space: str) -> list[int]:
        """Start of each model's block in the joint matrices."""
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


def _batches(data: Any) -> Iterable[torch.Tensor]:
    """Input tensors from a tensor, a dataset, or an iterable of batches / (x, y) pairs."""
    if isinstance(data, torch.Tensor):
        for i in range(0, len(data), 256):
            yield data[i:i + 256]
        return
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        data = torch.utils.data.DataLoader(data, batch_size=256, shuffle=False)
    for batch in data:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        elif isinstance(batch, dict):
            batch = batch.get("pixel_values", next(iter(batch.values())))
        yield batch


def model_device(model: nn.Module) -> torch.device:
    """Device of a model's first parameter (CPU for a parameterless model)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


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
        data: calibration inputs: a tensor, a dataset, or an iterable of batches or ``(x, y)`` pairs.
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
        # the same object twice (fusing a model with itself) needs its own hooks and call counts
        dup = any(m is r for r in models[: len(runs)])
        runs.append(_copy_to(m, dev) if dup or model_device(m) != dev else m)
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
        stats.points[name] = [PointStats(stats.widths[name]) for _ in common]
        for k, obs_per_model in enumerate(common):
            for i, o in enumerate(obs_per_model):
                plans[i][o.module].append((name, k, o))
    buffers: list[dict[tuple[str, int], torch.Tensor]] = [dict() for _ in models]
    hooks = []
    for i, (m, plan) in enumerate(zip(runs, plans)):
        mods = dict(m.named_modules())
        for path, items in plan.items():
            if path not in mods:
                raise SpaceMismatchError(f"observation module {path!r} not found in model {i}")
            hooks.extend(_install(mods[path], items, buffers[i]))
    was_training = [m.training for m in runs]
    try:
        for m in runs:
            m.eval()
        it = _batches(data)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="statistics", leave=False)
        with torch.no_grad():
            for b, x in enumerate(it):
                if max_batches is not None and b >= max_batches:
                    break
                x = x.to(dev)
                for i, m in enumerate(runs):
                    buffers[i].clear()
                    _CallCounter.reset(m)
                    m(x)
                for name, pts in stats.points.items():
                    for k, ps in enumerate(pts):
                        feats = [buffers[i].get((name, k)) for i in range(len(runs))]
                        if any(f is None for f in feats):
                            raise SpaceMismatchError(
                                f"observation point {k} of space {name!r} did not fire in every model; "
                                f"the forward pass differs from the traced one"
                            )
                        ps.update(feats)
                stats.samples += len(x)
    finally:
        for h in hooks:
            h.remove()
        for m, t in zip(runs, was_training):
            m.train(t)
    stats.seconds = time.perf_counter() - t0
    return stats


def _copy_to(model: nn.Module, device: torch.device) -> nn.Module:
    import copy

    return copy.deepcopy(model).to(device)


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


class _CallCounter:
    """Counts calls of hooked modules within one forward pass."""

    counts: dict[int, int] = {}

    @classmethod
    def reset(cls, model: nn.Module) -> None:
        for m in model.modules():
            cls.counts.pop(id(m), None)


def _features(t: torch.Tensor, o: Observation) -> torch.Tensor:
    dim = o.dim if t.dim() == o.ndim or o.ndim == 0 else o.dim - o.ndim + t.dim()
    t = t.detach().movedim(dim, -1)
    # copy: an in-place op later in the forward (ReLU(inplace=True)) must not change what we read
    return t.reshape(-1, t.shape[-1])[:, o.start:o.stop].clone()


def _install(module: nn.Module, items: list[tuple[str, int, Observation]], buf: dict):
    outs = [it for it in items if it[2].io == "output"]
    ins = [it for it in items if it[2].io == "input"]
    handles = []
    key = id(module)

    def pre(mod, args):
        call = _CallCounter.counts.get(key, 0)
        for name, k, o in ins:
            if o.call == call and args and isinstance(args[0], torch.Tensor):
                buf[(name, k)] = _features(args[0], o)
        if not outs:
            _CallCounter.counts[key] = call + 1

    def post(mod, args, out):
        call = _CallCounter.counts.get(key, 0)
        t = out[0] if isinstance(out, (tuple, list)) else getattr(out, "last_hidden_state", out)
        for name, k, o in outs:
            if o.call == call and isinstance(t, torch.Tensor):
                buf[(name, k)] = _features(t, o)
        _CallCounter.counts[key] = call + 1

    if ins:
        handles.append(module.register_forward_pre_hook(pre))
    if outs:
        handles.append(module.register_forward_hook(post))
    return handles
