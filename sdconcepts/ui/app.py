"""Lays out the web UI and wires components to ``ui.handlers``; nothing here decides anything.

``build_ui(session)`` returns a ``gr.Blocks`` usable on its own (``launch_app``) or rendered inside a host's tab
(``host.a1111``). Every element id starts with ``sdconcepts_`` and everything sits under ``#sdconcepts_root``.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

import gradio as gr

from sdconcepts.generation import SAMPLERS
from sdconcepts.ui import handlers, train
from sdconcepts.ui.cards import SORT_KEYS
from sdconcepts.ui.compat import QUEUE_KWARGS, blocks_kwargs, js_kwargs, launch_kwargs, make, update
from sdconcepts.ui.embedding_tools_tab import build_embedding_tools
from sdconcepts.ui.session import UiError, UiSession
from sdconcepts.ui.train_tab import build_train_tab
from sdconcepts.user_metadata import SD_VERSIONS

__all__ = ["ROOT_ID", "build_ui", "launch_app", "read_css", "read_js"]

log = logging.getLogger(__name__)

ROOT_ID = "sdconcepts_root"
EXTENSION_ROOT = Path(__file__).resolve().parent.parent.parent
CSS_PATH = EXTENSION_ROOT / "style.css"
JS_PATH = EXTENSION_ROOT / "javascript" / "sdconcepts.js"
TITLE = "sdconcepts"


def read_css() -> str:
    try:
        return CSS_PATH.read_text(encoding="utf-8")
    except OSError:
        log.warning("%s is missing; the UI runs unstyled", CSS_PATH)
        return ""


def read_js() -> str:
    try:
        return JS_PATH.read_text(encoding="utf-8")
    except OSError:
        log.warning("%s is missing; clicking a card will not insert its tag", JS_PATH)
        return ""


def _guard(function: Any) -> Any:
    """Show a handler's ``UiError`` as gradio's error message instead of a traceback."""

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except UiError as exc:
            raise gr.Error(str(exc)) from None

    wrapped.__name__ = function.__name__
    wrapped.__doc__ = function.__doc__
    return wrapped


def _card_tab(kind: str, label: str, view: handlers.CardsView) -> dict[str, Any]:
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
    editor = _metadata_editor(kind)
    return {"search": search, "sort": sort, "descending": descending, "refresh": refresh, "page": page,
            "summary": summary, "cards": cards, "skipped": skipped, "editor": editor}


def _metadata_editor(kind: str) -> dict[str, Any]:
    """A1111's user-metadata editor: opened by a card's edit button (javascript/sdconcepts.js writes the card's
    path into the hidden ``edit_path`` box and clicks the hidden ``edit_open`` button)."""
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


def _wire_metadata_editor(session: UiSession, editor: dict[str, Any], after_save: tuple[Any, list[Any], list[Any]]
                          ) -> None:
    fields = [editor[k] for k in ("description", "sd_version", "activation", "weight", "negative", "notes")]

    def on_open(path: str):
        form = handlers.metadata_form(session, path)
        status = f'<div class="sdconcepts-warnings">{html.escape(form.status)}</div>' if form.status else ""
        return (update(visible=True), f"<h4>{html.escape(form.title)}</h4>", form.description, form.sd_version,
                form.activation_text, form.preferred_weight, form.negative_text, form.notes, status)

    def on_save(path: str, *values: Any):
        return handlers.save_metadata(session, path, *values), update(visible=False)

    editor["open"].click(_guard(on_open), inputs=[editor["path"]],
                         outputs=[editor["box"], editor["title"], *fields, editor["status"]], show_progress="hidden")
    function, inputs, outputs = after_save
    editor["save"].click(_guard(on_save), inputs=[editor["path"], *fields], outputs=[editor["status"], editor["box"]],
                         show_progress="hidden").then(function, inputs=inputs, outputs=outputs, show_progress="hidden")
    editor["cancel"].click(lambda: update(visible=False), inputs=None, outputs=[editor["box"]])


def _card_outputs(view: handlers.CardsView) -> tuple[str, str, str]:
    return view.cards_html, view.skipped_html, f'<div class="sdconcepts-summary">{view.summary}</div>'


def build_ui(session: UiSession, *, css: str | None = None, jobs: train.TrainingJobs | None = None) -> gr.Blocks:
    """The whole UI: model picker, prompts, and the txt2img / Textual Inversion / Hypernetworks / Train tabs.

    ``jobs`` holds the training job; pages loaded later (reloads) show the one that runs.
    """
    jobs = jobs or train.TrainingJobs(session.generate_lock)
    choices = list(session.model_choices())
    initial_model = session.default_choice()
    ti_view = handlers.embedding_cards_view(session, model_label=initial_model)
    hn_view = handlers.hypernetwork_cards_view(session)

    with gr.Blocks(analytics_enabled=False, title=TITLE, **blocks_kwargs(css)) as blocks:
        with gr.Column(elem_id=ROOT_ID, elem_classes=["sdconcepts"]):
            with gr.Row(elem_classes=["sdconcepts-model-row"]):
                model = gr.Dropdown(choices, value=initial_model, label="Model", elem_id="sdconcepts_model", scale=4)
                model_refresh = gr.Button("Refresh models", elem_id="sdconcepts_model_refresh", scale=1)
            with gr.Row():
                with gr.Column(scale=5):
                    prompt = gr.Textbox(label="Prompt", lines=3, elem_id="sdconcepts_prompt",
                                        placeholder="Prompt (click a card below to insert it)")
                    negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="sdconcepts_neg_prompt",
                                          placeholder="Negative prompt")
                with gr.Column(scale=1, min_width=160):
                    generate = gr.Button("Generate", variant="primary", elem_id="sdconcepts_generate")
            with gr.Row():
                with gr.Column(scale=1):
                    with gr.Tabs(elem_id="sdconcepts_tabs"):
                        with gr.Tab("txt2img", id="sdconcepts_txt2img", elem_id="sdconcepts_tab_txt2img"):
                            sampler = gr.Dropdown(list(SAMPLERS), value="Euler a", label="Sampling method",
                                                  elem_id="sdconcepts_sampler")
                            steps = gr.Slider(1, 150, value=20, step=1, label="Sampling steps",
                                              elem_id="sdconcepts_steps")
                            cfg_scale = gr.Slider(1.0, 30.0, value=7.0, step=0.5, label="CFG scale",
                                                  elem_id="sdconcepts_cfg_scale")
                            with gr.Row():
                                seed = gr.Number(value=-1, label="Seed (-1: random)", precision=0,
                                                 elem_id="sdconcepts_seed", scale=4)
                                random_seed = gr.Button("Random", elem_id="sdconcepts_random_seed", scale=1,
                                                        min_width=80)
                                reuse_seed = gr.Button("Reuse", elem_id="sdconcepts_reuse_seed", scale=1,
                                                       min_width=80)
                            with gr.Row():
                                width = gr.Slider(0, 2048, value=0, step=8, label="Width (0: the model's size)",
                                                  elem_id="sdconcepts_width")
                                height = gr.Slider(0, 2048, value=0, step=8, label="Height (0: the model's size)",
                                                   elem_id="sdconcepts_height")
                            with gr.Row():
                                batch_count = gr.Slider(1, 100, value=1, step=1, label="Batch count",
                                                        elem_id="sdconcepts_batch_count")
                                batch_size = gr.Slider(1, 8, value=1, step=1, label="Batch size",
                                                       elem_id="sdconcepts_batch_size")
                        with gr.Tab("Textual Inversion", id="sdconcepts_ti", elem_id="sdconcepts_tab_ti"):
                            ti = _card_tab("ti", "Textual Inversion", ti_view)
                            ti_tools = gr.Column(elem_id="sdconcepts_ti_tools_root")
                        with gr.Tab("Hypernetworks", id="sdconcepts_hn", elem_id="sdconcepts_tab_hn"):
                            hn = _card_tab("hn", "Hypernetworks", hn_view)
                        with gr.Tab("Train", id="sdconcepts_train_tab", elem_id="sdconcepts_tab_train_root"):
                            train_tab = gr.Column(elem_id="sdconcepts_train_root")
                with gr.Column(scale=1):
                    gallery = make(
                        gr.Gallery, label="Images", elem_id="sdconcepts_gallery", columns=4, height="auto",
                        optional={"format": "png", "object_fit": "contain", "preview": True},
                    )
                    warnings = gr.HTML("", elem_id="sdconcepts_warnings")
                    infotext = gr.Textbox(label="Generation parameters", lines=4, interactive=False,
                                          elem_id="sdconcepts_infotext")
        infotexts = gr.State([])
        seeds = gr.State([])
        selected = gr.State(None)

        # -- txt2img --
        # gradio finds the progress tracker through this default value (its documented idiom).
        def on_generate(model_label, prompt_text, negative_text, sampler_name, steps_value, cfg_value, seed_value,
                        width_value, height_value, batch_size_value, batch_count_value,
                        progress=gr.Progress()):  # noqa: B008
            params = handlers.generation_params(
                prompt_text, negative_text, sampler_name, steps_value, cfg_value, seed_value, width_value,
                height_value, batch_size_value, batch_count_value,
            )
            progress(0, desc="Loading model")

            def report(done: int, total: int) -> None:
                progress((done, total), desc="Sampling", unit="steps")

            out = handlers.generate(session, model_label, params, progress=report)
            return out.gallery, out.first_infotext, out.warnings_html, out.infotexts, out.seeds, 0

        generate.click(
            _guard(on_generate),
            inputs=[model, prompt, negative, sampler, steps, cfg_scale, seed, width, height, batch_size, batch_count],
            outputs=[gallery, infotext, warnings, infotexts, seeds, selected],
            api_name="generate",
        )

        def on_select(texts: list[str], evt: gr.SelectData):
            index = evt.index if isinstance(evt.index, int) else None
            return handlers.selected_infotext(texts, index), index

        gallery.select(on_select, inputs=[infotexts], outputs=[infotext, selected])
        random_seed.click(handlers.random_seed, inputs=None, outputs=[seed])
        reuse_seed.click(handlers.reuse_seed, inputs=[seeds, selected, seed], outputs=[seed])

        # -- models --
        def on_model_refresh(current: str):
            labels = list(session.model_choices())
            return update(choices=labels, value=current if current in labels else session.default_choice())

        model_refresh.click(on_model_refresh, inputs=[model], outputs=[model])

        # -- cards --
        # Refresh, a model change and the train tab's events rescan the folders; typing in the search box, sorting
        # and paging only filter the cards already listed (a rescan of 10,000 files costs more than a keystroke may).
        def ti_render(query: str, sort: str, descending: bool, page: Any, model_label: str, rescan: bool = True):
            view = handlers.embedding_cards_view(session, query or "", sort or "Name", bool(descending),
                                                 model_label=model_label, refresh=rescan, page=page)
            return _card_outputs(view)

        def hn_render(query: str, sort: str, descending: bool, page: Any, rescan: bool = True):
            view = handlers.hypernetwork_cards_view(session, query or "", sort or "Name", bool(descending),
                                                    refresh=rescan, page=page)
            return _card_outputs(view)

        def ti_filter(query: str, sort: str, descending: bool, page: Any, model_label: str):
            return ti_render(query, sort, descending, page, model_label, rescan=False)

        def hn_filter(query: str, sort: str, descending: bool, page: Any):
            return hn_render(query, sort, descending, page, rescan=False)

        ti_inputs = [ti["search"], ti["sort"], ti["descending"], ti["page"], model]
        ti_outputs = [ti["cards"], ti["skipped"], ti["summary"]]
        hn_inputs = [hn["search"], hn["sort"], hn["descending"], hn["page"]]
        hn_outputs = [hn["cards"], hn["skipped"], hn["summary"]]
        for trigger in (ti["refresh"].click, model.change):
            trigger(_guard(ti_render), inputs=ti_inputs, outputs=ti_outputs, show_progress="hidden")
        for trigger in (ti["search"].change, ti["sort"].change, ti["descending"].change, ti["page"].change):
            trigger(_guard(ti_filter), inputs=ti_inputs, outputs=ti_outputs, show_progress="hidden")
        hn["refresh"].click(_guard(hn_render), inputs=hn_inputs, outputs=hn_outputs, show_progress="hidden")
        for trigger in (hn["search"].change, hn["sort"].change, hn["descending"].change, hn["page"].change):
            trigger(_guard(hn_filter), inputs=hn_inputs, outputs=hn_outputs, show_progress="hidden")
        _wire_metadata_editor(session, ti["editor"], (_guard(ti_render), ti_inputs, ti_outputs))
        _wire_metadata_editor(session, hn["editor"], (_guard(hn_render), hn_inputs, hn_outputs))

        # -- embedding tools --
        with ti_tools:
            build_embedding_tools(session, model, [(_guard(ti_render), ti_inputs, ti_outputs)])

        # -- train --
        with train_tab:
            build_train_tab(
                blocks, session, jobs, model,
                {"prompt": prompt, "negative": negative, "steps": steps, "sampler": sampler, "cfg_scale": cfg_scale,
                 "seed": seed},
                [(_guard(ti_render), ti_inputs, ti_outputs), (_guard(hn_render), hn_inputs, hn_outputs)],
            )
    return blocks


def install_js(blocks: gr.Blocks) -> None:
    """Run ``javascript/sdconcepts.js`` when the page loads (a host injects the file itself instead)."""
    code = read_js()
    if code:
        with blocks:
            blocks.load(None, inputs=None, outputs=None, **js_kwargs("() => {\n" + code + "\n}"))


def launch_app(session: UiSession, *, host: str = "127.0.0.1", port: int | None = None,
               block: bool = True) -> gr.Blocks:
    """Serve the UI standalone: our JavaScript runs on page load and ``style.css`` styles it."""
    css = read_css()
    blocks = build_ui(session, css=css)
    install_js(blocks)
    blocks.queue(**QUEUE_KWARGS)
    blocks.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True,
                  **launch_kwargs(css))
    return blocks
