"""Cost of a coordinate check across 6 widths, against bare training in the same run.

Model: tanh MLP 8 -> n -> n -> 4 (float32), n in {32, ..., 1024}, 2 seeds, 10
full-batch SGD steps on 16 points, muP. Providers:

* ``train-only``: the same training in plain torch (``bench.baselines``), nothing
  measured: the floor;
* ``mup-style``: plus every layer's mean ``|h|`` at every step through hooks (the
  mup package's check);
* ``rdiag-norms``: :func:`rdiag.coord_check.coord_check` without the kernel and
  linearization metrics (``ntk=False, linearization=False``);
* ``rdiag-full``: every metric (two learning-rate-weighted eNTKs and a jvp per run).

The fitted exponents of the full run go into ``extra_info`` of its record.
Run: ``pytest bench/bench_coord_check.py --benchmark-only``.
"""

from __future__ import annotations

import pytest
import torch

from bench.baselines import plain_width_sweep
from rdiag.coord_check import coord_check

WIDTHS = [32, 64, 128, 256, 512, 1024]
SEEDS, STEPS, LR = 2, 10, 0.2


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)


#: The MLP 8 -> n -> n -> 4 (also bench_meter.py's).
FAMILY = {"d_in": 8, "d_out": 4, "depth": 3}


def mlp_coord_check(data, widths, seeds: int, steps: int, lr: float, full: bool):
    """The muP MLP's coordinate check (``full``: with the kernel metrics)."""
    return coord_check(
        "mlp",
        "mup",
        widths,
        steps=steps,
        seeds=seeds,
        lr=lr,
        data=data,
        family_kwargs=FAMILY,
        ntk=full,
        linearization=full,
    )


def _rdiag(data, full: bool):
    return mlp_coord_check(data, WIDTHS, SEEDS, STEPS, LR, full)


@pytest.mark.parametrize(
    "provider", ["train-only", "mup-style", "rdiag-norms", "rdiag-full"]
)
def test_coord_check_cost(benchmark, data, provider: str) -> None:
    benchmark.group = "coord_check mlp, 6 widths x 2 seeds x 10 steps"
    x, y = data
    if provider in ("train-only", "mup-style"):
        record = provider == "mup-style"
        benchmark.pedantic(
            plain_width_sweep,
            args=(WIDTHS, SEEDS, STEPS, LR, x, y, record),
            rounds=5,
            iterations=1,
            warmup_rounds=1,
        )
        return
    result = benchmark.pedantic(
        _rdiag,
        args=(data, provider == "rdiag-full"),
        rounds=5,
        iterations=1,
        warmup_rounds=1,
    )
    benchmark.extra_info["fits"] = [
        {k: f[k] for k in ("metric", "layer", "slope", "ci", "predicted")}
        for f in result.fits
    ]
