"""One training run: a :class:`~rdiag.runs.config.TrainConfig` trained with a Monitor into a store.

:func:`train` builds the data and the parametrized model of a config, trains it
with :func:`rdiag.loop.fit` and a :class:`~rdiag.monitor.Monitor` attached, and
writes everything into a :class:`~rdiag.runs.store.Store` (or a
:class:`~rdiag.runs.writer.RemoteStore`). Runs are keyed by their configuration
(:func:`rdiag.runs.store.run_key`), claimed while they execute, and a finished
run is skipped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdiag.data import Dataset, batches, load_data
from rdiag.loop import describe_error, fit
from rdiag.models import make_model
from rdiag.monitor import Monitor
from rdiag.parametrization import lr_multipliers, make_optimizer
from rdiag.records import TRAIN_LOSS
from rdiag.runs.config import (
    DTYPES,
    TrainConfig,
    config_id,
    stored_ids,
)
from rdiag.runs.store import Store, StoreError
from rdiag.runs.writer import RemoteStore

logger = logging.getLogger("rdiag")


@dataclass(frozen=True)
class TrainResult:
    """Outcome of :func:`train`.

    Attributes:
        run_id: The store's run id.
        store: Root directory of the store.
        status: ``"finished"``, ``"failed"`` (diverged, a diagnostic failed or
            the run raised), ``"skipped"`` (already finished) or ``"elsewhere"``
            (another live process is executing it, see :meth:`Store.claim`).
        final_loss: Last training-batch loss (``nan`` if not run).
        seconds: Wall time of the run; ``monitor_seconds``: of which diagnostics.
        reason: Why it failed or ran elsewhere (None otherwise); a failure's reason
            is also stored (:meth:`~rdiag.runs.store.Store.reason`).
        lost: The run failed because its worker process died twice (killed,
            out of memory), not because of anything it computed.
    """

    run_id: str
    store: str
    status: str
    final_loss: float
    seconds: float
    monitor_seconds: float
    reason: str | None = None
    lost: bool = False


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "bad config field 'device': 'cuda' requested but no CUDA device is available; "
            "use 'cpu' or 'auto'"
        )
    return torch.device(name)


def _loss_fn(cfg: TrainConfig, data: Dataset) -> Callable[[Tensor, Tensor], Tensor]:
    kind = (
        cfg.loss
        if cfg.loss != "auto"
        else ("mse" if data.task == "regression" else "cross_entropy")
    )
    if kind == "mse" and data.task == "classification":
        classes = data.num_outputs

        def mse_one_hot(out: Tensor, y: Tensor) -> Tensor:
            return F.mse_loss(out, F.one_hot(y, classes).to(out.dtype))

        return mse_one_hot
    if kind == "mse":
        return F.mse_loss
    if data.task == "regression":
        raise ValueError(
            "bad config field 'loss': 'cross_entropy' needs classification data; use 'mse'"
        )
    # A transformer's (N, T, V) outputs with (N, T) targets: over every position
    # (rdiag.losses.apply_loss, used by the loop and the Monitor).
    return F.cross_entropy


def build_model(cfg: TrainConfig, data: Dataset) -> nn.Module:
    """The parametrized model of a config, sized to the data.

    Args:
        cfg: The run configuration.
        data: The dataset (fixes input shape and number of outputs).

    Returns:
        The model, parametrized by ``cfg.parametrization``, in ``cfg.dtype``.

    Raises:
        ValueError: The family does not fit the data's input shape.
    """
    opts: dict[str, Any] = {"depth": cfg.depth}
    if cfg.family in ("mlp", "bn_mlp"):
        if len(data.in_shape) != 1:
            raise ValueError(
                f"family {cfg.family!r} needs flat inputs, got input shape "
                f"{data.in_shape}; use family 'cnn' for images or data_options "
                "flatten: true"
            )
        opts.update(
            d_in=data.in_shape[0], d_out=data.num_outputs, activation=cfg.activation
        )
    elif cfg.family == "cnn":
        if len(data.in_shape) != 3 or data.in_shape[1] != data.in_shape[2]:
            raise ValueError(
                f"family 'cnn' needs square images (C, H, H), got input shape {data.in_shape}; "
                "use data 'cifar10' or 'digits' with data_options flatten: false"
            )
        opts.update(
            in_channels=data.in_shape[0],
            image_size=data.in_shape[1],
            d_out=data.num_outputs,
            activation=cfg.activation,
        )
    else:
        if data.x.is_floating_point() or len(data.in_shape) != 1:
            raise ValueError(
                f"family 'transformer' needs token inputs (N, T), got {data.x.dtype} inputs of "
                f"shape {data.in_shape}; use data 'sequences'"
            )
        opts.update(
            vocab=int(data.x.max()) + 1,
            seq_len=data.in_shape[0],
            d_out=data.num_outputs,
        )
        opts["vocab"] = max(opts["vocab"], data.num_outputs)
    opts.update(cfg.model_options)
    model = make_model(
        cfg.family,
        cfg.width,
        parametrization=cfg.parametrization,
        seed=cfg.seed,
        **opts,
    )
    return model.to(DTYPES[cfg.dtype])


def _not_run(
    rid: str, store: Store, status: str, reason: str | None = None
) -> TrainResult:
    return TrainResult(rid, str(store.root), status, math.nan, 0.0, 0.0, reason)


def _elsewhere(store: Store, rid: str) -> TrainResult:
    holder = store.claim_holder(rid)
    where = (
        ""
        if holder is None
        else f": claimed by pid {holder['pid']} on {holder['host']} since "
        + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))
    )
    return _not_run(rid, store, "elsewhere", f"running elsewhere{where}")


def train(
    config: TrainConfig | Mapping[str, Any] | None = None,
    *,
    store: Store | RemoteStore | str | Path,
    run_id: str | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train one configuration with a :class:`~rdiag.monitor.Monitor` attached.

    The Monitor measures at step 0 (initialization), every ``every`` steps and at the
    last step, on the first ``probe_size`` test samples; the training-batch loss of
    every step is recorded as ``train/loss`` (:data:`rdiag.records.TRAIN_LOSS`). The run ends ``failed``, with the
    reason stored (:meth:`~rdiag.runs.store.Store.reason`) and its records kept, when
    the loss of a state diverges (:func:`rdiag.loop.divergence_reason`; checked before the
    Monitor measures that state) or a diagnostic raises (a degenerate state). The
    run is claimed in the store while it executes (:meth:`~rdiag.runs.store.Store.claim`).

    Args:
        config: A :class:`TrainConfig` or a dict of its fields (default all defaults).
        store: A :class:`~rdiag.runs.store.Store` or a directory (created if missing), or
            a :class:`~rdiag.runs.writer.RemoteStore` (the store's writer on another
            machine).
        run_id: Explicit run id (default the config's
            :func:`~rdiag.runs.config.config_id`, or the id the store has for it
            from before ids were canonical).
        **overrides: Config fields overriding ``config``.

    Returns:
        A :class:`TrainResult`; ``status="skipped"`` if the store already holds the
        finished run, ``"elsewhere"`` if another live process is executing it.

    Raises:
        ValueError: A bad config field (named, with its allowed values), before
            anything runs.
        StoreError: The store cannot be written.
        Exception: Whatever building the data or model or training raised (out of
            memory, ...); the run is marked ``failed`` with it as the reason first.
    """
    base = config.to_dict() if isinstance(config, TrainConfig) else dict(config or {})
    cfg = TrainConfig.from_dict({**base, **overrides})
    store = Store(store) if isinstance(store, (str, os.PathLike)) else store
    device = _device(cfg.device)
    if run_id is None:
        run_id = canonical = config_id(cfg)
        if isinstance(store, Store):  # a run written before ids were canonical
            run_id = stored_ids(store).get(canonical, canonical)
    rid = store.create_run(
        cfg.to_dict(), run_id=run_id, seed=cfg.seed, device=str(device)
    )
    if store.status(rid) == "finished":
        return _not_run(rid, store, "skipped")
    if not store.claim(rid):
        return _elsewhere(store, rid)
    try:
        if store.status(rid) == "finished":  # by another process since the check
            return _not_run(rid, store, "skipped")
        return _execute(cfg, store, rid, device)
    except StoreError as err:
        # Not finished: failed with the reason where the store still takes that
        # write (arrays refused, the database not), else left unfinished; either
        # way a rerun redoes it and what was written stays.
        with contextlib.suppress(StoreError):
            store.set_status(rid, "failed", describe_error(err))
        raise
    except Exception as err:
        store.set_status(rid, "failed", describe_error(err))
        raise
    finally:
        store.release(rid)


