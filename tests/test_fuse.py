"""fuse(): exactness on permuted copies, determinism, no mutation, methods and repairs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fusion
from alignment import discover, permute
from alignment.errors import SpaceMismatchError
from alignment.methods import UnknownMethodError
from alignment.errors import CalibrationError
from fusion.repair import UnknownRepairError
from tests.conftest import rel_err
from tests.tiny_models import build, logits


def _permuted_copy(name, seed=0):
    model, x = build(name, seed=seed)
    graph = discover(model, x)
    other = permute(model, graph, graph.random_permutations(seed=11))
    cal = torch.randn(48, *x.shape[1:], generator=torch.Generator().manual_seed(5))
    return model, other, x, cal


@pytest.mark.parametrize("name", ["cnn", "timm_vit", "timm_resnet18", "hf_vit"])
@pytest.mark.parametrize("method", ["permute", "weight_matching"])
def test_fusing_a_permuted_copy_returns_the_original(name, method):
    model, other, x, cal = _permuted_copy(name)
    fused = fusion.fuse([model, other], cal, method=method, repair="none")
    with torch.no_grad():
        y0, y1 = logits(model(x)), logits(fused(x))
    assert rel_err(y0, y1) < 1e-5
    rep = fused.fusion_report
    assert rep.method == method and "match" in rep.seconds and "apply" in rep.seconds


@pytest.mark.parametrize("method", ["permute", "weight_matching"])
def test_matched_permutations_feed_alignment_permute(method):
    # property: result.permutations(i) is a complete, consistent permutation set (heads spaces
    # included) that alignment.permute accepts and that undoes the random permutation
    model, other, x, cal = _permuted_copy("timm_vit")
    al = fusion.align([model, other], cal, method=method)
    graph = al.graphs[1]
    perms = al.result.permutations(1)
    assert {s.name for s in graph.spaces if s.kind == "heads"} <= set(perms)
    restored = permute(other, graph, perms)
    with torch.no_grad():
        assert rel_err(logits(model(x)), logits(restored(x))) < 1e-5


def test_plain_average_of_a_permuted_copy_is_not_the_original():
    model, other, x, cal = _permuted_copy("cnn")
    fused = fusion.fuse([model, other], cal, method="average", repair="none")
    with torch.no_grad():
        assert rel_err(logits(model(x)), logits(fused(x))) > 1e-2


def test_three_models_merge_many():
    model, x = build("timm_vit")
    graph = discover(model, x)
    copies = [permute(model, graph, graph.random_permutations(seed=s)) for s in (1, 2)]
    cal = torch.randn(32, 1, 28, 28)
    fused = fusion.fuse([model, *copies], cal, method="permute", repair="none", iterations=2)
    with torch.no_grad():
        assert rel_err(model(x), fused(x)) < 1e-5


def test_same_seed_same_weights_and_inputs_untouched():
    a, x = build("cnn", seed=0)
    b, _ = build("cnn", seed=1)
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in (a, b)]
    cal = torch.randn(32, 1, 12, 12)
    # a few sweeps suffice: the property is determinism, not convergence
    f1 = fusion.fuse([a, b], cal, method="weight_matching", repair="reset_bn", seed=3, max_iter=3)
    f2 = fusion.fuse([a, b], cal, method="weight_matching", repair="reset_bn", seed=3, max_iter=3)
    for (k, v1), v2 in zip(f1.state_dict().items(), f2.state_dict().values()):
        assert torch.equal(v1, v2), k
    for m, st in zip((a, b), states):
        assert all(torch.equal(st[k], v) for k, v in m.state_dict().items())
        assert not m.training


def test_alpha_endpoints_give_each_model():
    a, x = build("mlp", seed=0)
    b, _ = build("mlp", seed=1)
    cal = torch.randn(64, 1, 8, 8)
    for alpha, ref in ((0.0, a), (1.0, b)):
        fused = fusion.fuse([a, b], cal, method="permute", repair="none", alpha=alpha)
        with torch.no_grad():
            assert rel_err(ref(x), fused(x)) < 1e-5


def test_reset_bn_recomputes_running_statistics():
    a, x = build("timm_resnet18", seed=0)
    b, _ = build("timm_resnet18", seed=1)
    cal = torch.randn(64, 1, 28, 28)
    raw = fusion.fuse([a, b], cal, method="permute", repair="none")
    reset = fusion.fuse([a, b], cal, method="permute", repair="reset_bn")
    assert not torch.allclose(raw.bn1.running_var, reset.bn1.running_var)
    # after the reset, bn1's running mean is the mean of conv1's output on the calibration data
    with torch.no_grad():
        h = reset.conv1(cal)
    torch.testing.assert_close(reset.bn1.running_mean, h.mean((0, 2, 3)), rtol=1e-4, atol=1e-4)
    assert not reset.training


def _output_stats(model, path, cal):
    got = {}
    mod = dict(model.named_modules())[path]
    def hook(m, i, o):  # returns None: a hook that returns a value replaces the module's output
        got.setdefault("o", o.detach().clone())

    h = mod.register_forward_hook(hook)
    with torch.no_grad():
        model(cal)
    h.remove()
    o = got["o"].movedim(1, -1) if got["o"].dim() == 4 else got["o"]
    o = o.reshape(-1, o.shape[-1]).double()
    return o.mean(0), o.std(0, unbiased=False)


def test_repair_gives_layernorm_outputs_the_interpolated_source_statistics():
    """REPAIR on a LayerNorm network: each norm output channel gets the mean and the std (signed by
    each source's norm weight) of the interpolated aligned source channels."""
    a, x = build("timm_vit", seed=0)
    b, _ = build("timm_vit", seed=1)
    cal = torch.randn(64, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    al = fusion.align([a, b], cal, method="permute")
    fused = al.build(repair="repair")
    assert fused.fusion_report.repair == "repair"
    for path, space in (("norm", "patch_embed.proj"), ("blocks.0.norm1", "patch_embed.proj")):
        (ma, sa), (mb, sb), (mf, sf) = (_output_stats(m, path, cal) for m in (a, b, fused))
        pa, pb = (al.result.permutations(i)[space] for i in range(2))
        wa, wb = (torch.sign(dict(m.named_modules())[path].weight.detach().double()) for m in (a, b))
        torch.testing.assert_close(sf, (0.5 * (wa[pa] * sa[pa] + wb[pb] * sb[pb])).abs(), rtol=0.05, atol=1e-3)
        torch.testing.assert_close(mf, 0.5 * (ma[pa] + mb[pb]), rtol=0.05, atol=0.05)


def _repaired(al, cal, monkeypatch=None, count: str | None = None):
    """REPAIR of ``al``'s permute fusion (a fresh copy of the unrepaired model), and how many times
    module ``count`` of the fused model ran during it."""
    import copy

    from fusion.repair import repair

    base = al.build(repair="none")
    fused = copy.deepcopy(base)
    calls = [0]
    if count is not None:
        dict(fused.named_modules())[count].register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    repair(fused, al.models, al.graphs, al.maps([0.5, 0.5]), [0.5, 0.5], cal)
    return fused, calls[0]


def test_repair_of_layernorms_by_replay_equals_one_whole_pass_per_layer(monkeypatch):
    """The layer-by-layer correction of LayerNorms runs each pass only from the previous norm to the
    next (a replay of cached activations): its weights are those of one whole forward pass per
    layer, bit for bit, while the fused model's first layer runs once per batch instead of once per
    batch and norm."""
    import fusion.repair as rep

    a, x = build("timm_vit", seed=0)
    b, _ = build("timm_vit", seed=1)
    cal = torch.randn(40, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    al = fusion.align([a, b], cal, method="permute")
    norms = sum(isinstance(m, torch.nn.LayerNorm) for m in a.modules())
    assert norms >= 4
    batches = 3
    loader = torch.utils.data.DataLoader(cal, batch_size=16)  # 16 + 16 + 8
    fast, runs = _repaired(al, loader, count="patch_embed.proj")  # (a served call still runs its hooks)
    monkeypatch.setattr(rep, "_correct_by_replay", lambda *args: False)
    slow, runs_slow = _repaired(al, loader, count="patch_embed.proj")
    base = al.build(repair="none")
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, fast.state_dict()[k])]
    assert changed and all("norm" in k for k in changed)
    for k, v in slow.state_dict().items():
        assert torch.equal(v, fast.state_dict()[k]), k
    assert runs <= batches + 1  # the recording pass and one pass over the batches
    assert runs_slow >= norms * batches


class _SharedNorm(torch.nn.Module):
    """One LayerNorm called twice per forward pass, registered after the layers it follows."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, x):
        h = self.norm(self.fc1(x))
        return self.head(self.norm(self.fc2(torch.relu(h))))


def test_repair_of_a_norm_called_twice_measures_both_calls(monkeypatch):
    """A norm module called twice per forward pass cannot be replayed (its first call would be
    served uncorrected): it is measured over both calls by whole passes, as the reference does."""
    import fusion.repair as rep

    torch.manual_seed(0)
    a, b = _SharedNorm(), _SharedNorm()
    for m in (a, b):  # norms with their own affines, so that a wrong measure shows
        torch.nn.init.normal_(m.norm.weight, 1.0, 0.3)
        torch.nn.init.normal_(m.norm.bias, 0.0, 0.3)
    cal = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    al = fusion.align([a, b], cal, method="permute")
    declined = []
    real = rep._correct_by_replay
    monkeypatch.setattr(rep, "_correct_by_replay", lambda *args: declined.append(real(*args)) or declined[-1])
    got, _ = _repaired(al, cal)
    assert declined == [False]
    base = al.build(repair="none")
    assert not torch.equal(got.norm.weight, base.norm.weight)
    # what the correction read: the statistics of both calls (a hook sees every call)
    from fusion.repair import output_stats

    mu_f, sd_f = output_stats(base, [("norm", -1)], cal)["norm"]
    outs = []
    h = base.norm.register_forward_hook(lambda m, i, o: outs.append(o.detach().double()))
    with torch.no_grad():
        base(cal)
    h.remove()
    assert len(outs) == 2
    both = torch.cat(outs)
    torch.testing.assert_close(mu_f, both.mean(0), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sd_f, both.std(0, unbiased=False), rtol=1e-9, atol=1e-9)
    assert not torch.allclose(mu_f, outs[0].mean(0), atol=1e-3)  # the first call alone differs


def test_repair_beyond_its_replay_budget_runs_whole_passes_and_says_so():
    """With replay_gib too small for the calibration set, REPAIR measures each norm by a whole pass:
    the same weights bit for bit, and the report says why it was slower; a negative budget is an
    option error raised before any work."""
    from alignment.errors import InvalidOptionError

    a, x = build("timm_vit", seed=0)
    b, _ = build("timm_vit", seed=1)
    cal = torch.randn(40, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    al = fusion.align([a, b], cal, method="permute")
    fast = al.build(repair="repair")
    assert not any("replay_gib" in f for f in fast.fusion_report.fallbacks)
    with pytest.warns(UserWarning, match="replay_gib"):
        slow = al.build(repair="repair", repair_options={"replay_gib": 0.0})
    assert any("one whole forward pass per norm layer" in f for f in slow.fusion_report.fallbacks)
    for k, v in fast.state_dict().items():
        assert torch.equal(v, slow.state_dict()[k]), k
    with pytest.raises(InvalidOptionError, match="replay_gib"):
        fusion.fuse([a, b], cal, method="permute", repair="repair", repair_options={"replay_gib": -1})


def test_repair_measures_the_sources_once_per_alignment(monkeypatch):
    """The sources' norm statistics do not depend on alpha: building several fused models from one
    alignment (an interpolation curve) runs the sources over the data once, and each build's
    weights are those of a fresh alignment's build, bit for bit."""
    import fusion.repair as rep

    a, x = build("timm_vit", seed=0)
    b, _ = build("timm_vit", seed=1)
    cal = torch.randn(40, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    al = fusion.align([a, b], cal, method="permute")
    measured = []
    real = rep.output_stats
    def spy(model, *args, **kw):
        measured.extend(model if isinstance(model, (list, tuple)) else [model])
        return real(model, *args, **kw)

    monkeypatch.setattr(rep, "output_stats", spy)
    first = al.build([0.5, 0.5], repair="repair")
    assert [m for m in measured if m is a or m is b] == [a, b]
    second = al.build([0.3, 0.7], repair="repair")
    assert [m for m in measured if m is a or m is b] == [a, b]
    monkeypatch.undo()
    fresh = fusion.align([a, b], cal, method="permute")
    for got, w in ((first, [0.5, 0.5]), (second, [0.3, 0.7])):
        want = fresh.build(w, repair="repair")
        for k, v in want.state_dict().items():
            assert torch.equal(v, got.state_dict()[k]), k
        fresh = fusion.align([a, b], cal, method="permute")


class _ReversedNorms(torch.nn.Module):
    """Two LayerNorms registered in the opposite order of the forward pass."""

    def __init__(self):
        super().__init__()
        self.norm2 = torch.nn.LayerNorm(16)
        self.fc1, self.fc2, self.head = torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)
        self.norm1 = torch.nn.LayerNorm(16)

    def forward(self, x):
        h = self.norm1(self.fc1(x))
        return self.head(self.norm2(self.fc2(torch.relu(h))))


@pytest.mark.parametrize("replay_gib", [4.0, 0.0])
def test_repair_corrects_norms_in_forward_order_whatever_their_registration(replay_gib):
    """Each norm is measured after the corrections of the norms before it *in the forward pass*
    (replayed or by whole passes): REPAIR run again on its own result changes nothing. Corrected in
    registration order, norm2 would be measured before norm1 moved its inputs."""
    import copy

    from fusion.repair import repair

    torch.manual_seed(0)
    a, b = _ReversedNorms(), _ReversedNorms()
    cal = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    al = fusion.align([a, b], cal, method="permute")
    once = al.build(repair="repair", repair_options={"replay_gib": replay_gib})
    base = al.build(repair="none")
    assert not torch.allclose(once.norm2.weight, base.norm2.weight)
    twice = repair(copy.deepcopy(once), al.models, al.graphs, al.maps([0.5, 0.5]), [0.5, 0.5], cal,
                   replay_gib=replay_gib)
    for k, v in once.state_dict().items():
        torch.testing.assert_close(twice.state_dict()[k], v, rtol=1e-4, atol=1e-5)


def test_output_stats_of_several_models_in_one_pass_equal_each_alone():
    """output_stats over a list of models (one pass over the data) gives each model's statistics
    exactly as a pass of that model alone, and they are the moments of the layer's outputs."""
    from fusion.repair import output_stats

    a, x = build("timm_vit", seed=0)
    b, _ = build("timm_vit", seed=1)
    cal = torch.randn(40, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    layers = [("blocks.0.norm1", -1), ("norm", -1)]
    both = output_stats([a, b], layers, cal)
    for m, got in zip((a, b), both):
        alone = output_stats(m, layers, cal)
        for path, _ in layers:
            assert torch.equal(got[path][0], alone[path][0]) and torch.equal(got[path][1], alone[path][1])
    mean, std = _output_stats(b, "norm", cal)
    torch.testing.assert_close(both[1]["norm"][0], mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(both[1]["norm"][1], std, rtol=1e-6, atol=1e-6)


def test_repair_on_batchnorm_sets_the_affine_before_the_reset():
    """REPAIR on a BatchNorm network normalises every BN against the upstream it sees after all
    corrections: on the calibration data, each BN output has mean = bias and std = |weight| (a
    stale running statistic anywhere would break this downstream)."""
    a, x = build("timm_resnet18", seed=0)
    b, _ = build("timm_resnet18", seed=1)
    cal = torch.randn(64, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    fused = fusion.fuse([a, b], cal, method="permute", repair="repair")
    for path in ("bn1", "layer2.0.bn2", "layer4.1.bn1"):
        bn = dict(fused.named_modules())[path]
        m, s = _output_stats(fused, path, cal)
        # (not exact: the reset pass normalises upstream BNs by the biased batch variance, eval by
        # the unbiased running one, a factor sqrt(n / (n - 1)) that compounds; layer4 sees n = 64
        # values per channel. A stale statistic is off by order 1)
        torch.testing.assert_close(m, bn.bias.detach().double(), rtol=0, atol=3e-2)
        torch.testing.assert_close(s, bn.weight.detach().double().abs(), rtol=5e-2, atol=1e-3)


def test_list_methods_and_errors():
    assert {"average", "permute", "weight_matching"} <= set(fusion.list_methods())
    a, x = build("mlp")
    with pytest.raises(UnknownMethodError, match="registered"):
        fusion.fuse([a, a], x, method="nope")
    with pytest.raises(UnknownRepairError, match="reset_bn"):
        fusion.fuse([a, a], x, repair="nope")
    with pytest.raises(CalibrationError, match="calibration"):
        fusion.fuse([a, a], None, method="permute", repair="none", example_input=x)
    wide, _ = build("cnn")
    from tests.tiny_models import TinyCNN

    narrow = TinyCNN(c=4).eval()
    for method in ("average", "weight_matching"):
        with pytest.raises(SpaceMismatchError, match="equal widths"):
            fusion.fuse([wide, narrow], torch.randn(8, 1, 12, 12), method=method, repair="none")


def test_fusing_a_model_with_itself_returns_it():
    model, x = build("timm_resnet18")
    cal = torch.randn(16, 1, 28, 28)
    fused = fusion.fuse([model, model], cal, method="permute", repair="none")
    with torch.no_grad():
        assert rel_err(model(x), fused(x)) < 1e-5


def test_the_default_repair_resets_batchnorm_where_there_is_some_and_is_quiet_elsewhere(tiny):
    """Guards: repair='auto' (fuse's and the CLI's default) is the BatchNorm reset on a ResNet (the
    same weights) and nothing on a ViT, where it reports no fallback; the report says which ran."""
    import warnings

    from alignment.errors import FallbackWarning

    for name, ran in (("timm_vit", "none"), ("timm_resnet18", "reset_bn")):
        a, x = tiny(name)
        b, _ = build(name, seed=1)
        cal = torch.randn(16, *x.shape[1:], generator=torch.Generator().manual_seed(0))
        al = fusion.align([a, b], cal, method="permute")
        with warnings.catch_warnings():
            warnings.simplefilter("error", FallbackWarning)
            auto = fusion.fuse([a, b], cal)
        assert auto.fusion_report.repair == "auto" and auto.fusion_report.repaired == ran, name
        assert f"auto ({ran})" in auto.fusion_report.summary()
        explicit = al.build(repair=ran)
        assert all(torch.equal(u, v) for u, v in zip(auto.state_dict().values(), explicit.state_dict().values())), name


def test_a_bn_reset_with_no_batchnorm_to_reset_is_reported(tiny):
    """Guards: repair='reset_bn' asked for on a ViT resets nothing; that is listed in the
    fusion report and warned, naming the repair that would act, and not said for BatchNorm nets."""
    import warnings

    from alignment.errors import FallbackWarning

    vit, x = tiny("timm_vit")
    other, _ = build("timm_vit", seed=1)
    cal = torch.randn(16, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    with pytest.warns(FallbackWarning, match="no BatchNorm layer with running statistics.*repair='repair'"):
        fused = fusion.fuse([vit, other], cal, repair="reset_bn")
    assert any("reset_bn" in f for f in fused.fusion_report.fallbacks)
    cnn, xc = tiny("timm_resnet18")
    cnn2, _ = build("timm_resnet18", seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        fused = fusion.fuse([cnn, cnn2], torch.randn(16, *xc.shape[1:]), repair="reset_bn")
    assert fused.fusion_report.fallbacks == []


def test_a_repair_with_no_norm_layer_to_rescale_is_reported():
    """Guards: repair='repair' on models without norm layers changes nothing, and the fusion report
    lists that and warns (before: reported as repaired, silently)."""
    from torch import nn

    from alignment.errors import FallbackWarning

    def mlp(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()

    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    plain = fusion.fuse([mlp(0), mlp(1)], x, repair="none")
    with pytest.warns(FallbackWarning, match="repair 'repair': the fused model has no norm layer"):
        repaired = fusion.fuse([mlp(0), mlp(1)], x, repair="repair")
    assert any("nothing was repaired" in f for f in repaired.fusion_report.fallbacks)
    assert all(torch.equal(u, v) for u, v in zip(plain.state_dict().values(), repaired.state_dict().values()))


def test_an_ambient_autocast_or_inference_mode_does_not_change_the_fusion(tiny):
    """Guards: fuse (statistics, least-squares Grams, apply) under the caller's torch.autocast
    (bfloat16) or torch.inference_mode, with calibration data made in inference mode, gives the
    weights of a plain call bit for bit (before: autocast ran the float32 products in bfloat16 and a
    fused model far from its sources; inference mode failed on tensors without a version counter)."""
    a, x = tiny("timm_resnet18")
    b, _ = build("timm_resnet18", seed=1)
    cal = torch.randn(24, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    want = fusion.fuse([a, b], cal, refine="lstsq").state_dict()
    with torch.inference_mode():
        frozen = cal.clone()
    runs = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        runs.append(fusion.fuse([a, b], cal, refine="lstsq"))
    with torch.inference_mode():
        runs.append(fusion.fuse([a, b], frozen, refine="lstsq"))
    for got in runs:
        assert all(torch.equal(got.state_dict()[k], v) for k, v in want.items())


def test_fused_and_permuted_models_keep_each_modules_train_flag(tiny):
    """Guards: a model in training mode with a frozen BatchNorm (eval) gives a fused, a permuted and a
    resized model with the same per-module flags (before: every module came back in training mode,
    so the frozen BatchNorm would update its statistics on the next step)."""
    from fusion.resize import resize

    a, x = tiny("timm_resnet18")
    b, _ = build("timm_resnet18", seed=1)
    for m in (a, b):
        m.train()
        m.bn1.eval()
    flags = [m.training for m in a.modules()]
    g = discover(a, x)
    outs = [fusion.fuse([a, b], torch.randn(16, *x.shape[1:])), permute(a, g, g.random_permutations(seed=1)),
            resize(a, 0.5, graph=g)]
    for out in outs:
        assert [m.training for m in out.modules()] == flags
    assert [m.training for m in a.modules()] == flags


def test_models_with_hooks_that_cannot_be_copied_still_fuse(tiny):
    """Guards: a user's forward hook holding a lock (a bound method of a recorder) does not stop
    discovery or fusion (copies are made without the hooks, with a warning naming the module); the
    user's model keeps its hook."""
    import threading

    from alignment.errors import FusionWarning

    class Recorder:
        def __init__(self):
            self.lock, self.calls = threading.Lock(), 0

        def hook(self, module, inputs, output):
            self.calls += 1

    a, x = tiny("timm_resnet18")
    b, _ = build("timm_resnet18", seed=1)
    rec = Recorder()
    a.layer2.register_forward_hook(rec.hook)
    with pytest.warns(FusionWarning, match="hooks of layer2 cannot be copied"):
        fused = fusion.fuse([a, b], torch.randn(16, *x.shape[1:]))
    assert not fused.layer2._forward_hooks and len(a.layer2._forward_hooks) == 1
    assert fused(x).shape == a(x).shape


def test_separate_heads_update_a_timm_models_class_count(tiny):
    """Guards: models of 10 and 4 classes fused with separate heads report num_classes 14, the
    width of what they return (timm's attribute stayed at the first model's 10)."""
    import timm

    torch.manual_seed(0)
    a = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1, channels=(8, 16, 32, 64)).eval()
    b = timm.create_model("resnet18", pretrained=False, num_classes=4, in_chans=1, channels=(8, 16, 32, 64)).eval()
    fused = fusion.fuse([a, b], torch.randn(16, 1, 32, 32), heads="separate")
    assert fused.num_classes == 14 == fused(torch.randn(2, 1, 32, 32)).shape[1]
    assert (a.num_classes, b.num_classes) == (10, 4)


def test_has_batchnorm_counts_the_layers_a_reset_would_recompute(tiny):
    """Guards: what repair='auto' resets (and needs data for): BatchNorm layers with running
    statistics, not those kept, not one that tracks no statistics, none in a ViT."""
    from fusion.repair import has_batchnorm

    cnn, _ = tiny("timm_resnet18")
    vit, _ = tiny("timm_vit")
    bns = [m for m in cnn.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert has_batchnorm(cnn) and not has_batchnorm(vit)
    assert has_batchnorm(cnn, keep=bns[1:]) and not has_batchnorm(cnn, keep=bns)
    assert not has_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(4, track_running_stats=False)))


def test_separate_heads_keep_the_models_class_names():
    """Guards: an HF model fused with separate heads names its outputs with the models' class names in
    output order (before: resizing ``num_labels`` renamed them all ``LABEL_k``); the sources keep theirs."""
    from tests.tiny_models import build

    a, x = build("hf_vit", 0)
    b, _ = build("hf_vit", 1)
    a.config.id2label = {k: f"a{k}" for k in range(10)}
    b.config.id2label = {k: f"b{k}" for k in range(10)}
    fused = fusion.fuse([a, b], torch.randn(16, *x.shape[1:]), heads="separate", repair="none")
    assert [fused.config.id2label[k] for k in range(20)] == [f"a{k}" for k in range(10)] + [f"b{k}" for k in range(10)]
    assert fused.config.label2id["b3"] == 13 and a.config.id2label[0] == "a0" and len(b.config.id2label) == 10


@pytest.mark.gpu
def test_a_target_on_the_gpu_gets_the_fused_weights_of_cpu_models():
    """Guards: a target of other widths on another device than the models is discovered on its own
    device (before: it ran on the models' example input, an error blaming the input); the fused
    model lives where the target does and equals the fusion into the same target on the CPU."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from torch import nn

    def cnn(seed, w):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w, 5)).eval()

    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    a, b, narrow = cnn(0, 8), cnn(1, 8), cnn(2, 4)
    cpu = fusion.fuse([a, b], x, method="ot", target=narrow, repair="none")
    gpu = fusion.fuse([a, b], x, method="ot", target=narrow.cuda(), repair="none")
    assert next(gpu.parameters()).is_cuda
    with torch.no_grad():
        assert rel_err(cpu(x), gpu(x.cuda()).cpu()) < 1e-5


def test_weight_matching_reports_the_score_of_a_perfect_match():
    """Guards: a model fused with its permuted copy by weight matching reports a matching score of 1
    per space, as permute and ot do (before: 0 everywhere, the non-anchor models' unit norms were left
    out of the weight Gram, so every cosine was 0)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    x = torch.randn(32, 6)
    g = discover(m, x[:2])
    fused = fusion.fuse([m, permute(m, g, g.random_permutations(seed=1))], x, method="weight_matching",
                        repair="none")
    costs = fused.fusion_report.costs
    assert costs and all(abs(v - 1.0) < 1e-6 for v in costs.values()), costs


def test_merge_by_weights_gives_back_a_vit_fused_with_its_permuted_copy():
    """Guards: ``method="merge", cost="weights"`` solves its spaces by coordinate descent as ``ot`` with
    weight costs does: a tiny ViT fused with its permuted copy is the ViT again (before: one pass
    compared weight rows through neighbouring spaces not yet solved, rel. logit error 0.64)."""
    import timm

    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                          embed_dim=32, depth=2, num_heads=2).eval()
    for p in m.parameters():
        if p.dim() >= 2:
            p.data.normal_(0, 1 / p[0].numel() ** 0.5)
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    g = discover(m, x[:2])
    with torch.no_grad():
        fused = fusion.fuse([m, permute(m, g, g.random_permutations(seed=1))], x, method="merge", cost="weights",
                            repair="none")
        assert rel_err(fused(x), m(x)) < 1e-4


class _SilentUnits(nn.Module):
    def __init__(self):
        super().__init__()
        self.l0, self.l1, self.fc = nn.Linear(24, 16), nn.Linear(16, 16), nn.Linear(16, 5)
        with torch.no_grad():
            self.l1.bias[:6] -= 0.8  # units that stay off on a small calibration set

    def forward(self, x):
        return self.fc(torch.relu(self.l1(torch.relu(self.l0(x)))))


def test_ot_by_distance_pairs_units_silent_on_the_calibration_data_by_their_weights():
    """Guards: with activation distances (``ot``'s default where no BatchNorm is), units that are off
    on every calibration sample are paired by their weights, so a model fused with its permuted copy
    is the model on other inputs too (before: silent units, all at distance 0, were paired at random:
    exact on the calibration data, 25% off elsewhere)."""
    torch.manual_seed(0)
    m = _SilentUnits().eval()
    cal, test = torch.randn(16, 24), torch.randn(256, 24) * 4
    with torch.no_grad():
        hidden = torch.relu(m.l1(torch.relu(m.l0(cal))))
        assert int((hidden.abs().sum(0) == 0).sum()) >= 2  # the case under test: several silent units
        g = discover(m, cal[:2])
        fused = fusion.fuse([m, permute(m, g, g.random_permutations(seed=1))], cal, method="ot", cost="distance",
                            repair="none")
        assert rel_err(fused(test), m(test)) < 1e-4
