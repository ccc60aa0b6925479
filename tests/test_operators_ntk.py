"""NTKOperator against the dense kernel and the float64 oracle."""

from __future__ import annotations

import pytest
import torch

from rdiag import NTKOperator, empirical_ntk
from tests import oracles
from tests._assert import assert_close
from tests.models import ZOO

F64 = dict(rtol=1e-9, atol=1e-10)


def _dense(kernel: torch.Tensor) -> torch.Tensor:
    n, _, o, _ = kernel.shape
    return kernel.permute(0, 2, 1, 3).reshape(n * o, n * o)


@pytest.mark.parametrize("name", ["mlp_gelu", "cnn", "attention", "embedding"])
def test_operator_matches_oracle(name: str) -> None:
    model, make = ZOO[name](0)
    x = make(4, 1)
    names = [n for n, _ in model.named_parameters()]
    j = oracles.per_sample_jacobian(model, names, x)
    ref = _dense(oracles.ntk_from_jacobians(j, j))
    op = NTKOperator(model, x, dtype=torch.float64)
    assert op.shape == ref.shape
    assert_close(f"{name} operator", ref, op.to_dense(), **F64)
    v = torch.randn(ref.shape[0], dtype=torch.float64)
    assert_close(f"{name} matvec", ref @ v, op.matvec(v), **F64)


@pytest.mark.parametrize("name", ["mlp_gelu", "attention", "embedding"])
def test_sample_blocks_give_the_same_products(name: str) -> None:
    model, make = ZOO[name](0)
    x = make(7, 1)
    names = [n for n, _ in model.named_parameters()]
    j = oracles.per_sample_jacobian(model, names, x)
    ref = _dense(oracles.ntk_from_jacobians(j, j))
    op = NTKOperator(model, x, dtype=torch.float64, block_size=3)  # 3 + 3 + 1
    v = torch.randn(ref.shape[0], 4, dtype=torch.float64)
    assert_close(f"{name} blocked", ref @ v, op.matmat(v), **F64)
    with pytest.raises(ValueError, match="block_size"):
        NTKOperator(model, x, block_size=0)
    bn, make_bn = ZOO["batchnorm"](0)
    with pytest.raises(ValueError, match="batch-coupled"):
        NTKOperator(bn, make_bn(4, 1), mode="train", block_size=2)


def test_weighted_and_batch_coupled_operator() -> None:
    model, make = ZOO["batchnorm"](0)
    x = make(5, 1)
    weights = {"0": 0.5, "3": 4.0}
    dense = empirical_ntk(
        model,
        x,
        trace_outputs=False,
        lr_multipliers=weights,
        mode="train",
        dtype=torch.float64,
    )
    op = NTKOperator(
        model, x, lr_multipliers=weights, mode="train", dtype=torch.float64
    )
    assert_close("weighted train-mode operator", _dense(dense), op.to_dense(), **F64)


def test_operator_rejects_wrong_shapes() -> None:
    model, make = ZOO["mlp_tanh"](0)
    op = NTKOperator(model, make(4, 0))
    with pytest.raises(ValueError, match="flat vector of 12 entries"):
        op.matvec(torch.zeros(11))
    with pytest.raises(ValueError, match=r"\(12, K\) matrix"):
        op.matmat(torch.zeros(12))
