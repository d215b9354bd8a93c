"""img2img and inpainting with A1111's semantics: the pure half (options, step arithmetic, image and mask arithmetic).

Everything here works on PIL images and numpy arrays: resizing the init image (A1111's three resize modes), turning
an uploaded mask into the mask the sampler and the final paste-back use (binarise, invert, blur, "only masked"
crop), filling the masked area, and pasting the generated pixels back over the untouched original. The backend
(`sdconcepts.backends.sampler_start`) adds the VAE and the sampler. Facts are from A1111 1.10 (`modules/processing.py`
StableDiffusionProcessingImg2Img.init, `modules/images.py` resize_image, `modules/masking.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from sdconcepts.generation import GenerationError
from sdconcepts.limits import MAX_MASK_BLUR

# A1111's names and order (its radio buttons pass the index; the infotext writes these words).
RESIZE_MODES: tuple[str, ...] = ("Just resize", "Crop and resize", "Resize and fill")
MASKED_CONTENT: tuple[str, ...] = ("fill", "original", "latent noise", "latent nothing")
INPAINT_AREAS: tuple[str, ...] = ("Whole picture", "Only masked")
BACKGROUND = (255, 255, 255)  # A1111's img2img_background_color: transparent init pixels become white


@dataclass(frozen=True)
class Img2ImgOptions:
    """What img2img and inpainting add to a txt2img request; defaults are A1111's UI defaults."""

    denoising_strength: float = 0.75
    resize_mode: str = "Just resize"
    mask_blur: int = 4
    inpainting_fill: str = "original"
    inpaint_full_res: bool = False
    inpaint_padding: int = 32
    invert_mask: bool = False
    # A1111's "Inpainting conditioning mask strength" (infotext "Conditional mask weight"); inpainting models only.
    mask_weight: float = 1.0

    def validated(self) -> Img2ImgOptions:
        if not 0.0 <= self.denoising_strength <= 1.0:
            raise GenerationError(f"denoising strength must be between 0 and 1, got {self.denoising_strength}")
        if self.resize_mode not in RESIZE_MODES:
            raise GenerationError(f"unknown resize mode {self.resize_mode!r}; choose one of: {', '.join(RESIZE_MODES)}")
        if self.inpainting_fill not in MASKED_CONTENT:
            raise GenerationError(
                f"unknown masked content {self.inpainting_fill!r}; choose one of: {', '.join(MASKED_CONTENT)}"
            )
        if not 0 <= self.mask_blur <= MAX_MASK_BLUR:
            raise GenerationError(f"mask blur must be between 0 and {MAX_MASK_BLUR} (A1111's slider), got {self.mask_blur}")
        if self.inpaint_padding < 0:
            raise GenerationError(f"masked area padding must be at least 0, got {self.inpaint_padding}")
        if not 0.0 <= self.mask_weight <= 1.0:
            raise GenerationError(f"conditional mask weight must be between 0 and 1, got {self.mask_weight}")
        return replace(self, denoising_strength=float(self.denoising_strength))


def img2img_steps(steps: int, denoising_strength: float) -> tuple[int, int]:
    """(first step, steps sampled) of a ``steps``-step schedule, as A1111 with its default settings.

    A1111 (img2img_fix_steps off) builds the sampler's schedule for ``steps`` and runs its last
    ``int(min(strength, 0.999) * steps) + 1`` steps, starting from the init latents noised to that step's level.
    Strength 1 therefore runs the whole schedule from (almost) pure noise, and strength 0 still runs one step.
    """
    t_enc = int(min(denoising_strength, 0.999) * steps)
    return steps - t_enc - 1, t_enc + 1


# ---------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------


