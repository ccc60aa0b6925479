"""Spectral density by stochastic Lanczos quadrature (SLQ)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from rdiag._checks import check_finite_positive, check_positive_int
from rdiag.linalg._vectors import orthogonalize, random_vectors
from rdiag.linalg.lanczos import check_operator
from rdiag.operators.base import LinearOperator


class SpectralDensity(NamedTuple):
    """A smoothed eigenvalue density; unpacks as ``grid, density = ...``.

    Attributes:
        grid: ``(G,)`` float64 eigenvalue grid.
        density: ``(G,)`` float64 density on the grid; integrates to 1 over the
            real line (to within the Gaussian tails cut off by the grid).
    """

    grid: Tensor
    density: Tensor


def lanczos_quadrature(
    op: LinearOperator, num_probes: int, lanczos_steps: int, seed: int
) -> tuple[Tensor, Tensor]:
    """Gauss quadrature nodes and weights of the spectral measure, per probe.

    Runs ``num_probes`` independent Lanczos processes side by side (one ``matmat``
    of ``num_probes`` columns per step), each with full reorthogonalization, from
    normalized Rademacher probes ``q = z / sqrt(P)``. For each probe the nodes are
    the Ritz values of its tridiagonal matrix ``T`` and the weights the squared
    first components of ``T``'s eigenvectors (summing to 1), so that
    ``sum_j w_j g(theta_j) ~ q^T g(A) q``.

    Args:
        op: A symmetric operator ``(P, P)``.
        num_probes: Probes.
        lanczos_steps: Lanczos lanczos_steps per probe (capped at ``P``).
        seed: Seed of the probes.

    Returns:
        ``(nodes, weights)``, each ``(num_probes, lanczos_steps)`` float64.
    """
    p = op.shape[0]
    lanczos_steps = min(lanczos_steps, p)
    q = random_vectors(op, num_probes, seed, "rademacher") / math.sqrt(p)
    basis = torch.empty(num_probes, lanczos_steps, p, dtype=op.dtype, device=op.device)
    t = torch.zeros(num_probes, lanczos_steps, lanczos_steps, dtype=torch.float64)
    eps = torch.finfo(op.dtype).eps
    for j in range(lanczos_steps):
        basis[:, j] = q.T
        w, coeff, beta = orthogonalize(basis[:, : j + 1], op.matmat(q).T)
        t[:, j, j] = coeff[:, j]
        if j > 0:
            # beta_{j-1} from the recurrence; an exhausted probe keeps 0 couplings.
            t[:, j, j - 1] = t[:, j - 1, j] = coeff[:, j - 1]
        alive = beta > 10 * eps * coeff.abs().max(dim=1).values.clamp_min(eps)
        unit = w / beta.clamp_min(torch.finfo(torch.float64).tiny).to(w.dtype)[:, None]
        q = torch.where(alive[:, None], unit, 0.0).T
    nodes, vecs = torch.linalg.eigh(t)
    return nodes, vecs[:, 0, :] ** 2


def spectral_density(
    op: LinearOperator,
    *,
    num_probes: int = 10,
    lanczos_steps: int = 50,
    grid: Tensor | int = 1000,
    sigma: float | None = None,
    seed: int = 0,
) -> SpectralDensity:
    r"""Eigenvalue density :math:`\phi(t) = \frac1P \sum_i \delta(t - \lambda_i)`, smoothed.

    Stochastic Lanczos quadrature (Ghorbani, Krishnan, Xiao 2019; Papyan 2020):
    :math:`\phi_\sigma(t) \approx \frac{1}{n_v} \sum_{v} \sum_j w_{vj}\,
    \mathcal N(t; \theta_{vj}, \sigma^2)` with the nodes and weights of
    :func:`lanczos_quadrature`. Its mean is exactly the Hutchinson estimate of
    ``tr(A) / P`` from the same probes. Costs ``num_probes * lanczos_steps``
    products.

    Args:
        op: A symmetric :class:`~rdiag.operators.base.LinearOperator` ``(P, P)``.
        num_probes: Random probes.
        lanczos_steps: Lanczos steps per probe (quadrature nodes per probe).
        grid: A ``(G,)`` tensor of points, or a number of points spanning the
            nodes +- 5 sigma.
        sigma: Gaussian broadening; default 1% of the node range (or of the largest
            ``|node|`` when the range is 0).
        seed: Seed of the probes.

    Returns:
        A :class:`SpectralDensity` ``(grid, density)``.

    Raises:
        ValueError: Bad counts, ``sigma`` or ``grid``.
    """
    check_operator(op)
    check_positive_int(num_probes, "num_probes")
    check_positive_int(lanczos_steps, "lanczos_steps")
    nodes, weights = lanczos_quadrature(op, num_probes, lanczos_steps, seed)
    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        sigma = 0.01 * (hi - lo) or 1e-3 * max(abs(lo), abs(hi), 1.0)
    sigma = check_finite_positive(sigma, "sigma")
    if isinstance(grid, int) and not isinstance(grid, bool):
        check_positive_int(grid, "grid")
        points = torch.linspace(
            lo - 5 * sigma, hi + 5 * sigma, grid, dtype=torch.float64
        )
    elif isinstance(grid, Tensor) and grid.dim() == 1 and grid.numel() > 0:
        points = grid.detach().to("cpu", torch.float64)
    else:
        raise ValueError(
            f"expected grid as a number of points or a 1-D tensor, got {grid!r}"
        )
    z = (points[:, None, None] - nodes[None]) / sigma
    kernel = torch.exp(-0.5 * z**2) / (sigma * math.sqrt(2 * math.pi))
    density = (kernel * weights[None]).sum((1, 2)) / num_probes
    return SpectralDensity(points, density)
