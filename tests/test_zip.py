"""Zipping (method="zip"): ZipIt's greedy merging within and across models, heads merged whole."""

from __future__ import annotations

import pytest
import torch

import fusion
from alignment import discover, permute
from alignment.errors import InvalidOptionError, SpaceMismatchError
from tests.conftest import rel_err
from tests.tiny_models import build, logits


def _cal(x, n=48, seed=5):
    return torch.randn(n, *x.shape[1:], generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["cnn", "timm_vit", "timm_resnet18", "hf_vit"])
def test_zipping_a_model_with_itself_returns_its_function(name, tiny):
    """Each feature's copy is its most correlated partner, so zipping pairs copies and changes nothing."""
    model, x = tiny(name)
    fused = fusion.fuse([model, model], _cal(x), method="zip", repair="none")
    with torch.no_grad():
        assert rel_err(logits(model(x)), logits(fused(x))) < 1e-5


@pytest.mark.parametrize("name", ["cnn", "timm_vit", "hf_vit"])
def test_zip_without_within_merges_recovers_a_permutation(name, tiny):
    """within=0 allows only merges across models: a permuted copy is matched back unit by unit (heads
    included), so model 1's plans are the inverse permutation and model 0's the identity."""
    model, x = tiny(name)
    graph = discover(model, x)
    other = permute(model, graph, graph.random_permutations(seed=11))
    al = fusion.align([model, other], _cal(x), method="zip", within=0.0)
    for name_, perm in al.result.permutations(0).items():
        assert torch.equal(perm, torch.arange(len(perm))), name_
    restored = permute(other, al.graphs[1], al.result.permutations(1))
    with torch.no_grad():
        assert rel_err(logits(model(x)), logits(restored(x))) < 1e-5
        assert rel_err(logits(model(x)), logits(al.build()(x))) < 1e-5


def _duplicate_head(model, h_from=0, h_to=1):
    """Make head ``h_to`` of every attention block compute exactly what head ``h_from`` computes."""
    with torch.no_grad():
        for blk in model.blocks:
            dim = blk.attn.qkv.weight.shape[1]
            d = dim // blk.attn.num_heads
            for part in range(3):
                src = slice(part * dim + h_from * d, part * dim + (h_from + 1) * d)
                dst = slice(part * dim + h_to * d, part * dim + (h_to + 1) * d)
                blk.attn.qkv.weight[dst] = blk.attn.qkv.weight[src]
                blk.attn.qkv.bias[dst] = blk.attn.qkv.bias[src]
    return model


def test_zip_merges_heads_whole_within_a_model():
    """Two identical heads of one model are zipped into one fused head (a head plan that is not a
    permutation, dims of both heads pooled); the copies of a permuted twin fill the other heads, and
    the fused model still computes the original function."""
    a, x = build("timm_vit", seed=0)
    a = _duplicate_head(a)
    graph = discover(a, x)
    b = permute(a, graph, graph.random_permutations(seed=3))
    cal = _cal(x, 64)
    al = fusion.align([a, b], cal, method="zip")
    fused = al.build()
    with torch.no_grad():
        assert rel_err(logits(a(x)), logits(fused(x))) < 1e-5
    # with a twin that does not share the duplicate, the duplicate pair is the best merge of all
    c, _ = build("timm_vit", seed=4)
    al = fusion.align([a, _duplicate_head(c, 2, 3)], cal, method="zip")
    for blk in ("blocks.0", "blocks.1"):
        heads = al.plans[0][f"{blk}.attn.qkv#0.heads"]
        assert heads.sum(1).max() == 2, heads  # one fused head takes two heads of model 0
        fused_head = int(torch.nonzero(heads[:, 0])[0])
        assert heads[fused_head, 1] == 1
        assert al.plans[1][f"{blk}.attn.qkv#0.heads"][fused_head].sum() == 0  # and none of model 1
    with torch.no_grad():
        assert torch.isfinite(logits(al.build()(x))).all()


