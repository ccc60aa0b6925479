"""Distributed: data-parallel lambda_max on gloo ranks, and sweep throughput on Ray.

Groups:

* ``lambda_max ranks``: the top Hessian eigenvalue of a tanh MLP (16 -> 512 -> 512
  -> 1) over a dataset of 2048 samples in batches of 256, Lanczos to 1e-6, on one
  gloo rank (baseline) and on two, each with its half of the batches and one torch
  thread. The solve is timed inside the ranks (between barriers, after one warm-up
  product), so process start-up is left out; it is in ``extra_info`` as
  ``solve_seconds``, with the products and the eigenvalue (equal on both).
* ``sweep throughput``: 8 runs of a small sweep on the process pool with 2 workers
  (baseline) and on a local Ray cluster with 2 CPUs (started before timing, one
  task per run, records through the writer actor).

Run: ``pytest bench/bench_distributed.py --benchmark-only``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from rdiag.runs.sweep import sweep
from rdiag.linalg.lanczos import lanczos
from rdiag.models import make_model
from rdiag.operators.hessian import HessianOperator
from tests.ranks import run_ranks

N, BATCH = 2048, 256
SWEEP = {
    "base": {
        "width": 64,
        "depth": 3,
        "steps": 30,
        "every": 10,
        "optimizer": "gd",
        "data_options": {"n_train": 128, "n_test": 32, "dim": 8},
        "probe_size": 16,
        "metrics": ["ntk", "representations", "sharpness", "loss"],
    },
    "grid": {"width": [32, 64], "seed": [0, 1, 2, 3]},
    "report": False,
}


def _solve(rank: int, world: int, out: str) -> None:
    model = make_model("mlp", 512, parametrization="mup", seed=0, d_in=16, d_out=1)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 16, generator=gen), torch.randn(N, 1, generator=gen)
    batches = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, N, BATCH)]
    mine = batches[rank::world]
    group = dist.group.WORLD
    op = HessianOperator(model, F.mse_loss, mine, process_group=group)
    op.matvec(torch.ones(op.shape[0]))  # warm-up: first-call costs out of the timing
    dist.barrier()
    tic = time.perf_counter()
    res = lanczos(op, k=1, tol=1e-6)
    dist.barrier()
    seconds = time.perf_counter() - tic
    if rank == 0:
        torch.save(
            {
                "seconds": seconds,
                "matvecs": res.num_matvecs,
                "eigenvalue": float(res.eigenvalues[0]),
            },
            Path(out) / "result.pt",
        )


@pytest.mark.parametrize("ranks", [1, 2])
def test_lambda_max_ranks(benchmark, tmp_path_factory, ranks: int) -> None:
    benchmark.group = (
        f"lambda_max ranks: tanh MLP 16-512-512-1, N={N} in batches of {BATCH}"
    )
    folder = tmp_path_factory.mktemp(f"ranks{ranks}")

    def run() -> dict:
        run_ranks(_solve, ranks, folder / str(time.monotonic_ns()), str(folder))
        return torch.load(folder / "result.pt")

    result = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(
        solve_seconds=result["seconds"],
        matvecs=result["matvecs"],
        eigenvalue=result["eigenvalue"],
    )


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("executor", ["process", "ray"])
def test_sweep_throughput(benchmark, tmp_path_factory, request, executor: str) -> None:
    benchmark.group = "sweep throughput: 8 runs, 2 workers / 2 Ray CPUs"
    if executor == "ray":
        request.getfixturevalue("local_ray")

    def run() -> None:
        out = tmp_path_factory.mktemp(executor)
        result = sweep(SWEEP, out=out, workers=2, executor=executor)
        assert result.count("finished") == 8

    benchmark.pedantic(run, rounds=2, iterations=1)
