"""Names of new embeddings and hypernetworks: A1111's sanitising, and the refusal of names that leave their folder."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["InvalidNameError", "fit_file_name", "name_max", "path_problem", "sanitize_name", "target_path"]

# Training writes ``<file>.optim`` beside the file (A1111's sidecar), so a name must leave room for it too.
SIDECAR_SUFFIX = ".optim"
_DEFAULT_NAME_MAX = 255
_DEFAULT_PATH_MAX = 4096


class InvalidNameError(ValueError):
    """A name that cannot be used for a file in the folder."""


def sanitize_name(name: str) -> str:
    """A1111 keeps alphanumerics and ``._- ``; a path separator or a name of dots is refused instead of mangled."""
    if "/" in name or "\\" in name:
        raise InvalidNameError(f"name {name!r} contains a path separator; names stay inside their folder")
    cleaned = "".join(ch for ch in name if ch.isalnum() or ch in "._- ").strip()
    if not cleaned or set(cleaned) <= {"."}:
        raise InvalidNameError(f"name {name!r} leaves no usable file name (letters, digits and ._- are kept)")
    return cleaned


def path_problem(text: str) -> str | None:
    """Why ``text`` cannot name any file (a NUL character, a path or a name longer than the system takes), or None.

    Checked where a path is typed (the Train tab's folders): the system's own refusal is a Python error
    ("embedded null byte", "[Errno 36] File name too long") that said nothing about the field.
    """
    if "\x00" in text:
        return "contains a NUL character, which no path can hold"
    try:
        path_max = int(os.pathconf("/", "PC_PATH_MAX"))
    except (AttributeError, ValueError, OSError):
        path_max = _DEFAULT_PATH_MAX
    try:
        encoded = _encoded(text)
    except UnicodeEncodeError:
        return "contains characters that no file name can hold"
    if len(encoded) >= path_max:
        return f"{len(encoded)} bytes long; paths end at {path_max - 1}"
    longest = max((len(_encoded(part)) for part in Path(text).parts), default=0)
    if longest > _DEFAULT_NAME_MAX:
        return f"a name in it is {longest} bytes long; names end at {_DEFAULT_NAME_MAX}"
    return None


def name_max(folder: str | Path) -> int:
    """The longest file name, in bytes, that ``folder``'s file system takes (asked of the nearest existing folder)."""
    place = Path(folder).absolute()
    while not place.is_dir() and place != place.parent:
        place = place.parent
    try:
        return int(os.pathconf(place, "PC_NAME_MAX"))
    except (AttributeError, ValueError, OSError):  # Windows has no pathconf; NTFS and FAT32 allow 255
        return _DEFAULT_NAME_MAX


def _encoded(text: str) -> bytes:
    return os.fsencode(text)


def target_path(folder: str | Path, name: str, suffix: str = ".pt") -> Path:
    """``folder/<sanitised name><suffix>``, checked to be directly inside ``folder`` and short enough for it."""
    root = Path(folder)
    cleaned = sanitize_name(name)
    limit = name_max(root) - len(_encoded(suffix + SIDECAR_SUFFIX))
    if len(_encoded(cleaned)) > limit:
        raise InvalidNameError(
            f"name too long: {len(_encoded(cleaned))} bytes, at most {limit} bytes in {root} (its file system takes "
            f"{name_max(root)}-byte file names, less {suffix!r} and the {SIDECAR_SUFFIX!r} that training adds)"
        )
    path = root / f"{cleaned}{suffix}"
    if path.resolve().parent != root.resolve():
        raise InvalidNameError(f"name {name!r} would leave the folder {root}")
    return path


def fit_file_name(folder: str | Path, stem: str, tail: str, *, reserve: int = 0) -> str:
    """``stem + tail``, the stem shortened (whole characters) so that the name and ``reserve`` more bytes fit in
    ``folder``: for files named after a long name plus a step number (the log folder's copies and previews)."""
    room = name_max(folder) - len(_encoded(tail)) - reserve
    while stem and len(_encoded(stem)) > room:
        stem = stem[:-1]
    return stem + tail
