"""The ``fusion`` command line."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import click
import torch

EPILOG_SPACES = """\b
Example:
  fusion spaces r18w32-s0 --zoo ../shared/zoo
  fusion spaces runs/fused.safetensors
"""
EPILOG_EVAL = """\b
Example:
  fusion eval r18w32-s0 --zoo ../shared/zoo
  fusion eval r18w32-A-s4 --zoo ../shared/zoo --limit 1000
"""
EPILOG_ZOO = """\b
Example:
  fusion zoo --zoo ../shared/zoo
"""
EPILOG_FUSE = """\b
Example:
  fusion fuse r18w32-s0 r18w32-s1 --zoo ../shared/zoo --out runs/fused.safetensors --eval
  fusion fuse vit128-s0 vit128-s1 --out runs/vit.safetensors --method permute --repair repair \\
      --calibration-size 1000 --alpha 0.3 --alpha 0.7 --option iterations=5
  fusion fuse timm:resnet18 timm:resnet18 --checkpoint a.safetensors --checkpoint b.safetensors \\
      --kwargs '{"in_chans": 1}' --num-classes 10 --out runs/r18.safetensors
"""
EPILOG_COMPRESS = """\b
Example:
  fusion compress r18w32-s0 --zoo ../shared/zoo --width 0.5 --out runs/r18-half.safetensors --eval
  fusion compress vit128-s0 --method merge --width 0.5 --repair none --out runs/vit-half.safetensors
  fusion compress r18w32-s0 --method magnitude --target r18w16-s2 --out runs/r18-pruned.safetensors
"""
EPILOG_INTERPOLATE = """\b
Example:
  fusion interpolate r18w32-s0 r18w32-s1 --zoo ../shared/zoo --out runs/interp
  fusion interpolate vit128-s0 vit128-s1 --out runs/vit-interp --methods average,permute \\
      --repairs none,repair --steps 5 --test-limit 2000
"""
EPILOG_METHODS = """\b
Example:
  fusion methods
