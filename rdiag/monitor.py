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
* ``"trace"`` (Hutchinson), ``"grad_norm"``, ``"loss"``, ``"accuracy"``.

Records go to a :class:`~rdiag.store.Store` (one transaction per check) and to
``Monitor.history``.

Cost and budget: the Monitor times itself (``Monitor.seconds``). Training time is
the wall time since the first call to :meth:`step` minus the Monitor's own time.
With ``budget_fraction=b``, a scheduled check is skipped while
``seconds > b * training_time`` (the schedule is thinned, never shifted;
``Monitor.skipped`` counts the skips). The first check and any ``force=True``
check always run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from rdiag import metrics as M
from rdiag._checks import check_module, check_positive_int, check_tensor
from rdiag._typing import LossFn, Weights

METRICS = (
    "ntk",
    "ntk_layers",
    "features",
    "representations",
    "weights",
    "sharpness",
    "sharpness_precond",
    "trace",
    "grad_norm",
    "loss",
    "accuracy",
)
_NEEDS_TARGETS = set(METRICS) - {
    "ntk",
    "ntk_layers",
    "features",
    "representations",
    "weights",
}
DEFAULT_METRICS = ("ntk", "features", "representations", "weights", "sharpness", "loss")
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


class Monitor:
    """Diagnostics of a model on a fixed probe batch, at scheduled training steps.

    Args:
        model: The network being trained (read, never modified).
        probe: Probe batch ``x (N, ...)`` or ``(x, y)``; targets are needed for the
            loss, accuracy, alignment and curvature metrics. Keep ``N`` small (32-64).
        every: Schedule: check every ``k`` steps, at a list of steps, or where a
            callable ``step -> bool`` is true.
        metrics: Subset of :data:`METRICS`.
        loss_fn: ``loss_fn(output, target)`` with mean reduction (sharpness, trace,
            gradient norm, loss).
        store: A :class:`~rdiag.store.Store` to write records to.
        run_id: The store's run id (required with ``store``).
        lr_multipliers: Per-layer ``eta_l / eta0`` (``rdiag.parametrization.lr_multipliers``),
            the weights of ``K_M`` and the sharpness preconditioner; default all 1.
        optimizer: An Adam optimizer: its second moments precondition the sharpness
            (otherwise ``lr_multipliers`` do).
        budget_fraction: Keep diagnostics below this fraction of training time by
            skipping checks (see the module docstring).
        layers: Module names whose outputs are the tracked representations; default
            every parameterized leaf module but the last (the read-out).
        num_eigs: Number of top eNTK eigenvalues to record.
        sharpness_tol: Relative tolerance of the Lanczos sharpness solves.
        dtype: Compute diagnostics in this dtype (default the model's).
        snapshots: Also save arrays to the store at every check: the eNTK ``(N, N)``
            as ``"ntk"`` and the sharpness eigenvectors ``(P,)`` as ``"sharpness"`` /
            ``"sharpness_precond"`` (checksummed ``.npy`` files).

    Attributes:
        history: One dict ``{(metric, layer): value}`` per check, with ``"step"``.
        seconds: Seconds spent in diagnostics.
        checks: Number of checks run; ``skipped``: checks skipped by the budget.
    """

    def __init__(
        self,
        model: nn.Module,
        probe: Tensor | tuple[Tensor, Tensor],
        *,
        every: Schedule = 1,
        metrics: Sequence[str] = DEFAULT_METRICS,
        loss_fn: LossFn | None = None,
        store: Any = None,
        run_id: str | None = None,
        lr_multipliers: Weights = None,
        optimizer: torch.optim.Optimizer | None = None,
        budget_fraction: float | None = None,
        layers: Sequence[str] | None = None,
        num_eigs: int = 5,
        sharpness_tol: float = 1e-4,
        dtype: torch.dtype | None = None,
        snapshots: bool = False,
    ) -> None:
        self.model = check_module(model)
        x, y = probe if isinstance(probe, (tuple, list)) else (probe, None)
        self.x = check_tensor(x, "probe x")
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
        self.scheduled = _schedule(every)
        self.loss_fn = loss_fn
        self.store, self.run_id = store, run_id
        self.weights = lr_multipliers
        self.optimizer = optimizer
        self.budget_fraction = budget_fraction
        self.num_eigs = num_eigs
        self.sharpness_tol = sharpness_tol
        self.dtype = dtype
        self.snapshots = snapshots
        leaves = _leaf_param_modules(model)
        if layers is None:
            layers = [n for n, _ in leaves[:-1]]
        modules = dict(model.named_modules())
        missing = [n for n in layers if n not in modules]
        if missing:
            raise ValueError(
                f"expected layers= to name modules of the model, got unknown {missing}; "
                f"modules with parameters: {[n for n, _ in leaves][:10]}"
            )
        self.layers = list(layers)
        self._readout = leaves[-1][0] if leaves else None
        self.history: list[dict[Any, float]] = []
        self.seconds = 0.0
        self.checks = 0
        self.skipped = 0
        self._start: float | None = None
        self._ref: dict[str, Any] = {}
        self._prev: dict[str, Any] = {}
        self._warm: dict[str, Any] = {}

    # ---- schedule and budget ----------------------------------------------------
    @property
    def train_seconds(self) -> float:
        """Wall time since the first :meth:`step` call, minus diagnostics time."""
        return (
            0.0
            if self._start is None
            else time.perf_counter() - self._start - self.seconds
        )

    def due(self, step: int) -> bool:
        """Whether a check would run at ``step`` (schedule and budget)."""
        if not self.scheduled(step):
            return False
        if self.checks == 0 or self.budget_fraction is None:
            return True
        return self.seconds <= self.budget_fraction * self.train_seconds

    def step(self, step: int, *, force: bool = False) -> dict[Any, float] | None:
        """Run the diagnostics if ``step`` is scheduled (and within budget).

        Args:
            step: The training step just completed (0 = initialization).
            force: Run regardless of schedule and budget (e.g. the final step).

        Returns:
            The records ``{metric or (metric, layer): value}`` of this check, or
            ``None`` when no check ran.
        """
        if self._start is None:
            self._start = time.perf_counter()
        if not force and not self.due(step):
            if self.scheduled(step):
                self.skipped += 1
            return None
        tic = time.perf_counter()
        records = self._measure(step)
        self.checks += 1
        self.seconds += time.perf_counter() - tic
        records["monitor_seconds"] = self.seconds
        records["train_seconds"] = self.train_seconds
        if self.store is not None:
            self.store.log(self.run_id, step, records)
        self.history.append({"step": step, **records})
        return records

    def state_dict(self) -> dict[str, Any]:
        """Counters and references, for checkpointing (Lightning / HF adapters)."""
        return {
            "seconds": self.seconds,
            "checks": self.checks,
            "skipped": self.skipped,
            "ref": self._ref,
            "prev": self._prev,
            "warm": self._warm,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.seconds, self.checks = state["seconds"], state["checks"]
        self.skipped = state["skipped"]
        self._ref, self._prev, self._warm = state["ref"], state["prev"], state["warm"]

    # ---- measurements -----------------------------------------------------------
    def _measure(self, step: int) -> dict[Any, float]:
        rec: dict[Any, float] = {}
        first = next(self.model.parameters())
        x = self.x.to(first.device)
        x = x.to(first.dtype) if x.is_floating_point() else x
        y = None if self.y is None else self.y.to(first.device)
        if {"representations", "features", "loss", "accuracy"} & set(self.metrics):
            self._forward_metrics(x, rec)
        if "ntk" in self.metrics or "ntk_layers" in self.metrics:
            self._ntk_metrics(step, x, rec)
        if "weights" in self.metrics:
            self._weight_metrics(rec)
        if "grad_norm" in self.metrics:
            rec["grad_norm"] = self._grad_norm(x)
        if "sharpness" in self.metrics or "sharpness_precond" in self.metrics:
            self._sharpness(step, x, y, rec)
        if "trace" in self.metrics:
            from rdiag.curvature import hessian_trace

            est = hessian_trace(
                self.model,
                self.loss_fn,
                (x, y),
                num_matvecs=30,
                dtype=self.dtype,
                seed=step,
            )
            rec["trace"], rec["trace_std_err"] = est.estimate, est.std_err
        return rec

    def _movement(self, key: str, k: Tensor, rec: dict, layer: str = "") -> None:
        ref = self._ref.setdefault(key, k)
        rec[(f"{key}_rel_change", layer)] = M.relative_change(ref, k)
        rec[(f"{key}_distance", layer)] = M.kernel_distance(ref, k)
        if k.shape[0] > 1:
            rec[(f"{key}_cka", layer)] = M.centered_alignment(ref, k)
        prev = self._prev.get(key)
        if prev is not None:
            rec[(f"{key}_rel_change_prev", layer)] = M.relative_change(prev, k)
        self._prev[key] = k

    def _forward_metrics(self, x: Tensor, rec: dict) -> None:
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
        training = [(m, m.training) for m in self.model.modules()]
        try:
            self.model.eval()
            with torch.no_grad():
                out = self.model(x)
        finally:
            for h in hooks:
                h.remove()
            for m, flag in training:
                m.training = flag
        f = out.reshape(len(out), -1).double()
        if "representations" in self.metrics:
            f0 = self._ref.setdefault("f", f)
            rec["f_norm"] = float(f.norm(dim=1).mean())
            rec["delta_f"] = M.representation_movement(f, f0)
            for name in self.layers:
                h = acts[name].double()
                h0 = self._ref.setdefault(f"h:{name}", h)
                rec[("h_norm", name)] = float(h.reshape(len(h), -1).norm(dim=1).mean())
                rec[("delta_h", name)] = M.representation_movement(h, h0)
        if "features" in self.metrics and "__features__" in acts:
            phi = acts["__features__"].reshape(len(x), -1).double()
            ck = phi @ phi.T / phi.shape[1]
            self._movement("ck", ck, rec)
        if self.y is not None and "loss" in self.metrics:
            rec["loss"] = float(self.loss_fn(out, self._target(out)))
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

    def _ntk_metrics(self, step: int, x: Tensor, rec: dict) -> None:
        from rdiag.ntk.api import empirical_ntk

        per_layer = "ntk_layers" in self.metrics
        out = empirical_ntk(
            self.model, x, weights=self.weights, dtype=self.dtype, per_layer=per_layer
        )
        layers = out if per_layer else {}
        k = sum(layers.values()) if per_layer else out
        k = k.double()
        if "ntk" in self.metrics or per_layer:
            self._movement("ntk", k, rec)
            eigs = M.eigenvalues(k)
            for i, lam in enumerate(eigs[: self.num_eigs].tolist()):
                rec[("ntk_eig", str(i))] = lam
            rec["ntk_eff_rank"] = M.effective_rank(eigs)
            rec["ntk_trace"] = float(k.trace())
            # Alignment needs one label (or target vector) per probe input.
            per_input = self.y is not None and (
                self.y.dim() == 1 or self.y.is_floating_point()
            )
            if per_input and len(k) > 1:
                rec["ntk_kta"] = M.kernel_target_alignment(k, self.y)
        for name, kl in layers.items():
            kl = kl.double()
            ref = self._ref.setdefault(f"ntk:{name}", kl)
            rec[("ntk_layer_rel_change", name)] = M.relative_change(ref, kl)
            rec[("ntk_layer_trace", name)] = float(kl.trace())
        if self.snapshots and self.store is not None:
            self.store.save_array(self.run_id, step, "ntk", k)

    def _weights(self) -> dict[str, Tensor]:
        from rdiag.parametrization import effective_weights

        try:
            return effective_weights(self.model)
        except (
            ValueError
        ):  # not parametrized by rdiag: the raw weights are the effective ones
            return {
                name: m.weight.detach().reshape(m.weight.shape[0], -1)
                for name, m in _leaf_param_modules(self.model)
                if isinstance(getattr(m, "weight", None), Tensor)
                and m.weight.dim() >= 2
            }

    def _weight_metrics(self, rec: dict) -> None:
        for name, w in self._weights().items():
            w = w.detach().double()
            op, fro = M.matrix_norms(w)
            w0, op0 = self._ref.setdefault(f"W:{name}", (w.clone(), op))
            dop, dfro = M.matrix_norms(w - w0)
            rec[("W_op", name)], rec[("W_fro", name)] = op, fro
            rec[("dW_op", name)], rec[("dW_fro", name)] = dop, dfro
            rec[("dW_rel", name)] = dop / max(op0, 1e-300)

    def _target(self, out: Tensor) -> Tensor:
        y = self.y.to(out.device)
        return y.to(out.dtype) if y.is_floating_point() else y

    def _grad_norm(self, x: Tensor) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        out = self.model(x)
        grads = torch.autograd.grad(self.loss_fn(out, self._target(out)), params)
        return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))

    def _sharpness(self, step: int, x: Tensor, y: Tensor, rec: dict) -> None:
        from rdiag.curvature import top_eigenvalues

        pre = self.optimizer if self.optimizer is not None else self.weights
        # Adam's preconditioner exists only after its first step: no value before that.
        fresh = self.optimizer is not None and not any(self.optimizer.state.values())
        todo = [] if fresh else [("sharpness_precond", pre)]
        if "sharpness" in self.metrics:
            todo.insert(0, ("sharpness", None))
        for key, precond in todo:
            if key == "sharpness_precond" and precond is None and "sharpness" in rec:
                rec[key] = rec["sharpness"]
                continue
            res = top_eigenvalues(
                self.model,
                self.loss_fn,
                (x, y),
                k=1,
                tol=self.sharpness_tol,
                warm_start=self._warm.get(key),
                preconditioner=precond,
                dtype=self.dtype,
                criterion="eigenvalue",
            )
            self._warm[key] = res.eigenvectors
            if self.snapshots and self.store is not None:
                self.store.save_array(self.run_id, step, key, res.eigenvectors[:, 0])
            rec[key] = float(res.eigenvalues[0])
            rec[f"{key}_matvecs"] = float(res.num_matvecs)
