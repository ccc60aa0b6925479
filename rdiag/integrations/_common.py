"""What the Lightning and Hugging Face callbacks share: one adapter around a Monitor.

:class:`Adapter` holds the callbacks' options (the probe, the schedule, the
Monitor's own options), builds the :class:`~rdiag.monitor.Monitor` once the
trainer hands over the model (the probe moved to its device and dtype, the probe
checked against the model and its training batches), keeps a restored state
until then, and reports the cost at the end. The callbacks only translate their
trainer's hooks into :meth:`Adapter.check` calls; every measurement is the
Monitor's.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ContextManager

import torch
from torch import Tensor, nn

from rdiag._inputs import tree_map
from rdiag._optional import Notices
from rdiag.functional import select_parameters
from rdiag.monitor import CostReport, Monitor, Schedule, _schedule, _split_probe
from rdiag.sinks import Sink, as_sinks

logger = logging.getLogger("rdiag")

#: The default cost budget of both callbacks: diagnostics take at most this
#: fraction of training time (checks are skipped to stay below it).
BUDGET_FRACTION = 0.1
#: Monitor options a callback sets itself.
_OWN = {"model", "probe", "every", "budget_fraction", "sinks"}
Gather = Callable[[nn.Module], ContextManager[Any]]


def sharded_parameters(module: nn.Module) -> list[str]:
    """Names of parameters held as shards: FSDP, DeepSpeed ZeRO-3, DTensors.

    FSDP2 and tensor-parallel parameters are ``DTensor`` objects; FSDP1 flattens them
    into ``FlatParameter`` objects; DeepSpeed ZeRO-3 partitions them in place (a
    ``ds_id`` attribute, an empty local tensor).
    """
    return [
        name
        for name, p in module.named_parameters()
        if hasattr(p, "ds_id")
        or getattr(p, "_is_flat_param", False)
        or any(c.__name__ in ("DTensor", "FlatParameter") for c in type(p).__mro__)
    ]


def check_monitor_options(options: dict[str, Any]) -> dict[str, Any]:
    """Validate the Monitor options passed to a callback (names only; values later).

    Raises:
        TypeError: An option the Monitor does not take, or one the callback sets.
    """
    allowed = set(inspect.signature(Monitor).parameters) - _OWN
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(
            f"expected Monitor options from {sorted(allowed)}, got {unknown}; the "
            "probe, every=, budget_fraction= and sinks= are the callback's own arguments"
        )
    return options


class MonitorAccess:
    """The ``monitor`` and ``history`` of a callback that holds an :class:`Adapter`."""

    _core: Adapter

    @property
    def monitor(self) -> Monitor | None:
        """The :class:`rdiag.Monitor` (``None`` until the trainer hands over the model)."""
        return self._core.monitor

    @property
    def history(self) -> list:
        """The Monitor's records, one dict per check (``Monitor.history``)."""
        return self._core.history


