"""Packaging contract: public names resolve, optional packages stay unimported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import rdiag

OPTIONAL = (
    "triton",
    "matplotlib",
    "pandas",
    "yaml",
    "sklearn",
    "scipy",
    "ray",
    "tqdm",
    "lightning",
    "pytorch_lightning",
    "transformers",
    "tensorboard",
    "wandb",
    "mlflow",
)


def test_public_names_resolve_and_version() -> None:
    missing = [n for n in rdiag.__all__ if not hasattr(rdiag, n)]
    assert not missing, f"__all__ names without an attribute: {missing}"
    assert rdiag.__version__.count(".") == 2
    assert (Path(rdiag.__file__).parent / "py.typed").exists()


def test_import_loads_no_optional_package() -> None:
    code = (
        "import sys, torch; before = set(sys.modules); import rdiag, rdiag.kernels, rdiag.integrations, rdiag.sinks, rdiag.runs.sweep, rdiag.runs.ray_executor, rdiag.runs.writer, rdiag.runs.merge, rdiag.distributed, rdiag.cli; "
        f"print(sorted({{m.split('.')[0] for m in set(sys.modules) - before}} & set({OPTIONAL!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", (
        f"import rdiag loaded optional packages: {out.stdout}"
    )


def test_kernels_live_under_rdiag_only() -> None:
    import rdiag.kernels

    assert rdiag.kernels.__name__ == "rdiag.kernels"
    assert callable(rdiag.kernels.gram_hadamard)


def test_pre_release_names_are_gone() -> None:
    """No release had them: no shim keeps them alive."""
    import pytest

    import rdiag

    for name in ("parse_param", "preconditioner_diagonal", "write_summary", "ntk_costs"):
        with pytest.raises(AttributeError, match=f"no attribute '{name}'"):
            getattr(rdiag, name)
    assert not (Path(rdiag.__file__).parent / "_deprecation.py").exists()
