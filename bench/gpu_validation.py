"""GPU figures of issue #26, one group per process: ``python -m bench.gpu_validation GROUP``.

``bench/gpu_validation.sh`` runs the groups in the issue's order, each under its
own ``timeout``; this module is what each group runs. Groups:

* ``kernels``: the fused Gram-Hadamard kernel against unfused torch and the bare
  cuBLAS GEMMs of the same products (fp32, tf32, bf16; % of the GEMMs'
  throughput), the weight-shared variant against unfused torch, ``kernel_stats``
  (one pass) against separate torch reductions;
* ``ntk``: the eNTK at N = 4096 of a width-4096 MLP (8-4096^3-10) and of a
  ResNet-18 on 32 x 32 inputs (up to the N the time allows), time, peak memory
  and the plan's stated memory, against the torch.func recipe at the largest N
  where its Jacobians fit; a ResNet-18 on 224 x 224 inputs, N = 8, 8 outputs,
  every implementation;
* ``curvature``: lambda_max of the tanh MLP 8-1024^3-10 at N = 256 (Lanczos cold
  and warm after an SGD step, the PyHessian recipe; errors against float64), one
  HVP per gradient;
* ``monitor``: one Monitor check in training steps (muP MLPs, width 512 and 4096);
* ``attention``: one HVP through attention at T = 8192, when rdiag's own attention
  operator (issue #24) takes the product; skipped with the reason otherwise;
* ``summary``: ``summary.md`` from what the groups wrote.

Each group writes ``$OUT/<group>.json`` after every case (so a group cut short
keeps what it measured) and rewrites ``$OUT/summary.md``. Timing: CUDA events
around each call, median (and minimum) of the repeats after a warm-up call (an
eNTK's first call, planning and autotuning included, is ``first_call_s``); peak
memory: ``torch.cuda.max_memory_allocated`` during the timed calls above the
allocation before them. ``--dry-run`` (or ``RDIAG_GPU_DRYRUN=1``) runs the same code at tiny
sizes on the CPU, where memory is not measured.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GROUPS = ("kernels", "ntk", "curvature", "monitor", "attention")
#: eNTK implementations compared at the sizes where the recipe fits (ntvp: one model).
ALL_BUT_NTVP = ("recipe", "structured", "jacobian", "auto")


class Run:
    """One group's run: device, sizes (real or dry), deadline, and its result file."""

    def __init__(self, group: str, out: Path, dry: bool, budget: float) -> None:
        self.group, self.out, self.dry = group, out, dry
        self.device = "cpu" if dry else "cuda"
        if not dry and not torch.cuda.is_available():
            raise SystemExit(
                "gpu_validation: no CUDA device; run with --dry-run (tiny sizes on "
                "the CPU) or on the GPU machine"
            )
        self.deadline = time.monotonic() + budget
        self.doc: dict[str, Any] = {
            "group": group,
            "status": "running",
            "meta": meta(self.device, dry),
            "rows": [],
        }
        self.save()

    def size(self, real: Any, dry: Any) -> Any:
        """``real`` on the GPU, ``dry`` in a dry run."""
        return dry if self.dry else real

    def left(self) -> float:
        """Seconds left before this group must stop on its own."""
        return self.deadline - time.monotonic()

    @contextlib.contextmanager
    def part(self, fraction: float) -> Iterator[None]:
        """Give the cases inside at most ``fraction`` of the time left (the rest waits)."""
        saved = self.deadline
        self.deadline = min(saved, time.monotonic() + fraction * self.left())
        try:
            yield
        finally:
            self.deadline = saved

    def add(self, **row: Any) -> None:
        """Record one case and save at once (the shell's timeout may come next)."""
        row = {k: _plain(v) for k, v in row.items()}
        self.doc["rows"].append(row)
        print(json.dumps(row), flush=True)
        self.save()

    def skip(self, case: str, reason: str) -> None:
        """Record a case not run, and why."""
        self.add(case=case, skipped=reason)

    def save(self) -> None:
        path = self.out / f"{self.group}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1))
        os.replace(tmp, path)
        write_summary(self.out)

    def done(self) -> None:
        self.doc["status"] = "done"
        self.save()


