"""Record names: flat strings everywhere, split into the store's columns, old keys read."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rdiag import records as R
from rdiag.models import make_model
from rdiag.monitor import METRICS, Monitor
from rdiag.predictions import records_from_checks
from rdiag.runs.store import Store


def _monitor(**kw) -> tuple[Monitor, torch.nn.Module]:
    model = make_model("mlp", 6, parametrization="mup", seed=0, d_in=3, d_out=2)
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    metrics = [m for m in METRICS if m != "accuracy"]
    mon = Monitor(model, (x, y), metrics=metrics, loss_fn=F.mse_loss, **kw)
    return mon, model


def test_every_monitor_record_is_a_flat_name_that_splits_back() -> None:
    mon, _ = _monitor()
    rec = mon.step(0)
    assert all(isinstance(k, str) for k in rec)
    for key in rec:
        metric, layer = R.split(key)
        assert R.name(metric, layer) == key
        assert bool(layer) == (metric in R.PER_LAYER), key
    assert {
        "ntk/rel_change",
        "ntk/eig/0",
        "delta_h/hidden.0",
        "sharpness/precond",
        "ntk_layers/trace/readout",
        R.MONITOR_SECONDS,
    } <= set(rec)
    parts = [key.split("/") for key in rec]
    groups = {"/".join(p[:i]) for p in parts for i in range(1, len(p))}
    assert not groups & set(rec), "a record name is also the group of others"
    assert R.split("ntk/eig/0") == ("ntk/eig", "0")
    assert R.split("dW_op/blocks.0.attn") == ("dW_op", "blocks.0.attn")
    assert R.split("my/own/metric") == ("my/own/metric", "")


def test_history_holds_the_current_names_only() -> None:
    mon, _ = _monitor()
    mon.step(0)
    rec = mon.history[0]
    assert "ntk/rel_change" in rec and ("ntk_rel_change", "") not in rec
    assert "sharpness_precond" not in rec and rec.get(("ntk_eig", "0")) is None
    with pytest.raises(KeyError):
        rec[("ntk_rel_change", "")]


def test_store_takes_old_keys_and_record_names(tmp_path) -> None:
    store = Store(tmp_path)
    rid = store.create_run({"a": 1})
    store.log(rid, 0, {("ntk_rel_change", ""): 0.5, "sharpness_precond": 2.0})
    store.log(rid, 1, {"ntk/rel_change": 0.25, "delta_h/hidden.0": 3.0})
    assert store.scalars(rid, "ntk/rel_change") == [(0, "", 0.5), (1, "", 0.25)]
    assert store.scalars(rid, "sharpness/precond") == [(0, "", 2.0)]
    assert store.scalars(rid, "delta_h") == [(1, "hidden.0", 3.0)]
    assert store.scalars(rid, "delta_h/hidden.0") == [(1, "hidden.0", 3.0)]


def test_predicted_records_read_the_same_from_old_and_new_keys() -> None:
    new = {"delta_h/readin": 2.0, "ntk/rel_change": 0.1, "f_norm": 1.5}
    old = {("delta_h", "readin"): 2.0, ("ntk_rel_change", ""): 0.1, "f_norm": 1.5}
    roles = {"readin": "readin"}
    assert records_from_checks(old, old, roles) == records_from_checks(new, new, roles)
    assert {r["metric"] for r in records_from_checks(new, new, roles)} == {
        "delta_h",
        "ntk_rel_change",
        "f0",
    }
