"""Lays out the Train tab (Create embedding, Create hypernetwork, Preprocess images, Train) and wires it to ``ui.train``.

Nothing here decides anything: validation, the job and the views live in ``ui.train``. Messages about a field are
shown in a small HTML element right under it (``sdconcepts_train_err_<field>``).
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from typing import Any

import gradio as gr

from sdconcepts.hypernetworks.hypernetwork import ACTIVATIONS, WEIGHT_INITS
from sdconcepts.limits import MAX_IMAGE_SIDE
from sdconcepts.training.templates import available_templates
from sdconcepts.ui import train
from sdconcepts.ui.compat import GRADIO_MAJOR, make, update
from sdconcepts.ui.session import UiError, UiSession
from sdconcepts.ui.train_preprocess import CAPTION_ACTIONS, PreprocessSettings

__all__ = ["TxtToImg", "build_train_tab", "chain_after"]

# Components of the txt2img tab read when "Read parameters from txt2img tab" is ticked.
TxtToImg = dict[str, Any]


# Following a job lasts as long as the job: from gradio 4 each event runs one at a time unless told otherwise, and a
# second Train click (refused at once) or a second page's reattach must not wait behind the first.
UNLIMITED: dict[str, Any] = {"concurrency_limit": None} if GRADIO_MAJOR >= 4 else {}
# From gradio 4 a click is ignored while the button's previous click runs; a Train click must reach the server.
EVERY_CLICK: dict[str, Any] = {"concurrency_limit": None, "trigger_mode": "multiple"} if GRADIO_MAJOR >= 4 else {}


def _message(text: str, css: str = "sdconcepts-field-error") -> str:
    return f'<div class="{css}">{html.escape(text)}</div>' if text else ""


def _field_error(key: str) -> Any:
    return gr.HTML("", elem_id=f"sdconcepts_train_err_{key}")


def build_train_tab(blocks: gr.Blocks, session: UiSession, jobs: train.TrainingJobs, model: Any, txt2img: TxtToImg,
                    after_change: Sequence[tuple[Callable[..., Any], list[Any], list[Any]]]) -> dict[str, Any]:
    """Build the tab inside the current layout context; ``after_change`` re-renders the card tabs."""
    templates = list(available_templates())
    # The forms fit the model chosen when the page is built, and follow the model dropdown (model_change below).
    fit = train.form_defaults(session, session.default_choice())
    with gr.Tabs(elem_id="sdconcepts_train_tabs"):
        with gr.Tab("Create embedding", id="sdconcepts_create_ti", elem_id="sdconcepts_tab_create_ti"):
            ti_name = gr.Textbox(label="Name", elem_id="sdconcepts_create_ti_name", max_lines=1)
            ti_init = gr.Textbox(label="Initialization text", value="*", elem_id="sdconcepts_create_ti_init",
                                 max_lines=1)
            ti_vectors = gr.Slider(1, 75, value=1, step=1, label="Number of vectors per token",
                                   elem_id="sdconcepts_create_ti_vectors")
            ti_overwrite = gr.Checkbox(value=False, label="Overwrite Old Embedding",
                                       elem_id="sdconcepts_create_ti_overwrite")
            ti_create = gr.Button("Create embedding", variant="primary", elem_id="sdconcepts_create_ti_button")
            ti_result = gr.HTML("", elem_id="sdconcepts_create_ti_result")
        with gr.Tab("Create hypernetwork", id="sdconcepts_create_hn", elem_id="sdconcepts_tab_create_hn"):
            hn_name = gr.Textbox(label="Name", elem_id="sdconcepts_create_hn_name", max_lines=1)
            hn_sizes = gr.CheckboxGroup(fit.width_choices, value=fit.widths_ticked,
                                        label="Modules (the model's attention widths)",
                                        elem_id="sdconcepts_create_hn_sizes")
            hn_extra = gr.Textbox(label="More modules (context widths, comma-separated, for another model)",
                                  value="", elem_id="sdconcepts_create_hn_extra", max_lines=1)
            hn_layers = gr.Textbox(label="Enter hypernetwork layer structure", value="1, 2, 1",
                                   placeholder="1st and last digit must be 1. ex:'1, 2, 1'",
                                   elem_id="sdconcepts_create_hn_layers", max_lines=1)
            hn_activation = gr.Dropdown(list(ACTIVATIONS), value="linear", label="Select activation function",
                                        elem_id="sdconcepts_create_hn_activation")
            hn_init = gr.Dropdown(list(WEIGHT_INITS), value="Normal", label="Select Layer weights initialization",
                                  elem_id="sdconcepts_create_hn_init")
            hn_norm = gr.Checkbox(value=False, label="Add layer normalization", elem_id="sdconcepts_create_hn_norm")
            hn_dropout = gr.Checkbox(value=False, label="Use dropout", elem_id="sdconcepts_create_hn_dropout")
            hn_dropout_structure = gr.Textbox(
                label="Enter hypernetwork Dropout structure (or empty)", value="0, 0, 0",
                placeholder="1st and last digit must be 0 and values should be between 0 and 1. ex:'0, 0.01, 0'",
                elem_id="sdconcepts_create_hn_dropout_structure", max_lines=1)
            hn_overwrite = gr.Checkbox(value=False, label="Overwrite Old Hypernetwork",
                                       elem_id="sdconcepts_create_hn_overwrite")
            hn_create = gr.Button("Create hypernetwork", variant="primary", elem_id="sdconcepts_create_hn_button")
            hn_result = gr.HTML("", elem_id="sdconcepts_create_hn_result")
        with gr.Tab("Preprocess images", id="sdconcepts_preprocess", elem_id="sdconcepts_tab_preprocess"):
            pre_source = gr.Textbox(label="Source directory", elem_id="sdconcepts_preprocess_source", max_lines=1)
            pre_destination = gr.Textbox(label="Destination directory", elem_id="sdconcepts_preprocess_destination",
                                         max_lines=1)
            with gr.Row():
                pre_width = gr.Slider(train.MIN_SIDE, MAX_IMAGE_SIDE, value=fit.size, step=fit.size_step, label="Width",
                                      elem_id="sdconcepts_preprocess_width")
                pre_height = gr.Slider(train.MIN_SIDE, MAX_IMAGE_SIDE, value=fit.size, step=fit.size_step,
                                       label="Height", elem_id="sdconcepts_preprocess_height")
            pre_caption_action = gr.Dropdown(list(CAPTION_ACTIONS), value="ignore",
                                             label="Existing Caption txt Action",
                                             elem_id="sdconcepts_preprocess_caption_action")
            with gr.Row():
                pre_keep = gr.Checkbox(value=False, label="Keep original size", elem_id="sdconcepts_preprocess_keep")
                pre_flip = gr.Checkbox(value=False, label="Create flipped copies", elem_id="sdconcepts_preprocess_flip")
                pre_split = gr.Checkbox(value=False, label="Split oversized images",
                                        elem_id="sdconcepts_preprocess_split")
                pre_name_caption = gr.Checkbox(value=False, label="Caption from file name",
                                               elem_id="sdconcepts_preprocess_name_caption")
            with gr.Row():
                pre_threshold = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Split image threshold",
                                          elem_id="sdconcepts_preprocess_threshold")
                pre_overlap = gr.Slider(0.0, 0.9, value=0.2, step=0.05, label="Split image overlap ratio",
                                        elem_id="sdconcepts_preprocess_overlap")
            pre_run = gr.Button("Preprocess", variant="primary", elem_id="sdconcepts_preprocess_button")
            pre_result = gr.HTML("", elem_id="sdconcepts_preprocess_result")
        with gr.Tab("Train", id="sdconcepts_train", elem_id="sdconcepts_tab_train"):
            gr.HTML('<div class="sdconcepts-train-help">Train an embedding or hypernetwork; you must specify a '
                    "directory with a set of 1:1 ratio images.</div>", elem_id="sdconcepts_train_help")
            with gr.Row():
                embedding = gr.Dropdown(train.embedding_names(session), label="Embedding",
                                        elem_id="sdconcepts_train_embedding", scale=4)
                hypernetwork = gr.Dropdown(train.hypernetwork_names(session), label="Hypernetwork",
                                           elem_id="sdconcepts_train_hypernetwork", scale=4)
                names_refresh = gr.Button("Refresh", elem_id="sdconcepts_train_names_refresh", scale=1)
            err_name = _field_error("name")
            with gr.Row():
                ti_lr = gr.Textbox(label="Embedding Learning rate", value="0.005", elem_id="sdconcepts_train_ti_lr",
                                   max_lines=1)
                hn_lr = gr.Textbox(label="Hypernetwork Learning rate", value="0.00001",
                                   elem_id="sdconcepts_train_hn_lr", max_lines=1)
            err_lr = _field_error("learn_rate")
            with gr.Row():
                clip_mode = gr.Dropdown(["disabled", "value", "norm"], value="disabled", label="Gradient Clipping",
                                        elem_id="sdconcepts_train_clip_mode")
                clip_value = gr.Textbox(label="Clip value", value="0.1", elem_id="sdconcepts_train_clip_value",
                                        max_lines=1)
            err_clip = _field_error("clip_grad_value")
            with gr.Row():
                batch_size = gr.Number(label="Batch size", value=1, precision=0, elem_id="sdconcepts_train_batch_size")
                accumulation = gr.Number(label="Gradient accumulation steps", value=1, precision=0,
                                         elem_id="sdconcepts_train_accumulation")
            err_batch = _field_error("batch_size")
            err_accumulation = _field_error("gradient_accumulation")
            dataset = gr.Textbox(label="Dataset directory", placeholder="Path to directory with input images",
                                 elem_id="sdconcepts_train_dataset", max_lines=1)
            err_dataset = _field_error("dataset")
            log_directory = gr.Textbox(label="Log directory", value="textual_inversion",
                                       elem_id="sdconcepts_train_log_directory", max_lines=1)
            err_log = _field_error("log_directory")
            template = gr.Dropdown(templates, value="style_filewords", label="Prompt template",
                                   elem_id="sdconcepts_train_template")
            err_template = _field_error("template")
            with gr.Row():
                width = gr.Slider(train.MIN_SIDE, MAX_IMAGE_SIDE, value=fit.size, step=fit.size_step, label="Width",
                                  elem_id="sdconcepts_train_width")
                height = gr.Slider(train.MIN_SIDE, MAX_IMAGE_SIDE, value=fit.size, step=fit.size_step, label="Height",
                                   elem_id="sdconcepts_train_height")
            keep_size = gr.Checkbox(value=False, label="Do not resize images", elem_id="sdconcepts_train_keep_size")
            err_size = _field_error("size")
            max_steps = gr.Number(label="Max steps", value=100000, precision=0, elem_id="sdconcepts_train_max_steps")
            err_steps = _field_error("max_steps")
            with gr.Row():
                preview_every = gr.Number(label="Save an image to log directory every N steps, 0 to disable",
                                          value=500, precision=0, elem_id="sdconcepts_train_preview_every")
                save_every = gr.Number(label="Save a copy of embedding to log directory every N steps, 0 to disable",
                                       value=500, precision=0, elem_id="sdconcepts_train_save_every")
            err_intervals = _field_error("intervals")
            use_alpha = gr.Checkbox(value=False, label="Use PNG alpha channel as loss weight",
                                    elem_id="sdconcepts_train_use_alpha")
            save_image_embedding = gr.Checkbox(value=True, label="Save images with embedding in PNG chunks",
                                               elem_id="sdconcepts_train_save_image_embedding")
            read_txt2img = gr.Checkbox(value=False,
                                       label="Read parameters (prompt, etc...) from txt2img tab when making previews",
                                       elem_id="sdconcepts_train_read_txt2img")
            shuffle_tags = gr.Checkbox(value=False, label="Shuffle tags by ',' when creating prompts.",
                                       elem_id="sdconcepts_train_shuffle_tags")
            tag_dropout = gr.Slider(0, 1, value=0, step=0.1, label="Drop out tags when creating prompts.",
                                    elem_id="sdconcepts_train_tag_dropout")
            err_dropout = _field_error("tag_dropout")
            latent_sampling = gr.Radio(["once", "deterministic", "random"], value="once",
                                       label="Choose latent sampling method",
                                       elem_id="sdconcepts_train_latent_sampling")
            with gr.Row():
                interrupt = gr.Button("Interrupt", elem_id="sdconcepts_train_interrupt")
                train_hn = gr.Button("Train Hypernetwork", variant="primary", elem_id="sdconcepts_train_hn_button")
                train_ti = gr.Button("Train Embedding", variant="primary", elem_id="sdconcepts_train_ti_button")
            message = gr.HTML("", elem_id="sdconcepts_train_message")
            status = gr.HTML(train.train_view(jobs.current).status_html, elem_id="sdconcepts_train_status")
            # A fixed height: gradio 6 lays an image out at zero height when its first value arrives in a hidden tab.
            plot = make(gr.Image, label="Loss", type="filepath", interactive=False, elem_id="sdconcepts_train_plot",
                        optional={"height": 380, "show_download_button": True})
            previews = make(gr.Gallery, label="Previews", elem_id="sdconcepts_train_previews", columns=4,
                            height="auto", optional={"object_fit": "contain"})
            saves = gr.Textbox(label="Saved files", lines=3, interactive=False, elem_id="sdconcepts_train_saves")

    errors = {"name": err_name, "learn_rate": err_lr, "clip_grad_value": err_clip, "batch_size": err_batch,
              "gradient_accumulation": err_accumulation, "dataset": err_dataset, "log_directory": err_log,
              "template": err_template, "size": err_size, "max_steps": err_steps, "intervals": err_intervals,
              "tag_dropout": err_dropout}
    error_outputs = [errors[key] for key in train.ERROR_FIELDS]
    view_outputs = [status, plot, previews, saves]

    # -- create --
    def on_create_ti(model_label: str, name: str, init: str, vectors: float, overwrite: bool):
        try:
            path = train.create_embedding(session, model_label, name, init, vectors, overwrite)
        except UiError as exc:
            return _message(str(exc)), update()
        return (_message(f"Created {path}", "sdconcepts-field-ok"),
                update(choices=train.embedding_names(session), value=path.stem))

    def on_create_hn(name: str, sizes: list[str], extra: str, layers: str, activation: str, init: str, norm: bool,
                     dropout: bool, dropout_structure: str, overwrite: bool):
        chosen = [*sizes, *[part for part in str(extra).split(",") if part.strip()]]
        try:
            path = train.create_hypernetwork(session, name, chosen, layers, activation, init, norm, dropout,
                                             dropout_structure if dropout else "", overwrite)
        except UiError as exc:
            return _message(str(exc)), update()
        return (_message(f"Created {path}", "sdconcepts-field-ok"),
                update(choices=train.hypernetwork_names(session), value=path.stem))

    created_ti = ti_create.click(on_create_ti, inputs=[model, ti_name, ti_init, ti_vectors, ti_overwrite],
                                 outputs=[ti_result, embedding])
    created_hn = hn_create.click(on_create_hn, inputs=[hn_name, hn_sizes, hn_extra, hn_layers, hn_activation, hn_init,
                                                       hn_norm, hn_dropout, hn_dropout_structure, hn_overwrite],
                                 outputs=[hn_result, hypernetwork])

    def on_preprocess(source: str, destination: str, width_v: float, height_v: float, action: str, keep: bool,
                      flip: bool, split: bool, name_caption: bool, threshold: float, overlap: float) -> str:
        settings = PreprocessSettings(width=int(width_v), height=int(height_v), caption_action=action,
                                      keep_size=bool(keep), flip=bool(flip), split=bool(split),
                                      split_threshold=float(threshold), overlap_ratio=float(overlap),
                                      caption_from_name=bool(name_caption))
        try:
            return _message(train.preprocess(session, source or "", destination or "", settings), "sdconcepts-field-ok")
        except UiError as exc:
            return _message(str(exc))

    pre_run.click(on_preprocess, inputs=[pre_source, pre_destination, pre_width, pre_height, pre_caption_action,
                                         pre_keep, pre_flip, pre_split, pre_name_caption, pre_threshold, pre_overlap],
                  outputs=[pre_result])

    def on_names_refresh(current_ti: str, current_hn: str):
        ti_names, hn_names = train.embedding_names(session), train.hypernetwork_names(session)
        return (update(choices=ti_names, value=current_ti if current_ti in ti_names else None),
                update(choices=hn_names, value=current_hn if current_hn in hn_names else None))

    names_refresh.click(on_names_refresh, inputs=[embedding, hypernetwork], outputs=[embedding, hypernetwork])
    # A page loaded later lists the files created since the UI was built.
    blocks.load(on_names_refresh, inputs=[embedding, hypernetwork], outputs=[embedding, hypernetwork])

    # -- train --
    settings = [ti_lr, hn_lr, clip_mode, clip_value, batch_size, accumulation, dataset, log_directory, template,
                width, height, keep_size, max_steps, preview_every, save_every, use_alpha, save_image_embedding,
                read_txt2img, shuffle_tags, tag_dropout, latent_sampling]
    preview_inputs = [txt2img[k] for k in ("prompt", "negative", "steps", "sampler", "cfg_scale", "seed")]

    def view_values(view: train.TrainView) -> list[Any]:
        return [view.status_html, view.plot, view.previews, view.saves]

    def start(kind: str, model_label: str, name: str, *values: Any):
        (ti_lr_v, hn_lr_v, clip_mode_v, clip_value_v, batch_v, accumulation_v, dataset_v, log_v, template_v,
         width_v, height_v, keep_v, steps_v, preview_v, save_v, alpha_v, image_embedding_v, read_v, shuffle_v,
         dropout_v, sampling_v, prompt_v, negative_v, p_steps_v, sampler_v, cfg_v, seed_v) = values
        fields: dict[str, Any] = {
            "dataset": dataset_v or "", "learn_rate": ti_lr_v if kind == "embedding" else hn_lr_v,
            "batch_size": batch_v, "gradient_accumulation": accumulation_v, "log_directory": log_v or "",
            "template": template_v or "", "width": width_v, "height": height_v, "keep_size": bool(keep_v),
            "max_steps": steps_v, "preview_every": preview_v, "save_every": save_v, "use_alpha_weight": bool(alpha_v),
            "shuffle_tags": bool(shuffle_v), "tag_dropout": float(dropout_v or 0), "latent_sampling": sampling_v,
            "clip_grad_mode": clip_mode_v, "clip_grad_value": clip_value_v or "",
            "save_image_with_embedding": bool(image_embedding_v),
        }
        if read_v:
            fields.update(preview_prompt=prompt_v or "", preview_negative_prompt=negative_v or "",
                          preview_steps=p_steps_v, preview_sampler=sampler_v, preview_cfg_scale=float(cfg_v),
                          preview_seed=seed_v)
        config, problems = train.training_config(kind, name, fields, roots=session.train_roots())
        error_values = [_message(problems.get(key, "")) for key in train.ERROR_FIELDS]
        if config is None:
            yield [_message("Fix the settings marked below; nothing was started."), *error_values,
                   *view_values(train.train_view(jobs.current))]
            return
        try:
            job = train.start_training(session, jobs, kind, model_label, name, config)
        except UiError as exc:
            yield [_message(str(exc)), *error_values, *view_values(train.train_view(jobs.current))]
            return
        keep = [update() for _ in error_values]
        for index, view in enumerate(train.follow(jobs, job=job)):
            # Only the first update clears the messages: a refusal shown meanwhile must stay.
            yield ["", *error_values, *view_values(view)] if index == 0 else [update(), *keep, *view_values(view)]

    def on_train_ti(model_label: str, name: str, *values: Any):
        yield from start("embedding", model_label, name, *values)

    def on_train_hn(model_label: str, name: str, *values: Any):
        yield from start("hypernetwork", model_label, name, *values)

    outputs = [message, *error_outputs, *view_outputs]
    trained_ti = train_ti.click(on_train_ti, inputs=[model, embedding, *settings, *preview_inputs], outputs=outputs,
                               **EVERY_CLICK)
    trained_hn = train_hn.click(on_train_hn, inputs=[model, hypernetwork, *settings, *preview_inputs],
                                outputs=outputs, **EVERY_CLICK)

    def on_interrupt() -> str:
        return _message(jobs.interrupt(), "sdconcepts-field-ok")

    interrupt.click(on_interrupt, inputs=None, outputs=[message], **UNLIMITED)

    chain_after([created_ti, created_hn, trained_ti, trained_hn], after_change)

    def on_model_change(model_label: str):
        # Another model has other widths and another size: offer its own (A1111 offers SD's whatever is loaded).
        chosen = train.form_defaults(session, model_label)
        size = update(value=chosen.size, step=chosen.size_step)
        return [update(choices=chosen.width_choices, value=chosen.widths_ticked), size, size, size, size]

    model.change(on_model_change, inputs=[model], outputs=[hn_sizes, width, height, pre_width, pre_height],
                 show_progress="hidden")

    def on_load():
        for view in train.follow(jobs):
            yield view_values(view)

    # A page that loads (or reloads) while a job runs follows it again, then shows the new files among the cards.
    chain_after([blocks.load(on_load, inputs=None, outputs=view_outputs, **UNLIMITED)], after_change)
    return {"status": status, "plot": plot, "previews": previews, "saves": saves, "message": message}


def chain_after(events: Sequence[Any], after_change: Sequence[tuple[Callable[..., Any], list[Any], list[Any]]]) -> None:
    """Re-render the card tabs after each event (a created or trained file appears without a restart)."""
    for event in events:
        for function, inputs, outputs in after_change:
            event.then(function, inputs=inputs, outputs=outputs, show_progress="hidden")
