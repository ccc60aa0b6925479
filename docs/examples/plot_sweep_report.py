"""
A richness sweep and its report
===============================

:func:`rdiag.sweep` trains a grid of runs (richness ``r`` x width x seed here),
each with a :class:`rdiag.Monitor` writing into one SQLite store, and then builds
the report: ``summary.json`` and a self-contained ``report.html`` that open with
each prediction's verdict (pass, fail or inconclusive, with the reason in
numbers: the same rule as the coordinate check), then the fitted exponents and
the figures. A sweep is resumable: run it again and finished runs are skipped.

This is a small version of the main job (``rdiag sweep --config default``, 90
runs over widths 64 to 1024 and three values of ``r``).
"""

# %%
import json
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt

import rdiag
from rdiag.runs.store import Store

config = {
    "base": {
        "family": "mlp", "depth": 3, "optimizer": "gd", "lr": 0.3, "steps": 20,
        "every": 10, "data": "teacher", "probe_size": 16,
        "data_options": {"n_train": 64, "n_test": 64, "dim": 8, "outputs": 4, "seed": 0},
        "metrics": ["ntk", "representations", "loss"],
    },
    "grid": {"r": [0, 0.5], "width": [64, 128, 256, 512], "seed": [0, 1, 2]},
}
out = Path(tempfile.mkdtemp()) / "results"
result = rdiag.sweep(config, out=out, workers=1)
print(f"{result.count('finished')} runs finished; report at {result.report['html']}")

# %%
# ``summary.json``: the verdict counts, then one entry per fitted exponent with
# its ``verdict`` and ``reason``.
summary = json.loads(Path(result.report["summary"]).read_text())
print("verdicts:", summary["verdicts"])
for f in summary["fits"]:
    if f["metric"] in ("delta_h", "ntk_rel_change", "f0"):
        print(f"  {f['verdict']:4s} {f['metric']:14s} {f['layer'] or '':9s} "
              f"{f['parametrization']:6s} {f['reason']}")

# %%
# A sweep's second run finds every run finished and does nothing.
again = rdiag.sweep(config, out=out, workers=1, report=False)
print(f"rerun: {again.count('skipped')} of {len(again.results)} runs skipped")

# %%
# The store is a table of records (pandas): one row per run, step, metric and
# layer. The kernel movement at the last step against the width, with the
# report's fitted slopes: :math:`2r - 1`, i.e. :math:`-1` (lazy) and :math:`0`
# (μP).
frame = Store(out).query()
last = frame[(frame["metric"] == "ntk/rel_change") & (frame["step"] == 20)]
fig, ax = plt.subplots(figsize=(5.5, 4))
for param, group in last.groupby("parametrization"):
    fit = next(f for f in summary["fits"] if f["metric"] == "ntk_rel_change"
               and f["parametrization"] == param)
    ax.plot(group["width"], group["value"], "o", alpha=0.6,
            label=f"{param}: slope {fit['slope']:+.2f}, predicted {fit['predicted']:+.2f} ({fit['verdict']})")
ax.set(xscale="log", yscale="log", xlabel="width", ylabel=r"$\|K_T - K_0\|_F / \|K_0\|_F$")
ax.legend(fontsize=8)
fig.tight_layout()
