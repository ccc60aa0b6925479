"""Richness parameterizations as data: per-layer multipliers, init and learning rates.

A :class:`Parametrization` says, for each layer *role* (``"readin"``, ``"hidden"``,
``"readout"``), three numbers as functions of the layer's fan-in and of the width
ratio ``m = width / base_width``:

* the **forward multiplier** ``c`` (the layer computes ``c W x + c_b b``),
* the **initialization scale** (std of the raw Gaussian weights; ``None`` keeps
  PyTorch's default init, the standard parameterization),
* the **learning-rate scale** ``eta_l / eta_0``, separately for SGD and Adam.

Each is a :class:`Scale`, ``const * fan_in**a * m**b``. Biases and norm gains use
the rule of their layer's role with ``fan_in = 1`` (a bias is a weight on the
constant input 1); gains of normalization layers follow the hidden rule.

The richness family of Karkada's tutorial (``alpha = m**r``, ``0 <= r <= 1/2``) in
the two gauges of SCIENCE.md section 1 (``fan_in`` is ``d`` for the read-in and
``n`` otherwise)::

                         read-in / hidden          read-out
    table:   init std    fan_in^-1/2               m^-r fan_in^-1/2
             SGD lr      m^2r / fan_in             1 / fan_in
             Adam lr     m^(r-1/2) / fan_in        1 / fan_in
    multiplier gauge:    weights N(0,1), multipliers fan_in^-1/2 and
                         m^-r fan_in^-1/2, SGD lr m^2r (one global rate)

The Adam rates follow from Adam's per-coordinate normalization (an update of
size ``eta`` per entry); in the multiplier gauge a multiplier ``c`` maps them as
``c eta`` (not ``c^2 eta``). They are checked by a coordinate check
(tests/test_science.py: hidden ``||dh|| ~ n^(1/2)`` at muP, and ``~ n^(3/2)`` with
the SGD rates under Adam). Embeddings have fan-in 1 (one row per token).

**Depth.** A :class:`DepthRule` says how residual branches scale with the
depth ``L`` (the number of residual blocks), as powers of ``L / base_depth``:
the branch multiplier ``L**-alpha`` on the output of the last layer of every
residual branch (``h + L**-alpha F(h)``) and the learning-rate scale of every
layer inside a branch, ``L**lr_sgd`` or ``L**lr_adam``. A branch's gradient
carries its multiplier, so SGD needs ``L**(2 alpha - 1)`` and Adam (per-coordinate
updates) ``L**(alpha - 1)`` for each block to move the residual stream by
``Theta(1/L)`` (:data:`DEPTH_RULES`: ``"depth-mup"``, ``alpha = 1/2``, the
default, and ``"completep"``, ``alpha = 1``, arXiv 2505.01618; ``"none"``
leaves branches unscaled). Which layers form the branches is the model's
:class:`Branches` (its ``branches`` attribute, or ``branches=`` to
:func:`apply_parametrization`); a model without branches ignores the rule.

Presets: :func:`ntk` (multiplier gauge, r = 0), :func:`mup` (table gauge, r = 1/2),
:func:`mean_field` (multiplier gauge, r = 1/2), :func:`standard` (PyTorch default
init, one rate), :func:`richness` (any r, either gauge) and :func:`gamma_family`.
Biases start at 0 (PyTorch's default under SP); norm gains keep their init.
Attention logits are scaled by ``d_head**-(1/2 + r)`` (``1/sqrt(d_head)`` at NTK,
``1/d_head`` at muP; in between an interpolation, not a derived rule).

How the multipliers are applied without renaming parameters: every parametrized
module (``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.Embedding``) gets one forward
hook, a :class:`LayerScale` object that maps the module's output ``y = W x + b``
to ``c y + (c_b - c) b`` (exactly ``c W x + c_b b``; a no-op while both
multipliers are 1) and holds the layer's role, fan-in and multipliers, and the
:class:`Applied` record (parametrization and width) shared by the model's
layers. Nothing else is stored on the modules: :func:`layer_scales` and
:func:`applied_parametrization` read those hook objects back. :func:`rescale`
adds an :class:`OutputScale` hook to the root module. The hooks run under
``torch.func.functional_call``, so rdiag's functional view and every
eNTK/Hessian see the parametrized function.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor, nn

from rdiag._checks import (
    check_choice,
    check_finite_positive,
    check_module,
    check_positive_int,
)

Role = Literal["readin", "hidden", "readout"]
Gauge = Literal["table", "multiplier", "standard", "gamma"]
ROLES: tuple[str, ...] = ("readin", "hidden", "readout")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


@dataclass(frozen=True)
class Scale:
    """A factor ``const * fan_in**fan_in_exp * m**width_exp`` (``m = width/base``)."""

    fan_in_exp: float = 0.0
    width_exp: float = 0.0
    const: float = 1.0

    def __call__(self, fan_in: float, m: float) -> float:
        """Evaluate at a layer's fan-in and the width ratio ``m``."""
        return (
            self.const * float(fan_in) ** self.fan_in_exp * float(m) ** self.width_exp
        )


