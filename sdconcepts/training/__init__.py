"""Training embeddings and hypernetworks: A1111's fields and files, a resumable loop, safe saves.

Entry points: ``train_embedding`` / ``train_hypernetwork`` (generators of ``TrainingEvent``), ``create_embedding_file``
/ ``create_hypernetwork_file``, the config dataclasses, and the pure pieces (``diffusion_loss``, ``training_loop``,
``LearnRateSchedule``, ``TrainingDataset``, templates).
"""

from __future__ import annotations

from sdconcepts.training.config import (
    ConfigError,
    EmbeddingTrainingConfig,
    HypernetworkTrainingConfig,
    TrainingConfig,
)
from sdconcepts.training.create import CreateError, create_embedding_file, create_hypernetwork_file, initial_vectors
from sdconcepts.training.dataset import DatasetError, TrainingBatch, TrainingDataset, read_images
from sdconcepts.training.loop import GradientClip, TrainingEvent, training_loop
from sdconcepts.training.names import InvalidNameError, sanitize_name
from sdconcepts.training.objective import DiffusionModel, diffusion_loss
from sdconcepts.training.run import TrainingError, train_embedding, train_hypernetwork
from sdconcepts.training.schedule import LearnRateSchedule, ScheduleError, parse_schedule
from sdconcepts.training.templates import TemplateError, available_templates, read_template

__all__ = [
    "ConfigError",
    "CreateError",
    "DatasetError",
    "DiffusionModel",
    "EmbeddingTrainingConfig",
    "GradientClip",
    "HypernetworkTrainingConfig",
    "InvalidNameError",
    "LearnRateSchedule",
    "ScheduleError",
    "TemplateError",
    "TrainingBatch",
    "TrainingConfig",
    "TrainingDataset",
    "TrainingError",
    "TrainingEvent",
    "available_templates",
    "create_embedding_file",
    "create_hypernetwork_file",
    "diffusion_loss",
    "initial_vectors",
    "parse_schedule",
    "read_images",
    "read_template",
    "sanitize_name",
    "train_embedding",
    "train_hypernetwork",
    "training_loop",
]
