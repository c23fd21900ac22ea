"""The fusion command line: zoo, spaces, eval, fuse, interpolate, methods."""

from __future__ import annotations

import json
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


def test_methods_lists_registered_methods():
    from fusion import list_methods

    res = CliRunner().invoke(main, ["methods"])
    assert res.exit_code == 0, res.output
    assert res.output.split() == list_methods()
    assert "permute" in res.output.split() and "average" in res.output.split()


def test_parse_options_and_kwargs():
    import click

    from fusion.cli import _parse_kwargs, _parse_options

    assert _parse_options(["iterations=5", "mode=fast", "flag=true", "x=1.5"]) == {
        "iterations": 5, "mode": "fast", "flag": True, "x": 1.5}
    assert _parse_kwargs('{"in_chans": 1}') == {"in_chans": 1}
    with pytest.raises(click.BadParameter):
        _parse_options(["novalue"])
    with pytest.raises(click.BadParameter):
        _parse_kwargs("[1, 2]")


def test_fuse_round_trip_matches_api(zoo_dir, tmp_path):
    """`fusion fuse` writes a file that `fusion eval` reloads with exactly the API's accuracy."""
    from fusion import fuse
    from fusion.data import calibration_subset, load_fashion_mnist
    from fusion.evaluate import accuracy
    from fusion.zoo import load_model

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


def test_eval_of_split_fusion_uses_first_models_classes(zoo_dir, tmp_path):
    """A 5+5 split fusion keeps model A's head: eval scores it on A's five classes."""
    from fusion.data import load_fashion_mnist
    from fusion.evaluate import accuracy
    from fusion.zoo import load_model_file

    out = tmp_path / "ab"
    res = CliRunner().invoke(main, [
        "fuse", "r18w32-A-s4", "r18w32-B-s5", "--zoo", str(zoo_dir), "--out", str(out),
        "--calibration-size", "64", "--repair", "none", "--method", "average"])
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


def test_fuse_unknown_model_is_a_clean_error(zoo_dir, tmp_path):
    res = CliRunner().invoke(main, ["fuse", "r18w32-s0", "nope", "--zoo", str(zoo_dir),
                                    "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "not in the zoo" in res.output
    assert not list(tmp_path.iterdir())


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


def test_compress_round_trip_matches_api(zoo_dir, tmp_path):
    """`fusion compress --width 0.5` writes a narrower model that reloads (widths in the sidecar)."""
    from fusion import fuse
    from fusion.data import calibration_subset, load_fashion_mnist
    from fusion.evaluate import accuracy
    from fusion.zoo import load_model, load_model_file

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
    from fusion.zoo import load_model_file

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
    from fusion.cli import _width_option

    assert _width_option("0.5") == 0.5 and _width_option('{"fc1": 8}') == {"fc1": 8}
    with pytest.raises(click.BadParameter):
        _width_option("half")
