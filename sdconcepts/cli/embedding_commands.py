"""Command line for the embedding tools: ``embedding inspect|mix|edit|convert`` (logic in
``sdconcepts.embeddings.tools`` and ``sdconcepts.embeddings.conversion``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sdconcepts.backends.embedding_conversion import convert_for_model
from sdconcepts.cli.arguments import CommandError, check_folder, existing_dir, existing_path, int_at_least
from sdconcepts.embeddings.conversion import ConversionError, default_map_cache
from sdconcepts.embeddings.embedding import SDXL_ENCODERS, Embedding, kind_mismatch
from sdconcepts.embeddings.files import EMBEDDING_SUFFIXES, EmbeddingFileError, load_embedding
from sdconcepts.embeddings.library import EmbeddingLibrary
from sdconcepts.embeddings.tools import (
    EmbeddingToolError,
    describe_vectors,
    format_report,
    mix_kind,
    mix_pair,
    mix_vectors,
    parse_mix,
    select_pair,
    select_vectors,
    vocabularies_of,
    vocabulary_of,
    write_embedding,
)
from sdconcepts.toyworld.examples import EXAMPLE_EMBEDDINGS_DIR

FORMATS = tuple(s.lstrip(".") for s in EMBEDDING_SUFFIXES)


def add_embedding_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = subparsers.add_parser(
        "embedding",
        help="embedding tools: nearest tokens and norms (inspect), mix embeddings and words (mix), keep/drop/reorder "
        "vectors (edit), SD 1.x -> SDXL (convert), embeddings bundled in LoRA files (extract)",
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
            p.add_argument("--format", choices=FORMATS, default=None,
                           help="file format (default: pt, A1111's layout; safetensors for SDXL pairs)")
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
        '0.5*toytri[0:2] + 0.5*"red triangle"  |  toytri | "red"  |  toytri[0:2] + "red triangle". SDXL pairs are '
        "mixed per encoder (words from each encoder's table); 0.3:0.7*name weights clip_l 0.3 and clip_g 0.7.",
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

    p = commands.add_parser(
        "extract", help="write an embedding bundled in a LoRA file (A1111's bundle_emb keys) as a standalone file",
        description="List the embeddings bundled in a .safetensors LoRA file (A1111's bundle_emb.<name>.* keys, as "
        "OneTrainer and invoke-training write them), or write one as a standalone embedding file (named NAME, or "
        "--name). SDXL pairs are written as .safetensors. A pickle LoRA file is never unpickled.",
    )
    p.add_argument("lora", metavar="LORA", type=existing_path, help="the LoRA .safetensors file")
    p.add_argument("bundled", metavar="NAME", nargs="?", help="the bundled embedding (default: list them)")
    p.add_argument("--name", dest="name", default=None, help="the new file's name (default: NAME)")
    common(p, writes=True)
    p.set_defaults(func=run_extract)

    p = commands.add_parser(
        "convert", help="an SD 1.x embedding as an SDXL one (clip_l + clip_g .safetensors)",
        description="Write NAME.safetensors with clip_l and clip_g for the SDXL model --ckpt (default: the embedded "
        "toyworld-xl) from an SD 1.x/2.x embedding. Where the embedding's text encoder is the SDXL model's clip_l "
        "(real SD 1.x: CLIP ViT-L/14) clip_l is the original vectors; clip_g (otherwise both) comes through a map "
        "between the two token tables fitted on their shared vocabulary, cached per pair of tables "
        "(docs/sdxl-conversion.md).",
    )
    p.add_argument("source", metavar="SOURCE", help="an SD 1.x/2.x embedding name or file")
    p.add_argument("name", metavar="NAME", help="the new embedding's name (default: SOURCE's name + _xl)", nargs="?")
    p.add_argument("--source-ckpt", type=existing_path, default=None, metavar="MODEL",
                   help="the SD 1.x/2.x model the embedding was trained on (default: the SDXL model's own clip_l when "
                   "the widths match, else the embedded SD-1 toy model)")
    common(p, writes=True)
    p.set_defaults(func=run_convert)


def _folders(args: argparse.Namespace) -> list[Path]:
    if args.embeddings_dir is not None:
        return list(args.embeddings_dir)
    default = Path("embeddings")
    return [default] if default.is_dir() else []


def _scan(args: argparse.Namespace) -> EmbeddingLibrary:
    library = EmbeddingLibrary([*([EXAMPLE_EMBEDDINGS_DIR] if args.examples else []), *_folders(args)])
    library.refresh()
    return library


def _library(args: argparse.Namespace) -> tuple[dict[str, Embedding], dict[str, str]]:
    """Name -> every usable embedding under the folders (SD 1.x/2.x and SDXL), and name -> why each other file is
    skipped."""
    library = _scan(args)
    return library.usable(), library.skipped()


def _embedding(args: argparse.Namespace, reference: str) -> Embedding:
    """An embedding given by file path or by name (under the folders); a skipped one is refused with its reason."""
    path = Path(reference)
    if path.suffix.lower() in EMBEDDING_SUFFIXES and path.is_file():
        try:
            return load_embedding(path)
        except EmbeddingFileError as exc:
            raise CommandError(str(exc)) from exc
    library = _scan(args)
    found = library.get(reference)
    if found is not None:
        return found
    reasons = {name.lower(): (name, why) for name, why in library.skipped().items()}
    if reference.lower() in reasons:
        name, why = reasons[reference.lower()]
        raise CommandError(f"embedding {name!r} is skipped: {why}")
    where = ", ".join(str(f) for f in _folders(args)) or "no embeddings folder (./embeddings does not exist)"
    raise CommandError(f"no embedding {reference!r} in {where}, and no such file")


def _model(args: argparse.Namespace, ref: Any = None) -> Any:
    from sdconcepts.backends.model_loading import ModelLoadError, load_model  # lazy: transformers, diffusers

    try:
        return load_model(ref if ref is not None else args.ckpt, device=args.device)
    except ModelLoadError as exc:
        raise CommandError(str(exc)) from exc


def _out_dir(args: argparse.Namespace) -> Path:
    """Where the new file goes, checked before any work (a file there was a traceback after the work)."""
    folder: Path = args.out_dir or (_folders(args) or [Path("embeddings")])[0]
    check_folder(folder, "--out-dir" if args.out_dir else "the embeddings folder")
    return folder


def _write(args: argparse.Namespace, vectors: Any, model: Any | None, suffix: str | None = None) -> Path:
    folder = _out_dir(args)
    pair = not hasattr(vectors, "shape")
    suffix = suffix or (f".{args.format}" if args.format else (".safetensors" if pair else ".pt"))
    try:
        return write_embedding(folder, args.name, vectors, suffix=suffix, overwrite=args.overwrite,
                               sd_checkpoint=getattr(model, "short_hash", None) if model is not None else None,
                               sd_checkpoint_name=getattr(model, "name", None) if model is not None else None)
    except (EmbeddingToolError, EmbeddingFileError) as exc:
        raise CommandError(str(exc)) from exc


def _reports_json(reports: list[Any]) -> list[dict[str, Any]]:
    return [{"index": r.index, "norm": round(r.norm, 6),
             "nearest": [{"token": t, "id": i, "cosine": round(c, 6)} for t, i, c in r.nearest]} for r in reports]


def run_inspect(args: argparse.Namespace) -> int:
    embedding = _embedding(args, args.embedding)
    name = embedding.name
    model = _model(args)
    mismatch = kind_mismatch(embedding, sdxl=model.is_sdxl, encoder_widths=model.encoder_widths)
    if mismatch is not None:
        raise CommandError(f"{name}: {mismatch} (--ckpt chooses the model)")
    try:
        if embedding.is_sdxl:  # each half through its own encoder's table
            vocabularies = vocabularies_of(model)
            per_encoder = {key: describe_vectors(embedding.vectors[key], vocabularies[key], args.top_k)  # type: ignore[index]
                           for key in SDXL_ENCODERS}
        else:
            per_encoder = {"": describe_vectors(embedding.tensor(), vocabulary_of(model), args.top_k)}
    except EmbeddingToolError as exc:
        raise CommandError(f"{name}: {exc}") from exc
    if args.json:
        if embedding.is_sdxl:
            print(json.dumps({"name": name, "encoders": {k: _reports_json(r) for k, r in per_encoder.items()}},
                             indent=2, ensure_ascii=False))
        else:
            print(json.dumps({"name": name, "vectors": _reports_json(per_encoder[""])}, indent=2, ensure_ascii=False))
        return 0
    if embedding.is_sdxl:
        widths = ", ".join(f"{k} {embedding.vectors[k].shape[1]}" for k in SDXL_ENCODERS)  # type: ignore[index]
        print(f"{name}: {embedding.vector_count} vectors, SDXL pair ({widths})")
    else:
        print(f"{name}: {embedding.vector_count} vectors, width {embedding.width}")
    for key, reports in per_encoder.items():
        if key:
            print(f"{key}:")
        for line in format_report(reports):
            print(f"  {line}" if key else line)
    return 0


def run_mix(args: argparse.Namespace) -> int:
    _out_dir(args)
    try:
        terms = [term for group in parse_mix(args.expression) for term in group]
        # The model is loaded only for words (its vocabulary) and to record which model the words came from.
        model = _model(args) if any(term.words for term in terms) else None
        usable, skipped = _library(args)
        names = [term.source for term in terms if not term.words]
        if mix_kind(names, usable, model.is_sdxl if model is not None else None):
            pairs = {n: e.vectors for n, e in usable.items() if e.is_sdxl}
            others = {n: "a single-encoder SD 1.x/2.x embedding" for n, e in usable.items() if not e.is_sdxl}
            vectors: Any = mix_pair(args.expression, pairs,  # type: ignore[arg-type]
                                    vocabularies_of(model) if model is not None else None,
                                    skipped={**skipped, **others})
        else:
            singles = {n: e.tensor() for n, e in usable.items() if not e.is_sdxl}
            others = {n: "an SDXL embedding (clip_l + clip_g)" for n, e in usable.items() if e.is_sdxl}
            vectors = mix_vectors(args.expression, singles, vocabulary_of(model) if model is not None else None,
                                  skipped={**skipped, **others})
    except EmbeddingToolError as exc:
        raise CommandError(str(exc)) from exc
    print(_write(args, vectors, model))
    return 0


def run_edit(args: argparse.Namespace) -> int:
    _out_dir(args)
    embedding = _embedding(args, args.source)
    try:
        if embedding.is_sdxl:  # the same positions in both halves
            kept: Any = select_pair(embedding.vectors, keep=args.keep, drop=args.drop)  # type: ignore[arg-type]
        else:
            kept = select_vectors(embedding.tensor(), keep=args.keep, drop=args.drop)
    except EmbeddingToolError as exc:
        raise CommandError(str(exc)) from exc
    print(_write(args, kept, None))
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from sdconcepts.model_shape import EMBEDDED_XL_MODEL_DIR

    if args.format not in (None, "safetensors"):
        raise CommandError(f"--format {args.format}: an SDXL embedding is written as .safetensors (clip_l, clip_g)")
    embedding = _embedding(args, args.source)
    args.name = args.name or f"{embedding.name}_xl"
    target = _model(args, args.ckpt or EMBEDDED_XL_MODEL_DIR)
    source_model = _model(args, args.source_ckpt) if args.source_ckpt is not None else None
    try:
        converted = convert_for_model(embedding, target, default_map_cache(), source_model)
    except ConversionError as exc:
        raise CommandError(f"{embedding.name}: {exc}") from exc
    print(_write(args, converted.vectors, target, ".safetensors"))
    return 0


def run_extract(args: argparse.Namespace) -> int:
    from sdconcepts.embeddings.bundles import read_bundled_embeddings

    try:
        found, skipped = read_bundled_embeddings(args.lora)
    except EmbeddingFileError as exc:
        raise CommandError(str(exc)) from exc
    if args.bundled is None:
        for name, bundled in found.items():
            emb = bundled.embedding
            kind = "SDXL pair" if emb.is_sdxl else f"width {emb.width}"
            print(f"{name}: {emb.vector_count} vectors, {kind}")
        for name, reason in skipped.items():
            print(f"{name}: skipped ({reason})")
        if not found and not skipped:
            print(f"{args.lora}: no bundled embeddings")
        return 0
    wanted = {name.lower(): bundled for name, bundled in found.items()}.get(args.bundled.lower())
    if wanted is None:
        why = {n.lower(): r for n, r in skipped.items()}.get(args.bundled.lower())
        raise CommandError(f"{args.lora}: bundled embedding {args.bundled!r} is skipped: {why}" if why else
                           f"{args.lora}: no bundled embedding {args.bundled!r} (it has: "
                           f"{', '.join(found) or 'none'})")
    args.name = args.name or wanted.embedding.name
    print(_write(args, wanted.embedding.vectors, None))
    return 0
