"""Run store: SQLite (WAL) for runs and scalar records, checksummed ``.npy`` arrays.

Layout of a store directory::

    <root>/rdiag.sqlite          runs, scalars, arrays tables (WAL journal)
    <root>/arrays/<run>/<name>-<step>.npy

Guarantees:

* Every :meth:`Store.log` / :meth:`Store.save_array` call is one transaction, so a
  process killed mid-run loses at most the record in flight.
* ``scalars`` has ``UNIQUE(run, step, metric, layer)`` and arrays
  ``UNIQUE(run, step, name)``: writing a key again replaces the value (a resumed
  run recomputes the same step), so rows are never duplicated.
* Several processes may write at once: SQLite's ``busy_timeout`` plus a retry
  loop with back-off; after ``timeout`` seconds a :class:`StoreLockedError` names
  the file. Nothing is deleted or overwritten on any error path; a corrupt
  database or an array whose checksum does not match raises
  :class:`StoreCorruptError` naming the file, and leaves it as it is.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import sqlite3
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rdiag._optional import require

DB_NAME = "rdiag.sqlite"
STATUSES = ("running", "finished", "failed")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, config TEXT NOT NULL, versions TEXT NOT NULL,
    device TEXT, seed INTEGER, status TEXT NOT NULL, created REAL, updated REAL);
CREATE TABLE IF NOT EXISTS scalars (
    run TEXT NOT NULL, step INTEGER NOT NULL, metric TEXT NOT NULL,
    layer TEXT NOT NULL DEFAULT '', value REAL,
    UNIQUE(run, step, metric, layer));
CREATE TABLE IF NOT EXISTS arrays (
    run TEXT NOT NULL, step INTEGER NOT NULL, name TEXT NOT NULL, path TEXT NOT NULL,
    sha256 TEXT NOT NULL, shape TEXT NOT NULL, dtype TEXT NOT NULL,
    UNIQUE(run, step, name));
"""
Records = Mapping[str | tuple[str, str], float]


class StoreError(RuntimeError):
    """Base class of store errors."""


class StoreLockedError(StoreError):
    """Another process held the database lock for longer than the timeout."""


class StoreCorruptError(StoreError):
    """The database file or an array file is unreadable or fails its checksum."""


