"""Datasets used to measure fusion: Fashion-MNIST and scikit-learn's digits.

Fashion-MNIST is read straight from its IDX files (gzipped or not) with numpy, so
torchvision is only needed when ``download=True`` is asked for. Images come back as
float32 tensors of shape ``N x 1 x H x W`` scaled to [0, 1] and (by default)
normalised with :data:`FASHION_MNIST_MEAN` / :data:`FASHION_MNIST_STD`, the
statistics the model zoo was trained with; labels are int64.

Class subsets follow the zoo convention: a model trained on ``classes=[5, 6, 7, 8, 9]``
has head ``j`` for label ``classes[j]``, so with ``remap=True`` label 5 becomes 0,
label 6 becomes 1, and so on.
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = [
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FASHION_MNIST_CLASSES",
    "DEBIAN_FASHION_MNIST_DIR",
    "DATA_DIR_ENV",
    "KNOWN_DATASETS",
    "DataError",
    "DatasetNotFoundError",
    "UnknownDatasetError",
    "DataFormatError",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "load_digits",
    "calibration_subset",
    "make_loader",
    "load_dataset",
    "select_classes",
    "dataset_tensors",
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
"""Where ``download=True`` puts Fashion-MNIST when no ``root`` is given."""

KNOWN_DATASETS = ("fashion_mnist", "digits")
"""Names accepted by :func:`load_dataset`."""

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataError(Exception):
    """Base class of the errors raised by :mod:`fusion.data`."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """The dataset's files were found in none of the places searched."""


class UnknownDatasetError(DataError, ValueError):
    """A dataset name that :func:`load_dataset` does not know."""


class DataFormatError(DataError, ValueError):
    """A data file exists but cannot be decoded (wrong magic number, truncated...)."""


# ---------------------------------------------------------------------------
# IDX decoding
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
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
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
        ValueError: If ``split`` is not ``"train"`` or ``"test"``.
        DatasetNotFoundError: If the files are nowhere; the message lists the places
            tried and how to install the data.
    """
    _check_split(split)
    tried: list[str] = []
    candidates: list[tuple[str, Path]] = []
    if root is not None:
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
# Class subsets
# ---------------------------------------------------------------------------


def _check_classes(classes: Iterable[int] | None, num_classes: int) -> list[int] | None:
    if classes is None:
        return None
    out = [int(c) for c in classes]
    if not out:
        raise ValueError("classes must not be empty; pass None to keep every class.")
    if len(set(out)) != len(out):
        raise ValueError(f"classes must not repeat a label, got {out}.")
    bad = [c for c in out if not 0 <= c < num_classes]
    if bad:
        raise ValueError(
            f"classes {bad} are outside the dataset's labels 0..{num_classes - 1}."
        )
    return out


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
    class_tensor = torch.as_tensor(list(classes), dtype=torch.int64)
    mask = torch.isin(labels, class_tensor)
    images, labels = images[mask], labels[mask]
    if remap:
        lookup = torch.full((int(class_tensor.max()) + 1,), -1, dtype=torch.int64)
        lookup[class_tensor] = torch.arange(len(class_tensor), dtype=torch.int64)
        labels = lookup[labels]
    return images, labels


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
        ValueError: For a bad ``split`` or ``classes``.
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
        ValueError: For a bad ``split``, ``classes`` or ``test_fraction``.
    """
    from sklearn.model_selection import train_test_split

    _check_split(split)
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}.")
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
    map-style dataset is read item by item and stacked.

    Args:
        dataset: The dataset.

    Returns:
        ``(inputs, labels)`` with labels as int64 for non-tensor datasets.

    Raises:
        ValueError: If a ``TensorDataset`` holds fewer than two tensors.
        TypeError: If the dataset has no length or its items are not pairs.
    """
    if isinstance(dataset, TensorDataset):
        if len(dataset.tensors) < 2:
            raise ValueError(
                "Expected a TensorDataset of (inputs, labels); this one holds "
                f"{len(dataset.tensors)} tensor(s)."
            )
        return dataset.tensors[0], dataset.tensors[1]
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError as exc:
        raise TypeError(
            f"{type(dataset).__name__} has no length; pass a map-style dataset of "
            "(input, label) pairs."
        ) from exc
    xs, ys = [], []
    for i in range(n):
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise TypeError(
                f"Item {i} of {type(dataset).__name__} is {type(item).__name__}; expected "
                "an (input, label) pair."
            )
        xs.append(torch.as_tensor(item[0]))
        ys.append(torch.as_tensor(item[1]))
    return torch.stack(xs), torch.stack(ys).to(torch.int64)


def calibration_subset(
    dataset: Dataset, size: int, seed: int = 0, balanced: bool = False
) -> TensorDataset:
    """Draws a deterministic random subset, e.g. to compute activation statistics.

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
        ValueError: If ``size`` is not positive, exceeds the dataset's length, or
            (with ``balanced``) some label has too few examples.
    """
    x, y = dataset_tensors(dataset)
    n = len(y)
    size = int(size)
    if size <= 0:
        raise ValueError(f"calibration size must be positive, got {size}.")
    if size > n:
        raise ValueError(
            f"calibration size {size} exceeds the dataset's {n} examples; ask for at "
            f"most {n}."
        )
    generator = torch.Generator().manual_seed(int(seed))
    if not balanced:
        index = torch.randperm(n, generator=generator)[:size]
    else:
        labels = torch.unique(y)
        k = len(labels)
        quotas = [size // k + (1 if i < size % k else 0) for i in range(k)]
        parts = []
        for label, quota in zip(labels.tolist(), quotas):
            members = torch.nonzero(y == label, as_tuple=False).flatten()
            if quota > len(members):
                raise ValueError(
                    f"balanced calibration needs {quota} examples of label {label} but "
                    f"the dataset has only {len(members)}; lower size or use "
                    "balanced=False."
                )
            parts.append(members[torch.randperm(len(members), generator=generator)[:quota]])
        index = torch.cat(parts)
        index = index[torch.randperm(len(index), generator=generator)]
    return TensorDataset(x[index].clone(), y[index].clone())


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
        ValueError: If ``batch_size`` is not positive.
    """
    if int(batch_size) <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    generator = torch.Generator().manual_seed(int(seed)) if shuffle else None
    return DataLoader(
        dataset, batch_size=int(batch_size), shuffle=shuffle, generator=generator, **kwargs
    )


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
    key = str(name).strip().lower().replace("-", "_")
    if key in ("fashion_mnist", "fashionmnist"):
        return load_fashion_mnist(split, root=root, classes=classes, remap=remap, **kwargs)
    if key == "digits":
        return load_digits(split, classes=classes, remap=remap, **kwargs)
    raise UnknownDatasetError(
        f"Unknown dataset {name!r}; known datasets: {', '.join(KNOWN_DATASETS)}."
    )
