"""A training run from files to files: load the embedding or hypernetwork, build the dataset, run the loop, and
consume its events with the side effects (saves, previews, loss log and plot, ETA).

``train_embedding`` and ``train_hypernetwork`` are generators of ``TrainingEvent``: the CLI prints them with a
progress bar, a UI streams them, tests collect them. Setting ``stop`` ends the run with a final save.

Files: the trained file itself is rewritten (atomically, with its optimizer state) at every save and at the end, so a
killed run loses at most ``save_every`` steps and rerunning with a larger ``max_steps`` resumes from the step stored
in the file. A1111 writes the main file only at the end; its intermediate copies in the log folder are kept as well.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdconcepts.atomic_files import remove_stale_temporaries, settle_sidecar
from sdconcepts.embeddings.files import EMBEDDING_SUFFIXES, save_embedding
from sdconcepts.file_names import fit_file_name
from sdconcepts.images import save_png
from sdconcepts.limits import MAX_IMAGE_SIDE, memory_problem, training_bytes
from sdconcepts.training.config import EmbeddingTrainingConfig, HypernetworkTrainingConfig, TrainingConfig
from sdconcepts.training.dataset import ImageRecord, TrainingDataset, read_images
from sdconcepts.training.distributed import Distributed
from sdconcepts.training.lock import TrainingBusyError, TrainingLock
from sdconcepts.training.loop import GradientClip, TrainingEvent, training_loop
from sdconcepts.training.objective import diffusion_loss
from sdconcepts.training.outputs import CSV_NAMES, EtaClock, LossLog, run_folder, write_settings
from sdconcepts.training.schedule import LearnRateSchedule
from sdconcepts.training.templates import read_template
from sdconcepts.training.trainables import (
    EmbeddingTrainable,
    Trainable,
    TrainingError,
    open_embedding,
    open_hypernetwork,
    seeded,
)
from sdconcepts.training.training_model import CompileClock
from sdconcepts.training.validation import Validation, split_held_out, validation_for_run

__all__ = ["find_embedding_file", "train_embedding", "train_hypernetwork"]

log = logging.getLogger(__name__)
# While latents are cached (a minute for 10,000 pictures) a "preparing" event says how far it got, this often.
PROGRESS_INTERVAL_S = 1.0


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------


def find_embedding_file(name_or_path: str | Path, folder: str | Path | None) -> Path:
    """A path as given, or ``folder/<name>`` with any embedding extension (``.pt`` first)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if folder is not None:
        for suffix in EMBEDDING_SUFFIXES:
            candidate = Path(folder) / f"{name_or_path}{suffix}"
            if candidate.is_file():
                return candidate
    raise TrainingError(f"no embedding {str(name_or_path)!r} in {folder} (create it first: create-embedding)")


def _find_hypernetwork_file(name_or_path: str | Path, folder: str | Path | None) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    if folder is not None and (Path(folder) / f"{name_or_path}.pt").is_file():
        return Path(folder) / f"{name_or_path}.pt"
    raise TrainingError(f"no hypernetwork {str(name_or_path)!r} in {folder} (create it first: create-hypernetwork)")


def train_embedding(
    model: Any,
    embedding: str | Path,
    config: EmbeddingTrainingConfig,
    *,
    embeddings_dir: str | Path | None = "embeddings",
    stop: threading.Event | None = None,
    distributed: Distributed | None = None,
    preparing: bool = False,
) -> Iterator[TrainingEvent]:
    """Train a textual inversion embedding (a name in ``embeddings_dir`` or a path) on a LoadedModel.

    ``preparing``: also yield "preparing" events before the first step (latent caching's progress)."""
    config.validated(int(model.size_multiple))
    path = find_embedding_file(embedding, embeddings_dir)
    yield from _train(path, "embedding", open_embedding, model, config, stop, distributed, preparing)


def train_hypernetwork(
    model: Any,
    hypernetwork: str | Path,
    config: HypernetworkTrainingConfig,
    *,
    hypernetworks_dir: str | Path | None = "models/hypernetworks",
    stop: threading.Event | None = None,
    distributed: Distributed | None = None,
    preparing: bool = False,
) -> Iterator[TrainingEvent]:
    """Train an A1111 hypernetwork (a name in ``hypernetworks_dir`` or a path) on a LoadedModel (``preparing``: as
    ``train_embedding``)."""
    config.validated(int(model.size_multiple))
    path = _find_hypernetwork_file(hypernetwork, hypernetworks_dir)
    yield from _train(path, "hypernetwork", open_hypernetwork, model, config, stop, distributed, preparing)


