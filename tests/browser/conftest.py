"""The browser tests: every test here is marked ``browser`` and is skipped where playwright or Debian's chromium is
missing. Shared helpers live in browser_kit.py (no test module imports another)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from browser_kit import CHROMIUM

HERE = Path(__file__).resolve().parent


def _missing() -> str:
    if importlib.util.find_spec("playwright") is None:
        return "pip install playwright (the browser test driver)"
    if not CHROMIUM.exists():
        return "Debian chromium is not installed (apt-get install -y chromium)"
    return ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = _missing()
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.browser)
            if missing:
                item.add_marker(pytest.mark.skip(reason=missing))
