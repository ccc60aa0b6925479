"""How a sweep's runs execute: the :class:`Executor` protocol and local pools.

:class:`SerialExecutor` runs each call at once in this process;
:func:`process_executor` is a spawn-based pool whose workers die with the sweep
(one torch thread each). The Ray executor is :mod:`rdiag.runs.ray_executor`.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Executor(Protocol):
    """What :func:`sweep` needs from an executor (``concurrent.futures`` style).

    ``ProcessPoolExecutor``, ``ThreadPoolExecutor``, :class:`SerialExecutor` and
    :class:`~rdiag.runs.ray_executor.RayExecutor` (futures from ``ObjectRef.future()``)
    qualify. An executor that also has ``submit_run(run, config, root)`` is given each
    run that way, and decides itself how the run reaches the store (the Ray one:
    through a writer on the driver).
    """

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        """Schedule ``fn(*args, **kwargs)``; return its future."""
        ...

    def shutdown(self, wait: bool = True) -> None:
        """Release the workers (after the running calls when ``wait``)."""
        ...


class SerialExecutor:
    """Runs each submitted call immediately in this process (debugging, tests)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        """Call ``fn`` now; return a completed future."""
        future: cf.Future = cf.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as err:  # noqa: BLE001 - surfaced by future.result(), as in a pool
            future.set_exception(err)
        return future

    def shutdown(self, wait: bool = True) -> None:
        """Nothing to release."""


def _worker_init(parent: int) -> None:
    torch.set_num_threads(1)
    _die_with_parent(parent)


def _die_with_parent(parent: int) -> None:
    """End this worker process when the sweep process ``parent`` dies (kill -9 too).

    On Linux the kernel kills the worker when its parent thread exits
    (``prctl(PR_SET_PDEATHSIG, SIGKILL)``; the pool spawns workers from the thread
    that submits, which lives until the sweep has shut the pool down); elsewhere a
    daemon thread polls ``os.getppid()``.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) == 0:
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(1)
            return
    threading.Thread(
        target=_watch_parent, args=(parent,), daemon=True, name="rdiag-watch-parent"
    ).start()


def _watch_parent(parent: int, interval: float = 0.5) -> None:
    """Poll until the parent process is gone, then end this process."""
    while os.getppid() == parent:
        time.sleep(interval)
    os._exit(1)


def process_executor(workers: int) -> cf.ProcessPoolExecutor:
    """A spawn-based process pool with one torch thread per worker.

    The workers die with the calling process, even when it is killed with SIGKILL.
    """
    return cf.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=mp.get_context("spawn"),
        initializer=_worker_init,
        initargs=(os.getpid(),),
    )
