"""What a training run trains: an embedding's vectors or a hypernetwork's modules, opened from their files.

``open_embedding``/``open_hypernetwork`` load the file (and its optimizer state when resuming) into a ``Trainable``
that knows its parameters, how to save itself atomically, and how to make a preview; ``training.run`` drives it.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from sdconcepts.atomic_files import commit_with_sidecar, sidecar_candidates
from sdconcepts.embeddings.embedding import Embedding, kind_mismatch
from sdconcepts.embeddings.files import EmbeddingFileError, load_embedding, save_embedding
from sdconcepts.hypernetworks.attach import attach_hypernetworks, attention_layers
from sdconcepts.hypernetworks.files import OptimizerState, load_hypernetwork, load_optimizer_state, save_hypernetwork
from sdconcepts.hypernetworks.hypernetwork import Hypernetwork
from sdconcepts.safe_load import UnsafeFileError
from sdconcepts.training.config import EmbeddingTrainingConfig, HypernetworkTrainingConfig, TrainingConfig
from sdconcepts.training.training_model import TrainingModel

log = logging.getLogger(__name__)


class TrainingError(ValueError):
    """A run that cannot start (missing file, width mismatch, ...); one sentence naming the cause."""


def seeded(*parts: object) -> int:
    return random.Random(repr(parts)).getrandbits(63)


# ---------------------------------------------------------------------------------------------------------------
# What is trained: an embedding's vectors or a hypernetwork's modules
# ---------------------------------------------------------------------------------------------------------------


class Trainable:
    kind: str
    name: str
    path: Path
    step: int
    parameters: list[Tensor]
    optimizer: torch.optim.Optimizer
    prompt_word: str
    model: Any  # the TrainingModel the job trains in
    # The validation history saved in (and restored from) the optimizer sidecar: ``training.validation``'s state.
    validation_state: dict[str, Any] | None = None

    def save(self, path: Path, *, file_name: str | None = None, optimizer: bool = True) -> Path:
        raise NotImplementedError

    def preview(self, model: Any, prompt: str, config: TrainingConfig) -> tuple[Image.Image, str]:
        raise NotImplementedError

    def evaluating(self) -> contextlib.AbstractContextManager[None]:
        """The trained modules as a user's generation runs them (no dropout), for the validation loss."""
        return contextlib.nullcontext()

    def finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.parameters)

    def close(self) -> None:
        """Undo what the job did to the model (detach hooks)."""


class EmbeddingTrainable(Trainable):
    kind = "embedding"

    def __init__(self, path: Path, embedding: Embedding, device: torch.device, restore_optimizer: bool) -> None:
        self.path = path
        self.name = embedding.name
        self.prompt_word = embedding.name
        self.step = int(embedding.step or 0)
        self.base = embedding
        # SDXL: clip_l and clip_g side by side, as the encoder places them; split again when saved.
        self.vectors = embedding.joined().clone().to(device).requires_grad_(True)
        self.split = int(embedding.vectors["clip_l"].shape[-1]) if embedding.is_sdxl else None  # type: ignore[index]
        self.parameters = [self.vectors]
        # A1111: AdamW over the vector only, weight decay 0, torch's other defaults.
        self.optimizer = torch.optim.AdamW(self.parameters, lr=0.0, weight_decay=0.0)
        self.model: Any = None  # the TrainingModel, set once it holds these vectors
        self.restored = restore_optimizer and self._restore(embedding)

    def _restore(self, embedding: Embedding) -> bool:
        # <file>.optim, or the sidecar a kill left under its pending name (atomic_files.commit_with_sidecar).
        try:
            candidates = sidecar_candidates(self.path)
        except UnsafeFileError as exc:
            log.warning("ignored optimizer state: %s", exc)
            return False
        for sidecar, data in candidates:
            if data.get("hash") != embedding.checksum():
                log.warning("%s does not belong to this embedding's vectors; starting a fresh optimizer", sidecar)
                continue
            try:
                self.optimizer.load_state_dict(data["optimizer_state_dict"])
            except (KeyError, ValueError, TypeError) as exc:
                log.warning("ignored optimizer state in %s: %s", sidecar, exc)
                continue
            validation = data.get("validation")
            self.validation_state = dict(validation) if isinstance(validation, dict) else None
            return True
        return False

    def embedding(self, name: str | None = None) -> Embedding:
        joined = self.vectors.detach()
        vectors: torch.Tensor | dict[str, torch.Tensor] = joined
        if self.split is not None:
            vectors = {"clip_l": joined[:, : self.split], "clip_g": joined[:, self.split :]}
        return Embedding(
            name=name or self.name,
            vectors=vectors,
            step=self.step,
            sd_checkpoint=self.model.short_hash,
            sd_checkpoint_name=self.model.name,
        )

    def save(self, path: Path, *, file_name: str | None = None, optimizer: bool = True) -> Path:
        embedding = self.embedding(file_name)

        def write(tmp: Path) -> None:
            save_embedding(embedding, tmp, file_format=path.suffix)

        def sidecar(_tmp: Path) -> dict[str, Any]:
            # A1111's sidecar: the legacy 4-hex checksum of the vectors links it to the file.
            data = {"hash": embedding.checksum(), "optimizer_state_dict": self.optimizer.state_dict()}
            if self.validation_state is not None:
                data["validation"] = self.validation_state
            return data

        # The file and its .optim are committed so that a kill between the two renames loses neither.
        return commit_with_sidecar(path, write, sidecar if optimizer else None)

    def preview(self, model: Any, prompt: str, config: TrainingConfig) -> tuple[Image.Image, str]:
        return model.preview(  # type: ignore[no-any-return]
            prompt=prompt,
            negative_prompt=config.preview_negative_prompt,
            steps=config.preview_steps,
            sampler=config.preview_sampler,
            cfg_scale=config.preview_cfg_scale,
            seed=config.preview_seed,
            width=config.width,
            height=config.height,
            embeddings={self.name: self.vectors},
        )