class Adapter:
    """A Monitor attached to someone else's training loop (shared by the callbacks).

    Args:
        probe: ``x`` or ``(x, y)``, as :class:`~rdiag.monitor.Monitor` takes it.
        every: The Monitor's schedule, in optimizer steps.
        budget_fraction: The cost budget (``None``: no budget).
        sinks: Sinks of the caller; the trainer's own are added at :meth:`build`.
        gather: With sharded parameters: ``module -> context manager`` in which
            they are whole, entered on every process at every scheduled step.
        options: Further Monitor options (checked by name).
    """

    def __init__(
        self,
        probe: Any,
        every: Schedule,
        budget_fraction: float | None,
        sinks: Iterable[Sink | Callable[[str, float, int], None]],
        gather: Gather | None,
        options: dict[str, Any],
    ) -> None:
        if probe is None:
            raise ValueError(
                "expected probe= (a batch in the model's input format, or (inputs, "
                "targets)), got None"
            )
        if gather is not None and not callable(gather):
            raise TypeError(
                f"expected gather= to be a callable module -> context manager, got "
                f"{type(gather).__name__}"
            )
        self.probe = probe
        self.every = every
        self.scheduled = _schedule(every)
        self.budget_fraction = budget_fraction
        self.sinks = as_sinks(sinks)
        self.gather = gather
        self.options = check_monitor_options(options)
        self.monitor: Monitor | None = None
        self.notices = Notices()
        self._restored: dict[str, Any] | None = None

    # ---- set-up -------------------------------------------------------------------
    def check_model(self, module: nn.Module) -> None:
        """Raise early on a model the Monitor cannot measure.

        Raises:
            ValueError: No trainable parameters, or sharded ones without ``gather=``.
        """
        select_parameters(module)
        sharded = sharded_parameters(module)
        if sharded and self.gather is None:
            raise ValueError(
                f"expected whole parameters, got {len(sharded)} sharded ones (FSDP, "
                f"DeepSpeed ZeRO-3 or DTensor: {sharded[:3]}); rdiag measures the whole "
                "model on one process: pass gather= a context in which they are whole, "
                "e.g. gather=lambda m: FullyShardedDataParallel.summon_full_params(m), "
                "or train without sharding"
            )

    def no_destination(self, trainer_logs: bool) -> None:
        """Say once that the records go nowhere but ``.history``."""
        if not (trainer_logs or self.sinks or self.options.get("store") is not None):
            self.notices.say(
                "no-logger",
                "rdiag: no logger attached: the trainer has no logger and no sinks= or "
                "store= were given, so the records are kept in .history only",
            )

    def build(
        self,
        module: nn.Module,
        extra_sinks: Sequence[Sink],
        optimizer: torch.optim.Optimizer | None,
    ) -> Monitor:
        """The Monitor of ``module`` (built once; a restored state applied)."""
        if self.monitor is not None:
            return self.monitor
        options = dict(self.options)
        if optimizer is not None and _adam_of(optimizer, module):
            options.setdefault("optimizer", optimizer)
        x, y = _split_probe(self.probe)
        probe = _to_module(x, module)
        if y is not None:
            probe = (probe, y.to(next(module.parameters()).device))
        budget = None if self.gather is not None else self.budget_fraction
        self.monitor = Monitor(
            module,
            probe,
            every=self.every,
            budget_fraction=budget,
            sinks=[*self.sinks, *extra_sinks],
            probe_check=False,  # checked at the first step, with its batch
            **options,
        )
        if self._restored is not None:
            self.monitor.load_state_dict(self._restored)
            self._restored = None
        return self.monitor

    # ---- checks -------------------------------------------------------------------
    def check(
        self,
        module: nn.Module,
        step: int,
        *,
        main: bool,
        batch: Any = None,
        extra_sinks: Sequence[Sink] = (),
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        """The Monitor's check at optimizer step ``step`` (on the main process only).

        Other processes return at once, or, with ``gather=``, enter and leave the
        gather context at the scheduled steps, as the main process does.
        """
        if not main:
            if self.gather is not None and self.scheduled(step):
                with self.gather(module):
                    pass
            return
        first = self.monitor is None
        monitor = self.build(module, extra_sinks, optimizer)
        context = (
            self.gather(module)
            if self.gather is not None and self.scheduled(step)
            else contextlib.nullcontext()
        )
        with context, torch.enable_grad():
            if first:
                monitor.check_probe(batch)
            monitor.step(step)

    @property
    def history(self) -> list:
        """The Monitor's records, one dict per check (empty before the first)."""
        if self.monitor is not None:
            return self.monitor.history
        return list((self._restored or {}).get("history", []))

    def finish(self) -> CostReport | None:
        """End of training: the run of ``store=`` finished, the cost, sinks closed.

        The cost is logged and returned (``None`` if nothing ran).
        """
        if self.monitor is None:
            self.notices.say(
                "no-step",
                "rdiag: the trainer took no training step, so nothing was measured; "
                "check max_steps / limit_train_batches and the training data",
            )
            return None
        report = self.monitor.cost()
        logger.info("%s", report)
        self.monitor.close()
        if self.monitor.store is not None:  # training ended: nothing left to run
            self.monitor.store.set_status(self.monitor.run_id, "finished")
        return report

    # ---- state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The Monitor's state (or the restored one not yet applied; ``{}`` if none)."""
        if self.monitor is not None:
            return self.monitor.state_dict()
        return dict(self._restored or {})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state now, or when the Monitor is built."""
        if not state:
            return
        if self.monitor is not None:
            self.monitor.load_state_dict(state)
        else:
            self._restored = state


def _to_module(x: Any, module: nn.Module) -> Any:
    """Probe inputs on the module's device; floating ones in its parameters' dtype."""
    param = next(module.parameters())

    def move(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t  # not a batch of tensors: the Monitor says so
        if t.is_floating_point() and param.is_floating_point():
            return t.to(param.device, param.dtype)
        return t.to(param.device)

    if not isinstance(x, (Tensor, Mapping, tuple, list)):
        return x
    return tree_map(move, tuple(x) if isinstance(x, list) else x)


def _adam_of(optimizer: torch.optim.Optimizer, module: nn.Module) -> bool:
    """Whether ``optimizer`` is Adam-type and holds every trainable parameter."""
    groups = optimizer.param_groups
    if not all("betas" in g and "eps" in g for g in groups):
        return False
    held = {id(p) for g in groups for p in g["params"]}
    return all(id(p) in held for p in module.parameters() if p.requires_grad)
