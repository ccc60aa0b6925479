"""Layer roles and the read-out: one rule, one owner.

Every part of rdiag that asks which layer is the read-in, a hidden layer or the
read-out asks here: the parametrizations (:func:`infer_roles`, when a
parametrization is applied), the richness meter (:func:`width_roles`, from the
shapes at two widths), the read-out identity of the eNTK
(:func:`rdiag.ntk.readout.find_readout`) and the Monitor (its ``"features"``
kernel and default layers). The rule:

* the **weight layers** are ``nn.Linear``, ``nn.Conv1d/2d/3d`` and
  ``nn.Embedding`` (:data:`WEIGHT_LAYERS`); the first one (in
  ``named_modules()`` order) is the read-in;
* the **read-out** is the last weight layer: the one that maps the width to the
  outputs (:func:`readout_name`);
* a **norm layer** (:data:`NORMS`: LayerNorm, GroupNorm, batch norm, RMSNorm) is
  a gain, never a read-out, also when it comes after the read-out (a model that
  ends in ``Linear`` then ``LayerNorm`` has the ``Linear`` as its read-out).

A model's ``roles`` attribute (the built-in families) or ``roles=`` overrides the
inferred roles by module name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from torch import Tensor, nn

from rdiag._checks import check_choice, check_module

Role = Literal["readin", "hidden", "readout"]
ROLES: tuple[str, ...] = ("readin", "hidden", "readout")

#: The layers that carry a role (a weight that maps one width to another).
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
#: Norm layers: their gains follow the hidden rule at fan-in 1; never a read-out.
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def weight_layers(model: nn.Module) -> list[str]:
    """Names of the model's weight layers (:data:`WEIGHT_LAYERS`), in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)]


def readout_name(
    model: nn.Module, roles: Mapping[str, str] | None = None
) -> str | None:
    """The read-out: the last weight layer (the one mapping the width to the outputs).

    A norm layer after it is a gain and does not change which layer is the
    read-out. Frozen layers (a centered model's reference copy) are not layers
    of the model being trained. A layer given the role ``"readout"`` by ``roles`` or by the
    model's ``roles`` attribute wins (the last such one).

    Args:
        model: The module.
        roles: Module name -> role, overriding the rule.

    Returns:
        The read-out's module name, or ``None`` for a model without weight layers.
    """
    given = {**(getattr(model, "roles", None) or {}), **(roles or {})}
    named = [n for n, r in given.items() if r == "readout"]
    if named:
        return named[-1]
    trainable = [
        n for n in weight_layers(model) if model.get_submodule(n).weight.requires_grad
    ]
    return _last_weight_layer(trainable)


def _last_weight_layer(layers: list[str]) -> str | None:
    """The read-out by the rule alone: the last weight layer in module order."""
    return layers[-1] if layers else None


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
    otherwise the first weight layer in ``named_modules()`` order is the read-in,
    the last the read-out (:func:`readout_name`'s rule; a norm layer after it is a
    gain) and the others hidden. ``roles`` overrides per module name.

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
    layers = weight_layers(model)
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
    inferred[layers[0]], inferred[_last_weight_layer(layers)] = "readin", "readout"
    return {n: given.get(n, inferred[n]) for n in layers}


# ---- roles from widths (the richness meter) ----------------------------------------
# ---- roles from widths --------------------------------------------------------------
def _axes(module: nn.Module, weight: Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(output axes, input axes)`` of a module's weight."""
    if isinstance(module, nn.Embedding) or type(module).__name__ == "Conv1D":
        return (1,), (0,)  # (num, dim); Hugging Face Conv1D is (in, out)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return (1,), (0,)
    return (0,), tuple(range(1, weight.dim()))


def _weights(model: nn.Module) -> dict[str, tuple[nn.Module, Tensor]]:
    out = {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, nn.Parameter) and w.dim() >= 2 and w.requires_grad:
            out[name] = (module, w)
    return out


def width_roles(small: nn.Module, large: nn.Module) -> dict[str, str]:
    """Each weight layer's role, from which axes change between two widths.

    A layer whose output axis grows and input axes do not is a read-in (an
    embedding's rows are its inputs), both is hidden, only the input is a
    read-out; neither is ``"fixed"``. Layers sharing one weight in different
    roles (tied embeddings) are ``"tied"``: no one prediction holds for them.

    Args:
        small: The model at one width.
        large: The model at a larger width (same module names).

    Returns:
        Module name -> role, in ``named_modules()`` order.

    Raises:
        ValueError: The two models have different layers, or no shape changes
            (the width argument does not set the width).
    """
    a, b = _weights(small), _weights(large)
    if list(a) != list(b):
        raise ValueError(
            f"expected family to build the same layers at every width, got "
            f"{sorted(set(a) ^ set(b))[:6]} at only one of two widths"
        )
    roles = {}
    for name, (module, w) in a.items():
        out_axes, in_axes = _axes(module, w)
        big = b[name][1].shape
        grows = [
            any(w.shape[i] != big[i] for i in axes) for axes in (out_axes, in_axes)
        ]
        roles[name] = {
            (True, False): "readin",
            (True, True): "hidden",
            (False, True): "readout",
        }.get(tuple(grows), "fixed")
    if all(role == "fixed" for role in roles.values()):
        raise ValueError(
            "expected family(width) to change the parameter shapes with the "
            f"width, got the same shapes at two widths for {list(roles)[:6]}; make "
            "the width argument set the hidden size"
        )
    by_weight: dict[int, list[str]] = {}
    for name, (_, w) in a.items():
        by_weight.setdefault(id(w), []).append(name)
    for names in by_weight.values():
        if len({roles[n] for n in names}) > 1:
            roles.update({n: "tied" for n in names})
    return roles
