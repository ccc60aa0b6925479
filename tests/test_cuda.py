"""The quantities of the CPU tests, on the CUDA device: eNTK, curvature, Monitor.

Every test takes ``device``. Its ``cpu`` half runs in the ordinary suite (so no
body here is dead code); its ``cuda`` half is marked ``cuda`` and skipped without
a CUDA device (tests/conftest.py). ``pytest -m cuda tests`` on a GPU machine runs
the cuda half (``bench/gpu_validation.sh`` does, issue #26); there the structured
eNTK and ``kernel_stats`` run the Triton kernels (the tests check that they did;
the Monitor's kernel movement is computed in float64, on the torch reference).

References are float64 brute force (tests/oracles.py) on the same weights and
inputs, rounded to the precision under test first, so only the arithmetic's
error is measured. Tolerances:

* float64 on the device: ``rtol=1e-9`` entrywise, as the CPU float64 tests;
* ``fp32`` (TF32 off in torch's matmuls and convolutions; the Triton kernels
  multiply in exact float32 unless asked): ``rtol=1e-4``, ``atol=1e-5 * max|ref|``
  entrywise, as the CPU float32 tests;
* ``tf32`` (torch's TF32 switches on: 10-bit mantissas, unit round-off 4.9e-4):
  relative Frobenius error 1e-2;
* ``bf16`` (model and inputs in bfloat16: 8-bit mantissas, unit round-off
  3.9e-3; products accumulate in float32): relative Frobenius error 2e-2. On the
  CPU the zoo's bfloat16 kernels are 0.6e-3 to 3.5e-3 off.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdiag import (
    GGNOperator,
    HessianOperator,
    Monitor,
    empirical_ntk,
    lr_multipliers,
    sharpness,
)
from bench.gpu_validation import tf32
from rdiag import kernels as dispatch
from rdiag.kernels import kernel_stats
from tests import oracles
from tests._assert import assert_close, assert_rel_error
from tests.models import ZOO, meter_mlp
from tests.test_monitor import _oracle_kernel, _setup, _train
from tests.test_operators_ggn import ggn_case
from tests.test_operators_hessian import case_and_hessian

CUDA = pytest.mark.cuda
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
#: Input dtype and whether torch's TF32 switches are on, per precision.
PRECISIONS = {
    "fp32": (torch.float32, False),
    "tf32": (torch.float32, True),
    "bf16": (torch.bfloat16, False),
}
#: Relative Frobenius error allowed for the low-precision modes (module docstring).
REL_TOL = {"tf32": 1e-2, "bf16": 2e-2}
# TF32 does nothing on the CPU: the cpu half runs fp32 and bf16 only.
DEVICE_PRECISIONS = [
    pytest.param("cpu", "fp32", id="cpu-fp32"),
    pytest.param("cpu", "bf16", id="cpu-bf16"),
] + [pytest.param("cuda", p, marks=CUDA, id=f"cuda-{p}") for p in PRECISIONS]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """``"cpu"``, or ``"cuda"`` (marked ``cuda``)."""
    return request.param


def to(x: Tensor, device: str, dtype: torch.dtype) -> Tensor:
    """``x`` on ``device``; floating tensors in ``dtype`` (token ids stay integers)."""
    return x.to(device, dtype) if x.is_floating_point() else x.to(device)


def spy(monkeypatch: pytest.MonkeyPatch, name: str, x: Tensor) -> list[int]:
    """Count the calls of ``name`` in the module that the dispatcher picks for ``x``.

    On CUDA with Triton that is the Triton launcher, elsewhere the torch reference.
    """
    launcher = {
        "gram_hadamard_many": "triton_gram_hadamard",
        "kernel_stats": "triton_kernel_stats",
    }[name]
    module = importlib.import_module(
        f"rdiag.kernels.{launcher if dispatch.use_triton(x) else 'reference'}"
    )
    calls: list[int] = []
    inner = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def oracle_ntk(model: nn.Module, x1: Tensor, x2: Tensor) -> Tensor:
    """Full float64 eNTK ``(N1, N2, O, O)`` of ``model``'s weights, from autograd Jacobians."""
    exact = copy.deepcopy(model).double()
    names = [n for n, _ in exact.named_parameters()]
    return oracles.ntk_from_jacobians(
        oracles.per_sample_jacobian(exact, names, x1),
        oracles.per_sample_jacobian(exact, names, x2),
    )


