"""Thin training loop with a Monitor, and resumable r x width x seed x lr sweeps.

:func:`train` runs one configuration (a :class:`TrainConfig`, a dict, or keyword
arguments) and writes everything into a :class:`~rdiag.store.Store`. :func:`sweep`
expands a grid over any config fields (``param``/``r``, ``width``, ``seed``, ``lr``,
...) and runs the configurations through an :class:`Executor`: by default a
``concurrent.futures.ProcessPoolExecutor`` (spawned workers, one torch thread
each), or anything with ``submit``/``shutdown`` (a Ray-backed one can take over
without changing this module). Runs are keyed by their configuration
(:func:`rdiag.store.run_key`), so re-running a sweep skips finished runs and
re-does unfinished ones without duplicating records.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import itertools
import logging
import math
import multiprocessing as mp
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdiag._checks import check_choice
from rdiag._optional import require
from rdiag.data import DATASETS, Dataset, batches, load_data
from rdiag.monitor import METRICS, Monitor
from rdiag.store import Store

logger = logging.getLogger("rdiag")

MODELS = ("mlp", "cnn", "transformer")
OPTIMIZERS = ("sgd", "adam", "gd", "online")
LOSSES = ("auto", "mse", "ce")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEVICES = ("cpu", "cuda", "auto")


@dataclass
class TrainConfig:
    """One training run. Every field can be set from YAML / the CLI.

    Attributes:
        model: ``"mlp"``, ``"cnn"`` or ``"transformer"``.
        width: The width knob (hidden units, channels, ``d_model``).
        depth: Weight layers (MLP), conv layers (CNN) or blocks (transformer).
        activation: Activation of the MLP / CNN.
        param: Parameterization string (``"r=0.25"``, ``"ntk"``, ``"mup"``, ``"sp"``,
            ``"mf"``, ``"gamma=0.1"``), see :func:`rdiag.parametrization.parse_param`.
        optimizer: ``"sgd"`` (minibatch), ``"adam"``, ``"gd"`` (full batch) or
            ``"online"`` (every sample used once).
        lr: Base learning rate ``eta0`` (per-layer rates follow ``param``).
        steps: Optimizer steps.
        batch_size: Minibatch size (ignored by ``"gd"``).
        momentum: SGD momentum.
        data: ``"teacher"``, ``"digits"``, ``"cifar10"`` or ``"sequences"``.
        data_options: Keyword arguments of the data loader (e.g. ``root`` for CIFAR-10).
        model_options: Extra keyword arguments of the model family.
        loss: ``"mse"``, ``"ce"`` or ``"auto"`` (MSE for regression, CE otherwise).
        seed: Seed of initialization, data order and data generation.
        dtype: ``"float32"`` or ``"float64"``.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available).
        probe_size: Probe batch size (the first test samples).
        every: Monitor every this many steps (the last step is always measured).
        metrics: Monitor metrics (:data:`rdiag.monitor.METRICS`).
        budget_fraction: Monitor cost budget (fraction of training time) or None.
        snapshots: Save the probe eNTK and sharpness eigenvectors of each check as
            arrays (see :class:`~rdiag.monitor.Monitor`).
    """

    model: str = "mlp"
    width: int = 128
    depth: int = 3
    activation: str = "tanh"
    param: str = "mup"
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

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build and validate a config; unknown fields and bad values name the field.

        Args:
            values: Field name -> value.

        Returns:
            The validated :class:`TrainConfig`.

        Raises:
            ValueError: Unknown field, or a value outside its allowed set / range.
        """
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
        from rdiag.parametrization import parse_param

        for name, allowed in (
            ("model", MODELS),
            ("optimizer", OPTIMIZERS),
            ("loss", LOSSES),
            ("data", DATASETS),
            ("dtype", tuple(DTYPES)),
            ("device", DEVICES),
        ):
            check_choice(getattr(self, name), name, allowed)
        for name in ("width", "depth", "steps", "batch_size", "probe_size", "every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(
                    f"expected config field {name!r} to be a positive int, got {v!r}"
                )
        if not (
            isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0
        ):
            raise ValueError(
                f"expected config field 'lr' to be a finite number > 0, got {self.lr!r}"
            )
        try:
            parse_param(self.param)
        except ValueError as err:
            raise ValueError(f"bad config field 'param': {err}") from err
        bad = [m for m in self.metrics if m not in METRICS]
        if bad:
            raise ValueError(
                f"bad config field 'metrics': {bad}; allowed values are {list(METRICS)}"
            )
        for name in ("data_options", "model_options"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(
                    f"expected config field {name!r} to be a mapping (key: value), got "
                    f"{getattr(self, name)!r}"
                )

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain dict (what the store records and keys runs by)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainResult:
    """Outcome of :func:`train`.

    Attributes:
        run_id: The store's run id.
        store: Root directory of the store.
        status: ``"finished"``, ``"failed"`` (diverged) or ``"skipped"`` (already finished).
        final_loss: Last training-batch loss (``nan`` if skipped).
        seconds: Wall time of the run; ``monitor_seconds``: of which diagnostics.
    """

    run_id: str
    store: str
    status: str
    final_loss: float
    seconds: float
    monitor_seconds: float


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
        else ("mse" if data.task == "regression" else "ce")
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
            "bad config field 'loss': 'ce' needs classification data; use 'mse'"
        )
    if cfg.model == "transformer":
        return _token_cross_entropy
    return F.cross_entropy


