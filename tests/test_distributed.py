"""torch.distributed on 2 gloo ranks, in float64: every product, solver and kernel of
the ranks' shards equals the single-process one on the joined data, identically on
both ranks; DDP models; ranks that differ are named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from rdiag import lanczos, ntk_fn
from rdiag.curvature import curvature_operator
from rdiag.distributed import assign_tiles
from rdiag.linalg.density import spectral_density
from rdiag.linalg.trace import hutch_plus_plus
from rdiag.operators.hessian import HessianOperator
from tests import oracles
from tests._assert import assert_close
from tests.ranks import run_ranks

WORLD = 2
KINDS = ("hessian", "ggn", "fisher")
SHARDS = (slice(0, 6), slice(6, 10))  # uneven on purpose
BATCHES = ((slice(0, 3), slice(3, 6)), (slice(6, 10),))  # a dataset per rank
SHARDS2 = (slice(0, 2), slice(2, 7))
TOL = 1e-12


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 3, generator=g), torch.randn(10, 2, generator=g)
    return x.double(), y.double(), torch.randn(7, 3, generator=g).double(), g


def _vector(p: int) -> torch.Tensor:
    return torch.randn(p, generator=torch.Generator().manual_seed(2)).double()


def _error(call) -> str:
    try:
        call()
    except ValueError as err:
        return str(err)
    return "no error"


def _on_ranks(rank: int, world: int, out: str) -> None:
    group = dist.group.WORLD
    model = _model()
    x, y, x2, _ = _data()
    mine, batch = (x[SHARDS[rank]], y[SHARDS[rank]]), SHARDS[rank]
    ops = {
        kind: curvature_operator(
            model, F.mse_loss, mine, curvature=kind, process_group=group
        )
        for kind in KINDS
    }
    v = _vector(ops["hessian"].shape[0])
    res = {f"product/{kind}": op.matvec(v) for kind, op in ops.items()}
    loader = [(x[s], y[s]) for s in BATCHES[rank]]
    res["product/dataset"] = HessianOperator(
        model, F.mse_loss, loader, process_group=group
    ).matvec(v)
    top = lanczos(ops["hessian"], k=3, tol=1e-10)
    res["eigenvalues"], res["eigenvectors"] = top.eigenvalues, top.eigenvectors
    res["matvecs"] = top.num_matvecs
    res["trace"] = hutch_plus_plus(ops["ggn"], 30, seed=0).estimate
    res["density"] = spectral_density(
        ops["hessian"], num_probes=3, lanczos_steps=8, grid=40
    ).density
    kernel = ntk_fn(model, process_group=group)
    res["ntk/traced"] = kernel(x[batch])
    res["ntk/cross"] = kernel(x[batch], x2[SHARDS2[rank]])
    res["ntk/full"] = ntk_fn(model, trace_outputs=False, process_group=group)(x[batch])
    res["ntk/layers"] = ntk_fn(model, per_layer=True, process_group=group)(x[batch])
    res["ntk/diagonal"] = ntk_fn(model, diagonal=True, process_group=group)(x[batch])
    res["ntk/one_sample_each"] = kernel(x[rank : rank + 1])  # fewer blocks than tiles

    ddp = nn.parallel.DistributedDataParallel(_model())
    res["ddp/product"] = HessianOperator(
        ddp, F.mse_loss, mine, process_group=group
    ).matvec(v)
    res["ddp/kernel"] = ntk_fn(ddp, process_group=group)(x[batch])
    res["ddp/grads_untouched"] = all(p.grad is None for p in ddp.parameters())

    other = _model()
    if rank == 1:
        with torch.no_grad():
            other[2].bias[1] += 1e-9
    res["bad/values"] = _error(
        lambda: HessianOperator(other, F.mse_loss, mine, process_group=group)
    )
    res["bad/selection"] = _error(
        lambda: HessianOperator(
            model, F.mse_loss, mine, params="2.*" if rank else None, process_group=group
        )
    )
    res["bad/solver"] = _error(lambda: lanczos(ops["hessian"], k=1, seed=rank))
    res["bad/probes"] = _error(
        lambda: ntk_fn(model, output_probes=4, process_group=group)
    )
    res["monitor/sharded"], res["monitor/sunk"], res["monitor/rows"] = _monitored(rank)
    res["monitor/rank0"], _, _ = _monitored(rank, shard_probe=False)
    torch.save(res, Path(out) / f"rank{rank}.pt")


MONITORED = ["ntk", "ntk_layers", "representations", "sharpness", "trace", "loss"]


def _probe() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 3, generator=g).double(), torch.randn(
        4, 2, generator=g
    ).double()


def _monitored(rank: int | None, shard_probe: bool = True) -> tuple[list, list, int]:
    """Three SGD steps with a Monitor: DDP on two equal shards (rank), or one process
    on the whole batch (rank None): the same parameters at every step."""
    from rdiag.monitor import Monitor

    x, y, _, _ = _data()
    model = _model()
    if rank is not None:
        model = nn.parallel.DistributedDataParallel(model)
        x, y = x[5 * rank : 5 * rank + 5], y[5 * rank : 5 * rank + 5]
    sunk: list = []
    options = {}
    if rank is not None:
        # Rank 1's budget alone would skip every later check: rank 0 decides for both.
        options = {"process_group": dist.group.WORLD, "shard_probe": shard_probe}
        options["budget_fraction"] = 1e-9 if rank == 1 else None
    monitor = Monitor(
        model,
        _probe(),
        every=1,
        metrics=MONITORED,
        loss_fn=F.mse_loss,
        sinks=[lambda name, value, step: sunk.append(name)],
        **options,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        monitor.step(step)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    op = monitor._hessian  # the probe rows this rank's curvature products take
    rows = 0 if op is None else len(op.data[0])
    return [dict(h) for h in monitor.history], sunk, rows


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the two gloo ranks computed (one spawn for the module)."""
    folder = tmp_path_factory.mktemp("gloo")
    run_ranks(_on_ranks, WORLD, folder, str(folder))
    return [
        torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)
    ]