"""


def resolve_model(spec: str, zoo: str | None = None, checkpoint: str | None = None,
                  kwargs: dict | None = None, num_classes: int | None = None):
    """Load a model from a zoo name, a saved ``.safetensors`` (with JSON sidecar), an HF directory
    or ``timm:NAME`` (with ``checkpoint``, constructor ``kwargs`` and ``num_classes``).

    Returns:
        ``(model, entry)``; ``entry`` is the zoo/sidecar entry (built from the constructor spec for
        ``timm:`` models; None for HF directories).
    """
    from . import zoo as zoo_mod

    if spec.startswith("timm:"):
        return _load_timm(spec[len("timm:"):], checkpoint, kwargs, num_classes)
    path = Path(spec)
    if path.is_dir() and (path / "config.json").exists():
        import transformers

        model = transformers.AutoModelForImageClassification.from_pretrained(str(path), local_files_only=True)
        return model.eval(), None
    if path.suffix in (".safetensors", ".json") or path.with_suffix(".json").exists():
        return zoo_mod.load_model_file(path)
    return zoo_mod.load_model(spec, zoo)


def _load_timm(name: str, checkpoint: str | None, kwargs: dict | None, num_classes: int | None):
    """A ``timm`` model built with random initialisation and loaded from ``checkpoint``."""
    from . import zoo as zoo_mod

    if not name:
        raise click.BadParameter("timm models are given as timm:NAME (e.g. timm:resnet18)")
    if checkpoint is None:
        raise click.BadParameter(f"timm:{name} needs a --checkpoint FILE with its weights")
    num_classes = 10 if num_classes is None else int(num_classes)
    arch = {"library": "timm", "name": name, "kwargs": dict(kwargs or {})}
    model = zoo_mod.build_model(arch, num_classes)
    ckpt = Path(checkpoint)
    if ckpt.suffix == ".safetensors":
        zoo_mod.load_weights(model, ckpt, what=f"timm:{name}")
    else:
        if not ckpt.is_file():
            raise zoo_mod.CheckpointNotFoundError(f"Checkpoint {ckpt} of timm:{name} not found.")
        state = torch.load(str(ckpt), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise zoo_mod.CheckpointMismatchError(f"Could not load {ckpt} into timm:{name}: {exc}") from exc
    entry = zoo_mod.ZooEntry(name=name, library="timm", arch_name=name, kwargs=dict(kwargs or {}),
                             num_classes=num_classes, classes=list(range(num_classes)), weights=ckpt)
    return model.eval(), entry


def _resolve_all(specs, zoo_dir, checkpoints, kwargs_json, num_classes):
    """Resolve several model specs; ``timm:`` specs take the checkpoints in order."""
    kwargs = _parse_kwargs(kwargs_json)
    n_timm = sum(1 for s in specs if s.startswith("timm:"))
    checkpoints = list(checkpoints or ())
    if len(checkpoints) != n_timm:
        raise click.BadParameter(
            f"give one --checkpoint per timm: model ({n_timm} timm: models, {len(checkpoints)} checkpoints)",
            param_hint="--checkpoint")
    ckpts = iter(checkpoints)
    out = []
    for spec in specs:
        ckpt = next(ckpts) if spec.startswith("timm:") else None
        out.append(resolve_model(spec, zoo_dir, checkpoint=ckpt, kwargs=kwargs, num_classes=num_classes))
    return out


def _parse_kwargs(text: str | None) -> dict:
    if not text:
        return {}
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint="--kwargs") from exc
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--kwargs")
    return value


def _parse_options(items) -> dict:
    """``key=value`` pairs; values are parsed as JSON when they can be (numbers, booleans...)."""
    import json

    out = {}
    for item in items or ():
        if "=" not in item:
            raise click.BadParameter(f"{item!r} is not key=value", param_hint="--option")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _arch_of(model, entry) -> tuple[dict, int, list[int]]:
    """(constructor spec, num_classes, classes) that rebuild ``model``."""
    if entry is not None:
        return entry.arch, entry.num_classes, list(entry.classes)
    config = getattr(model, "config", None)
    if config is None:
        raise click.ClickException("cannot tell how to rebuild the first model (no zoo entry or config)")
    drop = {"architectures", "model_type", "transformers_version", "id2label", "label2id", "num_labels",
            "torch_dtype", "_name_or_path", "_attn_implementation_autoset"}
    kwargs = {k: v for k, v in config.to_diff_dict().items() if k not in drop}
    n = int(config.num_labels)
    return {"library": "transformers", "name": type(model).__name__, "kwargs": kwargs}, n, list(range(n))


def _classes_union(entries) -> list[int] | None:
    if any(e is None or not e.classes for e in entries):
        return None
    return sorted({int(c) for e in entries for c in e.classes})


def _calibration(entries, size: int, seed: int, data_root: str | None):
    from .data import calibration_subset, load_fashion_mnist

    train = load_fashion_mnist("train", root=data_root, classes=_classes_union(entries), remap=False)
    try:
        return calibration_subset(train, size, seed=seed)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--calibration-size") from exc


def _test_data(entry, data_root: str | None, limit: int | None):
    from torch.utils.data import Subset

    from .data import load_fashion_mnist

    classes = list(entry.classes) if entry is not None and entry.classes else None
    data = load_fashion_mnist("test", root=data_root, classes=classes)
    if limit:
        data = Subset(data, range(min(limit, len(data))))
    return data


@contextlib.contextmanager
def _user_errors():
    """Turn the toolkit's own errors (bad names, missing files, mismatches) into clean CLI errors."""
    from alignment.errors import FusionError

    from .data import DataError
    from .evaluate import EvaluationError
    from .zoo import ZooError

    try:
        yield
    except (FusionError, ZooError, DataError, EvaluationError) as exc:
        raise click.ClickException(str(exc)) from exc


def _clean_errors(fn):
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _user_errors():
            return fn(*args, **kwargs)

    return wrapper


def _timm_options(fn):
    fn = click.option("--num-classes", type=int, default=None,
                      help="Head width of timm:NAME models (default 10).")(fn)
    fn = click.option("--kwargs", "kwargs_json", default=None,
                      help='Constructor kwargs of timm:NAME models as JSON, e.g. \'{"in_chans": 1}\'.')(fn)
    fn = click.option("--checkpoint", "checkpoints", multiple=True,
                      help="Weights of a timm:NAME model (.safetensors or .pt); once per timm: model, in order.")(fn)
    return fn


def _example_input(entry, model) -> torch.Tensor:
    chans = 1
    if entry is not None:
        chans = int(entry.kwargs.get("in_chans", entry.kwargs.get("num_channels", 1)))
    size = 28
    return torch.randn(2, chans, size, size)


