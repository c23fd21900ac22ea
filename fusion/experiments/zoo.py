"""The model-zoo format: a folder of safetensors checkpoints plus a manifest.

A zoo is a folder holding ``manifest.json``, which maps each model name to an entry
such as::

    {"arch": {"library": "timm", "name": "resnet18",
              "kwargs": {"channels": [32, 64, 128, 256], "in_chans": 1, "stem_width": 32}},
     "num_classes": 10, "classes": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], "seed": 0,
     "epochs": 8, "test_accuracy": 0.9075, "train_seconds": 188}

and ``<name>.safetensors``, the model's plain ``state_dict``. ``arch``, ``num_classes``
and ``classes`` mean what they mean in a sidecar (:mod:`fusion.io`, which builds the
models and reads the weights); ``seed``, ``epochs`` and ``test_accuracy`` record how the
checkpoint was trained (:mod:`fusion.experiments.train`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Mapping

from torch import nn

from alignment.errors import FusionError
from fusion.io import ModelSpec, build_model, load_weights

__all__ = [
    "ZOO_ENV",
    "MANIFEST_NAME",
    "ZooError",
    "ZooNotFoundError",
    "ManifestError",
    "ModelNotInZooError",
    "ZooEntry",
    "find_zoo",
    "load_manifest",
    "write_manifest",
    "load_model",
]

ZOO_ENV = "FUSION_ZOO"
"""Environment variable naming the default zoo folder."""

MANIFEST_NAME = "manifest.json"
"""File name of a zoo's manifest."""


class ZooError(FusionError):
    """Base class of the errors raised by :mod:`fusion.experiments.zoo`."""


class ZooNotFoundError(ZooError, FileNotFoundError):
    """No zoo folder was given, or the one given has no manifest."""


class ManifestError(ZooError, ValueError):
    """A manifest or one of its entries is malformed."""


class ModelNotInZooError(ZooError, LookupError):
    """A model name absent from the zoo's manifest."""

    def __str__(self) -> str:  # LookupError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


@dataclasses.dataclass
class ZooEntry(ModelSpec):
    """One model of a zoo: its constructor spec plus how it was trained.

    Attributes:
        seed: Training seed, if known.
        epochs: Training epochs, if known.
        test_accuracy: Recorded test accuracy on the images of ``classes``, if known.
    """

    seed: int | None = dataclasses.field(default=None, kw_only=True)
    epochs: int | None = dataclasses.field(default=None, kw_only=True)
    test_accuracy: float | None = dataclasses.field(default=None, kw_only=True)

    OPTIONAL_FIELDS: ClassVar[Mapping[str, type]] = {"seed": int, "epochs": int, "test_accuracy": float}
    SPEC_ERROR: ClassVar[type[Exception]] = ManifestError


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


def _read_json(path: Path, hint: str) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}); {hint}.") from exc


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
    data = _read_json(manifest_path, "fix or regenerate it")
    if not isinstance(data, dict):
        raise ManifestError(f"{manifest_path} must hold a JSON object mapping names to entries.")
    return {
        name: ZooEntry.from_dict(name, entry, zoo / f"{name}.safetensors", source=str(manifest_path))
        for name, entry in data.items()
    }


def write_manifest(
    zoo_dir: str | os.PathLike[str], entries: Mapping[str, ZooEntry | Mapping[str, Any]], merge: bool = True
) -> Path:
    """Writes (or updates) ``<zoo_dir>/manifest.json`` atomically.

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
        data = _read_json(path, "fix or delete it, or pass merge=False")
    for name, entry in entries.items():
        data[name] = entry.to_dict() if isinstance(entry, ModelSpec) else dict(entry)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(dict(sorted(data.items())), indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


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
        fusion.io.CheckpointNotFoundError: If the weights file is missing.
        fusion.io.CheckpointMismatchError: If the weights do not fit the architecture.
        fusion.io.UnknownArchitectureError: If the arch spec cannot be built.
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
    model = build_model(entry, entry.num_classes)
    assert entry.weights is not None
    load_weights(model, entry.weights, what=f"zoo model {entry.name!r}")
    return model.eval(), entry
