r"""Kernel statistics from operator products: trace, Frobenius norm, movement, rank.

For a symmetric operator ``K`` (an eNTK as :class:`~rdiag.operators.ntk.NTKOperator`
on ``10^4 - 10^5`` probe points, where the ``(N O)^2`` matrix does not fit) and
``s`` Rademacher probes ``z_i``, one product ``K z_i`` each gives

.. math:: \mathrm{tr}\, K \approx \frac1s \sum_i z_i^\top K z_i, \qquad
    \|K\|_F^2 \approx \frac1s \sum_i \|K z_i\|^2,

both unbiased, with standard errors from the sample spread. Keeping the probes
and the products ``K_0 z_i`` of a reference checkpoint gives the relative change
``||K - K_0||_F / ||K_0||_F`` from ``||(K - K_0) z_i||`` at no extra product, and
the participation-ratio effective rank ``(tr K)^2 / ||K||_F^2``; their errors come
from the delta method over the same probes. Anchor: trace-estimated NTK
statistics (arXiv 2511.10796).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from rdiag._checks import check_positive_int
from rdiag.linalg._vectors import random_vectors
from rdiag.linalg.lanczos import check_operator
from rdiag.operators.base import LinearOperator

__all__ = ["Estimate", "KernelMoments", "kernel_moments"]


@dataclass(frozen=True)
class Estimate:
    """A stochastic estimate and its standard error.

    Attributes:
        value: The estimate.
        std_err: Its standard error (the exact value lies within a few of it with
            high probability).
    """

    value: float
    std_err: float


@dataclass(frozen=True)
class KernelMoments:
    """Statistics of a kernel operator from one set of probe products.

    Attributes:
        trace: ``tr K``.
        frobenius: ``||K||_F``.
        effective_rank: ``(tr K)^2 / ||K||_F^2`` (participation ratio).
        rel_change: ``||K - K_0||_F / ||K_0||_F`` against the reference, or ``None``.
        probes: The ``(D, s)`` probes used (pass them again with ``reference``).
        products: ``K @ probes`` (the reference of a later call).
        num_matvecs: Products spent.
    """

    trace: Estimate
    frobenius: Estimate
    effective_rank: Estimate
    rel_change: Estimate | None
    probes: Tensor
    products: Tensor
    num_matvecs: int


def _mean_se(samples: Tensor) -> tuple[float, float]:
    n = len(samples)
    mean = float(samples.mean())
    se = float(samples.std()) / math.sqrt(n) if n > 1 else math.inf
    return mean, se


def _ratio(num: Tensor, den: Tensor) -> tuple[float, float]:
    """``mean(num) / mean(den)`` and its delta-method standard error."""
    n = len(num)
    a, b = float(num.mean()), float(den.mean())
    ratio = a / b
    if n < 2:
        return ratio, math.inf
    cov = torch.cov(torch.stack([num, den]).double())
    var = (cov[0, 0] - 2 * ratio * cov[0, 1] + ratio**2 * cov[1, 1]) / (b * b * n)
    return ratio, math.sqrt(max(float(var), 0.0))


def kernel_moments(
    op: LinearOperator,
    num_probes: int = 30,
    *,
    seed: int = 0,
    reference: KernelMoments | tuple[Tensor, Tensor] | None = None,
    block_size: int = 8,
) -> KernelMoments:
    """Trace, Frobenius norm, effective rank (and movement) of ``op`` from ``s`` products.

    Args:
        op: A symmetric ``(D, D)`` operator (e.g. ``rdiag.NTKOperator(model, x)``).
        num_probes: Rademacher probes ``s`` (= products).
        seed: Seed of the probes (ignored with ``reference``: its probes are reused).
        reference: The moments of a reference checkpoint (same operator size), or
            their ``(probes, products)``: the probes are reused and ``rel_change``
            is measured against the products.
        block_size: Probes per ``matmat`` call.

    Returns:
        The :class:`KernelMoments`.

    Raises:
        ValueError: A bad count, or a reference of another size.

    Example:
        >>> import torch
        >>> from rdiag.operators.base import DenseOperator
        >>> a = torch.randn(50, 50, dtype=torch.float64)
        >>> k = DenseOperator(a @ a.T)
        >>> m = kernel_moments(k, 200, seed=1)
        >>> abs(m.trace.value - float((a @ a.T).trace())) < 4 * m.trace.std_err
        True
    """
    check_operator(op)
    check_positive_int(block_size, "block_size")
    ref_products = None
    if reference is None:
        check_positive_int(num_probes, "num_probes")
        z = random_vectors(op, num_probes, seed, "rademacher")
    else:
        if isinstance(reference, KernelMoments):
            reference = (reference.probes, reference.products)
        z, ref_products = reference
        z = z.to(device=op.device, dtype=op.dtype)
        if z.shape[0] != op.shape[0]:
            raise ValueError(
                f"expected a reference of the same size ({op.shape[0]}), got "
                f"{z.shape[0]}; compute both moments on one probe batch"
            )
    kz = torch.cat([op.matmat(b) for b in z.split(block_size, dim=1)], dim=1)
    quad = (z.double() * kz.double()).sum(0)
    sq = kz.double().pow(2).sum(0)
    trace, frob_sq = _mean_se(quad), _mean_se(sq)
    frob = math.sqrt(max(frob_sq[0], 0.0))
    frobenius = Estimate(frob, frob_sq[1] / (2 * frob) if frob > 0 else math.inf)
    rank, rank_se = _rank(quad, sq)
    rel = None
    if ref_products is not None:
        ref = ref_products.to(device=kz.device, dtype=torch.float64)
        ratio, se = _ratio((kz.double() - ref).pow(2).sum(0), ref.pow(2).sum(0))
        root = math.sqrt(max(ratio, 0.0))
        rel = Estimate(root, se / (2 * root) if root > 0 else math.inf)
    return KernelMoments(
        Estimate(*trace),
        frobenius,
        Estimate(rank, rank_se),
        rel,
        z,
        kz,
        z.shape[1],
    )


def _rank(quad: Tensor, sq: Tensor) -> tuple[float, float]:
    """``mean(quad)^2 / mean(sq)`` and its delta-method standard error."""
    n = len(quad)
    t, f = float(quad.mean()), float(sq.mean())
    rank = t * t / f
    if n < 2:
        return rank, math.inf
    cov = torch.cov(torch.stack([quad, sq]).double())
    grad = torch.tensor([2 * t / f, -t * t / (f * f)], dtype=torch.float64)
    return rank, math.sqrt(max(float(grad @ cov @ grad) / n, 0.0))
