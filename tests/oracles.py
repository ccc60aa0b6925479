"""Float64 brute force: the references every test compares against.

Everything here is dense and slow on purpose: autograd Jacobians over a flat
parameter vector, dense Hessians, and ``torch.linalg.eigh``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call


def flat_function(
    model: nn.Module, names: list[str], train: bool = False
) -> tuple[Tensor, Callable[[Tensor, Tensor], Tensor]]:
    """``(theta0, f)`` with ``f(theta, x) -> (N, O)`` over a flat float64 vector."""
    model = model.double()
    model.train(train)
    params = dict(model.named_parameters())
    theta0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    shapes = [params[n].shape for n in names]
    rest = {n: p.detach() for n, p in params.items() if n not in names}
    rest.update({n: b for n, b in model.named_buffers()})

    def f(theta: Tensor, x) -> Tensor:
        chunks = torch.split(theta, [s.numel() for s in shapes])
        ps = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        if isinstance(x, dict):
            out = functional_call(model, (ps, rest), (), x)
        else:
            out = functional_call(model, (ps, rest), (x,))
        out = getattr(out, "logits", out)  # a Hugging Face ModelOutput
        return out.reshape(out.shape[0], -1)

    return theta0, f


def _cast(x):
    if isinstance(x, dict):
        return {k: _cast(v) for k, v in x.items()}
    return x.double() if x.is_floating_point() else x


def _sample(x, i: int):
    if isinstance(x, dict):
        return {k: v[i : i + 1] for k, v in x.items()}
    return x[i : i + 1]


def _length(x) -> int:
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def per_sample_jacobian(model: nn.Module, names: list[str], x) -> Tensor:
    """Per-sample Jacobians ``(N, O, P)``, one autograd call per sample (eval mode).

    ``x`` is a tensor or a dict of tensors (keyword inputs, e.g. ``input_ids``).
    """
    theta0, f = flat_function(model, names)
    x = _cast(x)
    return torch.stack(
        [jacobian(lambda t: f(t, _sample(x, i))[0], theta0) for i in range(_length(x))]
    )


def batch_jacobian(
    model: nn.Module, names: list[str], x: Tensor, train: bool
) -> Tensor:
    """Jacobian of the whole-batch output ``(N, O, P)`` (batch-coupled models)."""
    theta0, f = flat_function(model, names, train=train)
    return jacobian(lambda t: f(t, _cast(x)), theta0)


def ntk_from_jacobians(j1: Tensor, j2: Tensor, weights: Tensor | None = None) -> Tensor:
    """Full eNTK ``(N1, N2, O, O)`` from ``(N, O, P)`` Jacobians and optional ``(P,)`` weights."""
    if weights is not None:
        j2 = j2 * weights
    return torch.einsum("iap,jbp->ijab", j1, j2)


def dense_hessian(
    model: nn.Module, names: list[str], loss_fn: Callable, x: Tensor, y: Tensor
) -> Tensor:
    """Dense ``(P, P)`` Hessian of ``loss_fn(model(x), y)`` over the named parameters."""
    theta0, f = flat_function(model, names)
    loss = lambda t: loss_fn(f(t, _cast(x)).reshape(len(x), -1), _cast(y))  # noqa: E731
    return hessian(loss, theta0, vectorize=True)


def dense_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors of a symmetric matrix, in float64."""
    vals, vecs = torch.linalg.eigh(matrix.double())
    return vals.flip(0), vecs.flip(1)
