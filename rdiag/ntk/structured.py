r"""The ``"structured"`` eNTK: layerwise Gram-Hadamard products, never the full Jacobian.

For a layer ``y_t = W x_t (+ b)`` applied at positions ``t`` of one sample, the
per-sample gradient for output unit ``a`` is ``sum_t g_{a,t} x_t^T``
(:mod:`rdiag.ntk._capture` records ``x`` and ``g``), so the layer contributes

.. math::
    K_l[i, j, a, b] = \sum_{t, t'} (x_{i,t} \cdot x_{j,t'})\,(g_{i,a,t} \cdot g_{j,b,t'}),

a Hadamard product of the Gram matrices of the layer inputs and of the output
cotangents (``T = 1`` for a plain MLP layer). A bias appends a constant column to
``x``; an embedding's ``x`` is a one-hot row; a norm gain has ``x = 1`` and
``g`` multiplied by the normalized input. Per layer the cheaper of two routes is
taken: this Gram route (:func:`rdiag.kernels.gram_hadamard_many` /
:func:`rdiag.kernels.gram_hadamard_shared`), or materializing the per-sample
gradient ``sum_t g_t x_t^T`` and one GEMM (wins for convolutions with many
positions and few channels). Parameters of other modules (and tied ones) go
through the ``"jacobian"`` implementation, for their own parameters only.

Cost (MLP, full kernel): ``O`` batched reverse passes for the cotangents, and
``N1 N2 (D_in + O^2 D_out)`` multiply-adds per layer instead of the Jacobian
route's ``N1 N2 O^2 D_in D_out``. Memory: ``N O sum_l(T_l D_out,l)`` floats for
the cotangents plus the output; tiles over ``N1 x N2`` keep the rest within the
budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from rdiag._inputs import Inputs, batch_size
from rdiag._optional import notice
from rdiag._tiling import block_size, check_fits, place, symmetric_tile, tiles
from rdiag.functional import FunctionalModel, layer_of
from rdiag.kernels import gram_hadamard_many, gram_hadamard_shared
from rdiag.ntk._capture import Factors, StructuredPlan, TermShape, capture, sub_view
from rdiag.ntk.costs import output_chunks, route_flops
from rdiag.ntk.rules import Factor
from rdiag.ntk.jacobian import jacobian_ntk
from rdiag.ntk.spec import NTKSpec, empty_kernels, kernel_dtype, kernel_itemsize

__all__ = ["structured_ntk"]


@dataclass
class _Term:
    """One term of a layer's kernel: factors on both batches and a scale.

    ``kind="gram"`` pairs factors of one orientation (``(x . x')(g . g')``);
    ``"cross"`` pairs the two uses of a tied parameter stored in opposite
    orientations (``(g . x')(x . g')``). ``single``: the parameter has one use, so
    its per-sample gradient may be materialized instead.
    """

    f1: Factor
    f2: Factor
    scale: float
    vocab: int = 0
    kind: str = "gram"
    single: bool = True

    def rows(self, r: slice, c: slice) -> _Term:
        return _Term(
            self.f1.rows(r),
            self.f2.rows(c),
            self.scale,
            self.vocab,
            self.kind,
            self.single,
        )


def structured_ntk(
    fm: FunctionalModel,
    x1: Inputs,
    x2: Inputs | None,
    spec: NTKSpec,
    plan: StructuredPlan,
) -> dict[str, Tensor]:
    """Layerwise eNTK by Gram-Hadamard products (see the module docstring).

    Args:
        fm: Functional model (not batch-coupled).
        x1: ``(N1, ...)``.
        x2: ``(N2, ...)``, or ``None`` for the symmetric ``K(x1, x1)``.
        spec: What to compute; ``spec.block_size`` caps the tile and capture chunk.
        plan: The checked sites (:func:`plan_structured`).

    Returns:
        Layer name -> its weighted kernel: ``(N1, N2)`` traced, ``(N1, N2, O, O)``
        full, ``(N1,)`` / ``(N1, O, O)`` diagonal. Layers whose parameters all have
        weight 0 are left out. With ``spec.per_layer`` false, ``{"all": total}``.

    Raises:
        MemoryError: Not even a 1 x 1 tile fits in ``spec.budget``.

    Example:
        Reached through :func:`rdiag.empirical_ntk`; it equals the Jacobian route:

        >>> import torch
        >>> from rdiag import empirical_ntk
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> x = torch.randn(5, 3)
        >>> kw = dict(dtype=torch.float64, trace_outputs=False)
        >>> k = empirical_ntk(net, x, implementation="structured", **kw)
        >>> k.shape
        torch.Size([5, 5, 2, 2])
        >>> torch.allclose(k, empirical_ntk(net, x, implementation="jacobian", **kw))
        True
    """
    sites = plan.sites
    n1 = batch_size(x1)
    n2 = n1 if x2 is None else batch_size(x2)
    keys = None
    if not spec.per_layer:
        # One accumulator for every layer: no per-layer kernels to allocate and add.
        keys = ["all"] if any(w != 0.0 for w in spec.weights.values()) else []
    out = empty_kernels(fm, spec, n1, n2, keys)
    chunk = max(1, min(spec.block_size, n1))
    failed: dict[str, str] = {}
    samples = n1 + (0 if x2 is None else n2)
    chunks = output_chunks(plan, samples, spec, kernel_itemsize(fm))
    for k, outputs in enumerate(chunks):
        f1, bad = capture(fm, sites, x1, chunk, outputs=outputs)
        f2 = f1
        if x2 is not None:
            f2, bad2 = capture(fm, sites, x2, chunk, outputs=outputs)
            bad.update(bad2)
        if k and set(bad) - set(failed):
            raise RuntimeError(
                f"expected the same modules to be captured for every chunk of output "
                f"units, got new failures {sorted(bad)} on chunk {k}; the forward pass "
                "must not change with the output cotangent (use implementation='jacobian')"
            )
        failed.update(bad)
        layers = _layer_terms(f1, f2, spec.weights, set(failed), kernel_dtype(fm))
        if not spec.per_layer and layers:
            layers = {"all": [t for ts in layers.values() for t in ts]}
        if spec.diagonal:
            _diagonal(layers, out, spec)
        else:
            _offdiagonal(layers, out, spec, x2 is None, fresh=k == 0)
    if failed:
        notice(
            f"structured eNTK: {len(failed)} parameter(s) could not be captured on "
            f"this batch ({sorted(set(failed.values()))}); they went through the "
            "'jacobian' implementation",
        )
    view = plan.rest_view
    if failed:
        names = set(failed) | set(view.names if view is not None else ())
        view = sub_view(fm, [n for n in names if spec.weights[n]])
    if view is not None:
        for layer, k in _generic(view, x1, x2, spec).items():
            out[layer if spec.per_layer else "all"] += k
    return out


def _layer_terms(
    f1: Factors,
    f2: Factors,
    weights: dict[str, float],
    skip: set[str],
    dtype: torch.dtype,
) -> dict[str, list[_Term]]:
    """Layer -> its terms; a bias is folded into its weight as a constant column of x.

    A parameter with one use gives one term; a tied parameter with uses ``s``
    gives one term per pair of uses (``gram`` or ``cross`` by orientation).
    """
    layers: dict[str, list[_Term]] = {}
    names = [n for n in f1 if n not in skip and weights[n] != 0.0]
    folded = {b: w for w, b in _foldable(names, f1).items()}
    for name in names:
        if name in folded:
            continue
        layer = layers.setdefault(layer_of(name), [])
        uses1, uses2 = f1[name], f2[name]
        if len(uses1) > 1:
            for a in uses1:
                for c in uses2:
                    a, c = _cast(a, dtype), _cast(c, dtype)
                    if a.transposed == c.transposed:
                        term = _compact(a, c, weights[name])
                    else:
                        term = _Term(a, c, weights[name], kind="cross")
                    term.single = False
                    layer.append(term)
            continue
        a, c = _cast(uses1[0], dtype), _cast(uses2[0], dtype)
        scale = weights[name]
        bias = next((b for b, w in folded.items() if w == name), None)
        if bias is not None:
            a = _with_bias(a, weights[name], weights[bias])
            c = a if f2 is f1 else _with_bias(c, weights[name], weights[bias])
            scale = 1.0
        elif f2 is f1:
            c = a
        layer.append(_compact(a, c, scale))
    return layers


def _foldable(names: list[str], factors: Factors) -> dict[str, str]:
    """Weight -> bias pairs of one module that share one cotangent (one use each)."""
    out = {}
    for w in names:
        if not w.endswith(".weight") and w != "weight":
            continue
        b = w[: -len("weight")] + "bias"
        if b not in names or len(factors[w]) != 1 or len(factors[b]) != 1:
            continue
        fw, fb = factors[w][0], factors[b][0]
        if fw.g is fb.g and fw.x is not None and not fw.tokens and fb.x is None:
            if fw.groups == 1:
                out[w] = b
    return out


def _cast(f: Factor, dtype: torch.dtype) -> Factor:
    x = f.x.to(dtype) if f.x is not None and f.x.is_floating_point() else f.x
    return Factor(f.g.to(dtype), x, f.transposed, f.groups)


def _with_bias(f: Factor, w_weight: float, w_bias: float) -> Factor:
    """``x -> [sqrt(w_w) x, sqrt(w_b)]`` so one term carries both weight and bias."""
    ones = torch.full(
        (*f.x.shape[:2], 1), math.sqrt(w_bias), dtype=f.x.dtype, device=f.x.device
    )
    x = torch.cat([math.sqrt(w_weight) * f.x, ones], dim=2)
    return Factor(f.g, x, f.transposed, f.groups)


def _compact(a: Factor, c: Factor, scale: float) -> _Term:
    """Renumber token ids over the tokens present in both batches (``Dx = vocab``)."""
    if not a.tokens:
        return _Term(a, c, scale)
    both = a.x.reshape(-1) if a is c else torch.cat([a.x.reshape(-1), c.x.reshape(-1)])
    uniq, inv = torch.unique(both, return_inverse=True)
    ids1 = inv[: a.x.numel()].reshape(a.x.shape)
    ids2 = ids1 if a is c else inv[a.x.numel() :].reshape(c.x.shape)
    return _Term(Factor(a.g, ids1), Factor(c.g, ids2), scale, len(uniq))


def _dx(f: Factor, vocab: int) -> int:
    return 1 if f.x is None else vocab if f.tokens else f.x.shape[2]


def _use_gram(term: _Term, n1: int, n2: int, spec: NTKSpec) -> bool:
    """Whether the Gram route is cheaper than materializing per-sample gradients."""
    f = term.f1
    shape = TermShape(
        f.g.shape[2],
        _dx(f, term.vocab),
        f.g.shape[3],
        f.tokens,
        f.x is None,
        f.groups,
        1 if term.single else 2,
    )
    gram, per_sample = route_flops(shape, n1, n2, f.g.shape[1], spec)
    return per_sample is None or (gram is not None and gram < per_sample)


def _dense_x(f: Factor, vocab: int) -> Tensor:
    """``x`` as ``(N, T, Dx)`` floats: one-hot rows for tokens, ones for ``x=None``."""
    if f.x is None:
        return f.g.new_ones(f.g.shape[0], f.g.shape[2], 1)
    return F.one_hot(f.x, vocab).to(f.g.dtype) if f.tokens else f.x


def _per_sample(f: Factor, vocab: int) -> Tensor:
    """Per-sample gradients ``(N, O, Dg * Dx)`` of a factor."""
    n, o, t, dg = f.g.shape
    if f.x is None:
        return f.g.sum(2)
    if f.tokens:
        rows = torch.arange(n, device=f.x.device)[:, None] * vocab + f.x
        table = f.g.new_zeros(n * vocab, o * dg)
        table.index_add_(
            0, rows.reshape(-1), f.g.permute(0, 2, 1, 3).reshape(n * t, o * dg)
        )
        return (
            table.reshape(n, vocab, o, dg).permute(0, 2, 1, 3).reshape(n, o, vocab * dg)
        )
    k = f.groups
    g = f.g.reshape(n, o, t, k, dg // k)
    x = f.x.reshape(n, t, k, -1)
    return torch.einsum("natkg,ntkx->nakgx", g, x).reshape(n, o, -1)


def _traced_g(g: Tensor) -> Tensor:
    """``(N, O, T, Dg) -> (N, 1, T, O * Dg)``: the traced kernel is the R = 1 case."""
    n, o, t, dg = g.shape
    return g.permute(0, 2, 1, 3).reshape(n, 1, t, o * dg)


def _gram_factors(term: _Term, traced: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``x1, x2 (n, T, Dx)`` and ``g1, g2 (n, R, T, Dg)`` of a Gram term, R = 1 if traced."""
    x1, x2 = _dense_x(term.f1, term.vocab), _dense_x(term.f2, term.vocab)
    g1, g2 = term.f1.g, term.f2.g
    if traced:
        g1, g2 = _traced_g(g1), _traced_g(g2)
    return x1, x2, g1, g2


