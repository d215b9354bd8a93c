"""The Train tab's logic without gradio: create forms, settings validation per field, and the one training job.

``TrainingJobs`` runs at most one job in a background thread and keeps its event history, so a page that loads
later (a reload) shows the running job again; ``train_view`` turns a job into what the tab shows. Generation and
training share the loaded model through ``UiSession.generate_lock``: an embedding run takes it for each step (txt2img
slips in between steps), a hypernetwork run for the whole run (its modules stay attached to the UNet meanwhile, so
txt2img waits until the run ends).
"""

from __future__ import annotations

import html
import math
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdconcepts.embeddings.files import EMBEDDING_SUFFIXES
from sdconcepts.embeddings.folder_scan import is_preview_image
from sdconcepts.hypernetworks.hypernetwork import HypernetworkError
from sdconcepts.training.backend import TrainingModel
from sdconcepts.training.config import (
    ConfigError,
    EmbeddingTrainingConfig,
    HypernetworkTrainingConfig,
    TrainingConfig,
)
from sdconcepts.training.create import MAX_VECTORS, CreateError, create_embedding_file, create_hypernetwork_file
from sdconcepts.training.loop import TrainingEvent
from sdconcepts.training.names import InvalidNameError, target_path
from sdconcepts.training.outputs import draw_loss_plot
from sdconcepts.training.session import train_embedding, train_hypernetwork
from sdconcepts.training.templates import available_templates
from sdconcepts.ui.session import UiError, UiSession, contained_path
from sdconcepts.ui.train_preprocess import run_preprocess

__all__ = [
    "ERROR_FIELDS",
    "TrainView",
    "TrainingJob",
    "TrainingJobs",
    "create_embedding",
    "create_hypernetwork",
    "embedding_names",
    "hypernetwork_names",
    "follow",
    "form_defaults",
    "preprocess",
    "start_training",
    "training_config",
    "train_view",
]

# Where a settings message is shown: the key of the field (group) it is about.
ERROR_FIELDS = ("name", "learn_rate", "clip_grad_value", "batch_size", "gradient_accumulation", "dataset",
                "log_directory", "template", "size", "max_steps", "intervals", "tag_dropout")
