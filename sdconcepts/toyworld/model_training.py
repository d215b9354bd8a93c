"""Train a toy-world model from scratch on the CPU: the VAE first, then the UNet and text encoder(s) jointly.

``family`` picks the layout: ``sd1`` (the embedded default) or ``sdxl`` (two text encoders, penultimate hidden
states concatenated, pooled projection and size numbers as added conditioning, zeros as the unconditional input).

Deterministic for a seed and a thread count: every step draws fresh images from a seeded world generator, and
the run length is a step count, never a time budget. The result is a diffusers folder (fp16 safetensors).
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from sdconcepts.toyworld import models, world
from sdconcepts.toyworld.probe import to_tensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    threads: int = 1
    vae_steps: int = 1200
    vae_batch: int = 32
    vae_lr: float = 1e-3
    steps: int = 3000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 100
    ema: float = 0.995
    grad_clip: float = 1.0
    save_every: int = 0
    device: str = "cpu"
    init: str = ""  # continue from this diffusers folder (its VAE is kept, the VAE stage is skipped)
    family: str = "sd1"  # "sd1" or "sdxl"
    vae: str = ""  # take the VAE from this diffusers folder and skip the VAE stage (same world, same latents)
    teacher: str = ""  # distil: regress this diffusers folder's noise prediction (same VAE) instead of the noise


def _images(rng: random.Random, n: int, with_captions: bool) -> tuple[torch.Tensor, list[str]]:
    images, captions = [], []
    for _ in range(n):
        attrs = world.random_attributes(rng)
        images.append(world.draw(attrs.shape, attrs.colour, attrs.background, rng))
        if with_captions:
            captions.append(world.caption(attrs, rng))
    return to_tensor(images) * 2 - 1, captions


def train_vae(config: TrainConfig, bar: tqdm):
    """Train the factor-4 VAE (MSE + 0.5 L1 + 1e-4 KL per latent dim) and set its scaling factor to 1/std."""
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    vae = models.build_vae().to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr)
    rng = random.Random(f"vae-{config.seed}")
    generator = torch.Generator(device=device).manual_seed(config.seed)
    vae.train()
    for _ in range(config.vae_steps):
        x = _images(rng, config.vae_batch, with_captions=False)[0].to(device)
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=generator)
        recon = vae.decode(z).sample
        kl = posterior.kl().mean() / z[0].numel()
        loss = nn.functional.mse_loss(recon, x) + 0.5 * nn.functional.l1_loss(recon, x) + 1e-4 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update(1)
        bar.set_postfix(stage="vae", loss=f"{float(loss.detach()):.4f}", refresh=False)
    vae.eval()
    with torch.no_grad():
        x = _images(rng, 1024, with_captions=False)[0].to(device)
        z = vae.encode(x).latent_dist.sample(generator=generator)
        mse = float(nn.functional.mse_loss(vae.decode(z).sample, x))
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    log.info(
        "vae: scaling_factor %.4f, PSNR %.2f dB", vae.config.scaling_factor, 10 * torch.log10(torch.tensor(4 / mse))
    )
    return vae


def _used_token_ids(tokenizer) -> torch.Tensor:
    """Every token id a training caption can contain (the rest of the 49408-row table never receives a gradient)."""
    words = {"a", "on", "background", "shape", *world.SHAPES, *world.COLOURS, *world.BACKGROUNDS}
    for template in world.TEMPLATES:
        words.update(template.replace("{}", " ").split())
    # The pad token too: SDXL reads hidden states at every position, and OpenCLIP-G pads with id 0, not end-of-text.
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    for word in words:
        ids.update(tokenizer(word, add_special_tokens=False).input_ids)
    return torch.tensor(sorted(ids))


class SparseRows:
    """Train only the used rows of the token-embedding table: a small parameter spliced in by a forward hook.

    Equivalent to training the whole table with AdamW and no weight decay (untouched rows get zero gradients
    and never move), but the optimizer and EMA state cover a few hundred rows instead of 49408.
    """

    def __init__(self, embedding: nn.Embedding, ids: torch.Tensor) -> None:
        self.embedding = embedding
        self.ids = ids
        embedding.weight.requires_grad_(False)
        self.rows = nn.Parameter(embedding.weight.detach()[ids].clone())
        self.handle = embedding.register_forward_hook(self._hook)

    def _hook(self, module: nn.Embedding, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        weight = module.weight.index_copy(0, self.ids, self.rows)
        return nn.functional.embedding(inputs[0], weight)

    def write_back(self, rows: torch.Tensor) -> None:
        with torch.no_grad():
            self.embedding.weight[self.ids] = rows.to(self.embedding.weight.dtype)

    def remove(self) -> None:
        self.handle.remove()


def train(config: TrainConfig, out: Path) -> dict[str, object]:
    """Run the whole recipe and write the diffusers folder to ``out``; returns a summary (also in ``out``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _train(config, out)
    finally:
        torch.set_num_threads(threads)


class Conditioning:
    """Caption -> UNet conditioning for a layout, through the text encoders being trained.

    sd1: the last hidden states of the text encoder. sdxl: the penultimate hidden states of CLIP-L and OpenCLIP-G
    concatenated, plus OpenCLIP-G's pooled projection and the size numbers as added conditioning, as diffusers'
    ``StableDiffusionXLPipeline.encode_prompt`` and A1111 compute them. An empty caption (classifier-free guidance
    dropout) is the text encoder's output for "" on sd1, and zeros on sdxl: SDXL was trained with zeroed dropout,
    and A1111 and diffusers both use zeros for an empty negative prompt.
    """

    def __init__(self, family: str, encoders: dict[str, Any], device: torch.device) -> None:
        self.family = family
        self.encoders = encoders
        self.tokenizers = models.tokenizers(family)
        self.device = device

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        # Encode each distinct caption once, then gather per sample.
        unique = sorted(set(captions))
        if self.family != "sdxl":
            ids = self._ids("text_encoder", unique)
            table = self.encoders["text_encoder"](ids)[0]
            return table[self._index(unique, captions)], None
        texts = [c for c in unique if c]
        width = sum(int(e.config.hidden_size) for e in self.encoders.values())
        pooled_width = int(self.encoders["text_encoder_2"].config.projection_dim)
        # Row 0 is the zero conditioning of the empty caption.
        context = torch.zeros((1, 77, width), device=self.device)
        pooled = torch.zeros((1, pooled_width), device=self.device)
        if texts:
            hidden = []
            for name in ("text_encoder", "text_encoder_2"):
                out = self.encoders[name](self._ids(name, texts), output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
            context = torch.cat([context, torch.cat(hidden, dim=-1)])
            pooled = torch.cat([pooled, out.text_embeds])
        index = self._index([""] + texts, captions)
        time_ids = torch.tensor(models.XL_TIME_IDS, dtype=context.dtype, device=self.device).repeat(len(captions), 1)
        return context[index], {"text_embeds": pooled[index], "time_ids": time_ids}

    def _ids(self, name: str, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizers[name](texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return tokens.input_ids.to(self.device)

    def _index(self, table: list[str], captions: list[str]) -> torch.Tensor:
        return torch.tensor([table.index(c) for c in captions], device=self.device)


def _train(config: TrainConfig, out: Path) -> dict[str, object]:
    if config.family not in models.FAMILIES:
        raise ValueError(f"unknown family {config.family!r}; expected one of {', '.join(models.FAMILIES)}")
    start, cpu_start = time.perf_counter(), time.process_time()
    vae_source = config.init or config.vae
    total = (0 if vae_source else config.vae_steps) + config.steps
    bar = tqdm(total=total, desc="toyworld train", unit="step", dynamic_ncols=True)
    vae = models.load_component(vae_source, "vae") if vae_source else train_vae(config, bar)
    vae.requires_grad_(False)
    vae_seconds = time.perf_counter() - start

    torch.manual_seed(config.seed + 1)
    device = torch.device(config.device)
    vae = vae.to(device)
    names = models.text_encoder_names(config.family)
    if config.init:
        unet = models.load_component(config.init, "unet").to(device)
        encoders = {name: models.load_component(config.init, name).to(device) for name in names}
    else:
        unet = models.build_unet(config.family).to(device)
        encoders = {name: module.to(device) for name, module in models.build_text_encoders(config.family).items()}
    condition = Conditioning(config.family, encoders, device)
    teacher = _load_teacher(config.teacher, scaling=float(vae.config.scaling_factor), device=device)
    sparse = [
        SparseRows(encoders[name].get_input_embeddings(), _used_token_ids(condition.tokenizers[name]).to(device))
        for name in names
    ]
    modules = [unet, *(encoders[name] for name in names)]
    params = [p for m in modules for p in m.parameters() if p.requires_grad] + [s.rows for s in sparse]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / config.warmup))
    ema = [p.detach().clone() for p in params]
    rng = random.Random(f"diffusion-{config.seed}")
    generator = torch.Generator(device=device).manual_seed(config.seed + 2)
    scaling = float(vae.config.scaling_factor)
    scheduler = models.training_scheduler()
    alphas = scheduler.alphas_cumprod
    scheduler.alphas_cumprod = alphas.to(device)
    for module in modules:
        module.train()
    losses: list[float] = []

    def save(folder: Path) -> None:
        _save_ema(folder, unet, vae, encoders, params, ema, sparse)

    for step in range(config.steps):
        x, captions = _images(rng, config.batch, with_captions=True)
        with torch.no_grad():
            z = vae.encode(x.to(device)).latent_dist.sample(generator=generator) * scaling
        noise = torch.randn(z.shape, generator=generator, device=device)
        t = torch.randint(0, len(alphas), (config.batch,), generator=generator, device=device)
        noisy = scheduler.add_noise(z, noise, t)
        context, added = condition(captions)
        target = noise
        if teacher is not None:
            # The teacher's prediction is the expected noise given the noisy latents and the caption: a far less
            # noisy target than the drawn noise itself, so the student learns the caption's effect in fewer steps.
            with torch.no_grad():
                target = teacher[0](noisy, t, teacher[1](captions)[0]).sample
        loss = nn.functional.mse_loss(unet(noisy, t, context, added_cond_kwargs=added).sample, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - config.ema)
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(stage="unet", loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}", refresh=False)
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.steps:
            save(out.with_name(out.name + f"-step{step + 1}"))
            log.info(
                "step %d: snapshot saved, loss %.4f, %.0f s wall, %.0f s CPU",
                step + 1,
                sum(losses[-50:]) / len(losses[-50:]),
                time.perf_counter() - start,
                time.process_time() - cpu_start,
            )
    bar.close()
    seconds = time.perf_counter() - start
    save(out)
    summary: dict[str, object] = {
        "config": asdict(config),
        "seconds": round(seconds, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "vae_seconds": round(vae_seconds, 1),
        "final_loss": round(sum(losses[-100:]) / max(1, len(losses[-100:])), 4),
        "scaling_factor": scaling,
        "trained_token_rows": sum(len(s.ids) for s in sparse),
    }
    (out / "toyworld_train.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _load_teacher(folder: str, *, scaling: float, device: torch.device) -> tuple[nn.Module, Conditioning] | None:
    """The teacher's UNet and conditioning, frozen; None without a teacher. Its VAE must be the student's."""
    if not folder:
        return None
    teacher_vae = models.load_component(folder, "vae")
    if abs(float(teacher_vae.config.scaling_factor) - scaling) > 1e-6:
        raise ValueError(f"the teacher {folder} has another VAE than the model being trained")
    family = models.family_of(folder)
    names = models.text_encoder_names(family)
    encoders = {name: models.load_component(folder, name).to(device).eval().requires_grad_(False) for name in names}
    unet = models.load_component(folder, "unet").to(device).eval().requires_grad_(False)
    return unet, Conditioning(family, encoders, device)


def _save_ema(out: Path, unet, vae, encoders: dict[str, nn.Module], params, ema, sparse: list[SparseRows]) -> None:
    """Save the EMA weights (the live weights are restored afterwards, so training can go on)."""
    live = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
        saved_rows = [s.embedding.weight[s.ids].clone() for s in sparse]
        for s in sparse:
            s.write_back(s.rows)
            s.remove()
        models.save_model(
            out, unet, vae, encoders["text_encoder"], text_encoder_2=encoders.get("text_encoder_2"), fp16=True
        )
        for s, rows in zip(sparse, saved_rows, strict=True):
            s.handle = s.embedding.register_forward_hook(s._hook)
            s.write_back(rows)
        for p, value in zip(params, live, strict=True):
            p.copy_(value)
