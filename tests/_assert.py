"""One closeness assertion with a report that says where and by how much."""

from __future__ import annotations

import torch
from torch import Tensor


def assert_close(
    name: str, expected: Tensor, actual: Tensor, *, rtol: float, atol: float
) -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` everywhere.

    Raises:
        AssertionError: With the shape, the worst entry and the error norms.
    """
    # Python floats are read as float64 (torch.as_tensor would make them float32).
    expected = torch.as_tensor(expected, dtype=torch.float64).detach().cpu()
    actual = torch.as_tensor(actual, dtype=torch.float64).detach().cpu()
    assert expected.shape == actual.shape, (
        f"{name}: shape mismatch, expected {tuple(expected.shape)}, got {tuple(actual.shape)}"
    )
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    if bool((err <= bound).all()):
        return
    worst = int((err - bound).argmax())
    idx = tuple(
        int(i) for i in torch.unravel_index(torch.tensor(worst), expected.shape)
    )
    rel = float(err.norm() / expected.norm().clamp_min(1e-300))
    raise AssertionError(
        f"{name}: {int((err > bound).sum())}/{err.numel()} entries off (rtol={rtol}, "
        f"atol={atol}); worst at {idx}: expected {float(expected[idx]):.6g}, got "
        f"{float(actual[idx]):.6g}; max abs err {float(err.max()):.3g}, rel Frobenius "
        f"err {rel:.3g}"
    )
