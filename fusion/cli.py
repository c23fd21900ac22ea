"""The ``fusion`` command line.

Every :class:`~alignment.errors.FusionError` a command raises ends as one line on stderr
(``error: <message>``) and exit code 2; click's usage errors keep their own format (also
exit code 2).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import click
import torch

from alignment.errors import CalibrationError, FusionError, FusionWarning

__all__ = [
    "main",
    "OptionValueError",
    "UnsupportedModelError",
    "resolve_model",
    "parse_width",
    "parse_kwargs",
    "parse_options",
    "import_modules",
]

EPILOG_SPACES = """\b
Example:
  fusion spaces r18w32-s0 --zoo ../shared/zoo
  fusion spaces runs/fused.safetensors
  fusion spaces runs/fused.timm.json
  fusion spaces timm:resnet18 --checkpoint a.safetensors --kwargs '{"in_chans": 1}'
  fusion spaces mypackage.models:build
"""
EPILOG_EVAL = """\b
Example:
  fusion eval r18w32-s0 --zoo ../shared/zoo
  fusion eval r18w32-A-s4 --zoo ../shared/zoo --limit 1000
  fusion eval runs/fused.safetensors --data digits --image-size 28 --mean 0.286 --std 0.353
  fusion eval runs/fused.safetensors --data path/to/images --image-size 28 --mean 0.5 --std 0.5
  fusion eval runs/fused.safetensors --data mypackage.data:load_split
"""
EPILOG_ZOO = """\b
Example:
  fusion zoo --zoo ../shared/zoo
"""
EPILOG_FUSE = """\b
Example:
  fusion fuse r18w32-s0 r18w32-s1 --zoo ../shared/zoo --out runs/fused.safetensors --eval
  fusion fuse vit128-s0 vit128-s1 --zoo ../shared/zoo --out runs/vit.safetensors --method permute \\
      --repair repair --calibration-size 1000 --alpha 0.3 --alpha 0.7 --option iterations=5
  fusion fuse r18w32-A-s4 r18w32-B-s5 --zoo ../shared/zoo --method zip --zip-until layer3 \\
      --heads separate --refine lstsq --out runs/ab-zip.safetensors --eval
  fusion fuse timm:resnet18 timm:resnet18 --checkpoint a.safetensors --checkpoint b.safetensors \\
      --kwargs '{"in_chans": 1}' --num-classes 10 --out runs/r18.safetensors
  fusion fuse timm:resnet18 timm:resnet18 --checkpoint a.pt --checkpoint b.pt \\
      --data torchvision:CIFAR10 --data-root ~/data --image-size 32 --out runs/cifar.safetensors
  fusion fuse r18w32-s0 r18w32-s1 --zoo ../shared/zoo --repair repair --repair-option eps=1e-4 --out runs/r.safetensors
  fusion --import myplugins fuse r18w32-s0 r18w32-s1 --zoo ../shared/zoo --method my_method \\
      --repair my_repair --out runs/mine.safetensors    # methods and repairs myplugins registers
"""
EPILOG_COMPRESS = """\b
Example:
  fusion compress r18w32-s0 --zoo ../shared/zoo --width 0.5 --out runs/r18-half.safetensors --eval
  fusion compress vit128-s0 --method merge --width 0.5 --repair none --out runs/vit-half.safetensors
  fusion compress r18w32-s0 --method magnitude --target r18w16-s2 --out runs/r18-pruned.safetensors
  fusion compress hf-model-folder --width 0.5 --data path/to/images --out runs/hf-half.safetensors
"""
EPILOG_INTERPOLATE = """\b
Example:
  fusion interpolate r18w32-s0 r18w32-s1 --zoo ../shared/zoo --out runs/interp
  fusion interpolate vit128-s0 vit128-s1 --out runs/vit-interp --methods average,permute \\
      --repairs none,repair --steps 5 --test-limit 2000
"""
EPILOG_METHODS = """\b
Example:
  fusion methods
  fusion --import myplugins methods     # with the methods, repairs and refinements myplugins registers
"""


class OptionValueError(FusionError, ValueError):
    """A command-line option has a value the toolkit cannot use."""


class UnsupportedModelError(FusionError, ValueError):
    """A model a command cannot take (a partially zipped model where a whole one is needed)."""


class _OneLineError(click.ClickException):
    """A FusionError shown as ``error: <message>`` on one line, exit code 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", file=file, err=file is None)


class _FusionGroup(click.Group):
    """Turns any FusionError of a command (or of its option callbacks) into one line and exit 2."""

    def invoke(self, ctx: click.Context) -> Any:
        import warnings

        shown = warnings.showwarning

        def one_line(message, category, filename, lineno, file=None, line=None):
            # the toolkit's own warnings (fallbacks, data used other than asked): one line, as errors are
            if issubclass(category, FusionWarning):
                click.echo(f"warning: {' '.join(str(message).split())}", err=True)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = one_line
        try:
            return super().invoke(ctx)
        except FusionError as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            raise _OneLineError(" ".join(lines) or type(exc).__name__) from exc
        finally:
            warnings.showwarning = shown


# ---------------------------------------------------------------------------
# User code: --import and the modules of module:function specs
# ---------------------------------------------------------------------------


_MODULE_NAME = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*"


def import_modules(names: Sequence[str]) -> None:
    """``fusion --import MODULE``: imports each module (in order), e.g. one that registers methods,
    repairs or refinements of its own, before the command runs.

    Raises:
        OptionValueError: for a name that is no module name, a module that cannot be found or
            fails to import (naming it), or a FusionError its import raises (e.g. a registration
            refused).
    """
    import importlib
    import re

    for name in names:
        name = name.strip()
        if re.fullmatch(_MODULE_NAME, name) is None:
            raise OptionValueError(f"--import {name!r} is not a module name: give a dotted Python module name such as "
                                   f"myplugins or mypackage.plugins (not a file path or module:function)")
        try:
            importlib.import_module(name)
        except FusionError as exc:
            raise OptionValueError(f"--import {name}: {' '.join(str(exc).split())}") from exc
        except Exception as exc:  # noqa: BLE001 - any failure of the user's module (a missing import, a bug)
            if isinstance(exc, ModuleNotFoundError) and exc.name and (name == exc.name or name.startswith(exc.name + ".")):
                raise OptionValueError(f"--import {name}: no module named {exc.name!r} (is its folder on the Python "
                                       f"path? e.g. PYTHONPATH=. for a module in the current folder)") from None
            raise OptionValueError(f"--import {name}: importing it failed: {type(exc).__name__}: "
                                   f"{' '.join(str(exc).split())[:300]}") from exc


def _import_spec_module(spec: str):
    """The module of a ``module:function`` MODELS spec, imported (the function is not called).

    Raises:
        click.BadParameter: when it cannot be imported."""
    import importlib

    module, _, name = spec.partition(":")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise click.BadParameter(f"{spec}: cannot import {name!r} from {module!r} ({exc})", param_hint="MODELS")


def _import_user_modules(specs: Sequence[str], data_spec: str | None) -> None:
    """Imports (without calling anything) the modules that ``module:function`` MODELS and ``--data``
    specs name, so that what they register (methods, repairs, refinements) is known when the
    options are checked, before any work.

    Raises:
        click.BadParameter: a MODELS module that cannot be imported.
        fusion.experiments.data.UnknownDatasetError: a --data module that cannot be imported (or a
            --data spec of no accepted form); both as the later loading would say.
    """
    import importlib

    for spec in specs:
        if _is_function_spec(spec):
            _import_spec_module(spec)
    if data_spec is None:
        return
    from .experiments.data import _unknown_spec, parse_dataset_spec

    parsed = parse_dataset_spec(data_spec)
    if parsed.kind == "function":
        module = parsed.target.partition(":")[0]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise _unknown_spec(parsed.target, f"module {module!r} cannot be imported: {exc}") from exc


