"""The structured (layerwise Gram-Hadamard) eNTK against the float64 brute force.

Every case builds per-sample Jacobians with ``tests/oracles.py`` and compares with
``assert_close``. Tolerances: float64 runs agree with the oracle to rtol=1e-9,
atol=1e-10 (only the summation order differs); the float32 run to rtol=1e-4,
atol=1e-5. Every zoo model runs with the cost model's routes; the models with
weight sharing, norms and embeddings also with every term forced onto the Gram
route and onto the per-sample-gradient route.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdiag import empirical_ntk, functionalize, ntk_fn
from rdiag.ntk import structured
from rdiag.ntk.spec import NTKSpec
from rdiag.ntk._capture import plan_structured
from rdiag.ntk.handle import structured_coverage
from rdiag.ntk.structured import structured_ntk
from tests import oracles
from tests._assert import assert_close
from tests.models import ZOO

F64 = {"rtol": 1e-9, "atol": 1e-10}
KW = {"implementation": "structured", "dtype": torch.float64}


def _traced(full: Tensor) -> Tensor:
    return full.diagonal(dim1=-2, dim2=-1).sum(-1)


def _jac(model: nn.Module, x: Tensor, names: list[str] | None = None) -> Tensor:
    names = names or [n for n, p in model.named_parameters() if p.requires_grad]
    return oracles.per_sample_jacobian(model, names, x)


def _columns(fm, names) -> Tensor:
    """Columns of the flat oracle Jacobian that belong to ``names``."""
    cols, start = [], 0
    for n in fm.names:
        size = fm.params[n].numel()
        if n in names:
            cols.append(torch.arange(start, start + size))
        start += size
    return torch.cat(cols)


def _fallback_notices(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "structured eNTK" in str(w.message)]


@functools.cache
def _zoo_case(name: str) -> tuple[nn.Module, Tensor, Tensor, Tensor, Tensor]:
    """A zoo model, two batches and their oracle Jacobians (shared by the route tests)."""
    model, make = ZOO[name](0)
    x1, x2 = make(5, 1), make(3, 2)
    return model, x1, x2, _jac(model, x1), _jac(model, x2)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_matches_oracle(name: str) -> None:
    _check_zoo(name)


@pytest.mark.parametrize("name", ["cnn", "attention", "embedding", "layernorm"])
def test_zoo_with_forced_routes(name: str, route: str) -> None:
    _check_zoo(name)


def _check_zoo(name: str) -> None:
    model, x1, x2, j1, j2 = _zoo_case(name)
    full, sym = oracles.ntk_from_jacobians(j1, j2), oracles.ntk_from_jacobians(j1, j1)
    fm = functionalize(model, dtype=torch.float64)
    assert structured_coverage(fm) == 1.0
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert_close(
            f"{name} full",
            full,
            empirical_ntk(fm, x1, x2, trace_outputs=False, **KW),
            **F64,
        )
        assert_close(
            f"{name} traced", _traced(full), empirical_ntk(fm, x1, x2, **KW), **F64
        )
        assert_close(
            f"{name} symmetric",
            sym,
            empirical_ntk(fm, x1, trace_outputs=False, **KW),
            **F64,
        )
        diag = empirical_ntk(fm, x1, trace_outputs=False, diagonal=True, **KW)
        assert_close(
            f"{name} diagonal", sym.diagonal(0, 0, 1).permute(2, 0, 1), diag, **F64
        )
        assert_close(
            f"{name} traced diagonal",
            _traced(diag),
            empirical_ntk(fm, x1, diagonal=True, **KW),
            **F64,
        )
        layers = empirical_ntk(fm, x1, x2, per_layer=True, **KW)
    assert not _fallback_notices(record), "a zoo model fell back to the generic path"
    assert list(layers) == list(fm.groups)
    for layer, group in fm.groups.items():
        cols = _columns(fm, group)
        ref = _traced(oracles.ntk_from_jacobians(j1[..., cols], j2[..., cols]))
        assert_close(f"{name} layer {layer}", ref, layers[layer], **F64)
    assert_close(f"{name} per-layer sum", _traced(full), sum(layers.values()), **F64)


def test_weights_and_parameter_subsets(route: str) -> None:
    model, make = ZOO["cnn"](0)
    x1, x2 = make(4, 1), make(3, 2)
    names = [n for n, _ in model.named_parameters()]
    j1, j2 = _jac(model, x1, names), _jac(model, x2, names)
    fm = functionalize(model, dtype=torch.float64)
    for weights in [
        {"0": 2.0, "2.bias": 0.5, "5.*": 3.0},
        {"0.weight": 0.0, "2.bias": 0.0},
    ]:
        w = torch.cat(
            [
                torch.full((fm.params[n].numel(),), v)
                for n, v in fm.param_weights(weights).items()
            ]
        )
        ref = oracles.ntk_from_jacobians(j1, j2, w.double())
        got = empirical_ntk(
            fm, x1, x2, trace_outputs=False, lr_multipliers=weights, **KW
        )
        assert_close(f"weights {weights}", ref, got, **F64)
    layers = empirical_ntk(fm, x1, x2, per_layer=True, lr_multipliers={"2": 0.0}, **KW)
    assert "2" not in layers, "a layer with zero weight is left out, as in 'jacobian'"
    for selector, picked in [
        ("5.*", ["5.weight", "5.bias"]),
        (["0.weight", "2.bias"], ["0.weight", "2.bias"]),
    ]:
        cols = _columns(fm, picked)
        ref = _traced(oracles.ntk_from_jacobians(j1[..., cols], j2[..., cols]))
        assert_close(
            f"subset {picked}",
            ref,
            empirical_ntk(model, x1, x2, params=selector, **KW),
            **F64,
        )


def test_blocking_and_budget_keep_the_result_exact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, x1, x2, j1, j2 = _zoo_case("attention")
    sym, cross = oracles.ntk_from_jacobians(j1, j1), oracles.ntk_from_jacobians(j1, j2)
    kw = {"trace_outputs": False, **KW}
    # 5 samples in blocks of 2: ragged last tile, lower triangle mirrored.
    blocked = empirical_ntk(model, x1, block_size=2, **kw)
    assert_close("blocked symmetric", sym, blocked, **F64)
    blocked = empirical_ntk(model, x1, x2, block_size=2, **kw)
    assert_close("blocked cross", cross, blocked, **F64)
    diag = empirical_ntk(model, x1, diagonal=True, block_size=2, **kw)
    assert_close(
        "blocked diagonal", sym.diagonal(0, 0, 1).permute(2, 0, 1), diag, **F64
    )
    fm = functionalize(model, dtype=torch.float64)
    blocks = []
    original = structured._block
    monkeypatch.setattr(
        structured, "_block", lambda *a: blocks.append(original(*a)) or blocks[-1]
    )
    # 2e5 bytes hold the kernel and the capture (cotangents and the backward's
    # transient), with room for 3 x 3 tiles only (a ragged second tile).
    spec = NTKSpec(False, False, fm.param_weights(None), 5, 2.0e5, 8)
    x1 = fm.cast_input(x1)
    plan = plan_structured(fm, x1, 8, spec.weights)
    tight = sum(structured_ntk(fm, x1, None, spec, plan).values())
    assert blocks == [3], (
        f"expected the budget to force 3 x 3 tiles, got blocks {blocks}"
    )
    assert_close("budget-limited tiles", sym, tight, **F64)
    spec = NTKSpec(False, False, fm.param_weights(None), 5, 1.0e4, 8)
    with pytest.raises(MemoryError, match="fewer samples"):
        structured_ntk(fm, x1, None, spec, plan)


class _Twice(nn.Module):
    """One Linear applied twice (its Jacobian sums both uses), and a norm gain reused."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 5)
        self.shared = nn.Linear(5, 5)
        self.norm = nn.LayerNorm(5)
        self.out = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.norm(self.inp(x)))
        h = torch.tanh(self.shared(h))
        return self.out(self.norm(self.shared(h)))


