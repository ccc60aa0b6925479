"""Solvers and estimators in rdiag.linalg against dense eigh / exact traces."""

from __future__ import annotations

import pytest
import torch

from rdiag.linalg import (
    EigResult,
    hutch_plus_plus,
    hutchinson,
    lanczos,
    lanczos_quadrature,
    power_extreme,
    power_iteration,
    spectral_density,
)
from rdiag.linalg._vectors import column_dots, orthogonalize
from rdiag.operators.base import DenseOperator, LinearOperator
from tests import oracles
from tests._assert import assert_close


def spectrum_matrix(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A dense symmetric float64 matrix with the given eigenvalues, random basis."""
    gen = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * eigenvalues.double()) @ q.T


# Indefinite, with a cluster near the top and a gap: a Hessian-like test spectrum.
SPECTRUM = torch.cat(
    [
        torch.linspace(-3.0, 6.0, 195, dtype=torch.float64),
        torch.tensor([7.0, 8.0, 8.5, 9.0, 12.0]),
    ]
)


@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
@pytest.mark.parametrize("k", [1, 5])
def test_lanczos_matches_eigh(which: str, k: int) -> None:
    a = spectrum_matrix(SPECTRUM)
    exact = oracles.dense_eigh(a)[0]
    res = lanczos(DenseOperator(a), k, which=which, tol=1e-9)
    expected = {
        "largest": exact[:k],
        "smallest": exact[-k:],
        "both": torch.cat([exact[:k], exact[-k:]]),
    }[which]
    assert res.converged
    assert_close(
        f"lanczos {which} k={k}", expected, res.eigenvalues, rtol=1e-10, atol=1e-10
    )
    vecs = res.eigenvectors
    true_residuals = (a @ vecs - vecs * res.eigenvalues).norm(dim=0)
    assert_close("residuals", true_residuals, res.residuals, rtol=0, atol=1e-9)
    assert bool((res.residuals <= 1e-9 * 12.0 * 1.0001).all())
    assert_close(
        "orthonormal",
        torch.eye(len(expected), dtype=torch.float64),
        vecs.T @ vecs,
        rtol=0,
        atol=1e-10,
    )


def test_lanczos_restarts_with_a_small_basis_and_is_deterministic() -> None:
    a = spectrum_matrix(SPECTRUM)
    exact = oracles.dense_eigh(a)[0]
    first = lanczos(DenseOperator(a), 3, basis_size=8, tol=1e-9, seed=4)
    again = lanczos(DenseOperator(a), 3, basis_size=8, tol=1e-9, seed=4)
    assert first.converged and first.num_matvecs > 8  # it had to restart
    assert_close("restarted", exact[:3], first.eigenvalues, rtol=1e-10, atol=1e-10)
    assert first.num_matvecs == again.num_matvecs
    assert torch.equal(first.eigenvectors, again.eigenvectors)


def test_lanczos_finds_multiplicities_of_a_low_rank_operator() -> None:
    gen = torch.Generator().manual_seed(1)
    factor = torch.randn(120, 4, generator=gen, dtype=torch.float64)
    a = factor @ factor.T
    exact = oracles.dense_eigh(a)[0]
    res = lanczos(DenseOperator(a), 3, which="both")
    expected = torch.cat([exact[:3], torch.zeros(3, dtype=torch.float64)])
    assert res.converged
    assert_close(
        "low rank", expected, res.eigenvalues, rtol=1e-10, atol=1e-10 * float(exact[0])
    )


def test_warm_start_cuts_matvecs_after_a_small_change() -> None:
    a = spectrum_matrix(SPECTRUM)
    gen = torch.Generator().manual_seed(2)
    noise = torch.randn(200, 200, generator=gen, dtype=torch.float64)
    b = a + 1e-3 * (noise + noise.T)
    cold_a = lanczos(DenseOperator(a), 1)
    cold_b = lanczos(DenseOperator(b), 1, seed=1)
    for start in (cold_a, cold_a.eigenvectors[:, 0], cold_a.eigenvectors):
        warm = lanczos(DenseOperator(b), 1, warm_start=start)
        assert warm.converged
        assert_close("warm", cold_b.eigenvalues, warm.eigenvalues, rtol=1e-10, atol=0)
        assert warm.num_matvecs * 1.5 <= cold_b.num_matvecs, (
            warm.num_matvecs,
            cold_b.num_matvecs,
        )


class DiagonalOperator(LinearOperator):
    """``diag(d)``: eigenvectors are coordinate vectors, the worst case for sums."""

    def __init__(self, diagonal: torch.Tensor) -> None:
        self.diagonal = diagonal
        self.shape = (len(diagonal), len(diagonal))
        self.dtype, self.device = diagonal.dtype, diagonal.device

    def _matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        return self.diagonal[:, None] * matrix


def head_heavy_diagonal(size: int = 2**21 + 4321) -> torch.Tensor:
    """float64: 8 separated top eigenvalues over millions spread in [-0.3, 1.2]."""
    gen = torch.Generator().manual_seed(0)
    d = torch.rand(size, generator=gen, dtype=torch.float64) * 1.5 - 0.3
    d[:8] = torch.tensor([2.2, 2.14, 2.09, 2.085, 2.07, 2.02, 2.01, 1.98])
    return d


def test_float32_dots_and_gram_schmidt_are_accurate_at_millions_of_entries() -> None:
    # A vector near a coordinate vector: a BLAS float32 dot loses the 2M small
    # products below its running sum's rounding (about 1e-3 off here).
    d = head_heavy_diagonal()
    gen = torch.Generator().manual_seed(1)
    a = (d**12 * torch.randn(len(d), generator=gen, dtype=torch.float64))[:, None]
    b = torch.randn(len(d), 3, generator=gen, dtype=torch.float64) * d[:, None] ** 6
    exact = (a * b).sum(0)
    got = column_dots(a.float().expand(-1, 3), b.float())
    scale = a.norm() * b.norm(dim=0)
    assert bool(((got - exact).abs() <= 1e-6 * scale).all()), (got - exact) / scale
    basis = torch.linalg.qr(torch.cat([a, b], dim=1))[0][:, :3].T.float()
    w, coeff, norm = orthogonalize(basis[None], b[:, 0].float()[None])
    exact_norm = float(w[0].double().norm())
    assert abs(float(norm[0]) - exact_norm) <= 1e-7 * exact_norm
    leftover = basis.double() @ w[0].double() / exact_norm
    assert float(leftover.abs().max()) <= 1e-6
    assert_close(
        "coefficients",
        basis.double() @ b[:, 0],
        coeff[0],
        rtol=0,
        atol=1e-6 * float(b[:, 0].norm()),
    )


@pytest.mark.slow
@pytest.mark.parametrize("criterion", ["eigenvalue", "residual"])
def test_float32_lanczos_reaches_1e6_on_millions_of_parameters(criterion: str) -> None:
    # Float32 norms and dots without float64 accumulation left this at 4e-6 (norm
    # rounding) and 2.5e-5 (BLAS dots); the accurate sums give about 1e-8.
    d = head_heavy_diagonal()
    res = lanczos(DiagonalOperator(d.float()), 2, tol=1e-6, criterion=criterion)
    assert res.converged
    assert_close("top two", d[:2], res.eigenvalues, rtol=1e-6, atol=0)
    gram = res.eigenvectors.double().T @ res.eigenvectors.double()
    assert_close(
        "orthonormal", torch.eye(2, dtype=torch.float64), gram, rtol=0, atol=1e-6
    )
    power = power_iteration(DiagonalOperator(d.float()), tol=1e-4, max_iter=400)
    assert abs(float(power.eigenvalues[0]) - 2.2) <= 1e-6 * 2.2


def test_float32_lanczos_both_ends_through_restarts_has_no_ghosts() -> None:
    # T comes from the recurrence and the restart arrow is set analytically; a
    # lost orthogonality would show as a repeated (ghost) eigenvalue here.
    d = head_heavy_diagonal(200_003)
    d[-4:] = torch.tensor([-1.0, -0.9, -0.85, -0.8], dtype=torch.float64)
    res = lanczos(DiagonalOperator(d.float()), 3, which="both", tol=1e-6, basis_size=12)
    assert res.converged and res.num_matvecs > 12  # it restarted
    expected = torch.cat([d[:3], d[-4:-1].flip(0)])
    assert_close("both ends", expected, res.eigenvalues, rtol=1e-6, atol=1e-6)


def test_power_iteration_dominant_shift_and_the_indefinite_pitfall() -> None:
    values = torch.cat([torch.linspace(-1.0, 1.0, 48), torch.tensor([2.0, -5.0])])
    a = DenseOperator(spectrum_matrix(values))
    plain = power_iteration(a, tol=1e-10, max_iter=2000)
    assert plain.converged
    # The largest-magnitude eigenvalue is -5: plain power iteration misses lambda_max.
    assert abs(float(plain.eigenvalues[0]) + 5.0) < 1e-9
    shifted = power_iteration(a, tol=1e-10, max_iter=2000, shift=-5.0)
    assert shifted.converged and abs(float(shifted.eigenvalues[0]) - 2.0) < 1e-9
    assert abs(float(lanczos(a, 1).eigenvalues[0]) - 2.0) < 1e-9
    warm = power_iteration(a, tol=1e-10, max_iter=2000, warm_start=plain)
    assert warm.num_matvecs < plain.num_matvecs
    # Two phases: the dominant -5 first, then shifted by it to reach the top.
    top = power_extreme(a, "largest", tol=1e-10, max_iter=2000)
    assert top.converged and abs(float(top.eigenvalues[0]) - 2.0) < 1e-9
    assert top.num_matvecs > plain.num_matvecs
    low = power_extreme(a, "smallest", tol=1e-10, max_iter=2000)
    assert low.num_matvecs == plain.num_matvecs
    assert float(low.eigenvalues[0]) == float(plain.eigenvalues[0])


def test_trace_estimators_within_their_error_bars() -> None:
    decaying = 10.0 * 0.7 ** torch.arange(300, dtype=torch.float64) - 0.05
    a = spectrum_matrix(decaying, seed=3)
    exact = float(a.trace())
    op = DenseOperator(a)
    hutch = hutchinson(op, 60, seed=5)
    plus = hutch_plus_plus(op, 60, seed=5)
    assert hutch.num_matvecs == 60 and plus.num_matvecs == 60
    for est in (hutch, plus):
        assert abs(est.estimate - exact) <= 4 * est.std_err, (est, exact)
    # Hutch++ deflates the top of a decaying spectrum: far smaller error bars.
    assert plus.std_err < 0.2 * hutch.std_err


def test_spectral_density_integrates_to_one_with_the_right_mean() -> None:
    a = spectrum_matrix(SPECTRUM, seed=6)
    op = DenseOperator(a)
    grid, density = spectral_density(
        op, num_probes=8, lanczos_steps=40, grid=2000, seed=2
    )
    dx = float(grid[1] - grid[0])
    assert abs(float(density.sum()) * dx - 1.0) < 1e-6
    mean = float((grid * density).sum()) * dx
    # The SLQ mean is exactly Hutchinson's tr/P on the same (normalized) probes...
    nodes, weights = lanczos_quadrature(op, 8, 40, seed=2)
    hutch = hutchinson(op, 8, seed=2)
    assert abs(mean - float((nodes * weights).sum(1).mean())) < 1e-6
    assert abs(mean - hutch.estimate / 200) < 1e-6
    # ...and within its error bars of the true tr/P.
    assert abs(mean - float(a.trace()) / 200) <= 4 * hutch.std_err / 200


def test_lanczos_on_the_ntk_operator() -> None:
    from rdiag.operators.ntk import NTKOperator
    from tests.models import ZOO

    net, make_input = ZOO["mlp_tanh"](0)
    x = make_input(8, 1)
    names = [n for n, _ in net.named_parameters()]
    jac = oracles.per_sample_jacobian(net, names, x)
    kernel = oracles.ntk_from_jacobians(jac, jac).permute(0, 2, 1, 3).reshape(24, 24)
    res = lanczos(NTKOperator(net, x, dtype=torch.float64), 3, tol=1e-10)
    assert_close(
        "NTK top-3",
        oracles.dense_eigh(kernel)[0][:3],
        res.eigenvalues,
        rtol=1e-9,
        atol=1e-12,
    )


def test_bad_inputs_give_clear_errors() -> None:
    op = DenseOperator(spectrum_matrix(SPECTRUM[:10]))
    with pytest.raises(ValueError, match="k <= P"):
        lanczos(op, 11)
    with pytest.raises(ValueError, match="which"):
        lanczos(op, 1, which="top")
    with pytest.raises(TypeError, match="LinearOperator"):
        lanczos(torch.eye(3), 1)
    with pytest.raises(ValueError, match="warm_start"):
        lanczos(op, 1, warm_start=torch.ones(9))
    with pytest.raises(ValueError, match="num_matvecs"):
        hutch_plus_plus(op, 2)
    with pytest.raises(ValueError, match="tol"):
        power_iteration(op, tol=-1.0)
    assert isinstance(lanczos(op, 1), EigResult)


def test_kernel_moments_within_their_error_bars() -> None:
    """Trace, Frobenius norm, effective rank and movement of a kernel from products."""
    from rdiag import NTKOperator
    from rdiag.linalg import kernel_moments

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)
    ).double()
    x = torch.randn(40, 3, dtype=torch.float64)
    op = NTKOperator(net, x)
    k0 = op.to_dense()
    m0 = kernel_moments(op, 400, seed=1)
    with torch.no_grad():
        net[0].weight.add_(0.2 * torch.randn_like(net[0].weight))
    k1 = op.to_dense()  # the operator reads the moved parameters
    m1 = kernel_moments(op, reference=m0)
    fro = float(k1.norm())
    exact = {
        "trace": float(k1.trace()),
        "frobenius": fro,
        "effective_rank": float(k1.trace()) ** 2 / fro**2,
        "rel_change": float((k1 - k0).norm() / k0.norm()),
    }
    for name, value in exact.items():
        est = getattr(m1, name)
        assert abs(est.value - value) <= 4 * est.std_err, (name, est, value)
        assert est.std_err < 0.2 * abs(value), (name, est)  # informative, not vacuous
    assert torch.equal(m1.probes, m0.probes) and m1.num_matvecs == 400
    assert m0.rel_change is None
    with pytest.raises(ValueError, match="same size"):
        kernel_moments(NTKOperator(net, x[:10]), reference=m0)


def test_eigenvalue_criterion_converged_means_the_stated_accuracy_on_a_cluster():
    """Four top eigenvalues within 1e-3 (relative) over a bulk below 0.9: the
    Ritz gap to the bulk must not vouch for an error bound the cluster breaks."""
    from rdiag.linalg.lanczos import lanczos
    from rdiag.operators.base import DenseOperator

    for seed in range(7):
        gen = torch.Generator().manual_seed(seed)
        top = 1 - torch.rand(4, generator=gen, dtype=torch.float64) * 1e-3
        bulk = torch.rand(396, generator=gen, dtype=torch.float64) * 0.9
        eig = torch.cat([top, bulk])
        q, _ = torch.linalg.qr(
            torch.randn(400, 400, generator=gen, dtype=torch.float64)
        )
        res = lanczos(
            DenseOperator((q * eig) @ q.T), tol=1e-6, criterion="eigenvalue", seed=seed
        )
        assert res.converged
        assert abs(float(res.eigenvalues[0]) - float(top.max())) <= 1e-6, seed
