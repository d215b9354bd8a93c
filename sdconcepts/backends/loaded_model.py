"""A loaded text-to-image model (UNet, VAE, text encoders and tokenizers on one device) and its A1111 hash.

Loading one is `sdconcepts.backends.model_loading.load_model`; this module is what every backend module and the host
adapter share about the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdconcepts.backends.attention import use_lean_attention
from sdconcepts.safe_load import file_sha256

__all__ = ["LoadedModel", "weights_hash"]


@dataclass
class LoadedModel:
    """A loaded text-to-image model and what the engine needs to know about it."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]
    family: str
    prediction_type: str
    name: str
    path: Path | None
    device: torch.device
    dtype: torch.dtype
    _hash: str | None = field(default=None, repr=False)
    # SDXL: OpenCLIP ViT-bigG with its projection (CLIPTextModelWithProjection) and its tokenizer (pads with 0).
    text_encoder_2: Any = None
    tokenizer_2: Any = None

    def __post_init__(self) -> None:
        # Every way of loading a model ends here: its UNet's attention runs through the lean processor, in
        # training and in sampling alike (the same outputs as diffusers' default, with less Python per call).
        use_lean_attention(self.unet)

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def text_encoders(self) -> list[Any]:
        return [self.text_encoder] if self.text_encoder_2 is None else [self.text_encoder, self.text_encoder_2]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this: the UNet halves the latent once per down block but the last."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def context_width(self) -> int:
        """The cross-attention input's width; SDXL concatenates its encoders' hidden states (768 + 1280)."""
        return sum(int(te.config.hidden_size) for te in self.text_encoders)

    @property
    def encoder_widths(self) -> tuple[int, ...]:
        """Each text encoder's width (SDXL: clip_l's, then clip_g's), as an SDXL embedding's halves must be."""
        return tuple(int(te.config.hidden_size) for te in self.text_encoders)

    @property
    def text_encoder_layers(self) -> int:
        """The text encoder's layer count: clip skip runs from 1 (the last layer) to this (the first)."""
        return int(self.text_encoder.config.num_hidden_layers)

    @property
    def short_hash(self) -> str | None:
        """A1111's 10-hex-digit model hash (SHA-256 of the weights file); None for in-memory models."""
        if self._hash is None and self.path is not None:
            self._hash = weights_hash(self.path)[:10]
        return self._hash


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def weights_hash(path: Path) -> str:
    """SHA-256 of a checkpoint file (A1111's hash), or of a diffusers folder's UNet weights file."""
    target = path
    if path.is_dir():
        candidates = sorted((path / "unet").glob("*.safetensors")) or sorted((path / "unet").glob("*.bin"))
        if not candidates:
            return "0" * 64
        target = candidates[0]
    stat = target.stat()
    key = (str(target.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = file_sha256(target)
    return _HASH_CACHE[key]
