"""What the browser tests share: Debian's chromium and its flags, serving the app under test, and page helpers.

Every test module in tests/browser (and the real-host tests, tests/hosts) imports this module; no test module imports
another. The app runs under ``SDCONCEPTS_APP_PYTHON`` (default: this interpreter), so ``tools/host_stacks.sh`` runs the
same tests against the A1111 and Forge stacks. Screenshots go to ``SDCONCEPTS_BROWSER_OUTPUT`` (default
tests/browser/output/, git-ignored).
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from page_waits import toasts as errors

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
    "--no-first-run", "--disable-component-update", "--disable-sync",
]
# WebGL through SwiftShader instead of --disable-gpu, for pages with gradio 4.40's image editor (the standalone app's
# img2img tab): it draws with WebGL, and without it chromium's renderer stalls on that page (reloads and screenshots
# time out) once the page has been busy a while. The inpaint drawing test keeps CHROMIUM_ARGS (see test_img2img_tab).
WEBGL_CHROMIUM_ARGS = [a for a in CHROMIUM_ARGS if a != "--disable-gpu"] + ["--use-angle=swiftshader",
                                                                          "--enable-unsafe-swiftshader"]
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
OUTPUT = Path(os.environ.get("SDCONCEPTS_BROWSER_OUTPUT", HERE / "output"))
APP_PYTHON = os.environ.get("SDCONCEPTS_APP_PYTHON", sys.executable)
# The default ceiling of every page wait: waits end as soon as the page shows what they wait for, so a generous
# ceiling costs nothing on an idle machine and keeps the tests green on a busy one (load 3-5x the cores).
TIMEOUT_MS = 240_000


def sync_playwright() -> Any:
    """Playwright's sync driver (tests/browser/conftest.py skips every test here when it is not installed)."""
    from playwright.sync_api import sync_playwright as start

    return start()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def model_for_test(tmp: Path) -> tuple[str, int]:
    """The embedded default model when it is installed; otherwise the tiny test model (and say so)."""
    from sdconcepts.model_shape import EMBEDDED_MODEL_DIR as DEFAULT_MODEL_DIR

    if (DEFAULT_MODEL_DIR / "model_index.json").is_file():
        import json

        width = json.loads((DEFAULT_MODEL_DIR / "text_encoder" / "config.json").read_text())["hidden_size"]
        return "-", int(width)
    from sdconcepts.backends.tiny import save_tiny_sd1

    print("note: the embedded default model is not installed; the browser test uses the tiny test model")
    return str(save_tiny_sd1(tmp / "tiny-sd1")), 48


def wait_for_server(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the app exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"the app did not answer within 180 s:\n{log.read_text()[-3000:]}")


# The default run serves the app standalone; CI and tools/host_stacks.sh also run the hosted page.
MODES = [m.strip() for m in os.environ.get("SDCONCEPTS_BROWSER_MODES", "standalone,hosted").split(",") if m.strip()]
# Our txt2img, card pages and generator exist in the standalone app only: inside a host our tab holds the Train tab
# and the embedding tools, and the prompts and card pages are the host's own (ui/app.py build_hosted_ui).
STANDALONE_MODES = [m for m in MODES if m == "standalone"]


