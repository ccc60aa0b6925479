"""Sphinx configuration of rdiag's documentation (``make docs``).

The gallery (``docs/examples/plot_*.py``) is executed at every build by
sphinx-gallery; each example runs on two CPU cores in under a minute. The build
treats warnings as errors (``-W --keep-going`` in the Makefile).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document (and run the gallery on) this checkout
os.environ.setdefault("PYTHONPATH", str(ROOT))  # subprocesses of the examples too
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import rdiag  # noqa: E402

project = "rdiag"
author = "rdiag developers"
copyright = "2026, rdiag developers"
release = rdiag.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    # MathJax served from the built site itself: equations render with no network.
    "sphinx-mathjax-offline",
    "sphinx.ext.viewcode",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "examples/README.rst", "**/*.ipynb", "**.md5"]
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# ---- API reference -------------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True
napoleon_use_ivar = True  # NamedTuple fields: no duplicate attribute entries
# rdiag.functional.SELECTION_DOC, appended to every entry point that selects
# parameters, renders as an argument list.
napoleon_custom_sections = [("Selection keywords", "params_style")]
# Type hints name optional packages' and private aliases' types; they are not
# documented here, so references to them are not errors.
nitpicky = False
suppress_warnings = ["autosummary.import_cycle"]

# ---- the gallery ---------------------------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": "examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": False,
    "only_warn_on_example_error": False,
    "image_scrapers": ("matplotlib",),
    "matplotlib_animations": False,
    "capture_repr": ("_repr_html_", "__repr__"),
    "min_reported_time": 1,
    "show_memory": False,
    "reset_modules": ("matplotlib", "seaborn"),
}

# ---- HTML ----------------------------------------------------------------------------
html_theme = "furo"
html_title = f"rdiag {release}"
html_static_path = ["_static"]
html_css_files = ["rdiag.css"]
html_theme_options = {"sidebar_hide_name": False, "navigation_with_keys": True}
html_show_sourcelink = False


# ---- the API reference page, written from rdiag.__all__ at every build ------------------
#: Public names outside ``rdiag.__all__`` (optional integrations, sinks, the
#: record names): documented with their module path.
EXTRA_API = {
    "Trainer callbacks and sinks": [
        "rdiag.integrations.lightning.RdiagMonitor",
        "rdiag.integrations.hf.RdiagCallback",
        "rdiag.sinks.Sink",
        "rdiag.sinks.TensorBoardSink",
        "rdiag.sinks.WandbSink",
        "rdiag.sinks.MLflowSink",
        "rdiag.sinks.CSVSink",
    ],
    "Reports, verdicts, shards and data": [
        "rdiag.report.build_report",
        "rdiag.report.fits",
        "rdiag.verdicts.judge",
        "rdiag.runs.merge.merge_stores",
        "rdiag.data.sample_batch",
        "rdiag.losses.shift_labels",
        "rdiag.ntk.rules.register_structured_rule",
    ],
    # The names that left the top level in the re-layout (CHANGELOG.md).
    "From their modules: views, operators, solvers, metrics": [
        "rdiag.functional.select_parameters",
        "rdiag.ntk.handle.structured_coverage",
        "rdiag.operators.base.DenseOperator",
        "rdiag.operators.base.ScaledOperator",
        "rdiag.operators.curvature.CurvatureOperator",
        "rdiag.operators.hessian.hvp",
        "rdiag.linalg.power_iteration",
        "rdiag.linalg.power_extreme",
        "rdiag.linalg.lanczos_quadrature",
        "rdiag.linalg.TraceEstimate",
        "rdiag.linalg.hutch_plus_plus",
        "rdiag.linalg.SpectralDensity",
        "rdiag.curvature.multiplier_diagonal",
        "rdiag.curvature.ggn_eigenvalues_from_ntk",
        "rdiag.kernels.KernelStats",
        "rdiag.kernels.kernel_stats",
        "rdiag.metrics.relative_change",
        "rdiag.metrics.kernel_target_alignment",
        "rdiag.metrics.fit_exponent",
    ],
    "From their modules: parametrizations, checks, runs": [
        "rdiag.parametrization.applied_parametrization",
        "rdiag.parametrization.LayerScale",
        "rdiag.parametrization.layer_scales",
        "rdiag.coord_check.CoordCheckResult",
        "rdiag.coord_check.plot_coord_check",
        "rdiag.depth_check.DepthCheckResult",
        "rdiag.meter.MeterResult",
        "rdiag.runs.store.StoreLockedError",
        "rdiag.runs.store.StoreCorruptError",
        "rdiag.runs.store.StoreFullError",
        "rdiag.runs.store.StoreReadOnlyError",
        "rdiag.runs.store.StoreNotADatabaseError",
        "rdiag.data.Dataset",
        "rdiag.runs.training.TrainResult",
    ],
}


def _module_title(module_name: str) -> str:
    import importlib

    doc = importlib.import_module(module_name).__doc__ or module_name
    first = doc.strip().splitlines()[0].strip().rstrip(".")
    # A title is plain text: ":class:`~a.b.C`" -> "C", "``x``" -> "x".
    first = re.sub(r":[\w:]+:`~?([^`]*)`", lambda m: m.group(1).split(".")[-1], first)
    return first.replace("``", "").replace("`", "")


def _write_api(srcdir: Path) -> None:
    """``docs/api.rst``: every name of ``rdiag.__all__``, grouped by defining module.

    Written when this configuration is read, before Sphinx lists its sources (so
    autosummary generates the stubs on a fresh clone too).
    """
    import importlib
    import importlib.util

    groups: dict[str, list[str]] = {}
    aliases: dict[str, list[str]] = {}
    for name in rdiag.__all__:
        if name == "__version__":
            continue
        own = getattr(getattr(rdiag, name), "__name__", name)
        if own != name and own in rdiag.__all__:  # another name of a public object
            aliases.setdefault(own, []).append(name)
            continue
        module = getattr(getattr(rdiag, name), "__module__", "rdiag") or "rdiag"
        key = ".".join(module.split(".")[:2])
        if key.split(".")[-1].startswith("_"):
            key = "rdiag"
        groups.setdefault(key, []).append(name)
    out = [
        ".. This file is written by docs/conf.py at every build; do not edit.",
        "",
        "API reference",
        "=============",
        "",
        "Every name of ``rdiag.__all__`` (``import rdiag``; the version is "
        "``rdiag.__version__``), grouped by the module that defines it, then "
        "the optional integrations and the tools of sweeps and reports, which "
        "are imported from their modules.",
        "",
    ]

    def section(title: str, names: list[str]) -> None:
        out.extend([title, "-" * len(title), "", ".. autosummary::",
                    "   :toctree: generated", "   :nosignatures:", ""])
        out.extend(f"   {n}" for n in names)
        out.append("")

    def target(name: str) -> str:
        # ``rdiag.coord_check`` is both a function and a module: autosummary would
        # document the module, so such a name is given by its defining module.
        if importlib.util.find_spec(f"rdiag.{name}") is not None:
            return f"{getattr(rdiag, name).__module__}.{name}"
        return f"rdiag.{name}"

    for key, names in groups.items():
        title = f"{_module_title(key)} (``{key}``)" if key != "rdiag" else "Top level"
        section(title, [target(n) for n in names])
        for n in names:
            for alias in aliases.get(n, ()):
                out.extend([f"``rdiag.{alias}`` is another name of :class:`{target(n)}`.", ""])
    for title, names in EXTRA_API.items():
        for n in names:  # fail early on a stale name
            module, _, attr = n.rpartition(".")
            getattr(importlib.import_module(module), attr)
        section(title, names)
    text = "\n".join(out)
    path = srcdir / "api.rst"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


_write_api(Path(__file__).resolve().parent)
