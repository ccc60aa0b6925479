"""Sweeps on Ray: one task per run, its records streamed to one writer on the driver.

:class:`RayExecutor` runs each configuration of :func:`rdiag.runs.sweep.sweep`
as a Ray task with the resources it asks for (CPUs per run; GPUs for runs on
``device: cuda``; the sweep config's ``resources`` override both). The store
stays on the driver's disk: a :class:`~rdiag.runs.writer.StoreWriter` actor pinned
to the driver's node owns it, and every run writes through a
:class:`~rdiag.runs.writer.RemoteStore` (one call per check), so no node other than
the driver's ever opens the SQLite file. A task whose worker dies is retried by
Ray (``max_retries``); the rerun finds the run unfinished in the store, restarts
it from step 0 (same seeds, same records) and its rows replace the partial
ones. Re-running the sweep skips finished runs (the driver asks the store
before submitting). Ray is imported when an executor is built, never before.

Faults: a cluster address that does not answer is refused within
:data:`CONNECT_SECONDS`, naming the address (Ray itself retries for minutes).
The writer works for the driver's process and refuses every write once that
process is gone, so a killed driver gets no late rows; where this executor
started Ray itself, a small reaper process kills the local Ray processes the
driver started once it dies (Ray's agents and workers otherwise live on for a
minute). A cluster given by an address is never shut down by rdiag.
"""

from __future__ import annotations

import concurrent.futures as cf
import inspect
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from rdiag._optional import require
from rdiag.runs.writer import RemoteStore, StoreWriter, this_process

#: Seconds within which a cluster address must accept a connection.
CONNECT_SECONDS = 10.0


def run_task(
    run: Callable[..., Any], config: dict[str, Any], store: RemoteStore, threads: int
) -> Any:
    """One sweep run inside a Ray worker: ``run(config, store=store)``, ``threads`` torch threads."""
    torch.set_num_threads(max(1, int(threads)))
    return run(config, store=store)


def check_address(address: str | None, seconds: float = CONNECT_SECONDS) -> None:
    """Refuse a cluster address that accepts no connection within ``seconds``.

    ``None``, ``"auto"`` and ``"local"`` are Ray's to resolve; ``HOST:PORT`` and
    ``ray://HOST:PORT`` are tried with TCP (refused connections retried until
    the deadline: a head node that is starting up).

    Raises:
        ValueError: An address that is not ``HOST:PORT``.
        ConnectionError: Nothing answers at the address (named) within ``seconds``.
    """
    if address is None or address in ("auto", "local"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not (sep and host and port.isdigit()):
        raise ValueError(
            f"expected a Ray address HOST:PORT, ray://HOST:PORT, auto or local, got "
            f"{address!r}"
        )
    deadline = time.monotonic() + seconds
    while True:
        left = max(deadline - time.monotonic(), 0.1)
        try:
            with socket.create_connection((host.strip("[]"), int(port)), left):
                return
        except OSError as err:
            if time.monotonic() + 0.5 >= deadline:
                raise ConnectionError(
                    f"the Ray cluster at {address} does not answer ({err}) after "
                    f"{seconds:g} s; start it (ray start --head) or pass the address "
                    "that `ray status` on its head node shows"
                ) from err
            time.sleep(0.5)


def _reap(driver: int, start: str, interval: float = 0.2) -> None:
    """Kill the driver's descendants once the driver is gone (run in its own process).

    Self-contained (its source is what the reaper process runs): the
    descendants, seen every ``interval`` seconds while the driver lives, and
    theirs at its death, are sent SIGKILL where the same process (pid and start
    time) still runs.
    """
    import os
    import signal
    import time
    from pathlib import Path

    def started(pid: int) -> str | None:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            state, *rest = stat.rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return None if state in ("Z", "X") else rest[18]

    def children(pid: int) -> list[int]:
        kids: list[int] = []
        for path in Path(f"/proc/{pid}/task").glob("*/children"):
            try:
                kids += [int(k) for k in path.read_text().split()]
            except OSError:
                pass
        return kids

    def tree(roots: list[int]) -> list[int]:
        todo, found = list(roots), []
        while todo:
            kids = [k for k in children(todo.pop()) if k != os.getpid()]
            found += kids
            todo += kids
        return found

    seen: dict[int, str | None] = {}
    while started(driver) == start:
        for pid in tree([driver]):
            seen.setdefault(pid, started(pid))
        time.sleep(interval)
    for pid in tree(list(seen)):
        seen.setdefault(pid, started(pid))
    for pid, when in seen.items():
        if when is not None and started(pid) == when:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _exit_on_sigterm() -> Any:
    """Make SIGTERM end this process as Python's ``SystemExit(143)`` (128 + 15).

    Ray's core worker installs a native handler that dumps the stack and exits
    15; this one unwinds instead (the sweep's ``finally`` shuts Ray down, runs
    stay resumable) and exits with the conventional status. Main thread only.

    Returns:
        The handler it replaced (None off the main thread: nothing replaced).
    """
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminate(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, terminate)


def _start_reaper() -> subprocess.Popen | None:
    """The reaper of this driver's Ray processes (Linux, where ``/proc`` lists them)."""
    pid, _, start = this_process()
    if start is None or not Path(f"/proc/{pid}/task").is_dir():
        return None
    code = f"{inspect.getsource(_reap)}\n_reap({pid}, {start!r})\n"
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # outside the driver's process group (its signals)
    )


