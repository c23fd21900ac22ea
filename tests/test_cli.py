"""The fusion command line: zoo, spaces, eval, fuse, interpolate, methods."""

from __future__ import annotations

import json

import torch
import re

import click
import pytest
from click.testing import CliRunner
from torch.utils.data import Subset

from fusion.cli import main


def test_help_has_examples():
    runner = CliRunner()
    for cmd in ("zoo", "spaces", "eval"):
        res = runner.invoke(main, [cmd, "--help"])
        assert res.exit_code == 0 and "Example:" in res.output


def test_zoo_lists_checkpoints(zoo_dir):
    res = CliRunner().invoke(main, ["zoo", "--zoo", str(zoo_dir)])
    assert res.exit_code == 0, res.output
    assert "r18w32-s0" in res.output and "90.75%" in res.output


def test_spaces_of_a_zoo_model(zoo_dir):
    res = CliRunner().invoke(main, ["spaces", "vit64-s2", "--zoo", str(zoo_dir)])
    assert res.exit_code == 0, res.output
    assert "blocks.0.attn.qkv#0" in res.output and "heads=4x16" in res.output


def test_eval_a_zoo_model(zoo_dir):
    res = CliRunner().invoke(main, ["eval", "vit64-s2", "--zoo", str(zoo_dir), "--limit", "500"])
    assert res.exit_code == 0, res.output
    acc = float(res.output.split("accuracy ")[1].split("%")[0])
    assert 80.0 < acc < 95.0


# ---------------------------------------------------------------------------
# issue: fuse, interpolate, methods
# ---------------------------------------------------------------------------


def _correct(output: str, prefix: str) -> tuple[int, int]:
    """(correct, n) from a line such as ``fused: accuracy 85.00% (425/500 correct) on 500 test images``."""
    m = re.search(re.escape(prefix) + r": accuracy [\d.]+% \((\d+)/(\d+) correct\)", output)
    assert m, output
    return int(m.group(1)), int(m.group(2))


def test_new_commands_have_examples():
    runner = CliRunner()
    for cmd in ("fuse", "interpolate", "methods", "compress"):
        res = runner.invoke(main, [cmd, "--help"])
        assert res.exit_code == 0, res.output
        assert "Example:" in res.output and f"fusion {cmd}" in res.output


def test_methods_lists_methods_with_their_options_and_defaults():
    """`fusion methods` names every method, repair and refinement, and each option with its default."""
    from fusion import list_methods

    res = CliRunner().invoke(main, ["methods"])
    assert res.exit_code == 0, res.output
    listed = [ln.split(":")[0].strip() for ln in res.output.splitlines() if ln.startswith("  ") and not ln.startswith("    ")]
    assert set(list_methods()) | {"none", "reset_bn", "repair"} <= set(listed)
    assert "solver = 'emd'  ('emd' or 'sinkhorn')" in res.output
    assert "max_iter = 100  (int)" in res.output


def test_parse_options_and_kwargs():
    import click

    from fusion.cli import parse_kwargs, parse_options

    assert parse_options(["iterations=5", "mode=fast", "flag=true", "x=1.5"]) == {
        "iterations": 5, "mode": "fast", "flag": True, "x": 1.5}
    assert parse_kwargs('{"in_chans": 1}') == {"in_chans": 1}
    with pytest.raises(click.BadParameter):
        parse_options(["novalue"])
    with pytest.raises(click.BadParameter):
        parse_kwargs("[1, 2]")


def test_fuse_round_trip_matches_api(zoo_dir, tmp_path):
    """`fusion fuse` writes a file that `fusion eval` reloads with exactly the API's accuracy."""
    from fusion import fuse
    from fusion.experiments.data import calibration_subset, load_fashion_mnist
    from fusion.experiments.evaluate import accuracy
    from fusion.experiments.zoo import load_model

    out = tmp_path / "fused.safetensors"
    n, cal = 200, 128
    res = CliRunner().invoke(main, [
        "fuse", "r18w32-s0", "r18w32-s1", "--zoo", str(zoo_dir), "--out", str(out),
        "--calibration-size", str(cal), "--calibration-seed", "3", "--method", "permute",
        "--repair", "reset_bn", "--eval", "--test-limit", str(n)])
    assert res.exit_code == 0, res.output
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert "permute + reset_bn" in res.output  # the report summary
    cli_fuse = _correct(res.output, "fused")

    side = json.loads(out.with_suffix(".json").read_text())
    assert side["method"] == "permute" and side["repair"] == "reset_bn"
    assert side["sources"] == ["r18w32-s0", "r18w32-s1"]
    assert side["arch"]["name"] == "resnet18" and side["classes"] == list(range(10))
    assert side["report"]["calibration_samples"] == cal and side["report"]["alpha"] == [0.5, 0.5]

    res = CliRunner().invoke(main, ["eval", str(out), "--limit", str(n)])
    assert res.exit_code == 0, res.output
    cli_eval = _correct(res.output, str(out))

    models = [load_model(name, zoo_dir)[0] for name in ("r18w32-s0", "r18w32-s1")]
    calibration = calibration_subset(load_fashion_mnist("train"), cal, seed=3)
    fused = fuse(models, calibration, method="permute", repair="reset_bn", seed=0)
    api_acc = accuracy(fused, Subset(load_fashion_mnist("test"), range(n)))
    assert cli_eval[1] == cli_fuse[1] == n
    assert abs(cli_eval[0] / n - api_acc) < 1e-9
    assert abs(cli_fuse[0] / n - api_acc) < 1e-9
    assert api_acc > 0.5


def test_eval_of_a_split_task_model_uses_its_classes(zoo_dir, tmp_path):
    """A model of split task A (classes 0-4), compressed, keeps A's classes in its sidecar: eval
    scores it on those five classes. (Fusing A and B with one merged head is refused: see
    test_merging_heads_of_models_trained_on_other_classes_is_refused.)"""
    from fusion.experiments.data import load_fashion_mnist
    from fusion.experiments.evaluate import accuracy
    from fusion.io import load_model_file

    out = tmp_path / "ab"
    res = CliRunner().invoke(main, [
        "compress", "r18w32-A-s4", "--width", "0.5", "--zoo", str(zoo_dir), "--out", str(out),
        "--calibration-size", "64", "--repair", "none"])
    assert res.exit_code == 0, res.output
    side = json.loads((tmp_path / "ab.json").read_text())
    assert side["classes"] == [0, 1, 2, 3, 4] and side["num_classes"] == 5
    res = CliRunner().invoke(main, ["eval", str(tmp_path / "ab.safetensors"), "--limit", "300"])
    assert res.exit_code == 0, res.output
    model, entry = load_model_file(tmp_path / "ab.safetensors")
    data = Subset(load_fashion_mnist("test", classes=[0, 1, 2, 3, 4]), range(300))
    correct, n = _correct(res.output, str(tmp_path / "ab.safetensors"))
    assert n == 300 and abs(correct / n - accuracy(model, data)) < 1e-9


def test_timm_spec_matches_zoo_name(zoo_dir):
    """`timm:NAME --checkpoint FILE --kwargs JSON` loads the same model as its zoo name."""
    entry = json.loads((zoo_dir / "manifest.json").read_text())["r18w16-s2"]
    base = ["--limit", "200"]
    by_name = CliRunner().invoke(main, ["eval", "r18w16-s2", "--zoo", str(zoo_dir)] + base)
    by_timm = CliRunner().invoke(main, [
        "eval", "timm:resnet18", "--checkpoint", str(zoo_dir / "r18w16-s2.safetensors"),
        "--kwargs", json.dumps(entry["arch"]["kwargs"]), "--num-classes", "10"] + base)
    assert by_name.exit_code == 0 and by_timm.exit_code == 0, by_name.output + by_timm.output
    assert _correct(by_name.output, "r18w16-s2") == _correct(by_timm.output, "timm:resnet18")


def test_timm_spec_needs_a_checkpoint():
    res = CliRunner().invoke(main, ["fuse", "timm:resnet18", "timm:resnet18", "--out", "x.safetensors"])
    assert res.exit_code != 0 and "--checkpoint" in res.output


