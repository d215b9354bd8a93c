"""Benchmark: our txt2img path against a plain ``StableDiffusionPipeline.__call__`` on the same model.

Same model, prompt, seed, sampler and steps, measured interleaved in one run; prints medians and the ratio
(goal: ours ≤ 1.05× the pipeline). Usage: ``python bench/bench_generate.py [--ckpt PATH] [--repeats N]``.
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
    from diffusers import StableDiffusionPipeline

    from sdconcepts.backends.model_loading import DEFAULT_MODEL_DIR, load_model, model_from_components
    from sdconcepts.backends.sampling import make_scheduler, txt2img
    from sdconcepts.generation import GenerationParams

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, default=None, help="model (default: the embedded model, else a tiny one)")
    parser.add_argument("--sd15-random", action="store_true", help="an SD-1.5-shaped model with random weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=None, help="image size (default: the model's)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="DDIM")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.sd15_random:
        from sdconcepts.backends.tiny import build_reference_random

        components = build_reference_random("sd1", dtype=dtype)
        for name in ("unet", "vae", "text_encoder"):
            components[name].to(device).requires_grad_(False)  # type: ignore[attr-defined]
        model = model_from_components(components, name="sd15-random")
    else:
        ref = args.ckpt
        if ref is None and not DEFAULT_MODEL_DIR.exists():
            from sdconcepts.backends.tiny import save_tiny_sd1

            ref = save_tiny_sd1(Path(tempfile.mkdtemp()) / "tiny-sd1")
        model = load_model(ref, device=device)
    pipe = StableDiffusionPipeline(
        unet=model.unet, vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
        scheduler=make_scheduler(model, args.sampler), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    prompt, seed, cfg, size = "a red circle on a teal background", 1234, 7.0, args.size or model.default_size
    params = GenerationParams(prompt=prompt, steps=args.steps, sampler=args.sampler, cfg_scale=cfg, seed=seed,
                              width=size, height=size)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def ours() -> None:
        txt2img(model, params)

    def theirs() -> None:
        pipe(prompt, num_inference_steps=args.steps, guidance_scale=cfg, height=size, width=size,
             generator=torch.Generator("cpu").manual_seed(seed))

    med = interleaved_medians({"ours": ours, "pipeline": theirs}, args.repeats, sync=sync)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {args.threads} threads"
    print(f"model: {model.name} ({size}x{size}, {str(dtype).replace('torch.', '')}), {args.steps} steps "
          f"{args.sampler}, CFG {cfg}, {where}, {args.repeats} interleaved repeats")
    print(f"pipeline median: {med['pipeline'] * 1000:.1f} ms")
    print(f"ours     median: {med['ours'] * 1000:.1f} ms")
    print(f"ratio ours/pipeline: {med['ours'] / med['pipeline']:.3f} (goal <= 1.05)")


if __name__ == "__main__":
    main()
