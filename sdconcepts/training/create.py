"""Creating a new embedding or hypernetwork file with A1111's create-form semantics (a1111-compat §4.1, §4.2)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from sdconcepts.embedding import Embedding
from sdconcepts.embedding_files import save_embedding
from sdconcepts.hypernetwork import DEFAULT_LAYER_STRUCTURE, DEFAULT_WIDTHS, create_hypernetwork
from sdconcepts.hypernetwork_files import save_hypernetwork
from sdconcepts.training.names import sanitize_name, target_path

__all__ = ["MAX_VECTORS", "create_embedding_file", "create_hypernetwork_file", "initial_vectors"]

MAX_VECTORS = 75


class CreateError(ValueError):
    """A create request that cannot be done (file exists, bad vector count)."""


def initial_vectors(token_rows: Tensor, vectors: int, width: int) -> Tensor:
    """A1111's initial vectors: ``vec[i] = rows[i * n // vectors]`` (tokens picked evenly, a short text repeated),
    all zeros when the initialization text has no tokens."""
    if not 1 <= vectors <= MAX_VECTORS:
        raise CreateError(f"vectors per token must be between 1 and {MAX_VECTORS}, got {vectors}")
    out = torch.zeros(vectors, width, dtype=torch.float32)
    count = int(token_rows.shape[0])
    if count:
        for i in range(vectors):
            out[i] = token_rows[i * count // vectors].float()
    return out


def create_embedding_file(
    folder: str | Path,
    name: str,
    token_rows: Tensor,
    *,
    vectors: int = 1,
    width: int | None = None,
    overwrite: bool = False,
    sd_checkpoint: str | None = None,
    sd_checkpoint_name: str | None = None,
) -> Path:
    """Write ``folder/<name>.pt`` (A1111's layout, step 0) from the init text's token rows; returns the path."""
    path = target_path(folder, name)
    if path.exists() and not overwrite:
        raise CreateError(f"{path} already exists (use overwrite to replace it)")
    width = int(token_rows.shape[-1]) if width is None else width
    embedding = Embedding(
        name=sanitize_name(name),
        vectors=initial_vectors(token_rows, vectors, width),
        step=0,
        sd_checkpoint=sd_checkpoint,
        sd_checkpoint_name=sd_checkpoint_name,
    )
    return save_embedding(embedding, path)


def create_hypernetwork_file(
    folder: str | Path,
    name: str,
    *,
    widths: Sequence[int] = DEFAULT_WIDTHS,
    layer_structure: Sequence[float] = DEFAULT_LAYER_STRUCTURE,
    activation: str | None = "linear",
    weight_init: str = "Normal",
    layer_norm: bool = False,
    use_dropout: bool = False,
    dropout_structure: Sequence[float] | None = None,
    overwrite: bool = False,
    seed: int | None = None,
) -> Path:
    """Write ``folder/<name>.pt`` with a new hypernetwork (A1111's create-form defaults); returns the path."""
    path = target_path(folder, name)
    if path.exists() and not overwrite:
        raise CreateError(f"{path} already exists (use overwrite to replace it)")
    hypernetwork = create_hypernetwork(
        sanitize_name(name),
        widths,
        layer_structure=layer_structure,
        activation=activation,
        weight_init=weight_init,
        layer_norm=layer_norm,
        use_dropout=use_dropout,
        dropout_structure=dropout_structure,
        generator_seed=seed,
    )
    return save_hypernetwork(hypernetwork, path)
