"""The graph of alignment spaces of a model, as returned by :func:`alignment.discover`.

A :class:`Space` is a set of parameter axes (with index ranges) that index the same hidden features.
Its structure says how its indices may be permuted:

* a plain space: any permutation;
* a space structured in heads (attention query-key or value-output dims): heads move as whole
  blocks, with the permutation of the space's ``heads`` space (shared by the query-key and
  value-output spaces of one attention block), and dims may be permuted within each head;
* ``heads`` spaces: the head index itself (members are parameters indexed by head, e.g. a relative
  position bias table);
* ``inner`` spaces: a dims-within-head axis shared by all heads (e.g. a per-head-dim norm); its
  permutation is part of its parent's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from .errors import PermutationError, SpaceMismatchError
from .structure import Leaf, Node, from_tuple

__all__ = ["Member", "FixedAxis", "Observation", "Space", "Graph", "ranked_members", "module_of",
           "in_parametrization"]


@dataclass(frozen=True)
class Member:
    """A parameter or buffer axis range that belongs to a space.

    Attributes:
        tensor: dotted name in the model's ``state_dict`` (e.g. ``"layer1.0.conv1.weight"``).
        kind: ``"parameter"`` or ``"buffer"``.
        axis: the tensor axis.
        start: first index of the range along ``axis``.
        stop: one past the last index; ``stop - start`` equals the space's width.
        role: ``"in"`` if the axis is summed against the space's incoming features (the input axis
            of a linear or conv weight: it takes the unmerge map), else ``"out"`` (it indexes the
            features themselves: output axes, biases, norm parameters; it takes the merge map).
    """

    tensor: str
    kind: str
    axis: int
    start: int
    stop: int
    role: str = "out"


@dataclass(frozen=True)
class FixedAxis:
    """A parameter or buffer axis range that must not be permuted, and why."""

    tensor: str
    axis: int
    start: int
    stop: int
    reason: str


@dataclass(frozen=True)
class Observation:
    """Where a space's features can be read with a forward hook.

    Attributes:
        module: dotted module path ('' is the root module).
        io: ``"output"`` (forward hook's output) or ``"input"`` (first positional input).
        dim: the tensor axis holding the features (non-negative, for the traced rank).
        start: first feature index along ``dim``.
        stop: one past the last; ``stop - start`` equals the space's width.
        call: which call of the module (0 for the first) when a module runs several times.
        ndim: rank of the observed tensor at trace time.
        shape: its shape at trace time (empty when unknown); when a module returns (or takes)
            several tensors, the one of this shape is read (see :meth:`read`).
    """

    module: str
    io: str
    dim: int
    start: int
    stop: int
    call: int = 0
    ndim: int = 0
    shape: tuple[int, ...] = ()

    def read(self, value) -> torch.Tensor | None:
        """The observed tensor in a hooked module's output (``io="output"``) or positional inputs
        (``io="input"``): the value itself when it is a tensor; in a tuple, list, dict or model
        output, the first tensor of the traced shape (the batch axis may differ), else the first of
        the traced rank whose feature axis has the traced size (a stage that returns ``(feature
        map, class token)`` is read at the element that was traced). None when the value holds no
        tensor, or (the traced shape known) none of the traced rank and feature size: another
        tensor would be read as these features (the collection then says the point did not fire)."""
        if isinstance(value, torch.Tensor):
            return value
        flat = _tensors_in(value)
        if self.shape:
            n = len(self.shape)
            for t in flat:
                if t.dim() == n and tuple(t.shape[1:]) == self.shape[1:]:
                    return t
            for t in flat:
                if t.dim() == n and t.shape[self.dim] == self.shape[self.dim]:
                    return t
            return None
        return flat[0] if flat else None


def _tensors_in(value) -> list[torch.Tensor]:
    """The tensors of a module's output or inputs, in order (tuples, lists, dicts, model outputs)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):  # transformers' ModelOutput is an ordered dict of its set fields
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors_in(v)]
    return []


