"""Verdicts on synthetic fits and records: tolerances, the first-step regime, the joint fit."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rdiag.verdicts import allowance, diagnose, estimate_richness, judge

WIDTHS = [64, 128, 256, 512, 1024]


def _fit(metric, slope, predicted, half=0.02, layer=None, widths=WIDTHS):
    return {
        "metric": metric,
        "layer": layer,
        "slope": slope,
        "ci": [slope - half, slope + half],
        "predicted": predicted,
        "widths": widths,
    }


def test_allowance_scales_like_a_root_n_correction():
    assert allowance("delta_h", WIDTHS) == pytest.approx(0.1)
    assert allowance("ntk_rel_change", [64, 1024]) == pytest.approx(0.2)
    # (n0^-1/2 - n1^-1/2) / ln(n1 / n0), relative to 64..1024
    assert allowance("delta_h", [128, 2048]) == pytest.approx(0.1 / math.sqrt(2))
    assert allowance("delta_h", [16, 256]) == pytest.approx(0.2)
    assert allowance("delta_h", [64, 128]) == pytest.approx(
        0.1 * (1 / 8 - 1 / math.sqrt(128)) / math.log(2) / (0.09375 / math.log(16))
    )


def test_judge_passes_within_and_fails_beyond_the_tolerance():
    ok = judge(_fit("delta_h", 0.58, 0.5), r=0.5, steps=10)
    assert ok["passed"] and ok["tolerance"] == pytest.approx(math.hypot(0.1, 0.02))
    bad = judge(_fit("delta_h", 0.62, 0.5), r=0.5, steps=10)
    assert bad["passed"] is False and "0.12 above the predicted +0.50" in bad["reason"]
    assert judge(_fit("delta_h", 0.5, None), r=0.5, steps=10)["passed"] is None
    nan = judge(_fit("delta_h", math.nan, 0.5), r=0.5, steps=10)
    assert nan["passed"] is False and "fewer than two" in nan["reason"]


def test_judge_calls_a_noisy_fit_inconclusive():
    # tolerance hypot(0.1, 0.25) = 0.27 >= 0.25: cannot tell r from r +- 1/4
    noisy = judge(_fit("delta_h", 0.5, 0.5, half=0.25), r=0.5, steps=10)
    assert noisy["passed"] is False and noisy["inconclusive"]
    assert noisy["reason"].startswith("inconclusive")
    # the kernel exponent moves by 2 per unit r: 0.27 still resolves 1/4 of r
    kernel = judge(_fit("ntk_rel_change", 0.0, 0.0, half=0.25), r=0.5, steps=10)
    assert kernel["passed"]
    # an r-independent exponent is inconclusive only when it cannot tell +1 (SP)
    assert judge(_fit("delta_f", 0.0, 0.0, half=0.4), r=0.5, steps=10)["passed"]


def test_first_step_regime_of_the_kernel_exponents():
    # T = 5 < 10: anything between r - 1 = -0.5 and 2r - 1 = 0 (+- tolerance) passes
    mid = judge(_fit("lin_error", -0.3, 0.0), r=0.5, steps=5)
    assert mid["passed"] and "-0.50..+0.00" in mid["reason"]
    # T = 10: -0.36 against 0 fails, named as the first-step regime with its remedy
    slow = judge(_fit("lin_error", -0.36, 0.0, half=0.12), r=0.5, steps=10, lr=0.05)
    assert slow["passed"] is False
    assert "first-step exponent r - 1 = -0.50" in slow["reason"]
    assert "raise lr or steps (eta0 T = 0.5 now)" in slow["reason"]
    # not for the norms, and not at r = 0 (both exponents are -1 there)
    assert (
        "first-step" not in judge(_fit("delta_h", 0.2, 0.5), r=0.5, steps=10)["reason"]
    )
    r0 = judge(_fit("ntk_rel_change", -1.4, -1.0), r=0.0, steps=10)
    assert r0["passed"] is False and "first-step" not in r0["reason"]


def _records(r, *, seeds=4, noise=0.03, rng=None, bad_hidden_lr=0.0):
    """Synthetic measurements: value = c n^(a r + b) x lognormal noise."""
    rng = rng or np.random.default_rng(0)
    # (metric, layer, role, exponent at r)
    series = [
        ("delta_h", "readin", "readin", r),
        ("delta_h", "hidden.0", "hidden", r),
        ("f0", None, None, -r),
        ("delta_f", None, None, 0.0),
        ("dW_rel", "readin", "readin", r - 0.5),
        ("dW_rel", "hidden.0", "hidden", r - 0.5 + bad_hidden_lr),
        ("dW_rel", "readout", "readout", r - 0.5),
        ("ntk_rel_change", None, None, 2 * r - 1),
        ("h0", "readin", "readin", 0.5),
    ]
    out = []
    for width in WIDTHS:
        for seed in range(seeds):
            for metric, layer, role, e in series:
                value = 3.0 * width**e * math.exp(noise * rng.standard_normal())
                out.append(
                    dict(
                        width=width, seed=seed, metric=metric, layer=layer,
                        role=role, value=value,
                    )
                )  # fmt: skip
    return out


@pytest.mark.parametrize("r", [0.0, 0.3, 0.5])
def test_joint_fit_recovers_r_with_an_interval(r):
    est = estimate_richness(_records(r), steps=10)
    assert est.r == pytest.approx(r, abs=0.02)
    lo, hi = est.interval
    assert lo < est.r < hi and hi - lo < 0.1
    assert 0.05 < est.systematic < 0.15  # allowances 0.1..0.2 over 64..1024
    assert set(est.weights) >= {("delta_h", "readin"), ("ntk_rel_change", None)}
    assert ("delta_f", None) not in est.weights  # the same at every r: no information


def test_joint_fit_resists_one_mis_scaled_layer_and_names_it():
    est = estimate_richness(_records(0.5, bad_hidden_lr=0.8), steps=10)
    assert est.r == pytest.approx(0.5, abs=0.05)
    assert abs(est.residuals["dW_rel", "hidden.0"]) > 3.0
    assert max(abs(z) for k, z in est.residuals.items() if k[1] != "hidden.0") < 1.0


def test_kernel_exponents_stay_out_of_the_joint_fit_before_ten_steps():
    assert ("ntk_rel_change", None) not in estimate_richness(_records(0.5), 5).weights


def test_no_interval_from_fewer_than_three_seeds():
    est = estimate_richness(_records(0.25, seeds=2), steps=10)
    assert est.r == pytest.approx(0.25, abs=0.05) and all(
        math.isnan(v) for v in est.interval
    )


def _judged(metric, slope, predicted, layer=None, half=0.02):
    fit = _fit(metric, slope, predicted, half=half, layer=layer)
    return {**fit, **judge(fit, r=0.5, steps=10)}


ROLES = {"readin": "readin", "hidden.0": "hidden", "readout": "readout"}


def _diagnose(extra, r=0.5):
    base = [
        _judged("f0", -0.5, -0.5),
        _judged("delta_f", 0.0, 0.0),
        _judged("delta_f1", 0.0, 0.0),
        _judged("dW_rel", 0.0, 0.0, "readin"),
        _judged("dW_rel", 0.0, 0.0, "readout"),
        _judged("delta_h", 0.5, 0.5, "readin"),
    ]
    fits = base + extra
    est = estimate_richness(_records(r), steps=10)
    return diagnose(fits, est, target=0.5, roles=ROLES, lr_exponents={"hidden.0": 1.0})


def test_diagnosis_on_the_scale():
    d = _diagnose([_judged("dW_rel", 0.0, 0.0, "hidden.0")])
    assert d.kind == "mup" and d.verdict.startswith("muP (r = 0.50")
    assert all(layer.problem is None for layer in d.layers)


def test_diagnosis_of_an_unstable_and_a_frozen_layer_with_their_fixes():
    unstable = _diagnose([_judged("dW_rel", 0.5, 0.0, "hidden.0")])
    assert unstable.kind == "unstable" and "layer hidden.0" in unstable.verdict
    hidden = unstable.layers[1]
    assert hidden.problem == "unstable"
    # dW_rel ~ n^+0.5 where n^0 is needed: the rate ~ n^+1 must become n^+0.5
    assert hidden.fixes == (
        "learning rate x (n/64)^-0.50 (its rate ~ n^+1.00 -> n^+0.50)",
    )
    frozen = _diagnose([_judged("dW_rel", -0.6, 0.0, "hidden.0")])
    assert frozen.kind == "frozen" and "hidden.0 frozen in the limit" in frozen.verdict
    assert frozen.layers[1].fixes[0].startswith("learning rate x (n/64)^+0.60")


def test_diagnosis_of_growing_outputs_and_of_a_mis_scaled_init():
    growing = _diagnose([_judged("delta_f1", 0.97, 0.0)])
    assert growing.kind == "growing"
    assert "||f_1 - f_0|| ~ n^+0.97" in growing.verdict
    init = _diagnose(
        [_judged("dW_rel", 0.0, 0.0, "hidden.0"), _judged("h0", 1.0, 0.5, "hidden.0")]
    )
    assert (
        init.kind == "growing" and "layer hidden.0: ||h_0|| ~ n^+1.00" in init.verdict
    )
    hidden = init.layers[1]
    assert hidden.problem == "initialization"
    assert hidden.fixes == ("init std (or forward multiplier) x (n/64)^-0.50",)
