"""Fused kernels for structured eNTKs and kernel statistics: the dispatchers.

The kernel modules live in the repository's top-level ``kernels/`` folder,
installed as ``rdiag/kernels/``: ``reference.py`` (torch, the CPU path and the
oracle), ``_launch.py`` (shared checks) and the ``triton_*.py`` launchers. That
folder has no ``__init__.py`` on purpose: a regular package named ``kernels`` at
the repository root would shadow any other package of that name (Hugging Face's
``kernels``, which ``transformers`` imports) for every command run from the
root. This module is the package ``rdiag.kernels`` instead: it points its
``__path__`` at that folder, so ``rdiag.kernels.reference`` and the launchers
import as submodules in a source checkout, an editable install and a wheel.

Dispatch rule, per call: the Triton kernel runs when Triton imports and the
tensors are on CUDA, or when ``TRITON_INTERPRET=1`` is set (CPU tensors through
Triton's interpreter; set it before anything imports Triton). Otherwise, and
always for float64 inputs (the exact path), :mod:`rdiag.kernels.reference`
runs. ``RDIAG_KERNELS=reference`` forces the reference. For the weight-shared
variant a cost model also decides: where per-sample weight gradients are cheaper
than token Grams, the reference's weight-gradient route runs on every device.
Importing this package never imports Triton.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import types
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from rdiag._optional import has_triton, warn_once
from rdiag.attention import blocked_attention


def _kernel_folder() -> str:
    """The folder of the kernel modules: installed beside this file, else the checkout's."""
    here = Path(__file__).resolve().parent
    for folder in (here / "kernels", here.parent / "kernels"):
        if (folder / "reference.py").is_file():
            return str(folder)
    raise ImportError(
        f"rdiag.kernels: the kernel modules are missing (looked in {here / 'kernels'} "
        f"and {here.parent / 'kernels'}); reinstall rdiag: pip install -e ."
    )


__path__ = [_kernel_folder()]  # a package: its submodules live in kernels/

from rdiag.kernels import reference  # noqa: E402
from rdiag.kernels._launch import (  # noqa: E402
    KernelSums,
    check_gram_hadamard_shared_args,
    interpreting,
)

__all__ = [
    "KernelStats",
    "attention",
    "gram_hadamard",
    "gram_hadamard_many",
    "gram_hadamard_shared",
    "kernel_stats",
    "use_triton",
]

logger = logging.getLogger("rdiag")
_MODES = ("auto", "reference")


def use_triton(x: Tensor) -> bool:
    """Whether a call on tensors like ``x`` runs the Triton kernel.

    Args:
        x: A representative input tensor (device and dtype matter).

    Returns:
        True for Triton, False for the torch reference.

    Raises:
        ValueError: ``RDIAG_KERNELS`` is set to an unknown value.
    """
    mode = os.environ.get("RDIAG_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(
            f"expected RDIAG_KERNELS to be one of {list(_MODES)}, got {mode!r}; "
            "unset it or set RDIAG_KERNELS=reference"
        )
    if mode == "reference" or not isinstance(x, Tensor):
        return False
    if not (x.device.type == "cuda" or interpreting()):
        return False
    if x.dtype == torch.float64:
        logger.debug("rdiag.kernels: float64 input, running the torch reference")
        return False
    if not has_triton():
        warn_once(
            "kernels-no-triton",
            "rdiag.kernels: Triton is not installed, running the torch reference "
            "(slower on GPU); install it with: pip install 'rdiag[triton]'",
        )
        return False
    return True


def _impl(name: str, x: Tensor) -> types.ModuleType:
    """The module implementing ``name`` for inputs like ``x``."""
    if use_triton(x):
        return importlib.import_module(f"{__name__}.triton_{name}")
    return reference


