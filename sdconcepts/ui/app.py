"""Lays out the web UI and wires components to ``ui.handlers``; nothing here decides anything.

``build_ui(session)`` returns a ``gr.Blocks`` usable on its own (``launch_app``) or rendered inside a host's tab
(``host.a1111``). Every element id starts with ``sdconcepts_`` and everything sits under ``#sdconcepts_root``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gradio as gr

from sdconcepts.threads import AUTO, usable_cores
from sdconcepts.ui import handlers, img2img_tab, train_jobs
from sdconcepts.ui import img2img_handlers as i2i
from sdconcepts.ui.compat import (
    GRADIO_MAJOR,
    QUEUE_KWARGS,
    blocks_kwargs,
    calm_idle_queue,
    js_kwargs,
    launch_kwargs,
    make,
    patient_localhost_check,
    quiet_client_disconnects,
    update,
)
from sdconcepts.ui.controls import (
    GENERATION_INPUTS,
    card_outputs,
    card_tab,
    generation_controls,
    guard,
    wire_metadata_editor,
    wire_seed_buttons,
)
from sdconcepts.ui.embedding_tools_tab import build_embedding_tools
from sdconcepts.ui.img2img_tab import build_img2img_tab
from sdconcepts.ui.png_info_tab import FIELDS, IMG2IMG_FIELDS, build_png_info_tab, paste_updates
from sdconcepts.ui.train_tab import build_train_tab
from sdconcepts.ui.ui_session import UiError, UiSession

__all__ = ["ROOT_ID", "build_hosted_ui", "build_ui", "launch_app", "read_css", "read_js"]

log = logging.getLogger(__name__)

ROOT_ID = "sdconcepts_root"
EXTENSION_ROOT = Path(__file__).resolve().parent.parent.parent
CSS_PATH = EXTENSION_ROOT / "style.css"
JS_PATH = EXTENSION_ROOT / "javascript" / "sdconcepts.js"
TITLE = "sdconcepts"
# The standalone app's top-level tabs (inside a host they are the host's own).
MAIN_TAB_IDS = {"txt2img": "sdconcepts_main_txt2img", "img2img": "sdconcepts_main_img2img",
                "png_info": "sdconcepts_main_png_info"}


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


def build_ui(session: UiSession, *, css: str | None = None, jobs: train_jobs.TrainingJobs | None = None,
             standalone: bool = True, host_txt2img: Mapping[str, Any] | None = None) -> gr.Blocks:
    """The whole UI: model picker, prompts, and the txt2img / Textual Inversion / Hypernetworks / Train tabs, beside
    the img2img and PNG Info tabs.

    ``standalone=False`` builds our tab inside a host (A1111, Forge, reForge, Forge-Classic): only what the host lacks,
    the Train tab and the embedding tools, on the model picker; prompts, pictures and the card pages are the host's
    own (``build_hosted_ui``). ``jobs`` holds the training job; pages loaded later (reloads) show the one that runs.
    """
    jobs = jobs or train_jobs.TrainingJobs(session.generate_lock)
    if not standalone:
        return build_hosted_ui(session, css=css, jobs=jobs, host_txt2img=host_txt2img or {})
    choices = list(session.model_choices())
    initial_model = session.default_choice()
    ti_view = handlers.embedding_cards_view(session, model_label=initial_model)
    hn_view = handlers.hypernetwork_cards_view(session)

    with gr.Blocks(analytics_enabled=False, title=TITLE, **blocks_kwargs(css)) as blocks:
        with gr.Column(elem_id=ROOT_ID, elem_classes=["sdconcepts"]):
            with gr.Row(elem_classes=["sdconcepts-model-row"]):
                model = gr.Dropdown(choices, value=initial_model, label="Model", elem_id="sdconcepts_model", scale=4)
                model_refresh = gr.Button("Refresh models", elem_id="sdconcepts_model_refresh", scale=1)
                if session.config.cpu_threads is not None:
                    threads = gr.Dropdown(thread_choices(session.config.cpu_threads), value=session.config.cpu_threads, label="CPU threads",
                                          elem_id="sdconcepts_cpu_threads", scale=1,
                                          info="auto: the cores other work leaves free, chosen before each job")
                    threads.change(guard(session.set_cpu_threads), inputs=[threads], outputs=[threads],
                                   show_progress="hidden")
            cards = _CardTabs(session, model)
            page = _lay_out_pages(session, model, ti_view, hn_view, cards)
        page.update(infotexts=gr.State([]), seeds=gr.State([]), selected=gr.State(None), images=gr.State([]))
        controls = page["controls"]

        _wire_txt2img(session, model, page)
        _wire_model_refresh(session, model, model_refresh)
        cards.wire(page["ti"], page["hn"])
        with page["ti_tools"]:
            # A file the tools write shows on every Textual Inversion tab (txt2img's and img2img's): cards.wire adds
            # each tab's (embedding, hypernetwork) renderers in that order.
            build_embedding_tools(session, model, cards.renderers[::2])

        _wire_send_buttons(
            page["main_tabs"], page["img2img"], page["png_info"],
            {"prompt": page["prompt"], "negative": page["negative"], **controls},
            (page["send_img2img"], page["send_inpaint"], page["images"], page["infotexts"], page["selected"]),
        )

        # -- train --
        with page["train_tab"]:
            build_train_tab(
                blocks, session, jobs, model,
                {"prompt": page["prompt"], "negative": page["negative"],
                 **{key: controls[key] for key in ("steps", "sampler", "cfg_scale", "seed")}},
                cards.renderers,
            )
    return blocks


# Our tab inside a host: what it holds, and where the rest is.
HOSTED_INTRO = ("Train embeddings and hypernetworks on the model the host has loaded, and edit embeddings. Prompts, "
                "pictures and the Textual Inversion and Hypernetworks card pages are the host's own (txt2img, img2img "
                "and their card pages); ticking \"Read parameters from txt2img\" makes the previews use the host's "
                "txt2img prompt and settings.")


def build_hosted_ui(session: UiSession, *, css: str | None, jobs: train_jobs.TrainingJobs,
                    host_txt2img: Mapping[str, Any]) -> gr.Blocks:
    """Our tab inside a host: the model picker, the Train tab and the embedding tools.

    ``host_txt2img`` maps the Train form's preview sources (``train_tab.PREVIEW_FROM_TXT2IMG``: prompt, negative,
    steps, sampler, schedule, cfg_scale, seed) to the host's txt2img components (``host.a1111`` collects them as the
    host builds its page); a source the host lacks keeps the run's default.
    """
    with gr.Blocks(analytics_enabled=False, title=TITLE, **blocks_kwargs(css)) as blocks:
        with gr.Column(elem_id=ROOT_ID, elem_classes=["sdconcepts", "sdconcepts-hosted"]):
            with gr.Row(elem_classes=["sdconcepts-model-row"]):
                model = gr.Dropdown(list(session.model_choices()), value=session.default_choice(), label="Model",
                                    elem_id="sdconcepts_model", scale=4)
                model_refresh = gr.Button("Refresh models", elem_id="sdconcepts_model_refresh", scale=1)
            gr.Markdown(HOSTED_INTRO, elem_id="sdconcepts_hosted_intro")
            with gr.Tabs(elem_id="sdconcepts_tabs"):
                with gr.Tab("Train", id="sdconcepts_train_tab", elem_id="sdconcepts_tab_train_root"):
                    with gr.Column(elem_id="sdconcepts_train_root"):
                        build_train_tab(blocks, session, jobs, model, dict(host_txt2img), [])
                with gr.Tab("Embedding tools", id="sdconcepts_ti_tools_tab", elem_id="sdconcepts_tab_ti_tools"):
                    with gr.Column(elem_id="sdconcepts_ti_tools_root"):
                        build_embedding_tools(session, model, [], hosted=True)
        _wire_model_refresh(session, model, model_refresh)
    return blocks


class _CardTabs:
    """The card tabs' renderers and their wiring (each card tab, txt2img's and img2img's, is wired by ``wire``).

    Refresh, a model change and the train tab's events rescan the folders; typing in the search box, sorting and
    paging only filter the cards already listed (a rescan of 10,000 files costs more than a keystroke may).
    """

    def __init__(self, session: UiSession, model: Any) -> None:
        self.session = session
        self.model = model
        # (render, inputs, outputs) of every card tab wired so far, (embedding, hypernetwork) per wire call.
        self.renderers: list[tuple[Any, list[Any], list[Any]]] = []

    def ti_render(self, query: str, sort: str, descending: bool, page: Any, model_label: str, rescan: bool = True):
        view = handlers.embedding_cards_view(self.session, query or "", sort or "Name", bool(descending),
                                             model_label=model_label, refresh=rescan, page=page)
        return card_outputs(view)

    def hn_render(self, query: str, sort: str, descending: bool, page: Any, rescan: bool = True):
        view = handlers.hypernetwork_cards_view(self.session, query or "", sort or "Name", bool(descending),
                                                refresh=rescan, page=page)
        return card_outputs(view)

    def ti_filter(self, query: str, sort: str, descending: bool, page: Any, model_label: str):
        return self.ti_render(query, sort, descending, page, model_label, rescan=False)

    def hn_filter(self, query: str, sort: str, descending: bool, page: Any):
        return self.hn_render(query, sort, descending, page, rescan=False)

    def wire(self, ti: dict[str, Any], hn: dict[str, Any]) -> None:
        ti_inputs = [ti["search"], ti["sort"], ti["descending"], ti["page"], self.model]
        ti_outputs = [ti["cards"], ti["skipped"], ti["summary"]]
        hn_inputs = [hn["search"], hn["sort"], hn["descending"], hn["page"]]
        hn_outputs = [hn["cards"], hn["skipped"], hn["summary"]]
        for trigger in (ti["refresh"].click, self.model.change):
            trigger(guard(self.ti_render), inputs=ti_inputs, outputs=ti_outputs, show_progress="hidden")
        # The search box asks the server only through search_go (clicked by the page script when typing pauses) and
        # Enter: the page filters the shown cards on each keystroke, and a server search per keystroke would only
        # queue answers the next keystroke makes stale.
        for trigger in (ti["search"].submit, ti["sort"].change, ti["descending"].change, ti["page"].change,
                        ti["search_go"].click):
            trigger(guard(self.ti_filter), inputs=ti_inputs, outputs=ti_outputs, show_progress="hidden",
                    **LAST_REQUEST_WINS)
        hn["refresh"].click(guard(self.hn_render), inputs=hn_inputs, outputs=hn_outputs, show_progress="hidden")
        for trigger in (hn["search"].submit, hn["sort"].change, hn["descending"].change, hn["page"].change,
                        hn["search_go"].click):
            trigger(guard(self.hn_filter), inputs=hn_inputs, outputs=hn_outputs, show_progress="hidden",
                    **LAST_REQUEST_WINS)
        wire_metadata_editor(self.session, ti["editor"], (guard(self.ti_render), ti_inputs, ti_outputs))
        wire_metadata_editor(self.session, hn["editor"], (guard(self.hn_render), hn_inputs, hn_outputs))
        self.renderers.extend([(guard(self.ti_render), ti_inputs, ti_outputs),
                               (guard(self.hn_render), hn_inputs, hn_outputs)])


# gradio 4+ ignores a click (and a change) that comes while the same event is still running ("once"): the search for
# the final text was dropped behind the one for older text. "always_last" runs it when the running one ends (only the
# latest waits). gradio 3 has no such option; there the page script asks again (``card_outputs``' serial).
LAST_REQUEST_WINS: dict[str, Any] = {"trigger_mode": "always_last"} if GRADIO_MAJOR >= 4 else {}


def thread_choices(current: str) -> list[str]:
    """The CPU threads setting's choices: auto, 1 to the cores this process may use, and the current one."""
    choices = [AUTO, *(str(n) for n in range(1, usable_cores() + 1))]
    return choices if current in choices else [*choices, current]


