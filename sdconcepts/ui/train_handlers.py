"""The Train tab's decisions without gradio: what the forms offer, creating files, preprocessing, reading the
Train form (``TrainForm``) into a validated config with a message per field, and starting the run.

The running job and its views live in ``ui.train_jobs``. Generation and training share the loaded model through
``UiSession.generate_lock``: an embedding run takes it for each step (txt2img slips in between steps), a hypernetwork
run for the whole run (its modules stay attached to the UNet meanwhile, so txt2img waits until the run ends).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from sdconcepts.embeddings.files import EMBEDDING_SUFFIXES
from sdconcepts.embeddings.folder_scan import is_preview_image
from sdconcepts.file_names import InvalidNameError
from sdconcepts.generation import engine_sampler
from sdconcepts.hypernetworks.hypernetwork import HypernetworkError
from sdconcepts.training.config import (
    EARLY_STOP_WINDOW,
    ConfigError,
    EmbeddingTrainingConfig,
    HypernetworkTrainingConfig,
    TrainingConfig,
)
from sdconcepts.training.create import MAX_VECTORS, CreateError, create_embedding_file, create_hypernetwork_file
from sdconcepts.training.loop import TrainingEvent
from sdconcepts.training.presets import preset
from sdconcepts.training.templates import available_templates
from sdconcepts.training.training_model import TrainingModel
from sdconcepts.ui.train_jobs import HOST_NOTE, TrainingJob, TrainingJobs
from sdconcepts.ui.train_preprocess import run_preprocess
from sdconcepts.ui.ui_session import UiError, UiSession, contained_path, whole_number

__all__ = [
    "ERROR_FIELDS",
    "MIN_SIDE",
    "FormDefaults",
    "TrainForm",
    "TrainStart",
    "create_embedding",
    "create_hypernetwork",
    "create_hypernetwork_from_form",
    "embedding_names",
    "hypernetwork_names",
    "form_defaults",
    "preprocess",
    "preprocess_form",
    "start_from_form",
    "start_training",
    "still_listed",
    "training_config",
]

# Where a settings message is shown: the key of the field (group) it is about.
ERROR_FIELDS = ("name", "learn_rate", "clip_grad_value", "batch_size", "gradient_accumulation", "dataset",
                "log_directory", "template", "size", "max_steps", "intervals", "tag_dropout", "validation")
_PREFIXES = (
    ("learn rate", "learn_rate"), ("clip value", "clip_grad_value"), ("batch size", "batch_size"),
    ("gradient accumulation", "gradient_accumulation"), ("max steps", "max_steps"),
    ("save, preview and csv", "intervals"), ("a log directory", "log_directory"), ("width", "size"),
    ("height", "size"), ("tag dropout", "tag_dropout"), ("dataset", "dataset"), ("template", "template"),
    ("validation", "validation"), ("early stop", "validation"),
)


def error_field(message: str) -> str:
    """The field a ``ConfigError`` message is about (its messages start with the field's label)."""
    lowered = message.lower()
    for prefix, key in _PREFIXES:
        if lowered.startswith(prefix):
            return key
    return "name"


def _first_folder(folders: Sequence[Path], default: str) -> Path:
    return Path(folders[0]) if folders else Path(default)


def embeddings_folder(session: UiSession) -> Path:
    return _first_folder(session.config.embeddings_dirs, "embeddings")


def hypernetworks_folder(session: UiSession) -> Path:
    return _first_folder(session.config.hypernetworks_dirs, "models/hypernetworks")


def embedding_names(session: UiSession) -> list[str]:
    """Embedding files (by name) in the folder training reads them from."""
    folder = embeddings_folder(session)
    if not folder.is_dir():
        return []
    return sorted({p.stem for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in EMBEDDING_SUFFIXES and not is_preview_image(p)
                   and not p.name.endswith(".optim")}, key=str.lower)


def hypernetwork_names(session: UiSession) -> list[str]:
    folder = hypernetworks_folder(session)
    if not folder.is_dir():
        return []
    return sorted({p.stem for p in folder.glob("*.pt") if p.is_file() and p.stem != "None"}, key=str.lower)


# -- what the forms offer ----------------------------------------------------------------------------------------

# A1111's Create hypernetwork: every width offered, the SD 1.x ones ticked; used when the model's shape is unknown.
_A1111_CHOICES = ["768", "1024", "320", "640", "1280"]
_A1111_TICKED = ["768", "320", "640", "1280"]
MIN_SIDE = 8  # the smallest side the training config and preprocessing accept (a model may want a multiple of more)


@dataclass(frozen=True)
class FormDefaults:
    """What the Train tab's forms offer for a model: its hypernetwork widths (all ticked) and its native size."""

    width_choices: list[str]
    widths_ticked: list[str]
    size: int
    size_step: int
    widths_label: str = "Modules (the model's attention widths)"


# When only loading would tell (a .ckpt, a host's model not used yet): A1111's widths, not called the model's own.
UNKNOWN_WIDTHS_LABEL = ("Modules (A1111's widths: 768 SD 1.x, 1024 SD 2.x, 320/640/1280 both; this model's own are "
                        "offered once it is loaded)")


def form_defaults(session: UiSession, model_label: str | None = None) -> FormDefaults:
    """The chosen model's widths and size (the toy model: 48/32/64 at 32 px), read from its files without loading it
    when they say; A1111's 768/320/640/1280 at 512 px when only loading would tell."""
    try:
        shape = session.model_shape(model_label)
    except UiError:
        shape = None
    if shape is None:
        return FormDefaults(list(_A1111_CHOICES), list(_A1111_TICKED), 512, 8, UNKNOWN_WIDTHS_LABEL)
    widths = [str(w) for w in shape.widths]
    # The slider steps by 8 (A1111's step) unless the model's own multiple is smaller; the run checks the multiple.
    return FormDefaults(widths, list(widths), int(shape.size), min(8, int(shape.multiple)))


# -- create ------------------------------------------------------------------------------------------------------


def preset_fields(name: str) -> tuple[str, int, str, int]:
    """A preset's (initialization text, vectors, embedding learning rate, batch size) for the Train tab's fields."""
    try:
        chosen = preset(name)
    except ValueError as exc:
        raise UiError(str(exc)) from None
    return chosen.init_text, chosen.vectors, chosen.learn_rate, chosen.batch_size


def create_embedding(session: UiSession, model_label: str, name: str, init_text: str, vectors: float,
                     overwrite: bool) -> Path:
    """A1111's Create embedding on the chosen model's token embeddings; raises UiError naming the problem."""
    from sdconcepts.file_names import InvalidNameError, target_path
    from sdconcepts.training.create import CreateError

    count = whole_number(vectors or 0, "vectors per token")
    if not str(name).strip():
        raise UiError("name: enter a name for the embedding")
    if not 1 <= count <= MAX_VECTORS:
        raise UiError(f"vectors per token must be between 1 and {MAX_VECTORS}, got {count}")
    folder = embeddings_folder(session)
    try:
        target = target_path(folder, name)
        if target.exists() and not overwrite:
            raise UiError(f"name: {target} already exists (tick Overwrite Old Embedding to replace it)")
        with session.generate_lock:
            model = TrainingModel(session.model(model_label))
            rows = model.token_rows(init_text or "", count)
        path = create_embedding_file(folder, name, rows, vectors=count, width=model.context_width,
                                     overwrite=bool(overwrite), sd_checkpoint=getattr(model.model, "short_hash", None),
                                     sd_checkpoint_name=getattr(model.model, "name", None))
    except (CreateError, InvalidNameError) as exc:
        raise UiError(f"name: {exc}") from exc
    session.files_changed("embedding")  # inside a host: its lists know the new file at once
    return path


def _numbers(text: str, label: str, kind: Callable[[str], Any]) -> list[Any]:
    try:
        return [kind(part.strip()) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise UiError(f"{label} must be comma-separated numbers, got {text!r}") from None


def create_hypernetwork(session: UiSession, name: str, sizes: Sequence[str] | str, layer_structure: str,
                        activation: str, weight_init: str, layer_norm: bool, use_dropout: bool,
                        dropout_structure: str, overwrite: bool) -> Path:
    """A1111's Create hypernetwork; raises UiError naming the field that cannot work."""
    if not str(name).strip():
        raise UiError("name: enter a name for the hypernetwork")
    text = sizes if isinstance(sizes, str) else ",".join(str(s) for s in sizes)
    widths = _numbers(text, "modules", int)
    if not widths:
        raise UiError("modules: choose at least one context width")
    try:
        path = create_hypernetwork_file(
            hypernetworks_folder(session), name, widths=widths,
            layer_structure=_numbers(layer_structure, "layer structure", float), activation=activation,
            weight_init=weight_init, layer_norm=bool(layer_norm), use_dropout=bool(use_dropout),
            dropout_structure=_numbers(dropout_structure, "dropout structure", float), overwrite=bool(overwrite),
        )
    except (CreateError, InvalidNameError) as exc:
        raise UiError(f"name: {exc}") from exc
    except HypernetworkError as exc:
        raise UiError(f"layer structure: {exc}") from exc
    # Inside a host: its lists (A1111's and reForge's hypernetwork dropdowns, the embedding databases) know it at once.
    session.files_changed("hypernetwork")
    return path


def create_hypernetwork_from_form(session: UiSession, name: str, sizes: Sequence[str], extra: str, layer_structure: str,
                                  activation: str, weight_init: str, layer_norm: bool, use_dropout: bool,
                                  dropout_structure: str, overwrite: bool) -> Path:
    """The Create hypernetwork form: the ticked widths and the typed ones; the dropout structure only with dropout."""
    chosen = [*sizes, *[part for part in str(extra).split(",") if part.strip()]]
    return create_hypernetwork(session, name, chosen, layer_structure, activation, weight_init, layer_norm,
                               use_dropout, dropout_structure if use_dropout else "", overwrite)


def still_listed(current: str | None, names: Sequence[str]) -> str | None:
    """A dropdown's choice after its names were listed again: kept while its file is still there."""
    return current if current in names else None


# -- preprocess --------------------------------------------------------------------------------------------------


def preprocess(session: UiSession, source: str, destination: str, settings: Any) -> str:
    """The Preprocess images button: both folders must lie in the server's folders; returns the one-line summary
    (written, read, skipped with reasons). Raises UiError when nothing can run."""
    roots, option = session.train_roots(), session.config.train_root_option
    if str(source or "").strip():
        contained_path(source, roots, "source directory", option)
    if str(destination or "").strip():
        contained_path(destination, roots, "destination directory", option)
    report = run_preprocess(source or "", destination or "", settings)
    return f"Preprocessing finished: {report.summary(destination)}"


def preprocess_form(session: UiSession, form: Mapping[str, Any]) -> str:
    """The Preprocess images form, by field name (``PreprocessSettings``' fields, ``source``, ``destination``)."""
    from sdconcepts.ui.train_preprocess import PreprocessSettings

    settings = PreprocessSettings(width=whole_number(form["width"], "width"),
                                  height=whole_number(form["height"], "height"), caption_action=form["caption_action"], keep_size=bool(form["keep_size"]),
                                  flip=bool(form["flip"]), split=bool(form["split"]),
                                  split_threshold=float(form["split_threshold"]),
                                  overlap_ratio=float(form["overlap_ratio"]),
                                  caption_from_name=bool(form["caption_from_name"]))
    return preprocess(session, form["source"] or "", form["destination"] or "", settings)


# -- settings ----------------------------------------------------------------------------------------------------


def training_config(kind: str, name: str, values: dict[str, Any], *, roots: Sequence[Path] | None = None,
                    root_option: str = "--train-root") -> tuple[TrainingConfig | None, dict[str, str]]:
    """The run's config from the form's values, or the message for the field that cannot work (nothing starts).

    ``roots``: the folders the dataset, log directory and a template file must lie in (``UiSession.train_roots``);
    None checks nothing (the command line may use any path). ``root_option`` is named in the refusal.
    """
    errors: dict[str, str] = {}
    if not str(name or "").strip():
        errors["name"] = f"choose the {kind} to train (create one first)"
    if roots is not None:
        for key, label in (("dataset", "dataset directory"), ("log_directory", "log directory"),
                           ("template", "template")):
            value = str(values.get(key) or "")
            if not value or (key == "template" and value in available_templates()):
                continue
            try:
                contained_path(value, roots, label, root_option)
            except UiError as exc:
                errors[key] = str(exc)
        if errors.keys() - {"name"}:
            return None, errors
    config_class = EmbeddingTrainingConfig if kind == "embedding" else HypernetworkTrainingConfig
    ints = ("batch_size", "gradient_accumulation", "width", "height", "max_steps", "preview_every", "save_every",
            "preview_steps", "preview_seed", "validate_every", "early_stop_window")
    fields: dict[str, Any] = {}
    for key, value in values.items():
        try:
            fields[key] = whole_number(value, key.replace("_", " ")) if key in ints and value is not None else value
        except UiError as exc:
            errors[key] = str(exc)
    if errors.keys() - {"name"}:
        return None, errors
    if kind != "embedding":
        fields.pop("save_image_with_embedding", None)
    try:
        config = config_class(**fields)
        config.validated()
    except ConfigError as exc:
        errors.setdefault(error_field(str(exc)), str(exc))
        return None, errors
    return (None if errors else config), errors


def start_training(session: UiSession, jobs: TrainingJobs, kind: str, model_label: str, name: str,
                   config: TrainingConfig) -> TrainingJob:
    """Start training ``name`` on the chosen model (loaded in the job's thread); UiError while another job runs."""
    from sdconcepts.training.run import train_embedding, train_hypernetwork

    def run(stop: threading.Event) -> Iterator[TrainingEvent]:
        session.use_cpu_threads()
        model = session.model(model_label)
        if kind == "embedding":
            assert isinstance(config, EmbeddingTrainingConfig)
            events = train_embedding(model, name, config, embeddings_dir=embeddings_folder(session), stop=stop,
                                     preparing=True)
        else:
            assert isinstance(config, HypernetworkTrainingConfig)
            events = train_hypernetwork(model, name, config, hypernetworks_dir=hypernetworks_folder(session), stop=stop,
                                        preparing=True)
        return _announcing_saves(session, kind, events)

    return jobs.start(kind, name, config.max_steps, run, lock_whole_run=kind == "hypernetwork")


def _announcing_saves(session: UiSession, kind: str, events: Iterator[TrainingEvent]) -> Iterator[TrainingEvent]:
    # Inside a host, each save makes the host reload its files: the trained file works in its txt2img at once.
    for event in events:
        if event.saved:
            note = session.files_changed(kind)
            if note:  # shown under the status (train_jobs.train_view): the host could not be told
                event = replace(event, extra={**event.extra, HOST_NOTE: note})
        yield event


# -- the Train form ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainForm:
    """The Train form's settings as the page sends them, one value per field (validated by ``training_config``).

    The field order is the order the tab sends them in; the ``preview_*`` fields are txt2img's components, used
    only when ``read_txt2img`` is ticked.
    """

    embedding_learn_rate: str | None
    hypernetwork_learn_rate: str | None
    clip_grad_mode: str
    clip_grad_value: str | None
    batch_size: float | None
    gradient_accumulation: float | None
    dataset: str | None
    log_directory: str | None
    template: str | None
    width: float
    height: float
    keep_size: bool
    max_steps: float | None
    preview_every: float | None
    save_every: float | None
    use_alpha_weight: bool
    save_image_with_embedding: bool
    read_txt2img: bool
    shuffle_tags: bool
    tag_dropout: float | None
    latent_sampling: str
    preview_prompt: str | None
    preview_negative_prompt: str | None
    preview_steps: float | None
    preview_sampler: str | None
    preview_cfg_scale: float
    preview_seed: float | None
    # Beyond A1111 (docs/training.md): the validation loss, its held-out share, the early stop, the compiled UNet.
    validate_every: float | None = -1
    validation_share: float | None = 0.0
    early_stop: bool = False
    early_stop_window: float | None = EARLY_STOP_WINDOW
    compile_unet: bool = False
    # A1111 1.9+ keeps txt2img's schedule type apart from the sampler (inside a host: #txt2img_scheduler).
    preview_schedule: str | None = None

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> TrainForm:
        """The form from its values by field name (every field present; those beyond A1111's may be left out)."""
        return cls(**{key: values[key] for key in cls.keys() if key in values})

    def config_values(self, kind: str) -> dict[str, Any]:
        """The values ``training_config`` takes for a run of ``kind``: its own learning rate, the previews' settings
        from txt2img when asked."""
        values: dict[str, Any] = {
            "dataset": self.dataset or "",
            "learn_rate": self.embedding_learn_rate if kind == "embedding" else self.hypernetwork_learn_rate,
            "batch_size": self.batch_size, "gradient_accumulation": self.gradient_accumulation,
            "log_directory": self.log_directory or "", "template": self.template or "", "width": self.width,
            "height": self.height, "keep_size": bool(self.keep_size), "max_steps": self.max_steps,
            "preview_every": self.preview_every, "save_every": self.save_every,
            "use_alpha_weight": bool(self.use_alpha_weight), "shuffle_tags": bool(self.shuffle_tags),
            "tag_dropout": float(self.tag_dropout or 0), "latent_sampling": self.latent_sampling,
            "clip_grad_mode": self.clip_grad_mode, "clip_grad_value": self.clip_grad_value or "",
            "save_image_with_embedding": bool(self.save_image_with_embedding),
            "validate_every": -1 if self.validate_every is None else self.validate_every,
            "validation_share": float(self.validation_share or 0), "early_stop": bool(self.early_stop),
            "early_stop_window": EARLY_STOP_WINDOW if self.early_stop_window is None else self.early_stop_window,
            "compile_unet": bool(self.compile_unet),
        }
        if self.read_txt2img:
            # Inside a host a txt2img field the host does not have (a fork renamed it) stays at the run's default.
            read = {"preview_prompt": self.preview_prompt, "preview_negative_prompt": self.preview_negative_prompt,
                    "preview_steps": self.preview_steps, "preview_sampler": self.preview_sampler_used()[0],
                    "preview_cfg_scale": self.preview_cfg_scale, "preview_seed": self.preview_seed}
            values.update({key: value for key, value in read.items() if value is not None})
        return values

    def preview_sampler_used(self) -> tuple[str | None, str]:
        """The sampler the previews use when txt2img's are read, and a note when txt2img's is not one of ours (a
        host's txt2img offers samplers this engine lacks: the previews then use Euler a, and say so)."""
        if not self.read_txt2img or not self.preview_sampler:
            return None, ""
        sampler = engine_sampler(self.preview_sampler, self.preview_schedule)
        if sampler is not None:
            return sampler, ""
        return FALLBACK_PREVIEW_SAMPLER, (f"Previews use {FALLBACK_PREVIEW_SAMPLER}: txt2img's sampler "
                                          f"{self.preview_sampler!r} is not one this engine has.")


FALLBACK_PREVIEW_SAMPLER = "Euler a"


@dataclass(frozen=True)
class TrainStart:
    """What a Train click did: the job it started (and a note about it, if any), or why nothing started (a message,
    the fields' problems)."""

    job: TrainingJob | None
    message: str = ""
    problems: dict[str, str] = field(default_factory=dict)


def start_from_form(session: UiSession, jobs: TrainingJobs, kind: str, model_label: str, name: str,
                    form: TrainForm) -> TrainStart:
    """Validate the form for a run of ``kind`` on ``name`` and start it unless a field or another job prevents it."""
    config, problems = training_config(kind, name, form.config_values(kind), roots=session.train_roots(),
                                       root_option=session.config.train_root_option)
    if config is None:
        return TrainStart(None, "Fix the marked settings; nothing was started.", problems)
    try:
        job = start_training(session, jobs, kind, model_label, name, config)
    except UiError as exc:
        return TrainStart(None, str(exc), problems)
    return TrainStart(job, form.preview_sampler_used()[1], problems)
