"""The one linear-operator interface that every solver and estimator sees."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from rdiag._optional import Notices, require


class LinearOperator(ABC):
    """A square symmetric linear map ``A: R^D -> R^D`` known only through products.

    Subclasses implement :meth:`_matmat` and set ``shape``, ``dtype`` and ``device``.
    Solvers in :mod:`rdiag.linalg` use nothing else.

    Attributes:
        shape: ``(D, D)``.
        dtype: dtype of the vectors the operator takes and returns.
        device: Device of those vectors.
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    @abstractmethod
    def _matmat(self, matrix: Tensor) -> Tensor:
        """Return ``A @ matrix`` for a ``(D, K)`` matrix (already validated)."""

    def matmat(self, matrix: Tensor) -> Tensor:
        """``A @ matrix``.

        Args:
            matrix: ``(D, K)`` tensor.

        Returns:
            ``(D, K)`` tensor in ``self.dtype`` on ``self.device``.

        Raises:
            ValueError: ``matrix`` is not ``(D, K)``.
        """
        if (
            not isinstance(matrix, Tensor)
            or matrix.dim() != 2
            or matrix.shape[0] != self.shape[1]
        ):
            got = (
                tuple(matrix.shape)
                if isinstance(matrix, Tensor)
                else type(matrix).__name__
            )
            raise ValueError(
                f"expected a ({self.shape[1]}, K) matrix for {type(self).__name__}, got {got}"
            )
        out = self._matmat(matrix.to(device=self.device, dtype=self.dtype))
        if not bool(torch.isfinite(out).all()):
            if not hasattr(self, "_notices"):
                self._notices = Notices()
            self._notices.say(
                "not-finite",
                f"{type(self).__name__}: a product holds NaN or inf entries; check "
                "that the weights, inputs and targets are finite",
            )
        return out

    def matvec(self, vector: Tensor) -> Tensor:
        """``A @ vector`` for a ``(D,)`` vector; returns ``(D,)``.

        Raises:
            ValueError: ``vector`` is not ``(D,)``.
        """
        if not isinstance(vector, Tensor) or vector.shape != (self.shape[1],):
            got = (
                tuple(vector.shape)
                if isinstance(vector, Tensor)
                else type(vector).__name__
            )
            raise ValueError(
                f"expected a flat vector of {self.shape[1]} entries for "
                f"{type(self).__name__}, got {got}"
            )
        return self.matmat(vector.unsqueeze(1)).squeeze(1)

    def __matmul__(self, other: Tensor) -> Tensor:
        return self.matvec(other) if other.dim() == 1 else self.matmat(other)

    def to_dense(self) -> Tensor:
        """Materialize ``A`` as a ``(D, D)`` tensor (D products; for tests and small D)."""
        return self.matmat(
            torch.eye(self.shape[1], dtype=self.dtype, device=self.device)
        )

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` view (float64 numpy in and out)."""
        sla = require("scipy.sparse.linalg", "LinearOperator.to_scipy")

        def mv(v: Any) -> Any:
            t = torch.as_tensor(v, device=self.device).reshape(self.shape[1], -1)
            return self.matmat(t).detach().cpu().double().numpy().reshape(v.shape)

        return sla.LinearOperator(
            self.shape, matvec=mv, matmat=mv, rmatvec=mv, dtype="float64"
        )


class DenseOperator(LinearOperator):
    """A symmetric matrix held in memory, as an operator (tests, small problems).

    Args:
        matrix: ``(D, D)`` symmetric tensor.
    """

    def __init__(self, matrix: Tensor) -> None:
        if not isinstance(matrix, Tensor):
            raise TypeError(
                f"expected a (D, D) torch.Tensor, got {type(matrix).__name__}; "
                "convert it with torch.as_tensor(..., dtype=torch.float64)"
            )
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(
                f"expected a square matrix, got shape {tuple(matrix.shape)}"
            )
        if not matrix.is_floating_point():
            raise ValueError(
                f"expected a floating-point matrix, got {matrix.dtype}; convert it "
                "with .double()"
            )
        if matrix.numel():
            skew = float((matrix - matrix.T).abs().max())
            scale = float(matrix.abs().max())
            if skew > 100 * torch.finfo(matrix.dtype).eps * scale:
                raise ValueError(
                    "expected a symmetric matrix (the solvers assume one), got one "
                    f"whose largest |A - A^T| entry is {skew:.3g}; pass (A + A^T) / 2"
                )
        self.matrix = matrix
        self.shape = (matrix.shape[0], matrix.shape[1])
        self.dtype = matrix.dtype
        self.device = matrix.device

    def _matmat(self, matrix: Tensor) -> Tensor:
        return self.matrix @ matrix


class ScaledOperator(LinearOperator):
    """``D^{1/2} A D^{1/2}`` for a diagonal ``D`` given as a ``(D,)`` non-negative vector.

    The symmetric form of a preconditioned operator: its eigenvalues equal those of
    ``D A`` (e.g. the per-layer-learning-rate sharpness ``lambda_max(M^1/2 H M^1/2)``).
    """

    def __init__(self, operator: LinearOperator, diagonal: Tensor) -> None:
        if diagonal.shape != (operator.shape[0],) or bool((diagonal < 0).any()):
            raise ValueError(
                f"expected a non-negative ({operator.shape[0]},) diagonal, got "
                f"shape {tuple(diagonal.shape)}"
            )
        self.operator = operator
        self.root = diagonal.to(device=operator.device, dtype=operator.dtype).sqrt()
        self.shape, self.dtype, self.device = (
            operator.shape,
            operator.dtype,
            operator.device,
        )

    def _matmat(self, matrix: Tensor) -> Tensor:
        return self.root[:, None] * self.operator.matmat(self.root[:, None] * matrix)
