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

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from rdiag import attention as blocked
from rdiag._autodiff import JvpMode, differentiating
from rdiag._checks import check_positive_int
from rdiag._inputs import Inputs, describe, trailing
from rdiag._optional import Notices
from rdiag._tiling import format_bytes, resolve_budget
from rdiag._typing import ParamSelector, LRMultipliers
from rdiag.attention import AttentionCall, attention_workspace
from rdiag.distributed import Group, sharded_kernel
from rdiag.functional import FunctionalModel, Mode, functionalize, document_selection
from rdiag.ntk.jacobian import jacobian_ntk
from rdiag.ntk.outputs import (
    KernelEstimate,
    Projection,
    probe_estimate,
    projected_view,
)
from rdiag.ntk.readout import (
    readout_features,
    readout_kernels,
    tied_kernels,
)
from rdiag.ntk.spec import kernel_dtype
from rdiag.ntk.structured import structured_ntk
from rdiag.ntk.vector_products import ntvp_ntk
from rdiag.ntk.plan_cache import PLANS
from rdiag.ntk.planning import NTKImplementation, NTKPlan, Planner
from rdiag.ntk._capture import StructuredPlan, sites_of

__all__ = ["NTKFunction", "empirical_ntk", "ntk_fn", "structured_coverage"]


@document_selection
class NTKFunction(Planner):
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
        params, exclude, mode, dtype, output_fn: The selection keywords, described
            once under "Selection keywords" below.
        lr_multipliers: The diagonal ``M``: per-layer/parameter weights (dict by
            layer name, parameter name or glob; float; callable), e.g.
            :func:`rdiag.lr_multipliers`.
        block_size: Samples per tile of ``N1 x N2``; default the largest that fits.
        memory_budget: Bytes the computation may use; default half the free memory
            (read when a plan is made).
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
        lr_multipliers: LRMultipliers = None,
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
        process_group: Any = None,
    ) -> None:
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
        self._attention: list[AttentionCall] = []
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
            out = sharded_kernel(
                self.group, self._local, x1, x2, diagonal=self.diagonal
            )
        else:
            out = self._local(x1, x2)
        self._say_if_not_finite(out)
        return out

    def _say_if_not_finite(self, out: Any) -> None:
        """Say once when a kernel holds NaN or inf (weights that diverged)."""
        values = out.values() if isinstance(out, dict) else [out]
        tensors = [getattr(v, "kernel", v) for v in values]
        if any(
            isinstance(t, Tensor) and not bool(torch.isfinite(t).all()) for t in tensors
        ):
            self.notices.say(
                "not-finite",
                f"ntk_fn: the eNTK of {type(self.fm.module).__name__} holds NaN or "
                "inf entries; check that its weights are finite (a diverged model)",
            )

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
        attention = ""
        if plan.implementation is NTKImplementation.NTVP and self._attention:
            keys = blocked.DEFAULT_BLOCK
            part = attention_workspace(self._attention, keys)
            full = attention_workspace(self._attention, None)
            attention = (
                f"; attention by rdiag's blocked operator ({keys} keys per block): "
                f"about {format_bytes(part)} of scores per sample and tangent, "
                f"against {format_bytes(full)} with math attention"
            )
        return (
            f"{plan.implementation.value}: {plan.reason}; kernel {plan.shape}, "
            f"block {spec.block_size} samples, about {format_bytes(plan.memory)} of "
            f"the memory budget {format_bytes(spec.budget)}{attention}"
        )

    # ---- inputs -------------------------------------------------------------------
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
    mode = f.jvp_mode(x1)
    with differentiating(mode):
        return ntvp_ntk(f.fm, x1, x2, plan.spec, mode)


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


#: ``rdiag.ntk_fn(model, ...)``: the eNTK of ``model`` as a reusable kernel function
#: that owns its plan; the :class:`NTKFunction` constructor itself (one signature,
#: one docstring). Keep it for repeated kernels of one model (a Monitor, a
#: training loop): plans, checks and probes are done once.
ntk_fn = NTKFunction


@document_selection
def empirical_ntk(
    model: nn.Module | FunctionalModel,
    x1: Inputs,
    x2: Inputs | None = None,
    *,
    implementation: NTKImplementation | str = "auto",
    trace_outputs: bool = True,
    diagonal: bool = False,
    per_layer: bool = False,
    params: ParamSelector = None,
    exclude: ParamSelector = None,
    lr_multipliers: LRMultipliers = None,
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
    process_group: Any = None,
) -> Tensor | dict[str, Tensor] | KernelEstimate:
    r"""Empirical NTK :math:`J(x_1)\, M\, J(x_2)^\top` in one call: ``ntk_fn(model, ...)(x1, x2)``.

    The keywords, shapes and semantics are those of :class:`NTKFunction`. For
    repeated kernels of one model keep the handle from :func:`ntk_fn`; this
    function reuses the handle (its plans, race and self-check) of an earlier
    call on the same model and keywords from a bounded cache
    (:mod:`rdiag.ntk.plan_cache`, emptied by
    :func:`~rdiag.ntk.plan_cache.clear_plan_cache`).

    Args:
        model: The network (or a :class:`~rdiag.functional.FunctionalModel`).
        x1: ``(N1, ...)`` inputs.
        x2: ``(N2, ...)`` inputs, or ``None`` for the symmetric kernel.
        implementation, trace_outputs, diagonal, per_layer, lr_multipliers, block_size, memory_budget, projection, per_token, output_probes, seed, readout_identity, process_group: As :class:`NTKFunction`.
        params, exclude, mode, dtype, output_fn: The selection keywords, described
            once under "Selection keywords" below.

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
    options = dict(
        implementation=implementation,
        trace_outputs=trace_outputs,
        diagonal=diagonal,
        per_layer=per_layer,
        params=params,
        exclude=exclude,
        lr_multipliers=lr_multipliers,
        mode=mode,
        dtype=dtype,
        block_size=block_size,
        memory_budget=memory_budget,
        output_fn=output_fn,
        projection=projection,
        per_token=per_token,
        output_probes=output_probes,
        seed=seed,
        readout_identity=readout_identity,
        process_group=process_group,
    )
    return PLANS.handle(model, options, NTKFunction)(x1, x2)


def structured_coverage(
    fm: FunctionalModel | nn.Module, x: Inputs | None = None
) -> float:
    """Fraction of the selected scalar parameters that the static rules cover.

    Without ``x`` this counts the parameters the rules of
    :mod:`rdiag.ntk.rules` claim (static: a rule may still fail on a batch). With
    ``x`` it is what really runs structured on batches like ``x``: the plan's
    coverage after its one-time capture and autograd check, the number the
    structured path itself uses. A batch-coupled model gives 0.0.

    Args:
        fm: Functional model, or a module (its default view, :func:`functionalize`).
        x: A batch of the model's inputs, or ``None`` for the static count.

    Returns:
        A number in ``[0, 1]``.

    Example:
        >>> import torch
        >>> from rdiag import functionalize
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> structured_coverage(functionalize(net))
        1.0
    """
    fm = functionalize(fm)
    if fm.batch_coupled:
        return 0.0
    if x is not None:
        plan = ntk_fn(fm, implementation="structured", readout_identity=False).plan(x)
        return 0.0 if plan.structured is None else plan.structured.coverage(fm)
    sites, rest = sites_of(fm)
    return StructuredPlan(sites, rest).coverage(fm)
