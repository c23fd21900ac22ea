"""Discovery of alignment spaces: permutation invariance, coverage, errors, structure."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import alignment
from alignment import UnfollowableOpError, discover, permute
from alignment.errors import PermutationError
from tests import tiny_models
from tests.conftest import rel_err
from tests.tiny_models import NAMES, logits

# timm's ResNet-50 (bottlenecks; hf_resnet covers them in the default run) only in the slow run
FAMILIES = [pytest.param(n, marks=pytest.mark.slow) if n == "timm_resnet50" else n for n in NAMES]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", FAMILIES)
def test_random_permutation_keeps_function(tiny, name):
    model, x = tiny(name)
    before = _state(model)
    graph = discover(model, x)
    assert len(graph.alignable_spaces) > 0
    perms = graph.random_permutations(seed=1)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    permuted = permute(model, graph, perms)
    with torch.no_grad():
        y0, y1 = logits(model(x)), logits(permuted(x))
    assert rel_err(y0, y1) < 1e-5
    # the permuted model really differs, the input model is untouched
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), permuted.state_dict().values()))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training


@pytest.mark.parametrize("name", FAMILIES)
def test_every_axis_is_in_a_space_or_fixed(tiny, name):
    model, x = tiny(name)
    graph = discover(model, x)
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    assert set(graph.shapes) == set(tensors)
    for t, shape in graph.shapes.items():
        for ax, n in enumerate(shape):
            cover = torch.zeros(n, dtype=torch.long)
            for s in graph.spaces:
                for m in s.members:
                    if m.tensor == t and m.axis == ax:
                        assert m.stop - m.start == s.width
                        cover[m.start:m.stop] += 1
            for f in graph.fixed:
                if f.tensor == t and f.axis == ax:
                    assert f.reason
                    cover[f.start:f.stop] += 1
            assert bool((cover == 1).all()), f"{t} axis {ax} covered {cover.tolist()}"


def test_input_and_output_axes_are_fixed(tiny):
    model, x = tiny("timm_resnet18")
    graph = discover(model, x)
    fixed = {(f.tensor, f.axis): f.reason for f in graph.fixed}
    assert ("conv1.weight", 1) in fixed  # image channels
    assert ("fc.weight", 0) in fixed and ("fc.bias", 0) in fixed  # logits
    assert fixed[("conv1.weight", 2)] == "kernel"


class CumsumOverChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.mixer = Mixer()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.mixer(self.conv(x)).mean((2, 3)))


class Mixer(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, dim=1)


def test_unfollowable_op_raises_naming_op_and_module():
    model = CumsumOverChannels().eval()
    with pytest.raises(UnfollowableOpError) as info:
        discover(model, torch.randn(2, 1, 8, 8))
    err = info.value
    assert err.op == "aten.cumsum" and err.module == "mixer"
    assert "aten.cumsum" in str(err) and "`mixer`" in str(err) and "register_op_rule" in str(err)


@torch.library.custom_op("fusiontests::wobble", mutates_args=())
def _wobble(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


@_wobble.register_fake
def _(x):
    return torch.empty_like(x)


class UsesCustomOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(_wobble(self.fc1(x)))


def test_unknown_op_raises_then_registered_rule_is_used():
    model = UsesCustomOp().eval()
    x = torch.randn(4, 6)
    with pytest.raises(UnfollowableOpError, match="fusiontests.wobble"):
        discover(model, x)
    alignment.register_op_kind("fusiontests.wobble", "elementwise")
    graph = discover(model, x)
    assert [s.name for s in graph.alignable_spaces] == ["fc1"]
    p = permute(model, graph, graph.random_permutations(seed=0))
    with torch.no_grad():
        assert rel_err(model(x), p(x)) < 1e-6


def test_frozen_parameters_and_train_mode_are_left_alone(tiny):
    model, x = tiny("timm_vit")
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    before = _state(model)
    graph = discover(model, x)
    assert len(graph.alignable_spaces) == 7
    assert model.training and all(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_batchnorm_train_mode_discovery_does_not_touch_running_stats(tiny):
    model, x = tiny("timm_resnet18")
    model.train()
    before = _state(model)
    graph = discover(model, x)
    assert "layer1.0.conv1" in graph
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_attention_spaces_have_head_structure(tiny):
    model, x = tiny("timm_vit")
    graph = discover(model, x)
    qk, vo = graph["blocks.0.attn.qkv#0"], graph["blocks.0.attn.qkv#2"]
    assert (qk.num_heads, qk.head_dim, vo.num_heads, vo.head_dim) == (4, 16, 4, 16)
    assert qk.heads == vo.heads and graph[qk.heads].kind == "heads"
    # q and k rows of the fused qkv weight are in the same space, v rows in the other
    ranges = sorted((m.start, m.stop) for m in qk.members if m.tensor == "blocks.0.attn.qkv.weight")
    assert ranges == [(0, 64), (64, 128)]
    perms = graph.random_permutations(seed=5)
    for space in (qk, vo):
        blocks = perms[space.name].view(4, 16) // 16
        assert bool((blocks == blocks[:, :1]).all())  # heads move as whole blocks
        assert torch.equal(blocks[:, 0], perms[qk.heads])
    bad = dict(perms)
    bad[qk.name] = torch.arange(64).roll(3)
    with pytest.raises(PermutationError, match="splits heads"):
        graph.validate_permutations(bad)


def test_hf_vit_query_key_and_value_spaces(tiny):
    model, x = tiny("hf_vit")
    graph = discover(model, x)
    heads = [s for s in graph.spaces if s.num_heads]
    assert len(heads) == 4 and all(s.num_heads == 4 and s.head_dim == 16 for s in heads)
    qk = next(s for s in heads if any("k_proj" in m.tensor or "key" in m.tensor for m in s.members))
    assert any("q_proj" in m.tensor or "query" in m.tensor for m in qk.members)
    assert not any("v_proj" in m.tensor or "value" in m.tensor for m in qk.members)


def test_concat_segments_are_separate_spaces(tiny):
    model, x = tiny("cnn")
    graph = discover(model, x)
    mix_in = sorted((m.start, m.stop, s.name) for s in graph.spaces for m in s.members
                    if m.tensor == "mix.weight" and m.axis == 1)
    assert [(a, b) for a, b, _ in mix_in] == [(0, 4), (4, 8)]
    assert mix_in[0][2] == "b" and mix_in[1][2] == "c2"
    roles = {(m.tensor, m.axis): m.role for s in graph.spaces for m in s.members}
    assert roles[("mix.weight", 1)] == "in" and roles[("mix.weight", 0)] == "out"
    assert roles[("proj", 1)] == "in" and roles[("gamma", 0)] == "out"


def test_spaces_pair_by_name_across_widths():
    x = torch.randn(2, 1, 28, 28)
    for small, big in ((tiny_models.timm_resnet18((8, 16, 32, 64)), tiny_models.timm_resnet18()),
                       (tiny_models.timm_vit(32), tiny_models.timm_vit(64)),
                       (tiny_models.hf_vit(32), tiny_models.hf_vit(64))):
        ga, gb = discover(small.eval(), x), discover(big.eval(), x)
        assert [s.name for s in ga.spaces] == [s.name for s in gb.spaces]
        # every hidden width doubles, except timm's default ResNet stem (64 wide whatever stem_width)
        assert all(a.width * 2 == b.width or (a.name == "conv1" and a.width == b.width == 64)
                   for a, b in zip(ga.alignable_spaces, gb.alignable_spaces))


def test_observation_points_read_the_space_features(tiny):
    model, x = tiny("timm_resnet18")
    graph = discover(model, x)
    space = graph["layer1.0.conv1"]
    modules = dict(model.named_modules())
    seen = {}
    hooks = []
    for ob in space.observations:
        def hook(mod, inp, out, ob=ob):
            t = out if ob.io == "output" else inp[0]
            seen[(ob.module, ob.io)] = t.shape[ob.dim]

        if ob.io == "output":
            hooks.append(modules[ob.module].register_forward_hook(hook))
        else:
            hooks.append(modules[ob.module].register_forward_hook(lambda m, i, o, h=hook: h(m, i, o)))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert ("layer1.0.conv1", "output") in seen and ("layer1.0.conv2", "input") in seen
    assert set(seen.values()) == {space.width}


def test_same_seed_same_permutations(tiny):
    model, x = tiny("timm_vit")
    graph = discover(model, x)
    a, b = graph.random_permutations(seed=7), graph.random_permutations(seed=7)
    c = graph.random_permutations(seed=8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_permute_rejects_bad_permutations(tiny):
    model, x = tiny("mlp")
    graph = discover(model, x)
    with pytest.raises(PermutationError, match="not a bijection"):
        permute(model, graph, {"fc1": torch.zeros(32, dtype=torch.long)})
    with pytest.raises(alignment.SpaceMismatchError):
        permute(model, graph, {"nope": torch.arange(3)})


def test_summary_lists_spaces(tiny):
    model, x = tiny("mlp")
    graph = discover(model, x)
    text = graph.summary()
    assert "fc1" in text and "width=32" in text and repr(graph).startswith("Graph(TinyMLP")


def test_export_failure_is_reported():
    class Broken(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return x
            return -x

    with pytest.raises(alignment.ExportError, match="Broken"):
        discover(Broken(), torch.randn(2, 3))


def test_deepcopy_is_not_required_by_user():
    # discovery must not leave hooks or state on the model
    model = tiny_models.TinyMLP().eval()
    state = copy.deepcopy(model.state_dict())
    discover(model, torch.randn(2, 1, 8, 8))
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


class _Masked(nn.Module):
    """Tokens with a class token, a mask token the traced forward never reads (it replaces masked
    tokens only when a mask is given, as in DINOv2) and an auxiliary head that never runs."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.mask_token = nn.Parameter(torch.randn(1, d))
        self.fc1, self.fc2, self.head = nn.Linear(d, 16), nn.Linear(16, d), nn.Linear(d, 3)
        self.aux = nn.Linear(d, 3)

    def forward(self, x, mask=None):
        h = self.embed(x)
        if mask is not None:
            h = torch.where(mask[..., None], self.mask_token.expand_as(h), h)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], 1)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(h[:, 0])


