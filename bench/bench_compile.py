"""Benchmark: the compiled UNet against eager, for a textual inversion step and for sampling, in one run.

Cases (``--cases``): ``toy`` the embedded toy-world model at its 32 px, batch 4; ``sd15`` an SD-1.5-shaped model
with random weights (``backends.tiny.build_reference_random``) at 64 px, batch 4. For each:

- ``compile``: the wall time of the first compiled training step (tracing and compiling the forward and backward
  passes) and of the first compiled image (sampling's shapes compile again);
- ``step``: a TI step (``TrainingModel``: text encoder with the trained vectors, UNet forward, input-gradient
  backward, AdamW on the vectors), compiled over eager, medians of interleaved rounds (``bench/timing.py``);
- ``sampling``: one txt2img image (Euler a, ``--sample-steps`` steps, CFG 7), compiled over eager, interleaved;
- ``rss``: the process's peak RSS before compiling and after (what compiling the case added; a rough figure).

Ratios below 1 mean the compiled path is faster. CPU time of this process with one thread unless ``--threads``
(wall time on CUDA, synchronised). Compiling on CPU needs a C++ compiler; where it cannot, the bench says so and stops.

Usage: ``python bench/bench_compile.py [--cases toy,sd15] [--rounds 10] [--sample-steps 10] [--threads 1]
[--device cpu] [--no-sampling]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import interleaved_medians  # noqa: E402


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model(case: str, device: str) -> tuple[Any, int]:
    import torch

    from sdconcepts.backends.model_loading import load_model, model_from_components
    from sdconcepts.backends.tiny import build_reference_random

    if case == "toy":
        model = load_model(None, device=device)
        return model, model.default_size
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        components = build_reference_random("sd1", dtype=dtype)
    for name in ("unet", "vae", "text_encoder"):
        components[name].requires_grad_(False)  # type: ignore[attr-defined]
    model = model_from_components(components, name="sd15-random")
    model.device = torch.device(device)
    return model, 64


def _case(case: str, device: str, rounds: int, sample_steps: int, sampling: bool = True) -> dict[str, Any]:
    import torch

    from sdconcepts.backends.sampling import txt2img
    from sdconcepts.generation import GenerationParams
    from sdconcepts.training.training_model import TrainingModel

    model, size = _model(case, device)
    batch = 4
    width = int(model.context_width)
    vectors = (torch.randn(2, width, generator=torch.Generator().manual_seed(0)) * 0.02).to(device).requires_grad_(True)
    optimizer = torch.optim.AdamW([vectors], lr=5e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    latent = size // int(model.vae_scale_factor)
    noisy = torch.randn(batch, int(model.unet.config.in_channels), latent, latent, generator=g).to(device)
    timesteps = torch.randint(0, 1000, (batch,), generator=g).to(device)
    texts = ["a photo of zq"] * batch
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def stepper(training: TrainingModel) -> Any:
        def step() -> None:
            out = training.predict(noisy, timesteps, training.encode_text(texts))
            out.float().square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    params = GenerationParams(prompt="a photo of zq", steps=sample_steps, seed=3, width=size, height=size,
                              sampler="Euler a")

    def sampler(compiled: bool) -> Any:
        return lambda: txt2img(model, params, embeddings={"zq": vectors.detach()}, compile_unet=compiled)

    eager = TrainingModel(model, {"zq": vectors})
    rss_before = _peak_rss_mb()
    compiled = TrainingModel(model, {"zq": vectors}, compile_unet=True)
    assert compiled.compiled is not None
    if compiled.compiled.fallback:
        return {"case": case, "fallback": compiled.compiled.fallback}
    start = time.perf_counter()
    stepper(compiled)()
    sync()
    first_step = time.perf_counter() - start
    first_image = float("nan")
    if sampling:
        start = time.perf_counter()
        sampler(True)()
        sync()
        first_image = time.perf_counter() - start
    rss_after = _peak_rss_mb()
    clock = time.perf_counter if cuda else time.process_time
    steps = interleaved_medians({"eager": stepper(eager), "compiled": stepper(compiled)}, rounds, sync=sync,
                                clock=clock)
    images = {"eager": float("nan"), "compiled": float("nan")}
    if sampling:
        images = interleaved_medians({"eager": sampler(False), "compiled": sampler(True)}, max(2, rounds // 3),
                                     warmup=1, sync=sync, clock=clock)
    return {
        "case": case, "size": size, "batch": batch, "device": device, "fallback": compiled.compiled.fallback,
        "first_compiled_step_s": first_step, "first_compiled_image_s": first_image,
        "step_eager_s": steps["eager"], "step_compiled_s": steps["compiled"],
        "step_ratio": steps["compiled"] / steps["eager"],
        "image_eager_s": images["eager"], "image_compiled_s": images["compiled"],
        "sampling_ratio": images["compiled"] / images["eager"],
        "peak_rss_mb_before_compile": rss_before, "peak_rss_mb_after_compile": rss_after,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="toy,sd15")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-sampling", action="store_true",
                        help="the training step only (sampling's shapes compile again: minutes more on a CPU)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    results = []
    for case in args.cases.split(","):
        row = _case(case, args.device, args.rounds, args.sample_steps, sampling=not args.no_sampling)
        results.append(row)
        if row.get("fallback"):
            print(f"{case}: {row['fallback']}", flush=True)
            continue
        print(f"{case} batch 4 at {row['size']} px: step compiled/eager {row['step_ratio']:.3f} "
              f"({row['step_compiled_s'] * 1e3:.1f} vs {row['step_eager_s'] * 1e3:.1f} ms); sampling "
              f"{row['sampling_ratio']:.3f} ({row['image_compiled_s']:.2f} vs {row['image_eager_s']:.2f} s/image); "
              f"first compiled step {row['first_compiled_step_s']:.1f} s, first compiled image "
              f"{row['first_compiled_image_s']:.1f} s; peak RSS {row['peak_rss_mb_before_compile']:.0f} -> "
              f"{row['peak_rss_mb_after_compile']:.0f} MB", flush=True)
    print(json.dumps({"torch": torch.__version__, "load_average": os.getloadavg(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
