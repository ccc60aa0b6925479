"""bench/gpu_validation: the GPU machine's one script, checked here by its CPU dry run.

The GPU run (issue #26) happens in a session with a GPU lent for minutes; what
can fail before it (a group that raises, a script that names a group the module
lacks, results not written) is caught here, at tiny sizes on the CPU.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from bench import gpu_validation

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_validation.sh"


def test_script_parses_and_runs_every_group_in_order() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    named = re.findall(r"^group (\w+) \d+$", SCRIPT.read_text(), flags=re.M)
    assert tuple(named) == gpu_validation.GROUPS


# The eNTK group's dry run takes about 12 s on one core (ResNet-18s, every implementation).
GROUPS = [
    pytest.param(g, marks=pytest.mark.slow) if g == "ntk" else g
    for g in gpu_validation.GROUPS
]


@pytest.mark.parametrize("group", GROUPS)
def test_dry_run_of_each_group(tmp_path: Path, group: str) -> None:
    gpu_validation.main([group, "--dry-run", "--out", str(tmp_path), "--budget", "300"])
    doc = json.loads((tmp_path / f"{group}.json").read_text())
    assert doc["status"] == "done" and doc["meta"]["dry_run"]
    assert doc["rows"], f"{group}: no rows"
    measured = [r for r in doc["rows"] if "skipped" not in r]
    skipped = [r["case"] for r in doc["rows"] if "skipped" in r]
    # On the CPU only the Triton launcher of the weight-shared kernel cannot run.
    assert all("triton kernel" in case for case in skipped), skipped
    assert measured, f"{group}: every case skipped"
    for row in measured:
        for key in ("median_s", "seconds", "rel_err", "rel_err_vs_f64"):
            value = row.get(key)
            assert value is None or value == value, (group, row)  # no NaN
    if group == "ntk":
        errors = [r["rel_err_vs_recipe"] for r in measured if "rel_err_vs_recipe" in r]
        assert errors and max(errors) < 1e-4, errors
    summary = (tmp_path / "summary.md").read_text()
    assert f"## {group}\n" in summary and "**dry run**" in summary


def test_summary_says_what_did_not_finish(tmp_path: Path) -> None:
    (tmp_path / "correctness.txt").write_text("....\n3 failed, 70 passed in 80.0s\n")
    run = gpu_validation.Run("monitor", tmp_path, dry=True, budget=10)
    run.add(case="a", what="b", median_s=1.0)
    summary = (tmp_path / "summary.md").read_text()
    assert "`pytest -m cuda tests`: 3 failed, 70 passed in 80.0s" in summary
    assert "## monitor (cut short: the group did not finish)" in summary
    assert "## kernels: not run" in summary
    run.done()
    assert "## monitor\n" in (tmp_path / "summary.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_it_asks_for_the_dry_run(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no CUDA device.*--dry-run"):
        gpu_validation.main(["kernels", "--out", str(tmp_path)])