def test_three_and_four_models():
    """N models zip in one pass: copies of one model (permuted) give back its function."""
    model, x = build("timm_resnet18")
    graph = discover(model, x)
    copies = [permute(model, graph, graph.random_permutations(seed=s)) for s in (1, 2, 3)]
    cal = _cal(x, 32)
    for k in (3, 4):
        fused = fusion.fuse([model, *copies[:k - 1]], cal, method="zip", repair="none")
        with torch.no_grad():
            assert rel_err(model(x), fused(x)) < 1e-5


@pytest.mark.parametrize("k", [3, 4])
def test_zip_without_within_merges_recovers_permutations_of_three_and_more_models(k):
    """within=0 with three or more models (zipped one model at a time): permuted copies are matched
    back unit by unit, so every copy's plans are its inverse permutation and the fused model is the
    original. (Pooling all models at once stalled here: groups of models 0+1 and 1+2 cannot merge.)"""
    model, x = build("cnn")
    graph = discover(model, x)
    copies = [permute(model, graph, graph.random_permutations(seed=s)) for s in (1, 2, 3)][:k - 1]
    al = fusion.align([model, *copies], _cal(x), method="zip", within=0.0)
    for i, copy in enumerate(copies, start=1):
        restored = permute(copy, al.graphs[i], al.result.permutations(i))
        with torch.no_grad():
            assert rel_err(logits(model(x)), logits(restored(x))) < 1e-5
    with torch.no_grad():
        assert rel_err(logits(model(x)), logits(al.build()(x))) < 1e-5


def test_zip_without_within_merges_keeps_one_unit_per_model_in_every_group():
    """Property of within=0 for three unrelated models, at their width and wider: every fused unit
    takes at most one unit of each model and every unit is used (no stall before the width)."""
    models = [build("cnn", seed=s)[0] for s in (0, 1, 2)]
    x = build("cnn")[1]
    for width in (None, 1.5):
        al = fusion.align(models, _cal(x), method="zip", within=0.0, width=width)
        for i in range(3):
            for space, T in al.result.plans[i].items():
                T = torch.as_tensor(T)
                assert bool((T.sum(dim=1) <= 1).all()), (i, space)  # at most one unit of model i per group
                assert bool((T.sum(dim=0) == 1).all()), (i, space)  # every unit of model i in one group


def test_zip_compresses_and_composes_with_budget(tiny):
    """One model zipped to half width merges its most correlated features (the fused width is the
    target's); with a parameter budget, the fused widths grow past the fully zipped model's."""
    model, x = tiny("timm_resnet18")
    cal = _cal(x, 32)
    half = fusion.fuse([model], cal, method="zip", width=0.5, repair="none")
    assert half.fc.in_features == model.fc.in_features // 2
    other, _ = build("timm_resnet18", seed=3)
    al = fusion.align([model, other], cal, method="zip", budget=1.5)
    full = sum(p.numel() for p in model.parameters())
    got = sum(p.numel() for p in al.build().parameters())
    assert full < got <= 1.5 * full * 1.01


def test_zip_option_checks(tiny):
    model, x = tiny("cnn")
    for bad in ({"within": 1.5}, {"remerge": -0.1}, {"within": "all"}, {"beta": 1.0}):
        with pytest.raises(InvalidOptionError):
            fusion.align([model, model], _cal(x), method="zip", **bad)
    with pytest.raises(SpaceMismatchError, match="within"):
        fusion.align([model, model], _cal(x), method="zip", within=0.0, width=0.5)


def test_widths_zipping_cannot_reach_are_refused_before_the_statistics_pass(tiny, monkeypatch):
    """Guards: a fused width below the widest model's with within=0, or above the pooled width, is
    refused from the widths alone (before: only after collecting every statistic)."""
    import fusion.api

    model, x = tiny("cnn")

    def no_pass(*args, **kwargs):
        raise AssertionError("the statistics pass ran before the widths were checked")
    monkeypatch.setattr(fusion.api, "collect", no_pass)
    with pytest.raises(SpaceMismatchError, match="within=0"):
        fusion.align([model, model], _cal(x), method="zip", within=0.0, width=0.5)
    with pytest.raises(SpaceMismatchError, match="cannot widen"):
        fusion.align([model, model], _cal(x), method="zip", width=3.0)