def _one_error_line(res, alone: bool = True) -> str:
    """The single ``error: ...`` line of a FusionError that ended a command (exit code 2).

    ``alone=False`` allows progress bars of libraries (transformers' weight loading) before it.
    """
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.exit_code == 2 and lines and lines[-1].startswith("error: "), (res.exit_code, res.output)
    assert len(lines) == 1 or not alone, res.stderr
    assert sum(line.startswith("error") for line in lines) == 1 and "Traceback" not in res.output
    assert res.stdout == ""
    return lines[-1]


def test_fuse_unknown_model_is_a_clean_error(zoo_dir, tmp_path):
    """A FusionError from deep inside (the zoo's ModelNotInZooError) ends as one line, exit code 2."""
    res = CliRunner().invoke(main, ["fuse", "r18w32-s0", "nope", "--zoo", str(zoo_dir),
                                    "--out", str(tmp_path / "x")])
    assert "'nope' is not in the zoo" in _one_error_line(res)
    assert not list(tmp_path.iterdir())


def test_multiline_fusion_error_is_joined_on_one_line(monkeypatch):
    from alignment.errors import FusionError
    from fusion import cli

    def fail(*args, **kwargs):
        raise FusionError("first line\n  second line\n")

    monkeypatch.setattr(cli, "resolve_model", fail)
    res = CliRunner().invoke(main, ["spaces", "anything"])
    assert _one_error_line(res) == "error: first line second line"


@pytest.mark.parametrize("width", ["-0.5", "0", "0.0", "half", "true", '{"layer1": -2}', "{}"])
def test_bad_width_is_one_line_before_loading_anything(tmp_path, width):
    """--width is checked before any model or zoo is read (the zoo given here does not exist)."""
    res = CliRunner().invoke(main, ["compress", "r18w32-s0", "--zoo", str(tmp_path / "no-zoo"),
                                    "--width", width, "--out", str(tmp_path / "x")])
    line = _one_error_line(res)
    assert f"--width {width}" in line
    assert "zoo" not in line.replace("--width", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_unknown_data_spec_is_one_line_listing_the_forms(zoo_dir):
    line = _one_error_line(CliRunner().invoke(main, ["eval", "r18w16-s2", "--zoo", str(zoo_dir),
                                                     "--data", "no-such-data"]))
    assert "'no-such-data'" in line and "torchvision:NAME" in line and "module:function" in line


def test_data_without_a_declared_format_asks_for_options(zoo_dir):
    """The zoo's 1-channel ResNet declares no input format: digits need --image-size/--mean/--std."""
    line = _one_error_line(CliRunner().invoke(main, ["eval", "r18w16-s2", "--zoo", str(zoo_dir),
                                                     "--data", "digits", "--mean", "0.5"]))
    assert "--image-size" in line and "--std" in line and "--mean," not in line
    res = CliRunner().invoke(main, ["eval", "r18w16-s2", "--zoo", str(zoo_dir), "--data", "digits",
                                    "--image-size", "28", "--mean", "0.286", "--std", "0.353", "--limit", "50"])
    assert res.exit_code == 0, res.output
    assert _correct(res.output, "r18w16-s2")[1] == 50


def test_data_root_keeps_the_old_data_meaning(zoo_dir, tmp_path, monkeypatch):
    """--data-root names the Fashion-MNIST folder (what --data used to)."""
    from tests.test_data import _fake_fashion

    monkeypatch.delenv("FUSION_DATA_DIR", raising=False)
    _fake_fashion(tmp_path / "fm", n=12)
    res = CliRunner().invoke(main, ["eval", "r18w16-s2", "--zoo", str(zoo_dir),
                                    "--data-root", str(tmp_path / "fm")])
    assert res.exit_code == 0, res.output
    assert _correct(res.output, "r18w16-s2")[1] == 12


def _hf_folder(path):
    from tests import tiny_models

    tiny_models.build("hf_vit", seed=0)[0].save_pretrained(str(path))
    return str(path)


def test_eval_on_an_image_folder(tmp_path):
    """An ImageFolder with train/ and test/: the HF model declares its size, --mean/--std complete it."""
    from tests.test_data import _png_folder

    for split, n in (("train", 2), ("test", 3)):
        _png_folder(tmp_path / "images" / split, {f"c{k}": [(20 * k, 9, 9)] * n for k in range(10)})
    model = _hf_folder(tmp_path / "hf")
    res = CliRunner().invoke(main, ["eval", model, "--data", str(tmp_path / "images")])
    line = _one_error_line(res, alone=False)
    assert "--mean, --std" in line and "--image-size" not in line
    res = CliRunner().invoke(main, ["eval", model, "--data", str(tmp_path / "images"), "--mean", "0.5",
                                    "--std", "0.5"])
    assert res.exit_code == 0, res.output
    assert _correct(res.output, model)[1] == 30


def test_compress_with_module_function_data(tmp_path):
    """module:function data calibrates and evaluates (the function returns model-ready tensors)."""
    model = _hf_folder(tmp_path / "hf")
    out = tmp_path / "half.safetensors"
    res = CliRunner().invoke(main, ["compress", model, "--width", "0.5", "--repair", "none", "--out", str(out),
                                    "--data", "tests.data_spec_helpers:noise28", "--calibration-size", "32",
                                    "--eval"])
    assert res.exit_code == 0, res.output
    assert _correct(res.output, "fused")[1] == 40
    res = CliRunner().invoke(main, ["compress", model, "--width", "0.5", "--out", str(out), "--overwrite",
                                    "--data", "tests.data_spec_helpers:noise28", "--calibration-size", "41"])
    assert "41 exceeds" in _one_error_line(res, alone=False)


def test_fuse_hf_directories(tmp_path):
    """HF model folders fuse into a file that records a transformers constructor spec."""
    from tests import tiny_models

    for i, d in enumerate(("a", "b")):
        tiny_models.build("hf_vit", seed=i)[0].save_pretrained(str(tmp_path / d))
    out = tmp_path / "hf.safetensors"
    res = CliRunner().invoke(main, ["fuse", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out),
                                    "--calibration-size", "64", "--eval", "--limit", "100"])
    assert res.exit_code == 0, res.output
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["arch"]["library"] == "transformers" and side["arch"]["name"] == "ViTForImageClassification"
    res2 = CliRunner().invoke(main, ["eval", str(out), "--limit", "100"])
    assert res2.exit_code == 0, res2.output
    assert _correct(res.output, "fused") == _correct(res2.output, str(out))
    # --quiet silences transformers' bars too (loading the folders, writing OUT.hf); the bars'
    # setting is restored afterwards
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    res3 = CliRunner().invoke(main, ["--quiet", "fuse", str(tmp_path / "a"), str(tmp_path / "b"), "--out",
                                     str(tmp_path / "q"), "--calibration-size", "64"])
    assert res3.exit_code == 0, res3.output
    assert "%|" not in res3.output and "Loading weights" not in res3.output, res3.output
    assert (tmp_path / "q.hf" / "config.json").exists() and hf_logging.is_progress_bar_enabled() == before


