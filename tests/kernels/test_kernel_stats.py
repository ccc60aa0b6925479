"""kernel_stats and the KernelStats comparisons vs direct float64 torch."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from rdiag.kernels import KernelStats, reference
from rdiag.kernels._launch import KernelSums

from rdiag import kernels
from tests._assert import assert_close
from tests.kernels.conftest import (
    DTYPES,
    F64_TOL,
    assert_kernel_close,
    autotuning,
    randn,
)


def as64(value) -> torch.Tensor:
    """A Python float or tensor as float64 (torch.tensor(float) would be float32)."""
    return torch.as_tensor(value, dtype=torch.float64)


def pair(n: int, m: int, dtype=torch.float64, seed: int = 0, eps: float = 0.3):
    k0 = randn(n, m, seed=seed)
    return k0.to(dtype), (k0 + eps * randn(n, m, seed=seed + 1)).to(dtype)


def direct(k0, k1) -> dict[str, torch.Tensor]:
    a, b = k0.double(), k1.double()
    return {
        "inner": (a * b).sum(), "sq_norm0": (a * a).sum(), "sq_norm1": (b * b).sum(),
        "sq_diff": ((b - a) ** 2).sum(), "row0": a.sum(1), "row1": b.sum(1),
        "col0": a.sum(0), "col1": b.sum(0), "sum0": a.sum(), "sum1": b.sum(),
    }  # fmt: skip


def assert_stats(
    name, expected: dict, stats: KernelSums, rtol: float, atol: float
) -> None:
    for field, value in expected.items():
        assert_close(
            f"{name}.{field}", value, as64(getattr(stats, field)), rtol=rtol, atol=atol
        )


@pytest.mark.parametrize("n,m", [(1, 1), (6, 9), (12, 12)])
def test_reference_fields_float64(n, m):
    k0, k1 = pair(n, m)
    stats = reference.kernel_stats(k0, k1)
    assert stats.row0.dtype == torch.float64
    assert_stats("reference", direct(k0, k1), stats, **F64_TOL)


def test_comparisons_match_direct_float64():
    k0, k1 = pair(11, 11)
    k0, k1 = k0 @ k0.T, k1 @ k1.T  # symmetric, as eNTKs are
    stats = kernels.kernel_stats(k0, k1)
    distance = 1 - (k0 * k1).sum() / (k0.norm() * k1.norm())
    rel = (k1 - k0).norm() / k0.norm()
    h = torch.eye(11, dtype=torch.float64) - 1.0 / 11
    c0, c1 = h @ k0 @ h, h @ k1 @ h
    cka = (c0 * c1).sum() / (c0.norm() * c1.norm())
    assert_close("distance", distance, as64(stats.distance()), **F64_TOL)
    assert_close("relative_change", rel, as64(stats.relative_change()), **F64_TOL)
    assert_close("centered_alignment", cka, as64(stats.centered_alignment()), **F64_TOL)


def test_centered_alignment_of_non_symmetric_square_kernels():
    k0, k1 = pair(7, 7, eps=2.0)
    h = torch.eye(7, dtype=torch.float64) - 1.0 / 7
    c0, c1 = h @ k0 @ h, h @ k1 @ h
    expected = (c0 * c1).sum() / (c0.norm() * c1.norm())
    actual = KernelStats(*reference.kernel_stats(k0, k1)).centered_alignment()
    assert_close("centered alignment", expected, as64(actual), **F64_TOL)


def test_relative_change_survives_near_equal_kernels():
    """Summing |K1-K0|^2 directly avoids the cancellation of sq1 - 2 inner + sq0."""
    k0 = randn(30, 30, dtype=torch.float32)
    k1 = k0 + 1e-4 * randn(30, 30, seed=1, dtype=torch.float32)
    expected = ((k1.double() - k0.double()).norm() / k0.double().norm()).item()
    assert math.isclose(
        kernels.kernel_stats(k0, k1).relative_change(), expected, rel_tol=1e-4
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_constant_kernel_has_no_centered_alignment_even_with_round_off(dtype):
    """Centered norms at the kernels' round-off are zero: the alignment is undefined."""
    k = torch.full((7, 7), 1.0 / 3.0, dtype=dtype)
    noisy = k * (1 + torch.finfo(dtype).eps * randn(7, 7, dtype=dtype))
    for k1 in (k, noisy):
        with pytest.raises(ValueError, match="centered kernel is zero"):
            kernels.kernel_stats(k, k1).centered_alignment()
    far = k + 1e-2 * torch.eye(7, dtype=dtype)
    assert kernels.kernel_stats(far, far).centered_alignment() == pytest.approx(1.0)


