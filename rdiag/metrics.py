"""Pure tensor metrics: kernel movement, alignment, spectra, norms, exponent fits.

Everything here takes tensors (or arrays) and returns Python floats or tensors; no
model, no state. The Monitor, the coordinate check and the report build on these.

Kernel comparisons are of two ``(N, M)`` kernels ``K0`` (reference, e.g. at
initialization) and ``K1``; the output-traced eNTK ``(N, N)`` is the usual input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from rdiag.kernels import KernelStats, kernel_stats
from rdiag.linalg.lanczos import lanczos
from rdiag.operators.base import LinearOperator


def _check_kernel(k: Tensor, name: str, square: bool = False) -> None:
    if not isinstance(k, Tensor) or k.dim() != 2:
        got = tuple(k.shape) if isinstance(k, Tensor) else type(k).__name__
        raise ValueError(
            f"expected {name} to be a 2-D (N, M) kernel tensor, got {got}; trace the "
            "output axes first (empirical_ntk(..., trace_outputs=True))"
        )
    if square and k.shape[0] != k.shape[1]:
        raise ValueError(f"expected {name} to be square (N, N), got {tuple(k.shape)}")


def _check_pair(k0: Tensor, k1: Tensor, square: bool = False) -> None:
    _check_kernel(k0, "k0", square)
    _check_kernel(k1, "k1", square)
    if k0.shape != k1.shape:
        raise ValueError(
            f"expected k0 and k1 of the same shape, got {tuple(k0.shape)} and "
            f"{tuple(k1.shape)}; compute both kernels on the same probe batch"
        )


def _stats(k0: Tensor, k1: Tensor) -> KernelStats:
    return kernel_stats(k0, k1)


def relative_change(k0: Tensor, k1: Tensor) -> float:
    """Relative Frobenius change ``||K1 - K0||_F / ||K0||_F``.

    Args:
        k0: Reference kernel ``(N, M)``.
        k1: Kernel ``(N, M)``.

    Returns:
        The relative change (0 when equal).
    """
    _check_pair(k0, k1)
    return float(_stats(k0, k1).relative_change())


def kernel_distance(k0: Tensor, k1: Tensor) -> float:
    """Kernel distance ``1 - <K0, K1>_F / (||K0||_F ||K1||_F)`` (0 when parallel).

    Args:
        k0: Kernel ``(N, M)``.
        k1: Kernel ``(N, M)``.

    Returns:
        A float in ``[0, 2]``.
    """
    _check_pair(k0, k1)
    return float(_stats(k0, k1).distance())


def centered_alignment(k0: Tensor, k1: Tensor) -> float:
    """Centered kernel alignment (CKA) ``<HK0H, HK1H> / (||HK0H|| ||HK1H||)``.

    ``H = I - 11^T/N`` is the centering matrix.

    Args:
        k0: Square kernel ``(N, N)``.
        k1: Square kernel ``(N, N)``.

    Returns:
        A float in ``[-1, 1]`` (1 when the centered kernels are parallel).
    """
    _check_pair(k0, k1, square=True)
    return float(_stats(k0, k1).centered_alignment())


def one_hot_targets(targets: Tensor, num_classes: int | None = None) -> Tensor:
    """Targets as a float ``(N, C)`` matrix: integer labels ``(N,)`` are one-hot encoded.

    Args:
        targets: Integer labels ``(N,)`` or float targets ``(N,)`` / ``(N, C)``.
        num_classes: Number of classes for integer labels (default ``max + 1``).

    Returns:
        ``(N, C)`` float tensor (float64 for integer labels).

    Raises:
        TypeError: ``targets`` is not a tensor.
        ValueError: Integer labels that are not ``(N,)``.
    """
    if not isinstance(targets, Tensor):
        raise TypeError(
            f"expected targets as a torch.Tensor, got {type(targets).__name__}"
        )
    if not targets.is_floating_point():
        if targets.dim() != 1:
            raise ValueError(
                f"expected integer labels of shape (N,), got {tuple(targets.shape)}"
            )
        c = int(targets.max()) + 1 if num_classes is None else num_classes
        return torch.nn.functional.one_hot(targets.long(), c).double()
    return targets.reshape(len(targets), -1)


def kernel_target_alignment(
    k: Tensor, targets: Tensor, num_classes: int | None = None
) -> float:
    """Centered kernel-target alignment: CKA between ``K`` and ``Y Y^T``.

    Args:
        k: Square kernel ``(N, N)``.
        targets: Integer labels ``(N,)`` (one-hot encoded) or float targets ``(N, C)``.
        num_classes: Classes for integer labels (default ``max + 1``).

    Returns:
        The centered alignment of ``K`` with ``Y Y^T``, a float in ``[-1, 1]``.

    Raises:
        ValueError: ``k`` is not square, or the targets do not match its rows.
    """
    _check_kernel(k, "k", square=True)
    y = one_hot_targets(targets, num_classes).to(device=k.device, dtype=k.dtype)
    if len(y) != len(k):
        raise ValueError(
            f"expected one target per kernel row ({len(k)}), got {len(y)}; pass the "
            "targets of the probe batch the kernel was computed on"
        )
    return centered_alignment(k, y @ y.T)


def eigenvalues(k: Tensor, top: int | None = None) -> Tensor:
    """Eigenvalues of a symmetric ``(N, N)`` matrix, largest first.

    Args:
        k: Symmetric matrix (symmetrized as ``(K + K^T)/2`` against round-off).
        top: Keep only the ``top`` largest (default all).

    Returns:
        ``(top,)`` or ``(N,)`` tensor, descending.
    """
    _check_kernel(k, "k", square=True)
    vals = torch.linalg.eigvalsh((k + k.T) / 2).flip(0)
    return vals if top is None else vals[:top]


def effective_rank(eigs: Tensor, kind: str = "participation") -> float:
    """Effective rank of a spectrum.

    ``"participation"``: ``(sum l)^2 / sum l^2``. ``"entropy"``: ``exp(-sum p log p)``
    with ``p = l / sum l``. Negative eigenvalues (round-off of a PSD kernel) are
    clipped to 0.

    Args:
        eigs: Eigenvalues ``(N,)``, or a symmetric matrix ``(N, N)`` (its spectrum is used).
        kind: ``"participation"`` or ``"entropy"``.

    Returns:
        A float in ``[1, N]`` (0 for an all-zero spectrum).

    Raises:
        ValueError: Unknown ``kind``.
    """
    if kind not in ("participation", "entropy"):
        raise ValueError(f"expected kind 'participation' or 'entropy', got {kind!r}")
    if isinstance(eigs, Tensor) and eigs.dim() == 2:
        eigs = eigenvalues(eigs)
    lam = torch.as_tensor(eigs).double().clamp_min(0)
    total = lam.sum()
    if total <= 0:
        return 0.0
    if kind == "participation":
        return float(total**2 / (lam**2).sum())
    p = lam / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


class _GramOperator(LinearOperator):
    """``v -> W^T W v`` (or ``W W^T v`` on the smaller side) without forming the Gram."""

    def __init__(self, m: Tensor) -> None:
        self.m = m if m.shape[0] >= m.shape[1] else m.T
        self.shape = (self.m.shape[1], self.m.shape[1])
        self.dtype, self.device = m.dtype, m.device

    def _matmat(self, matrix: Tensor) -> Tensor:
        return self.m.T @ (self.m @ matrix)


def operator_norm(w: Tensor, *, exact_below: int = 256, tol: float = 1e-9) -> float:
    """Spectral norm (largest singular value) of a matrix.

    Matrices whose smaller side is below ``exact_below`` use ``svdvals``; larger ones
    run Lanczos (:func:`rdiag.linalg.lanczos`) on ``W^T W`` without forming it, to a
    relative residual ``tol`` (eigenvalue error about ``tol**2 / gap``), which is
    tens of times faster than an SVD at width 1024.

    Args:
        w: ``(out, in)`` matrix.
        exact_below: Size threshold for the dense route.
        tol: Lanczos tolerance.

    Returns:
        ``||W||_op``.
    """
    if min(w.shape) < exact_below:
        return float(torch.linalg.svdvals(w)[0])

    top = lanczos(_GramOperator(w), k=1, tol=tol).eigenvalues[0]
    return float(top.clamp_min(0).sqrt())


def matrix_norms(w: Tensor, *, exact_below: int = 256) -> tuple[float, float]:
    """Operator (spectral) and Frobenius norms of a weight.

    Args:
        w: ``(out, in)`` matrix, or a conv kernel ``(out, in, *k)`` read as
            ``(out, in * prod(k))``; a vector ``(n,)`` is read as a column.
        exact_below: See :func:`operator_norm`.

    Returns:
        ``(operator_norm, frobenius_norm)``.

    Raises:
        ValueError: ``w`` is not a tensor with at least one dimension.
    """
    if not isinstance(w, Tensor) or w.dim() == 0:
        raise ValueError(f"expected a weight tensor with >= 1 dims, got {w!r}")
    m = w.detach().reshape(w.shape[0], -1) if w.dim() > 1 else w.detach().reshape(-1, 1)
    m = m.double() if m.dtype in (torch.float16, torch.bfloat16) else m
    return operator_norm(m, exact_below=exact_below), float(torch.linalg.matrix_norm(m))


def representation_movement(h_t: Tensor, h_0: Tensor) -> float:
    """Mean over inputs of the Euclidean norm ``||h_t(x) - h_0(x)||``.

    Args:
        h_t: Representations ``(N, ...)`` now.
        h_0: Representations ``(N, ...)`` at the reference time.

    Returns:
        The movement averaged over the ``N`` inputs.

    Raises:
        ValueError: The shapes differ.
    """
    if h_t.shape != h_0.shape:
        raise ValueError(
            f"expected equal shapes, got {tuple(h_t.shape)} and {tuple(h_0.shape)}"
        )
    return float((h_t - h_0).reshape(len(h_t), -1).norm(dim=1).mean())


def _t_quantile(q: float, dof: int) -> float:
    """Quantile of Student's t (``q`` in (0.5, 1)); Simpson-integrated density + bisection."""
    c = math.exp(math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2)) / math.sqrt(
        dof * math.pi
    )

    def cdf(t: float) -> float:
        x = np.linspace(0.0, t, 4001)
        y = c * (1 + x**2 / dof) ** (-(dof + 1) / 2)
        h = t / 4000
        return 0.5 + h / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum())

    lo, hi = 0.0, 1.0
    while cdf(hi) < q:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return (lo + hi) / 2