def _cross(term: _Term, traced: bool) -> Tensor:
    """``(n1, n2, R, R)`` cross term of a tied parameter's two opposite uses.

    ``K[i, j, a, b] = sum_{t, s} (g1[i, a, t] . x2[j, s]) (x1[i, t] . g2[j, b, s])``:
    the use on the left stores the gradient as ``(Dg, Dx)``, the one on the right
    as its transpose (an embedding table reused as a read-out).
    """
    f1, f2 = term.f1, term.f2
    x1 = _dense_x(f1, f2.g.shape[-1])
    x2 = _dense_x(f2, f1.g.shape[-1])
    left = torch.einsum("iatd,jsd->ijats", f1.g, x2)
    right = torch.einsum("itd,jbsd->ijbts", x1, f2.g)
    if traced:
        k = torch.einsum("ijats,ijats->ij", left, right)[:, :, None, None]
    else:
        k = torch.einsum("ijats,ijbts->ijab", left, right)
    return term.scale * k


def _gemm(j1: Tensor, j2: Tensor, traced: bool) -> Tensor:
    """``(n1, n2, R, R)`` kernel of per-sample gradients ``(n, O, P)``, R = 1 if traced."""
    n1, o, p = j1.shape
    if traced:
        return (j1.reshape(n1, o * p) @ j2.reshape(-1, o * p).T)[:, :, None, None]
    k = (j1.reshape(n1 * o, p) @ j2.reshape(-1, p).T).reshape(n1, o, -1, o)
    return k.permute(0, 2, 1, 3)