@click.group()
def main() -> None:
    """Fuse independently trained vision models by aligning their hidden units."""


@main.command(epilog=EPILOG_ZOO)
@click.option("--zoo", "zoo_dir", default=None, help="Zoo folder (default: $FUSION_ZOO).")
def zoo(zoo_dir: str | None) -> None:
    """List the checkpoints of a model zoo."""
    from .zoo import load_manifest

    for name, e in load_manifest(zoo_dir).items():
        classes = f"{min(e.classes)}-{max(e.classes)}" if e.classes else "?"
        acc = f"{100 * e.test_accuracy:.2f}%" if e.test_accuracy is not None else "-"
        click.echo(f"{name:16s} {e.library}:{e.arch_name:24s} classes {classes:5s} test acc {acc}")


@main.command(epilog=EPILOG_SPACES)
@click.argument("model")
@click.option("--zoo", "zoo_dir", default=None, help="Zoo folder for zoo names (default: $FUSION_ZOO).")
def spaces(model: str, zoo_dir: str | None) -> None:
    """Discover and print the alignment spaces of MODEL."""
    from alignment import discover

    m, entry = resolve_model(model, zoo_dir)
    graph = discover(m, _example_input(entry, m))
    click.echo(graph.summary())


@main.command(name="eval", epilog=EPILOG_EVAL)
@click.argument("model")
@click.option("--zoo", "zoo_dir", default=None, help="Zoo folder for zoo names (default: $FUSION_ZOO).")
@click.option("--data", "data_root", default=None, help="Fashion-MNIST folder (default: $FUSION_DATA_DIR or the Debian path).")
@click.option("--limit", type=int, default=None, help="Evaluate on the first N test images only.")
@click.option("--device", default=None, help="Device to evaluate on (e.g. cuda).")
@_timm_options
def eval_cmd(model: str, zoo_dir: str | None, data_root: str | None, limit: int | None, device: str | None,
             checkpoints, kwargs_json, num_classes) -> None:
    """Test accuracy of MODEL on Fashion-MNIST (the classes it was trained on).

    MODEL is a zoo name, a .safetensors file written by `fusion fuse` (or save_model), an HF model
    folder, or timm:NAME with --checkpoint.
    """
    from .evaluate import accuracy

    with _user_errors():
        [(m, entry)] = _resolve_all([model], zoo_dir, checkpoints, kwargs_json, num_classes)
        data = _test_data(entry, data_root, limit)
        acc = accuracy(m, data, device=device)
    n = len(data)
    click.echo(f"{model}: accuracy {100 * acc:.2f}% ({round(acc * n)}/{n} correct) on {n} test images")


def _width_option(text: str | None):
    """``--width``: a factor (0.5), an absolute width (64), or JSON per-space widths."""
    import json

    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"{text!r} is not a number or a JSON object", param_hint="--width") from exc
    if isinstance(value, bool) or not isinstance(value, (int, float, dict)):
        raise click.BadParameter(f"{text!r} is not a number or a JSON object", param_hint="--width")
    return value


