"""Merging the shards of a sweep into one store (``rdiag merge OUT SHARD...``).

A Slurm array runs ``rdiag sweep --shard i/n`` once per task; each shard's store
records the sweep it is a slice of (:func:`rdiag.runs.sweep.sweep_id`) and its
``i/n``. :func:`merge_stores` copies the shards' runs, records, missing records
and arrays into ``OUT``:

* it refuses, before writing anything, stores that are not shards, shards of
  different sweeps, and an ``OUT`` that holds another sweep, saying why;
* duplicates are impossible: rows are keyed as in every store
  (``UNIQUE(run, step, metric, layer)``), and a row already in ``OUT`` is kept;
* a run held by ``OUT`` and a shard whose records disagree (the same run executed
  twice with different results; timing records aside) is a :class:`Conflict`: it
  is reported and that run is left as ``OUT`` holds it;
* a run finished in a shard but not in ``OUT`` takes the shard's status and rows;
* it is idempotent: merging the same shards again changes nothing.

Each shard is merged in one transaction; array files are verified against their
checksums and copied into place first.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rdiag import records as R
from rdiag.runs.store import DB_NAME, Store, StoreCorruptError

#: Records that time an execution, not the model: they differ between two
#: executions of the same run and are never conflicts.
TIMING = (R.MONITOR_SECONDS, R.TRAIN_SECONDS)
_RANK = "CASE {t}.status WHEN 'finished' THEN 2 WHEN 'failed' THEN 1 ELSE 0 END"
_RUN_COLUMNS = "id, config, versions, device, seed, status, created, updated, reason"


@dataclass(frozen=True)
class Conflict:
    """A run whose record (or config, or array) differs between ``OUT`` and a shard.

    Attributes:
        run: The run id.
        what: Which value, e.g. ``"ntk/rel_change at step 10"``.
        ours: The value ``OUT`` holds (and keeps).
        theirs: The shard's value.
        shard: The shard's directory.
    """

    run: str
    what: str
    ours: Any
    theirs: Any
    shard: str

    def __str__(self) -> str:
        return (
            f"run {self.run}: {self.what} is {self.ours!r} in the merged store and "
            f"{self.theirs!r} in {self.shard}; the run is left as merged before"
        )


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge_stores` did.

    Attributes:
        out: The merged store's directory.
        sweep: The sweep's id.
        added_runs: Runs new to ``OUT``.
        completed_runs: Runs whose status a shard improved (to finished, or
            failed with its reason), with the shard's rows.
        rows: Rows written (records, missing records, arrays).
        conflicts: Disagreements found, one per differing value.
        sweep_runs: Runs in the whole sweep.
        present_runs: Runs ``OUT`` holds now; ``finished_runs``: of which finished.
        missing_shards: ``i/n`` of the shards never merged into ``OUT``.
    """

    out: str
    sweep: str
    added_runs: int
    completed_runs: int
    rows: int
    conflicts: tuple[Conflict, ...]
    sweep_runs: int
    present_runs: int
    finished_runs: int
    missing_shards: tuple[str, ...]

    @property
    def changed(self) -> bool:
        """Whether the merge wrote anything."""
        return bool(self.added_runs or self.completed_runs or self.rows)


def _open_shard(path: str | Path, out: Path) -> tuple[Store, dict[str, Any]]:
    """A shard's store and its sweep facts; raise if it is not a shard."""
    root = Path(path)
    if not (root / DB_NAME).is_file():
        raise FileNotFoundError(
            f"no store at {root} (expected {root / DB_NAME}); pass the shard "
            "directories that `rdiag sweep --shard i/n --out DIR` made "
            "(DIR/shard-i-of-n)"
        )
    if root.resolve() == out.resolve():
        raise ValueError(
            f"the shard {root} is the merged store itself; merge into another directory"
        )
    store = Store(root)
    facts = store.meta()
    if "sweep" not in facts or "shard" not in facts:
        raise ValueError(
            f"the store {root} records no sweep shard (it was not written by `rdiag "
            "sweep --shard i/n`), so nothing tells which sweep it belongs to; merge "
            "only shard stores"
        )
    return store, facts


def _check_one_sweep(
    out: Store | None, shards: Sequence[tuple[Store, dict[str, Any]]]
) -> dict[str, Any]:
    """The sweep all shards (and ``OUT``, None: no store yet) are of; raise otherwise."""
    first_store, first = shards[0]
    for store, facts in shards[1:]:
        if facts["sweep"] != first["sweep"]:
            raise ValueError(
                f"refusing to merge stores of different sweeps: {first_store.root} "
                f"is shard {first['shard']} of sweep {first['sweep']} "
                f"({first['sweep_runs']} runs), {store.root} is shard "
                f"{facts['shard']} of sweep {facts['sweep']} ({facts['sweep_runs']} "
                "runs); their grids differ (the config, or --r/--widths/--seeds/--lr/"
                "--steps/--every); merge the shards of one sweep into one OUT"
            )
    if out is None:
        return first
    held = out.meta().get("sweep")
    if held is not None and held != first["sweep"]:
        raise ValueError(
            f"refusing to merge: {out.root} holds sweep {held}, the shards are of "
            f"sweep {first['sweep']}; merge them into another directory"
        )
    if held is None and out.run_ids():
        raise ValueError(
            f"refusing to merge into {out.root}: it holds runs of no recorded sweep "
            "(written by `rdiag run` or an unsharded sweep); merge into a new or "
            "empty directory"
        )
    return first


