"""The Monitor's schedule, its budget plan and its cost report.

A budget is honoured up front: once the first two checks and the training
steps between them have been timed, :func:`plan_budget` picks the stride ``s`` (run every ``s``-th
scheduled check) whose checks fit ``budget_fraction`` of training time, from the
measured cost of a check (its seconds less the one-time planning) and the
measured time of a training step. The Monitor says once what it chose and why,
and lists the scheduled steps it leaves out (``Monitor.skipped_steps``); it never
drops a check otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from rdiag._checks import check_nonnegative_int, check_positive_int

Schedule = int | Sequence[int] | Callable[[int], bool]
#: Steps scanned ahead to find the mean gap of a list or callable schedule.
SCAN = 100_000


def _schedule(every: Schedule) -> Callable[[int], bool]:
    if callable(every):
        return every
    if isinstance(every, int) and not isinstance(every, bool):
        check_positive_int(every, "every")
        return lambda step: step % every == 0
    if isinstance(every, Iterable) and not isinstance(every, (str, bytes)):
        steps = {check_nonnegative_int(s, "each step of every=") for s in every}
        if not steps:
            raise ValueError(
                "expected every= to list at least one step, got an empty list; pass "
                "e.g. every=[0, 10, 100] or every=10"
            )
        return lambda step: step in steps
    raise TypeError(
        f"expected every= as a positive int, a list of steps or a callable step -> bool, "
        f"got {every!r}"
    )


def mean_gap(every: Schedule, scheduled: Callable[[int], bool], after: int) -> float:
    """Mean training steps between the scheduled steps after ``after`` (``inf``: none)."""
    if isinstance(every, int) and not isinstance(every, bool):
        return float(every)
    steps = [s for s in range(after + 1, after + 1 + SCAN) if scheduled(s)]
    if not steps:
        return math.inf
    return (steps[-1] - after) / len(steps)


@dataclass(frozen=True)
class BudgetPlan:
    """The schedule a budget chose (:func:`plan_budget`).

    Attributes:
        stride: Every ``stride``-th scheduled check runs (1: all of them).
        check_steps: Estimated cost of a later check, in training steps.
        gap: Mean training steps between scheduled checks.
        budget_fraction: The budget.
    """

    stride: int
    check_steps: float
    gap: float
    budget_fraction: float

    def __str__(self) -> str:
        share = self.check_steps / self.gap if self.gap > 0 else math.inf
        head = (
            f"rdiag: a check costs about {self.check_steps:.1f} training steps, "
            f"{share:.1%} of the {self.gap:.0f} steps between scheduled checks "
            f"(budget {self.budget_fraction:.0%})"
        )
        if self.stride == 1:
            return head + "; every scheduled check runs"
        return (
            head + f"; running every {self.stride}th scheduled check (the others are "
            "listed in Monitor.skipped_steps); pass budget_fraction=None to run them all "
            "or a larger every= to space them yourself"
        )


def plan_budget(
    check_seconds: float, step_seconds: float, gap: float, budget_fraction: float
) -> BudgetPlan:
    """The smallest stride whose checks cost at most ``budget_fraction`` of training.

    Args:
        check_seconds: Seconds of one later check (planning excluded).
        step_seconds: Seconds of one training step.
        gap: Mean training steps between scheduled checks.
        budget_fraction: Diagnostics time over training time allowed.
    """
    steps = check_seconds / step_seconds if step_seconds > 0 else math.inf
    if not math.isfinite(gap):
        return BudgetPlan(1, steps, gap, budget_fraction)
    if not math.isfinite(steps):
        stride = 1_000_000
    else:
        stride = max(1, math.ceil(steps / (budget_fraction * gap) - 1e-9))
    return BudgetPlan(stride, steps, gap, budget_fraction)


@dataclass(frozen=True)
class CostReport:
    """What a Monitor's diagnostics cost (:meth:`Monitor.cost`).

    Attributes:
        checks: Checks run.
        skipped: Scheduled checks the budget left out (their steps:
            ``Monitor.skipped_steps``).
        seconds: Seconds spent in diagnostics (planning included).
        train_seconds: Training seconds they are compared with.
        budget_fraction: The budget (a fraction of training time), or ``None``.
        planning: Seconds of one-time planning (eNTK plans, operators, forward-mode
            probes), per metric unit; not part of ``per_check``.
        first: Seconds of the first check per metric unit (and ``"forward"``: the
            shared probe forward pass), planning excluded.
        per_check: Mean seconds per later check per metric unit (empty before a
            second check).
        step_seconds: Mean seconds of a training step (``nan`` before any).
        plan: The schedule the budget chose (``None``: no budget, or not yet).
    """

    checks: int
    skipped: int
    seconds: float
    train_seconds: float
    budget_fraction: float | None
    planning: Mapping[str, float] = field(default_factory=dict)
    first: Mapping[str, float] = field(default_factory=dict)
    per_check: Mapping[str, float] = field(default_factory=dict)
    step_seconds: float = math.nan
    plan: BudgetPlan | None = None

    @property
    def fraction(self) -> float:
        """Diagnostics time over training time (``nan`` before any training time)."""
        return self.seconds / self.train_seconds if self.train_seconds > 0 else math.nan

    def steps(self, seconds: float) -> float:
        """``seconds`` in training steps (``nan`` before a step was timed)."""
        return seconds / self.step_seconds if self.step_seconds > 0 else math.nan

    def table(self) -> str:
        """Per metric unit: planning, first and later check, seconds and training steps."""
        units = list(dict.fromkeys([*self.planning, *self.first, *self.per_check]))
        lines = [f"{'unit':<16}{'planning':>18}{'first check':>18}{'later check':>18}"]

        def cell(values: Mapping[str, float], unit: str) -> str:
            if unit not in values:
                return f"{'-':>18}"
            s = values[unit]
            return f"{s:>9.3f} s{self.steps(s):>6.1f} st"

        for unit in units:
            lines.append(
                f"{unit:<16}"
                + cell(self.planning, unit)
                + cell(self.first, unit)
                + cell(self.per_check, unit)
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        budget = (
            "no budget"
            if self.budget_fraction is None
            else f"budget {self.budget_fraction:.0%} of training time"
        )
        later = sum(self.per_check.values())
        per = (
            f"; a later check {later:.2f} s = {self.steps(later):.1f} training steps"
            if self.per_check
            else ""
        )
        return (
            f"rdiag: {self.checks} checks run, {self.skipped} skipped ({budget}); "
            f"{self.seconds:.2f} s spent, {self.fraction:.1%} of {self.train_seconds:.2f} s "
            f"of training{per}; planning {sum(self.planning.values()):.2f} s"
        )