def _tile(terms: list[_Term], routes: list[bool], traced: bool, same: bool) -> Tensor:
    """One layer's kernel on one tile: Gram terms, plus one GEMM per other term.

    Single-position terms (Linear layers) go to one :func:`gram_hadamard_many`
    call (on the GPU: one launch per group of same-shaped layers); weight-shared
    ones (tokens, conv positions) to :func:`gram_hadamard_shared` each. The others'
    per-sample gradients are formed one term at a time (not concatenated), so the
    workspace is that of the largest term.
    """
    acc = None
    flat: list[tuple[Tensor, Tensor, Tensor, Tensor, float]] = []
    for term, gram in zip(terms, routes):
        if term.kind == "cross":
            k = _cross(term, traced)
            acc = k if acc is None else acc.add_(k)
        elif gram:
            x1, x2, g1, g2 = _gram_factors(term, traced)
            if x1.shape[1] == 1 and x2.shape[1] == 1:
                flat.append((x1[:, 0], x2[:, 0], g1[:, :, 0], g2[:, :, 0], term.scale))
            else:
                acc = gram_hadamard_shared(x1, x2, g1, g2, acc, scale=term.scale)
        else:
            j1 = _per_sample(term.f1, term.vocab)
            k = _gemm(j1, j1 if same else _per_sample(term.f2, term.vocab), traced)
            acc = k.mul_(term.scale) if acc is None else acc.add_(k, alpha=term.scale)
    if flat:
        acc = gram_hadamard_many(flat, acc)
    return acc[:, :, 0, 0] if traced else acc


