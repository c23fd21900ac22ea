"""The pipeline's contract: typed options, one exception base, the streaming runner, mergeable
statistics, topology, plans from every method, interpolation weights, and the package layout."""

from __future__ import annotations

import ast
import copy
import importlib
import importlib.util
import inspect
import pkgutil
import warnings
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

import alignment
import fusion
from alignment import discover
from alignment.errors import CalibrationError, FallbackWarning, FusionError, FusionWarning, InvalidOptionError
from alignment.maps import fuse_tensors
from alignment.methods import METHODS
from alignment.permute import model_tensors
from alignment.runner import batches, stream
from alignment.statistics import collect
from alignment.structure import dense_plan
from fusion.repair import REPAIRS
from tests.conftest import rel_err
from tests.tiny_models import build, logits

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("alignment", "fusion")


def _modules():
    for pkg in PACKAGES:
        mod = importlib.import_module(pkg)
        yield mod
        for info in pkgutil.walk_packages(mod.__path__, prefix=pkg + "."):
            yield importlib.import_module(info.name)


# -------------------------------------------------------------------------------------------------
# the contract
def test_unknown_option_raises_and_names_the_valid_ones():
    """A misspelt method option is an error that names it and lists the method's options."""
    a, x = build("mlp", seed=0)
    b, _ = build("mlp", seed=1)
    with pytest.raises(InvalidOptionError, match=r"iteratoins.*iterations"):
        fusion.fuse([a, b], x, method="permute", repair="none", iteratoins=7)
    with pytest.raises(InvalidOptionError, match=r"'emd' or 'sinkhorn'"):
        fusion.fuse([a, b], x, method="ot", repair="none", solver="nonsense")
    with pytest.raises(InvalidOptionError, match="max_iter"):
        fusion.fuse([a, b], x, method="weight_matching", repair="none", max_iter="many")
    with pytest.raises(InvalidOptionError, match="finite"):
        fusion.fuse([a, b], x, method="ot", repair="none", reg=float("nan"))
    with pytest.raises(InvalidOptionError, match="eps"):
        fusion.fuse([a, b], x, repair="repair", repair_options={"epsilon": 1.0})


def test_options_are_checked_before_any_work(monkeypatch):
    """Bad options fail before discovery runs (no expensive work is wasted)."""
    calls = []
    monkeypatch.setattr(fusion.api, "discover_all", lambda *a, **k: calls.append(1))
    a, x = build("mlp")
    with pytest.raises(InvalidOptionError):
        fusion.fuse([a, a], x, method="ot", cost="cosine")
    with pytest.raises(InvalidOptionError):
        fusion.fuse([a, a], x, alpha=[0.5, float("nan")])
    # value ranges too (they were checked inside the methods, after discovery and statistics)
    for method, options in (("ot", {"reg": -1.0}), ("ot", {"sweeps": 0}), ("ot", {"anchor": -1}),
                            ("ot", {"anchor": 5}), ("permute", {"iterations": -1}),
                            ("weight_matching", {"max_iter": 0})):
        with pytest.raises(InvalidOptionError, match=next(iter(options))):
            fusion.fuse([a, a], x, method=method, **options)
        with pytest.raises(InvalidOptionError, match=next(iter(options))):
            fusion.align([a, a], x, method=method, **options)
    assert calls == []


def test_registries_describe_options_and_defaults():
    """`fusion methods` lists every method with its options and defaults (read from signatures)."""
    text = METHODS.describe()
    for name in fusion.list_methods():
        assert text.count(f"\n{name}: ") + text.startswith(f"{name}: ") == 1
    assert "solver = 'emd'  ('emd' or 'sinkhorn')" in text
    assert "iterations = None  (int or None)" in text
    assert "eps = 1e-05" in REPAIRS.describe()


def test_bad_registrations_are_refused_with_the_reason():
    """Guards: a registry refuses a name that is no string or is taken (unless replace=True), a
    non-callable, options without defaults or with a default their annotation does not allow, and
    method options named like fuse's own keywords (they would never reach the method); options
    accept numpy numbers and container types; a blank docstring describes as empty (before: raw
    TypeErrors, silent replacement of built-ins, and an IndexError in `fusion methods`)."""
    import numpy as np

    from alignment.registry import Registry

    reg = Registry("thing")
    for bad in (5, "", "  "):
        with pytest.raises(InvalidOptionError, match="non-empty string"):
            reg.register(bad)
    with pytest.raises(InvalidOptionError, match="not callable"):
        reg.register("x")(42)

    def no_default(ctx, *, k: int): ...
    with pytest.raises(InvalidOptionError, match="keyword-only with defaults"):
        reg.register("x")(no_default)

    def wrong_default(ctx, *, k: int = "abc"): ...
    with pytest.raises(InvalidOptionError, match="its default"):
        reg.register("x")(wrong_default)

    def ok(ctx, *, n: int = 1, r: float = 0.5, ks: list | None = None, flag: bool = False):
        """   """
    reg.register("x")(ok)
    with pytest.raises(InvalidOptionError, match="registered already"):
        reg.register("x")(ok)
    reg.register("x", replace=True)(ok)
    assert reg.validate("x", {"n": np.int64(3), "r": np.float32(0.25), "ks": [1, 2]}) == {
        "n": 3, "r": 0.25, "ks": [1, 2], "flag": False}
    assert "x: " in reg.describe()
    with pytest.raises(InvalidOptionError, match="registered already"):
        alignment.methods.register_method("permute")
    with pytest.raises(InvalidOptionError, match="'seed'"):
        alignment.methods.register_method("seeded")(lambda ctx, *, seed=0: None)
    assert set(alignment.methods.CALL_KEYWORDS) == (set(inspect.signature(fusion.fuse).parameters)
                                                    | set(inspect.signature(fusion.align).parameters)) - {"options"}