@dataclass(frozen=True)
class Rule:
    """Multiplier, init std (``None``: PyTorch default init) and LR scales of a role."""

    multiplier: Scale
    init_std: Scale | None
    lr_sgd: Scale
    lr_adam: Scale

    def lr(self, optimizer: str) -> Scale:
        """The learning-rate scale for ``optimizer`` (``"sgd"`` or ``"adam"``)."""
        return self.lr_sgd if optimizer == "sgd" else self.lr_adam


@dataclass(frozen=True)
class DepthRule:
    """Residual-branch scaling in the depth ``L``: exponents of ``L / base_depth``.

    Attributes:
        name: Label (``"depth-mup"``, ``"completep"``, ``"none"``).
        alpha: Branch multiplier ``(L / base_depth)**-alpha``.
        lr_sgd: Learning-rate exponent of the layers inside branches under SGD.
        lr_adam: The same under Adam.
        base_depth: Depth at which every factor is 1.
    """

    name: str
    alpha: float
    lr_sgd: float
    lr_adam: float
    base_depth: int = 1

    def multiplier(self, depth: int) -> float:
        """The branch multiplier at ``depth``."""
        return self._ratio(depth) ** -self.alpha

    def lr(self, optimizer: str, depth: int) -> float:
        """The learning-rate scale of a layer inside a branch at ``depth``."""
        exponent = self.lr_sgd if optimizer == "sgd" else self.lr_adam
        return self._ratio(depth) ** exponent

    def _ratio(self, depth: int) -> float:
        check_positive_int(depth, "depth")
        if depth < self.base_depth:
            raise ValueError(
                f"expected depth >= base_depth={self.base_depth}, got {depth}; lower "
                "base_depth or use a deeper model"
            )
        return depth / self.base_depth


def depth_rule(alpha: float, *, name: str | None = None) -> DepthRule:
    """The consistent rule of branch exponent ``alpha`` (SGD ``2 alpha - 1``, Adam ``alpha - 1``).

    Raises:
        ValueError: ``alpha`` not a finite number >= 0.
    """
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        a = math.nan
    if not (math.isfinite(a) and a >= 0):
        raise ValueError(
            f"expected a branch exponent alpha >= 0, got {alpha!r}; 1/2 is depth-muP "
            "(branches x 1/sqrt(L)), 1 is CompleteP (x 1/L)"
        )
    return DepthRule(name or f"alpha={a:g}", a, 2 * a - 1, a - 1)


#: The named depth rules: depth-muP (``1/sqrt(L)``), CompleteP (``1/L``) and
#: unscaled branches (one learning rate at every depth).
DEPTH_RULES: dict[str, DepthRule] = {
    "depth-mup": depth_rule(0.5, name="depth-mup"),
    "completep": depth_rule(1.0, name="completep"),
    "none": DepthRule("none", 0.0, 0.0, 0.0),
}


def parse_depth_rule(spec: str | float | DepthRule) -> DepthRule:
    """A :class:`DepthRule` from a name of :data:`DEPTH_RULES` or a branch exponent."""
    if isinstance(spec, DepthRule):
        return spec
    if isinstance(spec, str) and spec.strip().lower() in DEPTH_RULES:
        return DEPTH_RULES[spec.strip().lower()]
    try:
        return depth_rule(float(spec))
    except (TypeError, ValueError):
        raise ValueError(
            f"expected a depth rule {sorted(DEPTH_RULES)} or a branch exponent alpha >= 0, "
            f"got {spec!r}"
        ) from None


@dataclass(frozen=True)
class Branches:
    """The residual structure of a model: which layers form its residual branches.

    Attributes:
        depth: The depth ``L``: the number of residual blocks.
        outputs: Names of the layers whose outputs end a branch (they get the
            branch multiplier).
        layers: Names of every module inside a branch (layers and norms; they get
            the depth learning-rate scale); includes ``outputs``.
        stream: The module whose output is the residual stream after the last
            block (what the depth check tracks); ``None``: the module holding the
            last branch output (``blocks.3`` for ``blocks.3.fc2``).
    """

    depth: int
    outputs: tuple[str, ...]
    layers: tuple[str, ...]
    stream: str | None = None

    @property
    def stream_module(self) -> str:
        """The name of the module whose output is the last residual stream."""
        if self.stream is not None:
            return self.stream
        return self.outputs[-1].rpartition(".")[0]


