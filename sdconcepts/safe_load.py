"""Reading and writing torch pickles safely: nothing from a file is ever run, and what we write A1111 can load.

Reading uses ``torch.load(weights_only=True)``, which rebuilds only tensors and plain containers. Files made by
older tools carry a few other globals: torch's own parameter containers are rebuilt for real (they hold the
tensors), and known-harmless foreign objects (a Lightning checkpoint callback, numpy scalars in training metadata)
become an inert stand-in that keeps nothing. Anything else is refused with the global's name.

Writing uses torch's legacy (non-zip) format: A1111's safe unpickler rejects the zip records that current torch
adds (``.format_version``, ``.storage_alignment``; a1111-compat §1.9), but accepts legacy files.
"""

from __future__ import annotations

import os
import pickletools
import re
import stat
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch


class UnsafeFileError(ValueError):
    """A pickle that cannot be loaded safely (refused globals, corrupt or truncated); the message names the file."""


# torch classes whose reconstruction only rebuilds tensors; old A1111 embeddings store a ParameterDict.
_TRUSTED_CLASSES: list[Any] = [torch.nn.ParameterDict, torch.nn.ParameterList, torch.nn.Parameter]

# Foreign globals that appear in real checkpoints and training files but carry nothing we read.
_INERT_GLOBALS = frozenset(
    {
        "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
        "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.dtype",
        "numpy.ndarray",
    }
)
_INERT_PATTERN = re.compile(r"numpy\.dtypes\.\w+DType")


class _Inert:
    """Stand-in for an allow-listed harmless global: accepts any construction and state, keeps nothing."""

    def __new__(cls, *args: object, **kwargs: object) -> _Inert:
        return object.__new__(cls)

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass

    def __call__(self, *args: object, **kwargs: object) -> _Inert:
        return self


def is_inert_global(name: str) -> bool:
    return name in _INERT_GLOBALS or bool(_INERT_PATTERN.fullmatch(name))