def _check_registered(registry, name: str, option: str, command: str) -> None:
    """``name`` is registered in ``registry`` (methods, repairs, refinements); else the registry's
    error, listing the registered names and how to make a name of one's own available.

    Raises:
        alignment.errors.UnknownNameError: (the registry's subclass) for a name not registered.
    """
    if isinstance(name, str) and name in registry:
        return
    raise registry.error(f"unknown {registry.kind} {name!r} ({option}); registered: {', '.join(registry.names())}; "
                         f"for a {registry.kind} of your own, import the module that registers it with "
                         f"`fusion --import MODULE {command} ...` (or register it in the module of a "
                         f"module:function MODELS or --data spec)")


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def resolve_model(spec: str, zoo: str | None = None, checkpoint: str | None = None,
                  kwargs: dict | None = None, num_classes: int | None = None):
    """Load a model from a zoo name, a saved ``.safetensors`` (with JSON sidecar), an HF directory
    or ``timm:NAME`` (with ``checkpoint``, constructor ``kwargs`` and ``num_classes``).

    Returns:
        ``(model, spec)``; ``spec`` is the zoo entry or sidecar :class:`fusion.io.ModelSpec`
        (built from the constructor spec for ``timm:`` models; None for HF directories).
    """
    from .experiments.zoo import load_model
    from .io import CheckpointNotFoundError, load_model_file, model_paths

    if spec.startswith("timm:"):
        return _load_timm(spec[len("timm:"):], checkpoint, kwargs, num_classes)
    path = Path(spec)
    if path.is_dir() and (path / "config.json").exists():
        import transformers

        from .io import CheckpointCorruptError, transformers_progress

        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # (its load report of keys that do not fit: said below, in one line)
        try:
            with transformers_progress(_progress()):
                model, info = transformers.AutoModelForImageClassification.from_pretrained(
                    str(path), local_files_only=True, output_loading_info=True)
        except Exception as exc:  # noqa: BLE001 - a broken folder (truncated weights too): say which and why
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointCorruptError(f"{spec}: transformers cannot load this model folder ({first[:300]}); "
                                         f"check its config.json and weights") from None
        finally:
            hf_logging.set_verbosity(verbosity)
        # weights that do not fit the config would be left at their random initialisation, silently
        off = [(what, [str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or ()])
               for what, key in (("missing", "missing_keys"), ("unexpected", "unexpected_keys"),
                                 ("of another shape", "mismatched_keys"))]
        off = [(what, keys) for what, keys in off if keys]
        if off:
            said = "; ".join(f"{len(keys)} {what} ({', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''})"
                             for what, keys in off)
            raise CheckpointCorruptError(f"{spec}: its weights do not fit its config.json: {said}; those tensors would "
                                         f"be random, so the folder is refused (save the model with save_pretrained)")
        return model.eval(), None
    if path.name.endswith(".timm.json"):
        return _load_timm_json(path)
    if path.suffix in (".safetensors", ".json") or model_paths(path)[1].exists():
        return load_model_file(path)
    if path.is_dir():
        raise CheckpointNotFoundError(f"{spec} is a folder without config.json, not a transformers model folder")
    if path.is_file() and path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        from .io import UnknownArchitectureError

        raise UnknownArchitectureError(f"{spec} is a torch checkpoint: it holds weights, not the architecture; give it "
                                       f"as timm:NAME --checkpoint {spec} (with --num-classes/--kwargs as needed), or "
                                       f"save the model with fusion.io.save_model")
    if not path.exists() and (os.sep in spec or "/" in spec or path.suffix in (".hf", ".pt", ".pth", ".bin")):
        raise CheckpointNotFoundError(f"{spec}: no such model file or folder (a saved model is a .safetensors file "
                                      f"with its .json sidecar, or their stem; a transformers model a folder with "
                                      f"config.json; a zoo model a name without '/')")
    return load_model(spec, zoo)


def _load_timm_json(path: Path):
    """A ``<stem>.timm.json`` model and the constructor spec its ``timm.create_model`` arguments
    give (so that it can be fused, compressed and saved like a zoo model)."""
    from .io import ModelSpec, load_timm_json

    model = load_timm_json(path)
    args = json.loads(path.read_text())
    n = int(args.get("num_classes", getattr(model, "num_classes", 0)) or 0)
    kwargs = {k: v for k, v in args.items() if k not in ("model_name", "num_classes", "pretrained")}
    stem = path.name[: -len(".timm.json")]
    spec = ModelSpec(name=stem, library="timm", arch_name=str(args["model_name"]), kwargs=kwargs, num_classes=n,
                     classes=_sidecar_classes(path.with_name(stem + ".json"), n),
                     weights=path.with_name(stem + ".safetensors"))
    return model, spec


def _sidecar_classes(sidecar: Path, n: int) -> list[int]:
    """The dataset labels of a model's ``n`` outputs from the toolkit's sidecar next to its library
    form (a model trained on classes 5-9 is not one of classes 0-4); ``0..n-1`` without one."""
    try:
        classes = json.loads(sidecar.read_text()).get("classes") if sidecar.is_file() else None
    except (OSError, ValueError, AttributeError):
        classes = None
    if isinstance(classes, list) and len(classes) == n and all(isinstance(c, int) for c in classes):
        return list(classes)
    if sidecar.is_file():
        _warn(f"{sidecar} gives no classes for the {n} outputs of {sidecar.stem}.timm.json: its outputs are taken "
              f"as classes 0..{n - 1}")
    return list(range(n))


def _load_timm(name: str, checkpoint: str | None, kwargs: dict | None, num_classes: int | None):
    """A ``timm`` model built with random initialisation and loaded from ``checkpoint``."""
    from .io import ModelSpec, build_model, load_weights

    if not name:
        raise click.BadParameter("timm models are given as timm:NAME (e.g. timm:resnet18)")
    if checkpoint is None:
        raise click.BadParameter(f"timm:{name} needs a --checkpoint FILE with its weights")
    num_classes = 10 if num_classes is None else int(num_classes)
    spec = ModelSpec(name=name, library="timm", arch_name=name, kwargs=dict(kwargs or {}),
                     num_classes=num_classes, classes=list(range(num_classes)), weights=Path(checkpoint))
    model = build_model(spec, num_classes)
    load_weights(model, checkpoint, what=f"timm:{name}")  # (.safetensors or a torch checkpoint)
    return model.eval(), spec


def _input_paths(specs, entries, checkpoints) -> list[Path]:
    """The files and folders a job reads its models from: model paths given, the weights and
    sidecars of the resolved entries (zoo or sidecar models), checkpoints."""
    paths = [Path(s) for s in specs if Path(s).exists()] + [Path(c) for c in checkpoints or ()]
    for e in entries:
        w = getattr(e, "weights", None)
        if w is not None:
            paths += [Path(w), Path(w).with_suffix(".json")]
            if (Path(w).parent / "manifest.json").is_file():  # (a zoo's index, which the job reads too)
                paths.append(Path(w).parent / "manifest.json")
    return paths


def _resolve_all(specs, zoo_dir, checkpoints, kwargs_json, num_classes):
    """Resolve several model specs; ``timm:`` specs take the checkpoints in order."""
    kwargs = parse_kwargs(kwargs_json)
    n_timm = sum(1 for s in specs if s.startswith("timm:"))
    checkpoints = list(checkpoints or ())
    if len(checkpoints) != n_timm:
        raise click.BadParameter(
            f"give one --checkpoint per timm: model ({n_timm} timm: models, {len(checkpoints)} checkpoints)",
            param_hint="--checkpoint")
    if n_timm == 0 and (kwargs or num_classes is not None):  # (as --checkpoint: only timm:NAME models take it)
        option = "--kwargs" if kwargs else "--num-classes"
        raise OptionValueError(f"{option} has no effect: it is for timm:NAME models, and none is given "
                               f"({', '.join(specs)}); drop it, or name the model as timm:NAME")
    ckpts = iter(checkpoints)
    out = []
    for spec in specs:
        if _is_function_spec(spec):
            out.extend(_models_from_function(spec))
            continue
        ckpt = next(ckpts) if spec.startswith("timm:") else None
        out.append(resolve_model(spec, zoo_dir, checkpoint=ckpt, kwargs=kwargs, num_classes=num_classes))
    return out


