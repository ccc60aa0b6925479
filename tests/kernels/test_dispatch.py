"""Dispatch: which implementation runs, forced reference, no-Triton import, and the
child process that runs every ``triton_interpret`` test under the interpreter."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rdiag
from rdiag import _optional, kernels
from rdiag.kernels import reference

HERE = Path(__file__).parent


def test_kernels_under_triton_interpreter():
    """Run the ``triton_interpret`` tests of this directory in a TRITON_INTERPRET=1 child."""
    env = {k: v for k, v in os.environ.items() if k != "RDIAG_KERNELS"}
    env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "triton_interpret"]
    cmd += ["-p", "no:cacheprovider", "-p", "no:randomly", str(HERE)]
    proc = subprocess.run(cmd, env=env, cwd=HERE.parents[1], capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreter tests failed (rc={proc.returncode}):\n{tail}"
    assert " passed" in proc.stdout and "deselected" in proc.stdout, tail
