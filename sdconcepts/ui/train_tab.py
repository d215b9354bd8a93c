"""Lays out the Train tab (Create embedding, Create hypernetwork, Preprocess images, Train) and wires it.

Nothing here decides anything: validation, the forms' meaning and the training start live in ``ui.train_handlers``,
the running job and what it shows in ``ui.train_jobs``. The Train form's fields travel as one ``TrainForm``. Messages
about a field are shown in a small HTML element right under it (``sdconcepts_train_err_<field>``).
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from sdconcepts.hypernetworks.hypernetwork import ACTIVATIONS, WEIGHT_INITS
from sdconcepts.limits import MAX_IMAGE_SIDE
from sdconcepts.training.config import EARLY_STOP_WINDOW
from sdconcepts.training.presets import PRESETS, Preset, preset
from sdconcepts.training.templates import available_templates
from sdconcepts.ui import train_handlers, train_jobs
from sdconcepts.ui.compat import GRADIO_MAJOR, make, update
from sdconcepts.ui.train_handlers import FormDefaults, TrainForm
from sdconcepts.ui.train_preprocess import CAPTION_ACTIONS
from sdconcepts.ui.ui_session import UiError, UiSession

__all__ = ["TxtToImg", "build_train_tab", "chain_after", "uses_markdown"]

USES_DOC = Path(__file__).resolve().parents[2] / "docs" / "uses.md"  # the six uses, measured (toyworld showcase)

def uses_markdown() -> str:
    """docs/uses.md for the Train tab, without its pictures (a page served by the app or a host cannot show the
    checkout's files; each picture is named by its path instead); "" when the file is missing."""
    try:
        text = USES_DOC.read_text(encoding="utf-8")
    except OSError:
        return ""
    lines = []
    for line in text.splitlines():
        if line.startswith("<a id="):
            continue  # the page's anchors; the links to them stay harmless text in the tab
        picture = re.fullmatch(r"!\[(.*)\]\((.*)\)", line.strip())
        lines.append(f"*(picture: {picture.group(1)}, docs/{picture.group(2)})*" if picture else
                     line.replace("<", "&lt;"))
    return "\n".join(lines)


# Components of the txt2img tab read when "Read parameters from txt2img tab" is ticked.
TxtToImg = dict[str, Any]
AfterChange = Sequence[tuple[Callable[..., Any], list[Any], list[Any]]]


# Following a job lasts as long as the job: from gradio 4 each event runs one at a time unless told otherwise, and a
# second Train click (refused at once) or a second page's reattach must not wait behind the first.
UNLIMITED: dict[str, Any] = {"concurrency_limit": None} if GRADIO_MAJOR >= 4 else {}
# From gradio 4 a click is ignored while the button's previous click runs; a Train click must reach the server.
EVERY_CLICK: dict[str, Any] = {"concurrency_limit": None, "trigger_mode": "multiple"} if GRADIO_MAJOR >= 4 else {}


def _message(text: str, css: str = "sdconcepts-field-error") -> str:
    return f'<div class="{css}">{html.escape(text)}</div>' if text else ""


def _field_error(key: str) -> Any:
    return gr.HTML("", elem_id=f"sdconcepts_train_err_{key}")


def build_train_tab(blocks: gr.Blocks, session: UiSession, jobs: train_jobs.TrainingJobs, model: Any,
                    txt2img: TxtToImg, after_change: AfterChange) -> dict[str, Any]:
    """Build the tab inside the current layout context; ``after_change`` re-renders the card tabs."""
    templates = list(available_templates())
    # The forms fit the model chosen when the page is built, and follow the model dropdown (_wire_model_change).
    fit = train_handlers.form_defaults(session, session.default_choice())
    chosen = preset(None)
    presets = gr.Dropdown(list(PRESETS), value=chosen.name, label="Embedding defaults",
                          info="; ".join(f"{p.name}: {p.description}" for p in PRESETS.values()),
                          elem_id="sdconcepts_train_preset")
    with gr.Tabs(elem_id="sdconcepts_train_tabs"):
        with gr.Tab("Create embedding", id="sdconcepts_create_ti", elem_id="sdconcepts_tab_create_ti"):
            ti = _create_embedding_form(chosen)
        with gr.Tab("Create hypernetwork", id="sdconcepts_create_hn", elem_id="sdconcepts_tab_create_hn"):
            hn = _create_hypernetwork_form(fit)
        with gr.Tab("Preprocess images", id="sdconcepts_preprocess", elem_id="sdconcepts_tab_preprocess"):
            pre = _preprocess_form(fit)
        with gr.Tab("Train", id="sdconcepts_train", elem_id="sdconcepts_tab_train"):
            c = _train_form(session, fit, templates, chosen)
            c.update(_train_outputs(jobs))
    _wire_preset(presets, ti, c)

    created = _wire_create(session, model, ti, hn, c)
    _wire_preprocess(session, pre)
    _wire_names_refresh(blocks, session, c)
    form = {**{key: c[key] for key in TrainForm.keys() if key in c},
            **{f"preview_{key}": txt2img[source] if source in txt2img else gr.State(None)
               for key, source in PREVIEW_FROM_TXT2IMG.items()}}
    trained = _wire_training(session, jobs, model, c, form)
    chain_after([*created, *trained], after_change)
    _wire_model_change(session, model, hn, c, pre)
    _wire_reattach(blocks, jobs, c, after_change)
    return {key: c[key] for key in ("status", "plot", "previews", "saves", "message")}


# -- layout ------------------------------------------------------------------------------------------------------

# The Train form's preview fields, read from these txt2img components (``TrainForm.preview_*``).
PREVIEW_FROM_TXT2IMG = {"prompt": "prompt", "negative_prompt": "negative", "steps": "steps", "sampler": "sampler",
                        "cfg_scale": "cfg_scale", "seed": "seed", "schedule": "schedule"}


def _size_row(fit: FormDefaults, id_prefix: str) -> dict[str, Any]:
    """Width and height sliders side by side, at the model's native size and step (``width``, ``height``)."""
    with gr.Row():
        return {side: gr.Slider(train_handlers.MIN_SIDE, MAX_IMAGE_SIDE, value=fit.size, step=fit.size_step,
                                label=side.capitalize(), elem_id=f"{id_prefix}{side}") for side in ("width", "height")}


def _create_embedding_form(chosen: Preset) -> dict[str, Any]:
    c: dict[str, Any] = {}
    c["name"] = gr.Textbox(label="Name", elem_id="sdconcepts_create_ti_name", max_lines=1)
    c["init"] = gr.Textbox(label="Initialization text", value=chosen.init_text, elem_id="sdconcepts_create_ti_init",
                           max_lines=1)
    c["vectors"] = gr.Slider(1, 75, value=chosen.vectors, step=1, label="Number of vectors per token",
                             elem_id="sdconcepts_create_ti_vectors")
    c["overwrite"] = gr.Checkbox(value=False, label="Overwrite Old Embedding", elem_id="sdconcepts_create_ti_overwrite")
    c["create"] = gr.Button("Create embedding", variant="primary", elem_id="sdconcepts_create_ti_button")
    c["result"] = gr.HTML("", elem_id="sdconcepts_create_ti_result")
    return c


def _create_hypernetwork_form(fit: FormDefaults) -> dict[str, Any]:
    c: dict[str, Any] = {}
    c["name"] = gr.Textbox(label="Name", elem_id="sdconcepts_create_hn_name", max_lines=1)
    c["sizes"] = gr.CheckboxGroup(fit.width_choices, value=fit.widths_ticked,
                                  label=fit.widths_label, elem_id="sdconcepts_create_hn_sizes")
    c["extra"] = gr.Textbox(label="More modules (context widths, comma-separated, for another model)",
                            value="", elem_id="sdconcepts_create_hn_extra", max_lines=1)
    c["layers"] = gr.Textbox(label="Enter hypernetwork layer structure", value="1, 2, 1",
                             placeholder="1st and last digit must be 1. ex:'1, 2, 1'",
                             elem_id="sdconcepts_create_hn_layers", max_lines=1)
    c["activation"] = gr.Dropdown(list(ACTIVATIONS), value="linear", label="Select activation function",
                                  elem_id="sdconcepts_create_hn_activation")
    c["init"] = gr.Dropdown(list(WEIGHT_INITS), value="Normal", label="Select Layer weights initialization",
                            elem_id="sdconcepts_create_hn_init")
    c["norm"] = gr.Checkbox(value=False, label="Add layer normalization", elem_id="sdconcepts_create_hn_norm")
    c["dropout"] = gr.Checkbox(value=False, label="Use dropout", elem_id="sdconcepts_create_hn_dropout")
    c["dropout_structure"] = gr.Textbox(
        label="Enter hypernetwork Dropout structure (or empty)", value="0, 0, 0",
        placeholder="1st and last digit must be 0 and values should be between 0 and 1. ex:'0, 0.01, 0'",
        elem_id="sdconcepts_create_hn_dropout_structure", max_lines=1)
    c["overwrite"] = gr.Checkbox(value=False, label="Overwrite Old Hypernetwork",
                                 elem_id="sdconcepts_create_hn_overwrite")
    c["create"] = gr.Button("Create hypernetwork", variant="primary", elem_id="sdconcepts_create_hn_button")
    c["result"] = gr.HTML("", elem_id="sdconcepts_create_hn_result")
    return c


def _preprocess_form(fit: FormDefaults) -> dict[str, Any]:
    c: dict[str, Any] = {}
    c["source"] = gr.Textbox(label="Source directory", elem_id="sdconcepts_preprocess_source", max_lines=1)
    c["destination"] = gr.Textbox(label="Destination directory", elem_id="sdconcepts_preprocess_destination",
                                  max_lines=1)
    c.update(_size_row(fit, "sdconcepts_preprocess_"))
    c["caption_action"] = gr.Dropdown(list(CAPTION_ACTIONS), value="ignore", label="Existing Caption txt Action",
                                      elem_id="sdconcepts_preprocess_caption_action")
    with gr.Row():
        c["keep_size"] = gr.Checkbox(value=False, label="Keep original size", elem_id="sdconcepts_preprocess_keep")
        c["flip"] = gr.Checkbox(value=False, label="Create flipped copies", elem_id="sdconcepts_preprocess_flip")
        c["split"] = gr.Checkbox(value=False, label="Split oversized images", elem_id="sdconcepts_preprocess_split")
        c["caption_from_name"] = gr.Checkbox(value=False, label="Caption from file name",
                                             elem_id="sdconcepts_preprocess_name_caption")
    with gr.Row():
        c["split_threshold"] = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Split image threshold",
                                         elem_id="sdconcepts_preprocess_threshold")
        c["overlap_ratio"] = gr.Slider(0.0, 0.9, value=0.2, step=0.05, label="Split image overlap ratio",
                                       elem_id="sdconcepts_preprocess_overlap")
    c["run"] = gr.Button("Preprocess", variant="primary", elem_id="sdconcepts_preprocess_button")
    c["result"] = gr.HTML("", elem_id="sdconcepts_preprocess_result")
    return c