def _close(name: str, expected, actual) -> None:
    scale = float(torch.as_tensor(expected).abs().max())
    assert_close(name, expected, actual, rtol=TOL, atol=TOL * scale)


def _same_on_both(ranks: list[dict], key: str) -> None:
    a, b = ranks[0][key], ranks[1][key]
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), key
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{key} differs between the ranks"
    else:
        assert a == b, key


@pytest.mark.slow
def test_products_equal_the_single_process_ones_on_the_joined_batch(ranks) -> None:
    x, y, _, _ = _data()
    model = _model()
    for kind in KINDS:
        op = curvature_operator(model, F.mse_loss, (x, y), curvature=kind)
        want = op.matvec(_vector(op.shape[0]))
        for r in range(WORLD):
            _close(f"{kind} rank {r}", want, ranks[r][f"product/{kind}"])
        _same_on_both(ranks, f"product/{kind}")
    names = [n for n, _ in model.named_parameters()]
    dense = oracles.dense_hessian(model, names, F.mse_loss, x, y)
    _close("Hessian oracle", dense @ _vector(len(dense)), ranks[0]["product/hessian"])
    # A dataset sharded as batches: the full-dataset operator.
    _close("dataset", ranks[0]["product/hessian"], ranks[0]["product/dataset"])
    _same_on_both(ranks, "product/dataset")


def test_lanczos_trace_and_density_run_replicated(ranks) -> None:
    x, y, _, _ = _data()
    model = _model()
    single = lanczos(HessianOperator(model, F.mse_loss, (x, y)), k=3, tol=1e-10)
    for key in ("eigenvalues", "eigenvectors", "matvecs", "trace", "density"):
        _same_on_both(ranks, key)
    assert ranks[0]["matvecs"] == single.num_matvecs
    assert_close(
        "eigenvalues",
        single.eigenvalues,
        ranks[0]["eigenvalues"],
        rtol=1e-10,
        atol=1e-12,
    )
    cosines = (single.eigenvectors * ranks[0]["eigenvectors"]).sum(0)
    assert_close("eigenvectors", torch.ones(3), cosines, rtol=0, atol=1e-8)
    names = [n for n, _ in model.named_parameters()]
    exact = torch.linalg.eigvalsh(oracles.dense_hessian(model, names, F.mse_loss, x, y))
    assert_close(
        "oracle", exact.flip(0)[:3], ranks[0]["eigenvalues"], rtol=1e-9, atol=1e-12
    )
    ggn = curvature_operator(model, F.mse_loss, (x, y), curvature="ggn")
    assert ranks[0]["trace"] == pytest.approx(
        hutch_plus_plus(ggn, 30, seed=0).estimate, rel=1e-12
    )


