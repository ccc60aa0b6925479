"""Fused Gram-Hadamard kernel: ``out[i,j,a,b] += s (x1_i . x2_j)(g1_ia . g2_jb)``.

Each program owns one ``(BLOCK_M, BLOCK_N)`` tile of sample pairs: it builds the
input-Gram tile once in registers, then for every output pair ``(a, b)`` the
cotangent-Gram tile, and adds their product into ``out``. Neither Gram ever
reaches memory. Layers of one shape are stacked on a leading term axis and
handled in the same launch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import (
    check_gram_hadamard_args,
    check_terms,
    check_triton_dtype,
    dot_precision,
    interpreter_safe,
    interpreting,
    prepare_out,
)


def get_gram_hadamard_configs() -> list[triton.Config]:
    """Autotune candidates (one small tile under the CPU interpreter)."""
    if interpreting():
        return [
            triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2})
        ]
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
            num_warps=w,
            num_stages=s,
        )
        for bm, bn, bk, w, s in (
            (32, 32, 32, 2, 4),
            (64, 64, 32, 4, 3),
            (64, 128, 32, 4, 3),
            (128, 64, 32, 4, 3),
            (128, 128, 32, 8, 3),
            (64, 64, 64, 4, 2),
        )
    ]


@triton.autotune(
    configs=get_gram_hadamard_configs(),
    key=["N1", "N2", "R", "DX", "DG"],
    restore_value=["out_ptr"],
)
@triton.jit
def _gram_hadamard_kernel(
    x1_ptr, x2_ptr, g1_ptr, g2_ptr, scale_ptr, out_ptr,
    N1, N2, R, DX, DG, T,
    stride_x1t, stride_x1n, stride_x1d,
    stride_x2t, stride_x2n, stride_x2d,
    stride_g1t, stride_g1n, stride_g1r, stride_g1d,
    stride_g2t, stride_g2n, stride_g2r, stride_g2d,
    stride_on1, stride_on2, stride_or1, stride_or2,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    # Grouped tile order (Triton matmul tutorial): neighbouring programs share rows.
    pid = tl.program_id(0)
    num_m = tl.cdiv(N1, BLOCK_M)
    num_n = tl.cdiv(N2, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group
    pid_n = (pid % width) // group

    # int64 offsets: N1 * N2 * R * R output entries can pass 2**31.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < N1
    mask_n = offs_n < N2
    mask_mn = mask_m[:, None] & mask_n[None, :]

    for t in range(T):
        xx = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, DX, BLOCK_K):
            kk = k0 + offs_k
            a = tl.load(
                x1_ptr
                + t * stride_x1t
                + offs_m[:, None] * stride_x1n
                + kk[None, :] * stride_x1d,
                mask=mask_m[:, None] & (kk[None, :] < DX),
                other=0.0,
            )
            b = tl.load(
                x2_ptr
                + t * stride_x2t
                + offs_n[None, :] * stride_x2n
                + kk[:, None] * stride_x2d,
                mask=mask_n[None, :] & (kk[:, None] < DX),
                other=0.0,
            )
            xx = tl.dot(a, b, xx, input_precision=INPUT_PRECISION)
        xx = xx * tl.load(scale_ptr + t)
        for ra in range(R):
            for rb in range(R):
                gg = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for k0 in range(0, DG, BLOCK_K):
                    kk = k0 + offs_k
                    a = tl.load(
                        g1_ptr
                        + t * stride_g1t
                        + offs_m[:, None] * stride_g1n
                        + ra * stride_g1r
                        + kk[None, :] * stride_g1d,
                        mask=mask_m[:, None] & (kk[None, :] < DG),
                        other=0.0,
                    )
                    b = tl.load(
                        g2_ptr
                        + t * stride_g2t
                        + offs_n[None, :] * stride_g2n
                        + rb * stride_g2r
                        + kk[:, None] * stride_g2d,
                        mask=mask_n[None, :] & (kk[:, None] < DG),
                        other=0.0,
                    )
                    gg = tl.dot(a, b, gg, input_precision=INPUT_PRECISION)
                o_ptrs = (
                    out_ptr
                    + offs_m[:, None] * stride_on1
                    + offs_n[None, :] * stride_on2
                    + ra * stride_or1
                    + rb * stride_or2
                )
                o = tl.load(o_ptrs, mask=mask_mn, other=0.0)
                tl.store(o_ptrs, o + xx * gg, mask=mask_mn)


def gram_hadamard_many(
    terms: Sequence[tuple[Tensor, Tensor, Tensor, Tensor, float]],
    out: Tensor | None = None,
    *,
    allow_tf32: bool = False,
) -> Tensor:
    """Launch the fused kernel once per group of same-shape terms.

    Args:
        terms: ``(x1, x2, g1, g2, scale)`` with ``x1 (N1, Dx)``, ``x2 (N2, Dx)``,
            ``g1 (N1, R, Dg)``, ``g2 (N2, R, Dg)``; float16/bfloat16/float32.
        out: ``(N1, N2, R, R)`` float32/float64 accumulator or None (float32 zeros).
        allow_tf32: Use TF32 tensor cores for float32 inputs.

    Returns:
        ``out`` ``(N1, N2, R, R)``.

    Raises:
        TypeError: float64 inputs (use the reference) or unsupported dtypes.
        ValueError: Shapes disagree within a term or across terms.
    """
    terms = check_terms(terms)
    groups: dict[tuple, list[tuple[Tensor, Tensor, Tensor, Tensor, float]]] = {}
    first = None
    for x1, x2, g1, g2, scale in terms:
        shape = check_gram_hadamard_args(x1, x2, g1, g2)
        check_triton_dtype(x1)
        first = first or (shape, x1)
        if (
            shape[:2] + shape[4:5] != first[0][:2] + first[0][4:5]
            or x1.device != first[1].device
        ):
            raise ValueError(
                "expected every term to share (N1, N2, R) and the device, got "
                f"{shape} on "
                f"{x1.device} after {first[0]} on {first[1].device}"
            )
        groups.setdefault((shape, x1.dtype), []).append((x1, x2, g1, g2, float(scale)))
    out = prepare_out(out, first[0], first[1])
    for (shape, _), group in groups.items():
        _launch(shape, group, out, allow_tf32)
    return out


def gram_hadamard(
    x1: Tensor,
    x2: Tensor,
    g1: Tensor,
    g2: Tensor,
    out: Tensor | None = None,
    *,
    scale: float = 1.0,
    allow_tf32: bool = False,
) -> Tensor:
    """One term of :func:`gram_hadamard_many` (same shapes and dtypes)."""
    return gram_hadamard_many([(x1, x2, g1, g2, scale)], out, allow_tf32=allow_tf32)


def _stack(tensors: list[Tensor]) -> Tensor:
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _launch(shape, group, out: Tensor, allow_tf32: bool) -> None:
    n1, n2, _, _, r, dx, dg = shape
    if n1 == 0 or n2 == 0 or r == 0:
        return
    x1, x2, g1, g2 = (_stack([term[k] for term in group]) for k in range(4))
    x1, x2, g1, g2 = interpreter_safe(x1, x2, g1, g2)
    scales = torch.tensor(
        [term[4] for term in group], dtype=torch.float32, device=out.device
    )

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(n1, meta["BLOCK_M"]) * triton.cdiv(n2, meta["BLOCK_N"]),)

    _gram_hadamard_kernel[grid](
        x1, x2, g1, g2, scales, out,
        n1, n2, r, dx, dg, len(group),
        *x1.stride(), *x2.stride(), *g1.stride(), *g2.stride(), *out.stride(),
        INPUT_PRECISION=dot_precision(x1.dtype, allow_tf32),
    )  # fmt: skip