class _ActorCall:
    """The transport of a :class:`RemoteStore`: one blocking call of the writer actor."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def __call__(self, method: str, args: tuple, kwargs: dict) -> Any:
        import ray

        return ray.get(self.actor.call.remote(method, args, kwargs))


class RayExecutor:
    """Runs calls, or a sweep's runs, as Ray tasks (``pip install 'rdiag[ray]'``).

    Args:
        address: The cluster to connect to when Ray is not initialized yet
            (``"auto"``: the one this node belongs to; ``None``: Ray's default,
            a local instance unless one was started with ``ray start``). A
            runtime this executor starts is shut down by :meth:`shutdown`.
            A ``HOST:PORT`` must answer within :data:`CONNECT_SECONDS`.
        num_cpus: CPUs each run requests (and torch threads it uses).
        num_gpus: GPUs each run requests; default 1 for a run on ``device:
            cuda`` and 0 otherwise (a ``device: auto`` run then runs on the CPU).
        max_retries: How often Ray retries a run whose worker died.
        **options: Other ``ray.remote`` options of every task (``resources=``,
            ``memory=``, ...).

    Raises:
        ImportError: Ray is not installed.
        ConnectionError: Nothing answers at ``address`` (named).
    """

    def __init__(
        self,
        *,
        address: str | None = None,
        num_cpus: float = 1,
        num_gpus: float | None = None,
        max_retries: int = 3,
        **options: Any,
    ) -> None:
        self._ray = require("ray", "RayExecutor")
        self._started = not self._ray.is_initialized()
        self._reaper: subprocess.Popen | None = None
        self._sigterm: Any = None  # the SIGTERM handler before Ray's, to restore
        if self._started:
            check_address(address)
            # Before Ray starts its processes, so that it sees every one of them.
            self._reaper = _start_reaper()
            try:
                self._ray.init(address=address)
            except BaseException:
                self._stop_reaper()
                raise
            self._sigterm = _exit_on_sigterm()
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.max_retries = max_retries
        self._options = options
        self._task = self._ray.remote(run_task)
        self._writers: dict[str, Any] = {}

    # ---- generic calls ------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        """Launch ``fn(*args, **kwargs)`` as a Ray task; a ``concurrent.futures`` future."""
        remote = self._ray.remote(fn).options(
            num_cpus=self.num_cpus, max_retries=self.max_retries, **self._options
        )
        return remote.remote(*args, **kwargs).future()

    # ---- sweep runs ---------------------------------------------------------------
    def resources(self, config: Mapping[str, Any]) -> dict[str, float]:
        """``{"num_cpus", "num_gpus"}`` that the run of ``config`` requests."""
        gpus = self.num_gpus
        if gpus is None:
            gpus = 1 if config.get("device") == "cuda" else 0
        return {"num_cpus": self.num_cpus, "num_gpus": gpus}

    def store(self, root: str | Path) -> RemoteStore:
        """The store runs write to: the writer of ``root`` (started on this node once)."""
        key = str(Path(root).resolve())
        if key not in self._writers:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            here = self._ray.get_runtime_context().get_node_id()
            self._writers[key] = (
                self._ray.remote(StoreWriter)
                .options(
                    num_cpus=0,
                    max_restarts=3,
                    max_task_retries=3,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(
                        here, soft=False
                    ),
                )
                .remote(key, owner=this_process())
            )
        return RemoteStore(key, _ActorCall(self._writers[key]))

    def submit_run(
        self, run: Callable[..., Any], config: dict[str, Any], root: str | Path
    ) -> cf.Future:
        """Launch one sweep run as a task writing through the writer of ``root``.

        Args:
            run: What executes the run, ``run(config, store=RemoteStore)``: the
                sweep passes :func:`rdiag.runs.training.train` (this module never
                imports the training, which is what keeps the two apart).
            config: The run's config fields.
            root: The store's root on this machine.

        Returns:
            A future of ``run``'s result (a :class:`~rdiag.runs.training.TrainResult`).
        """
        needs = self.resources(config)
        task = self._task.options(
            **needs, max_retries=self.max_retries, **self._options
        )
        return task.remote(run, config, self.store(root), needs["num_cpus"]).future()

    def shutdown(self, wait: bool = True) -> None:
        """End the writers (the runs are done), and Ray if this executor started it."""
        for actor in self._writers.values():
            self._ray.kill(actor)
        self._writers.clear()
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
        self._stop_reaper()
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None

    def _stop_reaper(self) -> None:
        if self._reaper is not None:
            self._reaper.kill()
            self._reaper.wait()
            self._reaper = None
