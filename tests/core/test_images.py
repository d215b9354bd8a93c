"""The one way a user's picture is opened (sdconcepts.images.open_image/opened_image): regular files only, the size
read from the header and refused before any pixel is decoded, one-line reasons; the card thumbnails use it too."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from forged_images import forged_png
from PIL import Image

from sdconcepts.images import ImageProblem, open_image, read_infotext, save_png
from sdconcepts.limits import MAX_SOURCE_PIXELS
from sdconcepts.ui.cards import THUMBNAILS


def _within(seconds: float, call: Callable[[], object]) -> object:
    """``call()`` in a thread: what used to hang fails the test instead of hanging it."""
    result: list[object] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(call())
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            errors.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds} s"
    if errors:
        raise errors[0]
    return result[0]


@pytest.mark.parametrize("side", [12_000, 60_000])  # over our cap, and over PIL's own 2x bomb threshold
def test_a_huge_header_is_refused_before_decoding(tmp_path: Path, side: int) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(forged_png(side, side))
    for source in (path, path.read_bytes()):
        with pytest.raises(ImageProblem) as info:
            open_image(source)  # type: ignore[arg-type]
        message = str(info.value)
        assert message.startswith("image too large:") and f"> {MAX_SOURCE_PIXELS} pixels" in message
        assert "\n" not in message


def test_a_fifo_named_like_a_picture_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "x.preview.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageProblem, match="not a regular file: FIFO"):
        _within(10.0, lambda: open_image(fifo))
    # The card thumbnail opened it with a plain Image.open: the web UI never started listening.
    assert _within(10.0, lambda: THUMBNAILS.uri(fifo)) is None


def test_pictures_and_their_text_chunks_still_open(tmp_path: Path) -> None:
    path = save_png(Image.new("RGB", (5, 3), (10, 20, 30)), tmp_path / "a.png", "a prompt\nSteps: 2")
    image = open_image(path)
    assert image.size == (5, 3) and image.getpixel((0, 0)) == (10, 20, 30)
    assert image.info["parameters"] == read_infotext(path) == "a prompt\nSteps: 2"
    buffer = io.BytesIO()
    Image.new("L", (2, 2)).save(buffer, format="PNG")
    assert open_image(buffer.getvalue()).size == (2, 2)
    with pytest.raises(ImageProblem, match="^not an image PIL can read$"):
        open_image(b"not a picture")
