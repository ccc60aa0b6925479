"""Type aliases shared by the public API."""

from __future__ import annotations

from typing import Callable, Iterable, Sequence, Union

import torch
from torch import Tensor, nn

from rdiag._inputs import Inputs

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Inputs, Tensor]
Data = Union[Batch, Iterable[Batch]]
ParamSelector = Union[
    None,
    str,
    Sequence[str],
    type,
    tuple[type, ...],
    Callable[[str, nn.Parameter], bool],
]
#: Per-layer learning-rate multipliers ``M = eta_l / eta_0`` (``lr_multipliers=``
#: everywhere): ``None`` (all 1), a float, a dict of layer names, parameter names
#: or globs, or a callable ``name -> float`` (one scalar per parameter, e.g.
#: :func:`rdiag.lr_multipliers`); the curvature functions also take a per-coordinate
#: ``(P,)`` tensor or an Adam-type optimizer (:func:`rdiag.curvature.multiplier_diagonal`).
LRMultipliers = Union[
    None,
    float,
    dict[str, float],
    Callable[[str], float],
    Tensor,
    torch.optim.Optimizer,
]
