"""Learning rates of a parametrized model: per-parameter multipliers, the optimizer.

:func:`lr_multipliers` gives ``eta_l / eta_0`` per parameter from the rules the
model was prepared with (and the depth rule inside residual branches);
:func:`make_optimizer` builds SGD or Adam with one parameter group per parameter
at those rates.
"""

from __future__ import annotations


import torch
from torch import nn

from rdiag._checks import (
    check_choice,
    check_finite_positive,
)
from rdiag.parametrization.application import Centered, check_parametrized
from rdiag.parametrization.rules import (
    OPTIMIZERS,
    Parametrization,
    parse_parametrization,
)


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
    scales = check_parametrized(model)
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
