"""Saving and loading models: safetensors weights plus a JSON constructor spec.

A model is stored as ``<stem>.safetensors`` (its plain ``state_dict``) and, for a model
saved with :func:`save_model`, a sidecar ``<stem>.json`` holding how to rebuild it::

    {"format": "fusion-model-v1",
     "arch": {"library": "timm", "name": "resnet18",
              "kwargs": {"channels": [32, 64, 128, 256], "in_chans": 1, "stem_width": 32}},
     "num_classes": 10, "classes": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], "method": "permute", ...}

``classes`` lists the dataset labels in head order (output ``j`` is label ``classes[j]``);
``widths`` (optional) gives the width of every alignment space of a model narrower or
wider than its constructor builds. Models are rebuilt from ``arch`` with random
initialisation and never fetch pretrained weights:

* ``library == "timm"``: ``timm.create_model(name, pretrained=False,
  num_classes=num_classes, **kwargs)``;
* ``library == "transformers"``: ``cls = getattr(transformers, name)`` and
  ``cls(cls.config_class(num_labels=num_classes, **kwargs))`` (e.g.
  ``ViTForImageClassification`` with ``ViTConfig``).

A zoo (:mod:`fusion.experiments.zoo`) stores many models with one manifest instead of
sidecars; its entries are :class:`ModelSpec` objects with training metadata.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Mapping

import torch
from torch import nn

from alignment.errors import FusionError

__all__ = [
    "SIDECAR_FORMAT",
    "KNOWN_LIBRARIES",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointMismatchError",
    "UnknownArchitectureError",
    "SidecarError",
    "ModelSpec",
    "build_model",
    "example_input",
    "space_widths",
    "resized_widths",
    "state_dict_for_saving",
    "save_weights",
    "load_weights",
    "read_state",
    "STATE_KEYS",
    "CheckpointCorruptError",
    "OutputExistsError",
    "OutputNotWritableError",
    "check_output",
    "check_output_folder",
    "check_inputs_kept",
    "model_paths",
    "remove_stale_forms",
    "transformers_progress",
    "write_files",
    "save_model",
    "save_zipped",
    "save_library_forms",
    "library_form_paths",
    "load_timm_json",
    "timm_kwargs",
    "load_model_file",
]

SIDECAR_FORMAT = "fusion-model-v1"
"""Value of the ``format`` field of the JSON sidecars written by :func:`save_model`."""

KNOWN_LIBRARIES = ("timm", "transformers")
"""Libraries a constructor spec may name."""

_FOLDER_FORMS = (".hf",)
# suffixes of the library forms (library_form_paths) that are folders, not files


class CheckpointError(FusionError):
    """Base class of the errors raised while building, saving or loading a model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The weights file (or the sidecar) of a model is missing."""


class CheckpointMismatchError(CheckpointError, RuntimeError):
    """A checkpoint's tensors do not match the architecture it is loaded into."""


class CheckpointCorruptError(CheckpointError, ValueError):
    """A weights file that safetensors cannot read (truncated or corrupted)."""


class OutputExistsError(CheckpointError, FileExistsError):
    """An output file exists and overwriting was not asked for."""


class OutputNotWritableError(CheckpointError, PermissionError):
    """An output folder cannot be created or written."""


class UnknownArchitectureError(CheckpointError, ValueError):
    """An ``arch`` spec naming an unknown library or model, or kwargs its constructor rejects."""


class SidecarError(CheckpointError, ValueError):
    """A sidecar (or the fields given to write one) is malformed."""


