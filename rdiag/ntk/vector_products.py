"""The ``"ntvp"`` eNTK: NTK-vector products, ``K e = J (J^T e)``, never forming ``J``.

For each column block of ``x2`` the rows ``J_j^T e_b`` come from one vmapped vjp
per sample, and each is pushed forward through ``x1`` with a jvp. Cost: ``N2 * O``
reverse passes over one sample plus ``N2 * O`` forward-mode passes over ``N1``
samples (half of them when symmetric); no ``N1 * N2 * P * O**2`` contraction, so
it wins for large ``O`` or ``P``. Memory: ``B * O * P`` floats for one block of
rows, and the activations of one chunk of jvps.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import vjp, vmap

from rdiag._autodiff import JvpMode, jvp
from rdiag._inputs import Inputs, batch_size, concat, rows
from rdiag._tiling import place
from rdiag._typing import Params
from rdiag.functional import FunctionalModel
from rdiag.ntk.spec import NTKSpec, empty_kernels, kernel_dtype, kernel_itemsize


def _pull_rows(
    fm: FunctionalModel, params: Params, x: Inputs, num_outputs: int
) -> dict[str, Tensor]:
    """``J^T e`` for every sample of ``x`` and output unit: name -> ``(B, O, *shape)``."""
    basis = torch.eye(num_outputs, dtype=kernel_dtype(fm), device=fm.device)

    def sample_rows(sample: Inputs) -> dict[str, Tensor]:
        _, pull = vjp(lambda p: fm.single(p, sample), params)
        return vmap(pull)(basis.to(fm.param_dtype))[0]

    return vmap(sample_rows)(x)


def _push(
    fm: FunctionalModel,
    params: Params,
    x: Inputs,
    tangents: dict[str, Tensor],
    mode: JvpMode,
    chunk: int,
) -> Tensor:
    """``J(x) t`` for a batch of tangents (name -> ``(C, *shape)``): ``(C, N, O)``."""
    base = {n: params[n] for n in tangents}

    def push_one(tangent: dict[str, Tensor]) -> Tensor:
        return jvp(lambda p: fm({**params, **p}, x), (base,), (tangent,), mode)[1]

    count = next(iter(tangents.values())).shape[0]
    outs = [
        # randomness="same": a train-mode dropout mask is shared by all tangents.
        vmap(push_one, randomness="same")(
            {n: t[i : i + chunk] for n, t in tangents.items()}
        )
        for i in range(0, count, chunk)
    ]
    return torch.cat(outs)


def _groups(fm: FunctionalModel, spec: NTKSpec) -> dict[str, list[str]]:
    live = {k: [n for n in v if spec.weights[n] != 0.0] for k, v in fm.groups.items()}
    live = {k: v for k, v in live.items() if v}
    if spec.per_layer:
        return live
    return {"all": [n for names in live.values() for n in names]}


def _chunk(spec: NTKSpec, num_params: int, batch: int, itemsize: int) -> int:
    per_tangent = itemsize * (num_params + 16 * batch * max(spec.num_outputs, 64))
    return max(1, int(spec.budget // (2 * per_tangent)))


def _to_kernel(products: Tensor, nb: int, o: int, spec: NTKSpec) -> Tensor:
    """Rearrange ``(nb*O, na, O)`` products (row ``(j, b)``, column ``(i, a)``)."""
    res = products.reshape(nb, o, -1, o)
    if spec.trace_outputs:
        return res.diagonal(dim1=1, dim2=3).sum(-1).T
    return res.permute(2, 0, 3, 1)


def ntvp_ntk(
    fm: FunctionalModel,
    x1: Inputs,
    x2: Inputs | None,
    spec: NTKSpec,
    mode: JvpMode,
) -> dict[str, Tensor]:
    """ENTK from NTK-vector products; see the module docstring for costs.

    Args:
        fm: Functional model.
        x1: ``(N1, ...)``.
        x2: ``(N2, ...)`` or ``None`` for the symmetric kernel.
        spec: What to compute.
        mode: The forward-mode strategy (:func:`rdiag._autodiff.probe_jvp_mode`).

    Returns:
        Layer -> kernel when ``spec.per_layer``, else ``{"all": kernel}``; shapes as
        in :class:`~rdiag.ntk.spec.NTKSpec`.
    """
    params = fm.params
    o = spec.num_outputs
    groups = _groups(fm, spec)
    if spec.whole_batch:
        return _coupled(fm, params, x1, x2, spec, groups, mode)
    symmetric = x2 is None
    x2 = x1 if symmetric else x2
    n1, n2 = batch_size(x1), batch_size(x2)
    out = empty_kernels(fm, spec, n1, n2, keys=list(groups))
    itemsize = kernel_itemsize(fm)
    block = spec.block_size
    for start in range(0, n2, block):
        cols = slice(start, min(start + block, n2))
        nb = cols.stop - cols.start
        xb = rows(x2, cols)
        rows_t = _pull_rows(fm, params, xb, o)
        for key, names in groups.items():
            tangents = {n: spec.weights[n] * rows_t[n].flatten(0, 1) for n in names}
            if spec.diagonal:
                out[key][cols] = _diagonal(fm, params, xb, tangents, mode, nb, spec)
                continue
            kept = slice(cols.start if symmetric else 0, n1)
            xa = rows(x1, kept)
            chunk = _chunk(spec, fm.num_params, kept.stop - kept.start, itemsize)
            k = _to_kernel(_push(fm, params, xa, tangents, mode, chunk), nb, o, spec)
            place(out, {key: k}, kept, cols, mirror=symmetric)
    return out


def _diagonal(
    fm: FunctionalModel,
    params: Params,
    x: Inputs,
    tangents: dict[str, Tensor],
    mode: JvpMode,
    nb: int,
    spec: NTKSpec,
) -> Tensor:
    o = spec.num_outputs
    per_sample = {n: t.reshape(nb, o, *t.shape[1:]) for n, t in tangents.items()}
    base = {n: params[n] for n in tangents}

    def one(sample: Inputs, tans: dict[str, Tensor]) -> Tensor:
        def push(t: dict[str, Tensor]) -> Tensor:
            return jvp(
                lambda p: fm.single({**params, **p}, sample), (base,), (t,), mode
            )[1]

        k = vmap(push)(tans)  # (b, a): row b of K_ii as a function of output a
        return k.diagonal().sum() if spec.trace_outputs else k.T

    return vmap(one)(x, per_sample)


def _coupled(
    fm: FunctionalModel,
    params: Params,
    x1: Inputs,
    x2: Inputs | None,
    spec: NTKSpec,
    groups: dict[str, list[str]],
    mode: JvpMode,
) -> dict[str, Tensor]:
    """Whole-batch products on ``[x1; x2]`` (batch-coupled or vmap-hostile models)."""
    both = x1 if x2 is None else concat(x1, x2)
    n, n1, o = batch_size(both), batch_size(x1), spec.num_outputs
    cols = range(n) if x2 is None else range(n1, n)
    basis = torch.zeros(len(cols) * o, n, o, dtype=fm.param_dtype, device=fm.device)
    for k, j in enumerate(cols):
        basis[k * o : (k + 1) * o, j] = torch.eye(
            o, dtype=fm.param_dtype, device=fm.device
        )
    _, pull = vjp(lambda p: fm(p, both), params)
    rows_t = vmap(pull)(basis)[0]
    itemsize = kernel_itemsize(fm)
    out = {}
    for key, names in groups.items():
        tangents = {nm: spec.weights[nm] * rows_t[nm] for nm in names}
        chunk = _chunk(spec, fm.num_params, n, itemsize)
        prod = _push(fm, params, both, tangents, mode, chunk)
        k = _to_kernel(prod[:, :n1], len(cols), o, spec)
        if spec.diagonal:
            k = k.diagonal(dim1=0, dim2=1)
            k = k if spec.trace_outputs else k.permute(2, 0, 1)
        out[key] = k
    return out
