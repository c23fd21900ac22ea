"""Evaluation helpers: logits, accuracy, ensembles and 5+5 split tasks.

Every function accepts either a ``DataLoader`` or a map-style dataset of
``(input, label)`` pairs (a dataset is batched with ``batch_size``). Models are put
in eval mode for the forward passes and their original train/eval flags are
restored afterwards; their parameters are never modified. Outputs of Hugging Face
models (``ModelOutput`` objects with ``.logits``) are handled transparently.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from alignment.errors import FusionError
from alignment.runner import model_device, modes

__all__ = [
    "heads_accuracy",
    "EvaluationError",
    "OutputFormatError",
    "extract_logits",
    "eval_mode",
    "predict_logits",
    "accuracy",
    "ensemble_accuracy",
    "evaluate_loss_and_accuracy",
    "split_task_accuracy",
    "joint_accuracy",
]

Data = DataLoader | Dataset


class EvaluationError(FusionError, ValueError):
    """Inputs to an evaluation that do not fit together (head widths, class lists...)."""


class OutputFormatError(EvaluationError, TypeError):
    """A model output without logits, or data whose batches are not (input, label) pairs."""


def extract_logits(output: Any) -> torch.Tensor:
    """Returns the logits tensor of a model's output.

    Args:
        output: A tensor, an object with a ``.logits`` attribute (Hugging Face
            ``ModelOutput``), a mapping with a ``"logits"`` key, or a tuple/list
            whose first element is the logits.

    Returns:
        The logits tensor.

    Raises:
        OutputFormatError: If no logits can be found in ``output``.
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise OutputFormatError(
        f"Cannot find logits in a model output of type {type(output).__name__}; the model "
        "must return a tensor, a tuple starting with one, or an object with .logits."
    )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: puts every submodule in eval mode, then restores each flag.

    Args:
        model: The model.

    Yields:
        The same model, in eval mode.
    """
    with modes([model]):
        yield model


def _as_loader(data: Data, batch_size: int) -> DataLoader | Sequence[Any]:
    if isinstance(data, DataLoader):
        return data
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, torch.Tensor) for t in data)
    ):
        data = TensorDataset(data[0], data[1])
    elif (isinstance(data, (tuple, list)) and data and isinstance(data[0], (tuple, list)) and len(data[0]) == 2
          and all(isinstance(t, torch.Tensor) for t in data[0]) and data[0][1].dim() == 1):
        return data  # a list of (inputs, labels) batches (labels a vector: batches, not samples), as calibration takes
    if isinstance(data, Dataset) or hasattr(data, "__getitem__"):
        if int(batch_size) <= 0:
            raise EvaluationError(f"batch_size must be positive, got {batch_size}.")
        return DataLoader(data, batch_size=int(batch_size), shuffle=False)  # type: ignore[arg-type]
    raise OutputFormatError(
        f"Expected a DataLoader or a dataset of (input, label) pairs, got {type(data).__name__}."
    )


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, Mapping):
        x = batch.get("pixel_values", batch.get("x", batch.get("input")))
        y = batch.get("labels", batch.get("label", batch.get("y")))
        if x is None or y is None:
            raise OutputFormatError(
                f"Batch dict has keys {sorted(batch)}; expected pixel_values/labels (or x/y)."
            )
        return x, y
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise OutputFormatError(
        f"Batches must be (inputs, labels) pairs, got {type(batch).__name__}; evaluation "
        "needs labels."
    )


def _refuse_uint8(x: Any, model: nn.Module, exc: Exception) -> None:
    """After a failed forward pass: uint8 images given to a model with floating weights are an
    :class:`EvaluationError` saying how to convert them (a model that takes uint8 itself is let be)."""
    from alignment.runner import model_dtype

    if isinstance(x, torch.Tensor) and x.dtype == torch.uint8:
        dtype = model_dtype(model, default=None)
        if dtype is not None:
            raise EvaluationError(
                f"The inputs are uint8 images but the model takes {str(dtype).replace('torch.', '')} inputs "
                f"({str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__}); convert "
                "them as the model was trained (x.float() / 255, then normalised with its mean and std), or give "
                "a Dataset of them to the data loaders (load_dataset_spec and --data convert uint8 images)."
            ) from exc


def predict_logits(
    model: nn.Module,
    data: Data,
    device: str | torch.device | None = None,
    batch_size: int = 512,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs a model over a dataset and collects its logits.

    The model is evaluated under ``torch.no_grad`` in eval mode; its own
    train/eval flags (per submodule) are restored afterwards.

    Args:
        model: The model (not modified).
        data: A ``DataLoader``, a dataset of (input, label) pairs, or an
            ``(inputs, labels)`` tuple of tensors.
        device: Where to run. ``None`` uses the device of the model's parameters.
            If it differs from the model's device, a copy of the model is moved
            there, so the caller's model stays where it is.
        batch_size: Batch size used when ``data`` is a dataset.
        progress: Show a progress bar (with the number of batches when known).

    Returns:
        ``(logits, labels)``: float32 CPU tensor ``N x C`` and int64 CPU tensor ``N``.

    Raises:
        OutputFormatError: If batches are not (input, label) pairs or outputs hold no logits.
        EvaluationError: If ``data`` is empty, or its inputs are uint8 images (not converted to the
            model's floating inputs).
    """
    home = model_device(model)
    target = home if device is None else torch.device(device)
    runner = model
    if target != home:
        runner = copy.deepcopy(model).to(target)
    loader = _as_loader(data, batch_size)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="evaluation", total=len(loader) if hasattr(loader, "__len__") else None, leave=False)
    all_logits: list[torch.Tensor] = []
    all_labels: list[torch.Tensor] = []
    with eval_mode(runner), torch.no_grad():
        for batch in loader:
            x, y = _split_batch(batch)
            try:
                out = runner(x.to(target))
            except RuntimeError as exc:  # e.g. uint8 images reaching a float conv: say what to do
                _refuse_uint8(x, runner, exc)
                raise
            logits = extract_logits(out)
            all_logits.append(logits.detach().float().cpu())
            all_labels.append(torch.as_tensor(y).to(torch.int64).cpu())
    if not all_logits:
        raise EvaluationError("The data is empty; nothing to evaluate.")
    return torch.cat(all_logits), torch.cat(all_labels)