def _train_form(session: UiSession, fit: FormDefaults, templates: list[str], chosen: Preset) -> dict[str, Any]:
    """The Train sub-tab's settings; keys are ``TrainForm``'s fields, ``err_<field>`` the messages under them."""
    gr.HTML('<div class="sdconcepts-train-help">Train an embedding or hypernetwork; you must specify a '
            "directory with a set of 1:1 ratio images. What they are good for, measured: docs/uses.md (below, "
            "and with its pictures in the checkout).</div>", elem_id="sdconcepts_train_help")
    uses = uses_markdown()
    if uses:
        with gr.Accordion("The six uses of textual inversion, measured (docs/uses.md)", open=False,
                          elem_id="sdconcepts_train_uses"):
            gr.Markdown(uses, elem_id="sdconcepts_train_uses_text")
    c: dict[str, Any] = {}
    with gr.Row():
        c["embedding"] = gr.Dropdown(train_handlers.embedding_names(session), label="Embedding",
                                     elem_id="sdconcepts_train_embedding", scale=4)
        c["hypernetwork"] = gr.Dropdown(train_handlers.hypernetwork_names(session), label="Hypernetwork",
                                        elem_id="sdconcepts_train_hypernetwork", scale=4)
        c["names_refresh"] = gr.Button("Refresh", elem_id="sdconcepts_train_names_refresh", scale=1)
    c["err_name"] = _field_error("name")
    with gr.Row():
        c["embedding_learn_rate"] = gr.Textbox(label="Embedding Learning rate", value=chosen.learn_rate,
                                               elem_id="sdconcepts_train_ti_lr", max_lines=1)
        c["hypernetwork_learn_rate"] = gr.Textbox(label="Hypernetwork Learning rate", value="0.00001",
                                                  elem_id="sdconcepts_train_hn_lr", max_lines=1)
    c["err_learn_rate"] = _field_error("learn_rate")
    with gr.Row():
        c["clip_grad_mode"] = gr.Dropdown(["disabled", "value", "norm"], value="disabled", label="Gradient Clipping",
                                          elem_id="sdconcepts_train_clip_mode")
        c["clip_grad_value"] = gr.Textbox(label="Clip value", value="0.1", elem_id="sdconcepts_train_clip_value",
                                          max_lines=1)
    c["err_clip_grad_value"] = _field_error("clip_grad_value")
    with gr.Row():
        c["batch_size"] = gr.Number(label="Batch size", value=chosen.batch_size, precision=0, elem_id="sdconcepts_train_batch_size")
        c["gradient_accumulation"] = gr.Number(label="Gradient accumulation steps", value=1, precision=0,
                                               elem_id="sdconcepts_train_accumulation")
    c["err_batch_size"] = _field_error("batch_size")
    c["err_gradient_accumulation"] = _field_error("gradient_accumulation")
    c["dataset"] = gr.Textbox(label="Dataset directory", placeholder="Path to directory with input images",
                              elem_id="sdconcepts_train_dataset", max_lines=1)
    c["err_dataset"] = _field_error("dataset")
    c["log_directory"] = gr.Textbox(label="Log directory", value=session.config.train_log_dir,
                                    elem_id="sdconcepts_train_log_directory", max_lines=1)
    c["err_log_directory"] = _field_error("log_directory")
    c["template"] = gr.Dropdown(templates, value="style_filewords", label="Prompt template",
                                elem_id="sdconcepts_train_template")
    c["err_template"] = _field_error("template")
    c.update(_size_row(fit, "sdconcepts_train_"))
    c["keep_size"] = gr.Checkbox(value=False, label="Do not resize images", elem_id="sdconcepts_train_keep_size")
    c["err_size"] = _field_error("size")
    c["max_steps"] = gr.Number(label="Max steps", value=100000, precision=0, elem_id="sdconcepts_train_max_steps")
    c["err_max_steps"] = _field_error("max_steps")
    with gr.Row():
        c["preview_every"] = gr.Number(label="Save an image to log directory every N steps, 0 to disable",
                                       value=500, precision=0, elem_id="sdconcepts_train_preview_every")
        c["save_every"] = gr.Number(label="Save a copy of embedding to log directory every N steps, 0 to disable",
                                    value=500, precision=0, elem_id="sdconcepts_train_save_every")
    c["err_intervals"] = _field_error("intervals")
    c["use_alpha_weight"] = gr.Checkbox(value=False, label="Use PNG alpha channel as loss weight",
                                        elem_id="sdconcepts_train_use_alpha")
    c["save_image_with_embedding"] = gr.Checkbox(value=True, label="Save images with embedding in PNG chunks",
                                                 elem_id="sdconcepts_train_save_image_embedding")
    c["read_txt2img"] = gr.Checkbox(value=False,
                                    label="Read parameters (prompt, etc...) from txt2img tab when making previews",
                                    elem_id="sdconcepts_train_read_txt2img")
    c["shuffle_tags"] = gr.Checkbox(value=False, label="Shuffle tags by ',' when creating prompts.",
                                    elem_id="sdconcepts_train_shuffle_tags")
    c["tag_dropout"] = gr.Slider(0, 1, value=0, step=0.1, label="Drop out tags when creating prompts.",
                                 elem_id="sdconcepts_train_tag_dropout")
    c["err_tag_dropout"] = _field_error("tag_dropout")
    c["latent_sampling"] = gr.Radio(["once", "deterministic", "random"], value="once",
                                    label="Choose latent sampling method", elem_id="sdconcepts_train_latent_sampling")
    _validation_fields(c)
    return c


