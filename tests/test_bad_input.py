"""Bad input never yields a broken model or a lost file: every mistake below raises a specific
:class:`~alignment.errors.FusionError` naming the culprit, before any pass over the calibration data,
with the inputs unmodified and no file written."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import fusion
from alignment.errors import CalibrationError, FusionError, InvalidOptionError, SpaceMismatchError, UnfollowableOpError
from alignment.methods import UnknownMethodError
from fusion.api import ModelError
from fusion.engine import HeadsError
from fusion.refine import UnknownRefinementError
from fusion.repair import UnknownRepairError
from fusion.resize import WidthError, resize
from fusion.interpolate import interpolation_curve as _curve
from fusion.zipped import CutError
from tests.tiny_models import build


class PassRan(AssertionError):
    """A pass over the calibration data started."""


@pytest.fixture
def no_pass(monkeypatch):
    """Fail the test if any pass over calibration data starts (statistics, repair, refinement)."""
    import alignment.runner
    import alignment.statistics
    import fusion.refine
    import fusion.repair

    def ran(*a, **k):
        raise PassRan("a pass over the calibration data ran before the error")
    for mod in (alignment.runner, alignment.statistics, fusion.repair):
        monkeypatch.setattr(mod, "stream", ran)
    monkeypatch.setattr(fusion.refine, "batches", ran)


def _models(name="cnn"):
    a, x = build(name, seed=0)
    b, _ = build(name, seed=1)
    return a, b, x


def _cal(x, n=16):
    return torch.randn(n, *x.shape[1:], generator=torch.Generator().manual_seed(3))


def _gen(x):
    return (x for x in [_cal(x)])


class Maxout(nn.Module):
    """Max over channel pairs: the pair size is a literal of the forward, the pair count follows C."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Linear(8, 5)

    def forward(self, x):
        h = self.a(x)
        h = h.view(h.shape[0], h.shape[1] // 2, 2, *h.shape[2:]).amax(2)
        return self.head(torch.relu(self.b(h)).mean((2, 3)))


class LiteralSplit(nn.Module):
    """A forward that splits channels at literal sizes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Conv2d(1, 12, 3, padding=1), nn.Conv2d(6, 6, 1), nn.Linear(6, 5)

    def forward(self, x):
        u, v = self.a(x).split([6, 6], 1)
        return self.head(torch.relu(self.b(u * v)).mean((2, 3)))


class WithLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 16, batch_first=True, proj_size=4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.fc(y[:, -1])


class KwOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, *, pixel_values):
        return self.fc(pixel_values)


def _half(model):
    return copy.deepcopy(model).half()


def _nan_weight(model):
    m = copy.deepcopy(model)
    with torch.no_grad():
        next(m.parameters())[0].fill_(float("nan"))
    return m


def _meta(model):
    return copy.deepcopy(model).to("meta")


def _five_classes():
    m, x = build("timm_resnet18", seed=2)
    m.reset_classifier(5)
    return m


def _mlp(depth: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(8 if i == 0 else 16, 16), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(16, 4)).eval()


def _vit(heads: int = 4, patch_size: int = 7) -> nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=28, in_chans=1,
                             patch_size=patch_size, embed_dim=32, depth=1, num_heads=heads).eval()


class _PILImages(torch.utils.data.Dataset):
    """Images never turned into tensors (a torchvision dataset without a transform)."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        from PIL import Image

        return Image.new("L", (12, 12)), 0


class _Samples(torch.utils.data.IterableDataset):
    """Single (C, H, W) samples, as an IterableDataset yields them."""

    def __iter__(self):
        for i in range(8):
            yield torch.randn(1, 12, 12), i


def _old_weight_norm() -> nn.Module:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return nn.Sequential(nn.utils.weight_norm(nn.Linear(8, 16)), nn.ReLU(), nn.Linear(16, 4)).eval()


def _loader(x, **kw):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), **kw)


def _with_nan(t):
    t = t.clone()
    t[3, 0, 1, 1] = float("nan")
    return t


