"""
The richness meter on your own model
====================================

Where does *your* network, with *your* optimizer, train on the lazy-rich scale?
:func:`rdiag.richness_meter` builds ``make_model(width)`` at several widths and
seeds, trains each briefly with your optimizer and loss, fits the width exponents
of representation, weight and kernel movement, and returns :math:`\\hat r` with an
interval and a verdict: lazy, intermediate, μP, or off the scale (outputs growing
with width, a layer unstable or frozen), with per-layer fixes. It assumes nothing
about the parametrization: layer roles come from which weight axes grow with the
width.

Below: a plain PyTorch MLP in PyTorch's default initialization, trained with SGD
at one learning rate (the "standard parametrization"), and the same network with
rdiag's μP version of it.
"""

# %%
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import rdiag
from rdiag.coord_check import plot_series


def make_model(width: int) -> torch.nn.Module:  # your network; `width` sets its size
    return torch.nn.Sequential(
        torch.nn.Linear(8, width), torch.nn.Tanh(),
        torch.nn.Linear(width, width), torch.nn.Tanh(),
        torch.nn.Linear(width, 4),
    )


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:  # yours, as you train
    return torch.optim.SGD(model.parameters(), lr=0.05)


gen = torch.Generator().manual_seed(0)
x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)
widths = [64, 128, 256, 512]
meter = rdiag.richness_meter(
    make_model, make_optimizer, (x, y), F.mse_loss, widths=widths, steps=10, seeds=3
)
print(meter.report())

# %%
# The meter's fixes say what to change: the read-out's learning rate and
# initialization shrink with the width, the read-in's rate grows. rdiag's own μP
# MLP of the same shape (:func:`rdiag.make_model` with ``parametrization="mup"``,
# trained with its per-layer rates) is what that leads to:
def make_mup(width: int) -> torch.nn.Module:
    return rdiag.make_model("mlp", width, d_in=8, d_out=4, parametrization="mup")


def make_mup_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return rdiag.make_optimizer(model, None, lr=0.3)  # the model's parametrization


mup = rdiag.richness_meter(
    make_mup, make_mup_optimizer, (x, y), F.mse_loss, widths=widths, steps=10, seeds=3
)
print(mup.verdict)

# %%
# What the verdicts rest on: the measured hidden-layer movement
# :math:`\|\Delta h\|` and kernel movement (``model``) against the width, with
# their fitted slopes and the predictions at the estimated ``r`` (dashed). Your
# MLP's hidden layer moves like μP's, but its output change grows with the width
# (printed above), which no point of the scale allows.
fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
for ax, result, title in zip(axes, (meter, mup), ("your MLP, SGD", "muP MLP")):
    for fit in result.fits:
        if fit["metric"] == "ntk_rel_change" or (fit["metric"], fit["layer"]) in (
            ("delta_h", "2"),  # the hidden layer of your MLP
            ("delta_h", "hidden.0"),  # and of rdiag's
        ):
            plot_series(ax, result.records, fit)
    ax.set(xscale="log", yscale="log", xlabel="width", title=f"{title}: {result.kind}, r = {result.r:.2f}")
    ax.legend(fontsize=7)
fig.tight_layout()

# %%
# From the shell, the same on functions named by module or file (``--data-factory``
# for your batch, otherwise Gaussian inputs sized from the first ``nn.Linear``)::
#
#     rdiag meter --factory my_models.py:make_model \
#         --optimizer-factory my_models.py:make_optimizer --out meter/
#     rdiag ntk --factory my_models.py:make_model --width 256 --n 32
#     rdiag sharpness --factory my_models.py:make_model --width 256 --loss mse
