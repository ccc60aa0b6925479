"""Shared machinery of the loss-curvature operators (Hessian, GGN, Fisher).

Batches and DataLoaders, and the validated link ``model -> functional view -> loss``.
"""

from __future__ import annotations

from abc import abstractmethod

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from rdiag._checks import check_scalar_loss, check_vector
from rdiag._typing import Data, LossFn, Params, ParamSelector
from rdiag.functional import FunctionalModel, Mode, functionalize
from rdiag.operators.base import LinearOperator


def is_batch(data: Any) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], Tensor)
        and isinstance(data[1], Tensor)
    )


def iter_batches(data: Data) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x, y)`` batches from one batch or an iterable of batches.

    Args:
        data: A batch ``(x, y)`` of tensors with a common leading axis, or a
            re-iterable collection of such batches (a list, a ``DataLoader``; not a
            one-shot generator: each product makes a pass).

    Yields:
        ``(x, y)`` pairs, ``x`` of shape ``(n, ...)`` and ``y`` of shape ``(n, ...)``.

    Raises:
        TypeError: ``data`` or one of its batches is not of that form.
        ValueError: The iterable is empty, or a batch's ``x`` and ``y`` differ in
            length.
    """
    if is_batch(data):
        batches: Iterable[Any] = (data,)
    elif isinstance(data, Tensor) or not isinstance(data, Iterable):
        raise TypeError(
            f"expected data as a batch (x, y) of tensors or an iterable of such batches "
            f"(e.g. a DataLoader), got {type(data).__name__}; pass (x, y)"
        )
    elif iter(data) is data:
        raise TypeError(
            f"expected data that can be iterated repeatedly (every product makes a pass), "
            f"got a one-shot iterator ({type(data).__name__}); pass a list of batches or "
            "a DataLoader"
        )
    else:
        batches = data
    count = 0
    for batch in batches:
        if not is_batch(batch):
            kind = type(batch).__name__
            raise TypeError(
                f"expected every batch to be a pair (x, y) of tensors, got {kind}; "
                "wrap the loader so it yields (inputs, targets)"
            )
        x, y = batch
        if x.dim() == 0 or y.dim() == 0 or len(x) != len(y):
            raise ValueError(
                f"expected x and y with the same leading batch size, got x "
                f"{tuple(x.shape)} and y {tuple(y.shape)}"
            )
        count += 1
        yield x, y
    if count == 0:
        raise ValueError(
            "expected at least one batch, got an empty iterable of batches"
        )


def map_columns(fn: Callable[[Tensor], Tensor], matrix: Tensor) -> Tensor:
    """Apply a ``(P,) -> (P,)`` map to every column of ``(P, K)``: vmapped, or direct for K=1.

    ``randomness="same"``: a train-mode dropout mask is shared by all columns.
    The direct call for one column skips vmap's overhead (~2x on small models).
    """
    if matrix.shape[1] == 1:
        return fn(matrix[:, 0]).unsqueeze(1)
    return vmap(fn, in_dims=1, out_dims=1, randomness="same")(matrix)


def loss_name(loss_fn: Callable[..., Any]) -> str:
    """A readable name of a loss function or loss module (for caches and messages)."""
    return getattr(loss_fn, "__qualname__", type(loss_fn).__name__)


def forward_over_reverse(
    fun: Callable[[Any, Tensor], Tensor], primal: Any, tangent: Any, target: Tensor
) -> Any:
    """Hessian-vector product of a scalar ``fun(primal, target)`` in ``primal``.

    A floating ``target`` enters as a dual number with a materialized zero tangent:
    with torch 2.13, ``jvp(grad(...))`` through ``F.mse_loss`` with a plain target
    fails on an immutable ZeroTensor in the backward of the target branch.
    """
    if target.is_floating_point():
        return jvp(grad(fun), (primal, target), (tangent, torch.zeros_like(target)))[1]
    return jvp(grad(lambda p: fun(p, target)), (primal,), (tangent,))[1]


class CurvatureOperator(LinearOperator):
    """Base of the operators built from ``(model, loss_fn, data)``.

    The loss is ``loss_fn(output, target)`` with mean reduction on the model's raw
    output ``(n, *out)``. With several batches the operator is that of the whole
    dataset: batch ``b`` of ``n_b`` samples enters with weight ``n_b / N``, so an
    uneven last batch is weighted correctly (exact for per-sample mean losses).

    Subclasses implement :meth:`_batch_matmat` on one batch.

    Attributes:
        fm: The functional view of the model over the selected parameters.
        loss_fn: The loss.
        data: The batch or iterable of batches.
        out_shape: Trailing shape ``out`` of the model's raw output.
    """

    kind = "curvature"

    def __init__(
        self,
        model: nn.Module | FunctionalModel,
        loss_fn: LossFn,
        data: Data,
        *,
        params: ParamSelector = None,
        exclude: ParamSelector = None,
        mode: Mode = "eval",
        dtype: torch.dtype | None = None,
    ) -> None:
        if not callable(loss_fn):
            raise TypeError(
                f"expected loss_fn to be a callable loss_fn(output, target), got "
                f"{type(loss_fn).__name__}; pass e.g. torch.nn.functional.mse_loss"
            )
        self.fm = functionalize(model, params, exclude=exclude, mode=mode, dtype=dtype)
        self.loss_fn = loss_fn
        self.data = data
        p = self.fm.num_params
        self.shape = (p, p)
        self.dtype = self.fm.param_dtype
        self.device = self.fm.device
        self.out_shape = self._probe(*next(iter_batches(data)))

    # ---- batches ------------------------------------------------------------------
    def prepare(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Move a batch to the parameters' device; floating tensors to their dtype."""
        x = self.fm.cast_input(x, "x")
        y = (
            y.to(self.device, self.dtype)
            if y.is_floating_point()
            else y.to(self.device)
        )
        return x, y

    def outputs(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """The model's raw output ``(n, *out)`` on a prepared batch."""
        out = self.fm(params, x)
        return out.reshape(out.shape[0], *self.out_shape)

    def batch_loss(self, params: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        """``loss_fn(model(x), y)`` on a prepared batch (a scalar)."""
        return self.loss_fn(self.outputs(params, x), y)

    def _probe(self, x: Tensor, y: Tensor) -> tuple[int, ...]:
        """Check the model and loss on one batch; return the raw output's trailing shape."""
        x, y = self.prepare(x, y)
        captured: list[Any] = []
        handle = self.fm.module.register_forward_hook(
            lambda m, i, o: captured.append(o)
        )
        params = {n: t.detach().requires_grad_() for n, t in self.fm.params.items()}
        try:
            with torch.enable_grad():
                flat = self.fm(params, x)
        finally:
            handle.remove()
        raw = (
            captured[-1]
            if self.fm.output_fn is None
            else self.fm.output_fn(captured[-1])
        )
        if not flat.is_floating_point() or flat.grad_fn is None:
            raise ValueError(
                f"expected the model's output to be differentiable in the selected "
                f"parameters, got a {flat.dtype} output "
                f"{'without' if flat.grad_fn is None else 'with'} a gradient; remove "
                "detach()/no_grad()/argmax from forward or select other parameters"
            )
        with torch.enable_grad():
            loss = self.loss_fn(flat.reshape(raw.shape), y)
        check_scalar_loss(loss)
        return tuple(raw.shape[1:])

    def _matmat(self, matrix: Tensor) -> Tensor:
        total, acc = 0, torch.zeros_like(matrix)
        for x, y in iter_batches(self.data):
            n = len(x)
            acc += n * self._batch_matmat(*self.prepare(x, y), matrix)
            total += n
        return acc / total

    @abstractmethod
    def _batch_matmat(self, x: Tensor, y: Tensor, matrix: Tensor) -> Tensor:
        """``(P, K)`` product of this batch's (mean-loss) curvature with ``matrix``."""

    # ---- flat vectors and dicts -----------------------------------------------------
    def apply(self, v: Tensor | Mapping[str, Tensor]) -> Tensor | Params:
        """The product with a flat ``(P,)`` vector or a parameter dict; same form back.

        Raises:
            ValueError: ``v`` has the wrong size or misses parameters.
        """
        if isinstance(v, Mapping):
            wrong = [
                n
                for n in self.fm.names
                if n in v and v[n].shape != self.fm.params[n].shape
            ]
            if wrong or set(v) != set(self.fm.names):
                raise ValueError(
                    f"expected a dict with one tensor per selected parameter "
                    f"({len(self.fm.names)}: {list(self.fm.names)[:4]}...) of the "
                    f"parameter's shape, got keys {list(v)[:4]} (mismatched: {wrong[:3]})"
                )
            return self.fm.unflatten(self.matvec(self.fm.flatten(v)))
        check_vector(v, self.shape[0])
        return self.matvec(v)
