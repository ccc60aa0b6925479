"""Model-level curvature (rdiag.curvature) against dense float64 eigendecompositions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rdiag.curvature import (
    ggn_eigenvalues_from_ntk,
    ggn_sharpness_from_ntk,
    hessian_density,
    hessian_trace,
    multiplier_diagonal,
    sharpness,
    top_eigenvalues,
)
from rdiag.functional import functionalize
from tests import oracles
from tests._assert import assert_close
from tests.test_operators_ggn import ggn_case
from tests.test_operators_hessian import CASES, case_and_hessian, make_case

F64 = torch.float64


# Batch norm (eval mode) is covered by the operator tests; kept out here for time.
@pytest.mark.parametrize("arch,loss", [c for c in CASES if c[0] != "batchnorm"])
def test_top5_and_most_negative_match_dense(arch: str, loss: str) -> None:
    net, x, y, loss_fn, _, dense = case_and_hessian(arch, loss)
    exact = oracles.dense_eigh(dense)[0]
    top = top_eigenvalues(net, loss_fn, (x, y), 5, dtype=F64, tol=1e-8)
    low = top_eigenvalues(
        net, loss_fn, (x, y), 1, which="smallest", dtype=F64, tol=1e-8
    )
    assert top.converged and low.converged
    assert_close(
        f"top-5 {arch} {loss}", exact[:5], top.eigenvalues, rtol=1e-8, atol=1e-10
    )
    assert_close(
        f"min {arch} {loss}", exact[-1:], low.eigenvalues, rtol=1e-8, atol=1e-10
    )


def test_sharpness_is_the_largest_algebraic_eigenvalue() -> None:
    # Large targets make the residual term dominate: a strongly indefinite Hessian
    # whose most negative eigenvalue is the largest in magnitude.
    net, x, y, loss_fn, _, dense = case_and_hessian("embedding", "mse", scale=10.0)
    exact = oracles.dense_eigh(dense)[0]
    assert -exact[-1] > exact[0] > 0
    assert abs(sharpness(net, loss_fn, (x, y), dtype=F64, tol=1e-10) - exact[0]) < 1e-8


def test_power_method_gives_lambda_max() -> None:
    net, x, y, loss_fn, _, dense = case_and_hessian("mlp_tanh", "ce")
    exact = oracles.dense_eigh(dense)[0]
    power = top_eigenvalues(net, loss_fn, (x, y), method="power", dtype=F64, tol=1e-7)
    assert power.converged
    assert_close("power", exact[:1], power.eigenvalues, rtol=1e-8, atol=0)


def _adam_after_one_step(net, loss_fn, x, y) -> torch.optim.Adam:
    opt = torch.optim.Adam(net.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-3)
    loss_fn(net(x.double()), y.double() if y.is_floating_point() else y).backward()
    opt.step()
    opt.zero_grad()
    return opt


@pytest.mark.parametrize("kind", ["per-layer", "flat", "adam"])
def test_preconditioned_sharpness_matches_dense(kind: str) -> None:
    net, x, y, loss_fn, names = make_case("mlp_tanh", "ce")
    net.double()
    fm = functionalize(net)
    if kind == "per-layer":
        pre = {"0": 4.0, "4.weight": 0.25}
        diag = torch.cat(
            [
                torch.full(
                    (fm.sizes[n],), {"0": 4.0, "4": 0.25}.get(n[0], 1.0), dtype=F64
                )
                if n != "4.bias"
                else torch.ones(3, dtype=F64)
                for n in names
            ]
        )
    elif kind == "flat":
        diag = torch.rand(
            fm.num_params, generator=torch.Generator().manual_seed(0), dtype=F64
        )
        pre = diag
    else:
        pre = _adam_after_one_step(net, loss_fn, x, y)
        st = [pre.state[p] for p in net.parameters()]
        diag = torch.cat(
            [
                (0.01 / ((s["exp_avg_sq"] / (1 - 0.99)).sqrt() + 1e-3)).reshape(-1)
                for s in st
            ]
        )
    assert_close(f"M {kind}", diag, multiplier_diagonal(fm, pre), rtol=1e-12, atol=0)
    dense = oracles.dense_hessian(net, names, loss_fn, x, y)
    root = diag.sqrt()
    exact = oracles.dense_eigh(root[:, None] * dense * root[None])[0]
    got = sharpness(net, loss_fn, (x, y), lr_multipliers=pre, dtype=F64, tol=1e-10)
    assert abs(got - float(exact[0])) <= 1e-9 * abs(float(exact[0]))


def test_warm_start_after_an_sgd_step_needs_fewer_matvecs() -> None:
    net, x, y, loss_fn, _ = make_case("cnn", "ce", n=16)
    net.double()
    opts = {"dtype": F64, "tol": 1e-6, "criterion": "eigenvalue"}
    before = top_eigenvalues(net, loss_fn, (x, y), **opts)
    loss_fn(net(x.double()), y).backward()
    with torch.no_grad():
        for p in net.parameters():
            p -= 0.05 * p.grad
    exact = top_eigenvalues(net, loss_fn, (x, y), dtype=F64, tol=1e-12).eigenvalues
    cold = top_eigenvalues(net, loss_fn, (x, y), seed=1, **opts)
    warm = top_eigenvalues(net, loss_fn, (x, y), warm_start=before, **opts)
    assert cold.converged and warm.converged
    for res in (cold, warm):
        assert_close("lambda_max", exact, res.eigenvalues, rtol=1e-6, atol=0)
    # The eigenvalue criterion trusts a gap only once the nearest other Ritz value
    # has converged too (issue #21), which a warm start must build first: 7
    # products against 12 here (it was about 2x before the gap check).
    assert warm.num_matvecs < cold.num_matvecs, (
        warm.num_matvecs,
        cold.num_matvecs,
    )


@pytest.mark.parametrize(
    "arch,loss", [("mlp_tanh", "mse"), ("mlp_tanh", "ce"), ("cnn", "mse")]
)
def test_sample_space_ggn_equals_parameter_space(arch: str, loss: str) -> None:
    net, x, y, loss_fn, _, jac, _, ggn = ggn_case(arch, loss)
    n_out = jac.shape[0] * jac.shape[1]
    exact = oracles.dense_eigh(ggn)[0][:n_out]
    sample = ggn_eigenvalues_from_ntk(net, loss_fn, x, y, dtype=F64)
    assert sample.shape == (n_out,)
    assert_close(
        f"sample-space GGN {arch} {loss}", exact, sample, rtol=1e-8, atol=1e-12
    )
    lanczos_top = top_eigenvalues(
        net, loss_fn, (x, y), 3, curvature="ggn", dtype=F64, tol=1e-10
    )
    assert_close(
        "vs GGN Lanczos", lanczos_top.eigenvalues, sample[:3], rtol=1e-8, atol=1e-12
    )


def test_sample_space_with_weights_and_the_mse_convention() -> None:
    net, x, y, loss_fn, names, jac, _, _ = ggn_case("mlp_tanh", "mse")
    weights = {"0": 3.0, "2": 0.5}
    fm = functionalize(net)
    m = multiplier_diagonal(fm, weights)
    flat = jac.reshape(-1, jac.shape[-1])
    kernel = flat @ (m[:, None] * flat.T)
    n, o = jac.shape[:2]
    expected = 2 * float(oracles.dense_eigh(kernel)[0][0]) / (n * o)
    got = ggn_sharpness_from_ntk(net, loss_fn, x, y, lr_multipliers=weights, dtype=F64)
    assert abs(got - expected) <= 1e-10 * expected
    via_lanczos = sharpness(
        net,
        loss_fn,
        (x, y),
        curvature="ggn",
        lr_multipliers=weights,
        dtype=F64,
        tol=1e-10,
    )
    assert abs(via_lanczos - expected) <= 1e-8 * expected


def test_trace_and_density_of_the_hessian() -> None:
    net, x, y, loss_fn, _, dense = case_and_hessian("layernorm", "ce")
    exact, p = float(dense.trace()), dense.shape[0]
    est = hessian_trace(net, loss_fn, (x, y), num_matvecs=45, dtype=F64, seed=1)
    assert abs(est.estimate - exact) <= 4 * est.std_err
    grid, density = hessian_density(
        net, loss_fn, (x, y), num_probes=4, lanczos_steps=30, grid=3000, dtype=F64
    )
    dx = float(grid[1] - grid[0])
    assert abs(float(density.sum()) * dx - 1) < 1e-6
    hutch = hessian_trace(
        net, loss_fn, (x, y), num_matvecs=4, method="hutchinson", dtype=F64
    )
    assert abs(float((grid * density).sum()) * dx - hutch.estimate / p) < 1e-6


def test_dataloader_sharpness_equals_the_concatenated_batch() -> None:
    net, x, y, loss_fn, _ = make_case("embedding", "ce", n=9)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # 4, 4, 1
    whole = sharpness(net, loss_fn, (x, y), dtype=F64, tol=1e-10)
    split = sharpness(net, loss_fn, loader, dtype=F64, tol=1e-10)
    assert abs(whole - split) <= 1e-10 * abs(whole)


def test_bad_options_give_clear_errors() -> None:
    net, x, y, loss_fn, _ = make_case("mlp_tanh", "ce")
    with pytest.raises(ValueError, match="method='lanczos'"):
        top_eigenvalues(net, loss_fn, (x, y), 2, method="power")
    with pytest.raises(ValueError, match="curvature"):
        sharpness(net, loss_fn, (x, y), curvature="kfac")
    with pytest.raises(ValueError, match="lr_multipliers"):
        sharpness(net, loss_fn, (x, y), lr_multipliers=torch.ones(5))
    with pytest.raises(ValueError, match="optimizer step"):
        sharpness(
            net, loss_fn, (x, y), lr_multipliers=torch.optim.Adam(net.parameters())
        )
    with pytest.raises(TypeError, match="Adam-type"):
        sharpness(
            net, loss_fn, (x, y), lr_multipliers=torch.optim.SGD(net.parameters(), lr=1)
        )
    with pytest.raises(ValueError, match="num_matvecs"):
        hessian_trace(net, loss_fn, (x, y), num_matvecs=0)
    with pytest.raises(MemoryError, match="fewer products"):
        hessian_trace(net, loss_fn, (x, y), num_matvecs=10**13)
    with pytest.raises(TypeError, match="preconditioner"):
        sharpness(net, loss_fn, (x, y), preconditioner=2.0)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_precision_model_curvature_runs_in_float32(half: torch.dtype) -> None:
    """A bf16/fp16 model's sharpness equals that of its float32 copy (not 1e-4..1e-2 off)."""
    import copy

    import torch.nn.functional as F

    from rdiag.curvature import curvature_operator

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)
    ).to(half)
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    as_f32 = copy.deepcopy(net).float()  # the same (rounded) weights in float32
    expected = sharpness(as_f32, F.mse_loss, (x, y), tol=1e-7)
    got = sharpness(net, F.mse_loss, (x, y), tol=1e-7)
    assert_close(
        f"{half} sharpness",
        torch.tensor(expected),
        torch.tensor(got),
        rtol=1e-5,
        atol=0.0,
    )
    assert next(net.parameters()).dtype == half  # the model is untouched
    for kind in ("hessian", "ggn", "fisher"):
        assert curvature_operator(net, F.mse_loss, (x, y), curvature=kind).dtype == (
            torch.float32
        )
    own = curvature_operator(net, F.mse_loss, (x, y), dtype=half)
    assert own.dtype == half  # dtype= overrides the float32 default
    in_own = sharpness(net, F.mse_loss, (x, y), dtype=half, tol=1e-7)
    assert abs(in_own - expected) > 1e-5 * abs(expected)  # what the default avoids


