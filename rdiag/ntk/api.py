"""Empirical NTKs: :func:`ntk_fn` returns a kernel function that owns its plan.

Planning (what :class:`NTKFunction` does once per input signature, i.e. the
shapes and dtypes of ``x1`` and ``x2``): one probe forward pass (output size,
differentiability, a clear error if the model does not take the inputs), the
memory budget, the implementation (``"auto"``: by the rules and cost model
below), the block size, the structured path's capture sites and its one-time
check against autograd, and the forward-mode strategy. Every later call with the
same signature only computes. Parameter values are read live from the model, so
one handle serves a whole training run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from rdiag._autodiff import JvpMode, probe_jvp_mode, probe_vmap
from rdiag._checks import check_positive_int
from rdiag._deprecation import UNSET, renamed_argument
from rdiag._inputs import Inputs, batch_size, describe, rows, signature, trailing
from rdiag._optional import Notices
from rdiag._tiling import block_size, check_fits, format_bytes, resolve_budget
from rdiag._typing import ParamSelector, Weights
from rdiag.functional import FunctionalModel, Mode, functionalize
from rdiag.ntk.jacobian import jacobian_ntk
from rdiag.ntk.outputs import (
    KernelEstimate,
    Projection,
    Readout,
    ReadoutView,
    find_readout,
    probe_estimate,
    projected_view,
    readout_features,
    readout_kernels,
)
from rdiag.ntk.spec import NTKSpec, kernel_dtype, kernel_itemsize, kernel_shape
from rdiag.ntk.structured import StructuredPlan, plan_structured, structured_ntk
from rdiag.ntk.vector_products import ntvp_ntk

__all__ = ["NTKFunction", "NTKImplementation", "NTKPlan", "empirical_ntk", "ntk_fn"]

#: ``"auto"`` picks ``"structured"`` when it covers at least this share of parameters.
STRUCTURED_COVERAGE = 0.9


class NTKImplementation(str, Enum):
    """How the eNTK is computed (``implementation=``; plain strings are accepted)."""

    AUTO = "auto"
    """Pick by the rules and cost model of :class:`NTKFunction` (once per plan)."""
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

    @classmethod
    def parse(cls, value: NTKImplementation | str) -> NTKImplementation:
        """The member for ``value``; raises ``ValueError`` listing the choices."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"expected implementation to be one of {[m.value for m in cls]}, got "
                f"{value!r}"
            ) from None


@dataclass(frozen=True)
class Cost:
    """Estimated cost of one implementation.

    Attributes:
        flops: Floating-point operations.
        workspace: Bytes of working memory at the smallest block (1 sample).
    """

    flops: float
    workspace: float


@dataclass(frozen=True)
class NTKPlan:
    """Everything decided for one input signature.

    Attributes:
        implementation: What runs (never ``AUTO``).
        reason: Why it was chosen, in words.
        spec: The request with the block size, budget and output size filled in.
        shape: Shape of the returned kernel (of each per-layer kernel).
        structured: The checked capture sites, for ``STRUCTURED``.
        costs: The cost model's estimates, when ``"auto"`` consulted it.
        readout: The read-out of the read-out identity (traced kernels of large
            output spaces): the rest runs on :attr:`inner`, the handle of the
            reduced view.
        inner: The handle of the reduced view, with ``readout``.
    """

    implementation: NTKImplementation
    reason: str
    spec: NTKSpec
    shape: tuple[int, ...]
    structured: StructuredPlan | None = None
    costs: dict[NTKImplementation, Cost] | None = None
    readout: Readout | None = None
    inner: NTKFunction | None = None


def _forward_flops(fm: FunctionalModel, x: Inputs) -> float:
    """FLOPs of one forward pass per sample (torch's flop counter on two samples)."""
    # Imported here: torch's flop counter imports Triton when it is installed.
    from torch.utils.flop_counter import FlopCounterMode

    probe = rows(x, slice(0, 2))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fm(fm.params, probe)
    # Elementwise ops are not counted; 2 FLOPs per parameter is the floor.
    return max(counter.get_total_flops() / batch_size(probe), 2.0 * fm.num_params)


