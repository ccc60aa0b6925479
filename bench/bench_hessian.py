"""Hessian engine benchmarks (pytest-benchmark; baselines measured in the same run).

Groups:
    ``hvp-mlp`` / ``hvp-cnn``: one Hessian-vector product (eager and
    ``torch.compile``) against one gradient of the same loss; ``extra_info``
    holds ``hvp_per_gradient`` (goal <= 3).
    ``lambda-max``: top Hessian eigenvalue of a tanh MLP 8-1024-1024-1024-10,
    N=256, MSE, float32, one SGD step after a first estimate: Lanczos (cold and
    warm-started from the estimate before the step), power iteration (cold/warm),
    PyHessian's power-iteration recipe, and scipy ``eigsh`` on ``to_scipy()``.
    ``extra_info``: products spent and the relative error against a float64
    Lanczos reference (goal: <= 1e-6).
    ``hvp-*`` also holds ``check_per_product``: the retained graph's check for
    in-place ``p.data`` edits over one product (goal <= 0.05).
    ``lambda-max-warm-vs-cold``: the same after one SGD step of rate 0.003 to
    0.3, cold and warm-started runs timed in turn (goal: warm >= 3x cheaper).

Run: ``pytest bench/bench_hessian.py --benchmark-only``.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench import baselines
from rdiag.linalg import EigResult, lanczos, power_iteration
from rdiag.operators.hessian import HessianOperator

_GRADIENT_SECONDS: dict[str, float] = {}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(8, 1024), nn.Tanh()]
    for _ in range(2):
        layers += [nn.Linear(1024, 1024), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(1024, 10))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )


@pytest.fixture(scope="module")
def problems() -> dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return {
        "mlp": (
            _mlp(),
            torch.randn(256, 8, generator=gen),
            torch.randn(256, 10, generator=gen),
        ),
        "cnn": (
            _cnn(),
            torch.randn(64, 3, 16, 16, generator=gen),
            torch.randn(64, 10, generator=gen),
        ),
    }


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_gradient(benchmark, problems, arch: str) -> None:
    net, x, y = problems[arch]
    benchmark.group = f"hvp-{arch}"
    benchmark.pedantic(
        baselines.loss_gradient, args=(net, F.mse_loss, x, y), rounds=5, warmup_rounds=1
    )
    _GRADIENT_SECONDS[arch] = benchmark.stats.stats.median


@pytest.fixture(scope="module")
def hvp_operators(
    problems,
) -> dict[tuple[str, bool], tuple[HessianOperator, torch.Tensor]]:
    """Eager and compiled operators per model, each called once (compiles)."""
    ops = {}
    for arch, (net, x, y) in problems.items():
        v = torch.randn(
            sum(p.numel() for p in net.parameters()),
            generator=torch.Generator().manual_seed(2),
        )
        for compiled in (False, True):
            op = HessianOperator(net, F.mse_loss, (x, y), compile=compiled)
            op.matvec(v)
            ops[arch, compiled] = (op, v)
    return ops


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_hvp(benchmark, hvp_operators, arch: str, compiled: bool) -> None:
    benchmark.group = f"hvp-{arch}"
    op, v = hvp_operators[arch, compiled]
    benchmark.pedantic(op.matvec, args=(v,), rounds=5, warmup_rounds=1)
    if arch in _GRADIENT_SECONDS:
        benchmark.extra_info["hvp_per_gradient"] = (
            benchmark.stats.stats.median / _GRADIENT_SECONDS[arch]
        )


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_hvp_per_gradient_interleaved(
    benchmark, problems, hvp_operators, arch: str
) -> None:
    """Gradient, eager HVP and compiled HVP timed in turn, 8 times: min-time ratios.

    Interleaving makes the ratio robust to other load on the machine; the timed
    quantity of this entry is one gradient.
    """
    net, x, y = problems[arch]
    benchmark.group = f"hvp-{arch}"
    times: dict[str, list[float]] = {"gradient": [], "eager": [], "compiled": []}
    calls = {
        "gradient": lambda: baselines.loss_gradient(net, F.mse_loss, x, y),
        "eager": lambda: hvp_operators[arch, False][0].matvec(
            hvp_operators[arch, False][1]
        ),
        "compiled": lambda: hvp_operators[arch, True][0].matvec(
            hvp_operators[arch, True][1]
        ),
    }
    for _ in range(8):
        for name, call in calls.items():
            tic = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - tic)
    benchmark.pedantic(calls["gradient"], rounds=1, iterations=1)
    for name in ("eager", "compiled"):
        benchmark.extra_info[f"{name}_hvp_per_gradient"] = min(times[name]) / min(
            times["gradient"]
        )


def _sgd_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float) -> nn.Module:
    stepped = copy.deepcopy(net)
    grads = baselines.loss_gradient(stepped, F.mse_loss, x, y)
    with torch.no_grad():
        for p, g in zip(stepped.parameters(), grads, strict=True):
            p -= lr * g
    return stepped


def _reference(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """lambda_max of the float64 Hessian, Lanczos to 1e-10."""
    op = HessianOperator(net, F.mse_loss, (x, y), dtype=torch.float64)
    return float(lanczos(op, 1, tol=1e-10, criterion="eigenvalue").eigenvalues[0])


@pytest.fixture(scope="module")
def spectrum(problems) -> dict[str, object]:
    """Operators before/after one SGD step, the estimate before, float64 references."""
    net, x, y = problems["mlp"]
    before = HessianOperator(net, F.mse_loss, (x, y))
    estimate = lanczos(before, 1, tol=1e-6, criterion="eigenvalue")
    stepped = _sgd_step(net, x, y, 0.1)
    return {
        "op": HessianOperator(stepped, F.mse_loss, (x, y)),
        "net": stepped,
        "data": (x, y),
        "estimate": estimate,
        "reference": _reference(stepped, x, y),
    }


def _record(benchmark, spectrum, value: float, products: int) -> None:
    benchmark.extra_info["matvecs"] = products
    benchmark.extra_info["relative_error"] = abs(value - spectrum["reference"]) / abs(
        spectrum["reference"]
    )


def _record_eig(benchmark, spectrum, result: EigResult) -> None:
    _record(benchmark, spectrum, float(result.eigenvalues[0]), result.num_matvecs)


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("criterion", ["eigenvalue", "residual"])
def test_lanczos(benchmark, spectrum, criterion: str, warm: bool) -> None:
    benchmark.group = "lambda-max"
    start = spectrum["estimate"] if warm else None
    result = benchmark.pedantic(
        lanczos,
        args=(spectrum["op"], 1),
        kwargs={"tol": 1e-6, "criterion": criterion, "warm_start": start, "seed": 1},
        rounds=1,
        iterations=1,
    )
    _record_eig(benchmark, spectrum, result)


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_power_iteration(benchmark, spectrum, warm: bool) -> None:
    benchmark.group = "lambda-max"
    start = spectrum["estimate"] if warm else None
    result = benchmark.pedantic(
        power_iteration,
        args=(spectrum["op"],),
        kwargs={"tol": 1e-6, "max_iter": 100, "warm_start": start, "seed": 1},
        rounds=1,
        iterations=1,
    )
    _record_eig(benchmark, spectrum, result)


def test_pyhessian_style_power(benchmark, spectrum) -> None:
    benchmark.group = "lambda-max"
    x, y = spectrum["data"]
    value, products = benchmark.pedantic(
        baselines.pyhessian_style_power,
        args=(spectrum["net"], F.mse_loss, x, y),
        rounds=1,
        iterations=1,
    )
    _record(benchmark, spectrum, value, products)


def test_scipy_eigsh(benchmark, spectrum) -> None:
    benchmark.group = "lambda-max"
    value, products = benchmark.pedantic(
        baselines.scipy_eigsh_top,
        args=(spectrum["op"],),
        kwargs={"tol": 1e-6},
        rounds=1,
        iterations=1,
    )
    _record(benchmark, spectrum, value, products)


@pytest.mark.parametrize("lr", [0.003, 0.03, 0.1, 0.3])
def test_warm_over_cold_by_step_size(benchmark, problems, spectrum, lr: float) -> None:
    """Cold and warm Lanczos after one SGD step of rate ``lr``, timed in turn.

    ``lr * lambda_max`` runs from 0.007 to 0.66 (edge of stability: 2). The timed
    quantity is the whole interleaved loop (cold, warm, cold, warm);
    ``extra_info`` holds both product counts, both times (fastest of 2) and both
    relative errors.
    """
    benchmark.group = "lambda-max-warm-vs-cold"
    net, x, y = problems["mlp"]
    stepped = _sgd_step(net, x, y, lr)
    reference = _reference(stepped, x, y)
    op = HessianOperator(stepped, F.mse_loss, (x, y))
    runs = {"cold": None, "warm": spectrum["estimate"]}
    seconds: dict[str, float] = {}
    results: dict[str, EigResult] = {}

    def interleaved() -> None:
        for _ in range(2):
            for name, start in runs.items():
                tic = time.perf_counter()
                results[name] = lanczos(
                    op, 1, tol=1e-6, criterion="eigenvalue", warm_start=start, seed=1
                )
                elapsed = time.perf_counter() - tic
                seconds[name] = min(seconds.get(name, elapsed), elapsed)

    benchmark.pedantic(interleaved, rounds=1, iterations=1)
    for name, result in results.items():
        benchmark.extra_info[f"{name}_matvecs"] = result.num_matvecs
        benchmark.extra_info[f"{name}_seconds"] = seconds[name]
        benchmark.extra_info[f"{name}_relative_error"] = (
            abs(float(result.eigenvalues[0]) - reference) / reference
        )
    benchmark.extra_info["cold_over_warm_time"] = seconds["cold"] / seconds["warm"]


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_edit_check_per_product(benchmark, hvp_operators, arch: str) -> None:
    """The retained graph's check for ``p.data`` edits (storage, versions, one
    checksum) against one eager product, timed in turn 8 times: min-time ratio
    in ``extra_info["check_per_product"]`` (goal <= 0.05)."""
    op, v = hvp_operators[arch, False]
    benchmark.group = f"hvp-{arch}"
    times: dict[str, list[float]] = {"check": [], "product": []}
    calls = {"check": op._param_state, "product": lambda: op.matvec(v)}
    for _ in range(8):
        for name, call in calls.items():
            tic = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - tic)
    benchmark.pedantic(op._param_state, rounds=5, warmup_rounds=1)
    benchmark.extra_info["check_per_product"] = min(times["check"]) / min(
        times["product"]
    )
