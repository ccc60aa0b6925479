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
import dataclasses
import functools
import logging
import signal
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures.process import BrokenProcessPool
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
    config_id,
    expand_grid,
    load_sweep_config,
    parse_shard,
    stored_ids,
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
    keys = sorted(config_id(cfg) for cfg in configs)
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


def _run_config(cfg: dict[str, Any], root: str, rid: str | None = None) -> TrainResult:
    return train(cfg, store=root, run_id=rid)


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

    A run that fails (diverges, or raises: out of memory, a bad data option) is
    recorded ``failed`` with its reason, and the sweep goes on with the others. A
    process-pool worker that dies costs only the run it held, retried once in a
    new pool (the runs the broken pool cancelled are submitted again); at its
    second death the run is failed and ``lost``; a rerun retries failed and unfinished runs and skips finished ones. A
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
    if not raw["base"] and not raw["grid"]:
        raise ValueError(
            f"the sweep config {config if isinstance(config, (str, Path)) else ''} "
            "sets no base fields and no grid: nothing to sweep; write base: and "
            "grid: sections (see rdiag sweep --config default), or use rdiag run "
            "for one default run"
        )
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
    older = stored_ids(store)
    for cfg in configs:
        rid = older.get(config_id(cfg), config_id(cfg))
        if store.status(rid) == "finished":  # read only: a finished store resumes
            results.append(_not_run(rid, store, "skipped"))
            continue
        store.create_run(cfg.to_dict(), run_id=rid, seed=cfg.seed, device=cfg.device)
        todo.append((rid, cfg.to_dict()))
    own = executor is None or isinstance(executor, str)
    renew = None
    if executor == "ray":
        resources = raw.get("resources") or {}
        executor = RayExecutor(
            address=address,
            num_cpus=resources.get("cpus", 1),
            num_gpus=resources.get("gpus"),
        )
    elif own:
        executor = SerialExecutor() if workers == 1 else process_executor(workers)
        if workers > 1:
            renew = functools.partial(process_executor, workers)
    bar = None
    if progress:
        bar = require("tqdm", "sweep progress").tqdm(
            total=len(configs), initial=len(results), desc="rdiag sweep", unit="run"
        )
    pool = [executor]  # a pool that lost a worker is replaced (renew)
    try:
        results += _run_all(pool, todo, store, bar, renew)
    finally:
        if bar is not None:
            bar.close()
        if own:
            pool[0].shutdown(wait=True)
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
    pool: list[Executor],
    todo: list[tuple[str, dict[str, Any]]],
    store: Store,
    bar: Any,
    renew: Callable[[], Executor] | None = None,
) -> list[TrainResult]:
    """Run ``(run id, config)`` pairs through ``pool[0]``, in completion order.

    With ``renew`` (a process pool's factory), a pool that lost a worker is
    replaced by a new one: the run the dead worker held is retried once (a
    second death fails it), the runs the broken pool cancelled with it are
    submitted again without counting against them.
    """
    # SerialExecutor runs at submit: one at a time, so that the bar moves per run.
    window = 1 if isinstance(pool[0], SerialExecutor) else len(todo)
    queue: deque[tuple[str, dict[str, Any]]] = deque(todo)
    running: dict[cf.Future, tuple[str, dict[str, Any]]] = {}
    results = []
    deaths: dict[str, int] = {}
    try:
        while queue or running:
            while queue and len(running) < window:
                rid, cfg = queue.popleft()
                by_run = getattr(pool[0], "submit_run", None)
                future = (
                    by_run(functools.partial(train, run_id=rid), cfg, store.root)
                    if by_run is not None
                    else pool[0].submit(_run_config, cfg, str(store.root), rid)
                )
                running[future] = (rid, cfg)
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            if renew is not None and any(_broken(f) for f in done):
                again, lost = _renew(pool, running, store, deaths, renew)
                queue.extendleft(reversed(again))
                results += lost
                if bar is not None:
                    bar.update(len(lost))
                continue
            for fut in done:
                results.append(_outcome(fut, running.pop(fut)[0], store))
                if bar is not None:
                    bar.update(1)
    except BaseException:
        for fut in running:  # drop queued runs (running ones finish; resumable)
            fut.cancel()
        raise
    return results


def _broken(future: cf.Future) -> bool:
    return not future.cancelled() and isinstance(future.exception(), BrokenProcessPool)


def _renew(
    pool: list[Executor],
    running: dict[cf.Future, tuple[str, dict[str, Any]]],
    store: Store,
    deaths: dict[str, int],
    renew: Callable[[], Executor],
) -> tuple[list[tuple[str, dict[str, Any]]], list[TrainResult]]:
    """Replace a broken pool: the runs to submit again, and those lost.

    The dead worker's run is submitted again once; at its second death it is
    lost (failed, ``lost=True``).

    The dead worker is the one that ended other than by the pool's own
    terminate (SIGTERM); its run is the one it had claimed in the store.
    """
    cf.wait(running)  # a broken pool fails every call it held at once
    workers = dict(getattr(pool[0], "_processes", None) or {})
    pool[0].shutdown(wait=True)
    dead = {
        pid: p.exitcode
        for pid, p in workers.items()
        if p.exitcode not in (None, 0, -signal.SIGTERM)
    }
    again, lost = [], []
    for fut, (rid, cfg) in list(running.items()):
        if not _broken(fut):
            continue  # finished before the break: collected as usual
        del running[fut]
        holder = store.claim_holder(rid)
        if holder is not None and holder["pid"] in dead:
            deaths[rid] = deaths.get(rid, 0) + 1
            logger.warning(
                "run %s: its worker (pid %s) died (exit code %s); %s",
                rid,
                holder["pid"],
                dead[holder["pid"]],
                "retrying it once" if deaths[rid] == 1 else "giving up",
            )
            if deaths[rid] > 1:
                reason = (
                    f"its worker process died twice (exit code {dead[holder['pid']]}: "
                    "killed, out of memory?); rerun the sweep to retry it"
                )
                store.set_status(rid, "failed", reason)
                lost.append(
                    dataclasses.replace(
                        _not_run(rid, store, "failed", reason), lost=True
                    )
                )
                continue
        again.append((rid, cfg))
    pool[0] = renew()
    return again, lost


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