def test_notes_a_method_returns_reach_the_report_and_are_warned():
    """Guards: a custom method that returns notes in its MatchResult (not through ctx.note) has them
    listed in the fusion report and warned (before: match replaced them with ctx.notes)."""
    from alignment.methods import METHODS, MatchResult

    @alignment.methods.register_method("identity-noted-test")
    def _identity(ctx):
        plans = [{s.name: torch.eye(s.width, dtype=torch.float64) for s in g.spaces if s.members}
                 for g in ctx.graphs]
        return MatchResult(plans=plans, notes=["identity-noted-test: nothing was matched"])

    try:
        a, x = build("mlp")
        with pytest.warns(FallbackWarning, match="nothing was matched"):
            fused = fusion.fuse([a, a], x, method="identity-noted-test", repair="none")
        assert "identity-noted-test: nothing was matched" in fused.fusion_report.fallbacks
    finally:
        METHODS._entries.pop("identity-noted-test", None)


def test_an_alignment_builds_with_the_heads_given_to_align():
    """Guards: align(..., heads='separate') of models with 5 and 7 classes builds separate heads by
    default, and a merged build is a HeadsError naming the class counts (before: a raw size error)."""
    import timm

    from fusion.engine import HeadsError

    torch.manual_seed(0)
    a = timm.create_model("resnet18", pretrained=False, num_classes=5, in_chans=1, channels=(8, 16, 32, 64)).eval()
    b = timm.create_model("resnet18", pretrained=False, num_classes=7, in_chans=1, channels=(8, 16, 32, 64)).eval()
    cal = torch.randn(16, 1, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        al = fusion.align([a, b], cal, heads="separate")
        assert al.build(0.5)(cal).shape == (16, 12)
        with pytest.raises(HeadsError, match="5, 7 outputs"):
            al.build(0.5, heads="merged")
        with pytest.raises(HeadsError, match="5, 7 outputs"):
            fusion.align([a, b], cal).apply(0.5)


def test_every_exception_class_derives_from_fusion_error():
    """Every exception type defined in the packages derives from FusionError; warnings from
    FusionWarning (so a caller can catch everything the toolkit raises on purpose)."""
    seen = 0
    for mod in _modules():
        for _, obj in inspect.getmembers(mod, inspect.isclass):
            if obj.__module__ != mod.__name__ or not issubclass(obj, BaseException):
                continue
            seen += 1
            if issubclass(obj, click.ClickException):
                continue  # the CLI's presentation of errors (exit codes), not an error of its own
            if issubclass(obj, Warning):
                assert issubclass(obj, FusionWarning), f"{mod.__name__}.{obj.__name__}"
            else:
                assert issubclass(obj, FusionError), f"{mod.__name__}.{obj.__name__}"
    assert seen > 10


def test_public_modules_declare_all_and_import_no_private_names_across_packages():
    """Every public module has ``__all__`` naming only things it defines or imports; no module
    imports an underscore name from another package."""
    for mod in _modules():
        if mod.__name__.rsplit(".", 1)[-1].startswith("_"):
            continue
        assert hasattr(mod, "__all__"), mod.__name__
        for name in mod.__all__:
            # (a package's __all__ may name its submodules: `import *` imports them)
            sub = hasattr(mod, "__path__") and importlib.util.find_spec(f"{mod.__name__}.{name}") is not None
            assert hasattr(mod, name) or sub, f"{mod.__name__}.__all__ names missing {name}"
    for path in list((ROOT / "alignment").rglob("*.py")) + list((ROOT / "fusion").rglob("*.py")):
        pkg = path.relative_to(ROOT).parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                other = node.module.split(".")[0]
                if other in PACKAGES and other != pkg:
                    private = [a.name for a in node.names if a.name.startswith("_")]
                    private += [p for p in node.module.split(".")[1:] if p.startswith("_")]
                    assert not private, f"{path}: imports {private} from {node.module}"


def test_fallbacks_are_reported_and_warned(monkeypatch):
    """A space with no activation statistics is compared by its weights: listed in the fusion
    report's fallbacks and warned, not silently left unaligned."""
    a, x = build("mlp", seed=0)
    b, _ = build("mlp", seed=1)
    real = fusion.api.discover_all

    def blind(models, example):
        graphs = real(models, example)
        for g in graphs:
            g.spaces[0].observations = []
        return graphs

    monkeypatch.setattr(fusion.api, "discover_all", blind)
    name = discover(a, x).spaces[0].name
    with pytest.warns(FallbackWarning, match=name):
        fused = fusion.fuse([a, b], x, method="permute", repair="none")
    assert any(name in f and "weights" in f for f in fused.fusion_report.fallbacks)
    assert "fallback" in fused.fusion_report.summary()


# -------------------------------------------------------------------------------------------------
# runner and statistics
def test_statistics_merge_of_two_halves_equals_the_whole():
    """Statistics are sums: collected on two halves and merged, they equal one pass over all data."""
    a, x = build("cnn", seed=0)
    b, _ = build("cnn", seed=1)
    graphs = [discover(a, x), discover(b, x)]
    data = torch.randn(48, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    # float64 products: the property is that sums merge (float32 rounding is tested elsewhere)
    whole = collect([a, b], graphs, data, precision="float64")
    merged = collect([a, b], graphs, data[:20], precision="float64").merge(
        collect([a, b], graphs, data[20:], precision="float64"))
    assert merged.samples == whole.samples == 48
    for name, pts in whole.points.items():
        for p, q in zip(pts, merged.points[name]):
            assert p.count == q.count
            assert (p.s2 - q.s2).abs().max() <= 1e-10 * p.s2.abs().max()
            assert (p.mean() - q.mean()).abs().max() <= 1e-10 * p.mean().abs().max().clamp_min(1)
        cov = whole.covariance(name)
        assert (cov - merged.covariance(name)).abs().max() <= 1e-10 * cov.abs().max()


class _Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.drop = nn.Dropout(0.5)
        self.seen = []

    def forward(self, x):
        self.seen.append((self.training, self.drop.training, x.shape[0]))
        return self.drop(self.lin(x))


def test_runner_accepts_every_batch_form_and_restores_modes():
    """Tensors, datasets, DataLoaders with a sampler, (x, y) pairs and dict batches all stream the
    same inputs; models run in eval mode and get their own flags back, even after an error."""
    x = torch.randn(10, 4)
    y = torch.arange(10)
    ds = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, sampler=torch.utils.data.SequentialSampler(ds))
    dicts = [{"label": y[i:i + 4], "pixel_values": x[i:i + 4]} for i in range(0, 10, 4)]
    for data in (x, ds, loader, [(x[:5], y[:5]), (x[5:], y[5:])], dicts):
        assert torch.equal(torch.cat(list(batches(data))), x)
    m = _Flagged()
    m.train()
    m.drop.eval()
    assert stream([m], loader) == 10
    assert all(not t and not d for t, d, _ in m.seen)
    assert m.training and not m.drop.training
    with pytest.raises(RuntimeError):
        stream([m], loader, on_batch=lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
    assert m.training and not m.drop.training


def test_runner_cuts_tensors_and_datasets_into_no_batch_of_one_sample():
    """Guards: 257 samples were cut into 256 + 1, and BatchNorm1d in training mode refuses a batch of
    one (a raw ValueError from the BatchNorm reset after all the fusion work); the last 257 samples
    are now shared by the last two batches, every other batch keeps the batch size, and every
    sample is streamed once, in order."""
    for n, sizes in ((256, [256]), (257, [128, 129]), (513, [256, 128, 129]), (258, [256, 2]), (1, [1])):
        x = torch.randn(n, 3)
        for data in (x, torch.utils.data.TensorDataset(x)):
            got = list(batches(data))
            assert [len(b) for b in got] == sizes
            assert torch.equal(torch.cat(got), x)
    assert [len(b) for b in batches(torch.randn(9, 3), batch_size=4)] == [4, 2, 3]


class _BN1d(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.bn, self.fc2 = nn.Linear(16, 12), nn.BatchNorm1d(12), nn.Linear(12, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def test_a_batchnorm_reset_leaves_out_a_batch_of_one_sample_and_reports_it():
    """Guards: a DataLoader or a list whose last batch holds one sample crashed the BatchNorm reset
    of a BatchNorm1d model with a raw ValueError after all the fusion work, and a tensor of 257
    samples did too (the runner's own 256 + 1). Now a tensor fuses with no fallback; a batch of one
    sample is left out of the reset (the statistics are those of the other batches) and reported
    as a fallback (warned, in the fusion report), for BatchNorm1d and BatchNorm2d alike."""
    from fusion.repair import reset_bn

    a, b = _BN1d(0).eval(), _BN1d(1).eval()
    x = torch.randn(257, 16, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        assert fusion.fuse([a, b], x).fusion_report.fallbacks == []
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:9]), batch_size=4)
    for data in (loader, [x[:4], x[4:8], x[8:9]]):
        with pytest.warns(FallbackWarning, match=r"last calibration batch \(1 sample\) was left out of the BatchNorm"):
            fused = fusion.fuse([a, b], data)
        assert any("left out of the BatchNorm reset" in f for f in fused.fusion_report.fallbacks)
        assert torch.isfinite(fused(x)).all()
    # the reset's statistics are those of the batches of two or more samples
    notes: list[str] = []
    got = reset_bn(copy.deepcopy(a), [x[:4], x[4:5], x[5:9], x[9:10]], notes=notes)
    want = reset_bn(copy.deepcopy(a), [x[:4], x[5:9]])
    assert torch.equal(got.bn.running_mean, want.bn.running_mean)
    assert torch.equal(got.bn.running_var, want.bn.running_var)
    assert len(notes) == 1 and "2 calibration batches of 1 sample (batch 1, 3) were left out" in notes[0]
    bn2d = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.warns(FallbackWarning, match="last calibration batch"):
        reset_bn(bn2d, [torch.randn(3, 1, 6, 6), torch.randn(1, 1, 6, 6)])
    with pytest.raises(CalibrationError, match="only batches of one sample"):
        reset_bn(copy.deepcopy(a), [x[:1], x[1:2]])


def test_a_collate_of_dict_and_labels_is_read_as_a_dict_batch():
    """Guards: a collate returning ``({"pixel_values": x}, y)`` was refused with a message that
    listed both "(input, label) pairs" and "dicts with 'pixel_values'" as accepted; the dict of
    such a pair is now read as a dict batch. A list of per-sample dicts is no pair: still refused,
    naming what the batch holds."""
    from alignment.runner import batch_input

    x, y = torch.randn(10, 1, 8, 8), torch.randint(0, 10, (10,))

    def collate(items):
        return {"pixel_values": torch.stack([i[0] for i in items])}, torch.stack([i[1] for i in items])

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, collate_fn=collate)
    assert torch.equal(torch.cat(list(batches(loader))), x)
    assert torch.equal(torch.cat(list(batches([({"image": x[:5]}, y[:5]), ({"image": x[5:]}, y[5:])]))), x)
    a, _ = build("mlp", seed=0)
    b, _ = build("mlp", seed=1)
    assert fusion.fuse([a, b], loader).fusion_report.calibration_samples == 10
    with pytest.raises(CalibrationError, match=r"type list \(its first element is a dict\)"):
        batch_input([{"pixel_values": x[0]}, {"pixel_values": x[1]}])


def test_runner_rejects_one_input_label_pair_but_reads_two_batches_and_lists():
    """Guards: one ``(x, y)`` tuple given as the calibration data was read as two batches (a dtype
    error naming batch 1, or a raw conv error for float labels); it is refused as a pair like a
    single dict batch. A tuple of two input batches and a list of pairs still stream."""
    x, y = torch.randn(10, 1, 8, 8), torch.randint(0, 10, (10,))
    for pair in ((x, y), (x, torch.softmax(torch.randn(10, 10), 1)), (x, y > 4)):
        with pytest.raises(CalibrationError, match=r"one \(inputs, labels\) pair.*\[\(x, y\)\]"):
            list(batches(pair))
    assert [len(b) for b in batches((x, x))] == [10, 10]
    assert [len(b) for b in batches([(x, y)])] == [10]
    assert [len(b) for b in batches([x, y.float()])] == [10, 10]  # (a list is batches: its error comes later)


def test_runner_rejects_unusable_calibration_data():
    """One-shot generators (consumed by the first pass) and batches without an input are errors."""
    gen = (torch.randn(2, 4) for _ in range(3))
    with pytest.raises(CalibrationError, match="one-shot"):
        list(batches(gen))
    with pytest.raises(CalibrationError, match="model input"):
        list(batches([{"label": torch.arange(3)}]))
    with pytest.raises(CalibrationError, match="no samples"):
        list(batches(torch.zeros(0, 4)))


def test_graph_topology_lists_producers_and_consumers_in_execution_order(tiny):
    """Each space knows the modules that write and read it, in the order the forward runs them."""
    model, x = tiny("timm_resnet18")
    g = discover(model, x)
    assert g.modules.index("conv1") < g.modules.index("layer1.0.conv1") < g.modules.index("fc")
    stem = g["conv1"]
    assert stem.producers == ["conv1"]
    assert stem.consumers == ["layer1.0.conv1", "layer1.0.downsample.0"]
    stream = g["layer1.0.conv2"]  # the residual stream of layer1: written by both blocks and the shortcut
    assert stream.producers == ["layer1.0.conv2", "layer1.0.downsample.0", "layer1.1.conv2"]
    assert stream.consumers[0] == "layer1.1.conv1" and "layer2.0.conv1" in stream.consumers
    for s in g.spaces:
        for mods in (s.producers, s.consumers):
            order = [g.modules.index(p) for p in mods]
            assert order == sorted(order), s.name
    assert g.layer_spaces("layer1.0.conv1") == (["conv1"], ["layer1.0.conv1"])


# -------------------------------------------------------------------------------------------------
# methods
@pytest.mark.parametrize("method", ["ot", "merge"])
def test_non_uniform_alpha_changes_the_result_and_matches_the_formula(method):
    """With weights alpha, fused tensors are sum_i M_i W_i U_i with M_i = alpha_i T_i / rowsum(T_i),
    renormalised over the models matching each fused unit, and U_i the column-normalised T_i^T."""
    a, x = build("mlp", seed=0)
    b, _ = build("mlp", seed=1)
    cal = torch.randn(128, *x.shape[1:], generator=torch.Generator().manual_seed(2))
    al = fusion.align([a, b], cal, method=method, width=0.75 if method == "merge" else None)
    alpha = [0.3, 0.7]
    fused = al.apply(alpha)
    uniform = al.apply([0.5, 0.5])
    assert not torch.allclose(fused.fc1.weight, uniform.fc1.weight)
    maps = {}
    for name in al.plans[0]:
        Ts = [dense_plan(p[name]) for p in al.plans]  # (permutations are kept as RowPlans)
        present = [(T.sum(1) > 0).double() for T in Ts]
        w = sum(ai * p for ai, p in zip(alpha, present))
        M = [ai * T / T.sum(1, keepdim=True).clamp_min(1e-300) / w[:, None] for ai, T in zip(alpha, Ts)]
        U = [(T / T.sum(0, keepdim=True).clamp_min(1e-300)).t() for T in Ts]
        from alignment.maps import SpaceMap

        maps[name] = SpaceMap(M, U)
    want = fuse_tensors([model_tensors(a), model_tensors(b)], al.graphs, maps, alpha)
    for k, v in model_tensors(fused).items():
        if k in want:
            torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["ot", "merge"])
