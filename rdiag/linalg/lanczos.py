"""Thick-restart Lanczos with full reorthogonalization, run to a residual tolerance.

The result type :class:`EigResult` and the start-vector helpers are shared with
:mod:`rdiag.linalg.power` and :mod:`rdiag.linalg.density`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rdiag._checks import check_choice, check_finite_positive, check_positive_int
from rdiag._tiling import check_fits, resolve_budget
from rdiag.linalg._vectors import (
    column_dots,
    column_norms,
    orthogonalize,
    random_vectors,
)
from rdiag.operators.base import LinearOperator

Which = Literal["largest", "smallest", "both"]
#: Below this many Lanczos vectors the Ritz gap is too rough an estimate for the
#: eigenvalue criterion alone (see ``criterion``).
SMALL_SPACE = 6
#: There, the wanted Ritz values must have moved by at most ``SETTLE * tol`` (relative)
#: in the last product.
SETTLE = 3.0


@dataclass(frozen=True)
class EigResult:
    """Eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: ``(k,)`` float64, largest algebraic first.
        eigenvectors: ``(P, k)`` unit columns, in the operator's dtype and device.
        residuals: ``(k,)`` float64, ``||A v - lambda v||`` per pair.
        num_matvecs: Operator-vector products spent.
        converged: Whether every pair met the tolerance.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    num_matvecs: int
    converged: bool


def check_operator(op: object) -> LinearOperator:
    """Return ``op`` if it is a square :class:`LinearOperator`; raise otherwise."""
    if not isinstance(op, LinearOperator):
        raise TypeError(
            f"expected an rdiag.operators.LinearOperator, got {type(op).__name__}; wrap "
            "a dense matrix with rdiag.operators.base.DenseOperator"
        )
    return op


def start_vector(
    op: LinearOperator, warm_start: EigResult | Tensor | None, seed: int
) -> Tensor:
    """A unit ``(P,)`` start vector: the sum of the warm-start vectors, or random.

    Args:
        op: The operator.
        warm_start: A previous :class:`EigResult`, a ``(P,)`` or ``(P, k)`` tensor,
            or ``None`` (seeded Gaussian).
        seed: Seed of the random start.

    Raises:
        ValueError: The warm start has the wrong size or is zero.
    """
    if warm_start is None:
        v = random_vectors(op, 1, seed)[:, 0]
    else:
        w = warm_start.eigenvectors if isinstance(warm_start, EigResult) else warm_start
        if (
            not isinstance(w, Tensor)
            or w.dim() not in (1, 2)
            or w.shape[0] != op.shape[0]
        ):
            got = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
            raise ValueError(
                f"expected warm_start as an EigResult or a ({op.shape[0]},) / "
                f"({op.shape[0]}, k) tensor, got {got}; pass the previous result"
            )
        w = w.to(device=op.device, dtype=op.dtype).reshape(op.shape[0], -1)
        norms = column_norms(w).clamp_min(torch.finfo(torch.float64).tiny)
        v = (w / norms.to(w.dtype)).sum(1)
    norm = float(column_norms(v))
    if not norm > 0 or not math.isfinite(norm):
        raise ValueError(
            "expected a non-zero, finite warm_start; got a zero or non-finite one"
        )
    return v / norm


def _wanted(theta: Tensor, k: int, which: Which) -> Tensor:
    """Indices (into ascending ``theta``) of the wanted Ritz values, largest first."""
    n = len(theta)
    top = torch.arange(n - 1, max(n - 1 - k, -1), -1)
    if which == "largest":
        return top
    bottom = torch.arange(min(k, n) - 1, -1, -1)
    if which == "smallest":
        return bottom
    return torch.cat([top, bottom[~torch.isin(bottom, top)]])


