"""Where the sampler starts: A1111's seeded noise, or (img2img and inpainting) an init image's latents and the mask.

The pure preparation (resize, mask, paste-back) is `sdconcepts.img2img`; the prompt, embeddings, hypernetworks,
seeds and the sampler loop are txt2img's (`sdconcepts.backends.sampling`, whose ``img2img`` hands txt2img an
`ImageSource`). Here the VAE encodes the init image, inpainting checkpoints (UNets with 5 extra input channels) get
A1111's image conditioning, and each step's denoised estimate keeps the unmasked region, as A1111 1.10 does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdconcepts.backends.loaded_model import LoadedModel
from sdconcepts.img2img import Img2ImgOptions, PreparedInit, img2img_steps, latent_mask, prepare_init


def initial_noise(
    model: LoadedModel, generators: Sequence[torch.Generator], width: int, height: int
) -> torch.Tensor:
    """A1111's seeding: each image's noise comes from a CPU generator seeded with its own seed."""
    # The latent's channels: an inpainting UNet takes 5 more (mask and masked image) than it denoises.
    channels = int(model.unet.config.out_channels)
    shape = (channels, height // model.vae_scale_factor, width // model.vae_scale_factor)
    noise = [torch.randn(shape, generator=g) for g in generators]
    return torch.stack(noise).to(device=model.device, dtype=model.dtype)


@dataclass
class InitLatents:
    """Where the sampler starts instead of pure noise, for one batch.

    ``latents`` are the clean init latents ``[batch, 4, h, w]``; the sampler runs the ``steps`` schedule from
    ``first_step`` on. ``keep`` is 1 where inpainting keeps the init latents (A1111's ``p.mask``) and 0 where it
    regenerates; ``image_conditioning`` ``[batch, 5, h, w]`` is an inpainting UNet's extra input.
    """

    latents: torch.Tensor
    first_step: int
    keep: torch.Tensor | None = None
    image_conditioning: torch.Tensor | None = None


def is_inpainting_model(model: LoadedModel) -> bool:
    """An inpainting checkpoint's UNet reads the mask and the masked image's latents besides the noisy latents."""
    config = model.unet.config
    return int(config.in_channels) == int(config.out_channels) + 5


@dataclass(frozen=True)
class ImageSource:
    """An init image, an optional mask (white = inpaint) and the img2img options, as txt2img's ``source``."""

    image: Image.Image
    mask: Image.Image | None = None
    options: Img2ImgOptions = field(default_factory=Img2ImgOptions)

    def prepare(
        self, model: LoadedModel, *, width: int, height: int, steps: int, seeds: Sequence[Sequence[int]]
    ) -> Img2ImgStart:
        """Encode the prepared init image once for the whole run; ``seeds`` are the run's seeds per batch."""
        options = self.options.validated()
        prepared = prepare_init(self.image, self.mask, width, height, options)
        first_step, sampled_steps = img2img_steps(steps, options.denoising_strength)
        pixels = image_pixels(prepared.image, model)
        latents = encode_pixels(model, pixels)
        keep = None
        if prepared.mask is not None:
            small = latent_mask(prepared.mask, latents.shape[3], latents.shape[2])
            regenerate = torch.from_numpy(small).to(model.device, model.dtype)[None, None]
            keep = 1 - regenerate
            if options.inpainting_fill == "latent noise":
                # A1111 draws this noise once, from the first batch's seeds, and reuses it for every batch.
                generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[0]]
                latents = latents * keep + initial_noise(model, generators, width, height) * regenerate
            elif options.inpainting_fill == "latent nothing":
                latents = latents * keep
        info = dict(prepared.infotext)
        conditioning = None
        if is_inpainting_model(model):
            conditioning = inpainting_conditioning(model, pixels, prepared.mask, options.mask_weight)
            # A1111 lists it right after the denoising strength.
            info = {"Denoising strength": info.pop("Denoising strength"),
                    "Conditional mask weight": str(float(options.mask_weight)), **info}
        return Img2ImgStart(prepared, latents, first_step, sampled_steps, keep, conditioning, info)


@dataclass
class Img2ImgStart:
    """A prepared img2img run: what each batch starts from, and the paste-back of each result."""

    prepared: PreparedInit
    latents: torch.Tensor
    first_step: int
    sampled_steps: int
    keep: torch.Tensor | None
    image_conditioning: torch.Tensor | None
    infotext: dict[str, str]

    @property
    def warnings(self) -> list[str]:
        return self.prepared.warnings

    def init_latents(self, batch_seeds: Sequence[int]) -> InitLatents:
        n = len(batch_seeds)
        conditioning = self.image_conditioning
        return InitLatents(
            latents=self.latents.expand(n, -1, -1, -1) if self.latents.shape[0] == 1 else self.latents[:n],
            first_step=self.first_step,
            keep=self.keep,
            image_conditioning=conditioning.expand(n, -1, -1, -1) if conditioning is not None else None,
        )

    def finish(self, image: Image.Image) -> Image.Image:
        return self.prepared.finish(image)


# ---------------------------------------------------------------------------------------------------------------
# Latents and the inpainting UNet's conditioning
# ---------------------------------------------------------------------------------------------------------------


