"""eNTK: jacobian vs ntvp vs auto vs the torch.func tutorial recipe, in one run.

Model: tanh MLP 8 -> W -> W -> W -> 10 (float32), W in {256, 1024, 2048},
N in {64, 256}, full and output-traced kernels. Configurations whose memory
(the recipe's whole N*O*P Jacobian) or FLOP estimate (rdiag's cost model) is
beyond this machine are skipped with the estimate in the reason; slow ones run
one round. Run: ``pytest bench/bench_ntk.py --benchmark-only``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.baselines import tutorial_jacobian_ntk
from rdiag import empirical_ntk, functionalize
from rdiag._tiling import available_memory, format_bytes
from rdiag.ntk import costs
from rdiag.ntk.planning import NTKImplementation
from rdiag.ntk.spec import NTKSpec

#: Skip what the cost model says needs more FLOPs than this (about a minute on 2 cores).
MAX_FLOPS = 3e12
WIDTHS = [256, 1024, 2048]
SIZES = [64, 256]


def mlp(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, 10),
    )


def estimated_costs(
    model: nn.Module, x: torch.Tensor, trace: bool
) -> dict[NTKImplementation, costs.Cost]:
    """rdiag's cost model of the generic implementations for the symmetric K(x, x)."""
    fm = functionalize(model)
    spec = NTKSpec(trace, False, fm.param_weights(None), 1, 1e12, 10)
    flops = costs.sample_forward_flops(fm, x)
    problem = costs.Problem(flops, len(x), len(x), True, spec, 1)
    return {
        NTKImplementation.JACOBIAN: costs.jacobian_cost(fm, problem),
        NTKImplementation.NTVP: costs.ntvp_cost(fm, problem),
    }


def _skip_if_too_big(model: nn.Module, x: torch.Tensor, trace: bool, impl: str) -> None:
    fm = functionalize(model)
    jac_bytes = len(x) * 10 * fm.num_params * 4
    if impl == "recipe" and jac_bytes > 0.5 * available_memory(fm.device):
        pytest.skip(f"recipe needs the whole Jacobian, {format_bytes(jac_bytes)}")
    if impl in ("recipe", "jacobian", "ntvp", "auto"):
        costs = estimated_costs(model, x, trace)
        key = (
            NTKImplementation.JACOBIAN
            if impl == "recipe"
            else (
                min(costs, key=lambda k: costs[k].flops)
                if impl == "auto"
                else NTKImplementation(impl)
            )
        )
        if costs[key].flops > MAX_FLOPS:
            pytest.skip(
                f"{impl}: estimated {costs[key].flops:.2g} FLOPs, over {MAX_FLOPS:.0e}"
            )


@pytest.mark.parametrize("trace", [False, True], ids=["full", "traced"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("impl", ["recipe", "jacobian", "ntvp", "auto"])
def test_ntk(benchmark, impl: str, width: int, n: int, trace: bool) -> None:
    model = mlp(width)
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(1))
    _skip_if_too_big(model, x, trace, impl)
    benchmark.group = f"ntk W={width} N={n} {'traced' if trace else 'full'}"
    fm = functionalize(model)
    benchmark.extra_info["jacobian_bytes"] = n * 10 * fm.num_params * 4
    if impl == "recipe":
        run = lambda: tutorial_jacobian_ntk(model, x, x, trace)  # noqa: E731
    else:
        run = lambda: empirical_ntk(fm, x, implementation=impl, trace_outputs=trace)  # noqa: E731
    if width * width * n > 1024 * 1024 * 64:
        benchmark.pedantic(run, rounds=1, iterations=1)
    else:
        benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
