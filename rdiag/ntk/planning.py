"""The planning half of an eNTK handle: what is decided once per input signature.

A plan (:class:`NTKPlan`) is made the first time a handle sees an input
signature (the shapes and dtypes of ``x1`` and ``x2``): one probe forward pass
(output size, differentiability, a clear error if the model does not take the
inputs), the memory budget, the implementation (``"auto"``: the fastest by the
cost model of :mod:`rdiag.ntk.costs` among those that fit, close calls timed on
the first calls), the block size, the structured path's capture sites and its
one-time check against autograd, and the forward-mode strategy. Every byte and
FLOP estimate a plan uses comes from :mod:`rdiag.ntk.costs`.
:class:`~rdiag.ntk.handle.NTKFunction` is a :class:`Planner`: it adds the calls.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from enum import Enum

import torch

from rdiag import attention as blocked
from rdiag._autodiff import JvpMode, attention_calls, probe_jvp_mode, probe_vmap
from rdiag._inputs import Inputs, batch_size, rows, signature
from rdiag._optional import Notices
from rdiag._tiling import block_size, check_fits, resolve_budget
from rdiag.attention import AttentionCall, attention_workspace
from rdiag.functional import FunctionalModel
from rdiag.ntk._capture import StructuredPlan, plan_structured
from rdiag.ntk.costs import (
    RACE_CALLS,
    RACE_RATIO,
    RACE_SECONDS,
    Cost,
    Problem,
    capture_bytes,
    jacobian_cost,
    kernel_bytes,
    ntvp_cost,
    output_chunks,
    row_bytes,
    sample_forward_flops,
    structured_cost,
)
from rdiag.ntk.readout import Readout, ReadoutView, find_readout
from rdiag.ntk.spec import NTKSpec, kernel_itemsize, kernel_shape

__all__ = ["NTKImplementation", "NTKPlan", "Planner"]


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
    inner: Planner | None = None


class Planner:
    """Plans of one handle, one per input signature, and the probes they need.

    Set by the handle (:class:`~rdiag.ntk.handle.NTKFunction`) before any plan:
    ``fm`` (the view), ``requested`` (the implementation asked for),
    ``trace_outputs``, ``diagonal``, ``per_layer``, ``weights`` (parameter name
    -> kernel weight), ``block_size``, ``memory_budget``, ``readout_identity``,
    ``notices``, and the caches ``_plans`` (signature -> :class:`NTKPlan`),
    ``_races`` (signature -> seconds per implementation of a race in
    progress), ``_jvp_mode`` and ``_vmap_error`` (probed once), and
    ``_attention`` (the attention calls of one sample where the jvps run rdiag's
    operator, probed with the jvp mode).
    """

    fm: FunctionalModel
    requested: NTKImplementation
    trace_outputs: bool
    diagonal: bool
    per_layer: bool
    weights: dict[str, float]
    block_size: int | None
    memory_budget: float | None
    readout_identity: bool
    notices: Notices
    _plans: dict[tuple, NTKPlan]
    _races: dict[tuple, dict[NTKImplementation, list[float]]]
    _jvp_mode: JvpMode | None
    _vmap_error: str | None | bool
    _attention: list[AttentionCall]

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
        inner = type(self)(
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
        return kernel_bytes(self.fm, shape, self.per_layer)

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
        row = row_bytes(self.fm, spec)
        block = block_size(row, spec.budget - out_bytes, max(n1, n2), self.block_size)
        if probe_jvp and impl is NTKImplementation.NTVP:
            self.jvp_mode(x1)
        spec = replace(spec, block_size=block, whole_batch=self._whole_batch(x1))
        memory = out_bytes + 2 * block * row
        if impl is NTKImplementation.NTVP:  # the jvps' attention scores
            memory += block * attention_workspace(
                self._attention, blocked.DEFAULT_BLOCK
            )
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
            if self._jvp_mode == "attention":
                self._attention = attention_calls(self.fm, x)
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
