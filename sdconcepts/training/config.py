"""Training settings with A1111's Train-tab fields and defaults (a1111-compat §4.3), validated before anything loads."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sdconcepts.limits import MAX_GRADIENT_ACCUMULATION, MAX_IMAGE_SIDE, MAX_TRAIN_BATCH_SIZE
from sdconcepts.training.dataset import LATENT_SAMPLING
from sdconcepts.training.schedule import ScheduleError, parse_schedule
from sdconcepts.training.templates import TemplateError, read_template

__all__ = [
    "CLIP_MODES", "EARLY_STOP_WINDOW", "ConfigError", "EmbeddingTrainingConfig", "HypernetworkTrainingConfig",
    "TrainingConfig",
]

CLIP_MODES = ("disabled", "value", "norm")

# Validation checks the early stop looks back over, unless a run says otherwise (CLI, Train tab, config).
EARLY_STOP_WINDOW = 5


class ConfigError(ValueError):
    """A training setting that cannot work; the message names the field."""


@dataclass(frozen=True)
class TrainingConfig:
    """Fields shared by embedding and hypernetwork training; names follow A1111's fields.

    Beyond A1111: ``seed`` makes a run repeatable (and a resumed run equal to an uninterrupted one),
    ``save_optimizer_state`` is on by default, ``write_csv_every`` defaults to every step, and previews take their
    sampling settings from the ``preview_*`` fields (an empty prompt means the first prompt of the current batch).
    """

    dataset: str = ""
    learn_rate: str = "0.005"
    batch_size: int = 1
    gradient_accumulation: int = 1
    log_directory: str = "textual_inversion"
    template: str = "style_filewords"
    width: int = 512
    height: int = 512
    keep_size: bool = False  # A1111: "Do not resize images" (varsize)
    max_steps: int = 100000
    preview_every: int = 500  # A1111: "Save an image to log directory every N steps"
    save_every: int = 500  # A1111: "Save a copy of embedding to log directory every N steps"
    use_alpha_weight: bool = False  # A1111: "Use PNG alpha channel as loss weight"
    shuffle_tags: bool = False
    tag_dropout: float = 0.0
    latent_sampling: str = "once"
    clip_grad_mode: str = "disabled"
    clip_grad_value: str = "0.1"
    filename_regex: str = ""  # A1111 setting dataset_filename_word_regex
    filename_join: str = " "  # A1111 setting dataset_filename_join_string
    write_csv_every: int = 1
    save_optimizer_state: bool = True
    save_settings: bool = True
    seed: int = 0
    preview_prompt: str = ""
    preview_negative_prompt: str = ""
    preview_steps: int = 20
    preview_sampler: str = "Euler a"
    preview_cfg_scale: float = 7.0
    preview_seed: int = -1
    # The web UI's limits on width/height, batch size and gradient accumulation (``sdconcepts.limits``); the command
    # line's --no-size-limits sets this False. The memory check at the start of a run applies either way.
    size_limits: bool = True
    # Beyond A1111 (docs/training.md, "Validation loss, best step and early stop"): every ``validate_every`` steps
    # (-1: chosen from the dataset and batch size, 0: off) the loss of fixed pictures, noise and timesteps, on the
    # training pictures or on a held-out ``validation_share`` of them; the best step is saved as <name>-best, and
    # ``early_stop`` ends the run once that loss (then on the noisier half of the schedule) has settled over the last
    # ``early_stop_window`` checks (``training.validation.settled``).
    validate_every: int = -1
    validation_share: float = 0.0
    early_stop: bool = False
    early_stop_window: int = EARLY_STOP_WINDOW
    # Run the UNet through torch.compile (falls back to eager with one line where the machine cannot compile).
    compile_unet: bool = False

    kind = "embedding"

    def validated(self, size_multiple: int = 8) -> TrainingConfig:
        """Return self, or raise ConfigError naming the first field that cannot work (A1111's validate_train_inputs
        and more: the template must place ``[name]`` for textual inversion)."""
        if not str(self.learn_rate).strip():
            raise ConfigError("learn rate is empty")
        for label, text in (("learn rate", self.learn_rate), ("clip value", self.clip_grad_value)):
            if label == "clip value" and self.clip_grad_mode == "disabled":
                continue
            try:
                parse_schedule(text, max(self.max_steps, 1))
            except ScheduleError as exc:
                raise ConfigError(f"{label}: {exc}") from None
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be a positive whole number, got {self.batch_size}")
        if self.gradient_accumulation < 1:
            raise ConfigError(f"gradient accumulation must be a positive whole number, got {self.gradient_accumulation}")
        if self.max_steps < 1:
            raise ConfigError(f"max steps must be a positive whole number, got {self.max_steps}")
        if self.save_every < 0 or self.preview_every < 0 or self.write_csv_every < 0:
            raise ConfigError("save, preview and CSV intervals must be 0 (off) or more")
        if (self.save_every or self.preview_every or self.write_csv_every) and not str(self.log_directory):
            raise ConfigError("a log directory is needed when saving copies, previews or the loss log")
        for label, value in (("width", self.width), ("height", self.height)):
            if value < 8 or value % size_multiple:
                raise ConfigError(f"{label} must be a positive multiple of {size_multiple}, got {value}")
        if self.size_limits:
            for label, value, limit in (
                ("batch size", self.batch_size, MAX_TRAIN_BATCH_SIZE),
                ("gradient accumulation", self.gradient_accumulation, MAX_GRADIENT_ACCUMULATION),
                ("width", self.width, MAX_IMAGE_SIDE),
                ("height", self.height, MAX_IMAGE_SIDE),
            ):
                if value > limit:
                    raise ConfigError(f"{label} must be at most {limit}, got {value} (the web UI's limit; "
                                      "--no-size-limits lifts it on the command line)")
        self._validate_validation()
        if not 0.0 <= self.tag_dropout <= 1.0:
            raise ConfigError(f"tag dropout must be between 0 and 1, got {self.tag_dropout}")
        if self.latent_sampling not in LATENT_SAMPLING:
            raise ConfigError(f"latent sampling must be one of {', '.join(LATENT_SAMPLING)}, got {self.latent_sampling!r}")
        if self.clip_grad_mode not in CLIP_MODES:
            raise ConfigError(f"gradient clipping must be one of {', '.join(CLIP_MODES)}, got {self.clip_grad_mode!r}")
        dataset = Path(self.dataset)
        if not str(self.dataset) or not dataset.is_dir():
            raise ConfigError(f"dataset directory {str(self.dataset)!r} does not exist")
        if not any(dataset.iterdir()):
            raise ConfigError(f"dataset directory {dataset} is empty")
        try:
            read_template(self.template, require_name=self.kind == "embedding")
        except TemplateError as exc:
            raise ConfigError(f"template: {exc}") from None
        return self

    def _validate_validation(self) -> None:
        if self.validate_every < -1:
            raise ConfigError("validation interval must be -1 (automatic), 0 (off) or a number of steps, "
                              f"got {self.validate_every}")
        if not 0.0 <= self.validation_share < 1.0:
            raise ConfigError(f"validation share must be at least 0 and below 1, got {self.validation_share}")
        if self.early_stop_window < 2:
            raise ConfigError(f"early stop window must be at least 2 checks, got {self.early_stop_window}")
        if self.early_stop and self.validate_every == 0:
            raise ConfigError("early stop needs the validation loss: set the validation interval to -1 "
                              "(automatic) or a number of steps")

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class EmbeddingTrainingConfig(TrainingConfig):
    """Textual inversion: A1111's embedding learning rate 0.005; previews can be saved with the embedding inside."""

    save_image_with_embedding: bool = True

    kind = "embedding"


@dataclass(frozen=True)
class HypernetworkTrainingConfig(TrainingConfig):
    """Hypernetwork: A1111's hypernetwork learning rate 0.00001."""

    learn_rate: str = "0.00001"

    kind = "hypernetwork"
