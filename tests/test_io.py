"""Tests of fusion.io: building models from constructor specs, saving and loading them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fusion import io as fio
from fusion.io import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    SidecarError,
    UnknownArchitectureError,
    build_model,
    load_model_file,
    save_model,
    save_weights,
)

TINY_RESNET = {
    "library": "timm",
    "name": "resnet18",
    "kwargs": {"channels": [4, 8, 8, 8], "in_chans": 1, "stem_width": 4},
}
TINY_VIT = {
    "library": "timm",
    "name": "vit_tiny_patch16_224",
    "kwargs": {"depth": 1, "embed_dim": 16, "img_size": 28, "in_chans": 1, "num_heads": 2, "patch_size": 7},
}
HF_VIT = {
    "library": "transformers",
    "name": "ViTForImageClassification",
    "kwargs": {
        "image_size": 28,
        "patch_size": 7,
        "num_channels": 1,
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
    },
}
HF_RESNET = {
    "library": "transformers",
    "name": "ResNetForImageClassification",
    "kwargs": {"num_channels": 1, "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]},
}


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _x(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- build_model


@pytest.mark.parametrize("arch", [TINY_RESNET, TINY_VIT, HF_VIT, HF_RESNET], ids=["timm-resnet", "timm-vit", "hf-vit", "hf-resnet"])
def test_build_model_shapes(arch: dict) -> None:
    model = build_model(arch, 7)
    assert not model.training
    assert _logits(model, _x()).shape == (3, 7)


def test_build_model_uses_matching_transformers_config() -> None:
    import transformers

    model = build_model(HF_RESNET, 4)
    assert isinstance(model.config, transformers.ResNetConfig)
    assert model.config.num_labels == 4 and model.config.hidden_sizes == [8, 16]


def test_build_model_errors() -> None:
    with pytest.raises(UnknownArchitectureError, match=r"'keras'.*timm, transformers"):
        build_model({"library": "keras", "name": "x"}, 10)
    with pytest.raises(UnknownArchitectureError, match="no_such_net"):
        build_model({"library": "timm", "name": "no_such_net"}, 10)
    with pytest.raises(UnknownArchitectureError, match="NoSuchModelForImageClassification"):
        build_model({"library": "transformers", "name": "NoSuchModelForImageClassification"}, 10)
    with pytest.raises(UnknownArchitectureError, match="pretrained"):
        build_model({**TINY_RESNET, "kwargs": {**TINY_RESNET["kwargs"], "pretrained": True}}, 10)
    with pytest.raises(UnknownArchitectureError, match="library"):
        build_model({"name": "resnet18"}, 10)


def test_a_class_count_in_the_kwargs_may_repeat_the_models_not_contradict_it() -> None:
    """Guards: kwargs naming the class count (``num_labels``, ``num_classes``) build when they agree
    with it or no count is given, and a contradiction is an UnknownArchitectureError naming it;
    example_input of such a spec works (before: a bare KeyError from the duplicated keyword)."""
    hf = {"library": "transformers", "name": "MobileNetV1ForImageClassification",
          "kwargs": {"num_labels": 5, "depth_multiplier": 0.25, "image_size": 32}}
    assert build_model(hf, 5).config.num_labels == 5 and build_model(hf, None).config.num_labels == 5
    with pytest.raises(UnknownArchitectureError, match=r"num_labels=5 but the model has 3 classes"):
        build_model(hf, 3)
    assert tuple(fio.example_input(hf).shape) == (2, 3, 32, 32)
    timm_spec = {**TINY_RESNET, "kwargs": {**TINY_RESNET["kwargs"], "num_classes": 7}}
    assert build_model(timm_spec, 7).num_classes == 7
    with pytest.raises(UnknownArchitectureError, match=r"num_classes=7 but the model has 10 classes"):
        build_model(timm_spec, 10)


# --------------------------------------------------------------------------- save_model / load_model_file


@pytest.mark.parametrize("arch", [TINY_VIT, HF_VIT], ids=["timm-vit", "hf-vit"])
def test_save_model_roundtrip(tmp_path: Path, arch: dict) -> None:
    torch.manual_seed(1)
    model = build_model(arch, 4).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = save_model(model, tmp_path / "out" / "fused", arch, 4, classes=[9, 8, 7, 6], extra={"method": "test"})
    assert path == tmp_path / "out" / "fused.safetensors"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fused.json", "fused.safetensors"]
    # The caller's model is untouched.
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    sidecar = json.loads((tmp_path / "out" / "fused.json").read_text())
    assert sidecar["arch"]["name"] == arch["name"] and sidecar["classes"] == [9, 8, 7, 6]
    assert sidecar["method"] == "test"

    loaded, entry = load_model_file(path)
    assert entry.classes == [9, 8, 7, 6] and entry.extra == {"method": "test"}
    x = _x()
    assert torch.equal(_logits(loaded, x), _logits(model.eval(), x))
    # The stem and the sidecar path work too.
    assert torch.equal(_logits(load_model_file(tmp_path / "out" / "fused")[0], x), _logits(loaded, x))
    assert torch.equal(_logits(load_model_file(tmp_path / "out" / "fused.json")[0], x), _logits(loaded, x))


def test_save_model_refuses_mismatch_and_writes_nothing(tmp_path: Path) -> None:
    model = build_model(TINY_RESNET, 3)
    with pytest.raises(CheckpointMismatchError, match="Refusing to save"):
        save_model(model, tmp_path / "m.safetensors", TINY_RESNET, 4)
    with pytest.raises(ValueError, match="classes has 2 labels"):
        save_model(model, tmp_path / "m.safetensors", TINY_RESNET, 3, classes=[0, 1])
    assert list(tmp_path.iterdir()) == []


def test_load_model_file_without_sidecar(tmp_path: Path) -> None:
    save_weights(build_model(TINY_RESNET, 3), tmp_path / "bare.safetensors")
    with pytest.raises(CheckpointNotFoundError, match="bare.json"):
        load_model_file(tmp_path / "bare.safetensors")


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight  # shared tensor
        self.register_buffer("view", self.a.weight.data[:2].t())  # non-contiguous view


def test_save_weights_handles_shared_and_noncontiguous(tmp_path: Path) -> None:
    model = _Tied()
    path = save_weights(model, tmp_path / "tied.safetensors")
    state = load_file(str(path))
    assert torch.equal(state["a.weight"], state["b.weight"])
    assert torch.equal(state["view"], model.a.weight.data[:2].t())
    assert model.b.weight is model.a.weight  # the model keeps its tying



def test_save_model_records_widths_of_a_resized_model(tmp_path: Path) -> None:
    """A model narrower than its constructor builds is saved with per-space widths and reloads."""
    from fusion.resize import resize

    arch = {"library": "timm", "name": "resnet18",
            "kwargs": {"channels": [8, 16, 32, 64], "in_chans": 1, "stem_width": 8}}
    model = fio.build_model(arch, 10).eval()
    ex = fio.example_input(arch)
    assert tuple(ex.shape) == (2, 1, 28, 28)
    half = resize(model, 0.5, ex)
    widths = fio.space_widths(half, ex)
    assert widths["layer4.0.conv1"] == 32
    with pytest.raises(fio.CheckpointMismatchError):
        fio.save_model(half, tmp_path / "bad", arch=arch, num_classes=10)
    path = fio.save_model(half, tmp_path / "half", arch=arch, num_classes=10, widths=widths)
    loaded, entry = fio.load_model_file(path)
    assert "widths" not in entry.extra
    for k, v in half.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    with torch.no_grad():
        assert torch.allclose(half(ex), loaded(ex))


# --------------------------------------------------------------------------- safe outputs


def _pair_state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("fail_at", ["fsync", "replace1", "replace2", "replace3", "replace4"])
@pytest.mark.parametrize("previous", [False, True])
def test_interrupted_save_leaves_the_old_pair_or_nothing(tmp_path: Path, monkeypatch, fail_at: str,
                                                         previous: bool) -> None:
    """An interruption (here a KeyboardInterrupt raised inside the writer) at any step leaves the
    previous weights and sidecar unchanged, or no file at all when there were none; no temporary
    file stays behind."""
    old, new = build_model(TINY_RESNET, 3), build_model(TINY_RESNET, 3)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(1.0)
    out = tmp_path / "m"
    if previous:
        save_model(old, out, TINY_RESNET, 3)
    before = _pair_state(tmp_path)
    import os

    calls = {"replace": 0}
    real_replace, real_fsync = os.replace, os.fsync

    def replace(a, b):
        calls["replace"] += 1
        if fail_at == f"replace{calls['replace']}":
            raise KeyboardInterrupt
        return real_replace(a, b)

    def fsync(fd):
        if fail_at == "fsync":
            raise KeyboardInterrupt
        return real_fsync(fd)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    try:
        save_model(new, out, TINY_RESNET, 3, overwrite=True)
    except KeyboardInterrupt:
        monkeypatch.undo()
        assert _pair_state(tmp_path) == before
    else:  # this step was never reached (no old files to move aside): the new pair is complete
        monkeypatch.undo()
        assert calls["replace"] < int(fail_at[-1])
        loaded, _ = load_model_file(out)
        assert torch.equal(loaded.fc.weight, new.fc.weight)


def test_existing_outputs_are_kept_unless_overwrite(tmp_path: Path) -> None:
    """No file of the user's is replaced without overwrite=True; an unwritable folder fails before work."""
    model = build_model(TINY_RESNET, 3)
    (tmp_path / "m.json").write_text("{\"mine\": 1}")
    with pytest.raises(fio.OutputExistsError, match="m.json exists"):
        save_model(model, tmp_path / "m", TINY_RESNET, 3)
    assert (tmp_path / "m.json").read_text() == "{\"mine\": 1}" and not (tmp_path / "m.safetensors").exists()
    save_model(model, tmp_path / "m", TINY_RESNET, 3, overwrite=True)
    assert json.loads((tmp_path / "m.json").read_text())["num_classes"] == 3
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(fio.OutputNotWritableError, match="not a writable folder"):
        fio.check_output(blocker / "sub" / "m")
    # a folder as the output (`--out runs/` or an existing directory): the model would land beside it
    (tmp_path / "runs").mkdir()
    for out in (tmp_path / "runs", f"{tmp_path / 'new'}/"):
        with pytest.raises(fio.OutputNotWritableError, match="names a folder.*fused.safetensors"):
            save_model(model, out, TINY_RESNET, 3)
    assert not list(tmp_path.glob("runs.*")) and not (tmp_path / "new").exists()
    # a transformers model folder (an input): the suggested path is beside it, not inside it
    (tmp_path / "hfmodel").mkdir()
    (tmp_path / "hfmodel" / "config.json").write_text("{}")
    with pytest.raises(fio.OutputNotWritableError, match=r"e\.g\. .*hfmodel-fused\.safetensors$"):
        save_model(model, tmp_path / "hfmodel", TINY_RESNET, 3)


