"""
A depth check of a μP transformer
=================================

Depth has its own parametrization: the residual branches of a depth-``L``
network are multiplied by :math:`L^{-\\alpha}`, and the learning rates inside them
scaled so that each block moves the residual stream by :math:`\\Theta(1/L)`.
:math:`\\alpha = 1/2` is depth-μP, :math:`\\alpha = 1` CompleteP (arXiv
2505.01618), selected by a suffix of the parametrization (``mup,depth=completep``).

The depth check trains at one width across depths and fits exponents in ``L``:
a depth-independent output, residual stream and read-in/read-out movement, and a
relative weight change of the blocks :math:`\\sim L^{\\alpha - 1}` (Adam: 0 under
CompleteP, -1/2 under depth-μP). Unscaled branches fail it.
"""

# %%
import matplotlib.pyplot as plt

import rdiag
from rdiag.coord_check import plot_series

result = rdiag.depth_check(
    "transformer", "mup,depth=completep", [2, 4, 8, 16], width=16, seeds=3,
    optimizer="adam", batch_size=8, family_kwargs={"seq_len": 4},
)
print("verdict:", "pass" if result.passed else "FAIL")
for f in result.fits:
    print(f"  {f['verdict']:13s} {f['metric']:8s} {f['layer'] or '':8s} {f['reason']}")

# %%
# The residual stream's movement and the blocks' relative weight change against
# the depth, with the fitted and predicted (dashed) slopes.
fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
for ax, (metric, layers) in zip(axes, (("delta_h", {"stream"}), ("dW_rel", {"blocks", "unembed"}))):
    for fit in result.fits:
        if fit["metric"] == metric and fit["layer"] in layers:
            plot_series(ax, result.records, fit, "depth")
    ax.set(xscale="log", yscale="log", xlabel="depth L", title=metric)
    ax.legend(fontsize=7)
fig.tight_layout()
