"""Fusion methods: the match stage. Statistics or weights of the spaces in, per-space plans out.

Every method is a function ``method(ctx, *, options...) -> MatchResult`` registered by name
(``@register_method("ot")``); its options are typed keyword arguments, checked before any work
(:mod:`alignment.registry`). Every method returns *plans* (per model and space, a non-negative
``n x n_i`` matrix; a permutation is a 0/1 plan) through the one structure walk
(:class:`alignment.structure.Walk`) with a leaf solver (:mod:`alignment.leaves`) and a similarity
(:mod:`alignment.grams`); :func:`alignment.maps.plan_maps` turns plans into maps for any
interpolation weights.

| method | leaf solver | similarity |
|---|---|---|
| ``average`` | identity plans | none |
| ``permute`` | Hungarian (rectangular when widths differ; MergeMany rematching for N > 2) | activation correlation |
| ``weight_matching`` | Hungarian, coordinate descent over spaces | weight inner products |
| ``ot`` | exact or entropic OT onto an anchor or a barycenter | activations or weights |
| ``merge`` | agglomerative merging | activation correlation or weight cosine |
| ``zip`` | ZipIt's greedy pair merging (heads merged whole first) | activation correlation |
| ``magnitude`` | keep the largest L1 units of one model | weight magnitudes |
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Literal, Sequence

import torch
from torch import nn

from .errors import (CalibrationError, FallbackWarning, InvalidOptionError, MethodResultError, SpaceMismatchError,
                     UnknownNameError)
from .grams import activation_gram, magnitude_scores, weight_gram
from .graph import Graph
from .leaves import magnitude_leaf, merge_leaf, ot_leaf, zip_labels, zip_leaf
from .maps import as_plan
from .permute import effective_weights, model_tensors, weight_norms
from .registry import Registry
from .structure import GramView, Heads, Walk, check_structures, plan_argmax, plans_equal

__all__ = [
    "METHODS", "MatchContext", "MatchResult", "UnknownMethodError", "register_method", "list_methods",
    "get_method", "match", "check_result", "MAX_WORKERS",
]


class UnknownMethodError(UnknownNameError):
    """No fusion method is registered under the given name."""


CALL_KEYWORDS = ("models", "calibration", "method", "repair", "target", "alpha", "seed", "device", "example_input",
                 "progress", "width", "refine", "points", "positions_per_image", "repair_options", "refine_options",
                 "heads", "budget", "zip_until", "normalize", "report")
"""Keywords of ``fusion.fuse`` / ``fusion.align``: a method option of one of these names would never reach it."""

METHODS = Registry("method", UnknownMethodError, reserved=CALL_KEYWORDS)


def register_method(name: str, check: Callable[..., None] | None = None) -> Callable:
    """Register a fusion method ``fn(ctx, *, options...) -> MatchResult`` under ``name`` (``check``:
    see :meth:`alignment.registry.Registry.register`)."""
    return METHODS.register(name, check=check)


def list_methods() -> list[str]:
    """Names of the registered fusion methods."""
    return METHODS.names()


def get_method(name: str) -> Callable:
    """The method function registered under ``name``."""
    return METHODS.get(name).fn


MAX_WORKERS = 8
"""The default number of leaf-solve threads is the torch thread count, capped here."""


@dataclass
class MatchContext:
    """What a method may use.

    Attributes:
        models: the source models (never modified).
        graphs: their alignment graphs.
        alpha: interpolation weights (solvers that average units use them: OT barycenters,
            MergeMany rematching). :func:`fusion.align` (and so :func:`fusion.fuse`) matches with
            uniform weights, so that one alignment serves every ``alpha`` of ``build``; a staged
            call with other weights can give other plans.
        statistics: ``statistics(pairs=None)`` returns the activation statistics (collected on first
            call; ``pairs``: see :func:`alignment.statistics.collect`).
        target_graph: the graph of the fused architecture (None: the first model's).
        seed: seed for randomised solvers.
        notes: fallbacks taken so far (see :meth:`note`).
        workers: threads that run leaf solves while the walk prepares the next spaces (default
            ``torch.get_num_threads()``, at most :data:`MAX_WORKERS`: each solve in flight holds its
            cost matrices; the plans do not depend on it, see :class:`alignment.structure.Walk`).
        collect_seconds: wall time spent in :meth:`stats` getting the statistics (collecting them
            on first use); :func:`match` leaves it out of :attr:`MatchResult.seconds`.
    """

    models: Sequence[nn.Module]
    graphs: Sequence[Graph]
    alpha: Sequence[float]
    statistics: Callable[..., Any] | None = None
    target_graph: Graph | None = None
    seed: int = 0
    notes: list[str] = field(default_factory=list)
    workers: int = field(default_factory=lambda: min(torch.get_num_threads(), MAX_WORKERS))
    collect_seconds: float = 0.0

    @property
    def target(self) -> Graph:
        """The fused architecture's graph."""
        return self.target_graph if self.target_graph is not None else self.graphs[0]

    def note(self, message: str) -> None:
        """Record a fallback (the fusion report lists it) and warn once."""
        if message not in self.notes:
            self.notes.append(message)
            warnings.warn(message, FallbackWarning, stacklevel=3)

    def tensors(self) -> list[dict[str, torch.Tensor]]:
        """Every model's parameters and buffers, float64 on the CPU (cached)."""
        if not hasattr(self, "_tensors"):
            # weight-normalised layers as their weights (v = w, g = ||w||)
            self._tensors = [{k: v.detach().double().cpu()
                              for k, v in effective_weights(model_tensors(m), weight_norms(m)).items()}
                             for m in self.models]
        return self._tensors

    def stats(self, anchored: bool = False, anchor: int | None = None):
        """The activation statistics (an error when the method was given no calibration data).

        ``anchored``: the method compares every model only with an anchor model (no rematching
        against the others), so only the products with the anchor are collected (plus every unit's
        variance): ``anchor`` when given, else per space the first model of the target's width;
        spaces where that model does not have the target's width, or no model has, get the joint
        matrix. Matching reads the anchored blocks as a :class:`alignment.structure.BlockGram`.
        """
        if self.statistics is None:
            raise CalibrationError("this method needs activation statistics: give calibration data")
        t0 = time.perf_counter()
        try:
            stats = self.statistics() if not anchored else self.statistics(pairs=self.anchor_pairs(anchor))
        finally:  # (collected on first use: the time of matching leaves it out)
            self.collect_seconds += time.perf_counter() - t0
        # what collection did other than asked (it warned already) goes into the fusion report
        self.notes.extend(m for m in getattr(stats, "notes", ()) if m not in self.notes)
        return stats

    def anchor_pairs(self, anchor: int | None = None) -> Callable[[str], list[tuple[int, int]] | None]:
        """``pairs(space)``: the model pairs ``(anchor, i)`` an anchored method needs (None: all)."""
        def pairs(name: str):
            # the walk anchors a space's leaves on a model of the target's width only (see
            # Walk._leaf): without such a model, matching pools every pair
            want = self.target[name].width if name in self.target else None
            a = anchor
            if a is None:
                a = next((i for i, g in enumerate(self.graphs) if name in g and g[name].width == want), None)
            elif name not in self.graphs[a] or self.graphs[a][name].width != want:
                a = None
            if a is None:
                return None
            return [(a, i) for i in range(len(self.graphs)) if i != a]
        return pairs


@dataclass
class MatchResult:
    """Per-space plans chosen by a method.

    Attributes:
        plans: per model, per space name, a non-negative ``n x n_i`` plan from the model's features
            to the fused ones (see :func:`alignment.maps.plan_maps`): a matrix, or a
            :class:`alignment.structure.RowPlan` where it has one entry per row (one-to-one
            matchings; ``dense_plan`` gives the matrix).
        costs: per space name, a matching score (mean cosine similarity of matched units; higher is
            better; NaN where meaningless).
        notes: fallbacks the method took.
        seconds: wall time of matching (statistics collection excluded).
    """

    plans: list[dict[str, torch.Tensor]]
    costs: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def permutations(self, model: int) -> dict[str, torch.Tensor]:
        """Model ``model``'s plans as index vectors (fused feature ``k`` <- feature ``perm[k]``);
        exact for permutation and selection plans."""
        return {k: plan_argmax(T) for k, T in self.plans[model].items()}


def match(ctx: MatchContext, method: str, **options: Any) -> MatchResult:
    """The match stage: run ``method`` with checked options on ``ctx``.

    The method's result is checked (see :func:`check_result`): a registered method may return plans
    as tensors of any floating dtype, integer or boolean tensors, sparse tensors, numpy arrays or
    nested lists; they come back as dense floating tensors (:class:`alignment.structure.RowPlan`
    plans as they are).

    Raises:
        UnknownMethodError: no such method.
        InvalidOptionError: an unknown option, or a value the option does not allow (with these
            others, or for this many models).
        MethodResultError: the method returned no :class:`MatchResult`, or plans that are missing,
            no matrices, or of shapes other than the fused width by the model's width.
    """
    checked = METHODS.validate(method, options, models=len(ctx.models))
    _require_family(ctx)
    collected = ctx.collect_seconds
    t0 = time.perf_counter()
    result = check_result(ctx, method, METHODS.get(method).fn(ctx, **checked))
    for msg in list(result.notes):  # a method may return notes of its own besides ctx.note's
        ctx.note(msg)
    result.notes = list(ctx.notes)
    result.seconds = time.perf_counter() - t0 - (ctx.collect_seconds - collected)
    return result


def check_result(ctx: MatchContext, method: str, result: Any) -> MatchResult:
    """``result`` of ``method`` on ``ctx`` after checking it: a :class:`MatchResult` with one dict of
    plans per model, holding a plan for every space of the target with parameters (extra plans are
    kept), each an ``n x n_i`` matrix (``n``: the target's width, ``n_i``: the model's) or a
    :class:`alignment.structure.RowPlan`; array-likes are converted by :func:`alignment.maps.as_plan`
    (the plans are replaced in ``result``; a valid tensor or row plan is kept as the same object).

    Raises:
        MethodResultError: naming the method, the model index and the space at fault.
    """
    where = f"method {method!r}"
    if not isinstance(result, MatchResult):
        raise MethodResultError(f"{where} returned a {type(result).__name__}, not an alignment.methods.MatchResult; "
                                f"return MatchResult(plans=[{{space name: plan}} for each model], costs={{...}})")
    plans = result.plans
    if not isinstance(plans, (list, tuple)) or len(plans) != len(ctx.models):
        got = f"{len(plans)} plan dict(s)" if isinstance(plans, (list, tuple)) else f"plans of type {type(plans).__name__}"
        raise MethodResultError(f"{where} returned {got} for {len(ctx.models)} models; MatchResult.plans is a list with "
                                f"one dict (space name -> plan) per model, in the models' order")
    if not isinstance(result.costs, dict) or isinstance(result.notes, str) or not all(
            isinstance(m, str) for m in result.notes):
        raise MethodResultError(f"{where} returned costs of type {type(result.costs).__name__} and notes of type "
                                f"{type(result.notes).__name__}; MatchResult.costs is a dict (space name -> score) "
                                f"and notes a list of strings")
    target = ctx.target
    needed = [s.name for s in target.spaces if s.members]
    out = []
    for i, (p, g) in enumerate(zip(plans, ctx.graphs)):
        if not isinstance(p, dict):
            raise MethodResultError(f"{where} returned a {type(p).__name__} as model {i}'s plans; give a dict (space "
                                    f"name -> n x n_i plan) per model")
        missing = [k for k in needed if k not in p]
        if missing:
            raise MethodResultError(
                f"{where} gave model {i} no plan for space(s) {missing[:4]} ({len(missing)} of {len(needed)} spaces "
                f"with parameters); every such space needs one per model (e.g. torch.eye(width) keeps the model's "
                f"features in their order)")
        q = {}
        for name, T in p.items():
            try:
                T = as_plan(T, f"the plan of space {name!r} for model {i}")
            except SpaceMismatchError as exc:
                raise MethodResultError(f"{where}: {exc}") from None
            if name in needed and name in g:
                want = (target[name].width, g[name].width)
                if tuple(T.shape) != want:
                    raise MethodResultError(
                        f"{where}: the plan of space {name!r} for model {i} has shape {tuple(T.shape)}, expected "
                        f"{want} (the fused width {want[0]} by the model's width {want[1]})")
            q[name] = T
        out.append(q)
    result.plans = out
    return result


# -------------------------------------------------------------------------------------------------
# shared machinery
def _require_same_widths(ctx: MatchContext, method: str) -> None:
    g0 = ctx.graphs[0]
    for g in list(ctx.graphs[1:]) + ([ctx.target_graph] if ctx.target_graph is not None else []):
        for s in g0.spaces:
            if s.name not in g:
                raise SpaceMismatchError(f"{method}: space {s.name!r} missing from a model; models must be of one family")
            if g[s.name].width != s.width:
                raise SpaceMismatchError(
                    f"{method}: space {s.name!r} has widths {s.width} and {g[s.name].width}; {method} needs "
                    f"equal widths (use method='ot', 'merge' or 'permute' for different widths)")


def _model_widths(ctx: MatchContext):
    """``(space, [width in each model that has it])`` for every target space with members."""
    for s in ctx.target.spaces:
        if s.members:
            yield s, [g[s.name].width for g in ctx.graphs if s.name in g]


def _require_family(ctx: MatchContext) -> None:
    """Models and target are of one family: the same spaces (by name, at any widths) and the same
    parameters and buffers (by name). A model with layers the target lacks (a deeper variant) would
    otherwise lose them silently."""
    target = ctx.target
    spaces = {s.name for s in target.spaces if s.members}
    for i, g in enumerate(ctx.graphs):
        missing = [s.name for s in target.spaces if s.members and s.name not in g]
        if missing:
            raise SpaceMismatchError(f"model {i} has no space(s) {missing[:4]} of the target; models and target "
                                     f"must be of one family")
        extra = [s.name for s in g.spaces if s.members and s.name not in spaces]
        tensors = [t for t in g.shapes if t not in target.shapes]
        if extra or tensors:
            what = ", ".join(x for x in (f"space(s) {extra[:4]}" if extra else "",
                                         f"tensor(s) {tensors[:4]}" if tensors else "") if x)
            raise SpaceMismatchError(
                f"model {i} has {what} that the {'target' if ctx.target_graph is not None else 'first model'} "
                f"lacks ({len(extra)} spaces, {len(tensors)} tensors in all): its layers would be dropped. Models "
                f"and target must be of one family (the same layers at any widths); fuse models of one architecture")
        lost = [t for t in target.shapes if t not in g.shapes]
        if lost:
            raise SpaceMismatchError(f"model {i} has no tensor(s) {lost[:4]} of the target; models and target must be "
                                     f"of one family")
        for sp in target.spaces:
            st = g[sp.name].tree if sp.name in g else None
            if isinstance(sp.tree, Heads) and isinstance(st, Heads) and st.count != sp.tree.count:
                raise SpaceMismatchError(f"space {sp.name!r}: model {i} has {st.count} attention heads where the "
                                         f"target has {sp.tree.count}; heads are kept when widths change, so head "
                                         f"counts must agree")
        _require_fixed_sizes(target, g, i)
    check_structures(ctx.graphs, target)  # (every structure tree fits, before any statistics are collected)


def _require_fixed_sizes(target: Graph, g: Graph, i: int) -> None:
    # axes no space runs along (kernels, positions, inputs) cannot be fused at different sizes; the
    # logits are left to the heads check (models trained on other classes keep their own heads)
    output = {(f.tensor, f.axis) for f in target.fixed if f.reason == "model output"}
    for t, shape in target.shapes.items():
        other = g.shapes[t]
        if len(other) != len(shape):
            raise SpaceMismatchError(f"tensor {t!r} has {len(other)} axes in model {i} but {len(shape)} in the target; "
                                     f"models and target must be of one family")
        for ax, ranges in enumerate(target.layout(t)):
            if other[ax] != shape[ax] and (t, ax) not in output and all(name is None for *_, name in ranges):
                raise SpaceMismatchError(
                    f"tensor {t!r} has size {other[ax]} along axis {ax} in model {i} but {shape[ax]} in the target, "
                    f"an axis that is not a feature space (a kernel, positions or inputs); models and target must be "
                    f"of one family (e.g. the same patch size and input size)")


def _check_anchor(ctx: MatchContext, anchor: int | None) -> None:
    if anchor is not None and not 0 <= anchor < len(ctx.models):
        raise InvalidOptionError(f"anchor={anchor!r} is not a model index (0..{len(ctx.models) - 1})")


def _activation_gram(ctx: MatchContext, kind, plans_of, anchored: bool = False,
                     anchor: int | None = None) -> Callable[[str], GramView]:
    """Activation Grams; spaces with no observation point are compared by their weights (noted).
    ``anchored``: only products with the anchor are collected (see :meth:`MatchContext.stats`)."""
    stats = ctx.stats(anchored=anchored, anchor=anchor)
    built: list[Callable[..., GramView]] = []

    def wgram(*args) -> GramView:
        # the models' weights are copied to float64 (ctx.tensors) only when a space needs them: dead
        # or tied units, or no observation point (wide models: gigabytes otherwise)
        if not built:
            built.append(weight_gram(ctx.graphs, ctx.target, ctx.tensors(), plans_of, "distance", ctx.note))
        return built[0](*args)
    tied: set[str] = set()

    def dead_gram(name: str, units: torch.Tensor) -> GramView:
        # units constant on the calibration data are told apart by their weights, which depend on
        # the neighbouring spaces' plans: such spaces are solved again once all are (see _solve)
        tied.add(name)
        return wgram(name, units)

    agram = activation_gram(stats, kind, dead_gram=dead_gram)

    def gram(name: str) -> GramView:
        if name in stats.points:
            return agram(name)
        ctx.note(f"space {name!r} has no activation statistics (no observation point): its units are "
                 f"compared by their weights")
        tied.add(name)  # (weights depend on the neighbours' plans, as for dead units)
        return wgram(name)
    gram.tied = tied
    return gram


_TIED_PASSES = 10
"""The most passes over the spaces compared by weights after a one-pass walk (see :func:`_solve`)."""


def _solve(ctx: MatchContext, leaf_solver, gram_of=None, scores=None, sweeps: int = 1, shuffle: bool = False,
           anchor: int | None = None, merge_heads=None) -> MatchResult:
    """Plans of every space from one walk, or from ``sweeps`` walks of coordinate descent (each space
    solved with its neighbours' newest plans, in random order per sweep when ``shuffle``)."""
    holder: dict[str, Any] = {"walk": None, "prev": {}}

    def plans_of(name):
        # the newest plan of a space: solved in this sweep, else in the last one (Gauss-Seidel)
        w = holder["walk"]
        got = w.planned(name) if w is not None else None
        return got if got is not None else holder["prev"].get(name)

    gram = gram_of(plans_of) if gram_of is not None else None
    gen = torch.Generator().manual_seed(ctx.seed)
    walk = None
    for _ in range(max(1, sweeps)):
        walk = Walk(ctx.graphs, ctx.target, leaf_solver, alpha=ctx.alpha, gram=gram, anchor=anchor,
                    scores=scores, seed=ctx.seed, note=ctx.note, merge_heads=merge_heads, workers=ctx.workers)
        holder["walk"] = walk
        order = walk.order()
        if shuffle:
            order = [order[int(k)] for k in torch.randperm(len(order), generator=gen)]
        new = walk.solve_all(order)
        prev = holder["prev"]
        changed = not prev or any(not all(plans_equal(a, b) for a, b in zip(new[k], prev[k])) for k in new)
        holder["prev"] = dict(new)
        if not changed:
            break
    # spaces whose Gram depended on neighbours' plans not yet solved in a one-pass walk: solved again
    # with every neighbour's plan, until none changes (several such spaces may neighbour each other,
    # e.g. a learned query and the attention projection it feeds)
    tied = getattr(gram, "tied", set())
    if sweeps <= 1 and tied:
        for _ in range(_TIED_PASSES):
            changed = False
            for name in [n for n in walk.order() if n in tied]:
                before = walk.planned(name)
                walk.reset(name)
                walk.solve(name)
                after = walk.planned(name)
                changed |= before is None or not all(plans_equal(a, b) for a, b in zip(before, after))
            if not changed:
                break
    result = MatchResult(plans=[{k: v[i] for k, v in walk.plans.items()} for i in range(len(ctx.models))],
                         costs=dict(walk.costs))
    # the walk's Gram function reads plans through ``holder``, which holds the walk: a cycle that
    # only the cyclic collector would free, keeping every space's Gram (wide models: gigabytes) alive
    holder.clear()
    return result


def _has_batchnorm(graph: Graph, name: str) -> bool:
    return any(m.tensor.endswith("running_mean") for m in graph[name].members)


# -------------------------------------------------------------------------------------------------
# methods
@register_method("average")
def average(ctx: MatchContext) -> MatchResult:
    """Plain weight averaging: every model's features are taken in their own order."""
    _require_same_widths(ctx, "average")
    plans = [{s.name: torch.eye(s.width, dtype=torch.float64) for s in ctx.graphs[0].spaces
              if s.members or s.kind == "heads"}
             for _ in ctx.models]
    return MatchResult(plans=plans, costs={})


def _check_permute(options: dict[str, Any]) -> None:
    if options["iterations"] is not None and options["iterations"] < 0:
        raise InvalidOptionError(f"method 'permute': iterations must be >= 0, got {options['iterations']}")


@register_method("permute", check=_check_permute)
def permute(ctx: MatchContext, *, iterations: int | None = None) -> MatchResult:
    """Hungarian matching of hidden units on the correlation of their activations (Git Re-Basin).

    Every model is matched one-to-one to an anchor (the first model of the target's widths). When
    widths differ from the target's, matching is rectangular: the best-matched units are kept and
    the others dropped (or, fusing narrower models with one of the target's width, fused units
    matched by fewer models average those that match them); with no model of the target width the
    fused units are a barycenter. A target wider than every model is refused (one-to-one matching
    would leave fused units nobody fills): ``method="ot"`` widens.

    Options:
        iterations: MergeMany-style rematching rounds (each model rematched against the mean of the
            matched units; default 0 for two models, 3 for more).
    """
    if iterations is None:
        iterations = 0 if len(ctx.models) <= 2 else 3
    for s, widths in _model_widths(ctx):  # (before any statistics)
        if widths and s.width > max(widths):
            raise SpaceMismatchError(f"space {s.name!r}: permute matches units one-to-one, so the fused width "
                                     f"{s.width} cannot exceed the widest model's {max(widths)}; use method='ot' "
                                     f"to widen")
    leaf = partial(ot_leaf, solver="hungarian", iterations=iterations)
    return _solve(ctx, leaf, lambda plans_of: _activation_gram(ctx, "correlation", plans_of, anchored=iterations == 0))


def _check_weight_matching(options: dict[str, Any]) -> None:
    if options["max_iter"] < 1:
        raise InvalidOptionError(f"method 'weight_matching': max_iter must be >= 1, got {options['max_iter']}")


@register_method("weight_matching", check=_check_weight_matching)
def weight_matching(ctx: MatchContext, *, max_iter: int = 100) -> MatchResult:
    """Git Re-Basin weight matching: coordinate descent over spaces, no data.

    Each space's units are matched (Hungarian) on the inner products of their weight rows, with the
    weights' other axes carried by the current plans of the neighbouring spaces; spaces are visited
    in a random order (``seed``) per sweep until no plan changes.

    Options:
        max_iter: the largest number of sweeps.
    """
    _require_same_widths(ctx, "weight_matching")
    leaf = partial(ot_leaf, solver="hungarian", iterations=0)

    def gram_of(plans_of):
        return weight_gram(ctx.graphs, ctx.target, ctx.tensors(), plans_of, "inner", ctx.note, anchor=0)
    return _solve(ctx, leaf, gram_of, sweeps=max_iter, shuffle=True, anchor=0)


def _check_ot(options: dict[str, Any], *, given: frozenset[str] = frozenset(), models: int | None = None) -> None:
    if not options["reg"] > 0:
        raise InvalidOptionError(f"method 'ot': reg must be > 0, got {options['reg']}")
    sweeps, iterations, anchor = options["sweeps"], options["iterations"], options["anchor"]
    if sweeps < 1 or (iterations is not None and iterations < 0):
        raise InvalidOptionError(f"method 'ot': sweeps must be >= 1 and iterations >= 0 (got {sweeps}, {iterations})")
    if anchor is not None and anchor < 0:
        raise InvalidOptionError(f"method 'ot': anchor={anchor} is not a model index (0 or more)")
    if anchor is not None and models is not None and anchor >= models:
        raise InvalidOptionError(f"method 'ot': anchor={anchor} is not a model index (0..{models - 1} for {models} "
                                 f"model{'s' if models != 1 else ''})")
    # an option given with others that leave it unused is refused, as other options that exclude each
    # other are (target and width, a budget with Sinkhorn plans): accepted, it would do nothing silently
    if "sweeps" in given and options["cost"] != "weights":
        raise InvalidOptionError(f"method 'ot': sweeps={sweeps} has no effect with cost={options['cost']!r} (it "
                                 f"counts the passes of cost='weights', whose spaces depend on each other's plans); "
                                 f"drop sweeps or use cost='weights'")
    if "reg" in given and options["solver"] != "sinkhorn":
        raise InvalidOptionError(f"method 'ot': reg={options['reg']} has no effect with solver={options['solver']!r} "
                                 f"(exact transport has no regularisation); drop reg or use solver='sinkhorn'")


@register_method("ot", check=_check_ot)
def optimal_transport(ctx: MatchContext, *, cost: Literal["auto", "correlation", "distance", "weights"] = "auto",
                      solver: Literal["emd", "sinkhorn"] = "emd", reg: float = 0.01, anchor: int | None = None,
                      iterations: int | None = None, sweeps: int = 5) -> MatchResult:
    """Optimal-transport fusion (OTFusion) for any widths, soft or exact.

    Every model's units are transported onto the target's units with uniform masses; the merge map
    of a fused unit averages what was sent to it, the unmerge map spreads a model unit over where it
    went. The target units are those of an *anchor* model of the target width (the first such model,
    or option ``anchor``); where no model has the target width (compression, or fusion into a new
    width) they are a free-support barycenter of all models' units, seeded by balanced merging.

    Options:
        cost: ``"auto"`` (correlation for spaces with BatchNorm, distance elsewhere; measured on the
            zoo, see benchmarks/results/fuse_widths.md), ``"correlation"`` (one minus activation
            correlation), ``"distance"`` (Euclidean distance between activations) or ``"weights"``
            (between weight vectors; no calibration data needed).
        solver: ``"emd"`` (exact) or ``"sinkhorn"`` (entropic).
        reg: Sinkhorn regularisation relative to the largest cost (> 0); only with
            ``solver="sinkhorn"`` (given with ``"emd"`` it is refused: it would do nothing).
        anchor: index of the anchor model.
        iterations: barycenter iterations (default 0 with an anchor model, else 20).
        sweeps: for ``cost="weights"``, passes over all spaces (each uses the others' last plans);
            given with another cost it is refused (it would do nothing).
    """
    _check_anchor(ctx, anchor)
    leaf = partial(ot_leaf, solver=solver, reg=reg, iterations=iterations)
    if cost == "weights":
        def gram_of(plans_of):
            return weight_gram(ctx.graphs, ctx.target, ctx.tensors(), plans_of, "distance", ctx.note)
        return _solve(ctx, leaf, gram_of, sweeps=sweeps, anchor=anchor)
    g0 = ctx.graphs[0]

    def kind(name: str) -> str:
        if cost != "auto":
            return cost
        # measured on the zoo: BatchNorm spaces match best by correlation (BN rescales units),
        # spaces without it (ViT residual streams, MLPs) by Euclidean distance (scale matters)
        return "correlation" if _has_batchnorm(g0, name) else "distance"
    anchored = iterations is None or iterations == 0  # with no anchor model a space gets the joint matrix
    return _solve(ctx, leaf, lambda plans_of: _activation_gram(ctx, kind, plans_of, anchored, anchor), anchor=anchor)


@register_method("merge")
def correlation_merge(ctx: MatchContext, *, cost: Literal["correlation", "weights"] = "correlation") -> MatchResult:
    """Merge the most correlated features (agglomerative, average linkage) down to the target width.

    Units of every model are pooled and the most similar groups merged first, within one model or
    across models, until the target width remains; a fused unit is the (model-weighted) mean of its
    group. With one model this is compression by merging redundant features.

    Options:
        cost: ``"correlation"`` (activations) or ``"weights"`` (cosine of weight vectors; a space's
            weights depend on its neighbours' plans, so the spaces are solved in up to 5 passes of
            coordinate descent, until no plan changes, as ``ot`` with ``cost="weights"``).
    """
    if cost == "weights":
        def gram_of(plans_of):
            return weight_gram(ctx.graphs, ctx.target, ctx.tensors(), plans_of, "correlation", ctx.note)
        return _solve(ctx, merge_leaf, gram_of, sweeps=5)
    return _solve(ctx, merge_leaf, lambda plans_of: _activation_gram(ctx, "correlation", plans_of))


def _check_zip(options: dict[str, Any]) -> None:
    for name in ("within", "remerge"):
        if not 0.0 <= options[name] <= 1.0:
            raise InvalidOptionError(f"method 'zip': {name} must be in [0, 1], got {options[name]}")


def _check_zip_widths(ctx: MatchContext, within: float) -> None:
    """Fused widths zipping cannot reach, refused before the statistics pass (the leaves check again
    per head and segment)."""
    for s, widths in _model_widths(ctx):
        if s.width > sum(widths):
            raise SpaceMismatchError(f"space {s.name!r}: zipping cannot widen the {sum(widths)} pooled units into "
                                     f"{s.width}; use method='ot' to widen")
        if within == 0 and len(widths) > 1 and s.width < max(widths):
            raise SpaceMismatchError(f"space {s.name!r}: within=0 keeps every fused unit to one unit per model, so the "
                                     f"fused width {s.width} cannot be below the widest model's {max(widths)}; use "
                                     f"within > 0")


@register_method("zip", check=_check_zip)
def zipit(ctx: MatchContext, *, within: float = 1.0, remerge: float = 0.3) -> MatchResult:
    """ZipIt zipping: greedily merge the most correlated pair of features, within or across models.

    The features of all models are pooled per space; the most correlated pair is merged first, then
    the next, until the fused width remains (any width up to the pooled one; with ``budget`` the
    partial-matching widths). A fused feature is the (model-weighted) mean of its group. Attention
    heads are zipped whole first (pooled heads grouped into the head count on their mean matched
    correlation, with the same controls), then the dims of each fused head's member heads.
    Works for any number of models; with one model it compresses by merging.

    Options:
        within: weight of merging two features of one model against merging features of two models
            (their correlation is multiplied by it): 1 treats both alike, 0 forbids merges inside a
            model (every fused feature then takes at most one feature per model). ZipIt's beta plays
            this role as a budget; a weight was measured better on the zoo.
        remerge: how strongly a feature already merged is discouraged from merging again (ZipIt's
            alpha): a merged group's correlation with any other is the smaller of its parts', times
            ``remerge``; 1 is plain complete linkage, 0 lets features merge in pairs first.
    """
    _check_zip_widths(ctx, within)

    def merge_heads(S, sizes, n, where):
        return zip_labels(S, sizes, n, within, remerge, where)
    leaf = partial(zip_leaf, within=within, remerge=remerge)
    return _solve(ctx, leaf, lambda plans_of: _activation_gram(ctx, "correlation", plans_of), merge_heads=merge_heads)


@register_method("magnitude")
def magnitude_pruning(ctx: MatchContext) -> MatchResult:
    """Structured magnitude pruning of one model: keep the units of largest L1 weight norm.

    The baseline for compression. A unit's score sums the L1 norms of its rows in every weight matrix
    that produces the space (every conv or linear writing to a residual stream). Needs no data.
    """
    if len(ctx.models) != 1:
        raise SpaceMismatchError(f"magnitude pruning compresses one model, got {len(ctx.models)}; "
                                 f"use method='ot' or 'merge' to fuse several")
    tensors, g = ctx.tensors()[0], ctx.graphs[0]
    return _solve(ctx, magnitude_leaf, scores=lambda name: magnitude_scores(g, tensors, name))