def test_sidecar_of_other_weights_is_refused_and_modes_are_normal(tmp_path: Path) -> None:
    """The sidecar records the SHA-256 of its weights; weights replaced behind its back are refused.
    Saved files get the usual mode (0666 minus the umask), not a temporary file's 0600."""
    import os

    model = build_model(TINY_RESNET, 3)
    path = save_model(model, tmp_path / "m", TINY_RESNET, 3)
    mask = os.umask(0)
    os.umask(mask)
    for p in (path, path.with_suffix(".json")):
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask
    other = build_model(TINY_RESNET, 3)
    with torch.no_grad():
        other.fc.weight.add_(1.0)
    save_weights(other, path, overwrite=True)  # the weights change, the sidecar does not
    with pytest.raises(CheckpointMismatchError, match="SHA-256"):
        load_model_file(path)


def test_truncated_weights_name_the_file(tmp_path: Path) -> None:
    model = build_model(TINY_RESNET, 3)
    path = save_weights(model, tmp_path / "m.safetensors")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(fio.CheckpointCorruptError, match="m.safetensors.*truncated"):
        fio.load_weights(build_model(TINY_RESNET, 3), path)


# --------------------------------------------------------------------------- where library users load

_ALONE = """
import json, sys
import torch
{imports}
assert not any(m == "fusion" or m.startswith(("fusion.", "alignment")) for m in sys.modules), "toolkit imported"
x = torch.load(sys.argv[1])
{load}
with torch.no_grad():
    y = model.eval()(x)
torch.save(getattr(y, "logits", y), sys.argv[2])
"""


