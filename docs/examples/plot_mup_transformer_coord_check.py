"""
A coordinate check of a μP transformer
======================================

The coordinate check (Yang et al., "Tensor Programs V", the ``mup`` package's
test) trains a model family at growing widths and asks whether each measured
quantity scales with the width as the parametrization predicts. rdiag fits every
exponent with an interval over seeds and judges it (:mod:`rdiag.verdicts`): pass
within a tolerance of finite-width allowance and seed scatter, fail beyond it,
inconclusive where the tolerance could not tell the prediction from its
neighbours on the richness scale.

Here: rdiag's causal transformer (``d_model`` is the width; embedding = read-in,
unembedding = read-out, attention and MLP matrices hidden, attention logits
scaled by :math:`1/d_{head}`) under μP with Adam, widths 32 to 512.
"""

# %%
import matplotlib.pyplot as plt

import rdiag
from rdiag.coord_check import plot_series

result = rdiag.coord_check(
    "transformer", "mup", [32, 64, 128, 256, 512], steps=10, seeds=3,
    optimizer="adam", ntk=False, linearization=False, batch_size=8,
    family_kwargs={"depth": 1, "seq_len": 4},
)
print("verdict:", "pass" if result.passed else "FAIL")
for f in result.fits:
    if f["metric"] in ("delta_h", "f0", "delta_f", "dW_op"):
        print(f"  {f['verdict']:5s} {f['metric']:8s} {f['layer'] or '':15s} {f['reason']}")

# %%
# Under μP (r = 1/2) hidden representations move like :math:`n^{1/2}` per input
# (:math:`\|\Delta h\| \sim n^r`), the output at initialization shrinks like
# :math:`n^{-1/2}` while its change per step stays :math:`O(1)`, and the read-in's
# weights move like :math:`n^{1/2}` in operator norm, the hidden ones like
# :math:`n^0`, the read-out's like :math:`n^{-1/2}` (:doc:`/theory`).
fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
for ax, metric in zip(axes, ("delta_h", "f0", "dW_op")):
    for fit in result.fits:
        if fit["metric"] == metric and fit["layer"] in (None, "embed", "blocks.0.fc1", "unembed"):
            plot_series(ax, result.records, fit)
    ax.set(xscale="log", yscale="log", xlabel="width (d_model)", title=metric)
    ax.legend(fontsize=7)
fig.tight_layout()