# (id, call(a, b, x) -> None, exception type, regex the message must match)
CASES = [
    ("a width beyond the machine's memory", lambda a, b, x: fusion.fuse([a, b], _cal(x), width=1e6), WidthError,
     r"tensors alone would take .* GiB, more than this machine's"),
    ("a width the forward cannot run at (maxout)", lambda a, b, x: fusion.fuse([Maxout()], torch.randn(8, 1, 8, 8),
                                                                               method="magnitude", width=0.5),
     ModelError, r"does not run on the example input after resizing.*expected input\[2, 4, 8, 8\] to have 8"),
    ("a forward splitting at literal sizes", lambda a, b, x: fusion.fuse([LiteralSplit()], torch.randn(8, 1, 8, 8),
                                                                         method="magnitude", width=0.5),
     ModelError, r"does not run on the example input after resizing.*split_sizes=\[6, 6\]"),
    ("resize to a width the forward cannot run at", lambda a, b, x: resize(LiteralSplit(), 0.5, torch.randn(8, 1, 8, 8)),
     ModelError, r"does not run on the example input after resizing.*split_sizes=\[6, 6\]"),
    ("no models", lambda a, b, x: fusion.fuse([], _cal(x)), ModelError, "at least one model"),
    ("a model, not a list", lambda a, b, x: fusion.fuse(a, _cal(x)), ModelError, "list of models"),
    ("a state dict", lambda a, b, x: fusion.fuse([a.state_dict(), b], _cal(x)), ModelError, "model 0 is a"),
    ("unknown method", lambda a, b, x: fusion.fuse([a, b], _cal(x), method="nope"), UnknownMethodError, "'nope'"),
    ("misspelt option", lambda a, b, x: fusion.fuse([a, b], _cal(x), iteratoins=7), InvalidOptionError, "iteratoins"),
    ("option of the wrong type", lambda a, b, x: fusion.fuse([a, b], _cal(x), iterations="3"), InvalidOptionError,
     "iterations"),
    ("option out of range", lambda a, b, x: fusion.fuse([a, b], _cal(x), method="zip", within=2.0),
     InvalidOptionError, "within"),
    ("alpha as a string", lambda a, b, x: fusion.fuse([a, b], _cal(x), alpha="0.5"), InvalidOptionError, "alpha"),
    ("alpha nan", lambda a, b, x: fusion.fuse([a, b], _cal(x), alpha=float("nan")), InvalidOptionError, "alpha"),
    ("alpha count", lambda a, b, x: fusion.fuse([a, b], _cal(x), alpha=[1.0]), InvalidOptionError, "1 weights for 2"),
    ("alpha negative", lambda a, b, x: fusion.fuse([a, b], _cal(x), alpha=[-0.5, 1.5]), InvalidOptionError,
     "negative"),
    ("alpha not summing to 1", lambda a, b, x: fusion.fuse([a, b], _cal(x), alpha=[0.7, 0.7]), InvalidOptionError,
     "sum to 1.*normalize=False"),
    ("alpha above 1", lambda a, b, x: fusion.fuse([a, b], _cal(x), alpha=1.5), InvalidOptionError, "negative"),
    ("unknown repair", lambda a, b, x: fusion.fuse([a, b], _cal(x), repair="nope"), UnknownRepairError, "'nope'"),
    ("unknown refinement", lambda a, b, x: fusion.fuse([a, b], _cal(x), refine="nope"), UnknownRefinementError,
     "'nope'"),
    ("bad refinement option", lambda a, b, x: fusion.fuse([a, b], _cal(x), refine="lstsq",
                                                          refine_options={"ridge": -1.0}), InvalidOptionError, "ridge"),
    ("unknown heads", lambda a, b, x: fusion.fuse([a, b], _cal(x), heads="both"), HeadsError, "'both'"),
    ("budget below 1", lambda a, b, x: fusion.fuse([a, b], _cal(x), budget=0.5), InvalidOptionError, "budget"),
    ("budget measure", lambda a, b, x: fusion.fuse([a, b], _cal(x), budget={"memory": 2}), InvalidOptionError,
     "budget"),
    ("budget with width", lambda a, b, x: fusion.fuse([a, b], _cal(x), budget=1.2, width=0.5), InvalidOptionError,
     "budget"),
    ("width nan", lambda a, b, x: fusion.fuse([a, b], _cal(x), width=float("nan")), WidthError, "nan"),
    ("width 0", lambda a, b, x: fusion.fuse([a, b], _cal(x), width=0), WidthError, "0"),
    ("width 1 (one unit or the same width?)", lambda a, b, x: fusion.fuse([a, b], _cal(x), width=1), WidthError,
     "ambiguous"),
    ("width of an unknown space", lambda a, b, x: fusion.fuse([a, b], _cal(x), width={"nospace": 0.5}), WidthError,
     "nospace"),
    ("width and target", lambda a, b, x: fusion.fuse([a, b], _cal(x), width=0.5, target=a), InvalidOptionError,
     "target"),
    ("no calibration", lambda a, b, x: fusion.fuse([a, b], None), CalibrationError, "calibration"),
    ("one-shot generator", lambda a, b, x: fusion.fuse([a, b], _gen(x)), CalibrationError, "one-shot"),
    ("empty calibration", lambda a, b, x: fusion.fuse([a, b], _cal(x)[:0]), CalibrationError, "no samples"),
    ("a single calibration sample", lambda a, b, x: fusion.fuse([a, b], _cal(x)[:1]), CalibrationError,
     "at least 2"),
    ("NaN in the calibration data", lambda a, b, x: fusion.fuse([a, b], _with_nan(_cal(x))), CalibrationError,
     "non-finite"),
    ("float64 calibration for float32 models", lambda a, b, x: fusion.fuse([a, b], _cal(x).double()),
     CalibrationError, "float64.*float32"),
    ("integer calibration", lambda a, b, x: fusion.fuse([a, b], (_cal(x) * 10).long()), CalibrationError, "int64"),
    ("calibration of the wrong shape", lambda a, b, x: fusion.fuse([a, b], torch.randn(8, 3, 12, 12)),
     CalibrationError, r"\(2, 3, 12, 12\)"),
    ("a dataset of PIL images", lambda a, b, x: fusion.fuse([a, b], _PILImages()), CalibrationError,
     r"items hold PIL\.Image\.Image inputs, not tensors.*ToTensor"),
    ("an IterableDataset of single samples", lambda a, b, x: fusion.fuse([a, b], _Samples()), CalibrationError,
     r"1 sample \(shape \(1, 12, 12\)\).*DataLoader\(data, batch_size=64\)"),
    ("dict batches without a known input key", lambda a, b, x: fusion.fuse([a, b], [{"u": _cal(x), "v": _cal(x)}]),
     CalibrationError, "'u', 'v'"),
    ("fp16 + fp32 models", lambda a, b, x: fusion.fuse([a, _half(b)], _cal(x)), ModelError, "float16"),
    ("a NaN weight", lambda a, b, x: fusion.fuse([a, _nan_weight(b)], _cal(x)), ModelError, "model 1.*non-finite"),
    # dynamo failed inside the statistics hooks with an internal AssertionError after a minute of compiling
    ("a compiled model", lambda a, b, x: fusion.fuse([a, torch.compile(b)], _cal(x)), ModelError,
     r"model 1 is compiled.*_orig_mod"),
    ("the deprecated weight_norm", lambda a, b, x: fusion.fuse([_old_weight_norm(), _old_weight_norm()],
                                                               torch.randn(8, 8)), ModelError,
     r"module '0' uses the deprecated torch\.nn\.utils\.weight_norm.*parametrizations\.weight_norm"),
    ("a model on the meta device", lambda a, b, x: fusion.fuse([a, _meta(b)], _cal(x)), ModelError, "meta"),
    ("keyword-only forward", lambda a, b, x: fusion.fuse([KwOnly(), KwOnly()], torch.randn(8, 4)), ModelError,
     "keyword-only.*pixel_values"),
    ("a recurrent layer with projections", lambda a, b, x: fusion.fuse([WithLSTM().eval(), WithLSTM().eval()],
                                                                        torch.randn(8, 5, 8)),
     UnfollowableOpError, "lstm` \\(LSTM\\).*proj_size"),
    ("one model, no target", lambda a, b, x: fusion.fuse([a], _cal(x)), InvalidOptionError, "width"),
    ("different families", lambda a, b, x: fusion.fuse([build("timm_resnet18")[0], build("timm_vit")[0]],
                                                       torch.randn(8, 1, 28, 28)), SpaceMismatchError, "family"),
    # a deeper variant's extra layers would be dropped without a word (timm resnet18 + resnet34 fused "fine")
    ("a deeper second model", lambda a, b, x: fusion.fuse([_mlp(2), _mlp(3, seed=1)], torch.randn(8, 8)),
     SpaceMismatchError, r"model 1 has space\(s\) \['4'\], tensor\(s\) \['6.weight'.*first model lacks"),
    ("a deeper first model", lambda a, b, x: fusion.fuse([_mlp(3), _mlp(2, seed=1)], torch.randn(8, 8)),
     SpaceMismatchError, r"model 1 has no space\(s\) \['4'\]"),
    ("a deeper target", lambda a, b, x: fusion.fuse([_mlp(2), _mlp(2, seed=1)], torch.randn(8, 8), target=_mlp(3),
                                                    method="ot"), SpaceMismatchError, "of the target"),
    ("other head counts", lambda a, b, x: fusion.fuse([_vit(heads=4), _vit(heads=8)], torch.randn(8, 1, 28, 28)),
     SpaceMismatchError, "model 1 has 8 attention heads where the target has 4"),
    ("another patch size", lambda a, b, x: fusion.fuse([_vit(), _vit(patch_size=4)], torch.randn(8, 1, 28, 28)),
     SpaceMismatchError, "'pos_embed' has size 50 along axis 1 in model 1 but 17"),
    ("unknown observation policy", lambda a, b, x: fusion.fuse([a, b], _cal(x), points="all-of-them"),
     InvalidOptionError, "points"),
    ("positions_per_image 0", lambda a, b, x: fusion.fuse([a, b], _cal(x), positions_per_image=0), InvalidOptionError,
     "positions_per_image"),
    ("zip_until of an unknown module", lambda a, b, x: fusion.fuse([a, b], _cal(x), method="zip", zip_until="nope"),
     CutError, "'nope'"),
    ("zip_until with REPAIR", lambda a, b, x: fusion.fuse([a, b], _cal(x), zip_until="input", repair="repair"),
     InvalidOptionError, "zip_until"),
    ("a device that is not there", lambda a, b, x: fusion.fuse([a, b], _cal(x), device="cuda:7"), InvalidOptionError,
     "cuda:7"),
    ("seed as a string", lambda a, b, x: fusion.fuse([a, b], _cal(x), seed="1"), InvalidOptionError, "seed"),
    ("calibration that is no data", lambda a, b, x: fusion.fuse([a, b], 5), CalibrationError, "type int"),
    ("one dict batch as calibration", lambda a, b, x: fusion.fuse([a, b], {"pixel_values": _cal(x)}),
     CalibrationError, r"one dict batch.*\[batch\]"),
    ("a target that is a name", lambda a, b, x: fusion.fuse([a, b], _cal(x), target="resnet18"), ModelError,
     "target must be a model.*str"),
    ("the meta device", lambda a, b, x: fusion.fuse([a, b], _cal(x), device="meta"), InvalidOptionError, "meta"),
    ("a budget with Sinkhorn plans", lambda a, b, x: fusion.fuse([a, b], _cal(x), method="ot", solver="sinkhorn",
                                                               budget=1.2), InvalidOptionError, "Sinkhorn"),
    ("single-sample batches with a BatchNorm reset",
     lambda a, b, x: fusion.fuse([a, b], torch.utils.data.DataLoader(_cal(x), batch_size=1)), CalibrationError,
     "first batch holds one sample"),
    ("a target in another dtype", lambda a, b, x: fusion.fuse([a, b], _cal(x), target=copy.deepcopy(a).double()),
     ModelError, "target is torch.float64 but the models are torch.float32"),
    ("a target on the meta device", lambda a, b, x: fusion.fuse([a, b], _cal(x), target=copy.deepcopy(a).to("meta")),
     ModelError, "target has tensors on the meta device"),
    ("permute wider than every model", lambda a, b, x: fusion.fuse([a, b], _cal(x), method="permute", width=2.0),
     SpaceMismatchError, "permute matches units one-to-one"),
    ("a curve of one Sequential", lambda a, b, x: _curve(nn.Sequential(a, b), _cal(x), []), ModelError,
     r"interpolation_curve takes a list of models \(nn.Module\), got a Sequential \(a container module"),
    ("a curve of a generator", lambda a, b, x: _curve((m for m in (a, b)), _cal(x), []), ModelError,
     "interpolation_curve takes a list of models .*got a generator"),
    ("curve weights that are not numbers", lambda a, b, x: _curve([a, b], _cal(x), [], alphas=["a"]),
     InvalidOptionError, r"alphas must be numbers in \[0, 1\]"),
    # read as two batches: a dtype error naming "batch 1", or a raw conv error for float labels, mid-statistics
    ("one (x, y) pair as calibration", lambda a, b, x: fusion.fuse([a, b], (_cal(x), torch.arange(16) % 10)),
     CalibrationError, r"one \(inputs, labels\) pair .*int64 labels of shape \(16,\).*\[\(x, y\)\]"),
    ("one (x, soft labels) pair as calibration",
     lambda a, b, x: fusion.fuse([a, b], (_cal(x), torch.full((16, 10), 0.1))), CalibrationError,
     r"one \(inputs, labels\) pair .*float32 labels of shape \(16, 10\)"),
    # counted len(dataset): fused from one sample, reported as calibration_samples=1, no warning
    ("a DataLoader whose sampler draws one sample",
     lambda a, b, x: fusion.fuse([a, b], _loader(_cal(x), batch_size=4, sampler=[3])), CalibrationError,
     r"holds 1 sample\(s\) \(the DataLoader's sampler draws 1 of its dataset's 16\).*at least 2"),
    # a raw TypeError from torch's default_collate
    ("a DataLoader of PIL images", lambda a, b, x: fusion.fuse([a, b], torch.utils.data.DataLoader(_PILImages(), 4)),
     CalibrationError, r"items hold PIL\.Image\.Image inputs, not tensors.*ToTensor"),
    # said only "calibration data is empty"
    ("drop_last dropping every sample",
     lambda a, b, x: fusion.fuse([a, b], _loader(_cal(x, 3), batch_size=4, drop_last=True)), CalibrationError,
     r"drop_last=True drops 3 of its 3 samples.*batch_size of at most 3 or drop_last=False"),
]


