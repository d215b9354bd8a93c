"""A1111's prompt syntax as pure functions: extra-network tags, emphasis weights, BREAK, prompt editing and 75-token chunks."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "CHUNK_LENGTH",
    "EmbeddingEntry",
    "EmbeddingFix",
    "ExtraNetworkTag",
    "HypernetworkTag",
    "PromptChunk",
    "build_chunks",
    "build_embedding_index",
    "count_tokens",
    "get_prompt_schedule",
    "get_prompt_schedules",
    "hypernetwork_tags",
    "parse_extra_network_tags",
    "parse_hypernetwork_tags",
    "parse_prompt_attention",
    "text_at_step",
]

# ---------------------------------------------------------------------------------------------------------------------
# Extra-network tags (A1111 modules/extra_networks.py, modules/extra_networks_hypernet.py)
# ---------------------------------------------------------------------------------------------------------------------

# A1111's tag pattern: a word, a colon, then anything up to the first '>'.
_EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class ExtraNetworkTag:
    """One ``<name:arg1:arg2...>`` tag; ``name`` is the network kind (``hypernet``, ``lora``, ...)."""

    name: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class HypernetworkTag:
    """A ``<hypernet:name:strength>`` tag resolved to its name and strength."""

    name: str
    strength: float


def parse_extra_network_tags(prompt: str) -> tuple[str, list[ExtraNetworkTag]]:
    """Remove every ``<word:args>`` tag from ``prompt``; return the stripped text and the tags in prompt order.

    As in A1111, every tag is removed whether or not anything handles its kind, nothing else (such as surrounding
    whitespace) is touched, and the arguments are split on ``:``.
    """
    tags: list[ExtraNetworkTag] = []

    def take(match: re.Match[str]) -> str:
        tags.append(ExtraNetworkTag(match.group(1), tuple(match.group(2).split(":"))))
        return ""

    return _EXTRA_NETWORK_TAG.sub(take, prompt), tags


def hypernetwork_tags(tags: Iterable[ExtraNetworkTag], *, default_strength: float = 1.0) -> list[HypernetworkTag]:
    """Resolve the ``hypernet`` tags among ``tags``: the first argument names it, the second is its strength.

    A missing strength is ``default_strength``; A1111's handler hard-codes 1.0 there (its "default multiplier" setting
    only feeds the tag it appends for the "Add hypernetwork to prompt" setting), so keep the default for exact behaviour.
    Strengths are read with Python's ``float`` as A1111 does (negative values allowed; extra arguments ignored), but
    ``inf`` and ``nan`` are refused with a ValueError naming the tag.
    """
    result: list[HypernetworkTag] = []
    for tag in tags:
        if tag.name != "hypernet":
            continue
        strength = default_strength
        if len(tag.args) > 1:
            try:
                strength = float(tag.args[1])
            except ValueError:
                raise ValueError(
                    f"hypernetwork tag <hypernet:{':'.join(tag.args)}> has strength {tag.args[1]!r}; expected a number"
                ) from None
            # A1111 takes inf and nan too, and sampling then fails with NaN latents ("try another sampler") far from
            # the cause; name the tag instead.
            if not math.isfinite(strength):
                raise ValueError(
                    f"hypernetwork tag <hypernet:{':'.join(tag.args)}> has strength {tag.args[1]!r}; "
                    "expected a finite number"
                )
        result.append(HypernetworkTag(tag.args[0], strength))
    return result


def parse_hypernetwork_tags(prompt: str, *, default_strength: float = 1.0) -> tuple[str, list[HypernetworkTag]]:
    """Strip all extra-network tags from ``prompt`` and return the stripped text with its hypernetwork tags."""
    text, tags = parse_extra_network_tags(prompt)
    return text, hypernetwork_tags(tags, default_strength=default_strength)


# ---------------------------------------------------------------------------------------------------------------------
# Emphasis: (x), (x:1.3), [x], escapes and BREAK (A1111 prompt_parser.parse_prompt_attention)
# ---------------------------------------------------------------------------------------------------------------------

_ROUND_MULTIPLIER = 1.1
_SQUARE_MULTIPLIER = 1 / 1.1

# The lexemes A1111 recognises, tried in this order: an escape (a lone backslash escapes nothing and vanishes), an
# opening bracket, ':<number>)' closing a weighted group, a closing bracket, a run of other text, a lone colon.
_ATTENTION_LEXEME = re.compile(
    r"""
    \\[()\[\]\\]?
    | [(\[]
    | :\s*([+-]?[.\d]+)\s*\)
    | [)\]]
    | [^\\()\[\]:]+
    | :
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into ``(segment, weight)`` pairs following A1111's emphasis rules exactly.

    ``(x)`` multiplies by 1.1, ``(x:w)`` by ``w``, ``[x]`` divides by 1.1; nesting multiplies; ``\\(`` ``\\)`` ``\\[``
    ``\\]`` ``\\\\`` are literal; unclosed brackets are closed at the end (round ones first); a closing bracket with
    nothing open, or ``:w)`` with no ``(`` open, is literal text; adjacent equal weights merge. ``BREAK`` (upper-case,
    a whole word) yields ``("BREAK", -1.0)``; inside brackets that -1 is multiplied like any weight (so A1111 no
    longer treats it as BREAK). A weight such as ``(x:1.2.3)`` that Python cannot read raises ``ValueError``, where
    A1111 fails the whole generation.
    """
    segments: list[str] = []
    weights: list[float] = []  # one per segment, multiplied in place as brackets close
    open_round: list[int] = []
    open_square: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for index in range(start, len(weights)):
            weights[index] *= multiplier

    def add(segment: str, weight: float) -> None:
        segments.append(segment)
        weights.append(weight)

    for match in _ATTENTION_LEXEME.finditer(text):
        lexeme, weight = match.group(0), match.group(1)
        if lexeme.startswith("\\"):
            add(lexeme[1:], 1.0)
        elif lexeme == "(":
            open_round.append(len(segments))
        elif lexeme == "[":
            open_square.append(len(segments))
        elif weight is not None and open_round:
            try:
                value = float(weight)
            except ValueError:
                raise ValueError(f"emphasis weight {weight!r} in prompt {text!r} is not a number") from None
            multiply_from(open_round.pop(), value)
        elif lexeme == ")" and open_round:
            multiply_from(open_round.pop(), _ROUND_MULTIPLIER)
        elif lexeme == "]" and open_square:
            multiply_from(open_square.pop(), _SQUARE_MULTIPLIER)
        else:
            for index, piece in enumerate(_BREAK.split(lexeme)):
                if index > 0:
                    add("BREAK", -1.0)
                add(piece, 1.0)

    for start in open_round:
        multiply_from(start, _ROUND_MULTIPLIER)
    for start in open_square:
        multiply_from(start, _SQUARE_MULTIPLIER)

    merged: list[tuple[str, float]] = []
    for segment, weight_value in zip(segments, weights, strict=True):
        if merged and merged[-1][1] == weight_value:
            merged[-1] = (merged[-1][0] + segment, weight_value)
        else:
            merged.append((segment, weight_value))
    return merged or [("", 1.0)]


# ---------------------------------------------------------------------------------------------------------------------
# Prompt editing [from:to:when] and alternation [a|b] (A1111 get_learned_conditioning_prompt_schedules)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Edit:
    """``[before:after:when]``; ``before`` is empty for ``[after:when]``."""

    before: tuple[_Part, ...]
    after: tuple[_Part, ...]
    when: str  # the number as written; its meaning depends on the step counts


@dataclass(frozen=True)
class _Alternation:
    options: tuple[tuple[_Part, ...], ...]


_Part = str | _Edit | _Alternation


class _NoParse(Exception):
    """The text at this position is not a valid construct."""


# A1111's grammar ends an edit with ':' [whitespace] SIGNED_NUMBER [whitespace] ']' (lark's number: ASCII digits, an
# optional fraction and exponent).
_EDIT_END = re.compile(r"\s*([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*\]")
_STOP = frozenset("]:|)")


class _ScheduleParser:
    """Recursive descent over A1111's prompt-editing grammar.

    Inside a bracket every bracket must pair up; at the top level a bracket, parenthesis or colon that does not start
    a valid construct is kept as literal text. A ``|`` outside an alternation, or a backslash that escapes nothing,
    makes the whole prompt unparseable (A1111 then uses it literally). Where a construct is directly followed by a
    stray ``] ) :`` (``[a:1]]``), A1111's lark parser is ambiguous and its answer changes with ``PYTHONHASHSEED``; we
    always take the construct, as A1111's own examples do.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self._squares: dict[int, tuple[list[_Part], int] | None] = {}

    def parse(self) -> list[_Part]:
        text, out, pos = self.text, [], 0
        while pos < len(text):
            char = text[pos]
            if char == "[":
                parsed = self._square(pos)
                if parsed is not None:
                    out.extend(parsed[0])
                    pos = parsed[1]
                    continue
            if char in "[]():":
                out.append(char)
                pos += 1
            elif char == "|":
                raise _NoParse
            else:
                pos = self._plain(pos, out)
        return out

    def _plain(self, pos: int, out: list[_Part]) -> int:
        text = self.text
        if text[pos] == "\\":
            if pos + 1 >= len(text) or text[pos + 1] == "\n":
                raise _NoParse
            out.append(text[pos : pos + 2])
            return pos + 2
        out.append(text[pos])
        return pos + 1

    def _items(self, pos: int) -> tuple[list[_Part], int]:
        """A bracket's content up to the next unpaired ``] : | )`` or the end."""
        text, out = self.text, []
        while pos < len(text) and text[pos] not in _STOP:
            if text[pos] == "[":
                parsed = self._square(pos)
                if parsed is None:
                    raise _NoParse
                out.extend(parsed[0])
                pos = parsed[1]
            elif text[pos] == "(":
                pos = self._round(pos, out)
            else:
                pos = self._plain(pos, out)
        return out, pos

    def _expect(self, pos: int, char: str) -> int:
        if pos >= len(self.text) or self.text[pos] != char:
            raise _NoParse
        return pos + 1

    def _round(self, pos: int, out: list[_Part]) -> int:
        """``(x)`` or ``(x:y)``, kept as text (emphasis is not this parser's business)."""
        inner, pos = self._items(pos + 1)
        out.append("(")
        out.extend(inner)
        if pos < len(self.text) and self.text[pos] == ":":
            inner, pos = self._items(pos + 1)
            out.append(":")
            out.extend(inner)
        pos = self._expect(pos, ")")
        out.append(")")
        return pos

    def _square(self, start: int) -> tuple[list[_Part], int] | None:
        """The construct opening at ``start`` (memoised: it does not depend on the caller), or None."""
        if start not in self._squares:
            try:
                self._squares[start] = self._square_uncached(start)
            except _NoParse:
                self._squares[start] = None
        return self._squares[start]

    def _square_uncached(self, start: int) -> tuple[list[_Part], int]:
        text = self.text
        first, pos = self._items(start + 1)
        char = text[pos] if pos < len(text) else ""
        if char == "]":
            return ["[", *first, "]"], pos + 1
        if char == "|":
            options = [tuple(first)]
            while pos < len(text) and text[pos] == "|":
                option, pos = self._items(pos + 1)
                options.append(tuple(option))
            return [_Alternation(tuple(options))], self._expect(pos, "]")
        if char != ":":
            raise _NoParse
        end = _EDIT_END.match(text, pos + 1)
        if end is not None:
            return [_Edit((), tuple(first), end.group(1))], end.end()
        second, pos = self._items(pos + 1)
        pos = self._expect(pos, ":")
        end = _EDIT_END.match(text, pos)
        if end is None:
            raise _NoParse
        return [_Edit(tuple(first), tuple(second), end.group(1))], end.end()


