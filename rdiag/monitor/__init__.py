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
  initialization, and ``||dW||_op / ||W_0||_op`` (spectral norms by warm-started
  Lanczos at the tracking tolerance);
* ``"sharpness"``: the top (largest algebraic) Hessian eigenvalue, raw and
  preconditioned by the per-layer learning rates (``lambda_max(M^1/2 H M^1/2)``;
  with an Adam optimizer its second-moment preconditioner, recorded from its
  first step on), each warm-started from the previous check's eigenvector, to
  the tracking tolerance ``sharpness_tol`` (3e-4 relative), with its Ritz
  residual (``sharpness/raw_residual``: ``|lambda - theta| <= ||r||``); ``"sharpness_precond"``: only the
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

Each metric group is a unit of :mod:`rdiag.monitor.units` (its records, needs,
reference state and cost declared on its class); units that read the probe's
forward pass share one.

Cost and budget: every check records ``cost/<unit>`` (seconds per unit, and
``cost/forward`` for the shared forward pass; synchronized on CUDA) and
``monitor/check_steps`` (the check in training steps, once a step was timed);
one-time planning (eNTK plans, the Hessian operator, forward-mode probes) is
timed apart. :meth:`Monitor.cost` breaks the cost down per unit (planning,
first check, later checks; :mod:`rdiag.monitor.budget`). Training time is the
wall time since the first call to :meth:`step` minus the Monitor's own time.
With ``budget_fraction=b`` the Monitor plans once, after the second check (the
first later one: the first has cold starts) and before any skip: it runs every ``s``-th scheduled check, ``s`` the
smallest stride whose measured check cost fits ``b`` of training time, says so
once, and lists the scheduled steps it leaves out (``Monitor.skipped_steps``;
the schedule is thinned, never shifted). The first check and any
``force=True`` check always run; ``budget_fraction=None`` runs exactly the
schedule. :meth:`Monitor.state_dict` carries the references, counters,
training time and history, so a resumed run measures movement from the original
initialization (the Lightning and Hugging Face callbacks of
:mod:`rdiag.integrations` save it with their checkpoints).
"""

from rdiag.monitor.budget import BudgetPlan, CostReport, Schedule, _schedule
from rdiag.monitor.core import (
    DEFAULT_METRICS,
    MEASUREMENT_ERRORS,
    METRICS,
    Monitor,
    _split_probe,
    default_layers,
)
from rdiag.monitor.units import TRACKING_TOL, UNITS, Check, Metric, register

__all__ = [
    "DEFAULT_METRICS",
    "MEASUREMENT_ERRORS",
    "METRICS",
    "TRACKING_TOL",
    "UNITS",
    "BudgetPlan",
    "Check",
    "CostReport",
    "Metric",
    "Monitor",
    "Schedule",
    "_schedule",
    "_split_probe",
    "default_layers",
    "register",
]
