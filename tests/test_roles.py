"""One rule for layer roles and the read-out, asked by every part of rdiag.

The case that used to split them: a model that ends in ``Linear`` then
``LayerNorm``. The read-out is the ``Linear`` (the last weight layer, mapping
the width to the outputs); the ``LayerNorm`` is a gain.
"""

from __future__ import annotations

import torch
from torch import nn

from rdiag import functionalize
from rdiag.monitor import Monitor, default_layers
from rdiag.ntk.readout import find_readout
from rdiag.parametrization import apply_parametrization, layer_scales
from rdiag.roles import infer_roles, readout_name, width_roles


def _net(width: int, d_out: int = 3, norm: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Linear(4, width), nn.Tanh(), nn.Linear(width, d_out)]
    return nn.Sequential(*layers, *([nn.LayerNorm(d_out)] if norm else []))


def test_a_norm_after_the_readout_is_a_gain_everywhere() -> None:
    model = _net(8)
    assert readout_name(model) == "2"
    assert infer_roles(model) == {"0": "readin", "2": "readout"}
    assert width_roles(_net(8), _net(16)) == {"0": "readin", "2": "readout"}
    x = torch.randn(5, 4)
    monitor = Monitor(model, x, metrics=["features"])
    assert monitor.readout == "2"
    assert default_layers(model) == ["0"] == monitor.layers
    prepared = apply_parametrization(_net(8), "mup")
    roles = {n: s.role for n, s in layer_scales(prepared).items()}
    assert roles == {"0": "readin", "2": "readout"}


def test_the_readout_identity_needs_the_readout_to_end_the_model() -> None:
    x = torch.randn(3, 4)
    # Widening read-out (8 -> 16) that ends the model: the identity applies.
    plain = _net(8, d_out=16, norm=False)
    assert find_readout(functionalize(plain), x).name == "2"
    # The same read-out followed by a gain: the output is not linear in the
    # read-out's input, so the identity would be wrong; it is not used.
    gained = _net(8, d_out=16, norm=True)
    assert readout_name(gained) == "2"
    assert find_readout(functionalize(gained), x) is None


def test_explicit_roles_name_the_readout() -> None:
    model = _net(8)
    assert readout_name(model, {"0": "readout"}) == "0"
    model.roles = {"0": "readin", "2": "readout"}
    assert readout_name(model) == "2"