def _parse_schedule(prompt: str) -> list[_Part] | None:
    try:
        return _ScheduleParser(prompt).parse()
    except (_NoParse, RecursionError):
        return None


def _resolve_when(number: str, steps: int, int_offset: int, float_offset: float, old: bool) -> int:
    """The last step (1-based) at which the 'before' text applies; below 1 means never."""
    value = float(number)
    if old:
        value = value * steps if value < 1 else value
    elif "." in number:
        value = (value - float_offset) * steps
    else:
        value = value - int_offset
    if value >= steps:
        return steps
    return int(value) if value > -1 else -1  # every value below 1 behaves the same; this also keeps -inf finite


def _render(parts: Sequence[_Part], step: int, whens: Mapping[int, int], out: list[str]) -> None:
    for part in parts:
        if isinstance(part, str):
            out.append(part)
        elif isinstance(part, _Edit):
            _render(part.before if step <= whens[id(part)] else part.after, step, whens, out)
        else:
            _render(part.options[(step - 1) % len(part.options)], step, whens, out)


def _collect(parts: Sequence[_Part], found: list[_Edit | _Alternation]) -> None:
    for part in parts:
        if isinstance(part, _Edit):
            found.append(part)
            _collect(part.before, found)
            _collect(part.after, found)
        elif isinstance(part, _Alternation):
            found.append(part)
            for option in part.options:
                _collect(option, found)


