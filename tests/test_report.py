"""Report: fits recover known power laws from a store; HTML, figures and summary.json."""

from __future__ import annotations

import base64
import html
import json
import math
import sqlite3

import pytest

from rdiag.report import build_report, fits
from rdiag.runs.store import Store

pytest.importorskip("matplotlib")
pytest.importorskip("pandas")

WIDTHS = (16, 32, 64, 128, 256)


def _previous_release_log(store: Store, run_id: str, step: int, records) -> None:
    """Write records as the release before this one did: its metric names, verbatim."""
    rows = [
        (run_id, step, *((key, "") if isinstance(key, str) else key), value)
        for key, value in records.items()
    ]
    with sqlite3.connect(store.db_path) as conn:
        conn.executemany("INSERT INTO scalars VALUES (?, ?, ?, ?, ?)", rows)


def _synthetic_store(
    root, noise: float = 0.0, key: str = "parametrization", previous: bool = False
) -> Store:
    """Records that follow the predicted power laws exactly (times a seed factor).

    The records are keyed as the release before this one keyed them; ``key="param"``
    writes the configs as it did, and ``previous=True`` writes the records into the
    database as it did (its metric names), instead of through ``Store.log``.
    """
    store = Store(root)
    log = (lambda *a: _previous_release_log(store, *a)) if previous else store.log
    for param, r in (("r=0", 0.0), ("r=0.5", 0.5)):
        for width in WIDTHS:
            for seed in (0, 1):
                cfg = {
                    "model": "mlp",
                    key: param,
                    "width": width,
                    "seed": seed,
                    "lr": 0.25,
                    "steps": 10,
                }
                rid = store.create_run(cfg, seed=seed)
                wobble = 1 + noise * (1 if (seed + width // 16) % 2 else -1)
                log(
                    rid,
                    0,
                    {
                        "f_norm": 3.0 * width**-r,
                        ("ntk_eig", "0"): 5.0,
                        "sharpness_precond": 4.0,
                        "train_loss": 1.0,
                        ("delta_h", "h1"): 0.0,
                        "ntk_rel_change": 0.0,
                    },
                )
                log(
                    rid,
                    10,
                    {
                        ("delta_h", "h1"): 0.7 * width**r * wobble,
                        ("delta_h", "h2"): 0.2 * width**r,
                        "ntk_rel_change": 2.0 * width ** (2 * r - 1) * wobble,
                        ("dW_rel", "h1"): width ** (r - 0.5),
                        ("ntk_eig", "0"): 6.0,
                        "sharpness_precond": 7.5,
                        "train_loss": 0.1,
                    },
                )
                store.set_status(rid, "finished")
    return store


@pytest.mark.parametrize("key", ["parametrization", "param"])
def test_fits_recover_exponents_and_predictions(tmp_path, key: str) -> None:
    store = _synthetic_store(tmp_path, key=key)
    found = {(f["metric"], f["layer"], f["parametrization"]): f for f in fits(store)}
    expected = {
        "delta_h": lambda r: r,
        "ntk_rel_change": lambda r: 2 * r - 1,
        "dW_rel": lambda r: r - 0.5,
        "f0": lambda r: -r,
    }
    for (metric, layer, param), f in found.items():
        r = f["r"]
        assert f["slope"] == pytest.approx(expected[metric](r), abs=1e-9), (
            metric,
            layer,
            param,
        )
        assert f["predicted"] == pytest.approx(expected[metric](r), abs=1e-12)
        assert f["widths"] == list(WIDTHS) and f["seeds"] == 2
        assert set(f) >= {
            "metric",
            "layer",
            "parametrization",
            "r",
            "slope",
            "ci",
            "predicted",
        }
    assert ("delta_h", "h2", "r=0.5") in found and (
        "ntk_rel_change",
        None,
        "r=0",
    ) in found
    assert ("f0", None, "r=0.5") in found and len(found) == 10


@pytest.mark.slow
def test_a_store_of_the_previous_release_reads_and_reports_the_same(tmp_path) -> None:
    old = _synthetic_store(tmp_path / "old", noise=0.05, key="param", previous=True)
    new = _synthetic_store(tmp_path / "new", noise=0.05, key="param")
    assert {m for (m,) in old._read("SELECT DISTINCT metric FROM scalars")} >= {
        "ntk_rel_change",
        "ntk_eig",
        "train_loss",
    }
    rid = old.run_ids()[0]
    assert old.scalars(rid, "ntk/rel_change") == new.scalars(
        new.run_ids()[0], "ntk/rel_change"
    )
    assert [la for _, la, _ in old.scalars(rid, "ntk/eig/0")] == ["0", "0"]
    assert (
        set(old.query(config=False)["metric"])
        == set(new.query(config=False)["metric"])
        >= {"ntk/rel_change", "ntk/eig", "sharpness/precond", "train/loss", "delta_h"}
    )
    assert len(old.query("train/loss")) == 40
    old_paths = build_report(old, tmp_path / "old_out")
    new_paths = build_report(new, tmp_path / "new_out")
    summary = json.loads(old_paths["summary"].read_text())
    assert summary["fits"] == json.loads(new_paths["summary"].read_text())["fits"]
    assert len(summary["fits"]) == 10 and set(old_paths) == set(new_paths)


def test_rerunning_a_run_of_an_old_store_replaces_its_old_rows(tmp_path) -> None:
    store = Store(tmp_path)
    rid = store.create_run({"width": 8})
    _previous_release_log(store, rid, 0, {"ntk_rel_change": 0.5, ("delta_h", "h"): 1.0})
    store.log(rid, 0, {"ntk/rel_change": 0.25, "delta_h/h": 2.0})
    assert store.count(rid) == 2
    assert store.scalars(rid, "ntk/rel_change") == [(0, "", 0.25)]


def test_build_report_writes_self_contained_html(tmp_path) -> None:
    store = _synthetic_store(tmp_path / "store", noise=0.05)
    paths = build_report(store, tmp_path / "out")
    page = paths["html"].read_text()
    assert page.count('src="data:image/png;base64,') == 5
    start = page.index("base64,") + len("base64,")
    png = base64.b64decode(page[start : page.index('"', start)])
    assert png.startswith(b"\x89PNG")
    summary = json.loads(paths["summary"].read_text())
    kinds = {f["metric"] for f in summary["fits"]}
    assert {"delta_h", "ntk_rel_change"} <= kinds
    for f in summary["fits"]:
        lo, hi = f["ci"]
        assert lo <= f["slope"] <= hi and not math.isnan(lo)
        assert f"{f['slope']:+.3f}" in page
    assert summary["runs"]["finished"] == 20
    for key in (
        "kernel_movement",
        "coord_check",
        "sharpness",
        "ntk_eigenvalues",
        "loss",
    ):
        assert paths[key].is_file()


def test_report_needs_finished_runs(tmp_path) -> None:
    store = Store(tmp_path)
    with pytest.raises(ValueError, match="no records"):
        build_report(store, tmp_path / "out")
    rid = store.create_run({"param": "r=0", "width": 8, "seed": 0})
    store.log(rid, 0, {"loss": 1.0})
    with pytest.raises(ValueError, match="no finished runs"):
        build_report(store, tmp_path / "out")


def test_report_of_a_bare_monitor_run(tmp_path) -> None:
    import torch

    from rdiag.monitor import Monitor

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    )
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    store = Store(tmp_path / "s")
    rid = store.create_run({"note": "my own loop"})
    mon = Monitor(
        net,
        (x, y),
        metrics=["ntk", "loss"],
        loss_fn=torch.nn.functional.mse_loss,
        store=store,
        run_id=rid,
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(3):
        mon.step(step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    store.set_status(rid, "finished")
    paths = build_report(store, tmp_path / "out")
    summary = json.loads(paths["summary"].read_text())
    assert summary["fits"] == [] and "ntk_eigenvalues" in paths


def test_two_width_fit_has_no_interval_and_strict_json(tmp_path) -> None:
    store = Store(tmp_path / "s")
    for width in (8, 16):
        rid = store.create_run({"param": "r=0.5", "width": width, "seed": 0, "lr": 0.1})
        store.log(rid, 5, {("delta_h", "h"): width**0.5})
        store.set_status(rid, "finished")
    paths = build_report(store, tmp_path / "out")
    text = paths["summary"].read_text()
    assert "NaN" not in text
    (fit,) = json.loads(text)["fits"]
    assert fit["ci"] == [None, None] and fit["slope"] == pytest.approx(0.5)
    assert "n/a (2 points)" in paths["html"].read_text()


def test_report_lists_failed_runs_and_why(tmp_path) -> None:
    store = _synthetic_store(tmp_path / "store")
    cfg = {"param": "r=0.5", "width": 64, "seed": 0, "lr": 8.0, "steps": 10}
    rid = store.create_run(cfg, seed=0)
    store.log(rid, 0, {"train_loss": 1.0, "f_norm": float("nan")})
    store.set_status(rid, "failed", "diverged at step 7: training loss <b>inf</b>")
    paths = build_report(store, tmp_path / "out")
    summary = json.loads(paths["summary"].read_text())
    assert summary["runs"]["failed"] == 1
    assert summary["failed"] == [
        {
            "run": rid,
            "reason": "diverged at step 7: training loss <b>inf</b>",
            "config": {"param": "r=0.5", "width": 64, "seed": 0, "lr": 8.0},
        }
    ]
    page = paths["html"].read_text()
    assert "Failed runs (1)" in page and "param=r=0.5 width=64 seed=0 lr=8.0" in page
    assert "training loss &lt;b&gt;inf&lt;/b&gt;" in page


# ---- the richness meter's section ----------------------------------------------------
def _tiny_meter():
    import torch.nn.functional as F

    from rdiag.meter import richness_meter
    from tests.models import METER_RULE, meter_batch, meter_mlp

    return richness_meter(
        meter_mlp,
        METER_RULE,
        meter_batch(),
        F.mse_loss,
        widths=[16, 32, 64],
        steps=2,
        seeds=3,
        ntk=False,
    )


@pytest.mark.slow
def test_a_meter_beside_the_store_is_in_its_report(tmp_path) -> None:
    store = _synthetic_store(tmp_path / "store")
    meter = _tiny_meter()
    meter.save(tmp_path / "store")
    paths = build_report(store, tmp_path / "out")
    page = paths["html"].read_text()
    assert page.count('src="data:image/png;base64,') == 6 and paths["meter"].is_file()
    section = page[page.index("<h2>Richness meter</h2>") :]
    assert html.escape(meter.verdict) in section
    lo, hi = meter.interval
    assert f"r_hat = {meter.r:.3f}, 95% interval [{lo:.2f}, {hi:.2f}]" in section
    for d in meter.layers:
        assert f"<tr><td>{d.name}</td><td>{d.role}</td><td>" in section
    summary = json.loads(paths["summary"].read_text())
    assert summary["meter"]["verdict"] == meter.verdict
    assert summary["figures"]["meter"] == "figures/meter.png"


def test_meter_section_rows_name_problems_violations_and_fixes(tmp_path) -> None:
    from rdiag.report import build_meter_report, load_meter

    payload = _tiny_meter().to_dict()
    violation = "||dW||_op/||W_0||_op ~ n^+1.00, the scale at r = 0.50 needs n^+0.00"
    fixes = ["learning rate x (n/16)^-1.00 (its rate ~ n^+1.00 -> n^+0.00)", "b < c"]
    payload["layers"][1].update(problem="unstable", violations=[violation], fixes=fixes)
    payload["verdict"] = "off the scale: unstable, layer 2 (<b>)"
    (tmp_path / "meter.json").write_text(json.dumps(payload))
    paths = build_meter_report(tmp_path, tmp_path)
    page = paths["html"].read_text()
    assert "off the scale: unstable, layer 2 (&lt;b&gt;)" in page
    row = (
        f"<tr><td>2</td><td>hidden</td><td>unstable</td><td>{html.escape(violation)}"
        f"</td><td>{html.escape(fixes[0])}<br>b &lt; c</td></tr>"
    )
    assert row in page
    assert "<tr><td>0</td><td>readin</td><td>ok</td><td></td><td></td></tr>" in page
    assert paths["figure"].read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="to be a meter.json"):
        (tmp_path / "other.json").write_text("[1, 2]")
        load_meter(tmp_path / "other.json")
    with pytest.raises(FileNotFoundError, match="no richness meter result"):
        load_meter(tmp_path / "none")


def test_report_opens_with_each_prediction_s_verdict(tmp_path) -> None:
    """Verdicts as the coordinate check's (verdicts.judge), failures first in the page."""
    from rdiag.verdicts import VERDICTS, judge

    store = _synthetic_store(tmp_path / "store", noise=0.05)
    for width in WIDTHS:  # a group whose hidden representation moves like n^0.9
        for seed in (0, 1, 2):
            cfg = {"model": "mlp", "parametrization": "r=0.25", "width": width}
            rid = store.create_run({**cfg, "seed": seed, "lr": 0.25, "steps": 10})
            store.log(rid, 0, {("delta_h", "h1"): 0.0})
            wobble = 1 + 0.02 * (seed - 1)
            store.log(rid, 10, {("delta_h", "h1"): 0.5 * width**0.9 * wobble})
            store.set_status(rid, "finished")
    paths = build_report(store, tmp_path / "out")
    summary = json.loads(paths["summary"].read_text())
    judged = {
        (f["metric"], f["layer"], f["parametrization"]): f for f in summary["fits"]
    }
    for f in judged.values():
        assert f["verdict"] in VERDICTS and f["reason"]
        ci = [math.nan if c is None else c for c in f["ci"]]
        again = judge({**f, "ci": ci}, r=f["r"], steps=10, lr=0.25)
        assert (again["verdict"], again["reason"]) == (f["verdict"], f["reason"])
    bad = judged[("delta_h", "h1", "r=0.25")]
    assert bad["verdict"] == "fail" and "beyond the tolerance" in bad["reason"]
    assert judged[("delta_h", "h1", "r=0.5")]["verdict"] == "pass"
    assert judged[("ntk_rel_change", None, "r=0")]["verdict"] == "pass"
    counts = summary["verdicts"]
    # dW_rel over 16..256: a tolerance of 0.30 cannot resolve r in steps of 1/4
    assert judged[("dW_rel", "h1", "r=0")]["verdict"] == "inconclusive"
    assert counts == {"pass": 8, "fail": 1, "inconclusive": 2, "no prediction": 0}
    page = paths["html"].read_text()
    verdicts = page.index("<h2>Verdicts</h2>")
    assert verdicts < page.index("<h2>Fitted width exponents</h2>") < page.index("<img")
    assert "1 fail, 2 inconclusive, 8 pass, of 11 predictions." in page
    rows = page[verdicts:].split('<tr class="')[1:]
    order = ["fail"] + ["inconclusive"] * 2 + ["pass"] * 8
    assert [r.split('"')[0] for r in rows] == order
    assert html.escape(bad["reason"]) in rows[0]


def test_a_malformed_meter_json_is_named(tmp_path) -> None:
    from rdiag.report import load_meter

    bad = tmp_path / "meter.json"
    bad.write_text('{"verdict": "mup", "layers": [')
    with pytest.raises(ValueError, match=f"could not read .* {bad}"):
        load_meter(tmp_path)
