"""img2img, Inpaint and PNG Info handlers as plain functions (no gradio): the forms' values in, plain values out.

The image editor's value differs by gradio version: 3.41's sketch tool gives ``{"image", "mask"}`` (the mask already
white where drawn), 4.x and later's ``ImageEditor`` gives ``{"background", "layers", "composite"}`` (the mask is
where the drawn layers are opaque). ``editor_parts`` turns either into (image, mask). The generation itself is
txt2img's path (``handlers.generate``) with an ``ImageSource``.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageChops

from sdconcepts.backends.sampler_start import ImageSource
from sdconcepts.generation import GenerationError, engine_sampler, parse_infotext
from sdconcepts.images import ImageProblem, open_image
from sdconcepts.img2img import INPAINT_AREAS, MASKED_CONTENT, RESIZE_MODES, Img2ImgOptions
from sdconcepts.limits import MAX_INFOTEXT_CHARS, MAX_SOURCE_PIXELS
from sdconcepts.ui.ui_session import UiError

__all__ = [
    "MODES",
    "PastedFields",
    "PngInfo",
    "editor_parts",
    "image_source",
    "img2img_options",
    "paste_fields",
    "read_png_info",
]

# The img2img tab's sub-tabs, as A1111 names them.
MODES: tuple[str, ...] = ("img2img", "Inpaint", "Inpaint upload")


def _as_image(value: Any) -> Image.Image | None:
    if value is None:
        return None
    if isinstance(value, Image.Image):
        # gradio decoded it already (PIL's own bomb check applies there); the resize must not start from a bomb.
        if value.width * value.height > MAX_SOURCE_PIXELS:
            raise UiError(f"image too large: {value.width}×{value.height} > {MAX_SOURCE_PIXELS} pixels")
        return value
    if isinstance(value, (str, Path)):
        try:
            return open_image(value)
        except ImageProblem as exc:
            raise UiError(f"{Path(value).name}: {exc}") from None
    try:  # numpy arrays (a component built with type="numpy")
        return Image.fromarray(value)
    except (TypeError, ValueError, AttributeError):
        raise UiError(f"not an image: {type(value).__name__}") from None


def editor_parts(value: Any) -> tuple[Image.Image | None, Image.Image | None]:
    """(image, mask) from an image editor's value; the mask is L, white where something was drawn (None: no drawing)."""
    if value is None:
        return None, None
    if not isinstance(value, Mapping):
        return _as_image(value), None
    if "image" in value:  # gradio 3.41 sketch: the mask is RGB, white where drawn
        sketch = _as_image(value.get("mask"))
        return _as_image(value.get("image")), sketch.convert("L") if sketch is not None else None
    image = _as_image(value.get("background"))
    mask: Image.Image | None = None
    for layer in value.get("layers") or []:
        layer_image = _as_image(layer)
        if layer_image is None:
            continue
        alpha = layer_image.convert("RGBA").getchannel("A")
        mask = alpha if mask is None else ImageChops.lighter(mask, alpha.resize(mask.size))
    if image is None and value.get("composite") is not None:
        image = _as_image(value.get("composite"))
    return image, mask


def img2img_options(
    denoising_strength: Any, resize_mode: str, mask_blur: Any, masked_content: str, inpaint_area: str,
    padding: Any, invert_mask: bool,
) -> Img2ImgOptions:
    """The form's img2img settings, checked; a bad value raises ``UiError`` naming it."""
    if resize_mode not in RESIZE_MODES:
        raise UiError(f"unknown resize mode {resize_mode!r}; choose one of: {', '.join(RESIZE_MODES)}")
    if masked_content not in MASKED_CONTENT:
        raise UiError(f"unknown masked content {masked_content!r}; choose one of: {', '.join(MASKED_CONTENT)}")
    if inpaint_area not in INPAINT_AREAS:
        raise UiError(f"unknown inpaint area {inpaint_area!r}; choose one of: {', '.join(INPAINT_AREAS)}")
    try:
        strength = float(denoising_strength)
        blur, pad = float(mask_blur), float(padding)
    except (TypeError, ValueError):
        raise UiError("denoising strength, mask blur and padding must be numbers") from None
    if not blur.is_integer() or not pad.is_integer():
        raise UiError("mask blur and masked area padding must be whole numbers")
    options = Img2ImgOptions(
        denoising_strength=strength, resize_mode=resize_mode, mask_blur=int(blur), inpainting_fill=masked_content,
        inpaint_full_res=inpaint_area == "Only masked", inpaint_padding=int(pad), invert_mask=bool(invert_mask),
    )
    try:
        return options.validated()
    except GenerationError as exc:
        raise UiError(str(exc)) from None


