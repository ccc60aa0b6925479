"""Depth rules as parametrization data: branch multipliers and block learning rates.

Predicted numbers are written out here (``L**-alpha`` multipliers, SGD
``L**(2 alpha - 1)`` and Adam ``L**(alpha - 1)`` rates), not read back from the
library. The ResMLP forward is checked against a hand-written float64 forward.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from rdiag.cli import main
from rdiag.depth_check import depth_check
from rdiag.models import ResMLP, make_model
from rdiag.parametrization import (
    DEPTH_RULES,
    Branches,
    DepthRule,
    apply_parametrization,
    layer_scales,
    lr_multipliers,
    parse_depth_rule,
    parse_parametrization,
)
from tests._assert import assert_close


@pytest.mark.parametrize(
    "rule, mult, sgd, adam",
    [
        ("depth-mup", 8**-0.5, 1.0, 8**-0.5),
        ("completep", 1 / 8, 8.0, 1.0),
        ("none", 1.0, 1.0, 1.0),
        ("0.75", 8**-0.75, 8**0.5, 8**-0.25),
    ],
)
def test_depth_rule_scales_branches_and_block_rates(rule, mult, sgd, adam):
    param = parse_parametrization(f"mup,depth={rule}")
    model = apply_parametrization(ResMLP(16, depth=8), param)
    scales = layer_scales(model)
    # table gauge: the only multiplier is the branch's
    assert scales["blocks.5.linear"].weight == pytest.approx(mult)
    assert scales["blocks.5.linear"].bias == pytest.approx(mult)
    assert scales["readin"].weight == 1.0 and scales["readout"].weight == 1.0
    for opt, depth_scale in (("sgd", sgd), ("adam", adam)):
        plain = lr_multipliers(
            apply_parametrization(ResMLP(16, depth=8), "mup"), "mup", opt
        )
        rates = lr_multipliers(model, optimizer=opt)
        base = plain["blocks.2.linear.weight"] / (DEPTH_RULES["depth-mup"].lr(opt, 8))
        assert rates["blocks.2.linear.weight"] == pytest.approx(base * depth_scale)
        assert rates["readin.weight"] == pytest.approx(plain["readin.weight"])
        assert rates["readout.bias"] == pytest.approx(plain["readout.bias"])


def test_resmlp_forward_matches_hand_written():
    torch.manual_seed(0)
    model = make_model(
        "resmlp", 6, depth=3, d_in=4, d_out=2, parametrization="ntk,depth=completep"
    ).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    c_in, c = 4**-0.5, 6**-0.5  # NTK multipliers 1/sqrt(fan_in)
    h = c_in * x @ model.readin.weight.T + model.readin.bias
    for block in model.blocks:  # CompleteP: each branch / L
        w, b = block.linear.weight, block.linear.bias
        h = h + (c * torch.tanh(h) @ w.T + b) / 3
    want = c * torch.tanh(h) @ model.readout.weight.T + model.readout.bias
    assert_close("resmlp", want, model(x), rtol=1e-12, atol=1e-12)


def test_transformer_block_rates_include_norms():
    model = make_model("transformer", 8, depth=4, parametrization="mup,depth=completep")
    rates = lr_multipliers(model, optimizer="sgd")
    # CompleteP under SGD: x L inside the blocks (norm gains too), x 1 outside
    # (norm gains: the hidden rule at fan-in 1, m**2r = 8 at width 8 for muP)
    assert rates["blocks.1.norm1.weight"] == pytest.approx(4.0 * 8)
    assert rates["norm.weight"] == pytest.approx(8.0)
    qkv = rates["blocks.0.qkv.weight"]
    assert qkv == pytest.approx(
        4.0
        * lr_multipliers(
            make_model("transformer", 8, depth=4, parametrization="mup,depth=none")
        )["blocks.0.qkv.weight"]
    )


def test_depth_rule_names_round_trip():
    param = parse_parametrization("r=0.25,depth=completep")
    assert param.name == "r=0.25,depth=completep" and param.r == 0.25
    assert parse_parametrization(param.name).depth == DEPTH_RULES["completep"]
    assert param.with_depth("depth-mup").name == "r=0.25"
    assert parse_parametrization("mup").depth.alpha == 0.5


@pytest.mark.parametrize("spec", ["deep", "-1", "nan"])
def test_bad_depth_rule(spec):
    with pytest.raises(ValueError, match="depth rule|alpha >= 0"):
        parse_depth_rule(spec)
    with pytest.raises(ValueError, match="depth rule|alpha >= 0"):
        parse_parametrization(f"mup,depth={spec}")


def test_bad_branches():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 1))
    with pytest.raises(ValueError, match="unknown \\['7'\\]"):
        apply_parametrization(model, "mup", branches=Branches(1, ("7",), ("7",)))
    with pytest.raises(ValueError, match="outputs not in layers \\['1'\\]"):
        apply_parametrization(model, "mup", branches=Branches(1, ("1",), ()))
    with pytest.raises(TypeError, match="Branches"):
        apply_parametrization(model, "mup", branches={"depth": 1})
    with pytest.raises(ValueError, match="unknown \\['9'\\]"):
        apply_parametrization(
            model, "mup", branches=Branches(1, ("1",), ("1",), stream="9")
        )
    ok = apply_parametrization(model, "mup", branches=Branches(4, ("1",), ("1",)))
    assert layer_scales(ok)["1"].weight == pytest.approx(0.5)


def test_stream_module_defaults_to_the_last_branch_outputs_parent():
    assert Branches(2, ("b.0.f", "b.1.f"), ("b.0.f", "b.1.f")).stream_module == "b.1"
    nested = Branches(1, ("b.0.mlp.fc2",), ("b.0.mlp.fc2",), stream="b.0")
    assert nested.stream_module == "b.0"


# ---- the depth check -----------------------------------------------------------
DEPTHS = [2, 4, 8, 16, 32]


def _slopes(res):
    return {(f["metric"], f["layer"]): f["slope"] for f in res.fits}


@pytest.mark.parametrize(
    "rule, optimizer, blocks",
    [
        ("depth-mup", "sgd", -0.5),  # blocks' dW_rel ~ L^(alpha - 1)
        ("completep", "sgd", 0.0),
        ("depth-mup", "adam", -0.5),
        ("completep", "adam", 0.0),
    ],
)
def test_depth_check_passes_consistent_rules(rule, optimizer, blocks):
    res = depth_check(
        "resmlp", f"mup,depth={rule}", DEPTHS, width=64, seeds=3, optimizer=optimizer
    )
    assert res.passed, [f["reason"] for f in res.failures]
    assert res.depth_rule == rule and res.depths == tuple(DEPTHS)
    slopes = _slopes(res)
    assert slopes["dW_rel", "blocks"] == pytest.approx(blocks, abs=0.1)
    for key in [("h0", "stream"), ("delta_h", "stream"), ("delta_f", None)]:
        assert slopes[key] == pytest.approx(0.0, abs=0.1), key
    assert res.fit("dW_rel", "blocks")["predicted"] == blocks


def test_depth_check_fails_unscaled_branches():
    res = depth_check("resmlp", "mup,depth=none", DEPTHS, width=64, seeds=3)
    assert not res.passed
    # tanh branches add up: ||h_L|| ~ L^(1/2) at initialization
    assert _slopes(res)["h0", "stream"] == pytest.approx(0.5, abs=0.1)
    assert res.fit("h0", "stream")["passed"] is False
    assert "above the predicted +0.00" in res.fit("h0", "stream")["reason"]


def test_depth_check_sees_frozen_blocks():
    """Branches x 1/L with SGD at a fixed rate: blocks freeze (dW_rel ~ 1/L)."""
    frozen = parse_parametrization("mup").with_depth(DepthRule("1/L", 1.0, 0.0, 0.0))
    res = depth_check("resmlp", frozen, DEPTHS, width=64, seeds=3)
    blocks = res.fit("dW_rel", "blocks")
    assert blocks["predicted"] == -1.0 and blocks["passed"], blocks["reason"]
    assert blocks["slope"] == pytest.approx(-1.0, abs=0.12)
    # the stream still moves (the read-in's change rides on it), less with depth
    assert res.fit("delta_h", "stream")["predicted"] == 0.0
    assert -0.3 < _slopes(res)["delta_h", "stream"] < 0.05


@pytest.mark.slow
def test_depth_check_transformer(tmp_path):
    res = depth_check(
        "transformer",
        "mup,depth=completep",
        [2, 4, 8, 16],
        width=16,
        seeds=3,
        optimizer="adam",
    )
    assert res.passed, [f["reason"] for f in res.failures]
    assert _slopes(res)["dW_rel", "blocks"] == pytest.approx(0.0, abs=0.15)
    assert {f["layer"] for f in res.fits} >= {"stream", "embed", "unembed", "blocks"}
    saved = json.loads(res.save(tmp_path).read_text())
    assert saved["passed"] is True and saved["depths"] == [2, 4, 8, 16]


@pytest.mark.slow
def test_depth_check_cli(tmp_path, capsys):
    code = main(
        ["depth-check", "--parametrization", "mup,depth=completep", "--width", "32",
         "--out", str(tmp_path)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "pass dW_rel          blocks" in out
    assert out.rstrip().endswith("verdict: pass")
    assert (
        json.loads((tmp_path / "summary.json").read_text())["depth_rule"] == "completep"
    )
    assert (tmp_path / "depth_check.png").stat().st_size > 0


def test_depth_check_is_inconclusive_when_it_cannot_tell_the_rules_apart():
    """Two depths and two steps: tolerances over 1/4 cannot separate -1/2 from 0."""
    res = depth_check("resmlp", "mup", [2, 4], width=16, steps=2, seeds=3)
    vague = [f for f in res.fits if f["inconclusive"]]
    assert vague and not res.passed
    assert all(f["tolerance"] >= 0.25 and not f["passed"] for f in vague)
    assert "inconclusive" in vague[0]["reason"]


def test_depth_check_bad_input():
    with pytest.raises(ValueError, match="resmlp"):
        depth_check("mlp", "mup", [2, 4])
    with pytest.raises(ValueError, match="two distinct depths"):
        depth_check("resmlp", "mup", [4, 4])
    with pytest.raises(ValueError, match="data="):
        depth_check(lambda d: ResMLP(8, depth=d), "mup", [2, 4])
    x, y = torch.randn(4, 3), torch.randn(4, 1)

    def plain(depth):
        return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))

    with pytest.raises(ValueError, match="residual branches"):
        depth_check(plain, "mup", [2, 4], data=(x, y), steps=1, seeds=1)
    with pytest.raises(
        ValueError, match="depth 2 to declare branches.depth = 2, got 3"
    ):
        depth_check(
            lambda d: ResMLP(8, d_in=3, depth=3), "mup", [2, 4], data=(x, y),
            steps=1, seeds=1,
        )  # fmt: skip
