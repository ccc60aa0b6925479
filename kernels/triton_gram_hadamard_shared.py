"""Fused weight-shared Gram-Hadamard kernel (tokens, or conv patches via unfold).

``out[i,j,a,b] += s * sum_{t,t'} (x1_it . x2_jt')(g1_iat . g2_jbt')``. One program
per sample pair ``(i, j)`` walks the ``T1 x T2`` token pairs tile by tile, like
flash attention: an input-Gram tile is built once, multiplied by each
cotangent-Gram tile ``(a, b)`` and reduced at once, so no ``(N T) x (N T)`` Gram
is ever written. The ``R x R`` partial sums live in one register vector.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ._launch import (
    check_gram_hadamard_shared_args,
    check_triton_dtype,
    dot_precision,
    interpreter_safe,
    interpreting,
    next_power_of_2,
    prepare_out,
)


def get_gram_hadamard_shared_configs() -> list[triton.Config]:
    """Autotune candidates (one small tile under the CPU interpreter)."""
    if interpreting():
        return [triton.Config({"BLOCK_T1": 16, "BLOCK_T2": 16, "BLOCK_K": 16})]
    return [
        triton.Config(
            {"BLOCK_T1": b1, "BLOCK_T2": b2, "BLOCK_K": bk}, num_warps=w, num_stages=s
        )
        for b1, b2, bk, w, s in (
            (16, 16, 32, 1, 3),
            (32, 32, 32, 2, 3),
            (64, 64, 32, 4, 3),
            (64, 64, 64, 4, 2),
            (128, 64, 32, 8, 3),
        )
    ]


@triton.autotune(
    configs=get_gram_hadamard_shared_configs(),
    key=["T1", "T2", "R", "DX", "DG"],
    restore_value=["out_ptr"],
)
@triton.jit
def _gram_hadamard_shared_kernel(
    x1_ptr, x2_ptr, g1_ptr, g2_ptr, out_ptr, scale,
    N2, T1, T2, R, DX, DG,
    stride_x1n, stride_x1t, stride_x1d,
    stride_x2n, stride_x2t, stride_x2d,
    stride_g1n, stride_g1r, stride_g1t, stride_g1d,
    stride_g2n, stride_g2r, stride_g2t, stride_g2d,
    stride_on1, stride_on2, stride_or1, stride_or2,
    INPUT_PRECISION: tl.constexpr, BLOCK_RR: tl.constexpr,
    BLOCK_T1: tl.constexpr, BLOCK_T2: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    i = pid // N2
    j = pid % N2
    x1_ptr += i * stride_x1n
    x2_ptr += j * stride_x2n
    g1_ptr += i * stride_g1n
    g2_ptr += j * stride_g2n
    offs_k = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_RR)
    acc = tl.zeros((BLOCK_RR,), dtype=tl.float32)

    for t0 in range(0, T1, BLOCK_T1):
        offs_t = t0 + tl.arange(0, BLOCK_T1)
        mask_t = offs_t < T1
        for u0 in range(0, T2, BLOCK_T2):
            offs_u = u0 + tl.arange(0, BLOCK_T2)
            mask_u = offs_u < T2
            xx = tl.zeros((BLOCK_T1, BLOCK_T2), dtype=tl.float32)
            for k0 in range(0, DX, BLOCK_K):
                kk = k0 + offs_k
                a = tl.load(
                    x1_ptr + offs_t[:, None] * stride_x1t + kk[None, :] * stride_x1d,
                    mask=mask_t[:, None] & (kk[None, :] < DX),
                    other=0.0,
                )
                b = tl.load(
                    x2_ptr + offs_u[None, :] * stride_x2t + kk[:, None] * stride_x2d,
                    mask=mask_u[None, :] & (kk[:, None] < DX),
                    other=0.0,
                )
                xx = tl.dot(a, b, xx, input_precision=INPUT_PRECISION)
            for ra in range(R):
                for rb in range(R):
                    gg = tl.zeros((BLOCK_T1, BLOCK_T2), dtype=tl.float32)
                    for k0 in range(0, DG, BLOCK_K):
                        kk = k0 + offs_k
                        a = tl.load(
                            g1_ptr
                            + ra * stride_g1r
                            + offs_t[:, None] * stride_g1t
                            + kk[None, :] * stride_g1d,
                            mask=mask_t[:, None] & (kk[None, :] < DG),
                            other=0.0,
                        )
                        b = tl.load(
                            g2_ptr
                            + rb * stride_g2r
                            + offs_u[None, :] * stride_g2t
                            + kk[:, None] * stride_g2d,
                            mask=mask_u[None, :] & (kk[:, None] < DG),
                            other=0.0,
                        )
                        gg = tl.dot(a, b, gg, input_precision=INPUT_PRECISION)
                    part = tl.sum(tl.sum(xx * gg, axis=1), axis=0)
                    acc = tl.where(rr == ra * R + rb, acc + part, acc)

    mask_rr = rr < R * R
    o_ptrs = (
        out_ptr
        + i * stride_on1
        + j * stride_on2
        + (rr // R) * stride_or1
        + (rr % R) * stride_or2
    )
    o = tl.load(o_ptrs, mask=mask_rr, other=0.0)
    tl.store(o_ptrs, o + scale * acc, mask=mask_rr)


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
    """Validate, allocate and launch one program per sample pair.

    Args:
        x1: ``(N1, T1, Dx)``; float16/bfloat16/float32.
        x2: ``(N2, T2, Dx)``.
        g1: ``(N1, R, T1, Dg)``.
        g2: ``(N2, R, T2, Dg)``.
        out: ``(N1, N2, R, R)`` float32/float64 accumulator or None (float32 zeros).
        scale: Multiplier of this term.
        allow_tf32: Use TF32 tensor cores for float32 inputs.

    Returns:
        ``out`` ``(N1, N2, R, R)``.

    Raises:
        TypeError: float64 inputs (the dispatcher sends those to the reference).
        ValueError: Shapes, dtypes or devices disagree.
    """
    shape = check_gram_hadamard_shared_args(x1, x2, g1, g2)
    check_triton_dtype(x1)
    out = prepare_out(out, shape, x1)
    n1, n2, t1, t2, r, dx, dg = shape
    if n1 * n2 * r * t1 * t2 == 0:
        return out
    x1, x2, g1, g2 = interpreter_safe(x1, x2, g1, g2)
    _gram_hadamard_shared_kernel[(n1 * n2,)](
        x1, x2, g1, g2, out, float(scale),
        n2, t1, t2, r, dx, dg,
        *x1.stride(), *x2.stride(), *g1.stride(), *g2.stride(), *out.stride(),
        INPUT_PRECISION=dot_precision(x1.dtype, allow_tf32),
        BLOCK_RR=next_power_of_2(r * r),
    )  # fmt: skip
    return out
