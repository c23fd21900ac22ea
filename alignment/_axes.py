"""Union-find of tensor axes with structure, the core data of discovery.

Every axis of every tensor in the exported graph belongs to a *class*: a set of axes that index the
same hidden features and so must be permuted (or mapped) together. A class may carry structure:

* ``Struct(outer=None, parts)``: the class is the concatenation of ``parts`` (from ``cat``, ``split``
  and friends, or a reshape whose outer factor is positional).
* ``Struct(outer=O, parts)``: the class factors as ``O x parts`` (a reshape into heads): flat index
  ``h * d + j`` is inner index ``j`` of part ``h``. Each head has its own inner class, so inner
  permutations may differ per head; permuting ``O`` moves whole blocks.

A tensor's axis is a :class:`Dim`: usually one class, but an axis created by splitting a feature axis
(the head-dim axis after ``view(B, N, H, d)``) depends on the index of the outer axis and holds one
class per outer index.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from .errors import DiscoveryError


@dataclass
class Struct:
    """Structure of a class: concatenation (``outer is None``) or factorisation by ``outer``."""

    outer: int | None
    parts: list[int]


@dataclass
class Classes:
    """Union-find over axis classes with sizes, fixed flags and structure."""

    parent: list[int] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    fixed: list[str | None] = field(default_factory=list)
    struct: dict[int, Struct] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def new(self, size: int, fixed: str | None = None) -> int:
        """Create a class of ``size`` indices (size-1 classes are always fixed)."""
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        if size == 1 and fixed is None:
            fixed = "size-1"
        self.fixed.append(fixed)
        return len(self.parent) - 1

    def find(self, c: int) -> int:
        """Root of ``c``'s class (with path halving)."""
        parent = self.parent
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    def is_fixed(self, c: int) -> bool:
        """Whether ``c``'s class may not be permuted."""
        return self.fixed[self.find(c)] is not None

    def fix(self, c: int, reason: str) -> None:
        """Mark ``c``'s class as not alignable (tied to inputs, outputs, positions...)."""
        r = self.find(c)
        if self.fixed[r] is None:
            self.fixed[r] = reason

    def get_struct(self, c: int) -> Struct | None:
        """Structure of ``c``'s class, or None."""
        return self.struct.get(self.find(c))

    def union(self, a: int, b: int) -> int:
        """Merge two classes of equal size, merging their structures too."""
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if self.size[a] != self.size[b]:
            raise DiscoveryError(
                f"internal error: unifying axes of different sizes {self.size[a]} and "
                f"{self.size[b]}; please report this with the model that triggered it"
            )
        if b < a:
            a, b = b, a
        self.parent[b] = a
        if self.fixed[a] is None:
            self.fixed[a] = self.fixed[b]
        sa, sb = self.struct.pop(a, None), self.struct.pop(b, None)
        if sa is not None and sb is not None:
            self.struct[a] = sa
            self._merge_structs(a, sa, sb)
        elif sa is not None or sb is not None:
            self.struct[a] = sa if sa is not None else sb
        return self.find(a)

    def _merge_structs(self, root: int, sa: Struct, sb: Struct) -> None:
        # an empty segment (a concatenation with zero register tokens) indexes nothing: a boundary
        # it put at an end of the axis could never be cut, and the refinement below would not end
        if sa.outer is None:
            sa = Struct(None, self._nonempty(sa.parts))
        if sb.outer is None:
            sb = Struct(None, self._nonempty(sb.parts))
        sizes_a = [self.size[self.find(p)] for p in sa.parts]
        sizes_b = [self.size[self.find(p)] for p in sb.parts]
        if sizes_a == sizes_b:
            if sa.outer is not None and sb.outer is not None:
                self.union(sa.outer, sb.outer)
            elif sa.outer is not None or sb.outer is not None:
                # a positional concatenation met a factorisation: blocks cannot move
                self.fix(sa.outer if sa.outer is not None else sb.outer, "concatenation")
            for p, q in zip(sa.parts, sb.parts):
                self.union(p, q)
            return
        # different part boundaries: refine both to the common boundaries
        cuts = sorted(set(itertools.accumulate(sizes_a[:-1])) | set(itertools.accumulate(sizes_b[:-1])))
        while True:
            pa = self._nonempty(self._refine(sa, cuts))
            pb = self._nonempty(self._refine(sb, cuts))
            # a class met twice in one concatenation (the flattened rows of a relative-position
            # skew) is cut at every offset any of its places needs: the pieces may come out finer
            # than asked; refine both again until their boundaries agree
            bounds_a = list(itertools.accumulate(self.size[self.find(p)] for p in pa))
            bounds_b = list(itertools.accumulate(self.size[self.find(q)] for q in pb))
            if bounds_a == bounds_b:
                break
            cuts = sorted(set(bounds_a[:-1]) | set(bounds_b[:-1]))
        for p, q in zip(pa, pb):
            self.union(p, q)
        self.struct[self.find(root)] = Struct(None, pa)

    def _nonempty(self, parts: list[int]) -> list[int]:
        """``parts`` without the empty ones (a concatenation segment of size 0 indexes nothing)."""
        return [p for p in parts if self.size[self.find(p)] > 0]

    def _refine(self, st: Struct, cuts: list[int]) -> list[int]:
        if st.outer is not None:
            self.fix(st.outer, "heads cut by a concatenation")
        pieces: list[int] = []
        start = 0
        for p in st.parts:
            n = self.size[self.find(p)]
            inner = [c - start for c in cuts if start < c < start + n]
            pieces.extend(self.cut(p, inner))
            start += n
        return pieces

    def cut(self, c: int, offsets: list[int]) -> list[int]:
        """Pieces of class ``c`` between the given internal offsets (refining its structure)."""
        if not offsets:
            return [c]
        r = self.find(c)
        n = self.size[r]
        bounds = [0, *offsets, n]
        if self.fixed[r] is not None:
            return [self.new(e - s, self.fixed[r]) for s, e in zip(bounds, bounds[1:])]
        st = self.struct.get(r)
        if st is None:
            pieces = [self.new(e - s) for s, e in zip(bounds, bounds[1:])]
            self.struct[r] = Struct(None, pieces)
            return pieces
        return self._refine(st, offsets)

    def range_class(self, c: int, start: int, stop: int) -> int:
        """A class standing for indices ``[start, stop)`` of ``c`` (a concatenation if needed)."""
        r = self.find(c)
        n = self.size[r]
        if start == 0 and stop == n:
            return r
        if stop <= start:  # an empty range (a split with a segment of size 0) cuts nothing
            return self.new(0)
        offsets = [o for o in (start, stop) if 0 < o < n]
        pieces = self.cut(r, offsets)
        # locate the pieces covering [start, stop)
        chosen, pos = [], 0
        for p in pieces:
            m = self.size[self.find(p)]
            if m > 0 and pos >= start and pos + m <= stop:
                chosen.append(p)
            pos += m
        if len(chosen) == 1:
            return chosen[0]
        out = self.new(stop - start)
        self.struct[out] = Struct(None, chosen)
        return out

    def concat(self, parts: list[int]) -> int:
        """A new class that is the concatenation of ``parts`` (empty parts, such as zero register
        tokens, are left out: they index nothing)."""
        parts = self._nonempty(parts) or list(parts[:1])
        if len(parts) == 1:
            return parts[0]
        out = self.new(sum(self.size[self.find(p)] for p in parts))
        if all(self.is_fixed(p) for p in parts):
            self.fix(out, "concatenation of fixed axes")
        self.struct[out] = Struct(None, list(parts))
        return out

    def factor(self, c: int, outer_size: int) -> tuple[int, list[int]]:
        """Split class ``c`` into ``outer_size`` blocks: returns (outer class, per-block classes)."""
        r = self.find(c)
        n = self.size[r]
        inner = n // outer_size
        if outer_size == 1:
            return self.new(1), [r]
        if inner == 1:
            return r, [self.new(1) for _ in range(outer_size)]
        if self.fixed[r] is not None:
            return self.new(outer_size, self.fixed[r]), [self.new(inner, self.fixed[r]) for _ in range(outer_size)]
        st = self.struct.get(r)
        if st is None:
            outer = self.new(outer_size)
            parts = [self.new(inner) for _ in range(outer_size)]
            self.struct[r] = Struct(outer, parts)
            return outer, parts
        if st.outer is not None and self.size[self.find(st.outer)] == outer_size:
            return st.outer, list(st.parts)
        if st.outer is None:
            # a concatenation reshaped into equal blocks: blocks are positional
            pieces = self.cut(r, [inner * i for i in range(1, outer_size)])
            blocks, pos, cur = [], 0, []
            for p in pieces:
                cur.append(p)
                pos += self.size[self.find(p)]
                if pos % inner == 0:
                    blocks.append(self.concat(cur))
                    cur = []
            return self.new(outer_size, "positional blocks"), blocks
        o = self.find(st.outer)
        if self.size[o] % outer_size == 0 and len(st.parts) == self.size[o]:
            # blocks of whole outer units (an im2col's channels x taps viewed as heads x channels x
            # taps, as VOLO's outlook attention does): the outer units split into the blocks,
            # each block keeps its units' inner parts
            per = self.size[o] // outer_size
            heads, units = self.factor(o, outer_size)
            blocks = []
            for i in range(outer_size):
                b = self.new(inner)
                self.struct[b] = Struct(units[i], list(st.parts[i * per:(i + 1) * per]))
                blocks.append(b)
            return heads, blocks
        if outer_size % self.size[o] == 0 and len(st.parts) == self.size[o]:
            # the inverse (col2im of heads x channels x taps back to channels x taps): blocks whose
            # parts are all blocks of ``q`` units; the units are the heads' units, in order
            q = outer_size // self.size[o]
            subs = [self.struct.get(self.find(p)) for p in st.parts]
            if all(b is not None and b.outer is not None and self.size[self.find(b.outer)] == q and len(b.parts) == q
                   for b in subs):
                units = self.new(outer_size)
                self.struct[units] = Struct(o, [b.outer for b in subs])
                return units, [p for b in subs for p in b.parts]
        # heads of another size: refuse to guess, keep the axis fixed (sound, noted)
        self.notes.append(f"an axis of {n} features was reshaped into blocks of incompatible sizes; kept fixed")
        self.fix(r, "incompatible reshape")
        return self.new(outer_size, "incompatible reshape"), [self.new(inner, "incompatible reshape") for _ in range(outer_size)]


