"""Lazy imports of optional packages, and one-time notices."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import warnings
from types import ModuleType

logger = logging.getLogger("rdiag")

_EXTRA_OF = {
    "triton": "triton",
    "matplotlib": "plots",
    "sklearn": "data",
    "yaml": "config",
    "tqdm": "config",
    "pandas": "frames",
    "scipy": "scipy",
    "ray": "ray",
    "lightning": "lightning",
    "transformers": "hf",
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
}
_WARNED: set[str] = set()


def require(name: str, purpose: str) -> ModuleType:
    """Import an optional package or raise an ImportError with the install hint.

    Args:
        name: Importable module name, e.g. ``"matplotlib"``.
        purpose: What the caller needs it for, quoted in the error.

    Returns:
        The imported module.

    Raises:
        ImportError: The package is not installed.
    """
    try:
        return importlib.import_module(name)
    except ImportError as err:
        extra = _EXTRA_OF.get(name.split(".")[0], "all")
        raise ImportError(
            f"{purpose} needs the optional package '{name}', which is not installed; "
            f"install it with: pip install 'rdiag[{extra}]'"
        ) from err


def has_triton() -> bool:
    """Whether Triton can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def notice(message: str, *, stacklevel: int = 3) -> None:
    """Say ``message`` as a ``UserWarning`` and a log line."""
    logger.info(message)
    warnings.warn(message, UserWarning, stacklevel=stacklevel)


def warn_once(key: str, message: str) -> None:
    """Say a fact about this process (e.g. Triton is missing) once per ``key``.

    Notices about one model are said once by the object that owns the decision
    (a handle, an operator, a Monitor: :class:`Notices`), not here.
    """
    if key in _WARNED:
        return
    _WARNED.add(key)
    notice(message, stacklevel=4)


class Notices:
    """One-time notices owned by one object: each key is said once per owner."""

    def __init__(self) -> None:
        self._said: set[str] = set()

    def say(self, key: str, message: str) -> None:
        """Say ``message`` unless this owner already said ``key``."""
        if key not in self._said:
            self._said.add(key)
            notice(message, stacklevel=4)
