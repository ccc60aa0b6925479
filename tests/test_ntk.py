"""empirical_ntk against the float64 autograd brute force (tests/oracles.py).

Tolerances: float64 paths agree with the oracle to rtol=1e-9, atol=1e-10 (they
differ only in summation order); float32 paths to rtol=1e-4, atol=1e-5.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from rdiag import empirical_ntk, functionalize
from rdiag.ntk.planning import NTKImplementation
from tests import oracles
from tests._assert import assert_close
from tests.models import ZOO

F64 = dict(rtol=1e-9, atol=1e-10)
GENERIC = ["jacobian", "ntvp"]


def _setup(name: str, n1: int = 5, n2: int = 3):
    model, make = ZOO[name](0)
    names = [n for n, _ in model.named_parameters()]
    return model, make(n1, 1), make(n2, 2), names


def _traced(full: torch.Tensor) -> torch.Tensor:
    return full.diagonal(dim1=-2, dim2=-1).sum(-1)


@pytest.mark.parametrize("impl", GENERIC)
@pytest.mark.parametrize("name", list(ZOO))
def test_cross_kernel_full_and_traced_match_oracle(name: str, impl: str) -> None:
    model, x1, x2, names = _setup(name)
    j1 = oracles.per_sample_jacobian(model, names, x1)
    j2 = oracles.per_sample_jacobian(model, names, x2)
    full = oracles.ntk_from_jacobians(j1, j2)
    kw = dict(implementation=impl, dtype=torch.float64)
    assert_close(
        f"{name} full",
        full,
        empirical_ntk(model, x1, x2, trace_outputs=False, **kw),
        **F64,
    )
    assert_close(
        f"{name} traced", _traced(full), empirical_ntk(model, x1, x2, **kw), **F64
    )


@pytest.mark.parametrize("impl", GENERIC)
@pytest.mark.parametrize("name", ["mlp_tanh", "cnn", "attention", "embedding"])
def test_symmetric_blocked_diagonal_per_layer(name: str, impl: str) -> None:
    model, x1, _, names = _setup(name, n1=7)
    j = oracles.per_sample_jacobian(model, names, x1)
    full = oracles.ntk_from_jacobians(j, j)
    kw = dict(implementation=impl, dtype=torch.float64)
    unblocked = empirical_ntk(model, x1, trace_outputs=False, **kw)
    assert_close("symmetric", full, unblocked, **F64)
    # 7 samples in blocks of 3: the last tile is ragged, the lower triangle mirrored.
    assert_close(
        "blocked",
        unblocked,
        empirical_ntk(model, x1, trace_outputs=False, block_size=3, **kw),
        **F64,
    )
    diag = empirical_ntk(model, x1, trace_outputs=False, diagonal=True, **kw)
    assert_close("diagonal", torch.stack([full[i, i] for i in range(7)]), diag, **F64)
    assert_close(
        "traced diagonal",
        _traced(diag),
        empirical_ntk(model, x1, diagonal=True, **kw),
        **F64,
    )
    layers = empirical_ntk(model, x1, per_layer=True, **kw)
    fm = functionalize(model)
    assert set(layers) == set(fm.groups)
    for layer, group in fm.groups.items():
        cols = torch.cat([_columns(fm, n) for n in group])
        assert_close(
            f"layer {layer}",
            _traced(oracles.ntk_from_jacobians(j[..., cols], j[..., cols])),
            layers[layer],
            **F64,
        )
    assert_close("per-layer sum", _traced(full), sum(layers.values()), **F64)


def _columns(fm, name: str) -> torch.Tensor:
    start = 0
    for n in fm.names:
        if n == name:
            return torch.arange(start, start + fm.params[n].numel())
        start += fm.params[n].numel()
    raise KeyError(name)


@pytest.mark.parametrize("impl", GENERIC)
def test_parameter_subsets_and_weights(impl: str) -> None:
    model, x1, x2, _ = _setup("mlp_tanh")
    kw = dict(implementation=impl, dtype=torch.float64)
    for selector, names in [
        ("4.*", ["4.weight", "4.bias"]),
        (["0.weight", "2.bias"], ["0.weight", "2.bias"]),
        (nn.Linear, [n for n, _ in model.named_parameters()]),
        (lambda n, p: n.endswith("bias"), ["0.bias", "2.bias", "4.bias"]),
    ]:
        ref = oracles.ntk_from_jacobians(
            oracles.per_sample_jacobian(model, names, x1),
            oracles.per_sample_jacobian(model, names, x2),
        )
        assert_close(
            f"subset {names}",
            _traced(ref),
            empirical_ntk(model, x1, x2, params=selector, **kw),
            **F64,
        )
    names = [n for n, _ in model.named_parameters()]
    weights = {"0": 2.0, "2.bias": 0.5, "4.*": 3.0}
    fm = functionalize(model)
    w = torch.cat(
        [
            torch.full((fm.params[n].numel(),), v)
            for n, v in fm.param_weights(weights).items()
        ]
    )
    j1 = oracles.per_sample_jacobian(model, names, x1)
    j2 = oracles.per_sample_jacobian(model, names, x2)
    ref = oracles.ntk_from_jacobians(j1, j2, w.double())
    assert_close(
        "weighted",
        ref,
        empirical_ntk(model, x1, x2, trace_outputs=False, lr_multipliers=weights, **kw),
        **F64,
    )
    with pytest.raises(TypeError, match="weights"):
        empirical_ntk(model, x1, x2, trace_outputs=False, weights=weights, **kw)


def test_frozen_parameters_are_excluded_by_default() -> None:
    model, x1, x2, _ = _setup("mlp_tanh")
    model[0].weight.requires_grad_(False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ref = oracles.ntk_from_jacobians(
        oracles.per_sample_jacobian(model, names, x1),
        oracles.per_sample_jacobian(model, names, x2),
    )
    assert_close(
        "frozen", _traced(ref), empirical_ntk(model, x1, x2, dtype=torch.float64), **F64
    )


@pytest.mark.parametrize("impl", GENERIC)
def test_train_mode_batchnorm_is_the_whole_batch_kernel(impl: str) -> None:
    model, x1, x2, names = _setup("batchnorm")
    j = oracles.batch_jacobian(model, names, torch.cat([x1, x2]), train=True)
    before = {n: b.clone() for n, b in model.named_buffers()}
    ref = oracles.ntk_from_jacobians(j, j)
    kw = dict(implementation=impl, dtype=torch.float64, mode="train")
    both = torch.cat([x1, x2])
    assert_close(
        "bn train full",
        ref,
        empirical_ntk(model, both, trace_outputs=False, **kw),
        **F64,
    )
    # The cross-kernel is the x1-by-x2 block of the kernel on [x1; x2].
    assert_close(
        "bn train cross",
        _traced(ref[:5, 5:]),
        empirical_ntk(model, x1, x2, **kw),
        **F64,
    )
    assert_close(
        "bn train diag",
        _traced(torch.stack([ref[i, i] for i in range(8)])),
        empirical_ntk(model, both, diagonal=True, **kw),
        **F64,
    )
    for n, b in model.named_buffers():
        assert torch.equal(b.double(), before[n].double()), f"buffer {n} changed"
    evaluated = empirical_ntk(model, x1, x2, implementation=impl, dtype=torch.float64)
    assert (evaluated - _traced(ref[:5, 5:])).abs().max() > 1e-3, (
        "train and eval kernels coincide"
    )


def test_dropout_is_off_in_eval_mode_and_fixed_in_train_mode() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 2)
    ).double()
    plain = nn.Sequential(net[0], net[1], net[3])
    x = torch.randn(6, 4, dtype=torch.float64)
    assert_close("eval dropout", empirical_ntk(plain, x), empirical_ntk(net, x), **F64)
    k1 = empirical_ntk(net, x, mode="train", implementation="jacobian")
    k2 = empirical_ntk(net, x, mode="train", implementation="ntvp")
    assert_close("train dropout, fixed mask", k1, k2, **F64)
    assert (k1 - empirical_ntk(net, x)).abs().max() > 1e-3


def test_float32_default_and_float64_option() -> None:
    model, x1, x2, names = _setup("cnn")
    k32 = empirical_ntk(model, x1, x2)
    k64 = empirical_ntk(model, x1, x2, dtype=torch.float64)
    assert k32.dtype == torch.float32 and k64.dtype == torch.float64
    assert next(model.parameters()).dtype == torch.float32, (
        "dtype= must not modify the model"
    )
    assert_close("float32 vs float64", k64, k32, rtol=1e-4, atol=1e-5)


def test_forward_mode_through_attention_runs_rdiag_operator_without_a_notice() -> None:
    """The fused attention has no forward mode; rdiag's operator has (issue #24)."""
    model, x1, x2, names = _setup("attention")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        k = empirical_ntk(model, x1, x2, implementation="ntvp", dtype=torch.float64)
    notices = [str(w.message) for w in seen if "rdiag" in str(w.message)]
    assert not notices, notices
    ref = oracles.ntk_from_jacobians(
        oracles.per_sample_jacobian(model, names, x1),
        oracles.per_sample_jacobian(model, names, x2),
    )
    assert_close("attention fallback", _traced(ref), k, **F64)