def _execute(
    cfg: TrainConfig, store: Store, rid: str, device: torch.device
) -> TrainResult:
    """Build, train and measure a claimed run; set its final status."""
    tic = time.perf_counter()
    data_options = dict(cfg.data_options)
    if cfg.data != "cifar10":
        data_options.setdefault("seed", cfg.seed)
    data = load_data(cfg.data, **data_options).to(DTYPES[cfg.dtype])
    x_probe, y_probe = data.probe(cfg.probe_size)
    model = build_model(cfg, data).to(device)
    loss_fn = _loss_fn(cfg, data)
    kind = "adam" if cfg.optimizer == "adam" else "sgd"
    opt = make_optimizer(model, None, cfg.lr, optimizer=kind, momentum=cfg.momentum)
    monitor = Monitor(
        model,
        (x_probe.to(device), y_probe.to(device)),
        every=cfg.every,
        metrics=cfg.metrics,
        loss_fn=loss_fn,
        store=store,
        run_id=rid,
        lr_multipliers=lr_multipliers(model, optimizer=kind),
        optimizer=opt if kind == "adam" else None,
        budget_fraction=cfg.budget_fraction,
        snapshots=cfg.snapshots,
        strict=False,
    )
    mode = {"gd": "gd", "online": "online"}.get(cfg.optimizer, "sgd")
    stream = (
        (x.to(device), y.to(device))
        for x, y in batches(data, cfg.batch_size, cfg.steps, mode=mode, seed=cfg.seed)
    )
    pending: list[tuple[int, str, str, float]] = []

    def flush(step: int) -> None:
        store.log_rows(rid, pending)
        pending.clear()
        store.claim(rid)  # refreshes the claim's heartbeat

    result = fit(
        model,
        opt,
        stream,
        loss_fn,
        steps=cfg.steps,
        monitor=monitor,
        divergence_factor=cfg.divergence_factor,
        on_loss=lambda step, value: pending.append((step, TRAIN_LOSS, "", value)),
        before_check=flush,
    )
    store.log_rows(rid, pending)
    loss_value, reason = result.final_loss, result.reason
    status = "finished" if reason is None else "failed"
    if reason is not None:
        logger.warning("run %s failed: %s", rid, reason)
    store.set_status(rid, status, reason)
    return TrainResult(
        rid,
        str(store.root),
        status,
        loss_value,
        time.perf_counter() - tic,
        monitor.seconds,
        reason,
    )
