"""Build diffusers/transformers models from A1111-style single-file checkpoints, and write models back as one.

The file format (reading, key names, config inference) is `sdconcepts.checkpoints.files`; this module only turns
its plain state dicts and config dicts into UNet2DConditionModel, AutoencoderKL, CLIPTextModel and a scheduler.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdconcepts.backends.half_weights import compute_in_float32, half_on_cpu
from sdconcepts.backends.tokenizer import load_clip_tokenizer
from sdconcepts.checkpoints import files as cf
from sdconcepts.checkpoints.configs import ModelConfigs

log = logging.getLogger(__name__)

# CLIPTextConfig fields that shape the text encoder's outputs; the rest of its to_dict() is library bookkeeping.
_TEXT_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "projection_dim",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
    "attention_dropout",
    "initializer_range",
    "initializer_factor",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)


def load_single_file(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    probe_prediction: bool = True,
) -> dict[str, Any]:
    """Load an A1111-style SD 1.x/2.x/XL checkpoint into diffusers/transformers components.

    Returns ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler`` (DDIM, from the inferred scheduler
    config), ``family``, ``prediction_type``, ``configs`` (the ModelConfigs used) and ``extra`` (tensors of the file
    no component uses, EMA copies excepted; save_single_file writes them back). A SD2 file that states no
    prediction type is probed as A1111 does (`probe_v_prediction`) unless `probe_prediction` is False.
    SDXL adds ``text_encoder_2`` (CLIPTextModelWithProjection) and ``tokenizer_2`` (OpenCLIP's padding).
    Raises CheckpointError for a file that is not such a checkpoint or whose weights do not fit.
    """
    state_dict, metadata = cf.read_checkpoint_with_metadata(path)
    stated = cf.explicit_prediction_type(path, state_dict, metadata)
    configs = cf.infer_configs(state_dict, prediction_type=stated or "epsilon", metadata=metadata)
    parts, leftovers = cf.split_checkpoint(state_dict, configs)

    unet = _materialize(lambda: UNet2DConditionModel.from_config(configs.unet), parts["unet"], dtype, path, "UNet")
    if stated is None and configs.family == "sd2" and probe_prediction and configs.unet["in_channels"] == 4:
        if probe_v_prediction(unet):
            configs = cf.infer_configs(state_dict, prediction_type="v_prediction", metadata=metadata)
            unet.register_to_config(sample_size=configs.unet["sample_size"])
    del state_dict
    vae = _materialize(lambda: AutoencoderKL.from_config(configs.vae), parts["vae"], dtype, path, "VAE")
    text_encoder = _materialize(
        lambda: CLIPTextModel(CLIPTextConfig(**configs.text_encoder)),
        parts["text_encoder"],
        dtype,
        path,
        "text encoder",
    )
    sdxl: dict[str, Any] = {}
    if configs.family == "sdxl":
        assert configs.text_encoder_2 is not None  # infer_configs always sets it for SDXL
        text_config_2 = configs.text_encoder_2
        text_encoder_2 = _materialize(
            lambda: CLIPTextModelWithProjection(CLIPTextConfig(**text_config_2)),
            parts["text_encoder_2"],
            dtype,
            path,
            "second text encoder",
        )
        sdxl = {"text_encoder_2": text_encoder_2.to(device).eval(), "tokenizer_2": load_clip_tokenizer("sd2")}
    return {
        **sdxl,
        "unet": unet.to(device).eval(),
        "vae": vae.to(device).eval(),
        "text_encoder": text_encoder.to(device).eval(),
        "tokenizer": load_clip_tokenizer("sd1" if configs.family == "sdxl" else configs.family),
        "scheduler": DDIMScheduler.from_config(configs.scheduler),
        "family": configs.family,
        "prediction_type": configs.prediction_type,
        "configs": configs,
        "extra": {k: v for k, v in leftovers.items() if not k.startswith("model_ema.")},
    }


def _materialize(make: Any, state_dict: dict[str, torch.Tensor], dtype: torch.dtype, path: Any, what: str) -> Any:
    """Build a model without initialising weights (on the meta device), then take the checkpoint's tensors."""
    with torch.device("meta"):
        model = make()
    if isinstance(model, (CLIPTextModel, CLIPTextModelWithProjection)):
        state_dict = cf.match_text_encoder_keys(state_dict, model.state_dict().keys())
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())[:300]
        raise cf.CheckpointError(f"{path}: {what} weights do not fit the inferred config ({reason})") from None
    # Buffers the state dict does not carry (CLIP's non-persistent position_ids) are still on the meta device.
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if not buffer.is_meta:
                continue
            if name != "position_ids":
                raise cf.CheckpointError(f"{path}: {what} buffer {name} is not in the checkpoint")
            ids = torch.arange(buffer.shape[-1], dtype=buffer.dtype).expand(buffer.shape)
            setattr(module, name, ids)
    return own_weights(model)


