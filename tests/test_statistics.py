"""Streaming activation statistics."""

from __future__ import annotations

import pytest
import torch

from alignment import discover
from alignment.statistics import PointStats, add_gram, collect, observation_points
from alignment.structure import plans_equal
from tests.tiny_models import build


def _features(model, module, io, x, ob):
    mods = dict(model.named_modules())
    got = {}
    # copies (an in-place activation later in the pass would change what was read); the hooks
    # return None (a value returned would replace the module's output or inputs)
    def keep(t):
        got.setdefault("t", t.clone())

    if io == "output":
        h = mods[module].register_forward_hook(lambda m, i, o: keep(o))
    else:
        h = mods[module].register_forward_pre_hook(lambda m, i: keep(i[0]))
    with torch.no_grad():
        model(x)
    h.remove()
    t = got["t"].movedim(ob.dim, -1)
    return t.reshape(-1, t.shape[-1])[:, ob.start:ob.stop].double()


def test_streaming_statistics_equal_full_batch():
    a, _ = build("timm_resnet18", seed=0)
    b, _ = build("timm_resnet18", seed=1)
    x = torch.randn(40, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    ga, gb = discover(a, x[:2]), discover(b, x[:2])
    batches = [x[i:i + 7] for i in range(0, 40, 7)]  # uneven batches
    stats = collect([a, b], [ga, gb], batches, precision="float64")
    assert stats.samples == 40
    name = "layer2.0.conv1"
    obs_a = observation_points(ga[name], ga)
    obs_b = observation_points(gb[name], gb)
    assert len(stats.points[name]) == len(obs_a)
    ps = stats.points[name][0]
    fa = _features(a, obs_a[0].module, obs_a[0].io, x, obs_a[0])
    fb = _features(b, obs_b[0].module, obs_b[0].io, x, obs_b[0])
    f = torch.cat([fa, fb], 1)
    assert ps.count == f.shape[0]  # every spatial position counts
    torch.testing.assert_close(ps.mean(), f.mean(0))
    cov = (f - f.mean(0)).t() @ (f - f.mean(0)) / f.shape[0]
    torch.testing.assert_close(ps.covariance(), cov, rtol=1e-9, atol=1e-10)
    corr = torch.corrcoef(f.t())
    live = torch.isfinite(corr)  # dead (constant) units: corrcoef is NaN, ours is 0
    assert live.float().mean() > 0.5
    torch.testing.assert_close(ps.correlation()[live], corr[live], rtol=1e-6, atol=1e-6)
    assert bool((ps.correlation()[~live] == 0).all())
    assert stats.block(stats.correlation(name), name, 0, 1).shape == (32, 32)


def test_vit_tokens_are_samples_and_models_are_untouched():
    m, x = build("timm_vit")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    g = discover(m, x)
    stats = collect([m], [g], torch.randn(5, 1, 28, 28))
    ps = stats.points["blocks.0.mlp.fc1"][0]
    assert ps.count == 5 * 17  # 16 patches + class token per image
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert not m.training


def test_statistics_keep_no_activations(monkeypatch):
    """Collection memory is bounded by the sums: no feature tensor of any batch outlives its update
    (a collector that stored activations would keep them alive)."""
    import gc
    import weakref

    from alignment.statistics import PointStats

    refs = []
    real = PointStats.products

    def spy(self, feats, **kw):
        refs.extend(weakref.ref(f) for f in feats)
        return real(self, feats, **kw)

    monkeypatch.setattr(PointStats, "products", spy)
    m, x = build("mlp")
    g = discover(m, x)
    stats = collect([m], [g], [torch.randn(4, 1, 8, 8) for _ in range(20)])
    gc.collect()
    assert stats.samples == 80 and len(refs) >= 20
    assert not [r for r in refs if r() is not None]


def test_float32_products_stay_within_1e6_of_float64():
    """Per-batch products in float32, summed in float64: sums, means and covariances within 1e-6
    (relative, Frobenius) of the all-float64 path, at every point of a ResNet and a ViT."""
    for name in ("timm_resnet18", "timm_vit"):
        a, x = build(name, seed=0)
        b, _ = build(name, seed=1)
        data = torch.randn(32, *x.shape[1:], generator=torch.Generator().manual_seed(4))
        graphs = [discover(a, x), discover(b, x)]
        s64 = collect([a, b], graphs, data, precision="float64")
        s32 = collect([a, b], graphs, data)
        assert s32.precision == "float32" and set(s32.points) == set(s64.points)
        for space, pts in s64.points.items():
            for p, q in zip(pts, s32.points[space]):
                for u, v in ((p.mean(), q.mean()), (p.s2, q.s2), (p.covariance(), q.covariance())):
                    assert float((u - v).norm()) <= 1e-6 * float(u.norm()), (name, space)
            cov = s64.covariance(space)
            assert float((cov - s32.covariance(space)).norm()) <= 1e-6 * float(cov.norm()), (name, space)


def test_a_tensor_read_at_two_points_is_multiplied_out_once(monkeypatch):
    """A tensor observed at two points of a space (a block's output is the next block's input, a
    module output passed on unchanged) is multiplied out once per batch and added to both points."""
    from alignment.statistics import PointStats

    a, x = build("timm_resnet18", seed=0)
    g = discover(a, x)
    calls = []
    real = PointStats.products

    def spy(self, feats, **kw):
        calls.append(1)
        return real(self, feats, **kw)

    monkeypatch.setattr(PointStats, "products", spy)
    stats = collect([a], [g], [torch.randn(8, *x.shape[1:])])
    n_points = sum(len(v) for v in stats.points.values())
    assert 0 < len(calls) < n_points
    name = "layer1.0.conv2"  # the residual stream of layer1
    pts = stats.points[name]
    same = [(i, j) for i in range(len(pts)) for j in range(i + 1, len(pts)) if torch.equal(pts[i].s2, pts[j].s2)]
    assert same, "expected two observation points reading one tensor"


def test_anchor_pairs_collect_only_what_matching_needs():
    """Collecting only the products with the anchor gives the same cross blocks and variances as the
    joint matrix (and the same fused model), with the other blocks left out."""
    from alignment.methods import MatchContext, match

    models = [build("cnn", seed=s)[0] for s in range(3)]
    x = build("cnn")[1]
    graphs = [discover(m, x) for m in models]
    data = torch.randn(32, *x.shape[1:], generator=torch.Generator().manual_seed(1))
    joint = collect(models, graphs, data)
    anchored = collect(models, graphs, data, pairs=[(0, 1), (0, 2)])
    for space in joint.points:
        J, A = joint.covariance(space), anchored.covariance(space)
        o = joint.offsets(space)
        for i, j in ((0, 1), (0, 2), (1, 0)):
            torch.testing.assert_close(J[o[i]:o[i + 1], o[j]:o[j + 1]], A[o[i]:o[i + 1], o[j]:o[j + 1]],
                                       rtol=1e-5, atol=1e-7)
        # variances: from the self blocks' diagonal, or summed squares (float32 rounding apart)
        torch.testing.assert_close(J.diagonal(), A.diagonal(), rtol=1e-5, atol=1e-7)
        assert not A[o[1]:o[2], o[2]:o[3]].any()
    # the plans permute chooses from the anchored statistics equal those from the joint matrix
    seen = []

    def anchored_stats(pairs=None):
        seen.append(pairs)
        return collect(models, graphs, data, pairs=pairs)

    alpha = [1 / 3] * 3
    res_a = match(MatchContext(models, graphs, alpha, statistics=anchored_stats), "permute", iterations=0)
    res_j = match(MatchContext(models, graphs, alpha, statistics=lambda pairs=None: joint), "permute", iterations=0)
    assert seen and callable(seen[0]) and seen[0](next(iter(joint.points))) == [(0, 1), (0, 2)]
    for i in range(3):
        for k, T in res_j.plans[i].items():
            assert plans_equal(T, res_a.plans[i][k]), k


def test_positions_per_image_subsamples_the_same_positions_in_every_model():
    """positions_per_image=k reads k positions per image (count = images x k at spatial points), the
    same ones in every model: a permuted copy is still matched exactly. The report records k."""
    import fusion
    from alignment import permute
    from tests.conftest import rel_err

    model, x = build("timm_resnet18", seed=0)
    graph = discover(model, x)
    other = permute(model, graph, graph.random_permutations(seed=3))
    cal = torch.randn(24, *x.shape[1:], generator=torch.Generator().manual_seed(2))
    stats = collect([model, other], [graph, graph], cal, positions_per_image=5)
    assert stats.positions_per_image == 5
    assert stats.points["layer1.0.conv1"][0].count == 24 * 5
    fused = fusion.fuse([model, other], cal, method="permute", repair="none", positions_per_image=5)
    assert fused.fusion_report.positions_per_image == 5
    assert "5 positions per image" in fused.fusion_report.summary()
    with torch.no_grad():
        assert rel_err(model(x), fused(x)) < 1e-5


@pytest.mark.parametrize("d", [10, 300])
def test_add_gram_adds_the_whole_symmetric_product(d):
    """add_gram computes the upper block triangle and mirrors it: the sum equals x^T x (narrow
    and blocked widths), added to what the accumulator held."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 50, d, generator=g, dtype=torch.float64)
    acc = torch.ones(2, d, d, dtype=torch.float64)
    add_gram(acc, x)
    torch.testing.assert_close(acc, 1 + x.transpose(1, 2) @ x, rtol=1e-12, atol=1e-12)


def test_units_constant_up_to_float32_rounding_correlate_with_nothing():
    # a unit whose variation is float32 rounding of a large constant (e.g. an all-dead input summed
    # in a different order in each model) has meaningless correlations: it counts as dead
    from alignment.statistics import PointStats

    g = torch.Generator().manual_seed(0)
    live = torch.randn(500, 2, generator=g)
    flat = 5.0 + 1e-7 * torch.randn(500, 2, generator=g)  # two such units, equal but for rounding
    p = PointStats.zeros([4], pairs=[(0, 0)])
    p.update([torch.cat([live, flat], 1)])
    C = p.correlation()
    assert torch.equal(C[2:].abs().sum(1), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(C[:, 2:].abs().sum(0), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(C[:2, :2], torch.corrcoef(live.t().double()), rtol=1e-5, atol=1e-5)
    # a unit of small but real variation is not dead
    q = PointStats.zeros([1], pairs=[(0, 0)])
    q.update([5.0 + 1e-3 * torch.randn(500, 1, generator=g)])
    assert q.correlation()[0, 0] == pytest.approx(1.0)


@pytest.mark.parametrize("layout", ["samples-major", "feature-major"])
def test_variances_without_self_products_match_float64(layout):
    """With only cross-model products kept (anchored methods), each unit's variance comes from its
    own sum of squares (a norm kernel for feature-major copies, a dot product otherwise): within
    1e-6 of the float64 variance in either memory layout, over several batches."""
    from alignment.statistics import PointStats

    g = torch.Generator().manual_seed(0)
    xs = [3.0 + torch.randn(400, 6, generator=g) * torch.linspace(0.5, 4, 6) for _ in range(2)]
    p = PointStats.zeros([6, 6], pairs=[(0, 1)])
    for rows in torch.arange(400).split(130):
        feats = [x[rows] for x in xs]
        if layout == "feature-major":  # (samples, width) views of (width, samples) memory
            feats = [f.t().contiguous().t() for f in feats]
        p.update(feats)
    want = torch.cat([x.double().var(0, unbiased=False) for x in xs])
    got = p.covariance().diagonal()
    assert float((got - want).abs().max()) <= 1e-6 * float(want.max())


class _StageWithToken(torch.nn.Module):
    """Returns ``(feature map, class token)``; the network reads only the token (as CvT's last stage)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.token = torch.nn.Parameter(torch.randn(1, 1, 8))

    def forward(self, x):
        x = self.conv(x)
        return x, self.token + x.mean((2, 3))[:, None]


class _TokenNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stage = _StageWithToken()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 10)

    def forward(self, x):
        _, token = self.stage(x)
        return self.fc2(torch.relu(self.fc1(token[:, 0])))


def test_a_module_returning_several_tensors_is_read_at_the_traced_one():
    """The stage's output point holds the token (B, 1, 8); its first output is a (B, 8, 5, 5) map:
    reading that one gave 5 'features' for an 8-wide space (an error, or wrong statistics)."""
    torch.manual_seed(0)
    model = _TokenNet().eval()
    x = torch.randn(16, 3, 5, 5)
    graph = discover(model, x[:2])
    space = next(s for s in graph.spaces if s.width == 8)
    point = next(o for o in space.observations if o.module == "stage" and o.io == "output")
    stats = collect([model], [graph], x, spaces=[space.name], points="outputs")
    got = [p for p in stats.points[space.name] if p.count == 16]  # one sample per image: the token
    assert got, "the stage's token point was not collected"
    with torch.no_grad():
        token = model.stage(x)[1][:, 0].double()
    assert torch.allclose(got[0].mean(), token.mean(0), atol=1e-6)
    assert point.shape[1:] == (1, 8)
    # a model output in a dict, and a tensor that is not the first in its tuple
    assert point.read({"map": torch.zeros(4, 8, 5, 5), "token": torch.ones(4, 1, 8)}).shape == (4, 1, 8)
    assert point.read((None, torch.zeros(4, 8, 5, 5), (torch.ones(4, 1, 8),))).shape == (4, 1, 8)
    assert point.read(torch.zeros(3)).shape == (3,)  # a plain tensor is the observed one
    assert point.read(("no tensor",)) is None
    # a container with no tensor of the traced rank and feature size: nothing is read (before: its
    # first tensor, whose 5 "features" were taken for the 8 of the space)
    assert point.read((torch.zeros(4, 5, 5), torch.zeros(4, 5))) is None


def test_promoted_add_equals_the_mixed_dtype_add_bit_for_bit():
    """add_promoted_ (float32 into float64 a slice at a time) gives exactly torch's in-place add on
    whole matrices, strided views of a larger sum, transposed operands and views of many dims."""
    from alignment.statistics import add_promoted_

    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 700, 900, generator=g, dtype=torch.float64)
    cases = [
        (lambda t: t[0], torch.randn(700, 900, generator=g)),                       # one matrix
        (lambda t: t[:, 100:600, 50:], torch.randn(3, 500, 850, generator=g)),      # a strided view
        (lambda t: t[1, :300, :700], torch.randn(700, 300, generator=g).t()),       # transposed operand
        (lambda t: t.view(3, 7, 100, 9, 100)[:, 2:5, :, 1:8], torch.randn(3, 3, 100, 7, 100, generator=g)),
        (lambda t: t[2, 0], torch.randn(900, generator=g)),                          # a vector
    ]
    for view, x in cases:
        want, got = base.clone(), base.clone()
        view(want).add_(x)
        add_promoted_(view(got), x, chunk=4096)
        assert torch.equal(want, got)


