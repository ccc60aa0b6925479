"""The science checks: width exponents (docs/theory.md section 2), the gamma0 laws (3), BN (5).

Every check is a measurement with a stated tolerance; the negative controls show
that the same measurement separates the alternatives.

Protocol notes (why these settings):

* MLP exponents use widths 64..1024 (16x), 4 seeds, float64, 10 full-batch SGD
  steps, the table gauge. Two configurations, because the operator norm of an
  ``n x k`` Gaussian matrix is ``~ sqrt(n) + sqrt(k)``, a finite-width correction of
  order ``sqrt(k / n)`` in the relative change of rectangular layers:

  - "norms" (``d_in = 1``, ``d_out = 32``, ``eta0 = 0.48``, batch 16): a scalar
    input makes the read-in a vector (no correction), 32 outputs make ``||f0||``
    concentrate (one output is a chi variable with 100% spread), and a small
    ``eta0`` keeps the 10 steps in the regime where the leading order dominates;
  - "kernel" (``d_in = 8``, ``d_out = 1``, ``eta0 = 0.25``, batch 32): one output
    makes the read-out a vector; the larger ``eta0 * T`` lets the coherent
    second-order term of the kernel change dominate (docs/theory.md section 2).

* Norm exponents: +-0.05; kernel and linearization exponents: +-0.2.
* CNN (channels 8..128) and transformer (``d_model`` 16..256): ``||dh||`` of the
  hidden layers at muP within +-0.1, looser because the widths are smaller (the
  finite-width corrections are larger) and the runs fewer.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from rdiag.coord_check import coord_check
from rdiag.models import BNMLP, make_model
from rdiag.parametrization import gamma_family, make_optimizer, mup

WIDTHS = [64, 128, 256, 512, 1024]
NORM_TOL, KERNEL_TOL = 0.05, 0.2


def _check(result, metric, layer, tol):
    fit = result.fit(metric, layer)
    assert fit["predicted"] is not None
    assert abs(fit["slope"] - fit["predicted"]) <= tol, (
        f"{result.parametrization}: {metric}[{layer}] slope {fit['slope']:.3f} "
        f"(CI {fit['ci'][0]:.3f}..{fit['ci'][1]:.3f}), predicted {fit['predicted']:.3f} +- {tol}"
    )
    return fit


@pytest.mark.slow
@pytest.mark.parametrize("r", [0.0, 0.25, 0.5])
def test_mlp_width_exponents(r):
    norms = coord_check(
        "mlp",
        f"r={r}",
        WIDTHS,
        steps=10,
        seeds=4,
        lr=0.48,
        dtype=torch.float64,
        family_kwargs={"d_in": 1, "d_out": 32, "depth": 3},
        ntk=False,
        linearization=False,
    )
    for metric in ("f0", "delta_f"):
        _check(norms, metric, None, NORM_TOL)
    for layer in ("readin", "hidden.0"):
        _check(norms, "h0", layer, NORM_TOL)
        _check(norms, "delta_h", layer, NORM_TOL)
        _check(norms, "dW_rel", layer, NORM_TOL)
    for layer, want in (("readin", r), ("hidden.0", r - 0.5), ("readout", -0.5)):
        assert _check(norms, "dW_op", layer, NORM_TOL)["predicted"] == pytest.approx(
            want
        )
    kernel = coord_check(
        "mlp",
        f"r={r}",
        WIDTHS,
        steps=10,
        seeds=4,
        lr=0.25,
        dtype=torch.float64,
        batch_size=32,
        family_kwargs={"d_in": 8, "d_out": 1, "depth": 3},
    )
    _check(kernel, "dW_rel", "readout", NORM_TOL)
    for metric in ("ntk_rel_change", "lin_error"):
        assert _check(kernel, metric, None, KERNEL_TOL)["predicted"] == pytest.approx(
            2 * r - 1
        )


def test_first_step_kernel_exponent_is_r_minus_one_at_mup():
    """Negative control: one small step at r = 1/2 gives r - 1 = -1/2, not 2r - 1 = 0."""
    result = coord_check(
        "mlp",
        "mup",
        WIDTHS,
        steps=1,
        seeds=4,
        lr=0.005,
        dtype=torch.float64,
        batch_size=32,
        family_kwargs={"d_in": 8, "d_out": 1},
    )
    for metric in ("ntk_rel_change", "lin_error"):
        fit = _check(result, metric, None, KERNEL_TOL)
        assert fit["predicted"] == -0.5
        assert fit["ci"][1] < -0.2  # and clearly not the T >~ 10 value 0


def test_standard_parametrization_output_change_grows_like_width():
    result = coord_check(
        "mlp",
        "sp",
        WIDTHS,
        steps=1,
        seeds=3,
        lr=0.02,
        family_kwargs={"d_in": 8, "d_out": 4},
        ntk=False,
        linearization=False,
    )
    _check(result, "delta_f", None, 0.1)


@pytest.mark.parametrize(
    ("family", "widths", "kwargs", "hidden", "lr"),
    [
        (
            "cnn",
            [8, 16, 32, 64, 128],
            {"image_size": 4, "in_channels": 2, "d_out": 4, "depth": 2},
            ["hidden.0"],
            0.2,
        ),
        (
            "transformer",
            [16, 32, 64, 128, 256],
            {"vocab": 8, "seq_len": 4, "depth": 1, "d_out": 2},
            [f"blocks.0.{n}" for n in ("qkv", "proj", "fc1", "fc2")],
            0.4,
        ),
    ],
)
def test_family_coordinate_check_at_mup(family, widths, kwargs, hidden, lr):
    """Hidden ||dh|| ~ n^(1/2) and ||df|| ~ n^0 for the CNN and the transformer (+-0.1)."""
    result = coord_check(
        family,
        "mup",
        widths,
        steps=10,
        seeds=3,
        lr=lr,
        batch_size=8,
        family_kwargs=kwargs,
        ntk=False,
        linearization=False,
    )
    for layer in hidden:
        _check(result, "delta_h", layer, 0.1)
    _check(result, "delta_f", None, 0.1)


def test_adam_table_at_mup():
    """The Adam table gives ||dh|| ~ n^(1/2) (O(1) per coordinate); SGD's rates do not."""
    kwargs = {
        "steps": 10,
        "seeds": 3,
        "lr": 0.01,
        "optimizer": "adam",
        "family_kwargs": {"d_in": 1, "d_out": 8},
        "ntk": False,
        "linearization": False,
    }
    result = coord_check("mlp", "mup", WIDTHS, **kwargs)
    for layer in ("readin", "hidden.0"):
        _check(result, "delta_h", layer, NORM_TOL)
    _check(result, "delta_f", None, NORM_TOL)
    p = mup()
    wrong = replace(
        p,
        name="mup-with-sgd-rates-under-adam",
        **{
            role: replace(p.rule(role), lr_adam=p.rule(role).lr_sgd)
            for role in ("readin", "hidden", "readout")
        },
    )
    control = coord_check("mlp", wrong, WIDTHS, **kwargs)
    assert control.fit("delta_h", "hidden.0")["slope"] > 1.2