class _Gated(nn.Module):
    """A MobileNetV3-style gate: ``h * gate(h)`` with ``gate`` Hardsigmoid or its
    written-out form ``relu6(x + 3) / 6``."""

    def __init__(self, written_out: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(4, 12), nn.Linear(12, 3)
        self.act = nn.Hardswish()
        self.gate = _Relu6Gate() if written_out else nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        return self.fc2(h * self.gate(2 * h))


class _Relu6Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x + 3) / 6


def test_hardsigmoid_curvature_falls_back_once_to_the_same_function() -> None:
    from rdiag.curvature import sharpness

    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1)) * 2
    y = torch.randn(16, 3, generator=torch.Generator().manual_seed(2))
    net = _Gated(written_out=False).double()
    oracle = _Gated(written_out=True).double()
    names = [n for n, _ in oracle.named_parameters()]
    dense = oracles.dense_hessian(oracle, names, F.mse_loss, x.double(), y.double())
    expected = float(torch.linalg.eigvalsh(dense)[-1])
    with pytest.warns(UserWarning, match=r"Hardsigmoid .* relu6\(x \+ 3\) / 6") as said:
        got = sharpness(net, F.mse_loss, (x, y), dtype=torch.float64, tol=1e-12)
    assert sum("Hardsigmoid" in str(w.message) for w in said) == 1
    assert float(got) == pytest.approx(expected, rel=1e-8)