def test_interpolate_writes_json_and_png(zoo_dir, tmp_path):
    out = tmp_path / "interp"
    res = CliRunner().invoke(main, [
        "interpolate", "r18w16-s2", "r18w16-s2", "--zoo", str(zoo_dir), "--out", str(out),
        "--steps", "3", "--calibration-size", "64", "--test-limit", "200",
        "--methods", "permute", "--repairs", "none,reset_bn"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["interpolation.json", "interpolation.png"]
    assert (out / "interpolation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = json.loads((out / "interpolation.json").read_text())
    assert [(c["method"], c["repair"]) for c in curves] == [("permute", "none"), ("permute", "reset_bn")]
    for c in curves:
        assert c["alphas"] == [0.0, 0.5, 1.0] and len(c["accuracy"]) == len(c["loss"]) == 3
    # a model interpolated with itself: a flat curve, no barrier
    flat = curves[0]
    assert max(flat["accuracy"]) - min(flat["accuracy"]) < 0.011
    assert abs(flat["barrier_accuracy"]) < 0.011


@pytest.mark.slow
def test_interpolate_alignment_lowers_the_barrier(zoo_dir, tmp_path):
    """Default methods and repairs on two different seeds: permute + reset_bn beats plain averaging."""
    res = CliRunner().invoke(main, [
        "interpolate", "r18w32-s0", "r18w32-s1", "--zoo", str(zoo_dir), "--out", str(tmp_path),
        "--steps", "3", "--calibration-size", "512", "--test-limit", "1000"])
    assert res.exit_code == 0, res.output
    curves = {(c["method"], c["repair"]): c for c in json.loads((tmp_path / "interpolation.json").read_text())}
    assert set(curves) == {(m, r) for m in ("average", "permute") for r in ("none", "reset_bn")}
    assert curves["permute", "reset_bn"]["barrier_accuracy"] < curves["average", "none"]["barrier_accuracy"]
    assert curves["permute", "reset_bn"]["accuracy"][1] > 0.5


def test_interpolate_rejects_bad_repair(tmp_path):
    res = CliRunner().invoke(main, ["interpolate", "a", "b", "--out", str(tmp_path), "--repairs", "nope"])
    assert res.exit_code != 0 and "--repairs" in res.output


def test_interpolate_refuses_existing_results_in_one_line(tmp_path):
    """Guards: `fusion interpolate` never replaces earlier curves without --overwrite, and says so in
    one line with exit code 2 before resolving any model (the model names here do not exist)."""
    (tmp_path / "interpolation.json").write_text("[]")
    res = CliRunner().invoke(main, ["interpolate", "no-such-a", "no-such-b", "--out", str(tmp_path)])
    assert "interpolation.json exists" in _one_error_line(res)
    assert (tmp_path / "interpolation.json").read_text() == "[]"
    res = CliRunner().invoke(main, ["interpolate", "no-such-a", "no-such-b", "--out", str(tmp_path / "interpolation.json")])
    assert "is a file" in _one_error_line(res)


def test_compress_round_trip_matches_api(zoo_dir, tmp_path):
    """`fusion compress --width 0.5` writes a narrower model that reloads (widths in the sidecar)."""
    from fusion import fuse
    from fusion.experiments.data import calibration_subset, load_fashion_mnist
    from fusion.experiments.evaluate import accuracy
    from fusion.experiments.zoo import load_model
    from fusion.io import load_model_file

    out = tmp_path / "half.safetensors"
    n, cal = 200, 128
    res = CliRunner().invoke(main, [
        "compress", "r18w32-s0", "--zoo", str(zoo_dir), "--out", str(out), "--width", "0.5",
        "--calibration-size", str(cal), "--eval", "--test-limit", str(n)])
    assert res.exit_code == 0, res.output
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["method"] == "ot" and side["widths"]["layer4.0.conv1"] == 128
    model, _ = load_model_file(out)
    assert model.layer4[0].conv1.out_channels == 128 and model.fc.in_features == 128
    res = CliRunner().invoke(main, ["eval", str(out), "--limit", str(n)])
    assert res.exit_code == 0, res.output
    src, _ = load_model("r18w32-s0", zoo_dir)
    api = fuse([src], calibration_subset(load_fashion_mnist("train"), cal, seed=0), method="ot",
               repair="reset_bn", width=0.5)
    api_acc = accuracy(api, Subset(load_fashion_mnist("test"), range(n)))
    assert abs(_correct(res.output, str(out))[0] / n - api_acc) < 1e-9


def test_fuse_into_a_target_architecture(zoo_dir, tmp_path):
    """`fusion fuse A B --target C` writes a model with C's architecture (here a narrower ViT)."""
    from fusion.io import load_model_file

    out = tmp_path / "vit.safetensors"
    res = CliRunner().invoke(main, [
        "fuse", "vit128-s0", "vit64-s2", "--zoo", str(zoo_dir), "--out", str(out), "--method", "ot",
        "--target", "vit64-s2", "--repair", "none", "--calibration-size", "64"])
    assert res.exit_code == 0, res.output
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["arch"]["kwargs"]["embed_dim"] == 64 and "widths" not in side
    model, _ = load_model_file(out)
    assert model.blocks[0].attn.qkv.out_features == 192


def test_width_and_target_usage_errors():
    runner = CliRunner()
    res = runner.invoke(main, ["compress", "timm:resnet18", "--out", "x.safetensors"])
    assert res.exit_code != 0 and "--width" in res.output
    res = runner.invoke(main, ["fuse", "a", "--out", "x.safetensors"])
    assert res.exit_code != 0 and "two models" in res.output
    from alignment.errors import FusionError
    from fusion.cli import OptionValueError, parse_width

    assert parse_width("0.5") == 0.5 and parse_width("64") == 64 and parse_width('{"fc1": 8}') == {"fc1": 8}
    assert parse_width('{"*": 0.5, "fc1": 3}') == {"*": 0.5, "fc1": 3} and parse_width(None) is None
    for bad in ("half", "-0.5", "0", "0.0", "nan", "[1]", '{"fc1": 0}', '{"fc1": "x"}'):
        with pytest.raises(OptionValueError):
            parse_width(bad)
    assert issubclass(OptionValueError, FusionError)


def test_merging_heads_of_models_trained_on_other_classes_is_refused(tmp_path):
    """Guards: two 5-class models trained on classes 0-4 and 5-9 were fused with their classifiers
    averaged (output k meant class k for one and 5 + k for the other) and saved without a word; the
    classes recorded in their sidecars now stop it in one line (exit 2), before any work."""
    from fusion.io import save_model
    from tests.tiny_models import timm_vit

    arch = {"library": "timm", "name": "vit_tiny_patch16_224",
            "kwargs": {"img_size": 28, "patch_size": 7, "embed_dim": 64, "depth": 2, "num_heads": 4,
                       "in_chans": 1}}
    for name, classes in (("a", range(5)), ("b", range(5, 10))):
        m = timm_vit()
        m.reset_classifier(5)
        save_model(m, tmp_path / name, arch=arch, num_classes=5, classes=list(classes))
    res = CliRunner().invoke(main, ["fuse", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                                    "--out", str(tmp_path / "ab")])
    assert "trained on different classes ([0, 1, 2, 3, 4]; [5, 6, 7, 8, 9])" in _one_error_line(res)
    assert "--heads separate" in res.stderr and not (tmp_path / "ab.safetensors").exists()


def test_separate_heads_fusion_saves_each_heads_classes_and_eval_scores_them(zoo_dir, tmp_path):
    """fuse --heads separate --budget 1.2 --refine lstsq writes a model whose sidecar lists each
    head's classes; it reloads at its partial-matching widths, and eval prints per-task and joint
    accuracy equal to the API's on the reloaded model."""
    from fusion.experiments.data import load_fashion_mnist
    from fusion.experiments.evaluate import heads_accuracy
    from fusion.io import load_model_file

    out = tmp_path / "ab"
    res = CliRunner().invoke(main, [
        "fuse", "r18w32-A-s4", "r18w32-B-s5", "--zoo", str(zoo_dir), "--out", str(out), "--calibration-size", "128",
        "--heads", "separate", "--budget", "1.2", "--refine", "lstsq", "--refine-option", "ridge=0.001"])
    assert res.exit_code == 0, res.output
    side = json.loads((tmp_path / "ab.json").read_text())
    assert side["classes"] == list(range(10)) and side["num_classes"] == 10
    assert side["heads"] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    res = CliRunner().invoke(main, ["eval", str(tmp_path / "ab.safetensors"), "--limit", "400"])
    assert res.exit_code == 0, res.output
    model, _ = load_model_file(tmp_path / "ab.safetensors")
    want = heads_accuracy(model, side["heads"], Subset(load_fashion_mnist("test"), range(400)))
    assert f"mean {100 * want['task_mean']:.2f}%" in res.output
    assert f"joint accuracy {100 * want['joint']:.2f}%" in res.output


def test_fuse_zip_until_writes_a_zipped_model_that_eval_reloads(tmp_path):
    """fuse --method zip --zip-until writes a partially zipped model (its sidecar records the cut and
    each branch's architecture); eval rebuilds it and scores it as the fusing run did."""
    from tests import tiny_models

    for i, d in enumerate(("a", "b")):
        tiny_models.build("hf_vit", seed=i)[0].save_pretrained(str(tmp_path / d))
    out = tmp_path / "zipped.safetensors"
    res = CliRunner().invoke(main, ["fuse", str(tmp_path / "a"), str(tmp_path / "b"), "--method", "zip",
                                    "--zip-until", "vit.layers.0", "--out", str(out), "--calibration-size", "64",
                                    "--eval", "--limit", "100"])
    assert res.exit_code == 0, res.output
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["zipped"]["cut"]["module"] == "vit.layers.0" and len(side["zipped"]["branches"]) == 2
    res2 = CliRunner().invoke(main, ["eval", str(out), "--limit", "100"])
    assert res2.exit_code == 0, res2.output
    assert _correct(res.output, "fused") == _correct(res2.output, str(out))


def test_out_onto_existing_files_fails_before_any_work(tmp_path, monkeypatch):
    """--out onto an existing file (a user's own sidecar here) without --overwrite stops before models
    are loaded or fused, and leaves the file as it was."""
    import fusion

    def never(*a, **k):
        raise AssertionError("fusion ran")
    monkeypatch.setattr(fusion, "fuse", never)
    (tmp_path / "x.json").write_text("mine")
    res = CliRunner().invoke(main, ["fuse", "nope-a", "nope-b", "--out", str(tmp_path / "x")])
    assert "x.json exists" in _one_error_line(res, alone=False) and "--overwrite" in res.output
    assert (tmp_path / "x.json").read_text() == "mine"
    res = CliRunner().invoke(main, ["fuse", "nope-a", "nope-b", "--out", str(tmp_path / "x.json" / "y")])
    assert "writable" in _one_error_line(res, alone=False)


def test_fused_hf_model_is_also_a_save_pretrained_folder_that_eval_reads(tmp_path):
    """fuse writes <out>.hf (transformers' own format) next to the toolkit's pair; eval scores both
    forms alike."""
    from tests import tiny_models

    for i, d in enumerate(("a", "b")):
        tiny_models.build("hf_vit", seed=i)[0].save_pretrained(str(tmp_path / d))
    out = tmp_path / "hf.safetensors"
    res = CliRunner().invoke(main, ["--quiet", "fuse", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out),
                                    "--calibration-size", "64"])
    assert res.exit_code == 0, res.output
    assert "hf.hf" in res.output and (tmp_path / "hf.hf" / "config.json").is_file()
    one = CliRunner().invoke(main, ["--quiet", "eval", str(out), "--limit", "100"])
    two = CliRunner().invoke(main, ["--quiet", "eval", str(tmp_path / "hf.hf"), "--limit", "100"])
    assert one.exit_code == 0 and two.exit_code == 0, (one.output, two.output)
    assert _correct(one.output, str(out)) == _correct(two.output, str(tmp_path / "hf.hf"))


def test_fuse_models_returned_by_a_function(tmp_path):
    """MODELS may be module:function returning the models (with their constructor spec); the fused
    model is saved with that spec and a timm form."""
    out = tmp_path / "fn.safetensors"
    res = CliRunner().invoke(main, ["--quiet", "fuse", "tests.data_spec_helpers:two_resnets", "--out", str(out),
                                    "--data", "tests.data_spec_helpers:noise28", "--calibration-size", "32"])
    assert res.exit_code == 0, res.output
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["arch"]["name"] == "resnet18" and (tmp_path / "fn.timm.json").is_file()
    # eval reads the toolkit's pair and the timm form alike
    scores = []
    for form in (out, tmp_path / "fn.timm.json"):
        r = CliRunner().invoke(main, ["--quiet", "eval", str(form), "--data", "tests.data_spec_helpers:noise28"])
        assert r.exit_code == 0, r.output
        scores.append(_correct(r.output, str(form)))
    assert scores[0] == scores[1]
    # a halved stem is no timm constructor argument: no timm form, and the output says so
    half = tmp_path / "half.safetensors"
    res = CliRunner().invoke(main, ["--quiet", "fuse", "tests.data_spec_helpers:two_resnets", "--out", str(half),
                                    "--data", "tests.data_spec_helpers:noise28", "--calibration-size", "32",
                                    "--width", "0.5"])
    assert res.exit_code == 0, res.output
    assert "no timm form" in res.output and not (tmp_path / "half.timm.json").exists()
    res = CliRunner().invoke(main, ["fuse", "tests.data_spec_helpers:nope", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "cannot import" in res.output


def _saved_pair(tmp_path):
    """Two tiny timm ResNets saved with fusion.io.save_model under tmp_path/in (paths of the weights)."""
    from fusion.io import save_model
    from tests.data_spec_helpers import two_resnets

    paths = []
    for k, (model, arch) in enumerate(two_resnets()):
        paths.append(save_model(model, tmp_path / "in" / f"m{k}", arch, 10))
    return paths


def test_the_output_never_replaces_an_input_even_with_overwrite(tmp_path):
    """Guards: --out naming an input model (its stem, weights or sidecar) is refused before any work,
    with --overwrite too; the input files keep their bytes."""
    import hashlib

    a, b = _saved_pair(tmp_path)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, a.with_suffix(".json"))}
    for out in (a.with_suffix(""), a, a.with_suffix(".json")):
        res = CliRunner().invoke(main, ["fuse", str(a), str(b), "--out", str(out), "--overwrite",
                                        "--data", "tests.data_spec_helpers:noise28", "--calibration-size", "8"])
        assert "would replace the input" in _one_error_line(res)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before} == before
    assert not (tmp_path / "in" / "m0.timm.json").exists()
    # the target is an input too, named by its stem (no file of that name: it used to be missed)
    res = CliRunner().invoke(main, ["fuse", str(b), str(b), "--target", str(a.with_suffix("")), "--method", "ot",
                                    "--out", str(a.with_suffix("")), "--overwrite",
                                    "--data", "tests.data_spec_helpers:noise28", "--calibration-size", "8"])
    assert "would replace the input" in _one_error_line(res)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before} == before


