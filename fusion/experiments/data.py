"""Datasets for calibration and evaluation: Fashion-MNIST, digits, image folders, any Dataset.

Fashion-MNIST, the offline benchmark dataset, is read straight from its IDX files
(gzipped or not) with numpy, so torchvision is only needed when ``download=True`` is
asked for. Its images come back as float32 tensors of shape ``N x 1 x 28 x 28`` scaled
to [0, 1] and (by default) normalised with :data:`FASHION_MNIST_MEAN` /
:data:`FASHION_MNIST_STD`, the statistics the model zoo was trained with; labels are
int64.

Other data is named by a *dataset spec* (:func:`load_dataset_spec`): ``digits``, a
folder of images, ``torchvision:NAME`` or ``module:function``. Images are brought to
the format a model expects (channels, size, normalisation: :class:`InputFormat`, read
from the model by :func:`input_format` or given explicitly).

Class subsets follow the zoo convention: a model trained on ``classes=[5, 6, 7, 8, 9]``
has head ``j`` for label ``classes[j]``, so with ``remap=True`` label 5 becomes 0,
label 6 becomes 1, and so on.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib
import inspect
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from alignment.errors import CalibrationError, FusionError, FusionWarning

from .evaluate import _split_batch

__all__ = [
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FASHION_MNIST_CLASSES",
    "DEBIAN_FASHION_MNIST_DIR",
    "DATA_DIR_ENV",
    "DEFAULT_DOWNLOAD_DIR",
    "KNOWN_DATASETS",
    "DATASET_SPEC_FORMS",
    "DataError",
    "DatasetNotFoundError",
    "UnknownDatasetError",
    "DataFormatError",
    "DataOptionError",
    "DataWarning",
    "InputFormat",
    "DatasetSpec",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "load_digits",
    "load_dataset",
    "parse_dataset_spec",
    "load_dataset_spec",
    "input_format",
    "select_classes",
    "restrict_classes",
    "dataset_labels",
    "dataset_tensors",
    "integer_images",
    "calibration_subset",
    "first_examples",
    "make_loader",
]

FASHION_MNIST_MEAN = 0.2860
"""Mean of the Fashion-MNIST training pixels after scaling to [0, 1]."""

FASHION_MNIST_STD = 0.3530
"""Standard deviation of the Fashion-MNIST training pixels after scaling to [0, 1]."""

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
"""Human-readable names of the ten Fashion-MNIST labels, in label order."""

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package installs the IDX files."""

DATA_DIR_ENV = "FUSION_DATA_DIR"
"""Environment variable naming a folder that holds the Fashion-MNIST IDX files."""

DEFAULT_DOWNLOAD_DIR = Path("~/.cache/fusion")
"""Where downloads go (and ``torchvision:NAME`` data is looked for) when no ``root`` is given."""

KNOWN_DATASETS = ("fashion_mnist", "digits")
"""Names accepted by :func:`load_dataset`."""

DATASET_SPEC_FORMS = (
    "'fashion_mnist' (Fashion-MNIST IDX files from root, $FUSION_DATA_DIR or the Debian path)",
    "'digits' (scikit-learn's 8x8 digits)",
    "a folder of images, one subfolder per class (torchvision ImageFolder; train/ and test/ "
    "or val/ subfolders are the splits when present)",
    "'torchvision:NAME' (a torchvision.datasets class, e.g. torchvision:CIFAR10, read from root)",
    "'module:function' (an importable function returning a Dataset or DataLoader)",
)
"""The forms of a dataset spec accepted by :func:`parse_dataset_spec`."""

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataError(FusionError):
    """Base class of the errors raised by :mod:`fusion.experiments.data`."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """The dataset's files were found in none of the places searched."""


class UnknownDatasetError(DataError, ValueError):
    """A dataset name or spec that :func:`load_dataset` / :func:`load_dataset_spec` does not know."""


class DataFormatError(DataError, ValueError):
    """Data exists but cannot be decoded (wrong magic number, truncated, unusable items...)."""


class DataOptionError(DataError, ValueError):
    """A data argument (split, classes, sizes, normalisation...) has a value it does not allow."""


class DataWarning(FusionWarning):
    """Data was used other than one might assume (e.g. one folder for both splits)."""


