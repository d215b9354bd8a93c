"""A random-weight, full-size SD 1.5 single-file checkpoint for the real-host tests, built from the shipped configs.

Neither host can build the project's 32x32 toy model (A1111's LDM code hard-codes 32 GroupNorm groups and a VAE
downscale of 8), so the host tests use a standard SD 1.5-shaped file: diffusers UNet/VAE and a transformers CLIP text
encoder made from ``sdconcepts/assets/configs/sd1`` under a fixed torch seed, written in A1111's LDM layout by the
project's own converter (``sdconcepts.backends.single_file.save_single_file``), fp16 safetensors, about 2.1 GB.

"Real model" touch: a freshly initialised final LayerNorm (weight 1, bias 0) makes every token's conditioning have
mean 0, and both hosts' default emphasis ("Original") rescales the conditioning by ``old_mean / new_mean``: 0/0, NaN,
a black image in Forge. A trained CLIP's final LayerNorm has a non-zero bias; here it gets a seeded one with a clearly
non-zero mean.

    python tests/hosts/sd15_random.py CACHE_DIR      # prints the path; reuses CACHE_DIR/<recipe>/sd15-random.safetensors

Bump RECIPE whenever anything here changes the file's content.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

RECIPE = "sd15-random-v1"
FILE_NAME = "sd15-random.safetensors"
SEED = 20261129


def checkpoint_path(cache_dir: str | os.PathLike[str]) -> Path:
    return Path(cache_dir) / RECIPE / FILE_NAME


def build_checkpoint(target: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdconcepts.backends.single_file import save_single_file
    from sdconcepts.checkpoint_files import reference_configs

    configs = reference_configs("sd1")
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel.from_config(configs["unet"])
    vae = AutoencoderKL.from_config(configs["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        # transformers 5 flattened CLIPTextModel; 4.x keeps the layers under .text_model
        norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
        norm.bias.copy_(0.25 + 0.05 * torch.randn(norm.bias.shape, generator=generator))
    scheduler = DDIMScheduler.from_config(configs["scheduler"])
    components = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": scheduler, "family": "sd1"}
    target.parent.mkdir(parents=True, exist_ok=True)
    return save_single_file(components, target, dtype=torch.float16)


def ensure_checkpoint(cache_dir: str | os.PathLike[str]) -> Path:
    """The checkpoint in ``cache_dir`` for this RECIPE, built first when missing (the writer is atomic)."""
    target = checkpoint_path(cache_dir)
    if not target.is_file():
        build_checkpoint(target)
        target.chmod(0o644)  # the writer's temporary file was private; hosts may run as another user
    return target


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: sd15_random.py CACHE_DIR", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    existed = checkpoint_path(argv[0]).is_file()
    path = ensure_checkpoint(argv[0])
    verb = "reused" if existed else f"built in {time.monotonic() - t0:.0f}s"
    print(f"{path}\t{verb}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