@contextlib.contextmanager
def _attached(store: Store, other: Store) -> Iterator[sqlite3.Connection]:
    """``store``'s connection with ``other``'s database attached read-only as ``shard``."""
    conn = store._connection()
    uri = f"{other.db_path.resolve().as_uri()}?mode=ro"
    store._retry(lambda: conn.execute("ATTACH DATABASE ? AS shard", (uri,)))
    try:
        yield conn
    finally:
        conn.execute("DETACH DATABASE shard")


def _conflicts(conn: sqlite3.Connection, shard: str) -> list[Conflict]:
    found = [
        Conflict(run, "config", json_ours, json_theirs, shard)
        for run, json_ours, json_theirs in conn.execute(
            "SELECT s.id, m.config, s.config FROM shard.runs s JOIN main.runs m "
            "ON m.id = s.id WHERE m.config != s.config"
        )
    ]
    found += [
        Conflict(run, f"{R.name(metric, layer)} at step {step}", ours, theirs, shard)
        for run, step, metric, layer, ours, theirs in conn.execute(
            "SELECT s.run, s.step, s.metric, s.layer, m.value, s.value "
            "FROM shard.scalars s JOIN main.scalars m ON m.run = s.run AND "
            "m.step = s.step AND m.metric = s.metric AND m.layer = s.layer "
            f"WHERE m.value IS NOT s.value AND s.metric NOT IN ({','.join('?' * len(TIMING))})",
            TIMING,
        )
    ]
    found += [
        Conflict(run, f"array {name!r} at step {step}", ours, theirs, shard)
        for run, step, name, ours, theirs in conn.execute(
            "SELECT s.run, s.step, s.name, m.sha256, s.sha256 FROM shard.arrays s "
            "JOIN main.arrays m ON m.run = s.run AND m.step = s.step AND "
            "m.name = s.name WHERE m.sha256 != s.sha256"
        )
    ]
    return found


def _copy_arrays(conn: sqlite3.Connection, shard: Store, out: Store) -> list[tuple]:
    """Verify and copy the shard's array files ``OUT`` lacks; return their rows."""
    rows = conn.execute(
        "SELECT s.run, s.step, s.name, s.path, s.sha256, s.shape, s.dtype "
        "FROM shard.arrays s WHERE s.run NOT IN (SELECT run FROM temp.merge_skip) "
        "AND NOT EXISTS (SELECT 1 FROM main.arrays m WHERE m.run = s.run AND "
        "m.step = s.step AND m.name = s.name)"
    ).fetchall()
    for _, _, _, rel, digest, _, _ in rows:
        source, target = shard.root / rel, out.root / rel
        data = source.read_bytes() if source.is_file() else None
        if data is None or hashlib.sha256(data).hexdigest() != digest:
            raise StoreCorruptError(
                f"the array file {source} of the shard is missing or fails its "
                "checksum; nothing of this shard was merged; restore the file or "
                "re-run that shard"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    return rows


def _merge_one(out: Store, shard: Store) -> tuple[int, int, int, list[Conflict]]:
    """Merge one shard: ``(runs added, runs completed, rows written, conflicts)``."""
    with _attached(out, shard) as conn:
        conflicts = _conflicts(conn, str(shard.root))
        conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS merge_skip (run TEXT PRIMARY KEY)"
        )
        conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS merge_take (run TEXT PRIMARY KEY)"
        )
        conn.execute("DELETE FROM temp.merge_skip")
        conn.execute("DELETE FROM temp.merge_take")
        conn.executemany(
            "INSERT OR IGNORE INTO temp.merge_skip VALUES (?)",
            [(c.run,) for c in conflicts],
        )
        arrays = _copy_arrays(conn, shard, out)
        skip = "(SELECT run FROM temp.merge_skip)"

        def work(c: sqlite3.Connection) -> tuple[int, int, int]:
            added = c.execute(
                f"INSERT INTO main.runs ({_RUN_COLUMNS}) SELECT {_RUN_COLUMNS} FROM "
                f"shard.runs WHERE id NOT IN (SELECT id FROM main.runs) AND id NOT IN "
                f"{skip}"
            ).rowcount
            # Runs a shard brought further (finished, or failed with its reason).
            c.execute(
                "INSERT INTO temp.merge_take SELECT s.id FROM shard.runs s JOIN "
                f"main.runs m ON m.id = s.id WHERE {_RANK.format(t='s')} > "
                f"{_RANK.format(t='m')} AND s.id NOT IN {skip}"
            )
            taken = c.execute(
                "UPDATE main.runs SET (status, reason, updated) = (SELECT s.status, "
                "s.reason, s.updated FROM shard.runs s WHERE s.id = main.runs.id) "
                "WHERE id IN (SELECT run FROM temp.merge_take)"
            ).rowcount
            columns = "run, step, metric, layer, value"
            rows = c.execute(
                f"INSERT OR REPLACE INTO main.scalars ({columns}) SELECT {columns} "
                "FROM shard.scalars WHERE run IN (SELECT run FROM temp.merge_take)"
            ).rowcount
            rows += c.execute(
                f"INSERT OR IGNORE INTO main.scalars ({columns}) SELECT {columns} "
                f"FROM shard.scalars WHERE run NOT IN {skip}"
            ).rowcount
            rows += c.execute(
                "INSERT OR IGNORE INTO main.missing (run, step, metric, reason) "
                f"SELECT run, step, metric, reason FROM shard.missing WHERE run NOT IN "
                f"{skip}"
            ).rowcount
            if arrays:
                rows += c.executemany(
                    "INSERT OR IGNORE INTO main.arrays (run, step, name, path, "
                    "sha256, shape, dtype) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    arrays,
                ).rowcount
            return added, taken, rows

        added, taken, rows = out._write(work)
    return added, taken, rows, conflicts


