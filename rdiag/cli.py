"""``rdiag`` command line: the subcommands of the README, each a call of the public API.

run, sweep, merge, coord-check, depth-check, meter, report, ntk, sharpness.

Every subcommand parses its flags and calls the public API (:func:`rdiag.harness.train`,
:func:`rdiag.harness.sweep`, :func:`rdiag.coord_check.coord_check`,
:func:`rdiag.depth_check`, :func:`rdiag.richness_meter`, :func:`rdiag.report.build_report`,
:func:`rdiag.empirical_ntk`, :func:`rdiag.curvature.sharpness`); it has no logic of
its own beyond loading the user's factories (``MODULE:NAME``) and printing where
results went.

``rdiag ntk`` and ``rdiag sharpness`` measure a built-in model (``--model``) or
the user's (``--factory MODULE:FUNCTION``, a function of no argument or of the
width, ``--width``), on ``--data-factory``'s batch or else on ``--n`` inputs from
the model's ``sample_inputs`` or Gaussian for its first ``nn.Linear``, with
targets for ``--loss`` (:func:`rdiag.meter.sample_batch`); the factories are
loaded and checked as the meter's.

``rdiag meter`` takes the user's code by name: ``--factory MODULE:FUNCTION``
(``width -> nn.Module``), optionally ``--optimizer-factory`` (``model ->
torch.optim.Optimizer``, or an :class:`rdiag.LRRule` object) and ``--data-factory``
(``() -> (x, y)`` or a list of such batches). ``MODULE`` is a dotted module path,
imported with the current directory on ``sys.path`` (as ``python -m`` would), or
a file ``path/to/file.py``. Without ``--optimizer-factory`` it trains with
:func:`rdiag.meter.optimizer_factory` (``--optimizer``, ``--lr``: a model prepared
by :func:`rdiag.apply_parametrization` gets its per-layer rates, any other one
plain SGD / Adam over all its parameters); without ``--data-factory`` on
:func:`rdiag.meter.default_data` (the model's ``sample_inputs`` or Gaussian
inputs for its first ``nn.Linear``, targets shaped like its output). Every
error exits with status 2 and one line ``rdiag <command>: error: ...`` naming the field or flag and what it allows
(``--debug`` shows the traceback instead); numeric and path flags are checked by
argparse before anything runs. A sweep whose runs failed still exits 0 and lists
the failed runs with their reasons; a merge that found conflicting records lists
them and exits 1.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from rdiag.data import DATASETS
from rdiag.harness import MODELS, OPTIMIZERS, parse_shard
from rdiag.store import StoreError

_EPILOG = {
    "run": """examples:
  rdiag run --model mlp --width 256 --parametrization mup --lr 0.3 --steps 40 --out runs/
  rdiag run --model cnn --data digits --data-option flatten=false --width 32 --out runs/""",
    "sweep": """examples:
  rdiag sweep --config default --out results/          # the main job (CPU, minutes)
  rdiag sweep --config default --r 0 0.5 --widths 64 256 1024 --seeds 2 --steps 20 --out quick/
  rdiag sweep --config my_sweep.yaml --workers 4 --out results/
  rdiag sweep --config my_sweep.yaml --executor ray --address auto --out results/
  rdiag sweep --config my_sweep.yaml --shard $SLURM_ARRAY_TASK_ID/4 --out results/
      # -> results/shard-<i>-of-4; then: rdiag merge results/merged results/shard-*-of-4""",
    "merge": """examples:
  rdiag merge results/merged results/shard-*-of-4
  rdiag report --store results/merged --out results/merged""",
    "coord-check": """examples:
  rdiag coord-check --model mlp --parametrization r=0.25 --widths 64 128 256 512 1024 --steps 10 \\
      --seeds 4 --out coord/
  rdiag coord-check --model transformer --parametrization mup --widths 32 64 128 256 --out coord_tf/""",
    "depth-check": """examples:
  rdiag depth-check --model resmlp --parametrization mup,depth=completep --depths 2 4 8 16 32 \\
      --width 64 --out depth/
  rdiag depth-check --model transformer --parametrization mup --optimizer adam --out depth_tf/
depth rules (the ,depth= suffix): depth-mup (branches x 1/sqrt(L), the default), completep
(x 1/L), none, or a branch exponent alpha (e.g. mup,depth=0.75)""",
    "meter": """examples:
  rdiag meter --factory mypkg.models:make_model --out meter/
  rdiag meter --factory path/to/models.py:make_model --data-factory path/to/models.py:batch \\
      --loss cross_entropy --optimizer adam --lr 1e-3 --widths 32 64 128 256 --no-ntk --out meter/
  rdiag meter --factory models.py:make_model --optimizer-factory models.py:make_optimizer --out meter/
      # make_model(width) -> nn.Module; make_optimizer(model) -> torch.optim.Optimizer
      # (or an rdiag.LRRule object); batch() -> (x, y). Writes meter.json, meter.html, meter.png""",
    "report": """examples:
  rdiag report --store results/ --out results/    # + the meter's section if results/meter.json
  rdiag report --store meter/                     # a meter alone: meter/meter.html""",
    "ntk": """examples:
  rdiag ntk --model mlp --width 512 --parametrization mup --n 64
  rdiag ntk --model cnn --width 32 --n 32 --implementation jacobian --out ntk.json
  rdiag ntk --model bn_mlp --width 64 --n 32 --mode train   # batch statistics
  rdiag ntk --factory my_models.py:make_model --width 256 --n 32
  rdiag ntk --factory mypkg.models:build --data-factory mypkg.models:batch
      # build() or build(width) -> nn.Module; batch() -> (x, y) or x. Without
      # --data-factory: the model's sample_inputs, or Gaussian (n, in_features)
      # for a first nn.Linear""",
    "sharpness": """examples:
  rdiag sharpness --model mlp --width 256 --parametrization mup --n 64
  rdiag sharpness --model mlp --width 256 --parametrization ntk --lr 0.3 --steps 20
  rdiag sharpness --factory my_models.py:make_model --loss cross_entropy --steps 10
  rdiag sharpness --factory my_models.py:make_model --data-factory my_models.py:batch
      # the preconditioned sharpness only for models prepared by
      # rdiag.apply_parametrization (their per-layer rates)""",
}


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        """Print ``prog: error: message`` and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _integer(low: int) -> Callable[[str], int]:
    """An argparse ``type=``: an integer ``>= low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {low}, got {text!r}"
            )
        return value

    return parse


