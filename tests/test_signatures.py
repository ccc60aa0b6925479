"""One vocabulary: explicit signatures, the selection keywords the same everywhere."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

import rdiag
from rdiag.functional import SELECTION, SELECTION_DOC, functionalize

#: The public entry points of issue #22 (and the operators).
ENTRY_POINTS = (
    "ntk_fn",
    "empirical_ntk",
    "NTKFunction",
    "NTKOperator",
    "HessianOperator",
    "GGNOperator",
    "FisherOperator",
    "curvature_operator",
    "top_eigenvalues",
    "sharpness",
    "hessian_trace",
    "hessian_density",
    "ggn_sharpness_from_ntk",
    "Monitor",
    "richness_meter",
    "coord_check",
    "depth_check",
)
#: Those that build a functional view from all five selection keywords.
SELECTING = ENTRY_POINTS[:13]


def _parameters(name: str) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(getattr(rdiag, name)).parameters)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_no_entry_point_takes_a_keyword_tail(name: str) -> None:
    tails = [
        p.name
        for p in _parameters(name).values()
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]
    assert not tails, f"rdiag.{name} takes {tails}: list its arguments instead"


@pytest.mark.parametrize("name", SELECTING)
def test_the_selection_keywords_mean_the_same_everywhere(name: str) -> None:
    reference = inspect.signature(functionalize).parameters
    params = _parameters(name)
    for key in SELECTION:
        assert key in params, f"rdiag.{name} lacks {key}="
        assert params[key].default == reference[key].default, (name, key)
    doc = inspect.getdoc(getattr(rdiag, name))
    assert SELECTION_DOC.split("\n")[3].strip() in doc, (
        f"rdiag.{name}'s docstring lacks the shared 'Selection keywords' section"
    )


def test_common_calls_stay_one_call() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)
    )
    data = (torch.randn(8, 3), torch.randn(8, 2))
    lam = rdiag.sharpness(net, F.mse_loss, data, dtype=torch.float64)
    assert isinstance(lam, float) and lam > 0


def test_a_prepared_view_is_accepted_wherever_a_model_is() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)
    )
    x, y = (
        torch.randn(6, 3, dtype=torch.float64),
        torch.randn(6, 2, dtype=torch.float64),
    )
    fm = functionalize(net, "2.*", dtype=torch.float64)
    by_view = rdiag.sharpness(fm, F.mse_loss, (x, y))
    by_model = rdiag.sharpness(
        net, F.mse_loss, (x, y), params="2.*", dtype=torch.float64
    )
    assert by_view == pytest.approx(by_model, rel=1e-10)
    k_view = rdiag.empirical_ntk(fm, x)
    k_model = rdiag.empirical_ntk(net, x, params="2.*", dtype=torch.float64)
    torch.testing.assert_close(k_view, k_model, rtol=1e-12, atol=1e-12)
    # Agreeing keywords are fine; differing ones would be silently ignored: an error.
    rdiag.empirical_ntk(fm, x, dtype=torch.float64)
    for bad in ({"params": "0.*"}, {"dtype": torch.float32}, {"mode": "train"}):
        with pytest.raises(ValueError, match="prepared FunctionalModel"):
            rdiag.empirical_ntk(fm, x, **bad)


def test_the_monitor_takes_a_prepared_view() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)
    )
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    fm = functionalize(net, "2.*")
    monitor = rdiag.Monitor(fm, (x, y), metrics=["ntk"], loss_fn=F.mse_loss)
    assert monitor.fm is fm and monitor.model is net
    monitor.step(0)
    # The kernel of the selected read-out parameters only, not of the whole net.
    expected = float(rdiag.empirical_ntk(fm, x).trace())
    assert monitor.history[0]["ntk/trace"] == pytest.approx(expected, rel=1e-5)
    assert expected < float(rdiag.empirical_ntk(net, x).trace())