def _validation_fields(c: dict[str, Any]) -> None:
    """Beyond A1111: the validation loss, the best step's file, the early stop and the compiled UNet."""
    with gr.Row():
        c["validate_every"] = gr.Number(label="Validation loss every N steps (-1: automatic, 0: off); the best step "
                                        "is saved as <name>-best", value=-1, precision=0,
                                        elem_id="sdconcepts_train_validate_every")
        c["validation_share"] = gr.Slider(0, 0.5, value=0, step=0.05,
                                          label="Hold out this share of the pictures for it (0: the training pictures)",
                                          elem_id="sdconcepts_train_validation_share")
    with gr.Row():
        c["early_stop"] = gr.Checkbox(value=False, label="Stop early once the validation loss has settled",
                                      elem_id="sdconcepts_train_early_stop")
        c["early_stop_window"] = gr.Number(label="Early stop window (validation checks)", value=EARLY_STOP_WINDOW,
                                           precision=0, elem_id="sdconcepts_train_early_stop_window")
    c["err_validation"] = _field_error("validation")
    c["compile_unet"] = gr.Checkbox(value=False, label="Compile the UNet (torch.compile: slower start, faster steps)",
                                    elem_id="sdconcepts_train_compile")


def _train_outputs(jobs: train_jobs.TrainingJobs) -> dict[str, Any]:
    """The Train sub-tab's buttons and what a job shows (status, loss plot, previews, saved files)."""
    c: dict[str, Any] = {}
    with gr.Row():
        c["interrupt"] = gr.Button("Interrupt", elem_id="sdconcepts_train_interrupt")
        c["train_hn"] = gr.Button("Train Hypernetwork", variant="primary", elem_id="sdconcepts_train_hn_button")
        c["train_ti"] = gr.Button("Train Embedding", variant="primary", elem_id="sdconcepts_train_ti_button")
    c["message"] = gr.HTML("", elem_id="sdconcepts_train_message")
    c["status"] = gr.HTML(train_jobs.train_view(jobs.current).status_html, elem_id="sdconcepts_train_status")
    # A fixed height: gradio 6 lays an image out at zero height when its first value arrives in a hidden tab.
    c["plot"] = make(gr.Image, label="Loss", type="filepath", interactive=False, elem_id="sdconcepts_train_plot",
                     optional={"height": 380, "show_download_button": True})
    c["previews"] = make(gr.Gallery, label="Previews", elem_id="sdconcepts_train_previews", columns=4,
                         height="auto", optional={"object_fit": "contain"})
    c["saves"] = gr.Textbox(label="Saved files", lines=3, interactive=False, elem_id="sdconcepts_train_saves")
    return c