def _lay_out_pages(session: UiSession, model: Any, ti_view: handlers.CardsView, hn_view: handlers.CardsView,
                   cards: _CardTabs) -> dict[str, Any]:
    """txt2img's prompts, settings, card tabs and gallery, inside main tabs beside img2img and PNG Info.

    Returns the components the wiring needs by name; the Train tab and the embedding tools are left as empty
    columns (``train_tab``, ``ti_tools``), filled once the rest is wired.
    """
    c: dict[str, Any] = {}
    with gr.Tabs(elem_id="sdconcepts_main_tabs") as c["main_tabs"]:
        with gr.Tab("txt2img", id=MAIN_TAB_IDS["txt2img"], elem_id="sdconcepts_main_tab_txt2img"):
            with gr.Row():
                with gr.Column(scale=5):
                    c["prompt"] = gr.Textbox(label="Prompt", lines=3, elem_id="sdconcepts_prompt",
                                             placeholder="Prompt (click a card below to insert it)")
                    c["negative"] = gr.Textbox(label="Negative prompt", lines=2, elem_id="sdconcepts_neg_prompt",
                                               placeholder="Negative prompt")
                with gr.Column(scale=1, min_width=160):
                    c["generate"] = gr.Button("Generate", variant="primary", elem_id="sdconcepts_generate")
            with gr.Row():
                with gr.Column(scale=1):
                    with gr.Tabs(elem_id="sdconcepts_tabs"):
                        with gr.Tab("txt2img", id="sdconcepts_txt2img", elem_id="sdconcepts_tab_txt2img"):
                            c["controls"] = generation_controls("sdconcepts_")
                        with gr.Tab("Textual Inversion", id="sdconcepts_ti", elem_id="sdconcepts_tab_ti"):
                            c["ti"] = card_tab("ti", "Textual Inversion", ti_view)
                            c["ti_tools"] = gr.Column(elem_id="sdconcepts_ti_tools_root")
                        with gr.Tab("Hypernetworks", id="sdconcepts_hn", elem_id="sdconcepts_tab_hn"):
                            c["hn"] = card_tab("hn", "Hypernetworks", hn_view)
                        with gr.Tab("Train", id="sdconcepts_train_tab", elem_id="sdconcepts_tab_train_root"):
                            c["train_tab"] = gr.Column(elem_id="sdconcepts_train_root")
                with gr.Column(scale=1):
                    c["gallery"] = make(
                        gr.Gallery, label="Images", elem_id="sdconcepts_gallery", columns=4, height="auto",
                        optional={"format": "png", "object_fit": "contain", "preview": True},
                    )
                    with gr.Row():
                        c["send_img2img"] = gr.Button("Send to img2img", elem_id="sdconcepts_send_to_img2img")
                        c["send_inpaint"] = gr.Button("Send to inpaint", elem_id="sdconcepts_send_to_inpaint")
                    c["warnings"] = gr.HTML("", elem_id="sdconcepts_warnings")
                    c["infotext"] = gr.Textbox(label="Generation parameters", lines=4, interactive=False,
                                               elem_id="sdconcepts_infotext")
        with gr.Tab("img2img", id=MAIN_TAB_IDS["img2img"], elem_id="sdconcepts_main_tab_img2img"):
            c["img2img"] = build_img2img_tab(session, model, ti_view, hn_view, cards.wire)
        with gr.Tab("PNG Info", id=MAIN_TAB_IDS["png_info"], elem_id="sdconcepts_main_tab_png_info"):
            c["png_info"] = build_png_info_tab()
    return c


