"""Benchmark: our img2img and inpainting against diffusers' StableDiffusionImg2ImgPipeline / InpaintPipeline.

Same model, prompt, seed, sampler, steps and denoising strength, measured interleaved in one run; prints medians
and ratios (goal: ours <= 1.05x the pipeline). A1111's step arithmetic runs ``int(min(strength, 0.999) * steps) + 1``
sampler steps where diffusers runs ``int(strength * steps)``, one more below strength 1; so a second ratio compares
against the pipeline given the strength that makes it run as many steps as we do ("equal steps").

Usage: ``python bench/bench_img2img.py [--ckpt PATH | --sd15-random] [--inpainting-model] [--strength D]
[--clock cpu]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdconcepts.backends.model_loading import DEFAULT_MODEL_DIR, load_model, model_from_components
    from sdconcepts.backends.tokenizer import load_clip_tokenizer
    from sdconcepts.checkpoints.configs import reference_configs

    in_channels = 9 if args.inpainting_model else 4
    if args.sd15_random:
        configs = reference_configs("sd1")
        torch.manual_seed(0)
        components = {
            "unet": UNet2DConditionModel(**{**configs["unet"], "in_channels": in_channels}),
            "vae": AutoencoderKL(**configs["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
            "tokenizer": load_clip_tokenizer("sd1"),
            "scheduler": DDIMScheduler.from_config({k: v for k, v in configs["scheduler"].items() if k[0] != "_"}),
        }
        for name in ("unet", "vae", "text_encoder"):
            components[name].to(device=device, dtype=dtype).eval().requires_grad_(False)
        return model_from_components(components, name="sd15-random" + ("-inpainting" if in_channels == 9 else ""))
    ref = args.ckpt
    if ref is None and (in_channels == 9 or not DEFAULT_MODEL_DIR.exists()):
        from sdconcepts.backends.tiny import save_tiny_sd1

        ref = save_tiny_sd1(Path(tempfile.mkdtemp()) / "tiny-sd1", in_channels=in_channels)
    return load_model(ref, device=device)


def main() -> None:
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    from sdconcepts.backends.sampler_start import is_inpainting_model
    from sdconcepts.backends.sampling import img2img, make_scheduler
    from sdconcepts.generation import GenerationParams
    from sdconcepts.img2img import Img2ImgOptions, img2img_steps

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--ckpt", type=Path, default=None, help="model (default: the embedded model, else a tiny one)")
    parser.add_argument("--sd15-random", action="store_true", help="an SD-1.5-shaped model with random weights")
    parser.add_argument("--inpainting-model", action="store_true",
                        help="a 9-channel inpainting UNet (tiny, or SD-1.5-shaped with --sd15-random)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=None, help="image size (default: the model's)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strength", type=float, default=0.75)
    parser.add_argument("--sampler", default="DDIM")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU time, steadier than wall time on a shared machine (CPU only)")
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = _model(args, device, dtype)
    size = args.size or model.default_size
    parts = {"unet": model.unet, "vae": model.vae, "text_encoder": model.text_encoder, "tokenizer": model.tokenizer,
             "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    img_pipe = StableDiffusionImg2ImgPipeline(**parts, scheduler=make_scheduler(model, args.sampler))
    inpaint_pipe = StableDiffusionInpaintPipeline(**parts, scheduler=make_scheduler(model, args.sampler))
    for pipe in (img_pipe, inpaint_pipe):
        pipe.set_progress_bar_config(disable=True)

    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    mask = Image.new("L", (size, size))
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    prompt, seed, cfg = "a red circle on a teal background", 1234, 7.0
    params = GenerationParams(prompt=prompt, steps=args.steps, sampler=args.sampler, cfg_scale=cfg, seed=seed,
                              width=size, height=size)
    _, sampled = img2img_steps(args.steps, args.strength)
    equal_strength = sampled / args.steps  # diffusers then runs int(equal_strength * steps) == sampled steps

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            fn()
            sync()

        return run

    generator = lambda: torch.Generator("cpu").manual_seed(seed)  # noqa: E731
    options = Img2ImgOptions(denoising_strength=args.strength, mask_blur=0)
    cases: dict[str, dict[str, Callable[[], None]]] = {}
    if not is_inpainting_model(model):
        cases["img2img"] = {
            "ours": timed(lambda: img2img(model, params, init, options=options)),
            "pipeline": timed(lambda: img_pipe(prompt, image=init, strength=args.strength, num_inference_steps=args.steps,
                                               guidance_scale=cfg, generator=generator())),
            "pipeline equal steps": timed(lambda: img_pipe(prompt, image=init, strength=equal_strength,
                                                           num_inference_steps=args.steps, guidance_scale=cfg,
                                                           generator=generator())),
        }
    cases["inpaint"] = {
        "ours": timed(lambda: img2img(model, params, init, mask=mask, options=options)),
        "pipeline": timed(lambda: inpaint_pipe(prompt, image=init, mask_image=mask, strength=args.strength,
                                               num_inference_steps=args.steps, guidance_scale=cfg, height=size,
                                               width=size, generator=generator())),
        "pipeline equal steps": timed(lambda: inpaint_pipe(prompt, image=init, mask_image=mask, strength=equal_strength,
                                                           num_inference_steps=args.steps, guidance_scale=cfg,
                                                           height=size, width=size, generator=generator())),
    }
    for runs in cases.values():  # warm-up
        for fn in runs.values():
            fn()
    times: dict[str, dict[str, list[float]]] = {case: {name: [] for name in runs} for case, runs in cases.items()}
    for _ in range(args.repeats):
        for case, runs in cases.items():
            for name, fn in runs.items():
                start = clock()
                fn()
                times[case][name].append(clock() - start)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {args.threads} threads"
    print(f"model: {model.name} ({size}x{size}, {str(dtype).replace('torch.', '')}, UNet in_channels "
          f"{int(model.unet.config.in_channels)}), {args.steps} steps {args.sampler}, strength {args.strength} "
          f"(we run {sampled} steps, the pipeline {int(args.steps * args.strength)}), CFG {cfg}, {where}, "
          f"{args.repeats} interleaved repeats, {args.clock} clock")
    for case, runs in times.items():
        med = {name: statistics.median(values) for name, values in runs.items()}
        print(f"{case}: " + ", ".join(f"{name} {value * 1000:.1f} ms" for name, value in med.items()))
        print(f"{case}: ratio ours/pipeline {med['ours'] / med['pipeline']:.3f}; "
              f"equal steps {med['ours'] / med['pipeline equal steps']:.3f} (goal <= 1.05)")


if __name__ == "__main__":
    main()