def lanczos(
    op: LinearOperator,
    k: int = 1,
    *,
    which: Which = "largest",
    tol: float = 1e-6,
    max_iter: int = 1000,
    warm_start: EigResult | Tensor | None = None,
    seed: int = 0,
    basis_size: int | None = None,
    criterion: Literal["residual", "eigenvalue"] = "residual",
) -> EigResult:
    r"""Extreme eigenpairs of a symmetric operator by thick-restart Lanczos.

    Each step is one operator-vector product; the projected matrix ``T`` comes
    from the Lanczos recurrence (dots and norms summed pairwise, see
    :mod:`rdiag.linalg._vectors`), and the new vector is reorthogonalized against
    the whole basis (full reorthogonalization, so no ghost eigenvalues). When the
    basis reaches ``basis_size`` vectors it is compressed to the best Ritz vectors
    (thick restart, the symmetric Krylov-Schur method) and the expansion goes on.
    It stops when every wanted Ritz pair satisfies

    .. math:: \|A v - \theta v\| \le \mathrm{tol}\cdot\max_i |\theta_i|,

    i.e. a residual relative to the operator's norm estimate (the largest
    ``|Ritz value|``), so eigenvalues near zero are not held to an impossible
    relative bound. The residual is read off the Lanczos relation
    (``beta * |last component|``), equal to the true residual up to rounding; the
    eigenvalue error is then at most about ``residual**2 / gap``. Seeded and
    deterministic.

    .. warning::
        With a warm start that is close to a *non-top* eigenvector the method can
        stop on it if the top one is barely present in the start vector; after a
        training step this does not happen in practice, but keep ``tol`` small.

    Args:
        op: Any symmetric :class:`~rdiag.operators.base.LinearOperator` ``(P, P)``
            (Hessian, GGN, NTK, dense).
        k: Eigenpairs wanted (from each end with ``which="both"``).
        which: ``"largest"`` or ``"smallest"`` algebraic, or ``"both"`` (``k``
            largest then ``k`` smallest; duplicates removed when ``2k > P``).
        tol: Relative residual tolerance (see above).
        max_iter: Most operator-vector products to spend.
        warm_start: A previous :class:`EigResult` or a ``(P,)`` / ``(P, k)`` tensor;
            the Krylov space starts from the sum of its (normalized) vectors, which
            cuts the products needed when the operator changed a little. After
            one SGD step on a tanh MLP (``bench/README.md``) it took 2 instead of
            27 products at ``lr * lambda_max = 0.007``, 9 at 0.07, 11 at 0.22
            and 16 at 0.66: the larger the step, the more of the new top
            eigenvector lies in the bulk of the spectrum.
        seed: Seed of the random start vector (and of restarts after a breakdown).
        criterion: ``"residual"`` (default; the test above) or ``"eigenvalue"``:
            stop when the eigenvalue error bound ``min(residual, residual**2 /
            gap)`` is at most ``tol * max|theta|`` (``gap``: distance to the
            nearest other Ritz value, less its residual, where that one has
            converged itself; an unconverged one may stand for an unresolved
            cluster, so it vouches for no gap), the residual at most ``sqrt(tol) *
            max|theta|`` and, while the basis is smaller than :data:`SMALL_SPACE`,
            the wanted Ritz values moved by at most ``SETTLE * tol * max|theta|``
            in the last product. For
            eigenvalues only (sharpness tracking) it needs far fewer products,
            above all from a warm start; eigenvectors are then only
            ``sqrt(tol)``-accurate.
        basis_size: Largest basis before a restart; default
            ``min(P, max(2 * k_total + 10, 20))``.

    Returns:
        An :class:`EigResult` with ``k`` (or up to ``2k``) pairs, largest first.

    Raises:
        ValueError: ``k`` too large for ``P``, or bad options.
        TypeError: ``op`` is not a LinearOperator.

    Example:
        >>> import torch
        >>> from rdiag.operators.base import DenseOperator
        >>> a = torch.randn(50, 50, dtype=torch.float64); a = a + a.T
        >>> res = lanczos(DenseOperator(a), k=2, which="both")
        >>> exact = torch.linalg.eigvalsh(a)
        >>> torch.allclose(res.eigenvalues, torch.stack([exact[-1], exact[-2], exact[1], exact[0]]))
        True
    """
    check_operator(op)
    check_positive_int(k, "k")
    check_choice(which, "which", ("largest", "smallest", "both"))
    check_finite_positive(tol, "tol")
    check_positive_int(max_iter, "max_iter")
    check_choice(criterion, "criterion", ("residual", "eigenvalue"))
    p = op.shape[0]
    total = 2 * k if which == "both" else k
    if min(k, total) > p:
        raise ValueError(f"expected k <= P = {p}, got k={k}; ask for fewer eigenpairs")
    m = min(p, basis_size if basis_size is not None else max(2 * total + 10, 20))
    if m < p and m < total + 2:
        raise ValueError(
            f"expected basis_size >= {total + 2} for k={k} ({which}), got {m}; "
            "leave basis_size=None for the default"
        )
    itemsize = torch.empty(0, dtype=op.dtype).element_size()
    check_fits(
        (m + 1) * p * itemsize,
        resolve_budget(None, op.device),
        f"the Lanczos basis ({m + 1} vectors of P = {p})",
        "ask for fewer eigenpairs (k) or a smaller basis_size",
    )
    basis = torch.empty(m + 1, p, dtype=op.dtype, device=op.device)
    basis[0] = start_vector(op, warm_start, seed)
    # T = V^T A V from the Lanczos relation A q_j = sum_i T[i, j] q_i + w_j: the
    # diagonal, the band and (after a thick restart) the arrow of couplings.
    t = torch.zeros(m + 1, m + 1, dtype=torch.float64)
    j, matvecs, fresh, broke = 0, 0, 0, False
    previous = torch.empty(0, dtype=torch.float64)
    eps = torch.finfo(op.dtype).eps
    while True:
        w = op.matvec(basis[j])
        matvecs += 1
        if not bool(torch.isfinite(w).all()):
            raise ValueError(
                f"the operator's product {matvecs} is not finite (NaN or inf); check "
                "that the model's weights, the inputs and the targets are finite"
            )
        t[j, j] = column_dots(basis[j], w)
        coupled = t[: j + 1, j].nonzero()  # j-1 and j, or from 0 after a restart
        first = int(coupled[0, 0]) if len(coupled) else j
        couplings = t[first : j + 1, j].to(op.dtype)
        w = torch.addmv(w, basis[first : j + 1].T, couplings, alpha=-1)
        # Full reorthogonalization of what rounding left: no ghost eigenvalues.
        w, _, norm = orthogonalize(basis[None, : j + 1], w[None])
        w, beta = w[0], float(norm[0])
        j += 1
        theta, s = torch.linalg.eigh(t[:j, :j])
        scale = max(float(theta.abs().max()), torch.finfo(torch.float64).tiny)
        want = _wanted(theta, k, which)
        res = beta * s[j - 1, want].abs()
        # An invariant subspace (tiny beta) holds exact pairs but can miss wanted
        # ones (multiplicities, a start vector in an eigenspace): look beyond it from
        # fresh random directions orthogonal to the basis (coupling computed).
        broke, looked = beta <= math.sqrt(eps) * scale, broke
        converged = len(want) >= total and _accurate(
            theta, want, res, tol, scale, criterion, beta * s[j - 1].abs()
        )
        if criterion == "eigenvalue" and j < SMALL_SPACE:
            # The gap of a small Krylov space's Ritz values can be far too large
            # (a warm start stopped after 3 products 4x off its tolerance): there
            # the values must also have settled (within SETTLE tolerances).
            converged = converged and bool(
                len(previous) == len(want)
                and ((theta[want] - previous).abs() <= SETTLE * tol * scale).all()
            )
        if broke:
            # Accept a breakdown only once a fresh direction left the pairs unchanged.
            stable = looked and len(previous) == len(want)
            converged = (
                converged
                and stable
                and bool(((theta[want] - previous).abs() <= tol * scale).all())
            )
        previous = theta[want]
        if converged or j == p or matvecs >= max_iter:
            break
        if broke:
            fresh += 1
            probe = random_vectors(op, 1, seed + 7919 * fresh)[:, 0]
            probe, _, norm = orthogonalize(basis[None, :j], probe[None])
            nxt, size = probe[0], float(norm[0])
            coupling = float(column_dots(nxt, w)) / size
        else:
            nxt, size, coupling = w, beta, beta
        if j == m:
            keep = _restart_indices(theta, total, which, m)
            basis[: len(keep)] = s[:, keep].to(op.dtype).T @ basis[:m]
            t.zero_()
            t[range(len(keep)), range(len(keep))] = theta[keep]
            # The arrow: the next vector's coupling to each kept Ritz vector.
            t[: len(keep), len(keep)] = coupling * s[j - 1, keep]
            t[len(keep), : len(keep)] = t[: len(keep), len(keep)]
            j = len(keep)
        else:
            t[j - 1, j] = t[j, j - 1] = coupling
        torch.div(nxt, size, out=basis[j])
    vectors = basis[:j].T @ s[:, want].to(op.dtype)
    return EigResult(
        eigenvalues=theta[want].clone(),
        eigenvectors=vectors,
        residuals=res.clone(),
        num_matvecs=matvecs,
        converged=converged or j == p,
    )


