"""The repository's promises about itself: CI runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

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
