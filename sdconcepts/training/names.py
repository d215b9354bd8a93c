"""Names of new embeddings and hypernetworks: A1111's sanitising, and the refusal of names that leave their folder."""

from __future__ import annotations

from pathlib import Path

__all__ = ["InvalidNameError", "sanitize_name", "target_path"]


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


def target_path(folder: str | Path, name: str, suffix: str = ".pt") -> Path:
    """``folder/<sanitised name><suffix>``, checked to be directly inside ``folder``."""
    root = Path(folder)
    path = root / f"{sanitize_name(name)}{suffix}"
    if path.resolve().parent != root.resolve():
        raise InvalidNameError(f"name {name!r} would leave the folder {root}")
    return path