def _is_function_spec(spec: str) -> bool:
    import re

    return (not spec.startswith("timm:") and not Path(spec).exists()
            and re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec) is not None)


def _models_from_function(spec: str) -> list:
    """``module:function`` returning a model, a list of models, or ``(model, arch)`` pairs (``arch``: the
    constructor spec that rebuilds it, see :func:`fusion.io.build_model`; transformers models need none)."""
    from .io import ModelSpec, _check_arch

    module, _, name = spec.partition(":")
    try:
        fn = getattr(_import_spec_module(spec), name)
    except AttributeError as exc:
        raise click.BadParameter(f"{spec}: cannot import {name!r} from {module!r} ({exc})", param_hint="MODELS")
    got = fn()
    items = list(got) if isinstance(got, (list, tuple)) and not (len(got) == 2 and isinstance(got[1], dict)) else [got]
    out = []
    for k, item in enumerate(items):
        model, arch = (item if isinstance(item, tuple) else (item, None))
        if not isinstance(model, torch.nn.Module):
            raise click.BadParameter(f"{spec} returned a {type(model).__name__} (item {k}); return models, or "
                                     f"(model, arch) pairs", param_hint="MODELS")
        entry = None
        if arch is not None:
            _check_arch(arch)
            n = int(getattr(model, "num_classes", 0) or _out_features(model))
            entry = ModelSpec(name=f"{spec}[{k}]", library=arch["library"], arch_name=arch["name"],
                              kwargs=dict(arch.get("kwargs", {})), num_classes=n, classes=list(range(n)))
        out.append((model.eval(), entry))
    return out


def _out_features(model) -> int:
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return last[-1].out_features if last else 0


def _cut_value(text: str | None):
    """``--zip-until`` as given: a depth fraction when it reads as a number, else a name."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return text


def _arch_of(model, entry) -> tuple[dict, int, list[int]]:
    """(constructor spec, num_classes, classes) that rebuild ``model``."""
    from .io import UnknownArchitectureError

    if entry is not None:
        return entry.arch, entry.num_classes, list(entry.classes)
    config = getattr(model, "config", None)
    if config is None:
        raise UnknownArchitectureError(
            f"cannot tell how to rebuild {type(model).__name__}: it has no zoo entry, sidecar or "
            "transformers config")
    drop = {"architectures", "model_type", "transformers_version", "id2label", "label2id", "num_labels",
            "torch_dtype", "_name_or_path", "_attn_implementation_autoset"}
    kwargs = {k: v for k, v in config.to_diff_dict().items() if k not in drop}
    n = int(config.num_labels)
    kwargs.update(_label_names(config, n))
    return {"library": "transformers", "name": type(model).__name__, "kwargs": kwargs}, n, list(range(n))


def _label_names(config, n: int) -> dict:
    """``id2label`` / ``label2id`` of a transformers config with ``n`` labels, as constructor kwargs
    (nothing when it names other than ``n`` labels, or only the default ``LABEL_k``)."""
    names = getattr(config, "id2label", None)
    if not isinstance(names, dict) or len(names) != n or all(v == f"LABEL_{k}" for k, v in names.items()):
        return {}
    id2label = {str(k): str(v) for k, v in sorted(names.items())}
    return {"id2label": id2label, "label2id": {v: int(k) for k, v in reversed(list(id2label.items()))}}


def _classes_union(entries) -> list[int] | None:
    if any(e is None or not e.classes for e in entries):
        return None
    return sorted({int(c) for e in entries for c in e.classes})


def _example_input(entry, model) -> torch.Tensor:
    """A random batch the model accepts: from its constructor spec, else its declared format."""
    from alignment.runner import model_dtype

    from .experiments.data import input_format
    from .io import example_input

    dtype = model_dtype(model)  # (a bfloat16 or float64 model takes its own dtype)
    if entry is not None:
        return example_input(entry, dtype=dtype)
    fmt = input_format(model)
    return torch.randn(2, fmt.channels or 1, *(fmt.image_size or (28, 28)), dtype=dtype)


# ---------------------------------------------------------------------------
# Option values
# ---------------------------------------------------------------------------


def parse_kwargs(text: str | None) -> dict:
    """``--kwargs``: a JSON object of constructor keyword arguments."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint="--kwargs") from exc
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--kwargs")
    return value


def parse_options(items, option: str = "--option") -> dict:
    """``key=value`` pairs; values are parsed as JSON when they can be (numbers, booleans...).
    ``option``: the command-line option they came from (named in the error for an item without ``=``)."""
    out = {}
    for item in items or ():
        if "=" not in item:
            raise click.BadParameter(f"{item!r} is not key=value", param_hint=option)
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def method_options(items) -> dict:
    """``--option key=value`` pairs for the method (:func:`parse_options`); a key naming one of the
    fusion call's own keywords (seed, repair, width, ...) is refused: the command sets those through
    its own options."""
    from alignment.methods import CALL_KEYWORDS

    out = parse_options(items)
    taken = [k for k in out if k in CALL_KEYWORDS or k in ("overwrite", "out", "methods", "repairs", "alphas")]
    if taken:
        raise click.BadParameter(f"{taken[0]!r} is no method option: the command sets it (see its --help); --option "
                                 f"passes method options (`fusion methods` lists them)", param_hint="--option")
    return out


_WIDTH_FORMS = "give a positive factor (0.5), a width of at least 1 (64), or a JSON object of per-space values"


def _width_problem(value: Any) -> str | None:
    # as fusion.resize reads widths: a float is a factor of the space's width, an int a width
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "is not a number"
    if isinstance(value, float) and not 0 < value < float("inf"):
        return "is not a positive width factor"
    if isinstance(value, int) and value < 1:
        return "is below 1 (an integer is a width; write a factor as 0.5)"
    return None


def parse_width(text: str | None):
    """``--width``: a factor (``0.5``), a width (``64``), or a JSON object of per-space values.

    Raises:
        OptionValueError: If the text is none of those, a factor is not positive or a width
            is below 1; the message repeats the text.
    """
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    if isinstance(value, dict):
        if not value:
            raise OptionValueError(f"--width {text} names no space; {_WIDTH_FORMS}")
        for key, item in value.items():
            problem = _width_problem(item)
            if problem:
                raise OptionValueError(f"--width {text}: the value for space {key!r} {problem}; {_WIDTH_FORMS}")
    else:
        problem = _width_problem(value)
        if problem:
            raise OptionValueError(f"--width {text} {problem}; {_WIDTH_FORMS}")
    return value


def _numbers(text: str | None, option: str, kind: type) -> tuple | None:
    """Comma- or x-separated numbers of an option (``0.5,0.5,0.5``, ``224x224``)."""
    if text is None:
        return None
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        return tuple(kind(p) for p in parts)
    except ValueError:
        raise OptionValueError(f"{option} {text!r} is not a list of {kind.__name__} values") from None


