"""Writing files so that a crash or a kill never leaves a torn one: atomic replacement through a temporary beside
the final name, the cleanup of temporaries that killed writers left, and a file committed with its ``.optim``
sidecar so that the two stay consistent at every instant.

Temporaries get the mode a plain ``open()`` would give (the umask's), never ``mkstemp``'s 0600.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sdconcepts.safe_load import UnsafeFileError, file_sha256, load_torch_file, write_torch_file

__all__ = [
    "SIDECAR_SHA_KEY",
    "TEMP_PREFIX",
    "TEMP_SUFFIX",
    "atomic_path",
    "commit_with_sidecar",
    "describe_os_error",
    "pending_sidecar_path",
    "remove_stale_temporaries",
    "save_torch_file",
    "settle_sidecar",
    "sidecar_candidates",
    "sidecar_path",
]


# Temporary files are ``.sdc-<pid>-<random>.tmp``: short, so that any final name that fits the folder's name limit
# can be written (a temporary named after the final file is longer than it), and carrying the writer's pid, so that
# a later run can tell the leftovers of a killed writer from a live writer's files and remove only those.
TEMP_PREFIX = ".sdc-"
TEMP_SUFFIX = ".tmp"
_TEMP_PATTERN = re.compile(r"\.sdc-(\d+)-[0-9a-z]+\.tmp")


_OS_ERROR_HINTS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.ENOTDIR: "a file is where a folder is expected",
    errno.EISDIR: "a folder is where a file is expected",
    errno.EROFS: "the file system is read-only",
}


def describe_os_error(exc: OSError) -> str:
    """One line for a file operation that failed (a full disk, a file where a folder is expected, ...), naming the
    file; files written before were written atomically (this module), so the line can say they are kept."""
    reason = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    hint = _OS_ERROR_HINTS.get(exc.errno or 0)
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{reason}{f' ({hint})' if hint else ''}; files saved before are kept"


def _new_temp(folder: Path) -> Path:
    """Create an empty temporary file in ``folder`` the way ``open()`` creates files: mode 0o666 less the umask.

    ``tempfile.mkstemp`` makes 0600 files, and a rename keeps the mode, so saved files were unreadable to other
    users and tools; ``os.open`` with 0o666 lets the kernel apply the umask (and a default ACL) as for any file.
    """
    for _ in range(100):
        tmp = folder / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"{folder}: could not create a temporary file")


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename, else it is removed.

    A crash or interrupt while writing never leaves a torn file under the final name; the file gets the mode a
    plain ``open()`` would give it.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(final.parent)
    mode = stat.S_IMODE(tmp.stat().st_mode)
    try:
        yield tmp
        # Some writers replace the file instead of writing into it (safetensors' save_file makes its own 0600
        # file and renames it over ours): give it back the mode the kernel chose for ours.
        if stat.S_IMODE(tmp.stat().st_mode) != mode:
            os.chmod(tmp, mode)
        os.replace(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno and (exc.filename is None or os.fspath(exc.filename) == str(tmp)):
            # The user knows the file by its final name, not by our temporary's; a failed write names no file at all.
            raise OSError(exc.errno, exc.strerror, str(final)) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _pid_alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return True  # 0 and negatives name process groups to os.kill, not a writer
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, ValueError, OverflowError):
        return True  # another user's live process, or a platform where signal 0 means something else
    return True


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that writers which no longer run left in ``folder`` (killed mid-save).

    Only our own ``.sdc-<pid>-*.tmp`` names are touched, and only when that pid is gone, so a concurrent writer's
    temporary is never pulled from under it. Not on Windows, where pids cannot be probed this way.
    """
    removed: list[Path] = []
    root = Path(folder)
    if os.name != "posix" or not root.is_dir():
        return removed
    for entry in root.iterdir():
        match = _TEMP_PATTERN.fullmatch(entry.name)
        if match and not _pid_alive(int(match.group(1))):
            try:
                entry.unlink()
                removed.append(entry)
            except OSError:
                continue
    return removed


