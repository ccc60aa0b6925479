"""Baselines measured against rdiag in the same run (single copy for every bench).

The torch.func tutorial recipes ("Neural Tangent Kernels" tutorial) and dense
autograd; nothing here is used by the library.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap


def tutorial_jacobian_ntk(
    model: nn.Module,
    x1: Tensor | dict[str, Tensor],
    x2: Tensor | dict[str, Tensor],
    trace: bool,
) -> Tensor:
    """The tutorial's ``empirical_ntk_jacobian_contraction``: vmap(jacrev) + einsum.

    Keyword inputs (a dict of ``(N, ...)`` tensors, as Hugging Face models take)
    are vmapped together; a model output with ``.logits`` is read there, flattened.
    """
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p: dict, x: Tensor | dict[str, Tensor]) -> Tensor:
        if isinstance(x, dict):
            out = functional_call(model, p, (), {k: v[None] for k, v in x.items()})
        else:
            out = functional_call(model, p, (x.unsqueeze(0),))
        return getattr(out, "logits", out).reshape(-1)

    jac1 = vmap(jacrev(f), (None, 0))(params, x1)
    jac2 = vmap(jacrev(f), (None, 0))(params, x2)
    jac1 = [j.flatten(2) for j in jac1.values()]
    jac2 = [j.flatten(2) for j in jac2.values()]
    eq = "Naf,Maf->NM" if trace else "Naf,Mbf->NMab"
    return torch.stack([torch.einsum(eq, a, b) for a, b in zip(jac1, jac2)]).sum(0)


# ---------------------------------------------------------------- rdiag.kernels baselines


def unfused_gram_hadamard(x1: Tensor, x2: Tensor, g1: Tensor, g2: Tensor) -> Tensor:
    """Both Grams in memory, then their product: ``(N1, N2, R, R)``.

    ``x1 (N1, Dx)``, ``g1 (N1, R, Dg)``; the naive form of the fused kernel.
    """
    n1, r, dg = g1.shape
    gg = (g1.reshape(n1 * r, dg) @ g2.reshape(-1, dg).T).reshape(n1, r, len(g2), r)
    return (x1 @ x2.T)[:, :, None, None] * gg.permute(0, 2, 1, 3)


def unfused_gram_hadamard_shared(
    x1: Tensor, x2: Tensor, g1: Tensor, g2: Tensor
) -> Tensor:
    """Whole ``(N1 T1) x (N2 T2)`` token Grams in memory, then the pair sums.

    ``x1 (N1, T1, Dx)``, ``g1 (N1, R, T1, Dg)``; returns ``(N1, N2, R, R)``.
    """
    (n1, t1, dx), (n2, t2, _) = x1.shape, x2.shape
    r, dg = g1.shape[1], g1.shape[3]
    xx = (x1.reshape(-1, dx) @ x2.reshape(-1, dx).T).reshape(n1, t1, n2, t2)
    gg = (g1.reshape(-1, dg) @ g2.reshape(-1, dg).T).reshape(n1, r, t1, n2, r, t2)
    return torch.einsum("itju,iatjbu->ijab", xx, gg)


def gram_matmuls(
    x1: Tensor, x2: Tensor, g1: Tensor, g2: Tensor
) -> tuple[Tensor, Tensor]:
    """The two cuBLAS GEMMs of the Gram-Hadamard product alone (a throughput bound)."""
    dg = g1.shape[-1]
    return x1 @ x2.T, g1.reshape(-1, dg) @ g2.reshape(-1, dg).T


def separate_kernel_stats(k0: Tensor, k1: Tensor) -> dict[str, Tensor]:
    """The sums of ``rdiag.kernels.kernel_stats`` as separate torch reductions."""
    return {
        "inner": (k0 * k1).sum(),
        "sq_norm0": k0.square().sum(),
        "sq_norm1": k1.square().sum(),
        "sq_diff": (k1 - k0).square().sum(),
        "row0": k0.sum(1),
        "row1": k1.sum(1),
        "col0": k0.sum(0),
        "col1": k1.sum(0),
        "sum0": k0.sum(),
        "sum1": k1.sum(),
    }


# ---------------------------------------------------------------- coordinate-check baselines


def plain_width_sweep(
    widths: list[int],
    seeds: int,
    steps: int,
    lr: float,
    x: Tensor,
    y: Tensor,
    record_activations: bool = False,
) -> list[float]:
    """The same tanh MLPs (``d_in -> n -> n -> d_out``, muP table init) trained with
    per-layer SGD rates in plain torch: the bare training cost of a coordinate check.

    With ``record_activations`` it also records every layer's mean ``|h|`` at every
    step through forward hooks (the mup package's ``get_coord_data`` style check).
    Returns the recorded values (empty without recording).
    """
    d_in, d_out, out = x.shape[1], y.shape[1], []
    for n in widths:
        for seed in range(seeds):
            torch.manual_seed(seed)
            net = nn.Sequential(
                nn.Linear(d_in, n),
                nn.Tanh(),
                nn.Linear(n, n),
                nn.Tanh(),
                nn.Linear(n, d_out),
            )
            with torch.no_grad():
                for layer, std in zip(net[::2], (d_in**-0.5, n**-0.5, n**-1.0)):
                    layer.weight.normal_(0.0, std)
                    layer.bias.zero_()
            rates = (n / d_in, 1.0, 1.0 / n)
            opt = torch.optim.SGD(
                [
                    {"params": layer.parameters(), "lr": lr * s}
                    for layer, s in zip(net[::2], rates)
                ]
            )
            hooks = [
                m.register_forward_hook(
                    lambda _m, _i, o: out.append(float(o.abs().mean()))
                )
                for m in net[::2]
                if record_activations
            ]
            for _ in range(steps):
                opt.zero_grad()
                (0.5 * (net(x) - y).pow(2).sum(1).mean()).backward()
                opt.step()
            for h in hooks:
                h.remove()
    return out


# ---------------------------------------------------------------- harness / Monitor baselines


def dense_operator_norm(w: Tensor) -> float:
    """Spectral norm by a full SVD (``torch.linalg.matrix_norm(ord=2)``)."""
    return float(torch.linalg.matrix_norm(w, ord=2))


def sqlite_row_per_commit(path: str, rows: list[tuple]) -> None:
    """Naive logging: one INSERT and one commit per scalar (default journal)."""
    import sqlite3

    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE IF NOT EXISTS scalars (run TEXT, step INTEGER, metric TEXT, "
        "layer TEXT, value REAL)"
    )
    for row in rows:
        conn.execute("INSERT INTO scalars VALUES (?, ?, ?, ?, ?)", row)
        conn.commit()
    conn.close()


def sgd_steps(model: nn.Module, x: Tensor, y: Tensor, steps: int, lr: float) -> None:
    """Plain full-batch SGD on MSE: the training cost a Monitor check is compared with."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def loss_gradient(model: nn.Module, loss_fn, x: Tensor, y: Tensor) -> list[Tensor]:
    """One gradient of the loss by plain autograd: the unit an HVP's cost is measured in."""
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss_fn(model(x), y), params))


