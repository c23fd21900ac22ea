"""Checks of a fusion call's inputs, run before any pass over the calibration data.

Each raises a specific :class:`~alignment.errors.FusionError` that names the culprit (the model,
tensor, weight, batch or option) and says what to do. :func:`fusion.fuse` and :func:`fusion.align`
run them first, so a mistake costs a fraction of a second instead of a statistics pass or, worse,
a fused model full of NaNs.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Mapping, Sequence

import torch
import torch.nn.utils.prune  # noqa: F401  (torch.nn.utils.prune.BasePruningMethod in check_models)
from torch import nn

from alignment.discover import example_args
from alignment.errors import CalibrationError, FusionError, InvalidOptionError
from alignment.runner import (all_finite, batch_input, check_data, dropped_note, first_batch, has_nan, loader_samples,
                              model_device, model_dtype, modes)
from alignment.statistics import check_inputs
from alignment.structure import RowPlan

__all__ = ["ModelError", "NonFiniteError", "model_list", "check_models", "check_alpha", "check_calibration", "check_device",
           "check_seed", "check_finite_plans", "check_finite_model", "check_runs", "option_dict"]


class NonFiniteError(FusionError, ArithmeticError):
    """A stage produced NaN or infinite values (named where they first appear) instead of a model."""


class ModelError(FusionError, ValueError, TypeError):
    """The models given to fuse are not usable (none, not ``nn.Module``, mixed dtypes, non-finite or
    meta weights, a forward pass that cannot take the calibration batch)."""


def model_list(models: Any, call: str = "fuse") -> list[nn.Module]:
    """The models as a list, after checking it is a non-empty list of ``nn.Module`` (the cheap part of
    :func:`check_models`, which looks at every tensor); ``call`` names the function in the message.

    Raises:
        ModelError: naming the item at fault.
    """
    if isinstance(models, nn.Module) or not isinstance(models, (list, tuple)):
        container = isinstance(models, (nn.Sequential, nn.ModuleList, nn.ModuleDict))
        got = f"a {type(models).__name__}" + (" (a container module is taken as one model)" if container else "")
        raise ModelError(f"{call} takes a list of models (nn.Module), got {got}, e.g. {call}([a, b], ...)")
    if not models:
        raise ModelError("fuse needs at least one model")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise ModelError(f"model {i} is a {type(m).__name__}, not an nn.Module; load the weights into a model first")
    return list(models)


def option_dict(options: Any, what: str) -> dict[str, Any]:
    """``options`` (``repair_options``, ``refine_options``: None or a mapping of option names to values)
    as a new dict.

    Raises:
        InvalidOptionError: ``options`` is neither None nor a mapping with string keys.
    """
    if options is None:
        return {}
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise InvalidOptionError(f"{what} must be a dict of option names to values (e.g. {{'eps': 1e-4}}), "
                                 f"got {type(options).__name__} {options!r:.60}")
    return dict(options)


def check_models(models: Any) -> list[nn.Module]:
    """The models as a list, after checking each is a real, finite ``nn.Module`` of one dtype.

    Raises:
        ModelError: naming the model (and tensor) at fault.
    """
    models = model_list(models)
    dtypes: dict[torch.dtype, int] = {}
    for i, m in enumerate(models):
        if hasattr(m, "_orig_mod") and type(m).__name__ == "OptimizedModule":
            raise ModelError(f"model {i} is compiled (torch.compile); fusion traces and hooks the eager module: pass "
                             f"model._orig_mod (the same weights) and compile the fused model afterwards")
        for path, sub in m.named_modules():
            where = f"model {i}: module {path or '<root>'!r}"
            if any(type(h).__name__ == "WeightNorm" for h in sub._forward_pre_hooks.values()):
                raise ModelError(f"{where} uses the deprecated torch.nn.utils.weight_norm, whose "
                                 f"models cannot be copied once run; use torch.nn.utils.parametrizations.weight_norm "
                                 f"(or torch.nn.utils.remove_weight_norm)")
            pruned = [h._tensor_name for h in sub._forward_pre_hooks.values()
                      if isinstance(h, torch.nn.utils.prune.BasePruningMethod)]
            if pruned:  # (weight_orig and weight_mask would be fused apart: the mask averaged into fractions)
                raise ModelError(f"{where} is pruned with torch.nn.utils.prune ({pruned[0]}_orig times "
                                 f"{pruned[0]}_mask); make the pruning permanent first: "
                                 f"torch.nn.utils.prune.remove(module, {pruned[0]!r})")
            if getattr(sub, "_compiled_call_impl", None) is not None:
                raise ModelError(f"{where} is compiled in place (module.compile()); fusion traces and hooks the eager "
                                 f"module: pass an uncompiled copy and compile the fused model afterwards")
            if isinstance(sub, torch.nn.modules.lazy.LazyModuleMixin) and sub.has_uninitialized_params():
                raise ModelError(f"{where} ({type(sub).__name__}) has uninitialized parameters; run the model once "
                                 f"on an example input to materialise them")
        for name, t, buffer in _tensors(m):
            if t.is_meta:
                raise ModelError(f"model {i}: tensor {name!r} is on the meta device (no values); load real weights "
                                 f"(e.g. model.to_empty(device=...) then load_state_dict)")
            if t.is_floating_point():
                dtypes.setdefault(t.dtype, i)
                if _broken(t, buffer):
                    raise ModelError(f"model {i}: tensor {name!r} holds non-finite values (NaN or inf); fusing it would "
                                     f"give a broken model")
        _check_forward_signature(m, i)
    if len(dtypes) > 1:
        desc = ", ".join(f"{str(d).replace('torch.', '')} (model {i})" for d, i in dtypes.items())
        raise ModelError(f"the models mix floating dtypes: {desc}; cast them to one dtype first (e.g. model.float())")
    return list(models)


def _check_forward_signature(model: nn.Module, i: int) -> None:
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    required_kw = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    if not positional and required_kw:
        raise ModelError(f"model {i} ({type(model).__name__}) takes its input only as keyword-only argument(s) "
                         f"{', '.join(map(repr, required_kw))}; fusion calls model(x): wrap it in a module whose forward "
                         f"takes the input positionally")


def check_alpha(alpha: Sequence[float] | float | None, n: int, normalize: bool = True) -> list[float]:
    """Interpolation weights: one finite number per model (a float ``a`` means ``[1 - a, a]`` for two).

    With ``normalize`` (default) the weights must be non-negative and sum to 1; ``normalize=False``
    allows any finite weights (extrapolation).

    Raises:
        InvalidOptionError: naming the weights and the rule they break.
    """
    if alpha is None:
        return [1.0 / n] * n
    if hasattr(alpha, "tolist") and callable(alpha.tolist):  # a numpy array or tensor (any float dtype), or scalar
        alpha = alpha.tolist()
    if isinstance(alpha, numbers.Real) and not isinstance(alpha, bool):
        if n != 2:
            raise InvalidOptionError(f"a single alpha is for two models; give {n} weights")
        alpha = [1.0 - float(alpha), float(alpha)]
    if isinstance(alpha, (str, bytes)) or not hasattr(alpha, "__len__"):
        raise InvalidOptionError(f"alpha must be a number (two models) or one number per model, got {alpha!r}")
    if len(alpha) != n:
        raise InvalidOptionError(f"alpha has {len(alpha)} weights for {n} models")
    out = []
    for a in alpha:
        if isinstance(a, bool) or not isinstance(a, numbers.Real) or not math.isfinite(a):
            raise InvalidOptionError(f"alpha weights must be finite numbers, got {list(alpha)!r}")
        out.append(float(a))
    if normalize:
        if any(a < 0 for a in out):
            raise InvalidOptionError(f"alpha={out} has negative weights (a single alpha must lie in [0, 1]); pass "
                                     f"normalize=False to extrapolate")
        if abs(sum(out) - 1.0) > 1e-6:
            raise InvalidOptionError(f"alpha={out} must sum to 1 (they sum to {sum(out):.6g}); rescale them, or pass "
                                     f"normalize=False to use them as they are")
    return out


def check_seed(seed: Any) -> int:
    """The seed as an int (:class:`InvalidOptionError` for anything else)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidOptionError(f"seed must be an integer, got {seed!r}")
    return seed