@dataclass(frozen=True)
class Parametrization:
    """A parameterization as data (see the module docstring for the formulas).

    Attributes:
        name: Short label, e.g. ``"r=0.25"``, ``"ntk"``, ``"mup"``, ``"gamma=0.1"``.
        readin, hidden, readout: The :class:`Rule` of each role.
        r: Richness exponent in ``[0, 1/2]``, or ``None`` (SP, gamma family).
        gamma: The gamma family's ``gamma0``, or ``None``.
        gauge: ``"table"``, ``"multiplier"``, ``"standard"`` or ``"gamma"``.
        base_width: Width at which ``m = width / base_width`` is 1.
        centered: Whether the model is trained as ``F_theta - F_theta0``.
        attention_exponent: Attention logits are scaled by ``d_head**-exponent``.
        bias_init: ``"zeros"`` or ``"default"`` (keep PyTorch's bias init).
        depth: The :class:`DepthRule` of residual branches.
    """

    name: str
    readin: Rule
    hidden: Rule
    readout: Rule
    r: float | None = None
    gamma: float | None = None
    gauge: Gauge = "table"
    base_width: int = 1
    centered: bool = False
    attention_exponent: float = 0.5
    bias_init: str = "zeros"
    depth: DepthRule = DEPTH_RULES["depth-mup"]

    def rule(self, role: str) -> Rule:
        """The :class:`Rule` of ``role``."""
        check_choice(role, "role", ROLES)
        return getattr(self, role)

    def width_ratio(self, width: int) -> float:
        """``m = width / base_width``; raises ``ValueError`` below the base width."""
        if (
            isinstance(width, bool)
            or not isinstance(width, int)
            or width < self.base_width
        ):
            raise ValueError(
                f"expected an integer width >= base_width={self.base_width}, got {width!r}; "
                "lower base_width (with_base_width) or use a larger model"
            )
        return width / self.base_width

    def with_base_width(self, base_width: int) -> Parametrization:
        """A copy anchored at another base width."""
        if (
            isinstance(base_width, bool)
            or not isinstance(base_width, int)
            or base_width < 1
        ):
            raise ValueError(
                f"expected base_width to be a positive int, got {base_width!r}"
            )
        return replace(self, base_width=base_width)

    def with_depth(self, rule: str | float | DepthRule) -> Parametrization:
        """A copy with another depth rule (a name, a branch exponent or a rule)."""
        rule = parse_depth_rule(rule)
        base = self.name.split(",depth=")[0]
        name = base if rule == DEPTH_RULES["depth-mup"] else f"{base},depth={rule.name}"
        return replace(self, depth=rule, name=name)


# ---- presets ---------------------------------------------------------------------
def _check_r(r: float) -> float:
    try:
        r = float(r)
    except (TypeError, ValueError):
        raise ValueError(f"expected r in [0, 1/2], got {r!r}") from None
    if not (0.0 <= r <= 0.5):
        raise ValueError(
            f"expected r in [0, 1/2], got {r}; r = 0 is the NTK parameterization and "
            "r = 1/2 is muP, values outside are not on the richness scale"
        )
    return r


def richness(
    r: float, *, gauge: str = "table", base_width: int = 1, name: str | None = None
) -> Parametrization:
    """The richness family ``alpha = m**r`` of Karkada's tutorial (SCIENCE.md section 1).

    Args:
        r: Richness exponent in ``[0, 1/2]``: 0 is NTK (lazy), 1/2 is muP (rich).
        gauge: ``"table"`` (no multipliers; per-layer init and learning rates) or
            ``"multiplier"`` (weights N(0, 1), forward multipliers, one global SGD
            rate ``eta0 m**2r``). Both train identically under SGD.
        base_width: Width where ``m = 1``.
        name: Label; default ``"r=<r>"`` (table) or ``"r=<r>,mult"``.

    Returns:
        The :class:`Parametrization`.

    Raises:
        ValueError: ``r`` outside ``[0, 1/2]`` or an unknown gauge.
    """
    r = _check_r(r)
    check_choice(gauge, "gauge", ("table", "multiplier"))
    if gauge == "table":
        inner = Rule(
            multiplier=Scale(),
            init_std=Scale(-0.5),
            lr_sgd=Scale(-1.0, 2 * r),
            lr_adam=Scale(-1.0, r - 0.5),
        )
        out = Rule(Scale(), Scale(-0.5, -r), Scale(-1.0), Scale(-1.0))
    else:
        # Multiplier c on W trains like cW with lr c^2 eta (SGD) or c eta (Adam).
        inner = Rule(Scale(-0.5), Scale(), Scale(0.0, 2 * r), Scale(-0.5, r - 0.5))
        out = Rule(Scale(-0.5, -r), Scale(), Scale(0.0, 2 * r), Scale(-0.5, r))
    label = name or (f"r={r:g}" if gauge == "table" else f"r={r:g},mult")
    return Parametrization(
        label,
        inner,
        inner,
        out,
        r=r,
        gauge=gauge,
        base_width=base_width,
        attention_exponent=0.5 + r,
    )


