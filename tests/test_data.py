"""Tests of fusion.data: IDX decoding, Fashion-MNIST, digits, subsets and loaders."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from fusion import data as fdata
from fusion.data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    DataFormatError,
    DatasetNotFoundError,
    UnknownDatasetError,
    calibration_subset,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    make_loader,
)


def _fashion_available() -> bool:
    try:
        fdata.find_fashion_mnist("test")
        return True
    except DatasetNotFoundError:
        return False


needs_fashion = pytest.mark.skipif(
    not _fashion_available(), reason="Fashion-MNIST IDX files not installed (apt-get install dataset-fashion-mnist)"
)


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def _fake_fashion(folder: Path, split: str = "test", n: int = 12, compress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    prefix = "t10k" if split == "test" else "train"
    suffix = ".gz" if compress else ""
    folder.mkdir(parents=True, exist_ok=True)
    _write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
    _write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
    return images, labels


@pytest.fixture
def no_default_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Hides the real data: no $FUSION_DATA_DIR and an empty 'Debian' folder."""
    monkeypatch.delenv(fdata.DATA_DIR_ENV, raising=False)
    empty = tmp_path / "debian-empty"
    empty.mkdir()
    monkeypatch.setattr(fdata, "DEBIAN_FASHION_MNIST_DIR", empty)
    return empty


# --------------------------------------------------------------------------- IDX files


@pytest.mark.parametrize("compress", [True, False])
def test_reads_idx_from_root(tmp_path: Path, no_default_data: Path, compress: bool) -> None:
    images, labels = _fake_fashion(tmp_path / "fm", compress=compress)
    ds = load_fashion_mnist("test", root=tmp_path / "fm", normalize=False)
    x, y = ds.tensors
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))
    assert torch.allclose(x[:, 0], torch.from_numpy(images).float() / 255.0)