def _run_alone(tmp_path: Path, imports: str, load: str, x: torch.Tensor) -> torch.Tensor:
    import subprocess
    import sys

    torch.save(x, tmp_path / "x.pt")
    script = tmp_path / "alone.py"
    script.write_text(_ALONE.format(imports=imports, load=load))
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                         cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return torch.load(tmp_path / "y.pt")


def _hf_form_loads_alone(model: nn.Module, arch: dict, x: torch.Tensor, tmp_path: Path) -> list[Path]:
    """Writes the model's transformers form (<tmp>/m.hf) and checks that transformers alone, in a fresh
    process, loads it and gives the model's logits; returns the paths written."""
    written = fio.save_library_forms(model, tmp_path / "m", arch, 10)
    assert written == [tmp_path / "m.hf"]
    got = _run_alone(tmp_path, "import transformers",
                     f"model = transformers.AutoModelForImageClassification.from_pretrained({str(written[0])!r})", x)
    with torch.no_grad():
        torch.testing.assert_close(got, model(x).logits)
    return written


def test_fused_hf_vit_loads_with_transformers_alone(tmp_path: Path) -> None:
    """A fused (and narrowed) HF ViT is a save_pretrained folder whose config has the fused sizes:
    transformers alone loads it in a fresh process and gives the same logits; fusion eval reads it."""
    import fusion
    from tests.tiny_models import build

    a, x = build("hf_vit", 0)
    b, _ = build("hf_vit", 1)
    fused = fusion.fuse([a, b], torch.randn(32, 1, 28, 28), repair="none", width=0.5)
    written = _hf_form_loads_alone(fused, HF_VIT, x, tmp_path)
    from fusion.cli import resolve_model

    assert isinstance(resolve_model(str(written[0]))[0], type(fused))


