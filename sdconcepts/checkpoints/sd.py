"""SD 1.x and SD 2.x single files: their text-encoder key maps (CLIP ViT-L under ``cond_stage_model.transformer``,
OpenCLIP ViT-H under ``cond_stage_model.model``) and whole-file splitting and joining. Pure core: torch only.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sdconcepts.checkpoints.layout import (
    TEXT_MODEL,
    UNET_PREFIX,
    VAE_PREFIX,
    CheckpointError,
    StateDict,
    Tensor,
    diffusers_unet_layout,
    hf_to_openclip,
    join_vae,
    key_indices,
    ldm_unet_layout,
    openclip_to_hf,
    rename_keys,
    split_vae,
    strip_text_model,
    unet_modules,
)

SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."


def sd1_text_prefix(sd: Mapping[str, Tensor]) -> str:
    # Some older SD1 files lack the "text_model." level (A1111 rewrites them the same way on load).
    with_level = SD1_TEXT_PREFIX + TEXT_MODEL
    return with_level if any(k.startswith(with_level) for k in sd) else SD1_TEXT_PREFIX


def _sd1_text_to_hf(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], set[str]]:
    prefix = sd1_text_prefix(sd)
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for key, value in sd.items():
        if key.startswith(prefix) and not key.endswith("embeddings.position_ids"):
            out[TEXT_MODEL + key[len(prefix) :]] = value
            used.add(key)
    return out, used


def _sd2_text_to_hf(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], set[str]]:
    blocks = key_indices(sd, SD2_TEXT_PREFIX + "transformer.resblocks.")
    # SD2 conditions on the penultimate layer: diffusers' text encoder stops one resblock short of the file.
    layers = len(blocks) - 1
    if layers < 1 or max(blocks) != layers:
        raise CheckpointError("SD2 text encoder needs at least two consecutive transformer.resblocks.*")
    return openclip_to_hf(sd, SD2_TEXT_PREFIX, layers, what="SD2")


def _hf_text_to_sd1(te: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {SD1_TEXT_PREFIX + TEXT_MODEL + k: v for k, v in te.items() if not k.endswith("position_ids")}


def _hf_text_to_sd2(te: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return hf_to_openclip(te, SD2_TEXT_PREFIX)


def _sd2_unused_last_layer(ldm: Mapping[str, Tensor], layers: int) -> dict[str, Tensor]:
    """The last OpenCLIP resblock, which SD2 never runs (it reads the penultimate layer), as all zeros.

    Real files hold OpenCLIP's trained weights there. Zeros make it an exact identity (both residual branches
    output 0), so a tool that does run every layer sees the penultimate hidden states, and the file keeps the
    layer count that SD2 loaders expect.
    """
    src = f"{SD2_TEXT_PREFIX}transformer.resblocks.0."
    dst = f"{SD2_TEXT_PREFIX}transformer.resblocks.{layers}."
    return {dst + k[len(src) :]: torch.zeros_like(v) for k, v in ldm.items() if k.startswith(src)}


def split_checkpoint(state_dict: Mapping[str, Tensor], family: str) -> tuple[dict[str, StateDict], StateDict]:
    """Diffusers-layout "unet", "vae", "text_encoder" state dicts of a SD 1.x (``sd1``) or 2.x (``sd2``) file, and
    every tensor no component uses (schedule buffers, EMA copies, SD2's unused last text layer, ...)."""
    unet_layout = ldm_unet_layout(state_dict)
    unet = rename_keys(state_dict, UNET_PREFIX, unet_modules(unet_layout), to_diffusers=True, what="UNet")
    vae, vae_sd = split_vae(state_dict)
    if family == "sd1":
        text, text_used = _sd1_text_to_hf(state_dict)
    else:
        text, text_used = _sd2_text_to_hf(state_dict)
    leftovers = {
        k: v
        for k, v in state_dict.items()
        if not (k.startswith(UNET_PREFIX) or (k.startswith(VAE_PREFIX) and k in vae_sd) or k in text_used)
    }
    return {"unet": unet, "vae": vae, "text_encoder": text}, leftovers


def join_text(text_encoder_sd: Mapping[str, Tensor], family: str) -> tuple[StateDict, StateDict]:
    """The LDM-layout keys of a CLIPTextModel state dict (either key form) of a SD 1.x/2.x model, and the
    placeholders a file carries beside them (SD1's ``position_ids``, SD2's unused last layer, all zeros).

    SD2's q/k/v are fused into OpenCLIP's ``in_proj`` (a new tensor): call it on meta tensors where only the
    shapes matter."""
    te = strip_text_model(text_encoder_sd)
    placeholders: StateDict = {}
    if family == "sd1":
        table = te.get("embeddings.position_embedding.weight")
        if table is not None:
            ids = torch.arange(table.shape[0], dtype=torch.int64, device=table.device).unsqueeze(0)
            placeholders[SD1_TEXT_PREFIX + TEXT_MODEL + "embeddings.position_ids"] = ids
        return _hf_text_to_sd1(te), placeholders
    text = _hf_text_to_sd2(te)
    return text, _sd2_unused_last_layer(text, len(key_indices(te, "encoder.layers.")))


def join_checkpoint(
    unet_sd: Mapping[str, Tensor],
    vae_sd: Mapping[str, Tensor],
    text_encoder_sd: Mapping[str, Tensor],
    family: str,
    *,
    extra: Mapping[str, Tensor] | None = None,
) -> StateDict:
    """One LDM-layout state dict of a SD 1.x/2.x model; see `sdconcepts.checkpoints.files.diffusers_to_ldm`."""
    unet = rename_keys(unet_sd, "", unet_modules(diffusers_unet_layout(unet_sd)), to_diffusers=False, what="UNet")
    vae = join_vae(vae_sd)
    text, placeholders = join_text(text_encoder_sd, family)
    # Converted weights win over leftovers; leftovers win only over the placeholders made up here.
    out: StateDict = {**placeholders, **(extra or {})}
    out.update({UNET_PREFIX + k: v for k, v in unet.items()})
    out.update({VAE_PREFIX + k: v for k, v in vae.items()})
    out.update(text)
    return out
