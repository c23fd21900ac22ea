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


def test_map_stage_functions_raise_fusion_errors_that_name_the_argument():
    """Guards: every public map function refuses bad arguments with a FusionError naming them (a
    ValueError where it raised one before): ``plan_maps([], [])`` and a 1-D plan (before: IndexError),
    SpaceMap shapes and counts, ``fuse_tensors`` / ``apply_maps`` with too few graphs or weights
    (before: a bare ValueError), a selection index out of range (before: IndexError; a negative one
    wrapped around silently) and a "permutation" that repeats a feature (before: accepted)."""
    from alignment.errors import FusionError, InvalidOptionError, PermutationError
    from alignment.maps import fuse_tensors, plan_maps, selection_map
    from alignment.permute import model_tensors

    model = TinyMLP(width=4).eval()
    x = torch.randn(2, 1, 8, 8)
    graph = discover(model, x)
    maps = {"fc1": permutation_map([torch.arange(4), torch.arange(4)], [0.5, 0.5])}
    cases = [
        (lambda: plan_maps([], []), SpaceMismatchError, "no plans"),
        (lambda: plan_maps([torch.ones(4)], [1.0]), SpaceMismatchError, r"plan 0 has shape \(4,\)"),
        (lambda: SpaceMap([torch.eye(3)], [torch.eye(4)]), SpaceMismatchError, "do not fit"),
        (lambda: SpaceMap([torch.eye(3)], []), SpaceMismatchError, "1 merge and 0 unmerge"),
        (lambda: SpaceMap([torch.eye(3), torch.ones(2, 3)], [torch.eye(3), torch.ones(3, 2)]), SpaceMismatchError,
         "fused width"),
        (lambda: fuse_tensors([model_tensors(model)], [graph, graph], maps, [0.5, 0.5]), SpaceMismatchError,
         "one graph per model"),
        (lambda: fuse_tensors([model_tensors(model)] * 2, [graph, graph], maps, [1.0]), InvalidOptionError,
         "one weight per model"),
        (lambda: apply_maps([model, model], [graph], maps), SpaceMismatchError, "2 model.*1 graph"),
        (lambda: apply_maps([model, model], [graph, graph], maps, alpha=[1.0]), InvalidOptionError, "alpha"),
        (lambda: permutation_map([torch.tensor([0, 0, 1])], [1.0]), PermutationError, "not a permutation"),
        (lambda: permutation_map([torch.tensor([0.5, 1.0])], [1.0]), PermutationError, "integer"),
        (lambda: selection_map(torch.tensor([0, 5]), 3), PermutationError, r"index 5 .* 0\.\.2"),
        (lambda: selection_map(torch.tensor([-1, 0]), 3), PermutationError, "index -1"),
    ]
    for fn, error, message in cases:
        with pytest.raises(error, match=message) as info:
            fn()
        assert isinstance(info.value, (FusionError, ValueError)) and isinstance(info.value, ValueError), message


def test_plan_maps_reads_sparse_numpy_integer_and_list_plans_as_the_dense_plan():
    """Guards: plans given as a sparse tensor (before: NotImplementedError from a sparse kernel), a
    numpy array, an integer or boolean tensor, or nested lists give the maps of the float64 matrix."""
    from alignment.maps import plan_maps, permutation_plan

    P = permutation_plan(torch.tensor([2, 0, 3, 1]))
    Q = permutation_plan(torch.tensor([4, 1, 0, 2]), 6)
    want = plan_maps([P, Q], [0.3, 0.7])
    for form in (lambda T: T.to_sparse(), lambda T: T.numpy(), lambda T: T.long(), lambda T: T.bool(),
                 lambda T: T.tolist()):
        got = plan_maps([form(P), form(Q)], [0.3, 0.7])
        for a, b in zip(want.merge + want.unmerge, got.merge + got.unmerge):
            assert torch.equal(a, b)


