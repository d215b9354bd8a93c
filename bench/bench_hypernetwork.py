"""Benchmark: what hypernetworks add to txt2img time, ours against A1111's way, measured interleaved in one run.

Modes (same model, prompt, seed, sampler, steps):

- ``base``: no hypernetwork;
- ``text``: a hypernetwork with only the text-width module (768 on SD 1.5), through the prompt tag (ours);
- ``all``: modules for the text width and every self-attention width (768+320+640+1280 on SD 1.5: A1111's
  create-form default, ``[1, 2, 1]``, linear), through the prompt tag (ours);
- ``*-a1111``: the same hypernetwork computed A1111's way (every module, every layer, every call);
- ``relu-*``: the default widths with ``relu`` (not foldable: only the shared first layer and the text cache help).

Goals (issue 5): ``text`` adds ≤ 2 % to generation time; ``all``'s overhead ≤ 0.85× ``all-a1111``'s.
Usage: ``python bench/bench_hypernetwork.py [--model tiny|sd15] [--steps N] [--repeats N] [--device cuda]``.

``--work`` measures the hypernetwork work alone, which whole generations on a shared CPU cannot resolve: the key and
value inputs of every attention layer are captured from one UNet call, then the layers' ``to_k``/``to_v`` are timed
on them without hooks, with ours and with A1111's way (minimum of the repeats, this process's CPU time).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import nullcontext
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from sdconcepts.backends.model_loading import model_from_components
    from sdconcepts.backends.sampling import txt2img
    from sdconcepts.backends.tiny import build_reference_random, build_tiny_sd1
    from sdconcepts.generation import GenerationParams
    from sdconcepts.hypernetworks.attach import attach_hypernetworks, attention_layers
    from sdconcepts.hypernetworks.hypernetwork import create_hypernetwork
    from sdconcepts.hypernetworks.tags import resolve_in_memory

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=None, help="image size (default: the model's, 512 for sd15)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or this process's CPU time (steadier on a shared CPU; use with --threads 1)")
    parser.add_argument("--work", action="store_true", help="time the hypernetwork work per UNet call (see above)")
    parser.add_argument("--modes", default="base,text,text-a1111,all,all-a1111,relu-all,relu-all-a1111")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32

    components: dict[str, Any] = build_tiny_sd1() if args.model == "tiny" else build_reference_random("sd1", dtype=dtype)
    for name in ("unet", "vae", "text_encoder"):
        components[name].to(device=device, dtype=dtype).requires_grad_(False)
    model = model_from_components(components, name=args.model)
    widths = sorted({layer.width for layer in attention_layers(model.unet)})
    text_width = model.context_width
    self_widths = [w for w in widths if w != text_width]
    hypernetworks = {
        "text": create_hypernetwork("text", (text_width,), generator_seed=1),
        "all": create_hypernetwork("all", (text_width, *self_widths), generator_seed=2),
        "relu-all": create_hypernetwork("relu-all", (text_width, *self_widths), activation="relu", generator_seed=3),
    }
    for hypernetwork in hypernetworks.values():
        hypernetwork.to(device)
    if args.work:
        _work(model, hypernetworks, args, text_width)
        return
    modes = args.modes.split(",")
    params = GenerationParams(
        prompt="a photo of a cat", steps=args.steps, sampler="DDIM", cfg_scale=7.0, seed=1, batch_size=args.batch_size,
        width=args.size or (512 if args.model == "sd15" else None), height=args.size or (512 if args.model == "sd15" else None),
    )

    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def run(mode: str) -> float:
        name = mode.removesuffix("-a1111")
        prompt = params.prompt if mode == "base" or mode.endswith("-a1111") else f"{params.prompt} <hypernet:{name}:1>"
        context = (
            attach_hypernetworks(model.unet, [(hypernetworks[name], 1.0)], fast=False)
            if mode.endswith("-a1111")
            else nullcontext()
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        with context:
            txt2img(model, params.__class__(**{**params.__dict__, "prompt": prompt}),
                    hypernetworks=resolve_in_memory(prompt, hypernetworks, model.unet))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return clock() - start

    run("base")  # warm-up (allocator, first-call costs)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for repeat in range(args.repeats):
        order = modes if repeat % 2 == 0 else modes[::-1]
        for mode in order:
            times[mode].append(run(mode))
    median = {mode: statistics.median(values) for mode, values in times.items()}
    best = {mode: min(values) for mode, values in times.items()}
    print(
        f"model={args.model} device={device} dtype={dtype} threads={torch.get_num_threads()} "
        f"size={params.width or model.default_size} steps={args.steps} batch={args.batch_size} "
        f"repeats={args.repeats} clock={args.clock} widths={widths} (text {text_width})"
    )
    for mode in modes:
        spread = (max(times[mode]) - min(times[mode])) / median[mode]
        print(
            f"  {mode:15s} median {median[mode] * 1000:9.1f} ms ({median[mode] / median['base']:6.3f}x base)   "
            f"min {best[mode] * 1000:9.1f} ms ({best[mode] / best['base']:6.3f}x base)   spread {spread:5.1%}"
        )
    # Medians and minimums both: on a shared CPU the minimum is the steadier estimate of the work itself.
    for label, stat in (("median", median), ("min", best)):
        base = stat["base"]
        if "text" in stat:
            print(f"[{label}] text-only hypernetwork adds {(stat['text'] - base) / base:+.2%} to generation time (goal <= 2 %)")
        for name in ("text", "all", "relu-all"):
            reference = stat.get(f"{name}-a1111", base) - base
            if name in stat and reference > 0:
                ratio = (stat[name] - base) / reference
                goal = "  (goal <= 0.85)" if name == "all" else ""
                print(f"[{label}] {name}: our overhead / A1111-way overhead = {ratio:.3f}{goal}")


def _work(model: Any, hypernetworks: dict[str, Any], args: argparse.Namespace, text_width: int) -> None:
    from sdconcepts.hypernetworks.attach import attach_hypernetworks, attention_layers

    size = args.size or (512 if args.model == "sd15" else model.default_size)
    latent = size // model.vae_scale_factor
    unet = model.unet
    param = next(unet.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, latent, latent, generator=g).to(param)
    context = torch.randn(2, 77, text_width, generator=g).to(param)
    layers = attention_layers(unet)
    captured: list[tuple[Any, torch.Tensor]] = []
    hooks = [
        layer.to_k.register_forward_pre_hook(lambda _m, a, layer=layer: captured.append((layer, a[0])))
        for layer in layers
    ]
    with torch.no_grad():
        unet(x, torch.tensor([500]), encoder_hidden_states=context)
    for hook in hooks:
        hook.remove()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def projections() -> float:
        start = clock()
        with torch.no_grad():
            for layer, inputs in captured:
                layer.to_k(inputs)
                layer.to_v(inputs)
        return clock() - start

    def best(repeats: int) -> float:
        projections()  # warm-up; in the fast mode this also fills the text cache, as the first step does
        return min(projections() for _ in range(repeats))

    tokens = sorted({(layer.width, inputs.shape[1]) for layer, inputs in captured})
    print(f"model={args.model} size={size} batch=2 (CFG) layers={len(captured)} (width, tokens)={tokens} clock={args.clock}")
    base = best(args.repeats)
    print(f"  to_k+to_v of every layer, no hypernetwork: {base * 1000:9.1f} ms per UNet call")
    for name in ("text", "all", "relu-all"):
        results = {}
        for fast in (True, False):
            with attach_hypernetworks(unet, [(hypernetworks[name], 1.0)], fast=fast):
                start = clock()
                projections()
                first = clock() - start
                results[fast] = (best(args.repeats) - base, first - base)
        ours, a1111 = results[True][0], results[False][0]
        once = max(results[True][1] - ours, 0.0)  # the text chain, computed on the first call only
        steps = args.steps
        ratio = (steps * ours + once) / (steps * a1111) if a1111 > 0 else float("nan")
        print(
            f"  {name:9s} added per UNet call: ours {ours * 1000:8.2f} ms (+{once * 1000:.1f} ms once per generation), "
            f"A1111's way {a1111 * 1000:8.2f} ms; over {steps} steps ours/A1111 = {ratio:.3f}"
        )


if __name__ == "__main__":
    main()
