"""Norm repair: the last stage of fusion (a registry, like methods).

* ``"none"``.
* ``"reset_bn"``: recompute BatchNorm running statistics of the fused model on calibration data.
* ``"auto"`` (the default of :func:`fusion.fuse`): ``"reset_bn"`` when the fused model has BatchNorm
  layers with running statistics, else ``"none"`` (a model without BatchNorm is not reported as a
  reset that found nothing to do). The report's ``repaired`` says which ran.
* ``"repair"`` (REPAIR, Jordan et al.): every norm layer's output channels get the mean and std of
  the interpolated (aligned) source statistics. A BatchNorm output's statistics are its affine
  parameters (mean ``bias``, signed std ``weight``), so the interpolated targets are the fused
  affine itself and REPAIR on BatchNorm layers is the running-statistics reset (the REPAIR paper
  says as much of BatchNorm networks). Two earlier variants were worse on the zoo's ResNet-18 pair
  (permute): measured unsigned stds set after the reset (81.08, against 84.54 for the reset: every
  downstream BatchNorm kept stale statistics, and channels whose sources have weights of opposite
  signs were blown up), and measured signed stds set before it (84.44). LayerNorm and GroupNorm
  layers are corrected one at a time in forward order, each measured (after the corrections of the
  layers before it) and rescaled to the interpolated sources' measured mean and std, with stds
  signed by the sources' norm weights. Those passes are replayed (:mod:`fusion.replay`): each runs
  the fused model only from the previous norm to the next, about one forward pass in all instead of
  one per norm layer (zoo ViT pair: 13.3 s -> 2.4 s, the same weights bit for bit).

Every whole pass over the calibration data goes through :func:`alignment.runner.stream`; the replayed
norm passes read the same batches (:func:`alignment.runner.batches`).
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from alignment.errors import CalibrationError, FallbackWarning, InvalidOptionError, UnknownNameError
from alignment.graph import Graph
from alignment.maps import SpaceMap, axis_matrix
from alignment.registry import Registry
from alignment.runner import batches, first_batch, model_device, modes, plain_precision, runnable, stream

from .replay import Replay, ReplayError, Tape, record

__all__ = ["REPAIRS", "RepairContext", "UnknownRepairError", "has_batchnorm", "register_repair", "run_repair", "reset_bn",
           "repair"]

_BN = (nn.modules.batchnorm._BatchNorm,)
_LN = (nn.LayerNorm, nn.GroupNorm)


class UnknownRepairError(UnknownNameError, ValueError):
    """No repair is registered under the given name."""


REPAIRS = Registry("repair", UnknownRepairError)


def register_repair(name: str, check: Callable[[dict[str, Any]], None] | None = None) -> Callable:
    """Register a repair ``fn(ctx: RepairContext, *, options...)`` (modifies ``ctx.fused`` in place);
    ``check(options)`` checks option values before any work (see :meth:`alignment.registry.Registry.register`)."""
    return REPAIRS.register(name, check)


@dataclass
class RepairContext:
    """What a repair may use.

    Attributes:
        fused: the fused model (repaired in place).
        sources: the source models (never modified).
        graphs: the sources' graphs.
        maps: the maps the fused model was built with.
        alpha: interpolation weights.
        data: calibration data.
        device: where to run.
        progress: show progress bars.
        notes: fallbacks taken (listed in the fusion report).
        heads: ``"merged"`` or ``"separate"`` (each model's classifier kept; see :func:`fusion.engine.apply_maps`).
        details: what a stage measured, by stage (e.g. ``"refine"``: per-layer regression losses),
            copied into the fusion report.
        until: a module after which the fused model is cut (partial zipping): refinement fits only
            the layers that run before it.
        frozen: modules whose statistics are final (a BatchNorm reset leaves them as they are).
        cache: results a stage may reuse across builds of one alignment (given by
            :class:`fusion.api.Alignment`): what depends only on the sources and the data, not on
            ``alpha`` or the fused model (REPAIR's source statistics).
    """

    fused: nn.Module
    sources: Sequence[nn.Module] = ()
    graphs: Sequence[Graph] = ()
    maps: dict[str, SpaceMap] = field(default_factory=dict)
    alpha: Sequence[float] = ()
    data: Any = None
    device: str | torch.device | None = None
    progress: bool = False
    notes: list[str] = field(default_factory=list)
    heads: str = "merged"
    details: dict[str, Any] = field(default_factory=dict)
    until: str | None = None
    frozen: list[nn.Module] = field(default_factory=list)
    cache: dict = field(default_factory=dict)


@plain_precision
def run_repair(name: str, ctx: RepairContext, **options: Any) -> nn.Module:
    """The repair stage: run repair ``name`` with checked options; returns ``ctx.fused``."""
    REPAIRS.call(name, ctx, options)
    return ctx.fused


@register_repair("none")
def _none(ctx: RepairContext) -> None:
    """No repair."""


def has_batchnorm(model: nn.Module, keep: Sequence[nn.Module] = ()) -> bool:
    """Whether ``model`` has a BatchNorm layer with running statistics that a reset would recompute
    (those in ``keep`` left out): what ``repair="auto"`` resets, and why it needs calibration data."""
    kept = {id(m) for m in keep}
    return any(isinstance(m, _BN) and m.track_running_stats and id(m) not in kept for m in model.modules())


@register_repair("auto")
def _auto(ctx: RepairContext) -> None:
    """BatchNorm reset when the fused model has BatchNorm layers, else none (no fallback)."""
    ran = "reset_bn" if has_batchnorm(ctx.fused, ctx.frozen) else "none"
    ctx.details["repaired"] = ran
    if ran == "reset_bn":
        reset_bn(ctx.fused, ctx.data, ctx.device, progress=ctx.progress, keep=ctx.frozen, notes=ctx.notes)


@register_repair("reset_bn")
def _reset(ctx: RepairContext) -> None:
    """Recompute BatchNorm running statistics on the calibration data."""
    if not has_batchnorm(ctx.fused, ctx.frozen):
        ctx.details["repaired"] = "none"
        if has_batchnorm(ctx.fused):
            ctx.notes.append("repair 'reset_bn': every BatchNorm layer's statistics are final (folded into a layer "
                             "by refine='lstsq', or kept by a zipped branch refitted to its own model), so nothing "
                             "was reset")
        else:
            ctx.notes.append("repair 'reset_bn': the fused model has no BatchNorm layer with running statistics to "
                             "reset, so nothing was repaired; repair='repair' rescales LayerNorm/GroupNorm outputs")
        return
    reset_bn(ctx.fused, ctx.data, ctx.device, progress=ctx.progress, keep=ctx.frozen, notes=ctx.notes)


def _check_repair(options: dict[str, Any]) -> None:
    if options["eps"] <= 0:
        raise InvalidOptionError(f"repair 'repair': eps={options['eps']} must be > 0")
    if options["replay_gib"] < 0:
        raise InvalidOptionError(f"repair 'repair': replay_gib={options['replay_gib']} must be >= 0 "
                                 f"(0: one whole pass per norm layer)")


@register_repair("repair", check=_check_repair)
def _repair(ctx: RepairContext, *, eps: float = 1e-5, replay_gib: float = 4.0) -> None:
    """REPAIR: norm outputs get the interpolated sources' per-channel mean and std."""
    repair(ctx.fused, ctx.sources, ctx.graphs, ctx.maps, ctx.alpha, ctx.data, ctx.device, eps=eps,
           progress=ctx.progress, replay_gib=replay_gib, notes=ctx.notes, cache=ctx.cache)


def reset_bn(model: nn.Module, data: Any, device: str | torch.device | None = None,
             max_batches: int | None = None, progress: bool = False, keep: Sequence[nn.Module] = (),
             notes: list[str] | None = None) -> nn.Module:
    """Recompute the BatchNorm running statistics of ``model`` (in place) on ``data``.

    Only BatchNorm layers run in training mode (cumulative averages over all batches); dropout and
    other layers stay in eval mode; BatchNorm layers in ``keep`` keep their statistics. Returns the
    model, every module in its original mode.

    A batch of one sample is left out, whatever the kind of BatchNorm: BatchNorm1d on features
    refuses it (no spread to normalise by), and where it runs (BatchNorm2d, over one image's
    positions) its statistics lack the spread between images, while the cumulative average gives it
    the weight of a whole batch. (Tensors and datasets are never cut into such a batch by the runner;
    a ``DataLoader`` or a list of batches may end with one.) What was left out is appended to
    ``notes`` (the fusion report's fallbacks), or warned as a :class:`~alignment.errors.FallbackWarning`
    when ``notes`` is None.

    Raises:
        CalibrationError: every batch holds one sample (nothing to reset from).
    """
    kept = {id(m) for m in keep}
    bns = [m for m in model.modules() if isinstance(m, _BN) and id(m) not in kept]
    if not bns:
        return model
    saved = [m.momentum for m in bns]
    left_out: list[int] = []
    seen = [0]

    def single(b: int, x: torch.Tensor) -> bool:
        seen[0] = b + 1
        if len(x) == 1:
            left_out.append(b)
            return True
        return False

    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        try:
            stream([model], data, device=device, train=lambda m: isinstance(m, _BN) and id(m) not in kept,
                   max_batches=max_batches, progress=progress, desc="BatchNorm reset", skip=single)
        except CalibrationError:
            if not left_out or len(left_out) < seen[0]:
                raise
            raise CalibrationError(f"the BatchNorm reset found only batches of one sample ({len(left_out)}); "
                                   f"BatchNorm statistics need 2 or more samples per batch: give batches of 2 or more "
                                   f"(e.g. DataLoader(..., batch_size=64)), or repair='none'") from None
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
    if left_out:
        msg = _left_out_message(left_out, seen[0])
        if notes is not None:
            notes.append(msg)
        else:
            warnings.warn(msg, FallbackWarning, stacklevel=2)
    return model


def _left_out_message(left_out: list[int], total: int) -> str:
    if left_out == [total - 1]:
        what = "the last calibration batch (1 sample) was" if total > 1 else "calibration batch 0 (1 sample) was"
    else:
        shown = ", ".join(map(str, left_out[:5])) + (", ..." if len(left_out) > 5 else "")
        what = f"{len(left_out)} calibration batches of 1 sample (batch {shown}) were"
    return (f"repair: {what} left out of the BatchNorm reset (BatchNorm statistics need 2 or more samples per "
            f"batch: BatchNorm1d refuses one, and one image has no spread between images); to use every sample, give "
            f"batches of 2 or more (a batch_size that leaves no single sample over, or drop_last=True)")


def _channel_dim(module: nn.Module, graph: Graph, path: str) -> int:
    if isinstance(module, nn.LayerNorm):
        for s in graph.spaces:
            for o in s.observations:
                if o.module == path and o.io == "output":
                    return o.dim - o.ndim
        return -1
    return 1


def output_stats(model: nn.Module | Sequence[nn.Module], layers: list[tuple[str, int]], data: Any, device=None,
                 max_batches=None, progress: bool = False):
    """Per-channel mean and std (float64, CPU) at the outputs of ``(module path, channel dim)`` layers.

    ``model``: one model (returns ``{path: (mean, std)}``) or a list of distinct models run in one
    pass over the data (returns one such dict per model)."""
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    sums: list[dict[str, list]] = [{} for _ in models]
    hooks = []
    for m, acc in zip(models, sums):
        mods = dict(m.named_modules())
        for path, dim in layers:
            def hook(mod, args, out, path=path, dim=dim, acc=acc):
                _accumulate(acc.setdefault(path, [0, 0.0, 0.0]), out, dim)

            hooks.append(mods[path].register_forward_hook(hook, prepend=True))  # (the norm's own output)
    try:
        stream(models, data, device=device, max_batches=max_batches, progress=progress, desc="norm statistics")
    finally:
        for h in hooks:
            h.remove()
    out = [{path: _moments(a) for path, a in acc.items()} for acc in sums]
    return out if isinstance(model, (list, tuple)) else out[0]


def _accumulate(acc: list, out: torch.Tensor, dim: int) -> None:
    """Add one batch of a layer's output to ``acc = [count, sum, sum of squares]`` (per channel of
    ``dim``, float64)."""
    t = out.detach().movedim(dim, -1)
    t = t.reshape(-1, t.shape[-1]).double()
    acc[0] += t.shape[0]
    acc[1] = acc[1] + t.sum(0)
    acc[2] = acc[2] + (t * t).sum(0)


def _moments(acc: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (CPU) from :func:`_accumulate`'s sums."""
    n, s1, s2 = acc
    mean = s1 / n
    var = (s2 / n - mean * mean).clamp_min(0)
    return mean.cpu(), var.sqrt().cpu()


def repair(
    fused: nn.Module,
    sources: Sequence[nn.Module],
    graphs: Sequence[Graph],
    maps: dict[str, SpaceMap],
    alpha: Sequence[float],
    data: Any,
    device: str | torch.device | None = None,
    max_batches: int | None = None,
    eps: float = 1e-5,
    progress: bool = False,
    replay_gib: float = 4.0,
    notes: list[str] | None = None,
    cache: dict | None = None,
) -> nn.Module:
    """REPAIR the fused model in place (see the module docstring); returns it.

    Args:
        fused: the fused model (modified in place).
        sources: the source models (not modified).
        graphs: the sources' graphs.
        maps: the maps the fused model was built with (to align the sources' statistics).
        alpha: interpolation weights of the sources.
        data: calibration data.
        device: where to run (default: the fused model's device).
        max_batches: use at most this many batches per pass.
        eps: added to measured stds before dividing.
        progress: show progress bars.
        replay_gib: the LayerNorm/GroupNorm passes are replayed (about one forward pass in all)
            when the calibration inputs and the activations the replay caches (estimated as twice
            the model's largest activation per sample) fit in this many GiB; beyond it, one whole
            pass per norm layer, in constant memory (the same result; appended to ``notes``).
        notes: a list that receives what was done other than asked (the fusion report's fallbacks).
        cache: a dict kept across calls with the same sources and data (e.g. along an interpolation
            curve): the sources' norm statistics are measured once and read from it afterwards.
    """
    dev = torch.device(device) if device is not None else model_device(fused)
    norms = [(p, m) for p, m in fused.named_modules() if isinstance(m, _BN + _LN) and getattr(m, "weight", None) is not None]
    if not norms:
        msg = ("repair 'repair': the fused model has no norm layer with an affine weight (BatchNorm, LayerNorm, "
               "GroupNorm) whose outputs it could rescale, so nothing was repaired")
        if notes is not None:
            notes.append(msg)
        else:
            warnings.warn(msg, FallbackWarning, stacklevel=2)
        return fused
    g0 = graphs[0]
    layers = [(p, _channel_dim(m, g0, p)) for p, m in norms if not isinstance(m, _BN)]
    key = ("repair: source norm statistics", tuple(id(s) for s in sources), tuple(layers), max_batches, str(dev))
    src_stats = cache.get(key) if cache is not None else None
    if src_stats is None:
        # every source in one pass over the data (copies where a model is twice among them, or elsewhere)
        runs = runnable(sources, dev, avoid=[fused])
        src_stats = output_stats(runs, layers, data, dev, max_batches, progress) if layers else [{} for _ in sources]
        if cache is not None:
            cache[key] = src_stats
    src_mods = [dict(src.named_modules()) for src in sources]
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, m in norms:
        name = f"{path}.weight"
        if name not in g0.shapes or isinstance(m, _BN) or any(path not in st for st in src_stats):
            continue  # (a norm that no forward pass calls acts on nothing)
        mu_t, sd_t = 0, 0
        for i, g in enumerate(graphs):
            A = axis_matrix(g.layout(name)[0], maps, i, "out", True, alpha[i], name, 0)
            mu, sd = src_stats[i][path]
            # signed stds: a channel whose norm weight is negative in one source and positive in
            # another is anti-aligned; interpolating unsigned stds would blow it up
            sign = torch.sign(src_mods[i][path].weight.detach().double().cpu())
            sign[sign == 0] = 1
            mu_t = mu_t + A @ mu
            sd_t = sd_t + A @ (sd * sign)
        targets[path] = (mu_t, sd_t)
    if any(isinstance(m, _BN) for _, m in norms):
        reset_bn(fused, data, dev, max_batches, progress, notes=notes)
    mods = dict(fused.named_modules())
    todo = [(p, d) for p, d in layers if p in targets]

    def correct(path: str, measured: tuple[torch.Tensor, torch.Tensor]) -> None:
        m, (mu_f, sd_f), (mu_t, sd_t) = mods[path], measured, targets[path]
        scale = sd_t.abs() / (sd_f + eps)
        w = m.weight.detach().double().cpu()
        b = m.bias.detach().double().cpu() if m.bias is not None else torch.zeros_like(w)
        m.weight.copy_((w * scale).to(m.weight))
        if m.bias is not None:
            m.bias.copy_(((b - mu_f) * scale + mu_t).to(m.bias))

    if not todo:
        return fused
    with torch.no_grad():
        # the module calls of one forward pass (two samples): the norms in the order they run first
        # (a norm never called acts on nothing: nothing to measure or correct)
        tape = record(fused, first_batch(data)[:2].to(dev))
        order = sorted((la for la in todo if tape.count(la[0])), key=lambda la: tape.call(la[0]))
        if order and not _correct_by_replay(fused, mods, tape, order, data, dev, max_batches, progress, correct,
                                            replay_gib, notes if notes is not None else []):
            for path, dim in order:  # one whole pass per layer
                correct(path, output_stats(fused, [(path, dim)], data, dev, max_batches)[path])
    return fused


def _correct_by_replay(fused: nn.Module, mods: dict[str, nn.Module], tape: Tape, order: list[tuple[str, int]],
                       data: Any, dev: torch.device, max_batches: int | None, progress: bool, correct: Callable,
                       gib: float, notes: list[str]) -> bool:
    """Measure and ``correct(path, (mean, std))`` each norm layer of ``order`` (forward order, as
    ``tape`` recorded it), each pass running only the part of the model between the previous layer
    and this one (a :class:`fusion.replay.Replay`: finished calls are served from a cache of the
    calibration set's activations), instead of one whole forward pass per layer. The statistics are
    those of whole passes, bit for bit: each layer's output is its own forward applied to its
    captured input. ``mods``: ``fused``'s modules by path.

    Returns False, having corrected nothing, where a replay does not apply: a norm module called
    more than once per forward pass (its earlier calls would be served stale after its correction), a
    forward pass that calls different modules from one batch to the next, or a calibration set whose
    inputs and cached activations would take more than ``gib`` GiB (noted in ``notes``); the caller
    then runs whole passes (the same numbers, slower).
    """
    if any(tape.count(p) > 1 for p, _ in order):
        return False
    with modes([fused]):
        # memory: the inputs, and the activations the replay keeps per sample (about two of the
        # largest: the stream at the frontier and a branch beside it)
        largest = max((math.prod(c.input_shape[1:]) for c in tape.calls if len(c.input_shape) > 1), default=0)
        xs, used = [], 0.0
        for x in itertools.islice(batches(data), max_batches):
            xs.append(x)
            used += x.numel() * x.element_size() + 2 * largest * len(x) * x.element_size()
            if used > gib * 2 ** 30:
                notes.append(f"repair 'repair': replaying the norm passes would keep over {gib:g} GiB of calibration "
                             f"inputs and activations (replay_gib={gib:g}): one whole forward pass per norm layer "
                             f"instead (the same result, slower; raise replay_gib to replay)")
                return False
        replay = Replay(fused, tape, len(xs))
        steps: Any = order
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(order, desc="REPAIR (norm layers)", leave=False)
        done = 0
        try:
            with replay.session():
                for path, dim in steps:
                    stop = (tape.call(path), "in")
                    replay.plan(stop)
                    # the layer's own forward (no hooks: the replay's would count a second call)
                    forward = type(mods[path]).forward
                    acc: list = [0, 0.0, 0.0]
                    for b, x in enumerate(xs):
                        _accumulate(acc, forward(mods[path], replay.run(x.to(dev), b)[stop]), dim)
                    correct(path, _moments(acc))
                    done += 1
        except ReplayError:
            if done:
                raise  # some layers are corrected already: whole passes would correct them twice
            return False
    return True
