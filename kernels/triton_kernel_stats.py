"""One-pass sufficient statistics of two kernels ``K0, K1`` of shape ``(N, M)``.

Each program owns ``BLOCK_N`` rows and walks all columns once, reading every
entry of both kernels exactly once. Per-row sums (rows, inner products, squared
norms, squared differences) are complete per program; column sums come out as
per-program partials, reduced afterwards in float64 (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import KernelSums, check_kernel_pair, check_triton_dtype, interpreting

#: Rows of the per-row output: K0 1, K1 1, <K0,K1>, |K0|^2, |K1|^2, |K1-K0|^2.
_N_ROW_STATS = 6


def get_kernel_stats_configs() -> list[triton.Config]:
    """Autotune candidates (one small tile under the CPU interpreter)."""
    if interpreting():
        return [triton.Config({"BLOCK_N": 8, "BLOCK_M": 16})]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_M": bm}, num_warps=w)
        for bn, bm, w in (
            (16, 128, 4),
            (32, 128, 4),
            (32, 256, 8),
            (64, 64, 4),
            (8, 512, 4),
        )
    ]


@triton.autotune(
    configs=get_kernel_stats_configs(), key=["N", "M"], reset_to_zero=["cols_ptr"]
)
@triton.jit
def _kernel_stats_kernel(
    k0_ptr, k1_ptr, rows_ptr, cols_ptr,
    N, M,
    stride_k0n, stride_k0m, stride_k1n, stride_k1m,
    stride_rs, stride_cs, stride_cp,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    row0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    inner = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sq0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sq1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sqd = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        mask = mask_n[:, None] & mask_m[None, :]
        a = tl.load(
            k0_ptr + offs_n[:, None] * stride_k0n + offs_m[None, :] * stride_k0m,
            mask=mask,
            other=0.0,
        ).to(tl.float32)
        b = tl.load(
            k1_ptr + offs_n[:, None] * stride_k1n + offs_m[None, :] * stride_k1m,
            mask=mask,
            other=0.0,
        ).to(tl.float32)
        d = b - a
        row0 += tl.sum(a, axis=1)
        row1 += tl.sum(b, axis=1)
        inner += tl.sum(a * b, axis=1)
        sq0 += tl.sum(a * a, axis=1)
        sq1 += tl.sum(b * b, axis=1)
        sqd += tl.sum(d * d, axis=1)
        col_ptrs = cols_ptr + pid * stride_cp + offs_m
        tl.store(col_ptrs, tl.sum(a, axis=0), mask=mask_m)
        tl.store(col_ptrs + stride_cs, tl.sum(b, axis=0), mask=mask_m)
    tl.store(rows_ptr + offs_n, row0, mask=mask_n)
    tl.store(rows_ptr + stride_rs + offs_n, row1, mask=mask_n)
    tl.store(rows_ptr + 2 * stride_rs + offs_n, inner, mask=mask_n)
    tl.store(rows_ptr + 3 * stride_rs + offs_n, sq0, mask=mask_n)
    tl.store(rows_ptr + 4 * stride_rs + offs_n, sq1, mask=mask_n)
    tl.store(rows_ptr + 5 * stride_rs + offs_n, sqd, mask=mask_n)


def kernel_stats(k0: Tensor, k1: Tensor) -> KernelSums:
    """Launch one program per ``BLOCK_N`` rows; reduce the partials in float64.

    Args:
        k0: Kernel ``(N, M)``, float16/bfloat16/float32.
        k1: Kernel ``(N, M)``, same dtype and device.

    Returns:
        The :class:`~rdiag.kernels._launch.KernelSums` (float32 vectors).

    Raises:
        TypeError: float64 kernels (the dispatcher sends those to the reference).
        ValueError: Shapes, dtypes or devices disagree.
    """
    n, m = check_kernel_pair(k0, k1)
    check_triton_dtype(k0)
    dev = k0.device
    rows = torch.zeros((_N_ROW_STATS, n), dtype=torch.float32, device=dev)
    # Sized for the smallest BLOCK_N of the configs, so any config's grid fits.
    min_block = min(c.kwargs["BLOCK_N"] for c in get_kernel_stats_configs())
    cols = torch.zeros(
        (triton.cdiv(n, min_block), 2, m), dtype=torch.float32, device=dev
    )
    if n * m > 0:

        def grid(meta: dict) -> tuple[int]:
            return (triton.cdiv(n, meta["BLOCK_N"]),)

        _kernel_stats_kernel[grid](
            k0, k1, rows, cols, n, m,
            *k0.stride(), *k1.stride(), rows.stride(0), cols.stride(1), cols.stride(0),
        )  # fmt: skip
        # Autotuning runs every config; partial rows past the chosen config's grid
        # may hold another config's sums, so reduce only the rows it wrote.
        used = triton.cdiv(n, _kernel_stats_kernel.best_config.kwargs["BLOCK_N"])
        cols = cols[:used]
    totals = rows.double().sum(1).tolist()
    col = cols.double().sum(0)
    return KernelSums(
        inner=totals[2],
        sq_norm0=totals[3],
        sq_norm1=totals[4],
        sq_diff=totals[5],
        row0=rows[0],
        row1=rows[1],
        col0=col[0].float(),
        col1=col[1].float(),
        sum0=totals[0],
        sum1=totals[1],
    )