@dataclass
class Space:
    """An alignment space: parameter axes indexing the same hidden features.

    Attributes:
        name: stable name, derived from module paths (equal for models of one family at any width).
        width: number of features.
        kind: ``"features"``, ``"heads"`` or ``"inner"`` (see the module docstring).
        members: parameter and buffer axis ranges in this space.
        observations: hook points where the features can be read.
        heads: for a space structured in heads, the name of its heads space; else None.
        num_heads: number of heads (None when not structured in heads).
        head_dim: dims per head (None when not structured in heads).
        parent: for ``inner`` spaces, the space whose permutation determines this one's.
        tree: the structure tree (see :mod:`alignment.structure`).
        producers: modules whose weights write these features (output axes of weight matrices),
            in execution order.
        consumers: modules whose weights read these features (input axes), in execution order.
        query_key: ``(start, stop)`` ranges of the features that two tensors computed from the
            inputs are contracted over (attention queries against keys, with one head or many):
            their product, not each side, is what fusion keeps (see
            :func:`alignment.maps.correct_query_key`).
        indexes_heads: a feature space (a layer writes it) that indexes attention heads: the blocks
            of a space whose features two input-dependent tensors are contracted over (Swin V2's
            cosine attention, whose heads its position-bias MLP writes one value each). A width
            factor keeps its count, as it keeps every head count (:meth:`Graph.head_axes`).
    """

    name: str
    width: int
    kind: str = "features"
    members: list[Member] = field(default_factory=list)
    observations: list[Observation] = field(default_factory=list)
    heads: str | None = None
    num_heads: int | None = None
    head_dim: int | None = None
    parent: str | None = None
    tree: Node | tuple = field(default=(), repr=False)
    producers: list[str] = field(default_factory=list, repr=False)
    consumers: list[str] = field(default_factory=list, repr=False)
    query_key: tuple = ()
    indexes_heads: bool = False

    @property
    def alignable(self) -> bool:
        """Whether a solver should choose this space's permutation (False for derived spaces)."""
        return self.kind == "features"

    def __repr__(self) -> str:
        extra = f", heads={self.num_heads}x{self.head_dim}" if self.num_heads else ""
        return f"Space({self.name!r}, width={self.width}, kind={self.kind}{extra}, members={len(self.members)})"