# ---------------------------------------------------------------------------
# Constructor specs
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class ModelSpec:
    """How to rebuild a stored model.

    Attributes:
        name: Model name (the stem of its weights file).
        library: ``"timm"`` or ``"transformers"``.
        arch_name: timm model name or transformers model class name.
        kwargs: Extra constructor keyword arguments.
        num_classes: Width of the classification head.
        classes: Dataset labels in head order (output ``j`` is ``classes[j]``).
        weights: Path of the ``.safetensors`` file, if known.
        extra: Any further fields (e.g. how the model was fused), kept as they are.
    """

    name: str
    library: str
    arch_name: str
    kwargs: dict[str, Any]
    num_classes: int
    classes: list[int]
    weights: Path | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    # Typed optional fields a subclass adds (name -> converter); read by from_dict/to_dict.
    OPTIONAL_FIELDS: ClassVar[Mapping[str, type]] = {}
    # The error raised for a malformed dictionary.
    SPEC_ERROR: ClassVar[type[Exception]] = SidecarError

    @property
    def arch(self) -> dict[str, Any]:
        """The constructor spec ``{"library", "name", "kwargs"}`` for :func:`build_model`."""
        return {"library": self.library, "name": self.arch_name, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(
        cls, name: str, data: Mapping[str, Any], weights: Path | None = None, source: str = "sidecar"
    ) -> "ModelSpec":
        """Builds a spec from its JSON object (a sidecar, or a zoo manifest entry).

        Args:
            name: Model name.
            data: The JSON object.
            weights: Path of the weights file.
            source: Where ``data`` came from, for error messages.

        Returns:
            The spec.

        Raises:
            SidecarError: If a required field is missing or malformed (a zoo entry raises
                :class:`fusion.experiments.zoo.ManifestError`).
        """
        error = cls.SPEC_ERROR
        if not isinstance(data, Mapping):
            raise error(f"{source}: entry {name!r} must be a JSON object, got {type(data).__name__}.")
        arch = data.get("arch")
        if not isinstance(arch, Mapping) or "library" not in arch or "name" not in arch:
            raise error(
                f"{source}: entry {name!r} needs an 'arch' object with 'library' and 'name' "
                f"(and optional 'kwargs'), got {arch!r}."
            )
        kwargs = arch.get("kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise error(f"{source}: entry {name!r} has non-object arch.kwargs {kwargs!r}.")
        if "num_classes" not in data:
            raise error(f"{source}: entry {name!r} lacks 'num_classes'.")
        try:
            num_classes = int(data["num_classes"])
            classes = data.get("classes")
            classes = list(range(num_classes)) if classes is None else [int(c) for c in classes]
            optional = {
                key: None if data.get(key) is None else convert(data[key])
                for key, convert in cls.OPTIONAL_FIELDS.items()
            }
        except (TypeError, ValueError) as exc:
            raise error(f"{source}: entry {name!r} has a malformed field: {exc}.") from exc
        if len(classes) != num_classes:
            raise error(
                f"{source}: entry {name!r} lists {len(classes)} classes but num_classes is "
                f"{num_classes}; they must agree (one class per head output)."
            )
        known = {"arch", "num_classes", "classes", *cls.OPTIONAL_FIELDS}
        return cls(
            name=str(name),
            library=str(arch["library"]),
            arch_name=str(arch["name"]),
            kwargs=dict(kwargs),
            num_classes=num_classes,
            classes=classes,
            weights=weights,
            extra={k: v for k, v in data.items() if k not in known},
            **optional,
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns the spec as a JSON object (without name and weights path).

        Returns:
            A JSON-serialisable dictionary; ``extra`` fields are merged back in.
        """
        out: dict[str, Any] = {
            "arch": self.arch,
            "num_classes": self.num_classes,
            "classes": list(self.classes),
        }
        for key in self.OPTIONAL_FIELDS:
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        out.update(self.extra)
        return out


def _check_arch(arch: Mapping[str, Any] | ModelSpec) -> tuple[str, str, dict[str, Any]]:
    if isinstance(arch, ModelSpec):
        arch = arch.arch
    if not isinstance(arch, Mapping) or "library" not in arch or "name" not in arch:
        raise UnknownArchitectureError(
            f"arch must be a mapping with 'library' ({' or '.join(KNOWN_LIBRARIES)}), "
            f"'name' and optional 'kwargs'; got {arch!r}."
        )
    library, name = str(arch["library"]), str(arch["name"])
    kwargs = dict(arch.get("kwargs") or {})
    if library not in KNOWN_LIBRARIES:
        raise UnknownArchitectureError(
            f"Unknown model library {library!r} in arch {dict(arch)!r}; supported: "
            f"{', '.join(KNOWN_LIBRARIES)}."
        )
    if kwargs.get("pretrained"):
        raise UnknownArchitectureError(
            f"arch {name!r} asks for pretrained=True; models are built with random "
            "initialisation and loaded from their checkpoint. Remove 'pretrained'."
        )
    kwargs.pop("pretrained", None)
    return library, name, kwargs


def build_model(arch: Mapping[str, Any] | ModelSpec, num_classes: int | None) -> nn.Module:
    """Builds a randomly initialised model from its constructor spec.

    Nothing is downloaded: timm models are created with ``pretrained=False`` and
    transformers models from a config object.

    Args:
        arch: ``{"library": "timm" | "transformers", "name": ..., "kwargs": {...}}``
            (or a :class:`ModelSpec`, whose ``arch`` is used).
        num_classes: Width of the classification head (None: the constructor's default, e.g.
            for a ``.timm.json`` that does not name it).

    Returns:
        The model, in eval mode.

    Raises:
        UnknownArchitectureError: If the library or model name is unknown, or the
            kwargs are rejected by the constructor.
    """
    library, name, kwargs = _check_arch(arch)
    head = {} if num_classes is None else {"num_classes": int(num_classes)}
    key = "num_classes" if library == "timm" else "num_labels"
    if key in kwargs:  # (the class count is the checkpoint's: kwargs may repeat it, not contradict it)
        if head and kwargs[key] != head["num_classes"]:
            raise UnknownArchitectureError(
                f"arch {name!r} kwargs name {key}={kwargs[key]!r} but the model has {head['num_classes']} classes; "
                f"remove {key} from the kwargs (the class count comes from the weights)")
        head = {}
    if library == "timm":
        import timm

        if not timm.is_model(name):
            raise UnknownArchitectureError(
                f"timm has no model named {name!r}; check the name with timm.list_models()."
            )
        try:
            model = timm.create_model(name, pretrained=False, **head, **kwargs)
        except (TypeError, ValueError, AssertionError) as exc:  # an unknown kwarg, or a value it refuses
            raise UnknownArchitectureError(
                f"timm model {name!r} rejected kwargs {kwargs}: {exc}"
            ) from exc
    else:
        import transformers

        cls = getattr(transformers, name, None)
        config_cls = getattr(cls, "config_class", None) if isinstance(cls, type) else None
        if cls is None or not isinstance(cls, type) or not issubclass(cls, nn.Module) or config_cls is None:
            raise UnknownArchitectureError(
                f"transformers has no model class {name!r} with a config_class; use a "
                "class such as 'ViTForImageClassification' or 'ResNetForImageClassification'."
            )
        try:
            config = config_cls(**({"num_labels": head["num_classes"]} if head else {}), **kwargs)
        except (TypeError, ValueError) as exc:
            raise UnknownArchitectureError(
                f"{config_cls.__name__} rejected kwargs {kwargs} for {name!r}: {exc}"
            ) from exc
        model = cls(config)
    return model.eval()


def example_input(arch: Mapping[str, Any] | ModelSpec, batch: int = 2,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A random input batch that fits a constructor spec: channels and image size from its kwargs,
    else from the format the model it builds declares (timm ``pretrained_cfg``, a transformers
    config's ``num_channels`` / ``image_size``; see :func:`fusion.experiments.data.input_format`),
    else 1 channel at 28 x 28.

    Args:
        arch: The constructor spec.
        batch: Number of images.
        dtype: Floating dtype of the batch: that of the model it is fed to (a bfloat16 or float64
            model refuses float32 inputs; :func:`alignment.runner.model_dtype` gives it).

    Returns:
        A ``(batch, channels, height, width)`` tensor (the same values for the same spec).
    """
    _, _, kwargs = _check_arch(arch)
    chans = kwargs.get("in_chans", kwargs.get("num_channels"))
    size = kwargs.get("img_size", kwargs.get("image_size"))
    if chans is None or size is None:
        fmt = _declared_format(arch)
        chans = chans if chans is not None else (fmt.channels or 1)
        size = size if size is not None else (fmt.image_size or 28)
    h, w = (size[0], size[-1]) if isinstance(size, (list, tuple)) else (size, size)
    x = torch.randn(batch, int(chans), int(h), int(w), generator=torch.Generator().manual_seed(0))
    return x.to(dtype)


def _fit_input(example: Any, model: nn.Module) -> Any:
    """``example`` in the floating dtype and on the device of ``model`` (a bfloat16 or float64 model
    refuses float32 inputs); a non-floating or non-tensor input is left as it is."""
    from alignment.runner import model_device, model_dtype

    if isinstance(example, torch.Tensor) and example.is_floating_point():
        return example.to(device=model_device(model), dtype=model_dtype(model, default=example.dtype))
    return example


def _declared_format(arch: Mapping[str, Any] | ModelSpec):
    """The input format of the model ``arch`` builds (built on the meta device where it can be)."""
    from .experiments.data import input_format

    try:
        with torch.device("meta"):
            model = build_model(arch, None)
    except UnknownArchitectureError:
        raise
    except Exception:  # noqa: BLE001 - a constructor that needs real values (e.g. .item()): built for real below
        model = None
    return input_format(model if model is not None else build_model(arch, None))


def space_widths(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Width of every feature space of a model (what :func:`save_model` records as ``widths``).

    Args:
        model: The model (run once on ``example``; not modified).
        example: An input batch (e.g. :func:`example_input`); a floating one is cast to the
            model's dtype and device first.

    Returns:
        Space name to width.
    """
    from alignment import discover

    return {s.name: s.width for s in discover(model, _fit_input(example, model)).spaces if s.kind == "features"}


def resized_widths(
    model: nn.Module, arch: Mapping[str, Any] | ModelSpec, num_classes: int
) -> dict[str, int] | None:
    """The ``widths`` to pass to :func:`save_model`: None when ``arch`` builds the model's widths.

    Args:
        model: A model of the family of ``arch`` (e.g. compressed, or fused to a width factor).
        arch: Its constructor spec.
        num_classes: Width of its classification head.

    Returns:
        The width of every feature space of ``model`` if some differ from those ``arch``
        builds, else None.
    """
    example = example_input(arch)
    widths = space_widths(model, example)
    return widths if widths != space_widths(build_model(arch, num_classes), example) else None


def _resized(model: nn.Module, arch: Mapping[str, Any] | ModelSpec, widths: Mapping[str, int],
             where: str = "the sidecar") -> nn.Module:
    from alignment import discover

    from .resize import _template

    if not isinstance(widths, Mapping) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in widths.values()):
        raise SidecarError(f"{where}: 'widths' must map space names to positive integer widths, got {widths!r:.200}.")
    widths = {**{str(k): int(v) for k, v in widths.items()}, "*": 1.0}
    return _template(model, widths, discover(model, _fit_input(example_input(arch), model)))


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------


def state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """Returns a copy of the model's ``state_dict`` that safetensors can store.

    Every tensor is detached, moved to CPU, made contiguous and cloned, so tied or
    shared tensors (which safetensors refuses) become independent copies and the
    model itself is untouched.

    Args:
        model: The model.

    Returns:
        Name-to-tensor mapping of independent CPU tensors.

    Raises:
        CheckpointError: an entry of the state dict is no tensor (a module's ``get_extra_state``
            returning a dict), which safetensors cannot store.
    """
    state = model.state_dict()
    other = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if other:
        raise CheckpointError(f"state dict entry {other[0]!r} is a {type(state[other[0]]).__name__}, not a tensor "
                              f"(a module's get_extra_state?); safetensors stores tensors only: keep that state "
                              f"yourself, or return a tensor from get_extra_state")
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_weights(model: nn.Module, path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None,
                 overwrite: bool = False) -> Path:
    """Writes the model's ``state_dict`` to a ``.safetensors`` file (atomically, as :func:`save_model`).

    Args:
        model: The model (not modified).
        path: Output file; its parent folder is created if missing.
        metadata: Optional string metadata stored in the file header.
        overwrite: Replace an existing file (else :class:`OutputExistsError`).

    Returns:
        The path written.

    Raises:
        OutputExistsError: If ``path`` exists (a dangling symlink included) and ``overwrite`` is false.
        OutputNotWritableError: If ``path`` is a folder, or its folder cannot be created or written.
    """
    from safetensors.torch import save

    path = Path(path)
    _refuse_folder(path, "weights")
    _refuse_existing(path, overwrite)
    _check_writable(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = save(state_dict_for_saving(model), metadata=dict(metadata) if metadata else None)
    _commit([(path, data)])
    return path


def _mismatch_report(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]

    def _fmt(keys: list[str], limit: int = 10) -> str:
        head = ", ".join(keys[:limit])
        return head + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")

    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_fmt(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {_fmt(shapes)}")
    return problems


STATE_KEYS = ("state_dict", "model", "model_state_dict")
"""Keys under which a torch checkpoint file may hold the state dict (the training loop's dict)."""


def read_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The state dict in a weights file: ``.safetensors``, or a torch checkpoint (``.pt``, ``.pth``,
    ``.bin``, ...: a state dict, or a dict holding one under a key of :data:`STATE_KEYS`), read
    without unpickling code (``weights_only``).

    Raises:
        CheckpointNotFoundError: the file does not exist.
        CheckpointCorruptError: the file cannot be read (truncated, not a checkpoint, a pickled
            whole model) or holds no state dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"Weights file {path} not found{' (it is a folder)' if path.is_dir() else ''}.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error type for a damaged file
            raise CheckpointCorruptError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc}); it "
                                         f"may be truncated or corrupted: save or copy it again") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip-archive and weights-only errors alike
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise CheckpointCorruptError(
            f"{path} is not a torch checkpoint of weights that can be read safely ({type(exc).__name__}: {first}); "
            f"save the model's state_dict() (torch.save(model.state_dict(), path), not the whole model) or a "
            f".safetensors file") from None
    if isinstance(obj, Mapping):
        obj = next((obj[k] for k in STATE_KEYS if isinstance(obj.get(k), Mapping)), obj)
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                          for k, v in obj.items()):
        raise CheckpointCorruptError(
            f"{path} holds a {type(obj).__name__} that is no state dict of tensors (nor a dict holding one under "
            f"{', '.join(repr(k) for k in STATE_KEYS)}); save model.state_dict()")
    return dict(obj)


def load_weights(model: nn.Module, path: str | os.PathLike[str], what: str | None = None) -> nn.Module:
    """Loads the state dict of a weights file (see :func:`read_state`) into a model with strict key
    and shape checks. A file whose floating tensors share one dtype (a bfloat16 model's) converts
    the model to it first; tensors the model does not save (non-persistent buffers) are ignored.

    Args:
        model: Freshly built model to fill (modified in place).
        path: The ``.safetensors`` file or torch checkpoint.
        what: Description of the model for error messages (defaults to the path).

    Returns:
        ``model``, for chaining.

    Raises:
        CheckpointNotFoundError: If the file does not exist.
        CheckpointCorruptError: If it cannot be read or holds no state dict.
        CheckpointMismatchError: If keys are missing or unexpected, or shapes differ.
    """
    path = Path(path)
    what = what or str(path)
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"Weights of {what} not found at {path}; check the zoo folder or re-create the checkpoint."
        )
    state = read_state(path)
    # a tensor the model holds but does not save (a non-persistent buffer, e.g. a zipped branch's
    # class token, which older versions saved as a parameter): its value is not the file's to set
    transient = {f"{p}.{b}" if p else b for p, m in model.named_modules() for b in m._non_persistent_buffers_set}
    state = {k: v for k, v in state.items() if k not in transient}
    # a model saved in one floating dtype (bfloat16, float16, float64) comes back in it
    saved = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(saved) == 1 and {t.dtype for t in model.state_dict().values() if t.is_floating_point()} != saved:
        model.to(dtype=saved.pop())
    problems = _mismatch_report(model, state)
    if problems:
        raise CheckpointMismatchError(
            f"Checkpoint {path} does not match the architecture of {what}: "
            + "; ".join(problems)
            + ". Check the arch spec (name, kwargs, num_classes) recorded for it."
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # e.g. dtype problems the pre-check cannot see
        raise CheckpointMismatchError(f"Could not load {path} into {what}: {exc}") from exc
    return model


# ---------------------------------------------------------------------------
# Safe outputs
# ---------------------------------------------------------------------------


def _occupied(path: Path) -> bool:
    """Whether something is at ``path``: a file, a folder or a symlink (a dangling one included, which
    ``Path.exists`` does not see)."""
    return path.exists() or path.is_symlink()


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if _occupied(path) and not overwrite:
        what = "is a symlink to a missing file" if not path.exists() else "exists"
        raise OutputExistsError(f"{path} {what}; choose another output path or allow overwriting "
                                f"(overwrite=True, --overwrite)")


def _refuse_folder(path: Path, what: str = "output") -> None:
    """A folder (not a symlink to one) where a file is to be written: refused even with ``overwrite``
    (replacing would delete the folder and everything in it)."""
    if path.is_dir() and not path.is_symlink():
        raise OutputNotWritableError(f"{path} is a folder, where the {what} file is to be written; a folder is never "
                                     f"replaced, even with overwrite: move or rename it, or choose another output path")


def _remove(path: Path) -> None:
    """Remove what is at ``path``: a symlink or file is unlinked (a link's target is kept), a folder removed."""
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def check_output(path: str | os.PathLike[str], overwrite: bool = False, sidecar: bool = True,
                 extra: Iterable[Path] = ()) -> tuple[Path, Path]:
    """Check, before any work, that a model can be written to ``path``: its folder exists or can be
    created and is writable, and (unless ``overwrite``) neither the weights, the sidecar nor any of
    the ``extra`` paths (e.g. :func:`library_form_paths`) exist (a dangling symlink counts as existing).
    A folder where a file is to be written (the weights, the sidecar, a ``.timm.json`` form) is
    refused even with ``overwrite``.

    Returns:
        ``(weights path, sidecar path)``.

    Raises:
        OutputExistsError: an output exists and ``overwrite`` is false.
        OutputNotWritableError: the folder cannot be created or written, ``path`` names a folder
            (``out/`` or an existing directory: the model would land beside it, not in it), or a
            folder stands where an output file is to be written.
    """
    if str(path).endswith(("/", os.sep)) or Path(path).is_dir():
        folder = Path(path)
        # (a model folder is an input: the example is beside it, not in it)
        example = (folder.with_name(folder.name + "-fused.safetensors") if (folder / "config.json").exists()
                   else folder / "fused.safetensors")
        raise OutputNotWritableError(f"{path} names a folder; give a file path for the model, e.g. {example}")
    weights, side = model_paths(path)
    outputs = [weights, *([side] if sidecar else []), *map(Path, extra)]
    for p in outputs:
        if p.suffix not in _FOLDER_FORMS:
            _refuse_folder(p, "weights" if p == weights else "sidecar" if p == side else "output")
    for p in outputs:
        _refuse_existing(Path(p), overwrite)
    _check_writable(weights.parent)
    return weights, side


def check_inputs_kept(path: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]],
                      extra: Iterable[Path] = (), what: str = "the model") -> None:
    """Check, before any work, that writing ``what`` to ``path`` and the ``extra`` paths replaces
    none of ``inputs`` (files or folders the job reads: source models, checkpoints), even with
    ``overwrite``. ``what="the model"`` writes its weights and sidecar at ``path``; anything else
    (e.g. ``"the curves"``) only the ``extra`` paths.

    Raises:
        OutputNotWritableError: an output is an input, a folder output would hold one, or an output
            lies inside an input folder (a transformers model folder: its own weights).
    """
    outs = [p.resolve() for p in (*(model_paths(path) if what == "the model" else ()), *map(Path, extra))]
    for i in inputs:
        i = Path(i).resolve()
        for o in outs:
            if o == i or o in i.parents:
                raise OutputNotWritableError(f"writing {what} to {path} would replace the input {i}; choose "
                                             f"another output path")
            if i.is_dir() and i in o.parents:
                raise OutputNotWritableError(f"writing {what} to {path} would write into the input folder {i}; "
                                             f"choose an output path outside it")


