"""The eNTK as a linear operator on ``R^{N*O}``: ``K v = J M (J^T v)``."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap

from rdiag._autodiff import JvpMode, differentiating, jvp, probe_jvp_mode
from rdiag._checks import check_positive_int
from rdiag._inputs import Inputs, batch_size, describe, rows, trailing
from rdiag._typing import ParamSelector, LRMultipliers
from rdiag.functional import FunctionalModel, Mode, functionalize, document_selection
from rdiag.operators.base import LinearOperator


@document_selection
class NTKOperator(LinearOperator):
    r"""The full eNTK of a batch, :math:`K = J M J^\top`, as a matrix-free operator.

    ``J`` is the ``(N*O, P)`` Jacobian of the batch outputs (row ``i*O + a`` is
    sample ``i``, output ``a``), ``M`` the diagonal parameter weighting. One product
    costs one vjp and one jvp over the batch; ``K`` is never formed, so this scales
    to batches whose ``(N*O)^2`` kernel does not fit in memory. Its dense form equals
    ``empirical_ntk(model, x, trace_outputs=False).permute(0, 2, 1, 3).reshape(N*O, N*O)``.

    Works for batch-coupled models (train-mode batch norm) as the kernel of the
    whole-batch function. Products are taken at the model's current parameters
    (read live); :meth:`rebind` swaps the batch without probing the model again.
    With ``block_size`` a product runs over blocks of samples (``J^T v``
    accumulated over blocks, then ``J`` block by block): large probe sets
    (``10^4 - 10^5`` points) whose activations do not fit at once.

    Args:
        model: Network or :class:`~rdiag.functional.FunctionalModel`.
        x: ``(N, ...)`` batch (a tensor, tuple or dict of tensors).
        params, exclude, mode, dtype, output_fn: The selection keywords, described
            once under "Selection keywords" below.
        lr_multipliers: The diagonal ``M`` (see :class:`rdiag.ntk.handle.NTKFunction`).
        block_size: Samples per forward pass (default all ``N``); not for
            batch-coupled models.

    Raises:
        ValueError: ``block_size`` below 1, or given for a batch-coupled model.

    Example:
        >>> import torch
        >>> from rdiag import empirical_ntk
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> x = torch.randn(6, 3, dtype=torch.float64)
        >>> op = NTKOperator(net, x, dtype=torch.float64)
        >>> dense = empirical_ntk(net, x, trace_outputs=False, dtype=torch.float64)
        >>> torch.allclose(op.to_dense(), dense.permute(0, 2, 1, 3).reshape(12, 12))
        True
    """

    def __init__(
        self,
        model: nn.Module | FunctionalModel,
        x: Inputs,
        *,
        params: ParamSelector = None,
        exclude: ParamSelector = None,
        lr_multipliers: LRMultipliers = None,
        mode: Mode = "eval",
        dtype: torch.dtype | str | None = None,
        output_fn: Callable[[object], Tensor] | None = None,
        block_size: int | None = None,
    ) -> None:
        self.fm = functionalize(
            model, params, exclude=exclude, mode=mode, dtype=dtype, output_fn=output_fn
        )
        self.weights = self.fm.param_weights(lr_multipliers)
        self.x = self.fm.cast_input(x)
        self.out_shape = (
            batch_size(self.x),
            math.prod(self.fm.probe(self.x).shape[1:]),
        )
        size = self.out_shape[0] * self.out_shape[1]
        self.shape = (size, size)
        self.dtype = self.fm.param_dtype
        self.device = self.fm.device
        check_positive_int(block_size, "block_size", allow_none=True)
        if block_size is not None and self.fm.batch_coupled:
            raise ValueError(
                "expected no block_size for a batch-coupled model (train-mode batch "
                "norm couples the samples); use mode='eval' or the whole batch"
            )
        self.block_size = block_size
        self._mode: JvpMode = probe_jvp_mode(self.fm, self.x)

    def rebind(self, x: Inputs) -> None:
        """Use another batch of the same shape and form (no new probe of the model).

        Raises:
            ValueError: ``x`` differs in shape or form from the bound batch.
        """
        x = self.fm.cast_input(x)
        if trailing(x) != trailing(self.x) or batch_size(x) != self.out_shape[0]:
            raise ValueError(
                f"expected a batch shaped like the bound one {describe(self.x)}, got "
                f"{describe(x)}; build a new NTKOperator for another size"
            )
        self.x = x

    def _blocks(self) -> list[slice]:
        n = self.out_shape[0]
        step = self.block_size or n
        return [slice(a, min(a + step, n)) for a in range(0, n, step)]

    def _matmat(self, matrix: Tensor) -> Tensor:
        with differentiating(self._mode):
            return self._products(matrix)

    def _products(self, matrix: Tensor) -> Tensor:
        fm, params, k = self.fm, self.fm.params, matrix.shape[1]
        cot = matrix.T.reshape(k, *self.out_shape)
        blocks = [(b, rows(self.x, b)) for b in self._blocks()]
        pulled: dict[str, Tensor] = {}
        for b, xb in blocks:
            _, pull = vjp(lambda p, xb=xb: fm(p, xb), params)
            for n, r in vmap(pull)(cot[:, b])[0].items():
                pulled[n] = pulled[n] + r if n in pulled else r
        tangents = {n: self.weights[n] * pulled[n] for n in fm.names}
        out = []
        for _, xb in blocks:

            def push(t: dict[str, Tensor], xb: Inputs = xb) -> Tensor:
                return jvp(lambda p: fm(p, xb), (params,), (t,), self._mode)[1]

            out.append(vmap(push, randomness="same")(tangents).reshape(k, -1))
        return torch.cat(out, 1).T
