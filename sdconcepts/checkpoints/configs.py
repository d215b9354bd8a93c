"""Model configs of a single-file checkpoint: the reference configs shipped in ``assets/configs``, our own record of
them in a file's metadata, and what the tensor shapes say (UNet and VAE widths, block and layer counts).

Shared by the SD 1.x/2.x inference (``checkpoints.files``) and the SDXL one (``checkpoints.sdxl``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from sdconcepts.checkpoints.layout import (
    UNET_PREFIX,
    VAE_PREFIX,
    CheckpointError,
    Tensor,
    key_indices,
    ldm_unet_layout,
    ldm_vae_layout,
)

__all__ = [
    "FAMILIES",
    "METADATA_CONFIGS",
    "ModelConfigs",
    "infer_unet_shapes",
    "infer_vae_shapes",
    "metadata_configs",
    "need_tensor",
    "norm_groups",
    "reference_configs",
]

FAMILIES = ("sd1", "sd2", "sdxl")
# Our own record of the configs in a file's metadata (``checkpoints.files.make_metadata`` writes it).
METADATA_CONFIGS = "sdconcepts.configs"

_CONFIG_DIR = Path(__file__).resolve().parent.parent / "assets" / "configs"


@dataclass(frozen=True)
class ModelConfigs:
    """Constructor kwargs for UNet2DConditionModel, AutoencoderKL, CLIPTextConfig and a diffusers scheduler."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    scheduler: dict[str, Any]
    family: str
    prediction_type: str
    # SDXL's second text encoder (OpenCLIP ViT-bigG with its projection); None for SD 1.x/2.x.
    text_encoder_2: dict[str, Any] | None = None


@lru_cache(maxsize=3)
def _reference_configs(family: str) -> dict[str, dict[str, Any]]:
    folder = _CONFIG_DIR / family
    return {
        name: json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
        for name in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")
        if name != "text_encoder_2" or family == "sdxl"
    }


def reference_configs(family: str) -> dict[str, dict[str, Any]]:
    """The released SD 1.5 (``sd1``), SD 2.1 768-v (``sd2``) or SDXL base 1.0 (``sdxl``) configs shipped in the
    package assets (a copy)."""
    if family not in FAMILIES:
        raise CheckpointError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    return copy.deepcopy(_reference_configs(family))


def need_tensor(sd: Mapping[str, Tensor], key: str) -> Tensor:
    value = sd.get(key)
    if value is None:
        raise CheckpointError(f"missing key {key}")
    return value


def norm_groups(widths: Iterable[int]) -> int:
    """GroupNorm groups when the file does not say: 32 as in every released SD model, else the most that fit."""
    ws = list(widths)
    return next(g for g in (32, 16, 8, 4, 2, 1) if all(w % g == 0 for w in ws))


def infer_unet_shapes(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    p = UNET_PREFIX
    layout = ldm_unet_layout(sd)
    step = layout.layers + 1
    widths = [
        int(need_tensor(sd, f"{p}input_blocks.{1 + i * step}.0.out_layers.3.weight").shape[0]) for i in range(layout.blocks)
    ]
    cfg: dict[str, Any] = {
        "in_channels": int(need_tensor(sd, p + "input_blocks.0.0.weight").shape[1]),
        "out_channels": int(need_tensor(sd, p + "out.2.weight").shape[0]),
        "block_out_channels": widths,
        "layers_per_block": layout.layers,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in layout.down_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in layout.up_attention],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if layout.mid_attention else "UNetMidBlock2D",
    }
    attention = [f"{p}input_blocks.{1 + i * step}.1." for i in range(layout.blocks) if layout.down_attention[i]]
    if layout.mid_attention:
        attention.append(p + "middle_block.1.")
    if attention:
        cfg["use_linear_projection"] = need_tensor(sd, attention[0] + "proj_in.weight").ndim == 2
        cfg["cross_attention_dim"] = int(need_tensor(sd, attention[0] + "transformer_blocks.0.attn2.to_k.weight").shape[1])
        depths = {len(key_indices(sd, a + "transformer_blocks.")) for a in attention}
        if len(depths) == 1:
            cfg["transformer_layers_per_block"] = depths.pop()
    return cfg


def infer_vae_shapes(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    p = VAE_PREFIX
    layout = ldm_vae_layout(sd)
    widths = [int(need_tensor(sd, f"{p}encoder.down.{i}.block.0.conv1.weight").shape[0]) for i in range(layout.blocks)]
    cfg: dict[str, Any] = {
        "in_channels": int(need_tensor(sd, p + "encoder.conv_in.weight").shape[1]),
        "out_channels": int(need_tensor(sd, p + "decoder.conv_out.weight").shape[0]),
        "latent_channels": int(need_tensor(sd, p + "decoder.conv_in.weight").shape[1]),
        "block_out_channels": widths,
        "layers_per_block": layout.layers,
        "down_block_types": ["DownEncoderBlock2D"] * layout.blocks,
        "up_block_types": ["UpDecoderBlock2D"] * layout.blocks,
    }
    # Only stated when they depart from the SD layout, so configs stay readable by older diffusers.
    if p + "quant_conv.weight" not in sd:
        cfg["use_quant_conv"] = False
    if p + "post_quant_conv.weight" not in sd:
        cfg["use_post_quant_conv"] = False
    if p + "encoder.mid.attn_1.q.weight" not in sd:
        cfg["mid_block_add_attention"] = False
    return cfg


def metadata_configs(metadata: Mapping[str, str] | None) -> dict[str, dict[str, Any]]:
    raw = (metadata or {}).get(METADATA_CONFIGS)
    if not raw:
        return {}
    try:
        parsed = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(parsed, dict):
        return {}
    return {k: v for k, v in parsed.items() if isinstance(k, str) and isinstance(v, dict)}
