"""The cost budget: time accounting and the plan of optional parts, on a fake clock."""

from __future__ import annotations

import itertools

import pytest

from lightning_xcam.budget import CostBudget


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _evaluating(costs: dict[str, float] | None = None) -> tuple[CostBudget, FakeClock]:
    """A 10 % budget inside an evaluation that starts after 100 s of training: a 10 s allowance."""
    clock = FakeClock()
    budget = CostBudget(0.1, clock=clock)
    for part, seconds in (costs or {}).items():
        budget.record(part, seconds)
    budget.resume_training()
    clock.now = 100.0
    budget.begin()
    return budget, clock


def test_training_and_evaluation_time_alternate() -> None:
    clock = FakeClock()
    budget = CostBudget(0.1, clock=clock)
    budget.resume_training()
    for train, evaluate in ((100.0, 4.0), (50.0, 6.0)):
        clock.now += train
        budget.begin()
        clock.now += evaluate
        assert budget.overhead == pytest.approx((budget.spent + evaluate) / budget.trained)  # running one counts
        budget.end()
    assert (budget.trained, budget.spent) == (150.0, 10.0)
    assert budget.overhead == pytest.approx(10 / 150)


def test_plan_runs_unmeasured_parts_then_takes_turns_while_they_fit() -> None:
    budget, clock = _evaluating()
    assert budget.plan(["a", "b", "c"]) == ["a", "b", "c"]  # nothing measured yet: all run, to be measured
    budget.record("a", 4.0)
    budget.record("c", 1.0)
    clock.now = 103.0  # 3 s into the evaluation: allowance 0.1·100 − 0 − 3 = 7 s
    assert budget.plan(["a", "c"]) == ["a", "c"]  # 5 s
    budget.record("b", 5.0)
    assert budget.plan(["a", "b", "c"]) == ["a"]  # b would make 9 s, and c may not jump the queue
    budget.end()


def test_a_dear_part_is_not_starved_by_cheap_ones() -> None:
    # 1 s of allowance per 10 s of training; "cheap" alone could eat all of it at every evaluation
    clock = FakeClock()
    budget = CostBudget(0.1, clock=clock)
    budget.record("cheap", 1.0)
    budget.record("dear", 3.0)
    budget.resume_training()
    runs = []
    for _ in range(12):
        clock.now += 10.0
        budget.begin()
        plan = budget.plan(["cheap", "dear"])
        for part in plan:
            clock.now += budget.costs[part]
            budget.record(part, budget.costs[part])
        runs.append(plan)
        budget.end()
    assert sum("dear" in plan for plan in runs) >= 2 and sum("cheap" in plan for plan in runs) >= 2
    assert budget.spent <= 0.1 * budget.trained


def test_estimates_stand_in_until_a_part_is_measured() -> None:
    budget, _ = _evaluating()
    assert budget.plan(["a", "c", "b"], estimates={"a": 6.0, "b": 6.0}) == ["a", "c"]  # c: no estimate, runs
    budget.record("b", 1.0)
    assert budget.plan(["a", "b"], estimates={"a": 6.0, "b": 6.0}) == ["a", "b"]  # b's measurement wins


def test_reserve_keeps_room_for_mandatory_work_still_to_come() -> None:
    budget, _ = _evaluating({"a": 4.0})
    assert budget.plan(["a"], reserve=6.0) == ["a"]
    assert budget.plan(["a"], reserve=6.5) == []


def test_no_share_runs_everything() -> None:
    budget = CostBudget(None, clock=FakeClock())
    budget.record("a", 1e9)
    assert budget.plan(["a", "b"]) == ["a", "b"]


@pytest.mark.parametrize("share", [0, -0.1, float("nan"), float("inf"), True, "2%"])
def test_bad_share_is_refused(share: object) -> None:
    with pytest.raises(ValueError, match="max_overhead"):
        CostBudget(share)  # type: ignore[arg-type]


def test_state_round_trip_keeps_totals_and_costs() -> None:
    clock = FakeClock()
    budget = CostBudget(0.02, clock=clock)
    budget.resume_training()
    clock.now = 10.0
    budget.begin()
    clock.now = 11.0
    budget.end()
    budget.record("insertion", 0.5)
    restored = CostBudget(0.02, clock=itertools.count().__next__)
    restored.load_state_dict(budget.state_dict())
    assert restored.state_dict() == {"trained": 10.0, "spent": 1.0, "costs": {"insertion": 0.5},
                                     "evaluations": 1, "last_run": {"insertion": 1}}


def test_reset_starts_a_new_run_on_the_same_clock() -> None:
    budget, clock = _evaluating({"insertion": 4.0})
    clock.now = 103.0
    budget.end()
    budget.reset()
    assert budget.state_dict() == CostBudget(0.1).state_dict() and budget.overhead == 0.0
    budget.resume_training()
    clock.now = 150.0  # the clock given at construction still drives it
    budget.begin()
    assert budget.trained == 47.0 and budget.share == 0.1

