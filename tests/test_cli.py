"""CLI: each subcommand end to end on tiny settings; help texts; clear config errors."""

from __future__ import annotations

import json

import pytest
import torch

from rdiag.cli import main

TINY_SWEEP = """
base:
  family: mlp
  depth: 3
  optimizer: gd
  lr: 0.1
  steps: 4
  every: 2
  data_options: {n_train: 16, n_test: 8, dim: 3}
  probe_size: 4
  metrics: [ntk, representations, weights, sharpness_precond, loss]
grid:
  r: [0.5]
  width: [8]
"""


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code


@pytest.mark.parametrize(
    "command",
    ["run", "sweep", "merge", "coord-check", "depth-check", "meter", "report", "ntk",
     "sharpness"],
)  # fmt: skip
def test_help_has_examples(command: str, capsys) -> None:
    assert _exit_code([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"rdiag {command}" in out


@pytest.mark.slow
def test_sweep_then_report_end_to_end(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_SWEEP)
    out = tmp_path / "results"
    argv = [
        "sweep",
        "--config",
        str(config),
        "--r",
        "0",
        "0.5",
        "--widths",
        "8",
        "16",
        "--seeds",
        "2",
        "--steps",
        "4",
        "--every",
        "2",
        "--workers",
        "1",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "8 runs (8 finished" in printed and str(out / "report.html") in printed
    summary = json.loads((out / "summary.json").read_text())
    metrics = {(f["metric"], f["parametrization"]) for f in summary["fits"]}
    assert {("delta_h", "r=0"), ("ntk_rel_change", "r=0.5")} <= metrics
    assert summary["runs"]["finished"] == 8
    assert main(argv) == 0  # resumed: nothing to redo
    assert "8 already done" in capsys.readouterr().out
    assert main(["report", "--store", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.html").is_file()


def test_run_ntk_and_sharpness(tmp_path, capsys) -> None:
    assert (
        main(
            [
                "run",
                "--width",
                "8",
                "--steps",
                "3",
                "--every",
                "3",
                "--batch-size",
                "8",
                "--metrics",
                "loss",
                "ntk",
                "--data-option",
                "n_train=16",
                "--data-option",
                "dim=3",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
    assert "finished" in capsys.readouterr().out
    path = tmp_path / "ntk.json"
    assert (
        main(["ntk", "--width", "16", "--n", "6", "--param", "ntk", "--out", str(path)])
        == 0
    )
    summary = json.loads(path.read_text())
    from rdiag import empirical_ntk
    from rdiag.models import make_model
    from rdiag.parametrization import lr_multipliers

    model = make_model("mlp", 16, parametrization="ntk", seed=0, depth=3)
    x = model.sample_inputs(6, torch.Generator().manual_seed(0))
    k = empirical_ntk(model, x, lr_multipliers=lr_multipliers(model))
    assert summary["trace"] == pytest.approx(float(k.trace()), rel=1e-5)
    assert len(summary["top_eigenvalues"]) == 6
    assert main(["sharpness", "--width", "8", "--n", "6", "--steps", "2"]) == 0
    assert "sharpness_preconditioned" in capsys.readouterr().out


def test_ntk_command_measures_in_the_mode_asked_for(tmp_path) -> None:
    from rdiag import empirical_ntk
    from rdiag.models import make_model
    from rdiag.parametrization import lr_multipliers

    model = make_model("bn_mlp", 8, parametrization="mup", seed=0, depth=3)
    x = model.sample_inputs(6, torch.Generator().manual_seed(0))
    traces = {}
    for mode in ("eval", "train"):
        path = tmp_path / f"{mode}.json"
        argv = ["ntk", "--family", "bn_mlp", "--width", "8", "--n", "6", "--mode", mode]
        assert main([*argv, "--out", str(path)]) == 0
        traces[mode] = json.loads(path.read_text())["trace"]
        k = empirical_ntk(model, x, lr_multipliers=lr_multipliers(model), mode=mode)
        assert traces[mode] == pytest.approx(float(k.trace()), rel=1e-5)
    assert traces["train"] != pytest.approx(traces["eval"], rel=1e-3)


@pytest.mark.slow
def test_coord_check_command(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    assert (
        main(
            [
                "coord-check",
                "--family",
                "mlp",
                "--param",
                "mup",
                "--widths",
                "8",
                "16",
                "--steps",
                "2",
                "--seeds",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert any(f["metric"] == "delta_h" for f in summary["fits"])
    assert (tmp_path / "coord_check.png").is_file()
    out = capsys.readouterr().out
    verdict = "pass" if summary["passed"] else "FAIL"
    assert out.rstrip().endswith(f"verdict: {verdict}")
    reasons = [f["reason"] for f in summary["fits"] if f["passed"] is not None]
    assert reasons and all(reason in out for reason in reasons)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["run", "--param", "r=0.9", "--out", "{tmp}"],
            "bad config field 'parametrization'",
        ),
        (
            [
                "run",
                "--data",
                "cifar10",
                "--data-option",
                "root={tmp}/none",
                "--out",
                "{tmp}",
            ],
            "CIFAR-10 directory",
        ),
        (["run", "--data-option", "oops", "--out", "{tmp}"], "KEY=VALUE"),
        (
            ["sweep", "--config", "{tmp}/missing.yaml", "--out", "{tmp}"],
            "does not exist",
        ),
        (
            ["sweep", "--seeds", "0", "--out", "{tmp}"],
            "argument --seeds: expected an integer >= 1, got '0'",
        ),
        (["report", "--store", "{tmp}/nothing"], "no store at"),
        (["run", "--family", "resnet", "--out", "{tmp}"], "invalid choice: 'resnet'"),
    ],
)
def test_errors_exit_2_with_a_clear_message(
    tmp_path, capsys, argv: list, message: str
) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert _exit_code(argv) == 2
    assert message in capsys.readouterr().err


def test_run_from_a_yaml_config_with_flag_overrides(tmp_path, capsys) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        "width: 8\nsteps: 2\nevery: 2\nbatch_size: 8\nmetrics: [loss]\n"
        "data_options: {n_train: 16, n_test: 8, dim: 3}\nparametrization: ntk\nprobe_size: 4\n"
    )
    out = tmp_path / "store"
    assert (
        main(["run", "--config", str(config), "--param", "mup", "--out", str(out)]) == 0
    )
    from rdiag.runs.store import Store

    store = Store(out)
    (rid,) = store.run_ids("finished")
    assert store.config(rid)["parametrization"] == "mup"
    assert store.config(rid)["width"] == 8
    config.write_text("widht: 8\n")
    assert _exit_code(["run", "--config", str(config), "--out", str(out)]) == 2
    assert "unknown config field(s) ['widht']" in capsys.readouterr().err


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"rdiag {command}: error: "), err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ntk", "--n", "0"], "argument --n: expected an integer >= 1, got '0'"),
        (["ntk", "--top", "-1"], "argument --top: expected an integer >= 1"),
        (["ntk", "--width", "abc"], "argument --width: expected an integer >= 1"),
        (["ntk", "--out", "{tmp}"], "argument --out: expected a file path"),
        (["sharpness", "--steps", "-1"], "argument --steps: expected an integer >= 0"),
        (["sharpness", "--lr", "nan"], "argument --lr: expected a finite number > 0"),
        (["sweep", "--workers", "0", "--out", "{tmp}"], "argument --workers"),
        (["sweep", "--r", "inf", "--out", "{tmp}"], "argument --r: expected a finite"),
        (["sweep", "--widths", "8", "-4", "--out", "{tmp}"], "argument --widths"),
        (["run", "--seed", "-1", "--out", "{tmp}"], "argument --seed"),
        (["sweep", "--out", "{tmp}/file"], "argument --out: expected a directory"),
        (["run", "--out", "{tmp}/file"], "argument --out: expected a directory"),
        (["coord-check", "--out", "{tmp}/file"], "argument --out: expected a direc"),
        (["depth-check", "--depths", "0", "--out", "{tmp}/d"], "argument --depths"),
        (["depth-check", "--family", "mlp", "--out", "{tmp}/d"], "argument --family"),
        (
            ["sweep", "--config", "{tmp}/bad.yaml", "--out", "{tmp}/o"],
            "could not parse",
        ),
        (
            ["sweep", "--config", "{tmp}/list.yaml", "--out", "{tmp}/o"],
            "got a YAML list",
        ),
        (["run", "--config", "{tmp}/bad.yaml", "--out", "{tmp}/o"], "could not parse"),
        (["run", "--config", "{tmp}/list.yaml", "--out", "{tmp}/o"], "got a YAML list"),
        (["report", "--store", "{tmp}/junk"], "not SQLite; rdiag has not modified it"),
    ],
)
def test_every_error_is_one_line_with_exit_2(
    tmp_path, capsys, argv: list, message: str
) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "bad.yaml").write_text("base: [unclosed\n  grid: {")
    (tmp_path / "list.yaml").write_text("- width: 8\n")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "rdiag.sqlite").write_bytes(b"junk" * 500)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert _exit_code(argv) == 2
    assert message in _one_error_line(capsys, argv[0])


def test_out_of_memory_is_one_line_and_debug_shows_the_traceback(
    capsys, monkeypatch
) -> None:
    import rdiag.cli.commands

    def no_memory(*_args, **_kwargs):
        raise MemoryError("cannot allocate 40.0 GB for the (100000, 100000) eNTK")

    monkeypatch.setattr(rdiag.cli.commands, "empirical_ntk", no_memory)
    assert _exit_code(["ntk", "--n", "100000", "--width", "8"]) == 2
    line = _one_error_line(capsys, "ntk")
    assert line.endswith(
        "error: cannot allocate 40.0 GB for the (100000, 100000) eNTK\n"
    )
    with pytest.raises(MemoryError):
        main(["ntk", "--n", "100000", "--width", "8", "--debug"])


def test_sweep_lists_its_failed_runs_and_exits_0(tmp_path, capsys) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_SWEEP)
    argv = ["sweep", "--config", str(config), "--lr", "0.1", "1e4", "--steps", "8"]
    assert main([*argv, "--no-report", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "2 runs (1 finished, 0 already done, 1 failed" in out
    (line,) = [x for x in out.splitlines() if x.strip().startswith("failed")]
    assert "lr=10000.0" in line and ": diverged at step " in line


def test_sharpness_stops_gd_at_divergence(tmp_path, capsys) -> None:
    path = tmp_path / "s.json"
    argv = ["sharpness", "--lr", "1e6", "--steps", "5", "--width", "16", "--n", "8"]
    assert main([*argv, "--out", str(path)]) == 0
    summary = json.loads(path.read_text())
    assert summary["diverged"].startswith("GD diverged at step ")
    assert "sharpness" not in summary and summary["steps_of_gd"] <= 5
    assert "diverged" in capsys.readouterr().out


# ---- rdiag meter -----------------------------------------------------------------
TINY_METER = ["--widths", "16", "32", "--steps", "2", "--seeds", "2", "--no-ntk"]
TINY = {"widths": [16, 32], "steps": 2, "seeds": 2, "ntk": False}  # the same


def test_meter_command_runs_the_meter_on_named_factories(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    import torch.nn.functional as F

    from rdiag.meter import richness_meter
    from tests.models import METER_RULE, meter_batch, meter_mlp

    names = (
        "--factory meter_mlp --data-factory meter_batch --optimizer-factory METER_RULE"
    )
    argv = [f"tests.models:{a}" if a[0] != "-" else a for a in names.split()]
    assert main(["meter", *argv, *TINY_METER, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    expected = richness_meter(meter_mlp, METER_RULE, meter_batch(), F.mse_loss, **TINY)
    assert out.startswith(expected.report() + "\n")
    saved = json.loads((tmp_path / "meter.json").read_text())
    assert saved["r"] == pytest.approx(expected.r, rel=1e-6)
    assert [d["name"] for d in saved["layers"]] == ["0", "2", "4"]
    page = (tmp_path / "meter.html").read_text()
    assert expected.verdict in page and "<td>4</td><td>readout</td>" in page
    assert (tmp_path / "meter.png").is_file() and str(tmp_path / "meter.png") in out


def test_meter_command_on_a_file_with_default_data_and_optimizer(
    tmp_path, capsys
) -> None:
    """A built-in family named by file: its sample_inputs and muP rates are used."""
    pytest.importorskip("matplotlib")
    import torch.nn.functional as F

    import rdiag

    source = tmp_path / "my_models.py"
    source.write_text(
        "import rdiag\n\n\ndef build(n):\n"
        "    return rdiag.make_model('mlp', n, d_out=3, parametrization='mup')\n"
    )
    argv = ["meter", "--factory", f"{source}:build", "--loss", "cross_entropy"]
    out = tmp_path / "out"
    assert main([*argv, "--lr", "0.2", *TINY_METER, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    x, y = rdiag.meter.default_data(
        lambda n: rdiag.make_model("mlp", n, d_out=3, parametrization="mup"),
        F.cross_entropy,
        width=16,
    )
    assert x.shape == (16, 8) and y.shape == (16,) and y.max() < 3
    expected = rdiag.richness_meter(
        lambda n: rdiag.make_model("mlp", n, d_out=3, parametrization="mup"),
        lambda m: rdiag.make_optimizer(m, None, 0.2),
        (x, y),
        F.cross_entropy,
        **TINY,
    )
    assert printed.startswith(expected.report() + "\n")
    (out / "meter.html").unlink()
    assert main(["report", "--store", str(out)]) == 0  # a meter alone
    assert expected.verdict in (out / "meter.html").read_text()


_ONE_FILE = """
from pathlib import Path

from rdiag import LRRule
from tests.models import meter_batch as batch, meter_mlp as build

with open(Path(__file__).with_suffix(".log"), "a") as log:
    log.write("loaded\\n")
RULE = LRRule(0.1, {"readout": -1.0}, base_width=16)
"""


def test_one_file_named_by_every_flag_is_loaded_once(tmp_path, capsys) -> None:
    source = tmp_path / "mine.py"
    source.write_text(_ONE_FILE)
    flags = ["--factory", "build", "--data-factory", "batch"]
    flags += ["--optimizer-factory", "RULE"]
    argv = [f"{source}:{a}" if a[0] != "-" else a for a in flags]
    assert main(["meter", *argv, *TINY_METER, "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "mine.log").read_text() == "loaded\n"
    saved = json.loads((tmp_path / "o" / "meter.json").read_text())
    assert [d["name"] for d in saved["layers"]] == ["0", "2", "4"]


_BROKEN = "import not_installed_package_xyz\n\n\ndef build(n):\n    return None\n"
_CONV = (
    "import torch\n\n\ndef build(n):\n    return torch.nn.Sequential("
    "torch.nn.Conv2d(3, n, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))\n"
)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--factory", "tests.models"], "expected --factory MODULE:NAME, got"),
        (["--factory", "tests.models:"], "expected --factory MODULE:NAME"),
        (
            ["--factory", "no_such_module_xyz:build"],
            "cannot import module 'no_such_module_xyz'",
        ),
        (["--factory", "{tmp}/none.py:build"], "no file "),
        (["--factory", "{tmp}/broken.py:build"], "'not_installed_package_xyz', which"),
        (["--factory", "tests.models:nope"], "has no attribute 'nope'"),
        (["--factory", "tests.models:nope"], "it defines Attention, EmbedLinear, MuTransformer, attention"),
        (["--factory", "tests.models:__doc__"], "got a str; name a function"),
        (
            ["--factory", "tests.models:mlp"],
            "expected family(16) to return a torch.nn.Module, got function",
        ),
        (
            ["--factory", "tests.models:meter_batch"],
            "got meter_batch(), which cannot be called as meter_batch(width)",
        ),
        (
            ["--factory", "tests.models:meter_mlp", "--data-factory",
             "tests.models:meter_mlp"],
            "which cannot be called as meter_mlp()",
        ),
        (["--factory", "{tmp}/conv.py:build"], "--data-factory MODULE:FUNCTION"),
        (
            ["--factory", "tests.models:meter_mlp", "--data-factory", "tests.models:x"],
            "has no attribute 'x' (from --data-factory tests.models:x)",
        ),
        (
            ["--factory", "tests.models:meter_mlp", "--optimizer-factory", "m:f"],
            "expected --lr with --optimizer only",
        ),
        (
            ["--factory", "tests.models:meter_mlp", "--optimizer-factory",
             "tests.models:__doc__"],
            "or an rdiag.LRRule, got a str; name a function",
        ),
        (
            ["--factory", "f:g", "--optimizer", "sgd", "--optimizer-factory", "m:f"],
            "not allowed with argument --optimizer",
        ),
        (
            ["--factory", "tests.models:meter_mlp", "--data-factory",
             "tests.models:meter_batch", "--widths", "16"],
            "two distinct widths",
        ),
        (["--factory", "f:g", "--loss", "hinge"], "invalid choice: 'hinge'"),
    ],
)  # fmt: skip
def test_meter_errors_say_what_to_do(tmp_path, capsys, flags, message) -> None:
    (tmp_path / "broken.py").write_text(_BROKEN)
    (tmp_path / "conv.py").write_text(_CONV)
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    argv = ["meter", *flags, "--steps", "2", "--seeds", "1", "--no-ntk"]
    if "--lr" not in flags and "expected --lr" in message:
        argv += ["--lr", "0.1"]
    argv += [] if "--widths" in flags else ["--widths", "16", "32"]
    assert _exit_code([*argv, "--out", str(tmp_path)]) == 2
    assert message in _one_error_line(capsys, "meter")


# ---- rdiag ntk / sharpness on the user's model -------------------------------------
_USER = """
import torch


def make(width):
    return torch.nn.Sequential(
        torch.nn.Linear(5, width), torch.nn.Tanh(), torch.nn.Linear(width, 3)
    )


def fixed():
    return make(12)


def batch():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(7, 5, generator=gen), torch.randn(7, 3, generator=gen)


def inputs():
    return batch()[0]
"""


def _user_module(tmp_path):
    source = tmp_path / "user_models.py"
    source.write_text(_USER)
    import importlib.util

    spec = importlib.util.spec_from_file_location("_user_models_test", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return source, module


def test_ntk_and_sharpness_on_a_factory_from_a_file(tmp_path) -> None:
    """The kernel and sharpness of the user's model equal the library's on that model."""
    import torch.nn.functional as F

    from rdiag import empirical_ntk, sharpness
    from rdiag.data import sample_batch

    source, user = _user_module(tmp_path)
    path = tmp_path / "ntk.json"
    argv = ["ntk", "--factory", f"{source}:make", "--width", "12", "--n", "6"]
    assert main([*argv, "--seed", "2", "--out", str(path)]) == 0
    torch.manual_seed(2)
    model = user.make(12)
    x, _ = sample_batch(model, F.mse_loss, n=6, seed=2)
    assert x.shape == (6, 5)  # Gaussian, sized from the first nn.Linear
    summary = json.loads(path.read_text())
    assert summary["trace"] == pytest.approx(
        float(empirical_ntk(model, x).trace()), rel=1e-5
    )
    assert summary["kernel"].startswith("eNTK K, shape (6, 6)")
    assert summary["family"] == f"{source}:make(12)"

    # a factory of no argument, the user's batch, cross-entropy targets, GD steps
    for data, loss in (("batch", "mse"), (None, "cross_entropy")):
        path = tmp_path / f"s-{loss}.json"
        argv = ["sharpness", "--factory", f"{source}:fixed", "--loss", loss]
        argv += ["--data-factory", f"{source}:{data}"] if data else ["--n", "9"]
        assert main([*argv, "--out", str(path)]) == 0
        summary = json.loads(path.read_text())
        torch.manual_seed(0)
        model = user.fixed()
        loss_fn = F.mse_loss if loss == "mse" else F.cross_entropy
        xy = user.batch() if data else sample_batch(model, loss_fn, n=9, seed=0)
        if loss == "cross_entropy":
            assert xy[1].dtype == torch.long and xy[1].shape == (9,)
        assert summary["sharpness"] == pytest.approx(
            sharpness(model, loss_fn, xy), rel=1e-4
        )
        assert "sharpness_preconditioned" not in summary  # no parametrization
    path = tmp_path / "steps.json"
    argv = ["sharpness", "--factory", f"{source}:fixed", "--steps", "3"]
    assert main([*argv, "--lr", "0.05", "--out", str(path)]) == 0
    assert json.loads(path.read_text())["steps_of_gd"] == 3
    path = tmp_path / "x.json"  # ntk: a data factory of inputs alone
    argv = ["ntk", "--factory", f"{source}:fixed", "--data-factory", f"{source}:inputs"]
    assert main([*argv, "--out", str(path)]) == 0
    assert json.loads(path.read_text())["kernel"].endswith(
        "(7, 7), traced over outputs"
    )


def test_ntk_on_a_module_path_factory(tmp_path) -> None:
    """A factory by module path (rdiag's bare MLP class: its own sample_inputs, no M)."""
    from rdiag import empirical_ntk
    from rdiag.models import MLP

    path = tmp_path / "ntk.json"
    argv = ["ntk", "--factory", "rdiag.models:MLP", "--width", "16", "--n", "5"]
    assert main([*argv, "--out", str(path)]) == 0
    summary = json.loads(path.read_text())
    assert summary["kernel"].startswith("eNTK K,")  # not prepared: no multipliers
    torch.manual_seed(0)
    model = MLP(16)
    x = model.sample_inputs(5, torch.Generator().manual_seed(0))
    expected = float(empirical_ntk(model, x).trace())
    assert summary["trace"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("command", "flags", "message"),
    [
        ("ntk", ["--factory", "tests.models"], "expected --factory MODULE:NAME, got"),
        ("sharpness", ["--factory", "no_such_module_xyz:build"],
         "cannot import module 'no_such_module_xyz'"),
        ("ntk", ["--factory", "{tmp}/none.py:build"], "no file "),
        ("ntk", ["--factory", "{tmp}/broken.py:build"],
         "'not_installed_package_xyz', which"),
        ("sharpness", ["--factory", "tests.models:nope"], "has no attribute 'nope'"),
        ("ntk", ["--factory", "tests.models:__doc__"], "got a str; name a function"),
        ("ntk", ["--factory", "tests.models:mlp"],
         "expected family(128) to return a torch.nn.Module, got function"),
        ("ntk", ["--factory", "tests.models:mu_adam"],
         "which cannot be called as mu_adam() or mu_adam(width)"),
        ("ntk", ["--factory", "{tmp}/conv.py:build"], "--data-factory MODULE:FUNCTION"),
        ("sharpness", ["--factory", "{tmp}/user_models.py:fixed", "--data-factory",
                       "{tmp}/user_models.py:inputs"], "got inputs alone"),
        ("sharpness", ["--factory", "{tmp}/user_models.py:fixed", "--data-factory",
                       "{tmp}/user_models.py:make"],
         "which cannot be called as make()"),
        ("ntk", ["--factory", "{tmp}/user_models.py:fixed", "--data-factory",
                 "{tmp}/user_models.py:fixed"], "to return one batch (x, y)"),
        ("ntk", ["--factory", "{tmp}/user_models.py:fixed", "--width", "8"],
         "takes no argument; drop --width"),
        ("ntk", ["--factory", "{tmp}/user_models.py:make", "--depth", "2"],
         "expected --depth with a built-in --family only"),
        ("sharpness", ["--factory", "f:g", "--family", "mlp"],
         "not allowed with argument --factory"),
    ],
)  # fmt: skip
def test_ntk_and_sharpness_factory_errors_are_the_meters(
    tmp_path, capsys, command, flags, message
) -> None:
    (tmp_path / "broken.py").write_text(_BROKEN)
    (tmp_path / "conv.py").write_text(_CONV)
    _user_module(tmp_path)
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    assert _exit_code([command, *flags, "--n", "4"]) == 2
    assert message in _one_error_line(capsys, command)
