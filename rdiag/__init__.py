"""rdiag: empirical-NTK and Hessian diagnostics across the lazy-rich scale.

Data flows model -> functional view -> handle / operator -> solver / metric ->
Monitor -> store -> report; the names below are grouped that way. The
top level holds what a user calls; everything else is importable from its
module (``rdiag.linalg``, ``rdiag.metrics``, ``rdiag.parametrization``,
``rdiag.runs``, ...; ARCHITECTURE.md lists them). Nothing optional is imported
here (Triton, matplotlib, pandas, PyYAML, scikit-learn load lazily).
"""

from rdiag._version import __version__
from rdiag.coord_check import coord_check
from rdiag.curvature import (
    curvature_operator,
    ggn_sharpness_from_ntk,
    hessian_density,
    hessian_trace,
    sharpness,
    top_eigenvalues,
)
from rdiag.data import load_data
from rdiag.depth_check import depth_check
from rdiag.functional import FunctionalModel, functionalize
from rdiag.linalg import EigResult, hutchinson, lanczos, spectral_density
from rdiag.meter import LRRule, richness_meter
from rdiag.metrics import centered_alignment, effective_rank, kernel_distance
from rdiag.models import BNMLP, CNN, MLP, ResMLP, Transformer, make_model
from rdiag.monitor import Monitor
from rdiag.ntk.handle import NTKFunction, empirical_ntk, ntk_fn
from rdiag.ntk.planning import NTKImplementation
from rdiag.operators.base import LinearOperator
from rdiag.operators.ggn import FisherOperator, GGNOperator
from rdiag.operators.hessian import HessianOperator
from rdiag.operators.ntk import NTKOperator
from rdiag.parametrization import (
    Branches,
    DepthRule,
    Parametrization,
    apply_parametrization,
    effective_weights,
    gamma_family,
    lr_multipliers,
    make_optimizer,
    parse_parametrization,
    rescale,
    richness,
)
from rdiag.runs.config import TrainConfig
from rdiag.runs.store import Store, StoreError
from rdiag.runs.sweep import sweep
from rdiag.runs.training import train

__all__ = [
    "__version__",
    # functional view
    "FunctionalModel",
    "functionalize",
    # eNTK
    "NTKImplementation",
    "NTKFunction",
    "ntk_fn",
    "empirical_ntk",
    # operators
    "LinearOperator",
    "NTKOperator",
    "HessianOperator",
    "GGNOperator",
    "FisherOperator",
    # solvers and estimators (any operator)
    "EigResult",
    "lanczos",
    "hutchinson",
    "spectral_density",
    # model-level curvature
    "curvature_operator",
    "top_eigenvalues",
    "sharpness",
    "hessian_trace",
    "hessian_density",
    "ggn_sharpness_from_ntk",
    # kernel metrics
    "kernel_distance",
    "centered_alignment",
    "effective_rank",
    # parametrizations and models
    "Parametrization",
    "DepthRule",
    "Branches",
    "richness",
    "gamma_family",
    "parse_parametrization",
    "apply_parametrization",
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
    # checks of a parametrization
    "coord_check",
    "depth_check",
    "richness_meter",
    "LRRule",
    # monitoring, runs and stores
    "Monitor",
    "Store",
    "StoreError",
    "load_data",
    "TrainConfig",
    "train",
    "sweep",
]