def test_a_tensor_the_forward_never_reads_follows_its_modules_features():
    """Guards: a parameter the traced forward does not read (a mask token used only with a mask) is
    permuted, fused and resized with the features of its module's other tensors, so the masked path
    of a permuted copy and of the fused model computes what the model does; a tensor with no such
    sibling (a head that never runs) is kept as it is; both are noted by discovery and reported."""
    import warnings

    import fusion

    torch.manual_seed(0)
    model = _Masked().eval()
    x = torch.randn(64, 5, 4)
    mask = torch.rand(64, 5) < 0.4
    graph = discover(model, x[:2])
    assert any("follow the features" in n and "mask_token" in n and "aux" not in n for n in graph.notes)
    assert any("kept as they are" in n and "aux.weight, aux.bias" in n for n in graph.notes)
    copy_ = permute(model, graph, graph.random_permutations(seed=3))
    assert not torch.equal(copy_.mask_token, model.mask_token)
    with torch.no_grad():
        assert rel_err(copy_(x, mask), model(x, mask)) < 1e-5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = fusion.fuse([model, copy_], x, method="permute", repair="none")
    report = fused.fusion_report.fallbacks
    assert any("mask_token" in f for f in report) and any("aux.weight" in f for f in report)
    assert any("mask_token" in str(w.message) for w in caught)
    with torch.no_grad():
        assert rel_err(fused(x, mask), model(x, mask)) < 1e-5
    # resized with its space: the masked path runs at the new width
    half = fusion.fuse([model], x, width=0.5, repair="none")
    assert half.mask_token.shape == (1, 4) and half.aux.weight.shape == (3, 8)
    with torch.no_grad():
        assert half(x, mask).shape == (64, 3)