def ntk(*, base_width: int = 1) -> Parametrization:
    """NTK parameterization: N(0, 1) weights, ``1/sqrt(fan_in)`` multipliers, one rate."""
    return richness(0.0, gauge="multiplier", base_width=base_width, name="ntk")


def mup(*, base_width: int = 1) -> Parametrization:
    """MuP in the table gauge (richness ``r = 1/2``; SGD and Adam tables)."""
    return richness(0.5, gauge="table", base_width=base_width, name="mup")


def mean_field(*, base_width: int = 1) -> Parametrization:
    """Mean-field: NTK multipliers, read-out ``1/fan_in``, SGD rate ``x m`` (r = 1/2)."""
    return richness(0.5, gauge="multiplier", base_width=base_width, name="mf")


def standard(*, base_width: int = 1) -> Parametrization:
    """Standard parameterization: PyTorch default init, one fixed learning rate."""
    rule = Rule(Scale(), None, Scale(), Scale())
    return Parametrization(
        "sp",
        rule,
        rule,
        rule,
        gauge="standard",
        base_width=base_width,
        bias_init="default",
    )


def gamma_family(gamma0: float, *, base_width: int = 1) -> Parametrization:
    """The feature-learning-strength family of Atanasov et al. (SCIENCE.md section 3).

    Weights N(0, 1), biases 0, multipliers ``1/sqrt(fan_in)``, the read-out
    weights divided by ``fan_in * gamma0`` (precisely ``sqrt(fan_in * m) * gamma0``,
    the same when the read-out fan-in is the width and ``base_width=1``; the
    read-out bias by ``sqrt(m) * gamma0``), a *centered* model ``f = F_theta - F_theta0`` and plain
    SGD with one learning rate ``m * eta0`` (not scaled by ``gamma0``). At fixed
    width ``N``, ``gamma0 = N**(r - 1/2)`` realizes richness ``r`` (see
    :func:`gamma_for_richness`) when ``eta0`` is scaled like ``gamma0**2``. At a fixed
    ``gamma0`` across widths it scales like muP. Adam gets the muP multiplier-gauge
    Adam rates.

    Args:
        gamma0: Output scale, finite and > 0 (1 is muP, << 1 lazy, >> 1 ultra-rich).
        base_width: Width where ``m = 1``.

    Raises:
        ValueError: ``gamma0`` not finite or <= 0.
    """
    try:
        g = float(gamma0)
    except (TypeError, ValueError):
        g = float("nan")
    if not (math.isfinite(g) and g > 0):
        raise ValueError(
            f"expected gamma0 to be a finite number > 0, got {gamma0!r}; gamma0 = 1 is "
            "muP, smaller is lazier, larger is richer"
        )
    inner = Rule(Scale(-0.5), Scale(), Scale(0.0, 1.0), Scale(-0.5))
    # Read-out multiplier (fan_in * m)^-1/2 / gamma0: 1 / (n gamma0) on the weights
    # (fan_in = m = n at base width 1) and m^-1/2 / gamma0 on the bias, as in
    # mean-field; so gamma0 = n^(r - 1/2) is exactly the multiplier gauge at r.
    out = Rule(
        Scale(-0.5, -0.5, 1.0 / g), Scale(), Scale(0.0, 1.0), Scale(-0.5, 0.5, g)
    )
    return Parametrization(
        f"gamma={g:g}",
        inner,
        inner,
        out,
        gamma=g,
        gauge="gamma",
        base_width=base_width,
        centered=True,
        attention_exponent=1.0,
    )


def gamma_for_richness(r: float, width: int) -> float:
    """``gamma0 = width**(r - 1/2)``: the gamma that realizes richness ``r`` at ``width``."""
    return float(width) ** (_check_r(r) - 0.5)


_PRESETS = {"ntk": ntk, "mup": mup, "mf": mean_field, "sp": standard}
_SPEC = re.compile(r"^\s*(r|gamma)\s*=\s*(\S+)\s*$")


