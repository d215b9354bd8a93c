"""The host's loaded model seen as the state dicts ``model_sharing_weights`` reads: key names only, no tensor copied.

A1111 holds its whole model in the LDM/SGM layout of the file (``shared.sd_model``); Forge holds its UNet and VAE in
that layout too but its text encoders as transformers ``CLIPTextModel`` objects, converted when the file was loaded
(q/k/v apart; SD2's OpenCLIP-H already cut to the 23 layers SD2 reads). These functions take the host's objects
(no ``modules.*``/``backend.*`` import), so that they can be checked against the hosts' own classes.

Facts of Forge used here (stable-diffusion-webui-forge, backend/): every CLIP is an ``IntegratedCLIP`` whose
``transformer`` is a ``CLIPTextModel`` with an added ``text_projection`` Linear (nn/clip.py); it is loaded only where
the file has one (loader.py ignores its absence), and only SDXL's OpenCLIP-G uses it, as OpenCLIP's projection
transposed into nn.Linear's layout (huggingface_guess utils.clip_text_transformers_convert). The text engines of
SD 1.x/2.x read the last layer with the final layer norm, SDXL's both encoders the penultimate without it
(diffusion_engine/sd15.py, sd20.py, sdxl.py): the same meanings as our sd1/sd2/sdxl text encoders.

The old-Forge forks (reForge, Forge-Classic: ``ldm_patched``) hold the same ``forge_objects``: each text encoder an
``SDClipModel`` whose ``transformer`` is a ``CLIPTextModel`` (clip_l / clip_h / clip_l + clip_g), with OpenCLIP-G's
projection as a Parameter beside it; the UNet's prediction type is its ``model_type`` enum.
"""

from __future__ import annotations

import re
from typing import Any

import torch

__all__ = [
    "HostWeights",
    "UnsupportedHostModel",
    "a1111_weights",
    "forge_family",
    "forge_prediction",
    "forge_weights",
    "plain_key",
]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# A1111 and Forge wrap the token embedding (and A1111 the whole text encoder) in modules whose child is "wrapped".
_WRAPPED = re.compile(r"(^|\.)wrapped\.")
# Forge's text encoder names by family (JointTextEncoder's children); anything else is not supported.
_FORGE_FAMILIES = {("clip_l",): "sd1", ("clip_h",): "sd2", ("clip_g", "clip_l"): "sdxl"}

# (LDM/SGM-layout state dict, text encoders in transformers layout or None, family or None)
HostWeights = tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]] | None, str | None]


class UnsupportedHostModel(ValueError):
    """The host's model is of a kind our tab cannot train on; one sentence for the user."""


def plain_key(key: str) -> str:
    while _WRAPPED.search(key):
        key = _WRAPPED.sub(r"\1", key, count=1)
    return key


def a1111_weights(model: Any) -> HostWeights:
    """A1111's ``shared.sd_model`` (LDM for SD 1.x/2.x, SGM for SDXL) as one LDM/SGM-layout state dict."""
    state = {plain_key(k): v for k, v in model.state_dict().items()}
    if getattr(model, "conditioner", None) is not None:
        # SDXL: A1111 also registers the conditioner as cond_stage_model (sd_hijack.py): the same tensors twice.
        state = {k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}
    return state, None, None


def forge_family(clip: Any) -> str:
    """The family of Forge's ``forge_objects.clip.cond_stage_model`` from its text encoders' names."""
    names = tuple(sorted(name for name, _ in clip.named_children())) if clip is not None else ()
    family = _FORGE_FAMILIES.get(names)
    if family is None:
        kind = "SDXL refiner" if names == ("clip_g",) else "Flux/SD3" if "t5xxl" in names else "not SD 1.x, 2.x or XL"
        raise UnsupportedHostModel(
            f"the web UI's model ({kind}: text encoders {', '.join(names) or 'none'}) is not supported; "
            "training on it in Forge supports SD 1.x, SD 2.x and SDXL"
        )
    return family


def forge_weights(objects: Any) -> HostWeights:
    """Forge's ``forge_objects``: UNet and VAE under LDM keys, text encoders as their CLIPTextModels' state dicts
    (SDXL: CLIP-L, then OpenCLIP-G with its projection). Forge's memory manager must have loaded them first."""
    clip = getattr(objects.clip, "cond_stage_model", None)
    family = forge_family(clip)
    state: dict[str, torch.Tensor] = {}
    state.update({UNET_PREFIX + k: v for k, v in objects.unet.model.diffusion_model.state_dict().items()})
    state.update({VAE_PREFIX + k: v for k, v in objects.vae.first_stage_model.state_dict().items()})
    order = ("clip_l", "clip_g") if family == "sdxl" else (("clip_h",) if family == "sd2" else ("clip_l",))
    encoders = []
    for name in order:
        weights = {plain_key(k): v for k, v in getattr(clip, name).transformer.state_dict().items()}
        if name != "clip_g":
            # IntegratedCLIP's added projection: never loaded for CLIP-L, unused for SD2; no CLIPTextModel weight.
            weights.pop("text_projection.weight", None)
        elif "text_projection.weight" not in weights:
            # Old Forge (reForge, Forge-Classic): ldm_patched's SDClipModel holds OpenCLIP's projection as a
            # Parameter beside its transformer, applied as ``pooled @ P``; nn.Linear's layout is its transpose (a view).
            projection = getattr(getattr(clip, name), "text_projection", None)
            if isinstance(projection, torch.Tensor):
                weights["text_projection.weight"] = projection.t()
        encoders.append(weights)
    return state, encoders, family


def forge_prediction(objects: Any) -> str:
    """``epsilon`` or ``v_prediction``: Forge names it on the UNet's ``predictor``; old Forge (ldm_patched) as the
    model's ``model_type`` enum (``EPS``, ``V_PREDICTION``)."""
    model = objects.unet.model
    predictor = getattr(model, "predictor", None)
    if predictor is not None:
        return str(getattr(predictor, "prediction_type", "epsilon"))
    model_type = getattr(getattr(model, "model_type", None), "name", "EPS")
    if model_type == "EPS":
        return "epsilon"
    if model_type == "V_PREDICTION":
        return "v_prediction"
    raise UnsupportedHostModel(
        f"the web UI's model predicts {model_type}; training on it supports epsilon and v-prediction models"
    )
