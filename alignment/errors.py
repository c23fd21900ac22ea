"""Exception and warning types raised by the toolkit.

Every error a user can cause has its own type, derived from :class:`FusionError`; the message names
the module, op, space or option at fault and says what the user can do about it. Warnings derive
from :class:`FusionWarning`.
"""

from __future__ import annotations

__all__ = [
    "FusionError", "FusionWarning", "FallbackWarning", "DiscoveryError", "ExportError",
    "UnfollowableOpError", "PermutationError", "SpaceMismatchError", "InvalidOptionError",
    "UnknownNameError", "CalibrationError", "MethodResultError",
]


class FusionError(Exception):
    """Base class of every error raised on purpose by this toolkit."""


class FusionWarning(UserWarning):
    """Base class of every warning issued by this toolkit."""


class FallbackWarning(FusionWarning):
    """A stage did something other than asked (recorded in the fusion report as well)."""


class DiscoveryError(FusionError):
    """Alignment spaces could not be discovered for a model."""


class ExportError(DiscoveryError):
    """``torch.export`` could not capture the model's forward pass."""


class UnfollowableOpError(DiscoveryError):
    """An op mixes hidden features in a way discovery cannot follow.

    Attributes:
        op: the ATen op (e.g. ``"aten.cumsum"``).
        module: dotted path of the module the op ran in ('' for the root module).
    """

    def __init__(self, message: str, op: str = "", module: str = ""):
        super().__init__(message)
        self.op = op
        self.module = module


class PermutationError(FusionError, ValueError):
    """A permutation (or map) given for a space is not valid for it."""


class SpaceMismatchError(FusionError, ValueError):
    """The spaces of two models (or a model and a graph) do not correspond."""


class InvalidOptionError(FusionError, ValueError, TypeError):
    """An option of a method, repair or refinement is unknown or has a value it does not allow."""


class UnknownNameError(FusionError, KeyError):
    """No method, repair or refinement is registered under the given name."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class CalibrationError(FusionError, ValueError):
    """Calibration data is missing or unusable."""


class MethodResultError(SpaceMismatchError, TypeError):
    """A fusion method returned something other than a :class:`~alignment.methods.MatchResult` with
    one plan (an ``n x n_i`` matrix) per model for every space that needs one."""
