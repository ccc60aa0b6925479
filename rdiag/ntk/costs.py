"""Every byte and FLOP estimate of the eNTK: the cost model behind ``"auto"``, memory.

With ``F`` the forward FLOPs of one sample (its matrix products, counted by a
dispatch mode that imports neither Dynamo nor Triton), ``P`` selected
parameters, ``O`` output units, ``S`` the samples differentiated (``N1`` for the
symmetric kernel, ``N1 + N2`` otherwise) and ``pairs`` the kernel entries
computed (``N1 N2``, halved when symmetric; ``N1`` on the diagonal):

- jacobian: ``3 F O S`` for the rows (a reverse pass costs about twice a forward
  one) plus ``2 pairs P O^k`` for the contraction, ``k = 1`` traced and 2 full;
  the rows cost ``S`` times more when the whole batch is differentiated.
- ntvp: ``3 F O N2`` for the vjp rows plus ``3 F O pairs`` for the jvps, once per
  layer for per-layer kernels.
- structured: the capture, a forward and a backward batched over the output units
  (``F S (1 + O / 2)``; the backward only forms activation cotangents), plus
  twice :func:`structured_flops`, plus the jacobian rows
  and contraction of the parameters no rule covers.

Seconds are FLOPs over a throughput plus fixed costs per captured site (per chunk
of output units) and per parameter tensor (per differentiation pass), which
dominate small models. The CPU constants were fitted on the CI machine class
(2 cores) to the timings of five Hugging Face models and MLPs (bench/README.md);
the CUDA constants are assumed, not measured. ``auto`` only trusts the ranking
when it is clear: estimates within :data:`RACE_RATIO` (and within
:data:`RACE_SECONDS`) are settled by timing both implementations on the handle's
first calls, :data:`RACE_CALLS` of each, alternating, comparing the warmed ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rdiag._inputs import Inputs, batch_size, rows
from rdiag._tiling import check_fits
from rdiag.functional import FunctionalModel
from rdiag.ntk._capture import StructuredPlan, TermShape
from rdiag.ntk.spec import NTKSpec, kernel_itemsize

__all__ = [
    "RACE_CALLS",
    "RACE_RATIO",
    "RACE_SECONDS",
    "SPEEDS",
    "Cost",
    "Problem",
    "Speed",
    "jacobian_cost",
    "ntvp_cost",
    "sample_forward_flops",
    "speed_of",
    "structured_cost",
]

#: Estimates closer than this factor are settled by timing the first calls.
RACE_RATIO = 1.5
#: Calls of each implementation in a race; the last of each (warmed) is compared.
RACE_CALLS = 2
#: Races are run only when the faster estimate is between these seconds: below,
#: the difference does not matter and timings are noise; above, a wrong
#: runner-up costs too much.
RACE_SECONDS = (0.01, 30.0)


@dataclass(frozen=True)
class Speed:
    """How fast a device runs the eNTK's work.

    Attributes:
        flops_per_second: Sustained throughput of autodiff passes and contractions.
        seconds_per_site: Fixed cost of one captured layer for one output chunk.
        seconds_per_tensor: Fixed cost of one parameter tensor in one pass.
    """

    flops_per_second: float
    seconds_per_site: float
    seconds_per_tensor: float


#: Per device type; other types use the CPU figures.
SPEEDS = {
    "cpu": Speed(4e10, 4e-4, 2e-4),
    "cuda": Speed(1e13, 5e-5, 2e-5),
}


def speed_of(device: torch.device) -> Speed:
    """The :class:`Speed` assumed for ``device``."""
    return SPEEDS.get(device.type, SPEEDS["cpu"])


@dataclass(frozen=True)
class Cost:
    """Estimated cost of one implementation.

    Attributes:
        flops: Floating-point operations.
        workspace: Bytes of working memory at the smallest block (1 sample).
        seconds: Estimated wall time on the plan's device.
    """

    flops: float
    workspace: float
    seconds: float


def _matmul_flops(func: Any, args: tuple, out: Any) -> float:
    """``2 * out.numel() * k`` for the matrix products torch dispatches to."""
    name = func.__name__
    if name.startswith(("mm", "bmm")):
        return 2.0 * out.numel() * args[0].shape[-1]
    if name.startswith(("addmm", "baddbmm")):
        return 2.0 * out.numel() * args[1].shape[-1]
    if name.startswith("convolution"):
        weight = args[1]
        return 2.0 * out.numel() * weight[0].numel()
    if "scaled_dot_product" in name:  # QK^T and AV: 4 B H Tq Tk D
        q, k = args[0], args[1]
        return 4.0 * q.numel() * k.shape[-2]
    return 0.0


class _FlopCount(TorchDispatchMode):
    """Counts matrix-product FLOPs (mm, bmm, addmm, convolution, attention).

    torch's ``FlopCounterMode`` imports ``torch._dynamo`` when entered (seconds on a
    first call) and Triton when imported; this mode declares that it needs no
    Dynamo guard (it never compiles) and keeps its few formulas here.
    """

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0.0

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(first, torch.Tensor):
            self.flops += _matmul_flops(func, args, first)
        return out


def sample_forward_flops(fm: FunctionalModel, x: Inputs) -> float:
    """FLOPs of one forward pass per sample (matrix products counted on two samples)."""
    probe = rows(x, slice(0, 2))
    with torch.no_grad(), _FlopCount() as counter:
        fm(fm.params, probe)
    # Elementwise ops are not counted; 2 FLOPs per parameter is the floor.
    return max(counter.flops / batch_size(probe), 2.0 * fm.num_params)


@dataclass(frozen=True)
class Problem:
    """The sizes every estimate needs (see the module docstring for the symbols).

    Attributes:
        flops: ``F``, forward FLOPs of one sample.
        n1: Samples of the first batch.
        n2: Samples of the second (``n1`` when symmetric).
        symmetric: ``K(x1, x1)``: only one batch is differentiated, half the pairs.
        spec: The request.
        passes: Differentiation passes of the generic paths (blocks of samples,
            or ``S`` when the whole batch is differentiated).
    """

    flops: float
    n1: int
    n2: int
    symmetric: bool
    spec: NTKSpec
    passes: int

    @property
    def samples(self) -> int:
        """``S``: the samples differentiated."""
        return self.n1 if self.symmetric else self.n1 + self.n2

    @property
    def pairs(self) -> float:
        """Kernel entries (pairs of samples) computed."""
        if self.spec.diagonal:
            return float(self.n1)
        return self.n1 * self.n2 * (0.5 if self.symmetric else 1.0)

    def rows(self) -> float:
        """FLOPs of the Jacobian rows ``3 F O S`` (times ``S`` for the whole batch)."""
        whole = self.samples if self.spec.whole_batch else 1
        return 3.0 * self.flops * self.spec.num_outputs * self.samples * whole

    def contraction(self, params: int) -> float:
        """FLOPs of ``2 pairs P O^k`` for ``params`` parameters."""
        o = self.spec.num_outputs
        return 2.0 * self.pairs * params * (o if self.spec.trace_outputs else o * o)


def _seconds(flops: float, fixed: float, speed: Speed) -> float:
    return flops / speed.flops_per_second + fixed


def jacobian_cost(fm: FunctionalModel, problem: Problem) -> Cost:
    """Per-sample Jacobians and a GEMM (per-layer kernels come with it)."""
    speed = speed_of(fm.device)
    flops = problem.rows() + problem.contraction(fm.num_params)
    fixed = speed.seconds_per_tensor * len(fm.names) * problem.passes
    row = problem.spec.num_outputs * fm.num_params * kernel_itemsize(fm)
    return Cost(flops, row, _seconds(flops, fixed, speed))


def ntvp_cost(fm: FunctionalModel, problem: Problem) -> Cost:
    """The ``vjp`` rows then ``jvp``s, never forming ``J``; once per layer if per-layer."""
    speed = speed_of(fm.device)
    spec = problem.spec
    layers = len(fm.groups) if spec.per_layer else 1
    jvps = 3.0 * problem.flops * spec.num_outputs * (problem.n2 + problem.pairs)
    flops = jvps * layers
    fixed = speed.seconds_per_tensor * len(fm.names) * problem.samples * layers
    row = spec.num_outputs * fm.num_params * kernel_itemsize(fm)
    return Cost(flops, row, _seconds(flops, fixed, speed))


def structured_cost(
    fm: FunctionalModel, plan: StructuredPlan, problem: Problem, chunks: int
) -> Cost:
    """Capture, Gram-Hadamard contractions, and the rest through jacobian.

    Args:
        fm: The functional view.
        plan: The checked capture sites and term shapes.
        problem: The sizes.
        chunks: Chunks of output units the capture runs in.
    """
    speed = speed_of(fm.device)
    spec = problem.spec
    capture = problem.flops * problem.samples * (chunks + spec.num_outputs / 2)
    contract = 2.0 * structured_flops(
        plan, problem.n1, problem.n2, spec, problem.symmetric
    )
    fixed = speed.seconds_per_site * len(plan.sites) * chunks
    rest = [n for n in plan.rest if spec.weights.get(n, 0.0) != 0.0]
    rest_flops = 0.0
    if rest:
        rest_params = sum(fm.params[n].numel() for n in rest)
        rest_flops = problem.rows() + problem.contraction(rest_params)
        fixed += speed.seconds_per_tensor * len(rest) * problem.passes
    flops = capture + contract + rest_flops
    unit = (
        plan.cotangent_floats
        * kernel_itemsize(fm)
        * math.ceil(spec.num_outputs / chunks)
    )
    return Cost(flops, unit, _seconds(flops, fixed, speed))


# ---- bytes: the kernel, Jacobian rows ----------------------------------------------
def kernel_bytes(fm: FunctionalModel, shape: tuple[int, ...], per_layer: bool) -> float:
    """Bytes of the returned kernel of ``shape`` (one per layer group when per-layer)."""
    copies = len(fm.groups) if per_layer else 1
    return math.prod(shape) * kernel_itemsize(fm) * copies


def row_bytes(fm: FunctionalModel, spec: NTKSpec) -> float:
    """Bytes of one sample's Jacobian rows ``(O, P)`` (a block holds two per sample)."""
    return spec.num_outputs * fm.num_params * kernel_itemsize(fm)