@pytest.mark.parametrize("d", [40, 301, 512])
def test_a_models_product_with_itself_from_its_upper_block_triangle_is_the_whole_product(d):
    """Property: the self product of the statistics (upper block triangle, mirrored) holds the
    numbers of the whole product f f^T, at widths below and above the blocking threshold."""
    from alignment.statistics import _self_product

    f = torch.randn(d, 700, generator=torch.Generator().manual_seed(d))
    torch.testing.assert_close(_self_product(f), f @ f.t(), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(_self_product(f.double()), f.double() @ f.double().t(), rtol=1e-12, atol=1e-10)


def test_near_constant_units_fade_out_continuously():
    """Property: a unit's live weight is 0 below rtol / 3 relative variation, 1 above 3 rtol, rises
    monotonically between, and moves by little when the spread moves by little (two copies of a
    unit, whose spreads differ by rounding, are treated alike: no threshold between them); the
    correlation's diagonal is that weight (the rest goes to the shared constant dimension), and
    units clearly live or constant keep correlation 1 and 0 exactly."""
    from alignment.statistics import live_weight

    rtol = 3e-5
    spread = torch.logspace(-7, -2, 2001, dtype=torch.float64)
    w = live_weight(spread, rtol)
    assert bool((w[spread < rtol / 3] == 0).all()) and bool((w[spread > 3 * rtol] == 1).all())
    assert bool((w.diff() >= 0).all())
    assert float(live_weight(torch.tensor([rtol], dtype=torch.float64), rtol)) == pytest.approx(0.5)
    near = live_weight(spread * 1.01, rtol) - w
    assert float(near.abs().max()) < 0.02
    assert float(live_weight(torch.tensor([0.0, float("inf")], dtype=torch.float64), rtol).sum()) == 1.0
    # a point with four units of mean 10: spreads 1e-6 (constant), 3e-5 (half), 1e-3 and 1 (live)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 4, generator=g, dtype=torch.float64)
    z = (z - z.mean(0)) / z.std(0, unbiased=False)
    f = 10.0 + z * torch.tensor([1e-5, 3e-4, 1e-2, 10.0], dtype=torch.float64)
    st = PointStats.zeros([4])
    st.update([f])
    diag = st.correlation().diagonal()
    torch.testing.assert_close(diag, torch.tensor([0.0, 0.5, 1.0, 1.0], dtype=torch.float64), rtol=0, atol=1e-6)


def test_a_point_where_no_unit_varies_is_left_out_of_the_averages():
    """A point at which every unit of every model is constant (a BatchNorm with zero gains: timm
    initialises each ResNet block's last one so) says nothing about any unit; averaged in, it
    halved every correlation of the space, and the shortfall sent every unit to weight comparisons
    (random-init timm resnet50, independent pair: matching took 12 s instead of 5 s). The space's
    statistics are the live points'; when no point varies, all are kept."""
    from alignment.statistics import Statistics

    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=g, dtype=torch.float64)
    b = a[:, torch.randperm(6, generator=g)] + 0.3 * torch.randn(500, 6, generator=g, dtype=torch.float64)
    live, flat = PointStats.zeros([6, 6]), PointStats.zeros([6, 6])
    live.update([a, b])
    flat.update([torch.full((500, 6), 0.25, dtype=torch.float64), torch.zeros(500, 6, dtype=torch.float64)])
    assert flat.constant() and not live.constant()
    stats = Statistics(points={"s": [live, flat]}, widths={"s": [6, 6]})
    torch.testing.assert_close(stats.correlation("s"), live.correlation(), rtol=0, atol=0)
    torch.testing.assert_close(stats.mean("s"), live.mean(), rtol=0, atol=0)
    # a unit alive at the point keeps it in (its correlations are information)
    partly = PointStats.zeros([6, 6])
    c = torch.zeros(500, 6, dtype=torch.float64)
    c[:, 2] = a[:, 0]
    partly.update([c, torch.zeros(500, 6, dtype=torch.float64)])
    assert not partly.constant()
    both = Statistics(points={"s": [live, partly]}, widths={"s": [6, 6]})
    assert float(both.correlation("s")[2, 2]) == pytest.approx(1.0)  # live at both points
    assert float(both.correlation("s")[0, 0]) == pytest.approx(0.5)  # constant at one of two
    only = Statistics(points={"s": [flat]}, widths={"s": [6, 6]})
    assert float(only.correlation("s").abs().sum()) == 0.0  # every unit constant: kept, all dead


