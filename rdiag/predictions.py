"""The predicted width exponents of docs/theory.md section 2: one table, read by everyone.

Each :class:`Prediction` names a width-scaling metric, the Monitor record it is
read from (:mod:`rdiag.monitor`), the step it is read at (initialization or the
last step), and its exponent of the width ``n`` as a function of the richness
``r``, the layer role and the number of steps. The coordinate check, the
report, ``summary.json`` and the HTML text all take their predictions and the
formulas they print from here.

Exponents (``r`` in ``[0, 1/2]``; muP and mean-field are ``r = 1/2``; the gamma
family at a fixed ``gamma0`` scales like muP):

=================  ================================  ============================
metric             quantity                          exponent
=================  ================================  ============================
``h0``             ``||h_0||``, read-in/hidden       ``1/2``
``delta_h``        ``||h_T - h_0||``, read-in/hidden ``r``
``f0``             ``||f_0||``                       ``-r``
``delta_f``        ``||f_T - f_0||``                 ``0``
``delta_f1``       ``||f_1 - f_0||`` (one step)      ``0``
``dW_op``          ``||W_T - W_0||_op`` (effective)  ``r``, ``r - 1/2``, ``-1/2``
                                                     (read-in, hidden, read-out)
``dW_rel``         ``||dW||_op / ||W_0||_op``        ``r - 1/2``
``dW_rel1``        the same after one step           ``r - 1/2``
``ntk_rel_change`` ``||K_T - K_0||_F / ||K_0||_F``   ``2r - 1`` (``r - 1`` at T=1)
``lin_error``      ``||f_T - f_lin|| / ||f_T-f_0||`` ``2r - 1`` (``r - 1`` at T=1)
=================  ================================  ============================

The kernel exponents hold after ``T >~ 10`` steps; after one step with a small
learning rate a zero-mean fluctuation of order ``n^(r-1)`` dominates the coherent
``n^(2r-1)`` term, hence ``r - 1`` for ``T = 1``. The standard parameterization
is not on the scale: ``delta_f`` grows like ``n`` (exponent ``+1``), ``f0`` and
``h0`` keep ``0`` and ``1/2``; nothing else is predicted for it.

The depth axis (:data:`DEPTH_PREDICTIONS`, the depth check): exponents of the
depth ``L`` from the parametrization's depth rule (branch multiplier
``L**-alpha``, block learning rates ``L**beta``): ``f0`` and the last residual
stream's ``h0`` ``0``; the stream's and the output's change ``max(0, 1 + beta -
2 alpha)`` (SGD; Adam ``1 + beta - alpha``); the read-in's ``delta_h`` and the
read-in's and read-out's ``dW_rel`` ``0``; the blocks' mean ``dW_rel`` ``beta -
alpha`` (SGD; Adam ``beta``), i.e. ``alpha - 1`` for a consistent rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from rdiag.metrics import fit_exponent
from rdiag.records import flatten, split
from rdiag.parametrization import Parametrization, parse_parametrization

When = Literal["first", "step1", "last"]


@dataclass(frozen=True)
class Prediction:
    """One predicted width exponent.

    Attributes:
        metric: Name of the fitted quantity (``"delta_h"``, ``"f0"``, ...).
        source: The metric of the Monitor records it is read from
            (:mod:`rdiag.records`: ``"f_norm"`` for ``f0``, ``"ntk/rel_change"``).
        when: ``"first"`` (initialization), ``"step1"`` (after the first step) or
            ``"last"`` (the last step).
        quantity: What is measured, in words.
        formula: The exponent as printed, e.g. ``"2r - 1"``.
        exponent: ``(r, role, steps) -> exponent`` (``None`` where nothing is
            predicted for that role).
        per_layer: Whether the metric has one value per layer.
        fitted: Whether width exponents are fitted for it (``dW_fro`` is only
            recorded: Frobenius norms give other exponents than operator norms).
    """

    metric: str
    source: str
    when: When
    quantity: str
    formula: str
    exponent: Callable[[float, str | None, int], float | None]
    per_layer: bool = False
    fitted: bool = True


def _kernel(r: float, role: str | None, steps: int) -> float:
    return r - 1.0 if steps == 1 else 2.0 * r - 1.0


def _weight_change(r: float, role: str | None, steps: int) -> float | None:
    return {"readin": r, "hidden": r - 0.5, "readout": -0.5}.get(role or "")


PREDICTIONS: dict[str, Prediction] = {
    p.metric: p
    for p in (
        Prediction(
            "h0", "h_norm", "first", "||h_0||, read-in/hidden outputs", "1/2",
            lambda r, role, steps: 0.5, per_layer=True,
        ),
        Prediction(
            "delta_h", "delta_h", "last", "||h_T - h_0||, read-in/hidden outputs",
            "r", lambda r, role, steps: r, per_layer=True,
        ),
        Prediction(
            "f0", "f_norm", "first", "||f_0|| (not for centered models)", "-r",
            lambda r, role, steps: -r,
        ),
        Prediction(
            "delta_f", "delta_f", "last", "||f_T - f_0||", "0",
            lambda r, role, steps: 0.0,
        ),
        Prediction(
            "delta_f1", "delta_f", "step1", "||f_1 - f_0||, after one step", "0",
            lambda r, role, steps: 0.0,
        ),
        Prediction(
            "dW_op", "dW_op", "last", "||W_T - W_0||_op of the effective weights",
            "r / r - 1/2 / -1/2 (read-in / hidden / read-out)", _weight_change,
            per_layer=True,
        ),
        Prediction(
            "dW_fro", "dW_fro", "last", "||W_T - W_0||_F of the effective weights",
            "not predicted", lambda r, role, steps: None, per_layer=True, fitted=False,
        ),
        Prediction(
            "dW_rel", "dW_rel", "last", "||W_T - W_0||_op / ||W_0||_op", "r - 1/2",
            lambda r, role, steps: r - 0.5, per_layer=True,
        ),
        Prediction(
            "dW_rel1", "dW_rel", "step1",
            "||W_1 - W_0||_op / ||W_0||_op, after one step", "r - 1/2",
            lambda r, role, steps: r - 0.5, per_layer=True,
        ),
        Prediction(
            "ntk_rel_change", "ntk/rel_change", "last",
            "||K_T - K_0||_F / ||K_0||_F of K_M", "2r - 1 (r - 1 after one step)",
            _kernel,
        ),
        Prediction(
            "lin_error", "lin_error", "last", "||f_T - f_lin,T|| / ||f_T - f_0||",
            "2r - 1 (r - 1 after one step)", _kernel,
        ),
    )
}  # fmt: skip

#: What the standard parameterization (off the scale) is predicted to do.
STANDARD: dict[str, float] = {"delta_f": 1.0, "delta_f1": 1.0, "f0": 0.0, "h0": 0.5}


def richness_of(parametrization: Parametrization | str) -> float | None:
    """The richness ``r`` a parametrization realizes across widths (``None``: SP).

    The gamma family at a fixed ``gamma0`` scales like muP (``r = 1/2``).
    """
    param = parse_parametrization(parametrization)
    if param.gauge == "standard":
        return None
    return 0.5 if param.r is None else param.r


def predicted_exponent(
    metric: str,
    role: str | None,
    parametrization: Parametrization | str,
    steps: int,
) -> float | None:
    """The predicted width exponent of ``metric`` (see the module table).

    Args:
        metric: A key of :data:`PREDICTIONS`.
        role: The layer's role (``"readin"``, ``"hidden"``, ``"readout"``), for
            the role-dependent ``dW_op``; ``None`` for model-level metrics.
        parametrization: A :class:`Parametrization` or its string.
        steps: Training steps ``T`` (``T = 1`` changes the kernel exponents).

    Returns:
        The exponent, or ``None`` where nothing is predicted.
    """
    r = richness_of(parametrization)
    if r is None:
        return STANDARD.get(metric)
    prediction = PREDICTIONS.get(metric)
    return None if prediction is None else prediction.exponent(r, role, steps)


def formulas() -> dict[str, str]:
    """Metric -> the printed formula of its exponent (for summaries and reports)."""
    return {m: p.formula for m, p in PREDICTIONS.items()}


def records_from_checks(
    first: Mapping[Any, float],
    last: Mapping[Any, float],
    roles: Mapping[str, str],
    *,
    centered: bool = False,
    step1: Mapping[Any, float] | None = None,
) -> list[dict]:
    """The predicted metrics read from a Monitor's first and last check.

    Args:
        first: The records of the check at initialization (``Monitor.history[0]``);
            keys of either release (:func:`rdiag.records.flatten`).
        last: The records of the last check.
        roles: Layer name -> role (``"readin"``, ``"hidden"``, ``"readout"``).
        centered: A centered model (``f0 = 0``): ``f0`` is left out.
        step1: The records of a check after the first step, if there was one
            (``delta_f1`` is read from it).

    Returns:
        ``{"metric", "layer", "role", "value"}`` dicts (``layer``/``role`` None for
        model-level metrics), in :data:`PREDICTIONS` order.
    """
    checks = {"first": flatten(first), "last": flatten(last)}
    checks["step1"] = {} if step1 is None else flatten(step1)
    out = []
    for p in PREDICTIONS.values():
        if centered and p.metric == "f0":
            continue
        for key, value in checks[p.when].items():
            metric, layer = split(key)
            if metric == p.source:
                role = roles.get(layer) if layer else None
                out.append(_record(p.metric, layer or None, role, value))
    return out


def _record(metric: str, layer: str | None, role: str | None, value: float) -> dict:
    return {"metric": metric, "layer": layer, "role": role, "value": float(value)}


def fit_records(
    records: Iterable[Mapping[str, Any]],
    parametrization: Parametrization | str | None,
    steps: int,
    *,
    confidence: float = 0.95,
) -> list[dict]:
    """Width exponents of measured records, each next to its prediction.

    Args:
        records: ``{"width", "metric", "layer", "role", "value"}`` mappings (one
            per width, seed, metric and layer), e.g. from :func:`records_from_checks`.
        parametrization: The parametrization the records were measured under
            (``None``: an unknown one, no predictions).
        steps: Training steps ``T``.
        confidence: Level of the slope intervals.

    Returns:
        One ``{"metric", "layer", "role", "parametrization", "r", "slope", "ci":
        [lo, hi], "predicted", "widths", "seeds"}`` dict per fitted series (metric,
        layer, role), in first-seen order. Least squares of ``log(value)`` on
        ``log(width)`` over the finite positive values
        (:func:`rdiag.metrics.fit_exponent`); ``widths`` (sorted) and ``seeds`` (a
        count) are those of these values; ``slope`` and ``ci`` are ``nan`` when
        fewer than two widths remain.
    """
    param = None if parametrization is None else parse_parametrization(parametrization)

    def predict(metric: str, layer: str | None, role: str | None) -> float | None:
        return None if param is None else predicted_exponent(metric, role, param, steps)

    fitted = {p.metric for p in PREDICTIONS.values() if p.fitted}
    return _fit_series(records, fitted, predict, param, "width", confidence)


def _fit_series(
    records: Iterable[Mapping[str, Any]],
    fitted: set[str],
    predict: Callable[[str, str | None, str | None], float | None],
    param: Parametrization | None,
    axis: str,
    confidence: float,
) -> list[dict]:
    """Fits of ``log(value)`` on ``log(record[axis])`` per (metric, layer, role)."""
    series: dict[tuple, list[Mapping[str, Any]]] = {}
    for rec in records:
        if rec["metric"] in fitted:
            key = (rec["metric"], rec.get("layer"), rec.get("role"))
            series.setdefault(key, []).append(rec)
    fits = []
    for (metric, layer, role), recs in series.items():
        kept = [r for r in recs if math.isfinite(r["value"]) and r["value"] > 0]
        slope, ci = math.nan, [math.nan, math.nan]
        if len({r[axis] for r in kept}) >= 2:
            slope, interval = fit_exponent(
                [r[axis] for r in kept], [r["value"] for r in kept], confidence
            )
            ci = list(interval)
        fits.append(
            {
                "metric": metric,
                "layer": layer,
                "role": role,
                "parametrization": None if param is None else param.name,
                "r": None if param is None else param.r,
                "slope": slope,
                "ci": ci,
                "predicted": predict(metric, layer, role),
                f"{axis}s": sorted({r[axis] for r in kept}),
                "seeds": len({r.get("seed") for r in kept}),
            }
        )
    return fits


# ---- the depth axis -------------------------------------------------------------
@dataclass(frozen=True)
class DepthPrediction:
    """One predicted depth exponent (the depth check, :mod:`rdiag.depth_check`).

    Attributes:
        metric: The fitted quantity (a :data:`PREDICTIONS` metric read at depth).
        layer: Where: ``None`` (model level), ``"stream"`` (the last residual
            stream), ``"blocks"`` (the mean over the layers inside residual
            branches) or a role (``"readin"``, ``"readout"``: every layer of that
            role outside the branches).
        formula: The exponent as printed.
        exponent: ``(alpha, lr_exponent, optimizer) -> exponent`` of ``L``.
    """

    metric: str
    layer: str | None
    formula: str
    exponent: Callable[[float, float, str], float]


def _stream_change(alpha: float, beta: float, optimizer: str) -> float:
    # L blocks, each moving the stream by L^-alpha dW with dW ~ L^(beta - alpha)
    # (SGD: the gradient carries the multiplier) or L^beta (Adam), on top of the
    # read-in's L^0 change, which the stream carries; below alpha = 1/2 the stream
    # grows at init and the depth-stable 0 is the target
    if alpha < 0.5:
        return 0.0
    return max(0.0, 1.0 + beta - (2.0 * alpha if optimizer == "sgd" else alpha))


def _block_change(alpha: float, beta: float, optimizer: str) -> float:
    return beta - alpha if optimizer == "sgd" else beta


#: The depth exponents of a residual network whose stream stays bounded at
#: initialization (branch exponent ``alpha >= 1/2``), with block learning rates
#: ``L**beta`` (``beta`` the depth rule's exponent for the optimizer). Below
#: ``alpha = 1/2`` the stream grows with ``L`` at initialization (``L**(1/2 -
#: alpha)`` with a bounded activation, exponentially with ReLU): no power law is
#: predicted and the stream is held to the depth-stable ``0``, which it fails.
DEPTH_PREDICTIONS: dict[tuple[str, str | None], DepthPrediction] = {
    (p.metric, p.layer): p
    for p in (
        DepthPrediction("f0", None, "0", lambda a, b, o: 0.0),
        DepthPrediction("h0", "stream", "0", lambda a, b, o: 0.0),
        DepthPrediction(
            "delta_h", "stream", "max(0, 1 + beta - 2 alpha) (SGD; Adam: 1 + beta - alpha)",
            _stream_change,
        ),
        DepthPrediction("delta_h", "readin", "0", lambda a, b, o: 0.0),
        DepthPrediction(
            "delta_f", None, "max(0, 1 + beta - 2 alpha) (SGD; Adam: 1 + beta - alpha)",
            _stream_change,
        ),
        DepthPrediction(
            "dW_rel", "blocks", "beta - alpha (SGD), beta (Adam)", _block_change
        ),
        DepthPrediction("dW_rel", "readin", "0", lambda a, b, o: 0.0),
        DepthPrediction("dW_rel", "readout", "0", lambda a, b, o: 0.0),
    )
}  # fmt: skip


def predicted_depth_exponent(
    metric: str,
    layer: str | None,
    parametrization: Parametrization | str,
    optimizer: str,
    role: str | None = None,
) -> float | None:
    """The predicted depth exponent of ``metric`` at ``layer`` (``None``: none).

    ``layer`` is ``None``, ``"stream"``, ``"blocks"``, or a layer outside the
    branches, predicted by its ``role``.

    The exponents of :data:`DEPTH_PREDICTIONS` for the parametrization's depth
    rule (consistent rules, depth-muP and CompleteP, give ``0`` for the stream and
    the output and ``alpha - 1`` for the blocks' relative weight change).
    """
    rule = parse_parametrization(parametrization).depth
    place = layer if layer in (None, "stream", "blocks") else role
    prediction = DEPTH_PREDICTIONS.get((metric, place))
    if prediction is None:
        return None
    beta = rule.lr_sgd if optimizer == "sgd" else rule.lr_adam
    return prediction.exponent(rule.alpha, beta, optimizer)


def fit_depth_records(
    records: Iterable[Mapping[str, Any]],
    parametrization: Parametrization | str,
    optimizer: str,
    *,
    confidence: float = 0.95,
) -> list[dict]:
    """Depth exponents of ``{"depth", "metric", "layer", "role", "value"}`` records.

    Returns:
        The :func:`fit_records` dicts, with ``"depths"`` for ``"widths"`` and
        the predictions of :func:`predicted_depth_exponent`.
    """
    param = parse_parametrization(parametrization)

    def predict(metric: str, layer: str | None, role: str | None) -> float | None:
        return predicted_depth_exponent(metric, layer, param, optimizer, role)

    fitted = {m for m, _ in DEPTH_PREDICTIONS}
    return _fit_series(records, fitted, predict, param, "depth", confidence)
