"""Coordinate check: every recorded metric against a float64 brute force; fits; output."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from rdiag.coord_check import coord_check, plot_coord_check
from rdiag.models import MLP, Transformer
from rdiag.parametrization import (
    apply_parametrization,
    effective_weights,
    lr_multipliers,
    make_optimizer,
    Scale,
    parse_parametrization,
)
from rdiag.predictions import predicted_exponent
from tests._assert import assert_close
from tests.oracles import ntk_from_jacobians, per_sample_jacobian


def _data(n: int = 5, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return x, torch.randn(n, 2, generator=gen, dtype=torch.float64)


def _norm(t: torch.Tensor) -> float:
    return float(t.reshape(len(t), -1).norm(dim=1).mean())


@pytest.mark.parametrize(("param", "optimizer"), [("r=0.25", "sgd"), ("mf", "adam")])
def test_records_match_brute_force(param, optimizer):
    """Each metric recomputed from the initial and trained model with float64 oracles."""
    built = []

    def family(width: int) -> MLP:
        built.append(MLP(width, d_in=3, d_out=2, depth=3).double())
        return built[-1]

    x, y = _data()
    probe = x[:4]
    result = coord_check(
        family,
        param,
        [4, 6],
        steps=3,
        seeds=[2],
        lr=0.2,
        optimizer=optimizer,
        data=(x, y),
        probe=probe,
        dtype=torch.float64,
    )
    trained = built[-1]
    torch.manual_seed(2)
    init = apply_parametrization(MLP(6, d_in=3, d_out=2, depth=3).double(), param)
    got = {
        (r["metric"], r["layer"]): r["value"] for r in result.records if r["width"] == 6
    }
    want = {}
    with torch.no_grad():
        f0, ft = init(probe), trained(probe)
        h0, ht = init.readin(probe), trained.readin(probe)
        g0, gt = init.hidden[0](torch.tanh(h0)), trained.hidden[0](torch.tanh(ht))
    want["f0", None], want["delta_f", None] = _norm(f0), _norm(ft - f0)
    torch.manual_seed(2)
    once = apply_parametrization(MLP(6, d_in=3, d_out=2, depth=3).double(), param)
    opt = make_optimizer(once, param, 0.2, optimizer=optimizer)
    torch.nn.functional.mse_loss(once(x), y).backward()
    opt.step()
    with torch.no_grad():
        want["delta_f1", None] = _norm(once(probe) - f0)
    want["h0", "readin"], want["delta_h", "readin"] = _norm(h0), _norm(ht - h0)
    want["h0", "hidden.0"], want["delta_h", "hidden.0"] = _norm(g0), _norm(gt - g0)
    w0, wt = effective_weights(init), effective_weights(trained)
    w1 = effective_weights(once)
    for name in w0:
        op0 = float(torch.linalg.matrix_norm(w0[name], ord=2))
        dw1 = float(torch.linalg.matrix_norm(w1[name] - w0[name], ord=2))
        want["dW_rel1", name] = dw1 / op0
        dw = wt[name] - w0[name]
        want["dW_op", name] = float(torch.linalg.matrix_norm(dw, ord=2))
        want["dW_fro", name] = float(dw.norm())
        want["dW_rel", name] = want["dW_op", name] / float(
            torch.linalg.matrix_norm(w0[name], ord=2)
        )
    weights = lr_multipliers(init, optimizer=optimizer)
    names = list(weights)
    m = torch.cat(
        [
            torch.full((p.numel(),), weights[n], dtype=torch.float64)
            for n, p in init.named_parameters()
        ]
    )
    j0 = per_sample_jacobian(init, names, probe)
    jt = per_sample_jacobian(trained, names, probe)
    k0 = torch.einsum("ijaa->ij", ntk_from_jacobians(j0, j0, m))
    kt = torch.einsum("ijaa->ij", ntk_from_jacobians(jt, jt, m))
    want["ntk_rel_change", None] = float((kt - k0).norm() / k0.norm())
    dtheta = torch.cat(
        [
            (pt - p0).detach().reshape(-1)
            for p0, pt in zip(init.parameters(), trained.parameters())
        ]
    )
    lin = f0 + torch.einsum("iap,p->ia", j0, dtheta)
    want["lin_error", None] = float((ft - lin).norm() / (ft - f0).norm())
    assert set(got) == set(want)
    keys = sorted(want, key=str)
    assert_close(
        "metrics",
        torch.tensor([want[k] for k in keys]),
        torch.tensor([got[k] for k in keys]),
        rtol=1e-8,
        atol=1e-12,
    )


def test_result_fits_summary_and_plot(tmp_path):
    result = coord_check(
        "mlp",
        "r=0.25",
        [8, 16, 32],
        steps=2,
        seeds=2,
        lr=0.1,
        family_kwargs={"d_in": 2, "d_out": 2},
    )
    assert (result.parametrization, result.r, result.widths, result.seeds) == (
        "r=0.25",
        0.25,
        (8, 16, 32),
        (0, 1),
    )
    assert len(result.records) == 3 * 2 * len(
        {(r["metric"], r["layer"]) for r in result.records}
    )
    keys = {"metric", "layer", "role", "parametrization", "r", "slope", "ci"}
    keys |= {"predicted", "widths", "seeds", "passed", "tolerance", "reason"}
    keys |= {"inconclusive", "verdict"}
    assert all(set(f) == keys for f in result.fits)
    assert all(f["widths"] == [8, 16, 32] and f["seeds"] == 2 for f in result.fits)
    metrics = {f["metric"] for f in result.fits}
    assert metrics == {
        "h0",
        "delta_h",
        "f0",
        "delta_f",
        "delta_f1",
        "dW_op",
        "dW_rel",
        "dW_rel1",
        "ntk_rel_change",
        "lin_error",
    }
    fit = result.fit("dW_op", "hidden.0")
    assert (
        fit["predicted"] == pytest.approx(-0.25)
        and fit["ci"][0] <= fit["slope"] <= fit["ci"][1]
    )
    assert result.fit("ntk_rel_change")["layer"] is None
    with pytest.raises(KeyError, match="no fit for metric='nope'"):
        result.fit("nope")
    path = result.save(tmp_path / "out")
    payload = json.loads(path.read_text())
    assert payload["fits"] == json.loads(json.dumps(result.fits))
    assert len(payload["records"]) == len(result.records)
    pytest.importorskip("matplotlib")
    image = plot_coord_check(result, tmp_path / "cc.png")
    assert image.read_bytes()[:4] == b"\x89PNG"


def test_centered_gamma_check_has_no_f0():
    result = coord_check(
        "mlp",
        "gamma=0.5",
        [8, 16],
        steps=2,
        seeds=1,
        lr=0.025,
        ntk=False,
        linearization=False,
    )
    assert "f0" not in {r["metric"] for r in result.records}
    assert (
        result.fit("delta_h", "model.hidden.0")["predicted"] == 0.5
    )  # muP at fixed gamma0
    assert result.r is None and result.parametrization == "gamma=0.5"


def test_predictions():
    r25, sp = parse_parametrization("r=0.25"), parse_parametrization("sp")
    assert predicted_exponent("ntk_rel_change", None, r25, 10) == -0.5
    assert predicted_exponent("ntk_rel_change", None, r25, 1) == -0.75
    assert predicted_exponent("dW_op", "readin", r25, 10) == 0.25
    assert predicted_exponent("delta_f", None, sp, 1) == 1.0
    assert predicted_exponent("delta_h", "hidden", sp, 1) is None
    assert (
        predicted_exponent("lin_error", None, parse_parametrization("gamma=2"), 10)
        == 0.0
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"widths": [8]}, ValueError, "two distinct widths"),
        ({"widths": [8, 0]}, ValueError, "expected every width to be a positive int"),
        ({"steps": 0}, ValueError, "expected steps to be a positive int"),
        ({"seeds": []}, ValueError, "expected seeds"),
        ({"lr": -1.0}, ValueError, "expected lr to be a finite number > 0"),
        ({"optimizer": "lbfgs"}, ValueError, "expected optimizer to be one of"),
        ({"confidence": 1.5}, ValueError, r"expected confidence in \(0, 1\)"),
        ({"family": "resnet"}, ValueError, "expected family to be one of"),
        ({"family": lambda w: MLP(w)}, ValueError, "expected data=\\(x, y\\)"),
        ({"family": 3}, TypeError, "expected family"),
        (
            {"parametrization": "r=0.9"},
            ValueError,
            r"expected r in \[0, 1/2\], got 0.9",
        ),
        ({"family": "bn_mlp"}, ValueError, "acts on each sample separately"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    args = {"family": "mlp", "parametrization": "mup", "widths": [8, 16]}
    args.update(kwargs)
    with pytest.raises(error, match=message):
        coord_check(
            args.pop("family"),
            args.pop("parametrization"),
            args.pop("widths"),
            **args,
        )


def test_transformer_linearization_without_forward_mode_attention():
    """Fused attention has no forward-mode AD on CPU: J0 dtheta falls back, same value."""
    built = []

    def family(width: int) -> Transformer:
        built.append(Transformer(width, vocab=5, seq_len=3, depth=1).double())
        return built[-1]

    tokens = torch.randint(0, 5, (4, 3), generator=torch.Generator().manual_seed(0))
    y = torch.randn(
        4, 15, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    # On CPU, forward-mode AD through fused SDPA raises; coord_check falls back.
    result = coord_check(
        family,
        "mup",
        [4, 6],
        steps=2,
        seeds=[0],
        lr=0.75,
        data=(tokens, y),
        dtype=torch.float64,
        ntk=False,
    )
    torch.manual_seed(0)
    init = apply_parametrization(
        Transformer(6, vocab=5, seq_len=3, depth=1).double(), "mup"
    )
    trained = built[-1]
    names = [n for n, _ in init.named_parameters()]
    j0 = per_sample_jacobian(init, names, tokens)
    dtheta = torch.cat(
        [
            (pt - p0).detach().reshape(-1)
            for p0, pt in zip(init.parameters(), trained.parameters())
        ]
    )
    with torch.no_grad():
        f0, ft = init(tokens).reshape(4, -1), trained(tokens).reshape(4, -1)
    lin = f0 + torch.einsum("iap,p->ia", j0, dtheta)
    want = float((ft - lin).norm() / (ft - f0).norm())
    got = next(
        r["value"]
        for r in result.records
        if r["metric"] == "lin_error" and r["width"] == 6
    )
    assert got == pytest.approx(want, rel=1e-8)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    kwargs = {"steps": 3, "seeds": 2, "lr": 0.1, "dtype": torch.float64}
    cpu = coord_check("mlp", "r=0.25", [8, 16], **kwargs)
    gpu = coord_check("mlp", "r=0.25", [8, 16], device="cuda", **kwargs)
    assert_close(
        "records",
        torch.tensor([r["value"] for r in cpu.records]),
        torch.tensor([r["value"] for r in gpu.records]),
        rtol=1e-8,
        atol=1e-12,
    )


def test_user_module_roles_inferred():
    """A plain nn.Sequential: first layer read-in, last read-out, the rest hidden."""

    def family(width: int) -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Linear(3, width),
            torch.nn.Tanh(),
            torch.nn.Linear(width, width),
            torch.nn.Tanh(),
            torch.nn.Linear(width, 2),
        )

    x, y = _data()
    result = coord_check(
        family,
        "r=0.25",
        [8, 16],
        steps=2,
        seeds=1,
        data=(x.float(), y.float()),
        ntk=False,
    )
    assert {f["layer"] for f in result.fits if f["metric"] == "delta_h"} == {"0", "2"}
    assert [result.fit("dW_op", n)["predicted"] for n in ("0", "2", "4")] == [
        0.25,
        -0.25,
        -0.5,
    ]


class _DictModel(torch.nn.Module):
    """Keyword inputs and a mapping output, as Hugging Face models have."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, width), torch.nn.Tanh(), torch.nn.Linear(width, 2)
        )

    def forward(self, features: torch.Tensor) -> dict:
        return {"prediction": self.net(features)}


