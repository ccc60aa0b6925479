"""The README's quick start runs as written and its shapes hold."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs() -> None:
    block = re.search(r"## Quick start\s+```python\n(.*?)```", README.read_text(), re.S)
    assert block, "README has no python quick start block"
    scope: dict = {}
    exec(compile(block.group(1), "README quick start", "exec"), scope)
    assert scope["k"].shape == (64, 64)
    assert scope["kx"].shape == (64, 32, 10, 10)
    assert set(scope["layers"]) == {"0", "2"}
    assert scope["op"].shape == (640, 640)
    assert scope["res"].eigenvalues[0] >= scope["res"].eigenvalues[-1]
    assert abs(scope["lam"] - float(scope["res"].eigenvalues[0])) <= 1e-3 * abs(
        scope["lam"]
    )


@pytest.mark.slow
def test_large_output_block_runs() -> None:
    import pytest

    pytest.importorskip("transformers")
    text = README.read_text()
    block = re.search(
        r"## Large models and output spaces.*?```python\n(.*?)```", text, re.S
    )
    assert block, "README has no large-output block"
    scope: dict = {}
    exec(compile(block.group(1), "README large outputs", "exec"), scope)
    assert scope["k_lm"].shape == (8, 8) and scope["k_p"].shape == (8, 8)
    assert scope["est"].kernel.shape == scope["est"].std_err.shape == (8, 8)
    assert scope["kernel"].last_plan.readout is not None


def test_richness_meter_block_runs(tmp_path, monkeypatch) -> None:
    block = re.search(
        r"## Richness meter.*?```python\n(.*?)```", README.read_text(), re.S
    )
    assert block, "README has no richness meter block"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block.group(1), "README richness meter", "exec"), scope)
    meter = scope["meter"]
    assert meter.kind == "growing" and meter.verdict.startswith("off the scale: outp")
    assert [d.role for d in meter.layers] == ["readin", "hidden", "readout"]
    assert (tmp_path / "meter" / "meter.json").is_file()
