"""Harness: train, failed and diverged runs, config errors, sweeps (resume, claims,
executors, progress); kill -9 and resume are in test_faults.py."""

from __future__ import annotations

import concurrent.futures as cf

import pytest
import torch

from rdiag.runs.config import TrainConfig, expand_grid, load_sweep_config
from rdiag.runs.sweep import sweep
from rdiag.runs.training import train
from rdiag.runs.store import Store

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
    result = train(TINY, store=tmp_path, parametrization="r=0.5")
    store = Store(tmp_path)
    assert result.status == "finished" and store.status(result.run_id) == "finished"
    assert _steps(store, result.run_id, "train/loss") == [0, 1, 2, 3]
    assert _steps(store, result.run_id, "ntk/rel_change") == [0, 2, 4]
    assert store.config(result.run_id)["parametrization"] == "r=0.5"
    again = train(TINY, store=tmp_path, parametrization="r=0.5")
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
            "family": "transformer",
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
        "family": "cnn",
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
        (
            {"family": "resnet"},
            "family to be one of \\['mlp', 'resmlp', 'cnn', 'transformer', 'bn_mlp'\\]",
        ),
        ({"optimizer": "lbfgs"}, "optimizer to be one of"),
        (
            {"parametrization": "r=0.7"},
            "bad config field 'parametrization'.*r in \\[0, 1/2\\]",
        ),
        ({"width": 0}, "'width' to be a positive int"),
        ({"lr": -1}, "'lr' to be a finite number > 0"),
        ({"metrics": ["ntk", "magic"]}, "bad config field 'metrics'"),
        ({"family": "cnn"}, "family 'cnn' needs square images"),
        ({"loss": "cross_entropy"}, "'cross_entropy' needs classification data"),
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
    assert len(cfgs) == 8 and {c.parametrization for c in cfgs} == {"r=0", "r=0.5"}
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


def test_device_field(tmp_path) -> None:
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="bad config field 'device'"):
            train({**TINY, "device": "cuda"}, store=tmp_path)
    result = train({**TINY, "device": "auto", "steps": 2}, store=tmp_path)
    assert result.status == "finished"
    with pytest.raises(ValueError, match="device to be one of"):
        train({**TINY, "device": "tpu"}, store=tmp_path)


def test_a_run_that_raises_fails_with_its_reason_and_the_sweep_goes_on(
    tmp_path,
) -> None:
    config = {
        "base": {**TINY, "metrics": ["loss"]},
        "grid": {"family": ["cnn", "mlp"], "seed": [0, 1]},
        "report": False,
    }
    result = sweep(config, out=tmp_path)
    store = Store(tmp_path)
    assert result.count("failed") == 2 and result.count("finished") == 2
    for r in result.results:
        if r.status == "failed":
            assert "ValueError: family 'cnn' needs square images" in r.reason
            assert store.reason(r.run_id) == r.reason
            assert store.status(r.run_id) == "failed"


def test_ray_executor_without_ray_says_how_to_install(monkeypatch) -> None:
    # With Ray installed, tests/test_ray.py runs sweeps on a local cluster.
    import sys

    from rdiag.runs.ray_executor import RayExecutor

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'rdiag\[ray\]'"):
        RayExecutor()


def test_sweep_overrides_replace_r_with_param(tmp_path) -> None:
    config = {
        "base": {**TINY, "steps": 1, "every": 1, "metrics": ["loss"]},
        "grid": {"r": [0, 0.25]},
        "report": False,
    }
    result = sweep(
        config,
        out=tmp_path,
        overrides={"grid": {"parametrization": ["mup", "ntk"]}, "base": {"width": 12}},
    )
    store = Store(tmp_path)
    params = sorted(store.config(r.run_id)["parametrization"] for r in result.results)
    assert params == ["mup", "ntk"]
    assert {store.config(r.run_id)["width"] for r in result.results} == {12}


def test_a_diverging_run_fails_with_its_reason_and_keeps_its_records(tmp_path) -> None:
    result = train({**TINY, "lr": 1e4, "steps": 8}, store=tmp_path)
    store = Store(tmp_path)
    assert result.status == "failed" == store.status(result.run_id)
    assert result.reason.startswith("diverged at step ")
    assert store.reason(result.run_id) == result.reason
    step = int(result.reason.split()[3].rstrip(":"))
    assert _steps(store, result.run_id, "train/loss") == list(range(step + 1))
    # The diverged state was not measured: no Monitor record after the last check.
    assert max(_steps(store, result.run_id, "loss")) < step


def test_divergence_factor_bounds_the_loss_and_is_validated(tmp_path) -> None:
    cfg = {**TINY, "lr": 30.0, "steps": 6, "metrics": ["loss"]}
    assert train({**cfg, "divergence_factor": None}, store=tmp_path).status == (
        "finished"
    )
    failed = train({**cfg, "divergence_factor": 1.0}, store=tmp_path)
    assert failed.status == "failed" and "divergence_factor" in failed.reason
    with pytest.raises(ValueError, match="'divergence_factor' to be a finite number"):
        TrainConfig.from_dict({"divergence_factor": 0.5})