def get_prompt_schedule(
    prompt: str, steps: int, *, hires_steps: int | None = None, use_old_scheduling: bool = False
) -> list[tuple[int, str]]:
    """The ``(end_step, text)`` schedule A1111 builds for one prompt (``get_learned_conditioning_prompt_schedules``).

    ``[from:to:when]`` switches after ``when``, ``[to:when]`` adds and ``[from::when]`` removes text; ``[a|b|c]``
    changes text every step. A ``when`` written with a ``.`` is a fraction of the steps (``int(v * steps)``), otherwise
    a step number. Emphasis brackets pass through unchanged. A prompt that does not parse is used literally.
    ``hires_steps``/``use_old_scheduling`` mirror A1111's hires-fix pass and its legacy scheduling option.
    """
    if hires_steps is None or use_old_scheduling:
        int_offset, float_offset = 0, 0.0
    else:
        int_offset, float_offset, steps = steps, 1.0, hires_steps
    parts = _parse_schedule(prompt)
    if parts is None:
        return [(steps, prompt)]
    constructs: list[_Edit | _Alternation] = []
    _collect(parts, constructs)
    whens: dict[int, int] = {}
    ends = {steps}
    for construct in constructs:
        if isinstance(construct, _Edit):
            when = _resolve_when(construct.when, steps, int_offset, float_offset, use_old_scheduling)
            whens[id(construct)] = when
            if when >= 1:
                ends.add(when)
        else:
            ends.update(range(1, steps + 1))
    schedule = []
    for end in sorted(ends):
        out: list[str] = []
        _render(parts, end, whens, out)
        schedule.append((end, "".join(out)))
    return schedule


