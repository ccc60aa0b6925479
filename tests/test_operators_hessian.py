"""HessianOperator and hvp against the dense float64 Hessian (tests/oracles.py)."""

from __future__ import annotations

import functools

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


def test_attention_falls_back_once_and_remembers() -> None:
    net, x, y, loss_fn, _ = make_case("attention", "mse")
    op = HessianOperator(net, loss_fn, (x, y), dtype=torch.float64)
    op.matvec(torch.ones(op.shape[0], dtype=torch.float64))
    # The fused CPU attention has no double backward; the retained graph built
    # under the math backend works (one backward a product, not the forward and
    # backward of forward-over-reverse), and the later products reuse it.
    assert op.failed_strategies == {"reverse-over-reverse on a retained graph"}
    graph = op._graph
    op.matvec(torch.ones(op.shape[0], dtype=torch.float64))
    assert op._graph is graph
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
