"""SHA-256 of files remembered across runs, as A1111 keeps them in its ``cache.json``.

A card shows and searches a file's hash; without this every server start read every file of the library again to
hash it. An entry is keyed by the file's path and stamp (modification time in nanoseconds, size, inode): a file
edited, replaced or renamed over gets a new stamp and is hashed again. The cache is one JSON file, written
atomically with the mode the user's umask gives; a file that cannot be read or parsed is ignored (with a log line)
and rewritten on the next save, so a damaged cache costs a rehash, never a failure.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from pathlib import Path

from sdconcepts.atomic_files import atomic_path
from sdconcepts.safe_load import file_sha256, read_json

log = logging.getLogger(__name__)

__all__ = ["CACHE_DIR_ENV", "HashCache", "default_cache_dir"]

CACHE_DIR_ENV = "SDCONCEPTS_CACHE_DIR"
FILE_NAME = "hashes.json"
_VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Background reads hash a large library in batches: writing the whole cache after each batch would cost more than
# it saves, so unforced saves wait this long after the previous one (the last batch forces one).
SAVE_INTERVAL_S = 5.0
# An entry is about 150 bytes: 64 MiB hold some 400,000 files. A bigger file is not ours and is not read at all.
MAX_BYTES = 64 << 20

Stamp = tuple[int, int, int]  # (mtime_ns, size, inode), as folder_scan.Library stamps files


def default_cache_dir() -> Path:
    """``$SDCONCEPTS_CACHE_DIR``, else ``$XDG_CACHE_HOME/sdconcepts``, else ``~/.cache/sdconcepts``."""
    explicit = os.environ.get(CACHE_DIR_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sdconcepts"


class HashCache:
    """Path and stamp -> SHA-256, read from ``path`` on first use and written back by ``save``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._entries: dict[str, tuple[int, int, int, str]] | None = None
        self._dirty = False
        self._last_save = 0.0
        self._lock = threading.Lock()

    @classmethod
    def default(cls) -> HashCache:
        return cls(default_cache_dir() / FILE_NAME)

    def _load(self) -> dict[str, tuple[int, int, int, str]]:
        if self._entries is not None:
            return self._entries
        entries: dict[str, tuple[int, int, int, str]] = {}
        try:
            if not os.path.lexists(self.path):
                raise FileNotFoundError(self.path)
            # read_json: a regular file only (a FIFO here would block every scan), size and depth bounded.
            data = read_json(self.path, max_bytes=MAX_BYTES)
            if not isinstance(data, dict) or data.get("version") != _VERSION or not isinstance(data.get("files"), dict):
                raise ValueError(f"not a version {_VERSION} hash cache")
            for key, value in data["files"].items():
                if (isinstance(value, list) and len(value) == 4 and all(type(v) is int for v in value[:3])
                        and isinstance(value[3], str) and _SHA256.fullmatch(value[3])):
                    entries[key] = (value[0], value[1], value[2], value[3])
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            log.warning("hash cache %s ignored (%s); files are hashed again", self.path, " ".join(str(exc).split()))
            entries = {}
        self._entries = entries
        return entries

    def get(self, key: str, stamp: Stamp) -> str | None:
        """The hash recorded for ``key`` with this very stamp, else None."""
        with self._lock:
            entry = self._load().get(key)
        if entry is not None and entry[:3] == tuple(stamp):
            return entry[3]
        return None

    def put(self, key: str, stamp: Stamp, digest: str) -> None:
        with self._lock:
            entries = self._load()
            entry = (int(stamp[0]), int(stamp[1]), int(stamp[2]), digest)
            if entries.get(key) != entry:
                entries[key] = entry
                self._dirty = True

    def sha256(self, key: str, stamp: Stamp) -> str:
        """The file's hash: recorded, or read and recorded when the file still has ``stamp`` afterwards (a file
        written meanwhile is hashed again next time, never remembered under the stamp it had before)."""
        known = self.get(key, stamp)
        if known is not None:
            return known
        digest = file_sha256(key)
        try:
            st = os.stat(key)
        except OSError:
            return digest
        if (st.st_mtime_ns, st.st_size, st.st_ino) == tuple(stamp):
            self.put(key, stamp, digest)
        return digest

    def save(self, *, force: bool = False) -> None:
        """Write the cache if anything was added (unforced: at most every ``SAVE_INTERVAL_S``). A cache that
        cannot be written is reported and the run goes on."""
        with self._lock:
            if not self._dirty or (not force and time.monotonic() - self._last_save < SAVE_INTERVAL_S):
                return
            entries = dict(self._entries or {})
            self._dirty = False
            self._last_save = time.monotonic()
        # Files deleted since they were hashed are dropped whenever the cache is written, so that it does not grow
        # with every file a library ever held (one stat per entry; a folder that is only unmounted costs a rehash).
        gone = {key: entries.pop(key) for key in list(entries) if not _exists(key)}
        if gone:
            with self._lock:
                for key, entry in gone.items():
                    if self._entries is not None and self._entries.get(key) == entry:  # not re-put meanwhile
                        del self._entries[key]
        payload = {"version": _VERSION, "files": {k: list(v) for k, v in entries.items()}}
        try:
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps(payload, separators=(",", ":")), encoding="utf-8")
        except OSError as exc:
            log.warning("cannot write the hash cache %s (%s)", self.path, exc.strerror or exc)
            with self._lock:
                self._dirty = True


def _exists(key: str) -> bool:
    try:
        os.stat(key)
    except FileNotFoundError:
        return False
    except OSError:  # unreadable, not known to be gone: keep the entry
        return True
    return True
