"""Building fused models: maps engine, resizing, repair, data, zoo, evaluation, API and CLI."""

from alignment.solvers import list_methods, register_method

from .api import Alignment, FusionReport, align, fuse

__all__ = ["fuse", "align", "Alignment", "FusionReport", "list_methods", "register_method"]