def test_overwriting_an_output_removes_the_library_forms_of_the_model_it_replaces(tmp_path):
    """Guards: replacing a fused model (whose timm form was written) by one the timm constructor
    cannot express (halved stem) with --overwrite leaves no stale m.timm.json describing the old
    weights; --limit 0 is refused instead of meaning 'all'."""
    a, b = _saved_pair(tmp_path)
    out = tmp_path / "out" / "m"
    args = [str(a), str(b), "--out", str(out), "--data", "tests.data_spec_helpers:noise28", "--calibration-size", "8"]
    assert CliRunner().invoke(main, ["--quiet", "fuse", *args]).exit_code == 0
    assert (tmp_path / "out" / "m.timm.json").is_file()
    res = CliRunner().invoke(main, ["--quiet", "fuse", *args, "--width", "0.5", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "out" / "m.timm.json").exists()
    res = CliRunner().invoke(main, ["eval", str(out), "--data", "tests.data_spec_helpers:noise28", "--limit", "0"])
    assert res.exit_code == 2 and "--limit" in res.output


def test_alpha_counts_the_models_a_function_returns(tmp_path):
    """Guards: --alpha is checked against the models module:function specs return (two here), not
    the number of specs."""
    out = tmp_path / "a.safetensors"
    res = CliRunner().invoke(main, ["--quiet", "fuse", "tests.data_spec_helpers:two_resnets", "--alpha", "0.3",
                                    "--out", str(out), "--data", "tests.data_spec_helpers:noise28",
                                    "--calibration-size", "8"])
    assert res.exit_code == 0, res.output
    assert json.loads(out.with_suffix(".json").read_text())["report"]["alpha"] == pytest.approx([0.7, 0.3])
    res = CliRunner().invoke(main, ["fuse", "tests.data_spec_helpers:two_resnets", "--alpha", "0.3", "--alpha", "0.3",
                                    "--alpha", "0.4", "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "one --alpha per model (2)" in res.output


def test_model_paths_that_do_not_exist_or_hold_dots_are_named_plainly(tmp_path):
    """Guards: a missing model path says so (not 'no zoo given' or 'no sidecar'), and a stem holding
    dots (runs/alpha0.3) loads like any stem."""
    for spec, words in ((tmp_path / "nothere.safetensors", "No model file"), (tmp_path / "missing.hf", "no such model"),
                        (tmp_path, "folder without config.json")):
        res = CliRunner().invoke(main, ["eval", str(spec)])
        assert words in _one_error_line(res), spec
    from fusion.io import save_model
    from tests.data_spec_helpers import two_resnets

    model, arch = two_resnets()[0]
    save_model(model, tmp_path / "alpha0.3", arch, 10)
    res = CliRunner().invoke(main, ["--quiet", "eval", str(tmp_path / "alpha0.3"),
                                    "--data", "tests.data_spec_helpers:noise28"])
    assert res.exit_code == 0, res.output


def test_hf_folders_in_bfloat16_fuse_and_keep_their_class_names(tmp_path):
    """Guards: HF folders saved in bfloat16 (transformers loads them so) fuse from the CLI: the
    decoded float32 calibration images are cast to the models' dtype (before: 'calibration inputs
    are float32 but the models are bfloat16'); the sidecar keeps the models' class names, so the
    project's loader gives them back (before: LABEL_0..9), and the reloaded model keeps bfloat16."""
    from fusion.io import load_model_file
    from tests import tiny_models

    names = {k: f"class_{k}" for k in range(10)}
    for i, d in enumerate(("a", "b")):
        m = tiny_models.build("hf_vit", seed=i)[0]
        m.config.id2label, m.config.label2id = dict(names), {v: k for k, v in names.items()}
        m.to(torch.bfloat16).save_pretrained(str(tmp_path / d))
    out = tmp_path / "bf.safetensors"
    res = CliRunner().invoke(main, ["fuse", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out),
                                    "--data", "tests.data_spec_helpers:noise28", "--calibration-size", "32",
                                    "--eval"])
    assert res.exit_code == 0, res.output
    loaded, _ = load_model_file(out)
    assert loaded.config.id2label == names
    assert {t.dtype for t in loaded.parameters()} == {torch.bfloat16}


def test_the_output_never_lands_inside_an_input_folder_or_on_a_zoo_manifest(tmp_path):
    """Guards: --out inside an input HF model folder (``hf/model``: its own weights file) and --out on
    the zoo's ``manifest`` are refused before any work, with --overwrite too (before: the folder's
    weights and the zoo index were replaced)."""
    import hashlib

    from fusion.io import save_weights
    from tests.data_spec_helpers import two_resnets

    model = _hf_folder(tmp_path / "hf")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "hf").iterdir()}
    res = CliRunner().invoke(main, ["compress", model, "--width", "0.5", "--out", str(tmp_path / "hf" / "model"),
                                    "--overwrite", "--data", "tests.data_spec_helpers:noise28",
                                    "--calibration-size", "8"])
    assert "would write into the input folder" in _one_error_line(res, alone=False)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "hf").iterdir()} == before
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    net, arch = two_resnets()[0]
    save_weights(net, zoo / "tiny.safetensors")
    (zoo / "manifest.json").write_text(json.dumps({"tiny": {"arch": arch, "classes": list(range(10)),
                                                             "num_classes": 10}}))
    manifest = (zoo / "manifest.json").read_bytes()
    res = CliRunner().invoke(main, ["compress", "tiny", "--zoo", str(zoo), "--width", "0.5", "--out",
                                    str(zoo / "manifest"), "--overwrite", "--data", "tests.data_spec_helpers:noise28",
                                    "--calibration-size", "8"])
    line = _one_error_line(res)
    assert "would replace the input" in line and "manifest.json" in line
    assert (zoo / "manifest.json").read_bytes() == manifest