def _costs(
    fm: FunctionalModel, flops: float, n1: int, n2: int, spec: NTKSpec, symmetric: bool
) -> dict[NTKImplementation, Cost]:
    """The cost model of the generic implementations.

    With ``F`` the forward FLOPs of one sample, ``P`` parameters and ``O`` outputs:

    - jacobian: ``3 F O (N1 + N2)`` for the Jacobians (a reverse pass costs about
      twice a forward one) plus ``2 N1 N2 P O^k`` for the contraction, ``k = 1``
      when output-traced, 2 otherwise (halved when symmetric); workspace ``O P``
      floats per sample. Per-layer kernels come free with the Jacobian.
    - ntvp: ``3 F O N2`` for the rows plus ``3 F O N2 N1`` for the jvps (halved
      when symmetric), once per layer for per-layer kernels; workspace ``O P``
      floats per sample.
    """
    o, p = spec.num_outputs, fm.num_params
    half = 0.5 if symmetric else 1.0
    pairs = n1 if spec.diagonal else n1 * n2 * half
    item = kernel_itemsize(fm)
    contract = 2.0 * pairs * p * (o if spec.trace_outputs else o * o)
    jac_rows = 3.0 * flops * o * (n1 if symmetric else n1 + n2)
    layers = len(fm.groups) if spec.per_layer else 1
    return {
        NTKImplementation.JACOBIAN: Cost(jac_rows + contract, o * p * item),
        NTKImplementation.NTVP: Cost(
            3.0 * flops * o * (n2 + pairs) * layers, o * p * item
        ),
    }