def _train(
    path: Path,
    kind: str,
    open_job: Callable[[Path, Any, Any], Trainable],
    model: Any,
    config: TrainingConfig,
    stop: threading.Event | None,
    distributed: Distributed | None,
    preparing: bool = False,
) -> Iterator[TrainingEvent]:
    """The path both kinds share: lock the file, open what trains in it, run, and undo what the job did."""
    with _locked(path, kind, distributed):
        job = open_job(path, model, config)
        try:
            for event in _run(job, job.model, config, stop or threading.Event(), distributed or Distributed()):
                if preparing or event.kind != "preparing":
                    yield event
        finally:
            job.close()


@contextlib.contextmanager
def _locked(path: Path, kind: str, distributed: Distributed | None) -> Iterator[None]:
    """Hold the file's training lock (one run per file, across processes), taken before the file is read.

    The ranks of one distributed run share the file, and only the main rank writes it, so only that one locks.
    """
    if distributed is not None and not distributed.is_main:
        yield
        return
    lock = TrainingLock(path, f"{kind} {path.name}")
    try:
        lock.acquire()
    except TrainingBusyError as exc:
        raise TrainingError(str(exc)) from None
    try:
        # Finish what a killed run left: a pending .optim to move into place, temporaries to delete.
        settle_sidecar(path)
        remove_stale_temporaries(path.parent)
        yield
    finally:
        lock.release()


def _check_memory(model: Any, config: TrainingConfig) -> None:
    """Refuse a run whose dataset and first micro-batch cannot fit, before any image is read (a lower bound: see
    ``sdconcepts.limits.training_bytes``)."""
    folder = Path(config.dataset)
    images = sum(1 for p in folder.iterdir() if p.is_file() and p.suffix.lower() != ".txt") if folder.is_dir() else 0
    on_device, on_host = training_bytes(
        batch=min(config.batch_size, max(images, 1)),
        images=images,
        width=config.width,
        height=config.height,
        latent_scale=int(model.vae_scale_factor),
        unet_channels=int(model.unet.config.block_out_channels[0]),
        vae_channels=int(model.vae.config.block_out_channels[0]),
        dtype_bytes=torch.finfo(model.dtype).bits // 8,
    )
    what = f"training on {images} images of {config.width}x{config.height} in batches of {config.batch_size}"
    problem = memory_problem(on_device, model.device, what, host_bytes=on_host)
    if problem:
        raise TrainingError(problem)


# ---------------------------------------------------------------------------------------------------------------
# The run: the loop's events, and what consumes them (loss log, saves with their non-finite check, previews)
# ---------------------------------------------------------------------------------------------------------------


