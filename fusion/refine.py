"""Refinement: the stage between applying maps and norm repair (a registry, like methods).

A refinement improves the fused weights on calibration data, e.g. layer-by-layer least squares
(PLeaS). It receives the same :class:`~fusion.repair.RepairContext` as a repair (the fused model,
the sources, their graphs, the maps, the weights and the data) and changes ``ctx.fused`` in place.
Only ``"none"`` is registered so far.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from alignment.errors import UnknownNameError
from alignment.registry import Registry

from .repair import RepairContext

__all__ = ["REFINEMENTS", "UnknownRefinementError", "register_refinement", "run_refinement"]


class UnknownRefinementError(UnknownNameError, ValueError):
    """No refinement is registered under the given name."""


REFINEMENTS = Registry("refinement", UnknownRefinementError)


def register_refinement(name: str) -> Callable:
    """Register a refinement ``fn(ctx: RepairContext, *, options...)`` (modifies ``ctx.fused``)."""
    return REFINEMENTS.register(name)


def run_refinement(name: str, ctx: RepairContext, **options: Any) -> nn.Module:
    """The refine stage: run refinement ``name`` with checked options; returns ``ctx.fused``."""
    REFINEMENTS.call(name, ctx, options)
    return ctx.fused


@register_refinement("none")
def _none(ctx: RepairContext) -> None:
    """No refinement."""
