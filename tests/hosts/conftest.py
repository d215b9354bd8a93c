"""Fixtures for the real-host tests: launched A1111 1.10.1 / Forge / reForge / Forge-Classic trees, and a Playwright page on Debian's chromium.

The hosts are prepared by ``tools/host_tests.sh`` (which then runs this package with the environment below). In the
plain ``python -m pytest -q`` run these variables are absent and every test here is skipped; with
``SDCONCEPTS_HOSTS_REQUIRED=1`` (set by tools/host_tests.sh) a skip is reported as a failure instead.

    SDCONCEPTS_{A1111,FORGE,REFORGE,CLASSIC}_DIR  prepared trees (prepare.sh DEST; extensions/sdconcepts installed)
    SDCONCEPTS_HOST_KIT                           the kit folder (launch.sh, stop.sh)
    SDCONCEPTS_HOST_CHECKPOINT                    the random SD 1.5 file (default: built into the hosts cache)
    SDCONCEPTS_HOST_CHECKPOINT_SD2                the random SD 2.1 file (default: likewise)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
# browser_kit, page_waits: chromium and the page waits the browser tests use too
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "browser"))

import host_harness as hh  # noqa: E402
from browser_kit import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

HERE = Path(__file__).resolve().parent
_REQUIRED = os.environ.get(hh.ENV_REQUIRED) == "1"


def _host_dirs() -> dict[str, Path]:
    return {kind: Path(os.environ[var]) for kind, var in hh.ENV_DIRS.items() if os.environ.get(var)}


def _launch_group(item: pytest.Item) -> tuple[int, str]:
    """(order, host) of the host configuration a test needs; tests of one configuration run together, so that each is
    launched once: A1111 (its file order starts with the test that launches it without our extension, then with it),
    Forge, Forge on the SD 2 file, reForge, Forge-Classic."""
    fixtures = getattr(item, "fixturenames", ())
    name = Path(str(item.fspath)).name
    if "reforge" in name:
        return 3, "reforge"
    if "classic" in name:
        return 4, "classic"
    if "forge_sd2" in fixtures:
        return 2, "forge"
    return (1, "forge") if "forge" in name else (0, "a1111")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    dirs = _host_dirs()
    prepared = bool(dirs)
    ours = [item for item in items if HERE in Path(str(item.fspath)).resolve().parents]
    if prepared:
        # A run narrowed to some hosts (SDCONCEPTS_HOSTS="forge" tools/host_tests.sh): the tests of the hosts it did
        # not prepare are deselected, not failed at setup. A full run (CI) prepares every host, so nothing is.
        other = [item for item in ours if _launch_group(item)[1] not in dirs]
        if other:
            config.hook.pytest_deselected(items=other)
            items[:] = [item for item in items if item not in other]
            ours = [item for item in ours if item not in other]
    if ours:
        first = items.index(ours[0])
        rest = [item for item in items if item not in ours]
        items[:] = rest[:first] + sorted(ours, key=_launch_group) + rest[first:]
    skip = pytest.mark.skip(reason="real hosts not prepared: run tools/host_tests.sh")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.hosts)
            if not prepared:
                item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if _REQUIRED and report.skipped and HERE in Path(str(item.fspath)).resolve().parents:
        # tools/host_tests.sh must run every host test: a skip there means something is missing.
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped while {hh.ENV_REQUIRED}=1: {reason}"


@pytest.fixture(scope="session")
def host_checkpoint() -> Path:
    """The random-weight SD 1.5 single file the hosts load (built into the cache when not given)."""
    given = os.environ.get(hh.ENV_CHECKPOINT)
    if given:
        return Path(given)
    return _random_checkpoint("sd1")


def _random_checkpoint(family: str) -> Path:
    import random_checkpoint

    cache = os.environ.get("SDCONCEPTS_HOSTS_CACHE") or "/var/cache/sdconcepts/hosts"
    return random_checkpoint.ensure_checkpoint(Path(cache) / "checkpoints", family)


@pytest.fixture(scope="session")
def host_checkpoint_sd2() -> Path:
    """The random-weight SD 2.1 single file (built into the cache when not given)."""
    given = os.environ.get(hh.ENV_CHECKPOINT_SD2)
    return Path(given) if given else _random_checkpoint("sd2")


@pytest.fixture(scope="session")
def host_manager(host_checkpoint: Path) -> Iterator[hh.HostManager]:
    """Launches hosts on demand (one at a time) and stops them at the end of the session; prints launch times."""
    dirs = _host_dirs()
    if not dirs:
        pytest.skip("real hosts not prepared: run tools/host_tests.sh")
    kit = Path(os.environ.get(hh.ENV_KIT, "/work/shared/hosts"))
    if not (kit / "launch.sh").is_file():
        pytest.skip(f"host kit not found at {kit} (set {hh.ENV_KIT})")
    manager = hh.HostManager(dirs, kit, host_checkpoint)
    _MANAGERS.append(manager)
    try:
        yield manager
    finally:
        manager.stop_all()


_MANAGERS: list[hh.HostManager] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """How long each host launch took (launch.sh until ready), next to pytest's --durations."""
    for manager in _MANAGERS:
        for what, seconds in manager.timings:
            terminalreporter.write_line(f"[hosts] {what}: {seconds:.0f}s until ready")