# ---------------------------------------------------------------------------------------------------------------
# A file and its ``.optim`` sidecar, consistent after a kill at any instant
# ---------------------------------------------------------------------------------------------------------------
#
# The sidecar is A1111's: ``<file>.optim`` holding ``hash`` (A1111's link to the file) and the optimizer state. Two
# renames cannot be one atomic step, so the new sidecar is first committed under a pending name (short, derived
# from the file's name), then the file is replaced, then the pending sidecar is renamed over ``<file>.optim``.
# After a kill between the last two renames the file is new and ``<file>.optim`` old, and the pending sidecar is
# the one that belongs to the file. Each sidecar we write also records the SHA-256 of the exact file it belongs to
# (``sha256``, a key A1111 ignores), so the right one is chosen without relying on a 4-hex checksum. A1111 reads
# only ``<file>.optim``; it sees an unmatched hash in that window and starts a fresh optimizer, as it does for any
# mismatch, and our next start completes the pending rename.

SIDECAR_SHA_KEY = "sha256"


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    return Path(os.fspath(path) + ".optim")


def pending_sidecar_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p.parent / f"{TEMP_PREFIX}{hashlib.sha256(p.name.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}.optim"


def commit_with_sidecar(
    path: str | os.PathLike[str],
    write: Callable[[Path], None],
    sidecar: Callable[[Path], dict[str, Any]] | None,
) -> Path:
    """Write ``path`` with ``write(tmp)`` and, if given, the sidecar dict ``sidecar(tmp)`` (it may hash the new file).

    At every instant the file on disk has its matching sidecar either at ``<file>.optim`` or at the pending name
    (or has none, if it never had one); see above.
    """
    final = Path(path)
    with atomic_path(final) as tmp:
        write(tmp)
        if sidecar is not None:
            data = {**sidecar(tmp), SIDECAR_SHA_KEY: file_sha256(tmp)}
            save_torch_file(data, pending_sidecar_path(final))
    if sidecar is not None:
        os.replace(pending_sidecar_path(final), sidecar_path(final))
    return final


def sidecar_candidates(path: str | os.PathLike[str]) -> list[tuple[Path, dict[str, Any]]]:
    """The loadable sidecars that may belong to ``path``: ``<file>.optim`` and a pending one, in that order.

    A sidecar that records ``sha256`` is kept only when it matches the file; one without it (written by A1111) is
    returned for the caller's own hash rule.
    """
    found: list[tuple[Path, dict[str, Any]]] = []
    digest: str | None = None
    error: UnsafeFileError | None = None
    for candidate in (sidecar_path(path), pending_sidecar_path(path)):
        if not candidate.is_file():
            continue
        try:
            data = load_torch_file(candidate)
        except UnsafeFileError as exc:
            error = error or exc
            continue
        if not isinstance(data, dict):
            error = error or UnsafeFileError(f"{candidate}: not an optimizer sidecar (expected a dict)")
            continue
        if SIDECAR_SHA_KEY in data:
            digest = digest or file_sha256(path)
            if data[SIDECAR_SHA_KEY] != digest:
                continue
        found.append((candidate, data))
    # A damaged sidecar is reported only when no other one can stand in for it.
    if not found and error is not None:
        raise error
    return found


def settle_sidecar(path: str | os.PathLike[str]) -> None:
    """Finish a save that a kill interrupted: move a pending sidecar that belongs to ``path`` into place, drop one
    that does not (its file was never committed). Call with the file's training lock held."""
    pending = pending_sidecar_path(path)
    if not pending.is_file():
        return
    try:
        data = load_torch_file(pending)
        belongs = isinstance(data, dict) and Path(path).is_file() and data.get(SIDECAR_SHA_KEY) == file_sha256(path)
    except (UnsafeFileError, OSError):
        belongs = False
    if belongs:
        os.replace(pending, sidecar_path(path))
    else:
        pending.unlink(missing_ok=True)


def save_torch_file(obj: object, path: str | os.PathLike[str]) -> Path:
    """Atomically write ``obj`` (tensors, dicts, lists, tuples, str/int/float/None) in a format A1111 loads."""
    with atomic_path(path) as tmp:
        write_torch_file(obj, tmp)
    return Path(path)
