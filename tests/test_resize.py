"""Resizing helper: narrower copies that run, with consistent module attributes."""

from __future__ import annotations

import warnings

import pytest
import torch

from alignment import discover
from fusion.modules import check_consistency
from fusion.resize import WidthError, resize, resize_like, selection_indices
from tests import tiny_models
from tests.conftest import rel_err
from tests.tiny_models import logits


def _params(m):
    return sum(p.numel() for p in m.parameters())


def test_halve_timm_resnet18(tiny):
    model, x = tiny("timm_resnet18")
    small = resize(model, 0.5, x)
    assert small.layer1[0].conv1.out_channels == 8 and small.layer4[1].bn2.num_features == 64
    assert small.fc.in_features == 64 and small.num_features == 64
    assert check_consistency(small) == []
    with torch.no_grad():
        assert logits(small(x)).shape == (2, 10)
    assert model.layer1[0].conv1.out_channels == 16  # input untouched


def test_halve_timm_vit(tiny):
    model, x = tiny("timm_vit")
    small = resize(model, 0.5, x)
    attn = small.blocks[0].attn
    assert small.embed_dim == 32 and small.num_features == 32
    assert (attn.num_heads, attn.head_dim) == (4, 8) and attn.scale == pytest.approx(8 ** -0.5)
    assert small.blocks[0].mlp.fc1.out_features == 128 and small.norm.normalized_shape == (32,)
    assert check_consistency(small) == []
    with torch.no_grad():
        assert logits(small(x)).shape == (2, 10)


def test_halve_hf_vit(tiny):
    model, x = tiny("hf_vit")
    small = resize(model, 0.5, x)
    assert small.config.hidden_size == 32 and small.config.intermediate_size == 64
    assert check_consistency(small) == []
    with torch.no_grad():
        assert logits(small(x)).shape == (2, 10)
    assert model.config.hidden_size == 64


def test_resize_keeps_first_features_exactly():
    model = tiny_models.TinyMLP(width=8).eval()
    x = torch.randn(3, 1, 8, 8)
    small = resize(model, 0.5, x)
    assert torch.equal(small.fc1.weight, model.fc1.weight[:4])
    assert torch.equal(small.fc2.weight, model.fc2.weight[:4, :4])
    assert torch.equal(small.fc3.weight, model.fc3.weight[:, :4])


def test_scores_choose_features():
    model = tiny_models.TinyMLP(width=8).eval()
    x = torch.randn(3, 1, 8, 8)
    graph = discover(model, x)
    scores = {"fc1": torch.tensor([0, 9, 0, 8, 0, 0, 7, 0.0])}
    idx = selection_indices(graph, {"fc1": 3, "*": 1.0}, scores)
    assert idx["fc1"].tolist() == [1, 3, 6]
    assert selection_indices(graph, 0.5)["fc1"].tolist() == [0, 1, 2, 3]


def test_resize_into_user_built_target(tiny):
    model, x = tiny("timm_resnet18")
    target = tiny_models.timm_resnet18((8, 16, 32, 64)).eval()
    out = resize_like(model, target, x)
    assert type(out) is type(target)
    for (n, a), (_, b) in zip(out.state_dict().items(), target.state_dict().items()):
        assert a.shape == b.shape, n
    assert torch.equal(out.layer1[0].conv1.weight, model.layer1[0].conv1.weight[:8])


def test_width_errors():
    model = tiny_models.TinyMLP(width=8).eval()
    x = torch.randn(3, 1, 8, 8)
    with pytest.raises(WidthError, match="positive"):
        resize(model, -0.5, x)
    with pytest.raises(ValueError, match="example_input"):
        resize(model, 0.5)


@pytest.mark.parametrize("name", ["mlp", "cnn", "timm_resnet18", "timm_vit", "hf_vit"])
def test_widening_repeats_units_and_keeps_the_function(tiny, name):
    # Net2Net: copies split their consumers' weights; attention logits keep their scale
    model, x = tiny(name)
    wide = resize(model, 2.0, x)
    graph, wgraph = discover(model, x), discover(wide, x)
    assert all(wgraph[s.name].width == 2 * s.width for s in graph.spaces if s.kind == "features")
    with torch.no_grad():
        assert rel_err(tiny_models.logits(model(x)), tiny_models.logits(wide(x))) < 1e-5


