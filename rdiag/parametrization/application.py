"""Applying a parametrization to a model: hooks that hold what was applied.

:func:`apply_parametrization` gives every parametrized module (``nn.Linear``,
``nn.Conv1d/2d/3d``, ``nn.Embedding``) one forward hook, a :class:`LayerScale`
(role, fan-in, multipliers and the shared :class:`Applied` record), initializes
its weights by the rule of its role, and scales residual branches by the depth
rule. :func:`layer_scales` and :func:`applied_parametrization` read the hooks
back; :func:`effective_weights` gives multiplier x raw weight; :func:`rescale`
adds a root :class:`OutputScale`. Nothing else is stored on the modules.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rdiag._checks import (
    check_finite_positive,
    check_module,
    check_positive_int,
)
from rdiag.roles import NORMS, WEIGHT_LAYERS, fan_in, infer_roles
from rdiag.parametrization.rules import (
    Branches,
    Parametrization,
    Rule,
    check_r,
    parse_parametrization,
)


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
            and isinstance(module, WEIGHT_LAYERS)
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
        and not isinstance(m, WEIGHT_LAYERS + NORMS)
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
def check_parametrized(model: nn.Module) -> dict[str, LayerScale]:
    """The layer scales of a prepared model; a clear error for an unprepared one."""
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
    scales = check_parametrized(model)
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


def rescale(
    model: nn.Module, r: float, lr: float, *, width: int | None = None
) -> float:
    """Emulate richness ``r`` with an NTK-parameterized model (docs/theory.md section 1).

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
    r = check_r(r)
    lr = check_finite_positive(lr, "lr")
    applied = next(iter(check_parametrized(model).values())).applied
    param = applied.parametrization
    if param.gauge != "multiplier" or param.r != 0.0:
        raise ValueError(
            f"expected a model prepared with the NTK parameterization, got {param.name!r}; "
            "call apply_parametrization(model, 'ntk') first"
        )
    m = param.width_ratio(applied.width if width is None else width)
    _replace_hook(model, OutputScale(m ** (-r)))
    return lr * m ** (2 * r)
