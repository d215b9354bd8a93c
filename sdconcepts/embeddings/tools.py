"""Embedding tools: what each vector is near in the vocabulary, mixing embeddings and words, keeping or dropping
vectors, and writing the result as a regular embedding file.

The mix language (``parse_mix``), one line:

- a *term* is an embedding name (``toytri``; a name that starts with a digit or has other characters than letters,
  digits, ``_ . -`` in backticks: `` `my emb` ``) or quoted words (``"red triangle"``: the token embeddings of those words, one vector
  per token, as the text encoder's table holds them), optionally followed by a vector selection ``[i, j, a:b]``
  (0-based, Python slices, negative from the end, any order: keeps, drops and reorders);
- ``w*term`` weights a term (``-term`` is ``-1*term``); terms joined by ``+`` or `` - `` form a *sum*: the weighted
  sum of their vectors, position by position, with the weights as given (``0.5*a + 0.5*b`` averages; a minus needs
  spaces around it, since ``a-b`` is one name). Every term of
  a sum must have the same vector count, otherwise it is an error naming both counts;
- sums joined by ``|`` or ``,`` are *concatenated*: their vectors one after the other.

``0.5*toytri + 0.5*"red triangle"`` needs ``"red triangle"`` to have as many tokens as ``toytri`` has vectors;
``toytri | "red"`` appends one vector; ``toytri[0:2] + "red triangle"`` adds word rows to the first two vectors.

SDXL pairs (``clip_l`` + ``clip_g``): every tool works on each half through its own encoder's table
(``vocabularies_of``): nearest tokens per encoder, the same vector positions kept in both halves, and a mix made
once per encoder, words from that encoder's table. ``0.3:0.7*term`` weights a term 0.3 in clip_l and 0.7 in
clip_g. A mix of SD 1.x/2.x and SDXL embeddings, or of different widths, is refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdconcepts.embeddings.embedding import Embedding
from sdconcepts.embeddings.files import EMBEDDING_SUFFIXES, save_embedding
from sdconcepts.file_names import InvalidNameError, sanitize_name, target_path

__all__ = [
    "EmbeddingToolError",
    "MixTerm",
    "Vocabulary",
    "VectorReport",
    "describe_vectors",
    "format_report",
    "mix_kind",
    "mix_pair",
    "mix_vectors",
    "parse_mix",
    "parse_selection",
    "select_pair",
    "select_vectors",
    "vocabularies_of",
    "vocabulary_of",
    "write_embedding",
]

# The prompt chunk holds 75 tokens; A1111 cannot use an embedding with more vectors (embeddings.library refuses them too).
MAX_VECTORS = 75


class EmbeddingToolError(ValueError):
    """An expression, selection or name the tools cannot carry out; the message says what and why."""


# -- the vocabulary ----------------------------------------------------------------------------------------------


@dataclass
class Vocabulary:
    """The text encoder's token embedding table ``[vocab, width]`` with a way in (text -> token ids) and out (id ->
    readable token). ``hidden`` ids (the start/end tokens) are never offered as nearest tokens."""

    table: Tensor
    token_ids: Callable[[str], list[int]]
    token_text: Callable[[int], str]
    hidden: frozenset[int] = frozenset()
    _unit: Tensor | None = field(default=None, repr=False)

    @property
    def width(self) -> int:
        return int(self.table.shape[1])

    def unit_rows(self) -> Tensor:
        """The table's rows scaled to length 1 (computed once: SD's table is 49408 x 768)."""
        if self._unit is None:
            rows = self.table.detach().float().cpu()
            self._unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return self._unit

    def words(self, text: str) -> Tensor:
        """The token-embedding rows of ``text``, one per token (no start/end tokens)."""
        ids = self.token_ids(text)
        if not ids:
            raise EmbeddingToolError(f"{text!r} has no tokens")
        return self.table[torch.tensor(ids, dtype=torch.long)].detach().float().cpu()


def vocabulary_of(model: Any) -> Vocabulary:
    """The vocabulary of a loaded model (``backends.loaded_model.LoadedModel``): its CLIP tokenizer and the text
    encoder's input embeddings (SDXL: clip_l's; ``vocabularies_of`` gives both)."""
    return _vocabulary(model.text_encoder, model.tokenizer)


def vocabularies_of(model: Any) -> dict[str, Vocabulary]:
    """An SDXL model's vocabulary per encoder: ``{"clip_l": .., "clip_g": ..}``, each its own tokenizer and table."""
    return {"clip_l": _vocabulary(model.text_encoder, model.tokenizer),
            "clip_g": _vocabulary(model.text_encoder_2, model.tokenizer_2)}


