"""Tiny random-init models of every architecture family the tests cover."""

from __future__ import annotations

import timm
import torch
import transformers
from torch import nn


class TinyMLP(nn.Module):
    """A plain MLP on flattened 8x8 images."""

    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(64, width)
        self.fc2 = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.fc3 = nn.Linear(width, classes)

    def forward(self, x):
        x = x.flatten(1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x)) + x  # residual
        return self.fc3(self.norm(x))


class TinyCNN(nn.Module):
    """A CNN with a residual add, a channel concat and a raw nn.Parameter used with F.linear."""

    def __init__(self, c: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(c)
        self.a = nn.Conv2d(c, c, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(c)
        self.b = nn.Conv2d(c, c // 2, 1)
        self.c2 = nn.Conv2d(c, c // 2, 3, padding=1)
        self.mix = nn.Conv2d(c, 2 * c, 1)
        self.dw = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.gamma = nn.Parameter(torch.ones(2 * c))
        self.proj = nn.Parameter(torch.randn(2 * c, 2 * c) * 0.2)
        self.head = nn.Linear(2 * c, classes)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = x + torch.relu(self.bn_a(self.a(x)))  # residual add
        x = torch.cat([self.b(x), self.c2(x)], dim=1)  # concat of two branches
        x = torch.relu(self.mix(x))
        x = self.dw(x) * self.gamma.view(1, -1, 1, 1)
        x = x.mean(dim=(2, 3))
        x = nn.functional.linear(x, self.proj)
        return self.head(torch.relu(x))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb every float parameter and buffer so no axis is trivially symmetric (in place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            if n.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.add_(torch.randn(t.shape, generator=g) * 0.1)
    return model


def timm_resnet18(channels=(16, 32, 64, 128)):
    return timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1,
                             channels=channels, stem_width=channels[0])


def timm_vit(embed_dim=64, heads=4):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=28,
                             patch_size=7, embed_dim=embed_dim, depth=2, num_heads=heads, in_chans=1)


def hf_vit(hidden=64, heads=4):
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads, intermediate_size=2 * hidden,
        image_size=28, patch_size=7, num_channels=1, num_labels=10))


BUILDERS = {
    "timm_resnet18": (timm_resnet18, (2, 1, 28, 28)),
    "timm_resnet50": (lambda: timm.create_model("resnet50", pretrained=False, num_classes=10, in_chans=1),
                      (2, 1, 32, 32)),
    "timm_vit": (timm_vit, (2, 1, 28, 28)),
    "hf_vit": (hf_vit, (2, 1, 28, 28)),
    "hf_resnet": (lambda: transformers.ResNetForImageClassification(transformers.ResNetConfig(
        num_channels=1, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10,
        layer_type="bottleneck")), (2, 1, 32, 32)),
    "mlp": (TinyMLP, (2, 1, 8, 8)),
    "cnn": (TinyCNN, (2, 1, 12, 12)),
}

NAMES = list(BUILDERS)


def build(name: str, seed: int = 0):
    """(randomised model in eval mode, example input) for a family name."""
    torch.manual_seed(seed)
    fn, shape = BUILDERS[name]
    m = randomize(fn().eval(), seed)
    return m, torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1))


def logits(y):
    """Logits of a timm or HF model output."""
    return getattr(y, "logits", y)
