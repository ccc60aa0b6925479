"""Blocked attention in Triton: forward, forward mode (JVP) and backward.

The same operator as :mod:`rdiag.attention` (its torch implementation is the
reference): ``o = softmax(q k^T * scale + mask) v`` with the row log-sum-exp
``lse``, one ``(BLOCK_M, BLOCK_N)`` tile of scores in registers at a time.

- forward: one program per ``(BLOCK_M queries, batch-head)``; an online softmax
  over blocks of keys writes ``o`` and ``lse``;
- JVP: the same loop from the saved ``lse`` gives ``d lse = sum p t`` and
  ``d o = sum (p t) v + p dv - d lse * o`` (``t`` the scores' tangent);
- backward: ``dq`` per block of queries, ``dk, dv`` per block of keys (loops over
  the other axis), from ``lse`` and ``D = rowsum(go * o) - glse``.

Inputs are ``(BH, L, E)`` / ``(BH, S, E)`` / ``(BH, S, Ev)`` (batch and heads
flattened; grouped-query heads repeated by the caller), any strides; the mask is
boolean (``True`` attends) or additive, broadcast to ``(BH, L, S)`` by strides
(stride 0 on broadcast axes), or ``None``. Everything accumulates in float32;
rows with no key to attend give zeros. float64 runs on the torch operator.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import check_triton_dtype, dot_precision, interpreting, next_power_of_2

__all__ = ["attention_backward", "attention_forward", "attention_jvp"]


def get_attention_configs() -> list[triton.Config]:
    """Autotune candidates (one small tile under the CPU interpreter)."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16})]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in (
            (64, 64, 4, 2),
            (64, 32, 4, 3),
            (128, 64, 8, 2),
            (128, 32, 4, 3),
            (32, 64, 4, 3),
        )
    ]


_KEY = ["L", "S", "BLOCK_E", "BLOCK_EV", "HAS_MASK", "CAUSAL"]


@triton.jit
def _tile(ptr, rows, cols, n_rows, n_cols, s_row, s_col):
    """A zero-padded ``(rows, cols)`` float32 tile of a 2-D strided view."""
    return tl.load(
        ptr + rows[:, None] * s_row + cols[None, :] * s_col,
        mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols),
        other=0.0,
    ).to(tl.float32)