def get_prompt_schedules(
    prompts: Sequence[str], steps: int, *, hires_steps: int | None = None, use_old_scheduling: bool = False
) -> list[list[tuple[int, str]]]:
    """:func:`get_prompt_schedule` for each prompt (each distinct prompt is parsed once)."""
    cache: dict[str, list[tuple[int, str]]] = {}
    for prompt in prompts:
        if prompt not in cache:
            cache[prompt] = get_prompt_schedule(
                prompt, steps, hires_steps=hires_steps, use_old_scheduling=use_old_scheduling
            )
    return [list(cache[prompt]) for prompt in prompts]


def text_at_step(schedule: Sequence[tuple[int, str]], step: int) -> str:
    """The text in force at 0-based sampling ``step``, by A1111's rule (``reconstruct_cond_batch``).

    A1111 takes the first entry with ``step <= end_step`` and falls back to the first entry. Because its step counter
    starts at 0 while end steps count from 1, an entry ending at step ``n`` is used for ``n + 1`` calls
    (``a [b:3]`` at 10 steps gives ``a `` for steps 0-3).
    """
    if not schedule:
        raise ValueError("a prompt schedule has at least one entry")
    for end, text in schedule:
        if step <= end:
            return text
    return schedule[0][1]


# ---------------------------------------------------------------------------------------------------------------------
# 75-token chunks with embedding placeholders (A1111 sd_hijack_clip.TextConditionalModel.tokenize_line)
# ---------------------------------------------------------------------------------------------------------------------

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
