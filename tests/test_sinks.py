"""Sinks: the Monitor's records reach TensorBoard, CSV, W&B (offline) and MLflow."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F

from rdiag.monitor import Monitor
from rdiag.sinks import CSVSink, Sink, TensorBoardSink, as_sinks


def _net_and_probe():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)
    )
    return net, (torch.randn(6, 3), torch.randn(6, 2))


def _train_with(sinks: list, steps: int = 3) -> Monitor:
    net, (x, y) = _net_and_probe()
    mon = Monitor(net, (x, y), every=2, loss_fn=F.mse_loss, sinks=sinks)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(steps):
        mon.step(step)
        opt.zero_grad()
        F.mse_loss(net(x), y).backward()
        opt.step()
    mon.close()
    return mon


def test_tensorboard_event_file_reads_back_the_records(tmp_path) -> None:
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    mon = _train_with([TensorBoardSink(tmp_path / "tb")])
    events = accumulator.EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert tags == set(mon.history[-1]) - {"step"}
    for check in mon.history:
        for name in ("ntk/rel_change", "delta_h/0", "sharpness/precond", "loss"):
            (event,) = [e for e in events.Scalars(name) if e.step == check["step"]]
            assert event.value == pytest.approx(check[name], rel=1e-6, abs=1e-12)


def test_csv_and_callable_sinks_get_every_record(tmp_path) -> None:
    seen: list[tuple[str, float, int]] = []
    path = tmp_path / "out" / "records.csv"
    mon = _train_with(
        [CSVSink(path), lambda name, value, step: seen.append((name, value, step))]
    )
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["run", "step", "name", "value"]
    expected = [
        (name, value, check["step"])
        for check in mon.history
        for name, value in check.items()
        if name != "step"
    ]
    assert seen == expected
    assert [(n, float(v), int(s)) for _, s, n, v in rows[1:]] == expected
    assert len({run for run, *_ in rows[1:]}) == 1


def test_csv_rows_of_two_runs_in_one_file_are_told_apart(tmp_path) -> None:
    path = tmp_path / "records.csv"
    first, second = _train_with([CSVSink(path)]), _train_with([CSVSink(path, run=7)])
    third = CSVSink(path)  # default labels differ per sink
    assert third.run != CSVSink(path).run
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    runs = list(dict.fromkeys(r["run"] for r in rows))
    assert len(runs) == 2 and runs[1] == "7"
    for run, mon in zip(runs, (first, second)):
        mine = [(int(r["step"]), r["name"]) for r in rows if r["run"] == run]
        assert mine == [(c["step"], n) for c in mon.history for n in c if n != "step"]


def test_csv_file_of_the_old_format_is_refused_before_appending(tmp_path) -> None:
    path = tmp_path / "old.csv"
    path.write_text("step,name,value\n0,loss,1.0\n")
    with pytest.raises(ValueError, match="header run,step,name,value"):
        CSVSink(path)
    assert path.read_text() == "step,name,value\n0,loss,1.0\n"


def test_wandb_offline_run_holds_the_records(tmp_path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    from rdiag.sinks import WandbSink

    monkeypatch.setenv("WANDB_SILENT", "true")
    sink = WandbSink(mode="offline", dir=str(tmp_path), project="rdiag-test")
    net, (x, y) = _net_and_probe()
    mon = Monitor(net, (x, y), loss_fn=F.mse_loss, sinks=[sink])
    rec = mon.step(0)
    assert sink.run.summary["ntk/rel_change"] == rec["ntk/rel_change"]
    assert sink.run.summary["monitor/step"] == 0
    mon.close()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


def test_mlflow_file_store_holds_the_metric_history(tmp_path, monkeypatch) -> None:
    pytest.importorskip("mlflow")
    from rdiag.sinks import MLflowSink

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    sink = MLflowSink(tracking_uri=(tmp_path / "mlruns").as_uri())
    mon = _train_with([sink])
    history = sink.client.get_metric_history(sink.run_id, "delta_h/0")
    assert [(m.step, m.value) for m in history] == [
        (c["step"], pytest.approx(c["delta_h/0"])) for c in mon.history
    ]
    assert sink.client.get_run(sink.run_id).info.status == "FINISHED"


def test_bad_sinks_say_what_is_expected(tmp_path) -> None:
    with pytest.raises(TypeError, match="list of rdiag.sinks.Sink"):
        as_sinks(CSVSink(tmp_path / "a.csv"))
    with pytest.raises(TypeError, match="callable"):
        as_sinks([42])
    with pytest.raises(ValueError, match="directory"):
        CSVSink(tmp_path)
    with pytest.raises(ValueError, match="exactly one of log_dir= and writer="):
        TensorBoardSink()
    with pytest.raises(NotImplementedError):
        Sink().log("a", 1.0, 0)
