"""Shared Gram-Hadamard: reference routes vs brute force, kernel vs reference."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from rdiag.kernels import reference
from rdiag.kernels._launch import GramShape
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


def make_inputs(n1, n2, t1, t2, r, dx, dg, dtype=torch.float64, seed=0):
    """``x1 (N1, T1, Dx), x2 (N2, T2, Dx), g1 (N1, R, T1, Dg), g2 (N2, R, T2, Dg)``."""
    return (
        randn(n1, t1, dx, dtype=dtype, seed=seed),
        randn(n2, t2, dx, dtype=dtype, seed=seed + 1),
        randn(n1, r, t1, dg, dtype=dtype, seed=seed + 2),
        randn(n2, r, t2, dg, dtype=dtype, seed=seed + 3),
    )


def brute_force(
    x1: Tensor, x2: Tensor, g1: Tensor, g2: Tensor, scale: float = 1.0
) -> Tensor:
    """The definition: a sum over every token pair of the two dot products."""
    xx = torch.einsum("itx,jux->ijtu", x1.double(), x2.double())
    gg = torch.einsum("iatg,jbug->ijabtu", g1.double(), g2.double())
    return scale * torch.einsum("ijtu,ijabtu->ijab", xx, gg)


ROUTES = {
    "grams": reference._shared_by_grams,
    "weight_gradients": reference._shared_by_weight_gradients,
}

# ---------------------------------------------------------------- reference (float64)


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "accumulate"])
@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize(
    "n1,n2,t1,t2,r,dx,dg",
    [(1, 1, 1, 1, 1, 1, 1), (3, 4, 5, 2, 1, 6, 3), (4, 2, 3, 7, 3, 2, 5)],
)
def test_reference_routes_match_definition(fresh, route, n1, n2, t1, t2, r, dx, dg):
    """A fresh output starts as NaN (must be overwritten), else as ones (added to)."""
    x1, x2, g1, g2 = make_inputs(n1, n2, t1, t2, r, dx, dg)
    out = torch.full(
        (n1, n2, r, r), float("nan") if fresh else 1.0, dtype=torch.float64
    )
    ROUTES[route](x1, x2, g1, g2, out, 0.3, fresh)
    expected = brute_force(x1, x2, g1, g2, 0.3) + (0.0 if fresh else 1.0)
    assert_close(route, expected, out, **F64_TOL)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_reference_symmetric_call(dtype):
    """``K(x, x)`` (same tensors on both sides) on the weight-gradient route."""
    x, _, g, _ = make_inputs(4, 1, 30, 1, 2, 3, 2, dtype=dtype)
    shape = reference.check_gram_hadamard_shared_args(x, x, g, g)
    assert reference.shared_route(shape, x.device) == "weight_gradients"
    expected = brute_force(x, x, g, g)
    tol = F64_TOL if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-4}
    assert_close("K(x, x)", expected, reference.gram_hadamard_shared(x, x, g, g), **tol)


def test_grams_route_blocks(monkeypatch):
    monkeypatch.setattr(reference, "_BLOCK_ELEMS", 50)
    x1, x2, g1, g2 = make_inputs(5, 6, 3, 2, 2, 4, 3)
    out = torch.zeros(5, 6, 2, 2, dtype=torch.float64)
    reference._shared_by_grams(x1, x2, g1, g2, out, 1.0)
    assert_close("blocked grams", brute_force(x1, x2, g1, g2), out, **F64_TOL)


def test_cost_model_picks_the_cheaper_route():
    cpu = torch.device("cpu")
    conv = GramShape(n1=64, n2=64, t1=1024, t2=1024, r=10, dx=576, dg=64)
    tokens = GramShape(n1=64, n2=64, t1=4, t2=4, r=1, dx=512, dg=512)
    assert reference.shared_route(conv, cpu) == "weight_gradients"
    assert reference.shared_route(tokens, cpu) == "grams"


def test_reference_accumulates_and_is_the_token_linear_entk():
    """A Linear on every token: eNTK of its weight against autograd Jacobians."""
    torch.manual_seed(0)
    lin, head = nn.Linear(4, 5, bias=False).double(), nn.Linear(5, 2).double()
    net = _TokenNet(lin, head)
    x1, x2 = randn(3, 6, 4, seed=1), randn(2, 6, 4, seed=2)
    j1, j2 = (per_sample_jacobian(net, ["lin.weight"], x) for x in (x1, x2))
    start = randn(3, 2, 2, 2, seed=3)
    out = start.clone()
    reference.gram_hadamard_shared(x1, x2, net.cotangents(x1), net.cotangents(x2), out)
    assert_close(
        "token Linear eNTK", start + ntk_from_jacobians(j1, j2), out, **F64_TOL
    )


def test_reference_is_the_conv_entk_via_unfold():
    """A conv weight: unfolded patches and per-position cotangents."""
    torch.manual_seed(0)
    net = _ConvNet().double()
    x1, x2 = randn(3, 2, 5, 5, seed=1), randn(2, 2, 5, 5, seed=2)
    j1, j2 = (per_sample_jacobian(net, ["conv.weight"], x) for x in (x1, x2))
    p1, p2 = (F.unfold(x, 3).transpose(1, 2) for x in (x1, x2))  # (N, T, Cin k^2)
    actual = reference.gram_hadamard_shared(
        p1, p2, net.cotangents(x1), net.cotangents(x2)
    )
    assert_close("conv eNTK", ntk_from_jacobians(j1, j2), actual, **F64_TOL)


class _TokenNet(nn.Module):
    """``head(mean_t tanh(lin(x_t)))`` over ``(N, T, D)`` inputs."""

    def __init__(self, lin: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.lin, self.head = lin, head

    def rest(self, z: Tensor) -> Tensor:
        return self.head(torch.tanh(z).mean(-2))

    def forward(self, x: Tensor) -> Tensor:
        return self.rest(self.lin(x))

    def cotangents(self, x: Tensor) -> Tensor:
        """``d f_a / d z_t`` with ``z = lin(x)``: ``(N, R, T, Dg)``."""
        z = self.lin(x).detach()
        return torch.stack([jacobian(self.rest, z[i]) for i in range(len(z))])


class _ConvNet(nn.Module):
    """``head(flatten(tanh(conv(x))))`` with a bias-free 3x3 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, bias=False)
        self.head = nn.Linear(3 * 9, 2)

    def rest(self, z: Tensor) -> Tensor:
        return self.head(torch.tanh(z).flatten(-3))

    def forward(self, x: Tensor) -> Tensor:
        return self.rest(self.conv(x))

    def cotangents(self, x: Tensor) -> Tensor:
        """``(N, R, T, Cout)``: cotangents of the conv output per position."""
        z = self.conv(x).detach()
        g = torch.stack(
            [jacobian(self.rest, z[i]) for i in range(len(z))]
        )  # (N, R, C, H, W)
        return g.flatten(3).transpose(2, 3)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "shapes,match",
    [
        (
            ((2, 3, 4), (2, 3, 5), (2, 1, 3, 2), (2, 1, 3, 2)),
            "share the feature size Dx",
        ),
        (((2, 3, 4), (2, 3, 4), (2, 1, 3, 2), (2, 2, 3, 2)), "share R"),
        (
            ((2, 3, 4), (2, 3, 4), (2, 1, 4, 2), (2, 1, 3, 2)),
            "g1 to be \\(N1, R, T1, Dg\\)",
        ),
        (
            ((2, 3, 4), (2, 3, 4), (2, 1, 3, 2), (1, 1, 3, 2)),
            "g2 to be \\(N2, R, T2, Dg\\)",
        ),
        (((2, 4), (2, 4), (2, 1, 2), (2, 1, 2)), "\\(N1, T1, Dx\\)"),
    ],
)
def test_bad_shapes_raise(shapes, match):
    x1, x2, g1, g2 = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        kernels.gram_hadamard_shared(x1, x2, g1, g2)


