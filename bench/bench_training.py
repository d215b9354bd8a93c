"""Benchmark: a textual inversion step, ours against diffusers' example and against the floor, in one run.

Model: the tiny SD-1.x test model (``sdconcepts.backends.tiny.build_tiny_sd1``: UNet 32/32/64/64, 2-layer CLIP text
encoder of width 48, factor-4 VAE) at 64 px, so latents are 16x16; 2 vectors; 4 training images.

- ``example``: the per-step work of diffusers' ``examples/textual_inversion/textual_inversion.py``, reimplemented
  faithfully: open, resize (bicubic) and randomly flip each image, tokenize the templated prompt, VAE-encode and
  sample, add noise with DDPMScheduler, run the text encoder with the whole token-embedding matrix trainable (the
  placeholder tokens added to it), the UNet, MSE, backward, AdamW over the whole matrix (weight decay 1e-2), the
  constant LR scheduler, then restore every row but the placeholders' from the original matrix.
- ``ours``: ``sdconcepts.training.train_embedding`` as the CLI runs it (loss CSV every step; no saves or previews):
  only the 2 vectors trainable, latents cached, VAE/UNet/text encoder frozen, SDPA attention.
- ``floor``: the text encoder and the UNet forward and backward with respect to the token embeddings' output alone
  (all weights frozen, latents and noise precomputed): the work any TI step must do.

Timings are interleaved (rounds of a few steps of each, so a busy machine slows all three alike) and reported as
medians of per-step times; peak RSS (VmHWM) is measured in separate subprocesses, one per method and batch size,
also shown above the RSS of the loaded model (imports and weights, the same for all three). Goals: ours >= 1.5x the example's steps/s,
ours <= 1.15x the floor, ours <= 0.8x the example's peak RSS.

Usage: ``python bench/bench_training.py [--rounds N] [--threads 2] [--size 64] [--device cpu]``
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import interleaved_medians  # noqa: E402

METHODS = ("example", "ours", "floor")
PLACEHOLDER = "<cat-toy>"
VECTORS = 2


def make_images(folder: Path, size: int) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(4):
        image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
        pen = ImageDraw.Draw(image)
        pen.ellipse((size // 8, size // 8, size // 2, size // 2), fill=(240, 200, 20))
        pen.rectangle((size // 2, size // 2, size - 4, size - 4), fill=(30, 30, 200))
        image.save(folder / f"toy{i}.png")
        (folder / f"toy{i}.txt").write_text("a toy", encoding="utf-8")
    return folder


SD15 = False  # --sd15-random: an SD-1.5-shaped model with random weights, fp16 on CUDA


def build_model(device: str) -> Any:
    import torch

    from sdconcepts.backends.model_loading import model_from_components
    from sdconcepts.backends.tiny import build_reference_random, build_tiny_sd1

    if SD15:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        with torch.device(device):  # initialise on the device: a billion random weights are slow on a CPU
            components = build_reference_random("sd1", dtype=dtype)
    else:
        components = build_tiny_sd1(0)
    for name in ("unet", "vae", "text_encoder"):
        components[name].to(device).requires_grad_(False)  # type: ignore[attr-defined]
    model = model_from_components(components, name="sd15-random" if SD15 else "tiny-sd1")
    model.device = torch.device(device)
    return model


# -- diffusers' example, reimplemented step for step ---------------------------------------------------------------


def example_stepper(model: Any, data: Path, size: int, batch: int) -> Callable[[], None]:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from PIL import Image

    device = model.device
    tokenizer = copy.deepcopy(model.tokenizer)  # the model's CLIP tokenizer, as the example loads it; it grows
    tokens = [PLACEHOLDER] + [f"{PLACEHOLDER}_{i}" for i in range(1, VECTORS)]
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    init = tokenizer.encode("toy", add_special_tokens=False)[0]
    text_encoder = model.text_encoder
    if text_encoder.dtype != torch.float32:
        text_encoder = text_encoder.float()  # the example keeps the trained text encoder in float32
    text_encoder.resize_token_embeddings(len(tokenizer))
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for token_id in ids:
            weight[token_id] = weight[init].clone()
    text_encoder.requires_grad_(False)
    text_encoder.get_input_embeddings().weight.requires_grad_(True)
    text_encoder.train()  # the example trains the text encoder module (dropout is 0 in CLIP configs)
    optimizer = torch.optim.AdamW(text_encoder.get_input_embeddings().parameters(), lr=5e-3, betas=(0.9, 0.999),
                                  weight_decay=1e-2, eps=1e-8)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    original = text_encoder.get_input_embeddings().weight.data.clone()
    scheduler = DDPMScheduler(**{k: v for k, v in model.scheduler_config.items()
                                 if not k.startswith("_") and k != "set_alpha_to_one"})
    paths = sorted(data.glob("*.png"))
    templates = ["a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}"]
    counter = [0]
    placeholder_string = " ".join(tokens)

    def example() -> dict[str, torch.Tensor]:
        i = counter[0]
        counter[0] += 1
        image = Image.open(paths[i % len(paths)])
        if image.mode != "RGB":
            image = image.convert("RGB")
        text = random.choice(templates).format(placeholder_string)
        input_ids = tokenizer(text, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                              return_tensors="pt").input_ids[0]
        array = np.array(image).astype(np.uint8)
        image = Image.fromarray(array).resize((size, size), resample=Image.Resampling.BICUBIC)
        if random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = (np.array(image).astype(np.float32) / 127.5 - 1.0)
        return {"input_ids": input_ids, "pixel_values": torch.from_numpy(array).permute(2, 0, 1)}

    def step() -> None:
        items = [example() for _ in range(batch)]
        pixels = torch.stack([e["pixel_values"] for e in items]).to(device, model.vae.dtype)
        input_ids = torch.stack([e["input_ids"] for e in items]).to(device)
        latents = model.vae.encode(pixels).latent_dist.sample().detach() * model.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        hidden = text_encoder(input_ids)[0].to(model.unet.dtype)
        pred = model.unet(noisy, timesteps, hidden).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        keep = torch.ones((len(tokenizer),), dtype=torch.bool)
        keep[min(ids) : max(ids) + 1] = False
        with torch.no_grad():
            text_encoder.get_input_embeddings().weight[keep] = original[keep]

    return step


# -- ours: the real training session ----------------------------------------------------------------------------


def ours_stepper(model: Any, data: Path, size: int, batch: int, work: Path) -> Callable[[], None]:
    from sdconcepts.training import EmbeddingTrainingConfig, create_embedding_file, train_embedding
    from sdconcepts.training.training_model import TrainingModel

    rows = TrainingModel(model).token_rows("toy", VECTORS)
    create_embedding_file(work / "embeddings", "cattoy", rows, vectors=VECTORS, overwrite=True)
    config = EmbeddingTrainingConfig(dataset=str(data), template="subject", width=size, height=size, batch_size=batch,
                                     max_steps=10**9, save_every=0, preview_every=0, learn_rate="0.005",
                                     log_directory=str(work / "log"))
    events = train_embedding(model, "cattoy", config, embeddings_dir=work / "embeddings", stop=threading.Event())

    def step() -> None:
        next(events)

    return step


# -- the floor ----------------------------------------------------------------------------------------------------


def floor_stepper(model: Any, size: int, batch: int) -> Callable[[], None]:
    import torch

    device = model.device
    tokenizer = model.tokenizer
    input_ids = tokenizer(["a photo of a toy"] * batch, padding="max_length", max_length=77,
                          return_tensors="pt").input_ids.to(device)
    factor = model.vae_scale_factor
    generator = torch.Generator().manual_seed(0)
    dtype = model.unet.dtype
    latents = torch.randn(batch, 4, size // factor, size // factor, generator=generator).to(device, dtype)
    noise = torch.randn(latents.shape, generator=generator).to(device, dtype)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    leaf: list[torch.Tensor] = []

    def grad_leaf(_module: Any, _args: Any, output: torch.Tensor) -> torch.Tensor:
        leaf[:] = [output.detach().requires_grad_(True)]
        return leaf[0]

    embeddings = model.text_encoder.get_input_embeddings()

    def step() -> None:
        handle = embeddings.register_forward_hook(grad_leaf)
        try:
            context = model.text_encoder(input_ids=input_ids).last_hidden_state
        finally:
            handle.remove()
        pred = model.unet(latents, timesteps, encoder_hidden_states=context).sample
        ((pred.float() - noise.float()) ** 2).mean().backward()

    return step


def stepper(method: str, size: int, batch: int, work: Path, device: str) -> Callable[[], None]:
    data = make_images(work / "data", size)
    model = build_model(device)
    if method == "example":
        return example_stepper(model, data, size, batch)
    if method == "ours":
        return ours_stepper(model, data, size, batch, work)
    return floor_stepper(model, size, batch)


def timed(step: Callable[[], None], count: int, sync: Callable[[], None]) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times


def memory_mb(field: str) -> float:
    """``VmHWM`` (peak) or ``VmRSS`` of this process in MB. Unlike ``ru_maxrss``, VmHWM belongs to the address
    space, so a child does not inherit its parent's peak across fork and exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    """One method in its own process: steps, then the process's peak RSS."""
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_images(Path(tmp) / "data", args.size)
        model = build_model(args.device)
        loaded = memory_mb("VmRSS")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # building fp16 weights passes through float32
        if args.child == "example":
            step = example_stepper(model, data, args.size, args.batch)
        elif args.child == "ours":
            step = ours_stepper(model, data, args.size, args.batch, Path(tmp))
        else:
            step = floor_stepper(model, args.size, args.batch)
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        times = timed(step, args.steps, sync)
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    print(json.dumps({"ms": statistics.median(times[min(3, len(times) - 1):]) * 1000, "peak_rss_mb": memory_mb("VmHWM"),
                      "loaded_rss_mb": loaded, "cuda_peak_mb": cuda_peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds (default: 20)")
    parser.add_argument("--per-round", type=int, default=2, help="steps of each method per round (default: 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--sd15-random", action="store_true",
                        help="an SD-1.5-shaped model with random weights (fp16 on CUDA) instead of the tiny one")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=25, help=argparse.SUPPRESS)
    parser.add_argument("--child-steps", type=int, default=25, help="steps in each peak-memory subprocess")
    args = parser.parse_args()
    global SD15
    SD15 = args.sd15_random
    if args.child:
        child(args)
        return

    import torch

    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    what = "SD-1.5-shaped random" if SD15 else "tiny SD-1.x"
    print(f"{what} at {args.size} px, {VECTORS} vectors, {args.threads} threads, device {args.device}", flush=True)
    results: dict[tuple[str, int], dict[str, float]] = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            steppers = {m: stepper(m, args.size, batch, Path(tmp) / m, args.device) for m in METHODS}
            medians = interleaved_medians(steppers, args.rounds, per_round=args.per_round, warmup=3, sync=sync)
        for m in METHODS:
            results[(m, batch)] = {"ms": medians[m] * 1000}
        if not args.no_rss:
            for m in METHODS:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", m, "--batch", str(batch), "--size", str(args.size),
                     "--threads", str(args.threads), "--device", args.device, "--steps", str(args.child_steps),
                     *(["--sd15-random"] if SD15 else [])],
                    capture_output=True, text=True, check=True,
                )
                measured = json.loads(out.stdout.strip().splitlines()[-1])
                results[(m, batch)]["peak_rss_mb"] = measured["peak_rss_mb"]
                results[(m, batch)]["loaded_rss_mb"] = measured["loaded_rss_mb"]
                if measured.get("cuda_peak_mb") is not None:
                    results[(m, batch)]["cuda_peak_mb"] = measured["cuda_peak_mb"]
        ex, ours, floor = (results[(m, batch)] for m in METHODS)
        print(f"\nbatch {batch}:")
        for m in METHODS:
            r = results[(m, batch)]
            mem = ""
            if "peak_rss_mb" in r:
                mem = f", peak RSS {r['peak_rss_mb']:.0f} MB ({r['peak_rss_mb'] - r['loaded_rss_mb']:.0f} above the loaded model)"
            if "cuda_peak_mb" in r:
                mem += f", peak CUDA {r['cuda_peak_mb']:.0f} MB"
            print(f"  {m:8s} {r['ms']:8.1f} ms/step ({1000 / r['ms']:.1f} steps/s){mem}")
        print(f"  ours vs example: {ex['ms'] / ours['ms']:.2f}x steps/s (goal >= 1.5)")
        print(f"  ours vs floor:   {ours['ms'] / floor['ms']:.2f}x time (goal <= 1.15)")
        if "cuda_peak_mb" in ours:
            print(f"  ours vs example peak CUDA memory: {ours['cuda_peak_mb'] / ex['cuda_peak_mb']:.2f}x")
        if "peak_rss_mb" in ours:
            print(f"  ours vs example peak RSS: {ours['peak_rss_mb'] / ex['peak_rss_mb']:.2f}x (goal <= 0.8); "
                  f"above the loaded model: {(ours['peak_rss_mb'] - ours['loaded_rss_mb']) / (ex['peak_rss_mb'] - ex['loaded_rss_mb']):.2f}x")


if __name__ == "__main__":
    main()
