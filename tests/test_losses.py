"""Losses: sequence cross-entropy without a wrapper, in every operator and the Monitor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rdiag.losses import apply_loss, checked_loss, class_axis, shift_labels
from rdiag.monitor import Monitor
from rdiag.operators.ggn import GGNOperator
from rdiag.operators.hessian import HessianOperator
from tests import oracles
from tests._assert import assert_close

N, T, V = 3, 4, 5


class TinyLM(nn.Module):
    """Token ids ``(N, T)`` -> logits ``(N, T, V)``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, 6)
        self.head = nn.Linear(6, V)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(ids)))


def _flat_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, V), y.reshape(-1))


def _case():
    torch.manual_seed(0)
    net = TinyLM().double()
    ids = torch.randint(V, (N, T))
    return net, ids, shift_labels(ids)


def test_sequence_cross_entropy_is_the_mean_over_positions() -> None:
    logits, tokens = torch.randn(N, T, V), torch.randint(V, (N, T))
    tokens[0, 1] = -100
    assert class_axis(F.cross_entropy, logits, tokens) == 2
    flat = F.cross_entropy(logits.reshape(-1, V), tokens.reshape(-1))
    assert_close(
        "F", flat, apply_loss(F.cross_entropy, logits, tokens), rtol=1e-6, atol=0
    )
    module = nn.CrossEntropyLoss(ignore_index=3, label_smoothing=0.1)
    tokens[tokens == -100] = 3
    expected = module(logits.reshape(-1, V), tokens.reshape(-1))
    assert_close(
        "module", expected, apply_loss(module, logits, tokens), rtol=1e-6, atol=0
    )


def test_torch_layout_is_kept_where_it_fits() -> None:
    images, labels = torch.randn(2, V, 7), torch.randint(V, (2, 7))
    assert class_axis(F.cross_entropy, images, labels) == 1
    expected = F.cross_entropy(images, labels)
    assert float(apply_loss(F.cross_entropy, images, labels)) == float(expected)
    square = torch.randn(2, V, V)  # T == V: both fit, torch's layout wins
    assert class_axis(F.cross_entropy, square, torch.randint(V, (2, V))) == 1
    assert class_axis(F.mse_loss, torch.randn(N, T, V), torch.randint(V, (N, T))) == 1


def test_hessian_and_ggn_of_a_sequence_loss_match_dense() -> None:
    net, ids, targets = _case()
    names = [n for n, _ in net.named_parameters()]
    dense = oracles.dense_hessian(net, names, _flat_ce, ids, targets)
    op = HessianOperator(net, F.cross_entropy, (ids, targets))
    assert_close("hessian", dense, op.to_dense(), rtol=1e-8, atol=1e-12)
    closed = GGNOperator(net, F.cross_entropy, (ids, targets))
    autodiff = GGNOperator(net, _flat_ce, (ids, targets), loss="autodiff")
    assert closed.loss == "cross_entropy"
    assert_close("ggn", autodiff.to_dense(), closed.to_dense(), rtol=1e-8, atol=1e-12)


def test_monitor_loss_and_sharpness_on_a_sequence_model() -> None:
    net, ids, targets = _case()
    mon = Monitor(
        net,
        (ids, targets),
        metrics=["loss", "sharpness", "grad_norm"],
        loss_fn=F.cross_entropy,
        sharpness_tol=1e-10,
        strict=True,
    )
    rec = mon.step(0)
    names = [n for n, _ in net.named_parameters()]
    hess = oracles.dense_hessian(net, names, _flat_ce, ids, targets)
    expected = _flat_ce(net(ids), targets)
    assert_close(
        "loss",
        expected,
        torch.tensor(rec["loss"], dtype=torch.float64),
        rtol=1e-12,
        atol=0,
    )
    top = oracles.dense_eigh(hess)[0][0]
    assert_close(
        "sharpness",
        top,
        torch.tensor(rec["sharpness/raw"], dtype=torch.float64),
        rtol=1e-7,
        atol=0,
    )


def test_shifted_labels_and_a_loss_that_does_not_fit() -> None:
    assert shift_labels(torch.tensor([[1, 2, 3], [4, 5, 6]])).tolist() == [
        [2, 3, -100],
        [5, 6, -100],
    ]
    with pytest.raises(ValueError, match=r"outputs \(3, 2\) and targets \(3, 5\)"):
        checked_loss(F.mse_loss, torch.randn(3, 2), torch.randn(3, 5))
    with pytest.raises(ValueError, match="scalar"):
        checked_loss(lambda o, t: (o - t) ** 2, torch.randn(3, 2), torch.randn(3, 2))
