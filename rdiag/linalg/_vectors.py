"""Vector numerics shared by the solvers: seeded probes, accurate dots, Gram-Schmidt.

Dots and norms that enter a result are summed pairwise (torch's cascade
reduction) or block by block with float64 partial sums, never by a BLAS dot or
``Tensor.norm``. In float32 on the CPU a norm of a vector with millions of entries
is off by about 3e-5 relative, and a BLAS dot by up to 1e-3 when a few entries
dominate (a Lanczos vector near the top eigenvector): the small products vanish
below the running sum's rounding. On a 2-million-entry operator that left Lanczos
eigenvalues 4e-6 (norms) to 2e-5 (dots) off; the careful sums cost a fraction of
one operator product.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rdiag._tiling import check_fits, resolve_budget
from rdiag.operators.base import LinearOperator


def random_vectors(
    op: LinearOperator, count: int, seed: int, kind: str = "normal"
) -> Tensor:
    """``(P, count)`` seeded random vectors on the operator's device and dtype.

    Drawn on the CPU from ``torch.Generator().manual_seed(seed)`` so that a seed
    gives the same vectors on every device.

    Args:
        op: The operator (size, dtype, device).
        count: Number of columns.
        seed: The seed.
        kind: ``"normal"`` or ``"rademacher"`` (entries +-1).

    Raises:
        MemoryError: The vectors would not fit in half the free memory (the
            message says how big they are).
    """
    shape = (op.shape[0], count)
    check_fits(
        op.shape[0] * count * 8.0,
        resolve_budget(None, torch.device("cpu")),
        f"{count} random vectors of {op.shape[0]} entries",
        "ask for fewer products (num_matvecs=, num_probes=)",
    )
    gen = torch.Generator().manual_seed(seed)
    if kind == "rademacher":
        signs = torch.randint(0, 2, shape, generator=gen, dtype=torch.int8)
        out = signs.to(torch.float64) * 2 - 1
    else:
        out = torch.randn(shape, generator=gen, dtype=torch.float64)
    return out.to(device=op.device, dtype=op.dtype)


def basis_coefficients(basis: Tensor, w: Tensor) -> Tensor:
    """``(K, j)`` float64 ``basis w``, summed block by block.

    Each block of at least ``2**16`` entries (at most 64 blocks) is a product and
    a pairwise (cascade) sum in the input dtype; the block sums add in float64.
    About as fast as one BLAS product on the CPU, and accurate to about 1e-7
    relative where BLAS's running sums lose up to 1e-3 (see the module note).

    Args:
        basis: ``(K, j, P)``.
        w: ``(K, P)``.
    """
    k, j, p = basis.shape
    block = max(2**16, -(-p // 64))
    products = basis.new_empty(k, j, min(block, p))
    sums = []
    for i in range(0, p, block):
        size = min(block, p - i)
        part = products[:, :, :size]
        torch.mul(basis[:, :, i : i + size], w[:, None, i : i + size], out=part)
        sums.append(part.sum(2))
    return torch.stack(sums).sum(0, dtype=torch.float64)


def column_dots(a: Tensor, b: Tensor) -> Tensor:
    """Float64 ``a[:, k] . b[:, k]``: ``(K,)`` for ``(P, K)`` inputs, ``()`` for ``(P,)``.

    torch's own reduction sums pairwise (cascade), accurate to about 1e-7.
    """
    return (a * b).sum(0).double()


def column_norms(a: Tensor) -> Tensor:
    """Float64 Euclidean norms: ``(K,)`` of the columns of ``(P, K)``, ``()`` of ``(P,)``."""
    return column_dots(a, a).sqrt()


def orthogonalize(basis: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Project ``w`` off the basis: classical Gram-Schmidt, repeated when needed.

    One pass (accurate coefficients, then one batched product to subtract); a
    second pass only where the first removed most of ``w`` (its norm shrank below
    ``1/sqrt(2)``: the Daniel-Gragg-Kaufman-Stewart test), the case in which one
    pass leaves rounding of the removed part behind.

    Args:
        basis: ``(K, j, P)`` orthonormal rows per batch entry ``k`` (K independent
            runs).
        w: ``(K, P)``.

    Returns:
        ``(w_perp, coefficients, norms)``: ``(K, P)``, float64 ``(K, j)`` (the
        passes summed: ``basis w``) and float64 ``(K,)`` norms of ``w_perp``.
    """
    norms = column_norms(w.T)
    coeff = torch.zeros(basis.shape[:2], dtype=torch.float64, device=w.device)
    for _ in range(2):
        step = basis_coefficients(basis, w)
        w = w - torch.bmm(step.to(w.dtype).unsqueeze(1), basis).squeeze(1)
        coeff = coeff + step
        before, norms = norms, column_norms(w.T)
        if bool((norms >= before / math.sqrt(2)).all()):
            break
    return w, coeff, norms