def _run(
    job: Trainable, model: Any, config: TrainingConfig, stop: threading.Event, distributed: Distributed
) -> Iterator[TrainingEvent]:
    dataset, held_out = _dataset(job, model, config)
    # The latents are encoded here (the datasets are lazy): progress is said, and an interrupt stops between images.
    parts = [dataset, *([held_out] if held_out is not None else [])]
    total = sum(len(part.records) for part in parts)
    said, before = -math.inf, 0
    for part in parts:
        for done_in_part, _ in part.encoding():
            done = before + done_in_part
            if stop.is_set():
                yield TrainingEvent(job.step, math.nan, 0.0, kind="interrupted",
                                    message=f"Training interrupted while caching latents ({done} of {total} images); "
                                    f"nothing was trained: {job.path} is unchanged (step {job.step}).")
                return
            if time.monotonic() - said >= PROGRESS_INTERVAL_S or done == total:
                said = time.monotonic()
                yield TrainingEvent(job.step, math.nan, 0.0, kind="preparing",
                                    message=f"caching latents: {done} of {total} images")
        before += len(part.records)
    main = distributed.is_main
    folder = run_folder(config.log_directory, job.name)
    copies = folder / ("embeddings" if job.kind == "embedding" else "hypernetworks")
    if main:
        _prepare_folder(folder, copies, job, model, config, len(dataset))
    start_step = job.step
    schedule = LearnRateSchedule(config.learn_rate, config.max_steps, start_step)
    clip = None
    if config.clip_grad_mode != "disabled":
        clip = GradientClip(config.clip_grad_mode, LearnRateSchedule(config.clip_grad_value, config.max_steps, start_step))
    losses = _LossRecord(job, config, folder, dataset.steps_per_epoch, main)
    eta = EtaClock(start_step, config.max_steps)
    batches = _Batches(dataset, model, config.seed, distributed)
    saves = _Saves(job, model, config, copies, losses, batches, main)
    previews = _Previews(job, model, config, folder, main)
    best = copies / fit_file_name(copies, job.name, f"-best{_suffix(job)}", reserve=len(".optim"))
    validation = validation_for_run(job, config, dataset, held_out, best, main)
    if validation is not None and validation.start is not None:
        losses.log.add_validation(start_step, validation.start[0])
    history = tuple(losses.log.history())
    compiling = CompileClock(getattr(job.model, "compiled", None))
    sync: Callable[[Sequence[Tensor]], None] | None = (
        distributed.average_gradients if distributed.world_size > 1 else None
    )
    events = training_loop(
        job.parameters,
        job.optimizer,
        batches.loss,
        start_step=start_step,
        accumulation=dataset.gradient_accumulation,
        learn_rate=schedule,
        stop=stop,
        clip=clip,
        sync_gradients=sync,
    )
    for event in events:
        if event.kind == "step":
            job.step = event.step
            val_loss, best_saved = validation.on_step(event.step) if validation is not None else (None, None)
            epoch, epoch_step = losses.add(event, val_loss)
            saved = saves.on_step(event.step)
            preview = previews.on_step(event.step, batches.texts)
            note = compiling.on_step()
            yield dataclasses.replace(
                event,
                epoch=epoch,
                epoch_step=epoch_step,
                texts=tuple(batches.texts),
                saved=saved,
                preview=preview,
                eta_s=eta.eta(event.step),
                val_loss=val_loss,
                best_saved=best_saved,
                history=history,
                extra={"compile": note} if note else {},
            )
            history = ()
            if validation is not None and validation.stop_reason is not None:
                events.close()
                end = saves.on_end(TrainingEvent(event.step, math.nan, event.lr, kind="early_stop"))
                yield _with_best(end, validation, f" Early stop: {validation.stop_reason}.")
                return
            continue
        end = saves.on_nan(event) if event.kind == "nan" else saves.on_end(event)
        yield _with_best(end, validation)
        return


def _with_best(end: TrainingEvent, validation: Validation | None, reason: str = "") -> TrainingEvent:
    """The end message, with why the run stopped early and which step was best."""
    best = validation.summary() if validation is not None else ""
    if not (reason or best):
        return end
    return dataclasses.replace(end, message=f"{end.message}.{reason}{best}")


def _dataset(job: Trainable, model: Any, config: TrainingConfig) -> tuple[TrainingDataset, TrainingDataset | None]:
    """The run's dataset: the template read, the memory checked, then the images read and encoded; and the pictures
    held out for the validation loss, when ``validation_share`` asks for some (else None)."""
    lines = read_template(config.template, require_name=job.kind == "embedding")
    _check_memory(model.model, config)
    records = read_images(
        config.dataset,
        width=config.width,
        height=config.height,
        keep_size=config.keep_size,
        max_side=MAX_IMAGE_SIDE if config.size_limits else None,
        use_alpha=config.use_alpha_weight,
        filename_regex=config.filename_regex,
        join_string=config.filename_join,
    )
    try:
        records, held = split_held_out(records, config.validation_share if config.validate_every else 0.0, config.seed)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    datasets = [_encoded(part, job, model, config, lines) if part else None for part in (records, held)]
    assert datasets[0] is not None
    return datasets[0], datasets[1]


