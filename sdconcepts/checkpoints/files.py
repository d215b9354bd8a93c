"""A1111-style single-file Stable Diffusion checkpoints (the original LDM/CompVis key layout), SD 1.x, SD 2.x and
SDXL (SGM layout).

This module owns the file format: reading `.safetensors`/`.ckpt` without unrestricted unpickling, telling the model
family and prediction type apart, inferring model configs from tensor shapes, and converting whole files between the
LDM layout and diffusers' layout in both directions. The key maps live by family beside it: `layout` (UNet, VAE,
OpenCLIP tower: shared), `sd` (SD 1.x/2.x text encoders), `sdxl`; the reference configs and shape readers in
`configs`. Pure core: torch,
safetensors and the standard library only; building models from the result is `sdconcepts.backends.single_file`.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdconcepts.atomic_files import atomic_path
from sdconcepts.checkpoints import sd, sdxl
from sdconcepts.checkpoints.configs import (
    FAMILIES,
    METADATA_CONFIGS,
    ModelConfigs,
    infer_unet_shapes,
    infer_vae_shapes,
    metadata_configs,
    need_tensor,
    norm_groups,
    reference_configs,
)
from sdconcepts.checkpoints.layout import (
    UNET_PREFIX,
    CheckpointError,
    StateDict,
    Tensor,
    key_indices,
    match_text_encoder_keys,
)
from sdconcepts.checkpoints.sd import SD1_TEXT_PREFIX, SD2_TEXT_PREFIX, sd1_text_prefix
from sdconcepts.safe_load import UnsafeFileError, load_torch_file

__all__ = [
    "CheckpointError",
    "detect_family",
    "detect_prediction_type",
    "diffusers_to_ldm",
    "explicit_prediction_type",
    "infer_configs",
    "is_our_sidecar",
    "ldm_config_yaml",
    "ldm_to_diffusers",
    "make_metadata",
    "match_text_encoder_keys",
    "read_checkpoint",
    "read_checkpoint_with_metadata",
    "sidecar_yaml_path",
    "split_checkpoint",
    "text_encoders_to_ldm",
    "write_checkpoint",
]

SDXL_PREFIX = "conditioner.embedders."
PREDICTION_TYPES = ("epsilon", "v_prediction")

# Our own record of the configs, so that hyperparameters no tensor shape reveals (attention heads, GroupNorm
# groups) survive a round trip: safetensors header metadata, or a top-level entry beside "state_dict" in a .ckpt.
# A1111 and diffusers ignore both.
METADATA_FAMILY = "sdconcepts.family"
METADATA_PREDICTION = "sdconcepts.prediction_type"
CKPT_METADATA_KEY = "sdconcepts_metadata"
SIDECAR_MARKER = "# written by sdconcepts"

_TORCH_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin"})

# A1111 reads `parameterization: "v"` from the LDM config YAML beside the checkpoint (modules/sd_models_config.py).
_V_PARAMETERIZATION = re.compile(r"""^\s*parameterization\s*:\s*["']?v["']?\s*(?:#.*)?$""", re.MULTILINE)

# Non-tensor globals that Lightning-era .ckpt files pickle beside their weights (training-callback state keyed by
# the callback class, numpy scalars of logged metrics). The same set A1111's restricted unpickler accepts. They are
# replaced by an inert stand-in: their values are never used, and nothing from those libraries is imported or run.


# --------------------------------------------------------------------------------------------------------- reading


def read_checkpoint(path: str | os.PathLike[str]) -> StateDict:
    """Return the tensors of a single-file SD 1.x/2.x checkpoint (`.safetensors`, `.ckpt`, `.pt`, `.pth`, `.bin`)."""
    return read_checkpoint_with_metadata(path)[0]


def read_checkpoint_with_metadata(path: str | os.PathLike[str]) -> tuple[StateDict, dict[str, str]]:
    """Return ``(state_dict, metadata)``: the tensors and the string metadata (safetensors header, or our entry).

    Raises CheckpointError naming the file for anything that is not a SD 1.x/2.x checkpoint.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: not a file")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        state_dict, metadata = _read_safetensors(p)
    elif suffix in _TORCH_SUFFIXES:
        state_dict, metadata = _unwrap(p, _torch_load(p))
    else:
        raise CheckpointError(f"{p}: unsupported file type {suffix or '(none)'}; expected .safetensors or .ckpt")
    if not state_dict:
        raise CheckpointError(f"{p}: holds no tensors")
    if not any(k.startswith(UNET_PREFIX) for k in state_dict):
        raise CheckpointError(f"{p}: no UNet weights ({UNET_PREFIX}*); not a Stable Diffusion checkpoint")
    try:
        detect_family(state_dict)
    except CheckpointError as exc:
        raise CheckpointError(f"{p}: {exc}") from None
    return state_dict, metadata


def _read_safetensors(p: Path) -> tuple[StateDict, dict[str, str]]:
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            return {k: f.get_tensor(k) for k in f.keys()}, metadata
    except Exception as exc:  # safetensors raises its own error types for bad headers and truncated files
        raise CheckpointError(f"{p}: not a readable safetensors file ({_first_line(exc)})") from None


def _torch_load(p: Path) -> object:
    # Never full unpickling: the shared restricted loader refuses anything but tensors and known-harmless objects.
    try:
        return load_torch_file(p)
    except UnsafeFileError as exc:
        raise CheckpointError(str(exc).replace("torch file", "checkpoint")) from None


def _unwrap(p: Path, obj: object) -> tuple[StateDict, dict[str, str]]:
    metadata: dict[str, str] = {}
    if isinstance(obj, dict):
        raw = obj.get(CKPT_METADATA_KEY)
        if isinstance(raw, dict):
            metadata = {str(k): v for k, v in raw.items() if isinstance(v, str)}
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p}: holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}, metadata


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


# ------------------------------------------------------------------------------------------------------- detection


def detect_family(state_dict: Mapping[str, Tensor]) -> str:
    """Return ``"sd1"`` (CLIP ViT-L, HF key names), ``"sd2"`` (OpenCLIP ViT-H) or ``"sdxl"`` (CLIP ViT-L and
    OpenCLIP ViT-bigG under ``conditioner.embedders.*``) from the text-encoder keys."""
    sd1 = sd2 = False
    for k in state_dict:
        if k.startswith(SDXL_PREFIX):
            sdxl.check_layout(state_dict)
            return "sdxl"
        if k.startswith(SD2_TEXT_PREFIX + "transformer.resblocks."):
            sd2 = True
        elif k.startswith(SD1_TEXT_PREFIX):
            sd1 = True
    if sd2:
        return "sd2"
    if sd1:
        return "sd1"
    raise CheckpointError(
        f"unknown model family: no text encoder keys ({SD1_TEXT_PREFIX}* for SD 1.x, "
        f"{SD2_TEXT_PREFIX}transformer.* for SD 2.x)"
    )


def sidecar_yaml_path(path: str | os.PathLike[str]) -> Path:
    """The A1111 config YAML beside a checkpoint: same folder and stem, `.yaml`."""
    return Path(path).with_suffix(".yaml")


def explicit_prediction_type(
    path: str | os.PathLike[str] | None, state_dict: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> str | None:
    """The prediction type a checkpoint states, or None when it states none.

    In order: an A1111 sidecar YAML (it *is* the model config there, so without ``parameterization: "v"`` it means
    epsilon), a ``v_pred`` marker key (ComfyUI's convention), our own metadata.
    """
    if path is not None:
        yaml = sidecar_yaml_path(path)
        if yaml.is_file():
            text = yaml.read_text(encoding="utf-8", errors="replace")
            return "v_prediction" if _V_PARAMETERIZATION.search(text) else "epsilon"
    if "v_pred" in state_dict:
        return "v_prediction"
    stated = (metadata or {}).get(METADATA_PREDICTION)
    return stated if stated in PREDICTION_TYPES else None


def detect_prediction_type(
    path: str | os.PathLike[str] | None, state_dict: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> str:
    """Return ``"epsilon"`` or ``"v_prediction"``; see explicit_prediction_type, else epsilon for SD1 and SD2.

    A file that states nothing defaults to epsilon. For SD2, A1111 instead runs the UNet once on a constant input at
    t=999 and calls it v-prediction when the mean of (output - input) is below -1; that probe needs a built UNet and
    lives in the backend (`sdconcepts.backends.single_file.probe_v_prediction`).
    """
    return explicit_prediction_type(path, state_dict, metadata) or "epsilon"


# --------------------------------------------------------------------------------------------------- conversion


def split_checkpoint(
    state_dict: Mapping[str, Tensor], configs: ModelConfigs | None = None
) -> tuple[dict[str, StateDict], StateDict]:
    """Return ``(components, leftovers)``: diffusers-layout state dicts for "unet", "vae", "text_encoder", and
    every tensor no component uses (schedule buffers, EMA copies, SD2's unused last text layer, ...); SDXL adds
    "text_encoder_2" (CLIPTextModelWithProjection keys).

    Text-encoder keys come in the transformers-4 form (``text_model.`` prefix); see match_text_encoder_keys.
    """
    family = configs.family if configs is not None else detect_family(state_dict)
    if family == "sdxl":
        return sdxl.split_checkpoint(state_dict)
    return sd.split_checkpoint(state_dict, family)


def ldm_to_diffusers(state_dict: Mapping[str, Tensor], configs: ModelConfigs | None = None) -> dict[str, StateDict]:
    """Split an LDM-layout state dict into diffusers-layout "unet", "vae" and "text_encoder" state dicts."""
    return split_checkpoint(state_dict, configs)[0]


def diffusers_to_ldm(
    unet_sd: Mapping[str, Tensor],
    vae_sd: Mapping[str, Tensor],
    text_encoder_sd: Mapping[str, Tensor],
    family: str,
    *,
    extra: Mapping[str, Tensor] | None = None,
    text_encoder_2_sd: Mapping[str, Tensor] | None = None,
) -> StateDict:
    """Join diffusers-layout state dicts into one LDM-layout state dict, as A1111 single files hold them.

    `text_encoder_sd` may use either CLIPTextModel key form. `extra` tensors (leftovers of a file this model was
    read from) are written too; they also supply SD2's unused last text layer, which is otherwise zeros, and the
    SD1 ``position_ids`` buffer, which is otherwise 0..n-1 as in real files. SDXL needs `text_encoder_2_sd` too.
    """
    if family not in FAMILIES:
        raise CheckpointError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    if family == "sdxl":
        if text_encoder_2_sd is None:
            raise CheckpointError("an SDXL checkpoint needs both text encoders")
        return sdxl.join_checkpoint(unet_sd, vae_sd, text_encoder_sd, text_encoder_2_sd, extra=extra)
    return sd.join_checkpoint(unet_sd, vae_sd, text_encoder_sd, family, extra=extra)


def text_encoders_to_ldm(text_encoders: Sequence[Mapping[str, Tensor]], family: str) -> tuple[StateDict, StateDict]:
    """The LDM/SGM keys of a model's text encoders given as CLIPTextModel state dicts (SDXL: CLIP-L, then
    CLIPTextModelWithProjection's OpenCLIP-G), and the placeholders a file carries beside them.

    OpenCLIP's fused q/k/v (SD2, SDXL's second encoder) are new tensors: where only names and shapes matter (config
    inference for a model someone else holds) pass meta tensors.
    """
    if family not in FAMILIES:
        raise CheckpointError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    wanted = 2 if family == "sdxl" else 1
    if len(text_encoders) != wanted:
        raise CheckpointError(f"a {family} model has {wanted} text encoder(s), not {len(text_encoders)}")
    if family == "sdxl":
        return sdxl.join_text(text_encoders[0], text_encoders[1])
    return sd.join_text(text_encoders[0], family)


# ------------------------------------------------------------------------------------------------ config inference


def _unet_guesses(shapes: Mapping[str, Any], family: str, prediction_type: str) -> dict[str, Any]:
    widths = shapes["block_out_channels"]
    guesses: dict[str, Any] = {"norm_num_groups": norm_groups(widths)}
    if family == "sd2":
        # SD2's LDM config fixes the head width (num_head_channels: 64), so the head count follows the width.
        guesses["attention_head_dim"] = [max(1, w // 64) for w in widths]
        guesses["sample_size"] = 96 if prediction_type == "v_prediction" else 64
    return guesses


def _text_shapes(sd: Mapping[str, Tensor], family: str) -> dict[str, Any]:
    if family == "sd1":
        p = sd1_text_prefix(sd)
        tokens = need_tensor(sd, p + "embeddings.token_embedding.weight")
        positions = need_tensor(sd, p + "embeddings.position_embedding.weight")
        layers = len(key_indices(sd, p + "encoder.layers."))
        fc1 = need_tensor(sd, p + "encoder.layers.0.mlp.fc1.weight")
    else:
        p = SD2_TEXT_PREFIX
        tokens = need_tensor(sd, p + "token_embedding.weight")
        positions = need_tensor(sd, p + "positional_embedding")
        layers = len(key_indices(sd, p + "transformer.resblocks.")) - 1
        fc1 = need_tensor(sd, p + "transformer.resblocks.0.mlp.c_fc.weight")
    return {
        "vocab_size": int(tokens.shape[0]),
        "hidden_size": int(tokens.shape[1]),
        "max_position_embeddings": int(positions.shape[0]),
        "num_hidden_layers": layers,
        "intermediate_size": int(fc1.shape[0]),
    }


def _text_guesses(shapes: Mapping[str, Any], family: str) -> dict[str, Any]:
    hidden = int(shapes["hidden_size"])
    # Both CLIP ViT-L (SD1) and OpenCLIP ViT-H (SD2) use 64-wide heads.
    guesses: dict[str, Any] = {"num_attention_heads": max(1, hidden // 64)}
    if family == "sd1":
        guesses["projection_dim"] = hidden
    return guesses


def infer_configs(
    state_dict: Mapping[str, Tensor],
    *,
    prediction_type: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> ModelConfigs:
    """Infer the component configs of an LDM-layout checkpoint.

    Each value comes from, strongest first: the tensor shapes and key counts (widths, block and layer counts,
    cross-attention width, projection kind, text-encoder sizes); our own metadata in the file (heads, GroupNorm
    groups: what shapes cannot tell); family rules (SD2 heads are 64 wide; 32 GroupNorm groups); the reference
    SD 1.5 / SD 2.1 configs in ``assets/configs``. `prediction_type` defaults to what the state dict and
    metadata state (see explicit_prediction_type), else epsilon.
    """
    family = detect_family(state_dict)
    if prediction_type is None:
        prediction_type = explicit_prediction_type(None, state_dict, metadata) or "epsilon"
    if prediction_type not in PREDICTION_TYPES:
        raise CheckpointError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
    if family == "sdxl":
        return sdxl.infer_configs(state_dict, prediction_type=prediction_type, metadata=metadata)
    ref = reference_configs(family)
    meta = metadata_configs(metadata)

    unet_shapes = infer_unet_shapes(state_dict)
    unet = {**ref["unet"], **_unet_guesses(unet_shapes, family, prediction_type), **meta.get("unet", {}), **unet_shapes}

    vae_shapes = infer_vae_shapes(state_dict)
    vae_guesses: dict[str, Any] = {"norm_num_groups": norm_groups(vae_shapes["block_out_channels"])}
    if family == "sd2":
        vae_guesses["sample_size"] = 768 if prediction_type == "v_prediction" else 512
    vae = {**ref["vae"], **vae_guesses, **meta.get("vae", {}), **vae_shapes}

    text_shapes = _text_shapes(state_dict, family)
    text = {**ref["text_encoder"], **_text_guesses(text_shapes, family), **meta.get("text_encoder", {}), **text_shapes}

    scheduler = {**ref["scheduler"], **meta.get("scheduler", {}), "prediction_type": prediction_type}
    return ModelConfigs(
        unet=copy.deepcopy(unet),
        vae=copy.deepcopy(vae),
        text_encoder=copy.deepcopy(text),
        scheduler=copy.deepcopy(scheduler),
        family=family,
        prediction_type=prediction_type,
    )


# --------------------------------------------------------------------------------------------------------- writing


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def make_metadata(configs: Mapping[str, Mapping[str, Any]], *, family: str, prediction_type: str) -> dict[str, str]:
    """The string metadata written into a checkpoint: component configs (private ``_`` keys dropped) and facts."""
    cleaned = {
        name: {k: _jsonable(v) for k, v in cfg.items() if not str(k).startswith("_")} for name, cfg in configs.items()
    }
    return {
        "format": "pt",
        METADATA_CONFIGS: json.dumps(cleaned, sort_keys=True),
        METADATA_FAMILY: family,
        METADATA_PREDICTION: prediction_type,
    }


def write_checkpoint(
    path: str | os.PathLike[str], state_dict: Mapping[str, Tensor], *, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write `state_dict` to `.safetensors`, or to `.ckpt`/`.pt` as ``{"state_dict": ...}`` (A1111's layout).

    The file is written beside the target and then moved into place, so a reader never sees half a file and a
    model still backed by the old file is not disturbed.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix != ".safetensors" and suffix not in _TORCH_SUFFIXES:
        raise CheckpointError(f"{p}: unsupported file type {suffix or '(none)'}; expected .safetensors or .ckpt")
    # atomic_path: the mode a plain open() would give (the umask's), a short temporary name.
    with atomic_path(p) as tmp:
        if suffix == ".safetensors":
            # safetensors refuses views sharing storage (q/k/v chunks) and non-contiguous tensors.
            tensors = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
            save_file(tensors, str(tmp), metadata=dict(metadata or {}))
        else:
            payload: dict[str, object] = {"state_dict": {k: v.detach().clone() for k, v in state_dict.items()}}
            if metadata:
                payload[CKPT_METADATA_KEY] = dict(metadata)
            torch.save(payload, tmp)
    return p


def ldm_config_yaml(configs: ModelConfigs) -> str:
    """The LDM inference config A1111 reads from a sidecar `.yaml` (it replaces A1111's own guess entirely).

    Mirrors the released v1-inference.yaml / v2-inference-v.yaml with this model's sizes. Sizes that LDM's config
    cannot express (GroupNorm groups other than 32, VAE widths that are not multiples of the first) only matter to
    A1111 itself; the `parameterization` line is what every reader here uses.
    """
    unet, vae, text = configs.unet, configs.vae, configs.text_encoder
    widths = [int(w) for w in unet["block_out_channels"]]
    base = widths[0]
    attn_res = [2**i for i, t in enumerate(unet["down_block_types"]) if str(t).startswith("CrossAttn")]
    heads = unet.get("num_attention_heads") or unet["attention_head_dim"]
    if isinstance(heads, (list, tuple)) and len({w // h for w, h in zip(widths, heads, strict=False)}) == 1:
        head_line = f"num_head_channels: {widths[0] // heads[0]}"
    else:
        head_line = f"num_heads: {heads[0] if isinstance(heads, (list, tuple)) else heads}"
    vae_widths = [int(w) for w in vae["block_out_channels"]]
    v_base = vae_widths[0]
    sd2 = configs.family == "sd2"
    cond = (
        "target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder\n      params:\n        freeze: True\n"
        '        layer: "penultimate"'
        if sd2
        else "target: ldm.modules.encoders.modules.FrozenCLIPEmbedder"
    )
    parameterization = '    parameterization: "v"\n' if configs.prediction_type == "v_prediction" else ""
    image_size = int(unet.get("sample_size") or 64)

    def ints(values: Iterable[int]) -> str:
        return "[" + ", ".join(str(v) for v in values) + "]"

    return f"""{SIDECAR_MARKER} ({configs.family}, {configs.prediction_type})
model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
{parameterization}    linear_start: {configs.scheduler.get("beta_start", 0.00085)}
    linear_end: {configs.scheduler.get("beta_end", 0.012)}
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: {configs.scheduler.get("num_train_timesteps", 1000)}
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: {image_size}
    channels: {unet["in_channels"]}
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: {vae.get("scaling_factor", 0.18215)}
    use_ema: False

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: True
        image_size: 32
        in_channels: {unet["in_channels"]}
        out_channels: {unet["out_channels"]}
        model_channels: {base}
        attention_resolutions: {ints(sorted(attn_res, reverse=True))}
        num_res_blocks: {unet["layers_per_block"]}
        channel_mult: {ints(w // base for w in widths)}
        {head_line}
        use_spatial_transformer: True
        use_linear_in_transformer: {bool(unet.get("use_linear_projection"))}
        transformer_depth: {unet.get("transformer_layers_per_block", 1)}
        context_dim: {unet.get("cross_attention_dim", text["hidden_size"])}
        legacy: False

    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: {vae["latent_channels"]}
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: {vae["latent_channels"]}
          resolution: 256
          in_channels: {vae["in_channels"]}
          out_ch: {vae["out_channels"]}
          ch: {v_base}
          ch_mult: {ints(w // v_base for w in vae_widths)}
          num_res_blocks: {vae["layers_per_block"]}
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity

    cond_stage_config:
      {cond}
"""


def is_our_sidecar(path: str | os.PathLike[str]) -> bool:
    """Whether the sidecar YAML of `path` exists and was written by this module (safe to replace or remove)."""
    yaml = sidecar_yaml_path(path)
    if not yaml.is_file():
        return False
    with yaml.open("r", encoding="utf-8", errors="replace") as f:
        return f.readline().startswith(SIDECAR_MARKER)
