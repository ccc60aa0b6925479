"""Coordinate check: train a family across widths and fit the width exponents.

For each width and seed the model is built, parametrized, trained for ``steps``
full-batch steps on a fixed batch, and these are measured (``probe`` inputs,
per-input Euclidean norms averaged over the probe):

=================  ==========================================  ====================
metric             quantity                                    predicted exponent
=================  ==========================================  ====================
``h0``             ``||h||`` at init, read-in/hidden outputs   ``1/2``
``delta_h``        ``||h_T - h_0||``, read-in/hidden outputs   ``r``
``f0``             ``||f_0||`` (not for centered models)       ``-r``
``delta_f``        ``||f_T - f_0||``                           ``0``
``dW_op``          ``||W_T - W_0||_op``, effective weights     ``r``, ``r-1/2``,
                                                               ``-1/2`` (in/hid/out)
``dW_fro``         ``||W_T - W_0||_F``                         (recorded, not fitted)
``dW_rel``         ``||W_T - W_0||_op / ||W_0||_op``           ``r - 1/2``
``ntk_rel_change`` ``||K_T - K_0||_F / ||K_0||_F``, ``K_M``    ``2r - 1``
``lin_error``      ``||f_T - f_lin,T|| / ||f_T - f_0||``       ``2r - 1``
=================  ==========================================  ====================

``h`` is the output of a layer module (after its forward multiplier: a
pre-activation). ``K_M`` is the learning-rate-weighted eNTK
``rdiag.empirical_ntk(model, probe, weights=lr_multipliers(...))`` (traced over
outputs) and ``f_lin,T = f_0 + J_0 (theta_T - theta_0)`` is computed with
``torch.func.jvp`` on the functional view. The last two predictions hold after
``T >~ 10`` steps; after one step with a small ``lr`` the measured slope is near
``r - 1`` (a zero-mean first-step fluctuation dominates), and that is what is
reported as the prediction for ``steps == 1``. Predictions exist for the richness
family (and NTK, muP, mean-field); the gamma family at a fixed ``gamma0`` scales
like muP (``r = 1/2``); for SP only ``delta_f`` (``+1``: SP is not on the scale)
and ``f0``, ``h0`` (``0``, ``1/2``) are predicted.

Fits (:func:`rdiag.metrics.fit_exponent`): ordinary least squares of
``log(value)`` on ``log(width)`` over every ``(width, seed)`` point; the interval
is the t-interval on the slope
(``slope +- t_{df, (1+confidence)/2} * se``, ``df = points - 2``). Seeds are
treated as independent draws at each width. Finite widths bias slopes (up to
~0.2 at ``r = 0`` for the kernel exponents), so compare with a tolerance.

Norms come from :mod:`rdiag.metrics` (``representation_movement``,
``matrix_norms``: Lanczos on the Gram for wide layers). The loss is ``0.5 * sum_outputs (f - y)**2`` averaged over the batch (outputs
flattened to ``(N, O)``). The model must act on each sample separately (no
batch-coupled layers) for the eNTK and linearization metrics.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from rdiag._autodiff import jvp, probe_jvp_mode
from rdiag._checks import check_choice, check_finite_positive, check_positive_int
from rdiag._optional import require
from rdiag.functional import functionalize
from rdiag.metrics import fit_exponent, matrix_norms, representation_movement
from rdiag.models import FAMILIES, make_model
from rdiag.ntk.api import empirical_ntk
from rdiag.predictions import predicted_exponent
from rdiag.parametrization import (
    OPTIMIZERS,
    Centered,
    Parametrization,
    apply_parametrization,
    effective_weights,
    layer_scales,
    lr_multipliers,
    make_optimizer,
    parse_param,
)

METRICS: tuple[str, ...] = (
    "h0",
    "delta_h",
    "f0",
    "delta_f",
    "dW_op",
    "dW_fro",
    "dW_rel",
    "ntk_rel_change",
    "lin_error",
)
_FITTED = tuple(m for m in METRICS if m != "dW_fro")
Family = str | Callable[[int], nn.Module]


@dataclass(frozen=True)
class CoordCheckResult:
    """Raw measurements and fitted exponents of a coordinate check.

    Attributes:
        param: The parameterization label (``"r=0.25"``, ``"mup"``, ...).
        r: Its richness, or ``None``.
        optimizer: ``"sgd"`` or ``"adam"``.
        steps: Training steps.
        widths: The widths.
        seeds: The seeds.
        records: One dict per measurement: ``{"width", "seed", "metric", "layer",
            "role", "value"}`` (``layer``/``role`` ``None`` for model-level metrics).
        fits: One dict per fitted series: ``{"metric", "layer", "param", "r",
            "slope", "ci": [lo, hi], "predicted"}``.
    """

    param: str
    r: float | None
    optimizer: str
    steps: int
    widths: tuple[int, ...]
    seeds: tuple[int, ...]
    records: list[dict] = field(repr=False)
    fits: list[dict] = field(repr=False)

    def save(self, out_dir: str | Path) -> Path:
        """Write ``out_dir/summary.json``: the fits, the raw records and the settings.

        Non-finite numbers are written as ``null``.

        Returns:
            The path of the written file.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        payload = {
            "param": self.param,
            "r": self.r,
            "optimizer": self.optimizer,
            "steps": self.steps,
            "widths": list(self.widths),
            "seeds": list(self.seeds),
            "fits": self.fits,
            "records": self.records,
        }
        path = out / "summary.json"
        path.write_text(json.dumps(_jsonable(payload), indent=1), encoding="utf-8")
        return path

    def fit(self, metric: str, layer: str | None = None) -> dict:
        """The fit of ``metric`` (for ``layer``); raises ``KeyError`` if absent."""
        for f in self.fits:
            if f["metric"] == metric and f["layer"] == layer:
                return f
        have = sorted({(f["metric"], f["layer"]) for f in self.fits}, key=str)
        raise KeyError(f"no fit for metric={metric!r}, layer={layer!r}; have {have}")


