"""Lays out the Textual Inversion tab's "Embedding tools" accordion and wires it to ``ui.embedding_tools``."""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from typing import Any

import gradio as gr

from sdconcepts.ui import embedding_tools_handlers
from sdconcepts.ui.train_tab import chain_after
from sdconcepts.ui.ui_session import UiError, UiSession

__all__ = ["build_embedding_tools"]


def _message(text: str, css: str) -> str:
    return f'<div class="{css}">{html.escape(text)}</div>'


def build_embedding_tools(session: UiSession, model: Any,
                          after_change: Sequence[tuple[Callable[..., Any], list[Any], list[Any]]], *,
                          hosted: bool = False) -> dict[str, Any]:
    """Build the accordion inside the current layout context; ``after_change`` re-renders the card tabs.

    ``hosted``: inside a host the tools are a tab of their own (open), and the on-the-fly conversion setting, which
    only our generator applies, is left out (the host's txt2img encodes the prompts there).
    """
    with gr.Accordion("Embedding tools", open=hosted, elem_id="sdconcepts_ti_tools"):
        gr.HTML('<div class="sdconcepts-tools-help">Embeddings are named as in prompts. Mix: <code>0.5*toytri + '
                '0.5*"red triangle"</code> sums terms of equal vector counts ("words" are their token embeddings; '
                "<code>name[0:2]</code> selects vectors); <code>|</code> or <code>,</code> concatenates.</div>",
                elem_id="sdconcepts_ti_tools_help")
        with gr.Row():
            inspect_name = gr.Textbox(label="Embedding", elem_id="sdconcepts_ti_tools_inspect_name", max_lines=1,
                                      scale=3)
            top_k = gr.Slider(1, 20, value=5, step=1, label="Nearest tokens", elem_id="sdconcepts_ti_tools_top_k",
                              scale=2)
            inspect = gr.Button("Inspect", elem_id="sdconcepts_ti_tools_inspect", scale=1)
        report = gr.HTML("", elem_id="sdconcepts_ti_tools_report")
        with gr.Row():
            mix_name = gr.Textbox(label="New embedding name", elem_id="sdconcepts_ti_tools_mix_name", max_lines=1,
                                  scale=2)
            expression = gr.Textbox(label="Mix expression", placeholder='0.5*toytri + 0.5*"red triangle"',
                                    elem_id="sdconcepts_ti_tools_expression", max_lines=1, scale=4)
            mix = gr.Button("Make embedding", variant="primary", elem_id="sdconcepts_ti_tools_mix", scale=1)
        with gr.Row():
            edit_source = gr.Textbox(label="Edit: source embedding", elem_id="sdconcepts_ti_tools_edit_source",
                                     max_lines=1)
            edit_name = gr.Textbox(label="New embedding name", elem_id="sdconcepts_ti_tools_edit_name", max_lines=1)
            keep = gr.Textbox(label="Keep vectors (in order, e.g. 2,0,1 or 0:2)", elem_id="sdconcepts_ti_tools_keep",
                              max_lines=1)
            drop = gr.Textbox(label="or drop vectors (e.g. 1 or -1)", elem_id="sdconcepts_ti_tools_drop", max_lines=1)
            edit = gr.Button("Write edited copy", elem_id="sdconcepts_ti_tools_edit")
        with gr.Row():
            convert_source = gr.Textbox(label="Convert for SDXL: SD 1.x embedding",
                                        elem_id="sdconcepts_ti_tools_convert_source", max_lines=1)
            convert_name = gr.Textbox(label="New embedding name (default: name_xl)",
                                      elem_id="sdconcepts_ti_tools_convert_name", max_lines=1)
            convert = gr.Button("Write SDXL copy", elem_id="sdconcepts_ti_tools_convert")
        on_the_fly = gr.Checkbox(value=session.convert_sd1_on_sdxl,
                                 label="Use SD 1.x embeddings on SDXL models, converted on the fly (A1111 skips them; "
                                 "the infotext says so)", elem_id="sdconcepts_ti_tools_on_the_fly",
                                 visible=not hosted)
        with gr.Row():
            file_format = gr.Dropdown(list(embedding_tools_handlers.FORMATS), value=".pt", label="File format",
                                      elem_id="sdconcepts_ti_tools_format")
            overwrite = gr.Checkbox(value=False, label="Overwrite an existing file",
                                    elem_id="sdconcepts_ti_tools_overwrite")
        result = gr.HTML("", elem_id="sdconcepts_ti_tools_result")

    def on_inspect(model_label: str, name: str, k: float) -> str:
        try:
            return embedding_tools_handlers.inspect_html(session, model_label, name, k)
        except UiError as exc:
            return _message(str(exc), "sdconcepts-field-error")

    def on_mix(model_label: str, name: str, text: str, fmt: str, replace: bool) -> str:
        try:
            path = embedding_tools_handlers.mix_embedding(session, model_label, name, text, fmt, bool(replace))
        except UiError as exc:
            return _message(str(exc), "sdconcepts-field-error")
        return _message(f"Wrote {path}", "sdconcepts-field-ok")

    def on_edit(model_label: str, source: str, name: str, keep_v: str, drop_v: str, fmt: str, replace: bool) -> str:
        try:
            path = embedding_tools_handlers.edit_embedding(session, model_label, source, name, keep_v, drop_v, fmt,
                                                  bool(replace))
        except UiError as exc:
            return _message(str(exc), "sdconcepts-field-error")
        return _message(f"Wrote {path}", "sdconcepts-field-ok")

    def on_convert(model_label: str, source: str, name: str, replace: bool) -> str:
        try:
            path = embedding_tools_handlers.convert_embedding(session, model_label, source, name, bool(replace))
        except UiError as exc:
            return _message(str(exc), "sdconcepts-field-error")
        return _message(f"Wrote {path}", "sdconcepts-field-ok")

    def on_toggle(value: bool) -> None:
        session.convert_sd1_on_sdxl = bool(value)

    on_the_fly.change(on_toggle, inputs=[on_the_fly], outputs=None)
    inspect.click(on_inspect, inputs=[model, inspect_name, top_k], outputs=[report])
    mixed = mix.click(on_mix, inputs=[model, mix_name, expression, file_format, overwrite], outputs=[result])
    edited = edit.click(on_edit, inputs=[model, edit_source, edit_name, keep, drop, file_format, overwrite],
                        outputs=[result])
    # A skipped card's "Convert for SDXL" (javascript/sdconcepts.js) fills the source box and clicks this button.
    converted = convert.click(on_convert, inputs=[model, convert_source, convert_name, overwrite], outputs=[result])
    # The new file is a card at once (the library rescans on render).
    chain_after([mixed, edited, converted], after_change)
    return {"report": report, "result": result}