class _Masked(nn.Module):
    """A per-unit boolean mask buffer on a hidden space (a pruning mask)."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b, self.head = nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, 5)
        self.register_buffer("mask", torch.rand(16, generator=torch.Generator().manual_seed(seed)) > 0.3)

    def forward(self, x):
        return self.head(torch.relu(self.b(self.a(x).masked_fill(~self.mask, 0.0))))


def test_a_boolean_buffer_on_a_space_is_carried_through_the_maps():
    """Guards: a boolean (or integer) tensor indexed by a space is permuted with it, so a permuted
    copy computes the model's function and fusing a model with it gives the model back (before: copied
    from model 0 in its old order, 0.35 relative error); where fused units merge members holding
    different values, fusion refuses with SpaceMismatchError naming the tensor (before: model 0's)."""
    import fusion

    model = _Masked(0).eval()
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(1))
    graph = discover(model, x[:2])
    assert any(m.tensor == "mask" for s in graph.spaces for m in s.members)
    perms = graph.random_permutations(seed=1)
    copy = permute(model, graph, perms)
    assert not torch.equal(copy.mask, model.mask) and copy.mask.dtype == torch.bool
    with torch.no_grad():
        assert rel_err(copy(x), model(x)) < 1e-5
        fused = fusion.fuse([model, copy], x, method="permute", repair="none")
        assert torch.equal(fused.mask, model.mask) and rel_err(fused(x), model(x)) < 1e-5
    other = _Masked(1).eval()  # another model with no unit masked: fused units pair masked and live units
    other.mask.fill_(True)
    with pytest.raises(SpaceMismatchError, match=r"tensor 'mask' \(torch.bool\) is indexed by fused units whose members"):
        fusion.fuse([model, other], x, method="permute", repair="none")


class _SharedTwice(nn.Module):
    """One Linear registered under two names and called twice."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b, self.head = nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, 5)
        self.c = self.b

    def forward(self, x):
        return self.head(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


def test_a_module_under_two_names_is_fused_once_under_both():
    """Guards: every name of a shared module's tensors gets the fused tensor (before: the name the
    trace did not read was copied unmapped, so any width change failed with a shape mismatch and a
    permuted copy was right only by the order the names were written in); the module stays shared."""
    import fusion
    from fusion.modules import check_consistency

    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(1))
    model, other = _SharedTwice(0).eval(), _SharedTwice(1).eval()
    graph = discover(model, x[:2])
    copy = permute(model, graph, graph.random_permutations(seed=1))
    assert copy.b is copy.c and not torch.equal(copy.b.weight, model.b.weight)
    with torch.no_grad():
        assert rel_err(copy(x), model(x)) < 1e-5
    for fused in (fusion.fuse([model], x, method="magnitude", width=0.5, repair="none"),
                  fusion.fuse([model, other], x, method="permute", width=0.5, repair="none")):
        assert fused.b is fused.c and tuple(fused.b.weight.shape) == (8, 8) and check_consistency(fused) == []
        assert fused(x).shape == (64, 5)


@pytest.mark.parametrize("policy, want", [
    ("consumers", [("b", "input", 0), ("b", "input", 1), ("head", "input", 0)]),
    ("producers", [("a", "output", 0), ("b", "output", 0), ("b", "output", 1)]),
])
def test_a_module_under_two_names_is_observed_at_every_call(policy, want):
    """Guards: the observation policies find a shared module's calls although its tensors go by
    another of its names (``c.weight``) than its hooks (``b``, its first name): the consumers policy
    read only the classifier's input, the producers policy only ``a``'s output, for every method."""
    from alignment.statistics import collect, observation_points

    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(1))
    model = _SharedTwice(0).eval()
    graph = discover(model, x[:2])
    assert graph.hook_path("c") == "b" and graph.hook_path("a") == "a"
    (space,) = graph.spaces
    assert [(o.module, o.io, o.call) for o in observation_points(space, graph, policy)] == want
    # and each point is collected: three points, each over the 64 samples
    stats = collect([model], [graph], x, points=policy)
    assert [p.count for p in stats.points[space.name]] == [64, 64, 64]
