"""Command line for training: ``create-embedding``, ``create-hypernetwork``, ``train-embedding``, ``train-hypernetwork``.

Flags are named after A1111's Train-tab fields. The step count lives in the trained file and ``--max-steps`` is the
total, so running the same command again with a larger ``--max-steps`` resumes (optimizer state included). Ctrl-C
stops after the current step and saves; errors are one line.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sdconcepts.cli.arguments import (
    TRAIN_LOG_DIR,
    CommandError,
    check_folder,
    existing_path,
    int_at_least,
    positive_int,
)
from sdconcepts.embeddings.files import EmbeddingFileError
from sdconcepts.file_names import InvalidNameError, target_path
from sdconcepts.generation import GenerationError
from sdconcepts.hypernetworks.attach import attention_widths
from sdconcepts.hypernetworks.hypernetwork import HypernetworkError
from sdconcepts.limits import (
    MAX_GRADIENT_ACCUMULATION,
    MAX_HYPERNETWORK_BYTES,
    MAX_IMAGE_SIDE,
    MAX_LAYER_FACTOR,
    MAX_TRAIN_BATCH_SIZE,
    format_bytes,
)
from sdconcepts.model_shape import read_model_shape
from sdconcepts.training.config import (
    EARLY_STOP_WINDOW,
    ConfigError,
    EmbeddingTrainingConfig,
    HypernetworkTrainingConfig,
)
from sdconcepts.training.create import MAX_VECTORS, CreateError, create_embedding_file, create_hypernetwork_file
from sdconcepts.training.dataset import DatasetError
from sdconcepts.training.distributed import Distributed
from sdconcepts.training.presets import DEFAULT_PRESET, PRESETS, preset
from sdconcepts.training.run import train_embedding, train_hypernetwork
from sdconcepts.training.schedule import ScheduleError
from sdconcepts.training.templates import TemplateError
from sdconcepts.training.trainables import TrainingError
from sdconcepts.training.training_model import TrainingModel

DEFAULT_EMBEDDINGS_DIR = Path("embeddings")
DEFAULT_HYPERNETWORKS_DIR = Path("models") / "hypernetworks"


_non_negative_int = int_at_least(0)


# The attention widths of the released models: the context width, then the UNet's self-attention widths (SDXL has
# no attention at 320).
FAMILY_SIZES = {"sd1": (768, 320, 640, 1280), "sd2": (1024, 320, 640, 1280), "sdxl": (2048, 640, 1280)}


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", type=existing_path, default=None,
                   help="model: a diffusers folder, an A1111 .safetensors/.ckpt file or toyworld-xl (the embedded SDXL "
                   "toy-world model) (default: the embedded toy-world model)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def add_training_parsers(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _add_create_embedding_parser(subparsers)
    _add_create_hypernetwork_parser(subparsers)
    for kind in ("embedding", "hypernetwork"):
        _add_train_parser(subparsers, kind)


def _preset_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=tuple(PRESETS), default=DEFAULT_PRESET,
                   help="the defaults of the options below: " + "; ".join(f"{k}: {v.description}" for k, v in
                                                                          PRESETS.items()) + f" (default: {DEFAULT_PRESET})")


def _preset_values(field: str) -> str:
    return ", ".join(f"{getattr(v, field)} ({k})" for k, v in PRESETS.items())


def preset_value(args: argparse.Namespace, field: str, fallback: Any = None) -> Any:
    """The user's value of ``field``, else the chosen preset's (``fallback`` for a command without a preset)."""
    value = getattr(args, field, None)
    if value is not None:
        return value
    return getattr(preset(args.preset), field) if getattr(args, "preset", None) else fallback


def _add_create_embedding_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "create-embedding",
        help="create a textual inversion embedding file (A1111's Create embedding)",
        description="Write <embeddings-dir>/NAME.pt in A1111's layout with step 0 (SDXL models: NAME.safetensors "
        "with clip_l and clip_g, each half from its own encoder's table). The vectors start from the "
        "initialization text's token embeddings, picked evenly and repeated when the text is short; an empty text "
        "gives zeros.",
    )
    p.add_argument("name", metavar="NAME", help="the embedding's name (its prompt word); letters, digits, ._- and spaces")
    _preset_argument(p)
    p.add_argument("--init-text", default=None, help="initialization text (default: the preset's, *)")
    p.add_argument("--vectors", type=positive_int, default=None,
                   help=f"number of vectors per token, 1-75 (default: the preset's: {_preset_values('vectors')})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file of that name")
    p.add_argument("--embeddings-dir", type=Path, default=DEFAULT_EMBEDDINGS_DIR, metavar="D",
                   help="folder to write to (default: ./embeddings)")
    _model_arguments(p)
    p.set_defaults(func=run_create_embedding)


def _add_create_hypernetwork_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "create-hypernetwork",
        help="create a hypernetwork file (A1111's Create hypernetwork)",
        description="Write <hypernetworks-dir>/NAME.pt with A1111's layout and create-form defaults.",
    )
    p.add_argument("name", metavar="NAME", help="the hypernetwork's name")
    p.add_argument("--sizes", default="model",
                   help="context widths to make modules for, comma-separated (the toy model's are 48,32,64; SD 1.x's "
                   "768,320,640,1280), or a family: sd1, sd2, sdxl (2048,640,1280), or 'model': the attention widths "
                   "of the --ckpt model, read from its files (a .ckpt is loaded) (default: model, as the web form)")
    p.add_argument("--layer-structure", default="1, 2, 1", help='layer structure, first and last 1 (default: "1, 2, 1")')
    p.add_argument("--activation", default="linear", help="activation function (default: linear)")
    p.add_argument("--weight-init", default="Normal",
                   help="layer weights initialization: Normal, KaimingUniform, KaimingNormal, XavierUniform, "
                   "XavierNormal (default: Normal)")
    p.add_argument("--layer-norm", action="store_true", help="add layer normalization")
    p.add_argument("--use-dropout", action="store_true", help="use dropout")
    p.add_argument("--dropout-structure", default="0, 0, 0",
                   help='dropout structure, used with --use-dropout; starts and ends with 0 (default: "0, 0, 0")')
    p.add_argument("--overwrite", action="store_true", help="replace an existing file of that name")
    p.add_argument("--hypernetworks-dir", type=Path, default=DEFAULT_HYPERNETWORKS_DIR, metavar="D",
                   help="folder to write to (default: ./models/hypernetworks)")
    p.add_argument("--seed", type=int, default=None, help="seed the initial weights")
    p.add_argument("--no-size-limits", dest="size_limits", action="store_false",
                   help=f"allow layer factors over {MAX_LAYER_FACTOR:g} and files over "
                   f"{format_bytes(MAX_HYPERNETWORK_BYTES)}; one that cannot fit in memory is still refused")
    _model_arguments(p)
    p.set_defaults(func=run_create_hypernetwork)


def _add_train_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], kind: str) -> None:
    p = subparsers.add_parser(
        f"train-{kind}",
        help=f"train a {'textual inversion embedding' if kind == 'embedding' else 'hypernetwork'} on a folder of images",
        description=f"Train NAME (a file in --{kind}s-dir, or a path) with A1111's Train-tab options. Max steps "
        "is the total: rerun with a larger --max-steps to resume from the step saved in the file.",
    )
    p.add_argument("name", metavar="NAME", help=f"the {kind}'s name or file")
    p.add_argument("--dataset", required=True, type=Path, help="dataset directory: images, optional same-name .txt captions")
    if kind == "embedding":
        p.add_argument("--embeddings-dir", type=Path, default=DEFAULT_EMBEDDINGS_DIR, metavar="D",
                       help="folder holding the embedding (default: ./embeddings)")
        _preset_argument(p)
        p.add_argument("--learn-rate", default=None, metavar="S",
                       help='learning rate or schedule, e.g. "0.005:100, 1e-3:1000, 1e-5" (default: the preset\'s: '
                       f"{_preset_values('learn_rate')})")
        p.add_argument("--no-save-image-with-embedding", dest="save_image_with_embedding", action="store_false",
                       help="do not also save previews with the embedding in PNG chunks")
    else:
        p.add_argument("--hypernetworks-dir", type=Path, default=DEFAULT_HYPERNETWORKS_DIR, metavar="D",
                       help="folder holding the hypernetwork (default: ./models/hypernetworks)")
        p.add_argument("--learn-rate", default=None, metavar="S",
                       help="learning rate or schedule (default: 0.00001)")
    p.add_argument("--log-dir", default=str(TRAIN_LOG_DIR), metavar="D",
                   help=f"log directory; the run writes to D/YYYY-MM-DD/NAME (default: {TRAIN_LOG_DIR}, the web "
                   "UI's; A1111's is textual_inversion)")
    p.add_argument("--batch-size", type=positive_int, default=None, metavar="B",
                   help="batch size (default: 1; an embedding: the preset's, "
                   f"{_preset_values('batch_size')}; at most the number of pictures)")
    p.add_argument("--gradient-accumulation", type=positive_int, default=1, metavar="G",
                   help="gradient accumulation steps (default: 1)")
    p.add_argument("--width", type=positive_int, default=None, metavar="W",
                   help="training width (default: the model's size, 512 for SD 1.5)")
    p.add_argument("--height", type=positive_int, default=None, metavar="H", help="training height (default: the model's size)")
    p.add_argument("--keep-size", action="store_true",
                   help="do not resize images (batches are grouped by image size)")
    p.add_argument("--max-steps", type=positive_int, default=100000, metavar="N", help="max steps, in total (default: 100000)")
    p.add_argument("--save-every", type=_non_negative_int, default=500, metavar="N",
                   help="save the file and a copy in the log directory every N steps; 0 = only at the end (default: 500)")
    p.add_argument("--preview-every", type=_non_negative_int, default=500, metavar="N",
                   help="save a preview image to the log directory every N steps; 0 = off (default: 500)")
    p.add_argument("--template", default="style_filewords", metavar="T",
                   help="prompt template: a shipped name (subject, subject_filewords, style, style_filewords, "
                   "hypernetwork, none, filewords) or a .txt file (default: style_filewords)")
    p.add_argument("--latent-sampling", choices=("once", "deterministic", "random"), default="once",
                   help="latent sampling method (default: once)")
    p.add_argument("--clip-grad-mode", choices=("disabled", "value", "norm"), default="disabled",
                   help="gradient clipping (default: disabled)")
    p.add_argument("--clip-grad-value", default="0.1", metavar="S", help="clip value or schedule (default: 0.1)")
    p.add_argument("--use-alpha-weight", action="store_true", help="use the PNG alpha channel as loss weight")
    p.add_argument("--shuffle-tags", action="store_true", help="shuffle tags by ',' when creating prompts")
    p.add_argument("--tag-dropout", type=float, default=0.0, metavar="P", help="drop out tags when creating prompts (0-1)")
    p.add_argument("--filename-regex", default="", help="regex for the file words of images without a .txt caption")
    p.add_argument("--filename-join", default=" ", help="join string for the regex's matches (default: a space)")
    p.add_argument("--no-optimizer-state", dest="save_optimizer_state", action="store_false",
                   help="neither save nor restore the optimizer state (.optim)")
    p.add_argument("--seed", type=int, default=0, help="seed for batches, noise and timesteps (default: 0)")
    p.add_argument("--no-size-limits", dest="size_limits", action="store_false",
                   help=f"allow width/height over {MAX_IMAGE_SIDE}, batch size over {MAX_TRAIN_BATCH_SIZE} and "
                   f"gradient accumulation over {MAX_GRADIENT_ACCUMULATION} (the web UI's limits); a run that "
                   "cannot fit in memory is still refused")
    p.add_argument("--validate-every", type=int_at_least(-1), default=-1, metavar="N",
                   help="the validation loss (fixed pictures, noise and timesteps) every N steps; the best step is "
                   "saved as NAME-best in the log directory; -1 = chosen from the batch size (denser with --early-stop), "
                   "0 = off (default: -1)")
    p.add_argument("--validation-share", type=float, default=0.0, metavar="P",
                   help="hold out this share of the pictures for the validation loss; 0 = use the training pictures "
                   "(default: 0)")
    p.add_argument("--early-stop", action="store_true",
                   help="stop once the validation loss has settled (its last checks vary by at most 2%% of its "
                   "variance over the run)")
    p.add_argument("--early-stop-window", type=int_at_least(2), default=EARLY_STOP_WINDOW, metavar="K",
                   help=f"validation checks the early stop looks back over (default: {EARLY_STOP_WINDOW})")
    p.add_argument("--compile", dest="compile_unet", action="store_true",
                   help="compile the UNet with torch.compile (a slower start for faster steps; falls back to eager "
                   "with one line where this machine cannot compile)")
    p.add_argument("--preview-prompt", default="", help="preview prompt (default: the first prompt of the batch)")
    p.add_argument("--preview-negative-prompt", default="", help="preview negative prompt")
    p.add_argument("--preview-steps", type=positive_int, default=20, help="preview sampling steps (default: 20)")
    p.add_argument("--preview-sampler", default="Euler a", help="preview sampler (default: Euler a)")
    p.add_argument("--preview-cfg-scale", type=float, default=7.0, help="preview CFG scale (default: 7)")
    p.add_argument("--preview-seed", type=int, default=-1, help="preview seed; -1 = random (default: -1)")
    _model_arguments(p)
    p.set_defaults(func=run_train, kind=kind)


def _load_model(args: argparse.Namespace, device: Any = None) -> Any:
    from sdconcepts.backends.model_loading import ModelLoadError, load_model  # lazy: transformers, diffusers

    try:
        return load_model(args.ckpt, device=device or args.device)
    except ModelLoadError as exc:
        raise CommandError(str(exc)) from exc


def run_create_embedding(args: argparse.Namespace) -> int:
    args.vectors = preset_value(args, "vectors")
    args.init_text = preset_value(args, "init_text")
    if args.vectors > MAX_VECTORS:
        raise CommandError(f"--vectors must be between 1 and {MAX_VECTORS}, got {args.vectors}")
    try:
        target = target_path(args.embeddings_dir, args.name)
        if target.exists() and not args.overwrite:
            raise CreateError(f"{target} already exists (use --overwrite to replace it)")
        model = TrainingModel(_load_model(args, "cpu"))
        path = create_embedding_file(
            args.embeddings_dir,
            args.name,
            model.token_rows(args.init_text, args.vectors),
            vectors=args.vectors,
            width=model.context_width,
            overwrite=args.overwrite,
        )
    except (CreateError, InvalidNameError) as exc:
        raise CommandError(str(exc)) from exc
    print(path)
    return 0


def _floats(text: str, label: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CommandError(f"{label} must be comma-separated numbers, got {text!r}") from None


def run_create_hypernetwork(args: argparse.Namespace) -> int:
    preset = args.sizes.strip().lower()
    if preset == "model":
        shape = read_model_shape(args.ckpt)  # None: only loading tells (a .ckpt)
        if shape is not None:
            sizes = list(shape.widths)
        else:
            model = _load_model(args, "cpu")
            # The context width first, then the self-attention widths (A1111's order of the create form's sizes).
            sizes = [model.context_width, *sorted(attention_widths(model.unet) - {model.context_width})]
    elif preset in FAMILY_SIZES:
        sizes = list(FAMILY_SIZES[preset])
    else:
        try:
            sizes = [int(part) for part in args.sizes.split(",") if part.strip()]
        except ValueError:
            raise CommandError(
                f"--sizes must be comma-separated whole numbers, a family ({', '.join(FAMILY_SIZES)}) or 'model', "
                f"got {args.sizes!r}"
            ) from None
    if not sizes:
        raise CommandError("--sizes names no width")
    try:
        path = create_hypernetwork_file(
            args.hypernetworks_dir,
            args.name,
            widths=sizes,
            layer_structure=_floats(args.layer_structure, "--layer-structure"),
            activation=args.activation,
            weight_init=args.weight_init,
            layer_norm=args.layer_norm,
            use_dropout=args.use_dropout,
            dropout_structure=_floats(args.dropout_structure, "--dropout-structure"),
            overwrite=args.overwrite,
            seed=args.seed,
            size_limits=args.size_limits,
        )
    except (CreateError, InvalidNameError, HypernetworkError) as exc:
        raise CommandError(str(exc)) from exc
    print(path)
    return 0


def run_train(args: argparse.Namespace) -> int:
    check_folder(Path(args.log_dir), "--log-dir")
    args.learn_rate = preset_value(args, "learn_rate", HypernetworkTrainingConfig.learn_rate)
    args.batch_size = preset_value(args, "batch_size", 1)
    fields: dict[str, Any] = {
        "dataset": str(args.dataset),
        "learn_rate": args.learn_rate,
        "batch_size": args.batch_size,
        "gradient_accumulation": args.gradient_accumulation,
        "log_directory": args.log_dir,
        "template": args.template,
        "width": args.width or 512,
        "height": args.height or 512,
        "keep_size": args.keep_size,
        "max_steps": args.max_steps,
        "preview_every": args.preview_every,
        "save_every": args.save_every,
        "use_alpha_weight": args.use_alpha_weight,
        "shuffle_tags": args.shuffle_tags,
        "tag_dropout": args.tag_dropout,
        "latent_sampling": args.latent_sampling,
        "clip_grad_mode": args.clip_grad_mode,
        "clip_grad_value": args.clip_grad_value,
        "filename_regex": args.filename_regex,
        "filename_join": args.filename_join,
        "save_optimizer_state": args.save_optimizer_state,
        "seed": args.seed,
        "preview_prompt": args.preview_prompt,
        "preview_negative_prompt": args.preview_negative_prompt,
        "preview_steps": args.preview_steps,
        "preview_sampler": args.preview_sampler,
        "preview_cfg_scale": args.preview_cfg_scale,
        "preview_seed": args.preview_seed,
        "size_limits": args.size_limits,
        "validate_every": args.validate_every,
        "validation_share": args.validation_share,
        "early_stop": args.early_stop,
        "early_stop_window": args.early_stop_window,
        "compile_unet": args.compile_unet,
    }
    stop = threading.Event()
    errors = (ConfigError, TrainingError, TemplateError, DatasetError, ScheduleError, EmbeddingFileError,
              HypernetworkError, GenerationError)
    try:
        # Refuse bad settings (a TI template without [name], a bad schedule, ...) before loading anything.
        config_class = EmbeddingTrainingConfig if args.kind == "embedding" else HypernetworkTrainingConfig
        config_class(**fields).validated(size_multiple=8)
    except errors as exc:
        raise CommandError(str(exc)) from exc
    distributed = Distributed.from_environment()
    model = _load_model(args, distributed.device() if distributed.world_size > 1 else None)
    fields["width"] = args.width or model.default_size
    fields["height"] = args.height or model.default_size
    try:
        if args.kind == "embedding":
            config = EmbeddingTrainingConfig(**fields, save_image_with_embedding=args.save_image_with_embedding)
            events = train_embedding(model, args.name, config, embeddings_dir=args.embeddings_dir, stop=stop,
                                     distributed=distributed, preparing=True)
        else:
            hn_config = HypernetworkTrainingConfig(**fields)
            events = train_hypernetwork(model, args.name, hn_config, hypernetworks_dir=args.hypernetworks_dir,
                                        stop=stop, distributed=distributed, preparing=True)
        return _drive(events, stop, args.max_steps, distributed.is_main, tqdm)
    except errors as exc:
        raise CommandError(str(exc)) from exc


def _drive(events: Any, stop: threading.Event, max_steps: int, show: bool, tqdm: Any) -> int:
    """Print the events with a progress bar; the first Ctrl-C asks the run to stop and save, a second one aborts."""
    previous = signal.getsignal(signal.SIGINT)

    def interrupt(_signum: int, _frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\ninterrupting: finishing the current step and saving (Ctrl-C again to abort)", file=sys.stderr)

    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        signal.signal(signal.SIGINT, interrupt)
    bar = None
    status = 0
    postfix: dict[str, str] = {}
    try:
        for event in events:
            if event.kind == "preparing":
                if show:
                    print(f"{event.message}", file=sys.stderr)
                continue
            if bar is None:
                start = event.step - 1 if event.kind == "step" else event.step
                bar = tqdm(total=max_steps, initial=start, unit="step", file=sys.stderr, disable=not show,
                           desc="training")
            if event.kind == "step":
                bar.update(event.step - bar.n)
                bar.set_description(f"[Epoch {event.epoch}: {event.epoch_step + 1}] loss: {event.loss:.7f}", refresh=False)
                postfix["lr"] = f"{event.lr:g}"
                if event.val_loss is not None:
                    postfix["val"] = f"{event.val_loss:.6f}"
                if event.best_saved:
                    postfix["best"] = f"step {event.step}"
                bar.set_postfix(postfix, refresh=False)
                for label, value in (("saved", event.saved), ("preview", event.preview),
                                     ("compile", event.extra.get("compile"))):
                    if value and show:
                        bar.write(f"{label}: {value}", file=sys.stderr)
            else:
                bar.close()
                if show:
                    print(event.message)
                status = 1 if event.kind == "nan" else 0
    finally:
        if bar is not None:
            bar.close()
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)
    return status
