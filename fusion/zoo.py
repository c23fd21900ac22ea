"""The model-zoo format: a folder of safetensors checkpoints plus a manifest.

A zoo is a folder holding ``manifest.json``, which maps each model name to an entry
such as::

    {"arch": {"library": "timm", "name": "resnet18",
              "kwargs": {"channels": [32, 64, 128, 256], "in_chans": 1, "stem_width": 32}},
     "num_classes": 10, "classes": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], "seed": 0,
     "epochs": 8, "test_accuracy": 0.9075, "train_seconds": 188}

and ``<name>.safetensors``, the model's plain ``state_dict``. ``classes`` lists the
dataset labels in head order (output ``j`` is label ``classes[j]``).

Models are rebuilt from ``arch`` with random initialisation and never fetch
pretrained weights:

* ``library == "timm"``: ``timm.create_model(name, pretrained=False,
  num_classes=num_classes, **kwargs)``;
* ``library == "transformers"``: ``cls = getattr(transformers, name)`` and
  ``cls(cls.config_class(num_labels=num_classes, **kwargs))`` (e.g.
  ``ViTForImageClassification`` with ``ViTConfig``).

A single model can also be stored outside a zoo with :func:`save_model`, which
writes ``<stem>.safetensors`` and a JSON sidecar ``<stem>.json`` holding the
constructor spec, read back by :func:`load_model_file`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

__all__ = [
    "ZOO_ENV",
    "MANIFEST_NAME",
    "SIDECAR_FORMAT",
    "ZooError",
    "ZooNotFoundError",
    "ManifestError",
    "ModelNotInZooError",
    "CheckpointNotFoundError",
    "CheckpointMismatchError",
    "UnknownArchitectureError",
    "ZooEntry",
    "find_zoo",
    "load_manifest",
    "write_manifest",
    "build_model",
    "state_dict_for_saving",
    "save_weights",
    "load_weights",
    "load_model",
    "save_model",
    "load_model_file",
]

ZOO_ENV = "FUSION_ZOO"
"""Environment variable naming the default zoo folder."""

MANIFEST_NAME = "manifest.json"
"""File name of a zoo's manifest."""

SIDECAR_FORMAT = "fusion-model-v1"
"""Value of the ``format`` field of the JSON sidecars written by :func:`save_model`."""

KNOWN_LIBRARIES = ("timm", "transformers")

_ENTRY_FIELDS = ("arch", "num_classes", "classes", "seed", "epochs", "test_accuracy")


class ZooError(Exception):
    """Base class of the errors raised by :mod:`fusion.zoo`."""


class ZooNotFoundError(ZooError, FileNotFoundError):
    """No zoo folder was given, or the one given has no manifest."""


class ManifestError(ZooError, ValueError):
    """A manifest or sidecar file is malformed."""


class ModelNotInZooError(ZooError, LookupError):
    """A model name absent from the zoo's manifest."""

    def __str__(self) -> str:  # LookupError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointNotFoundError(ZooError, FileNotFoundError):
    """The weights file of a model is missing."""


class CheckpointMismatchError(ZooError, RuntimeError):
    """A checkpoint's tensors do not match the architecture it is loaded into."""


class UnknownArchitectureError(ZooError, ValueError):
    """An ``arch`` spec naming an unknown library or model."""


