"""The README's commands, as a newcomer copies them (issue 26 items 1, 4, 7, 9): every fenced ``bash`` line.

Fast: every command uses the venv's Python (``.venv/bin/python``, as the README says), and every ``-m sdconcepts``
command parses with the real parser (a renamed or removed option fails here). Slow: the blocks run as written, in
order, in an empty folder (what a fresh clone's working folder holds of them), with this interpreter standing in for
``.venv/bin/python``; only the set-up line (pip, the server) and the test command are left out.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from sdconcepts.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
VENV_PYTHON = ".venv/bin/python"


def readme_commands() -> list[str]:
    """Each command of the README's ``bash`` blocks, in order, continuation lines joined."""
    commands: list[str] = []
    for block in re.findall(r"^```bash\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M):
        commands.extend(line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip())
    return commands


def _runnable(command: str) -> bool:
    # The Quick start's set-up (pip install, then the server in the foreground) and the test command itself.
    return "pip install" not in command and "-m pytest" not in command


def test_every_readme_command_uses_the_venv() -> None:
    commands = readme_commands()
    assert len(commands) >= 10
    for command in commands:
        words = shlex.split(command)
        assert words[0] == VENV_PYTHON or "&&" in words, command
    # Inline mentions of the CLI say it the same way (the intro's description of the app aside).
    text = README.read_text(encoding="utf-8").split("## Quick start", 1)[1]
    assert not re.findall(r"(?<![\w/.])python -m sdconcepts", text)


def test_every_readme_cli_command_parses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("photo.png", "mask.png"):  # made by the block's first lines; the parser checks they exist
        (tmp_path / name).write_bytes(b"")
    parsed = 0
    for command in readme_commands():
        words = shlex.split(command)
        if words[:3] != [VENV_PYTHON, "-m", "sdconcepts"]:
            continue
        try:
            build_parser().parse_args(words[3:])
        except SystemExit:
            pytest.fail(f"the README's command does not parse: {command}")
        parsed += 1
    assert parsed >= 10


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path: Path) -> None:
    """About 3 CPU-minutes: the training block's 500 steps and the generate examples' 120 sampling steps."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    for command in filter(_runnable, readme_commands()):
        words = shlex.split(command)
        assert words[0] == VENV_PYTHON, command
        proc = subprocess.run([sys.executable, *words[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, f"{command}\n{proc.stderr[-3000:]}"
    assert (tmp_path / "embeddings" / "toymix.pt").is_file()
    assert (tmp_path / "models" / "hypernetworks" / "toyteal.pt").is_file()


def test_readme_test_command_is_the_fast_tier(pytestconfig: pytest.Config) -> None:
    """The README's test command runs the fast tier only (issue 26 item 7): pyproject's addopts deselect the other
    tiers and the command does not select them again."""
    (command,) = [c for c in readme_commands() if "-m pytest" in c]
    assert " -m slow" not in command and '-m ""' not in command and "-m ''" not in command
    addopts = list(pytestconfig.getini("addopts"))
    marker = addopts[addopts.index("-m") + 1]
    assert all(f"not {tier}" in marker for tier in ("slow", "browser", "hosts")), marker
