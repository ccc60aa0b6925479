"""Sweeps on a local Ray cluster (2 CPUs): equal to a process-pool sweep record for
record, a task killed mid-run is retried without duplicates, resources per run,
finished runs skipped; the one-writer proxy without Ray."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rdiag.runs.config import config_id, expand_grid
from rdiag.runs.store import Store, StoreError
from rdiag.runs.sweep import sweep
from rdiag.runs.training import train
from rdiag.runs.writer import RemoteStore, StoreWriter, this_process
from tests.test_faults import BASE, _records, _same

ray = pytest.importorskip("ray")
from rdiag.runs.ray_executor import RayExecutor, check_address  # noqa: E402

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
    victim = config_id(expand_grid(CONFIG)[3])
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


def _cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "rdiag.cli", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_an_address_that_does_not_answer_fails_within_30_s_naming_it(tmp_path) -> None:
    tic = time.monotonic()
    done = _cli(
        "sweep",
        "--config",
        "default",
        "--executor",
        "ray",
        "--address",
        "127.0.0.1:1",
        "--out",
        str(tmp_path),
        timeout=60,
    )
    assert time.monotonic() - tic < 30
    assert done.returncode == 2 and "127.0.0.1:1 does not answer" in done.stderr
    with pytest.raises(ValueError, match="HOST:PORT"):
        check_address("nohost")


def test_a_writer_refuses_writes_once_its_sweep_is_gone(tmp_path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = (dead.pid, socket.gethostname(), "1")
    writer = StoreWriter(str(tmp_path), owner=owner)
    with pytest.raises(StoreError, match=f"pid {dead.pid} .* is gone"):
        writer.call("create_run", ({"a": 1},), {})
    assert not Store(tmp_path).run_ids()
    alive = StoreWriter(str(tmp_path), owner=this_process())
    assert alive.call("create_run", ({"a": 1},), {}) in Store(tmp_path).run_ids()


_RAY_SWEEP = """
import json, sys
from rdiag.runs.sweep import sweep
if __name__ == "__main__":
    sweep(json.loads(sys.argv[1]), out=sys.argv[2], executor="ray")
"""


def _ray_sweep_at(tmp_path: Path, rows: int, **popen: object) -> subprocess.Popen:
    """A sweep process that starts Ray itself, once ``rows`` records are stored."""
    from tests.test_faults import _rows

    out = tmp_path / "store"
    config = {**CONFIG, "grid": {"width": [8, 12], "seed": list(range(40))}}
    script = tmp_path / "sweep.py"
    script.write_text(_RAY_SWEEP)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(script), json.dumps(config), str(out)],
        cwd=ROOT, env=env, **popen,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while _rows(out) < rows:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the sweep ended or stalled before the fault was injected")
        time.sleep(0.05)
    return proc


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")
def test_a_killed_driver_writes_nothing_after_and_its_ray_processes_end(
    tmp_path,
) -> None:
    """kill -9 of a sweep that started Ray itself: no row after, no Ray process
    it started alive 10 s later."""
    from tests.test_faults import _descendants, _rows, _wait_gone

    out = tmp_path / "store"
    proc = _ray_sweep_at(tmp_path, 60)
    children: list[int] = []
    try:
        children = _descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        rows = _rows(out)
        alive = _wait_gone(children, 10.0)
        assert not alive, f"Ray processes {alive} outlived the killed driver"
        time.sleep(1.0)
        assert _rows(out) == rows, "rows were written after the driver died"
    finally:
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")
def test_sigterm_ends_a_ray_sweep_with_143_and_no_stack_dump(tmp_path) -> None:
    proc = _ray_sweep_at(tmp_path, 20, stderr=subprocess.PIPE, text=True)
    try:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == 143, stderr[-2000:]
    assert "SIGTERM received" not in stderr and "Stack trace" not in stderr
