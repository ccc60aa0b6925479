"""Structured eNTK vs the torch.func tutorial recipe and the generic implementations.

Model: tanh MLP 8 -> W -> W -> W -> 10 (float32), W in {256, 1024, 2048},
N in {64, 256}, symmetric full ``(N, N, 10, 10)`` and output-traced ``(N, N)``
kernels, all in one run per group. The recipe is skipped where its whole
``N * O * P`` Jacobian would exceed 8 GiB, ``"jacobian"``/``"ntvp"`` where
rdiag's cost model says they are beyond this machine; slow cases run one round.

Run: ``pytest bench/bench_structured.py --benchmark-only``. Peak memory, one
fresh process per case: ``python -m bench.bench_structured [structured,recipe]``
(prints a markdown table).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bench.baselines import tutorial_jacobian_ntk
from bench.bench_ntk import SIZES, WIDTHS, estimated_costs, mlp
from bench.rss import measure
from rdiag import empirical_ntk, functionalize
from rdiag._tiling import format_bytes
from rdiag.ntk.planning import NTKImplementation

IMPLS = ["structured", "recipe", "jacobian", "ntvp"]
#: The recipe holds both Jacobians; skip it above this many bytes.
RECIPE_LIMIT = 8 * 2**30
#: Skip "jacobian"/"ntvp" above this cost-model estimate (about 10 s here; bench_ntk
#: times them up to 3e12).
GENERIC_FLOPS = 2e11


def _case(impl: str, width: int, n: int, trace: bool):
    """The model, the input and a zero-argument callable computing the kernel."""
    model = mlp(width)
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(1))
    fm = functionalize(model)
    if impl == "recipe":
        return model, x, lambda: tutorial_jacobian_ntk(model, x, x, trace)
    return (
        model,
        x,
        lambda: empirical_ntk(fm, x, implementation=impl, trace_outputs=trace),
    )


def _skip(impl: str, model: torch.nn.Module, x: torch.Tensor, trace: bool) -> None:
    if impl == "structured":
        return
    jac_bytes = 2 * len(x) * 10 * sum(p.numel() for p in model.parameters()) * 4
    if impl == "recipe":
        if jac_bytes > RECIPE_LIMIT:
            pytest.skip(
                f"recipe: its two N*O*P Jacobians need {format_bytes(jac_bytes)} > 8 GiB"
            )
        return
    flops = estimated_costs(model, x, trace)[NTKImplementation(impl)].flops
    if flops > GENERIC_FLOPS:
        pytest.skip(
            f"{impl}: cost model estimates {flops:.2g} FLOPs > {GENERIC_FLOPS:.0e}"
        )


@pytest.mark.parametrize("trace", [False, True], ids=["full", "traced"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("impl", IMPLS)
def test_structured(benchmark, impl: str, width: int, n: int, trace: bool) -> None:
    model, x, run = _case(impl, width, n, trace)
    _skip(impl, model, x, trace)
    benchmark.group = f"structured W={width} N={n} {'traced' if trace else 'full'}"
    if width * width * n > 1024 * 1024 * 64:
        benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=1)
    else:
        benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)


def _measure(impl: str, width: int, n: int, trace: bool) -> dict:
    """Seconds (best of 2 to 7 after a warm-up) and peak resident memory above the start."""
    return measure(_case(impl, width, n, trace)[2])


def _table(impls: tuple[str, ...] = ("structured", "recipe")) -> None:
    print("| W | N | kernel | impl | seconds | peak RSS above start |")
    print("|---|---|---|---|---|---|")
    for width in WIDTHS:
        for n in SIZES:
            for trace in (False, True):
                for impl in impls:
                    model, _, _ = _case(impl, width, n, trace)
                    jac = 2 * n * 10 * sum(p.numel() for p in model.parameters()) * 4
                    if impl == "recipe" and jac > RECIPE_LIMIT:
                        row = "skipped (Jacobians > 8 GiB) | -"
                    else:
                        args = [impl, str(width), str(n), str(int(trace))]
                        out = subprocess.run(
                            [sys.executable, "-m", "bench.bench_structured", *args],
                            capture_output=True,
                            text=True,
                            check=True,
                        ).stdout
                        res = json.loads(out.strip().splitlines()[-1])
                        row = (
                            f"{res['seconds']:.3f} | {format_bytes(res['peak_bytes'])}"
                        )
                    kind = "traced" if trace else "full"
                    print(f"| {width} | {n} | {kind} | {impl} | {row} |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 5:
        impl, width, n, trace = (
            sys.argv[1],
            int(sys.argv[2]),
            int(sys.argv[3]),
            sys.argv[4] == "1",
        )
        print(json.dumps(_measure(impl, width, n, trace)))
    else:
        _table(
            tuple(sys.argv[1].split(","))
            if len(sys.argv) == 2
            else ("structured", "recipe")
        )