def file_kind(mode: int) -> str:
    """What a non-regular directory entry is, in the words ``ls -l`` users know."""
    for test, name in (
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISLNK, "symbolic link"),
    ):
        if test(mode):
            return name
    return "special file"


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """Open ``path`` for reading only when it is a regular file; raise UnsafeFileError (one line) otherwise.

    A plain ``open()`` of a FIFO blocks until a writer appears (a scan, ``inspect`` or the web UI's start would hang),
    and a device can be read forever. The file is stat-ed first (a socket cannot even be opened), then opened with
    O_NONBLOCK and the opened descriptor stat-ed again, so a FIFO swapped in between the two is still refused.
    """
    p = Path(path)
    try:
        info = os.stat(p)
    except FileNotFoundError:
        raise UnsafeFileError(f"{p}: not a file (no such file, or a dangling symbolic link)") from None
    except OSError as exc:
        raise UnsafeFileError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFileError(f"{p}: not a regular file: {file_kind(info.st_mode)}")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(p, flags)
    except OSError as exc:
        raise UnsafeFileError(f"{p}: cannot read ({exc.strerror or exc})") from None
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            raise UnsafeFileError(f"{p}: not a regular file: {file_kind(opened.st_mode)}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)  # regular files ignore the flag; clear it so nothing downstream sees EAGAIN
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def describe_foreign(head: bytes) -> str | None:
    """Why the first bytes of a file cannot start a torch pickle (zip or legacy), or None when they can.

    Checked before torch reads anything, so that a text file, a picture or a huge empty (sparse) file is rejected
    from its first few KiB with a reason a user understands, instead of a pickle error from deep inside torch.
    """
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return None  # torch's zip format (an empty archive still gets torch's own reason)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return None  # a pickle with a protocol header: torch's legacy format or a raw pickle
    if head[:1] == b"L":
        return None  # torch's legacy format written with pickle protocol 0 or 1 (the magic number as a long)
    if not head.strip(b"\x00"):
        return "not a torch file: it starts with empty (all-zero) bytes"
    for magic, kind in (
        (b"\x89PNG", "a PNG image"),
        (b"\xff\xd8\xff", "a JPEG image"),
        (b"GIF8", "a GIF image"),
        (b"\x1f\x8b", "a gzip archive"),
        (b"\x7fELF", "a program (ELF)"),
    ):
        if head.startswith(magic):
            return f"{kind}, not a torch file"
    if len(head) > 8 and head[8:10] == b'{"':
        return "a safetensors file, not a torch pickle (rename it to .safetensors)"
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
            return "a text file, not a torch file"
        except UnicodeDecodeError as exc:
            if exc.start >= len(head) - 4:  # a multi-byte character cut by the sample's end
                return "a text file, not a torch file"
    return "not a torch file (unknown format)"


_HEAD_BYTES = 4096


def load_torch_file(path: str | os.PathLike[str]) -> object:
    """Load a ``.pt``/``.ckpt``/``.bin`` pickle without running code from it; raise UnsafeFileError otherwise.

    Only regular files are read (see ``open_regular``), and only when their first bytes can start a torch file.
    """
    p = Path(path)
    with open_regular(p) as handle:
        head = handle.read(_HEAD_BYTES)
        if not head:
            raise UnsafeFileError(f"{p}: empty file")
        foreign = describe_foreign(head)
        if foreign is not None:
            raise UnsafeFileError(f"{p}: {foreign}")
        return _load_open(p, handle)


def _load_open(p: Path, handle: BinaryIO) -> object:
    handle.seek(0)
    try:
        with torch.serialization.safe_globals(_TRUSTED_CLASSES):
            return torch.load(handle, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = exc
    handle.seek(0)
    if not zipfile.is_zipfile(handle):
        handle.seek(0)
        foreign = [g for g in _pickle_globals(handle) if not g.startswith(("torch.", "collections.OrderedDict"))]
        reason = f"refused to unpickle {', '.join(foreign)}" if foreign else _reason(first)
        raise UnsafeFileError(f"{p}: not a loadable torch file ({reason})") from None
    try:
        handle.seek(0)
        needed = list(torch.serialization.get_unsafe_globals_in_checkpoint(handle))
    except Exception as exc:
        raise UnsafeFileError(f"{p}: not a loadable torch file ({_reason(exc)})") from None
    refused = sorted(g for g in needed if not is_inert_global(g))
    if refused:
        raise UnsafeFileError(f"{p}: refused to unpickle {', '.join(refused)} (only tensors and plain data are loaded)")
    if not needed:
        raise UnsafeFileError(f"{p}: not a loadable torch file ({_reason(first)})")
    try:
        handle.seek(0)
        with torch.serialization.safe_globals([*_TRUSTED_CLASSES, *((_Inert, name) for name in needed)]):
            return torch.load(handle, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UnsafeFileError(f"{p}: not a loadable torch file ({_reason(exc)})") from None


def _pickle_globals(handle: BinaryIO) -> list[str]:
    """Names of the globals a plain pickle would import, read with pickletools (which executes nothing)."""
    names: list[str] = []
    strings: list[str] = []
    try:
        # torch's legacy format is several pickles in a row (magic, protocol, sys info, the object, keys).
        for _ in range(5):
            for opcode, arg, _pos in pickletools.genops(handle):
                if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                    strings.append(str(arg))
                elif opcode.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # a truncated or non-pickle file: report what was found before the damage
        pass
    return list(dict.fromkeys(names))


def _reason(exc: BaseException) -> str:
    """One line in our words: torch's advice (re-run with weights_only=False) is never passed on, since nothing is
    ever loaded that way, and Python internals ("list index out of range") become "corrupt or truncated data"."""
    text = str(exc).strip()
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if match:
        return f"refused to unpickle {match.group(1)}"
    # torch wraps the real cause in a paragraph about weights_only; keep just the cause.
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    line = detail.group(1).strip() if detail else (text.splitlines()[0].strip() if text else "")
    if not line or "weights_only" in line or "weights only" in line.lower() or isinstance(exc, (IndexError, KeyError)):
        return "corrupt or truncated data"
    line = " ".join(line.split())
    if len(line) > 200:
        line = line[:197] + "..."
    return f"corrupt or truncated data: {line}"


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename, else it is removed.

    A crash or interrupt while writing never leaves a torn file under the final name.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_torch_file(obj: object, path: str | os.PathLike[str]) -> Path:
    """Atomically write ``obj`` (tensors, dicts, lists, tuples, str/int/float/None) in a format A1111 loads."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp, _use_new_zipfile_serialization=False)
    return Path(path)