def pyhessian_style_power(
    model: nn.Module,
    loss_fn,
    x: Tensor,
    y: Tensor,
    max_iter: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
) -> tuple[float, int]:
    """PyHessian's recipe for the top eigenvalue: double-backward HVPs, power iteration.

    Stops when the eigenvalue estimate changes by less than ``tol`` relative
    (PyHessian's defaults: ``maxIter=100, tol=1e-3``). Returns ``(eigenvalue, HVPs)``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]
    norm = torch.sqrt(sum((u * u).sum() for u in v))
    v = [u / norm for u in v]
    eigenvalue, count = None, 0
    for _ in range(max_iter):
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        count += 1
        new = float(sum((a * b).sum() for a, b in zip(hv, v)))
        norm = torch.sqrt(sum((u * u).sum() for u in hv))
        v = [u / norm for u in hv]
        if (
            eigenvalue is not None
            and abs(new - eigenvalue) / (abs(eigenvalue) + 1e-6) < tol
        ):
            eigenvalue = new
            break
        eigenvalue = new
    return float(eigenvalue), count


def scipy_eigsh_top(operator, tol: float = 1e-6) -> tuple[float, int]:
    """``scipy.sparse.linalg.eigsh(which="LA", k=1)`` (ARPACK) on ``operator.to_scipy()``.

    Returns ``(eigenvalue, products)``; the curvlinops + scipy route.
    """
    from scipy.sparse.linalg import LinearOperator, eigsh

    inner = operator.to_scipy()
    count = [0]

    def mv(v):
        count[0] += 1
        return inner.matvec(v)

    wrapped = LinearOperator(inner.shape, matvec=mv, dtype="float64")
    vals = eigsh(wrapped, k=1, which="LA", tol=tol, return_eigenvectors=False)
    return float(vals[0]), count[0]
