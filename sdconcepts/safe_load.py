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
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


def load_torch_file(path: str | os.PathLike[str]) -> object:
    """Load a ``.pt``/``.ckpt``/``.bin`` pickle without running code from it; raise UnsafeFileError otherwise."""
    p = Path(path)
    if not p.is_file():
        raise UnsafeFileError(f"{p}: not a file")
    if p.stat().st_size == 0:
        raise UnsafeFileError(f"{p}: empty file")
    try:
        with torch.serialization.safe_globals(_TRUSTED_CLASSES):
            return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = exc
    if not zipfile.is_zipfile(p):
        foreign = [g for g in _pickle_globals(p) if not g.startswith(("torch.", "collections.OrderedDict"))]
        reason = f"refused to unpickle {', '.join(foreign)}" if foreign else _reason(first)
        raise UnsafeFileError(f"{p}: not a loadable torch file ({reason})") from None
    try:
        needed = list(torch.serialization.get_unsafe_globals_in_checkpoint(p))
    except Exception as exc:
        raise UnsafeFileError(f"{p}: not a loadable torch file ({_reason(exc)})") from None
    refused = sorted(g for g in needed if not is_inert_global(g))
    if refused:
        raise UnsafeFileError(f"{p}: refused to unpickle {', '.join(refused)} (only tensors and plain data are loaded)")
    if not needed:
        raise UnsafeFileError(f"{p}: not a loadable torch file ({_reason(first)})")
    try:
        with torch.serialization.safe_globals([*_TRUSTED_CLASSES, *((_Inert, name) for name in needed)]):
            return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UnsafeFileError(f"{p}: not a loadable torch file ({_reason(exc)})") from None


def _pickle_globals(path: Path) -> list[str]:
    """Names of the globals a plain pickle would import, read with pickletools (which executes nothing)."""
    names: list[str] = []
    strings: list[str] = []
    try:
        with open(path, "rb") as handle:
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
    text = str(exc).strip()
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if match:
        return f"refused to unpickle {match.group(1)}"
    # torch wraps the real cause in a paragraph about weights_only; keep just the cause.
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if detail:
        return detail.group(1).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
