"""Finding correspondences between hidden units: alignment spaces, statistics and solvers."""

from ._rules import register_op_kind, register_op_rule
from .discover import discover, discover_all
from .errors import (
    CalibrationError,
    DiscoveryError,
    ExportError,
    FallbackWarning,
    FusionError,
    FusionWarning,
    InvalidOptionError,
    MethodResultError,
    PermutationError,
    SpaceMismatchError,
    UnfollowableOpError,
    UnknownNameError,
)
from .graph import FixedAxis, Graph, Member, Observation, Space
from .methods import MatchContext, MatchResult, list_methods, match, register_method
from .permute import permute, permute_state

__all__ = [
    "discover", "discover_all", "permute", "permute_state", "register_op_rule", "register_op_kind",
    "Graph", "Space", "Member", "FixedAxis", "Observation",
    "match", "MatchContext", "MatchResult", "list_methods", "register_method",
    "FusionError", "FusionWarning", "FallbackWarning", "DiscoveryError", "ExportError", "UnfollowableOpError",
    "PermutationError", "SpaceMismatchError", "InvalidOptionError", "UnknownNameError", "CalibrationError",
    "MethodResultError",
]
