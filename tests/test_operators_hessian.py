"""HessianOperator and hvp against the dense float64 Hessian (tests/oracles.py)."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, TensorDataset

from rdiag.operators.hessian import HessianOperator, hvp
from tests import oracles
from tests._assert import assert_close
from tests.models import ZOO

ARCHS = ["mlp_tanh", "cnn", "layernorm", "batchnorm", "attention", "embedding"]
# Cross-entropy needs (N, C) logits; the CNN runs once to keep the suite fast.
CASES = [(a, "mse") for a in ARCHS] + [
    (a, "ce") for a in ARCHS if a not in ("attention", "cnn")
]


def make_case(arch: str, loss: str, n: int = 6, seed: int = 0, scale: float = 1.0):
    """``(net, x, y, loss_fn, names)``: a zoo model with targets for the loss.

    ``scale`` multiplies the MSE targets (large targets: a strongly indefinite H).
    """
    net, make_input = ZOO[arch](seed)
    x = make_input(n, seed + 1)
    with torch.no_grad():
        out = net.eval()(x)
    gen = torch.Generator().manual_seed(seed + 2)
    if loss == "mse":
        y = scale * torch.randn(out.shape, generator=gen)
        loss_fn = F.mse_loss
    else:
        y = torch.randint(0, out.shape[1], (n,), generator=gen)
        loss_fn = F.cross_entropy
    names = [name for name, _ in net.named_parameters()]
    return net, x, y, loss_fn, names


@functools.lru_cache(maxsize=None)
def case_and_hessian(
    arch: str, loss: str, n: int = 6, seed: int = 0, scale: float = 1.0
):
    """``make_case(...)`` plus the dense float64 Hessian, cached across tests."""
    net, x, y, loss_fn, names = make_case(arch, loss, n, seed, scale)
    theta, f = oracles.flat_function(net, names)
    xd = x.double() if x.is_floating_point() else x
    yd = y.double() if y.is_floating_point() else y
    with torch.no_grad():
        out_shape = net(xd).shape

    def loss_of(t: torch.Tensor) -> torch.Tensor:
        return loss_fn(f(t, xd).reshape(out_shape), yd)

    # oracles.dense_hessian, vectorized (one vmapped double backward instead of P),
    # and with the math attention backend (the fused one has no double backward).
    with sdpa_kernel(SDPBackend.MATH):
        dense = hessian(loss_of, theta, vectorize=True)
    return net, x, y, loss_fn, names, dense


@pytest.mark.parametrize("arch,loss", CASES)
def test_hessian_operator_matches_dense(arch: str, loss: str) -> None:
    net, x, y, loss_fn, _, expected = case_and_hessian(arch, loss)
    op = HessianOperator(net, loss_fn, (x, y), dtype=torch.float64)
    v = torch.randn(op.shape[0], 3, dtype=torch.float64)
    assert op.shape == expected.shape
    assert_close(f"H {arch} {loss}", expected @ v, op.matmat(v), rtol=1e-9, atol=1e-12)


def test_hvp_flat_and_dict() -> None:
    net, x, y, loss_fn, names, expected = case_and_hessian("mlp_tanh", "mse")
    v = torch.randn(expected.shape[0], dtype=torch.float64)
    flat = hvp(net, loss_fn, (x, y), v, dtype=torch.float64)
    assert_close("hvp flat", expected @ v, flat, rtol=1e-10, atol=1e-12)
    op = HessianOperator(net, loss_fn, (x, y), dtype=torch.float64)
    as_dict = hvp(net, loss_fn, (x, y), op.fm.unflatten(v), dtype=torch.float64)
    assert set(as_dict) == set(names)
    assert_close(
        "hvp dict", expected @ v, op.fm.flatten(as_dict), rtol=1e-10, atol=1e-12
    )


def test_parameter_block_is_the_dense_block() -> None:
    net, x, y, loss_fn, _, full = case_and_hessian("mlp_tanh", "ce")
    op = HessianOperator(net, loss_fn, (x, y), params="2.*", dtype=torch.float64)
    start = sum(
        p.numel()
        for n, p in net.named_parameters()
        if not n.startswith("2") and n < "2"
    )
    block = full[start : start + op.shape[0], start : start + op.shape[0]]
    assert op.fm.names == ("2.weight", "2.bias")
    assert_close("H block", block, op.to_dense(), rtol=1e-10, atol=1e-12)


def test_short_attention_keeps_a_retained_graph_without_a_notice() -> None:
    net, x, y, loss_fn, _ = make_case("attention", "mse")
    op = HessianOperator(net, loss_fn, (x, y), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        op.matvec(torch.ones(op.shape[0], dtype=torch.float64))
    # Few scores: the retained graph built under the math backend (the fused CPU
    # attention has no double backward) is the first strategy, chosen, not fallen
    # back to; one backward a product, and the later products reuse it.
    assert op.failed_strategies == set()
    graph = op._graph
    assert graph is not None
    op.matvec(torch.ones(op.shape[0], dtype=torch.float64))
    assert op._graph is graph


def test_long_attention_runs_rdiag_operator_without_a_notice(monkeypatch) -> None:
    from rdiag.operators import hessian as hessian_module

    monkeypatch.setattr(hessian_module, "RETAINED_SCORES_BYTES", 0)  # as if T were long
    net, x, y, loss_fn, _ = make_case("attention", "mse")
    op = HessianOperator(net, loss_fn, (x, y), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        hv = op.matvec(torch.ones(op.shape[0], dtype=torch.float64))
    # Forward-over-reverse through rdiag's attention is the first strategy.
    assert op.failed_strategies == set() and op._graph is None
    monkeypatch.undo()  # the retained graph under math attention, as a reference
    retained = HessianOperator(net, loss_fn, (x, y), dtype=torch.float64)
    expected = retained.matvec(torch.ones_like(hv))
    assert retained._graph is not None
    assert_close("H v", expected, hv, rtol=1e-10, atol=1e-12)


def test_attention_falls_back_once_and_remembers(monkeypatch) -> None:
    import rdiag.attention
    from rdiag.operators import hessian as hessian_module

    def broken(*args):
        raise NotImplementedError("no rule")

    # rdiag's operator without its derivatives: the chain before it existed.
    for rule in ("jvp", "backward"):
        monkeypatch.setattr(rdiag.attention._Attention, rule, staticmethod(broken))
    monkeypatch.setattr(hessian_module, "RETAINED_SCORES_BYTES", 0)
    net, x, y, loss_fn, _ = make_case("attention", "mse")
    op = HessianOperator(net, loss_fn, (x, y), dtype=torch.float64)
    with pytest.warns(UserWarning, match="retained graph with math attention"):
        op.matvec(torch.ones(op.shape[0], dtype=torch.float64))
    assert op.failed_strategies == {
        "forward-over-reverse with rdiag attention",
        "reverse-over-reverse with rdiag attention",
    }
    # The memory is the operator's: a new operator finds out for itself.
    assert HessianOperator(net, loss_fn, (x, y)).failed_strategies == set()


def test_dataloader_with_uneven_last_batch_equals_one_batch() -> None:
    net, x, y, loss_fn, _ = make_case("mlp_tanh", "mse", n=10)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # batches of 4, 4, 2
    whole = HessianOperator(net, loss_fn, (x, y), dtype=torch.float64).to_dense()
    split = HessianOperator(net, loss_fn, loader, dtype=torch.float64).to_dense()
    assert_close("H loader", whole, split, rtol=1e-10, atol=1e-13)


def test_train_mode_batchnorm_is_the_whole_batch_function() -> None:
    net, x, y, loss_fn, names = make_case("batchnorm", "mse")
    theta, f = oracles.flat_function(net, names, train=True)
    expected = hessian(lambda t: loss_fn(f(t, x.double()), y.double()), theta)
    op = HessianOperator(net, loss_fn, (x, y), mode="train", dtype=torch.float64)
    assert op.fm.batch_coupled
    assert_close("H train BN", expected, op.to_dense(), rtol=1e-9, atol=1e-12)


class _Detached(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).detach()


def test_bad_inputs_give_clear_errors() -> None:
    net, x, y, loss_fn, _ = make_case("mlp_tanh", "mse")
    op = HessianOperator(net, loss_fn, (x, y))
    with pytest.raises(ValueError, match="flat vector of"):
        op.apply(torch.ones(op.shape[0] + 1))
    with pytest.raises(ValueError, match="one tensor per selected parameter"):
        op.apply({"0.weight": torch.ones(7, 5)})
    with pytest.raises(ValueError, match="scalar"):
        HessianOperator(net, lambda o, t: F.mse_loss(o, t, reduction="none"), (x, y))
    frozen = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        HessianOperator(frozen, loss_fn, (torch.ones(4, 3), torch.ones(4, 2)))
    with pytest.raises(ValueError, match="differentiable"):
        HessianOperator(_Detached(), loss_fn, (torch.ones(4, 3), torch.ones(4, 2)))
    with pytest.raises(TypeError, match="batch"):
        HessianOperator(net, loss_fn, x)
    with pytest.raises(TypeError, match="callable"):
        HessianOperator(net, "mse", (x, y))
    with pytest.raises(TypeError, match="one-shot iterator"):
        HessianOperator(net, loss_fn, iter([(x, y)]))
    with pytest.raises(ValueError, match="same leading batch size"):
        HessianOperator(net, loss_fn, (x, y[:3]))


@pytest.mark.slow
def test_compiled_hvp_matches_dense() -> None:
    net, x, y, loss_fn, _, expected = case_and_hessian("mlp_tanh", "mse")
    op = HessianOperator(net, loss_fn, (x, y), dtype=torch.float64, compile=True)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    assert_close("compiled hvp", expected @ v, op.matvec(v), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("edit", ["scale", "permute", "one_entry"])
def test_a_kept_operator_sees_in_place_edits_through_data(edit: str) -> None:
    """``p.data`` edits bump neither storage nor version: the checksum sees them."""
    net, x, y, loss_fn, _ = make_case("mlp_tanh", "mse")
    op = HessianOperator(net, loss_fn, (x, y), dtype=torch.float64)
    v = torch.randn(op.shape[0], 2, dtype=torch.float64)
    before = op.matmat(v)
    weight = next(net.parameters())
    if edit == "scale":
        weight.data.mul_(1.7)
    elif edit == "permute":
        weight.data.copy_(weight.data.flip(0))
    else:
        weight.data[0, 0] += 0.5
    fresh = HessianOperator(net, loss_fn, (x, y), dtype=torch.float64).matmat(v)
    assert (fresh - before).abs().max() > 1e-6  # the edit changes the Hessian
    assert_close(f"H after a .data {edit}", fresh, op.matmat(v), rtol=1e-12, atol=1e-14)


def test_an_embedding_padding_row_is_left_out_symmetrically() -> None:
    """``padding_idx`` zeroes that row's gradient: the operator is ``P H P``.

    Reverse-over-reverse (the retained graph of one batch) gives ``P H P v`` by
    itself; forward-over-reverse (batches from a loader) gave ``P H v``, so the two
    strategies differed (by 1e-4 on a small BERT) and the operator was not
    symmetric.
    """
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(6, 4, padding_idx=0), nn.Flatten(), nn.Linear(12, 2))
    net = net.double()
    x = torch.tensor([[0, 1, 2], [3, 0, 5], [4, 4, 1]])
    y = torch.randn(3, 2, dtype=torch.float64)
    names = [n for n, _ in net.named_parameters()]
    dense = oracles.dense_hessian(net, names, F.mse_loss, x, y)
    keep = torch.ones(dense.shape[0], dtype=torch.float64)
    keep[:4] = 0  # the padding row's four entries
    v, w = torch.randn(2, dense.shape[0], dtype=torch.float64)
    for data in [(x, y), [(x, y)]]:  # retained graph; forward-over-reverse
        op = HessianOperator(net, F.mse_loss, data, dtype=torch.float64)
        hv, hw = op.matvec(v), op.matvec(w)
        assert (op._graph is not None) == isinstance(data, tuple)
        assert float(w @ hv) == pytest.approx(float(v @ hw), rel=1e-12)
        assert_close("P H P v", keep * (dense @ (keep * v)), hv, rtol=1e-10, atol=1e-12)