def remove_stale_forms(path: str | os.PathLike[str], written: Iterable[Path]) -> list[Path]:
    """Remove the library forms (:func:`library_form_paths`) of ``path`` that this save did not write
    (left by an earlier model saved there, they would describe other weights). Returns them."""
    keep = {Path(p) for p in written}
    gone = []
    for p in library_form_paths(path):
        if p not in keep and _occupied(p):
            _remove(p)
            gone.append(p)
    return gone


def _check_writable(folder: Path) -> None:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise OutputNotWritableError(f"cannot write to {folder} ({probe} is not a writable folder); choose another "
                                     f"output path")


def check_output_folder(folder: str | os.PathLike[str], names: Iterable[str], overwrite: bool = False) -> Path:
    """Check, before any work, that files ``names`` can be written into ``folder``: it is a folder or
    can be created as one, it is writable, and (unless ``overwrite``) none of the files exists.

    Returns:
        The folder as a ``Path``.

    Raises:
        OutputExistsError: one of the files exists and ``overwrite`` is false.
        OutputNotWritableError: ``folder`` is an existing file, or cannot be created or written.
    """
    folder = Path(folder)
    if _occupied(folder) and not folder.is_dir():
        what = "a symlink to a missing folder" if folder.is_symlink() and not folder.exists() else "a file"
        raise OutputNotWritableError(f"{folder} is {what}, not a folder; choose a folder for the output")
    for name in names:
        _refuse_existing(folder / name, overwrite)
    _check_writable(folder)
    return folder


