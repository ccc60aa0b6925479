"""The richness meter: where a user's own model and optimizer sit on the lazy-rich scale.

:func:`richness_meter` builds ``family(width)`` at every width and seed,
trains it briefly with the user's optimizer and loss (the width experiment of
:func:`rdiag.loop.measured_fit`, the coordinate check's), and fits the width
exponents of ``||h_0||`` and ``||dh||`` per read-in/hidden layer, ``||f_0||``,
``||df||``, ``||dW||_op / ||W_0||_op`` per layer and the relative change of the
learning-rate-weighted eNTK and the linearization error. Nothing about the
model's parametrization is assumed: the role of each layer comes from which of
its weight's axes change with the width (:func:`width_roles`), and the
richness ``r_hat`` from one joint fit of every richness-dependent exponent
(:func:`rdiag.verdicts.estimate_richness`). The verdict and the per-layer
diagnosis are :func:`rdiag.verdicts.diagnose`'s.

The metrics are gauge-independent (norms of representations and outputs,
relative weight changes), with one caveat: ``h`` is read at module outputs, so
a forward multiplier applied *outside* a read-in or hidden module (after
``self.fc(x)``, the multiplier gauge) is not in ``h``; put it inside (a hook, or
:func:`rdiag.apply_parametrization`) or use the table gauge.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rdiag._checks import (
    check_choice,
    check_finite_positive,
    check_positive_int,
    check_seeds,
    check_sizes,
)
from rdiag._inputs import Inputs, batch_size, check_inputs, describe, rows
from rdiag.coord_check import jsonable
from rdiag.data import sample_batch
from rdiag.functional import MODES, Mode, check_per_sample, functionalize
from rdiag.loop import measured_fit
from rdiag.losses import checked_loss
from rdiag.metrics import fit_exponent
from rdiag.parametrization import (
    ROLES,
    applied_parametrization,
)
from rdiag.parametrization import (
    make_optimizer as parametrized_optimizer,
)
from rdiag.predictions import fit_records
from rdiag.roles import width_roles
from rdiag.verdicts import (
    COHERENT_STEPS,
    Diagnosis,
    LayerDiagnosis,
    Richness,
    diagnose,
    estimate_richness,
    judge_fits,
    predicted_at,
)

#: The file :meth:`MeterResult.save` writes (and :mod:`rdiag.report` looks for).
METER_JSON = "meter.json"
#: The Monitor metrics the meter measures.
METRICS = ("representations", "weights", "ntk", "linearization")
OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


@dataclass(frozen=True)
class LRRule:
    """A per-layer learning-rate rule: ``lr * factors[role] * (width / base_width) ** exponents[role]``.

    Roles are the meter's (:func:`width_roles`); a bias or norm gain follows its
    module's role, parameters of modules whose shape does not change with the
    width get ``lr``.

    Attributes:
        lr: The base rate at ``base_width``.
        exponents: Role (``"readin"``, ``"hidden"``, ``"readout"``) -> width
            exponent of its rate (missing roles: 0).
        factors: Role -> a constant factor of its rate (missing roles: 1), e.g.
            ``1/d`` for a read-in of fan-in ``d``.
        optimizer: ``"sgd"`` or ``"adam"``.
        base_width: Where ``width / base_width`` is 1.

    Example:
        >>> # muP SGD in the table gauge (docs/theory.md section 1), inputs of size d = 8
        >>> rule = LRRule(0.3, {"readin": 1, "readout": -1}, factors={"readin": 1 / 8})
        >>> rule.rate("readin", 64), rule.rate("hidden", 64), rule.rate("readout", 64)
        (2.4, 0.3, 0.0046875)
    """

    lr: float
    exponents: Mapping[str, float] = field(default_factory=dict)
    factors: Mapping[str, float] = field(default_factory=dict)
    optimizer: str = "sgd"
    base_width: int = 1

    def __post_init__(self) -> None:
        check_finite_positive(self.lr, "lr")
        check_choice(self.optimizer, "optimizer", ("sgd", "adam"))
        check_positive_int(self.base_width, "base_width")
        for name, table in (("exponents", self.exponents), ("factors", self.factors)):
            bad = sorted(set(table) - set(ROLES))
            if bad:
                raise ValueError(
                    f"expected {name} keyed by roles {list(ROLES)}, got {bad}"
                )

    def rate(self, role: str, width: int) -> float:
        """The learning rate of a ``role`` layer at ``width``."""
        exponent = self.exponents.get(role, 0.0)
        factor = self.factors.get(role, 1.0)
        return self.lr * factor * (width / self.base_width) ** exponent

    def build(self, model: nn.Module, roles: Mapping[str, str], width: int):
        """The optimizer: one parameter group per trainable parameter."""
        groups = []
        for module_name, module in model.named_modules():
            role = roles.get(module_name, "fixed")
            for pname, p in module.named_parameters(recurse=False):
                if p.requires_grad and not any(
                    p is q for g in groups for q in g["params"]
                ):
                    name = f"{module_name}.{pname}" if module_name else pname
                    rate = self.rate(role, width) if role in ROLES else self.lr
                    groups.append({"params": [p], "lr": rate, "name": name})
        kind = torch.optim.SGD if self.optimizer == "sgd" else torch.optim.Adam
        return kind(groups, lr=self.lr)


@dataclass(frozen=True)
class MeterResult:
    """Where a model sits on the lazy-rich scale (:func:`richness_meter`).

    Attributes:
        r: The estimated richness ``r_hat`` (``nan`` if undetermined).
        interval: Its 95% interval from resampling seeds.
        verdict: A short sentence: ``"muP (r = 0.49 [0.47, 0.51])"``, ``"off the
            scale: outputs grow with width ..."``.
        kind: ``"lazy"``, ``"intermediate"``, ``"mup"``, ``"growing"``,
            ``"unstable"``, ``"frozen"``, ``"inconsistent"`` or ``"undetermined"``.
        layers: The per-layer diagnosis, in forward order.
        target: The richness the per-layer predictions and fixes are for.
        systematic: Bias bound of ``r`` from the finite-width allowances.
        fits: Every fitted exponent with its prediction at ``target`` and verdict.
        records: The raw measurements ``{"width", "seed", "metric", "layer",
            "role", "value"}``.
        failed: Runs that diverged ``{"width", "seed", "reason"}``.
        notes: What else the meter noticed.
        widths, seeds, steps: The experiment.
    """

    r: float
    interval: tuple[float, float]
    verdict: str
    kind: str
    layers: list[LayerDiagnosis] = field(repr=False)
    target: float = math.nan
    systematic: float = math.nan
    fits: list[dict] = field(default_factory=list, repr=False)
    records: list[dict] = field(default_factory=list, repr=False)
    failed: list[dict] = field(default_factory=list, repr=False)
    notes: list[str] = field(default_factory=list, repr=False)
    widths: tuple[int, ...] = ()
    seeds: tuple[int, ...] = ()
    steps: int = 0

    def layer(self, name: str) -> LayerDiagnosis:
        """The diagnosis of one layer; raises ``KeyError`` if absent."""
        for d in self.layers:
            if d.name == name:
                return d
        raise KeyError(f"no layer {name!r}; have {[d.name for d in self.layers]}")

    def report(self) -> str:
        """The verdict, the notes and the layers' violations and fixes, as text."""
        lines = [f"verdict: {self.verdict}"]
        lines += [f"note: {n}" for n in self.notes]
        for d in self.layers:
            status = d.problem or "ok"
            lines.append(f"  {d.name} ({d.role}): {status}")
            lines += [f"    violated: {v}" for v in d.violations]
            lines += [f"    fix: {f}" for f in d.fixes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON data (non-finite numbers as ``None``), as saved."""
        return jsonable(asdict(self))

    def save(self, out_dir: str | Path) -> Path:
        """Write ``out_dir/meter.json`` (:meth:`to_dict`)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / METER_JSON
        path.write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")
        return path


# ---- the meter ------------------------------------------------------------------------
def _build(family: Callable[[int], nn.Module], width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # under richness_meter's forked RNG
    model = family(width)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"expected family({width}) to return a torch.nn.Module, got "
            f"{type(model).__name__}; pass a function width -> nn.Module"
        )
    return model


def default_data(
    family: Callable[[int], nn.Module],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    width: int,
    n: int = 16,
    seed: int = 1234,
) -> tuple[Inputs, Tensor]:
    """The meter's batch when none is given: :func:`rdiag.data.sample_batch` at ``width``.

    One ``seed`` draws inputs and targets: the same batch at every width.

    Args:
        family: ``width -> nn.Module``.
        loss_fn: The training loss (it decides the targets).
        width: The width the batch's shapes are read at.
        n: Batch size ``N``.
        seed: Seed of the inputs and targets.

    Returns:
        ``(x (N, ...), y)``.

    Raises:
        TypeError: ``family`` does not return a module, or one whose inputs
            cannot be drawn (see :func:`sample_inputs`).
    """
    check_positive_int(n, "n")
    return sample_batch(_build(family, width, seed), loss_fn, n=n, seed=seed)


def optimizer_factory(kind: str, lr: float) -> OptimizerFactory:
    """``model -> optimizer`` with one base rate: what ``rdiag meter --lr`` trains with.

    A model prepared by :func:`rdiag.apply_parametrization` (rdiag's built-in
    families with ``parametrization=``) gets its parametrization's per-layer
    rates (:func:`rdiag.make_optimizer`, ``lr`` the base rate ``eta_0``); any
    other model a plain ``torch.optim.SGD`` / ``Adam`` over all its trainable
    parameters at ``lr``.

    Args:
        kind: ``"sgd"`` or ``"adam"``.
        lr: The (base) learning rate, ``> 0``.

    Returns:
        The factory, for :func:`richness_meter`'s ``make_optimizer``.
    """
    check_choice(kind, "optimizer", ("sgd", "adam"))
    check_finite_positive(lr, "lr")

    def build(model: nn.Module) -> torch.optim.Optimizer:
        if applied_parametrization(model) is not None:
            return parametrized_optimizer(model, None, lr, optimizer=kind)
        params = [p for p in model.parameters() if p.requires_grad]
        return (torch.optim.SGD if kind == "sgd" else torch.optim.Adam)(params, lr=lr)

    return build


def _optimizer(make_optimizer, model, roles, width) -> torch.optim.Optimizer:
    opt = (
        make_optimizer.build(model, roles, width)
        if isinstance(make_optimizer, LRRule)
        else make_optimizer(model)
    )
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(
            f"expected make_optimizer(model) to return a torch.optim.Optimizer, got "
            f"{type(opt).__name__}; pass a function model -> optimizer or an LRRule"
        )
    return opt


def _rates(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, float]:
    """Parameter name -> its learning rate (0 for parameters not optimized)."""
    lr = {id(p): float(g["lr"]) for g in opt.param_groups for p in g["params"]}
    return {
        n: lr.get(id(p), 0.0) for n, p in model.named_parameters() if p.requires_grad
    }


def _batches(data: Any, steps: int) -> Callable[[], Iterable]:
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], Tensor):
        check_inputs(data[0], "data x")
        return lambda: itertools.repeat(data, steps)
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, Tensor)):
        if iter(data) is data:
            raise TypeError(
                "expected data that can be iterated once per run (a DataLoader, a "
                f"list of batches), got the one-shot iterator {type(data).__name__}"
            )
        if hasattr(data, "__len__") and len(data) < steps:
            raise ValueError(
                f"expected at least steps={steps} batches, got {len(data)}; pass "
                "more batches or fewer steps"
            )
        return lambda: itertools.islice(iter(data), steps)
    raise TypeError(
        f"expected data as a batch (x, y) with y a tensor, or an iterable of such "
        f"batches (a DataLoader), got {type(data).__name__}"
    )