def _token_cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy over every position: ``out (N, T, V)``, ``y (N, T)``."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def build_model(cfg: TrainConfig, data: Dataset) -> nn.Module:
    """The parametrized model of a config, sized to the data.

    Args:
        cfg: The run configuration.
        data: The dataset (fixes input shape and number of outputs).

    Returns:
        The model, parametrized by ``cfg.param``, in ``cfg.dtype``.

    Raises:
        ValueError: The family does not fit the data's input shape.
    """
    from rdiag.models import make_model

    opts: dict[str, Any] = {"depth": cfg.depth}
    if cfg.model == "mlp":
        if len(data.in_shape) != 1:
            raise ValueError(
                f"model 'mlp' needs flat inputs, got input shape {data.in_shape}; use "
                "model 'cnn' for images or data_options flatten: true"
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
        cfg.model, cfg.width, parametrization=cfg.param, seed=cfg.seed, **opts
    )
    return model.to(DTYPES[cfg.dtype])


def train(
    config: TrainConfig | Mapping[str, Any] | None = None,
    *,
    store: Store | str | Path,
    run_id: str | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train one configuration with a :class:`~rdiag.monitor.Monitor` attached.

    The Monitor measures at step 0 (initialization), every ``every`` steps and at the
    last step, on the first ``probe_size`` test samples; the training-batch loss of
    every step is recorded as ``train_loss``. A non-finite loss stops the run and
    marks it ``failed``.

    Args:
        config: A :class:`TrainConfig` or a dict of its fields (default all defaults).
        store: A :class:`~rdiag.store.Store` or a directory (created if missing).
        run_id: Explicit run id (default the config's :func:`~rdiag.store.run_key`).
        **overrides: Config fields overriding ``config``.

    Returns:
        A :class:`TrainResult`; ``status="skipped"`` if the store already holds the
        finished run.

    Raises:
        ValueError: A bad config field (named, with its allowed values).
    """
    base = config.to_dict() if isinstance(config, TrainConfig) else dict(config or {})
    cfg = TrainConfig.from_dict({**base, **overrides})
    store = store if isinstance(store, Store) else Store(store)
    device = _device(cfg.device)
    rid = store.create_run(
        cfg.to_dict(), run_id=run_id, seed=cfg.seed, device=str(device)
    )
    if store.status(rid) == "finished":
        return TrainResult(rid, str(store.root), "skipped", float("nan"), 0.0, 0.0)
    tic = time.perf_counter()
    data_options = dict(cfg.data_options)
    if cfg.data != "cifar10":
        data_options.setdefault("seed", cfg.seed)
    data = load_data(cfg.data, **data_options).to(DTYPES[cfg.dtype])
    model = build_model(cfg, data).to(device)
    loss_fn = _loss_fn(cfg, data)
    from rdiag.parametrization import lr_multipliers, make_optimizer

    kind = "adam" if cfg.optimizer == "adam" else "sgd"
    opt = make_optimizer(model, None, cfg.lr, optimizer=kind, momentum=cfg.momentum)
    probe = (
        data.x_test[: cfg.probe_size].to(device),
        data.y_test[: cfg.probe_size].to(device),
    )
    monitor = Monitor(
        model,
        probe,
        every=cfg.every,
        metrics=cfg.metrics,
        loss_fn=loss_fn,
        store=store,
        run_id=rid,
        lr_multipliers=lr_multipliers(model, optimizer=kind),
        optimizer=opt if kind == "adam" else None,
        budget_fraction=cfg.budget_fraction,
        snapshots=cfg.snapshots,
    )
    mode = {"gd": "gd", "online": "online"}.get(cfg.optimizer, "sgd")
    pending: list[tuple[int, str, str, float]] = []
    status, loss_value = "finished", float("nan")
    for step, (xb, yb) in enumerate(
        batches(data, cfg.batch_size, cfg.steps, mode=mode, seed=cfg.seed)
    ):
        if monitor.scheduled(step):
            store.log_rows(rid, pending)
            pending = []
        monitor.step(step)
        xb, yb = xb.to(device), yb.to(device)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        opt.step()
        loss_value = float(loss.detach())
        pending.append((step, "train_loss", "", loss_value))
        if not math.isfinite(loss_value):
            status = "failed"
            logger.warning(
                "run %s diverged at step %d (loss %s)", rid, step, loss_value
            )
            break
    store.log_rows(rid, pending)
    if status == "finished":
        monitor.step(cfg.steps, force=True)
    store.set_status(rid, status)
    return TrainResult(
        rid,
        str(store.root),
        status,
        loss_value,
        time.perf_counter() - tic,
        monitor.seconds,
    )


# ---- sweeps ----------------------------------------------------------------------
class Executor(Protocol):
    """What :func:`sweep` needs from an executor (``concurrent.futures`` style).

    ``ProcessPoolExecutor``, ``ThreadPoolExecutor``, :class:`SerialExecutor` and
    :class:`RayExecutor` (futures from ``ObjectRef.future()``) qualify.
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


class RayExecutor:
    """Runs each call as a Ray task (``pip install 'rdiag[ray]'``; Ray imported here only).

    Args:
        **options: ``ray.remote`` options per task, e.g. ``num_cpus=1``.

    Raises:
        ImportError: Ray is not installed.
    """

    def __init__(self, **options: Any) -> None:
        self._ray = require("ray", "RayExecutor")
        if not self._ray.is_initialized():
            self._ray.init()
        self._options = options or {"num_cpus": 1}

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        """Launch ``fn`` as a Ray task; return a ``concurrent.futures`` future of it."""
        remote = self._ray.remote(**self._options)(fn)
        return remote.remote(*args, **kwargs).future()

    def shutdown(self, wait: bool = True) -> None:
        """Leave the Ray runtime to its owner (nothing to release per sweep)."""


def _worker_init() -> None:
    torch.set_num_threads(1)


def process_executor(workers: int) -> cf.ProcessPoolExecutor:
    """A spawn-based process pool with one torch thread per worker."""
    return cf.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=mp.get_context("spawn"),
        initializer=_worker_init,
    )


def load_sweep_config(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """Read a sweep config: a dict, a YAML path, or ``"default"`` (the packaged one).

    Format::

        base:            # TrainConfig fields shared by every run
          model: mlp
          steps: 20
        grid:            # lists; the sweep is their Cartesian product
          r: [0, 0.25, 0.5]      # shorthand for param: ["r=0", ...]
          width: [64, 128, 256]
          seed: [0, 1]
        workers: 2       # optional
        report: true     # optional

    Returns:
        The config dict with ``base`` and ``grid`` present.

    Raises:
        FileNotFoundError: The path does not exist.
        ValueError: Unknown top-level keys, a grid value that is not a list, or
            unparsable YAML.
    """
    if isinstance(source, Mapping):
        raw = dict(source)
    else:
        yaml = require("yaml", "reading a sweep config")
        if str(source) == "default":
            from importlib import resources

            text = resources.files("rdiag").joinpath("configs/default.yaml").read_text()
        else:
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(
                    f"sweep config {path} does not exist; pass a YAML file or 'default'"
                )
            text = path.read_text()
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ValueError(
                f"could not parse the sweep config {source}: {err}"
            ) from err
    allowed = ("base", "grid", "workers", "report", "name")
    unknown = [k for k in raw if k not in allowed]
    if unknown:
        raise ValueError(
            f"unknown sweep config key(s) {unknown}; allowed keys are {list(allowed)}"
        )
    raw.setdefault("base", {})
    raw.setdefault("grid", {})
    for key, values in raw["grid"].items():
        if not isinstance(values, list) or not values:
            raise ValueError(
                f"expected grid.{key} to be a non-empty list, got {values!r}"
            )
    return raw


def expand_grid(sweep_config: Mapping[str, Any]) -> list[TrainConfig]:
    """All configurations of a sweep (Cartesian product of the grid over the base).

    A grid key ``r`` sets ``param`` to ``"r=<value>"``.

    Args:
        sweep_config: ``{"base": {...}, "grid": {...}}``.

    Returns:
        One validated :class:`TrainConfig` per grid point.

    Raises:
        ValueError: A field is unknown or invalid (named, with allowed values).
    """
    base = dict(sweep_config.get("base", {}))
    grid = dict(sweep_config.get("grid", {}))
    if "r" in grid:
        if "param" in grid:
            raise ValueError("grid sets both 'r' and 'param'; use one of them")
        grid["param"] = [f"r={v:g}" for v in grid.pop("r")]
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


def _run_config(cfg: dict[str, Any], root: str) -> TrainResult:
    return train(cfg, store=root)


def sweep(
    config: str | Path | Mapping[str, Any],
    *,
    out: str | Path,
    workers: int | None = None,
    executor: Executor | None = None,
    progress: bool = False,
    report: bool | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> SweepResult:
    """Run a grid of configurations into ``out`` (store + optional report), resumably.

    Args:
        config: Sweep config (see :func:`load_sweep_config`).
        out: Output directory: the store (``rdiag.sqlite``, ``arrays/``) and report.
        workers: Worker processes (default the config's ``workers`` or 1); 1 runs in
            this process. Workers are spawned, so a script calling :func:`sweep`
            with ``workers > 1`` needs the ``if __name__ == "__main__":`` guard.
        executor: An :class:`Executor` overriding ``workers``.
        progress: Show a tqdm progress bar (stderr).
        report: Build the report at the end (default the config's ``report``, True).
        overrides: ``{"base": {...}, "grid": {...}}`` entries replacing the config's.

    Returns:
        A :class:`SweepResult`. Finished runs already in the store are skipped.

    Raises:
        ValueError: A bad config (before anything runs). An exception inside a run
            cancels the queued runs and is re-raised; re-running the sweep resumes.
    """
    raw = load_sweep_config(config)
    for section in ("base", "grid"):
        raw[section] = {**raw[section], **dict((overrides or {}).get(section, {}))}
    if "param" in raw["grid"] and "r" in (overrides or {}).get("grid", {}):
        raw["grid"].pop("param")
    if "r" in raw["grid"] and "param" in (overrides or {}).get("grid", {}):
        raw["grid"].pop("r")
    configs = expand_grid(raw)
    store = Store(out)
    todo = []
    results: list[TrainResult] = []
    for cfg in configs:
        rid = store.create_run(cfg.to_dict(), seed=cfg.seed, device=cfg.device)
        if store.status(rid) == "finished":
            results.append(
                TrainResult(rid, str(store.root), "skipped", float("nan"), 0.0, 0.0)
            )
        else:
            todo.append(cfg.to_dict())
    workers = workers or int(raw.get("workers", 1))
    own = executor is None
    if own:
        executor = SerialExecutor() if workers <= 1 else process_executor(workers)
    bar = None
    if progress:
        bar = require("tqdm", "sweep progress").tqdm(
            total=len(configs), initial=len(results), desc="rdiag sweep", unit="run"
        )
    futures: list[cf.Future] = []
    try:
        futures = [executor.submit(_run_config, cfg, str(store.root)) for cfg in todo]
        for fut in cf.as_completed(futures):
            results.append(fut.result())
            if bar is not None:
                bar.update(1)
    except BaseException:
        for (
            fut
        ) in futures:  # fail fast: drop queued runs (running ones finish, resumable)
            fut.cancel()
        raise
    finally:
        if bar is not None:
            bar.close()
        if own:
            executor.shutdown(wait=True)
    paths: dict[str, str] = {}
    if report if report is not None else raw.get("report", True):
        from rdiag.report import build_report

        paths = {k: str(v) for k, v in build_report(store, out).items()}
    return SweepResult(str(store.root), results, paths)
