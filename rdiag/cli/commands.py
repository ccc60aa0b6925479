"""The ``rdiag`` subcommands: each calls the public API and prints where results went.

One function per subcommand (``COMMANDS``), given the parsed flags
(:func:`rdiag.cli.parser.build_parser`); the user's factories come from
:mod:`rdiag.cli.factories`; training inside a command (``rdiag sharpness
--steps``) goes through :func:`rdiag.loop.fit`, the one training loop.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rdiag import metrics
from rdiag.cli.factories import load_function, load_function_of, load_object
from rdiag.cli.parser import LOSSES
from rdiag.coord_check import DEFAULT_LR, coord_check, plot_coord_check
from rdiag.curvature import sharpness
from rdiag.data import sample_batch
from rdiag.depth_check import depth_check
from rdiag.loop import fit
from rdiag.meter import (
    METER_JSON,
    LRRule,
    _build,
    default_data,
    optimizer_factory,
    richness_meter,
)
from rdiag.models import make_model
from rdiag.ntk.handle import empirical_ntk
from rdiag.operators.curvature import is_batch
from rdiag.parametrization import applied_parametrization, lr_multipliers
from rdiag.report import build_meter_report, build_report, run_label
from rdiag.runs.config import load_train_config
from rdiag.runs.merge import merge_stores
from rdiag.runs.store import DB_NAME, Store
from rdiag.runs.sweep import sweep
from rdiag.runs.training import train


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"true": True, "false": False}.get(text.lower(), text)


def _cmd_run(args: argparse.Namespace) -> int:
    config = load_train_config(args.config) if args.config else {}
    flags = {
        k: getattr(args, k)
        for k in (
            "family",
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
    base: dict[str, Any] = {}
    grid: dict[str, Any] = {}
    for key in ("family", "steps", "every"):
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
    lost = [r.run_id for r in result.results if r.lost]
    if lost:
        print(f"{len(lost)} run(s) lost with their worker: {' '.join(lost)}")
        return 1
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:

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

    result = coord_check(
        args.family,
        args.parametrization,
        args.widths,
        steps=args.steps,
        seeds=args.seeds,
        lr=args.lr,
        optimizer=args.optimizer,
    )
    return _write_check(result, Path(args.out), "coord_check.png")


def _cmd_depth_check(args: argparse.Namespace) -> int:

    result = depth_check(
        args.family,
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


def _cmd_meter(args: argparse.Namespace) -> int:

    make_model = load_function(
        args.factory, "--factory", "a function width -> nn.Module", "width"
    )
    loss = getattr(F, LOSSES[args.loss])
    if args.optimizer_factory is not None:
        if args.lr is not None:
            raise ValueError(
                "expected --lr with --optimizer only; an --optimizer-factory sets its "
                "own rates (drop --lr, or use --optimizer sgd|adam --lr LR)"
            )
        what = "a function model -> torch.optim.Optimizer or an rdiag.LRRule"
        optimizer = load_object(args.optimizer_factory, "--optimizer-factory", what)
        if not isinstance(optimizer, LRRule):
            optimizer = load_function(
                args.optimizer_factory, "--optimizer-factory", what, "model"
            )
    else:
        kind = args.optimizer or "sgd"
        optimizer = optimizer_factory(kind, args.lr or DEFAULT_LR[kind])
    if args.data_factory is not None:
        make_data = load_function(
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

    The model is a built-in family (``--family``, ``--width``, ``--depth``,
    ``--parametrization``) or the user's ``--factory`` (called with ``--width``
    if it takes one); the batch is ``--data-factory``'s, else
    :func:`rdiag.data.sample_batch` (``--n`` inputs, targets for ``loss``,
    seeded by ``--seed``). ``y`` is ``None`` for a data factory that returns
    inputs alone.
    """
    if args.factory is None:
        args.family = args.family or "mlp"
        args.width = args.width or 128
        args.depth = args.depth or 3
        args.parametrization = args.parametrization or "mup"
        model = make_model(
            args.family,
            args.width,
            parametrization=args.parametrization,
            seed=args.seed,
            depth=args.depth,
        )
        described = (
            f"{args.family} width={args.width} depth={args.depth} "
            f"parametrization={args.parametrization}"
        )
    else:
        for flag in ("depth", "parametrization"):
            if getattr(args, flag) is not None:
                raise ValueError(
                    f"expected --{flag} with a built-in --family only, got it with "
                    f"--factory {args.factory}; your factory builds the model as it is"
                )
        what = "a function () -> nn.Module or width -> nn.Module"
        make, takes = load_function_of(args.factory, "--factory", what, (), ("width",))
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
    data = load_function(args.data_factory, "--data-factory", what)()
    if isinstance(data, torch.Tensor):
        return model, (data, None), described
    if is_batch(data):
        return model, tuple(data), described
    raise TypeError(
        f"expected --data-factory {args.data_factory} to return one batch (x, y) "
        f"of tensors, got {type(data).__name__}; return (inputs, targets)"
    )


def _multipliers(model: Any) -> Any:
    """The parametrization's learning-rate ratios ``M`` of a prepared model, else ``None``."""
    return None if applied_parametrization(model) is None else lr_multipliers(model)


def _emit(summary: dict[str, Any], out: str | None) -> None:
    for key, value in summary.items():
        print(f"{key}: {value}")
    if out:
        Path(out).write_text(json.dumps(summary, indent=2))
        print(f"written: {Path(out).resolve()}")


def _cmd_ntk(args: argparse.Namespace) -> int:
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
            "family": described,
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
    loss = getattr(F, LOSSES[args.loss])
    model, (x, y), described = _model_and_data(args, loss)
    if y is None:
        raise ValueError(
            f"expected --data-factory {args.data_factory} to return (x, y) for "
            "sharpness (the loss needs targets), got inputs alone"
        )
    steps, diverged = _gd(model, loss, x, y, args.lr, args.steps)
    summary: dict[str, Any] = {
        "family": described,
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
    """Full-batch GD by :func:`rdiag.loop.fit`; ``(steps done, why it stopped)``.

    The optimizer is :func:`rdiag.meter.optimizer_factory`'s SGD: an
    rdiag-prepared model's per-layer rates, any other one ``lr`` everywhere.
    """
    opt = optimizer_factory("sgd", lr)(model)
    result = fit(model, opt, itertools.repeat((x, y), steps), loss_fn, steps=steps)
    return result.steps, result.reason


COMMANDS = {
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