def test_uneven_widening_under_a_layernorm_warns_and_bn_networks_stay_exact(tiny):
    """Guards the promise that a widened model computes the same function: it holds for BatchNorm
    networks at any factor and for LayerNorm ones at integer factors; a ViT widened by 1.5 changes
    its logits (the LayerNorm statistics see uneven repeats), and resize says so, naming the norm."""
    from alignment.errors import FusionWarning

    cnn, xc = tiny("timm_resnet18")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FusionWarning)
        wide = resize(cnn, 1.5, xc)
        with torch.no_grad():
            assert rel_err(tiny_models.logits(cnn(xc)), tiny_models.logits(wide(xc))) < 1e-5
        vit, xv = tiny("timm_vit")
        resize(vit, 2.0, xv)
    with pytest.warns(FusionWarning, match=r"LayerNorm 'blocks\.0\.norm1' normalises over space .* 64 units are "
                                           r"repeated unevenly to 96"):
        uneven = resize(vit, 1.5, xv)
    with torch.no_grad():
        assert rel_err(tiny_models.logits(vit(xv)), tiny_models.logits(uneven(xv))) > 1e-3


def test_a_width_factor_rounds_head_dim_and_an_absolute_width_must_split_into_heads(tiny):
    """Guards: heads keep their count; a factor (0.3 of 64 dims in 4 heads) rounds head_dim (16 ->
    5) instead of failing on a width (19) that 4 heads cannot split; an int width must split."""
    vit, x = tiny("timm_vit")
    small = resize(vit, 0.3, x)
    assert small.blocks[0].attn.num_heads == 4 and small.blocks[0].attn.head_dim == 5
    assert small.blocks[0].attn.qkv.out_features == 3 * 20
    with torch.no_grad():
        assert tiny_models.logits(small(x)).shape == (2, 10)
    with pytest.raises(WidthError, match="a width of 19 does not split into 4 heads; give a multiple of 4"):
        resize(vit, {"blocks.0.attn.qkv#0": 19, "*": 1.0}, x)


def test_widening_with_scores_repeats_the_best_units():
    g = discover(tiny_models.TinyMLP(width=4).eval(), torch.randn(2, 1, 8, 8))
    idx = selection_indices(g, 6, scores={"fc1": torch.tensor([0.1, 0.9, 0.5, 0.2])})
    assert idx["fc1"].tolist() == [0, 1, 2, 3, 1, 2]


def _conv_flatten(c: int, pool: bool, seed: int = 0, positions: int = 4) -> torch.nn.Sequential:
    """Conv -> Flatten -> Linear (a LeNet/VGG-style classifier): the flattened space is the conv's
    channels x ``positions**2`` positions (after an adaptive pool, else the 4 x 4 input's 16)."""
    torch.manual_seed(seed)
    nn = torch.nn
    pool_layers = [nn.AdaptiveAvgPool2d(positions)] if pool else []
    return nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), *pool_layers, nn.Flatten(),
                         nn.Linear(c * (positions ** 2 if pool else 16), 6), nn.ReLU(), nn.Linear(6, 3)).eval()


@pytest.mark.parametrize("pool", [True, False], ids=["avgpool_flatten", "flatten"])
def test_a_flatten_after_a_conv_resizes_with_its_channels(pool):
    """Guards: the flattened space (channels x positions, blocks indexed by the channel space)
    follows its channels at any width: narrowing keeps exactly the selected channels' blocks of the
    consumer's weights, and widening by 2 or 1.5 keeps the function (Net2Net), as for other layers."""
    model = _conv_flatten(8, pool)
    x = torch.randn(6, 1, 4, 4)
    idx = torch.tensor([1, 3, 4, 6])
    small = resize(model, {"0": 4, "*": 1.0}, x, scores={"0": torch.tensor([0, 5, 0, 4, 3, 0, 2, 0.0])})
    fc = len(model) - 3
    assert torch.equal(small[0].weight, model[0].weight[idx])
    assert torch.equal(small[fc].weight, model[fc].weight.view(6, 8, 16)[:, idx].reshape(6, 64))
    for factor in (2.0, 1.5):
        wide = resize(model, factor, x)
        assert wide[fc].in_features == int(round(8 * factor)) * 16
        with torch.no_grad():
            assert rel_err(model(x), wide(x)) < 1e-5


@pytest.mark.parametrize("pool", [True, False], ids=["avgpool_flatten", "flatten"])
def test_a_flatten_after_a_conv_fuses_across_widths(pool):
    """Guards: models whose flattened space differs in channel count fuse with ot, permute and merge
    (the flattened blocks follow the rectangular channel plan), a model fuses with a permuted copy
    of itself exactly, and fusing one model into a wider target keeps its function."""
    import fusion
    from alignment.permute import permute

    x = torch.randn(12, 1, 4, 4)
    wide, narrow = _conv_flatten(8, pool, seed=0), _conv_flatten(4, pool, seed=1)
    fc = len(wide) - 3
    for method in ("ot", "permute", "merge"):
        fused = fusion.fuse([wide, narrow], x, method=method, repair="none")
        assert fused[fc].in_features == 8 * 16 and fused[0].out_channels == 8
        with torch.no_grad():
            assert fused(x).shape == (12, 3)
    graph = discover(wide, x)
    copy = permute(wide, graph, graph.random_permutations(seed=2))
    with torch.no_grad():
        y = wide(x)
        assert rel_err(y, fusion.fuse([wide, copy], x, method="permute", repair="none")(x)) < 1e-5
        assert rel_err(y, fusion.fuse([wide], x, method="ot", width=2.0, repair="none")(x)) < 1e-5


