"""Run store: SQLite (WAL) for runs and scalar records, checksummed ``.npy`` arrays.

Layout of a store directory::

    <root>/rdiag.sqlite          runs, scalars, arrays, missing, claims, meta tables (WAL)
    <root>/arrays/<run>/<name>-<step>.npy

Guarantees:

* Every write (:meth:`Store.log`, :meth:`Store.save_array`, ...) is one
  transaction, so a process killed mid-run loses at most the record in flight.
* A record name (:mod:`rdiag.records`, e.g. ``"delta_h/hidden.0"``) is stored as
  its ``(metric, layer)`` columns (``("delta_h", "hidden.0")``), so both stay
  queryable. Stores written by the release before this one, whose metrics had
  other names (``ntk_rel_change``, ``train_loss``, ...), read back under the
  current names (:data:`rdiag.records.LEGACY`); nothing on disk is rewritten.
* ``scalars`` has ``UNIQUE(run, step, metric, layer)`` and arrays
  ``UNIQUE(run, step, name)``: writing a key again replaces the value (a resumed
  run recomputes the same step), so rows are never duplicated. Records name an
  existing run: a write to an unknown run raises ``KeyError`` and writes nothing.
  NaN values read back as NaN (SQLite stores them as NULL).
* Several processes may write at once: SQLite's ``busy_timeout`` plus a retry
  loop with back-off; after ``timeout`` seconds a :class:`StoreLockedError` names
  the file.
* Errors say their cause and its remedy, and no error path deletes or rewrites
  data: :class:`StoreLockedError`, :class:`StoreFullError` (disk full; the write
  in flight is rolled back), :class:`StoreReadOnlyError` (the directory or its
  files cannot be written), :class:`StoreNotADatabaseError` (a directory or a
  foreign file at the database path) and :class:`StoreCorruptError` (a damaged
  database, or an array file missing or failing its checksum), all
  :class:`StoreError`.
* A run is claimed by the process executing it (:meth:`Store.claim`): a claim of
  a live process is respected, a claim left by a dead one is taken over.
* ``meta`` holds facts about the store as a whole (:meth:`Store.meta`), e.g. which
  sweep, and which shard of it, wrote it (:mod:`rdiag.runs.merge` checks them).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import platform
import socket
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from rdiag import records as R
from rdiag._checks import (
    check_choice,
    check_file_name,
    check_finite_positive,
    check_nonnegative_int,
)
from rdiag._optional import require
from rdiag._version import __version__
from rdiag.runs.errors import (
    BUSY,
    DB_NAME,
    LOCKED,
    check_not_truncated,
    sqlite_code,
    store_error,
)
from rdiag.runs.errors import (
    StoreCorruptError as StoreCorruptError,
)
from rdiag.runs.errors import (
    StoreError as StoreError,
)
from rdiag.runs.errors import (
    StoreFullError as StoreFullError,
)
from rdiag.runs.errors import (
    StoreLockedError as StoreLockedError,
)
from rdiag.runs.errors import (
    StoreNotADatabaseError as StoreNotADatabaseError,
)
from rdiag.runs.errors import (
    StoreReadOnlyError as StoreReadOnlyError,
)

STATUSES = ("running", "finished", "failed")
#: A claim made on another host (whose process cannot be checked) counts until its
#: heartbeat is this many seconds old.
CLAIM_STALE_SECONDS = 600.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, config TEXT NOT NULL, versions TEXT NOT NULL,
    device TEXT, seed INTEGER, status TEXT NOT NULL, created REAL, updated REAL,
    reason TEXT);
CREATE TABLE IF NOT EXISTS scalars (
    run TEXT NOT NULL, step INTEGER NOT NULL, metric TEXT NOT NULL,
    layer TEXT NOT NULL DEFAULT '', value REAL,
    UNIQUE(run, step, metric, layer));
CREATE TABLE IF NOT EXISTS arrays (
    run TEXT NOT NULL, step INTEGER NOT NULL, name TEXT NOT NULL, path TEXT NOT NULL,
    sha256 TEXT NOT NULL, shape TEXT NOT NULL, dtype TEXT NOT NULL,
    UNIQUE(run, step, name));
CREATE TABLE IF NOT EXISTS missing (
    run TEXT NOT NULL, step INTEGER NOT NULL, metric TEXT NOT NULL,
    reason TEXT NOT NULL, UNIQUE(run, step, metric));
CREATE TABLE IF NOT EXISTS claims (
    run TEXT PRIMARY KEY, pid INTEGER NOT NULL, host TEXT NOT NULL, pid_start TEXT,
    started REAL NOT NULL, heartbeat REAL NOT NULL);
"""
# Made by the first write of a fact, so that stores of older releases (read-only
# archives too) open without a schema change.
_META = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
Records = Mapping[str | tuple[str, str], float]
T = TypeVar("T")