class _CrossAttention(nn.Module):
    """Attention pooling as SigLIP's head does it: a learned probe queries the tokens through
    ``nn.MultiheadAttention(probe, h, h)``, so the query rows of ``in_proj_weight`` feed one linear
    and its key and value rows another (split, then unflatten/unsqueeze/transpose/squeeze/select)."""

    def __init__(self, batch_first: bool, need_weights: bool):
        super().__init__()
        self.need_weights = need_weights
        self.embed = nn.Linear(6, 16)
        self.probe = nn.Parameter(torch.randn(1, 1, 16))
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        q = self.probe.expand(x.shape[0], -1, -1)
        if not self.attn.batch_first:
            q, h = q.transpose(0, 1), h.transpose(0, 1)
        y = self.attn(q, h, h, need_weights=self.need_weights)[0]
        return self.head(y[:, 0] if self.attn.batch_first else y[0])


@pytest.mark.parametrize("batch_first,need_weights", [(True, True), (False, False)])
def test_cross_attention_permuted_copy_keeps_function(batch_first, need_weights):
    """Guards: a permuted copy of a model with ``nn.MultiheadAttention`` used as cross-attention
    (query differs from key and value) computes the model's function, and so does the model fused
    with it. ``in_proj_weight`` never appears whole in an activation (its query rows and its key
    and value rows feed different linears): it used to be kept fixed while ``out_proj`` columns,
    which read the value rows, were permuted. Its rows follow the query-key and value-output spaces
    (in heads) as for self-attention."""
    import fusion

    torch.manual_seed(0)
    model = _CrossAttention(batch_first, need_weights).eval()
    x = torch.randn(32, 5, 6)
    graph = discover(model, x[:2])
    copy_ = permute(model, graph, graph.random_permutations(seed=1))
    fused = fusion.fuse([model, copy_], x, method="permute", repair="none")
    with torch.no_grad():
        y = model(x)
        assert rel_err(copy_(x), y) < 1e-5
        assert rel_err(fused(x), y) < 1e-5
    assert not torch.equal(copy_.attn.in_proj_weight, model.attn.in_proj_weight)
    # query and key rows in one space, value rows with the out_proj columns in another, in 4 heads
    members = {s.name: {(m.tensor, m.axis, m.start, m.stop) for m in s.members} for s in graph.spaces}
    qk = next(n for n, ms in members.items() if ("attn.in_proj_weight", 0, 0, 16) in ms)
    assert {("attn.in_proj_weight", 0, 16, 32), ("attn.in_proj_bias", 0, 0, 16)} <= members[qk]
    vo = next(n for n, ms in members.items() if ("attn.in_proj_weight", 0, 32, 48) in ms)
    assert {("attn.out_proj.weight", 1, 0, 16), ("attn.in_proj_bias", 0, 32, 48)} <= members[vo] and vo != qk
    assert [s.width for s in graph.spaces if s.kind == "heads"] == [4]


