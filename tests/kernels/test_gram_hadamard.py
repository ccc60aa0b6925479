"""gram_hadamard: reference vs float64 brute force; Triton kernel vs reference."""

from __future__ import annotations

import importlib

import pytest
import torch
from rdiag.kernels import reference
from torch import Tensor, nn
from torch.autograd.functional import jacobian

from rdiag import kernels
from tests._assert import assert_close
from tests.kernels.conftest import (
    DTYPES,
    F64_TOL,
    assert_kernel_close,
    autotuning,
    case_id,
    randn,
)
from tests.oracles import ntk_from_jacobians, per_sample_jacobian


def make_inputs(n1, n2, r, dx, dg, dtype=torch.float64, seed=0):
    """``x1 (N1, Dx), x2 (N2, Dx), g1 (N1, R, Dg), g2 (N2, R, Dg)``."""
    return (
        randn(n1, dx, dtype=dtype, seed=seed),
        randn(n2, dx, dtype=dtype, seed=seed + 1),
        randn(n1, r, dg, dtype=dtype, seed=seed + 2),
        randn(n2, r, dg, dtype=dtype, seed=seed + 3),
    )


def brute_force(
    x1: Tensor, x2: Tensor, g1: Tensor, g2: Tensor, scale: float = 1.0
) -> Tensor:
    """Explicit per-sample weight gradients ``g x^T`` contracted pairwise."""
    j1 = torch.einsum("nrg,nx->nrgx", g1.double(), x1.double()).flatten(2)
    j2 = torch.einsum("nrg,nx->nrgx", g2.double(), x2.double()).flatten(2)
    return scale * ntk_from_jacobians(j1, j2)


# ---------------------------------------------------------------- reference (float64)


@pytest.mark.parametrize(
    "n1,n2,r,dx,dg",
    [(1, 1, 1, 1, 1), (4, 6, 1, 5, 3), (7, 3, 3, 8, 2), (5, 5, 2, 1, 9)],
)
def test_reference_matches_per_sample_gradients(n1, n2, r, dx, dg):
    x1, x2, g1, g2 = make_inputs(n1, n2, r, dx, dg)
    actual = reference.gram_hadamard(x1, x2, g1, g2, scale=0.7)
    assert actual.dtype == torch.float64
    assert_close("gram_hadamard", brute_force(x1, x2, g1, g2, 0.7), actual, **F64_TOL)


def test_reference_r1_is_hadamard_of_grams():
    x1, x2, g1, g2 = make_inputs(6, 4, 1, 5, 3)
    expected = (x1 @ x2.T) * (g1[:, 0] @ g2[:, 0].T)
    actual = reference.gram_hadamard(x1, x2, g1, g2)[:, :, 0, 0]
    assert_close("R=1 Hadamard", expected, actual, **F64_TOL)


