"""Metrics against direct float64 formulas (explicit centering matrices, eigh, SVD)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rdiag import metrics
from tests._assert import assert_close


def _f64(value: float) -> torch.Tensor:
    # assert_close's torch.as_tensor would read a Python float as float32.
    return torch.tensor(value, dtype=torch.float64)


def _kernels(n: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 5, generator=g, dtype=torch.float64)
    b = a + 0.3 * torch.randn(n, 5, generator=g, dtype=torch.float64)
    return a @ a.T, b @ b.T


def _centered(k: torch.Tensor) -> torch.Tensor:
    n = len(k)
    h = torch.eye(n, dtype=k.dtype) - torch.ones(n, n, dtype=k.dtype) / n
    return h @ k @ h


def test_kernel_movement_matches_direct_formulas() -> None:
    k0, k1 = _kernels()
    rel = (k1 - k0).norm() / k0.norm()
    dist = 1 - (k0 * k1).sum() / (k0.norm() * k1.norm())
    c0, c1 = _centered(k0), _centered(k1)
    cka = (c0 * c1).sum() / (c0.norm() * c1.norm())
    assert_close("rel", rel, _f64(metrics.relative_change(k0, k1)), rtol=1e-12, atol=0)
    assert_close(
        "dist", dist, _f64(metrics.kernel_distance(k0, k1)), rtol=1e-10, atol=1e-14
    )
    assert_close(
        "cka", cka, _f64(metrics.centered_alignment(k0, k1)), rtol=1e-12, atol=0
    )
    assert metrics.relative_change(k0, k0) == pytest.approx(0, abs=1e-12)
    assert metrics.centered_alignment(k0, 3 * k0) == pytest.approx(1, abs=1e-12)


def test_rectangular_distance_and_shape_errors() -> None:
    k0, k1 = _kernels()
    a, b = k0[:, :4], k1[:, :4]
    dist = 1 - (a * b).sum() / (a.norm() * b.norm())
    assert_close(
        "dist", dist, _f64(metrics.kernel_distance(a, b)), rtol=1e-10, atol=1e-14
    )
    with pytest.raises(ValueError, match="same shape"):
        metrics.relative_change(k0, k1[:3])
    with pytest.raises(ValueError, match="square"):
        metrics.centered_alignment(a, b)
    with pytest.raises(ValueError, match="2-D"):
        metrics.relative_change(torch.ones(3), torch.ones(3))


def test_kernel_target_alignment_one_hot() -> None:
    k, _ = _kernels(n=8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2, 0])
    y = torch.nn.functional.one_hot(labels, 3).double()
    c0, c1 = _centered(k), _centered(y @ y.T)
    expected = (c0 * c1).sum() / (c0.norm() * c1.norm())
    actual = _f64(metrics.kernel_target_alignment(k, labels))
    assert_close("kta", expected, actual, rtol=1e-12, atol=0)
    # A kernel built from the targets themselves is perfectly aligned.
    assert metrics.kernel_target_alignment(y @ y.T + 0, labels) == pytest.approx(
        1, abs=1e-12
    )
    with pytest.raises(ValueError, match="one target per kernel row"):
        metrics.kernel_target_alignment(k, labels[:5])


def test_eigenvalues_and_effective_rank() -> None:
    k, _ = _kernels(n=6)
    ref = torch.linalg.eigh(k).eigenvalues.flip(0)
    assert_close("eigs", ref, metrics.eigenvalues(k), rtol=1e-12, atol=1e-12)
    assert_close("top2", ref[:2], metrics.eigenvalues(k, top=2), rtol=1e-12, atol=1e-12)
    lam = ref.clamp_min(0)
    pr = lam.sum() ** 2 / (lam**2).sum()
    assert_close("pr", pr, _f64(metrics.effective_rank(k)), rtol=1e-10, atol=0)
    assert metrics.effective_rank(torch.ones(5)) == pytest.approx(5)
    assert metrics.effective_rank(torch.tensor([1.0, 0, 0])) == pytest.approx(1)
    p = lam / lam.sum()
    ent = torch.exp(-(p[p > 0] * p[p > 0].log()).sum())
    assert_close(
        "ent",
        ent,
        _f64(metrics.effective_rank(lam, kind="entropy")),
        rtol=1e-10,
        atol=0,
    )
    with pytest.raises(ValueError, match="participation"):
        metrics.effective_rank(lam, kind="bogus")


def test_matrix_norms_and_representation_movement() -> None:
    w = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    m = w.reshape(5, -1)
    op, fro = metrics.matrix_norms(w)
    assert_close("op", torch.linalg.svdvals(m)[0], _f64(op), rtol=1e-12, atol=0)
    assert_close("fro", m.norm(), _f64(fro), rtol=1e-12, atol=0)
    big = torch.randn(40, 30, dtype=torch.float64)
    op_big, _ = metrics.matrix_norms(big, exact_below=1)  # Lanczos route
    assert_close(
        "op_lanczos", torch.linalg.svdvals(big)[0], _f64(op_big), rtol=1e-10, atol=0
    )
    low_rank = torch.randn(30, 2, dtype=torch.float64) @ torch.randn(
        2, 45, dtype=torch.float64
    )
    op_low = metrics.operator_norm(low_rank, exact_below=1)
    assert_close(
        "op_low", torch.linalg.svdvals(low_rank)[0], _f64(op_low), rtol=1e-10, atol=0
    )
    h0, h1 = (
        torch.randn(4, 3, 2, dtype=torch.float64),
        torch.randn(4, 3, 2, dtype=torch.float64),
    )
    expected = sum((h1[i] - h0[i]).norm() for i in range(4)) / 4
    assert_close(
        "dh",
        expected,
        _f64(metrics.representation_movement(h1, h0)),
        rtol=1e-12,
        atol=0,
    )


def test_fit_exponent_recovers_slope_and_t_interval() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    widths = np.array([64, 128, 256, 512, 1024], dtype=float)
    rng = np.random.default_rng(0)
    values = 3.0 * widths[:, None] ** -0.5 * np.exp(0.05 * rng.standard_normal((5, 4)))
    slope, (lo, hi) = metrics.fit_exponent(widths, values)
    res = scipy_stats.linregress(
        np.log(np.repeat(widths, 4)), np.log(values.reshape(-1))
    )
    half = scipy_stats.t.ppf(0.975, 18) * res.stderr
    assert slope == pytest.approx(res.slope, abs=1e-12)
    assert (lo, hi) == pytest.approx((res.slope - half, res.slope + half), abs=1e-9)
    assert lo < -0.5 < hi
    for dof in (1, 3, 10):
        q = metrics._t_quantile(0.975, dof)
        assert q == pytest.approx(scipy_stats.t.ppf(0.975, dof), rel=1e-8)
    exact, (elo, ehi) = metrics.fit_exponent([1, 2, 4], [1.0, 4.0, 16.0])
    assert exact == pytest.approx(2) and ehi - elo == pytest.approx(0, abs=1e-9)
    assert all(math.isnan(v) for v in metrics.fit_exponent([1, 2], [1.0, 2.0])[1])


@pytest.mark.parametrize(
    ("widths", "values", "match"),
    [
        ([1, 2, 4], [1.0, 0.0, 2.0], "positive finite"),
        ([4, 4, 4], [1.0, 2.0, 3.0], "two distinct widths"),
        ([1, 2], [1.0, 2.0, 3.0], "one value per width"),
    ],
)
def test_fit_exponent_bad_input(widths: list, values: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        metrics.fit_exponent(widths, values)