# ---------------------------------------------------------------------------
# Fashion-MNIST IDX files
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _read_idx_cached(path: str, mtime_ns: int, size: int) -> np.ndarray:
    """Decodes one IDX file; cached per (path, mtime, size) so edits invalidate it."""
    del mtime_ns, size  # only part of the cache key
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:
        raise DataFormatError(
            f"Could not read IDX file {path!r}: {exc}. Delete it and reinstall or "
            "re-download Fashion-MNIST."
        ) from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataFormatError(
            f"{path!r} is not an IDX file (bad magic number {raw[:4]!r}). Point root or "
            f"{DATA_DIR_ENV} at the original Fashion-MNIST files."
        )
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(f"IDX file {path!r} is truncated inside its header.")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataFormatError(
            f"IDX file {path!r} holds {len(raw) - header} bytes of data but its header "
            f"announces shape {shape} ({expected} bytes); the file is corrupt or truncated."
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    array = array.astype(dtype.newbyteorder("="), copy=False)
    array.setflags(write=False)
    return array


def _read_idx(path: Path) -> np.ndarray:
    """Reads an IDX file through the in-process cache (read-only array)."""
    stat = path.stat()
    return _read_idx_cached(str(path), stat.st_mtime_ns, stat.st_size)


def _find_idx(folder: Path, stem: str) -> Path | None:
    """Returns ``folder/stem`` or ``folder/stem.gz`` (also under torchvision's layout)."""
    for base in (folder, folder / "FashionMNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            candidate = base / name
            if candidate.is_file():
                return candidate
    return None


def _split_files(folder: Path, split: str) -> tuple[Path, Path] | None:
    prefix = _SPLIT_PREFIX[split]
    images = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
    labels = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    if images is None or labels is None:
        return None
    return images, labels


def _check_split(split: str) -> str:
    if split not in _SPLIT_PREFIX:
        raise DataOptionError(f"split must be 'train' or 'test', got {split!r}.")
    return split


def find_fashion_mnist(
    split: str = "train", root: str | os.PathLike[str] | None = None, download: bool = False
) -> tuple[Path, Path]:
    """Locates the Fashion-MNIST IDX files of one split.

    Places are tried in order: ``root``, the folder named by ``$FUSION_DATA_DIR``,
    Debian's ``/usr/share/datasets/fashion-mnist`` and, only when ``download`` is
    true, a torchvision download into ``root`` (or ``~/.cache/fusion``). Each folder
    may hold the files directly or in torchvision's ``FashionMNIST/raw`` layout,
    gzipped or not.

    Args:
        split: ``"train"`` or ``"test"``.
        root: Folder to look in first (and to download into).
        download: Whether to download with torchvision when nothing is found.

    Returns:
        The paths of the images file and the labels file.

    Raises:
        DataOptionError: If ``split`` is not ``"train"`` or ``"test"``.
        DatasetNotFoundError: If ``root`` does not exist (without ``download``), or the files
            are nowhere; the message lists the places tried and how to install the data.
    """
    _check_split(split)
    tried: list[str] = []
    candidates: list[tuple[str, Path]] = []
    if root is not None:
        if not download and not Path(root).expanduser().exists():  # (a typo would quietly read other data)
            raise DatasetNotFoundError(f"the data folder {root} does not exist; give the folder that holds the "
                                       f"Fashion-MNIST files (or download=True / --download to download into it)")
        candidates.append(("root argument", Path(root).expanduser()))
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        candidates.append((f"${DATA_DIR_ENV}", Path(env).expanduser()))
    candidates.append(("Debian dataset-fashion-mnist", DEBIAN_FASHION_MNIST_DIR))
    for label, folder in candidates:
        found = _split_files(folder, split)
        if found is not None:
            return found
        tried.append(f"{folder} ({label})")
    if not env:
        tried.append(f"${DATA_DIR_ENV} (not set)")

    if download:
        target = Path(root).expanduser() if root is not None else DEFAULT_DOWNLOAD_DIR.expanduser()
        try:
            from torchvision.datasets import FashionMNIST
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise DatasetNotFoundError(
                "download=True needs torchvision, which is not installed. Install it "
                "(pip install torchvision) or provide the IDX files: "
                "apt-get install dataset-fashion-mnist, or set "
                f"{DATA_DIR_ENV} to a folder holding them."
            ) from exc
        target.mkdir(parents=True, exist_ok=True)
        FashionMNIST(str(target), train=(split == "train"), download=True)
        found = _split_files(target, split)
        if found is not None:
            return found
        tried.append(f"{target} (torchvision download)")

    prefix = _SPLIT_PREFIX[split]
    raise DatasetNotFoundError(
        f"Fashion-MNIST {split!r} files ({prefix}-images-idx3-ubyte[.gz], "
        f"{prefix}-labels-idx1-ubyte[.gz]) not found. Tried: " + "; ".join(tried) + ". "
        "Fix: `apt-get install dataset-fashion-mnist` (installs them in "
        f"{DEBIAN_FASHION_MNIST_DIR}), or set {DATA_DIR_ENV} to a folder holding the IDX "
        "files, or pass root=... with them, or pass download=True to fetch them with "
        "torchvision."
    )


# ---------------------------------------------------------------------------
# Class subsets and views
# ---------------------------------------------------------------------------


def _check_classes(classes: Iterable[int] | None, num_classes: int | None) -> list[int] | None:
    if classes is None:
        return None
    out = [int(c) for c in classes]
    if not out:
        raise DataOptionError("classes must not be empty; pass None to keep every class.")
    if len(set(out)) != len(out):
        raise DataOptionError(f"classes must not repeat a label, got {out}.")
    bad = [c for c in out if c < 0 or (num_classes is not None and c >= num_classes)]
    if bad:
        span = f"0..{num_classes - 1}" if num_classes is not None else "0 and above"
        raise DataOptionError(f"classes {bad} are outside the dataset's labels {span}.")
    return out


def _label_lookup(classes: Sequence[int]) -> torch.Tensor:
    """``lookup[classes[j]] == j``; -1 for the labels not kept."""
    class_tensor = torch.as_tensor(list(classes), dtype=torch.int64)
    lookup = torch.full((int(class_tensor.max()) + 1,), -1, dtype=torch.int64)
    lookup[class_tensor] = torch.arange(len(class_tensor), dtype=torch.int64)
    return lookup


def select_classes(
    images: torch.Tensor, labels: torch.Tensor, classes: Sequence[int] | None, remap: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keeps the examples of some classes, optionally renumbering their labels.

    Args:
        images: Tensor whose first dimension indexes examples.
        labels: int64 labels, one per example.
        classes: Labels to keep, in head order; ``None`` keeps everything unchanged.
        remap: If true, label ``classes[j]`` becomes ``j`` (the zoo's head order);
            otherwise the original labels are kept.

    Returns:
        The selected images and labels (new tensors; the inputs are not modified).
    """
    if classes is None:
        return images, labels
    mask = torch.isin(labels, torch.as_tensor(list(classes), dtype=torch.int64))
    images, labels = images[mask], labels[mask]
    if remap:
        labels = _label_lookup(classes)[labels]
    return images, labels


class _View(Dataset):
    """Items ``indices`` of a dataset, inputs through ``transform``, labels through ``lookup``."""

    def __init__(
        self,
        base: Dataset,
        indices: Sequence[int] | None = None,
        transform: Callable[[Any], torch.Tensor] | None = None,
        lookup: torch.Tensor | None = None,
    ) -> None:
        self.base, self.transform, self.lookup = base, transform, lookup
        count = len(base)  # type: ignore[arg-type]
        self.indices = list(range(count)) if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def _label(self, y: Any) -> int:
        y = int(y)
        return int(self.lookup[y]) if self.lookup is not None else y

    def __getitem__(self, i: int) -> Any:
        item = self.base[self.indices[i]]
        if isinstance(item, Mapping):  # a dict item keeps its keys; its input and label are converted
            x_key, y_key = _item_keys(item)
            out = dict(item)
            if self.transform is not None:
                out[x_key] = self.transform(item[x_key])
            out[y_key] = self._label(item[y_key])
            return out
        x, y = _item_pair(item)
        return (self.transform(x) if self.transform is not None else x), self._label(y)

    @property
    def targets(self) -> list[int]:
        """Labels of the items, read without loading inputs where the base dataset allows."""
        labels = dataset_labels(self.base)
        return [self._label(labels[i]) for i in self.indices]


_INPUT_KEYS = ("pixel_values", "x", "input")
_LABEL_KEYS = ("labels", "label", "y")


def _item_keys(item: Mapping[str, Any]) -> tuple[str, str]:
    """The input and label keys of a dict item (``pixel_values``/``labels``, or ``x``/``y``...)."""
    x_key = next((k for k in _INPUT_KEYS if k in item), None)
    y_key = next((k for k in _LABEL_KEYS if k in item), None)
    if x_key is None or y_key is None:
        raise DataFormatError(
            f"A dict item with keys {sorted(map(str, item))}: expected an input under one of "
            f"{', '.join(_INPUT_KEYS)} and a label under one of {', '.join(_LABEL_KEYS)}."
        )
    return x_key, y_key


def _item_pair(item: Any, where: str = "An item") -> tuple[Any, Any]:
    """``(input, label)`` of one dataset item: a pair (or longer tuple) or a dict (:func:`_item_keys`)."""
    if isinstance(item, Mapping):
        x_key, y_key = _item_keys(item)
        return item[x_key], item[y_key]
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return item[0], item[1]
    raise DataFormatError(
        f"{where} is {type(item).__name__}; expected an (input, label) pair or a dict with "
        "pixel_values and labels."
    )


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """The labels of a map-style dataset of (input, label) pairs (or dicts with ``pixel_values`` and
    ``labels``), as int64.

    A ``TensorDataset``'s labels, or a ``targets`` / ``labels`` attribute (torchvision
    datasets, ``ImageFolder``), are read without loading any input; otherwise every
    item is read.

    Args:
        dataset: The dataset.

    Returns:
        One label per item.
    """
    if isinstance(dataset, TensorDataset):
        return dataset_tensors(dataset)[1].to(torch.int64)
    n = len(dataset)  # type: ignore[arg-type]
    for attr in ("targets", "labels"):
        labels = getattr(dataset, attr, None)
        if labels is not None and not callable(labels) and len(labels) == n:
            return torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    return torch.as_tensor([int(_item_pair(dataset[i], f"Item {i} of {type(dataset).__name__}")[1])
                            for i in range(n)], dtype=torch.int64)


def restrict_classes(dataset: Dataset, classes: Sequence[int] | None, remap: bool = True) -> Dataset:
    """Keeps the examples of some classes of any dataset (see :func:`select_classes`).

    Args:
        dataset: A map-style dataset of (input, label) pairs, or of dicts with an input and a label
            (``pixel_values`` and ``labels``; dict items stay dicts).
        classes: Labels to keep, in head order; ``None`` returns ``dataset`` unchanged.
        remap: If true, label ``classes[j]`` becomes ``j``.

    Returns:
        A ``TensorDataset`` for a ``TensorDataset``, otherwise a view that loads the
        kept items lazily.

    Raises:
        DataOptionError: If ``classes`` is empty or repeats a label, or ``dataset`` is a
            ``DataLoader`` (whose items cannot be selected).
    """
    if isinstance(dataset, DataLoader):
        raise DataOptionError(
            "Cannot select classes of a DataLoader; pass the Dataset (or return one from "
            "the module:function spec)."
        )
    wanted = _check_classes(classes, None)
    if wanted is None:
        return dataset
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*select_classes(*dataset_tensors(dataset), wanted, remap=remap))
    labels = dataset_labels(dataset)
    keep = torch.nonzero(torch.isin(labels, torch.as_tensor(wanted)), as_tuple=False).flatten()
    return _View(dataset, keep.tolist(), lookup=_label_lookup(wanted) if remap else None)


# ---------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------


def load_fashion_mnist(
    split: str = "train",
    root: str | os.PathLike[str] | None = None,
    classes: Sequence[int] | None = None,
    remap: bool = True,
    normalize: bool = True,
    download: bool = False,
) -> TensorDataset:
    """Loads Fashion-MNIST as a ``TensorDataset`` of (images, labels).

    Decoded arrays are cached in-process, so repeated calls only pay for the
    float conversion.

    Args:
        split: ``"train"`` (60000 images) or ``"test"`` (10000 images).
        root: Folder holding the IDX files, tried before ``$FUSION_DATA_DIR`` and
            the Debian location (see :func:`find_fashion_mnist`).
        classes: Labels to keep, in head order (e.g. ``[5, 6, 7, 8, 9]``); ``None``
            keeps all ten.
        remap: With ``classes``, renumber label ``classes[j]`` to ``j`` (how the
            zoo's 5+5 split models were trained). Ignored without ``classes``.
        normalize: Normalise with :data:`FASHION_MNIST_MEAN` and
            :data:`FASHION_MNIST_STD` after scaling to [0, 1].
        download: Download with torchvision if the files are not found.

    Returns:
        A ``TensorDataset`` of float32 images ``N x 1 x 28 x 28`` and int64 labels.

    Raises:
        DataOptionError: For a bad ``split`` or ``classes``.
        DatasetNotFoundError: If the IDX files cannot be found.
        DataFormatError: If they cannot be decoded or disagree with each other.
    """
    _check_split(split)
    wanted = _check_classes(classes, len(FASHION_MNIST_CLASSES))
    images_path, labels_path = find_fashion_mnist(split, root=root, download=download)
    images_np = _read_idx(images_path)
    labels_np = _read_idx(labels_path)
    if images_np.ndim != 3 or labels_np.ndim != 1 or len(images_np) != len(labels_np):
        raise DataFormatError(
            f"{images_path} (shape {images_np.shape}) and {labels_path} (shape "
            f"{labels_np.shape}) do not form an image/label pair; check the files."
        )
    labels = torch.from_numpy(labels_np.astype(np.int64))
    images = torch.from_numpy(np.array(images_np, dtype=np.uint8))
    if wanted is not None:
        images, labels = select_classes(images, labels, wanted, remap=remap)
    x = images.unsqueeze(1).to(torch.float32).div_(255.0)
    if normalize:
        x.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
    return TensorDataset(x, labels)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0
    targets = np.asarray(bunch.target, dtype=np.int64)
    images.setflags(write=False)
    targets.setflags(write=False)
    return images, targets


def load_digits(
    split: str = "train",
    classes: Sequence[int] | None = None,
    remap: bool = True,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> TensorDataset:
    """Loads scikit-learn's bundled 8x8 digits with a deterministic train/test split.

    The split is stratified by label and depends only on ``test_fraction`` and
    ``seed`` (not on ``classes``), so a class subset of the train split never
    overlaps the test split.

    Args:
        split: ``"train"`` or ``"test"``.
        classes: Labels to keep, in head order; ``None`` keeps all ten.
        remap: With ``classes``, renumber label ``classes[j]`` to ``j``.
        test_fraction: Fraction of the 1797 images held out for ``"test"``,
            strictly between 0 and 1.
        seed: Seed of the split.

    Returns:
        A ``TensorDataset`` of float32 images ``N x 1 x 8 x 8`` in [0, 1] and int64
        labels.

    Raises:
        DataOptionError: For a bad ``split``, ``classes`` or ``test_fraction``.
    """
    from sklearn.model_selection import train_test_split

    _check_split(split)
    if not 0.0 < float(test_fraction) < 1.0:
        raise DataOptionError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}.")
    wanted = _check_classes(classes, 10)
    images_np, targets_np = _digits_arrays()
    index = np.arange(len(targets_np))
    train_idx, test_idx = train_test_split(
        index, test_size=float(test_fraction), random_state=int(seed), stratify=targets_np
    )
    chosen = np.sort(train_idx if split == "train" else test_idx)
    images = torch.from_numpy(np.array(images_np[chosen])).unsqueeze(1)
    labels = torch.from_numpy(np.array(targets_np[chosen]))
    images, labels = select_classes(images, labels, wanted, remap=remap)
    return TensorDataset(images.contiguous(), labels.contiguous())


def dataset_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the (inputs, labels) tensors of a dataset of (input, label) pairs.

    A ``TensorDataset``'s own tensors are returned without copying; any other
    map-style dataset is read item by item and stacked (dict items give their
    ``pixel_values`` and ``labels``).

    Args:
        dataset: The dataset.

    Returns:
        ``(inputs, labels)`` with labels as int64 for non-tensor datasets.

    Raises:
        DataFormatError: If a ``TensorDataset`` holds fewer than two tensors, the
            dataset has no length, or its items are not pairs.
    """
    if isinstance(dataset, TensorDataset):
        if len(dataset.tensors) < 2:
            raise DataFormatError(
                "Expected a TensorDataset of (inputs, labels); this one holds "
                f"{len(dataset.tensors)} tensor(s)."
            )
        return dataset.tensors[0], dataset.tensors[1]
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError as exc:
        raise DataFormatError(
            f"{type(dataset).__name__} has no length; pass a map-style dataset of "
            "(input, label) pairs."
        ) from exc
    xs, ys = [], []
    for i in range(n):
        x, y = _item_pair(dataset[i], f"Item {i} of {type(dataset).__name__}")
        xs.append(torch.as_tensor(x))
        ys.append(torch.as_tensor(y))
    if not xs:
        raise DataFormatError(f"{type(dataset).__name__} is empty.")
    return torch.stack(xs), torch.stack(ys).to(torch.int64)


def calibration_subset(
    dataset: Dataset, size: int, seed: int = 0, balanced: bool = False
) -> TensorDataset:
    """Draws a deterministic random subset, e.g. to compute activation statistics.

    Only the chosen items of a dataset that is not a ``TensorDataset`` are read (its
    labels too, with ``balanced``; see :func:`dataset_labels`).

    Args:
        dataset: A map-style dataset of (input, label) pairs (a ``TensorDataset`` is
            fastest).
        size: Number of examples to draw.
        seed: Seed of the ``torch.Generator`` that picks them.
        balanced: If true, draw (almost) the same number of examples from each
            label present: ``size // k`` each, the remainder going to the smallest
            labels first.

    Returns:
        A ``TensorDataset`` of the chosen inputs and labels (copies; the original
        dataset is untouched), in random order.

    Raises:
        alignment.errors.CalibrationError: If ``size`` is not positive, exceeds the
            dataset's length, or (with ``balanced``) some label has too few examples.
    """
    tensors = dataset_tensors(dataset) if isinstance(dataset, TensorDataset) else None
    n = len(tensors[1]) if tensors is not None else len(dataset)  # type: ignore[arg-type]
    size = int(size)
    if size <= 0:
        raise CalibrationError(f"calibration size must be positive, got {size}.")
    if size > n:
        raise CalibrationError(
            f"calibration size {size} exceeds the dataset's {n} examples; ask for at "
            f"most {n}."
        )
    generator = torch.Generator().manual_seed(int(seed))
    if not balanced:
        index = torch.randperm(n, generator=generator)[:size]
    else:
        y = tensors[1] if tensors is not None else dataset_labels(dataset)
        labels = torch.unique(y)
        k = len(labels)
        quotas = [size // k + (1 if i < size % k else 0) for i in range(k)]
        parts = []
        for label, quota in zip(labels.tolist(), quotas):
            members = torch.nonzero(y == label, as_tuple=False).flatten()
            if quota > len(members):
                raise CalibrationError(
                    f"balanced calibration needs {quota} examples of label {label} but "
                    f"the dataset has only {len(members)}; lower size or use "
                    "balanced=False."
                )
            parts.append(members[torch.randperm(len(members), generator=generator)[:quota]])
        index = torch.cat(parts)
        index = index[torch.randperm(len(index), generator=generator)]
    if tensors is None:
        return TensorDataset(*dataset_tensors(Subset(dataset, index.tolist())))
    return TensorDataset(tensors[0][index].clone(), tensors[1][index].clone())


def first_examples(data: Dataset | DataLoader, n: int, labels: bool = True) -> Dataset:
    """The first ``n`` examples of a dataset or a ``DataLoader`` (all of them if fewer).

    Args:
        data: A map-style dataset, or a ``DataLoader`` whose batches are (inputs, labels)
            pairs or dicts with ``pixel_values`` and ``labels``.
        n: How many examples to keep (positive).
        labels: Whether the examples need labels (evaluation); without (calibration), a
            loader's batches may also be input tensors alone, and only inputs are kept.

    Returns:
        A ``Subset`` of a dataset; the examples of a loader (in its order) gathered in
        a ``TensorDataset`` (of inputs and labels, or of inputs alone).

    Raises:
        DataOptionError: If ``n`` is not positive.
    """
    n = int(n)
    if n <= 0:
        raise DataOptionError(f"the number of examples must be positive, got {n}.")
    if not isinstance(data, DataLoader):
        return Subset(data, range(min(n, len(data))))  # type: ignore[arg-type]
    from alignment.runner import batch_input

    xs, ys, seen = [], [], 0
    for batch in data:
        if labels:
            x, y = _split_batch(batch)
            ys.append(torch.as_tensor(y).to(torch.int64))
        else:
            x = batch_input(batch)
        xs.append(torch.as_tensor(x))
        seen += len(xs[-1])
        if seen >= n:
            break
    if not xs:
        raise DataFormatError("The DataLoader yielded no batches.")
    return TensorDataset(torch.cat(xs)[:n], torch.cat(ys)[:n]) if labels else TensorDataset(torch.cat(xs)[:n])


def make_loader(
    dataset: Dataset, batch_size: int = 256, shuffle: bool = False, seed: int = 0, **kwargs: Any
) -> DataLoader:
    """Wraps a dataset in a ``DataLoader`` with a seeded shuffle.

    Args:
        dataset: Any map-style dataset.
        batch_size: Examples per batch.
        shuffle: Whether to reshuffle every epoch.
        seed: Seed of the shuffling generator (used only when ``shuffle``).
        **kwargs: Passed on to ``torch.utils.data.DataLoader``.

    Returns:
        The data loader.

    Raises:
        DataOptionError: If ``batch_size`` is not positive.
    """
    if int(batch_size) <= 0:
        raise DataOptionError(f"batch_size must be positive, got {batch_size}.")
    generator = torch.Generator().manual_seed(int(seed)) if shuffle else None
    return DataLoader(
        dataset, batch_size=int(batch_size), shuffle=shuffle, generator=generator, **kwargs
    )


def _dataset_key(name: str) -> str | None:
    """The known dataset a name means (``"fashion-mnist"`` -> ``"fashion_mnist"``), or None."""
    key = str(name).strip().lower().replace("-", "_")
    return {"fashion_mnist": "fashion_mnist", "fashionmnist": "fashion_mnist", "digits": "digits"}.get(key)


def load_dataset(
    name: str,
    split: str = "train",
    root: str | os.PathLike[str] | None = None,
    classes: Sequence[int] | None = None,
    remap: bool = True,
    **kwargs: Any,
) -> TensorDataset:
    """Loads a dataset by name.

    Args:
        name: ``"fashion_mnist"`` (also ``"fashion-mnist"``) or ``"digits"``.
        split: ``"train"`` or ``"test"``.
        root: Data folder (Fashion-MNIST only; ignored for digits).
        classes: Labels to keep, in head order.
        remap: Renumber ``classes[j]`` to ``j``.
        **kwargs: Passed on to :func:`load_fashion_mnist` (``normalize``,
            ``download``) or :func:`load_digits` (``test_fraction``, ``seed``).

    Returns:
        The dataset as a ``TensorDataset``.

    Raises:
        UnknownDatasetError: If ``name`` is not one of :data:`KNOWN_DATASETS`.
    """
    key = _dataset_key(name)
    if key == "fashion_mnist":
        return load_fashion_mnist(split, root=root, classes=classes, remap=remap, **kwargs)
    if key == "digits":
        return load_digits(split, classes=classes, remap=remap, **kwargs)
    raise UnknownDatasetError(
        f"Unknown dataset {name!r}; known datasets: {', '.join(KNOWN_DATASETS)} (other "
        "data: load_dataset_spec)."
    )


# ---------------------------------------------------------------------------
# Input formats
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InputFormat:
    """The images a model expects; ``None`` where unknown.

    Attributes:
        channels: Input channels.
        image_size: ``(height, width)``.
        mean: Per-channel mean subtracted after scaling pixels to [0, 1].
        std: Per-channel standard deviation divided by after that.
        source: Where the values came from (for messages).
    """

    channels: int | None = None
    image_size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    source: str = ""

    def missing(self) -> list[str]:
        """Names of the fields (``image_size``, ``mean``, ``std``) that are unknown."""
        return [name for name in ("image_size", "mean", "std") if getattr(self, name) is None]


def _pair(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    values = [int(size)] if isinstance(size, (int, float)) else [int(s) for s in size]
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise DataOptionError(f"image size must be one or two positive integers, got {size!r}.")
    return values[0], values[1]


def _floats(values: float | Sequence[float] | None, what: str) -> tuple[float, ...] | None:
    if values is None:
        return None
    out = (float(values),) if isinstance(values, (int, float)) else tuple(float(v) for v in values)
    if not out:
        raise DataOptionError(f"{what} must hold one value, or one per channel.")
    return out


def _first_conv(model: nn.Module) -> nn.Module | None:
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def _processor_config(config: Any) -> dict[str, Any]:
    """The ``preprocessor_config.json`` saved next to a transformers model, if any."""
    folder = Path(str(getattr(config, "_name_or_path", "") or ""))
    path = folder / "preprocessor_config.json"
    if not str(folder) or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataFormatError(f"{path} is not a readable JSON image-processor config: {exc}.") from exc
    return data if isinstance(data, dict) else {}


def input_format(model: nn.Module) -> InputFormat:
    """Reads the input format a model declares.

    * channels: ``config.num_channels`` of a transformers model, else the ``in_chans`` a
      timm model records, else the input channels of the first ``Conv2d``;
    * timm: ``pretrained_cfg`` (``input_size``, ``mean``, ``std``), used only when its
      channel count is the model's (a model built with other ``in_chans`` was not
      trained on what the config describes), and the fixed ``patch_embed.img_size`` of
      a vision transformer;
    * transformers: ``config.image_size`` and the ``image_mean`` / ``image_std`` /
      ``size`` of a ``preprocessor_config.json`` saved in the model's folder.

    A model that declares none of these itself (a zipped model: a trunk and branches; a user's
    wrapper) is read from its first submodule that does.

    Args:
        model: The model.

    Returns:
        The format, with ``None`` for what the model does not declare.
    """
    model = next((m for m in model.modules() if isinstance(getattr(m, "pretrained_cfg", None), Mapping)
                  or getattr(getattr(m, "config", None), "model_type", None) is not None), model)
    config = getattr(model, "config", None)
    conv = _first_conv(model)
    declared = vars(model).get("in_chans")  # (timm models record theirs: a stem may first fold pixels into channels)
    channels = (getattr(config, "num_channels", None)
                or (int(declared) if isinstance(declared, int) and not isinstance(declared, bool) and declared > 0
                    else None)
                or (conv.in_channels if conv is not None else None))
    size = mean = std = None
    sources = []
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("input_size"):
        c, h, w = cfg["input_size"]
        if channels is None or int(c) == int(channels):
            size, mean, std = (int(h), int(w)), cfg.get("mean"), cfg.get("std")
            channels = int(c)
            sources.append("timm pretrained_cfg")
        else:
            sources.append(f"timm pretrained_cfg ignored: it describes {c}-channel inputs, the model "
                           f"takes {channels}")
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        size = _pair(img_size)
        sources.append("timm patch_embed.img_size")
    if config is not None:
        processor = _processor_config(config)
        if processor.get("image_mean") is not None and processor.get("image_std") is not None:
            mean, std = processor["image_mean"], processor["image_std"]
            sources.append("preprocessor_config.json")
        proc_size = processor.get("size")
        if isinstance(proc_size, Mapping) and "height" in proc_size and "width" in proc_size:
            size = (int(proc_size["height"]), int(proc_size["width"]))
        if getattr(config, "image_size", None) is not None:  # the size the model was built for
            size = _pair(config.image_size)
            sources.append("config.image_size")
    return InputFormat(
        channels=None if channels is None else int(channels),
        image_size=size,
        mean=_floats(mean, "mean"),
        std=_floats(std, "std"),
        source=", ".join(sources) or "no declared input format",
    )


class _ImageFormatter:
    """PIL image, array or tensor -> float tensor ``C x H x W`` in the wanted format."""

    _LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's RGB -> L

    def __init__(
        self,
        image_size: int | Sequence[int] | None = None,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        channels: int | None = None,
    ) -> None:
        self.image_size = _pair(image_size)
        self.channels = None if channels is None else int(channels)
        mean, std = _floats(mean, "mean"), _floats(std, "std")
        if (mean is None) != (std is None):
            raise DataOptionError("give mean and std together (or neither, to keep pixels in [0, 1]).")
        if mean is not None and not all(np.isfinite(mean)):
            raise DataOptionError(f"mean must be finite, got {mean}.")
        if std is not None and not all(np.isfinite(v) and v > 0 for v in std):
            raise DataOptionError(f"std must be finite and positive, got {std}.")
        self.mean = None if mean is None else torch.tensor(mean).view(-1, 1, 1)
        self.std = None if std is None else torch.tensor(std).view(-1, 1, 1)

    @property
    def active(self) -> bool:
        """Whether the formatter changes anything beyond converting to a float tensor."""
        return self.image_size is not None or self.mean is not None or self.channels is not None

    def _tensor(self, image: Any) -> torch.Tensor:
        if not isinstance(image, (torch.Tensor, np.ndarray)):  # a PIL image
            if image.mode not in ("L", "RGB"):
                image = image.convert("RGB")
            image = np.asarray(image)
            image = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
        x = torch.as_tensor(np.array(image) if isinstance(image, np.ndarray) else image)
        x = x.float() / 255.0 if not x.is_floating_point() else x.float()
        return x[None] if x.ndim == 2 else x

    def _match_channels(self, x: torch.Tensor) -> torch.Tensor:
        c, want = x.shape[0], self.channels
        if want is None or c == want:
            return x
        if c == 4:  # drop alpha
            x, c = x[:3], 3
        if c == 3 and want == 1:
            return (x * torch.tensor(self._LUMA).view(3, 1, 1)).sum(0, keepdim=True)
        if c == 1:
            return x.expand(want, -1, -1).clone()
        if c == want:
            return x
        raise DataFormatError(f"Cannot turn {c}-channel images into the model's {want} channels.")

    def __call__(self, image: Any) -> torch.Tensor:
        x = self._match_channels(self._tensor(image))
        if self.image_size is not None and tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x[None], size=self.image_size, mode="bilinear", align_corners=False,
                              antialias=True)[0]
        if self.mean is not None:
            if self.mean.shape[0] not in (1, x.shape[0]) or self.std.shape[0] not in (1, x.shape[0]):
                raise DataOptionError(
                    f"mean/std have {self.mean.shape[0]}/{self.std.shape[0]} values for "
                    f"{x.shape[0]}-channel images; give one value, or one per channel."
                )
            x = (x - self.mean) / self.std
        return x


# ---------------------------------------------------------------------------
# Dataset specs
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A parsed dataset spec.

    Attributes:
        kind: ``"fashion_mnist"``, ``"digits"``, ``"folder"``, ``"torchvision"`` or
            ``"function"``.
        target: The folder (``folder``), the class name (``torchvision``) or
            ``module:function`` (``function``); empty for named datasets.
        text: The spec as given.
    """

    kind: str
    target: str = ""
    text: str = ""

    @property
    def needs_format(self) -> bool:
        """Whether images must be brought to a model's format (size, normalisation)."""
        return self.kind in ("digits", "folder", "torchvision")


_FUNCTION_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _unknown_spec(spec: str, why: str) -> UnknownDatasetError:
    return UnknownDatasetError(
        f"Unknown dataset spec {spec!r} ({why}); accepted forms: " + "; ".join(DATASET_SPEC_FORMS) + "."
    )


def parse_dataset_spec(spec: str) -> DatasetSpec:
    """Tells which kind of data a spec names (see :data:`DATASET_SPEC_FORMS`).

    A name (``fashion_mnist``, ``digits``) wins over a folder of that name, an existing
    folder over ``module:function``.

    Args:
        spec: The spec.

    Returns:
        The parsed spec.

    Raises:
        UnknownDatasetError: If the spec has none of the accepted forms (the message
            lists them).
        DatasetNotFoundError: If the spec is a path to a folder that does not exist.
    """
    text = str(spec).strip()
    key = _dataset_key(text)
    if key is not None:
        return DatasetSpec(key, "", text)
    if text.startswith("torchvision:"):
        name = text[len("torchvision:"):]
        if not name.isidentifier():
            raise _unknown_spec(text, "torchvision: must be followed by a dataset class name")
        return DatasetSpec("torchvision", name, text)
    path = Path(text).expanduser()
    if text and path.is_dir():
        return DatasetSpec("folder", str(path), text)
    if _FUNCTION_SPEC.match(text):
        return DatasetSpec("function", text, text)
    if text and (os.sep in text or text.startswith((".", "~"))):
        raise DatasetNotFoundError(f"Dataset folder {path} (from spec {text!r}) does not exist.")
    raise _unknown_spec(text, "not a known name, an existing folder, torchvision:NAME or module:function")


def _split_folder(folder: Path, split: str) -> Path:
    """The folder of one split: ``train/``, and ``test/`` (else ``val/``) when present."""
    names = ("train",) if split == "train" else ("test", "val")
    for name in names:
        if (folder / name).is_dir():
            return folder / name
    if any((folder / name).is_dir() for name in ("train", "test", "val")):
        raise DatasetNotFoundError(
            f"{folder} has split subfolders but no {' or '.join(n + '/' for n in names)} for the "
            f"{split!r} split."
        )
    if split == "test":
        warnings.warn(
            f"{folder} has no train/ and test/ (or val/) subfolders: the same images are used "
            "for calibration and evaluation.",
            DataWarning,
            stacklevel=3,
        )
    return folder


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def _load_folder(folder: Path, split: str, formatter: _ImageFormatter) -> Dataset:
    from torchvision.datasets import ImageFolder

    split_dir = _split_folder(folder, split)
    train_dir = _split_folder(folder, "train")
    if split_dir != train_dir and _class_folders(split_dir) != _class_folders(train_dir):
        raise DataFormatError(
            f"{split_dir} and {train_dir} hold different class folders "
            f"({_class_folders(split_dir)} vs {_class_folders(train_dir)}); labels would not agree."
        )
    try:
        return ImageFolder(str(split_dir), transform=formatter, loader=_read_image)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DatasetNotFoundError(f"No images found in {split_dir}: {exc}") from exc


def _read_image(path: str):
    """An image file as a PIL image (RGB), or a :class:`DataFormatError` naming a file that is none."""
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except OSError as exc:  # (PIL's UnidentifiedImageError, a truncated file)
        raise DataFormatError(f"{path} cannot be read as an image ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:200]}); remove or replace it") from exc


def _load_torchvision(name: str, split: str, root: Path, formatter: _ImageFormatter, download: bool) -> Dataset:
    import torchvision.datasets as tv

    cls = getattr(tv, name, None)
    if not (isinstance(cls, type) and issubclass(cls, Dataset)):
        raise _unknown_spec(f"torchvision:{name}", f"torchvision.datasets has no dataset class {name!r}")
    params = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {"transform": formatter}
    if "download" in params:
        kwargs["download"] = download
    if "train" in params:
        attempts = [{"train": split == "train"}]
    elif "split" in params:
        attempts = [{"split": s} for s in (("train",) if split == "train" else ("test", "val"))]
    else:
        attempts = [{}]
    error: Exception | None = None
    where = {"root": str(root)} if "root" in params else {}  # (FakeData takes no folder)
    for extra in attempts:
        try:
            return cls(**where, **kwargs, **extra)
        except TypeError as exc:  # a constructor that needs other arguments
            raise DataOptionError(f"torchvision:{name} cannot be built from a folder and a transform ({exc}); give it "
                                  f"as a module:function that builds it") from exc
        except ValueError as exc:  # e.g. a split name this dataset does not have
            error = exc
        except (RuntimeError, FileNotFoundError) as exc:
            raise DatasetNotFoundError(
                f"torchvision:{name} found no {split!r} data under {root}: {exc} Pass the folder "
                "that holds it (root= / --data-root), or allow a download (download=True / --download)."
            ) from exc
    raise DataOptionError(f"torchvision:{name} has no {split!r} split: {error}")


def _raw_dataset(data: Any) -> Any:
    """The user's dataset under the toolkit's views and subsets."""
    while isinstance(data, (_View, Subset)):
        data = data.base if isinstance(data, _View) else data.dataset
    return data


def integer_images(data: Dataset | DataLoader) -> bool:
    """Whether a dataset's inputs, as the dataset itself gives them (under the views and subsets of
    this module), are integer images (``uint8`` pixels, 0-255), which the loaders convert to floats.

    Only the first item is read; a ``DataLoader`` (whose batches are not read here) and an empty
    dataset give False.

    Args:
        data: A map-style dataset of (input, label) pairs or dicts with ``pixel_values``.

    Returns:
        True for an integer (not boolean) tensor or array input of two or more dimensions.
    """
    raw = _raw_dataset(data)
    if isinstance(raw, DataLoader):
        return False
    if isinstance(raw, TensorDataset):
        x = raw.tensors[0]
        return not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool and x.dim() >= 3
    try:
        if len(raw) == 0:  # type: ignore[arg-type]
            return False
        x, _ = _item_pair(raw[0])
    except (TypeError, DataFormatError):
        return False
    if isinstance(x, np.ndarray):
        return x.ndim >= 2 and np.issubdtype(x.dtype, np.integer)
    return (isinstance(x, torch.Tensor) and x.dim() >= 2 and not x.is_floating_point() and not x.is_complex()
            and x.dtype != torch.bool)


def _call_data_function(target: str, values: Mapping[str, Any]) -> tuple[Dataset | DataLoader, set[str]]:
    """Calls ``module:function`` with the values its signature names; returns its data and those names."""
    module_name, function_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise _unknown_spec(target, f"module {module_name!r} cannot be imported: {exc}") from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        raise _unknown_spec(target, f"module {module_name!r} has no function {function_name!r}")
    given = {k: v for k, v in values.items() if k in inspect.signature(function).parameters}
    try:
        result = function(**given)
    except FusionError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's function failed: say which, and how
        raise DataFormatError(f"{target}({', '.join(f'{k}=...' for k in given)}) raised {type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:300]}") from exc
    if not isinstance(result, (Dataset, DataLoader)):
        raise DataFormatError(
            f"{target} returned {type(result).__name__}; it must return a torch Dataset or DataLoader."
        )
    return result, set(given)


def load_dataset_spec(
    spec: str,
    split: str = "train",
    image_size: int | Sequence[int] | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    channels: int | None = None,
    root: str | os.PathLike[str] | None = None,
    classes: Sequence[int] | None = None,
    remap: bool = True,
    download: bool = False,
) -> Dataset | DataLoader:
    """Loads one split of the data a spec names, in a model's input format.

    Forms (:data:`DATASET_SPEC_FORMS`):

    * ``fashion_mnist``: as :func:`load_fashion_mnist`; without format options the
      zoo's format (1 x 28 x 28, Fashion-MNIST normalisation), otherwise the options
      given, the Fashion-MNIST statistics standing in for ``mean``/``std`` left out;
    * ``digits``: as :func:`load_digits` (pixels in [0, 1]);
    * a folder: ``ImageFolder`` of ``<folder>/train`` and ``<folder>/test`` (or
      ``val``), or of the folder itself for both splits (with a :class:`DataWarning`);
    * ``torchvision:NAME``: ``torchvision.datasets.NAME`` under ``root`` (default
      :data:`DEFAULT_DOWNLOAD_DIR`), split by its ``train=`` or ``split=`` argument;
    * ``module:function``: the function's Dataset or DataLoader, as it returns it (items
      as (input, label) pairs or dicts with ``pixel_values`` and ``labels``), except that a
      Dataset of integer (``uint8``) images is converted like the images of the other forms
      (below); it is called with those of ``split``, ``root``, ``image_size``, ``mean``,
      ``std``, ``channels`` and ``classes`` its signature names.

    Images are converted to float tensors (integer pixels scaled from 0-255 to [0, 1]),
    their channels matched to ``channels`` (grey <-> RGB), resized to ``image_size`` and
    normalised with ``mean``/``std``; ``None`` leaves that aspect as the data has it.

    Args:
        spec: The dataset spec.
        split: ``"train"`` or ``"test"``.
        image_size: ``(height, width)`` or one side.
        mean: Per-channel (or one) mean, for pixels in [0, 1].
        std: Per-channel (or one) standard deviation.
        channels: Input channels of the model.
        root: Data folder of ``fashion_mnist`` and ``torchvision:NAME``.
        classes: Labels to keep, in head order; ``None`` keeps all.
        remap: With ``classes``, renumber label ``classes[j]`` to ``j``.
        download: Let torchvision download missing data.

    Returns:
        A Dataset of (image, label) pairs, or the DataLoader a function returned.

    Raises:
        UnknownDatasetError: For a spec of no accepted form (the message lists them).
        DatasetNotFoundError: If the data is not where the spec points.
        DataOptionError: For a bad split, classes or format option.
        DataFormatError: If the data cannot be read or converted.
    """
    parsed = parse_dataset_spec(spec)
    _check_split(split)
    if parsed.kind == "fashion_mnist":
        if image_size is None and mean is None and std is None and channels in (None, 1):
            return load_fashion_mnist(split, root=root, classes=classes, remap=remap, download=download)
        formatter = _ImageFormatter(image_size, FASHION_MNIST_MEAN if mean is None else mean,
                                    FASHION_MNIST_STD if std is None else std, channels)
        raw = load_fashion_mnist(split, root=root, classes=classes, remap=remap, normalize=False,
                                 download=download)
        return _View(raw, transform=formatter)
    formatter = _ImageFormatter(image_size, mean, std, channels)
    if parsed.kind == "digits":
        raw = load_digits(split, classes=classes, remap=remap)
        return _View(raw, transform=formatter) if formatter.active else raw
    if parsed.kind == "function":
        values = {"split": split, "root": root, "image_size": image_size, "mean": mean, "std": std,
                  "channels": channels, "classes": classes}
        data, given = _call_data_function(parsed.target, values)
        if isinstance(data, Dataset) and integer_images(data):
            # uint8 images are converted as every other spec's images: to [0, 1], channels, size, mean/std
            data = _View(data, transform=formatter)
        if classes is None or "classes" in given:
            return data
        if isinstance(data, DataLoader):
            warnings.warn(
                f"{parsed.text} returned a DataLoader: it is used as given, without selecting the "
                f"classes {list(classes)} (return a Dataset, or accept a classes= argument).",
                DataWarning,
                stacklevel=2,
            )
            return data
        return restrict_classes(data, classes, remap=remap)
    if parsed.kind == "folder":
        data = _load_folder(Path(parsed.target), split, formatter)
    else:
        target_root = Path(root).expanduser() if root is not None else DEFAULT_DOWNLOAD_DIR.expanduser()
        data = _load_torchvision(parsed.target, split, target_root, formatter, download)
    return restrict_classes(data, classes, remap=remap)
