"""Norm repair: the last stage of fusion.

* ``"reset_bn"``: recompute BatchNorm running statistics of the fused model on calibration data.
* ``"repair"`` (REPAIR, Jordan et al.): rescale every channel after each norm layer so the fused
  model's per-channel mean and std match the interpolation of the source models' statistics of the
  corresponding (aligned) features. BatchNorm layers are reset first and then given the target
  affine; LayerNorm and GroupNorm layers are corrected one at a time in forward order, each measured
  after the corrections of the layers before it.
* ``"none"``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from alignment.errors import FusionError
from alignment.graph import Graph
from alignment.statistics import _batches, model_device

from .engine import SpaceMap, axis_matrix

REPAIRS = ("none", "reset_bn", "repair")
_BN = (nn.modules.batchnorm._BatchNorm,)
_LN = (nn.LayerNorm, nn.GroupNorm)


class UnknownRepairError(FusionError, ValueError):
    """The repair name is not one of :data:`REPAIRS`."""


def _norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BN + _LN)]


def reset_bn(model: nn.Module, data: Any, device: str | torch.device | None = None,
             max_batches: int | None = None) -> nn.Module:
    """Recompute the BatchNorm running statistics of ``model`` (in place) on ``data``.

    Only BatchNorm layers run in training mode (cumulative averages over all batches); dropout and
    other layers stay in eval mode. Returns the model in its original mode.
    """
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    if not bns:
        return model
    dev = torch.device(device) if device is not None else model_device(model)
    was = {m: m.training for m in model.modules()}
    saved = [(m.momentum,) for m in bns]
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for b, x in enumerate(_batches(data)):
                if max_batches is not None and b >= max_batches:
                    break
                model(x.to(dev))
    finally:
        for m, (mom,) in zip(bns, saved):
            m.momentum = mom
        for m, t in was.items():
            m.train(t)
    return model


def _channel_dim(module: nn.Module, graph: Graph, path: str) -> int:
    if isinstance(module, nn.LayerNorm):
        for s in graph.spaces:
            for o in s.observations:
                if o.module == path and o.io == "output":
                    return o.dim - o.ndim
        return -1
    return 1


def _output_stats(model: nn.Module, layers: list[tuple[str, int]], data: Any, device, max_batches=None):
    """Per-channel mean and std at the outputs of the given (module path, channel dim) layers."""
    mods = dict(model.named_modules())
    sums: dict[str, list] = {}
    hooks = []
    for path, dim in layers:
        def hook(mod, args, out, path=path, dim=dim):
            t = out.detach().movedim(dim, -1)
            t = t.reshape(-1, t.shape[-1]).double()
            acc = sums.setdefault(path, [0, 0.0, 0.0])
            acc[0] += t.shape[0]
            acc[1] = acc[1] + t.sum(0)
            acc[2] = acc[2] + (t * t).sum(0)

        hooks.append(mods[path].register_forward_hook(hook))
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            for b, x in enumerate(_batches(data)):
                if max_batches is not None and b >= max_batches:
                    break
                model(x.to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    out = {}
    for path, (n, s1, s2) in sums.items():
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(0)
        out[path] = (mean, var.sqrt())
    return out


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
) -> nn.Module:
    """REPAIR the fused model in place (see the module docstring); returns it.

    Args:
        fused: the fused model (modified in place).
        sources: the source models (not modified).
        graphs: the sources' graphs.
        maps: the maps the fused model was built with (to align the sources' statistics).
        alpha: interpolation weights of the sources.
        data: calibration data.
    """
    dev = torch.device(device) if device is not None else model_device(fused)
    norms = [(p, m) for p, m in _norm_layers(fused) if getattr(m, "weight", None) is not None]
    if not norms:
        return fused
    g0 = graphs[0]
    layers = [(p, _channel_dim(m, g0, p)) for p, m in norms]
    src_stats = []
    for src, g in zip(sources, graphs):
        run = src if model_device(src) == dev else _moved(src, dev)
        src_stats.append(_output_stats(run, layers, data, dev, max_batches))
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, _ in layers:
        name = f"{path}.weight"
        if name not in g0.shapes:
            continue
        mu_t, sd_t = 0, 0
        for i, g in enumerate(graphs):
            A = axis_matrix(g.layout(name)[0], maps, i, "out", True, alpha[i], name, 0)
            mu, sd = src_stats[i][path]
            mu_t = mu_t + A @ mu.cpu()
            sd_t = sd_t + A @ sd.cpu()
        targets[path] = (mu_t, sd_t)
    if any(isinstance(m, _BN) for _, m in norms):
        reset_bn(fused, data, dev, max_batches)
    with torch.no_grad():
        for path, m in norms:
            if path not in targets or not isinstance(m, _BN):
                continue
            mu_t, sd_t = targets[path]
            sign = torch.sign(m.weight.detach().double().cpu())
            sign[sign == 0] = 1
            m.weight.copy_((sd_t * sign).to(m.weight))
            m.bias.copy_(mu_t.to(m.bias))
        for path, dim in layers:
            m = dict(fused.named_modules())[path]
            if path not in targets or isinstance(m, _BN):
                continue
            mu_f, sd_f = _output_stats(fused, [(path, dim)], data, dev, max_batches)[path]
            mu_t, sd_t = targets[path]
            scale = (sd_t / (sd_f.cpu() + eps))
            w = m.weight.detach().double().cpu()
            b = m.bias.detach().double().cpu() if m.bias is not None else torch.zeros_like(w)
            m.weight.copy_((w * scale).to(m.weight))
            if m.bias is not None:
                m.bias.copy_(((b - mu_f.cpu()) * scale + mu_t).to(m.bias))
    return fused


def _moved(model: nn.Module, device) -> nn.Module:
    import copy

    return copy.deepcopy(model).to(device)
