"""SD 1.x embeddings converted for a loaded SDXL model (``embeddings.conversion`` over the model's token tables):
which table the embedding was trained with, and the converted embedding.

The source table: a given SD 1.x/2.x model's; otherwise the SDXL model's own ``clip_l`` when the embedding is that
wide (real SD 1.x and SDXL share CLIP ViT-L/14, so the vectors are copied exactly); otherwise the embedded SD-1
toy model's when the embedding is that wide (the toy models: their tables differ, both halves are mapped).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from sdconcepts.embeddings.conversion import ConversionError, MapCache, convert_embedding
from sdconcepts.embeddings.embedding import Embedding
from sdconcepts.embeddings.library import EmbeddingLibrary
from sdconcepts.model_shape import EMBEDDED_MODEL_DIR

__all__ = ["convert_for_model", "convert_skipped", "sdxl_tables", "source_table", "token_table"]

_TOKEN_KEY = "embeddings.token_embedding.weight"


def token_table(encoder: Any) -> torch.Tensor:
    """A text encoder's token embedding table ``[vocab, width]`` as float32 on the CPU."""
    return encoder.get_input_embeddings().weight.detach().float().cpu()


def sdxl_tables(model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``clip_l`` and ``clip_g`` token tables of a loaded SDXL model."""
    if not model.is_sdxl:
        raise ConversionError(f"{model.name} is not an SDXL model: conversion writes clip_l + clip_g for SDXL")
    return token_table(model.text_encoder), token_table(model.text_encoder_2)


def _embedded_sd1_table() -> torch.Tensor | None:
    path = Path(EMBEDDED_MODEL_DIR) / "text_encoder" / "model.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as handle:
        # transformers 4 writes text_model.embeddings..., 5 embeddings... (its CLIPTextModel is flattened).
        key = next((k for k in handle.keys() if k.endswith(_TOKEN_KEY)), None)
        return handle.get_tensor(key).float() if key is not None else None


def source_table(width: int, target: Any, source_model: Any | None = None) -> torch.Tensor:
    """The token table an embedding ``width`` wide was trained with (see the module's docstring)."""
    if source_model is not None:
        if source_model.is_sdxl:
            raise ConversionError(f"{source_model.name} is an SDXL model: the source must be an SD 1.x/2.x model")
        table = token_table(source_model.text_encoder)
        if int(table.shape[1]) != width:
            raise ConversionError(f"the embedding is {width} wide and {source_model.name}'s tokens "
                                  f"{table.shape[1]}: it was not trained on that model")
        return table
    clip_l, _ = sdxl_tables(target)
    if int(clip_l.shape[1]) == width:
        return clip_l
    embedded = _embedded_sd1_table()
    if embedded is not None and int(embedded.shape[1]) == width:
        return embedded
    raise ConversionError(f"a {width}-wide embedding: name the SD 1.x/2.x model it was trained on (its text encoder "
                          f"is not {target.name}'s clip_l, {clip_l.shape[1]} wide)")


def convert_for_model(embedding: Embedding, target: Any, cache: MapCache, source_model: Any | None = None) -> Embedding:
    """``embedding`` (single-encoder) as an SDXL embedding for the loaded SDXL model ``target``."""
    if embedding.is_sdxl:
        raise ConversionError(f"{embedding.name} is already an SDXL embedding (clip_l + clip_g)")
    clip_l, clip_g = sdxl_tables(target)
    source = source_table(embedding.width, target, source_model)
    return convert_embedding(embedding, source, clip_l, clip_g, cache)


def convert_skipped(library: EmbeddingLibrary, model: Any, cache: MapCache, skipped: Mapping[str, str],
                    used_in: str | None = None) -> tuple[dict[str, Embedding], dict[str, str]]:
    """On the fly: the SD 1.x/2.x embeddings an SDXL ``model`` skipped (``skipped``: name -> reason, as
    ``usable_embeddings`` gives it), converted; ``used_in`` (prompt and negative prompt) limits it to the names used
    there. Returns the converted embeddings by name and the skipped names left, with reasons (a conversion that
    fails says why)."""
    if not model.is_sdxl:
        return {}, dict(skipped)
    text = used_in.lower() if used_in is not None else None
    left = dict(skipped)
    converted: dict[str, Embedding] = {}
    records = {r.name: r for r in library.records(int(model.context_width), sdxl=True) if r.convertible}
    for name in skipped:
        record = records.get(name)
        if record is None or (text is not None and name.lower() not in text):
            continue
        embedding = library.load(record)
        if embedding is None:
            continue
        try:
            # The infotext's TI hash names the file the words came from.
            converted[name] = replace(convert_for_model(embedding, model, cache), hash=embedding.hash)
        except ConversionError as exc:
            left[name] = f"{skipped[name]}; converting it failed: {exc}"
            continue
        del left[name]
    return converted, left
