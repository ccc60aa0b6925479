r"""Model-level curvature: top eigenvalues, sharpness, trace and spectral density.

Each function builds the loss-curvature operator of ``(model, loss_fn, data)``
(Hessian, GGN or Fisher; see :mod:`rdiag.operators.hessian` and
:mod:`rdiag.operators.ggn`), optionally preconditioned as
:math:`M^{1/2} A M^{1/2}` by a diagonal ``M``, and hands it to a solver in
:mod:`rdiag.linalg`. The sample-space functions get the GGN's spectrum from the
full eNTK instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from rdiag._checks import check_choice, check_positive_int
from rdiag._typing import Data, LossFn, LRMultipliers, ParamSelector
from rdiag.functional import FunctionalModel, Mode, document_selection
from rdiag.linalg.density import SpectralDensity, spectral_density
from rdiag.linalg.lanczos import EigResult, Which, lanczos
from rdiag.linalg.power import power_extreme
from rdiag.linalg.trace import TraceEstimate, hutch_plus_plus, hutchinson
from rdiag.ntk.handle import empirical_ntk
from rdiag.operators.base import LinearOperator, ScaledOperator
from rdiag.operators.curvature import CurvatureOperator
from rdiag.operators.ggn import (
    FisherOperator,
    GGNOperator,
    LossKind,
    dense_loss_hessian,
)
from rdiag.operators.hessian import HessianOperator

Curvature = Literal["hessian", "ggn", "fisher"]
CURVATURES = ("hessian", "ggn", "fisher")


@document_selection
def curvature_operator(
    model: nn.Module | FunctionalModel,
    loss_fn: LossFn,
    data: Data,
    *,
    curvature: Curvature = "hessian",
    params: ParamSelector = None,
    exclude: ParamSelector = None,
    mode: Mode = "eval",
    dtype: torch.dtype | str | None = None,
    output_fn: Callable[[object], Tensor] | None = None,
    loss: LossKind | None = None,
    compile: bool = False,
    process_group: Any = None,
) -> CurvatureOperator:
    """Build the Hessian, GGN or (empirical) Fisher operator of a model's loss.

    Args:
        model: The network.
        loss_fn: ``loss_fn(output, target)`` with mean reduction.
        data: A batch ``(x, y)`` or an iterable of batches.
        curvature: ``"hessian"``, ``"ggn"`` or ``"fisher"`` (empirical Fisher).
        params, exclude, mode, dtype, output_fn: The selection keywords, described
            once under "Selection keywords" below.
        loss: Loss kind for the GGN/Fisher (default: inferred).
        compile: ``torch.compile`` the Hessian product.
        process_group: A ``torch.distributed`` process group: ``data`` is this
            rank's shard and products are summed over the ranks (see
            :class:`~rdiag.operators.curvature.CurvatureOperator`).

    Returns:
        A ``(P, P)`` :class:`~rdiag.operators.curvature.CurvatureOperator`; keep it
        for repeated use (it reads the parameters live; ``rebind`` for new data).

    Raises:
        ValueError: Unknown ``curvature``.
    """
    check_choice(curvature, "curvature", CURVATURES)
    common = {
        "params": params,
        "exclude": exclude,
        "mode": mode,
        "dtype": dtype,
        "output_fn": output_fn,
        "process_group": process_group,
    }
    if curvature == "hessian":
        return HessianOperator(model, loss_fn, data, compile=compile, **common)
    if curvature == "ggn":
        return GGNOperator(model, loss_fn, data, loss=loss, **common)
    return FisherOperator(model, loss_fn, data, loss=loss, kind="empirical", **common)


def _adam_diagonal(fm: FunctionalModel, optimizer: torch.optim.Optimizer) -> Tensor:
    """``lr / (sqrt(v_hat) + eps)`` per selected parameter from an Adam-type state."""
    name_of = {id(p): n for n, p in fm.module.named_parameters()}
    found: dict[str, Tensor] = {}
    for group in optimizer.param_groups:
        if "betas" not in group or "eps" not in group:
            raise TypeError(
                f"expected an Adam-type optimizer (betas, eps, exp_avg_sq), got "
                f"{type(optimizer).__name__}; pass per-layer learning rates as a dict"
            )
        for p in group["params"]:
            name = name_of.get(id(p))
            if name not in fm.shapes:
                continue
            state = optimizer.state.get(p, {})
            key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
            if key not in state:
                raise ValueError(
                    f"expected optimizer state {key!r} for parameter {name!r}, got none; "
                    "take at least one optimizer step before asking for the adaptive "
                    "preconditioner"
                )
            step = float(state["step"])
            v_hat = state[key] / (1 - group["betas"][1] ** step)
            found[name] = group["lr"] / (v_hat.sqrt() + group["eps"])
    missing = [n for n in fm.names if n not in found]
    if missing:
        raise ValueError(
            f"expected the optimizer to hold every selected parameter, missing {missing[:5]}; "
            "select the optimizer's parameters with params="
        )
    return fm.flatten(found).to(device=fm.device, dtype=fm.param_dtype)


def multiplier_diagonal(
    fm: FunctionalModel, lr_multipliers: LRMultipliers
) -> Tensor | None:
    r"""Resolve the diagonal ``M`` (per-layer learning-rate ratios) to a flat ``(P,)`` vector.

    Args:
        fm: The functional view (selected parameters, order).
        lr_multipliers: One of

            * ``None``: no preconditioning (returns ``None``);
            * a dict layer-or-parameter name (or glob) -> scalar, a float, or a
              callable ``name -> float``: per-layer learning rates relative to a base
              rate, ``M = eta_l / eta_0`` (resolved by
              :meth:`~rdiag.functional.FunctionalModel.param_weights`; unmatched
              parameters get 1); compare the sharpness with ``2 / eta_0``;
            * a ``(P,)`` non-negative tensor (``named_parameters()`` order);
            * an Adam-type optimizer (Adam, AdamW, ...) after at least one step:
              ``M = lr / (sqrt(v_hat) + eps)`` with the bias-corrected second moment
              ``v_hat = exp_avg_sq / (1 - beta2^step)`` (``max_exp_avg_sq`` with
              amsgrad), i.e. Adam's own per-coordinate step size *including* ``lr``.
              The adaptive edge of stability (Cohen et al. 2022) is then
              ``lambda_max(M^1/2 H M^1/2) = 2 (1 + beta1) / (1 - beta1)`` (38 for
              ``beta1 = 0.9``), a dimensionless number.

    Returns:
        ``(P,)`` tensor in the parameters' dtype, or ``None``.

    Raises:
        ValueError: Wrong size, negative entries, missing optimizer state.
        TypeError: An unsupported kind.
    """
    if lr_multipliers is None:
        return None
    if isinstance(lr_multipliers, torch.optim.Optimizer):
        return _adam_diagonal(fm, lr_multipliers)
    if isinstance(lr_multipliers, Tensor):
        p = fm.num_params
        if lr_multipliers.shape != (p,) or not bool((lr_multipliers >= 0).all()):
            raise ValueError(
                f"expected non-negative flat ({p},) lr_multipliers, got shape "
                f"{tuple(lr_multipliers.shape)}; one entry per selected parameter"
            )
        return lr_multipliers.to(device=fm.device, dtype=fm.param_dtype)
    weights = fm.param_weights(lr_multipliers)
    return torch.cat(
        [torch.full((fm.sizes[n],), weights[n], dtype=fm.param_dtype) for n in fm.names]
    ).to(fm.device)


def scaled(op: CurvatureOperator, lr_multipliers: LRMultipliers) -> LinearOperator:
    """``op`` itself, or ``M^1/2 op M^1/2`` for the diagonal of ``lr_multipliers``."""
    diagonal = multiplier_diagonal(op.fm, lr_multipliers)
    return op if diagonal is None else ScaledOperator(op, diagonal)


def _operator(
    model: nn.Module | FunctionalModel,
    loss_fn: LossFn,
    data: Data,
    lr_multipliers: LRMultipliers,
    **kwargs: object,
) -> LinearOperator:
    op = curvature_operator(model, loss_fn, data, **kwargs)  # type: ignore[arg-type]
    return scaled(op, lr_multipliers)


@document_selection
def top_eigenvalues(
    model: nn.Module | FunctionalModel,
    loss_fn: LossFn,
    data: Data,
    k: int = 1,
    *,
    curvature: Curvature = "hessian",
    method: Literal["lanczos", "power"] = "lanczos",
    tol: float = 1e-6,
    max_iter: int = 1000,
    warm_start: EigResult | Tensor | None = None,
    which: Which = "largest",
    params: ParamSelector = None,
    exclude: ParamSelector = None,
    lr_multipliers: LRMultipliers = None,
    mode: Mode = "eval",
    dtype: torch.dtype | str | None = None,
    output_fn: Callable[[object], Tensor] | None = None,
    loss: LossKind | None = None,
    seed: int = 0,
    compile: bool = False,
    criterion: Literal["residual", "eigenvalue"] = "residual",
) -> EigResult:
    r"""Extreme eigenpairs of the loss Hessian (or GGN / Fisher), optionally preconditioned.

    Computes eigenpairs of :math:`A` or, with ``lr_multipliers``,
    :math:`M^{1/2} A M^{1/2}` (same eigenvalues as :math:`M A`). One-shot: for
    repeated solves keep the operator of :func:`curvature_operator` and call
    :func:`rdiag.lanczos` on ``scaled(op, lr_multipliers)``.

    Args:
        model: The network.
        loss_fn: ``loss_fn(output, target)`` with mean reduction.
        data: A batch ``(x, y)`` or an iterable of batches (full-dataset operator).
        k: Eigenpairs wanted (per end with ``which="both"``).
        curvature: ``"hessian"``, ``"ggn"`` or ``"fisher"`` (empirical).
        method: ``"lanczos"`` (default) or ``"power"`` (``k=1`` only; the largest
            *algebraic* eigenvalue, in two phases if the dominant one is negative).
        tol: Relative residual tolerance (see :func:`~rdiag.linalg.lanczos.lanczos`).
        max_iter: Most operator-vector products.
        warm_start: The previous :class:`EigResult` (e.g. a few training steps ago)
            or ``(P,)`` / ``(P, k)`` vectors; cuts the products needed.
        which: ``"largest"``, ``"smallest"`` or ``"both"``.
        params, exclude, mode, dtype, output_fn: The selection keywords, described
            once under "Selection keywords" below.
        lr_multipliers: The diagonal ``M``; see :func:`multiplier_diagonal`.
        loss: Loss kind for GGN/Fisher (default inferred).
        seed: Seed of the start vector.
        compile: ``torch.compile`` the Hessian product.
        criterion: Lanczos stopping test, ``"residual"`` or ``"eigenvalue"`` (see
            :func:`~rdiag.linalg.lanczos.lanczos`).

    Returns:
        An :class:`~rdiag.linalg.lanczos.EigResult`; eigenvectors are ``(P, k)`` in
        the selected parameters' flat order (of the preconditioned operator, if any).

    Raises:
        ValueError: Bad options (``method="power"`` with ``k > 1`` or
            ``which="both"``), or see the operators.
    """
    check_choice(method, "method", ("lanczos", "power"))
    check_positive_int(k, "k")
    op = _operator(
        model,
        loss_fn,
        data,
        lr_multipliers,
        curvature=curvature,
        params=params,
        exclude=exclude,
        mode=mode,
        dtype=dtype,
        output_fn=output_fn,
        loss=loss,
        compile=compile,
    )
    if method == "lanczos":
        return lanczos(
            op,
            k,
            which=which,
            tol=tol,
            max_iter=max_iter,
            warm_start=warm_start,
            seed=seed,
            criterion=criterion,
        )
    if k != 1 or which == "both":
        raise ValueError(
            f"expected k=1 and which in ('largest', 'smallest') for method='power', got "
            f"k={k}, which={which!r}; use method='lanczos'"
        )
    check_choice(which, "which", ("largest", "smallest"))
    return power_extreme(
        op, which, tol=tol, max_iter=max_iter, warm_start=warm_start, seed=seed
    )


@document_selection
def sharpness(
    model: nn.Module | FunctionalModel,
    loss_fn: LossFn,
    data: Data,
    *,
    lr_multipliers: LRMultipliers = None,
    curvature: Curvature = "hessian",
    tol: float = 1e-6,
    warm_start: EigResult | Tensor | None = None,
    params: ParamSelector = None,
    exclude: ParamSelector = None,
    mode: Mode = "eval",
    dtype: torch.dtype | str | None = None,
    output_fn: Callable[[object], Tensor] | None = None,
    seed: int = 0,
) -> float:
    r"""The largest **algebraic** eigenvalue of the loss Hessian (or its preconditioned form).

    :math:`\lambda_{\max}(H)`, or :math:`\lambda_{\max}(M^{1/2} H M^{1/2})` with
    ``lr_multipliers`` (per-layer learning rates: compare with ``2 / eta_0``; an
    Adam optimizer: the adaptive edge of stability, see
    :func:`multiplier_diagonal`). Computed by Lanczos with the eigenvalue stopping
    test: the estimated relative error of the eigenvalue is at most about ``tol``
    (see :func:`~rdiag.linalg.lanczos.lanczos`, ``criterion="eigenvalue"``).

    .. warning::
        This is the largest *algebraic* eigenvalue, not the largest in magnitude.
        At muP initialization and with cross-entropy the Hessian is often
        indefinite with a negative eigenvalue as large in magnitude as the top one;
        plain power iteration (the usual recipe) then silently returns that one, or
        a mixture. The edge-of-stability criterion concerns the positive top.

    Args:
        model: The network.
        loss_fn: ``loss_fn(output, target)`` with mean reduction.
        data: A batch or an iterable of batches.
        lr_multipliers: The diagonal ``M``; see :func:`multiplier_diagonal`.
        curvature: ``"hessian"`` (default), ``"ggn"`` or ``"fisher"``.
        tol: Relative eigenvalue accuracy.
        warm_start: A previous result or eigenvector (use :func:`top_eigenvalues`
            to keep the :class:`EigResult` for the next call).
        params, exclude, mode, dtype, output_fn: The selection keywords, described
            once under "Selection keywords" below.
        seed: Seed of the start vector.

    Returns:
        The eigenvalue, a Python float.
    """
    result = top_eigenvalues(
        model,
        loss_fn,
        data,
        1,
        curvature=curvature,
        tol=tol,
        warm_start=warm_start,
        params=params,
        exclude=exclude,
        lr_multipliers=lr_multipliers,
        mode=mode,
        dtype=dtype,
        output_fn=output_fn,
        seed=seed,
        criterion="eigenvalue",
    )
    return float(result.eigenvalues[0])


@document_selection
def hessian_trace(
    model: nn.Module | FunctionalModel,
    loss_fn: LossFn,
    data: Data,
    *,
    num_matvecs: int = 99,
    method: Literal["hutch++", "hutchinson"] = "hutch++",
    curvature: Curvature = "hessian",
    lr_multipliers: LRMultipliers = None,
    params: ParamSelector = None,
    exclude: ParamSelector = None,
    mode: Mode = "eval",
    dtype: torch.dtype | str | None = None,
    output_fn: Callable[[object], Tensor] | None = None,
    seed: int = 0,
) -> TraceEstimate:
    """Stochastic estimate of ``tr(H)`` (or of the GGN/Fisher, or preconditioned).

    Args:
        model: The network.
        loss_fn: ``loss_fn(output, target)`` with mean reduction.
        data: A batch ``(x, y)`` or an iterable of batches.
        num_matvecs: Products to spend.
        method: ``"hutch++"`` (default) or ``"hutchinson"``.
        curvature: ``"hessian"`` (default), ``"ggn"`` or ``"fisher"``.
        lr_multipliers: The diagonal ``M``; see :func:`multiplier_diagonal`.
        params, exclude, mode, dtype, output_fn: The selection keywords, described
            once under "Selection keywords" below.
        seed: Seed of the probes.

    Returns:
        A :class:`~rdiag.linalg.trace.TraceEstimate` with its standard error.

    Raises:
        ValueError: A bad ``num_matvecs`` or ``method``.
        MemoryError: The probe vectors do not fit (the message says how big).
    """
    check_choice(method, "method", ("hutch++", "hutchinson"))
    check_positive_int(num_matvecs, "num_matvecs")
    op = _operator(
        model,
        loss_fn,
        data,
        lr_multipliers,
        curvature=curvature,
        params=params,
        exclude=exclude,
        mode=mode,
        dtype=dtype,
        output_fn=output_fn,
    )
    if method == "hutchinson":
        return hutchinson(op, num_matvecs, seed=seed)
    return hutch_plus_plus(op, num_matvecs, seed=seed)


@document_selection
def hessian_density(
    model: nn.Module | FunctionalModel,
    loss_fn: LossFn,
    data: Data,
    *,
    num_probes: int = 10,
    lanczos_steps: int = 50,
    grid: Tensor | int = 1000,
    sigma: float | None = None,
    curvature: Curvature = "hessian",
    lr_multipliers: LRMultipliers = None,
    params: ParamSelector = None,
    exclude: ParamSelector = None,
    mode: Mode = "eval",
    dtype: torch.dtype | str | None = None,
    output_fn: Callable[[object], Tensor] | None = None,
    seed: int = 0,
) -> SpectralDensity:
    """Smoothed eigenvalue density of the Hessian by stochastic Lanczos quadrature.

    Args:
        model: The network.
        loss_fn: ``loss_fn(output, target)`` with mean reduction.
        data: A batch ``(x, y)`` or an iterable of batches.
        num_probes: Random probes.
        lanczos_steps: Lanczos steps (quadrature nodes) per probe.
        grid: ``(G,)`` points, or a number of points spanning the nodes.
        sigma: Gaussian broadening (default 1% of the node range).
        curvature: ``"hessian"`` (default), ``"ggn"`` or ``"fisher"``.
        lr_multipliers: The diagonal ``M``; see :func:`multiplier_diagonal`.
        params, exclude, mode, dtype, output_fn: The selection keywords, described
            once under "Selection keywords" below.
        seed: Seed of the probes.

    Returns:
        ``(grid, density)``, a :class:`~rdiag.linalg.density.SpectralDensity`.
    """
    op = _operator(
        model,
        loss_fn,
        data,
        lr_multipliers,
        curvature=curvature,
        params=params,
        exclude=exclude,
        mode=mode,
        dtype=dtype,
        output_fn=output_fn,
    )
    return spectral_density(
        op,
        num_probes=num_probes,
        lanczos_steps=lanczos_steps,
        grid=grid,
        sigma=sigma,
        seed=seed,
    )


@document_selection
def ggn_eigenvalues_from_ntk(
    model: nn.Module | FunctionalModel,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    *,
    loss: LossKind | None = None,
    lr_multipliers: LRMultipliers = None,
    params: ParamSelector = None,
    exclude: ParamSelector = None,
    mode: Mode = "eval",
    dtype: torch.dtype | str | None = None,
    output_fn: Callable[[object], Tensor] | None = None,
) -> Tensor:
    r"""The GGN's spectrum on one batch, computed in sample space from the full eNTK.

    With ``J`` the ``(N*O, P)`` Jacobian, ``H_l`` the ``(N*O, N*O)`` loss Hessian in
    the outputs and ``M`` the diagonal ``lr_multipliers``, the nonzero eigenvalues
    of :math:`M^{1/2} J^\top H_\ell J M^{1/2}` (the GGN, preconditioned by ``M``)
    equal those of :math:`H_\ell^{1/2}\, \Theta_M\, H_\ell^{1/2}` with
    :math:`\Theta_M = J M J^\top` the full ``(N*O, N*O)`` eNTK. That is an
    ``N*O``-sized dense problem, whatever ``P``.

    .. warning::
        Mind the loss convention: ``mse_loss`` means over all ``N*O`` entries, so
        ``H_l = 2 I / (N O)`` and :math:`\lambda_{\max}(G) = 2\lambda_{\max}(\Theta)
        / (N O)`, not :math:`\lambda_{\max}(\Theta)/N` (the ``1/2 ||f - y||^2``
        per-sample convention). Cross-entropy gives ``H_l`` blocks
        ``(diag(p_i) - p_i p_i^T) / N``.

    Args:
        model: The network.
        loss_fn: ``loss_fn(output, target)`` with mean reduction.
        x: ``(N, ...)`` inputs.
        y: Targets for ``x``.
        loss: Loss kind (default inferred; ``"autodiff"`` for others, which must
            be convex in the outputs).
        lr_multipliers: The diagonal ``M`` (dict, float, callable; see
            :meth:`~rdiag.functional.FunctionalModel.param_weights`), e.g. per-layer
            learning rates relative to the base rate.
        params, exclude, mode, dtype, output_fn: The selection keywords, described
            once under "Selection keywords" below.

    Returns:
        ``(N*O,)`` float64 eigenvalues, descending (the GGN's nonzero spectrum
        padded with its zeros up to ``N*O``).

    Raises:
        ValueError: The loss Hessian in the outputs is not positive semi-definite.
    """
    op = GGNOperator(
        model,
        loss_fn,
        (x, y),
        params=params,
        exclude=exclude,
        mode=mode,
        dtype=dtype,
        output_fn=output_fn,
        loss=loss,
    )
    xb, yb = op.prepare(x, y)
    with torch.no_grad():
        out = op.outputs(op.fm.params, xb)
    h_l = dense_loss_hessian(op.loss, loss_fn, out, yb).double()
    vals, vecs = torch.linalg.eigh(h_l)
    if bool(vals.min() < -1e-8 * vals.abs().max().clamp_min(1e-300)):
        raise ValueError(
            f"expected a loss convex in the outputs (positive semi-definite H_l), got "
            f"an eigenvalue {float(vals.min()):.3g}; use the parameter-space "
            "GGNOperator with lanczos instead"
        )
    root = (vecs * vals.clamp_min(0).sqrt()) @ vecs.T
    theta = empirical_ntk(op.fm, xb, trace_outputs=False, lr_multipliers=lr_multipliers)
    n, o = theta.shape[0], theta.shape[2]
    theta = theta.permute(0, 2, 1, 3).reshape(n * o, n * o).double()
    small = root @ theta @ root
    return torch.linalg.eigvalsh((small + small.T) / 2).flip(0)


@document_selection
def ggn_sharpness_from_ntk(
    model: nn.Module | FunctionalModel,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    *,
    loss: LossKind | None = None,
    lr_multipliers: LRMultipliers = None,
    params: ParamSelector = None,
    exclude: ParamSelector = None,
    mode: Mode = "eval",
    dtype: torch.dtype | str | None = None,
    output_fn: Callable[[object], Tensor] | None = None,
) -> float:
    r"""``lambda_max`` of the (preconditioned) GGN on one batch, via the full eNTK.

    For MSE this is :math:`2\lambda_{\max}(\Theta_M)/(N O)`; see
    :func:`ggn_eigenvalues_from_ntk`.

    Args:
        model, loss_fn, x, y, loss, lr_multipliers: As
            :func:`ggn_eigenvalues_from_ntk`.
        params, exclude, mode, dtype, output_fn: The selection keywords, described
            once under "Selection keywords" below.

    Returns:
        The largest eigenvalue, a Python float.
    """
    spectrum = ggn_eigenvalues_from_ntk(
        model,
        loss_fn,
        x,
        y,
        loss=loss,
        lr_multipliers=lr_multipliers,
        params=params,
        exclude=exclude,
        mode=mode,
        dtype=dtype,
        output_fn=output_fn,
    )
    return float(spectrum[0])
