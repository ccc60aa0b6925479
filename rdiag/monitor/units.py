"""The Monitor's metrics as declared units, and the registry that lists them.

A unit (:class:`Metric`) is one metric group: it declares the Monitor metric
names it serves (``metrics``), the records it writes (``records``), what it needs
(``needs_targets``, ``needs_loss``, ``forward``: the probe's forward pass, run once
per check for every unit that reads it), its reference state (``State``, a
dataclass kept across checks and in ``Monitor.state_dict``) and its cost per
check in products (``cost``). ``setup`` is its one-time planning (timed apart);
``measure`` writes its records for one :class:`Check`. :func:`register` adds a
unit to :data:`UNITS` (the built-in units are in :mod:`rdiag.monitor.metrics`); the Monitor's metric list, its checks of what a metric
needs and its state all come from there, so adding a metric is one class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from rdiag._inputs import Inputs

#: The tracking tolerance of the Monitor's eigenvalue solves (sharpness, weight
#: spectral norms): relative to the eigenvalue, each value certified by its Ritz
#: residual (``|lambda - theta| <= ||r||``, recorded beside the sharpness).
TRACKING_TOL = 3e-4


class Check:
    """One check in progress: its step, the probe, its records, shared work.

    Attributes:
        step: The training step.
        x: Probe inputs in the view's dtype and device.
        y: Probe targets on the device (``None`` without targets).
        rec: The records written so far.
        out: The probe's forward output (units with ``forward = True`` read it).
        outputs: Outputs of the modules the forward units tapped (``taps``).
        inputs: First inputs of the modules they tapped.
    """

    def __init__(self, monitor: Any, step: int, x: Inputs, y: Tensor | None) -> None:
        self.monitor = monitor
        self.step, self.x, self.y = step, x, y
        self.rec: dict[str, float] = {}
        self.out: Tensor | None = None
        self.outputs: dict[str, Tensor] = {}
        self.inputs: dict[str, Tensor] = {}
        self._hessian: Any = None

    def run_forward(self, outputs: set[str], inputs: set[str]) -> None:
        """The probe's forward pass, once, with the tapped modules' outputs and inputs."""
        modules = dict(self.monitor.model.named_modules())

        def save_out(name: str) -> Callable:
            def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
                self.outputs[name] = (
                    out[0] if isinstance(out, tuple) else out
                ).detach()

            return hook

        def save_in(name: str) -> Callable:
            def hook(_m: nn.Module, inp: Any) -> None:
                self.inputs[name] = inp[0].detach()

            return hook

        hooks = [modules[n].register_forward_hook(save_out(n)) for n in outputs]
        hooks += [modules[n].register_forward_pre_hook(save_in(n)) for n in inputs]
        fm = self.monitor.fm
        try:
            with torch.no_grad():
                self.out = fm.forward(fm.params, self.x)
        finally:
            for h in hooks:
                h.remove()

    def hessian(self) -> Any:
        """The Monitor's Hessian operator of the probe loss, rebound once per check."""
        if self._hessian is None:
            self._hessian = self.monitor.hessian_operator(self.x, self.y)
        return self._hessian

    def target(self, out: Tensor) -> Tensor:
        """The probe targets in the output's dtype (floating ones) and device."""
        y = self.y.to(out.device)
        return y.to(out.dtype) if y.is_floating_point() else y


class Metric:
    """One metric group of the Monitor (see the module).

    Attributes:
        name: The unit's name: its ``cost/<name>`` record and its missing reason.
        metrics: The Monitor metric names it serves (``Monitor(metrics=...)``).
        records: The records it writes (documentation; ``<layer>`` per layer).
        needs_targets: Needs probe targets.
        needs_loss: Needs ``loss_fn``.
        forward: Reads the probe's shared forward pass.
        cost: Its products per check, in words.
        State: Its reference state (a dataclass; fields are tensors, numbers and
            dicts of them, so that ``torch.load(weights_only=True)`` reads them).
    """

    name: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]
    records: ClassVar[tuple[str, ...]]
    needs_targets: ClassVar[bool] = False
    needs_loss: ClassVar[bool] = False
    forward: ClassVar[bool] = False
    cost: ClassVar[str]

    @dataclass
    class State:
        """No reference state."""

    def __init__(self, monitor: Any, wanted: set[str]) -> None:
        self.monitor = monitor
        self.wanted = wanted & set(self.metrics)
        self.state = self.State()

    def taps(self) -> tuple[set[str], set[str]]:
        """Modules whose outputs and inputs this unit reads from the shared forward."""
        return set(), set()

    def setup(self, check: Check) -> None:
        """One-time planning before the first measurement (timed apart)."""

    def measure(self, check: Check) -> None:
        """Write this unit's records for ``check`` into ``check.rec``."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The reference state as a plain dict."""
        return {f.name: getattr(self.state, f.name) for f in fields(self.state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.state = self.State(**state)

    def legacy_state(
        self, ref: dict[str, Any], prev: dict[str, Any], warm: dict[str, Any]
    ) -> dict[str, Any] | None:
        """This unit's state from a previous release's string-keyed dicts (``None``: none)."""
        return None


#: Unit name -> unit class, in the order the Monitor measures them.
UNITS: dict[str, type[Metric]] = {}


def register(unit: type[Metric]) -> type[Metric]:
    """Add a unit to :data:`UNITS` (a class decorator); its metric names must be new."""
    taken = {m for u in UNITS.values() for m in u.metrics} & set(unit.metrics)
    if unit.name in UNITS or taken:
        raise ValueError(
            f"expected new unit and metric names, got {unit.name!r} / {sorted(taken)} "
            "already registered"
        )
    UNITS[unit.name] = unit
    return unit


def units_for(metrics: tuple[str, ...]) -> list[type[Metric]]:
    """The units serving ``metrics``, in registry order."""
    wanted = set(metrics)
    return [u for u in UNITS.values() if wanted & set(u.metrics)]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that wall time is its time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
