"""Matrix-free solvers and estimators on any :class:`~rdiag.operators.base.LinearOperator`."""

from rdiag.linalg.density import SpectralDensity, lanczos_quadrature, spectral_density
from rdiag.linalg.lanczos import EigResult, lanczos
from rdiag.linalg.moments import Estimate, KernelMoments, kernel_moments
from rdiag.linalg.power import power_extreme, power_iteration
from rdiag.linalg.trace import TraceEstimate, hutch_plus_plus, hutchinson

__all__ = [
    "EigResult",
    "Estimate",
    "KernelMoments",
    "kernel_moments",
    "SpectralDensity",
    "TraceEstimate",
    "hutch_plus_plus",
    "hutchinson",
    "lanczos",
    "lanczos_quadrature",
    "power_extreme",
    "power_iteration",
    "spectral_density",
]
