"""Handles own their plans: values are read live, planning happens once, and nothing
is cached on the user's modules.

Work is counted by wrapping the internal planning steps (probe forward passes,
the structured self-check, flop counting, jvp-mode probes, operator probes) with
counting spies: a second call of a handle, and every Monitor check after the
first, must not reach any of them.
"""

from __future__ import annotations

import copy
from collections import Counter
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rdiag
from rdiag import (
    GGNOperator,
    HessianOperator,
    Monitor,
    NTKOperator,
    empirical_ntk,
    functionalize,
    ntk_fn,
)
from rdiag.functional import FunctionalModel
from rdiag.ntk import _capture, planning
from tests._assert import assert_close
from tests.models import ZOO


def _train(model: nn.Module, x, y, steps: int = 3, lr: float = 0.5) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["mlp_tanh", "cnn", "layernorm"])
def test_views_handles_and_operators_follow_training(name: str, dtype) -> None:
    """Built before training, used after: equal to fresh builds (no stale copies)."""
    model, make = ZOO[name](0)
    x, xo = make(6, 1), make(4, 2)
    with torch.no_grad():
        y = torch.randn_like(model(x))
    view = functionalize(model, dtype=dtype)
    kernel = ntk_fn(model, dtype=dtype)
    full = ntk_fn(model, dtype=dtype, trace_outputs=False, implementation="jacobian")
    ntk_op = NTKOperator(model, xo, dtype=dtype)
    hess = HessianOperator(model, F.mse_loss, (x, y), dtype=dtype)
    ggn = GGNOperator(model, F.mse_loss, (x, y), dtype=dtype)
    v = torch.randn(hess.shape[0], dtype=dtype)
    u = torch.randn(ntk_op.shape[0], dtype=dtype)
    for handle in (kernel, full):
        handle(x)  # planned at the old parameters
    hess.matvec(v), ggn.matvec(v), ntk_op.matvec(u)
    _train(model, x, y)
    tol = (
        {"rtol": 1e-12, "atol": 1e-12}
        if dtype == torch.float64
        else {"rtol": 1e-5, "atol": 1e-6}
    )
    fresh = functionalize(model, dtype=dtype)
    for n in view.names:
        assert_close(f"view {n}", model.get_parameter(n), view.params[n], **tol)
    assert_close("view call", fresh(fresh.params, x), view(view.params, x), **tol)
    assert_close(
        "traced kernel", empirical_ntk(model, x, dtype=dtype), kernel(x), **tol
    )
    expected = empirical_ntk(
        model, x, xo, dtype=dtype, trace_outputs=False, implementation="jacobian"
    )
    assert_close("cross kernel", expected, full(x, xo), **tol)
    assert_close(
        "ntk operator",
        NTKOperator(model, xo, dtype=dtype).matvec(u),
        ntk_op.matvec(u),
        **tol,
    )
    assert_close(
        "hessian",
        HessianOperator(model, F.mse_loss, (x, y), dtype=dtype).matvec(v),
        hess.matvec(v),
        **tol,
    )
    assert_close(
        "ggn",
        GGNOperator(model, F.mse_loss, (x, y), dtype=dtype).matvec(v),
        ggn.matvec(v),
        **tol,
    )


def test_operator_rebinds_to_a_new_batch_without_probing() -> None:
    model, make = ZOO["mlp_tanh"](0)
    x1, x2 = make(6, 1), make(6, 2)
    y1, y2 = torch.randn(6, 3), torch.randn(6, 3)
    op = HessianOperator(model, F.mse_loss, (x1, y1), dtype=torch.float64)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    op.matvec(v)
    with mock.patch.object(FunctionalModel, "probe", wraps=op.fm.probe) as probe:
        op.rebind((x2, y2))
        moved = op.matvec(v)
        assert probe.call_count == 0, "a batch of the same shapes is not probed again"
        op.rebind((x2[:4], y2[:4]))
        assert probe.call_count == 0, "the per-sample shapes are the same"
    expected = HessianOperator(model, F.mse_loss, (x2, y2), dtype=torch.float64)
    assert_close("rebound", expected.matvec(v), moved, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="shaped like the bound one"):
        NTKOperator(model, x1).rebind(x1[:3])


