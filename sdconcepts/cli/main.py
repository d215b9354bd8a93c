"""Command line: ``python -m sdconcepts [COMMAND]``, every command's parser in one; errors are one line, never tracebacks."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from sdconcepts.atomic_files import describe_os_error
from sdconcepts.cli.arguments import CommandError
from sdconcepts.cli.embedding_commands import add_embedding_parser
from sdconcepts.cli.file_commands import add_file_parsers
from sdconcepts.cli.generate_command import add_generate_parser
from sdconcepts.cli.img2img_command import add_img2img_parser
from sdconcepts.cli.toyworld_commands import add_toyworld_parser
from sdconcepts.cli.training_commands import add_training_parsers
from sdconcepts.cli.web_ui_command import add_web_ui_arguments, run_web_ui
from sdconcepts.threads import AUTO, THREADS_ENV, apply_threads, parse_threads

THREADS_HELP = (f"CPU threads for torch: a number, or auto (the cores other work leaves free, at least 1; the default, "
                f"or ${THREADS_ENV})")


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
    add_img2img_parser(subparsers)
    add_file_parsers(subparsers)
    add_embedding_parser(subparsers)
    add_toyworld_parser(subparsers)
    add_training_parsers(subparsers)
    _add_threads_option(parser, argparse.SUPPRESS)
    parser.set_defaults(threads=None)
    return parser


def _thread_setting(parser: argparse.ArgumentParser, given: str | None) -> str | None:
    """--threads, else $SDCONCEPTS_THREADS, else auto; None when only $OMP_NUM_THREADS is set (torch follows it)."""
    if given is not None:
        return given
    if os.environ.get(THREADS_ENV):
        try:
            return parse_threads(os.environ[THREADS_ENV])
        except ValueError as exc:
            parser.error(f"${THREADS_ENV}: {exc}")
    return None if os.environ.get("OMP_NUM_THREADS") else AUTO


def _threads(value: str) -> str:
    try:
        return parse_threads(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_threads_option(parser: argparse.ArgumentParser, default: object) -> None:
    # On every (sub)command, so that both `--threads 1 generate ...` and `generate ... --threads 1` work; a
    # subcommand's copy defaults to SUPPRESS so it does not undo the top-level one. A command with its own
    # --threads (the toy world's training, deterministic per count) keeps it.
    try:
        parser.add_argument("--threads", type=_threads, default=default, metavar="N|auto", help=THREADS_HELP)
    except argparse.ArgumentError:
        return
    for action in parser._actions:  # argparse lists its subcommands nowhere public
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_threads_option(sub, argparse.SUPPRESS)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not hasattr(args, "func"):
        args.func = run_web_ui  # no command: serve the web UI
    args.threads = _thread_setting(parser, args.threads)
    if args.threads is not None and args.func is not run_web_ui:  # the web UI sets them before each job
        apply_threads(args.threads)
    try:
        return int(args.func(args))
    except CommandError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk, a file in the way of a folder, ...: what the system said, in one line
        print(f"{parser.prog}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