class NTKFunction:
    r"""The empirical NTK of one model as a reusable function ``(x1, x2=None) -> K``.

    :math:`\Theta(x, x') = J(x)\, M\, J(x')^\top` with ``J = df/dtheta`` over the
    selected parameters and ``M`` the diagonal ``lr_multipliers`` (identity by
    default; per-layer learning rates give the width-comparable kernel ``K_M``).
    The model's output ``(N, *out)`` is flattened to ``(N, O)``, ``O = prod(out)``.

    Shapes (``N1 = len(x1)``, ``N2 = len(x2)``, or ``N1`` if ``x2`` is None):

    =================  ====================  ==================
    trace_outputs      diagonal=False        diagonal=True
    =================  ====================  ==================
    True (default)     ``(N1, N2)``          ``(N1,)``
    False              ``(N1, N2, O, O)``    ``(N1, O, O)``
    =================  ====================  ==================

    ``K[i, j, a, b] = sum_p J[i, a, p] M[p] J[j, b, p]``; the traced kernel is the
    **sum** over output units ``sum_a K[i, j, a, a]``. With ``per_layer=True`` a
    call returns ``{layer name: kernel}`` whose values sum to the total.

    The handle owns its plan (see :class:`NTKPlan`), one per input signature:
    :meth:`plan` shows it, :attr:`implementation` and :meth:`explain` say what
    ran and why. The parameters are read live from the model at every call.

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
        implementation: A :class:`NTKImplementation` or its string value.
        trace_outputs: Sum over output units (see the table).
        diagonal: Only ``K(x_i, x_i)`` (calls take no ``x2``).
        per_layer: Return ``{layer name: kernel}``.
        params: Parameter selector (glob, list, module type, predicate).
        exclude: Parameters to leave out.
        lr_multipliers: The diagonal ``M``: per-layer/parameter weights (dict by
            layer name, parameter name or glob; float; callable), e.g.
            :func:`rdiag.lr_multipliers`.
        mode: ``"eval"`` or ``"train"`` (see the warning).
        dtype: Compute in this dtype (e.g. ``torch.float64``); default the model's.
            Half-precision models accumulate in float32.
        block_size: Samples per tile of ``N1 x N2``; default the largest that fits.
        memory_budget: Bytes the computation may use; default half the free memory
            (read when a plan is made).
        output_fn: Picks the output tensor from a non-tensor model output.
        projection: The kernel of projected outputs ``K_P = (PJ)(PJ)^T``: a
            ``(k, O)`` tensor (``(k, V)`` with ``per_token``), or an int ``k`` for a
            seeded Rademacher matrix (see :mod:`rdiag.ntk.outputs`).
        per_token: Project each position's last axis of a ``(N, T, V)`` output.
        output_probes: Estimate the traced kernel from this many Rademacher output
            probes instead of every output unit: calls return a
            :class:`~rdiag.ntk.outputs.KernelEstimate` with its error bar.
        seed: Seed of a random projection or of the probes.
        readout_identity: For traced kernels, reduce the ``V`` outputs of a linear
            read-out to its ``D`` inputs when ``D < V`` (exact; see
            :mod:`rdiag.ntk.outputs`).
        weights: Deprecated name of ``lr_multipliers``.

    Raises:
        ValueError: Bad options (an unknown implementation, ``block_size < 1``, a
            non-positive ``memory_budget``, nothing selected).
        TypeError: ``model`` is not a module.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> kernel = ntk_fn(net, dtype=torch.float64)
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> k = kernel(x)
        >>> jac = torch.autograd.functional.jacobian(
        ...     lambda *p: torch.func.functional_call(
        ...         net.double(), dict(zip(dict(net.named_parameters()), p)), (x,)),
        ...     tuple(net.parameters()))
        >>> j = torch.cat([t.reshape(5, 2, -1) for t in jac], -1)
        >>> torch.allclose(k, torch.einsum("iap,jap->ij", j, j))
        True
        >>> kernel.implementation.value
        'structured'
    """

    def __init__(
        self,
        model: nn.Module | FunctionalModel,
        *,
        implementation: NTKImplementation | str = "auto",
        trace_outputs: bool = True,
        diagonal: bool = False,
        per_layer: bool = False,
        params: ParamSelector = None,
        exclude: ParamSelector = None,
        lr_multipliers: Weights = None,
        mode: Mode = "eval",
        dtype: torch.dtype | str | None = None,
        block_size: int | None = None,
        memory_budget: float | None = None,
        output_fn: Callable[[object], Tensor] | None = None,
        projection: Tensor | int | None = None,
        per_token: bool = False,
        output_probes: int | None = None,
        seed: int = 0,
        readout_identity: bool = True,
        weights: Any = UNSET,
    ) -> None:
        lr_multipliers = renamed_argument(
            "ntk_fn", "weights", "lr_multipliers", weights, lr_multipliers
        )
        self.requested = NTKImplementation.parse(implementation)
        self.fm = functionalize(
            model, params, exclude=exclude, mode=mode, dtype=dtype, output_fn=output_fn
        )
        self.estimate = output_probes is not None
        if self.estimate:
            check_positive_int(output_probes, "output_probes")
            if projection is not None or not trace_outputs:
                raise ValueError(
                    "expected output_probes with trace_outputs=True and no projection: "
                    "the probes estimate the traced kernel; drop one of them"
                )
            projection, trace_outputs = output_probes, False
        if projection is not None:
            self.fm = projected_view(
                self.fm, Projection(projection, per_token=per_token, seed=seed)
            )
        self.readout_identity = readout_identity and projection is None
        check_positive_int(block_size, "block_size", allow_none=True)
        if memory_budget is not None:
            resolve_budget(memory_budget, self.fm.device)
        self.trace_outputs = bool(trace_outputs)
        self.diagonal = bool(diagonal)
        self.per_layer = bool(per_layer)
        self.block_size = block_size
        self.memory_budget = memory_budget
        self.weights = self.fm.param_weights(lr_multipliers)
        self._plans: dict[tuple, NTKPlan] = {}
        self._jvp_mode: JvpMode | None = None
        self._vmap_error: str | None | bool = False  # False: not probed yet
        self.notices = Notices()
        self.last_plan: NTKPlan | None = None

    # ---- public surface ---------------------------------------------------------
    def __call__(
        self, x1: Inputs, x2: Inputs | None = None
    ) -> Tensor | dict[str, Tensor] | KernelEstimate:
        """The kernel of ``x1`` against ``x2`` (``x1`` itself when ``None``).

        Args:
            x1: ``(N1, ...)`` inputs (a tensor, tuple or dict of tensors).
            x2: ``(N2, ...)`` inputs of the same form, or ``None`` (symmetric kernel;
                only upper-triangle tiles are computed).

        Returns:
            The kernel (see the class table), or a dict of per-layer kernels.

        Raises:
            ValueError: Inputs that do not fit (differing trailing shapes, an empty
                batch, NaN entries, ``x2`` with ``diagonal=True``, inputs the model
                fails on).
            TypeError: Inputs that are not tensors.
            MemoryError: The kernel or the smallest block does not fit the budget;
                the message gives the size and a block size or alternative that fits.
        """
        x1, x2 = self._prepare(x1, x2)
        plan = self._plan(x1, x2)
        self.last_plan = plan
        if plan.readout is not None:
            return self._finish(self._run_readout(plan, x1, x2), plan)
        try:
            kernels = _RUNNERS[plan.implementation](self, plan, x1, x2)
        except MemoryError as err:
            if self.requested is not NTKImplementation.AUTO:
                raise
            self.notices.say(
                "structured-memory",
                f"structured eNTK does not fit the memory budget ({err}); using the "
                "cheapest generic implementation instead",
            )
            plan = self._generic_plan(plan.spec, x1, x2, "structured did not fit")
            self._plans[self._key(x1, x2)] = self.last_plan = plan
            kernels = _RUNNERS[plan.implementation](self, plan, x1, x2)
        return self._finish(kernels, plan)

    def plan(self, x1: Inputs, x2: Inputs | None = None) -> NTKPlan:
        """The plan for inputs like ``x1`` (and ``x2``): made once, then reused.

        Raises:
            ValueError, TypeError, MemoryError: As :meth:`__call__`.
        """
        return self._plan(*self._prepare(x1, x2))

    @property
    def implementation(self) -> NTKImplementation | None:
        """What ran in the last call (``None`` before the first)."""
        return None if self.last_plan is None else self.last_plan.implementation

    @property
    def num_plans(self) -> int:
        """How many plans this handle has made (one per input signature)."""
        return len(self._plans)

    def explain(self) -> str:
        """One line: the implementation of the last call and why."""
        plan = self.last_plan
        if plan is None:
            return f"no call yet; implementation={self.requested.value!r} was asked for"
        spec = plan.spec
        return (
            f"{plan.implementation.value}: {plan.reason}; kernel {plan.shape}, "
            f"block {spec.block_size} samples, memory budget {format_bytes(spec.budget)}"
        )

    # ---- planning -----------------------------------------------------------------
    def _prepare(self, x1: Inputs, x2: Inputs | None) -> tuple[Inputs, Inputs | None]:
        x1 = self.fm.cast_input(x1, "x1")
        if x2 is not None:
            if self.diagonal:
                raise ValueError(
                    "diagonal=True computes K(x_i, x_i) and takes no x2; drop x2"
                )
            x2 = self.fm.cast_input(x2, "x2")
            if trailing(x1) != trailing(x2):
                raise ValueError(
                    f"expected x1 and x2 to differ only in the batch axis, got x1 "
                    f"{describe(x1)} and x2 {describe(x2)}; reshape or cast one of them"
                )
        return x1, x2

    def _key(self, x1: Inputs, x2: Inputs | None) -> tuple:
        return (
            signature(x1),
            None if x2 is None else signature(x2),
            self.fm.param_dtype,
            self.fm.device,
        )

    def _plan(self, x1: Inputs, x2: Inputs | None) -> NTKPlan:
        key = self._key(x1, x2)
        if key not in self._plans:
            self._plans[key] = self._make_plan(x1, x2)
        return self._plans[key]

    def _make_plan(self, x1: Inputs, x2: Inputs | None) -> NTKPlan:
        fm = self.fm
        n1 = batch_size(x1)
        n2 = n1 if x2 is None else batch_size(x2)
        probe = x1 if fm.batch_coupled else rows(x1, slice(0, 1))
        num_outputs = math.prod(fm.probe(probe).shape[1:])
        spec = NTKSpec(
            trace_outputs=self.trace_outputs,
            diagonal=self.diagonal,
            weights=self.weights,
            block_size=1,
            budget=resolve_budget(self.memory_budget, fm.device),
            num_outputs=num_outputs,
            per_layer=self.per_layer,
            whole_batch=fm.batch_coupled,
        )
        shape = kernel_shape(spec, n1, n2)
        copies = len(fm.groups) if self.per_layer else 1
        check_fits(
            math.prod(shape) * kernel_itemsize(fm) * copies,
            spec.budget,
            f"the kernel {shape}{' per layer' if self.per_layer else ''}",
            "use trace_outputs=True, diagonal=True, fewer samples, or rdiag.NTKOperator "
            "(products K @ v without the kernel)",
        )
        if self.readout_identity and self.trace_outputs:
            readout = find_readout(fm, x1)
            if readout is not None:
                return self._readout_plan(readout, spec, shape, x1, x2)
        requested = self.requested
        if requested in (NTKImplementation.STRUCTURED, NTKImplementation.AUTO):
            if fm.batch_coupled:
                reason = "the model is batch-coupled (no per-sample factors)"
                if requested is NTKImplementation.STRUCTURED:
                    return self._sized(NTKImplementation.JACOBIAN, reason, spec, x1, x2)
                return self._generic_plan(spec, x1, x2, reason)
            structured = plan_structured(fm, x1, num_outputs, self.weights)
            coverage = structured.coverage(fm)
            if (
                requested is NTKImplementation.STRUCTURED
                or coverage >= STRUCTURED_COVERAGE
            ):
                self._notice_rest(structured)
                reason = (
                    f"the structured rules cover {coverage:.1%} of "
                    f"{fm.num_params:,} parameters after the autograd check"
                )
                block = self.block_size or max(n1, n2)
                if structured.rest_view is not None:  # the rest runs 'jacobian'
                    spec = replace(spec, whole_batch=self._whole_batch(x1))
                return NTKPlan(
                    NTKImplementation.STRUCTURED,
                    reason
                    if requested is NTKImplementation.STRUCTURED
                    else f"auto: {reason}",
                    replace(spec, block_size=block),
                    shape,
                    structured=structured,
                )
            why = f"structured covers only {coverage:.1%} of the parameters"
            return self._generic_plan(spec, x1, x2, why)
        return self._sized(requested, "asked for", spec, x1, x2)

    def _readout_plan(
        self,
        readout: Readout,
        spec: NTKSpec,
        shape: tuple[int, ...],
        x1: Inputs,
        x2: Inputs | None,
    ) -> NTKPlan:
        """Plan the reduced view (the outputs ``h L`` of the read-out's input)."""
        view = ReadoutView(self.fm, readout)
        view.basis = readout.factor(self.fm)
        inner = NTKFunction(
            view,
            implementation=self.requested,
            diagonal=self.diagonal,
            per_layer=self.per_layer,
            lr_multipliers={n: self.weights[n] for n in view.names},
            block_size=self.block_size,
            memory_budget=self.memory_budget,
            readout_identity=False,
        )
        inner_plan = inner.plan(x1, x2)
        r = view.basis.shape[1]
        reason = (
            f"read-out identity: the {readout.module.out_features} outputs per position "
            f"of {readout.name!r} reduced to {r} (its input's rank); {inner_plan.reason}"
        )
        return NTKPlan(
            inner_plan.implementation, reason, spec, shape, readout=readout, inner=inner
        )

    def _generic_plan(
        self, spec: NTKSpec, x1: Inputs, x2: Inputs | None, why: str
    ) -> NTKPlan:
        """The cheaper of jacobian and ntvp among those whose workspace fits."""
        n1 = batch_size(x1)
        n2 = n1 if x2 is None else batch_size(x2)
        costs = _costs(self.fm, _forward_flops(self.fm, x1), n1, n2, spec, x2 is None)
        fits = {k: c for k, c in costs.items() if c.workspace <= spec.budget}
        if not fits:
            check_fits(
                min(c.workspace for c in costs.values()),
                spec.budget,
                "the eNTK of one sample (O*P floats)",
                "select fewer parameters (params=...), trace fewer outputs, or use "
                "rdiag.NTKOperator for products without the kernel",
            )
        choice = min(fits, key=lambda k: fits[k].flops)
        reason = f"auto: {why}; {choice.value} is the cheapest by the cost model"
        plan = self._sized(choice, reason, spec, x1, x2)
        return replace(plan, costs=costs)

    def _sized(
        self,
        impl: NTKImplementation,
        reason: str,
        spec: NTKSpec,
        x1: Inputs,
        x2: Inputs | None,
    ) -> NTKPlan:
        """A jacobian/ntvp plan with the largest block that fits beside the kernel."""
        n1 = batch_size(x1)
        n2 = n1 if x2 is None else batch_size(x2)
        shape = kernel_shape(spec, n1, n2)
        copies = len(self.fm.groups) if self.per_layer else 1
        item = kernel_itemsize(self.fm)
        out_bytes = math.prod(shape) * item * copies
        row_bytes = spec.num_outputs * self.fm.num_params * item
        block = block_size(
            row_bytes, spec.budget - out_bytes, max(n1, n2), self.block_size
        )
        if impl is NTKImplementation.NTVP:
            self.jvp_mode(x1)
        spec = replace(spec, block_size=block, whole_batch=self._whole_batch(x1))
        return NTKPlan(impl, reason, spec, shape)

    def _whole_batch(self, x: Inputs) -> bool:
        """Whether the generic paths must differentiate the whole batch (probed once)."""
        if self.fm.batch_coupled:
            return True
        if self._vmap_error is False:
            self._vmap_error = probe_vmap(self.fm, x)
            if self._vmap_error is not None:
                self.notices.say(
                    "vmap",
                    f"{type(self.fm.module).__name__}'s forward does not run under vmap "
                    f"over samples ({self._vmap_error}); rdiag differentiates the whole "
                    "batch instead (exact, about N times the cost)",
                )
        return self._vmap_error is not None

    def jvp_mode(self, x: Inputs) -> JvpMode:
        """The forward-mode strategy for this model, probed once per handle."""
        if self._jvp_mode is None:
            self._jvp_mode = probe_jvp_mode(self.fm, x)
        return self._jvp_mode

    def _notice_rest(self, structured: StructuredPlan) -> None:
        rest = {n: why for n, why in structured.rest.items() if self.weights[n]}
        if rest:
            kinds = sorted(set(rest.values()))
            self.notices.say(
                f"structured-fallback-{kinds}",
                f"structured eNTK: {len(rest)} parameter(s) of {kinds} go through the "
                "'jacobian' implementation; the result is exact but slower",
            )

    def _run_readout(
        self, plan: NTKPlan, x1: Inputs, x2: Inputs | None
    ) -> dict[str, Tensor]:
        """The read-out identity: the reduced view's kernel plus the read-out's own."""
        view = plan.inner.fm
        view.basis = plan.readout.factor(self.fm)
        inner = plan.inner(x1, x2)
        kernels = dict(inner) if self.per_layer else {"all": inner}
        h1 = readout_features(view, x1)
        h2 = None if x2 is None else readout_features(view, x2)
        own = readout_kernels(plan.readout, h1, h2, self.weights, self.diagonal)
        for layer, k in own.items():
            key = layer if self.per_layer else "all"
            kernels[key] = kernels[key] + k if key in kernels else k
        return kernels

    def _finish(
        self, kernels: dict[str, Tensor], plan: NTKPlan
    ) -> Tensor | dict[str, Tensor] | KernelEstimate:
        if self.per_layer:
            if self.estimate:
                return {k: probe_estimate(v) for k, v in kernels.items()}
            return kernels
        if kernels:
            total = sum(kernels.values())
        else:
            total = torch.zeros(
                plan.shape, dtype=kernel_dtype(self.fm), device=self.fm.device
            )
        return probe_estimate(total) if self.estimate else total


