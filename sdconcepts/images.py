"""Saving generated images: A1111's file naming and its ``parameters`` PNG text chunk."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image, PngImagePlugin

from sdconcepts.atomic_files import atomic_path

_NUMBERED = re.compile(r"^(\d+)-")


def save_png(image: Image.Image, path: Path, infotext: str | None) -> Path:
    """Write a PNG atomically, with the infotext in a ``parameters`` tEXt chunk that A1111's PNG Info reads."""
    info = PngImagePlugin.PngInfo()
    if infotext:
        info.add_text("parameters", infotext)
    # atomic_path gives the file the mode open() would (the umask's), not mkstemp's 0600.
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def read_infotext(path: Path) -> str | None:
    """The ``parameters`` text of a PNG, as A1111's PNG Info tab reads it."""
    with Image.open(path) as image:
        value = image.info.get("parameters")
    return value if isinstance(value, str) else None


def next_image_path(directory: Path, seed: int) -> Path:
    """A1111's ``NNNNN-seed.png`` naming: the number continues after the highest one in the folder."""
    highest = -1
    if directory.is_dir():
        for entry in directory.iterdir():
            match = _NUMBERED.match(entry.name)
            if match:
                highest = max(highest, int(match.group(1)))
    return directory / f"{highest + 1:05d}-{seed}.png"
