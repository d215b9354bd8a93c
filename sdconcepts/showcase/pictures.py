"""Pictures of the showcase: the grids (rows of the same seeds with and without what was learned), and where the
shape sits in a toy picture (its centre and size), from which the variation use reports its spread."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

ZOOM = 3  # 32 px pictures shown at 96 px, nearest neighbour: the pixels stay visible
LABEL_WIDTH = 150
GAP = 2


def grid(rows: Sequence[tuple[str, Sequence[Image.Image]]], *, columns: int = 8) -> Image.Image:
    """One picture: a labelled row per (label, pictures), the first ``columns`` pictures of each, zoomed."""
    side = 32 * ZOOM
    width = LABEL_WIDTH + columns * (side + GAP)
    sheet = Image.new("RGB", (width, len(rows) * (side + GAP)), (255, 255, 255))
    pen = ImageDraw.Draw(sheet)
    for r, (label, pictures) in enumerate(rows):
        top = r * (side + GAP)
        for line, text in enumerate(_wrap(label, 22)):
            pen.text((4, top + 4 + 12 * line), text, fill=(0, 0, 0))
        for c, picture in enumerate(list(pictures)[:columns]):
            zoomed = picture.convert("RGB").resize((side, side), Image.Resampling.NEAREST)
            sheet.paste(zoomed, (LABEL_WIDTH + c * (side + GAP), top))
    return sheet


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def shape_pixels(image: Image.Image, threshold: int = 40) -> np.ndarray:
    """The shape's pixels (bool HxW): those farther than ``threshold`` levels from the background, the corners'
    median colour."""
    array = np.asarray(image.convert("RGB"), dtype=np.int16)
    corners = np.stack([array[0, 0], array[0, -1], array[-1, 0], array[-1, -1]])
    background = np.median(corners, axis=0)
    differs: np.ndarray = np.abs(array - background).max(axis=2) > threshold
    return differs


def locate(image: Image.Image) -> tuple[float, float, float] | None:
    """(x, y, size) of the shape as fractions of the picture's side: its pixels' centre and the square root of
    their share of the picture; None when no pixel stands out."""
    pixels = shape_pixels(image)
    ys, xs = np.nonzero(pixels)
    if len(xs) == 0:
        return None
    h, w = pixels.shape
    return float(xs.mean() + 0.5) / w, float(ys.mean() + 0.5) / h, math.sqrt(len(xs) / (h * w))


def spread(images: Sequence[Image.Image]) -> dict[str, float]:
    """How varied the shapes' placement is: the standard deviation of x, y and size, and the mean distance between
    two pictures' (x, y) centres (fractions of the side)."""
    found = np.array([p for p in (locate(image) for image in images) if p is not None])
    if len(found) < 2:
        return {"x_sd": 0.0, "y_sd": 0.0, "size_sd": 0.0, "centre_distance": 0.0, "located": float(len(found))}
    centres = found[:, :2]
    distances = np.sqrt(((centres[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2))
    n = len(found)
    return {
        "x_sd": round(float(found[:, 0].std()), 4),
        "y_sd": round(float(found[:, 1].std()), 4),
        "size_sd": round(float(found[:, 2].std()), 4),
        "centre_distance": round(float(distances.sum() / (n * (n - 1))), 4),
        "located": float(n),
    }


def box_mask(image: Image.Image, padding: int = 1) -> Image.Image:
    """White (an L mask) on the box around the shape's pixels, grown by ``padding``; all white if none stand out."""
    pixels = shape_pixels(image)
    ys, xs = np.nonzero(pixels)
    h, w = pixels.shape
    mask = np.zeros((h, w), dtype=np.uint8)
    if len(xs) == 0:
        mask[:] = 255
    else:
        mask[max(0, ys.min() - padding) : ys.max() + 1 + padding, max(0, xs.min() - padding) : xs.max() + 1 + padding] = 255
    return Image.fromarray(mask, "L")