def test_dict_inputs_and_output_fn_give_the_plain_models_records():
    x, y = _data()
    x, y = x.float(), y.float()
    kw = dict(steps=2, seeds=1, ntk=False, mode="eval")
    plain = coord_check(
        lambda w: _DictModel(w).net, "r=0.25", [8, 16], data=(x, y), **kw
    )
    wrapped = coord_check(
        _DictModel,
        "r=0.25",
        [8, 16],
        data=({"features": x}, y),
        output_fn=lambda out: out["prediction"],
        roles={"net.0": "readin", "net.2": "readout"},
        **kw,
    )
    values = [r["value"] for r in wrapped.records]
    assert values == pytest.approx([r["value"] for r in plain.records], rel=1e-6)
    with pytest.raises(ValueError, match="mode"):
        coord_check("mlp", "mup", [8, 16], mode="both")


WIDTHS = [64, 128, 256, 512, 1024]


@pytest.mark.parametrize(
    ("r", "optimizer", "lr"), [(0.0, "sgd", 0.3), (0.25, "sgd", 0.3), (0.5, "sgd", 0.3),
                               (0.5, "adam", 0.1)]
)  # fmt: skip
@pytest.mark.slow
def test_default_check_of_the_mlp_passes_with_reasons(r, optimizer, lr):
    """The calibrated defaults (SGD lr 0.3, Adam 0.1, 10 steps, 4 seeds) pass."""
    result = coord_check("mlp", f"r={r}", WIDTHS, optimizer=optimizer)
    assert (result.lr, result.steps, result.seeds) == (lr, 10, (0, 1, 2, 3))
    assert result.passed, [
        (f["metric"], f["layer"], f["reason"]) for f in result.failures
    ]
    fit = result.fit("ntk_rel_change")
    assert fit["predicted"] == pytest.approx(2 * r - 1) and "within" in fit["reason"]
    assert result.fit("dW_op", "hidden.0")["predicted"] == pytest.approx(r - 0.5)