def _run_jacobian(
    f: NTKFunction, plan: NTKPlan, x1: Inputs, x2: Inputs | None
) -> dict[str, Tensor]:
    return jacobian_ntk(f.fm, x1, x2, plan.spec)


def _run_ntvp(
    f: NTKFunction, plan: NTKPlan, x1: Inputs, x2: Inputs | None
) -> dict[str, Tensor]:
    return ntvp_ntk(f.fm, x1, x2, plan.spec, f.jvp_mode(x1))


def _run_structured(
    f: NTKFunction, plan: NTKPlan, x1: Inputs, x2: Inputs | None
) -> dict[str, Tensor]:
    return structured_ntk(f.fm, x1, x2, plan.spec, plan.structured)


_RUNNERS: dict[
    NTKImplementation, Callable[[NTKFunction, NTKPlan, Inputs, Inputs | None], dict]
] = {
    NTKImplementation.JACOBIAN: _run_jacobian,
    NTKImplementation.NTVP: _run_ntvp,
    NTKImplementation.STRUCTURED: _run_structured,
}


def ntk_fn(model: nn.Module | FunctionalModel, **options: Any) -> NTKFunction:
    """The eNTK of ``model`` as a reusable kernel function that owns its plan.

    ``rdiag.ntk_fn(model, **options)`` is :class:`NTKFunction` (see there for the
    options, shapes and semantics); keep it for repeated kernels of one model (a
    Monitor, a training loop): plans, checks and probes are done once.

    Returns:
        The :class:`NTKFunction`, called as ``kernel(x1, x2=None)``.
    """
    return NTKFunction(model, **options)