class _Tied(nn.Module):
    """Token embedding tied with the per-token readout (a tiny language model)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4, padding_idx=0)
        self.hidden = nn.Linear(4, 4)
        self.readout = nn.Linear(4, 7)
        self.readout.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.readout(torch.tanh(self.hidden(self.embed(tokens))))


class _Scale(nn.Module):
    """A custom module with its own parameter: no structured rule."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gain


class _Reused(nn.Module):
    """A Linear weight also used outside the Linear's forward: caught by the check."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.lin(x))
        return self.out(torch.tanh(F.linear(h, self.lin.weight)))


def _tokens(n: int, seed: int, vocab: int = 7, t: int = 3) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=gen)


def _normal(n: int, seed: int, *shape: int) -> Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def _check_against_oracle(model: nn.Module, x1: Tensor, x2: Tensor) -> list[str]:
    """Check one handle's kernel (called twice) and the per-layer kernels; the
    handle's notices: a fallback is said once per handle."""
    j1, j2 = _jac(model, x1), _jac(model, x2)
    full = oracles.ntk_from_jacobians(j1, j2)
    kernel = ntk_fn(model, trace_outputs=False, **KW)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = kernel(x1, x2)
        assert_close("second call", got, kernel(x1, x2), rtol=0, atol=0)
    again = empirical_ntk(model, x1, x2, per_layer=True, **KW)
    assert_close(f"{type(model).__name__} full", full, got, **F64)
    assert_close(
        f"{type(model).__name__} per-layer sum",
        _traced(full),
        sum(again.values()),
        **F64,
    )
    return _fallback_notices(record)


