"""The training port over the diffusers backend: conditioning with gradients, the UNet, VAE latents, previews.

The only training module that touches a loaded model's components; it drives them through
``sdconcepts.backends.prompt_encoder`` (A1111's embedding placement) and ``sdconcepts.backends.sampling`` (txt2img
for previews) and never imports diffusers or transformers itself. Which tensors train is decided by the caller (ARCHITECTURE principle 7):
``trainable_embeddings`` are placed with gradients, everything in the model stays frozen.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from sdconcepts.backends.compiled import CompiledUnet, compiled_unet
from sdconcepts.generation import GenerationParams
from sdconcepts.hypernetworks.tags import resolve_in_memory

__all__ = ["TrainingModel", "alphas_cumprod_from_config"]


def alphas_cumprod_from_config(config: Mapping[str, Any]) -> Tensor:
    """The cumulative alpha products of a diffusers scheduler config (scaled_linear, linear, squaredcos_cap_v2)."""
    steps = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
    schedule = str(config.get("beta_schedule", "scaled_linear"))
    if schedule == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    elif schedule == "linear":
        betas = torch.linspace(start, end, steps, dtype=torch.float64)
    elif schedule == "squaredcos_cap_v2":

        def bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor([min(1 - bar((i + 1) / steps) / bar(i / steps), 0.999) for i in range(steps)])
    else:
        raise ValueError(f"unsupported beta schedule {schedule!r}")
    return torch.cumprod(1.0 - betas, dim=0)


def _token_rows(tokenizer: Any, text_encoder: Any, text: str, limit: int | None) -> Tensor:
    if limit is not None:
        ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=limit)["input_ids"]
    else:
        ids = tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"]
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        rows: Tensor = table[torch.tensor(ids, dtype=torch.long, device=table.device)].float().cpu()
    return rows


class TrainingModel:
    """A LoadedModel seen by the objective (``DiffusionModel``) and by the training session."""

    def __init__(self, model: Any, trainable_embeddings: Mapping[str, Tensor] | None = None, *,
                 compile_unet: bool = False) -> None:
        from sdconcepts.backends.prompt_encoder import PromptEncoder  # lazy: transformers, diffusers

        self.model = model
        self.trainable = dict(trainable_embeddings or {})
        self._encoder = PromptEncoder(model, self.trainable)
        self._alphas = alphas_cumprod_from_config(model.scheduler_config)
        # With compile_unet the UNet runs through torch.compile (or eagerly with the reason in ``compiled.fallback``).
        self.compiled: CompiledUnet | None = compiled_unet(model.unet) if compile_unet else None

    # -- DiffusionModel -------------------------------------------------------------------------------------------
    @property
    def alphas_cumprod(self) -> Tensor:
        return self._alphas

    @property
    def prediction_type(self) -> str:
        return str(self.model.prediction_type)

    @property
    def device(self) -> torch.device:
        return torch.device(self.model.device)

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """The context ``[batch, 77 * chunks, width]``; on SDXL with the pooled outputs packed after it (`predict`
        unpacks them), so that the objective sees one tensor for every family."""
        from sdconcepts.backends.prompt_encoder import stack_conds  # lazy: transformers, diffusers

        pooled: Tensor | None
        if self.trainable:
            context, pooled = self._encoder.encode_batch_with_pooled(texts)
        else:
            # Nothing in the text path trains: each distinct prompt is encoded once, as A1111 pre-computes them.
            context = stack_conds([self._encoder.encode(text) for text in texts], self._encoder.encode(""))
            pooled = torch.stack([self._encoder.pooled(text) for text in texts]) if self.model.is_sdxl else None
        if pooled is None:
            return context
        width = context.shape[-1]
        rows = -(-pooled.shape[-1] // width)
        packed = torch.nn.functional.pad(pooled, (0, rows * width - pooled.shape[-1]))
        return torch.cat([context, packed.reshape(len(texts), rows, width).to(context)], dim=1)

    def predict(self, noisy: Tensor, timesteps: Tensor, context: Tensor) -> Tensor:
        dtype = self.model.dtype
        unet = self.model.unet
        added = None
        if self.model.is_sdxl:
            # SDXL: unpack the pooled outputs; size conditioning as txt2img's (the image size, crop 0, 0).
            width = context.shape[-1]
            size = int(unet.config.projection_class_embeddings_input_dim) - 6 * int(unet.config.addition_time_embed_dim)
            rows = -(-size // width)
            pooled = context[:, -rows:].reshape(context.shape[0], -1)[:, :size]
            # A fresh tensor, not the slice: a slice keeps the packed tensor's batch stride, and torch's matmul then
            # runs every cross-attention key/value projection (and its backward) as a batched matmul over a
            # broadcast weight instead of one matrix product (bench/bench_training_sdxl.py measures the step).
            context = context[:, :-rows].clone(memory_format=torch.contiguous_format)
            h, w = (int(d) * self.vae_scale_factor for d in noisy.shape[-2:])
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=dtype, device=noisy.device).expand(len(noisy), -1)
            added = {"text_embeds": pooled.to(dtype), "time_ids": time_ids}
        call = self.compiled if self.compiled is not None else unet
        out: Tensor = call(
            noisy.to(dtype), timesteps, encoder_hidden_states=context.to(dtype), added_cond_kwargs=added
        ).sample
        return out

    # -- dataset, creation, previews ------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return int(self.model.vae_scale_factor)

    @property
    def size_multiple(self) -> int:
        return int(self.model.size_multiple)

    @property
    def context_width(self) -> int:
        return int(self.model.context_width)

    def encode_images(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, std) of the VAE's latent distribution for pixels in [-1, 1], times the VAE's scaling factor."""
        vae = self.model.vae
        scale = float(getattr(vae.config, "scaling_factor", 0.18215))
        with torch.no_grad():
            dist = vae.encode(pixels.to(self.model.device, vae.dtype)).latent_dist
        return dist.mean.float() * scale, dist.std.float() * scale

    def token_rows(self, text: str, limit: int) -> Tensor | dict[str, Tensor]:
        """Raw token-embedding rows of ``text`` (no special tokens); CLIP-L keeps at most ``limit`` tokens as A1111's
        FrozenCLIPEmbedder does, OpenCLIP all of them. SDXL: ``{"clip_l": rows, "clip_g": rows}``, each encoder's
        own tokenizer and table (A1111's per-embedder encode_embedding_init_text)."""
        if self.model.is_sdxl:
            return {
                "clip_l": _token_rows(self.model.tokenizer, self.model.text_encoder, text, limit),
                "clip_g": _token_rows(self.model.tokenizer_2, self.model.text_encoder_2, text, None),
            }
        return _token_rows(self.model.tokenizer, self.model.text_encoder, text, limit if self.model.family == "sd1" else None)

    def preview(
        self,
        *,
        prompt: str,
        negative_prompt: str,
        steps: int,
        sampler: str,
        cfg_scale: float,
        seed: int,
        width: int,
        height: int,
        embeddings: Mapping[str, Tensor] | None = None,
        hypernetworks: Mapping[str, Any] | None = None,
    ) -> tuple[Image.Image, str]:
        """One image from the live weights through txt2img, the same sampling code as generation."""
        from sdconcepts.backends.sampling import txt2img  # lazy: transformers, diffusers

        params = GenerationParams(
            prompt=prompt,
            negative_prompt=negative_prompt,
            steps=steps,
            sampler=sampler,
            cfg_scale=cfg_scale,
            seed=seed,
            width=width,
            height=height,
        )
        frozen = {name: vectors.detach().clone() for name, vectors in (embeddings or {}).items()}
        resolved = resolve_in_memory(prompt, dict(hypernetworks or {}), self.model.unet)
        result = txt2img(self.model, params, embeddings=frozen, hypernetworks=resolved,
                         compile_unet=self.compiled is not None)
        return result.images[0], result.infotexts[0]

    @property
    def short_hash(self) -> str | None:
        value = self.model.short_hash
        return str(value) if value is not None else None

    @property
    def name(self) -> str:
        return str(self.model.name)

    @property
    def unet(self) -> torch.nn.Module:
        unet: torch.nn.Module = self.model.unet
        return unet


class CompileClock:
    """What a run says about its compiled UNet: after the first step the fallback line (when it runs eagerly); after
    the second the compile time, estimated as the first step's wall time beyond the second's."""

    def __init__(self, compiled: CompiledUnet | None) -> None:
        self.compiled = compiled
        self.started = time.perf_counter()
        self.steps: list[float] = []
        self.said_fallback = False

    def on_step(self) -> str | None:
        """Call once per step, as it ends; the line to show, if any."""
        now = time.perf_counter()
        self.steps.append(now - self.started)
        self.started = now
        compiled = self.compiled
        if compiled is None:
            return None
        if compiled.fallback is not None:
            if self.said_fallback:
                return None
            self.said_fallback = True
            return compiled.fallback
        if len(self.steps) == 2:
            first, second = self.steps
            return (f"UNet compiled: the first step took {first:.1f} s, the second {second:.2f} s "
                    f"(about {max(first - second, 0.0):.1f} s of compiling)")
        return None
