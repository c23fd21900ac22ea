"""The ``fuse()`` API: the pipeline's stages composed.

```
discover --> collect --> match --> apply --> refine --> repair
(graph)      (stats)     (plans)   (weights)  (lstsq)    (norms)
```

Each stage is a function of its own module and can be called alone: :func:`alignment.discover`,
:func:`alignment.statistics.collect`, :func:`alignment.methods.match`,
:func:`fusion.engine.apply_maps`, :func:`fusion.refine.run_refinement`, :func:`fusion.repair.run_repair`.
:func:`align` runs the first three and returns an :class:`Alignment` that holds every intermediate
result (graphs, statistics, plans, maps for any weights, the report); :meth:`Alignment.build` runs
the rest; :func:`fuse` is both. Every argument is checked before the expensive work starts.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from alignment.discover import discover, discover_all, same_structure
from alignment.errors import CalibrationError, FallbackWarning, FusionWarning, InvalidOptionError, SpaceMismatchError
from alignment.graph import Graph
from alignment.maps import SpaceMap, correct_query_key, plan_maps
from alignment.methods import METHODS, MatchContext, MatchResult, match
from alignment.partial import check_budget, partial_plans, tensor_uses
from alignment.runner import first_batch, loader_samples, model_device, plain_precision, runnable
from alignment.statistics import POINT_POLICIES, Statistics, collect
from alignment.structure import dense_plan

from .checks import (ModelError, check_alpha, check_calibration, check_device, check_finite_model, check_finite_plans,
                     check_models, check_runs, check_seed, model_list, option_dict)
from .engine import apply_maps, check_heads, head_tensors
from .refine import REFINEMENTS, run_refinement
from .repair import REPAIRS, RepairContext, has_batchnorm, run_repair
from .resize import _template, check_width, module_widths, resized_graph
from .zipped import CutError, fit_cut, forward_flops, parameter_total, resolve_cut, zip_model

__all__ = ["FusionReport", "Alignment", "align", "fuse", "ModelError"]


@dataclass
class FusionReport:
    """What a fusion did and how long each stage took.

    Attributes:
        method: the matching method.
        repair: the norm repair asked for.
        repaired: the repair that ran (``repair``, except for ``"auto"``: ``"reset_bn"`` or ``"none"``).
        alpha: interpolation weights.
        refine: the refinement.
        options: the method's options (defaults filled in).
        seconds: wall time per stage (discover, collect, match, apply, refine, repair, total).
        costs: per-space matching score (mean cosine similarity of matched units).
        calibration_samples: number of calibration examples seen by the statistics.
        positions_per_image: the statistics' subsampling of positions/tokens per image (None: all).
        fallbacks: every place where a stage did something other than asked (each also warned).
        budget: partial matching: the fused parameter count over the fully matched model's (1: none),
            or ``{"params": x}`` / ``{"flops": x}``.
        partial: with a budget, its measure, per space the number of merged units split into one per
            model, and the counts (fused, fully matched) in that measure.
        heads: ``"merged"`` (one classifier) or ``"separate"`` (each model's own, outputs concatenated).
        head_sizes: with separate heads, each model's number of outputs, in the models' order.
        refinement: what the refine stage measured (per layer: rows, Gram size, relative regression
            loss before and after, seconds; the largest Gram; modules left as mapped).
        zip: with ``zip_until``, the cut (module, space, depth) and the zipped model's parameters and
            FLOPs per example next to each source model's (``params``, ``flops``, ``source_params``,
            ``source_flops``).
    """

    method: str
    repair: str
    alpha: list[float]
    refine: str = "none"
    options: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    costs: dict[str, float] = field(default_factory=dict)
    calibration_samples: int = 0
    positions_per_image: int | None = None
    fallbacks: list[str] = field(default_factory=list)
    budget: float | dict = 1.0
    partial: dict[str, Any] = field(default_factory=dict)
    heads: str = "merged"
    head_sizes: list[int] = field(default_factory=list)
    refinement: dict[str, Any] = field(default_factory=dict)
    zip: dict[str, Any] = field(default_factory=dict)
    repaired: str = ""

    def fallback(self, message: str) -> None:
        """Record a fallback and warn (once per message)."""
        if message not in self.fallbacks:
            self.fallbacks.append(message)
            warnings.warn(message, FallbackWarning, stacklevel=3)

    def summary(self) -> str:
        """A short human-readable summary."""
        st = ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items())
        vals = [v for v in self.costs.values() if not math.isnan(v)]
        score = f"mean matching score {sum(vals) / len(vals):.3f} over {len(vals)} spaces" if vals else "no matching score"
        fb = f"; {len(self.fallbacks)} fallback(s)" if self.fallbacks else ""
        if self.positions_per_image is not None:
            fb += f"; statistics on {self.positions_per_image} positions per image"
        refine = f" + {self.refine}" if self.refine != "none" else ""
        repair = self.repair if self.repaired in ("", self.repair) else f"{self.repair} ({self.repaired})"
        return f"{self.method}{refine} + {repair}: {st}; {score}{fb}"


@dataclass
class Alignment:
    """The result of matching: build fused models from it with any interpolation weights.

    Attributes:
        models: the source models.
        graphs: their alignment graphs.
        result: the method's :class:`~alignment.methods.MatchResult` (per-space plans).
        target: the model fused tensors are written into (None: a copy of the first model).
        target_graph: the target's graph (None: the first model's).
        statistics: the activation statistics (None when the method needed none).
        report: the fusion report so far.
        calibration: the calibration data (used by :meth:`build` for refinement and repair).
        device: where passes over the data run.
        example: the example input discovery ran on (used to place a ``zip_until`` cut).
        cuts: cuts already placed (``zip_until`` value -> :class:`fusion.zipped.Cut`).
        stage_cache: what the repair stage measured that depends only on the sources and the data
            (REPAIR's source statistics), reused by every later :meth:`build` (an interpolation
            curve measures the sources once).
        heads: the ``heads`` given to :func:`align` (None: not given), the default of :meth:`build`
            and :meth:`apply`.
    """

    models: Sequence[nn.Module]
    graphs: Sequence[Graph]
    result: MatchResult
    target: nn.Module | None = None
    target_graph: Graph | None = None
    statistics: Statistics | None = None
    report: FusionReport | None = None
    calibration: Any = None
    device: str | torch.device | None = None
    example: Any = None
    cuts: dict = field(default_factory=dict)
    stage_cache: dict = field(default_factory=dict, repr=False)
    heads: str | None = None

    @property
    def plans(self) -> list[dict[str, torch.Tensor]]:
        """Per model, per space, the plan from the model's features to the fused ones: an ``n x n_i``
        matrix, or an :class:`alignment.structure.RowPlan` where it has one entry per row
        (permutations; ``alignment.structure.dense_plan`` gives the matrix)."""
        return self.result.plans

    def maps(self, alpha: Sequence[float] | float | None = None) -> dict[str, SpaceMap]:
        """Per-space merge/unmerge maps for interpolation weights ``alpha``."""
        alpha = check_alpha(alpha, len(self.models), normalize=False)
        tg = self.target_graph if self.target_graph is not None else self.graphs[0]
        maps = {s.name: _space_maps(s.name, [p[s.name] for p in self.result.plans], alpha)
                for s in tg.spaces if s.members}
        return correct_query_key(maps, self.graphs, alpha)

    def apply(self, alpha: Sequence[float] | float | None = None, heads: str | None = None) -> nn.Module:
        """The fused model (before refinement and repair) for interpolation weights ``alpha``
        (``heads``: default the alignment's, else ``"merged"``)."""
        alpha = check_alpha(alpha, len(self.models), normalize=False)
        heads = heads if heads is not None else (self.heads or "merged")
        return apply_maps(self.models, self.graphs, self.maps(alpha), alpha=alpha, target=self.target, heads=heads)

    @plain_precision
    def build(self, alpha: Sequence[float] | float | None = None, repair: str = "none", refine: str = "none",
              repair_options: dict[str, Any] | None = None, refine_options: dict[str, Any] | None = None,
              progress: bool = False, heads: str | None = None, zip_until: Any = None) -> nn.Module:
        """Apply, refine, cut (``zip_until``, see :func:`fuse`) and repair: the fused model for
        ``alpha``, with its ``fusion_report`` (``heads``: default the one given to :func:`align`,
        else ``"merged"``)."""
        heads = heads if heads is not None else (self.heads or "merged")
        check_heads(heads)
        repair_options = REPAIRS.validate(repair, option_dict(repair_options, "repair_options"))
        refine_options = REFINEMENTS.validate(refine, option_dict(refine_options, "refine_options"))
        if self.calibration is None:
            _check_data_free(repair, refine, self.models[0])
        else:
            _check_repair_batches(repair, self.calibration, self.models[0])
        _check_zip_until(zip_until, repair, heads, self.graphs)
        weights = check_alpha(alpha, len(self.models), normalize=False)
        _warn_unnormalised(weights)
        report = _copy_report(self.report, weights, repair, refine)
        cut = None
        if zip_until is not None:
            if self.example is None:
                raise CutError("zip_until needs the example input discovery ran on; build alignments with align()")
            key = _cut_key(zip_until)
            if key not in self.cuts:
                self.cuts[key] = resolve_cut(zip_until, self.models[0], self.graphs[0], self.example)
            cut = self.cuts[key]
        t = time.perf_counter()
        maps = self.maps(weights)
        fused = apply_maps(self.models, self.graphs, maps, alpha=weights, target=self.target, heads=heads)
        report.seconds["apply"] = time.perf_counter() - t
        check_finite_model(fused, "applying the maps")
        if heads == "separate" and self.example is not None:
            # (other fused architectures ran already: the models' in discovery, a width's template in align)
            check_runs(fused, self.example, "giving each model its own classifier")
        report.heads = heads
        if heads == "separate":
            report.head_sizes = [int(g.shapes[head_tensors(g)[0]][0]) for g in self.graphs]
        if self.device is not None:
            fused = fused.to(self.device)
        ctx = RepairContext(fused=fused, sources=self.models, graphs=self.graphs, maps=maps, alpha=weights,
                            data=self.calibration, device=self.device, progress=progress, heads=heads,
                            until=cut.module if cut is not None else None, cache=self.stage_cache)
        if refine != "none" and cut is not None and cut.at_input:
            # the ensemble keeps every source model whole: a refined fused model would be thrown away
            report.fallback(f"refine={refine!r} skipped: zip_until={zip_until!r} cuts at the input, so nothing is "
                            f"fused (the models run whole)")
            refine, refine_options = "none", {}
        t = time.perf_counter()
        run_refinement(refine, ctx, **refine_options)
        report.seconds["refine"] = time.perf_counter() - t
        if cut is not None:
            t = time.perf_counter()
            kept = {id(m) for m in ctx.frozen}
            frozen = [n for n, m in ctx.fused.named_modules() if id(m) in kept]
            unmerge = None if cut.at_input else [U.to(model_device(self.models[0])) for U in maps[cut.space].unmerge]
            ctx.fused = zip_model(self.models, ctx.fused.to(model_device(self.models[0])), unmerge, cut, self.example,
                                  heads=heads, alpha=weights)
            tg = self.target_graph if self.target_graph is not None else self.graphs[0]
            ctx.fused.fused_widths = {s.name: s.width for s in tg.spaces if s.kind == "features"}
            report.zip = _zip_report(ctx.fused, self.models, cut, self.example)
            if self.device is not None:
                ctx.fused = ctx.fused.to(self.device)
            # the trunk is a copy: the norms refinement froze are found in it by name
            trunk = dict(ctx.fused.trunk.named_modules()) if ctx.fused.trunk is not None else {}
            ctx.frozen = [trunk[n] for n in frozen if n in trunk]
            fit = refine == "lstsq" and not cut.at_input
            if fit:
                # each branch will get its own model's features back (fitted below): its norms keep their statistics
                ctx.frozen += [m for m in ctx.fused.branches.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            report.seconds["zip"] = time.perf_counter() - t
        t = time.perf_counter()
        run_repair(repair, ctx, **repair_options)
        report.seconds["repair"] = time.perf_counter() - t
        report.repaired = ctx.details.get("repaired", repair)
        if cut is not None and fit:
            t = time.perf_counter()
            dev = torch.device(ctx.device) if ctx.device is not None else model_device(ctx.fused)
            report.zip["fit"] = fit_cut(ctx.fused, runnable(self.models, dev, avoid=[ctx.fused]), self.calibration, dev,
                                        ridge=refine_options["ridge"], precision=refine_options["precision"])
            report.seconds["refine"] += time.perf_counter() - t
        check_finite_model(ctx.fused, f"refine={refine!r} and repair={repair!r}")
        for msg in ctx.notes:
            report.fallback(msg)
        report.refinement = dict(ctx.details.get("refine", {}))
        fused = ctx.fused.to(model_device(self.models[0]))
        fused.fusion_report = report
        return fused


def _space_maps(name: str, plans: Sequence[Any], alpha: Sequence[float]) -> SpaceMap:
    """:func:`plan_maps` of one space, its errors naming the space."""
    try:
        return plan_maps(plans, alpha)
    except (SpaceMismatchError, InvalidOptionError) as exc:
        raise type(exc)(f"space {name!r}: {exc}") from None


def _warn_unnormalised(weights: Sequence[float]) -> None:
    """Warn when interpolation weights do not sum to 1 (what they then do is rarely what is meant)."""
    if abs(sum(weights) - 1.0) > 1e-6:
        warnings.warn(f"alpha={list(weights)} sums to {sum(weights):.6g}: the merge maps average each fused unit's "
                      f"members by their weights, so the sum scales only what no space maps (the classifier's "
                      f"outputs); weights summing to 1 extrapolate every layer alike", FusionWarning, stacklevel=3)


def _check_data_free(repair: str, refine: str, model: nn.Module | None) -> None:
    """Raise :class:`CalibrationError` when a repair or refinement needs calibration data that was
    not given (``"auto"`` needs it only for a model with BatchNorm layers to reset)."""
    if refine != "none" or repair not in ("none", "auto") or (repair == "auto" and model is not None
                                                              and has_batchnorm(model)):
        raise CalibrationError(f"repair={repair!r} and refine={refine!r} need calibration data (or use 'none')")


def _check_repair_batches(repair: str, data: Any, model: nn.Module | None) -> None:
    """Raise :class:`CalibrationError` when a BatchNorm reset would run on batches of one sample
    (a ``DataLoader`` with ``batch_size=1``): batch statistics of one sample are undefined after
    global pooling, and the image's own statistics elsewhere (no spread between images). Only the
    first batch is read here; a later batch of one sample (a loader's or a list's last) is left out
    of the reset and reported (:func:`fusion.repair.reset_bn`), and the runner cuts tensors and
    datasets into no such batch."""
    if repair not in ("auto", "reset_bn", "repair") or model is None or not has_batchnorm(model):
        return
    if not isinstance(data, torch.utils.data.DataLoader):
        return  # (the runner batches tensors and datasets itself; check_calibration refuses other data of 1-sample batches)
    total = loader_samples(data)
    if total is not None and total < 2:
        return  # (check_calibration refuses it, naming the count)
    if len(first_batch(data)) < 2:
        raise CalibrationError(f"repair={repair!r} resets BatchNorm statistics on the calibration batches, but the first "
                               f"batch holds one sample; give batches of 2 or more (e.g. DataLoader(..., batch_size=64)), "
                               f"or repair='none'")


def _cut_key(zip_until: Any) -> tuple:
    return (type(zip_until).__name__, zip_until)


def _check_zip_until(zip_until: Any, repair: str, heads: str, graphs: Sequence[Graph]) -> None:
    """Cheap checks of ``zip_until`` and what it needs, before any work."""
    if zip_until is None:
        return
    if isinstance(zip_until, bool) or not isinstance(zip_until, (str, int, float)):
        raise CutError(f"zip_until={zip_until!r}: give 'input', 'output', a depth fraction, a module path or a space name")
    if repair == "repair":
        raise InvalidOptionError("repair='repair' rescales the fused model's own norm layers and cannot follow a cut "
                                 "(zip_until); use repair='reset_bn' or 'none'")
    if heads == "merged":
        sizes = {int(g.shapes[head_tensors(g)[0]][0]) for g in graphs if head_tensors(g)}
        if len(sizes) > 1:
            raise CutError(f"zip_until with heads='merged' averages the models' logits, but their class counts differ "
                           f"({sorted(sizes)}); use heads='separate'")


def _zip_report(zipped: nn.Module, models: Sequence[nn.Module], cut, example) -> dict[str, Any]:
    ex = example.to(model_device(models[0])) if isinstance(example, torch.Tensor) else example
    return {"cut": cut.to_dict(), "params": parameter_total(zipped), "flops": forward_flops(zipped, ex),
            "source_params": [parameter_total(m) for m in models],
            "source_flops": [forward_flops(m, ex) for m in models]}


def _copy_report(base: FusionReport | None, alpha, repair: str, refine: str) -> FusionReport:
    base = base or FusionReport(method="", repair=repair, alpha=alpha)
    return dataclasses.replace(base, repair=repair, alpha=list(alpha), refine=refine, options=dict(base.options),
                               seconds=dict(base.seconds), costs=dict(base.costs), fallbacks=list(base.fallbacks))


def _unit_quality(stats: Statistics, plans, graph: Graph) -> dict[str, torch.Tensor]:
    """Per space, each fused unit's mean correlation over the pairs of model units merged into it
    (the pairs whose statistics were collected; 1 for a unit of one member)."""
    out = {}
    for s in graph.spaces:
        if not s.members or s.kind != "features" or s.name not in stats.points or not stats.points[s.name]:
            continue
        corr = stats.correlation(s.name).cpu()
        known = stats.points[s.name][0].known().cpu().double()
        known.fill_diagonal_(0)
        M = torch.cat([dense_plan(p[s.name]).cpu() for p in plans], dim=1).gt(0).double()
        num = ((M @ (corr * known)) * M).sum(1)
        den = ((M @ known) * M).sum(1)
        out[s.name] = torch.where(den > 0, num / den.clamp_min(1), torch.ones_like(num))
    return out


@plain_precision
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
    points: str = "auto",
    positions_per_image: int | None = None,
    budget: float | dict = 1.0,
    heads: str | None = None,
    zip_until: Any = None,
    **options: Any,
) -> Alignment:
    """Discover, collect statistics and match: everything of :func:`fuse` but building the model.

    See :func:`fuse` for the arguments. ``heads`` and ``zip_until``, when given, are what
    :meth:`Alignment.build` will be asked for: they are checked (and the cut placed) here, before
    the statistics pass. Returns an :class:`Alignment` to build with any weights.
    """
    models = check_models(models)
    check_seed(seed)
    check_device(device)
    checked = METHODS.validate(method, options, models=len(models))
    if heads is not None:
        check_heads(heads)
    if points not in POINT_POLICIES:
        raise InvalidOptionError(f"points={points!r} is not an observation policy; use one of {', '.join(POINT_POLICIES)}")
    if positions_per_image is not None and (isinstance(positions_per_image, bool) or not isinstance(
            positions_per_image, int) or positions_per_image < 1):
        raise InvalidOptionError(f"positions_per_image must be a positive integer or None, got {positions_per_image!r}")
    if target is not None and not isinstance(target, nn.Module):
        raise ModelError(f"target must be a model (torch.nn.Module) of the fused widths, got {type(target).__name__}; "
                         f"for a width factor use width=")
    if target is not None:
        if any(t.is_meta for t in itertools.chain(target.parameters(), target.buffers())):
            raise ModelError("target has tensors on the meta device (no values): the fused model is a copy of the "
                             "target, whose tensors the fusion does not write (fixed tables, BatchNorm counters) "
                             "keep their values; build it on a real device")
        dtypes = [{t.dtype for t in m.parameters() if t.is_floating_point()} for m in (models[0], target)]
        if dtypes[1] and dtypes[0] and dtypes[1] != dtypes[0]:
            raise ModelError(f"target is {'/'.join(sorted(str(d) for d in dtypes[1]))} but the models are "
                             f"{'/'.join(sorted(str(d) for d in dtypes[0]))}: the fused model is written into the "
                             f"target's architecture; convert it (target.to(dtype))")
    if width is not None:
        if target is not None:
            raise InvalidOptionError("give either target (a model of the fused widths) or width (a factor), not both")
        check_width(width)
    factor, measure = check_budget(budget)
    if factor != 1.0 and calibration is None:
        raise CalibrationError("budget (partial matching) ranks the matched units by their activation statistics: "
                               "give calibration data")
    if factor != 1.0 and method == "ot" and checked.get("solver") == "sinkhorn":
        raise InvalidOptionError("budget (partial matching) splits units that a one-to-one plan matched; Sinkhorn "
                                 "plans split every unit: use solver='emd' or method='permute' with a budget")
    if factor != 1.0 and (width is not None or target is not None or len(models) < 2):
        raise InvalidOptionError("budget (partial matching) needs two or more models and sets the fused widths "
                                 "itself: do not combine it with target or width")
    if len(models) == 1 and width is None and target is None:
        raise InvalidOptionError("one model: fusing it alone is compression and needs width= (e.g. 0.5) or target= "
                                 "(a narrower model of its family); give two or more models to fuse them")
    if zip_until is not None:
        _check_zip_until(zip_until, "none", heads or "separate", [])
    first = check_calibration(calibration, models, heads) if calibration is not None else None
    report = report if report is not None else FusionReport(method=method, repair="none", alpha=[])
    report.method, report.options = method, dict(checked)
    if example_input is None:
        if calibration is None:
            raise CalibrationError(f"method {method!r} needs calibration data or an example_input for discovery")
        example_input = first[:2]
    t = time.perf_counter()
    dev = torch.device(device) if device is not None else model_device(models[0])
    ex = example_input.to(model_device(models[0])) if isinstance(example_input, torch.Tensor) else example_input
    graphs = discover_all(models, ex)
    for msg in dict.fromkeys(n for g in graphs for n in g.notes):  # (e.g. tensors the forward never reads)
        report.fallback(f"discovery: {msg}")
    target_graph = None
    if width is not None:
        # the fused architecture: the first model resized (its features are only a template)
        width = module_widths(models[0], graphs[0], width)
        target = _template(models[0], width, graphs[0])
        check_runs(target, ex, "resizing to the fused widths")  # (before any pass over the data)
        target_graph = resized_graph(graphs[0], width)
    elif target is not None:
        target_graph = (graphs[0] if same_structure(target, models[0]) else
                        discover(target, ex.to(model_device(target)) if isinstance(ex, torch.Tensor) else ex))
    cuts = {}
    if zip_until is not None:
        cuts[_cut_key(zip_until)] = resolve_cut(zip_until, models[0], graphs[0], ex)
    report.seconds["discover"] = time.perf_counter() - t
    cached: dict[str, Statistics] = {}

    def statistics(pairs=None) -> Statistics:
        # one collection per fusion: the joint matrix, or only the pairs an anchored method needs
        if "stats" not in cached or (pairs is None and cached.get("pairs") is not None):
            if calibration is None:
                raise CalibrationError(f"method {method!r} needs calibration data for activation statistics")
            t1 = time.perf_counter()
            cached["stats"] = collect(models, graphs, calibration, device=dev, progress=progress, points=points,
                                      pairs=pairs, positions_per_image=positions_per_image, seed=seed,
                                      check=False)  # (check_calibration has run every model on the data)
            cached["pairs"] = pairs
            report.seconds["collect"] = report.seconds.get("collect", 0.0) + time.perf_counter() - t1
            report.calibration_samples = cached["stats"].samples
            report.positions_per_image = positions_per_image
        return cached["stats"]

    ctx = MatchContext(models=models, graphs=graphs, alpha=[1.0 / len(models)] * len(models),
                       statistics=statistics, target_graph=target_graph, seed=seed)
    t = time.perf_counter()
    result = match(ctx, method, **options)
    check_finite_plans(result.plans)
    report.seconds["match"] = time.perf_counter() - t - report.seconds.get("collect", 0.0)
    report.costs = dict(result.costs)
    report.fallbacks.extend(m for m in result.notes if m not in report.fallbacks)
    report.budget = budget
    if factor != 1.0:
        t = time.perf_counter()
        stats = statistics(cached.get("pairs", [(0, i) for i in range(1, len(models))]))
        uses = tensor_uses(models[0], graphs[0], ex) if measure == "flops" else None
        pp = partial_plans(graphs[0], result.plans, _unit_quality(stats, result.plans, graphs[0]), budget, uses)
        result.plans = pp.plans
        changed = {k: v for k, v in pp.widths.items() if v != graphs[0][k].width}
        target = _template(models[0], changed, graphs[0])
        target_graph = resized_graph(graphs[0], changed)
        report.partial = {"measure": measure, "split": dict(pp.split), "parameters": list(pp.parameters),
                          "fully_matched": list(pp.fully_matched)}
        report.seconds["match"] += time.perf_counter() - t
    stats = cached.get("stats")
    cached.clear()  # (``cached`` holds the method's pairs function, which holds ctx, which holds ``statistics``:
    # a cycle that would keep the statistics alive after the alignment is dropped)
    return Alignment(models=models, graphs=graphs, result=result, target=target, target_graph=target_graph,
                     statistics=stats, report=report, calibration=calibration, device=device, example=ex,
                     cuts=cuts, heads=heads)


@plain_precision
def fuse(
    models: Sequence[nn.Module],
    calibration: Any = None,
    method: str = "permute",
    repair: str = "auto",
    target: nn.Module | None = None,
    alpha: Sequence[float] | float | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    example_input: Any = None,
    progress: bool = False,
    width: Any = None,
    refine: str = "none",
    points: str = "auto",
    positions_per_image: int | None = None,
    repair_options: dict[str, Any] | None = None,
    refine_options: dict[str, Any] | None = None,
    heads: str = "merged",
    budget: float | dict = 1.0,
    zip_until: Any = None,
    normalize: bool = True,
    **options: Any,
) -> nn.Module:
    """Fuse models into one by aligning their hidden units.

    Args:
        models: models of one family (same architecture; widths may differ for methods that allow
            it). They are never modified.
        calibration: calibration inputs for statistics, refinement and repair: a tensor, a dataset,
            a ``DataLoader`` or a list of batches (tensors, ``(x, y)`` pairs, dicts with
            ``pixel_values``, or ``(dict, y)`` pairs). One pair or one dict is one batch: give
            ``[(x, y)]``, not ``(x, y)``.
        method: a registered method (:func:`list_methods`; ``fusion methods`` lists their options):
            ``"permute"`` (activation matching; rectangular for different widths),
            ``"weight_matching"``, ``"average"`` (plain averaging), ``"ot"`` (optimal transport, any
            widths), ``"merge"`` (merge correlated features, any narrower width), ``"magnitude"``
            (L1 pruning of one model), ...
        repair: ``"auto"`` (a BatchNorm statistics reset where the fused model has BatchNorm layers,
            else nothing), ``"reset_bn"`` (the reset; reported as a fallback when there is no
            BatchNorm layer), ``"repair"`` (REPAIR), or ``"none"``.
        target: a model of the fused widths to write the fused weights into (e.g. the same
            architecture built narrower; its own weights are not used). Default: a copy of the
            first model. With one model and a narrower target, fusion is compression.
        alpha: interpolation weights (default uniform; a float ``a`` means ``[1 - a, a]``): finite,
            non-negative and summing to 1 (see ``normalize``). They weigh the models when the maps
            are applied; the matching itself uses uniform weights (one alignment serves every alpha).
        seed: seed for randomised solvers (the same seed gives the same fused weights).
        device: where to collect statistics, refine and repair (e.g. ``"cuda"``); default: the
            models' device.
        example_input: input batch for discovery (default: the first calibration batch).
        progress: show progress bars.
        width: instead of ``target``, the fused widths relative to the first model: a factor
            (``0.5``), a width, or a per-space dict (see :func:`fusion.resize.resize`).
        refine: a registered refinement: ``"none"`` or ``"lstsq"`` (least squares layer by layer,
            PLeaS in closed form; see :mod:`fusion.refine`).
        points: where activations are observed (see :func:`alignment.statistics.observation_points`).
        positions_per_image: statistics read at most this many spatial positions (or tokens) per
            image, drawn at random (faster on large inputs; reported); None reads all.
        repair_options: options of the repair (e.g. ``{"eps": 1e-5}`` for ``"repair"``).
        refine_options: options of the refinement (e.g. ``{"ridge": 1e-4}`` for ``"lstsq"``).
        budget: partial matching (PLeaS): the fused model may have up to ``budget`` times the
            parameters of the fully matched model; the worst-matched units of plain spaces are then
            kept from each model instead of merged (see :mod:`alignment.partial`; widths and split
            counts in ``report.partial``). 1 is ordinary matching; ``{"flops": 1.2}`` budgets the
            multiply-adds of a forward pass instead of the parameters.
        heads: ``"merged"`` (one classifier) or ``"separate"``: each model keeps its own classifier,
            fed from the fused features through its unmerge map, and the fused model returns the
            classifiers' outputs concatenated in the models' order (for models trained on different
            label sets; ``report.head_sizes`` gives each one's width).
        zip_until: partial zipping (ZipIt): fuse only up to a cut, after which each model keeps its own
            layers (fed the fused features through its unmerge map) and its own classifier; returns a
            :class:`fusion.zipped.ZippedModel` whose output is the models' logits averaged with
            ``alpha`` (``heads="merged"``) or concatenated (``heads="separate"``). The cut is
            ``"input"`` (the ensemble), ``"output"`` (full zipping), a depth fraction in ``[0, 1]``,
            a module path (e.g. ``"layer3"``, ``"blocks.4"``) or a space name
            (:func:`fusion.zipped.cut_points` lists the valid cuts; ``report.zip`` the cut, the
            parameters and FLOPs). Any method may build the trunk; ``"zip"`` is the usual one.
        normalize: require ``alpha`` to be non-negative weights summing to 1 (default); False uses
            any finite weights as given (extrapolation, e.g. ``[-0.5, 1.5]``). Keep them summing to
            1: a fused unit's merge map divides by its members' total weight, so a sum other than 1
            would scale only what no space maps (the classifier's outputs), not the hidden layers.
        **options: method options (e.g. ``iterations`` for ``permute``, ``max_iter`` for
            ``weight_matching``); an unknown one raises :class:`~alignment.errors.InvalidOptionError`.

    Returns:
        The fused model, with the same forward signature as the inputs. Its ``fusion_report``
        attribute is a :class:`FusionReport` (per-space matching scores, wall time per stage, every
        fallback taken).
    """
    models = model_list(models)  # every tensor is checked once, in align
    weights = check_alpha(alpha, len(models), normalize)
    _warn_unnormalised(weights)
    check_heads(heads)
    METHODS.validate(method, options, models=len(models))
    REPAIRS.validate(repair, option_dict(repair_options, "repair_options"))
    REFINEMENTS.validate(refine, option_dict(refine_options, "refine_options"))
    if calibration is None:
        _check_data_free(repair, refine, models[0] if models else None)
    else:
        _check_repair_batches(repair, calibration, models[0] if models else None)
    if zip_until is not None:
        _check_zip_until(zip_until, repair, heads, [])
    t_all = time.perf_counter()
    al = align(models, calibration, method=method, target=target, seed=seed, device=device,
               example_input=example_input, progress=progress, width=width, points=points,
               positions_per_image=positions_per_image, budget=budget, heads=heads, zip_until=zip_until, **options)
    with warnings.catch_warnings():  # (warned above, before the work)
        warnings.filterwarnings("ignore", r"alpha=.* sums to ", FusionWarning)
        fused = al.build(weights, repair=repair, refine=refine, repair_options=repair_options,
                         refine_options=refine_options, progress=progress, heads=heads, zip_until=zip_until)
    fused.fusion_report.seconds["total"] = time.perf_counter() - t_all
    return fused
