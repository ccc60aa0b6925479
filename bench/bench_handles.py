"""Handles that own their plans: what planning costs, and what a Monitor check adds.

Two groups, ratios from one run:

* ``ntk-fn first vs later``: the first call of a fresh ``rdiag.ntk_fn`` handle
  (it plans: probe, implementation, capture sites and their autograd check)
  against later calls of a planned handle, on a ResNet-18-like CNN (11.2 M
  parameters, eval mode, float32) at N = 4 and 16. The process has run the
  model before, so PyTorch's own first-use costs are not counted; a cold process
  pays those once on top (``python -m bench.bench_handles`` prints both).
* ``monitor check vs parts``: one Monitor check (eNTK movement and the
  preconditioned sharpness, warm-started) on the 8-512-512-4 muP MLP at N = 64,
  against its parts done by hand on a handle and an operator of the same model:
  the eNTK call plus the same Lanczos solve. Interleaved after each training
  step, median over the steps.

Run: ``pytest bench/bench_handles.py --benchmark-only``.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import rdiag
from rdiag.operators.base import ScaledOperator
from bench.models import ResNet18
from rdiag.curvature import multiplier_diagonal
from rdiag.linalg import lanczos
from rdiag.operators.hessian import HessianOperator


def _resnet() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return ResNet18().eval(), torch.randn(16, 3, 16, 16)


@pytest.mark.parametrize("n", [4, 16])
@pytest.mark.parametrize("call", ["first", "later"])
def test_ntk_fn_first_vs_later(benchmark, call: str, n: int) -> None:
    model, x = _resnet()
    x = x[:n]
    rdiag.ntk_fn(model)(x)  # PyTorch's own first-use costs, outside the timing
    benchmark.group = f"ntk-fn first vs later, ResNet-18-like N={n}"
    if call == "first":
        benchmark.pedantic(
            lambda handle: handle(x),
            setup=lambda: ((rdiag.ntk_fn(model),), {}),
            rounds=3,
        )
    else:
        handle = rdiag.ntk_fn(model)
        handle(x)
        benchmark.pedantic(handle, args=(x,), rounds=3)


def _mlp_case():
    model = rdiag.make_model("mlp", 512, parametrization="mup", seed=0, d_in=8, d_out=4)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 8, generator=gen), torch.randn(64, 4, generator=gen)
    return model, x, y, rdiag.lr_multipliers(model)


def test_monitor_check_vs_its_parts(benchmark) -> None:
    model, x, y, mults = _mlp_case()
    tol = 1e-4
    mon = rdiag.Monitor(
        model,
        (x, y),
        metrics=["ntk", "sharpness_precond"],
        loss_fn=F.mse_loss,
        lr_multipliers=mults,
        sharpness_tol=tol,
    )
    kernel = rdiag.ntk_fn(model, lr_multipliers=mults)
    op = HessianOperator(model, F.mse_loss, (x, y))
    scaled = ScaledOperator(op, multiplier_diagonal(op.fm, mults))
    opt = rdiag.make_optimizer(model, None, 0.3)
    mon.step(0)
    kernel(x)
    warm = lanczos(scaled, 1, tol=tol, criterion="eigenvalue")
    checks, parts = [], []
    for step in range(1, 9):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        tic = time.perf_counter()
        mon.step(step)
        checks.append(time.perf_counter() - tic)
        tic = time.perf_counter()
        kernel(x)
        op.rebind()
        warm = lanczos(scaled, 1, tol=tol, warm_start=warm, criterion="eigenvalue")
        parts.append(time.perf_counter() - tic)
    benchmark.group = "monitor check vs parts"
    benchmark.extra_info["check_median_s"] = statistics.median(checks)
    benchmark.extra_info["parts_median_s"] = statistics.median(parts)
    benchmark.extra_info["ratio"] = statistics.median(checks) / statistics.median(parts)
    benchmark.pedantic(lambda: mon.step(100, force=True), rounds=3)


_COLD = """
import time, torch, rdiag
from bench.models import ResNet18
torch.manual_seed(0)
model, x = ResNet18().eval(), torch.randn({n}, 3, 16, 16)
handle = rdiag.ntk_fn(model)
tic = time.perf_counter(); handle(x); first = time.perf_counter() - tic
tic = time.perf_counter(); handle(x); later = time.perf_counter() - tic
print(first, later)
"""


def main() -> None:
    """First and later call of one handle in fresh processes (PyTorch cold)."""
    print("| N | first call, cold process (s) | later call (s) | ratio |")
    print("|---|---|---|---|")
    for n in (4, 16):
        out = subprocess.run(
            [sys.executable, "-c", _COLD.format(n=n)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        first, later = float(out[0]), float(out[1])
        print(f"| {n} | {first:.3f} | {later:.3f} | {first / later:.2f} |")


if __name__ == "__main__":
    main()
