"""Training loop reproducing the zoo's recipe.

The recipe (see the zoo's README): inputs already normalised; batch 256; random
horizontal flip and a random shift of up to 2 pixels (``torch.roll``); ResNets use
SGD with Nesterov momentum 0.9, weight decay 5e-4 and a one-cycle learning rate
peaking at 0.1 with 20% warm-up; ViTs use AdamW with weight decay 0.05, a one-cycle
learning rate peaking at 2e-3 and label smoothing 0.1. Seeds are set with
``torch.manual_seed`` and ``numpy.random.seed``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from alignment.errors import FusionError
from alignment.runner import model_device

from .data import dataset_tensors
from .evaluate import extract_logits

__all__ = [
    "TrainRecipe",
    "RESNET_RECIPE",
    "VIT_RECIPE",
    "RECIPES",
    "TrainingError",
    "RecipeError",
    "TrainingDivergedError",
    "TrainResult",
    "get_recipe",
    "recipe_for_arch",
    "augment_batch",
    "train_model",
]


class TrainingError(FusionError):
    """Base class of the errors raised by :mod:`fusion.experiments.train`."""


class RecipeError(TrainingError, ValueError):
    """A recipe, or a setting of a training run (epochs, data, parameters), that cannot be used."""


class TrainingDivergedError(TrainingError, RuntimeError):
    """The training loss became NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class TrainRecipe:
    """Optimisation settings of a training run.

    Attributes:
        optimizer: ``"sgd"`` (with ``momentum``/``nesterov``) or ``"adamw"``.
        lr: Peak learning rate of the one-cycle schedule.
        weight_decay: Weight decay.
        momentum: SGD momentum (ignored by AdamW).
        nesterov: Use Nesterov momentum with SGD.
        label_smoothing: Label smoothing of the cross-entropy loss.
        batch_size: Examples per step.
        warmup_fraction: Fraction of the steps spent raising the learning rate.
        flip: Random horizontal flips.
        max_shift: Largest random shift, in pixels, along each axis (0 disables).
    """

    optimizer: str
    lr: float
    weight_decay: float
    momentum: float = 0.9
    nesterov: bool = True
    label_smoothing: float = 0.0
    batch_size: int = 256
    warmup_fraction: float = 0.2
    flip: bool = True
    max_shift: int = 2

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise RecipeError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}.")
        if not self.lr > 0:
            raise RecipeError(f"lr must be positive, got {self.lr}.")
        if self.batch_size <= 0:
            raise RecipeError(f"batch_size must be positive, got {self.batch_size}.")
        if not 0.0 < self.warmup_fraction < 1.0:
            raise RecipeError(f"warmup_fraction must be in (0, 1), got {self.warmup_fraction}.")
        if self.max_shift < 0:
            raise RecipeError(f"max_shift must be >= 0, got {self.max_shift}.")


RESNET_RECIPE = TrainRecipe(optimizer="sgd", lr=0.1, weight_decay=5e-4, momentum=0.9, nesterov=True)
"""The zoo's ResNet recipe."""

VIT_RECIPE = TrainRecipe(optimizer="adamw", lr=2e-3, weight_decay=0.05, label_smoothing=0.1)
"""The zoo's ViT recipe."""

RECIPES: dict[str, TrainRecipe] = {"resnet": RESNET_RECIPE, "vit": VIT_RECIPE}
"""Named recipes accepted by :func:`get_recipe`."""


def get_recipe(recipe: TrainRecipe | str | Mapping[str, Any]) -> TrainRecipe:
    """Resolves a recipe given as an object, a name or a dictionary.

    Args:
        recipe: A :class:`TrainRecipe`; a name in :data:`RECIPES` (``"resnet"``,
            ``"vit"``); or a mapping of :class:`TrainRecipe` fields, optionally with
            ``"base"`` naming the recipe whose other fields it overrides.

    Returns:
        The recipe.

    Raises:
        RecipeError: For an unknown name or field, or a value of the wrong type.
    """
    if isinstance(recipe, TrainRecipe):
        return recipe
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise RecipeError(f"Unknown recipe {recipe!r}; known recipes: {', '.join(RECIPES)}.")
        return RECIPES[recipe]
    if isinstance(recipe, Mapping):
        fields = dict(recipe)
        base = fields.pop("base", None)
        names = {f.name for f in dataclasses.fields(TrainRecipe)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise RecipeError(f"Unknown recipe fields {unknown}; valid fields: {sorted(names)}.")
        if base is not None:
            return dataclasses.replace(get_recipe(base), **fields)
        return TrainRecipe(**fields)
    raise RecipeError(f"recipe must be a TrainRecipe, a name or a mapping, got {type(recipe).__name__}.")


def recipe_for_arch(arch: Mapping[str, Any]) -> TrainRecipe:
    """Picks the zoo recipe for an architecture spec.

    Args:
        arch: ``{"library", "name", "kwargs"}`` spec as in the zoo manifest.

    Returns:
        :data:`VIT_RECIPE` for vision transformers (``"vit"`` in the model name),
        :data:`RESNET_RECIPE` otherwise.
    """
    return VIT_RECIPE if "vit" in str(arch.get("name", "")).lower() else RESNET_RECIPE


def augment_batch(
    images: torch.Tensor, generator: torch.Generator, flip: bool = True, max_shift: int = 2
) -> torch.Tensor:
    """Random horizontal flip and random circular shift (``torch.roll``) per image.

    Args:
        images: Batch ``B x C x H x W`` (not modified).
        generator: CPU generator drawing the random choices.
        flip: Flip each image left-right with probability 1/2.
        max_shift: Shift each image by a uniform integer in ``[-max_shift, max_shift]``
            along each spatial axis, wrapping around.

    Returns:
        The augmented batch (a new tensor).
    """
    out = images.clone()
    b = out.shape[0]
    if flip:
        mask = (torch.rand(b, generator=generator) < 0.5).to(out.device)
        out[mask] = out[mask].flip(-1)
    if max_shift > 0:
        shifts = torch.randint(-max_shift, max_shift + 1, (b, 2), generator=generator).to(out.device)
        h, w = out.shape[-2:]
        # Per-image torch.roll(image, (dy, dx), dims=(-2, -1)), vectorised: out[i] = in[(i - dy) % h].
        rows = (torch.arange(h, device=out.device)[None, :] - shifts[:, :1]) % h
        cols = (torch.arange(w, device=out.device)[None, :] - shifts[:, 1:]) % w
        out = out.gather(-2, rows[:, None, :, None].expand_as(out))
        out = out.gather(-1, cols[:, None, None, :].expand_as(out))
    return out


@dataclasses.dataclass
class TrainResult:
    """Summary of a training run.

    Attributes:
        epoch_loss: Mean training loss of each epoch (on augmented batches).
        epoch_accuracy: Training accuracy of each epoch (on augmented batches).
        steps: Optimiser steps taken.
        seconds: Wall-clock training time.
    """

    epoch_loss: list[float]
    epoch_accuracy: list[float]
    steps: int
    seconds: float


def _make_optimizer(model: nn.Module, recipe: TrainRecipe) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RecipeError("The model has no trainable parameters.")
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=recipe.lr,
            momentum=recipe.momentum,
            nesterov=recipe.nesterov and recipe.momentum > 0,
            weight_decay=recipe.weight_decay,
        )
    return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)


