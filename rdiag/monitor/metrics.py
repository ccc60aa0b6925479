"""The Monitor's built-in metric units (see :mod:`rdiag.monitor.units`).

One class per metric group, registered in the order the Monitor measures them:
the eNTK, the conjugate kernel, representations, eNTK moments, weights,
linearization, gradient norm, sharpness, trace, and the probe's loss and
accuracy. ``monitor`` below is the :class:`~rdiag.monitor.Monitor` measuring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from rdiag import metrics as M
from rdiag import records as R
from rdiag._autodiff import JvpMode, jvp, probe_jvp_mode
from rdiag._inputs import Inputs, batch_size
from rdiag.distributed import shard_of
from rdiag.kernels import kernel_stats
from rdiag.linalg.lanczos import lanczos
from rdiag.linalg.moments import kernel_moments
from rdiag.linalg.trace import hutch_plus_plus
from rdiag.losses import apply_loss
from rdiag.monitor.units import TRACKING_TOL, Check, Metric, register
from rdiag.ntk.handle import ntk_fn
from rdiag.operators.base import LinearOperator
from rdiag.operators.ntk import NTKOperator


def _movement(key: str, k: Tensor, state: Any, rec: dict) -> None:
    """A kernel's movement from ``state.k0`` (set at the first check) and ``state.prev``."""
    if state.k0 is None:
        state.k0 = k
    stats = kernel_stats(state.k0, k)
    rec[f"{key}/rel_change"] = stats.relative_change()
    rec[f"{key}/distance"] = stats.distance()
    if k.shape[0] > 1:
        rec[f"{key}/cka"] = stats.centered_alignment()
    if state.prev is not None:
        rec[f"{key}/rel_change_prev"] = kernel_stats(state.prev, k).relative_change()
    state.prev = k


@register
class NTK(Metric):
    """The learning-rate-weighted eNTK: movement, alignment, spectrum; per layer."""

    name = "ntk"
    metrics = ("ntk", "ntk_layers")
    records = (
        "ntk/rel_change", "ntk/distance", "ntk/cka", "ntk/rel_change_prev",
        "ntk/eig/<i>", "ntk/eff_rank", "ntk/trace", "ntk/kta",
        "ntk_layers/rel_change/<layer>", "ntk_layers/trace/<layer>",
    )  # fmt: skip
    cost = "one eNTK (N, N): N Jacobian rows or the structured capture"

    @dataclass
    class State:
        """``k0``, ``prev``: ``(N, N)`` kernels; ``layers0``: layer -> its first kernel."""

        k0: Tensor | None = None
        prev: Tensor | None = None
        layers0: dict[str, Tensor] = field(default_factory=dict)

    def __init__(self, monitor: Any, wanted: set[str]) -> None:
        super().__init__(monitor, wanted)
        self.handle = ntk_fn(
            monitor.fm,
            lr_multipliers=monitor.lr_multipliers,
            per_layer="ntk_layers" in self.wanted,
            process_group=monitor.group.group if monitor.sharded else None,
        )

    def _x(self, check: Check) -> Inputs:
        return (
            shard_of(check.x, self.monitor.group) if self.monitor.sharded else check.x
        )

    def setup(self, check: Check) -> None:
        """One-time planning (see :meth:`Metric.setup`)."""
        if not self.monitor.sharded:
            self.handle.plan(self._x(check))

    def measure(self, check: Check) -> None:
        """This unit's records of ``check`` (see the class)."""
        mon, rec, st = self.monitor, check.rec, self.state
        out = self.handle(self._x(check))
        per_layer = "ntk_layers" in self.wanted
        layers = out if per_layer else {}
        k = (sum(layers.values()) if per_layer else out).double()
        if "ntk" in self.wanted:
            _movement("ntk", k, st, rec)
            eigs = M.eigenvalues(k)
            for i, lam in enumerate(eigs[: mon.k].tolist()):
                rec[R.name("ntk/eig", str(i))] = lam
            rec["ntk/eff_rank"] = M.effective_rank(eigs)
            rec["ntk/trace"] = float(k.trace())
            y = mon.y  # alignment needs one label (or target vector) per input
            if y is not None and (y.dim() == 1 or y.is_floating_point()) and len(k) > 1:
                rec["ntk/kta"] = M.kernel_target_alignment(k, y)
        for name, kl in layers.items():
            kl = kl.double()
            ref = st.layers0.setdefault(name, kl)
            rec[R.name("ntk_layers/rel_change", name)] = kernel_stats(
                ref, kl
            ).relative_change()
            rec[R.name("ntk_layers/trace", name)] = float(kl.trace())
        if mon.snapshots and mon.store is not None:
            mon.store.save_array(mon.run_id, check.step, "ntk", k)

    def legacy_state(self, ref: dict, prev: dict, warm: dict) -> dict | None:
        """The previous release's keys of this unit."""
        layers0 = {k[4:]: v for k, v in ref.items() if k.startswith("ntk:")}
        return {"k0": ref.get("ntk"), "prev": prev.get("ntk"), "layers0": layers0}


