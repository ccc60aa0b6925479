"""``RdiagCallback``: a Hugging Face ``TrainerCallback`` that runs a :class:`rdiag.Monitor`.

Three lines add rdiag to a Hugging Face script::

    from rdiag.integrations.hf import RdiagCallback
    callback = RdiagCallback(probe=eval_dataset.select(range(32)), every=10)
    trainer = Trainer(model, args, train_dataset=..., callbacks=[callback])

What it does:

* ``on_train_begin``: the initialization check (the model the Trainer passes,
  the probe moved to its device and dtype and checked against it); a resumed
  run instead restores the Monitor's state from the checkpoint and goes on
  measuring movement from the original initialization.
* ``on_step_end``: the scheduled checks at ``state.global_step`` (optimizer
  steps); the Monitor's budget may skip them.
* Records go to the Trainer's logs (``state.log_history``, one entry ``{name:
  value, ..., "step": step}`` per check, saved in ``trainer_state.json``), the
  sinks and the store, only where ``state.is_world_process_zero``; other
  processes never measure and never wait. The Trainer's reporting integrations
  (``report_to=``) only see what ``Trainer.log`` logs, so send the records to
  TensorBoard, W&B or MLflow with ``sinks=`` (:mod:`rdiag.sinks`).
* ``on_save``: the Monitor's state (references: initial kernel, representations,
  weights) goes to ``rdiag_monitor.pt`` in the checkpoint folder, and its
  counters to ``trainer_state.json`` through ``ExportableState``; on resume the
  file is read from ``<output_dir>/checkpoint-<global_step>``. Leave
  ``restore_callback_states_from_checkpoint`` off: the Trainer would rebuild the
  callback from JSON, without its probe.
* ``on_train_end``: the cost report (checks run, checks skipped, seconds spent;
  :attr:`RdiagCallback.cost`), logged by the ``rdiag`` logger.

The probe is a batch in the Trainer's collated format (a dict such as
``{"input_ids", "attention_mask", "labels"}``), ``(inputs, targets)``, or a
dataset of examples collated with ``collator=`` (default the Trainer's own data
collator). ``labels`` become the targets; for a causal language model (detected
from its class, or ``shift_labels=True``) they are shifted so that they align
with the logits (:func:`rdiag.losses.shift_labels`; from ``input_ids``, padding
ignored, when the batch has no labels), as the model itself shifts them when it
computes its loss. The default loss is cross-entropy for integer targets (every
position of a sequence output) and MSE for floating ones.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdiag._optional import require
from rdiag.integrations._common import BUDGET_FRACTION, Adapter, Gather, MonitorAccess
from rdiag.losses import IGNORE_INDEX, shift_labels
from rdiag.monitor import DEFAULT_METRICS, CostReport, Schedule
from rdiag.sinks import Sink

_callbacks = require("transformers.trainer_callback", "rdiag.integrations.hf")
_auto = require("transformers.models.auto.modeling_auto", "rdiag.integrations.hf")

#: The file in each checkpoint folder that holds the Monitor's state.
STATE_FILE = "rdiag_monitor.pt"
#: Metrics that need no targets (the default when the probe has no labels).
_NO_TARGETS = ("ntk", "features", "representations", "weights")


class LogHistorySink(Sink):
    """The Trainer's ``state.log_history`` as a sink (one entry per check).

    Args:
        state: ``() -> TrainerState``: the Trainer's current state.
    """

    def __init__(self, state: Callable[[], Any]) -> None:
        self.state = state

    def log(self, name: str, value: float, step: int) -> None:
        """Log one record as its own entry."""
        self.log_records({name: value}, step)

    def log_records(self, records: Mapping[str, float], step: int) -> None:
        """Append ``{**records, "step": step}`` to the log history."""
        self.state().log_history.append({**records, "step": step})


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face causal language model (by its class)."""
    names = set(_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    return any(c.__name__ in names for c in type(model).__mro__)


class RdiagCallback(
    MonitorAccess, _callbacks.TrainerCallback, _callbacks.ExportableState
):
    """Diagnostics of a model during ``Trainer.train`` (see the module).

    Args:
        probe: A collated batch (a dict; ``labels`` become the targets), ``(inputs,
            targets)``, or a dataset of examples (collated with ``collator``).
            Keep it small (32-64 samples).
        every: Check every ``k`` optimizer steps (``state.global_step``), at a list
            of steps, or where ``step -> bool`` is true.
        budget_fraction: Keep diagnostics below this fraction of training time
            by skipping scheduled checks (default 10%); ``None``: no budget.
        sinks: Where records go besides the Trainer's logs (and ``store=``):
            :mod:`rdiag.sinks` objects or callables ``(name, value, step)``.
        collator: Collates a dataset probe (default the Trainer's data collator).
        shift_labels: Shift the labels for a causal language model (default:
            when the model is one).
        gather: For sharded parameters: ``module -> context manager`` in which
            they are whole (see :class:`rdiag.integrations.lightning.RdiagMonitor`).
        **monitor_options: Options of :class:`rdiag.Monitor` (``metrics=``,
            ``loss_fn=``, ``store=``, ``run_id=``, ``mode=``, ``output_fn=``, ...).

    Raises:
        TypeError: An option the Monitor does not take.
        ValueError: No probe (also when the Trainer rebuilds the callback from a
            checkpoint with ``restore_callback_states_from_checkpoint=True``).
    """

    def __init__(
        self,
        probe: Any = None,
        *,
        every: Schedule = 10,
        budget_fraction: float | None = BUDGET_FRACTION,
        sinks: Iterable[Sink | Callable[[str, float, int], None]] = (),
        collator: Callable[[list], Any] | None = None,
        shift_labels: bool | None = None,
        gather: Gather | None = None,
        **monitor_options: Any,
    ) -> None:
        if probe is None:
            raise ValueError(
                "expected probe= (a collated batch, (inputs, targets) or a dataset), "
                "got None; if the Trainer rebuilt RdiagCallback from a checkpoint, "
                "leave restore_callback_states_from_checkpoint=False: RdiagCallback "
                "restores its own state from the checkpoint folder"
            )
        self._core = Adapter(
            probe, every, budget_fraction, sinks, gather, monitor_options
        )
        self.collator = collator
        self.shift_labels = shift_labels
        self._state: Any = None
        self._prepared = False
        self.cost: CostReport | None = None

    # ---- Trainer events -------------------------------------------------------------
    def on_train_begin(
        self, args: Any, state: Any, control: Any, **kwargs: Any
    ) -> None:
        """Prepare the probe, restore a resumed run's state, check initialization."""
        model = kwargs["model"]
        self._state = state
        self._core.check_model(model)
        if not self._prepared:
            self._prepare(model, kwargs.get("train_dataloader"))
            self._prepared = True
        if state.global_step > 0:
            self._restore(args, state)
        if self._core.state_dict().get("checks", 0) == 0:
            self._check(state, model, kwargs.get("optimizer"))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """A check at ``state.global_step`` if scheduled (and within budget)."""
        self._state = state
        self._check(state, kwargs["model"], kwargs.get("optimizer"))

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the Monitor's state into the checkpoint folder (main process)."""
        if state.is_world_process_zero and self._core.monitor is not None:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            torch.save(self._core.state_dict(), os.path.join(folder, STATE_FILE))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Report the cost and close the sinks (main process)."""
        if state.is_world_process_zero:
            self.cost = self._core.finish()

    def state(self) -> dict:
        """Counters for ``trainer_state.json`` (the references go to :data:`STATE_FILE`)."""
        saved = self._core.state_dict()
        return {
            "args": {},
            "attributes": {"checks": saved.get("checks", 0), "file": STATE_FILE},
        }

    # ---- helpers ----------------------------------------------------------------------
    def _check(self, state: Any, model: nn.Module, optimizer: Any) -> None:
        self._core.check(
            model,
            state.global_step,
            main=state.is_world_process_zero,
            extra_sinks=[LogHistorySink(lambda: self._state)],
            optimizer=optimizer,
        )

    def _restore(self, args: Any, state: Any) -> None:
        saved = state.stateful_callbacks.get(type(self).__name__, {})
        if not saved.get("attributes", {}).get("checks"):
            return
        path = os.path.join(
            args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE
        )
        if os.path.isfile(path):
            self._core.load_state_dict(torch.load(path, weights_only=True))
            return
        self._core.notices.say(
            "no-state",
            f"rdiag: resumed at step {state.global_step} without the Monitor's state "
            f"({path} is missing); movement is measured from the resumed state",
        )

    def _prepare(self, model: nn.Module, loader: Any) -> None:
        """Turn the probe into ``(inputs, targets)`` and set the default loss."""
        batch = self._core.probe
        if not isinstance(batch, (Mapping, Tensor, tuple)):
            collate = self.collator or getattr(loader, "collate_fn", None)
            if collate is None:
                raise ValueError(
                    "expected collator= to collate the probe dataset, got none and no "
                    "training dataloader; pass collator=DataCollatorWithPadding(...) "
                    "or a collated batch"
                )
            batch = collate([batch[i] for i in range(len(batch))])
        inputs, targets = _split(batch)
        shift = is_causal_lm(model) if self.shift_labels is None else self.shift_labels
        if shift and isinstance(inputs, Mapping):
            if targets is None and "input_ids" in inputs:
                targets = _ids_as_labels(inputs)
            if targets is not None:
                targets = shift_labels(targets)
        self._core.probe = inputs if targets is None else (inputs, targets)
        options = self._core.options
        if targets is not None:
            options.setdefault(
                "loss_fn",
                F.mse_loss if targets.is_floating_point() else F.cross_entropy,
            )
        options.setdefault(
            "metrics", DEFAULT_METRICS if targets is not None else _NO_TARGETS
        )


def _split(batch: Any) -> tuple[Any, Tensor | None]:
    """``(inputs, targets)`` of a probe: a dict's ``labels``, or an explicit pair."""
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return inputs, batch.get("labels")
    if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[1], Tensor):
        return batch[0], batch[1]
    return batch, None


def _ids_as_labels(inputs: Mapping[str, Tensor]) -> Tensor:
    """A causal LM's labels from its ``input_ids``: padding (mask 0) ignored."""
    labels = inputs["input_ids"].clone()
    mask = inputs.get("attention_mask")
    if mask is not None:
        labels[mask == 0] = IGNORE_INDEX
    return labels
