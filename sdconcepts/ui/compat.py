"""The few places gradio 3.41 (A1111), 4.40 (Forge) and 6.x (standalone) differ, behind one small API.

Checked against each version's signatures: event JavaScript is ``_js=`` before 4.0 and ``js=`` after; ``css`` moved
from ``Blocks()`` to ``launch()`` in 6.0; constructor arguments such as ``Gallery(format=)`` exist only in some
versions; ``gr.update`` works everywhere (``Component.update`` and ``gr.Box`` do not, so they are never used).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Iterator
from typing import Any

import gradio as gr
from gradio import networking

__all__ = [
    "GRADIO_MAJOR", "blocks_kwargs", "describe_events_for_the_page", "js_kwargs", "launch_kwargs", "make",
    "mask_editor", "binary_file", "update", "user_error", "calm_idle_queue", "quiet_client_disconnects",
    "CLIENT_DISCONNECT_FILTER",
]

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


def user_error(message: str) -> Exception:
    """gradio's error toast for a user's mistake, without the traceback gradio prints to the console for every
    ``gr.Error`` (``print_exception``, gradio 4.42+; older versions print it regardless)."""
    return make(gr.Error, optional={"print_exception": False}, message=message)


IDLE_QUEUE_SLEEP_S = 0.05  # gradio's own value on Windows; 50 ms at most before a queued event starts


def calm_idle_queue(blocks: Any) -> None:
    """Let a queued app sleep when idle: gradio 4+'s queue checks for work every 1 ms and for progress every 10 ms
    (except on Windows), which kept an idle server at about 5 % of a core; its Windows values (50 ms, 100 ms) are
    used instead. gradio 3's queue waits on events and has neither attribute."""
    queue = getattr(blocks, "_queue", None)
    if queue is None:
        return
    if hasattr(queue, "sleep_when_free"):
        queue.sleep_when_free = max(queue.sleep_when_free, IDLE_QUEUE_SLEEP_S)
    if hasattr(queue, "progress_update_sleep_when_free"):
        queue.progress_update_sleep_when_free = max(queue.progress_update_sleep_when_free, 2 * IDLE_QUEUE_SLEEP_S)


