"""The structured eNTK rules (rdiag/ntk/rules.py) against the float64 brute force.

In-repo models shaped like the architectures people train: depthwise and
grouped convolutions, Conv3d and padding modes, a LayerNorm subclass (rules by
class hierarchy), positional embeddings of broadcast position ids, a class token
and a positional table added to activations (tapped parameters), a user rule;
then real Hugging Face models built from small configs (GPT-2, BERT, ViT,
ResNet, MobileNetV2), whose runtime coverage must be 1.0 with no fallback notice.
Tolerances as in tests/test_structured.py: rtol=1e-9, atol=1e-10 in float64.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from rdiag import empirical_ntk, functionalize, ntk_fn
from rdiag.ntk.handle import structured_coverage
from rdiag.ntk.rules import Factor, layer_rule, register_structured_rule, rule_for
from tests import oracles
from tests._assert import assert_close
from tests.hf_models import NAMES, hf_model
from tests.test_structured import (
    F64,
    KW,
    _check_against_oracle,
    _normal,
)


class _Depthwise(nn.Module):
    """MobileNet-style: depthwise 3x3 (groups = channels), pointwise 1x1, grouped 3x3."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 6, 3, padding=1, padding_mode="reflect")
        self.depthwise = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)
        self.pointwise = nn.Conv2d(6, 4, 1)
        self.grouped = nn.Conv2d(
            4, 4, 3, stride=2, groups=2, padding_mode="circular", padding=1
        )
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.stem(x))
        h = torch.tanh(self.pointwise(torch.tanh(self.depthwise(h))))
        return self.head(torch.tanh(self.grouped(h)).mean((2, 3)))


class _Volume(nn.Module):
    """Conv3d with stride, dilation and 'replicate' padding; Conv1d with groups."""

    def __init__(self) -> None:
        super().__init__()
        self.c3 = nn.Conv3d(
            2,
            4,
            (2, 3, 3),
            stride=(1, 2, 1),
            dilation=(1, 1, 2),
            padding=(0, 1, 2),
            padding_mode="replicate",
        )
        self.c1 = nn.Conv1d(4, 4, 2, groups=4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.c3(x)).mean((3, 4))  # (N, 4, D')
        return self.head(torch.tanh(self.c1(h)).mean(2))


def test_grouped_depthwise_and_padded_convolutions(route: str) -> None:
    torch.manual_seed(0)
    for model, make in (
        (_Depthwise(), lambda n, s: _normal(n, s, 2, 6, 6)),
        (_Volume(), lambda n, s: _normal(n, s, 2, 3, 5, 6)),
    ):
        assert structured_coverage(functionalize(model)) == 1.0
        notices = _check_against_oracle(model, make(3, 1), make(2, 2))
        assert notices == [], notices


class _MyNorm(nn.LayerNorm):
    """A LayerNorm subclass (as timm's): found through the class hierarchy."""


def test_subclasses_get_their_parents_rule() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), _MyNorm(5), nn.Tanh(), nn.Linear(5, 2))
    with torch.no_grad():
        model[1].weight.normal_(1.0, 0.3)
        model[1].bias.normal_(0.0, 0.3)
    assert rule_for(model[1]) is rule_for(nn.LayerNorm(2))
    assert _check_against_oracle(model, _normal(4, 1, 3), _normal(3, 2, 3)) == []


class _Positions(nn.Module):
    """Token and position embeddings; position ids a (1, T) buffer broadcast over the batch."""

    def __init__(self, vocab: int = 9, t: int = 4, d: int = 6) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(t, d)
        self.register_buffer("position_ids", torch.arange(t)[None])
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.tok(tokens) + self.pos(self.position_ids[:, : tokens.shape[1]])
        return self.head(torch.tanh(self.mix(h)))


def test_position_embeddings_broadcast_over_the_batch(route: str) -> None:
    torch.manual_seed(0)
    model = _Positions()
    x1 = torch.randint(0, 9, (4, 4), generator=torch.Generator().manual_seed(1))
    x2 = torch.randint(0, 9, (3, 4), generator=torch.Generator().manual_seed(2))
    assert structured_coverage(functionalize(model), x1) == 1.0
    assert _check_against_oracle(model, x1, x2) == []


class _ClassToken(nn.Module):
    """ViT-style: patches, a class token (1, 1, D) and a positional table (1, T+1, D)."""

    def __init__(self, d: int = 6, patches: int = 4) -> None:
        super().__init__()
        self.patch = nn.Linear(5, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, patches + 1, d))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.patch(x)
        h = torch.cat([self.cls.expand(len(x), -1, -1), h], dim=1) + self.pos
        return self.head(torch.tanh(self.norm(h))[:, 0])


def test_class_token_and_positional_table_are_tapped(route: str) -> None:
    torch.manual_seed(0)
    model = _ClassToken()
    x1, x2 = _normal(4, 1, 4, 5), _normal(3, 2, 4, 5)
    fm = functionalize(model)
    assert structured_coverage(fm) == 1.0
    assert structured_coverage(fm, x1) == 1.0
    assert _check_against_oracle(model, x1, x2) == []


class _Gain(nn.Module):
    """A module with its own parameter and no built-in rule: y = w * x."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


def _gain_factors(module: nn.Module, x: Tensor, cot: Tensor) -> dict[str, Factor]:
    n, o = cot.shape[:2]
    d = x.shape[-1]
    return {"weight": Factor(cot.reshape(n, o, -1, d) * x.reshape(n, 1, -1, d), None)}


def test_a_registered_user_rule_is_used_and_checked() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), _Gain(4), nn.Tanh(), nn.Linear(4, 2))
    fm = functionalize(model)
    before = structured_coverage(fm)
    assert before == pytest.approx(1 - 4 / fm.num_params)
    register_structured_rule(_Gain, layer_rule(lambda m, x: x, _gain_factors))
    try:
        assert structured_coverage(fm, _normal(3, 1, 3)) == 1.0
        assert _check_against_oracle(model, _normal(4, 1, 3), _normal(3, 2, 3)) == []
        # A wrong rule is caught by the plan's autograd check and falls back.
        register_structured_rule(_Gain, layer_rule(lambda m, x: 2 * x, _gain_factors))
        notices = _check_against_oracle(model, _normal(4, 1, 3), _normal(3, 2, 3))
        assert len(notices) == 1 and "gradient check failed" in notices[0]
    finally:
        from rdiag.ntk import rules

        rules._RULES.pop(_Gain)
    with pytest.raises(TypeError, match="nn.Module subclass or a dotted class name"):
        register_structured_rule("Gain", layer_rule(lambda m, x: x, _gain_factors))
    with pytest.raises(TypeError, match="StructuredRule"):
        register_structured_rule(_Gain, _gain_factors)


# ---- Hugging Face models from small configs ---------------------------------------
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("name", NAMES)
def test_hugging_face_models_run_fully_structured_and_exact(name: str) -> None:
    model, x = hf_model(name, 3)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    kernel = ntk_fn(model, trace_outputs=False, **KW)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = kernel(x)
    notices = [str(w.message) for w in record if "structured eNTK" in str(w.message)]
    assert notices == [], notices
    assert kernel.last_plan.structured.coverage(kernel.fm) == 1.0
    assert structured_coverage(kernel.fm, x) == 1.0
    j = oracles.per_sample_jacobian(model, names, x)
    assert_close(f"{name} full kernel", oracles.ntk_from_jacobians(j, j), got, **F64)
    traced = empirical_ntk(model, x, **KW)
    assert_close(f"{name} traced", got.diagonal(0, 2, 3).sum(-1), traced, **F64)
