"""The standalone app's img2img tab: img2img, Inpaint (mask drawn in the browser) and Inpaint upload, A1111's layout.

Layout and wiring only: the settings become an ``ImageSource`` (``img2img_handlers``) and the request goes through
txt2img's ``handlers.generate``. Everything sits under ``#sdconcepts_img2img_root``, which is how the card click
script finds this tab's prompt. Inside a host this tab is never built: the host has its own img2img.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr

from sdconcepts.img2img import INPAINT_AREAS, MASKED_CONTENT, RESIZE_MODES
from sdconcepts.limits import MAX_MASK_BLUR
from sdconcepts.ui import handlers
from sdconcepts.ui import img2img_handlers as i2i
from sdconcepts.ui.compat import make, mask_editor
from sdconcepts.ui.controls import GENERATION_INPUTS, card_tab, generation_controls, guard, wire_seed_buttons
from sdconcepts.ui.ui_session import UiError, UiSession

__all__ = ["PREFIX", "ROOT_ID", "build_img2img_tab"]

PREFIX = "sdconcepts_img2img_"
ROOT_ID = "sdconcepts_img2img_root"
MODE_TAB_IDS = {mode: f"{PREFIX}mode_{index}" for index, mode in enumerate(i2i.MODES)}

CardWiring = Callable[[dict[str, Any], dict[str, Any]], None]


def brush_size(session: UiSession) -> int:
    """The mask brush's default size in image pixels: a 16th of the model's native side (2 on the embedded 32 px
    model, where 8 covered half the picture; 32 on SD 1.x's 512), 8 when the size is not known without loading."""
    try:
        shape = session.model_shape()
    except UiError:
        shape = None
    return max(1, int(shape.size) // 16) if shape is not None else 8


def build_img2img_tab(session: UiSession, model: Any, ti_view: handlers.CardsView, hn_view: handlers.CardsView,
                      wire_cards: CardWiring) -> dict[str, Any]:
    """Build the tab's components and events; returns those the send buttons fill (``prompt``, ``init_image``...)."""
    c, shown = _lay_out(ti_view, hn_view, brush_size(session))
    for mode, tab in shown["mode_tabs"].items():
        tab.select(lambda mode=mode: mode, inputs=None, outputs=[c["mode"]])
    _wire_generate(session, model, c, shown)
    wire_cards(shown["ti"], shown["hn"])
    return c


def _lay_out(ti_view: handlers.CardsView, hn_view: handlers.CardsView,
             brush: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The tab's components: those the send buttons fill, and the rest (mode tabs, card tabs, gallery, states)."""
    c: dict[str, Any] = {}
    with gr.Column(elem_id=ROOT_ID, elem_classes=["sdconcepts"]):
        with gr.Row():
            with gr.Column(scale=5):
                c["prompt"] = gr.Textbox(label="Prompt", lines=3, elem_id=f"{PREFIX}prompt",
                                         placeholder="Prompt (click a card below to insert it)")
                c["negative"] = gr.Textbox(label="Negative prompt", lines=2, elem_id=f"{PREFIX}neg_prompt",
                                           placeholder="Negative prompt")
            with gr.Column(scale=1, min_width=160):
                generate = gr.Button("Generate", variant="primary", elem_id=f"{PREFIX}generate")
        with gr.Row():
            with gr.Column(scale=1):
                with gr.Tabs(elem_id=f"{PREFIX}modes") as c["mode_tabs"]:
                    mode_tabs: dict[str, Any] = {}
                    with gr.Tab("img2img", id=MODE_TAB_IDS["img2img"]) as mode_tabs["img2img"]:
                        c["init_image"] = gr.Image(label="Image for img2img", type="pil",
                                                   elem_id=f"{PREFIX}init_image")
                    with gr.Tab("Inpaint", id=MODE_TAB_IDS["Inpaint"]) as mode_tabs["Inpaint"]:
                        c["editor"] = mask_editor(label="Image for inpainting: draw the mask",
                                                  elem_id=f"{PREFIX}inpaint_editor",
                                                  brush_size=brush)
                    with gr.Tab("Inpaint upload", id=MODE_TAB_IDS["Inpaint upload"]) as mode_tabs["Inpaint upload"]:
                        c["upload_image"] = gr.Image(label="Image", type="pil", elem_id=f"{PREFIX}upload_image")
                        c["upload_mask"] = gr.Image(label="Mask (white: inpaint)", type="pil",
                                                    elem_id=f"{PREFIX}upload_mask")
                c["mode"] = gr.State("img2img")
                with gr.Tabs(elem_id=f"{PREFIX}tabs"):
                    with gr.Tab("Settings", elem_id=f"{PREFIX}tab_settings"):
                        c["resize_mode"] = gr.Radio(list(RESIZE_MODES), value=RESIZE_MODES[0], label="Resize mode",
                                                    elem_id=f"{PREFIX}resize_mode")
                        c["denoising"] = gr.Slider(0.0, 1.0, value=0.75, step=0.01, label="Denoising strength",
                                                   elem_id=f"{PREFIX}denoising_strength")
                        with gr.Group(elem_id=f"{PREFIX}inpaint_settings"):
                            c["mask_blur"] = gr.Slider(0, MAX_MASK_BLUR, value=4, step=1, label="Mask blur",
                                                       elem_id=f"{PREFIX}mask_blur")
                            c["mask_mode"] = gr.Radio(["Inpaint masked", "Inpaint not masked"],
                                                      value="Inpaint masked", label="Mask mode",
                                                      elem_id=f"{PREFIX}mask_mode")
                            c["masked_content"] = gr.Radio(list(MASKED_CONTENT), value="original",
                                                           label="Masked content",
                                                           elem_id=f"{PREFIX}masked_content")
                            with gr.Row():
                                c["inpaint_area"] = gr.Radio(list(INPAINT_AREAS), value=INPAINT_AREAS[0],
                                                             label="Inpaint area", elem_id=f"{PREFIX}inpaint_area")
                                c["padding"] = gr.Slider(0, 256, value=32, step=4,
                                                         label="Only masked padding, pixels",
                                                         elem_id=f"{PREFIX}inpaint_padding")
                        c.update(generation_controls(PREFIX))
                    with gr.Tab("Textual Inversion", elem_id=f"{PREFIX}tab_ti"):
                        ti = card_tab("img2img_ti", "Textual Inversion", ti_view)
                    with gr.Tab("Hypernetworks", elem_id=f"{PREFIX}tab_hn"):
                        hn = card_tab("img2img_hn", "Hypernetworks", hn_view)
            with gr.Column(scale=1):
                gallery = make(
                    gr.Gallery, label="Images", elem_id=f"{PREFIX}gallery", columns=4, height="auto",
                    optional={"format": "png", "object_fit": "contain", "preview": True},
                )
                warnings = gr.HTML("", elem_id=f"{PREFIX}warnings")
                infotext = gr.Textbox(label="Generation parameters", lines=4, interactive=False,
                                      elem_id=f"{PREFIX}infotext")
    infotexts = gr.State([])
    seeds = gr.State([])
    selected = gr.State(None)
    shown = {"mode_tabs": mode_tabs, "ti": ti, "hn": hn, "generate": generate, "gallery": gallery,
             "warnings": warnings, "infotext": infotext, "infotexts": infotexts, "seeds": seeds, "selected": selected}
    return c, shown


def _wire_generate(session: UiSession, model: Any, c: dict[str, Any], shown: dict[str, Any]) -> None:
    """Generate (the form becomes an ``ImageSource`` and txt2img's request), the gallery's selection, the seeds."""
    gallery, infotext, warnings = shown["gallery"], shown["infotext"], shown["warnings"]
    infotexts, seeds, selected = shown["infotexts"], shown["seeds"], shown["selected"]

    def on_generate(model_label, mode, init_image, editor, upload_image, upload_mask, resize_mode, denoising,
                    mask_blur, mask_mode, masked_content, inpaint_area, padding, prompt_text, negative_text,
                    *settings, progress=gr.Progress()):  # noqa: B008
        # gradio finds the progress tracker through this default value (its documented idiom).
        options = i2i.img2img_options(denoising, resize_mode, mask_blur, masked_content, inpaint_area, padding,
                                      mask_mode == "Inpaint not masked")
        source = i2i.image_source(mode, init_image, editor, upload_image, upload_mask, options)
        *values, compile_unet = settings
        params = handlers.generation_params(prompt_text, negative_text, *values)
        progress(0, desc="Loading model")

        def report(done: int, total: int) -> None:
            progress((done, total), desc="Sampling", unit="steps")

        out = handlers.generate(session, model_label, params, progress=report, source=source,
                                compile_unet=bool(compile_unet))
        return out.gallery, out.first_infotext, out.warnings_html, out.infotexts, out.seeds, 0

    shown["generate"].click(
        guard(on_generate),
        inputs=[model, c["mode"], c["init_image"], c["editor"], c["upload_image"], c["upload_mask"],
                c["resize_mode"], c["denoising"], c["mask_blur"], c["mask_mode"], c["masked_content"],
                c["inpaint_area"], c["padding"], c["prompt"], c["negative"],
                *(c[name] for name in GENERATION_INPUTS), c["compile_unet"]],
        outputs=[gallery, infotext, warnings, infotexts, seeds, selected],
        api_name="img2img",
    )

    def on_select(texts: list[str], evt: gr.SelectData):
        index = evt.index if isinstance(evt.index, int) else None
        return handlers.selected_infotext(texts, index), index

    gallery.select(on_select, inputs=[infotexts], outputs=[infotext, selected])
    wire_seed_buttons(c, seeds, selected)