@pytest.mark.parametrize("call, error, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_early_with_a_specific_error(call, error, match, no_pass, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b, x = _models()
    before = [copy.deepcopy(m.state_dict()) for m in (a, b)]
    with pytest.raises(error, match=match) as info:
        call(a, b, x)
    assert isinstance(info.value, FusionError)
    for m, sd in zip((a, b), before):
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k]) or (v.is_floating_point() and torch.isnan(v).any())
    assert list(tmp_path.iterdir()) == []


def test_transformers_models_with_other_label_names_need_separate_heads(no_pass):
    """Guards: HF models say what their outputs mean (id2label); models of equal class counts but
    other classes are not merged into one classifier. Default LABEL_k names say nothing and pass."""
    import transformers

    def hf(labels):
        cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     image_size=28, patch_size=7, num_channels=1, num_labels=len(labels),
                                     id2label=dict(enumerate(labels)))
        return transformers.ViTForImageClassification(cfg).eval()
    x = torch.randn(4, 1, 28, 28)
    with pytest.raises(HeadsError, match=r"model 1's classes \(dog, cat\.\.\.\) are not model 0's \(cat, dog"):
        fusion.fuse([hf(["cat", "dog"]), hf(["dog", "cat"])], x)
    default = [hf([f"LABEL_{k}" for k in range(2)]) for _ in range(2)]
    with pytest.raises(PassRan):  # (checks passed: the statistics pass started)
        fusion.fuse(default, x)


