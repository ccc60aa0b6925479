"""Sinks: where a Monitor's records go besides its store.

The :class:`~rdiag.runs.store.Store` stays the source of truth; a sink receives the
same records as ``(name, value, step)`` (names from :mod:`rdiag.records`) at each
check: :class:`TensorBoardSink`, :class:`WandbSink`, :class:`MLflowSink`,
:class:`CSVSink`, or any callable ``(name, value, step) -> None``. Each sink
imports its package when it is built, from its extra
(``pip install 'rdiag[tensorboard]'``, ``[wandb]``, ``[mlflow]``); ``import rdiag``
imports none of them. A sink flushes at the end of every check, so a killed run
keeps what was measured; :meth:`Sink.close` (called by
:meth:`rdiag.Monitor.close` and by the trainer callbacks at the end of training)
releases what the sink opened itself, and nothing that was handed to it.
"""

from __future__ import annotations

import csv
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from rdiag._optional import require


class Sink:
    """Receives records ``(name, value, step)``; subclasses implement :meth:`log`.

    A subclass that writes a whole check at once overrides :meth:`log_records`
    instead (and :meth:`log` calls it).
    """

    def log(self, name: str, value: float, step: int) -> None:
        """Write one record.

        Args:
            name: The record name (e.g. ``"ntk/rel_change"``).
            value: Its value.
            step: The training step it was measured at.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement log()")

    def log_records(self, records: Mapping[str, float], step: int) -> None:
        """Write the records of one check, then flush."""
        for name, value in records.items():
            self.log(name, value, step)
        self.flush()

    def flush(self) -> None:
        """Make what was written durable (no-op by default)."""

    def close(self) -> None:
        """Release what the sink opened itself (no-op by default)."""


class FunctionSink(Sink):
    """A callable ``fn(name, value, step)`` as a sink.

    Args:
        fn: Called once per record.
    """

    def __init__(self, fn: Callable[[str, float, int], None]) -> None:
        self.fn = fn

    def log(self, name: str, value: float, step: int) -> None:
        """Call ``fn(name, value, step)``."""
        self.fn(name, value, step)


def as_sinks(sinks: Iterable[Sink | Callable[[str, float, int], None]]) -> list[Sink]:
    """Validate ``sinks=``: :class:`Sink` objects or callables ``(name, value, step)``.

    Returns:
        The sinks, callables wrapped in :class:`FunctionSink`.

    Raises:
        TypeError: ``sinks`` is not an iterable of those.
    """
    if isinstance(sinks, (Sink, str, bytes)) or not isinstance(sinks, Iterable):
        raise TypeError(
            f"expected sinks= to be a list of rdiag.sinks.Sink objects or callables "
            f"(name, value, step), got {type(sinks).__name__}; wrap one sink in a list"
        )
    out = []
    for sink in sinks:
        if isinstance(sink, Sink):
            out.append(sink)
        elif callable(sink):
            out.append(FunctionSink(sink))
        else:
            raise TypeError(
                f"expected each sink to be a rdiag.sinks.Sink or a callable (name, value, "
                f"step), got {type(sink).__name__}; e.g. rdiag.sinks.CSVSink('runs.csv')"
            )
    return out


class TensorBoardSink(Sink):
    """Scalars in a TensorBoard event file (``torch.utils.tensorboard.SummaryWriter``).

    Args:
        log_dir: Directory of the event files (a writer is opened there and closed
            by :meth:`close`).
        writer: An open ``SummaryWriter`` to write to instead (left open).

    Raises:
        ImportError: ``tensorboard`` is not installed (``pip install 'rdiag[tensorboard]'``).
        ValueError: Both or neither of ``log_dir`` and ``writer``.
    """

    def __init__(self, log_dir: str | os.PathLike | None = None, *, writer: Any = None):
        if (log_dir is None) == (writer is None):
            raise ValueError(
                "expected exactly one of log_dir= and writer=, got "
                f"{'both' if writer is not None else 'neither'}; pass a directory, "
                "e.g. TensorBoardSink('runs/rdiag')"
            )
        require("tensorboard", "TensorBoardSink")
        if writer is None:
            writer = require(
                "torch.utils.tensorboard", "TensorBoardSink"
            ).SummaryWriter(str(log_dir))
        self.writer, self._owned = writer, log_dir is not None

    def log(self, name: str, value: float, step: int) -> None:
        """``writer.add_scalar(name, value, step)``."""
        self.writer.add_scalar(name, value, step)

    def flush(self) -> None:
        """Flush the event file."""
        self.writer.flush()

    def close(self) -> None:
        """Close the writer if this sink opened it."""
        if self._owned:
            self.writer.close()


class WandbSink(Sink):
    """Records in a Weights & Biases run, plotted against their own step.

    Each record is logged with a ``monitor/step`` entry declared as its step metric
    (``run.define_metric``), so the records line up with the training step even
    in a run that other code also logs to with its own step counter.

    Args:
        run: A ``wandb`` run to log to (left open); default a new one.
        **init: Arguments of ``wandb.init`` for the new run (e.g. ``project=``,
            ``mode="offline"``, ``dir=``); it is finished by :meth:`close`.

    Raises:
        ImportError: ``wandb`` is not installed (``pip install 'rdiag[wandb]'``).
    """

    STEP = "monitor/step"

    def __init__(self, run: Any = None, **init: Any) -> None:
        wandb = require("wandb", "WandbSink")
        self._owned = run is None
        self.run = wandb.init(**init) if run is None else run
        self.run.define_metric(self.STEP)
        self._declared: set[str] = set()

    def log(self, name: str, value: float, step: int) -> None:
        """Log one record (prefer :meth:`log_records`: one W&B row per check)."""
        self.log_records({name: value}, step)

    def log_records(self, records: Mapping[str, float], step: int) -> None:
        """Log the check as one row with its ``monitor/step``."""
        for name in set(records) - self._declared:
            self.run.define_metric(name, step_metric=self.STEP)
            self._declared.add(name)
        self.run.log({**records, self.STEP: step})

    def close(self) -> None:
        """Finish the run if this sink started it."""
        if self._owned:
            self.run.finish()


class MLflowSink(Sink):
    """Records as MLflow metrics (``MlflowClient.log_batch``, one batch per check).

    Args:
        run_id: The MLflow run to log to (left open); default a new run in
            ``experiment`` (ended by :meth:`close`).
        tracking_uri: The tracking server or store, e.g. ``"file:///tmp/mlruns"`` or
            ``"sqlite:///mlflow.db"`` (default MLflow's own default).
        experiment: Experiment name of the new run (created if missing).

    Raises:
        ImportError: ``mlflow`` is not installed (``pip install 'rdiag[mlflow]'``).
    """

    def __init__(
        self,
        run_id: str | None = None,
        *,
        tracking_uri: str | None = None,
        experiment: str = "rdiag",
    ) -> None:
        self._mlflow = require("mlflow", "MLflowSink")
        self.client = self._mlflow.MlflowClient(tracking_uri=tracking_uri)
        self._owned = run_id is None
        if run_id is None:
            found = self.client.get_experiment_by_name(experiment)
            eid = (
                self.client.create_experiment(experiment)
                if found is None
                else found.experiment_id
            )
            run_id = self.client.create_run(eid).info.run_id
        self.run_id = run_id

    def log(self, name: str, value: float, step: int) -> None:
        """Log one metric."""
        self.log_records({name: value}, step)

    def log_records(self, records: Mapping[str, float], step: int) -> None:
        """Log the check's metrics in one batch."""
        metric = self._mlflow.entities.Metric
        now = int(time.time() * 1000)
        batch = [metric(k, float(v), now, int(step)) for k, v in records.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def close(self) -> None:
        """End the run if this sink created it."""
        if self._owned:
            self.client.set_terminated(self.run_id)


class CSVSink(Sink):
    """Records appended to a CSV file with the columns ``run, step, name, value``.

    The ``run`` column tells apart the runs written into one file (two Monitors,
    a resumed job, the runs of a sweep): each sink writes its ``run`` label on
    every row. The file is opened per check (append), so nothing stays open; the
    header is written when the file is new or empty. Non-finite values are
    written as ``nan`` / ``inf``.

    Args:
        path: The CSV file (its directory is created if missing).
        run: The label of this sink's rows, e.g. a store's run id or an
            experiment name; default a new label per sink,
            ``<YYYYmmddTHHMMSS>-<pid>-<6 hex digits>`` (unique per process and
            construction), kept as :attr:`run`.

    Raises:
        ValueError: ``path`` is a directory, or an existing file whose header is
            not ``run,step,name,value`` (a file of another format, or one
            written before the run column): appending would mix the formats.
    """

    HEADER = ("run", "step", "name", "value")

    def __init__(self, path: str | os.PathLike, run: str | int | None = None) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(
                f"expected a CSV file path, got the directory {self.path}; pass e.g. "
                f"{str(self.path / 'records.csv')!r}"
            )
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, newline="", encoding="utf-8") as f:
                header = tuple(next(csv.reader(f), ()))
            if header != self.HEADER:
                raise ValueError(
                    f"expected {self.path} to have the header {','.join(self.HEADER)}, "
                    f"got {','.join(header)!r}; appending would mix two formats "
                    "(files written before the run column have step,name,value): "
                    "write to a new file"
                )
        if run is None:
            run = (
                f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            )
        self.run = str(run)

    def log(self, name: str, value: float, step: int) -> None:
        """Append one row."""
        self.log_records({name: value}, step)

    def log_records(self, records: Mapping[str, float], step: int) -> None:
        """Append one row per record."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(self.HEADER)
            writer.writerows(
                (self.run, int(step), k, repr(float(v))) for k, v in records.items()
            )