def coord_check(
    model_family: Family,
    parametrization: Parametrization | str,
    widths: Sequence[int],
    *,
    steps: int = 10,
    seeds: int | Sequence[int] = 4,
    lr: float = 0.1,
    optimizer: str = "sgd",
    data: tuple[Tensor, Tensor] | None = None,
    probe: Tensor | None = None,
    batch_size: int = 16,
    family_kwargs: Mapping[str, object] | None = None,
    roles: Mapping[str, str] | None = None,
    dtype: torch.dtype = torch.float32,
    ntk: bool = True,
    linearization: bool = True,
    confidence: float = 0.95,
    data_seed: int = 1234,
    device: str | torch.device | None = None,
) -> CoordCheckResult:
    """Train ``model_family`` at each width and fit every metric's width exponent.

    Args:
        model_family: A built-in family name (``"mlp"``, ``"cnn"``,
            ``"transformer"``) or ``width -> nn.Module`` (then ``data`` is needed).
        parametrization: A :class:`Parametrization` or a :func:`parse_param` string.
        widths: At least two widths (span >= 16x recommended).
        steps: Full-batch training steps ``T``.
        seeds: Number of seeds (``0..K-1``) or the seeds; a seed fixes the init.
        lr: Base learning rate ``eta_0``.
        optimizer: ``"sgd"`` or ``"adam"``.
        data: Training batch ``(x (N, ...), y (N, O))``; default ``batch_size``
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

    Returns:
        The :class:`CoordCheckResult`.

    Raises:
        ValueError: Bad widths/steps/seeds/lr/optimizer, a user family without
            ``data``, or a width below the parameterization's base width.

    Example:
        >>> res = coord_check("mlp", "mup", [16, 32], steps=2, seeds=2, ntk=False)
        >>> fit = res.fit("delta_h", "hidden.0")
        >>> sorted(fit), fit["predicted"], fit["param"]
        (['ci', 'layer', 'metric', 'param', 'predicted', 'r', 'slope'], 0.5, 'mup')
    """
    param = parse_param(parametrization)
    widths, seeds = _check_args(
        model_family, widths, steps, seeds, lr, optimizer, data, confidence
    )
    build = _builder(model_family, family_kwargs or {})
    if data is None:
        data = _default_data(build(widths[0]), batch_size, data_seed)
    device = torch.device(device or "cpu")

    def cast(t: Tensor) -> Tensor:
        return t.to(device, dtype) if t.is_floating_point() else t.to(device)

    x, y = (cast(t) for t in data)
    probe = x if probe is None else cast(probe)
    records: list[dict] = []
    for width in widths:
        for seed in seeds:
            torch.manual_seed(seed)
            model = apply_parametrization(build(width).to(dtype), param, roles=roles)
            model = model.to(device)
            measured = _run(
                model, param, x, y, probe, steps, lr, optimizer, ntk, linearization
            )
            records += [dict(width=width, seed=seed, **rec) for rec in measured]
    fits = _fit_all(records, param, steps, confidence)
    return CoordCheckResult(
        param.name,
        param.r,
        optimizer,
        steps,
        tuple(widths),
        tuple(seeds),
        records,
        fits,
    )