def test_statistics_of_other_positions_per_image_or_precision_are_not_merged():
    """Guards: merging statistics collected with another ``positions_per_image`` (sums over every
    position and over a few per image weigh images differently) or another ``precision`` is a
    StatisticsMismatchError (a FusionError) naming both values (before: merged, the result keeping
    the first one's settings); equal settings merge, and their notes are kept."""
    from alignment.errors import FusionError
    from alignment.statistics import Statistics

    def stats(**kw):
        p = PointStats.zeros([3, 3])
        p.update([torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)])
        return Statistics(points={"s": [p]}, widths={"s": [3, 3]}, samples=10, **kw)

    for mine, theirs, match in (({"positions_per_image": 4}, {}, "positions_per_image=4 and positions_per_image=None"),
                                ({}, {"positions_per_image": 8}, "positions_per_image=None and positions_per_image=8"),
                                ({"precision": "float32"}, {"precision": "float64"},
                                 "precision='float32' and precision='float64'")):
        with pytest.raises(FusionError, match=match) as got:
            stats(**mine).merge(stats(**theirs))
        assert type(got.value).__name__ == "StatisticsMismatchError"
    merged = stats(positions_per_image=4, notes=["a"]).merge(stats(positions_per_image=4, notes=["a", "b"]))
    assert merged.positions_per_image == 4 and merged.samples == 20 and merged.notes == ["a", "b"]