def test_different_class_counts_need_separate_heads(no_pass):
    a, x = build("timm_resnet18", seed=0)
    with pytest.raises(HeadsError, match=r"10.*5|5.*10") as info:
        fusion.fuse([a, _five_classes()], _cal(x))
    assert "separate" in str(info.value)


def test_resize_rejects_unknown_spaces_and_ambiguous_widths(tiny):
    model, x = tiny("cnn")
    with pytest.raises(WidthError, match="nospace"):
        resize(model, {"nospace": 0.5}, x)
    with pytest.raises(WidthError, match="ambiguous"):
        resize(model, 1, x)


def test_dict_batches_use_the_input_key_not_the_label():
    """{'label': y, 'image': x} batches feed the image (the key names say which is the input)."""
    a, b, x = _models()
    cal = _cal(x, 32)
    ref = fusion.fuse([a, b], cal, repair="none")
    labelled = [{"label": torch.zeros(16, dtype=torch.long), "image": cal[:16]},
                {"label": torch.zeros(16, dtype=torch.long), "image": cal[16:]}]
    got = fusion.fuse([a, b], labelled, repair="none")
    with torch.no_grad():
        torch.testing.assert_close(got(x), ref(x))


def test_alpha_that_extrapolates_needs_normalize_false():
    a, b, x = _models()
    m = fusion.fuse([a, b], _cal(x), alpha=[1.5, -0.5], normalize=False, repair="none")
    assert m.fusion_report.alpha == [1.5, -0.5]
    with torch.no_grad():
        assert math.isfinite(float(m(x).sum()))
    # weights that do not sum to 1 scale only the outputs: said, not silently done
    from alignment.errors import FusionWarning

    with pytest.warns(FusionWarning, match="sums to 2") as caught:
        fusion.fuse([a, b], _cal(x), alpha=[1.0, 1.0], normalize=False, repair="none")
    assert sum("sums to" in str(w.message) for w in caught) == 1  # once, before the work (was twice)
    # ... and so does Alignment.build (before: silently)
    al = fusion.align([a, b], _cal(x))
    with pytest.warns(FusionWarning, match="sums to 1.4"):
        al.build([0.7, 0.7])


