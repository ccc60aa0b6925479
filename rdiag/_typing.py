"""Type aliases shared by the public API."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence, Union

import torch
from torch import Tensor, nn

Params = dict[str, Tensor]
Buffers = dict[str, Tensor]
ModelFn = Callable[[Params, Tensor], Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor, Tensor]
Data = Union[Batch, Iterable[Batch]]
ParamSelector = Union[
    None,
    str,
    Sequence[str],
    type,
    tuple[type, ...],
    Callable[[str, nn.Parameter], bool],
]
Weights = Union[None, float, dict[str, float], Callable[[str], float]]
Device = Union[str, torch.device]
Any_ = Any
