"""Streamed least squares for one layer: Gram sums and the ridge solve (the maths of refinement).

A layer with weights ``W`` (per group ``g``: ``o x d``, plus an optional bias) is refitted so that its
outputs on inputs ``X`` reproduce targets ``Y``. Rows are samples (convolution patches, tokens);
the sums ``X^T X``, ``X^T Y`` and ``sum Y^2`` are all that is kept, so memory is one layer's Grams,
whatever the amount of data. Each batch's products are computed in float32 (or float64) and summed
in float64, like the activation statistics.

The solve is a ridge toward the current weights ``W*``::

    W = argmin ||X W^T - Y||^2 + lam ||W - W*||^2,   lam = ridge * trace(X^T X) / d

by Cholesky; when a Gram is not positive definite even with the ridge, the group is solved in the
least-squares sense by the symmetric pseudo-inverse (reported by the caller).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignment.statistics import add_gram, add_promoted_

__all__ = ["LayerGram", "RidgeSolution", "ridge_solve", "regression_loss", "output_moments"]


class LayerGram:
    """Running sums of one layer's regression, per group.

    Args:
        groups: independent groups (1 for a dense layer, the channel count for a depthwise conv or
            a per-feature affine).
        inputs: inputs per group ``d`` (without the bias column).
        outputs: outputs per group ``o``.
        bias: whether a constant column is appended to the inputs (the layer has a bias).
        device: where the sums live.
        precision: ``"float32"``: per-batch products in float32, summed in float64; ``"float64"``:
            everything in float64.
    """

    def __init__(self, groups: int, inputs: int, outputs: int, bias: bool, device: torch.device | str,
                 precision: str = "float32"):
        if precision not in ("float32", "float64"):
            raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")
        self.groups, self.inputs, self.outputs, self.bias = groups, inputs, outputs, bias
        self.precision = precision
        d = inputs + int(bias)
        self.xx = torch.zeros(groups, d, d, dtype=torch.float64, device=device)
        self.xy = torch.zeros(groups, d, outputs, dtype=torch.float64, device=device)
        self.yy = torch.zeros(groups, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor, y: torch.Tensor, block: tuple[tuple[int, int, int], slice, slice] | None = None) -> None:
        """Add a batch: ``x`` of shape ``(groups, rows, inputs)``, ``y`` of shape ``(groups, rows, outputs)``.

        With ``block = ((nh, nw, c), rows, cols)`` the inputs are laid out as ``nh x nw x c`` (a
        convolution's kernel taps and channels) and ``x`` holds only the taps ``[rows, cols]`` (every
        other input is zero on these rows): its products go to that block of the sums.
        """
        sel = self.inputs
        if block is not None:
            (nh, nw, c), sh, sw = block
            if nh * nw * c != self.inputs:
                raise ValueError(f"block layout {nh}x{nw}x{c} does not hold {self.inputs} inputs")
            bh, bw = len(range(nh)[sh]), len(range(nw)[sw])
            sel = bh * bw * c
        if x.dim() != 3 or x.shape[0] != self.groups or x.shape[2] != sel:
            raise ValueError(f"inputs of shape {tuple(x.shape)}, expected ({self.groups}, rows, {sel})")
        if y.shape != (self.groups, x.shape[1], self.outputs):
            raise ValueError(f"targets of shape {tuple(y.shape)}, expected ({self.groups}, {x.shape[1]}, {self.outputs})")
        dt = torch.float64 if self.precision == "float64" else torch.float32
        x = x.to(device=self.xx.device, dtype=dt)
        y = y.to(device=self.xx.device, dtype=dt)
        g, d, o = self.groups, self.inputs, self.outputs
        xx, xy = self.xx[:, :d, :d], self.xy[:, :d]
        if block is None:
            add_gram(xx, x)
            add_promoted_(xy, torch.bmm(x.transpose(1, 2), y))
        else:
            if sel < 256:
                sub = torch.bmm(x.transpose(1, 2), x)
            else:
                sub = torch.zeros(g, sel, sel, dtype=dt, device=x.device)
                add_gram(sub, x)
            add_promoted_(xx.view(g, nh, nw, c, nh, nw, c)[:, sh, sw, :, sh, sw], sub.view(g, bh, bw, c, bh, bw, c))
            add_promoted_(xy.view(g, nh, nw, c, o)[:, sh, sw], torch.bmm(x.transpose(1, 2), y).view(g, bh, bw, c, o))
        if self.bias:
            # the constant column's products are sums: no need to append it to the rows
            sx = x.sum(1)  # (a reduction with a float64 accumulator is far slower on CPU)
            for col in (self.xx[:, :d, d], self.xx[:, d, :d]):
                if block is None:
                    col += sx
                else:
                    col.view(g, nh, nw, c)[:, sh, sw] += sx.view(g, bh, bw, c)
            self.xx[:, d, d] += x.shape[1]
            self.xy[:, d] += y.sum(1).double()
        flat = y.reshape(self.groups, -1)
        self.yy += torch.linalg.vecdot(flat, flat, dim=1).double()  # sum of squares, no temporary
        self.rows += int(x.shape[1])

    def merge(self, other: "LayerGram") -> "LayerGram":
        """Add another shard's sums (same layer) into this one; returns self."""
        if (other.groups, other.inputs, other.outputs, other.bias) != (self.groups, self.inputs, self.outputs, self.bias):
            raise ValueError("cannot merge Grams of different layers")
        self.xx += other.xx.to(self.xx.device)
        self.xy += other.xy.to(self.xy.device)
        self.yy += other.yy.to(self.yy.device)
        self.rows += other.rows
        return self

    def all_reduce(self) -> "LayerGram":
        """Sum the sums over every process of ``torch.distributed`` (no-op when not initialised)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            for t in (self.xx, self.xy, self.yy):
                dist.all_reduce(t)
            n = torch.tensor([self.rows], dtype=torch.float64, device=self.xx.device)
            dist.all_reduce(n)
            self.rows = int(n.item())
        return self


@dataclass
class RidgeSolution:
    """The refitted weights of one layer.

    Attributes:
        weight: ``(groups, outputs, inputs)`` float64.
        bias: ``(groups, outputs)`` float64, or None when the layer has no bias column.
        loss_before: ``||X W*^T - Y||^2 / ||Y||^2`` (relative regression loss of the current weights).
        loss_after: the same for the solution.
        fallback_groups: groups solved by the pseudo-inverse because Cholesky failed.
        xxw: ``X^T X [W b]^T`` of the solution, ``(groups, inputs[+1], outputs)`` (from the normal
            equations, no product), for moments of the refitted layer's outputs.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    loss_before: float
    loss_after: float
    fallback_groups: int = 0
    xxw: torch.Tensor | None = None