def test_a_non_finite_result_is_an_error_naming_where(monkeypatch):
    """Should a stage still produce NaN (here: maps poisoned on purpose), the build stops and names the
    first fused tensor holding it instead of returning a broken model."""
    from fusion.checks import NonFiniteError

    a, b, x = _models()
    al = fusion.align([a, b], _cal(x))
    real = al.maps

    def poisoned(alpha=None):
        maps = real(alpha)
        name = next(iter(maps))
        maps[name].merge[0][0, 0] = float("nan")
        return maps
    monkeypatch.setattr(al, "maps", poisoned)
    with pytest.raises(NonFiniteError, match="after applying the maps, the fused tensor"):
        al.build()


# --------------------------------------------------------------------------- the command line

CLI_CASES = [
    ("width 0", ["fuse", "{a}", "{b}", "--width", "0"], "--width 0"),
    ("a device that is not there", ["fuse", "{a}", "{b}", "--device", "cuda:7"], "cuda:7"),
    ("alpha not summing to 1", ["fuse", "{a}", "{b}", "--alpha", "0.7", "--alpha", "0.7"], "sum to 1"),
    ("unknown method", ["fuse", "{a}", "{b}", "--method", "nope"], "'nope'"),
    ("misspelt method option", ["fuse", "{a}", "{b}", "--option", "iteratoins=3"], "iteratoins"),
    ("unknown cut", ["fuse", "{a}", "{b}", "--method", "zip", "--zip-until", "nope"], "'nope'"),
    ("one model to fuse", ["fuse", "{a}"], "at least two"),
    ("compress without a width", ["compress", "{a}"], "--width"),
    ("missing data folder", ["eval", "{a}", "--data", "/nonexistent"], "/nonexistent"),
    ("missing zoo", ["zoo", "--zoo", "/nonexistent"], "/nonexistent"),
]


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    for i, d in enumerate(("a", "b")):
        build("hf_vit", seed=i)[0].save_pretrained(str(root / d))
    return root


