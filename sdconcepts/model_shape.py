"""What forms need to know about a model without loading it: its hypernetwork widths and its image size.

Read from a diffusers folder's ``config.json`` files, or from the tensor shapes in a single file's safetensors
header (nothing is loaded); a ``.ckpt`` pickle is not opened here (the caller asks the loaded model instead).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

__all__ = ["A1111_WIDTHS", "ModelShape", "read_model_shape", "shape_of_loaded"]

# A1111's Create hypernetwork offers these (SD 1.x context 768, SD 2.x 1024, and the UNet's channel widths).
A1111_WIDTHS = (768, 1024, 320, 640, 1280)

# Single-file (LDM) key of an attention block's key projection; A1111 keys a hypernetwork layer by its input width.
# The embedded toy-world model (``backends.model_loading.DEFAULT_MODEL_DIR``, named here without importing diffusers).
EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "toyworld" / "model"
# The embedded SDXL-layout toy-world model, and the name that selects it wherever a model path is asked for.
EMBEDDED_XL_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "toyworld-xl" / "model"
EMBEDDED_XL_NAME = "toyworld-xl"

_TO_K = re.compile(r"\.attn([12])\.to_k\.weight$")
_SDXL_SECOND_ENCODER = "conditioner.embedders.1."


@dataclass(frozen=True)
class ModelShape:
    """``widths``: the input widths of the UNet's attention key projections (the hypernetwork modules that model
    uses), the text context width first; ``size``: the model's native image side; ``multiple``: sides must be
    multiples of it; ``sdxl``: it has SDXL's two text encoders (its embeddings are clip_l + clip_g pairs)."""

    context_width: int
    widths: tuple[int, ...]
    size: int
    multiple: int
    sdxl: bool = False


def _ordered(context: int, channel_widths: set[int]) -> tuple[int, ...]:
    return (context, *sorted(channel_widths - {context}))


def _folder_shape(folder: Path) -> ModelShape | None:
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
        channels = [int(c) for c in unet["block_out_channels"]]
        context = int(unet["cross_attention_dim"])
        attention = {channels[i] for i, kind in enumerate(unet["down_block_types"]) if "Attn" in str(kind)}
        attention |= {channels[-1]} if "CrossAttn" in str(unet.get("mid_block_type") or "UNetMidBlock2DCrossAttn") else set()
        scale = 2 ** (len(vae["block_out_channels"]) - 1)
        return ModelShape(context, _ordered(context, attention), int(unet["sample_size"]) * scale,
                          scale * 2 ** (len(channels) - 1), sdxl=(folder / "text_encoder_2").is_dir())
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _single_file_shape(path: Path) -> ModelShape | None:
    try:
        context: int | None = None
        channel_widths: set[int] = set()
        sdxl = False
        with safe_open(str(path), framework="pt") as handle:  # type: ignore[no-untyped-call]
            for key in handle.keys():
                # SGM layout: the second embedder is SDXL's OpenCLIP-G (SD 1/2 files have cond_stage_model only).
                sdxl = sdxl or key.startswith(_SDXL_SECOND_ENCODER)
                match = _TO_K.search(key)
                if match is None:
                    continue
                width = int(handle.get_slice(key).get_shape()[-1])
                if match.group(1) == "2":
                    context = width
                else:
                    channel_widths.add(width)
    except Exception:  # noqa: BLE001 - any unreadable header means "unknown"; loading the model reports it properly
        return None
    if context is None:
        return None
    # Single files: 8x VAE; SDXL (context 2048) is 1024 px, SD 1.x/2.x 512 (2.x v models are 768 px, said by their
    # yaml; 512 is safe). Sides are multiples of 64 (8x VAE, three down blocks).
    return ModelShape(context, _ordered(context, channel_widths), 1024 if context == 2048 else 512, 64, sdxl=sdxl)


def read_model_shape(path: Path | None) -> ModelShape | None:
    """The shape of a diffusers folder or a ``.safetensors`` single file, or None when it cannot be read cheaply."""
    if path is None:
        path = EMBEDDED_MODEL_DIR
    if path.is_dir():
        return _folder_shape(path)
    if path.suffix.lower() == ".safetensors" and path.is_file():
        return _single_file_shape(path)
    return None


def shape_of_loaded(model: Any) -> ModelShape:
    """The shape of a loaded model (``backends.loaded_model.LoadedModel``), from its modules."""
    context = int(model.context_width)
    channel_widths = {int(module.in_features) for name, module in model.unet.named_modules()
                      if name.endswith("attn1.to_k")}
    return ModelShape(context, _ordered(context, channel_widths), int(model.default_size), int(model.size_multiple),
                      sdxl=bool(model.is_sdxl))
