"""rdiag's blocked attention against torch's math attention, float64, to 1e-10.

The operator alone (forward, forward mode, reverse, forward-over-reverse,
reverse-over-reverse, vmap of each) over masks, head layouts and block sizes;
then the routing inside rdiag's products on Hugging Face GPT-2, BERT, ViT and a
Llama-style model (rotary embeddings, grouped-query attention): HVPs, GGN
products and eNTKs through the operator equal those through math attention.
Memory and time are measured in bench/bench_attention.py, not here.
"""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vjp, vmap

from rdiag._autodiff import attention_calls, math_attention, probe_jvp_mode
from rdiag.attention import (
    AttentionCall,
    attention_workspace,
    blocked_attention,
    efficient_attention,
    uncovered,
)
from tests._assert import assert_close

TOL = dict(rtol=1e-10, atol=1e-12)
DT = torch.float64


def _math(*args, **kwargs):
    with math_attention():
        return F.scaled_dot_product_attention(*args, **kwargs)


def _case(name: str, gen: torch.Generator):
    """``(q, k, v, kwargs)`` of one layout / mask case (batch 2, 4 query heads)."""
    b, h, length, keys, e = 2, 4, 19, 19, 5

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=DT)

    heads_kv, kwargs = h, {}
    if name == "gqa":
        heads_kv, kwargs = 2, {"enable_gqa": True}
    elif name == "mqa":
        heads_kv, kwargs = 1, {"enable_gqa": True, "is_causal": True}
    elif name == "cross":
        keys = 23
    elif name == "causal_wide":  # keys past the last query: seen by none
        keys, kwargs = 30, {"is_causal": True}
    q, k, v = r(b, h, length, e), r(b, heads_kv, keys, e), r(b, heads_kv, keys, 3)
    if name == "causal":
        kwargs = {"is_causal": True, "scale": 0.7}
    elif name == "padding":  # boolean, one sample padded, one row attending nothing
        mask = torch.ones(b, 1, length, keys, dtype=torch.bool)
        mask[0, ..., -4:] = False
        mask[1, 0, 3] = False
        kwargs = {"attn_mask": mask}
    elif name == "additive":  # float with -inf entries and a fully masked row
        mask = r(1, h, length, keys)
        mask[0, :, :, 7] = -torch.inf
        mask[0, 1, 2] = -torch.inf
        kwargs = {"attn_mask": mask}
    return q, k, v, kwargs


CASES = ["plain", "causal", "padding", "additive", "gqa", "mqa", "cross", "causal_wide"]


@pytest.mark.parametrize("block", [4, 128])
@pytest.mark.parametrize("name", CASES)
def test_every_derivative_equals_math_attention(name: str, block: int) -> None:
    gen = torch.Generator().manual_seed(CASES.index(name))
    q, k, v, kw = _case(name, gen)
    tangents = tuple(torch.randn(t.shape, generator=gen, dtype=DT) for t in (q, k, v))

    def mine(*qkv):
        return blocked_attention(*qkv, **kw, block_size=block)

    def ref(*qkv):
        return _math(*qkv, **kw)

    def loss(fn):
        return lambda *qkv: (fn(*qkv).sin() * 1.3).sum()

    def g(fn):
        return grad(loss(fn), argnums=(0, 1, 2))

    assert_close(f"{name} out", ref(q, k, v), mine(q, k, v), **TOL)
    assert_close(
        f"{name} jvp",
        jvp(ref, (q, k, v), tangents)[1],
        jvp(mine, (q, k, v), tangents)[1],
        **TOL,
    )
    pairs = {
        "grad": (g(ref)(q, k, v), g(mine)(q, k, v)),
        "forward-over-reverse": (
            jvp(g(ref), (q, k, v), tangents)[1],
            jvp(g(mine), (q, k, v), tangents)[1],
        ),
        "reverse-over-reverse": (
            vjp(g(ref), q, k, v)[1](tangents),
            vjp(g(mine), q, k, v)[1](tangents),
        ),
    }
    for what, (expected, actual) in pairs.items():
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_close(f"{name} {what} d{'qkv'[i]}", e, a, **TOL)


