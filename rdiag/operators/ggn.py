r"""Generalized Gauss-Newton and Fisher operators: :math:`J^\top H_\ell J` products.

The product with one batch is ``J v`` (a Jacobian-vector product), then the loss's
Hessian in the outputs, then ``J^T`` (a vector-Jacobian product). For the loss
Hessian, ``mse_loss`` and softmax ``cross_entropy`` have closed forms; any other
loss uses forward-over-reverse autodiff in the (small) output space, also exact.
"""

from __future__ import annotations


from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap

from rdiag._autodiff import JvpMode, differentiating, jvp, probe_jvp_mode
from rdiag._checks import check_choice
from rdiag._typing import Data, LossFn, ParamSelector
from rdiag.functional import FunctionalModel, Mode, document_selection
from rdiag.losses import (
    LOSS_KINDS,
    LossKind,
    apply_loss,
    class_axis,
    ignore_index,
    infer_loss_kind,
)
from rdiag.operators.curvature import (
    CurvatureOperator,
    forward_over_reverse,
    map_columns,
)


def loss_hessian_product(
    kind: LossKind, loss_fn: LossFn, out: Tensor, target: Tensor, u: Tensor
) -> Tensor:
    r"""Product of the loss's Hessian in the outputs with ``u``.

    Args:
        kind: ``"mse"``: ``2 u / numel(out)`` (``mse_loss``'s mean over all
            entries). ``"cross_entropy"``: :math:`(\mathrm{diag}(p) - p p^\top) u`
            per position with ``p = softmax(out)`` over the class axis (axis 1, or
            the last one for sequence outputs: :func:`rdiag.losses.class_axis`),
            divided by the number of
            non-ignored targets (class-index targets) or by ``n`` times each row's
            target mass (probability targets). ``"autodiff"``: forward-over-reverse
            of ``loss_fn`` in ``out``.
        loss_fn: The loss (for ``"autodiff"`` and ``ignore_index``).
        out: Raw outputs ``(n, *out)``.
        target: Targets of the batch.
        u: Output-space tangent, same shape as ``out``.

    Returns:
        ``H_l u``, same shape as ``out``.
    """
    if kind == "mse":
        return u * (2.0 / out.numel())
    if kind == "cross_entropy":
        axis = class_axis(loss_fn, out, target)
        p = out.softmax(axis)
        pu = p * u
        hu = pu - p * pu.sum(axis, keepdim=True)
        if target.is_floating_point():
            return hu * target.sum(axis, keepdim=True) / out.shape[0]
        valid = (target != ignore_index(loss_fn)).to(out.dtype)
        return hu * valid.unsqueeze(axis) / valid.sum()
    return forward_over_reverse(lambda o, t: apply_loss(loss_fn, o, t), out, u, target)


def dense_loss_hessian(
    kind: LossKind, loss_fn: LossFn, out: Tensor, target: Tensor
) -> Tensor:
    """The loss Hessian in the flattened outputs, ``(n*O, n*O)`` (block diagonal).

    Args:
        kind: See :func:`loss_hessian_product`.
        loss_fn: The loss.
        out: Raw outputs ``(n, *out)``; ``O = prod(out)``.
        target: Targets.

    Returns:
        The dense symmetric ``(n*O, n*O)`` matrix, row-major over ``(sample, output)``.
    """
    eye = torch.eye(out.numel(), dtype=out.dtype, device=out.device)

    def column(e: Tensor) -> Tensor:
        return loss_hessian_product(
            kind, loss_fn, out, target, e.reshape(out.shape)
        ).reshape(-1)

    return vmap(column, in_dims=1, out_dims=1)(eye)