def flatten(image: Image.Image) -> Image.Image:
    """The init image as RGB: EXIF orientation applied and transparency composited over white, as A1111."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (*BACKGROUND, 255))
        background.alpha_composite(image)
        image = background
    return image.convert("RGB")


def resize_image(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """Resize to ``width``×``height`` with one of A1111's resize modes (Lanczos, as A1111 without an upscaler).

    "Just resize" stretches; "Crop and resize" scales to cover the target and crops the centre; "Resize and fill"
    scales to fit inside and fills the two margins by stretching the image's outermost row or column.
    Modes other than "Just resize" return RGB (A1111 pastes onto a new RGB canvas), masks included.
    """
    if mode == "Just resize":
        return image.resize((width, height), resample=Image.Resampling.LANCZOS)
    ratio = width / height
    src_ratio = image.width / image.height
    if mode == "Crop and resize":
        fit_width, fit_height = ratio > src_ratio, ratio <= src_ratio
    elif mode == "Resize and fill":
        fit_width, fit_height = ratio < src_ratio, ratio >= src_ratio
    else:
        raise GenerationError(f"unknown resize mode {mode!r}; choose one of: {', '.join(RESIZE_MODES)}")
    # Integer arithmetic as A1111: the side that is not fitted keeps the image's aspect ratio, rounded down.
    # At least one pixel: a 1×5000 picture fitted into 64×64 is 0 pixels wide by that arithmetic (a traceback).
    src_w = width if fit_width else max(1, image.width * height // image.height)
    src_h = height if fit_height else max(1, image.height * width // image.width)
    canvas = Image.new("RGB", (width, height))
    left, top = width // 2 - src_w // 2, height // 2 - src_h // 2
    if mode == "Crop and resize" and src_w * src_h > 4 * width * height:
        # Only the visible window is resampled, from the matching box of the source: the same picture (the filter
        # scales by the same factor) without the intermediate, which for a 1×2,000,000 picture is 64×128,000,000.
        sx, sy = image.width / src_w, image.height / src_h
        box = (-left * sx, -top * sy, (width - left) * sx, (height - top) * sy)
        canvas.paste(image.resize((width, height), resample=Image.Resampling.LANCZOS, box=box), box=(0, 0))
        return canvas
    resized = image.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)
    canvas.paste(resized, box=(left, top))
    if mode == "Resize and fill":
        if ratio < src_ratio and top > 0:
            # The margins above and below repeat the first and last row, stretched to the margin's height.
            canvas.paste(resized.resize((width, top), box=(0, 0, width, 0)), box=(0, 0))
            canvas.paste(resized.resize((width, top), box=(0, src_h, width, src_h)), box=(0, top + src_h))
        elif ratio > src_ratio and left > 0:
            canvas.paste(resized.resize((left, height), box=(0, 0, 0, height)), box=(0, 0))
            canvas.paste(resized.resize((left, height), box=(src_w, 0, src_w, height)), box=(left + src_w, 0))
    return canvas


# ---------------------------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------------------------


def binary_mask(mask: Image.Image) -> Image.Image:
    """An uploaded or drawn mask as L (white = inpaint here), as A1111's create_binary_mask.

    A mask with real transparency (a drawing layer) is its alpha channel, thresholded at 128; anything else is
    its luminance, grey levels kept (the latent mask is rounded later; the paste-back uses the grey levels).
    """
    mask = ImageOps.exif_transpose(mask)
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        return mask.getchannel("A").point(lambda v: 255 if v > 128 else 0)
    return mask.convert("L")


def gaussian_kernel(sigma: float) -> np.ndarray:
    """OpenCV's Gaussian kernel for A1111's mask blur: size ``2 * int(2.5 * sigma + 0.5) + 1``, normalised."""
    size = 2 * int(2.5 * sigma + 0.5) + 1
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    kernel: np.ndarray = np.exp(-(x**2) / (2 * sigma**2))
    return kernel / float(kernel.sum())


def blur_mask(mask: Image.Image, radius: int) -> Image.Image:
    """A1111's mask blur: a Gaussian of standard deviation ``radius`` along x, then along y.

    A1111 calls cv2.GaussianBlur (border mirrored without repeating the edge pixel); this computes the same
    kernel in float64 and rounds, so a pixel may differ from OpenCV's fixed-point result by one level.
    """
    if radius <= 0:
        return mask
    kernel = gaussian_kernel(radius)
    half = len(kernel) // 2
    values = np.asarray(mask.convert("L"), dtype=np.float64)
    for axis in (1, 0):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (half, half)
        padded = np.pad(values, pad, mode="reflect") if values.shape[axis] > 1 else np.pad(values, pad, mode="edge")
        values = sum(
            weight * np.take(padded, range(i, i + values.shape[axis]), axis=axis) for i, weight in enumerate(kernel)
        )
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def crop_region(mask: Image.Image, padding: int) -> tuple[int, int, int, int] | None:
    """The box around every non-black mask pixel, grown by ``padding`` within the image; None for a blank mask."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.width), min(y2 + padding, mask.height)


def expand_crop_region(
    region: tuple[int, int, int, int], width: int, height: int, image_width: int, image_height: int
) -> tuple[int, int, int, int]:
    """Grow ``region`` to the aspect ratio of the processing size ``width``×``height``, kept inside the image.

    A1111's arithmetic: the short side grows by the truncated difference, half on each side (the extra pixel on
    the far side), and the box slides back inside the image when it crosses an edge.
    """
    x1, y1, x2, y2 = region
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / (width / height) - (y2 - y1)), image_height)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * (width / height) - (x2 - x1)), image_width)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, diff: int, limit: int) -> tuple[int, int]:
    lo -= diff // 2
    hi += diff - diff // 2
    if hi >= limit:
        lo -= hi - limit
        hi = limit
    if lo < 0:
        hi -= lo
        lo = 0
    return lo, min(hi, limit)


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": the masked area takes the colours around it, by compositing ever less blurred copies.

    The unmasked pixels (alpha from the inverted mask) are blurred with radii 256, 64, 16, 4, 2 and 0 and laid
    over each other (16 twice, 4 four times, 2 twice), so the masked area ends up with smeared surrounding colour.
    """
    masked = Image.new("RGBa", image.size)
    masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    result = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            result.alpha_composite(blurred)
    return result.convert("RGB")


def latent_mask(mask: Image.Image, width: int, height: int) -> np.ndarray:
    """The mask at latent size as 0/1 floats (1 = regenerate): A1111's bicubic downscale, then rounding."""
    small = mask.convert("RGB").resize((width, height), resample=Image.Resampling.BICUBIC)
    return np.around(np.asarray(small, dtype=np.float32)[:, :, 0] / 255)