# -- wiring ------------------------------------------------------------------------------------------------------


def _view_outputs(c: dict[str, Any]) -> list[Any]:
    return [c["status"], c["plot"], c["previews"], c["saves"]]


def _view_values(view: train_jobs.TrainView) -> list[Any]:
    return [view.status_html, view.plot, view.previews, view.saves]


def _wire_create(session: UiSession, model: Any, ti: dict[str, Any], hn: dict[str, Any],
                 train: dict[str, Any]) -> list[Any]:
    """The Create buttons; a created file is chosen in the Train form's dropdown. Returns the click events."""

    def on_create_ti(model_label: str, name: str, init: str, vectors: float, overwrite: bool):
        try:
            path = train_handlers.create_embedding(session, model_label, name, init, vectors, overwrite)
        except UiError as exc:
            return _message(str(exc)), update()
        return (_message(f"Created {path}", "sdconcepts-field-ok"),
                update(choices=train_handlers.embedding_names(session), value=path.stem))

    def on_create_hn(name: str, sizes: list[str], extra: str, layers: str, activation: str, init: str, norm: bool,
                     dropout: bool, dropout_structure: str, overwrite: bool):
        try:
            path = train_handlers.create_hypernetwork_from_form(session, name, sizes, extra, layers, activation, init,
                                                                norm, dropout, dropout_structure, overwrite)
        except UiError as exc:
            return _message(str(exc)), update()
        return (_message(f"Created {path}", "sdconcepts-field-ok"),
                update(choices=train_handlers.hypernetwork_names(session), value=path.stem))

    created_ti = ti["create"].click(on_create_ti, inputs=[model, ti["name"], ti["init"], ti["vectors"],
                                                          ti["overwrite"]],
                                    outputs=[ti["result"], train["embedding"]])
    hn_inputs = [hn[key] for key in ("name", "sizes", "extra", "layers", "activation", "init", "norm", "dropout",
                                     "dropout_structure", "overwrite")]
    created_hn = hn["create"].click(on_create_hn, inputs=hn_inputs, outputs=[hn["result"], train["hypernetwork"]])
    return [created_ti, created_hn]


