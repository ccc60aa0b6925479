"""Fault injection: kill -9 and resume, orphans, disk full, read-only and concurrent
stores, damaged array files. Every comparison is record for record against an
uninterrupted run of the same sweep (timing records aside)."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from rdiag.runs.store import (
    Store,
    StoreCorruptError,
    StoreError,
    StoreFullError,
    StoreReadOnlyError,
)
from rdiag.runs.sweep import sweep
from tests._assert import TIMING

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "width": 8,
    "depth": 3,
    "steps": 20,
    "every": 5,
    "lr": 0.1,
    "optimizer": "gd",
    "data_options": {"n_train": 16, "n_test": 8, "dim": 3},
    "probe_size": 4,
    "metrics": ["representations", "loss"],
}
CONFIG = {
    "base": BASE,
    "grid": {"width": [8, 12, 16], "seed": [0, 1, 2, 3]},
    "report": False,
}
RUNS = 12
_SWEEP = """
import json, sys
import torch
from rdiag.runs.sweep import sweep
if __name__ == "__main__":
    torch.set_num_threads(1)
    result = sweep(json.loads(sys.argv[1]), out=sys.argv[2], workers=int(sys.argv[3]))
    print(json.dumps({r.run_id: r.status for r in result.results}))
"""


def _records(root: Path) -> dict[tuple, float]:
    rows = Store(root).query(config=False)
    rows = rows[~(rows["metric"].isin(TIMING) | (rows["metric"] == "cost"))]
    return {
        (r.run, r.step, r.metric, r.layer): r.value
        for r in rows.itertuples(index=False)
    }


def _same(expected: dict[tuple, float], actual: dict[tuple, float]) -> None:
    assert actual.keys() == expected.keys()
    diff = [k for k, v in expected.items() if not np.array_equal(v, actual[k], True)]
    assert not diff, f"{len(diff)} records differ, e.g. {diff[:3]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[tuple, float]:
    """The records of the uninterrupted sweep."""
    pytest.importorskip("pandas")
    out = tmp_path_factory.mktemp("reference")
    assert sweep(CONFIG, out=out).count("finished") == RUNS
    return _records(out)


def _start(out: Path, workers: int, config: dict = CONFIG) -> subprocess.Popen:
    script = out.parent / f"{out.name}_sweep.py"
    script.write_text(textwrap.dedent(_SWEEP))
    return subprocess.Popen(
        [sys.executable, str(script), json.dumps(config), str(out), str(workers)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


def _rows(out: Path) -> int:
    db = out / "rdiag.sqlite"
    if not db.exists():
        return 0
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
        try:
            return conn.execute("SELECT COUNT(*) FROM scalars").fetchone()[0]
        except sqlite3.OperationalError:  # the schema is being created
            return 0


def _wait(ready: Callable[[], bool], proc: subprocess.Popen, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while not ready():
        assert proc.poll() is None, "the sweep ended before the fault was injected"
        assert time.monotonic() < deadline, "timed out waiting for the sweep"
        time.sleep(0.005)


def _descendants(pid: int) -> list[int]:
    kids = []
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        kids += [int(k) for k in path.read_text().split()]
    return kids + [d for k in kids for d in _descendants(k)]


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")  # a zombie waits for init, it runs nothing


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    """Wait up to ``seconds`` for the processes to end; return those still running."""
    deadline = time.monotonic() + seconds
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    return [p for p in pids if not _gone(p)]


@contextlib.contextmanager
def _killed_at(proc: subprocess.Popen, out: Path, rows: int) -> Iterator[list[int]]:
    """Kill -9 the sweep once ``rows`` records are stored; yield its children's
    pids, and kill any of them still running afterwards (an orphan)."""
    children: list[int] = []
    try:
        _wait(lambda: _rows(out) >= rows, proc)
        children = _descendants(proc.pid) if Path("/proc/self/task").is_dir() else []
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    try:
        yield children
    finally:
        for pid in children:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize(("workers", "seed"), [(1, 0), (1, 1), (2, 2)])
def test_kill_9_at_a_random_point_then_resume_loses_nothing(
    tmp_path, reference, workers: int, seed: int
) -> None:
    out = tmp_path / "store"
    rows = random.Random(seed).randint(1, int(0.8 * len(reference)))
    with _killed_at(_start(out, workers), out, rows) as children:
        # A dying worker's claim still counts: resume once the workers are gone.
        assert not _wait_gone(children, 10.0)
        store = Store(out)
        done = store.run_ids("finished")
        assert len(done) < RUNS and store.count() >= rows
        resumed = sweep(CONFIG, out=out)
    assert resumed.count("skipped") == len(done)
    assert resumed.count("finished") == RUNS - len(done)
    _same(reference, _records(out))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")
def test_workers_die_with_a_killed_sweep_and_write_nothing_after(tmp_path) -> None:
    out = tmp_path / "store"
    config = {**CONFIG, "grid": {"width": [8, 12, 16], "seed": list(range(40))}}
    with _killed_at(_start(out, 2, config), out, 300) as workers:  # both training
        assert workers
        alive = _wait_gone(workers, 1.0)  # the queue holds seconds of work
        assert not alive, f"orphaned workers {alive} outlived the killed sweep"
    rows = _rows(out)
    time.sleep(0.5)
    assert _rows(out) == rows and len(Store(out).run_ids("finished")) < 120


_CHILD = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
print(child.pid, flush=True)
time.sleep(60)
"""
_GRANDCHILD = """
import os, sys, time
from rdiag.runs import executors
sys.platform = sys.argv[1]  # "darwin": the portable getppid watcher
executors._die_with_parent(os.getppid())
print("watching", flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.parametrize("platform", ["linux", "darwin"])
def test_a_worker_dies_with_its_parent(platform: str) -> None:
    if platform == "linux" and not sys.platform.startswith("linux"):
        pytest.skip("prctl(PR_SET_PDEATHSIG) is Linux only")
    parent = subprocess.Popen(
        [sys.executable, "-c", _CHILD, _GRANDCHILD, platform],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    with parent.stdout:
        try:
            worker = int(parent.stdout.readline())
            assert parent.stdout.readline() == "watching\n"
        finally:
            os.kill(parent.pid, signal.SIGKILL)
            parent.wait(30)
        deadline = time.monotonic() + 3
        while not _gone(worker) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not _gone(worker):
            os.kill(worker, signal.SIGKILL)
            pytest.fail("the worker outlived its parent")


@pytest.mark.slow
def test_two_concurrent_sweeps_never_run_the_same_run(tmp_path, reference) -> None:
    out = tmp_path / "store"
    first = _start(out, 1)
    try:
        _wait(lambda: len(Store(out).run_ids("finished")) >= 1, first)
        second = {r.run_id: r.status for r in sweep(CONFIG, out=out).results}
        stdout, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(30)
    first_statuses = json.loads(stdout)
    for rid in first_statuses:
        ran = [s[rid] for s in (first_statuses, second)].count("finished")
        assert ran == 1, (rid, first_statuses[rid], second[rid])
    statuses = list(first_statuses.values()) + list(second.values())
    assert "elsewhere" in statuses and statuses.count("finished") == RUNS
    _same(reference, _records(out))


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=True)


@pytest.fixture(params=["tmpfs", "max_page_count"])
def full_disk(request, tmp_path, monkeypatch) -> Iterator[tuple[Path, Callable, str]]:
    """A store directory whose disk fills up, a function that frees it, and how
    the error names the limit."""
    out = tmp_path / "disk"
    if request.param == "tmpfs":
        if not _tmpfs(out, "8m"):
            pytest.skip("cannot mount a tmpfs here (needs root); see max_page_count")
        Store(out)
        filler = out / "filler"
        free = os.statvfs(out).f_bavail * os.statvfs(out).f_frsize
        filler.write_bytes(b"\0" * (free - 300 * 1024))
        yield (
            out,
            filler.unlink,
            r"the disk holding the store .* is full, \d+ bytes left",
        )
        _umount(out)
        return
    Store(out)
    limit = _pages(out) + 12
    connect = Store._connection

    def limited(self):
        conn = connect(self)
        conn.execute(f"PRAGMA max_page_count = {limit}")
        return conn

    monkeypatch.setattr(Store, "_connection", limited)
    yield out, monkeypatch.undo, rf"max_page_count \({limit} pages"


def _pages(out: Path) -> int:
    with contextlib.closing(sqlite3.connect(out / "rdiag.sqlite")) as conn:
        return conn.execute("PRAGMA page_count").fetchone()[0]


def test_disk_full_stops_the_sweep_keeps_every_record_and_resumes(
    full_disk, reference
) -> None:
    out, free_space, limit = full_disk  # the message names the limit (issue #21)
    with pytest.raises(StoreFullError, match=f"{limit}.*rerun the same command"):
        sweep(CONFIG, out=out)
    kept = _records(out)
    assert kept and all(np.array_equal(reference[k], v, True) for k, v in kept.items())
    free_space()
    assert sweep(CONFIG, out=out).count("failed") == 0
    _same(reference, _records(out))


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[None]:
    """Make a store read-only: file modes, or (for root) a read-only remount."""
    if os.geteuid() != 0:
        files = [path, *path.rglob("*")]
        modes = {p: p.stat().st_mode for p in files}
        for p in files:
            p.chmod(modes[p] & ~0o222)
        try:
            yield
        finally:
            for p in files:
                p.chmod(modes[p])
        return
    gc.collect()  # close the connections of dropped Store objects (open for writing)
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(path)], check=True)


def test_a_read_only_store_is_read_and_refuses_writes(tmp_path, reference) -> None:
    out = tmp_path / "ro"
    if os.geteuid() == 0 and not _tmpfs(out, "8m"):
        pytest.skip("root ignores file modes, and no tmpfs can be mounted here")
    try:
        sweep(CONFIG, out=out)
        with _read_only(out):
            _same(reference, _records(out))
            with pytest.raises(StoreReadOnlyError, match="cannot be written"):
                sweep({**CONFIG, "grid": {"seed": [9]}}, out=out)
            with pytest.raises(StoreReadOnlyError, match="cannot be written"):
                Store(out).set_status(Store(out).run_ids()[0], "failed")
            # Nothing left to run: a finished read-only store resumes (issue #21).
            assert sweep({**CONFIG, "report": False}, out=out).count("skipped") == RUNS
        _same(reference, _records(out))
        assert len(Store(out).run_ids("finished")) == RUNS
    finally:
        if os.geteuid() == 0:
            _umount(out)


def test_damaged_or_missing_array_files_are_named_and_left_alone(tmp_path) -> None:
    config = {
        **CONFIG,
        "base": {**BASE, "steps": 4, "every": 2, "metrics": ["ntk", "loss"]},
        "grid": {"seed": [0, 1]},
    }
    config["base"]["snapshots"] = True
    out = tmp_path / "store"
    sweep(config, out=out)
    store = Store(out)
    rid, other = store.run_ids()
    damaged = out / "arrays" / rid / "ntk-2.npy"
    damaged.write_bytes(damaged.read_bytes()[:-8])
    (out / "arrays" / rid / "ntk-4.npy").unlink()
    with pytest.raises(StoreCorruptError, match="ntk-2.npy fails its checksum"):
        store.load_array(rid, 2, "ntk")
    with pytest.raises(StoreCorruptError, match="ntk-4.npy.* is missing"):
        store.load_array(rid, 4, "ntk")
    assert store.load_array(rid, 0, "ntk").shape == (4, 4)
    for step in (0, 2, 4):
        assert np.isfinite(store.load_array(other, step, "ntk")).all()
    before = damaged.read_bytes()
    assert sweep(config, out=out).count("skipped") == 2  # resuming reads no array
    assert damaged.read_bytes() == before


# ---- round three (issue #21) ------------------------------------------------------
SNAPSHOT_CONFIG = {
    **CONFIG,
    "base": {
        **BASE,
        "steps": 4,
        "every": 2,
        "metrics": ["ntk", "sharpness", "loss"],
        "snapshots": True,
    },
    "grid": {"seed": [0, 1]},
}


def test_unwritable_arrays_fail_the_run_keep_its_records_and_rerun(tmp_path) -> None:
    """A run whose snapshots the store refuses is failed (not finished), keeps what
    was written, stops the sweep (an error: exit status 2 from the CLI), and a
    rerun with a writable store redoes it."""
    out = tmp_path / "store"
    out.mkdir()
    (out / "arrays").write_text("not a directory")
    with pytest.raises(StoreError):
        sweep(SNAPSHOT_CONFIG, out=out)
    store = Store(out)
    (rid,) = store.run_ids("failed")  # the first run stopped the sweep
    assert not store.run_ids("finished")
    assert store.status(rid) == "failed" and "arrays" in store.reason(rid)
    assert store.count(rid) > 0 and not store.missing(rid)
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "rdiag.cli",
            "sweep",
            "--out",
            str(out),
            "--config",
            str(_yaml(tmp_path, SNAPSHOT_CONFIG)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode != 0 and "arrays" in cli.stderr
    (out / "arrays").unlink()
    rerun = sweep(SNAPSHOT_CONFIG, out=out)
    assert rerun.count("finished") == 2
    for run in Store(out).run_ids():
        assert Store(out).array_steps(run, "sharpness") == [0, 2, 4]


def _yaml(tmp_path: Path, config: dict) -> Path:
    import yaml

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _claimed_by(out: Path, rid: str, other_than: int | None = None) -> int | None:
    db = out / "rdiag.sqlite"
    if not db.exists():
        return None
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
        try:
            row = conn.execute(
                "SELECT pid FROM claims WHERE run = ?", (rid,)
            ).fetchone()
        except sqlite3.OperationalError:
            return None
    return None if row is None or row[0] == other_than else row[0]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("kills", [1, 2])
def test_a_killed_pool_worker_costs_only_its_run_retried_once(
    tmp_path, reference, kills: int
) -> None:
    """kill -9 of the worker holding a run: the others go on; the run is retried
    once (then finished, exit 0), and at a second death it alone is lost (exit 1)."""
    from rdiag.runs.config import config_id, expand_grid

    out = tmp_path / "store"
    victim = config_id(expand_grid(CONFIG)[4])
    config = tmp_path / "sweep.yaml"
    config.write_text(json.dumps(CONFIG))  # JSON is YAML
    proc = subprocess.Popen(
        [sys.executable, "-m", "rdiag.cli", "sweep", "--config", str(config),
         "--workers", "2", "--no-report", "--out", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    pid = None
    for _ in range(kills):
        _wait(lambda: _claimed_by(out, victim, pid) is not None, proc)
        pid = _claimed_by(out, victim, pid)
        os.kill(pid, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    store = Store(out)
    if kills == 1:
        assert proc.returncode == 0, stderr
        assert len(store.run_ids("finished")) == RUNS
        _same(reference, _records(out))
    else:
        assert proc.returncode == 1, stderr
        assert store.run_ids("failed") == [victim]
        assert "died twice" in store.reason(victim) and victim in stdout
        assert len(store.run_ids("finished")) == RUNS - 1


def test_bad_solver_and_monitor_arguments_are_named() -> None:
    """Integer, non-symmetric or non-tensor matrices; a Lanczos basis over the
    memory budget (before allocating); non-finite products; a step that is not
    an int."""
    import torch
    import torch.nn.functional as F

    from rdiag.linalg.lanczos import lanczos
    from rdiag.monitor import Monitor
    from rdiag.operators.base import DenseOperator, LinearOperator

    with pytest.raises(ValueError, match="floating-point matrix, got torch.int64"):
        DenseOperator(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="symmetric matrix"):
        DenseOperator(torch.arange(9.0).reshape(3, 3))
    with pytest.raises(TypeError, match="torch.Tensor, got list"):
        DenseOperator([[1.0]])

    class Huge(LinearOperator):
        shape, dtype, device = (10**9, 10**9), torch.float32, torch.device("cpu")

        def _matmat(self, matrix):  # pragma: no cover - never reached
            raise AssertionError("allocated before the check")

    with pytest.raises(MemoryError, match="Lanczos basis .* memory budget"):
        lanczos(Huge(), k=10**5)
    nan = torch.eye(4, dtype=torch.float64)
    nan[0, 0] = math.nan
    with pytest.raises(ValueError, match="product 1 is not finite"):
        lanczos(DenseOperator(nan))
    net = torch.nn.Linear(3, 2)
    monitor = Monitor(net, (torch.randn(4, 3), torch.randn(4, 2)), loss_fn=F.mse_loss)
    for step in ("a", -1, 1.5):
        with pytest.raises(ValueError, match="step to be an int >= 0"):
            monitor.step(step)


def test_curvature_of_non_finite_weights_or_targets_is_refused_by_name() -> None:
    import torch
    import torch.nn.functional as F

    from rdiag.curvature import sharpness

    net = torch.nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    bad_y = y.clone()
    bad_y[1, 0] = math.nan
    with pytest.raises(ValueError, match="targets hold NaN or inf"):
        sharpness(net, F.mse_loss, (x, bad_y))
    with torch.no_grad():
        net.weight[0, 0] = math.inf
    with pytest.raises(ValueError, match=r"parameters \['weight'\] hold NaN or inf"):
        sharpness(net, F.mse_loss, (x, y))


def test_a_projection_over_the_memory_budget_is_refused_before_allocating() -> None:
    import torch

    from rdiag import ntk_fn

    net = torch.nn.Linear(3, 10)
    with pytest.raises(MemoryError, match=r"\(10000000000, 10\) random projection"):
        ntk_fn(net, projection=10**10)(torch.randn(2, 3))


def test_run_ids_are_canonical_and_an_older_store_resumes_without_re_runs(
    tmp_path,
) -> None:
    """Ids from the current names with defaults left out; runs keyed the old way
    (the whole config, an old field name) are found again, not re-run."""
    from rdiag.runs.config import TrainConfig, config_id, expand_grid
    from rdiag.runs.store import run_key

    cfg = {"width": 8, "parametrization": "mup"}
    assert config_id(cfg) == config_id({"width": 8, "momentum": 0.0})
    assert config_id(cfg) != config_id({"width": 9})
    out = tmp_path / "old"
    config = {**CONFIG, "grid": {"seed": [0, 1]}}
    sweep(config, out=out)
    store = Store(out)
    # Rewrite the store as an older release keyed it: the whole config as the id,
    # fields under their old names (param, model), a field since added missing.
    with contextlib.closing(sqlite3.connect(out / "rdiag.sqlite")) as conn:
        for cfg in expand_grid(config):
            old = cfg.to_dict()
            old["param"] = old.pop("parametrization")
            old["model"] = old.pop("family")
            del old["divergence_factor"]
            for table, column in (
                ("runs", "id"),
                ("scalars", "run"),
                ("missing", "run"),
            ):
                conn.execute(
                    f"UPDATE {table} SET {column} = ? WHERE {column} = ?",
                    (run_key(old), config_id(cfg)),
                )
            conn.execute(
                "UPDATE runs SET config = ? WHERE id = ?",
                (json.dumps(old, sort_keys=True), run_key(old)),
            )
        conn.commit()
    before = _records(out)
    resumed = sweep(config, out=out)
    assert resumed.count("skipped") == 2 and len(store.run_ids()) == 2
    _same(before, _records(out))
    assert TrainConfig.from_dict({"parametrization": "mup"}).canonical() == {}
    from rdiag.report import build_report

    assert build_report(store, tmp_path / "report")["summary"].is_file()


def test_non_finite_kernels_and_products_are_said_once() -> None:
    import torch

    from rdiag import ntk_fn
    from rdiag.operators.base import DenseOperator

    net = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    )
    with torch.no_grad():
        net[0].weight[0, 0] = math.nan
    handle = ntk_fn(net)
    with pytest.warns(UserWarning, match="eNTK of Sequential holds NaN or inf"):
        handle(torch.randn(4, 3))
    a = torch.eye(3, dtype=torch.float64)
    a[1, 1] = math.inf
    with pytest.warns(UserWarning, match="DenseOperator: a product holds NaN or inf"):
        DenseOperator(a).matvec(torch.ones(3, dtype=torch.float64))