def image_pixels(image: Image.Image, model: LoadedModel) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    tensor = torch.from_numpy(array).permute(2, 0, 1)[None]
    return (tensor * 2 - 1).to(model.device, model.dtype)


@torch.no_grad()
def encode_pixels(model: LoadedModel, pixels: torch.Tensor) -> torch.Tensor:
    """Latents of images in [-1, 1]: the mean of the VAE's posterior, scaled.

    A1111 samples the posterior with the unseeded global RNG; its spread is tiny for SD's VAE, and the mean keeps
    img2img a function of the seed alone.
    """
    scaling = float(getattr(model.vae.config, "scaling_factor", 0.18215))
    latents = model.vae.encode(pixels.to(model.vae.dtype)).latent_dist.mean * scaling
    return latents.to(model.dtype)  # the VAE may run in float32 under a float16 UNet (SDXL)


def inpainting_conditioning(
    model: LoadedModel, pixels: torch.Tensor, mask: Image.Image | None, weight: float
) -> torch.Tensor:
    """A1111's inpainting conditioning ``[1, 5, h, w]``: the rounded mask, then the masked image's latents.

    The masked image is the init image with the masked pixels zeroed (mid grey), blended with the unmasked image
    by ``1 - weight``; without a mask the whole image counts as masked.
    """
    if mask is None:
        pixel_mask = torch.ones(1, 1, *pixels.shape[-2:], device=pixels.device, dtype=pixels.dtype)
    else:
        array = np.asarray(mask.convert("L"), dtype=np.float32) / 255
        pixel_mask = torch.from_numpy(array)[None, None].round().to(pixels.device, pixels.dtype)
    masked = torch.lerp(pixels, pixels * (1 - pixel_mask), weight)
    latents = encode_pixels(model, masked)
    small_mask = torch.nn.functional.interpolate(pixel_mask, size=latents.shape[-2:])
    return torch.cat([small_mask, latents], dim=1)


def unet_extra_input(
    model: LoadedModel, init: InitLatents | None, batch: int, width: int, height: int
) -> torch.Tensor | None:
    """An inpainting UNet's extra channels for a batch; txt2img gives it A1111's all-masked grey image."""
    if not is_inpainting_model(model):
        return None
    if init is not None and init.image_conditioning is not None:
        return init.image_conditioning
    grey = torch.zeros(1, 3, height, width, device=model.device, dtype=model.dtype)
    return inpainting_conditioning(model, grey, None, 1.0).expand(batch, -1, -1, -1)


# ---------------------------------------------------------------------------------------------------------------
# The sampler's start and the per-step blend
# ---------------------------------------------------------------------------------------------------------------


def noised_init(scheduler: Any, init: InitLatents, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The init latents noised to the level of ``init.first_step`` and the timesteps left to run from there."""
    begin = init.first_step * int(scheduler.order)
    timesteps = scheduler.timesteps
    if hasattr(scheduler, "plms_timesteps"):
        # PLMS repeats its second timestep for the warm-up step; a shortened schedule needs that repeat too.
        plain = torch.cat([timesteps[:1], timesteps[2:]])[init.first_step :]
        timesteps = torch.cat([plain[:2], plain[1:]]) if len(plain) > 1 else plain
    else:
        timesteps = timesteps[begin:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)
    latents = scheduler.add_noise(init.latents.to(noise), noise, timesteps[:1])
    return latents, timesteps


def keep_denoised(
    scheduler: Any, t: Any, latents: torch.Tensor, output: torch.Tensor, init: InitLatents, prediction_type: str
) -> torch.Tensor:
    """The model output whose denoised estimate is the init latents' where ``init.keep`` is 1.

    A1111 blends the denoiser's output (the estimate of the clean latents) with the init latents after every step's
    guidance, so the unmasked region follows the init image all the way down. diffusers' schedulers take noise (or
    v) predictions, so the estimate is computed from the output, blended and turned back into an output.
    """
    assert init.keep is not None
    if float(scheduler.init_noise_sigma) > 1.0:
        # k-diffusion style latents x0 + sigma * noise: scale_model_input gives 1 / sqrt(sigma^2 + 1).
        c_in = scheduler.scale_model_input(torch.ones(1, device=latents.device), t).float()
        alpha = c_in**2
        x = latents.float() * c_in
    else:
        sigmas = getattr(scheduler, "sigmas", None)
        if sigmas is not None:
            index = scheduler.step_index if scheduler.step_index is not None else scheduler.begin_index
            alpha = 1 / (1 + sigmas[index].float() ** 2)
        else:
            alpha = scheduler.alphas_cumprod[int(t)].float()
        x = latents.float()
    alpha = torch.as_tensor(alpha, device=latents.device)
    a, b = alpha.sqrt(), (1 - alpha).sqrt()
    # The output whose estimate is exactly the init latents; outputs are linear in the estimate, so mixing the two
    # outputs by the mask is blending the estimates, and leaves the regenerated region's output untouched.
    init_latents = init.latents.float()
    if prediction_type == "sample":
        kept = init_latents
    else:
        kept = (x - a * init_latents) / b
        if prediction_type == "v_prediction":
            kept = a * kept - b * init_latents
    keep = init.keep.float()
    return (output.float() * (1 - keep) + kept * keep).to(output.dtype)