def _offdiagonal(
    layers: dict[str, list[_Term]],
    out: dict[str, Tensor],
    spec: NTKSpec,
    symmetric: bool,
    *,
    fresh: bool,
) -> None:
    """Write (``fresh``: ``out`` still zero) or add the layers' kernels into ``out``."""
    if not layers:
        return
    if not fresh:
        part = {k: torch.zeros_like(out[k]) for k in layers}
        _offdiagonal(layers, part, spec, symmetric, fresh=True)
        for k, v in part.items():
            out[k] += v
        return
    n1, n2 = out[next(iter(out))].shape[:2]
    routes = {k: [_use_gram(t, n1, n2, spec) for t in ts] for k, ts in layers.items()}
    block = _block(layers, routes, out, spec, max(n1, n2))
    if symmetric:
        # Only upper-triangle tiles are computed: 4 row blocks save 3/8 of the work.
        block = min(block, symmetric_tile(n1, 4))
    for rows, cols in tiles(n1, n2, block, symmetric):
        same = symmetric and rows == cols
        part = {
            layer: _tile(
                [t.rows(rows, cols) for t in ts],
                routes[layer],
                spec.trace_outputs,
                same,
            )
            for layer, ts in layers.items()
        }
        if block >= max(n1, n2):
            out.update({layer: k.to(out[layer].dtype) for layer, k in part.items()})
        else:
            place(out, part, rows, cols, symmetric)