def train_model(
    model: nn.Module,
    train_data: Dataset,
    recipe: TrainRecipe | str | Mapping[str, Any],
    epochs: int,
    seed: int,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> TrainResult:
    """Trains a model in place with the zoo's recipe.

    Unlike the evaluation and fusion functions, this one is meant to change the
    model: its weights are trained in place, it is moved to ``device`` if one is
    given, and it is left in eval mode. Build the model after seeding (e.g.
    ``torch.manual_seed(seed)``) for a reproducible initialisation; this function
    re-seeds ``torch`` and ``numpy`` with ``seed`` before the first step.

    Args:
        model: The model to train.
        train_data: Dataset of (normalised input, label) pairs; labels index the
            model's head.
        recipe: A :class:`TrainRecipe`, ``"resnet"``/``"vit"``, or a mapping (see
            :func:`get_recipe`).
        epochs: Number of passes over ``train_data``.
        seed: Seed of the shuffling, augmentation and any randomness in the model.
        device: Where to train; ``None`` keeps the model's current device.
        progress: Show a tqdm progress bar.

    Returns:
        A :class:`TrainResult` with per-epoch loss and accuracy.

    Raises:
        RecipeError: If ``epochs`` is not positive or the data is empty.
        TrainingDivergedError: If the loss becomes NaN or infinite.
    """
    from tqdm.auto import tqdm

    recipe = get_recipe(recipe)
    epochs = int(epochs)
    if epochs <= 0:
        raise RecipeError(f"epochs must be positive, got {epochs}.")
    x_all, y_all = dataset_tensors(train_data)
    n = len(y_all)
    if n == 0:
        raise RecipeError("train_data is empty.")
    y_all = y_all.to(torch.int64)

    torch.manual_seed(int(seed))
    np.random.seed(int(seed) % 2**32)
    generator = torch.Generator().manual_seed(int(seed))

    target = model_device(model) if device is None else torch.device(device)
    model.to(target)
    optimizer = _make_optimizer(model, recipe)
    starts = list(range(0, n, recipe.batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()  # a lone last example would break BatchNorm; fold it into the previous batch
    bounds = list(zip(starts, starts[1:] + [n]))
    steps_per_epoch = len(bounds)
    total_steps = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=recipe.lr,
        total_steps=total_steps,
        pct_start=recipe.warmup_fraction,
        cycle_momentum=False,
    )

    epoch_loss: list[float] = []
    epoch_accuracy: list[float] = []
    steps = 0
    start = time.perf_counter()
    bar = tqdm(total=total_steps, disable=not progress, desc="train", leave=False)
    model.train()
    try:
        for epoch in range(epochs):
            order = torch.randperm(n, generator=generator)
            loss_sum, correct, seen = 0.0, 0, 0
            for first, last in bounds:
                index = order[first:last]
                x = augment_batch(x_all[index], generator, recipe.flip, recipe.max_shift).to(target)
                y = y_all[index].to(target)
                logits = extract_logits(model(x))
                loss = F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(
                        f"Loss became {loss.item()} at epoch {epoch}, step {steps}; lower the "
                        "learning rate or check the inputs for NaNs."
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if steps + 1 < total_steps:
                    scheduler.step()
                steps += 1
                loss_sum += loss.item() * len(index)
                correct += int((logits.argmax(dim=1) == y).sum())
                seen += len(index)
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
            epoch_loss.append(loss_sum / seen)
            epoch_accuracy.append(correct / seen)
    finally:
        bar.close()
        model.eval()
    return TrainResult(epoch_loss, epoch_accuracy, steps, time.perf_counter() - start)