def parse_parametrization(spec: str | Parametrization) -> Parametrization:
    """Parse a CLI string: ``"r=0.25"``, ``"ntk"``, ``"mup"``, ``"sp"``, ``"mf"``, ``"gamma=0.1"``.

    A suffix ``",depth=<rule>"`` sets the depth rule (:func:`parse_depth_rule`: a
    name of :data:`DEPTH_RULES` or a branch exponent), e.g. ``"mup,depth=completep"``.

    Args:
        spec: The string (a :class:`Parametrization` is returned unchanged).

    Returns:
        The :class:`Parametrization` (``r=...`` is the table gauge).

    Raises:
        ValueError: Unknown name, unparsable number, or a value out of range.
    """
    if isinstance(spec, Parametrization):
        return spec
    if not isinstance(spec, str):
        raise TypeError(
            f"expected a parameterization string like 'r=0.25', got {type(spec).__name__}"
        )
    key, _, depth = spec.strip().lower().partition(",depth=")
    if depth:
        return parse_parametrization(key).with_depth(depth)
    if key in _PRESETS:
        return _PRESETS[key]()
    match = _SPEC.match(key)
    if match is None:
        raise ValueError(
            f"expected a parameterization like 'r=0.25', 'gamma=0.1', or one of "
            f"{sorted(_PRESETS)}, got {spec!r}"
        )
    kind, value = match.groups()
    try:
        number = float(value)
    except ValueError:
        raise ValueError(
            f"expected a number after '{kind}=', got {value!r} in {spec!r}"
        ) from None
    return richness(number) if kind == "r" else gamma_family(number)


def parse_param(spec: str | Parametrization) -> Parametrization:
    """Deprecated name of :func:`parse_parametrization`."""
    from rdiag._deprecation import renamed_name

    return renamed_name("parse_param", "parse_parametrization", parse_parametrization)(
        spec
    )


# ---- layers, roles and multipliers -----------------------------------------------
def fan_in(module: nn.Module) -> int:
    """Fan-in of a layer: ``in_features``, ``C_in/groups * prod(kernel)``, 1 for embeddings."""
    if isinstance(module, nn.Embedding):
        return 1
    return int(module.weight[0].numel())


def infer_roles(
    model: nn.Module, roles: Mapping[str, Role] | None = None
) -> dict[str, Role]:
    """Role of every parametrized layer (``Linear``, ``Conv``, ``Embedding``).

    The model's own ``roles`` attribute (built-in families) is used if present;
    otherwise the first layer in ``named_modules()`` order is the read-in, the last
    the read-out and the others hidden. ``roles`` overrides per module name.

    Args:
        model: The module.
        roles: Module name -> ``"readin"`` | ``"hidden"`` | ``"readout"``.

    Returns:
        Module name -> role, in ``named_modules()`` order.

    Raises:
        ValueError: Fewer than two layers without explicit roles, a name that is not
            a layer, an unknown role, or weights shared between layers.
    """
    check_module(model)
    layers = [n for n, m in model.named_modules() if isinstance(m, _LAYERS)]
    given = dict(getattr(model, "roles", {}) or {})
    given.update(roles or {})
    for name, role in given.items():
        check_choice(role, f"role of {name!r}", ROLES)
        if name not in layers:
            raise ValueError(
                f"expected roles keys to name Linear/Conv/Embedding modules, got {name!r}; "
                f"the model's layers are {layers[:8]}"
            )
    weights = [id(model.get_submodule(n).weight) for n in layers]
    if len(set(weights)) != len(weights):
        raise ValueError(
            "expected every layer to own its weight, got weights tied between layers; "
            "untie them (one role per weight) before applying a parameterization"
        )
    missing = [n for n in layers if n not in given]
    if missing and len(layers) < 2:
        raise ValueError(
            f"expected at least a read-in and a read-out layer to infer roles, got "
            f"{len(layers)} layer(s) {layers}; pass roles={{name: role}} explicitly"
        )
    inferred = {n: "hidden" for n in layers}
    inferred[layers[0]], inferred[layers[-1]] = "readin", "readout"
    return {n: given.get(n, inferred[n]) for n in layers}


@dataclass(frozen=True)
class Applied:
    """A parametrization as applied to one model.

    Attributes:
        parametrization: The :class:`Parametrization`.
        width: The width ``n`` it was applied at.
        branches: The model's residual :class:`Branches`, or ``None``.
    """

    parametrization: Parametrization
    width: int
    branches: Branches | None = None


@dataclass(frozen=True)
class LayerScale:
    """The forward hook a parametrization puts on one layer: ``y -> c y + (c_b - c) b``.

    Attributes:
        role: ``"readin"``, ``"hidden"`` or ``"readout"``.
        fan_in: The layer's fan-in.
        weight: Forward multiplier ``c`` of the weight.
        bias: Forward multiplier ``c_b`` of the bias.
        applied: The model-level :class:`Applied` record.
    """

    role: str
    fan_in: int
    weight: float
    bias: float
    applied: Applied

    def __call__(
        self, module: nn.Module, inputs: tuple, output: Tensor
    ) -> Tensor | None:
        """Rescale the layer output (``None``: unchanged)."""
        if self.weight == 1.0 and self.bias == 1.0:
            return None
        out = output * self.weight
        bias = getattr(module, "bias", None)
        if bias is not None and self.bias != self.weight:
            shape = (
                (-1,)
                if isinstance(module, nn.Linear)
                else (-1,) + (1,) * (output.dim() - 2)
            )
            out = out + (self.bias - self.weight) * bias.reshape(shape)
        return out