def components_sharing_weights(
    state_dict: dict[str, torch.Tensor],
    *,
    text_encoders: Sequence[Mapping[str, torch.Tensor]] | None = None,
    family: str | None = None,
    prediction_type: str | None = None,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Build ``unet``, ``vae`` and the text encoder(s) over the tensors of a model held in memory, copying none.

    For a model someone else holds in memory (a web UI host's loaded checkpoint): every parameter of the returned
    modules is a new ``Parameter`` (``requires_grad`` False) over the same storage as the given tensor, so the host's
    own parameters keep their flags and no second copy of the weights exists. Nothing is converted (device,
    alignment; dtype only as `_alias` logs): the modules compute with the host's tensors as they are.

    `state_dict` is in LDM/SGM layout (SD 1.x/2.x/XL, as A1111 holds it; OpenCLIP's fused q/k/v are sliced into
    views). `text_encoders`, when given, are the text encoders already in transformers' CLIPTextModel layout (as
    Forge holds them; SDXL: CLIP-L, then OpenCLIP-G with ``text_projection.weight`` as nn.Linear stores it), and
    `state_dict` then needs only the UNet and VAE; `family` must be given for one encoder (two mean SDXL). Also
    returns ``tokenizer`` (and SDXL's ``text_encoder_2``, ``tokenizer_2``), ``scheduler_config``, ``family``,
    ``prediction_type`` and ``configs``. Raises CheckpointError when the weights are not SD 1.x/2.x/XL.
    """
    full: Mapping[str, torch.Tensor] = state_dict
    given: list[Mapping[str, torch.Tensor]] = []
    if text_encoders is not None:
        given = list(text_encoders)
        family = family or ("sdxl" if len(given) == 2 else None)
        if family is None:
            raise cf.CheckpointError("the model family (sd1 or sd2) is needed to read one text encoder")
        # Config inference and the UNet/VAE split read one LDM-layout state dict, as from a file: the encoders are
        # seen there under their LDM names as meta tensors (shapes only; nothing fused or copied).
        meta = [{k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in te.items()} for te in given]
        names, placeholders = cf.text_encoders_to_ldm(meta, family)
        full = {**placeholders, **state_dict, **names}
    configs = cf.infer_configs(full, prediction_type=prediction_type, metadata=metadata)
    if family is not None and configs.family != family:
        raise cf.CheckpointError(f"the weights are {configs.family}, not {family}")
    parts, _ = cf.split_checkpoint(full, configs)
    if given:
        parts["text_encoder"] = dict(given[0])
        if configs.family == "sdxl":
            parts["text_encoder_2"] = dict(given[1])
    unet = _alias(lambda: UNet2DConditionModel.from_config(configs.unet), parts["unet"], "UNet")
    vae = _alias(lambda: AutoencoderKL.from_config(configs.vae), parts["vae"], "VAE")
    text_encoder = _alias(lambda: CLIPTextModel(CLIPTextConfig(**configs.text_encoder)), parts["text_encoder"],
                          "text encoder")
    sdxl: dict[str, Any] = {}
    if configs.family == "sdxl":
        assert configs.text_encoder_2 is not None  # infer_configs always sets it for SDXL
        text_config_2 = configs.text_encoder_2
        text_encoder_2 = _alias(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**text_config_2)),
                                parts["text_encoder_2"], "second text encoder")
        sdxl = {"text_encoder_2": text_encoder_2, "tokenizer_2": load_clip_tokenizer("sd2")}
    return {
        **sdxl,
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": load_clip_tokenizer("sd1" if configs.family == "sdxl" else configs.family),
        "scheduler_config": dict(configs.scheduler),
        "family": configs.family,
        "prediction_type": configs.prediction_type,
        "configs": configs,
    }


def _plain_view(tensor: torch.Tensor) -> torch.Tensor:
    """A normal tensor over ``tensor``'s memory. Forge builds its model under ``torch.inference_mode()``, so its
    weights are inference tensors: autograd refuses to save them for backward (a gradient to our embedding passes
    through every layer) and a Parameter cannot wrap them. Inference-ness belongs to the tensor object, not to its
    storage: a fresh tensor set to the same storage computes normally, still without a copy."""
    if not tensor.is_inference():
        return tensor.detach()
    view = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    with torch.no_grad():
        view.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())
    return view


def _alias(make: Any, state_dict: dict[str, torch.Tensor], what: str) -> Any:
    with torch.device("meta"):
        model = make()
    text_encoder = isinstance(model, (CLIPTextModel, CLIPTextModelWithProjection))
    if text_encoder:
        state_dict = cf.match_text_encoder_keys(state_dict, model.state_dict().keys())
    # A view without the host's autograd flags; load_state_dict(assign=True) wraps it in a new Parameter.
    tensors = {k: _plain_view(v) for k, v in state_dict.items()}
    # Forge (and its forks) hold CLIP in float16 even on the CPU and compute it in float32, casting at every call:
    # so does our view (half_weights), keeping every tensor as the host holds it. Elsewhere one dtype per module:
    # Forge keeps CLIP's token and position tables in float32 beside fp16/bf16 layers (on a GPU); the dtype of most
    # tensors (the layers') wins and the others are converted, a copy of that much only (logged).
    cast_on_compute = text_encoder and half_on_cpu(tensors.values())
    sizes: dict[torch.dtype, int] = {}
    for value in tensors.values():
        if value.is_floating_point():
            sizes[value.dtype] = sizes.get(value.dtype, 0) + 1
    if len(sizes) > 1 and not cast_on_compute:
        main = max(sizes, key=lambda dtype: sizes[dtype])
        converted = [k for k, v in tensors.items() if v.is_floating_point() and v.dtype != main]
        for key in converted:
            tensors[key] = tensors[key].to(main)
        copied = sum(tensors[k].numel() * tensors[k].element_size() for k in converted)
        log.info("%s: %d tensors converted to %s (%.0f MB copied)", what, len(converted), main, copied / 2**20)
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())[:300]
        raise cf.CheckpointError(f"the loaded model's {what} weights do not fit the inferred config ({reason})") from None
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta and name == "position_ids":
                device = next(model.parameters()).device
                setattr(module, name, torch.arange(buffer.shape[-1], dtype=buffer.dtype, device=device).expand(buffer.shape))
            elif buffer.is_meta:
                raise cf.CheckpointError(f"the loaded model's {what} buffer {name} is missing")
    if cast_on_compute:
        layers = compute_in_float32(model)
        log.info("%s: half-precision weights on the CPU, computed in float32 (%d layers cast at each call)", what,
                 layers)
    model.eval()
    model.requires_grad_(False)
    return model


def own_weights(model: Any) -> Any:
    """Give every parameter and buffer of `model` memory that torch allocated itself (contiguous, 64-byte aligned).

    safetensors (and diffusers' loading on top of it) hands out tensors over the file's mapping at the file's byte
    offsets, which are not aligned: CPU kernels then take other code paths, so the same weights gave results that
    differ in the last bits between a `.safetensors` and a `.ckpt` load, and per CPU. A mapping also ties the model to
    the file: truncating the file while the model is loaded would crash the process (SIGBUS). Such tensors are copied
    once; tensors torch already owns (a `.ckpt` load, a dtype conversion) are kept, so peak memory does not grow.
    """
    for module in model.modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor.is_meta or _is_owned(tensor):
                continue
            copy = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device).copy_(tensor)
            if isinstance(tensor, torch.nn.Parameter):
                setattr(module, name, torch.nn.Parameter(copy, requires_grad=tensor.requires_grad))
            else:
                module.register_buffer(name, copy, persistent=name not in module._non_persistent_buffers_set)
    return model


def _is_owned(tensor: torch.Tensor) -> bool:
    if tensor.device.type != "cpu":
        return True  # copied to the device by .to(): allocated by torch
    return bool(tensor.untyped_storage().resizable()) and tensor.data_ptr() % 64 == 0 and tensor.is_contiguous()


@torch.no_grad()
def probe_v_prediction(unet: UNet2DConditionModel) -> bool:
    """A1111's SD2 test (modules/sd_models_config.py): run the UNet at t=999 on a constant 0.5 latent and context;
    a v-prediction model returns roughly the negated input, an epsilon model roughly the input, so a mean of
    (output - input) below -1 means v.

    Meaningful only for trained SD2 weights; on a random model the answer is arbitrary.
    """
    param = next(unet.parameters())
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, dtype=param.dtype, device=param.device)
    context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, dtype=param.dtype, device=param.device)
    timestep = torch.tensor([999], device=param.device)
    out = unet(x, timestep, encoder_hidden_states=context).sample
    return bool((out.float() - x.float()).mean().item() < -1)


def _family_of(components: dict[str, Any]) -> str:
    family = components.get("family")
    if family:
        return str(family)
    if components.get("text_encoder_2") is not None:
        return "sdxl"
    # SD2's OpenCLIP text encoder uses gelu; SD1's CLIP ViT-L uses quick_gelu.
    return "sd2" if components["text_encoder"].config.hidden_act == "gelu" else "sd1"


def _prediction_of(components: dict[str, Any]) -> str:
    stated = components.get("prediction_type")
    if stated:
        return str(stated)
    scheduler = components.get("scheduler")
    config = getattr(scheduler, "config", None) or {}
    return str(config.get("prediction_type", "epsilon"))


def _plain(config: Any) -> dict[str, Any]:
    return {k: v for k, v in dict(config).items() if not str(k).startswith("_")}


def save_single_file(
    components: dict[str, Any], path: str | os.PathLike[str], *, dtype: torch.dtype | None = None
) -> Path:
    """Write `components` (unet, vae, text_encoder, and text_encoder_2 for SDXL; optional scheduler, family,
    prediction_type, extra) as one A1111-style checkpoint: `.safetensors`, or `.ckpt` holding ``{"state_dict": ...}``.

    A v-prediction model also gets the sidecar `.yaml` A1111 needs (the full LDM config with
    ``parameterization: "v"``); an epsilon model removes a sidecar this module wrote earlier. A sidecar someone
    else wrote that contradicts the model is an error, raised before anything is written.
    """
    target = Path(path)
    family = _family_of(components)
    prediction = _prediction_of(components)
    unet, vae, text_encoder = components["unet"], components["vae"], components["text_encoder"]

    text_config = text_encoder.config.to_dict()
    configs = {
        "unet": _plain(unet.config),
        "vae": _plain(vae.config),
        "text_encoder": {k: text_config[k] for k in _TEXT_CONFIG_KEYS if k in text_config},
    }
    text_encoder_2 = components.get("text_encoder_2") if family == "sdxl" else None
    if text_encoder_2 is not None:
        text_config_2 = text_encoder_2.config.to_dict()
        configs["text_encoder_2"] = {k: text_config_2[k] for k in _TEXT_CONFIG_KEYS if k in text_config_2}
    scheduler_config = getattr(components.get("scheduler"), "config", None)
    if scheduler_config is not None:
        configs["scheduler"] = _plain(scheduler_config)
    metadata = cf.make_metadata(configs, family=family, prediction_type=prediction)
    model_configs = ModelConfigs(
        unet=configs["unet"],
        vae=configs["vae"],
        text_encoder=configs["text_encoder"],
        scheduler={**configs.get("scheduler", {}), "prediction_type": prediction},
        family=family,
        prediction_type=prediction,
        text_encoder_2=configs.get("text_encoder_2"),
    )

    sidecar = cf.sidecar_yaml_path(target)
    ours = cf.is_our_sidecar(target)
    if sidecar.is_file() and not ours:
        says = cf.explicit_prediction_type(target, {}, None)
        if says != prediction:
            raise cf.CheckpointError(
                f"{sidecar}: this config file says {says} but the model is {prediction}; move it away first"
            )

    state_dict = cf.diffusers_to_ldm(
        unet.state_dict(),
        vae.state_dict(),
        text_encoder.state_dict(),
        family,
        extra=components.get("extra"),
        text_encoder_2_sd=text_encoder_2.state_dict() if text_encoder_2 is not None else None,
    )
    if dtype is not None:
        state_dict = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}
    cf.write_checkpoint(target, state_dict, metadata=metadata)

    if prediction == "v_prediction" and (ours or not sidecar.is_file()):
        sidecar.write_text(cf.ldm_config_yaml(model_configs), encoding="utf-8")
    elif prediction != "v_prediction" and ours:
        sidecar.unlink()
    log.info("wrote %s (%s, %s, %d tensors)", target, family, prediction, len(state_dict))
    return target