@contextmanager
def serve_app(command: list[str], *, port: int, cwd: Path, log: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run ``command`` (an app serving on ``port``) in ``cwd`` with its output in ``log``; yield its URL once it
    answers, and stop it afterwards (terminate, then kill when it does not exit within 20 s)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1", **(env or {}))
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_server(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def app_command(mode: str, port: int, model: str, embeddings: Path, hypernetworks: Path, outputs: Path,
                *extra: str) -> list[str]:
    """The command serving our UI: ``standalone`` (``python -m sdconcepts``, with ``extra`` options) or ``hosted``
    (tests/browser/hosted_app.py); ``model`` is a path, or ``-`` for the default."""
    if mode == "standalone":
        command = [APP_PYTHON, "-m", "sdconcepts", "--port", str(port), "--embeddings-dir", str(embeddings),
                   "--hypernetworks-dir", str(hypernetworks), "--outputs-dir", str(outputs), *extra]
        return command + (["--ckpt", model] if model != "-" else [])
    return [APP_PYTHON, str(HERE / "hosted_app.py"), str(port), model, str(embeddings), str(hypernetworks),
            str(outputs)]


def open_tab(page, label: str) -> None:  # type: ignore[no-untyped-def]
    # Gradio 3 renders tab buttons in .tab-nav; Gradio 4+ gives them role="tab" (6 adds hidden overflow copies).
    buttons = page.locator('#sdconcepts_tabs button[role="tab"], #sdconcepts_tabs .tab-nav button')
    buttons.filter(has_text=label).filter(visible=True).first.click()


def open_sub_tab(page, label: str) -> None:  # type: ignore[no-untyped-def]
    """Open a sub-tab of the Train tab."""
    buttons = page.locator('#sdconcepts_train_tabs button[role="tab"], #sdconcepts_train_tabs .tab-nav button')
    buttons.filter(has_text=label).filter(visible=True).first.click()


def value(page, selector: str) -> str:  # type: ignore[no-untyped-def]
    return str(page.locator(selector).first.input_value())


def wait_for_images(page, timeout: float = 300, expected_error: str = "") -> None:  # type: ignore[no-untyped-def]
    """Until the gallery shows an image; fail at once with the message when gradio shows an error instead."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if page.locator("#sdconcepts_gallery img").count():
            return
        shown = [e for e in errors(page) if not (expected_error and expected_error in e)]
        if shown:
            raise AssertionError(f"generation failed: {shown[0]}")
        page.wait_for_timeout(250)
    raise AssertionError(f"no image in the gallery after {timeout} s")


def text(page, selector: str) -> str:  # type: ignore[no-untyped-def]
    # Gradio 3 repeats an HTML component's elem_id on an inner element, so select our own markup inside it.
    return str(page.locator(selector).first.inner_text())


def set_caret(page, selector: str, position: int) -> None:  # type: ignore[no-untyped-def]
    page.locator(selector).first.evaluate(
        "(el, pos) => { el.focus(); el.setSelectionRange(pos, pos); el.blur(); }", position
    )


def fill(page, selector: str, value: str) -> None:  # type: ignore[no-untyped-def]
    """Type ``value`` into a field and leave it (Tab), so that gradio sees the change."""
    field = page.locator(selector).first
    field.fill(value)
    field.press("Tab")


def choose(page, selector: str, value: str) -> None:  # type: ignore[no-untyped-def]
    """Pick a dropdown value by typing it and pressing Enter: the same keys work in gradio 3.41, 4.x and 6.x, whose
    option lists are built differently. A value the dropdown does not offer is not taken (and fails here)."""
    field = page.locator(f"{selector} input").first
    field.click()
    field.fill(value)
    field.press("Enter")
    deadline = time.monotonic() + 10
    while field.input_value() != value and time.monotonic() < deadline:
        time.sleep(0.05)
    assert field.input_value() == value, field.input_value()


def screenshot(page: Any, path: Path) -> None:
    """A picture of the page for the CI artifacts, not part of what is tested: on gradio 4.40 with --disable-gpu a
    full-page capture of a page holding the img2img tab's WebGL image editor (hidden) can hang in chromium's
    compositor, while the page itself goes on working."""
    try:
        page.screenshot(path=str(path), full_page=True, timeout=15_000)
    except Exception as exc:  # noqa: BLE001 - the artifact is optional
        print(f"screenshot {path.name} not taken: {exc}".splitlines()[0])


@functools.cache
def app_gradio_major() -> int:
    """The major gradio version of the interpreter that serves the app (``SDCONCEPTS_APP_PYTHON``)."""
    version = subprocess.run([APP_PYTHON, "-c", "import gradio; print(gradio.__version__)"], capture_output=True,
                             text=True, check=True).stdout.strip()
    return int(version.split(".")[0])


def calm_animation_frames(page: Any) -> None:
    """On gradio 4.x, run the page's animation frames at 5 per second instead of the display's rate.

    The standalone page on gradio 4.40 asks for every animation frame even when idle (measured: about 100
    callbacks a second, with the img2img tab's WebGL image editor its one canvas, hidden). With SwiftShader
    (``WEBGL_CHROMIUM_ARGS``) each frame is drawn on the CPU, and on a small machine the browser then starves the app
    it tests: 4 SDXL training steps took 100 s instead of 3 s on Forge's stack. Call before ``page.goto``."""
    if app_gradio_major() != 4:
        return
    page.add_init_script(
        "(() => { const next = window.requestAnimationFrame.bind(window);"
        " window.requestAnimationFrame = (callback) => setTimeout(() => next(callback), 200); })()"
    )