@register
class Features(Metric):
    """The conjugate kernel ``Phi Phi^T / n`` of the read-out's inputs, and its movement."""

    name = "features"
    metrics = ("features",)
    records = ("ck/rel_change", "ck/distance", "ck/cka", "ck/rel_change_prev")
    forward = True
    cost = "the shared forward pass and an (N, N) Gram"

    @dataclass
    class State:
        """``k0``: the first check's kernel; ``prev``: the previous one (``(N, N)``)."""

        k0: Tensor | None = None
        prev: Tensor | None = None

    def taps(self) -> tuple[set[str], set[str]]:
        """The tapped modules (see :meth:`Metric.taps`)."""
        readout = self.monitor.readout
        return set(), set() if readout is None else {readout}

    def measure(self, check: Check) -> None:
        """This unit's records of ``check`` (see the class)."""
        phi = check.inputs.get(self.monitor.readout)
        if phi is None:
            return
        phi = phi.reshape(batch_size(check.x), -1).double()
        _movement("ck", phi @ phi.T / phi.shape[1], self.state, check.rec)

    def legacy_state(self, ref: dict, prev: dict, warm: dict) -> dict | None:
        """The previous release's keys of this unit."""
        return {"k0": ref.get("ck"), "prev": prev.get("ck")}


@register
class Representations(Metric):
    """Per layer ``||h_t||`` and ``||h_t - h_0||``; the output's ``||f||``, ``||f - f_0||``."""

    name = "representations"
    metrics = ("representations",)
    records = ("f_norm", "delta_f", "h_norm/<layer>", "delta_h/<layer>")
    forward = True
    cost = "the shared forward pass"

    @dataclass
    class State:
        """``f0 (N, O)``, ``h0``: layer -> ``(N, ...)``, float64, at the first check."""

        f0: Tensor | None = None
        h0: dict[str, Tensor] = field(default_factory=dict)

    def taps(self) -> tuple[set[str], set[str]]:
        """The tapped modules (see :meth:`Metric.taps`)."""
        return set(self.monitor.layers), set()

    def measure(self, check: Check) -> None:
        """This unit's records of ``check`` (see the class)."""
        n = batch_size(check.x)
        f = check.out.reshape(n, -1).double()
        st, rec = self.state, check.rec
        if st.f0 is None:
            st.f0 = f
        rec["f_norm"] = float(f.norm(dim=1).mean())
        rec["delta_f"] = M.representation_movement(f, st.f0)
        for name in self.monitor.layers:
            h = check.outputs[name].double()
            if h.dim() == 0 or h.shape[0] != n:
                self.monitor.notices.say(
                    f"no-sample-axis-{name}",
                    f"Monitor: the output of layer {name!r} has shape "
                    f"{tuple(h.shape)}, without the probe's {n} samples first (e.g. "
                    "position embeddings broadcast over the batch); its "
                    "representation is not tracked",
                )
                continue
            h0 = st.h0.setdefault(name, h)
            rec[R.name("h_norm", name)] = float(h.reshape(n, -1).norm(dim=1).mean())
            rec[R.name("delta_h", name)] = M.representation_movement(h, h0)

    def legacy_state(self, ref: dict, prev: dict, warm: dict) -> dict | None:
        """The previous release's keys of this unit."""
        h0 = {k[2:]: v for k, v in ref.items() if k.startswith("h:")}
        return {"f0": ref.get("f"), "h0": h0}


