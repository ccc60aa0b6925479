"""Large output spaces (rdiag/ntk/outputs.py): projections, the read-out identity, probes.

Projected kernels against a dense ``P J`` from the float64 oracle Jacobian; the
read-out identity against the direct traced kernel (rtol 1e-9, every
implementation, with parametrization multipliers and learning-rate weights);
output-probe estimates within 4 standard errors of the exact traced kernel,
seeded.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from rdiag import empirical_ntk, ntk_fn
from rdiag.ntk.outputs import KernelEstimate
from rdiag.ntk.readout import find_readout
from tests import oracles
from tests._assert import assert_close

F64 = {"rtol": 1e-9, "atol": 1e-10}


class _LM(nn.Module):
    """A tiny language model: embedding, one mixing layer, LayerNorm, untied read-out."""

    def __init__(self, vocab: int = 11, d: int = 4, tied: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)
        h = h + torch.tanh(self.mix(h)).cumsum(1)  # later positions see earlier ones
        return self.head(self.norm(h))


def _tokens(n: int, seed: int, t: int = 3, vocab: int = 11) -> Tensor:
    return torch.randint(
        0, vocab, (n, t), generator=torch.Generator().manual_seed(seed)
    )


def _jac(model: nn.Module, x: Tensor) -> Tensor:
    return oracles.per_sample_jacobian(
        model, [n for n, _ in model.named_parameters()], x
    )


@pytest.mark.parametrize("per_token", [False, True])
def test_projected_kernel_is_the_kernel_of_projected_outputs(per_token: bool) -> None:
    torch.manual_seed(0)
    model = _LM()
    x1, x2 = _tokens(4, 1), _tokens(3, 2)
    j1, j2 = _jac(model, x1), _jac(model, x2)  # (N, T*V, P)
    gen = torch.Generator().manual_seed(5)
    if per_token:
        p = torch.randn(2, 11, generator=gen, dtype=torch.float64)
        dense = torch.block_diag(*[p] * 3)  # (T k, T V)
    else:
        p = torch.randn(5, 33, generator=gen, dtype=torch.float64)
        dense = p
    pj1, pj2 = dense @ j1, dense @ j2
    expected = oracles.ntk_from_jacobians(pj1, pj2)
    for impl in ("structured", "jacobian", "ntvp"):
        got = empirical_ntk(
            model,
            x1,
            x2,
            projection=p,
            per_token=per_token,
            trace_outputs=False,
            implementation=impl,
            dtype=torch.float64,
        )
        assert_close(f"K_P {impl}", expected, got, **F64)
    with pytest.raises(ValueError, match="columns"):
        ntk_fn(model, projection=torch.ones(2, 7))(x1)
    with pytest.raises(ValueError, match="projection size k >= 1"):
        ntk_fn(model, projection=0)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("impl", ["structured", "jacobian", "ntvp"])
def test_readout_identity_is_exact(impl: str, tied: bool) -> None:
    from rdiag.parametrization import apply_parametrization

    torch.manual_seed(0)
    # Parametrizations refuse tied weights (one role per weight).
    model = (
        _LM(tied=True)
        if tied
        else apply_parametrization(_LM(), "r=0.25", width=4, init=False)
    )
    x1, x2 = _tokens(4, 1), _tokens(3, 2)
    weights = {"head": 0.5, "mix": 2.0, "embed": 3.0}
    kw = dict(implementation=impl, dtype=torch.float64, lr_multipliers=weights)
    direct = ntk_fn(model, readout_identity=False, **kw)
    reduced = ntk_fn(model, **kw)
    for a, b in ((x1, x2), (x1, None)):
        assert_close("traced", direct(a, b), reduced(a, b), **F64)
    plan = reduced.last_plan
    assert plan.readout is not None and (plan.readout.embedding is not None) == tied
    assert (
        "read-out identity" in reduced.explain() and "reduced to 4" in reduced.explain()
    )
    layers = ntk_fn(model, per_layer=True, **kw)(x1, x2)
    expected = ntk_fn(model, per_layer=True, readout_identity=False, **kw)(x1, x2)
    assert set(layers) == set(expected)
    for layer, k in expected.items():
        assert_close(f"layer {layer}", k, layers[layer], **F64)
    diag = ntk_fn(model, diagonal=True, **kw)(x1)
    assert_close("diagonal", direct(x1).diagonal(), diag, **F64)


def test_readout_identity_plan_carries_the_reduced_views_costs() -> None:
    torch.manual_seed(0)
    x = _tokens(4, 2)
    plan = ntk_fn(_LM(tied=True), dtype=torch.float64).plan(x)
    assert plan.readout is not None and plan.costs is not None
    inner = plan.inner.plan(x)
    assert plan.costs == inner.costs and plan.implementation == inner.implementation


def test_tied_readout_identity_against_the_oracle() -> None:
    torch.manual_seed(0)
    model = _LM(tied=True)
    model.embed.padding_idx = 0  # its row gets no gradient from the embedding
    x1, x2 = _tokens(4, 1), _tokens(3, 2)
    x1[0, 1] = 0
    oracle = oracles.ntk_from_jacobians(_jac(model, x1), _jac(model, x2))
    got = ntk_fn(model, dtype=torch.float64)(x1, x2)
    assert_close("tied, padded", oracle.diagonal(dim1=2, dim2=3).sum(-1), got, **F64)


def test_readout_identity_needs_a_widening_readout_tied_to_an_embedding_at_most() -> (
    None
):
    x = _tokens(2, 1)
    tied = ntk_fn(_LM(tied=True))
    tied(x)
    assert tied.last_plan.readout.embedding is tied.fm.module.embed
    shared = _LM()
    shared.mix.weight = nn.Parameter(torch.randn(4, 4))
    other = nn.Linear(4, 11)
    other.weight = shared.head.weight  # shared with a module that is no embedding
    shared.other = other
    fm_shared = ntk_fn(shared).fm
    assert find_readout(fm_shared, fm_shared.cast_input(x)) is None
    from rdiag.functional import functionalize

    narrow = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    fm = functionalize(narrow)
    assert find_readout(fm, fm.cast_input(torch.randn(2, 5))) is None


def test_output_probes_estimate_the_traced_kernel_within_their_error_bars() -> None:
    torch.manual_seed(0)
    model = _LM()
    x = _tokens(5, 1)
    exact = empirical_ntk(model, x, dtype=torch.float64, readout_identity=False)
    est = ntk_fn(model, output_probes=64, seed=3, dtype=torch.float64)(x)
    assert isinstance(est, KernelEstimate) and est.num_probes == 64
    assert est.kernel.shape == exact.shape == est.std_err.shape
    z = (est.kernel - exact).abs() / est.std_err
    assert float(z.max()) < 4.5, float(z.max())
    again = ntk_fn(model, output_probes=64, seed=3, dtype=torch.float64)(x)
    assert torch.equal(est.kernel, again.kernel)  # seeded
    with pytest.raises(ValueError, match="output_probes with trace_outputs=True"):
        ntk_fn(model, output_probes=4, trace_outputs=False)


def test_a_large_output_space_without_the_identity_is_said_once() -> None:
    torch.manual_seed(0)

    class Scaled(nn.Module):
        """A wide read-out whose output is not the model's: no read-out identity."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5000, 4)
            self.head = nn.Linear(4, 5000, bias=False)

        def forward(self, tokens: Tensor) -> Tensor:
            return 2 * self.head(torch.tanh(self.embed(tokens)))

    kernel = ntk_fn(Scaled(), params="embed.*")
    x = torch.randint(0, 5000, (2, 1))
    with pytest.warns(UserWarning, match="output_probes=k"):
        kernel.plan(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernel.plan(torch.randint(0, 5000, (3, 1)))  # said once per handle