# ---- the structured path: bytes of its capture, FLOPs of its routes ------------------
#: The vmapped backward of a capture holds, besides the captured cotangents, the
#: gradients of the graph's other tensors for every output unit at once: about
#: as many floats again (GPT-2 small's block: peak 2.0x the cotangents at T = 4,
#: 1.2x at T = 1; bench/README.md).
BACKWARD_TRANSIENT = 1.0


def capture_bytes(plan: StructuredPlan, samples: int, item: int) -> float:
    """Peak bytes of capturing one output unit: its cotangents and the backward's."""
    return plan.cotangent_floats * item * samples * (1.0 + BACKWARD_TRANSIENT)


def output_chunks(
    plan: StructuredPlan, samples: int, spec: NTKSpec, item: int
) -> list[slice | None]:
    """Output units per capture: all at once, or chunks when the capture does not fit.

    The cotangents take ``samples * O * sum(layer widths)`` floats (``samples``:
    both batches), the backward that computes them about as much again
    (:data:`BACKWARD_TRANSIENT`). A traced kernel sums over output units, so it
    can be accumulated over chunks of them; a full kernel pairs every two units
    and needs them all.
    """
    per = capture_bytes(plan, samples, item)
    o, room = spec.num_outputs, spec.budget / 2
    if not plan.sites or o * per <= room:
        return [None]
    if not spec.trace_outputs:
        check_fits(
            o * per,
            room,
            "the layer cotangents of every output unit (N * O * widths)",
            "use trace_outputs=True (accumulated over chunks of output units), fewer "
            "samples, or select fewer parameters",
        )
    check_fits(
        per, room, "the layer cotangents of one output unit", "use fewer samples"
    )
    step = int(room // per)
    return [slice(a, min(a + step, o)) for a in range(0, o, step)]


def route_flops(
    shape: TermShape, n1: int, n2: int, o: int, spec: NTKSpec
) -> tuple[float | None, float | None]:
    """Multiply-adds of one term by the Gram route and by per-sample gradients.

    ``None`` marks a route the term cannot take: tied parameters only pair their
    uses by Grams; grouped convolutions and ``x = 1`` factors only materialize
    their (cheap) per-sample gradients.

    Args:
        shape: The term's per-sample shape.
        n1: Samples of the first batch.
        n2: Samples of the second batch (ignored for the diagonal).
        o: Output units ``O``.
        spec: The request (traced, diagonal).

    Returns:
        ``(gram, per_sample)``.
    """
    t, dx, dg = shape.t, shape.dx, shape.dg
    outs = o if spec.trace_outputs else o * o
    build = o * t * dg * (1 if shape.tokens else dx)
    if spec.diagonal:
        gram = n1 * t * t * (dx + o * dg) + n1 * outs * t * dg
        per_sample = n1 * build + n1 * outs * dg * dx
    else:
        gram = n1 * n2 * t * t * (dx + outs * dg)
        per_sample = (n1 + n2) * build + n1 * n2 * outs * dg * dx
    if shape.uses > 1:
        return gram * shape.uses, None
    if shape.bare or shape.groups > 1:
        return None, per_sample / max(shape.groups, 1)
    return gram, per_sample


def structured_flops(
    plan: StructuredPlan, n1: int, n2: int, spec: NTKSpec, symmetric: bool
) -> float:
    """Multiply-adds of the structured eNTK's contractions (the cheaper route per term).

    The capture (one forward and a backward batched over the ``O`` output units)
    is costed by the caller from the forward cost.
    """
    total = 0.0
    pairs = 0.5 if symmetric and not spec.diagonal else 1.0
    for name, uses in plan.shapes.items():
        if spec.weights.get(name, 1.0) == 0.0:
            continue
        for shape in uses:
            if shape.tokens:  # token ids are renumbered over the ids present
                shape = replace(shape, dx=min(shape.dx, (n1 + n2) * shape.t))
            costs = [c for c in route_flops(shape, n1, n2, spec.num_outputs, spec) if c]
            total += pairs * min(costs) * shape.uses
    return total


def forward_flops(plan: StructuredPlan) -> float:
    """Forward multiply-adds of one sample through the captured layers: ``sum T Dx Dg``."""
    return sum(
        s.t * s.dx * s.dg / s.groups
        for uses in plan.shapes.values()
        for s in uses[:1]
        if not (s.bare or s.tokens)
    )
