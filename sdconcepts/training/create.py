"""Creating a new embedding or hypernetwork file with A1111's create-form semantics (a1111-compat §4.1, §4.2)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from sdconcepts.embeddings.embedding import Embedding
from sdconcepts.embeddings.files import save_embedding
from sdconcepts.file_names import sanitize_name, target_path
from sdconcepts.hypernetworks.files import save_hypernetwork
from sdconcepts.hypernetworks.hypernetwork import (
    DEFAULT_LAYER_STRUCTURE,
    DEFAULT_WIDTHS,
    HypernetworkError,
    check_structure,
    create_hypernetwork,
)
from sdconcepts.limits import (
    MAX_HYPERNETWORK_BYTES,
    MAX_LAYER_FACTOR,
    format_bytes,
    hypernetwork_parameters,
    memory_problem,
)

__all__ = ["MAX_VECTORS", "check_hypernetwork_size", "create_embedding_file", "create_hypernetwork_file",
           "initial_vectors"]

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
    token_rows: Tensor | Mapping[str, Tensor],
    *,
    vectors: int = 1,
    width: int | None = None,
    overwrite: bool = False,
    sd_checkpoint: str | None = None,
    sd_checkpoint_name: str | None = None,
) -> Path:
    """Write ``folder/<name>.pt`` (A1111's layout, step 0) from the init text's token rows; returns the path.

    SDXL: ``token_rows`` maps ``clip_l`` and ``clip_g`` to each encoder's rows; each half is initialised from its
    own rows (``width`` is then their sum and is not needed), and the file holds ``{clip_l, clip_g}`` as Forge and
    kohya write them. An SDXL file is ``.safetensors``: A1111 and Forge read every value of an SDXL ``.pt`` as a
    tensor, so only safetensors metadata can carry the step and checkpoint that training resumes from."""
    path = target_path(folder, name, ".safetensors" if isinstance(token_rows, Mapping) else ".pt")
    if path.exists() and not overwrite:
        raise CreateError(f"{path} already exists (use overwrite to replace it)")
    initial: Tensor | dict[str, Tensor]
    if isinstance(token_rows, Mapping):
        initial = {key: initial_vectors(rows, vectors, int(rows.shape[-1])) for key, rows in token_rows.items()}
    else:
        initial = initial_vectors(token_rows, vectors, int(token_rows.shape[-1]) if width is None else width)
    embedding = Embedding(
        name=sanitize_name(name),
        vectors=initial,
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
    size_limits: bool = True,
) -> Path:
    """Write ``folder/<name>.pt`` with a new hypernetwork (A1111's create-form defaults); returns the path.

    The size is checked before anything is built (``check_hypernetwork_size``).
    """
    path = target_path(folder, name)
    if path.exists() and not overwrite:
        raise CreateError(f"{path} already exists (use overwrite to replace it)")
    check_hypernetwork_size(widths, layer_structure, layer_norm=layer_norm, size_limits=size_limits)
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


def check_hypernetwork_size(
    widths: Sequence[int], layer_structure: Sequence[float], *, layer_norm: bool = False, size_limits: bool = True
) -> int:
    """The new file's size in bytes (float32 weights), or HypernetworkError when it is over the limits.

    With ``size_limits``: every layer factor at most ``MAX_LAYER_FACTOR`` and the file at most
    ``MAX_HYPERNETWORK_BYTES``. Always: the weights must fit in the memory available now.
    """
    check_structure(layer_structure, None)
    if any(int(width) <= 0 for width in widths):
        raise HypernetworkError(f"widths {list(widths)} must be positive whole numbers")
    structure = [float(value) for value in layer_structure]
    if size_limits and max(structure) > MAX_LAYER_FACTOR:
        raise HypernetworkError(
            f"layer structure {structure} has a factor over {MAX_LAYER_FACTOR:g}; hidden layers are the context width "
            f"times the factor (--no-size-limits lifts this on the command line)"
        )
    size = 4 * hypernetwork_parameters([int(w) for w in widths], structure, layer_norm=layer_norm)
    if size_limits and size > MAX_HYPERNETWORK_BYTES:
        raise HypernetworkError(
            f"layer structure {structure} on widths {list(widths)} makes a {format_bytes(size)} file, over the limit "
            f"of {format_bytes(MAX_HYPERNETWORK_BYTES)} (--no-size-limits lifts this on the command line)"
        )
    problem = memory_problem(size, "cpu", f"a hypernetwork with layer structure {structure} ({format_bytes(size)})")
    if problem:
        raise HypernetworkError(problem)
    return size
