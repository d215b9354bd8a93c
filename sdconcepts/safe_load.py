"""Reading and writing torch pickles safely: nothing from a file is ever run, and what we write A1111 can load.

Reading uses ``torch.load(weights_only=True)``, which rebuilds only tensors and plain containers. Files made by
older tools carry a few other globals: torch's own parameter containers are rebuilt for real (they hold the
tensors), and known-harmless foreign objects (a Lightning checkpoint callback, numpy scalars in training metadata)
become an inert stand-in that keeps nothing. Anything else is refused with the global's name.

Writing uses torch's legacy (non-zip) format: A1111's safe unpickler rejects the zip records that current torch
adds (``.format_version``, ``.storage_alignment``; a1111-compat §1.9), but accepts legacy files.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import pickle
import pickletools
import re
import stat
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from sdconcepts.limits import MAX_JSON_DEPTH


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


def read_json(path: str | os.PathLike[str], *, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> object:
    """The JSON value in the regular file ``path``, or UnsafeFileError (one line naming the file) otherwise.

    The one loader for the small JSON files we read beside the user's files (user metadata, the hash cache): only a
    regular file (see ``open_regular``), refused from its size before anything is read when over ``max_bytes``, and
    refused when nested deeper than ``max_depth`` (Python's parser would raise RecursionError past ~1000 levels;
    anything we read is a few levels deep). A UTF-8 byte-order mark is accepted, as A1111's editors may write one.
    """
    p = Path(path)
    with open_regular(p) as handle:
        size = os.fstat(handle.fileno()).st_size
        limit = f"{max_bytes >> 20} MiB" if max_bytes % (1 << 20) == 0 else f"{max_bytes} bytes"
        if size > max_bytes:
            raise UnsafeFileError(f"{p}: more than {limit} ({size} bytes), too big for this file; not read")
        raw = handle.read(max_bytes + 1)
    if len(raw) > max_bytes:  # grew while read
        raise UnsafeFileError(f"{p}: more than {limit}, too big for this file; not read")
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except RecursionError:
        raise UnsafeFileError(f"{p}: nested more than {max_depth} levels deep") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise UnsafeFileError(f"{p}: not valid JSON ({' '.join(str(exc).split())[:200]})") from None
    if _json_depth_exceeds(data, max_depth):
        raise UnsafeFileError(f"{p}: nested more than {max_depth} levels deep")
    return data


def _json_depth_exceeds(data: object, limit: int) -> bool:
    """Whether ``data`` nests lists/dicts deeper than ``limit``, walked without recursion."""
    stack: list[tuple[object, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is None:
            continue
        if depth >= limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


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
    with _open_torch_file(p) as (handle, _head):
        return _load_open(p, handle)


@contextmanager
def _open_torch_file(p: Path) -> Iterator[tuple[BinaryIO, bytes]]:
    """Open a regular file whose first bytes can start a torch file; yield it and those bytes."""
    with open_regular(p) as handle:
        head = handle.read(_HEAD_BYTES)
        if not head:
            raise UnsafeFileError(f"{p}: empty file")
        foreign = describe_foreign(head)
        if foreign is not None:
            raise UnsafeFileError(f"{p}: {foreign}")
        yield handle, head


def _torch_load(handle: BinaryIO, **kwargs: Any) -> object:
    # torch's own loader, not whatever ``torch.load`` names now: A1111 (modules/safe.py) replaces ``torch.load``
    # process-wide with a checker that takes only file names and returns None for an open file (every .pt we read
    # in A1111 failed with "expected a dict of tensors, got NoneType"). weights_only=True is our own safe load.
    return torch.serialization.load(handle, **kwargs)


def _load_open(p: Path, handle: BinaryIO) -> object:
    handle.seek(0)
    try:
        with torch.serialization.safe_globals(_TRUSTED_CLASSES), warnings.catch_warnings():
            # torch warns about pickle protocols above 2 on stderr; the load's outcome is what we report.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return _torch_load(handle, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = exc
    handle.seek(0)
    if not zipfile.is_zipfile(handle):
        handle.seek(0)
        foreign = [g for g in _pickle_globals(handle) if not g.startswith(("torch.", "collections.OrderedDict"))]
        if foreign:
            raise UnsafeFileError(f"{p}: not a loadable torch file (refused to unpickle {', '.join(foreign)})") from None
        handle.seek(0)
        if not _starts_with_torch_magic(handle):
            raise UnsafeFileError(f"{p}: a plain Python pickle, not a torch file (torch.load cannot read it)") from None
        raise UnsafeFileError(f"{p}: not a loadable torch file ({_reason(first)})") from None
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
            return _torch_load(handle, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UnsafeFileError(f"{p}: not a loadable torch file ({_reason(exc)})") from None


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as ``read_metadata`` sees it: its shape and element type, without its data."""

    shape: tuple[int, ...]
    dtype: str

    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_METADATA_PICKLE_LIMIT = 64 << 20  # a pickle without tensor data is small; a bigger one is not a model file


