"""Slurm-array shards and rdiag merge: two shards plus a merge equal the unsharded
sweep, a second merge changes nothing, conflicts are reported, bad input refused."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from rdiag.cli import main
from rdiag.runs.config import parse_shard
from rdiag.runs.sweep import sweep
from rdiag.runs.merge import merge_stores
from rdiag.runs.store import Store
from tests.test_faults import BASE, _records, _same

CONFIG = {
    "base": {**BASE, "metrics": ["ntk", "representations", "loss"], "snapshots": True},
    "grid": {"width": [8, 12], "seed": [0, 1, 2]},
    "report": False,
}
RUNS = 6


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, Path]:
    """The unsharded sweep and the two shards of the same sweep."""
    pytest.importorskip("pandas")
    root = tmp_path_factory.mktemp("sweeps")
    assert sweep(CONFIG, out=root / "whole").count("finished") == RUNS
    sizes = [len(sweep(CONFIG, out=root, shard=f"{i}/2").results) for i in range(2)]
    assert sizes == [3, 3]
    return root / "whole", root


def _tables(root: Path) -> dict[str, list]:
    with contextlib.closing(sqlite3.connect(root / "rdiag.sqlite")) as conn:
        return {
            t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr)
            for t in ("runs", "scalars", "arrays", "missing", "meta")
        }


def _parts(root: Path) -> list[Path]:
    return [root / "shard-0-of-2", root / "shard-1-of-2"]


def test_two_shards_and_a_merge_equal_the_unsharded_sweep(shards, tmp_path) -> None:
    whole, root = shards
    out = tmp_path / "merged"
    result = merge_stores(out, _parts(root))
    assert (result.added_runs, result.present_runs, result.finished_runs) == (RUNS,) * 3
    assert result.conflicts == () and result.missing_shards == ()
    _same(_records(whole), _records(out))
    merged, reference = Store(out), Store(whole)
    assert sorted(merged.run_ids("finished")) == sorted(reference.run_ids("finished"))
    for rid in reference.run_ids():
        assert merged.config(rid) == reference.config(rid)
        for step in reference.array_steps(rid, "ntk"):
            np.testing.assert_array_equal(
                merged.load_array(rid, step, "ntk"),
                reference.load_array(rid, step, "ntk"),
            )
    before = _tables(out)
    again = merge_stores(out, _parts(root))
    assert not again.changed and again.conflicts == ()
    assert _tables(out) == before, "a second merge changed the store"


def test_conflicting_records_are_reported_and_the_run_left_alone(
    shards, tmp_path
) -> None:
    _, root = shards
    twin = tmp_path / "twin"
    shutil.copytree(root / "shard-0-of-2", twin)
    with contextlib.closing(sqlite3.connect(twin / "rdiag.sqlite")) as conn:
        run, step = conn.execute(
            "SELECT run, step FROM scalars WHERE metric = 'f_norm' LIMIT 1"
        ).fetchone()
        conn.execute(
            "UPDATE scalars SET value = value + 1 WHERE run = ? AND step = ? AND "
            "metric = 'f_norm'",
            (run, step),
        )
        conn.execute(  # timing differs between executions: never a conflict
            "UPDATE scalars SET value = value + 1 WHERE metric = 'monitor/seconds'"
        )
        conn.commit()
    out = tmp_path / "merged"
    merge_stores(out, [root / "shard-0-of-2"])
    kept = _tables(out)
    result = merge_stores(out, [twin])
    assert [(c.run, c.what) for c in result.conflicts] == [
        (run, f"f_norm at step {step}")
    ]
    assert f"run {run}: f_norm at step {step} is" in str(result.conflicts[0])
    assert _tables(out)["scalars"] == kept["scalars"]
    assert result.missing_shards == ("1/2",)
    code = main(["merge", str(tmp_path / "cli"), str(root / "shard-0-of-2"), str(twin)])
    assert code == 1


def test_a_shard_that_finished_a_run_completes_it(shards, tmp_path) -> None:
    _, root = shards
    partial = tmp_path / "partial"
    shutil.copytree(root / "shard-1-of-2", partial)
    with contextlib.closing(sqlite3.connect(partial / "rdiag.sqlite")) as conn:
        (run,) = conn.execute("SELECT id FROM runs LIMIT 1").fetchone()
        conn.execute("UPDATE runs SET status = 'running' WHERE id = ?", (run,))
        conn.execute("DELETE FROM scalars WHERE run = ? AND step > 5", (run,))
        conn.commit()
    out = tmp_path / "merged"
    merge_stores(out, [partial])
    assert Store(out).status(run) == "running"
    result = merge_stores(out, [root / "shard-1-of-2"])
    assert result.completed_runs == 1 and result.conflicts == ()
    assert Store(out).status(run) == "finished"
    _same(_records(root / "shard-1-of-2"), _records(out))


@pytest.mark.parametrize("spec", ["3/2", "2/2", "-1/2", "1/0", "a/b", "2", "1/2/3"])
def test_bad_shard_specs_say_the_valid_form(spec: str, capsys) -> None:
    with pytest.raises(ValueError, match=r"expected a shard as i/n with 0 <= i < n"):
        parse_shard(spec)
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", f"--shard={spec}", "--out", "unused"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"got {spec!r}" in err


def test_merging_stores_of_different_sweeps_is_refused_with_the_reason(
    shards, tmp_path
) -> None:
    whole, root = shards
    other = {**CONFIG, "grid": {"width": [8], "seed": [5]}}
    sweep(other, out=tmp_path, shard="0/1")
    out = tmp_path / "merged"
    with pytest.raises(ValueError, match=r"different sweeps: .* their grids differ"):
        merge_stores(out, [root / "shard-0-of-2", tmp_path / "shard-0-of-1"])
    assert Store(out).run_ids() == []  # nothing written
    merge_stores(out, [root / "shard-0-of-2"])
    with pytest.raises(ValueError, match=r"holds sweep \w+, the shards are of sweep"):
        merge_stores(out, [tmp_path / "shard-0-of-1"])
    with pytest.raises(ValueError, match="records no sweep shard"):
        merge_stores(tmp_path / "m2", [whole])
    with pytest.raises(ValueError, match="holds runs of no recorded sweep"):
        merge_stores(whole, [root / "shard-0-of-2"])
    with pytest.raises(FileNotFoundError, match="no store at"):
        merge_stores(tmp_path / "m3", [tmp_path / "nothing"])
    with pytest.raises(ValueError, match="holds shard 0/2 of sweep .*, not shard 0/2"):
        sweep(other, out=root, shard="0/2")


def _corrupt(db: Path) -> None:
    """Overwrite the scalars table's root page: 'database disk image is malformed'
    when its rows are read, while the store still opens."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        (page,) = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'scalars'"
        ).fetchone()
    data = bytearray(db.read_bytes())
    data[(page - 1) * size : page * size] = b"\x07" * size
    db.write_bytes(bytes(data))


