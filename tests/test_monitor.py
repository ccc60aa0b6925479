"""Monitor: every metric against float64 brute force, schedule, budget, warm start, store."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rdiag import empirical_ntk, metrics
from rdiag.models import make_model
from rdiag.monitor import METRICS, Monitor
from rdiag.parametrization import effective_weights, lr_multipliers, make_optimizer
from rdiag.runs.store import Store
from tests._assert import assert_close
from tests.oracles import (
    dense_eigh,
    dense_hessian,
    ntk_from_jacobians,
    per_sample_jacobian,
)

ALL = [m for m in METRICS if m not in ("sharpness_precond", "accuracy")]


def _f64(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


def _setup(width: int = 6, seed: int = 0):
    model = make_model(
        "mlp", width, parametrization="r=0.25", seed=seed, d_in=3, d_out=2
    )
    model = model.double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = torch.randn(5, 2, generator=g, dtype=torch.float64)
    return model, x, y


def _oracle_kernel(model, x, mults: dict[str, float]) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    jac = per_sample_jacobian(model, names, x)
    w = torch.cat(
        [
            torch.full((p.numel(),), mults[n], dtype=torch.float64)
            for n, p in model.named_parameters()
        ]
    )
    return ntk_from_jacobians(jac, jac, w).diagonal(dim1=2, dim2=3).sum(-1)


def _train(model, x, y, steps: int, lr: float = 0.5) -> None:
    opt = make_optimizer(model, None, lr)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


def test_metrics_match_brute_force() -> None:
    model, x, y = _setup()
    mults = lr_multipliers(model)
    mon = Monitor(
        model,
        (x, y),
        every=1,
        metrics=ALL,
        loss_fn=F.mse_loss,
        lr_multipliers=mults,
        sharpness_tol=1e-10,
    )
    k0 = _oracle_kernel(model, x, mults)
    h0 = model.readin(x).detach()
    w0 = {k: v.clone() for k, v in effective_weights(model).items()}
    names = [n for n, _ in model.named_parameters()]
    j0 = per_sample_jacobian(model, names, x)  # (N, O, P) at initialization
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    f0 = model(x).detach()
    mon.step(0)
    _train(model, x, y, 3)
    rec = mon.step(3)
    k1 = _oracle_kernel(model, x, mults)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    f = model(x).detach()
    lin = f0 + j0 @ (theta - theta0)
    assert_close(
        "lin_error",
        (f - lin).norm() / (f - f0).norm(),
        _f64(rec["lin_error"]),
        rtol=1e-8,
        atol=1e-14,
    )
    grads = torch.autograd.grad(F.mse_loss(model(x), y), list(model.parameters()))
    assert_close(
        "grad_norm",
        torch.sqrt(sum((g**2).sum() for g in grads)),
        _f64(rec["grad_norm"]),
        rtol=1e-10,
        atol=0,
    )
    assert_close(
        "ntk_rel_change",
        (k1 - k0).norm() / k0.norm(),
        _f64(rec["ntk/rel_change"]),
        rtol=1e-8,
        atol=0,
    )
    assert_close(
        "ntk_eig0",
        torch.linalg.eigvalsh(k1)[-1],
        _f64(rec["ntk/eig/0"]),
        rtol=1e-8,
        atol=0,
    )
    assert_close(
        "kta",
        _f64(metrics.kernel_target_alignment(k1, y)),
        _f64(rec["ntk/kta"]),
        rtol=1e-8,
        atol=0,
    )
    layer_sum = sum(
        rec[f"ntk_layers/trace/{n}"] for n in ("readin", "hidden.0", "readout")
    )
    assert_close("layer traces", k1.trace(), _f64(layer_sum), rtol=1e-8, atol=0)
    dh = (model.readin(x).detach() - h0).norm(dim=1).mean()
    assert_close("delta_h", dh, _f64(rec["delta_h/readin"]), rtol=1e-10, atol=0)
    for name, w in effective_weights(model).items():
        d = torch.linalg.svdvals(w - w0[name])[0]
        assert_close(
            f"dW_op {name}", d, _f64(rec[f"dW_op/{name}"]), rtol=1e-10, atol=1e-14
        )
        rel = d / torch.linalg.svdvals(w0[name])[0]
        assert_close(
            f"dW_rel {name}", rel, _f64(rec[f"dW_rel/{name}"]), rtol=1e-10, atol=1e-14
        )
    hess = dense_hessian(model, names, F.mse_loss, x, y)
    assert_close(
        "sharpness",
        dense_eigh(hess)[0][0],
        _f64(rec["sharpness/raw"]),
        rtol=1e-7,
        atol=0,
    )
    m = torch.cat(
        [
            torch.full((p.numel(),), mults[n], dtype=torch.float64)
            for n, p in model.named_parameters()
        ]
    ).sqrt()
    pre = dense_eigh(m[:, None] * hess * m[None, :])[0][0]
    assert_close(
        "sharpness_precond", pre, _f64(rec["sharpness/precond"]), rtol=1e-7, atol=0
    )
    assert_close("loss", F.mse_loss(model(x), y), _f64(rec["loss"]), rtol=1e-12, atol=0)
    assert (
        abs(rec["trace/estimate"] - float(hess.trace()))
        <= 4 * rec["trace/std_err"] + 1e-8
    )
    assert rec["ck/rel_change"] > 0 and rec["monitor/seconds"] > 0


def test_schedules_and_force() -> None:
    model, x, _ = _setup()
    steps_run = {}
    for name, every in (
        ("int", 3),
        ("list", [0, 2, 5]),
        ("callable", lambda s: s in (1, 4)),
    ):
        mon = Monitor(model, x, every=every, metrics=["representations"])
        steps_run[name] = [s for s in range(7) if mon.step(s) is not None]
        assert mon.step(100, force=True) is not None
    assert steps_run == {"int": [0, 3, 6], "list": [0, 2, 5], "callable": [1, 4]}
    with pytest.raises(TypeError, match="every="):
        Monitor(model, x, every="often", metrics=["representations"])


def test_budget_plans_the_schedule_once_and_lists_what_it_leaves_out() -> None:
    model, x, _ = _setup()
    mon = Monitor(model, x, every=2, metrics=["representations"], budget_fraction=0.1)
    assert mon.step(0) is not None  # the first check always runs
    assert mon.step(1) is None and mon.step(2) is not None  # so does the second
    mon._later = {"representations": 1e3}  # pretend a check costs far more than a step
    with pytest.warns(UserWarning, match=r"running every \d+th scheduled check"):
        assert (
            mon.step(3) is None
        )  # planned here, before any scheduled step is left out
    plan = mon.budget_plan
    assert plan.stride > 1 and plan.gap == 2.0 and plan.check_steps > 1
    mon.budget_plan = replace(plan, stride=3)  # check steps 0, 6, 12
    ran = [s for s in range(4, 14) if mon.step(s) is not None]
    assert ran == [6, 12]
    assert mon.skipped_steps == [4, 8, 10] and mon.skipped == 3
    assert mon.step(13, force=True) is not None  # force always runs
    assert mon.cost().plan is mon.budget_plan
    # Without a budget every scheduled check runs.
    free = Monitor(model, x, every=2, metrics=["representations"])
    assert [s for s in range(7) if free.step(s) is not None] == [0, 2, 4, 6]
    with pytest.raises(ValueError, match="budget_fraction"):
        Monitor(model, x, budget_fraction=1.5, metrics=["representations"])


def test_plan_budget_takes_the_smallest_stride_that_fits() -> None:
    from rdiag.monitor.budget import mean_gap, plan_budget

    assert plan_budget(1.0, 0.1, 100, 0.1).stride == 1  # 10 steps of 100: 10%
    assert plan_budget(1.0, 0.1, 100, 0.05).stride == 2
    assert plan_budget(3.0, 0.1, 100, 0.1).stride == 3
    assert plan_budget(1.0, 0.1, math.inf, 0.1).stride == 1  # nothing scheduled
    assert mean_gap([0, 5, 10, 20], lambda s: s in (0, 5, 10, 20), 0) == 20 / 3


def test_sharpness_warm_start_saves_matvecs() -> None:
    model, x, y = _setup(width=16)
    kw = {"metrics": ["sharpness"], "loss_fn": F.mse_loss, "sharpness_tol": 1e-9}
    warm = Monitor(model, (x, y), **kw)
    warm.step(0)
    _train(model, x, y, 1, lr=0.05)
    hot = warm.step(1)
    cold = Monitor(model, (x, y), **kw).step(1)
    assert hot["sharpness/raw"] == pytest.approx(cold["sharpness/raw"], rel=1e-8)
    assert hot["sharpness/raw_matvecs"] < cold["sharpness/raw_matvecs"]


def test_store_records_and_bad_arguments(tmp_path) -> None:
    model, x, y = _setup()
    store = Store(tmp_path)
    rid = store.create_run({"test": 1})
    mon = Monitor(
        model,
        (x, y),
        every=2,
        metrics=["ntk", "loss", "sharpness"],
        loss_fn=F.mse_loss,
        lr_multipliers=lr_multipliers(model),
        store=store,
        run_id=rid,
        snapshots=True,
    )
    for step in range(5):
        rec = mon.step(step)
        if rec is not None:
            k_now = empirical_ntk(model, x, lr_multipliers=lr_multipliers(model))
    assert [s for s, _, _ in store.scalars(rid, "ntk/rel_change")] == [0, 2, 4]
    assert_close(
        "ntk snapshot",
        k_now,
        torch.as_tensor(store.load_array(rid, 4, "ntk")),
        rtol=1e-10,
        atol=1e-12,
    )
    vec = torch.as_tensor(store.load_array(rid, 4, "sharpness"))
    assert vec.shape == (sum(p.numel() for p in model.parameters()),)
    assert store.array_steps(rid, "sharpness_precond") == [0, 2, 4]
    assert len(mon.history) == 3 and mon.history[-1]["step"] == 4
    with pytest.raises(ValueError, match="run_id"):
        Monitor(model, x, store=store, metrics=["ntk"])
    with pytest.raises(ValueError, match="unknown"):
        Monitor(model, x, metrics=["ntk", "curvature"])
    with pytest.raises(ValueError, match="probe targets"):
        Monitor(model, x, metrics=["loss"], loss_fn=F.mse_loss)
    with pytest.raises(ValueError, match="loss_fn"):
        Monitor(model, (x, y), metrics=["sharpness"])
    with pytest.raises(ValueError, match="layers="):
        Monitor(model, x, metrics=["representations"], layers=["nope"])


def test_plain_module_uses_raw_weights() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)
    )
    net = net.double()
    x = torch.randn(4, 3, dtype=torch.float64)
    mon = Monitor(net, x, metrics=["weights", "representations", "ntk", "features"])
    w0 = net[0].weight.detach().clone()
    mon.step(0)
    with torch.no_grad():
        net[0].weight.add_(0.1)
    rec = mon.step(1)
    expected = torch.linalg.svdvals(net[0].weight.detach() - w0)[0]
    assert_close("dW_op raw", expected, _f64(rec["dW_op/0"]), rtol=1e-10, atol=0)
    assert "delta_h/0" in rec and "delta_h/2" not in rec  # read-out excluded


def test_centered_gamma_model_tracks_trained_layers_only() -> None:
    model = make_model(
        "mlp", 8, parametrization="gamma=1", seed=0, d_in=3, d_out=1
    ).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    mon = Monitor(model, x, metrics=["representations", "features", "weights"])
    assert mon.layers == ["model.readin", "model.hidden.0"]
    rec = mon.step(0)
    assert rec["f_norm"] == pytest.approx(0.0, abs=1e-12)  # centered: f0 = 0
    assert all("reference" not in str(k) for k in rec)


class _MissingLog:
    """A store double recording what the Monitor reports missing."""

    def __init__(self) -> None:
        self.logged: list = []
        self.missing: list = []

    def log(self, run_id, step, records) -> None:
        self.logged.append((step, dict(records)))

    def log_missing(self, run_id, step, missing) -> None:
        self.missing.append((step, dict(missing)))


def test_a_metric_that_cannot_be_computed_is_recorded_missing() -> None:
    model, x, y = _setup()
    same = x[:1].expand(5, -1)  # identical inputs: the centered kernel is zero
    store = _MissingLog()
    mon = Monitor(
        model,
        (same, y),
        metrics=["ntk", "loss"],
        loss_fn=F.mse_loss,
        store=store,
        run_id="r",
    )
    rec = mon.step(0)
    assert "loss" in rec and "ntk/cka" not in rec
    assert set(mon.missing) == {"ntk"} and "centered alignment" in mon.missing["ntk"]
    assert store.missing == [(0, mon.missing)]
    assert mon.step(1) is not None and store.missing[-1][0] == 1
    strict = Monitor(model, (same, y), metrics=["ntk"], strict=True)
    with pytest.raises(ValueError, match="centered alignment is undefined"):
        strict.step(0)


def test_train_mode_measures_the_whole_batch_function() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 6),
        torch.nn.BatchNorm1d(6),
        torch.nn.Tanh(),
        torch.nn.Linear(6, 2),
    ).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    rec = Monitor(net, x, metrics=["ntk"], mode="train").step(0)
    k = empirical_ntk(net, x, mode="train")
    assert_close(
        "train-mode trace", k.trace(), _f64(rec["ntk/trace"]), rtol=1e-12, atol=0
    )
    assert rec["ntk/trace"] != pytest.approx(float(empirical_ntk(net, x).trace()))
    with pytest.raises(ValueError, match="mode"):
        Monitor(net, x, metrics=["ntk"], mode="inference")
    with pytest.raises(ValueError, match="k"):
        Monitor(net, x, metrics=["ntk"], k=-1)


def test_check_probe_names_the_probe_and_the_training_batch() -> None:
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)
    )
    mon = Monitor(net, torch.randn(3, 5), metrics=["ntk"], probe_check=False)
    with pytest.raises(ValueError, match=r"\(3, 5\).*training batches are \(8, 4\)"):
        mon.check_probe(torch.randn(8, 4))
    fits = Monitor(net, (torch.randn(3, 4), torch.randn(3, 2)), loss_fn=F.mse_loss)
    fits.check_probe()
    # By default the Monitor checks its probe when it is built (issue #21).
    with pytest.raises(ValueError, match=r"probe does not fit .*\(3, 5\)"):
        Monitor(net, torch.randn(3, 5), metrics=["ntk"])
    with pytest.raises(ValueError, match=r"outputs \(3, 2\) and targets \(3, 7\)"):
        Monitor(net, (torch.randn(3, 4), torch.randn(3, 7)), loss_fn=F.mse_loss)


def test_cost_report_and_a_restored_state_keep_time_and_history() -> None:
    model, x, y = _setup()
    mon = Monitor(model, (x, y), metrics=["ntk"], budget_fraction=0.5)
    mon.step(0)
    mon.step(1)
    cost = mon.cost()
    assert cost.checks + cost.skipped == 2 and cost.seconds == mon.seconds
    assert str(cost).startswith(f"rdiag: {cost.checks} checks run")
    state = mon.state_dict()
    again = Monitor(model, (x, y), metrics=["ntk"], budget_fraction=0.5)
    again.load_state_dict(state)
    assert again.train_seconds == state["train_seconds"] > 0
    assert again.history == mon.history and again.checks == mon.checks
    again.step(2, force=True)
    assert again.train_seconds > state["train_seconds"]
    assert again.history[-1]["ntk/rel_change"] == pytest.approx(
        mon.step(2, force=True)["ntk/rel_change"]
    )


def _dense_full(model, x, mults: dict[str, float]) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    jac = per_sample_jacobian(model, names, x)
    w = torch.cat(
        [
            torch.full((p.numel(),), mults[n], dtype=torch.float64)
            for n, p in model.named_parameters()
        ]
    )
    full = ntk_from_jacobians(jac, jac, w)
    n, _, o, _ = full.shape
    return full.permute(0, 2, 1, 3).reshape(n * o, n * o)


def test_ntk_moments_on_a_large_probe_are_within_their_error_bars() -> None:
    model, x, y = _setup(width=16)
    big = torch.randn(40, 3, generator=torch.Generator().manual_seed(3)).double()
    mults = lr_multipliers(model)
    kw = dict(
        metrics=["ntk_moments"],
        lr_multipliers=mults,
        moments_probe=big,
        moments_matvecs=400,
        strict=True,
    )
    mon = Monitor(model, (x, y), **kw)
    blocked = Monitor(model, (x, y), moments_block_size=7, **kw)
    k0 = _dense_full(model, big, mults)
    first = mon.step(0)
    assert "ntk_moments/rel_change" not in first
    assert_close(
        "blocked products",
        _f64(first["ntk_moments/trace"]),
        _f64(blocked.step(0)["ntk_moments/trace"]),
        rtol=1e-10,
        atol=0,
    )
    _train(model, x, y, steps=5, lr=2.0)
    k1 = _dense_full(model, big, mults)
    later = mon.step(5)
    exact = {
        "trace": float(k1.trace()),
        "frobenius": float(k1.norm()),
        "eff_rank": float(k1.trace() ** 2 / k1.pow(2).sum()),
        "rel_change": float((k1 - k0).norm() / k0.norm()),
    }
    for stat, value in exact.items():
        est, se = later[f"ntk_moments/{stat}"], later[f"ntk_moments/{stat}_se"]
        assert 0 < se < 0.2 * abs(value), (stat, est, se, value)
        assert abs(est - value) < 4 * se, (stat, est, se, value)
    # A resumed Monitor measures the change from the same reference.
    resumed = Monitor(model, (x, y), **kw)
    resumed.load_state_dict(mon.state_dict())
    again = resumed.step(5)
    assert again["ntk_moments/rel_change"] == pytest.approx(
        later["ntk_moments/rel_change"], rel=1e-12
    )
    with pytest.raises(ValueError, match="moments_matvecs"):
        Monitor(model, (x, y), metrics=["ntk_moments"], moments_matvecs=0)


def test_the_monitors_sharpness_follows_in_place_edits_through_data() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    probe = (
        torch.randn(8, 4, dtype=torch.float64),
        torch.randn(8, 2, dtype=torch.float64),
    )

    def sharpness(monitor: Monitor, step: int) -> float:
        return monitor.step(step, force=True)["sharpness/raw"]

    kept = Monitor(net, probe, metrics=["sharpness"], loss_fn=F.mse_loss, strict=True)
    sharpness(kept, 0)
    with torch.no_grad():
        for p in net.parameters():
            p.data.mul_(2.0)
    fresh = Monitor(net, probe, metrics=["sharpness"], loss_fn=F.mse_loss, strict=True)
    expected = sharpness(fresh, 1)
    assert sharpness(kept, 1) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every": []}, "at least one step"),
        ({"every": [0, -1]}, "each step of every= to be an int >= 0"),
        ({"every": [0, 1.5]}, "each step of every= to be an int >= 0"),
        ({"metrics": []}, "at least one metric"),
    ],
)
def test_a_schedule_or_metrics_that_measure_nothing_are_refused(kwargs, message):
    net = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=message):
        Monitor(net, torch.randn(4, 3), **{"metrics": ["ntk"], **kwargs})


def test_steps_going_backwards_are_refused():
    mon = Monitor(torch.nn.Linear(3, 2), torch.randn(4, 3), metrics=["ntk"])
    mon.step(5)
    with pytest.raises(ValueError, match="step 3 after step 5"):
        mon.step(3)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_sharpness_tracks_to_its_tolerance_certified_by_the_residual(optimizer) -> None:
    """Default tolerance (3e-4 relative) at every=100 of ordinary training (plain
    SGD, Adam): cold <= 15 products, warm <= 10 (9 before the eigenvalue criterion
    required a converged neighbour to vouch for the gap); each value within its
    recorded Ritz residual of the dense Hessian's top eigenvalue (a rigorous bound)
    and within 1e-3 relative (measured: 6e-8 to 9e-5)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32),
        torch.nn.Tanh(), torch.nn.Linear(32, 3),
    ).double()  # fmt: skip
    x = torch.randn(64, 8, dtype=torch.float64)
    y = torch.randn(64, 3, dtype=torch.float64)
    mon = Monitor(model, (x, y), every=100, metrics=["sharpness"], loss_fn=F.mse_loss)
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.1)
        if optimizer == "sgd"
        else torch.optim.Adam(model.parameters(), lr=1e-3)
    )
    names = [n for n, _ in model.named_parameters()]
    for step in range(301):
        rec = mon.step(step)
        if rec is not None:
            hess = dense_hessian(model, names, F.mse_loss, x, y)
            top = float(dense_eigh(hess)[0][0])
            err = abs(rec["sharpness/raw"] - top)
            assert err <= rec["sharpness/raw_residual"] * (1 + 1e-9)
            assert err <= 1e-3 * top
            assert rec["sharpness/raw_matvecs"] <= (15 if step == 0 else 10), step
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    assert mon.checks == 4


