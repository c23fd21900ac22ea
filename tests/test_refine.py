"""Least-squares refinement, its staged passes and separate heads."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fusion
from alignment import discover, permute
from alignment.errors import FallbackWarning, InvalidOptionError
from fusion.engine import HeadsError
from fusion.lstsq import LayerGram, output_moments, ridge_solve
from fusion.refine import _conv_rows, _conv_weight, _ConvPatches
from fusion.repair import reset_bn
from fusion.replay import Replay, record
from tests import tiny_models
from tests.conftest import rel_err
from tests.tiny_models import logits

# families whose every weighted layer the refinement handles (Conv2d, grouped and depthwise; Linear;
# BatchNorm folded; LayerNorm and GroupNorm affines), transformers models included
FAMILIES = ["timm_resnet18", "timm_vit", "cnn", "mlp", "hf_vit", "hf_resnet"]


def _perturbed(model: nn.Module, scale: float) -> nn.Module:
    """A copy of ``model`` with Gaussian noise of std ``scale`` added to every parameter."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn_like(p) * scale)
    return out


def _calibration(x: torch.Tensor, n: int = 48, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, *x.shape[1:], generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,norms", [(n, False) for n in FAMILIES] + [("mlp", True)])
def test_refining_a_model_fused_with_its_permuted_copy_keeps_its_function(tiny, name, norms):
    """The fused model of a model and its permuted copy is already exact: every layer's regression
    loss is zero, and refinement leaves the function unchanged (BatchNorm folding and LayerNorm
    affine refits included)."""
    model, x = tiny(name)
    graph = discover(model, x)
    other = permute(model, graph, graph.random_permutations(seed=5))
    cal = _calibration(x)
    fused = fusion.fuse([model, other], cal, method="permute", repair="none", refine="lstsq",
                        refine_options={"norms": norms})
    if norms:
        assert any(e["layer"] == "norm" for e in fused.fusion_report.refinement["layers"])
    layers = fused.fusion_report.refinement["layers"]
    assert layers, "no layer was refined"
    for entry in layers:
        assert entry["loss_after"] < 1e-6, entry
    with torch.no_grad():
        assert rel_err(logits(model(cal)), logits(fused(cal))) < 1e-4


def _plain_inputs(model: nn.Module, names: list[str], xs: list[torch.Tensor],
                  where: str = "in") -> dict[str, list[torch.Tensor]]:
    """Per module name, its input (``where="in"``) or output on each batch in a plain forward pass."""
    want: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    if where == "in":
        hooks = [model.get_submodule(n).register_forward_pre_hook(lambda mod, args, n=n: want[n].append(args[0].clone()))
                 for n in names]
    else:
        hooks = [model.get_submodule(n).register_forward_hook(lambda mod, args, out, n=n: want[n].append(out.clone()))
                 for n in names]
    with torch.no_grad():
        for x in xs:
            model(x)
    for h in hooks:
        h.remove()
    return want


def _assert_staged_inputs(model: nn.Module, tape, xs: list[torch.Tensor], want: dict[str, list[torch.Tensor]],
                          where: str = "in") -> None:
    """Stop a replay before (``where="in"``) or after each module of ``want`` in turn: every batch's
    captured tensor equals the plain one (compared at once: later code may modify it in place)."""
    replay = Replay(model, tape, len(xs))
    with replay.session(), torch.no_grad():
        for n in want:
            stop = (tape.call(n), where)
            replay.plan(stop)
            for i, x in enumerate(xs):
                torch.testing.assert_close(replay.run(x, i)[stop], want[n][i])


def test_replay_gives_each_layer_the_inputs_of_a_plain_forward_and_runs_each_conv_once(tiny, monkeypatch):
    """Staged passes (stop before every conv in turn) capture exactly the inputs a plain forward
    pass gives those convs, although finished calls are served from the cache: over all passes
    each conv runs once per batch (timm's ResNet modifies outputs in place: ReLU(inplace), x +=)."""
    model, x = tiny("timm_resnet18")
    xs = [_calibration(x, 8, seed=s) for s in range(3)]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    want = _plain_inputs(model, convs, xs)
    runs = {"n": 0}
    original = nn.Conv2d._conv_forward

    def counting(self, *args, **kwargs):
        runs["n"] += 1
        return original(self, *args, **kwargs)

    tape = record(model, xs[0])
    monkeypatch.setattr(nn.Conv2d, "_conv_forward", counting)
    _assert_staged_inputs(model, tape, xs, want)
    # the pass before conv k ran convs 0..k-1 fresh only once in total: len(convs) - 1 per batch
    assert runs["n"] == (len(convs) - 1) * len(xs)
    assert not any("forward" in m.__dict__ for m in model.modules()), "a patched forward was left behind"


def test_replay_stops_after_each_norm_run_every_conv_once_and_see_the_plain_outputs(tiny, monkeypatch):
    """Passes that stop after each BatchNorm (how refinement reads the sources' post-norm targets)
    capture the outputs a plain forward gives, and a module finished at an "out" stop is kept, not
    computed again by the next pass: every conv and norm runs once per batch over all passes."""
    model, x = tiny("timm_resnet18")
    xs = [_calibration(x, 8, seed=s) for s in range(3)]
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    outputs = _plain_inputs(model, norms, xs, where="out")
    tape = record(model, xs[0])
    runs = {"conv": 0, "norm": 0}
    conv_forward, norm_forward = nn.Conv2d._conv_forward, nn.BatchNorm2d.forward
    monkeypatch.setattr(nn.Conv2d, "_conv_forward", lambda self, *a: (runs.__setitem__("conv", runs["conv"] + 1),
                                                                      conv_forward(self, *a))[1])
    monkeypatch.setattr(nn.BatchNorm2d, "forward", lambda self, *a: (runs.__setitem__("norm", runs["norm"] + 1),
                                                                     norm_forward(self, *a))[1])
    _assert_staged_inputs(model, tape, xs, outputs, where="out")
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert runs == {"conv": convs * len(xs), "norm": len(norms) * len(xs)}


class _InPlace(nn.Module):
    """Glue code that modifies a module's output in place after it returned (like ``x += shortcut``)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d, self.e = (nn.Linear(4, 4) for _ in range(5))

    def forward(self, x):
        h = self.a(x)
        h += self.b(x)
        y = self.c(h)
        z = self.d(h + y)
        return self.e(h * z)


def test_replay_copies_a_cached_output_that_code_modifies_in_place():
    """An output modified in place by code that still runs is served as a copy: the cache stays
    intact across passes, so every stop sees what a plain forward gives."""
    torch.manual_seed(0)
    model = _InPlace().eval()
    xs = [torch.randn(5, 4) for _ in range(2)]
    want = _plain_inputs(model, list("bcde"), xs)
    _assert_staged_inputs(model, record(model, xs[0]), xs, want)


def _kept_elements(replay: Replay, tape, path: str) -> int:
    """Elements of the storage the replay keeps for the outputs of module ``path`` (all batches)."""
    return sum(t.untyped_storage().size() // t.element_size() for t in replay.stored.get(tape.call(path), []))


def test_replay_keeps_only_the_shape_of_outputs_no_running_code_reads():
    """Once every reader of a served output is itself served, the replay keeps a one-element
    placeholder instead of the values (the stem's conv output of a ResNet while later blocks run);
    an output that code still running reads (``h`` in the glue code of _InPlace) keeps its values,
    and every stop still sees what a plain forward gives."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    xs = [torch.randn(2, 3, 6, 6) for _ in range(2)]
    tape = record(model, xs[0])
    assert tape.calls[tape.call("0")].readers == {tape.call("1")}
    want = _plain_inputs(model, ["3", "5"], xs)
    replay = Replay(model, tape, len(xs))
    kept = []
    with replay.session(), torch.no_grad():
        for n in ("3", "5"):
            replay.plan((tape.call(n), "in"))
            kept.append({p: _kept_elements(replay, tape, p) for p in ("0", "1")})
            for i, x in enumerate(xs):
                torch.testing.assert_close(replay.run(x, i)[(tape.call(n), "in")], want[n][i])
        replay.plan((tape.call("5"), "out"))
        kept.append({p: _kept_elements(replay, tape, p) for p in ("0", "1")})
    # nothing kept before the first pass; before "5": the norm's output (the in-place ReLU's too) is still read by conv "3", which runs in
    # that pass; the conv's only reader, the norm, is served; one element per batch once all are served
    assert kept == [{"0": 0, "1": 0}, {"0": 2, "1": 2 * 2 * 8 * 36}, {"0": 2, "1": 2}]

    glue = _InPlace().eval()
    xs = [torch.randn(5, 4) for _ in range(2)]
    tape = record(glue, xs[0])
    assert -1 not in tape.calls[tape.call("a")].readers and tape.call("") in tape.calls[tape.call("a")].readers
    replay = Replay(glue, tape, len(xs))
    with replay.session(), torch.no_grad():
        for n in "cde":
            replay.plan((tape.call(n), "in"))
            for i, x in enumerate(xs):
                replay.run(x, i)
        assert _kept_elements(replay, tape, "a") == 2 * 5 * 4  # read by the root's code, which still runs


def test_refined_layers_equal_torch_lstsq_on_the_same_inputs_and_targets():
    """With no ridge and float64 sums, each refined layer is the least-squares solution
    (torch.linalg.lstsq) of its inputs (the fused model's own, earlier layers refined) against the
    merged source outputs."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4)).double() for _ in range(2)]
    cal = torch.randn(300, 6, dtype=torch.float64)
    al = fusion.align(models, cal, method="permute")
    maps = al.maps()
    fused = al.build(refine="lstsq", refine_options={"ridge": 0.0, "precision": "float64"})
    hidden = maps[next(iter(maps))]
    ones = torch.ones(len(cal), 1, dtype=torch.float64)
    with torch.no_grad():
        # layer 0: inputs are the data, targets the merged hidden pre-activations
        y0 = sum(m[0](cal) @ hidden.merge[i].t() for i, m in enumerate(models))
        sol0 = torch.linalg.lstsq(torch.cat([cal, ones], 1), y0).solution
        torch.testing.assert_close(fused[0].weight, sol0[:6].t(), rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(fused[0].bias, sol0[6], rtol=1e-6, atol=1e-8)
        # layer 2: inputs through the refined layer 0, targets the weighted mean of the outputs
        x2 = torch.tanh(fused[0](cal))
        y2 = 0.5 * models[0](cal) + 0.5 * models[1](cal)
        sol2 = torch.linalg.lstsq(torch.cat([x2, ones], 1), y2).solution
        torch.testing.assert_close(fused[2].weight, sol2[:12].t(), rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(fused[2].bias, sol2[12], rtol=1e-6, atol=1e-8)


def test_ridge_solve_pulls_toward_the_anchor_and_reports_losses():
    """A strong ridge keeps the current weights; no ridge reaches the least-squares loss, which is
    never above the loss of the current weights."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 200, 5, generator=g)
    y = torch.randn(1, 200, 3, generator=g)
    gram = LayerGram(1, 5, 3, bias=True, device="cpu", precision="float64")
    gram.add(x, y)
    w0, b0 = torch.randn(1, 3, 5, generator=g), torch.randn(1, 3, generator=g)
    free = ridge_solve(gram, w0, b0, ridge=0.0)
    held = ridge_solve(gram, w0, b0, ridge=1e6)
    torch.testing.assert_close(held.weight, w0.double(), atol=1e-4, rtol=0)
    assert free.loss_after <= free.loss_before
    xa = torch.cat([x[0], torch.ones(200, 1)], 1).double()
    best = torch.linalg.lstsq(xa, y[0].double()).solution
    resid = ((xa @ best - y[0].double()) ** 2).sum() / (y[0].double() ** 2).sum()
    assert abs(free.loss_after - float(resid)) < 1e-9


def test_float32_products_match_float64_sums():
    """Per-batch float32 products summed in float64 stay within 1e-6 (relative) of float64 sums,
    including the blocked symmetric Gram of wide layers."""
    g = torch.Generator().manual_seed(1)
    a = LayerGram(2, 300, 4, bias=True, device="cpu", precision="float32")
    b = LayerGram(2, 300, 4, bias=True, device="cpu", precision="float64")
    for _ in range(3):
        x, y = torch.randn(2, 64, 300, generator=g), torch.randn(2, 64, 4, generator=g)
        a.add(x, y)
        b.add(x, y)
    assert rel_err(b.xx, a.xx) < 1e-6 and rel_err(b.xy, a.xy) < 1e-6
    torch.testing.assert_close(a.xx, a.xx.transpose(1, 2))


@pytest.mark.parametrize("groups,stride,dilation,padding_mode", [(1, 1, 1, "zeros"), (1, 2, 1, "zeros"),
                                                                  (4, 1, 2, "zeros"), (8, 1, 1, "reflect")])
def test_conv_patch_rows_reproduce_the_convolution(groups, stride, dilation, padding_mode):
    """Patches times the permuted weights give the convolution's output (so the Gram is the
    convolution's regression), for grouped, strided, dilated and reflect-padded convolutions."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, stride=stride, dilation=dilation, padding=2, groups=groups,
                     padding_mode=padding_mode, bias=False)
    x = torch.randn(3, 8, 9, 9)
    rows = _conv_rows(conv, x)  # (groups, rows, d)
    w = _conv_weight(conv.weight.detach(), groups)  # (groups, o, d)
    out = torch.bmm(rows, w.transpose(1, 2))  # (groups, rows, o)
    y = conv(x).detach()
    want = y.movedim(1, -1).reshape(-1, groups, 16 // groups).transpose(0, 1)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


CONV_CASES = [  # (in channels, out, kernel, stride, dilation, padding, groups, padding mode, input size)
    (4, 6, 3, 1, 1, 1, 1, "zeros", (1, 1)),  # only the centre tap reads the input
    (4, 6, 3, 1, 1, 1, 1, "zeros", (2, 2)),  # each position reads 4 of 9 taps
    (4, 6, 3, 1, 1, 1, 1, "zeros", (4, 5)),  # interior, edges, corners
    (4, 6, 3, 2, 1, 1, 2, "zeros", (7, 7)),  # strided, grouped
    (4, 6, 3, 1, 2, 2, 1, "zeros", (3, 6)),  # dilated
    (4, 6, 5, 1, 1, 2, 1, "zeros", (3, 3)),
    (4, 6, 3, 1, 1, 3, 1, "zeros", (2, 2)),  # border positions that read no input at all
    (4, 8, 3, 1, 1, 1, 4, "reflect", (2, 3)),  # copies of the input: every tap is live
]


def _patch_grams(case, dtype=torch.float64):
    cin, cout, k, s, d, p, g, mode, size = case
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride=s, dilation=d, padding=p, groups=g, padding_mode=mode).double()
    x = torch.randn(5, cin, *size, dtype=dtype)
    y = torch.randn_like(conv(x.double())).to(dtype)  # targets of the output's shape
    whole = LayerGram(g, cin // g * k * k, cout // g, True, "cpu", "float64")
    rows = _conv_rows(conv, x)
    whole.add(rows, y.movedim(1, -1).reshape(-1, g, cout // g).transpose(0, 1))
    patches = _ConvPatches(conv, size)
    split = LayerGram(g, patches.inputs, cout // g, True, "cpu", "float64")
    patches.add(split, x, y)
    return conv, patches, whole, split


@pytest.mark.parametrize("case", CONV_CASES)
def test_tap_classes_give_the_gram_of_the_whole_patches(case):
    """Summing each class of output positions over only the taps it reads (and leaving out taps that
    read padding everywhere) gives the same Gram sums as the whole patch rows: the dropped taps'
    rows and columns of the whole Gram are zero, the kept ones equal to 1e-12."""
    conv, patches, whole, split = _patch_grams(case)
    keep = torch.cat([patches.live, torch.tensor([True])])  # plus the bias column
    assert split.rows == whole.rows and torch.allclose(split.yy, whole.yy, rtol=1e-12)
    assert rel_err(whole.xx[:, keep][:, :, keep], split.xx) < 1e-12
    assert rel_err(whole.xy[:, keep], split.xy) < 1e-12
    assert bool((whole.xx[:, ~keep] == 0).all())
    if case[8] == (1, 1):
        assert patches.inputs == case[0] and patches.live.sum() == case[0]  # the centre tap only


@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[2], CONV_CASES[6]])
def test_leaving_out_dead_taps_gives_the_whole_ridge_solution(case):
    """Solving on the live taps (ridge rescaled to the whole Gram's mean diagonal) and keeping the
    mapped weights on the dead ones equals the ridge solution of the whole patch Gram."""
    conv, patches, whole, split = _patch_grams(case)
    g = conv.groups
    w0 = _conv_weight(conv.weight.detach(), g)
    b0 = conv.bias.detach().reshape(g, -1)
    full = ridge_solve(whole, w0, b0, ridge=1e-2)
    part = ridge_solve(split, w0[:, :, patches.live], b0, ridge=1e-2 * patches.inputs / w0.shape[2])
    torch.testing.assert_close(part.weight, full.weight[:, :, patches.live], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(full.weight[:, :, ~patches.live], w0[:, :, ~patches.live], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(part.bias, full.bias, rtol=1e-9, atol=1e-10)


def test_output_moments_are_the_refitted_layer_statistics():
    """Mean and variance of ``W x`` from the Gram sums and the solution equal those computed on the rows."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 300, 7, generator=g, dtype=torch.float64) * 3 + 1
    y = torch.randn(2, 300, 4, generator=g, dtype=torch.float64)
    gram = LayerGram(2, 7, 4, True, "cpu", "float64")
    gram.add(x[:, :120], y[:, :120])
    gram.add(x[:, 120:], y[:, 120:])
    sol = ridge_solve(gram, torch.randn(2, 4, 7, generator=g), torch.randn(2, 4, generator=g), ridge=0.1)
    z = torch.einsum("gnd,god->gno", x, sol.weight)
    mean, var = output_moments(gram, sol)
    torch.testing.assert_close(mean, z.mean(1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(var, z.var(1, unbiased=False), rtol=1e-9, atol=1e-10)


def test_folded_batchnorm_survives_a_later_reset(tiny):
    """After refinement with BatchNorm folding, each norm's statistics are those of its refitted
    conv on the calibration data, so resetting them on the same data changes (almost) nothing."""
    a, x = tiny("timm_resnet18")
    b = _perturbed(a, 0.2)
    cal = _calibration(x, 64)
    fused = fusion.fuse([a, b], cal, method="permute", repair="none", refine="lstsq")
    with torch.no_grad():
        before = fused(cal)
        after = reset_bn(copy.deepcopy(fused), cal)(cal)
    assert rel_err(before, after) < 1e-2


def test_separate_heads_of_two_copies_give_the_model_logits_twice(tiny):
    """heads='separate' keeps each model's classifier: two copies of one model (each permuted
    differently) give that model's logits twice, with and without refinement."""
    model, x = tiny("timm_resnet18")
    graph = discover(model, x)
    other = permute(model, graph, graph.random_permutations(seed=2))
    cal = _calibration(x)
    with torch.no_grad():
        want = torch.cat([model(cal), model(cal)], 1)
    al = fusion.align([model, other], cal, method="permute")
    for refine in ("none", "lstsq"):
        fused = al.build(refine=refine, heads="separate")
        assert fused.fusion_report.head_sizes == [10, 10]
        with torch.no_grad():
            assert rel_err(want, fused(cal)) < 1e-4, refine


def test_separate_heads_allow_different_class_counts(tiny):
    """Models with 10 and 4 classes fuse into one model with 14 outputs when heads are separate.
    Also guards the weight similarity that tells constant units apart: the classifiers' rows (10
    and 4 long) are left out of it instead of stopping the fusion."""
    import timm

    torch.manual_seed(0)
    a = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1, channels=(8, 16, 32, 64)).eval()
    b = timm.create_model("resnet18", pretrained=False, num_classes=4, in_chans=1, channels=(8, 16, 32, 64)).eval()
    cal = torch.randn(32, 1, 28, 28)
    fused = fusion.fuse([a, b], cal, method="permute", heads="separate", repair="reset_bn")
    assert fused(cal).shape == (32, 14)
    assert fused.fusion_report.head_sizes == [10, 4]


def test_bad_refinement_and_heads_options_are_rejected_before_any_work(tiny):
    """A negative ridge, an unknown refinement option and an unknown heads value are errors."""
    model, x = tiny("mlp")
    with pytest.raises(InvalidOptionError, match="ridge"):
        fusion.fuse([model, model], x, refine="lstsq", refine_options={"ridge": -1.0})
    with pytest.raises(InvalidOptionError, match="ridgee"):
        fusion.fuse([model, model], x, refine="lstsq", refine_options={"ridgee": 1.0})
    with pytest.raises(HeadsError, match="heads"):
        fusion.fuse([model, model], x, heads="both")


@pytest.mark.gpu
def test_refinement_on_cuda_matches_the_cpu(tiny):
    """On a GPU the refinement runs there (Grams and solves) and gives the CPU's model."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    a, x = tiny("timm_resnet18")
    b = _perturbed(a, 0.2)
    cal = _calibration(x, 64)
    cpu = fusion.fuse([a, b], cal, method="permute", refine="lstsq", refine_options={"precision": "float64"})
    gpu = fusion.fuse([a, b], cal, method="permute", refine="lstsq", device="cuda",
                      refine_options={"precision": "float64"})
    with torch.no_grad():
        assert rel_err(cpu(cal), gpu.cpu()(cal)) < 1e-4


def test_budget_splits_units_within_the_parameter_budget_and_top_budget_is_the_ensemble(tiny):
    """Partial matching: the fused parameter count stays within the budget and grows with it; a
    budget that keeps every unit gives a BatchNorm network that computes the averaged logits."""
    a, x = tiny("timm_resnet18")
    b = _perturbed(a, 0.3)
    cal = _calibration(x, 64)
    al = fusion.align([a, b], cal, method="permute", budget=1.3)
    fused, base = al.report.partial["parameters"]
    assert base < fused <= 1.3 * base
    # parameters, not buffers (the norms' running statistics counted too took the model over budget)
    assert sum(p.numel() for p in al.apply().parameters()) == fused
    assert sum(p.numel() for p in a.parameters()) == base
    top = fusion.fuse([a, b], cal, method="permute", repair="none", budget=1000.0)
    with torch.no_grad():
        want = 0.5 * a(cal) + 0.5 * b(cal)
        assert rel_err(want, top(cal)) < 1e-5
        assert rel_err(want, fusion.fuse([a, b], cal, method="permute", repair="none")(cal)) > 1e-2


@pytest.mark.parametrize("budget", [0.5, float("nan"), "1.2", True, {"memory": 1.2}, {"flops": 0.9}])
def test_invalid_budgets_are_rejected(tiny, budget):
    """A budget below 1, NaN, a string or a bool is an error naming the budget."""
    model, x = tiny("mlp")
    with pytest.raises(InvalidOptionError, match="budget"):
        fusion.fuse([model, model], x, budget=budget)


def test_partial_plans_split_the_worst_matched_units_first(tiny):
    """Within each space the split units are the worst matched (lowest quality); the parameter count
    of the new widths stays within the budget, and each split unit becomes one row per model."""
    from alignment.partial import parameter_count, partial_plans

    model, x = tiny("mlp")
    graph = discover(model, x)
    g = torch.Generator().manual_seed(0)
    plans = [{s.name: torch.eye(s.width, dtype=torch.float64) for s in graph.spaces} for _ in range(2)]
    quality = {s.name: torch.rand(s.width, generator=g, dtype=torch.float64) for s in graph.alignable_spaces}
    base = parameter_count(graph, {})
    pp = partial_plans(graph, plans, quality, 1.25)
    assert pp.split and parameter_count(graph, pp.widths) <= 1.25 * base
    for s, n in pp.split.items():
        q = quality[s]
        # the plans' first rows are the merged units (identity plans: row k holds unit k)
        kept = torch.zeros(len(q), dtype=torch.bool)
        kept[pp.plans[0][s][: graph[s].width - n].argmax(1)] = True
        assert int(kept.sum()) == graph[s].width - n
        assert float(q[~kept].max()) <= float(q[kept].min())
        assert pp.plans[0][s].shape == (graph[s].width + n, graph[s].width) == (pp.widths[s], graph[s].width)
        # the last 2n rows hold model 0's split units then model 1's: one sender per row
        rows = pp.plans[0][s][-2 * n:].sum(1)
        assert rows[:n].eq(1).all() and rows[n:].eq(0).all()
    # a plan that splits a unit over two fused units (soft transport) has no unit to split back: an
    # error, not a budget silently left unspent (before: Sinkhorn plans gave no split and no note)
    soft = [{k: T.clone() for k, T in p.items()} for p in plans]
    name = next(iter(quality))
    soft[1][name][:2, :2] = 0.5
    with pytest.raises(InvalidOptionError, match=f"{name!r} has units split"):
        partial_plans(graph, soft, quality, 1.25)


@pytest.mark.slow
def test_flops_budget_counts_multiply_adds_and_spends_them_elsewhere_than_a_parameter_budget(tiny):
    """A FLOPs budget weighs each tensor by its output positions per image: the fused model's
    multiply-adds stay within the budget, and early (high-resolution) convolutions, cheap in
    parameters but costly in FLOPs, get fewer split units than under a parameter budget."""
    from alignment.partial import parameter_count, tensor_uses

    a, x = tiny("timm_resnet18")
    b = _perturbed(a, 0.3)
    cal = _calibration(x, 32)
    by_flops = fusion.align([a, b], cal, method="permute", budget={"flops": 1.3})
    by_params = fusion.align([a, b], cal, method="permute", budget=1.3)
    fused, base = by_flops.report.partial["parameters"]
    assert by_flops.report.partial["measure"] == "flops" and base < fused <= 1.3 * base
    uses = tensor_uses(a, by_flops.graphs[0], x)
    # (multiply-adds count the norms' buffers, applied at every position; a parameter count does not)
    assert parameter_count(by_flops.graphs[0], {}, uses, buffers=True) == base
    assert parameter_count(by_flops.graphs[0], {}, uses) < base
    first = by_flops.graphs[0].spaces[0].name  # the stem's output space, the highest resolution
    assert by_flops.report.partial["split"].get(first, 0) < by_params.report.partial["split"].get(first, 0)
    assert by_flops.apply()(cal).shape == (32, 10)


def test_positions_per_image_subsamples_the_rows_of_each_image(tiny):
    """positions_per_image=k fits a conv on k positions of each image (the stem's Gram has
    images x k rows), leaves layers with fewer positions whole, and k=0 is an error."""
    model, x = tiny("cnn")
    graph = discover(model, x)
    other = permute(model, graph, graph.random_permutations(seed=1))
    cal = _calibration(x, 20)
    fused = fusion.fuse([model, other], cal, method="permute", repair="none", refine="lstsq",
                        refine_options={"positions_per_image": 5})
    rows = {e["layer"]: e["rows"] for e in fused.fusion_report.refinement["layers"]}
    assert rows["stem"] == 20 * 5 and rows["head"] == 20
    with pytest.raises(InvalidOptionError, match="positions_per_image"):
        fusion.fuse([model, other], cal, refine="lstsq", refine_options={"positions_per_image": 0})


def test_a_layer_whose_gram_exceeds_max_gram_gib_keeps_its_mapped_weights(tiny):
    """fc1's Gram (65 x 65 float64, 3.1e-5 GiB) is over a 2e-5 GiB cap, fc2's (33 x 33) is not: fc1 keeps
    the one-shot fused weights, named in the report and a warning; fc2 is refitted; a cap <= 0 is an error."""
    model, x = tiny("mlp")
    other = tiny_models.build("mlp", seed=1)[0]
    cal = _calibration(x, 40)
    plain = fusion.fuse([model, other], cal, method="permute", repair="none")
    with pytest.warns(FallbackWarning, match=r"fc1 \(its Gram of 65 inputs .* max_gram_gib=2e-05"):
        capped = fusion.fuse([model, other], cal, method="permute", repair="none", refine="lstsq",
                             refine_options={"max_gram_gib": 2e-5})
    assert torch.equal(capped.fc1.weight, plain.fc1.weight)
    assert not torch.allclose(capped.fc2.weight, plain.fc2.weight)
    assert any(s.startswith("fc1 ") for s in capped.fusion_report.refinement["skipped"])
    assert "fc2" in {e["layer"] for e in capped.fusion_report.refinement["layers"]}
    with pytest.raises(InvalidOptionError, match="max_gram_gib"):
        fusion.fuse([model, other], cal, refine="lstsq", refine_options={"max_gram_gib": 0})


def _refined_self_fusion(model: nn.Module, cal: torch.Tensor, **refine_options) -> nn.Module:
    """``model`` fused with a randomly permuted copy of itself and refined (no repair)."""
    graph = discover(model, cal[:2])
    other = permute(model, graph, graph.random_permutations(seed=1))
    return fusion.fuse([model, other], cal, method="permute", repair="none", refine="lstsq",
                       refine_options=refine_options)


def _assert_exact_and_same_function(model: nn.Module, fused: nn.Module, held_out: torch.Tensor) -> None:
    """Every refitted layer of a self-fusion already fitted exactly (loss before 0), and the fused
    model computes the model's function on data the refinement did not see."""
    layers = fused.fusion_report.refinement["layers"]
    assert layers, "no layer was refined"
    for entry in layers:
        assert entry["loss_before"] < 1e-6 and entry["loss_after"] < 1e-6, entry
    with torch.no_grad():
        assert rel_err(fused(held_out), model(held_out)) < 1e-4


def _randomise_norms(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affines in every BatchNorm and LayerNorm of ``model``."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("act", ["relu", "hard_swish", "identity"])
def test_a_batchnorm_with_an_activation_is_folded_before_its_activation(act):
    """Guards: a BatchNorm subclass that applies an activation after normalising (timm
    BatchNormAct2d) has only its normalisation folded into the conv before it; the conv's targets
    are the sources' normalised outputs before the activation (before: the post-activation outputs,
    a wrong fit with loss 0.8 on an exact self-fusion and the function changed)."""
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    model = _randomise_norms(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), BatchNormAct2d(8, act_layer=act),
                                           nn.Conv2d(8, 8, 3, padding=1), BatchNormAct2d(8, act_layer=act),
                                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)))
    fused = _refined_self_fusion(model, torch.randn(64, 1, 8, 8))
    assert {e["layer"] for e in fused.fusion_report.refinement["layers"]} == {"0", "2", "6"}
    _assert_exact_and_same_function(model, fused, torch.randn(32, 1, 8, 8))
    assert not fused.fusion_report.fallbacks


class _TanhNorm(nn.BatchNorm2d):
    """A BatchNorm whose forward adds a nonlinearity of its own (no submodule to follow)."""

    def forward(self, x):
        return torch.tanh(super().forward(x))


def test_a_batchnorm_whose_forward_is_not_a_normalisation_is_not_folded_and_reported():
    """Guards: a BatchNorm subclass whose forward is neither its normalisation nor one followed by
    its submodules is not folded: the conv before it is fitted to its own outputs (exact on a
    self-fusion), and the fallback names the norm."""
    torch.manual_seed(0)
    model = _randomise_norms(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), _TanhNorm(8), nn.Conv2d(8, 8, 3, padding=1),
                                           nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)))
    fused = _refined_self_fusion(model, torch.randn(64, 1, 8, 8))
    _assert_exact_and_same_function(model, fused, torch.randn(32, 1, 8, 8))
    assert any(s.startswith("1 (_TanhNorm") and "not folded" in s for s in fused.fusion_report.refinement["skipped"])
    assert any("1 (_TanhNorm" in f for f in fused.fusion_report.fallbacks)


