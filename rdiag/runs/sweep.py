"""Resumable r x width x seed x lr sweeps: a grid of runs through an executor.

:func:`sweep` expands a grid over any config fields (``parametrization``/``r``,
``width``, ``seed``, ``lr``, ...) and runs the configurations through an
:class:`~rdiag.runs.executors.Executor`: by default a
``concurrent.futures.ProcessPoolExecutor`` (spawned workers, one torch thread
each), ``executor="ray"`` (:class:`rdiag.runs.ray_executor.RayExecutor`: one
task per run, records streamed to one writer on the driver), or anything with
``submit``/``shutdown``. Runs are keyed by their configuration
(:func:`rdiag.runs.store.run_key`), so re-running a sweep skips finished runs
and re-does unfinished ones without duplicating records. ``shard="i/n"`` runs
one deterministic slice of the grid into its own store (a Slurm array task), and
:func:`rdiag.runs.merge.merge_stores` joins the shards.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rdiag._checks import (
    check_choice,
    check_positive_int,
)
from rdiag._optional import require
from rdiag.loop import describe_error
from rdiag.report import build_report
from rdiag.runs.config import (
    TrainConfig,
    expand_grid,
    load_sweep_config,
    parse_shard,
)
from rdiag.runs.executors import Executor, SerialExecutor, process_executor
from rdiag.runs.ray_executor import RayExecutor
from rdiag.runs.store import Store, StoreError, run_key
from rdiag.runs.training import TrainResult, _not_run, train

logger = logging.getLogger("rdiag")


def sweep_id(configs: list[TrainConfig]) -> str:
    """The identity of a sweep: a 16-hex sha256 of its sorted run keys.

    The same grid (after overrides) gives the same id, whatever the order, the
    executor or the shard; every shard of a sweep records it.
    """
    keys = sorted(run_key(cfg.to_dict()) for cfg in configs)
    return run_key({"runs": keys})


def _mark_shard(store: Store, facts: dict[str, Any]) -> None:
    """Record which sweep and shard a shard's store holds; refuse another one's."""
    held = {k: store.meta().get(k) for k in facts}
    if all(v is None for v in held.values()) and not store.run_ids():
        store.set_meta(facts)
    elif held != facts:
        raise ValueError(
            f"the store {store.root} holds {_describe(held)}, not {_describe(facts)}; "
            "run each shard of each sweep into its own --out directory"
        )


def _describe(facts: Mapping[str, Any]) -> str:
    if facts.get("sweep") is None:
        return "runs of no sharded sweep"
    return f"shard {facts['shard']} of sweep {facts['sweep']}"


@dataclass(frozen=True)
class SweepResult:
    """Outcome of :func:`sweep`.

    Attributes:
        store: Root of the store.
        results: One :class:`TrainResult` per configuration.
        report: Paths written by the report (``{"html", "summary", figures...}``) or {}.
    """

    store: str
    results: list[TrainResult]
    report: dict[str, str]

    def count(self, status: str) -> int:
        """Number of runs with ``status``."""
        return sum(r.status == status for r in self.results)


def _run_config(cfg: dict[str, Any], root: str) -> TrainResult:
    return train(cfg, store=root)


def sweep(
    config: str | Path | Mapping[str, Any],
    *,
    out: str | Path,
    workers: int | None = None,
    executor: Executor | str | None = None,
    progress: bool = False,
    report: bool | None = None,
    overrides: Mapping[str, Any] | None = None,
    shard: str | tuple[int, int] | None = None,
    address: str | None = None,
) -> SweepResult:
    """Run a grid of configurations into ``out`` (store + optional report), resumably.

    A run that fails (diverges, or raises: out of memory, a bad data option, a dead
    worker) is recorded ``failed`` with its reason, and the sweep goes on with the
    others; a rerun retries failed and unfinished runs and skips finished ones. A
    run that another live sweep is executing is skipped (``"elsewhere"``).

    Args:
        config: Sweep config (see :func:`load_sweep_config`).
        out: Output directory: the store (``rdiag.sqlite``, ``arrays/``) and report.
        workers: Worker processes (default the config's ``workers`` or 1); 1 runs in
            this process. Workers are spawned, so a script calling :func:`sweep`
            with ``workers > 1`` needs the ``if __name__ == "__main__":`` guard.
        executor: An :class:`Executor` overriding ``workers``, ``"process"`` (the
            default pool) or ``"ray"``: a :class:`~rdiag.runs.ray_executor.RayExecutor`
            (one task per run with the config's ``resources``; records go to one
            writer on this machine), shut down at the end.
        progress: Show a tqdm progress bar (stderr), advanced as each run ends.
        report: Build the report at the end (default the config's ``report``, True);
            skipped when no run has finished (and always for a shard).
        overrides: ``{"base": {...}, "grid": {...}}`` entries replacing the config's.
        shard: ``"i/n"``: run only slice ``i`` of ``n`` of the grid (every
            ``n``-th configuration from the ``i``-th, in grid order: the same
            slice on every machine) into its own store ``out/shard-i-of-n``,
            which records the sweep and the shard for :func:`rdiag.runs.merge.merge_stores`.
        address: The Ray cluster for ``executor="ray"`` (see
            :class:`~rdiag.runs.ray_executor.RayExecutor`).

    Returns:
        A :class:`SweepResult`. Finished runs already in the store are skipped.

    Raises:
        ValueError: A bad config, shard or executor (before anything runs), or a
            shard's store that holds another shard.
        StoreError: The store cannot be written (queued runs are cancelled;
            re-running the sweep resumes).
    """
    if executor is not None and isinstance(executor, str):
        check_choice(executor, "executor", ("process", "ray"))
    if address is not None and executor != "ray":
        raise ValueError(
            f"address={address!r} is the Ray cluster's; pass executor='ray' with it"
        )
    raw = load_sweep_config(config)
    given = {k: dict(v) for k, v in (overrides or {}).items()}
    for section in ("base", "grid"):
        raw[section] = {**raw[section], **given.get(section, {})}
    # An override of the parametrization axis replaces the config's, in either form.
    axis = ("r", "parametrization")
    for key in axis:
        if key in given.get("grid", {}):
            raw["grid"].pop(axis[1 - axis.index(key)], None)
    configs = expand_grid(raw)
    workers = raw.get("workers", 1) if workers is None else workers
    check_positive_int(workers, "workers")
    facts = None
    if shard is not None:
        index, count = parse_shard(shard)
        facts = {
            "sweep": sweep_id(configs),
            "sweep_runs": len(configs),
            "shard": f"{index}/{count}",
        }
        configs = configs[index::count]
        out = Path(out) / f"shard-{index}-of-{count}"
    store = Store(out)
    if facts is not None:
        _mark_shard(store, facts)
    todo = []
    results: list[TrainResult] = []
    for cfg in configs:
        rid = store.create_run(cfg.to_dict(), seed=cfg.seed, device=cfg.device)
        if store.status(rid) == "finished":
            results.append(_not_run(rid, store, "skipped"))
        else:
            todo.append((rid, cfg.to_dict()))
    own = executor is None or isinstance(executor, str)
    if executor == "ray":
        resources = raw.get("resources") or {}
        executor = RayExecutor(
            address=address,
            num_cpus=resources.get("cpus", 1),
            num_gpus=resources.get("gpus"),
        )
    elif own:
        executor = SerialExecutor() if workers == 1 else process_executor(workers)
    bar = None
    if progress:
        bar = require("tqdm", "sweep progress").tqdm(
            total=len(configs), initial=len(results), desc="rdiag sweep", unit="run"
        )
    try:
        results += _run_all(executor, todo, store, bar)
    finally:
        if bar is not None:
            bar.close()
        if own:
            executor.shutdown(wait=True)
    paths: dict[str, str] = {}
    wanted = report if report is not None else raw.get("report", True)
    if shard is not None:
        wanted = False  # a slice: the report comes after the merge
    if wanted and store.run_ids("finished"):
        paths = {k: str(v) for k, v in build_report(store, out).items()}
    elif wanted:
        logger.warning("no run of %s has finished: no report", store.root)
    return SweepResult(str(store.root), results, paths)


def _run_all(
    executor: Executor, todo: list[tuple[str, dict[str, Any]]], store: Store, bar: Any
) -> list[TrainResult]:
    """Run ``(run id, config)`` pairs through ``executor``, in completion order."""
    # SerialExecutor runs at submit: one at a time, so that the bar moves per run.
    window = 1 if isinstance(executor, SerialExecutor) else len(todo)
    queue, running = deque(todo), {}
    results = []
    by_run = getattr(executor, "submit_run", None)
    try:
        while queue or running:
            while queue and len(running) < window:
                rid, cfg = queue.popleft()
                future = (
                    by_run(train, cfg, store.root)
                    if by_run is not None
                    else executor.submit(_run_config, cfg, str(store.root))
                )
                running[future] = rid
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                results.append(_outcome(fut, running.pop(fut), store))
                if bar is not None:
                    bar.update(1)
    except BaseException:
        for fut in running:  # drop queued runs (running ones finish; resumable)
            fut.cancel()
        raise
    return results


def _outcome(future: cf.Future, rid: str, store: Store) -> TrainResult:
    """A finished future's result; a run that raised becomes a failed result."""
    try:
        return future.result()
    except StoreError:
        raise
    except Exception as err:  # the run raised, or its worker died: say why, go on
        reason = describe_error(err)
        store.set_status(rid, "failed", reason)
        logger.warning("run %s failed: %s", rid, reason)
        return _not_run(rid, store, "failed", reason)