@dataclasses.dataclass
class _DataOptions:
    """Where calibration and evaluation data come from, and in what format."""

    spec: str
    root: str | None
    image_size: tuple[int, ...] | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    download: bool

    warned: set = dataclasses.field(default_factory=set)

    def load(self, split: str, model, classes: Sequence[int] | None, remap: bool):
        """One split for ``model``: its declared format where options do not give one.

        Raises:
            OptionValueError: if the data's images must be brought to the model's format (image
                folders, torchvision and digits data, a module:function's uint8 images) and neither
                the options nor the model give all of it.
        """
        from .experiments.data import input_format, integer_images, load_dataset_spec, parse_dataset_spec

        parsed = parse_dataset_spec(self.spec)
        declared = input_format(model)
        explicit = {"image_size": self.image_size, "mean": self.mean, "std": self.std}
        if parsed.kind == "fashion_mnist":  # the zoo's format unless options say otherwise
            fmt = explicit
        else:
            fmt = {k: v if v is not None else getattr(declared, k) for k, v in explicit.items()}
        missing = [k for k, v in fmt.items() if v is None]
        if parsed.needs_format and missing:
            raise self._format_missing(missing, declared.source, ":")
        data = load_dataset_spec(self.spec, split, channels=declared.channels, root=self.root,
                                 classes=classes, remap=remap, download=self.download, **fmt)
        converted = parsed.kind == "function" and integer_images(data)
        normalising = [k for k in ("mean", "std") if k in missing]
        if converted and normalising:  # (uint8 pixels scaled to [0, 1] but not normalised as the model was trained)
            raise self._format_missing(normalising, declared.source, " gives uint8 images (scaled to [0, 1], then "
                                                                     "normalised with the model's mean and std), but")
        self._warn_unused(parsed, converted)
        return data

    def _format_missing(self, missing: Sequence[str], source: str, what: str) -> OptionValueError:
        flags = ", ".join("--" + k.replace("_", "-") for k in missing)
        return OptionValueError(f"--data {self.spec}{what} the model does not declare its input "
                                f"{', '.join(missing)} ({source}); pass {flags}")

    def _warn_unused(self, parsed, converted: bool) -> None:
        """Warns (once per option) about data options that the spec's kind of data does not use."""
        unused = {}
        if self.download and parsed.kind not in ("fashion_mnist", "torchvision"):
            unused["--download"] = f"only fashion_mnist and torchvision:NAME data are downloaded ({self.spec} is not)"
        takes = _function_parameters(parsed.target) if parsed.kind == "function" else set()
        if self.root is not None and parsed.kind in ("digits", "folder"):
            unused["--data-root"] = f"it names the folder of fashion_mnist or torchvision:NAME data, not of {self.spec}"
        if self.root is not None and parsed.kind == "function" and "root" not in takes:
            unused["--data-root"] = f"the function of {self.spec} takes no root= argument"
        if parsed.kind == "function" and not converted:  # (its data is used as the function returns it)
            for k in ("image_size", "mean", "std"):
                if getattr(self, k) is not None and k not in takes:
                    unused["--" + k.replace("_", "-")] = (f"the function of {self.spec} takes no {k}= argument and "
                                                          f"its images are not uint8: they are used as it returns them")
        for flag, why in unused.items():
            if flag not in self.warned:
                self.warned.add(flag)
                _warn(f"{flag} has no effect: {why}")

    def calibration(self, model, entries, size: int, seed: int):
        from torch.utils.data import DataLoader

        from .experiments.data import calibration_subset, first_examples

        train = self.load("train", model, _classes_union(entries), remap=False)
        if isinstance(train, DataLoader):  # a user's loader: its own order decides (labels not needed)
            head = first_examples(train, size, labels=False)
            if len(head) < size:  # (as a dataset's: not silently fewer)
                raise CalibrationError(f"calibration size {size} exceeds the {len(head)} examples the --data loader "
                                       f"gives; ask for at most {len(head)} (--calibration-size)")
            return _InModelDtype.wrap(head, model)
        return _InModelDtype.wrap(calibration_subset(train, size, seed=seed), model)

    def test(self, model, classes: Sequence[int] | None, limit: int | None):
        from .experiments.data import first_examples

        data = self.load("test", model, list(classes) if classes else None, remap=True)
        data = _InModelDtype.wrap(first_examples(data, limit) if limit is not None else data, model)
        _check_takes(model, data)
        return data


def _check_takes(model, data) -> None:
    """Run ``model`` on two test samples, so that data it cannot take is a CalibrationError naming
    the shape before any evaluation (or fusion)."""
    from alignment.runner import first_batch
    from alignment.statistics import check_inputs

    from .experiments.evaluate import _refuse_uint8

    x = first_batch(data)[:2]
    try:
        check_inputs([model], x, what="test")
    except CalibrationError as exc:
        _refuse_uint8(x, model, exc)  # (uint8 images: say how to convert them)
        raise


def _function_parameters(target: str) -> set[str]:
    """The parameter names of a ``module:function`` data spec's function (empty if it cannot be read)."""
    import importlib
    import inspect

    module, _, name = target.partition(":")
    try:
        return set(inspect.signature(getattr(importlib.import_module(module), name)).parameters)
    except (ImportError, AttributeError, TypeError, ValueError):
        return set()