@triton.jit
def _scores(
    q, kt, offs_m, offs_n, L, S, scale,
    mask_ptr, s_mm, s_mn,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, CAUSAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Masked scores of one tile, ``-inf`` where masked or out of range."""
    s = tl.dot(q, kt, input_precision=INPUT_PRECISION) * scale
    keep = (offs_n[None, :] < S) & (offs_m[:, None] >= 0)
    if HAS_MASK:
        inside = (offs_m[:, None] < L) & (offs_n[None, :] < S)
        ptrs = mask_ptr + offs_m[:, None] * s_mm + offs_n[None, :] * s_mn
        if MASK_BOOL:
            keep = keep & (tl.load(ptrs, mask=inside, other=0) != 0)
        else:
            s = s + tl.load(ptrs, mask=inside, other=0.0).to(tl.float32)
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None])
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _probabilities(s, lse):
    """``exp(s - lse)`` per row; rows with nothing to attend give zeros."""
    ref = tl.where(lse == float("-inf"), float("inf"), lse)
    return tl.exp(s - ref[:, None])


@triton.autotune(configs=get_attention_configs(), key=_KEY)
@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, lse_ptr,
    L, S, E, EV, scale,
    s_qb, s_qm, s_qe, s_kb, s_kn, s_ke, s_vb, s_vn, s_ve,
    s_mb, s_mm, s_mn, s_ob, s_om, s_oe, s_lb, s_lm,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, CAUSAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    q = _tile(q_ptr + bh * s_qb, offs_m, offs_e, L, E, s_qm, s_qe)
    mask_ptr += bh * s_mb
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)  # noqa: E741
    acc = tl.zeros((BLOCK_M, BLOCK_EV), tl.float32)
    for start in range(0, S, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        kt = _tile(k_ptr + bh * s_kb, offs_e, offs_n, E, S, s_ke, s_kn)
        v = _tile(v_ptr + bh * s_vb, offs_n, offs_ev, S, EV, s_vn, s_ve)
        s = _scores(q, kt, offs_m, offs_n, L, S, scale, mask_ptr, s_mm, s_mn,
                    HAS_MASK, MASK_BOOL, CAUSAL, INPUT_PRECISION)  # fmt: skip
        m_new = tl.maximum(m, tl.max(s, 1))
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - ref)
        p = tl.exp(s - ref[:, None])
        l = l * alpha + tl.sum(p, 1)  # noqa: E741
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=INPUT_PRECISION)
        m = m_new
    live = l > 0
    o = acc / tl.where(live, l, 1.0)[:, None]
    ref = tl.where(live, m, 0.0)
    lse = tl.where(live, ref + tl.log(tl.where(live, l, 1.0)), float("-inf"))
    rows = offs_m < L
    tl.store(
        o_ptr + bh * s_ob + offs_m[:, None] * s_om + offs_ev[None, :] * s_oe,
        o.to(o_ptr.dtype.element_ty),
        mask=rows[:, None] & (offs_ev[None, :] < EV),
    )
    tl.store(lse_ptr + bh * s_lb + offs_m * s_lm, lse, mask=rows)


@triton.autotune(configs=get_attention_configs(), key=_KEY)
@triton.jit
def _jvp_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, lse_ptr,
    dq_ptr, dk_ptr, dv_ptr, do_ptr, dlse_ptr,
    L, S, E, EV, scale,
    s_qb, s_qm, s_qe, s_kb, s_kn, s_ke, s_vb, s_vn, s_ve,
    s_mb, s_mm, s_mn, s_ob, s_om, s_oe, s_lb, s_lm,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, CAUSAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Tangents share their primals' layout (the launcher makes them so).
    bh = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    q = _tile(q_ptr + bh * s_qb, offs_m, offs_e, L, E, s_qm, s_qe)
    dq = _tile(dq_ptr + bh * s_qb, offs_m, offs_e, L, E, s_qm, s_qe)
    lse = tl.load(lse_ptr + bh * s_lb + offs_m * s_lm, mask=offs_m < L, other=0.0)
    mask_ptr += bh * s_mb
    dlse = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_EV), tl.float32)
    for start in range(0, S, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        kt = _tile(k_ptr + bh * s_kb, offs_e, offs_n, E, S, s_ke, s_kn)
        dkt = _tile(dk_ptr + bh * s_kb, offs_e, offs_n, E, S, s_ke, s_kn)
        v = _tile(v_ptr + bh * s_vb, offs_n, offs_ev, S, EV, s_vn, s_ve)
        dv = _tile(dv_ptr + bh * s_vb, offs_n, offs_ev, S, EV, s_vn, s_ve)
        s = _scores(q, kt, offs_m, offs_n, L, S, scale, mask_ptr, s_mm, s_mn,
                    HAS_MASK, MASK_BOOL, CAUSAL, INPUT_PRECISION)  # fmt: skip
        p = _probabilities(s, lse)
        t = tl.dot(dq, kt, input_precision=INPUT_PRECISION)
        t = (tl.dot(q, dkt, t, input_precision=INPUT_PRECISION)) * scale
        pt = p * t
        dlse += tl.sum(pt, 1)
        acc = tl.dot(pt, v, acc, input_precision=INPUT_PRECISION)
        acc = tl.dot(p, dv, acc, input_precision=INPUT_PRECISION)
    rows = offs_m < L
    o = _tile(o_ptr + bh * s_ob, offs_m, offs_ev, L, EV, s_om, s_oe)
    tl.store(
        do_ptr + bh * s_ob + offs_m[:, None] * s_om + offs_ev[None, :] * s_oe,
        (acc - dlse[:, None] * o).to(do_ptr.dtype.element_ty),
        mask=rows[:, None] & (offs_ev[None, :] < EV),
    )
    tl.store(dlse_ptr + bh * s_lb + offs_m * s_lm, dlse, mask=rows)


@triton.autotune(configs=get_attention_configs(), key=_KEY + ["TANGENT"])
@triton.jit
def _dq_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, go_ptr, lse_ptr, dd_ptr, dq_ptr,
    tq_ptr, tk_ptr, tv_ptr, tgo_ptr, tlse_ptr, tdd_ptr, tdq_ptr,
    L, S, E, EV, scale,
    s_qb, s_qm, s_qe, s_kb, s_kn, s_ke, s_vb, s_vn, s_ve,
    s_mb, s_mm, s_mn, s_ob, s_om, s_oe, s_lb, s_lm,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, CAUSAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, TANGENT: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # go shares o's layout, dq q's, dd (D) lse's; each tangent (t*) its primal's.
    # TANGENT: also the tangent of dq (forward over this reverse rule).
    bh = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    rows = offs_m < L
    q = _tile(q_ptr + bh * s_qb, offs_m, offs_e, L, E, s_qm, s_qe)
    go = _tile(go_ptr + bh * s_ob, offs_m, offs_ev, L, EV, s_om, s_oe)
    lse = tl.load(lse_ptr + bh * s_lb + offs_m * s_lm, mask=rows, other=0.0)
    dd = tl.load(dd_ptr + bh * s_lb + offs_m * s_lm, mask=rows, other=0.0)
    if TANGENT:
        tq = _tile(tq_ptr + bh * s_qb, offs_m, offs_e, L, E, s_qm, s_qe)
        tgo = _tile(tgo_ptr + bh * s_ob, offs_m, offs_ev, L, EV, s_om, s_oe)
        tlse = tl.load(tlse_ptr + bh * s_lb + offs_m * s_lm, mask=rows, other=0.0)
        tdd = tl.load(tdd_ptr + bh * s_lb + offs_m * s_lm, mask=rows, other=0.0)
    mask_ptr += bh * s_mb
    dq = tl.zeros((BLOCK_M, BLOCK_E), tl.float32)
    tdq = tl.zeros((BLOCK_M, BLOCK_E), tl.float32)
    for start in range(0, S, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        kt = _tile(k_ptr + bh * s_kb, offs_e, offs_n, E, S, s_ke, s_kn)
        vt = _tile(v_ptr + bh * s_vb, offs_ev, offs_n, EV, S, s_ve, s_vn)
        s = _scores(q, kt, offs_m, offs_n, L, S, scale, mask_ptr, s_mm, s_mn,
                    HAS_MASK, MASK_BOOL, CAUSAL, INPUT_PRECISION)  # fmt: skip
        p = _probabilities(s, lse)
        dp = tl.dot(go, vt, input_precision=INPUT_PRECISION)
        ds = p * (dp - dd[:, None])
        dq = tl.dot(ds, tl.trans(kt), dq, input_precision=INPUT_PRECISION)
        if TANGENT:
            tkt = _tile(tk_ptr + bh * s_kb, offs_e, offs_n, E, S, s_ke, s_kn)
            tvt = _tile(tv_ptr + bh * s_vb, offs_ev, offs_n, EV, S, s_ve, s_vn)
            tp = _p_tangent(q, kt, tq, tkt, p, tlse, scale, INPUT_PRECISION)
            tds = _ds_tangent(go, vt, tgo, tvt, p, tp, dp, dd, tdd, INPUT_PRECISION)
            tdq = tl.dot(tds, tl.trans(kt), tdq, input_precision=INPUT_PRECISION)
            tdq = tl.dot(ds, tl.trans(tkt), tdq, input_precision=INPUT_PRECISION)
    out = dq_ptr + bh * s_qb + offs_m[:, None] * s_qm + offs_e[None, :] * s_qe
    keep = rows[:, None] & (offs_e[None, :] < E)
    tl.store(out, (dq * scale).to(dq_ptr.dtype.element_ty), mask=keep)
    if TANGENT:
        out = tdq_ptr + bh * s_qb + offs_m[:, None] * s_qm + offs_e[None, :] * s_qe
        tl.store(out, (tdq * scale).to(tdq_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _p_tangent(q, kt, tq, tkt, p, tlse, scale, INPUT_PRECISION: tl.constexpr):
    """Tangent of ``p = exp(s - lse)``: ``p (s' - lse')``, ``s' = (q' k^T + q k'^T) scale``."""
    ts = tl.dot(tq, kt, input_precision=INPUT_PRECISION)
    ts = tl.dot(q, tkt, ts, input_precision=INPUT_PRECISION) * scale
    return p * (ts - tlse[:, None])


@triton.jit
def _ds_tangent(
    go, vt, tgo, tvt, p, tp, dp, dd, tdd, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Tangent of ``ds = p (dp - D)``: ``p' (dp - D) + p (dp' - D')``."""
    tdp = tl.dot(tgo, vt, input_precision=INPUT_PRECISION)
    tdp = tl.dot(go, tvt, tdp, input_precision=INPUT_PRECISION)
    return tp * (dp - dd[:, None]) + p * (tdp - tdd[:, None])


@triton.autotune(configs=get_attention_configs(), key=_KEY + ["TANGENT"])
@triton.jit
def _dkdv_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, go_ptr, lse_ptr, dd_ptr, dk_ptr, dv_ptr,
    tq_ptr, tk_ptr, tv_ptr, tgo_ptr, tlse_ptr, tdd_ptr, tdk_ptr, tdv_ptr,
    L, S, E, EV, scale,
    s_qb, s_qm, s_qe, s_kb, s_kn, s_ke, s_vb, s_vn, s_ve,
    s_mb, s_mm, s_mn, s_ob, s_om, s_oe, s_lb, s_lm,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, CAUSAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, TANGENT: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # One program per block of keys; dk shares k's layout, dv v's.
    bh = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    kt = _tile(k_ptr + bh * s_kb, offs_e, offs_n, E, S, s_ke, s_kn)
    vt = _tile(v_ptr + bh * s_vb, offs_ev, offs_n, EV, S, s_ve, s_vn)
    if TANGENT:
        tkt = _tile(tk_ptr + bh * s_kb, offs_e, offs_n, E, S, s_ke, s_kn)
        tvt = _tile(tv_ptr + bh * s_vb, offs_ev, offs_n, EV, S, s_ve, s_vn)
    mask_ptr += bh * s_mb
    dk = tl.zeros((BLOCK_N, BLOCK_E), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_EV), tl.float32)
    tdk = tl.zeros((BLOCK_N, BLOCK_E), tl.float32)
    tdv = tl.zeros((BLOCK_N, BLOCK_EV), tl.float32)
    for start in range(0, L, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        rows = offs_m < L
        q = _tile(q_ptr + bh * s_qb, offs_m, offs_e, L, E, s_qm, s_qe)
        go = _tile(go_ptr + bh * s_ob, offs_m, offs_ev, L, EV, s_om, s_oe)
        lse = tl.load(lse_ptr + bh * s_lb + offs_m * s_lm, mask=rows, other=0.0)
        dd = tl.load(dd_ptr + bh * s_lb + offs_m * s_lm, mask=rows, other=0.0)
        s = _scores(q, kt, offs_m, offs_n, L, S, scale, mask_ptr, s_mm, s_mn,
                    HAS_MASK, MASK_BOOL, CAUSAL, INPUT_PRECISION)  # fmt: skip
        p = tl.where(rows[:, None], _probabilities(s, lse), 0.0)
        dv = tl.dot(tl.trans(p), go, dv, input_precision=INPUT_PRECISION)
        dp = tl.dot(go, vt, input_precision=INPUT_PRECISION)
        ds = p * (dp - dd[:, None])
        dk = tl.dot(tl.trans(ds), q, dk, input_precision=INPUT_PRECISION)
        if TANGENT:
            tq = _tile(tq_ptr + bh * s_qb, offs_m, offs_e, L, E, s_qm, s_qe)
            tgo = _tile(tgo_ptr + bh * s_ob, offs_m, offs_ev, L, EV, s_om, s_oe)
            tlse = tl.load(tlse_ptr + bh * s_lb + offs_m * s_lm, mask=rows, other=0.0)
            tdd = tl.load(tdd_ptr + bh * s_lb + offs_m * s_lm, mask=rows, other=0.0)
            tp = _p_tangent(q, kt, tq, tkt, p, tlse, scale, INPUT_PRECISION)
            tds = _ds_tangent(go, vt, tgo, tvt, p, tp, dp, dd, tdd, INPUT_PRECISION)
            tdv = tl.dot(tl.trans(tp), go, tdv, input_precision=INPUT_PRECISION)
            tdv = tl.dot(tl.trans(p), tgo, tdv, input_precision=INPUT_PRECISION)
            tdk = tl.dot(tl.trans(tds), q, tdk, input_precision=INPUT_PRECISION)
            tdk = tl.dot(tl.trans(ds), tq, tdk, input_precision=INPUT_PRECISION)
    keys = offs_n < S
    k_out = offs_n[:, None] * s_kn + offs_e[None, :] * s_ke
    v_out = offs_n[:, None] * s_vn + offs_ev[None, :] * s_ve
    k_keep = keys[:, None] & (offs_e[None, :] < E)
    v_keep = keys[:, None] & (offs_ev[None, :] < EV)
    tl.store(dk_ptr + bh * s_kb + k_out, (dk * scale).to(dk_ptr.dtype.element_ty),
             mask=k_keep)  # fmt: skip
    tl.store(dv_ptr + bh * s_vb + v_out, dv.to(dv_ptr.dtype.element_ty), mask=v_keep)
    if TANGENT:
        tl.store(tdk_ptr + bh * s_kb + k_out,
                 (tdk * scale).to(tdk_ptr.dtype.element_ty), mask=k_keep)  # fmt: skip
        tl.store(tdv_ptr + bh * s_vb + v_out, tdv.to(tdv_ptr.dtype.element_ty),
                 mask=v_keep)  # fmt: skip


def _check(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor | None:
    """Validate ``q (BH, L, E), k (BH, S, E), v (BH, S, Ev)``; the mask as ``(BH, L, S)``."""
    check_triton_dtype(q)
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"expected q (BH, L, E), k (BH, S, E), v (BH, S, Ev), got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; flatten the "
            "batch and head axes (rdiag.attention.blocked_attention does)"
        )
    if (
        k.shape[0] != q.shape[0]
        or v.shape[0] != q.shape[0]
        or k.shape[2] != q.shape[2]
        or v.shape[1] != k.shape[1]
    ):
        raise ValueError(
            f"expected q (BH, L, E), k (BH, S, E), v (BH, S, Ev) with shared BH, E "
            f"and S, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device:
        raise ValueError(
            f"expected q, k, v of one dtype on one device, got {q.dtype}, {k.dtype}, "
            f"{v.dtype}; cast them with .to(q.dtype)"
        )
    if mask is None:
        return None
    try:
        return mask.expand(q.shape[0], q.shape[1], k.shape[1])
    except RuntimeError:
        raise ValueError(
            f"expected a mask broadcastable to (BH, L, S) = "
            f"{(q.shape[0], q.shape[1], k.shape[1])}, got {tuple(mask.shape)}"
        ) from None


def _common(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool,
            allow_tf32: bool) -> tuple[tuple, dict]:  # fmt: skip
    """The launch arguments every kernel shares (after the pointers)."""
    bh, length, e = q.shape
    keys, ev = k.shape[1], v.shape[2]
    # A dummy pointer where there is no mask: never read (HAS_MASK is False).
    m = mask if mask is not None else q
    mask_strides = m.stride() if mask is not None else (0, 0, 0)
    meta = dict(
        HAS_MASK=mask is not None,
        MASK_BOOL=mask is not None and mask.dtype == torch.bool,
        CAUSAL=bool(causal),
        INPUT_PRECISION=dot_precision(q.dtype, allow_tf32),
        BLOCK_E=max(16, next_power_of_2(e)),
        BLOCK_EV=max(16, next_power_of_2(ev)),
    )
    sizes = (length, keys, e, ev)
    strides = (*q.stride(), *k.stride(), *v.stride(), *mask_strides)
    return (m, sizes, strides, bh), meta


def attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    allow_tf32: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(o, lse)``: blocked attention and the row log-sum-exp.

    Args:
        q: ``(BH, L, E)``; float16, bfloat16 or float32.
        k: ``(BH, S, E)``.
        v: ``(BH, S, Ev)``.
        mask: Boolean (``True`` attends) or additive, broadcastable to ``(BH, L, S)``.
        causal: Query ``i`` sees keys ``<= i``.
        scale: Scores scale; default ``E ** -0.5``.
        allow_tf32: TF32 tensor cores for float32.

    Returns:
        ``o (BH, L, Ev)`` in ``q``'s dtype and ``lse (BH, L)`` float32.

    Raises:
        TypeError: float64 inputs (the torch operator is the exact path).
        ValueError: Shapes, dtypes or the mask disagree.
    """
    mask = _check(q, k, v, mask)
    (m, sizes, strides, bh), meta = _common(q, k, v, mask, causal, allow_tf32)
    o = torch.empty(*q.shape[:2], v.shape[2], dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(sizes[0], meta["BLOCK_M"]), bh)

    _forward_kernel[grid](
        q, k, v, m, o, lse, *sizes, scale, *strides,
        *o.stride(), *lse.stride(), **meta,
    )  # fmt: skip
    return o, lse


def attention_jvp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
    mask: Tensor | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    allow_tf32: bool = False,
) -> tuple[Tensor, Tensor]:
    """Tangents ``(d o, d lse)`` of :func:`attention_forward` at ``(q, k, v)``.

    Args:
        q: ``(BH, L, E)``, as :func:`attention_forward`.
        k: ``(BH, S, E)``.
        v: ``(BH, S, Ev)``.
        o: Its output ``(BH, L, Ev)``.
        lse: Its ``(BH, L)`` log-sum-exp.
        dq: Tangent of ``q``.
        dk: Tangent of ``k``.
        dv: Tangent of ``v`` (the mask is a constant).
        mask: As :func:`attention_forward`.
        causal: As :func:`attention_forward`.
        scale: As :func:`attention_forward`.
        allow_tf32: As :func:`attention_forward`.

    Returns:
        ``d o (BH, L, Ev)`` in ``q``'s dtype, ``d lse (BH, L)`` float32.
    """
    mask = _check(q, k, v, mask)
    # Tangents are read with their primals' strides.
    q, dq = q.contiguous(), dq.contiguous()
    k, dk = k.contiguous(), dk.contiguous()
    v, dv = v.contiguous(), dv.contiguous()
    o, lse = o.contiguous(), lse.contiguous()
    (m, sizes, strides, bh), meta = _common(q, k, v, mask, causal, allow_tf32)
    do = torch.empty_like(o)
    dlse = torch.empty_like(lse)
    if do.numel() == 0:
        return do, dlse
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(sizes[0], meta["BLOCK_M"]), bh)

    _jvp_kernel[grid](
        q, k, v, m, o, lse, dq, dk, dv, do, dlse, *sizes, scale, *strides,
        *o.stride(), *lse.stride(), **meta,
    )  # fmt: skip
    return do, dlse


def attention_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    go: Tensor,
    glse: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    tangents: tuple[Tensor, ...] | None = None,
    allow_tf32: bool = False,
) -> tuple[Tensor, ...]:
    """Cotangents ``(dq, dk, dv)`` of :func:`attention_forward`'s ``(o, lse)``.

    With ``tangents`` also their tangents: forward mode through this reverse rule,
    the attention's part of a Hessian-vector product (forward over reverse).

    Args:
        q: ``(BH, L, E)``, as :func:`attention_forward`.
        k: ``(BH, S, E)``.
        v: ``(BH, S, Ev)``.
        o: Its output ``(BH, L, Ev)``.
        lse: Its ``(BH, L)`` log-sum-exp.
        go: Cotangent of ``o``.
        glse: Cotangent of ``lse`` (``None``: zero).
        mask: As :func:`attention_forward`.
        causal: As :func:`attention_forward`.
        scale: As :func:`attention_forward`.
        tangents: ``(tq, tk, tv, tgo, tglse)``: tangents of ``q``, ``k``, ``v``
            and of the cotangents ``go``, ``glse`` (``tglse`` may be ``None``).
        allow_tf32: As :func:`attention_forward`.

    Returns:
        ``dq, dk, dv`` shaped and typed like ``q``, ``k``, ``v``; with
        ``tangents``, then their tangents ``tdq, tdk, tdv``.
    """
    mask = _check(q, k, v, mask)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o, go, lse = o.contiguous(), go.contiguous(), lse.contiguous()
    dd = _rowsum(go, o, glse)
    (m, sizes, strides, bh), meta = _common(q, k, v, mask, causal, allow_tf32)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)
    if tangents is None:
        # Dummy pointers, never read (TANGENT is False).
        tq, tk, tv, tgo, tlse, tdd = q, k, v, go, lse, dd
        tdq, tdk, tdv = dq, dk, dv
    else:
        tq, tk, tv, tgo, tglse = tangents
        tq, tk, tv, tgo = (t.contiguous() for t in (tq, tk, tv, tgo))
        to, tlse = attention_jvp(q, k, v, o, lse, tq, tk, tv, mask, causal=causal,
                                 scale=scale, allow_tf32=allow_tf32)  # fmt: skip
        # D' = rowsum(go' o + go o') - glse'
        tdd = _rowsum(tgo, o, tglse) + (go.float() * to.float()).sum(-1)
        tdq, tdk, tdv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if q.numel() and k.numel():
        args = (*sizes, scale, *strides, *o.stride(), *lse.stride())
        meta["TANGENT"] = tangents is not None

        def rows_grid(meta: dict) -> tuple[int, int]:
            return (triton.cdiv(sizes[0], meta["BLOCK_M"]), bh)

        def keys_grid(meta: dict) -> tuple[int, int]:
            return (triton.cdiv(sizes[1], meta["BLOCK_N"]), bh)

        _dq_kernel[rows_grid](
            q, k, v, m, go, lse, dd, dq, tq, tk, tv, tgo, tlse, tdd, tdq,
            *args, **meta,
        )  # fmt: skip
        _dkdv_kernel[keys_grid](
            q, k, v, m, go, lse, dd, dk, dv, tq, tk, tv, tgo, tlse, tdd, tdk, tdv,
            *args, **meta,
        )  # fmt: skip
    if tangents is None:
        return dq, dk, dv
    return dq, dk, dv, tdq, tdk, tdv


def _rowsum(go: Tensor, o: Tensor, glse: Tensor | None) -> Tensor:
    """``D = rowsum(go * o) - glse`` in float32, ``(BH, L)``."""
    dd = (go.float() * o.float()).sum(-1)
    if glse is not None:
        dd = dd - glse.float()
    return dd.contiguous()


def _plain(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The tensors under torch.func's wrappers (a kernel reads storage).

    ``torch.func.jvp`` hands a ``jvp`` rule its saved tensors and tangents wrapped
    for its level; the kernels compute the rule's values on the storage under
    them, with torch.func's dispatch off (``torch._C._DisableFuncTorch``) so that their
    outputs are plain too. No ``vmap`` rule is defined, so no batched tensor
    gets here.
    """
    from torch._C._functorch import get_unwrapped, is_functorch_wrapped_tensor

    out = []
    for t in tensors:
        while t is not None and is_functorch_wrapped_tensor(t):
            t = get_unwrapped(t)
        out.append(t)
    return tuple(out)


class _Backward(torch.autograd.Function):
    """The reverse rule as a function with its own forward mode (HVPs in Triton)."""

    @staticmethod
    def forward(q, k, v, o, lse, go, glse, mask, causal, scale):
        with torch._C._DisableFuncTorch():
            return attention_backward(q, k, v, o, lse, go, glse, mask, causal=causal,
                                      scale=scale)  # fmt: skip

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k, v, o, lse, go, glse, mask, causal, scale = inputs
        ctx.causal, ctx.scale, ctx.mask = causal, scale, mask
        ctx.save_for_forward(q, k, v, o, lse, go, glse)

    @staticmethod
    def jvp(ctx, tq, tk, tv, _to, _tlse, tgo, tglse, *_):
        # o and lse are functions of (q, k, v): their tangents follow from tq, tk,
        # tv (attention_backward recomputes them), so _to and _tlse are not read.
        with torch._C._DisableFuncTorch():
            q, k, v, o, lse, go, glse, tq, tk, tv, tgo, tglse, mask = _plain(
                *ctx.saved_tensors, tq, tk, tv, tgo, tglse, ctx.mask
            )
            tangents = tuple(
                torch.zeros_like(p) if t is None else t
                for t, p in ((tq, q), (tk, k), (tv, v), (tgo, go))
            )
            return attention_backward(
                q, k, v, o, lse, go, glse, mask, causal=ctx.causal, scale=ctx.scale,
                tangents=(*tangents, tglse),
            )[3:]  # fmt: skip

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(
            "reverse-over-reverse through the Triton attention is not implemented; "
            "differentiate its gradient in forward mode (torch.func.jvp of grad), or "
            "use rdiag.attention.blocked_attention"
        )


class _Attention(torch.autograd.Function):
    """``(o, lse)`` by the Triton kernels: forward, JVP, and a reverse rule with JVP."""

    @staticmethod
    def forward(q, k, v, mask, causal, scale):
        with torch._C._DisableFuncTorch():
            return attention_forward(q, k, v, mask, causal=causal, scale=scale)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k, v, mask, causal, scale = inputs
        o, lse = output
        ctx.causal, ctx.scale, ctx.mask = causal, scale, mask
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.save_for_forward(q, k, v, o, lse)

    @staticmethod
    def jvp(ctx, tq, tk, tv, *_):
        with torch._C._DisableFuncTorch():
            q, k, v, o, lse, tq, tk, tv, mask = _plain(
                *ctx.saved_tensors, tq, tk, tv, ctx.mask
            )
            tq, tk, tv = (
                torch.zeros_like(p) if t is None else t
                for t, p in ((tq, q), (tk, k), (tv, v))
            )
            return attention_jvp(q, k, v, o, lse, tq, tk, tv, mask,
                                 causal=ctx.causal, scale=ctx.scale)  # fmt: skip

    @staticmethod
    def backward(ctx, go, glse):
        q, k, v, o, lse = ctx.saved_tensors
        grads = _Backward.apply(q, k, v, o, lse, go, glse, ctx.mask, ctx.causal,
                                ctx.scale)  # fmt: skip
        return (*grads, None, None, None)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Differentiable blocked attention by the Triton kernels, ``(BH, L, Ev)``.

    Forward mode (``torch.func.jvp``), reverse mode, and forward over reverse
    (``jvp`` of ``grad``: Hessian-vector products) run the kernels; the mask is a
    constant (not differentiated); no ``vmap`` rule and no reverse-over-reverse.
    Shapes as :func:`attention_forward`.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _Attention.apply(q, k, v, mask, bool(causal), scale)[0]