@pytest.mark.parametrize("args, match", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_error_line_before_work(args, match, hf_folders, tmp_path, no_pass):
    from click.testing import CliRunner

    from fusion.cli import main

    argv = [a.format(a=hf_folders / "a", b=hf_folders / "b") for a in args]
    if argv[0] in ("fuse", "compress"):
        argv += ["--out", str(tmp_path / "out"), "--calibration-size", "32"]
    res = CliRunner().invoke(main, argv)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    # a FusionError is one "error: ..." line; a usage mistake is click's usage message ending in "Error: ..."
    assert res.exit_code == 2 and lines and lines[-1].lower().startswith("error: "), res.output
    assert "Traceback" not in res.output and match in lines[-1]
    assert list(tmp_path.iterdir()) == []


def test_a_loader_of_single_samples_is_fine_but_one_sample_in_all_is_not(no_pass):
    """The two-sample rule counts the whole data set, not the first batch: a DataLoader with batch
    size 1 over many samples passes the checks; one over a single sample does not."""
    from torch.utils.data import DataLoader, TensorDataset

    from fusion.checks import check_calibration

    a, b, x = _models()
    many = DataLoader(TensorDataset(_cal(x, 8)), batch_size=1)
    assert check_calibration(many, [a, b]).shape[0] == 1
    with pytest.raises(CalibrationError, match="1 sample"):
        check_calibration(DataLoader(TensorDataset(_cal(x, 1)), batch_size=1), [a, b])


def test_finite_checks_see_every_bad_entry_and_no_overflowing_sum():
    """Property: the one-sum checks agree with entry-wise ones: a NaN or an infinity anywhere is
    found, finite entries whose sum overflows are still finite, opposite infinities are no NaN, and
    integer tensors are finite."""
    from alignment.runner import all_finite, has_nan

    big = torch.full((4,), 1e308, dtype=torch.float64)
    assert all_finite(big) and not bool(torch.isfinite(big.sum()))
    assert all_finite(torch.ones(3, dtype=torch.float16) * 60000)  # float16 sum overflows too
    for bad in (math.nan, math.inf, -math.inf):
        t = torch.zeros(5, 5)
        t[3, 1] = bad
        assert not all_finite(t)
        assert has_nan(t) == math.isnan(bad)
    assert not has_nan(torch.tensor([math.inf, -math.inf]))
    assert has_nan(torch.tensor([math.inf, math.nan]))
    assert all_finite(torch.arange(5)) and not has_nan(torch.arange(5))


def test_graphs_and_models_must_belong_together(tiny):
    """Guards: discovering something that is no model, and permuting or resizing a model with a graph
    discovered on another architecture (or no graph) are SpaceMismatchError/DiscoveryError naming the
    mix-up (before: an unchanged copy came back silently, or a KeyError)."""
    from alignment import discover, permute
    from alignment.errors import DiscoveryError

    cnn, x = tiny("timm_resnet18")
    vit, xv = tiny("timm_vit")
    with pytest.raises(DiscoveryError, match="torch.nn.Module, got str"):
        discover("resnet18", x)
    g = discover(vit, xv)
    with pytest.raises(SpaceMismatchError, match="discovered on another model"):
        permute(cnn, g, {})
    with pytest.raises(SpaceMismatchError, match="discovered on another model"):
        resize(cnn, 0.5, graph=g)
    with pytest.raises(SpaceMismatchError, match="alignment.Graph.*NoneType"):
        permute(cnn, None, {})


def test_refinement_needs_calibration_batches_of_one_input_shape():
    """Guards: least-squares refinement on batches of two image sizes is a CalibrationError naming
    the batch (before: a reshape error when a later batch was smaller, and silently dropped positions
    when it was larger); statistics and repair still take mixed sizes."""
    import timm

    torch.manual_seed(0)
    a = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1, channels=(8, 16, 32, 64)).eval()
    torch.manual_seed(1)
    b = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1, channels=(8, 16, 32, 64)).eval()
    cal = [torch.randn(16, 1, 32, 32), torch.randn(16, 1, 24, 24)]
    assert fusion.fuse([a, b], cal, repair="reset_bn")(cal[1]).shape == (16, 10)
    with pytest.raises(CalibrationError, match=r"batch 1 has \(1, 24, 24\), batch 0 \(1, 32, 32\)"):
        fusion.fuse([a, b], cal, refine="lstsq")