def _encoded(records: list[ImageRecord], job: Trainable, model: Any, config: TrainingConfig,
             lines: list[str]) -> TrainingDataset:
    return TrainingDataset(
        records,
        model.encode_images,
        name=job.prompt_word,
        template_lines=lines,
        batch_size=config.batch_size,
        gradient_accumulation=config.gradient_accumulation,
        latent_sampling=config.latent_sampling,
        shuffle_tags=config.shuffle_tags,
        tag_dropout=config.tag_dropout,
        use_alpha=config.use_alpha_weight,
        seed=config.seed,
        lazy=True,  # encoded by _run, which reports progress and can stop between images
    )


def _prepare_folder(folder: Path, copies: Path, job: Trainable, model: Any, config: TrainingConfig, images: int) -> None:
    """The main rank's log folder: temporaries a killed run left are deleted, the settings written when asked."""
    for place in (folder, copies, folder / "images", folder / "image_embeddings"):
        remove_stale_temporaries(place)
    if config.save_settings:
        write_settings(
            folder,
            {
                **config.as_dict(),
                "name": job.name,
                "initial_step": job.step,
                "num_of_dataset_images": images,
                "model_name": model.name,
                "model_hash": model.short_hash,
                "optimizer_restored": getattr(job, "restored", False),
            },
        )


class _Batches:
    """This rank's micro-batches and their loss, with noise seeded by step and batch index; ``texts`` holds the
    prompts of the latest step's first micro-batch (for previews and the step events)."""

    def __init__(self, dataset: TrainingDataset, model: Any, seed: Any, distributed: Distributed) -> None:
        self.dataset = dataset
        self.model = model
        self.seed = seed
        self.distributed = distributed
        self.per_step = dataset.gradient_accumulation * distributed.world_size
        self.texts: list[str] = []

    def loss(self, step: int, micro: int, remember: bool = True) -> Tensor:
        index = micro * self.distributed.world_size + self.distributed.rank
        batch = self.dataset.batch(step, index, self.per_step)
        if micro == 0 and remember:
            self.texts[:] = batch.texts
        generator = torch.Generator().manual_seed(seeded(self.seed, "noise", step, index))
        return diffusion_loss(self.model, batch, generator)


class _LossRecord:
    """The loss log: a CSV row per step (every ``write_csv_every`` steps, on the main rank only) and its plot."""

    def __init__(self, job: Trainable, config: TrainingConfig, folder: Path, steps_per_epoch: int, main: bool) -> None:
        self.log = LossLog(folder / CSV_NAMES[job.kind], config.write_csv_every if main else 0, resume_step=job.step)
        self.steps_per_epoch = steps_per_epoch
        self.plot_path = folder / "loss.png"
        self.title = f"{job.name} loss"

    def add(self, event: TrainingEvent, val_loss: float | None = None) -> tuple[int, int]:
        """Log a step (with its validation loss, at a check); its epoch and step within the epoch."""
        epoch, epoch_step = (event.step - 1) // self.steps_per_epoch, (event.step - 1) % self.steps_per_epoch
        self.log.add(event.step, epoch, epoch_step, event.loss, event.lr, val_loss)
        return epoch, epoch_step

    def plot(self) -> None:
        self.log.plot(self.plot_path, title=self.title)


