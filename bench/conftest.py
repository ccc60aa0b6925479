"""Shared benchmark fixtures: machine and version metadata in every JSON record."""

from __future__ import annotations

import platform

import pytest
import torch


def pytest_benchmark_update_machine_info(
    config: pytest.Config, machine_info: dict
) -> None:
    machine_info["torch"] = torch.__version__
    machine_info["threads"] = torch.get_num_threads()
    machine_info["cuda"] = (
        torch.cuda.get_device_name() if torch.cuda.is_available() else None
    )
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None
    machine_info["python"] = platform.python_version()