def image_source(mode: str, init_image: Any, editor: Any, upload_image: Any, upload_mask: Any,
                 options: Img2ImgOptions) -> Any:
    """The ``ImageSource`` the chosen sub-tab describes, or ``UiError`` saying what is missing."""
    if mode == "img2img":
        image, mask = _as_image(init_image), None
    elif mode == "Inpaint":
        image, mask = editor_parts(editor)
        if image is not None and (mask is None or mask.getbbox() is None):
            raise UiError("Inpaint: draw the mask on the image first (or use Inpaint upload)")
    elif mode == "Inpaint upload":
        image, mask = _as_image(upload_image), _as_image(upload_mask)
        if image is not None and mask is None:
            raise UiError("Inpaint upload: upload a mask too (white = inpaint)")
    else:
        raise UiError(f"unknown img2img mode {mode!r}; choose one of: {', '.join(MODES)}")
    if image is None:
        raise UiError(f"{mode}: upload an image first")
    return ImageSource(image, mask, options)


# -- infotext: PNG Info and the send buttons ----------------------------------------------------------------------


@dataclass(frozen=True)
class PastedFields:
    """Form values read from an infotext; None leaves a field as it is (absent, or not a value the form takes)."""

    prompt: str | None = None
    negative_prompt: str | None = None
    sampler: str | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    denoising_strength: float | None = None
    mask_blur: int | None = None
    notes: tuple[str, ...] = ()


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def paste_fields(infotext: str | None) -> PastedFields:
    """The values an infotext (ours or A1111's) gives the txt2img and img2img forms, as A1111's paste does.

    A sampler this engine lacks is left as it is and named in ``notes``.
    """
    if not infotext or not infotext.strip():
        return PastedFields()
    prompt, negative, fields = parse_infotext(infotext)
    notes: list[str] = []
    written = fields.get("Sampler")
    # A1111 1.9+ writes the schedule apart ("Sampler: DPM++ 2M, Schedule type: Karras"); older ones in the name.
    sampler = engine_sampler(written, fields.get("Schedule type"))
    if written is not None and sampler is None:
        notes.append(f"sampler {written!r} is not available here; the sampler was left as it was")
    width = height = None
    size = fields.get("Size", "")
    if "x" in size:
        width, height = _int(size.split("x", 1)[0]), _int(size.split("x", 1)[1])
    return PastedFields(
        prompt=prompt, negative_prompt=negative, sampler=sampler, steps=_int(fields.get("Steps")),
        cfg_scale=_float(fields.get("CFG scale")), seed=_int(fields.get("Seed")), width=width, height=height,
        denoising_strength=_float(fields.get("Denoising strength")), mask_blur=_int(fields.get("Mask blur")),
        notes=tuple(notes),
    )


@dataclass(frozen=True)
class PngInfo:
    """What the PNG Info tab shows for a file: its infotext (empty when none), the other text chunks, the image."""

    infotext: str
    html: str
    image: Image.Image | None


def read_png_info(data: Any) -> PngInfo:
    """Read a dropped file (bytes or a path): A1111's ``parameters`` text chunk and any other text it carries."""
    if data is None:
        return PngInfo("", "", None)
    if isinstance(data, bytearray):
        data = bytes(data)
    if not isinstance(data, (bytes, str, Path)):
        raise UiError(f"not a file: {type(data).__name__}")
    try:
        image = open_image(data)
    except ImageProblem as exc:
        raise UiError(f"PNG Info: {exc}") from None
    info = dict(image.info)
    infotext = info.pop("parameters", None)
    infotext = infotext if isinstance(infotext, str) else ""
    if len(infotext) > MAX_INFOTEXT_CHARS:
        # Longer than any infotext a generation writes (its prompts are bounded): not passed on to Send to txt2img.
        raise UiError(f"PNG Info: the parameters text has {len(infotext)} characters, more than the "
                      f"{MAX_INFOTEXT_CHARS} a generation writes; not read")
    rows = []
    if infotext:
        rows.append(f"<div><strong>parameters</strong><pre>{html.escape(infotext)}</pre></div>")
    for key, value in info.items():
        if isinstance(value, str) and value.strip():
            rows.append(f"<div><strong>{html.escape(str(key))}</strong><pre>{html.escape(value)}</pre></div>")
    if not rows:
        rows.append("<div>This image carries no generation parameters.</div>")
    return PngInfo(infotext, f'<div class="sdconcepts-png-info">{"".join(rows)}</div>', image)