def _check_args(family, widths, steps, seeds, lr, optimizer, data, confidence):
    if isinstance(family, str):
        check_choice(family, "model_family", tuple(FAMILIES))
    elif not callable(family):
        raise TypeError(
            f"expected model_family to be a family name {sorted(FAMILIES)} or a callable "
            f"width -> nn.Module, got {type(family).__name__}"
        )
    elif data is None:
        raise ValueError(
            "expected data=(x, y) for a user model family (it has no sample_inputs); "
            "pass a fixed training batch"
        )
    widths = list(widths)
    for w in widths:
        check_positive_int(w, "every width")
    if len(set(widths)) < 2:
        raise ValueError(
            f"expected at least two distinct widths to fit a slope, got {widths}"
        )
    check_positive_int(steps, "steps")
    seeds = (
        list(range(seeds))
        if isinstance(seeds, int) and not isinstance(seeds, bool)
        else list(seeds)
    )
    if not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(
            f"expected seeds as a positive int or a list of ints, got {seeds!r}"
        )
    check_finite_positive(lr, "lr")
    check_choice(optimizer, "optimizer", OPTIMIZERS)
    if not 0 < confidence < 1:
        raise ValueError(f"expected confidence in (0, 1), got {confidence!r}")
    return sorted(widths), seeds


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


