"""Parametrizations: formulas, gauges, hooks, LR multipliers, optimizer, rescaling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rdiag.models import MLP, make_model
from rdiag.ntk.handle import empirical_ntk
from rdiag.parametrization import (
    Centered,
    apply_parametrization,
    effective_weights,
    gamma_family,
    gamma_for_richness,
    infer_roles,
    layer_scale,
    lr_multipliers,
    make_optimizer,
    mean_field,
    mup,
    ntk,
    parse_parametrization,
    rescale,
    richness,
    standard,
)
from tests._assert import assert_close
from tests.oracles import ntk_from_jacobians, per_sample_jacobian

WIDTH, D_IN, D_OUT = 12, 3, 2


def _mlp(param, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    net = MLP(WIDTH, d_in=D_IN, d_out=D_OUT, depth=3, **kw).double()
    return apply_parametrization(net, param)


def _train(model, opt, x, y, steps: int, offset=None) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        target = y if offset is None else y + offset
        loss = 0.5 * (model(x) - target).pow(2).sum(1).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _batch(n: int = 6, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=gen, dtype=torch.float64)
    return x, torch.randn(n, D_OUT, generator=gen, dtype=torch.float64)


# ---- parsing and validation ----------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "name", "r", "gamma"),
    [
        ("r=0.25", "r=0.25", 0.25, None),
        ("R = 0", "r=0", 0.0, None),
        ("ntk", "ntk", 0.0, None),
        ("mup", "mup", 0.5, None),
        ("mf", "mf", 0.5, None),
        ("sp", "sp", None, None),
        ("gamma=0.1", "gamma=0.1", None, 0.1),
    ],
)
def test_parse_param(spec, name, r, gamma):
    p = parse_parametrization(spec)
    assert (p.name, p.r, p.gamma) == (name, r, gamma)
    assert parse_parametrization(p) is p


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("r=0.7", r"expected r in \[0, 1/2\], got 0.7"),
        ("r=-0.1", r"expected r in \[0, 1/2\]"),
        ("r=abc", "expected a number after 'r='"),
        ("gamma=0", "expected gamma0 to be a finite number > 0"),
        ("gamma=-2", "expected gamma0 to be a finite number > 0"),
        ("gamma=inf", "expected gamma0 to be a finite number > 0"),
        ("gamma=nan", "expected gamma0 to be a finite number > 0"),
        ("mu-p", "expected a parameterization like"),
    ],
)
def test_parse_param_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_parametrization(spec)


def test_bad_values_raise():
    with pytest.raises(ValueError, match=r"expected r in \[0, 1/2\], got 0.7"):
        richness(0.7)
    with pytest.raises(ValueError, match="gauge"):
        richness(0.1, gauge="other")
    with pytest.raises(ValueError, match="expected gamma0"):
        gamma_family(float("inf"))
    with pytest.raises(ValueError, match="base_width=64"):
        apply_parametrization(MLP(32), mup(base_width=64))
    with pytest.raises(ValueError, match="positive int"):
        mup().with_base_width(0)
    with pytest.raises(TypeError, match="parameterization string"):
        parse_parametrization(0.25)


def test_roles_inferred_and_explicit():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Linear(4, 2))
    assert infer_roles(net) == {"0": "readin", "2": "hidden", "3": "readout"}
    assert infer_roles(net, {"2": "readout"})["2"] == "readout"
    with pytest.raises(ValueError, match="expected at least a read-in and a read-out"):
        infer_roles(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="expected role of '2' to be one of"):
        infer_roles(net, {"2": "middle"})
    with pytest.raises(ValueError, match="name Linear/Conv/Embedding modules"):
        infer_roles(net, {"1": "hidden"})
    tied = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="tied"):
        infer_roles(tied)
    with pytest.raises(ValueError, match="MultiheadAttention"):
        apply_parametrization(
            nn.Sequential(
                nn.Linear(4, 4), nn.MultiheadAttention(4, 1), nn.Linear(4, 1)
            ),
            "mup",
        )


# ---- the formulas --------------------------------------------------------------------
@pytest.mark.parametrize("r", [0.0, 0.25, 0.5])
def test_table_gauge_init_and_lr(r):
    """Effective init std and SGD/Adam rates are the docs/theory.md table at width n."""
    model = _mlp(richness(r))
    n, alpha = WIDTH, WIDTH**r
    w = effective_weights(model)
    assert set(w) == {"readin", "hidden.0", "readout"}
    # Same seed: the multiplier gauge holds the unit-variance draws z, so the table
    # gauge's init must be std * z with the table's std.
    z = _mlp(richness(r, gauge="multiplier"))
    for name, std in [
        ("readin", D_IN**-0.5),
        ("hidden.0", n**-0.5),
        ("readout", n**-0.5 / alpha),
    ]:
        raw = z.get_submodule(name).weight.detach()
        assert_close(name, std * raw, w[name], rtol=1e-13, atol=0)
        assert float(model.get_submodule(name).bias.detach().abs().max()) == 0.0
    sgd = lr_multipliers(model, optimizer="sgd")
    expected = {
        "readin.weight": alpha**2 / D_IN,
        "readin.bias": alpha**2,
        "hidden.0.weight": alpha**2 / n,
        "hidden.0.bias": alpha**2,
        "readout.weight": 1 / n,
        "readout.bias": 1.0,
    }
    assert sgd == pytest.approx(expected, rel=1e-12)
    adam = lr_multipliers(model, optimizer="adam")
    expected_adam = {
        "readin.weight": n ** (r - 0.5) / D_IN,
        "hidden.0.weight": n ** (r - 1.5),
        "readout.weight": 1 / n,
        "readout.bias": 1.0,
    }
    assert {k: adam[k] for k in expected_adam} == pytest.approx(
        expected_adam, rel=1e-12
    )


@pytest.mark.parametrize("r", [0.0, 0.25, 0.5])
def test_gauges_have_equal_effective_weights(r):
    """Same seed: multiplier gauge x forward multiplier == table gauge init (float64)."""
    table = effective_weights(_mlp(richness(r)))
    mult = effective_weights(_mlp(richness(r, gauge="multiplier")))
    for name in table:
        assert_close(name, table[name], mult[name], rtol=1e-13, atol=0.0)


def test_multiplier_values_of_presets():
    model = _mlp(ntk())
    assert layer_scale(model.readin).weight == pytest.approx(D_IN**-0.5)
    assert layer_scale(model.hidden[0]).weight == pytest.approx(WIDTH**-0.5)
    assert layer_scale(model.readout).weight == pytest.approx(WIDTH**-0.5)
    mf = _mlp(mean_field())
    assert layer_scale(mf.readout).weight == pytest.approx(1 / WIDTH)
    assert layer_scale(mf.readout).bias == pytest.approx(WIDTH**-0.5)
    assert list(lr_multipliers(mf).values()) == pytest.approx([WIDTH] * 6)
    sp = _mlp(standard())
    assert set(lr_multipliers(sp, optimizer="adam").values()) == {1.0}
    assert layer_scale(sp.readout).weight == 1.0
    base = _mlp(richness(0.5, base_width=4))
    assert lr_multipliers(base)["hidden.0.bias"] == pytest.approx(WIDTH / 4)


def test_hook_is_exactly_cWx_plus_cb_b():
    """The forward hook computes c W x + c_b b for Linear and Conv2d."""
    torch.manual_seed(0)
    lin, conv = nn.Linear(3, 4).double(), nn.Conv2d(2, 3, 3).double()
    net = nn.Sequential(conv, nn.Flatten(), nn.Linear(12, 5), nn.Tanh(), lin)
    net[2] = nn.Linear(3 * 2 * 2, 3).double()
    apply_parametrization(net, richness(0.25, gauge="multiplier"), width=7, init=False)
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    c, cb = layer_scale(conv).weight, layer_scale(conv).bias
    assert c != cb
    h = F.conv2d(x, c * conv.weight, cb * conv.bias)
    assert_close("conv", h, conv(x), rtol=1e-14, atol=1e-14)
    z = torch.randn(4, 3, dtype=torch.float64)
    c, cb = layer_scale(lin).weight, layer_scale(lin).bias
    assert_close(
        "linear",
        F.linear(z, c * lin.weight, cb * lin.bias),
        lin(z),
        rtol=1e-14,
        atol=1e-14,
    )


@pytest.mark.parametrize("implementation", ["jacobian", "ntvp", "structured"])
@pytest.mark.parametrize("family", ["mlp", "cnn", "transformer"])
def test_weighted_entk_of_parametrized_model_matches_oracle(family, implementation):
    """K_M with lr_multipliers as weights, multipliers applied by hooks, vs float64 oracle."""
    kw = {
        "mlp": {"d_in": 3},
        "cnn": {"image_size": 4},
        "transformer": {"seq_len": 3, "vocab": 5},
    }
    model = make_model(
        family,
        4,
        parametrization=richness(0.25, gauge="multiplier"),
        seed=0,
        **kw[family],
    )
    model = model.double()
    x = model.sample_inputs(3, torch.Generator().manual_seed(0))
    x = x.double() if x.is_floating_point() else x
    weights = lr_multipliers(model, optimizer="adam")
    names = list(weights)
    k = empirical_ntk(
        model,
        x,
        lr_multipliers=weights,
        implementation=implementation,
        dtype=torch.float64,
    )
    jac = per_sample_jacobian(model, names, x)
    m = torch.cat(
        [
            torch.full(
                (dict(model.named_parameters())[n].numel(),), w, dtype=torch.float64
            )
            for n, w in weights.items()
        ]
    )
    expected = torch.einsum("ijaa->ij", ntk_from_jacobians(jac, jac, m.double()))
    assert_close(f"{family}/{implementation}", expected, k, rtol=1e-9, atol=1e-12)


def test_effective_weight_shapes():
    cnn = make_model("cnn", 5, parametrization="ntk", seed=0, in_channels=2)
    w = effective_weights(cnn)
    assert w["readin"].shape == (5, 2 * 9)
    assert_close(
        "conv",
        cnn.readin.weight.reshape(5, -1) / 18**0.5,
        w["readin"],
        rtol=1e-6,
        atol=0,
    )
    tr = make_model("transformer", 4, parametrization="mup", seed=0, vocab=7)
    assert effective_weights(tr)["embed"].shape == (4, 7)
    with pytest.raises(ValueError, match="apply_parametrization"):
        effective_weights(nn.Linear(2, 2))


# ---- optimizer factory -----------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_make_optimizer_groups(optimizer):
    model = _mlp(mup())
    opt = make_optimizer(model, None, 0.3, optimizer=optimizer)
    scales = lr_multipliers(model, optimizer=optimizer)
    assert type(opt).__name__ == {"sgd": "SGD", "adam": "Adam"}[optimizer]
    got = {g["name"]: g["lr"] for g in opt.param_groups}
    assert got == pytest.approx({n: 0.3 * s for n, s in scales.items()})
    with pytest.raises(ValueError, match="expected lr to be a finite number > 0"):
        make_optimizer(model, None, 0.0)
    with pytest.raises(ValueError, match="expected optimizer to be one of"):
        make_optimizer(model, None, 0.1, optimizer="rmsprop")
    with pytest.raises(ValueError, match="apply_parametrization"):
        make_optimizer(nn.Linear(2, 2), "mup", 0.1)


def test_sgd_step_in_multiplier_gauge_equals_table_gauge():
    """One global rate eta0 n^2r with multipliers == per-layer table rates (10 steps)."""
    x, y = _batch()
    curves = []
    for gauge in ("table", "multiplier"):
        model = _mlp(richness(0.25, gauge=gauge))
        curves.append(_train(model, make_optimizer(model, None, 0.2), x, y, 10))
    assert_close(
        "loss", torch.tensor(curves[0]), torch.tensor(curves[1]), rtol=1e-10, atol=0
    )


def test_adam_tables_agree_across_gauges():
    """Adam: multiplier-gauge rates (c eta) equal the table-gauge Adam rates."""
    x, y = _batch()
    curves = []
    for gauge in ("table", "multiplier"):
        model = _mlp(richness(0.25, gauge=gauge))
        opt = make_optimizer(model, None, 0.01, optimizer="adam", eps=1e-30)
        curves.append(_train(model, opt, x, y, 10))
    assert_close(
        "adam loss", torch.tensor(curves[0]), torch.tensor(curves[1]), rtol=1e-9, atol=0
    )


# ---- rescaling and the gamma family ---------------------------------------------------
@pytest.mark.parametrize("r", [0.1, 0.25, 0.5])
def test_rescaling_matches_table_gauge(r):
    """NTK model x n^-r output, lr x n^2r == table gauge at richness r (float64, 1e-10)."""
    x, y = _batch()
    direct = _mlp(richness(r))
    want = _train(direct, make_optimizer(direct, None, 0.3), x, y, 15)
    emulated = _mlp(ntk())
    lr = rescale(emulated, r, 0.3)
    assert lr == pytest.approx(0.3 * WIDTH ** (2 * r))
    got = _train(emulated, make_optimizer(emulated, None, lr), x, y, 15)
    assert_close(
        "loss curve", torch.tensor(want), torch.tensor(got), rtol=1e-10, atol=0
    )
    for name, w in effective_weights(direct).items():
        assert_close(name, w, effective_weights(emulated)[name], rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="NTK parameterization"):
        rescale(direct, r, 0.3)
    with pytest.raises(ValueError, match=r"expected r in \[0, 1/2\]"):
        rescale(emulated, 0.9, 0.3)


def test_centered_gamma_model():
    model = _mlp(gamma_family(0.5))
    assert isinstance(model, Centered)
    x, _ = _batch()
    assert float(model(x).detach().abs().max()) == 0.0
    expected = [f"model.{n}" for n, _ in model.model.named_parameters()]
    assert list(lr_multipliers(model)) == expected
    assert list(lr_multipliers(model).values()) == pytest.approx([WIDTH] * 6)
    assert layer_scale(model.model.readout).weight == pytest.approx(1 / (WIDTH * 0.5))


@pytest.mark.parametrize("r", [0.0, 0.3])
def test_gamma_family_maps_to_richness(r):
    """gamma0 = N^(r-1/2) with eta0 ~ gamma0^2 trains like the multiplier gauge at r.

    The centered model fits y; the uncentered one fits y + F_theta0 (same function of
    the parameters), so the loss curves agree exactly.
    """
    g = gamma_for_richness(r, WIDTH)
    assert g == pytest.approx(WIDTH ** (r - 0.5))
    x, y = _batch()
    centered = _mlp(gamma_family(g))
    want = _train(centered, make_optimizer(centered, None, 0.2 * g**2), x, y, 10)
    plain = _mlp(richness(r, gauge="multiplier"))
    with torch.no_grad():
        offset = plain(x)
    got = _train(plain, make_optimizer(plain, None, 0.2), x, y, 10, offset=offset)
    assert_close(
        "loss curve", torch.tensor(want), torch.tensor(got), rtol=1e-10, atol=0
    )


def test_layernorm_gain_follows_hidden_rule():
    tr = make_model("transformer", 8, parametrization="mup", seed=0)
    lrs = lr_multipliers(tr)
    assert lrs["blocks.0.norm1.weight"] == pytest.approx(8.0)
    assert lrs["unembed.weight"] == pytest.approx(1 / 8)
    assert lrs["embed.weight"] == pytest.approx(8.0)
    assert tr.attention_exponent == 1.0
    assert math.isclose(
        make_model("transformer", 8, parametrization="ntk").attention_exponent, 0.5
    )
