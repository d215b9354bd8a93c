"""The few places gradio 3.41 (A1111), 4.40 (Forge) and 6.x (standalone) differ, behind one small API.

Checked against each version's signatures: event JavaScript is ``_js=`` before 4.0 and ``js=`` after; ``css`` moved
from ``Blocks()`` to ``launch()`` in 6.0; constructor arguments such as ``Gallery(format=)`` exist only in some
versions; ``gr.update`` works everywhere (``Component.update`` and ``gr.Box`` do not, so they are never used).
"""

from __future__ import annotations

import inspect
from typing import Any

import gradio as gr

__all__ = ["GRADIO_MAJOR", "blocks_kwargs", "js_kwargs", "launch_kwargs", "make", "update"]

GRADIO_MAJOR = int(gr.__version__.split(".")[0])

# gradio 3 runs one queued job at a time unless told otherwise, so a streaming Train view would hold back every other
# click (a second Train, Interrupt, txt2img). A1111 itself queues with concurrency_count=64; gradio 4+ sets limits
# per event instead.
QUEUE_KWARGS: dict[str, Any] = {"concurrency_count": 64} if GRADIO_MAJOR < 4 else {}


def js_kwargs(code: str) -> dict[str, Any]:
    """The keyword that attaches browser JavaScript to an event."""
    return {"_js": code} if GRADIO_MAJOR < 4 else {"js": code}


def _parameters(callable_: Any) -> set[str]:
    return set(inspect.signature(callable_).parameters)


def make(component: type[Any], *, optional: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """Build ``component(**kwargs)``, adding each ``optional`` argument only where this gradio version takes it."""
    accepted = _parameters(component.__init__)
    kwargs.update({k: v for k, v in (optional or {}).items() if k in accepted})
    return component(**kwargs)


def blocks_kwargs(css: str | None) -> dict[str, Any]:
    """``gr.Blocks`` arguments: css goes here up to gradio 5, to ``launch`` from 6 (where Blocks warns)."""
    if css and GRADIO_MAJOR < 6 and "css" in _parameters(gr.Blocks.__init__):
        return {"css": css}
    return {}


def launch_kwargs(css: str | None) -> dict[str, Any]:
    if css and "css" in _parameters(gr.Blocks.launch):
        return {"css": css}
    return {}


def update(**kwargs: Any) -> Any:
    return gr.update(**kwargs)