def test_a_later_calibration_batch_of_another_dtype_is_named():
    """Guards: only the first batch is checked before the passes; a later batch of another dtype
    is a CalibrationError naming it when the pass reaches it (before: a raw dtype RuntimeError from
    the first layer)."""
    a, b, x = _models()
    with pytest.raises(CalibrationError, match="batch 1 is torch.float64 but batch 0 is torch.float32"):
        fusion.fuse([a, b], [_cal(x), _cal(x).double()])


def test_a_later_calibration_batch_the_models_cannot_take_is_named():
    """Guards: a later batch the models fail on (3 channels for 1-channel models, after a first batch
    that ran) is a CalibrationError naming the model, the batch and both shapes, for the statistics
    pass and a BatchNorm reset alike (before: torch's raw RuntimeError from the first convolution)."""
    a, b, x = _models()
    bad = torch.cat([_cal(x)] * 3, 1)
    for method, repair in (("permute", "none"), ("weight_matching", "reset_bn")):  # (no statistics pass)
        with pytest.raises(CalibrationError, match=rf"model 0 failed on calibration batch 1 of shape \[{len(bad)}, 3, "
                                                   r".*RuntimeError: .*channels"):
            fusion.fuse([a, b], [_cal(x), bad], method=method, repair=repair)


def test_alpha_as_an_array_or_tensor_of_any_float_dtype():
    """Guards: alpha given as a numpy float32 array, a torch tensor or a numpy scalar is read as the
    numbers it holds (before: float32 arrays and tensors were refused as 'not finite numbers')."""
    import numpy as np

    from fusion.checks import check_alpha

    for alpha in (np.array([0.25, 0.75], dtype=np.float32), torch.tensor([0.25, 0.75]), [np.float32(0.25), 0.75]):
        assert check_alpha(alpha, 2) == [0.25, 0.75]
    assert check_alpha(np.float32(0.75), 2) == [0.25, 0.75]
    with pytest.raises(InvalidOptionError, match="finite"):
        check_alpha(torch.tensor([float("nan"), 1.0]), 2)


def test_one_pair_of_flat_inputs_and_soft_labels_is_refused_before_work(no_pass):
    """Guards: ``(x, soft_labels)`` for a model of flat inputs (both rank 2) was read as two batches
    and failed with a raw error in the statistics pass; the second tensor is tried on model 0 first
    and the pair refused. Two batches of inputs in a tuple are still two batches."""
    from fusion.checks import check_calibration

    a, b, x = _models("mlp")
    flat = torch.randn(16, 64)
    with pytest.raises(CalibrationError, match=r"shapes \(16, 64\) and \(16, 10\).*model 0 cannot take the second.*"
                                               r"\[\(x, y\)\]"):
        fusion.fuse([a, b], (flat, torch.full((16, 10), 0.1)))
    assert check_calibration((flat, torch.randn(16, 1, 8, 8)), [a, b]).shape == (16, 64)


