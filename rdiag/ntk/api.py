"""``empirical_ntk``: the one public entry point for empirical NTKs."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum

import torch
from torch import Tensor, nn

from rdiag._checks import (
    available_memory,
    check_fits,
    check_positive_int,
    check_same_features,
)
from rdiag._optional import warn_once
from rdiag._typing import ParamSelector, Weights
from rdiag.functional import FunctionalModel, Mode, functionalize
from rdiag.ntk.jacobian import jacobian_ntk
from rdiag.ntk.spec import NTKSpec, kernel_dtype, kernel_shape
from rdiag.ntk.structured import structured_coverage, structured_ntk
from rdiag.ntk.vector_products import ntvp_ntk

__all__ = ["NTKImplementation", "NTKSpec", "empirical_ntk", "ntk_costs"]

#: Fraction of free memory used when no ``memory_budget`` is given.
DEFAULT_BUDGET_FRACTION = 0.5
#: ``"auto"`` picks ``"structured"`` when it covers at least this share of parameters.
STRUCTURED_COVERAGE = 0.9


class NTKImplementation(str, Enum):
    """How :func:`empirical_ntk` computes the kernel."""

    AUTO = "auto"
    """Pick by the cost model of :func:`ntk_costs` (cached per model and shapes)."""
    JACOBIAN = "jacobian"
    """Per-sample Jacobians, then a GEMM. Wins for small ``O`` and output-traced
    kernels; needs ``B * O * P`` floats per block of ``B`` samples."""
    NTVP = "ntvp"
    """NTK-vector products (vjp then jvp), never forming ``J``. Wins for the full
    kernel with many outputs; costs ``N2 * O`` jvps over ``N1`` samples."""
    STRUCTURED = "structured"
    """Layerwise Gram-Hadamard products of layer inputs and output cotangents
    (Linear, Conv, Embedding, norm gains); other modules' parameters go through
    ``"jacobian"``. Fastest wherever it covers the parameters."""


_IMPLEMENTATIONS: dict[NTKImplementation, Callable[..., dict[str, Tensor]]] = {
    NTKImplementation.JACOBIAN: jacobian_ntk,
    NTKImplementation.NTVP: ntvp_ntk,
    NTKImplementation.STRUCTURED: structured_ntk,
}


@dataclass(frozen=True)
class Cost:
    """Estimated cost of one implementation.

    Attributes:
        flops: Floating-point operations.
        workspace: Bytes of working memory at the smallest block (1 sample).
    """

    flops: float
    workspace: float


def _forward_flops(fm: FunctionalModel, x: Tensor) -> float:
    """FLOPs of one forward pass per sample, counted once per model and input shape."""
    key = ("_rdiag_fwd_flops", tuple(x.shape[1:]), str(x.dtype))
    cache = fm.__dict__.setdefault("_rdiag_cache", {})
    if key not in cache:
        # Imported here: torch's flop counter imports Triton when it is installed.
        from torch.utils.flop_counter import FlopCounterMode

        probe = x[: min(len(x), 2)]
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            fm(fm.params, probe)
        # Elementwise ops are not counted; 2 FLOPs per parameter is the floor.
        cache[key] = max(counter.get_total_flops() / len(probe), 2.0 * fm.num_params)
    return cache[key]


def ntk_costs(
    fm: FunctionalModel, x1: Tensor, n2: int, spec: NTKSpec, symmetric: bool
) -> dict[NTKImplementation, Cost]:
    """The cost model behind ``implementation="auto"``.

    With ``F`` the forward FLOPs of one sample (counted by
    ``torch.utils.flop_counter``), ``P`` parameters and ``O`` outputs:

    - jacobian: ``3 F O (N1 + N2)`` for the Jacobians (a reverse pass costs about
      twice a forward one) plus ``2 N1 N2 P O^k`` for the contraction, ``k = 1``
      when output-traced, 2 otherwise (halved when symmetric); workspace ``O P``
      floats per sample.
    - ntvp: ``3 F O N2`` for the rows plus ``3 F O N2 N1`` for the jvps (halved
      when symmetric); workspace ``O P`` floats per sample.
    ``"structured"`` is not costed here: ``"auto"`` takes it whenever it covers at
    least ``STRUCTURED_COVERAGE`` of the parameters (its cost scales with layer
    widths instead of ``P``), and falls back to the cheaper of these two when it
    does not fit the memory budget.

    Args:
        fm: Functional model.
        x1: First batch (its trailing shape sets ``F``).
        n2: Size of the second batch.
        spec: The request.
        symmetric: Whether ``K(x1, x1)`` is asked for.

    Returns:
        Implementation -> :class:`Cost`.
    """
    f = _forward_flops(fm, x1)
    n1, o, p = len(x1), spec.num_outputs, fm.num_params
    half = 0.5 if symmetric else 1.0
    pairs = n1 if spec.diagonal else n1 * n2 * half
    item = torch.finfo(kernel_dtype(fm)).bits // 8
    contract = 2.0 * pairs * p * (o if spec.trace_outputs else o * o)
    rows = 3.0 * f * o * (n1 if symmetric else n1 + n2)
    costs = {
        NTKImplementation.JACOBIAN: Cost(rows + contract, o * p * item),
        NTKImplementation.NTVP: Cost(3.0 * f * o * (n2 + pairs), o * p * item),
    }
    return costs


def _choose(
    fm: FunctionalModel,
    x1: Tensor,
    n2: int,
    spec: NTKSpec,
    symmetric: bool,
    per_layer: bool,
) -> NTKImplementation:
    key = (
        "_rdiag_auto",
        tuple(x1.shape),
        n2,
        spec.trace_outputs,
        spec.diagonal,
        per_layer,
    )
    cache = fm.__dict__.setdefault("_rdiag_cache", {})
    if key in cache:
        return cache[key]
    if not fm.batch_coupled and structured_coverage(fm) >= STRUCTURED_COVERAGE:
        choice = NTKImplementation.STRUCTURED
    else:
        choice = _choose_generic(fm, x1, n2, spec, symmetric, per_layer)
    cache[key] = choice
    return choice


def _choose_generic(
    fm: FunctionalModel,
    x1: Tensor,
    n2: int,
    spec: NTKSpec,
    symmetric: bool,
    per_layer: bool,
) -> NTKImplementation:
    """The cheaper of jacobian and ntvp among those whose workspace fits."""
    costs = ntk_costs(fm, x1, n2, spec, symmetric)
    if per_layer:
        # Per-layer kernels cost ntvp one pass per layer; the Jacobian gives them free.
        layers = len(fm.groups)
        ntvp = costs[NTKImplementation.NTVP]
        costs[NTKImplementation.NTVP] = Cost(ntvp.flops * layers, ntvp.workspace)
    fits = {k: c for k, c in costs.items() if c.workspace <= spec.budget}
    if not fits:
        need = min(c.workspace for c in costs.values())
        check_fits(
            need,
            spec.budget,
            "the eNTK of one sample (O*P floats)",
            "select fewer parameters (params=...), trace fewer outputs, or use "
            "rdiag.NTKOperator for products without the kernel",
        )
    return min(fits, key=lambda k: fits[k].flops)


def _block_size(
    spec_bytes_per_sample: float, budget: float, n: int, given: int | None
) -> int:
    """Largest block of samples whose Jacobian rows fit in half the budget."""
    fit = int(budget // (2 * spec_bytes_per_sample))
    if given is not None:
        check_fits(
            2 * given * spec_bytes_per_sample,
            budget,
            f"block_size={given}",
            f"use block_size <= {max(fit, 1)} or a larger memory_budget",
        )
        return given
    if fit < 1:
        check_fits(
            2 * spec_bytes_per_sample,
            budget,
            "one sample's Jacobian rows",
            "select fewer parameters (params=...) or use rdiag.NTKOperator",
        )
    return max(1, min(n, fit))


def empirical_ntk(
    model: nn.Module | FunctionalModel,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    implementation: NTKImplementation | str = "auto",
    trace_outputs: bool = True,
    diagonal: bool = False,
    per_layer: bool = False,
    params: ParamSelector = None,
    exclude: ParamSelector = None,
    weights: Weights = None,
    mode: Mode = "eval",
    dtype: torch.dtype | None = None,
    block_size: int | None = None,
    memory_budget: float | None = None,
    output_fn: Callable[[object], Tensor] | None = None,
) -> Tensor | dict[str, Tensor]:
    r"""Empirical neural tangent kernel :math:`\Theta(x, x') = J(x)\, M\, J(x')^\top`.

    ``J = \partial f / \partial \theta`` over the selected parameters (default: every
    parameter with ``requires_grad=True``), ``M`` the diagonal weighting from
    ``weights`` (identity by default; per-layer learning rates give the
    width-comparable kernel ``K_M``). The model's output ``(N, *out)`` is flattened
    to ``(N, O)``, ``O = prod(out)`` (a ``(N, T, V)`` sequence output gives
    ``O = T * V``).

    Shapes (``N1 = len(x1)``, ``N2 = len(x2)``, or ``N1`` if ``x2`` is None):

    =================  ====================  ==================
    trace_outputs      diagonal=False        diagonal=True
    =================  ====================  ==================
    True (default)     ``(N1, N2)``          ``(N1,)``
    False              ``(N1, N2, O, O)``    ``(N1, O, O)``
    =================  ====================  ==================

    ``K[i, j, a, b] = sum_p J[i, a, p] M[p] J[j, b, p]``; the traced kernel is the
    **sum** over output units ``sum_a K[i, j, a, a]``.

    .. warning::
        neural-tangents' ``trace_axes`` takes the *mean* over outputs; rdiag's traced
        kernel is ``O`` times that.

    .. warning::
        With ``mode="train"`` a model with batch norm (or dropout) is a function of
        the whole batch; per-sample Jacobians do not exist, and the kernel is that
        of the whole-batch function on the batch passed in. A cross-kernel
        ``K(x1, x2)`` is then taken on the concatenated batch ``[x1; x2]`` (the
        ``x1``-rows by ``x2``-columns block), and blocking does not apply. With the
        default ``mode="eval"``, batch norm uses its running statistics and dropout
        is off.

    Args:
        model: The network, or a prepared :class:`~rdiag.functional.FunctionalModel`
            (then ``params``, ``exclude``, ``mode``, ``dtype``, ``output_fn`` are
            ignored).
        x1: ``(N1, ...)`` inputs.
        x2: ``(N2, ...)`` inputs with the same trailing shape, or ``None``
            (symmetric kernel; only upper-triangle tiles are computed).
        implementation: A :class:`NTKImplementation` or its string value.
        trace_outputs: Sum over output units (see the table).
        diagonal: Only ``K(x_i, x_i)`` (requires ``x2=None``).
        per_layer: Return ``{layer name: kernel}`` whose values sum to the total.
        params: Parameter selector (glob, list, module type, predicate).
        exclude: Parameters to leave out.
        weights: Per-layer/parameter weights (dict by layer name, parameter name or
            glob; float; callable), e.g. the learning-rate multipliers.
        mode: ``"eval"`` or ``"train"`` (see the warning).
        dtype: Compute in this dtype (e.g. ``torch.float64``); default the model's.
            Half-precision models accumulate in float32.
        block_size: Samples per tile of ``N1 x N2``; default the largest that fits.
        memory_budget: Bytes the computation may use; default half the free memory.
        output_fn: Picks the output tensor from a non-tensor model output.

    Returns:
        The kernel (see the table), or a dict of per-layer kernels.

    Raises:
        ValueError: Bad shapes or options (x1/x2 trailing shapes differ, ``diagonal``
            with ``x2``, nothing selected).
        TypeError: Inputs that are not tensors.
        MemoryError: The kernel or the smallest block does not fit the budget; the
            message gives the size and a block size or alternative that fits.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> k = empirical_ntk(net, x, dtype=torch.float64)
        >>> jac = torch.autograd.functional.jacobian(
        ...     lambda *p: torch.func.functional_call(
        ...         net.double(), dict(zip(dict(net.named_parameters()), p)), (x,)),
        ...     tuple(net.parameters()))
        >>> j = torch.cat([t.reshape(5, 2, -1) for t in jac], -1)
        >>> torch.allclose(k, torch.einsum("iap,jap->ij", j, j))
        True
    """
    impl = NTKImplementation(implementation)
    fm = functionalize(
        model, params, exclude=exclude, mode=mode, dtype=dtype, output_fn=output_fn
    )
    x1 = fm.cast_input(x1, "x1")
    if x2 is not None:
        x2 = fm.cast_input(x2, "x2")
        check_same_features(x1, x2)
    if diagonal and x2 is not None:
        raise ValueError("diagonal=True computes K(x_i, x_i) and takes no x2; drop x2")
    check_positive_int(block_size, "block_size", allow_none=True)
    budget = memory_budget or DEFAULT_BUDGET_FRACTION * available_memory(fm.device)
    n2 = len(x1) if x2 is None else len(x2)
    with torch.no_grad():
        num_outputs = fm(fm.params, x1[: len(x1) if fm.batch_coupled else 1]).shape[1]
    spec = NTKSpec(
        trace_outputs=trace_outputs,
        diagonal=diagonal,
        weights=fm.param_weights(weights),
        block_size=1,
        budget=float(budget),
        num_outputs=num_outputs,
        per_layer=per_layer,
    )
    item = torch.finfo(kernel_dtype(fm)).bits // 8
    copies = len(fm.groups) if per_layer else 1
    out_bytes = math.prod(kernel_shape(spec, len(x1), n2)) * item * copies
    check_fits(
        out_bytes,
        budget,
        f"the kernel {kernel_shape(spec, len(x1), n2)}{' per layer' if per_layer else ''}",
        "use trace_outputs=True, diagonal=True, fewer samples, or rdiag.NTKOperator "
        "(products K @ v without the kernel)",
    )
    auto = impl is NTKImplementation.AUTO
    if auto:
        impl = _choose(fm, x1, n2, spec, x2 is None, per_layer)
    if impl is NTKImplementation.STRUCTURED:
        tiled = replace(spec, block_size=block_size or max(len(x1), n2))
        try:
            kernels = _IMPLEMENTATIONS[impl](fm, x1, x2, tiled)
            return _finish(kernels, spec, per_layer, len(x1), n2, fm)
        except MemoryError as err:
            if not auto:
                raise
            warn_once(
                f"ntk-structured-memory-{id(fm.module)}",
                f"structured eNTK does not fit the memory budget ({err}); using the "
                "cheapest generic implementation instead",
            )
            impl = _choose_generic(fm, x1, n2, spec, x2 is None, per_layer)
    row_bytes = num_outputs * fm.num_params * item
    block = _block_size(row_bytes, budget - out_bytes, max(len(x1), n2), block_size)
    spec = replace(spec, block_size=block)
    return _finish(
        _IMPLEMENTATIONS[impl](fm, x1, x2, spec), spec, per_layer, len(x1), n2, fm
    )


def _finish(
    kernels: dict[str, Tensor],
    spec: NTKSpec,
    per_layer: bool,
    n1: int,
    n2: int,
    fm: FunctionalModel,
) -> Tensor | dict[str, Tensor]:
    if per_layer:
        return kernels
    if kernels:
        return sum(kernels.values())
    return torch.zeros(
        kernel_shape(spec, n1, n2), dtype=kernel_dtype(fm), device=fm.device
    )