def test_a_resized_hf_model_with_no_config_handler_loads_with_transformers_alone(tmp_path: Path) -> None:
    """Guards: a compressed HF ConvNeXt (no config handler of its own) gets a config whose size fields
    rebuild the fused shapes, found from the widths that changed; a field equal to a width by chance
    (``image_size`` 32, a stage width too) is left alone; transformers alone loads the folder in a
    fresh process and gives the same logits. A config that cannot rebuild the model gets no folder
    (before, one that transformers refuses to load was written)."""
    import transformers

    import fusion

    cfg = transformers.ConvNextConfig(num_channels=1, image_size=32, hidden_sizes=[16, 32], depths=[1, 1],
                                      num_stages=2, num_labels=10)
    torch.manual_seed(0)
    model = transformers.ConvNextForImageClassification(cfg).eval()
    x = torch.randn(4, 1, 32, 32)
    half = fusion.fuse([model], torch.randn(32, 1, 32, 32), width=0.5, repair="none")
    assert list(half.config.hidden_sizes) == [8, 16] and half.config.image_size == 32
    assert list(model.config.hidden_sizes) == [16, 32]  # the source's config is untouched
    arch = {"library": "transformers", "name": "ConvNextForImageClassification",
            "kwargs": {"num_channels": 1, "image_size": 32, "hidden_sizes": [16, 32], "depths": [1, 1],
                       "num_stages": 2}}
    _hf_form_loads_alone(half, arch, x, tmp_path)
    half.config.hidden_sizes = [8, 8]  # a config that describes other shapes: no folder
    assert fio.save_library_forms(half, tmp_path / "bad", arch, 10) == []
    assert not (tmp_path / "bad.hf").exists()


def test_fused_timm_resnet_loads_with_timm_alone(tmp_path: Path) -> None:
    """A fused timm ResNet: the safetensors weights plus the create_model arguments in <stem>.timm.json
    rebuild it with timm alone (the two lines of the docs), in a fresh process."""
    import fusion
    from tests.tiny_models import build

    a, x = build("timm_resnet18", 0)
    b, _ = build("timm_resnet18", 1)
    fused = fusion.fuse([a, b], torch.randn(32, 1, 28, 28), repair="reset_bn")
    arch = {"library": "timm", "name": "resnet18", "kwargs": {"in_chans": 1, "channels": [16, 32, 64, 128],
                                                                 "stem_width": 16}}
    save_model(fused, tmp_path / "m", arch, 10)
    written = fio.save_library_forms(fused, tmp_path / "m", arch, 10)
    assert written == [tmp_path / "m.timm.json"]
    got = _run_alone(tmp_path, "import timm, safetensors.torch",
                     "model = timm.create_model(**json.load(open('m.timm.json')))\n"
                     "model.load_state_dict(safetensors.torch.load_file('m.safetensors'))", x)
    with torch.no_grad():
        torch.testing.assert_close(got, fused(x))
    with torch.no_grad():
        torch.testing.assert_close(fio.load_timm_json(written[0])(x), fused(x))
    # a halved ResNet stem is not a timm constructor argument: no timm form, the sidecar remains
    half = fusion.fuse([a], torch.randn(32, 1, 28, 28), width=0.5, repair="none")
    assert fio.save_library_forms(half, tmp_path / "half", arch, 10) == []


