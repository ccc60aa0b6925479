r"""Large output spaces: projected kernels, the read-out identity, output-probe estimates.

A language model's output is ``(N, T, V)`` with ``V`` up to ``~10^5``: the full
kernel cannot be formed, and even the traced one needs a cotangent per output
unit. Three ways out, all built as *views* of the model whose outputs are fewer:

* **Projected kernels** ``K_P = (P J)(P J)^T``: the outputs are projected by a
  user-given or seeded random ``(k, O)`` matrix ``P`` (or ``(k, V)`` per token).
* **The read-out identity** (exact, traced kernels): when the model's output is
  a linear read-out ``f = c W h + c_b b`` of a ``D``-dimensional feature ``h``
  with ``D < V``, then ``sum_v (df_v)(df_v)^T = c^2 W^T W`` in ``h``, so for every
  parameter below the read-out the traced kernel over the ``V`` outputs equals
  the traced kernel of the ``D`` outputs ``L^T h`` with ``L L^T = c^2 W^T W``
  (``L`` from an eigendecomposition, read from the current ``W`` at each call).
  The read-out's own parameters have closed forms:
  ``K_W[i, j] = c^2 V sum_t h_it . h_jt`` and ``K_b[i, j] = c_b^2 T V``.
* **Output-probe estimates** of the traced kernel: with ``k`` Rademacher rows
  ``z_r`` over the ``O`` outputs, ``E[z z^T] = I`` gives the unbiased estimate
  ``(1/k) sum_r K_{z_r}`` with a per-entry standard error from the ``k`` probes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rdiag._inputs import Inputs, rows
from rdiag.functional import FunctionalModel
from rdiag.parametrization import layer_scale

__all__ = ["KernelEstimate", "Projection", "Readout", "find_readout", "projected_view"]


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


# ---- the read-out identity -----------------------------------------------------------
@dataclass(frozen=True)
class Readout:
    """A linear read-out whose output is the model's output.

    Attributes:
        name: Module path.
        module: The ``nn.Linear``.
        weight: Selected full name of its weight, or ``None`` if not selected.
        bias: Selected full name of its bias, or ``None``.
    """

    name: str
    module: nn.Linear
    weight: str | None
    bias: str | None

    def scales(self) -> tuple[float, float]:
        """Forward multipliers ``(c, c_b)`` of a parametrization (1 without one)."""
        scale = layer_scale(self.module)
        return (1.0, 1.0) if scale is None else (scale.weight, scale.bias)

    def factor(self, fm: FunctionalModel) -> Tensor:
        """``L (D, r)`` with ``L L^T = c^2 W^T W`` from the current weight.

        A Cholesky factor (``r = D``) when ``W^T W`` is positive definite, else the
        eigenvectors of its non-zero eigenvalues (``r`` its rank); factorized in
        float64, returned in the view's dtype.
        """
        c, _ = self.scales()
        w = self.module.weight.detach().to(fm.param_dtype)
        gram = ((c * c) * (w.T @ w)).double()
        chol, info = torch.linalg.cholesky_ex(gram)
        if int(info) == 0:
            return chol.to(fm.param_dtype)
        vals, vecs = torch.linalg.eigh(gram)
        keep = vals > vals.max().clamp_min(0) * 1e-12 * w.shape[1]
        return (vecs[:, keep] * vals[keep].sqrt()).to(fm.param_dtype)


def find_readout(fm: FunctionalModel, x: Inputs) -> Readout | None:
    """The ``nn.Linear`` whose output is the model output, if the identity helps.

    It helps when the read-out narrows nothing it needs: ``in_features <
    out_features``, and the weight (if selected) is not used by another module.

    Args:
        fm: The view.
        x: A prepared batch (one sample is run).

    Returns:
        The :class:`Readout`, or ``None``.
    """
    # The outputs are kept alive: ids of freed tensors are reused.
    seen: list[tuple[Tensor, str, nn.Module]] = []

    def hook(name: str) -> Callable:
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            seen.append((output, name, module))

        return record

    linears = [
        (n, m)
        for n, m in fm.module.named_modules()
        if isinstance(m, nn.Linear) and m.in_features < m.out_features
    ]
    handles = [m.register_forward_hook(hook(n)) for n, m in linears]
    try:
        with torch.no_grad():
            out = fm.forward(fm.params, x if fm.batch_coupled else rows(x, slice(0, 1)))
    finally:
        for h in handles:
            h.remove()
    found = [(n, m) for o, n, m in seen if o is out]
    if not found:
        return None
    name, module = found[-1]
    canonical = {id(p): n for n, p in fm.module.named_parameters()}
    uses = sum(
        1
        for m in fm.module.modules()
        for p in m.parameters(recurse=False)
        if p is module.weight
    )
    if uses > 1:
        return None
    selected = set(fm.names)
    weight = canonical.get(id(module.weight))
    bias = None if module.bias is None else canonical.get(id(module.bias))
    return Readout(
        name,
        module,
        weight if weight in selected else None,
        bias if bias in selected else None,
    )


class ReadoutView(FunctionalModel):
    """The view whose output is ``h L`` (``h`` the read-out's input, ``L`` fixed per call).

    The parameters are those of the original view but the read-out's; the
    read-out still runs (its output is discarded), the backward never enters it.
    """

    def __init__(self, fm: FunctionalModel, readout: Readout) -> None:
        names = [n for n in fm.names if n not in (readout.weight, readout.bias)]
        super().__init__(
            fm.module,
            names,
            mode=fm.mode,
            dtype=fm.dtype,
            dropout_seed=fm.dropout_seed,
            output_fn=fm.output_fn,
        )
        self.readout = readout
        self.basis: Tensor | None = None

    def forward(self, params: Mapping[str, Tensor], x: Inputs) -> Tensor:
        """``h L`` of shape ``(N, ..., r)``, ``h`` the read-out's input."""
        captured: list[Tensor] = []
        handle = self.readout.module.register_forward_pre_hook(
            lambda module, args: captured.append(args[0])
        )
        try:
            super().forward(params, x)
        finally:
            handle.remove()
        return captured[-1] @ self.basis.to(captured[-1].dtype)


def readout_features(view: ReadoutView, x: Inputs) -> Tensor:
    """``h (N, T, D)`` (``T = 1`` for a ``(N, D)`` input) of the read-out on ``x``."""
    basis = view.basis
    view.basis = torch.eye(
        view.readout.module.in_features, dtype=view.param_dtype, device=view.device
    )
    try:
        with torch.no_grad():
            h = view.forward(view.params, x)
    finally:
        view.basis = basis
    return h.reshape(h.shape[0], -1, h.shape[-1])


def readout_kernels(
    readout: Readout,
    h1: Tensor,
    h2: Tensor | None,
    weights: Mapping[str, float],
    diagonal: bool,
) -> dict[str, Tensor]:
    """The read-out parameters' traced kernels in closed form.

    Args:
        readout: The read-out.
        h1: ``(N1, T, D)`` read-out inputs.
        h2: ``(N2, T, D)``, or ``None`` for the symmetric kernel.
        weights: Parameter name -> weight ``M``.
        diagonal: Only ``K(x_i, x_i)``.

    Returns:
        ``{layer: (N1, N2) or (N1,)}`` (empty if the read-out is not selected).
    """
    c, cb = readout.scales()
    v, t = readout.module.out_features, h1.shape[1]
    total = None
    if readout.weight is not None and weights[readout.weight] != 0.0:
        if diagonal:
            k = h1.pow(2).sum((1, 2))
        else:
            b = h1 if h2 is None else h2
            k = torch.einsum("itd,jtd->ij", h1, b)
        total = weights[readout.weight] * c * c * v * k
    if readout.bias is not None and weights[readout.bias] != 0.0:
        n2 = h1.shape[0] if h2 is None else h2.shape[0]
        shape = (h1.shape[0],) if diagonal else (h1.shape[0], n2)
        k = torch.full(shape, float(t * v), dtype=h1.dtype, device=h1.device)
        k = weights[readout.bias] * cb * cb * k
        total = k if total is None else total + k
    if total is None:
        return {}
    layer = readout.name
    return {layer: total}


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
