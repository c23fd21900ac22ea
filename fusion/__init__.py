"""Building fused models: the pipeline's apply, refine and repair stages, resizing, saving, the API and CLI."""

from alignment.methods import list_methods, register_method

from .api import Alignment, FusionReport, align, fuse
from .refine import register_refinement
from .repair import register_repair

__all__ = ["fuse", "align", "Alignment", "FusionReport", "list_methods", "register_method", "register_repair",
           "register_refinement"]
