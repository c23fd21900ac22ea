"""Interpolation curves between two models (fusion.interpolate)."""

from __future__ import annotations

import json
import math

import pytest

from fusion.api import ModelError
import torch
from torch.utils.data import TensorDataset

from fusion.experiments.evaluate import evaluate_loss_and_accuracy
from fusion.interpolate import _barriers, default_alphas, interpolation_curve, interpolation_report
from fusion.repair import UnknownRepairError
from tests import tiny_models

KEYS = {"method", "repair", "alphas", "accuracy", "loss", "barrier_accuracy", "barrier_loss", "seconds"}


def _pair(name: str):
    a, x = tiny_models.build(name, seed=0)
    b, _ = tiny_models.build(name, seed=1)
    return [a, b], x


def _data(shape, n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, *shape[1:], generator=g), torch.randint(0, 10, (n,), generator=g))


def test_default_alphas():
    a = default_alphas()
    assert len(a) == 11 and a[0] == 0.0 and a[-1] == 1.0 and a[5] == 0.5
    assert default_alphas(3) == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError):
        default_alphas(1)


def test_barriers_of_straight_and_bent_curves():
    alphas = [0.0, 0.5, 1.0]
    assert _barriers(alphas, [0.8, 0.7, 0.6], [1.0, 1.5, 2.0], [0.8, 0.6], [1.0, 2.0]) == pytest.approx((0.0, 0.0))
    b_acc, b_loss = _barriers(alphas, [0.8, 0.3, 0.6], [1.0, 4.0, 2.0], [0.8, 0.6], [1.0, 2.0])
    assert b_acc == pytest.approx(0.4) and b_loss == pytest.approx(2.5)


def test_curve_keys_lengths_and_endpoints():
    models, x = _pair("mlp")
    data = _data(x.shape)
    calibration = _data(x.shape, n=64, seed=5).tensors[0]
    alphas = [0.0, 0.25, 0.5, 1.0]
    c = interpolation_curve(models, calibration, data, alphas=alphas, method="average", repair="none")
    assert KEYS <= set(c)
    assert c["method"] == "average" and c["repair"] == "none" and c["alphas"] == alphas
    assert len(c["accuracy"]) == len(c["loss"]) == len(alphas)
    assert all(math.isfinite(v) for v in c["accuracy"] + c["loss"]) and c["seconds"] >= 0
    # alpha 0 is model A exactly, alpha 1 model B
    ref_a = evaluate_loss_and_accuracy(models[0], data)
    ref_b = evaluate_loss_and_accuracy(models[1], data)
    assert c["accuracy"][0] == ref_a["accuracy"]
    assert c["loss"][0] == pytest.approx(ref_a["loss"], abs=1e-6)
    assert c["accuracy"][-1] == ref_b["accuracy"]
    assert c["barrier_accuracy"] >= 0.0 and c["barrier_loss"] >= -1e-6  # endpoints are on the line


def test_curve_default_alphas_and_permute():
    models, x = _pair("mlp")
    data = _data(x.shape, n=48)
    c = interpolation_curve(models, data, data, method="permute", repair="none", seed=0)
    assert len(c["alphas"]) == 11 and len(c["accuracy"]) == 11
    # permuting hidden units does not change a model's function: the ends are the sources
    assert c["accuracy"][0] == evaluate_loss_and_accuracy(models[0], data)["accuracy"]
    assert c["accuracy"][-1] == evaluate_loss_and_accuracy(models[1], data)["accuracy"]


@pytest.mark.parametrize("repair", ["reset_bn", "repair"])
def test_curve_with_batchnorm_repairs(repair):
    models, x = _pair("cnn")
    data = _data(x.shape, n=48)
    c = interpolation_curve(models, data, data, alphas=[0.25, 0.5], method="permute", repair=repair)
    assert len(c["accuracy"]) == 2 and all(math.isfinite(v) for v in c["loss"])
    # alphas without 0 and 1: the endpoints are the source models as they are
    assert c["endpoints"]["accuracy"] == [evaluate_loss_and_accuracy(m, data)["accuracy"] for m in models]


def test_curve_of_a_model_with_itself_is_flat():
    """The same object twice is fine (copied), and the path from a model to itself is flat."""
    models, x = _pair("mlp")
    data = _data(x.shape, n=48)
    c = interpolation_curve([models[0], models[0]], data, data, alphas=[0.0, 0.5, 1.0], method="permute",
                            repair="none")
    assert len(set(c["accuracy"])) == 1
    assert c["barrier_accuracy"] == pytest.approx(0.0, abs=1e-12)
    assert c["barrier_loss"] == pytest.approx(0.0, abs=1e-5)


