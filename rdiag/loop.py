"""The one training loop of every width experiment: harness runs, coordinate checks.

:func:`fit` takes optimizer steps on a stream of batches with a
:class:`~rdiag.monitor.Monitor` attached. At every step the loss of the current
state is computed first; a non-finite loss, or one above ``divergence_factor``
times the initial loss, ends the run as diverged before the Monitor measures
that state. The Monitor measures the state at step 0 (initialization), at its
scheduled steps and, forced, after the last update. The loss is the caller's
(the harness and the coordinate check both use ``F.mse_loss`` for regression,
the mean over all ``N * O`` entries).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rdiag._inputs import Inputs, call
from rdiag._optional import Notices
from rdiag.functional import output_tensor
from rdiag.losses import apply_loss
from rdiag.monitor import Monitor
from rdiag.predictions import records_from_checks
from rdiag.runs.store import StoreError

#: Default of ``divergence_factor``: a loss above this multiple of the initial one.
DIVERGENCE_FACTOR = 1e6


@dataclass(frozen=True)
class FitResult:
    """Outcome of :func:`fit`.

    Attributes:
        final_loss: The training loss of the last state measured.
        reason: Why the run failed (diverged, or a diagnostic raised), or ``None``.
        steps: Optimizer steps taken.
    """

    final_loss: float
    reason: str | None
    steps: int

    @property
    def failed(self) -> bool:
        """Whether the run ended early."""
        return self.reason is not None


def divergence_reason(
    loss: float, initial: float, factor: float | None, step: int
) -> str | None:
    """Why a training loss means the run diverged, or None if it does not.

    Args:
        loss: The loss at ``step``.
        initial: The loss at step 0.
        factor: Divergence when ``loss > factor * initial`` (with ``initial > 0``);
            None: only a non-finite loss counts.
        step: The step (quoted in the reason).

    Returns:
        The reason, e.g. ``"diverged at step 7: training loss 3.1e+29 > 4.2e+05 =
        divergence_factor 1e+06 x the initial loss 0.42"``, or None.
    """
    if not math.isfinite(loss):
        return f"diverged at step {step}: training loss {loss}"
    if factor is not None and initial > 0 and loss > factor * initial:
        return (
            f"diverged at step {step}: training loss {loss:.3g} > {factor * initial:.3g}"
            f" = divergence_factor {factor:g} x the initial loss {initial:.3g}"
        )
    return None


def describe_error(err: BaseException) -> str:
    """An exception as one line: ``"ValueError: message"``."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[Inputs, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    steps: int,
    monitor: Monitor | None = None,
    divergence_factor: float | None = DIVERGENCE_FACTOR,
    on_loss: Callable[[int, float], None] | None = None,
    before_check: Callable[[int], None] | None = None,
    output_fn: Callable[[object], Tensor] | None = None,
) -> FitResult:
    """Train ``model`` for ``steps`` optimizer steps with ``monitor`` attached.

    Args:
        model: The network.
        optimizer: Its optimizer.
        batches: ``steps`` batches ``(x, y)`` (on the model's device); ``x`` a
            tensor, tuple or dict of tensors (``model(x)``, ``model(*x)``,
            ``model(**x)``).
        loss_fn: ``loss_fn(model(x), y)``, a scalar (:func:`rdiag.losses.apply_loss`:
            sequence outputs with ``F.cross_entropy`` need no wrapper).
        steps: Number of optimizer steps.
        monitor: Measures at step 0, its scheduled steps and after the last update.
        divergence_factor: See :func:`divergence_reason`.
        on_loss: Called with ``(step, loss)`` for every state's training loss.
        before_check: Called with the step before each scheduled Monitor check
            (a store flushes the losses so far).
        output_fn: Picks the output tensor of a model that returns something else
            (default: a tensor as is, a ``ModelOutput``'s logits), as the Monitor's.

    Returns:
        A :class:`FitResult`; a diverged state is never measured.

    Raises:
        StoreError: The Monitor's store cannot be written.
    """
    notices = Notices()

    def loss_of(xb: Inputs, yb: Tensor) -> Tensor:
        out = output_tensor(call(model, xb), output_fn, notices)
        return apply_loss(loss_fn, out, yb)

    initial = value = math.nan
    last: tuple[Inputs, Tensor] | None = None
    taken = 0
    for step, (xb, yb) in enumerate(batches):
        last = (xb, yb)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(xb, yb)
        value = float(loss.detach())
        initial = value if step == 0 else initial
        if on_loss is not None:
            on_loss(step, value)
        reason = divergence_reason(value, initial, divergence_factor, step)
        if reason is None and monitor is not None and monitor.scheduled(step):
            if before_check is not None:
                before_check(step)
            reason = _diagnose(monitor, step)
        if reason is not None:
            return FitResult(value, reason, taken)
        loss.backward()
        try:
            optimizer.step()
        except RuntimeError:
            reason = _overflowing_rate(optimizer, step)
            if reason is None:
                raise
            return FitResult(value, reason, taken)
        taken += 1
    if last is None:
        return FitResult(value, None, 0)
    with torch.no_grad():  # the state after the last update
        value = float(loss_of(*last))
    reason = divergence_reason(value, initial, divergence_factor, steps)
    if reason is None and monitor is not None:
        reason = _diagnose(monitor, steps, force=True)
    return FitResult(value, reason, taken)


