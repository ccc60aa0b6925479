"""The richness meter on models of known richness, off the scale, and on bad input.

The truths are written here: rdiag's MLP family at r = 0, 1/4, 1/2 and
mean-field (r = 1/2), a muP transformer and a muP MLP written by hand, the
standard parametrization (an MLP and GPT-2), and an MLP whose hidden learning
rate is a factor n too large. Protocol: widths 64..1024 (16x; the transformers
32..256 and 16..128, without the kernel metrics), 4 seeds, 10 full-batch steps;
r_hat within +-0.07 of the truth.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rdiag
from rdiag.meter import LRRule, richness_meter, width_roles
from tests.models import MuTransformer, mu_adam

WIDTHS = [64, 128, 256, 512, 1024]


def _batch(d_in=8, d_out=4, n=16):
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(n, d_in, generator=gen), torch.randn(n, d_out, generator=gen)


def _family(param):
    return lambda n: rdiag.make_model("mlp", n, d_out=4, parametrization=param)


def _sgd(lr):
    return lambda model: rdiag.make_optimizer(model, None, lr)


@pytest.mark.parametrize(
    ("param", "r", "kind"),
    [("r=0", 0.0, "lazy"), ("r=0.25", 0.25, "intermediate"), ("r=0.5", 0.5, "mup"),
     ("mf", 0.5, "mup")],
)  # fmt: skip
@pytest.mark.slow
def test_known_richness_of_the_mlp_family(param, r, kind):
    res = richness_meter(
        _family(param),
        _sgd(0.3),
        _batch(),
        F.mse_loss,
        widths=WIDTHS,
        steps=10,
        seeds=4,
    )
    assert abs(res.r - r) <= 0.07, res.report()
    assert res.kind == kind and res.verdict.startswith(("lazy", "intermediate", "muP"))
    lo, hi = res.interval
    assert lo <= res.r <= hi and hi - lo < 0.2
    assert [d.role for d in res.layers] == ["readin", "hidden", "readout"]
    assert all(d.problem is None for d in res.layers), res.report()
    fit = next(f for f in res.fits if f["metric"] == "ntk_rel_change")
    assert fit["predicted"] == pytest.approx(2 * res.target - 1)


@pytest.mark.slow
def test_standard_parametrization_is_off_the_scale():
    """PyTorch's init and one SGD rate: the first step's output change grows like n."""
    res = richness_meter(
        _family("sp"),
        _sgd(0.02),
        _batch(),
        F.mse_loss,
        widths=WIDTHS,
        steps=10,
        seeds=4,
    )
    assert res.kind == "growing" and res.verdict.startswith("off the scale: outputs")
    step1 = next(f for f in res.fits if f["metric"] == "delta_f1")
    assert 0.8 <= step1["slope"] <= 1.1  # docs/theory.md section 1: slope +1


class _HandMLP(nn.Sequential):
    """muP in the table gauge, by hand: read-in N(0, 1/d), hidden N(0, 1/n), read-out N(0, 1/n^2)."""

    def __init__(self, width: int, d_in: int = 8, d_out: int = 4) -> None:
        super().__init__(
            nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
            nn.Linear(width, d_out),
        )  # fmt: skip
        with torch.no_grad():
            for i, std in enumerate((d_in**-0.5, width**-0.5, 1.0 / width)):
                layer = self[2 * i]
                layer.weight.normal_(0.0, std)
                layer.bias.zero_()


#: muP SGD as a per-layer rule (the table gauge, eta0 = 0.3, d = 8): read-in
#: eta0 n / d, hidden eta0, read-out eta0 / n.
MUP_SGD = {"readin": 1.0, "hidden": 0.0, "readout": -1.0}
PER_D = {"readin": 1 / 8}


@pytest.mark.slow
def test_a_hand_written_mup_mlp_with_a_learning_rate_rule():
    rule = LRRule(0.3, MUP_SGD, PER_D)
    res = richness_meter(
        _HandMLP, rule, _batch(), F.mse_loss, widths=WIDTHS, steps=10, seeds=4
    )
    assert abs(res.r - 0.5) <= 0.07 and res.kind == "mup", res.report()
    assert [d.name for d in res.layers] == ["0", "2", "4"]
    assert res.layer("2").lr_exponent == pytest.approx(0.0, abs=1e-9)
    assert res.layer("4").lr_exponent == pytest.approx(-1.0, abs=1e-9)


@pytest.mark.slow
def test_a_hidden_learning_rate_n_times_too_large_is_named_with_its_fix():
    rule = LRRule(0.3, {**MUP_SGD, "hidden": 1.0}, PER_D, base_width=64)
    res = richness_meter(
        _HandMLP, rule, _batch(), F.mse_loss, widths=WIDTHS, steps=10, seeds=4,
        ntk=False, target=0.5,
    )  # fmt: skip
    hidden = res.layer("2")
    assert hidden.problem == "unstable" and res.kind == "unstable", res.report()
    assert "layer 2" in res.verdict
    # its first update ~ n^+1 where muP needs n^0: the rate ~ n^1 must become ~ n^0
    (fix,) = [f for f in hidden.fixes if f.startswith("learning rate")]
    factor, _, rate = fix.partition(" (its rate ~ n^+1.00 -> n^")
    assert float(factor.rpartition("^")[2]) == pytest.approx(-1.0, abs=0.1)
    assert float(rate.rstrip(")")) == pytest.approx(0.0, abs=0.1)
    assert res.layer("4").problem is None


@pytest.mark.slow
def test_a_hand_written_mup_transformer_with_adam():
    gen = torch.Generator().manual_seed(0)
    tokens, targets = (torch.randint(0, 16, (16, 6), generator=gen) for _ in range(2))
    res = richness_meter(
        lambda n: MuTransformer(n, depth=1),
        lambda m: mu_adam(m, 0.01),
        (tokens, targets),
        F.cross_entropy,
        widths=[32, 64, 128, 256],
        steps=10,
        seeds=4,
        ntk=False,  # the norms alone (the kernel exponents agree: bench/)
    )
    assert abs(res.r - 0.5) <= 0.07 and res.kind == "mup", res.report()
    roles = {d.name: d.role for d in res.layers}
    assert roles["embed"] == "readin" and roles["unembed"] == "readout"
    assert roles["blocks.0.qkv"] == roles["blocks.0.fc2"] == "hidden"


def test_gpt2_in_the_standard_parametrization_is_off_the_scale():
    pytest.importorskip("transformers")
    from tests.hf_models import gpt2_at_width

    gen = torch.Generator().manual_seed(0)
    ids, targets = (torch.randint(0, 13, (16, 4), generator=gen) for _ in range(2))
    res = richness_meter(
        lambda n: gpt2_at_width(n, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
        ({"input_ids": ids}, targets),
        F.cross_entropy,
        widths=[16, 32, 64, 128],
        steps=10,
        seeds=4,
        ntk=False,
    )
    assert res.kind == "growing", res.report()
    f0 = next(f for f in res.fits if f["metric"] == "f0")
    assert 0.4 <= f0["slope"] <= 0.8  # N(0, 0.02^2) weights at every width: ~ n^+1/2
    # hidden activations ~ n^+1 at init: the fix is an init std ~ n^-1/2
    attn = res.layer("transformer.h.0.attn.c_attn")
    assert attn.role == "hidden" and attn.exponents["h0"]["slope"] > 0.8
    assert any(f.startswith("init std") for f in attn.fixes)
    assert any("lm_head" in n and "tied" in n for n in res.notes)


def test_width_roles_from_shapes_embeddings_and_tied_weights():
    class Tied(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.embed = nn.Embedding(10, n)
            self.mid = nn.Linear(n, 2 * n)
            self.fixed = nn.Linear(3, 3)
            self.conv = nn.Conv1d(2, n, 3)
            self.head = nn.Linear(n, 10, bias=False)

        def forward(self, x):
            return x

    def tied(n):
        m = Tied(n)
        m.head.weight = m.embed.weight
        return m

    assert width_roles(Tied(4), Tied(8)) == {
        "embed": "readin",
        "mid": "hidden",
        "fixed": "fixed",
        "conv": "readin",
        "head": "readout",
    }
    assert width_roles(tied(4), tied(8))["head"] == "tied"


def test_batches_as_a_list_and_save(tmp_path):
    batches = [_batch() for _ in range(3)]
    res = richness_meter(
        _family("mup"), _sgd(0.3), batches, F.mse_loss, widths=[32, 128], steps=3,
        seeds=2, ntk=False,
    )  # fmt: skip
    assert math.isnan(res.interval[0])  # two seeds: no interval
    payload = json.loads(res.save(tmp_path).read_text())
    assert payload["verdict"] == res.verdict and payload["widths"] == [32, 128]
    assert payload["layers"][1]["name"] == "hidden.0"
    assert "kernel exponents left out" in " ".join(payload["notes"])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"make_model": lambda n: "net"}, TypeError, "return a torch.nn.Module"),
        ({"make_model": lambda n: nn.Linear(3, 2)}, ValueError, "same shapes"),
        ({"make_optimizer": lambda m: None}, TypeError, "torch.optim.Optimizer"),
        ({"data": torch.zeros(3)}, TypeError, "expected data as a batch"),
        ({"data": iter([_batch()] * 5)}, TypeError, "one-shot iterator"),
        ({"data": [_batch()]}, ValueError, "at least steps=2 batches"),
        ({"widths": [64]}, ValueError, "two distinct widths"),
        ({"seeds": 0}, ValueError, "expected seeds"),
        ({"target": 0.7}, ValueError, r"target in \[0, 1/2\]"),
        (
            {"make_model": lambda n: nn.Sequential(nn.Linear(3, n), nn.BatchNorm1d(n,
             track_running_stats=False), nn.Linear(n, 2))},
            ValueError,
            "acts on each sample separately",
        ),
    ],
)  # fmt: skip
def test_bad_input_is_named(kwargs, error, message):
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    args = {
        "make_model": lambda n: nn.Sequential(nn.Linear(3, n), nn.Linear(n, 2)),
        "make_optimizer": lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        "data": (x, y),
        "widths": [8, 16],
        "seeds": 1,
    }
    args.update(kwargs)
    with pytest.raises(error, match=message):
        richness_meter(
            args.pop("make_model"), args.pop("make_optimizer"), args.pop("data"),
            F.mse_loss, steps=2, **args,
        )  # fmt: skip


def test_default_data_is_shaped_like_the_model_output():
    from rdiag.meter import default_data

    mlp = _family("mup")
    x, y = default_data(mlp, F.mse_loss, width=16, n=5)
    assert x.shape == (5, 8) and y.shape == (5, 4) and y.is_floating_point()
    assert torch.equal(default_data(mlp, F.mse_loss, width=64, n=5)[0], x)
    tf = lambda n: rdiag.make_model("transformer", n, vocab=11, seq_len=6)  # noqa: E731
    tokens, labels = default_data(tf, F.cross_entropy, width=16, n=3)
    assert tokens.shape == labels.shape == (3, 6) and int(labels.max()) < 11
    _, classes = default_data(mlp, nn.CrossEntropyLoss(), width=16, n=7)
    assert classes.shape == (7,) and classes.dtype == torch.int64
    centered = lambda n: rdiag.make_model("mlp", n, parametrization="gamma=0.5")  # noqa: E731
    assert default_data(centered, F.mse_loss, width=16)[1].shape == (16, 1)
    # no sample_inputs: Gaussian for the first nn.Linear, in its dtype
    half = lambda n: nn.Sequential(nn.Linear(3, n), nn.Tanh()).to(torch.bfloat16)  # noqa: E731
    x, y = default_data(half, F.mse_loss, width=4, n=6)
    assert x.shape == (6, 3) and x.dtype == torch.bfloat16 and y.shape == (6, 4)
    conv = lambda n: nn.Sequential(nn.Conv2d(3, n, 3), nn.Flatten())  # noqa: E731
    with pytest.raises(TypeError, match="first layer Conv2d.*--data-factory"):
        default_data(conv, F.mse_loss, width=4)
    with pytest.raises(TypeError, match="no parameters"):
        default_data(lambda n: nn.Sequential(nn.Tanh()), F.mse_loss, width=4)


def test_sample_batch_leaves_batch_norm_statistics_alone():
    from rdiag.data import sample_batch

    model = rdiag.make_model("bn_mlp", 8, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.training
    sample_batch(model, F.mse_loss, n=6, seed=0)
    after = model.state_dict()
    assert model.training and all(torch.equal(before[k], after[k]) for k in before)


def test_optimizer_factory_uses_a_parametrization_s_rates_else_one_rate():
    from rdiag.meter import optimizer_factory

    model = _family("mup")(32)
    opt = optimizer_factory("sgd", 0.3)(model)
    expected = rdiag.make_optimizer(model, None, 0.3)
    assert [g["lr"] for g in opt.param_groups] == [
        g["lr"] for g in expected.param_groups
    ]
    assert len({g["lr"] for g in opt.param_groups}) > 1
    plain = optimizer_factory("adam", 0.01)(nn.Linear(3, 4))
    assert isinstance(plain, torch.optim.Adam) and len(plain.param_groups) == 1
    assert plain.param_groups[0]["lr"] == 0.01
    with pytest.raises(ValueError, match="optimizer"):
        optimizer_factory("lbfgs", 0.1)


class _ZeroReadoutMLP(_HandMLP):
    """muP as the ``mup`` package writes it for SGD: a zero read-out."""

    def __init__(self, width: int) -> None:
        super().__init__(width)
        with torch.no_grad():
            self[4].weight.zero_()


def test_a_zero_initialised_read_out_is_metered_as_mup():
    """8-w-w-4 tanh, hidden N(0, 1/fan_in), zero read-out, muP's SGD rate ratios
    (Tensor Programs V, table 3): read-in ~ n, hidden constant, read-out ~ 1/n."""
    rule = LRRule(0.3, MUP_SGD, PER_D, base_width=64)
    res = richness_meter(
        _ZeroReadoutMLP, rule, _batch(), F.mse_loss, widths=[64, 128, 256, 512],
        steps=10, seeds=3, ntk=False,
    )  # fmt: skip
    assert res.kind == "mup", res.report()
    # The read-out's relative change from zero is undefined: left out, not a fix.
    assert not res.layer("4").fixes and not res.failed


def test_a_rate_fix_is_offered_only_when_it_moves_the_end_toward_the_target():
    from rdiag.verdicts import _layer

    def fit(metric, slope, predicted):
        return {
            "metric": metric, "slope": slope, "predicted": predicted, "passed": False,
            "tolerance": 0.1, "ci": [slope - 0.05, slope + 0.05], "reason": "",
            "inconclusive": False,
        }  # fmt: skip

    agree = _layer("h", "hidden", [fit("dW_rel", 0.4, 0.0), fit("dW_rel1", 1.0, 0.0)],
                   0.5, 1.0, 64)  # fmt: skip
    assert agree.fixes == (
        "learning rate x (n/64)^-1.00 (its rate ~ n^+1.00 -> n^+0.00)",
    )
    split = _layer("h", "hidden", [fit("dW_rel", -0.4, 0.0), fit("dW_rel1", 1.0, 0.0)],
                   0.5, 1.0, 64)  # fmt: skip
    assert not split.fixes and any("opposite directions" in v for v in split.violations)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"data": (torch.randn(16, 5), torch.randn(16, 4))},
         r"the training data \(\(16, 5\) float32\) does not fit family\(64\)"),
        ({"probe": torch.randn(4, 6)},
         r"the probe \(\(4, 6\) float32\) does not fit family\(64\)"),
        ({"data": (torch.randn(16, 8), torch.randn(16, 3))}, "target"),
    ],
)  # fmt: skip
def test_data_or_a_probe_that_does_not_fit_is_named_before_any_run(kwargs, message):
    data = kwargs.pop("data", _batch())
    with pytest.raises(ValueError, match=message):
        richness_meter(
            _HandMLP, LRRule(0.3, MUP_SGD, PER_D), data, F.mse_loss,
            widths=[64, 128], steps=2, seeds=1, ntk=False, **kwargs,
        )  # fmt: skip


def test_the_meter_leaves_the_callers_rng_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    richness_meter(
        _HandMLP, LRRule(0.3, MUP_SGD, PER_D), _batch(), F.mse_loss,
        widths=[64, 128], steps=2, seeds=1, ntk=False,
    )  # fmt: skip
    assert torch.equal(torch.rand(3), expected)
