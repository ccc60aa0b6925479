"""Harness: train, config errors, sweeps (resume, kill + resume, executors)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rdiag.harness import TrainConfig, expand_grid, load_sweep_config, sweep, train
from rdiag.store import Store

TINY = {
    "width": 8,
    "depth": 3,
    "steps": 4,
    "every": 2,
    "lr": 0.1,
    "optimizer": "gd",
    "batch_size": 8,
    "data_options": {"n_train": 16, "n_test": 8, "dim": 3},
    "probe_size": 4,
    "metrics": ["ntk", "representations", "weights", "loss"],
}


def _steps(store: Store, rid: str, metric: str) -> list[int]:
    return [s for s, _, _ in store.scalars(rid, metric)]


def test_train_writes_monitor_and_losses(tmp_path) -> None:
    result = train(TINY, store=tmp_path, param="r=0.5")
    store = Store(tmp_path)
    assert result.status == "finished" and store.status(result.run_id) == "finished"
    assert _steps(store, result.run_id, "train_loss") == [0, 1, 2, 3]
    assert _steps(store, result.run_id, "ntk_rel_change") == [0, 2, 4]
    assert store.config(result.run_id)["param"] == "r=0.5"
    again = train(TINY, store=tmp_path, param="r=0.5")
    assert again.status == "skipped" and again.run_id == result.run_id


@pytest.mark.parametrize(
    "overrides",
    [
        {"optimizer": "adam", "metrics": ["sharpness", "loss"]},
        {"optimizer": "online", "batch_size": 4},
        {
            "optimizer": "sgd",
            "batch_size": 4,
            "loss": "mse",
            "data_options": {
                "n_train": 16,
                "n_test": 8,
                "dim": 3,
                "task": "classification",
                "outputs": 3,
            },
            "metrics": ["loss", "accuracy", "ntk", "features"],
        },
        {
            "model": "transformer",
            "data": "sequences",
            "width": 8,
            "depth": 1,
            "data_options": {"n_train": 8, "n_test": 4, "vocab": 5, "seq_len": 3},
            "metrics": ["loss", "accuracy", "representations", "ntk"],
        },
    ],
    ids=["adam", "online", "sgd-classification", "transformer"],
)
def test_train_optimizers_and_families(tmp_path, overrides: dict) -> None:
    result = train({**TINY, **overrides}, store=tmp_path)
    store = Store(tmp_path)
    assert result.status == "finished"
    assert _steps(store, result.run_id, "loss") == [0, 2, 4]


def test_cnn_on_images(tmp_path) -> None:
    pytest.importorskip("sklearn")
    cfg = {
        **TINY,
        "model": "cnn",
        "depth": 1,
        "data": "digits",
        "width": 4,
        "data_options": {"flatten": False},
        "metrics": ["loss", "accuracy"],
    }
    assert train(cfg, store=tmp_path).status == "finished"


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"widht": 3}, "unknown config field.*'widht'.*allowed fields"),
        ({"model": "resnet"}, "model to be one of \\['mlp', 'cnn', 'transformer'\\]"),
        ({"optimizer": "lbfgs"}, "optimizer to be one of"),
        ({"param": "r=0.7"}, "bad config field 'param'.*r in \\[0, 1/2\\]"),
        ({"width": 0}, "'width' to be a positive int"),
        ({"lr": -1}, "'lr' to be a finite number > 0"),
        ({"metrics": ["ntk", "magic"]}, "bad config field 'metrics'"),
        ({"model": "cnn"}, "model 'cnn' needs square images"),
        ({"loss": "ce"}, "'ce' needs classification data"),
    ],
)
def test_bad_configs_name_the_field(tmp_path, cfg: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        train({**TINY, **cfg}, store=tmp_path)


def test_bad_data_path(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="CIFAR-10 directory"):
        train(
            {
                **TINY,
                "data": "cifar10",
                "data_options": {"root": str(tmp_path / "nope")},
            },
            store=tmp_path / "s",
        )


def test_sweep_grid_and_config_errors(tmp_path) -> None:
    cfgs = expand_grid(
        {"base": TINY, "grid": {"r": [0, 0.5], "width": [8, 16], "seed": [0, 1]}}
    )
    assert len(cfgs) == 8 and {c.param for c in cfgs} == {"r=0", "r=0.5"}
    default = load_sweep_config("default")
    assert len(expand_grid(default)) >= 3 * 4 * 2
    widths = default["grid"]["width"]
    assert max(widths) / min(widths) >= 16 and default["base"]["steps"] >= 10
    with pytest.raises(ValueError, match="unknown sweep config key"):
        load_sweep_config({"bsae": {}})
    with pytest.raises(ValueError, match="grid.width to be a non-empty list"):
        load_sweep_config({"grid": {"width": 8}})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sweep_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: [unclosed")
    with pytest.raises(ValueError, match="could not parse"):
        load_sweep_config(bad)


def test_sweep_resumes_without_duplicates_and_takes_an_executor(tmp_path) -> None:
    config = {"base": TINY, "grid": {"r": [0, 0.5], "width": [8, 16]}, "report": False}
    with cf.ThreadPoolExecutor(2) as pool:
        first = sweep(config, out=tmp_path, executor=pool)
    assert first.count("finished") == 4
    store = Store(tmp_path)
    rows = store.count()
    second = sweep(config, out=tmp_path)
    assert second.count("skipped") == 4 and store.count() == rows


_KILLED_SWEEP = """
import json, sys
from rdiag.harness import sweep
if __name__ == "__main__":
    sweep(json.loads(sys.argv[1]), out=sys.argv[2], workers=1)
