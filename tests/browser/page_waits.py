"""Waiting for text on a page, shared by the browser tests (our app) and the real-host tests (inside A1111/Forge).

Only Playwright's page API is used, so one function serves gradio 3, 4 and 6 pages alike.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["toasts", "wait_text"]


def toasts(page: Any) -> list[str]:
    """The error messages gradio shows as toasts (same class in gradio 3, 4 and 6)."""
    return [str(t) for t in page.locator(".toast-body").all_inner_texts()]


def wait_text(page: Any, selector: str, text: str, timeout: float = 240, *, fail_on: tuple[str, ...] = (),
              error_boxes: str = "", poll_ms: int = 250) -> str:
    """The element's text once it contains ``text``. Fails at once when gradio shows an error toast, when the
    element shows one of ``fail_on``, or when an element matching ``error_boxes`` (a CSS selector of the page's own
    error boxes) holds text."""
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        locator = page.locator(selector)
        seen = locator.first.inner_text() if locator.count() else ""
        if text in seen:
            return str(seen)
        if any(bad in seen for bad in fail_on):
            raise AssertionError(f"{selector} shows {seen!r}")
        if error_boxes:
            refused = [t for t in page.locator(error_boxes).all_inner_texts() if t.strip()]
            if refused:
                raise AssertionError(f"the page refused: {refused}")
        errors = toasts(page)
        if errors:
            raise AssertionError(f"gradio error: {errors[0]}")
        page.wait_for_timeout(poll_ms)
    raise AssertionError(f"{text!r} not in {selector} after {timeout} s; it shows {seen!r}")