def test_an_observation_policy_that_finds_no_point_is_reported():
    """Guards: a ``points`` policy named explicitly that finds no point of a space (a ViT's query-key
    dims have no consuming layer, so ``points="consumers"`` finds none) reads the producers'
    outputs instead: one note naming the policy and the spaces, warned and listed in the fusion
    report; ``"auto"``, which chooses per space, notes nothing. Points not in every model's graph
    are left out with a note (before: both silently)."""
    import warnings

    import fusion
    from alignment.errors import FallbackWarning

    model, x = build("timm_vit", seed=0)
    other, _ = build("timm_vit", seed=1)
    cal = torch.randn(4, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    g = discover(model, x)
    with pytest.warns(FallbackWarning, match=r"points='consumers': 2 space\(s\).*outputs of the layers producing "
                                             r"them.*'blocks.0.attn.qkv#0', 'blocks.1.attn.qkv#0'"):
        stats = collect([model, other], [g, g], cal, points="consumers")
    assert len(stats.notes) == 1 and "blocks.1.attn.qkv#0" in stats.points
    with pytest.warns(FallbackWarning, match="points='consumers'"):
        fused = fusion.fuse([model, other], cal, method="permute", repair="none", points="consumers")
    assert any(f.startswith("points='consumers': 2 space(s)") for f in fused.fusion_report.fallbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        assert collect([model, other], [g, g], cal, points="auto").notes == []
    # a point that one model's graph lacks
    a, xa = build("mlp", seed=0)
    ga, gb = discover(a, xa), discover(a, xa)
    space = next(s for s in gb.spaces if len(observation_points(s, gb, "all")) > 1)
    space.observations = space.observations[:-1]
    with pytest.warns(FallbackWarning, match=f"space '{space.name}': 1 observation point.*not in every model"):
        collect([a, a], [ga, gb], xa, points="all")


class _SeqFirst(torch.nn.Module):
    """Tokens of 8x8 images, run sequence-first ``(tokens, images, features)`` through a linear
    layer, then flattened to ``(images x tokens, features)`` for another."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(16, 8)
        self.mid = torch.nn.Linear(8, 8)
        self.flat = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        t = self.embed(x.reshape(x.shape[0], 4, 16)).transpose(0, 1)  # (4 tokens, images, 8)
        t = torch.relu(self.mid(t))
        f = torch.relu(self.flat(t.transpose(0, 1).reshape(-1, 8)))  # (images x 4 tokens, 8)
        return self.head(f.reshape(x.shape[0], 4, 8).mean(1))


def test_positions_per_image_are_drawn_per_image_in_sequence_first_tensors_or_reported():
    """Guards: ``positions_per_image=k`` draws k tokens of each image also where the tensor is
    sequence-first (images on its second axis: 16 images x 2 tokens; before: 2 images of each token,
    4 x 2 samples, silently); where a tensor has no axis of the batch's images (tokens flattened
    into rows) every position is read, with a note warned and kept in the statistics (before:
    silently)."""
    from alignment.errors import FallbackWarning

    torch.manual_seed(0)
    model = _SeqFirst().eval()
    x = torch.randn(2, 1, 8, 8)
    g = discover(model, x)
    cal = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with pytest.warns(FallbackWarning, match=r"positions_per_image=2: space '.*' is read at the input of 'flat', "
                                             r"of shape \[64, 8\], which has no axis of the batch's 16 images"):
        stats = collect([model], [g], cal, positions_per_image=2, points="consumers")
    counts = {(name, p.count) for name, pts in stats.points.items() for p in pts}
    mid = next(s.name for s in g.spaces if any(o.module == "mid" and o.io == "input" for o in s.observations))
    assert (mid, 16 * 2) in counts
    flat = next(s.name for s in g.spaces if any(o.module == "flat" and o.io == "input" for o in s.observations))
    assert {c for n, c in counts if n == flat} == {16 * 4}
    assert any("'flat'" in n for n in stats.notes)


def test_collect_alone_checks_its_graphs_and_data():
    """Guards: the statistics stage called on its own refuses too few graphs with "one graph per
    model" (before: "observation point 0 ... did not fire"), and data a model cannot take with the
    CalibrationError that fuse gives, naming the model (before: torch's raw RuntimeError)."""
    from alignment import discover_all
    from alignment.errors import CalibrationError, SpaceMismatchError

    a, x = build("mlp", seed=0)
    b, _ = build("mlp", seed=1)
    graphs = discover_all([a, b], x)
    cal = torch.randn(8, *x.shape[1:], generator=torch.Generator().manual_seed(3))
    with pytest.raises(SpaceMismatchError, match="collect got 2 model.* and 1 graph.*one graph per model is needed"):
        collect([a, b], graphs[:1], cal)
    with pytest.raises(CalibrationError, match=r"model 0 \(TinyMLP\) fails on calibration inputs of shape \(2, 3, 5, 5\)"):
        collect([a, b], graphs, torch.randn(4, 3, 5, 5))
    assert collect([a, b], graphs, [cal[:4], cal[4:]]).samples == 8


def test_statistics_merge_refuses_what_is_no_statistics():
    """Guards: ``Statistics.merge(None)`` is an InvalidOptionError naming the type (before: AttributeError)."""
    from alignment import discover_all
    from alignment.errors import InvalidOptionError

    a, x = build("mlp", seed=0)
    stats = collect([a], discover_all([a], x), x)
    with pytest.raises(InvalidOptionError, match="Statistics.merge takes another Statistics.*got NoneType"):
        stats.merge(None)


def test_subsampled_tokens_of_a_token_major_tensor_are_whole_tokens():
    """Guards the gather of ``positions_per_image`` on (images, tokens, features) tensors read
    feature-first (a transposed view, gathered in memory order since it was ten times slower the
    other way): with every token of an image equal, any k tokens per image give the same mean and
    covariance as all of them, with images x k samples (a gather along the wrong axis, or one
    that mixes features of different tokens, does not)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.GELU(), torch.nn.Linear(12, 3)).eval()
    g = discover(model, torch.randn(2, 5, 6))
    base = torch.randn(20, 1, 6, generator=torch.Generator().manual_seed(1))
    cal = base.expand(20, 5, 6).contiguous()
    full = collect([model], [g], cal, precision="float64")
    sub = collect([model], [g], cal, precision="float64", positions_per_image=2)
    assert sub.points and set(sub.points) == set(full.points)
    for name in full.points:
        for p, q in zip(full.points[name], sub.points[name]):
            assert (p.count, q.count) == (20 * 5, 20 * 2)
            torch.testing.assert_close(q.mean(), p.mean(), rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(q.covariance(), p.covariance(), rtol=1e-10, atol=1e-10)


class _OwnBatchNorm(torch.nn.BatchNorm2d):
    """A BatchNorm with a forward of its own: not known to be affine, so always read."""

    def forward(self, x):
        return super().forward(x)


def _direct_statistics_check(models, x, stats, graphs):
    """Every point's mean and covariance equal those of the features read by a hook (float64)."""
    from alignment.statistics import _pair_points, _policy_points

    checked = 0
    for name, pts in stats.points.items():
        per_model = [_policy_points(g[name], g, "auto")[0] for g in graphs]
        for ps, obs in zip(pts, _pair_points(per_model)):
            f = torch.cat([_features(m, o.module, o.io, x, o) for m, o in zip(models, obs)], 1)
            cov = (f - f.mean(0)).t() @ (f - f.mean(0)) / f.shape[0]
            torch.testing.assert_close(ps.mean(), f.mean(0), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(ps.covariance(), cov, rtol=1e-6, atol=1e-6 * float(cov.abs().max()))
            checked += 1
    return checked


def test_batchnorm_outputs_are_derived_from_their_inputs_sums_not_read(monkeypatch):
    """Guards: an eval BatchNorm's output whose input the pass read at another point of the space
    is not copied nor multiplied out (its sums are its input's, scaled per feature: r18w32 x 8
    collection 15.1 -> 12.1 s), and its statistics still equal those of the features a hook reads
    (float64, every point of every space, a BatchNorm with running statistics far from 0 and 1);
    a Sequential ending in the norm is an image too."""
    from alignment.statistics import _Reader
    from tests.tiny_models import build

    a, x = build("timm_resnet18", seed=0)
    b, _ = build("timm_resnet18", seed=1)
    for m in (a, b):
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-1, 1)
                mod.running_var.uniform_(0.2, 3)
    cal = torch.randn(12, *x.shape[1:], generator=torch.Generator().manual_seed(4))
    graphs = [discover(a, x), discover(b, x)]
    read = []
    real = _Reader.__call__
    monkeypatch.setattr(_Reader, "__call__", lambda self, t, o, where: read.append(o.module) or real(self, t, o, where))
    stats = collect([a, b], graphs, [cal[:5], cal[5:]], precision="float64")
    assert "layer1.0.bn1" not in read and "layer1.0.downsample.1" not in read
    assert "layer1.0.downsample" not in read  # the Sequential's output is the norm's
    assert "layer1.0.conv1" in read and "layer1.0.act1" in read  # the ReLU changed the norm's output in place
    monkeypatch.setattr(_Reader, "__call__", real)
    assert _direct_statistics_check([a, b], cal, stats, graphs) > 40


def test_a_batchnorm_derived_in_one_model_and_read_in_another_gives_their_joint_statistics():
    """Guards the mixed case: where one model's norm output is an image of its input and the
    other's must be read (a BatchNorm subclass with its own forward, or one in training mode), the
    joint statistics are still those of the features a hook reads."""
    import copy

    from tests.tiny_models import build

    a, x = build("timm_resnet18", seed=0)
    b = copy.deepcopy(a)
    old = b.layer1[0].bn1
    own = _OwnBatchNorm(old.num_features).eval()
    own.load_state_dict(old.state_dict())
    b.layer1[0].bn1 = own
    cal = torch.randn(10, *x.shape[1:], generator=torch.Generator().manual_seed(5))
    graphs = [discover(a, x), discover(b, x)]
    stats = collect([a, b], graphs, cal, precision="float64")
    assert _direct_statistics_check([a, b], cal, stats, graphs) > 40


def test_timm_batchnorm_act_is_derived_only_without_activation(monkeypatch):
    """Guards: timm's BatchNormAct2d is affine only when its activation and dropout are identities
    (EfficientNet's projection norms): that output is derived from its input's sums, one with an
    activation is read; both give the statistics of the features a hook reads."""
    from timm.layers.norm_act import BatchNormAct2d

    from alignment.statistics import _Reader

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.bn1 = BatchNormAct2d(8, act_layer=torch.nn.ReLU)
            self.conv2 = torch.nn.Conv2d(8, 6, 3, padding=1)
            self.bn2 = BatchNormAct2d(6, apply_act=False)
            self.head = torch.nn.Linear(6, 4)

        def forward(self, x):
            return self.head(self.bn2(self.conv2(self.bn1(self.conv1(x)))).mean((2, 3)))

    torch.manual_seed(0)
    models = []
    for _ in range(2):
        m = Net()
        for bn in (m.bn1, m.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.2, 3)
        models.append(m.eval())
    x = torch.randn(2, 3, 6, 6)
    graphs = [discover(m, x) for m in models]
    cal = torch.randn(10, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    read = []
    real = _Reader.__call__
    monkeypatch.setattr(_Reader, "__call__", lambda self, t, o, where: read.append(o.module) or real(self, t, o, where))
    stats = collect(models, graphs, cal, precision="float64")
    monkeypatch.setattr(_Reader, "__call__", real)
    assert "bn2" not in read and "conv2" in read and "bn1" in read
    assert _direct_statistics_check(models, cal, stats, graphs) >= 4


def test_float32_statistics_of_long_batches_stay_within_1e6_of_float64():
    """Guards the 1e-6 bound where a batch holds tens of thousands of samples per unit (a ResNet
    stem: 256 images x 196 positions) and a method reads each model against an anchor (no model's
    product with itself: the squared sums come from row norms). One float32 norm over the whole
    row drifted by up to 5e-5 relative (half the ReLU outputs are 0: centred, one value repeated,
    whose rounding errors add up instead of cancelling; a trained stem's variances were 6e-6 off
    in Frobenius norm); now runs of 1024 samples are summed in float64."""
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(16, 4)).eval()
        with torch.no_grad():
            m[0].bias.zero_()
        models.append(m)
    x = torch.randn(2, 1, 160, 160)
    graphs = [discover(m, x) for m in models]
    data = torch.randn(4, 1, 160, 160, generator=torch.Generator().manual_seed(1))  # 102,400 positions
    s64 = collect(models, graphs, data, precision="float64", points="outputs", pairs=[(0, 1)])
    s32 = collect(models, graphs, data, points="outputs", pairs=[(0, 1)])
    checked = 0
    for space, pts in s64.points.items():
        for p, q in zip(pts, s32.points[space]):
            if p.count < 50_000:
                continue
            for u, v in ((p.sq, q.sq), (p.variance(), q.variance()), (p.covariance(), q.covariance())):
                assert float((u - v).norm()) <= 1e-6 * float(u.norm()), space
            checked += 1
    assert checked


@pytest.mark.parametrize("layout", ["channel-major", "token-major", "strided"])
def test_squared_sums_of_every_layout_stay_within_1e6(layout):
    """Guards the per-feature squared sums (``sq`` where a model's product with itself is not
    collected) on each layout the reader copies into: rows contiguous, a token-major copy (``f.T``
    contiguous, read by column sums of runs of rows) and any other (``vecdot``); 70,000 samples
    with half of them one repeated centred value (a ReLU's zeros), against float64 (one float32
    norm per row: 5e-5 off)."""
    from alignment.statistics import _row_squares

    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(70_000, 24, generator=g))
    x = x - x.mean(0)
    f = {"channel-major": x.t().contiguous(), "token-major": x.t(),
         "strided": torch.cat([x, x], 1).t()[::2]}[layout]
    assert f.shape == (24, 70_000)
    want = (f.double() ** 2).sum(1)
    got = _row_squares(f)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def _bias_free(seed: int, scale: float = 1.0) -> torch.nn.Module:
    from torch import nn

    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    with torch.no_grad():
        m[0].weight.mul_(scale)
    return m


def test_float32_products_that_overflow_are_collected_again_in_float64():
    """Guards: activations above about 1e19 overflow float32 squares; the statistics are then
    collected again in float64 and that is reported and warned, so correlations (scale-free) equal
    those of the unscaled data (before: silently wrong, off by 1); activations that are not finite in
    the models themselves are a CalibrationError naming the spaces."""
    from alignment.errors import CalibrationError, FallbackWarning

    models = [_bias_free(0), _bias_free(1)]
    x = torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    graphs = [discover(m, x[:2]) for m in models]
    ref = collect(models, graphs, x)
    with pytest.warns(FallbackWarning, match=r"float32 products of 2 space\(s\) overflowed"):
        big = collect(models, graphs, x * 1e22)
    assert any("collected again in float64" in n for n in big.notes)
    for name in ref.points:
        assert (big.correlation(name) - ref.correlation(name)).abs().max() < 1e-5
    broken = [_bias_free(0, scale=1e30), _bias_free(1, scale=1e30)]  # inf after the first conv, in any dtype
    with pytest.raises(CalibrationError, match="statistics of space.* are not finite"), pytest.warns(FallbackWarning):
        collect(broken, graphs, x * 1e22)


@pytest.mark.parametrize("layout", ["NCHW", "tokens (N, P, F)", "sequence-first (P, N, F)"])
def test_positions_per_image_are_drawn_for_each_image_and_read_exactly(layout):
    """Guards: ``positions_per_image`` draws each image's own positions (one set of positions was
    shared by every image of a batch), the same ones in every model and point of a space, and the
    gather reads each image's features at its positions in every memory layout."""
    from alignment.graph import Observation
    from alignment.statistics import _Reader

    n, f, p, k = 6, 3, 16, 4
    # value = 1000 * image + 10 * position + feature
    base = (1000.0 * torch.arange(n)[:, None, None] + 10.0 * torch.arange(p)[None, :, None]
            + torch.arange(f)[None, None, :])  # (N, P, F)
    if layout == "NCHW":
        t, dim = base.permute(0, 2, 1).reshape(n, f, 4, 4).contiguous(), 1
    elif layout.startswith("tokens"):
        t, dim = base.contiguous(), 2
    else:
        t, dim = base.transpose(0, 1).contiguous(), 2
    obs = Observation(module="m", io="output", dim=dim, start=0, stop=f, call=0, ndim=t.dim(), shape=tuple(t.shape))

    def read(tensor):
        r = _Reader(torch.float64, k, seed=0)
        r.batch_size = n
        out = r(tensor, obs, ("space", 0, 0))
        return out + r.shifts[("space", 0, 0)][:, None]  # the raw values (the reader centres them)

    vals = read(t).view(f, n, k)
    image = torch.div(vals, 1000, rounding_mode="floor")
    pos = torch.div(vals - 1000 * image, 10, rounding_mode="floor")
    feat = vals - 1000 * image - 10 * pos
    assert torch.equal(image, torch.arange(n, dtype=vals.dtype).view(1, n, 1).expand(f, n, k))
    assert torch.equal(feat, torch.arange(f, dtype=vals.dtype).view(f, 1, 1).expand(f, n, k))
    assert torch.equal(pos, pos[:1].expand(f, n, k))  # every feature of an image at the same positions
    drawn = [frozenset(pos[0, i].tolist()) for i in range(n)]
    assert all(len(d) == k for d in drawn)
    assert len(set(drawn)) > 1  # images draw their own positions
    assert torch.equal(read(t.clone()), read(t))  # another model's tensor: the same positions