@pytest.mark.parametrize("size", [9, 10])
def test_tensorflow_same_padded_convolutions_are_fitted_with_the_padding_they_apply(size):
    """Guards: a convolution that pads its input itself (timm Conv2dSame: TensorFlow "same"
    padding, uneven on even inputs with stride 2, none in its padding attribute) is fitted on patches
    padded as its forward pads them: the patch rows reproduce it, and a self-fusion is exact (before:
    unpadded patches, loss 1.8 on an exact copy and the function changed)."""
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    model = _randomise_norms(nn.Sequential(Conv2dSame(1, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                                           Conv2dSame(8, 8, 3, stride=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                           nn.Flatten(), nn.Linear(8, 5)))
    fused = _refined_self_fusion(model, torch.randn(64, 1, size, size))
    assert {e["layer"] for e in fused.fusion_report.refinement["layers"]} == {"0", "3", "7"}
    _assert_exact_and_same_function(model, fused, torch.randn(32, 1, size, size))

    from fusion.refine import _same_padding

    conv = Conv2dSame(3, 4, 3, stride=2)
    x = torch.randn(2, 3, size, size)
    rows = _conv_rows(conv, x, pad=_same_padding(conv, x.shape[-2:]))[0]
    y = (rows @ _conv_weight(conv.weight.detach(), 1)[0].t() + conv.bias).reshape(2, -1, 4)
    with torch.no_grad():
        assert rel_err(y, conv(x).flatten(2).transpose(1, 2)) < 1e-6


def test_a_convolution_whose_forward_is_not_a_plain_convolution_is_left_as_mapped():
    """Guards: a Conv2d subclass whose forward computes something else from its weights (timm
    StdConv2d: weight standardisation) keeps its one-shot fused weights, and the fallback says why
    (before: refitted as a plain convolution, a wrong fit)."""
    from timm.layers import StdConv2d

    torch.manual_seed(0)
    model = nn.Sequential(StdConv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    cal = torch.randn(64, 1, 8, 8)
    fused = _refined_self_fusion(model, cal)
    _assert_exact_and_same_function(model, fused, torch.randn(32, 1, 8, 8))
    assert "0" not in {e["layer"] for e in fused.fusion_report.refinement["layers"]}
    assert any(s.startswith("0 (StdConv2d: its forward is not") for s in fused.fusion_report.refinement["skipped"])
    graph = discover(model, cal[:2])
    one_shot = fusion.fuse([model, permute(model, graph, graph.random_permutations(seed=1))], cal, method="permute",
                           repair="none")
    assert torch.equal(fused[0].weight, one_shot[0].weight)


def test_channels_first_layer_norms_are_refitted_over_their_channels():
    """Guards: with norms=True a LayerNorm over axis 1 of NCHW maps (timm LayerNorm2d, ConvNeXt's)
    is refitted per channel, also when its width equals the map's (before: taken for a norm over the
    last axis, an IndexError or silently wrong affines); a norm followed by an activation of its own
    (timm LayerNormAct2d) is left as mapped and reported."""
    from timm.layers import LayerNorm2d, LayerNormAct2d

    torch.manual_seed(0)
    model = _randomise_norms(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), LayerNorm2d(8), nn.ReLU(),
                                           nn.Conv2d(8, 8, 3, padding=1), LayerNormAct2d(8), nn.Flatten(),
                                           nn.Linear(8 * 8 * 8, 5)))
    cal = torch.randn(600, 1, 8, 8)  # (H = W = C: a norm over the last axis type-checks too)
    fused = _refined_self_fusion(model, cal, norms=True)
    assert "1" in {e["layer"] for e in fused.fusion_report.refinement["layers"]}
    _assert_exact_and_same_function(model, fused, torch.randn(32, 1, 8, 8))
    assert torch.allclose(fused[1].weight, model[1].weight, atol=1e-5)
    assert any(s.startswith("4 (LayerNormAct2d: its forward is not") for s in fused.fusion_report.refinement["skipped"])


def test_layers_fitted_on_fewer_rows_than_inputs_are_reported(tiny):
    """Guards: a layer whose calibration rows are fewer than its inputs (an underdetermined fit that
    reproduces the calibration data but may generalise poorly) is named in the fusion report, and
    nothing is said when rows are plentiful; the Gram size cap's message gives small sizes in
    significant digits (before: "0.0 GiB")."""
    model, x = tiny("mlp")
    other = tiny_models.build("mlp", seed=1)[0]
    d = model.fc1.in_features
    few = fusion.fuse([model, other], _calibration(x, d // 2), method="permute", repair="none", refine="lstsq")
    assert any("fewer calibration rows than inputs" in f and f"fc1 ({d // 2} rows, {d + 1} inputs)" in f
               for f in few.fusion_report.fallbacks)
    assert any(e.startswith("fc1 ") for e in few.fusion_report.refinement["underdetermined"])
    with pytest.warns(FallbackWarning, match=r"fc1 \(its Gram of 65 inputs would take 3.15e-05 GiB"):
        many = fusion.fuse([model, other], _calibration(x, 4 * d), method="permute", repair="none", refine="lstsq",
                           refine_options={"max_gram_gib": 2e-5})
    assert not any("fewer calibration rows" in f for f in many.fusion_report.fallbacks)


def test_positions_per_image_are_drawn_per_image_on_sequence_first_inputs():
    """Guards: rows of a sequence-first ``(tokens, images)`` input (a Linear after a transpose) are
    drawn k per image, as for image-major rows (before: k * images rows at the image-major offsets,
    which on a sequence-first grid give some images more rows than others); where no axis has the
    batch's size, rows are drawn without regard to images and the fusion report says so."""
    from fusion.refine import _sample_rows

    gen = torch.Generator().manual_seed(0)
    keep, per_image = _sample_rows((5, 3), 3, 2, gen, torch.device("cpu"))  # 5 tokens x 3 images: row r is image r % 3
    assert per_image and len(set(keep.tolist())) == 6 and sorted((keep % 3).tolist()) == [0, 0, 1, 1, 2, 2]
    image_major, _ = _sample_rows((3, 5), 3, 2, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert sorted((image_major // 5).tolist()) == [0, 0, 1, 1, 2, 2]
    flat, per_image = _sample_rows((15,), 3, 2, gen, torch.device("cpu"))
    assert not per_image and len(set(flat.tolist())) == 6 and flat.max() < 15

    class Flat(nn.Module):  # a Linear on (images * tokens, features): no axis of the batch's size
        def __init__(self):
            super().__init__()
            self.embed, self.fc, self.head = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.fc(self.embed(x).reshape(-1, 8)))
            return self.head(h.reshape(x.shape[0], -1, 8).mean(1))

    torch.manual_seed(0)
    a, b = Flat().eval(), Flat().eval()
    cal = torch.randn(16, 6, 4, generator=torch.Generator().manual_seed(1))
    with pytest.warns(FallbackWarning, match="no axis of the batch's images"):
        fused = fusion.fuse([a, b], cal, method="permute", repair="none", refine="lstsq",
                            refine_options={"positions_per_image": 2})
    notes = " ".join(fused.fusion_report.fallbacks)
    assert "positions_per_image=2" in notes and "fc" in notes
    rows = {e["layer"]: e["rows"] for e in fused.fusion_report.refinement["layers"]}
    assert rows["fc"] == 16 * 2


class _Tied(nn.Module):
    """Two Linear layers sharing one weight (weight tying), between untied ones."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.l1, self.l2, self.l3, self.out = nn.Linear(64, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 5)
        self.l3.weight = self.l2.weight

    def forward(self, x):
        return self.out(torch.relu(self.l3(torch.relu(self.l2(torch.relu(self.l1(x.flatten(1))))))))


def test_layers_with_tied_weights_keep_their_mapped_weights_and_are_reported():
    """Guards: two modules that share a weight are left as mapped and reported (before: each was
    fitted on its own and written into the shared tensor, the second fit undoing the first, so the
    refined l2 was several times worse than the one-shot one while the report claimed a better fit);
    the untied layers are still refitted."""
    x = torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    al = fusion.align([_Tied(0).eval(), _Tied(1).eval()], x, method="permute")
    plain = al.build()
    with pytest.warns(FallbackWarning, match="tied weights"):
        refined = al.build(refine="lstsq")
    assert refined.l3.weight is refined.l2.weight
    assert torch.equal(refined.l2.weight, plain.l2.weight)
    skipped = refined.fusion_report.refinement["skipped"]
    assert any(s.startswith("l2 (shares parameters with l3") for s in skipped)
    assert any(s.startswith("l3 (shares parameters with l2") for s in skipped)
    fitted = {e["layer"] for e in refined.fusion_report.refinement["layers"]}
    assert {"l1", "out"} <= fitted and not {"l2", "l3"} & fitted


class _HookedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l0, self.ln, self.l1, self.fc = nn.Linear(12, 16), nn.LayerNorm(16), nn.Linear(16, 16), nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.l1(self.ln(self.l0(x)))))


def test_a_users_output_hooks_run_once_under_refinement_and_repair():
    """Guards: forward hooks of the user's that change a layer's output (a LayerNorm's and the
    classifier's) run once in the passes of REPAIR and of least-squares refinement: a model fused with
    its permuted copy is the model again (before: replayed outputs went through the hook twice, and
    the refit classifier learnt the hooked output as its target, rel. errors 1.0 and 2.0)."""
    import alignment
    import fusion

    torch.manual_seed(0)
    m = _HookedNet().eval()
    m.ln.register_forward_hook(lambda mod, inp, out: out * 2.0 + 0.1)
    m.fc.register_forward_hook(lambda mod, inp, out: out * 3.0)
    x = torch.randn(48, 12)
    g = alignment.discover(m, x[:2])
    p = alignment.permute(m, g, g.random_permutations(seed=1))
    with torch.no_grad():
        for repair, refine in (("repair", "none"), ("none", "lstsq"), ("repair", "lstsq")):
            fused = fusion.fuse([m, p], x, method="permute", repair=repair, refine=refine)
            assert ((fused(x) - m(x)).norm() / m(x).norm()).item() < 1e-4, (repair, refine)


def test_a_reset_after_refinement_keeps_the_folded_norms_of_a_self_fusion_exact(tiny):
    """Guards: a BatchNorm folded by refinement computes the fitted ``z + b`` with its statistics as
    part of the affine, so the default repair (a reset) leaves it alone: a model fused with its
    permuted copy, refined and reset, is still the model (before, the reset re-estimated the folded
    variances per batch of 8, and the 1x1 maps of layer4 moved the logits by several percent). With
    ``batchnorm="stats"`` the statistics are estimates, and with ``inputs="merged"`` the merged
    sources' statistics: the reset does re-estimate those."""
    model, x = tiny("timm_resnet18")
    graph = discover(model, x)
    other = permute(model, graph, graph.random_permutations(seed=1))
    cal = [_calibration(x, 8, seed=s) for s in range(6)]
    held_out = _calibration(x, 16, seed=11)
    fused = fusion.fuse([model, other], cal, method="permute", repair="reset_bn", refine="lstsq")
    refined = fusion.fuse([model, other], cal, method="permute", repair="none", refine="lstsq")
    # every norm follows a refitted conv: none is left to reset, and the report says so
    assert fused.fusion_report.repaired == "none"
    assert any("statistics are final" in f for f in fused.fusion_report.fallbacks)
    with torch.no_grad():
        # (48 rows for layer4's 1152 inputs: the float32 Grams leave the refit itself 5e-4 off)
        assert rel_err(logits(fused(held_out)), logits(refined(held_out))) < 1e-6
        assert rel_err(logits(fused(held_out)), logits(model(held_out))) < 2e-3
    for options in ({"batchnorm": "stats"}, {"inputs": "merged"}):
        # estimates from the Gram, or statistics of the merged sources' inputs: the reset re-estimates
        reset = fusion.fuse([model, other], cal, method="permute", repair="reset_bn", refine="lstsq",
                            refine_options=options)
        kept = fusion.fuse([model, other], cal, method="permute", repair="none", refine="lstsq",
                           refine_options=options)
        assert reset.fusion_report.repaired == "reset_bn", options
        assert not torch.allclose(reset.layer4[0].bn1.running_var, kept.layer4[0].bn1.running_var), options
