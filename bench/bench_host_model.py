"""Benchmark (issue 12): a textual inversion step on a host's loaded model against our diffusers backend, same weights.

Inside A1111/Forge our tab trains on ``model_sharing_weights``: diffusers/transformers modules built over the
host's tensors (no copy, no re-alignment). Standalone, ``load_model`` gives the same modules over weights torch
allocated itself. The only difference is where the tensors live, so this compares the two on one checkpoint:

- ``backend``: ``load_model(checkpoint)``, our diffusers backend;
- ``host``: the checkpoint's tensors converted to float32 one by one as a host's ``load_state_dict`` into its own
  modules leaves them (separately allocated tensors), seen under LDM keys through ``model_sharing_weights``.

A step = encode the templated prompt with 2 trainable vectors placed, UNet forward at one timestep, MSE, backward
(``sdconcepts.training.objective.diffusion_loss``, what ``train_embedding`` runs). Timings are interleaved (rounds
of a few steps of each) and reported as medians. Goal: host <= 1.1x backend.

Usage: ``python bench/bench_host_model.py [--ckpt FILE] [--size 64] [--rounds 4] [--steps 2] [--threads 2]``
(default checkpoint: the tiny SD-1.x test model written as a single file in a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _tiny_checkpoint(folder: Path) -> Path:
    from sdconcepts.backends.model_loading import load_model
    from sdconcepts.backends.single_file import save_single_file
    from sdconcepts.backends.tiny import save_tiny_sd1

    model = load_model(save_tiny_sd1(folder / "tiny"), device="cpu")
    components = {"unet": model.unet, "vae": model.vae, "text_encoder": model.text_encoder, "family": "sd1"}
    return save_single_file(components, folder / "tiny.safetensors")


def _host_view(path: Path) -> Any:
    from sdconcepts.backends.model_loading import model_sharing_weights
    from sdconcepts.checkpoints import files as cf

    state, metadata = cf.read_checkpoint_with_metadata(path)
    held = {k: (v.to(torch.float32).clone() if v.is_floating_point() else v.clone()) for k, v in state.items()}
    return model_sharing_weights(held, name=path.stem, metadata=metadata), held


def _stepper(model: Any, size: int) -> Any:
    from sdconcepts.training.dataset import TrainingBatch
    from sdconcepts.training.objective import diffusion_loss
    from sdconcepts.training.training_model import TrainingModel

    vectors = TrainingModel(model).token_rows("cat toy", 2).clone().requires_grad_(True)
    training = TrainingModel(model, {"benchtoy": vectors})
    latent = size // int(model.vae_scale_factor)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((1, 4, latent, latent), generator=generator)
    batch = TrainingBatch(latents=latents, texts=("a photo of benchtoy",), weights=None)

    def step(seed: int) -> float:
        started = time.perf_counter()
        loss = diffusion_loss(training, batch, torch.Generator().manual_seed(seed))
        loss.backward()  # type: ignore[no-untyped-call]
        vectors.grad = None
        return time.perf_counter() - started

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, default=None)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from sdconcepts.backends.model_loading import load_model

    with tempfile.TemporaryDirectory() as tmp:
        path = args.ckpt or _tiny_checkpoint(Path(tmp))
        backend = load_model(path, device="cpu", dtype=torch.float32)
        host, _held = _host_view(path)
        steps = {"backend": _stepper(backend, args.size), "host": _stepper(host, args.size)}
        for step in steps.values():
            step(0)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in steps}
        for round_ in range(args.rounds):
            for name, step in steps.items():
                times[name] += [step(round_ * 100 + i) for i in range(args.steps)]
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "checkpoint": str(args.ckpt or "tiny SD-1.x"),
        "size": args.size,
        "threads": args.threads,
        "steps_each": len(times["host"]),
        "median_step_s": {k: round(v, 4) for k, v in medians.items()},
        "host_over_backend": round(medians["host"] / medians["backend"], 3),
        "goal": "host_over_backend <= 1.1",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
