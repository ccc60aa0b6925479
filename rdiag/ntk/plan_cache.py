"""Plans that persist across one-shot calls, like cuDNN's autotuner.

:func:`rdiag.empirical_ntk` is a one-shot call: without this cache every call
would build a handle and plan again (a probe forward pass, the cost model, the
structured path's autograd self-check, and for close calls the race of
:mod:`rdiag.ntk.costs` on the first calls). Here the handle of an earlier call on
the same model with the same options is reused; the handle keeps one plan per
input signature (shapes, dtypes, device) and reads the parameter values live, so
a reused plan computes the current kernel.

The cache (:data:`PLANS`, a :class:`PlanCache`) is explicit and bounded: at most
``max_entries`` handles, least recently used evicted first, keyed by a weak
reference to the model (never its ``id()``, nothing stored on the model) and the
options. A handle refers to its model, so the cache keeps up to ``max_entries``
models alive after the caller dropped them; :func:`clear_plan_cache` releases
them (and every plan). Calls whose options cannot be compared (a tensor
projection or multipliers given as tensors) are not cached.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any

import torch

#: Handles kept by default (models kept alive at most).
MAX_ENTRIES = 4


class _Unhashable(Exception):
    """An option value the cache cannot compare."""


def _freeze(value: Any) -> Any:
    """A hashable stand-in for an option value (raises :class:`_Unhashable`)."""
    if value is None or isinstance(value, (bool, int, float, str, Enum, torch.dtype)):
        return value
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (tuple, list)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, torch.Tensor):
        raise _Unhashable
    try:
        hash(value)  # functions, process groups: by identity
    except TypeError:
        raise _Unhashable from None
    return value


class PlanCache:
    """A bounded, clearable cache of eNTK handles for one-shot calls.

    Args:
        max_entries: Handles kept (least recently used evicted first).
    """

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def handle(
        self, model: Any, options: Mapping[str, Any], make: Callable[..., Any]
    ) -> Any:
        """The cached handle ``make(model, **options)`` (an ``NTKFunction``)."""
        try:
            key = (weakref.ref(model), _freeze(dict(options)))
        except (_Unhashable, TypeError):
            return make(model, **options)
        with self._lock:
            self._prune()
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return found
        made = make(model, **options)
        with self._lock:
            self.misses += 1
            self._entries[key] = made
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return made

    def _prune(self) -> None:
        for key in [k for k in self._entries if k[0]() is None]:
            del self._entries[key]

    def __len__(self) -> int:
        """Handles held."""
        return len(self._entries)

    def clear(self) -> None:
        """Drop every handle (and the models they kept alive)."""
        with self._lock:
            self._entries.clear()


#: The cache of :func:`rdiag.empirical_ntk`.
PLANS = PlanCache()


def clear_plan_cache() -> None:
    """Forget every plan of the one-shot calls (releases the models they hold)."""
    PLANS.clear()