def _accurate(
    theta: Tensor,
    want: Tensor,
    res: Tensor,
    tol: float,
    scale: float,
    criterion: str,
    all_res: Tensor,
) -> bool:
    """Whether the wanted Ritz pairs meet the stopping test (see ``criterion``).

    ``res`` are the wanted pairs' residuals, ``all_res`` every Ritz pair's.
    """
    if criterion == "residual":
        return bool((res <= tol * scale).all())
    if len(theta) < 2:
        return False
    # The quadratic bound needs the gap to the rest of the *spectrum*. Only a
    # nearest neighbour that has converged itself (residual under a tenth of
    # its distance) vouches for one: an unconverged Ritz value may stand for an
    # eigenvalue the basis has not resolved yet (a cluster), next to the wanted
    # one. Without such a neighbour the bound is the residual (Weyl).
    distance = (theta[want, None] - theta[None, :]).abs()
    distance[torch.arange(len(want)), want] = math.inf
    gap, nearest = distance.min(dim=1)
    vouched = all_res[nearest] <= 0.1 * gap
    gap = torch.where(vouched, gap - all_res[nearest], 0.0)
    bound = torch.minimum(res, res**2 / gap)
    small = res <= math.sqrt(tol) * scale
    return bool((small & (bound <= tol * scale)).all())


def _restart_indices(theta: Tensor, total: int, which: Which, m: int) -> Tensor:
    """Ritz indices kept at a restart: the wanted end(s), about half the basis."""
    keep = max(total, min(m - 2, total + (m - total) // 2))
    n = len(theta)
    if which == "largest":
        return torch.arange(n - keep, n)
    if which == "smallest":
        return torch.arange(keep)
    low = keep // 2
    return torch.cat([torch.arange(low), torch.arange(n - (keep - low), n)])