def empirical_ntk(
    model: nn.Module | FunctionalModel,
    x1: Inputs,
    x2: Inputs | None = None,
    **options: Any,
) -> Tensor | dict[str, Tensor]:
    r"""Empirical NTK :math:`J(x_1)\, M\, J(x_2)^\top` in one call: ``ntk_fn(model, **options)(x1, x2)``.

    Options, shapes and semantics are those of :class:`NTKFunction`
    (``implementation``, ``trace_outputs``, ``diagonal``, ``per_layer``,
    ``params``, ``exclude``, ``lr_multipliers``, ``mode``, ``dtype``,
    ``block_size``, ``memory_budget``, ``output_fn``). For repeated kernels of one
    model keep the handle from :func:`ntk_fn` instead: this function plans anew
    every call.

    Args:
        model: The network (or a :class:`~rdiag.functional.FunctionalModel`).
        x1: ``(N1, ...)`` inputs.
        x2: ``(N2, ...)`` inputs, or ``None`` for the symmetric kernel.
        **options: See :class:`NTKFunction`.

    Returns:
        ``(N1, N2)`` traced (default), ``(N1, N2, O, O)`` full, ``(N1,)`` /
        ``(N1, O, O)`` diagonal, or a dict of per-layer kernels.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> x = torch.randn(5, 3)
        >>> empirical_ntk(net, x).shape, empirical_ntk(net, x, trace_outputs=False).shape
        (torch.Size([5, 5]), torch.Size([5, 5, 2, 2]))
    """
    return ntk_fn(model, **options)(x1, x2)


def ntk_costs(
    fm: FunctionalModel, x1: Tensor, n2: int, spec: NTKSpec, symmetric: bool
) -> dict[NTKImplementation, Cost]:
    """Deprecated: the cost model is on the plan, ``ntk_fn(model).plan(x1, x2).costs``."""
    from rdiag._deprecation import renamed_name

    renamed_name("rdiag.ntk_costs", "ntk_fn(model).plan(x1, x2).costs", None)
    n1 = batch_size(x1)
    return _costs(fm, _forward_flops(fm, x1), n1, n2, spec, symmetric)
