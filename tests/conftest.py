"""Shared fixtures: seeds, markers, devices."""

from __future__ import annotations

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cuda: needs a CUDA device (skipped without one)"
    )
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line(
        "markers", "trainers: runs Lightning or the Hugging Face Trainer"
    )
    config.addinivalue_line("markers", "ray: starts a local Ray cluster")


# Whole files whose tests all carry a marker (`make test-fast` leaves them out).
FILE_MARKERS = {"integrations": "trainers", "test_ray.py": "ray"}


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    for item in items:
        for part in item.path.parts[-2:]:
            if part in FILE_MARKERS:
                item.add_marker(FILE_MARKERS[part])
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread():
    # Small matrices on a shared 2-core runner (two xdist workers): threads only contend.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(params=["gram", "per_sample"])
def route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Force every structured eNTK term onto one route (terms without inputs have one).

    Tied parameters only have the Gram route, grouped convolutions only the
    per-sample one.
    """
    from rdiag.ntk import structured

    gram = request.param == "gram"

    def use_gram(t, n1, n2, spec) -> bool:
        if not t.single:
            return True
        return gram and t.f1.x is not None and t.f1.groups == 1

    monkeypatch.setattr(structured, "_use_gram", use_gram)
    return request.param
