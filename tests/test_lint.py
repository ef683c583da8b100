"""The tree passes the linter (ruff, installed with the test extra; rules in ruff.toml), so
that the README's one test command also checks it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_the_tree_passes_ruff():
    # the venv's own ruff first (the one the test extra installed)
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is part of the test extra: pip install '.[test]'"
    result = subprocess.run([ruff, "check", "."], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
