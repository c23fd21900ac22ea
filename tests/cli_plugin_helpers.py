"""A user's plugin module for the command-line tests: importing it registers a method, a repair and a
refinement (as a researcher's own module would), and it gives ``module:function`` models and data.

Tests import it only through the command line (``fusion --import tests.cli_plugin_helpers``, or a
``tests.cli_plugin_helpers:FUNCTION`` MODELS or ``--data`` spec) under the ``cli_plugin`` fixture of
``tests/test_cli.py``, which removes the registrations and the module afterwards.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from alignment.methods import get_method, register_method
from fusion.refine import register_refinement
from fusion.repair import register_repair

__all__ = ["METHOD", "REPAIR", "REFINEMENT", "CALLS", "VIT_ARCH", "two_vits", "noise28"]

METHOD, REPAIR, REFINEMENT = "cli_test_perm", "cli_test_repair", "cli_test_refine"

CALLS: list[tuple[str, object]] = []
"""``(what, option value)`` for every call of the registered functions, in order."""

VIT_ARCH = {"library": "timm", "name": "vit_tiny_patch16_224",
            "kwargs": {"img_size": 28, "patch_size": 7, "embed_dim": 32, "depth": 1, "num_heads": 2, "in_chans": 1}}
"""A tiny timm ViT (28x28 one-channel images) and the constructor spec that rebuilds it."""


@register_method(METHOD)
def cli_test_perm(ctx, *, flip: bool = False):
    """Activation matching (permute) under a user's name."""
    CALLS.append(("method", flip))
    return get_method("permute")(ctx)


@register_repair(REPAIR)
def cli_test_repair(ctx, *, strength: float = 1.0) -> None:
    """Records its option; changes nothing."""
    CALLS.append(("repair", strength))


@register_refinement(REFINEMENT)
def cli_test_refine(ctx, *, scale: float = 1.0) -> None:
    """Records its option; changes nothing."""
    CALLS.append(("refine", scale))


def two_vits():
    """Two tiny timm ViTs from different seeds, with their constructor spec."""
    from fusion.io import build_model

    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        out.append((build_model(VIT_ARCH, 10).eval(), VIT_ARCH))
    return out


def noise28(split: str = "train") -> TensorDataset:
    """Twenty-four random 1x28x28 images (a different draw per split), labels 0..9."""
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    return TensorDataset(torch.randn(24, 1, 28, 28, generator=g), torch.arange(24) % 10)
