"""Forward-mode products with fallbacks for ops that lack forward-mode AD.

Some PyTorch kernels (the fused scaled-dot-product-attention kernels among them)
have no forward-mode derivative. :func:`probe_jvp_mode` probes a model and picks,
in order: forward mode with rdiag's own attention operator (a model that calls
``scaled_dot_product_attention``, :mod:`rdiag.attention`), native forward mode,
forward mode under the math attention backend, or reverse-over-reverse (the
"double-vjp" trick, two backward passes per product).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch.func import jvp as _jvp
from torch.func import vjp as _vjp
from torch.func import vmap

from rdiag._inputs import Inputs, rows
from rdiag.attention import efficient_attention, math_attention
from rdiag._optional import notice

if TYPE_CHECKING:
    from rdiag.attention import AttentionCall
    from rdiag.functional import FunctionalModel

JvpMode = Literal["attention", "forward", "math_attention", "reverse"]
_MODES: tuple[JvpMode, ...] = ("attention", "forward", "math_attention", "reverse")


class _TwiceDifferentiable(torch.overrides.TorchFunctionMode):
    """Hardsigmoid as ``relu6(x + 3) / 6`` (MobileNetV3's gate).

    The same values and gradient, and a double backward and forward-mode
    derivative, which ``hardsigmoid_backward`` lacks. ``replaced`` counts the
    calls rewritten.
    """

    def __init__(self) -> None:
        super().__init__()
        self.replaced = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        if func is torch.nn.functional.hardsigmoid:
            self.replaced += 1
            return torch.nn.functional.relu6(args[0] + 3) / 6
        return func(*args, **(kwargs or {}))


#: What the curvature fallback says when it rewrote Hardsigmoid.
HARDSIGMOID_NOTE = (
    "Hardsigmoid has no double backward in PyTorch: curvature computes it as "
    "relu6(x + 3) / 6, the same function and gradient"
)


@contextlib.contextmanager
def twice_differentiable() -> Iterator[_TwiceDifferentiable]:
    """Math attention, and Hardsigmoid as ``relu6(x + 3) / 6``, within the block.

    Yields:
        The rewriting mode (its ``replaced`` counts the Hardsigmoid calls).
    """
    with math_attention(), _TwiceDifferentiable() as mode:
        yield mode


def jvp(
    func: Callable[..., Any], primals: tuple, tangents: tuple, mode: JvpMode
) -> tuple:
    """``(func(*primals), J @ tangents)`` by the chosen ``mode``.

    Args:
        func: Function of the primals returning a tensor.
        primals: Inputs (tuples of tensors or dicts of tensors).
        tangents: Tangents of the same structure.
        mode: ``"attention"`` (forward mode, attention by rdiag's operator),
            ``"forward"``, ``"math_attention"`` or ``"reverse"``.

    Returns:
        ``(output, jvp_output)``.
    """
    if mode == "attention":
        with efficient_attention():
            return _jvp(func, primals, tangents)
    if mode == "forward":
        return _jvp(func, primals, tangents)
    if mode == "math_attention":
        with math_attention():
            return _jvp(func, primals, tangents)
    # The pullback u -> J^T u is linear in u; its own vjp applied to t gives J t.
    out, pullback = _vjp(func, *primals)
    _, push = _vjp(pullback, torch.zeros_like(out))
    return out, push(tangents)[0]


def differentiating(mode: JvpMode) -> contextlib.AbstractContextManager:
    """The context of a whole product in ``mode``: rdiag's attention for ``"attention"``.

    Around a product's reverse passes too (its pullbacks are vmapped over
    cotangents; the fused kernels' backwards have no batching rule, the
    operator's does), not only around its jvps.
    """
    if mode == "attention":
        return efficient_attention()
    return contextlib.nullcontext()


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
        The mode: ``"attention"`` where the model calls
        ``scaled_dot_product_attention`` (a one-time warning names the calls rdiag's
        operator does not cover, which run math attention), else the first that
        works; a one-time warning says when that is not native forward mode.

    Raises:
        RuntimeError: No mode works (every mode's error is quoted).
    """
    probe_x = x if fm.batch_coupled else rows(x, slice(0, 2))
    params = fm.params
    zeros = {n: torch.zeros_like(p) for n, p in params.items()}
    errors = []
    for mode in _MODES[1:]:
        try:
            if mode == "forward":
                with efficient_attention() as router:
                    jvp(lambda p: fm(p, probe_x), (params,), (zeros,), mode)
                if router.calls:
                    say_fallbacks(fm, router.fallbacks)
                    return "attention"
            else:
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


def attention_calls(fm: FunctionalModel, x: Inputs) -> list[AttentionCall]:
    """The ``scaled_dot_product_attention`` calls of ``fm`` on one sample of ``x``.

    One forward without gradients on the first sample (the whole batch for a
    batch-coupled model, whose calls then count every sample); the calls rdiag's
    operator does not cover are said once here. Nothing is cached: the caller
    keeps the answer.

    Returns:
        One :class:`~rdiag.attention.AttentionCall` per call (empty: no attention).
    """
    probe_x = x if fm.batch_coupled else rows(x, slice(0, 1))
    with torch.no_grad(), efficient_attention() as router:
        fm(fm.params, probe_x)
    say_fallbacks(fm, router.fallbacks)
    return router.calls


def say_fallbacks(fm: FunctionalModel, fallbacks: set[str]) -> None:
    """Say which attention calls rdiag's operator left to math attention, if any."""
    if fallbacks:
        notice(
            f"{type(fm.module).__name__} calls scaled_dot_product_attention with "
            f"{'; '.join(sorted(fallbacks))}, which rdiag's attention operator does "
            "not cover; rdiag uses math attention for those calls (same result, "
            "memory quadratic in the sequence length)",
        )
