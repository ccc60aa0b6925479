"""The ``rdiag`` command line's flags: one argparse parser, every value checked.

Numeric and path flags are checked by their ``type=`` before anything runs; a
bad value exits with status 2 and names the flag and what it allows.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from rdiag.data import DATASETS
from rdiag.models import FAMILIES
from rdiag.runs.config import OPTIMIZERS, parse_shard

_EPILOG = {
    "run": """examples:
  rdiag run --family mlp --width 256 --parametrization mup --lr 0.3 --steps 40 --out runs/
  rdiag run --family cnn --data digits --data-option flatten=false --width 32 --out runs/""",
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
  rdiag coord-check --family mlp --parametrization r=0.25 --widths 64 128 256 512 1024 --steps 10 \\
      --seeds 4 --out coord/
  rdiag coord-check --family transformer --parametrization mup --widths 32 64 128 256 --out coord_tf/""",
    "depth-check": """examples:
  rdiag depth-check --family resmlp --parametrization mup,depth=completep --depths 2 4 8 16 32 \\
      --width 64 --out depth/
  rdiag depth-check --family transformer --parametrization mup --optimizer adam --out depth_tf/
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
  rdiag ntk --family mlp --width 512 --parametrization mup --n 64
  rdiag ntk --family cnn --width 32 --n 32 --implementation jacobian --out ntk.json
  rdiag ntk --family bn_mlp --width 64 --n 32 --mode train   # batch statistics
  rdiag ntk --factory my_models.py:make_model --width 256 --n 32
  rdiag ntk --factory mypkg.models:build --data-factory mypkg.models:batch
      # build() or build(width) -> nn.Module; batch() -> (x, y) or x. Without
      # --data-factory: the model's sample_inputs, or Gaussian (n, in_features)
      # for a first nn.Linear""",
    "sharpness": """examples:
  rdiag sharpness --family mlp --width 256 --parametrization mup --n 64
  rdiag sharpness --family mlp --width 256 --parametrization ntk --lr 0.3 --steps 20
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
LOSSES = {"mse": "mse_loss", "cross_entropy": "cross_entropy"}


_COUNT, _POSITIVE, _RATE, _REAL = (
    _integer(0),
    _integer(1),
    _number(True),
    _number(False),
)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand and its flags (``rdiag --help``)."""
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
    run.add_argument("--family", choices=tuple(FAMILIES))
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
    sw.add_argument("--family", choices=tuple(FAMILIES))
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
    cc.add_argument("--family", choices=tuple(FAMILIES), default="mlp")
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
    dc.add_argument("--family", choices=("resmlp", "transformer"), default="resmlp")
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
    mt.add_argument("--loss", choices=tuple(LOSSES), default="mse")
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
            "--family", choices=tuple(FAMILIES), help="a built-in family (default mlp)"
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
            help="width of a built-in family or of a width -> nn.Module factory "
            "(default 128)",
        )
        p.add_argument("--depth", type=_POSITIVE, help="built-in families (default 3)")
        p.add_argument(
            "--parametrization",
            "--param",
            dest="parametrization",
            help="built-in families (default mup)",
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
                choices=tuple(LOSSES),
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
