"""The ``"jacobian"`` eNTK: per-sample Jacobians (vmapped ``jacrev``), then contraction.

Cost: ``(N1 + N2) * O`` reverse passes to build the Jacobians, and a GEMM of
``N1 * N2 * P * O**2`` multiply-adds (``* O`` when output-traced). Memory: one
block of Jacobians, ``B * O * P`` floats; blocks are recomputed when the whole
Jacobian does not fit in the budget.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.func import jacrev, vmap

from rdiag._inputs import Inputs, batch_size, concat, rows
from rdiag._tiling import place, symmetric_tile, tiles
from rdiag._typing import Params
from rdiag.functional import FunctionalModel
from rdiag.ntk.spec import NTKSpec, empty_kernels


def jacobians(
    fm: FunctionalModel, params: Params, x: Inputs, whole_batch: bool = False
) -> dict[str, Tensor]:
    """Jacobians of the outputs w.r.t. each selected parameter.

    Args:
        fm: Functional model.
        params: The selected parameters (``fm.params``).
        x: Batch ``(B, ...)``.
        whole_batch: Differentiate the whole-batch function (see ``NTKSpec``).

    Returns:
        Name -> ``(B, O, p)`` with ``p`` the parameter's size, in at least float32.
        With ``whole_batch`` these are rows of the whole-batch Jacobian.
    """
    if whole_batch:
        jac = jacrev(lambda p: fm(p, x))(params)
    else:
        jac = vmap(jacrev(fm.single), (None, 0))(params, x)
    out = {}
    for n, j in jac.items():
        j = j.reshape(j.shape[0], j.shape[1], -1)
        out[n] = j.float() if j.dtype in (torch.float16, torch.bfloat16) else j
    return out


def contract(
    fm: FunctionalModel, j1: dict[str, Tensor], j2: dict[str, Tensor], spec: NTKSpec
) -> dict[str, Tensor]:
    """Per-layer weighted kernels from two sets of Jacobians.

    Args:
        fm: Functional model (for the layer groups).
        j1: Name -> ``(N1, O, p)``.
        j2: Name -> ``(N2, O, p)`` (ignored when ``spec.diagonal``).
        spec: What to compute.

    Returns:
        Layer -> kernel of shape ``(N1, N2)``, ``(N1, N2, O, O)``, ``(N1,)`` or
        ``(N1, O, O)``.
    """
    out = {}
    for layer, names in fm.groups.items():
        acc = None
        for n in names:
            w = spec.weights[n]
            if w == 0.0:
                continue
            a, b = j1[n], j2[n]
            n1, o, p = a.shape
            if spec.diagonal:
                k = (
                    (a * b).sum((1, 2))
                    if spec.trace_outputs
                    else torch.bmm(a, b.transpose(1, 2))
                )
            elif spec.trace_outputs:
                k = a.reshape(n1, o * p) @ b.reshape(b.shape[0], o * p).T
            else:
                k = (a.reshape(n1 * o, p) @ b.reshape(-1, p).T).reshape(n1, o, -1, o)
                k = k.permute(0, 2, 1, 3)
            acc = w * k if acc is None else acc.add_(k, alpha=w)
        if acc is not None:
            out[layer] = acc
    return out


def jacobian_ntk(
    fm: FunctionalModel, x1: Inputs, x2: Inputs | None, spec: NTKSpec
) -> dict[str, Tensor]:
    """ENTK by Jacobian contraction; see the module docstring for costs.

    Args:
        fm: Functional model.
        x1: ``(N1, ...)``.
        x2: ``(N2, ...)`` or ``None`` for the symmetric kernel ``K(x1, x1)``.
        spec: What to compute (``spec.block_size`` tiles N1 x N2).

    Returns:
        Layer -> kernel (see :func:`contract` for shapes).
    """
    params = fm.params
    n1 = batch_size(x1)
    if spec.whole_batch:
        both = x1 if x2 is None else concat(x1, x2)
        jac = jacobians(fm, params, both, whole_batch=True)
        j2 = jac if x2 is None else {n: j[n1:] for n, j in jac.items()}
        return contract(fm, {n: j[:n1] for n, j in jac.items()}, j2, spec)
    if spec.diagonal:
        parts = [
            contract(fm, j, j, spec) for j in _blocks(fm, params, x1, spec.block_size)
        ]
        return {layer: torch.cat([p[layer] for p in parts]) for layer in parts[0]}
    symmetric = x2 is None
    x2 = x1 if symmetric else x2
    n2 = batch_size(x2)
    block = spec.block_size
    if block >= max(n1, n2):
        j1 = jacobians(fm, params, x1)
        tile = symmetric_tile(n1, 8)
        if not symmetric or n1 < 2 * tile:
            return contract(
                fm, j1, j1 if symmetric else jacobians(fm, params, x2), spec
            )
        # Symmetric: contract only the upper-triangle tiles (up to half the GEMM).
        out = empty_kernels(fm, spec, n1, n1)
        for r, c in tiles(n1, n1, tile, True):
            place(out, contract(fm, _rows(j1, r), _rows(j1, c), spec), r, c, True)
        return out
    out = empty_kernels(fm, spec, n1, n2)
    cache: tuple[slice, dict[str, Tensor]] | None = None
    for r, c in tiles(n1, n2, block, symmetric):
        if cache is None or cache[0] != r:
            cache = (r, jacobians(fm, params, rows(x1, r)))
        j1 = cache[1]
        j2 = j1 if symmetric and r == c else jacobians(fm, params, rows(x2, c))
        place(out, contract(fm, j1, j2, spec), r, c, symmetric)
    return out


def _rows(jac: dict[str, Tensor], sl: slice) -> dict[str, Tensor]:
    return {n: j[sl] for n, j in jac.items()}


def _blocks(
    fm: FunctionalModel, params: Params, x: Inputs, block: int
) -> Iterator[dict[str, Tensor]]:
    for i in range(0, batch_size(x), block):
        yield jacobians(fm, params, rows(x, slice(i, i + block)))