def _number(positive: bool) -> Callable[[str], float]:
    """An argparse ``type=``: a finite number (``> 0`` if ``positive``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or (positive and value <= 0):
            raise argparse.ArgumentTypeError(
                f"expected a finite number{' > 0' if positive else ''}, got {text!r}"
            )
        return value

    return parse


def _directory(text: str) -> str:
    """An argparse ``type=``: a directory path (created later if missing)."""
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(
            f"expected a directory, got the file {text!r}; pass a directory path"
        )
    return text


def _shard(text: str) -> tuple[int, int]:
    """An argparse ``type=``: a shard ``i/n`` with ``0 <= i < n``."""
    try:
        return parse_shard(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _file(text: str) -> str:
    """An argparse ``type=``: a file path to write (not a directory)."""
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(
            f"expected a file path, got the directory {text!r}; pass e.g. "
            f"{str(Path(text) / 'summary.json')!r}"
        )
    return text


#: ``rdiag meter --loss``: name -> the ``torch.nn.functional`` loss.
_LOSSES = {"mse": "mse_loss", "cross_entropy": "cross_entropy"}


_COUNT, _POSITIVE, _RATE, _REAL = (
    _integer(0),
    _integer(1),
    _number(True),
    _number(False),
)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rdiag",
        description="Kernel (eNTK) and Hessian diagnostics across the lazy-rich scale.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        help="on an error, show the traceback instead of one line",
    )

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=_EPILOG[name],
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    run = add("run", "train one configuration with the Monitor into a store")
    run.add_argument(
        "--config", help="YAML file with TrainConfig fields (flags override it)"
    )
    run.add_argument("--model", choices=MODELS)
    run.add_argument("--width", type=_POSITIVE)
    run.add_argument("--depth", type=_POSITIVE)
    run.add_argument(
        "--parametrization",
        "--param",
        dest="parametrization",
        help="r=0.25 | ntk | mup | mf | sp | gamma=0.1 (--parametrization is its old name)",
    )
    run.add_argument("--optimizer", choices=OPTIMIZERS)
    run.add_argument("--lr", type=_RATE)
    run.add_argument("--steps", type=_POSITIVE)
    run.add_argument("--batch-size", type=_POSITIVE)
    run.add_argument("--data", choices=DATASETS)
    run.add_argument(
        "--data-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="data loader option, e.g. root=/data/cifar-10-batches-py",
    )
    run.add_argument("--seed", type=_COUNT)
    run.add_argument("--every", type=_POSITIVE)
    run.add_argument("--metrics", nargs="+")
    run.add_argument("--dtype", choices=("float32", "float64"))
    run.add_argument("--device", choices=("cpu", "cuda", "auto"))
    run.add_argument("--out", required=True, type=_directory, help="store directory")

    sw = add(
        "sweep", "run an r x width x seed x lr grid in parallel; store, figures, report"
    )
    sw.add_argument(
        "--config",
        default="default",
        help="YAML sweep config, or 'default' (the packaged one)",
    )
    sw.add_argument("--model", choices=MODELS)
    group = sw.add_mutually_exclusive_group()
    group.add_argument("--r", type=_REAL, nargs="+", help="richness values (grid)")
    group.add_argument(
        "--parametrization",
        "--param",
        dest="parametrization",
        nargs="+",
        help="parametrizations (grid), e.g. mup ntk sp (--parametrization is its old name)",
    )
    sw.add_argument("--widths", type=_POSITIVE, nargs="+")
    sw.add_argument("--seeds", type=_POSITIVE, metavar="K", help="seeds 0..K-1")
    sw.add_argument("--lr", type=_RATE, nargs="+", help="base learning rates (grid)")
    sw.add_argument("--steps", type=_POSITIVE)
    sw.add_argument("--every", type=_POSITIVE)
    sw.add_argument("--workers", type=_POSITIVE)
    sw.add_argument(
        "--executor",
        choices=("process", "ray"),
        default="process",
        help="process: a local pool of --workers; ray: one Ray task per run, "
        "records written on this machine (pip install 'rdiag[ray]')",
    )
    sw.add_argument(
        "--address",
        help="the Ray cluster with --executor ray (e.g. auto, or HOST:PORT)",
    )
    sw.add_argument(
        "--shard",
        type=_shard,
        metavar="I/N",
        help="run only slice I (from 0) of N of the grid into OUT/shard-I-of-N "
        "(a Slurm array task); join the shards with rdiag merge",
    )
    sw.add_argument("--no-report", action="store_true", help="skip figures and report")
    sw.add_argument(
        "--out",
        required=True,
        type=_directory,
        help="output directory (store, figures, report)",
    )

    mg = add("merge", "merge the shard stores of a sweep into one store")
    mg.add_argument(
        "out", type=_directory, help="the merged store (created if missing)"
    )
    mg.add_argument(
        "shards",
        nargs="+",
        type=_directory,
        help="shard directories (OUT/shard-I-of-N)",
    )

    cc = add("coord-check", "coordinate check of a parameterization over widths")
    cc.add_argument("--model", choices=MODELS, default="mlp")
    cc.add_argument(
        "--parametrization", "--param", dest="parametrization", default="mup"
    )
    cc.add_argument(
        "--widths", type=_POSITIVE, nargs="+", default=[64, 128, 256, 512, 1024]
    )
    cc.add_argument("--steps", type=_POSITIVE, default=10)
    cc.add_argument("--seeds", type=_POSITIVE, default=4, metavar="K")
    cc.add_argument(
        "--lr",
        type=_RATE,
        help="base learning rate (default: 0.3 for SGD, 0.1 for Adam, calibrated "
        "with 10 steps)",
    )
    cc.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    cc.add_argument("--out", required=True, type=_directory)

    dc = add("depth-check", "depth check of a parameterization's residual branches")
    dc.add_argument("--model", choices=("resmlp", "transformer"), default="resmlp")
    dc.add_argument(
        "--parametrization",
        "--param",
        dest="parametrization",
        default="mup",
        help="a parametrization with an optional ,depth=RULE suffix",
    )
    dc.add_argument("--depths", type=_POSITIVE, nargs="+", default=[2, 4, 8, 16, 32])
    dc.add_argument("--width", type=_POSITIVE, default=64)
    dc.add_argument("--steps", type=_POSITIVE, default=10)
    dc.add_argument("--seeds", type=_POSITIVE, default=3, metavar="K")
    dc.add_argument("--lr", type=_RATE, help="base learning rate (as coord-check)")
    dc.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    dc.add_argument("--out", required=True, type=_directory)
    mt = add(
        "meter",
        "richness meter: where your model and optimizer sit on the lazy-rich scale",
    )
    mt.add_argument(
        "--factory",
        required=True,
        metavar="MODULE:FUNCTION",
        help="width -> nn.Module: a module path (mypkg.models:make_model, the current "
        "directory importable) or a file (path/to/models.py:make_model)",
    )
    mt.add_argument(
        "--widths",
        type=_POSITIVE,
        nargs="+",
        default=[64, 128, 256, 512, 1024],
        help="at least two, a 16x span recommended (default 64 128 256 512 1024)",
    )
    mt.add_argument(
        "--steps",
        type=_POSITIVE,
        default=10,
        help="optimizer steps per run; >= 10 lets the kernel exponents in (default 10)",
    )
    mt.add_argument(
        "--seeds",
        type=_POSITIVE,
        default=4,
        metavar="K",
        help="seeds 0..K-1; three or more give an interval (default 4)",
    )
    how = mt.add_mutually_exclusive_group()
    how.add_argument(
        "--optimizer",
        choices=("sgd", "adam"),
        help="default sgd: rdiag-parametrized models get their per-layer rates "
        "(base rate --lr), others one rate --lr for all parameters",
    )
    how.add_argument(
        "--optimizer-factory",
        metavar="MODULE:NAME",
        help="model -> torch.optim.Optimizer, or an rdiag.LRRule object (its own rates)",
    )
    mt.add_argument(
        "--lr",
        type=_RATE,
        help="learning rate of --optimizer (default: 0.3 for SGD, 0.1 for Adam)",
    )
    mt.add_argument(
        "--data-factory",
        metavar="MODULE:FUNCTION",
        help="() -> (x, y) or a list of batches; default: --batch-size inputs from "
        "the model's sample_inputs (or Gaussian, sized from a first nn.Linear), "
        "Gaussian targets (class indices for cross_entropy) shaped like its output",
    )
    mt.add_argument("--batch-size", type=_POSITIVE, default=16)
    mt.add_argument("--data-seed", type=_COUNT, default=1234)
    mt.add_argument("--loss", choices=tuple(_LOSSES), default="mse")
    mt.add_argument(
        "--target",
        type=_REAL,
        help="the richness in [0, 1/2] the per-layer predictions and fixes are for "
        "(default: the estimate, clipped)",
    )
    mt.add_argument(
        "--no-ntk",
        action="store_true",
        help="skip the kernel metrics (two eNTKs and a jvp per run)",
    )
    mt.add_argument(
        "--out",
        required=True,
        type=_directory,
        help="output directory (meter.json, meter.html, meter.png)",
    )

    rep = add("report", "figures, summary.json and report.html from a store")
    rep.add_argument(
        "--store",
        required=True,
        type=_directory,
        help="store directory (its meter.json, if any, is reported too)",
    )
    rep.add_argument(
        "--out",
        type=_directory,
        help="output directory (default: the store directory)",
    )

    for name, help_ in (
        ("ntk", "eNTK of a built-in model or yours (--factory) and its spectrum"),
        (
            "sharpness",
            "raw and preconditioned sharpness of a built-in model or yours (--factory)",
        ),
    ):
        p = add(name, help_)
        which = p.add_mutually_exclusive_group()
        which.add_argument(
            "--model", choices=MODELS, help="a built-in family (default mlp)"
        )
        which.add_argument(
            "--factory",
            metavar="MODULE:FUNCTION",
            help="your model: a function () -> nn.Module or width -> nn.Module, by "
            "module path (mypkg.models:make_model, the current directory "
            "importable) or file (path/to/models.py:make_model), as rdiag meter",
        )
        p.add_argument(
            "--width",
            type=_POSITIVE,
            help="width of a built-in model or of a width -> nn.Module factory "
            "(default 128)",
        )
        p.add_argument("--depth", type=_POSITIVE, help="built-in models (default 3)")
        p.add_argument(
            "--parametrization",
            "--param",
            dest="parametrization",
            help="built-in models (default mup)",
        )
        p.add_argument(
            "--data-factory",
            metavar="MODULE:FUNCTION",
            help="() -> (x, y) (ntk also takes () -> x); default: --n inputs from "
            "the model's sample_inputs or Gaussian sized from its first nn.Linear, "
            "targets for --loss",
        )
        p.add_argument("--n", type=_POSITIVE, default=64, help="number of inputs")
        p.add_argument(
            "--seed", type=_COUNT, default=0, help="seed of the model and the data"
        )
        p.add_argument("--out", type=_file, help="also write the summary as JSON here")
        p.add_argument(
            "--mode",
            choices=("eval", "train"),
            default="eval",
            help="eval: dropout off, batch norm running statistics; train: batch "
            "statistics, fixed-seed dropout (the same everywhere in rdiag)",
        )
        if name == "ntk":
            p.add_argument(
                "--implementation",
                default="auto",
                choices=("auto", "jacobian", "ntvp", "structured"),
            )
            p.add_argument(
                "--top", type=_POSITIVE, default=10, help="eigenvalues to print"
            )
        else:
            p.add_argument(
                "--loss",
                choices=tuple(_LOSSES),
                default="mse",
                help="the loss whose Hessian is measured (default mse)",
            )
            p.add_argument(
                "--lr", type=_RATE, default=0.1, help="base rate of --steps of GD"
            )
            p.add_argument(
                "--steps", type=_COUNT, default=0, help="GD steps before measuring"
            )
    return parser


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"true": True, "false": False}.get(text.lower(), text)


def _cmd_run(args: argparse.Namespace) -> int:
    from rdiag.harness import load_train_config, train

    config = load_train_config(args.config) if args.config else {}
    flags = {
        k: getattr(args, k)
        for k in (
            "model",
            "width",
            "depth",
            "parametrization",
            "optimizer",
            "lr",
            "steps",
            "batch_size",
            "data",
            "seed",
            "every",
            "metrics",
            "dtype",
            "device",
        )
    }
    config.update({k: v for k, v in flags.items() if v is not None})
    if args.data_option:
        opts = dict(config.get("data_options", {}))
        for item in args.data_option:
            key, sep, val = item.partition("=")
            if not sep:
                raise ValueError(f"expected --data-option KEY=VALUE, got {item!r}")
            opts[key] = _value(val)
        config["data_options"] = opts
    result = train(config, store=args.out)
    print(
        f"run {result.run_id}: {result.status}, final loss {result.final_loss:.4g}, "
        f"{result.seconds:.1f} s ({result.monitor_seconds:.1f} s diagnostics)"
    )
    if result.reason is not None:
        print(f"reason: {result.reason}")
    print(f"store: {Path(result.store).resolve() / 'rdiag.sqlite'}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from rdiag.harness import sweep

    base: dict[str, Any] = {}
    grid: dict[str, Any] = {}
    for key in ("model", "steps", "every"):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    if args.r is not None:
        grid["r"] = args.r
    if args.parametrization is not None:
        grid["parametrization"] = args.parametrization
    if args.widths is not None:
        grid["width"] = args.widths
    if args.seeds is not None:
        grid["seed"] = list(range(args.seeds))
    if args.lr is not None:
        grid["lr"] = args.lr
    tic = time.perf_counter()
    result = sweep(
        args.config,
        out=args.out,
        workers=args.workers,
        executor=args.executor,
        address=args.address,
        shard=args.shard,
        progress=True,
        report=False if args.no_report else None,
        overrides={"base": base, "grid": grid},
    )
    out = Path(result.store).resolve()
    print(
        f"{len(result.results)} runs ({result.count('finished')} finished, "
        f"{result.count('skipped')} already done, {result.count('failed')} failed, "
        f"{result.count('elsewhere')} running elsewhere) "
        f"in {time.perf_counter() - tic:.0f} s"
    )
    _print_not_finished(result)
    print(f"store:   {out / 'rdiag.sqlite'}")
    if result.report:
        print(f"report:  {Path(result.report['html']).resolve()}")
        print(f"summary: {Path(result.report['summary']).resolve()}")
        print(f"figures: {out / 'figures'}")
        _print_fits(json.loads(Path(result.report["summary"]).read_text())["fits"])
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from rdiag.merge import merge_stores

    result = merge_stores(args.out, args.shards)
    print(
        f"merged {len(args.shards)} shard(s) of sweep {result.sweep} into "
        f"{Path(result.out).resolve() / 'rdiag.sqlite'}: {result.added_runs} runs "
        f"added, {result.completed_runs} completed, {result.rows} rows written"
        + ("" if result.changed else " (nothing new)")
    )
    print(
        f"{result.present_runs} of the sweep's {result.sweep_runs} runs present, "
        f"{result.finished_runs} finished"
    )
    if result.missing_shards:
        print(f"shards not merged yet: {' '.join(result.missing_shards)}")
    for conflict in result.conflicts:
        print(f"  conflict: {conflict}")
    if result.conflicts:
        runs = len({c.run for c in result.conflicts})
        print(f"{len(result.conflicts)} conflicting records in {runs} run(s)")
        return 1
    return 0


def _print_not_finished(result: Any) -> None:
    from rdiag.report import run_label
    from rdiag.store import Store

    store = Store(result.store)
    for r in result.results:
        if r.status in ("failed", "elsewhere"):
            label = run_label(store.config(r.run_id))
            print(f"  {r.status:9s} {r.run_id} {label}: {r.reason}")


def _print_fits(fits: list[dict]) -> None:
    counts = {v: sum(f["verdict"] == v for f in fits) for v in ("pass", "fail")}
    counts["inconclusive"] = sum(f["verdict"] == "inconclusive" for f in fits)
    print("verdicts: " + ", ".join(f"{n} {v}" for v, n in counts.items()))
    for f in fits:
        if f["metric"] not in ("delta_h", "ntk_rel_change"):
            continue
        pred = "n/a" if f["predicted"] is None else f"{f['predicted']:+.2f}"
        lo, hi = f["ci"]
        ci = (
            "[n/a: 2 points]"
            if lo is None or math.isnan(lo)
            else f"[{lo:+.3f}, {hi:+.3f}]"
        )
        verdict = {"fail": "FAIL", "no prediction": ""}.get(f["verdict"], f["verdict"])
        print(
            f"  {f['metric']:15s} {f['layer'] or '':9s} {f['parametrization'] or '':8s} slope "
            f"{f['slope']:+.3f} {ci}  predicted {pred}  {verdict}"
        )


def _cmd_coord_check(args: argparse.Namespace) -> int:
    from rdiag.coord_check import coord_check

    result = coord_check(
        args.model,
        args.parametrization,
        args.widths,
        steps=args.steps,
        seeds=args.seeds,
        lr=args.lr,
        optimizer=args.optimizer,
    )
    return _write_check(result, Path(args.out), "coord_check.png")


def _cmd_depth_check(args: argparse.Namespace) -> int:
    from rdiag.depth_check import depth_check

    result = depth_check(
        args.model,
        args.parametrization,
        args.depths,
        width=args.width,
        steps=args.steps,
        seeds=args.seeds,
        lr=args.lr,
        optimizer=args.optimizer,
    )
    return _write_check(result, Path(args.out), "depth_check.png")


def _write_check(result: Any, out: Path, figure_name: str) -> int:
    """Save a coordinate or depth check's summary and figure; print its verdicts."""
    from rdiag.coord_check import plot_coord_check

    summary = result.save(out)
    figure = plot_coord_check(result, out / figure_name)
    print(f"summary: {summary.resolve()}")
    print(f"figure:  {Path(figure).resolve()}")
    _print_verdicts(result)
    return 0


