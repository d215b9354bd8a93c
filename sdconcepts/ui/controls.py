"""Component groups the txt2img and img2img tabs share: the generation settings, a card tab, the error guard.

Each builder takes an id prefix, so txt2img keeps its ids (``sdconcepts_steps``) and img2img gets its own
(``sdconcepts_img2img_steps``); the handlers behind them are the same functions.
"""

from __future__ import annotations

import html
import itertools
from typing import Any

import gradio as gr

from sdconcepts.generation import SAMPLERS
from sdconcepts.ui import handlers
from sdconcepts.ui.cards import SORT_KEYS
from sdconcepts.ui.compat import update, user_error
from sdconcepts.ui.ui_session import UiError, UiSession
from sdconcepts.user_metadata import SD_VERSIONS

__all__ = ["GENERATION_INPUTS", "card_outputs", "card_tab", "generation_controls", "guard", "wire_seed_buttons"]

# The order ``handlers.generation_params`` takes the settings in (after prompt and negative prompt).
GENERATION_INPUTS = ("sampler", "steps", "cfg_scale", "seed", "width", "height", "batch_size", "batch_count")


def guard(function: Any) -> Any:
    """Show a handler's ``UiError`` as gradio's error message instead of a traceback."""

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except UiError as exc:
            raise user_error(str(exc)) from None

    wrapped.__name__ = function.__name__
    wrapped.__doc__ = function.__doc__
    return wrapped


def generation_controls(prefix: str) -> dict[str, Any]:
    """Sampler, steps, CFG scale, seed (with its Random and Reuse buttons), size and batch; ids ``{prefix}steps``..."""
    c: dict[str, Any] = {}
    c["sampler"] = gr.Dropdown(list(SAMPLERS), value="Euler a", label="Sampling method", elem_id=f"{prefix}sampler")
    c["steps"] = gr.Slider(1, 150, value=20, step=1, label="Sampling steps", elem_id=f"{prefix}steps")
    c["cfg_scale"] = gr.Slider(1.0, 30.0, value=7.0, step=0.5, label="CFG scale", elem_id=f"{prefix}cfg_scale")
    with gr.Row():
        c["seed"] = gr.Number(value=-1, label="Seed (-1: random)", precision=0, elem_id=f"{prefix}seed", scale=4)
        c["random_seed"] = gr.Button("Random", elem_id=f"{prefix}random_seed", scale=1, min_width=80)
        c["reuse_seed"] = gr.Button("Reuse", elem_id=f"{prefix}reuse_seed", scale=1, min_width=80)
    with gr.Row():
        c["width"] = gr.Slider(0, 2048, value=0, step=8, label="Width (0: the model's size)", elem_id=f"{prefix}width")
        c["height"] = gr.Slider(0, 2048, value=0, step=8, label="Height (0: the model's size)",
                                elem_id=f"{prefix}height")
    with gr.Row():
        c["batch_count"] = gr.Slider(1, 100, value=1, step=1, label="Batch count", elem_id=f"{prefix}batch_count")
        c["batch_size"] = gr.Slider(1, 8, value=1, step=1, label="Batch size", elem_id=f"{prefix}batch_size")
    # Not one of GENERATION_INPUTS (it is no generation parameter and stays out of the infotext): the tabs pass it
    # to ``handlers.generate`` after them.
    c["compile_unet"] = gr.Checkbox(value=False, label="Compile the UNet (torch.compile: a slow first image, faster "
                                    "ones after; eager where this machine cannot compile)",
                                    elem_id=f"{prefix}compile_unet")
    return c


def wire_seed_buttons(controls: dict[str, Any], seeds: Any, selected: Any) -> None:
    controls["random_seed"].click(handlers.random_seed, inputs=None, outputs=[controls["seed"]])
    controls["reuse_seed"].click(handlers.reuse_seed, inputs=[seeds, selected, controls["seed"]],
                                 outputs=[controls["seed"]])


def card_tab(kind: str, label: str, view: handlers.CardsView) -> dict[str, Any]:
    with gr.Row(elem_classes=["sdconcepts-controls"]):
        search = gr.Textbox(
            label="Search", placeholder="Filter by name, folder or hash", elem_id=f"sdconcepts_{kind}_search",
            scale=3, max_lines=1,
        )
        sort = gr.Radio(list(SORT_KEYS), value="Name", label="Sort by", elem_id=f"sdconcepts_{kind}_sort", scale=2)
        descending = gr.Checkbox(value=False, label="Descending", elem_id=f"sdconcepts_{kind}_descending", scale=1)
        page = gr.Number(value=1, label="Page", precision=0, elem_id=f"sdconcepts_{kind}_page", scale=1,
                         min_width=80)
        refresh = gr.Button("Refresh", elem_id=f"sdconcepts_{kind}_refresh", scale=1)
    summary = gr.HTML(f'<div class="sdconcepts-summary">{view.summary}</div>', elem_id=f"sdconcepts_{kind}_summary")
    cards = gr.HTML(view.cards_html, elem_id=f"sdconcepts_{kind}_cards", label=label)
    skipped = gr.HTML(view.skipped_html, elem_id=f"sdconcepts_{kind}_skipped")
    editor = metadata_editor(kind)
    with gr.Row(elem_classes=["sdconcepts-hidden"]):
        # Clicked by javascript/sdconcepts.js once typing in the search box pauses, and again when an answer for
        # older text arrives with no newer request on its way (gradio 3.41 drops an event that comes while the
        # previous one of the same kind is still running; 4 and 6 drop a second click): the search box itself
        # sends nothing per keystroke, the page filters the shown cards meanwhile.
        search_go = gr.Button("Search", elem_id=f"sdconcepts_{kind}_search_go")
    return {"search": search, "sort": sort, "descending": descending, "refresh": refresh, "page": page,
            "summary": summary, "cards": cards, "skipped": skipped, "editor": editor, "search_go": search_go}


