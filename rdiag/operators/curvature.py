"""The loss-curvature operators' common base: model, loss and data as one operator.

:class:`CurvatureOperator` is what the Hessian, GGN and Fisher operators share:
batches and DataLoaders, the validated link ``model -> functional view -> loss``,
products at the model's current parameters, and :meth:`CurvatureOperator.rebind`
to a new batch without probing the model again. With ``process_group=`` each rank
passes its own shard of the data and products are summed over the ranks
(:mod:`rdiag.distributed`).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from rdiag._checks import check_vector
from rdiag._inputs import Inputs, batch_size, describe, leaves, trailing
from rdiag._typing import Data, LossFn, Params, ParamSelector
from rdiag.distributed import Group
from rdiag.functional import (
    FunctionalModel,
    Mode,
    accumulation_dtype,
    functionalize,
)
from rdiag.losses import apply_loss, checked_loss
from rdiag.operators.base import LinearOperator


def _is_inputs(x: Any) -> bool:
    if isinstance(x, Tensor):
        return True
    if isinstance(x, Mapping):
        return bool(x) and all(isinstance(v, Tensor) for v in x.values())
    return isinstance(x, tuple) and bool(x) and all(isinstance(v, Tensor) for v in x)


def is_batch(data: Any) -> bool:
    """Whether ``data`` is one batch ``(inputs, targets)`` (inputs: tensor, tuple or dict)."""
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and _is_inputs(data[0])
        and isinstance(data[1], Tensor)
    )


def iter_batches(data: Data) -> Iterator[tuple[Inputs, Tensor]]:
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
        if (
            any(t.dim() == 0 for t in leaves(x))
            or y.dim() == 0
            or batch_size(x) != len(y)
        ):
            raise ValueError(
                f"expected x and y with the same leading batch size, got x "
                f"{describe(x)} and y {tuple(y.shape)}"
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



def trainable_mask(fm: FunctionalModel) -> Tensor | None:
    """``(P,)`` mask of the coordinates that have a gradient (None: all of them).

    An ``nn.Embedding`` with ``padding_idx`` never updates that row: autograd sets
    its gradient to zero, so ``grad`` is not the derivative there and its Jacobian is
    not symmetric (forward-over-reverse and reverse-over-reverse products differ
    on that row). The curvature operators act on the other coordinates,
    ``P H P`` with ``P`` this mask as a diagonal: symmetric, and the same by
    every product strategy.
    """
    rows: dict[str, int] = {}
    for prefix, module in fm.module.named_modules():
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            name = f"{prefix}.weight" if prefix else "weight"
            if name in fm.names:
                rows[name] = module.padding_idx % module.num_embeddings
    if not rows:
        return None
    mask = {
        n: torch.ones(fm.shapes[n], dtype=torch.bool, device=fm.device)
        for n in fm.names
    }
    for name, row in rows.items():
        mask[name][row] = False
    return torch.cat([mask[n].reshape(-1) for n in fm.names])


class CurvatureOperator(LinearOperator):
    """Base of the operators built from ``(model, loss_fn, data)``.

    The loss is ``loss_fn(output, target)`` with mean reduction on the model's
    output ``(n, *out)`` (sequence outputs ``(n, T, V)`` with ``(n, T)`` targets:
    cross-entropy over every position, :mod:`rdiag.losses`). With several batches the operator is that of the whole
    dataset: batch ``b`` of ``n_b`` samples enters with weight ``n_b / N``, so an
    uneven last batch is weighted correctly (exact for per-sample mean losses).

    Products are taken at the model's *current* parameters (read live), so one
    operator serves a whole training run; :meth:`rebind` moves it to another batch
    (or DataLoader) without probing the model again, and drops what the operator
    keeps per batch (e.g. the Hessian's retained gradient graph).

    Data-parallel (``process_group=``): every rank passes its own shard of the
    batch or dataset; a product is the weighted sum over every rank's batches,
    the operator of the joined data, and it comes out bitwise identical on every
    rank, so that solvers (Lanczos, traces, densities) run replicated and take the
    same steps everywhere. The ranks' parameters are compared at construction and
    at :meth:`rebind`, and every product checks that all ranks multiply the same
    vectors (one small collective). A ``DistributedDataParallel`` model is
    measured through its ``module``: the products differentiate fresh copies of
    the parameters, so DDP's gradient all-reduce is never triggered.

    Numerics: products run in ``dtype=`` if given, else in the parameters' dtype,
    except that a half-precision model (bf16/fp16 parameters, e.g. Lightning's
    ``precision="bf16-true"``) is differentiated in float32 copies of its
    parameters, buffers and inputs (the model itself is untouched), as the eNTK
    accumulates; pass ``dtype=torch.bfloat16`` to compute in the model's own
    dtype. A prepared :class:`~rdiag.functional.FunctionalModel` keeps its dtype.

    Subclasses implement :meth:`_batch_matmat` on one batch.

    Attributes:
        fm: The functional view of the model over the selected parameters.
        loss_fn: The loss.
        data: The batch or iterable of batches.
        out_shape: Trailing shape ``out`` of the model's output.
        group: The ranks (:class:`rdiag.distributed.Group`), or ``None``.
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
        dtype: torch.dtype | str | None = None,
        output_fn: Callable[[object], Tensor] | None = None,
        process_group: Any = None,
    ) -> None:
        if not callable(loss_fn):
            raise TypeError(
                f"expected loss_fn to be a callable loss_fn(output, target), got "
                f"{type(loss_fn).__name__}; pass e.g. torch.nn.functional.mse_loss"
            )
        self.fm = functionalize(
            model, params, exclude=exclude, mode=mode, dtype=dtype, output_fn=output_fn
        )
        if dtype is None and not isinstance(model, FunctionalModel):
            # A bf16/fp16 model's curvature in its own dtype is off by ~1e-3..1e-2
            # (bf16 has 8 bits of mantissa): compute in float32, as the eNTK does.
            wanted = accumulation_dtype(self.fm.param_dtype)
            if wanted != self.fm.param_dtype:
                self.fm = functionalize(
                    model,
                    params,
                    exclude=exclude,
                    mode=mode,
                    dtype=wanted,
                    output_fn=output_fn,
                )
        self.loss_fn = loss_fn
        p = self.fm.num_params
        self.shape = (p, p)
        self.dtype = self.fm.param_dtype
        self.device = self.fm.device
        self._bound: tuple | None = None
        self.data = data
        self.out_shape = self._probe(*next(iter_batches(data)))
        self._check_finite(*next(iter_batches(data)))
        self.group = None if process_group is None else Group(process_group)
        if self.group is not None:
            self.group.check_replicas(self.fm.module, self.fm.names)
        # (P,) 0/1 in the operator's dtype, built once (None: every coordinate).
        mask = trainable_mask(self.fm)
        self._trainable = None if mask is None else mask.to(self.dtype)

    def rebind(self, data: Data | None = None) -> None:
        """Take products on ``data`` from now on (default: the same data, fresh).

        The model is probed again only if the new batches' per-sample shapes
        differ from the bound ones. Cached per-batch state is dropped either way.

        Args:
            data: A batch ``(x, y)`` or an iterable of batches, or ``None``.

        Raises:
            TypeError, ValueError: As for the constructor.
        """
        self._invalidate()
        if self.group is not None:
            self.group.check_replicas(self.fm.module, self.fm.names)
        if data is None:
            return
        x, y = next(iter_batches(data))
        self.data = data
        if self._signature(x, y) != self._bound:
            self.out_shape = self._probe(x, y)
        self._check_finite(x, y)

    def _check_finite(self, x: Inputs, y: Tensor) -> None:
        """Refuse NaN or inf in the weights or in the (first) batch, named.

        Raises:
            ValueError: A non-finite parameter, input or target.
        """
        bad = [
            n for n, p in self.fm.params.items() if not bool(torch.isfinite(p).all())
        ]
        if bad:
            raise ValueError(
                f"the model's parameters {bad[:5]} hold NaN or inf; curvature of a "
                "diverged model is undefined: measure an earlier state"
            )
        for what, t in [("targets", y)] + [("inputs", t) for t in leaves(x)]:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"the batch's {what} hold NaN or inf; drop or fix those samples"
                )

    def _invalidate(self) -> None:
        """Drop per-batch caches (subclasses that keep any override this)."""

    def _signature(self, x: Inputs, y: Tensor) -> tuple:
        return (trailing(x), tuple(y.shape[1:]), y.dtype)

    # ---- batches ------------------------------------------------------------------
    def prepare(self, x: Inputs, y: Tensor) -> tuple[Inputs, Tensor]:
        """Move a batch to the parameters' device; floating tensors to their dtype."""
        x = self.fm.cast_input(x, "x")
        y = (
            y.to(self.device, self.dtype)
            if y.is_floating_point()
            else y.to(self.device)
        )
        return x, y

    def outputs(self, params: Mapping[str, Tensor], x: Inputs) -> Tensor:
        """The model's output ``(n, *out)`` on a prepared batch."""
        return self.fm.forward(params, x)

    def batch_loss(self, params: Mapping[str, Tensor], x: Inputs, y: Tensor) -> Tensor:
        """``loss_fn(model(x), y)`` on a prepared batch (a scalar; see :mod:`rdiag.losses`)."""
        return apply_loss(self.loss_fn, self.outputs(params, x), y)

    def _probe(self, x: Inputs, y: Tensor) -> tuple[int, ...]:
        """Check the model and loss on one batch; return the output's trailing shape."""
        self._bound = self._signature(x, y)
        x, y = self.prepare(x, y)
        out = self.fm.probe(x)
        with torch.enable_grad():
            checked_loss(self.loss_fn, out, y)
        return tuple(out.shape[1:])

    def _matmat(self, matrix: Tensor) -> Tensor:
        if self.group is not None:
            self.group.check_replicated(matrix, f"the {self.kind} operator's input")
        if self._trainable is not None:
            matrix = matrix * self._trainable[:, None]
        total, acc = 0, torch.zeros_like(matrix)
        for x, y in iter_batches(self.data):
            n = batch_size(x)
            acc += n * self._batch_matmat(*self.prepare(x, y), matrix)
            total += n
        if self.group is not None:
            acc, total = self.group.sum(acc), self.group.total(total)
        if self._trainable is not None:
            acc.mul_(self._trainable[:, None])
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
                n for n in self.fm.names if n in v and v[n].shape != self.fm.shapes[n]
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