def _wire_txt2img(session: UiSession, model: Any, page: dict[str, Any]) -> None:
    """Generate, the gallery's selection and the seed buttons."""
    controls = page["controls"]

    # gradio finds the progress tracker through this default value (its documented idiom).
    def on_generate(model_label, prompt_text, negative_text, *settings, progress=gr.Progress()):  # noqa: B008
        *values, compile_unet = settings
        params = handlers.generation_params(prompt_text, negative_text, *values)
        progress(0, desc="Loading model")

        def report(done: int, total: int) -> None:
            progress((done, total), desc="Sampling", unit="steps")

        out = handlers.generate(session, model_label, params, progress=report, compile_unet=bool(compile_unet))
        return out.gallery, out.first_infotext, out.warnings_html, out.infotexts, out.seeds, 0, out.images

    page["generate"].click(
        guard(on_generate),
        inputs=[model, page["prompt"], page["negative"], *(controls[name] for name in GENERATION_INPUTS),
                controls["compile_unet"]],
        outputs=[page[key] for key in ("gallery", "infotext", "warnings", "infotexts", "seeds", "selected", "images")],
        api_name="generate",
    )

    def on_select(texts: list[str], evt: gr.SelectData):
        index = evt.index if isinstance(evt.index, int) else None
        return handlers.selected_infotext(texts, index), index

    page["gallery"].select(on_select, inputs=[page["infotexts"]], outputs=[page["infotext"], page["selected"]])
    wire_seed_buttons(controls, page["seeds"], page["selected"])


