"""Tests of fusion.experiments.data: IDX decoding, Fashion-MNIST, digits, subsets, loaders, dataset specs."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from alignment.errors import FusionError
from fusion.experiments import data as fdata
from fusion.experiments.data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    DataFormatError,
    DataOptionError,
    DatasetNotFoundError,
    DatasetSpec,
    DataWarning,
    UnknownDatasetError,
    calibration_subset,
    first_examples,
    input_format,
    load_dataset,
    load_dataset_spec,
    load_digits,
    load_fashion_mnist,
    make_loader,
    parse_dataset_spec,
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
    nowhere.mkdir()  # (a folder without the files: the next places are tried)
    with pytest.raises(DatasetNotFoundError) as info:
        load_fashion_mnist("test", root=nowhere)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(nowhere) in message and str(no_default_data) in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "FUSION_DATA_DIR" in message and "download=True" in message


def test_a_data_folder_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    """Guards: a root that does not exist (a typo) is an error naming it, even where other places
    hold the data (before: the Debian copy was read silently); with download it is where to download."""
    with pytest.raises(DatasetNotFoundError, match=r"the data folder .*typo does not exist"):
        load_fashion_mnist("test", root=tmp_path / "typo")


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


# --------------------------------------------------------------------------- dataset specs


def _png_folder(root: Path, classes: dict[str, list[tuple[int, ...]]], size: tuple[int, int] = (6, 5)) -> None:
    """One RGB PNG of a solid colour per entry, in one subfolder per class."""
    from PIL import Image

    for name, colours in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, colour in enumerate(colours):
            Image.new("RGB", size, colour).save(root / name / f"{i}.png")


def test_parse_dataset_spec_forms(tmp_path: Path) -> None:
    assert parse_dataset_spec("fashion-mnist").kind == "fashion_mnist"
    assert parse_dataset_spec("digits").kind == "digits"
    cifar = DatasetSpec("torchvision", "CIFAR10", "torchvision:CIFAR10")
    assert parse_dataset_spec("torchvision:CIFAR10") == cifar and not parse_dataset_spec("fashion_mnist").needs_format
    assert parse_dataset_spec(str(tmp_path)).kind == "folder"
    assert parse_dataset_spec("tests.data_spec_helpers:loader").kind == "function"
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        parse_dataset_spec(str(tmp_path / "missing"))


@pytest.mark.parametrize("spec", ["cifar10", "torchvision:", "a:b:c", ""])
def test_unknown_dataset_spec_lists_the_forms(spec: str) -> None:
    with pytest.raises(UnknownDatasetError) as info:
        load_dataset_spec(spec, "train")
    message = str(info.value)
    assert isinstance(info.value, FusionError) and isinstance(info.value, ValueError)
    assert repr(spec) in message
    for form in ("fashion_mnist", "digits", "ImageFolder", "torchvision:NAME", "module:function"):
        assert form in message


def test_unknown_module_or_function_is_an_unknown_spec() -> None:
    with pytest.raises(UnknownDatasetError, match="no_such_module_xyz"):
        load_dataset_spec("no_such_module_xyz:load")
    with pytest.raises(UnknownDatasetError, match="no function 'nope'"):
        load_dataset_spec("tests.data_spec_helpers:nope")
    with pytest.raises(DataFormatError, match="list"):
        load_dataset_spec("tests.data_spec_helpers:not_a_dataset")
    with pytest.raises(UnknownDatasetError, match="no dataset class 'NoSuchSet'"):
        load_dataset_spec("torchvision:NoSuchSet")


def test_image_folder_with_splits(tmp_path: Path) -> None:
    _png_folder(tmp_path / "train", {"cat": [(255, 0, 0), (0, 255, 0)], "dog": [(0, 0, 255)]})
    _png_folder(tmp_path / "val", {"cat": [(255, 255, 255)], "dog": [(0, 0, 0), (255, 255, 255)]})
    train = load_dataset_spec(str(tmp_path), "train", image_size=(4, 3), mean=0.5, std=0.5, channels=3)
    assert len(train) == 3
    x, y = train[0]
    assert x.shape == (3, 4, 3) and y == 0
    # solid red: (1 - 0.5) / 0.5 = 1 in the red channel, (0 - 0.5) / 0.5 = -1 elsewhere
    assert torch.allclose(x[0], torch.ones(4, 3)) and torch.allclose(x[1:], -torch.ones(2, 4, 3))
    test = load_dataset_spec(str(tmp_path), "test", image_size=4, channels=1)  # val/ is the test split
    assert [int(y) for _, y in test] == [0, 1, 1]
    grey, _ = test[0]
    assert grey.shape == (1, 4, 4) and torch.allclose(grey, torch.ones(1, 4, 4))  # white, in [0, 1]
    # class restriction through ImageFolder.targets, with the zoo's remapping
    dogs = load_dataset_spec(str(tmp_path), "test", image_size=4, channels=1, classes=[1])
    assert len(dogs) == 2 and [y for _, y in dogs] == [0, 0]
    assert calibration_subset(train, 2, seed=0).tensors[0].shape == (2, 3, 4, 3)


def test_image_folder_without_splits_warns_for_test(tmp_path: Path) -> None:
    _png_folder(tmp_path, {"a": [(10, 20, 30)], "b": [(40, 50, 60)]})
    train = load_dataset_spec(str(tmp_path), "train")
    assert len(train) == 2 and train[1][0].shape == (3, 5, 6)  # native size, [0, 1]
    with pytest.warns(DataWarning, match="same images"):
        load_dataset_spec(str(tmp_path), "test")


def test_image_folder_errors(tmp_path: Path) -> None:
    _png_folder(tmp_path / "train", {"a": [(0, 0, 0)]})
    with pytest.raises(DatasetNotFoundError, match="test/ or val/"):
        load_dataset_spec(str(tmp_path), "test")
    _png_folder(tmp_path / "test", {"b": [(0, 0, 0)]})
    with pytest.raises(DataFormatError, match="different class folders"):
        load_dataset_spec(str(tmp_path), "test")
    with pytest.raises(DataOptionError, match="mean and std together"):
        load_dataset_spec(str(tmp_path), "train", mean=0.5)
    with pytest.raises(DataOptionError, match="split"):
        load_dataset_spec(str(tmp_path), "validation")
    # a file that is no image: an error naming it when it is read (before: PIL's traceback)
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"not a png")
    data = load_dataset_spec(str(tmp_path), "train", image_size=(4, 4), mean=(0.5,), std=(0.5,), channels=1)
    with pytest.raises(DataFormatError, match=r"broken.png cannot be read as an image"):
        [data[i] for i in range(len(data))]


def test_module_function_spec_gets_split_and_format() -> None:
    train = load_dataset_spec("tests.data_spec_helpers:split_tensors", "train")
    test = load_dataset_spec("tests.data_spec_helpers:split_tensors", "test")
    assert float(train[0][0].max()) == 1.0 and float(test[0][0].max()) == 7.0
    # used as returned, class selection applied afterwards
    subset = load_dataset_spec("tests.data_spec_helpers:split_tensors", "train", classes=[2, 1])
    assert subset.tensors[1].tolist() == [1, 0, 1, 0]
    x, y = load_dataset_spec("tests.data_spec_helpers:formatted", "test", image_size=(9, 9), mean=(0.25,),
                             std=(0.5,), channels=3)[0]
    assert x.flatten().tolist() == [9.0, 0.25, 0.5, 3.0] and int(y) == 1


def test_module_function_spec_may_return_a_loader() -> None:
    from torch.utils.data import DataLoader

    loader = load_dataset_spec("tests.data_spec_helpers:loader", "train")
    assert isinstance(loader, DataLoader)
    head = first_examples(loader, 6)
    assert head.tensors[0].shape == (6, 1, 2, 2) and head.tensors[1].tolist() == [0, 1, 0, 1, 0, 1]
    with pytest.warns(DataWarning, match="without selecting the classes"):
        load_dataset_spec("tests.data_spec_helpers:loader", "train", classes=[0])


def test_digits_and_fashion_specs_in_a_model_format(tmp_path: Path, no_default_data: Path) -> None:
    digits = load_dataset_spec("digits", "test", image_size=16, mean=0.5, std=0.25, channels=3)
    raw = load_digits("test")
    x, y = digits[0]
    assert x.shape == (3, 16, 16) and int(y) == int(raw.tensors[1][0])
    assert torch.equal(load_dataset_spec("digits", "test").tensors[0], raw.tensors[0])  # no options: as is
    _fake_fashion(tmp_path / "fm")
    default = load_dataset_spec("fashion_mnist", "test", root=tmp_path / "fm", channels=1)
    assert torch.equal(default.tensors[0], load_fashion_mnist("test", root=tmp_path / "fm").tensors[0])
    wide, _ = load_dataset_spec("fashion_mnist", "test", root=tmp_path / "fm", channels=3)[0]
    assert wide.shape == (3, 28, 28) and torch.equal(wide[0], default.tensors[0][0, 0])


def test_input_format_from_timm_and_transformers(tmp_path: Path) -> None:
    import timm
    import transformers

    rgb = timm.create_model("resnet18", pretrained=False, num_classes=3, channels=(8, 8, 8, 8), stem_width=8)
    fmt = input_format(rgb)
    assert (fmt.channels, fmt.image_size) == (3, (224, 224))
    assert fmt.mean == pytest.approx((0.485, 0.456, 0.406)) and fmt.std == pytest.approx((0.229, 0.224, 0.225))
    grey = timm.create_model("resnet18", pretrained=False, num_classes=3, in_chans=1, channels=(8, 8, 8, 8),
                             stem_width=8)
    fmt = input_format(grey)  # the ImageNet config does not describe a 1-channel model
    assert fmt.channels == 1 and fmt.missing() == ["image_size", "mean", "std"] and "ignored" in fmt.source
    # TResNet's stem folds 4 x 4 pixels into channels first: its first conv takes 48, its images have 3
    tresnet = timm.create_model("tresnet_m", pretrained=False, num_classes=3)
    fmt = input_format(tresnet)
    assert (fmt.channels, fmt.image_size) == (3, (224, 224)) and "ignored" not in fmt.source
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8,
                            embed_dim=16, depth=1, num_heads=2)
    assert input_format(vit).image_size == (32, 32) and input_format(vit).mean == pytest.approx((0.5,) * 3)

    hf = transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=20, patch_size=10, num_channels=1, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=8, num_labels=2))
    fmt = input_format(hf)
    assert (fmt.channels, fmt.image_size, fmt.mean) == (1, (20, 20), None)
    hf.save_pretrained(str(tmp_path / "hf"))
    (tmp_path / "hf" / "preprocessor_config.json").write_text(
        '{"image_mean": [0.3], "image_std": [0.2], "size": {"height": 20, "width": 20}}')
    loaded = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    fmt = input_format(loaded)
    assert (fmt.image_size, fmt.mean, fmt.std) == ((20, 20), (0.3,), (0.2,)) and not fmt.missing()


def test_every_error_of_the_experiments_derives_from_fusion_error() -> None:
    import inspect

    from alignment.errors import FusionWarning
    from fusion import io
    from fusion.experiments import evaluate, train, zoo

    for module in (fdata, evaluate, train, zoo, io):
        assert all(hasattr(module, name) for name in module.__all__)
        for name, obj in inspect.getmembers(module, inspect.isclass):
            if obj.__module__ != module.__name__:
                continue
            if issubclass(obj, Warning):
                assert issubclass(obj, FusionWarning), (module.__name__, name)
            elif issubclass(obj, BaseException):
                assert issubclass(obj, FusionError), (module.__name__, name)


def test_torchvision_spec_reads_a_torchvision_dataset(tmp_path: Path, no_default_data: Path) -> None:
    """torchvision:FashionMNIST over IDX files in torchvision's layout equals the IDX reader's images."""
    for split in ("train", "test"):
        _fake_fashion(tmp_path / "tv" / "FashionMNIST" / "raw", split=split, n=12, compress=False)
    data = load_dataset_spec("torchvision:FashionMNIST", "test", root=tmp_path / "tv", classes=[3, 4])
    reference = load_fashion_mnist("test", root=tmp_path / "tv", classes=[3, 4], normalize=False)
    assert len(data) == len(reference) == 2
    for (x, y), x_ref, y_ref in zip(data, *reference.tensors):
        assert torch.equal(x, x_ref) and y == int(y_ref)
    with pytest.raises(DatasetNotFoundError, match="--data-root"):
        load_dataset_spec("torchvision:FashionMNIST", "train", root=tmp_path / "empty")
    # a dataset that takes no folder (FakeData: its first argument is a size): built without one
    fake = load_dataset_spec("torchvision:FakeData", "test", image_size=(8, 8), mean=(0.5,), std=(0.5,), channels=1)
    assert fake[0][0].shape == (1, 8, 8)


def raising(split: str = "train"):
    """A data function with a bug."""
    raise RuntimeError("user function failed")


def test_a_data_function_that_raises_is_a_data_error_naming_it() -> None:
    """Guards: a module:function data spec whose function raises is a DataFormatError naming the spec
    and the error (before: the function's traceback)."""
    with pytest.raises(DataFormatError, match=r"tests.test_data:raising\(split=...\) raised RuntimeError: user function"):
        load_dataset_spec("tests.test_data:raising", "train")


# ---------------------------------------------------------------------------
# module:function data of dict items and uint8 images (functions named in specs below)
# ---------------------------------------------------------------------------


class _DictItems(torch.utils.data.Dataset):
    """Items as transformers pipelines give them: ``{"pixel_values": x, "labels": y}``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.images[i], "labels": int(self.labels[i])}


def dict_noise28(split: str = "train") -> torch.utils.data.Dataset:
    """Forty random 1x28x28 float images (a draw per split), labels 0..9, as dict items."""
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    return _DictItems(torch.randn(40, 1, 28, 28, generator=g), torch.arange(40) % 10)


def uint8_noise28(split: str = "train") -> TensorDataset:
    """Forty random 1x28x28 uint8 images (pixels 0-255; a draw per split), labels 0..9."""
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    return TensorDataset(torch.randint(0, 256, (40, 1, 28, 28), generator=g, dtype=torch.uint8), torch.arange(40) % 10)


def uint8_dict_noise28(split: str = "train") -> torch.utils.data.Dataset:
    """:func:`uint8_noise28`'s images as dict items."""
    return _DictItems(*uint8_noise28(split).tensors)


def uint8_loader(split: str = "train") -> torch.utils.data.DataLoader:
    """:func:`uint8_noise28` in a DataLoader (batches of 8), which the loaders use as it is."""
    return torch.utils.data.DataLoader(uint8_noise28(split), batch_size=8)


def test_classes_of_module_function_data_with_dict_items() -> None:
    """Guards: a module:function dataset of dict items (pixel_values/labels) restricted to classes keeps
    the items of those classes, as dicts with remapped labels, and calibration draws from it (before:
    KeyError 1 in dataset_labels, DataFormatError in dataset_tensors)."""
    data = load_dataset_spec("tests.test_data:dict_noise28", "test", classes=[7, 3])
    assert len(data) == 8
    item = data[0]
    assert isinstance(item, dict) and set(item) == {"pixel_values", "labels"}
    raw = dict_noise28("test")
    assert [data[i]["labels"] for i in range(8)] == [1, 0] * 4  # labels 3, 7, 3, 7... remapped to head order
    torch.testing.assert_close(item["pixel_values"], raw[3]["pixel_values"])
    kept = fdata.restrict_classes(raw, [3, 7], remap=False)
    assert fdata.dataset_labels(kept).tolist() == [3, 7] * 4
    cal = calibration_subset(data, 5, seed=0)
    assert cal.tensors[0].shape == (5, 1, 28, 28) and set(cal.tensors[1].tolist()) <= {0, 1}
    with pytest.raises(DataFormatError, match="pixel_values"):
        fdata.dataset_labels(_BadDict())


class _BadDict(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.zeros(1, 2, 2), "target": 0}


def test_uint8_images_of_module_function_data_are_converted() -> None:
    """Guards: uint8 images from a module:function Dataset are scaled to [0, 1] and normalised with
    mean/std like every other spec's images (before: returned as uint8, which no float model takes),
    class restriction included; dict items too; integer_images tells them apart."""
    raw = uint8_noise28("train")
    assert fdata.integer_images(raw) and not fdata.integer_images(dict_noise28())
    data = load_dataset_spec("tests.test_data:uint8_noise28", "train", mean=0.5, std=0.25, classes=[2, 5])
    x, y = data[0]
    assert x.dtype == torch.float32 and y == 0
    torch.testing.assert_close(x, (raw.tensors[0][2].float() / 255 - 0.5) / 0.25)
    assert fdata.integer_images(data)  # (what the data gave, under the conversion)
    plain = load_dataset_spec("tests.test_data:uint8_dict_noise28", "test")
    item = plain[0]
    assert item["pixel_values"].dtype == torch.float32 and float(item["pixel_values"].max()) <= 1.0
    with pytest.raises(DataOptionError, match="finite"):
        load_dataset_spec("tests.test_data:uint8_noise28", "train", mean=float("nan"), std=0.25)
