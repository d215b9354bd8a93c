"""Folders of embedding or hypernetwork files scanned into records, reloaded when anything under them changes.

``Library`` is generic over a loader function: it walks its folders recursively, loads each file once, keeps a
record per file (loaded, or skipped with a reason) and, on ``refresh()``, reloads only what was added, changed or
removed. A refresh that finds nothing changed costs one ``stat`` per file. ``refresh(lazy=True)`` only lists new
files (pending records) and ``read()`` loads the ones a caller needs (a card tab reads the page it shows), so a
library of 10,000 files lists in the time of its ``stat`` calls. Records carry the card picture beside each file
and A1111's user metadata (``name.json``). The embedding library (``embeddings.library``) and the hypernetwork
library (``hypernetworks.library``) are built on it.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Generic, TypeVar

from sdconcepts.embeddings.files import (
    HASH_AT_LISTING_BYTES,
    file_sha256,
)
from sdconcepts.hash_cache import HashCache
from sdconcepts.limits import MAX_SCAN_ENTRIES
from sdconcepts.safe_load import file_kind
from sdconcepts.user_metadata import UserMetadata, UserMetadataError, read_user_metadata

log = logging.getLogger(__name__)

__all__ = [
    "METADATA_SUFFIX",
    "PREVIEW_SUFFIXES",
    "FileRecord",
    "Library",
    "LibraryChanges",
    "error_line",
    "is_preview_image",
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
    _warned: set[str] = field(default_factory=set, repr=False)
    _warned_budget: bool = field(default=False, repr=False)

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
        budget = [MAX_SCAN_ENTRIES]
        for folder in self.folders:
            self._walk_folder(str(folder), stamps, seen, budget)
        if budget[0] < 0 and not self._warned_budget:
            self._warned_budget = True
            log.warning("stopped listing %s after %d entries: a library folder holds far more than files to list",
                        ", ".join(str(f) for f in self.folders), MAX_SCAN_ENTRIES)
        return stamps

    def _walk_folder(self, folder: str, stamps: dict[str, _Stamp], seen: set[tuple[int, int]],
                     budget: list[int]) -> None:
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
        budget[0] -= len(entries)
        if budget[0] < 0:
            return
        subfolders = []
        for entry in entries:
            try:
                if entry.is_dir():
                    if entry.is_symlink() and _contains(os.path.realpath(entry.path), os.path.realpath(folder)):
                        # A link to / or to a folder above this one: following it lists a superset of the library
                        # (a link to / made ``inspect`` walk for minutes). Symlinks elsewhere are followed, as A1111.
                        self._warn_once(f"not following {entry.path}: it links to a folder that contains it")
                        continue
                    subfolders.append(entry.path)
                elif entry.name.lower().endswith(self._watched):
                    st = entry.stat()
                    stamps[entry.path] = (st.st_mtime_ns, st.st_size, st.st_ino)
            except OSError:  # vanished while listing, or a dangling symlink
                continue
        for sub in subfolders:
            self._walk_folder(sub, stamps, seen, budget)

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s", message)

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
                item=None, error=error_line(exc, path),
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


def error_line(exc: BaseException, path: Path) -> str:
    """Why a file cannot be read, in one line without its path (and never torch's advice to load unsafely)."""
    text = " ".join(str(exc).split())
    if not text or "weights_only" in text:  # never pass on torch's advice to load unsafely, nor a bare class name
        return "cannot be read (corrupt or unsupported file)"
    prefix = f"{path}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def _contains(outer: str, inner: str) -> bool:
    """Whether the folder ``outer`` is ``inner`` or one of its ancestors (both real paths)."""
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)
