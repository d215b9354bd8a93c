"""What every command's arguments share: the one-line error a command reports, and argparse types."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from sdconcepts.model_shape import EMBEDDED_XL_MODEL_DIR, EMBEDDED_XL_NAME

__all__ = ["TRAIN_LOG_DIR", "CommandError", "check_folder", "existing_dir", "existing_path", "int_at_least",
           "positive_int"]

# The training logs (loss CSV, previews, snapshots) of the CLI and the standalone web UI: under ./outputs (git-ignored,
# beside the pictures) rather than A1111's ./textual_inversion in whatever folder they were started from.
TRAIN_LOG_DIR = Path("outputs") / "textual_inversion"


class CommandError(Exception):
    """An error the CLI reports as one line and exit code 2."""


def check_folder(path: Path, what: str) -> None:
    """Refuse (CommandError, one line) a folder to write into that is a file or lies under one, before any work:
    ``--output /dev/null`` was found out only after generating, the others as a traceback."""
    for candidate in (path, *path.parents):
        if candidate.is_dir():
            return
        if candidate.exists() or candidate.is_symlink():
            where = "it is" if candidate == path else f"{candidate} is"
            raise CommandError(f"{what} {path}: {where} a file, not a folder")


def existing_dir(value: str) -> Path:
    """An argparse type: a folder that exists."""
    path = Path(value)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: no such folder")
    return path


def existing_path(value: str) -> Path:
    """An argparse type: a file or folder that exists, or ``toyworld-xl`` (the embedded SDXL-layout model)."""
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


positive_int = int_at_least(1)