def measured_fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[Inputs, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    probe: Inputs,
    roles: dict[str, str],
    *,
    steps: int,
    metrics: list[str],
    lr_multipliers: dict[str, float] | None = None,
    layers: list[str] | None = None,
    divergence_factor: float | None = DIVERGENCE_FACTOR,
    centered: bool = False,
    mode: str = "eval",
    output_fn: Callable[[object], Tensor] | None = None,
) -> list[dict] | str:
    """One run of a width experiment: :func:`fit` with a Monitor at init and at the end.

    The Monitor (``strict=True``) measures ``metrics`` on ``probe`` at step 0,
    after the first update and after the last; the predicted quantities are read
    from those checks by :func:`rdiag.predictions.records_from_checks`.

    Args:
        model: The network.
        optimizer: Its optimizer.
        batches: ``steps`` batches ``(x, y)``, as for :func:`fit`.
        loss_fn: ``loss_fn(model(x), y)``.
        probe: Inputs ``(P, ...)`` of the measurements.
        roles: Layer name -> role, attached to the per-layer records.
        steps: Number of optimizer steps.
        metrics: Monitor metrics (``"representations"``, ``"weights"``, ...).
        lr_multipliers: The diagonal ``M`` of the eNTK ``K_M``.
        layers: The layers whose outputs are tracked (default the Monitor's).
        divergence_factor: See :func:`divergence_reason`.
        centered: A centered model (no ``f0``).
        mode: The Monitor's ``mode``.
        output_fn: Picks the output tensor, as for :func:`fit`.

    Returns:
        The records ``{"metric", "layer", "role", "value"}``, or why the run failed.
    """
    monitor = Monitor(
        model,
        probe,
        every=[0, 1],
        metrics=metrics,
        lr_multipliers=lr_multipliers,
        layers=layers,
        mode=mode,
        output_fn=output_fn,
        strict=True,
    )
    result = fit(
        model,
        optimizer,
        batches,
        loss_fn,
        steps=steps,
        monitor=monitor,
        divergence_factor=divergence_factor,
        output_fn=output_fn,
    )
    if result.failed:
        return result.reason
    first, step1, last = monitor.history[0], monitor.history[1], monitor.history[-1]
    return records_from_checks(first, last, roles, centered=centered, step1=step1)


def _overflowing_rate(optimizer: torch.optim.Optimizer, step: int) -> str | None:
    """Why an optimizer step failed as divergence: a rate beyond its weights' dtype.

    A finite but huge learning rate (``1e38`` on float32 weights) makes torch
    refuse the update itself; that run diverges, as one whose loss overflows.
    """
    for i, group in enumerate(optimizer.param_groups):
        lr = float(group.get("lr", 0.0))
        for p in group["params"]:
            if p.is_floating_point() and abs(lr) > torch.finfo(p.dtype).max:
                return (
                    f"diverged at step {step}: the learning rate {lr:g} of parameter "
                    f"group {i} is beyond the range of its {p.dtype} weights"
                )
    return None


def _diagnose(monitor: Monitor, step: int, *, force: bool = False) -> str | None:
    """Run a Monitor check; return why it failed (a degenerate state), or None."""
    try:
        monitor.step(step, force=force)
    except StoreError:
        raise
    except Exception as err:  # e.g. a zero centered kernel: the run fails, records stay
        return f"diagnostics failed at step {step}: {describe_error(err)}"
    return None
