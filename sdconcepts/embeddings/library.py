"""The embedding library: embedding folders with A1111's rules, listed by ``embeddings.folder_scan``'s ``Library``.

``EmbeddingLibrary`` adds A1111's width check and name rules for textual inversion embeddings; its loader reads
headers only, and an embedding's vectors are read when a prompt uses it (``usable_embeddings``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from sdconcepts.embeddings.embedding import Embedding, kind_mismatch, kind_mismatch_reason
from sdconcepts.embeddings.files import (
    EMBEDDING_SUFFIXES,
    IMAGE_SUFFIXES,
    EmbeddingFileError,
    EmbeddingInfo,
    NoEmbeddedData,
    load_embedding,
    read_embedding_info,
)
from sdconcepts.embeddings.folder_scan import Library, LibraryChanges, error_line
from sdconcepts.hash_cache import HashCache
from sdconcepts.prompts.chunks import CHUNK_LENGTH
from sdconcepts.user_metadata import UserMetadata

log = logging.getLogger(__name__)

__all__ = ["EmbeddingLibrary", "EmbeddingRecord", "usable_embeddings"]

# ---------------------------------------------------------------------------------------------------------------
# Textual inversion embeddings
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddingRecord:
    """An embedding file as the UI and CLI list it; ``skipped`` says why it cannot be used with the current model.

    The listing reads headers only (``read_embedding_info``); ``EmbeddingLibrary.load`` reads the vectors.
    """

    name: str
    path: Path
    preview: Path | None
    hash: str | None
    mtime: float
    vectors: int | None
    width: int | None
    skipped: str | None
    size: int = 0
    pending: bool = False
    user_metadata: UserMetadata | None = None
    metadata_error: str | None = None
    # Skipped only because it is a single-encoder (SD 1.x/2.x) file and the model is SDXL: it can be converted
    # (``embeddings.conversion``).
    convertible: bool = False

    @property
    def short_hash(self) -> str | None:
        return self.hash[:12] if self.hash else None


def _describe_width(width: int) -> str:
    return {768: "768 (SD 1.x)", 1024: "1024 (SD 2.x)", 2048: "2048 (SDXL clip_l + clip_g)"}.get(width, str(width))


_LoadKey = tuple[str, float, int]  # (path, mtime, size) of the file an embedding was loaded from


class EmbeddingLibrary:
    """Embedding folders with A1111's rules: names from file stems (images: the stored name), case-insensitive
    matching, later files winning a name, and files whose width does not fit the model listed as skipped.

    A scan reads each file's header (vector count, width) and hash; the vectors of a file are read only when a
    prompt uses it (``usable(width, used_in=prompt)``), and kept while the file is unchanged.
    """

    def __init__(self, folders: Iterable[str | os.PathLike[str]], hashes: HashCache | None = None) -> None:
        """``hashes``: remember file hashes across runs (the header is still read; the whole file is not, once)."""
        self.files: Library[EmbeddingInfo] = Library(
            folders=[Path(f) for f in folders],
            # With a hash cache the library hashes (or finds the hash) itself; the loader reads the header only.
            load=read_embedding_info if hashes is None else _read_info_unhashed,
            suffixes=EMBEDDING_SUFFIXES,
            name_of=lambda _path, info: info.name,
            hash_of=lambda info: info.hash,
            quiet=(NoEmbeddedData,),
            hashes=hashes,
        )
        self._loaded: dict[_LoadKey, Embedding] = {}
        self._failed: dict[_LoadKey, str] = {}
        self._load_lock = threading.Lock()

    @property
    def folders(self) -> Sequence[Path]:
        return tuple(self.files.folders)

    @property
    def version(self) -> tuple[int, int]:
        """Changes when the records may have: a refresh found something, or a file failed its full read."""
        return self.files.version, len(self._failed)

    def add_folder(self, folder: str | os.PathLike[str]) -> None:
        self.files.add_folder(folder)

    def refresh(self, *, force: bool = False, lazy: bool = False) -> LibraryChanges:
        """Rescan (see ``Library.refresh``; with ``lazy`` headers are read later, by ``read_pending`` or on use)."""
        changes = self.files.refresh(force=force, lazy=lazy)
        if changes:
            # Forget vectors and load failures of files that changed or went away.
            live = {(str(r.path), r.mtime, r.size) for r in self.files.records()}
            with self._load_lock:
                self._loaded = {k: v for k, v in self._loaded.items() if k in live}
                self._failed = {k: v for k, v in self._failed.items() if k in live}
        return changes

    def records(self, width: int | None = None, *, sdxl: bool | None = None) -> list[EmbeddingRecord]:
        """Every embedding file; with the model's ``width`` (768, 1024, 2048 for SDXL) misfits are skipped, and with
        ``sdxl`` (whether the model is SDXL) so are files of the other kind whatever their width, for the reason
        generation gives (``embedding.kind_mismatch``)."""
        result: list[EmbeddingRecord] = []
        winner: dict[str, int] = {}
        failed = self._failed
        for record in self.files.records():
            info = record.item
            skipped = record.error
            convertible = False
            if record.pending and str(record.path).lower().endswith(IMAGE_SUFFIXES):
                # Most pictures are card pictures, not embeddings: an unread one is not listed as a word.
                continue
            if info is not None and (str(record.path), record.mtime, record.size) in failed:
                skipped = failed[(str(record.path), record.mtime, record.size)]
            elif info is not None and info.vectors > CHUNK_LENGTH:
                # A1111 1.10 lists such a file, then fails inside CLIP when a prompt uses it (its chunk grows past
                # 77 tokens). It can never work, so it is never offered.
                skipped = (
                    f"{info.vectors} vectors: more than the {CHUNK_LENGTH} tokens a prompt chunk holds, "
                    "so no prompt can use it"
                )
            elif info is not None and width is not None and info.width != width:
                skipped = f"width {_describe_width(info.width)} does not fit the model's {_describe_width(width)}"
                convertible = bool(sdxl) and not info.sdxl
            elif info is not None and sdxl is not None:
                skipped = kind_mismatch_reason(info.sdxl, info.width, sdxl=sdxl) or skipped
                convertible = sdxl and not info.sdxl
            if skipped is None:
                key = record.name.lower()
                if key in winner:
                    loser = result[winner[key]]
                    result[winner[key]] = _replace_skip(loser, f"name also used by {record.path}, which wins")
                winner[key] = len(result)
            result.append(
                EmbeddingRecord(
                    name=record.name,
                    path=record.path,
                    preview=record.preview,
                    hash=record.hash,
                    mtime=record.mtime,
                    vectors=info.vectors if info is not None else None,
                    width=info.width if info is not None else None,
                    skipped=skipped,
                    size=record.size,
                    pending=record.pending,
                    user_metadata=record.user_metadata,
                    metadata_error=record.metadata_error,
                    convertible=convertible and skipped is not None,
                )
            )
        return result

    def load(self, record: EmbeddingRecord) -> Embedding | None:
        """The vectors of a listed file (read once while the file is unchanged); None, with the reason remembered
        for ``records``, when the file fails the full read that its header passed."""
        key = (str(record.path), record.mtime, record.size)
        with self._load_lock:
            if key in self._loaded:
                return self._loaded[key]
            if key in self._failed:
                return None
        try:
            embedding = load_embedding(record.path)
        except EmbeddingFileError as exc:
            with self._load_lock:
                self._failed[key] = error_line(exc, record.path)
            return None
        if embedding.name != record.name:  # an image whose stored name changed since the scan
            embedding = replace(embedding, name=record.name)
        with self._load_lock:
            self._loaded[key] = embedding
        return embedding

    def usable(self, width: int | None = None, *, used_in: str | None = None) -> dict[str, Embedding]:
        """Name -> embedding for every file that loads (and fits ``width``).

        With ``used_in`` (the prompt and negative prompt), only embeddings whose name occurs in that text are
        read: a prompt word is at least its name's characters, so nothing a prompt can use is left out.
        """
        # A name typed with escaped brackets (``a\(b\)``) is still the name ``a(b)``.
        text = used_in.lower().replace("\\", "") if used_in is not None else None
        self._read_pending(lambda name: text is None or name.lower() in text)
        result: dict[str, Embedding] = {}
        for record in self.records(width):
            if record.skipped is not None or (text is not None and record.name.lower() not in text):
                continue
            embedding = self.load(record)
            if embedding is not None:
                result[record.name] = embedding
        return result

    def skipped(self, width: int | None = None) -> dict[str, str]:
        """Name -> reason for every file that cannot be used (the prompt word it would have had)."""
        return {r.name: r.skipped for r in self.records(width) if r.skipped is not None}

    def get(self, name: str, width: int | None = None) -> Embedding | None:
        """The usable embedding registered under ``name``, matched case-insensitively as A1111 does."""
        key = name.lower()
        self._read_pending(lambda found: found.lower() == key)
        for record in reversed(self.records(width)):
            if record.skipped is None and record.name.lower() == key:
                return self.load(record)
        return None

    def read_pending(self, limit: int | None = None, *, quiet: bool = False) -> int:
        """Read the headers of up to ``limit`` files a lazy refresh listed; returns how many were read."""
        return self.files.read_pending(limit, quiet=quiet)

    def _read_pending(self, wanted: Callable[[str], bool]) -> None:
        # An unread file may be a word the prompt uses: its stem (images: any name, stored inside) decides.
        self.files.read(
            r.path for r in self.files.records()
            if r.pending and (str(r.path).lower().endswith(IMAGE_SUFFIXES) or wanted(r.name))
        )


def _read_info_unhashed(path: Path) -> EmbeddingInfo:
    return read_embedding_info(path, hash=False)


def _replace_skip(record: EmbeddingRecord, reason: str) -> EmbeddingRecord:
    return replace(record, skipped=reason)


def usable_embeddings(
    library: EmbeddingLibrary, width: int, *, sdxl: bool, used_in: str | None = None,
    encoder_widths: Sequence[int] | None = None,
) -> tuple[dict[str, Embedding], dict[str, str]]:
    """``(usable, skipped)`` of a library for a model of context ``width`` (SDXL: ``sdxl``): name -> embedding,
    and name -> reason for files that cannot apply (wrong width, wrong kind, unreadable). A name that some file
    provides is not reported as skipped because another file lost it. With ``used_in`` (prompt and negative
    prompt), only the embeddings named there are read (``EmbeddingLibrary.usable``). ``encoder_widths``: an SDXL
    model's clip_l and clip_g widths, which each half of an SDXL embedding must match (``embedding.kind_mismatch``)."""
    usable: dict[str, Embedding] = {}
    # ``usable`` reads the files still pending (a lazy listing) first, so that their skip reasons are known.
    found = library.usable(width, used_in=used_in)
    skipped = dict(library.skipped(width))
    for name, emb in found.items():
        reason = kind_mismatch(emb, sdxl=sdxl, encoder_widths=encoder_widths)
        if reason is None:
            usable[name] = emb
        else:
            skipped[name] = reason
    taken = {name.lower() for name in usable}
    return usable, {name: reason for name, reason in skipped.items() if name.lower() not in taken}
