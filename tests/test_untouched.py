"""Every public entry point leaves the model exactly as it found it.

Parameters, buffers (batch-norm running statistics), train/eval flags, gradients,
requires_grad flags, hooks and the global RNG state are compared bit for bit
before and after each call, on a model with batch norm, dropout and a frozen
parameter, in both of the model's own modes and both rdiag modes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rdiag
from rdiag.ntk.handle import structured_coverage
from rdiag.operators.hessian import hvp


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(4, 6),
        nn.BatchNorm1d(6),
        nn.Dropout(0.3),
        nn.Tanh(),
        nn.Linear(6, 2),
    )
    net[0].bias.requires_grad_(False)
    for p in net.parameters():
        p.grad = torch.full_like(p, 0.5)  # a pending gradient must survive
    return net


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "flags": [(n, m.training) for n, m in model.named_modules()],
        "grads": [
            None if p.grad is None else p.grad.clone() for p in model.parameters()
        ],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "hooks": [
            (
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._backward_hooks),
            )
            for m in model.modules()
        ],
        "attributes": [sorted(vars(m)) for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


def _assert_same(before: dict, after: dict, what: str) -> None:
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), f"{what}: {key} changed"
    assert before["flags"] == after["flags"], f"{what}: train/eval flags changed"
    for a, b in zip(before["grads"], after["grads"]):
        assert (a is None and b is None) or torch.equal(a, b), f"{what}: .grad changed"
    for key in ("requires_grad", "hooks", "attributes"):
        assert before[key] == after[key], f"{what}: {key} changed"
    assert torch.equal(before["rng"], after["rng"]), f"{what}: global RNG advanced"


def _entry_points(mode: str):
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    y = torch.randn(5, 2, generator=torch.Generator().manual_seed(2))
    data = (x, y)
    loss = F.mse_loss
    kw = {"mode": mode, "dtype": torch.float64}
    return {
        "empirical_ntk": lambda m: rdiag.empirical_ntk(m, x, **kw),
        "empirical_ntk jacobian": lambda m: rdiag.empirical_ntk(
            m, x, implementation="jacobian", **kw
        ),
        "empirical_ntk ntvp": lambda m: rdiag.empirical_ntk(
            m, x, x[:2], implementation="ntvp", trace_outputs=False, **kw
        ),
        "ntk_fn per layer": lambda m: rdiag.ntk_fn(m, per_layer=True, **kw)(x),
        "NTKOperator": lambda m: rdiag.NTKOperator(m, x, **kw).to_dense(),
        "hvp": lambda m: hvp(
            m,
            loss,
            data,
            torch.ones(sum(p.numel() for p in m.parameters() if p.requires_grad)),
            **kw,
        ),
        "GGNOperator": lambda m: rdiag.GGNOperator(m, loss, data, **kw).to_dense(),
        "FisherOperator": lambda m: rdiag.FisherOperator(
            m, loss, data, **kw
        ).to_dense(),
        "top_eigenvalues": lambda m: rdiag.top_eigenvalues(m, loss, data, k=2, **kw),
        "sharpness": lambda m: rdiag.sharpness(m, loss, data, lr_multipliers=0.5, **kw),
        "hessian_trace": lambda m: rdiag.hessian_trace(
            m, loss, data, num_matvecs=9, **kw
        ),
        "hessian_density": lambda m: rdiag.hessian_density(
            m, loss, data, num_probes=2, lanczos_steps=5, **kw
        ),
        "ggn_sharpness_from_ntk": lambda m: rdiag.ggn_sharpness_from_ntk(
            m, loss, x, y, **kw
        ),
        "structured_coverage": lambda m: structured_coverage(
            rdiag.functionalize(m, **kw)
        ),
        "functional call": lambda m: rdiag.functionalize(m, **kw)(
            rdiag.functionalize(m, **kw).params, x
        ),
        "Monitor": lambda m: _monitor(m, x, y, mode),
    }


def _monitor(model: nn.Module, x, y, mode: str) -> None:
    mon = rdiag.Monitor(
        model,
        (x, y),
        metrics=[
            "ntk",
            "ntk_layers",
            "features",
            "representations",
            "weights",
            "linearization",
            "sharpness",
            "trace",
            "grad_norm",
            "loss",
        ],
        loss_fn=F.mse_loss,
        mode=mode,
        dtype=torch.float64,
        strict=True,
    )
    mon.step(0)
    mon.step(1)


@pytest.mark.parametrize("model_mode", ["train", "eval"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_every_entry_point_leaves_the_model_as_it_found_it(
    model_mode: str, mode: str
) -> None:
    model = _model()
    model.train(model_mode == "train")
    for name, call in _entry_points(mode).items():
        before = _snapshot(model)
        call(model)
        _assert_same(
            before, _snapshot(model), f"{name} (model {model_mode}, {mode} mode)"
        )