def _plain(v: Any) -> Any:
    if isinstance(v, float):
        return float(f"{v:.6g}")
    if isinstance(v, Tensor):
        return _plain(float(v))
    return v


def meta(device: str, dry: bool) -> dict[str, Any]:
    """Machine and versions, stored with every group's results."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "dry_run": dry,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "cuda": torch.version.cuda,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    return info


# ---------------------------------------------------------------- timing


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(
    fn: Callable[[], object],
    device: str,
    repeats: int = 10,
    max_seconds: float = 3.0,
    warmup: bool = True,
) -> dict[str, Any]:
    """Median and minimum seconds of ``fn``, and its peak memory, after a warm-up call.

    CUDA events around each call on the GPU; stops early once ``max_seconds`` of
    repeats are spent (after two timed calls, or ``repeats`` if fewer).
    ``peak_mib``: the most CUDA memory allocated during the timed calls above what
    was allocated before them (None on the CPU).
    """
    if warmup:
        fn()
    sync(device)
    base = 0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times: list[float] = []
    spent = 0.0
    while len(times) < repeats and (
        len(times) < min(2, repeats) or spent < max_seconds
    ):
        if device == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            tic = time.perf_counter()
            fn()
            seconds = time.perf_counter() - tic
        times.append(seconds)
        spent += seconds
    peak = None
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "repeats": len(times),
        "peak_mib": peak,
    }


def free_bytes(device: str) -> int:
    """Free device memory (the CPU: 8 GiB, the dry run's notional limit)."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    return 8 * 2**30


@contextlib.contextmanager
def tf32(on: bool) -> Iterator[None]:
    """Torch's TF32 switches for matmuls and convolutions, restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def rel_error(expected: Tensor, actual: Tensor) -> float:
    """``||actual - expected||_F / ||expected||_F`` in float64."""
    e, a = expected.double(), actual.double()
    return float((a - e).norm() / e.norm().clamp_min(1e-300))


def randn(*shape: int, device: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device, dtype)


# ---------------------------------------------------------------- kernels


def compare(
    run: Run,
    case: str,
    impls: dict[str, Callable[[], object]],
    baseline: str,
    errors: dict[str, float] | None = None,
    work: dict[str, float] | None = None,
) -> None:
    """Time and measure every implementation of one case; one row each.

    Rows hold the ratio to ``baseline`` (``vs_baseline``), ``gemm_fraction`` (the
    bare GEMMs' time over this one: the share of cuBLAS throughput reached) where
    a ``gemms`` entry exists, rates from ``work`` (``{"tflops": flops / 1e12}``:
    amount per second) and the relative errors of ``errors``.
    """
    res = {k: timed(f, run.device) for k, f in impls.items()}
    for impl, t in res.items():
        row = dict(case=case, impl=impl, **t, baseline=baseline)
        row["vs_baseline"] = t["median_s"] / res[baseline]["median_s"]
        if "gemms" in res:
            row["gemm_fraction"] = res["gemms"]["median_s"] / t["median_s"]
        for name, amount in (work or {}).items():
            row[name] = amount / t["median_s"]
        if errors and impl in errors:
            row["rel_err_vs_f64"] = errors[impl]
        run.add(**row)


def group_kernels(run: Run) -> None:
    """Fused kernels against unfused torch and the bare GEMMs."""
    import importlib

    from bench.baselines import (
        gram_matmuls,
        separate_kernel_stats,
        unfused_gram_hadamard,
        unfused_gram_hadamard_shared,
    )
    from rdiag import kernels

    dev = run.device
    d = run.size(1024, 32)
    precisions = {
        "fp32": (torch.float32, False),
        "tf32": (torch.float32, True),
        "bf16": (torch.bfloat16, False),
    }
    for n, r in run.size([(4096, 1), (4096, 4), (1024, 1)], [(64, 1), (48, 3)]):
        for name, (dtype, allow) in precisions.items():
            case = f"gram_hadamard N={n} R={r} D={d} {name}"
            if run.left() < 10:
                run.skip(case, "group time budget spent")
                continue
            a = [
                randn(*s, device=dev, dtype=dtype, seed=i)
                for i, s in enumerate([(n, d), (n, d), (n, r, d), (n, r, d)])
            ]
            impls = {
                "fused": lambda: kernels.gram_hadamard(*a, allow_tf32=allow),
                "unfused": lambda: unfused_gram_hadamard(*a),
                "gemms": lambda: gram_matmuls(*a),
            }
            with tf32(allow):
                exact = unfused_gram_hadamard(*(t.double() for t in a))
                err = {"fused": rel_error(exact, impls["fused"]())}
                flops = 2 * n * n * (d + r * r * d)
                compare(run, case, impls, "unfused", err, {"tflops": flops / 1e12})
    shared_module = None
    if kernels.use_triton(torch.zeros(1, device=dev)):
        shared_module = importlib.import_module(
            "rdiag.kernels.triton_gram_hadamard_shared"
        )
    shapes = run.size(
        [(256, 64, 256, 256, 1), (64, 49, 288, 64, 4)], [(8, 6, 16, 8, 2)]
    )
    for n, t, dx, dg, r in shapes:
        case = f"gram_hadamard_shared N={n} T={t} Dx={dx} Dg={dg} R={r} fp32"
        if run.left() < 10:
            run.skip(case, "group time budget spent")
            continue
        a = [
            randn(*s, device=dev, seed=i)
            for i, s in enumerate(
                [(n, t, dx), (n, t, dx), (n, r, t, dg), (n, r, t, dg)]
            )
        ]
        impls = {
            "rdiag (dispatcher)": lambda: kernels.gram_hadamard_shared(*a),
            "unfused": lambda: unfused_gram_hadamard_shared(*a),
            "gemms": lambda: gram_matmuls(*(x.flatten(0, -2) for x in a[:2]), *a[2:]),
        }
        if shared_module is not None:
            impls["triton kernel"] = lambda: shared_module.gram_hadamard_shared(*a)
        else:
            run.skip(f"{case} triton kernel", "Triton does not run here (CPU dry run)")
        with tf32(False):
            exact = unfused_gram_hadamard_shared(*(x.double() for x in a))
            errs = {
                k: rel_error(exact, impls[k]())
                for k in ("rdiag (dispatcher)", "triton kernel")
                if k in impls
            }
            compare(run, case, impls, "unfused", errs)
    for n in run.size([4096, 8192], [64]):
        case = f"kernel_stats N=M={n} fp32"
        if run.left() < 5:
            run.skip(case, "group time budget spent")
            continue
        k0, k1 = randn(n, n, device=dev, seed=0), randn(n, n, device=dev, seed=1)
        exact = float(separate_kernel_stats(k0.double(), k1.double())["sq_diff"])
        err = abs(kernels.kernel_stats(k0, k1).sq_diff - exact) / exact
        compare(
            run,
            case,
            {
                "rdiag (one pass)": lambda: kernels.kernel_stats(k0, k1),
                "separate torch reductions": lambda: separate_kernel_stats(k0, k1),
            },
            "separate torch reductions",
            {"rdiag (one pass)": err},
            {"read_gb_s": 2 * n * n * 4 / 1e9},
        )


# ---------------------------------------------------------------- eNTK


def _ntk_case(
    run: Run,
    case: str,
    model: nn.Module,
    x: Tensor,
    impl: str,
    trace: bool,
    expected_s: float | None = None,
) -> tuple[dict[str, Any] | None, Tensor | None]:
    """Time and peak memory of one eNTK (``impl``: an rdiag implementation or ``recipe``).

    Returns the row (or None when skipped) and the kernel of the last call.
    """
    from bench.baselines import tutorial_jacobian_ntk
    from rdiag import ntk_fn

    if expected_s is not None and expected_s > run.left() - 5:
        run.skip(
            f"{case} {impl}", f"predicted {expected_s:.0f} s, {run.left():.0f} s left"
        )
        return None, None
    if run.left() < 10:
        run.skip(f"{case} {impl}", "group time budget spent")
        return None, None
    dev, out = run.device, {}
    stated, handle = None, None
    tic = time.perf_counter()
    if impl == "recipe":

        def call() -> None:
            out["k"] = tutorial_jacobian_ntk(model, x, x, trace)

        call()
    else:
        handle = ntk_fn(model, implementation=impl, trace_outputs=trace)
        plan = handle.plan(x)
        stated = plan.memory / 2**20

        def call() -> None:
            out["k"] = handle(x)

        call()
    sync(dev)
    first = time.perf_counter() - tic
    if impl == "auto":  # the race's calls (two of each contender) stay untimed
        for _ in range(3):
            call()
    repeats = 1 if first > 10 or first * 3 > run.left() else 3
    t = timed(call, dev, repeats=repeats, max_seconds=10, warmup=False)
    row = dict(
        case=case,
        impl=impl,
        ran="recipe" if handle is None else handle.implementation,
        first_call_s=first,
        **t,
        stated_mib=stated,
    )
    if row["ran"] is not None and not isinstance(row["ran"], str):
        row["ran"] = row["ran"].value
    return row, out["k"]


def _recipe_n(
    model: nn.Module, outputs: int, sizes: list[int], device: str
) -> int | None:
    """Largest N whose two recipe Jacobians (2 N O P floats) take under 40% of free memory."""
    params = sum(p.numel() for p in model.parameters())
    fits = [
        n for n in sizes if 2 * n * outputs * params * 4 <= 0.4 * free_bytes(device)
    ]
    return max(fits) if fits else None


def _implementations(
    run: Run,
    case: str,
    model: nn.Module,
    x: Tensor,
    impls: tuple[str, ...],
    trace: bool,
) -> None:
    """One eNTK by every implementation in ``impls``; errors against the recipe's."""
    recipe = None
    for impl in impls:
        row, k = _ntk_case(run, case, model, x, impl, trace)
        if row is None:
            continue
        if impl == "recipe":
            recipe = k
        elif recipe is not None:
            row["rel_err_vs_recipe"] = rel_error(recipe, k)
        run.add(**row)


def group_ntk(run: Run) -> None:
    """eNTK at N = 4096: MLP width 4096, ResNet-18 32x32; ResNet-18 224x224 N = 8.

    The three models share the group's time (40%, then 55% of what is left, then
    the rest), so that a slow first model leaves the others their turn.
    """
    from bench.bench_ntk import mlp
    from bench.models import ResNet18

    dev = run.device
    gen = torch.Generator().manual_seed(1)
    with run.part(0.4):
        width, big = run.size(4096, 64), run.size(4096, 32)
        model = mlp(width).to(dev).eval()
        x = torch.randn(big, 8, generator=gen).to(dev)
        name = f"MLP 8-{width}^3-10"
        row, _ = _ntk_case(run, f"{name} N={big} traced", model, x, "structured", True)
        if row:
            run.add(**row)
        small = _recipe_n(model, 10, run.size([4, 8, 16, 32, 64], [4, 8]), dev)
        if small:
            case = f"{name} N={small} traced"
            _implementations(run, case, model, x[:small], ALL_BUT_NTVP, True)
        else:
            run.skip(f"{name} recipe", "its Jacobians do not fit at N >= 4")
        row, _ = _ntk_case(run, f"{name} N={big} full", model, x, "structured", False)
        if row:
            run.add(**row)
        del model, x

    with run.part(0.55):
        torch.manual_seed(0)
        res = ResNet18(classes=10, width=run.size(64, 8)).to(dev).eval()
        side = run.size(32, 8)
        previous: tuple[int, float] | None = None
        for n in run.size([256, 1024, 4096], [4, 8]):
            xr = torch.randn(n, 3, side, side, generator=gen).to(dev)
            expect = None if previous is None else previous[1] * (n / previous[0]) ** 2
            case = f"ResNet-18 {side}x{side} N={n} traced"
            row, _ = _ntk_case(run, case, res, xr, "structured", True, expect)
            if row is None:
                break
            run.add(**row)
            previous = (n, row["median_s"])
        small = _recipe_n(res, 10, run.size([8, 16, 32, 64], [4, 8]), dev)
        if small:
            xr = torch.randn(small, 3, side, side, generator=gen).to(dev)
            case = f"ResNet-18 {side}x{side} N={small} traced"
            _implementations(run, case, res, xr, ALL_BUT_NTVP, True)
        del res

    torch.manual_seed(0)
    big_res = ResNet18(classes=8, width=run.size(64, 8), stem="imagenet").to(dev).eval()
    side = run.size(224, 16)
    xi = torch.randn(8, 3, side, side, generator=gen).to(dev)
    case = f"ResNet-18 {side}x{side} N=8 O=8 full"
    _implementations(run, case, big_res, xi, (*ALL_BUT_NTVP, "ntvp"), False)


# ---------------------------------------------------------------- curvature


def group_curvature(run: Run) -> None:
    """lambda_max of the tanh MLP 8-1024^3-10 at N = 256; HVP per gradient."""
    from bench import baselines
    from bench.bench_hessian import _reference, _sgd_step
    from bench.bench_ntk import mlp
    from rdiag import HessianOperator, lanczos

    dev = run.device
    width, n = run.size(1024, 32), run.size(256, 16)
    net = mlp(width).to(dev)  # the bench's 8-1024^3-10 tanh MLP (bench_hessian)
    gen = torch.Generator().manual_seed(1)
    x, y = (torch.randn(n, d, generator=gen).to(dev) for d in (8, 10))
    case = f"MLP 8-{width}^3-10 N={n} fp32"
    with tf32(False):
        op = HessianOperator(net, F.mse_loss, (x, y))
        v = randn(op.shape[0], device=dev, seed=2)
        grad = timed(lambda: baselines.loss_gradient(net, F.mse_loss, x, y), dev)
        hvp = timed(lambda: op.matvec(v), dev)
        run.add(case=case, what="gradient", **grad)
        run.add(
            case=case,
            what="HVP",
            **hvp,
            per_gradient=hvp["median_s"] / grad["median_s"],
        )
        reference = _reference(net, x, y)
        for name, fn in (
            (
                "lanczos cold, eigenvalue tol 1e-6",
                lambda: lanczos(op, 1, tol=1e-6, criterion="eigenvalue"),
            ),
            (
                "PyHessian recipe (power, tol 1e-3)",
                lambda: baselines.pyhessian_style_power(net, F.mse_loss, x, y),
            ),
        ):
            if run.left() < 10:
                run.skip(f"{case} {name}", "group time budget spent")
                continue
            sync(dev)
            tic = time.perf_counter()
            result = fn()
            sync(dev)
            seconds = time.perf_counter() - tic
            value, products = (
                (float(result.eigenvalues[0]), result.num_matvecs)
                if hasattr(result, "eigenvalues")
                else result
            )
            run.add(
                case=case,
                what=name,
                seconds=seconds,
                products=products,
                lambda_max=value,
                rel_err=abs(value - reference) / abs(reference),
            )
        if run.left() < 15:
            run.skip(f"{case} warm start", "group time budget spent")
            return
        estimate = lanczos(op, 1, tol=1e-6, criterion="eigenvalue")
        stepped = _sgd_step(net, x, y, 0.1)
        after = _reference(stepped, x, y)
        op2 = HessianOperator(stepped, F.mse_loss, (x, y))
        for name, start in (("cold", None), ("warm", estimate)):
            sync(dev)
            tic = time.perf_counter()
            res = lanczos(
                op2, 1, tol=1e-6, criterion="eigenvalue", warm_start=start, seed=1
            )
            sync(dev)
            run.add(
                case=f"{case}, after one SGD step (lr 0.1)",
                what=f"lanczos {name}",
                seconds=time.perf_counter() - tic,
                products=res.num_matvecs,
                rel_err=abs(float(res.eigenvalues[0]) - after) / abs(after),
            )


# ---------------------------------------------------------------- Monitor


def group_monitor(run: Run) -> None:
    """One Monitor check against training steps of the same model."""
    from bench.baselines import sgd_steps
    from rdiag import Monitor, lr_multipliers, make_model

    dev = run.device
    for width, batch, probe in run.size(
        [(512, 256, 64), (4096, 1024, 256)], [(32, 32, 8)]
    ):
        case = f"muP MLP 16-{width}-{width}-1, batch {batch}, probe {probe}"
        if run.left() < 10:
            run.skip(case, "group time budget spent")
            continue
        model = make_model(
            "mlp", width, parametrization="mup", seed=0, d_in=16, d_out=1
        )
        model = model.to(dev)
        gen = torch.Generator().manual_seed(0)
        x, y = (torch.randn(batch, d, generator=gen).to(dev) for d in (16, 1))
        steps = timed(lambda: sgd_steps(model, x, y, 10, 1e-4), dev, repeats=5)
        step_s = steps["median_s"] / 10
        run.add(
            case=case,
            what="training step (full batch SGD)",
            median_s=step_s,
            min_s=steps["min_s"] / 10,
        )
        for metrics in (
            ["ntk", "representations", "weights", "loss"],
            ["ntk", "representations", "weights", "loss", "sharpness_precond"],
        ):
            mon = Monitor(
                model,
                (x[:probe], y[:probe]),
                metrics=metrics,
                loss_fn=F.mse_loss,
                lr_multipliers=lr_multipliers(model),
            )
            mon.step(0)  # references at initialization
            counter = iter(range(1, 10**6))
            check = timed(lambda: mon.step(next(counter)), dev, repeats=5)
            run.add(
                case=case,
                what="Monitor check: " + ", ".join(metrics),
                **check,
                training_steps=check["median_s"] / step_s,
            )


# ---------------------------------------------------------------- attention


class AttentionBlock(nn.Module):
    """One pre-norm causal self-attention block and MLP with a token read-out (GPT-2 style)."""

    def __init__(self, dim: int, heads: int, vocab: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.readout = nn.Linear(dim, vocab)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, T, dim) -> (N, T, vocab)``."""
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, t, 3, self.heads, -1).unbind(2)
        a = F.scaled_dot_product_attention(
            *(z.transpose(1, 2) for z in (q, k, v)), is_causal=True
        )
        x = x + self.proj(a.transpose(1, 2).reshape(n, t, d))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.readout(x)


def _token_loss(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def group_attention(run: Run) -> None:
    """One HVP through attention at T = 8192, if rdiag's attention operator takes it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from rdiag import HessianOperator

    dev = run.device
    dim, heads, vocab = run.size(768, 32), run.size(12, 2), 64
    torch.manual_seed(0)
    model = AttentionBlock(dim, heads, vocab).to(dev)

    def data(t: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(t)
        x = torch.randn(1, t, dim, generator=gen).to(dev)
        return x, torch.randint(0, vocab, (1, t), generator=gen).to(dev)

    probe = HessianOperator(model, _token_loss, data(run.size(256, 16)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe.matvec(randn(probe.shape[0], device=dev))
    # The operator's record of strategies that failed (else the one-time notice).
    fallback = sorted(getattr(probe, "failed_strategies", ()))
    notices = [str(w.message) for w in caught if "math attention" in str(w.message)]
    present = not fallback and not notices
    run.add(
        case="probe T=256",
        rdiag_attention_operator=present,
        failed_strategies=", ".join(fallback) or None,
        notices="; ".join(n[:200] for n in notices) or None,
    )
    t = run.size(8192, 64)
    case = f"HVP, one block d={dim} heads={heads} T={t} fp32"
    if not present and not run.dry:
        run.skip(
            case,
            "rdiag's attention operator (issue #24) is absent: the HVP fell back to "
            f"math attention ({', '.join(fallback) or notices[0][:200]})",
        )
        return
    x, y = data(t)
    op = HessianOperator(model, _token_loss, (x, y))
    v = randn(op.shape[0], device=dev)
    row = timed(lambda: op.matvec(v), dev, repeats=3)
    run.add(
        case=case,
        impl="rdiag HessianOperator",
        **row,
    )
    params = [p for p in model.parameters()]
    vs = list(torch.split(v, [p.numel() for p in params]))
    vs = [u.view_as(p) for u, p in zip(vs, params)]

    def math_hvp() -> None:
        with sdpa_kernel(SDPBackend.MATH):
            g = torch.autograd.grad(_token_loss(model(x), y), params, create_graph=True)
            torch.autograd.grad(g, params, vs)

    scores = heads * t * t * 4
    if scores * 8 > 0.8 * free_bytes(dev):
        run.skip(
            f"{case} math attention",
            f"its T x T scores ({scores / 2**30:.1f} GiB each) do not fit 8 times",
        )
        return
    base = timed(math_hvp, dev, repeats=3)
    run.add(
        case=case,
        impl="math attention, double backward (baseline)",
        **base,
        vs_rdiag=base["median_s"] / row["median_s"],
    )


# ---------------------------------------------------------------- summary


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v).replace("|", "/")


def write_summary(out: Path) -> None:
    """``summary.md``: one table per group from the JSON files present, the tests' result."""
    lines = ["# GPU validation (issue #26)", ""]
    tests = out / "correctness.txt"
    if tests.exists():
        tail = [
            ln for ln in tests.read_text(errors="replace").splitlines() if ln.strip()
        ]
        result = next(
            (
                ln
                for ln in reversed(tail)
                if " passed" in ln or " failed" in ln or "error" in ln
            ),
            tail[-1] if tail else "(empty)",
        )
        lines += [f"`pytest -m cuda tests`: {result.strip('= ')}", ""]
    for group in GROUPS:
        path = out / f"{group}.json"
        if not path.exists():
            lines += [f"## {group}: not run", ""]
            continue
        doc = json.loads(path.read_text())
        m = doc["meta"]
        state = (
            "" if doc["status"] == "done" else " (cut short: the group did not finish)"
        )
        lines += [
            f"## {group}{state}",
            "",
            f"{m['device']}, torch {m['torch']}, CUDA {m['cuda']}, triton {m['triton']}, "
            f"Python {m['python']}, TF32 matmul/cuDNN "
            f"{m.get('tf32_matmul')}/{m.get('tf32_cudnn')}, {m['date']}"
            + (" **dry run**" if m["dry_run"] else ""),
            "",
        ]
        rows = doc["rows"]
        if not rows:
            continue
        keys: list[str] = []
        for row in rows:
            keys += [k for k in row if k not in keys]
        lines.append("| " + " | ".join(keys) + " |")
        lines.append("|" + "---|" * len(keys))
        for row in rows:
            lines.append("| " + " | ".join(_fmt(row.get(k)) for k in keys) + " |")
        lines.append("")
    tmp = out / "summary.tmp"
    tmp.write_text("\n".join(lines))
    os.replace(tmp, out / "summary.md")


def main(argv: list[str] | None = None) -> None:
    """Run one group: ``python -m bench.gpu_validation GROUP [--dry-run] [--budget S]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("group", choices=[*GROUPS, "summary"])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument(
        "--budget", type=float, default=120.0, help="seconds for the group"
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "results/gpu"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.group == "summary":
        write_summary(out)
        print((out / "summary.md").read_text())
        return
    dry = args.dry_run or os.environ.get("RDIAG_GPU_DRYRUN", "0") == "1"
    torch.manual_seed(0)
    run = Run(args.group, out, dry, args.budget)
    globals()[f"group_{args.group}"](run)
    run.done()
    if math.isfinite(run.left()):
        print(
            f"{args.group}: done with {run.left():.0f} s of its budget left", flush=True
        )


if __name__ == "__main__":
    sys.exit(main())
