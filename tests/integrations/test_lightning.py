"""RdiagMonitor in real Lightning fits: equal to a direct Monitor, resume, DDP, bad input."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning.pytorch")

from rdiag.integrations.lightning import RdiagMonitor  # noqa: E402
from rdiag.monitor import Monitor  # noqa: E402
from rdiag.runs.store import Store  # noqa: E402
from tests._assert import assert_same_records  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OPTIONS = {
    "loss_fn": F.mse_loss,
    "metrics": ["ntk", "representations", "sharpness", "loss"],
}


class Regressor(L.LightningModule):
    """A small MLP trained with plain SGD on MSE."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


def _data(batch_size: int = 8):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 4, generator=g), torch.randn(24, 2, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size), (x[:6], y[:6])


def _trainer(tmp_path, max_steps: int, **kw) -> L.Trainer:
    defaults = dict(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=L.loggers.CSVLogger(tmp_path, name="logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    return L.Trainer(**{**defaults, **kw})


def _direct(steps: int, every: int) -> list[dict]:
    """The same training by hand, with a Monitor called at the same steps."""
    model = Regressor()
    loader, probe = _data()
    mon = Monitor(model, probe, every=every, **OPTIONS)
    opt = model.configure_optimizers()
    mon.step(0)
    batches = [b for _ in range(steps) for b in loader]
    for step, (x, y) in enumerate(batches[:steps], start=1):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        mon.step(step)
    return mon.history


def _same(expected: list[dict], actual: list[dict]) -> None:
    assert_same_records(expected, actual, rtol=1e-5, atol=1e-7)


def test_fit_records_equal_a_direct_monitor_and_reach_the_logger(tmp_path) -> None:
    loader, probe = _data()
    cb = RdiagMonitor(probe, every=2, budget_fraction=None, **OPTIONS)
    _trainer(tmp_path, 5, callbacks=[cb]).fit(Regressor(), loader)
    _same(_direct(5, 2), cb.history)
    assert [h["step"] for h in cb.history] == [0, 2, 4]
    assert cb.cost.checks == 3 and cb.cost.skipped == 0 and cb.cost.seconds > 0
    with open(next(tmp_path.glob("logs/*/metrics.csv")), newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("ntk/rel_change")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    assert float(rows[-1]["ntk/rel_change"]) == pytest.approx(
        cb.history[-1]["ntk/rel_change"], rel=1e-6
    )


def test_checkpoint_and_resume_measure_from_the_original_initialization(
    tmp_path,
) -> None:
    loader, probe = _data(batch_size=24)  # one batch: the same data order after resume
    full = RdiagMonitor(probe, every=1, budget_fraction=None, **OPTIONS)
    _trainer(tmp_path / "full", 6, callbacks=[full]).fit(Regressor(), loader)
    first = RdiagMonitor(probe, every=1, budget_fraction=None, **OPTIONS)
    saver = L.callbacks.ModelCheckpoint(tmp_path / "ckpt", save_top_k=-1)
    _trainer(
        tmp_path / "a", 3, callbacks=[first, saver], enable_checkpointing=True
    ).fit(Regressor(), loader)
    ckpt = tmp_path / "ckpt" / "epoch=2-step=3.ckpt"
    resumed = RdiagMonitor(probe, every=1, budget_fraction=None, **OPTIONS)
    _trainer(tmp_path / "b", 6, callbacks=[resumed]).fit(
        Regressor(seed=7), loader, ckpt_path=ckpt
    )
    assert [h["step"] for h in resumed.history] == list(range(7))
    _same(full.history, resumed.history)
    assert resumed.history[-1]["ntk/rel_change"] > 0


def test_bad_probe_names_both_shapes(tmp_path) -> None:
    loader, _ = _data()
    cb = RdiagMonitor(torch.randn(6, 5), every=2, metrics=["ntk"])
    with pytest.raises(ValueError, match=r"\(6, 5\).*training batches are \(\(8, 4\)"):
        _trainer(tmp_path, 2, callbacks=[cb]).fit(Regressor(), loader)
    targets = RdiagMonitor((torch.randn(6, 4), torch.randn(6, 3)), **OPTIONS)
    with pytest.raises(ValueError, match=r"outputs \(6, 2\) and targets \(6, 3\)"):
        _trainer(tmp_path, 2, callbacks=[targets]).fit(Regressor(), loader)


def test_setup_refuses_frozen_models_and_says_when_nothing_logs(tmp_path) -> None:
    loader, probe = _data()
    frozen = Regressor().requires_grad_(False)
    cb = RdiagMonitor(probe, metrics=["ntk"])
    with pytest.raises(ValueError, match="no trainable parameters"):
        cb.setup(SimpleNamespace(is_global_zero=True, loggers=[]), frozen, "fit")
    quiet = RdiagMonitor(probe, every=1, budget_fraction=None, metrics=["ntk"])
    with pytest.warns(UserWarning, match="no logger attached"):
        _trainer(tmp_path, 1, logger=False, callbacks=[quiet]).fit(Regressor(), loader)
    assert len(quiet.history) == 2
    with pytest.raises(TypeError, match="expected Monitor options"):
        RdiagMonitor(probe, evry=3)


def test_a_trainer_that_takes_no_step_measures_nothing_and_says_so(tmp_path) -> None:
    loader, probe = _data()
    cb = RdiagMonitor(probe, metrics=["ntk"])
    with pytest.warns(UserWarning, match="took no training step"):
        _trainer(tmp_path, 0, callbacks=[cb]).fit(Regressor(), loader)
    assert cb.history == [] and cb.cost is None


@pytest.fixture
def one_process_group():
    dist = pytest.importorskip("torch.distributed")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_sharded_parameters_raise_unless_gathered(one_process_group) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    model = Regressor()
    mesh = init_device_mesh("cpu", (1,))
    whole_params = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    for layer in (model.net[0], model.net[2]):  # DTensor shards, as FSDP2 holds them
        for name, p in list(layer.named_parameters()):
            shard = distribute_tensor(p.detach(), mesh, [Shard(0)])
            setattr(layer, name, nn.Parameter(shard))
    _, probe = _data()
    trainer = SimpleNamespace(is_global_zero=True, loggers=[])
    with pytest.raises(ValueError, match="4 sharded ones.*gather="):
        RdiagMonitor(probe, **OPTIONS).setup(trainer, model, "fit")

    @contextlib.contextmanager
    def whole(module):  # swap in whole parameters, swap the shards back after
        shards = dict(module.net.named_parameters())
        for name, value in whole_params.items():
            layer, attr = name.split(".")
            setattr(module.net[int(layer)], attr, nn.Parameter(value))
        yield
        for name, shard in shards.items():
            layer, attr = name.split(".")
            setattr(module.net[int(layer)], attr, shard)

    cb = RdiagMonitor(probe, gather=whole, **OPTIONS)
    cb.setup(trainer, model, "fit")
    cb._core.check(model, 0, main=True)
    reference = Monitor(Regressor(), probe, **OPTIONS).step(0)
    _same([{"step": 0, **reference}], cb.history)
    assert cb.monitor.budget_fraction is None  # every rank must agree on the steps


_DDP = """
import json, sys
import torch
from torch.utils.data import DataLoader, TensorDataset
import lightning.pytorch as L
from rdiag.integrations.lightning import RdiagMonitor
from rdiag.sinks import CSVSink
from rdiag.runs.store import Store
from tests.integrations.test_lightning import OPTIONS, Regressor, _data

if __name__ == "__main__":
    torch.set_num_threads(1)
    out = sys.argv[1]
    loader, probe = _data()
    store = Store(out)
    rid = store.create_run({"ddp": 2})
    cb = RdiagMonitor(
        probe, every=2, budget_fraction=None, sinks=[CSVSink(out + "/records.csv")],
        store=store, run_id=rid, **OPTIONS,
    )
    trainer = L.Trainer(
        max_steps=4, accelerator="cpu", devices=2, strategy="ddp", logger=False,
        callbacks=[cb],
        enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Regressor(), loader)
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
        json.dump({"checks": len(cb.history), "steps": trainer.global_step}, f)
"""


def test_ddp_on_two_processes_writes_records_once_and_ends(tmp_path) -> None:
    script = tmp_path / "ddp_fit.py"
    script.write_text(textwrap.dedent(_DDP))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PL_DISABLE_FORK": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher's rank 1 too
    assert proc.returncode == 0, out[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks == [{"checks": 3, "steps": 4}, {"checks": 0, "steps": 4}]
    with open(tmp_path / "records.csv", newline="") as f:
        rows = [(r["step"], r["name"]) for r in csv.DictReader(f)]
    assert len(rows) == len(set(rows)) and {s for s, _ in rows} == {"0", "2", "4"}
    store = Store(tmp_path)
    (rid,) = store.run_ids()
    assert store.count(rid) == len(rows)


def test_a_store_written_through_the_callback_is_finished_at_train_end(
    tmp_path,
) -> None:
    from rdiag.report import build_report

    loader, probe = _data()
    store = Store(tmp_path / "store")
    rid = store.create_run({"model": "regressor"})
    cb = RdiagMonitor(probe, every=2, store=store, run_id=rid, **OPTIONS)
    _trainer(tmp_path, 4, callbacks=[cb]).fit(Regressor(), loader)
    assert store.status(rid) == "finished"
    assert build_report(store, tmp_path / "report")["summary"].is_file()