def test_a_diagnostic_that_raises_fails_the_run_not_the_process(
    tmp_path, monkeypatch
) -> None:
    from rdiag.monitor import Monitor

    original = Monitor.step

    def step(self, step, *, force=False):
        if step == 2:
            raise ValueError("centered alignment is undefined: a centered kernel is 0")
        return original(self, step, force=force)

    monkeypatch.setattr(Monitor, "step", step)
    result = train(TINY, store=tmp_path)
    store = Store(tmp_path)
    assert result.status == "failed" == store.status(result.run_id)
    assert result.reason == (
        "diagnostics failed at step 2: ValueError: centered alignment is undefined: "
        "a centered kernel is 0"
    )
    assert _steps(store, result.run_id, "train/loss") == [0, 1, 2]
    assert _steps(store, result.run_id, "ntk/rel_change") == [0]


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"momentum": -1}, "'momentum' to be a finite number in \\[0, 1\\)"),
        ({"seed": "a"}, "'seed' to be an int >= 0, got 'a'"),
        ({"lr": True}, "'lr' to be a finite number > 0"),
        ({"budget_fraction": 2}, "'budget_fraction' to be a finite number in"),
        ({"snapshots": "yes"}, "'snapshots' to be true or false"),
        ({"metrics": "loss"}, "'metrics' to be a list of names"),
        ({"activation": "swish"}, "activation to be one of"),
        ({"parametrization": 5}, "bad config field 'parametrization'"),
    ],
)
def test_bad_fields_are_refused_before_anything_runs(
    tmp_path, cfg: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict({**TINY, **cfg})
    key, value = next(iter(cfg.items()))
    with pytest.raises(ValueError, match=match):
        sweep({"base": TINY, "grid": {key: [value]}}, out=tmp_path)
    assert Store(tmp_path).run_ids() == []


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"grid": [8, 16]}, "grid to be a mapping"),
        ({"base": ["width"]}, "base to be a mapping"),
        ({"workers": "2"}, "workers to be a positive int, got '2'"),
        ({"report": "yes"}, "report to be true or false"),
        ({"grid": {"r": ["a"]}}, "grid.r values to be a finite number"),
    ],
)
def test_bad_sweep_configs_name_the_key(tmp_path, config: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sweep({"base": TINY, **config}, out=tmp_path)
    with pytest.raises(ValueError, match="workers to be a positive int"):
        sweep({"base": TINY}, out=tmp_path, workers=0)


def test_yaml_configs_that_are_not_mappings(tmp_path) -> None:
    from rdiag.runs.config import load_train_config

    path = tmp_path / "list.yaml"
    path.write_text("- width: 8\n- width: 16\n")
    for load in (load_sweep_config, load_train_config):
        with pytest.raises(ValueError, match="to be a mapping .*got a YAML list"):
            load(path)
    with pytest.raises(FileNotFoundError, match="is not a file"):
        load_train_config(tmp_path)


def test_probe_larger_than_the_test_set_is_an_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="probe_size <= the 8 test samples, got 9"):
        train({**TINY, "probe_size": 9}, store=tmp_path)
    (rid,) = Store(tmp_path).run_ids()
    assert Store(tmp_path).reason(rid).startswith("ValueError: expected probe_size")


def test_absurd_width_is_refused_before_allocating(tmp_path) -> None:
    from rdiag.models import make_model

    with pytest.raises(MemoryError, match=r"needs about 36\d\.\d TiB"):
        make_model("mlp", 10**7)
    failed = sweep(
        {"base": {**TINY, "width": 10**7}, "report": False}, out=tmp_path
    ).results
    assert failed[0].status == "failed" and "MemoryError" in failed[0].reason


def _claim_and_wait(root: str, rid: str, ready, done) -> None:
    Store(root).claim(rid)
    ready.set()
    done.wait(30)


def test_a_run_another_live_process_executes_is_not_run_here(tmp_path) -> None:
    import multiprocessing as mp

    store = Store(tmp_path)
    rid = store.create_run(TrainConfig.from_dict(TINY).to_dict(), seed=0)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    ready, done = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_claim_and_wait, args=(str(tmp_path), rid, ready, done))
    proc.start()
    try:
        assert ready.wait(30)
        result = train(TINY, store=tmp_path)
        assert result.status == "elsewhere" and f"pid {proc.pid}" in result.reason
        assert store.count(rid) == 0
    finally:
        done.set()
        proc.join(30)
    assert train(TINY, store=tmp_path).status == "finished"  # its claim died with it
    assert store.claim_holder(rid) is None


def test_serial_sweep_progress_moves_per_run(tmp_path, monkeypatch) -> None:
    tqdm = pytest.importorskip("tqdm")
    seen = []

    class Bar:
        def __init__(self, **_kwargs) -> None:
            pass

        def update(self, n: int) -> None:
            seen.append(len(Store(tmp_path).run_ids("finished")))

        def close(self) -> None:
            pass

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    config = {"base": {**TINY, "metrics": ["loss"]}, "grid": {"seed": [0, 1, 2]}}
    sweep({**config, "report": False}, out=tmp_path, progress=True)
    assert seen == [1, 2, 3]


