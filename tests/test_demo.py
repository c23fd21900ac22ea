"""``fusion demo`` on a reduced budget: trains two small models, fuses them, writes its report."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from fusion.cli import main
from fusion.experiments.demo import DemoError, fresh_folder, run_demo


def test_demo_fuses_far_better_than_naive_averaging_and_caches_its_models(tmp_path, monkeypatch):
    """One epoch on a small subset: permutation (with the BatchNorm reset) beats plain weight averaging
    by a wide margin; the report and the interpolation curves are written; a second run reuses the
    trained models."""
    monkeypatch.chdir(tmp_path)
    kw = dict(train_size=4000, epochs=1, batch_size=32, calibration_size=500, test_size=1000, cache=tmp_path / "cache",
              progress=False, say=lambda m: None)
    res = run_demo(methods=["naive averaging", "permute"], **kw)
    acc = {r.name: r.accuracy for r in res.rows}
    sources = (acc["model seed 0"] + acc["model seed 1"]) / 2
    assert sources > 0.6
    assert acc["permute"] > acc["naive averaging"] + 0.2
    assert res.folder.name == "fusion-demo"
    written = json.loads((res.folder / "demo.json").read_text())
    assert [r["name"] for r in written["rows"]][:3] == ["model seed 0", "model seed 1", "ensemble (both models run)"]
    assert (res.folder / "interpolation.png").is_file() and (res.folder / "interpolation.json").is_file()
    again = run_demo(methods=[], curves=False, **kw)
    assert again.folder.name == "fusion-demo-2"
    assert [r.note for r in again.rows[:2]] == ["cached", "cached"]
    assert [r.accuracy for r in again.rows[:2]] == [acc["model seed 0"], acc["model seed 1"]]


def test_demo_never_overwrites(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("mine")
    with pytest.raises(DemoError, match="never overwrites"):
        fresh_folder(tmp_path / "used")
    with pytest.raises(DemoError, match="unknown demo row"):
        run_demo(methods=["nope"], out=tmp_path / "fresh")
    res = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "used")])
    assert res.exit_code == 2 and "never overwrites" in res.output
    assert (tmp_path / "used" / "x").read_text() == "mine"


def test_a_demo_folder_is_claimed_when_the_run_starts(tmp_path, monkeypatch):
    """Guards: two runs started together get two folders (before: the name was only picked at the
    start and created at the end, so the later run's demo.json replaced the earlier's); a run that
    fails leaves no empty folder behind."""
    import fusion.experiments.demo as demo

    monkeypatch.chdir(tmp_path)
    first, second = fresh_folder(None), fresh_folder(None)
    assert (first.name, second.name) == ("fusion-demo", "fusion-demo-2") and first.is_dir() and second.is_dir()

    def broken(*args, **kwargs):
        raise RuntimeError("no data")
    monkeypatch.setattr(demo, "demo_data", broken)
    with pytest.raises(RuntimeError, match="no data"):
        run_demo(out=tmp_path / "new")
    assert not (tmp_path / "new").exists()
