"""The ``fuse()`` API: discover -> collect -> match -> apply -> repair, one stage per module."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from alignment import discover
from alignment.errors import FusionError
from alignment.graph import Graph
from alignment.solvers import MatchContext, MatchResult, get_method
from alignment.statistics import Statistics, _batches, collect, model_device

from alignment.maps import correct_query_key, plan_maps

from .engine import SpaceMap, apply_maps, permutation_map
from .repair import REPAIRS, UnknownRepairError, repair as repair_fn, reset_bn


class CalibrationError(FusionError, ValueError):
    """Calibration data is missing or unusable."""


@dataclass
class FusionReport:
    """What a fusion did and how long each stage took.

    Attributes:
        method: the matching method.
        repair: the norm repair.
        alpha: interpolation weights.
        seconds: wall time per stage (discover, collect, match, apply, repair).
        costs: per-space matching score (e.g. mean correlation of matched units).
        calibration_samples: number of calibration examples seen by the statistics.
    """

    method: str
    repair: str
    alpha: list[float]
    seconds: dict[str, float] = field(default_factory=dict)
    costs: dict[str, float] = field(default_factory=dict)
    calibration_samples: int = 0

    def summary(self) -> str:
        """A short human-readable summary."""
        st = ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items())
        mean_cost = sum(self.costs.values()) / len(self.costs) if self.costs else float("nan")
        return f"{self.method} + {self.repair}: {st}; mean matching score {mean_cost:.3f} over {len(self.costs)} spaces"


def _first_batch(data: Any) -> torch.Tensor:
    for x in _batches(data):
        return x
    raise CalibrationError("calibration data is empty")


@dataclass
class Alignment:
    """The result of matching: apply it with any interpolation weights.

    Attributes:
        models: the source models.
        graphs: their alignment graphs.
        result: the method's :class:`~alignment.solvers.MatchResult`.
        target: the model fused tensors are written into (None: a copy of the first model).
        target_graph: the target's graph (None: the first model's).
    """

    models: Sequence[nn.Module]
    graphs: Sequence[Graph]
    result: MatchResult
    target: nn.Module | None = None
    target_graph: Graph | None = None

    def maps(self, alpha: Sequence[float]) -> dict[str, SpaceMap]:
        """Per-space merge/unmerge maps for interpolation weights ``alpha``."""
        if self.result.maps is not None:
            return self.result.maps
        g0 = self.graphs[0]
        tg = self.target_graph if self.target_graph is not None else g0
        if self.result.plans is not None:
            maps = {s.name: plan_maps([p[s.name] for p in self.result.plans], alpha)
                    for s in tg.spaces if s.members}
            return correct_query_key(maps, self.graphs, alpha)
        return {
            s.name: permutation_map([p[s.name] for p in self.result.perms], alpha)
            for s in g0.spaces if s.members
        }

    def apply(self, alpha: Sequence[float] | None = None) -> nn.Module:
        """The fused model (before repair) for interpolation weights ``alpha`` (default uniform)."""
        alpha = _alpha(alpha, len(self.models))
        return apply_maps(self.models, self.graphs, self.maps(alpha), alpha=alpha, target=self.target)


def _alpha(alpha: Sequence[float] | float | None, n: int) -> list[float]:
    if alpha is None:
        return [1.0 / n] * n
    if isinstance(alpha, (int, float)):
        if n != 2:
            raise ValueError(f"a single alpha is for two models; give {n} weights")
        return [1.0 - float(alpha), float(alpha)]
    alpha = [float(a) for a in alpha]
    if len(alpha) != n:
        raise ValueError(f"alpha has {len(alpha)} weights for {n} models")
    return alpha


def align(
    models: Sequence[nn.Module],
    calibration: Any = None,
    method: str = "permute",
    target: nn.Module | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    example_input: Any = None,
    progress: bool = False,
    report: FusionReport | None = None,
    width: Any = None,
    **options: Any,
) -> Alignment:
    """Discover, collect statistics and match: everything of :func:`fuse` but building the model.

    See :func:`fuse` for the arguments. Returns an :class:`Alignment` to apply with any weights.
    """
    if not models:
        raise ValueError("fuse needs at least one model")
    method_fn = get_method(method)
    if example_input is None:
        if calibration is None:
            raise CalibrationError(f"method {method!r} needs calibration data or an example_input for discovery")
        example_input = _first_batch(calibration)[:2]
    seconds = report.seconds if report is not None else {}
    t = time.perf_counter()
    dev = torch.device(device) if device is not None else model_device(models[0])
    ex = example_input.to(model_device(models[0])) if isinstance(example_input, torch.Tensor) else example_input
    graphs = [discover(m, ex if model_device(m) == model_device(models[0]) else ex.to(model_device(m)))
              for m in models]
    if width is not None:
        if target is not None:
            raise ValueError("give either target (a model of the fused widths) or width (a factor), not both")
        from .resize import resize

        # the fused architecture: the first model resized (its features are only a template)
        target = resize(models[0], width, graph=graphs[0])
    target_graph = discover(target, ex) if target is not None else None
    seconds["discover"] = time.perf_counter() - t
    cached: dict[str, Statistics] = {}

    def statistics() -> Statistics:
        if "stats" not in cached:
            if calibration is None:
                raise CalibrationError(f"method {method!r} needs calibration data for activation statistics")
            t1 = time.perf_counter()
            cached["stats"] = collect(models, graphs, calibration, device=dev, progress=progress,
                                      points=options.get("points", "auto"))
            seconds["collect"] = time.perf_counter() - t1
            if report is not None:
                report.calibration_samples = cached["stats"].samples
        return cached["stats"]

    ctx = MatchContext(models=models, graphs=graphs, alpha=[1.0 / len(models)] * len(models),
                       statistics=statistics, target_graph=target_graph, seed=seed, options=dict(options))
    t = time.perf_counter()
    result = method_fn(ctx)
    seconds["match"] = time.perf_counter() - t - seconds.get("collect", 0.0)
    if report is not None:
        report.costs = dict(result.costs)
    return Alignment(models=models, graphs=graphs, result=result, target=target, target_graph=target_graph)


def fuse(
    models: Sequence[nn.Module],
    calibration: Any = None,
    method: str = "permute",
    repair: str = "reset_bn",
    target: nn.Module | None = None,
    alpha: Sequence[float] | float | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    example_input: Any = None,
    progress: bool = False,
    width: Any = None,
    **options: Any,
) -> nn.Module:
    """Fuse models into one by aligning their hidden units.

    Args:
        models: models of one family (same architecture; widths may differ for methods that allow
            it). They are never modified.
        calibration: calibration inputs for statistics and repair: a tensor, a dataset, or an
            iterable of batches or ``(x, y)`` pairs.
        method: a registered method (:func:`list_methods`): ``"permute"`` (activation matching;
            rectangular for different widths), ``"weight_matching"``, ``"average"`` (plain
            averaging), ``"ot"`` (optimal transport, any widths), ``"merge"`` (merge correlated
            features, any narrower width), ``"magnitude"`` (L1 pruning of one model), ...
        repair: ``"reset_bn"`` (BatchNorm statistics reset), ``"repair"`` (REPAIR), or ``"none"``.
        target: a model of the fused widths to write the fused weights into (e.g. the same
            architecture built narrower; its own weights are not used). Default: a copy of the
            first model. With one model and a narrower target, fusion is compression.
        alpha: interpolation weights (default uniform; a float ``a`` means ``[1 - a, a]``).
        seed: seed for randomised solvers (the same seed gives the same fused weights).
        device: where to collect statistics and repair (e.g. ``"cuda"``); default: the models' device.
        example_input: input batch for discovery (default: the first calibration batch).
        progress: show progress bars.
        width: instead of ``target``, the fused widths relative to the first model: a factor
            (``0.5``), a width, or a per-space dict (see :func:`fusion.resize.resize`).
        **options: method options (e.g. ``iterations`` for ``permute``, ``max_iter`` for
            ``weight_matching``).

    Returns:
        The fused model, with the same forward signature as the inputs. Its ``fusion_report``
        attribute is a :class:`FusionReport` (per-space matching scores, wall time per stage).
    """
    if repair not in REPAIRS:
        raise UnknownRepairError(f"unknown repair {repair!r}; use one of {', '.join(REPAIRS)}")
    if repair != "none" and calibration is None:
        raise CalibrationError(f"repair={repair!r} needs calibration data (or use repair='none')")
    weights = _alpha(alpha, len(models))
    report = FusionReport(method=method, repair=repair, alpha=weights)
    t_all = time.perf_counter()
    al = align(models, calibration, method=method, target=target, seed=seed, device=device,
               example_input=example_input, progress=progress, report=report, width=width, **options)
    t = time.perf_counter()
    maps = al.maps(weights)
    fused = apply_maps(models, al.graphs, maps, alpha=weights, target=al.target)
    report.seconds["apply"] = time.perf_counter() - t
    t = time.perf_counter()
    if device is not None:
        fused = fused.to(device)
    if repair == "reset_bn":
        reset_bn(fused, calibration, device)
    elif repair == "repair":
        repair_fn(fused, models, al.graphs, maps, weights, calibration, device)
    report.seconds["repair"] = time.perf_counter() - t
    report.seconds["total"] = time.perf_counter() - t_all
    fused.to(model_device(models[0]))
    fused.fusion_report = report
    return fused
