"""Forward-mode products with fallbacks for ops that lack forward-mode AD.

Some PyTorch kernels (the fused scaled-dot-product-attention kernels among them)
have no forward-mode derivative. :func:`jvp_mode` probes a model once and picks,
in order: native forward mode, forward mode under the math attention backend, or
reverse-over-reverse (the "double-vjp" trick, two backward passes per product).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch.func import jvp as _jvp
from torch.func import vjp as _vjp

from rdiag._optional import warn_once

JvpMode = Literal["forward", "math_attention", "reverse"]
_MODES: tuple[JvpMode, ...] = ("forward", "math_attention", "reverse")


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Route ``scaled_dot_product_attention`` to its math backend (has forward-mode AD)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def jvp(
    func: Callable[..., Any], primals: tuple, tangents: tuple, mode: JvpMode
) -> tuple:
    """``(func(*primals), J @ tangents)`` by the chosen ``mode``.

    Args:
        func: Function of the primals returning a tensor.
        primals: Inputs (tuples of tensors or dicts of tensors).
        tangents: Tangents of the same structure.
        mode: ``"forward"``, ``"math_attention"`` or ``"reverse"``.

    Returns:
        ``(output, jvp_output)``.
    """
    if mode == "forward":
        return _jvp(func, primals, tangents)
    if mode == "math_attention":
        with math_attention():
            return _jvp(func, primals, tangents)
    # The pullback u -> J^T u is linear in u; its own vjp applied to t gives J t.
    out, pullback = _vjp(func, *primals)
    _, push = _vjp(pullback, torch.zeros_like(out))
    return out, push(tangents)[0]


def jvp_mode(owner: object, probe: Callable[[JvpMode], object]) -> JvpMode:
    """The first mode in which ``probe(mode)`` runs, cached on ``owner``.

    Args:
        owner: Object to cache the choice on (a ``FunctionalModel``).
        probe: Runs one small jvp in the given mode; raises if unsupported.

    Returns:
        The mode; a one-time warning says when it is not native forward mode.
    """
    cached = getattr(owner, "_rdiag_jvp_mode", None)
    if cached is not None:
        return cached
    errors = []
    for mode in _MODES:
        try:
            probe(mode)
        except (NotImplementedError, RuntimeError) as err:
            errors.append(f"{mode}: {str(err).splitlines()[0][:160]}")
            continue
        if mode != "forward":
            module = getattr(owner, "module", owner)
            warn_once(
                f"jvp-{type(module).__name__}-{id(module)}",
                f"{type(module).__name__} has an op without forward-mode AD "
                f"({errors[0]}); rdiag uses {mode.replace('_', ' ')} instead "
                f"{'(same result)' if mode == 'math_attention' else '(about 2x the cost)'}",
            )
        owner._rdiag_jvp_mode = mode
        return mode
    raise RuntimeError(
        "no differentiation mode works for this model: " + "; ".join(errors)
    )