def _capture(model: nn.Module, probe: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Model output ``(P, O)`` and every read-in/hidden layer's output on the probe."""
    layers = {
        n: model.get_submodule(n)
        for n, s in layer_scales(model).items()
        if s.role in ("readin", "hidden")
    }
    seen: dict[str, Tensor] = {}
    handles = [
        m.register_forward_hook(
            lambda mod, i, o, name=n: seen.__setitem__(name, o.detach())
        )
        for n, m in layers.items()
    ]
    try:
        with torch.no_grad():
            out = model(probe)
    finally:
        for h in handles:
            h.remove()
    return out.reshape(out.shape[0], -1), seen


def _run(
    model, param, x, y, probe, steps, lr, optimizer, ntk, linearization
) -> list[dict]:
    weights = lr_multipliers(model, param, optimizer)
    if functionalize(model, mode="train").batch_coupled:
        raise ValueError(
            f"expected a model that acts on each sample separately, got "
            f"{type(model).__name__} with batch norm or dropout; a coordinate check "
            "compares per-input representations and per-sample kernels, which a "
            "batch-coupled network does not have; remove those layers or study it "
            "with rdiag.empirical_ntk(..., mode='train') on a fixed batch"
        )
    fm = functionalize(model)
    theta0 = {n: p.clone() for n, p in fm.params.items()}
    f0, h0 = _capture(model, probe)
    w0 = {n: w.clone() for n, w in effective_weights(model).items()}
    k0 = empirical_ntk(model, probe, lr_multipliers=weights) if ntk else None
    opt = make_optimizer(model, param, lr, optimizer=optimizer)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = 0.5 * (out.reshape(out.shape[0], -1) - y).pow(2).sum(1).mean()
        loss.backward()
        opt.step()
    ft, ht = _capture(model, probe)
    roles = {n: s.role for n, s in layer_scales(model).items()}
    recs = [_rec("delta_f", None, None, representation_movement(ft, f0))]
    if not isinstance(model, Centered):
        recs.append(
            _rec("f0", None, None, representation_movement(f0, torch.zeros_like(f0)))
        )
    for n in h0:
        recs.append(
            _rec(
                "h0",
                n,
                roles[n],
                representation_movement(h0[n], torch.zeros_like(h0[n])),
            )
        )
        recs.append(_rec("delta_h", n, roles[n], representation_movement(ht[n], h0[n])))
    for n, wt in effective_weights(model).items():
        dw = wt - w0[n]
        op, fro = matrix_norms(dw)
        recs.append(_rec("dW_op", n, roles[n], op))
        recs.append(_rec("dW_fro", n, roles[n], fro))
        recs.append(_rec("dW_rel", n, roles[n], op / matrix_norms(w0[n])[0]))
    if ntk:
        kt = empirical_ntk(model, probe, lr_multipliers=weights)
        recs.append(
            _rec("ntk_rel_change", None, None, float((kt - k0).norm() / k0.norm()))
        )
    if linearization:
        delta = {
            n: p.detach() - theta0[n] for n, p in functionalize(model).params.items()
        }
        lin = f0 + _jvp_at(fm, probe, theta0, delta).detach()
        recs.append(
            _rec("lin_error", None, None, float((ft - lin).norm() / (ft - f0).norm()))
        )
    return recs


def _jvp_at(fm, probe: Tensor, theta0: dict, delta: dict) -> Tensor:
    """``J_0 delta`` on the probe, with the forward-mode fallbacks of rdiag._autodiff.

    Ops without forward-mode AD (fused attention on CPU) fall back to the math
    attention backend, then to the double-vjp trick.
    """
    mode = probe_jvp_mode(fm, probe)
    return jvp(lambda p: fm(p, probe), (theta0,), (delta,), mode)[1]


def _rec(metric: str, layer: str | None, role: str | None, value: float) -> dict:
    return {"metric": metric, "layer": layer, "role": role, "value": value}


# ---- fits --------------------------------------------------------------------------
def _fit_all(
    records: list[dict], param: Parametrization, steps: int, confidence: float
) -> list[dict]:
    series: dict[tuple, list[dict]] = {}
    for rec in records:
        if rec["metric"] in _FITTED:
            series.setdefault((rec["metric"], rec["layer"], rec["role"]), []).append(
                rec
            )
    fits = []
    for (metric, layer, role), recs in series.items():
        values = [r["value"] for r in recs]
        if not all(math.isfinite(v) and v > 0 for v in values):
            slope, ci = float("nan"), [float("nan"), float("nan")]
        else:
            slope, interval = fit_exponent(
                [r["width"] for r in recs], values, confidence
            )
            ci = list(interval)
        fits.append(
            {
                "metric": metric,
                "layer": layer,
                "param": param.name,
                "r": param.r,
                "slope": slope,
                "ci": ci,
                "predicted": predicted_exponent(metric, role, param, steps),
            }
        )
    return fits


# ---- output ------------------------------------------------------------------------
def _jsonable(obj: object) -> object:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def write_summary(result: CoordCheckResult, out_dir: str | Path) -> Path:
    """Deprecated: :meth:`CoordCheckResult.save`."""
    from rdiag._deprecation import renamed_name

    return renamed_name("write_summary", "CoordCheckResult.save", result.save)(out_dir)


def plot_coord_check(result: CoordCheckResult, path: str | Path) -> Path:
    """Plot every fitted metric against width on log-log axes, one panel per metric.

    Each series shows the per-width mean over seeds (points: every seed), its fitted
    slope with interval, and the predicted slope as a dashed line through the mean.
    Needs matplotlib (``pip install 'rdiag[plots]'``).

    Returns:
        The path of the written image.
    """
    Figure = require("matplotlib.figure", "plot_coord_check").Figure
    metrics = [m for m in _FITTED if any(f["metric"] == m for f in result.fits)]
    cols = 3
    rows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows))
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, i + 1)
        for fit in (f for f in result.fits if f["metric"] == metric):
            _plot_series(ax, result, fit)
        ax.set(xscale="log", yscale="log", xlabel="width", title=metric)
        ax.legend(fontsize=6)
    fig.suptitle(
        f"coordinate check: {result.param}, {result.optimizer}, T={result.steps}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def _plot_series(ax, result: CoordCheckResult, fit: dict) -> None:
    recs = [
        r
        for r in result.records
        if r["metric"] == fit["metric"] and r["layer"] == fit["layer"]
    ]
    widths = np.array(sorted({r["width"] for r in recs}), float)
    means = np.array(
        [np.mean([r["value"] for r in recs if r["width"] == w]) for w in widths]
    )
    lo, hi = fit["ci"]
    label = f"{fit['layer'] or 'model'}: {fit['slope']:.2f} [{lo:.2f}, {hi:.2f}]"
    line = ax.plot(widths, means, "o-", ms=3, label=label)[0]
    ax.scatter(
        [r["width"] for r in recs],
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