def gram_hadamard(
    x1: Tensor,
    x2: Tensor,
    g1: Tensor,
    g2: Tensor,
    out: Tensor | None = None,
    *,
    scale: float = 1.0,
    allow_tf32: bool = False,
) -> Tensor:
    r"""Layerwise eNTK block ``(X1 X2^T) o (G1 G2^T)`` per output pair, fused.

    .. math::
        out_{ijab} \mathrel{+}= s\,(x_{1,i}\cdot x_{2,j})\,(g_{1,ia}\cdot g_{2,jb})

    For a Linear layer with inputs ``x`` and output cotangents ``g`` (one per
    output ``a`` of the network), this is its contribution to the eNTK. With
    ``R = 1`` it is the plain Hadamard product of the two Grams. The Triton
    kernel never writes either Gram to memory.

    Args:
        x1: ``(N1, Dx)`` layer inputs (append a ones column for a bias).
        x2: ``(N2, Dx)``.
        g1: ``(N1, R, Dg)`` output cotangents.
        g2: ``(N2, R, Dg)``.
        out: ``(N1, N2, R, R)`` float32/float64 tensor accumulated into, or None
            to allocate zeros (float64 for float64 inputs, else float32).
        scale: Multiplier ``s`` of the term.
        allow_tf32: Allow TF32 products for float32 inputs (CUDA); off by default.

    Returns:
        ``out`` ``(N1, N2, R, R)``. Products and sums run in float32 for
        float16/bfloat16/float32 inputs, in float64 for float64 inputs.

    Raises:
        TypeError: Non-tensor or unsupported dtype.
        ValueError: Shapes, dtypes or devices disagree.
        MemoryError: A new ``out`` would not fit; the message says how big.

    Example:
        >>> import torch
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> g = torch.randn(4, 2, 5, dtype=torch.float64)
        >>> k = gram_hadamard(x, x, g, g)  # (4, 4, 2, 2)
        >>> j = torch.einsum("nrg,nx->nrgx", g, x).flatten(2)  # per-sample gradients
        >>> torch.allclose(k, torch.einsum("iap,jbp->ijab", j, j))
        True
    """
    impl = _impl("gram_hadamard", x1)
    return impl.gram_hadamard(x1, x2, g1, g2, out, scale=scale, allow_tf32=allow_tf32)