def test_test_data_the_model_cannot_take_is_one_error_line_before_any_work(tmp_path):
    """Guards: test images the models cannot take (3 channels for 1-channel models) are a one-line
    error naming the shape, for eval and for fuse --eval before the fusion (before: a traceback,
    from fuse only after the fused model was saved)."""
    a, b = _saved_pair(tmp_path)
    spec = ["--data", "tests.data_spec_helpers:rgb_test28"]
    res = CliRunner().invoke(main, ["eval", str(a), *spec])
    assert "fails on test inputs of shape (2, 3, 28, 28)" in _one_error_line(res)
    res = CliRunner().invoke(main, ["fuse", str(a), str(b), "--out", str(tmp_path / "f"), "--eval",
                                    "--calibration-size", "8", *spec])
    assert "fails on test inputs" in _one_error_line(res) and not list(tmp_path.glob("f*"))


def test_bfloat16_models_with_separate_heads_are_evaluated_per_head(tmp_path):
    """Guards: per-head evaluation casts the test images to a bfloat16 model's dtype, as plain
    evaluation does (before: a dtype traceback after the fused model was saved)."""
    from fusion.io import save_model
    from tests.data_spec_helpers import two_resnets

    paths = [save_model(m.to(torch.bfloat16), tmp_path / f"m{k}", arch, 10) for k, (m, arch) in enumerate(two_resnets())]
    res = CliRunner().invoke(main, ["fuse", *map(str, paths), "--heads", "separate", "--out", str(tmp_path / "f"),
                                    "--eval", "--calibration-size", "8", "--data", "tests.data_spec_helpers:noise28"])
    assert res.exit_code == 0, res.output
    assert "per-task accuracy head 0" in res.output and "joint accuracy" in res.output


def test_a_loader_of_unlabeled_images_calibrates_and_a_calibration_size_beyond_it_is_refused(tmp_path):
    """Guards: a --data DataLoader of images alone calibrates a fusion (before: refused because
    'evaluation needs labels', with nothing evaluated), and a --calibration-size above what it gives
    is one error line, as for a dataset (before: silently fewer)."""
    res = CliRunner().invoke(main, ["--quiet", "fuse", "tests.data_spec_helpers:two_resnets", "--out",
                                    str(tmp_path / "f"), "--data", "tests.data_spec_helpers:inputs_loader",
                                    "--calibration-size", "16"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["fuse", "tests.data_spec_helpers:two_resnets", "--out", str(tmp_path / "g"),
                                    "--data", "tests.data_spec_helpers:inputs_loader", "--calibration-size", "100"])
    assert "calibration size 100 exceeds the 40 examples the --data loader gives" in _one_error_line(res, alone=False)


def test_interpolation_curves_are_not_written_into_an_input_model_folder(tmp_path):
    """Guards: ``interpolate --out`` naming an input transformers folder is refused before any work,
    with --overwrite too (before: interpolation.json and .png were written into the model's folder)."""
    import hashlib

    model = _hf_folder(tmp_path / "hf")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "hf").iterdir()}
    res = CliRunner().invoke(main, ["interpolate", model, model, "--out", model, "--overwrite", "--steps", "2",
                                    "--methods", "permute", "--repairs", "none",
                                    "--data", "tests.data_spec_helpers:noise28", "--calibration-size", "8"])
    assert "writing the curves to" in _one_error_line(res, alone=False) and "would write into the input folder" in res.output
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "hf").iterdir()} == before


def test_timm_json_models_compress_and_fuse(tmp_path):
    """Guards: a ``<stem>.timm.json`` model (the timm form the CLI writes) is accepted by compress and
    fuse as by eval (before: 'cannot tell how to rebuild ResNet'); the result is saved with its
    timm constructor spec."""
    out = tmp_path / "fn.safetensors"
    res = CliRunner().invoke(main, ["--quiet", "fuse", "tests.data_spec_helpers:two_resnets", "--out", str(out),
                                    "--data", "tests.data_spec_helpers:noise28", "--calibration-size", "16"])
    assert res.exit_code == 0, res.output
    form = str(tmp_path / "fn.timm.json")
    for cmd in (["compress", form, "--width", "0.5"], ["fuse", form, form]):
        target = tmp_path / f"{cmd[0]}.safetensors"
        r = CliRunner().invoke(main, ["--quiet", *cmd, "--out", str(target), "--data",
                                      "tests.data_spec_helpers:noise28", "--calibration-size", "16"])
        assert r.exit_code == 0, r.output
        assert json.loads(target.with_suffix(".json").read_text())["arch"]["name"] == "resnet18"
        e = CliRunner().invoke(main, ["--quiet", "eval", str(target), "--data", "tests.data_spec_helpers:noise28"])
        assert e.exit_code == 0, e.output


def test_a_timm_json_model_has_the_classes_its_sidecar_records(tmp_path):
    """Guards: a ``<stem>.timm.json`` next to the toolkit's sidecar gets the sidecar's classes (a
    model of classes 5-14 was taken as one of 0-9: evaluated on other labels, merged with models of
    other classes without the different-classes error)."""
    from fusion.cli import resolve_model
    from fusion.io import save_library_forms, save_model
    from tests.data_spec_helpers import two_resnets

    model, arch = two_resnets()[0]
    save_model(model, tmp_path / "m", arch, 10, classes=range(5, 15))
    assert save_library_forms(model, tmp_path / "m", arch, 10) == [tmp_path / "m.timm.json"]
    assert list(resolve_model(str(tmp_path / "m.timm.json"))[1].classes) == list(range(5, 15))
    (tmp_path / "m.json").unlink()  # no sidecar: outputs are classes 0..9
    assert list(resolve_model(str(tmp_path / "m.timm.json"))[1].classes) == list(range(10))


