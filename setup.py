"""Packaging for rdiag; ``kernels/`` installs as ``rdiag.kernels``."""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
VERSION = {}
exec((ROOT / "rdiag" / "_version.py").read_text(), VERSION)

EXTRAS = {
    "triton": ["triton>=3.0"],
    "plots": ["matplotlib>=3.7"],
    "data": ["scikit-learn>=1.2"],
    "config": ["PyYAML>=6.0", "tqdm>=4.60"],
    "frames": ["pandas>=1.5"],
    "scipy": ["scipy>=1.10"],
    "ray": ["ray>=2.9"],
    "lightning": ["lightning>=2.1"],
    "hf": ["transformers>=4.40", "accelerate>=1.1"],
    "tensorboard": ["tensorboard>=2.10"],
    "wandb": ["wandb>=0.16"],
    "mlflow": ["mlflow>=2.10"],
}
# Trainers and experiment trackers: not in "all" (heavy); the tests install them.
INTEGRATIONS = ("lightning", "hf", "tensorboard", "wandb", "mlflow")
EXTRAS["all"] = sorted(
    {
        req
        for name, reqs in EXTRAS.items()
        if name not in ("ray", *INTEGRATIONS)
        for req in reqs
    }
)
# The tests start a local Ray cluster (tests/test_ray.py): Ray is in "test".
EXTRAS["test"] = (
    EXTRAS["all"]
    + [req for name in ("ray", *INTEGRATIONS) for req in EXTRAS[name]]
    + ["pytest>=7", "pytest-xdist>=3", "ruff>=0.5"]
)
EXTRAS["bench"] = EXTRAS["test"] + ["pytest-benchmark>=4"]
# The documentation site (`make docs`): Sphinx, the executed gallery and what its
# examples import (the trainers, Ray, TensorBoard: the "test" extra).
EXTRAS["docs"] = EXTRAS["test"] + [
    "sphinx>=7.2",
    "sphinx-gallery>=0.16",
    "furo>=2024.1",
    "myst-parser>=2.0",
    "sphinx-mathjax-offline>=0.0.2",
]

setup(
    name="rdiag",
    version=VERSION["__version__"],
    description="Kernel (eNTK) and Hessian diagnostics for PyTorch across the lazy-rich scale",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=[
        "rdiag",
        "rdiag.operators",
        "rdiag.ntk",
        "rdiag.linalg",
        "rdiag.kernels",
        "rdiag.integrations",
        "rdiag.monitor",
        "rdiag.parametrization",
        "rdiag.runs",
        "rdiag.cli",
    ],
    package_dir={"rdiag.kernels": "kernels"},
    package_data={"rdiag": ["py.typed", "configs/*.yaml"]},
    # torch is not pinned: a bare requirement would pull a CUDA build on a fresh
    # venv, so the README's set-up installs a CPU wheel before this package.
    install_requires=["torch>=2.4", "numpy>=1.23"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["rdiag=rdiag.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: MIT License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