@register
class NTKMoments(Metric):
    """eNTK statistics from operator products on a large probe (:func:`kernel_moments`)."""

    name = "ntk_moments"
    metrics = ("ntk_moments",)
    records = tuple(
        f"ntk_moments/{s}{e}"
        for s in ("trace", "frobenius", "eff_rank", "rel_change")
        for e in ("", "_se")
    )
    cost = "moments_matvecs eNTK products on the large probe"

    @dataclass
    class State:
        """The first check's Rademacher probes and their products (the reference)."""

        probes: Tensor | None = None
        products: Tensor | None = None

    def __init__(self, monitor: Any, wanted: set[str]) -> None:
        super().__init__(monitor, wanted)
        self.operator = NTKOperator(
            monitor.fm,
            monitor.x if monitor.moments_probe is None else monitor.moments_probe,
            lr_multipliers=monitor.lr_multipliers,
            block_size=monitor.moments_block_size,
        )

    def measure(self, check: Check) -> None:
        """This unit's records of ``check`` (see the class)."""
        st = self.state
        ref = None if st.probes is None else (st.probes, st.products)
        m = kernel_moments(self.operator, self.monitor.moments_matvecs, reference=ref)
        if ref is None:
            st.probes, st.products = m.probes, m.products
        stats = {
            "trace": m.trace,
            "frobenius": m.frobenius,
            "eff_rank": m.effective_rank,
            "rel_change": m.rel_change,
        }
        for stat, est in stats.items():
            if est is not None:
                check.rec[f"ntk_moments/{stat}"] = est.value
                check.rec[f"ntk_moments/{stat}_se"] = est.std_err

    def legacy_state(self, ref: dict, prev: dict, warm: dict) -> dict | None:
        """The previous release's keys of this unit."""
        saved = ref.get("ntk_moments")
        return None if saved is None else {"probes": saved[0], "products": saved[1]}


@register
class Weights(Metric):
    """Per layer operator and Frobenius norms of ``W`` and ``W - W_0``, and ``dW_rel``.

    Spectral norms by Lanczos on the Gram at :data:`TRACKING_TOL` (relative, on
    the squared norm: about half that on the norm), warm-started from the
    previous check's singular vector; matrices with a side below
    ``exact_below`` (256) by ``svdvals``. In the weights' dtype; Frobenius norms
    accumulated in float64.
    """

    name = "weights"
    metrics = ("weights",)
    records = tuple(
        f"{m}/<layer>" for m in ("W_op", "W_fro", "dW_op", "dW_fro", "dW_rel")
    )
    cost = "a few Gram products per layer (no model pass)"
    exact_below = 256

    @dataclass
    class State:
        """Per layer: ``w0`` (its first weight, ``(out, in)``), ``op0``, warm vectors."""

        w0: dict[str, Tensor] = field(default_factory=dict)
        op0: dict[str, float] = field(default_factory=dict)
        warm: dict[str, Tensor] = field(default_factory=dict)

    def _norms(self, key: str, w: Tensor) -> tuple[float, float]:
        fro = float(torch.linalg.matrix_norm(w, dtype=torch.float64))
        if min(w.shape) < self.exact_below:
            return float(torch.linalg.svdvals(w.double())[0]), fro
        res = lanczos(
            M._GramOperator(w),
            k=1,
            tol=TRACKING_TOL,
            warm_start=self.state.warm.get(key),
            criterion="eigenvalue",
        )
        self.state.warm[key] = res.eigenvectors[:, 0]
        return float(res.eigenvalues[0].clamp_min(0).sqrt()), fro

    def measure(self, check: Check) -> None:
        """This unit's records of ``check`` (see the class)."""
        st, rec = self.state, check.rec
        for name, w in self.monitor.weights().items():
            w = w.detach()
            w = w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(-1, 1)
            w = w.float() if w.dtype in (torch.float16, torch.bfloat16) else w
            if name not in st.w0:
                op, fro = self._norms(name, w)
                st.w0[name], st.op0[name] = w.clone(), op
            else:
                op, fro = self._norms(name, w)
            dop, dfro = self._norms(f"d:{name}", w - st.w0[name])
            rec[R.name("W_op", name)], rec[R.name("W_fro", name)] = op, fro
            rec[R.name("dW_op", name)], rec[R.name("dW_fro", name)] = dop, dfro
            # Relative to a zero initial weight (a zero read-out) it is undefined.
            op0 = st.op0[name]
            rec[R.name("dW_rel", name)] = dop / op0 if op0 > 0 else math.nan

    def legacy_state(self, ref: dict, prev: dict, warm: dict) -> dict | None:
        """The previous release's keys of this unit."""
        saved = {k[2:]: v for k, v in ref.items() if k.startswith("W:")}
        return {
            "w0": {k: v[0] for k, v in saved.items()},
            "op0": {k: v[1] for k, v in saved.items()},
        }


