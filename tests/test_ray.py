"""Sweeps on a local Ray cluster (2 CPUs): equal to a process-pool sweep record for
record, a task killed mid-run is retried without duplicates, resources per run,
finished runs skipped; the one-writer proxy without Ray."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from rdiag.runs.config import expand_grid
from rdiag.runs.sweep import sweep
from rdiag.runs.training import train
from rdiag.runs.store import Store, run_key
from rdiag.runs.writer import RemoteStore, StoreWriter
from tests.test_faults import BASE, _records, _same

ray = pytest.importorskip("ray")
from rdiag.runs.ray_executor import RayExecutor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {
    "base": {**BASE, "metrics": ["representations", "sharpness", "loss"]},
    "grid": {"width": [8, 12], "seed": [0, 1, 2]},
    "report": False,
}
RUNS = 6


@pytest.fixture(scope="module")
def cluster():
    """A fresh local Ray instance with 2 CPUs; the workers can import ``tests``."""
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pool_records(tmp_path_factory) -> dict:
    """The records of the same sweep on the process pool."""
    pytest.importorskip("pandas")
    out = tmp_path_factory.mktemp("pool")
    assert sweep(CONFIG, out=out, workers=2).count("finished") == RUNS
    return _records(out)


def test_a_ray_sweep_equals_the_process_pool_and_skips_finished_runs(
    cluster, pool_records, tmp_path
) -> None:
    result = sweep(CONFIG, out=tmp_path, executor="ray", progress=True)
    assert result.count("finished") == RUNS
    _same(pool_records, _records(tmp_path))
    again = sweep(CONFIG, out=tmp_path, executor="ray")
    assert again.count("skipped") == RUNS
    assert ray.is_initialized()  # the executor leaves a runtime it did not start


class KillingStore(RemoteStore):
    """Kills its own worker (SIGKILL) right after the victim's check at ``step``,
    once (a marker file says it happened)."""

    def __init__(self, inner: RemoteStore, victim: str, step: int, marker: str) -> None:
        super().__init__(inner.root, inner._call)
        self.victim, self.step, self.marker = victim, step, marker

    def log(self, run_id, step, records) -> None:
        self._call("log", (run_id, step, records), {})
        if (
            run_id == self.victim
            and step == self.step
            and not os.path.exists(self.marker)
        ):
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


class KillingExecutor(RayExecutor):
    def __init__(self, victim: str, marker: Path) -> None:
        super().__init__()
        self.victim, self.marker = victim, str(marker)

    def store(self, root):
        return KillingStore(super().store(root), self.victim, 10, self.marker)


def test_a_task_killed_mid_run_is_retried_and_leaves_no_duplicates(
    cluster, pool_records, tmp_path
) -> None:
    victim = run_key(expand_grid(CONFIG)[3].to_dict())
    marker = tmp_path / "killed"
    out = tmp_path / "store"
    executor = KillingExecutor(victim, marker)
    try:
        result = sweep(CONFIG, out=out, executor=executor)
    finally:
        executor.shutdown()
    assert marker.exists(), "the victim's worker was never killed"
    assert result.count("finished") == RUNS
    store = Store(out)
    assert store.status(victim) == "finished"
    rows = store.query(config=False)
    keys = list(zip(rows["run"], rows["step"], rows["metric"], rows["layer"]))
    assert len(keys) == len(set(keys))
    _same(pool_records, _records(out))


def test_runs_request_the_resources_of_their_config(cluster) -> None:
    executor = RayExecutor(num_cpus=2)
    assert executor.resources({"device": "cpu"}) == {"num_cpus": 2, "num_gpus": 0}
    assert executor.resources({"device": "cuda"}) == {"num_cpus": 2, "num_gpus": 1}
    assert RayExecutor(num_gpus=0.5).resources({"device": "cuda"})["num_gpus"] == 0.5
    with pytest.raises(ValueError, match="resources to be a mapping of cpus"):
        sweep({**CONFIG, "resources": {"cpus": 0}}, out="unused", executor="ray")


def _power(base: int, exponent: int) -> int:
    return base**exponent


def test_the_generic_submit_still_runs_calls(cluster, tmp_path) -> None:
    config = {"base": {**BASE, "steps": 2}, "grid": {"seed": [0, 1]}, "report": False}
    executor = RayExecutor()
    assert executor.submit(_power, 2, 10).result(timeout=60) == 1024
    assert sweep(config, out=tmp_path, executor=executor).count("finished") == 2


def test_the_command_line_runs_a_sweep_on_ray(cluster, tmp_path, capsys) -> None:
    from rdiag.cli import main

    yaml = pytest.importorskip("yaml")
    path = tmp_path / "sweep.yaml"
    config = {"base": {**BASE, "steps": 2}, "grid": {"seed": [0, 1]}}
    path.write_text(yaml.safe_dump(config))
    argv = ["sweep", "--config", str(path), "--executor", "ray", "--no-report"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    assert "2 runs (2 finished" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", "--config", str(path), "--address", "auto", "--out", "x"])
    assert exit_.value.code == 2
    assert "pass executor='ray' with it" in capsys.readouterr().err


def test_a_remote_store_writes_what_a_local_one_does(tmp_path) -> None:
    """The proxy without Ray: train through a writer in this process."""
    writer = StoreWriter(str(tmp_path / "remote"))
    calls = []

    def call(method, args, kwargs):
        calls.append(method)
        return writer.call(method, args, kwargs)

    config = {**BASE, "snapshots": True, "metrics": ["ntk", "loss"]}
    remote = train(config, store=RemoteStore(tmp_path / "remote", call))
    local = train(config, store=tmp_path / "local")
    assert remote.status == local.status == "finished"
    assert _records(tmp_path / "remote").keys() == _records(tmp_path / "local").keys()
    a, b = Store(tmp_path / "remote"), Store(tmp_path / "local")
    np.testing.assert_array_equal(
        a.load_array(remote.run_id, 20, "ntk"), b.load_array(local.run_id, 20, "ntk")
    )
    assert {
        "create_run",
        "claim",
        "log",
        "log_rows",
        "save_array",
        "set_status",
    } <= set(calls)
    with pytest.raises(AttributeError, match="forwards only"):
        RemoteStore(tmp_path, call).query()
    with pytest.raises(ValueError, match="expected a store method"):
        writer.call("close", (), {})