# ---------------------------------------------------------------- Triton interpreter

SHAPES = [
    (1, 1, 1, 1, 1, 1),
    (2, 3, 5, 17, 7, 9),
    (3, 2, 18, 3, 20, 17),
    (2, 2, 33, 4, 3, 40),
]
# Interpreter time: R = 3 in float32 on the two middle shapes only.
CASES = [(s, 1, d) for s in SHAPES for d in DTYPES]
CASES += [(s, 3, torch.float32) for s in SHAPES[1:3]]


def _triton():
    return importlib.import_module("rdiag.kernels.triton_gram_hadamard_shared")


@pytest.mark.triton_interpret
@pytest.mark.parametrize("shape,r,dtype", CASES, ids=case_id)
def test_kernel_matches_reference(shape, r, dtype):
    n1, n2, t1, t2, dx, dg = shape
    args = make_inputs(n1, n2, t1, t2, r, dx, dg, dtype=dtype)
    expected = reference.gram_hadamard_shared(*args, scale=0.5)
    actual = _triton().gram_hadamard_shared(*args, scale=0.5)
    assert actual.dtype == torch.float32
    assert_kernel_close("shared kernel", expected, actual, dtype)


@pytest.mark.triton_interpret
def test_autotuning_restores_the_accumulator():
    import triton

    configs = [triton.Config({"BLOCK_T1": 16, "BLOCK_T2": 16, "BLOCK_K": 16})]
    configs.append(triton.Config({"BLOCK_T1": 32, "BLOCK_T2": 16, "BLOCK_K": 32}))
    args = make_inputs(2, 2, 20, 9, 2, 10, 6, dtype=torch.float32)
    start = randn(2, 2, 2, 2, seed=4, dtype=torch.float32)
    out = start.clone()
    with autotuning(_triton()._gram_hadamard_shared_kernel, configs):
        _triton().gram_hadamard_shared(*args, out)
    expected = reference.gram_hadamard_shared(*args, start.clone())
    assert_kernel_close("autotuned shared out +=", expected, out, torch.float32)