class _ProbePooling(nn.Module):
    """Attention pooling with keys and values of another width (``kdim``/``vdim``: separate
    ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``) queried by a learned probe: the probe's
    space and the projections' spaces have no observation point, so their units are compared by
    their weights, which depend on each other's plans."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.probe = nn.Parameter(torch.randn(1, 2, 24))
        self.attn = nn.MultiheadAttention(24, 4, kdim=16, vdim=16, batch_first=True)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        f = self.conv(x).relu().flatten(2).transpose(1, 2)
        o = self.attn(self.probe.expand(x.shape[0], -1, -1), f, f)[0]
        return self.head(o.mean(1))


@pytest.mark.parametrize("method", ["permute", "ot"])
def test_spaces_compared_by_weights_are_solved_with_their_neighbours_plans(method):
    """Guards: spaces without activation statistics that neighbour each other (a probe and the
    projection it feeds) are solved again until their plans settle, so a model fused with its
    permuted copy is the model (before: the probe's space was matched once against its neighbour's
    unmatched weights, off by 1e-3 relative)."""
    import fusion

    torch.manual_seed(0)
    model = _ProbePooling().eval()
    x = torch.randn(64, 3, 8, 8)
    graph = discover(model, x[:2])
    copy_ = permute(model, graph, graph.random_permutations(seed=3))
    al = fusion.align([model, copy_], x, method=method)
    assert any("probe" in n and "compared by their weights" in n for n in al.report.fallbacks)
    with torch.no_grad():
        assert rel_err(al.build(repair="none")(x), model(x)) < 1e-5


def _run_isolated(code: str, timeout: float = 90.0) -> dict:
    """Run ``code`` in a fresh interpreter (one that loops forever fails the test instead of hanging
    it) and return the JSON object it prints last."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    try:
        res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"discovery did not finish in {timeout:.0f} s")
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


