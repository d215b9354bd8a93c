"""``run_cli``: the command line run as a user runs it, a subprocess of ``python -m sdconcepts`` (tests/cli/test_cli.py
and the CLI tests of other packages use it; tests/conftest.py's folder is on sys.path, so ``from cli_process import``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "sdconcepts", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)
