"""Dispatch rules, forced reference, no-Triton import; the interpreter child run.

``test_kernels_under_triton_interpreter`` runs every ``triton_interpret`` test of
this directory in a child process under the interpreter.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rdiag.kernels import reference

import rdiag
from rdiag import _optional, kernels

HERE = Path(__file__).parent


@pytest.mark.slow
def test_kernels_under_triton_interpreter():
    """Run this directory's ``triton_interpret`` tests in a TRITON_INTERPRET=1 child."""
    pytest.importorskip("triton", reason="needs Triton (pip install 'rdiag[triton]')")
    env = {k: v for k, v in os.environ.items() if k != "RDIAG_KERNELS"}
    env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "triton_interpret"]
    cmd += ["-p", "no:cacheprovider", "-p", "no:randomly", str(HERE)]
    proc = subprocess.run(
        cmd, env=env, cwd=HERE.parents[1], capture_output=True, text=True, timeout=600
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, (
        f"interpreter tests failed (rc={proc.returncode}):\n{tail}"
    )
    assert " passed" in proc.stdout and "deselected" in proc.stdout, tail


def _inputs():
    x, g = torch.randn(5, 4), torch.randn(5, 2, 3)
    return x, x[:3], g, g[:3]


def test_cpu_without_interpreter_runs_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("RDIAG_KERNELS", raising=False)
    args = _inputs()
    assert not kernels.use_triton(args[0])
    assert torch.equal(kernels.gram_hadamard(*args), reference.gram_hadamard(*args))
    k0, k1 = torch.randn(4, 4), torch.randn(4, 4)
    assert kernels.kernel_stats(k0, k1).inner == reference.kernel_stats(k0, k1).inner


def test_choice_rules(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("RDIAG_KERNELS", raising=False)
    x = torch.randn(3, 2)
    assert kernels.use_triton(x) == _optional.has_triton()
    assert not kernels.use_triton(x.double()), "float64 always runs the reference"
    monkeypatch.setenv("RDIAG_KERNELS", " Reference ")
    assert not kernels.use_triton(x), "RDIAG_KERNELS=reference forces the reference"
    monkeypatch.setenv("RDIAG_KERNELS", "fast")
    with pytest.raises(ValueError, match="RDIAG_KERNELS to be one of"):
        kernels.use_triton(x)


def test_missing_triton_falls_back_with_one_notice(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("RDIAG_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "has_triton", lambda: False)
    monkeypatch.setattr(_optional, "_WARNED", set())
    args = _inputs()
    with pytest.warns(UserWarning, match="Triton is not installed.*rdiag\\[triton\\]"):
        out = kernels.gram_hadamard(*args)
    assert torch.equal(out, reference.gram_hadamard(*args))


def test_import_and_run_without_triton(monkeypatch):
    """With ``import triton`` failing, the package imports and runs the reference."""
    monkeypatch.setattr(rdiag, "kernels", kernels)  # restored afterwards
    for name in [
        m
        for m in sys.modules
        if m == "triton" or m.startswith(("triton.", "rdiag.kernels"))
    ]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # asks for Triton, which is missing
    monkeypatch.setattr(_optional, "_WARNED", set())
    fresh = importlib.import_module("rdiag.kernels")
    assert fresh is not kernels
    args = _inputs()
    with pytest.warns(UserWarning, match="Triton is not installed"):
        out = fresh.gram_hadamard(*args)
    assert torch.equal(out, reference.gram_hadamard(*args))
    shared = [a.unsqueeze(1) for a in args[:2]] + [a.unsqueeze(2) for a in args[2:]]
    assert fresh.gram_hadamard_shared(*shared).shape == (5, 3, 2, 2)
    assert fresh.kernel_stats(torch.ones(2, 2), torch.eye(2)).sum1 == 2.0
    assert not any(m.startswith("rdiag.kernels.triton") for m in sys.modules)


def test_importing_a_kernel_module_keeps_the_dispatcher():
    pytest.importorskip("triton", reason="needs Triton to import the kernel module")
    module = importlib.import_module("rdiag.kernels.triton_gram_hadamard")
    assert callable(kernels.gram_hadamard) and kernels.gram_hadamard is not module
    from rdiag.kernels import gram_hadamard

    assert gram_hadamard is kernels.gram_hadamard
