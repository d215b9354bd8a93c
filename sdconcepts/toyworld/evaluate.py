"""Quality of a toy-world model: generate from random prompts and score the images through the probe."""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

from sdconcepts.toyworld import world
from sdconcepts.toyworld.probe import classify

BARS = {"colour": 0.95, "shape": 0.90, "background": 0.80}


def eval_prompts(samples: int, seed: int = 0) -> list[tuple[str, world.Attributes, bool]]:
    """``samples`` random prompts (prompt, attributes, names_background); every other one names the background."""
    rng = random.Random(f"eval-{seed}")
    prompts = []
    for i in range(samples):
        attrs = world.random_attributes(rng)
        named = i % 2 == 1
        prompts.append((f"a {world.describe(attrs, background=named)}", attrs, named))
    return prompts


def evaluate(
    model: Path | None = None,
    *,
    samples: int = 240,
    seed: int = 0,
    steps: int = 20,
    guidance: float = 5.0,
    sampler: str = "DDIM",
) -> dict[str, Any]:
    """Generate one image per random prompt (fixed seeds) and report probe accuracies against the bars."""
    from sdconcepts.toyworld.models import generate  # lazy: diffusers

    prompts = eval_prompts(samples, seed)
    seeds = [seed * 1_000_003 + i for i in range(samples)]
    start = time.perf_counter()
    images = generate(model, [p for p, _, _ in prompts], seeds, steps=steps, guidance=guidance, sampler=sampler)
    seconds = time.perf_counter() - start
    found = classify(images)
    colour = [f["colour"] == a.colour for f, (_, a, _) in zip(found, prompts, strict=True)]
    shape = [f["shape"] == a.shape for f, (_, a, _) in zip(found, prompts, strict=True)]
    background = [f["background"] == a.background for f, (_, a, named) in zip(found, prompts, strict=True) if named]
    unnamed = Counter(f["background"] for f, (_, _, named) in zip(found, prompts, strict=True) if not named)

    def rate(hits: list[bool]) -> float:
        return round(sum(hits) / len(hits), 4) if hits else float("nan")

    accuracy = {"colour": rate(colour), "shape": rate(shape), "background": rate(background)}
    return {
        "samples": samples,
        "background_named": len(background),
        "steps": steps,
        "guidance": guidance,
        "sampler": sampler,
        "seed": seed,
        "model": str(model) if model is not None else "shipped",
        "accuracy": accuracy,
        "colour": accuracy["colour"],
        "shape": accuracy["shape"],
        "background": accuracy["background"],
        "shape_and_colour": rate([c and s for c, s in zip(colour, shape, strict=True)]),
        "unnamed_background_histogram": {b: unnamed.get(b, 0) for b in world.BACKGROUNDS},
        "bars": BARS,
        "passed": all(accuracy[k] >= bar for k, bar in BARS.items() if background or k != "background"),
        "seconds": round(seconds, 2),
        "seconds_per_image": round(seconds / samples, 4),
    }


def format_report(report: dict[str, Any]) -> str:
    """A short human-readable summary of ``evaluate``'s report."""
    acc = report["accuracy"]
    lines = [
        f"{report['samples']} generations ({report['steps']} steps, {report['sampler']}, guidance {report['guidance']}), "
        f"{report['seconds']:.1f} s",
        f"colour      {acc['colour']:7.1%}  (bar {BARS['colour']:.0%})",
        f"shape       {acc['shape']:7.1%}  (bar {BARS['shape']:.0%})",
        f"background  {acc['background']:7.1%}  (bar {BARS['background']:.0%}, over {report['background_named']} "
        "prompts that name it)",
        "unnamed backgrounds: " + ", ".join(f"{k} {v}" for k, v in report["unnamed_background_histogram"].items()),
        "PASS" if report["passed"] else "FAIL",
    ]
    return "\n".join(lines)
