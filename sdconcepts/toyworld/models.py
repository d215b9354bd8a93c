"""The toy world's models (configs, saving as a diffusers folder) and image generation through them.

Two layouts share the world, the VAE and the probe: ``sd1`` (the embedded default, one CLIP text encoder) and
``sdxl`` (the SDXL layout: two text encoders whose penultimate hidden states are concatenated, the pooled
projection and size numbers as added conditioning).

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
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import is_accelerate_available
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdconcepts.backends.tiny import SD1_SCHEDULER
from sdconcepts.backends.tokenizer import TOKENIZER_DIR, load_clip_tokenizer
from sdconcepts.model_shape import EMBEDDED_MODEL_DIR, EMBEDDED_XL_MODEL_DIR

MODEL_DIR = EMBEDDED_MODEL_DIR
XL_MODEL_DIR = EMBEDDED_XL_MODEL_DIR
FAMILIES = ("sd1", "sdxl")

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

# SDXL layout (as ``backends.tiny.build_tiny_sdxl``, whose widths the engine's SDXL paths are tested on): three
# levels with no attention on the first, transformer depths 1, 1, 2, linear projections, and the text/time added
# conditioning. Context 80 (= 32 CLIP-L + 48 OpenCLIP-G) and attention widths 64/96 are all distinct, so
# hypernetwork modules keyed by width are never ambiguous.
XL_TIME_DIM = 8
XL_POOLED_DIM = 40
UNET_XL_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64, 96),
    "transformer_layers_per_block": (1, 1, 2),
    "cross_attention_dim": 80,
    "attention_head_dim": (2, 4, 6),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": XL_TIME_DIM,
    "projection_class_embeddings_input_dim": XL_POOLED_DIM + 6 * XL_TIME_DIM,
    "norm_num_groups": 16,
}

# CLIP-L (quick_gelu, end-of-text padding) and OpenCLIP-G (gelu, padding 0, pooled projection). SDXL reads the
# penultimate layer of both, so each has one layer past the one used (the G one feeds the pooled output).
TEXT_L_CONFIG: dict[str, Any] = {
    **TEXT_CONFIG,
    "hidden_size": 32,
    "intermediate_size": 128,
    "num_attention_heads": 2,
    "projection_dim": 32,
}
TEXT_G_CONFIG: dict[str, Any] = {
    **TEXT_CONFIG,
    "hidden_act": "gelu",
    "projection_dim": XL_POOLED_DIM,
    "num_attention_heads": 3,
    "pad_token_id": 0,
}

# SDXL's size conditioning as A1111 and diffusers set it by default for a 32x32 image: original size, crop
# top-left (0, 0), target size.
XL_TIME_IDS = (32, 32, 0, 0, 32, 32)

SAMPLERS = {
    "DDIM": DDIMScheduler,
    "Euler": EulerDiscreteScheduler,
    "Euler a": EulerAncestralDiscreteScheduler,
    "DPM++ 2M": DPMSolverMultistepScheduler,
}


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(**VAE_CONFIG)


def build_unet(family: str = "sd1") -> UNet2DConditionModel:
    return UNet2DConditionModel(**(UNET_XL_CONFIG if family == "sdxl" else UNET_CONFIG))


def build_text_encoder() -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))


def text_encoder_names(family: str = "sd1") -> list[str]:
    """The text encoders' component names of a layout, in the order their hidden states are concatenated."""
    return ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]


def build_text_encoders(family: str = "sd1") -> dict[str, torch.nn.Module]:
    """The text encoders of a layout by component name (``text_encoder``, and ``text_encoder_2`` for SDXL)."""
    if family != "sdxl":
        return {"text_encoder": build_text_encoder()}
    return {
        "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT_L_CONFIG)),
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_G_CONFIG)),
    }


def tokenizers(family: str = "sd1") -> dict[str, Any]:
    """The tokenizer of each text encoder by component name: CLIP-L pads with end-of-text, OpenCLIP-G with 0."""
    if family != "sdxl":
        return {"text_encoder": load_clip_tokenizer("sd1")}
    return {"text_encoder": load_clip_tokenizer("sd1"), "text_encoder_2": load_clip_tokenizer("sd2")}


def family_of(model_dir: str | Path) -> str:
    """``sdxl`` for a diffusers folder with a second text encoder, else ``sd1``."""
    index = json.loads((Path(model_dir) / "model_index.json").read_text())
    return "sdxl" if "text_encoder_2" in index else "sd1"


def load_component(model_dir: str | Path, name: str):
    """Load one trainable component (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``) in float32."""
    kind = {
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection,
    }[name]
    # diffusers' components warn "install accelerate" unless asked for what is there (transformers' do not).
    extra = {"low_cpu_mem_usage": is_accelerate_available()} if name in ("unet", "vae") else {}
    return kind.from_pretrained(str(Path(model_dir) / name), local_files_only=True, **extra).to(torch.float32)


def training_scheduler() -> DDPMScheduler:
    # DDPMScheduler rejects the DDIM-only set_alpha_to_one.
    return DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})