def fit_exponent(
    widths: Sequence[float] | Tensor | np.ndarray,
    values: Sequence[float] | Tensor | np.ndarray,
    confidence: float = 0.95,
) -> tuple[float, tuple[float, float]]:
    """Log-log slope of ``values`` against ``widths`` with a t confidence interval.

    Least squares of ``log(value)`` on ``log(width)`` over all points; with several
    seeds pass one row per seed (``values`` of shape ``(W, S)`` against ``widths``
    ``(W,)``) or repeat the widths. The interval is ``slope ± t_{(1+c)/2, n-2} * se``
    with ``se = sqrt(RSS / (n - 2) / Sxx)``: it treats points as independent, so it
    reflects seed scatter, not finite-width bias.

    Args:
        widths: Widths ``(n,)`` or ``(W,)``, > 0.
        values: Positive values ``(n,)``, or ``(W, S)`` for ``S`` seeds per width.
        confidence: Coverage of the interval, in (0, 1).

    Returns:
        ``(slope, (lo, hi))``; the interval is ``(nan, nan)`` with exactly two points.

    Raises:
        ValueError: Fewer than two distinct widths, non-positive or non-finite
            values, or mismatched shapes.

    Example:
        >>> slope, (lo, hi) = fit_exponent([64, 128, 256, 512], [8.0, 4.1, 1.95, 1.02])
        >>> round(slope, 3), lo < slope < hi
        (-0.999, True)
    """
    # float64 from the start: a list of floats would become float32 (1e300 -> inf).
    x = np.asarray(torch.as_tensor(widths, dtype=torch.float64).cpu(), dtype=float)
    y = np.asarray(torch.as_tensor(values, dtype=torch.float64).cpu(), dtype=float)
    if y.ndim == 2 and x.ndim == 1 and len(x) == y.shape[0]:
        x = np.repeat(x, y.shape[1])
    y = y.reshape(-1)
    if x.shape != y.shape:
        raise ValueError(
            f"expected one value per width (or a (W, S) array), got widths {x.shape} and "
            f"values {np.shape(values)}"
        )
    if not (0 < confidence < 1):
        raise ValueError(f"expected confidence in (0, 1), got {confidence!r}")
    if not (np.all(np.isfinite(y)) and np.all(y > 0) and np.all(x > 0)):
        raise ValueError(
            "expected positive finite widths and values for a log-log fit, got values "
            f"{y.tolist()[:8]}; drop zero or diverged runs before fitting"
        )
    if len(np.unique(x)) < 2:
        raise ValueError(
            f"expected at least two distinct widths, got {np.unique(x).tolist()}"
        )
    slope, se = log_slope(np.log(x), np.log(y))
    if len(x) <= 2:
        return slope, (float("nan"), float("nan"))
    half = _t_quantile((1 + confidence) / 2, len(x) - 2) * se
    return slope, (slope - half, slope + half)


def log_slope(lx: np.ndarray, ly: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of ``ly`` on ``lx`` (1-D, already logarithms) and its standard error.

    The unchecked core of :func:`fit_exponent`, for resampling loops. The standard
    error is ``sqrt(RSS / (n - 2) / Sxx)`` (``nan`` with two points).
    """
    dx, dy = lx - lx.mean(), ly - ly.mean()
    sxx = float((dx**2).sum())
    slope = float((dx * dy).sum() / sxx)
    n = len(lx)
    if n <= 2:
        return slope, float("nan")
    resid = dy - slope * dx
    return slope, math.sqrt(float((resid**2).sum()) / (n - 2) / sxx)
