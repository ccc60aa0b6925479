"""``RdiagMonitor``: a Lightning callback that runs a :class:`rdiag.Monitor`.

Three lines add rdiag to a Lightning script::

    from rdiag.integrations.lightning import RdiagMonitor
    monitor = RdiagMonitor(probe=(x_probe, y_probe), every=10, loss_fn=F.cross_entropy)
    trainer = L.Trainer(callbacks=[monitor], ...)

What it does, hook by hook:

* ``setup`` (fit): checks the model (trainable parameters, no sharded ones unless
  ``gather=``) and says once if the records have nowhere to go but ``.history``
  (no logger, no ``sinks=``, no ``store=``).
* ``on_train_batch_start`` of the first batch: the initialization check, before
  the first optimizer step (skipped by a resumed fit, whose Monitor state
  already holds it). The Monitor is built here, once the strategy has moved the
  module: the probe goes to the module's device and dtype and is checked
  against the model and the training batch.
* ``on_train_batch_end``: a check whenever ``trainer.global_step`` (optimizer
  steps) has advanced to a scheduled step; the Monitor's budget may skip it.
  Measurements run only in training-batch hooks, where gradients are enabled
  (never in validation or test hooks, which run under ``no_grad`` /
  inference mode).
* Records go to ``trainer.loggers`` (``log_metrics(records, step=global_step)``),
  the sinks and the store, on global rank zero only; the other ranks of a DDP
  run never measure and never wait (unless ``gather=``: then every rank enters the
  gather context at the scheduled steps, and the budget is off so that all
  ranks agree on them).
* ``state_dict`` / ``load_state_dict``: the Monitor's state travels in Lightning
  checkpoints, so ``trainer.fit(..., ckpt_path=...)`` measures movement from the
  original initialization.
* ``on_fit_end``: the cost report (checks run, checks skipped, seconds spent;
  :attr:`RdiagMonitor.cost`), logged by Lightning's ``rank_zero_info``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

from rdiag._optional import require
from rdiag.integrations._common import BUDGET_FRACTION, Adapter, Gather, MonitorAccess
from rdiag.monitor import CostReport, Schedule
from rdiag.sinks import Sink

_pl = require("lightning.pytorch", "rdiag.integrations.lightning")


class LoggersSink(Sink):
    """A trainer's loggers as a sink: ``log_metrics(records, step)`` on each.

    Args:
        trainer: The Lightning trainer (its ``loggers`` are read at every check).
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def log(self, name: str, value: float, step: int) -> None:
        """Log one record."""
        self.log_records({name: value}, step)

    def log_records(self, records: Mapping[str, float], step: int) -> None:
        """Log one check's records to every logger of the trainer."""
        for lg in self.trainer.loggers:
            lg.log_metrics(dict(records), step=step)


class RdiagMonitor(MonitorAccess, _pl.Callback):
    """Diagnostics of a LightningModule during ``Trainer.fit`` (see the module).

    Args:
        probe: The probe batch, in the form the module's ``forward`` takes (a
            tensor, tuple or dict of tensors), or ``(inputs, targets)``; keep it
            small (32-64 samples). Moved to the module's device and dtype.
        every: Check every ``k`` optimizer steps (``trainer.global_step``), at a
            list of steps, or where ``step -> bool`` is true.
        budget_fraction: Keep diagnostics below this fraction of training time
            by skipping scheduled checks (default 10%); ``None``: no budget.
        sinks: Where records go besides the trainer's loggers (and ``store=``):
            :mod:`rdiag.sinks` objects or callables ``(name, value, step)``.
        gather: For sharded parameters (FSDP, DeepSpeed ZeRO-3): ``module ->
            context manager`` in which they are whole, e.g. ``lambda m:
            FullyShardedDataParallel.summon_full_params(m)``. Without it sharded
            parameters raise at setup.
        **monitor_options: Options of :class:`rdiag.Monitor` (``metrics=``,
            ``loss_fn=``, ``store=``, ``run_id=``, ``mode=``, ``output_fn=``,
            ``lr_multipliers=``, ...). With an Adam-type optimizer and no
            ``optimizer=``/``lr_multipliers=``, the trainer's optimizer
            preconditions the sharpness.

    Raises:
        TypeError: An option the Monitor does not take.
        ValueError: ``probe`` is None.
    """

    def __init__(
        self,
        probe: Any,
        *,
        every: Schedule = 10,
        budget_fraction: float | None = BUDGET_FRACTION,
        sinks: Iterable[Sink | Callable[[str, float, int], None]] = (),
        gather: Gather | None = None,
        **monitor_options: Any,
    ) -> None:
        self._core = Adapter(
            probe, every, budget_fraction, sinks, gather, monitor_options
        )
        self._last_step: int | None = None
        self.cost: CostReport | None = None

    def setup(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        """Check the model and whether the records have somewhere to go."""
        if stage != "fit":
            return
        self._core.check_model(pl_module)
        if trainer.is_global_zero:
            self._core.no_destination(bool(trainer.loggers))

    def on_train_batch_start(
        self, trainer: Any, pl_module: nn.Module, batch: Any, batch_idx: int
    ) -> None:
        """The initialization check, before the first optimizer step."""
        if self._last_step is not None:
            return
        self._last_step = trainer.global_step
        if self._core.state_dict().get("checks", 0) == 0:
            self._check(trainer, pl_module, batch)

    def on_train_batch_end(
        self,
        trainer: Any,
        pl_module: nn.Module,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """A check when an optimizer step has been taken (schedule and budget)."""
        if trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self._check(trainer, pl_module, batch)

    def on_fit_end(self, trainer: Any, pl_module: nn.Module) -> None:
        """Report the cost and close the sinks (rank zero)."""
        if trainer.is_global_zero:
            self.cost = self._core.finish()
            if self.cost is not None:
                _pl.utilities.rank_zero_info(str(self.cost))

    def state_dict(self) -> dict[str, Any]:
        """The Monitor's state, saved in Lightning checkpoints."""
        return self._core.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the Monitor's state (applied when the Monitor is built)."""
        self._core.load_state_dict(state_dict)

    def _check(self, trainer: Any, pl_module: nn.Module, batch: Any) -> None:
        optimizers = trainer.optimizers
        self._core.check(
            pl_module,
            trainer.global_step,
            main=trainer.is_global_zero,
            batch=batch,
            extra_sinks=[LoggersSink(trainer)],
            optimizer=optimizers[0] if len(optimizers) == 1 else None,
        )
