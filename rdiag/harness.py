"""Thin training loop with a Monitor, and resumable r x width x seed x lr sweeps.

:func:`train` runs one configuration (a :class:`TrainConfig`, a dict, or keyword
arguments) and writes everything into a :class:`~rdiag.store.Store`. :func:`sweep`
expands a grid over any config fields (``parametrization``/``r``, ``width``, ``seed``, ``lr``,
...) and runs the configurations through an :class:`Executor`: by default a
``concurrent.futures.ProcessPoolExecutor`` (spawned workers, one torch thread
each), ``executor="ray"`` (:class:`rdiag.ray_sweep.RayExecutor`: one task per run,
records streamed to one writer on the driver), or anything with
``submit``/``shutdown``. Runs are keyed by their canonical configuration
(:func:`config_id`: current field names, defaults left out), so re-running a sweep skips finished runs and
re-does unfinished ones without duplicating records. ``shard="i/n"`` runs one
deterministic slice of the grid into its own store (a Slurm array task), and
:func:`rdiag.merge.merge_stores` joins the shards.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import dataclasses
import functools
import itertools
import logging
import math
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdiag._checks import (
    check_choice,
    check_nonnegative_int,
    check_positive_int,
    check_real,
)
from rdiag._optional import require
from rdiag.data import BATCH_MODES, DATASETS, Dataset, batches, load_data
from rdiag.loop import DIVERGENCE_FACTOR, describe_error, fit
from rdiag.models import FAMILIES
from rdiag.monitor import METRICS, Monitor
from rdiag.losses import LOSS_KINDS
from rdiag.parametrization import OPTIMIZERS as PARAM_OPTIMIZERS
from rdiag.ray_sweep import RayExecutor as RayExecutor  # re-exported (its old home)
from rdiag.records import TRAIN_LOSS
from rdiag.store import Store, StoreError, run_key
from rdiag.writer import RemoteStore

logger = logging.getLogger("rdiag")

#: Model families (owned by :mod:`rdiag.models`).
MODELS = tuple(FAMILIES)
#: Optimizers (:mod:`rdiag.parametrization`) and the batch streams of SGD
#: (:data:`rdiag.data.BATCH_MODES`: full-batch ``"gd"``, one-pass ``"online"``).
OPTIMIZERS = (*PARAM_OPTIMIZERS, *(m for m in BATCH_MODES if m not in PARAM_OPTIMIZERS))
#: Losses: the loss kinds of :mod:`rdiag.operators.ggn` a config can name, or auto.
LOSSES = ("auto", *(k for k in LOSS_KINDS if k != "autodiff"))
DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEVICES = ("cpu", "cuda", "auto")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
#: Renamed config fields and values: old -> new (accepted with a DeprecationWarning).
_RENAMED_FIELDS = {"param": "parametrization"}
_RENAMED_LOSSES = {"ce": "cross_entropy"}


@dataclass
class TrainConfig:
    """One training run. Every field can be set from YAML / the CLI.

    Attributes:
        model: A family of :data:`rdiag.models.FAMILIES` (``"mlp"``, ``"cnn"``,
            ``"transformer"``, ``"bn_mlp"``).
        width: The width knob (hidden units, channels, ``d_model``).
        depth: Weight layers (MLP), conv layers (CNN) or blocks (transformer).
        activation: Activation of the MLP / CNN.
        parametrization: Parametrization string (``"r=0.25"``, ``"ntk"``, ``"mup"``,
            ``"sp"``, ``"mf"``, ``"gamma=0.1"``), see
            :func:`rdiag.parametrization.parse_parametrization` (``param`` is its
            deprecated name).
        optimizer: ``"sgd"`` (minibatch), ``"adam"``, ``"gd"`` (full batch) or
            ``"online"`` (every sample used once).
        lr: Base learning rate ``eta0`` (per-layer rates follow ``parametrization``).
        steps: Optimizer steps.
        batch_size: Minibatch size (ignored by ``"gd"``).
        momentum: SGD momentum.
        data: ``"teacher"``, ``"digits"``, ``"cifar10"`` or ``"sequences"``.
        data_options: Keyword arguments of the data loader (e.g. ``root`` for CIFAR-10).
        model_options: Extra keyword arguments of the model family.
        loss: ``"mse"``, ``"cross_entropy"`` (``"ce"`` is deprecated) or ``"auto"``
            (MSE for regression, cross-entropy otherwise).
        seed: Seed of initialization, data order and data generation.
        dtype: ``"float32"`` or ``"float64"``.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available).
        probe_size: Probe batch size (the first test samples).
        every: Monitor every this many steps (the last step is always measured).
        metrics: Monitor metrics (:data:`rdiag.monitor.METRICS`).
        budget_fraction: Monitor cost budget (fraction of training time) or None.
        snapshots: Save the probe eNTK and sharpness eigenvectors of each check as
            arrays (see :class:`~rdiag.monitor.Monitor`).
        divergence_factor: The run fails as diverged when the training loss exceeds
            this multiple (>= 1) of its initial value; None: only a non-finite loss
            counts as divergence.
    """

    model: str = "mlp"
    width: int = 128
    depth: int = 3
    activation: str = "tanh"
    parametrization: str = "mup"
    optimizer: str = "sgd"
    lr: float = 0.1
    steps: int = 100
    batch_size: int = 64
    momentum: float = 0.0
    data: str = "teacher"
    data_options: dict[str, Any] = field(default_factory=dict)
    model_options: dict[str, Any] = field(default_factory=dict)
    loss: str = "auto"
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    probe_size: int = 32
    every: int = 10
    metrics: list[str] = field(
        default_factory=lambda: [
            "ntk",
            "features",
            "representations",
            "weights",
            "loss",
        ]
    )
    budget_fraction: float | None = None
    snapshots: bool = False
    divergence_factor: float | None = DIVERGENCE_FACTOR

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build and validate a config; unknown fields and bad values name the field.

        Args:
            values: Field name -> value.

        Returns:
            The validated :class:`TrainConfig`.

        Raises:
            TypeError: ``values`` is not a mapping.
            ValueError: Unknown field, or a value outside its allowed set / range.
        """
        if not isinstance(values, Mapping):
            raise TypeError(
                f"expected a mapping of TrainConfig fields, got {type(values).__name__}"
            )
        values = _renamed(dict(values))
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in values if k not in names]
        if unknown:
            raise ValueError(
                f"unknown config field(s) {unknown}; allowed fields are {names}"
            )
        cfg = cls(**dict(values))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check every field, naming the field and its allowed values on failure.

        Raises:
            ValueError: A value outside its allowed set or range.
            TypeError: ``data_options`` / ``model_options`` is not a mapping.
        """
        from rdiag.models import ACTIVATIONS

        for name, allowed in (
            ("model", MODELS),
            ("optimizer", OPTIMIZERS),
            ("loss", LOSSES),
            ("data", DATASETS),
            ("dtype", tuple(DTYPES)),
            ("device", DEVICES),
            ("activation", tuple(ACTIVATIONS)),
        ):
            check_choice(getattr(self, name), name, allowed)
        for name in ("width", "depth", "steps", "batch_size", "probe_size", "every"):
            check_positive_int(getattr(self, name), f"config field {name!r}")
        check_nonnegative_int(self.seed, "config field 'seed'")
        check_real(self.lr, "config field 'lr'", "> 0", lambda v: v > 0)
        check_real(
            self.momentum, "config field 'momentum'", "in [0, 1)", lambda v: 0 <= v < 1
        )
        if self.budget_fraction is not None:
            check_real(
                self.budget_fraction,
                "config field 'budget_fraction'",
                "in (0, 1) or null",
                lambda v: 0 < v < 1,
            )
        if self.divergence_factor is not None:
            check_real(
                self.divergence_factor,
                "config field 'divergence_factor'",
                ">= 1 or null (no limit)",
                lambda v: v >= 1,
            )
        if not isinstance(self.snapshots, bool):
            raise ValueError(
                f"expected config field 'snapshots' to be true or false, got "
                f"{self.snapshots!r}"
            )
        self._validate_param_and_metrics()
        for name in ("data_options", "model_options"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(
                    f"expected config field {name!r} to be a mapping (key: value), got "
                    f"{getattr(self, name)!r}"
                )

    def _validate_param_and_metrics(self) -> None:
        from rdiag.parametrization import parse_parametrization

        try:
            parse_parametrization(self.parametrization)
        except (ValueError, TypeError) as err:
            raise ValueError(f"bad config field 'parametrization': {err}") from err
        if not isinstance(self.metrics, (list, tuple)):
            raise ValueError(
                f"expected config field 'metrics' to be a list of names from "
                f"{list(METRICS)}, got {self.metrics!r}"
            )
        bad = [m for m in self.metrics if m not in METRICS]
        if bad:
            raise ValueError(
                f"bad config field 'metrics': {bad}; allowed values are {list(METRICS)}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain dict (what the store records)."""
        return dataclasses.asdict(self)

    def canonical(self) -> dict[str, Any]:
        """The fields that identify the run: current names, defaults left out.

        A field added later (with a default) or renamed (:data:`_RENAMED_FIELDS`)
        leaves it unchanged, so the run's id (:func:`config_id`) does too.
        """
        default = TrainConfig()
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        }


