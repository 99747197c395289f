"""`.ci/run` takes the README's two set-up commands from README.md, so they cannot drift."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _print(repo: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(repo / ".ci" / "run"), "--print"], capture_output=True, text=True, timeout=60)


def test_ci_runs_the_readme_commands_verbatim():
    res = _print(REPO)
    assert res.returncode == 0, res.stderr
    demo, tests = res.stdout.splitlines()
    readme = (REPO / "README.md").read_text().splitlines()
    assert demo in readme and tests in readme  # verbatim lines of the README
    for cmd in (demo, tests):
        assert cmd.startswith("python3 -m venv .venv && ")  # each makes its own environment
    assert demo.endswith(".venv/bin/metarec demo")
    assert demo.count(".venv/bin/pip install -q ") == 2  # quiet: the table is not buried under pip output
    assert "'.[test]'" not in demo  # the demo works with the base install
    assert tests.endswith(".venv/bin/pytest -q")


def test_ci_fails_when_a_readme_command_is_missing(tmp_path):
    (tmp_path / ".ci").mkdir()
    shutil.copy(REPO / ".ci" / "run", tmp_path / ".ci" / "run")
    readme = (REPO / "README.md").read_text()
    (tmp_path / "README.md").write_text(readme.replace("**Run the built-in demo**", "**Try the demo**"))
    res = _print(tmp_path)
    assert res.returncode == 1
    assert res.stderr.strip() == "ci: README.md: no single-line ```bash block after the line starting with '**Run the built-in demo**'"