class _Spies:
    """Counting wrappers around every planning step of the eNTK, Monitor and operators."""

    TARGETS = {
        "probe": (FunctionalModel, "probe"),
        "plan": (planning.Planner, "_make_plan"),
        "structured plan": (planning, "plan_structured"),
        "self-check": (_capture, "verify_sites"),
        "flops": (planning, "sample_forward_flops"),
        "jvp probe (eNTK)": (planning, "probe_jvp_mode"),
        "hessian probe": (HessianOperator, "_probe"),
        "view": (FunctionalModel, "__init__"),
    }

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._patches = []

    def __enter__(self) -> _Spies:
        import rdiag.monitor.metrics as monitor_module

        targets = dict(self.TARGETS)
        targets["jvp probe (Monitor)"] = (monitor_module, "probe_jvp_mode")
        for label, (owner, attr) in targets.items():
            original = getattr(owner, attr)
            is_method = isinstance(owner, type)

            def spy(*args, _label=label, _original=original, **kwargs):
                self.counts[_label] += 1
                return _original(*args, **kwargs)

            patch = mock.patch.object(
                owner, attr, spy if not is_method else _method(spy)
            )
            patch.start()
            self._patches.append(patch)
        return self

    def __exit__(self, *exc: object) -> None:
        for patch in reversed(self._patches):
            patch.stop()


def _method(fn):
    def wrapper(self, *args, **kwargs):
        return fn(self, *args, **kwargs)

    return wrapper


@pytest.mark.parametrize("implementation", ["auto", "structured", "jacobian", "ntvp"])
def test_second_call_of_a_handle_does_no_planning(implementation: str) -> None:
    model, make = ZOO["attention"](0)  # fused attention: ntvp needs the jvp probe
    x1, x2 = make(5, 1), make(3, 2)
    kernel = ntk_fn(model, implementation=implementation, dtype=torch.float64)
    with _Spies() as spies:
        first = kernel(x1, x2)
        after_first = dict(spies.counts)
        again = kernel(make(5, 7), make(3, 8))  # same shapes, other values
        kernel(x1, x2)
    assert spies.counts == after_first, (
        f"later calls planned again: {after_first} -> {dict(spies.counts)}"
    )
    assert after_first["plan"] == 1 and after_first["probe"] == 1
    assert kernel.num_plans == 1 and not torch.equal(first, again)
    with _Spies() as spies:
        kernel(x1)  # a new signature (symmetric): one new plan
    assert spies.counts["plan"] == 1 and kernel.num_plans == 2
    if implementation in ("auto", "structured"):
        assert after_first["self-check"] == 1
        assert kernel.implementation.value == "structured"
        assert "structured rules cover" in kernel.explain()
    if implementation == "ntvp":
        assert after_first["jvp probe (eNTK)"] == 1


def test_monitor_checks_after_the_first_do_no_planning() -> None:
    model = rdiag.make_model("transformer", 8, parametrization="mup", seed=0)
    x = model.sample_inputs(4, torch.Generator().manual_seed(0))
    y = torch.randint(0, model.vocab, (4, model.seq_len))

    def loss_fn(out, target):
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))

    metrics = [
        "ntk",
        "ntk_layers",
        "representations",
        "weights",
        "linearization",
        "sharpness",
        "sharpness_precond",
        "trace",
        "grad_norm",
        "loss",
    ]
    with _Spies() as spies:
        mon = Monitor(
            model,
            (x, y),
            metrics=metrics,
            loss_fn=loss_fn,
            lr_multipliers=rdiag.lr_multipliers(model),
            strict=True,
        )
        built = dict(spies.counts)
        mon.step(0)
        after_first = dict(spies.counts)
        opt = rdiag.make_optimizer(model, None, 0.1)
        for step in (1, 2):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            mon.step(step)
    assert built["view"] == 1, "the Monitor builds one functional view"
    assert spies.counts == after_first, (
        f"checks after the first planned or probed: {after_first} -> "
        f"{dict(spies.counts)}"
    )
    # One plan per handle; the read-out identity's reduced view is planned with it.
    readout = mon.unit("ntk").handle.last_plan.inner is not None
    assert after_first["plan"] == 1 + readout and after_first["hessian probe"] == 1
    assert mon.missing == {}
    assert {"ntk/rel_change", "sharpness/raw", "lin_error"} <= set(mon.history[-1])


