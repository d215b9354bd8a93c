"""Benchmark: model weights in memory torch owns (what loading does now) against weights left on the file mapping.

safetensors hands out tensors over its file mapping at the file's byte offsets (not 64-byte aligned); loading copies
them once into torch-owned, aligned memory (`own_weights`). This measures both sides of that choice in one run:
the extra load time of the copy, and UNet forward time (batch 2, as with CFG) with mapped against owned weights,
interleaved. Usage: ``python bench/bench_load.py [--sd15-random] [--latent-size N] [--repeats N] [--threads N]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sdconcepts.backends.model_loading import DEFAULT_MODEL_DIR, load_model
    from sdconcepts.backends.single_file import own_weights

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd15-random", action="store_true", help="an SD-1.5-shaped UNet with random weights")
    parser.add_argument("--latent-size", type=int, default=None, help="latent size (default: the UNet's sample_size)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.sd15_random:
        from sdconcepts.backends.tiny import build_reference_random

        unet = build_reference_random("sd1")["unet"]
        name = "sd15-random UNet"
    else:
        unet = load_model(DEFAULT_MODEL_DIR, device="cpu").unet
        name = "toyworld UNet"
    config = dict(unet.config)  # type: ignore[attr-defined]
    size = args.latent_size or config["sample_size"]
    folder = Path(tempfile.mkdtemp())
    path = folder / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(path))  # type: ignore[attr-defined]
    del unet

    def mapped_unet() -> torch.nn.Module:
        with torch.device("meta"):
            model = UNet2DConditionModel.from_config(config)
        with safe_open(str(path), framework="pt", device="cpu") as f:
            model.load_state_dict({k: f.get_tensor(k) for k in f.keys()}, strict=True, assign=True)
        return model.eval().requires_grad_(False)

    load_times: dict[str, list[float]] = {"mapped": [], "owned": []}
    for _ in range(3):
        for kind in ("mapped", "owned"):
            start = time.perf_counter()
            model = mapped_unet()
            if kind == "owned":
                own_weights(model)
            load_times[kind].append(time.perf_counter() - start)
    mapped, owned = mapped_unet(), own_weights(mapped_unet())
    unaligned = sum(p.data_ptr() % 64 != 0 for p in mapped.parameters())
    total = sum(1 for _ in mapped.parameters())

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, config["in_channels"], size, size, generator=g)
    context = torch.randn(2, 77, config["cross_attention_dim"], generator=g)
    timestep = torch.tensor([500, 500])

    def forward(model: torch.nn.Module) -> None:
        with torch.no_grad():
            model(latents, timestep, encoder_hidden_states=context)

    for model in (mapped, owned, mapped, owned):  # warm-up
        forward(model)
    times: dict[str, list[float]] = {"mapped": [], "owned": []}
    for _ in range(args.repeats):
        for kind, model in (("mapped", mapped), ("owned", owned)):
            start = time.perf_counter()
            forward(model)
            times[kind].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    load = {k: statistics.median(v) for k, v in load_times.items()}
    size_mb = path.stat().st_size / 2**20
    print(f"model: {name}, {size_mb:.1f} MB fp32, latents {size}x{size}, batch 2, cpu, {args.threads} threads, "
          f"{args.repeats} interleaved repeats; mapped weights: {unaligned} of {total} parameters not 64-byte aligned")
    print(f"load (build + take tensors) median: mapped {load['mapped'] * 1000:.1f} ms, "
          f"owned {load['owned'] * 1000:.1f} ms (copy adds {(load['owned'] - load['mapped']) * 1000:.1f} ms)")
    print(f"UNet forward median: mapped {med['mapped'] * 1000:.2f} ms, owned {med['owned'] * 1000:.2f} ms")
    print(f"ratio owned/mapped: {med['owned'] / med['mapped']:.3f}")


if __name__ == "__main__":
    main()