class HypernetworkTrainable(Trainable):
    kind = "hypernetwork"

    def __init__(self, path: Path, hypernetwork: Hypernetwork, model: Any, restore_optimizer: bool) -> None:
        self.path = path
        self.hypernetwork = hypernetwork
        self.name = hypernetwork.name
        self.prompt_word = hypernetwork.name
        self.step = int(hypernetwork.step or 0)
        self.model = model
        widths = {layer.width for layer in attention_layers(model.unet)}
        if not widths & set(hypernetwork.widths):
            raise TrainingError(
                f"{path}: the hypernetwork has modules for widths {list(hypernetwork.widths)} but this model's "
                f"attention layers read widths {sorted(widths)}"
            )
        hypernetwork.to(model.device)
        hypernetwork.train()  # dropout on, strength forced to 1 (A1111)
        self.parameters = [p for p in hypernetwork.parameters()]
        for parameter in self.parameters:
            parameter.requires_grad_(True)
        state = load_optimizer_state(path) if restore_optimizer else None
        optimizer_class: Any = getattr(torch.optim, state.optimizer_name, None) if state else None
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
            optimizer_class = torch.optim.AdamW
        # A1111 builds it from params and lr alone, so AdamW keeps torch's weight decay 0.01.
        self.optimizer = optimizer_class(self.parameters, lr=0.0)
        self.restored = False
        if state is not None:
            try:
                self.optimizer.load_state_dict(dict(state.state_dict))
                self.restored = True
                self.validation_state = dict(state.validation) if state.validation is not None else None
            except (KeyError, ValueError, TypeError) as exc:
                log.warning("ignored optimizer state of %s: %s", path, exc)
        self._attach = attach_hypernetworks
        self.handle = attach_hypernetworks(model.unet, [(hypernetwork, 1.0)])

    def save(self, path: Path, *, file_name: str | None = None, optimizer: bool = True) -> Path:
        hypernetwork = self.hypernetwork
        hypernetwork.step = self.step
        hypernetwork.sd_checkpoint = self.model.short_hash
        hypernetwork.sd_checkpoint_name = self.model.name
        state = (OptimizerState(type(self.optimizer).__name__, self.optimizer.state_dict(), self.validation_state)
                 if optimizer else None)
        return save_hypernetwork(hypernetwork, path, optimizer=state)

    def preview(self, model: Any, prompt: str, config: TrainingConfig) -> tuple[Image.Image, str]:
        # Generate as a user would: the live modules in eval mode, attached by the prompt's tag at strength 1.
        self.handle.remove()
        self.hypernetwork.eval()
        alias = self.name if all(c not in self.name for c in ":<>|") else "training"
        try:
            return model.preview(  # type: ignore[no-any-return]
                prompt=f"{prompt} <hypernet:{alias}:1>",
                negative_prompt=config.preview_negative_prompt,
                steps=config.preview_steps,
                sampler=config.preview_sampler,
                cfg_scale=config.preview_cfg_scale,
                seed=config.preview_seed,
                width=config.width,
                height=config.height,
                hypernetworks={alias: self.hypernetwork},
            )
        finally:
            self.hypernetwork.train()
            self.handle = self._attach(model.unet, [(self.hypernetwork, 1.0)])

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        self.hypernetwork.eval()
        try:
            yield
        finally:
            self.hypernetwork.train()

    def close(self) -> None:
        self.handle.remove()
        self.hypernetwork.eval()
        for parameter in self.parameters:
            parameter.requires_grad_(False)



def open_embedding(path: Path, model: Any, config: EmbeddingTrainingConfig) -> Trainable:
    """The embedding in ``path`` as trainable vectors, placed in a TrainingModel over ``model``."""

    try:
        loaded = load_embedding(path)
    except EmbeddingFileError as exc:
        raise TrainingError(str(exc)) from None
    mismatch = kind_mismatch(loaded, sdxl=bool(getattr(model, "is_sdxl", False)),
                             encoder_widths=getattr(model, "encoder_widths", None))
    if mismatch is not None:
        raise TrainingError(f"{path}: {mismatch}")
    if loaded.width != int(model.context_width):
        raise TrainingError(
            f"{path}: the embedding's width {loaded.width} does not fit this model's text width {model.context_width}"
        )
    job = EmbeddingTrainable(path, loaded, torch.device(model.device), config.save_optimizer_state)
    job.model = TrainingModel(model, {job.name: job.vectors}, compile_unet=config.compile_unet)
    return job


def open_hypernetwork(path: Path, model: Any, config: HypernetworkTrainingConfig) -> Trainable:
    """The hypernetwork in ``path`` with its modules attached to a TrainingModel over ``model``."""

    training_model = TrainingModel(model, compile_unet=config.compile_unet)
    return HypernetworkTrainable(path, load_hypernetwork(path), training_model, config.save_optimizer_state)