_PREFIXES = (
    ("learn rate", "learn_rate"), ("clip value", "clip_grad_value"), ("batch size", "batch_size"),
    ("gradient accumulation", "gradient_accumulation"), ("max steps", "max_steps"),
    ("save, preview and csv", "intervals"), ("a log directory", "log_directory"), ("width", "size"),
    ("height", "size"), ("tag dropout", "tag_dropout"), ("dataset", "dataset"), ("template", "template"),
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


def form_defaults(session: UiSession, model_label: str | None = None) -> FormDefaults:
    """The chosen model's widths and size (the toy model: 48/32/64 at 32 px), read from its files without loading it
    when they say; A1111's 768/320/640/1280 at 512 px when only loading would tell."""
    try:
        shape = session.model_shape(model_label)
    except UiError:
        shape = None
    if shape is None:
        return FormDefaults(list(_A1111_CHOICES), list(_A1111_TICKED), 512, 8)
    widths = [str(w) for w in shape.widths]
    # The slider steps by 8 (A1111's step) unless the model's own multiple is smaller; the run checks the multiple.
    return FormDefaults(widths, list(widths), int(shape.size), min(8, int(shape.multiple)))


# -- create ------------------------------------------------------------------------------------------------------


def create_embedding(session: UiSession, model_label: str, name: str, init_text: str, vectors: float,
                     overwrite: bool) -> Path:
    """A1111's Create embedding on the chosen model's token embeddings; raises UiError naming the problem."""
    count = int(vectors or 0)
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
        return create_embedding_file(folder, name, rows, vectors=count, width=model.context_width,
                                     overwrite=bool(overwrite), sd_checkpoint=getattr(model.model, "short_hash", None),
                                     sd_checkpoint_name=getattr(model.model, "name", None))
    except (CreateError, InvalidNameError) as exc:
        raise UiError(f"name: {exc}") from exc


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
        return create_hypernetwork_file(
            hypernetworks_folder(session), name, widths=widths,
            layer_structure=_numbers(layer_structure, "layer structure", float), activation=activation,
            weight_init=weight_init, layer_norm=bool(layer_norm), use_dropout=bool(use_dropout),
            dropout_structure=_numbers(dropout_structure, "dropout structure", float), overwrite=bool(overwrite),
        )
    except (CreateError, InvalidNameError) as exc:
        raise UiError(f"name: {exc}") from exc
    except HypernetworkError as exc:
        raise UiError(f"layer structure: {exc}") from exc


# -- preprocess --------------------------------------------------------------------------------------------------


def preprocess(session: UiSession, source: str, destination: str, settings: Any) -> str:
    """The Preprocess images button: both folders must lie in the server's folders; returns the one-line summary
    (written, read, skipped with reasons). Raises UiError when nothing can run."""
    roots = session.train_roots()
    if str(source or "").strip():
        contained_path(source, roots, "source directory")
    if str(destination or "").strip():
        contained_path(destination, roots, "destination directory")
    report = run_preprocess(source or "", destination or "", settings)
    return f"Preprocessing finished: {report.summary(destination)}"


# -- settings ----------------------------------------------------------------------------------------------------


def training_config(kind: str, name: str, values: dict[str, Any], *, roots: Sequence[Path] | None = None
                    ) -> tuple[TrainingConfig | None, dict[str, str]]:
    """The run's config from the form's values, or the message for the field that cannot work (nothing starts).

    ``roots``: the folders the dataset, log directory and a template file must lie in (``UiSession.train_roots``);
    None checks nothing (the command line may use any path).
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
                contained_path(value, roots, label)
            except UiError as exc:
                errors[key] = str(exc)
        if errors.keys() - {"name"}:
            return None, errors
    config_class = EmbeddingTrainingConfig if kind == "embedding" else HypernetworkTrainingConfig
    ints = ("batch_size", "gradient_accumulation", "width", "height", "max_steps", "preview_every", "save_every",
            "preview_steps", "preview_seed")
    fields: dict[str, Any] = {k: (int(v) if k in ints and v is not None else v) for k, v in values.items()}
    if kind != "embedding":
        fields.pop("save_image_with_embedding", None)
    try:
        config = config_class(**fields)
        config.validated()
    except ConfigError as exc:
        errors.setdefault(error_field(str(exc)), str(exc))
        return None, errors
    return (None if errors else config), errors


# -- the job -----------------------------------------------------------------------------------------------------


@dataclass
class TrainingJob:
    """One run: its events as they came (with arrival times), its end message or error, and its stop switch."""

    kind: str
    name: str
    max_steps: int
    stop: threading.Event = field(default_factory=threading.Event)
    events: list[TrainingEvent] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    error: str | None = None
    done: bool = False
    started: float = field(default_factory=time.monotonic)
    thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return not self.done

    def steps(self) -> list[TrainingEvent]:
        return [e for e in self.events if e.kind == "step"]

    def end(self) -> TrainingEvent | None:
        return next((e for e in reversed(self.events) if e.kind != "step"), None)

    def wait(self, timeout: float | None = None) -> bool:
        if self.thread is not None:
            self.thread.join(timeout)
        return self.done


Run = Callable[[threading.Event], Iterator[TrainingEvent]]


class TrainingJobs:
    """At most one training job at a time, run in a background thread; the last job stays for pages that load later."""

    def __init__(self, model_lock: threading.Lock) -> None:
        self.model_lock = model_lock
        self._lock = threading.Lock()
        self.current: TrainingJob | None = None

    def start(self, kind: str, name: str, max_steps: int, run: Run, *, lock_whole_run: bool = False) -> TrainingJob:
        """Start ``run(stop)`` in a thread; refuse with a UiError while another job runs."""
        with self._lock:
            if self.current is not None and self.current.running:
                job = self.current
                raise UiError(f"a {job.kind} ({job.name}) is training already; interrupt it or wait for it to end")
            job = TrainingJob(kind, name, max_steps)
            job.thread = threading.Thread(target=self._work, args=(job, run, lock_whole_run),
                                          name=f"sdconcepts-train-{name}", daemon=True)
            self.current = job
        job.thread.start()
        return job

    def _work(self, job: TrainingJob, run: Run, lock_whole_run: bool) -> None:
        try:
            if lock_whole_run:
                with self.model_lock:
                    self._drive(job, run, step_lock=None)
            else:
                self._drive(job, run, step_lock=self.model_lock)
        except Exception as exc:  # noqa: BLE001 - whatever stops the run is shown to the user, not lost in a thread
            job.error = str(exc) or type(exc).__name__
        finally:
            job.done = True

    @staticmethod
    def _drive(job: TrainingJob, run: Run, step_lock: threading.Lock | None) -> None:
        if step_lock is not None:
            with step_lock:
                events = run(job.stop)
        else:
            events = run(job.stop)
        while True:
            if step_lock is not None:
                with step_lock:
                    event = next(events, None)
            else:
                event = next(events, None)
            if event is None:
                return
            job.times.append(time.monotonic())
            job.events.append(event)

    def interrupt(self) -> str:
        job = self.current
        if job is None or not job.running:
            return "Nothing is training."
        job.stop.set()
        return f"Interrupting {job.name}: it stops after the current step and saves."


# -- what the tab shows ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainView:
    """The Train tab's live outputs: status line, loss plot (a PNG path), previews and saved files."""

    status_html: str
    plot: str | None
    previews: list[str]
    saves: str
    running: bool
    version: tuple[int, bool]


SHOWN = 12  # the newest previews and saves the tab lists (all of them stay in the log folder)


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


def _rate(started: float, arrivals: list[float], events: list[TrainingEvent]) -> float | None:
    times = [t for t, e in zip(arrivals, events, strict=False) if e.kind == "step"]
    recent = times[-11:]
    if len(recent) >= 2 and recent[-1] > recent[0]:
        return (len(recent) - 1) / (recent[-1] - recent[0])
    if times and times[0] > started:
        return 1.0 / (times[0] - started)
    return None


_plot_dir: Path | None = None


def _plot(job: TrainingJob, steps: list[TrainingEvent]) -> str | None:
    global _plot_dir
    if not steps:
        return None
    if _plot_dir is None:
        _plot_dir = Path(tempfile.mkdtemp(prefix="sdconcepts-loss-"))
    # A new name per step: browsers and gradio's file cache key on the path.
    path = _plot_dir / f"{id(job)}-{steps[-1].step}.png"
    if not path.is_file():
        draw_loss_plot([(e.step, e.loss) for e in steps], path, title=f"{job.name} loss")
    return str(path)


def train_view(job: TrainingJob | None) -> TrainView:
    if job is None:
        return TrainView('<div class="sdconcepts-train-status">No training has run yet.</div>', None, [], "", False,
                         (0, False))
    # One consistent snapshot: the thread appends events and then flips ``done`` while we read.
    running = job.running
    events = list(job.events)
    times = list(job.times)[: len(events)]
    steps = [e for e in events if e.kind == "step"]
    end = next((e for e in reversed(events) if e.kind != "step"), None)
    error = job.error
    parts: list[str] = []
    # The thread appends the end event (or sets the error) and flips ``done`` a moment later: a snapshot between the
    # two shows the end already; ``running`` stays as read, so ``follow`` still waits for ``done`` and yields again.
    ended = not running or end is not None or error is not None
    if not ended:
        state = "Training"
    elif error or (end and end.kind == "nan"):
        state = "Stopped"
    else:
        state = "Interrupted" if end and end.kind == "interrupted" else "Done"
    parts.append(f"<b>{state}</b> {html.escape(job.kind)} <b>{html.escape(job.name)}</b>")
    if steps:
        last = steps[-1]
        rate = _rate(job.started, times, events)
        parts.append(f"step {last.step}/{job.max_steps}")
        parts.append(f"[Epoch {last.epoch}: {last.epoch_step + 1}]")
        parts.append(f"loss: {last.loss:.7f}")
        parts.append(f"lr: {last.lr:g}")
        parts.append(f"{rate:.2f} it/s" if rate else "- it/s")
        parts.append(f"ETA {_duration(last.eta_s)}")
    elif not ended:
        parts.append("loading the model and the dataset…")
    if job.stop.is_set() and not ended:
        parts.append("interrupting…")
    status = '<div class="sdconcepts-train-status">' + " · ".join(parts)
    message = error or (end.message if end else "")
    if message:
        css = "sdconcepts-train-error" if error or (end and end.kind == "nan") else "sdconcepts-train-end"
        status += f'<div class="{css}">{html.escape(message)}</div>'
    status += "</div>"
    previews = [e.preview for e in steps if e.preview][-SHOWN:]
    saves = [f"step {e.step}: {e.saved}" for e in events if e.saved][-SHOWN:]
    return TrainView(status, _plot(job, steps), previews, "\n".join(saves), running, (len(events), running))


def start_training(session: UiSession, jobs: TrainingJobs, kind: str, model_label: str, name: str,
                   config: TrainingConfig) -> TrainingJob:
    """Start training ``name`` on the chosen model (loaded in the job's thread); UiError while another job runs."""
    def run(stop: threading.Event) -> Iterator[TrainingEvent]:
        model = session.model(model_label)
        if kind == "embedding":
            assert isinstance(config, EmbeddingTrainingConfig)
            events = train_embedding(model, name, config, embeddings_dir=embeddings_folder(session), stop=stop)
        else:
            assert isinstance(config, HypernetworkTrainingConfig)
            events = train_hypernetwork(model, name, config, hypernetworks_dir=hypernetworks_folder(session), stop=stop)
        return _announcing_saves(session, kind, events)

    return jobs.start(kind, name, config.max_steps, run, lock_whole_run=kind == "hypernetwork")


def _announcing_saves(session: UiSession, kind: str, events: Iterator[TrainingEvent]) -> Iterator[TrainingEvent]:
    # Inside a host, each save makes the host reload its files: the trained file works in its txt2img at once.
    for event in events:
        if event.saved:
            session.files_changed(kind)
        yield event


def follow(jobs: TrainingJobs, poll: float = 0.25, job: TrainingJob | None = None) -> Iterator[TrainView]:
    """Views of the job (the current one when not given) each time it changes, until it ends (then one last view)."""
    job = job or jobs.current
    view = train_view(job)
    yield view
    while job is not None and view.running:
        time.sleep(poll)
        latest = train_view(job)
        if latest.version != view.version:
            view = latest
            yield view
