"""The Triton attention kernels against rdiag's torch operator (the reference).

Under ``TRITON_INTERPRET=1`` at small shapes (tile 16 x 16, so every case has
partial tiles): forward ``(o, lse)``, the JVP, the backward, and the backward's
own JVP (forward over reverse: the attention's share of an HVP), for no mask,
causal, boolean padding (one row attending nothing) and broadcast additive masks.
The reference runs in float64 on the same float32 inputs; the kernels accumulate
in float32, so the tolerance is float32 round-off over a softmax of ``S`` terms:
``rtol = 1e-4``, ``atol = 1e-5 * max |expected|``.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch.func import grad, jvp, vjp

from rdiag.attention import _Attention, blocked_attention
from tests._assert import assert_close
from tests.kernels.conftest import randn

#: (BH, L, S, E, Ev): partial tiles everywhere, L != S, Ev != E.
SHAPES = [(3, 37, 29, 12, 7), (2, 16, 40, 20, 16), (1, 5, 5, 3, 2)]
MASKS = ["none", "causal", "bool", "additive"]


def _close(name: str, expected, actual) -> None:
    expected = expected.double()
    finite = torch.isfinite(expected)
    scale = float(expected[finite].abs().max()) if finite.any() else 1.0
    assert_close(name, expected, actual, rtol=1e-4, atol=1e-5 * scale)


def _triton():
    return importlib.import_module("rdiag.kernels.triton_attention")


def _case(shape, kind: str, seed: int = 0):
    bh, length, keys, e, ev = shape
    q = randn(bh, length, e, dtype=torch.float32, seed=seed)
    k = randn(bh, keys, e, dtype=torch.float32, seed=seed + 1)
    v = randn(bh, keys, ev, dtype=torch.float32, seed=seed + 2)
    mask, causal = None, kind == "causal"
    if kind == "bool":
        mask = randn(bh, length, keys, seed=seed + 3) > -0.5
        mask[0, min(3, length - 1)] = False  # a row with nothing to attend
    elif kind == "additive":
        mask = randn(1, length, keys, dtype=torch.float32, seed=seed + 3)
        mask[..., 0] = -torch.inf
    return q, k, v, mask, causal


def _reference(q, k, v, mask, causal, scale):
    """``(o, lse)`` of the torch operator in float64, ``(BH, L, *)``."""
    bh, length, keys = q.shape[0], q.shape[1], k.shape[1]
    if mask is not None:
        mask = mask if mask.dtype == torch.bool else mask.double()
        mask = mask.expand(bh, length, keys)
    return _Attention.apply(q, k, v, mask, causal, scale, 8)


def _finite(t):
    return torch.where(torch.isinf(t), torch.zeros_like(t), t)


@pytest.mark.triton_interpret
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernels_match_the_torch_operator(shape, kind) -> None:
    tri = _triton()
    q, k, v, mask, causal = _case(shape, kind)
    scale = 0.4
    tq, tk, tv = (randn(*t.shape, dtype=torch.float32, seed=9 + i)
                  for i, t in enumerate((q, k, v)))  # fmt: skip
    go = randn(*q.shape[:2], v.shape[2], dtype=torch.float32, seed=20)
    glse = randn(*q.shape[:2], dtype=torch.float32, seed=21)
    tgo = randn(*go.shape, dtype=torch.float32, seed=22)
    tglse = randn(*glse.shape, dtype=torch.float32, seed=23)
    d = [t.double() for t in (q, k, v, tq, tk, tv, go, glse, tgo, tglse)]
    (q64, k64, v64, tq64, tk64, tv64, go64, glse64, tgo64, tglse64) = d

    def ref(*qkv):
        return _reference(*qkv, mask, causal, scale)

    def pullback(q_, k_, v_, go_, glse_):
        return vjp(ref, q_, k_, v_)[1]((go_, glse_))

    o64, lse64 = ref(q64, k64, v64)
    do64, dlse64 = jvp(ref, (q64, k64, v64), (tq64, tk64, tv64))[1]
    grads64, tangents64 = jvp(
        pullback, (q64, k64, v64, go64, glse64), (tq64, tk64, tv64, tgo64, tglse64)
    )

    o, lse = tri.attention_forward(q, k, v, mask, causal=causal, scale=scale)
    _close(f"{kind} o", o64, o)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse64))
    _close(f"{kind} lse", _finite(lse64), _finite(lse))
    do, dlse = tri.attention_jvp(q, k, v, o, lse, tq, tk, tv, mask, causal=causal,
                                 scale=scale)  # fmt: skip
    _close(f"{kind} jvp o", do64, do)
    _close(f"{kind} jvp lse", dlse64, dlse)
    out = tri.attention_backward(q, k, v, o, lse, go, glse, mask, causal=causal,
                                 scale=scale, tangents=(tq, tk, tv, tgo, tglse))  # fmt: skip
    plain = tri.attention_backward(q, k, v, o, lse, go, glse, mask, causal=causal,
                                   scale=scale)  # fmt: skip
    for i, name in enumerate("qkv"):
        _close(f"{kind} d{name}", grads64[i], out[i])
        _close(f"{kind} d{name} (no tangents)", grads64[i], plain[i])
        _close(f"{kind} tangent of d{name}", tangents64[i], out[3 + i])


@pytest.mark.triton_interpret
@pytest.mark.parametrize("kind", ["causal", "bool"])
def test_hvp_through_the_triton_function_equals_the_torch_operator(kind) -> None:
    tri = _triton()
    q, k, v, mask, causal = _case((2, 21, 21, 8, 8), kind, seed=4)
    t = tuple(randn(*x.shape, dtype=torch.float32, seed=30 + i)
              for i, x in enumerate((q, k, v)))  # fmt: skip
    m4 = None if mask is None else mask.reshape(1, *mask.shape)

    def loss(fn, mask_):
        return lambda *qkv: (fn(*qkv, mask_) ** 2).sum()

    def mine(q_, k_, v_, mask_):
        return tri.attention(q_, k_, v_, mask_, causal=causal)

    def ref(q_, k_, v_, mask_):
        return blocked_attention(q_, k_, v_, attn_mask=mask_, is_causal=causal)

    g = grad(loss(mine, mask), argnums=(0, 1, 2))
    g64 = grad(loss(ref, m4), argnums=(0, 1, 2))
    d64 = tuple(x.double()[None] for x in (q, k, v))
    t64 = tuple(x.double()[None] for x in t)
    expected = jvp(g64, d64, t64)[1]
    actual = jvp(g, (q, k, v), t)[1]
    out = jvp(lambda *a: mine(*a, mask), (q, k, v), t)
    ref_out = jvp(lambda *a: ref(*a, m4), d64, t64)
    _close(f"{kind} out", ref_out[0][0], out[0])
    _close(f"{kind} jvp", ref_out[1][0], out[1])
    for i, name in enumerate("qkv"):
        _close(f"{kind} HVP {name}", expected[i][0], actual[i])


def test_launchers_check_their_inputs() -> None:
    tri = _triton()
    q = torch.randn(2, 5, 4)
    with pytest.raises(TypeError, match="float64"):
        tri.attention_forward(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match=r"\(BH, L, E\)"):
        tri.attention_forward(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="shared BH, E and S"):
        tri.attention_forward(q, q[:, :, :3], q)
    with pytest.raises(ValueError, match="broadcastable to"):
        tri.attention_forward(q, q, q, torch.ones(3, 5, 5, dtype=torch.bool))


def test_dispatcher_runs_the_torch_operator_off_cuda(monkeypatch) -> None:
    from rdiag import kernels

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, mask, _ = _case((2, 9, 11, 4, 3), "bool")
    expected = blocked_attention(q, k, v, attn_mask=mask)
    assert torch.equal(kernels.attention(q, k, v, mask), expected)


@pytest.mark.triton_interpret
def test_dispatcher_runs_the_kernels_under_the_interpreter(monkeypatch) -> None:
    from rdiag import kernels

    monkeypatch.delenv("RDIAG_KERNELS", raising=False)
    q, k, v, mask, _ = _case((2, 9, 11, 4, 3), "bool")
    calls = []
    tri = _triton()
    real = tri.attention_forward
    monkeypatch.setattr(
        tri, "attention_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    out = kernels.attention(q, k, v, mask, causal=False)
    assert calls, "the dispatcher did not run the Triton kernel"
    _close(
        "dispatched",
        blocked_attention(q.double(), k.double(), v.double(), attn_mask=mask),
        out,
    )