def run_key(config: Mapping[str, Any]) -> str:
    """Deterministic run id of a configuration: a 16-hex sha256 of its sorted JSON."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def versions() -> dict[str, str]:
    """Versions recorded with every run (python, torch, numpy, rdiag)."""
    from rdiag._version import __version__

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
        StoreCorruptError: ``root/rdiag.sqlite`` exists but is not a readable
            SQLite database.

    Example:
        >>> import tempfile
        >>> store = Store(tempfile.mkdtemp())
        >>> rid = store.create_run({"width": 64}, seed=0)
        >>> store.log(rid, 0, {"loss": 1.5, ("delta_h", "layer1"): 0.1})
        >>> store.scalars(rid, "loss")
        [(0, '', 1.5)]
    """

    def __init__(self, root: str | os.PathLike, *, timeout: float = 60.0) -> None:
        self.root = Path(root)
        self.timeout = float(timeout)
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(
                f"expected a directory for the store, got the file {self.root}; "
                "pass a directory path (it is created if missing)"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / DB_NAME
        self._conn: sqlite3.Connection | None = None
        self._pid: int | None = None
        self._execute(_SCHEMA, script=True)

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "timeout": self.timeout}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], timeout=state["timeout"])

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # ---- connection and retries -----------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            try:
                conn = sqlite3.connect(
                    self.db_path, timeout=min(self.timeout, 5.0), isolation_level=None
                )
                conn.execute(
                    f"PRAGMA busy_timeout={int(min(self.timeout, 5.0) * 1000)}"
                )
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.DatabaseError as err:
                self._raise(err)
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _raise(self, err: sqlite3.Error) -> None:
        msg = str(err).lower()
        if "locked" in msg or "busy" in msg:
            raise StoreLockedError(
                f"the store database {self.db_path} stayed locked by another process for "
                f"{self.timeout:.0f} s; wait for the other writer to finish or pass a "
                "larger timeout (Store(root, timeout=...)); nothing was written for this "
                "record and existing data is intact"
            ) from err
        if isinstance(err, sqlite3.DatabaseError) and not isinstance(
            err, (sqlite3.IntegrityError, sqlite3.ProgrammingError)
        ):
            raise StoreCorruptError(
                f"the store database {self.db_path} is unreadable ({err}); rdiag has not "
                "modified it; restore it from a backup, inspect it with "
                "`sqlite3 <file> 'PRAGMA integrity_check'`, or write to a new --out "
                "directory"
            ) from err
        raise err

    def _execute(
        self,
        sql: str,
        params: Iterable[Any] | Iterable[Iterable[Any]] = (),
        *,
        script: bool = False,
        many: bool = False,
        fetch: bool = False,
    ) -> list[tuple]:
        deadline = time.monotonic() + self.timeout
        delay = 0.01
        while True:
            try:
                conn = self._connection()
                if script:
                    conn.executescript(sql)
                    return []
                if fetch:
                    return conn.execute(sql, tuple(params)).fetchall()
                conn.execute("BEGIN IMMEDIATE")
                try:
                    if many:
                        conn.executemany(sql, params)
                    else:
                        conn.execute(sql, tuple(params))
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                return []
            except sqlite3.OperationalError as err:
                msg = str(err).lower()
                if ("locked" in msg or "busy" in msg) and time.monotonic() < deadline:
                    time.sleep(delay)
                    delay = min(delay * 2, 0.5)
                    continue
                self._raise(err)
            except sqlite3.DatabaseError as err:
                self._raise(err)

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
            run_id: Explicit id; default :func:`run_key` of ``config``, so the same
                configuration maps to the same run (what makes sweeps resumable).
            seed: Seed, stored in its own column.
            device: Device description, e.g. ``"cpu"``.

        Returns:
            The run id. An existing run keeps its records; its status becomes
            ``running`` again unless it had ``finished``.
        """
        rid = run_id or run_key(config)
        now = time.time()
        self._execute(
            "INSERT INTO runs (id, config, versions, device, seed, status, created, updated) "
            "VALUES (?, ?, ?, ?, ?, 'running', ?, ?) ON CONFLICT(id) DO UPDATE SET "
            "status = CASE WHEN status = 'finished' THEN status ELSE 'running' END, "
            "updated = excluded.updated",
            (
                rid,
                json.dumps(dict(config), sort_keys=True, default=str),
                json.dumps(versions()),
                device,
                seed,
                now,
                now,
            ),
        )
        return rid

    def set_status(self, run_id: str, status: str) -> None:
        """Set a run's status: ``"running"``, ``"finished"`` or ``"failed"``.

        Raises:
            ValueError: Another status.
        """
        if status not in STATUSES:
            raise ValueError(f"expected status in {list(STATUSES)}, got {status!r}")
        self._execute(
            "UPDATE runs SET status = ?, updated = ? WHERE id = ?",
            (status, time.time(), run_id),
        )

    def status(self, run_id: str) -> str | None:
        """The run's status, or ``None`` if the store has no such run."""
        rows = self._execute(
            "SELECT status FROM runs WHERE id = ?", (run_id,), fetch=True
        )
        return rows[0][0] if rows else None

    def config(self, run_id: str) -> dict[str, Any]:
        """The configuration a run was created with.

        Returns:
            The config dict.

        Raises:
            KeyError: No such run.
        """
        rows = self._execute(
            "SELECT config FROM runs WHERE id = ?", (run_id,), fetch=True
        )
        if not rows:
            raise KeyError(f"no run {run_id!r} in the store {self.db_path}")
        return json.loads(rows[0][0])

    def run_ids(self, status: str | None = None) -> list[str]:
        """Ids of the runs, optionally only those with ``status``, in creation order."""
        if status is None:
            rows = self._execute("SELECT id FROM runs ORDER BY created, id", fetch=True)
        else:
            rows = self._execute(
                "SELECT id FROM runs WHERE status = ? ORDER BY created, id",
                (status,),
                fetch=True,
            )
        return [r[0] for r in rows]

    # ---- scalars -----------------------------------------------------------------
    def log(self, run_id: str, step: int, records: Records) -> None:
        """Write scalar records of one step in one transaction.

        Args:
            run_id: The run.
            step: Training step.
            records: ``metric -> value`` or ``(metric, layer) -> value``; an existing
                ``(run, step, metric, layer)`` is replaced, never duplicated.
        """
        rows = []
        for key, value in records.items():
            metric, layer = (key, "") if isinstance(key, str) else key
            rows.append((int(step), metric, layer, value))
        self.log_rows(run_id, rows)

    def log_rows(
        self, run_id: str, rows: Iterable[tuple[int, str, str, float]]
    ) -> None:
        """Write ``(step, metric, layer, value)`` rows of several steps in one transaction.

        Args:
            run_id: The run.
            rows: Rows; ``layer`` ``""`` or ``None`` for model-level metrics.
        """
        rows = [(run_id, int(s), m, layer or "", float(v)) for s, m, layer, v in rows]
        if rows:
            self._execute(
                "INSERT OR REPLACE INTO scalars (run, step, metric, layer, value) "
                "VALUES (?, ?, ?, ?, ?)",
                rows,
                many=True,
            )

    def scalars(
        self, run_id: str, metric: str, layer: str | None = None
    ) -> list[tuple[int, str, float]]:
        """``(step, layer, value)`` rows of one run and metric, by step then layer."""
        sql = "SELECT step, layer, value FROM scalars WHERE run = ? AND metric = ?"
        args: tuple = (run_id, metric)
        if layer is not None:
            sql, args = sql + " AND layer = ?", args + (layer,)
        return self._execute(sql + " ORDER BY step, layer", args, fetch=True)

    def count(self, run_id: str | None = None) -> int:
        """Number of scalar rows in the store, or of one run."""
        if run_id is None:
            return int(self._execute("SELECT COUNT(*) FROM scalars", fetch=True)[0][0])
        rows = self._execute(
            "SELECT COUNT(*) FROM scalars WHERE run = ?", (run_id,), fetch=True
        )
        return int(rows[0][0])

    def query(
        self,
        metric: str | Iterable[str] | None = None,
        *,
        run: str | Iterable[str] | None = None,
        config: bool = True,
    ) -> Any:
        """Scalar records as a pandas DataFrame (pandas is imported lazily).

        Args:
            metric: A metric name or several (default all).
            run: A run id or several (default all).
            config: Add one column per top-level config key (and ``seed``, ``status``).

        Returns:
            ``DataFrame`` with columns ``run, step, metric, layer, value`` (+ config).
        """
        pd = require("pandas", "Store.query")
        where, args = [], []
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
        rows = self._execute(
            sql + " ORDER BY s.run, s.step, s.metric, s.layer", args, fetch=True
        )
        frame = pd.DataFrame(
            rows,
            columns=["run", "step", "metric", "layer", "value", "config", "status"],
        )
        if config and len(frame):
            cfg = pd.DataFrame(
                [json.loads(c) for c in frame["config"]], index=frame.index
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
            step: Training step.
            name: Snapshot name (``[A-Za-z0-9_.-]``), e.g. ``"ntk"``.
            array: Tensor or array-like.

        Returns:
            Path of the file.

        Raises:
            ValueError: A name with other characters.
        """
        if not name or not all(c.isalnum() or c in "_.-" for c in name):
            raise ValueError(
                f"expected an array name of letters, digits, '_.-', got {name!r}"
            )
        arr = (
            array.detach().cpu().numpy()
            if isinstance(array, torch.Tensor)
            else np.asarray(array)
        )
        folder = self.root / "arrays" / run_id
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}-{int(step)}.npy"
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)
        digest = hashlib.sha256(buf.getvalue()).hexdigest()
        self._execute(
            "INSERT OR REPLACE INTO arrays (run, step, name, path, sha256, shape, dtype) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                run_id,
                int(step),
                name,
                str(path.relative_to(self.root)),
                digest,
                json.dumps(list(arr.shape)),
                str(arr.dtype),
            ),
        )
        return path

    def array_steps(self, run_id: str, name: str) -> list[int]:
        """Steps at which snapshot ``name`` of the run was saved."""
        rows = self._execute(
            "SELECT step FROM arrays WHERE run = ? AND name = ? ORDER BY step",
            (run_id, name),
            fetch=True,
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
        rows = self._execute(
            "SELECT path, sha256 FROM arrays WHERE run = ? AND step = ? AND name = ?",
            (run_id, int(step), name),
            fetch=True,
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
