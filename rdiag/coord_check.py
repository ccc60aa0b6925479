"""Coordinate check: train a family across widths and fit the width exponents.

The check is the width experiment of the harness on one fixed batch: for each
width and seed the model is built and parametrized, trained for ``steps``
full-batch steps by :func:`rdiag.loop.fit` with the loss ``F.mse_loss`` (the
mean over all ``N * O`` output entries, the harness's regression loss), and a
:class:`~rdiag.monitor.Monitor` measures it on the ``probe`` inputs at
initialization and after the last step (``representations``, ``weights`` and,
optionally, ``ntk`` and ``linearization``). The metrics and their predicted
exponents are those of :mod:`rdiag.predictions` (docs/theory.md section 2), read
from the Monitor's records by :func:`rdiag.predictions.records_from_checks` and
fitted by :func:`rdiag.predictions.fit_records`, the same functions the report
uses on a sweep's store.

The kernel and linearization predictions hold after ``T >~ 10`` steps; after one
step with a small ``lr`` the measured slope is near ``r - 1`` (a zero-mean
first-step fluctuation dominates), and that is what is reported as the
prediction for ``steps == 1``. Finite widths bias slopes (up to ~0.2 at ``r = 0``
for the kernel exponents), so compare with a tolerance. The model must act on
each sample separately (no batch-coupled layers). A run that diverges (a
non-finite loss) is listed in ``CoordCheckResult.failed`` and left out of the fits.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import torch.nn.functional as F

from rdiag._checks import (
    check_choice,
    check_finite_positive,
    check_positive_int,
    check_seeds,
    check_sizes,
)
from rdiag._inputs import Inputs, tree_map
from rdiag._optional import require
from rdiag.functional import MODES, Mode, check_per_sample
from rdiag import loop
from rdiag.models import FAMILIES, make_model
from rdiag.parametrization import (
    OPTIMIZERS,
    Centered,
    Parametrization,
    apply_parametrization,
    layer_scales,
    lr_multipliers,
    make_optimizer,
    parse_parametrization,
)
from rdiag.predictions import PREDICTIONS, fit_records, richness_of
from rdiag.verdicts import judge_fits

#: The recorded metrics (:data:`rdiag.predictions.PREDICTIONS`).
METRICS: tuple[str, ...] = tuple(PREDICTIONS)
Family = str | Callable[[int], nn.Module]
#: Default base learning rates, calibrated with ``steps=10`` on the built-in MLP
#: over widths 64..1024 (bench/calibrate_verdicts.py): large enough that the
#: coherent kernel term dominates at r = 1/2, small enough for the edge of
#: stability at every width.
DEFAULT_LR: dict[str, float] = {"sgd": 0.3, "adam": 0.1}


class Checked:
    """What coordinate and depth checks share: fits with verdicts, lookup, saving.

    Each fit carries :func:`rdiag.verdicts.judge`'s ``"passed"`` (``None`` where
    nothing is predicted), ``"tolerance"`` and ``"reason"``.
    """

    fits: list[dict]
    failed: list[dict]
    #: The record key the fits are over: ``"width"`` or ``"depth"``.
    axis: ClassVar[str] = "width"

    @property
    def passed(self) -> bool:
        """Whether no run diverged and every predicted exponent passed."""
        return not self.failed and all(f["passed"] is not False for f in self.fits)

    @property
    def failures(self) -> list[dict]:
        """The fits that failed their prediction."""
        return [f for f in self.fits if f["passed"] is False]

    def fit(self, metric: str, layer: str | None = None) -> dict:
        """The fit of ``metric`` (for ``layer``); raises ``KeyError`` if absent."""
        for f in self.fits:
            if f["metric"] == metric and f["layer"] == layer:
                return f
        have = sorted({(f["metric"], f["layer"]) for f in self.fits}, key=str)
        raise KeyError(f"no fit for metric={metric!r}, layer={layer!r}; have {have}")

    def save(self, out_dir: str | Path) -> Path:
        """Write ``out_dir/summary.json``: the settings, fits, records and failed runs.

        Non-finite numbers are written as ``null``.

        Returns:
            The path of the written file.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        payload = {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(self).items()
        }
        payload["passed"] = self.passed
        path = out / "summary.json"
        path.write_text(json.dumps(jsonable(payload), indent=1), encoding="utf-8")
        return path