def gram_hadamard_many(
    terms: Sequence[tuple[Tensor, Tensor, Tensor, Tensor, float]],
    out: Tensor | None = None,
    *,
    allow_tf32: bool = False,
) -> Tensor:
    """Sum of :func:`gram_hadamard` terms (one per layer) into one ``out``.

    The Triton path runs when every term qualifies (see :func:`use_triton`);
    there, terms with identical shapes and dtype are stacked and run in one
    launch, other shapes get one launch each. Otherwise the reference loops over
    the terms (mixed dtypes allowed; ``out`` takes the first term's result dtype).

    Args:
        terms: ``(x1, x2, g1, g2, scale)`` tuples, shaped as in
            :func:`gram_hadamard`; all share ``N1, N2, R`` and the device.
        out: ``(N1, N2, R, R)`` accumulator or None.
        allow_tf32: Allow TF32 products for float32 inputs (CUDA).

    Returns:
        ``out`` ``(N1, N2, R, R)``.
    """
    terms = list(terms)
    xs = [t[0] for t in terms if isinstance(t, (tuple, list)) and t]
    fast = bool(xs) and all(isinstance(x, Tensor) and use_triton(x) for x in xs)
    impl = (
        importlib.import_module(f"{__name__}.triton_gram_hadamard")
        if fast
        else reference
    )
    return impl.gram_hadamard_many(terms, out, allow_tf32=allow_tf32)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Blocked attention ``(BH, L, Ev)``, differentiable in forward and reverse mode.

    The Triton kernels (``triton_attention.attention``: forward, JVP, backward and
    forward over reverse; a constant mask, no ``vmap``) by the dispatch rule, else
    rdiag's torch operator :func:`rdiag.attention.blocked_attention` (every mode,
    ``vmap``, the exact float64 path), which is their reference.

    Args:
        q: ``(BH, L, E)``.
        k: ``(BH, S, E)``.
        v: ``(BH, S, Ev)``.
        mask: Boolean (``True`` attends) or additive, broadcastable to ``(BH, L, S)``.
        causal: Query ``i`` sees keys ``<= i``.
        scale: Scores scale; default ``E ** -0.5``.
    """
    if use_triton(q):
        impl = importlib.import_module(f"{__name__}.triton_attention")
        return impl.attention(q, k, v, mask, causal=causal, scale=scale)
    return blocked_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def gram_hadamard_shared(
    x1: Tensor,
    x2: Tensor,
    g1: Tensor,
    g2: Tensor,
    out: Tensor | None = None,
    *,
    scale: float = 1.0,
    allow_tf32: bool = False,
) -> Tensor:
    r"""ENTK block of a weight-shared layer (a Linear on every token, a conv).

    .. math:: out_{ijab} \mathrel{+}= s \sum_{t,t'} (x_{1,it}\cdot x_{2,jt'})
        (g_{1,iat}\cdot g_{2,jbt'})

    For a conv, ``x`` holds the unfolded patches (``T`` = output positions,
    ``Dx = C_in k^2``) and ``g`` the output cotangents per position.

    The cost model :func:`rdiag.kernels.reference.shared_route` picks the route
    on every device. Where token Grams are cheaper (short sequences, wide
    layers) the Triton kernel runs when :func:`use_triton` allows; it tiles over
    token pairs, so no ``(N T) x (N T)`` Gram reaches memory. Where per-sample
    weight gradients ``(N, R, Dg, Dx)`` are cheaper (convs: many positions) the
    torch reference computes those (cuBLAS on GPU), on every device.

    Args:
        x1: ``(N1, T1, Dx)``.
        x2: ``(N2, T2, Dx)``.
        g1: ``(N1, R, T1, Dg)``.
        g2: ``(N2, R, T2, Dg)``.
        out: ``(N1, N2, R, R)`` accumulator or None.
        scale: Multiplier ``s`` of the term.
        allow_tf32: Allow TF32 products for float32 inputs (CUDA).

    Returns:
        ``out`` ``(N1, N2, R, R)`` (float32, or float64 for float64 inputs).

    Raises:
        TypeError: Non-tensor or unsupported dtype.
        ValueError: Shapes, dtypes or devices disagree.
        MemoryError: A new ``out`` would not fit.
    """
    impl = _impl("gram_hadamard_shared", x1)
    if impl is not reference:
        # The kernel does the Gram route's N1 N2 T1 T2 (Dx + R^2 Dg) work; where
        # weight gradients are cheaper (convs: many positions) cuBLAS on those wins.
        shape = check_gram_hadamard_shared_args(x1, x2, g1, g2)
        if reference.shared_route(shape, x1.device) == "weight_gradients":
            impl = reference
    return impl.gram_hadamard_shared(
        x1, x2, g1, g2, out, scale=scale, allow_tf32=allow_tf32
    )


class KernelStats(KernelSums):
    r"""Sufficient statistics of two kernels ``K0, K1`` of shape ``(N, M)``.

    Every comparison below follows from these sums, so one pass over both
    kernels serves them all.

    Attributes:
        inner: :math:`\langle K_0, K_1\rangle_F`.
        sq_norm0: :math:`\|K_0\|_F^2`.
        sq_norm1: :math:`\|K_1\|_F^2`.
        sq_diff: :math:`\|K_1 - K_0\|_F^2`, summed directly: from the three sums
            above it would cancel catastrophically when ``K1`` is close to ``K0``.
        row0: Row sums ``K0 1`` ``(N,)``.
        row1: Row sums ``K1 1`` ``(N,)``.
        col0: Column sums ``K0^T 1`` ``(M,)``.
        col1: Column sums ``K1^T 1`` ``(M,)``.
        sum0: Sum of all entries of ``K0``.
        sum1: Sum of all entries of ``K1``.

    Scalars are Python floats (summed in float64 from float32 or float64 parts);
    the vectors are float64 for float64 kernels, else float32.
    """

    def distance(self) -> float:
        r"""Kernel distance :math:`1 - \langle K_0,K_1\rangle/(\|K_0\|\|K_1\|)`."""
        denom = math.sqrt(self.sq_norm0 * self.sq_norm1)
        if denom == 0.0:
            raise ValueError("kernel distance is undefined: a kernel is all zeros")
        return 1.0 - self.inner / denom

    def relative_change(self) -> float:
        r"""Relative change :math:`\|K_1 - K_0\|_F / \|K_0\|_F`."""
        if self.sq_norm0 == 0.0:
            raise ValueError("relative change is undefined: K0 is all zeros")
        return math.sqrt(self.sq_diff / self.sq_norm0)

    def centered_alignment(self) -> float:
        r"""Centered kernel alignment of square kernels (``N == M``).

        With :math:`H = I - \mathbf{1}\mathbf{1}^T/N`, :math:`H^2 = H` gives

        .. math:: \langle HK_0H, HK_1H\rangle = \langle K_0,K_1\rangle
            - (r_0\cdot r_1 + c_0\cdot c_1)/N + s_0 s_1/N^2

        (rows ``r = K 1``, columns ``c = K^T 1``, sums ``s``); the alignment is
        that inner product over the product of the centered norms.

        Raises:
            ValueError: The kernels are not square, or a centered kernel is zero.
        """
        n, m = self.row0.numel(), self.col0.numel()
        if n != m:
            raise ValueError(
                f"expected square kernels for centered alignment, got ({n}, {m}); "
                "compute the kernels on one batch (x2 = x1)"
            )
        r0, r1, c0, c1 = (
            v.double() for v in (self.row0, self.row1, self.col0, self.col1)
        )

        def centered(
            sq: float, ra: Tensor, rb: Tensor, ca: Tensor, cb: Tensor, s: float
        ) -> float:
            return sq - float(ra @ rb + ca @ cb) / n + s / (n * n)

        c01 = centered(self.inner, r0, r1, c0, c1, self.sum0 * self.sum1)
        c00 = centered(self.sq_norm0, r0, r0, c0, c0, self.sum0**2)
        c11 = centered(self.sq_norm1, r1, r1, c1, c1, self.sum1**2)
        # The centered norms come from cancelling sums: below the round-off of the
        # kernels' own entries they are noise, and so would the alignment be.
        eps = 4 * torch.finfo(self.row0.dtype).eps
        if c00 <= eps * self.sq_norm0 or c11 <= eps * self.sq_norm1:
            raise ValueError(
                "centered alignment is undefined: a centered kernel is zero (to "
                "round-off; e.g. identical probe inputs or a constant kernel)"
            )
        return c01 / math.sqrt(c00 * c11)


def kernel_stats(k0: Tensor, k1: Tensor) -> KernelStats:
    """Sums of two kernels ``(N, M)`` in one pass: see :class:`KernelStats`.

    From the result: ``.distance()``, ``.relative_change()`` and (square
    kernels) ``.centered_alignment()``.

    Args:
        k0: ``(N, M)`` kernel, e.g. at initialization.
        k1: ``(N, M)`` kernel, same dtype and device.

    Returns:
        :class:`KernelStats`; float32 accumulation (float64 for float64 input),
        scalars summed in float64.

    Example:
        >>> import torch
        >>> k0 = torch.eye(3, dtype=torch.float64)
        >>> stats = kernel_stats(k0, 2 * k0)
        >>> stats.distance(), stats.relative_change()
        (0.0, 1.0)
    """
    sums: KernelSums = _impl("kernel_stats", k0).kernel_stats(k0, k1)
    return KernelStats(*sums)