def _fusion_options(fn):
    """Options shared by ``fuse`` and ``compress``."""
    opts = [
        click.option("--out", required=True, help="Output .safetensors path (a .json sidecar is written next to it)."),
        click.option("--repair", default="reset_bn", show_default=True,
                     type=click.Choice(["none", "reset_bn", "repair"]), help="Norm repair after fusing."),
        click.option("--target", "target_spec", default=None,
                     help="A model of the fused widths (zoo name, file, HF folder); only its architecture is used."),
        click.option("--width", "width_text", default=None,
                     help="Fused widths relative to the first model: a factor (0.5), a width, or JSON per space."),
        click.option("--calibration-size", type=int, default=2000, show_default=True,
                     help="Calibration images drawn from the Fashion-MNIST train split."),
        click.option("--calibration-seed", type=int, default=0, show_default=True, help="Seed of the calibration draw."),
        click.option("--data", "data_root", default=None,
                     help="Fashion-MNIST folder (default: $FUSION_DATA_DIR or the Debian path)."),
        click.option("--zoo", "zoo_dir", default=None, help="Zoo folder for zoo names (default: $FUSION_ZOO)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for randomised solvers."),
        click.option("--device", default=None, help="Device for statistics and repair (default cpu)."),
        click.option("--option", "options", multiple=True,
                     help="Method option key=value (repeatable), e.g. solver=sinkhorn or reg=0.05."),
        click.option("--eval", "do_eval", is_flag=True, help="Print the fused model's test accuracy."),
        click.option("--test-limit", "--limit", "test_limit", type=int, default=None,
                     help="With --eval: evaluate on the first N test images only."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _run_fusion(models, method, alpha, out, repair, target_spec, width_text, calibration_size, calibration_seed,
                data_root, zoo_dir, seed, device, options, do_eval, test_limit, checkpoints, kwargs_json,
                num_classes) -> None:
    import dataclasses

    from . import fuse as fuse_fn
    from .evaluate import accuracy
    from .zoo import build_model, example_input, save_model, space_widths

    resolved = _resolve_all(models, zoo_dir, checkpoints, kwargs_json, num_classes)
    mods = [m for m, _ in resolved]
    entries = [e for _, e in resolved]
    target, arch_source = None, (mods[0], entries[0])
    if target_spec is not None:
        if width_text is not None:
            raise click.UsageError("give --target or --width, not both")
        target, t_entry = resolve_model(target_spec, zoo_dir)
        arch_source = (target, t_entry)
    width = _width_option(width_text)
    arch, n_classes, classes = _arch_of(*arch_source)
    calibration = _calibration(entries, calibration_size, calibration_seed, data_root)
    fused = fuse_fn(mods, calibration, method=method, repair=repair, alpha=alpha, seed=seed, device=device,
                    target=target, width=width, progress=True, **_parse_options(options))
    fused = fused.to("cpu")
    report = fused.fusion_report
    # a width the constructor does not build is recorded per space (loading resizes to it)
    ex = example_input(arch)
    widths = space_widths(fused, ex)
    if widths != space_widths(build_model(arch, n_classes), ex):
        widths_arg = widths
    else:
        widths_arg = None
    path = save_model(fused, out, arch=arch, num_classes=n_classes, classes=classes, widths=widths_arg,
                      extra={"method": method, "repair": repair, "sources": list(models),
                             "target": target_spec, "report": dataclasses.asdict(report)})
    click.echo(report.summary())
    click.echo(f"wrote {path} (+ {path.with_suffix('.json').name})")
    if do_eval:
        data = _test_data(entries[0] if entries[0] is not None else _entry_like(classes), data_root, test_limit)
        acc = accuracy(fused, data, device=device)
        n = len(data)
        click.echo(f"fused: accuracy {100 * acc:.2f}% ({round(acc * n)}/{n} correct) on {n} test images")


@main.command(epilog=EPILOG_FUSE)
@click.argument("models", nargs=-1, required=True)
@click.option("--method", default="permute", show_default=True, help="Fusion method (see `fusion methods`).")
@click.option("--alpha", "alphas", type=float, multiple=True,
              help="Interpolation weight: once per model, or once for two models (weight of the second). Default: uniform.")
@_fusion_options
@_timm_options
@_clean_errors
def fuse(models, method, alphas, **kw) -> None:
    """Fuse MODELS (two or more) into one model.

    MODELS are zoo names, .safetensors files with a JSON sidecar, HF model folders, or timm:NAME
    (with --checkpoint, --kwargs, --num-classes). The fused model has the first model's
    architecture, or that of --target (a model of the same family, e.g. narrower), or the first
    model's resized by --width. Calibration images come from the Fashion-MNIST train split,
    restricted to the union of the models' classes.
    """
    if len(models) < 2:
        raise click.UsageError("fuse needs at least two models (use `fusion compress` for one)")
    alpha = None
    if alphas:
        if len(alphas) == 1 and len(models) == 2:
            alpha = float(alphas[0])
        elif len(alphas) == len(models):
            alpha = [float(a) for a in alphas]
        else:
            raise click.BadParameter(f"give one --alpha per model ({len(models)}), or one for two models",
                                     param_hint="--alpha")
    _run_fusion(models, method, alpha, **kw)


@main.command(epilog=EPILOG_COMPRESS)
@click.argument("model")
@click.option("--method", default="ot", show_default=True,
              help="ot (transport onto fewer units), merge (merge correlated features), magnitude (L1 pruning), permute.")
@_fusion_options
@_timm_options
@_clean_errors
def compress(model, method, **kw) -> None:
    """Compress MODEL to a narrower width (--width 0.5, or --target a narrower model of its family).

    Features are merged onto fewer units through the same engine as fusion, then norms are repaired
    on calibration data (--repair).
    """
    if kw.get("target_spec") is None and kw.get("width_text") is None:
        raise click.UsageError("give --width (e.g. 0.5) or --target (a narrower model)")
    _run_fusion([model], method, None, **kw)


def _entry_like(classes):
    from types import SimpleNamespace

    return SimpleNamespace(classes=classes)


@main.command(epilog=EPILOG_INTERPOLATE)
@click.argument("models", nargs=2)
@click.option("--out", required=True, help="Folder for interpolation.json and interpolation.png.")
@click.option("--methods", default="average,permute", show_default=True, help="Comma-separated fusion methods.")
@click.option("--repairs", default="none,reset_bn", show_default=True, help="Comma-separated repairs (none, reset_bn, repair).")
@click.option("--steps", type=int, default=11, show_default=True, help="Number of alphas from 0 to 1.")
@click.option("--calibration-size", type=int, default=2000, show_default=True,
              help="Calibration images drawn from the Fashion-MNIST train split.")
@click.option("--calibration-seed", type=int, default=0, show_default=True, help="Seed of the calibration draw.")
@click.option("--test-limit", type=int, default=None, help="Evaluate on the first N test images only.")
@click.option("--data", "data_root", default=None, help="Fashion-MNIST folder (default: $FUSION_DATA_DIR or the Debian path).")
@click.option("--zoo", "zoo_dir", default=None, help="Zoo folder for zoo names (default: $FUSION_ZOO).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for randomised solvers.")
@click.option("--device", default=None, help="Device for statistics, repair and evaluation (default cpu).")
@click.option("--option", "options", multiple=True, help="Method option key=value (repeatable).")
@_timm_options
@_clean_errors
def interpolate(models, out, methods, repairs, steps, calibration_size, calibration_seed, test_limit, data_root,
                zoo_dir, seed, device, options, checkpoints, kwargs_json, num_classes) -> None:
    """Loss and accuracy along the path between two models, per fusion method and repair.

    Writes OUT/interpolation.json (the curves) and OUT/interpolation.png (accuracy and loss vs alpha).
    The test data uses the first model's classes.
    """
    from .interpolate import default_alphas, interpolation_report
    from .repair import REPAIRS

    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    repair_list = [r.strip() for r in repairs.split(",") if r.strip()]
    bad = [r for r in repair_list if r not in REPAIRS]
    if bad or not repair_list:
        raise click.BadParameter(f"repairs must be among {', '.join(REPAIRS)}; got {repairs!r}", param_hint="--repairs")
    if not method_list:
        raise click.BadParameter("give at least one method", param_hint="--methods")
    if steps < 2:
        raise click.BadParameter("needs at least 2 steps", param_hint="--steps")
    resolved = _resolve_all(models, zoo_dir, checkpoints, kwargs_json, num_classes)
    mods = [m for m, _ in resolved]
    entries = [e for _, e in resolved]
    if all(e is not None for e in entries) and list(entries[0].classes) != list(entries[1].classes):
        click.echo(f"warning: the models' classes differ ({entries[0].classes} vs {entries[1].classes}); "
                   "evaluating on the first model's", err=True)
    calibration = _calibration(entries, calibration_size, calibration_seed, data_root)
    first = entries[0] if entries[0] is not None else _entry_like(_arch_of(mods[0], None)[2])
    data = _test_data(first, data_root, test_limit)
    curves = interpolation_report(mods, calibration, data, methods=method_list, repairs=repair_list,
                                  alphas=default_alphas(steps), out=out, device=device, progress=True,
                                  seed=seed, **_parse_options(options))
    for c in curves:
        click.echo(f"{c['method']:>16s} + {c['repair']:8s}: accuracy "
                   + " ".join(f"{100 * a:.1f}" for a in c["accuracy"])
                   + f" | barrier acc {100 * c['barrier_accuracy']:.2f} pts, loss {c['barrier_loss']:.3f}"
                   + f" ({c['seconds']:.1f}s)")
    click.echo(f"wrote {Path(out) / 'interpolation.json'} and {Path(out) / 'interpolation.png'}")


@main.command(epilog=EPILOG_METHODS)
def methods() -> None:
    """List the registered fusion methods."""
    from . import list_methods

    for name in list_methods():
        click.echo(name)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
