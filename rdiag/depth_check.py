"""Depth check: train a residual family across depths and fit the depth exponents.

The depth axis of the coordinate check (the same loop, loss, Monitor and
verdicts): for each depth ``L`` and seed, the model is built at one width and
parametrized (its :class:`~rdiag.parametrization.Branches` get the
parametrization's :class:`~rdiag.parametrization.DepthRule`), trained for
``steps`` full-batch steps of ``F.mse_loss`` and measured at initialization,
after the first step and after the last. Depth-invariant series are fitted
against ``L`` (:data:`rdiag.predictions.DEPTH_PREDICTIONS`):

* ``f0`` and ``delta_f``: the output at init and its change;
* ``h0`` and ``delta_h`` of the *stream*: the residual stream after the last
  block (:attr:`~rdiag.parametrization.Branches.stream_module`);
* ``delta_h`` and ``dW_rel`` of the layers outside the branches (read-in and
  read-out, by their names);
* ``dW_rel`` of the *blocks*: the mean over the layers inside the branches.

A depth rule that keeps the residual stream bounded (``alpha >= 1/2``) with its
learning-rate exponent ``beta`` predicts ``f0``, ``h0`` ~ ``L**0``, the stream
and output change ``L**max(0, 1 + beta - 2 alpha)`` (SGD; Adam ``1 + beta -
alpha``: the read-in's change rides on the stream) and the blocks' relative
weight change ``L**(beta - alpha)`` (Adam ``beta``): depth-muP and CompleteP
both give ``0`` for the stream and ``alpha - 1`` for the blocks (``-1/2`` and
``0``: CompleteP's blocks keep learning at any depth). A blocks' exponent below
``alpha - 1`` means blocks frozen in the deep limit (the read-in and read-out
still learn); unscaled branches (``"none"``) let the stream grow with ``L`` and
fail.
Verdicts are :func:`rdiag.verdicts.judge`'s on the depth axis (``1/L``
finite-depth corrections).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from rdiag._checks import (
    check_choice,
    check_finite_positive,
    check_positive_int,
    check_seeds,
    check_sizes,
)
from rdiag._inputs import Inputs, tree_map
from rdiag.coord_check import DEFAULT_LR, Checked, _default_data, _run
from rdiag.functional import MODES, Mode
from rdiag.models import make_model
from rdiag.parametrization import (
    OPTIMIZERS,
    Branches,
    Parametrization,
    applied_parametrization,
    apply_parametrization,
    layer_scales,
    parse_parametrization,
)
from rdiag.predictions import fit_depth_records
from rdiag.verdicts import judge_fits

#: Built-in families with residual branches.
RESIDUAL_FAMILIES: tuple[str, ...] = ("resmlp", "transformer")


@dataclass(frozen=True)
class DepthCheckResult(Checked):
    """Raw measurements, fitted depth exponents and their verdicts.

    Attributes:
        parametrization: The parametrization's label (``"mup,depth=completep"``).
        depth_rule: The depth rule's name.
        optimizer: ``"sgd"`` or ``"adam"``.
        steps: Training steps.
        width: The width of every model.
        depths: The depths ``L``.
        seeds: The seeds.
        records: ``{"depth", "seed", "metric", "layer", "role", "value"}`` dicts.
        fits: One dict per series: ``{"metric", "layer", "role", "slope", "ci",
            "predicted", "depths", "seeds", "passed", "tolerance", "reason", ...}``.
        failed: The runs that diverged: ``{"depth", "seed", "reason"}``.
        lr: The base learning rate ``eta_0``.
    """

    parametrization: str
    depth_rule: str
    optimizer: str
    steps: int
    width: int
    depths: tuple[int, ...]
    seeds: tuple[int, ...]
    records: list[dict] = field(repr=False)
    fits: list[dict] = field(repr=False)
    failed: list[dict] = field(default_factory=list, repr=False)
    lr: float = math.nan
    axis: ClassVar[str] = "depth"


def depth_check(
    family: str | Callable[[int], nn.Module],
    parametrization: Parametrization | str,
    depths: Sequence[int],
    *,
    width: int = 64,
    steps: int = 10,
    seeds: int | Sequence[int] = 3,
    lr: float | None = None,
    optimizer: str = "sgd",
    data: tuple[Inputs, Tensor] | None = None,
    batch_size: int = 16,
    family_kwargs: Mapping[str, object] | None = None,
    roles: Mapping[str, str] | None = None,
    dtype: torch.dtype = torch.float32,
    confidence: float = 0.95,
    data_seed: int = 1234,
    mode: Mode = "eval",
) -> DepthCheckResult:
    """Train ``family`` at each depth and fit every depth exponent.

    Args:
        family: ``"resmlp"`` or ``"transformer"``, or ``depth -> nn.Module``
            (a model with a ``branches`` attribute, :class:`Branches`; then
            ``data`` is needed).
        parametrization: A :class:`Parametrization` or string; its depth rule
            (``"mup,depth=completep"``) is what is checked.
        depths: At least two depths ``L`` (an 8x span or more recommended).
        width: The width of every model.
        steps: Full-batch training steps.
        seeds: Number of seeds or the seeds.
        lr: Base learning rate; default :data:`rdiag.coord_check.DEFAULT_LR`.
        optimizer: ``"sgd"`` or ``"adam"``.
        data: The training batch ``(x, y)``; default Gaussian (or random-token)
            inputs and normal targets from ``data_seed``.
        batch_size: Size of the default batch.
        family_kwargs: Constructor arguments of a built-in family.
        roles: Module name -> role, for user families.
        dtype: Model and data dtype.
        confidence: Level of the slope intervals.
        data_seed: Seed of the default data.
        mode: The Monitor's ``"eval"`` or ``"train"`` mode.

    Returns:
        The :class:`DepthCheckResult` with a verdict per fit and ``.passed``.

    Raises:
        ValueError: Bad depths, width, steps, seeds, lr or optimizer; a family
            without residual branches; a user family without ``data``.

    Example:
        >>> res = depth_check("resmlp", "mup", [2, 4], width=16, steps=2, seeds=2)
        >>> fit = res.fit("dW_rel", "blocks")
        >>> fit["predicted"], res.depth_rule
        (-0.5, 'depth-mup')
    """
    param = parse_parametrization(parametrization)
    check_choice(mode, "mode", MODES)
    check_choice(optimizer, "optimizer", OPTIMIZERS)
    lr = DEFAULT_LR[optimizer] if lr is None else check_finite_positive(lr, "lr")
    depths = check_sizes(depths, "depth")
    check_positive_int(width, "width")
    check_positive_int(steps, "steps")
    seeds = check_seeds(seeds)
    if not 0 < confidence < 1:
        raise ValueError(f"expected confidence in (0, 1), got {confidence!r}")
    build = _builder(family, width, family_kwargs or {}, data)
    if data is None:
        data = _default_data(build(depths[0]), batch_size, data_seed)

    def cast(t: Tensor) -> Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    x, y = tree_map(cast, data[0]), cast(data[1])
    records: list[dict] = []
    failed: list[dict] = []
    for depth in depths:
        for seed in seeds:
            torch.manual_seed(seed)
            model = apply_parametrization(build(depth).to(dtype), param, roles=roles)
            branches = _branches(model, depth)
            stream = branches.stream_module
            tracked = [stream] + [
                n
                for n, scale in layer_scales(model).items()
                if scale.role == "readin" and n not in branches.layers
            ]
            options = {"metrics": ["representations", "weights"], "mode": mode}
            options["layers"] = tracked
            measured = _run(model, param, x, y, x, steps, lr, optimizer, options)
            if isinstance(measured, str):
                failed.append({"depth": depth, "seed": seed, "reason": measured})
                continue
            records += [
                dict(depth=depth, seed=seed, **rec)
                for rec in _depth_records(measured, branches, stream)
            ]
    fits = fit_depth_records(records, param, optimizer, confidence=confidence)
    return DepthCheckResult(
        param.name,
        param.depth.name,
        optimizer,
        steps,
        width,
        tuple(depths),
        tuple(seeds),
        records,
        judge_fits(fits, r=None, steps=steps, lr=lr, axis="depth"),
        failed,
        lr,
    )


def _builder(family, width, kwargs, data) -> Callable[[int], nn.Module]:
    if isinstance(family, str):
        check_choice(family, "family", RESIDUAL_FAMILIES)
        return lambda depth: make_model(family, width, depth=depth, **kwargs)
    if not callable(family):
        raise TypeError(
            f"expected family to be one of {list(RESIDUAL_FAMILIES)} or a callable "
            f"depth -> nn.Module, got {type(family).__name__}"
        )
    if data is None:
        raise ValueError(
            "expected data=(x, y) for a user model family; pass a fixed training batch"
        )
    return family


def _branches(model: nn.Module, depth: int) -> Branches:
    applied = applied_parametrization(model)
    branches = None if applied is None else applied.branches
    if branches is None or not branches.outputs:
        raise ValueError(
            f"expected a model with residual branches (a `branches` attribute, "
            f"rdiag.parametrization.Branches), got {type(model).__name__} without; "
            "declare which layers end each residual branch"
        )
    if branches.depth != depth:
        raise ValueError(
            f"expected the model built for depth {depth} to declare branches.depth = "
            f"{depth}, got {branches.depth}"
        )
    return branches


def _depth_records(measured: list[dict], branches: Branches, stream: str) -> list[dict]:
    """The depth-invariant records of one run (blocks averaged, the stream renamed)."""
    out, blocks = [], {}
    for rec in measured:
        layer = rec["layer"]
        if layer == stream:
            out.append({**rec, "layer": "stream", "role": "stream"})
        elif layer in branches.layers:
            blocks.setdefault(rec["metric"], []).append(rec["value"])
        else:
            out.append(rec)
    for metric, values in blocks.items():
        value = float(np.mean(values))
        out.append(
            {"metric": metric, "layer": "blocks", "role": "hidden", "value": value}
        )
    return out
