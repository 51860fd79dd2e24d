"""The shortcut benchmark's record and replay: a replay recomputes a recorded fit's alerts from its inputs."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from lightning_xcam.alerts import WarningRule

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shortcuts() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("benchmark_shortcuts", ROOT / "benchmarks" / "shortcuts.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.slow
def test_replay_recomputes_the_alerts_of_a_recorded_fit(shortcuts: ModuleType, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    run = shortcuts.Run("digits-2", seed=0, position="corner", size=3, contrast=1.0, correlation=1.0)
    fitted = shortcuts._execute(run, record=tmp_path)
    recording = shortcuts._recording_path(tmp_path, run)
    assert fitted.alerts, "this tagged run alerts in the benchmark; without alerts the replay proves nothing"

    replayed = shortcuts._replay(recording)
    assert replayed.alerts == fitted.alerts == replayed.recorded_alerts
    assert replayed.gaps == fitted.gaps and replayed.run == run

    # the replay runs the rule anew: a rule that never confirms raises nothing on the same inputs
    monkeypatch.setattr(shortcuts, "WarningRule", lambda: WarningRule(confirm_z=1e9))
    assert shortcuts._replay(recording).alerts == []