def _accuracy_of(logits: torch.Tensor, labels: torch.Tensor) -> float:
    if logits.shape[0] == 0:
        raise EvaluationError("No examples to score.")
    return int((logits.argmax(dim=1) == labels).sum()) / int(labels.numel())


def _check_labels(labels: torch.Tensor, width: int, what: str) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= width):
        raise EvaluationError(
            f"{what} has {width} outputs but the labels span {int(labels.min())}..{int(labels.max())}; "
            "load the data with the model's classes (remap=True) or use split_task_accuracy / "
            "joint_accuracy for models trained on class subsets."
        )


def accuracy(
    model: nn.Module, data: Data, device: str | torch.device | None = None, batch_size: int = 512,
    progress: bool = False,
) -> float:
    """Top-1 accuracy of a model.

    Args:
        model: The model (not modified).
        data: A ``DataLoader`` or dataset whose labels index the model's outputs.
        device: See :func:`predict_logits`.
        batch_size: Batch size used when ``data`` is a dataset.
        progress: Show a progress bar.

    Returns:
        Accuracy in [0, 1].

    Raises:
        EvaluationError: If labels fall outside the model's head.
    """
    logits, labels = predict_logits(model, data, device=device, batch_size=batch_size, progress=progress)
    _check_labels(labels, logits.shape[1], "The model")
    return _accuracy_of(logits, labels)


def ensemble_accuracy(
    models: Sequence[nn.Module],
    data: Data,
    device: str | torch.device | None = None,
    batch_size: int = 512,
) -> float:
    """Accuracy of the ensemble that averages the models' softmax probabilities.

    Args:
        models: Models with the same head (same classes in the same order).
        data: A ``DataLoader`` or dataset (iterated once per model, so it must not
            shuffle).
        device: See :func:`predict_logits`.
        batch_size: Batch size used when ``data`` is a dataset.

    Returns:
        Accuracy in [0, 1].

    Raises:
        EvaluationError: If ``models`` is empty, heads differ in width, or the
            data yields different labels on different passes (a shuffling loader).
    """
    if not models:
        raise EvaluationError("ensemble_accuracy needs at least one model.")
    probs: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    for i, model in enumerate(models):
        logits, y = predict_logits(model, data, device=device, batch_size=batch_size)
        if probs is None:
            probs, labels = torch.zeros_like(logits), y
        elif logits.shape != probs.shape:
            raise EvaluationError(
                f"Model {i} outputs shape {tuple(logits.shape)} but model 0 outputs "
                f"{tuple(probs.shape)}; ensemble members must share their head."
            )
        elif not torch.equal(y, labels):
            raise EvaluationError(
                "The data yielded different labels for different models; pass a dataset or "
                "a loader with shuffle=False."
            )
        probs += logits.softmax(dim=1)
    assert probs is not None and labels is not None
    _check_labels(labels, probs.shape[1], "The ensemble")
    return _accuracy_of(probs, labels)


