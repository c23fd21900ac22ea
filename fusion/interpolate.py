"""Interpolation curves between two models: loss and accuracy along the (aligned) linear path.

The alignment of the two models is computed once (:func:`fusion.api.align`); every point of the
curve is then ``al.apply([1 - alpha, alpha])`` followed by the chosen norm repair, evaluated on
held-out data. Comparing ``method="average"`` (plain weight averaging) with ``method="permute"``
shows how much aligning hidden units lowers the loss/accuracy barrier between the two models.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from alignment.errors import InvalidOptionError
from alignment.methods import CALL_KEYWORDS, METHODS
from alignment.runner import plain_precision

from .api import Alignment, ModelError, align
from .checks import model_list, option_dict
from .experiments.evaluate import evaluate_loss_and_accuracy
from .io import check_output_folder, write_files
from .refine import REFINEMENTS
from .repair import REPAIRS

__all__ = ["default_alphas", "interpolation_curve", "interpolation_report", "plot_curves"]

JSON_NAME = "interpolation.json"
PLOT_NAME = "interpolation.png"


def default_alphas(steps: int = 11) -> list[float]:
    """``steps`` evenly spaced weights from 0 to 1 (both ends exact)."""
    steps = int(steps)
    if steps < 2:
        raise InvalidOptionError(f"an interpolation curve needs at least 2 steps, got {steps}")
    return [i / (steps - 1) for i in range(steps)]


def _barriers(alphas: Sequence[float], acc: Sequence[float], loss: Sequence[float],
              end_acc: Sequence[float], end_loss: Sequence[float]) -> tuple[float, float]:
    b_acc = max((1 - a) * end_acc[0] + a * end_acc[1] - v for a, v in zip(alphas, acc))
    b_loss = max(v - ((1 - a) * end_loss[0] + a * end_loss[1]) for a, v in zip(alphas, loss))
    return float(b_acc), float(b_loss)


@plain_precision
def interpolation_curve(
    models: Sequence[nn.Module],
    calibration: Any,
    data: Any,
    alphas: Sequence[float] | None = None,
    method: str = "permute",
    repair: str = "auto",
    device: str | torch.device | None = None,
    progress: bool = False,
    refine: str = "none",
    repair_options: dict[str, Any] | None = None,
    refine_options: dict[str, Any] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Loss and accuracy of the fused model ``(1 - alpha) * A + alpha * B`` along ``alphas``.

    Args:
        models: exactly two models of one family (never modified).
        calibration: calibration data for the alignment statistics and the repair.
        data: evaluation data (a dataset or loader of ``(input, label)`` pairs whose labels index
            the models' heads).
        alphas: interpolation weights of the second model (default: 11 points from 0 to 1).
        method: fusion method for the alignment (see :func:`fusion.list_methods`).
        repair: ``"auto"`` (a BatchNorm reset where there is BatchNorm), ``"none"``, ``"reset_bn"`` or
            ``"repair"``, applied at every point.
        device: where to align, repair and evaluate (default: the models' device).
        progress: show progress bars while collecting statistics.
        refine: a refinement run at every point before the repair (``"none"`` or ``"lstsq"``; see
            :meth:`fusion.api.Alignment.build`).
        repair_options, refine_options: options of the repair and the refinement (checked before
            any work), as in :func:`fusion.fuse`.
        **options: passed on to :func:`fusion.align` (``seed`` and method options). The weights are
            the curve's own (``alphas``): ``alpha`` and ``normalize`` are refused.

    Returns:
        ``{"method", "repair", "refine", "alphas", "accuracy", "loss", "barrier_accuracy", "barrier_loss",
        "endpoints", "seconds"}``. ``endpoints``: the accuracy and loss of the two source models
        evaluated as they are. The barriers are the largest drop of the curve below the straight
        line between the sources (accuracy) and the largest rise above it (loss). The curve's own
        ends need not be the sources: a repair refits the norms there, and ``zip`` and ``merge``
        merge units inside each model, so their curves start and end at compressed models, whose
        loss against the sources counts in the barrier.
    """
    build = _check(models, repair, alphas, refine, repair_options, refine_options)
    _refuse_build_keywords(options)
    models = _distinct(models)
    t0 = time.perf_counter()
    al = align(models, calibration, method=method, device=device, progress=progress, **options)
    sources = _sources(models, data, device)
    return _curve(al, sources, data, alphas, method, repair, device, time.perf_counter() - t0, progress, **build)


