"""Record names: one flat string per measured value, everywhere.

The same name keys :attr:`rdiag.Monitor.history`, the rows of a
:class:`~rdiag.runs.store.Store` and what every sink and trainer logger receives. A
name is a metric, optionally followed by ``/`` and a layer (a module path) or an
index:

=========================  =========================  ========================
name                       metric                     layer
=========================  =========================  ========================
``ntk/rel_change``         ``ntk/rel_change``         ``""`` (model-level)
``delta_h/hidden.0``       ``delta_h``                ``hidden.0``
``ntk/eig/0``              ``ntk/eig``                ``0`` (an index)
``sharpness/precond``      ``sharpness/precond``      ``""``
=========================  =========================  ========================

Metrics are grouped by a ``/``-separated prefix (``ntk/``, ``ck/`` for the
conjugate kernel, ``ntk_layers/``, ``sharpness/``, ``trace/``, ``monitor/``,
``train/``), which TensorBoard, Weights & Biases and MLflow show as sections.
No name is both a record and the group of others (``sharpness/raw`` and
``sharpness/precond``, not ``sharpness`` and ``sharpness/precond``): trackers that
store a metric as a file under its group's directory (MLflow's file store) could
not hold both. Which metrics take a layer is fixed by :data:`PER_LAYER`: :func:`split` reads a
name back into its ``(metric, layer)`` pair, the store's two columns. A new
per-layer metric is added to :data:`PER_LAYER` and its names are built with
:func:`name`; a model-level one needs nothing here.

The release before this one keyed records by ``(metric, layer)`` tuples with
other metric names (``("ntk_rel_change", "")``, ``"sharpness_precond"``,
``"train_loss"``); :data:`LEGACY` maps them to the current names, so stores
written then read back under the current names (:func:`columns`,
:func:`stored_metrics`), and a Monitor state saved then restores its history
under them (:func:`flatten`).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

SEP = "/"

#: Metrics whose records carry a layer (or, for ``ntk/eig``, an eigenvalue index).
PER_LAYER: frozenset[str] = frozenset(
    {
        "h_norm",
        "delta_h",
        "W_op",
        "W_fro",
        "dW_op",
        "dW_fro",
        "dW_rel",
        "ntk/eig",
        "ntk_layers/rel_change",
        "cost",
        "ntk_layers/trace",
    }
)

#: The training loss of every step, recorded by the harness.
TRAIN_LOSS = "train/loss"
#: Seconds spent in diagnostics so far, and the training time they are a share of.
MONITOR_SECONDS = "monitor/seconds"
TRAIN_SECONDS = "monitor/train_seconds"

#: Metric names of the release before this one -> current metric names. Names not
#: listed (``delta_h``, ``f_norm``, ``loss``, ...) did not change.
LEGACY: dict[str, str] = {
    **{
        f"{kernel}_{stat}": f"{kernel}/{stat}"
        for kernel in ("ntk", "ck")
        for stat in ("rel_change", "distance", "cka", "rel_change_prev")
    },
    "ntk_eig": "ntk/eig",
    "ntk_eff_rank": "ntk/eff_rank",
    "ntk_trace": "ntk/trace",
    "ntk_kta": "ntk/kta",
    "ntk_layer_rel_change": "ntk_layers/rel_change",
    "ntk_layer_trace": "ntk_layers/trace",
    "sharpness": "sharpness/raw",
    "sharpness_matvecs": "sharpness/raw_matvecs",
    "sharpness_precond": "sharpness/precond",
    "sharpness_precond_matvecs": "sharpness/precond_matvecs",
    "trace": "trace/estimate",
    "trace_std_err": "trace/std_err",
    "monitor_seconds": MONITOR_SECONDS,
    "train_seconds": TRAIN_SECONDS,
    "train_loss": TRAIN_LOSS,
}


def name(metric: str, layer: str = "") -> str:
    """The record name of ``metric`` (of ``layer``, for a per-layer metric).

    Example:
        >>> name("delta_h", "hidden.0"), name("ntk/rel_change")
        ('delta_h/hidden.0', 'ntk/rel_change')
    """
    return f"{metric}{SEP}{layer}" if layer else metric


def split(record: str) -> tuple[str, str]:
    """``(metric, layer)`` of a record name (``layer`` is ``""`` for model-level ones).

    Example:
        >>> split("ntk/eig/0"), split("delta_h/hidden.0"), split("sharpness/precond")
        (('ntk/eig', '0'), ('delta_h', 'hidden.0'), ('sharpness/precond', ''))
    """
    for metric in PER_LAYER:
        if record.startswith(metric + SEP) and len(record) > len(metric) + 1:
            return metric, record[len(metric) + 1 :]
    return record, ""


def current_metric(metric: str) -> str:
    """The current name of a metric name of either release."""
    return LEGACY.get(metric, metric)


def columns(key: str | tuple[str, str]) -> tuple[str, str]:
    """The store columns ``(metric, layer)`` of a record key, in current names.

    Args:
        key: A record name (``"delta_h/hidden.0"``), or a ``(metric, layer)`` pair as
            the release before this one keyed records (``("ntk_rel_change", "")``).

    Returns:
        ``(metric, layer)``.
    """
    if isinstance(key, tuple):
        metric, layer = key
        return current_metric(metric), layer or ""
    return split(current_metric(key))


def stored_metrics(metric: str) -> tuple[str, ...]:
    """Every stored metric name that reads back as ``metric``: it and its old names."""
    return (metric, *(old for old, new in LEGACY.items() if new == metric))


def flatten(records: Mapping[Any, float]) -> dict[str, float]:
    """Records keyed by current names, whatever release's keys they came with."""
    return {name(*columns(key)): value for key, value in records.items()}


def store_row(row: Any) -> tuple[int, str, str, float]:
    """A checked ``(step, metric, layer, value)`` row as the store keeps it.

    The metric under its current name, ``layer`` ``""`` for model-level ones.

    Raises:
        ValueError: Not four fields, or a step that is not an int >= 0.
        TypeError: A metric or layer that is not a str, a value that is not real.
    """
    try:
        step, metric, layer, value = row
    except (TypeError, ValueError):
        raise ValueError(
            f"expected rows (step, metric, layer, value), got {row!r}"
        ) from None
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"expected a row's step to be an int >= 0, got {step!r}")
    if not isinstance(metric, str) or not isinstance(layer, (str, type(None))):
        raise TypeError(
            f"expected a row's metric and layer as str (layer '' or None for "
            f"model-level metrics), got {metric!r}, {layer!r}"
        )
    real = isinstance(value, numbers.Real) or (  # a one-element tensor too
        hasattr(value, "numel") and value.numel() == 1
    )
    if isinstance(value, bool) or not real:
        raise TypeError(
            f"expected a real value for {metric!r}, got {type(value).__name__}"
        )
    return int(step), current_metric(metric), layer or "", float(value)