def check_device(device: Any) -> torch.device | None:
    """The device, after checking that it exists on this machine.

    Raises:
        InvalidOptionError: an unknown device string, or a CUDA/MPS device that is not there.
    """
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidOptionError(f"device={device!r} is not a torch device ({exc})") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            raise InvalidOptionError(f"device={device!r}: this machine has {count} CUDA device(s); use device='cpu' "
                                     f"or one of cuda:0..cuda:{count - 1}" if count else
                                     f"device={device!r}: this machine has no CUDA device; use device='cpu'")
    if dev.type == "meta":
        raise InvalidOptionError(f"device={device!r} holds no data, so no statistics can be taken there; use "
                                 f"device='cpu' or 'cuda'")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise InvalidOptionError(f"device={device!r}: MPS is not available here; use device='cpu'")
    return dev


def check_calibration(data: Any, models: Sequence[nn.Module], heads: str | None = None) -> torch.Tensor:
    """Check calibration data against the models and return its first input batch.

    The data must be re-iterable (not a one-shot generator), hold at least 2 samples (a
    ``DataLoader`` counts what its sampler draws and ``drop_last`` keeps), finite floating inputs of
    the models' dtype, and a batch layout whose input is known (a tensor, ``(x, y)``, a dict with an
    input key, or ``(dict, y)``); one ``(x, y)`` pair given as the data (not as a list of batches)
    is refused; every model must run on two samples of it (which also checks the shape).
    With ``heads="merged"`` (one classifier for all) the models must have the same number of outputs.

    Raises:
        CalibrationError: naming the batch, key, dtype or shape at fault.
        fusion.engine.HeadsError: models with different output counts and one merged classifier.
    """
    check_data(data)
    _check_pair(data, models)
    size = _length(data)
    if size is not None and size < 2:
        raise CalibrationError(f"calibration data holds {size} sample(s){_counted(data)}{dropped_note(data)}; "
                               f"statistics need at least 2 (correlations and variances are undefined for one)")
    x = first_batch(data)
    if size is None and len(x) < 2:
        raise CalibrationError(f"the first calibration batch holds 1 sample (shape {tuple(x.shape)}); statistics need "
                               f"at least 2 per batch (use a batch size of 2 or more). A list or an IterableDataset is "
                               f"read as batches: if its items are single samples, stack them or wrap the data in "
                               f"DataLoader(data, batch_size=64)")
    if not x.is_floating_point():
        raise CalibrationError(f"calibration inputs are {str(x.dtype).replace('torch.', '')}; the models take floating "
                               f"inputs: convert them (e.g. x.float() / 255)")
    want = model_dtype(*models, default=None)
    if want is not None and x.dtype != want:
        raise CalibrationError(f"calibration inputs are {str(x.dtype).replace('torch.', '')} but the models are "
                               f"{str(want).replace('torch.', '')}; cast the data (x.to({want}))")
    whole = data if isinstance(data, torch.Tensor) else x
    if not all_finite(whole):
        where = "the calibration tensor" if isinstance(data, torch.Tensor) else "the first calibration batch"
        raise CalibrationError(f"{where} holds non-finite values (NaN or inf); clean the data first")
    sizes = check_inputs(models, x[:2])  # (the check alignment.statistics.collect runs alone)
    if heads == "merged" and len(set(sizes)) > 1:
        from .engine import HeadsError

        raise HeadsError(f"the models have {', '.join(map(str, sizes))} outputs: one merged classifier needs equal "
                         f"class counts; use heads='separate' (each model keeps its own classifier)")
    labels = [_label_names(m) for m in models]
    if heads == "merged" and all(lab is not None for lab in labels) and any(lab != labels[0] for lab in labels):
        from .engine import HeadsError

        i = next(i for i, lab in enumerate(labels) if lab != labels[0])
        raise HeadsError(f"model {i}'s classes ({', '.join(labels[i][:5])}...) are not model 0's "
                         f"({', '.join(labels[0][:5])}...) (transformers id2label): one merged classifier would "
                         f"average unrelated outputs; use heads='separate' (each model keeps its own classifier)")
    return x


