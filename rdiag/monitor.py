"""Monitor: kernel, representation, weight and curvature diagnostics during training.

Call :meth:`Monitor.step` from any training loop (after the optimizer step). At
scheduled steps the Monitor measures, on a fixed probe batch:

* ``"ntk"``: the learning-rate-weighted eNTK ``K_M = sum_l (eta_l/eta0) J_l J_l^T``
  (output-traced, ``(N, N)``) and its movement from initialization and from the
  previous check (relative Frobenius change, kernel distance, centered
  alignment), its centered alignment with the one-hot probe targets, its top
  eigenvalues and effective rank;
* ``"ntk_layers"``: the same per layer (relative change from initialization);
* ``"features"``: the conjugate (feature) kernel ``Phi Phi^T / n`` of the read-out's
  input features and its movement;
* ``"representations"``: per layer ``||h_t - h_0||`` (Euclidean per input, averaged
  over the probe) and ``||h_t||``, via forward hooks; the output ``||f_t||`` and
  ``||f_t - f_0||``;
* ``"weights"``: per layer operator and Frobenius norms of the effective weights
  (forward multiplier x raw weight, :func:`rdiag.parametrization.effective_weights`;
  the raw weights of a model not prepared by rdiag) and of their change since
  initialization, and ``||dW||_op / ||W_0||_op``;
* ``"sharpness"``: the top (largest algebraic) Hessian eigenvalue, raw and
  preconditioned by the per-layer learning rates (``lambda_max(M^1/2 H M^1/2)``;
  with an Adam optimizer its second-moment preconditioner, recorded from its
  first step on), each warm-started
  from the previous check's eigenvector; ``"sharpness_precond"``: only the
  preconditioned one (half the cost);
* ``"linearization"``: ``lin_error = ||f_t - f_lin,t|| / ||f_t - f_0||`` with
  ``f_lin,t = f_0 + J_0 (theta_t - theta_0)`` (one jvp at the first check's
  parameters, which the Monitor keeps);
* ``"trace"`` (Hutch++), ``"grad_norm"``, ``"loss"``, ``"accuracy"``.

Records are keyed by flat names (:mod:`rdiag.records`: ``"ntk/rel_change"``,
``"ntk/eig/0"``, ``"delta_h/hidden.0"``, ``"sharpness/precond"``) and go to a
:class:`~rdiag.runs.store.Store` (one transaction per check), to ``Monitor.history``
and to any sinks (:mod:`rdiag.sinks`: TensorBoard, Weights & Biases, MLflow, CSV,
a callable ``(name, value, step)``). A metric that cannot be computed at a check (a degenerate
state: a zero kernel, a solver that does not converge) is left out of that check
and recorded as missing with its reason (``Monitor.missing``, and the store's
missing records); ``strict=True`` raises instead.

What the Monitor keeps from construction on (so a check spends only what the
measurements need): one functional view of the model, an eNTK handle
(:func:`rdiag.ntk_fn`, planned at the first check), a Hessian operator (built at
the first check, rebound at each later one) with the static learning-rate
diagonal, and the reference values of the first check. The model itself is
never changed: measurements run through the functional view (mode, dropout
seed and RNG handled there), gradients go to fresh leaves, hooks are removed.

Cost and budget: the Monitor times itself (``Monitor.seconds``). Training time is
the wall time since the first call to :meth:`step` minus the Monitor's own time.
With ``budget_fraction=b``, a scheduled check is skipped while
``seconds > b * training_time`` (the schedule is thinned, never shifted;
``Monitor.skipped`` counts the skips). The first check and any ``force=True``
check always run. :meth:`Monitor.cost` reports checks run, checks skipped and
seconds spent. :meth:`Monitor.state_dict` carries the references, counters,
training time and history, so a resumed run measures movement from the original
initialization (the Lightning and Hugging Face callbacks of
:mod:`rdiag.integrations` save it with their checkpoints).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rdiag import metrics as M
from rdiag import records as R
from rdiag._autodiff import JvpMode, jvp, probe_jvp_mode
from rdiag._checks import check_finite_positive, check_module, check_positive_int
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
from rdiag.kernels import kernel_stats
from rdiag.linalg.lanczos import lanczos
from rdiag.linalg.moments import kernel_moments
from rdiag.linalg.trace import hutch_plus_plus
from rdiag.losses import apply_loss, checked_loss
from rdiag.ntk.handle import ntk_fn
from rdiag.operators.base import LinearOperator, ScaledOperator
from rdiag.operators.hessian import HessianOperator
from rdiag.operators.ntk import NTKOperator
from rdiag.parametrization import effective_weights, layer_scales
from rdiag.roles import readout_name
from rdiag.sinks import Sink, as_sinks

METRICS = (
    "ntk",
    "ntk_layers",
    "ntk_moments",
    "features",
    "representations",
    "weights",
    "linearization",
    "sharpness",
    "sharpness_precond",
    "trace",
    "grad_norm",
    "loss",
    "accuracy",
)
_NEEDS_TARGETS = {
    "sharpness",
    "sharpness_precond",
    "trace",
    "grad_norm",
    "loss",
    "accuracy",
}
_FORWARD = {"representations", "features", "loss", "accuracy"}
#: Sharpness kinds -> record names of the eigenvalue and of its solver's products.
_SHARPNESS = {
    "sharpness": ("sharpness/raw", "sharpness/raw_matvecs"),
    "sharpness_precond": ("sharpness/precond", "sharpness/precond_matvecs"),
}
DEFAULT_METRICS = ("ntk", "features", "representations", "weights", "sharpness", "loss")
#: What a metric may raise on a degenerate state; recorded as missing unless strict.
MEASUREMENT_ERRORS = (ValueError, RuntimeError, ArithmeticError, MemoryError)
Schedule = int | Sequence[int] | Callable[[int], bool]


def _schedule(every: Schedule) -> Callable[[int], bool]:
    if callable(every):
        return every
    if isinstance(every, int) and not isinstance(every, bool):
        check_positive_int(every, "every")
        return lambda step: step % every == 0
    if isinstance(every, Iterable) and not isinstance(every, (str, bytes)):
        steps = {int(s) for s in every}
        return lambda step: step in steps
    raise TypeError(
        f"expected every= as a positive int, a list of steps or a callable step -> bool, "
        f"got {every!r}"
    )


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
        metrics: Subset of :data:`METRICS`.
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
        budget_fraction: Keep diagnostics below this fraction of training time by
            skipping checks (see the module docstring).
        layers: Module names whose outputs are the tracked representations; default
            :func:`default_layers`.
        k: Number of top eNTK eigenvalues to record (``>= 0``).
        sharpness_tol: Relative tolerance of the Lanczos sharpness solves.
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
        moments_block_size: Samples per forward pass of those products (default all).
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

    Attributes:
        history: One ``{name: value}`` dict per check,
            with ``"step"``.
        missing: Metric -> reason, for the metrics the last check could not compute.
        seconds: Seconds spent in diagnostics.
        checks: Number of checks run; ``skipped``: checks skipped by the budget.
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
        sharpness_tol: float = 1e-4,
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
    ) -> None:
        view = model if isinstance(model, FunctionalModel) else None
        if view is not None:
            model = view.module
        self.model = model = unwrap_parallel(check_module(model))
        self.group = None if process_group is None else Group(process_group)
        # Across the ranks (the sharded probe), or on rank 0 alone.
        self._sharded = self.group is not None and bool(shard_probe)
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
        bad = [m for m in self.metrics if m not in METRICS]
        if bad:
            raise ValueError(
                f"expected metrics from {list(METRICS)}, got unknown {bad}"
            )
        needs_y = _NEEDS_TARGETS & set(self.metrics)
        if needs_y and y is None:
            raise ValueError(
                f"metrics {sorted(needs_y)} need probe targets; pass probe=(x, y)"
            )
        if needs_y - {"accuracy"} and loss_fn is None:
            raise ValueError(
                f"metrics {sorted(needs_y - {'accuracy'})} need loss_fn=, e.g. "
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
        self._readout = readout_name(model)
        self._ntk = None
        if {"ntk", "ntk_layers"} & set(self.metrics):
            self._ntk = ntk_fn(
                self.fm,
                lr_multipliers=lr_multipliers,
                per_layer="ntk_layers" in self.metrics,
                process_group=process_group if self._sharded else None,
            )
        check_positive_int(moments_matvecs, "moments_matvecs")
        self.moments_matvecs = moments_matvecs
        self._moments: NTKOperator | None = None
        if "ntk_moments" in self.metrics:
            self._moments = NTKOperator(
                self.fm,
                self.x if moments_probe is None else moments_probe,
                lr_multipliers=lr_multipliers,
                block_size=moments_block_size,
            )
        self._hessian: HessianOperator | None = None
        self._lr_diagonal: Tensor | None = None
        self._jvp_mode: JvpMode | None = None
        self.history: list[dict[str, float]] = []
        self.missing: dict[str, str] = {}
        self.notices = Notices()
        self.seconds = 0.0
        self.checks = 0
        self.skipped = 0
        self._start: float | None = None
        # Training and diagnostics seconds of the run before a restored state.
        self._before = (0.0, 0.0)
        self._ref: dict[str, Any] = {}
        self._prev: dict[str, Any] = {}
        self._warm: dict[str, Any] = {}

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

    def cost(self) -> CostReport:
        """What the diagnostics cost so far: checks run and skipped, seconds spent."""
        return CostReport(
            self.checks,
            self.skipped,
            self.seconds,
            self.train_seconds,
            self.budget_fraction,
        )

    def due(self, step: int) -> bool:
        """Whether a check would run at ``step`` (schedule and budget)."""
        if not self.scheduled(step):
            return False
        if self.checks == 0 or self.budget_fraction is None:
            return True
        return self.seconds <= self.budget_fraction * self.train_seconds

    def _due_everywhere(self, step: int) -> bool:
        """:meth:`due`, decided by rank 0 for every rank of a sharded probe."""
        due = self.due(step)
        if self._sharded and self.scheduled(step):
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
        if not (self._sharded or self._main):
            return None  # shard_probe=False: rank 0 measures
        if self._start is None:
            self._start = time.perf_counter()
        if not force and not self._due_everywhere(step):
            if self.scheduled(step):
                self.skipped += 1
            return None
        tic = time.perf_counter()
        records = dict(self._measure(step))
        self.checks += 1
        self.seconds += time.perf_counter() - tic
        records[R.MONITOR_SECONDS] = self.seconds
        records[R.TRAIN_SECONDS] = self.train_seconds
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
            with torch.enable_grad():
                checked_loss(self.loss_fn, out, self._target(out))

    def state_dict(self) -> dict[str, Any]:
        """Counters, times, history and references, for checkpointing.

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
            "history": [dict(h) for h in self.history],
            "ref": self._ref,
            "prev": self._prev,
            "warm": self._warm,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (of this release or the last)."""
        self.seconds, self.checks = state["seconds"], state["checks"]
        self.skipped = state["skipped"]
        self._ref, self._prev, self._warm = state["ref"], state["prev"], state["warm"]
        self.history = [R.flatten(h) for h in state.get("history", [])]
        self._before = (state.get("train_seconds", 0.0), self.seconds)
        self._start = None

    # ---- measurements -----------------------------------------------------------
    def _measure(self, step: int) -> dict[Any, float]:
        rec: dict[Any, float] = {}
        self.missing = {}
        x = self.fm.cast_input(self.x, "probe x")
        y = None if self.y is None else self.y.to(self.fm.device)
        wanted = set(self.metrics)
        groups: list[tuple[str, Callable[[], None]]] = []
        if _FORWARD & wanted:
            groups.append(("forward", lambda: self._forward_metrics(x, rec)))
        if {"ntk", "ntk_layers"} & wanted:
            groups.append(("ntk", lambda: self._ntk_metrics(step, x, rec)))
        if "ntk_moments" in wanted:
            groups.append(("ntk_moments", lambda: self._moment_metrics(rec)))
        if "weights" in wanted:
            groups.append(("weights", lambda: self._weight_metrics(rec)))
        if "linearization" in wanted:
            groups.append(("linearization", lambda: self._linearization(x, rec)))
        if "grad_norm" in wanted:
            groups.append(("grad_norm", lambda: self._grad_norm(x, y, rec)))
        if {"sharpness", "sharpness_precond", "trace"} & wanted:
            groups.append(("curvature", lambda: self._curvature(step, x, y, rec)))
        for name, run in groups:
            try:
                run()
            except MEASUREMENT_ERRORS as err:
                if self.strict:
                    raise
                reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                self.missing[name] = reason[:500]
                self.notices.say(
                    f"missing-{name}-{type(err).__name__}",
                    f"Monitor: {name} could not be computed at step {step} ({reason}); "
                    "recorded as missing, training goes on",
                )
        return rec

    def _movement(self, key: str, k: Tensor, rec: dict) -> None:
        ref = self._ref.setdefault(key, k)
        stats = kernel_stats(ref, k)
        rec[f"{key}/rel_change"] = stats.relative_change()
        rec[f"{key}/distance"] = stats.distance()
        if k.shape[0] > 1:
            rec[f"{key}/cka"] = stats.centered_alignment()
        prev = self._prev.get(key)
        if prev is not None:
            rec[f"{key}/rel_change_prev"] = kernel_stats(prev, k).relative_change()
        self._prev[key] = k

    def _forward_metrics(self, x: Inputs, rec: dict) -> None:
        modules = dict(self.model.named_modules())
        acts: dict[str, Tensor] = {}
        hooks = [
            modules[n].register_forward_hook(self._saver(acts, n)) for n in self.layers
        ]
        if self._readout is not None and "features" in self.metrics:
            hooks.append(
                modules[self._readout].register_forward_pre_hook(
                    lambda _m, inp: acts.__setitem__("__features__", inp[0].detach())
                )
            )
        try:
            with torch.no_grad():
                out = self.fm.forward(self.fm.params, x)
        finally:
            for h in hooks:
                h.remove()
        n = batch_size(x)
        f = out.reshape(n, -1).double()
        if "representations" in self.metrics:
            f0 = self._ref.setdefault("f", f)
            rec["f_norm"] = float(f.norm(dim=1).mean())
            rec["delta_f"] = M.representation_movement(f, f0)
            for name in self.layers:
                h = acts[name].double()
                if h.dim() == 0 or h.shape[0] != n:
                    self.notices.say(
                        f"no-sample-axis-{name}",
                        f"Monitor: the output of layer {name!r} has shape "
                        f"{tuple(h.shape)}, without the probe's {n} samples first (e.g. "
                        "position embeddings broadcast over the batch); its "
                        "representation is not tracked",
                    )
                    continue
                h0 = self._ref.setdefault(f"h:{name}", h)
                rec[R.name("h_norm", name)] = float(h.reshape(n, -1).norm(dim=1).mean())
                rec[R.name("delta_h", name)] = M.representation_movement(h, h0)
        if "features" in self.metrics and "__features__" in acts:
            phi = acts["__features__"].reshape(n, -1).double()
            self._movement("ck", phi @ phi.T / phi.shape[1], rec)
        if self.y is not None and "loss" in self.metrics:
            rec["loss"] = float(apply_loss(self.loss_fn, out, self._target(out)))
        if (
            self.y is not None
            and "accuracy" in self.metrics
            and not self.y.is_floating_point()
        ):
            pred = out.argmax(-1)
            rec["accuracy"] = float((pred == self.y.to(pred.device)).double().mean())

    @staticmethod
    def _saver(acts: dict[str, Tensor], name: str) -> Callable:
        def hook(_module: nn.Module, _inp: Any, out: Any) -> None:
            acts[name] = (out[0] if isinstance(out, tuple) else out).detach()

        return hook

    def _ntk_metrics(self, step: int, x: Inputs, rec: dict) -> None:
        out = self._ntk(shard_of(x, self.group) if self._sharded else x)
        per_layer = "ntk_layers" in self.metrics
        layers = out if per_layer else {}
        k = (sum(layers.values()) if per_layer else out).double()
        if "ntk" in self.metrics:
            self._movement("ntk", k, rec)
            eigs = M.eigenvalues(k)
            for i, lam in enumerate(eigs[: self.k].tolist()):
                rec[R.name("ntk/eig", str(i))] = lam
            rec["ntk/eff_rank"] = M.effective_rank(eigs)
            rec["ntk/trace"] = float(k.trace())
            # Alignment needs one label (or target vector) per probe input.
            per_input = self.y is not None and (
                self.y.dim() == 1 or self.y.is_floating_point()
            )
            if per_input and len(k) > 1:
                rec["ntk/kta"] = M.kernel_target_alignment(k, self.y)
        for name, kl in layers.items():
            kl = kl.double()
            ref = self._ref.setdefault(f"ntk:{name}", kl)
            rec[R.name("ntk_layers/rel_change", name)] = kernel_stats(
                ref, kl
            ).relative_change()
            rec[R.name("ntk_layers/trace", name)] = float(kl.trace())
        if self.snapshots and self.store is not None:
            self.store.save_array(self.run_id, step, "ntk", k)

    def _moment_metrics(self, rec: dict) -> None:
        """Statistics of the eNTK from operator products (:func:`~rdiag.linalg.kernel_moments`)."""
        ref = self._ref.get("ntk_moments")
        m = kernel_moments(self._moments, self.moments_matvecs, reference=ref)
        if ref is None:
            self._ref["ntk_moments"] = (m.probes, m.products)
        stats = {
            "trace": m.trace,
            "frobenius": m.frobenius,
            "eff_rank": m.effective_rank,
            "rel_change": m.rel_change,
        }
        for stat, est in stats.items():
            if est is not None:
                rec[f"ntk_moments/{stat}"] = est.value
                rec[f"ntk_moments/{stat}_se"] = est.std_err

    def _weights(self) -> dict[str, Tensor]:

        if layer_scales(self.model):
            return effective_weights(self.model)
        # Not parametrized by rdiag: the raw weights are the effective ones.
        return {
            name: m.weight.detach().reshape(m.weight.shape[0], -1)
            for name, m in _leaf_param_modules(self.model)
            if isinstance(getattr(m, "weight", None), Tensor) and m.weight.dim() >= 2
        }

    def _weight_metrics(self, rec: dict) -> None:
        for name, w in self._weights().items():
            w = w.detach().double()
            op, fro = M.matrix_norms(w)
            w0, op0 = self._ref.setdefault(f"W:{name}", (w.clone(), op))
            dop, dfro = M.matrix_norms(w - w0)
            rec[R.name("W_op", name)], rec[R.name("W_fro", name)] = op, fro
            rec[R.name("dW_op", name)], rec[R.name("dW_fro", name)] = dop, dfro
            rec[R.name("dW_rel", name)] = dop / max(op0, 1e-300)

    def _linearization(self, x: Inputs, rec: dict) -> None:
        """``||f_t - f_lin,t|| / ||f_t - f_0||`` on the probe (0 at the first check)."""
        fm = self.fm
        params = fm.params
        theta0 = self._ref.setdefault(
            "theta", {n: p.clone() for n, p in params.items()}
        )
        with torch.no_grad():
            f = fm(params, x).double()
        f0 = self._ref.setdefault("f_lin0", f)
        if self._jvp_mode is None:  # planned at the first check, like the handles
            self._jvp_mode = probe_jvp_mode(fm, x)
        delta = {n: params[n] - theta0[n] for n in fm.names}
        moved = float((f - f0).norm())
        if moved == 0.0:
            rec["lin_error"] = 0.0
            return
        push = jvp(lambda p: fm(p, x), (theta0,), (delta,), self._jvp_mode)[1]
        rec["lin_error"] = float((f - f0 - push.detach().double()).norm()) / moved

    def _target(self, out: Tensor) -> Tensor:
        y = self.y.to(out.device)
        return y.to(out.dtype) if y.is_floating_point() else y

    def _grad_norm(self, x: Inputs, y: Tensor, rec: dict) -> None:
        leaves = {n: p.requires_grad_() for n, p in self.fm.params.items()}
        with torch.enable_grad():
            out = self.fm.forward(leaves, x)
            grads = torch.autograd.grad(
                apply_loss(self.loss_fn, out, self._target(out)), list(leaves.values())
            )
        rec["grad_norm"] = float(
            torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        )

    def _operator(self, x: Inputs, y: Tensor) -> HessianOperator:
        """The Hessian operator of the probe loss, built once and rebound per check."""
        if self._hessian is None:
            self._hessian = HessianOperator(
                self.fm,
                self.loss_fn,
                self._shard(x, y),
                process_group=self.group.group if self._sharded else None,
            )
            if self.optimizer is None and self.lr_multipliers is not None:
                self._lr_diagonal = multiplier_diagonal(self.fm, self.lr_multipliers)
        else:
            self._hessian.rebind(self._shard(x, y))
        return self._hessian

    def _shard(self, x: Inputs, y: Tensor) -> tuple[Inputs, Tensor]:
        """This rank's share of the probe batch (all of it without a sharded probe)."""
        if not self._sharded:
            return x, y
        return shard_of(x, self.group), shard_of(y, self.group)

    def _preconditioned(self, op: HessianOperator) -> LinearOperator | None:
        """``M^1/2 H M^1/2`` (Adam: from its state; ``None`` before its first step)."""
        if self.optimizer is not None:
            if not any(self.optimizer.state.values()):
                return None

            return ScaledOperator(op, multiplier_diagonal(self.fm, self.optimizer))
        if self._lr_diagonal is None:
            return op
        return ScaledOperator(op, self._lr_diagonal)

    def _curvature(self, step: int, x: Inputs, y: Tensor, rec: dict) -> None:
        op = self._operator(x, y)
        todo: list[tuple[str, LinearOperator]] = []
        if "sharpness" in self.metrics:
            todo.append(("sharpness", op))
        if {"sharpness", "sharpness_precond"} & set(self.metrics):
            pre = self._preconditioned(op)
            if pre is op and "sharpness" in self.metrics:
                todo.append(("sharpness_precond", None))
            elif pre is not None:
                todo.append(("sharpness_precond", pre))
        for key, target in todo:
            name, matvecs = _SHARPNESS[key]
            if target is None:  # no preconditioner: the same eigenvalue
                rec[name] = rec["sharpness/raw"]
                continue
            res = lanczos(
                target,
                k=1,
                tol=self.sharpness_tol,
                warm_start=self._warm.get(key),
                criterion="eigenvalue",
            )
            self._warm[key] = res.eigenvectors
            if self.snapshots and self.store is not None:
                self.store.save_array(self.run_id, step, key, res.eigenvectors[:, 0])
            rec[name] = float(res.eigenvalues[0])
            rec[matvecs] = float(res.num_matvecs)
        if "trace" in self.metrics:
            est = hutch_plus_plus(op, 30, seed=step)
            rec["trace/estimate"], rec["trace/std_err"] = est.estimate, est.std_err


@dataclass(frozen=True)
class CostReport:
    """What a Monitor's diagnostics cost (:meth:`Monitor.cost`).

    Attributes:
        checks: Checks run.
        skipped: Scheduled checks skipped by the budget.
        seconds: Seconds spent in diagnostics.
        train_seconds: Training seconds they are compared with.
        budget_fraction: The budget (a fraction of training time), or ``None``.
    """

    checks: int
    skipped: int
    seconds: float
    train_seconds: float
    budget_fraction: float | None

    @property
    def fraction(self) -> float:
        """Diagnostics time over training time (``nan`` before any training time)."""
        return self.seconds / self.train_seconds if self.train_seconds > 0 else math.nan

    def __str__(self) -> str:
        budget = (
            "no budget"
            if self.budget_fraction is None
            else f"budget {self.budget_fraction:.0%} of training time"
        )
        return (
            f"rdiag: {self.checks} checks run, {self.skipped} skipped ({budget}); "
            f"{self.seconds:.2f} s spent, {self.fraction:.1%} of {self.train_seconds:.2f} s "
            "of training"
        )


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