def _vocabulary(encoder: Any, tokenizer: Any) -> Vocabulary:
    table = encoder.get_input_embeddings().weight.detach().float().cpu()

    def token_ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def token_text(index: int) -> str:
        token = str(tokenizer.convert_ids_to_tokens(int(index)))
        # CLIP marks a word's last piece with </w>: a token without it continues into the next one.
        whole = token.endswith("</w>")
        core = token[: -len("</w>")] if whole else token
        text = str(tokenizer.convert_tokens_to_string([core])).replace("</w>", "").strip() or core  # byte-level BPE
        return text if whole else f"{text}…"

    hidden = frozenset(int(i) for i in getattr(tokenizer, "all_special_ids", []))
    return Vocabulary(table, token_ids, token_text, hidden)


# -- inspect -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VectorReport:
    """One vector: its position, its length, and the nearest vocabulary tokens as ``(token, id, cosine)``."""

    index: int
    norm: float
    nearest: tuple[tuple[str, int, float], ...]


def describe_vectors(vectors: Tensor, vocabulary: Vocabulary, top_k: int = 5) -> list[VectorReport]:
    """Per vector: its L2 norm and the ``top_k`` tokens of highest cosine similarity in the vocabulary."""
    vectors = _checked_width(vectors, vocabulary)
    if top_k < 1:
        raise EmbeddingToolError(f"top-k must be at least 1, got {top_k}")
    unit = vocabulary.unit_rows()
    norms = vectors.norm(dim=1)
    cosines = (vectors / norms.clamp_min(1e-12).unsqueeze(1)) @ unit.T
    if vocabulary.hidden:
        cosines[:, torch.tensor(sorted(vocabulary.hidden), dtype=torch.long)] = -math.inf
    best = cosines.topk(min(top_k, unit.shape[0] - len(vocabulary.hidden)), dim=1)
    reports = []
    for index in range(vectors.shape[0]):
        nearest = tuple((vocabulary.token_text(int(i)), int(i), float(c))
                        for c, i in zip(best.values[index].tolist(), best.indices[index].tolist(), strict=True))
        reports.append(VectorReport(index, float(norms[index]), nearest))
    return reports


def _checked_width(vectors: Tensor, vocabulary: Vocabulary) -> Tensor:
    if vectors.ndim != 2:
        raise EmbeddingToolError(f"expected vectors shaped [n, width], got {list(vectors.shape)}")
    if vectors.shape[1] != vocabulary.width:
        raise EmbeddingToolError(f"the vectors are {vectors.shape[1]} wide and the model's tokens "
                                 f"{vocabulary.width}: the embedding is for another model")
    return vectors.detach().float().cpu()


# -- selections --------------------------------------------------------------------------------------------------


def parse_selection(spec: str, count: int) -> list[int]:
    """Vector positions from ``"2, 0, 1:3, -1"`` (0-based; slices as Python's; negative from the end) for an
    embedding of ``count`` vectors; repeats are allowed (a vector may be used twice)."""
    positions: list[int] = []
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            continue
        try:
            if ":" in part:
                bounds = [int(b) if b.strip() else None for b in part.split(":")]
                if len(bounds) > 3:
                    raise ValueError
                positions.extend(range(count)[slice(*bounds)])
                continue
            index = int(part)
        except ValueError:
            raise EmbeddingToolError(f"vector selection {spec!r}: {part!r} is not a position or a slice "
                                     "like 1:3") from None
        if not -count <= index < count:
            raise EmbeddingToolError(f"vector selection {spec!r}: position {index} is outside 0..{count - 1} "
                                     f"({count} vectors)")
        positions.append(index % count)
    if not positions:
        raise EmbeddingToolError(f"vector selection {spec!r} selects no vector")
    return positions