def _host(manager: hh.HostManager, kind: str, *, extension: bool = True) -> hh.Host:
    if kind not in manager.dirs:
        pytest.skip(f"{kind} not prepared (set {hh.ENV_DIRS[kind]})")
    return manager.get(kind, extension=extension)


@pytest.fixture
def a1111(host_manager: hh.HostManager) -> hh.Host:
    """A1111 1.10.1 running with our extension (launched on first use; other hosts are stopped first)."""
    return _host(host_manager, "a1111")


@pytest.fixture
def a1111_without_extension(host_manager: hh.HostManager) -> hh.Host:
    """The same A1111 tree launched with ``--disable-extra-extensions``: only its built-in extensions run."""
    return _host(host_manager, "a1111", extension=False)


@pytest.fixture
def forge(host_manager: hh.HostManager) -> hh.Host:
    """Forge (dfdcbab6) running with our extension (launched on first use; other hosts are stopped first)."""
    return _host(host_manager, "forge")


@pytest.fixture
def reforge(host_manager: hh.HostManager) -> hh.Host:
    """reForge (3b56b268, an old-Forge fork) running with our extension."""
    return _host(host_manager, "reforge")


@pytest.fixture
def classic(host_manager: hh.HostManager) -> hh.Host:
    """Forge-Classic (1f95d717, an old-Forge fork) running with our extension."""
    return _host(host_manager, "classic")


@pytest.fixture
def forge_sd2(host_manager: hh.HostManager, host_checkpoint_sd2: Path) -> hh.Host:
    """Forge launched on the random SD 2.1 file (``--ckpt``), with our extension."""
    if "forge" not in host_manager.dirs:
        pytest.skip(f"forge not prepared (set {hh.ENV_DIRS['forge']})")
    return host_manager.get("forge", extra_flags=("--ckpt", str(host_checkpoint_sd2)))


@pytest.fixture(scope="session")
def chromium_browser() -> Iterator[Any]:
    """Playwright's chromium driver on Debian's /usr/bin/chromium (never a downloaded browser)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the browser test driver)")
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(chromium_browser: Any) -> Iterator[Any]:
    """A fresh page (own context, 1400x1000); browser console messages are kept in ``page.console_messages``."""
    context = chromium_browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(120_000)
    pg = context.new_page()
    messages: list[str] = []
    pg.on("console", lambda msg: messages.append(f"{msg.type}: {msg.text}"))
    pg.console_messages = messages
    try:
        yield pg
    finally:
        context.close()
