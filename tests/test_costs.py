"""The cost model of ``implementation="auto"`` and the race that settles close calls.

Kernels are compared with the float64 autograd oracle (rtol=1e-9, atol=1e-10).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rdiag import ntk_fn
from rdiag.ntk import planning
from rdiag.ntk.planning import NTKImplementation
from tests import oracles
from tests._assert import assert_close
from tests.models import ZOO

F64 = dict(rtol=1e-9, atol=1e-10)
S, J, V = (
    NTKImplementation.STRUCTURED,
    NTKImplementation.JACOBIAN,
    NTKImplementation.NTVP,
)


def _oracle(model: nn.Module, x1, x2=None) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    j1 = oracles.per_sample_jacobian(model, names, x1)
    j2 = j1 if x2 is None else oracles.per_sample_jacobian(model, names, x2)
    full = oracles.ntk_from_jacobians(j1, j2)
    return full.diagonal(dim1=-2, dim2=-1).sum(-1)


def test_auto_estimates_every_candidate_and_says_so() -> None:
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(8, 256), nn.Tanh(), nn.Linear(256, 10))
    kernel = ntk_fn(wide, trace_outputs=False)
    plan = kernel.plan(torch.randn(64, 8))
    assert set(plan.costs) == {S, J, V}
    assert all(c.seconds > 0 and c.flops > 0 for c in plan.costs.values())
    # A GEMM over (N*O)^2 pairs of 2.6k parameters against Grams of widths <= 256.
    assert plan.costs[J].seconds > 5 * plan.costs[S].seconds
    assert plan.implementation is S and plan.alternative is None
    assert "estimated structured" in plan.reason and "cover 100.0%" in plan.reason
    kernel(torch.randn(64, 8))
    assert "estimated structured" in kernel.explain()


def test_full_kernel_of_many_outputs_favours_ntvp_among_generic() -> None:
    wide = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 50)).double()
    kernel = ntk_fn(wide, trace_outputs=False)
    x = torch.randn(64, 4, dtype=torch.float64)
    spec = kernel.plan(x).spec
    generic = kernel._auto(spec, x, None, None, "no structured rules")
    assert set(generic.costs) == {J, V}
    assert generic.costs[V].flops < generic.costs[J].flops
    assert generic.implementation is V
    assert generic.reason.startswith("auto: no structured rules; estimated ntvp")


def test_a_close_call_is_raced_on_warmed_calls(monkeypatch) -> None:
    monkeypatch.setattr(planning, "RACE_RATIO", float("inf"))
    monkeypatch.setattr(planning, "RACE_SECONDS", (0.0, float("inf")))
    model, make = ZOO["cnn"](0)
    x1, x2 = make(5, 1), make(3, 2)
    expected = _oracle(model, x1, x2)
    kernel = ntk_fn(model, dtype=torch.float64)
    plan = kernel.plan(x1, x2)
    assert plan.alternative is not None and "too close to call" in plan.reason
    best, other = plan.implementation, plan.alternative.implementation
    ran = []
    for _ in range(5):
        assert_close("raced", expected, kernel(x1, x2), **F64)
        ran.append(kernel.implementation)
    # two calls of each, alternating, then the winner of the warmed calls
    assert ran[:4] == [best, other, best, other]
    settled = kernel.plan(x1, x2)
    assert settled.alternative is None and kernel.num_plans == 1
    assert set(settled.timings) == {best, other}
    assert ran[4] is min(settled.timings, key=settled.timings.get)
    assert settled.implementation is ran[4] and "warmed calls" in settled.reason
    # The race is per signature: another batch size races again.
    assert kernel.plan(make(4, 3)).alternative is not None


def test_the_race_compares_warmed_calls_only(monkeypatch) -> None:
    """A slow first call (one-time costs) does not lose the race."""
    monkeypatch.setattr(planning, "RACE_RATIO", float("inf"))
    monkeypatch.setattr(planning, "RACE_SECONDS", (0.0, float("inf")))
    model, make = ZOO["mlp_tanh"](0)
    kernel = ntk_fn(model, dtype=torch.float64)
    plan = kernel.plan(make(4, 1))
    other = plan.alternative
    monkeypatch.setattr(planning, "time", SimpleNamespace(perf_counter=lambda: 100.0))
    # best: 50 s cold then 1 s warm; the other: 2 s then 1.5 s
    for run, seconds in ((plan, 50.0), (other, 2.0), (plan, 1.0), (other, 1.5)):
        kernel._settle(("sig",), plan, run, 100.0 - seconds)
    settled = kernel._plans[("sig",)]
    assert settled.implementation is plan.implementation
    assert settled.timings == {plan.implementation: 1.0, other.implementation: 1.5}


def test_memory_is_checked_when_planning() -> None:
    model, make = ZOO["mlp_tanh"](0)
    x1, x2 = make(200, 1), make(1, 2)
    # Cotangents of one output unit: 201 samples x 16 widths x 8 bytes > 20 kB.
    tight = dict(memory_budget=4e4, dtype=torch.float64)
    with pytest.raises(MemoryError, match="cotangents of one output unit"):
        ntk_fn(model, implementation="structured", **tight).plan(x1, x2)
    kernel = ntk_fn(model, **tight)
    plan = kernel.plan(x1, x2)
    assert S not in plan.costs and plan.implementation in (J, V)
    assert plan.memory <= 4e4
    assert_close("fits", _oracle(model, x1, x2), kernel(x1, x2), **F64)
    roomy = ntk_fn(model, dtype=torch.float64).plan(x1, x2)
    assert roomy.memory >= 200 * 8  # the kernel itself
    with pytest.raises(MemoryError, match="no eNTK implementation fits"):
        ntk_fn(model, memory_budget=3e3, dtype=torch.float64).plan(x1, x2)


def test_first_planned_call_imports_no_dynamo_and_counts_matrix_flops() -> None:
    """The cost model's FLOP count imports neither Dynamo nor Triton (seconds on a
    first call) and agrees with torch's flop counter on linear, conv and attention."""
    import subprocess
    import sys

    code = (
        "import sys, torch; import rdiag; "
        "net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)); "
        "rdiag.empirical_ntk(net, torch.randn(3, 4)); "
        "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('torch._dynamo')} | "
        "({'triton'} & set(sys.modules))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout
    from torch.utils.flop_counter import FlopCounterMode

    from rdiag.functional import functionalize
    from rdiag.ntk.costs import sample_forward_flops

    torch.manual_seed(0)
    cases = [
        (
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 5)),
            torch.randn(3, 3, 8, 8),
        ),
        (nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 3)), torch.randn(3, 6)),
    ]
    for model, x in cases:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x[:2])
        expected = max(
            counter.get_total_flops() / 2,
            2.0 * sum(p.numel() for p in model.parameters()),
        )
        assert sample_forward_flops(functionalize(model), x) == expected
    # Attention: the two batched products QK^T and AV, 4 T^2 d per sample, on top
    # of the projection (2 T d 3d).
    fm = functionalize(_Attend(8))
    expected = 2.0 * 5 * 8 * 24 + 4.0 * 5 * 5 * 8
    assert sample_forward_flops(fm, torch.randn(3, 5, 8)) == pytest.approx(expected)


class _Attend(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return F.scaled_dot_product_attention(q, k, v)