def test_reference_is_the_linear_layer_entk():
    """The eNTK of the first Linear's weight, against autograd Jacobians."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(5, 7, bias=False), nn.Tanh(), nn.Linear(7, 3)
    ).double()
    x1, x2 = randn(4, 5, seed=1), randn(6, 5, seed=2)
    j1, j2 = (per_sample_jacobian(net, ["0.weight"], x) for x in (x1, x2))

    def cotangents(x: Tensor) -> Tensor:  # d f_a / d (W x), (N, O, H)
        z = net[0](x).detach()
        return torch.stack([jacobian(net[1:], z[i]) for i in range(len(z))])

    actual = reference.gram_hadamard(x1, x2, cotangents(x1), cotangents(x2))
    assert_close("linear-layer eNTK", ntk_from_jacobians(j1, j2), actual, **F64_TOL)


def test_reference_accumulates_into_out():
    x1, x2, g1, g2 = make_inputs(5, 4, 2, 3, 6)
    start = randn(5, 4, 2, 2, seed=9)
    out = start.clone()
    returned = reference.gram_hadamard(x1, x2, g1, g2, out, scale=-2.0)
    assert returned is out
    assert_close(
        "out += term", start + brute_force(x1, x2, g1, g2, -2.0), out, **F64_TOL
    )


def test_reference_blocks_rows(monkeypatch):
    """Row blocking (bounded temporaries) gives the same result as one block."""
    monkeypatch.setattr(reference, "_BLOCK_ELEMS", 8)
    x1, x2, g1, g2 = make_inputs(7, 3, 2, 4, 5)
    assert_close(
        "blocked",
        brute_force(x1, x2, g1, g2),
        reference.gram_hadamard(x1, x2, g1, g2),
        **F64_TOL,
    )


def test_reference_many_sums_layers():
    a = make_inputs(5, 4, 2, 3, 6, seed=0)
    b = make_inputs(5, 4, 2, 7, 2, seed=10)
    expected = brute_force(*a, 0.5) + brute_force(*b, 3.0)
    actual = reference.gram_hadamard_many([(*a, 0.5), (*b, 3.0)])
    assert_close("many", expected, actual, **F64_TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_reference_low_precision_accumulates_in_float32(dtype):
    x1, x2, g1, g2 = make_inputs(9, 7, 2, 33, 17, dtype=dtype)
    actual = reference.gram_hadamard(x1, x2, g1, g2)
    assert actual.dtype == torch.float32
    # Same (rounded) inputs in float64: only float32 summation error remains.
    expected = brute_force(x1, x2, g1, g2)
    assert_close(
        f"{dtype} reference",
        expected,
        actual,
        rtol=1e-5,
        atol=1e-5 * float(expected.abs().max()),
    )


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "shapes,err,match",
    [
        (
            ((4, 3), (5, 2), (4, 1, 2), (5, 1, 2)),
            ValueError,
            "share the feature size Dx",
        ),
        (((4, 3), (5, 3), (4, 1, 2), (5, 2, 2)), ValueError, "share \\(R, Dg\\)"),
        (((4, 3), (5, 3), (3, 1, 2), (5, 1, 2)), ValueError, "N1 = len\\(x1\\)"),
        (((4, 3), (5, 3), (4, 2), (5, 2)), ValueError, "\\(N1, R, Dg\\)"),
    ],
)
def test_bad_shapes_raise(shapes, err, match):
    x1, x2, g1, g2 = (torch.zeros(s) for s in shapes)
    with pytest.raises(err, match=match):
        kernels.gram_hadamard(x1, x2, g1, g2)


def test_bad_dtypes_and_out_raise():
    x1, x2, g1, g2 = make_inputs(4, 5, 1, 3, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="one dtype"):
        kernels.gram_hadamard(x1.double(), x2, g1, g2)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        kernels.gram_hadamard(x1.int(), x2.int(), g1.int(), g2.int())
    with pytest.raises(ValueError, match="shape \\(N1, N2, R, R\\)"):
        kernels.gram_hadamard(x1, x2, g1, g2, torch.zeros(5, 4, 1, 1))
    with pytest.raises(ValueError, match="float32 or float64"):
        kernels.gram_hadamard(
            x1, x2, g1, g2, torch.zeros(4, 5, 1, 1, dtype=torch.float16)
        )
    with pytest.raises(ValueError, match="at least one"):
        kernels.gram_hadamard_many([])
    with pytest.raises(ValueError, match="tuple \\(x1, x2, g1, g2, scale\\)"):
        kernels.gram_hadamard_many([(x1, x2, g1, g2)])


def test_output_too_big_raises_memory_error():
    n = 10**6  # (N, N, 4, 4) float32 output: 64 TB
    x = torch.zeros(1, 1).expand(n, 1)
    g = torch.zeros(1, 1, 1).expand(n, 4, 1)
    with pytest.raises(MemoryError, match="TiB.*blocks of rows"):
        kernels.gram_hadamard(x, x, g, g)


# ---------------------------------------------------------------- Triton interpreter

SHAPES = [(1, 1, 1, 1), (5, 17, 19, 33), (20, 16, 70, 16), (33, 40, 16, 5)]
# Interpreter time: every shape in float32, float16 on all but the largest, and
# bfloat16 (upcast on the host under the interpreter, see interpreter_safe) on one.
CASES = [
    (s, r, d)
    for s in SHAPES
    for r in (1, 3)
    for d in DTYPES
    if d == torch.float32 or (d == torch.float16 and s[0] < 33) or s == SHAPES[1]
]


def _triton():
    return importlib.import_module("rdiag.kernels.triton_gram_hadamard")


@pytest.mark.triton_interpret
@pytest.mark.parametrize("shape,r,dtype", CASES, ids=case_id)
def test_kernel_matches_reference(shape, r, dtype):
    n1, n2, dx, dg = shape
    args = make_inputs(n1, n2, r, dx, dg, dtype=dtype)
    expected = reference.gram_hadamard(*args, scale=0.5)
    actual = _triton().gram_hadamard(*args, scale=0.5)
    assert actual.dtype == torch.float32
    assert_kernel_close("gram_hadamard kernel", expected, actual, dtype)


@pytest.mark.triton_interpret
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64])
def test_kernel_accumulates_into_out(out_dtype):
    args = make_inputs(18, 21, 2, 20, 17, dtype=torch.float32)
    start = randn(18, 21, 2, 2, seed=5, dtype=out_dtype)
    out = start.clone()
    assert kernels.gram_hadamard(*args, out, scale=-1.5) is out
    expected = reference.gram_hadamard(*args, start.clone(), scale=-1.5)
    assert_kernel_close("out += kernel", expected, out, torch.float32)


@pytest.mark.triton_interpret
def test_autotuning_restores_the_accumulator():
    """Tuning runs every config on the real ``out``; it must be restored between."""
    import triton

    meta = {"BLOCK_K": 16, "GROUP_M": 1}
    configs = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, **meta})]
    configs.append(triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, **meta}))
    args = make_inputs(40, 20, 2, 20, 17, dtype=torch.float32)
    start = randn(40, 20, 2, 2, seed=5, dtype=torch.float32)
    out = start.clone()
    with autotuning(_triton()._gram_hadamard_kernel, configs):
        _triton().gram_hadamard(*args, out)
    expected = reference.gram_hadamard(*args, start.clone())
    assert_kernel_close("autotuned out +=", expected, out, torch.float32)


@pytest.mark.triton_interpret
def test_kernel_many_groups_same_shapes():
    a = make_inputs(17, 9, 3, 20, 5, dtype=torch.float32, seed=0)
    b = make_inputs(17, 9, 3, 20, 5, dtype=torch.float32, seed=10)
    c = make_inputs(17, 9, 3, 7, 18, dtype=torch.float32, seed=20)
    terms = [(*a, 0.5), (*c, 2.0), (*b, -1.0)]
    expected = reference.gram_hadamard_many(terms)
    assert_kernel_close(
        "many", expected, kernels.gram_hadamard_many(terms), torch.float32
    )


@pytest.mark.triton_interpret
def test_kernel_strided_inputs_and_tf32_flag():
    x1, x2, g1, g2 = make_inputs(19, 17, 2, 18, 20, dtype=torch.float32)
    x1t = x1.T.contiguous().T  # column-major view
    g2t = g2.transpose(0, 1).contiguous().transpose(0, 1)
    expected = reference.gram_hadamard(x1, x2, g1, g2)
    actual = kernels.gram_hadamard(x1t, x2, g1, g2t, allow_tf32=True)
    assert_kernel_close("strided", expected, actual, torch.float32)


@pytest.mark.triton_interpret
def test_dispatch_runs_kernel_and_keeps_float64_on_reference():
    args = make_inputs(5, 4, 2, 3, 6)
    assert not kernels.use_triton(args[0])
    assert torch.equal(kernels.gram_hadamard(*args), reference.gram_hadamard(*args))
    with pytest.raises(TypeError, match="float64 runs on rdiag.kernels.reference"):
        _triton().gram_hadamard(*args)
    assert kernels.use_triton(args[0].float())


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("r", [1, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernel_large_shapes(r, dtype):
    args = [t.cuda() for t in make_inputs(300, 257, r, 300, 129, dtype=dtype)]
    expected = reference.gram_hadamard(*(t.double() for t in args))
    start = torch.randn(300, 257, r, r, device="cuda")
    out = start.clone()
    kernels.gram_hadamard(*args, out)
    assert_close(
        f"cuda {dtype}",
        expected + start.double(),
        out,
        rtol=1e-4,
        atol=1e-4 * float(expected.abs().max()),
    )


@pytest.mark.cuda
def test_cuda_tf32_and_many():
    a = [t.cuda() for t in make_inputs(1000, 600, 2, 256, 64, dtype=torch.float32)]
    b = [
        t.cuda()
        for t in make_inputs(1000, 600, 2, 256, 64, dtype=torch.float32, seed=7)
    ]
    c = [
        t.cuda()
        for t in make_inputs(1000, 600, 2, 33, 100, dtype=torch.float32, seed=9)
    ]
    terms = [(*a, 1.0), (*b, 0.5), (*c, 2.0)]
    expected = reference.gram_hadamard_many(
        [tuple(t.double() for t in x[:4]) + (x[4],) for x in terms]
    )
    scale = float(expected.abs().max())
    assert_close(
        "cuda many",
        expected,
        kernels.gram_hadamard_many(terms),
        rtol=1e-4,
        atol=1e-4 * scale,
    )
    tf32 = kernels.gram_hadamard_many(terms, allow_tf32=True)
    assert_close("cuda tf32", expected, tf32, rtol=2e-2, atol=2e-2 * scale)


@pytest.mark.triton_interpret
def test_many_with_a_float64_term_runs_the_reference():
    a = make_inputs(6, 5, 2, 4, 3, dtype=torch.float32)
    b = make_inputs(6, 5, 2, 3, 7, seed=10)
    terms = [(*a, 1.0), (*b, 0.5)]
    expected = brute_force(*a) + brute_force(*b, 0.5)
    actual = kernels.gram_hadamard_many(terms)
    assert actual.dtype == torch.float32
    assert_close("mixed many", expected, actual, rtol=1e-5, atol=1e-5)
