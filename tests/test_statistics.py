"""Streaming activation statistics."""

from __future__ import annotations

import torch

from alignment import discover
from alignment.statistics import collect, observation_points
from tests.tiny_models import build


def _features(model, module, io, x, ob):
    mods = dict(model.named_modules())
    got = {}
    if io == "output":
        h = mods[module].register_forward_hook(lambda m, i, o: got.setdefault("t", o))
    else:
        h = mods[module].register_forward_pre_hook(lambda m, i: got.setdefault("t", i[0]))
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
    stats = collect([a, b], [ga, gb], batches)
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
    real = PointStats.update

    def spy(self, feats):
        refs.extend(weakref.ref(f) for f in feats)
        real(self, feats)

    monkeypatch.setattr(PointStats, "update", spy)
    m, x = build("mlp")
    g = discover(m, x)
    stats = collect([m], [g], [torch.randn(4, 1, 8, 8) for _ in range(20)])
    gc.collect()
    assert stats.samples == 80 and len(refs) >= 20
    assert not [r for r in refs if r() is not None]
