"""The Preprocess images sub-tab's work, with PIL only: A1111 1.6's resize/crop, flipped copies, split of oversized
images and captions (a1111-compat §4.8); no captioning models. Outputs are ``NNNNN-S-<original name>.png`` with a
same-name ``.txt`` caption when there is one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from sdconcepts.images import ImageProblem, open_image
from sdconcepts.limits import MAX_IMAGE_SIDE, MAX_SOURCE_PIXELS
from sdconcepts.training.dataset import read_caption
from sdconcepts.ui.ui_session import UiError

__all__ = ["CAPTION_ACTIONS", "PreprocessReport", "PreprocessSettings", "caption_from_name", "preprocess_images",
           "run_preprocess", "split_image"]

CAPTION_ACTIONS = ("ignore", "copy", "prepend", "append")
_NUMBERS_AT_START = re.compile(r"^[-\d]+")


@dataclass(frozen=True)
class PreprocessSettings:
    """A1111's fields: size 512, caption action "ignore", split threshold 0.5 and overlap 0.2; plus captions made
    from file names (A1111 made them with BLIP or deepbooru)."""

    width: int = 512
    height: int = 512
    caption_action: str = "ignore"
    keep_size: bool = False
    flip: bool = False
    split: bool = False
    split_threshold: float = 0.5
    overlap_ratio: float = 0.2
    caption_from_name: bool = False


def caption_from_name(path: Path) -> str:
    """The words of a file name as A1111's dataset reads them: leading digits and dashes dropped, ``_`` as spaces."""
    return " ".join(_NUMBERS_AT_START.sub("", path.stem).replace("_", " ").split())


def _cover(image: Image.Image, width: int, height: int) -> Image.Image:
    """A1111's resize mode 1 ("crop and resize"): scale to cover the size, then crop the centre."""
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    resized = image.resize(_checked_size(size), Image.Resampling.LANCZOS)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def _checked_size(size: tuple[int, int]) -> tuple[int, int]:
    """An intermediate resize stays under the source-image limit: a 1-pixel-wide strip scaled to cover 512x512 would
    otherwise ask for billions of pixels."""
    if size[0] * size[1] > MAX_SOURCE_PIXELS:
        raise ImageProblem(f"aspect ratio too extreme: resizing to {size[0]}×{size[1]} would exceed "
                           f"{MAX_SOURCE_PIXELS} pixels")
    return size


def split_image(image: Image.Image, inverse_xy: bool, width: int, height: int, overlap: float) -> Iterator[Image.Image]:
    """A1111's split_pic: scale the short side to the size, then overlapping crops along the long side."""
    from_w, from_h = (image.height, image.width) if inverse_xy else (image.width, image.height)
    to_w, to_h = (height, width) if inverse_xy else (width, height)
    h = from_h * to_w // from_w
    image = image.resize(_checked_size((h, to_w) if inverse_xy else (to_w, h)), Image.Resampling.LANCZOS)
    count = max(2, math.ceil((h - to_h * overlap) / (to_h * (1.0 - overlap))))
    step = (h - to_h) / (count - 1)
    for i in range(count):
        y = int(step * i)
        yield image.crop((y, 0, y + to_h, to_w) if inverse_xy else (0, y, to_w, y + to_h))


def _validate(source: Path, destination: Path, settings: PreprocessSettings) -> None:
    if not str(source) or not source.is_dir():
        raise UiError(f"source directory: {str(source)!r} does not exist")
    if not str(destination) or str(destination) == ".":
        raise UiError("destination directory: enter a folder for the processed images")
    if destination.resolve() == source.resolve():
        raise UiError("destination directory: must differ from the source directory")
    for label, value in (("width", settings.width), ("height", settings.height)):
        if not 8 <= value <= MAX_IMAGE_SIDE:
            raise UiError(f"{label} must be between 8 and {MAX_IMAGE_SIDE}, got {value}")
    if settings.caption_action not in CAPTION_ACTIONS:
        raise UiError(f"existing caption action must be one of {', '.join(CAPTION_ACTIONS)}")
    if not 0.0 <= settings.overlap_ratio < 1.0:
        raise UiError(f"split overlap ratio must be in [0, 1), got {settings.overlap_ratio}")