def check(name: str, precision: str, expected: Tensor, actual: Tensor) -> None:
    """Compare with the tolerance of ``precision`` (module docstring)."""
    if precision == "fp32":
        scale = float(expected.abs().max())
        assert_close(name, expected, actual, rtol=1e-4, atol=1e-5 * max(scale, 1.0))
    else:
        assert_rel_error(name, expected, actual, tol=REL_TOL[precision])


# ---------------------------------------------------------------- eNTK


@pytest.mark.parametrize("impl", ["jacobian", "ntvp", "structured"])
@pytest.mark.parametrize("name", ["mlp_tanh", "cnn", "attention", "embedding"])
@pytest.mark.parametrize("device,precision", DEVICE_PRECISIONS)
def test_zoo_entk(device: str, precision: str, name: str, impl: str) -> None:
    dtype, tf32_on = PRECISIONS[precision]
    model, make = ZOO[name](0)
    model = model.to(device, dtype)
    x1, x2 = (to(make(n, s), device, dtype) for n, s in ((5, 1), (3, 2)))
    expected = oracle_ntk(model, x1, x2)
    with tf32(tf32_on):
        got = empirical_ntk(model, x1, x2, trace_outputs=False, implementation=impl)
    assert got.dtype == torch.float32 and got.device.type == device
    check(f"{name} {impl} {device} {precision}", precision, expected, got)


@pytest.mark.parametrize("impl", ["jacobian", "structured", "auto"])
@pytest.mark.parametrize("device,precision", DEVICE_PRECISIONS)
def test_wide_mlp_entk_runs_the_fused_kernel(
    monkeypatch: pytest.MonkeyPatch, device: str, precision: str, impl: str
) -> None:
    """Cross and symmetric kernels of a wider MLP; structured runs the Triton kernel on CUDA."""
    dtype, tf32_on = PRECISIONS[precision]
    width, n1, n2 = (300, 70, 33) if device == "cuda" else (24, 9, 5)
    model = meter_mlp(width).to(device, dtype)
    gen = torch.Generator().manual_seed(1)
    x1, x2 = (torch.randn(n, 3, generator=gen).to(device, dtype) for n in (n1, n2))
    calls = spy(monkeypatch, "gram_hadamard_many", x1)
    with tf32(tf32_on):
        cross = empirical_ntk(model, x1, x2, trace_outputs=False, implementation=impl)
        sym = empirical_ntk(model, x1, trace_outputs=False, implementation=impl)
    check(f"cross {impl} {precision}", precision, oracle_ntk(model, x1, x2), cross)
    check(f"symmetric {impl} {precision}", precision, oracle_ntk(model, x1, x1), sym)
    if impl == "structured":
        assert calls, "the structured eNTK did not call the dispatched Gram-Hadamard"


@pytest.mark.parametrize("name", ["cnn", "attention"])
def test_structured_forced_routes(device: str, route: str, name: str) -> None:
    """Every weight-shared term on the token-Gram kernel, then on per-sample gradients."""
    model, make = ZOO[name](0)
    model = model.to(device)
    x1, x2 = (make(n, s).to(device) for n, s in ((5, 1), (3, 2)))
    with tf32(False):
        got = empirical_ntk(
            model, x1, x2, trace_outputs=False, implementation="structured"
        )
    check(f"{name} {route}", "fp32", oracle_ntk(model, x1, x2), got)


# ---------------------------------------------------------------- curvature


@pytest.mark.parametrize(
    "arch,loss",
    [("mlp_tanh", "ce"), ("cnn", "mse"), ("attention", "mse"), ("layernorm", "mse")],
)
def test_hessian_and_ggn_products(device: str, arch: str, loss: str) -> None:
    net, x, y, loss_fn, _, hessian = case_and_hessian(arch, loss)
    ggn = ggn_case(arch, loss)[-1]
    v = torch.randn(
        hessian.shape[0],
        3,
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(3),
    )
    for dtype in (torch.float64, torch.float32):
        model = copy.deepcopy(net).to(device, dtype)
        data = (to(x, device, dtype), to(y, device, dtype))
        with tf32(False):
            hv = HessianOperator(model, loss_fn, data).matmat(v.to(device, dtype))
            gv = GGNOperator(model, loss_fn, data).matmat(v.to(device, dtype))
        assert hv.device.type == device and hv.dtype == dtype
        for what, dense, got in (("H", hessian, hv), ("GGN", ggn, gv)):
            name = f"{what} {arch} {loss} {dtype}"
            if dtype == torch.float64:
                assert_close(name, dense @ v, got, rtol=1e-9, atol=1e-12)
            else:
                assert_rel_error(name, dense @ v, got, tol=1e-4)


