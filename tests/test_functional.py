"""The functional view: selection, grouping, weights, modes, flat vectors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rdiag.functional import functionalize, select_parameters
from tests._assert import assert_close
from tests.models import ZOO


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def test_selectors() -> None:
    net = _mlp()
    assert select_parameters(net) == [
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "2.weight",
        "2.bias",
    ]
    assert select_parameters(net, "*.bias") == ["0.bias", "1.bias", "2.bias"]
    assert select_parameters(net, ["2.weight", "0.*"]) == [
        "0.weight",
        "0.bias",
        "2.weight",
    ]
    assert select_parameters(net, nn.LayerNorm) == ["1.weight", "1.bias"]
    assert select_parameters(net, lambda n, p: p.dim() == 2) == ["0.weight", "2.weight"]
    assert select_parameters(net, exclude=nn.LayerNorm) == [
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
    ]
    net[0].weight.requires_grad_(False)
    assert "0.weight" not in select_parameters(net)
    with pytest.raises(ValueError, match="requires_grad=False"):
        select_parameters(net, "0.*")
    with pytest.raises(ValueError, match="no trainable parameters"):
        select_parameters(net, "nothing")
    with pytest.raises(TypeError, match="parameter selector"):
        select_parameters(net, 3)


def test_groups_flatten_unflatten_and_weights() -> None:
    fm = functionalize(_mlp())
    assert fm.groups == {
        "0": ("0.weight", "0.bias"),
        "1": ("1.weight", "1.bias"),
        "2": ("2.weight", "2.bias"),
    }
    vec = torch.arange(float(fm.num_params))
    assert torch.equal(fm.flatten(fm.unflatten(vec)), vec)
    assert fm.unflatten(vec)["2.bias"].tolist() == [
        fm.num_params - 2.0,
        fm.num_params - 1.0,
    ]
    w = fm.param_weights({"0": 2.0, "*.bias": 0.5})
    assert w == {
        "0.weight": 2.0,
        "0.bias": 2.0,
        "1.weight": 1.0,
        "1.bias": 0.5,
        "2.weight": 1.0,
        "2.bias": 0.5,
    }
    assert fm.param_weights(lambda n: 3.0)["1.weight"] == 3.0
    with pytest.raises(ValueError, match="match no selected parameter"):
        fm.param_weights({"readout": 1.0})
    with pytest.raises(ValueError, match="non-negative"):
        fm.param_weights({"0": -1.0})
    with pytest.raises(ValueError, match="missing"):
        fm.flatten({"0.weight": torch.zeros(4, 3)})


def test_call_matches_module_and_restores_mode() -> None:
    model, make = ZOO["batchnorm"](0)
    model.train()
    x = make(6, 0)
    fm = functionalize(model)
    with torch.no_grad():
        model.eval()
        assert_close("eval call", model(x), fm(fm.params, x), rtol=1e-6, atol=1e-6)
        model.train()
    assert model.training and all(m.training for m in model.modules()), (
        "mode not restored"
    )
    before = model[1].running_mean.clone()
    fm_train = functionalize(model, mode="train")
    assert fm_train.batch_coupled and not fm.batch_coupled
    with torch.no_grad():
        out = fm_train(fm_train.params, x)
    assert torch.equal(model[1].running_mean, before), (
        "train-mode view must not update running stats"
    )
    h = model[0](x)
    expected = model[3](
        torch.tanh(
            nn.functional.batch_norm(
                h, None, None, model[1].weight, model[1].bias, True
            )
        )
    )
    assert_close("train call", expected, out, rtol=1e-5, atol=1e-6)


def test_dtype_cast_leaves_model_alone_and_output_flattened() -> None:
    model, make = ZOO["attention"](0)
    fm = functionalize(model, dtype=torch.float64)
    out = fm(fm.params, make(3, 0))
    assert out.dtype == torch.float64 and out.shape == (3, 4 * 2)
    assert next(model.parameters()).dtype == torch.float32


def test_output_fn_and_non_tensor_output() -> None:
    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> dict:
            return {"logits": self.lin(x)}

    x = torch.randn(4, 3)
    net = Wrapped()
    with pytest.warns(UserWarning, match="its 'logits' are measured"):
        picked = functionalize(net)(dict(net.named_parameters()), x)
    assert torch.equal(picked, net(x)["logits"])

    class Hidden(Wrapped):
        def forward(self, x: torch.Tensor) -> dict:
            return {"hidden": self.lin(x)}

    with pytest.raises(TypeError, match="output_fn"):
        functionalize(Hidden())(dict(Hidden().named_parameters()), x)
    fm = functionalize(Hidden(), output_fn=lambda o: o["hidden"])
    assert fm(fm.params, x).shape == (4, 2)
    with pytest.raises(ValueError, match="mode"):
        functionalize(Wrapped(), mode="inference")


def test_batchnorm_without_running_stats_is_batch_coupled_in_eval_mode() -> None:
    net = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2)
    )
    assert functionalize(net).batch_coupled
    assert not functionalize(
        nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ).batch_coupled