def _label_names(model: nn.Module) -> list[str] | None:
    """A transformers model's class names in output order, or None when unknown (the default
    ``LABEL_k`` names, or no config)."""
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if not isinstance(id2label, dict) or not id2label:
        return None
    names = [str(id2label[k]) for k in sorted(id2label, key=int)]
    return None if names == [f"LABEL_{k}" for k in range(len(names))] else names


def _check_pair(data: Any, models: Sequence[nn.Module]) -> None:
    """Refuse one ``(inputs, targets)`` pair given as the calibration data (it would be read as two
    batches) where its second tensor has the rank of the inputs but cannot be model inputs (the
    model fails on it: soft labels ``(N, C)`` beside flat inputs ``(N, F)``). The other pairs are
    refused by :func:`alignment.runner.check_data`; a tuple whose two tensors both run is two batches."""
    if not (isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)):
        return
    x, y = data
    if x.dim() == 0 or y.dim() != x.dim() or len(x) != len(y) or y.shape[1:] == x.shape[1:] or not models:
        return
    m = models[0]
    try:
        with modes([m]), torch.no_grad():
            m(y[:2].to(next((t.device for t in m.parameters()), torch.device("cpu"))))
    except Exception:  # noqa: BLE001 - the second tensor is no model input: the data is one (x, y) pair
        raise CalibrationError(f"calibration data is a tuple of two tensors of shapes {tuple(x.shape)} and "
                               f"{tuple(y.shape)}, read as two batches, but model 0 cannot take the second: if it is "
                               f"one (inputs, labels) pair, pass a list of batches ([(x, y)]), the inputs alone (x), "
                               f"TensorDataset(x, y) or a DataLoader") from None