def write_files(folder: str | os.PathLike[str], files: Mapping[str, bytes]) -> list[Path]:
    """Write ``files`` (name -> content) into ``folder`` (created if missing) all or nothing: an
    interruption leaves either every old file or every new one (see :func:`save_model`).

    Returns:
        The paths written, in order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in files]
    _commit(list(zip(paths, files.values())))
    return paths


@contextlib.contextmanager
def transformers_progress(enabled: bool) -> Iterator[None]:
    """Turn transformers' progress bars (loading and writing weights) on or off inside the block,
    and back to what they were after it."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _commit(files: list[tuple[Path, bytes]]) -> None:
    """Write ``files`` (path, content) so that an interruption leaves either all the old files or all
    the new ones: each is written to a temporary file in its folder and flushed; the old files are
    moved aside, the new ones renamed into place in order (a sidecar last), and the old ones removed
    only once every new file is in place. Any failure, Ctrl-C included, puts the old files back."""
    import tempfile

    for path, _ in files:  # (before anything is written: a folder would be moved aside, then fail to go)
        _refuse_folder(path)
    temps: list[tuple[Path, Path]] = []
    backups: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        for path, data in files:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            temps.append((Path(tmp), path))
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, _file_mode())
        for _, path in temps:
            if _occupied(path):
                backup = path.with_name(f".{path.name}.old")
                os.replace(path, backup)
                backups.append((backup, path))
        for tmp, path in temps:
            os.replace(tmp, path)
            placed.append(path)
    except BaseException:
        for path in placed:
            path.unlink(missing_ok=True)
        for backup, path in backups:
            os.replace(backup, path)
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise
    for backup, _ in backups:
        backup.unlink(missing_ok=True)


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _check_hash(weights: Path, sidecar: Path, data: Mapping[str, Any]) -> None:
    want = data.get("weights_sha256")
    if want is None:
        return
    if _sha256(weights.read_bytes()) != want:
        raise CheckpointMismatchError(f"{sidecar} belongs to other weights than {weights} (SHA-256 differs): the "
                                      f"pair was mixed, e.g. by an interrupted save; save the model again")


