"""The maps engine: W* = sum_i M_i[out] W_i U_i[in]."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from alignment import discover, permute
from alignment.errors import SpaceMismatchError
from alignment.maps import SpaceMap, permutation_map
from fusion.engine import apply_maps
from tests.conftest import rel_err
from tests.tiny_models import NAMES, TinyMLP, logits


@pytest.mark.parametrize("name", ["timm_resnet18", "timm_vit", "hf_vit", "cnn"])
def test_permutation_maps_equal_permute(tiny, name):
    model, x = tiny(name)
    graph = discover(model, x)
    perms = graph.random_permutations(seed=2)
    maps = {s.name: permutation_map([perms[s.name]], [1.0]) for s in graph.spaces if s.members}
    a = apply_maps([model], [graph], maps, alpha=[1.0])
    b = permute(model, graph, perms)
    for (n, ta), (_, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(ta.double(), tb.double(), atol=1e-6), n
    with torch.no_grad():
        assert rel_err(logits(model(x)), logits(a(x))) < 1e-5


def test_hand_built_maps_follow_the_formula():
    torch.manual_seed(0)
    models = [TinyMLP(width=6).eval(), TinyMLP(width=4).eval()]
    x = torch.randn(2, 1, 8, 8)
    graphs = [discover(m, x) for m in models]
    n = 5
    # fc1 and fc2 (joined by the residual add) form one space, "fc1"
    assert [s.name for s in graphs[0].spaces] == ["fc1"]
    M = [torch.randn(n, g["fc1"].width, dtype=torch.float64) for g in graphs]
    U = [torch.randn(g["fc1"].width, n, dtype=torch.float64) for g in graphs]
    maps = {"fc1": SpaceMap(M, U)}
    alpha = [0.3, 0.7]
    fused = apply_maps(models, graphs, maps, alpha=alpha)
    d = lambda t: t.detach().double()
    # fc1: output in the space, input fixed (pixels)
    want = sum(M[i] @ d(m.fc1.weight) for i, m in enumerate(models))
    assert torch.allclose(d(fused.fc1.weight), want, atol=1e-5)
    # fc2: output and input in the space
    want = sum(M[i] @ d(m.fc2.weight) @ U[i] for i, m in enumerate(models))
    assert torch.allclose(d(fused.fc2.weight), want, atol=1e-5)
    assert torch.allclose(d(fused.norm.weight), sum(M[i] @ d(m.norm.weight) for i, m in enumerate(models)), atol=1e-5)
    # fc3: output fixed (logits) so it takes alpha; input in the space
    want = sum(alpha[i] * d(m.fc3.weight) @ U[i] for i, m in enumerate(models))
    assert torch.allclose(d(fused.fc3.weight), want, atol=1e-5)
    want = sum(alpha[i] * d(m.fc3.bias) for i, m in enumerate(models))
    assert torch.allclose(d(fused.fc3.bias), want, atol=1e-6)
    assert fused.fc1.out_features == n and fused.norm.normalized_shape == (n,)


def test_missing_map_is_reported():
    model = TinyMLP(width=4).eval()
    x = torch.randn(2, 1, 8, 8)
    graph = discover(model, x)
    with pytest.raises(SpaceMismatchError, match="no map given for space"):
        apply_maps([model], [graph], {}, alpha=[1.0])


def test_space_map_checks_shapes():
    with pytest.raises(ValueError, match="do not fit"):
        SpaceMap([torch.zeros(3, 4)], [torch.zeros(3, 4)])


def test_model_dtype_is_the_first_floating_parameter_dtype():
    """Guards ``alignment.runner.model_dtype``: integer parameters are passed over, several models
    are read in order, and a model without floating parameters gives the default."""
    from alignment.runner import model_dtype

    holder = nn.Module()
    holder.count = nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)
    wide = nn.Linear(2, 2).double()
    assert model_dtype(holder, wide) == torch.float64
    assert model_dtype(nn.Linear(2, 2).bfloat16()) == torch.bfloat16
    assert model_dtype(holder) == torch.float32 and model_dtype(holder, default=None) is None
