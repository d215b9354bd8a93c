"""Command line: ``python -m sdconcepts generate …`` and the toy-world tools; errors are one line, never tracebacks."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sdconcepts.generation import SAMPLERS, GenerationError, GenerationParams
from sdconcepts.limits import MAX_BATCH_COUNT, MAX_BATCH_SIZE, MAX_IMAGE_SIDE
from sdconcepts.model_shape import EMBEDDED_XL_MODEL_DIR, EMBEDDED_XL_NAME

log = logging.getLogger("sdconcepts")


class CommandError(Exception):
    """An error the CLI reports as one line and exit code 2."""


def _existing_dir(value: str) -> Path:
    path = Path(value)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: no such folder")
    return path


def _existing_path(value: str) -> Path:
    path = Path(value)
    if value == EMBEDDED_XL_NAME and not path.exists():
        # The embedded SDXL-layout toy-world model, by name (a file or folder of that name wins).
        return EMBEDDED_XL_MODEL_DIR
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{value}: no such file or folder")
    return path


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number no smaller than ``minimum``."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return number

    return parse


_positive_int = int_at_least(1)


def add_generate_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "generate",
        help="txt2img: generate images from a prompt",
        description="Generate images with A1111's prompt language (emphasis, BREAK, [from:to:when], [a|b]). "
        "Each PNG carries A1111's 'parameters' infotext.",
    )
    p.add_argument("--prompt", required=True, help="the prompt")
    p.add_argument("--negative-prompt", default="", help="the negative prompt (default: empty)")
    p.add_argument("--steps", type=_positive_int, default=20, help="sampling steps (default: 20)")
    p.add_argument("--sampler", choices=SAMPLERS, default="Euler a", metavar="NAME",
                   help=f"sampler, one of: {', '.join(SAMPLERS)} (default: Euler a)")
    p.add_argument("--cfg-scale", type=float, default=7.0, help="classifier-free guidance scale (default: 7)")
    p.add_argument("--seed", type=int, default=-1, help="seed; -1 picks a random one (default: -1)")
    p.add_argument("--width", type=_positive_int, default=None, help="width in pixels (default: the model's size)")
    p.add_argument("--height", type=_positive_int, default=None, help="height in pixels (default: the model's size)")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="images per batch (default: 1)")
    p.add_argument("--batch-count", type=_positive_int, default=1, help="number of batches (default: 1)")
    p.add_argument("--clip-skip", type=_positive_int, default=1,
                   help="stop at the N-th last CLIP layer, 1 to the text encoder's layer count (12 for SD 1.x; default: 1)")
    p.add_argument("--ckpt", type=_existing_path, default=None,
                   help="model: a diffusers folder, an A1111 .safetensors/.ckpt file, or toyworld-xl (the embedded SDXL "
                   "toy-world model) (default: the embedded toy-world model)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--embeddings-dir", type=_existing_dir, action="append", default=None, metavar="D",
                   help="textual inversion embeddings folder, scanned recursively; repeatable "
                   "(default: ./embeddings when it exists)")
    p.add_argument("--hypernetworks-dir", type=_existing_dir, action="append", default=None, metavar="D",
                   help="hypernetworks folder for <hypernet:name:strength> tags, scanned recursively; repeatable "
                   "(default: ./models/hypernetworks when it exists)")
    p.add_argument("--no-size-limits", dest="size_limits", action="store_false",
                   help=f"allow width/height over {MAX_IMAGE_SIDE}, batch size over {MAX_BATCH_SIZE} and batch count "
                   f"over {MAX_BATCH_COUNT} (the web UI's limits); a request that cannot fit in memory is still refused")
    p.add_argument("--output", required=True, type=Path,
                   help="a folder (files named like A1111's NNNNN-SEED.png) or a .png path")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sdconcepts.backends.diffusers import ModelLoadError, load_model, txt2img
    from sdconcepts.cli_files import embedding_arguments
    from sdconcepts.images import next_image_path, save_png

    params = GenerationParams(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        sampler=args.sampler,
        cfg_scale=args.cfg_scale,
        seed=args.seed,
        width=args.width,
        height=args.height,
        batch_size=args.batch_size,
        batch_count=args.batch_count,
        clip_skip=args.clip_skip,
    )
    try:
        params = params.validated(size_limits=args.size_limits)
        model = load_model(args.ckpt, device=args.device)
        embeddings = embedding_arguments(args.embeddings_dir, model.context_width, sdxl=model.is_sdxl)
        hypernetworks = hypernetwork_arguments(args.hypernetworks_dir, params.prompt)
        source = getattr(args, "source", None)  # img2img's init image (sdconcepts.cli_img2img)
        with tqdm(total=params.steps * params.batch_count, unit="step", desc=args.command, file=sys.stderr) as bar:
            result = txt2img(
                model, params, progress=lambda done, total: _advance(bar, done, total), size_limits=args.size_limits,
                source=source, **embeddings, **hypernetworks
            )
    except (GenerationError, ModelLoadError) as exc:
        raise CommandError(str(exc)) from exc
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    output: Path = args.output
    single_file = output.suffix.lower() == ".png"
    for index, (image, infotext, seed) in enumerate(zip(result.images, result.infotexts, result.seeds, strict=True)):
        if single_file:
            path = output if len(result.images) == 1 else output.with_name(f"{output.stem}-{index}{output.suffix}")
        else:
            path = next_image_path(output, seed)
        save_png(image, path, infotext)
        print(path)
    return 0


def _advance(bar: Any, done: int, total: int) -> None:
    bar.total = total  # img2img runs fewer steps than it was asked for (its denoising strength)
    bar.update(done - bar.n)


def hypernetwork_arguments(folders: list[Path] | None, prompt: str) -> dict[str, Any]:
    """``txt2img`` keyword arguments for the hypernetworks the prompt's tags name (A1111 loads only those).

    Every ``.pt`` under ``folders`` (default ``./models/hypernetworks`` if present) is a known name; a named file
    that fails to load is reported on stderr and the generation warns that its tag had no effect.
    """
    from sdconcepts.hypernetworks.files import HypernetworkFileError
    from sdconcepts.hypernetworks.library import LoadedHypernetworks, find_hypernetworks
    from sdconcepts.prompts import parse_extra_network_tags

    if folders is None:
        default = Path("models") / "hypernetworks"
        folders = [default] if default.is_dir() else []
    paths = find_hypernetworks(folders)
    files = LoadedHypernetworks()
    loaded = {}
    _, tags = parse_extra_network_tags(prompt)
    for tag in tags:
        name = tag.args[0] if tag.args else ""
        if tag.name != "hypernet" or name not in paths or name in loaded:
            continue
        try:
            loaded[name] = files.load(paths[name])
        except HypernetworkFileError as exc:
            print(f"warning: skipped hypernetwork {name}: {exc}", file=sys.stderr)
    return {"hypernetworks": loaded, "known_networks": {"hypernet": list(paths)}}


def add_web_ui_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m sdconcepts`` without a command, which serves the web UI."""
    ui = parser.add_argument_group("web UI (no COMMAND)")
    ui.add_argument("--port", dest="ui_port", type=_positive_int, default=7860, metavar="P",
                    help="port to serve on (default: 7860)")
    ui.add_argument("--listen", dest="ui_listen", action="store_true",
                    help="serve on 0.0.0.0 (every network interface) instead of 127.0.0.1")
    ui.add_argument("--ckpt", dest="ui_ckpt", type=_existing_path, default=None, metavar="PATH",
                    help="start on this model: a diffusers folder, an A1111 .safetensors/.ckpt file or toyworld-xl "
                    "(default: the embedded toy-world model)")
    ui.add_argument("--models-dir", dest="ui_models_dir", type=_existing_dir, default=None, metavar="D",
                    help="checkpoints offered in the model dropdown (default: ./models/Stable-diffusion when it exists)")
    ui.add_argument("--embeddings-dir", dest="ui_embeddings_dir", type=_existing_dir, action="append", default=None,
                    metavar="D", help="textual inversion embeddings folder; repeatable (default: ./embeddings)")
    ui.add_argument("--hypernetworks-dir", dest="ui_hypernetworks_dir", type=_existing_dir, action="append",
                    default=None, metavar="D",
                    help="hypernetworks folder; repeatable (default: ./models/hypernetworks)")
    ui.add_argument("--outputs-dir", dest="ui_outputs_dir", type=Path, default=Path("outputs") / "txt2img-images",
                    metavar="D", help="where generated PNGs are saved (default: ./outputs/txt2img-images)")
    ui.add_argument("--train-root", dest="ui_train_roots", type=_existing_dir, action="append", default=None,
                    metavar="D", help="a folder that the Train tab's paths (preprocess source and destination, dataset, "
                    "log directory) may use; repeatable (default: the working folder and the folders above)")
    ui.add_argument("--device", dest="ui_device", default=None, help="torch device (default: cuda when available)")
    ui.add_argument("--no-examples", dest="ui_examples", action="store_false",
                    help="do not list the shipped example embedding and hypernetwork (for the embedded toy-world "
                    "model; listed by default, read from the package, never copied)")