def test_a_corrupt_shard_is_named_and_a_refused_merge_leaves_no_target(
    shards, tmp_path
) -> None:
    from rdiag.runs.store import StoreCorruptError

    _, root = shards
    bad = tmp_path / "shard-1-of-2"
    shutil.copytree(root / "shard-1-of-2", bad)
    _corrupt(bad / "rdiag.sqlite")
    out = tmp_path / "merged"
    with pytest.raises(StoreCorruptError, match=str(bad / "rdiag.sqlite")):
        merge_stores(out, [root / "shard-0-of-2", bad])
    refused = tmp_path / "refused"
    with pytest.raises(ValueError, match="records no sweep shard"):
        merge_stores(refused, [root / "whole"])
    assert not refused.exists(), "a refused merge left its target behind"


def test_a_re_merge_removes_what_a_killed_merge_left(shards, tmp_path) -> None:
    _, root = shards
    out = tmp_path / "merged"
    merge_stores(out, _parts(root))
    run = next((out / "arrays").iterdir())
    left = run / "ntk-2.tmp999999999"  # a dead merge's pid
    left.write_bytes(b"partial")
    mine = run / f"ntk-4.tmp{os.getppid()}"  # a live process's: kept
    mine.write_bytes(b"partial")
    merge_stores(out, _parts(root))
    assert not left.exists() and mine.exists()
