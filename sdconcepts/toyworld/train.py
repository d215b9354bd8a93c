"""Train the toy-world model from scratch on the CPU: the VAE first, then the UNet and text encoder jointly.

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

import torch
from torch import nn
from tqdm import tqdm

from sdconcepts.backends.tokenizer import load_clip_tokenizer
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
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id}
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


def _train(config: TrainConfig, out: Path) -> dict[str, object]:
    start = time.perf_counter()
    total = (0 if config.init else config.vae_steps) + config.steps
    bar = tqdm(total=total, desc="toyworld train", unit="step", dynamic_ncols=True)
    vae = models.load_component(config.init, "vae") if config.init else train_vae(config, bar)
    vae.requires_grad_(False)
    vae_seconds = time.perf_counter() - start

    torch.manual_seed(config.seed + 1)
    device = torch.device(config.device)
    if config.init:
        unet = models.load_component(config.init, "unet").to(device)
        text_encoder = models.load_component(config.init, "text_encoder").to(device)
        vae = vae.to(device)
    else:
        unet = models.build_unet().to(device)
        text_encoder = models.build_text_encoder().to(device)
    tokenizer = load_clip_tokenizer("sd1")
    scheduler = models.training_scheduler()
    sparse = SparseRows(text_encoder.get_input_embeddings(), _used_token_ids(tokenizer).to(device))
    params = [p for p in (*unet.parameters(), *text_encoder.parameters()) if p.requires_grad] + [sparse.rows]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / config.warmup))
    ema = [p.detach().clone() for p in params]
    rng = random.Random(f"diffusion-{config.seed}")
    generator = torch.Generator(device=device).manual_seed(config.seed + 2)
    scaling = float(vae.config.scaling_factor)
    alphas = scheduler.alphas_cumprod
    scheduler.alphas_cumprod = alphas.to(device)
    unet.train()
    text_encoder.train()
    losses: list[float] = []
    for step in range(config.steps):
        x, captions = _images(rng, config.batch, with_captions=True)
        with torch.no_grad():
            z = vae.encode(x.to(device)).latent_dist.sample(generator=generator) * scaling
        noise = torch.randn(z.shape, generator=generator, device=device)
        t = torch.randint(0, len(alphas), (config.batch,), generator=generator, device=device)
        noisy = scheduler.add_noise(z, noise, t)
        # Encode each distinct caption once, then gather per sample.
        unique = sorted(set(captions))
        ids = tokenizer(unique, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        context = text_encoder(ids.to(device))[0][torch.tensor([unique.index(c) for c in captions], device=device)]
        loss = nn.functional.mse_loss(unet(noisy, t, context).sample, noise)
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
            _save_ema(out.with_name(out.name + f"-step{step + 1}"), unet, vae, text_encoder, params, ema, sparse)
    bar.close()
    seconds = time.perf_counter() - start
    _save_ema(out, unet, vae, text_encoder, params, ema, sparse)
    summary: dict[str, object] = {
        "config": asdict(config),
        "seconds": round(seconds, 1),
        "vae_seconds": round(vae_seconds, 1),
        "final_loss": round(sum(losses[-100:]) / max(1, len(losses[-100:])), 4),
        "scaling_factor": scaling,
        "trained_token_rows": len(sparse.ids),
    }
    (out / "toyworld_train.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _save_ema(out: Path, unet, vae, text_encoder, params, ema, sparse: SparseRows) -> None:
    """Save the EMA weights (the live weights are restored afterwards, so training can go on)."""
    live = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
        saved_rows = sparse.embedding.weight[sparse.ids].clone()
        sparse.write_back(sparse.rows)
        sparse.remove()
        models.save_model(out, unet, vae, text_encoder, fp16=True)
        sparse.handle = sparse.embedding.register_forward_hook(sparse._hook)
        sparse.write_back(saved_rows)
        for p, value in zip(params, live, strict=True):
            p.copy_(value)
