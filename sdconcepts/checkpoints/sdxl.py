"""SDXL single-file checkpoints in the original SGM key layout (A1111/Forge `.safetensors`), read and written.

The UNet (``model.diffusion_model.*``, plus ``label_emb``: the text/time added conditioning) and the VAE
(``first_stage_model.*``) use the LDM names of SD 1/2 (`sdconcepts.checkpoints.files`); the text encoders live under
``conditioner.embedders.0.transformer.*`` (CLIP ViT-L, Hugging Face names) and ``conditioner.embedders.1.model.*``
(OpenCLIP ViT-bigG: fused ``in_proj`` q/k/v, ``text_projection`` used as ``x @ P``). Pure core: torch only.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch

from sdconcepts.checkpoints import layout as lk
from sdconcepts.checkpoints.configs import (
    ModelConfigs,
    infer_unet_shapes,
    infer_vae_shapes,
    metadata_configs,
    need_tensor,
    norm_groups,
    reference_configs,
)

Tensor = torch.Tensor
StateDict = dict[str, Tensor]

CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_G_PREFIX = "conditioner.embedders.1.model."
# The added-conditioning MLP: LDM's label_emb.0.{0,2} is diffusers' add_embedding.linear_{1,2}.
_LABEL_EMB: list[lk.ModuleMap] = [
    ("label_emb.0.0", "add_embedding.linear_1", ()),
    ("label_emb.0.2", "add_embedding.linear_2", ()),
]
# The pooled-output projection as OpenCLIP stores it ([width, projection], applied as x @ P).
_PROJECTION = "text_projection"
# OpenCLIP's contrastive temperature, log(1/0.07): written when no source file supplied one (nothing reads it).
_LOGIT_SCALE = math.log(1 / 0.07)


def check_layout(state_dict: Mapping[str, Tensor]) -> None:
    """Raise CheckpointError unless the file holds both SDXL base text encoders (the refiner has only OpenCLIP)."""
    has_l = any(k.startswith(CLIP_L_PREFIX) for k in state_dict)
    has_g = any(k.startswith(CLIP_G_PREFIX + "transformer.resblocks.") for k in state_dict)
    if not has_l and any(k.startswith("conditioner.embedders.0.model.") for k in state_dict):
        raise lk.CheckpointError("SDXL refiner checkpoint (OpenCLIP only); only SDXL base models are supported")
    if not (has_l and has_g):
        missing = CLIP_L_PREFIX if not has_l else CLIP_G_PREFIX + "transformer.resblocks."
        raise lk.CheckpointError(f"SDXL checkpoint without its text encoder keys {missing}*")


def _unet_modules(layout: lk.UNetLayout, label_emb: bool) -> list[lk.ModuleMap]:
    return lk.unet_modules(layout) + (_LABEL_EMB if label_emb else [])


def _clip_l_to_hf(sd: Mapping[str, Tensor]) -> tuple[StateDict, set[str]]:
    out: StateDict = {}
    used: set[str] = set()
    for key, value in sd.items():
        if key.startswith(CLIP_L_PREFIX):
            used.add(key)
            if not key.endswith("position_ids"):
                name = key[len(CLIP_L_PREFIX) :]
                out[name if name.startswith(lk.TEXT_MODEL) else lk.TEXT_MODEL + name] = value
    return out, used


def _clip_g_layers(sd: Mapping[str, Tensor]) -> int:
    blocks = lk.key_indices(sd, CLIP_G_PREFIX + "transformer.resblocks.")
    if not blocks or max(blocks) != len(blocks) - 1:
        raise lk.CheckpointError("SDXL OpenCLIP text encoder resblocks are not numbered 0..n-1")
    return len(blocks)


def split_checkpoint(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, StateDict], StateDict]:
    """Diffusers-layout "unet", "vae", "text_encoder" (CLIPTextModel) and "text_encoder_2"
    (CLIPTextModelWithProjection) state dicts of an SGM-layout file, and the tensors no component uses."""
    check_layout(state_dict)
    layout = lk.ldm_unet_layout(state_dict)
    label_emb = lk.UNET_PREFIX + "label_emb.0.0.weight" in state_dict
    unet = lk.rename_keys(state_dict, lk.UNET_PREFIX, _unet_modules(layout, label_emb), to_diffusers=True, what="UNet")
    vae, vae_used = lk.split_vae(state_dict)
    text_l, used_l = _clip_l_to_hf(state_dict)
    # SDXL runs every OpenCLIP layer: the pooled output comes from the last one (the context from the penultimate).
    text_g, used_g = lk.openclip_to_hf(state_dict, CLIP_G_PREFIX, _clip_g_layers(state_dict), what="SDXL OpenCLIP")
    projection = state_dict.get(CLIP_G_PREFIX + _PROJECTION)
    if projection is None:
        raise lk.CheckpointError(f"missing key {CLIP_G_PREFIX}{_PROJECTION} (the pooled-output projection)")
    text_g["text_projection.weight"] = projection.t()
    used = used_l | used_g | {CLIP_G_PREFIX + _PROJECTION}
    leftovers = {
        k: v
        for k, v in state_dict.items()
        if not (k.startswith(lk.UNET_PREFIX) or k in vae_used or k in used)
    }
    return {"unet": unet, "vae": vae, "text_encoder": text_l, "text_encoder_2": text_g}, leftovers


def join_checkpoint(
    unet_sd: Mapping[str, Tensor],
    vae_sd: Mapping[str, Tensor],
    text_encoder_sd: Mapping[str, Tensor],
    text_encoder_2_sd: Mapping[str, Tensor],
    *,
    extra: Mapping[str, Tensor] | None = None,
) -> StateDict:
    """One SGM-layout state dict from diffusers-layout components (either CLIPTextModel key form).

    `extra` (leftovers of the file the model came from) is written too and wins over the placeholders made here:
    CLIP-L's ``position_ids`` (0..n-1) and OpenCLIP's ``logit_scale``, which A1111's model holds but never uses.
    """
    layout = lk.diffusers_unet_layout(unet_sd)
    label_emb = "add_embedding.linear_1.weight" in unet_sd
    unet = lk.rename_keys(unet_sd, "", _unet_modules(layout, label_emb), to_diffusers=False, what="UNet")
    vae = lk.join_vae(vae_sd)
    text, placeholders = join_text(text_encoder_sd, text_encoder_2_sd)
    out: StateDict = {**placeholders, **(extra or {})}
    out.update({lk.UNET_PREFIX + k: v for k, v in unet.items()})
    out.update({lk.VAE_PREFIX + k: v for k, v in vae.items()})
    out.update(text)
    return out


def join_text(
    text_encoder_sd: Mapping[str, Tensor], text_encoder_2_sd: Mapping[str, Tensor]
) -> tuple[StateDict, StateDict]:
    """The SGM-layout keys of both SDXL text encoders (CLIPTextModel, CLIPTextModelWithProjection state dicts in
    either key form), and the placeholders a file carries beside them (CLIP-L's ``position_ids``, ``logit_scale``).

    OpenCLIP-G's q/k/v are fused into ``in_proj`` (a new tensor): call it on meta tensors where only the shapes
    matter."""
    text_l = {
        CLIP_L_PREFIX + lk.TEXT_MODEL + k: v
        for k, v in lk.strip_text_model(text_encoder_sd).items()
        if not k.endswith("position_ids")
    }
    te_g = lk.strip_text_model(text_encoder_2_sd)
    projection = te_g.pop("text_projection.weight", None)
    if projection is None:
        raise lk.CheckpointError("the SDXL second text encoder has no text_projection (CLIPTextModelWithProjection)")
    te_g = {k: v for k, v in te_g.items() if not k.endswith("position_ids")}
    text_g = lk.hf_to_openclip(te_g, CLIP_G_PREFIX)
    text_g[CLIP_G_PREFIX + _PROJECTION] = projection.t()
    placeholders: StateDict = {CLIP_G_PREFIX + "logit_scale": torch.tensor(_LOGIT_SCALE)}
    table = text_l.get(CLIP_L_PREFIX + lk.TEXT_MODEL + "embeddings.position_embedding.weight")
    if table is not None:
        ids = torch.arange(table.shape[0], dtype=torch.int64, device=table.device).unsqueeze(0)
        placeholders[CLIP_L_PREFIX + lk.TEXT_MODEL + "embeddings.position_ids"] = ids
    return {**text_l, **text_g}, placeholders


def _unet_shapes(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    p = lk.UNET_PREFIX
    shapes = infer_unet_shapes(sd)
    layout = lk.ldm_unet_layout(sd)
    step = layout.layers + 1
    # Depths differ per level in SDXL (1/2/10 there; a level without attention counts 1, as diffusers' config does).
    shapes["transformer_layers_per_block"] = [
        len(lk.key_indices(sd, f"{p}input_blocks.{1 + i * step}.1.transformer_blocks.")) or 1
        for i in range(layout.blocks)
    ]
    label = sd.get(p + "label_emb.0.0.weight")
    if label is not None:
        shapes["addition_embed_type"] = "text_time"
        shapes["projection_class_embeddings_input_dim"] = int(label.shape[1])
    return shapes


def _text_l_shapes(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    p = CLIP_L_PREFIX + (lk.TEXT_MODEL if any(k.startswith(CLIP_L_PREFIX + lk.TEXT_MODEL) for k in sd) else "")
    tokens = need_tensor(sd, p + "embeddings.token_embedding.weight")
    return {
        "vocab_size": int(tokens.shape[0]),
        "hidden_size": int(tokens.shape[1]),
        "max_position_embeddings": int(need_tensor(sd, p + "embeddings.position_embedding.weight").shape[0]),
        "num_hidden_layers": len(lk.key_indices(sd, p + "encoder.layers.")),
        "intermediate_size": int(need_tensor(sd, p + "encoder.layers.0.mlp.fc1.weight").shape[0]),
    }


def _text_g_shapes(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    p = CLIP_G_PREFIX
    tokens = need_tensor(sd, p + "token_embedding.weight")
    return {
        "vocab_size": int(tokens.shape[0]),
        "hidden_size": int(tokens.shape[1]),
        "max_position_embeddings": int(need_tensor(sd, p + "positional_embedding").shape[0]),
        "num_hidden_layers": _clip_g_layers(sd),
        "intermediate_size": int(need_tensor(sd, p + "transformer.resblocks.0.mlp.c_fc.weight").shape[0]),
        "projection_dim": int(need_tensor(sd, p + _PROJECTION).shape[1]),
    }


def infer_configs(
    state_dict: Mapping[str, Tensor], *, prediction_type: str, metadata: Mapping[str, str] | None
) -> ModelConfigs:
    """The component configs of an SGM-layout file: tensor shapes first, then our metadata, then SDXL's rules
    (64-wide heads everywhere, 32 GroupNorm groups), then the SDXL base 1.0 configs in ``assets/configs/sdxl``."""
    ref = reference_configs("sdxl")
    meta = metadata_configs(metadata)

    unet_shapes = _unet_shapes(state_dict)
    widths = unet_shapes["block_out_channels"]
    unet_guesses: dict[str, Any] = {
        "norm_num_groups": norm_groups(widths),
        "attention_head_dim": [max(1, w // 64) for w in widths],
    }
    pooled = int(need_tensor(state_dict, CLIP_G_PREFIX + _PROJECTION).shape[1])
    if "projection_class_embeddings_input_dim" in unet_shapes:
        # The added conditioning is the pooled text (projection width) and six Fourier-embedded size numbers.
        unet_guesses["addition_time_embed_dim"] = (unet_shapes["projection_class_embeddings_input_dim"] - pooled) // 6
    unet = {**ref["unet"], **unet_guesses, **meta.get("unet", {}), **unet_shapes}

    vae_shapes = infer_vae_shapes(state_dict)
    vae_guesses = {"norm_num_groups": norm_groups(vae_shapes["block_out_channels"])}
    vae = {**ref["vae"], **vae_guesses, **meta.get("vae", {}), **vae_shapes}

    text_shapes = _text_l_shapes(state_dict)
    text_guesses = {"num_attention_heads": max(1, text_shapes["hidden_size"] // 64), "projection_dim": text_shapes["hidden_size"]}
    text = {**ref["text_encoder"], **text_guesses, **meta.get("text_encoder", {}), **text_shapes}

    text2_shapes = _text_g_shapes(state_dict)
    text2_guesses = {"num_attention_heads": max(1, text2_shapes["hidden_size"] // 64)}
    text2 = {**ref["text_encoder_2"], **text2_guesses, **meta.get("text_encoder_2", {}), **text2_shapes}

    scheduler = {**ref["scheduler"], **meta.get("scheduler", {}), "prediction_type": prediction_type}
    return ModelConfigs(
        unet=copy.deepcopy(unet),
        vae=copy.deepcopy(vae),
        text_encoder=copy.deepcopy(text),
        scheduler=copy.deepcopy(scheduler),
        family="sdxl",
        prediction_type=prediction_type,
        text_encoder_2=copy.deepcopy(text2),
    )