def test_same_seed_gives_identical_weights(method):
    """Fusion is deterministic for a seed (barycenter seeding and merging included)."""
    a, x = build("cnn", seed=0)
    b, _ = build("cnn", seed=1)
    cal = torch.randn(32, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    f1 = fusion.fuse([a, b], cal, method=method, repair="none", width=0.5, seed=3)
    f2 = fusion.fuse([a, b], cal, method=method, repair="none", width=0.5, seed=3)
    for (k, v), w in zip(model_tensors(f1).items(), model_tensors(f2).values()):
        assert torch.equal(v, w), k


def test_square_and_rectangular_permute_agree_and_equal_the_hungarian_solution():
    """`permute` without a target and with a separately built target of the same widths give the
    same weights, and each plain space's matching is scipy's assignment on the correlation block."""
    from tests.tiny_models import TinyMLP

    a, x = build("mlp", seed=0)
    b, _ = build("mlp", seed=1)
    cal = torch.randn(256, *x.shape[1:], generator=torch.Generator().manual_seed(4))
    plain = fusion.align([a, b], cal, method="permute")
    rect = fusion.align([a, b], cal, method="permute", target=TinyMLP().eval())
    for k, v in model_tensors(plain.apply()).items():
        assert torch.equal(v, model_tensors(rect.apply())[k]), k
    stats = plain.statistics
    for name in stats.points:
        C = stats.block(stats.correlation(name), name, 0, 1).numpy()
        r, c = linear_sum_assignment(C, maximize=True)
        assert np.array_equal(plain.result.permutations(1)[name].numpy()[r], c), name


def test_merge_many_rematching_changes_and_does_not_worsen_the_pairwise_objective():
    """With three different models, MergeMany rounds (iterations) rematch every model against the
    others; the summed pairwise correlation of matched units does not drop."""
    models = [build("mlp", seed=s)[0] for s in (0, 1, 2)]
    x = build("mlp")[1]
    cal = torch.randn(256, *x.shape[1:], generator=torch.Generator().manual_seed(5))

    def objective(al):
        total = 0.0
        for name in al.statistics.points:
            C = al.statistics.correlation(name)
            perms = [al.result.permutations(i)[name] for i in range(3)]
            for i in range(3):
                for j in range(i + 1, 3):
                    total += float(al.statistics.block(C, name, i, j)[perms[i], perms[j]].sum())
        return total

    once = fusion.align(models, cal, method="permute", iterations=0)
    many = fusion.align(models, cal, method="permute", iterations=3)
    assert any(not torch.equal(once.result.permutations(i)[n], many.result.permutations(i)[n])
               for i in range(3) for n in once.statistics.points)
    assert objective(many) >= objective(once) - 1e-9


def test_graphs_are_discovered_once_per_architecture_and_reuse_gives_the_same_fusion(monkeypatch):
    """Models of one architecture share one discovered graph, and the fused weights are those of
    fusing with a graph discovered per model."""
    disc = importlib.import_module("alignment.discover")  # the module (the package exports a function of that name)
    models = [build("cnn", seed=s)[0] for s in (0, 1, 2)]
    x = build("cnn")[1]
    cal = torch.randn(32, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    calls = []
    real = disc.discover
    monkeypatch.setattr(disc, "discover", lambda m, e: calls.append(1) or real(m, e))
    shared = fusion.align(models, cal, method="permute")
    assert len(calls) == 1 and shared.graphs[0] is shared.graphs[2]
    monkeypatch.setattr(fusion.api, "discover_all", lambda ms, e: [real(m, e) for m in ms])
    separate = fusion.align(models, cal, method="permute")
    assert separate.graphs[0] is not separate.graphs[1]
    for (k, v), w in zip(model_tensors(shared.apply()).items(), model_tensors(separate.apply()).values()):
        assert torch.equal(v, w), k


def test_a_graph_is_shared_only_by_models_with_the_same_settings():
    """Guards: equal tensor shapes are not one architecture. A timm ViT with 8 heads has the shapes of
    one with 4; it shared the 4-head graph, and fusing it mixed dims of different heads (no error)."""
    from alignment.discover import same_structure
    from tests.tiny_models import timm_vit

    four, four_b, eight = timm_vit(heads=4), timm_vit(heads=4), timm_vit(heads=8)
    assert same_structure(four, four_b)
    assert [tuple(p.shape) for p in four.parameters()] == [tuple(p.shape) for p in eight.parameters()]
    assert not same_structure(four, eight)
    from alignment.discover import discover_all

    graphs = discover_all([four, eight], torch.randn(2, 1, 28, 28))
    heads = [[s.width for s in g.spaces if s.kind == "heads"] for g in graphs]
    assert heads == [[4, 4], [8, 8]]


def test_activation_matching_copies_the_weights_only_for_units_the_data_cannot_tell_apart(monkeypatch):
    """Matching on activations reads the models' weights (a float64 copy of every parameter: the
    size of both models again) only to tell apart units the data cannot: with none, no copy is
    made; with dead units, the copy is made and they are matched by their weights."""
    from alignment.methods import MatchContext

    calls = []
    real = MatchContext.tensors
    monkeypatch.setattr(MatchContext, "tensors", lambda self: calls.append(1) or real(self))
    model, x = build("timm_vit", seed=0)
    graph = discover(model, x)
    other = alignment.permute(model, graph, graph.random_permutations(seed=1))
    cal = torch.randn(32, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    fusion.align([model, other], cal, method="permute")
    assert not calls
    dead = [copy.deepcopy(m) for m in (model, other)]
    with torch.no_grad():
        for m in dead:
            m.blocks[0].mlp.fc1.weight[:4] = 0.0
            m.blocks[0].mlp.fc1.bias[:4] = 0.0  # four units constant (0) in each model
    fusion.align(dead, cal, method="permute")
    assert calls


@pytest.mark.parametrize("name", ["mlp", "cnn", pytest.param("timm_resnet18", marks=pytest.mark.slow)])
def test_fusing_a_widened_copy_across_widths_keeps_the_function(name):
    """Fusing a model with its widened copy (same function, every unit duplicated) into the narrow
    width gives back the model's function, with OT and with merging (which pair the copies)."""
    from fusion.resize import resize

    model, x = build(name, seed=0)
    wide = resize(model, 2.0, x)
    cal = torch.randn(256, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    for method in ("ot", "merge"):
        fused = fusion.fuse([model, wide], cal, method=method, repair="none", target=model)
        with torch.no_grad():
            assert rel_err(logits(model(cal[:8])), logits(fused(cal[:8]))) < 1e-5, method


def test_fuse_frees_its_statistics_and_grams_without_the_cyclic_collector():
    """Property: once ``fuse`` returns, its statistics, Grams and walks are freed by reference
    counting (no reference cycle keeps them: on wide models they are gigabytes held until the
    cyclic collector happens to run)."""
    import gc

    from alignment import discover, permute
    from alignment.statistics import PointStats
    from alignment.structure import GramView, Walk
    from tests.tiny_models import build

    model, x = build("timm_vit")
    g = discover(model, x)
    copy = permute(model, g, g.random_permutations(seed=1))
    cal = torch.randn(32, *x.shape[1:], generator=torch.Generator().manual_seed(0))

    def alive():
        return sum(isinstance(o, (PointStats, GramView, Walk)) for o in gc.get_objects())

    gc.collect()
    before = alive()
    gc.disable()
    try:
        fused = fusion.fuse([model, copy], cal, method="permute", repair="none")
        after = alive()
    finally:
        gc.enable()
    assert fused is not None and after == before


def _mixer_with_dead_units(seed: int) -> nn.Module:
    """A small MLP-Mixer: its token-mixing hidden spaces have no observation point (their other
    axes are channels), so their Grams come from weights and read the neighbouring spaces' plans;
    a third of one channel MLP's hidden units never fire (compared by weights too)."""
    from timm.models.mlp_mixer import MlpMixer

    torch.manual_seed(seed)
    model = MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=48).eval()
    with torch.no_grad():
        model.blocks[0].mlp_channels.fc1.bias[::3] = -100.0
    return model


@pytest.mark.parametrize("method, options", [
    ("permute", {}), ("ot", {}), ("merge", {}), ("zip", {}), ("weight_matching", {}), ("ot", {"cost": "weights"}),
])
def test_leaf_solves_on_threads_give_the_sequential_plans(method, options):
    """Workers run leaf solves while the walk builds the next Grams; Grams that read a neighbour's
    plan (weight Grams, dead units) must wait for it, so the plans, costs and notes are those of a
    sequential walk, bit for bit."""
    from alignment.methods import MatchContext, match

    models = [_mixer_with_dead_units(0), _mixer_with_dead_units(1)]
    x = torch.randn(32, 3, 32, 32)
    graphs = [discover(m, x[:2]) for m in models]
    cache = {}

    def statistics(pairs=None):
        if pairs not in cache:
            cache[pairs] = collect(models, graphs, x, pairs=pairs)
        return cache[pairs]
    out = []
    for workers in (1, 3):
        ctx = MatchContext(models, graphs, [0.5, 0.5], statistics=statistics, workers=workers)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FallbackWarning)
            out.append((match(ctx, method, **options), ctx.notes))
    (seq, seq_notes), (par, par_notes) = out
    if method not in ("weight_matching",) and options.get("cost") != "weights":
        assert any("no observation point" in n for n in seq_notes)  # the case guarded: weight Grams
    assert set(seq.plans[0]) == set(par.plans[0])
    for i in range(2):
        for name in seq.plans[i]:
            assert torch.equal(dense_plan(seq.plans[i][name]), dense_plan(par.plans[i][name])), (i, name)
    assert seq.costs.keys() == par.costs.keys()
    assert all(np.isclose(seq.costs[k], par.costs[k], rtol=0, atol=0, equal_nan=True) for k in seq.costs)
    assert sorted(seq_notes) == sorted(par_notes)


def _patched_ot_leaf(monkeypatch, before):
    """``alignment.methods.ot_leaf`` calling ``before(leaf)`` first; and a function giving the
    match context of two small Mixers with ``workers`` threads."""
    import alignment.methods as methods

    original = methods.ot_leaf

    def wrapped(leaf, **kw):
        before(leaf)
        return original(leaf, **kw)
    monkeypatch.setattr(methods, "ot_leaf", wrapped)
    models = [_mixer_with_dead_units(0), _mixer_with_dead_units(1)]
    x = torch.randn(16, 3, 32, 32)
    graphs = [discover(m, x[:2]) for m in models]
    stats = collect(models, graphs, x)
    return lambda workers: methods.MatchContext(models, graphs, [0.5, 0.5], statistics=lambda pairs=None: stats,
                                                workers=workers)


def test_leaf_solves_run_on_worker_threads(monkeypatch):
    """With workers, plain-leaf spaces are solved off the calling thread (the Hungarian and exact
    transport solvers release the GIL: ViT-B/16's 3,072-unit spaces solve about twice as fast on two
    cores); with one worker everything stays on the calling thread."""
    import threading

    from alignment.methods import match

    seen = []
    context = _patched_ot_leaf(monkeypatch, lambda leaf: seen.append(threading.current_thread().name))
    for workers, pooled in ((1, False), (2, True)):
        seen.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FallbackWarning)
            match(context(workers), "ot")
        assert seen and any(n.startswith("walk-leaf") for n in seen) == pooled, (workers, seen)


def test_an_error_in_a_leaf_solve_on_a_worker_thread_reaches_the_caller(monkeypatch):
    """A solver that fails on a pool thread raises its own exception from ``match`` (not a wrapped
    or swallowed one), and the pool's threads are gone."""
    import threading

    from alignment.errors import SpaceMismatchError
    from alignment.methods import match

    def failing(leaf):
        if leaf.space == "blocks.1.mlp_channels.fc1":
            raise SpaceMismatchError(f"refused {leaf.space}")
    context = _patched_ot_leaf(monkeypatch, failing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        with pytest.raises(SpaceMismatchError, match="refused blocks.1.mlp_channels.fc1"):
            match(context(2), "permute")
    assert not [t for t in threading.enumerate() if t.name.startswith("walk-leaf")]


def test_stage_functions_name_bad_arguments_with_fusion_errors(tiny):
    """Guards: the stages called one by one raise FusionErrors naming the argument: collect's
    precision, positions_per_image and points, plan_maps' weight count and negative plans, a method
    run without statistics (CalibrationError), and a budget without calibration data (before:
    ValueErrors, and a budget blamed on the method after matching)."""
    from alignment.maps import plan_maps
    from alignment.statistics import collect

    model, x = tiny("mlp")
    g = discover(model, x)
    for kw in ({"precision": "float16"}, {"positions_per_image": 0}, {"points": "nope"}):
        with pytest.raises(InvalidOptionError, match=next(iter(kw))):
            collect([model], [g], x, **kw)
    eye = torch.eye(3, dtype=torch.float64)
    with pytest.raises(InvalidOptionError, match="1 interpolation weights for 2 plans"):
        plan_maps([eye, eye], [1.0])
    with pytest.raises(FusionError, match="negative"):
        plan_maps([eye, -eye], [0.5, 0.5])
    with pytest.raises(CalibrationError, match="budget"):
        fusion.fuse([model, model], None, method="weight_matching", budget=1.2, example_input=x)
    with pytest.raises(CalibrationError, match="activation statistics"):
        fusion.fuse([model, model], None, method="permute", example_input=x, repair="none")
    # data-free weight matching with the default repair: nothing to reset in an MLP, so no data needed;
    # a BatchNorm network's reset needs data
    assert fusion.fuse([model, model], None, method="weight_matching", example_input=x).fusion_report.repaired == "none"
    cnn, xc = tiny("timm_resnet18")
    with pytest.raises(CalibrationError, match="repair='auto'"):
        fusion.fuse([cnn, cnn], None, method="weight_matching", example_input=xc)


def test_an_ot_anchor_beyond_the_models_is_refused_by_the_options_check(monkeypatch):
    """Guards: ``anchor=`` past the last model is refused by the registry's check with the number
    of models (``validate(..., models=n)``, which ``match`` passes), before the family checks and
    any statistics, naming the valid range (before: only inside the method, after discovery and
    the family checks). Check hooks that declare ``given``/``models`` receive them; one-argument
    hooks are called as before."""
    from alignment.methods import MatchContext, match
    from alignment.registry import Registry

    with pytest.raises(InvalidOptionError, match=r"anchor=2 is not a model index \(0\.\.1 for 2 models\)"):
        METHODS.validate("ot", {"anchor": 2}, models=2)
    assert METHODS.validate("ot", {"anchor": 1}, models=2)["anchor"] == 1
    assert METHODS.validate("ot", {"anchor": 2})["anchor"] == 2  # the count unknown: the method checks it
    a, x = build("mlp")
    g = discover(a, x)
    family, stats = [], []
    monkeypatch.setattr(alignment.methods, "_require_family", lambda ctx: family.append(1))
    ctx = MatchContext(models=[a, a], graphs=[g, g], alpha=[0.5, 0.5], statistics=lambda **k: stats.append(1))
    with pytest.raises(InvalidOptionError, match="anchor=5"):
        match(ctx, "ot", anchor=5)
    assert family == [] and stats == []

    seen = []
    reg = Registry("thing")

    def full(options, *, given, models):
        seen.append((dict(options), given, models))

    reg.register("full", check=full)(lambda ctx, *, n=1, r=0.5: None)
    reg.register("plain", check=lambda options: seen.append(dict(options)))(lambda ctx, *, n=1: None)
    reg.validate("full", {"r": 0.25}, models=3)
    reg.validate("plain", {"n": 2}, models=3)
    assert seen == [({"n": 1, "r": 0.25}, frozenset({"r"}), 3), {"n": 2}]


def test_a_custom_methods_result_is_checked_and_its_plans_converted():
    """Guards: what a registered method returns is checked once, in ``match``, with errors naming the
    method, model and space (before: a KeyError in Alignment.maps for a missing space, an
    AttributeError for a list returned or numpy plans, a NotImplementedError for sparse plans);
    numpy, nested-list, sparse and integer plans give the fused weights of the dense float64 plans,
    and built-in methods' plans come back as the very objects the method made."""
    from alignment.errors import MethodResultError, SpaceMismatchError
    from alignment.methods import MatchContext, MatchResult, get_method, match

    def base(ctx):
        return get_method("permute")(ctx)

    def first(r):
        return sorted(r.plans[0])[0]

    def missing(ctx):
        r = base(ctx)
        r.plans[1].pop(first(r))
        return r

    def narrow(ctx):
        r = base(ctx)
        k = first(r)
        r.plans[1][k] = dense_plan(r.plans[1][k])[:, :-1]
        return r

    def one(ctx):
        r = base(ctx)
        r.plans = r.plans[:1]
        return r

    def converted(form):
        def method(ctx):
            r = base(ctx)
            return MatchResult(plans=[{k: form(dense_plan(v)) for k, v in p.items()} for p in r.plans], costs=r.costs)
        return method

    registered = {
        "result-test-missing": missing, "result-test-narrow": narrow, "result-test-one": one,
        "result-test-list": lambda ctx: base(ctx).plans, "result-test-vector": converted(lambda T: T.argmax(1)),
        "result-test-numpy": converted(lambda T: T.numpy()), "result-test-lists": converted(lambda T: T.tolist()),
        "result-test-sparse": converted(lambda T: T.to_sparse()), "result-test-bool": converted(lambda T: T.bool()),
        "result-test-float32": converted(lambda T: T.float()),
    }
    for name, fn in registered.items():
        alignment.methods.register_method(name)(fn)
    try:
        a, x = build("mlp", seed=0)
        b, _ = build("mlp", seed=1)
        space = discover(a, x).spaces[0].name
        refused = {
            "result-test-missing": rf"method 'result-test-missing' gave model 1 no plan for space\(s\) \['{space}'\]",
            "result-test-narrow": rf"method 'result-test-narrow': the plan of space '{space}' for model 1 has shape",
            "result-test-one": r"method 'result-test-one' returned 1 plan dict\(s\) for 2 models",
            "result-test-list": r"method 'result-test-list' returned a list, not an alignment.methods.MatchResult",
            "result-test-vector": rf"method 'result-test-vector': the plan of space '{space}' for model 0 has shape",
        }
        for name, message in refused.items():
            with pytest.raises(MethodResultError, match=message) as info:
                fusion.fuse([a, b], x, method=name, repair="none")
            assert isinstance(info.value, SpaceMismatchError)
        want = fusion.fuse([a, b], x, method="permute", repair="none").state_dict()
        for name in ("result-test-numpy", "result-test-lists", "result-test-sparse", "result-test-bool",
                     "result-test-float32"):
            al = fusion.align([a, b], x, method=name)
            assert all(isinstance(T, torch.Tensor) and T.layout == torch.strided and T.is_floating_point()
                       for p in al.plans for T in p.values()), name
            got = al.build(repair="none").state_dict()
            assert all(torch.equal(want[k], got[k]) for k in want), name
        # a built-in method's plans are returned as they are (no copy, no conversion)
        graphs = alignment.discover_all([a, b], x)
        made = []
        real = get_method("average")

        def spy(ctx):
            r = real(ctx)
            made.append(r.plans)
            return r
        alignment.methods.register_method("result-test-spy")(spy)
        got = match(MatchContext([a, b], graphs, [0.5, 0.5]), "result-test-spy").plans
        assert all(got[i][k] is made[0][i][k] for i in range(2) for k in made[0][i])
    finally:
        for name in list(registered) + ["result-test-spy"]:
            METHODS._entries.pop(name, None)


def test_match_seconds_leave_out_statistics_collection():
    """Guards: ``MatchResult.seconds`` is the time of matching alone, as documented (before: match
    timed the whole call, and statistics are collected lazily inside it); the collection time is
    ``MatchContext.collect_seconds``."""
    import time

    from alignment.methods import MatchContext, MatchResult, match

    a, x = build("mlp", seed=0)
    b, _ = build("mlp", seed=1)
    graphs = alignment.discover_all([a, b], x)
    stats = collect([a, b], graphs, x)

    @alignment.methods.register_method("seconds-test")
    def _reads_statistics(ctx):
        ctx.stats()  # (all the time of this method is in collecting)
        return MatchResult(plans=[{s.name: torch.eye(s.width, dtype=torch.float64) for s in g.spaces if s.members}
                                  for g in ctx.graphs])

    def slow(pairs=None):
        time.sleep(0.5)
        return stats
    try:
        ctx = MatchContext([a, b], graphs, [0.5, 0.5], statistics=slow)
        result = match(ctx, "seconds-test")
        assert ctx.collect_seconds >= 0.5
        assert 0 <= result.seconds < 0.25
    finally:
        METHODS._entries.pop("seconds-test", None)


def test_discover_all_is_exported_from_alignment():
    """Guards: the README's ``alignment.discover_all`` exists (before: only alignment.discover.discover_all)."""
    import sys

    assert "discover_all" in alignment.__all__ and "MethodResultError" in alignment.__all__
    assert alignment.discover_all is sys.modules["alignment.discover"].discover_all