def test_a_resized_timm_model_gets_create_model_arguments_that_rebuild_it(tmp_path: Path) -> None:
    """Guards: a compressed or widened timm model gets a ``.timm.json`` whose arguments carry the new
    widths (before: no timm form for any width change): a ViT halved by a factor gets ``embed_dim``
    (also where only the model name sets it, read from the constructor call), one whose MLPs alone
    narrow gets ``mlp_ratio``, a deep-stem ResNet gets ``stem_width`` and ``channels`` while
    ``base_width`` and ``output_stride`` (equal to widths by chance) are left alone; each loads with
    the model's logits. A plain ResNet stem (64 wide whatever the arguments) has no form."""
    import alignment
    from fusion.resize import resize

    x = torch.randn(2, 1, 28, 28)
    vit = {"library": "timm", "name": "vit_tiny_patch16_224",
           "kwargs": {"depth": 2, "img_size": 28, "in_chans": 1, "patch_size": 7}}  # embed_dim 192: the name's
    model = build_model(vit, 10)
    graph = alignment.discover(model, x)
    mlp = {s.name: 96 if s.width == 768 else s.width for s in graph.spaces}
    deep = {"library": "timm", "name": "resnet18",
            "kwargs": {"in_chans": 1, "stem_type": "deep", "stem_width": 16, "channels": [16, 32, 64, 128]}}
    cases = [(vit, model, 0.5, {"embed_dim": 96}), (vit, model, 2.0, {"embed_dim": 384}),
             (vit, model, mlp, {"mlp_ratio": 0.5}),
             (deep, build_model(deep, 10), 0.5, {"stem_width": 8, "channels": [8, 16, 32, 64]})]
    for k, (arch, source, width, want) in enumerate(cases):
        resized = resize(source, width, x)
        assert fio.timm_kwargs(resized, arch, 10) == want
        save_model(resized, tmp_path / f"m{k}", arch, 10, widths=fio.resized_widths(resized, arch, 10))
        written = fio.save_library_forms(resized, tmp_path / f"m{k}", arch, 10)
        assert written == [tmp_path / f"m{k}.timm.json"]
        spec = json.loads(written[0].read_text())
        assert spec == {"model_name": arch["name"], "pretrained": False, "num_classes": 10, **arch["kwargs"], **want}
        with torch.no_grad():
            torch.testing.assert_close(fio.load_timm_json(written[0])(x), resized(x))
    assert fio.timm_kwargs(model, vit, 10) == {}  # the source's own arguments build it
    plain = {"library": "timm", "name": "resnet18", "kwargs": {"in_chans": 1}}
    assert fio.timm_kwargs(resize(build_model(plain, 10), 0.5, x), plain, 10) is None