@document_selection
class GGNOperator(CurvatureOperator):
    r"""Generalized Gauss-Newton :math:`G = \sum_b \frac{n_b}{N} J_b^\top H_{\ell,b} J_b`.

    ``J_b``: Jacobian of batch ``b``'s raw outputs in the selected parameters;
    ``H_{\ell,b}``: Hessian of ``loss_fn`` (mean reduction) in those outputs. ``G``
    is the Hessian without the term with the model's second derivatives; it is
    positive semi-definite for convex losses and exact for MSE and softmax
    cross-entropy (closed forms), or via autodiff for other losses.

    Shapes: ``matvec: (P,) -> (P,)``, ``matmat: (P, K) -> (P, K)``.

    Args:
        model: The network (or a prepared FunctionalModel).
        loss_fn: ``loss_fn(output, target)`` with mean reduction.
        data: A batch ``(x, y)`` or an iterable of batches.
        params, exclude, mode, dtype, output_fn: The selection keywords, described
            once under "Selection keywords" below.
        loss: ``"mse"``, ``"cross_entropy"``, ``"autodiff"``, or ``None`` to infer
            from ``loss_fn`` (:func:`infer_loss_kind`). An explicit value is trusted.
        process_group: A ``torch.distributed`` process group: ``data`` is this
            rank's shard, products are summed over the ranks (see
            :class:`~rdiag.operators.curvature.CurvatureOperator`).

    Raises:
        ValueError: An unknown ``loss``, or see
            :class:`~rdiag.operators.hessian.HessianOperator`.
    """

    kind = "ggn"

    def __init__(
        self,
        model: nn.Module | FunctionalModel,
        loss_fn: LossFn,
        data: Data,
        *,
        params: ParamSelector = None,
        exclude: ParamSelector = None,
        mode: Mode = "eval",
        dtype: torch.dtype | str | None = None,
        output_fn: Callable[[object], Tensor] | None = None,
        loss: LossKind | None = None,
        process_group: Any = None,
    ) -> None:
        if loss is not None:
            check_choice(loss, "loss", LOSS_KINDS)
        super().__init__(
            model,
            loss_fn,
            data,
            params=params,
            exclude=exclude,
            mode=mode,
            dtype=dtype,
            output_fn=output_fn,
            process_group=process_group,
        )
        self.loss = loss or infer_loss_kind(loss_fn)
        self._jvp_mode: JvpMode | None = None

    def _curvature(self, out: Tensor, y: Tensor) -> Callable[[Tensor], Tensor]:
        """Output-space curvature product ``u -> C u`` on one batch's raw outputs."""
        return lambda u: loss_hessian_product(self.loss, self.loss_fn, out, y, u)

    def _batch_matmat(self, x: Tensor, y: Tensor, matrix: Tensor) -> Tensor:
        # Forward mode for J v where the model supports it, else the math attention
        # backend or the double-vjp trick (probed once per operator).
        if self._jvp_mode is None:
            self._jvp_mode = probe_jvp_mode(self.fm, x)
        mode = self._jvp_mode
        theta = self.fm.flatten(self.fm.params)

        def f(t: Tensor) -> Tensor:
            return self.outputs(self.fm.unflatten(t), x)

        def column(v: Tensor) -> Tensor:
            return pullback(curvature(jvp(f, (theta,), (v,), mode)[1]))[0]

        with differentiating(mode):
            out, pullback = vjp(f, theta)
            curvature = self._curvature(out.detach(), y)
            return map_columns(column, matrix)


@document_selection
class FisherOperator(GGNOperator):
    r"""Fisher information of the loss as a likelihood, true or empirical.

    ``kind="true"``: :math:`\frac1N \sum_i J_i^\top \mathbb{E}_{y \sim p(\cdot|f_i)}
    [\nabla_f \ell_i \nabla_f \ell_i^\top] J_i`. For softmax cross-entropy and for
    ``mse_loss`` (a Gaussian likelihood) the expectation equals the loss Hessian,
    so the true Fisher **is** the GGN (:class:`GGNOperator`); this class computes it
    as such, and raises for other losses.

    ``kind="empirical"``: :math:`\frac1N \sum_i g_i g_i^\top` with
    :math:`g_i = \nabla_\theta \ell_i` the gradient of sample ``i``'s loss at the
    observed target, ``ell_i = n_b * dL_b/df_i`` scaled so that the batch mean loss
    is the mean of the ``ell_i``. It is not the Hessian's approximation that the GGN
    is; it differs from it away from a perfect fit. For a batch-coupled model
    (train-mode batch norm) ``J_i`` is the Jacobian of output ``i`` of the whole
    batch function.

    Args:
        model, loss_fn, data, loss, process_group: As :class:`GGNOperator`.
        params, exclude, mode, dtype, output_fn: The selection keywords, described
            once under "Selection keywords" below.
        kind: ``"empirical"`` or ``"true"``.

    Raises:
        ValueError: ``kind="true"`` with a loss that is neither MSE nor
            cross-entropy, or an unknown ``kind``.
    """

    kind = "fisher"

    def __init__(
        self,
        model: nn.Module | FunctionalModel,
        loss_fn: LossFn,
        data: Data,
        *,
        params: ParamSelector = None,
        exclude: ParamSelector = None,
        mode: Mode = "eval",
        dtype: torch.dtype | str | None = None,
        output_fn: Callable[[object], Tensor] | None = None,
        loss: LossKind | None = None,
        kind: Literal["empirical", "true"] = "empirical",
        process_group: Any = None,
    ) -> None:
        check_choice(kind, "kind", ("empirical", "true"))
        super().__init__(
            model,
            loss_fn,
            data,
            params=params,
            exclude=exclude,
            mode=mode,
            dtype=dtype,
            output_fn=output_fn,
            loss=loss,
            process_group=process_group,
        )
        if kind == "true" and self.loss == "autodiff":
            raise ValueError(
                f"expected loss_fn to be mse_loss or cross_entropy for the true Fisher, "
                f"got {loss_fn!r}; pass loss='mse' or loss='cross_entropy' if it is one "
                "of them, or use kind='empirical'"
            )
        self.fisher_kind = kind

    def _curvature(self, out: Tensor, y: Tensor) -> Callable[[Tensor], Tensor]:
        if self.fisher_kind == "true":
            return super()._curvature(out, y)
        n = out.shape[0]
        with torch.enable_grad():
            o = out.detach().requires_grad_()
            (r,) = torch.autograd.grad(apply_loss(self.loss_fn, o, y), o)
        r = (r * n).reshape(n, -1)

        def product(u: Tensor) -> Tensor:
            # (1/n) sum_i r_i r_i^T u_i, per sample block.
            coeff = (r * u.reshape(n, -1)).sum(1, keepdim=True)
            return (r * coeff / n).reshape(out.shape)

        return product