@dataclass(frozen=True)
class CoordCheckResult(Checked):
    """Raw measurements, fitted exponents and their verdicts of a coordinate check.

    Attributes:
        parametrization: The parametrization's label (``"r=0.25"``, ``"mup"``, ...).
        r: Its richness, or ``None``.
        optimizer: ``"sgd"`` or ``"adam"``.
        steps: Training steps.
        widths: The widths.
        seeds: The seeds.
        records: One dict per measurement: ``{"width", "seed", "metric", "layer",
            "role", "value"}`` (``layer``/``role`` ``None`` for model-level metrics).
        fits: One dict per fitted series: ``{"metric", "layer", "role",
            "parametrization", "r", "slope", "ci": [lo, hi], "predicted",
            "widths", "seeds", "passed", "tolerance", "reason"}``.
        failed: The runs that diverged: ``{"width", "seed", "reason"}``.
        lr: The base learning rate ``eta_0``.
    """

    parametrization: str
    r: float | None
    optimizer: str
    steps: int
    widths: tuple[int, ...]
    seeds: tuple[int, ...]
    records: list[dict] = field(repr=False)
    fits: list[dict] = field(repr=False)
    failed: list[dict] = field(default_factory=list, repr=False)
    lr: float = math.nan


def coord_check(
    family: Family,
    parametrization: Parametrization | str,
    widths: Sequence[int],
    *,
    steps: int = 10,
    seeds: int | Sequence[int] = 4,
    lr: float | None = None,
    optimizer: str = "sgd",
    data: tuple[Inputs, Tensor] | None = None,
    probe: Inputs | None = None,
    batch_size: int = 16,
    family_kwargs: Mapping[str, object] | None = None,
    roles: Mapping[str, str] | None = None,
    dtype: torch.dtype = torch.float32,
    ntk: bool = True,
    linearization: bool = True,
    confidence: float = 0.95,
    data_seed: int = 1234,
    device: str | torch.device | None = None,
    mode: Mode = "eval",
    output_fn: Callable[[object], Tensor] | None = None,
) -> CoordCheckResult:
    """Train ``family`` at each width and fit every metric's width exponent.

    Args:
        family: A built-in family name (``"mlp"``, ``"cnn"``,
            ``"transformer"``) or ``width -> nn.Module`` (then ``data`` is needed).
        parametrization: A :class:`Parametrization` or a :func:`parse_parametrization` string.
        widths: At least two widths (span >= 16x recommended).
        steps: Full-batch training steps ``T``.
        seeds: Number of seeds (``0..K-1``) or the seeds; a seed fixes the init.
        lr: Base learning rate ``eta_0`` (of ``F.mse_loss``: with ``O`` outputs this
            is ``O / 2`` times the rate of the ``0.5 * sum_o (f - y)^2`` convention);
            default :data:`DEFAULT_LR` of the optimizer, with ``steps=10``
            calibrated so that the built-in MLP's checks pass at r = 0, 1/4, 1/2.
        optimizer: ``"sgd"`` or ``"adam"``.
        data: Training batch ``(x (N, ...), y (N, O))`` (``x`` a tensor, tuple or
            dict of tensors); default ``batch_size``
            Gaussian (or random-token) inputs and standard normal targets drawn
            with ``data_seed``, the same for every width and seed.
        probe: Inputs ``(P, ...)`` for the measurements; default the training inputs.
        batch_size: Size of the default batch.
        family_kwargs: Constructor arguments of a built-in family.
        roles: Module name -> role, for user families whose roles are ambiguous.
        dtype: Model and data dtype.
        ntk: Measure ``ntk_rel_change`` (two eNTKs per run).
        linearization: Measure ``lin_error`` (one jvp per run).
        confidence: Level of the slope intervals.
        data_seed: Seed of the default data.
        device: Where to train and measure (default CPU). Weights are initialized
            on the CPU and moved, so a seed gives the same init on every device.
        mode: ``"eval"`` or ``"train"``: the mode the Monitor measures in (the
            same semantics as everywhere, :class:`~rdiag.functional.FunctionalModel`).
        output_fn: Picks the output tensor of a user family whose models return
            something else (default: a tensor as is, a ``ModelOutput``'s logits),
            for training and measuring alike.

    Returns:
        The :class:`CoordCheckResult`; every fit carries its verdict
        (:func:`rdiag.verdicts.judge`: pass or fail under a tolerance for
        finite-width bias, seed scatter and the first-step regime, with the
        reason) and ``.passed`` says whether all passed.

    Raises:
        ValueError: Bad widths/steps/seeds/lr/optimizer/mode, a user family without
            ``data``, or a width below the parameterization's base width.

    Example:
        >>> res = coord_check("mlp", "mup", [16, 32], steps=2, seeds=2, ntk=False)
        >>> fit = res.fit("delta_h", "hidden.0")
        >>> fit["predicted"], fit["parametrization"], fit["passed"] in (True, False)
        (0.5, 'mup', True)
        >>> fit["reason"].startswith(("slope", "inconclusive"))
        True
    """
    param = parse_parametrization(parametrization)
    check_choice(mode, "mode", MODES)
    lr = (
        DEFAULT_LR[check_choice(optimizer, "optimizer", OPTIMIZERS)]
        if lr is None
        else lr
    )
    widths, seeds = _check_args(
        family, widths, steps, seeds, lr, optimizer, data, confidence
    )
    build = _builder(family, family_kwargs or {})
    if data is None:
        data = _default_data(build(widths[0]), batch_size, data_seed)
    device = torch.device(device or "cpu")

    def cast(t: Tensor) -> Tensor:
        return t.to(device, dtype) if t.is_floating_point() else t.to(device)

    x, y = tree_map(cast, data[0]), cast(data[1])
    probe = x if probe is None else tree_map(cast, probe)
    records: list[dict] = []
    failed: list[dict] = []
    metrics = ["representations", "weights"]
    metrics += ["ntk"] * ntk + ["linearization"] * linearization
    options = {"metrics": metrics, "mode": mode, "output_fn": output_fn}
    for width in widths:
        for seed in seeds:
            torch.manual_seed(seed)
            model = apply_parametrization(build(width).to(dtype), param, roles=roles)
            model = model.to(device)
            measured = _run(model, param, x, y, probe, steps, lr, optimizer, options)
            if isinstance(measured, str):
                failed.append({"width": width, "seed": seed, "reason": measured})
                continue
            records += [dict(width=width, seed=seed, **rec) for rec in measured]
    fits = judge_fits(
        fit_records(records, param, steps, confidence=confidence),
        r=richness_of(param),
        steps=steps,
        lr=lr,
    )
    return CoordCheckResult(
        param.name,
        param.r,
        optimizer,
        steps,
        tuple(widths),
        tuple(seeds),
        records,
        fits,
        failed,
        lr,
    )


