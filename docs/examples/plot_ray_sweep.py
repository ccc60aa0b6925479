"""
A sweep on Ray (a local cluster)
================================

``rdiag.sweep(config, executor="ray")`` (``rdiag sweep --executor ray --address
auto`` on a cluster) runs one Ray task per run, each asking for the config's
``resources`` (default one CPU; one GPU for ``device: cuda`` runs). The store
stays on the driver's disk: one writer, a Ray actor pinned to the driver's node,
owns the SQLite file and every run sends its records there, one call per check,
so no other node opens it. A task whose worker dies is retried; the retry
restarts the run from step 0 with the same seeds and its records replace the
partial ones.

Here Ray starts a local two-CPU instance in this process (on a cluster you would
start the driver on the head node and pass ``address="auto"``).
"""

# %%
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import ray

import rdiag
from rdiag.runs.store import Store

ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
config = {
    "base": {
        "family": "mlp", "depth": 3, "optimizer": "gd", "lr": 0.3, "steps": 10,
        "every": 5, "data": "teacher", "probe_size": 16,
        "data_options": {"n_train": 64, "n_test": 64, "dim": 8, "outputs": 4, "seed": 0},
        "metrics": ["representations", "sharpness_precond", "loss"],
    },
    "grid": {"r": [0.5], "width": [64, 128, 256, 512], "seed": [0, 1]},
    "resources": {"cpus": 1},
}
out = Path(tempfile.mkdtemp()) / "ray-results"
result = rdiag.sweep(config, out=out, executor="ray")
print(f"{result.count('finished')} of {len(result.results)} runs finished on Ray")
for r in result.results:
    print(f"  {r.run_id}: {r.status}, {r.seconds:.1f} s ({r.monitor_seconds:.1f} s diagnostics)")

# %%
# The records, written by the one writer on this node: the preconditioned
# sharpness over training at each width. Under μP it follows one curve at every
# width (here still far below the edge of stability :math:`2/\eta_0 = 6.7`).
frame = Store(out).query()
rows = frame[frame["metric"] == "sharpness/precond"]
fig, ax = plt.subplots(figsize=(5.5, 4))
for width, group in rows.groupby("width"):
    mean = group.groupby("step")["value"].mean()
    ax.plot(mean.index, mean.values, "o-", label=f"width {width}")
ax.set(xlabel="step", ylabel=r"$\lambda_{\max}(M^{1/2} H M^{1/2})$", title="sharpness (mean of 2 seeds)")
ax.legend(fontsize=8)
fig.tight_layout()
ray.shutdown()
