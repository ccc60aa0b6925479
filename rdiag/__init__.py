"""rdiag: empirical-NTK and Hessian diagnostics across the lazy-rich scale.

Data flows model -> functional view -> operator -> solver/metric -> Monitor ->
store -> report; the names below are grouped that way. Nothing optional is
imported here (Triton, matplotlib, pandas, PyYAML, scikit-learn load lazily).
"""

from rdiag._version import __version__
from typing import Any

from rdiag.coord_check import CoordCheckResult, coord_check, plot_coord_check
from rdiag.depth_check import DepthCheckResult, depth_check
from rdiag.curvature import (
    curvature_operator,
    ggn_eigenvalues_from_ntk,
    ggn_sharpness_from_ntk,
    hessian_density,
    hessian_trace,
    multiplier_diagonal,
    sharpness,
    top_eigenvalues,
)
from rdiag.data import Dataset, load_data
from rdiag.functional import FunctionalModel, functionalize, select_parameters
from rdiag.harness import TrainConfig, TrainResult, sweep, train
from rdiag.kernels import KernelStats, kernel_stats
from rdiag.meter import LRRule, MeterResult, richness_meter
from rdiag.linalg import (
    EigResult,
    SpectralDensity,
    TraceEstimate,
    hutch_plus_plus,
    hutchinson,
    lanczos,
    lanczos_quadrature,
    power_extreme,
    power_iteration,
    spectral_density,
)
from rdiag.metrics import (
    centered_alignment,
    effective_rank,
    fit_exponent,
    kernel_distance,
    kernel_target_alignment,
    relative_change,
)
from rdiag.models import BNMLP, CNN, MLP, ResMLP, Transformer, make_model
from rdiag.monitor import Monitor
from rdiag.ntk.api import NTKFunction, NTKImplementation, empirical_ntk, ntk_fn
from rdiag.ntk.plan_cache import clear_plan_cache
from rdiag.ntk.structured import structured_coverage
from rdiag.operators.base import DenseOperator, LinearOperator, ScaledOperator
from rdiag.operators.curvature import CurvatureOperator
from rdiag.operators.ggn import FisherOperator, GGNOperator
from rdiag.operators.hessian import HessianOperator, hvp
from rdiag.operators.ntk import NTKOperator
from rdiag.parametrization import (
    LayerScale,
    Branches,
    DepthRule,
    Parametrization,
    applied_parametrization,
    apply_parametrization,
    effective_weights,
    gamma_family,
    layer_scales,
    lr_multipliers,
    make_optimizer,
    parse_parametrization,
    rescale,
    richness,
)
from rdiag.store import (
    Store,
    StoreCorruptError,
    StoreError,
    StoreFullError,
    StoreLockedError,
    StoreNotADatabaseError,
    StoreReadOnlyError,
)

__all__ = [
    "__version__",
    # functional core
    "FunctionalModel",
    "functionalize",
    "select_parameters",
    # eNTK
    "NTKImplementation",
    "NTKFunction",
    "ntk_fn",
    "empirical_ntk",
    "clear_plan_cache",
    "structured_coverage",
    # operators
    "LinearOperator",
    "DenseOperator",
    "ScaledOperator",
    "CurvatureOperator",
    "NTKOperator",
    "HessianOperator",
    "GGNOperator",
    "FisherOperator",
    "hvp",
    # solvers and estimators (any operator)
    "EigResult",
    "lanczos",
    "power_iteration",
    "power_extreme",
    "lanczos_quadrature",
    "TraceEstimate",
    "hutchinson",
    "hutch_plus_plus",
    "SpectralDensity",
    "spectral_density",
    # model-level curvature
    "curvature_operator",
    "multiplier_diagonal",
    "top_eigenvalues",
    "sharpness",
    "hessian_trace",
    "hessian_density",
    "ggn_eigenvalues_from_ntk",
    "ggn_sharpness_from_ntk",
    # metrics
    "KernelStats",
    "kernel_stats",
    "relative_change",
    "kernel_distance",
    "centered_alignment",
    "kernel_target_alignment",
    "effective_rank",
    "fit_exponent",
    # parameterizations and models
    "Parametrization",
    "DepthRule",
    "Branches",
    "richness",
    "gamma_family",
    "parse_parametrization",
    "apply_parametrization",
    "applied_parametrization",
    "LayerScale",
    "layer_scales",
    "effective_weights",
    "lr_multipliers",
    "make_optimizer",
    "rescale",
    "MLP",
    "ResMLP",
    "CNN",
    "Transformer",
    "BNMLP",
    "make_model",
    "CoordCheckResult",
    "coord_check",
    "plot_coord_check",
    "DepthCheckResult",
    "depth_check",
    "MeterResult",
    "LRRule",
    "richness_meter",
    # harness
    "Monitor",
    "Store",
    "StoreError",
    "StoreLockedError",
    "StoreCorruptError",
    "StoreFullError",
    "StoreReadOnlyError",
    "StoreNotADatabaseError",
    "Dataset",
    "load_data",
    "TrainConfig",
    "TrainResult",
    "train",
    "sweep",
]

_MOVED = {
    "ntk_costs": ("rdiag.ntk.api", "ntk_costs", "ntk_fn(model).plan(x1, x2).costs"),
    "write_summary": (
        "rdiag.coord_check",
        "write_summary",
        "CoordCheckResult.save(out_dir)",
    ),
    "preconditioner_diagonal": (
        "rdiag.curvature",
        "multiplier_diagonal",
        "rdiag.multiplier_diagonal",
    ),
    "parse_param": (
        "rdiag.parametrization",
        "parse_parametrization",
        "rdiag.parse_parametrization",
    ),
}


def __getattr__(name: str) -> Any:
    """Names that left the top-level namespace: they work for one more release."""
    if name in _MOVED:
        import importlib

        from rdiag._deprecation import renamed_name

        module, attr, new = _MOVED[name]
        return renamed_name(
            f"rdiag.{name}", new, getattr(importlib.import_module(module), attr)
        )
    raise AttributeError(f"module 'rdiag' has no attribute {name!r}")