def test_the_memory_of_a_resized_model_is_its_tensors_bytes(tiny):
    """Guards: check_memory counts the bytes of every tensor at the new widths (at the same widths:
    the model's own; halving every space of a CNN: between a quarter and a half of them)."""
    from fusion.resize import check_memory, resized_graph

    model, x = tiny("timm_resnet18")
    graph = fusion.api.discover(model, x)
    own = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert check_memory(model, graph, resized_graph(graph, 1.0)) == own
    assert own / 4 < check_memory(model, graph, resized_graph(graph, 0.5)) < own / 2


def _small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)).eval()


def test_pruned_compiled_and_lazy_models_are_refused_before_any_work():
    """Guards: a model pruned with torch.nn.utils.prune (before: weight_orig and weight_mask fused apart,
    the mask averaged into fractions, 9.7% off), one compiled in place with ``module.compile()`` (before:
    a misleading 'observation point did not fire' or a raw TypeError under refinement) and one with
    uninitialised lazy parameters (before: a raw ValueError) are each a ModelError naming the module
    and what to do."""
    x = torch.randn(16, 6)
    pruned = _small_net()
    torch.nn.utils.prune.l1_unstructured(pruned[2], "weight", amount=0.5)
    with pytest.raises(ModelError, match=r"module '2' is pruned .*prune.remove\(module, 'weight'\)"):
        fusion.fuse([pruned, _small_net()], x)
    compiled = _small_net()
    compiled[2].compile(backend="eager")
    with pytest.raises(ModelError, match=r"module '2' is compiled in place"):
        fusion.fuse([compiled, _small_net()], x, refine="lstsq")
    lazy = nn.Sequential(nn.LazyLinear(12), nn.ReLU(), nn.Linear(12, 3))
    with pytest.raises(ModelError, match=r"module '0' \(LazyLinear\) has uninitialized parameters"):
        fusion.fuse([lazy], x, width=0.5)


def test_a_state_dict_entry_that_is_no_tensor_is_refused_by_name_when_saving(tmp_path):
    """Guards: ``fusion.io.save_weights`` on a module whose ``get_extra_state`` returns a dict raises
    ``CheckpointError`` naming the entry (before: a raw AttributeError), and writes nothing."""
    from fusion.io import CheckpointError, save_weights

    class Extra(nn.Linear):
        def get_extra_state(self):
            return {"note": 1}

        def set_extra_state(self, state):
            pass

    with pytest.raises(CheckpointError, match=r"'0._extra_state' is a dict"):
        save_weights(nn.Sequential(Extra(2, 2)), tmp_path / "m.safetensors")
    assert not list(tmp_path.iterdir())


def test_refinement_reports_a_layer_whose_weight_a_parametrisation_computes():
    """Guards: a layer whose weight is computed by a parametrisation (not weight norm) keeps its mapped
    weights and is listed in ``report.refinement['skipped']`` (before: left out silently)."""
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    models = []
    for seed in (0, 1):
        m = _small_net()
        torch.manual_seed(seed)
        for p in m.parameters():
            p.data.normal_()
        parametrize.register_parametrization(m[2], "weight", Doubled())
        models.append(m)
    fused = fusion.fuse(models, torch.randn(32, 6), refine="lstsq")
    skipped = fused.fusion_report.refinement["skipped"]
    assert any(s.startswith("2 (") and "parametrisation" in s for s in skipped), skipped


def test_repair_and_refine_options_that_are_no_dict_are_an_invalid_option_error():
    """Guards: ``repair_options`` / ``refine_options`` that are not a dict (a number, a "key=value"
    string) raise ``InvalidOptionError`` naming the argument, in ``fuse``, ``Alignment.build`` and
    ``interpolation_curve`` (before: a plain TypeError or ValueError from ``dict()``)."""
    m, x = build("mlp", 0)
    for kwargs in ({"repair_options": 3}, {"repair_options": "eps=1"}, {"refine_options": 3}):
        name = next(iter(kwargs))
        with pytest.raises(InvalidOptionError, match=name):
            fusion.fuse([m, m], x, **kwargs)
        with pytest.raises(InvalidOptionError, match=name):
            fusion.align([m, m], x).build(**kwargs)
        with pytest.raises(InvalidOptionError, match=name):
            _curve([m, m], x, x, torch.zeros(len(x), dtype=torch.long), **kwargs)
