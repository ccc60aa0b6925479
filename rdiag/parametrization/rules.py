r"""Parametrizations as data: per-role rules in the width, a depth rule, presets.

A :class:`Parametrization` says, for each layer role (``"readin"``,
``"hidden"``, ``"readout"``; :mod:`rdiag.roles`), three numbers as functions of
the layer's fan-in and of the width ratio ``m = width / base_width`` (a
:class:`Rule` of three :class:`Scale`\ s): the forward multiplier, the
initialization scale and the learning-rate scale (SGD and Adam). A
:class:`DepthRule` scales residual :class:`Branches` in the depth. The presets
(:func:`ntk`, :func:`mup`, :func:`mean_field`, :func:`standard`,
:func:`richness`, :func:`gamma_family`) and :func:`parse_parametrization` build
them; the formulas are those of the package docstring
(:mod:`rdiag.parametrization`) and of docs/theory.md.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Literal


from rdiag.roles import ROLES
from rdiag._checks import (
    check_choice,
    check_positive_int,
)

Gauge = Literal["table", "multiplier", "standard", "gamma"]
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")


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
def check_r(r: float) -> float:
    """``r`` as a float in ``[0, 1/2]``; a clear error otherwise."""
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
    """The richness family ``alpha = m**r`` of Karkada's tutorial (docs/theory.md section 1).

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
    r = check_r(r)
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
    """The feature-learning-strength family of Atanasov et al. (docs/theory.md section 3).

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
    return float(width) ** (check_r(r) - 0.5)


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
