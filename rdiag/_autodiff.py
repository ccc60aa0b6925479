"""Forward-mode products with fallbacks for ops that lack forward-mode AD.

Some PyTorch kernels (the fused scaled-dot-product-attention kernels among them)
have no forward-mode derivative. :func:`probe_jvp_mode` probes a model and picks,
in order: native forward mode, forward mode under the math attention backend, or
reverse-over-reverse (the "double-vjp" trick, two backward passes per product).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch.func import jvp as _jvp
from torch.func import vjp as _vjp
from torch.func import vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from rdiag._inputs import Inputs, rows
from rdiag._optional import notice

if TYPE_CHECKING:
    from rdiag.functional import FunctionalModel

JvpMode = Literal["forward", "math_attention", "reverse"]
_MODES: tuple[JvpMode, ...] = ("forward", "math_attention", "reverse")


class _MathAttention:
    """The process-wide attention backend switch, safe for overlapping threads.

    torch's backend choice is one global setting; nested ``sdpa_kernel`` blocks
    that overlap across threads (a thread-pool sweep) would restore each other's
    state out of order and leave the math backend on for good. Here the first of
    the overlapping users switches and the last one restores.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._context: contextlib.AbstractContextManager | None = None

    def enter(self) -> None:

        with self._lock:
            if self._users == 0:
                self._context = sdpa_kernel(SDPBackend.MATH)
                self._context.__enter__()
            self._users += 1

    def exit(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                self._context.__exit__(None, None, None)
                self._context = None


_MATH = _MathAttention()


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Route ``scaled_dot_product_attention`` to its math backend (has forward-mode AD)."""
    _MATH.enter()
    try:
        yield
    finally:
        _MATH.exit()


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


def probe_vmap(fm: FunctionalModel, x: Inputs) -> str | None:
    """Why ``fm``'s forward does not run under ``vmap`` over samples, or ``None``.

    Some models branch in Python on tensor values (Hugging Face BERT checks its
    attention mask), which ``torch.func.vmap`` over samples cannot trace; the
    whole-batch function can still be differentiated.

    Args:
        fm: Functional view of the model.
        x: A prepared batch; its first two samples are used.

    Returns:
        The first line of vmap's error, or ``None`` if vmap works.
    """
    sample = rows(x, slice(0, 2))
    try:
        with torch.no_grad():
            vmap(fm.single, (None, 0))(fm.params, sample)
    except RuntimeError as err:
        return str(err).strip().splitlines()[0][:200]
    return None


def probe_jvp_mode(fm: FunctionalModel, x: Inputs) -> JvpMode:
    """The first mode in which a small jvp of ``fm`` runs on (a slice of) ``x``.

    Nothing is cached here: the caller (an eNTK handle, an operator, a Monitor)
    probes once and keeps the answer for as long as it holds the model; a
    fallback is said at each probe.

    Args:
        fm: Functional view of the model.
        x: A prepared batch; its first two samples are used (the whole batch for
            a batch-coupled model).

    Returns:
        The mode; a one-time warning says when it is not native forward mode.

    Raises:
        RuntimeError: No mode works (every mode's error is quoted).
    """
    probe_x = x if fm.batch_coupled else rows(x, slice(0, 2))
    params = fm.params
    zeros = {n: torch.zeros_like(p) for n, p in params.items()}
    errors = []
    for mode in _MODES:
        try:
            jvp(lambda p: fm(p, probe_x), (params,), (zeros,), mode)
        except (NotImplementedError, RuntimeError) as err:
            errors.append(f"{mode}: {str(err).splitlines()[0][:160]}")
            continue
        if mode != "forward":
            kind = type(fm.module).__name__
            notice(
                f"{kind} has an op without forward-mode AD ({errors[0]}); rdiag uses "
                f"{mode.replace('_', ' ')} instead "
                f"{'(same result)' if mode == 'math_attention' else '(about 2x the cost)'}",
            )
        return mode
    raise RuntimeError(
        "no differentiation mode works for this model: " + "; ".join(errors)
    )
