"""``python -m sdconcepts`` without a command: serve the web UI."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sdconcepts.cli.arguments import TRAIN_LOG_DIR, CommandError, existing_dir, existing_path, positive_int
from sdconcepts.toyworld.examples import EXAMPLE_EMBEDDINGS_DIR, EXAMPLE_HYPERNETWORKS_DIR
from sdconcepts.ui.ui_session import UiConfig, UiSession


def add_web_ui_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m sdconcepts`` without a command, which serves the web UI."""
    ui = parser.add_argument_group("web UI (no COMMAND)")
    ui.add_argument("--port", dest="ui_port", type=positive_int, default=7860, metavar="P",
                    help="port to serve on (default: 7860)")
    ui.add_argument("--listen", dest="ui_listen", action="store_true",
                    help="serve on 0.0.0.0 (every network interface) instead of 127.0.0.1")
    ui.add_argument("--ckpt", dest="ui_ckpt", type=existing_path, default=None, metavar="PATH",
                    help="start on this model: a diffusers folder, an A1111 .safetensors/.ckpt file or toyworld-xl "
                    "(default: the embedded toy-world model)")
    ui.add_argument("--models-dir", dest="ui_models_dir", type=existing_dir, default=None, metavar="D",
                    help="checkpoints offered in the model dropdown (default: ./models/Stable-diffusion when it exists)")
    ui.add_argument("--embeddings-dir", dest="ui_embeddings_dir", type=existing_dir, action="append", default=None,
                    metavar="D", help="textual inversion embeddings folder; repeatable (default: ./embeddings)")
    ui.add_argument("--lora-dir", dest="ui_lora_dir", type=existing_dir, action="append", default=None, metavar="D",
                    help="LoRA files whose bundled embeddings (A1111's bundle_emb keys) are words while the LoRA is in "
                    "the prompt as <lora:name:w>; repeatable (default: ./models/Lora when it exists)")
    ui.add_argument("--hypernetworks-dir", dest="ui_hypernetworks_dir", type=existing_dir, action="append",
                    default=None, metavar="D",
                    help="hypernetworks folder; repeatable (default: ./models/hypernetworks)")
    ui.add_argument("--outputs-dir", dest="ui_outputs_dir", type=Path, default=Path("outputs") / "txt2img-images",
                    metavar="D", help="where generated PNGs are saved (default: ./outputs/txt2img-images)")
    ui.add_argument("--img2img-outputs-dir", dest="ui_img2img_outputs_dir", type=Path,
                    default=Path("outputs") / "img2img-images", metavar="D",
                    help="where img2img and inpaint PNGs are saved (default: ./outputs/img2img-images, as A1111)")
    ui.add_argument("--train-root", dest="ui_train_roots", type=existing_dir, action="append", default=None,
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
        from sdconcepts.ui.app import launch_app  # lazy: gradio
    except ImportError as exc:
        raise CommandError(f"the web UI needs gradio ({exc}); install it with: pip install gradio") from exc
    host = "0.0.0.0" if args.ui_listen else "127.0.0.1"
    launch_app(UiSession(web_ui_config(args)), host=host, port=args.ui_port)
    return 0


def web_ui_config(args: argparse.Namespace) -> Any:
    """The ``ui.session.UiConfig`` that ``python -m sdconcepts`` serves with these options."""
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
        lora_dirs=_default_dirs(args.ui_lora_dir, Path("models") / "Lora"),
        outputs_dir=args.ui_outputs_dir,
        img2img_outputs_dir=args.ui_img2img_outputs_dir,
        train_log_dir=str(TRAIN_LOG_DIR),
        device=args.ui_device,
        train_roots=args.ui_train_roots,
        extra_embeddings_dirs=[EXAMPLE_EMBEDDINGS_DIR] if args.ui_examples else [],
        extra_hypernetworks_dirs=[EXAMPLE_HYPERNETWORKS_DIR] if args.ui_examples else [],
        cpu_threads=getattr(args, "threads", None),  # as main() resolved it; None leaves torch's alone
    )
