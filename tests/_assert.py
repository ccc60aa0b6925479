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


def assert_rel_error(
    name: str, expected: Tensor, actual: Tensor, *, tol: float
) -> None:
    """Assert ``||actual - expected||_F <= tol * ||expected||_F`` and every entry finite.

    The measure for low-precision arithmetic (TF32, bfloat16), whose error is
    relative to the size of the whole result rather than to each entry.

    Raises:
        AssertionError: With the shape, the relative error and the bound.
    """
    expected = torch.as_tensor(expected, dtype=torch.float64).detach().cpu()
    actual = torch.as_tensor(actual, dtype=torch.float64).detach().cpu()
    assert expected.shape == actual.shape, (
        f"{name}: shape mismatch, expected {tuple(expected.shape)}, got {tuple(actual.shape)}"
    )
    assert bool(actual.isfinite().all()), f"{name}: non-finite entries in the result"
    rel = float((actual - expected).norm() / expected.norm().clamp_min(1e-300))
    assert rel <= tol, (
        f"{name}: relative Frobenius error {rel:.3g} over {tol:.1g} "
        f"(shape {tuple(expected.shape)})"
    )


#: Records that time the run, not the model (they differ between runs); also every
#: ``cost/<unit>`` record.
TIMING = ("monitor/seconds", "monitor/train_seconds", "monitor/check_steps")


def assert_same_records(
    expected: list[dict], actual: list[dict], *, rtol: float, atol: float
) -> None:
    """Assert two Monitor histories hold the same checks, names and values.

    Raises:
        AssertionError: Naming the step and record that differ.
    """
    assert [h["step"] for h in actual] == [h["step"] for h in expected]
    for want, got in zip(expected, actual):
        assert set(got) == set(want), (want["step"], set(got) ^ set(want))
        for key, value in want.items():
            if key not in TIMING and not key.startswith("cost/"):
                assert abs(got[key] - value) <= atol + rtol * abs(value), (
                    f"step {want['step']}, {key}: expected {value}, got {got[key]}"
                )
