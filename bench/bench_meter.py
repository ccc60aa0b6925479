"""Cost of the richness meter on rdiag's MLP, against the coordinate check in the same run.

Issue #15 asks for the meter "under 5 minutes on the CPU for MLPs up to width
1024". Model: tanh MLP 8 -> n -> n -> 4 (float32, muP), n in {64, ..., 1024}, 4
seeds, 10 full-batch SGD steps at eta0 = 0.3 on 16 points, every metric (the
kernel ones included): the protocol of tests/test_meter.py, which recovers r
within +-0.07. Providers:

* ``coord_check``: :func:`rdiag.coord_check.coord_check` of the same family,
  widths, seeds, steps, rate and batch, every metric (the baseline: the same width
  experiment with the parametrization known; ``bench_coord_check.mlp_coord_check``);
* ``meter``: :func:`rdiag.richness_meter` with ``make_model`` and
  ``rdiag.make_optimizer``, nothing about the parametrization given.

The meter's ``r_hat``, interval and verdict go into ``extra_info``.
Run: ``pytest bench/bench_meter.py --benchmark-only``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rdiag
from bench.bench_coord_check import FAMILY, mlp_coord_check

WIDTHS = [64, 128, 256, 512, 1024]
SEEDS, STEPS, LR = 4, 10, 0.3


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)


def _meter(data):
    return rdiag.richness_meter(
        lambda n: rdiag.make_model("mlp", n, parametrization="mup", **FAMILY),
        lambda model: rdiag.make_optimizer(model, None, LR),
        data,
        F.mse_loss,
        widths=WIDTHS,
        steps=STEPS,
        seeds=SEEDS,
    )


def _coord_check(data):
    return mlp_coord_check(data, WIDTHS, SEEDS, STEPS, LR, full=True)


@pytest.mark.parametrize("provider", ["coord_check", "meter"])
def test_meter_cost(benchmark, data, provider: str) -> None:
    benchmark.group = "richness meter, mlp muP, widths 64..1024 x 4 seeds x 10 steps"
    run = _meter if provider == "meter" else _coord_check
    result = benchmark.pedantic(run, args=(data,), rounds=2, iterations=1)
    if provider == "meter":
        benchmark.extra_info.update(
            r=result.r, interval=list(result.interval), verdict=result.verdict
        )
        assert result.kind == "mup", result.report()