# ---------------------------------------------------------------------------
# Models with a sidecar
# ---------------------------------------------------------------------------


def model_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(weights, sidecar)`` of a model path: the ``.safetensors`` file, its ``.json`` sidecar, or
    their common stem (a stem may hold dots: ``runs/alpha0.3``)."""
    path = Path(path)
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    weights = path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")
    return weights, weights.with_suffix(".json")


def _jsonable(value: Any, where: str) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, where) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item(), where)
    raise SidecarError(f"{where} holds {value!r} of type {type(value).__name__}, which JSON cannot store.")


def save_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    arch: Mapping[str, Any] | ModelSpec,
    num_classes: int,
    classes: Iterable[int] | None = None,
    extra: Mapping[str, Any] | None = None,
    check: bool = True,
    widths: Mapping[str, int] | None = None,
    overwrite: bool = False,
) -> Path:
    """Saves a model as ``<stem>.safetensors`` plus a ``<stem>.json`` constructor sidecar.

    Both files are written atomically as a pair (an interruption leaves the previous files or none
    of the new ones); the sidecar records the weights' SHA-256, and loading refuses other weights.

    Args:
        model: The model (not modified; its tensors are copied).
        path: Output path, with or without the ``.safetensors`` suffix (``out/m`` and
            ``out/m.safetensors`` both write ``out/m.safetensors`` and ``out/m.json``).
            The parent folder is created if missing.
        arch: Constructor spec (see :func:`build_model`) that rebuilds ``model``.
        num_classes: Width of the classification head.
        classes: Dataset labels in head order; defaults to ``0..num_classes-1``.
        extra: Further JSON-serialisable fields stored in the sidecar (e.g. how the
            model was fused).
        check: Build ``arch`` and verify the state_dict fits it before writing
            anything, so an unloadable pair is never produced.
        widths: For a model narrower or wider than its constructor builds (compressed, or
            fused to a width factor): the width of every alignment space. Loading builds
            ``arch`` and resizes it to these widths (:func:`fusion.resize.resize`).
        overwrite: Replace existing files (else :class:`OutputExistsError`).

    Returns:
        The path of the ``.safetensors`` file.

    Raises:
        OutputExistsError: If an output exists and ``overwrite`` is false.
        UnknownArchitectureError: If ``arch`` is invalid.
        CheckpointMismatchError: If ``check`` and the model's tensors do not fit ``arch``.
        SidecarError: If ``classes`` does not have ``num_classes`` labels, or ``extra``
            is not JSON-serialisable or overrides a reserved field.
    """
    library, name, kwargs = _check_arch(arch)
    spec = {"library": library, "name": name, "kwargs": _jsonable(kwargs, "arch.kwargs")}
    num_classes = int(num_classes)
    class_list = list(range(num_classes)) if classes is None else [int(c) for c in classes]
    if len(class_list) != num_classes:
        raise SidecarError(
            f"classes has {len(class_list)} labels but num_classes is {num_classes}; give one "
            "label per head output."
        )
    weights_path, sidecar_path = check_output(path, overwrite)
    if check:
        reference = build_model(spec, num_classes)
        if widths:
            reference = _resized(reference, spec, widths)
        problems = _mismatch_report(reference, model.state_dict())
        if problems:
            raise CheckpointMismatchError(
                f"Refusing to save {weights_path}: the model does not match arch "
                f"{spec} with num_classes={num_classes}: " + "; ".join(problems) + "."
            )
    sidecar = {
        "format": SIDECAR_FORMAT,
        "arch": spec,
        "num_classes": num_classes,
        "classes": class_list,
    }
    if widths:
        sidecar["widths"] = {str(k): int(v) for k, v in widths.items()}
    for key, value in _jsonable(dict(extra or {}), "extra").items():
        if key in ("format", "arch", "num_classes", "classes", "widths", "weights_sha256"):
            raise SidecarError(f"extra must not override the reserved sidecar field {key!r}.")
        sidecar[key] = value
    _write_pair(model, weights_path, sidecar_path, sidecar)
    return weights_path


def _write_pair(model: nn.Module, weights_path: Path, sidecar_path: Path, sidecar: dict[str, Any]) -> None:
    from safetensors.torch import save

    weights_path.parent.mkdir(parents=True, exist_ok=True)
    data = save(state_dict_for_saving(model), metadata={"format": SIDECAR_FORMAT})
    sidecar = {**sidecar, "weights_sha256": _sha256(data)}
    _commit([(weights_path, data), (sidecar_path, (json.dumps(sidecar, indent=1, sort_keys=True) + "\n").encode())])


def load_model_file(path: str | os.PathLike[str]) -> tuple[nn.Module, ModelSpec]:
    """Loads a model written by :func:`save_model`.

    Args:
        path: The ``.safetensors`` file, its ``.json`` sidecar, or their common stem.

    Returns:
        ``(model, spec)`` with the model in eval mode on CPU; the spec is built from the
        sidecar (its ``name`` is the file stem, ``extra`` holds the additional fields).

    Raises:
        CheckpointNotFoundError: If the weights or the sidecar are missing.
        SidecarError: If the sidecar is malformed.
        CheckpointMismatchError: If the weights do not fit the recorded architecture.
    """
    weights_path, sidecar_path = model_paths(path)
    if not weights_path.is_file() and not sidecar_path.is_file():
        raise CheckpointNotFoundError(f"No model file at {path}: neither {weights_path} nor its sidecar "
                                      f"{sidecar_path} exists.")
    if not sidecar_path.is_file():
        raise CheckpointNotFoundError(
            f"No sidecar {sidecar_path} next to {weights_path}; it holds the constructor spec. "
            "Save models with fusion.io.save_model, or load zoo models with "
            "fusion.experiments.zoo.load_model."
        )
    try:
        data = json.loads(sidecar_path.read_text())
    except json.JSONDecodeError as exc:
        raise SidecarError(f"Sidecar {sidecar_path} is not valid JSON: {exc}.") from exc
    if not isinstance(data, dict):
        raise SidecarError(f"Sidecar {sidecar_path} holds a JSON {type(data).__name__}, not an object with the "
                           f"constructor spec; save models with fusion.io.save_model.")
    if weights_path.is_file():
        _check_hash(weights_path, sidecar_path, data)
    spec = ModelSpec.from_dict(weights_path.stem, data, weights_path, source=str(sidecar_path))
    spec.extra.pop("format", None)
    spec.extra.pop("weights_sha256", None)
    if "zipped" in data:
        model = _build_zipped(data, str(sidecar_path))
        load_weights(model, weights_path, what=f"model file {weights_path.name!r}")
        return model.eval(), spec
    model = build_model(spec, spec.num_classes)
    widths = spec.extra.pop("widths", None)
    if widths:
        model = _resized(model, spec, widths, str(sidecar_path))
    load_weights(model, weights_path, what=f"model file {weights_path.name!r}")
    return model.eval(), spec


def _zipped_field(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    z = data.get("zipped")
    if (not isinstance(z, Mapping) or not isinstance(z.get("branches"), list) or not z["branches"]
            or not isinstance(z.get("cut"), Mapping)):
        raise SidecarError(f"{where}: 'zipped' needs 'cut' and 'branches' (one object per source model).")
    if not isinstance(z.get("trunk_num_classes", 0), int):
        raise SidecarError(f"{where}: zipped 'trunk_num_classes' must be an integer.")
    return dict(z)


def _build_zipped(data: Mapping[str, Any], where: str) -> nn.Module:
    """A fresh :class:`fusion.zipped.ZippedModel` of the structure a sidecar's ``zipped`` field describes."""
    from .zipped import Cut, zipped_from_parts

    z = _zipped_field(data, where)
    branches = []
    for k, b in enumerate(z["branches"]):
        if not isinstance(b, Mapping) or "arch" not in b or "num_classes" not in b:
            raise SidecarError(f"{where}: zipped branch {k} needs 'arch' and 'num_classes'.")
        m = build_model(b["arch"], int(b["num_classes"]))
        if b.get("widths"):
            m = _resized(m, b["arch"], b["widths"], where)
        branches.append(m.eval())
    cut = Cut.from_dict(dict(z["cut"]))
    trunk = None
    if not cut.at_input:
        trunk = build_model(data["arch"], int(z["trunk_num_classes"]))
        if z.get("trunk_widths"):
            trunk = _resized(trunk, data["arch"], z["trunk_widths"], where)
        trunk = trunk.eval()
    zipped = zipped_from_parts(trunk, branches, [int(w) for w in z.get("cut_widths") or []], cut,
                               _fit_input(example_input(data["arch"]), branches[0]), heads=str(z.get("heads", "merged")),
                               alpha=z.get("alpha"))
    if z.get("trunk_widths"):
        zipped.fused_widths = dict(z["trunk_widths"])  # (what save_zipped records when it is saved again)
    return zipped


