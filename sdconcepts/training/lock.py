"""One training run per file, across processes: an OS file lock that a killed process cannot leave held.

Two runs on the same embedding or hypernetwork would interleave their saves and both append to the loss log. The
lock is ``flock`` (POSIX) or ``msvcrt.locking`` (Windows) on a small hidden file next to the trained file; the
kernel drops it when the holder dies, however it dies, so there is nothing stale to clear by hand. The file holds
the holder's pid and start time, for the refusal message.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
from pathlib import Path
from types import TracebackType

__all__ = ["TrainingBusyError", "TrainingLock", "lock_path"]

log = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
try:
    import msvcrt
except ImportError:  # POSIX
    msvcrt = None  # type: ignore[assignment]

# The holder's details start after this offset: Windows refuses reads of a locked byte range (the first byte).
_INFO_OFFSET = 1


class TrainingBusyError(ValueError):
    """Another run holds the file; the message names it (pid, start time)."""


def lock_path(path: str | os.PathLike[str]) -> Path:
    """``.sdc-<hash of the file name>.lock`` beside the file: short (any name that fits fits this), hidden."""
    p = Path(path)
    key = hashlib.sha256(p.name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return p.parent / f".sdc-{key}.lock"


def _try_lock(fd: int) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        elif msvcrt is not None:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
    except OSError:
        return False
    return True


class TrainingLock:
    """``with TrainingLock(path, what):`` holds the lock of ``path`` or raises TrainingBusyError naming the holder."""

    def __init__(self, path: str | os.PathLike[str], what: str) -> None:
        self.target = Path(path)
        self.what = what
        self.path = lock_path(path)
        self.fd: int | None = None

    def acquire(self) -> TrainingLock:
        if fcntl is None and msvcrt is None:
            log.warning("no file locking on this platform; two runs on %s would not be refused", self.target)
            return self
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
            if not _try_lock(fd):
                holder = self._holder(fd)
                os.close(fd)
                raise TrainingBusyError(
                    f"{self.target} is already being trained by another run ({holder}); wait for it to finish or "
                    "stop it first"
                )
            # The holder removes the lock file when it ends; a file we opened just before that removal is an
            # orphan that nobody else will lock, so only a lock on the file still at the path counts.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                self._write_holder(fd)
                return self
            os.close(fd)
        raise TrainingBusyError(f"{self.target}: could not take the training lock {self.path}")

    def _write_holder(self, fd: int) -> None:
        started = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
        text = f"pid {os.getpid()}, started {started}, training {self.what}".encode()
        os.lseek(fd, _INFO_OFFSET, os.SEEK_SET)
        os.write(fd, text)
        os.ftruncate(fd, _INFO_OFFSET + len(text))

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            os.lseek(fd, _INFO_OFFSET, os.SEEK_SET)
            text = os.read(fd, 4096).decode("utf-8", "replace").strip("\0 \n")
        except OSError:
            text = ""
        return text or "pid unknown"

    def release(self) -> None:
        if self.fd is None:
            return
        # Remove while still holding it (see acquire), then let the close drop the lock.
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> TrainingLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