def test_module_called_twice_is_exact_without_fallback() -> None:
    torch.manual_seed(0)
    notices = _check_against_oracle(_Twice(), _normal(4, 1, 3), _normal(3, 2, 3))
    assert notices == []


def test_tied_embedding_readout_sums_both_uses(route: str) -> None:
    """An embedding table reused as the read-out: both uses and their cross terms."""
    torch.manual_seed(0)
    model = _Tied()
    fm = functionalize(model)
    tokens1, tokens2 = _tokens(4, 1), _tokens(3, 2)
    tokens1[0, 0] = 0  # a padding token: zero gradient row
    assert structured_coverage(fm) == 1.0
    assert structured_coverage(fm, tokens1) == 1.0
    notices = _check_against_oracle(model, tokens1, tokens2)
    assert notices == [], notices
    diag = empirical_ntk(model, tokens1, diagonal=True, trace_outputs=False, **KW)
    full = empirical_ntk(model, tokens1, trace_outputs=False, **KW)
    assert_close("tied diagonal", full.diagonal(0, 0, 1).permute(2, 0, 1), diag, **F64)


def test_uncovered_module_falls_back_once_per_handle() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), _Scale(6), nn.Tanh(), nn.Linear(6, 2))
    fm = functionalize(model)
    assert structured_coverage(fm) == pytest.approx(1 - 6 / fm.num_params)
    notices = _check_against_oracle(model, _normal(4, 1, 3), _normal(3, 2, 3))
    assert len(notices) == 1 and "_Scale" in notices[0], notices


def test_parameter_used_outside_its_forward_is_caught_and_exact() -> None:
    torch.manual_seed(0)
    notices = _check_against_oracle(_Reused(), _normal(4, 1, 4), _normal(3, 2, 4))
    assert len(notices) == 1 and "gradient check" in notices[0], notices


