"""The probe: a small CNN that names the shape, colour and background of a toy-world image.

Generated images are scored through it (never by pixel comparison). It is trained on the world generator with
noise and blur augmentation, and its weights ship as ``assets/toyworld/probe.safetensors`` with a json config.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from sdconcepts.toyworld import world

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "toyworld"
PROBE_WEIGHTS = ASSETS / "probe.safetensors"
PROBE_CONFIG = ASSETS / "probe.json"
HEADS: tuple[str, ...] = ("shape", "colour", "background")


class Probe(nn.Module):
    """Conv trunk with one linear head per attribute; input is (N, 3, 32, 32) in [0, 1]."""

    def __init__(self, labels: Mapping[str, Sequence[str]], width: int = 32) -> None:
        super().__init__()
        self.labels = {name: tuple(values) for name, values in labels.items()}
        w = width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.trunk = nn.Sequential(
            *block(3, w),
            *block(w, w),
            nn.MaxPool2d(2),
            *block(w, 2 * w),
            nn.MaxPool2d(2),
            *block(2 * w, 2 * w),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * w * 16, 128),
            nn.ReLU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(values)) for name, values in self.labels.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x * 2 - 1)
        return {name: head(h) for name, head in self.heads.items()}


def to_tensor(images: Iterable[Image.Image]) -> torch.Tensor:
    """Stack PIL images as a float (N, 3, 32, 32) tensor in [0, 1], resizing any other size to 32x32."""
    arrays = []
    for image in images:
        rgb = image.convert("RGB")
        if rgb.size != (world.SIZE, world.SIZE):
            rgb = rgb.resize((world.SIZE, world.SIZE), Image.Resampling.BOX)
        arrays.append(np.asarray(rgb, dtype=np.float32) / 255.0)
    if not arrays:
        return torch.zeros(0, 3, world.SIZE, world.SIZE)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable Gaussian blur (sigma 0 leaves the image unchanged)."""
    offsets = torch.arange(-2, 3, dtype=x.dtype)
    s = sigma.clamp(min=1e-3)[:, None]
    kernel = torch.exp(-(offsets[None, :] ** 2) / (2 * s**2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (N, 5)
    n, c, h, w = x.shape
    flat = x.reshape(1, n * c, h, w)
    k = kernel.repeat_interleave(c, dim=0)
    flat = nn.functional.conv2d(
        nn.functional.pad(flat, (2, 2, 0, 0), mode="replicate"), k[:, None, None, :], groups=n * c
    )
    flat = nn.functional.conv2d(
        nn.functional.pad(flat, (0, 0, 2, 2), mode="replicate"), k[:, None, :, None], groups=n * c
    )
    return flat.reshape(n, c, h, w)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur, brightness/contrast wobble and noise, to cover what a VAE decoder does to an image."""
    n = x.shape[0]
    sigma = torch.rand(n, generator=generator) * 1.2
    x = _blur(x, sigma)
    gain = 1 + (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.16
    shift = (torch.rand(n, 3, 1, 1, generator=generator) - 0.5) * 0.06
    noise = torch.randn(x.shape, generator=generator) * torch.rand(n, 1, 1, 1, generator=generator) * 0.06
    return (x * gain + shift + noise).clamp(0, 1)


def _batch(rng: random.Random, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    images: list[Image.Image] = []
    targets: dict[str, list[int]] = {name: [] for name in HEADS}
    for _ in range(n):
        attrs = world.random_attributes(rng)
        images.append(world.draw(attrs.shape, attrs.colour, attrs.background, rng))
        for name, value in attrs.as_dict().items():
            targets[name].append(world.ATTRIBUTES[name].index(value))
    return to_tensor(images), {name: torch.tensor(v) for name, v in targets.items()}


def train_probe(
    steps: int = 800,
    batch_size: int = 128,
    seed: int = 0,
    lr: float = 2e-3,
    progress: Callable[[int, float], None] | None = None,
) -> Probe:
    """Train a probe from scratch on freshly drawn, augmented images (deterministic for a seed and thread count)."""
    torch.manual_seed(seed)
    model = Probe(world.ATTRIBUTES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        x, y = _batch(rng, batch_size)
        logits = model(augment(x, generator))
        loss = sum(nn.functional.cross_entropy(logits[name], y[name]) for name in HEADS)
        assert isinstance(loss, torch.Tensor)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step, float(loss))
    return model.eval()


def save_probe(model: Probe, weights: Path = PROBE_WEIGHTS, config: Path = PROBE_CONFIG, **info: object) -> None:
    """Write the probe's weights (safetensors) and a json config (labels plus ``info``)."""
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights))
    config.write_text(json.dumps({"labels": model.labels, **info}, indent=2) + "\n")


@lru_cache(maxsize=2)
def load_probe(weights: Path = PROBE_WEIGHTS, config: Path = PROBE_CONFIG) -> Probe:
    """Load the shipped probe (eval mode)."""
    meta = json.loads(Path(config).read_text())
    model = Probe(meta["labels"])
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


@torch.no_grad()
def classify(images: Sequence[Image.Image], probe: Probe | None = None) -> list[dict[str, str]]:
    """Name the shape, colour and background of each image."""
    model = probe if probe is not None else load_probe()
    out: list[dict[str, str]] = [{} for _ in images]
    for start in range(0, len(images), 256):
        logits = model(to_tensor(images[start : start + 256]))
        for name, values in model.labels.items():
            for i, index in enumerate(logits[name].argmax(dim=1).tolist()):
                out[start + i][name] = values[index]
    return out


def score(images: Sequence[Image.Image], expect: Mapping[str, str], probe: Probe | None = None) -> dict[str, float]:
    """Fraction of ``images`` whose probed attribute equals the expected value, for each attribute in ``expect``."""
    for name, value in expect.items():
        if name not in world.ATTRIBUTES:
            raise ValueError(f"unknown attribute {name!r}; expected one of {', '.join(world.ATTRIBUTES)}")
        if value not in world.ATTRIBUTES[name]:
            raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(world.ATTRIBUTES[name])}")
    if not images:
        raise ValueError("no images to score")
    found = classify(images, probe)
    return {name: sum(f[name] == value for f in found) / len(found) for name, value in expect.items()}


def held_out_accuracy(n: int = 2000, seed: int = 12345, probe: Probe | None = None) -> dict[str, float]:
    """Accuracy per attribute on ``n`` freshly drawn images (a seed the probe was not trained on)."""
    pairs = world.sample(n, seed)
    found = classify([image for image, _ in pairs], probe)
    return {
        name: sum(f[name] == getattr(attrs, name) for f, (_, attrs) in zip(found, pairs, strict=True)) / n
        for name in HEADS
    }


def main(steps: int = 800, seed: int = 0, threads: int = 2) -> dict[str, float]:
    """Train, evaluate and save the shipped probe."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = train_probe(steps=steps, seed=seed)
    seconds = time.perf_counter() - start
    accuracy = held_out_accuracy(probe=model)
    save_probe(
        model,
        train={"steps": steps, "batch_size": 128, "seed": seed, "threads": threads, "seconds": round(seconds, 1)},
        held_out_accuracy=accuracy,
    )
    load_probe.cache_clear()
    return accuracy
