"""Store: round trips, no duplicates, concurrent writers, locked and corrupt stores."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

import numpy as np
import pytest

from rdiag.store import Store, StoreCorruptError, StoreLockedError, run_key


def test_runs_scalars_and_replace_not_duplicate(tmp_path) -> None:
    store = Store(tmp_path)
    cfg = {"model": "mlp", "width": 64, "r": 0.25}
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


def test_corrupt_database_names_file_and_keeps_it(tmp_path) -> None:
    db = tmp_path / "rdiag.sqlite"
    junk = b"this is not a sqlite database" * 100
    db.write_bytes(junk)
    with pytest.raises(StoreCorruptError, match="rdiag.sqlite"):
        Store(tmp_path)
    assert db.read_bytes() == junk
    with pytest.raises(ValueError, match="directory"):
        Store(db)


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
