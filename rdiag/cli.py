"""``rdiag`` command line: run, sweep, coord-check, report, ntk, sharpness.

Every subcommand parses its flags and calls the public API (:func:`rdiag.harness.train`,
:func:`rdiag.harness.sweep`, :func:`rdiag.coord_check.coord_check`,
:func:`rdiag.report.build_report`, :func:`rdiag.empirical_ntk`,
:func:`rdiag.curvature.sharpness`); it has no logic of its own beyond printing
where results went. Errors in configs or paths exit with status 2 and a message
naming the field and its allowed values.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rdiag.data import DATASETS
from rdiag.harness import MODELS, OPTIMIZERS

_EPILOG = {
    "run": """examples:
  rdiag run --model mlp --width 256 --param mup --lr 0.3 --steps 40 --out runs/
  rdiag run --model cnn --data digits --data-option flatten=false --width 32 --out runs/""",
    "sweep": """examples:
  rdiag sweep --config default --out results/          # the main job (CPU, minutes)
  rdiag sweep --config default --r 0 0.5 --widths 64 256 1024 --seeds 2 --steps 20 --out quick/
  rdiag sweep --config my_sweep.yaml --workers 4 --out results/""",
    "coord-check": """examples:
  rdiag coord-check --model mlp --param r=0.25 --widths 64 128 256 512 1024 --steps 10 \\
      --seeds 4 --out coord/
  rdiag coord-check --model transformer --param mup --widths 32 64 128 256 --out coord_tf/""",
    "report": """examples:
  rdiag report --store results/ --out results/""",
    "ntk": """examples:
  rdiag ntk --model mlp --width 512 --param mup --n 64
  rdiag ntk --model cnn --width 32 --n 32 --implementation jacobian --out ntk.json""",
    "sharpness": """examples:
  rdiag sharpness --model mlp --width 256 --param mup --n 64
  rdiag sharpness --model mlp --width 256 --param ntk --lr 0.3 --steps 20""",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rdiag",
        description="Kernel (eNTK) and Hessian diagnostics across the lazy-rich scale.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=_EPILOG[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    run = add("run", "train one configuration with the Monitor into a store")
    run.add_argument(
        "--config", help="YAML file with TrainConfig fields (flags override it)"
    )
    run.add_argument("--model", choices=MODELS)
    run.add_argument("--width", type=int)
    run.add_argument("--depth", type=int)
    run.add_argument("--param", help="r=0.25 | ntk | mup | mf | sp | gamma=0.1")
    run.add_argument("--optimizer", choices=OPTIMIZERS)
    run.add_argument("--lr", type=float)
    run.add_argument("--steps", type=int)
    run.add_argument("--batch-size", type=int)
    run.add_argument("--data", choices=DATASETS)
    run.add_argument(
        "--data-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="data loader option, e.g. root=/data/cifar-10-batches-py",
    )
    run.add_argument("--seed", type=int)
    run.add_argument("--every", type=int)
    run.add_argument("--metrics", nargs="+")
    run.add_argument("--dtype", choices=("float32", "float64"))
    run.add_argument("--device", choices=("cpu", "cuda", "auto"))
    run.add_argument("--out", required=True, help="store directory")

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
    group.add_argument("--r", type=float, nargs="+", help="richness values (grid)")
    group.add_argument(
        "--param", nargs="+", help="parameterizations (grid), e.g. mup ntk sp"
    )
    sw.add_argument("--widths", type=int, nargs="+")
    sw.add_argument("--seeds", type=int, metavar="K", help="seeds 0..K-1")
    sw.add_argument("--lr", type=float, nargs="+", help="base learning rates (grid)")
    sw.add_argument("--steps", type=int)
    sw.add_argument("--every", type=int)
    sw.add_argument("--workers", type=int)
    sw.add_argument("--no-report", action="store_true", help="skip figures and report")
    sw.add_argument(
        "--out", required=True, help="output directory (store, figures, report)"
    )

    cc = add("coord-check", "coordinate check of a parameterization over widths")
    cc.add_argument("--model", choices=MODELS, default="mlp")
    cc.add_argument("--param", default="mup")
    cc.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    cc.add_argument("--steps", type=int, default=10)
    cc.add_argument("--seeds", type=int, default=4, metavar="K")
    cc.add_argument("--lr", type=float, default=0.1)
    cc.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    cc.add_argument("--out", required=True)

    rep = add("report", "figures, summary.json and report.html from a store")
    rep.add_argument("--store", required=True, help="store directory")
    rep.add_argument("--out", help="output directory (default: the store directory)")

    for name, help_ in (
        ("ntk", "eNTK of a built-in model and its spectrum"),
        ("sharpness", "raw and preconditioned sharpness of a built-in model"),
    ):
        p = add(name, help_)
        p.add_argument("--model", choices=MODELS, default="mlp")
        p.add_argument("--width", type=int, default=128)
        p.add_argument("--depth", type=int, default=3)
        p.add_argument("--param", default="mup")
        p.add_argument("--n", type=int, default=64, help="number of inputs")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", help="also write the summary as JSON here")
        if name == "ntk":
            p.add_argument(
                "--implementation",
                default="auto",
                choices=("auto", "jacobian", "ntvp", "structured"),
            )
            p.add_argument("--top", type=int, default=10, help="eigenvalues to print")
        else:
            p.add_argument(
                "--lr", type=float, default=0.1, help="base rate of --steps of GD"
            )
            p.add_argument(
                "--steps", type=int, default=0, help="GD steps before measuring"
            )
    return parser


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"true": True, "false": False}.get(text.lower(), text)


def _cmd_run(args: argparse.Namespace) -> int:
    from rdiag.harness import train

    config: dict[str, Any] = {}
    if args.config:
        yaml = __import__("rdiag._optional", fromlist=["require"]).require(
            "yaml", "--config"
        )
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        config = yaml.safe_load(path.read_text()) or {}
    flags = {
        k: getattr(args, k)
        for k in (
            "model",
            "width",
            "depth",
            "param",
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
    if args.param is not None:
        grid["param"] = args.param
    if args.widths is not None:
        grid["width"] = args.widths
    if args.seeds is not None:
        if args.seeds <= 0:
            raise ValueError(f"expected --seeds K >= 1, got {args.seeds}")
        grid["seed"] = list(range(args.seeds))
    if args.lr is not None:
        grid["lr"] = args.lr
    tic = time.perf_counter()
    result = sweep(
        args.config,
        out=args.out,
        workers=args.workers,
        progress=True,
        report=False if args.no_report else None,
        overrides={"base": base, "grid": grid},
    )
    out = Path(args.out).resolve()
    print(
        f"{len(result.results)} runs ({result.count('finished')} finished, "
        f"{result.count('skipped')} already done, {result.count('failed')} failed) "
        f"in {time.perf_counter() - tic:.0f} s"
    )
    print(f"store:   {out / 'rdiag.sqlite'}")
    if result.report:
        print(f"report:  {Path(result.report['html']).resolve()}")
        print(f"summary: {Path(result.report['summary']).resolve()}")
        print(f"figures: {out / 'figures'}")
        _print_fits(json.loads(Path(result.report["summary"]).read_text())["fits"])
    return 0


def _print_fits(fits: list[dict]) -> None:
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
        print(
            f"  {f['metric']:15s} {f['layer'] or '':9s} {f['param']:8s} slope "
            f"{f['slope']:+.3f} {ci}  predicted {pred}"
        )


def _cmd_coord_check(args: argparse.Namespace) -> int:
    from rdiag.coord_check import coord_check, plot_coord_check, write_summary

    result = coord_check(
        args.model,
        args.param,
        args.widths,
        steps=args.steps,
        seeds=args.seeds,
        lr=args.lr,
        optimizer=args.optimizer,
    )
    out = Path(args.out)
    summary = write_summary(result, out)
    figure = plot_coord_check(result, out / "coord_check.png")
    print(f"summary: {summary.resolve()}")
    print(f"figure:  {Path(figure).resolve()}")
    _print_fits(result.fits)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from rdiag.report import build_report
    from rdiag.store import DB_NAME, Store

    if not (Path(args.store) / DB_NAME).is_file():
        raise FileNotFoundError(
            f"no store at {args.store} (expected {Path(args.store) / DB_NAME}); pass the --out "
            "directory of `rdiag sweep` or `rdiag run`"
        )
    paths = build_report(Store(args.store), args.out or args.store)
    print(f"report:  {Path(paths['html']).resolve()}")
    print(f"summary: {Path(paths['summary']).resolve()}")
    return 0


def _built_in(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch

    from rdiag.models import make_model

    opts: dict[str, Any] = {"depth": args.depth}
    model = make_model(
        args.model, args.width, parametrization=args.param, seed=args.seed, **opts
    )
    inner = getattr(model, "model", model)
    x = inner.sample_inputs(args.n, torch.Generator().manual_seed(args.seed))
    return model, x


def _emit(summary: dict[str, Any], out: str | None) -> None:
    for key, value in summary.items():
        print(f"{key}: {value}")
    if out:
        Path(out).write_text(json.dumps(summary, indent=2))
        print(f"written: {Path(out).resolve()}")


def _cmd_ntk(args: argparse.Namespace) -> int:
    from rdiag import metrics
    from rdiag.ntk.api import empirical_ntk
    from rdiag.parametrization import lr_multipliers

    model, x = _built_in(args)
    tic = time.perf_counter()
    k = empirical_ntk(
        model, x, implementation=args.implementation, weights=lr_multipliers(model)
    )
    seconds = time.perf_counter() - tic
    eigs = metrics.eigenvalues(k.double())
    _emit(
        {
            "model": f"{args.model} width={args.width} depth={args.depth} param={args.param}",
            "kernel": f"learning-rate-weighted eNTK K_M, shape {tuple(k.shape)}, traced over outputs",
            "seconds": round(seconds, 4),
            "trace": float(k.trace()),
            "top_eigenvalues": [round(v, 6) for v in eigs[: args.top].tolist()],
            "effective_rank": round(metrics.effective_rank(eigs), 4),
        },
        args.out,
    )
    return 0


def _cmd_sharpness(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    from rdiag.curvature import sharpness
    from rdiag.parametrization import lr_multipliers, make_optimizer

    model, x = _built_in(args)
    with torch.no_grad():
        y = torch.randn(
            model(x).shape, generator=torch.Generator().manual_seed(args.seed + 1)
        )
    opt = make_optimizer(model, None, args.lr)
    for _ in range(args.steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    raw = sharpness(model, F.mse_loss, (x, y))
    pre = sharpness(model, F.mse_loss, (x, y), preconditioner=lr_multipliers(model))
    _emit(
        {
            "model": f"{args.model} width={args.width} depth={args.depth} param={args.param}",
            "loss": "mse on Gaussian targets",
            "steps_of_gd": args.steps,
            "sharpness": raw,
            "sharpness_preconditioned": pre,
            "edge_of_stability_2_over_eta0": 2 / args.lr,
        },
        args.out,
    )
    return 0


_COMMANDS = {
    "run": _cmd_run,
    "sweep": _cmd_sweep,
    "coord-check": _cmd_coord_check,
    "report": _cmd_report,
    "ntk": _cmd_ntk,
    "sharpness": _cmd_sharpness,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rdiag`` console script.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status (0 on success; errors exit with 2 and a message).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        parser.exit(2, f"rdiag {args.command}: error: {err}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