def _print_verdicts(result: Any) -> None:
    """Every judged fit with its verdict, then the overall one (coord and depth checks)."""
    for f in result.fits:
        if f["passed"] is None:
            continue
        mark = "pass" if f["passed"] else "FAIL"
        print(f"  {mark} {f['metric']:15s} {f['layer'] or '':14s} {f['reason']}")
    for run in result.failed:
        print(f"  diverged: {run}")
    print(f"verdict: {'pass' if result.passed else 'FAIL'}")


def _load(spec: str, flag: str, what: str) -> Any:
    """The object ``MODULE:NAME`` (or ``path/to/file.py:NAME``) names, for ``flag``."""
    import importlib
    import importlib.util
    import os

    source, sep, name = spec.rpartition(":")
    usage = (
        f"pass {flag} MODULE:NAME naming {what}, e.g. mypkg.models:make_model or "
        "path/to/models.py:make_model"
    )
    if not sep or not source or not all(p.isidentifier() for p in name.split(".")):
        raise ValueError(f"expected {flag} MODULE:NAME, got {spec!r}; {usage}")
    if source.endswith(".py") or os.sep in source:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"no file {source!r} (from {flag} {spec}); pass an existing "
                f"path/to/file.py:{name}"
            )
        # One module per file, executed once however many flags name it.
        module_name = "_rdiag_user_" + "".join(
            c if c.isalnum() else "_" for c in str(path.resolve())
        )
        loaded = sys.modules.get(module_name)
        loader = importlib.util.spec_from_file_location(module_name, path)
        module = loaded or importlib.util.module_from_spec(loader)
        sys.modules[module_name] = module  # dataclasses and pickling look it up
        run = (lambda: None) if loaded else (lambda: loader.loader.exec_module(module))
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `python -m`: the user's own modules
        module = None

        def run() -> None:
            nonlocal module
            module = importlib.import_module(source)

    try:
        run()
    except ModuleNotFoundError as err:
        parts = source.split(".")
        prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
        if err.name in prefixes:
            raise ImportError(
                f"cannot import module {source!r} (from {flag} {spec}): no module "
                f"named {err.name!r} in the current directory or the installed "
                f"packages; run from the directory that holds it, add that to "
                f"PYTHONPATH, or pass a file: path/to/{parts[-1]}.py:{name}"
            ) from err
        raise ImportError(
            f"importing {source!r} (from {flag} {spec}) failed: it imports "
            f"{err.name!r}, which is not installed; install it"
        ) from err
    except Exception as err:
        raise ImportError(
            f"importing {source!r} (from {flag} {spec}) failed: "
            f"{type(err).__name__}: {err}"
        ) from err
    obj: Any = module
    for part in name.split("."):
        if not hasattr(obj, part):
            defined = sorted(
                k
                for k, v in vars(module).items()
                if callable(v)
                and not k.startswith("_")
                and getattr(v, "__module__", None) == module.__name__
            )
            listed = ", ".join(defined[:10]) + (", ..." if len(defined) > 10 else "")
            raise AttributeError(
                f"module {source!r} has no attribute {name!r} (from {flag} {spec}); "
                f"it defines {listed or 'no functions or classes'}"
            )
        obj = getattr(obj, part)
    return obj


