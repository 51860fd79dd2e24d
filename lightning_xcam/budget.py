"""
Cost budget
===========

Wall-time accounting that keeps optional work inside a share of training time. The clock alternates
between *training* (everything the fit does outside the monitor: steps, validation, checkpoints) and the
monitor's own *evaluations*; optional parts of an evaluation run only while the monitor's total time,
with their expected cost added, stays within ``share × training time``. Nothing here knows Lightning.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["CostBudget"]


class CostBudget:
    """Decide which optional parts of an evaluation fit in a share of the training time so far.

    Call :meth:`resume_training` when training (re)starts, :meth:`begin` and :meth:`end` around each
    evaluation, and :meth:`plan` inside it; :meth:`record` the measured cost of every part that ran. A part
    fits when ``spent + elapsed + planned + cost ≤ share × trained``, where ``spent`` is the monitor's time
    in earlier evaluations, ``elapsed`` the time of the current one so far, ``planned`` the cost of the parts
    already accepted for it and ``cost`` the part's last measured cost (before its first run, the caller's
    estimate; a part with neither runs, to be measured). Parts take turns: the one that waited longest
    comes first and the plan stops at the first that does not fit, so cheap parts never starve a dear one
    (the allowance builds up until it fits). Over a long fit the monitor's share therefore settles at or
    below ``share`` as long as its mandatory work alone costs less.

    Args:
        share: Largest share of training wall time the optional parts may bring the monitor to, or
            ``None`` to run every part at every evaluation.
        clock: Monotonic clock in seconds (``time.perf_counter``; tests pass a fake one).

    Raises:
        ValueError: If ``share`` is not ``None`` or a finite float > 0.

    Example:
        >>> budget = CostBudget(0.02, clock=iter([0.0, 100.0, 100.0, 103.0]).__next__)
        >>> budget.resume_training()            # t = 0: training starts
        >>> budget.begin()                      # t = 100: an evaluation starts after 100 s of training
        >>> budget.record("insertion", 5.0)     # measured at an earlier evaluation, say
        >>> budget.plan(["insertion"])          # 0 + 0 + 5 s > 2 % of 100 s: deferred
        []
        >>> budget.end()                        # t = 103
        >>> round(budget.overhead, 2)
        0.03
    """

    def __init__(self, share: float | None, clock: Callable[[], float] = time.perf_counter) -> None:
        if share is not None and (
            isinstance(share, bool) or not isinstance(share, (int, float)) or not math.isfinite(share) or share <= 0
        ):
            raise ValueError(f"`max_overhead` must be None or a finite float > 0 (0.02 = 2 %), got {share!r}.")
        self.share = None if share is None else float(share)
        self._clock = clock
        self.reset()

    def reset(self) -> None:
        """Forget every total, cost and mark (a new run); the share and the clock stay."""
        self.trained = 0.0
        self.spent = 0.0
        self.costs: dict[str, float] = {}
        self.evaluations = 0
        self.last_run: dict[str, int] = {}
        self._mark: float | None = None
        self._started: float | None = None

    @property
    def overhead(self) -> float:
        """The monitor's time, the running evaluation included, as a share of training time so far (0 before
        any training)."""
        running = 0.0 if self._started is None else self._clock() - self._started
        return (self.spent + running) / self.trained if self.trained > 0 else 0.0

    def resume_training(self) -> None:
        """Training (re)starts now: time from here to the next :meth:`begin` counts as training."""
        self._mark = self._clock()

    def begin(self) -> None:
        """An evaluation starts now; the time since the last mark was training."""
        now = self._clock()
        if self._mark is not None:
            self.trained += now - self._mark
        self._started = now
        self.evaluations += 1

    def end(self) -> None:
        """The evaluation ends now: its time is the monitor's, and training resumes."""
        now = self._clock()
        if self._started is not None:
            self.spent += now - self._started
        self._started, self._mark = None, now

    def plan(
        self, parts: Sequence[str], estimates: Mapping[str, float] | None = None, reserve: float = 0.0
    ) -> list[str]:
        """The parts to run now: in turn (longest-waiting first, then the order given) while they fit.

        Args:
            parts: Names of the optional parts due now, in priority order.
            estimates: Expected seconds of parts never measured yet.
            reserve: Seconds of mandatory work still to come in this evaluation.

        Returns:
            The parts to run, in the order given.
        """
        if self.share is None:
            return list(parts)
        elapsed = 0.0 if self._started is None else self._clock() - self._started
        allowance = self.share * self.trained - self.spent - elapsed - reserve
        chosen, planned = set(), 0.0
        for part in sorted(parts, key=lambda p: self.last_run.get(p, -1)):
            cost = self.costs.get(part, (estimates or {}).get(part))
            if cost is not None and planned + cost > allowance:
                break
            chosen.add(part)
            planned += cost or 0.0
        return [part for part in parts if part in chosen]

    def record(self, part: str, seconds: float) -> None:
        """The measured cost of ``part``, which ran at this evaluation (its estimate for the next ones)."""
        self.costs[part] = float(seconds)
        self.last_run[part] = self.evaluations

    def state_dict(self) -> dict[str, Any]:
        """Plain-typed state for a checkpoint (the clock marks are not kept: a resumed fit restarts them)."""
        return {"trained": self.trained, "spent": self.spent, "costs": dict(self.costs),
                "evaluations": self.evaluations, "last_run": dict(self.last_run)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s totals and costs."""
        self.trained = float(state["trained"])
        self.spent = float(state["spent"])
        self.costs = {str(k): float(v) for k, v in state["costs"].items()}
        self.evaluations = int(state["evaluations"])
        self.last_run = {str(k): int(v) for k, v in state["last_run"].items()}