_EMPTY_PREFIX = '''
import json, torch, warnings
from torch import nn
import alignment, fusion
torch.set_num_threads(1)

class Rope(nn.Module):
    """Patch tokens of a 4 x 4 grid after a class token and zero register tokens, split off again
    and multiplied by a table over the grid's positions (DINOv3's RoPE with num_register_tokens=0)."""
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.reg = nn.Parameter(torch.zeros(1, 0, 8))
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 5)
    def forward(self, x):
        p = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(x), -1, -1), self.reg.expand(len(x), -1, -1), p], 1)
        prefix, patches = t.split((1, 16), 1)
        r = torch.arange(4.0, device=x.device)
        coords = torch.stack(torch.meshgrid(r, r, indexing="ij"), -1).flatten(0, 1)
        h = self.fc1(torch.cat([prefix, patches * coords.sum(-1, keepdim=True)], 1)).relu()
        return self.fc2(h).mean(1)

def check(model, x, out=lambda y: y):
    graph = alignment.discover(model, x[:2])
    copy_ = alignment.permute(model, graph, graph.random_permutations(seed=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = fusion.fuse([model, copy_], x, method="permute", repair="none")
    with torch.no_grad():
        y = out(model(x))
        err = lambda z: float((out(z) - y).norm() / y.norm())
        return {"spaces": len(graph.alignable_spaces), "copy": err(copy_(x)), "fused": err(fused(x)),
                "moved": any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                                    copy_.state_dict().values()))}
'''


def test_concatenation_with_an_empty_segment_terminates():
    """Guards: a concatenation holding an empty segment (zero register tokens between the class
    token and the patches), split again and met with the patch grid's factorisation, used to refine
    the two structures forever (the empty segment's boundary at the axis' end can never be cut):
    discovery hung. Empty segments index nothing and are left out; the model permutes and fuses."""
    r = _run_isolated(_EMPTY_PREFIX + '''
torch.manual_seed(0)
print(json.dumps(check(Rope().eval(), torch.randn(16, 3, 16, 16))))
''', timeout=60)
    assert r["spaces"] >= 1 and r["moved"]
    assert r["copy"] < 1e-5 and r["fused"] < 1e-5


def test_hf_dinov3_with_rope_and_no_register_tokens():
    """Guards: transformers' DINOv3 ViT (RoPE computed from ``inv_freq`` on the patch tokens only,
    no register tokens) is discovered in seconds; its permuted copy and its fusion with that copy
    compute the model's function (query-key dims follow the RoPE frequencies: rotate_half pairs dim
    i with i + d/2, both halves and both grid coordinates share one frequency permutation)."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DINOv3ViTModel"):
        pytest.skip("this transformers has no DINOv3ViTModel")
    r = _run_isolated(_EMPTY_PREFIX + '''
import transformers
torch.manual_seed(0)
cfg = transformers.DINOv3ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=128, image_size=32, patch_size=8, num_register_tokens=0)
model = transformers.DINOv3ViTModel(cfg).eval()
print(json.dumps(check(model, torch.randn(16, 3, 32, 32), lambda y: y.last_hidden_state)))
''', timeout=90)
    assert r["spaces"] >= 4 and r["moved"]
    assert r["copy"] < 1e-4 and r["fused"] < 1e-4


class _RegisteredBackwards(nn.Module):
    """Layers registered in the reverse of the order the forward pass runs them."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.c = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.a = nn.Linear(5, 8)

    def forward(self, x):
        return self.head(self.c(self.b(self.a(x).relu()).relu()).relu())


def test_forward_order_follows_the_forward_pass_not_the_registration():
    """Guards: Graph.forward_order lists spaces as the forward pass writes them (a, b, c), while
    Graph.spaces keeps the registration order the docstring now states (c's output space before a's)."""
    graph = discover(_RegisteredBackwards(), torch.randn(2, 5))
    assert graph.modules == ["a", "b", "c", "head"]
    written = [s.producers[0] for s in graph.forward_order()]
    assert written == ["a", "b", "c"], written
    assert [s.producers[0] for s in graph.spaces] != written


def test_example_args_are_how_an_example_input_is_passed():
    """Guards: a dict example gives keyword inputs, a tuple or list positional ones, a tensor the
    one positional input (discovery and the fused-model run check call models so)."""
    from alignment.discover import example_args

    x = torch.zeros(2, 3)
    assert example_args({"pixel_values": x}) == ((), {"pixel_values": x})
    assert example_args((x, x)) == ((x, x), {}) and example_args([x]) == ((x,), {})
    args, kwargs = example_args(x)
    assert len(args) == 1 and args[0] is x and kwargs == {}