def _sources(models: Sequence[nn.Module], data: Any, device: str | torch.device | None) -> dict[str, list[float]]:
    """The accuracy and loss of each source model as it is (the barriers' straight line)."""
    res = [evaluate_loss_and_accuracy(m, data, device=device) for m in models]
    return {"accuracy": [float(r["accuracy"]) for r in res], "loss": [float(r["loss"]) for r in res]}


def _distinct(models: Sequence[nn.Module]) -> list[nn.Module]:
    """The models, the second copied if it is the same object as the first (statistics hooks need
    distinct modules)."""
    models = list(models)
    if len(models) == 2 and models[1] is models[0]:
        models[1] = copy.deepcopy(models[0])
    return models


def _method_options(methods: Sequence[str], options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method, the options it takes: :func:`fusion.align`'s own keywords go to every method, a
    method option to the methods that have it (checked now, before any work). An option no method
    has is an error."""
    shared = set(inspect.signature(align).parameters) - {"models", "calibration", "method", "options"}
    out, used = {}, set()
    for m in methods:
        names = {o.name for o in METHODS.get(m).options}
        METHODS.validate(m, {k: v for k, v in options.items() if k in names})
        used |= names
        out[m] = {k: v for k, v in options.items() if k in names or k in shared}
    unknown = [k for k in options if k not in used and k not in shared]
    if unknown:
        raise InvalidOptionError(f"option {unknown[0]!r} is an option of none of the methods {', '.join(methods)}; see "
                                 f"`fusion methods` for each method's options")
    return out


def _check(models: Sequence[nn.Module], repair: str, alphas: Sequence[float] | None = None, refine: str = "none",
           repair_options: dict[str, Any] | None = None, refine_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check a curve's arguments; returns the keywords of every point's :meth:`Alignment.build`
    besides the weights and the repair."""
    if len(model_list(models, "interpolation_curve")) != 2:
        raise ModelError(f"an interpolation curve is between two models, got {len(models)}")
    REPAIRS.validate(repair, option_dict(repair_options, "repair_options"))
    REFINEMENTS.validate(refine, option_dict(refine_options, "refine_options"))
    _alphas(alphas)
    return {"refine": refine, "repair_options": repair_options, "refine_options": refine_options}


def _refuse_build_keywords(options: dict[str, Any]) -> None:
    """Refuse keywords of :func:`fusion.fuse` that a curve does not take (before: each was passed
    to :func:`fusion.align` and refused as an option the method does not have)."""
    takes = set(inspect.signature(align).parameters) | {"repair", "refine", "repair_options", "refine_options"}
    for k in options:
        if k in CALL_KEYWORDS and k not in takes:
            hint = ("the curve sets the weights itself: give alphas=[...] (the second model's weight at each point)"
                    if k in ("alpha", "normalize") else "drop it")
            raise InvalidOptionError(f"an interpolation curve takes no option {k!r} (a keyword of fusion.fuse); {hint}")


def _alphas(alphas: Sequence[float] | None) -> list[float]:
    """The curve's weights of the second model: numbers in [0, 1] (default: :func:`default_alphas`)."""
    if alphas is None:
        return default_alphas()
    try:
        out = [float(a) for a in alphas]
    except (TypeError, ValueError):
        raise InvalidOptionError(f"alphas must be numbers in [0, 1], got {alphas!r:.120}") from None
    if not out:
        raise InvalidOptionError("alphas must not be empty")
    bad = [a for a in out if not 0.0 <= a <= 1.0]
    if bad:
        raise InvalidOptionError(f"alphas must be in [0, 1] (the weight of the second model), got {bad[:3]}")
    return out


def _curve(al: Alignment, sources: dict[str, list[float]], data: Any,
           alphas: Sequence[float] | None, method: str, repair: str,
           device: str | torch.device | None, align_seconds: float, progress: bool = False, refine: str = "none",
           repair_options: dict[str, Any] | None = None, refine_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The curve of an existing alignment (``seconds`` includes ``align_seconds``); every point is
    built with ``refine`` and the options; barriers against ``sources`` (:func:`_sources`)."""
    alphas = _alphas(alphas)
    t0 = time.perf_counter()
    accs: list[float] = []
    losses: list[float] = []
    steps: Any = alphas
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(alphas, desc=f"{method} + {repair} along alpha", total=len(alphas), leave=False)
    for a in steps:
        weights = [1.0 - a, a]
        fused = al.build(weights, repair=repair, refine=refine, repair_options=repair_options,
                         refine_options=refine_options)
        res = evaluate_loss_and_accuracy(fused, data, device=device)
        accs.append(float(res["accuracy"]))
        losses.append(float(res["loss"]))
        del fused
    end_acc, end_loss = list(sources["accuracy"]), list(sources["loss"])
    b_acc, b_loss = _barriers(alphas, accs, losses, end_acc, end_loss)
    return {
        "method": method,
        "repair": repair,
        "refine": refine,
        "alphas": alphas,
        "accuracy": accs,
        "loss": losses,
        "barrier_accuracy": b_acc,
        "barrier_loss": b_loss,
        "endpoints": {"accuracy": end_acc, "loss": end_loss},
        "seconds": align_seconds + time.perf_counter() - t0,
    }


def plot_curves(curves: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Writes a two-panel PNG (accuracy and loss vs alpha, one line per method + repair) to ``path``
    (replaced all or nothing if it exists)."""
    path = Path(path)
    write_files(path.parent, {path.name: _plot_png(curves)})
    return path


def _plot_png(curves: Sequence[dict[str, Any]]) -> bytes:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax_acc, ax_loss = fig.subplots(1, 2)
    for c in curves:
        refine = c.get("refine", "none")
        label = f"{c['method']}{f' + {refine}' if refine != 'none' else ''} + {c['repair']}"
        ax_acc.plot(c["alphas"], [100 * a for a in c["accuracy"]], marker="o", label=label)
        ax_loss.plot(c["alphas"], c["loss"], marker="o", label=label)
    ax_acc.set(xlabel="alpha (weight of model B)", ylabel="accuracy (%)", title="Accuracy")
    ax_loss.set(xlabel="alpha (weight of model B)", ylabel="cross-entropy loss", title="Loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format="png")
    return buf.getvalue()


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


@plain_precision
def interpolation_report(
    models: Sequence[nn.Module],
    calibration: Any,
    data: Any,
    methods: Sequence[str] = ("average", "permute"),
    repairs: Sequence[str] = ("none", "reset_bn"),
    alphas: Sequence[float] | None = None,
    out: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    overwrite: bool = False,
    refine: str = "none",
    repair_options: dict[str, Any] | None = None,
    refine_options: dict[str, Any] | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Interpolation curves for every (method, repair) pair, optionally written to a folder.

    Args:
        models, calibration, data, alphas, device, progress: see :func:`interpolation_curve`.
        methods: fusion methods to compare (at least one).
        repairs: norm repairs to compare (at least one).
        options: :func:`fusion.align` keywords (every method) and method options (each to the
            methods that have it; one that no method has is an error). All are checked before any
            work.
        out: folder (created if missing) that receives ``interpolation.json`` (the list of curves)
            and ``interpolation.png`` (accuracy and loss vs alpha); nothing is written elsewhere.
            Checked before any work; both files are written all or nothing.
        overwrite: replace ``interpolation.json`` / ``interpolation.png`` when ``out`` holds them
            (default: refuse with :class:`fusion.io.OutputExistsError` before any work).
        refine, repair_options, refine_options: see :func:`interpolation_curve` (every curve's;
            ``repair_options`` must suit every repair in ``repairs``).

    Returns:
        The list of curve dicts, methods outer, repairs inner. Each method is aligned once and its
        alignment shared by its repairs (each curve's ``seconds`` counts the alignment); the source
        models are evaluated once, and every curve's barriers are against them.
    """
    methods, repairs = list(methods), list(repairs)
    if not methods or not repairs:
        raise InvalidOptionError(f"give at least one method and one repair (got methods={methods}, repairs={repairs})")
    for r in repairs:
        build = _check(models, r, alphas, refine, repair_options, refine_options)
    _refuse_build_keywords(options)
    per_method = _method_options(methods, options)
    if out is not None:
        check_output_folder(out, (JSON_NAME, PLOT_NAME), overwrite)
    models = _distinct(models)
    sources = _sources(models, data, device)  # (once: every curve's barriers are against them)
    curves = []
    for m in methods:  # one alignment per method, shared by its repairs
        t0 = time.perf_counter()
        al = align(models, calibration, method=m, device=device, progress=progress, **per_method[m])
        dt = time.perf_counter() - t0
        for r in repairs:
            curves.append(_curve(al, sources, data, alphas, m, r, device, dt, progress, **build))
    if out is not None:
        write_files(out, {JSON_NAME: (json.dumps(_json_safe(curves), indent=1) + "\n").encode(),
                          PLOT_NAME: _plot_png(curves)})
    return curves