@dataclass
class PreprocessReport:
    """What a preprocess run did: the PNGs written, the source images read, and the files skipped or read with a
    warning (each ``name (reason)``)."""

    written: list[Path] = field(default_factory=list)
    sources: int = 0
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self, destination: str | Path | None = None) -> str:
        """``6 images from 3 files in D; skipped 1: a.png (reason); warnings: b.txt (reason)``."""
        text = f"{len(self.written)} images from {self.sources} files"
        if destination is not None:
            text += f" in {destination}"
        if self.skipped:
            text += f"; skipped {len(self.skipped)}: {', '.join(self.skipped)}"
        if self.warnings:
            text += f"; warnings: {', '.join(self.warnings)}"
        return text


def preprocess_images(source: str | Path, destination: str | Path, settings: PreprocessSettings) -> list[Path]:
    """Process every image in ``source`` into ``destination``; returns the written PNGs (see ``run_preprocess``)."""
    return run_preprocess(source, destination, settings).written


def run_preprocess(source: str | Path, destination: str | Path, settings: PreprocessSettings) -> PreprocessReport:
    """Process every image in ``source`` into ``destination``.

    One bad source file never stops the run: an unreadable or too large image (its size is read from the header
    before any pixel is decoded) is skipped with its reason; a caption that is not UTF-8 is read as Windows-1252
    with a warning. A destination that cannot be written stops the run with a UiError.
    """
    source, destination = Path(source), Path(destination)
    _validate(source, destination, settings)
    destination.mkdir(parents=True, exist_ok=True)
    report = PreprocessReport()
    # Every file but the captions, as A1111's preprocess and our dataset reader: a .gif or .tif is read, not
    # silently left out by its extension, and what PIL cannot read is listed as skipped with that reason.
    files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() != ".txt")
    for index, path in enumerate(files):
        try:
            image = open_image(path).convert("RGB")
            caption_file = path.with_suffix(".txt")
            existing = ""
            if caption_file.is_file():
                existing, warning = read_caption(caption_file)
                existing = existing.strip()
                if warning:
                    report.warnings.append(warning)
        except ImageProblem as exc:
            report.skipped.append(f"{path.name} ({exc})")
            continue
        except OSError as exc:
            report.skipped.append(f"{path.name} (unreadable: {exc.strerror or exc})")
            continue
        try:
            report.written.extend(_process(image, index, path, existing, destination, settings))
        except ImageProblem as exc:
            report.skipped.append(f"{path.name} ({exc})")
            continue
        except OSError as exc:
            raise UiError(f"destination directory: cannot write to {destination}: {exc.strerror or exc} "
                          f"({report.summary()})") from None
        report.sources += 1
    return report


def _process(image: Image.Image, index: int, path: Path, existing: str, destination: Path,
             settings: PreprocessSettings) -> list[Path]:
    written: list[Path] = []
    made = caption_from_name(path) if settings.caption_from_name else ""
    caption = {"ignore": made, "copy": existing or made, "prepend": f"{existing} {made}",
               "append": f"{made} {existing}"}[settings.caption_action].strip()
    # As A1111: a tall image is cut along y, a wide one along x ("inverse_xy").
    inverse_xy = image.height <= image.width
    if inverse_xy:
        ratio = (image.height * settings.width) / (image.width * settings.height)
    else:
        ratio = (image.width * settings.height) / (image.height * settings.width)
    if settings.split and ratio < 1.0 and ratio <= settings.split_threshold:
        pieces = list(split_image(image, inverse_xy, settings.width, settings.height, settings.overlap_ratio))
    else:
        pieces = [image if settings.keep_size else _cover(image, settings.width, settings.height)]
    pictures = [p for piece in pieces for p in ([piece, ImageOps.mirror(piece)] if settings.flip else [piece])]
    for subindex, picture in enumerate(pictures):
        target = destination / f"{index:05}-{subindex}-{path.stem}.png"
        picture.save(target)
        if caption:
            target.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        written.append(target)
    return written