# ---- gamma0 laws (docs/theory.md section 3) ---------------------------------------------
def _stable(
    gamma0: float, eta0: float, width: int = 64, depth: int = 3, steps: int = 300
) -> bool:
    """Centered deep linear net fitted to one point: does SGD at N * eta0 stay bounded?"""
    model = make_model(
        "mlp",
        width,
        d_in=4,
        d_out=1,
        depth=depth,
        activation="linear",
        bias=False,
        parametrization=gamma_family(gamma0),
        seed=0,
    ).double()
    opt = make_optimizer(model, None, eta0)
    x, y = torch.ones(1, 4, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.5 * (model(x) - y).pow(2).sum()
        if not loss.item() <= 5.0:  # 10x the initial loss 0.5, or NaN
            return False
        if loss.item() < 1e-10:
            return True
        loss.backward()
        opt.step()
    return loss.item() < 0.5


def _largest_stable_eta(gamma0: float, guess: float, depth: int = 3) -> float:
    lo, hi = (
        math.log(guess) - 4.6,
        math.log(guess) + 4.6,
    )  # bracket guess / 100 .. x 100
    assert _stable(gamma0, math.exp(lo), depth=depth) and not _stable(
        gamma0, math.exp(hi), depth=depth
    )
    for _ in range(9):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _stable(gamma0, math.exp(mid), depth=depth) else (lo, mid)
    return math.exp(0.5 * (lo + hi))


def test_largest_stable_learning_rate_follows_gamma_laws():
    """eta* ~ gamma0^2 for gamma0 << 1 and ~ gamma0^(2/L) for gamma0 >> 1 (L = 3 layers)."""
    depth = 3
    small = [_largest_stable_eta(g, g**2, depth) for g in (1e-3, 1e-2)]
    large = [_largest_stable_eta(g, g ** (2 / depth), depth) for g in (1e2, 1e3)]
    lazy_slope = math.log(small[1] / small[0]) / math.log(10)
    rich_slope = math.log(large[1] / large[0]) / math.log(10)
    assert abs(lazy_slope - 2.0) <= 0.3, f"lazy exponent {lazy_slope:.3f}, predicted 2"
    assert abs(rich_slope - 2 / depth) <= 0.15, (
        f"rich exponent {rich_slope:.3f}, predicted 2/L"
    )


# ---- batch norm without gradient explosion (docs/theory.md section 5) ---------------------
def _log_grad_w2(depth: int, seed: int, **kwargs) -> float:
    """log ||dL/dW_2|| at init, width = batch = 100, L = mean of the outputs.

    A loss linear in the output fixes the output cotangent, so the measurement is
    the backward propagation through depth alone.
    """
    torch.manual_seed(seed)
    net = BNMLP(100, depth=depth, **kwargs)
    x = torch.randn(100, 100, generator=torch.Generator().manual_seed(1000 + seed))
    (grad,) = torch.autograd.grad(net(x).mean(), net.hidden[0].weight)
    return math.log(float(grad.norm()))


def _rise(depth: int, seeds: int, **kwargs) -> float:
    return (
        sum(
            _log_grad_w2(depth, s, **kwargs) - _log_grad_w2(5, s, **kwargs)
            for s in range(seeds)
        )
        / seeds
    )


def test_orthogonal_bn_gradients_stay_bounded_gaussian_explode():
    assert abs(_rise(500, 3, init="orthogonal")) <= 0.5
    assert _rise(500, 10, init="gaussian") >= 3.0


def test_activation_shaping_keeps_tanh_bounded():
    shaped = _rise(500, 3, init="orthogonal", activation="tanh", alpha=0.4)
    assert -2.0 <= shaped <= 0.5
    assert (
        _rise(50, 2, init="orthogonal", activation="tanh", alpha=0.0) >= 2.0
    )  # control