def _counted(data: Any) -> str:
    """Where a ``DataLoader``'s sample count comes from, when its sampler draws another number than
    its dataset holds."""
    if isinstance(data, torch.utils.data.DataLoader):
        try:
            n = len(data.batch_sampler.sampler)
            if n != len(data.dataset):
                return f" (the DataLoader's sampler draws {n} of its dataset's {len(data.dataset)})"
        except (TypeError, AttributeError):
            pass
    return ""


def _length(data: Any) -> int | None:
    """The number of samples of the calibration data, where it is known before a pass: a
    ``DataLoader`` counts what its sampler draws and ``drop_last`` keeps (not its dataset)."""
    if isinstance(data, torch.Tensor):
        return len(data)
    if isinstance(data, torch.utils.data.DataLoader):
        return loader_samples(data)
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        return len(data)
    if isinstance(data, (list, tuple)) and len(data) == 1:
        return len(batch_input(data[0]))
    return None


def _tensors(model: nn.Module):
    """``(name, tensor, is_buffer)`` for every parameter, then every buffer."""
    yield from ((n, t, False) for n, t in model.named_parameters())
    yield from ((n, t, True) for n, t in model.named_buffers())


def _broken(t: torch.Tensor, buffer: bool) -> bool:
    """NaN anywhere, or an infinity in a parameter. Buffers may hold infinities on purpose (clipping
    bounds left open: Gemma's ``input_min = -inf``)."""
    return has_nan(t) if buffer else not all_finite(t)


def check_finite_plans(plans: Sequence[dict[str, torch.Tensor]]) -> None:
    """Raise :class:`NonFiniteError` naming the first space whose plan holds NaN or inf."""
    for i, p in enumerate(plans):
        for name, T in p.items():
            if not all_finite(T.vals if isinstance(T, RowPlan) else T):
                raise NonFiniteError(f"the plan of space {name!r} for model {i} holds non-finite values (from NaN "
                                     f"statistics?); check the calibration data and the models' activations there")


def check_finite_model(model: nn.Module, stage: str) -> None:
    """Raise :class:`NonFiniteError` naming the first parameter or buffer of ``model`` that holds NaN
    (or a parameter that holds inf) after ``stage``."""
    for name, t, buffer in _tensors(model):
        if t.is_floating_point() and _broken(t, buffer):
            raise NonFiniteError(f"after {stage}, the fused tensor {name!r} holds non-finite values; the fused model "
                                 f"would be broken (try another method, a ridge, or more calibration data)")


def check_runs(model: nn.Module, example: Any, stage: str) -> None:
    """Run ``model`` once on ``example`` (the input discovery ran on: a tensor, a tuple of positional
    inputs or a dict of keyword inputs), in eval mode without gradients (every module's flag
    restored), so that a fused or resized model that cannot run is an error here, not the caller's.

    Raises:
        ModelError: the model fails, naming the error and the usual cause (a forward that fixes a
            width fusion changed: a literal split size, a reshape to constant channels).
    """
    dev = model_device(model)
    move = lambda v: v.to(dev) if isinstance(v, torch.Tensor) else v  # noqa: E731
    args, kwargs = example_args(example)
    args, kwargs = tuple(map(move, args)), {k: move(v) for k, v in kwargs.items()}
    try:
        with modes([model]), torch.no_grad():
            model(*args, **kwargs)
    except FusionError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure: the model would be returned broken
        raise ModelError(f"the model built does not run on the example input after {stage} ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:300]}); its forward may fix a width that fusion changed (a "
                         f"literal split size, a reshape to constant channels): fuse at the models' widths there, or "
                         f"let the forward read widths from its tensors") from exc