def test_torch_checkpoints_load_with_the_same_checks_as_safetensors(tmp_path: Path) -> None:
    """Guards: a .pt state dict (bare or under 'model' / 'state_dict') loads; a pickled whole model, a
    truncated file and a list are CheckpointCorruptError naming what to save instead; a mismatch
    is the same short summary as for safetensors (not torch's full message)."""
    from fusion.io import CheckpointCorruptError, load_weights, read_state

    model = build_model(TINY_RESNET, 10)
    sd = model.state_dict()
    for name, obj in (("bare.pt", sd), ("wrapped.pth", {"model": sd, "epoch": 3}), ("lightning.ckpt", {"state_dict": sd})):
        torch.save(obj, tmp_path / name)
        got = load_weights(build_model(TINY_RESNET, 10), tmp_path / name)
        assert all(torch.equal(got.state_dict()[k], v) for k, v in sd.items()), name
    torch.save(model, tmp_path / "whole.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "bare.pt").read_bytes()[:500])
    torch.save([1, 2], tmp_path / "list.pt")
    for name, words in (("whole.pt", "not the whole model"), ("cut.pt", "read safely"), ("list.pt", "holds a list")):
        with pytest.raises(CheckpointCorruptError, match=words):
            read_state(tmp_path / name)
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(\d+\)") as err:
        load_weights(build_model(TINY_VIT, 10), tmp_path / "bare.pt")
    assert len(str(err.value)) < 2000


def test_malformed_sidecars_are_sidecar_errors(tmp_path: Path) -> None:
    """Guards: a sidecar that is a JSON list, widths that are not a mapping to positive integers, or a
    zipped entry without branches raise SidecarError naming the file (not AttributeError,
    ValueError or ZeroDivisionError)."""
    model = build_model(TINY_RESNET, 10)
    path = save_model(model, tmp_path / "m", TINY_RESNET, 10)
    side = path.with_suffix(".json")
    good = json.loads(side.read_text())
    cases = [[], {**good, "widths": "abc"}, {**good, "widths": {"conv1": "x"}},
             {**good, "zipped": {"cut": {}, "branches": []}}]
    for bad in cases:
        side.write_text(json.dumps(bad))
        with pytest.raises(SidecarError, match="m.json"):
            load_model_file(path)


def test_a_zipped_model_declares_its_sources_input_format() -> None:
    """Guards: a zipped model (a trunk and branches, no format of its own) reads the input format its
    trunk declares (timm's pretrained_cfg), so evaluating it on a dataset other than Fashion-MNIST
    needs no --mean/--std."""
    import timm

    import fusion
    from fusion.experiments.data import input_format

    a = timm.create_model("resnet18", pretrained=False, num_classes=4, channels=(8, 16, 32, 64)).eval()
    b = timm.create_model("resnet18", pretrained=False, num_classes=4, channels=(8, 16, 32, 64)).eval()
    zipped = fusion.fuse([a, b], torch.randn(8, 3, 32, 32), method="zip", zip_until="layer3", repair="none")
    assert not hasattr(zipped, "pretrained_cfg")
    fmt, want = input_format(zipped), input_format(a)
    assert fmt.mean == want.mean and fmt.std == want.std and fmt.mean is not None and fmt.channels == 3


def test_a_spec_without_input_kwargs_takes_the_format_its_model_declares(tmp_path):
    """Guards: ``{"name": "resnet18", "kwargs": {}}`` (3 channels, timm's 224 px) and a transformers
    config's own ``num_channels`` / ``image_size`` give the example input their model takes, so a
    resized model of such a spec saves and reloads (before: 1 channel at 28 px for any spec without
    ``in_chans``, and saving failed in discovery)."""
    from fusion.resize import resize

    timm_spec = {"library": "timm", "name": "resnet18", "kwargs": {}}
    assert tuple(fio.example_input(timm_spec).shape) == (2, 3, 224, 224)
    hf_spec = {"library": "transformers", "name": "ViTForImageClassification",
               "kwargs": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                          "intermediate_size": 64, "image_size": 32, "patch_size": 8}}
    assert tuple(fio.example_input(hf_spec).shape) == (2, 3, 32, 32)
    one_channel = {"library": "timm", "name": "resnet18", "kwargs": {"in_chans": 1}}
    assert tuple(fio.example_input(one_channel).shape) == (2, 1, 28, 28)  # (timm's cfg describes 3 channels)
    model = fio.build_model(timm_spec, 10)
    small = resize(model, 0.25, torch.randn(2, 3, 64, 64))
    path = fio.save_model(small, tmp_path / "small", timm_spec, 10, widths=fio.resized_widths(small, timm_spec, 10))
    loaded, _ = fio.load_model_file(path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_model_saved_in_another_dtype_loads_in_it(tmp_path, dtype):
    """Guards: the loader gives back a bfloat16 (or float64) model as saved (before: float32, so its
    outputs differed from the saved model's)."""
    spec = {"library": "timm", "name": "resnet18", "kwargs": {"in_chans": 1, "channels": [8, 16, 32, 64],
                                                                "stem_width": 8}}
    model = fio.build_model(spec, 10).to(dtype)
    path = fio.save_model(model, tmp_path / "m", spec, 10)
    loaded, _ = fio.load_model_file(path)
    assert {t.dtype for t in loaded.state_dict().values() if t.is_floating_point()} == {dtype}
    x = torch.randn(2, 1, 28, 28, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "f64"])