def _diagonal(
    layers: dict[str, list[_Term]], out: dict[str, Tensor], spec: NTKSpec
) -> None:
    if not layers:
        return
    n = out[next(iter(out))].shape[0]
    routes = {k: [_use_gram(t, n, n, spec) for t in ts] for k, ts in layers.items()}
    block = _block(layers, routes, out, spec, n)
    for start in range(0, n, block):
        rows = slice(start, min(start + block, n))
        for layer, ts in layers.items():
            for term, gram in zip(ts, routes[layer]):
                f1, f2 = term.f1.rows(rows), term.f2.rows(rows)
                if term.kind == "cross":
                    k = _cross_diag(f1, f2, spec.trace_outputs)
                elif gram:
                    k = _gram_diag(f1, f2, term.vocab, spec.trace_outputs)
                else:
                    k = _jac_diag(_per_sample(f1, term.vocab), spec.trace_outputs)
                out[layer][rows] += term.scale * k


def _jac_diag(j: Tensor, traced: bool) -> Tensor:
    return (j * j).sum((1, 2)) if traced else torch.bmm(j, j.transpose(1, 2))


def _gram_diag(f1: Factor, f2: Factor, vocab: int, traced: bool) -> Tensor:
    """``sum_{t,t'} (x1_t . x2_t') (g1_{a,t} . g2_{b,t'})`` per sample: ``(N,)`` or ``(N, O, O)``."""
    if f1.tokens:
        kx = (f1.x[:, :, None] == f2.x[:, None, :]).to(f1.g.dtype)
    else:
        kx = torch.bmm(_dense_x(f1, vocab), _dense_x(f2, vocab).transpose(1, 2))
    y = torch.einsum("its,iasg->iatg", kx, f2.g)
    return (
        (f1.g * y).sum((1, 2, 3)) if traced else torch.einsum("iatg,ibtg->iab", f1.g, y)
    )


def _cross_diag(f1: Factor, f2: Factor, traced: bool) -> Tensor:
    """The diagonal ``i = j`` of :func:`_cross`: ``(N,)`` or ``(N, O, O)``."""
    x1 = _dense_x(f1, f2.g.shape[-1])
    x2 = _dense_x(f2, f1.g.shape[-1])
    left = torch.einsum("iatd,isd->iats", f1.g, x2)
    right = torch.einsum("itd,ibsd->ibts", x1, f2.g)
    if traced:
        return (left * right).sum((1, 2, 3))
    return torch.einsum("iats,ibts->iab", left, right)


def _block(
    layers: dict[str, list[_Term]],
    routes: dict[str, list[bool]],
    out: dict[str, Tensor],
    spec: NTKSpec,
    n: int,
) -> int:
    """Largest tile (at most ``spec.block_size``) whose workspace fits the budget."""
    item = next(iter(out.values())).element_size()
    held = sum(k.numel() for k in out.values()) * item
    held += (
        sum(
            t.f1.g.numel() + (0 if t.f2 is t.f1 else t.f2.g.numel())
            for ts in layers.values()
            for t in ts
        )
        * item
    )
    r2 = 1 if spec.trace_outputs else spec.num_outputs**2

    def need(b: int) -> float:
        pairs = b if spec.diagonal else b * b
        worst = 0.0
        for layer, ts in layers.items():
            jac = max(
                (
                    2 * b * t.f1.g.shape[1] * t.f1.g.shape[3] * _dx(t.f1, t.vocab)
                    for t, gram in zip(ts, routes[layer])
                    if not gram
                ),
                default=0,
            )
            gram = max(
                (
                    pairs * t.f1.g.shape[2] * t.f2.g.shape[2] * (1 + r2)
                    for t, g in zip(ts, routes[layer])
                    if g
                ),
                default=0,
            )
            worst = max(worst, jac + gram)
        return (worst + len(layers) * pairs * r2) * item

    block = max(1, min(spec.block_size, n))
    while block > 1 and held + need(block) > spec.budget:
        block = (block + 1) // 2
    check_fits(
        held + need(block),
        spec.budget,
        "the structured eNTK (kernel, cotangents, one tile)",
        "select fewer parameters, use trace_outputs=True, or fewer samples",
    )
    return block


def _generic(
    view: FunctionalModel, x1: Inputs, x2: Inputs | None, spec: NTKSpec
) -> dict[str, Tensor]:
    """``"jacobian"`` kernels of the parameters of ``view`` alone."""
    row = spec.num_outputs * view.num_params * kernel_itemsize(view)
    block = block_size(row, spec.budget, spec.block_size)
    weights = {n: spec.weights[n] for n in view.names}
    return jacobian_ntk(view, x1, x2, replace(spec, weights=weights, block_size=block))
