"""A prompt as 75-token chunks with embedding placeholders (A1111
sd_hijack_clip.TextConditionalModel.tokenize_line)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from sdconcepts.prompts.emphasis import parse_prompt_attention

__all__ = [
    "CHUNK_LENGTH",
    "EmbeddingEntry",
    "EmbeddingFix",
    "PromptChunk",
    "build_chunks",
    "build_embedding_index",
    "count_tokens",
]

CHUNK_LENGTH = 75
_PLACEHOLDER_ID = 0


@dataclass(frozen=True)
class EmbeddingFix:
    """An embedding placed in a chunk: its vectors replace rows ``offset + 1 ...`` of the encoder input (BOS is row 0)."""

    offset: int
    name: str
    vectors: int


@dataclass(frozen=True)
class PromptChunk:
    """77 token ids (BOS, 75 tokens/placeholders/padding, EOS), one weight per id, and the embeddings placed in it."""

    tokens: tuple[int, ...]
    multipliers: tuple[float, ...]
    fixes: tuple[EmbeddingFix, ...]


@dataclass(frozen=True)
class EmbeddingEntry:
    """An embedding as the chunker sees it: the ids of its name (tokenised without BOS/EOS) and its vector count."""

    ids: tuple[int, ...]
    name: str
    vectors: int


def build_embedding_index(entries: Iterable[EmbeddingEntry]) -> dict[int, list[EmbeddingEntry]]:
    """Group entries by their first token id, longest id sequence first (ties keep the order given, as A1111 does)."""
    index: dict[int, list[EmbeddingEntry]] = {}
    for entry in entries:
        if not entry.ids:
            raise ValueError(f"embedding {entry.name!r} has a name that tokenises to nothing; it cannot be matched")
        index.setdefault(entry.ids[0], []).append(entry)
    return {first: sorted(group, key=lambda e: -len(e.ids)) for first, group in index.items()}


class _ChunkWriter:
    """The chunk being filled and the chunks already closed."""

    def __init__(self, bos: int, eos: int) -> None:
        self.bos, self.eos = bos, eos
        self.chunks: list[PromptChunk] = []
        self.tokens: list[int] = []
        self.multipliers: list[float] = []
        self.fixes: list[EmbeddingFix] = []
        self.last_comma = -1
        self.token_count = 0

    def close(self, *, is_last: bool = False) -> None:
        # The last chunk counts only its real tokens toward the count A1111 shows; the others count 75.
        self.token_count += len(self.tokens) if is_last else CHUNK_LENGTH
        padding = max(CHUNK_LENGTH - len(self.tokens), 0)
        self.chunks.append(
            PromptChunk(
                tokens=(self.bos, *self.tokens, *[self.eos] * padding, self.eos),
                multipliers=(1.0, *self.multipliers, *[1.0] * padding, 1.0),
                fixes=tuple(self.fixes),
            )
        )
        self.tokens, self.multipliers, self.fixes = [], [], []
        self.last_comma = -1

    def backtrack_to_comma(self) -> None:
        """Close the chunk after its last comma and start the next one with what followed the comma.

        As in A1111, fixes stay with the closed chunk even when their placeholders move: A1111 then writes those
        vectors over the closed chunk's padding and leaves bare placeholder ids in the new chunk.
        """
        cut = self.last_comma + 1
        moved_tokens, moved_multipliers = self.tokens[cut:], self.multipliers[cut:]
        del self.tokens[cut:], self.multipliers[cut:]
        self.close()
        self.tokens, self.multipliers = moved_tokens, moved_multipliers


def _find_embedding(
    tokens: Sequence[int], position: int, embeddings: Mapping[int, Sequence[EmbeddingEntry]]
) -> EmbeddingEntry | None:
    candidates = embeddings.get(tokens[position])
    if not candidates:
        return None
    for entry in sorted(candidates, key=lambda e: -len(e.ids)):
        if tuple(tokens[position : position + len(entry.ids)]) == tuple(entry.ids):
            return entry
    return None


def build_chunks(
    text: str,
    tokenize: Callable[[list[str]], list[list[int]]],
    *,
    bos: int,
    eos: int,
    comma: int,
    embeddings: Mapping[int, Sequence[EmbeddingEntry]] | None = None,
    comma_backtrack: int = 20,
    emphasis: bool = True,
) -> tuple[list[PromptChunk], int]:
    """Turn one prompt line into A1111's 77-token chunks; return them and the token count A1111 shows.

    ``tokenize`` maps strings to ids without BOS/EOS or truncation. ``embeddings`` maps a first token id to candidate
    entries (tried longest first, within one emphasis segment only). ``BREAK`` closes a chunk; when a chunk is exactly
    full and the last comma is at most ``comma_backtrack`` tokens back (0 disables), what follows the comma moves to
    the next chunk; an embedding never straddles two chunks. With ``emphasis=False`` (A1111's "None" mode) brackets
    and BREAK are plain text.
    """
    segments = parse_prompt_attention(text) if emphasis else [(text, 1.0)]
    token_lists = tokenize([segment for segment, _ in segments])
    index = embeddings or {}
    writer = _ChunkWriter(bos, eos)

    for tokens, (segment, weight) in zip(token_lists, segments, strict=True):
        if segment == "BREAK" and weight == -1:
            writer.close()
            continue
        position = 0
        while position < len(tokens):
            token = int(tokens[position])
            if token == comma:
                writer.last_comma = len(writer.tokens)
            elif (
                comma_backtrack != 0
                and len(writer.tokens) == CHUNK_LENGTH
                and writer.last_comma != -1
                and len(writer.tokens) - writer.last_comma <= comma_backtrack
            ):
                writer.backtrack_to_comma()
            if len(writer.tokens) == CHUNK_LENGTH:
                writer.close()

            entry = _find_embedding(tokens, position, index)
            if entry is None:
                writer.tokens.append(token)
                writer.multipliers.append(weight)
                position += 1
                continue
            if entry.vectors > CHUNK_LENGTH:
                raise ValueError(
                    f"embedding {entry.name!r} has {entry.vectors} vectors; a prompt chunk holds at most {CHUNK_LENGTH}"
                )
            if len(writer.tokens) + entry.vectors > CHUNK_LENGTH:
                writer.close()
            writer.fixes.append(EmbeddingFix(len(writer.tokens), entry.name, entry.vectors))
            writer.tokens.extend([_PLACEHOLDER_ID] * entry.vectors)
            writer.multipliers.extend([weight] * entry.vectors)
            position += len(entry.ids)

    if writer.tokens or not writer.chunks:
        writer.close(is_last=True)
    return writer.chunks, writer.token_count


def count_tokens(
    text: str,
    tokenize: Callable[[list[str]], list[list[int]]],
    *,
    bos: int,
    eos: int,
    comma: int,
    embeddings: Mapping[int, Sequence[EmbeddingEntry]] | None = None,
    comma_backtrack: int = 20,
    emphasis: bool = True,
) -> tuple[int, int]:
    """The token counter A1111 shows: ``(tokens, limit)`` with the limit rounded up to a multiple of 75."""
    _, count = build_chunks(
        text,
        tokenize,
        bos=bos,
        eos=eos,
        comma=comma,
        embeddings=embeddings,
        comma_backtrack=comma_backtrack,
        emphasis=emphasis,
    )
    return count, math.ceil(max(count, 1) / CHUNK_LENGTH) * CHUNK_LENGTH
