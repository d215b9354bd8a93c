"""The toy world's SD-1.x-layout models (configs, saving as a diffusers folder) and image generation through them.

This is one of the two toy-world modules allowed to import diffusers/transformers. ``generate`` is the single
entry point for sampling; the project engine can replace its body later.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from sdconcepts.backends.tiny import SD1_SCHEDULER
from sdconcepts.backends.tokenizer import TOKENIZER_DIR, load_clip_tokenizer

MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "toyworld" / "model"

# SD-1.x noise schedule (scaled_linear 0.00085 -> 0.012, 1000 steps, epsilon prediction).
SCHEDULER_CONFIG: dict[str, Any] = dict(SD1_SCHEDULER)

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (16, 32, 64),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 16,
    "sample_size": 32,
}

# Full SD-1.x block layout (3 cross-attention down blocks + 1 plain, mirrored up), only the widths shrink. The
# cross-attention width 48 differs from every channel width so hypernetwork modules keyed by width are unambiguous.
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "block_out_channels": (32, 32, 64, 64),
    "cross_attention_dim": 48,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}

TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 48,
    "intermediate_size": 192,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 48,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}

SAMPLERS = {
    "DDIM": DDIMScheduler,
    "Euler": EulerDiscreteScheduler,
    "Euler a": EulerAncestralDiscreteScheduler,
    "DPM++ 2M": DPMSolverMultistepScheduler,
}


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(**VAE_CONFIG)


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(**UNET_CONFIG)


def build_text_encoder() -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))


def load_component(model_dir: str | Path, name: str):
    """Load one trainable component (``unet``, ``vae`` or ``text_encoder``) of a diffusers folder in float32."""
    kind = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}[name]
    return kind.from_pretrained(str(Path(model_dir) / name), local_files_only=True).to(torch.float32)


def training_scheduler() -> DDPMScheduler:
    # DDPMScheduler rejects the DDIM-only set_alpha_to_one.
    return DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})


def save_model(out: Path, unet, vae, text_encoder, *, fp16: bool = True) -> Path:
    """Write a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    dtype = torch.float16 if fp16 else torch.float32
    pipe = StableDiffusionPipeline(
        unet=copy.deepcopy(unet).to("cpu", dtype),
        vae=copy.deepcopy(vae).to("cpu", dtype),
        text_encoder=copy.deepcopy(text_encoder).to("cpu", dtype),
        tokenizer=load_clip_tokenizer("sd1"),
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # Ship the slow-tokenizer files (vocab.json, merges.txt) that CLIPTokenizer.from_pretrained reads in
    # transformers 4 and 5 alike, instead of the 3.6 MB tokenizer.json that transformers 5 writes.
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(TOKENIZER_DIR / name, Path(out) / "tokenizer" / name)
    (Path(out) / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    declare_float32(Path(out))
    return out


def declare_float32(model_dir: Path) -> None:
    """Mark the text encoder's config as float32 although its weights are stored in fp16.

    transformers 5 loads a model in its config's dtype by default, diffusers loads in float32: without this, a
    plain ``StableDiffusionPipeline.from_pretrained(dir)`` mixes fp16 and fp32 and fails on the CPU.
    """
    path = model_dir / "text_encoder" / "config.json"
    config = json.loads(path.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = "float32"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_pipeline(model_dir: str | Path | None = None) -> StableDiffusionPipeline:
    """Load the toy-world pipeline (the shipped one by default) in float32 on the CPU, without network access."""
    return _load_pipeline(str(Path(model_dir) if model_dir is not None else MODEL_DIR))


@lru_cache(maxsize=2)
def _load_pipeline(path: str) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    if any(getattr(m, "dtype", torch.float32) != torch.float32 for m in pipe.components.values()):
        pipe = pipe.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _as_pipeline(model: str | Path | StableDiffusionPipeline | dict | None) -> StableDiffusionPipeline:
    if isinstance(model, StableDiffusionPipeline):
        return model
    if isinstance(model, dict):
        components = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False, **model}
        components.setdefault("tokenizer", load_clip_tokenizer("sd1"))
        components.setdefault("scheduler", DDIMScheduler(**SCHEDULER_CONFIG))
        pipe = StableDiffusionPipeline(**components)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return load_pipeline(model)


@torch.no_grad()
def generate(
    model: str | Path | StableDiffusionPipeline | dict | None,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 20,
    guidance: float = 5.0,
    sampler: str = "DDIM",
    batch_size: int = 64,
) -> list[Image.Image]:
    """Generate one image per (prompt, seed) with classifier-free guidance, in batches.

    ``model`` is a diffusers folder, a loaded pipeline, a dict of components (unet, vae, text_encoder, ...) or None
    for the shipped toy-world model. Each image's initial noise depends only on its own seed.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    pipe = _as_pipeline(model)
    scheduler = SAMPLERS[sampler].from_config(pipe.scheduler.config)
    pipe = StableDiffusionPipeline(**{**pipe.components, "scheduler": scheduler, "requires_safety_checker": False})
    pipe.set_progress_bar_config(disable=True)
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[start : start + batch_size]]
        out = pipe(
            prompt=chunk,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators,
            output_type="pil",
        )
        images.extend(out.images)
    return images
