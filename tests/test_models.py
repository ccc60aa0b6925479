"""Built-in model families: shapes, roles, attention scaling, BN without mean subtraction."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rdiag.models import BNMLP, CNN, MLP, RMSBatchNorm, Transformer, make_model
from rdiag.parametrization import (
    applied_parametrization,
    apply_parametrization,
    fan_in,
    infer_roles,
    layer_scale,
    layer_scales,
)
from tests._assert import assert_close


@pytest.mark.parametrize(
    ("family", "kwargs", "out_shape"),
    [
        ("mlp", {"d_in": 3, "d_out": 2, "depth": 4}, (5, 2)),
        ("cnn", {"in_channels": 2, "image_size": 5, "d_out": 3}, (5, 3)),
        ("transformer", {"vocab": 7, "seq_len": 4}, (5, 4, 7)),
        ("bn_mlp", {"d_in": 6, "depth": 3}, (5, 1)),
    ],
)
def test_shapes_roles_width(family, kwargs, out_shape):
    model = make_model(family, 8, seed=0, **kwargs)
    x = model.sample_inputs(5, torch.Generator().manual_seed(0))
    assert model(x).shape == out_shape
    assert model.width == 8
    assert model.output_dim == math.prod(out_shape[1:])
    roles = infer_roles(model)
    assert roles == model.roles
    assert list(roles.values()).count("readout") == 1
    readout = next(n for n, r in roles.items() if r == "readout")
    assert fan_in(model.get_submodule(readout)) == 8


def test_mlp_depth_and_bias():
    net = MLP(6, d_in=2, depth=2, bias=False)
    assert [n for n, _ in net.named_parameters()] == ["readin.weight", "readout.weight"]
    assert len(MLP(6, depth=5).hidden) == 3


def test_cnn_fan_in_is_channels_times_kernel_area():
    net = CNN(4, in_channels=3, kernel_size=3, depth=3)
    assert fan_in(net.readin) == 27
    assert fan_in(net.hidden[0]) == 36
    assert net.roles == {
        "readin": "readin",
        "hidden.0": "hidden",
        "hidden.1": "hidden",
        "readout": "readout",
    }


@pytest.mark.parametrize("exponent", [0.5, 1.0])
def test_transformer_block_attention_scale(exponent):
    """SDPA with scale = d_head^-exponent equals a manual causal softmax attention."""
    torch.manual_seed(0)
    tr = Transformer(8, vocab=5, seq_len=4, depth=1, heads=2).double()
    tr.attention_exponent = exponent
    block, x = tr.blocks[0], torch.randn(3, 4, 8, dtype=torch.float64)
    scale = 4**-exponent
    q, k, v = block.qkv(block.norm1(x)).view(3, 4, 3, 2, 4).unbind(2)
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))
    logits = q @ k.transpose(-1, -2) * scale
    logits = logits.masked_fill(
        torch.ones(4, 4, dtype=torch.bool).triu(1), float("-inf")
    )
    a = (logits.softmax(-1) @ v).transpose(1, 2).reshape(3, 4, 8)
    h = x + block.proj(a) / 1.0
    want = h + block.fc2(F.gelu(block.fc1(block.norm2(h))))
    assert_close("block", want, block(x, scale), rtol=1e-12, atol=1e-12)


def test_transformer_residual_branches_scaled():
    tr = apply_parametrization(Transformer(8, depth=4), "mup")
    scales = layer_scales(tr)
    # depth-muP by default: the branch outputs x 4**-1/2, the rest unscaled
    assert scales["blocks.3.fc2"].weight == pytest.approx(0.5)
    assert scales["blocks.0.proj"].bias == pytest.approx(0.5)
    assert scales["blocks.0.qkv"].weight == 1.0
    assert set(tr.roles.values()) == {"readin", "hidden", "readout"}
    assert tr.roles["embed"] == "readin" and tr.roles["blocks.3.fc2"] == "hidden"


def test_rms_batchnorm_has_no_mean_subtraction():
    x = torch.randn(7, 5, dtype=torch.float64) + 3.0
    norm = RMSBatchNorm(5).double()
    y = norm(x)
    rms = x.pow(2).mean(0).sqrt()
    assert_close(
        "unit rms",
        torch.ones(5, dtype=torch.float64),
        y.pow(2).mean(0).sqrt(),
        rtol=1e-10,
        atol=0,
    )
    assert_close("ratio", x / rms, y, rtol=1e-10, atol=0)
    assert float(y.mean(0).min()) > 0.5  # the mean is kept
    assert list(norm.parameters()) == []
    assert_close("running", 0.9 + 0.1 * rms**2, norm.running_var, rtol=1e-12, atol=0)
    norm.eval()
    assert_close("eval", x / norm.running_var.sqrt(), norm(x), rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match=r"expected a \(N, F\) input"):
        norm(x[0])


def test_bnmlp_is_batch_coupled_in_train_mode():
    from rdiag.functional import functionalize

    net = BNMLP(6, depth=3, d_in=4).double()
    assert functionalize(net, mode="train").batch_coupled
    assert not functionalize(net, mode="eval").batch_coupled


def test_bnmlp_init_and_forward():
    torch.manual_seed(0)
    net = BNMLP(6, depth=3, d_in=4).double()
    eye = torch.eye(6, dtype=torch.float64)
    for layer in net.hidden:
        assert_close(
            "orthogonal", eye, layer.weight @ layer.weight.T, rtol=0, atol=1e-6
        )
    eye4 = torch.eye(4, dtype=torch.float64)
    assert_close(
        "semi-orthogonal",
        eye4,
        net.readin.weight.T @ net.readin.weight,
        rtol=0,
        atol=1e-6,
    )
    x = torch.randn(5, 4, dtype=torch.float64)

    def bn(z):
        return z / z.pow(2).mean(0).sqrt()

    h = bn(x @ net.readin.weight.T)
    for layer in net.hidden:
        h = bn(h @ layer.weight.T)
    assert_close("forward", h @ net.readout.weight.T, net(x), rtol=1e-10, atol=1e-12)
    shaped = BNMLP(6, depth=3, d_in=4, activation="tanh", alpha=0.4).double()
    h = torch.tanh(bn(x @ shaped.readin.weight.T))
    for ell, layer in enumerate(shaped.hidden, start=2):
        h = torch.tanh(ell**-0.4 * bn(h @ layer.weight.T))
    assert_close(
        "shaped", h @ shaped.readout.weight.T, shaped(x), rtol=1e-10, atol=1e-12
    )
    g = BNMLP(400, depth=2, init="gaussian")
    assert float(g.hidden[0].weight.std()) == pytest.approx(400**-0.5, rel=0.02)


@pytest.mark.parametrize(
    ("factory", "kwargs", "message"),
    [
        (MLP, {"width": 0}, "expected width to be a positive int"),
        (MLP, {"width": 4, "depth": 1}, "expected depth >= 2"),
        (MLP, {"width": 4, "activation": "swish"}, "expected activation to be one of"),
        (CNN, {"width": 4, "kernel_size": 2}, "expected an odd kernel_size"),
        (Transformer, {"width": 5, "heads": 2}, "multiple of heads=2"),
        (BNMLP, {"width": 4, "alpha": -1.0}, "alpha"),
        (BNMLP, {"width": 4, "init": "xavier"}, "expected init to be one of"),
    ],
)
def test_bad_arguments(factory, kwargs, message):
    with pytest.raises(ValueError, match=message):
        factory(**kwargs)


def test_make_model_family_and_seed():
    with pytest.raises(ValueError, match="expected family to be one of"):
        make_model("resnet", 4)
    a = make_model("mlp", 8, parametrization="mup", seed=3)
    b = make_model("mlp", 8, parametrization="mup", seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert applied_parametrization(a).parametrization.name == "mup"
    assert layer_scale(a.readin).role == "readin"
