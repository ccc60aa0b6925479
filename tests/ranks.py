"""Spawning gloo ranks on loopback for tests and benches (one copy of the recipe).

The ranks meet through a file store in a temporary directory (no port to pick,
so parallel test workers never collide); gloo then connects them over loopback.
Every rank runs ``fn(rank, world, *args)`` and the parent waits with a deadline,
ending only the processes it spawned.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn: Callable, world: int, folder: str, args: tuple) -> None:
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/rendezvous",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(
    fn: Callable, world: int, folder: Path, *args: object, timeout: float = 300
) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned gloo ranks; raise if one fails.

    Args:
        fn: A module-level function (spawned processes import it by name).
        world: Number of ranks.
        folder: An empty directory for the rendezvous file.
        *args: Picklable arguments.
        timeout: Seconds before the ranks are killed and the call fails.

    Raises:
        AssertionError: A rank failed (its traceback is in the message) or the
            ranks did not finish in time.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(
        _entry,
        args=(fn, world, str(folder), args),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, f"{world} ranks ran past {timeout} s"
    except mp.ProcessRaisedException as err:
        raise AssertionError(f"a rank failed:\n{err}") from None
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, 9)