# ---------------------------------------------------------------------------------------------------------------
# The whole preparation and the paste-back
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PreparedInit:
    """An init image and mask made ready for sampling at ``width``×``height``, and how to finish the result.

    ``image`` is what the VAE encodes (resized, cropped for "only masked", filled); ``mask`` is the processed mask
    at the same size (None for plain img2img); ``overlay`` is the original with the unmasked area opaque, laid
    over each result at the original's size; ``paste_to`` is where an "only masked" result goes in it.
    """

    image: Image.Image
    mask: Image.Image | None
    overlay: Image.Image | None = None
    paste_to: tuple[int, int, int, int] | None = None
    infotext: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def finish(self, generated: Image.Image) -> Image.Image:
        """A1111's apply_overlay: paste an "only masked" result back in place, then lay the original over it."""
        if self.overlay is None:
            return generated
        if self.paste_to is not None:
            x, y, w, h = self.paste_to
            canvas = Image.new("RGBA", self.overlay.size)
            canvas.paste(resize_image(generated, w, h, "Crop and resize"), (x, y))
            generated = canvas
        result = generated.convert("RGBA")
        result.alpha_composite(self.overlay)
        return result.convert("RGB")


def prepare_init(
    image: Image.Image, mask: Image.Image | None, width: int, height: int, options: Img2ImgOptions
) -> PreparedInit:
    """Resize the init image, process the mask and build the paste-back overlay, in A1111's order.

    The infotext fields are the ones A1111 writes, only when it writes them: ``Denoising strength`` always;
    ``Mask mode``, ``Mask blur``, ``Inpaint area``, ``Masked area padding`` and ``Masked content`` when they
    differ from A1111's defaults (its PNG Info fills those in when absent).
    """
    options = options.validated()
    info: dict[str, str] = {"Denoising strength": str(options.denoising_strength)}
    warnings: list[str] = []
    image = flatten(image)
    if mask is None:
        return PreparedInit(resize_image(image, width, height, options.resize_mode), None, infotext=info)

    mask = binary_mask(mask)
    if options.inpaint_full_res and mask.size != image.size:
        # A1111 crops the image with a box found on the mask, so both must share one coordinate system.
        mask = resize_image(mask, image.width, image.height, options.resize_mode).convert("L")
    if options.invert_mask:
        mask = ImageOps.invert(mask)
        info["Mask mode"] = "Inpaint not masked"
    mask = blur_mask(mask, options.mask_blur)
    if options.mask_blur > 0:
        info["Mask blur"] = str(options.mask_blur)

    region = None
    paste_to = None
    if options.inpaint_full_res:
        overlay_mask = mask
        region = crop_region(mask, options.inpaint_padding)
        if region is None:
            warnings.append('the mask is blank, so "Only masked" cannot inpaint: the whole image was processed as img2img')
            return PreparedInit(resize_image(image, width, height, options.resize_mode), None, infotext=info,
                                warnings=warnings)
        region = expand_crop_region(region, width, height, mask.width, mask.height)
        x1, y1, x2, y2 = region
        mask = resize_image(mask.crop(region), width, height, "Resize and fill").convert("L")
        paste_to = (x1, y1, x2 - x1, y2 - y1)
        info["Inpaint area"] = "Only masked"
        info["Masked area padding"] = str(options.inpaint_padding)
    else:
        mask = resize_image(mask, width, height, options.resize_mode).convert("L")
        # The paste-back mask is doubled: pixels at least half masked take the generated pixel unchanged.
        doubled = np.clip(np.asarray(mask, dtype=np.float32) * 2, 0, 255).astype(np.uint8)
        overlay_mask = Image.fromarray(doubled, "L")
        image = resize_image(image, width, height, options.resize_mode)

    if overlay_mask.size != image.size:
        overlay_mask = resize_image(overlay_mask, image.width, image.height, options.resize_mode)
    overlay = Image.new("RGBa", image.size)
    overlay.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(overlay_mask.convert("L")))

    if region is not None:
        image = resize_image(image.crop(region), width, height, "Resize and fill")
    if options.inpainting_fill != "original":
        image = fill_masked(image, mask)
        if options.inpainting_fill == "fill":
            info["Masked content"] = "fill"
        else:
            # A1111 writes the latent variants when it applies them to the latents, after the pixel fill.
            info["Masked content"] = options.inpainting_fill
    return PreparedInit(image, mask, overlay.convert("RGBA"), paste_to, info, warnings)
