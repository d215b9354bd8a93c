"""Loading a text-to-image model for the diffusers backend: a diffusers folder, an A1111 single-file checkpoint,
in-memory components, or a host's modules shared without a copy; the embedded toy-world models by default."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from sdconcepts.backends.loaded_model import LoadedModel
from sdconcepts.backends.tokenizer import load_clip_tokenizer
from sdconcepts.checkpoints.files import CheckpointError, match_text_encoder_keys
from sdconcepts.model_shape import EMBEDDED_MODEL_DIR, EMBEDDED_XL_MODEL_DIR
from sdconcepts.safe_load import load_torch_file

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = EMBEDDED_MODEL_DIR  # the embedded SD-1 toy-world model
XL_MODEL_DIR = EMBEDDED_XL_MODEL_DIR  # the embedded SDXL-layout toy-world model
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


class ModelLoadError(ValueError):
    """A model path that cannot be loaded; the message names the path and the reason."""


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_model(
    ref: str | Path | None = None, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> LoadedModel:
    """Load the embedded default model (``ref`` None), a diffusers folder, or an A1111 single-file checkpoint."""
    dev = torch.device(device) if device is not None else default_device()
    dt = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
    path = Path(ref) if ref is not None else DEFAULT_MODEL_DIR
    if not path.exists():
        if ref is None:
            raise ModelLoadError(f"{path}: the embedded default model is missing from this install")
        raise ModelLoadError(f"{path}: no such file or folder")
    if path.is_dir():
        model = _load_diffusers_folder(path, dt)
    elif path.suffix.lower() in CHECKPOINT_SUFFIXES:
        model = _load_single_file(path, dt)
    else:
        raise ModelLoadError(f"{path}: not a model (expected a diffusers folder or {', '.join(CHECKPOINT_SUFFIXES)})")
    return _finish(model, dev)


def model_from_components(components: Mapping[str, Any], *, name: str = "in-memory", family: str = "sd1") -> LoadedModel:
    """Wrap already-built components (tests, training previews) as a LoadedModel without touching disk."""
    scheduler = components["scheduler"]
    unet = components["unet"]
    if components.get("text_encoder_2") is not None:
        family = "sdxl"
    model = LoadedModel(
        unet=unet,
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components.get("tokenizer") or load_clip_tokenizer(family),
        scheduler_config=dict(scheduler.config),
        family=family,
        prediction_type=str(scheduler.config.get("prediction_type", "epsilon")),
        name=name,
        path=None,
        device=unet.device,
        dtype=unet.dtype,
        text_encoder_2=components.get("text_encoder_2"),
        tokenizer_2=components.get("tokenizer_2") or (load_clip_tokenizer("sd2") if family == "sdxl" else None),
    )
    return model


def model_sharing_weights(
    state_dict: dict[str, torch.Tensor],
    *,
    name: str,
    short_hash: str | None = None,
    prediction_type: str | None = None,
    metadata: dict[str, str] | None = None,
    text_encoders: Sequence[Mapping[str, torch.Tensor]] | None = None,
    family: str | None = None,
) -> LoadedModel:
    """A LoadedModel over the tensors of an LDM-layout state dict held by someone else (a host's loaded model).

    No tensor is copied or converted (see ``single_file.components_sharing_weights``; one exception: an SDXL VAE held
    in float16 gets a float32 copy, as ``_upcast_vae`` does for files, logged): generation and training run
    on the same memory as the owner's model and never write it; the LoadedModel stays valid while the owner keeps
    those tensors where they are. ``short_hash`` is the owner's model hash (infotexts, files' ``sd_checkpoint``);
    ``metadata`` as in a single file's header (our configs, for shapes the tensors cannot tell). ``text_encoders``
    (transformers layout) and ``family``: text encoders given apart from the LDM-layout UNet and VAE, as Forge holds
    them (see ``components_sharing_weights``).
    """
    from sdconcepts.backends.single_file import components_sharing_weights  # lazy: diffusers

    try:
        parts = components_sharing_weights(state_dict, text_encoders=text_encoders, family=family,
                                           prediction_type=prediction_type, metadata=metadata)
    except CheckpointError as exc:
        raise ModelLoadError(f"{name}: {exc}") from exc
    weight = next(parts["unet"].parameters())
    model = LoadedModel(
        unet=parts["unet"],
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        scheduler_config=parts["scheduler_config"],
        family=parts["family"],
        prediction_type=parts["prediction_type"],
        name=name,
        path=None,
        device=weight.device,
        dtype=weight.dtype,
        _hash=short_hash,
        text_encoder_2=parts.get("text_encoder_2"),
        tokenizer_2=parts.get("tokenizer_2"),
    )
    if _upcast_vae(model, next(model.vae.parameters()).dtype):
        # Our own float32 copy of the VAE only: .to() gives our Parameters new tensors, the owner's stay as they are.
        model.vae.to(torch.float32)
        size = sum(p.numel() * 4 for p in model.vae.parameters())
        log.info("%s: the SDXL VAE held in float16 runs in float32 here (%.0f MB copied)", name, size / 2**20)
    return model


def _finish(model: LoadedModel, device: torch.device) -> LoadedModel:
    for module in (model.unet, model.vae, *model.text_encoders):
        dtype = model.dtype
        if module is model.vae and _upcast_vae(model):
            dtype = torch.float32
        if module.device != device or module.dtype != dtype:
            module.to(device=device, dtype=dtype)
        module.eval()
        module.requires_grad_(False)
    model.device = device
    return model


def _upcast_vae(model: LoadedModel, dtype: torch.dtype | None = None) -> bool:
    """SDXL's VAE overflows in float16 (NaN images): it runs in float32, as diffusers does for a VAE whose config says
    ``force_upcast`` and as A1111 ends up doing (it reverts the VAE to 32-bit floats at the first NaN). ``dtype``:
    the VAE's own when it differs from the model's (a host may hold them apart)."""
    return (model.is_sdxl and (dtype or model.dtype) == torch.float16
            and bool(getattr(model.vae.config, "force_upcast", False)))


def _load_diffusers_folder(path: Path, dtype: torch.dtype) -> LoadedModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel  # lazy: diffusers
    from diffusers.utils import is_accelerate_available  # lazy: diffusers
    from transformers import CLIPTokenizer  # lazy: transformers' models

    from sdconcepts.backends.single_file import own_weights  # lazy: diffusers

    missing = [sub for sub in ("unet", "vae", "text_encoder", "scheduler") if not (path / sub).is_dir()]
    if missing:
        raise ModelLoadError(f"{path}: not a diffusers model folder (missing {', '.join(missing)})")
    try:
        # Asked for only when accelerate is there: diffusers' default asks for it regardless and, without it, prints a
        # five-line "install accelerate" warning per component for what is only a slower load of small files.
        low_memory = {"low_cpu_mem_usage": is_accelerate_available()}
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, local_files_only=True,
                                                    **low_memory)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, local_files_only=True,
                                            **low_memory)
        text_encoder = _load_text_encoder(path / "text_encoder", dtype)
        sdxl = (path / "text_encoder_2").is_dir()
        text_encoder_2 = _load_text_encoder(path / "text_encoder_2", dtype, projection=True) if sdxl else None
        own_weights(unet)
        own_weights(vae)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{path}: cannot load the diffusers folder: {_first_line(exc)}") from exc
    scheduler_config = _read_json(path / "scheduler" / "scheduler_config.json")
    family = "sdxl" if sdxl else "sd2" if text_encoder.config.hidden_act == "gelu" else "sd1"
    if (path / "tokenizer" / "vocab.json").is_file():
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
    else:
        tokenizer = load_clip_tokenizer("sd1" if sdxl else family)
    tokenizer_2 = None
    if sdxl and (path / "tokenizer_2" / "vocab.json").is_file():
        tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True)
    elif sdxl:
        tokenizer_2 = load_clip_tokenizer("sd2")
    return LoadedModel(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=scheduler_config,
        family=family,
        prediction_type=str(scheduler_config.get("prediction_type", "epsilon")),
        name={DEFAULT_MODEL_DIR: "toyworld", XL_MODEL_DIR: "toyworld-xl"}.get(path, path.name),
        path=path,
        device=torch.device("cpu"),
        dtype=dtype,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )


def _load_text_encoder(folder: Path, dtype: torch.dtype, *, projection: bool = False) -> Any:
    """Load a CLIP text encoder whatever transformers version wrote it.

    transformers 5 saves the weights without the ``text_model.`` level that transformers 4 expects, and
    ``from_pretrained`` in 4.x would silently leave such weights random; so the keys are matched here.
    """
    from transformers import (  # lazy: transformers' models
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
    )


    config = CLIPTextConfig.from_pretrained(folder, local_files_only=True)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    weights = sorted(folder.glob("*.safetensors"))
    if weights:
        state: dict[str, torch.Tensor] = {}
        for file in weights:
            state.update(load_file(str(file)))
    else:
        bins = sorted(folder.glob("*.bin"))
        if not bins:
            raise OSError(f"no weights in {folder}")
        loaded = load_torch_file(bins[0])
        if not isinstance(loaded, dict):
            raise ValueError(f"{bins[0]}: not a state dict")
        state = loaded
    state = match_text_encoder_keys(state, model.state_dict().keys())
    model.load_state_dict(state, strict=True)
    return model.to(dtype)


def _load_single_file(path: Path, dtype: torch.dtype) -> LoadedModel:
    from sdconcepts.backends.single_file import load_single_file  # lazy: diffusers

    try:
        parts = load_single_file(path, dtype=dtype)
    except CheckpointError as exc:
        raise ModelLoadError(str(exc)) from exc
    scheduler = parts["scheduler"]
    return LoadedModel(
        unet=parts["unet"],
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        scheduler_config=dict(scheduler.config),
        family=parts["family"],
        prediction_type=parts["prediction_type"],
        name=path.stem,
        path=path,
        device=torch.device("cpu"),
        dtype=dtype,
        text_encoder_2=parts.get("text_encoder_2"),
        tokenizer_2=parts.get("tokenizer_2"),
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: unreadable JSON: {_first_line(exc)}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