def test_cli_input_errors_are_one_line(tmp_path):
    """Guards: a transformers folder that cannot load, an eval device that is not there, an
    ``--option`` naming the command's own keyword (seed), and eval of a function giving two models
    are one-line errors with exit code 2 (before: OSError, RuntimeError and TypeError tracebacks,
    the TypeError only after loading models and data)."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    res = CliRunner().invoke(main, ["eval", str(broken)])
    assert res.exit_code == 2 and "cannot load this model folder" in _one_error_line(res, alone=False)
    res = CliRunner().invoke(main, ["eval", _hf_folder(tmp_path / "hf"), "--device", "cuda:7"])
    assert res.exit_code == 2 and "cuda:7" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["interpolate", str(tmp_path / "hf"), str(tmp_path / "hf"), "--out",
                                    str(tmp_path / "curves"), "--device", "foo"])
    assert res.exit_code == 2 and "'foo'" in _one_error_line(res)
    torch.save({"w": torch.zeros(2)}, tmp_path / "sd.pt")  # weights without an architecture (was: "no model zoo")
    res = CliRunner().invoke(main, ["eval", str(tmp_path / "sd.pt")])
    assert "is a torch checkpoint" in _one_error_line(res) and "timm:NAME --checkpoint" in res.output
    res = CliRunner().invoke(main, ["compress", str(tmp_path / "hf"), "--width", "0.5", "--out", str(tmp_path / "o"),
                                    "--option", "seed=1", "--data", "tests.data_spec_helpers:noise28"])
    assert res.exit_code == 2 and "'seed' is no method option" in res.output
    res = CliRunner().invoke(main, ["eval", "tests.data_spec_helpers:two_resnets", "--data",
                                    "tests.data_spec_helpers:noise28"])
    assert res.exit_code == 2 and "eval takes one" in res.output


def test_eval_without_a_test_split_fails_before_the_work(tmp_path):
    """Guards: --eval with data that has no test split fails before fusing and writes nothing
    (before: the model was compressed and saved, then the error came)."""
    from tests.test_data import _png_folder

    _png_folder(tmp_path / "images" / "train", {f"c{k}": [(20 * k, 9, 9)] * 2 for k in range(10)})
    model = _hf_folder(tmp_path / "hf")
    out = tmp_path / "half"
    res = CliRunner().invoke(main, ["compress", model, "--width", "0.5", "--out", str(out), "--eval",
                                    "--data", str(tmp_path / "images"), "--mean", "0.5", "--std", "0.5",
                                    "--calibration-size", "8"])
    assert res.exit_code == 2 and "test" in _one_error_line(res, alone=False)
    assert not out.with_suffix(".safetensors").exists() and "statistics" not in res.output


# ---------------------------------------------------------------------------
# review fixes: spaces' model forms, --budget, dict/uint8 data, cache, --mean/--std, unused options
# ---------------------------------------------------------------------------


def test_spaces_takes_every_model_form_that_fuse_takes(tmp_path, monkeypatch):
    """Guards: `fusion spaces` resolves models as fuse does: timm:NAME with --checkpoint/--kwargs (before:
    'no such option --checkpoint'), module:function (before: read as a zoo name) and <stem>.timm.json;
    a partially zipped model with a trunk, which discovery cannot trace, is one line naming its sources."""
    from fusion import cli
    from fusion.io import save_weights
    from fusion.zipped import Cut, ZippedModel
    from tests.data_spec_helpers import two_resnets

    (model, arch), _ = two_resnets()
    save_weights(model, tmp_path / "r.safetensors")
    (tmp_path / "r.timm.json").write_text(json.dumps({"model_name": "resnet18", "num_classes": 10, **arch["kwargs"]}))
    runs = {
        "timm": ["timm:resnet18", "--checkpoint", str(tmp_path / "r.safetensors"), "--kwargs", json.dumps(arch["kwargs"])],
        "function": ["tests.data_spec_helpers:two_resnets"],
        "timm.json": [str(tmp_path / "r.timm.json")],
    }
    outputs = {}
    for name, args in runs.items():
        res = CliRunner().invoke(main, ["spaces", *args])
        assert res.exit_code == 0, (name, res.output)
        assert "layer1.0.conv1" in res.output and "13 spaces" in res.output, res.output
        outputs[name] = res.output
    assert "tests.data_spec_helpers:two_resnets[1]:" in outputs["function"]
    assert outputs["timm"] == outputs["timm.json"]

    zipped = ZippedModel(torch.nn.Linear(2, 2), [torch.nn.Linear(2, 2)] * 2, [torch.eye(2)] * 2, Cut(module="layer2"))
    monkeypatch.setattr(cli, "resolve_model", lambda *a, **k: (zipped, None))
    line = _one_error_line(CliRunner().invoke(main, ["spaces", "runs/zipped.safetensors"]))
    assert "runs/zipped.safetensors is a partially zipped model" in line and "'layer2'" in line


def test_budget_is_fuses_option_and_checked_before_any_work(tmp_path, monkeypatch):
    """Guards: compress --budget could never run (compress needs --width or --target, which partial
    matching refuses, and it needs two models): compress now says so in one line; fuse --budget below 1,
    nan, or with --width is one line before any model is loaded (the zoo given does not exist)."""
    import fusion

    monkeypatch.setattr(fusion, "fuse", lambda *a, **k: (_ for _ in ()).throw(AssertionError("fusion ran")))
    zoo = ["--zoo", str(tmp_path / "no-zoo"), "--out", str(tmp_path / "x")]
    line = _one_error_line(CliRunner().invoke(main, ["compress", "r18w32-s0", "--width", "0.5", "--budget", "1.2", *zoo]))
    assert "--budget 1.2" in line and "fusion fuse --budget" in line and "--width" in line
    for args, words in ((["--budget", "0.5"], ">= 1"), (["--budget", "nan"], ">= 1"),
                        (["--budget", "1.2", "--width", "0.5"], "do not combine it with --width")):
        line = _one_error_line(CliRunner().invoke(main, ["fuse", "r18w32-s0", "r18w32-s1", *args, *zoo]))
        assert words in line and "--budget" in line and "zoo" not in line.replace("--", ""), line
    help_text = CliRunner().invoke(main, ["compress", "--help"]).output
    assert "--budget" not in help_text.split("Options:")[1]
    assert "two or more models" in CliRunner().invoke(main, ["fuse", "--help"]).output
    # a module:function giving two models is no model to compress
    res = CliRunner().invoke(main, ["compress", "tests.data_spec_helpers:two_resnets", "--width", "0.5",
                                    "--out", str(tmp_path / "y")])
    assert res.exit_code == 2 and "compress takes one" in res.output


def test_dict_and_uint8_module_function_data_evaluate(tmp_path):
    """Guards: module:function data of dict items (pixel_values/labels) is restricted to a model's
    classes and evaluated (before: KeyError traceback); uint8 images are scaled and normalised with
    --mean/--std, asked for in one line when the model declares none (before: a RuntimeError
    traceback inside the first conv)."""
    from fusion.io import save_model
    from tests.data_spec_helpers import two_resnets

    model, arch = two_resnets()[0]
    path = str(save_model(model, tmp_path / "m", arch, 10))
    res = CliRunner().invoke(main, ["--quiet", "eval", path, "--data", "tests.test_data:dict_noise28"])
    assert res.exit_code == 0, res.output
    assert _correct(res.output, path)[1] == 40
    line = _one_error_line(CliRunner().invoke(main, ["eval", path, "--data", "tests.test_data:uint8_noise28"]))
    assert "uint8" in line and "--mean, --std" in line
    for spec in ("uint8_noise28", "uint8_dict_noise28"):
        res = CliRunner().invoke(main, ["--quiet", "eval", path, "--data", f"tests.test_data:{spec}", "--mean", "0.5",
                                        "--std", "0.25", "--limit", "10"])
        assert res.exit_code == 0, res.output
        assert _correct(res.output, path)[1] == 10
    line = _one_error_line(CliRunner().invoke(main, ["--quiet", "eval", path, "--data", "tests.test_data:uint8_loader"]),
                           alone=False)  # (after the warning that a loader's classes are not selected)
    assert "uint8 images" in line and "x.float() / 255" in line


def test_demo_cache_under_a_file_fails_before_any_work(tmp_path, monkeypatch):
    """Guards: a demo cache folder ($FUSION_CACHE) under an existing file is one line before data is read
    or a model trained (before: the demo trained both models, then failed saving them)."""
    from fusion.experiments import demo, train

    def never(*a, **k):
        raise AssertionError("work started")
    monkeypatch.setattr(train, "train_model", never)
    monkeypatch.setattr(demo, "demo_data", never)
    (tmp_path / "somefile.txt").write_text("x")
    monkeypatch.setenv("FUSION_CACHE", str(tmp_path / "somefile.txt" / "sub"))
    res = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "demo"), "--train-size", "10", "--epochs", "1"])
    line = _one_error_line(res)
    assert "somefile.txt" in line and "is a file" in line and "--no-cache" in line
    assert not (tmp_path / "demo").exists()
    with pytest.raises(demo.DemoError, match="is a file"):
        demo.run_demo(out=tmp_path / "d2", cache=tmp_path / "somefile.txt", train_size=10, epochs=1)


@pytest.mark.parametrize("option,value", [("--mean", "nan"), ("--mean", "inf"), ("--std", "nan"), ("--std", "0"),
                                          ("--std", "-1"), ("--std", "0.5,nan")])
def test_non_finite_mean_and_bad_std_are_one_line(tmp_path, option, value):
    """Guards: --mean nan/inf and --std nan/0/negative are refused in one line, exit 2, before any model
    is loaded (the zoo given does not exist; before: --mean nan was accepted and NaN images evaluated,
    --std 0 failed only when the data was loaded)."""
    for cmd in (["eval", "r18w16-s2"], ["compress", "r18w16-s2", "--width", "0.5", "--out", str(tmp_path / "o")]):
        line = _one_error_line(CliRunner().invoke(main, [*cmd, "--zoo", str(tmp_path / "no-zoo"), option, value]))
        assert f"{option} {value}" in line and "finite" in line


def test_options_without_effect_warn_or_fail_naming_the_option(tmp_path):
    """Guards: options the command would ignore in the given combination are named: --test-limit without
    --eval, data options the data does not use (--mean/--std with float module:function data, --download,
    --data-root) warn; --kwargs/--num-classes without a timm: model (as --checkpoint), --refine-option
    without --refine, and a method option the method does not have fail in one line before any work."""
    from fusion.io import save_model
    from tests.data_spec_helpers import two_resnets

    model, arch = two_resnets()[0]
    path = str(save_model(model, tmp_path / "m", arch, 10))
    res = CliRunner().invoke(main, ["--quiet", "eval", path, "--data", "tests.data_spec_helpers:noise28", "--mean",
                                    "0.5", "--std", "0.5", "--download", "--data-root", str(tmp_path), "--limit", "4"])
    assert res.exit_code == 0, res.output
    for flag in ("--mean", "--std", "--download", "--data-root"):
        assert f"warning: {flag} has no effect" in res.stderr, res.stderr
    out = ["--out", str(tmp_path / "o"), "--zoo", str(tmp_path / "no-zoo")]
    for args, words in ((["--kwargs", '{"in_chans": 1}'], "--kwargs has no effect"),
                        (["--num-classes", "5"], "--num-classes has no effect"),
                        (["--refine-option", "ridge=0.1"], "--refine-option ridge has no effect"),
                        (["--method", "permute", "--option", "solver=sinkhorn"], "has no option 'solver'")):
        line = _one_error_line(CliRunner().invoke(main, ["fuse", "nope-a", "nope-b", *args, *out]))
        assert words in line, line
    line = _one_error_line(CliRunner().invoke(main, ["eval", path, "--num-classes", "5"]))
    assert "--num-classes has no effect" in line
    res = CliRunner().invoke(main, ["--quiet", "compress", path, "--width", "0.5", "--test-limit", "5", "--repair",
                                    "none", "--method", "magnitude", "--out", str(tmp_path / "c"),
                                    "--data", "tests.data_spec_helpers:noise28", "--calibration-size", "4"])
    assert res.exit_code == 0, res.output
    assert "warning: --test-limit 5 has no effect without --eval" in res.stderr


def test_spaces_of_a_bfloat16_vit_saved_in_its_dtype(tmp_path):
    """Guards: `fusion spaces` runs discovery on an example in the model's own dtype (before: a
    bfloat16 timm ViT failed in torch.export with 'Input type (float) and bias type (BFloat16)')."""
    from fusion.io import save_model

    arch = {"library": "timm", "name": "vit_tiny_patch16_224",
            "kwargs": {"img_size": 28, "patch_size": 7, "embed_dim": 32, "depth": 1, "num_heads": 2, "in_chans": 1}}
    from fusion.io import build_model

    model = build_model(arch, 10).to(torch.bfloat16)
    path = str(save_model(model, tmp_path / "v", arch, 10))
    res = CliRunner().invoke(main, ["spaces", path])
    assert res.exit_code == 0, res.output
    assert "blocks.0.mlp.fc1" in res.output, res.output


# ---------------------------------------------------------------------------
# user code: --import, the modules of module:function specs, registered repairs and refinements
# ---------------------------------------------------------------------------

_PLUGIN = "tests.cli_plugin_helpers"
_PLUGIN_NAMES = {"method": "cli_test_perm", "repair": "cli_test_repair", "refinement": "cli_test_refine"}
_TINY_VIT = {"library": "timm", "name": "vit_tiny_patch16_224",
             "kwargs": {"img_size": 28, "patch_size": 7, "embed_dim": 32, "depth": 1, "num_heads": 2, "in_chans": 1}}


@pytest.fixture
def cli_plugin():
    """A user's plugin module (tests/cli_plugin_helpers.py: importing it registers a method, a repair and
    a refinement) that only the command imports; gives the module as the command imported it. Before
    and after the test its registrations and the module itself are removed (registries have no
    unregister: their entries are dropped here), so that no test sees them and the next import
    registers afresh."""
    import sys

    import tests
    from alignment.methods import METHODS
    from fusion.refine import REFINEMENTS
    from fusion.repair import REPAIRS

    regs = {"method": METHODS, "repair": REPAIRS, "refinement": REFINEMENTS}

    def clean():
        sys.modules.pop(_PLUGIN, None)
        if hasattr(tests, "cli_plugin_helpers"):
            delattr(tests, "cli_plugin_helpers")
        for kind, name in _PLUGIN_NAMES.items():
            regs[kind]._entries.pop(name, None)

    clean()
    yield lambda: sys.modules[_PLUGIN]
    clean()
    assert not any(name in regs[kind] for kind, name in _PLUGIN_NAMES.items())


def _tiny_vit_files(tmp_path) -> list[str]:
    """Two saved tiny ViTs (28x28 one-channel images) from different seeds: models that are no plugin's."""
    from fusion.io import build_model, save_model

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(str(save_model(build_model(_TINY_VIT, 10).eval(), tmp_path / f"vit{seed}", _TINY_VIT, 10)))
    return paths


