"""``rdiag`` command line: the subcommands of the README, each a call of the public API.

run, sweep, merge, coord-check, depth-check, meter, report, ntk, sharpness.

Every subcommand parses its flags and calls the public API (:func:`rdiag.runs.training.train`,
:func:`rdiag.runs.sweep.sweep`, :func:`rdiag.coord_check.coord_check`,
:func:`rdiag.depth_check`, :func:`rdiag.richness_meter`, :func:`rdiag.report.build_report`,
:func:`rdiag.empirical_ntk`, :func:`rdiag.curvature.sharpness`); it has no logic of
its own beyond loading the user's factories (``MODULE:NAME``) and printing where
results went.

``rdiag ntk`` and ``rdiag sharpness`` measure a built-in family (``--family``)
or the user's model (``--factory MODULE:FUNCTION``, a function of no argument or
of the width, ``--width``), on ``--data-factory``'s batch or else on ``--n``
inputs from the model's ``sample_inputs`` or Gaussian for its first
``nn.Linear``, with targets for ``--loss`` (:func:`rdiag.data.sample_batch`);
the factories are loaded and checked as the meter's.

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
argparse before anything runs. A sweep whose runs failed (diverged, a
diagnostic failed) still exits 0 and lists the failed runs with their reasons; a
sweep that lost a run (its worker process died twice) exits 1, and so does a
merge that found conflicting records (listed).
"""

from __future__ import annotations

from collections.abc import Sequence

from rdiag.cli.commands import COMMANDS
from rdiag.cli.parser import build_parser
from rdiag.runs.store import StoreError


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
        are listed with their reasons), 1 for a sweep that lost a run with its
        worker or a merge that found conflicting records (listed). An error exits with status 2 and one line
        ``rdiag <command>: error: ...`` (``--debug``: the traceback instead); an
        interrupt with 130.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        parser.exit(130, f"rdiag {args.command}: interrupted\n")
    except Exception as err:
        if args.debug:
            raise
        parser.exit(2, f"rdiag {args.command}: error: {_one_line(err)}\n")
    return 1