@dataclass(frozen=True)
class OutputScale:
    """The root hook of :func:`rescale`: the model output times ``scale``."""

    scale: float

    def __call__(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        """Rescale the model output."""
        return output * self.scale


def _hooks_of(module: nn.Module, kind: type) -> list:
    return [h for h in module._forward_hooks.values() if isinstance(h, kind)]


def _replace_hook(module: nn.Module, hook: object) -> None:
    """Register ``hook``, removing earlier hooks of its type (re-application)."""
    for key, old in list(module._forward_hooks.items()):
        if isinstance(old, type(hook)):
            del module._forward_hooks[key]
    module.register_forward_hook(hook)


def layer_scale(module: nn.Module) -> LayerScale | None:
    """The :class:`LayerScale` a parametrization put on ``module``, or ``None``."""
    found = _hooks_of(module, LayerScale)
    return found[-1] if found else None


def layer_scales(model: nn.Module) -> dict[str, LayerScale]:
    """Module name -> :class:`LayerScale` of every parametrized, trainable layer.

    A centered model's frozen reference copy carries copies of the hooks; its
    layers have no trainable weight and are left out.
    """
    out = {}
    for name, module in check_module(model).named_modules():
        scale = layer_scale(module)
        if (
            scale is not None
            and isinstance(module, _LAYERS)
            and module.weight.requires_grad
        ):
            out[name] = scale
    return out


def applied_parametrization(model: nn.Module) -> Applied | None:
    """The :class:`Applied` record of a model prepared by :func:`apply_parametrization`."""
    scales = layer_scales(model)
    return next(iter(scales.values())).applied if scales else None


def model_width(model: nn.Module, roles: Mapping[str, str] | None = None) -> int:
    """The width knob: ``model.width`` if set, else the read-out layer's fan-in."""
    width = getattr(model, "width", None)
    if isinstance(width, int):
        return width
    roles = infer_roles(model, roles)
    readouts = [n for n, r in roles.items() if r == "readout"]
    return max(fan_in(model.get_submodule(n)) for n in readouts)


def apply_parametrization(
    model: nn.Module,
    parametrization: Parametrization | str,
    *,
    width: int | None = None,
    roles: Mapping[str, str] | None = None,
    branches: Branches | None = None,
    init: bool = True,
) -> nn.Module:
    """Apply a parameterization to a model in place: multipliers, roles and init.

    Args:
        model: Any module built from ``nn.Linear``/``nn.Conv*``/``nn.Embedding``
            layers (plus parameter-free modules and norm layers, whose gains are
            kept and follow the hidden rule).
        parametrization: A :class:`Parametrization` or a string for :func:`parse_parametrization`.
        width: The width ``n``; default :func:`model_width`.
        roles: Module name -> role, overriding the inferred ones.
        branches: The residual :class:`Branches` the depth rule acts on; default
            the model's ``branches`` attribute (none: no depth scaling).
        init: Re-initialize the weights (uses the global torch RNG, in
            ``named_modules()`` order; seed it for reproducibility).

    Returns:
        ``model`` (parameter names unchanged), or a :class:`Centered` wrapper around
        it if the parameterization is centered (gamma family).

    Raises:
        ValueError: Bad roles or width (see :func:`infer_roles`), branches that
            name no module of the model, or a module owning parameters that is
            neither a layer nor a norm layer.

    Example:
        >>> import torch
        >>> from rdiag.models import MLP
        >>> net = apply_parametrization(MLP(64, d_in=4), "mf")
        >>> layer_scale(net.readout).weight == 1 / 64
        True
        >>> lr_multipliers(net)["hidden.0.weight"]
        64.0
        >>> x = torch.randn(3, 4)
        >>> w = net.readin.weight
        >>> torch.allclose(net.readin(x), x @ w.T / 2 + net.readin.bias)
        True
    """
    param = parse_parametrization(parametrization)
    check_module(model)
    roles = infer_roles(model, roles)
    width = model_width(model, roles) if width is None else width
    m = param.width_ratio(width)
    _check_supported(model)
    branches = _check_branches(model, branches or getattr(model, "branches", None))
    applied = Applied(param, width, branches)
    for name, role in roles.items():
        module = model.get_submodule(name)
        rule, fi = param.rule(role), fan_in(module)
        c = 1.0
        if branches is not None and name in branches.outputs:
            c = param.depth.multiplier(branches.depth)
        scale = LayerScale(
            role, fi, c * rule.multiplier(fi, m), c * rule.multiplier(1, m), applied
        )
        _replace_hook(module, scale)
        if init:
            _init_layer(module, rule, param, fi, m)
    if hasattr(model, "attention_exponent"):
        model.attention_exponent = param.attention_exponent
    return Centered(model) if param.centered else model


def _check_branches(model: nn.Module, branches: Branches | None) -> Branches | None:
    if branches is None:
        return None
    if not isinstance(branches, Branches):
        raise TypeError(
            f"expected branches to be an rdiag.parametrization.Branches, got "
            f"{type(branches).__name__}"
        )
    check_positive_int(branches.depth, "branches.depth")
    names = dict(model.named_modules())
    named = (*branches.outputs, *branches.layers)
    named += () if branches.stream is None else (branches.stream,)
    unknown = [n for n in dict.fromkeys(named) if n not in names]
    outside = [n for n in branches.outputs if n not in branches.layers]
    if unknown or outside:
        raise ValueError(
            f"expected branches to name modules of the model, outputs among layers; got "
            f"unknown {unknown[:5]}, outputs not in layers {outside[:5]}"
        )
    return branches


def _check_supported(model: nn.Module) -> None:
    bad = [
        f"{n} ({type(m).__name__})"
        for n, m in model.named_modules()
        if any(True for _ in m.parameters(recurse=False))
        and not isinstance(m, _LAYERS + _NORMS)
    ]
    if bad:
        raise ValueError(
            f"expected parameters only in Linear/Conv/Embedding/norm layers, got parameters "
            f"owned by {bad[:5]}; rewrite those with nn.Linear (e.g. replace "
            "nn.MultiheadAttention by Linear projections and F.scaled_dot_product_attention)"
        )


@torch.no_grad()
def _init_layer(
    module: nn.Module, rule: Rule, param: Parametrization, fi: int, m: float
) -> None:
    if rule.init_std is None:
        module.reset_parameters()
        return
    module.weight.normal_(0.0, rule.init_std(fi, m))
    bias = getattr(module, "bias", None)
    if bias is not None and param.bias_init == "zeros":
        bias.zero_()


class Centered(nn.Module):
    """``f(x) = F_theta(x) - F_theta0(x)``: a model minus a frozen copy of its init.

    The copy (``reference``) has ``requires_grad=False``, so rdiag's default
    parameter selection and :func:`make_optimizer` see only the trained model
    (parameters named ``model.<name>``).

    Args:
        model: The module to center (its current weights are ``theta0``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.reference = copy.deepcopy(model).requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        """``model(x) - reference(x)``."""
        return self.model(x) - self.reference(x)


# ---- effective weights and learning rates ----------------------------------------
def _check_parametrized(model: nn.Module) -> dict[str, LayerScale]:
    scales = layer_scales(check_module(model))
    if not scales:
        raise ValueError(
            "expected a model prepared by apply_parametrization (or a built-in family), "
            "got one without rdiag layer scales; call apply_parametrization(model, "
            "parametrization) first"
        )
    return scales


def effective_weights(model: nn.Module) -> dict[str, Tensor]:
    """Forward multiplier x raw weight of every parametrized layer (the table gauge).

    Args:
        model: A model prepared by :func:`apply_parametrization`.

    Returns:
        Layer (module) name -> effective weight as a matrix ``(fan_out, fan_in)``
        (convolutions flattened to ``(C_out, C_in*k*k)``; embeddings transposed to
        ``(dim, vocab)``), detached. A root output multiplier (:func:`rescale`) is
        folded into the read-out layers.
    """
    scales = _check_parametrized(model)
    out_mult = _root_output_multiplier(model)
    result = {}
    for name, scale in scales.items():
        module = model.get_submodule(name)
        c = scale.weight * (out_mult if scale.role == "readout" else 1.0)
        w = module.weight.detach()
        w = w.t() if isinstance(module, nn.Embedding) else w.reshape(w.shape[0], -1)
        result[name] = c * w
    return result


def _root_output_multiplier(model: nn.Module) -> float:
    inner = model.model if isinstance(model, Centered) else model
    return math.prod(h.scale for h in _hooks_of(inner, OutputScale))


def lr_multipliers(
    model: nn.Module,
    parametrization: Parametrization | str | None = None,
    optimizer: str = "sgd",
) -> dict[str, float]:
    """Per-parameter learning-rate scales ``M = eta_l / eta_0``.

    Pass the result as ``lr_multipliers=`` to :func:`rdiag.empirical_ntk` (the
    learning-rate-weighted eNTK ``K_M = sum_l M_l J_l J_l^T``), to the curvature
    functions (the preconditioned sharpness ``lambda_max(M^1/2 H M^1/2)``) and to
    the :class:`~rdiag.monitor.Monitor`.

    Args:
        model: A model prepared by :func:`apply_parametrization`.
        parametrization: Default: the one the model was prepared with.
        optimizer: ``"sgd"`` or ``"adam"``.

    Returns:
        Parameter name (as in ``model.named_parameters()``) -> scale, for every
        trainable parameter (norm gains and other parameters get the hidden rule
        at fan-in 1); parameters of modules inside the model's residual
        :class:`Branches` carry the depth rule's scale too.
    """
    check_choice(optimizer, "optimizer", OPTIMIZERS)
    scales = _check_parametrized(model)
    applied = next(iter(scales.values())).applied
    param = parse_parametrization(parametrization or applied.parametrization)
    m = param.width_ratio(applied.width)
    owner = {}
    for name, scale in scales.items():
        module = model.get_submodule(name)
        for pname, _ in module.named_parameters(recurse=False):
            owner[f"{name}.{pname}" if name else pname] = (
                scale.role,
                scale.fan_in,
                pname,
            )
    branches = applied.branches
    in_branch = set() if branches is None else set(branches.layers)
    depth_scale = 1.0 if branches is None else param.depth.lr(optimizer, branches.depth)
    result = {}
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        role, fi, kind = owner.get(pname, ("hidden", 1, "bias"))
        rate = param.rule(role).lr(optimizer)(fi if kind == "weight" else 1, m)
        module_name = pname.rpartition(".")[0]
        if isinstance(model, Centered):
            module_name = module_name.removeprefix("model.")
        result[pname] = rate * (depth_scale if module_name in in_branch else 1.0)
    return result


def make_optimizer(
    model: nn.Module,
    parametrization: Parametrization | str | None,
    lr: float,
    *,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """``torch.optim.SGD`` or ``Adam`` with one parameter group per parameter.

    Group ``i`` has learning rate ``lr * lr_multipliers(...)[name]`` and a ``"name"``
    key. ``lr`` is the base rate ``eta_0``.

    Args:
        model: A model prepared by :func:`apply_parametrization`.
        parametrization: Default (``None``): the one the model was prepared with.
        lr: Base learning rate ``eta_0`` (> 0).
        optimizer: ``"sgd"`` or ``"adam"``.
        momentum: SGD momentum.
        weight_decay: Weight decay (coupled, as in torch).
        betas: Adam betas.
        eps: Adam epsilon.

    Returns:
        The optimizer.

    Raises:
        ValueError: ``lr`` not finite and positive, unknown optimizer, or a model
            that was not prepared.
    """
    lr = check_finite_positive(lr, "lr")
    scales = lr_multipliers(model, parametrization, optimizer)
    named = dict(model.named_parameters())
    groups = [
        {"params": [named[n]], "lr": lr * s, "name": n} for n, s in scales.items()
    ]
    if optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=momentum, weight_decay=weight_decay
        )
    return torch.optim.Adam(
        groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay
    )


def rescale(
    model: nn.Module, r: float, lr: float, *, width: int | None = None
) -> float:
    """Emulate richness ``r`` with an NTK-parameterized model (SCIENCE.md section 1).

    Multiplies the model output by ``n**-r`` (a root :class:`OutputScale` hook; no
    parameter is renamed) and returns the SGD learning rate ``lr * n**2r`` (``n`` the width ratio).
    Trained with that rate, the model follows the same trajectory as the table
    gauge at richness ``r`` (same seeds; exact in exact arithmetic).

    Args:
        model: A model prepared with :func:`ntk` (modified in place).
        r: Richness in ``[0, 1/2]``.
        lr: The NTK base learning rate.
        width: Default: the width the model was prepared with.

    Returns:
        The learning rate to use with the rescaled model.

    Raises:
        ValueError: ``r`` out of range, or a model not prepared with the NTK
            parameterization.
    """
    r = _check_r(r)
    lr = check_finite_positive(lr, "lr")
    applied = next(iter(_check_parametrized(model).values())).applied
    param = applied.parametrization
    if param.gauge != "multiplier" or param.r != 0.0:
        raise ValueError(
            f"expected a model prepared with the NTK parameterization, got {param.name!r}; "
            "call apply_parametrization(model, 'ntk') first"
        )
    m = param.width_ratio(applied.width if width is None else width)
    _replace_hook(model, OutputScale(m ** (-r)))
    return lr * m ** (2 * r)
