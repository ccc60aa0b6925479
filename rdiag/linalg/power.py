"""Power iteration for the dominant eigenpair, with an optional shift."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from rdiag._checks import check_choice, check_finite_positive, check_positive_int
from rdiag.linalg._vectors import column_dots, column_norms
from rdiag.linalg.lanczos import EigResult, check_operator, start_vector
from rdiag.operators.base import LinearOperator


def power_iteration(
    op: LinearOperator,
    *,
    tol: float = 1e-6,
    max_iter: int = 1000,
    warm_start: EigResult | Tensor | None = None,
    seed: int = 0,
    shift: float | None = None,
) -> EigResult:
    r"""The eigenpair of ``A`` whose eigenvalue is farthest from ``shift``.

    Iterates ``v <- (A - shift I) v / ||.||`` and reports the Rayleigh quotient
    ``lambda = v^T A v`` of ``A`` itself. Stops when
    ``||A v - lambda v|| <= tol * |lambda|`` or after ``max_iter`` products.

    .. warning::
        Without a shift this finds the eigenvalue of largest **magnitude**. For an
        indefinite Hessian (at muP initialization, or with cross-entropy) the most
        negative eigenvalue can be as large in magnitude as the top one, and power
        iteration then returns it, or oscillates between the two; use
        :func:`~rdiag.linalg.lanczos.lanczos` for the largest algebraic eigenvalue.
        With ``shift = lambda_max`` (>= 0) it returns the most negative eigenvalue.
        Convergence is linear in the eigenvalue ratio, often slow.

    Args:
        op: A symmetric :class:`~rdiag.operators.base.LinearOperator` ``(P, P)``.
        tol: Relative residual tolerance.
        max_iter: Most operator-vector products.
        warm_start: A previous :class:`EigResult` or a ``(P,)`` / ``(P, k)`` tensor.
        seed: Seed of the random start.
        shift: Spectral shift ``s`` (default 0).

    Returns:
        An :class:`EigResult` with one pair.

    Raises:
        ValueError: Bad ``tol``, ``max_iter`` or ``warm_start``.
        TypeError: ``op`` is not a LinearOperator.
    """
    check_operator(op)
    check_finite_positive(tol, "tol")
    check_positive_int(max_iter, "max_iter")
    s = 0.0 if shift is None else float(shift)
    v = start_vector(op, warm_start, seed)
    lam, res = torch.zeros((), dtype=torch.float64), torch.full((), float("inf"))
    converged, matvecs = False, 0
    while matvecs < max_iter:
        matvecs += 1
        w = op.matvec(v)
        lam = column_dots(v, w)
        res = column_norms(w - lam.to(w.dtype) * v)
        if bool(res <= tol * lam.abs()):
            converged = True
            break
        u = w - s * v
        norm = column_norms(u).to(u.dtype)
        if not bool(norm > 0):
            converged = bool(res <= tol * lam.abs())
            break
        v = u / norm
    return EigResult(
        eigenvalues=lam.reshape(1),
        eigenvectors=v.unsqueeze(1),
        residuals=res.reshape(1),
        num_matvecs=matvecs,
        converged=converged,
    )


def power_extreme(
    op: LinearOperator,
    which: Literal["largest", "smallest"] = "largest",
    *,
    tol: float = 1e-6,
    max_iter: int = 1000,
    warm_start: EigResult | Tensor | None = None,
    seed: int = 0,
) -> EigResult:
    """The largest (or smallest) **algebraic** eigenpair by power iteration.

    Runs :func:`power_iteration`; if the dominant eigenvalue found is at the other
    end of the spectrum (negative when the largest is wanted), runs it again
    shifted by that eigenvalue, which makes the wanted end dominant. Products of
    both runs are counted; ``max_iter`` applies to each.

    Args:
        op: A symmetric operator ``(P, P)``.
        which: ``"largest"`` or ``"smallest"``.
        tol: Relative residual tolerance.
        max_iter: Most products per run.
        warm_start: A previous result or vector (first run only).
        seed: Seed of the random start.

    Returns:
        An :class:`EigResult` with one pair.

    Raises:
        ValueError: Unknown ``which`` or bad options.
    """
    check_choice(which, "which", ("largest", "smallest"))
    first = power_iteration(
        op, tol=tol, max_iter=max_iter, warm_start=warm_start, seed=seed
    )
    lam = float(first.eigenvalues[0])
    if (which == "largest") == (lam >= 0):
        return first
    second = power_iteration(op, tol=tol, max_iter=max_iter, seed=seed, shift=lam)
    return EigResult(
        second.eigenvalues,
        second.eigenvectors,
        second.residuals,
        first.num_matvecs + second.num_matvecs,
        first.converged and second.converged,
    )
