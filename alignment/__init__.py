"""Finding correspondences between hidden units: alignment spaces, statistics and solvers."""

from ._rules import register_op_kind, register_op_rule
from .discover import discover
from .errors import (
    DiscoveryError,
    ExportError,
    FusionError,
    PermutationError,
    SpaceMismatchError,
    UnfollowableOpError,
)
from .graph import FixedAxis, Graph, Member, Observation, Space
from .permute import permute, permute_state

__all__ = [
    "discover", "permute", "permute_state", "register_op_rule", "register_op_kind",
    "Graph", "Space", "Member", "FixedAxis", "Observation",
    "FusionError", "DiscoveryError", "ExportError", "UnfollowableOpError", "PermutationError", "SpaceMismatchError",
]