@register
class Linearization(Metric):
    """``||f_t - f_lin,t|| / ||f_t - f_0||`` on the probe (0 at the first check)."""

    name = "linearization"
    metrics = ("linearization",)
    records = ("lin_error",)
    forward = True
    cost = "the shared forward pass and one jvp"

    @dataclass
    class State:
        """``theta0``: the first check's parameters; ``f0``: its output (float64)."""

        theta0: dict[str, Tensor] | None = None
        f0: Tensor | None = None

    def __init__(self, monitor: Any, wanted: set[str]) -> None:
        super().__init__(monitor, wanted)
        self.jvp_mode: JvpMode | None = None

    def setup(self, check: Check) -> None:
        """One-time planning (see :meth:`Metric.setup`)."""
        self.jvp_mode = probe_jvp_mode(self.monitor.fm, check.x)

    def measure(self, check: Check) -> None:
        """This unit's records of ``check`` (see the class)."""
        fm, st = self.monitor.fm, self.state
        params = fm.params
        if st.theta0 is None:
            st.theta0 = {n: p.clone() for n, p in params.items()}
        f = check.out.reshape(batch_size(check.x), -1).double()
        if st.f0 is None:
            st.f0 = f
        moved = float((f - st.f0).norm())
        if moved == 0.0:
            check.rec["lin_error"] = 0.0
            return
        delta = {n: params[n] - st.theta0[n] for n in fm.names}
        push = jvp(lambda p: fm(p, check.x), (st.theta0,), (delta,), self.jvp_mode)[1]
        check.rec["lin_error"] = (
            float((f - st.f0 - push.detach().double()).norm()) / moved
        )

    def legacy_state(self, ref: dict, prev: dict, warm: dict) -> dict | None:
        """The previous release's keys of this unit."""
        return {"theta0": ref.get("theta"), "f0": ref.get("f_lin0")}


@register
class GradNorm(Metric):
    """The norm of the probe loss's gradient."""

    name = "grad_norm"
    metrics = ("grad_norm",)
    records = ("grad_norm",)
    needs_targets = needs_loss = True
    cost = "one forward and backward"

    def measure(self, check: Check) -> None:
        """This unit's records of ``check`` (see the class)."""
        fm = self.monitor.fm
        leaves = {n: p.requires_grad_() for n, p in fm.params.items()}
        with torch.enable_grad():
            out = fm.forward(leaves, check.x)
            loss = apply_loss(self.monitor.loss_fn, out, check.target(out))
            grads = torch.autograd.grad(loss, list(leaves.values()))
        check.rec["grad_norm"] = float(
            torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        )


#: Sharpness kinds -> record names of the eigenvalue, its products, its residual.
SHARPNESS = {
    "sharpness": ("sharpness/raw", "sharpness/raw_matvecs", "sharpness/raw_residual"),
    "sharpness_precond": (
        "sharpness/precond",
        "sharpness/precond_matvecs",
        "sharpness/precond_residual",
    ),
}