def select_vectors(vectors: Tensor, *, keep: str | None = None, drop: str | None = None) -> Tensor:
    """Keep the positions ``keep`` names, in its order (reorders too), or drop the ones ``drop`` names."""
    count = int(vectors.shape[0])
    if (keep is None) == (drop is None):
        raise EmbeddingToolError("give either the vectors to keep or the vectors to drop")
    if keep is not None:
        return vectors[parse_selection(keep, count)].clone()
    dropped = set(parse_selection(str(drop), count))
    kept = [i for i in range(count) if i not in dropped]
    if not kept:
        raise EmbeddingToolError(f"dropping {drop!r} would leave no vector")
    return vectors[kept].clone()


def select_pair(vectors: Mapping[str, Tensor], *, keep: str | None = None,
                drop: str | None = None) -> dict[str, Tensor]:
    """``select_vectors`` on each half of an SDXL pair: the same positions in clip_l and clip_g."""
    return {key: select_vectors(half, keep=keep, drop=drop) for key, half in vectors.items()}


# -- the mix language --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixTerm:
    """``weight * source[selection]``: ``source`` is an embedding name, or words when ``words`` is true."""

    weight: float
    source: str
    words: bool = False
    selection: str | None = None
    weight_g: float | None = None  # ``w_l:w_g*term``: clip_g's weight (``weight`` is then clip_l's)

    def label(self) -> str:
        text = f'"{self.source}"' if self.words else self.source
        return text + (f"[{self.selection}]" if self.selection is not None else "")


_TOKEN = re.compile(r"""
    \s*(?:
      (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
    | (?P<words>"[^"]*")
    | (?P<quoted>`[^`]*`)
    | (?P<name>[^\W\d][\w.\-]*)
    | (?P<selection>\[[^\]]*\])
    | (?P<op>[*+|,:-])
    )""", re.VERBOSE)


