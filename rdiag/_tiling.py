"""Memory budgets and tiles: how much work fits, and how a kernel is split into blocks.

One place for the sizes every implementation reasons about: the budget a
computation may use (default half of the free memory), the ``MemoryError`` that
says the size and the way out, the largest block of samples that fits, and the
``block x block`` tiles of an ``N1 x N2`` kernel (upper triangle when symmetric).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch
from torch import Tensor

#: Fraction of free memory used when no ``memory_budget`` is given.
DEFAULT_BUDGET_FRACTION = 0.5
#: Smallest tile a symmetric kernel is split into (smaller GEMMs lose efficiency).
MIN_SYMMETRIC_TILE = 64


def format_bytes(nbytes: float) -> str:
    """Human-readable byte count, e.g. ``'3.2 GiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024:
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def available_memory(device: torch.device) -> int:
    """Bytes that can be allocated on ``device`` now (free GPU memory or free RAM)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def resolve_budget(memory_budget: float | None, device: torch.device) -> float:
    """The bytes a computation may use: ``memory_budget``, or half the free memory.

    Raises:
        ValueError: ``memory_budget`` is given but not a finite number > 0.
    """
    if memory_budget is None:
        return DEFAULT_BUDGET_FRACTION * available_memory(device)
    try:
        budget = float(memory_budget)
    except (TypeError, ValueError):
        budget = float("nan")
    if isinstance(memory_budget, bool) or not (math.isfinite(budget) and budget > 0):
        raise ValueError(
            f"expected memory_budget to be a finite number of bytes > 0, got "
            f"{memory_budget!r}; pass e.g. memory_budget=8e9, or None for half the "
            "free memory"
        )
    return budget


def check_fits(nbytes: float, budget: float, what: str, hint: str) -> None:
    """Raise ``MemoryError`` if ``nbytes`` exceeds ``budget``, with a way out."""
    if nbytes > budget:
        raise MemoryError(
            f"{what} needs about {format_bytes(nbytes)}, over the memory budget of "
            f"{format_bytes(budget)}; {hint}"
        )


def block_size(
    bytes_per_sample: float, budget: float, n: int, given: int | None = None
) -> int:
    """Largest block of samples whose working set (twice ``bytes_per_sample``) fits.

    Args:
        bytes_per_sample: Bytes one sample's block rows take (e.g. ``O * P`` floats).
        budget: Bytes available.
        n: Number of samples (the block is at most ``n``).
        given: A block size asked for by the caller; checked against the budget.

    Returns:
        The block size, at least 1.

    Raises:
        MemoryError: ``given`` (or a block of one sample) does not fit.
    """
    fit = int(budget // (2 * bytes_per_sample)) if bytes_per_sample > 0 else n
    if given is not None:
        check_fits(
            2 * given * bytes_per_sample,
            budget,
            f"block_size={given}",
            f"use block_size <= {max(fit, 1)} or a larger memory_budget",
        )
        return given
    if fit < 1:
        check_fits(
            2 * bytes_per_sample,
            budget,
            "one sample's Jacobian rows",
            "select fewer parameters (params=...) or use rdiag.NTKOperator",
        )
    return max(1, min(n, fit))


def tiles(
    n1: int, n2: int, block: int, symmetric: bool
) -> Iterator[tuple[slice, slice]]:
    """Row and column slices of the ``block x block`` tiles (upper triangle if symmetric)."""
    for i in range(0, n1, block):
        for j in range(i if symmetric else 0, n2, block):
            yield slice(i, min(i + block, n1)), slice(j, min(j + block, n2))


def symmetric_tile(n: int, row_blocks: int) -> int:
    """Tile of a symmetric ``n x n`` kernel cut into ``row_blocks`` row blocks.

    Only upper-triangle tiles are computed, so ``b`` row blocks do
    ``(b + 1) / (2 b)`` of the work; tiles never go below ``MIN_SYMMETRIC_TILE``.
    """
    return max(MIN_SYMMETRIC_TILE, -(-n // row_blocks))


def place(
    out: dict[str, Tensor],
    part: dict[str, Tensor],
    rows: slice,
    cols: slice,
    mirror: bool,
) -> None:
    """Write a tile into the output kernels (and its transpose below the diagonal)."""
    for layer, k in part.items():
        out[layer][rows, cols] = k
        if mirror and rows != cols:
            out[layer][cols, rows] = (
                k.transpose(0, 1) if k.dim() == 2 else k.permute(1, 0, 3, 2)
            )
