"""rdiag.kernels against unfused torch, in one run per group.

CPU groups: the torch reference (what rdiag runs on CPU) vs the unfused form
(both Grams in memory, then the product) for the Gram-Hadamard and the weight-
shared variant, and ``kernel_stats`` vs separate torch reductions.
GPU groups (skipped without CUDA): the fused Triton kernel vs unfused torch vs the
bare cuBLAS GEMMs of the same products, N up to 4096; peak memory goes into
``extra_info``. For the shared variant ``rdiag`` is the dispatcher (which takes the
weight-gradient reference where the cost model says so) and ``triton`` the kernel.
Run: ``pytest bench/bench_kernels.py --benchmark-only``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
import torch

from bench.baselines import (
    gram_matmuls,
    separate_kernel_stats,
    unfused_gram_hadamard,
    unfused_gram_hadamard_shared,
)
from rdiag import kernels

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="requires CUDA")


def _inputs(
    device: str, dtype: torch.dtype, *shapes: tuple[int, ...]
) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]


def _run(benchmark, fn: Callable[[], object], device: str, rounds: int) -> None:
    """Time ``fn`` (synchronized on CUDA) and record its peak GPU memory."""

    def call() -> None:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()

    call()  # warm-up: Triton compiles and autotunes here
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        benchmark.extra_info["peak_mib"] = (
            torch.cuda.max_memory_allocated() - base
        ) / 2**20
    benchmark.pedantic(call, rounds=rounds, iterations=1)


GH_IMPLS = {
    "rdiag": lambda a: kernels.gram_hadamard(*a),
    "unfused": lambda a: unfused_gram_hadamard(*a),
    "gemms_only": lambda a: gram_matmuls(*a),
}


def _gram_hadamard(benchmark, impl, device, dtype, n, r, d, rounds) -> None:
    args = _inputs(device, dtype, (n, d), (n, d), (n, r, d), (n, r, d))
    benchmark.group = f"gram_hadamard {device} {dtype} N={n} R={r} D={d}"
    _run(benchmark, lambda: GH_IMPLS[impl](args), device, rounds)


@pytest.mark.parametrize("impl", list(GH_IMPLS))
@pytest.mark.parametrize("n,r", [(1024, 1), (256, 10)])
def test_gram_hadamard_cpu(benchmark, impl: str, n: int, r: int) -> None:
    _gram_hadamard(benchmark, impl, "cpu", torch.float32, n, r, 256, rounds=5)


@CUDA
@pytest.mark.parametrize("impl", list(GH_IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,r", [(1024, 1), (4096, 1), (4096, 4)])
def test_gram_hadamard_gpu(
    benchmark, impl: str, dtype: torch.dtype, n: int, r: int
) -> None:
    _gram_hadamard(benchmark, impl, "cuda", dtype, n, r, 1024, rounds=10)


def _shared_kernel(*args: torch.Tensor) -> torch.Tensor:
    """The Triton launcher itself, whatever route the dispatcher would pick."""
    module = importlib.import_module("rdiag.kernels.triton_gram_hadamard_shared")
    return module.gram_hadamard_shared(*args)


SHARED_IMPLS = {
    "rdiag": lambda a: kernels.gram_hadamard_shared(*a),
    "triton": lambda a: _shared_kernel(*a),
    "unfused": lambda a: unfused_gram_hadamard_shared(*a),
    # the token GEMMs alone: x as (N T, Dx), g as (N R T, Dg)
    "gemms_only": lambda a: gram_matmuls(*(t.flatten(0, -2) for t in a[:2]), *a[2:]),
}
#: (N, T, Dx, Dg, R): short token sequences; conv-like (many positions, few outputs).
SHARED_SHAPES = [(32, 16, 128, 128, 1), (16, 64, 72, 16, 4)]


@pytest.mark.parametrize("impl", [k for k in SHARED_IMPLS if k != "triton"])
@pytest.mark.parametrize(
    "shape", SHARED_SHAPES, ids=lambda s: "N{}-T{}-Dx{}-Dg{}-R{}".format(*s)
)
def test_gram_hadamard_shared_cpu(benchmark, impl: str, shape: tuple[int, ...]) -> None:
    n, t, dx, dg, r = shape
    args = _inputs(
        "cpu", torch.float32, (n, t, dx), (n, t, dx), (n, r, t, dg), (n, r, t, dg)
    )
    benchmark.group = f"gram_hadamard_shared cpu N={n} T={t} Dx={dx} Dg={dg} R={r}"
    _run(benchmark, lambda: SHARED_IMPLS[impl](args), "cpu", rounds=5)


@CUDA
@pytest.mark.parametrize("impl", list(SHARED_IMPLS))
@pytest.mark.parametrize("shape", [(256, 64, 256, 256, 1), (64, 49, 288, 64, 4)])
def test_gram_hadamard_shared_gpu(benchmark, impl: str, shape: tuple[int, ...]) -> None:
    n, t, dx, dg, r = shape
    args = _inputs(
        "cuda", torch.float32, (n, t, dx), (n, t, dx), (n, r, t, dg), (n, r, t, dg)
    )
    benchmark.group = f"gram_hadamard_shared cuda N={n} T={t} Dx={dx} Dg={dg} R={r}"
    _run(benchmark, lambda: SHARED_IMPLS[impl](args), "cuda", rounds=10)


STATS_IMPLS = {
    "rdiag": lambda k0, k1: kernels.kernel_stats(k0, k1),
    "separate_ops": lambda k0, k1: separate_kernel_stats(k0, k1),
}


@pytest.mark.parametrize("impl", list(STATS_IMPLS))
@pytest.mark.parametrize(
    "device,n",
    [("cpu", 2048), pytest.param("cuda", 4096, marks=CUDA)],
)
def test_kernel_stats(benchmark, impl: str, device: str, n: int) -> None:
    k0, k1 = _inputs(device, torch.float32, (n, n), (n, n))
    benchmark.group = f"kernel_stats {device} N={n}"
    _run(benchmark, lambda: STATS_IMPLS[impl](k0, k1), device, rounds=10)