class _InModelDtype(torch.utils.data.Dataset):
    """A dataset whose floating inputs are cast to the model's floating dtype (images are decoded to
    float32; a bfloat16 or float16 model, as transformers loads a folder saved in it, takes its own)."""

    def __init__(self, data, dtype: torch.dtype):
        self.data, self.dtype = data, dtype

    @classmethod
    def wrap(cls, data, model):
        """``data`` itself when the model is float32 (or has no floating parameters)."""
        from alignment.runner import model_dtype

        dtype = model_dtype(model)
        return data if dtype == torch.float32 else cls(data, dtype)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        def cast(v):
            return v.to(self.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        item = self.data[i]
        if isinstance(item, dict):
            return {k: cast(v) for k, v in item.items()}
        if isinstance(item, (tuple, list)):
            return type(item)(cast(v) if k == 0 else v for k, v in enumerate(item))
        return cast(item)


def _report_accuracy(name: str, model, data, device) -> None:
    from .experiments.evaluate import evaluate_loss_and_accuracy

    result = evaluate_loss_and_accuracy(model, data, device=device, progress=_progress())
    acc, n = result["accuracy"], result["n"]
    click.echo(f"{name}: accuracy {100 * acc:.2f}% ({round(acc * n)}/{n} correct) on {n} test images")


def _report_heads(name: str, model, head_classes, data, limit, device) -> None:
    """Per-task and joint accuracy of a model with one head per task (``heads="separate"``)."""
    from .experiments.data import first_examples
    from .experiments.evaluate import heads_accuracy

    union = sorted({c for cl in head_classes for c in cl})
    test = data.load("test", model, union, remap=False)
    test = _InModelDtype.wrap(first_examples(test, limit) if limit is not None else test, model)
    r = heads_accuracy(model, head_classes, test, device=device, progress=_progress())
    tasks = ", ".join(f"head {i} {100 * a:.2f}%" for i, a in enumerate(r["per_task"]))
    click.echo(f"{name}: per-task accuracy {tasks} (mean {100 * r['task_mean']:.2f}%); "
               f"joint accuracy {100 * r['joint']:.2f}% over all heads")


def _options(*opts):
    """Decorator applying click options in the order listed."""
    def apply(fn):
        for opt in reversed(opts):
            fn = opt(fn)
        return fn
    return apply


def _width_callback(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    return parse_width(value)


_timm_options = _options(
    click.option("--checkpoint", "checkpoints", multiple=True,
                 help="Weights of a timm:NAME model (.safetensors or .pt); once per timm: model, in order."),
    click.option("--kwargs", "kwargs_json", default=None,
                 help='Constructor kwargs of timm:NAME models as JSON, e.g. \'{"in_chans": 1}\'.'),
    click.option("--num-classes", type=int, default=None, help="Head width of timm:NAME models (default 10)."),
)

_data_options = _options(
    click.option("--data", "data_spec", default="fashion_mnist", show_default=True,
                 help="Calibration and test data: fashion_mnist, digits, an image folder (train/ and test/ or "
                      "val/ subfolders when present), torchvision:NAME, or module:function returning a "
                      "Dataset or DataLoader."),
    click.option("--data-root", default=None,
                 help="Folder of fashion_mnist (default: $FUSION_DATA_DIR or the Debian path) or of "
                      "torchvision:NAME data."),
    click.option("--image-size", default=None,
                 help="Input size for --data, N or HxW (default: what the model declares; fashion_mnist: 28)."),
    click.option("--mean", default=None,
                 help="Normalisation mean, one or per channel, comma-separated (default: what the model "
                      "declares; fashion_mnist: the zoo's)."),
    click.option("--std", default=None,
                 help="Normalisation std, one or per channel, comma-separated (default: what the model "
                      "declares; fashion_mnist: the zoo's)."),
    click.option("--download", is_flag=True, help="Let torchvision download missing fashion_mnist or "
                                                  "torchvision:NAME data."),
)


def _data_of(kw: dict) -> _DataOptions:
    """Pops the data options from a command's keyword arguments."""
    size = _numbers(kw.pop("image_size"), "--image-size", int)
    if size is not None and (len(size) not in (1, 2) or min(size) < 1):
        raise OptionValueError(f"--image-size {size} must be N or HxW with positive sides")
    mean_text, std_text = kw.pop("mean"), kw.pop("std")
    mean, std = _numbers(mean_text, "--mean", float), _numbers(std_text, "--std", float)
    if mean is not None and (not mean or not all(math.isfinite(v) for v in mean)):
        raise OptionValueError(f"--mean {mean_text} must be finite numbers (one, or one per channel), e.g. --mean 0.5")
    if std is not None and (not std or not all(math.isfinite(v) and v > 0 for v in std)):
        raise OptionValueError(f"--std {std_text} must be finite positive numbers (one, or one per channel), "
                               f"e.g. --std 0.25")
    return _DataOptions(spec=kw.pop("data_spec"), root=kw.pop("data_root"), image_size=size, mean=mean, std=std,
                        download=kw.pop("download"))


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


@click.group(cls=_FusionGroup)
@click.option("--quiet", is_flag=True, help="No progress bars (statistics, refinement, repair, evaluation).")
@click.option("--import", "imports", multiple=True, metavar="MODULE",
              help="Import MODULE before the command runs (repeatable; given before the command, e.g. `fusion "
                   "--import myplugins fuse ...`): the methods, repairs and refinements it registers "
                   "(register_method, register_repair, register_refinement) become valid --method, --repair, "
                   "--refine (and interpolate --methods, --repairs) values and are listed by `fusion methods`.")
def main(quiet: bool, imports: tuple[str, ...]) -> None:
    """Fuse independently trained vision models by aligning their hidden units.

    Methods, repairs and refinements of your own: register them in a module and load it with
    --import MODULE (the modules of module:function MODELS and --data specs are imported too,
    before options are checked).

    Environment: FUSION_ZOO is the default --zoo folder (zoo names such as r18w32-s0 need one);
    FUSION_DATA_DIR the default Fashion-MNIST folder (else the Debian package's
    /usr/share/datasets/fashion-mnist).
    """
    import_modules(imports)


def _progress() -> bool:
    """Whether to show progress bars (off with ``fusion --quiet``)."""
    ctx = click.get_current_context(silent=True)
    return not (ctx is not None and ctx.find_root().params.get("quiet"))


@main.command(epilog=EPILOG_ZOO)
@click.option("--zoo", "zoo_dir", default=None, help="Zoo folder (default: $FUSION_ZOO).")
def zoo(zoo_dir: str | None) -> None:
    """List the checkpoints of a model zoo."""
    from .experiments.zoo import load_manifest

    for name, e in load_manifest(zoo_dir).items():
        classes = f"{min(e.classes)}-{max(e.classes)}" if e.classes else "?"
        acc = f"{100 * e.test_accuracy:.2f}%" if e.test_accuracy is not None else "-"
        click.echo(f"{name:16s} {e.library}:{e.arch_name:24s} classes {classes:5s} test acc {acc}")


@main.command(epilog=EPILOG_SPACES)
@click.argument("model")
@click.option("--zoo", "zoo_dir", default=None, help="Zoo folder for zoo names (default: $FUSION_ZOO).")
@_timm_options
def spaces(model: str, zoo_dir: str | None, checkpoints, kwargs_json, num_classes) -> None:
    """Discover and print the alignment spaces of MODEL.

    MODEL is given as to `fusion fuse`: a zoo name, a .safetensors file with its JSON sidecar, an HF
    model folder, a <stem>.timm.json file, timm:NAME (with --checkpoint, --kwargs, --num-classes), or
    module:function returning the model (the spaces of each model when it returns several).
    """
    from alignment import discover

    resolved = _resolve_all([model], zoo_dir, checkpoints, kwargs_json, num_classes)
    _refuse_zipped([model], resolved, "has no alignment spaces of its own")
    for k, (m, entry) in enumerate(resolved):
        graph = discover(m, _example_input(entry, m))
        if len(resolved) > 1:
            click.echo(f"{model}[{k}]:")
        click.echo(graph.summary())


def _refuse_zipped(specs: Sequence[str], resolved, what: str) -> None:
    """Refuses a partially zipped model (:class:`fusion.zipped.ZippedModel`) with a fused trunk (then one
    branch per source model): no single model whose units could be aligned. ``specs``: the model arguments
    (named one by one when they gave one model each).

    Raises:
        UnsupportedModelError: naming the model, its cut and what to use instead.
    """
    from .zipped import ZippedModel

    specs = list(specs)
    for k, (m, entry) in enumerate(resolved):
        spec = specs[k] if len(specs) == len(resolved) else f"model {k + 1} of {' '.join(specs)}"
        if isinstance(m, ZippedModel) and not m.cut.at_input:  # (cut at the input: an ensemble, traced whole)
            sources = (getattr(entry, "extra", None) or {}).get("sources") if entry is not None else None
            instead = f"its source models ({', '.join(map(str, sources))})" if sources else "its source models"
            raise UnsupportedModelError(f"{spec} is a partially zipped model (a fused trunk up to {m.cut.module!r}, "
                                        f"then {len(m.branches)} branches): it {what}; use {instead} instead")


@main.command(name="eval", epilog=EPILOG_EVAL)
@click.argument("model")
@click.option("--zoo", "zoo_dir", default=None, help="Zoo folder for zoo names (default: $FUSION_ZOO).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate on the first N test images only.")
@click.option("--device", default=None, help="Device to evaluate on (e.g. cuda).")
@_data_options
@_timm_options
def eval_cmd(model: str, zoo_dir: str | None, limit: int | None, device: str | None,
             checkpoints, kwargs_json, num_classes, **kw) -> None:
    """Test accuracy of MODEL on the test split of --data (the classes it was trained on).

    MODEL is a zoo name, a .safetensors file written by `fusion fuse` (or save_model), an HF model
    folder, or timm:NAME with --checkpoint.
    """
    from .checks import check_device

    check_device(device)
    data = _data_of(kw)
    resolved = _resolve_all([model], zoo_dir, checkpoints, kwargs_json, num_classes)
    if len(resolved) != 1:
        raise click.BadParameter(f"{model} gives {len(resolved)} models; eval takes one", param_hint="MODEL")
    [(m, entry)] = resolved
    heads = (getattr(entry, "extra", None) or {}).get("heads") if entry is not None else None
    if heads:
        _report_heads(model, m, heads, data, limit, device)
        return
    _report_accuracy(model, m, data.test(m, entry.classes if entry is not None else None, limit), device)


def _fusion_options(fn):
    """Options shared by ``fuse`` and ``compress``."""
    return _options(
        click.option("--out", required=True, help="Output .safetensors path (a .json sidecar is written next to it)."),
        click.option("--overwrite", is_flag=True, help="Replace existing output files (default: refuse, before any work)."),
        click.option("--repair", default="auto", show_default=True,
                     help="Norm repair after fusing: auto (reset_bn where the model has BatchNorm layers, else none), "
                          "none, reset_bn, repair, or a repair registered with --import (`fusion methods` lists "
                          "them)."),
        click.option("--repair-option", "repair_options", multiple=True,
                     help="Repair option key=value (repeatable), e.g. eps=1e-4 for --repair repair."),
        click.option("--target", "target_spec", default=None,
                     help="A model of the fused widths (zoo name, file, HF folder); only its architecture is used."),
        click.option("--width", "width", default=None, callback=_width_callback,
                     help="Fused widths relative to the first model: a factor (0.5), a width (64), or JSON "
                          "per space."),
        click.option("--calibration-size", type=int, default=2000, show_default=True,
                     help="Calibration images drawn from the train split of --data."),
        click.option("--calibration-seed", type=int, default=0, show_default=True, help="Seed of the calibration draw."),
        click.option("--zoo", "zoo_dir", default=None, help="Zoo folder for zoo names (default: $FUSION_ZOO)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for randomised solvers."),
        click.option("--device", default=None, help="Device for statistics and repair (default cpu)."),
        click.option("--option", "options", multiple=True,
                     help="Method option key=value (repeatable), e.g. solver=sinkhorn or reg=0.05."),
        click.option("--refine", default="none", show_default=True,
                     help="Refinement before the repair: none, lstsq (refits every layer by least squares, PLeaS), "
                          "or a refinement registered with --import (`fusion methods` lists them)."),
        click.option("--refine-option", "refine_options", multiple=True,
                     help="Refinement option key=value (repeatable), e.g. ridge=1e-3 or inputs=merged."),
        click.option("--heads", default="merged", show_default=True, type=click.Choice(["merged", "separate"]),
                     help="separate: each model keeps its own classifier (models trained on different classes)."),
        click.option("--zip-until", "zip_until", default=None,
                     help="Partial zipping: fuse up to this cut, then each model keeps its own layers and head: "
                          "input, output, a depth fraction (0.75), a module (layer3) or a space name."),
        click.option("--eval", "do_eval", is_flag=True, help="Print the fused model's test accuracy."),
        click.option("--test-limit", "--limit", "test_limit", type=click.IntRange(min=1), default=None,
                     help="With --eval: evaluate on the first N test images only."),
    )(_data_options(fn))


def _run_fusion(models, method, alphas, out, repair, target_spec, width, calibration_size, calibration_seed,
                zoo_dir, seed, device, options, do_eval, test_limit, checkpoints, kwargs_json,
                num_classes, refine="none", refine_options=(), repair_options=(), budget=1.0, heads="merged",
                zip_until=None, overwrite=False, command="fuse", **kw) -> None:
    from . import fuse as fuse_fn
    from .io import (
        check_inputs_kept, check_output, library_form_paths, remove_stale_forms, resized_widths, save_model,
        save_zipped,
    )

    # before any work: an existing or unwritable output (the library forms included) fails now
    check_output(out, overwrite, extra=library_form_paths(out))
    data = _data_of(kw)
    method_opts = method_options(options)
    if target_spec is not None and width is not None:
        raise click.UsageError("give --target or --width, not both")
    _check_budget(budget, width, target_spec)
    _import_user_modules(models, data.spec)  # (what they register is known to the checks below)
    refine_opts = _check_method_and_refinement(method, method_opts, refine, refine_options, command)
    repair_opts = _check_repair(repair, repair_options, command)
    if test_limit is not None and not do_eval:
        _warn(f"--test-limit {test_limit} has no effect without --eval (nothing is evaluated)")
    resolved = _resolve_all(models, zoo_dir, checkpoints, kwargs_json, num_classes)
    if command == "compress" and len(resolved) != 1:
        raise click.BadParameter(f"{models[0]} gives {len(resolved)} models; compress takes one (fuse several with "
                                 f"`fusion fuse`)", param_hint="MODEL")
    _refuse_zipped(models, resolved, "cannot be fused or compressed again")
    mods = [m for m, _ in resolved]
    entries = [e for _, e in resolved]
    alpha = _alpha_of(alphas or (), len(mods))
    target, t_entry = resolve_model(target_spec, zoo_dir) if target_spec is not None else (None, None)
    # even with --overwrite, the output must not replace what the job reads (the target's files too)
    check_inputs_kept(out, _input_paths([*models, *([target_spec] if target_spec else [])],
                                        [*entries, *([t_entry] if target_spec else [])], checkpoints),
                      extra=library_form_paths(out))
    known = [list(e.classes) for e in entries if e is not None and e.classes]
    if heads == "merged" and len(known) == len(entries) > 1 and any(c != known[0] for c in known):
        from .engine import HeadsError

        raise HeadsError(f"the models were trained on different classes ({'; '.join(map(str, known))}): merging their "
                         f"classifiers would average unrelated outputs; pass --heads separate (each model keeps its "
                         f"own head)")
    arch_source = (target, t_entry) if target_spec is not None else (mods[0], entries[0])
    arch, n_classes, classes = _arch_of(*arch_source)
    if do_eval:  # the test split is found and taken by the models before the work (not after saving)
        _check_takes(mods[0], _InModelDtype.wrap(data.load("test", mods[0], None, remap=False), mods[0]))
    calibration = data.calibration(mods[0], entries, calibration_size, calibration_seed)
    fused = fuse_fn(mods, calibration, method=method, repair=repair, alpha=alpha, seed=seed, device=device,
                    target=target, width=width, progress=_progress(), refine=refine,
                    repair_options=repair_opts, refine_options=refine_opts, budget=budget, heads=heads,
                    zip_until=_cut_value(zip_until), **method_opts)
    fused = fused.to("cpu")
    report = fused.fusion_report
    head_classes = None
    if heads == "separate":
        # one head per model, outputs concatenated: each head's classes from its model
        head_classes = [list(_arch_of(m, e)[2]) for m, e in resolved]
        classes = [c for cl in head_classes for c in cl]
        n_classes = len(classes)
        if arch.get("library") == "transformers":  # the fused config names the joined classes (or none)
            kwargs = {k: v for k, v in arch["kwargs"].items() if k not in ("id2label", "label2id")}
            arch = {**arch, "kwargs": {**kwargs, **_label_names(getattr(fused, "config", None), n_classes)}}
    extra = {"method": method, "repair": repair, "sources": list(models), "refine": refine, "budget": budget,
             "heads": head_classes, "target": target_spec, "report": dataclasses.asdict(report)}
    if zip_until is not None:
        branches = []
        for m, e in resolved:
            b_arch, b_n, _ = _arch_of(m, e)
            branches.append({"arch": b_arch, "num_classes": b_n, "widths": resized_widths(m, b_arch, b_n)})
        path = save_zipped(fused, out, arch, branches, classes, extra={**extra, "zip_until": zip_until},
                           overwrite=overwrite)
    else:
        # a width the constructor does not build is recorded per space (loading resizes to it)
        path = save_model(fused, out, arch=arch, num_classes=n_classes, classes=classes,
                          widths=resized_widths(fused, arch, n_classes), extra=extra, overwrite=overwrite)
    forms = []
    library_form = zip_until is None and heads == "merged"  # (a library rebuilds one model, one classifier)
    if library_form:
        from .io import save_library_forms

        forms = save_library_forms(fused, out, arch, n_classes, overwrite=overwrite)
    remove_stale_forms(out, forms)  # (an earlier model's forms at this path, replaced with --overwrite)
    click.echo(report.summary())
    click.echo(f"wrote {path} (+ {path.with_suffix('.json').name}" + "".join(f", {p.name}" for p in forms) + ")")
    if library_form and not forms and arch.get("library") in ("timm", "transformers"):
        why = ("its config cannot describe the fused widths" if arch["library"] == "transformers" else
               "no create_model arguments build the fused widths (the source's, with its size "
               "arguments changed to the new widths, were tried)")
        click.echo(f"no {arch['library']} form: {why}; load it with `fusion.io.load_model_file` (the sidecar)")
    if do_eval:
        if head_classes is not None:
            _report_heads("fused", fused, head_classes, data, test_limit, device)
            return
        test_classes = entries[0].classes if entries[0] is not None else classes
        _report_accuracy("fused", fused, data.test(fused, test_classes, test_limit), device)


@main.command(epilog=EPILOG_FUSE)
@click.argument("models", nargs=-1, required=True)
@click.option("--method", default="permute", show_default=True, help="Fusion method (see `fusion methods`).")
@click.option("--alpha", "alphas", type=float, multiple=True,
              help="Interpolation weight: once per model, or once for two models (weight of the second). Default: uniform.")
@click.option("--budget", type=float, default=1.0, show_default=True,
              help="Partial matching (two or more models): fused parameters up to BUDGET (>= 1) times the fully "
                   "matched model's; the fused widths follow from it (no --width or --target).")
@_fusion_options
@_timm_options
def fuse(models, method, alphas, **kw) -> None:
    """Fuse MODELS (two or more) into one model.

    MODELS are zoo names, .safetensors files with a JSON sidecar, HF model folders, <stem>.timm.json
    files (timm.create_model arguments next to <stem>.safetensors), timm:NAME (with --checkpoint,
    --kwargs, --num-classes), or module:function returning the models (or (model, arch) pairs).
    Besides OUT.safetensors and its sidecar, a transformers model is written as a save_pretrained
    folder OUT.hf and a timm model gets OUT.timm.json. The fused model has the first model's
    architecture, or that of --target (a model of the same family, e.g. narrower), or the first
    model's resized by --width. Calibration images come from the train split of --data
    (Fashion-MNIST by default), restricted to the union of the models' classes.
    """
    if len(models) < 2 and not any(_is_function_spec(m) for m in models):
        raise click.UsageError("fuse needs at least two models (use `fusion compress` for one)")
    _run_fusion(models, method, alphas, **kw)


def _warn(message: str) -> None:
    """One ``warning: ...`` line on stderr (an option that has no effect, data used other than asked)."""
    click.echo(f"warning: {message}", err=True)


def _check_budget(budget: float, width, target_spec) -> None:
    """``--budget`` before any work: a finite number >= 1, and not with --width or --target (partial
    matching sets the fused widths itself)."""
    if budget == 1.0:
        return
    if not math.isfinite(budget) or budget < 1:
        raise OptionValueError(f"--budget {budget:g} must be a finite number >= 1 (the fused model's parameters over "
                               f"the fully matched model's; 1: ordinary matching)")
    if width is not None or target_spec is not None:
        given = "--width" if width is not None else "--target"
        raise OptionValueError(f"--budget {budget:g} sets the fused widths itself (partial matching); do not combine "
                               f"it with {given}")


def _check_method_and_refinement(method: str, method_opts: dict, refine: str, refine_options,
                                 command: str = "fuse") -> dict:
    """The method and its ``--option`` values, and the refinement and its ``--refine-option`` values,
    checked before any work (the API would refuse them only after models and data are loaded);
    returns the refinement options as given.

    Raises:
        OptionValueError: for a ``--refine-option`` without a refinement that takes options (it would
            have no effect).
        alignment.errors.UnknownNameError: for a method or refinement not registered (listing those
            that are, and how to load one's own: ``--import``).
        alignment.errors.InvalidOptionError: for an option the method or the refinement does not
            have (naming it and the options it has).
    """
    from alignment.methods import METHODS

    from .refine import REFINEMENTS

    _check_registered(METHODS, method, "--method", command)
    METHODS.validate(method, method_opts)
    _check_registered(REFINEMENTS, refine, "--refine", command)
    opts = parse_options(refine_options, "--refine-option")
    _refuse_options_without_effect(REFINEMENTS, refine, opts, "--refine", "--refine-option", "a refinement")
    REFINEMENTS.validate(refine, opts)
    return opts


def _check_repair(repair: str, repair_options, command: str = "fuse") -> dict:
    """The repair (a registered one) and its ``--repair-option`` values, checked before any work;
    returns the options as given.

    Raises:
        alignment.errors.UnknownNameError: for a repair not registered (listing those that are).
        OptionValueError: for a ``--repair-option`` with a repair that takes no options (none, auto,
            reset_bn: it would have no effect).
        alignment.errors.InvalidOptionError: for an option the repair does not have, or a bad value.
    """
    from .repair import REPAIRS

    _check_registered(REPAIRS, repair, "--repair", command)
    opts = parse_options(repair_options, "--repair-option")
    _refuse_options_without_effect(REPAIRS, repair, opts, "--repair", "--repair-option", "a repair")
    REPAIRS.validate(repair, opts)
    return opts


def _refuse_options_without_effect(registry, name: str, opts: dict, option: str, option_flag: str,
                                   what: str) -> None:
    """Options given for a registered ``name`` (a repair, a refinement) that takes none would have no effect.

    Raises:
        OptionValueError: naming the first option and the names that take options."""
    if not opts or registry.get(name).options:
        return
    taking = [n for n in registry.names() if registry.get(n).options]
    instead = " or ".join(f"{option} {n}" for n in taking) if taking else f"{option} with options"
    key = next(iter(opts))
    if name == "none":
        raise OptionValueError(f"{option_flag} {key} has no effect without {what} ({option} is none); pass "
                               f"{instead}, or drop the option")
    raise OptionValueError(f"{option_flag} {key} has no effect: {option} {name} takes no options; pass {instead}, "
                           f"or drop the option")


def _alpha_of(alphas: Sequence[float], n: int):
    """The interpolation weights of ``--alpha`` for ``n`` models (counted once module:function specs
    returned theirs): one per model, or the second's weight for two; None when not given."""
    if not alphas:
        return None
    if len(alphas) == 1 and n == 2:
        return float(alphas[0])
    if len(alphas) == n:
        return [float(a) for a in alphas]
    raise click.BadParameter(f"give one --alpha per model ({n}), or one for two models", param_hint="--alpha")


@main.command(epilog=EPILOG_COMPRESS)
@click.argument("model")
@click.option("--method", default="ot", show_default=True,
              help="ot (transport onto fewer units), merge (merge correlated features), magnitude (L1 pruning), permute.")
@click.option("--budget", type=float, default=None, hidden=True)  # (fuse's option: refused with a reason)
@_fusion_options
@_timm_options
def compress(model, method, budget, **kw) -> None:
    """Compress MODEL to a narrower width (--width 0.5, or --target a narrower model of its family).

    Features are merged onto fewer units through the same engine as fusion, then norms are repaired
    on calibration data (--repair). (Partial matching, `fusion fuse --budget`, needs two or more
    models: compress has no --budget.)
    """
    if budget is not None:
        raise OptionValueError(f"--budget {budget:g} is partial matching of two or more models (`fusion fuse "
                               f"--budget`), which sets the fused widths itself; compress has one model: give its "
                               f"width with --width or --target")
    if kw.get("target_spec") is None and kw.get("width") is None:
        raise click.UsageError("give --width (e.g. 0.5) or --target (a narrower model)")
    _run_fusion([model], method, None, command="compress", **kw)


@main.command(epilog=EPILOG_INTERPOLATE)
@click.argument("models", nargs=2)
@click.option("--out", required=True, help="Folder for interpolation.json and interpolation.png.")
@click.option("--overwrite", is_flag=True, help="Replace interpolation.json and interpolation.png in --out (default: "
                                                "refuse, before any work).")
@click.option("--methods", default="average,permute", show_default=True,
              help="Comma-separated fusion methods (registered ones: `fusion methods` lists them, --import adds "
                   "yours).")
@click.option("--repairs", default="none,reset_bn", show_default=True,
              help="Comma-separated repairs (none, reset_bn, repair, or a repair registered with --import).")
@click.option("--steps", type=int, default=11, show_default=True, help="Number of alphas from 0 to 1.")
@click.option("--calibration-size", type=int, default=2000, show_default=True,
              help="Calibration images drawn from the train split of --data.")
@click.option("--calibration-seed", type=int, default=0, show_default=True, help="Seed of the calibration draw.")
@click.option("--test-limit", "--limit", "test_limit", type=click.IntRange(min=1), default=None,
              help="Evaluate on the first N test images only.")
@click.option("--zoo", "zoo_dir", default=None, help="Zoo folder for zoo names (default: $FUSION_ZOO).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for randomised solvers.")
@click.option("--device", default=None, help="Device for statistics, repair and evaluation (default cpu).")
@click.option("--option", "options", multiple=True, help="Method option key=value (repeatable).")
@_data_options
@_timm_options
def interpolate(models, out, overwrite, methods, repairs, steps, calibration_size, calibration_seed, test_limit,
                zoo_dir, seed, device, options, checkpoints, kwargs_json, num_classes, **kw) -> None:
    """Loss and accuracy along the path between two models, per fusion method and repair.

    Writes OUT/interpolation.json (the curves) and OUT/interpolation.png (accuracy and loss vs alpha).
    The test data uses the first model's classes.
    """
    from alignment.methods import METHODS

    from .interpolate import JSON_NAME, PLOT_NAME, _method_options, default_alphas, interpolation_report
    from .checks import check_device
    from .io import check_inputs_kept, check_output_folder
    from .repair import REPAIRS

    check_output_folder(out, (JSON_NAME, PLOT_NAME), overwrite)  # before any work
    check_device(device)
    data = _data_of(kw)
    method_opts = method_options(options)
    _import_user_modules(models, data.spec)  # (what they register is known to the checks below)
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    repair_list = [r.strip() for r in repairs.split(",") if r.strip()]
    if not repair_list:
        raise click.BadParameter(f"give at least one repair (registered: {', '.join(REPAIRS)}); got {repairs!r}",
                                 param_hint="--repairs")
    for r in repair_list:
        _check_registered(REPAIRS, r, "--repairs", "interpolate")
    if not method_list:
        raise click.BadParameter("give at least one method", param_hint="--methods")
    for m in method_list:
        _check_registered(METHODS, m, "--methods", "interpolate")
    _method_options(method_list, method_opts)  # (each option a method's, with a valid value: before any work)
    if steps < 2:
        raise click.BadParameter("needs at least 2 steps", param_hint="--steps")
    resolved = _resolve_all(models, zoo_dir, checkpoints, kwargs_json, num_classes)
    _refuse_zipped(models, resolved, "cannot be interpolated")
    mods = [m for m, _ in resolved]
    entries = [e for _, e in resolved]
    check_inputs_kept(out, _input_paths(models, entries, checkpoints), what="the curves",
                      extra=[Path(out) / JSON_NAME, Path(out) / PLOT_NAME])
    if all(e is not None for e in entries) and list(entries[0].classes) != list(entries[1].classes):
        click.echo(f"warning: the models' classes differ ({entries[0].classes} vs {entries[1].classes}); "
                   "evaluating on the first model's", err=True)
    calibration = data.calibration(mods[0], entries, calibration_size, calibration_seed)
    first_classes = entries[0].classes if entries[0] is not None else _arch_of(mods[0], None)[2]
    test = data.test(mods[0], first_classes, test_limit)
    curves = interpolation_report(mods, calibration, test, methods=method_list, repairs=repair_list,
                                  alphas=default_alphas(steps), out=out, device=device, progress=_progress(),
                                  seed=seed, overwrite=overwrite, **method_opts)
    for c in curves:
        click.echo(f"{c['method']:>16s} + {c['repair']:8s}: accuracy "
                   + " ".join(f"{100 * a:.1f}" for a in c["accuracy"])
                   + f" | barrier acc {100 * c['barrier_accuracy']:.2f} pts, loss {c['barrier_loss']:.3f}"
                   + f" ({c['seconds']:.1f}s)")
    click.echo(f"wrote {Path(out) / 'interpolation.json'} and {Path(out) / 'interpolation.png'}")


@main.command(epilog=EPILOG_METHODS)
def methods() -> None:
    """List the registered fusion methods, repairs and refinements with their options and defaults.

    Those of your own appear when the module that registers them is imported: `fusion --import
    MODULE methods`.
    """
    from alignment.methods import METHODS

    from .refine import REFINEMENTS
    from .repair import REPAIRS

    for title, reg in (("methods (--method, options with --option key=value)", METHODS),
                       ("repairs (--repair, options with --repair-option key=value)", REPAIRS),
                       ("refinements (--refine, options with --refine-option key=value)", REFINEMENTS)):
        click.echo(f"{title}:")
        for line in reg.describe().splitlines():
            click.echo(f"  {line}")


EPILOG_DEMO = """\b
Example:
  fusion demo                      # ResNets, a fresh fusion-demo* folder in the current directory
  fusion demo --arch vit --out runs/demo-vit
  fusion demo --epochs 1 --test-limit 2000   # a quick look (ResNets near 80%; far fewer
                                             # training steps leave them untrained)
"""


@main.command(epilog=EPILOG_DEMO)
@click.option("--arch", default="resnet", show_default=True, type=click.Choice(["resnet", "vit"]),
              help="Architecture of the two models trained for the demo.")
@click.option("--out", default=None, help="Output folder (must not exist or be empty; default: a fresh fusion-demo* "
                                          "folder in the current directory).")
@click.option("--train-size", type=int, default=20000, show_default=True, help="Training images per model.")
@click.option("--epochs", type=int, default=4, show_default=True, help="Training epochs per model.")
@click.option("--calibration-size", type=int, default=1000, show_default=True, help="Calibration images for fusion.")
@click.option("--test-limit", type=click.IntRange(min=1), default=None, help="Evaluate on the first N test images only.")
@click.option("--no-cache", is_flag=True, help="Always train (default: reuse models trained by an earlier run, kept "
                                                "in $FUSION_CACHE or ~/.cache/fusion-toolkit).")
@click.option("--download", is_flag=True, help="Let torchvision download Fashion-MNIST when it is not installed.")
@click.option("--data-root", default=None, help="Fashion-MNIST folder (default: $FUSION_DATA_DIR or the Debian path).")
def demo(arch, out, train_size, epochs, calibration_size, test_limit, no_cache, download, data_root) -> None:
    """Train two small models from different seeds, fuse them with the main methods, print the table.

    Needs nothing from outside the package: Fashion-MNIST when installed (else scikit-learn's digits),
    the project's training recipe, and a few minutes on 2 CPU cores (a second run reuses the trained
    models). Writes demo.json and the interpolation curves (interpolation.json, interpolation.png).
    """
    from .experiments.demo import format_table, run_demo

    if train_size < 10 or epochs < 1 or calibration_size < 2:
        raise click.UsageError("--train-size must be >= 10, --epochs >= 1 and --calibration-size >= 2")
    result = run_demo(arch=arch, out=out, train_size=train_size, epochs=epochs, calibration_size=calibration_size,
                      test_size=test_limit, cache=not no_cache, download=download, data_root=data_root,
                      progress=_progress(), say=lambda m: click.echo(m, err=True))
    click.echo(f"data: {result.data}")
    click.echo(format_table(result))
    click.echo(f"total {result.seconds:.0f} s; wrote {result.folder / 'demo.json'} and the interpolation curves "
               f"({result.folder / 'interpolation.png'})")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
