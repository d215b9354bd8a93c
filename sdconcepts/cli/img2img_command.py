"""Command line: ``python -m sdconcepts img2img`` (img2img and inpainting), every ``generate`` option included."""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from sdconcepts.backends.sampler_start import ImageSource
from sdconcepts.cli.arguments import CommandError, int_at_least
from sdconcepts.cli.generate_command import run_generate
from sdconcepts.images import ImageProblem, open_image
from sdconcepts.img2img import MASKED_CONTENT, RESIZE_MODES, Img2ImgOptions


def _choice(names: tuple[str, ...]) -> type:
    """An argparse type taking a name case-insensitively, with dashes for spaces, or A1111's index."""
    slugs = {name.lower().replace(" ", "-"): name for name in names}

    def parse(value: str) -> str:
        key = value.strip().lower().replace(" ", "-").replace("_", "-")
        if key in slugs:
            return slugs[key]
        if key.isdigit() and int(key) < len(names):
            return names[int(key)]
        raise argparse.ArgumentTypeError(f"{value!r} is not one of: {', '.join(slugs)}")

    return parse  # type: ignore[return-value]


def _strength(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be between 0 and 1")
    return number


def _image_file(value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{value}: no such file")
    return path


def add_img2img_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``img2img`` after ``generate``: it takes every ``generate`` option, then its own."""
    generate = subparsers.choices["generate"]
    p = subparsers.add_parser(
        "img2img",
        help="img2img and inpainting: generate from an init image (and a mask)",
        description="img2img from an init image, or inpainting where --mask is white, with A1111's semantics "
        "(denoising strength, resize modes, mask blur, masked content, inpaint area) and every generate option. "
        "Width and height are the processing size (default: the model's).",
    )
    # The generate options themselves (not copies), so both commands always take the same ones.
    for action in generate._actions:
        if not isinstance(action, argparse._HelpAction):
            p._add_action(action)
    i2i = p.add_argument_group("img2img")
    i2i.add_argument("--init-image", required=True, type=_image_file, metavar="PATH", help="the init image")
    i2i.add_argument("--mask", type=_image_file, default=None, metavar="PATH",
                     help="inpaint where this mask is white (a transparent drawing: where it is drawn); "
                     "a mask of another size is resized as the image is")
    i2i.add_argument("--denoising-strength", type=_strength, default=0.75, metavar="D",
                     help="0 keeps the init image, 1 replaces it (default: 0.75)")
    i2i.add_argument("--resize-mode", type=_choice(RESIZE_MODES), default="Just resize", metavar="M",
                     help="just-resize, crop-and-resize or resize-and-fill (default: just-resize)")
    i2i.add_argument("--mask-blur", type=int_at_least(0), default=4, metavar="N",
                     help="blur the mask by N pixels (default: 4)")
    i2i.add_argument("--inpainting-fill", type=_choice(MASKED_CONTENT), default="original", metavar="M",
                     help="masked content: fill, original, latent-noise or latent-nothing (default: original)")
    i2i.add_argument("--inpaint-full-res", action="store_true",
                     help='inpaint area "Only masked": generate the masked region at full size, paste it back')
    i2i.add_argument("--inpaint-padding", type=int_at_least(0), default=32, metavar="N",
                     help="pixels around the masked region for --inpaint-full-res (default: 32)")
    i2i.add_argument("--invert-mask", action="store_true", help="inpaint where the mask is black instead")
    i2i.add_argument("--mask-weight", type=_strength, default=1.0, metavar="W",
                     help="inpainting checkpoints: how much of the masked image their conditioning hides (default: 1)")
    p.set_defaults(func=run_img2img)


def run_img2img(args: argparse.Namespace) -> int:
    options = Img2ImgOptions(
        denoising_strength=args.denoising_strength,
        resize_mode=args.resize_mode,
        mask_blur=args.mask_blur,
        inpainting_fill=args.inpainting_fill,
        inpaint_full_res=args.inpaint_full_res,
        inpaint_padding=args.inpaint_padding,
        invert_mask=args.invert_mask,
        mask_weight=args.mask_weight,
    )
    image = read_image(args.init_image)
    mask = read_image(args.mask) if args.mask is not None else None
    args.source = ImageSource(image, mask, options)
    return run_generate(args)


def read_image(path: Path) -> Image.Image:
    """The decoded image at ``path``, or a one-line CommandError naming it."""
    try:
        return open_image(path)
    except ImageProblem as exc:
        raise CommandError(f"{path}: {exc}") from None
