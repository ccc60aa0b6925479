"""rdiag's own attention: exact, blocked over keys, with forward mode and double backward.

PyTorch's fused attention kernels (flash, memory-efficient) have no forward-mode
derivative and no second derivative, and its math attention materialises the
``L x S`` scores of every head for the primal and again for each tangent. This
module's operator computes the same ``softmax(q k^T * scale + mask) v`` one block
of keys at a time with an online softmax, and is a ``torch.autograd.Function``
whose three rules are themselves blocked:

- ``forward``: the output ``o`` and the row log-sum-exp ``lse`` (saved);
- ``jvp`` (forward mode, ``torch.func.jvp``): the tangents of ``o`` and ``lse``;
- ``backward``: recomputes each block's probabilities from ``lse``; it is a
  function of its own (``_Reverse``) with its own blocked ``jvp`` rule, so
  forward-over-reverse (Hessian-vector products) is blocked too and
  ``torch.func.grad``'s graph holds no tile of it; reverse-over-reverse (a
  fallback) differentiates its blocked torch ops, holding every tile.

Forward, forward mode and forward-over-reverse hold ``L x block`` scores per head
at a time (causal: the keys a query cannot see are skipped, about half the
work), so an HVP, a GGN product or a jvp-based eNTK column costs
``O(L * block)`` extra memory per head instead of ``O(L * S)``. ``vmap`` rules are
generated (the eNTK vmaps over samples).

:func:`efficient_attention` routes ``torch.nn.functional.scaled_dot_product_attention``
to this operator inside rdiag's products only (routed per thread: the user's
model and other threads are untouched); calls it does not cover
(attention dropout, masks it cannot broadcast, nested tensors) run math attention
and are named in :attr:`AttentionRouter.fallbacks`.

Shapes: ``q (..., L, E)``, ``k (..., S, E)``, ``v (..., S, Ev)`` with the same
leading axes (``enable_gqa``: ``k``, ``v`` may have fewer heads on axis ``-3``),
``attn_mask`` broadcastable to ``(..., L, S)`` (boolean: ``True`` attends; float:
added to the scores). Rows with no key to attend give zeros, as torch's math
attention does.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "DEFAULT_BLOCK",
    "AttentionCall",
    "AttentionRouter",
    "attention_workspace",
    "blocked_attention",
    "efficient_attention",
    "math_attention",
    "uncovered",
]

#: Keys per block: ``L x DEFAULT_BLOCK`` scores per head live at a time.
DEFAULT_BLOCK = 128

_SDPA = F.scaled_dot_product_attention


class _MathAttention:
    """The process-wide attention backend switch, safe for overlapping threads.

    torch's backend choice is one global setting; nested ``sdpa_kernel`` blocks
    that overlap across threads (a thread-pool sweep) would restore each other's
    state out of order and leave the math backend on for good. Here the first of
    the overlapping users switches and the last one restores.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._context: contextlib.AbstractContextManager | None = None

    def enter(self) -> None:
        with self._lock:
            if self._users == 0:
                self._context = sdpa_kernel(SDPBackend.MATH)
                self._context.__enter__()
            self._users += 1

    def exit(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                self._context.__exit__(None, None, None)
                self._context = None


_MATH = _MathAttention()


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Route ``scaled_dot_product_attention`` to its math backend (has forward-mode AD)."""
    _MATH.enter()
    try:
        yield
    finally:
        _MATH.exit()


def _scores(
    q: Tensor,
    k: Tensor,
    mask: Tensor | None,
    causal: bool,
    scale: float,
    row: int,
    col: int,
) -> Tensor:
    """Masked scores ``q k^T * scale (+ mask)`` of one tile.

    Shapes: ``q (..., l, E)`` the queries ``row : row + l``, ``k (..., b, E)`` the
    keys ``col : col + b``, ``mask (..., L, S)`` (its tile is sliced here);
    returns ``(..., l, b)`` with ``-inf`` where masked.
    """
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    rows = slice(row, row + q.shape[-2])
    cols = slice(col, col + k.shape[-2])
    if mask is not None:
        tile = mask[..., rows, cols]
        if tile.dtype == torch.bool:
            s = s.masked_fill(~tile, -math.inf)
        else:
            s = s + tile
    if causal:
        i = torch.arange(rows.start, rows.stop, device=q.device)[:, None]
        j = torch.arange(cols.start, cols.stop, device=q.device)[None, :]
        s = s.masked_fill(j > i, -math.inf)
    return s


def _safe(m: Tensor, fill: float) -> Tensor:
    """``m`` with infinite entries (rows with nothing to attend) replaced by ``fill``."""
    return torch.where(torch.isinf(m), torch.full_like(m, fill), m)


def _tiles(queries: int, keys: int, block: int, causal: bool) -> list[tuple[int, int]]:
    """``(first query row, first key)`` of each block of keys that some query sees.

    Causal: query ``i`` sees keys ``<= i``, so the keys from ``j`` on are seen by
    the queries from ``j`` on only (about half the work), and keys past the last
    query by none.
    """
    return [
        (j if causal else 0, j)
        for j in range(0, keys, block)
        if not (causal and j >= queries)
    ]


def _pad_rows(x: Tensor, row: int) -> Tensor:
    """``x (..., l, d)`` of the rows ``row :`` as ``(..., row + l, d)``, zeros above."""
    return F.pad(x, (0, 0, row, 0)) if row else x


class _Attention(torch.autograd.Function):
    """``(o, lse)`` of blocked attention; see the module docstring for the rules."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        causal: bool,
        scale: float,
        block: int,
    ) -> tuple[Tensor, Tensor]:
        lead = q.shape[:-1]
        m = torch.full(lead, -math.inf, dtype=q.dtype, device=q.device)
        l = torch.zeros(lead, dtype=q.dtype, device=q.device)  # noqa: E741
        acc = torch.zeros(*lead, v.shape[-1], dtype=q.dtype, device=q.device)
        for r, j in _tiles(q.shape[-2], k.shape[-2], block, causal):
            kj, vj = k[..., j : j + block, :], v[..., j : j + block, :]
            s = _scores(q[..., r:, :], kj, mask, causal, scale, r, j)
            m_r = m[..., r:]
            m_new = torch.maximum(m_r, s.amax(-1))
            ref = _safe(m_new, 0.0)
            alpha = torch.exp(m_r - ref)
            p = torch.exp(s - ref[..., None])
            l_r = l[..., r:] * alpha + p.sum(-1)
            acc_r = acc[..., r:, :] * alpha[..., None] + torch.matmul(p, vj)
            m = torch.cat([m[..., :r], m_new], -1)
            l = torch.cat([l[..., :r], l_r], -1)  # noqa: E741
            acc = torch.cat([acc[..., :r, :], acc_r], -2)
            del s, p  # not alive beside the next tile's
        o = acc / torch.where(l > 0, l, torch.ones_like(l))[..., None]
        lse = _safe(m, 0.0) + torch.log(l)
        return o, lse

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        q, k, v, mask, causal, scale, block = inputs
        o, lse = output
        ctx.causal, ctx.scale, ctx.block = causal, scale, block
        ctx.has_mask = mask is not None
        saved = (q, k, v, o, lse) + ((mask,) if mask is not None else ())
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)

    @staticmethod
    def jvp(
        ctx: Any,
        dq: Tensor | None,
        dk: Tensor | None,
        dv: Tensor | None,
        dmask: Tensor | None,
        *_: Any,
    ) -> tuple[Tensor, Tensor]:
        q, k, v, o, lse = ctx.saved_tensors[:5]
        mask = ctx.saved_tensors[5] if ctx.has_mask else None
        scale, block = ctx.scale, ctx.block
        ref = _safe(lse, math.inf)[..., None]
        # With p = exp(s - lse) (normalised) and t the scores' tangent:
        # d lse = sum p t, d o = sum (p t) v + p dv - d lse * o.
        dlse = torch.zeros_like(lse)
        acc = torch.zeros_like(o)
        for r, j in _tiles(q.shape[-2], k.shape[-2], block, ctx.causal):
            sl = slice(j, j + block)
            kj, vj, qr = k[..., sl, :], v[..., sl, :], q[..., r:, :]
            p = torch.exp(
                _scores(qr, kj, mask, ctx.causal, scale, r, j) - ref[..., r:, :]
            )
            terms = []
            if dq is not None:
                terms.append(torch.matmul(dq[..., r:, :], kj.transpose(-1, -2)) * scale)
            if dk is not None:
                terms.append(torch.matmul(qr, dk[..., sl, :].transpose(-1, -2)) * scale)
            if dmask is not None:
                terms.append(dmask[..., r:, sl])
            pt = p * sum(terms) if terms else torch.zeros_like(p)
            del terms
            part = torch.matmul(pt, vj)
            if dv is not None:
                part = part + torch.matmul(p, dv[..., sl, :])
            dlse = dlse + _pad_rows(pt.sum(-1)[..., None], r)[..., 0]
            acc = acc + _pad_rows(part, r)
            del p, pt  # not alive beside the next tile's
        return acc - dlse[..., None] * o, dlse

    @staticmethod
    def backward(ctx: Any, go: Tensor, glse: Tensor) -> tuple:
        q, k, v, o, lse = ctx.saved_tensors[:5]
        mask = ctx.saved_tensors[5] if ctx.has_mask else None
        want_mask = ctx.has_mask and ctx.needs_input_grad[3]
        grads = _Reverse.apply(
            q, k, v, o, lse, go, glse, mask, ctx.causal, ctx.scale, ctx.block,
            want_mask,
        )  # fmt: skip
        dmask = grads[3] if want_mask else None
        return grads[0], grads[1], grads[2], dmask, None, None, None


