"""Type aliases shared by the public API."""

from __future__ import annotations

from typing import Callable, Iterable, Sequence, Union

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
Weights = Union[None, float, dict[str, float], Callable[[str], float]]
