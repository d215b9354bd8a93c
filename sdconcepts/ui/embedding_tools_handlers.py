"""The Textual Inversion tab's embedding tools without gradio: inspect (nearest tokens, norms), mix, edit, and
convert (an SD 1.x embedding as an SDXL one for the chosen SDXL model).

Embeddings are named as in prompts (the session's library, at the chosen model's width); new files go to the
folder training writes to (``ui.train_handlers.embeddings_folder``), so the cards list them on the next render.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from sdconcepts.backends.embedding_conversion import convert_for_model
from sdconcepts.embeddings.conversion import ConversionError
from sdconcepts.embeddings.embedding import Embedding, kind_mismatch
from sdconcepts.embeddings.files import EMBEDDING_SUFFIXES, EmbeddingFileError, load_embedding
from sdconcepts.embeddings.tools import (
    EmbeddingToolError,
    Vocabulary,
    describe_vectors,
    mix_pair,
    mix_vectors,
    parse_mix,
    select_pair,
    select_vectors,
    vocabularies_of,
    vocabulary_of,
    write_embedding,
)
from sdconcepts.ui.ui_session import UiError, UiSession, contained_path

__all__ = ["FORMATS", "convert_embedding", "edit_embedding", "inspect_html", "mix_embedding"]

FORMATS = (".pt", ".safetensors", ".bin", ".png", ".webp")


def _usable_and_skipped(session: UiSession, model_label: str) -> tuple[dict[str, Embedding], dict[str, str]]:
    """Name -> embedding usable with this model (SD 1.x/2.x files for SD 1/2 models, SDXL pairs for SDXL ones), and
    name -> why each other file is not offered."""
    session.embeddings.refresh()
    width = session.context_width(model_label)
    sdxl = bool(session.is_sdxl(model_label))
    loaded = session.embeddings.usable(width)  # first: a file that fails its full read (NaN) is then skipped
    usable, skipped = {}, dict(session.embeddings.skipped(width))
    for name, emb in loaded.items():
        reason = kind_mismatch(emb, sdxl=sdxl)
        if reason is None:
            usable[name] = emb
        else:
            skipped[name] = reason
    return usable, skipped


def _embedding(session: UiSession, model_label: str, name: str) -> Embedding:
    usable, skipped = _usable_and_skipped(session, model_label)
    wanted = str(name or "").strip()
    if not wanted:
        raise UiError("embedding: enter the name of an embedding")
    for known, embedding in usable.items():
        if known.lower() == wanted.lower():
            return embedding
    for known, why in skipped.items():
        if known.lower() == wanted.lower():
            raise UiError(f"embedding: {known!r} is skipped: {why}")
    raise UiError(f"embedding: no usable embedding {wanted!r} for this model (see the cards and the skipped list)")


def _model(session: UiSession, model_label: str) -> Any:
    # Generation and training share the model: read its tables while nothing else runs on it.
    with session.generate_lock:
        return session.model(model_label)


def _vocabularies(model: Any) -> dict[str, Vocabulary]:
    """Each encoder's vocabulary by half (SDXL: clip_l, clip_g), or ``{"": vocabulary}`` for SD 1/2."""
    return vocabularies_of(model) if model.is_sdxl else {"": vocabulary_of(model)}


def _report_table(reports: list[Any]) -> str:
    rows = "".join(
        f"<tr><td>{r.index}</td><td>{r.norm:.4f}</td><td>"
        + ", ".join(f"<span title=\"token {i}\">{html.escape(t)}</span> {c:.2f}" for t, i, c in r.nearest)
        + "</td></tr>"
        for r in reports
    )
    return f"<table><tr><th>#</th><th>norm</th><th>nearest tokens (cosine)</th></tr>{rows}</table>"


def inspect_html(session: UiSession, model_label: str, name: str, top_k: float) -> str:
    """A table: per vector its norm and the ``top_k`` nearest vocabulary tokens with their cosine; for an SDXL pair
    one table per encoder, each half against its own encoder's table."""
    embedding = _embedding(session, model_label, name)
    vocabularies = _vocabularies(_model(session, model_label))
    halves = embedding.vectors if embedding.is_sdxl else {"": embedding.tensor()}
    try:
        reports = {key: describe_vectors(halves[key], vocabularies[key], int(top_k or 5))  # type: ignore[index]
                   for key in vocabularies}
    except EmbeddingToolError as exc:
        raise UiError(f"{embedding.name}: {exc}") from exc
    if embedding.is_sdxl:
        widths = ", ".join(f"{key} {halves[key].shape[1]}" for key in vocabularies)  # type: ignore[index]
        head = f"{embedding.vector_count} vectors, SDXL pair ({widths})"
    else:
        head = f"{embedding.vector_count} vectors, width {embedding.width}"
    tables = "".join((f"<h5>{key}</h5>" if key else "") + _report_table(r) for key, r in reports.items())
    return (f'<div class="sdconcepts-tools-report"><b>{html.escape(embedding.name)}</b>: {head}{tables}</div>')


