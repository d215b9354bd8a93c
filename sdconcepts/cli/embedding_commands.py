"""Command line for the embedding tools: ``embedding inspect|mix|edit`` (logic in ``sdconcepts.embeddings.tools``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sdconcepts.cli.arguments import CommandError, existing_dir, existing_path, int_at_least
from sdconcepts.embeddings.files import EMBEDDING_SUFFIXES, EmbeddingFileError, load_embedding
from sdconcepts.embeddings.library import EmbeddingLibrary
from sdconcepts.embeddings.tools import (
    EmbeddingToolError,
    describe_vectors,
    format_report,
    mix_vectors,
    parse_mix,
    select_vectors,
    vocabulary_of,
    write_embedding,
)
from sdconcepts.toyworld.examples import EXAMPLE_EMBEDDINGS_DIR

FORMATS = tuple(s.lstrip(".") for s in EMBEDDING_SUFFIXES)


def add_embedding_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = subparsers.add_parser(
        "embedding",
        help="embedding tools: nearest tokens and norms (inspect), mix embeddings and words (mix), keep/drop/reorder "
        "vectors (edit)",
        description="Tools for textual inversion embeddings. Embeddings are named as in prompts (found under "
        "--embeddings-dir, default ./embeddings) or given as file paths.",
    )
    commands = group.add_subparsers(dest="embedding_command", metavar="TOOL", required=True)

    def common(p: argparse.ArgumentParser, *, writes: bool) -> None:
        p.add_argument("--embeddings-dir", type=existing_dir, action="append", default=None, metavar="D",
                       help="where embeddings are found by name, recursively; repeatable (default: ./embeddings)")
        p.add_argument("--ckpt", type=existing_path, default=None,
                       help="the model whose vocabulary words and nearest tokens come from (default: the embedded "
                       "toy-world model)")
        p.add_argument("--device", default="cpu", help="torch device for the model (default: cpu)")
        p.add_argument("--no-examples", dest="examples", action="store_false",
                       help="leave out the shipped example_triangle (found by name before the folders above, as in "
                       "the web UI; never written to)")
        if writes:
            p.add_argument("--out-dir", type=Path, default=None, metavar="D",
                           help="where the new file goes (default: the first --embeddings-dir, else ./embeddings)")
            p.add_argument("--format", choices=FORMATS, default="pt",
                           help="file format (default: pt, A1111's layout)")
            p.add_argument("--overwrite", action="store_true", help="replace an existing file of that name")

    p = commands.add_parser(
        "inspect", help="per vector: its norm and the nearest vocabulary tokens (cosine)",
        description="For each vector of an embedding: its L2 norm and the top-k tokens of the model's vocabulary by "
        "cosine similarity to it (over the text encoder's token embedding table). A token ending in … continues "
        "into the next one (a word piece).",
    )
    p.add_argument("embedding", metavar="EMBEDDING", help="an embedding name or file")
    p.add_argument("--top-k", type=int_at_least(1), default=5, help="tokens per vector (default: 5)")
    p.add_argument("--json", action="store_true", help="print JSON")
    common(p, writes=False)
    p.set_defaults(func=run_inspect)

    p = commands.add_parser(
        "mix", help='make an embedding from a mix, e.g. 0.5*toytri[0:2] + 0.5*"red triangle"',
        description='Write a new embedding from an expression. Terms: embedding names, or "quoted words" (their '
        "token embeddings, one vector per token), each optionally followed by a vector selection [0, 2, 1:3]. "
        "w*term weights a term; terms joined by + or ' - ' are summed position by position (weights as given; every "
        "term of a sum needs the same vector count); sums joined by | or , are concatenated. Example: "
        '0.5*toytri[0:2] + 0.5*"red triangle"  |  toytri | "red"  |  toytri[1] + "red".',
    )
    p.add_argument("name", metavar="NAME", help="the new embedding's name (its prompt word and file name)")
    p.add_argument("expression", metavar="EXPRESSION", help="the mix (quote it for the shell)")
    common(p, writes=True)
    p.set_defaults(func=run_mix)

    p = commands.add_parser(
        "edit", help="keep, drop or reorder vectors into a new embedding",
        description="Write NAME from SOURCE's vectors: --keep lists the positions to keep, in the new order "
        "(0-based; slices like 1:3; negative from the end); --drop lists the positions to leave out.",
    )
    p.add_argument("source", metavar="SOURCE", help="an embedding name or file")
    p.add_argument("name", metavar="NAME", help="the new embedding's name")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--keep", metavar="POSITIONS", help="e.g. 2,0,1 or 0:2")
    how.add_argument("--drop", metavar="POSITIONS", help="e.g. 1 or -1")
    common(p, writes=True)
    p.set_defaults(func=run_edit)


def _folders(args: argparse.Namespace) -> list[Path]:
    if args.embeddings_dir is not None:
        return list(args.embeddings_dir)
    default = Path("embeddings")
    return [default] if default.is_dir() else []


def _library(args: argparse.Namespace) -> dict[str, Any]:
    """Name -> single-encoder vectors of every usable embedding under the folders."""
    library = EmbeddingLibrary([*([EXAMPLE_EMBEDDINGS_DIR] if args.examples else []), *_folders(args)])
    library.refresh()
    return {name: emb.tensor() for name, emb in library.usable().items() if not emb.is_sdxl}


def _source(args: argparse.Namespace, reference: str) -> tuple[str, Any]:
    """(name, vectors) of an embedding given by name (under the folders) or by file path."""
    path = Path(reference)
    if path.suffix.lower() in EMBEDDING_SUFFIXES and path.is_file():
        try:
            embedding = load_embedding(path)
        except EmbeddingFileError as exc:
            raise CommandError(str(exc)) from exc
        if embedding.is_sdxl:
            raise CommandError(f"{path}: SDXL per-encoder embeddings are not handled by the embedding tools")
        return embedding.name, embedding.tensor()
    found = {name.lower(): (name, vectors) for name, vectors in _library(args).items()}
    if reference.lower() not in found:
        where = ", ".join(str(f) for f in _folders(args)) or "no embeddings folder (./embeddings does not exist)"
        raise CommandError(f"no embedding {reference!r} in {where}, and no such file")
    return found[reference.lower()]


def _model(args: argparse.Namespace) -> Any:
    from sdconcepts.backends.model_loading import ModelLoadError, load_model  # lazy: transformers, diffusers

    try:
        return load_model(args.ckpt, device=args.device)
    except ModelLoadError as exc:
        raise CommandError(str(exc)) from exc


def _write(args: argparse.Namespace, vectors: Any, model: Any | None) -> Path:
    folder = args.out_dir or (_folders(args) or [Path("embeddings")])[0]
    try:
        return write_embedding(folder, args.name, vectors, suffix=f".{args.format}", overwrite=args.overwrite,
                               sd_checkpoint=getattr(model, "short_hash", None) if model is not None else None,
                               sd_checkpoint_name=getattr(model, "name", None) if model is not None else None)
    except (EmbeddingToolError, EmbeddingFileError) as exc:
        raise CommandError(str(exc)) from exc


def run_inspect(args: argparse.Namespace) -> int:
    name, vectors = _source(args, args.embedding)
    model = _model(args)
    try:
        reports = describe_vectors(vectors, vocabulary_of(model), args.top_k)
    except EmbeddingToolError as exc:
        raise CommandError(f"{name}: {exc}") from exc
    if args.json:
        print(json.dumps({"name": name, "vectors": [
            {"index": r.index, "norm": round(r.norm, 6),
             "nearest": [{"token": t, "id": i, "cosine": round(c, 6)} for t, i, c in r.nearest]}
            for r in reports]}, indent=2, ensure_ascii=False))
    else:
        print(f"{name}: {len(reports)} vectors, width {vectors.shape[1]}")
        for line in format_report(reports):
            print(line)
    return 0


def run_mix(args: argparse.Namespace) -> int:
    try:
        terms = [term for group in parse_mix(args.expression) for term in group]
        # The model is loaded only for words (its vocabulary) and to record which model the words came from.
        model = _model(args) if any(term.words for term in terms) else None
        vectors = mix_vectors(args.expression, _library(args), vocabulary_of(model) if model is not None else None)
    except EmbeddingToolError as exc:
        raise CommandError(str(exc)) from exc
    print(_write(args, vectors, model))
    return 0


def run_edit(args: argparse.Namespace) -> int:
    _name, vectors = _source(args, args.source)
    try:
        kept = select_vectors(vectors, keep=args.keep, drop=args.drop)
    except EmbeddingToolError as exc:
        raise CommandError(str(exc)) from exc
    print(_write(args, kept, None))
    return 0
