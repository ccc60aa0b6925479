"""Empirical NTKs: :func:`ntk_fn` returns a kernel function that owns its plan.

Planning (what :class:`NTKFunction` does once per input signature, i.e. the
shapes and dtypes of ``x1`` and ``x2``): one probe forward pass (output size,
differentiability, a clear error if the model does not take the inputs), the
memory budget, the implementation (``"auto"``: the fastest by the cost model of
:mod:`rdiag.ntk.costs` among those that fit, close calls timed on the first two
calls), the block size, the structured path's capture sites and its one-time
check against autograd, and the forward-mode strategy. Every later call with the
same signature only computes. Parameter values are read live from the model, so
one handle serves a whole training run.
"""

from __future__ import annotations

import math
import time
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
from rdiag.distributed import Group, sharded_kernel
from rdiag.functional import FunctionalModel, Mode, functionalize
from rdiag.ntk.jacobian import jacobian_ntk
from rdiag.ntk.outputs import (
    KernelEstimate,
    Projection,
    probe_estimate,
    projected_view,
)
from rdiag.ntk.readout import (
    Readout,
    ReadoutView,
    find_readout,
    readout_features,
    readout_kernels,
    tied_kernels,
)
from rdiag.ntk.costs import (
    RACE_CALLS,
    RACE_RATIO,
    RACE_SECONDS,
    Cost,
    Problem,
    jacobian_cost,
    ntvp_cost,
    sample_forward_flops,
    structured_cost,
)
from rdiag.ntk.spec import NTKSpec, kernel_dtype, kernel_itemsize, kernel_shape
from rdiag.ntk.structured import (
    StructuredPlan,
    capture_bytes,
    output_chunks,
    plan_structured,
    structured_ntk,
)
from rdiag.ntk.vector_products import ntvp_ntk

__all__ = ["NTKFunction", "NTKImplementation", "NTKPlan", "empirical_ntk", "ntk_fn"]


#: Output units per sample from which a traced kernel without the read-out
#: identity is worth a notice (its cost grows with them).
LARGE_OUTPUTS = 4096


