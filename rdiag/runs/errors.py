"""The store's errors: one class per cause, each message with its remedy.

A failed SQLite call or file write becomes the :class:`StoreError` subclass of
its cause (:func:`store_error`): SQLite's primary result code (from the error,
or from its message on Python 3.10), or the ``errno`` of an ``OSError``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

DB_NAME = "rdiag.sqlite"

# Primary SQLite result codes (sqlite3.h) that the store tells apart.
BUSY, LOCKED, _READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = (
    5,
    6,
    8,
    10,
    11,
    13,
    14,
    26,
)
# Python 3.10's sqlite3 errors carry no code: read it from SQLite's message.
_MESSAGES = {
    "locked": LOCKED,
    "busy": BUSY,
    "readonly": _READONLY,
    "disk i/o": _IOERR,
    "malformed": _CORRUPT,
    "is full": _FULL,
    "unable to open": _CANTOPEN,
    "not a database": _NOTADB,
}
_OS_CODES = {
    getattr(errno, name): code
    for name, code in (
        ("ENOSPC", _FULL),
        ("EDQUOT", _FULL),
        ("EFBIG", _FULL),
        ("EROFS", _READONLY),
        ("EACCES", _READONLY),
        ("EPERM", _READONLY),
    )
    if hasattr(errno, name)  # EDQUOT is not on every system
}


class StoreError(RuntimeError):
    """Base class of store errors."""


class StoreLockedError(StoreError):
    """Another process held the database lock for longer than the timeout."""


class StoreCorruptError(StoreError):
    """The database is damaged, or an array file is missing or fails its checksum."""


class StoreFullError(StoreError):
    """The disk holding the store is full (the write in flight was rolled back)."""


class StoreReadOnlyError(StoreError):
    """The store's directory or database files cannot be written."""


class StoreNotADatabaseError(StoreError):
    """The database path holds a directory or a file that is not SQLite."""


def sqlite_code(err: sqlite3.Error) -> int | None:
    """The primary SQLite result code of ``err`` (None if SQLite gave none)."""
    code = getattr(err, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF  # an extended code carries the primary one in its low byte
    msg = str(err).lower()
    return next((c for text, c in _MESSAGES.items() if text in msg), None)


def store_error(store: Any, err: sqlite3.Error | OSError) -> Exception:
    """The store error of a failed SQLite call or file write, by its cause."""
    if isinstance(err, (sqlite3.IntegrityError, sqlite3.InterfaceError)) or (
        isinstance(err, sqlite3.ProgrammingError)
    ):
        return err  # a misuse of SQLite (a bug), not a state of the store
    code = _OS_CODES.get(err.errno) if isinstance(err, OSError) else sqlite_code(err)
    if code == _CANTOPEN and store.db_path.is_dir():
        code = _NOTADB
    elif code == _CANTOPEN and store.unwritable():
        code = _READONLY
    build = {
        BUSY: _locked_error,
        LOCKED: _locked_error,
        _FULL: _full_error,
        _READONLY: _read_only_error,
        _NOTADB: _not_a_database_error,
        _CORRUPT: _corrupt_error,
    }.get(code)
    if build is not None:
        return build(store, err)
    return StoreError(
        f"the store {store.root} failed ({err}); if the disk is full, failing or a "
        "network mount, fix that and rerun the same command to resume"
    )


def _locked_error(store: Any, err: Exception) -> StoreError:
    return StoreLockedError(
        f"the store database {store.db_path} stayed locked by another process for "
        f"{store.timeout:.0f} s; wait for the other writer to finish or pass a "
        "larger timeout (Store(root, timeout=...)); nothing was written for this "
        "record and existing data is intact"
    )


def _full_error(store: Any, err: Exception) -> StoreError:
    return StoreFullError(
        f"{_limit(store, err)} ({err}); the write in progress was rolled back and "
        "everything written before is intact; free some space or raise that limit "
        "(or write to another --out directory) and rerun the same command to resume"
    )


def _limit(store: Any, err: Exception) -> str:
    """Which limit a write ran into: the disk, a quota, a file size, SQLite's."""
    number = getattr(err, "errno", None)
    if number == getattr(errno, "EDQUOT", None):
        return f"the disk quota of the store {store.root} is used up"
    if number == errno.EFBIG:
        return (
            f"a file of the store {store.root} reached the file size limit (ulimit -f)"
        )
    try:
        stat = os.statvfs(store.root)
        free = stat.f_bavail * stat.f_frsize
    except OSError:
        free = None
    if free is None or free < 1 << 20 or isinstance(err, OSError):
        left = "" if free is None else f", {free} bytes left"
        return f"the disk holding the store {store.root} is full{left}"
    with contextlib.suppress(sqlite3.Error):
        conn = store._connection()
        pages = conn.execute("PRAGMA max_page_count").fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        return (
            f"the store database {store.db_path} reached a size limit with {free} "
            f"bytes free on its disk: SQLite's max_page_count ({pages} pages of "
            f"{size} bytes), a disk quota or the file size limit (ulimit -f)"
        )
    return f"the store database {store.db_path} reached a size limit"


def _read_only_error(store: Any, err: Exception) -> StoreError:
    return StoreReadOnlyError(
        f"the store {store.root} cannot be written ({store.unwritable() or err}); "
        f"its data is intact; make the directory and its {DB_NAME}* files "
        "writable, or copy the store to a writable directory and use that"
    )


def _not_a_database_error(store: Any, err: Exception) -> StoreError:
    what = "a directory" if store.db_path.is_dir() else "a file that is not SQLite"
    return StoreNotADatabaseError(
        f"expected {store.db_path} to be an rdiag store database, got {what}; "
        "rdiag has not modified it; move it away or use another --out directory"
    )


def _corrupt_error(store: Any, err: Exception) -> StoreError:
    return StoreCorruptError(
        f"the store database {store.db_path} is damaged ({err}); rdiag has not "
        "modified it; inspect it with `sqlite3 <file> 'PRAGMA integrity_check'`, "
        "restore it from a backup, or write to a new --out directory"
    )


def check_not_truncated(db_path: Path) -> None:
    """Refuse a zero-length database that is not being created right now.

    SQLite would take it as an empty database and write a new schema into it;
    a store that lost its content (a copy cut short, a disk error) is named
    instead. A file younger than a few seconds may be another process's store
    in the making.

    Raises:
        StoreCorruptError: The database file is empty and not new.
    """
    try:
        stat = db_path.stat()
    except OSError:
        return
    if stat.st_size == 0 and time.time() - stat.st_mtime > 5.0:
        raise StoreCorruptError(
            f"the store database {db_path} is empty (0 bytes): a store whose "
            "content was lost (a copy cut short, a disk error); restore it from a "
            "backup, or remove the file to start a new store there"
        )
