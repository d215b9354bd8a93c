"""Concept kits: training images of a concept whose fixed attributes the captions never name, and image loading."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from sdconcepts.toyworld import world

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def write_concept(
    out: Path,
    *,
    count: int = 5,
    seed: int = 0,
    shape: str | None = None,
    colour: str | None = None,
    background: str | None = None,
) -> list[Path]:
    """Write ``count`` PNGs with same-name ``.txt`` captions to ``out``; returns the image paths.

    The given attributes are fixed in every image and never named in the captions; the others vary and are named.
    """
    fixed = {name for name, value in (("shape", shape), ("colour", colour), ("background", background)) if value}
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (image, attrs) in enumerate(world.sample(count, seed, shape=shape, colour=colour, background=background)):
        path = out / f"concept_{i:03d}.png"
        image.save(path)
        path.with_suffix(".txt").write_text(world.concept_caption(attrs, fixed) + "\n")
        paths.append(path)
    return paths


def load_images(folder: Path) -> list[Image.Image]:
    """Every image in ``folder`` (not recursive), in name order, as RGB."""
    images = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
    return images
