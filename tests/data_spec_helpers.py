"""Dataset functions that tests name in ``module:function`` dataset specs."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["split_tensors", "loader", "formatted", "not_a_dataset", "noise28", "rgb_test28", "inputs_loader",
           "two_resnets"]


def split_tensors(split: str = "train") -> TensorDataset:
    """Six 1x4x4 images per split (train: labels 0, 1, 2, 0, 1, 2; test: constant images of 7s)."""
    n = 6
    value = 1.0 if split == "train" else 7.0
    return TensorDataset(torch.full((n, 1, 4, 4), value), torch.arange(n) % 3)


def loader() -> DataLoader:
    """A DataLoader of dict batches (``pixel_values``/``labels``), ten examples in batches of four."""
    items = [{"pixel_values": torch.full((1, 2, 2), float(i)), "labels": i % 2} for i in range(10)]
    return DataLoader(items, batch_size=4)


def formatted(split: str, image_size=None, mean=None, std=None, channels=None) -> TensorDataset:
    """Records the format arguments it was called with in its (single) image."""
    x = torch.tensor([[[0.0 if image_size is None else float(image_size[0]),
                        0.0 if mean is None else float(mean[0]),
                        0.0 if std is None else float(std[0]),
                        0.0 if channels is None else float(channels)]]])
    return TensorDataset(x[None], torch.tensor([1 if split == "test" else 0]))


def not_a_dataset(split: str = "train") -> list[int]:
    """Returns something that is neither a Dataset nor a DataLoader."""
    return [1, 2, 3]


def noise28(split: str = "train") -> TensorDataset:
    """Forty random 1x28x28 images (a different draw per split), labels 0..9."""
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    return TensorDataset(torch.randn(40, 1, 28, 28, generator=g), torch.arange(40) % 10)


def rgb_test28(split: str = "train") -> TensorDataset:
    """:func:`noise28`, but the test split's images have 3 channels (for 1-channel models)."""
    x, y = noise28(split).tensors
    return TensorDataset(x.expand(-1, 3, -1, -1).contiguous() if split == "test" else x, y)


def inputs_loader(split: str = "train") -> DataLoader:
    """A DataLoader of the images of :func:`noise28` alone (no labels), in batches of eight."""
    return DataLoader(noise28(split).tensors[0], batch_size=8)


def two_resnets():
    """Two tiny timm ResNets with the constructor spec that rebuilds them (``module:function`` models)."""
    import timm

    arch = {"library": "timm", "name": "resnet18",
            "kwargs": {"in_chans": 1, "channels": [8, 16, 32, 64], "stem_width": 8}}
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        out.append((timm.create_model("resnet18", pretrained=False, num_classes=10, **arch["kwargs"]).eval(), arch))
    return out