@pytest.mark.triton_interpret
def test_dispatch_follows_the_cost_model(monkeypatch):
    """Gram route: the Triton kernel; weight-gradient route: the reference."""
    calls = []
    launcher = _triton().gram_hadamard_shared

    def spy(*args, **kwargs):
        calls.append(1)
        return launcher(*args, **kwargs)

    monkeypatch.setattr(_triton(), "gram_hadamard_shared", spy)
    tokens = make_inputs(3, 2, 2, 3, 1, 40, 40, dtype=torch.float32)  # grams
    expected = reference.gram_hadamard_shared(*tokens)
    assert_kernel_close(
        "tokens", expected, kernels.gram_hadamard_shared(*tokens), torch.float32
    )
    assert calls == [1]
    conv = make_inputs(2, 2, 30, 30, 1, 4, 2, dtype=torch.float32)  # weight gradients
    assert torch.equal(
        kernels.gram_hadamard_shared(*conv), reference.gram_hadamard_shared(*conv)
    )
    assert calls == [1]


@pytest.mark.triton_interpret
def test_kernel_accumulates_strided():
    x1, x2, g1, g2 = make_inputs(3, 2, 6, 5, 2, 9, 4, dtype=torch.float32)
    g1t = g1.transpose(2, 3).contiguous().transpose(2, 3)
    start = randn(3, 2, 2, 2, seed=4, dtype=torch.float32)
    out = start.clone()
    assert _triton().gram_hadamard_shared(x1, x2, g1t, g2, out, scale=-2.0) is out
    expected = reference.gram_hadamard_shared(x1, x2, g1, g2, start.clone(), scale=-2.0)
    assert_kernel_close("shared out +=", expected, out, torch.float32)


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", [1, 3])
def test_cuda_kernel_large_shapes(dtype, r):
    args = [t.cuda() for t in make_inputs(40, 33, 70, 50, r, 96, 80, dtype=dtype)]
    expected = reference.gram_hadamard_shared(*(t.double() for t in args))
    start = torch.randn(40, 33, r, r, device="cuda")
    scale = float(expected.abs().max())
    # The kernel itself (this shape's cost model picks weight gradients), then the
    # dispatcher.
    for name, fn in (
        ("kernel", _triton().gram_hadamard_shared),
        ("dispatch", kernels.gram_hadamard_shared),
    ):
        out = start.clone()
        fn(*args, out)
        assert_close(
            f"cuda shared {name} {dtype}",
            expected + start.double(),
            out,
            rtol=1e-4,
            atol=1e-4 * scale,
        )