def test_a_check_computes_each_kernel_comparison_once(monkeypatch) -> None:
    import rdiag.monitor.metrics as monitor_module

    model = rdiag.make_model("mlp", 16, parametrization="ntk", seed=0, d_in=3, d_out=2)
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    calls = []
    original = monitor_module.kernel_stats
    monkeypatch.setattr(
        monitor_module,
        "kernel_stats",
        lambda k0, k1: calls.append(k0.shape) or original(k0, k1),
    )
    mon = Monitor(model, (x, y), metrics=["ntk"], loss_fn=F.mse_loss)
    mon.step(0)
    assert len(calls) == 1  # against the reference (itself) only
    calls.clear()
    mon.step(1)
    assert len(calls) == 2, "one pass against the reference, one against the previous"


def test_no_decision_is_stored_on_the_model() -> None:
    """Handles, operators and the Monitor leave every module's attributes and hooks."""
    model = rdiag.make_model("cnn", 4, parametrization="mup", seed=0)
    x = model.sample_inputs(3, torch.Generator().manual_seed(0))
    y = torch.randn(3, 1)

    def snapshot(m: nn.Module):
        return [
            (
                name,
                sorted(k for k in vars(mod) if not k.startswith("_")),
                sorted(k for k in vars(mod) if k.startswith("_")),
                list(mod._forward_hooks.values()),
                list(mod._forward_pre_hooks.values()),
                mod.training,
            )
            for name, mod in m.named_modules()
        ]

    before = snapshot(model)
    state = copy.deepcopy(model.state_dict())
    for impl in ("auto", "jacobian", "ntvp", "structured"):
        ntk_fn(model, implementation=impl)(x)
    rdiag.sharpness(model, F.mse_loss, (x, y))
    mon = Monitor(
        model,
        (x, y),
        metrics=[
            "ntk",
            "representations",
            "features",
            "weights",
            "sharpness",
            "grad_norm",
            "linearization",
            "loss",
        ],
        loss_fn=F.mse_loss,
    )
    mon.step(0)
    mon.step(1)
    assert snapshot(model) == before
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_one_shot_calls_reuse_the_plan_of_an_earlier_call() -> None:
    """empirical_ntk plans once per model, options and input signature (a bounded
    cache keyed by a weak reference to the model, cleared on request); the reused
    plan computes the current kernel."""
    import gc
    import weakref

    from rdiag.ntk import plan_cache

    plan_cache.clear_plan_cache()
    model = rdiag.make_model("mlp", 8, parametrization="ntk", seed=0, d_in=3, d_out=2)
    x = torch.randn(5, 3)
    with _Spies() as spies:
        first = empirical_ntk(model, x)
        planned = spies.counts["plan"]
        assert planned >= 1
        again = empirical_ntk(model, x)
        assert spies.counts["plan"] == planned  # reused: no planning
        torch.testing.assert_close(first, again)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5)
        moved = empirical_ntk(model, x)  # parameter values are read live
        torch.testing.assert_close(moved, ntk_fn(model)(x))
        empirical_ntk(model, torch.randn(4, 3))  # another signature: planned
        assert spies.counts["plan"] > planned
        empirical_ntk(model, x, trace_outputs=False)  # other options: another handle
    assert len(plan_cache.PLANS) == 2
    # Unhashable options (a tensor projection) are not cached.
    empirical_ntk(model, x, projection=torch.randn(1, 2))
    assert len(plan_cache.PLANS) == 2
    # Bounded: the least recently used handle goes first.
    for seed in range(plan_cache.MAX_ENTRIES):
        other = rdiag.make_model(
            "mlp", 4, parametrization="ntk", seed=seed, d_in=3, d_out=2
        )
        empirical_ntk(other, x)
    assert len(plan_cache.PLANS) == plan_cache.MAX_ENTRIES
    # Clearing releases the models the handles held; nothing is left on the model.
    alive = weakref.ref(model)
    empirical_ntk(model, x)
    assert not [k for k in vars(model) if "plan" in k.lower()]
    del model
    plan_cache.clear_plan_cache()
    gc.collect()
    assert alive() is None and len(plan_cache.PLANS) == 0