def save_zipped(
    model: nn.Module,
    path: str | os.PathLike[str],
    arch: Mapping[str, Any] | ModelSpec,
    branches: Iterable[Mapping[str, Any]],
    classes: Iterable[int],
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Saves a partially zipped model (:class:`fusion.zipped.ZippedModel`) as safetensors + sidecar.

    The sidecar records how to rebuild its structure: the fused trunk's architecture (``arch``, with
    the fused widths when they differ from what it builds), the cut, and per source model its
    architecture, class count and widths. :func:`load_model_file` rebuilds and loads it.

    Args:
        model: The zipped model (not modified); it must carry ``fused_widths`` (set by
            :func:`fusion.fuse`).
        path: Output path (as for :func:`save_model`).
        arch: Constructor spec of the fused trunk (the first model's architecture).
        branches: Per source model, ``{"arch": spec, "num_classes": k}`` (and ``"widths"`` when the
            model is narrower or wider than its constructor builds).
        classes: The labels of the zipped model's outputs, in order.
        extra: Further JSON fields.
        overwrite: Replace existing files (else :class:`OutputExistsError`).

    Returns:
        The path of the ``.safetensors`` file (written atomically with its sidecar, as by
        :func:`save_model`).

    Raises:
        OutputExistsError: If an output exists and ``overwrite`` is false.
        CheckpointMismatchError: If the rebuilt structure does not hold the model's tensors.
        SidecarError: If ``extra`` is not JSON-serialisable or overrides a reserved field.
    """
    from .zipped import ZippedModel

    if not isinstance(model, ZippedModel):
        raise SidecarError(f"save_zipped saves a partially zipped model (fusion.zipped.ZippedModel), got "
                           f"{type(model).__name__}: save it with save_model")
    weights_path, sidecar_path = check_output(path, overwrite)
    library, name, kwargs = _check_arch(arch)
    spec = {"library": library, "name": name, "kwargs": _jsonable(kwargs, "arch.kwargs")}
    class_list = [int(c) for c in classes]
    branches = list(branches)
    if len(branches) != len(model.branches):
        raise SidecarError(f"branches describes {len(branches)} source models but the zipped model has "
                           f"{len(model.branches)}: give one entry per source model, in order")
    outputs = [int(b["num_classes"]) for b in branches]
    want = sum(outputs) if model.heads == "separate" else outputs[0]
    if len(class_list) != want:
        raise SidecarError(f"classes has {len(class_list)} labels but the zipped model ({model.heads} heads of "
                           f"{outputs} classes) has {want} outputs; give one label per output, in order")
    branch_list = []
    for b in branches:
        lib, nm, kw = _check_arch(b["arch"])
        branch_list.append({"arch": {"library": lib, "name": nm, "kwargs": _jsonable(kw, "branch arch.kwargs")},
                            "num_classes": int(b["num_classes"]),
                            "widths": {str(k): int(v) for k, v in (b.get("widths") or {}).items()} or None})
    trunk_classes = branch_list[0]["num_classes"]
    fused_widths = dict(getattr(model, "fused_widths", None) or {})
    built = space_widths(build_model(spec, trunk_classes), example_input(spec)) if fused_widths else {}
    zipped = {"cut": model.cut.to_dict(), "heads": model.heads, "alpha": [float(a) for a in model.alpha],
              "trunk_num_classes": trunk_classes,
              "trunk_widths": fused_widths if fused_widths and fused_widths != built else None,
              "cut_widths": [int(getattr(model, f"unmerge_{i}").shape[0]) for i in range(len(branch_list))]
              if model.trunk is not None else [],
              "branches": branch_list}
    sidecar = {"format": SIDECAR_FORMAT, "arch": spec, "num_classes": len(class_list), "classes": class_list,
               "zipped": zipped}
    for key, value in _jsonable(dict(extra or {}), "extra").items():
        if key in sidecar:
            raise SidecarError(f"extra must not override the reserved sidecar field {key!r}.")
        sidecar[key] = value
    problems = _mismatch_report(_build_zipped(sidecar, str(sidecar_path)), model.state_dict())
    if problems:
        raise CheckpointMismatchError(f"Refusing to save {weights_path}: the zipped model does not match its recorded "
                                      f"structure: " + "; ".join(problems) + ".")
    _write_pair(model, weights_path, sidecar_path, sidecar)
    return weights_path


def save_library_forms(model: nn.Module, path: str | os.PathLike[str], arch: Mapping[str, Any] | ModelSpec,
                       num_classes: int, overwrite: bool = False) -> list[Path]:
    """Write a fused model where its library's users load it, next to the toolkit's own files.

    * transformers: a ``save_pretrained`` folder ``<stem>.hf`` whose config carries the fused sizes::

          model = transformers.AutoModelForImageClassification.from_pretrained("<stem>.hf")

    * timm: ``<stem>.timm.json`` with the ``timm.create_model`` arguments that rebuild the fused
      architecture; the weights are ``<stem>.safetensors`` (a plain state dict)::

          model = timm.create_model(**json.load(open("<stem>.timm.json")))
          model.load_state_dict(safetensors.torch.load_file("<stem>.safetensors"))

    A model whose fused widths its library cannot express gets no such form (a timm ResNet stem
    halved by ``width=0.5``: no constructor argument; a transformers config whose fields do not
    rebuild the fused shapes): only the toolkit's sidecar rebuilds it.

    Args:
        model: the fused model (not modified).
        path: the toolkit's output path (``<stem>`` or ``<stem>.safetensors``).
        arch: its constructor spec.
        num_classes: its number of outputs.
        overwrite: replace existing files.

    Returns:
        The paths written (empty when the library cannot express the model).

    Raises:
        OutputExistsError: an output exists and ``overwrite`` is false.
    """
    library, name, kwargs = _check_arch(arch)
    weights, _ = model_paths(path)
    stem = weights.with_suffix("")
    if library == "transformers":
        from .modules.core import config_rebuilds

        config = getattr(model, "config", None)
        if config is None or not config_rebuilds(model, config):  # the folder would not load
            return []
        folder = stem.with_name(stem.name + ".hf")
        _refuse_existing(folder, overwrite)
        _check_writable(folder.parent)
        tmp = folder.with_name(f".{folder.name}.tmp")
        old = folder.with_name(f".{folder.name}.old")
        for leftover in (tmp, old):  # (of an interrupted earlier save)
            if _occupied(leftover):
                _remove(leftover)
        moved = False
        try:
            with transformers_progress(False):  # (one folder: no "Writing model shards" bar)
                model.save_pretrained(str(tmp), safe_serialization=True)
            if _occupied(folder):  # a folder, a file or a symlink (whose target is kept): moved aside
                os.replace(folder, old)
                moved = True
            os.replace(tmp, folder)
        except BaseException:  # Ctrl-C included: the previous form back, no temporary copy left
            if moved:
                os.replace(old, folder)
            if _occupied(tmp):
                _remove(tmp)
            raise
        if moved:
            _remove(old)
        return [folder]
    if library != "timm":
        return []
    derived = timm_kwargs(model, arch, num_classes)
    if derived is None:
        return []
    spec = {"model_name": name, "pretrained": False, "num_classes": int(num_classes),
            **_jsonable({**kwargs, **derived}, "arch.kwargs")}
    try:
        problems = _mismatch_report(_timm_model(spec), model.state_dict())
    except Exception:  # the constructor rejects these arguments: no timm form
        return []
    if problems:
        return []
    out = stem.with_name(stem.name + ".timm.json")
    _refuse_folder(out, "timm form")
    _refuse_existing(out, overwrite)
    _commit([(out, (json.dumps(spec, indent=1, sort_keys=True) + "\n").encode())])
    return [out]


def timm_kwargs(model: nn.Module, arch: Mapping[str, Any] | ModelSpec, num_classes: int) -> dict[str, Any] | None:
    """The ``timm.create_model`` keyword arguments, beyond ``arch``'s own, that build ``model`` (a
    fused or resized model of the timm architecture ``arch``): ``{}`` when ``arch`` builds it as it
    is, None when no change of its size arguments does.

    The sizes that changed from ``arch``'s model to ``model`` (one new size for each old one) are
    written into the arguments that hold them (:func:`fusion.modules.core.derive_size_fields`):
    int arguments and int lists (``channels``, ``stem_width``, ``embed_dim``, ``dims``) and ratios
    of two sizes (``mlp_ratio``). The arguments are those of the model class's constructor as
    ``create_model`` calls it (so a ViT variant's ``embed_dim`` set by its name, and defaults such
    as a ResNet's ``channels``, count too); a change is kept only when the model it builds (on the
    meta device) has ``model``'s tensor shapes and attention heads.

    Raises:
        UnknownArchitectureError: ``arch`` is no timm spec the constructor accepts.
    """
    from .modules.core import changed_sizes, derive_size_fields

    library, name, kwargs = _check_arch(arch)
    if library != "timm":
        raise UnknownArchitectureError(f"timm_kwargs needs a timm arch, got library {library!r}")
    def build(changes: Mapping[str, Any]) -> nn.Module:
        return build_model({"library": "timm", "name": name, "kwargs": {**kwargs, **changes}}, num_classes)

    with torch.device("meta"):
        source = build({})
    values = {**_constructor_arguments(lambda: build({}), type(source)), **kwargs}
    values.pop("num_classes", None)
    sizes = changed_sizes({k: tuple(t.shape) for k, t in source.state_dict().items()},
                          {k: tuple(t.shape) for k, t in model.state_dict().items()})
    derived = derive_size_fields(model, values, sizes, build)
    return None if derived is None else {k: list(v) if isinstance(v, tuple) else v for k, v in derived.items()}


def _constructor_arguments(build: Any, cls: type) -> dict[str, Any]:
    """The arguments (defaults included) of the first ``cls.__init__`` call that ``build()`` makes,
    built on the meta device; read with a profile hook (no class is patched); ``{}`` when another
    profiler is active (its hook is left alone) or ``cls.__init__`` is not Python code."""
    import sys

    code = getattr(getattr(cls.__init__, "__wrapped__", cls.__init__), "__code__", None)
    if code is None or sys.getprofile() is not None:
        return {}
    n = code.co_argcount + code.co_kwonlyargcount
    names = code.co_varnames[:n]
    varkw = code.co_varnames[n + bool(code.co_flags & 0x04)] if code.co_flags & 0x08 else None
    got: dict[str, Any] = {}

    def hook(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is code and not got:
            local = frame.f_locals
            got.update({k: local[k] for k in names[1:] if k in local})
            if varkw and isinstance(local.get(varkw), dict):
                got.update(local[varkw])

    sys.setprofile(hook)
    try:
        with torch.device("meta"):
            build()
    finally:
        sys.setprofile(None)
    return got


def library_form_paths(path: str | os.PathLike[str]) -> list[Path]:
    """The paths :func:`save_library_forms` may write for the toolkit path ``path``."""
    stem = model_paths(path)[0].with_suffix("")
    return [stem.with_name(stem.name + ".hf"), stem.with_name(stem.name + ".timm.json")]


def _timm_model(spec: Mapping[str, Any]) -> nn.Module:
    """The model of ``timm.create_model(**spec)``, built by :func:`build_model` (so with its checks:
    a known name, kwargs the constructor takes, no pretrained weights)."""
    kwargs = {k: v for k, v in spec.items() if k not in ("model_name", "num_classes")}
    num_classes = spec.get("num_classes")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)):
        raise UnknownArchitectureError(f"timm model {spec.get('model_name')!r}: num_classes must be an integer, "
                                       f"got {num_classes!r}")
    return build_model({"library": "timm", "name": str(spec["model_name"]), "kwargs": kwargs}, num_classes)


def load_timm_json(path: str | os.PathLike[str]) -> nn.Module:
    """The model a ``<stem>.timm.json`` (see :func:`save_library_forms`) describes, with the weights of
    ``<stem>.safetensors`` loaded (eval mode).

    The arguments pass the checks of :func:`build_model`; nothing is downloaded.

    Args:
        path: The ``<stem>.timm.json`` file.

    Returns:
        The model, in eval mode.

    Raises:
        SidecarError: The file cannot be read, is not JSON, or lacks ``model_name``.
        UnknownArchitectureError: timm has no such model, its constructor rejects the arguments, or
            they ask for pretrained weights.
        CheckpointNotFoundError, CheckpointMismatchError: As for :func:`load_weights`.
    """
    path = Path(path)
    weights = path.with_name(path.name[: -len(".timm.json")] + ".safetensors")
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SidecarError(f"{path} is not a readable timm JSON ({exc})") from None
    if not isinstance(spec, dict) or "model_name" not in spec:
        raise SidecarError(f"{path} needs 'model_name' and the timm.create_model arguments")
    if spec.get("pretrained"):
        raise UnknownArchitectureError(
            f"{path} asks for pretrained=True: nothing is downloaded; the weights are those of {weights.name}. "
            f"Set \"pretrained\": false (or remove it) in {path.name}")
    try:
        model = _timm_model(spec)
    except UnknownArchitectureError as exc:
        raise type(exc)(f"{path}: {exc}") from exc
    return load_weights(model, weights, what=f"timm model {path.name!r}").eval()