def _tokens(expression: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    position = 0
    text = expression.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            raise EmbeddingToolError(f"mix expression: cannot read {text[position:].strip()[:20]!r} "
                                     f"(at character {position + 1})")
        kind = match.lastgroup or ""
        tokens.append((kind, match.group(kind)))
        position = match.end()
    return tokens


def parse_mix(expression: str) -> list[list[MixTerm]]:
    """The expression as concatenated sums of weighted terms (see the module's docstring)."""
    tokens = _tokens(expression)
    if not tokens:
        raise EmbeddingToolError("mix expression is empty")
    groups: list[list[MixTerm]] = [[]]
    at = 0

    def expect_term(sign: float) -> int:
        nonlocal at
        weight = sign
        if at < len(tokens) and tokens[at][0] == "op" and tokens[at][1] == "-":
            weight, at = -weight, at + 1
        weight_g: float | None = None
        if at < len(tokens) and tokens[at][0] == "number":
            if at + 2 < len(tokens) and tokens[at + 1] == ("op", ":") and tokens[at + 2][0] == "number":
                weight_g = weight * float(tokens[at + 2][1])  # w_l:w_g, SDXL's per-encoder weights
                tokens.pop(at + 1)
                tokens.pop(at + 1)
            if at + 1 >= len(tokens) or tokens[at + 1] != ("op", "*"):
                raise EmbeddingToolError(f"mix expression: a weight is written w*term, as in {tokens[at][1]}*name")
            weight *= float(tokens[at][1])
            at += 2
        if at >= len(tokens) or tokens[at][0] not in ("words", "quoted", "name"):
            found = tokens[at][1] if at < len(tokens) else "the end"
            raise EmbeddingToolError(f"mix expression: expected an embedding name or \"words\", found {found!r}")
        kind, text = tokens[at]
        at += 1
        selection = None
        if at < len(tokens) and tokens[at][0] == "selection":
            selection, at = tokens[at][1][1:-1], at + 1
        if not math.isfinite(weight) or (weight_g is not None and not math.isfinite(weight_g)):
            raise EmbeddingToolError(f"mix expression: weight {weight} is not a finite number")
        groups[-1].append(MixTerm(weight, text[1:-1] if kind != "name" else text, kind == "words", selection,
                                  weight_g))
        return at

    expect_term(1.0)
    while at < len(tokens):
        kind, text = tokens[at]
        if kind != "op" or text in "*:":
            raise EmbeddingToolError(f"mix expression: expected + - | or , before {text!r}")
        at += 1
        if text in "|,":
            groups.append([])
            expect_term(1.0)
        else:
            expect_term(1.0 if text == "+" else -1.0)
    return groups


def mix_vectors(expression: str, embeddings: Mapping[str, Tensor], vocabulary: Vocabulary | None,
                *, skipped: Mapping[str, str] | None = None, encoder: str | None = None) -> Tensor:
    """The vectors an expression makes. ``embeddings``: name -> ``[n, width]`` (names match case-insensitively, as
    prompt words do); ``vocabulary`` turns quoted words into token rows (None: words are refused); ``skipped``:
    name -> why a file of that name cannot be used, for the error naming it. ``encoder`` (``clip_l``/``clip_g``):
    the SDXL half being mixed, which picks a ``w_l:w_g`` weight; None for single-encoder embeddings."""
    by_name = {name.lower(): vectors for name, vectors in embeddings.items()}
    reasons = {name.lower(): (name, why) for name, why in (skipped or {}).items()}
    pieces: list[Tensor] = []
    width: int | None = None
    for group in parse_mix(expression):
        total: Tensor | None = None
        first: MixTerm | None = None
        for term in group:
            if term.weight_g is not None and encoder is None:
                raise EmbeddingToolError(f"{term.label()}: per-encoder weights (w_l:w_g) are for SDXL embeddings")
            weight = term.weight_g if encoder == "clip_g" and term.weight_g is not None else term.weight
            if term.words:
                if vocabulary is None:
                    raise EmbeddingToolError(f"{term.label()}: words need the model's vocabulary")
                rows = vocabulary.words(term.source)
            else:
                found = by_name.get(term.source.lower())
                if found is None and term.source.lower() in reasons:
                    name, why = reasons[term.source.lower()]
                    raise EmbeddingToolError(f"embedding {name!r} is skipped: {why}")
                if found is None:
                    raise EmbeddingToolError(f"unknown embedding {term.source!r} (words are written in quotes: "
                                             f"\"{term.source}\")")
                rows = found.detach().float().cpu()
            if term.selection is not None:
                rows = rows[parse_selection(term.selection, int(rows.shape[0]))]
            if width is not None and rows.shape[1] != width:
                raise EmbeddingToolError(f"{term.label()} is {rows.shape[1]} wide and the rest {width}: "
                                         "embeddings of different models cannot be mixed")
            width = int(rows.shape[1])
            if total is None or first is None:
                total, first = weight * rows, term
            elif rows.shape[0] != total.shape[0]:
                raise EmbeddingToolError(
                    f"cannot add {term.label()} ({rows.shape[0]} vectors) to {first.label()} "
                    f"({total.shape[0]} vectors): a sum needs equal vector counts; select vectors (name[0:2]) "
                    "or concatenate with |")
            else:
                total = total + weight * rows
        assert total is not None
        pieces.append(total)
    vectors = torch.cat(pieces)
    if vectors.shape[0] > MAX_VECTORS:
        raise EmbeddingToolError(f"the result has {vectors.shape[0]} vectors: more than the {MAX_VECTORS} tokens "
                                 "a prompt chunk holds")
    if not bool(torch.isfinite(vectors).all()):
        raise EmbeddingToolError("the result contains NaN or infinite values")
    return vectors.contiguous()


def mix_pair(expression: str, embeddings: Mapping[str, Mapping[str, Tensor]],
             vocabularies: Mapping[str, Vocabulary] | None, *, skipped: Mapping[str, str] | None = None) -> dict[str, Tensor]:
    """``mix_vectors`` for SDXL pairs: the expression made once per encoder, each from that half of the named pairs
    and words from that encoder's table (``vocabularies_of``); returns ``{"clip_l": .., "clip_g": ..}``."""
    out = {}
    for key in ("clip_l", "clip_g"):
        halves = {name: pair[key] for name, pair in embeddings.items()}
        vocabulary = vocabularies[key] if vocabularies is not None else None
        try:
            out[key] = mix_vectors(expression, halves, vocabulary, skipped=skipped, encoder=key)
        except EmbeddingToolError as exc:
            raise EmbeddingToolError(f"{key}: {exc}") from None
    return out


def mix_kind(names: Sequence[str], usable: Mapping[str, Embedding], model_sdxl: bool | None) -> bool:
    """Whether a mix of the embeddings ``names`` (and words of a model that is SDXL or not, or None) makes an SDXL
    pair; a mix of both kinds is refused (``EmbeddingToolError``)."""
    by_name = {name.lower(): emb for name, emb in usable.items()}
    kinds = {name: by_name[name.lower()].is_sdxl for name in names if name.lower() in by_name}
    if model_sdxl is not None:
        kinds["the words"] = model_sdxl
    if len(set(kinds.values())) > 1:
        pairs = ", ".join(n for n, k in kinds.items() if k)
        singles = ", ".join(n for n, k in kinds.items() if not k)
        raise EmbeddingToolError(f"cannot mix SDXL embeddings (clip_l + clip_g: {pairs}) with single-encoder SD 1.x/2.x "
                                 f"ones ({singles})")
    return any(kinds.values())


# -- writing -----------------------------------------------------------------------------------------------------


def write_embedding(folder: str | Path, name: str, vectors: Tensor | Mapping[str, Tensor], *, suffix: str = ".pt",
                    overwrite: bool = False, sd_checkpoint: str | None = None,
                    sd_checkpoint_name: str | None = None) -> Path:
    """Write ``folder/<name><suffix>`` as a regular embedding (atomic write; A1111's ``.pt`` layout by default).

    The name is checked as training checks it (``training.names``); an existing file is replaced only with
    ``overwrite``. Step 0: the vectors were made, not trained. An SDXL pair (``{"clip_l", "clip_g"}``) is written
    as ``.safetensors``, the layout every host reads for SDXL.
    """
    suffix = suffix if suffix.startswith(".") else f".{suffix}"
    if not isinstance(vectors, Tensor) and suffix.lower() != ".safetensors":
        raise EmbeddingToolError(f"format {suffix!r}: an SDXL embedding (clip_l + clip_g) is written as .safetensors")
    if suffix.lower() not in EMBEDDING_SUFFIXES:
        raise EmbeddingToolError(f"format {suffix!r}: use one of {', '.join(EMBEDDING_SUFFIXES)}")
    try:
        path = target_path(folder, name, suffix.lower())
        clean = sanitize_name(name)
    except InvalidNameError as exc:
        raise EmbeddingToolError(str(exc)) from None
    if path.exists() and not overwrite:
        raise EmbeddingToolError(f"{path} already exists (overwrite to replace it)")
    Path(folder).mkdir(parents=True, exist_ok=True)
    embedding = Embedding(name=clean, vectors=vectors, step=0, sd_checkpoint=sd_checkpoint,
                          sd_checkpoint_name=sd_checkpoint_name)
    return save_embedding(embedding, path)


def format_report(reports: Sequence[VectorReport]) -> list[str]:
    """One line per vector: ``0  norm 0.4123  triangle 0.93, square 0.41, …``."""
    return [f"{r.index}  norm {r.norm:.4f}  " + ", ".join(f"{t} {c:.2f}" for t, _, c in r.nearest) for r in reports]