def _default_dirs(given: list[Path] | None, default: Path) -> list[Path]:
    # The default folder is listed even before it exists: training and the embedding tools create it, and what they
    # write there must show on the cards without a restart.
    return given if given is not None else [default]


def run_web_ui(args: argparse.Namespace) -> int:
    try:
        from sdconcepts.ui.app import launch_app
        from sdconcepts.ui.session import UiSession
    except ImportError as exc:
        raise CommandError(f"the web UI needs gradio ({exc}); install it with: pip install gradio") from exc
    host = "0.0.0.0" if args.ui_listen else "127.0.0.1"
    launch_app(UiSession(web_ui_config(args)), host=host, port=args.ui_port)
    return 0


def web_ui_config(args: argparse.Namespace) -> Any:
    """The ``ui.session.UiConfig`` that ``python -m sdconcepts`` serves with these options."""
    from sdconcepts.examples import EXAMPLE_EMBEDDINGS_DIR, EXAMPLE_HYPERNETWORKS_DIR
    from sdconcepts.ui.session import UiConfig

    models = args.ui_models_dir
    if models is None and (Path("models") / "Stable-diffusion").is_dir():
        models = Path("models") / "Stable-diffusion"
    # The examples are a read-only source listed before the user's folders (a user file of the same name wins);
    # copying them into ./embeddings on first run would mix them with the user's files and bring deleted ones back.
    return UiConfig(
        ckpt=args.ui_ckpt,
        models_dir=models,
        embeddings_dirs=_default_dirs(args.ui_embeddings_dir, Path("embeddings")),
        hypernetworks_dirs=_default_dirs(args.ui_hypernetworks_dir, Path("models") / "hypernetworks"),
        outputs_dir=args.ui_outputs_dir,
        device=args.ui_device,
        train_roots=args.ui_train_roots,
        extra_embeddings_dirs=[EXAMPLE_EMBEDDINGS_DIR] if args.ui_examples else [],
        extra_hypernetworks_dirs=[EXAMPLE_HYPERNETWORKS_DIR] if args.ui_examples else [],
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sdconcepts",
        description="sdconcepts: textual inversion embeddings and hypernetworks for Stable Diffusion. "
        "Without a COMMAND it serves the web UI on http://127.0.0.1:7860/.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    add_web_ui_arguments(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_generate_parser(subparsers)
    from sdconcepts.cli_img2img import add_img2img_parser

    add_img2img_parser(subparsers)
    from sdconcepts.cli_files import add_file_parsers

    add_file_parsers(subparsers)
    from sdconcepts.cli_embedding import add_embedding_parser

    add_embedding_parser(subparsers)
    from sdconcepts.toyworld.cli import add_toyworld_parser

    add_toyworld_parser(subparsers)
    from sdconcepts.cli_training import add_training_parsers

    add_training_parsers(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not hasattr(args, "func"):
        args.func = run_web_ui  # no command: serve the web UI
    try:
        return int(args.func(args))
    except CommandError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
