"""Monitor, metrics and store costs, each against a baseline measured in the same run.

Groups:

* ``monitor check``: one Monitor check (LR-weighted eNTK + movement, representations,
  weights; and with the preconditioned sharpness) on a 64-sample probe of a width-512
  muP MLP, vs ``sgd x10``: ten plain full-batch SGD steps on 256 samples (the ratio is
  how many training steps one check costs);
* ``operator norm``: ``rdiag.metrics.operator_norm`` (Lanczos on ``W^T W``) vs a full
  SVD, 1024 x 1024;
* ``store``: ``Store.log`` of 50 records x 20 steps (one transaction per step, WAL) vs
  one INSERT + commit per record (default journal).

Run: ``pytest bench/bench_harness.py --benchmark-only``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.baselines import dense_operator_norm, sgd_steps, sqlite_row_per_commit
from rdiag.metrics import operator_norm
from rdiag.models import make_model
from rdiag.monitor import Monitor
from rdiag.parametrization import lr_multipliers
from rdiag.runs.store import Store

WIDTH = 512


@pytest.fixture(scope="module")
def setup():
    model = make_model("mlp", WIDTH, parametrization="mup", seed=0, d_in=16, d_out=1)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 16, generator=gen), torch.randn(256, 1, generator=gen)
    return model, x, y


@pytest.mark.parametrize("provider", ["sgd x10", "monitor", "monitor+sharpness"])
def test_monitor_check(benchmark, setup, provider: str) -> None:
    benchmark.group = f"monitor check, muP MLP width {WIDTH}, probe 64"
    model, x, y = setup
    if provider == "sgd x10":
        benchmark.pedantic(
            sgd_steps, args=(model, x, y, 10, 1e-4), rounds=3, iterations=1
        )
        return
    metrics = ["ntk", "representations", "weights", "loss"]
    if provider == "monitor+sharpness":
        metrics.append("sharpness_precond")
    mon = Monitor(
        model,
        (x[:64], y[:64]),
        metrics=metrics,
        loss_fn=F.mse_loss,
        lr_multipliers=lr_multipliers(model),
    )
    mon.step(0)  # references at initialization
    counter = iter(range(1, 10**6))
    benchmark.pedantic(lambda: mon.step(next(counter)), rounds=3, iterations=1)


@pytest.mark.parametrize("provider", ["svd", "lanczos"])
def test_operator_norm(benchmark, provider: str) -> None:
    benchmark.group = "operator norm 1024 x 1024 (float64)"
    w = torch.randn(
        1024, 1024, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    fn = dense_operator_norm if provider == "svd" else operator_norm
    value = benchmark.pedantic(fn, args=(w,), rounds=3, iterations=1)
    assert value == pytest.approx(float(torch.linalg.matrix_norm(w, ord=2)), rel=1e-8)


@pytest.mark.parametrize("provider", ["row per commit", "rdiag store"])
def test_store_logging(benchmark, tmp_path_factory, provider: str) -> None:
    benchmark.group = "store: 20 steps x 50 scalars"
    records = {(f"m{i % 10}", f"layer{i // 10}"): float(i) for i in range(50)}

    def rdiag_store() -> None:
        store = Store(tmp_path_factory.mktemp("store"))
        rid = store.create_run({"bench": 1})
        for step in range(20):
            store.log(rid, step, records)

    def naive() -> None:
        path = tmp_path_factory.mktemp("naive") / "db.sqlite"
        rows = [
            ("run", s, m, layer, v)
            for s in range(20)
            for (m, layer), v in records.items()
        ]
        sqlite_row_per_commit(str(path), rows)

    benchmark.pedantic(
        rdiag_store if provider == "rdiag store" else naive, rounds=3, iterations=1
    )
