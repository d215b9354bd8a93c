"""``python -m sdconcepts generate``: txt2img from a prompt, with the embeddings and hypernetworks of the folders given."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sdconcepts.backends.embedding_conversion import convert_skipped
from sdconcepts.cli.arguments import CommandError, check_folder, existing_dir, existing_path, positive_int
from sdconcepts.embeddings.bundles import bundled_for_prompt, find_lora_files
from sdconcepts.embeddings.conversion import default_map_cache
from sdconcepts.embeddings.library import EmbeddingLibrary, usable_embeddings
from sdconcepts.generation import SAMPLERS, GenerationError, GenerationParams
from sdconcepts.hypernetworks.attach import attention_widths
from sdconcepts.hypernetworks.library import LoadedHypernetworks, find_hypernetworks
from sdconcepts.hypernetworks.tags import resolve_hypernetworks
from sdconcepts.images import next_image_path, save_png
from sdconcepts.limits import MAX_BATCH_COUNT, MAX_BATCH_SIZE, MAX_IMAGE_SIDE
from sdconcepts.prompts.network_tags import parse_extra_network_tags
from sdconcepts.safe_load import file_sha256
from sdconcepts.toyworld.examples import EMBEDDING as EXAMPLE_EMBEDDING
from sdconcepts.toyworld.examples import EXAMPLE_EMBEDDINGS_DIR, EXAMPLE_HYPERNETWORKS_DIR

log = logging.getLogger("sdconcepts")


def add_generate_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "generate",
        help="txt2img: generate images from a prompt",
        description="Generate images with A1111's prompt language (emphasis, BREAK, [from:to:when], [a|b]). "
        "Each PNG carries A1111's 'parameters' infotext.",
    )
    p.add_argument("--prompt", required=True, help="the prompt")
    p.add_argument("--negative-prompt", default="", help="the negative prompt (default: empty)")
    p.add_argument("--steps", type=positive_int, default=20, help="sampling steps (default: 20)")
    p.add_argument("--sampler", choices=SAMPLERS, default="Euler a", metavar="NAME",
                   help=f"sampler, one of: {', '.join(SAMPLERS)} (default: Euler a)")
    p.add_argument("--cfg-scale", type=float, default=7.0, help="classifier-free guidance scale (default: 7)")
    p.add_argument("--seed", type=int, default=-1, help="seed; -1 picks a random one (default: -1)")
    p.add_argument("--width", type=positive_int, default=None, help="width in pixels (default: the model's size)")
    p.add_argument("--height", type=positive_int, default=None, help="height in pixels (default: the model's size)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="images per batch (default: 1)")
    p.add_argument("--batch-count", type=positive_int, default=1, help="number of batches (default: 1)")
    p.add_argument("--clip-skip", type=positive_int, default=1,
                   help="stop at the N-th last CLIP layer, 1 to the text encoder's layer count (12 for SD 1.x; default: 1)")
    p.add_argument("--ckpt", type=existing_path, default=None,
                   help="model: a diffusers folder, an A1111 .safetensors/.ckpt file, or toyworld-xl (the embedded SDXL "
                   "toy-world model) (default: the embedded toy-world model)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--embeddings-dir", type=existing_dir, action="append", default=None, metavar="D",
                   help="textual inversion embeddings folder, scanned recursively; repeatable "
                   "(default: ./embeddings when it exists)")
    p.add_argument("--hypernetworks-dir", type=existing_dir, action="append", default=None, metavar="D",
                   help="hypernetworks folder for <hypernet:name:strength> tags, scanned recursively; repeatable "
                   "(default: ./models/hypernetworks when it exists)")
    p.add_argument("--lora-dir", type=existing_dir, action="append", default=None, metavar="D",
                   help="LoRA files whose bundled embeddings (A1111's bundle_emb keys) are words while the LoRA is in "
                   "the prompt as <lora:name:w> (the LoRA's own weights are not applied); repeatable "
                   "(default: ./models/Lora when it exists)")
    p.add_argument("--convert-sd1-embeddings", action="store_true",
                   help="on an SDXL model, use the SD 1.x embeddings the prompt names, converted on the fly (A1111 "
                   "skips them; the infotext's 'TI converted' says so; docs/sdxl-conversion.md)")
    p.add_argument("--no-examples", dest="examples", action="store_false",
                   help="leave out the shipped example_triangle embedding and example_teal hypernetwork (for the "
                   "embedded toy-world model; read from the package before the folders above, as in the web UI)")
    p.add_argument("--no-size-limits", dest="size_limits", action="store_false",
                   help=f"allow width/height over {MAX_IMAGE_SIDE}, batch size over {MAX_BATCH_SIZE} and batch count "
                   f"over {MAX_BATCH_COUNT} (the web UI's limits); a request that cannot fit in memory is still refused")
    p.add_argument("--compile", dest="compile_unet", action="store_true",
                   help="run the UNet through torch.compile (a slow first image, faster ones after; eager with one "
                   "line where this machine cannot compile)")
    p.add_argument("--output", required=True, type=Path,
                   help="a folder (files named like A1111's NNNNN-SEED.png) or a .png path")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from sdconcepts.backends.model_loading import ModelLoadError, load_model  # lazy: transformers, diffusers
    from sdconcepts.backends.sampling import txt2img  # lazy: transformers, diffusers

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
    output: Path = args.output
    single_file = output.suffix.lower() == ".png"
    check_folder(output.parent if single_file else output, "--output")
    try:
        params = params.validated(size_limits=args.size_limits)
        model = load_model(args.ckpt, device=args.device)
        embeddings = embedding_arguments(args.embeddings_dir, model.context_width, sdxl=model.is_sdxl,
                                         encoder_widths=model.encoder_widths,
                                         convert_on=model if getattr(args, "convert_sd1_embeddings", False) else None,
                                         used_in=f"{params.prompt}\n{params.negative_prompt}",
                                         examples=args.examples)
        embeddings = add_bundled(embeddings, getattr(args, "lora_dir", None), params.prompt, model)
        hypernetworks = hypernetwork_arguments(args.hypernetworks_dir, params.prompt, model.unet,
                                               examples=args.examples)
        source = getattr(args, "source", None)  # img2img's init image (sdconcepts.cli.img2img_command)
        with tqdm(total=params.steps * params.batch_count, unit="step", desc=args.command, file=sys.stderr) as bar:
            result = txt2img(
                model, params, progress=lambda done, total: _advance(bar, done, total), size_limits=args.size_limits,
                source=source, compile_unet=getattr(args, "compile_unet", False), **embeddings, **hypernetworks
            )
    except (GenerationError, ModelLoadError) as exc:
        raise CommandError(str(exc)) from exc
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
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


def hypernetwork_arguments(folders: list[Path] | None, prompt: str, unet: Any = None, *,
                           examples: bool = False) -> dict[str, Any]:
    """``txt2img`` keyword arguments for the hypernetworks the prompt's tags name (A1111 loads only those).

    Every ``.pt`` under ``folders`` (default ``./models/hypernetworks`` if present) is a known name, and with
    ``examples`` the shipped example's (listed first: a user file of the same name wins, as in the web UI); a named
    file that fails to load is reported on stderr and the generation warns that its tag had no effect. ``unet``
    (None: no check) gives the attention widths a hypernetwork must fit.
    """
    if folders is None:
        default = Path("models") / "hypernetworks"
        folders = [default] if default.is_dir() else []
    paths = find_hypernetworks([*([EXAMPLE_HYPERNETWORKS_DIR] if examples else []), *folders])
    files = LoadedHypernetworks()
    _, tags = parse_extra_network_tags(prompt)
    resolved = resolve_hypernetworks(
        tags, paths.get, files.load, widths=None if unet is None else (lambda: attention_widths(unet))
    )
    skipped = {file.name: file for file in resolved.skipped}
    for tag in tags:  # as each tag naming it tried the file again: once per such tag
        if tag.name == "hypernet" and tag.args[0] in skipped:
            print(skipped[tag.args[0]].cli_warning(), file=sys.stderr)
    # The infotext's Hypernet hashes; the CLI loads these files anyway, so reading them once more costs little.
    return {"hypernetworks": resolved, "hypernetwork_hashes": {name: file_sha256(path) for name, path in resolved.used}}


def add_bundled(embeddings: dict[str, Any], folders: list[Path] | None, prompt: str, model: Any) -> dict[str, Any]:
    """``embedding_arguments`` with the embeddings bundled in the LoRA files the prompt names (A1111's meaning:
    ``embeddings.bundles``); a folder embedding of the same name wins."""
    if folders is None:
        default = Path("models") / "Lora"
        folders = [default] if default.is_dir() else []
    if not folders:
        return embeddings
    usable = dict(embeddings.get("embeddings", {}))
    bundled, skipped = bundled_for_prompt(prompt, find_lora_files(folders), usable, width=int(model.context_width),
                                          sdxl=model.is_sdxl, encoder_widths=model.encoder_widths)
    for name, reason in skipped.items():
        print(f"note: skipped bundled embedding {name}: {reason}", file=sys.stderr)
    return {
        **embeddings,
        "embeddings": {**usable, **{n: e.joined() for n, e in bundled.items()}},
        "embedding_hashes": {**embeddings.get("embedding_hashes", {}),
                             **{n: e.hash for n, e in bundled.items() if e.hash}},
        "skipped_embeddings": {**embeddings.get("skipped_embeddings", {}), **skipped},
    }


def embedding_arguments(folders: list[Path] | None, width: int, *, sdxl: bool = False, convert_on: Any = None,
                        used_in: str | None = None, encoder_widths: Sequence[int] | None = None,
                        examples: bool = False) -> dict[str, Any]:
    """``txt2img`` keyword arguments for the embeddings under ``folders`` (default ``./embeddings`` if present),
    and with ``examples`` the shipped example's (listed first: a user file of the same name wins, as in the web UI).

    Embeddings that fit the model's ``width`` are passed with their hashes (for the infotext); the others are
    passed as skipped, so that a prompt naming one gets a warning, and are counted on stderr (listed with -v; the
    example, which fits only the embedded model, is not counted).
    ``convert_on`` (the loaded SDXL model): SD 1.x embeddings that ``used_in`` names are converted for it on the fly.
    """
    if folders is None:
        default = Path("embeddings")
        folders = [default] if default.is_dir() else []
    extra = [EXAMPLE_EMBEDDINGS_DIR] if examples else []
    if not folders and not extra:
        return {}
    library = EmbeddingLibrary([*extra, *folders])
    library.refresh()
    usable, skipped = usable_embeddings(library, width, sdxl=sdxl, encoder_widths=encoder_widths)
    converted: dict[str, Any] = {}
    if convert_on is not None and skipped:
        converted, skipped = convert_skipped(library, convert_on, default_map_cache(), skipped, used_in)
        usable = {**usable, **converted}
    counted = [name for name in skipped if not (examples and name == EXAMPLE_EMBEDDING)]
    if counted:
        print(f"note: {len(counted)} embedding file(s) skipped (-v lists them)", file=sys.stderr)
        for name, reason in skipped.items():
            log.info("skipped embedding %s: %s", name, reason)
    return {
        "embeddings": {name: emb.joined() for name, emb in usable.items()},
        "embedding_hashes": {name: emb.hash for name, emb in usable.items() if emb.hash},
        "skipped_embeddings": skipped,
        "converted_embeddings": set(converted),
    }