def _check_args(family, widths, steps, seeds, lr, optimizer, data, confidence):
    if isinstance(family, str):
        check_choice(family, "family", tuple(FAMILIES))
    elif not callable(family):
        raise TypeError(
            f"expected family to be a family name {sorted(FAMILIES)} or a callable "
            f"width -> nn.Module, got {type(family).__name__}"
        )
    elif data is None:
        raise ValueError(
            "expected data=(x, y) for a user model family (it has no sample_inputs); "
            "pass a fixed training batch"
        )
    widths = check_sizes(widths, "width")
    check_positive_int(steps, "steps")
    seeds = check_seeds(seeds)
    check_finite_positive(lr, "lr")
    check_choice(optimizer, "optimizer", OPTIMIZERS)
    if not 0 < confidence < 1:
        raise ValueError(f"expected confidence in (0, 1), got {confidence!r}")
    return widths, seeds


def _builder(
    family: Family, kwargs: Mapping[str, object]
) -> Callable[[int], nn.Module]:
    if isinstance(family, str):
        return lambda width: make_model(family, width, **kwargs)
    return family


def _default_data(model: nn.Module, n: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = model.sample_inputs(n, gen)
    return x, torch.randn(n, model.output_dim, generator=gen)


def _mse(out: Tensor, y: Tensor) -> Tensor:
    """``F.mse_loss`` on outputs flattened to ``(N, O)`` (a transformer's ``(N, T, V)``)."""
    return F.mse_loss(out.reshape(out.shape[0], -1), y.reshape(y.shape[0], -1))


def _run(
    model: nn.Module,
    param: Parametrization,
    x: Inputs,
    y: Tensor,
    probe: Inputs,
    steps: int,
    lr: float,
    optimizer: str,
    options: dict,
) -> list[dict] | str:
    """Train one model with a Monitor; its predicted records, or why it diverged."""
    check_per_sample(model, "train")
    roles = {n: s.role for n, s in layer_scales(model).items()}
    return loop.measured_fit(
        model,
        make_optimizer(model, param, lr, optimizer=optimizer),
        itertools.repeat((x, y), steps),
        _mse,
        probe,
        roles,
        steps=steps,
        lr_multipliers=lr_multipliers(model, param, optimizer),
        divergence_factor=None,
        centered=isinstance(model, Centered),
        **options,
    )


# ---- output ------------------------------------------------------------------------
def jsonable(obj: object) -> object:
    """``obj`` with non-finite floats as None (JSON has no NaN), recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def plot_coord_check(result: Checked, path: str | Path) -> Path:
    """Plot every fitted metric against width (or depth) on log-log axes, a panel each.

    Each series shows the per-size mean over seeds (points: every seed), its fitted
    slope with interval, and the predicted slope as a dashed line through the mean.
    ``result`` is a :class:`CoordCheckResult` or a depth check's result.
    Needs matplotlib (``pip install 'rdiag[plots]'``).

    Returns:
        The path of the written image.
    """
    Figure = require("matplotlib.figure", "plot_coord_check").Figure
    metrics = [m for m in METRICS if any(f["metric"] == m for f in result.fits)]
    cols = 3
    rows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows))
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, i + 1)
        for series in (f for f in result.fits if f["metric"] == metric):
            plot_series(ax, result.records, series, result.axis)
        ax.set(xscale="log", yscale="log", xlabel=result.axis, title=metric)
        ax.legend(fontsize=6)
    kind = "coordinate" if result.axis == "width" else "depth"
    fig.suptitle(
        f"{kind} check: {result.parametrization}, {result.optimizer}, T={result.steps}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_series(ax, records: list[dict], fit: dict, axis: str = "width") -> None:
    """One fitted series on a matplotlib ``ax``: per-size means, every seed, the prediction.

    Args:
        ax: The axes.
        records: The measurements ``{axis, "metric", "layer", "value"}``.
        fit: The series' fit (``"metric"``, ``"layer"``, ``"slope"``, ``"ci"``,
            ``"predicted"``).
        axis: The record key of the size: ``"width"`` or ``"depth"``.
    """
    recs = [
        r
        for r in records
        if r["metric"] == fit["metric"] and r["layer"] == fit["layer"]
    ]
    widths = np.array(sorted({r[axis] for r in recs}), float)
    means = np.array(
        [np.mean([r["value"] for r in recs if r[axis] == w]) for w in widths]
    )
    lo, hi = fit["ci"]
    label = f"{fit['layer'] or 'model'}: {fit['slope']:.2f} [{lo:.2f}, {hi:.2f}]"
    line = ax.plot(widths, means, "o-", ms=3, label=label)[0]
    ax.scatter(
        [r[axis] for r in recs],
        [r["value"] for r in recs],
        s=4,
        color=line.get_color(),
        alpha=0.4,
    )
    if fit["predicted"] is not None and np.all(means > 0):
        anchor = np.exp(
            np.mean(np.log(means)) - fit["predicted"] * np.mean(np.log(widths))
        )
        ax.plot(
            widths,
            anchor * widths ** fit["predicted"],
            "--",
            color=line.get_color(),
            lw=0.8,
            label=f"predicted {fit['predicted']:.2f}",
        )
