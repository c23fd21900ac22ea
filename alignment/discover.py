"""Automatic discovery of alignment spaces for any PyTorch model.

The model's forward pass is captured with ``torch.export`` (non-strict mode, which handles timm and
transformers models), then every axis of every tensor in the exported graph is propagated through a
table of op rules (:mod:`alignment._rules`) into a union-find of axis classes. Classes that touch the
model's inputs or outputs, kernels, or positions are fixed; the remaining classes that hold parameter
axes are the alignment spaces.
"""

from __future__ import annotations

import operator
import warnings
from collections import defaultdict
from typing import Any, Sequence

import torch
from torch import nn

from ._axes import AxisAlgebra, Dim
from ._rules import IGNORED, RULES
from .errors import DiscoveryError, ExportError, UnfollowableOpError
from .graph import FixedAxis, Graph, Member, Observation, Space, in_parametrization, module_of
from .permute import copy_model, model_tensors, reset_caches
from .runner import model_device, plain_precision

__all__ = ["discover", "discover_all", "same_structure", "example_args"]


@plain_precision
def discover(model: nn.Module, example_input: Any, *, strict: bool = False) -> Graph:
    """Discover the alignment spaces of ``model``.

    Args:
        model: any ``nn.Module``; it is not modified (parameters, buffers, train/eval mode and
            ``requires_grad`` flags are left as they are).
        example_input: an input batch (a tensor, or a tuple of positional inputs, or a dict of
            keyword inputs). Use a batch of at least 2 so the batch axis is not confused with
            broadcasting.
        strict: passed to ``torch.export.export`` (non-strict by default).

    Returns:
        The :class:`~alignment.graph.Graph` of spaces, fixed axes and observation points.

    Raises:
        ExportError: if ``torch.export`` cannot capture the forward pass.
        UnfollowableOpError: if an op mixes hidden features in a way discovery cannot follow; the
            message names the op and the module.
    """
    if not isinstance(model, nn.Module):
        raise DiscoveryError(f"discover needs a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = example_args(example_input)
    # export a copy: tracing runs the forward, which may fill caches (timm's attention-bias caches)
    # or otherwise touch module state; the user's model must stay exactly as it was
    traced = copy_model(model)
    # a cache filled by an earlier forward (HF LeViT's attention biases in eval mode) would be traced
    # as a constant, cut from the weights it was computed from: trace from the weights
    reset_caches(traced)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # recurrent layers re-assign their flat weight list while traced: torch's notice about it
            # concerns the traced copy only
            warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
            ep = torch.export.export(traced, args, kwargs=kwargs, strict=strict)
    except Exception as exc:  # torch raises many types; report them as one
        raise ExportError(
            f"torch.export could not capture {type(model).__name__}.forward: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}. Check that the example input runs through "
            f"the model, or simplify data-dependent control flow."
        ) from exc
    if any(isinstance(n.target, torch._ops.HigherOrderOperator) for n in ep.graph.nodes if n.op == "call_function"):
        # regions the export keeps as higher-order ops (autocast, grad-mode wrappers) hold their
        # ops in subgraphs; lowering to the core ops inlines them (costs a retrace: only when needed)
        ep = ep.run_decompositions({})
    tracer = _Tracer(ep, model)
    tracer.run()
    return tracer.build_graph()


def same_structure(a: nn.Module, b: nn.Module) -> bool:
    """Whether one graph describes both models: the same class, every parameter and buffer name and
    shape, and every submodule of the same class with the same settings (its plain attributes, such
    as ``num_heads``, ``stride`` or ``eps``, and a transformers ``config``). Tensor shapes alone do
    not tell a ViT with 4 heads from one with 8."""
    if type(a) is not type(b):
        return False
    ta = {k: tuple(v.shape) for k, v in list(a.named_parameters()) + list(a.named_buffers())}
    tb = {k: tuple(v.shape) for k, v in list(b.named_parameters()) + list(b.named_buffers())}
    return ta == tb and _settings(a) == _settings(b)


_SKIP = object()

# ops that move or copy a tensor's entries without computing new values: a query or key read
# through them is still its layer's output
_MOVES = frozenset({
    "aten.view", "aten.reshape", "aten._unsafe_view", "aten.permute", "aten.transpose", "aten.t", "aten.unbind",
    "aten.split", "aten.split_with_sizes", "aten.chunk", "aten.slice", "aten.select", "aten.contiguous",
    "aten.clone", "aten.expand", "aten.unsqueeze", "aten.squeeze", "aten.alias", "aten._to_copy", "aten.to",
    "aten.detach", "aten.dropout", "aten.flatten", "aten.unflatten", "aten.movedim", "aten.narrow", "getitem",
})
# ops that compute features as a weighted sum of their input features (a weight among the inputs)
_LAYERS = frozenset({"aten.linear", "aten.addmm", "aten.mm", "aten.matmul", "aten.bmm", "aten.conv1d", "aten.conv2d",
                     "aten.conv3d", "aten.convolution", "aten.einsum"})


def _setting(value: Any, depth: int = 0) -> Any:
    """A comparable token for a module attribute that shapes the forward pass, or ``_SKIP`` for
    state (tensors, caches) and objects that cannot be compared."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return ("float", repr(value))
    if isinstance(value, type) or callable(value) and not isinstance(value, nn.Module) and hasattr(value, "__name__"):
        return ("obj", id(value))
    if depth > 4 or isinstance(value, (torch.Tensor, nn.Module)):
        return _SKIP
    if isinstance(value, (tuple, list)):
        items = [_setting(v, depth + 1) for v in value]
        return _SKIP if any(v is _SKIP for v in items) else (type(value).__name__, tuple(items))
    if isinstance(value, dict):
        items = [(str(k), _setting(v, depth + 1)) for k, v in value.items()]
        return _SKIP if any(v is _SKIP for _, v in items) else ("dict", tuple(sorted(items)))
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):  # a transformers config
        try:
            d = {k: v for k, v in to_dict().items() if not k.startswith("_")}
        except Exception:  # noqa: BLE001 - an object whose to_dict needs arguments is not a config
            return _SKIP
        return ("config", _setting(d, depth + 1))
    return _SKIP


def _settings(model: nn.Module) -> list[tuple[str, str, tuple]]:
    out = []
    for name, m in model.named_modules():
        attrs = []
        for k, v in vars(m).items():
            if k.startswith("_") or k == "training":
                continue
            tok = _setting(v)
            if tok is not _SKIP:
                attrs.append((k, tok))
        out.append((name, type(m).__name__, tuple(attrs)))
    return out


@plain_precision
def discover_all(models: Sequence[nn.Module], example_input: Any) -> list[Graph]:
    """Graphs of several models, discovered once per distinct architecture.

    A model with the same class, tensor names and shapes as an earlier one reuses its graph (the
    graph depends only on the architecture and the input shape): fusing N seeds of one model costs
    one ``torch.export``.
    """
    graphs: list[Graph] = []
    for i, m in enumerate(models):
        j = next((j for j in range(i) if same_structure(models[j], m)), None)
        if j is None:
            x = example_input
            if isinstance(x, torch.Tensor):
                x = x.to(model_device(m))
        graphs.append(graphs[j] if j is not None else discover(m, x))
    return graphs


def example_args(example_input: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` a model is called with for an example input: a dict gives keyword inputs,
    a tuple or list positional inputs, anything else the one positional input."""
    if isinstance(example_input, dict):
        return (), dict(example_input)
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input), {}
    return (example_input,), {}