@pytest.mark.parametrize("arch", [TINY_RESNET, TINY_VIT], ids=["timm-resnet", "timm-vit"])
def test_a_bf16_or_f64_model_gets_its_widths_and_round_trips(tmp_path, arch, dtype):
    """Guards: the widths of a bfloat16 / float64 timm model are computed on an example input of its
    dtype (before: resized_widths fed it float32 and raised ExportError, so the CLI lost a fused
    bfloat16 job at saving); a narrowed model saved with them reloads in its dtype with the same logits."""
    from fusion.resize import resize

    assert fio.resized_widths(build_model(arch, 10).to(dtype), arch, 10) is None
    half = resize(build_model(arch, 10), 0.5, fio.example_input(arch)).to(dtype)
    widths = fio.resized_widths(half, arch, 10)
    assert widths and widths == fio.space_widths(half, fio.example_input(arch))
    loaded, _ = load_model_file(save_model(half, tmp_path / "m", arch, 10, widths=widths))
    assert {t.dtype for t in loaded.state_dict().values() if t.is_floating_point()} == {dtype}
    x = _x().to(dtype)
    assert torch.equal(_logits(loaded, x), _logits(half, x))
    assert fio.example_input(arch, dtype=dtype).dtype == dtype


def test_timm_json_arguments_get_the_checks_of_build_model(tmp_path, monkeypatch):
    """Guards: a <stem>.timm.json naming an unknown model, a kwarg the constructor rejects, or
    pretrained=True raises UnknownArchitectureError naming the file and what to do, and nothing is
    downloaded (before: a raw RuntimeError, TypeError, or a hub download that fails offline)."""
    import timm.models._builder as builder

    def no_download(*args, **kwargs):
        raise AssertionError("a pretrained download was attempted")
    monkeypatch.setattr(builder, "load_pretrained", no_download)
    model = build_model(TINY_RESNET, 10)
    save_model(model, tmp_path / "m", TINY_RESNET, 10)
    assert fio.save_library_forms(model, tmp_path / "m", TINY_RESNET, 10) == [tmp_path / "m.timm.json"]
    spec = json.loads((tmp_path / "m.timm.json").read_text())
    cases = [("unknown", {"model_name": "resnet18x"}, "unknown.timm.json.*no model named 'resnet18x'"),
             ("badkw", {"bogus": 1}, "badkw.timm.json.*rejected kwargs.*bogus"),
             ("pre", {"pretrained": True}, "pre.timm.json.*pretrained=True.*\"pretrained\": false")]
    for stem, change, words in cases:
        (tmp_path / f"{stem}.timm.json").write_text(json.dumps({**spec, **change}))
        (tmp_path / f"{stem}.safetensors").write_bytes((tmp_path / "m.safetensors").read_bytes())
        with pytest.raises(UnknownArchitectureError, match=words):
            fio.load_timm_json(tmp_path / f"{stem}.timm.json")
    x = _x()
    assert torch.equal(_logits(fio.load_timm_json(tmp_path / "m.timm.json"), x), _logits(model, x))


def test_hf_form_over_a_symlink_or_file_with_overwrite_and_no_leftover(tmp_path, monkeypatch):
    """Guards: with overwrite, a <stem>.hf that is a symlink (its target kept) or a plain file is
    replaced by the folder, and a save that fails leaves the previous form and no hidden temporary
    copy (before: OSError / NotADirectoryError, and a .<stem>.hf.tmp copy of the weights stayed)."""
    import os

    model = build_model(HF_VIT, 10)
    (tmp_path / "earlier").mkdir()
    fio.save_library_forms(model, tmp_path / "earlier" / "m", HF_VIT, 10)
    target = _pair_state(tmp_path / "earlier" / "m.hf")
    os.symlink(tmp_path / "earlier" / "m.hf", tmp_path / "m.hf")
    (tmp_path / "g.hf").write_text("a file")
    for stem in ("m", "g"):
        with pytest.raises(fio.OutputExistsError):
            fio.save_library_forms(model, tmp_path / stem, HF_VIT, 10)
        assert fio.save_library_forms(model, tmp_path / stem, HF_VIT, 10, overwrite=True) == [tmp_path / f"{stem}.hf"]
        folder = tmp_path / f"{stem}.hf"
        assert folder.is_dir() and not folder.is_symlink() and (folder / "config.json").is_file()
    assert _pair_state(tmp_path / "earlier" / "m.hf") == target
    before = _pair_state(tmp_path / "g.hf")

    def broken(self, where, **kwargs):
        Path(where).mkdir()
        (Path(where) / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(type(model), "save_pretrained", broken)
    with pytest.raises(KeyboardInterrupt):
        fio.save_library_forms(model, tmp_path / "g", HF_VIT, 10, overwrite=True)
    assert _pair_state(tmp_path / "g.hf") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "g.hf", "m.hf"]


