"""Pure-torch references: the CPU execution path and the test oracle.

Same signatures as the Triton launchers. Inputs in float16/bfloat16/float32 are
upcast to float32 for every product and sum; float64 inputs stay float64
end to end (the exact path).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from rdiag._tiling import available_memory

from ._launch import (
    GramShape,
    KernelSums,
    acc_dtype,
    check_gram_hadamard_args,
    check_gram_hadamard_shared_args,
    check_kernel_pair,
    check_terms,
    prepare_out,
)

#: Elements of float temporaries one block of the references may hold at once.
_BLOCK_ELEMS = 1 << 24

Term = tuple[Tensor, Tensor, Tensor, Tensor, float]


@contextlib.contextmanager
def _tf32(device: torch.device, allow: bool) -> Iterator[None]:
    """Set cuBLAS TF32 for the block (CUDA only; CPU matmuls never use TF32)."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _blocks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _rows_per_block(n: int, elems_per_row: int) -> int:
    return max(1, min(n, _BLOCK_ELEMS // max(1, elems_per_row)))


def gram_hadamard(
    x1: Tensor,
    x2: Tensor,
    g1: Tensor,
    g2: Tensor,
    out: Tensor | None = None,
    *,
    scale: float = 1.0,
    allow_tf32: bool = False,
) -> Tensor:
    r"""Accumulate ``scale * (x1 x2^T) o (g1 g2^T)`` per output pair into ``out``.

    .. math::
        out_{ijab} \mathrel{+}= s\,(x_{1,i}\cdot x_{2,j})\,(g_{1,ia}\cdot g_{2,jb})

    Computed in blocks of rows of ``x1`` (temporaries bounded), with both Grams
    of a block materialized.

    Args:
        x1: Layer inputs ``(N1, Dx)``.
        x2: Layer inputs ``(N2, Dx)``.
        g1: Output cotangents ``(N1, R, Dg)``.
        g2: Output cotangents ``(N2, R, Dg)``.
        out: ``(N1, N2, R, R)`` float32/float64 accumulator, or None to allocate
            zeros (float64 for float64 inputs, else float32).
        scale: Multiplier of this term (e.g. a learning-rate weight).
        allow_tf32: Let cuBLAS use TF32 (CUDA only).

    Returns:
        ``out`` ``(N1, N2, R, R)``.
    """
    shape = check_gram_hadamard_args(x1, x2, g1, g2)
    fresh = out is None
    out = prepare_out(out, shape, x1, zero=False)
    acc = acc_dtype(x1.dtype)
    n1, n2, _, _, r, _, dg = shape
    xb, gb = x2.to(acc), g2.to(acc).reshape(n2 * r, dg)
    with _tf32(x1.device, allow_tf32):
        for rows in _blocks(n1, _rows_per_block(n1, n2 * r * r)):
            m = rows.stop - rows.start
            xx = (x1[rows].to(acc) @ xb.T).mul_(scale)[:, :, None, None]
            gg = (g1[rows].to(acc).reshape(m * r, dg) @ gb.T).reshape(m, r, n2, r)
            gg = gg.permute(0, 2, 1, 3)
            if fresh:
                torch.mul(xx, gg, out=out[rows])
            else:
                out[rows].addcmul_(xx, gg)
    return out


def gram_hadamard_many(
    terms: Sequence[Term], out: Tensor | None = None, *, allow_tf32: bool = False
) -> Tensor:
    """Sum :func:`gram_hadamard` over ``terms`` (one per layer) into ``out``.

    Args:
        terms: ``(x1, x2, g1, g2, scale)`` tuples with shapes as in
            :func:`gram_hadamard`; all share ``N1, N2, R`` (``Dx, Dg`` may differ).
        out: ``(N1, N2, R, R)`` accumulator or None.
        allow_tf32: Let cuBLAS use TF32 (CUDA only).

    Returns:
        ``out`` ``(N1, N2, R, R)``.
    """
    terms = check_terms(terms)
    for x1, x2, g1, g2, scale in terms:
        out = gram_hadamard(x1, x2, g1, g2, out, scale=scale, allow_tf32=allow_tf32)
    return out


def shared_route(shape: GramShape, device: torch.device, itemsize: int = 4) -> str:
    """Pick how the reference computes the weight-shared term: a small cost model.

    With ``W_ia = sum_t g_{iat} x_{it}^T`` (the per-sample weight gradient,
    ``Dg x Dx``), the shared term is ``<W_ia, W_jb>_F``. Multiply-adds:

    * ``"grams"``: token Grams per pair of samples,
      ``N1 N2 T1 T2 (Dx + R^2 Dg + R^2)``; temporaries bounded by blocking.
    * ``"weight_gradients"``: ``(N1 T1 + N2 T2) R Dg Dx + N1 N2 R^2 Dg Dx``;
      holds ``(N1 + N2) R Dg Dx`` floats.

    The cheaper route by multiply-adds is taken unless the weight gradients do not
    fit in half the free memory.

    Args:
        shape: Sizes from the argument check.
        device: Where the temporaries would live.
        itemsize: Bytes per accumulated element.

    Returns:
        ``"grams"`` or ``"weight_gradients"``.
    """
    n1, n2, t1, t2, r, dx, dg = shape
    cost_grams = n1 * n2 * t1 * t2 * (dx + r * r * dg + r * r)
    cost_wg = (n1 * t1 + n2 * t2) * r * dg * dx + n1 * n2 * r * r * dg * dx
    wg_bytes = float(n1 + n2) * r * dg * dx * itemsize
    if wg_bytes > available_memory(device) / 2:
        return "grams"
    return "weight_gradients" if cost_wg < cost_grams else "grams"


def gram_hadamard_shared(
    x1: Tensor,
    x2: Tensor,
    g1: Tensor,
    g2: Tensor,
    out: Tensor | None = None,
    *,
    scale: float = 1.0,
    allow_tf32: bool = False,
) -> Tensor:
    r"""Weight-shared Gram-Hadamard term, summed over token pairs, into ``out``.

    .. math:: out_{ijab} \mathrel{+}= s \sum_{t,t'} (x_{1,it}\cdot x_{2,jt'})
        (g_{1,iat}\cdot g_{2,jbt'})

    The route (token Grams or per-sample weight gradients) is chosen by
    :func:`shared_route`.

    Args:
        x1: Layer inputs ``(N1, T1, Dx)`` (tokens or unfolded patches).
        x2: Layer inputs ``(N2, T2, Dx)``.
        g1: Output cotangents ``(N1, R, T1, Dg)``.
        g2: Output cotangents ``(N2, R, T2, Dg)``.
        out: ``(N1, N2, R, R)`` accumulator or None.
        scale: Multiplier of this term.
        allow_tf32: Let cuBLAS use TF32 (CUDA only).

    Returns:
        ``out`` ``(N1, N2, R, R)``.
    """
    shape = check_gram_hadamard_shared_args(x1, x2, g1, g2)
    fresh = out is None
    out = prepare_out(out, shape, x1, zero=False)
    acc = acc_dtype(x1.dtype)
    route = shared_route(shape, x1.device, torch.finfo(acc).bits // 8)
    fn = (
        _shared_by_weight_gradients if route == "weight_gradients" else _shared_by_grams
    )
    a1, b1 = x1.to(acc), g1.to(acc)
    a2 = a1 if x2 is x1 else x2.to(acc)  # keep identity: K(x, x) reuses W
    b2 = b1 if g2 is g1 else g2.to(acc)
    with _tf32(x1.device, allow_tf32):
        fn(a1, a2, b1, b2, out, scale, fresh)
    return out


def _weight_gradients(x: Tensor, g: Tensor) -> Tensor:
    """Per-sample weight gradients ``(N, R, Dg, Dx)`` flattened to ``(N R, Dg Dx)``."""
    n, r = g.shape[:2]
    return torch.einsum("nrtg,ntx->nrgx", g, x).reshape(n * r, -1)


def _shared_by_weight_gradients(
    x1: Tensor,
    x2: Tensor,
    g1: Tensor,
    g2: Tensor,
    out: Tensor,
    scale: float,
    fresh: bool = False,
) -> None:
    n1, r, n2 = g1.shape[0], g1.shape[1], g2.shape[0]
    w1 = _weight_gradients(x1, g1)
    same = x1 is x2 and g1 is g2
    w2 = w1 if same else _weight_gradients(x2, g2)
    prod = (w1 @ w2.T).reshape(n1, r, n2, r).permute(0, 2, 1, 3)
    _put(out, prod, scale, fresh)


def _shared_by_grams(
    x1: Tensor,
    x2: Tensor,
    g1: Tensor,
    g2: Tensor,
    out: Tensor,
    scale: float,
    fresh: bool = False,
) -> None:
    n1, r, t1, dg = g1.shape
    n2, _, t2, _ = g2.shape
    pair = t1 * t2 * (1 + r * r)
    b = max(1, math.isqrt(max(1, _BLOCK_ELEMS // pair)))
    for i in _blocks(n1, b):
        for j in _blocks(n2, b):
            mi, mj = i.stop - i.start, j.stop - j.start
            xx = (x1[i].reshape(mi * t1, -1) @ x2[j].reshape(mj * t2, -1).T).reshape(
                mi, t1, mj, t2
            )
            gg = (
                g1[i].reshape(mi * r * t1, dg) @ g2[j].reshape(mj * r * t2, dg).T
            ).reshape(mi, r, t1, mj, r, t2)
            term = torch.einsum("itju,iatjbu->ijab", xx, gg)
            _put(out[i, j], term, scale, fresh)


def _put(dst: Tensor, value: Tensor, scale: float, fresh: bool) -> None:
    """``dst = scale * value`` into a new (uninitialized) output, else ``+=``."""
    if fresh:
        torch.mul(value, scale, out=dst)
    else:
        dst.add_(value, alpha=scale)


def kernel_stats(k0: Tensor, k1: Tensor) -> KernelSums:
    """Sums of two kernels needed by distance, relative change and alignment.

    Args:
        k0: Kernel ``(N, M)`` (e.g. at initialization).
        k1: Kernel ``(N, M)`` (e.g. now), same dtype and device.

    Returns:
        The :class:`~rdiag.kernels._launch.KernelSums`.
    """
    check_kernel_pair(k0, k1)
    acc = acc_dtype(k0.dtype)
    a, b = k0.to(acc), k1.to(acc)

    def total(t: Tensor) -> float:  # torch's cascade sum keeps float32 error ~log n
        return float(t.sum())

    row0, row1 = a.sum(1), b.sum(1)
    return KernelSums(
        inner=total(a * b),
        sq_norm0=total(a * a),
        sq_norm1=total(b * b),
        sq_diff=total((b - a) ** 2),
        row0=row0,
        row1=row1,
        col0=a.sum(0),
        col1=b.sum(0),
        sum0=total(row0),
        sum1=total(row1),
    )