class _Saves:
    """Checkpoint saving: every ``save_every`` steps a copy in the log folder and the file itself, and the file at the
    end, each only when the weights give a finite loss (on the main rank); ``last_good`` is the file and step that
    hold the last weights saved, for the messages of a run that ends on bad weights."""

    def __init__(self, job: Trainable, model: Any, config: TrainingConfig, copies: Path, losses: _LossRecord,
                 batches: _Batches, main: bool) -> None:
        self.job = job
        self.model = model
        self.config = config
        self.copies = copies
        self.losses = losses
        self.batches = batches
        self.main = main
        self.start_step = job.step
        self.last_good = (job.path, job.step)

    def gives_finite_loss(self) -> bool:
        """Whether the current weights are worth keeping: finite, and their own forward pass is finite.

        Finite but absurd weights (|v| = 1e30 after a huge rate) pass the first test and break everything that uses
        them, so a save needs evidence from a forward pass with exactly these weights. The loss of step N + 1 is the
        first that uses step N's weights, and it is computed after step N's save would happen; so the save computes
        that loss itself (the next step's first micro-batch, same batch and noise, no gradients: one forward pass
        per save), with the random state untouched so that saving does not change the run.
        """
        job = self.job
        if not job.finite():
            return False
        cuda = torch.device(self.model.device).type == "cuda"
        with torch.no_grad(), torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
            value = float(self.batches.loss(job.step, 0, remember=False).detach())
        if not math.isfinite(value):
            log.warning("not saving step %d: its weights give a loss of %s", job.step, value)
            return False
        return True

    def on_step(self, step: int) -> str | None:
        """The file saved at this step, if it is a save step and its weights are good."""
        job, config = self.job, self.config
        if not (self.main and config.save_every and step % config.save_every == 0 and self.gives_finite_loss()):
            return None
        copy = fit_file_name(self.copies, job.name, f"-{step}{_suffix(job)}", reserve=len(".optim"))
        job.save(self.copies / copy, file_name=f"{job.name}-{step}")
        saved = str(job.save(job.path, optimizer=config.save_optimizer_state))
        self.last_good = (job.path, step)
        self.losses.plot()
        return saved

    def on_nan(self, event: TrainingEvent) -> TrainingEvent:
        """The loop stopped on a non-finite loss: say which file keeps which step."""
        path, step = self.last_good
        message = f"{event.message}; training stopped and {path} keeps the weights of step {step}"
        return dataclasses.replace(event, message=message)

    def on_end(self, event: TrainingEvent) -> TrainingEvent:
        """The run finished or was interrupted: save the last weights unless saved already, and say where they are."""
        job, config = self.job, self.config
        saved = None
        kept = True
        # When the last step's own save wrote these very weights (save_every reached it), the file and its optimizer
        # state are current: writing them again made the host reload its files twice and listed the save twice.
        if self.main and job.step != self.start_step and self.last_good[1] != job.step:
            kept = self.gives_finite_loss()
            if kept:
                saved = str(job.save(job.path, optimizer=config.save_optimizer_state))
                self.losses.plot()
        what = {"finished": "finished", "early_stop": "stopped early"}.get(event.kind, "interrupted")
        if event.kind == "finished" and job.step == self.start_step:
            message = f"{job.path} is already trained to step {job.step}; raise max steps above it to train more"
        elif job.step == self.start_step:  # interrupted before its first step: nothing was trained or written
            message = f"Training interrupted before its first step; {job.path} is unchanged (step {job.step})"
        elif not kept:
            message = (
                f"Training {what} at {job.step} steps, but those weights give a non-finite loss; not saved, "
                f"{self.last_good[0]} keeps the weights of step {self.last_good[1]}"
            )
        else:
            message = f"Training {what} at {job.step} steps. {job.kind.capitalize()} saved to {saved or job.path}"
        return dataclasses.replace(event, saved=saved, message=message)


class _Previews:
    """A preview image (and, for an SD-1 embedding, its picture carrier) every ``preview_every`` steps, main rank."""

    def __init__(self, job: Trainable, model: Any, config: TrainingConfig, folder: Path, main: bool) -> None:
        self.job = job
        self.model = model
        self.config = config
        self.folder = folder
        self.main = main

    def on_step(self, step: int, texts: Sequence[str]) -> str | None:
        if self.main and self.config.preview_every and step % self.config.preview_every == 0:
            return str(_preview(self.job, self.model, self.config, self.folder, texts))
        return None


def _suffix(job: Trainable) -> str:
    return job.path.suffix if job.kind == "embedding" and job.path.suffix.lower() != ".png" else ".pt"


def _preview(job: Trainable, model: Any, config: TrainingConfig, folder: Path, texts: Sequence[str]) -> Path:
    prompt = config.preview_prompt or (texts[0] if texts else job.prompt_word)
    image, infotext = job.preview(model, prompt, config)
    images = folder / "images"
    path = save_png(image, images / fit_file_name(images, job.name, f"-{job.step}.png"), infotext)
    # A1111's image carriers hold one tensor: an SDXL pair has none (its previews are plain images).
    if (isinstance(job, EmbeddingTrainable) and job.split is None and isinstance(config, EmbeddingTrainingConfig)
            and config.save_image_with_embedding):
        pictures = folder / "image_embeddings"
        save_embedding(
            job.embedding(f"{job.name}-{job.step}"),
            pictures / fit_file_name(pictures, job.name, f"-{job.step}.png"),
            picture=image,
        )
    return path
