"""Exception types raised by the toolkit.

Every error a user can cause has its own type; the message names the module, op or space at fault
and says what the user can do about it.
"""

from __future__ import annotations


class FusionError(Exception):
    """Base class of every error raised on purpose by this toolkit."""


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