PREPROCESS_INPUTS = ("source", "destination", "width", "height", "caption_action", "keep_size", "flip", "split",
                     "caption_from_name", "split_threshold", "overlap_ratio")


def _wire_preset(presets: Any, ti: dict[str, Any], c: dict[str, Any]) -> None:
    def on_preset(name: str):
        try:
            return [update(value=value) for value in train_handlers.preset_fields(name)]
        except UiError:
            return [update() for _ in range(4)]

    presets.change(on_preset, inputs=[presets], outputs=[ti["init"], ti["vectors"], c["embedding_learn_rate"],
                                                         c["batch_size"]], show_progress="hidden")


def _wire_preprocess(session: UiSession, pre: dict[str, Any]) -> None:
    def on_preprocess(*values: Any) -> str:
        form = dict(zip(PREPROCESS_INPUTS, values, strict=True))
        try:
            return _message(train_handlers.preprocess_form(session, form), "sdconcepts-field-ok")
        except UiError as exc:
            return _message(str(exc))

    pre["run"].click(on_preprocess, inputs=[pre[key] for key in PREPROCESS_INPUTS], outputs=[pre["result"]])


def _wire_names_refresh(blocks: gr.Blocks, session: UiSession, c: dict[str, Any]) -> None:
    def on_names_refresh(current_ti: str, current_hn: str):
        ti_names, hn_names = train_handlers.embedding_names(session), train_handlers.hypernetwork_names(session)
        return (update(choices=ti_names, value=train_handlers.still_listed(current_ti, ti_names)),
                update(choices=hn_names, value=train_handlers.still_listed(current_hn, hn_names)))

    names = [c["embedding"], c["hypernetwork"]]
    c["names_refresh"].click(on_names_refresh, inputs=names, outputs=names)
    # A page loaded later lists the files created since the UI was built.
    blocks.load(on_names_refresh, inputs=names, outputs=names)


