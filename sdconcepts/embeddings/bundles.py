"""Embeddings bundled in LoRA files: A1111's ``bundle_emb.<name>.<key>`` tensors (A1111 PR #13568, written by
OneTrainer and invoke-training), read as embeddings.

A1111 1.10 (``extensions-builtin/Lora/networks.py``; a1111-compat §1.4) groups a LoRA's keys
``bundle_emb.<name>.string_to_param.<k>`` into ``{"string_to_param": {k: tensor}}`` and every other
``bundle_emb.<name>.<key>`` (``clip_l``, ``clip_g``, or one tensor under any key) into ``{key: tensor}``, then reads
that dict as an embedding file (our ``files.embedding_from_data``). Its meaning there: the word exists while the LoRA
is in the prompt (``<lora:file:w>``), and an embedding of the same name in the embeddings folder wins ("Skip bundle
embedding ... already loaded from embeddings folder"). Only ``.safetensors`` LoRA files are read; a pickle is never
unpickled.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sdconcepts.embeddings.embedding import Embedding, EmbeddingError, kind_mismatch
from sdconcepts.embeddings.files import (
    EmbeddingFileError,
    embedding_from_data,
    file_sha256,
    read_safetensors_tensors,
)
from sdconcepts.prompts.network_tags import parse_extra_network_tags

__all__ = [
    "BUNDLE_PREFIX",
    "BundledEmbedding",
    "bundled_for_prompt",
    "find_lora_files",
    "list_bundled",
    "read_bundled_embeddings",
]

BUNDLE_PREFIX = "bundle_emb."
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")


@dataclass(frozen=True)
class BundledEmbedding:
    """An embedding found in a LoRA file (``lora``: the file; its prompt word is ``embedding.name``)."""

    embedding: Embedding
    lora: Path

    @property
    def where(self) -> str:
        return f"in {self.lora.name}"


def read_bundled_embeddings(path: str | os.PathLike[str]) -> tuple[dict[str, BundledEmbedding], dict[str, str]]:
    """The embeddings bundled in one LoRA file by name, and name -> why each bundle that is not an embedding was
    skipped. A file that is not a safetensors LoRA raises ``EmbeddingFileError`` (one line; a pickle is never
    unpickled)."""
    lora = Path(path)
    if lora.suffix.lower() != ".safetensors":
        raise EmbeddingFileError(f"{lora}: bundled embeddings are read from .safetensors LoRA files only (a pickle "
                                 "is never unpickled)")
    tensors = read_safetensors_tensors(lora, lambda key: key.startswith(BUNDLE_PREFIX))
    grouped: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        name, _, vec_name = key[len(BUNDLE_PREFIX):].partition(".")
        data = grouped.setdefault(name, {})
        if vec_name.split(".")[0] == "string_to_param":
            data["string_to_param"] = {vec_name.partition(".")[2]: tensor}  # as A1111: the last such key wins
        else:
            data[vec_name] = tensor
    found: dict[str, BundledEmbedding] = {}
    skipped: dict[str, str] = {}
    digest: str | None = None
    for name, data in grouped.items():
        try:
            embedding = embedding_from_data(data, name)
        except EmbeddingError as exc:
            skipped[name] = f"bundled in {lora.name}: {exc}"
            continue
        digest = digest or file_sha256(lora)
        # A1111's hash of a bundled embedding is its LoRA's (BundledTIHash): the infotext names the file.
        found[name] = BundledEmbedding(replace(embedding, hash=digest), lora)
    return found, skipped


def find_lora_files(folders: Iterable[str | os.PathLike[str]]) -> dict[str, Path]:
    """LoRA files under ``folders`` (recursively) by name as a ``<lora:name:w>`` tag names them (the file's stem);
    a later folder wins a name."""
    found: dict[str, Path] = {}
    for folder in folders:
        root = Path(folder)
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            if path.suffix.lower() in LORA_SUFFIXES and path.is_file():
                found[path.stem] = path
    return found


def bundled_for_prompt(prompt: str, lora_files: Mapping[str, Path], taken: Iterable[str], *, width: int,
                       sdxl: bool, encoder_widths: Sequence[int] | None = None,
                       ) -> tuple[dict[str, Embedding], dict[str, str]]:
    """The embeddings bundled in the LoRA files the prompt's ``<lora:name:w>`` tags name, with A1111's meaning: a
    bundled word exists while its LoRA is in the prompt, and a name in ``taken`` (the embeddings folder's usable
    words) wins over it. Returns the usable ones by name, and name -> why each other was skipped (a LoRA file that
    cannot be read, a bundle whose vectors fit no encoder of this model)."""
    _text, tags = parse_extra_network_tags(prompt)
    names = list(dict.fromkeys(str(t.args[0]) for t in tags if t.name == "lora" and t.args))
    folder_words = {name.lower() for name in taken}
    usable: dict[str, Embedding] = {}
    skipped: dict[str, str] = {}
    for lora_name in names:
        path = lora_files.get(lora_name)
        if path is None:
            continue
        try:
            found, bad = read_bundled_embeddings(path)
        except EmbeddingFileError as exc:
            skipped[f"<lora:{lora_name}>"] = str(exc)
            continue
        skipped.update(bad)
        for name, bundled in found.items():
            if name.lower() in folder_words:  # A1111: "already loaded from embeddings folder"
                continue
            emb = bundled.embedding
            reason = kind_mismatch(emb, sdxl=sdxl, encoder_widths=encoder_widths)
            if reason is None and emb.width != width:
                reason = f"width {emb.width} does not fit the model's {width}"
            if reason is not None:
                skipped[name] = f"bundled in {path.name}: {reason}"
            else:
                usable[name] = emb
    return usable, skipped


BundleCache = dict[str, tuple[tuple[float, int], dict[str, BundledEmbedding], dict[str, str]]]


def list_bundled(lora_files: Mapping[str, Path], cache: BundleCache | None = None,
                 ) -> tuple[list[BundledEmbedding], dict[Path, str]]:
    """Every embedding bundled in the LoRA files (for the cards: ``in <lora file>``), and path -> why a file or a
    bundle could not be read. ``cache`` (path -> what was read at which mtime and size) skips unchanged files."""
    found: list[BundledEmbedding] = []
    problems: dict[Path, str] = {}
    for path in lora_files.values():
        if path.suffix.lower() != ".safetensors":
            continue  # a pickle LoRA is never read; it is simply not a bundle carrier here
        try:
            stat = path.stat()
            key = (stat.st_mtime, stat.st_size)
            known = cache.get(str(path)) if cache is not None else None
            if known is not None and known[0] == key:
                bundles, skipped = known[1], known[2]
            else:
                bundles, skipped = read_bundled_embeddings(path)
                if cache is not None:
                    cache[str(path)] = (key, bundles, skipped)
        except (OSError, EmbeddingFileError) as exc:
            problems[path] = str(exc)
            continue
        found.extend(bundles.values())
        for name, reason in skipped.items():
            problems[path / name] = reason
    return found, problems
