"""Baselines measured against rdiag in the same run (single copy for every bench).

The torch.func tutorial recipes ("Neural Tangent Kernels" tutorial) and dense
autograd; nothing here is used by the library.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap


def tutorial_jacobian_ntk(model: nn.Module, x1: Tensor, x2: Tensor, trace: bool) -> Tensor:
    """The tutorial's ``empirical_ntk_jacobian_contraction``: vmap(jacrev) + einsum."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p: dict, x: Tensor) -> Tensor:
        return functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

    jac1 = vmap(jacrev(f), (None, 0))(params, x1)
    jac2 = vmap(jacrev(f), (None, 0))(params, x2)
    jac1 = [j.flatten(2) for j in jac1.values()]
    jac2 = [j.flatten(2) for j in jac2.values()]
    eq = "Naf,Mbf->NM" if trace else "Naf,Mbf->NMab"
    return torch.stack([torch.einsum(eq, a, b) for a, b in zip(jac1, jac2)]).sum(0)
