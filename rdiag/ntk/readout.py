r"""The read-out identity: a traced eNTK over ``V`` outputs from ``D << V`` of them.

When the model's output is a linear read-out ``f_t = c W h_t + c_b b`` (``W`` of
shape ``(V, D)``, positions ``t``) of features ``h_t`` with ``D < V``, the traced
kernel sums ``sum_{t, v} df_tv df'_tv^T``. For every parameter below the
read-out, ``sum_v (dh_t^T c W_v)(c W_v^T dh'_t) = dh_t^T (c^2 W^T W) dh'_t``, so
its traced kernel over the ``V`` outputs equals the traced kernel of the ``r``
outputs ``L^T h_t`` with ``L L^T = c^2 W^T W`` (``r = rank W``; ``L`` from a
Cholesky factorization of the current ``W`` at every call): :class:`ReadoutView`.
The read-out's own parameters have closed forms, ``K_W[i, j] = c^2 V sum_t
h_it . h_jt`` and ``K_b[i, j] = c_b^2 T V``.

**Tied read-outs** (GPT-2: ``W`` is also the token embedding ``e_s = c_e
W_{x_s}``). ``W``'s gradient has two parts, its embedding use (inside ``h``,
kept in the reduced view) and its read-out use ``c e_v (x) h_t``; the kernel adds
their cross terms

.. math:: B(x, x') = c\, c_e\, M_W \sum_t a_t(x) \cdot h_t(x'), \qquad
    a_t(x) = \sum_s \Big(\frac{\partial h_t}{\partial e_s}\Big)^{\!\top} W_{x_s},

``K += B(x, x') + B(x', x)``: one vector-Jacobian product per pair of positions
``(t, s)`` (``T^2`` per sample, against the ``T V`` of the plain kernel).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from rdiag._inputs import Inputs, rows
from rdiag.functional import FunctionalModel, layer_of
from rdiag.parametrization import layer_scale
from rdiag.roles import readout_name

__all__ = [
    "Readout",
    "ReadoutView",
    "find_readout",
    "readout_features",
    "readout_kernels",
    "tied_kernels",
]

#: Output cotangent floats per chunk of the tied cross terms' products.
_TIED_CHUNK_FLOATS = 2**26


@dataclass(frozen=True)
class Readout:
    """A linear read-out whose output is the model's output.

    Attributes:
        name: Module path.
        module: The ``nn.Linear``.
        weight: Selected full name of its weight, or ``None`` if not selected.
        bias: Selected full name of its bias, or ``None``.
        embedding: The token embedding that shares its weight (a tied read-out),
            or ``None``.
    """

    name: str
    module: nn.Linear
    weight: str | None
    bias: str | None
    embedding: nn.Embedding | None = None

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


def _plain_embedding(module: nn.Module) -> bool:
    """An ``nn.Embedding`` whose gradient is the plain one (rows summed over uses)."""
    return (
        isinstance(module, nn.Embedding)
        and module.max_norm is None
        and not module.scale_grad_by_freq
    )


def find_readout(fm: FunctionalModel, x: Inputs) -> Readout | None:
    """The read-out, when the identity is exact and helps.

    The read-out is :func:`rdiag.roles.readout_name`'s (the last weight layer). The
    identity is exact when it is an ``nn.Linear`` whose output is the model
    output (a norm layer after it, a gain, makes the output nonlinear in the
    read-out's input: no identity), and it helps when the read-out widens
    (``in_features < out_features``) and its weight is its own or shared with one
    token embedding only (a tied read-out).

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

    name = readout_name(fm.module)
    module = None if name is None else fm.module.get_submodule(name)
    if not (isinstance(module, nn.Linear) and module.in_features < module.out_features):
        return None
    linears = [(name, module)]
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
    sharing = [
        m
        for m in fm.module.modules()
        if m is not module
        and any(p is module.weight for p in m.parameters(recurse=False))
    ]
    if len(sharing) > 1 or (sharing and not _plain_embedding(sharing[0])):
        return None
    canonical = {id(p): n for n, p in fm.module.named_parameters()}
    selected = set(fm.names)
    weight = canonical.get(id(module.weight))
    bias = None if module.bias is None else canonical.get(id(module.bias))
    return Readout(
        name,
        module,
        weight if weight in selected else None,
        bias if bias in selected else None,
        sharing[0] if sharing else None,
    )


class _ReachedReadout(Exception):
    """Raised by the read-out's pre-hook: the view's forward ends there."""


class ReadoutView(FunctionalModel):
    """The view whose output is ``h L`` (``h`` the read-out's input, ``L`` fixed per call).

    The parameters are those of the original view but the read-out's (a tied
    weight stays, for its embedding use). The forward stops when it reaches the
    read-out: neither the read-out (``N T V D`` multiply-adds for a vocabulary
    ``V``) nor anything after it runs, and the read-out is not a capture site
    (:attr:`skipped_modules`).
    """

    def __init__(self, fm: FunctionalModel, readout: Readout) -> None:
        own = {readout.bias} | (set() if readout.embedding else {readout.weight})
        super().__init__(
            fm.module,
            [n for n in fm.names if n not in own],
            mode=fm.mode,
            dtype=fm.dtype,
            dropout_seed=fm.dropout_seed,
            output_fn=fm.output_fn,
        )
        self.readout = readout
        self.basis: Tensor | None = None
        self.skipped_modules = frozenset({readout.name})

    def forward(self, params: Mapping[str, Tensor], x: Inputs) -> Tensor:
        """``h L`` of shape ``(N, ..., r)``, ``h`` the read-out's input."""
        captured: list[Tensor] = []

        def stop(module: nn.Module, args: tuple) -> None:
            captured.append(args[0])
            raise _ReachedReadout

        handle = self.readout.module.register_forward_pre_hook(stop)
        try:
            super().forward(params, x)
        except _ReachedReadout:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(
                f"expected the forward to reach the read-out {self.readout.name!r}, "
                "but it did not run; the read-out identity does not apply"
            )
        return captured[0] @ self.basis.to(captured[0].dtype)


def _features(view: ReadoutView, x: Inputs) -> Tensor:
    """``h (N, T, D)`` of the read-out on ``x`` (``T = 1`` for ``(N, D)``), with graph."""
    basis = view.basis
    view.basis = torch.eye(
        view.readout.module.in_features, dtype=view.param_dtype, device=view.device
    )
    try:
        h = view.forward(view.params, x)
    finally:
        view.basis = basis
    return h.reshape(h.shape[0], -1, h.shape[-1])


def readout_features(view: ReadoutView, x: Inputs) -> Tensor:
    """``h (N, T, D)`` (``T = 1`` for a ``(N, D)`` input) of the read-out on ``x``."""
    with torch.no_grad():
        return _features(view, x)


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
        ``{layer: (N1, N2) or (N1,)}`` by the layer of each parameter (empty if
        neither is selected).
    """
    c, cb = readout.scales()
    v, t = readout.module.out_features, h1.shape[1]
    out: dict[str, Tensor] = {}
    if readout.weight is not None and weights[readout.weight] != 0.0:
        k = _pairs(h1, h1 if h2 is None else h2, diagonal)
        out[layer_of(readout.weight)] = weights[readout.weight] * c * c * v * k
    if readout.bias is not None and weights[readout.bias] != 0.0:
        n2 = h1.shape[0] if h2 is None else h2.shape[0]
        shape = (h1.shape[0],) if diagonal else (h1.shape[0], n2)
        k = torch.full(shape, float(t * v), dtype=h1.dtype, device=h1.device)
        k = weights[readout.bias] * cb * cb * k
        layer = layer_of(readout.bias)
        out[layer] = out[layer] + k if layer in out else k
    return out


def _pairs(a: Tensor, b: Tensor, diagonal: bool) -> Tensor:
    """``sum_t a_it . b_jt``: ``(N1, N2)``, or ``(N1,)`` on the diagonal."""
    if diagonal:
        return (a * b).sum((1, 2))
    return torch.einsum("itd,jtd->ij", a, b)


def _cross_vectors(view: ReadoutView, x: Inputs) -> tuple[Tensor, Tensor]:
    r"""``a (N, T, D)`` of the tied cross terms (module docstring) and ``h (N, T, D)``.

    The embedding's outputs are tapped (``e_s + eps_s``) in every call; one
    product per position pair ``(t, s)`` pulls the cotangent ``W_{x_s}`` at
    ``h_t`` back to ``eps_s``, batched over the samples and chunked over pairs.
    """
    readout = view.readout
    w = readout.module.weight.detach().to(view.param_dtype)
    pad = readout.embedding.padding_idx
    calls: list[tuple[Tensor, Tensor]] = []

    def tap(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        eps = torch.zeros_like(out, requires_grad=True)
        calls.append((args[0], eps))
        return out + eps

    handle = readout.embedding.register_forward_hook(tap)
    try:
        with torch.enable_grad():
            h = _features(view, x)
    finally:
        handle.remove()
    n, t, d = h.shape
    a = torch.zeros_like(h, requires_grad=False)
    eps_list = [eps for _, eps in calls]

    def pull(cot: Tensor) -> tuple[Tensor, ...]:
        return torch.autograd.grad(
            h,
            eps_list,
            cot,
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )

    for c, (tokens, eps) in enumerate(calls):
        tokens = tokens.reshape(n, -1)
        rows_of_w = w[tokens]  # (N, S, D): the cotangent W_{x_s} of each pair
        if pad is not None:
            rows_of_w = rows_of_w * (tokens != pad).unsqueeze(-1).to(w.dtype)
        s_len = tokens.shape[1]
        pairs = torch.cartesian_prod(torch.arange(t), torch.arange(s_len))
        step = max(1, _TIED_CHUNK_FLOATS // max(1, n * t * d))
        for chunk in pairs.split(step):
            ts, ss = chunk[:, 0].to(h.device), chunk[:, 1].to(h.device)
            cots = h.new_zeros(len(chunk), n, t, d)
            cots[torch.arange(len(chunk)), :, ts] = rows_of_w[:, ss].transpose(0, 1)
            grads = vmap(pull)(cots)[c].reshape(len(chunk), n, s_len, d)
            picked = grads[torch.arange(len(chunk)), :, ss]  # (U, N, D)
            a.index_add_(1, ts, picked.transpose(0, 1).detach())
    return a, h.detach()


def tied_kernels(
    view: ReadoutView,
    x1: Inputs,
    x2: Inputs | None,
    weights: Mapping[str, float],
    diagonal: bool,
) -> dict[str, Tensor]:
    """The cross terms ``B(x1, x2) + B(x2, x1)`` of a tied read-out's two uses.

    Args:
        view: The reduced view of a tied read-out (its ``basis`` is not used).
        x1: ``(N1, ...)`` prepared inputs.
        x2: ``(N2, ...)``, or ``None`` for the symmetric kernel.
        weights: Parameter name -> weight ``M``.
        diagonal: Only ``K(x_i, x_i)``.

    Returns:
        ``{layer of W: (N1, N2) or (N1,)}``, empty if ``W`` is not selected.
    """
    readout = view.readout
    if readout.weight is None or weights[readout.weight] == 0.0:
        return {}
    c, _ = readout.scales()
    embed_scale = layer_scale(readout.embedding)
    c_e = 1.0 if embed_scale is None else embed_scale.weight
    a1, h1 = _cross_vectors(view, x1)
    a2, h2 = (a1, h1) if x2 is None else _cross_vectors(view, x2)
    k = _pairs(a1, h2, diagonal) + _pairs(h1, a2, diagonal)
    return {layer_of(readout.weight): weights[readout.weight] * c * c_e * k}
