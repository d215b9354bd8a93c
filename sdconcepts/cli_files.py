"""Command line for files: ``inspect PATH [--json]`` (embedding or hypernetwork file, or a folder) and ``convert SRC DST``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from sdconcepts.cli import CommandError
from sdconcepts.embedding_files import EMBEDDING_SUFFIXES, EmbeddingFileError, describe_embedding, load_embedding

log = logging.getLogger("sdconcepts")


def add_file_parsers(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="describe an embedding or hypernetwork file, or every embedding in a folder",
        description="Describe an embedding (.pt, .bin, .safetensors, .png, .webp) or hypernetwork (.pt) file: name, "
        "layout, vectors, width, step, hashes. Given a folder, list its embeddings, with the files that are skipped "
        "and why.",
    )
    p.add_argument("path", type=Path, metavar="PATH", help="a file or a folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--width", type=int, default=None,
                   help="for a folder: skip embeddings that do not fit a model of this width (768 SD1, 1024 SD2, "
                   "2048 SDXL)")
    p.set_defaults(func=run_inspect)

    p = subparsers.add_parser(
        "convert",
        help="convert an embedding between formats (.safetensors, .pt, .bin, .png, .webp)",
        description="Convert an embedding; the format follows DST's extension. The stored name becomes DST's file "
        "name (the prompt word A1111 uses) unless --name is given.",
    )
    p.add_argument("src", type=Path, metavar="SRC", help="an embedding file")
    p.add_argument("dst", type=Path, metavar="DST", help=f"the file to write ({', '.join(EMBEDDING_SUFFIXES)})")
    p.add_argument("--name", default=None, help="the name to store (default: DST's file name without extension)")
    p.set_defaults(func=run_convert)


def run_inspect(args: argparse.Namespace) -> int:
    path: Path = args.path
    if path.is_dir():
        return _inspect_folder(path, args.width, as_json=args.json)
    if not path.exists():
        raise CommandError(f"{path}: no such file or folder")
    info = describe_file(path)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            if value is not None:
                print(f"{key}: {_text(value)}")
    return 0


def describe_file(path: Path) -> dict[str, Any]:
    """An embedding's description, else a hypernetwork's (when that module is installed), else a CommandError."""
    try:
        return describe_embedding(path)
    except EmbeddingFileError as exc:
        embedding_error = _reason(str(exc), path)
    # A1111 reads hypernetworks only from .pt files.
    if path.suffix.lower() != ".pt" or importlib.util.find_spec("sdconcepts.hypernetwork_files") is None:
        raise CommandError(f"{path}: not an embedding ({embedding_error})")
    module = importlib.import_module("sdconcepts.hypernetwork_files")
    try:
        info: dict[str, Any] = module.describe_hypernetwork(path)
    except (ValueError, OSError) as exc:
        raise CommandError(
            f"{path}: neither an embedding ({embedding_error}) nor a hypernetwork ({_reason(str(exc), path)})"
        ) from None
    return {"kind": "hypernetwork", **info} if "kind" not in info else info


def _inspect_folder(folder: Path, width: int | None, *, as_json: bool) -> int:
    from sdconcepts.library import EmbeddingLibrary

    library = EmbeddingLibrary([folder])
    library.refresh()
    records = library.records(width)
    if as_json:
        rows = [
            {
                "name": r.name, "path": str(r.path), "preview": str(r.preview) if r.preview else None,
                "vectors": r.vectors, "width": r.width, "sha256": r.hash, "short_hash": r.short_hash,
                "skipped": r.skipped,
            }
            for r in records
        ]
        print(json.dumps(rows, indent=2))
        return 0
    for r in records:
        shape = f"{r.vectors}v x {r.width}" if r.vectors is not None else "-"
        line = f"{r.name}\t{shape}\t{r.short_hash or '-'}\t{r.path}"
        print(f"{line}\tSKIPPED: {r.skipped}" if r.skipped else line)
    usable = sum(1 for r in records if r.skipped is None)
    print(f"{usable} usable, {len(records) - usable} skipped", file=sys.stderr)
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from sdconcepts.embedding_files import save_embedding

    dst: Path = args.dst
    try:
        embedding = load_embedding(args.src)
        name = args.name if args.name is not None else dst.stem
        written = save_embedding(replace(embedding, name=name, hash=None), dst)
    except EmbeddingFileError as exc:
        raise CommandError(str(exc)) from exc
    print(written)
    return 0


def embedding_arguments(folders: list[Path] | None, width: int) -> dict[str, Any]:
    """``txt2img`` keyword arguments for the embeddings under ``folders`` (default ``./embeddings`` if present).

    Embeddings that fit the model's ``width`` are passed with their hashes (for the infotext); the others are
    passed as skipped, so that a prompt naming one gets a warning, and are counted on stderr (listed with -v).
    """
    from sdconcepts.library import EmbeddingLibrary

    if folders is None:
        default = Path("embeddings")
        folders = [default] if default.is_dir() else []
    if not folders:
        return {}
    library = EmbeddingLibrary(folders)
    library.refresh()
    usable = {name: emb for name, emb in library.usable(width).items() if not emb.is_sdxl}
    # A name that some file provides is not reported as skipped because another file lost it.
    taken = {name.lower() for name in usable}
    skipped = {name: reason for name, reason in library.skipped(width).items() if name.lower() not in taken}
    if skipped:
        print(f"note: {len(skipped)} embedding file(s) skipped (-v lists them)", file=sys.stderr)
        for name, reason in skipped.items():
            log.info("skipped embedding %s: %s", name, reason)
    return {
        "embeddings": {name: emb.tensor() for name, emb in usable.items()},
        "embedding_hashes": {name: emb.hash for name, emb in usable.items() if emb.hash},
        "skipped_embeddings": skipped,
    }


def _reason(message: str, path: Path) -> str:
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def _text(value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)