def _wire_training(session: UiSession, jobs: train_jobs.TrainingJobs, model: Any, c: dict[str, Any],
                   form: dict[str, Any]) -> list[Any]:
    """The Train and Interrupt buttons: the form is read as one ``TrainForm``. Returns the Train click events."""
    error_outputs = [c[f"err_{key}"] for key in train_handlers.ERROR_FIELDS]
    form_inputs = [form[key] for key in TrainForm.keys()]

    def start(kind: str, model_label: str, name: str, values: Sequence[Any]):
        settings = TrainForm.from_values(dict(zip(TrainForm.keys(), values, strict=True)))
        started = train_handlers.start_from_form(session, jobs, kind, model_label, name, settings)
        error_values = [_message(started.problems.get(key, "")) for key in train_handlers.ERROR_FIELDS]
        if started.job is None:
            yield [_message(started.message), *error_values, *_view_values(train_jobs.train_view(jobs.current))]
            return
        keep = [update() for _ in error_values]
        for index, view in enumerate(train_jobs.follow(jobs, job=started.job)):
            # Only the first update clears the messages (or shows the start's note): a refusal shown meanwhile must
            # stay.
            first = [_message(started.message, "sdconcepts-field-ok"), *error_values, *_view_values(view)]
            yield first if index == 0 else [update(), *keep, *_view_values(view)]

    def on_train_ti(model_label: str, name: str, *values: Any):
        yield from start("embedding", model_label, name, values)

    def on_train_hn(model_label: str, name: str, *values: Any):
        yield from start("hypernetwork", model_label, name, values)

    outputs = [c["message"], *error_outputs, *_view_outputs(c)]
    trained_ti = c["train_ti"].click(on_train_ti, inputs=[model, c["embedding"], *form_inputs], outputs=outputs,
                                     **EVERY_CLICK)
    trained_hn = c["train_hn"].click(on_train_hn, inputs=[model, c["hypernetwork"], *form_inputs], outputs=outputs,
                                     **EVERY_CLICK)

    def on_interrupt() -> str:
        return _message(jobs.interrupt(), "sdconcepts-field-ok")

    c["interrupt"].click(on_interrupt, inputs=None, outputs=[c["message"]], **UNLIMITED)
    return [trained_ti, trained_hn]