def config_id(config: TrainConfig | Mapping[str, Any]) -> str:
    """A run's id: :func:`~rdiag.store.run_key` of its canonical config.

    Raises:
        ValueError: A bad config field.
    """
    if not isinstance(config, TrainConfig):
        config = TrainConfig.from_dict(config)
    return run_key(config.canonical())


def stored_ids(store: Store) -> dict[str, str]:
    """Canonical id -> the id a run has in ``store``, where the two differ.

    Runs written before ids were canonical (keyed by the whole config, perhaps
    under old field names) are found again, so that resuming re-runs nothing.
    Configs that no longer validate (fields since removed) are left out.
    """
    found = {}
    for rid in store.run_ids():
        try:
            known = {f.name for f in dataclasses.fields(TrainConfig)}
            values = _renamed(dict(store.config(rid)))
            cid = config_id({k: v for k, v in values.items() if k in known})
        except (ValueError, TypeError):
            continue
        if cid != rid:
            found.setdefault(cid, rid)
    return found


def _renamed(values: dict[str, Any]) -> dict[str, Any]:
    """Map deprecated field names and loss names to the current ones."""
    import warnings

    for old, new in _RENAMED_FIELDS.items():
        if old in values:
            if new in values:
                raise ValueError(
                    f"config sets both {old!r} and {new!r}; use {new!r} ({old!r} is its "
                    "deprecated name)"
                )
            warnings.warn(
                f"config field {old!r} is deprecated; use {new!r}",
                DeprecationWarning,
                stacklevel=4,
            )
            values[new] = values.pop(old)
    loss = values.get("loss")
    if isinstance(loss, str) and loss in _RENAMED_LOSSES:
        warnings.warn(
            f"loss {loss!r} is deprecated; use {_RENAMED_LOSSES[loss]!r}",
            DeprecationWarning,
            stacklevel=4,
        )
        values["loss"] = _RENAMED_LOSSES[loss]
    return values


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
            is also stored (:meth:`~rdiag.store.Store.reason`).
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
    from rdiag.models import make_model

    opts: dict[str, Any] = {"depth": cfg.depth}
    if cfg.model in ("mlp", "bn_mlp"):
        if len(data.in_shape) != 1:
            raise ValueError(
                f"model {cfg.model!r} needs flat inputs, got input shape "
                f"{data.in_shape}; use model 'cnn' for images or data_options "
                "flatten: true"
            )
        opts.update(
            d_in=data.in_shape[0], d_out=data.num_outputs, activation=cfg.activation
        )
    elif cfg.model == "cnn":
        if len(data.in_shape) != 3 or data.in_shape[1] != data.in_shape[2]:
            raise ValueError(
                f"model 'cnn' needs square images (C, H, H), got input shape {data.in_shape}; "
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
                f"model 'transformer' needs token inputs (N, T), got {data.x.dtype} inputs of "
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
        cfg.model, cfg.width, parametrization=cfg.parametrization, seed=cfg.seed, **opts
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
    reason stored (:meth:`~rdiag.store.Store.reason`) and its records kept, when
    the loss of a state diverges (:func:`rdiag.loop.divergence_reason`; checked before the
    Monitor measures that state) or a diagnostic raises (a degenerate state). The
    run is claimed in the store while it executes (:meth:`~rdiag.store.Store.claim`).

    Args:
        config: A :class:`TrainConfig` or a dict of its fields (default all defaults).
        store: A :class:`~rdiag.store.Store` or a directory (created if missing), or
            a :class:`~rdiag.writer.RemoteStore` (the store's writer on another
            machine).
        run_id: Explicit run id (default the config's :func:`config_id`, or the id
            the store has for it from before ids were canonical).
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
    from rdiag.parametrization import lr_multipliers, make_optimizer

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


# ---- sweeps ----------------------------------------------------------------------
class Executor(Protocol):
    """What :func:`sweep` needs from an executor (``concurrent.futures`` style).

    ``ProcessPoolExecutor``, ``ThreadPoolExecutor``, :class:`SerialExecutor` and
    :class:`~rdiag.ray_sweep.RayExecutor` (futures from ``ObjectRef.future()``)
    qualify. An executor that also has ``submit_run(config, root)`` is given each
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


def _yaml_mapping(text: str, source: object, what: str) -> dict[str, Any]:
    """The top-level mapping of a YAML text (an empty text is ``{}``)."""
    yaml = require("yaml", f"reading a {what}")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(
            f"could not parse the {what} {source}: {' '.join(str(err).split())}"
        ) from err
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(
            f"expected the {what} {source} to be a mapping (key: value lines), got a "
            f"YAML {type(raw).__name__}"
        )
    return raw


def _yaml_file(path: str | Path, what: str, hint: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} {path} does not exist or is not a file; pass a YAML file{hint}"
        )
    return _yaml_mapping(path.read_text(), path, what)


def load_train_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML file of :class:`TrainConfig` fields (validated by :func:`train`).

    Returns:
        The fields as a dict.

    Raises:
        FileNotFoundError: The path is not a file.
        ValueError: Unparsable YAML, or not a mapping.
    """
    return _renamed(_yaml_file(path, "run config", ""))


def load_sweep_config(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """Read a sweep config: a dict, a YAML path, or ``"default"`` (the packaged one).

    Format::

        base:            # TrainConfig fields shared by every run
          model: mlp
          steps: 20
        grid:            # lists; the sweep is their Cartesian product
          r: [0, 0.25, 0.5]      # shorthand for parametrization: ["r=0", ...]
          width: [64, 128, 256]
          seed: [0, 1]
        workers: 2       # optional
        report: true     # optional
        resources:       # optional, per run on Ray: CPUs (and torch threads), GPUs
          cpus: 1        # (default 1)
          gpus: 0        # (default 1 for device: cuda, else 0)

    Returns:
        The config dict with ``base`` and ``grid`` present.

    Raises:
        FileNotFoundError: The path does not exist.
        ValueError: Unparsable YAML, unknown top-level keys, or a key of the wrong
            kind (``base``/``grid`` not mappings, a grid value that is not a list,
            ``workers`` not a positive int, ``report`` not a boolean,
            ``resources`` not ``cpus``/``gpus`` counts).
    """
    if isinstance(source, Mapping):
        raw = dict(source)
    elif str(source) == "default":
        from importlib import resources

        text = resources.files("rdiag").joinpath("configs/default.yaml").read_text()
        raw = _yaml_mapping(text, "default", "sweep config")
    else:
        raw = _yaml_file(source, "sweep config", " or 'default'")
    allowed = ("base", "grid", "workers", "report", "name", "resources")
    unknown = [k for k in raw if k not in allowed]
    if unknown:
        raise ValueError(
            f"unknown sweep config key(s) {unknown}; allowed keys are {list(allowed)}"
        )
    for key in ("base", "grid"):
        raw[key] = {} if raw.get(key) is None else raw[key]
        if not isinstance(raw[key], Mapping):
            raise ValueError(
                f"expected the sweep config's {key} to be a mapping (field: "
                f"{'value' if key == 'base' else '[values]'}), got {raw[key]!r}"
            )
    for key, values in raw["grid"].items():
        if not isinstance(values, list) or not values:
            raise ValueError(
                f"expected grid.{key} to be a non-empty list, got {values!r}"
            )
    if "workers" in raw:
        check_positive_int(raw["workers"], "the sweep config's workers")
    if not isinstance(raw.get("report", True), bool):
        raise ValueError(
            f"expected the sweep config's report to be true or false, got "
            f"{raw['report']!r}"
        )
    _check_resources(raw.get("resources"))
    return raw


def _check_resources(resources: Any) -> None:
    """``resources: {cpus: > 0, gpus: >= 0}`` of a sweep config, or absent."""
    if resources is None:
        return
    bad = (
        not isinstance(resources, Mapping)
        or set(resources) - {"cpus", "gpus"}
        or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0
            for v in resources.values()
        )
        or resources.get("cpus", 1) <= 0
    )
    if bad:
        raise ValueError(
            "expected the sweep config's resources to be a mapping of cpus (> 0) "
            f"and gpus (>= 0) per run, got {resources!r}"
        )


def parse_shard(spec: str | tuple[int, int]) -> tuple[int, int]:
    """``(i, n)`` of a shard spec ``"i/n"``: slice ``i`` (from 0) of ``n``.

    Raises:
        ValueError: Not of the form ``i/n`` with ``0 <= i < n``.
    """
    text = spec if isinstance(spec, str) else "/".join(map(str, spec))
    index, sep, count = text.strip().partition("/")
    if not (sep and index.isdigit() and count.isdigit()) or not (
        0 <= int(index) < int(count)
    ):
        raise ValueError(
            f"expected a shard as i/n with 0 <= i < n (slice i, counted from 0, of "
            f"n: 0/4 ... 3/4 for 4 shards; $SLURM_ARRAY_TASK_ID/4 under "
            f"--array=0-3), got {text!r}"
        )
    return int(index), int(count)


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


def expand_grid(sweep_config: Mapping[str, Any]) -> list[TrainConfig]:
    """All configurations of a sweep (Cartesian product of the grid over the base).

    A grid key ``r`` sets ``parametrization`` to ``"r=<value>"``.

    Args:
        sweep_config: ``{"base": {...}, "grid": {...}}``.

    Returns:
        One validated :class:`TrainConfig` per grid point.

    Raises:
        ValueError: A field is unknown or invalid (named, with allowed values).
    """
    base = _renamed(dict(sweep_config.get("base", {})))
    grid = _renamed(dict(sweep_config.get("grid", {})))
    if "r" in grid:
        if "parametrization" in grid:
            raise ValueError(
                "grid sets both 'r' and 'parametrization'; use one of them"
            )
        values = [
            check_real(v, "grid.r values", "(the richness r)", lambda _: True)
            for v in grid.pop("r")
        ]
        grid["parametrization"] = [f"r={v:g}" for v in values]
    keys = list(grid)
    configs = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        configs.append(TrainConfig.from_dict({**base, **dict(zip(keys, combo))}))
    return configs


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
            default pool) or ``"ray"``: a :class:`~rdiag.ray_sweep.RayExecutor`
            (one task per run with the config's ``resources``; records go to one
            writer on this machine), shut down at the end.
        progress: Show a tqdm progress bar (stderr), advanced as each run ends.
        report: Build the report at the end (default the config's ``report``, True);
            skipped when no run has finished (and always for a shard).
        overrides: ``{"base": {...}, "grid": {...}}`` entries replacing the config's.
        shard: ``"i/n"``: run only slice ``i`` of ``n`` of the grid (every
            ``n``-th configuration from the ``i``-th, in grid order: the same
            slice on every machine) into its own store ``out/shard-i-of-n``,
            which records the sweep and the shard for :func:`rdiag.merge.merge_stores`.
        address: The Ray cluster for ``executor="ray"`` (see
            :class:`~rdiag.ray_sweep.RayExecutor`).

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
    given = {k: _renamed(dict(v)) for k, v in (overrides or {}).items()}
    for section in ("base", "grid"):
        raw[section] = {**_renamed(raw[section]), **given.get(section, {})}
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
        from rdiag.report import build_report

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
                    by_run(cfg, store.root, run_id=rid)
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