class Dim:
    """One axis of a traced tensor: a class, or one class per index of the axes it depends on."""

    __slots__ = ("size", "deps", "table")

    def __init__(self, size: int, cls: int | None = None, deps: tuple["Dim", ...] = (), table=None):
        self.size = size
        self.deps = deps
        self.table = table if table is not None else {(): cls}

    @property
    def plain(self) -> bool:
        """Whether the axis is a single class."""
        return not self.deps

    @property
    def cls(self) -> int:
        """The class of a plain axis."""
        return self.table[()]

    def classes(self) -> list[int]:
        """Every class the axis may hold."""
        return list(self.table.values())

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Dim({self.size}, deps={len(self.deps)}, n={len(self.table)})"


class AxisAlgebra:
    """Operations on tensors' axes (lists of :class:`Dim`) on top of :class:`Classes`."""

    def __init__(self) -> None:
        self.C = Classes()

    # -- creation ---------------------------------------------------------------------------
    def fresh(self, size: int, fixed: str | None = None) -> Dim:
        """A new axis with a new class."""
        return Dim(size, self.C.new(size, fixed))

    # -- basic operations -------------------------------------------------------------------
    def collapse(self, d: Dim) -> Dim:
        """Force one class for the whole axis (all per-index classes unified)."""
        if d.plain:
            return d
        vals = d.classes()
        first = vals[0]
        for v in vals[1:]:
            self.C.union(first, v)
        return Dim(d.size, self.C.find(first))

    def sanitize(self, dims: list[Dim]) -> list[Dim]:
        """Collapse axes whose dependencies are no longer axes of the same tensor."""
        out = list(dims)
        changed = True
        while changed:
            changed = False
            present = {id(d) for d in out}
            for i, d in enumerate(out):
                if not d.plain and not all(id(x) in present for x in d.deps):
                    out[i] = self.collapse(d)
                    changed = True
        return out

    def unify(self, xa: list[Dim], ia: int, xb: list[Dim], ib: int, posmap: dict[int, int] | None = None) -> None:
        """Unify axis ``ia`` of tensor ``xa`` with axis ``ib`` of tensor ``xb``.

        ``posmap`` maps axis positions of ``xa`` to positions of ``xb`` so that per-index classes of
        dependent axes can be matched index by index; without a match, both collapse to one class.
        """
        da, db = xa[ia], xb[ib]
        if da.size != db.size or da.size == 1:
            return
        if da.plain and db.plain:
            self.C.union(da.cls, db.cls)
            return
        if not da.plain and not db.plain and posmap is not None and len(da.deps) == len(db.deps):
            ok = True
            for x, y in zip(da.deps, db.deps):
                pa = _index_of(xa, x)
                if pa is None or posmap.get(pa) is None or xb[posmap[pa]] is not y:
                    ok = False
                    break
            if ok:
                for key, c in da.table.items():
                    self.C.union(c, db.table[key])
                return
        # no index-by-index correspondence: one class for both (sound, more constrained)
        ca, cb = self.collapse(da), self.collapse(db)
        self.C.union(ca.cls, cb.cls)

    def fix_dim(self, d: Dim, reason: str) -> None:
        """Mark every class of an axis as fixed."""
        for c in d.classes():
            self.C.fix(c, reason)

    # -- structural rewrites ----------------------------------------------------------------
    def project(self, dims: list[Dim], keep: list[int | Dim], select: dict[int, int] | None = None) -> list[Dim]:
        """Build an output tensor's axes from input axes.

        Args:
            dims: the input tensor's axes.
            keep: for every output axis, the input position it carries, or a new :class:`Dim`.
            select: input positions indexed by a single index (dependents take that index's class);
                input positions neither kept nor selected are reduced (dependents collapse over them).
        """
        select = select or {}
        kept = {k for k in keep if isinstance(k, int)}
        new: dict[int, Dim] = {}

        def rebuilt(pos: int) -> Dim:
            if pos in new:
                return new[pos]
            d = dims[pos]
            if d.plain:
                new[pos] = d
                return d
            dep_pos = [_index_of(dims, x) for x in d.deps]
            if any(p is None for p in dep_pos) or all(p in kept for p in dep_pos) and all(
                rebuilt(p) is dims[p] for p in dep_pos
            ):
                if any(p is None for p in dep_pos):
                    new[pos] = self.collapse(d)
                else:
                    new[pos] = d
                return new[pos]
            # group table entries by the remaining (kept) dependencies
            rem = [i for i, p in enumerate(dep_pos) if p in kept]
            groups: dict[tuple, list[int]] = {}
            for key, c in d.table.items():
                if any(dep_pos[i] in select and key[i] != select[dep_pos[i]] for i in range(len(key))):
                    continue
                groups.setdefault(tuple(key[i] for i in rem), []).append(c)
            table = {}
            for key, cs in groups.items():
                for c in cs[1:]:
                    self.C.union(cs[0], c)
                table[key] = self.C.find(cs[0])
            nd = Dim(d.size, deps=tuple(rebuilt(dep_pos[i]) for i in rem), table=table)
            new[pos] = nd if rem else Dim(d.size, table[()])
            return new[pos]

        out = [rebuilt(k) if isinstance(k, int) else k for k in keep]
        return self.sanitize(out)

    def merge(self, dims: list[Dim], positions: list[int]) -> Dim:
        """The axis made by flattening ``positions`` (consecutive, outer first) of ``dims``."""
        cur = dims[positions[-1]]
        for pos in reversed(positions[:-1]):
            cur = self._merge_two(dims, dims[pos], cur)
        return cur

    def _merge_two(self, dims: list[Dim], a: Dim, b: Dim) -> Dim:
        C = self.C
        size = a.size * b.size
        if all(C.is_fixed(c) for c in a.classes() + b.classes()):
            return self.fresh(size, "merged fixed axes")
        deps: list[Dim] = list(a.deps)
        for x in b.deps:
            if x is not a and not any(x is y for y in deps):
                deps.append(x)
        if any(_index_of(dims, x) is None for x in deps):
            a, b = self.collapse(a), self.collapse(b)
            deps = []
        table = {}
        ranges = [range(x.size) for x in deps]
        for key in itertools.product(*ranges):
            env = {id(x): k for x, k in zip(deps, key)}
            ca = a.table[tuple(env[id(x)] for x in a.deps)]
            parts = []
            for i in range(a.size):
                env_b = dict(env)
                env_b[id(a)] = i
                parts.append(b.table[tuple(env_b[id(x)] for x in b.deps)])
            flat = C.new(size)
            if all(C.is_fixed(p) for p in parts) and C.is_fixed(ca):
                C.fix(flat, "merged fixed axes")
            elif C.size[C.find(ca)] == 1:
                flat = parts[0]
            else:
                C.struct[flat] = Struct(ca, parts)
            table[key] = flat
        return Dim(size, deps=tuple(deps), table=table)

    def split(self, d: Dim, sizes: list[int]) -> list[Dim]:
        """The axes made by viewing axis ``d`` as ``sizes`` (outer first)."""
        if len(sizes) == 1:
            return [d]
        if not d.plain:
            d = self.collapse(d)
        c = d.cls
        if self.C.is_fixed(c):
            reason = self.C.fixed[self.C.find(c)]
            return [self.fresh(s, reason) for s in sizes]
        outer, parts = self.C.factor(c, sizes[0])
        outer_dim = Dim(sizes[0], outer)
        subs = [self.split(Dim(d.size // sizes[0], p), sizes[1:]) for p in parts]
        out = [outer_dim]
        for k in range(1, len(sizes)):
            table = {}
            for i, sub in enumerate(subs):
                sd = sub[k - 1]
                # sub-axis k-1 depends on (a subset of) sub-axes 0..k-2: expand to all of them
                dep_pos = [_index_of(sub, x) for x in sd.deps]
                for key in itertools.product(*[range(s) for s in sizes[1:k]]):
                    table[(i, *key)] = sd.table[tuple(key[p] for p in dep_pos)]
            vals = set(self.C.find(v) for v in table.values())
            if len(vals) == 1:
                out.append(Dim(sizes[k], vals.pop()))
            else:
                out.append(Dim(sizes[k], deps=tuple(out[:k]), table=table))
        return self.sanitize(out)

    def regroup(self, dims: list[Dim], positions: list[int], sizes: list[int]) -> list[Dim] | None:
        """The axes ``sizes`` (outer first) of a view of the consecutive axes ``positions`` of
        ``dims``, through their common refinement: each input axis is split where an output axis
        starts and the pieces are merged into the output axes. A batch axis merged with attention
        heads (``(B, E) -> (B * H, E / H)``, as ``nn.MultiheadAttention`` does) thus keeps the heads
        and per-head features. None when the boundaries do not nest (no refinement exists)."""
        ins = [dims[p].size for p in positions]
        bounds = sorted(_boundaries(ins) | _boundaries(sizes))
        if any(b % a for a, b in zip(bounds, bounds[1:])):
            return None
        fine: list[Dim] = []
        hi = math.prod(ins)
        for pos, n in zip(positions, ins):
            lo = hi // n
            cuts = [b for b in bounds if lo <= b <= hi]
            pieces = [cuts[i + 1] // cuts[i] for i in reversed(range(len(cuts) - 1))]
            fine += self.split(dims[pos], pieces) if len(pieces) > 1 else [dims[pos]]
            hi = lo
        start = positions[0]
        ctx = dims[:start] + fine + dims[positions[-1] + 1:]  # merged dependencies resolve in the whole tensor
        out: list[Dim] = []
        i = 0
        for size in sizes:
            j, acc = i, 1
            while acc < size:
                acc *= fine[j].size
                j += 1
            out.append(fine[i] if j - i == 1 else self.merge(ctx, list(range(start + i, start + j))))
            i = j
        gone = [x for x in fine if _index_of(out, x) is None]  # pieces merged into a wider axis
        return [self.rekey(d, fine, out) if any(_index_of(gone, x) is not None for x in d.deps) else d for d in out]

    def rekey(self, d: Dim, old: list[Dim], new: list[Dim], limit: int = 1 << 16) -> Dim:
        """``d`` with its dependencies on the axes ``old`` re-expressed on the axes ``new`` that
        index the same flat positions (row-major), e.g. after a view split or merged them. A table
        over more than ``limit`` index combinations is collapsed instead (sound, more constrained)."""
        if d.plain or not any(_index_of(old, x) is not None for x in d.deps):
            return d
        if _index_of(new, d) is not None and _index_of(old, d) is None:
            # an axis the view made from the old ones (a merge): its index is not independent of
            # theirs; its own dependencies were resolved when it was made (or it collapses)
            return d
        keep = [x for x in d.deps if _index_of(old, x) is None]
        axes = [x for x in new if x is not d]  # d's own axis (unchanged by the view) is no dependency
        if math.prod(x.size for x in keep + axes) > limit:
            return self.collapse(d)
        table = {}
        for kk in itertools.product(*[range(x.size) for x in keep]):
            env = {id(x): k for x, k in zip(keep, kk)}
            for nk in itertools.product(*[range(x.size) for x in axes]):
                at = {id(x): k for x, k in zip(axes, nk)}
                flat = 0
                for x in new:
                    flat = flat * x.size + at.get(id(x), 0)
                for x in reversed(old):
                    env[id(x)] = flat % x.size
                    flat //= x.size
                table[kk + nk] = d.table[tuple(env[id(x)] for x in d.deps)]
        if len({self.C.find(c) for c in table.values()}) == 1:
            return Dim(d.size, self.C.find(next(iter(table.values()))))
        return Dim(d.size, deps=tuple(keep) + tuple(axes), table=table)


def _boundaries(sizes: list[int]) -> set[int]:
    """Products of the innermost axes of a row-major shape (1 and the total included)."""
    out, p = {1}, 1
    for v in reversed(sizes):
        p *= v
        out.add(p)
    return out


def _index_of(dims: list[Dim], x: Dim) -> int | None:
    for i, d in enumerate(dims):
        if d is x:
            return i
    return None