def _reverse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    go: Tensor,
    glse: Tensor,
    mask: Tensor | None,
    causal: bool,
    scale: float,
    block: int,
    want_mask: bool,
    tangents: tuple[Tensor | None, ...] | None = None,
) -> tuple[Tensor, ...]:
    """The reverse rule ``(dq, dk, dv[, dmask])``, with ``tangents`` their tangents.

    ``ds = p (dp - D)``, ``dp = go v^T``, ``D = rowsum(go o) - glse``; with the
    tangents ``(tq, tk, tv, to, tlse, tgo, tglse, tmask)`` of every input, the
    same tiles also give ``ds' = p' (dp - D) + p (dp' - D')``,
    ``p' = p (s' - lse')``, and the tangents of the cotangents from them.
    """
    ref = _safe(lse, math.inf)[..., None]
    dd = ((go * o).sum(-1) - glse)[..., None]
    dq = torch.zeros_like(q)
    dks, dvs, dms = [], [], []
    tdq, tdks, tdvs, tdms = torch.zeros_like(q), [], [], []
    if tangents is not None:
        tq, tk, tv, to, tlse, tgo, tglse, tmask = (
            torch.zeros_like(p) if t is None else t
            for t, p in zip(tangents, (q, k, v, o, lse, go, glse, lse))
        )
        tmask = tangents[7]
        tdd = ((tgo * o + go * to).sum(-1) - tglse)[..., None]
    tiles = _tiles(q.shape[-2], k.shape[-2], block, causal)
    for r, j in tiles:
        sl = slice(j, j + block)
        kj, vj = k[..., sl, :], v[..., sl, :]
        qr, gor = q[..., r:, :], go[..., r:, :]
        p = torch.exp(_scores(qr, kj, mask, causal, scale, r, j) - ref[..., r:, :])
        dvs.append(torch.matmul(p.transpose(-1, -2), gor))
        dp = torch.matmul(gor, vj.transpose(-1, -2))
        ds = p * (dp - dd[..., r:, :])
        dq = dq + _pad_rows(torch.matmul(ds, kj) * scale, r)
        dks.append(torch.matmul(ds.transpose(-1, -2), qr) * scale)
        if want_mask:
            dms.append(_pad_rows(ds, r))
        if tangents is not None:
            tqr, tkj, tvj, tgor = (
                tq[..., r:, :],
                tk[..., sl, :],
                tv[..., sl, :],
                tgo[..., r:, :],
            )
            ts = (
                torch.matmul(tqr, kj.transpose(-1, -2))
                + torch.matmul(qr, tkj.transpose(-1, -2))
            ) * scale
            if tmask is not None:
                ts = ts + tmask[..., r:, sl]
            tp = p * (ts - tlse[..., r:, None])
            del ts
            tdp = torch.matmul(tgor, vj.transpose(-1, -2)) + torch.matmul(
                gor, tvj.transpose(-1, -2)
            )
            tds = tp * (dp - dd[..., r:, :]) + p * (tdp - tdd[..., r:, :])
            del tdp
            tdvs.append(
                torch.matmul(tp.transpose(-1, -2), gor)
                + torch.matmul(p.transpose(-1, -2), tgor)
            )
            tdq = tdq + _pad_rows(
                (torch.matmul(tds, kj) + torch.matmul(ds, tkj)) * scale, r
            )
            tdks.append(
                (
                    torch.matmul(tds.transpose(-1, -2), qr)
                    + torch.matmul(ds.transpose(-1, -2), tqr)
                )
                * scale
            )
            if want_mask:
                tdms.append(_pad_rows(tds, r))
            del tp, tds
        del p, dp, ds  # not alive beside the next tile's
    # Keys no query sees (causal, past the last query) get zeros.
    seen = min(tiles[-1][1] + block, k.shape[-2]) if tiles else 0
    out = [dq, _keys(dks, k, seen, -2), _keys(dvs, v, seen, -2)]
    if want_mask:
        out.append(_keys(dms, lse[..., None].expand(*lse.shape, k.shape[-2]), seen, -1))
    if tangents is None:
        return tuple(out)
    tout = [tdq, _keys(tdks, k, seen, -2), _keys(tdvs, v, seen, -2)]
    if want_mask:
        tout.append(
            _keys(tdms, lse[..., None].expand(*lse.shape, k.shape[-2]), seen, -1)
        )
    return tuple(tout)


