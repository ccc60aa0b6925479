"""One writer per store: runs on other machines send their records to it.

On a cluster the store's directory is on the driver's disk (SQLite over NFS is
unsafe, and the path does not exist elsewhere). A :class:`StoreWriter` owns the
:class:`~rdiag.runs.store.Store` in one process on that machine and executes, one at a
time, the calls that runs send it. A run holds a :class:`RemoteStore` instead of
the store: the methods :func:`rdiag.runs.training.train` and the
:class:`~rdiag.monitor.Monitor` call (create the run, claim it, write a check's
records in one transaction, save arrays, set the status), each forwarded as one
call and answered before the run goes on. So a check's records are durable when
the next step starts, and a run whose process dies loses only the check in
flight; its rerun writes the same keys, which replace rows and never duplicate
them. Claims are the writer's: a retried run is the writer's again, and a second
sweep on the same store (another writer) does not run it at the same time.

The transport is any picklable callable ``call(method, args, kwargs)`` that gets
the writer's answer (:class:`rdiag.runs.ray_executor.RayExecutor` uses a Ray actor).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rdiag.runs.store import Store, StoreError, _live, _this_process

#: ``(pid, host, start time)`` of this process, as :meth:`Store.claim` records it.
this_process = _this_process

#: The store methods a run may call through a :class:`RemoteStore`.
METHODS = (
    "create_run",
    "status",
    "reason",
    "claim",
    "claim_holder",
    "release",
    "set_status",
    "log",
    "log_rows",
    "log_missing",
    "save_array",
)
Call = Callable[[str, tuple, dict], Any]


class StoreWriter:
    """The one process that writes a store: executes :data:`METHODS` calls in order.

    Args:
        root: The store's directory, on this machine's disk.
        owner: ``(pid, host, start time)`` of the process the writer works for
            (:func:`this_process` of a sweep's driver): once that process is
            gone every call is refused, so no run writes after its sweep died.
            None: no owner.
    """

    def __init__(
        self, root: str, owner: tuple[int, str, str | None] | None = None
    ) -> None:
        self.store = Store(root)
        self.owner = owner

    def call(self, method: str, args: tuple, kwargs: dict) -> Any:
        """``store.method(*args, **kwargs)``; its return value or its error.

        Raises:
            ValueError: ``method`` is not one of :data:`METHODS`.
            StoreError: The owner is gone (nothing is written).
        """
        if method not in METHODS:
            raise ValueError(
                f"expected a store method from {list(METHODS)}, got {method!r}"
            )
        if self.owner is not None and not _live(*self.owner, time.time()):
            raise StoreError(
                f"the sweep that owns the writer of {self.store.root} (pid "
                f"{self.owner[0]} on {self.owner[1]}) is gone; nothing more is written"
            )
        return getattr(self.store, method)(*args, **kwargs)


class RemoteStore:
    """What a run holds in place of a :class:`~rdiag.runs.store.Store`: calls to its writer.

    Picklable (the transport travels with it). Errors of the store (``KeyError``,
    :class:`~rdiag.runs.store.StoreError`, ...) come back as raised by the writer.

    Args:
        root: The store's directory on the writer's machine (reported, never
            opened here).
        call: The transport, ``call(method, args, kwargs) -> result``.
    """

    def __init__(self, root: str | Path, call: Call) -> None:
        self.root = Path(root)
        self._call = call

    def __repr__(self) -> str:
        return f"RemoteStore({str(self.root)!r})"

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method not in METHODS:
            raise AttributeError(
                f"a RemoteStore forwards only {list(METHODS)} to its writer, not "
                f"{method!r}; open the store on the writer's machine for the rest"
            )
        call = self.__dict__["_call"]
        return lambda *args, **kwargs: call(method, args, kwargs)

    def save_array(self, run_id: str, step: int, name: str, array: Any) -> Path:
        """Send an array snapshot to the writer (as numpy: the writer needs no GPU).

        Returns:
            The file's path on the writer's machine.
        """
        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
        return self._call("save_array", (run_id, step, name, np.asarray(array)), {})
