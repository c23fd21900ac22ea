"""The streaming runner: every pass over calibration data goes through :func:`stream`.

Statistics collection, BatchNorm reset, REPAIR and least-squares refinement all need the same loop:
take the user's data (a tensor, a dataset, a ``DataLoader`` with any sampler, or any re-iterable of
batches), pull the input out of each batch (a tensor, an ``(x, y)`` pair, a dict with
``pixel_values``, or a ``(dict, y)`` pair), move it to the device, run models with gradients off in
eval mode (or with chosen modules in training mode), and restore every module's train/eval flag
afterwards, even on error. What a pass accumulates is up to its hooks; sums that are kept as running
totals merge across data shards (:meth:`alignment.statistics.Statistics.merge`).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from .errors import CalibrationError, FusionError

__all__ = ["DEFAULT_BATCH_SIZE", "batch_input", "batches", "first_batch", "check_data", "dropped_note",
           "loader_samples", "model_device", "model_dtype", "modes", "one_pair", "runnable", "stream", "all_finite",
           "has_nan", "plain_precision"]

DEFAULT_BATCH_SIZE = 256


def plain_precision(fn: Callable) -> Callable:
    """Run ``fn`` with ``torch.autocast`` off (CPU and CUDA) and outside ``torch.inference_mode``,
    whatever the caller's context: fusion sets its own precision (float32 products summed in
    float64), which an ambient autocast would run in bfloat16 or float16, and inference tensors
    have no version counter (the statistics reader checks it). The result is what a call outside
    those contexts gives."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for device_type in ("cpu", "cuda"):
                if torch.is_autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            if torch.is_inference_mode_enabled():
                stack.enter_context(torch.inference_mode(False))
            return fn(*args, **kwargs)
    return wrapper


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite, from one sum when it can tell (NaN and infinities
    propagate into a sum, so a finite sum means finite entries: no boolean copy of a large tensor);
    entry by entry only when the sum is not finite (it may have overflowed)."""
    if not t.is_floating_point() or bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def has_nan(t: torch.Tensor) -> bool:
    """Whether some entry of ``t`` is NaN, from one sum when it can tell (a NaN entry makes the sum
    NaN); entry by entry only when the sum is NaN (opposite infinities also give one)."""
    if not t.is_floating_point() or not bool(torch.isnan(t.sum())):
        return False
    return bool(torch.isnan(t).any())


INPUT_KEYS = ("pixel_values", "image", "images", "img", "pixels", "input", "inputs", "x")
"""Dict keys taken as the model input of a batch, in this order."""


def batch_input(batch: Any) -> torch.Tensor:
    """The model input of one batch: the tensor itself, the first element of an ``(x, y)`` pair, of
    a dict the value of the first of :data:`INPUT_KEYS` it has (else its only floating tensor), or
    the input of the dict of a ``(dict, y)`` pair (a collate that returns ``({"pixel_values": x}, y)``)."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if (isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], dict)
            and not any(isinstance(b, dict) for b in batch[1:])):  # (a list of per-sample dicts is no pair)
        batch = batch[0]
    if isinstance(batch, dict):
        for key in INPUT_KEYS:
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
        values = [k for k, v in batch.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
        if len(values) == 1:
            return batch[values[0]]
        raise CalibrationError(
            f"cannot tell which key of a calibration batch holds the model input (keys {', '.join(map(repr, batch))}); "
            f"name it one of {', '.join(map(repr, INPUT_KEYS[:3]))}, or give (input, label) pairs")
    raise CalibrationError(
        f"cannot find the model input in a calibration batch of type {type(batch).__name__}"
        f"{_first_of(batch)}; give tensors, (input, label) pairs whose input is a tensor or a dict with "
        f"'pixel_values', or dicts with 'pixel_values'")


def _first_of(batch: Any) -> str:
    if isinstance(batch, (tuple, list)):
        return f" (its first element is a {type(batch[0]).__name__})" if batch else " (empty)"
    return ""


def check_data(data: Any) -> None:
    """Reject calibration data that cannot be streamed several times (fusion makes several passes).

    Raises:
        CalibrationError: for None, an empty tensor, a one-shot iterator (a generator), a single dict
            batch, a single ``(inputs, labels)`` pair (see :func:`one_pair`), or something that is no
            data at all.
    """
    if data is None:
        raise CalibrationError("no calibration data given; pass a tensor, a dataset or a DataLoader")
    if isinstance(data, torch.Tensor):
        if data.dim() == 0 or len(data) == 0:
            raise CalibrationError(f"calibration tensor has shape {tuple(data.shape)}: it holds no samples")
        return
    if isinstance(data, dict):
        raise CalibrationError("calibration data is one dict batch; pass a list of batches ([batch]), a dataset or a "
                               "DataLoader")
    if one_pair(data):
        raise CalibrationError(_pair_message(data))
    if not isinstance(data, torch.utils.data.Dataset) and not hasattr(data, "__iter__"):
        raise CalibrationError(f"calibration data of type {type(data).__name__} is no tensor, dataset, DataLoader or "
                               f"list of batches")
    if isinstance(data, Iterator):
        raise CalibrationError(
            f"calibration data is a one-shot iterator ({type(data).__name__}); fusion streams it several times: "
            f"pass a list of batches, a tensor, a dataset or a DataLoader")


def one_pair(data: Any) -> bool:
    """Whether ``data`` is, unambiguously, one ``(inputs, labels)`` pair rather than a sequence of
    two batches: a tuple of two tensors with the same first size whose second cannot be inputs like
    the first's: of lower rank (class indices ``(N,)`` or soft labels ``(N, C)`` beside images
    ``(N, C, H, W)``), or integer/boolean beside floating inputs. A list is always a list of batches."""
    if not (isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)):
        return False
    x, y = data
    if x.dim() == 0 or y.dim() == 0 or len(x) != len(y):
        return False
    return y.dim() < x.dim() or (x.is_floating_point() and not y.is_floating_point())