def _keys(parts: list[Tensor], like: Tensor, seen: int, axis: int) -> Tensor:
    """The per-block parts along the key ``axis``, zeros for the keys after ``seen``."""
    rest = torch.zeros_like(like.narrow(axis, seen, like.shape[axis] - seen))
    return torch.cat([*parts, rest], axis)


class _Reverse(torch.autograd.Function):
    """The reverse rule as a function of its own, so that differentiating it is blocked.

    Forward mode through it (``jvp``: the attention's share of forward-over-reverse
    HVPs) runs the tangent tiles of :func:`_reverse`, holding ``L x block`` scores
    per head; the reverse rule inside ``torch.func.grad`` records no graph of its
    tiles. Reverse over it (reverse-over-reverse, a fallback) differentiates the
    blocked ops of :func:`_reverse` by ``torch.func.vjp``, which holds every tile
    until the product is done.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, o, lse, go, glse, mask, causal, scale, block, want_mask):
        return _reverse(
            q, k, v, o, lse, go, glse, mask, causal, scale, block, want_mask
        )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        *tensors, mask, causal, scale, block, want_mask = inputs
        ctx.static = (causal, scale, block, want_mask)
        ctx.has_mask = mask is not None
        saved = (*tensors, mask) if mask is not None else tuple(tensors)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> tuple:
        saved = ctx.saved_tensors
        mask = saved[7] if ctx.has_mask else None
        return _reverse(*saved[:7], mask, *ctx.static, tangents=tangents[:8])

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple:
        saved = ctx.saved_tensors
        mask = saved[7] if ctx.has_mask else None
        # A float mask is differentiated; a boolean one is a constant.
        float_mask = mask is not None and mask.is_floating_point()
        primals = (*saved[:7], *((mask,) if float_mask else ()))

        def rule(*args: Tensor) -> tuple[Tensor, ...]:
            return _reverse(*args[:7], args[7] if float_mask else mask, *ctx.static)

        _, pullback = torch.func.vjp(rule, *primals)
        cots = pullback(tuple(grads))
        dmask = cots[7] if float_mask else None
        return (*cots[:7], dmask, None, None, None, None)


@dataclass(frozen=True)
class AttentionCall:
    """One call of ``scaled_dot_product_attention`` seen by the router.

    Attributes:
        heads: Rows of heads: the product of the query's leading axes (batch
            included, as the call saw it).
        queries: ``L``.
        keys: ``S``.
        itemsize: Bytes per element of the scores.
        covered: Whether rdiag's operator ran it (else math attention did).
    """

    heads: int
    queries: int
    keys: int
    itemsize: int
    covered: bool


def uncovered(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> str | None:
    """Why :func:`blocked_attention` does not cover this call, or ``None``.

    Args: As ``torch.nn.functional.scaled_dot_product_attention``.
    """
    if dropout_p > 0.0:
        return "attention dropout (mode='train')"
    if any(t.is_nested or t.layout != torch.strided for t in (query, key, value)):
        return "nested or sparse attention inputs"
    if query.dim() < 2 or key.dim() != query.dim() or value.dim() != query.dim():
        return "inputs of different ranks"
    if key.shape[-2] != value.shape[-2] or key.shape[-1] != query.shape[-1]:
        return "mismatched key and value shapes"
    lead_q, lead_k = query.shape[:-2], key.shape[:-2]
    if lead_q != lead_k or lead_k != value.shape[:-2]:
        gqa = (
            enable_gqa
            and query.dim() >= 3
            and lead_q[:-1] == lead_k[:-1] == value.shape[:-3]
            and key.shape[-3] == value.shape[-3]
            and query.shape[-3] % key.shape[-3] == 0
        )
        if not gqa:
            return "leading axes of query, key and value that differ"
    if attn_mask is not None:
        if is_causal:
            return "both attn_mask and is_causal"
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            return f"an attention mask of dtype {attn_mask.dtype}"
        try:
            torch.broadcast_shapes(
                attn_mask.shape, (*lead_q, query.shape[-2], key.shape[-2])
            )
        except RuntimeError:
            return f"an attention mask of shape {tuple(attn_mask.shape)}"
        if attn_mask.dim() > query.dim():
            return f"an attention mask of shape {tuple(attn_mask.shape)}"
    return None


def blocked_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    block_size: int = DEFAULT_BLOCK,
) -> Tensor:
    """``scaled_dot_product_attention`` by rdiag's blocked operator (same result).

    Differentiable in every mode (forward, reverse, and each over the other) and
    under ``vmap``, holding ``L x block_size`` scores per head at a time.

    Args:
        query: ``(..., L, E)``.
        key: ``(..., S, E)`` (``(..., Hkv, S, E)`` with ``enable_gqa``).
        value: ``(..., S, Ev)``.
        attn_mask: Boolean (``True`` attends) or additive float mask, broadcastable
            to ``(..., L, S)``; may depend on parameters (differentiated).
        dropout_p: Must be 0 (see :func:`uncovered`).
        is_causal: Top-left aligned causal mask (query ``i`` sees keys ``<= i``).
        scale: Scores scale; default ``E ** -0.5``.
        enable_gqa: ``key``/``value`` heads shared by groups of query heads.
        block_size: Keys per block.

    Returns:
        ``(..., L, Ev)``.

    Raises:
        ValueError: A call :func:`uncovered` names, or ``block_size < 1``.
    """
    reason = uncovered(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
    )
    if reason is not None:
        raise ValueError(
            f"rdiag's blocked attention does not cover {reason}; call "
            "torch.nn.functional.scaled_dot_product_attention for it"
        )
    if block_size < 1:
        raise ValueError(f"expected block_size >= 1, got {block_size}")
    if key.shape[:-2] != query.shape[:-2]:  # grouped-query heads
        groups = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(groups, dim=-3)
        value = value.repeat_interleave(groups, dim=-3)
    mask = attn_mask
    if mask is not None:
        mask = mask.expand(*query.shape[:-1], key.shape[-2])
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    return _Attention.apply(
        query, key, value, mask, bool(is_causal), scale, block_size
    )[0]


class AttentionRouter:
    """What one :func:`efficient_attention` block routed, and what it could not.

    Attributes:
        block_size: Keys per block.
        calls: Every attention call seen (:class:`AttentionCall`).
        fallbacks: Why calls ran math attention instead.
    """

    def __init__(self, block_size: int = DEFAULT_BLOCK) -> None:
        self.block_size = block_size
        self.calls: list[AttentionCall] = []
        self.fallbacks: set[str] = set()

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        """One ``scaled_dot_product_attention`` call (same arguments)."""
        bound = inspect.signature(uncovered).bind(*args, **kwargs).arguments
        reason = uncovered(**bound)
        q, k = bound["query"], bound["key"]
        self.calls.append(
            AttentionCall(
                math.prod(q.shape[:-2]),
                q.shape[-2],
                k.shape[-2],
                q.element_size(),
                reason is None,
            )
        )
        if reason is None:
            return blocked_attention(**bound, block_size=self.block_size)
        self.fallbacks.add(reason)
        with math_attention():
            return _SDPA(*args, **kwargs)


class _Routing:
    """The process-wide hook, with a router per thread.

    ``torch.nn.functional.scaled_dot_product_attention`` is replaced (looked up
    at call time by Hugging Face's sdpa integration and by
    ``F.multi_head_attention_forward``) by a function that asks this thread's
    router, or calls torch's own where the thread has none: other threads and
    the user's own calls are untouched. ``nn.MultiheadAttention``'s fused fast
    path (no forward-mode derivative) is off while any thread routes. The first
    of overlapping users installs the hook, the last one removes it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._fastpath = True
        self.local = threading.local()

    def routed(self, *args: Any, **kwargs: Any) -> Tensor:
        router = getattr(self.local, "router", None)
        if router is None:
            return _SDPA(*args, **kwargs)
        return router(*args, **kwargs)

    def enter(self) -> None:
        with self._lock:
            if self._users == 0:
                self._fastpath = torch.backends.mha.get_fastpath_enabled()
                torch.backends.mha.set_fastpath_enabled(False)
                F.scaled_dot_product_attention = self.routed
            self._users += 1

    def exit(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                F.scaled_dot_product_attention = _SDPA
                torch.backends.mha.set_fastpath_enabled(self._fastpath)


_ROUTING = _Routing()


@contextlib.contextmanager
def efficient_attention(block_size: int | None = None) -> Iterator[AttentionRouter]:
    """Run this thread's ``scaled_dot_product_attention`` calls by rdiag's operator.

    Args:
        block_size: Keys per block; default :data:`DEFAULT_BLOCK` (read here).

    Yields:
        The router: what it saw (``calls``) and what fell back (``fallbacks``).
    """
    router = AttentionRouter(DEFAULT_BLOCK if block_size is None else block_size)
    outer = getattr(_ROUTING.local, "router", None)
    _ROUTING.enter()
    _ROUTING.local.router = router
    try:
        yield router
    finally:
        _ROUTING.local.router = outer
        _ROUTING.exit()


def attention_workspace(calls: list[AttentionCall], block_size: int | None) -> float:
    """Bytes of scores one sample's attention holds at a time, per tangent.

    ``block_size=None``: math attention (every call's ``heads * L * S`` scores,
    held for the backward); else rdiag's operator (``heads * L * block`` for the
    largest call, transient).

    Args:
        calls: The calls of one forward (:attr:`AttentionRouter.calls`), per sample.
        block_size: Keys per block, or ``None`` for math attention.
    """
    if not calls:
        return 0.0
    if block_size is None:
        return float(sum(c.heads * c.queries * c.keys * c.itemsize for c in calls))
    return float(
        max(c.heads * c.queries * min(c.keys, block_size) * c.itemsize for c in calls)
    )