def regression_loss(gram: LayerGram, w: torch.Tensor) -> torch.Tensor:
    """``sum ||X w^T - Y||^2`` per group, from the sums; ``w`` is ``(groups, outputs, inputs[+1])``."""
    w = w.to(torch.float64)
    wt = w.transpose(1, 2)
    quad = (torch.bmm(gram.xx, wt) * wt).sum((1, 2))
    cross = (gram.xy * wt).sum((1, 2))
    return quad - 2 * cross + gram.yy


def ridge_solve(gram: LayerGram, weight: torch.Tensor, bias: torch.Tensor | None = None,
                ridge: float = 1e-3) -> RidgeSolution:
    """Solve the layer's ridge regression toward the current weights.

    Args:
        gram: the layer's sums.
        weight: current weights ``W*``, ``(groups, outputs, inputs)``.
        bias: current bias ``(groups, outputs)`` (needed when the Gram has a bias column).
        ridge: ``lam`` relative to the mean diagonal of ``X^T X`` (0: plain least squares).

    Returns:
        A :class:`RidgeSolution`.
    """
    dev = gram.xx.device
    w0 = weight.to(device=dev, dtype=torch.float64)
    if gram.bias:
        b0 = (bias if bias is not None else torch.zeros(w0.shape[:2])).to(device=dev, dtype=torch.float64)
        w0 = torch.cat([w0, b0[:, :, None]], dim=2)
    d = gram.inputs
    scale = torch.diagonal(gram.xx[:, :d, :d], dim1=1, dim2=2).mean(1).clamp_min(1e-30)  # per group
    lam = ridge * scale
    A = gram.xx.clone()
    A.diagonal(dim1=1, dim2=2).add_(lam[:, None])
    B = gram.xy + lam[:, None, None] * w0.transpose(1, 2)
    L, info = torch.linalg.cholesky_ex(A)
    sol = torch.cholesky_solve(B, L)
    bad = (info != 0) | ~torch.isfinite(sol).all(dim=(1, 2))
    n_bad = int(bad.sum())
    if n_bad:
        # minimum-norm least squares through the symmetric pseudo-inverse (runs on any device)
        sol[bad] = torch.linalg.pinv(A[bad], hermitian=True) @ B[bad]
    w = sol.transpose(1, 2)
    yy = gram.yy.sum().clamp_min(1e-30)
    before = max(0.0, float(regression_loss(gram, w0).sum() / yy))
    # the solution satisfies (XtX + lam) W^T = XtY + lam W*^T, so XtX W^T needs no product (except for
    # groups solved by the pseudo-inverse, which satisfy it only on the Gram's range)
    gw = gram.xy + lam[:, None, None] * (w0 - w).transpose(1, 2)
    if n_bad:
        gw[bad] = gram.xx[bad] @ sol[bad]
    # (expanded from the Gram, a loss near 0 can come out a rounding error below it: not a gain)
    after = max(0.0, float(((gw * sol).sum() - 2 * (gram.xy * sol).sum() + gram.yy.sum()) / yy))
    if gram.bias:
        return RidgeSolution(w[:, :, :d].contiguous(), w[:, :, d].contiguous(), before, after, n_bad, gw)
    return RidgeSolution(w.contiguous(), None, before, after, n_bad, gw)


def output_moments(gram: LayerGram, sol: RidgeSolution) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance ``(groups, outputs)`` of the refitted layer's outputs without bias,
    ``z = W x``, over the Gram's rows (needs the bias column); from the sums and the solution's
    ``X^T X [W b]^T``, with no product of Gram size."""
    if not gram.bias or sol.bias is None or sol.xxw is None:
        raise ValueError("output moments need the constant column (bias=True) and a ridge_solve solution")
    d, n = gram.inputs, max(gram.rows, 1)
    mean = torch.einsum("god,gd->go", sol.weight, gram.xx[:, :d, d]) / n
    # sum (W x + b)^2 per output, then remove the bias' share
    square = (sol.xxw[:, :d] * sol.weight.transpose(1, 2)).sum(1) + (sol.xxw[:, d] * sol.bias)
    square = square - 2 * sol.bias * mean * n - n * sol.bias ** 2
    return mean, (square / n - mean ** 2).clamp_min(0)
