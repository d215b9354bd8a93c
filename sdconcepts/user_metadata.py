"""A1111 1.6+'s user metadata: the ``<name>.json`` beside an embedding or hypernetwork file, read and written.

A1111 keeps what the user says about a file in ``os.path.splitext(file)[0] + ".json"`` (``modules/extra_networks.py``
``get_user_metadata``), written with ``json.dump(metadata, indent=4, ensure_ascii=False)``. Its generic editor writes
``description`` and ``notes``; the Lora editor adds ``sd version``, ``activation text``, ``preferred weight`` and
``negative text`` (``extensions-builtin/Lora/ui_edit_user_metadata.py``). We read and write all six keys and keep
every other key of the file as it was, so the same file works in A1111 and here.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdconcepts.atomic_files import atomic_path
from sdconcepts.safe_load import UnsafeFileError, read_json

__all__ = [
    "SD_VERSIONS",
    "UserMetadata",
    "UserMetadataError",
    "metadata_path",
    "read_user_metadata",
    "write_user_metadata",
]

# A1111's on-disk keys (Lora's ui_edit_user_metadata.save_lora_user_metadata).
DESCRIPTION = "description"
ACTIVATION_TEXT = "activation text"
PREFERRED_WEIGHT = "preferred weight"
NEGATIVE_TEXT = "negative text"
NOTES = "notes"
SD_VERSION = "sd version"
# The choices of A1111's "Stable Diffusion version" dropdown.
SD_VERSIONS = ("SD1", "SD2", "SDXL", "Unknown")
# A description is a few paragraphs; a bigger file is not user metadata, and is never read whole.
MAX_BYTES = 1 << 20


class UserMetadataError(ValueError):
    """A ``.json`` sidecar that cannot be used (not JSON, not an object, too big); the message is one line."""


@dataclass(frozen=True)
class UserMetadata:
    """The six fields A1111's editors show; ``other`` holds the file's remaining keys, written back untouched."""

    description: str = ""
    activation_text: str = ""
    preferred_weight: float = 0.0
    negative_text: str = ""
    notes: str = ""
    sd_version: str = ""
    other: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> UserMetadata:
        known = (DESCRIPTION, ACTIVATION_TEXT, PREFERRED_WEIGHT, NEGATIVE_TEXT, NOTES, SD_VERSION)
        return cls(
            description=_text(data.get(DESCRIPTION)),
            activation_text=_text(data.get(ACTIVATION_TEXT)),
            preferred_weight=_weight(data.get(PREFERRED_WEIGHT)),
            negative_text=_text(data.get(NEGATIVE_TEXT)),
            notes=_text(data.get(NOTES)),
            sd_version=_text(data.get(SD_VERSION)),
            other={k: v for k, v in data.items() if k not in known},
        )

    def to_json(self) -> dict[str, Any]:
        """The dict A1111 writes: its keys in its editor's order after the file's other keys."""
        return {
            **self.other,
            DESCRIPTION: self.description,
            SD_VERSION: self.sd_version or "Unknown",
            ACTIVATION_TEXT: self.activation_text,
            PREFERRED_WEIGHT: self.preferred_weight,
            NEGATIVE_TEXT: self.negative_text,
            NOTES: self.notes,
        }


def _text(value: object) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _weight(value: object) -> float:
    # A1111 reads it with float(); a value it could not use counts as unset (0 means "use the default multiplier").
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) else 0.0


def metadata_path(path: str | os.PathLike[str]) -> Path:
    """``name.json`` beside ``name.pt`` (A1111 replaces the last extension)."""
    return Path(os.path.splitext(os.fspath(path))[0] + ".json")


def read_user_metadata(path: str | os.PathLike[str]) -> UserMetadata | None:
    """The metadata of the file at ``path`` (an embedding or hypernetwork), or None when it has no ``.json``.

    Raises UserMetadataError naming the sidecar and the reason for a file that is not a JSON object.
    """
    sidecar = metadata_path(path)
    if not os.path.lexists(sidecar):
        return None
    try:
        data = read_json(sidecar, max_bytes=MAX_BYTES)
    except UnsafeFileError as exc:
        raise UserMetadataError(_with_name(str(exc), sidecar)) from None
    if not isinstance(data, dict):
        raise UserMetadataError(f"{sidecar}: expected a JSON object, found {type(data).__name__}")
    return UserMetadata.from_json(data)


def write_user_metadata(path: str | os.PathLike[str], metadata: UserMetadata) -> Path:
    """Write ``metadata`` to ``path``'s ``.json`` atomically (mode from the umask), keeping the file's other keys.

    A sidecar that exists but cannot be read as JSON is not overwritten (its content would be lost): the
    UserMetadataError says why.
    """
    sidecar = metadata_path(path)
    current = read_user_metadata(path)
    other = dict(current.other) if current is not None else {}
    data = UserMetadata(
        description=metadata.description,
        activation_text=metadata.activation_text,
        preferred_weight=_weight(metadata.preferred_weight),
        negative_text=metadata.negative_text,
        notes=metadata.notes,
        sd_version=metadata.sd_version,
        other={**other, **metadata.other},
    ).to_json()
    text = json.dumps(data, indent=4, ensure_ascii=False)
    if len(text.encode("utf-8")) > MAX_BYTES:
        # Written, it could never be read back (nor repaired from the editor): refuse it while the old file is intact.
        raise UserMetadataError(f"{sidecar}: the metadata would take more than {MAX_BYTES >> 20} MiB; shorten it")
    try:
        with atomic_path(sidecar) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UserMetadataError(f"{sidecar}: cannot write it ({exc.strerror or exc})") from None
    return sidecar


def _with_name(reason: str, sidecar: Path) -> str:
    return reason if reason.startswith(str(sidecar)) else f"{sidecar}: {reason}"
