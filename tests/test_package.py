"""Packaging contract: public names resolve, optional packages stay unimported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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

    for name in (
        "parse_param",
        "preconditioner_diagonal",
        "write_summary",
        "ntk_costs",
    ):
        with pytest.raises(AttributeError, match=f"no attribute '{name}'"):
            getattr(rdiag, name)
    assert not (Path(rdiag.__file__).parent / "_deprecation.py").exists()


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_kernels_folder_shadows_no_package_named_kernels() -> None:
    """From the repository root, ``kernels`` is whatever else is installed by that name.

    transformers >= 5 imports Hugging Face's ``kernels`` when a model is built; a
    regular package ``kernels/`` at the root would be found first from there.
    """
    pytest.importorskip("transformers")
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/ must stay a folder without __init__.py (rdiag/kernels.py is the package)"
    )
    code = (
        "import importlib.util, torch, transformers as T, rdiag; "
        "m = T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)); "
        "k = rdiag.empirical_ntk(m, torch.randint(0, 50, (2, 3))); "
        "spec = importlib.util.find_spec('kernels'); "
        "print(tuple(k.shape)); print(spec.origin); print(list(spec.submodule_search_locations or []))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    shape, origin, locations = out.stdout.strip().splitlines()[-3:]
    assert shape == "(2, 2)"
    ours = str(ROOT / "kernels")
    if origin not in ("None", ""):  # a regular package by that name is installed
        assert not origin.startswith(ours), (
            f"import kernels found the project's: {origin}"
        )
    else:  # nothing else installed: at most a harmless namespace portion
        assert locations == f"[{ours!r}]"


def test_rdiag_kernels_is_the_dispatcher_over_the_kernels_folder() -> None:
    import rdiag.kernels
    import rdiag.kernels.reference

    assert rdiag.kernels.__path__ == [
        str(Path(rdiag.kernels.reference.__file__).parent)
    ]
    assert Path(rdiag.kernels.reference.__file__).parent.name == "kernels"