def test_per_step_sharpness_tracking_into_the_edge_of_stability() -> None:
    """Full-batch GD at lr = 2 / (1.4 lambda_max(0)): progressive sharpening past
    2 / lr and a catapult, a check every step at the default tolerance, each value
    within 1e-3 of the dense Hessian's top eigenvalue (measured at most 1.4e-5)
    and within its recorded Ritz residual. Products per step after the first:
    measured 6.0 with the eigenvalue criterion that asks a converged neighbour to
    vouch for the gap (2.8 with the Ritz gap alone, then errors up to 9.5e-4);
    issue #23's target is 3."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 24), torch.nn.Tanh(), torch.nn.Linear(24, 2)
    ).double()
    x = torch.randn(48, 6, dtype=torch.float64)
    y = torch.randn(48, 2, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    mon = Monitor(model, (x, y), every=1, metrics=["sharpness"], loss_fn=F.mse_loss)
    lr = None
    products, tops = [], []
    for step in range(80):
        rec = mon.step(step)
        top = float(dense_eigh(dense_hessian(model, names, F.mse_loss, x, y))[0][0])
        err = abs(rec["sharpness/raw"] - top)
        assert err <= rec["sharpness/raw_residual"] * (1 + 1e-9), step
        assert err <= 1e-3 * top, step
        tops.append(top)
        if lr is None:
            lr = 2 / (1.4 * top)
        else:
            products.append(rec["sharpness/raw_matvecs"])
        model.zero_grad()
        F.mse_loss(model(x), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
    assert max(tops) > 2 / lr  # it reached the edge of stability
    assert sum(products) / len(products) <= 6.5, products