def test_ntk_tiles_equal_the_single_process_kernel(ranks) -> None:
    x, _, x2, _ = _data()
    model = _model()
    expected = {
        "ntk/traced": ntk_fn(model)(x),
        "ntk/cross": ntk_fn(model)(x, x2),
        "ntk/full": ntk_fn(model, trace_outputs=False)(x),
        "ntk/layers": ntk_fn(model, per_layer=True)(x),
        "ntk/diagonal": ntk_fn(model, diagonal=True)(x),
        "ntk/one_sample_each": ntk_fn(model)(x[:2]),
        "ddp/kernel": ntk_fn(model)(x),
    }
    for key, want in expected.items():
        _same_on_both(ranks, key)
        got = ranks[0][key]
        if isinstance(want, dict):
            assert got.keys() == want.keys()
            for layer in want:
                _close(f"{key} {layer}", want[layer], got[layer])
        else:
            _close(key, want, got)
    names = [n for n, _ in model.named_parameters()]
    jac = oracles.per_sample_jacobian(model, names, x)
    full = oracles.ntk_from_jacobians(jac, jac)
    _close("oracle", full.diagonal(dim1=2, dim2=3).sum(-1), ranks[0]["ntk/traced"])


def test_ddp_models_are_measured_without_ddp_all_reduce(ranks) -> None:
    _same_on_both(ranks, "ddp/product")
    _close("DDP product", ranks[0]["product/hessian"], ranks[0]["ddp/product"])
    assert ranks[0]["ddp/grads_untouched"] and ranks[1]["ddp/grads_untouched"]


@pytest.mark.slow
def test_ranks_that_differ_are_named_on_every_rank(ranks) -> None:
    for r in range(WORLD):
        assert re.search(
            r"1 that differ from rank 0's: '2.bias' on rank 1;", ranks[r]["bad/values"]
        )
        assert (
            "rank 1 with ('2.weight', (2, 8), 'torch.float64') where rank 0 has ('0.weight'"
            in ranks[r]["bad/selection"]
        )
        assert "ranks [1] differing from rank 0" in ranks[r]["bad/solver"]
        assert "output_probes=None with process_group=" in ranks[r]["bad/probes"]


def test_a_monitor_under_ddp_measures_across_ranks_or_on_rank_zero(ranks) -> None:
    from tests._assert import assert_same_records

    reference, _, _ = _monitored(None)
    assert [ranks[r]["monitor/rows"] for r in range(WORLD)] == [2, 2]  # shards of 4
    sharded = [ranks[r]["monitor/sharded"] for r in range(WORLD)]
    for history in sharded:  # rank 1's own budget was overruled by rank 0's
        assert_same_records(reference, history, rtol=1e-9, atol=1e-12)
    assert len(ranks[0]["monitor/sunk"]) > 0 and ranks[1]["monitor/sunk"] == []
    assert_same_records(reference, ranks[0]["monitor/rank0"], rtol=1e-9, atol=1e-12)
    assert ranks[1]["monitor/rank0"] == []


def test_process_group_without_torch_distributed_says_what_to_do() -> None:
    x, y, _, _ = _data()
    with pytest.raises(ValueError, match="init_process_group"):
        HessianOperator(_model(), F.mse_loss, (x, y), process_group=object())


def test_tiles_are_balanced_by_their_work() -> None:
    # 2 ranks, symmetric: two diagonal tiles (work n) against one off-diagonal (2n).
    assert assign_tiles([1.0, 2.0, 1.0], 2) == [1, 0, 1]
    owners = assign_tiles([2.0] * 6 + [1.0] * 4, 4)
    loads = [
        sum(c for c, o in zip([2.0] * 6 + [1.0] * 4, owners) if o == r)
        for r in range(4)
    ]
    assert loads == [4.0] * 4