def test_env_var_and_torchvision_layout(tmp_path: Path, no_default_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, _ = _fake_fashion(tmp_path / "tv" / "FashionMNIST" / "raw", split="train", n=7)
    monkeypatch.setenv(fdata.DATA_DIR_ENV, str(tmp_path / "tv"))
    x, y = load_fashion_mnist("train").tensors
    assert len(y) == 7
    expected = (torch.from_numpy(images).float() / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    assert torch.allclose(x[:, 0], expected, atol=1e-6)


def test_missing_data_error_lists_places_and_fixes(tmp_path: Path, no_default_data: Path) -> None:
    nowhere = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as info:
        load_fashion_mnist("test", root=nowhere)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(nowhere) in message and str(no_default_data) in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "FUSION_DATA_DIR" in message and "download=True" in message


def test_corrupt_idx_raises(tmp_path: Path, no_default_data: Path) -> None:
    folder = tmp_path / "bad"
    _fake_fashion(folder, compress=False)
    (folder / "t10k-images-idx3-ubyte").write_bytes(b"\x12\x34\x56\x78garbage")
    with pytest.raises(DataFormatError, match="t10k-images-idx3-ubyte"):
        load_fashion_mnist("test", root=folder)


def test_bad_split_and_classes() -> None:
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation")
    with pytest.raises(ValueError, match="repeat"):
        load_digits("train", classes=[1, 1])
    with pytest.raises(ValueError, match=r"outside"):
        load_digits("train", classes=[3, 10])
    with pytest.raises(ValueError, match="empty"):
        load_digits("train", classes=[])


# --------------------------------------------------------------------------- real Fashion-MNIST


@needs_fashion
def test_fashion_test_split_shapes_and_normalisation() -> None:
    x, y = load_fashion_mnist("test").tensors
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert torch.equal(torch.bincount(y), torch.full((10,), 1000))
    raw, raw_y = load_fashion_mnist("test", normalize=False).tensors
    assert raw.min() == 0.0 and raw.max() == 1.0
    assert torch.equal(raw_y, y)
    assert torch.allclose(x, (raw - FASHION_MNIST_MEAN) / FASHION_MNIST_STD, atol=1e-6)
    assert abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1.0) < 0.02


@needs_fashion
def test_fashion_class_subset_remap() -> None:
    full_x, full_y = load_fashion_mnist("test").tensors
    x, y = load_fashion_mnist("test", classes=[5, 6, 7, 8, 9]).tensors
    assert len(y) == 5000
    assert set(y.tolist()) == {0, 1, 2, 3, 4}
    mask = full_y >= 5
    assert torch.equal(x, full_x[mask])
    assert torch.equal(y, full_y[mask] - 5)
    _, kept = load_fashion_mnist("test", classes=[5, 6, 7, 8, 9], remap=False).tensors
    assert torch.equal(kept, full_y[mask])
    # Head order follows the order of `classes`.
    _, y2 = load_fashion_mnist("test", classes=[3, 1]).tensors
    assert torch.equal(y2, torch.where(full_y[(full_y == 1) | (full_y == 3)] == 3, 0, 1))


@needs_fashion
def test_fashion_decoding_is_cached() -> None:
    load_fashion_mnist("test")
    before = fdata._read_idx_cached.cache_info().hits
    load_fashion_mnist("test", classes=[0, 1])
    assert fdata._read_idx_cached.cache_info().hits >= before + 2


@needs_fashion
def test_returned_tensors_are_independent() -> None:
    a = load_fashion_mnist("test")
    a.tensors[0].zero_()
    b = load_fashion_mnist("test")
    assert b.tensors[0].abs().sum() > 0


# --------------------------------------------------------------------------- digits


def test_digits_split() -> None:
    train, test = load_digits("train"), load_digits("test")
    assert train.tensors[0].shape == (1347, 1, 8, 8)
    assert test.tensors[0].shape == (450, 1, 8, 8)
    assert train.tensors[0].min() >= 0 and train.tensors[0].max() == 1.0
    assert train.tensors[1].dtype == torch.int64
    again = load_digits("train")
    assert torch.equal(again.tensors[0], train.tensors[0])
    other = load_digits("train", seed=1)
    assert not torch.equal(other.tensors[1], train.tensors[1])
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits("train", test_fraction=1.5)


def test_digits_classes_remap_consistent_with_split() -> None:
    full_x, full_y = load_digits("test").tensors
    x, y = load_digits("test", classes=[7, 2]).tensors
    assert set(y.tolist()) == {0, 1}
    mask = (full_y == 7) | (full_y == 2)
    assert torch.equal(x, full_x[mask])
    assert torch.equal(y, (full_y[mask] == 2).long())


# --------------------------------------------------------------------------- subsets, loaders, dispatch


def _toy(n: int = 100) -> TensorDataset:
    return TensorDataset(torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.arange(n) % 4)


def test_calibration_subset_deterministic() -> None:
    ds = _toy()
    a, b = calibration_subset(ds, 20, seed=3), calibration_subset(ds, 20, seed=3)
    assert torch.equal(a.tensors[0], b.tensors[0])
    c = calibration_subset(ds, 20, seed=4)
    assert not torch.equal(a.tensors[0], c.tensors[0])
    values = a.tensors[0].flatten().long()
    assert len(set(values.tolist())) == 20
    assert torch.equal(a.tensors[1], values % 4)  # pairs stay together
    a.tensors[0].zero_()
    assert ds.tensors[0].sum() == sum(range(100))  # copy, not a view


def test_calibration_subset_balanced_and_errors() -> None:
    ds = _toy()
    sub = calibration_subset(ds, 10, balanced=True)
    assert torch.bincount(sub.tensors[1]).tolist() == [3, 3, 2, 2]
    with pytest.raises(ValueError, match="exceeds the dataset's 100"):
        calibration_subset(ds, 101)
    with pytest.raises(ValueError, match="positive"):
        calibration_subset(ds, 0)
    with pytest.raises(ValueError, match="label 0"):
        calibration_subset(TensorDataset(torch.zeros(5, 1), torch.tensor([0, 1, 1, 1, 1])), 4, balanced=True)


def test_make_loader() -> None:
    ds = _toy(10)
    batches = [y for _, y in make_loader(ds, batch_size=4)]
    assert [len(b) for b in batches] == [4, 4, 2]
    first = torch.cat([x for x, _ in make_loader(ds, batch_size=4, shuffle=True, seed=1)])
    second = torch.cat([x for x, _ in make_loader(ds, batch_size=4, shuffle=True, seed=1)])
    assert torch.equal(first, second)
    assert sorted(first.flatten().tolist()) == list(range(10))
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(ds, batch_size=0)


def test_load_dataset_dispatch() -> None:
    ds = load_dataset("digits", "test", classes=[0, 1])
    assert set(ds.tensors[1].tolist()) == {0, 1}
    with pytest.raises(UnknownDatasetError) as info:
        load_dataset("cifar10", "train")
    assert "cifar10" in str(info.value)
    assert "fashion_mnist" in str(info.value) and "digits" in str(info.value)


def test_load_dataset_fashion_alias(tmp_path: Path, no_default_data: Path) -> None:
    _fake_fashion(tmp_path / "fm")
    ds = load_dataset("fashion-mnist", "test", root=tmp_path / "fm", classes=[2, 3])
    assert set(ds.tensors[1].tolist()) == {0, 1}
