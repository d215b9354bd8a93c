"""diffusers' textual inversion examples, reimplemented step for step for the benches (never shipped, never run).

One home for the per-step work of ``examples/textual_inversion/textual_inversion.py`` (SD 1/2) and
``textual_inversion_sdxl.py`` (SDXL), which ``bench_training.py``, ``bench_training_sdxl.py`` and
``bench_time_to_concept.py`` compare ours against. Each micro-step: open, resize (bicubic) and randomly flip an image,
tokenize a templated prompt (placeholder tokens added to the first tokenizer only), VAE-encode and sample, add noise
with DDPMScheduler, run the text encoder whose whole token-embedding matrix is trainable (SDXL: CLIP-L trainable,
OpenCLIP-G frozen, with the size/crop time ids), the UNet, MSE divided by the accumulation (as accelerate's backward
does), backward; every ``accumulation`` micro-steps AdamW over the whole matrix (weight decay 1e-2) and the constant
LR scheduler step; then every row but the placeholders' restored from the original matrix.

The scripts' README recipes (``--scale_lr`` multiplies the rate by accumulation x batch): SD 1 ``lr 5e-4``, batch 1,
accumulation 4, 3000 steps, constant; SDXL the same with 500 steps. The object templates are 4 of the script's list.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

TEMPLATES = ("a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}")
README_RECIPE = {"learning_rate": 5e-4, "batch": 1, "accumulation": 4, "steps": {"sd1": 3000, "sdxl": 500}}


def scaled_rate(rate: float, batch: int, accumulation: int) -> float:
    """``--scale_lr``: the rate times the total batch (one process)."""
    return rate * batch * accumulation


class ExampleRun:
    """The example's training state on ``model`` (its text encoder is copied: the model itself stays untouched).

    ``step()`` is one micro-step (one batch, forward and backward); ``vectors()`` the placeholders' learned rows as
    an embedding's vectors (SDXL: ``clip_l`` trained; ``clip_g`` the initializer's OpenCLIP-G row, untrained, since
    the script adds the placeholders to the first tokenizer only).
    """

    def __init__(self, model: Any, data: Path, size: int, batch: int, *, learning_rate: float = 5e-3,
                 accumulation: int = 1, initializer: str = "toy", vectors: int = 2,
                 placeholder: str = "<cat-toy>") -> None:
        self.model, self.size, self.batch, self.accumulation = model, size, batch, accumulation
        self.sdxl = bool(getattr(model, "is_sdxl", False))
        self.device = getattr(model, "device", torch.device("cpu"))
        tokenizer = copy.deepcopy(model.tokenizer)
        tokens = [placeholder] + [f"{placeholder}_{i}" for i in range(1, vectors)]
        tokenizer.add_tokens(tokens)
        self.tokenizer, self.ids = tokenizer, tokenizer.convert_tokens_to_ids(tokens)
        init = tokenizer.encode(initializer, add_special_tokens=False)
        if len(init) != 1:
            raise ValueError(f"the initializer {initializer!r} must be a single token, as the example requires")
        self.init_id = init[0]
        encoder = copy.deepcopy(model.text_encoder)
        if encoder.dtype != torch.float32:
            encoder = encoder.float()  # the example keeps the trained text encoder in float32
        encoder.resize_token_embeddings(len(tokenizer))
        table = encoder.get_input_embeddings().weight
        with torch.no_grad():
            for token_id in self.ids:
                table[token_id] = table[self.init_id].clone()
        encoder.requires_grad_(False)
        table.requires_grad_(True)
        encoder.train()  # the example trains the text encoder module (dropout is 0 in CLIP configs)
        self.encoder = encoder
        self.optimizer = torch.optim.AdamW([table], lr=learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
        self.original = table.data.clone()
        from diffusers import DDPMScheduler  # lazy: the benches import this module before choosing what to run

        self.scheduler = DDPMScheduler(**{k: v for k, v in model.scheduler_config.items()
                                          if not k.startswith("_") and k != "set_alpha_to_one"})
        from diffusers.models.attention_processor import Attention, AttnProcessor2_0

        self._attention = [m for m in model.unet.modules() if isinstance(m, Attention)]
        self._default_processor = AttnProcessor2_0()
        self.paths = sorted(data.glob("*.png"))
        self.placeholder_string = " ".join(tokens)
        self.micro_steps = 0

    @contextmanager
    def _diffusers_attention(self) -> Iterator[None]:
        """diffusers' default attention processor on the UNet for the block (the script runs diffusers as it ships;
        the product's loading gives the UNet ``sdconcepts.backends.attention.LeanAttention``, and benches share one
        model between the example and ours). Costs 2 x 34 attribute writes a step on toyworld-xl."""
        saved = [module.processor for module in self._attention]
        for module in self._attention:
            module.processor = self._default_processor
        try:
            yield
        finally:
            for module, processor in zip(self._attention, saved, strict=True):
                module.processor = processor

    @property
    def images_seen(self) -> int:
        return self.micro_steps * self.batch

    @property
    def optimizer_steps(self) -> int:
        return self.micro_steps // self.accumulation

    def _example(self) -> dict[str, Any]:
        import numpy as np
        from PIL import Image

        i = self.micro_steps * self.batch + len(self._items)
        image = Image.open(self.paths[i % len(self.paths)])
        if image.mode != "RGB":
            image = image.convert("RGB")
        original_size = (image.height, image.width)
        text = random.choice(TEMPLATES).format(self.placeholder_string)
        item: dict[str, Any] = {"ids_1": self._ids(self.tokenizer, text)}
        if self.sdxl:
            item["ids_2"] = self._ids(self.model.tokenizer_2, text)
            item["time_ids"] = torch.tensor([*original_size, 0, 0, self.size, self.size], dtype=torch.float32)
        image = Image.fromarray(np.array(image).astype(np.uint8)).resize((self.size, self.size),
                                                                         resample=Image.Resampling.BICUBIC)
        if random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.array(image).astype(np.float32) / 127.5 - 1.0
        item["pixels"] = torch.from_numpy(array).permute(2, 0, 1)
        return item

    @staticmethod
    def _ids(tokenizer: Any, text: str) -> torch.Tensor:
        return tokenizer(text, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                         return_tensors="pt").input_ids[0]

    def _context(self, items: list[dict[str, Any]]) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        ids_1 = torch.stack([e["ids_1"] for e in items]).to(self.device)
        dtype = self.model.unet.dtype
        if not self.sdxl:
            return self.encoder(ids_1)[0].to(dtype), None
        hidden_1 = self.encoder(ids_1, output_hidden_states=True).hidden_states[-2].to(dtype)
        out_2 = self.model.text_encoder_2(torch.stack([e["ids_2"] for e in items]).to(self.device),
                                          output_hidden_states=True)
        added = {"text_embeds": out_2[0], "time_ids": torch.stack([e["time_ids"] for e in items]).to(self.device)}
        return torch.cat([hidden_1, out_2.hidden_states[-2].to(dtype)], dim=-1), added

    def step(self) -> None:
        import torch.nn.functional as F

        model = self.model
        self._items: list[dict[str, Any]] = []
        for _ in range(self.batch):
            self._items.append(self._example())
        items = self._items
        pixels = torch.stack([e["pixels"] for e in items]).to(self.device, model.vae.dtype)
        with torch.no_grad():
            latents = model.vae.encode(pixels).latent_dist.sample() * model.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  device=self.device).long()
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        context, added = self._context(items)
        kwargs = {"added_cond_kwargs": added} if added is not None else {}
        with self._diffusers_attention():
            pred = model.unet(noisy, timesteps, context, **kwargs).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean") / self.accumulation
        loss.backward()
        self.micro_steps += 1
        if self.micro_steps % self.accumulation == 0:  # accelerate skips the optimizer between syncs
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
        keep = torch.ones((len(self.tokenizer),), dtype=torch.bool)
        keep[min(self.ids) : max(self.ids) + 1] = False
        with torch.no_grad():
            self.encoder.get_input_embeddings().weight[keep] = self.original[keep]

    def vectors(self) -> torch.Tensor:
        """The placeholders' rows as the model's text conditioning lays them out (SDXL: clip_l then clip_g)."""
        rows = self.encoder.get_input_embeddings().weight.detach()[self.ids].float().clone()
        if not self.sdxl:
            return rows
        init = self.model.tokenizer_2.encode(self.tokenizer.decode([self.init_id]), add_special_tokens=False)
        table_2 = self.model.text_encoder_2.get_input_embeddings().weight.detach()
        return torch.cat([rows, table_2[init[:1]].float().expand(len(self.ids), -1)], dim=-1)
