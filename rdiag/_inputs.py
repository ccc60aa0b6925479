"""Model inputs as trees: a tensor, a tuple of tensors, or a dict of tensors.

Every diagnostic takes the model's input in the form its ``forward`` takes: one
tensor ``x``, a tuple (``forward(*inputs)``) or a dict (``forward(**inputs)``,
e.g. ``input_ids`` with ``attention_mask``). The first axis of every tensor is
the sample axis. These helpers slice, join, move and validate such batches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Union

import torch
from torch import Tensor

Inputs = Union[Tensor, tuple[Tensor, ...], Mapping[str, Tensor]]


def leaves(x: Inputs) -> list[Tensor]:
    """The tensors of a batch, in order."""
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, Mapping):
        return list(x.values())
    return list(x)


def tree_map(fn: Callable[[Tensor], Tensor], x: Inputs) -> Inputs:
    """Apply ``fn`` to every tensor of a batch, keeping its form."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        return {k: fn(v) for k, v in x.items()}
    return tuple(fn(v) for v in x)


def call(module: Callable[..., Any], x: Inputs) -> Any:
    """``module(x)``, ``module(*x)`` or ``module(**x)`` by the form of ``x``."""
    if isinstance(x, Tensor):
        return module(x)
    if isinstance(x, Mapping):
        return module(**x)
    return module(*x)


def batch_size(x: Inputs) -> int:
    """``N``, the length of the first axis (shared by every tensor)."""
    return int(leaves(x)[0].shape[0])


def rows(x: Inputs, sl: slice | Tensor) -> Inputs:
    """The samples ``sl`` of a batch."""
    return tree_map(lambda t: t[sl], x)


def concat(a: Inputs, b: Inputs) -> Inputs:
    """Two batches of the same form joined along the sample axis."""
    if isinstance(a, Tensor):
        return torch.cat([a, b])
    if isinstance(a, Mapping):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return tuple(torch.cat([u, v]) for u, v in zip(a, b))


def signature(x: Inputs) -> tuple:
    """Shapes and dtypes of a batch: what a plan depends on."""
    if isinstance(x, Mapping):
        return tuple((k, tuple(v.shape), v.dtype) for k, v in x.items())
    return tuple((tuple(t.shape), t.dtype) for t in leaves(x))


def trailing(x: Inputs) -> tuple:
    """Per-sample shapes and dtypes (the signature without the sample axis)."""
    if isinstance(x, Mapping):
        return tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in x.items())
    return tuple((tuple(t.shape[1:]), t.dtype) for t in leaves(x))


def check_inputs(x: Any, name: str = "x") -> Inputs:
    """Validate a batch: tensors with a common, non-empty sample axis, finite floats.

    Args:
        x: A tensor, a tuple/list of tensors, or a dict of tensors.
        name: What to call it in messages.

    Returns:
        The batch (a list becomes a tuple).

    Raises:
        TypeError: Not of those forms, or an entry is not a tensor.
        ValueError: No sample axis, an empty batch, sample axes of different
            lengths, or NaN/inf entries.
    """
    if isinstance(x, list):
        x = tuple(x)
    if isinstance(x, Tensor):
        items = [(name, x)]
    elif isinstance(x, Mapping):
        items = [(f"{name}[{k!r}]", v) for k, v in x.items()]
    elif isinstance(x, tuple):
        items = [(f"{name}[{i}]", v) for i, v in enumerate(x)]
    else:
        raise TypeError(
            f"expected {name} to be a torch.Tensor, a tuple of tensors or a dict of "
            f"tensors (the model's forward arguments), got {type(x).__name__}; "
            f"convert it with torch.as_tensor({name})"
        )
    if not items:
        raise ValueError(f"expected {name} to hold at least one tensor, got none")
    for label, t in items:
        if not isinstance(t, Tensor):
            raise TypeError(
                f"expected {label} to be a torch.Tensor, got {type(t).__name__}"
            )
        if t.dim() == 0:
            raise ValueError(
                f"expected {label} to have a leading sample axis, got a scalar; "
                f"add one with {label}.unsqueeze(0)"
            )
    sizes = {label: int(t.shape[0]) for label, t in items}
    if len(set(sizes.values())) != 1:
        raise ValueError(
            f"expected every tensor of {name} to share the sample axis (axis 0), got "
            f"lengths {sizes}"
        )
    if next(iter(sizes.values())) == 0:
        raise ValueError(
            f"expected a non-empty batch, got {name} with 0 samples "
            f"(shape {tuple(items[0][1].shape)}); pass at least one sample"
        )
    for label, t in items:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(
                f"expected finite inputs, got {bad} NaN/inf entries in {label} "
                f"(shape {tuple(t.shape)}); clean or mask them before measuring"
            )
    return x


def describe(x: Inputs) -> str:
    """Shapes of a batch for messages, e.g. ``(4, 3)`` or ``{'input_ids': (4, 7)}``."""
    if isinstance(x, Tensor):
        return f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
    if isinstance(x, Mapping):
        return str({k: tuple(v.shape) for k, v in x.items()})
    return str(tuple(tuple(t.shape) for t in x))