@pytest.mark.parametrize("name", ["plain", "causal", "gqa"])
def test_vmapped_products_equal_math_attention(name: str) -> None:
    gen = torch.Generator().manual_seed(7)
    q, k, v, kw = _case(name, gen)
    t = tuple(torch.randn(x.shape[1:], generator=gen, dtype=DT) for x in (q, k, v))
    u = torch.randn(q.shape[1:-1] + (v.shape[-1],), generator=gen, dtype=DT)

    def per_sample(fn):
        def jv(*qkv):
            return jvp(lambda *a: fn(*a, **kw), qkv, t)[1]

        def vj(*qkv):
            return vjp(lambda *a: fn(*a, **kw), *qkv)[1](u)

        return vmap(jv)(q, k, v), vmap(vj)(q, k, v)

    (ej, ev), (aj, av) = per_sample(_math), per_sample(blocked_attention)
    assert_close(f"{name} vmap jvp", ej, aj, **TOL)
    for i, (e, a) in enumerate(zip(ev, av)):
        assert_close(f"{name} vmap vjp d{'qkv'[i]}", e, a, **TOL)


def test_a_mask_that_depends_on_parameters_is_differentiated() -> None:
    gen = torch.Generator().manual_seed(3)
    q, k, v, _ = _case("plain", gen)
    bias = torch.randn(1, 4, 19, 19, generator=gen, dtype=DT)
    tangent = torch.randn(bias.shape, generator=gen, dtype=DT)

    def out(fn, b):
        return fn(q, k, v, attn_mask=b).cos().sum()

    assert_close("d/dmask", grad(lambda b: out(_math, b))(bias),
                 grad(lambda b: out(blocked_attention, b))(bias), **TOL)  # fmt: skip
    assert_close(
        "HVP in the mask",
        jvp(grad(lambda b: out(_math, b)), (bias,), (tangent,))[1],
        jvp(grad(lambda b: out(blocked_attention, b)), (bias,), (tangent,))[1],
        **TOL,
    )


def test_what_is_not_covered_is_named_and_routed_to_math_attention() -> None:
    q = torch.randn(2, 3, 6, 4, dtype=DT)
    assert uncovered(q, q, q, dropout_p=0.1) == "attention dropout (mode='train')"
    assert "both attn_mask and is_causal" in uncovered(
        q, q, q, attn_mask=torch.ones(6, 6, dtype=torch.bool), is_causal=True
    )
    assert "dtype torch.int64" in uncovered(q, q, q, attn_mask=torch.ones(6, 6).long())
    assert "differ" in uncovered(q, q[:, :2], q[:, :2])  # fewer heads, no enable_gqa
    assert uncovered(q, q, q, attn_mask=torch.ones(3, 6, 6, dtype=torch.bool)) is None
    with pytest.raises(ValueError, match="does not cover attention dropout"):
        blocked_attention(q, q, q, dropout_p=0.5)
    with pytest.raises(ValueError, match="block_size >= 1"):
        blocked_attention(q, q, q, block_size=0)
    torch.manual_seed(0)
    with efficient_attention() as router:
        out = F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    assert router.fallbacks == {"attention dropout (mode='train')"}
    assert [c.covered for c in router.calls] == [False]
    torch.manual_seed(0)
    assert_close("dropout by torch", _math(q, q, q, dropout_p=0.5), out, **TOL)


def test_routing_is_per_thread_and_restored() -> None:
    q = torch.randn(1, 2, 5, 4, dtype=DT)
    original = F.scaled_dot_product_attention
    inside, other_done = threading.Event(), threading.Event()
    other_calls = []

    def other() -> None:
        inside.wait(5)
        # This thread has no router: torch's own attention, nothing recorded.
        other_calls.append(F.scaled_dot_product_attention(q, q, q))
        other_done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with efficient_attention(block_size=2) as router:
        F.scaled_dot_product_attention(q, q, q)
        inside.set()
        other_done.wait(5)
    thread.join(5)
    assert len(router.calls) == 1 and len(other_calls) == 1
    assert router.calls[0] == AttentionCall(2, 5, 5, 8, True)
    assert F.scaled_dot_product_attention is original
    assert torch.backends.mha.get_fastpath_enabled()


