"""Forward-mode products and their fallbacks against the float64 Jacobian."""

from __future__ import annotations

import warnings

import pytest
import torch

from rdiag import functionalize
from rdiag._autodiff import jvp, probe_jvp_mode
from tests import oracles
from tests._assert import assert_close
from tests.models import ZOO


@pytest.mark.parametrize("mode", ["attention", "forward", "math_attention", "reverse"])
@pytest.mark.parametrize("name", ["mlp_gelu", "cnn", "layernorm", "embedding"])
def test_every_mode_gives_the_jacobian_product(name: str, mode: str) -> None:
    model, make = ZOO[name](0)
    x = make(3, 1)
    fm = functionalize(model, dtype=torch.float64)
    tangent = {n: torch.randn_like(p) for n, p in fm.params.items()}
    out, jt = jvp(lambda p: fm(p, x), (fm.params,), (tangent,), mode)
    jac = oracles.per_sample_jacobian(model, list(fm.names), x)  # (N, O, P)
    expected = jac @ fm.flatten(tangent)
    assert_close(f"{name} {mode} J t", expected, jt, rtol=1e-10, atol=1e-12)
    assert_close(f"{name} {mode} f", fm(fm.params, x), out, rtol=0, atol=0)


def test_fused_attention_picks_rdiag_attention_silently() -> None:
    model, make = ZOO["attention"](0)
    x = make(3, 1)
    fm = functionalize(model, dtype=torch.float64)
    zeros = {n: torch.zeros_like(p) for n, p in fm.params.items()}
    with pytest.raises(NotImplementedError, match="forward AD"):
        jvp(lambda p: fm(p, x), (fm.params,), (zeros,), "forward")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert probe_jvp_mode(fm, x) == "attention"


def test_fused_attention_picks_math_backend_once_without_rdiag_attention(
    monkeypatch,
) -> None:
    import rdiag.attention

    def broken(*args):
        raise NotImplementedError("no rule")

    # rdiag's operator without its derivatives: the chain before it existed.
    for rule in ("jvp", "backward"):
        monkeypatch.setattr(rdiag.attention._Attention, rule, staticmethod(broken))
    model, make = ZOO["attention"](0)
    x = make(3, 1)
    fm = functionalize(model, dtype=torch.float64)
    with pytest.warns(UserWarning, match="math attention"):
        assert probe_jvp_mode(fm, x) == "math_attention"
    assert probe_jvp_mode(fm, x) == "math_attention"


def test_math_attention_is_restored_after_threads_that_overlap() -> None:
    import threading

    from rdiag._autodiff import math_attention

    before = torch.backends.cuda.flash_sdp_enabled()
    a_inside, b_inside, a_left = threading.Event(), threading.Event(), threading.Event()
    seen = []

    def first() -> None:
        with math_attention():
            a_inside.set()
            b_inside.wait(5)
            seen.append(torch.backends.cuda.flash_sdp_enabled())
        a_left.set()

    def second() -> None:
        a_inside.wait(5)
        with math_attention():
            b_inside.set()
            a_left.wait(5)  # leaves after the first: not nested
            seen.append(torch.backends.cuda.flash_sdp_enabled())

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == [False, False], "the math backend holds while either is inside"
    assert torch.backends.cuda.flash_sdp_enabled() == before