def _damaged(store: Store) -> bool:
    """Whether a store's database fails SQLite's quick check (read-only)."""
    uri = f"{store.db_path.resolve().as_uri()}?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
            return conn.execute("PRAGMA quick_check").fetchone()[0] != "ok"
    except sqlite3.DatabaseError:
        return True


def _remove_stale_files(root: Path) -> None:
    """Remove the temporary array files (``*.tmp<pid>``) of dead processes.

    A merge or run killed between writing a copy and renaming it into place
    leaves one; a live process's are its own.
    """
    for path in (root / "arrays").glob("*/*.tmp*"):
        pid = path.suffix.removeprefix(".tmp")
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except (PermissionError, OverflowError):
            pass


def merge_stores(out: str | Path, shards: Sequence[str | Path]) -> MergeResult:
    """Merge shard stores of one sweep into the store at ``out`` (created if missing).

    Args:
        out: The merged store's directory.
        shards: The shards' directories (``rdiag sweep --shard i/n`` outputs).

    Returns:
        A :class:`MergeResult`; its ``conflicts`` list every disagreement found
        (those runs are left as ``out`` held them).

    Raises:
        ValueError: No shards; a store that is not a shard, or is ``out``;
            shards of different sweeps; an ``out`` holding another sweep or
            runs of none (nothing is written then).
        FileNotFoundError: A shard directory holds no store.
        StoreCorruptError: A shard's database (named) or array file is missing
            or damaged (that shard is not merged; the shards before it are).
    """
    if not shards:
        raise ValueError("expected at least one shard directory to merge, got none")
    # Every check before OUT is created: a refused merge leaves nothing behind.
    target = Path(out)
    opened = [_open_shard(path, target) for path in shards]
    existing = Store(target) if (target / DB_NAME).is_file() else None
    sweep = _check_one_sweep(existing, opened)
    store = existing or Store(target)
    _remove_stale_files(store.root)
    totals = [0, 0, 0]
    conflicts: list[Conflict] = []
    merged = set(store.meta().get("shards", []))
    for shard, facts in opened:
        try:
            *counts, found = _merge_one(store, shard)
        except (sqlite3.DatabaseError, StoreCorruptError) as err:
            if not _damaged(shard):
                raise
            raise StoreCorruptError(
                f"the shard database {shard.db_path} is damaged ({err}); nothing of "
                "this shard was merged (the shards before it were); restore it or "
                "re-run that shard, then merge again"
            ) from err
        totals = [t + c for t, c in zip(totals, counts)]
        conflicts += found
        merged.add(facts["shard"])
    wanted = {
        "sweep": sweep["sweep"],
        "sweep_runs": sweep["sweep_runs"],
        "shards": sorted(merged),
    }
    if {k: store.meta().get(k) for k in wanted} != wanted:
        store.set_meta(wanted)
    counts = {int(part.split("/")[1]) for part in merged}
    missing = sorted(
        {(i, n) for n in counts for i in range(n)}
        - {tuple(map(int, part.split("/"))) for part in merged},
        key=lambda pair: pair[::-1],
    )
    return MergeResult(
        str(store.root),
        sweep["sweep"],
        *totals,
        tuple(conflicts),
        sweep["sweep_runs"],
        len(store.run_ids()),
        len(store.run_ids("finished")),
        tuple(f"{i}/{n}" for i, n in missing),
    )