def metadata_editor(kind: str) -> dict[str, Any]:
    """A1111's user-metadata editor: opened by a card's edit button (javascript/sdconcepts.js writes the card's
    path into the hidden ``path`` box of the card's own tab and clicks the hidden ``open`` button)."""
    prefix = f"sdconcepts_{kind}_meta"
    with gr.Row(elem_classes=["sdconcepts-hidden"]):
        path = gr.Textbox(value="", label="File", elem_id=f"{prefix}_path", max_lines=1)
        open_button = gr.Button("Edit", elem_id=f"{prefix}_open")
    with gr.Group(visible=False, elem_id=f"{prefix}_editor") as box:
        title = gr.HTML("", elem_id=f"{prefix}_title")
        description = gr.Textbox(label="Description", lines=3, elem_id=f"{prefix}_description")
        sd_version = gr.Dropdown(list(SD_VERSIONS), value="Unknown", label="Stable Diffusion version",
                                 elem_id=f"{prefix}_sd_version")
        activation = gr.Textbox(label="Activation text (added to the prompt with the card)", max_lines=1,
                                elem_id=f"{prefix}_activation")
        weight = gr.Slider(0.0, 2.0, value=0.0, step=0.01, label="Preferred weight (0: the default multiplier)",
                           elem_id=f"{prefix}_weight")
        negative = gr.Textbox(label="Negative prompt (added to the negative prompt with the card)", max_lines=1,
                              elem_id=f"{prefix}_negative")
        notes = gr.Textbox(label="Notes", lines=4, elem_id=f"{prefix}_notes")
        with gr.Row():
            cancel = gr.Button("Cancel", elem_id=f"{prefix}_cancel")
            save = gr.Button("Save", variant="primary", elem_id=f"{prefix}_save")
        status = gr.HTML("", elem_id=f"{prefix}_status")
    return {"path": path, "open": open_button, "box": box, "title": title, "description": description,
            "sd_version": sd_version, "activation": activation, "weight": weight, "negative": negative,
            "notes": notes, "cancel": cancel, "save": save, "status": status}


def wire_metadata_editor(session: UiSession, editor: dict[str, Any],
                         after_save: tuple[Any, list[Any], list[Any]]) -> None:
    fields = [editor[k] for k in ("description", "sd_version", "activation", "weight", "negative", "notes")]

    def on_open(path: str):
        form = handlers.metadata_form(session, path)
        status = f'<div class="sdconcepts-warnings">{html.escape(form.status)}</div>' if form.status else ""
        return (update(visible=True), f"<h4>{html.escape(form.title)}</h4>", form.description, form.sd_version,
                form.activation_text, form.preferred_weight, form.negative_text, form.notes, status)

    def on_save(path: str, *values: Any):
        return handlers.save_metadata(session, path, *values), update(visible=False)

    editor["open"].click(guard(on_open), inputs=[editor["path"]],
                         outputs=[editor["box"], editor["title"], *fields, editor["status"]], show_progress="hidden")
    function, inputs, outputs = after_save
    editor["save"].click(guard(on_save), inputs=[editor["path"], *fields], outputs=[editor["status"], editor["box"]],
                         show_progress="hidden").then(function, inputs=inputs, outputs=outputs, show_progress="hidden")
    editor["cancel"].click(lambda: update(visible=False), inputs=None, outputs=[editor["box"]])


_ANSWERS = itertools.count(1)


def card_outputs(view: handlers.CardsView) -> tuple[str, str, str]:
    """The card tab's outputs. Each answer carries its own serial (``data-answer``), so that an answer equal to the
    one shown still replaces it on the page: gradio leaves an unchanged value's HTML alone, and the page script
    learns that a search answer arrived (and asks again when it is for older text) only from the change. Without it
    a search whose request gradio dropped, behind an in-flight request for the text already shown, was never asked
    again and the cards stayed filtered to nothing (issue 26 item 11)."""
    cards = view.cards_html.replace('<div class="sdconcepts-cards" ',
                                    f'<div class="sdconcepts-cards" data-answer="{next(_ANSWERS)}" ', 1)
    return cards, view.skipped_html, f'<div class="sdconcepts-summary">{view.summary}</div>'