def save_model(out: Path, unet, vae, text_encoder, *, text_encoder_2=None, fp16: bool = True) -> Path:
    """Write a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/).

    With ``text_encoder_2`` the folder is StableDiffusionXLPipeline's (text_encoder_2/, tokenizer_2/ too).
    """
    dtype = torch.float16 if fp16 else torch.float32

    def copy_of(module):
        return copy.deepcopy(module).to("cpu", dtype)

    pipe: DiffusionPipeline
    if text_encoder_2 is not None:
        pipe = StableDiffusionXLPipeline(
            unet=copy_of(unet),
            vae=copy_of(vae),
            text_encoder=copy_of(text_encoder),
            text_encoder_2=copy_of(text_encoder_2),
            tokenizer=load_clip_tokenizer("sd1"),
            tokenizer_2=load_clip_tokenizer("sd2"),
            scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            unet=copy_of(unet),
            vae=copy_of(vae),
            text_encoder=copy_of(text_encoder),
            tokenizer=load_clip_tokenizer("sd1"),
            scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(out, safe_serialization=True)
    # Ship the slow-tokenizer files (vocab.json, merges.txt) that CLIPTokenizer.from_pretrained reads in
    # transformers 4 and 5 alike, instead of the 3.6 MB tokenizer.json that transformers 5 writes.
    for folder in ("tokenizer", "tokenizer_2") if text_encoder_2 is not None else ("tokenizer",):
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(TOKENIZER_DIR / name, Path(out) / folder / name)
        (Path(out) / folder / "tokenizer.json").unlink(missing_ok=True)
    declare_float32(Path(out))
    return out


def declare_float32(model_dir: Path) -> None:
    """Mark the text encoders' configs as float32 although their weights are stored in fp16.

    transformers 5 loads a model in its config's dtype by default, diffusers loads in float32: without this, a
    plain ``StableDiffusionPipeline.from_pretrained(dir)`` mixes fp16 and fp32 and fails on the CPU.
    """
    for name in ("text_encoder", "text_encoder_2"):
        path = model_dir / name / "config.json"
        if not path.is_file():
            continue
        config = json.loads(path.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = "float32"
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_pipeline(model_dir: str | Path | None = None) -> DiffusionPipeline:
    """Load a toy-world pipeline (the shipped SD-1 one by default) in float32 on the CPU, without network access.

    An SDXL-layout folder (one with ``text_encoder_2``) loads as a StableDiffusionXLPipeline.
    """
    return _load_pipeline(str(Path(model_dir) if model_dir is not None else MODEL_DIR))


@lru_cache(maxsize=2)
def _load_pipeline(path: str) -> DiffusionPipeline:
    kind = StableDiffusionXLPipeline if family_of(path) == "sdxl" else StableDiffusionPipeline
    extra: dict[str, Any] = {"add_watermarker": False} if kind is StableDiffusionXLPipeline else {}
    pipe = kind.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=is_accelerate_available(), **extra)
    if any(getattr(m, "dtype", torch.float32) != torch.float32 for m in pipe.components.values()):
        pipe = pipe.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def as_pipeline(model: str | Path | DiffusionPipeline | dict | None) -> DiffusionPipeline:
    """The model as a pipeline: given as one, as a components dict, or as what ``load_pipeline`` takes."""
    if isinstance(model, DiffusionPipeline):
        return model
    if isinstance(model, dict):
        pipe: DiffusionPipeline
        if model.get("text_encoder_2") is not None:
            components = {"image_encoder": None, "feature_extractor": None, **model}
            components.setdefault("tokenizer", load_clip_tokenizer("sd1"))
            components.setdefault("tokenizer_2", load_clip_tokenizer("sd2"))
            components.setdefault("scheduler", DDIMScheduler(**SCHEDULER_CONFIG))
            pipe = StableDiffusionXLPipeline(**components, add_watermarker=False)
            pipe.set_progress_bar_config(disable=True)
            return pipe
        components = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False, **model}
        components.setdefault("tokenizer", load_clip_tokenizer("sd1"))
        components.setdefault("scheduler", DDIMScheduler(**SCHEDULER_CONFIG))
        pipe = StableDiffusionPipeline(**components)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return load_pipeline(model)


@torch.no_grad()
def generate(
    model: str | Path | DiffusionPipeline | dict | None,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 20,
    guidance: float = 5.0,
    sampler: str = "DDIM",
    batch_size: int = 64,
) -> list[Image.Image]:
    """Generate one image per (prompt, seed) with classifier-free guidance, in batches.

    ``model`` is a diffusers folder, a loaded pipeline, a dict of components (unet, vae, text_encoder, ...) or None
    for the shipped toy-world model. Each image's initial noise depends only on its own seed. SDXL-layout models
    get no negative prompt, so their unconditional branch is zeros, as A1111 and diffusers do for an empty one.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    pipe = as_pipeline(model)
    scheduler = SAMPLERS[sampler].from_config(pipe.scheduler.config)
    if isinstance(pipe, StableDiffusionXLPipeline):
        pipe = StableDiffusionXLPipeline(**{**pipe.components, "scheduler": scheduler}, add_watermarker=False)
    else:
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