@dataclass
class Graph:
    """Alignment spaces of a model plus the axes that are fixed.

    Attributes:
        spaces: every space, in a deterministic order: that of the parameters naming them, as the
            model registers its parameters and buffers (which need not be the order the forward
            pass uses them; :meth:`forward_order` gives that).
        fixed: parameter/buffer axis ranges that must not be permuted.
        shapes: shape of every parameter and buffer the graph describes.
        notes: remarks from discovery (e.g. axes kept fixed for a reason worth knowing).
        model_class: class name of the discovered model.
        modules: paths of the modules whose parameters or buffers the forward pass uses, in the
            order it first uses them (the topology: a stage can walk the network layer by layer).
        buffers: the tensors of ``shapes`` that are buffers, not parameters (running statistics:
            a parameter budget does not count them).
        aliases: for a module reachable under several names (``self.c = self.b``), each name its
            tensors go by -> the name its observations (hooks) use, its first in
            ``named_modules()``; see :meth:`hook_path`.
    """

    spaces: list[Space]
    fixed: list[FixedAxis]
    shapes: dict[str, tuple[int, ...]]
    notes: list[str] = field(default_factory=list)
    model_class: str = ""
    modules: list[str] = field(default_factory=list)
    buffers: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)

    def head_axes(self) -> set[str]:
        """The feature spaces that index attention heads: those discovery found so
        (:attr:`Space.indexes_heads`), those a tensor connects to a heads space,
        of the heads' count, and so on (talking heads: CaiT's ``proj_l`` and ``proj_w`` mix the heads
        of the logits and of the attention weights, and the values' heads are blocks indexed by
        ``proj_w``). A width factor keeps them, as it keeps every head count, and blocks they index
        change their per-head width as heads do."""
        if getattr(self, "_head_axes", None) is not None:
            return set(self._head_axes)
        heads = {s.name: s.width for s in self.spaces if s.kind == "heads"}
        kept = {s.name for s in self.spaces if s.indexes_heads}
        grew = bool(heads) or bool(kept)
        while grew:
            grew = False
            for t in self.shapes:
                axes = {n for ranges in self.layout(t) for *_, n in ranges if n is not None}
                counts = {heads[n] for n in axes if n in heads} | {self[n].width for n in axes if n in kept}
                for n in axes - kept - set(heads):
                    s = self[n]
                    if s.kind == "features" and isinstance(s.tree, Leaf) and s.width in counts:
                        kept.add(n)
                        grew = True
        self._head_axes = frozenset(kept)
        return kept

    def hook_path(self, path: str) -> str:
        """The name under which the observations of the module ``path`` (a tensor's module, as
        :func:`module_of` gives it) are recorded: itself, unless the module is shared under several
        names (:attr:`aliases`)."""
        return self.aliases.get(path, path)

    def __post_init__(self) -> None:
        self._by_name = {s.name: s for s in self.spaces}
        heads = {s.name for s in self.spaces if s.kind == "heads"}
        rank = {m: i for i, m in enumerate(self.modules)}
        for s in self.spaces:
            if isinstance(s.tree, tuple):
                s.tree = from_tuple(s.tree, heads) if s.tree else Leaf(s.name, s.width)
            if not s.producers and not s.consumers:
                prod = {module_of(m.tensor) for m in s.members
                        if m.role == "out" and len(self.shapes.get(m.tensor, ())) >= 2}
                cons = {module_of(m.tensor) for m in s.members if m.role == "in"}
                s.producers = sorted(prod, key=lambda p: (rank.get(p, len(rank)), p))
                s.consumers = sorted(cons, key=lambda p: (rank.get(p, len(rank)), p))

    def forward_order(self) -> list[Space]:
        """The spaces in the order the forward pass first writes them: by their first producing
        module's place in :attr:`modules` (a space no module produces, e.g. the input of the first
        layer or a learned token, by its first consumer); ties keep :attr:`spaces`' order."""
        rank = {m: i for i, m in enumerate(self.modules)}
        end = len(rank)

        def key(s: Space) -> int:
            for group in (s.producers, s.consumers):
                ranks = [rank[m] for m in group if m in rank]
                if ranks:
                    return min(ranks)
            return end
        return sorted(self.spaces, key=key)

    def layer_spaces(self, module: str) -> tuple[list[str], list[str]]:
        """The spaces a module's weights read (input axes) and write (output axes)."""
        reads = [s.name for s in self.spaces if module in s.consumers]
        writes = [s.name for s in self.spaces if module in s.producers]
        return reads, writes

    # -- lookup -----------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Space:
        try:
            return self._by_name[name]
        except KeyError:
            raise SpaceMismatchError(
                f"no space named {name!r} in this graph of {self.model_class}; "
                f"known spaces: {', '.join(list(self._by_name)[:8])}..."
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Space]:
        return iter(self.spaces)

    def __len__(self) -> int:
        return len(self.spaces)

    @property
    def alignable_spaces(self) -> list[Space]:
        """Spaces whose permutation a solver chooses (excludes heads and inner spaces)."""
        return [s for s in self.spaces if s.alignable]

    def layout(self, tensor: str) -> list[list[tuple[int, int, str | None]]]:
        """For each axis of ``tensor``, its ranges as ``(start, stop, space name or None if fixed)``."""
        if tensor not in self.shapes:
            raise SpaceMismatchError(f"tensor {tensor!r} is not described by this graph of {self.model_class}")
        return self._layouts()[tensor]

    def _layouts(self) -> dict[str, list[list[tuple[int, int, str | None]]]]:
        if getattr(self, "_layout_cache", None) is None:
            lay: dict[str, list[list[tuple[int, int, str | None]]]] = {
                t: [[] for _ in shape] for t, shape in self.shapes.items()
            }
            for s in self.spaces:
                for m in s.members:
                    lay[m.tensor][m.axis].append((m.start, m.stop, s.name))
            for f in self.fixed:
                lay[f.tensor][f.axis].append((f.start, f.stop, None))
            for t, axes in lay.items():
                for i, ranges in enumerate(axes):
                    ranges.sort()
                    # fill any gap (cannot happen for a complete graph) with fixed ranges
                    filled, pos = [], 0
                    for a, b, n in ranges:
                        if a > pos:
                            filled.append((pos, a, None))
                        filled.append((a, b, n))
                        pos = max(pos, b)
                    if pos < self.shapes[t][i]:
                        filled.append((pos, self.shapes[t][i], None))
                    axes[i] = filled
            self._layout_cache = lay
        return self._layout_cache

    # -- permutations -----------------------------------------------------------------------
    def identity_permutations(self) -> dict[str, torch.Tensor]:
        """The identity permutation of every space."""
        return {s.name: torch.arange(s.width) for s in self.spaces}

    def random_permutations(self, seed: int = 0) -> dict[str, torch.Tensor]:
        """A random valid permutation for every space.

        Heads move as blocks (one head permutation shared by the spaces of an attention block), dims
        move within heads, concatenation segments are permuted separately, and derived spaces get the
        permutation their parent implies (the structure walk with a random leaf solver). Convention:
        the permuted model's feature ``i`` is the original's feature ``perm[i]``.

        Args:
            seed: seed of the random generator (the same seed gives the same permutations).

        Returns:
            A dict from space name to a ``LongTensor`` permutation of ``range(width)``.
        """
        from .leaves import random_leaf
        from .structure import Walk

        walk = Walk([self], self, random_leaf, seed=seed, random_heads=True)
        walk.solve_all([s.name for s in self.spaces])
        return walk.permutations(0)

    def validate_permutations(self, perms: dict[str, torch.Tensor]) -> None:
        """Check that ``perms`` holds a valid permutation for every space.

        Raises:
            PermutationError: naming the space whose permutation is missing, of the wrong size, not
                a bijection, or inconsistent with its head structure.
        """
        for s in self.spaces:
            if s.name not in perms:
                raise PermutationError(f"no permutation given for space {s.name!r} (width {s.width})")
            p = torch.as_tensor(perms[s.name])
            if p.shape != (s.width,):
                raise PermutationError(
                    f"permutation for space {s.name!r} has shape {tuple(p.shape)}, expected ({s.width},)"
                )
            if not torch.equal(torch.sort(p).values, torch.arange(s.width, device=p.device)):
                raise PermutationError(f"permutation for space {s.name!r} is not a bijection of range({s.width})")
            if s.heads is not None:
                d = s.head_dim
                blocks = p.view(-1, d) // d
                if not bool((blocks == blocks[:, :1]).all()):
                    raise PermutationError(f"permutation for space {s.name!r} splits heads of {d} dims")
                hp = torch.as_tensor(perms[s.heads])
                if not torch.equal(blocks[:, 0].cpu(), hp.cpu()):
                    raise PermutationError(
                        f"permutation for space {s.name!r} moves heads differently from its heads space {s.heads!r}"
                    )

    def summary(self) -> str:
        """A human-readable table of the spaces."""
        lines = [f"{self.model_class}: {len(self.spaces)} spaces"]
        for s in self.spaces:
            extra = f" heads={s.num_heads}x{s.head_dim}" if s.num_heads else ""
            lines.append(f"  {s.name:50s} {s.kind:8s} width={s.width:<5d}{extra} members={len(s.members)}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Graph({self.model_class}, spaces={len(self.spaces)}, fixed={len(self.fixed)})"


def ranked_members(members):
    """``(rank, member)`` pairs: the rank counts earlier members on the same (tensor, axis), so
    members pair across models of one family by ``(tensor, axis, rank)``."""
    seen: dict[tuple, int] = {}
    for m in members:
        k = (m.tensor, m.axis)
        r = seen.get(k, 0)
        seen[k] = r + 1
        yield r, m


def module_of(tensor: str) -> str:
    """The path of the module that owns a tensor (``"layer1.0.conv1.weight"`` -> ``"layer1.0.conv1"``),
    through parametrisations: ``"c1.parametrizations.weight.original0"`` (weight normalisation) is
    ``c1``'s, the module whose forward reads the weight."""
    path, _, leaf = tensor.rpartition(".")
    parts = path.split(".")
    if leaf.startswith("original") and len(parts) >= 2 and parts[-2] == "parametrizations":
        return ".".join(parts[:-2])
    return path


def in_parametrization(path: str) -> bool:
    """Whether a module path lies inside a parametrisation (``"c1.parametrizations.weight"``, its
    ``.0``): such modules compute a weight whenever it is read, they are not calls of the data flow."""
    return "parametrizations" in path.split(".")
