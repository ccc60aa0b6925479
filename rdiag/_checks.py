"""Input validators; every message says what was expected, what came, what to do."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def check_module(model: Any) -> nn.Module:
    """Return ``model`` if it is an ``nn.Module``; raise ``TypeError`` otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"expected a torch.nn.Module, got {type(model).__name__}; "
            "pass the model object itself (not its state_dict or a function)"
        )
    return model


def check_tensor(x: Any, name: str, *, min_dim: int = 1) -> Tensor:
    """Return ``x`` if it is a floating or integer tensor with at least ``min_dim`` dims."""
    if not isinstance(x, Tensor):
        raise TypeError(
            f"expected {name} to be a torch.Tensor, got {type(x).__name__}; "
            f"convert it with torch.as_tensor({name})"
        )
    if x.dim() < min_dim:
        raise ValueError(
            f"expected {name} to have a leading batch axis (>= {min_dim} dims), "
            f"got shape {tuple(x.shape)}; add one with {name}.unsqueeze(0)"
        )
    return x


def check_same_features(x1: Tensor, x2: Tensor) -> None:
    """Check two batches share every axis but the batch axis."""
    if x1.shape[1:] != x2.shape[1:] or x1.dtype != x2.dtype:
        raise ValueError(
            f"expected x1 and x2 to differ only in the batch axis, got "
            f"x1 {tuple(x1.shape)} {x1.dtype} and x2 {tuple(x2.shape)} {x2.dtype}; "
            "reshape or cast one of them"
        )


def check_positive_int(value: Any, name: str, *, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive int (or None if allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"expected {name} to be a positive int, got {value!r}")


def check_sizes(sizes: Any, what: str = "width") -> list[int]:
    """Sorted distinct positive ints, at least two (widths or depths of a fit).

    Raises:
        ValueError: A size that is not a positive int, or fewer than two distinct.
    """
    sizes = list(sizes)
    for s in sizes:
        check_positive_int(s, f"every {what}")
    if len(set(sizes)) < 2:
        raise ValueError(
            f"expected at least two distinct {what}s to fit a slope, got {sizes}"
        )
    return sorted(set(sizes))


def check_seeds(seeds: Any) -> list[int]:
    """``range(seeds)`` for an int, else the list of int seeds.

    Raises:
        ValueError: Not a positive int or a non-empty list of ints.
    """
    if isinstance(seeds, int) and not isinstance(seeds, bool) and seeds > 0:
        return list(range(seeds))
    given = [] if isinstance(seeds, (int, str)) else list(seeds)
    if not given or not all(
        isinstance(s, int) and not isinstance(s, bool) for s in given
    ):
        raise ValueError(
            f"expected seeds as a positive int or a list of ints, got {seeds!r}"
        )
    return given


def check_finite_positive(value: Any, name: str) -> float:
    """Return ``float(value)`` if finite and > 0; raise ``ValueError`` otherwise."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"expected {name} to be a positive number, got {value!r}"
        ) from None
    if not math.isfinite(out) or out <= 0:
        raise ValueError(f"expected {name} to be a finite number > 0, got {value!r}")
    return out


def check_nonnegative_int(value: Any, name: str) -> int:
    """Return ``int(value)`` for an integer ``>= 0`` (not a bool); raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"expected {name} to be an int >= 0, got {value!r}")
    return int(value)


def check_real(
    value: Any, name: str, allowed: str, ok: Callable[[float], bool]
) -> float:
    """Return ``float(value)`` for a finite real number with ``ok(value)`` true.

    Args:
        value: The value to check (a bool, string or None is rejected).
        name: What it is, for the message (``"config field 'momentum'"``).
        allowed: The allowed range in words, e.g. ``"in [0, 1)"``.
        ok: The range test.

    Returns:
        The value as a float.

    Raises:
        ValueError: Not a finite real number, or outside the range.
    """
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and ok(value)):
        raise ValueError(
            f"expected {name} to be a finite number {allowed}, got {value!r}"
        )
    return float(value)


def check_file_name(value: Any, name: str) -> str:
    """Return ``value`` if it is safe as one path component (letters, digits, ``_.-``).

    The first character must be a letter, digit or ``_``, so ``"."``, ``".."`` and
    hidden names are rejected along with separators.
    """
    if not isinstance(value, str) or not _FILE_NAME.fullmatch(value):
        raise ValueError(
            f"expected {name} to be letters, digits and '_.-' (not starting with '.' "
            f"or '-'), got {value!r}; it names a file or folder of the store"
        )
    return value


def check_choice(value: Any, name: str, allowed: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``allowed``; raise ``ValueError`` naming them."""
    if value not in allowed:
        raise ValueError(f"expected {name} to be one of {list(allowed)}, got {value!r}")
    return value


def check_vector(v: Tensor, size: int, name: str = "v") -> None:
    """Check ``v`` is a flat vector of ``size`` entries."""
    if not isinstance(v, Tensor) or v.dim() != 1 or v.numel() != size:
        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(
            f"expected {name} to be a flat vector of {size} entries (one per selected "
            f"parameter, named_parameters() order), got {shape}; "
            "flatten a parameter dict with FunctionalModel.flatten"
        )


def check_scalar_loss(loss: Tensor) -> None:
    """Check a loss reduced to a scalar."""
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"expected loss_fn(output, target) to return a scalar (mean reduction), "
            f"got {shape}; use reduction='mean' (e.g. F.mse_loss(out, y))"
        )


_DTYPE_NAMES = {
    "float64": torch.float64,
    "double": torch.float64,
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


def check_dtype(dtype: Any) -> torch.dtype | None:
    """Return a floating ``torch.dtype`` (or None) from a dtype or its name.

    Raises:
        TypeError: Neither a floating dtype nor one of its names.
    """
    if dtype is None:
        return None
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _DTYPE_NAMES:
            return _DTYPE_NAMES[key]
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise TypeError(
        f"expected dtype to be a floating torch.dtype (e.g. torch.float64) or its name "
        f"({sorted(_DTYPE_NAMES)}), got {dtype!r}"
    )