def _proc_start(pid: int) -> str | None:
    """Start time (ticks after boot) of a live process, from ``/proc``.

    None if the process is gone or a zombie, or there is no ``/proc``.
    """
    try:
        state, *fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if state in ("Z", "X") else fields[18]


def _this_process() -> tuple[int, str, str | None]:
    """``(pid, host, start time)`` identifying this process in a claim."""
    return os.getpid(), socket.gethostname(), _proc_start(os.getpid())


def _live(pid: int, host: str, pid_start: str | None, heartbeat: float) -> bool:
    """Whether the owner of a claim still runs (see :meth:`Store.claim`)."""
    if host != socket.gethostname() or os.name != "posix":
        return time.time() - heartbeat < CLAIM_STALE_SECONDS
    if pid_start is not None:  # exact on Linux: a zombie or a reused pid does not count
        return _proc_start(pid) == pid_start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


#: Config fields renamed since run ids were first computed: current name -> the
#: name a run id hashes (CHANGELOG.md). A renamed field never changes a run id, so
#: a store written before the rename resumes with 0 re-runs, and its configs read
#: back under the current names (:meth:`Store.config`, :meth:`Store.query`).
ID_NAMES = {"family": "model"}


def run_key(config: Mapping[str, Any]) -> str:
    """Deterministic run id of a configuration: a 16-hex sha256 of its sorted JSON.

    Fields renamed since (:data:`ID_NAMES`) are hashed under their first name.
    """
    named = {ID_NAMES.get(k, k): v for k, v in config.items()}
    blob = json.dumps(named, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def current_names(config: Mapping[str, Any]) -> dict[str, Any]:
    """A stored config under the current field names (:data:`ID_NAMES` reversed)."""
    old = {v: k for k, v in ID_NAMES.items()}
    return {
        old[k] if k in old and old[k] not in config else k: v for k, v in config.items()
    }


def versions() -> dict[str, str]:
    """Versions recorded with every run (python, torch, numpy, rdiag)."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "rdiag": __version__,
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Store:
    """A directory holding a SQLite database of runs and records, plus array files.

    The object is cheap and picklable (only the path travels); each process opens
    its own connection lazily, so pass a ``Store`` to worker processes freely.

    Args:
        root: Directory of the store (created if missing).
        timeout: Seconds to keep retrying while another process holds the lock.

    Raises:
        ValueError: ``root`` is a file.
        StoreError: The database cannot be opened; the subclass says why
            (:class:`StoreNotADatabaseError`, :class:`StoreReadOnlyError`,
            :class:`StoreCorruptError`, ...).

    Example:
        >>> import tempfile
        >>> store = Store(tempfile.mkdtemp())
        >>> rid = store.create_run({"width": 64}, seed=0)
        >>> store.log(rid, 0, {"loss": 1.5, "delta_h/layer1": 0.1})
        >>> store.scalars(rid, "delta_h")
        [(0, 'layer1', 0.1)]
    """

    def __init__(self, root: str | os.PathLike, *, timeout: float = 60.0) -> None:
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(
                f"expected the store's directory as a str or path, got "
                f"{type(root).__name__}"
            )
        self.root = Path(root)
        self.timeout = check_finite_positive(timeout, "timeout")
        self.db_path = self.root / DB_NAME
        self._conn: sqlite3.Connection | None = None
        self._pid: int | None = None
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(
                f"expected a directory for the store, got the file {self.root}; "
                "pass a directory path (it is created if missing)"
            )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise store_error(self, err) from err
        check_not_truncated(self.db_path)
        self._retry(lambda: self._connection().executescript(_SCHEMA))
        self._migrate()

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "timeout": self.timeout}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], timeout=state["timeout"])

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # ---- connection, transactions, errors ---------------------------------------
    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            wait = min(self.timeout, 5.0)
            conn = sqlite3.connect(
                self._uri(), timeout=wait, isolation_level=None, uri=True
            )
            conn.execute(f"PRAGMA busy_timeout={int(wait * 1000)}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _uri(self) -> str:
        """The database URI; read-only where the store cannot be written.

        A read-only WAL database opens only if its ``-shm`` file exists or can be
        made; without a ``-wal`` file (nothing left to read in it) it is opened
        as immutable, so an archived store can still be read.
        """
        uri = self.db_path.resolve().as_uri()
        if self.unwritable() is None:
            return uri
        wal = self.db_path.with_name(f"{DB_NAME}-wal").exists()
        return f"{uri}?mode=ro" if wal else f"{uri}?mode=ro&immutable=1"

    def _migrate(self) -> None:
        """Add the ``runs.reason`` column to a store made by an older rdiag."""

        def add(conn: sqlite3.Connection) -> None:
            columns = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
            if "reason" not in columns:  # checked again: another process may have won
                conn.execute("ALTER TABLE runs ADD COLUMN reason TEXT")

        if "reason" not in {row[1] for row in self._read("PRAGMA table_info(runs)")}:
            self._write(add)

    def _retry(self, call: Callable[[], T]) -> T:
        """``call()``, retried with back-off while the database is locked."""
        deadline = time.monotonic() + self.timeout
        delay = 0.01
        while True:
            try:
                return call()
            except sqlite3.Error as err:
                locked = sqlite_code(err) in (BUSY, LOCKED)
                if locked and time.monotonic() < deadline:
                    time.sleep(delay)
                    delay = min(delay * 2, 0.5)
                    continue
                error = store_error(self, err)
                if error is err:
                    raise
                raise error from err

    def _read(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        return self._retry(
            lambda: self._connection().execute(sql, tuple(params)).fetchall()
        )

    def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work(connection)`` as one ``BEGIN IMMEDIATE`` transaction."""

        def transaction() -> T:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                out = work(conn)
                conn.execute("COMMIT")
            except BaseException:
                # SQLite has already rolled back after some errors (SQLITE_FULL): a
                # second ROLLBACK would fail and hide the cause.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return out

        return self._retry(transaction)

    def _insert(self, run_id: str, sql: str, rows: list[tuple]) -> None:
        """Insert rows of an existing run in one transaction."""

        def work(conn: sqlite3.Connection) -> None:
            self._require_run(conn, run_id)
            conn.executemany(sql, rows)

        self._write(work)

    def _require_run(self, conn: sqlite3.Connection, run_id: str) -> None:
        if not conn.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone():
            raise self._no_run(run_id)

    def _no_run(self, run_id: str) -> KeyError:
        return KeyError(
            f"no run {run_id!r} in the store {self.db_path}; create it first with "
            "Store.create_run"
        )

    def unwritable(self) -> str | None:
        """Which part of the store cannot be written, or None."""
        names = ("", "-wal", "-shm")
        for path in (self.root, *(self.root / f"{DB_NAME}{n}" for n in names)):
            if path.exists() and not os.access(path, os.W_OK):
                return f"{path} is not writable"
        return None

    # ---- runs --------------------------------------------------------------------
    def create_run(
        self,
        config: Mapping[str, Any],
        *,
        run_id: str | None = None,
        seed: int | None = None,
        device: str | None = None,
    ) -> str:
        """Register a run (or find it again) and mark it ``running``.

        Args:
            config: JSON-serializable configuration of the run.
            run_id: Explicit id (letters, digits, ``_.-``); default :func:`run_key`
                of ``config``, so the same configuration maps to the same run (what
                makes sweeps resumable).
            seed: Seed, stored in its own column.
            device: Device description, e.g. ``"cpu"``.

        Returns:
            The run id. An existing run keeps its records; its status becomes
            ``running`` again (and its failure reason is cleared) unless it had
            ``finished``.

        Raises:
            ValueError: A ``run_id`` that is not a safe file name (it names the
                run's array folder).
        """
        if not isinstance(config, Mapping):
            raise TypeError(
                f"expected the run's config as a mapping of fields, got "
                f"{type(config).__name__}"
            )
        rid = run_key(config) if run_id is None else check_file_name(run_id, "run_id")
        now = time.time()
        row = (
            rid,
            json.dumps(dict(config), sort_keys=True, default=str),
            json.dumps(versions()),
            device,
            seed,
            now,
            now,
        )
        self._write(
            lambda conn: conn.execute(
                "INSERT INTO runs (id, config, versions, device, seed, status, created, "
                "updated) VALUES (?, ?, ?, ?, ?, 'running', ?, ?) ON CONFLICT(id) DO "
                "UPDATE SET reason = CASE WHEN status = 'finished' THEN reason END, "
                "status = CASE WHEN status = 'finished' THEN status ELSE 'running' END, "
                "updated = excluded.updated",
                row,
            )
        )
        return rid

    def set_status(self, run_id: str, status: str, reason: str | None = None) -> None:
        """Set a run's status: ``"running"``, ``"finished"`` or ``"failed"``.

        Args:
            run_id: The run.
            status: The new status.
            reason: Why (e.g. why it failed), read back by :meth:`reason`; None
                clears it.

        Raises:
            ValueError: Another status.
            KeyError: No such run.
        """
        if status not in STATUSES:
            raise ValueError(f"expected status in {list(STATUSES)}, got {status!r}")

        def work(conn: sqlite3.Connection) -> None:
            self._require_run(conn, run_id)
            conn.execute(
                "UPDATE runs SET status = ?, reason = ?, updated = ? WHERE id = ?",
                (status, reason, time.time(), run_id),
            )

        self._write(work)

    def status(self, run_id: str) -> str | None:
        """The run's status, or ``None`` if the store has no such run."""
        rows = self._read("SELECT status FROM runs WHERE id = ?", (run_id,))
        return rows[0][0] if rows else None

    def reason(self, run_id: str) -> str | None:
        """Why the run has its status (e.g. why it failed), or None if not said.

        Raises:
            KeyError: No such run.
        """
        return self._run_field(run_id, "reason")

    def config(self, run_id: str) -> dict[str, Any]:
        """The configuration a run was created with.

        Returns:
            The config dict, under the current field names (:data:`ID_NAMES`).

        Raises:
            KeyError: No such run.
        """
        return current_names(json.loads(self._run_field(run_id, "config")))

    def _run_field(self, run_id: str, column: str) -> Any:
        rows = self._read(f"SELECT {column} FROM runs WHERE id = ?", (run_id,))
        if not rows:
            raise self._no_run(run_id)
        return rows[0][0]

    def run_ids(self, status: str | None = None) -> list[str]:
        """Ids of the runs, optionally only those with ``status``, in creation order."""
        if status is not None:
            check_choice(status, "status", STATUSES)
        if status is None:
            rows = self._read("SELECT id FROM runs ORDER BY created, id")
        else:
            rows = self._read(
                "SELECT id FROM runs WHERE status = ? ORDER BY created, id", (status,)
            )
        return [r[0] for r in rows]

    # ---- store facts -------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        """The store's facts ``{key: value}`` (JSON values), e.g. ``{"sweep": ...}``.

        ``{}`` for a store that has none (or was written by an older release).
        """
        tables = self._read("SELECT 1 FROM sqlite_master WHERE name = 'meta'")
        if not tables:
            return {}
        return {k: json.loads(v) for k, v in self._read("SELECT key, value FROM meta")}

    def set_meta(self, values: Mapping[str, Any]) -> None:
        """Set facts about the store (JSON-serializable values), in one transaction."""
        rows = [(k, json.dumps(v, sort_keys=True)) for k, v in values.items()]

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(_META)
            conn.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", rows
            )

        self._write(work)

    # ---- claims ------------------------------------------------------------------
    def claim(self, run_id: str) -> bool:
        """Claim a run for this process, so that no other live process executes it.

        A claim of another process on this host counts while that process lives
        (checked by pid and, on Linux, start time, so neither a zombie nor a reused
        pid counts); a claim from another host counts until its heartbeat is
        :data:`CLAIM_STALE_SECONDS` old. A claim that no longer counts is taken
        over. Claiming a run this process holds refreshes the heartbeat.

        Args:
            run_id: The run.

        Returns:
            True if this process holds the claim now; False if another live
            process does (see :meth:`claim_holder`).

        Raises:
            KeyError: No such run.
        """
        me = _this_process()

        def work(conn: sqlite3.Connection) -> bool:
            self._require_run(conn, run_id)
            row = conn.execute(
                "SELECT pid, host, pid_start, heartbeat FROM claims WHERE run = ?",
                (run_id,),
            ).fetchone()
            now = time.time()
            if row is not None and tuple(row[:3]) == me:
                conn.execute(
                    "UPDATE claims SET heartbeat = ? WHERE run = ?", (now, run_id)
                )
            elif row is None or not _live(*row):
                conn.execute(
                    "INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?, ?)",
                    (run_id, *me, now, now),
                )
            else:
                return False
            return True

        return self._write(work)

    def claim_holder(self, run_id: str) -> dict[str, Any] | None:
        """Who holds a run's claim, or None if nobody does.

        Returns:
            ``{"pid", "host", "started", "heartbeat"}`` (times as Unix seconds).
        """
        rows = self._read(
            "SELECT pid, host, started, heartbeat FROM claims WHERE run = ?", (run_id,)
        )
        return (
            dict(zip(("pid", "host", "started", "heartbeat"), rows[0]))
            if rows
            else None
        )

    def release(self, run_id: str) -> None:
        """Drop this process's claim of a run (a claim of another process stays)."""
        self._write(
            lambda conn: conn.execute(
                "DELETE FROM claims WHERE run = ? AND pid = ? AND host = ? AND "
                "pid_start IS ?",
                (run_id, *_this_process()),
            )
        )

    # ---- scalars -----------------------------------------------------------------
    def log(self, run_id: str, step: int, records: Records) -> None:
        """Write scalar records of one step in one transaction.

        Args:
            run_id: The run.
            step: Training step.
            records: ``name -> value`` (:mod:`rdiag.records`; stored as its
                ``(metric, layer)`` columns) or ``(metric, layer) -> value``; old
                metric names are stored under their current names. An existing
                ``(run, step, metric, layer)`` is replaced, never duplicated.

        Raises:
            KeyError: No such run (nothing is written).
        """
        step = check_nonnegative_int(step, "step")
        if not isinstance(records, Mapping):
            raise TypeError(
                f"expected records as a mapping name -> value, got "
                f"{type(records).__name__}"
            )
        bad = [k for k in records if not isinstance(k, (str, tuple))]
        if bad:
            raise TypeError(
                f"expected record names (str, e.g. 'delta_h/hidden.0') or (metric, "
                f"layer) tuples, got {bad[:3]}"
            )
        rows = [(step, *R.columns(key), value) for key, value in records.items()]
        self.log_rows(run_id, rows)

    def log_rows(
        self, run_id: str, rows: Iterable[tuple[int, str, str, float]]
    ) -> None:
        """Write ``(step, metric, layer, value)`` rows of several steps in one transaction.

        A row replaces the same ``(run, step, metric, layer)``, also where it was
        stored under the metric's old name (a run of an old store executed again).

        Args:
            run_id: The run.
            rows: Rows; ``layer`` ``""`` or ``None`` for model-level metrics; old
                metric names are stored under their current names.

        Raises:
            KeyError: No such run (nothing is written).
        """
        rows = [(run_id, *R.store_row(row)) for row in rows]
        old = [
            (run_id, s, layer, alias)
            for _, s, m, layer, _ in rows
            for alias in R.stored_metrics(m)[1:]
        ]

        def work(conn: sqlite3.Connection) -> None:
            self._require_run(conn, run_id)
            conn.executemany(
                "DELETE FROM scalars WHERE run = ? AND step = ? AND layer = ? AND "
                "metric = ?",
                old,
            )
            conn.executemany(
                "INSERT OR REPLACE INTO scalars (run, step, metric, layer, value) "
                "VALUES (?, ?, ?, ?, ?)",
                rows,
            )

        if rows:
            self._write(work)

    def log_missing(self, run_id: str, step: int, missing: Mapping[str, str]) -> None:
        """Record metrics that could not be computed at a step, with the reasons.

        Args:
            run_id: The run.
            step: Training step.
            missing: ``metric -> reason``; an existing ``(run, step, metric)`` is
                replaced, never duplicated.

        Raises:
            KeyError: No such run (nothing is written).
        """
        step = check_nonnegative_int(step, "step")
        if not isinstance(missing, Mapping):
            raise TypeError(
                f"expected missing as a mapping metric -> reason, got "
                f"{type(missing).__name__}"
            )
        rows = [(run_id, step, str(m), str(r)) for m, r in missing.items()]
        if rows:
            self._insert(
                run_id,
                "INSERT OR REPLACE INTO missing (run, step, metric, reason) "
                "VALUES (?, ?, ?, ?)",
                rows,
            )

    def missing(self, run_id: str) -> list[tuple[int, str, str]]:
        """``(step, metric, reason)`` of the metrics a run could not compute."""
        return self._read(
            "SELECT step, metric, reason FROM missing WHERE run = ? "
            "ORDER BY step, metric",
            (run_id,),
        )

    def scalars(
        self, run_id: str, metric: str, layer: str | None = None
    ) -> list[tuple[int, str, float]]:
        """``(step, layer, value)`` rows of one run and metric, by step then layer.

        Args:
            run_id: The run.
            metric: A metric (``"delta_h"``, ``"ntk/rel_change"``) or a per-layer
                record name (``"delta_h/hidden.0"``: that layer only); rows stored
                under the metric's old name are included.
            layer: Only this layer.

        Returns:
            The rows.
        """
        metric, named = R.columns(metric)
        layer = named or layer
        stored = R.stored_metrics(metric)
        sql = (
            "SELECT step, layer, value FROM scalars WHERE run = ? AND metric IN "
            f"({','.join('?' * len(stored))})"
        )
        args: tuple = (run_id, *stored)
        if layer is not None:
            sql, args = sql + " AND layer = ?", args + (layer,)
        rows = self._read(sql + " ORDER BY step, layer", args)
        return [(s, la, math.nan if v is None else v) for s, la, v in rows]

    def count(self, run_id: str | None = None) -> int:
        """Number of scalar rows in the store, or of one run."""
        if run_id is None:
            return int(self._read("SELECT COUNT(*) FROM scalars")[0][0])
        return int(
            self._read("SELECT COUNT(*) FROM scalars WHERE run = ?", (run_id,))[0][0]
        )

    def query(
        self,
        metric: str | Iterable[str] | None = None,
        *,
        run: str | Iterable[str] | None = None,
        config: bool = True,
    ) -> Any:
        """Scalar records as a pandas DataFrame (pandas is imported lazily).

        Args:
            metric: A metric name or several (default all); rows stored under a
                metric's old name are included.
            run: A run id or several (default all).
            config: Add one column per top-level config key (and ``seed``, ``status``).

        Returns:
            ``DataFrame`` with columns ``run, step, metric, layer, value`` (+ config),
            metrics under their current names (:mod:`rdiag.records`).
        """
        pd = require("pandas", "Store.query")
        where, args = [], []
        if metric is not None:
            metric = [metric] if isinstance(metric, str) else list(metric)
            metric = [old for m in metric for old in R.stored_metrics(R.columns(m)[0])]
        for col, val in (("metric", metric), ("run", run)):
            if val is None:
                continue
            vals = [val] if isinstance(val, str) else list(val)
            where.append(f"s.{col} IN ({','.join('?' * len(vals))})")
            args.extend(vals)
        sql = (
            "SELECT s.run, s.step, s.metric, s.layer, s.value, r.config, r.status "
            "FROM scalars s JOIN runs r ON r.id = s.run"
        )
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._read(sql + " ORDER BY s.run, s.step, s.metric, s.layer", args)
        frame = pd.DataFrame(
            rows,
            columns=["run", "step", "metric", "layer", "value", "config", "status"],
        )
        frame["value"] = frame["value"].astype(float)  # NULL (a stored NaN) -> NaN
        frame["metric"] = frame["metric"].map(R.current_metric)
        if config and len(frame):
            cfg = pd.DataFrame(
                [current_names(json.loads(c)) for c in frame["config"]],
                index=frame.index,
            )
            cfg = cfg[[c for c in cfg.columns if c not in frame.columns]]
            cfg = cfg.apply(
                lambda col: col.map(
                    lambda v: json.dumps(v) if isinstance(v, (dict, list)) else v
                )
            )
            frame = pd.concat([frame, cfg], axis=1)
        return frame.drop(columns=["config"])

    # ---- arrays ------------------------------------------------------------------
    def save_array(self, run_id: str, step: int, name: str, array: Any) -> Path:
        """Write an array snapshot as ``.npy`` with its sha256 recorded in the database.

        The file is written to a temporary name and renamed into place, then its row
        is committed, so a kill leaves either the old snapshot or the new one.

        Args:
            run_id: The run.
            step: Training step (an int >= 0).
            name: Snapshot name (``[A-Za-z0-9_.-]``, not starting with ``.``), e.g.
                ``"ntk"``.
            array: Tensor or array-like.

        Returns:
            Path of the file.

        Raises:
            ValueError: A run id, name or step that could name a path outside the
                store.
            KeyError: No such run (nothing is written).
            StoreFullError: The disk is full; StoreReadOnlyError: the store cannot
                be written (the previous snapshot, if any, is kept).
        """
        check_file_name(run_id, "run_id")
        check_file_name(name, "array name")
        step = check_nonnegative_int(step, "step")
        if self.status(run_id) is None:
            raise self._no_run(run_id)
        arr = (
            array.detach().cpu().numpy()
            if isinstance(array, torch.Tensor)
            else np.asarray(array)
        )
        if arr.dtype.kind not in "biufc":
            raise TypeError(
                f"expected a numeric array or tensor for snapshot {name!r}, got "
                f"dtype {arr.dtype}"
            )
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        path = self.root / "arrays" / run_id / f"{name}-{step}.npy"
        self._write_file(path, buf.getvalue())
        self._insert(
            run_id,
            "INSERT OR REPLACE INTO arrays (run, step, name, path, sha256, shape, dtype) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    run_id,
                    step,
                    name,
                    str(path.relative_to(self.root)),
                    hashlib.sha256(buf.getvalue()).hexdigest(),
                    json.dumps(list(arr.shape)),
                    str(arr.dtype),
                )
            ],
        )
        return path

    def _write_file(self, path: Path, data: bytes) -> None:
        """Write ``path`` atomically (a temporary file renamed into place)."""
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as err:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise store_error(self, err) from err

    def array_steps(self, run_id: str, name: str) -> list[int]:
        """Steps at which snapshot ``name`` of the run was saved."""
        rows = self._read(
            "SELECT step FROM arrays WHERE run = ? AND name = ? ORDER BY step",
            (run_id, name),
        )
        return [r[0] for r in rows]

    def load_array(self, run_id: str, step: int, name: str) -> np.ndarray:
        """Read a snapshot back, verifying its sha256.

        Returns:
            The array.

        Raises:
            KeyError: No such snapshot.
            StoreCorruptError: The file is missing or its checksum does not match.
        """
        rows = self._read(
            "SELECT path, sha256 FROM arrays WHERE run = ? AND step = ? AND name = ?",
            (run_id, int(step), name),
        )
        if not rows:
            raise KeyError(
                f"no array {name!r} at step {step} of run {run_id!r} in {self.root}"
            )
        path = self.root / rows[0][0]
        if not path.is_file():
            raise StoreCorruptError(
                f"the array file {path} recorded in {self.db_path} is missing; restore it "
                "from a backup or re-run the run (its database rows are intact)"
            )
        digest = _sha256(path)
        if digest != rows[0][1]:
            raise StoreCorruptError(
                f"the array file {path} fails its checksum (sha256 {digest[:12]}..., "
                f"recorded {rows[0][1][:12]}...); it was modified or truncated after it "
                "was written; rdiag left it untouched: restore it or re-run the run"
            )
        return np.load(path, allow_pickle=False)

    def close(self) -> None:
        """Close this process's connection (reopened on next use)."""
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None
