r"""Large output spaces: projected kernels, the read-out identity, output-probe estimates.

A language model's output is ``(N, T, V)`` with ``V`` up to ``~10^5``: the full
kernel cannot be formed, and even the traced one needs a cotangent per output
unit. Three ways out, all built as *views* of the model whose outputs are fewer:

* **Projected kernels** ``K_P = (P J)(P J)^T``: the outputs are projected by a
  user-given or seeded random ``(k, O)`` matrix ``P`` (or ``(k, V)`` per token).
* **The read-out identity** (exact, traced kernels; :mod:`rdiag.ntk.readout`):
  the ``V`` outputs of a linear read-out reduced to the rank of its input.
* **Output-probe estimates** of the traced kernel: with ``k`` Rademacher rows
  ``z_r`` over the ``O`` outputs, ``E[z z^T] = I`` gives the unbiased estimate
  ``(1/k) sum_r K_{z_r}`` with a per-entry standard error from the ``k`` probes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from rdiag._tiling import check_fits, resolve_budget
from rdiag.functional import FunctionalModel

__all__ = ["KernelEstimate", "Projection", "probe_estimate", "projected_view"]


@dataclass(frozen=True)
class KernelEstimate:
    """An estimated kernel with its per-entry standard error.

    Attributes:
        kernel: The estimate, shaped like the exact kernel.
        std_err: Standard error of each entry (sample std over the probes /
            ``sqrt(num_probes)``); the exact value is within a few of it with
            high probability.
        num_probes: Probes ``k`` the estimate averages.
    """

    kernel: Tensor
    std_err: Tensor
    num_probes: int


class Projection:
    """The output map ``out -> P out`` of a projected kernel.

    Args:
        matrix: A ``(k, O)`` (or, per token, ``(k, V)``) tensor, or an int ``k``
            for a seeded random matrix drawn when the output size is known.
        per_token: Project each position's last axis ``V`` of a ``(N, T, V)``
            output (``O_P = T k``) instead of the flattened ``O`` (``O_P = k``).
        seed: Seed of a random matrix.
        kind: ``"rademacher"`` (entries +-1) or ``"gaussian"`` for a random one.
    """

    def __init__(
        self,
        matrix: Tensor | int,
        *,
        per_token: bool = False,
        seed: int = 0,
        kind: str = "rademacher",
    ) -> None:
        if isinstance(matrix, bool) or not isinstance(matrix, (Tensor, int)):
            raise TypeError(
                f"expected a projection as a (k, O) tensor or an int k, got "
                f"{type(matrix).__name__}"
            )
        if isinstance(matrix, int) and matrix < 1:
            raise ValueError(f"expected a projection size k >= 1, got {matrix}")
        if isinstance(matrix, Tensor) and matrix.dim() != 2:
            raise ValueError(
                f"expected a (k, O) projection matrix, got shape {tuple(matrix.shape)}"
            )
        if kind not in ("rademacher", "gaussian"):
            raise ValueError(f"expected kind 'rademacher' or 'gaussian', got {kind!r}")
        self.given = matrix
        self.per_token = per_token
        self.seed = seed
        self.kind = kind
        self._drawn: dict[tuple, Tensor] = {}

    def matrix(self, size: int, like: Tensor) -> Tensor:
        """The ``(k, size)`` matrix on ``like``'s device and dtype."""
        if isinstance(self.given, Tensor):
            if self.given.shape[1] != size:
                raise ValueError(
                    f"expected a projection with {size} columns (the "
                    f"{'vocabulary' if self.per_token else 'flattened outputs'}), got "
                    f"shape {tuple(self.given.shape)}"
                )
            return self.given.to(device=like.device, dtype=like.dtype)
        key = (size, like.device, like.dtype)
        if key not in self._drawn:
            check_fits(
                self.given * size * (8 + like.element_size()),
                resolve_budget(None, like.device),
                f"the ({self.given}, {size}) random projection",
                "pass a smaller projection k",
            )
            gen = torch.Generator().manual_seed(self.seed)
            if self.kind == "rademacher":
                m = torch.randint(0, 2, (self.given, size), generator=gen) * 2.0 - 1
            else:
                m = torch.randn(self.given, size, generator=gen, dtype=torch.float64)
            self._drawn[key] = m.to(device=like.device, dtype=like.dtype)
        return self._drawn[key]

    def __call__(self, out: Tensor) -> Tensor:
        """``(N, ...) -> (N, k)``, or ``(N, T, V) -> (N, T, k)`` per token."""
        if self.per_token:
            if out.dim() < 3:
                raise ValueError(
                    f"expected a (N, T, V) output for a per-token projection, got "
                    f"shape {tuple(out.shape)}; use per_token=False"
                )
            return out @ self.matrix(out.shape[-1], out).T
        flat = out.reshape(out.shape[0], -1)
        return flat @ self.matrix(flat.shape[1], flat).T

    @property
    def size(self) -> int:
        """``k``."""
        return self.given if isinstance(self.given, int) else self.given.shape[0]


def _composed(
    first: Callable[[object], Tensor] | None, then: Callable[[Tensor], Tensor]
) -> Callable[[object], Tensor]:
    def output_fn(out: object) -> Tensor:
        if first is not None:
            out = first(out)
        elif not isinstance(out, Tensor):
            out = getattr(out, "logits", out)
            out = out["logits"] if isinstance(out, Mapping) else out
        return then(out)

    return output_fn


def projected_view(fm: FunctionalModel, projection: Projection) -> FunctionalModel:
    """The view of ``fm`` whose output is ``projection(output)``."""
    return FunctionalModel(
        fm.module,
        fm.names,
        mode=fm.mode,
        dtype=fm.dtype,
        dropout_seed=fm.dropout_seed,
        output_fn=_composed(fm.output_fn, projection),
    )


def probe_estimate(full: Tensor) -> KernelEstimate:
    """The traced-kernel estimate from a projected full kernel ``(.., k, k)``.

    Args:
        full: ``(N1, N2, k, k)`` (or ``(N1, k, k)`` for the diagonal) kernel of the
            ``k`` probe outputs.

    Returns:
        The :class:`KernelEstimate` of the traced kernel.
    """
    per_probe = full.diagonal(dim1=-2, dim2=-1)  # (..., k)
    k = per_probe.shape[-1]
    estimate = per_probe.mean(-1)
    spread = per_probe.std(-1) if k > 1 else torch.full_like(estimate, math.inf)
    return KernelEstimate(estimate, spread / math.sqrt(k), k)
