"""Folders of embedding (or hypernetwork) files scanned into records, reloaded when anything under them changes.

``Library`` is generic over a loader function: it walks its folders recursively, loads each file once, keeps a
record per file (loaded, or skipped with a reason) and, on ``refresh()``, reloads only what was added, changed or
removed. A refresh that finds nothing changed costs one ``stat`` per file. ``refresh(lazy=True)`` only lists new
files (pending records) and ``read()`` loads the ones a caller needs (a card tab reads the page it shows), so a
library of 10,000 files lists in the time of its ``stat`` calls. Records carry the card picture beside each file
and A1111's user metadata (``name.json``). ``EmbeddingLibrary`` adds A1111's width check and name rules for textual
inversion embeddings; its loader reads headers only, and an embedding's vectors are read when a prompt uses it.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Generic, TypeVar

from sdconcepts.embeddings.embedding import Embedding, kind_mismatch, kind_mismatch_reason
from sdconcepts.embeddings.files import (
    EMBEDDING_SUFFIXES,
    HASH_AT_LISTING_BYTES,
    IMAGE_SUFFIXES,
    EmbeddingFileError,
    EmbeddingInfo,
    NoEmbeddedData,
    file_sha256,
    load_embedding,
    read_embedding_info,
)
from sdconcepts.hash_cache import HashCache
from sdconcepts.prompts import CHUNK_LENGTH
from sdconcepts.safe_load import file_kind
from sdconcepts.user_metadata import UserMetadata, UserMetadataError, read_user_metadata

log = logging.getLogger(__name__)

__all__ = [
    "PREVIEW_SUFFIXES",
    "EmbeddingLibrary",
    "EmbeddingRecord",
    "FileRecord",
    "Library",
    "LibraryChanges",
    "is_preview_image",
    "usable_embeddings",
]

T = TypeVar("T")

METADATA_SUFFIX = ".json"  # A1111's user metadata beside each file (sdconcepts.user_metadata)

# Pictures shown on a file's card: ``name.png`` or ``name.preview.png`` (and these other extensions) beside it.
PREVIEW_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")

_Stamp = tuple[int, int, int]  # (mtime_ns, size, inode): any in-place edit, replace or rename changes one of them


@dataclass(frozen=True)
class FileRecord(Generic[T]):
    """One scanned file: ``item`` is what the loader returned, or ``None`` with ``error`` saying why it was skipped."""

    name: str
    path: Path
    preview: Path | None
    hash: str | None
    mtime: float
    size: int
    item: T | None
    error: str | None = None
    # A1111's user metadata (``name.json``): its fields, or why that file could not be used.
    user_metadata: UserMetadata | None = None
    metadata_error: str | None = None
    # Found by a lazy refresh and not read yet (``Library.read``): ``item`` and ``error`` are both None.
    pending: bool = False

    @property
    def short_hash(self) -> str | None:
        return self.hash[:12] if self.hash else None


@dataclass(frozen=True)
class LibraryChanges:
    """What a refresh found: files added, changed (content or stamp) and removed, and whether a card picture or a
    user-metadata ``.json`` came, went or changed; falsy when nothing changed."""

    added: tuple[Path, ...] = ()
    changed: tuple[Path, ...] = ()
    removed: tuple[Path, ...] = ()
    previews: bool = False

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed or self.previews)


def is_preview_image(path: Path) -> bool:
    """A1111 never reads an embedding from ``*.preview.<image>``: it is a card picture."""
    return path.suffix.lower() in PREVIEW_SUFFIXES and path.stem.lower().endswith(".preview")


@dataclass
class Library(Generic[T]):
    """Files with ``suffixes`` under ``folders`` (recursively, symlinks followed), loaded with ``load``.

    ``name_of(path, item)`` gives a record's name (default: the file stem). A loader exception of a type in
    ``quiet`` drops the file without a record (an image that carries nothing); any other exception makes a skipped
    record holding the one-line message. ``hash_of(item)`` may supply the file hash the loader already computed.
    ``hashes`` remembers hashes across runs (keyed by path and stamp): a file hashed before is not read again to
    get its hash; the caller's loader should then not hash either (``EmbeddingLibrary`` arranges that).
    """

    folders: list[Path]
    load: Callable[[Path], T]
    suffixes: Collection[str]
    name_of: Callable[[Path, T], str] | None = None
    hash_of: Callable[[T], str | None] | None = None
    quiet: tuple[type[BaseException], ...] = ()
    ignore: Callable[[Path], bool] = is_preview_image
    hashes: HashCache | None = None
    _stamps: dict[str, _Stamp] = field(default_factory=dict, repr=False)
    _records: dict[str, FileRecord[T]] = field(default_factory=dict, repr=False)
    _sidecars: dict[str, tuple[_Stamp, UserMetadata | None, str | None]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _loadable_cache: dict[str, bool] = field(default_factory=dict, repr=False)
    _paths: dict[str, Path] = field(default_factory=dict, repr=False)
    _pictures: dict[str, Path] = field(default_factory=dict, repr=False)
    # Counts the refreshes that changed anything: a view built from the records stays valid while it is the same.
    version: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        self.folders = [Path(f) for f in self.folders]
        self.suffixes = tuple(s.lower() for s in self.suffixes)
        self._watched = tuple(dict.fromkeys((*self.suffixes, *PREVIEW_SUFFIXES, METADATA_SUFFIX)))

    def add_folder(self, folder: str | os.PathLike[str]) -> None:
        """Watch another folder too (A1111's ``add_embedding_dir``); its files load on the next refresh."""
        path = Path(folder)
        if path not in self.folders:
            self.folders.append(path)

    def refresh(self, *, force: bool = False, lazy: bool = False) -> LibraryChanges:
        """Bring the records up to date with the disk; reload only files whose stamp changed (all with ``force``).

        With ``lazy``, new and changed files are only listed (``pending`` records named after the file) and read
        later by ``read``/``read_pending``: a scan of 10,000 files then costs their ``stat`` calls.
        """
        with self._lock:
            stamps = self._walk()
            if stamps == self._stamps and not force:
                return LibraryChanges()
            old = self._stamps
            wanted = {p for p in stamps if self._loadable(p)}
            before = {p for p in old if self._loadable(p)}
            added = sorted(wanted - before)
            removed = sorted(before - wanted)
            changed = sorted(p for p in wanted & before if force or stamps[p] != old[p])
            previews = {p: s for p, s in stamps.items() if not self._loadable(p)} != {
                p: s for p, s in old.items() if not self._loadable(p)
            }
            self._stamps = stamps
            self.version += 1
            for path in removed:
                self._records.pop(path, None)
            for path in (*added, *changed):
                record = self._pending_record(self._path_of(path), stamps[path]) if lazy else self._load_one(
                    self._path_of(path), stamps[path]
                )
                if record is None:
                    self._records.pop(path, None)
                else:
                    self._records[path] = record
            # Keep walk order (later files win name collisions, as in A1111); refresh card pictures and metadata.
            sidecars: dict[str, tuple[_Stamp, UserMetadata | None, str | None]] = {}
            self._pictures = _preview_index(stamps)
            self._records = {
                p: self._with_sidecars(self._records[p], stamps, sidecars) for p in stamps if p in self._records
            }
            self._sidecars = sidecars
            for path in removed:
                self._paths.pop(path, None)
            changes = LibraryChanges(
                added=tuple(self._path_of(p) for p in added),
                changed=tuple(self._path_of(p) for p in changed),
                removed=tuple(Path(p) for p in removed),
                previews=previews,
            )
        if self.hashes is not None and not lazy:
            self.hashes.save(force=True)
        return changes

    def _path_of(self, key: str) -> Path:
        # One Path per file for the library's life: building 10,000 of them on every scan costs a second.
        path = self._paths.get(key)
        if path is None:
            path = self._paths[key] = Path(key)
        return path

    def records(self) -> list[FileRecord[T]]:
        """Every file found, loaded or skipped, in walk order (as of the last refresh)."""
        with self._lock:
            return list(self._records.values())

    def pending(self) -> list[Path]:
        """Files a lazy refresh listed and nothing has read yet, in walk order."""
        with self._lock:
            return [r.path for r in self._records.values() if r.pending]

    def read(self, paths: Iterable[str | os.PathLike[str]], *, quiet: bool = False) -> int:
        """Read the pending files among ``paths`` now; returns how many were read.

        The reading happens outside the lock (a view may list meanwhile); a file that changed since the scan keeps
        its pending record for the next refresh. ``quiet`` leaves ``version`` alone (a background reader bumps it
        once at the end with ``touch``, so views do not rebuild their cards after every batch).
        """
        with self._lock:
            todo = [
                (key, self._stamps[key]) for key in (os.fspath(p) for p in paths)
                if key in self._records and self._records[key].pending and key in self._stamps
            ]
        if not todo:
            return 0
        loaded = [(key, stamp, self._load_one(Path(key), stamp)) for key, stamp in todo]
        with self._lock:
            for key, stamp, record in loaded:
                current = self._records.get(key)
                if current is None or not current.pending or self._stamps.get(key) != stamp:
                    continue
                if record is None:
                    del self._records[key]
                else:
                    self._records[key] = self._with_sidecars(record, self._stamps, {})
            if not quiet:
                self.version += 1
            done = not any(r.pending for r in self._records.values())
        if self.hashes is not None:
            self.hashes.save(force=done)  # batches save now and then; the last one always
        return len(loaded)

    def read_pending(self, limit: int | None = None, *, quiet: bool = False) -> int:
        """Read up to ``limit`` pending files (all with None), in walk order; returns how many were read."""
        with self._lock:
            pending = [r.path for r in self._records.values() if r.pending][:limit]
        return self.read(pending, quiet=quiet)

    def touch(self) -> None:
        """Mark the records as changed (after quiet reads)."""
        with self._lock:
            self.version += 1

    def _loadable(self, path: str) -> bool:
        # Asked for every file on every changed refresh: remembered per path (a name's answer never changes).
        known = self._loadable_cache.get(path)
        if known is None:
            lower = path.lower()
            known = lower.endswith(self.suffixes) and not self.ignore(self._path_of(path))  # type: ignore[arg-type]
            self._loadable_cache[path] = known
        return known

    def _walk(self) -> dict[str, _Stamp]:
        stamps: dict[str, _Stamp] = {}
        seen: set[tuple[int, int]] = set()
        for folder in self.folders:
            self._walk_folder(str(folder), stamps, seen)
        return stamps

    def _walk_folder(self, folder: str, stamps: dict[str, _Stamp], seen: set[tuple[int, int]]) -> None:
        try:
            info = os.stat(folder)
            key = (info.st_dev, info.st_ino)
            if key in seen:  # a symlink loop, or the same folder listed twice
                return
            seen.add(key)
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError:
            return
        subfolders = []
        for entry in entries:
            try:
                if entry.is_dir():
                    subfolders.append(entry.path)
                elif entry.name.lower().endswith(self._watched):
                    st = entry.stat()
                    stamps[entry.path] = (st.st_mtime_ns, st.st_size, st.st_ino)
            except OSError:  # vanished while listing, or a dangling symlink
                continue
        for sub in subfolders:
            self._walk_folder(sub, stamps, seen)

    def _pending_record(self, path: Path, stamp: _Stamp) -> FileRecord[T]:
        return FileRecord(
            name=os.path.splitext(os.path.basename(str(path)))[0], path=path, preview=None, hash=None, mtime=stamp[0] / 1e9, size=stamp[1], item=None,
            pending=True,
        )

    def _load_one(self, path: Path, stamp: _Stamp) -> FileRecord[T] | None:
        mtime, size = stamp[0] / 1e9, stamp[1]
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:  # vanished since the walk, or a dangling symlink
            return FileRecord(
                name=path.stem, path=path, preview=None, hash=None, mtime=mtime, size=size, item=None,
                error=f"cannot read ({exc.strerror or exc})",
            )
        if not stat.S_ISREG(mode):
            # A FIFO, socket or device is never handed to a loader: opening a FIFO blocks the whole scan.
            return FileRecord(
                name=path.stem, path=path, preview=None, hash=None, mtime=mtime, size=size, item=None,
                error=f"not a regular file: {file_kind(mode)}",
            )
        try:
            item = self.load(path)
        except self.quiet:
            return None
        except Exception as exc:  # one bad file is reported and skipped; the rest load
            # Not hashed: a hash names a usable file, and a rejected file may be huge (a 2 GB sparse file is
            # refused from its first bytes; hashing it would read all of it).
            return FileRecord(
                name=path.stem, path=path, preview=None, hash=None, mtime=mtime, size=size,
                item=None, error=_one_line(exc, path),
            )
        name = self.name_of(path, item) if self.name_of is not None else path.stem
        digest = self.hash_of(item) if self.hash_of is not None else None
        if self.hashes is not None:
            known = self.hashes.get(str(path), stamp)
            if known is not None:
                digest = known
            elif digest is not None:
                self.hashes.put(str(path), stamp, digest)
            else:
                digest = _hash_or_none(path, stamp, self.hashes)
        return FileRecord(
            name=name, path=path, preview=None, hash=digest or _hash_or_none(path), mtime=mtime, size=size, item=item
        )

    def _with_sidecars(
        self,
        record: FileRecord[T],
        stamps: dict[str, _Stamp],
        sidecars: dict[str, tuple[_Stamp, UserMetadata | None, str | None]],
    ) -> FileRecord[T]:
        base = os.path.splitext(str(record.path))[0]
        preview = self._pictures.get(base)
        json_path = base + METADATA_SUFFIX  # user_metadata.metadata_path
        metadata: UserMetadata | None = None
        error: str | None = None
        if json_path in stamps:
            known = self._sidecars.get(json_path)
            if known is not None and known[0] == stamps[json_path]:
                metadata, error = known[1], known[2]
            else:
                try:
                    metadata = read_user_metadata(record.path)
                except UserMetadataError as exc:  # reported on the card; the file itself stays usable
                    error = str(exc)
                    log.warning("%s", error)
            sidecars[json_path] = (stamps[json_path], metadata, error)
        if (preview, metadata, error) == (record.preview, record.user_metadata, record.metadata_error):
            return record
        return replace(record, preview=preview, user_metadata=metadata, metadata_error=error)


def _preview_index(stamps: dict[str, _Stamp]) -> dict[str, Path]:
    """File stem (path without extension) -> its card picture: ``stem.png`` before ``stem.preview.png``, then in
    PREVIEW_SUFFIXES order, lower-case extension before upper-case. Built once per scan from the pictures alone."""
    best: dict[str, tuple[tuple[int, int, int], str]] = {}
    for key in stamps:
        base, extension = os.path.splitext(key)
        lower = extension.lower()
        if lower not in PREVIEW_SUFFIXES or extension not in (lower, lower.upper()):
            continue
        rank = (PREVIEW_SUFFIXES.index(lower), 0 if extension == lower else 1)
        stems = [(0, base)]
        if base.endswith(".preview"):
            stems.append((1, base[: -len(".preview")]))
        for stem_rank, stem in stems:
            candidate = ((stem_rank, *rank), key)
            if stem not in best or candidate[0] < best[stem][0]:
                best[stem] = candidate
    return {stem: Path(key) for stem, (_rank, key) in best.items()}


def _hash_or_none(path: Path, stamp: _Stamp | None = None, hashes: HashCache | None = None) -> str | None:
    # A listing reads headers: a file bigger than an embedding ever is (a hypernetwork of 80 MB) is hashed when it
    # is loaded for a prompt, not here (hashing 2,000 of them would read 160 GB).
    try:
        if path.stat().st_size > HASH_AT_LISTING_BYTES:
            return None
        if hashes is not None and stamp is not None:
            return hashes.sha256(str(path), stamp)
        return file_sha256(path)
    except (OSError, ValueError):  # vanished, unreadable, or no longer a regular file
        return None


def _one_line(exc: BaseException, path: Path) -> str:
    text = " ".join(str(exc).split())
    if not text or "weights_only" in text:  # never pass on torch's advice to load unsafely, nor a bare class name
        return "cannot be read (corrupt or unsupported file)"
    prefix = f"{path}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


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
            elif info is not None and sdxl is not None:
                skipped = kind_mismatch_reason(info.sdxl, info.width, sdxl=sdxl) or skipped
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
                self._failed[key] = _one_line(exc, record.path)
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
    library: EmbeddingLibrary, width: int, *, sdxl: bool, used_in: str | None = None
) -> tuple[dict[str, Embedding], dict[str, str]]:
    """``(usable, skipped)`` of a library for a model of context ``width`` (SDXL: ``sdxl``): name -> embedding,
    and name -> reason for files that cannot apply (wrong width, wrong kind, unreadable). A name that some file
    provides is not reported as skipped because another file lost it. With ``used_in`` (prompt and negative
    prompt), only the embeddings named there are read (``EmbeddingLibrary.usable``)."""
    usable: dict[str, Embedding] = {}
    # ``usable`` reads the files still pending (a lazy listing) first, so that their skip reasons are known.
    found = library.usable(width, used_in=used_in)
    skipped = dict(library.skipped(width))
    for name, emb in found.items():
        reason = kind_mismatch(emb, sdxl=sdxl)
        if reason is None:
            usable[name] = emb
        else:
            skipped[name] = reason
    taken = {name.lower() for name in usable}
    return usable, {name: reason for name, reason in skipped.items() if name.lower() not in taken}