class _NoClientDisconnects(logging.Filter):
    """Drops the server's traceback for a browser that went away mid-request (starlette's ``ClientDisconnect``: a
    closed tab during an upload); nothing is wrong on the server's side."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        seen = 0
        while error is not None and seen < 10:  # the exception, or one it was raised from
            if type(error).__name__ == "ClientDisconnect":
                return False
            inner = getattr(error, "exceptions", None)  # an ExceptionGroup of one
            error = inner[0] if inner and len(inner) == 1 else (error.__cause__ or error.__context__)
            seen += 1
        return True


CLIENT_DISCONNECT_FILTER = _NoClientDisconnects()


def quiet_client_disconnects() -> None:
    """Install the filter on the loggers that uvicorn reports request errors on (once; the standalone app only)."""
    for name in ("uvicorn.error", "uvicorn"):
        logger = logging.getLogger(name)
        if CLIENT_DISCONNECT_FILTER not in logger.filters:
            logger.addFilter(CLIENT_DISCONNECT_FILTER)


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


def mask_editor(*, label: str, elem_id: str, brush_size: int = 8) -> Any:
    """An image to upload and draw a mask on, in white.

    gradio 3.41: ``Image(source="upload", tool="sketch")`` (A1111's own inpaint canvas), value ``{"image", "mask"}``;
    gradio 4 and later: ``ImageEditor``, value ``{"background", "layers", "composite"}`` (no crop tool: a cropped
    background would no longer match the init image). ``img2img_handlers.editor_parts`` reads either.
    """
    if GRADIO_MAJOR < 4:
        # These arguments exist only in gradio 3, which the type checker does not see.
        sketch: dict[str, Any] = {"source": "upload", "tool": "sketch", "brush_radius": brush_size,
                                  "brush_color": "#ffffff"}
        return gr.Image(label=label, elem_id=elem_id, type="pil", image_mode="RGBA", interactive=True, **sketch)
    brush = gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=brush_size)
    return make(gr.ImageEditor, label=label, elem_id=elem_id, type="pil", sources=["upload"], image_mode="RGBA",
                brush=brush, interactive=True, optional={"transforms": (), "eraser": gr.Eraser(default_size=brush_size)})


def binary_file(*, label: str, elem_id: str) -> Any:
    """A file drop whose value reaches the handler as bytes (``type="binary"`` in every version)."""
    return gr.File(label=label, elem_id=elem_id, type="binary", file_types=["image"])


def describe_events_for_the_page(demo: Any, app: Any, ours: Any) -> int:
    """Gradio 4.x: stop the page's client from warning "Too many arguments provided for the endpoint" for our events.

    The 4.x page submits every event by its numeric id and looks its parameters up in ``/info``'s
    ``unnamed_endpoints``, which the server leaves empty, so each event that sends data logs that warning in the
    browser console (the host's own events too). For the events of ``ours`` (our Blocks, rendered into the host's
    ``demo``), ``/info`` now also lists them by id, with the parameters the server already describes under their API
    name and a placeholder where an input is a State or Button (which the server leaves out). Nothing else changes;
    returns how many events were described (0 outside gradio 4).
    """
    if GRADIO_MAJOR != 4 or demo is None or ours is None:
        return 0
    our_ids = set(getattr(ours, "blocks", {}))
    fns = getattr(demo, "fns", None)
    if not our_ids or not isinstance(fns, dict):
        return 0
    ours_fns = [
        fn for fn in fns.values()
        if any(target[0] in our_ids for target in getattr(fn, "targets", []) if target)
        or any(getattr(block, "_id", None) in our_ids for block in getattr(fn, "inputs", []))
    ]
    original = demo.get_api_info

    def get_api_info(all_endpoints: bool = False) -> Any:
        info = original(all_endpoints=all_endpoints)
        if not isinstance(info, dict):
            return info
        named = info.get("named_endpoints", {})
        unnamed = info.setdefault("unnamed_endpoints", {})
        for fn in ours_fns:
            described = named.get(f"/{fn.api_name}") if isinstance(fn.api_name, str) else None
            if described is None or not fn.inputs:
                continue
            given = iter(described.get("parameters", []))
            parameters = []
            for block in fn.inputs:
                if getattr(block, "skip_api", False):
                    parameters.append({"label": "state", "component": "state", "parameter_name": None,
                                       "parameter_has_default": True, "parameter_default": None, "type": {},
                                       "python_type": {"type": "Any", "description": ""}, "hidden": True})
                else:
                    parameters.append(next(given, {"label": "", "component": "", "type": {}}))
            unnamed[str(fn._id)] = {**described, "parameters": parameters}
        return info

    demo.get_api_info = get_api_info
    # /info caches its first answer on the app; make the next request compute it with our entries.
    for attribute in ("api_info", "all_app_info"):
        if hasattr(app, attribute):
            setattr(app, attribute, None)
    return len(ours_fns)


@contextlib.contextmanager
def patient_localhost_check(seconds: float = 120.0) -> Iterator[None]:
    """While launching, let gradio's "is localhost accessible?" check wait for a busy server.

    ``Blocks.launch`` (3.41, 4.x, 6.x) asks its freshly started server for the page through
    ``gradio.networking.url_ok``, whose request times out after 3 s, and on a timeout refuses to start ("When
    localhost is not accessible, a shareable link must be created"). Rendering our page can take longer on a busy
    CPU (seen on a 2-core machine running other jobs): the app then exits although nothing is wrong. Here the check
    is asked again until it answers yes or ``seconds`` have passed; a server that really cannot be reached still
    fails, after that time.
    """
    original = networking.url_ok

    def url_ok(url: str) -> bool:
        deadline = time.monotonic() + seconds
        while not original(url):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)
        return True

    networking.url_ok = url_ok
    try:
        yield
    finally:
        networking.url_ok = original