def test_workspace_is_per_block_against_the_whole_scores() -> None:
    calls = [AttentionCall(12, 2048, 2048, 4, True)] * 2
    assert attention_workspace(calls, None) == 2 * 12 * 2048 * 2048 * 4
    assert attention_workspace(calls, 128) == 12 * 2048 * 128 * 4
    assert attention_workspace([], 128) == 0.0


# ---- inside rdiag's products, on Hugging Face models -----------------------------------
TOKENS, VOCAB = 12, 17


def _hf(name: str):
    """``(model, x, y, loss_fn)`` from a small config (seeded, eval mode, sdpa)."""
    import transformers

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    n = 3
    ids = torch.randint(0, VOCAB, (n, TOKENS), generator=gen)
    pad = torch.ones(n, TOKENS, dtype=torch.long)
    pad[0, -3:] = 0  # right-padded sample
    common = dict(attn_implementation="sdpa")
    if name == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=TOKENS, n_embd=8,
                                      n_layer=1, n_head=2, bos_token_id=0,
                                      eos_token_id=0, **common)  # fmt: skip
        model = transformers.GPT2LMHeadModel(cfg)
        x = {"input_ids": ids, "attention_mask": pad}
        y = torch.randint(0, VOCAB, (n, TOKENS), generator=gen)
        return model.eval(), x, y, F.cross_entropy
    if name == "llama":  # rotary embeddings, 4 query heads sharing 2 key/value heads
        cfg = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=24,
            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=TOKENS, **common,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(cfg)
        x = {"input_ids": ids}
        y = torch.randint(0, VOCAB, (n, TOKENS), generator=gen)
        return model.eval(), x, y, F.cross_entropy
    if name == "bert":
        cfg = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=16,
            max_position_embeddings=TOKENS, num_labels=3, **common,
        )  # fmt: skip
        model = transformers.BertForSequenceClassification(cfg)
        x = {"input_ids": ids, "attention_mask": pad}
        y = torch.randint(0, 3, (n,), generator=gen)
        return model.eval(), x, y, F.cross_entropy
    cfg = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=2, hidden_size=8,
        num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        num_labels=3, **common,
    )  # fmt: skip
    model = transformers.ViTForImageClassification(cfg)
    x = {"pixel_values": torch.randn(n, 2, 8, 8, generator=gen)}
    y = torch.randint(0, 3, (n,), generator=gen)
    return model.eval(), x, y, F.cross_entropy


HF = ["gpt2", "bert", "vit", "llama"]


def LOGITS(out):  # noqa: N802  (a constant-like selector)
    """The logits of a Hugging Face output."""
    return out.logits


def _routed_calls(monkeypatch) -> list[int]:
    """Counts calls of the blocked operator (a spy: the test fails if it is bypassed)."""
    import rdiag.attention as attention

    seen = []
    real = attention._Attention.apply

    def spy(*args):
        seen.append(args[0].shape[-2])
        return real(*args)

    monkeypatch.setattr(attention._Attention, "apply", spy)
    monkeypatch.setattr(attention, "DEFAULT_BLOCK", 5)  # 3 blocks of the 12 keys
    return seen


