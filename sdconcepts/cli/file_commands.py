"""Command line for files: ``inspect PATH [--json]`` (embedding or hypernetwork file, or a folder) and ``convert SRC DST``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from sdconcepts.cli.arguments import CommandError, check_folder
from sdconcepts.embeddings.files import (
    EMBEDDING_SUFFIXES,
    EmbeddingFileError,
    describe_embedding,
    file_sha256,
    load_embedding,
    save_embedding,
)
from sdconcepts.embeddings.library import EmbeddingLibrary
from sdconcepts.hypernetworks.files import describe_hypernetwork, looks_like_hypernetwork, read_hypernetwork_info
from sdconcepts.safe_load import UnsafeFileError, open_regular, read_metadata

log = logging.getLogger("sdconcepts")


def add_file_parsers(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="describe an embedding or hypernetwork file, or every embedding and hypernetwork in a folder",
        description="Describe an embedding (.pt, .bin, .safetensors, .png, .webp) or hypernetwork (.pt) file: name, "
        "layout, vectors, width, step, hashes. Given a folder, list its embeddings and hypernetworks (each file by "
        "what it is), with the files that are skipped and why.",
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
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
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
                print(f"{key}: {printable(_text(value))}")
    return 0


def describe_file(path: Path) -> dict[str, Any]:
    """A description of the file by what it is: a hypernetwork ``.pt`` (integer width keys or A1111's hypernetwork
    metadata) is described as one, anything else as an embedding; a CommandError says why neither works."""
    try:
        open_regular(path).close()  # a FIFO, socket or device is refused here, before any reader opens it
    except UnsafeFileError as exc:
        raise CommandError(str(exc)) from None
    if path.suffix.lower() == ".pt" and _is_hypernetwork(path):
        try:
            info: dict[str, Any] = describe_hypernetwork(path)
        except (ValueError, OSError) as exc:
            raise CommandError(f"{path}: a hypernetwork that cannot be loaded ({_reason(str(exc), path)})") from None
        return {"kind": "hypernetwork", **info} if "kind" not in info else info
    try:
        return describe_embedding(path)
    except EmbeddingFileError as exc:
        embedding_error = _reason(str(exc), path)
    # A1111 reads hypernetworks only from .pt files.
    if path.suffix.lower() != ".pt":
        raise CommandError(f"{path}: not an embedding ({embedding_error})")
    try:
        info = describe_hypernetwork(path)
    except (ValueError, OSError) as exc:
        raise CommandError(
            f"{path}: neither an embedding ({embedding_error}) nor a hypernetwork ({_reason(str(exc), path)})"
        ) from None
    return {"kind": "hypernetwork", **info} if "kind" not in info else info


def _is_hypernetwork(path: Path) -> bool:
    """Whether the file's pickle (read without its tensor data) has a hypernetwork's keys."""
    try:
        data = read_metadata(path)
    except UnsafeFileError:
        return False
    return bool(looks_like_hypernetwork(data))


def _inspect_folder(folder: Path, width: int | None, *, as_json: bool) -> int:
    """Every file in the folder described by what it is: embeddings (checked against ``width``) and hypernetworks
    (read from their metadata, not loaded), with the files that are neither and why."""
    library = EmbeddingLibrary([folder])
    library.refresh()
    rows: list[dict[str, Any]] = []
    for r in library.records(width):
        row: dict[str, Any] = {
            "kind": "embedding", "name": r.name, "path": str(r.path), "preview": str(r.preview) if r.preview else None,
            "vectors": r.vectors, "width": r.width, "sha256": r.hash, "short_hash": r.short_hash, "skipped": r.skipped,
        }
        if r.skipped is not None and r.skipped.startswith("not a regular file"):
            row["kind"] = None  # a FIFO, socket or device: neither kind, never opened
        elif r.vectors is None and r.path.suffix.lower() == ".pt":
            row = _hypernetwork_row(r.path, row)
        rows.append(row)
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        if row["kind"] == "hypernetwork":
            shape = f"hypernetwork {', '.join(str(w) for w in row['widths'] or ())}".rstrip()
        else:
            shape = f"{row['vectors']}v x {row['width']}" if row["vectors"] is not None else "-"
        line = "\t".join(printable(str(v)) for v in (row["name"], shape, row["short_hash"] or "-", row["path"]))
        print(f"{line}\tSKIPPED: {printable(row['skipped'])}" if row["skipped"] else line)
    embeddings = sum(1 for row in rows if row["kind"] == "embedding" and row["skipped"] is None)
    hypernetworks = sum(1 for row in rows if row["kind"] == "hypernetwork" and row["skipped"] is None)
    skipped = sum(1 for row in rows if row["skipped"] is not None)
    counts = [f"{embeddings} usable embedding{'s' if embeddings != 1 else ''}"]
    if hypernetworks:
        counts.append(f"{hypernetworks} hypernetwork{'s' if hypernetworks != 1 else ''}")
    print(f"{', '.join(counts)}, {skipped} skipped", file=sys.stderr)
    return 0


def _hypernetwork_row(path: Path, row: dict[str, Any]) -> dict[str, Any]:
    """The row of a ``.pt`` that did not load as an embedding: a hypernetwork's when it is one, else unchanged
    (a file whose pickle cannot be read stays an embedding row with the embedding reader's reason)."""
    if not _is_hypernetwork(path):
        return row

    hyper: dict[str, Any] = {
        "kind": "hypernetwork", "name": path.stem, "path": row["path"], "preview": row["preview"],
        "vectors": None, "width": None, "widths": None, "layer_structure": None, "activation": None, "step": None,
        "parameters": None, "sha256": None, "short_hash": None, "skipped": None,
    }
    try:
        info = read_hypernetwork_info(path)
    except (ValueError, OSError) as exc:
        hyper["skipped"] = _reason(str(exc), path)
        return hyper
    digest = file_sha256(path)
    hyper.update(
        widths=list(info.widths), layer_structure=list(info.layer_structure), activation=info.activation,
        step=info.step, parameters=info.parameters, sha256=digest, short_hash=digest[:10],
    )
    return hyper


def run_convert(args: argparse.Namespace) -> int:
    src: Path = args.src
    dst: Path = args.dst
    # As the other writing commands: nothing is replaced silently, and never the file being read.
    if os.path.lexists(dst):
        if src.exists() and (os.path.samefile(src, dst) if dst.exists() else False):
            raise CommandError(f"{dst}: SRC and DST are the same file; write the converted file under another name")
        if not args.overwrite:
            raise CommandError(f"{dst} already exists (use --overwrite to replace it)")
        if dst.is_dir():
            raise CommandError(f"{dst}: a folder, not a file")
    check_folder(dst.parent, "DST's folder")
    try:
        embedding = load_embedding(args.src)
        name = args.name if args.name is not None else dst.stem
        written = save_embedding(replace(embedding, name=name, hash=None), dst)
    except EmbeddingFileError as exc:
        raise CommandError(str(exc)) from exc
    print(written)
    return 0


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on (escape sequences, newlines, tabs, ...) written as
    Python's escape: a file named ``"\x1b]0;pwned\x07"`` or ``"x\nSKIPPED: ..."`` cannot set the terminal's title,
    clear the screen or forge a row of the listing."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _reason(message: str, path: Path) -> str:
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def _text(value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)