def evaluate_loss_and_accuracy(
    model: nn.Module,
    data: Data,
    device: str | torch.device | None = None,
    batch_size: int = 512,
    label_smoothing: float = 0.0,
    progress: bool = False,
) -> dict[str, float]:
    """Mean cross-entropy loss and accuracy of a model.

    Args:
        model: The model (not modified).
        data: A ``DataLoader`` or dataset whose labels index the model's outputs.
        device: See :func:`predict_logits`.
        batch_size: Batch size used when ``data`` is a dataset.
        label_smoothing: Label smoothing of the cross-entropy.
        progress: Show a progress bar.

    Returns:
        ``{"loss": float, "accuracy": float, "n": int}``.

    Raises:
        EvaluationError: If labels fall outside the model's head.
    """
    logits, labels = predict_logits(model, data, device=device, batch_size=batch_size, progress=progress)
    _check_labels(labels, logits.shape[1], "The model")
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing).item()
    return {"loss": loss, "accuracy": _accuracy_of(logits, labels), "n": int(labels.numel())}


def _check_class_lists(class_lists: Sequence[Sequence[int]], disjoint: bool = True) -> list[list[int]]:
    lists = [[int(c) for c in classes] for classes in class_lists]
    if not lists or any(not classes for classes in lists):
        raise EvaluationError("Every model needs a non-empty class list.")
    for classes in lists:
        if len(set(classes)) != len(classes):
            raise EvaluationError(f"Class list {classes} names a label twice; give each head's labels once.")
    flat = [c for classes in lists for c in classes]
    if disjoint and len(set(flat)) != len(flat):
        raise EvaluationError(
            f"Class lists {lists} overlap; split tasks must partition the labels."
        )
    return lists


