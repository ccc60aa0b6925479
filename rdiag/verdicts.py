"""Verdicts: fitted exponents against their predictions, and the richness they imply.

Every decision rdiag makes about a fitted exponent lives here, for the
coordinate check, the depth check, the report and the richness meter alike.

**Tolerance.** A fitted slope is compared with its prediction under
``sqrt(allowance**2 + scatter**2)``: ``scatter`` is the half-width of the slope's
interval (seed scatter), ``allowance`` the finite-width bias. A correction
``c n**-1/2`` to a power law biases the slope fitted over ``n_min..n_max`` by
``c (n_min**-1/2 - n_max**-1/2) / ln(n_max / n_min)``, so the per-metric
allowances of :data:`ALLOWANCE`, calibrated over widths 64..1024, are scaled by
that factor (narrower, larger widths: tighter; depths use ``1/L`` corrections).
A check whose tolerance cannot tell neighbouring richness values apart
(``RESOLUTION`` in ``r``; on the depth axis ``DEPTH_RESOLUTION``, depth-muP from
CompleteP) fails as inconclusive rather than passing.

**First-step regime** (docs/theory.md section 2). The kernel exponents
(``ntk_rel_change``, ``lin_error``) are ``2r - 1`` once the coherent term
``eta0**2 n**(2r-1)`` dominates, after ``T >~ 10`` steps (:data:`COHERENT_STEPS`);
after one small step the zero-mean fluctuation ``eta0 n**(r-1)`` gives ``r - 1``.
For ``1 < T < 10`` the accepted range is the hull of the two; at ``T >= 10`` a
slope short of ``2r - 1`` towards ``r - 1`` fails with that diagnosis and the
remedy (a larger ``lr`` or more steps).

**Richness.** :func:`estimate_richness` fits one ``r`` to every
richness-dependent, gauge-independent exponent of the dynamics at once
(``delta_h`` per read-in/hidden layer, ``dW_rel`` per layer and, after
``T >= 10`` steps, the kernel exponents): each predicted exponent is affine in ``r``
(``a r + b``, from :data:`rdiag.predictions.PREDICTIONS`), the fit is weighted
least squares with variance ``scatter**2 + allowance**2`` per series and Huber
weights against outlying series (a mis-scaled layer), and its interval comes from
resampling the seeds of every width. ``f0 ~ n^-r`` is the initialization's
alone and only bounds ``r`` from above (a smaller read-out init, zero or
``1/n`` as in mup, trains the same to leading order; a larger one does not), so
it is checked, not fitted. :func:`diagnose` turns the fits into a
verdict: on the scale (lazy, intermediate, muP) or off it (outputs growing with
width, an unstable layer, a layer frozen in the limit, exponents inconsistent
with any one ``r``), and per layer the violated exponents with the change of
learning rate or initialization that fixes them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rdiag.metrics import log_slope
from rdiag.parametrization import ROLES
from rdiag.predictions import PREDICTIONS

#: Steps after which the kernel exponents read ``2r - 1`` (docs/theory.md section 2).
COHERENT_STEPS = 10
#: The metrics with the first-step regime.
KERNEL = frozenset({"ntk_rel_change", "lin_error"})
#: Finite-width allowance of each exponent over widths 64..1024 (the built-in MLP
#: at r = 0, its worst case; the protocol that sets them: docs/theory.md section 7).
ALLOWANCE: dict[str, float] = {
    "h0": 0.05,
    "delta_h": 0.1,
    "f0": 0.1,
    "delta_f": 0.1,
    "delta_f1": 0.1,
    "dW_op": 0.1,
    "dW_rel": 0.15,
    "dW_rel1": 0.15,
    "ntk_rel_change": 0.2,
    "lin_error": 0.2,
}
#: The widths (and depths) the allowances are calibrated over.
REFERENCE = {"width": (64, 1024), "depth": (2, 32)}
#: A tolerance that cannot resolve this step of ``r`` is inconclusive; for an
#: exponent the same at every ``r`` (``h0``, ``delta_f``), one that cannot tell it
#: from the standard parametrization's (``+1`` for the output change).
RESOLUTION, UNSCALED_RESOLUTION = 0.25, 0.5
#: On the depth axis: half the gap between the blocks' exponents of the two
#: named rules (depth-muP ``-1/2``, CompleteP ``0``), which a tolerance must resolve.
DEPTH_RESOLUTION = 0.25
#: Thresholds of the verdict on the scale: lazy below, muP above.
LAZY_BELOW, MUP_ABOVE = 0.125, 0.375
#: Huber threshold (in standard deviations) of the joint fit's weights.
HUBER = 1.5


def _bias(lo: float, hi: float, axis: str) -> float:
    power = 0.5 if axis == "width" else 1.0
    return (lo**-power - hi**-power) / math.log(hi / lo)


def allowance(metric: str, sizes: Sequence[int], *, axis: str = "width") -> float:
    """The finite-width (or finite-depth) allowance of a slope fitted over ``sizes``.

    Args:
        metric: A key of :data:`ALLOWANCE`.
        sizes: The widths (or depths) of the fit (at least two distinct).
        axis: ``"width"`` (``n**-1/2`` corrections) or ``"depth"`` (``1/L``).

    Returns:
        ``ALLOWANCE[metric]`` scaled from :data:`REFERENCE` to ``sizes``.
    """
    lo, hi = min(sizes), max(sizes)
    return ALLOWANCE[metric] * _bias(lo, hi, axis) / _bias(*REFERENCE[axis], axis)


def sensitivity(metric: str, role: str | None, steps: int) -> tuple[float, float]:
    """``(a, b)`` with the predicted exponent ``a r + b`` (``a = b = nan``: none)."""
    p = PREDICTIONS[metric]
    if p.per_layer and role not in ROLES:
        return math.nan, math.nan
    e0, e1 = p.exponent(0.0, role, steps), p.exponent(0.5, role, steps)
    if e0 is None or e1 is None:
        return math.nan, math.nan
    return 2.0 * (e1 - e0), e0


def predicted_at(metric: str, role: str | None, r: float, steps: int) -> float | None:
    """The predicted exponent of ``metric`` at richness ``r`` (``None``: none)."""
    a, b = sensitivity(metric, role, steps)
    return None if math.isnan(a) else a * r + b


# ---- one fit against its prediction -----------------------------------------------
def judge(
    fit: Mapping[str, Any],
    *,
    r: float | None,
    steps: int,
    lr: float | None = None,
    axis: str = "width",
) -> dict[str, Any]:
    """Pass or fail one fitted exponent against its prediction, with the reason.

    Args:
        fit: ``{"metric", "slope", "ci", "predicted", "widths"}`` (a
            :func:`rdiag.predictions.fit_records` entry; ``"depths"`` on the
            depth axis).
        r: The richness the prediction is for (``None``: not on the scale), for
            the first-step regime of the kernel exponents.
        steps: Training steps ``T``.
        lr: The base learning rate, quoted in the first-step remedy.
        axis: ``"width"`` or ``"depth"``.

    Returns:
        ``{"passed": bool | None, "tolerance": float | None, "reason": str,
        "inconclusive": bool, "verdict": str}`` (``passed`` None where nothing is
        predicted; an inconclusive fit has ``passed`` False but claims no
        violation; ``verdict`` is one word of :data:`VERDICTS`). A fit with
        ``"bound": "upper"`` passes anywhere below its prediction too.
    """
    predicted, slope = fit["predicted"], fit["slope"]
    if predicted is None:
        return {
            "passed": None,
            "tolerance": None,
            "reason": "no prediction",
            "inconclusive": False,
            "verdict": "no prediction",
        }
    metric = fit["metric"]
    sizes = fit["widths" if axis == "width" else "depths"]
    if not math.isfinite(slope):
        return _verdict(False, None, "fewer than two sizes with positive values")
    allow = allowance(metric, sizes, axis=axis)
    lo, hi = fit["ci"]
    if lo is None or not math.isfinite(lo):
        return _verdict(
            None,
            None,
            f"inconclusive: slope {slope:+.2f} through two points has no interval; "
            "add seeds or sizes",
        )
    scatter = (hi - lo) / 2
    tol = math.hypot(allow, scatter)
    low = -math.inf if fit.get("bound") == "upper" else predicted
    high = predicted
    first_step = metric in KERNEL and r is not None and 1 < steps < COHERENT_STEPS
    if first_step:  # between the first-step and the coherent exponent
        low, high = sorted((r - 1.0, 2.0 * r - 1.0))
    if axis == "depth":
        limit = DEPTH_RESOLUTION
    else:
        a = abs(sensitivity(metric, "hidden", steps)[0])
        limit = RESOLUTION * a if a > 0 else UNSCALED_RESOLUTION
    if tol >= limit:
        return _verdict(
            None,
            tol,
            f"inconclusive: the tolerance {tol:.2f} (finite-size allowance {allow:.2f}, "
            f"seed scatter +-{scatter:.2f}) cannot tell the prediction from its "
            "neighbours; add seeds, or sizes over a wider range",
        )
    target = f"{predicted:+.2f}" if low == high else f"at most {high:+.2f}"
    if first_step:
        target = (
            f"{low:+.2f}..{high:+.2f} (T = {steps} < {COHERENT_STEPS}: between the "
            "first-step exponent r - 1 and 2r - 1)"
        )
    if low - tol <= slope <= high + tol:
        return _verdict(
            True,
            tol,
            f"slope {slope:+.2f} within {tol:.2f} of the predicted {target} "
            f"(allowance {allow:.2f}, seed scatter +-{scatter:.2f})",
        )
    gap = slope - high if slope > high else low - slope
    side = "above" if slope > high else "below"
    reason = (
        f"slope {slope:+.2f} is {gap:.2f} {side} the predicted {target}, beyond "
        f"the tolerance {tol:.2f}"
    )
    if metric in KERNEL and r is not None and steps >= COHERENT_STEPS and r > 0:
        if side == "below" and slope >= r - 1.0 - tol:
            eta = "" if lr is None else f" (eta0 T = {lr * steps:.3g} now)"
            reason += (
                f"; it lies towards the first-step exponent r - 1 = {r - 1.0:+.2f}: "
                "the zero-mean fluctuation ~ eta0 n^(r-1) still competes with the "
                f"coherent ~ eta0^2 n^(2r-1); raise lr or steps{eta}"
            )
    return _verdict(False, tol, reason)


#: The verdict of a judged fit in one word (``"verdict"`` of :func:`judge`).
VERDICTS = ("pass", "fail", "inconclusive", "no prediction")


def _verdict(passed: bool | None, tol: float | None, reason: str) -> dict[str, Any]:
    """``passed=None``: inconclusive (a failure that claims no violation)."""
    return {
        "passed": passed is True,
        "tolerance": tol,
        "reason": reason,
        "inconclusive": passed is None,
        "verdict": {True: "pass", False: "fail", None: "inconclusive"}[passed],
    }


def judge_fits(
    fits: Iterable[Mapping[str, Any]],
    *,
    r: float | None,
    steps: int,
    lr: float | None = None,
    axis: str = "width",
) -> list[dict[str, Any]]:
    """Copies of ``fits`` with the keys of :func:`judge` added."""
    return [
        {**f, **judge(f, r=r, steps=steps, lr=lr, axis=axis)} for f in fits
    ]  # fmt: skip


# ---- the joint fit of r -----------------------------------------------------------
@dataclass(frozen=True)
class Richness:
    """The richness one joint fit of the exponents gives.

    Attributes:
        r: The estimate ``r_hat`` (``nan`` when no richness-dependent exponent
            was measured).
        interval: Its interval from resampling seeds (``(nan, nan)`` with fewer
            than three seeds at every width).
        systematic: The bias bound from the finite-width allowances.
        weights: ``(metric, layer) -> `` the series' share of the estimate.
        residuals: ``(metric, layer) ->`` standardized residual of the series.
    """

    r: float
    interval: tuple[float, float]
    systematic: float
    weights: dict[tuple[str, str | None], float] = field(repr=False)
    residuals: dict[tuple[str, str | None], float] = field(repr=False)


def _informative(metric: str, role: str | None, steps: int) -> bool:
    if metric not in ("delta_h", "dW_rel", *KERNEL):
        return False
    if metric in KERNEL and steps < COHERENT_STEPS:
        return False
    a, _ = sensitivity(metric, role, steps)
    return math.isfinite(a) and a != 0.0


def _series(records: Iterable[Mapping[str, Any]], steps: int) -> dict:
    """``(metric, layer) -> (role, {(width, seed): log value})`` of the informative ones."""
    out: dict = {}
    for rec in records:
        v = rec["value"]
        if not (_informative(rec["metric"], rec.get("role"), steps) and v > 0):
            continue
        if not math.isfinite(v):
            continue
        key = (rec["metric"], rec.get("layer"))
        role, points = out.setdefault(key, (rec.get("role"), {}))
        points[(rec["width"], rec["seed"])] = math.log(v)
    return out


def _joint(obs: list[tuple[float, float, float, float]]) -> tuple[float, np.ndarray]:
    """Huber-weighted least squares of ``s = a r + b``; ``(r, final weights)``."""
    a, b, s, var = (np.array(c, dtype=float) for c in zip(*obs))
    h = np.ones_like(a)
    r = 0.0
    for _ in range(100):
        new = float((h * a * (s - b) / var).sum() / (h * a**2 / var).sum())
        z = np.abs(s - b - a * new) / np.sqrt(var)
        h = np.minimum(1.0, HUBER / np.maximum(z, 1e-12))
        if abs(new - r) < 1e-10:
            break
        r = new
    return new, h


def _observations(series: dict, runs: Sequence[tuple[int, int]], steps: int):
    """Slopes of every series over ``runs`` (repeats allowed): ``(key, a, b, s, se, sizes)``."""
    out = []
    for key, (role, points) in series.items():
        have = [run for run in runs if run in points]
        widths = [w for w, _ in have]
        if len(set(widths)) < 2:
            continue
        lx = np.log(np.array(widths, dtype=float))
        slope, se = log_slope(lx, np.array([points[run] for run in have]))
        a, b = sensitivity(key[0], role, steps)
        out.append((key, a, b, slope, se, widths))
    return out


def _fit(observations: list) -> tuple[float, np.ndarray, np.ndarray]:
    obs = []
    for (metric, _), a, b, s, se, widths in observations:
        var = (0.0 if math.isnan(se) else se**2) + allowance(metric, widths) ** 2
        obs.append((a, b, s, var))
    r, h = _joint(obs)
    return r, h, np.array([o[3] for o in obs])


def estimate_richness(
    records: Iterable[Mapping[str, Any]],
    steps: int,
    *,
    confidence: float = 0.95,
    resamples: int = 200,
    seed: int = 0,
) -> Richness:
    """One ``r`` from every richness-dependent exponent (see the module docstring).

    Args:
        records: ``{"width", "seed", "metric", "layer", "role", "value"}`` (the
            coordinate check's or the meter's records).
        steps: Training steps ``T`` (the kernel exponents join at ``T >= 10``).
        confidence: Level of the interval.
        resamples: Seed resamples for the interval.
        seed: Seed of the resampling.

    Returns:
        The :class:`Richness`.
    """
    records = list(records)
    series = _series(records, steps)
    runs = sorted({(rec["width"], rec["seed"]) for rec in records})
    observations = _observations(series, runs, steps)
    if not observations:
        return Richness(math.nan, (math.nan, math.nan), math.nan, {}, {})
    r, h, var = _fit(observations)
    a = np.array([o[1] for o in observations])
    allow = np.array([allowance(o[0][0], o[5]) for o in observations])
    share = h * a**2 / var
    systematic = float((share * allow / np.abs(a)).sum() / share.sum())
    keys = [o[0] for o in observations]
    resid = [(o[3] - o[1] * r - o[2]) / math.sqrt(v) for o, v in zip(observations, var)]
    interval = _interval(series, runs, steps, confidence, resamples, seed)
    return Richness(
        r,
        interval,
        systematic,
        dict(zip(keys, (share / share.sum()).tolist())),
        dict(zip(keys, resid)),
    )


def _interval(series, runs, steps, confidence, resamples, seed):
    by_width: dict[int, list[tuple[int, int]]] = {}
    for run in runs:
        by_width.setdefault(run[0], []).append(run)
    if max(len(v) for v in by_width.values()) < 3:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    estimates = []
    for _ in range(resamples):
        drawn = [
            group[i]
            for group in by_width.values()
            for i in rng.integers(0, len(group), len(group))
        ]
        observations = _observations(series, drawn, steps)
        if observations:
            estimates.append(_fit(observations)[0])
    q = (1 - confidence) / 2
    return (float(np.quantile(estimates, q)), float(np.quantile(estimates, 1 - q)))


# ---- verdict and per-layer diagnosis ------------------------------------------------
@dataclass(frozen=True)
class LayerDiagnosis:
    """What the meter found for one layer.

    Attributes:
        name: The module name.
        role: ``"readin"``, ``"hidden"`` or ``"readout"``.
        exponents: Metric -> ``{"slope", "ci", "predicted", "passed", "reason",
            "inconclusive"}`` (``h0``, ``delta_h``, ``dW_rel``, ``dW_rel1``; ``f0``
            on the read-out), the predictions at the diagnosed richness.
        lr_exponent: The width exponent of the layer's learning rate, if measured.
        problem: ``None``, ``"unstable"``, ``"frozen"``, ``"learning rate"`` or
            ``"initialization"``.
        violations: One line per violated exponent.
        fixes: The changes of learning rate or initialization that restore the
            predicted exponents (``n0`` is the smallest width).
    """

    name: str
    role: str
    exponents: dict[str, dict[str, Any]]
    lr_exponent: float | None = None
    problem: str | None = None
    violations: tuple[str, ...] = ()
    fixes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Diagnosis:
    """A verdict, its kind, the per-layer diagnosis and notes (:func:`diagnose`).

    ``kind`` is ``"lazy"``, ``"intermediate"``, ``"mup"`` (on the scale), or
    ``"growing"``, ``"unstable"``, ``"frozen"``, ``"inconsistent"`` (off it), or
    ``"undetermined"``.
    """

    kind: str
    verdict: str
    layers: list[LayerDiagnosis]
    notes: list[str]


def _factor(delta: float, n0: int) -> str:
    return f"x (n/{n0})^{delta:+.2f}"


def _layer(name, role, fits, target, lr_exponent, n0) -> LayerDiagnosis:
    exps = {f["metric"]: f for f in fits}
    problem, violations, fixes = None, [], []
    rel = exps.get("dW_rel")
    if rel is not None and _violated(rel):
        # The first step's update is exactly linear in the layer's rate: its
        # exponent's error is the rate's (later steps saturate or compound).
        first = exps.get("dW_rel1")
        fitted = first if first is not None and _violated(first) else rel
        delta = fitted["slope"] - fitted["predicted"]
        tol = rel["tolerance"] or 0.0
        problem = (
            "unstable"
            if rel["slope"] > tol
            else ("learning rate" if delta > 0 else "frozen")
        )
        violations.append(
            f"||dW||_op/||W_0||_op ~ n^{rel['slope']:+.2f}, the scale at r = "
            f"{target:.2f} needs n^{rel['predicted']:+.2f}"
        )
        lr = (
            ""
            if lr_exponent is None
            else f" (its rate ~ n^{lr_exponent:+.2f} -> n^{lr_exponent - delta:+.2f})"
        )
        # Checked: the change must move the last exponent toward its target too
        # (a rate exponent raises dW_rel's), else the first step and the end
        # disagree and no rate fixes both.
        if -delta * (rel["predicted"] - rel["slope"]) > 0:
            fixes.append(f"learning rate {_factor(-delta, n0)}{lr}")
        else:
            violations.append(
                "no learning-rate fix: the first step's exponent and the last "
                "one are off in opposite directions"
            )
    dh = exps.get("delta_h")
    if dh is not None and math.isfinite(dh["slope"]):
        if dh["slope"] > 0.5 + (dh["tolerance"] or 0.0):
            problem = "unstable"
            violations.append(
                f"||dh|| ~ n^{dh['slope']:+.2f}: its coordinates grow with width "
                "(at most n^+0.50 on the scale)"
            )
        elif _violated(dh):
            violations.append(
                f"||dh|| ~ n^{dh['slope']:+.2f}, predicted n^{dh['predicted']:+.2f}"
            )
    for metric, what in (("h0", "init std (or forward multiplier)"), ("f0", "")):
        fit = exps.get(metric)
        if fit is None or not _violated(fit):
            continue
        delta = fit["slope"] - fit["predicted"]
        norm = "||h_0||" if metric == "h0" else "||f_0||"
        violations.append(
            f"{norm} ~ n^{fit['slope']:+.2f} at initialization, predicted "
            f"n^{fit['predicted']:+.2f}"
        )
        what = what or "init std (or output multiplier)"
        fixes.append(f"{what} {_factor(-delta, n0)}")
        problem = problem or "initialization"
    keep = {m: {k: f[k] for k in _EXPONENT_KEYS} for m, f in exps.items()}
    return LayerDiagnosis(
        name, role, keep, lr_exponent, problem, tuple(violations), tuple(fixes)
    )


#: The per-layer exponents a layer's diagnosis reads.
_PER_LAYER = ("h0", "delta_h", "dW_rel", "dW_rel1")
_EXPONENT_KEYS = ("slope", "ci", "predicted", "passed", "reason", "inconclusive")


def _violated(fit: Mapping[str, Any]) -> bool:
    """A conclusive failure: the exponent is off its prediction."""
    return (
        fit["passed"] is False
        and not fit.get("inconclusive")
        and math.isfinite(fit["slope"])
    )


def diagnose(
    fits: Sequence[Mapping[str, Any]],
    richness: Richness,
    *,
    target: float,
    roles: Mapping[str, str],
    failed: Sequence[Mapping[str, Any]] = (),
    lr_exponents: Mapping[str, float] | None = None,
) -> Diagnosis:
    """The verdict and the per-layer diagnosis of fits judged at richness ``target``.

    Args:
        fits: Fits with predictions at ``target`` and :func:`judge`'s keys.
        richness: The joint fit (:func:`estimate_richness`).
        target: The richness the predictions are for (the estimate clipped to
            ``[0, 1/2]``, or the one asked for).
        roles: Layer -> role, in forward order (the layers diagnosed).
        failed: Diverged runs ``{"width", "seed", "reason"}``.
        lr_exponents: Layer -> width exponent of its learning rate.

    Returns:
        The :class:`Diagnosis`.
    """
    lr_exponents = lr_exponents or {}
    widths = sorted({w for f in fits for w in f.get("widths", ())})
    n0 = widths[0] if widths else 1
    model = {f["metric"]: f for f in fits if f["layer"] is None}
    per_layer: dict[str, list] = {}
    for f in fits:
        if f["layer"] is not None and f["metric"] in _PER_LAYER:
            per_layer.setdefault(f["layer"], []).append(f)
    readouts = [n for n, role in roles.items() if role == "readout"]
    layers = []
    for name, role in roles.items():
        own = list(per_layer.get(name, []))
        if name == (readouts[0] if len(readouts) == 1 else None) and "f0" in model:
            own.append(model["f0"])
        layers.append(_layer(name, role, own, target, lr_exponents.get(name), n0))
    notes = [
        f"{len(failed)} run(s) diverged: " + "; ".join(
            f"width {f['width']} seed {f['seed']}" for f in failed[:6]
        )
    ] if failed else []  # fmt: skip
    kind, verdict = _verdict_of(model, layers, richness, failed)
    return Diagnosis(kind, verdict, layers, notes)


#: Output norms that must not grow with width, and how the verdict names them.
_GROWTH = {
    "f0": "||f_0|| at initialization",
    "delta_f1": "the first step's ||f_1 - f_0||",
    "delta_f": "||f_T - f_0||",
}


def _verdict_of(model, layers, richness, failed) -> tuple[str, str]:
    r = richness.r
    if not math.isfinite(r):
        return "undetermined", (
            "undetermined: no richness-dependent exponent could be fitted"
        )
    for metric, what in _GROWTH.items():
        fit = model.get(metric)
        if fit is not None and math.isfinite(fit["slope"]):
            if fit["slope"] > (fit["tolerance"] or 0.0):
                return "growing", (
                    f"off the scale: outputs grow with width ({what} ~ "
                    f"n^{fit['slope']:+.2f}; as in the standard parametrization)"
                )
    for d in layers:
        h0 = d.exponents.get("h0")
        if h0 is not None and _violated(h0):
            grows = h0["slope"] > h0["predicted"]
            return "growing" if grows else "inconsistent", (
                f"off the scale: activations {'grow' if grows else 'vanish'} with "
                f"width at initialization (layer {d.name}: ||h_0|| ~ "
                f"n^{h0['slope']:+.2f}, n^{h0['predicted']:+.2f} on the scale)"
            )
    unstable = [d for d in layers if d.problem == "unstable"]
    if failed or unstable:
        what = (
            f"layer {unstable[0].name} ({unstable[0].violations[0]})"
            if unstable
            else "training diverged at width(s) "
            + ", ".join(str(w) for w in sorted({f["width"] for f in failed}))
        )
        return "unstable", f"off the scale: unstable, {what}"
    df = model.get("delta_f")
    if df is not None and _violated(df) and df["slope"] < df["predicted"]:
        return "frozen", (
            f"off the scale: frozen in the limit, the output change vanishes with "
            f"width (||f_T - f_0|| ~ n^{df['slope']:+.2f})"
        )
    frozen = [d for d in layers if d.problem == "frozen"]
    if frozen:
        return "frozen", (
            f"off the scale: layer {frozen[0].name} frozen in the limit "
            f"({frozen[0].violations[0]})"
        )
    outliers = sorted(
        (k for k, z in richness.residuals.items() if abs(z) > 3.0), key=str
    )
    interval = ", ".join(f"{v:.2f}" for v in richness.interval)
    estimate = f"r = {r:.2f} [{interval}]"
    if outliers:
        named = ", ".join(f"{m}[{layer}]" if layer else m for m, layer in outliers)
        return "inconsistent", (
            f"off the scale: exponents inconsistent with one richness ({estimate}; "
            f"outlying: {named})"
        )
    if not -richness.systematic <= r <= 0.5 + richness.systematic:
        return "inconsistent", f"off the scale: {estimate} is outside [0, 1/2]"
    if r < LAZY_BELOW:
        return "lazy", f"lazy ({estimate})"
    if r > MUP_ABOVE:
        return "mup", f"muP ({estimate})"
    return "intermediate", f"intermediate ({estimate})"