@pytest.mark.parametrize("name", HF)
def test_hvp_and_ggn_through_the_operator_equal_math_attention(name, monkeypatch):
    from rdiag.operators.ggn import GGNOperator
    from rdiag.operators.hessian import HessianOperator

    from rdiag.operators import hessian as hessian_module
    from rdiag.operators.curvature import trainable_mask

    model, x, y, loss_fn = _hf(name)
    seen = _routed_calls(monkeypatch)
    # The products through rdiag's operator (forward-over-reverse), not the retained
    # graph that short sequences keep (reverse-over-reverse under math attention).
    monkeypatch.setattr(hessian_module, "RETAINED_SCORES_BYTES", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback notice
        h = HessianOperator(model, loss_fn, (x, y), dtype=DT, output_fn=LOGITS)
        g = GGNOperator(model, loss_fn, (x, y), dtype=DT, output_fn=LOGITS)
        v = torch.randn(h.shape[0], 2, generator=torch.Generator().manual_seed(5),
                        dtype=DT)  # fmt: skip
        hv, gv = h.matmat(v), g.matmat(v)
    assert seen, "the products did not run rdiag's attention"
    assert h.failed_strategies == set() and g._jvp_mode == "attention"
    seen.clear()
    # BERT's padding row of the word embeddings has no gradient: the operators act
    # on the other coordinates (P H P).
    keep = trainable_mask(h.fm)
    if keep is not None:
        v = v * keep.to(DT)[:, None]
    # The same products with the math backend and torch.func, no rdiag routing.
    theta = h.fm.flatten(h.fm.params)

    def loss(t):
        return h.batch_loss(h.fm.unflatten(t), h.fm.cast_input(x, "x"), y)

    def out(t):
        return g.outputs(g.fm.unflatten(t), g.fm.cast_input(x, "x"))

    with math_attention():
        ref_h = torch.stack([jvp(grad(loss), (theta,), (c,))[1] for c in v.T], 1)
        o, pull = vjp(out, theta)
        curv = g._curvature(o.detach(), y)
        ref_g = torch.stack(
            [pull(curv(jvp(out, (theta,), (c,))[1]))[0] for c in v.T], 1
        )
    assert not seen
    if keep is not None:
        ref_h, ref_g = (r * keep.to(DT)[:, None] for r in (ref_h, ref_g))
    assert_close(f"{name} HVP", ref_h, hv, **TOL)
    assert_close(f"{name} GGN", ref_g, gv, **TOL)


@pytest.mark.parametrize("name", HF)
def test_entk_through_the_operator_equals_math_attention(name, monkeypatch) -> None:
    from rdiag import ntk_fn

    model, x, _, _ = _hf(name)
    x1 = {k: t[:2] for k, t in x.items()}
    seen = _routed_calls(monkeypatch)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "(?s).*(math attention|forward-mode)")
        handle = ntk_fn(model, implementation="ntvp", dtype=DT, output_fn=LOGITS,
                        readout_identity=False)  # fmt: skip
        kernel = handle(x1, x)
    assert seen and handle.jvp_mode(x1) == "attention"
    assert "attention by rdiag's blocked operator" in handle.explain()
    seen.clear()
    # The same implementation with math attention (torch's forward mode).
    reference = ntk_fn(model, implementation="ntvp", dtype=DT, output_fn=LOGITS,
                       readout_identity=False)  # fmt: skip
    reference._jvp_mode = "math_attention"
    with math_attention():
        expected = reference(x1, x)
    assert not seen
    assert_close(f"{name} eNTK", expected, kernel, **TOL)


def test_probe_finds_the_operator_and_says_nothing() -> None:
    from rdiag import functionalize

    model, x, _, _ = _hf("gpt2")
    fm = functionalize(model, dtype=DT, output_fn=LOGITS)
    xb = fm.cast_input(x, "x")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert probe_jvp_mode(fm, xb) == "attention"
        calls = attention_calls(fm, xb)
    # One sample, one layer: 2 heads of 12 queries and keys, float64, covered.
    assert calls == [AttentionCall(2, TOKENS, TOKENS, 8, True)]


def test_dropout_in_train_mode_falls_back_with_one_notice() -> None:
    from rdiag import functionalize

    model, x, _, _ = _hf("bert")  # attention dropout 0.1 (BERT's default)
    fm = functionalize(model, dtype=DT, mode="train", output_fn=LOGITS)
    xb = fm.cast_input(x, "x")
    with pytest.warns(UserWarning, match="attention dropout"):
        assert attention_calls(fm, xb)