class _Mixed(nn.Module):
    """Conv1d/Conv2d with stride, dilation, 'same' padding; GroupNorm, RMSNorm, 2-group conv."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(1, 3, 3, dilation=2, padding="same")
        self.c3 = nn.Conv2d(3, 4, (2, 3), stride=(2, 1), padding=(1, 0))
        self.gn = nn.GroupNorm(2, 4)
        self.grouped = nn.Conv2d(4, 4, 1, groups=2)
        self.rms = nn.RMSNorm(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        a = torch.tanh(self.c1(x))  # (N, 4, 3)
        b = torch.tanh(self.c2(a.unsqueeze(1)))  # (N, 3, 4, 3)
        c = self.grouped(torch.tanh(self.gn(self.c3(b))))  # (N, 4, 3, 1)
        h = torch.tanh(self.rms(c.flatten(1)[:, :6]))
        return self.out(h)


def test_conv_variants_and_norms(route: str) -> None:
    torch.manual_seed(0)
    model = _Mixed()
    with torch.no_grad():
        model.gn.weight.normal_(1.0, 0.3)
        model.rms.weight.normal_(1.0, 0.3)
    fm = functionalize(model)
    assert structured_coverage(fm) == 1.0
    notices = _check_against_oracle(model, _normal(4, 1, 2, 6), _normal(3, 2, 2, 6))
    assert notices == [], notices


def test_float32_matches_float64_oracle() -> None:
    model, make = ZOO["mlp_gelu"](0)
    x1, x2 = make(5, 1), make(3, 2)
    model32 = ZOO["mlp_gelu"](0)[0]
    full = oracles.ntk_from_jacobians(_jac(model, x1), _jac(model, x2))
    got = empirical_ntk(
        model32, x1, x2, trace_outputs=False, implementation="structured"
    )
    assert got.dtype == torch.float32
    assert_close("float32", full, got, rtol=1e-4, atol=1e-5)


def test_batch_coupled_model_goes_to_the_generic_path() -> None:
    model, make = ZOO["batchnorm"](0)
    x = make(6, 1)
    names = [n for n, _ in model.named_parameters()]
    j = oracles.batch_jacobian(model, names, x, train=True)
    fm = functionalize(model, mode="train", dtype=torch.float64)
    assert fm.batch_coupled and structured_coverage(fm) == 0.0
    got = empirical_ntk(fm, x, trace_outputs=False, implementation="structured")
    assert_close("batch-coupled", oracles.ntk_from_jacobians(j, j), got, **F64)


def test_diagonal_with_x2_is_an_error() -> None:
    model, make = ZOO["mlp_tanh"](0)
    kernel = ntk_fn(model, diagonal=True, implementation="structured")
    with pytest.raises(ValueError, match="drop x2"):
        kernel(make(4, 1), make(4, 2))


def test_bias_is_folded_into_its_weight_one_gram_per_layer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, make = ZOO["mlp_tanh"](0)
    x1, x2 = make(5, 1), make(3, 2)
    calls = []
    original = structured.gram_hadamard_many

    def spy(terms, *args, **kwargs):
        calls.append([t[0].shape for t in terms])
        return original(terms, *args, **kwargs)

    monkeypatch.setattr(structured, "gram_hadamard_many", spy)
    weights = {"0.bias": 0.0, "2": 2.0, "4.weight": 0.5}
    fm = functionalize(model, dtype=torch.float64)
    got = empirical_ntk(fm, x1, x2, lr_multipliers=weights, **KW)
    # Layer 0 has only its weight (bias weight 0); layers 2 and 4 carry a ones column;
    # all three Linear terms go to one gram_hadamard_many call.
    assert [[s[1] for s in c] for c in calls] == [[5, 7 + 1, 6 + 1]], calls
    w = torch.cat(
        [
            torch.full((fm.params[n].numel(),), v)
            for n, v in fm.param_weights(weights).items()
        ]
    )
    ref = oracles.ntk_from_jacobians(_jac(model, x1), _jac(model, x2), w.double())
    assert_close("folded bias", _traced(ref), got, **F64)


class _MHA(nn.Module):
    """nn.MultiheadAttention (packed in_proj_weight, out_proj used functionally) + readout.

    Self-attention with a causal mask and a key padding mask, then cross-attention
    to a memory of another length with the averaged attention weights fed on.
    """

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.cross = nn.MultiheadAttention(4, 2, batch_first=True, bias=False)
        self.memory = nn.Linear(4, 4)
        self.readout = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool).triu(1)
        pad = torch.zeros(x.shape[0], t, dtype=torch.bool)
        pad[:, -1] = True
        h = self.attn(
            x, x, x, attn_mask=causal, key_padding_mask=pad, need_weights=False
        )[0]
        mem = torch.tanh(self.memory(x[:, :2]))
        out, weights = self.cross(h, mem, mem)
        return self.readout(out + weights.sum(-1, keepdim=True))


def test_multihead_attention_is_structured(route: str) -> None:
    torch.manual_seed(0)
    model = _MHA()
    fm = functionalize(model)
    assert structured_coverage(fm) == 1.0
    notices = _check_against_oracle(model, _normal(3, 1, 3, 4), _normal(2, 2, 3, 4))
    assert notices == [], notices


class _SequenceFirst(nn.Module):
    """A batch-first model around a sequence-first nn.MultiheadAttention."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2)
        self.readout = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = x.transpose(0, 1)
        return self.readout(self.attn(h, h, h)[0].transpose(0, 1))