class NTKImplementation(str, Enum):
    """How the eNTK is computed (``implementation=``; plain strings are accepted)."""

    AUTO = "auto"
    """The fastest that fits by :mod:`rdiag.ntk.costs` (once per plan; estimates
    within ``RACE_RATIO`` of each other are raced on the first calls)."""
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
class NTKPlan:
    """Everything decided for one input signature.

    Attributes:
        implementation: What runs (never ``AUTO``).
        reason: Why it was chosen, in words.
        spec: The request with the block size, budget and output size filled in.
        shape: Shape of the returned kernel (of each per-layer kernel).
        memory: Estimated peak bytes of the computation (kernel included).
        structured: The checked capture sites, for ``STRUCTURED``.
        costs: The cost model's estimates (:mod:`rdiag.ntk.costs`), when
            ``"auto"`` consulted it (with the read-out identity: those of the
            reduced view, which is what runs).
        alternative: A runner-up whose estimate is too close to call: the handle's
            first :data:`~rdiag.ntk.costs.RACE_CALLS` calls of each (alternating)
            time both and keep the faster on its warmed calls (then ``None``).
        timings: Seconds each raced implementation took, once settled.
        readout: The read-out of the read-out identity (traced kernels of large
            output spaces): the rest runs on :attr:`inner`, the handle of the
            reduced view.
        inner: The handle of the reduced view, with ``readout``.
    """

    implementation: NTKImplementation
    reason: str
    spec: NTKSpec
    shape: tuple[int, ...]
    memory: float = 0.0
    structured: StructuredPlan | None = None
    costs: dict[NTKImplementation, Cost] | None = None
    alternative: NTKPlan | None = None
    timings: dict[NTKImplementation, float] | None = None
    readout: Readout | None = None
    inner: NTKFunction | None = None


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
            read-out to its ``D`` inputs when ``D < V``, tied or not (exact; see
            :mod:`rdiag.ntk.readout`).
        weights: Deprecated name of ``lr_multipliers``.
        process_group: A ``torch.distributed`` process group: each rank passes its
            shard of the inputs, the kernel's tiles are split across the ranks
            and all-gathered (see :meth:`__call__`); a ``DistributedDataParallel``
            model is viewed through its ``module``.

    Raises:
        ValueError: Bad options (an unknown implementation, ``block_size < 1``, a
            non-positive ``memory_budget``, nothing selected, ``output_probes``
            with ``process_group``, ranks whose parameters differ).
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
        process_group: Any = None,
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
        # Signature -> seconds of each call per implementation of a race in progress.
        self._races: dict[tuple, dict[NTKImplementation, list[float]]] = {}
        self._jvp_mode: JvpMode | None = None
        self._vmap_error: str | None | bool = False  # False: not probed yet
        self.notices = Notices()
        self.last_plan: NTKPlan | None = None
        self.group = None if process_group is None else Group(process_group)
        if self.group is not None:
            if self.estimate:
                raise ValueError(
                    "expected output_probes=None with process_group=: the probe "
                    "estimate's error bar is not split across ranks; drop one of them"
                )
            self.group.check_replicas(self.fm.module, self.fm.names)

    # ---- public surface ---------------------------------------------------------
    def __call__(
        self, x1: Inputs, x2: Inputs | None = None
    ) -> Tensor | dict[str, Tensor] | KernelEstimate:
        """The kernel of ``x1`` against ``x2`` (``x1`` itself when ``None``).

        With ``process_group``, ``x1`` and ``x2`` are this rank's shards and the
        kernel is that of the ranks' batches joined in rank order, its tiles split
        across the ranks (:func:`rdiag.distributed.sharded_kernel`); every rank
        returns the same whole kernel.

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
        if self.group is not None:
            self._prepare(x1, x2)  # bad inputs raise here, before any collective
            return sharded_kernel(
                self.group, self._local, x1, x2, diagonal=self.diagonal
            )
        return self._local(x1, x2)

    def _local(
        self, x1: Inputs, x2: Inputs | None
    ) -> Tensor | dict[str, Tensor] | KernelEstimate:
        """The kernel of this process's inputs (what ``__call__`` computes alone)."""
        x1, x2 = self._prepare(x1, x2)
        key = self._key(x1, x2)
        plan = self._plan(x1, x2)
        if plan.readout is not None:
            self.last_plan = plan
            return self._finish(self._run_readout(plan, x1, x2), plan)
        run = plan
        if plan.alternative is not None:
            timed = self._races.get(key, {})
            ahead = len(timed.get(plan.implementation, ()))
            if len(timed.get(plan.alternative.implementation, ())) < ahead:
                run = plan.alternative
        self.last_plan = run
        start = time.perf_counter()
        try:
            kernels = _RUNNERS[run.implementation](self, run, x1, x2)
        except MemoryError as err:
            if self.requested is not NTKImplementation.AUTO:
                raise
            self.notices.say(
                "structured-memory",
                f"structured eNTK does not fit the memory budget ({err}); using the "
                "cheapest generic implementation instead",
            )
            self._races.pop(key, None)
            run = self._auto(plan.spec, x1, x2, None, "structured did not fit")
            self._plans[key] = self.last_plan = replace(run, alternative=None)
            return self._finish(_RUNNERS[run.implementation](self, run, x1, x2), run)
        if plan.alternative is not None:
            self._settle(key, plan, run, start)
        return self._finish(kernels, run)

    def plan(self, x1: Inputs, x2: Inputs | None = None) -> NTKPlan:
        """The plan for inputs like ``x1`` (and ``x2``): made once, then reused.

        Raises:
            ValueError, TypeError, MemoryError: As :meth:`__call__`.
        """
        return self._plan(*self._prepare(x1, x2))

    @property
    def implementation(self) -> NTKImplementation | None:
        """What ran in the last call (``None`` before the first)."""
        plan = self.last_plan
        if plan is not None and plan.inner is not None:
            return plan.inner.implementation
        return None if plan is None else plan.implementation

    @property
    def num_plans(self) -> int:
        """How many plans this handle has made (one per input signature)."""
        return len(self._plans)

    def explain(self) -> str:
        """One line: the implementation of the last call and why."""
        plan = self.last_plan
        if plan is None:
            return f"no call yet; implementation={self.requested.value!r} was asked for"
        if plan.inner is not None:
            return f"{plan.reason}; {plan.inner.explain()}"
        spec = plan.spec
        return (
            f"{plan.implementation.value}: {plan.reason}; kernel {plan.shape}, "
            f"block {spec.block_size} samples, about {format_bytes(plan.memory)} of "
            f"the memory budget {format_bytes(spec.budget)}"
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
        check_fits(
            self._kernel_bytes(shape),
            spec.budget,
            f"the kernel {shape}{' per layer' if self.per_layer else ''}",
            "use trace_outputs=True, diagonal=True, fewer samples, or rdiag.NTKOperator "
            "(products K @ v without the kernel)",
        )
        if self.readout_identity and self.trace_outputs:
            readout = find_readout(fm, x1)
            if readout is not None:
                return self._readout_plan(readout, spec, shape, x1, x2)
            if num_outputs >= LARGE_OUTPUTS:
                self._notice_large_outputs(num_outputs)
        requested = self.requested
        if requested in (NTKImplementation.JACOBIAN, NTKImplementation.NTVP):
            return self._sized(requested, "asked for", spec, x1, x2)
        if fm.batch_coupled:
            reason = "the model is batch-coupled (no per-sample factors)"
            if requested is NTKImplementation.STRUCTURED:
                return self._sized(NTKImplementation.JACOBIAN, reason, spec, x1, x2)
            return self._auto(spec, x1, x2, None, reason)
        structured = plan_structured(fm, x1, num_outputs, self.weights)
        if requested is NTKImplementation.AUTO:
            return self._auto(spec, x1, x2, structured, "")
        self._notice_rest(structured)
        coverage = structured.coverage(fm)
        reason = (
            f"asked for; the structured rules cover {coverage:.1%} of "
            f"{fm.num_params:,} "
            "parameters after the autograd check"
        )
        return self._structured_plan(structured, reason, spec, x1, x2)[0]

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
            f"of {readout.name!r} reduced to {r} (its input's rank)"
        )
        if readout.embedding is not None:
            reason += (
                "; its weight is tied to the token embedding, whose cross terms take "
                "one product per pair of positions"
            )
        return NTKPlan(
            inner_plan.implementation,
            reason,
            spec,
            shape,
            inner_plan.memory,
            costs=inner_plan.costs,
            readout=readout,
            inner=inner,
        )

    def _auto(
        self,
        spec: NTKSpec,
        x1: Inputs,
        x2: Inputs | None,
        structured: StructuredPlan | None,
        why: str,
    ) -> NTKPlan:
        """The implementation the cost model (:mod:`rdiag.ntk.costs`) estimates fastest.

        Candidates that do not fit the budget are left out; a runner-up within
        :data:`~rdiag.ntk.costs.RACE_RATIO` becomes the plan's ``alternative``.
        """
        fm = self.fm
        n1 = batch_size(x1)
        n2 = n1 if x2 is None else batch_size(x2)
        flops = sample_forward_flops(fm, x1)
        plans: dict[NTKImplementation, NTKPlan] = {}
        costs: dict[NTKImplementation, Cost] = {}
        misfits: list[str] = []

        def problem(plan: NTKPlan) -> Problem:
            block, whole = plan.spec.block_size, plan.spec.whole_batch
            samples = n1 if x2 is None else n1 + n2
            passes = samples if whole else math.ceil(n1 / block)
            if x2 is not None and not whole:
                passes += math.ceil(n2 / block)
            return Problem(flops, n1, n2, x2 is None, plan.spec, passes)

        notes = [why] if why else []
        if structured is not None and structured.sites:
            notes.append(
                f"the structured rules cover {structured.coverage(fm):.1%} of "
                f"{fm.num_params:,} parameters after the autograd check"
            )
            try:
                plan, chunks = self._structured_plan(structured, "", spec, x1, x2)
            except MemoryError as err:
                misfits.append(f"structured: {err}")
            else:
                plans[NTKImplementation.STRUCTURED] = plan
                costs[NTKImplementation.STRUCTURED] = structured_cost(
                    fm, structured, problem(plan), chunks
                )
        for impl, cost_of in (
            (NTKImplementation.JACOBIAN, jacobian_cost),
            (NTKImplementation.NTVP, ntvp_cost),
        ):
            try:
                plans[impl] = self._sized(impl, "", spec, x1, x2, probe_jvp=False)
            except MemoryError as err:
                misfits.append(f"{impl.value}: {err}")
                continue
            costs[impl] = cost_of(fm, problem(plans[impl]))
        if not plans:
            raise MemoryError(
                "no eNTK implementation fits the memory budget: "
                + "; ".join(misfits)
                + "; select fewer parameters (params=...), trace the outputs, or use "
                "rdiag.NTKOperator for products without the kernel"
            )
        ranked = sorted(costs, key=lambda k: costs[k].seconds)
        choice = ranked[0]
        estimates = ", ".join(f"{k.value} {costs[k].seconds:.3g} s" for k in ranked)
        reason = "auto: " + "; ".join([*notes, f"estimated {estimates}"])
        alternative = None
        if len(ranked) > 1:
            second, best = costs[ranked[1]].seconds, costs[choice].seconds
            low, high = RACE_SECONDS
            if second <= RACE_RATIO * best and low <= best and second <= high:
                alternative = plans[ranked[1]]
                reason += (
                    f"; too close to call, so the first {2 * RACE_CALLS} calls time "
                    "both (alternating)"
                )
        for plan in (plans[choice], alternative):
            if plan is None:
                continue
            if plan.implementation is NTKImplementation.NTVP:
                self.jvp_mode(x1)
            if plan.implementation is NTKImplementation.STRUCTURED:
                self._notice_rest(structured)
        return replace(
            plans[choice], reason=reason, costs=costs, alternative=alternative
        )

    def _structured_plan(
        self,
        structured: StructuredPlan,
        reason: str,
        spec: NTKSpec,
        x1: Inputs,
        x2: Inputs | None,
    ) -> tuple[NTKPlan, int]:
        """A structured plan and its number of output chunks.

        Raises:
            MemoryError: The cotangents of one output unit (all units for a full
                kernel) do not fit in half the budget.
        """
        n1 = batch_size(x1)
        n2 = n1 if x2 is None else batch_size(x2)
        shape = kernel_shape(spec, n1, n2)
        item = kernel_itemsize(self.fm)
        samples = n1 if x2 is None else n1 + n2
        chunks = output_chunks(structured, samples, spec, item)
        units = (
            spec.num_outputs
            if chunks[0] is None
            else len(range(spec.num_outputs)[chunks[0]])
        )
        memory = (
            self._kernel_bytes(shape) + capture_bytes(structured, samples, item) * units
        )
        if structured.rest_view is not None:  # the rest runs 'jacobian'
            spec = replace(spec, whole_batch=self._whole_batch(x1))
        spec = replace(spec, block_size=self.block_size or max(n1, n2))
        plan = NTKPlan(
            NTKImplementation.STRUCTURED, reason, spec, shape, memory, structured
        )
        return plan, len(chunks)

    def _kernel_bytes(self, shape: tuple[int, ...]) -> float:
        copies = len(self.fm.groups) if self.per_layer else 1
        return math.prod(shape) * kernel_itemsize(self.fm) * copies

    def _sized(
        self,
        impl: NTKImplementation,
        reason: str,
        spec: NTKSpec,
        x1: Inputs,
        x2: Inputs | None,
        probe_jvp: bool = True,
    ) -> NTKPlan:
        """A jacobian/ntvp plan with the largest block that fits beside the kernel."""
        n1 = batch_size(x1)
        n2 = n1 if x2 is None else batch_size(x2)
        shape = kernel_shape(spec, n1, n2)
        out_bytes = self._kernel_bytes(shape)
        row_bytes = spec.num_outputs * self.fm.num_params * kernel_itemsize(self.fm)
        block = block_size(
            row_bytes, spec.budget - out_bytes, max(n1, n2), self.block_size
        )
        if probe_jvp and impl is NTKImplementation.NTVP:
            self.jvp_mode(x1)
        spec = replace(spec, block_size=block, whole_batch=self._whole_batch(x1))
        memory = out_bytes + 2 * block * row_bytes
        return NTKPlan(impl, reason, spec, shape, memory)

    def _settle(self, key: tuple, plan: NTKPlan, run: NTKPlan, start: float) -> None:
        """Time a raced call; once both have run ``RACE_CALLS`` times, keep the faster.

        The calls alternate, and only each one's last (warmed) time is compared:
        a first call pays one-time costs (allocations, kernels' first launch) that
        would bias the race against whichever runs first.
        """
        if self.fm.device.type == "cuda":
            torch.cuda.synchronize(self.fm.device)
        race = self._races.setdefault(key, {})
        race.setdefault(run.implementation, []).append(time.perf_counter() - start)
        if len(race) < 2 or any(len(t) < RACE_CALLS for t in race.values()):
            return
        del self._races[key]
        timings = {impl: t[-1] for impl, t in race.items()}
        winner = min(timings, key=timings.get)
        kept = plan if winner is plan.implementation else plan.alternative
        measured = " and ".join(f"{k.value} {t:.3g} s" for k, t in timings.items())
        self._plans[key] = replace(
            kept,
            reason=f"auto: timed {measured} on warmed calls ({plan.reason})",
            costs=plan.costs,
            alternative=None,
            timings=timings,
        )

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

    def _notice_large_outputs(self, num_outputs: int) -> None:
        self.notices.say(
            "large-outputs",
            f"the traced eNTK sums over {num_outputs:,} output units per sample "
            "(a backward pass each) and the read-out identity does not apply (no "
            "linear read-out wider than its input, owning its weight or sharing it "
            "with the token embedding); output_probes=k "
            "estimates it with an error bar, projection=k gives the kernel of k "
            "projected outputs",
        )

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
        """The read-out identity: the reduced view's kernel, the read-out's own, ties."""
        view = plan.inner.fm
        view.basis = plan.readout.factor(self.fm)
        inner = plan.inner(x1, x2)
        kernels = dict(inner) if self.per_layer else {"all": inner}
        h1 = readout_features(view, x1)
        h2 = None if x2 is None else readout_features(view, x2)
        own = readout_kernels(plan.readout, h1, h2, self.weights, self.diagonal)
        if plan.readout.embedding is not None:
            cross = tied_kernels(view, x1, x2, self.weights, self.diagonal)
            for layer, k in cross.items():
                own[layer] = own[layer] + k if layer in own else k
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
    model keep the handle from :func:`ntk_fn`; this function reuses the handle
    (and its plans) of an earlier call on the same model and options from a
    bounded cache (:mod:`rdiag.ntk.plan_cache`, cleared by
    :func:`~rdiag.ntk.plan_cache.clear_plan_cache`).

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
    from rdiag.ntk.plan_cache import PLANS

    return PLANS.handle(model, options)(x1, x2)


def ntk_costs(
    fm: FunctionalModel, x1: Tensor, n2: int, spec: NTKSpec, symmetric: bool
) -> dict[NTKImplementation, Cost]:
    """Deprecated: the cost model is on the plan, ``ntk_fn(model).plan(x1, x2).costs``."""
    from rdiag._deprecation import renamed_name

    renamed_name("rdiag.ntk_costs", "ntk_fn(model).plan(x1, x2).costs", None)
    problem = Problem(
        sample_forward_flops(fm, x1), batch_size(x1), n2, symmetric, spec, 1
    )
    return {
        NTKImplementation.JACOBIAN: jacobian_cost(fm, problem),
        NTKImplementation.NTVP: ntvp_cost(fm, problem),
    }