def test_auto_picks_by_cost_and_matches() -> None:
    model, x1, x2, _ = _setup("mlp_tanh")
    fm = functionalize(model, dtype=torch.float64)
    auto = empirical_ntk(fm, x1, x2)
    assert_close(
        "auto", empirical_ntk(fm, x1, x2, implementation="jacobian"), auto, **F64
    )


def test_memory_guard_messages() -> None:
    model, x1, x2, _ = _setup("mlp_tanh", n1=200)
    with pytest.raises(MemoryError, match="trace_outputs=True"):
        empirical_ntk(model, x1, trace_outputs=False, memory_budget=1e5)
    with pytest.raises(MemoryError, match=r"block_size <= \d+"):
        empirical_ntk(
            model, x1, block_size=150, memory_budget=2e5, implementation="jacobian"
        )
    # Under a tight budget blocking keeps the computation going and exact.
    tight = empirical_ntk(
        model,
        x1[:20],
        memory_budget=2e4,
        implementation="jacobian",
        dtype=torch.float64,
    )
    assert_close(
        "tight budget", empirical_ntk(model, x1[:20], dtype=torch.float64), tight, **F64
    )


def test_bad_input_errors() -> None:
    model, x1, x2, _ = _setup("mlp_tanh")
    with pytest.raises(ValueError, match="differ only in the batch axis"):
        empirical_ntk(model, x1, torch.randn(3, 4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        empirical_ntk(model, x1.tolist())
    with pytest.raises(ValueError, match="no trainable parameters"):
        empirical_ntk(model, x1, params="nothing*")
    with pytest.raises(ValueError, match="takes no x2"):
        empirical_ntk(model, x1, x2, diagonal=True)
    with pytest.raises(ValueError, match=r"one of \['auto', 'jacobian'"):
        empirical_ntk(model, x1, implementation="magic")
    with pytest.raises(ValueError, match="block_size"):
        empirical_ntk(model, x1, block_size=0)
    with pytest.raises(TypeError, match="nn.Module"):
        empirical_ntk(lambda x: x, x1)


def test_auto_falls_back_when_structured_does_not_fit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import rdiag.ntk.handle as api

    def too_big(*args, **kwargs):
        raise MemoryError("structured needs 1 TiB")

    monkeypatch.setitem(api._RUNNERS, NTKImplementation.STRUCTURED, too_big)
    model, x1, x2, _ = _setup("mlp_tanh")
    with pytest.warns(UserWarning, match="cheapest generic implementation"):
        k = empirical_ntk(model, x1, x2, dtype=torch.float64)
    assert_close(
        "auto fallback",
        empirical_ntk(model, x1, x2, implementation="jacobian", dtype=torch.float64),
        k,
        **F64,
    )
    with pytest.raises(MemoryError, match="1 TiB"):
        empirical_ntk(model, x1, x2, implementation="structured")


def test_large_symmetric_kernel_contracts_upper_tiles_exactly() -> None:
    """N >= 128 takes the tiled symmetric contraction (ragged last tile)."""
    model, make = ZOO["mlp_tanh"](0)
    x = make(131, 3)
    names = [n for n, _ in model.named_parameters()]
    j = oracles.per_sample_jacobian(model, names, x)
    full = oracles.ntk_from_jacobians(j, j)
    kw = dict(implementation="jacobian", dtype=torch.float64)
    assert_close(
        "tiled full", full, empirical_ntk(model, x, trace_outputs=False, **kw), **F64
    )
    layers = empirical_ntk(model, x, per_layer=True, **kw)
    assert_close("tiled traced", _traced(full), sum(layers.values()), **F64)
