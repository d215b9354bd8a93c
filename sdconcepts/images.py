"""Images in and out: the one way a picture the user gives is opened (img2img, PNG Info, datasets, preprocessing,
card previews), and saving generated images with A1111's file naming and ``parameters`` PNG text chunk."""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from sdconcepts.atomic_files import atomic_path
from sdconcepts.limits import MAX_SOURCE_PIXELS
from sdconcepts.safe_load import UnsafeFileError, open_regular

__all__ = ["ImageProblem", "next_image_path", "open_image", "opened_image", "read_infotext", "save_png"]


class ImageProblem(ValueError):
    """One image that cannot be used; the message is the reason (the caller names the file)."""


_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


@contextmanager
def opened_image(source: str | Path | bytes, *, max_pixels: int = MAX_SOURCE_PIXELS) -> Iterator[Image.Image]:
    """The image in ``source`` (a path or the file's bytes), opened but not decoded; ImageProblem otherwise.

    A path must be a regular file (a FIFO named like a picture would block forever), and the size is read from the
    header before any pixel is decoded: a picture over ``max_pixels`` (PIL's decompression-bomb threshold, about
    89.5 megapixels, by default) is refused, however small its file.
    """
    try:
        with warnings.catch_warnings():
            # Our own limit below decides, with the image's size in the message.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with (open_regular(source) if not isinstance(source, bytes) else io.BytesIO(source)) as handle, \
                    Image.open(handle) as opened:
                width, height = opened.size
                if width * height > max_pixels:
                    raise ImageProblem(f"image too large: {width}×{height} > {max_pixels} pixels")
                yield opened
    except UnsafeFileError as exc:
        # The caller names the file; the reason alone ("not a regular file: FIFO").
        raise ImageProblem(str(exc).removeprefix(f"{Path(os.fsdecode(source))}: ")) from None
    except Image.DecompressionBombError as exc:
        found = _BOMB_PIXELS.search(str(exc))
        size = f"{found.group(1)} pixels" if found else "too many pixels"
        raise ImageProblem(f"image too large: {size} > {max_pixels} pixels") from None
    except UnidentifiedImageError:
        raise ImageProblem("not an image PIL can read") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        if isinstance(exc, ImageProblem):
            raise
        raise ImageProblem(f"unreadable image: {' '.join(str(exc).split()) or type(exc).__name__}") from None


def open_image(source: str | Path | bytes, *, max_pixels: int = MAX_SOURCE_PIXELS) -> Image.Image:
    """The fully decoded image in ``source`` (a path or the file's bytes) with its ``info``, or ImageProblem with
    the reason; see ``opened_image`` for what is refused."""
    with opened_image(source, max_pixels=max_pixels) as opened:
        opened.load()
        image = opened.copy()
        image.info.update(opened.info)  # text chunks after the pixels are known only once they are loaded
    if image.width < 1 or image.height < 1:
        raise ImageProblem("the image is empty")
    return image

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
    with opened_image(path) as image:
        image.load()  # a tEXt chunk after the pixels is read with them
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