_NOISE = ["--data", "tests.data_spec_helpers:noise28", "--calibration-size", "16"]


def test_import_option_makes_a_users_method_available_to_fuse_and_methods(tmp_path, cli_plugin):
    """Guards: `fusion --import MODULE` imports a user's module before the command (before: the CLI could not
    use a method the user registered, 'unknown method', and had no way to load user code); `fusion methods`
    lists what it registers; --help documents it."""
    assert "--import MODULE" in CliRunner().invoke(main, ["--help"]).output
    listed = CliRunner().invoke(main, ["--import", _PLUGIN, "methods"])
    assert listed.exit_code == 0, listed.output
    for name in _PLUGIN_NAMES.values():
        assert f"  {name}: " in listed.output, listed.output
    assert "strength = 1.0  (float)" in listed.output and "scale = 1.0  (float)" in listed.output
    out = tmp_path / "mine.safetensors"
    res = CliRunner().invoke(main, ["--quiet", "--import", _PLUGIN, "fuse", *_tiny_vit_files(tmp_path), *_NOISE,
                                    "--method", "cli_test_perm", "--option", "flip=true", "--repair", "none",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert ("method", True) in cli_plugin().CALLS
    assert json.loads(out.with_suffix(".json").read_text())["method"] == "cli_test_perm"


def test_import_of_a_module_that_cannot_be_imported_is_one_line_naming_it(tmp_path):
    """Guards: a missing --import module ends as one line naming it (exit 2), whatever the command."""
    for cmd in (["methods"], ["fuse", "nope-a", "nope-b", "--out", str(tmp_path / "o")]):
        line = _one_error_line(CliRunner().invoke(main, ["--import", "tests.no_such_plugin", *cmd]))
        assert "--import tests.no_such_plugin" in line and "no module named" in line, line
    line = _one_error_line(CliRunner().invoke(main, ["--import", "plugins/mine.py", "methods"]))
    assert "'plugins/mine.py' is not a module name" in line
    assert not list(tmp_path.iterdir())



def test_import_of_a_module_that_fails_is_one_line_naming_the_error(tmp_path, monkeypatch):
    """Guards: an --import module whose import raises (a bug: RuntimeError; a SyntaxError) ends as
    one line naming it and the error (before: a traceback, exit 1)."""
    (tmp_path / "raising_plugin.py").write_text("raise RuntimeError('plugin broken')\n")
    (tmp_path / "unparsable_plugin.py").write_text("def f(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    line = _one_error_line(CliRunner().invoke(main, ["--import", "raising_plugin", "methods"]))
    assert "--import raising_plugin: importing it failed: RuntimeError: plugin broken" in line
    line = _one_error_line(CliRunner().invoke(main, ["--import", "unparsable_plugin", "methods"]))
    assert "--import unparsable_plugin: importing it failed: SyntaxError" in line


@pytest.mark.parametrize("where", ["models", "data"])
def test_a_method_registered_in_a_models_or_data_module_is_known_when_options_are_checked(tmp_path, cli_plugin,
                                                                                         where):
    """Guards: the modules of module:function MODELS and --data specs are imported before the options are
    checked (before: --method was checked first, and a method their module registers was 'unknown')."""
    if where == "models":
        args = [f"{_PLUGIN}:two_vits", *_NOISE]
    else:
        args = [*_tiny_vit_files(tmp_path), "--data", f"{_PLUGIN}:noise28", "--calibration-size", "16"]
    res = CliRunner().invoke(main, ["--quiet", "fuse", *args, "--method", "cli_test_perm", "--repair", "none",
                                    "--out", str(tmp_path / "f")])
    assert res.exit_code == 0, res.output
    assert ("method", False) in cli_plugin().CALLS


def test_registered_repairs_and_refinements_with_their_options_reach_fuse(tmp_path, cli_plugin):
    """Guards: --repair and --refine take any registered name (before: a fixed choice refused what `fusion
    methods` lists), and --repair-option passes the repair's options (before: there was none)."""
    assert "--repair-option" in CliRunner().invoke(main, ["fuse", "--help"]).output
    res = CliRunner().invoke(main, ["--quiet", "--import", _PLUGIN, "fuse", *_tiny_vit_files(tmp_path), *_NOISE,
                                    "--repair", "cli_test_repair", "--repair-option", "strength=2.5",
                                    "--refine", "cli_test_refine", "--refine-option", "scale=3",
                                    "--out", str(tmp_path / "f")])
    assert res.exit_code == 0, res.output
    calls = cli_plugin().CALLS
    assert ("refine", 3.0) in calls and ("repair", 2.5) in calls, calls
    assert json.loads((tmp_path / "f.json").read_text())["repair"] == "cli_test_repair"


def test_repair_refine_and_method_names_and_options_are_checked_before_any_work(tmp_path, cli_plugin):
    """Guards: an unknown --repair, --refine or --method, and a --repair-option that is unknown or has no
    effect, end as one line before any model is resolved (the models here do not exist); unknown names
    list the registered ones (a plugin's too) and say how to add one's own (--import)."""
    fuse = ["fuse", "nope-a", "nope-b", "--out", str(tmp_path / "o"), "--zoo", str(tmp_path / "no-zoo")]
    for args, words in (
            (["--repair", "nope"], ["unknown repair 'nope'", "registered: auto, none, repair, reset_bn", "--import"]),
            (["--refine", "nope"], ["unknown refinement 'nope'", "registered: lstsq, none", "--import"]),
            (["--method", "nope"], ["unknown method 'nope'", "permute", "fusion --import MODULE fuse"]),
            (["--repair", "none", "--repair-option", "eps=1e-4"], ["--repair-option eps has no effect without a repair",
                                                                   "--repair repair"]),
            (["--repair-option", "eps=1e-4"], ["--repair-option eps has no effect: --repair auto takes no options"]),
            (["--repair", "repair", "--repair-option", "bogus=1"], ["repair 'repair' has no option 'bogus'",
                                                                    "eps, replay_gib"]),
            (["--repair", "repair", "--repair-option", "eps=-1"], ["repair 'repair'", "eps"])):
        line = _one_error_line(CliRunner().invoke(main, [*fuse, *args]))
        assert all(w in line for w in words), (args, line)
    res = CliRunner().invoke(main, [*fuse, "--repair", "repair", "--repair-option", "eps"])
    assert res.exit_code == 2 and "--repair-option" in res.output and "'eps' is not key=value" in res.output
    line = _one_error_line(CliRunner().invoke(main, ["--import", _PLUGIN, *fuse, "--repair", "nope"]))
    assert "cli_test_repair" in line and "unknown repair 'nope'" in line
    line = _one_error_line(CliRunner().invoke(main, ["compress", "nope-a", "--width", "0.5", "--repair", "reset_bn",
                                                     "--repair-option", "eps=1e-4", "--out", str(tmp_path / "c")]))
    assert "--repair-option eps has no effect: --repair reset_bn takes no options" in line
    interp = ["interpolate", "nope-a", "nope-b", "--out", str(tmp_path / "i")]
    line = _one_error_line(CliRunner().invoke(main, [*interp, "--methods", "permute,nope"]))
    assert "unknown method 'nope' (--methods)" in line and "fusion --import MODULE interpolate" in line
    line = _one_error_line(CliRunner().invoke(main, [*interp, "--repairs", "none,nope"]))
    assert "unknown repair 'nope' (--repairs)" in line
    line = _one_error_line(CliRunner().invoke(main, [*interp, "--option", "bogus=1"]))
    assert "'bogus'" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["import", "data"])
def test_interpolate_takes_registered_methods_and_repairs(tmp_path, cli_plugin, where):
    """Guards: `fusion interpolate --methods/--repairs` take a user's method and repair, loaded with --import
    or registered in the --data module (before: no --import, and --repairs was checked before that module
    was imported)."""
    paths = _tiny_vit_files(tmp_path)
    if where == "import":
        head, data = ["--import", _PLUGIN], "tests.data_spec_helpers:noise28"
    else:
        head, data = [], f"{_PLUGIN}:noise28"
    out = tmp_path / "interp"
    res = CliRunner().invoke(main, ["--quiet", *head, "interpolate", *paths, "--methods", "cli_test_perm",
                                    "--repairs", "none,cli_test_repair", "--steps", "2", "--data", data,
                                    "--calibration-size", "16", "--test-limit", "8", "--out", str(out)])
    assert res.exit_code == 0, res.output
    curves = json.loads((out / "interpolation.json").read_text())
    curves = curves["curves"] if isinstance(curves, dict) else curves
    assert {(c["method"], c["repair"]) for c in curves} == {("cli_test_perm", "none"),
                                                            ("cli_test_perm", "cli_test_repair")}
    assert ("repair", 1.0) in cli_plugin().CALLS


def test_the_toolkits_warnings_are_one_line_on_the_command_line(monkeypatch):
    """Guards: a FusionWarning (a fallback, data used other than asked) raised while a command runs
    prints as one ``warning: ...`` line on stderr, not Python's two-line format with the source
    line; other warnings keep Python's format, and the hook is removed after the command."""
    import warnings

    import click

    from alignment.errors import FallbackWarning
    from fusion.cli import _FusionGroup

    @click.group(cls=_FusionGroup)
    def group():
        pass

    @group.command()
    def warn():
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("space 'x' was\n  read elsewhere", FallbackWarning)
            warnings.warn("plain", UserWarning)

    others = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *a, **k: others.append(str(message)))
    before = warnings.showwarning
    res = CliRunner().invoke(group, ["warn"])
    assert res.exit_code == 0, res.output
    assert res.stderr == "warning: space 'x' was read elsewhere\n"
    assert others == ["plain"] and warnings.showwarning is before