def _pair_message(data: tuple) -> str:
    x, y = data
    return (f"calibration data is one (inputs, labels) pair (a tuple of inputs of shape {tuple(x.shape)} and "
            f"{str(y.dtype).replace('torch.', '')} labels of shape {tuple(y.shape)}), which would be read as two "
            f"batches; pass a list of batches ([(x, y)]), the inputs alone (x), TensorDataset(x, y) or a DataLoader")


def _spans(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the batches the runner cuts ``n`` samples into: ``batch_size`` each,
    except that a last batch of one sample (which BatchNorm in training mode refuses, and whose
    batch statistics have no spread between samples) is avoided by sharing the last
    ``batch_size + 1`` samples between the last two batches (257 -> 256 + 1 becomes 128 + 129)."""
    cuts = list(range(0, n, batch_size)) + [n]
    if batch_size >= 3 and len(cuts) > 2 and n - cuts[-2] == 1:
        cuts[-2] = cuts[-3] + (batch_size + 1) // 2
    return list(zip(cuts[:-1], cuts[1:]))


def loader_samples(loader: torch.utils.data.DataLoader) -> int | None:
    """The number of samples a ``DataLoader`` yields in one pass, where its sampler tells: what the
    sampler draws (not the dataset's length), less what ``drop_last`` drops; None where unknown (an
    iterable dataset, a custom batch sampler, or no automatic batching, whose items may be batches)."""
    if isinstance(loader.dataset, torch.utils.data.IterableDataset):
        return None
    bs = loader.batch_sampler
    if not isinstance(bs, torch.utils.data.BatchSampler) or not isinstance(bs.batch_size, int):
        return None
    try:
        n = len(bs.sampler)
    except TypeError:
        return None
    return n - n % bs.batch_size if bs.drop_last else n


def dropped_note(loader: Any) -> str:
    """Why a ``DataLoader`` may yield fewer samples than its sampler draws (``drop_last``), or ``""``."""
    if not isinstance(loader, torch.utils.data.DataLoader) or not loader.drop_last:
        return ""
    bs = loader.batch_sampler
    size = getattr(bs, "batch_size", None)
    if not isinstance(size, int):
        return ""
    try:
        n = len(bs.sampler)
    except TypeError:
        return (f" (the DataLoader's drop_last=True drops a last batch of fewer than batch_size={size} samples; "
                f"use a smaller batch_size or drop_last=False)")
    if n % size == 0:
        return ""
    kept = n - n % size
    fix = (f"use a batch_size of at most {n} or drop_last=False" if kept == 0 else
           "use a smaller batch_size or drop_last=False")
    return (f" (the DataLoader's drop_last=True drops {n % size} of its {n} samples: batches of batch_size={size} "
            f"keep {kept}; {fix})")


def _default_collate(loader: torch.utils.data.DataLoader) -> bool:
    from torch.utils.data import default_collate, default_convert

    return loader.collate_fn in (default_collate, default_convert)


def batches(data: Any, batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[torch.Tensor]:
    """Input tensors of the calibration data, one batch at a time (see :func:`batch_input`).

    Tensors and map-style datasets are cut into batches of ``batch_size`` (a last batch of one
    sample is avoided, see :func:`_spans`); a ``DataLoader`` or a list keeps its own batches."""
    check_data(data)
    if isinstance(data, torch.Tensor):
        for i, j in _spans(len(data), batch_size):
            yield data[i:j]
        return
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        _check_items(data)
        spans = _spans(len(data), batch_size)
        data = torch.utils.data.DataLoader(data, batch_sampler=[list(range(i, j)) for i, j in spans])
    elif (isinstance(data, torch.utils.data.DataLoader) and _default_collate(data)
          and not isinstance(data.dataset, torch.utils.data.IterableDataset)):
        _check_items(data.dataset)  # (torch's collate fails on PIL images without saying what to do)
    dtype = None
    for b, batch in enumerate(data):
        x = batch_input(batch)
        dtype = x.dtype if dtype is None else dtype
        if x.dtype != dtype:
            raise CalibrationError(f"calibration batch {b} is {x.dtype} but batch 0 is {dtype}; give every batch the "
                                   f"models' dtype")
        if not all_finite(x):
            raise CalibrationError(f"calibration batch {b} holds non-finite values (NaN or inf); clean the data first")
        yield x


def _check_items(dataset: Any) -> None:
    # a dataset's items are batched by torch's default collate, which fails on images that were
    # never turned into tensors with a message that does not say what to do
    try:
        if len(dataset) == 0:
            return
        item = dataset[0]
    except Exception:  # noqa: BLE001 - a dataset without len or index 0: the loader reports it
        return
    x = item[0] if isinstance(item, (tuple, list)) and item else item
    if isinstance(x, (torch.Tensor, dict)) or type(x).__module__.startswith("numpy"):
        return
    raise CalibrationError(f"calibration dataset items hold {type(x).__module__}.{type(x).__name__} inputs, not tensors; "
                           f"give the dataset a transform that returns tensors (e.g. torchvision.transforms.ToTensor() "
                           f"and a Normalize)")


def first_batch(data: Any) -> torch.Tensor:
    """The first input batch of the calibration data."""
    for x in batches(data):
        return x
    raise CalibrationError(f"calibration data is empty{dropped_note(data)}")


def model_device(model: nn.Module) -> torch.device:
    """Device of a model's first parameter or buffer (CPU for a model with neither)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def model_dtype(*models: nn.Module, default: torch.dtype | None = torch.float32) -> torch.dtype | None:
    """Floating dtype of the first floating parameter of ``models`` (``default`` when none has one)."""
    return next((t.dtype for m in models for t in m.parameters() if t.is_floating_point()), default)


def runnable(models: Sequence[nn.Module], device: torch.device, avoid: Sequence[nn.Module] = ()) -> list[nn.Module]:
    """The models ready to run in one pass with their own hooks: each model itself, or a copy on
    ``device`` when it lives elsewhere, already appears earlier in ``models`` (a model fused with
    itself) or is one of ``avoid``. The user's models are never moved."""
    from .permute import copy_model  # (permute imports this module)

    runs: list[nn.Module] = []
    for i, m in enumerate(models):
        dup = any(m is r for r in models[:i]) or any(m is a for a in avoid)
        runs.append(copy_model(m).to(device) if dup or model_device(m) != device else m)
    return runs


@contextlib.contextmanager
def modes(models: Sequence[nn.Module], train: Callable[[nn.Module], bool] | None = None):
    """Put every module of ``models`` in eval mode (modules for which ``train(module)`` is true in
    training mode) and restore each module's own flag on exit."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
            if train is not None:
                for m in model.modules():
                    if train(m):
                        m.train()
        yield
    finally:
        # parents first (modules() order), so each child ends with its own flag
        for m, t in saved:
            m.train(t)


def stream(
    models: Sequence[nn.Module],
    data: Any,
    *,
    device: str | torch.device | None = None,
    on_batch: Callable[[torch.Tensor, list[Any]], None] | None = None,
    before_model: Callable[[int], None] | None = None,
    before_batch: Callable[[torch.Tensor], None] | None = None,
    train: Callable[[nn.Module], bool] | None = None,
    max_batches: int | None = None,
    progress: bool = False,
    desc: str = "calibration",
    batch_size: int = DEFAULT_BATCH_SIZE,
    skip: Callable[[int, torch.Tensor], bool] | None = None,
) -> int:
    """One pass of ``models`` over calibration data.

    Args:
        models: models to run on every batch (in order); their modes are restored afterwards.
        data: calibration data (see :func:`batches`).
        device: where batches go (default: the first model's device).
        on_batch: ``on_batch(x, outputs)`` after all models ran on batch ``x``.
        before_model: ``before_model(i)`` before model ``i`` runs on a batch (e.g. to reset hook state).
        before_batch: ``before_batch(x)`` before the models run on batch ``x`` (on the device).
        train: modules for which it returns true run in training mode (BatchNorm reset); all others
            in eval mode.
        max_batches: stop after this many batches.
        progress: show a progress bar (with a total when the data has a length).
        desc: the progress bar's label.
        batch_size: batch size for tensors and datasets.
        skip: batches ``x`` (number ``b``) for which ``skip(b, x)`` is true are not run (nor
            counted); the caller reports them.

    Returns:
        The number of samples seen.
    """
    dev = torch.device(device) if device is not None else (model_device(models[0]) if models else torch.device("cpu"))
    it: Iterable[torch.Tensor] = batches(data, batch_size)
    if progress:
        from tqdm.auto import tqdm

        total = _num_batches(data, batch_size)
        if max_batches is not None and total is not None:
            total = min(total, max_batches)
        it = tqdm(it, desc=desc, total=total, leave=False)
    samples = 0
    first: list[int] | None = None  # the shape of the first batch the models ran on
    with modes(models, train), torch.no_grad():
        for b, x in enumerate(it):
            if max_batches is not None and b >= max_batches:
                break
            if skip is not None and skip(b, x):
                continue
            x = x.to(dev)
            if x.is_inference():  # (made under inference_mode: no version counter for the readers)
                x = x.clone()
            if before_batch is not None:
                before_batch(x)
            outs = []
            for i, m in enumerate(models):
                if before_model is not None:
                    before_model(i)
                try:
                    outs.append(m(x))
                except FusionError:
                    raise
                except Exception as exc:
                    if first is None:  # (the first batch is checked before the passes, with its own message)
                        raise
                    raise CalibrationError(  # the first batch ran: this one is what changed
                        f"model {i} failed on calibration batch {b} of shape {list(x.shape)} (the first batch, of "
                        f"shape {first}, ran): {type(exc).__name__}: {' '.join(str(exc).split())[:300]}; give every "
                        f"batch the input the models take") from exc
            first = first if first is not None else list(x.shape)
            if on_batch is not None:
                on_batch(x, outs)
            samples += len(x)
    if samples == 0:
        raise CalibrationError("calibration data yielded no batches")
    return samples


def _num_batches(data: Any, batch_size: int) -> int | None:
    if isinstance(data, torch.Tensor):
        return -(-len(data) // batch_size)
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        return -(-len(data) // batch_size)
    try:
        return len(data)
    except TypeError:
        return None