def test_pre_release_field_and_loss_names_are_refused() -> None:
    """No release had ``param`` or ``"ce"``: they are errors naming the fields."""
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['param'\]"):
        TrainConfig.from_dict({"param": "ntk"})
    with pytest.raises(ValueError, match="cross_entropy"):
        TrainConfig.from_dict({"loss": "ce"})
    with pytest.raises(ValueError, match="unknown config field"):
        expand_grid({"grid": {"param": ["ntk", "mup"]}})


def test_the_families_are_those_of_rdiag_models_and_bn_mlp_trains(tmp_path) -> None:
    from rdiag.models import FAMILIES

    with pytest.raises(ValueError, match="bn_mlp"):  # the allowed values are listed
        TrainConfig.from_dict({"family": "nope"})
    assert "bn_mlp" in FAMILIES
    result = train({**TINY, "family": "bn_mlp", "depth": 2}, store=tmp_path)
    assert result.status == "finished", result.reason


def test_the_harness_and_the_coord_check_run_one_loop(tmp_path, monkeypatch) -> None:
    """Both width experiments train through rdiag.loop.fit with F.mse_loss."""
    import torch.nn.functional as F

    from rdiag import loop
    from rdiag.coord_check import coord_check

    seen = []
    original = loop.fit

    def spy(model, optimizer, batches, loss_fn, **kwargs):
        out, y = torch.zeros(3, 2), torch.ones(3, 2)
        seen.append(float(loss_fn(out, y)) == float(F.mse_loss(out, y)))
        return original(model, optimizer, batches, loss_fn, **kwargs)

    monkeypatch.setattr(loop, "fit", spy)
    import rdiag.runs.training as harness

    monkeypatch.setattr(harness, "fit", spy)
    train(TINY, store=tmp_path)
    coord_check("mlp", "mup", [4, 8], steps=2, seeds=1, ntk=False, linearization=False)
    assert seen == [True, True, True]


@pytest.mark.parametrize("config", [{}, {"base": {}, "grid": {}}, "empty.yaml"])
def test_an_empty_sweep_config_is_refused(tmp_path, config) -> None:
    if config == "empty.yaml":
        config = tmp_path / "empty.yaml"
        config.write_text("")
    with pytest.raises(ValueError, match="nothing to sweep"):
        sweep(config, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_finite_rate_beyond_the_weights_range_is_divergence(tmp_path) -> None:
    config = {"width": 8, "steps": 3, "every": 1, "data_options": {"n_train": 16, "n_test": 8, "dim": 3},
              "probe_size": 4, "metrics": ["loss"], "lr": 1e38, "optimizer": "gd"}  # fmt: skip
    result = train(config, store=tmp_path)
    assert result.status == "failed"
    assert "diverged at step 0: the learning rate" in result.reason


#: A run config as the code before the renames (main at 065cb99) wrote it, and the
#: run id that code gave it (``rdiag.store.run_key``).
PRE_RENAME_CONFIG = {
    "activation": "tanh",
    "batch_size": 64,
    "budget_fraction": None,
    "data": "teacher",
    "data_options": {"dim": 3, "n_test": 8, "n_train": 16},
    "depth": 2,
    "device": "cpu",
    "divergence_factor": 1000000.0,
    "dtype": "float32",
    "every": 1,
    "loss": "auto",
    "lr": 0.1,
    "metrics": ["loss"],
    "model": "mlp",
    "model_options": {},
    "momentum": 0.0,
    "optimizer": "sgd",
    "parametrization": "mup",
    "probe_size": 4,
    "seed": 0,
    "snapshots": False,
    "steps": 2,
    "width": 8,
}
PRE_RENAME_RUN_ID = "2a68bf1750e537e8"


def test_a_store_written_before_the_renames_resumes_with_no_rerun(tmp_path) -> None:
    from rdiag.runs.store import Store, run_key

    store = Store(tmp_path)
    rid = store.create_run(PRE_RENAME_CONFIG, seed=0, device="cpu")
    assert rid == PRE_RENAME_RUN_ID
    store.set_status(rid, "finished")
    new = {k: v for k, v in PRE_RENAME_CONFIG.items() if k != "model"}
    new["family"] = "mlp"
    assert TrainConfig.from_dict(new).to_dict() == new  # every field, new names
    assert run_key(new) == PRE_RENAME_RUN_ID
    assert train(new, store=tmp_path).status == "skipped"
    grid = {k: v for k, v in new.items() if k != "seed"}
    result = sweep({"base": grid, "grid": {"seed": [0]}, "report": False}, out=tmp_path)
    assert result.count("skipped") == 1 and len(result.results) == 1
    assert store.config(rid)["family"] == "mlp" and "model" not in store.config(rid)