@pytest.mark.slow
def test_small_learning_rate_fails_in_the_first_step_regime():
    """The issue's case: lr 0.05, 10 steps at r = 1/2 reads lin_error ~ n^-0.36."""
    result = coord_check("mlp", "r=0.5", WIDTHS, lr=0.05)
    assert not result.passed
    fit = result.fit("lin_error")
    assert fit["passed"] is False and fit["predicted"] == 0.0
    assert -0.5 < fit["slope"] < -0.2
    assert "first-step exponent r - 1 = -0.50" in fit["reason"]
    assert "raise lr or steps" in fit["reason"]


@pytest.mark.slow
def test_a_mis_scaled_hidden_learning_rate_fails_at_that_layer():
    """muP but the hidden SGD rate without its n^(2r) = n factor: dW_rel ~ n^-1 there."""
    p = parse_parametrization("r=0.5")
    wrong = replace(
        p, name="r=0.5-bad-hidden", hidden=replace(p.hidden, lr_sgd=Scale(-1.0, 0.0))
    )
    result = coord_check("mlp", wrong, WIDTHS, ntk=False, linearization=False)
    rel = result.fit("dW_rel", "hidden.0")
    assert rel["passed"] is False and "below the predicted +0.00" in rel["reason"]
    assert rel["slope"] == pytest.approx(-1.0, abs=0.15)
    assert result.fit("dW_rel", "readin")["passed"]
