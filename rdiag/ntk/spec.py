"""What an eNTK implementation is asked to compute (shared by all implementations)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rdiag.functional import FunctionalModel, accumulation_dtype


@dataclass(frozen=True)
class NTKSpec:
    """The request every implementation receives.

    Attributes:
        trace_outputs: Sum the kernel over output units (``(N1, N2)``) instead of
            the full ``(N1, N2, O, O)``.
        diagonal: Only ``K(x_i, x_i)``: ``(N,)`` or ``(N, O, O)``; symmetric case only.
        weights: Selected parameter name -> weight (``K = J diag(w) J^T``).
        block_size: Tile size over samples (at least 1).
        budget: Bytes of working memory an implementation may use.
        num_outputs: ``O``, the flattened output size per sample.
        per_layer: Whether the caller wants per-layer kernels; implementations for
            which they cost extra may return ``{"all": total}`` when it is false.
        whole_batch: Differentiate the whole-batch function instead of vmapping
            over samples: a batch-coupled model (train-mode batch norm), or one
            whose ``forward`` cannot run under ``vmap`` (data-dependent Python
            control flow); exact either way, about ``N`` times the cost.
    """

    trace_outputs: bool
    diagonal: bool
    weights: dict[str, float]
    block_size: int
    budget: float
    num_outputs: int
    per_layer: bool = True
    whole_batch: bool = False


def kernel_shape(spec: NTKSpec, n1: int, n2: int) -> tuple[int, ...]:
    """Shape of one kernel for this spec."""
    o = spec.num_outputs
    if spec.diagonal:
        return (n1,) if spec.trace_outputs else (n1, o, o)
    return (n1, n2) if spec.trace_outputs else (n1, n2, o, o)


def kernel_dtype(fm: FunctionalModel) -> torch.dtype:
    """Accumulation dtype: the parameters' dtype, at least float32."""
    return accumulation_dtype(fm.param_dtype)


def kernel_itemsize(fm: FunctionalModel) -> int:
    """Bytes per entry of a kernel (and of Jacobian rows) in the accumulation dtype."""
    return torch.finfo(kernel_dtype(fm)).bits // 8


def empty_kernels(
    fm: FunctionalModel, spec: NTKSpec, n1: int, n2: int, keys: list[str] | None = None
) -> dict[str, Tensor]:
    """Zero-filled kernels, one per key (default: layers with a non-zero weight)."""
    if keys is None:
        keys = [
            k
            for k, names in fm.groups.items()
            if any(spec.weights[n] != 0.0 for n in names)
        ]
    shape = kernel_shape(spec, n1, n2)
    return {
        k: torch.zeros(shape, dtype=kernel_dtype(fm), device=fm.device) for k in keys
    }
