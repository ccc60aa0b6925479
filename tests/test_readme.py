"""The README's quick start runs as written and its shapes hold."""

from __future__ import annotations

import re
from pathlib import Path

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