def _remap(labels: torch.Tensor, classes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (mask of labels in classes, their positions in classes)."""
    class_tensor = torch.as_tensor(list(classes), dtype=torch.int64)
    mask = torch.isin(labels, class_tensor)
    positions = (labels[mask].unsqueeze(1) == class_tensor.unsqueeze(0)).int().argmax(dim=1)
    return mask, positions


def split_task_accuracy(
    models: Sequence[nn.Module],
    class_lists: Sequence[Sequence[int]],
    data: Data,
    device: str | torch.device | None = None,
    batch_size: int = 512,
) -> dict[str, Any]:
    """Per-task and joint accuracy of models trained on disjoint class subsets.

    Model ``i`` was trained on ``class_lists[i]`` with head ``j`` meaning label
    ``class_lists[i][j]``; ``data`` carries the ORIGINAL labels (load it without
    ``classes`` or with ``remap=False``).

    * Task accuracy of model ``i``: on the examples whose label is in
      ``class_lists[i]``, argmax over its own head.
    * Joint accuracy: the models' raw logits are concatenated (in ``class_lists``
      order), each column mapped back to its original label, and the argmax over
      all of them is the prediction; scored on every example whose label belongs to
      some class list.

    Args:
        models: One model per task.
        class_lists: Disjoint label lists, one per model, in head order.
        data: A ``DataLoader`` or dataset with original labels (not shuffled).
        device: See :func:`predict_logits`.
        batch_size: Batch size used when ``data`` is a dataset.

    Returns:
        ``{"per_task": [acc_0, acc_1, ...], "task_mean": float, "joint": float}``.

    Raises:
        EvaluationError: If the number of models and class lists differ, class
            lists overlap, a head width does not match its class list, or a task
            has no examples.
    """
    lists = _check_class_lists(class_lists)
    if len(models) != len(lists):
        raise EvaluationError(
            f"Got {len(models)} models but {len(lists)} class lists; give one class list per model."
        )
    outputs: list[torch.Tensor] = []
    labels: torch.Tensor | None = None
    for i, (model, classes) in enumerate(zip(models, lists)):
        logits, y = predict_logits(model, data, device=device, batch_size=batch_size)
        if logits.shape[1] != len(classes):
            raise EvaluationError(
                f"Model {i} has {logits.shape[1]} outputs but its class list {classes} has "
                f"{len(classes)} labels."
            )
        if labels is None:
            labels = y
        elif not torch.equal(labels, y):
            raise EvaluationError(
                "The data yielded different labels for different models; pass a dataset or "
                "a loader with shuffle=False."
            )
        outputs.append(logits)
    assert labels is not None
    return _task_scores(outputs, lists, labels)


def _task_scores(outputs: Sequence[torch.Tensor], lists: Sequence[Sequence[int]], labels: torch.Tensor) -> dict[str, Any]:
    """Per-task accuracy of each head on its own classes, their mean, and the joint accuracy."""
    per_task = []
    for i, (logits, classes) in enumerate(zip(outputs, lists)):
        mask, positions = _remap(labels, classes)
        if not bool(mask.any()):
            raise EvaluationError(
                f"The data has no examples of task {i}'s classes {classes}; pass data with the "
                "original labels (remap=False or no classes)."
            )
        per_task.append(_accuracy_of(logits[mask], positions))
    joint = _joint_from_logits(torch.cat(list(outputs), dim=1), [c for cl in lists for c in cl], labels)
    return {"per_task": per_task, "task_mean": sum(per_task) / len(per_task), "joint": joint}


def heads_accuracy(
    model: nn.Module,
    class_lists: Sequence[Sequence[int]],
    data: Data,
    device: str | torch.device | None = None,
    batch_size: int = 512,
    progress: bool = False,
) -> dict[str, Any]:
    """Per-task and joint accuracy of one model whose outputs are several tasks' heads concatenated
    (a fusion with ``heads="separate"``): head ``i`` is the next ``len(class_lists[i])`` outputs.

    Scored like :func:`split_task_accuracy` (which runs one model per task); ``data`` carries the
    original labels. Heads may share labels (models of one task fused with separate heads): each
    head is scored on its own classes, and the joint prediction is the label of the largest output
    over all heads. ``progress`` shows a progress bar.

    Returns:
        ``{"per_task": [...], "task_mean": float, "joint": float}``.

    Raises:
        EvaluationError: If the model's output width is not the total of the class lists, or as
            :func:`split_task_accuracy`.
    """
    lists = _check_class_lists(class_lists, disjoint=False)
    logits, labels = predict_logits(model, data, device=device, batch_size=batch_size, progress=progress)
    total = sum(len(c) for c in lists)
    if logits.shape[1] != total:
        raise EvaluationError(f"The model has {logits.shape[1]} outputs but the class lists have {total} labels "
                              f"in all; give one class list per head, in head order.")
    return _task_scores(list(logits.split([len(c) for c in lists], dim=1)), lists, labels)


def _joint_from_logits(logits: torch.Tensor, classes_order: Sequence[int], labels: torch.Tensor) -> float:
    order = torch.as_tensor(list(classes_order), dtype=torch.int64)
    mask = torch.isin(labels, order)
    if not bool(mask.any()):
        raise EvaluationError(
            f"The data has no examples of the classes {list(classes_order)}; pass data with "
            "the original labels."
        )
    predicted = order[logits[mask].argmax(dim=1)]
    return int((predicted == labels[mask]).sum()) / int(mask.sum())


def joint_accuracy(
    model: nn.Module,
    classes_order: Sequence[int],
    data: Data,
    device: str | torch.device | None = None,
    batch_size: int = 512,
) -> float:
    """Accuracy of one model whose head concatenates several tasks' heads.

    Output ``j`` of the model means original label ``classes_order[j]`` (e.g.
    ``[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]`` for a fused A+B model whose head is A's head
    followed by B's). Scored on the examples whose label is in ``classes_order``.

    Args:
        model: The model (not modified).
        classes_order: Original label of each output, in head order.
        data: A ``DataLoader`` or dataset with original labels.
        device: See :func:`predict_logits`.
        batch_size: Batch size used when ``data`` is a dataset.

    Returns:
        Accuracy in [0, 1].

    Raises:
        EvaluationError: If the head width differs from ``len(classes_order)``,
            labels repeat, or no example has one of the classes.
    """
    order = _check_class_lists([classes_order])[0]
    logits, labels = predict_logits(model, data, device=device, batch_size=batch_size)
    if logits.shape[1] != len(order):
        raise EvaluationError(
            f"The model has {logits.shape[1]} outputs but classes_order lists {len(order)} labels."
        )
    return _joint_from_logits(logits, order, labels)
