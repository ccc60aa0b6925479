"""Shared launch helpers: argument checks, dtypes, block sizes, memory-fit checks.

Importable without Triton: the reference path uses the checks and dtype rules too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from rdiag._tiling import available_memory, check_fits

#: Input dtypes the kernels accept; everything but float64 accumulates in float32.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class KernelSums(NamedTuple):
    """The sums of two kernels ``K0, K1 (N, M)`` that ``kernel_stats`` launchers return.

    ``rdiag.kernels.KernelStats`` (the same fields) adds the comparisons.
    """

    inner: float
    sq_norm0: float
    sq_norm1: float
    sq_diff: float
    row0: Tensor
    row1: Tensor
    col0: Tensor
    col1: Tensor
    sum0: float
    sum1: float


class GramShape(NamedTuple):
    """Sizes of one Gram-Hadamard term (``T1 = T2 = 1`` for the unshared form)."""

    n1: int
    n2: int
    t1: int
    t2: int
    r: int
    dx: int
    dg: int


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_triton_dtype(x: Tensor) -> None:
    """Reject float64 in a Triton launcher: float64 is the reference's exact path."""
    if x.dtype == torch.float64:
        raise TypeError(
            "expected float16, bfloat16 or float32 inputs for the Triton kernel, got "
            "float64; float64 runs on rdiag.kernels.reference (the dispatcher does "
            "this)"
        )


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """``tl.dot`` input precision: exact float32 unless TF32 is allowed.

    16-bit operands always use tensor cores with float32 accumulation; the
    setting only matters for float32, so they get Triton's default.
    """
    return "ieee" if dtype == torch.float32 and not allow_tf32 else "tf32"