def _function(spec: str, flag: str, what: str, *args: str) -> Callable:
    """A function by ``MODULE:NAME`` that takes the arguments named by ``args``."""
    return _function_of(spec, flag, what, args)[0]


def _function_of(
    spec: str, flag: str, what: str, *calls: tuple[str, ...]
) -> tuple[Callable, tuple[str, ...]]:
    """A function by ``MODULE:NAME`` and the first of ``calls`` (argument names) it takes."""
    import inspect

    obj = _load(spec, flag, what)
    if not callable(obj):
        raise TypeError(
            f"expected {flag} {spec} to name {what}, got a {type(obj).__name__}; "
            "name a function"
        )
    try:
        signature = inspect.signature(obj)
    except ValueError:  # no signature to read (a builtin): let the call tell
        return obj, calls[0]
    for args in calls:
        try:
            signature.bind(*args)
        except TypeError:
            continue
        return obj, args
    shown = signature.replace(return_annotation=inspect.Signature.empty)
    name = getattr(obj, "__name__", type(obj).__name__)
    tried = " or ".join(f"{name}({', '.join(args)})" for args in calls)
    raise TypeError(
        f"expected {flag} {spec} to name {what}, got {name}{shown}, which "
        f"cannot be called as {tried}"
    )


def _cmd_meter(args: argparse.Namespace) -> int:
    import torch.nn.functional as F

    from rdiag.coord_check import DEFAULT_LR
    from rdiag.meter import (
        LRRule,
        default_data,
        optimizer_factory,
        richness_meter,
    )
    from rdiag.report import build_meter_report

    make_model = _function(
        args.factory, "--factory", "a function width -> nn.Module", "width"
    )
    loss = getattr(F, _LOSSES[args.loss])
    if args.optimizer_factory is not None:
        if args.lr is not None:
            raise ValueError(
                "expected --lr with --optimizer only; an --optimizer-factory sets its "
                "own rates (drop --lr, or use --optimizer sgd|adam --lr LR)"
            )
        what = "a function model -> torch.optim.Optimizer or an rdiag.LRRule"
        optimizer = _load(args.optimizer_factory, "--optimizer-factory", what)
        if not isinstance(optimizer, LRRule):
            optimizer = _function(
                args.optimizer_factory, "--optimizer-factory", what, "model"
            )
    else:
        kind = args.optimizer or "sgd"
        optimizer = optimizer_factory(kind, args.lr or DEFAULT_LR[kind])
    if args.data_factory is not None:
        make_data = _function(
            args.data_factory, "--data-factory", "a function () -> (x, y)"
        )
        data = make_data()
    else:
        data = default_data(
            make_model,
            loss,
            width=min(args.widths),
            n=args.batch_size,
            seed=args.data_seed,
        )
    result = richness_meter(
        make_model,
        optimizer,
        data,
        loss,
        widths=args.widths,
        steps=args.steps,
        seeds=args.seeds,
        target=args.target,
        ntk=not args.no_ntk,
    )
    saved = result.save(args.out)
    paths = build_meter_report(result, args.out)
    print(result.report())
    print(f"meter:   {saved.resolve()}")
    print(f"report:  {paths['html'].resolve()}")
    if "figure" in paths:
        print(f"figure:  {paths['figure'].resolve()}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from rdiag.report import build_report
    from rdiag.store import DB_NAME, Store

    from rdiag.meter import METER_JSON
    from rdiag.report import build_meter_report

    store = Path(args.store)
    if not (store / DB_NAME).is_file():
        if (store / METER_JSON).is_file():  # a meter alone
            paths = build_meter_report(store, args.out or store)
            print(f"report:  {paths['html'].resolve()}")
            return 0
        raise FileNotFoundError(
            f"no store at {args.store} (expected {store / DB_NAME}) and no "
            f"{METER_JSON}; pass the --out directory of `rdiag sweep`, `rdiag run` "
            "or `rdiag meter`"
        )
    paths = build_report(Store(store), args.out or store)
    print(f"report:  {Path(paths['html']).resolve()}")
    print(f"summary: {Path(paths['summary']).resolve()}")
    return 0


def _model_and_data(args: argparse.Namespace, loss: Any) -> tuple[Any, Any, str]:
    """``rdiag ntk`` / ``sharpness``: the model, its batch ``(x, y)`` and a description.

    The model is a built-in family (``--model``, ``--width``, ``--depth``,
    ``--parametrization``) or the user's ``--factory`` (called with ``--width``
    if it takes one); the batch is ``--data-factory``'s, else
    :func:`rdiag.meter.sample_batch` (``--n`` inputs, targets for ``loss``,
    seeded by ``--seed``). ``y`` is ``None`` for a data factory that returns
    inputs alone.
    """
    from torch import Tensor

    from rdiag.meter import _build, sample_batch
    from rdiag.models import make_model
    from rdiag.operators.curvature import is_batch

    if args.factory is None:
        for flag in ("depth", "width"):
            if getattr(args, flag) is None:
                setattr(args, flag, {"depth": 3, "width": 128}[flag])
        args.parametrization = args.parametrization or "mup"
        args.model = args.model or "mlp"
        model = make_model(
            args.model,
            args.width,
            parametrization=args.parametrization,
            seed=args.seed,
            depth=args.depth,
        )
        described = (
            f"{args.model} width={args.width} depth={args.depth} "
            f"parametrization={args.parametrization}"
        )
    else:
        for flag in ("depth", "parametrization"):
            if getattr(args, flag) is not None:
                raise ValueError(
                    f"expected --{flag} with a built-in --model only, got it with "
                    f"--factory {args.factory}; your factory builds the model as it is"
                )
        what = "a function () -> nn.Module or width -> nn.Module"
        make, takes = _function_of(args.factory, "--factory", what, (), ("width",))
        if not takes and args.width is not None:
            raise ValueError(
                f"expected --width with a factory of the width, got --factory "
                f"{args.factory}, which takes no argument; drop --width"
            )
        width = args.width or 128
        model = _build(lambda w: make(w) if takes else make(), width, args.seed)
        described = f"{args.factory}" + (f"({width})" if takes else "()")
    if args.data_factory is None:
        x, y = sample_batch(model, loss, n=args.n, seed=args.seed)
        return model, (x, y), described
    what = "a function () -> (x, y)"
    data = _function(args.data_factory, "--data-factory", what)()
    if isinstance(data, Tensor):
        return model, (data, None), described
    if is_batch(data):
        return model, tuple(data), described
    raise TypeError(
        f"expected --data-factory {args.data_factory} to return one batch (x, y) "
        f"of tensors, got {type(data).__name__}; return (inputs, targets)"
    )


def _emit(summary: dict[str, Any], out: str | None) -> None:
    for key, value in summary.items():
        print(f"{key}: {value}")
    if out:
        Path(out).write_text(json.dumps(summary, indent=2))
        print(f"written: {Path(out).resolve()}")


def _multipliers(model: Any) -> Any:
    """The parametrization's learning-rate ratios ``M`` of a prepared model, else ``None``."""
    from rdiag.parametrization import applied_parametrization, lr_multipliers

    return None if applied_parametrization(model) is None else lr_multipliers(model)


def _cmd_ntk(args: argparse.Namespace) -> int:
    import torch.nn.functional as F

    from rdiag import metrics
    from rdiag.ntk.api import empirical_ntk

    model, (x, _), described = _model_and_data(args, F.mse_loss)
    m = _multipliers(model)
    tic = time.perf_counter()
    k = empirical_ntk(
        model, x, implementation=args.implementation, lr_multipliers=m, mode=args.mode
    )
    seconds = time.perf_counter() - tic
    eigs = metrics.eigenvalues(k.double())
    kind = "learning-rate-weighted eNTK K_M" if m is not None else "eNTK K"
    _emit(
        {
            "model": described,
            "kernel": f"{kind}, shape {tuple(k.shape)}, traced over outputs",
            "seconds": round(seconds, 4),
            "trace": float(k.trace()),
            "top_eigenvalues": [round(v, 6) for v in eigs[: args.top].tolist()],
            "effective_rank": round(metrics.effective_rank(eigs), 4),
        },
        args.out,
    )
    return 0


def _cmd_sharpness(args: argparse.Namespace) -> int:
    import torch.nn.functional as F

    from rdiag.curvature import sharpness

    loss = getattr(F, _LOSSES[args.loss])
    model, (x, y), described = _model_and_data(args, loss)
    if y is None:
        raise ValueError(
            f"expected --data-factory {args.data_factory} to return (x, y) for "
            "sharpness (the loss needs targets), got inputs alone"
        )
    steps, diverged = _gd(model, loss, x, y, args.lr, args.steps)
    summary: dict[str, Any] = {
        "model": described,
        "loss": args.loss
        + (" on Gaussian targets" if args.data_factory is None else ""),
        "steps_of_gd": steps,
    }
    if diverged is None:
        summary["sharpness"] = sharpness(model, loss, (x, y), mode=args.mode)
        m = _multipliers(model)
        if m is not None:
            summary["sharpness_preconditioned"] = sharpness(
                model, loss, (x, y), lr_multipliers=m, mode=args.mode
            )
    else:
        summary["diverged"] = (
            f"GD {diverged}; stopped there and measured no sharpness; lower --lr"
        )
    summary["edge_of_stability_2_over_eta0"] = 2 / args.lr
    _emit(summary, args.out)
    return 0


def _gd(
    model: Any, loss_fn: Any, x: Any, y: Any, lr: float, steps: int
) -> tuple[int, str | None]:
    """Full-batch GD on ``loss_fn``, stopped at divergence; ``(steps done, why it stopped)``."""
    from rdiag.loop import DIVERGENCE_FACTOR, divergence_reason
    from rdiag.meter import optimizer_factory

    opt = optimizer_factory("sgd", lr)(model)  # per-layer rates if rdiag-prepared
    step, initial = 0, math.nan
    while True:
        loss = loss_fn(model(x), y)
        value = float(loss.detach())
        initial = value if step == 0 else initial
        reason = divergence_reason(value, initial, DIVERGENCE_FACTOR, step)
        if reason is not None or step == steps:
            return step, reason
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1


_COMMANDS = {
    "run": _cmd_run,
    "sweep": _cmd_sweep,
    "merge": _cmd_merge,
    "coord-check": _cmd_coord_check,
    "depth-check": _cmd_depth_check,
    "meter": _cmd_meter,
    "report": _cmd_report,
    "ntk": _cmd_ntk,
    "sharpness": _cmd_sharpness,
}


def _one_line(err: BaseException) -> str:
    """An error as one line; unexpected kinds are named, with the --debug hint."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else err
    text = " ".join(str(text).split())
    expected = (
        ValueError,
        TypeError,
        OSError,
        ImportError,
        KeyError,
        AttributeError,
        MemoryError,
    )
    if isinstance(err, (*expected, StoreError)):
        return text
    return f"{type(err).__name__}: {text} (rerun with --debug for the traceback)"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rdiag`` console script.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success (a sweep whose runs failed included: they
        are listed with their reasons), 1 for a merge that found conflicting
        records (listed). An error exits with status 2 and one line
        ``rdiag <command>: error: ...`` (``--debug``: the traceback instead); an
        interrupt with 130.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        parser.exit(130, f"rdiag {args.command}: interrupted\n")
    except Exception as err:
        if args.debug:
            raise
        parser.exit(2, f"rdiag {args.command}: error: {_one_line(err)}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