"""


def test_killed_sweep_resumes_with_no_lost_or_duplicated_rows(tmp_path) -> None:
    base = {**TINY, "steps": 12, "every": 4}
    config = {
        "base": base,
        "grid": {"width": [8, 12, 16], "seed": [0, 1]},
        "report": False,
    }
    script = tmp_path / "run_sweep.py"
    script.write_text(textwrap.dedent(_KILLED_SWEEP))
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(script), json.dumps(config), str(out)],
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if (out / "rdiag.sqlite").exists() and len(
                Store(out).run_ids("finished")
            ) >= 1:
                break
        assert proc.poll() is None, "the sweep finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    store = Store(out)
    finished_before = store.run_ids("finished")
    assert 1 <= len(finished_before) < 6
    complete = store.count(
        finished_before[0]
    )  # rows of a run that was never interrupted
    resumed = sweep(config, out=out, workers=2)  # also exercises the process pool
    assert resumed.count("skipped") == len(finished_before)
    assert resumed.count("finished") == 6 - len(finished_before)
    ids = store.run_ids()
    assert len(ids) == 6 and store.count() == 6 * complete
    for rid in ids:
        assert store.status(rid) == "finished" and store.count(rid) == complete
        assert _steps(store, rid, "train_loss") == list(range(12))
        assert _steps(store, rid, "ntk_rel_change") == [0, 4, 8, 12]
        assert [s for s, _, _ in store.scalars(rid, "delta_h", "readin")] == [
            0,
            4,
            8,
            12,
        ]
    assert TrainConfig.from_dict(store.config(ids[0])).width in (8, 12, 16)


def test_device_field(tmp_path) -> None:
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="bad config field 'device'"):
            train({**TINY, "device": "cuda"}, store=tmp_path)
    result = train({**TINY, "device": "auto", "steps": 2}, store=tmp_path)
    assert result.status == "finished"
    with pytest.raises(ValueError, match="device to be one of"):
        train({**TINY, "device": "tpu"}, store=tmp_path)


def test_sweep_fails_fast_on_a_run_error(tmp_path) -> None:
    config = {
        "base": {**TINY, "model": "cnn"},
        "grid": {"seed": [0, 1, 2]},
        "report": False,
    }
    with pytest.raises(ValueError, match="model 'cnn' needs square images"):
        sweep(config, out=tmp_path)
    assert Store(tmp_path).run_ids("finished") == []


def test_ray_executor(tmp_path) -> None:
    import importlib.util

    from rdiag.harness import RayExecutor

    if importlib.util.find_spec("ray") is None:
        with pytest.raises(ImportError, match=r"pip install 'rdiag\[ray\]'"):
            RayExecutor()
        return
    config = {"base": TINY, "grid": {"seed": [0, 1]}, "report": False}
    assert sweep(config, out=tmp_path, executor=RayExecutor()).count("finished") == 2


def test_sweep_overrides_replace_r_with_param(tmp_path) -> None:
    config = {
        "base": {**TINY, "steps": 1, "every": 1, "metrics": ["loss"]},
        "grid": {"r": [0, 0.25]},
        "report": False,
    }
    result = sweep(
        config,
        out=tmp_path,
        overrides={"grid": {"param": ["mup", "ntk"]}, "base": {"width": 12}},
    )
    store = Store(tmp_path)
    params = sorted(store.config(r.run_id)["param"] for r in result.results)
    assert params == ["mup", "ntk"]
    assert {store.config(r.run_id)["width"] for r in result.results} == {12}