class _Tracer:
    """Propagates axis classes through an exported program."""

    def __init__(self, ep: torch.export.ExportedProgram, model: nn.Module):
        self.ep = ep
        self.model = model
        self.A = AxisAlgebra()
        self.C = self.A.C
        self.info: dict[torch.fx.Node, Any] = {}
        self.tensor_of: dict[str, str] = {}  # placeholder name -> state_dict name
        self.tensor_kind: dict[str, str] = {}
        self.tensor_dims: dict[str, list[Dim]] = {}
        self.checks: list[tuple[list[int], torch.fx.Node, str]] = []
        self.unknown: list[tuple[torch.fx.Node, list[int]]] = []
        self.activation_classes: set[int] = set()
        self.dim_owner: dict[int, tuple[str, int]] = {}  # id(Dim) of a parameter axis -> (tensor, axis)
        self.contracted: set[tuple[str, int]] = set()
        self.data_nodes: set[torch.fx.Node] = set()  # nodes computed from the model's inputs
        self.query_key: list[Dim] = []  # axes two layer outputs are contracted over (queries . keys)
        self.attention: list[Dim] = []  # axes any two input-dependent tensors are contracted over
        self.first_use: dict[str, None] = {}  # state tensors in the order the forward first uses them
        self.unused: dict[str, None] = {}  # state tensors the traced forward never reads

    # -- helpers used by rules ----------------------------------------------------------------
    @staticmethod
    def opname(node: torch.fx.Node) -> str:
        t = node.target
        if hasattr(t, "overloadpacket"):
            return str(t.overloadpacket)
        if hasattr(t, "name") and callable(getattr(t, "name")):
            return t.name().replace("::", ".")
        return getattr(t, "__name__", str(t))

    @staticmethod
    def is_tensor(x: Any) -> bool:
        return isinstance(x, torch.fx.Node) and isinstance(x.meta.get("val"), torch.Tensor)

    def dims(self, x: Any) -> list[Dim]:
        if not isinstance(x, torch.fx.Node):
            return []
        v = self.info.get(x)
        if v is None:
            return []
        return v

    def tensor_args(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        out = []

        def visit(a):
            if isinstance(a, torch.fx.Node):
                if self.is_tensor(a):
                    out.append(a)
            elif isinstance(a, (list, tuple)):
                for b in a:
                    visit(b)

        for a in node.args:
            visit(a)
        for a in node.kwargs.values():
            visit(a)
        return out

    @staticmethod
    def shape_of_val(v: Any) -> tuple[int, ...]:
        return tuple(int(s) for s in v.shape)

    def shape_of(self, x: torch.fx.Node) -> tuple[int, ...]:
        return self.shape_of_val(x.meta["val"])

    def shape(self, node: torch.fx.Node) -> tuple[int, ...]:
        v = node.meta["val"]
        if isinstance(v, (tuple, list)):
            v = v[0]
        return self.shape_of_val(v)

    def fresh_like_val(self, v: Any, reason: str | None) -> Any:
        if isinstance(v, torch.Tensor):
            return [self.A.fresh(int(s), reason) for s in v.shape]
        if isinstance(v, (tuple, list)):
            return [self.fresh_like_val(u, reason) for u in v]
        return None

    def fresh_like(self, node: torch.fx.Node, reason: str | None) -> Any:
        return self.fresh_like_val(node.meta.get("val"), reason)

    def elementwise(self, node: torch.fx.Node, inputs: list, base: list[Dim] | None = None) -> list[Dim]:
        """Broadcasting elementwise op: aligned axes of equal size index the same features."""
        shape = self.shape(node)
        n = len(shape)
        tensors = ([base] if base is not None else []) + [self.dims(t) for t in inputs if self.is_tensor(t)]
        tensors = [t for t in tensors if t is not None]
        out: list[Dim | None] = [None] * n
        src: list[tuple[list[Dim], int] | None] = [None] * n
        for t in tensors:
            off = n - len(t)
            for i, d in enumerate(t):
                j = off + i
                if d.size == shape[j] and d.size > 1:
                    if out[j] is None:
                        out[j], src[j] = d, (t, i)
        result = [d if d is not None else self.A.fresh(int(shape[j])) for j, d in enumerate(out)]
        for t in tensors:
            off = n - len(t)
            for i, d in enumerate(t):
                j = off + i
                if src[j] is not None and d.size == shape[j] and d.size > 1:
                    st, si = src[j]
                    if st is t and si == i:
                        continue
                    soff = n - len(st)
                    # positions of the source tensor -> positions of t (right-aligned broadcasting)
                    posmap = {p: (p + soff) - off for p in range(len(st)) if 0 <= (p + soff) - off < len(t)}
                    self.A.unify(st, si, t, i, posmap)
        return self.A.sanitize(result)

    def matmul(self, a: list[Dim], b: list[Dim], node: torch.fx.Node) -> list[Dim]:
        """``torch.matmul`` semantics: contraction of a's last axis with b's second-to-last."""
        shape = self.shape(node)
        self.mark_contracted(a, len(a) - 1)
        self.mark_contracted(b, max(len(b) - 2, 0))
        if len(a) == 1 and len(b) == 1:
            self.A.unify(a, 0, b, 0)
            return []
        if len(b) == 1:
            self.A.unify(a, len(a) - 1, b, 0)
            return list(a[:-1])
        if len(a) == 1:
            self.A.unify(a, 0, b, len(b) - 2)
            return list(b[:-2]) + [b[-1]]
        self.A.unify(a, len(a) - 1, b, len(b) - 2)
        nb = len(shape) - 2
        out: list[Dim] = []
        for j in range(nb):
            ia, ib = j - (nb - (len(a) - 2)), j - (nb - (len(b) - 2))
            da = a[ia] if ia >= 0 else None
            db = b[ib] if ib >= 0 else None
            if da is not None and db is not None:
                self.A.unify(a, ia, b, ib, {p: p - (len(a) - len(b)) for p in range(len(a))})
            pick = da if da is not None and da.size == shape[j] else db
            out.append(pick if pick is not None else self.A.fresh(int(shape[j])))
        out.append(a[-2])
        out.append(b[-1])
        return self.A.sanitize(out)

    def reshape(self, x: list[Dim], ins: tuple[int, ...], outs: tuple[int, ...]) -> list[Dim]:
        """View/reshape: group input and output axes with equal products; merge and split."""
        in_idx = [i for i, s in enumerate(ins) if s != 1]
        out_idx = [i for i, s in enumerate(outs) if s != 1]
        result: list[Dim | None] = [None] * len(outs)
        changed: list[tuple[list[Dim], list[Dim]]] = []
        i = j = 0
        while i < len(in_idx) and j < len(out_idx):
            gi, go = [in_idx[i]], [out_idx[j]]
            pi, po = ins[in_idx[i]], outs[out_idx[j]]
            while pi != po:
                if pi < po:
                    i += 1
                    gi.append(in_idx[i])
                    pi *= ins[in_idx[i]]
                else:
                    j += 1
                    go.append(out_idx[j])
                    po *= outs[out_idx[j]]
            if len(gi) == 1 and len(go) == 1:
                result[go[0]] = x[gi[0]]
            else:
                parts = self.A.regroup(x, gi, [outs[k] for k in go])
                if parts is None:  # boundaries that do not nest: through one flat axis
                    merged = x[gi[0]] if len(gi) == 1 else self.A.merge(x, gi)
                    parts = self.A.split(merged, [outs[k] for k in go]) if len(go) > 1 else [merged]
                for k, d in zip(go, parts):
                    result[k] = d
                changed.append(([x[k] for k in gi], list(parts)))
            i += 1
            j += 1
        final = [d if d is not None else self.A.fresh(int(outs[k])) for k, d in enumerate(result)]
        # axes depending on an axis the view split or merged (a head's features on the heads axis)
        # follow it to the new axes instead of collapsing
        for old, new in changed:
            final = [self.A.rekey(d, old, new) for d in final]
        return self.A.sanitize(final)

    def mark_contracted(self, dims: list[Dim], i: int) -> None:
        """Record that axis ``i`` of ``dims`` is summed against incoming features (role ``in``)."""
        owner = self.dim_owner.get(id(dims[i])) if 0 <= i < len(dims) else None
        if owner is not None:
            self.contracted.add(owner)

    def mark_query_key(self, x: Any, y: Any, d: Dim) -> None:
        """Record that axis ``d`` is summed between tensors ``x`` and ``y`` (fx nodes) that both depend
        on the model's inputs: features contracted against features, as queries against keys (every
        such axis is attention, :attr:`attention`; a product of two layers' outputs is also a
        query-key product, :attr:`query_key`)."""
        if x in self.data_nodes and y in self.data_nodes:
            self.attention.append(d)
            if self._layer_output(x) and self._layer_output(y):
                self.query_key.append(d)

    def _layer_output(self, node: Any) -> bool:
        """Whether ``node`` is a layer's output (a weight times the inputs), moved, split, scaled by
        a constant or passed through an inference BatchNorm (a per-feature affine map whose tensors
        the maps rescale with the layer's) only. A query-key product is bilinear in the two layers'
        outputs; one that goes through a softmax first (channel attention's ``softmax(k^T v) @
        q^T``), a ReLU (linear attention) or a normalisation over the features is not, and rescaling
        its features would change it."""
        while isinstance(node, torch.fx.Node) and node.op == "call_function":
            name = self.opname(node)
            args = [a for a in node.all_input_nodes if a in self.data_nodes]
            if name in _LAYERS:
                return len(args) < len(node.all_input_nodes)  # a weight among the inputs
            inference_norm = name == "aten._native_batch_norm_legit_no_training" or (
                name == "aten.batch_norm" and len(node.args) > 5 and node.args[5] is False)  # (training=False)
            if inference_norm or name in ("aten.reshape_as", "aten.view_as"):
                # a shape taken from another tensor moves the first; an inference BatchNorm is a
                # per-feature affine map of its layer's output, so the product stays bilinear in
                # the features (LeViT's Linear + BatchNorm projections)
                node = node.args[0]
                continue
            if len(args) != 1:
                return False
            if name in ("aten.mul", "aten.div"):
                other = [a for a in node.all_input_nodes if a is not args[0]]
                if any(not isinstance(a.meta.get("val"), torch.Tensor) or a.meta["val"].numel() != 1 for a in other):
                    return False
            elif name not in _MOVES:
                return False
            node = args[0]
        return False

    def require_fixed(self, d: Dim, node: torch.fx.Node, why: str) -> None:
        """Record that axis ``d`` must turn out fixed, or the op cannot be followed."""
        if d.size > 1:
            self.checks.append((d.classes(), node, why))

    def unfollowable(self, node: torch.fx.Node, why: str) -> UnfollowableOpError:
        mod, typ = self.module_of(node)
        op = self.opname(node)
        return UnfollowableOpError(
            f"discovery cannot follow `{op}` in module `{mod or '<root>'}` ({typ}): {why}. "
            f"Register an axis rule with alignment.register_op_rule('{op}') or "
            f"alignment.register_op_kind('{op}', 'elementwise'|'fixed'), or keep this part of the model out "
            f"of alignment.",
            op=op,
            module=mod,
        )

    @staticmethod
    def module_of(node: torch.fx.Node) -> tuple[str, str]:
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return "", "root"
        path, typ = list(stack.values())[-1]
        typ = typ if isinstance(typ, str) else getattr(typ, "__qualname__", str(typ))
        return _clean_path(path), typ.rsplit(".", 1)[-1]

    # -- main loop ---------------------------------------------------------------------------
    def run(self) -> None:
        sig = self.ep.graph_signature
        specs = {s.arg.name: s for s in sig.input_specs if hasattr(s.arg, "name")}
        state_names = set(self.ep.state_dict) | set(getattr(self.ep, "constants", {}) or {})
        for node in self.ep.graph.nodes:
            if node.op == "placeholder":
                self._placeholder(node, specs.get(node.name), state_names)
            elif node.op == "call_function":
                if any(a in self.data_nodes for a in node.all_input_nodes):
                    self.data_nodes.add(node)
                for a in self.tensor_args(node):
                    t = self.tensor_of.get(a.name) if a.op == "placeholder" else None
                    if t is not None:
                        self.first_use.setdefault(t, None)
                self._call(node)
                for d in self._flat_dims(self.info.get(node)):
                    self.activation_classes.update(d.classes())
            elif node.op == "output":
                self._output(node)

    def _flat_dims(self, v: Any):
        if isinstance(v, list):
            for x in v:
                if isinstance(x, Dim):
                    yield x
                else:
                    yield from self._flat_dims(x)

    def _placeholder(self, node, spec, state_names) -> None:
        val = node.meta.get("val")
        kind = getattr(spec, "kind", None)
        kname = getattr(kind, "name", "")
        if kname in ("PARAMETER", "BUFFER") and isinstance(val, torch.Tensor):
            dims = [self.A.fresh(int(s)) for s in val.shape]
            self.tensor_of[node.name] = spec.target
            self.tensor_kind[spec.target] = "parameter" if kname == "PARAMETER" else "buffer"
            self.tensor_dims[spec.target] = dims
            for ax, d in enumerate(dims):
                self.dim_owner[id(d)] = (spec.target, ax)
            if not node.users:
                self.unused[spec.target] = None  # placed (or fixed) by _place_unused
            self.info[node] = dims
        elif kname == "CONSTANT_TENSOR" and isinstance(val, torch.Tensor):
            self.info[node] = self.fresh_like_val(val, "constant")
        elif isinstance(val, torch.Tensor):
            self.info[node] = self.fresh_like_val(val, "model input")
            self.data_nodes.add(node)
        else:
            self.data_nodes.add(node)
            self.info[node] = self.fresh_like_val(val, "model input") if isinstance(val, (list, tuple)) else None

    def _call(self, node) -> None:
        if node.target is operator.getitem:
            src, idx = node.args
            v = self.info.get(src)
            self.info[node] = v[idx] if isinstance(v, list) and idx < len(v) and not isinstance(v[0], Dim) else None
            if self.info[node] is None and isinstance(node.meta.get("val"), torch.Tensor):
                self.info[node] = self.fresh_like(node, "output of an unfollowed op")
            return
        op = self.opname(node)
        if op in IGNORED or not _has_tensor(node.meta.get("val")) and op not in RULES:
            self.info[node] = self.fresh_like(node, "scalar")
            return
        rule = RULES.get(op)
        if rule is None:
            touched = [c for t in self.tensor_args(node) for d in self.dims(t) for c in d.classes()]
            out = self.fresh_like(node, None)
            touched += [c for d in self._flat_dims(out) for c in d.classes()]
            self.unknown.append((node, touched))
            self.info[node] = out
            return
        args = _bind(node)
        out = rule(self, node, args)
        self._check_shapes(node, out)
        self.info[node] = out

    def _check_shapes(self, node, out) -> None:
        val = node.meta.get("val")

        def check(v, o):
            if isinstance(v, torch.Tensor):
                got = [d.size for d in o] if isinstance(o, list) else None
                if got != [int(s) for s in v.shape]:
                    raise AssertionError(
                        f"internal error in the axis rule of {self.opname(node)} ({node.name}): "
                        f"rule gave sizes {got}, traced shape {list(v.shape)}"
                    )
            elif isinstance(v, (tuple, list)) and isinstance(o, list):
                for vv, oo in zip(v, o):
                    if vv is not None and oo is not None:
                        check(vv, oo)

        check(val, out)

    def _output(self, node) -> None:
        sig = self.ep.graph_signature
        outs = node.args[0]
        for spec, o in zip(sig.output_specs, outs):
            kname = getattr(getattr(spec, "kind", None), "name", "")
            dims = self.info.get(o) if isinstance(o, torch.fx.Node) else None
            if not isinstance(dims, list) or (dims and not isinstance(dims[0], Dim)):
                continue
            if kname in ("BUFFER_MUTATION", "PARAMETER_MUTATION") and spec.target in self.tensor_dims:
                target = self.tensor_dims[spec.target]
                for i in range(min(len(dims), len(target))):
                    self.A.unify(dims, i, target, i)
            else:
                for d in dims:
                    self.A.fix_dim(d, "model output")

    # -- finalisation -------------------------------------------------------------------------
    def _place_unused(self) -> None:
        """Axes of the parameters and buffers that the traced forward never reads (DINOv2's mask
        token, read only when patches are masked; an auxiliary head that runs only in training).
        No rule relates them, so an axis is taken to index the features of its module's other
        tensors when exactly one feature class of that size appears among their axes (the mask
        token next to the class token and position embeddings); every other axis is kept fixed.
        Both are noted. Another name of a tensor the forward reads (a module shared under two
        names) is kept fixed without a note."""
        C = self.C
        live = {C.find(c) for c in self.activation_classes}
        state = model_tensors(self.model)
        names: dict[int, list[str]] = defaultdict(list)  # every name of one tensor (shared modules)
        for n, t in state.items():
            names[id(t)].append(n)
        placed, kept = [], []
        for t in self.unused:
            alias = t in state and any(n not in self.unused for n in names[id(state[t])] if n != t)
            module = t.rpartition(".")[0]
            siblings = [s for s in self.tensor_dims if s not in self.unused and s.rpartition(".")[0] == module]
            moved = False
            for d in self.tensor_dims[t]:
                found = {C.find(x.cls) for s in siblings for x in self.tensor_dims[s]
                         if x.plain and x.size == d.size and not C.is_fixed(x.cls) and C.find(x.cls) in live}
                if not alias and d.plain and d.size > 1 and len(found) == 1:
                    C.union(d.cls, found.pop())
                    moved = True
                else:
                    self.A.fix_dim(d, "unused in forward")
            if moved:
                placed.append(t)
            elif not alias and any(d.size > 1 for d in self.tensor_dims[t]):  # (a counter has nothing to align)
                kept.append(t)

        def listed(ts: list[str]) -> str:
            return ", ".join(ts[:8]) + (f" and {len(ts) - 8} more" if len(ts) > 8 else "")
        if placed:
            C.notes.append(f"tensors the traced forward pass does not read follow the features of their module's "
                           f"other tensors of the same size: {listed(placed)}")
        if kept:
            C.notes.append(f"tensors the traced forward pass does not read are kept as they are (fusion averages "
                           f"the models' values index by index, resizing keeps their widths): {listed(kept)}")

    def _finalise(self) -> None:
        C = self.C
        self._place_unused()
        # learned prefix tokens (register tokens, latent queries: a (1, tokens, dim) parameter whose
        # token axis nothing else indexes) may be permuted, but their axis is a sample axis of every
        # activation that holds them: left permutable it would hide the features of every tensor it
        # reaches from the statistics. Kept in place (their fusion averages them index by index).
        axes: dict[int, list[tuple[int, tuple[int, ...]]]] = defaultdict(list)
        for dims in self.tensor_dims.values():
            for ax, d in enumerate(dims):
                if d.plain:
                    axes[C.find(d.cls)].append((ax, tuple(x.size for x in dims)))
        for r, where in axes.items():
            if all(ax == 1 and len(shape) == 3 and shape[0] == 1 and shape[2] > 1 for ax, shape in where):
                C.fix(r, "learned prefix tokens")
        # identical structure means identical index sets (query and key halves of one attention)
        changed = True
        while changed:
            changed = False
            seen: dict[tuple, int] = {}
            for r, st in list(C.struct.items()):
                if C.find(r) != r:
                    continue
                key = (None if st.outer is None else C.find(st.outer), tuple(C.find(p) for p in st.parts))
                if key in seen and C.find(seen[key]) != r:
                    C.union(seen[key], r)
                    changed = True
                else:
                    seen[key] = r
        self._propagate_fixed()
        # classes that never appear in an activation were not related by any rule: keep fixed
        self.live = self._live_classes()

    def _propagate_fixed(self) -> None:
        """Fixed flat classes fix their parts; structures of only fixed parts are fixed."""
        C = self.C
        changed = True
        while changed:
            changed = False
            for r, st in list(C.struct.items()):
                if C.find(r) != r:
                    continue
                if C.is_fixed(r):
                    for c in ([st.outer] if st.outer is not None else []) + st.parts:
                        if not C.is_fixed(c):
                            C.fix(c, C.fixed[r])
                            changed = True
                elif all(C.is_fixed(p) for p in st.parts) and (st.outer is None or C.is_fixed(st.outer)):
                    C.fix(r, "all parts fixed")
                    changed = True

    def _live_classes(self) -> set[int]:
        """Roots of the classes related to an activation by some rule: those of the activations,
        what they are made of, and what is made of them; :meth:`_pieces` keeps the others fixed.

        Liveness goes down a structure (the parts of a live axis are live) and up it: a parameter
        axis cut into pieces that each feed a different activation (``nn.MultiheadAttention``'s
        ``in_proj_weight`` as cross-attention: its query rows feed one linear, its key and value
        rows another) never appears whole in an activation, yet its pieces are aligned wherever
        they are read, so the parameter must follow them (kept fixed, it would keep rows that the
        consumers of the pieces permute). A concatenation, or blocks at fixed positions, is live
        when a part is, and :meth:`_pieces` then judges each part on its own; a factorisation into
        heads moves as one class, so it is live when all its components are, and one that is only
        partly live is fixed whole (sound: its live parts are then fixed wherever they appear)."""
        C = self.C
        live: set[int] = set()
        stack = [C.find(c) for c in self.activation_classes]
        while stack:
            while stack:
                r = C.find(stack.pop())
                if r in live:
                    continue
                live.add(r)
                st = C.struct.get(r)
                if st is not None:
                    stack.extend(([st.outer] if st.outer is not None else []) + st.parts)
            for r, st in list(C.struct.items()):
                if C.find(r) != r or r in live:
                    continue
                heads = st.outer is not None and not C.is_fixed(st.outer)
                comps = ([st.outer] if heads else []) + st.parts
                if (all if heads else any)(C.find(p) in live for p in comps):
                    stack.append(r)
        partly = [r for r, st in C.struct.items() if C.find(r) == r and r not in live
                  and st.outer is not None and not C.is_fixed(st.outer)
                  and any(C.find(p) in live for p in [st.outer, *st.parts])]
        for r in partly:
            C.fix(r, "partly related to activations")
        if partly:
            self._propagate_fixed()
        return live

    def _checks(self) -> None:
        C = self.C
        for classes, node, why in self.checks:
            if any(not C.is_fixed(c) for c in classes):
                raise self.unfollowable(node, f"it {why}, and that axis holds hidden features")
        for node, classes in self.unknown:
            if any(not C.is_fixed(c) for c in classes):
                raise self.unfollowable(node, "there is no axis rule for this op and it touches hidden features")

    def _fixed_axis(self, d: Dim) -> bool:
        """Whether no index of axis ``d`` can be permuted (every piece fixed)."""
        return d.plain and all(r is None for _, _, r, _ in self._pieces(d.cls, 0))

    def _pieces(self, c: int, off: int):
        """Ranges of class ``c``: (start, stop, root or None, fixed reason)."""
        C = self.C
        r = C.find(c)
        n = C.size[r]
        if C.is_fixed(r):
            yield off, off + n, None, C.fixed[r]
            return
        if r not in self.live:
            yield off, off + n, None, "not related to any activation"
            return
        st = C.struct.get(r)
        if st is None or (st.outer is not None and not C.is_fixed(st.outer)):
            yield off, off + n, r, None
            return
        for p in st.parts:
            yield from self._pieces(p, off)
            off += C.size[C.find(p)]

    def build_graph(self) -> Graph:
        self._finalise()
        self._checks()
        C = self.C
        members: dict[int, list[Member]] = defaultdict(list)
        fixed: list[FixedAxis] = []
        first: dict[int, tuple[int, str, int, bool]] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        order = list(self.tensor_dims)
        for ti, t in enumerate(order):
            dims = self.tensor_dims[t]
            shapes[t] = tuple(d.size for d in dims)
            for ax, d in enumerate(dims):
                pieces = list(self._pieces(d.cls, 0))
                for start, stop, r, reason in pieces:
                    if r is None:
                        fixed.append(FixedAxis(t, ax, start, stop, reason or "fixed"))
                        continue
                    role = "in" if (t, ax) in self.contracted else "out"
                    members[r].append(Member(t, self.tensor_kind[t], ax, start, stop, role))
                    whole = len(pieces) == 1
                    suffix = "" if whole else f"#{[p[0] for p in pieces].index(start)}"
                    cand = (0 if (ax == 0 and len(dims) >= 2) else 1, ti, _name_from(t) + suffix)
                    if r not in first or cand < first[r][:3]:
                        first[r] = (*cand, True)
        # heads structure
        heads_of: dict[int, int] = {}
        inner_of: dict[int, int] = {}
        for r in list(members):
            st = C.struct.get(r)
            if st is not None and st.outer is not None and not C.is_fixed(st.outer):
                heads_of[r] = C.find(st.outer)
                for p in st.parts:
                    if not C.is_fixed(p):
                        inner_of.setdefault(C.find(p), r)
        names: dict[int, str] = {}
        used: set[str] = set()

        def unique(n: str) -> str:
            base, k = n, 1
            while n in used:
                n = f"{base}~{k}"
                k += 1
            used.add(n)
            return n

        feature_roots = sorted(members, key=lambda r: (first[r][1], first[r][0], first[r][2]))
        # a block index that is produced by a layer (a depthwise conv's input channels) is a
        # feature space of its own; attention head indices only index bias tables
        head_roots = {
            h for h in heads_of.values()
            if not any(m.tensor.endswith("weight") and len(shapes[m.tensor]) >= 2 and m.axis == 0
                       for m in members.get(h, []))
        }
        for r in feature_roots:
            if r not in inner_of and r not in head_roots:
                names[r] = unique(first[r][2])
        # a feature space whose blocks two input-dependent tensors are contracted over indexes
        # attention heads (Swin V2: its position-bias MLP writes one value per head, and cosine
        # attention contracts the normalised queries and keys within each head)
        attention = {C.find(c) for d in self.attention for c in d.classes()}
        head_features = {h for r, h in heads_of.items() if h not in head_roots and h in members
                         and any(C.find(p) in attention for p in C.struct[r].parts if not C.is_fixed(p))}
        # heads and inner spaces are named after the space they structure; loop for nesting
        pending = [r for r in feature_roots if r not in names] + sorted(head_roots - set(members))
        while pending:
            progress = False
            for r in list(pending):
                owner = next((q for q in feature_roots if heads_of.get(q) == r and q in names), None)
                if r in head_roots and owner is not None:
                    names[r] = unique(names[owner] + ".heads")
                elif r in inner_of and inner_of[r] in names:
                    names[r] = unique(names[inner_of[r]] + ".inner")
                else:
                    continue
                pending.remove(r)
                progress = True
            if not progress:
                for r in pending:
                    names[r] = unique(first[r][2] if r in first else f"heads{r}")
                pending = []

        def tree(c: int) -> tuple:
            r = C.find(c)
            n = C.size[r]
            if C.is_fixed(r):
                return ("fixed", n)
            st = C.struct.get(r)
            if st is None:
                return ("leaf", names.get(r, f"_c{r}"), n)
            if st.outer is None or C.is_fixed(st.outer):
                return ("cat", [tree(p) for p in st.parts])
            h = C.find(st.outer)
            return ("heads", names.get(h, f"_c{h}"), C.size[h], [tree(p) for p in st.parts])

        # the feature ranges two input-dependent tensors are contracted over (queries . keys)
        qk_classes = {C.find(c) for d in self.query_key for c in d.classes()}

        def query_key_ranges(c: int, off: int) -> list[tuple[int, int]]:
            r = C.find(c)
            if r in qk_classes and not C.is_fixed(r):
                return [(off, off + C.size[r])]
            st = None if C.is_fixed(r) else C.struct.get(r)
            out: list[tuple[int, int]] = []
            for p in st.parts if st is not None else ():
                for a, b in query_key_ranges(p, off):
                    if out and out[-1][1] == a:
                        a = out.pop()[0]
                    out.append((a, b))
                off += C.size[C.find(p)]
            return out

        observations = self._observations(names)
        spaces: list[Space] = []
        for r in feature_roots:
            s = Space(name=names[r], width=C.size[r], members=members[r], observations=observations.get(r, []),
                      query_key=tuple(query_key_ranges(r, 0)), indexes_heads=r in head_features)
            if r in heads_of:
                h = heads_of[r]
                s.heads, s.num_heads = names[h], C.size[h]
                s.head_dim = C.size[r] // C.size[h]
            if r in inner_of:
                s.kind, s.parent = "inner", names[inner_of[r]]
            if r in head_roots:
                s.kind = "heads"
            s.tree = tree(r) if r not in head_roots else ("leaf", names[r], C.size[r])
            spaces.append(s)
        for h in sorted(head_roots - set(members)):
            spaces.append(
                Space(name=names[h], width=C.size[h], kind="heads", observations=observations.get(h, []),
                      tree=("leaf", names[h], C.size[h]))
            )
        modules = list(dict.fromkeys(module_of(t) for t in self.first_use))
        graph = Graph(spaces=spaces, fixed=fixed, shapes=shapes, notes=list(C.notes),
                      model_class=type(self.model).__name__, modules=modules,
                      buffers=[t for t in shapes if self.tensor_kind.get(t) == "buffer"],
                      aliases={k: v for k, v in self._first_names().items() if k != v and k in modules})
        return graph

    def _first_names(self) -> dict[str, str]:
        """Every name of every module -> the module's first name in ``named_modules()`` (a module
        reachable under several names is hooked and named by its first)."""
        first_name: dict[int, str] = {}
        return {name: first_name.setdefault(id(mod), name)
                for name, mod in self.model.named_modules(remove_duplicate=False)}

    def _observations(self, names: dict[int, str]) -> dict[int, list[Observation]]:
        """Hook points: tensors that leave (outputs) or enter (inputs) a module call."""
        scope_nodes: dict[str, list[torch.fx.Node]] = defaultdict(list)
        scope_path: dict[str, str] = {}
        # a module reachable under several names (``self.mlp2 = self.mlp3 = mlp``) is hooked and
        # counted as one object: every call is named by its first name, in execution order
        alias = self._first_names()
        for node in self.ep.graph.nodes:
            if node.op != "call_function":
                continue
            for key, (path, _typ) in (node.meta.get("nn_module_stack") or {}).items():
                scope_nodes[key].append(node)
                path = _clean_path(path)
                scope_path[key] = alias.get(path, path)
        calls: dict[str, list[str]] = defaultdict(list)
        for key in scope_nodes:
            calls[scope_path[key]].append(key)
        result: dict[int, list[Observation]] = defaultdict(list)
        for key, nodes in scope_nodes.items():
            path = scope_path[key]
            if not path:
                continue
            if in_parametrization(path):
                # a parametrisation (weight norm) returns a weight, not features of samples, though
                # its other axes look like samples
                continue
            call = calls[path].index(key)
            inside = set(nodes)
            outs = [n for n in nodes if any(u not in inside for u in n.users) and self.is_tensor(n)]
            ins = []
            for n in nodes:
                for a in self.tensor_args(n):
                    if a not in inside and a.op != "placeholder" or (
                        a.op == "placeholder" and a.name not in self.tensor_of
                    ):
                        if a not in inside and a not in ins:
                            ins.append(a)
            for io, group in (("output", outs), ("input", ins)):
                if len(group) != 1:
                    continue
                n = group[0]
                dims = self.info.get(n)
                if not isinstance(dims, list) or not dims or not isinstance(dims[0], Dim):
                    continue
                # the other axes are the samples, paired across models: a tensor whose other axes
                # hold permutable features (tokens of a token-mixing MLP read over channels,
                # register tokens) pairs different samples in different models, so it observes none
                held = [ax for ax, d in enumerate(dims) if d.size > 1 and not self._fixed_axis(d)]
                for ax, d in enumerate(dims):
                    if not d.plain or d.size == 1 or any(h != ax for h in held):
                        continue
                    for start, stop, r, _ in self._pieces(d.cls, 0):
                        if r is not None and r in names:
                            result[r].append(Observation(path, io, ax, start, stop, call, len(dims), self.shape(n)))
        return result


def _has_tensor(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, (tuple, list)):
        return any(_has_tensor(x) for x in v)
    return False


def _bind(node: torch.fx.Node) -> dict[str, Any]:
    """Arguments of an ATen node by schema name (defaults filled in)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return {f"arg{i}": a for i, a in enumerate(node.args)} | dict(node.kwargs)
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
    return out


def _clean_path(path: str) -> str:
    # torch.export records paths like "layer1.0.conv1" (older versions: "L['self'].layer1[0].conv1")
    p = path.replace("L['self']", "").replace("L__self__", "")
    p = p.replace("['", ".").replace("']", "").replace("[", ".").replace("]", "")
    return p.strip(".")


def _name_from(tensor: str) -> str:
    head, _, last = tensor.rpartition(".")
    return head if head and last in ("weight", "bias", "running_mean", "running_var") else tensor
