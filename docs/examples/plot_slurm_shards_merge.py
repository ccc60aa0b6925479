"""
Slurm array shards and ``rdiag merge``
======================================

Without Ray, a sweep splits over a Slurm job array: ``--shard i/n`` runs slice
``i`` (from 0) of ``n`` of the grid, the same slice on every machine, into its own
store ``OUT/shard-i-of-n`` that records the sweep's id and the shard. ``rdiag
merge MERGED SHARD...`` joins the shards: it refuses stores of another sweep,
never duplicates a row, lists conflicting records (exit status 1), and merging
twice changes nothing. The batch script of the README::

    #SBATCH --array=0-3
    rdiag sweep --config my.yaml --shard ${SLURM_ARRAY_TASK_ID}/4 --out "$TMPDIR/rdiag" --no-report
    cp -r "$TMPDIR/rdiag/shard-${SLURM_ARRAY_TASK_ID}-of-4" results/

and, after the array (``sbatch --dependency=afterok:$jobid``)::

    rdiag merge results/merged results/shard-*-of-4 && rdiag report --store results/merged

Below, the two tasks of a two-shard array run one after the other as the same
commands, then the merge and the report.
"""

# %%
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt

from rdiag.runs.store import Store

root = Path(tempfile.mkdtemp())
(root / "sweep.yaml").write_text("""
base: {family: mlp, depth: 3, optimizer: gd, lr: 0.3, steps: 10, every: 10, data: teacher,
       probe_size: 16, data_options: {n_train: 64, n_test: 64, dim: 8, outputs: 4, seed: 0},
       metrics: [representations, loss]}
grid: {r: [0.5], width: [64, 128, 256, 512], seed: [0, 1, 2]}
""")


def rdiag_cli(*args: str) -> subprocess.CompletedProcess:
    """``rdiag ARGS`` (the console script), from the example's directory."""
    done = subprocess.run([sys.executable, "-m", "rdiag.cli", *args], cwd=root,
                          capture_output=True, text=True)
    print(f"$ rdiag {' '.join(args)}  (exit {done.returncode})\n{done.stdout}")
    return done


for task in (0, 1):  # SLURM_ARRAY_TASK_ID
    rdiag_cli("sweep", "--config", "sweep.yaml", "--shard", f"{task}/2",
              "--workers", "1", "--out", "results", "--no-report")

# %%
# Each shard is a store of its own, with the sweep's id and its slice.
for task in (0, 1):
    store = Store(root / "results" / f"shard-{task}-of-2")
    print(f"shard {task}/2: {len(store.run_ids())} runs, meta {store.meta()}")

# %%
# The merge, a second merge (nothing new), and the report of the merged store.
rdiag_cli("merge", "results/merged", "results/shard-0-of-2", "results/shard-1-of-2")
rdiag_cli("merge", "results/merged", "results/shard-0-of-2", "results/shard-1-of-2")
rdiag_cli("report", "--store", "results/merged")
summary = json.loads((root / "results" / "merged" / "summary.json").read_text())
print("verdicts:", summary["verdicts"])

# %%
# Every run of the grid is in the merged store once; the hidden layer's movement
# ``||dh||`` against the width, coloured by the shard that ran it.
fig, ax = plt.subplots(figsize=(5.5, 4))
for task, color in ((0, "tab:blue"), (1, "tab:orange")):
    frame = Store(root / "results" / f"shard-{task}-of-2").query()
    rows = frame[(frame["metric"] == "delta_h") & (frame["layer"] == "hidden.0")
                 & (frame["step"] == 10)]
    ax.plot(rows["width"], rows["value"], "o", color=color, label=f"shard {task}/2")
merged = Store(root / "results" / "merged").query()
rows = merged[(merged["metric"] == "delta_h") & (merged["layer"] == "hidden.0")
              & (merged["step"] == 10)]
ax.plot(rows["width"], rows["value"], "k+", ms=12, label=f"merged ({len(rows)} runs)")
fit = next(f for f in summary["fits"] if f["metric"] == "delta_h" and f["layer"] == "hidden.0")
ax.set(xscale="log", yscale="log", xlabel="width", ylabel="||dh|| (hidden layer)",
       title=f"slope {fit['slope']:+.2f}, predicted {fit['predicted']:+.2f}: {fit['verdict']}")
ax.legend()
fig.tight_layout()
