"""The hypernetwork library: A1111's listing rules for hypernetwork folders, and the one cache of loaded ones.

The web UI lists the folders as cards (``hypernetwork_library``: headers only, read lazily), the CLI and the Forge
adapter list them by name (``find_hypernetworks``), and all three load what a prompt names through
``LoadedHypernetworks``, which keeps a loaded hypernetwork while its file's modification time and size stay the same.
A prompt's tags become the chain sampling applies through ``hypernetworks.tags.resolve_hypernetworks``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from sdconcepts.embeddings.folder_scan import Library, is_preview_image
from sdconcepts.hash_cache import HashCache
from sdconcepts.hypernetworks.files import (
    HypernetworkFileError,
    HypernetworkInfo,
    load_hypernetwork,
    read_hypernetwork_info,
)
from sdconcepts.hypernetworks.hypernetwork import Hypernetwork
from sdconcepts.prompts.network_tags import tag_name_problem

__all__ = [
    "HYPERNETWORK_SUFFIXES",
    "LoadedHypernetworks",
    "find_hypernetworks",
    "hypernetwork_library",
    "is_ignored",
    "load_hypernetwork_folders",
]

HYPERNETWORK_SUFFIXES = (".pt",)  # A1111 reads hypernetworks only from .pt files


def is_ignored(path: Path) -> bool:
    """A1111 never lists ``None.pt`` (its "no hypernetwork" choice); pictures are card previews."""
    return is_preview_image(path) or path.stem == "None"


def hypernetwork_library(
    folders: Iterable[str | os.PathLike[str]], hashes: HashCache | None = None
) -> Library[HypernetworkInfo]:
    """The cards' library of ``folders``: cards need only the metadata and widths, so no module is built and no
    weight is read until a prompt uses it."""
    return Library(
        folders=[Path(folder) for folder in folders], load=_nameable_info, suffixes=HYPERNETWORK_SUFFIXES,
        ignore=is_ignored, hashes=hashes,
    )


def _nameable_info(path: Path) -> HypernetworkInfo:
    """The card's information, for a file a ``<hypernet:...>`` tag can name; ``hn:5.pt`` got a card whose tag named
    another hypernetwork, so it is listed as skipped with the reason instead."""
    problem = tag_name_problem(path.stem)
    if problem is not None:
        raise HypernetworkFileError(f"{path}: {problem}")
    return read_hypernetwork_info(path)


def find_hypernetworks(folders: Iterable[str | os.PathLike[str]]) -> dict[str, Path]:
    """Name -> path of every ``.pt`` under ``folders``, recursively, with A1111's listing rules.

    The name is the file stem (no folder); paths are visited sorted by their lower-cased text and a later duplicate
    wins; ``None.pt`` is ignored; a folder named ``x.pt`` is searched, not listed. Nothing is opened: A1111 loads a
    hypernetwork only when a prompt names it.
    """
    found: list[Path] = []
    for folder in folders:
        root = Path(folder)
        if root.is_dir():
            # Every non-folder entry, FIFOs and sockets too: loading one gives its reason ("not a regular file")
            # instead of an "unknown hypernet" that hides the file. Nothing here opens it.
            found.extend(p for p in root.glob("**/*.pt") if not p.is_dir())
    names: dict[str, Path] = {}
    for path in sorted(found, key=lambda p: str(p).lower()):
        if path.stem != "None":
            names[path.stem] = path
    return names


def load_hypernetwork_folders(
    folders: Iterable[str | os.PathLike[str]],
) -> tuple[dict[str, Hypernetwork], dict[str, str]]:
    """Load every hypernetwork ``find_hypernetworks`` lists: (name -> hypernetwork, name -> why it was skipped).

    One bad file (hostile, corrupt, unknown activation, wrong shapes) is skipped with its one-line reason, which
    names the file; the others load.
    """
    loaded: dict[str, Hypernetwork] = {}
    skipped: dict[str, str] = {}
    for name, path in find_hypernetworks(folders).items():
        try:
            loaded[name] = load_hypernetwork(path)
        except HypernetworkFileError as exc:
            skipped[name] = str(exc)
    return loaded, skipped




@dataclass(frozen=True)
class _Loaded:
    mtime_ns: int
    size: int
    hypernetwork: Hypernetwork


class LoadedHypernetworks:
    """Loaded hypernetworks by path (and device), reused while the file's modification time and size are unchanged."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: dict[tuple[str, str | None], _Loaded] = {}

    def load(self, path: Path, device: torch.device | None = None) -> Hypernetwork:
        """The hypernetwork of ``path``, on ``device`` (None: as loaded); HypernetworkFileError when it cannot load.

        A file that cannot be stat'ed is handed to the loader as it is (it says why) and not kept.
        """
        try:
            stat = path.stat()
        except OSError:
            stat = None
        key = (str(path), None if device is None else str(device))
        with self._lock:
            cached = self._loaded.get(key)
            if cached is not None and stat is not None and (cached.mtime_ns, cached.size) == (
                stat.st_mtime_ns, stat.st_size
            ):
                return cached.hypernetwork
            if device is None:
                hypernetwork = load_hypernetwork(path)
            else:
                # As A1111, the modules run on the model's device and stay float32 (inputs are cast for them).
                # Forge activates extra networks under torch.inference_mode; cached modules must stay ordinary tensors.
                with torch.inference_mode(False):
                    hypernetwork = load_hypernetwork(path).to(device).eval()
            if stat is not None:
                self._loaded[key] = _Loaded(stat.st_mtime_ns, stat.st_size, hypernetwork)
            return hypernetwork

    def keep_only(self, paths: Iterable[Path]) -> None:
        """Drop every loaded hypernetwork whose file is not among ``paths`` (only what a prompt uses stays loaded)."""
        kept = {str(path) for path in paths}
        with self._lock:
            self._loaded = {key: value for key, value in self._loaded.items() if key[0] in kept}