def test_undefined_comparisons_and_bad_input_raise():
    zero = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="all zeros"):
        kernels.kernel_stats(zero, torch.ones(3, 3)).distance()
    with pytest.raises(ValueError, match="K0 is all zeros"):
        kernels.kernel_stats(zero, torch.ones(3, 3)).relative_change()
    with pytest.raises(ValueError, match="centered kernel is zero"):
        kernels.kernel_stats(torch.ones(3, 3), torch.eye(3)).centered_alignment()
    with pytest.raises(ValueError, match="square kernels"):
        kernels.kernel_stats(torch.ones(3, 4), torch.ones(3, 4)).centered_alignment()
    with pytest.raises(ValueError, match="one shape"):
        kernels.kernel_stats(torch.ones(3, 4), torch.ones(4, 3))
    with pytest.raises(ValueError, match="\\(N, M\\)"):
        kernels.kernel_stats(torch.ones(3, 4, 1), torch.ones(3, 4, 1))
    with pytest.raises(ValueError, match="one dtype"):
        kernels.kernel_stats(torch.ones(3, 4), torch.ones(3, 4, dtype=torch.float64))


# ---------------------------------------------------------------- Triton interpreter


@pytest.mark.triton_interpret
@pytest.mark.parametrize("n,m", [(1, 1), (7, 33), (40, 17), (24, 24)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_reference(n, m, dtype):
    k0, k1 = pair(n, m, dtype=dtype)
    expected = reference.kernel_stats(k0, k1)
    actual = importlib.import_module("rdiag.kernels.triton_kernel_stats").kernel_stats(
        k0, k1
    )
    for field in ("row0", "row1", "col0", "col1"):
        assert getattr(actual, field).dtype == torch.float32
        assert_kernel_close(
            field, getattr(expected, field), getattr(actual, field), dtype
        )
    for field in ("inner", "sq_norm0", "sq_norm1", "sq_diff", "sum0", "sum1"):
        e, a = as64(getattr(expected, field)), as64(getattr(actual, field))
        assert_close(
            field, e, a, rtol=1e-5, atol=1e-6 * float(expected.sq_norm0) ** 0.5
        )


@pytest.mark.triton_interpret
def test_autotuning_leaves_no_stale_column_partials():
    import triton

    module = importlib.import_module("rdiag.kernels.triton_kernel_stats")
    configs = [triton.Config({"BLOCK_N": 8, "BLOCK_M": 16})]
    configs.append(triton.Config({"BLOCK_N": 16, "BLOCK_M": 32}))
    k0, k1 = pair(40, 30, dtype=torch.float32)
    with autotuning(module._kernel_stats_kernel, configs):
        actual = module.kernel_stats(k0, k1)
    assert module._kernel_stats_kernel.best_config.kwargs["BLOCK_N"] == 16
    assert_stats("autotuned", direct(k0, k1), actual, rtol=1e-5, atol=1e-4)


@pytest.mark.triton_interpret
def test_kernel_on_strided_kernels_via_dispatch():
    k0, k1 = pair(20, 18, dtype=torch.float32)
    k0t = k0.T.contiguous().T
    assert_stats(
        "strided",
        direct(k0, k1),
        kernels.kernel_stats(k0t, k1[:, :]),
        rtol=1e-5,
        atol=1e-4,
    )


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernel_large(dtype):
    k0, k1 = (k.cuda() for k in pair(1500, 1100, dtype=dtype))
    stats = kernels.kernel_stats(k0, k1)
    assert_stats(f"cuda {dtype}", direct(k0, k1), stats, rtol=1e-4, atol=1e-2)
