"""Store: round trips, no duplicates, concurrent writers, locked and corrupt stores."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import sqlite3
import time

import numpy as np
import pytest

from rdiag.runs.store import (
    Store,
    StoreCorruptError,
    StoreFullError,
    StoreLockedError,
    StoreNotADatabaseError,
    run_key,
)


def test_runs_scalars_and_replace_not_duplicate(tmp_path) -> None:
    store = Store(tmp_path)
    cfg = {"family": "mlp", "width": 64, "r": 0.25}
    rid = store.create_run(cfg, seed=3, device="cpu")
    assert rid == run_key(cfg) == store.create_run(dict(reversed(list(cfg.items()))))
    assert store.status(rid) == "running" and store.config(rid) == cfg
    store.log(rid, 0, {"loss": 2.0, ("delta_h", "l1"): 0.5, ("delta_h", "l2"): 0.25})
    store.log(rid, 0, {"loss": 1.0})  # a resumed run rewrites the same key
    store.log(rid, 5, {"loss": 0.5})
    assert store.count() == 4
    assert store.scalars(rid, "loss") == [(0, "", 1.0), (5, "", 0.5)]
    assert store.scalars(rid, "delta_h", "l2") == [(0, "l2", 0.25)]
    store.set_status(rid, "finished")
    assert store.create_run(cfg) == rid and store.status(rid) == "finished"
    assert store.run_ids("finished") == [rid] and store.run_ids("running") == []
    with pytest.raises(ValueError, match="status"):
        store.set_status(rid, "done")


def test_query_dataframe_with_config_columns(tmp_path) -> None:
    pytest.importorskip("pandas")
    store = Store(tmp_path)
    for width in (8, 16):
        rid = store.create_run({"width": width, "r": 0.5}, seed=0)
        store.log(rid, 1, {"loss": 1.0 / width, ("delta_h", "h"): float(width)})
    frame = store.query("loss")
    assert sorted(frame["width"]) == [8, 16]
    assert list(frame.columns[:5]) == ["run", "step", "metric", "layer", "value"]
    assert np.allclose(sorted(frame["value"]), [1 / 16, 1 / 8])
    assert (
        len(store.query()) == 4 and len(store.query(["loss", "delta_h"], run=rid)) == 2
    )


def test_array_checksum_roundtrip_and_mismatch(tmp_path) -> None:
    store = Store(tmp_path)
    rid = store.create_run({"a": 1})
    arr = np.arange(12.0).reshape(3, 4)
    path = store.save_array(rid, 7, "ntk", arr)
    np.testing.assert_array_equal(store.load_array(rid, 7, "ntk"), arr)
    assert store.array_steps(rid, "ntk") == [7]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match=str(path.name)):
        store.load_array(rid, 7, "ntk")
    assert path.read_bytes() == bytes(data)  # left untouched
    path.unlink()
    with pytest.raises(StoreCorruptError, match="missing"):
        store.load_array(rid, 7, "ntk")
    with pytest.raises(KeyError):
        store.load_array(rid, 8, "ntk")
    with pytest.raises(ValueError, match="array name"):
        store.save_array(rid, 0, "a/b", arr)


def test_not_a_database_names_the_file_and_keeps_it(tmp_path) -> None:
    db = tmp_path / "rdiag.sqlite"
    junk = b"this is not a sqlite database" * 100
    db.write_bytes(junk)
    with pytest.raises(StoreNotADatabaseError, match="rdiag.sqlite.*not SQLite"):
        Store(tmp_path)
    assert db.read_bytes() == junk
    with pytest.raises(ValueError, match="directory"):
        Store(db)
    other = tmp_path / "other"
    (other / "rdiag.sqlite").mkdir(parents=True)
    with pytest.raises(StoreNotADatabaseError, match="got a directory"):
        Store(other)


def test_damaged_database_is_corrupt_and_kept(tmp_path) -> None:
    store = Store(tmp_path)
    rid = store.create_run({"a": 1})
    store.log_rows(rid, [(s, "loss", "", float(s)) for s in range(3000)])
    store.close()
    db = tmp_path / "rdiag.sqlite"
    data = bytearray(db.read_bytes())
    data[8192:] = bytes([0x55]) * (len(data) - 8192)  # pages 3.. overwritten
    db.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match="damaged.*integrity_check"):
        Store(tmp_path).scalars(rid, "loss")
    assert db.read_bytes() == bytes(data)


def test_disk_full_is_said_and_loses_nothing(tmp_path) -> None:
    store = Store(tmp_path)
    rid = store.create_run({"a": 1})
    store.log(rid, 0, {"loss": 1.0})
    conn = store._connection()
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own SQLITE_FULL
    rows = [(s, "x" * 500, "", 1.0) for s in range(200)]
    with pytest.raises(StoreFullError, match="is full.*rolled back.*free some space"):
        store.log_rows(rid, rows)
    assert store.scalars(rid, "loss") == [(0, "", 1.0)] and store.count() == 1
    conn.execute("PRAGMA max_page_count = 1000000")
    store.log_rows(rid, rows)
    assert store.count() == 201


def test_writes_to_an_unknown_run_raise_and_write_nothing(tmp_path) -> None:
    store = Store(tmp_path)
    for write in (
        lambda: store.log("nope", 0, {"loss": 1.0}),
        lambda: store.log_rows("nope", [(0, "loss", "", 1.0)]),
        lambda: store.log_missing("nope", 0, {"ntk": "failed"}),
        lambda: store.set_status("nope", "finished"),
        lambda: store.save_array("nope", 0, "ntk", np.zeros(2)),
        lambda: store.claim("nope"),
    ):
        with pytest.raises(KeyError, match="no run 'nope'.*create_run"):
            write()
    assert store.count() == 0 and store.run_ids() == []
    assert not (tmp_path / "arrays").exists()


@pytest.mark.parametrize(
    ("run_id", "name", "step"),
    [
        ("../../escape", "ntk", 0),
        ("..", "ntk", 0),
        ("ok", "../ntk", 0),
        ("ok", ".hidden", 0),
        ("ok", "ntk", -1),
        ("ok", "ntk", "../1"),
    ],
)
def test_array_paths_cannot_leave_the_store(tmp_path, run_id, name, step) -> None:
    store = Store(tmp_path / "store")
    store.create_run({"a": 1}, run_id="ok")
    with pytest.raises(ValueError, match="expected (run_id|array name|step)"):
        store.save_array(run_id, step, name, np.zeros(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    assert not (tmp_path / "store" / "arrays").exists()
    with pytest.raises(ValueError, match="expected run_id"):
        store.create_run({"a": 2}, run_id="../../escape")


def test_nan_and_infinities_read_back(tmp_path) -> None:
    pd = pytest.importorskip("pandas")
    store = Store(tmp_path)
    rid = store.create_run({"a": 1})
    values = {"nan": float("nan"), "inf": float("inf"), "minf": float("-inf")}
    store.log(rid, 0, values)
    for metric, value in values.items():
        ((_, _, got),) = store.scalars(rid, metric)
        assert isinstance(got, float) and np.array_equal(got, value, equal_nan=True)
    frame = store.query()
    assert frame["value"].dtype == float and int(frame["value"].isna().sum()) == 1
    assert pd.isna(store.query("nan")["value"]).all()


def test_status_reason_and_missing_metrics(tmp_path) -> None:
    store = Store(tmp_path)
    rid = store.create_run({"a": 1})
    assert store.reason(rid) is None
    store.set_status(rid, "failed", "diverged at step 3: training loss nan")
    assert store.status(rid) == "failed"
    assert store.reason(rid) == "diverged at step 3: training loss nan"
    assert store.create_run({"a": 1}) == rid and store.reason(rid) is None  # retried
    store.log_missing(rid, 10, {"ntk": "ValueError: x", "sharpness": "eigh failed"})
    store.log_missing(rid, 10, {"ntk": "ValueError: y"})  # replaced, not duplicated
    store.log_missing(rid, 0, {})
    assert store.missing(rid) == [
        (10, "ntk", "ValueError: y"),
        (10, "sharpness", "eigh failed"),
    ]
    with pytest.raises(KeyError):
        store.reason("nope")


def test_old_store_gains_the_reason_column_keeping_every_row(tmp_path) -> None:
    db = sqlite3.connect(tmp_path / "rdiag.sqlite")
    db.executescript(
        """
        CREATE TABLE runs (id TEXT PRIMARY KEY, config TEXT NOT NULL,
            versions TEXT NOT NULL, device TEXT, seed INTEGER, status TEXT NOT NULL,
            created REAL, updated REAL);
        CREATE TABLE scalars (run TEXT NOT NULL, step INTEGER NOT NULL,
            metric TEXT NOT NULL, layer TEXT NOT NULL DEFAULT '', value REAL,
            UNIQUE(run, step, metric, layer));
        INSERT INTO runs VALUES ('r1', '{"a": 1}', '{}', 'cpu', 0, 'finished', 1, 1);
        INSERT INTO scalars VALUES ('r1', 0, 'loss', '', 0.5);
        """
    )
    db.close()
    store = Store(tmp_path)
    assert store.run_ids("finished") == ["r1"] and store.config("r1") == {"a": 1}
    assert store.scalars("r1", "loss") == [(0, "", 0.5)] and store.reason("r1") is None
    store.set_status("r1", "failed", "why")
    assert Store(tmp_path).reason("r1") == "why"


def _hold_claim(root: str, rid: str, ready, done) -> None:
    ready.put(Store(root).claim(rid))
    done.wait(30)


def test_claims_respect_live_owners_and_take_over_dead_ones(tmp_path) -> None:
    store = Store(tmp_path)
    rid = store.create_run({"a": 1})
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    ready, done = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_hold_claim, args=(str(tmp_path), rid, ready, done))
    proc.start()
    try:
        assert ready.get(timeout=30) is True
        assert store.claim(rid) is False
        assert store.claim_holder(rid)["pid"] == proc.pid
        store.release(rid)  # not ours: stays
        assert store.claim_holder(rid)["pid"] == proc.pid
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
    assert store.claim(rid) is True and store.claim_holder(rid)["pid"] == os.getpid()
    assert store.claim(rid) is True  # ours: a heartbeat
    store.release(rid)
    assert store.claim_holder(rid) is None


def test_claims_of_reused_pids_and_other_hosts(tmp_path) -> None:
    from rdiag.runs import store as store_module

    store = Store(tmp_path)
    rid = store.create_run({"a": 1})
    conn = store._connection()

    def plant(pid: int, host: str, pid_start: str | None, age: float) -> None:
        now = time.time()
        conn.execute(
            "INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?, ?)",
            (rid, pid, host, pid_start, now - age, now - age),
        )

    if store_module._proc_start(os.getpid()) is not None:  # Linux: exact identity
        plant(os.getpid(), socket.gethostname(), "1", 0.0)  # our pid, another start
        assert store.claim(rid) is True
    plant(1, "elsewhere.example", None, 10.0)
    assert store.claim(rid) is False
    plant(1, "elsewhere.example", None, store_module.CLAIM_STALE_SECONDS + 1)
    assert store.claim(rid) is True


def test_locked_store_times_out_with_clear_error_and_loses_nothing(tmp_path) -> None:
    store = Store(tmp_path, timeout=0.5)
    rid = store.create_run({"x": 1})
    store.log(rid, 0, {"loss": 1.0})
    other = sqlite3.connect(tmp_path / "rdiag.sqlite", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreLockedError, match="locked by another process"):
            store.log(rid, 1, {"loss": 0.5})
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert store.scalars(rid, "loss") == [(0, "", 1.0)]
    store.log(rid, 1, {"loss": 0.5})
    assert store.count() == 2


def _writer(root: str, worker: int, steps: int) -> None:
    store = Store(root)
    rid = store.create_run({"worker": worker})
    for step in range(steps):
        store.log(rid, step, {"loss": float(step), ("h", "a"): 1.0, ("h", "b"): 2.0})
        store.save_array(rid, step, "k", np.full(3, worker)) if step % 10 == 0 else None
    store.set_status(rid, "finished")


def test_concurrent_writer_processes(tmp_path) -> None:
    Store(tmp_path)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    store = Store(tmp_path)
    assert store.count() == 4 * 40 * 3
    assert len(store.run_ids("finished")) == 4
    for rid in store.run_ids():
        assert [s for s, _, _ in store.scalars(rid, "loss")] == list(range(40))
        assert store.array_steps(rid, "k") == [0, 10, 20, 30]


def test_a_zero_length_database_is_named_not_taken_as_empty(tmp_path) -> None:
    import os
    import time

    from rdiag.runs.store import StoreCorruptError

    db = tmp_path / "rdiag.sqlite"
    db.write_bytes(b"")
    old = time.time() - 60
    os.utime(db, (old, old))
    with pytest.raises(StoreCorruptError, match=r"rdiag.sqlite is empty \(0 bytes\)"):
        Store(tmp_path)
    assert db.stat().st_size == 0  # left as it was


def test_bad_arguments_are_named(tmp_path) -> None:
    store = Store(tmp_path)
    rid = store.create_run({"a": 1})
    cases = [
        (lambda: Store(123), TypeError, "directory as a str or path, got int"),
        (lambda: Store(tmp_path, timeout="x"), ValueError, "timeout"),
        (lambda: store.create_run("abc"), TypeError, "config as a mapping"),
        (lambda: store.log(rid, "a", {"x": 1.0}), ValueError, "step to be an int"),
        (lambda: store.log(rid, 0, "x"), TypeError, "records as a mapping"),
        (lambda: store.log(rid, 0, {"x": "y"}), TypeError, "real value for 'x'"),
        (lambda: store.log(rid, 0, {3: 1.0}), TypeError, "record names"),
        (lambda: store.log_rows(rid, [(0, "x")]), ValueError, "rows \\(step, metric"),
        (lambda: store.log_missing(rid, 0, "x"), TypeError, "metric -> reason"),
        (lambda: store.save_array(rid, 0, "n", "abc"), TypeError, "numeric array"),
        (lambda: store.run_ids(5), ValueError, "status"),
    ]
    for call, kind, message in cases:
        with pytest.raises(kind, match=message):
            call()
    assert store.count(rid) == 0