class _StorageType:
    def __init__(self, name: str) -> None:
        self.dtype = name.removesuffix("Storage") or "untyped"


def _rebuild_tensor(storage: object, _offset: object, size: object, *_rest: object, **_kw: object) -> TensorInfo:
    dtype = storage.dtype if isinstance(storage, _StorageType) else "unknown"
    if not isinstance(size, (tuple, list)) or not all(isinstance(n, int) and n >= 0 for n in size):
        raise pickle.UnpicklingError(f"bad tensor shape {size!r}")
    return TensorInfo(tuple(size), dtype)


def _rebuild_parameter(data: object, *_rest: object) -> object:
    return data


_METADATA_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): tuple,
}


class _MetadataUnpickler(pickle.Unpickler):
    """Rebuilds plain containers and scalars; tensors become TensorInfo and their storages are never read.

    Only the globals above (and torch's ``*Storage`` type names, which become inert markers) are resolved: nothing
    from the file is ever called or imported.
    """

    def find_class(self, module: str, name: str) -> Any:
        found = _METADATA_GLOBALS.get((module, name))
        if found is not None:
            return found
        if module in ("torch", "torch.storage") and name.endswith("Storage") and name.isidentifier():
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refused to unpickle {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) >= 2 and pid[0] == "storage":
            kind = pid[1]
            return kind if isinstance(kind, _StorageType) else _StorageType("untyped")
        raise pickle.UnpicklingError("unsupported persistent id")


def read_metadata(path: str | os.PathLike[str]) -> object:
    """The object in a torch file with every tensor replaced by its TensorInfo, reading only the pickle.

    Listing a 4 GB hypernetwork then costs its pickle (a few KiB), not its weights: the zip format's ``data.pkl``
    member is read alone, and the legacy format's storages, which follow its pickle, are never reached. The same
    checks as ``load_torch_file`` apply first (regular file, torch magic). Raises UnsafeFileError.
    """
    p = Path(path)
    with _open_torch_file(p) as (handle, head):
        handle.seek(0)
        try:
            if head.startswith(b"PK"):
                return _zip_metadata(handle)
            return _legacy_metadata(handle)
        except UnsafeFileError as exc:
            raise UnsafeFileError(f"{p}: {exc}") from None
        except (pickle.UnpicklingError, zipfile.BadZipFile) as exc:
            text = str(exc)
            reason = text if text.startswith("refused") else f"corrupt or truncated data: {' '.join(text.split())[:200]}"
            raise UnsafeFileError(f"{p}: not a loadable torch file ({reason})") from None
        except Exception as exc:  # truncated pickles raise EOFError, IndexError, ...: Python internals, not reasons
            raise UnsafeFileError(f"{p}: not a loadable torch file ({_reason(exc)})") from None


def _starts_with_torch_magic(handle: BinaryIO) -> bool:
    try:
        return bool(_MetadataUnpickler(handle).load() == _LEGACY_MAGIC)
    except Exception:  # not even a first pickle: some other damage, reported with torch's reason
        return True


def _zip_metadata(handle: BinaryIO) -> object:
    with zipfile.ZipFile(handle) as archive:
        pickles = [info for info in archive.infolist() if info.filename.endswith("data.pkl")]
        if len(pickles) != 1:
            raise UnsafeFileError("not a torch zip file (no single data.pkl)")
        if pickles[0].file_size > _METADATA_PICKLE_LIMIT:
            raise UnsafeFileError("not a loadable torch file (its pickle is implausibly large)")
        data = archive.read(pickles[0])
    return _MetadataUnpickler(io.BytesIO(data)).load()


def _legacy_metadata(handle: BinaryIO) -> object:
    magic = _MetadataUnpickler(handle).load()
    if magic != _LEGACY_MAGIC:
        raise UnsafeFileError("not a torch file (a plain pickle, which torch does not load either)")
    _MetadataUnpickler(handle).load()  # protocol version
    _MetadataUnpickler(handle).load()  # system info
    return _MetadataUnpickler(handle).load()


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
    # torch appends paragraphs of guesses ("This is an internal miniz error. If you are seeing..."): keep the cause.
    line = line.split(". ")[0].rstrip(".")
    if len(line) > 200:
        line = line[:197] + "..."
    return f"corrupt or truncated data: {line}"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of the whole file in 1 MiB blocks (A1111's ``hashes.sha256``); only regular files are read."""
    digest = hashlib.sha256()
    with open_regular(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_torch_file(obj: object, path: str | os.PathLike[str]) -> None:
    """Write ``obj`` in place (not atomically) in torch's legacy format, which A1111's safe unpickler accepts."""
    torch.save(obj, path, _use_new_zipfile_serialization=False)
