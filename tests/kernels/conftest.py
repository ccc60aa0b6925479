"""Kernel tests: Triton-interpreter tests run in one child process.

Triton reads ``TRITON_INTERPRET`` when it is imported, and ``import rdiag``
already imports it through torch, so the variable cannot be switched on inside
the main test process (nor should it leak into other directories' tests).
Tests marked ``triton_interpret`` are therefore deselected here and run by
``test_dispatch.py::test_kernels_under_triton_interpreter`` in a child pytest
with ``TRITON_INTERPRET=1``; in that child only they are selected.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from rdiag.kernels._launch import interpreting

from tests._assert import assert_close

HERE = Path(__file__).parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "triton_interpret: runs a Triton kernel on CPU (TRITON_INTERPRET=1 child)",
    )


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    keep, drop = [], []
    for item in items:
        mine = HERE in Path(str(item.path)).parents
        marked = item.get_closest_marker("triton_interpret") is not None
        if mine and marked != interpreting():
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


#: (rtol, atol as a fraction of max |expected|) for a kernel against the reference
#: on the same inputs. Both accumulate in float32 and low-precision products are
#: exact in float32, so only the summation order differs, for every input dtype.
KERNEL_TOL = {
    torch.float32: (2e-5, 2e-6),
    torch.float16: (2e-5, 2e-6),
    torch.bfloat16: (2e-5, 2e-6),
}
#: Reference in float64 against a float64 brute force.
F64_TOL = {"rtol": 1e-10, "atol": 1e-12}
DTYPES = list(KERNEL_TOL)


def randn(
    *shape: int, dtype: torch.dtype = torch.float64, seed: int = 0
) -> torch.Tensor:
    """A seeded standard-normal tensor."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def assert_kernel_close(
    name: str, expected: torch.Tensor, actual: torch.Tensor, dtype: torch.dtype
) -> None:
    """Kernel against reference with the tolerance of ``dtype`` (see ``KERNEL_TOL``)."""
    rtol, atol = KERNEL_TOL[dtype]
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    assert_close(name, expected, actual, rtol=rtol, atol=atol * scale)


def case_id(case) -> str:
    """Readable pytest id: shape ``AxBx...``, ``R<r>``, dtype name."""
    if isinstance(case, tuple):
        return "x".join(map(str, case))
    return (
        str(case).replace("torch.", "") if isinstance(case, torch.dtype) else f"R{case}"
    )


@contextlib.contextmanager
def autotuning(kernel, configs: list) -> Iterator[None]:
    """Make a ``triton.autotune`` kernel tune over ``configs`` (interpreter tests).

    Triton's benchmarker needs a GPU, so timings are faked to favour the *last*
    config: every config runs during tuning (side effects included) and a config
    other than the first is kept, which exposes state one config leaves for another.
    """
    calls = []

    def fake_bench(kernel_call, quantiles=None):
        kernel_call()
        calls.append(1)
        t = 100.0 - len(calls)
        return [t, t, t]

    missing = object()
    saved = kernel.configs, dict(kernel.cache), kernel.__dict__.get("do_bench", missing)
    kernel.configs, kernel.do_bench = list(configs), fake_bench
    kernel.cache.clear()
    try:
        yield
    finally:
        kernel.configs = saved[0]
        kernel.cache.clear()
        kernel.cache.update(saved[1])
        if saved[2] is missing:  # a cached_property in Triton 3.9: recomputed lazily
            del kernel.do_bench
        else:
            kernel.do_bench = saved[2]
    assert len(calls) >= len(configs), "the kernel was not autotuned"