# ---------------------------------------------------------------------------
# Entries and manifests
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class ZooEntry:
    """One model of a zoo.

    Attributes:
        name: Model name (the key in the manifest, the stem of its weights file).
        library: ``"timm"`` or ``"transformers"``.
        arch_name: timm model name or transformers model class name.
        kwargs: Extra constructor keyword arguments.
        num_classes: Width of the classification head.
        classes: Dataset labels in head order (output ``j`` is ``classes[j]``).
        seed: Training seed, if known.
        epochs: Training epochs, if known.
        test_accuracy: Recorded test accuracy on the images of ``classes``, if known.
        weights: Path of the ``.safetensors`` file, if known.
        extra: Any further manifest fields (e.g. ``train_seconds``), kept as they are.
    """

    name: str
    library: str
    arch_name: str
    kwargs: dict[str, Any]
    num_classes: int
    classes: list[int]
    seed: int | None = None
    epochs: int | None = None
    test_accuracy: float | None = None
    weights: Path | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def arch(self) -> dict[str, Any]:
        """The constructor spec ``{"library", "name", "kwargs"}`` for :func:`build_model`."""
        return {"library": self.library, "name": self.arch_name, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(
        cls, name: str, data: Mapping[str, Any], weights: Path | None = None, source: str = "manifest"
    ) -> "ZooEntry":
        """Builds an entry from its manifest (or sidecar) dictionary.

        Args:
            name: Model name.
            data: The entry's JSON object.
            weights: Path of the weights file.
            source: Where ``data`` came from, for error messages.

        Returns:
            The entry.

        Raises:
            ManifestError: If a required field is missing or malformed.
        """
        if not isinstance(data, Mapping):
            raise ManifestError(f"{source}: entry {name!r} must be a JSON object, got {type(data).__name__}.")
        arch = data.get("arch")
        if not isinstance(arch, Mapping) or "library" not in arch or "name" not in arch:
            raise ManifestError(
                f"{source}: entry {name!r} needs an 'arch' object with 'library' and 'name' "
                f"(and optional 'kwargs'), got {arch!r}."
            )
        kwargs = arch.get("kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise ManifestError(f"{source}: entry {name!r} has non-object arch.kwargs {kwargs!r}.")
        if "num_classes" not in data:
            raise ManifestError(f"{source}: entry {name!r} lacks 'num_classes'.")
        try:
            num_classes = int(data["num_classes"])
            classes = data.get("classes")
            classes = list(range(num_classes)) if classes is None else [int(c) for c in classes]
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"{source}: entry {name!r} has malformed num_classes/classes: {exc}.") from exc
        if len(classes) != num_classes:
            raise ManifestError(
                f"{source}: entry {name!r} lists {len(classes)} classes but num_classes is "
                f"{num_classes}; they must agree (one class per head output)."
            )
        extra = {k: v for k, v in data.items() if k not in _ENTRY_FIELDS}
        return cls(
            name=str(name),
            library=str(arch["library"]),
            arch_name=str(arch["name"]),
            kwargs=dict(kwargs),
            num_classes=num_classes,
            classes=classes,
            seed=None if data.get("seed") is None else int(data["seed"]),
            epochs=None if data.get("epochs") is None else int(data["epochs"]),
            test_accuracy=None if data.get("test_accuracy") is None else float(data["test_accuracy"]),
            weights=weights,
            extra=extra,
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns the entry as a manifest JSON object (without name and weights path).

        Returns:
            A JSON-serialisable dictionary; ``extra`` fields are merged back in.
        """
        out: dict[str, Any] = {
            "arch": self.arch,
            "num_classes": self.num_classes,
            "classes": list(self.classes),
        }
        for key in ("seed", "epochs", "test_accuracy"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        out.update(self.extra)
        return out


def find_zoo(path: str | os.PathLike[str] | None = None) -> Path:
    """Resolves the zoo folder.

    Args:
        path: Zoo folder; when ``None`` the ``$FUSION_ZOO`` environment variable is used.

    Returns:
        The zoo folder (absolute path), which holds a ``manifest.json``.

    Raises:
        ZooNotFoundError: If neither is given, or the folder has no manifest.
    """
    source = "argument"
    if path is None:
        env = os.environ.get(ZOO_ENV)
        if not env:
            raise ZooNotFoundError(
                f"No model zoo given: pass the zoo folder explicitly (zoo_dir=... / --zoo) "
                f"or set the {ZOO_ENV} environment variable to a folder holding "
                f"{MANIFEST_NAME} and <name>.safetensors files."
            )
        path, source = env, f"${ZOO_ENV}"
    zoo = Path(path).expanduser().resolve()
    if not (zoo / MANIFEST_NAME).is_file():
        raise ZooNotFoundError(
            f"Zoo folder {zoo} (from {source}) has no {MANIFEST_NAME}. Pass the folder "
            f"that holds {MANIFEST_NAME}, or fix {ZOO_ENV}."
        )
    return zoo


def load_manifest(zoo_dir: str | os.PathLike[str] | None = None) -> dict[str, ZooEntry]:
    """Reads a zoo's manifest.

    Args:
        zoo_dir: Zoo folder; ``None`` uses ``$FUSION_ZOO`` (see :func:`find_zoo`).

    Returns:
        Entries by name, in manifest order, with ``weights`` set to
        ``<zoo_dir>/<name>.safetensors``.

    Raises:
        ZooNotFoundError: If the zoo cannot be found.
        ManifestError: If the manifest is not valid JSON or an entry is malformed.
    """
    zoo = find_zoo(zoo_dir)
    manifest_path = zoo / MANIFEST_NAME
    try:
        data = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{manifest_path} is not valid JSON: {exc}.") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"{manifest_path} must hold a JSON object mapping names to entries.")
    return {
        name: ZooEntry.from_dict(name, entry, zoo / f"{name}.safetensors", source=str(manifest_path))
        for name, entry in data.items()
    }


def write_manifest(
    zoo_dir: str | os.PathLike[str], entries: Mapping[str, ZooEntry | Mapping[str, Any]], merge: bool = True
) -> Path:
    """Writes (or updates) ``<zoo_dir>/manifest.json``.

    Args:
        zoo_dir: Zoo folder (created if missing).
        entries: Entries by name, as :class:`ZooEntry` or manifest dictionaries.
        merge: Keep the entries of an existing manifest that ``entries`` does not
            replace.

    Returns:
        The manifest path.

    Raises:
        ManifestError: If ``merge`` and the existing manifest is not valid JSON.
    """
    zoo = Path(zoo_dir)
    zoo.mkdir(parents=True, exist_ok=True)
    path = zoo / MANIFEST_NAME
    data: dict[str, Any] = {}
    if merge and path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ManifestError(
                f"Existing {path} is not valid JSON ({exc}); fix or delete it, or pass merge=False."
            ) from exc
    for name, entry in entries.items():
        data[name] = entry.to_dict() if isinstance(entry, ZooEntry) else dict(entry)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(dict(sorted(data.items())), indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------
# Building models
# ---------------------------------------------------------------------------


def _check_arch(arch: Mapping[str, Any] | ZooEntry) -> tuple[str, str, dict[str, Any]]:
    if isinstance(arch, ZooEntry):
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
            f"arch {name!r} asks for pretrained=True; zoo models are built with random "
            "initialisation and loaded from their checkpoint. Remove 'pretrained'."
        )
    kwargs.pop("pretrained", None)
    return library, name, kwargs


def build_model(arch: Mapping[str, Any] | ZooEntry, num_classes: int) -> nn.Module:
    """Builds a randomly initialised model from its constructor spec.

    Nothing is downloaded: timm models are created with ``pretrained=False`` and
    transformers models from a config object.

    Args:
        arch: ``{"library": "timm" | "transformers", "name": ..., "kwargs": {...}}``
            (or a :class:`ZooEntry`, whose ``arch`` is used).
        num_classes: Width of the classification head.

    Returns:
        The model, in eval mode.

    Raises:
        UnknownArchitectureError: If the library or model name is unknown, or the
            kwargs are rejected by the constructor.
    """
    library, name, kwargs = _check_arch(arch)
    num_classes = int(num_classes)
    if library == "timm":
        import timm

        if not timm.is_model(name):
            raise UnknownArchitectureError(
                f"timm has no model named {name!r}; check the name with timm.list_models()."
            )
        try:
            model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
        except TypeError as exc:
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
            config = config_cls(num_labels=num_classes, **kwargs)
        except (TypeError, ValueError) as exc:
            raise UnknownArchitectureError(
                f"{config_cls.__name__} rejected kwargs {kwargs} for {name!r}: {exc}"
            ) from exc
        model = cls(config)
    return model.eval()


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
    """
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_weights(model: nn.Module, path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None) -> Path:
    """Writes the model's ``state_dict`` to a ``.safetensors`` file.

    Args:
        model: The model (not modified).
        path: Output file; its parent folder is created if missing.
        metadata: Optional string metadata stored in the file header.

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict_for_saving(model), str(path), metadata=dict(metadata) if metadata else None)
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


def load_weights(model: nn.Module, path: str | os.PathLike[str], what: str | None = None) -> nn.Module:
    """Loads a ``.safetensors`` state_dict into a model with strict key and shape checks.

    Args:
        model: Freshly built model to fill (modified in place).
        path: The ``.safetensors`` file.
        what: Description of the model for error messages (defaults to the path).

    Returns:
        ``model``, for chaining.

    Raises:
        CheckpointNotFoundError: If the file does not exist.
        CheckpointMismatchError: If keys are missing or unexpected, or shapes differ.
    """
    from safetensors.torch import load_file

    path = Path(path)
    what = what or str(path)
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"Weights of {what} not found at {path}; check the zoo folder or re-create the checkpoint."
        )
    state = load_file(str(path))
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


def load_model(
    name_or_entry: str | ZooEntry, zoo_dir: str | os.PathLike[str] | None = None
) -> tuple[nn.Module, ZooEntry]:
    """Builds a zoo model and loads its checkpoint.

    Args:
        name_or_entry: Model name in the zoo's manifest, or a :class:`ZooEntry`
            (whose ``weights`` path is used; if unset, ``<zoo_dir>/<name>.safetensors``).
        zoo_dir: Zoo folder; ``None`` uses ``$FUSION_ZOO``. Not needed for an
            entry that knows its weights path.

    Returns:
        ``(model, entry)`` with the model in eval mode on CPU.

    Raises:
        ZooNotFoundError: If the zoo cannot be found.
        ModelNotInZooError: If the name is not in the manifest.
        CheckpointNotFoundError: If the weights file is missing.
        CheckpointMismatchError: If the weights do not fit the architecture.
        UnknownArchitectureError: If the arch spec cannot be built.
    """
    if isinstance(name_or_entry, ZooEntry):
        entry = name_or_entry
        if entry.weights is None:
            entry = dataclasses.replace(entry, weights=find_zoo(zoo_dir) / f"{entry.name}.safetensors")
    else:
        manifest = load_manifest(zoo_dir)
        name = str(name_or_entry)
        if name not in manifest:
            raise ModelNotInZooError(
                f"Model {name!r} is not in the zoo {find_zoo(zoo_dir)}; available: "
                f"{', '.join(manifest)}."
            )
        entry = manifest[name]
    model = build_model(entry.arch, entry.num_classes)
    assert entry.weights is not None
    load_weights(model, entry.weights, what=f"zoo model {entry.name!r}")
    return model.eval(), entry


def _model_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    path = Path(path)
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
    raise TypeError(f"{where} holds {value!r} of type {type(value).__name__}, which JSON cannot store.")


def save_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    arch: Mapping[str, Any] | ZooEntry,
    num_classes: int,
    classes: Iterable[int] | None = None,
    extra: Mapping[str, Any] | None = None,
    check: bool = True,
    widths: Mapping[str, int] | None = None,
) -> Path:
    """Saves a model as ``<stem>.safetensors`` plus a ``<stem>.json`` constructor sidecar.

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

    Returns:
        The path of the ``.safetensors`` file.

    Raises:
        UnknownArchitectureError: If ``arch`` is invalid.
        CheckpointMismatchError: If ``check`` and the model's tensors do not fit ``arch``.
        ValueError: If ``classes`` does not have ``num_classes`` labels.
        TypeError: If ``extra`` is not JSON-serialisable.
    """
    library, name, kwargs = _check_arch(arch)
    spec = {"library": library, "name": name, "kwargs": _jsonable(kwargs, "arch.kwargs")}
    num_classes = int(num_classes)
    class_list = list(range(num_classes)) if classes is None else [int(c) for c in classes]
    if len(class_list) != num_classes:
        raise ValueError(
            f"classes has {len(class_list)} labels but num_classes is {num_classes}; give one "
            "label per head output."
        )
    weights_path, sidecar_path = _model_paths(path)
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
        if key in ("format", "arch", "num_classes", "classes", "widths"):
            raise ValueError(f"extra must not override the reserved sidecar field {key!r}.")
        sidecar[key] = value
    save_weights(model, weights_path, metadata={"format": SIDECAR_FORMAT})
    sidecar_path.write_text(json.dumps(sidecar, indent=1, sort_keys=True) + "\n")
    return weights_path


def example_input(arch: Mapping[str, Any] | ZooEntry, batch: int = 2) -> torch.Tensor:
    """A random input batch that fits a constructor spec (channels and image size from its kwargs)."""
    _, _, kwargs = _check_arch(arch)
    chans = int(kwargs.get("in_chans", kwargs.get("num_channels", 1)))
    size = kwargs.get("img_size", kwargs.get("image_size", 28))
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    return torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(0))


def _resized(model: nn.Module, arch, widths: Mapping[str, int]) -> nn.Module:
    from .resize import resize

    return resize(model, {**{str(k): int(v) for k, v in widths.items()}, "*": 1.0}, example_input(arch))


def space_widths(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Width of every feature space of a model (what :func:`save_model` records as ``widths``)."""
    from alignment import discover

    return {s.name: s.width for s in discover(model, example).spaces if s.kind == "features"}


def load_model_file(path: str | os.PathLike[str]) -> tuple[nn.Module, ZooEntry]:
    """Loads a model written by :func:`save_model`.

    Args:
        path: The ``.safetensors`` file, its ``.json`` sidecar, or their common stem.

    Returns:
        ``(model, entry)``; the entry is built from the sidecar (its ``name`` is the
        file stem, ``extra`` holds the additional fields).

    Raises:
        CheckpointNotFoundError: If the weights or the sidecar are missing.
        ManifestError: If the sidecar is malformed.
        CheckpointMismatchError: If the weights do not fit the recorded architecture.
    """
    path = Path(path)
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    weights_path, sidecar_path = _model_paths(path)
    if not sidecar_path.is_file():
        raise CheckpointNotFoundError(
            f"No sidecar {sidecar_path} next to {weights_path}; it holds the constructor spec. "
            "Save models with fusion.zoo.save_model, or load zoo models with load_model."
        )
    try:
        data = json.loads(sidecar_path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"Sidecar {sidecar_path} is not valid JSON: {exc}.") from exc
    entry = ZooEntry.from_dict(weights_path.stem, data, weights_path, source=str(sidecar_path))
    entry.extra.pop("format", None)
    model = build_model(entry.arch, entry.num_classes)
    widths = entry.extra.pop("widths", None)
    if widths:
        model = _resized(model, entry.arch, widths)
    load_weights(model, weights_path, what=f"model file {weights_path.name!r}")
    return model.eval(), entry
