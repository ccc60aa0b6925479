"""The loss Hessian over the parameters, as an operator, and Hessian-vector products."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, vjp

from rdiag._autodiff import HARDSIGMOID_NOTE, attention_calls, twice_differentiable
from rdiag._inputs import batch_size
from rdiag.attention import attention_workspace, efficient_attention
from rdiag._optional import notice
from rdiag._typing import Data, LossFn, Params, ParamSelector
from rdiag.functional import FunctionalModel, Mode, document_selection
from rdiag.operators.curvature import (
    CurvatureOperator,
    forward_over_reverse,
    is_batch,
    map_columns,
)


#: Bytes of attention scores in one batch's forward (math attention) above which an
#: attention model's products run forward-over-reverse through rdiag's blocked
#: attention (``O(T * block)`` extra memory, a forward and a backward a product).
#: Below it the retained graph is kept (one backward a product, about half the
#: cost), though it holds every score of the batch under math attention.
RETAINED_SCORES_BYTES = 32 * 2**20


@document_selection
class HessianOperator(CurvatureOperator):
    r"""The Hessian :math:`H = \nabla^2_\theta L(\theta)` of a mean loss, matrix-free.

    :math:`L(\theta) = \sum_b \frac{n_b}{N}\,\mathrm{loss\_fn}(f(\theta, x_b), y_b)`
    over the batches of ``data`` (one batch: the batch's loss). Products are
    forward-over-reverse (``jvp`` of ``grad``). A model that calls
    ``scaled_dot_product_attention`` runs it by rdiag's blocked operator
    (:mod:`rdiag.attention`: exact, ``O(T * block)`` extra memory per head) inside
    the products, tried first, without a notice. If a module has no forward-mode
    derivative (fused attention without rdiag's operator; ``Hardsigmoid``, whose
    backward has no derivative), the math attention backend with Hardsigmoid
    as ``relu6(x + 3) / 6`` (:func:`rdiag._autodiff.twice_differentiable`) and
    then reverse-over-reverse are tried once per operator, with a one-time
    notice. Products are at the model's current parameters; for a single batch
    the gradient graph is kept and rebuilt only after the parameters change.

    Shapes: ``P`` selected parameters (``named_parameters()`` order);
    ``matvec: (P,) -> (P,)``, ``matmat: (P, K) -> (P, K)`` (columns vmapped).

    Args:
        model: The network (or a prepared :class:`~rdiag.functional.FunctionalModel`;
            then ``params``, ``exclude``, ``mode``, ``dtype`` are ignored).
        loss_fn: ``loss_fn(output, target) -> scalar`` with mean reduction, on the
            raw output ``(n, *out)``.
        data: A batch ``(x, y)`` or an iterable of batches (a DataLoader).
        params, exclude, mode, dtype, output_fn: The selection keywords, described
            once under "Selection keywords" below.
        compile: ``torch.compile`` the per-batch product.
        process_group: A ``torch.distributed`` process group: ``data`` is this
            rank's shard and products are summed over the ranks, identical on
            every rank (see :class:`~rdiag.operators.curvature.CurvatureOperator`).

    Raises:
        ValueError: No trainable parameter selected, a loss that is not a scalar,
            an output not differentiable in the parameters, or (with
            ``process_group``) ranks whose parameters differ (named).
        TypeError: ``data`` or ``loss_fn`` of the wrong kind.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> x, y = torch.randn(5, 3), torch.randn(5, 2)
        >>> H = HessianOperator(net, F.mse_loss, (x, y), dtype=torch.float64)
        >>> dense = torch.autograd.functional.hessian(
        ...     lambda t: F.mse_loss(torch.func.functional_call(
        ...         net.double(), H.fm.unflatten(t), (x.double(),)), y.double()),
        ...     H.fm.flatten(H.fm.params))
        >>> torch.allclose(H.to_dense(), dense)
        True
    """

    kind = "hessian"

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
        compile: bool = False,
        process_group: Any = None,
    ) -> None:
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
        self.compile = compile
        self._compiled: dict[str, Callable[..., Tensor]] = {}
        self._graph: tuple[tuple, list[Tensor], tuple[Tensor, ...]] | None = None
        self._checksum_weights: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        # Strategies that failed before another one worked: skipped from then on.
        self.failed_strategies: set[str] = set()
        self._note = ""  # what a fallback rewrote, said with its notice
        # The bytes of attention scores of one batch under math attention (0: the
        # model calls no scaled_dot_product_attention), probed once.
        self._scores_bytes: float | None = None

    def _invalidate(self) -> None:
        self._graph = None

    def _param_state(self) -> tuple:
        """Identity, version and checksum of the selected parameters.

        Storage and version change with an optimizer step, a ``no_grad`` edit or
        ``load_state_dict``; an edit through ``p.data`` bumps neither, so the
        state also holds one checksum: the parameters' dot product with a fixed
        random vector (sensitive to any change of value, sign or position; one
        read of the parameters, well under the cost of one product).
        """
        named = dict(self.fm.module.named_parameters())
        params = [named[n] for n in self.fm.names]
        ids = tuple((p.data_ptr(), p._version) for p in params)
        parts: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        with torch.no_grad():
            for p in params:
                w = self._weights(p.numel(), p.device, p.dtype)
                parts.setdefault((p.device, p.dtype), []).append(
                    torch.dot(p.detach().reshape(-1), w)
                )
        # One sync per device and dtype; as hex, a NaN checksum equals itself.
        sums = (float(torch.stack(v).double().sum()).hex() for v in parts.values())
        return ids, tuple(sums)

    def _weights(self, size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The checksum's fixed random weights in ``[0.5, 1.5)``: the first ``size``."""
        w = self._checksum_weights.get((device, dtype))
        if w is None or w.numel() < size:
            gen = torch.Generator().manual_seed(0)
            w = torch.rand(max(size, 1), generator=gen, dtype=torch.float64) + 0.5
            self._checksum_weights[(device, dtype)] = w = w.to(device, dtype)
        return w[:size]

    def _flat_loss(self, x: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
        return lambda theta, y: self.batch_loss(self.fm.unflatten(theta), x, y)

    def _forward(self, x: Tensor, y: Tensor, matrix: Tensor) -> Tensor:
        theta = self.fm.flatten(self.fm.params)
        loss = self._flat_loss(x)

        def column(v: Tensor) -> Tensor:
            return forward_over_reverse(loss, theta, v, y)

        return map_columns(column, matrix)

    def _reverse(self, x: Tensor, y: Tensor, matrix: Tensor) -> Tensor:
        theta = self.fm.flatten(self.fm.params)
        loss = self._flat_loss(x)
        _, pullback = vjp(lambda t: grad(loss)(t, y), theta)
        return map_columns(lambda v: pullback(v)[0], matrix)

    def _retained(
        self, x: Tensor, y: Tensor, matrix: Tensor, math: bool = False
    ) -> Tensor:
        """Reverse-over-reverse through one gradient graph kept for all products.

        The gradient is built once with ``create_graph=True``; each product is then
        a single backward pass through it, about half the cost of recomputing the
        forward and backward for forward-over-reverse. Used for a single batch only
        (a DataLoader would keep one graph per batch alive). The graph is rebuilt
        whenever a parameter changed (an optimizer step bumps its version, an
        edit through ``p.data`` its checksum, :meth:`_param_state`) or
        :meth:`rebind` was called. With ``math=True`` the graph is built under the
        math attention backend (and Hardsigmoid rewritten, :func:`twice_differentiable`):
        the fused CPU / flash attention kernels have no double backward, and without this route an attention model fell back to
        forward-over-reverse, a whole forward and backward per product (190 ms
        against 18 ms a product on a small GPT-2).
        """
        state = (self._param_state(), math)
        if self._graph is None or self._graph[0] != state:
            self._graph = None
            leaves = {
                n: p.detach().requires_grad_(True) for n, p in self.fm.params.items()
            }
            backend = twice_differentiable() if math else contextlib.nullcontext()
            with torch.enable_grad(), backend as mode:
                loss = self.batch_loss(leaves, x, y)
                grads = torch.autograd.grad(
                    loss, list(leaves.values()), create_graph=True
                )
            if mode is not None and mode.replaced:
                self._note = HARDSIGMOID_NOTE
            self._graph = (state, list(leaves.values()), grads)
        _, leaves, grads = self._graph
        # Gradients that do not depend on the parameters have zero Hessian rows.
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        columns = []
        for k in range(matrix.shape[1]):
            v = self.fm.unflatten(matrix[:, k])
            hv = [torch.zeros_like(leaf) for leaf in leaves]
            if live:
                # H v as the gradient of the scalar <g, v>: the same backward, and
                # no explicit grad_outputs, whose check makes torch import sympy
                # (a second of the first product in a fresh process).
                dot = sum((grads[i] * v[self.fm.names[i]]).sum() for i in live)
                parts = torch.autograd.grad(
                    dot, leaves, retain_graph=True, allow_unused=True
                )
                hv = [h if p is None else p for h, p in zip(hv, parts)]
            columns.append(torch.cat([h.reshape(-1) for h in hv]))
        return torch.stack(columns, 1)

    def _maybe_compiled(
        self, name: str, fn: Callable[..., Tensor]
    ) -> Callable[..., Tensor]:
        if not self.compile:
            return fn
        if name not in self._compiled:
            self._compiled[name] = torch.compile(fn, dynamic=False)
        return self._compiled[name]

    def _batch_matmat(self, x: Tensor, y: Tensor, matrix: Tensor) -> Tensor:
        fwd = self._maybe_compiled("forward", self._forward)
        rev = self._maybe_compiled("reverse", self._reverse)

        def math(fn: Callable[..., Tensor]) -> Callable[[], Tensor]:
            def call() -> Tensor:
                with twice_differentiable() as mode:
                    out = fn(x, y, matrix)
                if mode.replaced:
                    self._note = HARDSIGMOID_NOTE
                return out

            return call

        def routed(fn: Callable[..., Tensor]) -> Callable[[], Tensor]:
            def call() -> Tensor:
                with efficient_attention():
                    return fn(x, y, matrix)

            return call

        if self._scores_bytes is None:
            calls = attention_calls(self.fm, x)
            samples = 1 if self.fm.batch_coupled else batch_size(x)
            self._scores_bytes = attention_workspace(calls, None) * samples
        attention = (
            [
                ("forward-over-reverse with rdiag attention", routed(fwd)),
                ("reverse-over-reverse with rdiag attention", routed(rev)),
            ]
            if self._scores_bytes
            else []
        )
        # An attention model's retained graph is built under math attention at once
        # (the fused kernels have no double backward): a choice, not a fallback.
        retained = (
            []
            if self.compile or not is_batch(self.data)
            else [
                (
                    "reverse-over-reverse on a retained graph",
                    lambda: self._retained(x, y, matrix),
                ),
                (
                    "reverse-over-reverse on a retained graph with math attention",
                    lambda: self._retained(x, y, matrix, math=True),
                ),
            ][1 if self._scores_bytes else 0 :]
        )
        # Long sequences: rdiag's attention first (memory); short: the retained graph
        # first (speed), rdiag's attention next.
        first, second = (
            (attention, retained)
            if self._scores_bytes > RETAINED_SCORES_BYTES
            else (retained, attention)
        )
        return self.run_strategies(
            first
            + second
            + [
                ("forward-over-reverse", lambda: fwd(x, y, matrix)),
                (
                    "forward-over-reverse with math attention",
                    math(fwd),
                ),
                ("reverse-over-reverse", lambda: rev(x, y, matrix)),
                (
                    "reverse-over-reverse with math attention",
                    math(rev),
                ),
            ]
        )

    def run_strategies(
        self, strategies: Sequence[tuple[str, Callable[[], Tensor]]]
    ) -> Tensor:
        """Run the first strategy that works for this model; remember what failed.

        Strategies are tried in order; the ones that failed before one succeeded
        are skipped by this operator from then on (``failed_strategies``), and the
        fallback is announced once. If all fail, the first error is raised and
        nothing is remembered (the error may be the caller's, not the strategy's).
        """
        skip = self.failed_strategies
        first: Exception | None = None
        failed: list[str] = []
        for name, call in strategies:
            if name in skip:
                continue
            try:
                result = call()
            except (NotImplementedError, RuntimeError) as err:
                first = first or err
                failed.append(name)
                continue
            skip.update(failed)
            if first is not None:
                reason = str(first).splitlines()[0][:160]
                note = f" ({self._note})" if self._note else ""
                notice(
                    f"{self.kind}: the default autodiff path failed for "
                    f"{type(self.fm.module).__name__} ({reason}); using {name} from now "
                    f"on for this operator{note}",
                )
            return result
        raise first  # type: ignore[misc]  # strategies is never empty


@document_selection
def hvp(
    model: nn.Module | FunctionalModel,
    loss_fn: LossFn,
    data: Data,
    v: Tensor | Mapping[str, Tensor],
    *,
    params: ParamSelector = None,
    exclude: ParamSelector = None,
    mode: Mode = "eval",
    dtype: torch.dtype | str | None = None,
    output_fn: Callable[[object], Tensor] | None = None,
    compile: bool = False,
) -> Tensor | Params:
    r"""Hessian-vector product :math:`H v` of the mean loss over ``data``.

    Forward-over-reverse by default (see :class:`HessianOperator` for the fallback).
    For repeated products build the operator once instead.

    Args:
        model: The network.
        loss_fn: ``loss_fn(output, target) -> scalar`` (mean reduction).
        data: A batch ``(x, y)`` or an iterable of batches.
        v: A flat ``(P,)`` vector over the selected parameters in
            ``named_parameters()`` order, or a dict name -> tensor of each
            parameter's shape.
        params, exclude, mode, dtype, output_fn: The selection keywords, described
            once under "Selection keywords" below.
        compile: ``torch.compile`` the product.

    Returns:
        :math:`H v` in the form of ``v``: ``(P,)`` or a dict.

    Raises:
        ValueError: ``v`` has the wrong size or keys, or see :class:`HessianOperator`.
    """
    op = HessianOperator(
        model,
        loss_fn,
        data,
        params=params,
        exclude=exclude,
        mode=mode,
        dtype=dtype,
        output_fn=output_fn,
        compile=compile,
    )
    return op.apply(v)