def test_sequence_first_multihead_attention_falls_back() -> None:
    torch.manual_seed(0)
    model = _SequenceFirst()
    fm = functionalize(model)
    linear = sum(p.numel() for p in model.readout.parameters())
    assert structured_coverage(fm) == pytest.approx(linear / fm.num_params)
    with pytest.warns(UserWarning, match="batch_first=False"):
        notices = _check_against_oracle(model, _normal(3, 1, 3, 4), _normal(2, 2, 3, 4))
    assert len(notices) == 1 and "batch_first=False" in notices[0], notices


class _PaddedEmbedding(nn.Module):
    """Embedding with a padding row (zero gradient), used per token, then a readout."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4, padding_idx=2)
        self.readout = nn.Linear(4, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.readout(torch.tanh(self.embed(tokens)))


def test_embedding_padding_row_gets_no_gradient(route: str) -> None:
    torch.manual_seed(0)
    tokens1, tokens2 = _tokens(4, 1), _tokens(3, 2)
    tokens1[:, 0] = 2
    tokens2[1] = 2
    assert _check_against_oracle(_PaddedEmbedding(), tokens1, tokens2) == []


def test_traced_kernel_is_accumulated_over_chunks_of_outputs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, x1, x2, j1, j2 = _zoo_case("attention")
    fm = functionalize(model, dtype=torch.float64)
    seen = []
    original = structured.capture

    def spy(*args, **kwargs):
        seen.append(kwargs.get("outputs"))
        return original(*args, **kwargs)

    monkeypatch.setattr(structured, "capture", spy)
    # 8 outputs; the cotangents take about 1e4 bytes per output unit here.
    kw = {"memory_budget": 6e4, **KW}
    cross = empirical_ntk(fm, x1, x2, **kw)
    assert len({s.start for s in seen if s is not None}) > 1, seen
    full = oracles.ntk_from_jacobians(j1, j2)
    assert_close("output-chunked traced", _traced(full), cross, **F64)
    sym = oracles.ntk_from_jacobians(j1, j1)
    diag = empirical_ntk(fm, x1, diagonal=True, **kw)
    assert_close("output-chunked diagonal", _traced(sym).diagonal(), diag, **F64)
    with pytest.raises(MemoryError, match="accumulated over chunks of output units"):
        empirical_ntk(fm, x1, x2, trace_outputs=False, **kw)


@pytest.mark.parametrize("family", ["mlp", "cnn", "transformer"])
@pytest.mark.parametrize("param", ["ntk", "mf"])
def test_parameterization_multipliers_stay_structured(family: str, param: str) -> None:
    """Forward multipliers of rdiag.parametrization hooks scale the captured factors."""
    from rdiag.models import make_model
    from rdiag.parametrization import parse_parametrization

    model = make_model(family, 16, parametrization=parse_parametrization(param), seed=0)
    x = model.sample_inputs(5, torch.Generator().manual_seed(1))
    names = [n for n, _ in model.named_parameters()]
    j = oracles.per_sample_jacobian(model, names, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        k = empirical_ntk(
            model,
            x,
            implementation="structured",
            trace_outputs=False,
            dtype=torch.float64,
        )
    assert_close(
        f"{family} {param}", oracles.ntk_from_jacobians(j, j), k, rtol=1e-9, atol=1e-10
    )


def test_structured_coverage_of_a_plain_module_builds_its_view() -> None:
    from rdiag import functionalize
    from rdiag.ntk.handle import structured_coverage

    net = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    )
    x = torch.randn(5, 3)
    assert structured_coverage(net) == structured_coverage(functionalize(net)) == 1.0
    assert structured_coverage(net, x) == structured_coverage(functionalize(net), x)