def _wire_model_refresh(session: UiSession, model: Any, model_refresh: Any) -> None:
    def on_model_refresh(current: str):
        labels = list(session.model_choices())
        return update(choices=labels, value=current if current in labels else session.default_choice())

    model_refresh.click(on_model_refresh, inputs=[model], outputs=[model])


def _wire_send_buttons(main_tabs: Any, img2img: dict[str, Any], png_info: dict[str, Any], txt2img: dict[str, Any],
                       gallery_parts: tuple[Any, ...]) -> None:
    """txt2img's "Send to img2img/inpaint" and PNG Info's send buttons: paste an infotext, hand over the image."""
    send_img2img, send_inpaint, images, infotexts, selected = gallery_parts
    i2i_fields = [img2img[key] for key in IMG2IMG_FIELDS.values()]
    t2i_fields = [txt2img[key] for key in FIELDS.values()]

    def to_img2img(mode: str, image: Any, text: str) -> list[Any]:
        target = "init_image" if mode == "img2img" else "editor"
        fields = i2i.paste_fields(text)
        outs = [update(selected=MAIN_TAB_IDS["img2img"]), update(selected=img2img_tab.MODE_TAB_IDS[mode]), mode]
        outs += [update(value=image) if target == name else update() for name in ("init_image", "editor")]
        return outs + paste_updates(fields, IMG2IMG_FIELDS)

    i2i_outputs = [main_tabs, img2img["mode_tabs"], img2img["mode"], img2img["init_image"], img2img["editor"],
                   *i2i_fields]

    def from_gallery(mode: str) -> Any:
        def send(pictures: list[Any], texts: list[str], index: int | None) -> list[Any]:
            if not pictures:
                raise UiError("Generate an image first, then send it")
            at = index if index is not None and 0 <= index < len(pictures) else 0
            return to_img2img(mode, pictures[at], handlers.selected_infotext(texts, at))

        return guard(send)

    send_img2img.click(from_gallery("img2img"), inputs=[images, infotexts, selected], outputs=i2i_outputs)
    send_inpaint.click(from_gallery("Inpaint"), inputs=[images, infotexts, selected], outputs=i2i_outputs)

    def png_to_img2img(mode: str) -> Any:
        def send(data: Any) -> list[Any]:
            info = i2i.read_png_info(data)
            if info.image is None:
                raise UiError("PNG Info: drop an image first")
            return to_img2img(mode, info.image, info.infotext)

        return guard(send)

    png_info["to_img2img"].click(png_to_img2img("img2img"), inputs=[png_info["file"]], outputs=i2i_outputs)
    png_info["to_inpaint"].click(png_to_img2img("Inpaint"), inputs=[png_info["file"]], outputs=i2i_outputs)

    def png_to_txt2img(text: str) -> list[Any]:
        if not text:
            raise UiError("PNG Info: this image carries no generation parameters")
        return [update(selected=MAIN_TAB_IDS["txt2img"]), *paste_updates(i2i.paste_fields(text), FIELDS)]

    png_info["to_txt2img"].click(guard(png_to_txt2img), inputs=[png_info["infotext"]],
                                 outputs=[main_tabs, *t2i_fields])
    for button, main, mode in ((send_img2img, "img2img", "img2img"), (send_inpaint, "img2img", "Inpaint"),
                               (png_info["to_img2img"], "img2img", "img2img"),
                               (png_info["to_inpaint"], "img2img", "Inpaint"), (png_info["to_txt2img"], "txt2img", None)):
        _open_tabs_on_click(button, main, mode)


def _open_tabs_on_click(button: Any, main: str, mode: str | None = None) -> None:
    """Open a send button's target tabs in the browser (``sdconcepts.openTab``), as A1111's send buttons do.

    A listener of its own, with no inputs or outputs: gradio hands an event's JavaScript the current values of its
    outputs too, and reading gradio 4's image editor that way never finishes. The handlers' own Tabs updates stay as
    a fallback; gradio drops one that repeats the last value it sent, after the user has clicked another tab.
    """
    calls = f"s.openTab('sdconcepts_main_tabs', {main!r});"
    if mode is not None:
        # The sub-tabs' buttons answer once the main tab has been drawn.
        calls += f" setTimeout(() => s.openTab('{img2img_tab.PREFIX}modes', {mode!r}), 50);"
    button.click(None, inputs=None, outputs=None,
                 **js_kwargs(f"() => {{ const s = window.sdconcepts; if (s && s.openTab) {{ {calls} }} }}"))


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
    calm_idle_queue(blocks)
    quiet_client_disconnects()
    with patient_localhost_check():
        blocks.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True,
                      **launch_kwargs(css))
    return blocks
