"""Random-weight, full-size SD 1.5 and SD 2.1 single-file checkpoints for the real-host tests, from the shipped configs.

Neither host can build the project's 32x32 toy model (A1111's LDM code hard-codes 32 GroupNorm groups and a VAE
downscale of 8; Forge recognises a model family by its exact widths), so the host tests use standard-shaped files:
diffusers UNet/VAE and a transformers CLIP text encoder made from ``sdconcepts/assets/configs/<family>`` under a fixed
torch seed, written in A1111's LDM layout by the project's own converter
(``sdconcepts.backends.single_file.save_single_file``; SD 2's OpenCLIP layout with its unused last layer), fp16
safetensors: SD 1.5 about 2.1 GB, SD 2.1 about 2.6 GB.

"Real model" touch: a freshly initialised final LayerNorm (weight 1, bias 0) makes every token's conditioning have
mean 0, and both hosts' default emphasis ("Original") rescales the conditioning by ``old_mean / new_mean``: 0/0, NaN,
a black image in Forge. A trained CLIP's final LayerNorm has a non-zero bias; here it gets a seeded one with a clearly
non-zero mean.

    python tests/hosts/random_checkpoint.py CACHE_DIR [sd1|sd2]   # prints the path; reuses CACHE_DIR/<recipe>/<file>

Bump a family's recipe whenever anything here changes its file's content.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

# family -> (recipe folder, file name); the file's stem is the name the hosts list it under
RECIPES = {"sd1": ("sd15-random-v1", "sd15-random.safetensors"), "sd2": ("sd21-random-v1", "sd21-random.safetensors")}
SEED = 20261129


def checkpoint_path(cache_dir: str | os.PathLike[str], family: str = "sd1") -> Path:
    recipe, name = RECIPES[family]
    return Path(cache_dir) / recipe / name


def build_checkpoint(target: Path, family: str = "sd1") -> Path:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdconcepts.backends.single_file import save_single_file
    from sdconcepts.checkpoints.configs import reference_configs

    configs = reference_configs(family)
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
    components = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": scheduler, "family": family}
    target.parent.mkdir(parents=True, exist_ok=True)
    return save_single_file(components, target, dtype=torch.float16)


def is_intact(path: Path) -> bool:
    """Whether ``path`` is a whole safetensors file: its header parses and its tensors end exactly at the file's end
    (a truncated or overwritten cache file is built again)."""
    try:
        with open(path, "rb") as file:
            size = int.from_bytes(file.read(8), "little")
            if not 0 < size < 100_000_000:
                return False
            header = json.loads(file.read(size))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
        return bool(ends) and path.stat().st_size == 8 + size + max(ends)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


def ensure_checkpoint(cache_dir: str | os.PathLike[str], family: str = "sd1") -> Path:
    """The checkpoint in ``cache_dir`` for this family's recipe, built first when missing or damaged (the writer is
    atomic)."""
    target = checkpoint_path(cache_dir, family)
    if target.is_file() and not is_intact(target):
        print(f"{target} is damaged; building it again", file=sys.stderr)
        target.unlink()
    if not target.is_file():
        build_checkpoint(target, family)
        target.chmod(0o644)  # the writer's temporary file was private; hosts may run as another user
    return target


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or (len(argv) == 2 and argv[1] not in RECIPES):
        print(f"usage: random_checkpoint.py CACHE_DIR [{'|'.join(RECIPES)}]", file=sys.stderr)
        return 2
    family = argv[1] if len(argv) == 2 else "sd1"
    t0 = time.monotonic()
    existed = checkpoint_path(argv[0], family).is_file()
    path = ensure_checkpoint(argv[0], family)
    verb = "reused" if existed else f"built in {time.monotonic() - t0:.0f}s"
    print(f"{path}\t{verb}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
