"""rdiag: empirical-NTK and Hessian diagnostics across the lazy-rich scale."""

from rdiag._version import __version__
from rdiag.functional import FunctionalModel, functionalize, select_parameters
from rdiag.ntk.api import NTKImplementation, empirical_ntk, ntk_costs
from rdiag.operators.base import DenseOperator, LinearOperator, ScaledOperator
from rdiag.operators.ntk import NTKOperator

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
    # operators
    "LinearOperator",
    "DenseOperator",
    "ScaledOperator",
    "NTKOperator",
]