def interpreter_safe(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Upcast bfloat16 to float32 under the CPU interpreter, else return as is.

    Triton's interpreter (3.9) multiplies bfloat16 ``tl.dot`` operands as raw
    integers; bfloat16 to float32 is exact, so the result is unchanged.
    """
    if interpreting() and tensors[0].dtype == torch.bfloat16:
        return tuple(t.float() for t in tensors)
    return tensors


def next_power_of_2(n: int) -> int:
    """Smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / result dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_tensor(t: object, name: str, dim: int, axes: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(
            f"expected {name} to be a torch.Tensor {axes}, got {type(t).__name__}"
        )
    if t.dim() != dim:
        raise ValueError(
            f"expected {name} to have shape {axes} ({dim} dims), got {tuple(t.shape)}; "
            "reshape it (flatten extra feature axes into the last one)"
        )
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"expected {name} to be float16, bfloat16, float32 or float64, got "
            f"{t.dtype}; "
            f"cast it with {name}.float()"
        )
    return t


def _check_same(tensors: dict[str, Tensor]) -> None:
    first_name, first = next(iter(tensors.items()))
    for name, t in tensors.items():
        if t.dtype != first.dtype or t.device != first.device:
            raise ValueError(
                f"expected all inputs on one device with one dtype, got {first_name} "
                f"{first.dtype} on {first.device} and {name} {t.dtype} on {t.device}; "
                f"cast with .to({first_name}.device, {first_name}.dtype)"
            )


def _mismatch(what: str, **shapes: tuple[int, ...]) -> ValueError:
    got = ", ".join(f"{k} {v}" for k, v in shapes.items())
    return ValueError(f"expected {what}, got {got}")


def check_gram_hadamard_args(
    x1: Tensor, x2: Tensor, g1: Tensor, g2: Tensor
) -> GramShape:
    """Validate ``x1 (N1, Dx), x2 (N2, Dx), g1 (N1, R, Dg), g2 (N2, R, Dg)``.

    Returns:
        The sizes, with ``t1 = t2 = 1``.

    Raises:
        TypeError: A non-tensor or an unsupported dtype.
        ValueError: Wrong ranks, mismatched sizes, dtypes or devices.
    """
    _check_tensor(x1, "x1", 2, "(N1, Dx)")
    _check_tensor(x2, "x2", 2, "(N2, Dx)")
    _check_tensor(g1, "g1", 3, "(N1, R, Dg)")
    _check_tensor(g2, "g2", 3, "(N2, R, Dg)")
    _check_same({"x1": x1, "x2": x2, "g1": g1, "g2": g2})
    shapes = {"x1": tuple(x1.shape), "x2": tuple(x2.shape)}
    shapes.update(g1=tuple(g1.shape), g2=tuple(g2.shape))
    if x1.shape[1] != x2.shape[1]:
        raise _mismatch("x1 and x2 to share the feature size Dx", **shapes)
    if g1.shape[1:] != g2.shape[1:]:
        raise _mismatch("g1 and g2 to share (R, Dg)", **shapes)
    if g1.shape[0] != x1.shape[0] or g2.shape[0] != x2.shape[0]:
        raise _mismatch(
            "g1 to have N1 = len(x1) rows and g2 N2 = len(x2) rows", **shapes
        )
    n1, dx = x1.shape
    n2, r, dg = g2.shape
    return GramShape(n1, n2, 1, 1, r, dx, dg)


def check_gram_hadamard_shared_args(
    x1: Tensor, x2: Tensor, g1: Tensor, g2: Tensor
) -> GramShape:
    """Validate the weight-shared inputs.

    Shapes: ``x1 (N1, T1, Dx)``, ``x2 (N2, T2, Dx)``, ``g1 (N1, R, T1, Dg)``,
    ``g2 (N2, R, T2, Dg)``.

    Returns:
        The sizes.

    Raises:
        TypeError: A non-tensor or an unsupported dtype.
        ValueError: Wrong ranks, mismatched sizes, dtypes or devices.
    """
    _check_tensor(x1, "x1", 3, "(N1, T1, Dx)")
    _check_tensor(x2, "x2", 3, "(N2, T2, Dx)")
    _check_tensor(g1, "g1", 4, "(N1, R, T1, Dg)")
    _check_tensor(g2, "g2", 4, "(N2, R, T2, Dg)")
    _check_same({"x1": x1, "x2": x2, "g1": g1, "g2": g2})
    shapes = {"x1": tuple(x1.shape), "x2": tuple(x2.shape)}
    shapes.update(g1=tuple(g1.shape), g2=tuple(g2.shape))
    if x1.shape[2] != x2.shape[2]:
        raise _mismatch("x1 and x2 to share the feature size Dx", **shapes)
    if g1.shape[1] != g2.shape[1] or g1.shape[3] != g2.shape[3]:
        raise _mismatch("g1 and g2 to share R (axis 1) and Dg (axis 3)", **shapes)
    if g1.shape[0] != x1.shape[0] or g1.shape[2] != x1.shape[1]:
        raise _mismatch("g1 to be (N1, R, T1, Dg) with x1 (N1, T1, Dx)", **shapes)
    if g2.shape[0] != x2.shape[0] or g2.shape[2] != x2.shape[1]:
        raise _mismatch("g2 to be (N2, R, T2, Dg) with x2 (N2, T2, Dx)", **shapes)
    n1, t1, dx = x1.shape
    n2, r, t2, dg = g2.shape
    return GramShape(n1, n2, t1, t2, r, dx, dg)


def check_kernel_pair(k0: Tensor, k1: Tensor) -> tuple[int, int]:
    """Validate two kernels of one shape ``(N, M)``; return ``(N, M)``."""
    _check_tensor(k0, "k0", 2, "(N, M)")
    _check_tensor(k1, "k1", 2, "(N, M)")
    _check_same({"k0": k0, "k1": k1})
    if k0.shape != k1.shape:
        raise ValueError(
            f"expected k0 and k1 of one shape (N, M), got {tuple(k0.shape)} and "
            f"{tuple(k1.shape)}; compute both kernels on the same inputs"
        )
    return int(k0.shape[0]), int(k0.shape[1])


def prepare_out(
    out: Tensor | None, shape: GramShape, like: Tensor, *, zero: bool = True
) -> Tensor:
    """Check ``out (N1, N2, R, R)`` or allocate it (after a memory-fit check).

    A new output is zeroed unless ``zero=False`` (the caller overwrites it).

    A given ``out`` must be float32 or float64 on the inputs' device; it is
    accumulated into in its own dtype.

    Raises:
        ValueError: ``out`` has the wrong shape, dtype or device.
        MemoryError: A new output would not fit in free memory.
    """
    expected = (shape.n1, shape.n2, shape.r, shape.r)
    if out is None:
        dtype = acc_dtype(like.dtype)
        nbytes = float(torch.Size(expected).numel()) * torch.finfo(dtype).bits // 8
        check_device_fits(
            nbytes,
            like.device,
            f"the (N1, N2, R, R) = {expected} {dtype} output",
            "compute it in blocks of rows (slices x1[i:i+b], g1[i:i+b]) into slices of "
            "one preallocated out, or trace over R before storing",
        )
        alloc = torch.zeros if zero else torch.empty
        return alloc(expected, dtype=dtype, device=like.device)
    if not isinstance(out, Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"expected out to have shape (N1, N2, R, R) = {expected}, got {got}; "
            "pass out=None to allocate it"
        )
    if out.dtype not in (torch.float32, torch.float64) or out.device != like.device:
        raise ValueError(
            f"expected out float32 or float64 on {like.device}, got {out.dtype} on "
            f"{out.device}; allocate it with torch.zeros(..., dtype=torch.float32, "
            "device=x1.device)"
        )
    return out


def check_device_fits(
    nbytes: float, device: torch.device, what: str, hint: str
) -> None:
    """Raise ``MemoryError`` if ``nbytes`` exceed the free memory of ``device``."""
    check_fits(nbytes, available_memory(device), what, hint)


def check_terms(terms: Sequence[tuple]) -> list[tuple]:
    """Validate the term list of ``gram_hadamard_many``; return it as a list."""
    terms = list(terms)
    if not terms:
        raise ValueError("expected at least one (x1, x2, g1, g2, scale) term, got none")
    for k, term in enumerate(terms):
        if not isinstance(term, (tuple, list)) or len(term) != 5:
            got = f"{type(term).__name__}"
            got += f" of length {len(term)}" if isinstance(term, (tuple, list)) else ""
            raise ValueError(
                f"expected terms[{k}] to be a tuple (x1, x2, g1, g2, scale), got {got}"
            )
    return [tuple(t) for t in terms]