def _write(session: UiSession, model: Any | None, name: str, vectors: Any, file_format: str, overwrite: bool) -> Path:
    from sdconcepts.ui.train_handlers import embeddings_folder

    if not str(name or "").strip():
        raise UiError("name: enter a name for the new embedding")
    if file_format not in FORMATS:
        raise UiError(f"format: choose one of {', '.join(FORMATS)}")
    if not hasattr(vectors, "shape"):
        file_format = ".safetensors"  # an SDXL pair: the one layout hosts read clip_l + clip_g from
    try:
        return write_embedding(embeddings_folder(session), str(name), vectors, suffix=file_format,
                               overwrite=bool(overwrite),
                               sd_checkpoint=getattr(model, "short_hash", None) if model is not None else None,
                               sd_checkpoint_name=getattr(model, "name", None) if model is not None else None)
    except (EmbeddingToolError, EmbeddingFileError) as exc:
        raise UiError(str(exc)) from exc


def mix_embedding(session: UiSession, model_label: str, name: str, expression: str, file_format: str = ".pt",
                  overwrite: bool = False) -> Path:
    """Write ``name`` from a mix expression (``embedding_tools.parse_mix``); returns the written file. On an SDXL
    model the mix is made per encoder from SDXL pairs (written as ``.safetensors``)."""
    try:
        terms = [term for group in parse_mix(str(expression or "")) for term in group]
        model = _model(session, model_label) if any(t.words for t in terms) else None
        vocabularies = _vocabularies(model) if model is not None else None
        usable, skipped = _usable_and_skipped(session, model_label)
        if session.is_sdxl(model_label):
            vectors: Any = mix_pair(str(expression), {n: e.vectors for n, e in usable.items()},  # type: ignore[misc]
                                    vocabularies, skipped=skipped)
        else:
            vectors = mix_vectors(str(expression), {n: e.tensor() for n, e in usable.items()},
                                  vocabularies[""] if vocabularies is not None else None, skipped=skipped)
    except EmbeddingToolError as exc:
        raise UiError(f"expression: {exc}") from exc
    return _write(session, model, name, vectors, file_format, overwrite)


def edit_embedding(session: UiSession, model_label: str, source: str, name: str, keep: str, drop: str,
                   file_format: str = ".pt", overwrite: bool = False) -> Path:
    """Write ``name`` from ``source``'s vectors: ``keep`` (positions in the new order) or ``drop`` (an SDXL pair:
    the same positions in both halves)."""
    embedding = _embedding(session, model_label, source)
    keep_text, drop_text = str(keep or "").strip() or None, str(drop or "").strip() or None
    try:
        kept: Any = (select_pair(embedding.vectors, keep=keep_text, drop=drop_text)  # type: ignore[arg-type]
                     if embedding.is_sdxl else select_vectors(embedding.tensor(), keep=keep_text, drop=drop_text))
    except EmbeddingToolError as exc:
        raise UiError(f"vectors: {exc}") from exc
    return _write(session, None, name, kept, file_format, overwrite)


def _any_embedding(session: UiSession, reference: str) -> Embedding:
    """An embedding by name or by a path inside the embedding folders, usable with this model or not (converting
    is for files the SDXL model skips); a file that does not load says why."""
    wanted = str(reference or "").strip()
    if not wanted:
        raise UiError("convert: enter the name of an SD 1.x embedding")
    session.embeddings.refresh()
    records = session.embeddings.records()
    if wanted.lower().endswith(EMBEDDING_SUFFIXES):
        path = contained_path(wanted, list(session.embeddings.folders), "convert")
        matches = [r for r in records if r.path.resolve() == path]
    else:
        matches = [r for r in records if r.name.lower() == wanted.lower()]
    if not matches:
        raise UiError(f"convert: no embedding {wanted!r} in the embedding folders")
    record = matches[-1]  # later files win a name, as in prompts
    try:
        return load_embedding(record.path)
    except EmbeddingFileError as exc:
        raise UiError(f"convert: {exc}") from exc


def convert_embedding(session: UiSession, model_label: str, source: str, name: str = "",
                      overwrite: bool = False) -> Path:
    """Write ``name`` (default: the source's name + ``_xl``) as an SDXL ``.safetensors`` (clip_l, clip_g) for the
    chosen SDXL model from an SD 1.x/2.x embedding (``embeddings.conversion``); returns the written file."""
    embedding = _any_embedding(session, source)
    if session.is_sdxl(model_label) is False:
        raise UiError("convert: choose an SDXL model; the conversion writes clip_l + clip_g for it")
    with session.generate_lock:
        model = session.model(model_label)
        try:
            converted = convert_for_model(embedding, model, session.token_maps)
        except ConversionError as exc:
            raise UiError(f"convert: {embedding.name}: {exc}") from exc
    target = str(name or "").strip() or f"{embedding.name}_xl"
    return _write(session, model, target, converted.vectors, ".safetensors", overwrite)
