"""The fusion command line (issue 2 commands: zoo, spaces, eval)."""

from __future__ import annotations

from click.testing import CliRunner

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