@pytest.mark.parametrize("arch,loss", [("mlp_tanh", "ce"), ("cnn", "mse")])
def test_lambda_max(device: str, arch: str, loss: str) -> None:
    net, x, y, loss_fn, _, hessian = case_and_hessian(arch, loss)
    exact = float(oracles.dense_eigh(hessian)[0][0])
    for dtype, tol, rtol in ((torch.float64, 1e-10, 1e-8), (torch.float32, 1e-6, 1e-5)):
        model = copy.deepcopy(net).to(device, dtype)
        with tf32(False):
            top = sharpness(
                model, loss_fn, (to(x, device, dtype), to(y, device, dtype)), tol=tol
            )
        assert abs(top - exact) <= rtol * abs(exact), (arch, dtype, top, exact)


# ---------------------------------------------------------------- Monitor and kernel stats


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_monitor_check(device: str, dtype: torch.dtype) -> None:
    """A Monitor on the device against float64 brute force on the same weights.

    The Monitor compares kernels in float64 (``kernel_stats``' reference path, on
    the device); the Triton ``kernel_stats`` is checked on trained eNTKs below.
    """
    model, x, y = _setup()
    model, x, y = model.to(device, dtype), x.to(device, dtype), y.to(device, dtype)
    mults = lr_multipliers(model)
    rtol = 1e-7 if dtype == torch.float64 else 1e-4
    mon = Monitor(
        model,
        (x, y),
        metrics=["ntk", "sharpness", "loss"],
        loss_fn=F.mse_loss,
        lr_multipliers=mults,
        sharpness_tol=1e-10 if dtype == torch.float64 else 1e-6,
    )

    def exact() -> tuple[nn.Module, Tensor, Tensor, Tensor]:
        cpu = copy.deepcopy(model).cpu().double()
        xd, yd = x.cpu().double(), y.cpu().double()
        return cpu, xd, yd, _oracle_kernel(cpu, xd, mults)

    k0 = exact()[3]
    mon.step(0)
    _train(model, x, y, 3)
    rec = mon.step(3)
    cpu, xd, yd, k1 = exact()
    names = [n for n, _ in cpu.named_parameters()]
    top = oracles.dense_eigh(oracles.dense_hessian(cpu, names, F.mse_loss, xd, yd))[0]
    for key, value in {
        "ntk/rel_change": (k1 - k0).norm() / k0.norm(),
        "ntk/eig/0": torch.linalg.eigvalsh(k1)[-1],
        "sharpness/raw": top[0],
        "loss": F.mse_loss(cpu(xd), yd),
    }.items():
        assert_close(
            f"{key} {device} {dtype}", value, torch.tensor(rec[key]), rtol=rtol, atol=0
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_stats_of_trained_kernels(
    monkeypatch: pytest.MonkeyPatch, device: str, dtype: torch.dtype
) -> None:
    """Distance, relative change and alignment of eNTKs before and after training."""
    n = 700 if device == "cuda" else 40
    model = meter_mlp(64).to(device)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(n, 3, generator=gen), torch.randn(n, 2, generator=gen)
    x, y = x.to(device), y.to(device)
    k0 = empirical_ntk(model, x).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    k1 = empirical_ntk(model, x).to(dtype)
    calls = spy(monkeypatch, "kernel_stats", k0)
    stats = kernel_stats(k0, k1)
    assert calls, "kernel_stats did not run the dispatched implementation"
    a, b = k0.double().cpu(), k1.double().cpu()

    def centered(k: Tensor) -> Tensor:
        return k - k.mean(0) - k.mean(1, keepdim=True) + k.mean()

    ca, cb = centered(a), centered(b)
    expected = {
        "distance": 1 - (a * b).sum() / (a.norm() * b.norm()),
        "relative_change": (b - a).norm() / a.norm(),
        "centered_alignment": (ca * cb).sum() / (ca.norm() * cb.norm()),
    }
    assert float(expected["relative_change"]) > 1e-3, "training did not move the kernel"
    for key, value in expected.items():
        got = torch.tensor(getattr(stats, key)(), dtype=torch.float64)
        assert_close(f"{key} {device} {dtype}", value, got, rtol=1e-4, atol=1e-6)
