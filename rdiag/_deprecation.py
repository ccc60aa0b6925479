"""Old public names that keep working for one release, with a ``DeprecationWarning``."""

from __future__ import annotations

import warnings
from typing import Any

#: Default of a deprecated argument: tells "not passed" apart from ``None``.
UNSET: Any = object()


def renamed_argument(
    where: str, old: str, new: str, old_value: Any, new_value: Any
) -> Any:
    """The value of argument ``new``, taking the deprecated ``old`` if it was given.

    Args:
        where: The function, for the message.
        old: Deprecated argument name.
        new: Its replacement.
        old_value: What was passed as ``old`` (:data:`UNSET` if nothing).
        new_value: What was passed as ``new``.

    Returns:
        The value to use.

    Raises:
        TypeError: Both were given.
    """
    if old_value is UNSET:
        return new_value
    if new_value is not None:
        raise TypeError(
            f"{where}() got both {old}= and {new}=; pass only {new}= ({old}= is its "
            "deprecated name)"
        )
    warnings.warn(
        f"{where}(): {old}= is deprecated and will be removed in the next release; "
        f"use {new}=",
        DeprecationWarning,
        stacklevel=3,
    )
    return old_value


def renamed_name(old: str, new: str, value: Any) -> Any:
    """Return ``value`` (a moved or renamed public object) with a ``DeprecationWarning``."""
    warnings.warn(
        f"{old} is deprecated and will be removed in the next release; use {new}",
        DeprecationWarning,
        stacklevel=3,
    )
    return value
