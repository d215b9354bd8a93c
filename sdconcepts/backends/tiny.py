"""Small random-weight models in the Stable Diffusion layouts, built from configs for tests and benchmarks.

The UNet keeps the full SD block layout (4 blocks, 2 layers each) so that single-file conversion sees the real key
structure; only widths shrink. The cross-attention width (48) differs from every channel width (32/64) so that
hypernetwork modules keyed by width are never ambiguous.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdconcepts.backends.tokenizer import load_clip_tokenizer
from sdconcepts.checkpoints.configs import reference_configs

SD1_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def _tiny_vae(*, layers_per_block: int = 1, scaling_factor: float | None = None) -> AutoencoderKL:
    """The tiny VAE every family shares: 3 levels (16, 32, 64), factor 4, 32x32 pixels to 8x8x4 latents."""
    extra = {} if scaling_factor is None else {"scaling_factor": scaling_factor}
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=layers_per_block,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
        **extra,
    )


def _tiny_text_config(*, hidden: int, layers: int, heads: int, act: str, pad: int, projection: int | None = None) -> Any:
    """A small CLIP text config on the real CLIP vocabulary and 77 positions (BOS 49406, EOS 49407)."""
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=hidden if projection is None else projection,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=pad,
    )


def build_tiny_sd1(seed: int = 0, *, in_channels: int = 4) -> dict[str, object]:
    """Return the components of a tiny SD-1.x-layout model with random weights (deterministic for a seed).

    ``in_channels=9`` gives an inpainting model's UNet (latents, mask and masked-image latents).
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 32, 64, 64),
        cross_attention_dim=48,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = _tiny_vae()
    text_encoder = CLIPTextModel(
        _tiny_text_config(hidden=48, layers=2, heads=4, act="quick_gelu", pad=49407)
    )
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": load_clip_tokenizer("sd1"),
        "scheduler": DDIMScheduler(**SD1_SCHEDULER),
    }


def save_tiny_sd1(path: Path, seed: int = 0, *, in_channels: int = 4) -> Path:
    """Write a tiny SD-1.x model as a diffusers folder (model_index.json and one folder per component)."""
    pipe = StableDiffusionPipeline(
        **build_tiny_sd1(seed, in_channels=in_channels),  # type: ignore[arg-type]
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_sd2(seed: int = 0, prediction_type: str = "epsilon") -> dict[str, object]:
    """Return the components of a tiny SD-2.x-layout model with random weights (deterministic for a seed).

    As SD 2: linear projections in the UNet's transformers, a fixed head width (16 here, 64 in SD 2) so the head
    count grows with the block width, a gelu text encoder that converts to OpenCLIP's layout, and `!` padding. The
    text width (40) differs from SD1-tiny's (48) and from every channel width; the VAE uses two resnets per block.
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 32, 64, 64),
        cross_attention_dim=40,
        attention_head_dim=(2, 2, 4, 4),
        use_linear_projection=True,
        norm_num_groups=16,
    )
    vae = _tiny_vae(layers_per_block=2)
    text_encoder = CLIPTextModel(
        _tiny_text_config(hidden=40, layers=2, heads=5, act="gelu", pad=0)
    )
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": load_clip_tokenizer("sd2"),
        "scheduler": DDIMScheduler(**{**SD1_SCHEDULER, "prediction_type": prediction_type}),
    }


def build_tiny_sdxl(seed: int = 0) -> dict[str, object]:
    """Return the components of a tiny SDXL-layout model with random weights (deterministic for a seed).

    As SDXL base: three levels (no attention on the first), transformer depths growing with the level (1, 1, 2 here;
    1, 2, 10 there), linear projections, the text/time added conditioning, and two text encoders whose penultimate
    hidden states are concatenated: CLIP-L (32 wide, quick_gelu, end-of-text padding) and OpenCLIP-G (48 wide, gelu,
    padding 0, with a 40-wide pooled projection). Context 80 and attention widths 64/96 are all distinct, so
    hypernetwork modules keyed by width are never ambiguous.
    """
    torch.manual_seed(seed)
    time_dim = 8
    pooled = 40
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 96),
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=80,
        attention_head_dim=(2, 4, 6),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled + 6 * time_dim,
        norm_num_groups=16,
    )
    vae = _tiny_vae(scaling_factor=0.13025)
    text_encoder = CLIPTextModel(
        _tiny_text_config(hidden=32, layers=3, heads=2, act="quick_gelu", pad=49407)
    )
    text_encoder_2 = CLIPTextModelWithProjection(
        _tiny_text_config(hidden=48, layers=3, heads=3, act="gelu", pad=0, projection=pooled)
    )
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer": load_clip_tokenizer("sd1"),
        "tokenizer_2": load_clip_tokenizer("sd2"),
        "scheduler": DDIMScheduler(**SD1_SCHEDULER),
    }


def save_tiny_sdxl(path: Path, seed: int = 0) -> Path:
    """Write a tiny SDXL model as a diffusers folder (StableDiffusionXLPipeline's layout)."""
    pipe = StableDiffusionXLPipeline(**build_tiny_sdxl(seed))  # type: ignore[arg-type]
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_reference_random(family: str = "sd1", seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, object]:
    """Full-size SD 1.5 (``sd1``), SD 2.1 (``sd2``) or SDXL base (``sdxl``) shaped components with random weights,
    for benchmarks and ``tools/gpu_check.sh``.

    Built from the reference configs shipped in the package; about 1 B parameters (SDXL: 3.5 B), so only for
    benchmarks; build under ``torch.device("cuda")`` to initialise on a GPU.
    """
    configs = reference_configs(family)
    torch.manual_seed(seed)
    modules: dict[str, torch.nn.Module] = {
        "unet": UNet2DConditionModel(**configs["unet"]),
        "vae": AutoencoderKL(**configs["vae"]),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
    }
    if family == "sdxl":
        modules["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
    for module in modules.values():
        module.eval()
        if dtype != torch.float32:
            module.to(dtype)
    scheduler_config = {k: v for k, v in configs["scheduler"].items() if not k.startswith("_")}
    tokenizers: dict[str, object] = {"tokenizer": load_clip_tokenizer("sd1" if family == "sdxl" else family)}
    if family == "sdxl":
        tokenizers["tokenizer_2"] = load_clip_tokenizer("sd2")
    return {**modules, **tokenizers, "scheduler": DDIMScheduler.from_config(scheduler_config)}
