"""The :class:`Monitor`: schedule, budget, the metric units, records, state."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from rdiag import records as R
from rdiag._checks import (
    check_finite_positive,
    check_module,
    check_nonnegative_int,
    check_positive_int,
)
from rdiag._inputs import Inputs, batch_size, check_inputs, describe
from rdiag._optional import Notices
from rdiag._typing import LossFn, LRMultipliers
from rdiag.curvature import multiplier_diagonal
from rdiag.distributed import Group, shard_of
from rdiag.functional import (
    MODES,
    FunctionalModel,
    Mode,
    functionalize,
    unwrap_parallel,
)
from rdiag.losses import checked_loss
from rdiag.monitor.budget import (
    BudgetPlan,
    CostReport,
    Schedule,
    _schedule,
    mean_gap,
    plan_budget,
)
from rdiag.monitor import metrics as _builtin  # noqa: F401  (registers the units)
from rdiag.monitor.units import (
    TRACKING_TOL,
    UNITS,
    Check,
    Metric,
    synchronize,
    units_for,
)
from rdiag.operators.base import LinearOperator, ScaledOperator
from rdiag.operators.hessian import HessianOperator
from rdiag.parametrization import effective_weights, layer_scales
from rdiag.roles import readout_name
from rdiag.runs.store import StoreError
from rdiag.sinks import Sink, as_sinks

logger = logging.getLogger("rdiag")

#: Every metric a Monitor measures, from the registry of units.
METRICS = tuple(m for unit in UNITS.values() for m in unit.metrics)
DEFAULT_METRICS = ("ntk", "features", "representations", "weights", "sharpness", "loss")
#: What a metric may raise on a degenerate state; recorded as missing unless strict.
MEASUREMENT_ERRORS = (ValueError, RuntimeError, ArithmeticError, MemoryError)
#: The record of a check's cost in training steps (``cost/<unit>``: seconds per unit).
CHECK_STEPS = "monitor/check_steps"
COST = "cost"


def _leaf_param_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    # Trainable leaves only: a centered model's frozen reference copy is not a layer.
    return [
        (name, m)
        for name, m in model.named_modules()
        if name
        and not list(m.children())
        and any(p.requires_grad for p in m.parameters(recurse=False))
    ]


def default_layers(model: nn.Module) -> list[str]:
    """The layers whose outputs a Monitor tracks by default.

    The read-in and hidden layers of a model prepared by
    :func:`rdiag.apply_parametrization` (the layers the width exponents are
    predicted for); otherwise every trainable leaf module before the read-out
    (:func:`rdiag.roles.readout_name`: the last weight layer; a norm layer after
    it is a gain of the outputs, not a layer of the width).
    """
    scales = layer_scales(model)
    if scales:
        return [n for n, s in scales.items() if s.role in ("readin", "hidden")]
    leaves = [n for n, _ in _leaf_param_modules(model)]
    readout = readout_name(model)
    return leaves[: leaves.index(readout)] if readout in leaves else leaves[:-1]


class Monitor:
    """Diagnostics of a model on a fixed probe batch, at scheduled training steps.

    Args:
        model: The network being trained (read, never modified), or a prepared
            :class:`~rdiag.functional.FunctionalModel` of it (its selection is
            measured).
        probe: Probe inputs ``x (N, ...)`` (a tensor, tuple or dict of tensors) or
            ``(x, y)``; targets are needed for the loss, accuracy, alignment and
            curvature metrics. Keep ``N`` small (32-64).
        every: Schedule: check every ``k`` steps, at a list of steps, or where a
            callable ``step -> bool`` is true.
        metrics: Subset of :data:`METRICS` (each served by a unit of
            :mod:`rdiag.monitor.units`).
        loss_fn: ``loss_fn(output, target)`` with mean reduction (sharpness, trace,
            gradient norm, loss); ``F.cross_entropy`` on sequence outputs
            ``(N, T, V)`` with ``(N, T)`` targets is the mean over every position
            (:mod:`rdiag.losses`; a causal LM's targets are shifted by the caller).
        store: A :class:`~rdiag.runs.store.Store` to write records to.
        run_id: The store's run id (required with ``store``).
        lr_multipliers: Per-layer ``eta_l / eta0`` (:func:`rdiag.lr_multipliers`),
            the diagonal ``M`` of ``K_M`` and of the sharpness preconditioner;
            default all 1.
        optimizer: An Adam optimizer: its second moments precondition the sharpness
            (otherwise ``lr_multipliers`` do).
        budget_fraction: Keep diagnostics below this fraction of training time:
            after the second check (the first later one) the Monitor picks,
            once, the stride of scheduled checks that fits, says so, and
            lists the steps it leaves out (``skipped_steps``); ``None`` runs
            exactly the schedule.
        layers: Module names whose outputs are the tracked representations; default
            :func:`default_layers`.
        k: Number of top eNTK eigenvalues to record (``>= 0``).
        sharpness_tol: Relative tolerance of the Lanczos sharpness solves
            (eigenvalue criterion; the residual recorded beside each value bounds
            its error).
        mode: ``"eval"`` (default: dropout off, batch norm running statistics) or
            ``"train"`` (batch statistics, fixed-seed dropout), for every metric.
        dtype: Compute diagnostics in this dtype (default the model's).
        output_fn: Picks the output tensor from a non-tensor model output.
        snapshots: Also save arrays to the store at every check: the eNTK ``(N, N)``
            as ``"ntk"`` and the sharpness eigenvectors ``(P,)`` as ``"sharpness"`` /
            ``"sharpness_precond"`` (checksummed ``.npy`` files).
        strict: Raise when a metric fails instead of recording it as missing.
        sinks: Where records go besides the store (:mod:`rdiag.sinks`):
            :class:`~rdiag.sinks.Sink` objects or callables ``(name, value, step)``.
        moments_probe: Inputs ``(N', ...)`` of the ``"ntk_moments"`` metric: a large
            set (``10^4 - 10^5`` points) whose ``(N' O)^2`` eNTK is never formed;
            default the probe's ``x``.
        moments_matvecs: Rademacher vectors (= eNTK products) per check of
            ``"ntk_moments"``; the first check keeps them and its products (``2 N'
            O`` floats each) as the reference of the relative change.
        moments_block_size: Samples per forward pass of those products (default
            all).
        process_group: Under data-parallel training (a ``torch.distributed``
            process group; ``model`` may be the DDP wrapper): every rank calls
            :meth:`step` at the same steps with the same whole probe. With
            ``shard_probe=True`` the eNTK and the curvature metrics are computed
            across the ranks, each on its share of the probe
            (:mod:`rdiag.distributed`), the records come out the same on every
            rank (the budget's skips too: rank 0 decides), and only rank 0 writes
            to the store and the sinks. With ``shard_probe=False`` rank 0
            measures the whole probe alone; :meth:`step` returns ``None`` on the
            other ranks.
        shard_probe: See ``process_group``.
        probe_check: Run the model (and the loss) on the probe now
            (:meth:`check_probe`), so that a probe that does not fit fails here
            rather than leaving every check's metrics missing; ``False`` for
            callers that check later themselves (the trainer callbacks, naming
            the training batch, within their gather context).

    Attributes:
        history: One ``{name: value}`` dict per check, with ``"step"``.
        missing: Unit -> reason, for the metric units the last check could not
            compute.
        seconds: Seconds spent in diagnostics.
        checks: Number of checks run; ``skipped``: scheduled checks the budget
            left out, ``skipped_steps`` their steps.
        budget_plan: The schedule the budget chose (``None`` before it chose, or
            without a budget).
    """

    def __init__(
        self,
        model: nn.Module | FunctionalModel,
        probe: Inputs | tuple[Inputs, Tensor],
        *,
        every: Schedule = 1,
        metrics: Sequence[str] = DEFAULT_METRICS,
        loss_fn: LossFn | None = None,
        store: Any = None,
        run_id: str | None = None,
        lr_multipliers: LRMultipliers = None,
        optimizer: torch.optim.Optimizer | None = None,
        budget_fraction: float | None = None,
        layers: Sequence[str] | None = None,
        k: int = 5,
        sharpness_tol: float = TRACKING_TOL,
        mode: Mode = "eval",
        dtype: torch.dtype | str | None = None,
        output_fn: Callable[[object], Tensor] | None = None,
        snapshots: bool = False,
        strict: bool = False,
        sinks: Sequence[Sink | Callable[[str, float, int], None]] = (),
        moments_probe: Inputs | None = None,
        moments_matvecs: int = 30,
        moments_block_size: int | None = None,
        process_group: Any = None,
        shard_probe: bool = True,
        probe_check: bool = True,
    ) -> None:
        view = model if isinstance(model, FunctionalModel) else None
        if view is not None:
            model = view.module
        self.model = model = unwrap_parallel(check_module(model))
        self.group = None if process_group is None else Group(process_group)
        # Across the ranks (the sharded probe), or on rank 0 alone.
        self.sharded = self.group is not None and bool(shard_probe)
        self._main = self.group is None or self.group.rank == 0
        self.sinks = as_sinks(sinks)
        x, y = _split_probe(probe)
        self.x = check_inputs(x, "probe x")
        if y is not None and (
            not isinstance(y, Tensor) or len(y) != batch_size(self.x)
        ):
            got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(
                f"expected probe targets y with one row per probe input "
                f"({batch_size(self.x)}), got {got}"
            )
        self.y = y
        self.metrics = tuple(metrics)
        if not self.metrics:
            raise ValueError(
                f"expected at least one metric from {list(METRICS)}, got none"
            )
        bad = [m for m in self.metrics if m not in METRICS]
        if bad:
            raise ValueError(
                f"expected metrics from {list(METRICS)}, got unknown {bad}"
            )
        kinds = units_for(self.metrics)
        wanted = set(self.metrics)
        needs_y = {m for u in kinds if u.needs_targets for m in set(u.metrics) & wanted}
        if needs_y and y is None:
            raise ValueError(
                f"metrics {sorted(needs_y)} need probe targets; pass probe=(x, y)"
            )
        needs_loss = {m for u in kinds if u.needs_loss for m in set(u.metrics) & wanted}
        needs_loss |= {"loss"} & wanted
        if needs_loss and loss_fn is None:
            raise ValueError(
                f"metrics {sorted(needs_loss)} need loss_fn=, e.g. "
                "torch.nn.functional.mse_loss"
            )
        if store is not None and run_id is None:
            raise ValueError("expected run_id= with store= (see Store.create_run)")
        if budget_fraction is not None and not 0 < budget_fraction < 1:
            raise ValueError(
                f"expected budget_fraction in (0, 1), got {budget_fraction!r}"
            )
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"expected k to be an int >= 0, got {k!r}")
        if mode not in MODES:
            raise ValueError(f"expected mode to be one of {list(MODES)}, got {mode!r}")
        self.every = every
        self.scheduled = _schedule(every)
        self.loss_fn = loss_fn
        self.store, self.run_id = store, run_id
        self.lr_multipliers = lr_multipliers
        self.optimizer = optimizer
        self.budget_fraction = budget_fraction
        self.k = k
        self.sharpness_tol = check_finite_positive(sharpness_tol, "sharpness_tol")
        self.mode = mode
        self.snapshots = snapshots
        self.strict = bool(strict)
        self.fm = functionalize(
            view or model, mode=mode, dtype=dtype, output_fn=output_fn
        )
        leaves = _leaf_param_modules(model)
        layers = default_layers(model) if layers is None else list(layers)
        modules = dict(model.named_modules())
        unknown = [n for n in layers if n not in modules]
        if unknown:
            raise ValueError(
                f"expected layers= to name modules of the model, got unknown {unknown}; "
                f"modules with parameters: {[n for n, _ in leaves][:10]}"
            )
        self.layers = layers
        self.readout = readout_name(model)
        check_positive_int(moments_matvecs, "moments_matvecs")
        self.moments_matvecs = moments_matvecs
        self.moments_probe, self.moments_block_size = moments_probe, moments_block_size
        self._hessian: HessianOperator | None = None
        self._lr_diagonal: Tensor | None = None
        self.notices = Notices()
        self.units: list[Metric] = [kind(self, wanted) for kind in kinds]
        self._ready: set[str] = set()  # units whose one-time planning ran
        self.history: list[dict[str, float]] = []
        self.missing: dict[str, str] = {}
        self.seconds = 0.0
        self.checks = 0
        self.skipped = 0
        self.skipped_steps: list[int] = []
        self.budget_plan: BudgetPlan | None = None
        # Per unit: planning seconds; the first check's seconds; later checks' sums.
        self.planning: dict[str, float] = {}
        self._first: dict[str, float] = {}
        self._later: dict[str, float] = {}
        self._later_checks = 0
        self._start: float | None = None
        # (step, training seconds) at the first check in this process: the clock of
        # the training step time.
        self._clock: tuple[int, float] | None = None
        self._last_step: int | None = None
        self._scheduled_since = 0  # scheduled steps after the first check
        # Training and diagnostics seconds of the run before a restored state.
        self._before = (0.0, 0.0)
        if probe_check:
            self.check_probe()

    # ---- schedule and budget ----------------------------------------------------
    @property
    def train_seconds(self) -> float:
        """Wall time since the first :meth:`step` call, minus diagnostics time.

        After :meth:`load_state_dict`, the training time of the run before it
        plus the time since the first call after it.
        """
        train, seconds = self._before
        if self._start is None:
            return train
        return train + time.perf_counter() - self._start - (self.seconds - seconds)

    def step_seconds(self) -> float:
        """Mean seconds of a training step since the first check here (``nan`` before one)."""
        if self._clock is None or self._last_step is None:
            return math.nan
        step, seconds = self._clock
        if self._last_step <= step:
            return math.nan
        return (self.train_seconds - seconds) / (self._last_step - step)

    def unit(self, name: str) -> Metric:
        """The metric unit ``name`` of this Monitor (:data:`rdiag.monitor.units.UNITS`)."""
        for unit in self.units:
            if unit.name == name:
                return unit
        raise KeyError(
            f"expected one of this Monitor's units {[u.name for u in self.units]}, "
            f"got {name!r}"
        )

    def cost(self) -> CostReport:
        """What the diagnostics cost: checks run and skipped, seconds per unit.

        One-time planning (``planning``) is reported apart from the first check
        and the mean later check (``first``, ``per_check``); ``step_seconds``
        converts them to training steps (:meth:`CostReport.table`).
        """
        later = (
            {k: v / self._later_checks for k, v in self._later.items()}
            if self._later_checks
            else {}
        )
        return CostReport(
            self.checks,
            self.skipped,
            self.seconds,
            self.train_seconds,
            self.budget_fraction,
            planning=dict(self.planning),
            first=dict(self._first),
            per_check=later,
            step_seconds=self.step_seconds(),
            plan=self.budget_plan,
        )

    def _plan(self, step: int) -> None:
        """Choose the budget's stride once, from a measured later check and step cost.

        The first check includes cold starts (a cold Lanczos solve, the eNTK
        race); the plan waits for the second check and is made at the next call,
        before any scheduled check is left out.
        """
        if self.budget_fraction is None or self.budget_plan is not None:
            return
        if self._clock is None or not self._later_checks:
            return
        if step <= self.history[-1]["step"]:
            return
        self.budget_plan = plan = plan_budget(
            sum(self._later.values()) / self._later_checks,
            self.step_seconds(),
            mean_gap(self.every, self.scheduled, self._clock[0]),
            self.budget_fraction,
        )
        self.notices.say("budget-plan", str(plan))
        logger.info("%s", plan)

    def due(self, step: int) -> bool:
        """Whether a check would run at ``step`` (schedule and budget)."""
        if not self.scheduled(step):
            return False
        if self.checks == 0 or self.budget_fraction is None or self.budget_plan is None:
            return True
        return self._scheduled_since % self.budget_plan.stride == 0

    def _due_everywhere(self, step: int) -> bool:
        """:meth:`due`, decided by rank 0 for every rank of a sharded probe."""
        due = self.due(step)
        if self.sharded and self.scheduled(step):
            due = self.group.agree(due)
        return due

    def step(self, step: int, *, force: bool = False) -> dict[str, float] | None:
        """Run the diagnostics if ``step`` is scheduled (and within budget).

        Args:
            step: The training step just completed (0 = initialization).
            force: Run regardless of schedule and budget (e.g. the final step).

        Returns:
            The records ``{name: value}`` of this check (:mod:`rdiag.records`), or
            ``None`` when no check ran.

        Raises:
            Exception: With ``strict=True``, what a failing metric raised.
        """
        step = check_nonnegative_int(step, "step")
        if self.history and step < self.history[-1]["step"]:
            raise ValueError(
                f"expected steps in order, got step {step} after step "
                f"{self.history[-1]['step']}; pass the training step (a resumed "
                "run: load_state_dict, then go on from its step)"
            )
        if not (self.sharded or self._main):
            return None  # shard_probe=False: rank 0 measures
        if self._start is None:
            self._start = time.perf_counter()
        self._last_step = step
        if self.checks > 0:
            self._plan(step)
        if self.scheduled(step) and self.checks > 0:
            self._scheduled_since += 1  # scheduled steps after the first check
        due = self._due_everywhere(step)
        if not force and not due:
            if self.scheduled(step):
                self.skipped += 1
                self.skipped_steps.append(step)
            return None
        tic = time.perf_counter()
        records = dict(self._measure(step))
        self.checks += 1
        spent = time.perf_counter() - tic
        self.seconds += spent
        if self._clock is None:
            self._clock = (step, self.train_seconds)
        records[R.MONITOR_SECONDS] = self.seconds
        records[R.TRAIN_SECONDS] = self.train_seconds
        steps = self.step_seconds()
        if steps > 0:
            records[CHECK_STEPS] = spent / steps
        if self.store is not None and self._main:
            self.store.log(self.run_id, step, records)
            if self.missing:
                self.store.log_missing(self.run_id, step, self.missing)
        for sink in self.sinks if self._main else ():
            sink.log_records(records, step)
        self.history.append({"step": step, **records})
        return records

    def close(self) -> None:
        """Close the sinks (what they opened themselves); the store stays usable."""
        for sink in self.sinks:
            sink.close()

    def check_probe(self, batch: Any = None) -> None:
        """Run the model once on the probe, and the loss on its targets; raise if they fail.

        A check records a metric that fails as missing (unless ``strict``), so a
        probe that does not fit the model would only leave gaps; callers that
        attach the Monitor to someone else's training (the trainer callbacks) call
        this first.

        Args:
            batch: A training batch of the same model, named in the error (any
                form; tensors, tuples and dicts of tensors are described by shape).

        Raises:
            ValueError: The model fails on the probe inputs (the message names the
                probe's shapes and the training batch's), its output does not
                depend on the parameters, or the loss fails on the probe targets.
        """
        x = self.fm.cast_input(self.x, "probe x")
        try:
            out = self.fm.probe(x)
        except ValueError as err:
            seen = (
                "" if batch is None else f" (the training batches are {_shapes(batch)})"
            )
            raise ValueError(
                f"the probe does not fit the model: {err}{seen}; pass a probe batch "
                "in the form the model's forward takes"
            ) from err
        if self.y is not None and self.loss_fn is not None:
            y = self.y.to(out.device)
            with torch.enable_grad():
                checked_loss(
                    self.loss_fn, out, y.to(out.dtype) if y.is_floating_point() else y
                )

    def state_dict(self) -> dict[str, Any]:
        """Counters, times, history and each unit's reference state, for checkpointing.

        Plain containers of tensors and numbers (``torch.load(...,
        weights_only=True)`` reads them back); the references (initial kernel,
        representations, weights, ...) make a resumed run measure movement from
        the original initialization.
        """
        return {
            "seconds": self.seconds,
            "train_seconds": self.train_seconds,
            "checks": self.checks,
            "skipped": self.skipped,
            "skipped_steps": list(self.skipped_steps),
            "last_step": self._last_step,
            "history": [dict(h) for h in self.history],
            "units": {u.name: u.state_dict() for u in self.units},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (of this release or the last)."""
        self.seconds, self.checks = state["seconds"], state["checks"]
        self.skipped = state["skipped"]
        self.skipped_steps = list(state.get("skipped_steps", []))
        saved = state.get("units")
        for unit in self.units:
            if saved is not None:
                own = saved.get(unit.name)
            else:  # the previous release: string-keyed reference dicts
                own = unit.legacy_state(state["ref"], state["prev"], state["warm"])
            if own is not None:
                unit.load_state_dict(own)
        self.history = [R.flatten(h) for h in state.get("history", [])]
        self._before = (state.get("train_seconds", 0.0), self.seconds)
        self._start = None
        # The step clock goes on from the saved state's last step.
        self._last_step = state.get("last_step")
        if self._last_step is not None:
            self._clock = (self._last_step, self._before[0])

    # ---- measurements -----------------------------------------------------------
    def _timed(
        self, key: str, spent: dict[str, float], run: Callable[[], None]
    ) -> None:
        synchronize(self.fm.device)
        tic = time.perf_counter()
        try:
            run()
        finally:
            synchronize(self.fm.device)
            spent[key] = spent.get(key, 0.0) + time.perf_counter() - tic

    def _measure(self, step: int) -> dict[str, float]:
        self.missing = {}
        x = self.fm.cast_input(self.x, "probe x")
        y = None if self.y is None else self.y.to(self.fm.device)
        check = Check(self, step, x, y)
        spent: dict[str, float] = {}
        planning: dict[str, float] = {}
        failed: set[str] = set()
        forward = [u for u in self.units if u.forward]
        if forward:
            outputs: set[str] = set()
            inputs: set[str] = set()
            for unit in forward:
                outs, ins = unit.taps()
                outputs |= outs
                inputs |= ins
            if not self._attempt(
                step,
                "forward",
                lambda: self._timed(
                    "forward", spent, lambda: check.run_forward(outputs, inputs)
                ),
            ):
                failed |= {u.name for u in forward}
        for unit in self.units:
            if unit.name in failed:
                continue

            def run(unit: Metric = unit) -> None:
                if unit.name not in self._ready:
                    self._timed(unit.name, planning, lambda: unit.setup(check))
                    self._ready.add(unit.name)
                self._timed(unit.name, spent, lambda: unit.measure(check))

            self._attempt(step, unit.name, run)
        for key, seconds in planning.items():
            self.planning[key] = self.planning.get(key, 0.0) + seconds
        if not self._first:
            self._first = dict(spent)
        else:
            self._later_checks += 1
            for key, seconds in spent.items():
                self._later[key] = self._later.get(key, 0.0) + seconds
        rec = check.rec
        for key, seconds in spent.items():
            rec[R.name(COST, key)] = seconds
        return rec

    def _attempt(self, step: int, name: str, run: Callable[[], None]) -> bool:
        """Run one unit; a failure is recorded as missing (raised when ``strict``)."""
        try:
            run()
        except StoreError:
            raise  # the store refused a write: the run's fault, not the metric's
        except MEASUREMENT_ERRORS as err:
            if self.strict:
                raise
            reason = (
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            )
            self.missing[name] = reason[:500]
            self.notices.say(
                f"missing-{name}-{type(err).__name__}",
                f"Monitor: {name} could not be computed at step {step} ({reason}); "
                "recorded as missing, training goes on",
            )
            return False
        return True

    def weights(self) -> dict[str, Tensor]:
        """The effective weights per layer (the raw ones of a model not prepared by rdiag)."""
        if layer_scales(self.model):
            return effective_weights(self.model)
        return {
            name: m.weight.detach().reshape(m.weight.shape[0], -1)
            for name, m in _leaf_param_modules(self.model)
            if isinstance(getattr(m, "weight", None), Tensor) and m.weight.dim() >= 2
        }

    def hessian_operator(self, x: Inputs, y: Tensor) -> HessianOperator:
        """The Hessian operator of the probe loss, built once and rebound per check."""
        data = self._shard(x, y)
        if self._hessian is None:
            self._hessian = HessianOperator(
                self.fm,
                self.loss_fn,
                data,
                process_group=self.group.group if self.sharded else None,
            )
            if self.optimizer is None and self.lr_multipliers is not None:
                self._lr_diagonal = multiplier_diagonal(self.fm, self.lr_multipliers)
        else:
            self._hessian.rebind(data)
        return self._hessian

    def _shard(self, x: Inputs, y: Tensor) -> tuple[Inputs, Tensor]:
        """This rank's share of the probe batch (all of it without a sharded probe)."""
        if not self.sharded:
            return x, y
        return shard_of(x, self.group), shard_of(y, self.group)

    def preconditioned(self, op: HessianOperator) -> LinearOperator | None:
        """``M^1/2 H M^1/2`` (Adam: from its state; ``None`` before its first step)."""
        if self.optimizer is not None:
            if not any(self.optimizer.state.values()):
                return None
            return ScaledOperator(op, multiplier_diagonal(self.fm, self.optimizer))
        if self._lr_diagonal is None:
            return op
        return ScaledOperator(op, self._lr_diagonal)


def _shapes(batch: Any) -> str:
    """A training batch's shapes for messages (any form a DataLoader yields)."""
    if isinstance(batch, Tensor):
        return describe(batch)
    if isinstance(batch, dict):
        return "{" + ", ".join(f"{k!r}: {_shapes(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(_shapes(v) for v in batch) + ")"
    return type(batch).__name__


def _split_probe(probe: Any) -> tuple[Any, Any]:
    """``(x, y)`` from ``probe``: a pair whose second entry is a tensor, else inputs alone.

    A model with two positional inputs and no targets takes its probe as a dict
    of keyword arguments (a pair of tensors reads as inputs and targets).
    """
    if (
        isinstance(probe, (tuple, list))
        and len(probe) == 2
        and isinstance(probe[1], Tensor)
    ):
        return probe[0], probe[1]
    return probe, None