@register
class Sharpness(Metric):
    """Top Hessian eigenvalue, raw and preconditioned, tracked with warm starts.

    Lanczos to ``Monitor.sharpness_tol`` (relative, eigenvalue criterion),
    warm-started from the previous check's eigenvector; the Ritz residual
    ``||H v - theta v||`` is recorded beside each value (``|lambda - theta| <=
    ||r||``: a certificate of the value).
    """

    name = "sharpness"
    metrics = ("sharpness", "sharpness_precond")
    records = tuple(r for names in SHARPNESS.values() for r in names)
    needs_targets = needs_loss = True
    cost = "Hessian-vector products: about 10 cold, 3-8 warm, per eigenvalue"

    @dataclass
    class State:
        """Kind -> the previous check's eigenvector ``(P, 1)`` (the warm start)."""

        warm: dict[str, Tensor] = field(default_factory=dict)

    def setup(self, check: Check) -> None:
        """One-time planning (see :meth:`Metric.setup`)."""
        check.hessian()  # the operator: built (a probe forward) at the first check

    def measure(self, check: Check) -> None:
        """This unit's records of ``check`` (see the class)."""
        mon = self.monitor
        op = check.hessian()
        todo: list[tuple[str, LinearOperator | None]] = []
        if "sharpness" in self.wanted:
            todo.append(("sharpness", op))
        pre = mon.preconditioned(op)
        if pre is op and "sharpness" in self.wanted:
            todo.append(("sharpness_precond", None))
        elif pre is not None:
            todo.append(("sharpness_precond", pre))
        for key, target in todo:
            name, matvecs, residual = SHARPNESS[key]
            if target is None:  # no preconditioner: the same eigenvalue
                for new, old in zip(SHARPNESS[key], SHARPNESS["sharpness"]):
                    check.rec[new] = check.rec[old]
                continue
            res = lanczos(
                target,
                k=1,
                tol=mon.sharpness_tol,
                warm_start=self.state.warm.get(key),
                criterion="eigenvalue",
            )
            self.state.warm[key] = res.eigenvectors
            if mon.snapshots and mon.store is not None:
                mon.store.save_array(
                    mon.run_id, check.step, key, res.eigenvectors[:, 0]
                )
            check.rec[name] = float(res.eigenvalues[0])
            check.rec[matvecs] = float(res.num_matvecs)
            check.rec[residual] = float(res.residuals[0])

    def legacy_state(self, ref: dict, prev: dict, warm: dict) -> dict | None:
        """The previous release's keys of this unit."""
        return {"warm": {k: v for k, v in warm.items() if k in SHARPNESS}}


@register
class Trace(Metric):
    """The Hessian trace by Hutch++ (30 products)."""

    name = "trace"
    metrics = ("trace",)
    records = ("trace/estimate", "trace/std_err")
    needs_targets = needs_loss = True
    cost = "30 Hessian-vector products"

    def setup(self, check: Check) -> None:
        """One-time planning (see :meth:`Metric.setup`)."""
        check.hessian()

    def measure(self, check: Check) -> None:
        """This unit's records of ``check`` (see the class)."""
        est = hutch_plus_plus(check.hessian(), 30, seed=check.step)
        check.rec["trace/estimate"], check.rec["trace/std_err"] = (
            est.estimate,
            est.std_err,
        )


@register
class Outputs(Metric):
    """The probe loss and accuracy, from the shared forward pass."""

    name = "outputs"
    metrics = ("loss", "accuracy")
    records = ("loss", "accuracy")
    needs_targets = True
    forward = True
    cost = "the shared forward pass"

    def measure(self, check: Check) -> None:
        """This unit's records of ``check`` (see the class)."""
        out, y = check.out, check.y
        if "loss" in self.wanted:
            rec_loss = apply_loss(self.monitor.loss_fn, out, check.target(out))
            check.rec["loss"] = float(rec_loss)
        if "accuracy" in self.wanted and not y.is_floating_point():
            pred = out.argmax(-1)
            check.rec["accuracy"] = float((pred == y.to(pred.device)).double().mean())
