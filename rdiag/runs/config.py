"""What a run and a sweep are: :class:`TrainConfig`, sweep configs, shards.

A run is one :class:`TrainConfig` (a dict or YAML file of its fields, every
field validated with its allowed values named); a sweep config is a ``base`` of
fields and a ``grid`` of lists, expanded into configurations by
:func:`expand_grid`; ``"i/n"`` names one deterministic slice of a grid
(:func:`parse_shard`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from rdiag._checks import (
    check_choice,
    check_nonnegative_int,
    check_positive_int,
    check_real,
)
from rdiag._optional import require
from rdiag.data import BATCH_MODES, DATASETS
from rdiag.loop import DIVERGENCE_FACTOR
from rdiag.losses import LOSS_KINDS
from rdiag.models import ACTIVATIONS, FAMILIES
from rdiag.monitor import METRICS
from rdiag.parametrization import OPTIMIZERS as PARAM_OPTIMIZERS
from rdiag.parametrization import parse_parametrization
from rdiag.runs.store import Store, run_key

#: Optimizers (:mod:`rdiag.parametrization`) and the batch streams of SGD
#: (:data:`rdiag.data.BATCH_MODES`: full-batch ``"gd"``, one-pass ``"online"``).
OPTIMIZERS = (*PARAM_OPTIMIZERS, *(m for m in BATCH_MODES if m not in PARAM_OPTIMIZERS))


#: Losses: the loss kinds of :mod:`rdiag.operators.ggn` a config can name, or auto.
LOSSES = ("auto", *(k for k in LOSS_KINDS if k != "autodiff"))


DTYPES = {"float32": torch.float32, "float64": torch.float64}


DEVICES = ("cpu", "cuda", "auto")


@dataclass
class TrainConfig:
    """One training run. Every field can be set from YAML / the CLI.

    Attributes:
        family: A family of :data:`rdiag.models.FAMILIES` (``"mlp"``, ``"cnn"``,
            ``"transformer"``, ``"bn_mlp"``).
        width: The width knob (hidden units, channels, ``d_model``).
        depth: Weight layers (MLP), conv layers (CNN) or blocks (transformer).
        activation: Activation of the MLP / CNN.
        parametrization: Parametrization string (``"r=0.25"``, ``"ntk"``, ``"mup"``,
            ``"sp"``, ``"mf"``, ``"gamma=0.1"``), see
            :func:`rdiag.parametrization.parse_parametrization`.
        optimizer: ``"sgd"`` (minibatch), ``"adam"``, ``"gd"`` (full batch) or
            ``"online"`` (every sample used once).
        lr: Base learning rate ``eta0`` (per-layer rates follow ``parametrization``).
        steps: Optimizer steps.
        batch_size: Minibatch size (ignored by ``"gd"``).
        momentum: SGD momentum.
        data: ``"teacher"``, ``"digits"``, ``"cifar10"`` or ``"sequences"``.
        data_options: Keyword arguments of the data loader (e.g. ``root`` for CIFAR-10).
        model_options: Extra keyword arguments of the model family.
        loss: ``"mse"``, ``"cross_entropy"`` or ``"auto"``
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

    family: str = "mlp"
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
        values = dict(values)
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
        for name, allowed in (
            ("family", tuple(FAMILIES)),
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

        A field added later (with a default) or renamed leaves it unchanged, so
        the run's id (:func:`config_id`) does too.
        """
        default = TrainConfig()
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        }


#: Field names and values of stores written two formats back (before
#: :data:`rdiag.runs.store.ID_NAMES`), read when matching their runs.
_OLDER_FIELDS = {"param": "parametrization"}
_OLDER_LOSSES = {"ce": "cross_entropy"}


def config_id(config: TrainConfig | Mapping[str, Any]) -> str:
    """A run's id: :func:`~rdiag.runs.store.run_key` of its canonical config.

    Raises:
        ValueError: A bad config field.
    """
    if not isinstance(config, TrainConfig):
        config = TrainConfig.from_dict(config)
    return run_key(config.canonical())


def stored_ids(store: Store) -> dict[str, str]:
    """Canonical id -> the id a run has in ``store``, where the two differ.

    Runs written before ids were canonical (keyed by the whole config, perhaps
    under older field names, without fields added since) are found again, so
    that resuming re-runs nothing. Configs that no longer validate (fields
    since removed) are left out.
    """
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    found = {}
    for rid in store.run_ids():
        values = store.config(rid)
        for old, new in _OLDER_FIELDS.items():
            if old in values and new not in values:
                values[new] = values.pop(old)
        values["loss"] = _OLDER_LOSSES.get(values.get("loss"), values.get("loss"))
        if values["loss"] is None:
            del values["loss"]
        try:
            cid = config_id({k: v for k, v in values.items() if k in known})
        except (ValueError, TypeError):
            continue
        if cid != rid:
            found.setdefault(cid, rid)
    return found


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
    return _yaml_file(path, "run config", "")


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
    base = dict(sweep_config.get("base", {}))
    grid = dict(sweep_config.get("grid", {}))
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
