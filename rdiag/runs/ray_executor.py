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
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from rdiag._optional import require
from rdiag.runs.writer import RemoteStore, StoreWriter


def run_task(
    run: Callable[..., Any], config: dict[str, Any], store: RemoteStore, threads: int
) -> Any:
    """One sweep run inside a Ray worker: ``run(config, store=store)``, ``threads`` torch threads."""
    torch.set_num_threads(max(1, int(threads)))
    return run(config, store=store)


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
        num_cpus: CPUs each run requests (and torch threads it uses).
        num_gpus: GPUs each run requests; default 1 for a run on ``device:
            cuda`` and 0 otherwise (a ``device: auto`` run then runs on the CPU).
        max_retries: How often Ray retries a run whose worker died.
        **options: Other ``ray.remote`` options of every task (``resources=``,
            ``memory=``, ...).

    Raises:
        ImportError: Ray is not installed.
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
        if self._started:
            self._ray.init(address=address)
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
                .remote(key)
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
