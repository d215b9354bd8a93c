"""The standalone app's PNG Info tab, and the send buttons: an infotext (and an image) pasted into txt2img or img2img.

``send_targets`` names the form fields an infotext fills in each tab; ``paste_updates`` turns
``img2img_handlers.PastedFields`` into one update per field (a field the infotext lacks keeps its value).
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from sdconcepts.ui import img2img_handlers as i2i
from sdconcepts.ui.compat import binary_file, update
from sdconcepts.ui.controls import guard

__all__ = ["FIELDS", "IMG2IMG_FIELDS", "build_png_info_tab", "paste_updates"]

# PastedFields attribute -> the key of the component in a tab's component dict.
FIELDS = {"prompt": "prompt", "negative_prompt": "negative", "sampler": "sampler", "steps": "steps",
          "cfg_scale": "cfg_scale", "seed": "seed", "width": "width", "height": "height"}
IMG2IMG_FIELDS = {**FIELDS, "denoising_strength": "denoising", "mask_blur": "mask_blur"}


def paste_updates(fields: i2i.PastedFields, names: dict[str, str]) -> list[Any]:
    """One update per entry of ``names``, in its order: the value when the infotext has it, else no change."""
    out = []
    for attribute in names:
        value = getattr(fields, attribute)
        out.append(update() if value is None else update(value=value))
    if fields.notes:
        gr.Warning("; ".join(fields.notes))
    return out


def build_png_info_tab() -> dict[str, Any]:
    """The file drop, what it carries, and the two send buttons (wired by ``ui.app``, which knows the targets)."""
    c: dict[str, Any] = {}
    with gr.Column(elem_id="sdconcepts_png_info_root", elem_classes=["sdconcepts"]):
        with gr.Row():
            with gr.Column(scale=1):
                c["file"] = binary_file(label="Drop a PNG (ours or A1111's)", elem_id="sdconcepts_png_info_file")
                c["image"] = gr.Image(label="Image", type="pil", interactive=False,
                                      elem_id="sdconcepts_png_info_image")
            with gr.Column(scale=1):
                c["html"] = gr.HTML("", elem_id="sdconcepts_png_info_html")
                c["infotext"] = gr.Textbox(label="Parameters", lines=4, interactive=False,
                                           elem_id="sdconcepts_png_info_infotext")
                with gr.Row():
                    c["to_txt2img"] = gr.Button("Send to txt2img", elem_id="sdconcepts_png_info_to_txt2img")
                    c["to_img2img"] = gr.Button("Send to img2img", elem_id="sdconcepts_png_info_to_img2img")
                    c["to_inpaint"] = gr.Button("Send to inpaint", elem_id="sdconcepts_png_info_to_inpaint")

    def on_file(data: Any):
        info = i2i.read_png_info(data)
        return info.html, info.infotext, info.image

    c["file"].change(guard(on_file), inputs=[c["file"]], outputs=[c["html"], c["infotext"], c["image"]])
    return c