def test_a_folder_at_an_output_file_path_is_refused_even_with_overwrite(tmp_path):
    """Guards: a folder where the weights, the sidecar or a .timm.json form would go is refused before
    anything is written, with or without overwrite, and left as it was (before: the new pair was
    placed, then a raw IsADirectoryError, and the folder was left renamed to .d.safetensors.old)."""
    model = build_model(TINY_RESNET, 10)
    for name in ("d.safetensors", "e.json"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("mine")
    for stem, name in (("d", "d.safetensors"), ("e", "e.json")):
        for overwrite in (True, False):
            with pytest.raises(fio.OutputNotWritableError, match=f"{name} is a folder.*move or rename it"):
                save_model(model, tmp_path / stem, TINY_RESNET, 10, overwrite=overwrite)
    with pytest.raises(fio.OutputNotWritableError, match="d.safetensors is a folder"):
        save_weights(model, tmp_path / "d.safetensors", overwrite=True)
    (tmp_path / "f.timm.json").mkdir()
    with pytest.raises(fio.OutputNotWritableError, match="f.timm.json is a folder"):
        fio.check_output(tmp_path / "f", True, extra=fio.library_form_paths(tmp_path / "f"))
    with pytest.raises(fio.OutputNotWritableError, match="f.timm.json is a folder"):
        fio.save_library_forms(model, tmp_path / "f", TINY_RESNET, 10, overwrite=True)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "d.safetensors", "d.safetensors/notes.txt", "e.json", "e.json/notes.txt", "f.timm.json"]
    (tmp_path / "g.hf").mkdir()  # (a transformers form is a folder: replaced with overwrite)
    assert fio.check_output(tmp_path / "g", True, extra=fio.library_form_paths(tmp_path / "g"))


def test_save_weights_keeps_an_existing_file_unless_overwrite(tmp_path):
    """Guards: save_weights refuses to replace a user's file without overwrite=True, as save_model
    does (before: it had no overwrite option and replaced the file silently)."""
    path = tmp_path / "user.safetensors"
    path.write_bytes(b"precious user data")
    model = build_model(TINY_RESNET, 10)
    with pytest.raises(fio.OutputExistsError, match="user.safetensors exists.*overwrite=True"):
        save_weights(model, path)
    assert path.read_bytes() == b"precious user data"
    assert save_weights(model, path, overwrite=True) == path
    assert set(load_file(str(path))) == set(model.state_dict())


def test_a_dangling_symlink_at_an_output_path_counts_as_existing(tmp_path):
    """Guards: a symlink to a missing file at an output path is not replaced without overwrite
    (before: Path.exists() is false for it, so it was replaced silently); with overwrite it is."""
    import os

    model = build_model(TINY_RESNET, 10)
    for name in ("m.safetensors", "w.safetensors", "m.timm.json"):
        os.symlink(tmp_path / "gone" / name, tmp_path / name)
    with pytest.raises(fio.OutputExistsError, match="m.safetensors is a symlink to a missing file"):
        save_model(model, tmp_path / "m", TINY_RESNET, 10)
    with pytest.raises(fio.OutputExistsError, match="w.safetensors is a symlink"):
        save_weights(model, tmp_path / "w.safetensors")
    with pytest.raises(fio.OutputExistsError, match="m.timm.json is a symlink"):
        fio.save_library_forms(model, tmp_path / "m", TINY_RESNET, 10)
    assert all((tmp_path / n).is_symlink() for n in ("m.safetensors", "w.safetensors", "m.timm.json"))
    assert not (tmp_path / "m.json").exists()
    save_model(model, tmp_path / "m", TINY_RESNET, 10, overwrite=True)
    assert not (tmp_path / "m.safetensors").is_symlink() and load_model_file(tmp_path / "m")[0] is not None
