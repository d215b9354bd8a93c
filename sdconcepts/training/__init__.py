"""Training embeddings and hypernetworks: A1111's fields and files, a resumable loop, safe saves.

What lives here: ``run`` (``train_embedding`` / ``train_hypernetwork``, generators of ``TrainingEvent``: a run from
files to files, the loop's events consumed by the loss log, the saves and the previews), ``loop`` (the pure training
loop) and ``objective`` (the pure diffusion loss), ``training_model`` (the port over a loaded model's components),
``create`` (``create_embedding_file`` / ``create_hypernetwork_file``), ``config`` (the config dataclasses),
``dataset``, ``templates``, ``schedule``, ``outputs`` (log folder, loss CSV and plot), ``names``, ``lock`` and
``distributed``.

Who may import it: the command line (``cli``, ``cli_training``), the web UI (``ui``), the embedding tools (file
names), tests, bench and tools. It imports none of those, nor gradio, diffusers or transformers: a loaded model is
reached through ``training_model``, which drives ``sdconcepts.backends``.
"""

from __future__ import annotations

from sdconcepts.file_names import InvalidNameError, sanitize_name
from sdconcepts.training.config import (
    ConfigError,
    EmbeddingTrainingConfig,
    HypernetworkTrainingConfig,
    TrainingConfig,
)
from sdconcepts.training.create import CreateError, create_embedding_file, create_hypernetwork_file, initial_vectors
from sdconcepts.training.dataset import DatasetError, TrainingBatch, TrainingDataset, read_images
from sdconcepts.training.loop import GradientClip, TrainingEvent, training_loop
from sdconcepts.training.objective import DiffusionModel, diffusion_loss
from sdconcepts.training.run import train_embedding, train_hypernetwork
from sdconcepts.training.schedule import LearnRateSchedule, ScheduleError, parse_schedule
from sdconcepts.training.templates import TemplateError, available_templates, read_template
from sdconcepts.training.trainables import TrainingError

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
