"""Benchmark: an SDXL textual inversion step, ours against the floor, interleaved in one run.

Model: the tiny SDXL (``sdconcepts.backends.tiny.build_tiny_sdxl``) at 64 px; 2 vectors; 4 training images.

- ``ours``: ``sdconcepts.training.train_embedding`` as the CLI runs it (loss CSV every step; no saves or previews):
  only the vectors trainable (both halves), latents cached, every weight frozen.
- ``floor``: both text encoders and the UNet (with the pooled output and size conditioning) forward, and backward
  with respect to the token embeddings' outputs alone, latents and noise precomputed: the work any SDXL TI step must do.

Goal (issue 13): ours <= 1.1x the floor. Usage: ``python bench/bench_training_sdxl.py [--rounds N] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_training import make_images  # noqa: E402

VECTORS = 2


def ours_stepper(model: Any, data: Path, size: int, batch: int, work: Path) -> Callable[[], None]:
    from sdconcepts.training import EmbeddingTrainingConfig, create_embedding_file, train_embedding
    from sdconcepts.training.backend import TrainingModel

    rows = TrainingModel(model).token_rows("toy", VECTORS)
    create_embedding_file(work / f"embeddings{batch}", "cattoy", rows, vectors=VECTORS, overwrite=True)
    config = EmbeddingTrainingConfig(dataset=str(data), template="subject", width=size, height=size, batch_size=batch,
                                     max_steps=10**9, save_every=0, preview_every=0, learn_rate="0.005",
                                     log_directory=str(work / "log"))
    events = train_embedding(model, "cattoy", config, embeddings_dir=work / f"embeddings{batch}",
                             stop=threading.Event())

    def step() -> None:
        next(events)

    return step


def floor_stepper(model: Any, size: int, batch: int) -> Callable[[], None]:
    ids = model.tokenizer(["a photo of a toy"] * batch, padding="max_length", max_length=77,
                          return_tensors="pt").input_ids
    ids_2 = ids.clone()
    for row in ids_2:  # OpenCLIP pads with 0 after the end token
        end = int((row == 49407).nonzero()[0])
        row[end + 1 :] = 0
    factor = model.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, size // factor, size // factor, generator=g)
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, 1000, (batch,), generator=g)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=torch.float32)

    def grad_leaf(_module: Any, _args: Any, output: torch.Tensor) -> torch.Tensor:
        return output.detach().requires_grad_(True)

    def step() -> None:
        handles = [te.get_input_embeddings().register_forward_hook(grad_leaf) for te in model.text_encoders]
        try:
            h1 = model.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states[-2]
            out2 = model.text_encoder_2(input_ids=ids_2, output_hidden_states=True)
        finally:
            for handle in handles:
                handle.remove()
        context = torch.cat([h1, out2.hidden_states[-2]], dim=-1)
        added = {"text_embeds": out2.text_embeds, "time_ids": time_ids}
        pred = model.unet(latents, timesteps, encoder_hidden_states=context, added_cond_kwargs=added).sample
        ((pred.float() - noise) ** 2).mean().backward()

    return step


def main() -> None:
    from sdconcepts.backends.diffusers import model_from_components
    from sdconcepts.backends.tiny import build_tiny_sdxl

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--per-round", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batches", default="1,4")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp())
    data = make_images(work / "data", args.size)
    model = model_from_components(build_tiny_sdxl(0), name="tiny-sdxl")
    for module in (model.unet, model.vae, *model.text_encoders):
        module.requires_grad_(False)
    print(f"tiny SDXL, {args.size}px, {VECTORS} vectors, cpu {args.threads} thread(s), {args.rounds} rounds")
    for batch in (int(b) for b in args.batches.split(",")):
        steppers = {"ours": ours_stepper(model, data, args.size, batch, work),
                    "floor": floor_stepper(model, args.size, batch)}
        for step in steppers.values():
            step()
            step()
        times: dict[str, list[float]] = {name: [] for name in steppers}
        for _ in range(args.rounds):
            for name, step in steppers.items():
                for _ in range(args.per_round):
                    start = time.perf_counter()
                    step()
                    times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(values) for name, values in times.items()}
        print(f"batch {batch}: floor {med['floor'] * 1000:.1f} ms/step, ours {med['ours'] * 1000:.1f} ms/step, "
              f"ratio ours/floor {med['ours'] / med['floor']:.3f} (goal <= 1.1)")


if __name__ == "__main__":
    main()
