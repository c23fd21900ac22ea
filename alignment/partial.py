"""Partial matching under a size budget (the first half of PLeaS, Nasery et al.).

Full matching merges every fused unit from one unit of each model. Partial matching merges only the
best-matched units and keeps the others from each model side by side, so a space's fused width lies
between the widest model's and the sum of the models' widths, and the fused model is between a
merge and an ensemble.

Allocation (greedy on matching quality per parameter, no solver): every merged unit ``k`` of every
plain space has a quality ``q_k``, the mean correlation of the model units merged into it; splitting
it back into its members (one unit per model for a matching; any group for zipping, whose groups may
hold several units of one model or none) gains ``1 - q_k`` and costs the parameters that the extra units add
(measured exactly at the current widths: a unit of a space widens every tensor axis in that space).
Units are split in order of ``(1 - q_k) / base cost`` while the fused model's parameter count stays
within ``budget`` times the fully matched model's (or, with ``{"flops": x}``, its multiply-adds:
each tensor's parameters weighed by how often the forward pass uses them per image). ``budget=1`` is ordinary matching; a budget large
enough splits every unit, and a BatchNorm network then computes the models' averaged logits exactly.

Spaces structured in heads or concatenation segments (attention, concatenated branches) stay fully
matched (:class:`PartialPlan` lists them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .errors import InvalidOptionError
from .graph import Graph, module_of
from .runner import modes
from .structure import Leaf, dense_plan

__all__ = ["PartialPlan", "partial_plans", "parameter_count", "check_budget", "tensor_uses", "MEASURES"]


MEASURES = ("params", "flops")


def check_budget(budget: object) -> tuple[float, str]:
    """``(factor, measure)`` of a budget: a number >= 1 (parameters), or ``{"params": x}`` or
    ``{"flops": x}``; anything else raises :class:`InvalidOptionError`."""
    measure = "params"
    value = budget
    if isinstance(budget, dict):
        if len(budget) != 1 or next(iter(budget)) not in MEASURES:
            raise InvalidOptionError(f"budget={budget!r}: give a number, or one of {{'params': x}}, {{'flops': x}}")
        measure, value = next(iter(budget.items()))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 1:
        raise InvalidOptionError(f"budget={budget!r} must be a number >= 1 (the fused model's {measure} over the "
                                 f"fully matched model's; 1: ordinary matching)")
    return float(value), measure


@dataclass
class PartialPlan:
    """The outcome of partial matching.

    Attributes:
        plans: per model, per space, the new plan (split units appended after the merged ones).
        widths: per space, the fused width.
        split: per space, how many merged units were split into one unit per model.
        parameters: fused parameter count, and the fully matched model's (``(fused, base)``).
        fully_matched: spaces kept fully matched because of their structure.
    """

    plans: list[dict[str, torch.Tensor]]
    widths: dict[str, int]
    split: dict[str, int] = field(default_factory=dict)
    parameters: tuple[int, int] = (0, 0)
    fully_matched: list[str] = field(default_factory=list)


def _axis_sizes(graph: Graph, widths: dict[str, int],
                buffers: bool = True) -> dict[str, list[list[tuple[int, str | None]]]]:
    """Per tensor and axis, its pieces as ``(fixed size or 0, space or None)``; buffers left out
    unless ``buffers``."""
    out = {}
    for t in graph.shapes:
        if buffers or t not in graph.buffers:
            out[t] = [[(b - a if sp is None else 0, sp) for a, b, sp in axis] for axis in graph.layout(t)]
    return out


def parameter_count(graph: Graph, widths: dict[str, int], uses: dict[str, int] | None = None,
                    buffers: bool = False) -> int:
    """Parameters of ``graph``'s model with each space at ``widths[space]`` (default: its width),
    buffers too with ``buffers``; with ``uses`` (tensor -> weight per element, e.g. multiply-adds
    per image: a convolution's output positions), the weighted sum instead."""
    total = 0
    for t, axes in _axis_sizes(graph, widths, buffers).items():
        n = 1
        for pieces in axes:
            n *= sum(size if sp is None else widths.get(sp, graph[sp].width) for size, sp in pieces)
        total += n * (uses.get(t, 1) if uses else 1)
    return total


def _marginal(graph: Graph, axes_of: dict, space: str, widths: dict[str, int], uses: dict[str, int] | None) -> int:
    """Parameters (or multiply-adds) added by one more unit in ``space`` at the current widths."""
    add = 0
    for t, axes in axes_of[space]:
        sizes = [sum(size if sp is None else widths[sp] for size, sp in pieces) for pieces in axes]
        grown = [sum(size if sp is None else widths[sp] + (sp == space) * 1 for size, sp in pieces) for pieces in axes]
        add += (math.prod(grown) - math.prod(sizes)) * (uses.get(t, 1) if uses else 1)
    return add


def partial_plans(graph: Graph, plans: Sequence[dict[str, torch.Tensor]], quality: dict[str, torch.Tensor],
                  budget: float | dict, uses: dict[str, int] | None = None) -> PartialPlan:
    """Split the worst-matched units of plain spaces until the parameter budget is spent.

    Args:
        graph: the fused (fully matched) model's graph.
        plans: per model, per space, a 0/1 plan (a matching, or the groups of a zipping: every
            model unit in exactly one fused unit).
        quality: per space, each fused unit's matching quality (higher: better matched).
        budget: the fused parameter count allowed, relative to the fully matched model's (a number
            or ``{"params": x}``), or its multiply-adds (``{"flops": x}``, which needs ``uses``).
        uses: for a FLOPs budget, per tensor, the multiply-adds per element and image (a conv
            weight's output positions; see :func:`tensor_uses`).

    Returns:
        A :class:`PartialPlan` (``parameters`` counts multiply-adds for a FLOPs budget).
    """
    budget, measure = check_budget(budget)
    plans = [{k: dense_plan(T) for k, T in p.items()} for p in plans]
    for p in plans:
        for k, T in p.items():
            if T.numel() and bool(((T > 0).sum(0) > 1).any()):
                raise InvalidOptionError(
                    f"budget (partial matching) needs plans that put every unit in one fused unit (permute, "
                    f"weight_matching, exact ot, merge, zip); space {k!r} has units split over several fused units "
                    f"(soft transport, e.g. solver='sinkhorn')")
    if measure == "flops" and uses is None:
        raise InvalidOptionError("a FLOPs budget needs the tensors' uses per image (tensor_uses)")
    uses = uses if measure == "flops" else None
    widths = {s.name: s.width for s in graph.spaces}
    # a parameter budget counts parameters; multiply-adds count the norms' buffers too (each is
    # applied at every position)
    buffers = measure == "flops"
    base = parameter_count(graph, widths, uses, buffers)
    allowance = (budget - 1.0) * base
    eligible, fixed = [], []
    for s in graph.spaces:
        if not s.members or s.kind != "features":
            continue
        if isinstance(s.tree, Leaf) and s.name in quality:
            eligible.append(s.name)
        else:
            fixed.append(s.name)
    axes_of: dict[str, list] = {s: [] for s in eligible}
    for t, axes in _axis_sizes(graph, widths, buffers).items():
        touched = {sp for pieces in axes for _, sp in pieces if sp is not None}
        for s in touched & set(axes_of):
            axes_of[s].append((t, axes))
    # a split unit becomes one unit per member: ``extra[s][k]`` more units
    extra = {s: sum((p[s] > 0).sum(1) for p in plans) - 1 for s in eligible}
    unit = {s: max(_marginal(graph, axes_of, s, widths, uses), 1) for s in eligible}
    candidates = sorted(((1.0 - float(q), unit[s] * int(extra[s][k]), s, k) for s in eligible
                         for k, q in enumerate(quality[s]) if extra[s][k] > 0), key=lambda c: -c[0] / c[1])
    chosen: dict[str, list[int]] = {s: [] for s in eligible}
    spent = 0
    for gain, _, s, k in candidates:
        if allowance <= 0:
            break
        if gain <= 0:
            continue
        cost = 0
        more = int(extra[s][k])
        for _ in range(more):
            cost += _marginal(graph, axes_of, s, widths, uses)
            widths[s] += 1
        if spent + cost > allowance:
            widths[s] -= more
            continue
        spent += cost
        chosen[s].append(k)
    new_plans = [dict(p) for p in plans]
    for s, ks in chosen.items():
        if not ks:
            continue
        keep = [k for k in range(graph[s].width) if k not in set(ks)]
        # split unit k: a row per member (model j's unit c alone; other models send nothing there),
        # model by model
        members = [(j, k, c) for j, p in enumerate(plans) for k in ks for c in torch.nonzero(p[s][k] > 0).flatten().tolist()]
        for i, p in enumerate(plans):
            T = p[s]
            rows = torch.zeros(len(members), T.shape[1], dtype=T.dtype)
            for r, (j, k, c) in enumerate(members):
                if j == i:
                    rows[r, c] = T[k, c]
            new_plans[i][s] = torch.cat([T[keep], rows], 0)
    return PartialPlan(new_plans, widths, {s: len(ks) for s, ks in chosen.items() if ks},
                       (parameter_count(graph, widths, uses, buffers), base), fixed)


def tensor_uses(model: torch.nn.Module, graph: Graph, example_input: torch.Tensor) -> dict[str, int]:
    """Per tensor of ``graph``, how many times each of its elements is used per image in a forward
    pass: the output positions of the module owning it (a conv's output pixels, a token-wise
    linear's tokens; 1 for a linear layer on pooled features), from one pass on ``example_input``."""
    positions: dict[str, int] = {}
    hooks = []
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 1:
            def hook(m, args, out, name=name):
                if isinstance(out, torch.Tensor) and out.dim() >= 1 and m.weight.shape[0] > 0:
                    positions.setdefault(name, max(1, out.numel() // (out.shape[0] * m.weight.shape[0])))
            hooks.append(mod.register_forward_hook(hook))
    try:
        with modes([model]), torch.no_grad():
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
    return {t: positions.get(module_of(t), 1) for t in graph.shapes}
