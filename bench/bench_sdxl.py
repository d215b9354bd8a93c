"""Benchmark: our SDXL txt2img path against ``StableDiffusionXLPipeline.__call__`` on the same model.

Same model, prompt, negative prompt, seed, sampler and steps, measured interleaved in one run; prints medians and
the ratio (goal: ours ≤ 1.05× the pipeline). Default model: the tiny random SDXL built from config.
Usage: ``python bench/bench_sdxl.py [--ckpt PATH] [--repeats N] [--size N]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import interleaved_medians  # noqa: E402


def main() -> None:
    from diffusers import StableDiffusionXLPipeline

    from sdconcepts.backends.model_loading import load_model
    from sdconcepts.backends.sampling import make_scheduler, txt2img
    from sdconcepts.generation import GenerationParams

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, default=None, help="SDXL model (default: a tiny random one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="Euler")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    ref = args.ckpt
    if ref is None:
        from sdconcepts.backends.tiny import save_tiny_sdxl

        ref = save_tiny_sdxl(Path(tempfile.mkdtemp()) / "tiny-sdxl")
    model = load_model(ref, device=device)
    if not model.is_sdxl:
        raise SystemExit(f"{ref}: not an SDXL model")
    pipe = StableDiffusionXLPipeline(
        vae=model.vae, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
        tokenizer=model.tokenizer, tokenizer_2=model.tokenizer_2, unet=model.unet,
        scheduler=make_scheduler(model, args.sampler),
    )
    pipe.set_progress_bar_config(disable=True)
    prompt, negative, seed, cfg, size = "a red circle on a teal background", "blurry", 1234, 7.0, args.size
    params = GenerationParams(prompt=prompt, negative_prompt=negative, steps=args.steps, sampler=args.sampler,
                              cfg_scale=cfg, seed=seed, width=size, height=size)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def ours() -> None:
        txt2img(model, params, size_limits=False)

    def theirs() -> None:
        with torch.no_grad():
            pipe(prompt, negative_prompt=negative, num_inference_steps=args.steps, guidance_scale=cfg, height=size,
                 width=size, generator=torch.Generator("cpu").manual_seed(seed))

    med = interleaved_medians({"ours": ours, "pipeline": theirs}, args.repeats, sync=sync)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {args.threads} threads"
    print(f"model: {model.name} (SDXL, {size}x{size}, {str(model.dtype).replace('torch.', '')}), {args.steps} steps "
          f"{args.sampler}, CFG {cfg}, {where}, {args.repeats} interleaved repeats")
    print(f"pipeline median: {med['pipeline'] * 1000:.1f} ms")
    print(f"ours     median: {med['ours'] * 1000:.1f} ms")
    print(f"ratio ours/pipeline: {med['ours'] / med['pipeline']:.3f} (goal <= 1.05)")


if __name__ == "__main__":
    main()
