"""GGN and Fisher operators against dense J^T H_l J from per-sample Jacobians."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian, jacobian
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, TensorDataset

from rdiag.operators.ggn import FisherOperator, GGNOperator, infer_loss_kind
from tests import oracles
from tests._assert import assert_close
from tests.test_operators_hessian import CASES, make_case


def _double(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.is_floating_point() else t


@functools.lru_cache(maxsize=None)
def ggn_case(arch: str, loss: str, n: int = 6):
    """Case, per-sample Jacobians ``(N, O, P)``, raw outputs and dense ``J^T H_l J``."""
    net, x, y, loss_fn, names = make_case(arch, loss, n)
    with sdpa_kernel(SDPBackend.MATH):
        jac = oracles.per_sample_jacobian(net, names, x)
    out = net(_double(x)).detach()
    h_l = hessian(lambda o: loss_fn(o, _double(y)), out).reshape(
        out.numel(), out.numel()
    )
    flat = jac.reshape(-1, jac.shape[-1])
    return net, x, y, loss_fn, names, jac, out, flat.T @ h_l @ flat


@pytest.mark.parametrize("arch,loss", [c for c in CASES if c[0] != "batchnorm"])
def test_ggn_matches_dense(arch: str, loss: str) -> None:
    net, x, y, loss_fn, _, _, _, expected = ggn_case(arch, loss)
    op = GGNOperator(net, loss_fn, (x, y), dtype=torch.float64)
    assert op.loss == {"mse": "mse", "ce": "cross_entropy"}[loss]
    v = torch.randn(op.shape[0], 4, dtype=torch.float64)
    assert_close(
        f"GGN {arch} {loss}", expected @ v, op.matmat(v), rtol=1e-9, atol=1e-12
    )
    autodiff = GGNOperator(net, loss_fn, (x, y), dtype=torch.float64, loss="autodiff")
    assert_close(
        f"GGN autodiff {arch}", expected @ v, autodiff.matmat(v), rtol=1e-9, atol=1e-12
    )


@pytest.mark.parametrize("target", ["ignore_index", "probabilities"])
def test_cross_entropy_closed_form_variants(target: str) -> None:
    net, x, _, _, _ = make_case("mlp_tanh", "ce")
    if target == "ignore_index":
        y = torch.tensor([0, 2, -100, 1, 1, -100])
    else:
        y = torch.softmax(
            torch.randn(6, 3, generator=torch.Generator().manual_seed(3)), 1
        )
    closed = GGNOperator(net, F.cross_entropy, (x, y), dtype=torch.float64)
    generic = GGNOperator(
        net, F.cross_entropy, (x, y), dtype=torch.float64, loss="autodiff"
    )
    v = torch.randn(closed.shape[0], 3, dtype=torch.float64)
    assert_close(
        f"CE {target}", generic.matmat(v), closed.matmat(v), rtol=1e-10, atol=1e-13
    )


def test_ggn_dataloader_equals_one_batch() -> None:
    net, x, y, loss_fn, _ = make_case("mlp_tanh", "ce", n=10)
    loader = DataLoader(TensorDataset(x, y), batch_size=3)  # 3, 3, 3, 1
    v = torch.randn(111, 2, dtype=torch.float64)
    whole = GGNOperator(net, loss_fn, (x, y), dtype=torch.float64).matmat(v)
    split = GGNOperator(net, loss_fn, loader, dtype=torch.float64).matmat(v)
    assert_close("GGN loader", whole, split, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_empirical_fisher_is_mean_of_per_sample_gradient_outer_products(
    loss: str,
) -> None:
    net, x, y, loss_fn, names = make_case("cnn" if loss == "mse" else "mlp_tanh", loss)
    theta, f = oracles.flat_function(net, names)
    out_shape = net(_double(x)).shape[1:]

    def sample_loss(t: torch.Tensor, i: int) -> torch.Tensor:
        out = f(t, _double(x[i : i + 1])).reshape(1, *out_shape)
        return loss_fn(out, _double(y[i : i + 1]))

    grads = torch.stack(
        [jacobian(functools.partial(sample_loss, i=i), theta) for i in range(len(x))]
    )
    expected = grads.T @ grads / len(x)
    op = FisherOperator(net, loss_fn, (x, y), dtype=torch.float64)
    assert_close(
        f"empirical Fisher {loss}", expected, op.to_dense(), rtol=1e-9, atol=1e-12
    )


def test_true_fisher_is_the_ggn_and_needs_a_likelihood() -> None:
    net, x, y, loss_fn, _, _, _, expected = ggn_case("mlp_tanh", "ce")
    op = FisherOperator(net, loss_fn, (x, y), dtype=torch.float64, kind="true")
    assert_close("true Fisher", expected, op.to_dense(), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="true Fisher"):
        FisherOperator(net, F.huber_loss, (x, torch.randn(6, 3)), kind="true")
    with pytest.raises(ValueError, match="kind"):
        FisherOperator(net, loss_fn, (x, y), kind="exact")


def test_loss_kind_inference_and_errors() -> None:
    assert infer_loss_kind(nn.MSELoss()) == "mse"
    assert infer_loss_kind(nn.CrossEntropyLoss()) == "cross_entropy"
    assert infer_loss_kind(nn.CrossEntropyLoss(label_smoothing=0.1)) == "autodiff"
    assert infer_loss_kind(nn.MSELoss(reduction="sum")) == "autodiff"
    net, x, y, loss_fn, _ = make_case("mlp_tanh", "mse")
    with pytest.raises(ValueError, match="loss"):
        GGNOperator(net, loss_fn, (x, y), loss="hinge")


def test_reverse_mode_fallbacks_agree_with_dense() -> None:
    from rdiag.operators.hessian import HessianOperator
    from tests.test_operators_hessian import case_and_hessian

    net, x, y, loss_fn, _, _, _, ggn = ggn_case("layernorm", "ce")
    hess = case_and_hessian("layernorm", "ce")[-1]
    # Skipping these leaves reverse-over-reverse, used when forward mode is missing
    # even with the math attention backend; the GGN's J v then uses double-vjp.
    v = torch.randn(ggn.shape[0], 3, dtype=torch.float64)
    h_op = HessianOperator(net, loss_fn, (x, y), dtype=torch.float64)
    h_op.failed_strategies.update(
        {
            "reverse-over-reverse on a retained graph",
            "forward-over-reverse",
            "forward-over-reverse with math attention",
        }
    )
    g_op = GGNOperator(net, loss_fn, (x, y), dtype=torch.float64)
    g_op._jvp_mode = "reverse"
    assert_close("H reverse", hess @ v, h_op.matmat(v), rtol=1e-9, atol=1e-12)
    assert_close("GGN double vjp", ggn @ v, g_op.matmat(v), rtol=1e-9, atol=1e-12)


def test_train_mode_batchnorm_ggn_uses_the_batch_jacobian() -> None:
    net, x, y, loss_fn, names = make_case("batchnorm", "ce")
    jac = oracles.batch_jacobian(net, names, x, train=True)  # (N, O, P) of the batch
    out = net.train()(x.double()).detach()
    h_l = hessian(lambda o: loss_fn(o, y), out).reshape(out.numel(), out.numel())
    flat = jac.reshape(-1, jac.shape[-1])
    op = GGNOperator(net, loss_fn, (x, y), mode="train", dtype=torch.float64)
    assert op.fm.batch_coupled
    assert_close(
        "GGN train BN", flat.T @ h_l @ flat, op.to_dense(), rtol=1e-9, atol=1e-12
    )
