"""rdiag: empirical-NTK and Hessian diagnostics across the lazy-rich scale.

Data flows model -> functional view -> operator -> solver/metric -> Monitor ->
store -> report; the names below are grouped that way. Nothing optional is
imported here (Triton, matplotlib, pandas, PyYAML, scikit-learn load lazily).
"""

from rdiag._version import __version__
from rdiag.coord_check import (
    CoordCheckResult,
    coord_check,
    plot_coord_check,
    write_summary,
)
from rdiag.curvature import (
    curvature_operator,
    ggn_eigenvalues_from_ntk,
    ggn_sharpness_from_ntk,
    hessian_density,
    hessian_trace,
    preconditioner_diagonal,
    sharpness,
    top_eigenvalues,
)
from rdiag.data import Dataset, load_data
from rdiag.functional import FunctionalModel, functionalize, select_parameters
from rdiag.harness import TrainConfig, TrainResult, sweep, train
from rdiag.kernels import KernelStats, kernel_stats
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
from rdiag.models import BNMLP, CNN, MLP, Transformer, make_model
from rdiag.monitor import Monitor
from rdiag.ntk.api import NTKImplementation, empirical_ntk, ntk_costs
from rdiag.ntk.structured import structured_coverage
from rdiag.operators.base import DenseOperator, LinearOperator, ScaledOperator
from rdiag.operators.ggn import FisherOperator, GGNOperator
from rdiag.operators.hessian import HessianOperator, hvp
from rdiag.operators.ntk import NTKOperator
from rdiag.parametrization import (
    Parametrization,
    apply_parametrization,
    effective_weights,
    gamma_family,
    lr_multipliers,
    make_optimizer,
    parse_param,
    rescale,
    richness,
)
from rdiag.store import Store, StoreCorruptError, StoreError, StoreLockedError

__all__ = [
    "__version__",
    # functional core
    "FunctionalModel",
    "functionalize",
    "select_parameters",
    # eNTK
    "NTKImplementation",
    "empirical_ntk",
    "ntk_costs",
    "structured_coverage",
    # operators
    "LinearOperator",
    "DenseOperator",
    "ScaledOperator",
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
    "preconditioner_diagonal",
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
    "richness",
    "gamma_family",
    "parse_param",
    "apply_parametrization",
    "effective_weights",
    "lr_multipliers",
    "make_optimizer",
    "rescale",
    "MLP",
    "CNN",
    "Transformer",
    "BNMLP",
    "make_model",
    "CoordCheckResult",
    "coord_check",
    "write_summary",
    "plot_coord_check",
    # harness
    "Monitor",
    "Store",
    "StoreError",
    "StoreLockedError",
    "StoreCorruptError",
    "Dataset",
    "load_data",
    "TrainConfig",
    "TrainResult",
    "train",
    "sweep",
]