def _wire_model_change(session: UiSession, model: Any, hn: dict[str, Any], c: dict[str, Any],
                       pre: dict[str, Any]) -> None:
    def on_model_change(model_label: str):
        # Another model has other widths and another size: offer its own (A1111 offers SD's whatever is loaded).
        chosen = train_handlers.form_defaults(session, model_label)
        size = update(value=chosen.size, step=chosen.size_step)
        return [update(choices=chosen.width_choices, value=chosen.widths_ticked, label=chosen.widths_label), size, size,
                size, size]

    model.change(on_model_change, inputs=[model], outputs=[hn["sizes"], c["width"], c["height"], pre["width"],
                                                             pre["height"]],
                 show_progress="hidden")


def _wire_reattach(blocks: gr.Blocks, jobs: train_jobs.TrainingJobs, c: dict[str, Any],
                   after_change: AfterChange) -> None:
    def on_load():
        for view in train_jobs.follow(jobs):
            yield _view_values(view)

    # A page that loads (or reloads) while a job runs follows it again, then shows the new files among the cards.
    chain_after([blocks.load(on_load, inputs=None, outputs=_view_outputs(c), **UNLIMITED)], after_change)


def chain_after(events: Sequence[Any], after_change: AfterChange) -> None:
    """Re-render the card tabs after each event (a created or trained file appears without a restart)."""
    for event in events:
        for function, inputs, outputs in after_change:
            event.then(function, inputs=inputs, outputs=outputs, show_progress="hidden")
