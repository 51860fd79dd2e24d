"""The repository's promises about itself: CI runs exactly the README's test command, and every docstring
example runs as written."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import lightning_xcam

ROOT = Path(__file__).resolve().parents[1]


def _readme_block(marker: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\n```bash\n(.*?)```\n<!-- /{marker} -->", text, re.S)
    assert match, f"README.md has no ```bash block between <!-- {marker} --> markers"
    return [line for line in match.group(1).splitlines() if line.strip()]


def test_ci_installs_what_readme_installs_and_runs_its_test_command() -> None:
    install, *commands = _readme_block("test-command")
    ci = (ROOT / ".ci" / "run").read_text()
    assert install.startswith("pip install ")
    assert install.removeprefix("pip install ") in ci, "the CI install line differs from README's"
    assert commands == ["python -m pytest tests"]
    assert "<!-- test-command -->" in ci, ".ci/run must read its test command from README.md"


MODULES = sorted(info.name for info in pkgutil.walk_packages(lightning_xcam.__path__, "lightning_xcam."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} fail"