def test_curve_rejects_bad_arguments():
    models, x = _pair("mlp")
    data = _data(x.shape, n=16)
    with pytest.raises(ModelError, match="two models"):
        interpolation_curve(models[:1], data, data)
    with pytest.raises(UnknownRepairError):
        interpolation_curve(models, data, data, repair="nope")


def test_report_writes_only_into_out(tmp_path):
    models, x = _pair("mlp")
    data = _data(x.shape, n=32)
    out = tmp_path / "sub" / "dir"
    curves = interpolation_report(models, data, data, methods=("average", "permute"), repairs=("none",),
                                  alphas=[0.0, 0.5, 1.0], out=out)
    assert [(c["method"], c["repair"]) for c in curves] == [("average", "none"), ("permute", "none")]
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["interpolation.json", "interpolation.png"]
    assert json.loads((out / "interpolation.json").read_text())[1]["accuracy"] == curves[1]["accuracy"]
    assert (out / "interpolation.png").stat().st_size > 1000
    # without out nothing is written
    before = sorted(tmp_path.rglob("*"))
    assert len(interpolation_report(models, data, data, methods=("average",), repairs=("none",),
                                    alphas=[0.0, 1.0])) == 1
    assert sorted(tmp_path.rglob("*")) == before


def test_report_refuses_existing_results_before_any_work(tmp_path, monkeypatch):
    """Guards: earlier curves are never lost. An existing interpolation.json (or png) is refused before
    the alignment runs, an output that is a file is refused likewise (a FusionError, not a raw OSError
    after the work), and ``overwrite=True`` replaces both files."""
    import fusion.interpolate as fi
    from alignment.errors import FusionError
    from fusion.io import OutputExistsError, OutputNotWritableError

    models, x = _pair("mlp")
    data = _data(x.shape, n=32)
    (tmp_path / "interpolation.png").write_bytes(b"earlier plot")

    def no_work(*a, **k):
        raise AssertionError("the alignment ran before the output was checked")

    with monkeypatch.context() as m:
        m.setattr(fi, "align", no_work)
        with pytest.raises(OutputExistsError, match="interpolation.png exists"):
            interpolation_report(models, data, data, methods=("average",), repairs=("none",), out=tmp_path)
        blocker = tmp_path / "file"
        blocker.write_text("x")
        with pytest.raises(OutputNotWritableError, match="is a file") as err:
            interpolation_report(models, data, data, methods=("average",), repairs=("none",), out=blocker)
        assert isinstance(err.value, FusionError)
    assert (tmp_path / "interpolation.png").read_bytes() == b"earlier plot"
    assert not (tmp_path / "interpolation.json").exists()
    curves = interpolation_report(models, data, data, methods=("average",), repairs=("none",), alphas=[0.0, 1.0],
                                  out=tmp_path, overwrite=True)
    assert (tmp_path / "interpolation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "interpolation.json").read_text())[0]["loss"] == curves[0]["loss"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "interpolation.json", "interpolation.png"]


def test_plot_curves_writes_a_png(tmp_path):
    """Guards: the public plot writer produces a PNG at the path given and nothing else."""
    from fusion.interpolate import plot_curves

    curves = [{"method": "permute", "repair": "none", "alphas": [0.0, 1.0], "accuracy": [0.5, 0.6], "loss": [1.0, 0.9]}]
    path = plot_curves(curves, tmp_path / "p.png")
    assert path == tmp_path / "p.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]


def test_zip_and_merge_curves_reach_their_endpoints():
    """Guards: at alpha 0 and 1 a zipped or merged feature may come from the zero-weight model only;
    the curve is computed there (it raised "fused feature k receives nothing") and is finite."""
    models, x = _pair("cnn")
    data = _data(x.shape, n=48)
    for method in ("zip", "merge"):
        c = interpolation_curve(models, data, data, method=method, repair="none", alphas=[0.0, 0.5, 1.0])
        assert len(c["accuracy"]) == 3 and all(math.isfinite(v) for v in c["loss"]), method


def test_a_report_checks_every_method_and_option_before_any_curve(monkeypatch):
    """Guards: an unknown method, an option no listed method has, or no methods at all are refused
    before any alignment (before: the curves of the methods listed first were computed, then
    the error came); a method option goes only to the methods that have it, so
    ``methods=("average", "permute"), iterations=1`` works (before: 'average' refused it)."""
    import functools

    import fusion.interpolate as fi
    from alignment.errors import InvalidOptionError
    from alignment.methods import UnknownMethodError
    from tests.tiny_models import build

    a, x = build("mlp", seed=0)
    b, _ = build("mlp", seed=1)
    cal = torch.randn(16, *x.shape[1:])
    seen = []
    real = fi.align

    @functools.wraps(real)
    def spy(models, calibration, method, **kw):
        seen.append((method, sorted(kw)))
        return real(models, calibration, method=method, **kw)
    monkeypatch.setattr(fi, "align", spy)
    for methods, options, error in ((("average", "nope"), {}, UnknownMethodError),
                                    (("average", "permute"), {"iteratoins": 1}, InvalidOptionError),
                                    (("permute",), {"iterations": -1}, InvalidOptionError),
                                    ((), {}, InvalidOptionError)):
        with pytest.raises(error):
            fi.interpolation_report([a, b], cal, None, methods=methods, repairs=("none",), alphas=[0.0, 1.0], **options)
    assert seen == []
    data = [(cal, torch.zeros(len(cal), dtype=torch.long))]
    curves = fi.interpolation_report([a, b], cal, data, methods=("average", "permute"), repairs=("none",),
                                     alphas=[0.0, 1.0], iterations=1, seed=3)
    assert [c["method"] for c in curves] == ["average", "permute"]
    assert seen == [("average", ["device", "progress", "seed"]), ("permute", ["device", "iterations", "progress", "seed"])]


def test_a_curve_takes_refine_and_repair_options_and_refuses_fuse_weights():
    """Guards: ``refine``, ``repair_options`` and ``refine_options`` reach every point's build (a
    curve's point is the model fuse builds with them) and are checked before any work; ``alpha``
    (a fuse keyword) is refused as one the curve does not take (before: all were refused as
    "method 'permute' has no option ...")."""
    import fusion
    from alignment.errors import InvalidOptionError

    models, x = _pair("mlp")
    cal = torch.randn(32, *x.shape[1:], generator=torch.Generator().manual_seed(4))
    data = _data(x.shape, n=32)
    c = interpolation_curve(models, cal, data, alphas=[0.5], method="permute", repair="none", refine="lstsq",
                            refine_options={"ridge": 1e-3})
    fused = fusion.fuse(models, cal, method="permute", alpha=0.5, repair="none", refine="lstsq",
                        refine_options={"ridge": 1e-3})
    assert c["refine"] == "lstsq"
    assert c["loss"][0] == pytest.approx(float(evaluate_loss_and_accuracy(fused, data)["loss"]), rel=1e-6)
    from alignment.errors import UnknownNameError

    for bad, error, message in (({"repair_options": {"eps": 1e-3}}, InvalidOptionError,
                                 "repair 'none' has no option 'eps'"),
                                ({"refine": "nope"}, UnknownNameError, "unknown refinement 'nope'"),
                                ({"alpha": 0.3}, InvalidOptionError,
                                 "interpolation curve takes no option 'alpha'.*alphas=")):
        with pytest.raises(error, match=message):
            interpolation_curve(models, cal, data, alphas=[0.0, 1.0], method="permute", repair="none", **bad)
    with pytest.raises(InvalidOptionError, match="takes no option 'normalize'"):
        interpolation_report(models, cal, data, methods=("permute",), repairs=("none",), normalize=False)
    curves = interpolation_report(models, cal, data, methods=("permute",), repairs=("none",), alphas=[0.5],
                                  refine="lstsq", refine_options={"ridge": 1e-3})
    assert curves[0]["refine"] == "lstsq" and curves[0]["loss"] == pytest.approx(c["loss"])


def test_barriers_are_against_the_sources_even_where_the_curve_ends_elsewhere(monkeypatch):
    """Guards: the barrier line joins the two source models as they are, also when the curve's own
    ends are other models (zip merges units inside each model, so alpha 0 is a compressed model A;
    before, the barrier was taken against those compressed ends and hid their loss). A report
    evaluates the sources once for all its curves."""
    import fusion.interpolate as fi

    models, x = _pair("cnn")
    data = _data(x.shape, n=48)
    src = [evaluate_loss_and_accuracy(m, data) for m in models]
    c = interpolation_curve(models, data, data, method="zip", repair="none", alphas=[0.0, 0.5, 1.0])
    assert c["endpoints"]["accuracy"] == [r["accuracy"] for r in src]
    assert c["endpoints"]["loss"] == pytest.approx([r["loss"] for r in src], abs=1e-6)
    line_loss = [(1 - a) * src[0]["loss"] + a * src[1]["loss"] for a in c["alphas"]]
    assert c["barrier_loss"] == pytest.approx(max(v - w for v, w in zip(c["loss"], line_loss)), abs=1e-6)
    assert c["loss"][0] != pytest.approx(src[0]["loss"], abs=1e-4)  # the curve starts at another model

    calls = []
    real = fi._sources
    monkeypatch.setattr(fi, "_sources", lambda *a, **k: calls.append(1) or real(*a, **k))
    curves = interpolation_report(models, data, data, methods=("average", "permute"), repairs=("none",),
                                  alphas=[0.0, 1.0])
    assert len(calls) == 1 and all(k["endpoints"] == curves[0]["endpoints"] for k in curves)