def richness_meter(
    family: Callable[[int], nn.Module],
    make_optimizer: OptimizerFactory | LRRule,
    data: tuple[Inputs, Tensor] | Iterable[tuple[Inputs, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    widths: Sequence[int],
    steps: int,
    seeds: int | Sequence[int],
    probe: Inputs | None = None,
    probe_size: int = 32,
    target: float | None = None,
    roles: Mapping[str, str] | None = None,
    ntk: bool = True,
    mode: Mode = "eval",
    output_fn: Callable[[object], Tensor] | None = None,
    confidence: float = 0.95,
) -> MeterResult:
    """Train ``family`` briefly at every width and say where it sits on the scale.

    Args:
        family: ``width -> nn.Module``; the width must change the shapes.
        make_optimizer: ``model -> torch.optim.Optimizer`` (the learning rates are
            read from its parameter groups), or an :class:`LRRule`.
        data: The training batch ``(x (N, ...), y)`` (every step, full batch), or
            an iterable of batches re-iterated for every run (at least ``steps``).
        loss_fn: ``loss_fn(output, y)``, a scalar (:func:`rdiag.losses.apply_loss`).
        widths: At least two widths (a 16x span recommended).
        steps: Optimizer steps per run (``>= 10`` lets the kernel exponents in).
        seeds: Number of seeds or the seeds; a seed fixes the init (and the batch
            order of a shuffling loader). Three or more give an interval.
        probe: Measurement inputs; default the first ``probe_size`` training inputs.
        probe_size: See ``probe``.
        target: The richness the per-layer predictions and fixes are for; default
            the estimate, clipped to ``[0, 1/2]``.
        roles: Module name -> role, overriding :func:`width_roles`.
        ntk: Measure the kernel metrics (two eNTKs and a jvp per run).
        mode: The Monitor's ``mode`` (``"eval"``: dropout off).
        output_fn: Picks the output tensor of a model returning something else.
        confidence: Level of the interval.

    Returns:
        The :class:`MeterResult`.

    Raises:
        TypeError: ``family`` does not return a module, or ``make_optimizer``
            an optimizer; ``data`` is not a batch or batches.
        ValueError: Bad widths, steps, seeds or target; the width does not change
            the parameter shapes; a batch-coupled model.

    Example:
        >>> import torch.nn.functional as F
        >>> import rdiag
        >>> x, y = torch.randn(8, 3), torch.randn(8, 2)
        >>> res = richness_meter(
        ...     lambda n: rdiag.make_model("mlp", n, d_in=3, d_out=2, parametrization="mup"),
        ...     lambda m: rdiag.make_optimizer(m, None, 0.3),
        ...     (x, y), F.mse_loss, widths=[16, 64], steps=2, seeds=1, ntk=False,
        ... )
        >>> [(d.name, d.role) for d in res.layers]
        [('readin', 'readin'), ('hidden.0', 'hidden'), ('readout', 'readout')]
        >>> "exponent(s) inconclusive" in res.notes[0]  # one seed at two widths
        True

    """
    widths = check_sizes(widths, "width")
    check_positive_int(steps, "steps")
    seeds = check_seeds(seeds)
    check_choice(mode, "mode", MODES)
    if target is not None and not 0.0 <= target <= 0.5:
        raise ValueError(f"expected target in [0, 1/2], got {target!r}")
    if not callable(family):
        raise TypeError(
            f"expected family to be a function width -> nn.Module, got "
            f"{type(family).__name__}"
        )
    # The caller's RNG is left as it was: every build reseeds (per run).
    cuda = range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        batches = _batches(data, steps)
        small = _build(family, widths[0], seeds[0])
        found = width_roles(small, _build(family, widths[-1], seeds[0]))
        found.update(roles or {})
        first, first_y = next(iter(batches()))
        if probe is None:
            probe = rows(first, slice(0, min(probe_size, batch_size(first))))
        _check_fits(small, widths[0], (first, first_y), probe, loss_fn, mode, output_fn)
        tracked = [n for n, role in found.items() if role in ("readin", "hidden")]
        metrics = list(METRICS[:2] + (METRICS[2:] if ntk else ()))
        records, failed, rates = [], [], {}
        for width, seed in itertools.product(widths, seeds):
            model = _build(family, width, seed)
            check_per_sample(model, mode)
            opt = _optimizer(make_optimizer, model, found, width)
            lrs = _rates(model, opt)
            rates.setdefault(width, _layer_rates(model, lrs, found))
            measured = measured_fit(
                model,
                opt,
                batches(),
                loss_fn,
                probe,
                found,
                steps=steps,
                metrics=metrics,
                lr_multipliers=lrs,
                layers=tracked,
                mode=mode,
                output_fn=output_fn,
            )
            if isinstance(measured, str):
                failed.append({"width": width, "seed": seed, "reason": measured})
                continue
            records += [dict(width=width, seed=seed, **rec) for rec in measured]
        return _result(
            records, failed, found, rates, widths, seeds, steps, target, confidence
        )


def _check_fits(model, width, batch, probe, loss_fn, mode, output_fn) -> None:
    """Run the smallest model on the data (and loss) and on the probe, once.

    Raises:
        ValueError: The data, the loss or the probe does not fit the model (named),
            before any run trains.
    """
    fm = functionalize(model, mode=mode, output_fn=output_fn)
    x, y = batch
    for what, inputs in (("the training data", x), ("the probe", probe)):
        try:
            out = fm.probe(fm.cast_input(inputs, "x"))
        except ValueError as err:
            raise ValueError(
                f"{what} ({describe(inputs)}) does not fit family({width}): "
                f"{err}; pass inputs in the form its forward takes"
            ) from err
        if what == "the training data":
            with torch.enable_grad():
                checked_loss(loss_fn, out, y.to(out.device))


def _layer_rates(model, lrs, roles) -> dict[str, float]:
    """Layer -> the learning rate of its weight."""
    return {n: lrs[f"{n}.weight"] for n in roles if lrs.get(f"{n}.weight", 0.0) > 0}


def _lr_exponents(rates: dict[int, dict[str, float]]) -> dict[str, float]:
    widths = sorted(rates)
    out = {}
    for name in rates[widths[0]]:
        values = [rates[w].get(name) for w in widths]
        if all(v is not None and v > 0 for v in values):
            out[name] = fit_exponent(widths, values)[0]
    return out


def _result(records, failed, roles, rates, widths, seeds, steps, target, confidence):
    richness: Richness = estimate_richness(records, steps, confidence=confidence)
    r = richness.r
    aim = target if target is not None else min(max(r, 0.0), 0.5)
    fits = fit_records(records, None, steps, confidence=confidence)
    for f in fits:
        f["predicted"] = (
            None
            if math.isnan(aim)
            else predicted_at(f["metric"], f["role"], aim, steps)
        )
        if f["metric"] == "f0":  # a smaller read-out init is on the scale too
            f["bound"] = "upper"
    fits = judge_fits(fits, r=aim, steps=steps)
    diagnosed = {n: role for n, role in roles.items() if role in ROLES}
    found: Diagnosis = diagnose(
        fits,
        richness,
        target=aim,
        roles=diagnosed,
        failed=failed,
        lr_exponents=_lr_exponents(rates),
    )
    skipped = sorted(n for n, role in roles.items() if role not in ROLES)
    notes = list(found.notes)
    if skipped:
        notes.append(
            f"not diagnosed (no width exponent predicted): {', '.join(skipped[:8])} "
            "(tied or width-independent weights)"
        )
    vague = [f for f in fits if f.get("inconclusive")]
    if vague:
        names = ", ".join(
            f"{f['metric']}[{f['layer']}]" if f["layer"] else f["metric"]
            for f in vague[:6]
        )
        notes.append(
            f"{len(vague)} exponent(s) inconclusive ({names}): their tolerance cannot "
            "resolve r +- 1/4; use larger widths, a wider span or more seeds"
        )
    if steps < COHERENT_STEPS:
        notes.append(
            f"kernel exponents left out of r (T = {steps} < {COHERENT_STEPS} steps: "
            "the first-step regime)"
        )
    return MeterResult(
        r,
        richness.interval,
        found.verdict,
        found.kind,
        found.layers,
        aim,
        richness.systematic,
        fits,
        records,
        failed,
        notes,
        tuple(widths),
        tuple(seeds),
        steps,
    )