def test_a_flatten_of_other_positions_is_refused_before_any_leaf_is_solved():
    """Guards: a genuine mismatch of a flattened space (the same channels laid out over 16 positions
    in one model and 4 in the other) is a SpaceMismatchError naming the space from the structure
    check on the graphs alone (no statistics needed; a walk runs it when made, before any leaf is
    solved), while other channel counts pass it."""
    from alignment.errors import SpaceMismatchError
    from alignment.leaves import select_leaf
    from alignment.structure import Walk, check_structures

    x = torch.randn(2, 1, 4, 4)
    g16, g4 = discover(_conv_flatten(8, True), x), discover(_conv_flatten(8, True, positions=2), x)
    g_narrow = discover(_conv_flatten(4, True), x)
    check_structures([g16, g_narrow], g16)
    check_structures([g_narrow], g16)
    flat = next(s.name for s in g16.spaces if s.width == 128)
    with pytest.raises(SpaceMismatchError, match=rf"space '{flat}': blocks of 4 features in model 1 but 16"):
        check_structures([g16, g4], g16)
    with pytest.raises(SpaceMismatchError, match="blocks of 4 features in model 0 but 16"):
        Walk([g4], g16, select_leaf)


def _grouped(c: int = 8, groups: int = 2, seed: int = 0) -> torch.nn.Sequential:
    """1x1 conv -> grouped 3x3 conv -> grouped 1x1 conv -> pool -> linear (ResNeXt/RegNet-style),
    with random BatchNorm statistics and affine weights (so no rescaling of a space hides)."""
    torch.manual_seed(seed)
    nn = torch.nn
    m = nn.Sequential(nn.Conv2d(1, c, 1), nn.BatchNorm2d(c), nn.ReLU(),
                      nn.Conv2d(c, c, 3, padding=1, groups=groups), nn.BatchNorm2d(c), nn.ReLU(),
                      nn.Conv2d(c, c, 1, groups=groups), nn.BatchNorm2d(c), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 3))
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.1)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.normal_(0, 0.1)
    return m.eval()


def test_widening_a_grouped_conv_keeps_the_function_and_equal_groups():
    """Guards: a grouped (not depthwise) conv's input space is structured in groups like heads but is
    no attention query-key space (the conv consumes it through its dims-within-group axis), so
    widening by 2 or 1.5 keeps the function exactly (it used to be rescaled by the query-key logit
    correction, silently: rel. error 1e-2); every width keeps the group count with equal groups, and
    an absolute width that the groups cannot split is refused."""
    from alignment.maps import query_key_spaces

    model, x = _grouped(), torch.randn(4, 1, 8, 8)
    for factor, c in ((2.0, 16), (1.5, 12), (0.5, 4)):
        resized = resize(model, factor, x)
        for i in (3, 6):
            assert (resized[i].groups, resized[i].in_channels, resized[i].out_channels) == (2, c, c)
        assert resized[11].in_features == c
        if factor > 1:
            with torch.no_grad():
                assert rel_err(model(x), resized(x)) < 1e-5
    assert query_key_spaces(discover(model, x)) == []
    with pytest.raises(WidthError, match="does not split into 2 heads"):
        resize(model, {"0": 9, "*": 1.0}, x)


def test_grouped_conv_fuses_across_widths_and_with_its_permuted_copy():
    """Guards: grouped-conv models of different widths fuse with ot, a model fuses exactly with a
    permuted copy of itself, and fusing one model into a wider target (ot) keeps its function."""
    import fusion
    from alignment.permute import permute

    x = torch.randn(12, 1, 8, 8)
    wide, narrow = _grouped(8, seed=0), _grouped(4, seed=1)
    fused = fusion.fuse([wide, narrow], x, method="ot", repair="none")
    assert (fused[3].groups, fused[3].out_channels) == (2, 8)
    with torch.no_grad():
        assert torch.isfinite(fused(x)).all()
    graph = discover(wide, x)
    copy = permute(wide, graph, graph.random_permutations(seed=2))
    with torch.no_grad():
        y = wide(x)
        assert rel_err(y, copy(x)) < 1e-5
        assert rel_err(y, fusion.fuse([wide, copy], x, method="permute", repair="none")(x)) < 1e-5
        assert rel_err(y, fusion.fuse([wide], x, method="ot", width=2.0, repair="none")(x)) < 1e-5
