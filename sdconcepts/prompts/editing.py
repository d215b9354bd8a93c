"""Prompt editing [from:to:when] and alternation [a|b] as per-step schedules (A1111
get_learned_conditioning_prompt_schedules)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["get_prompt_schedule", "get_prompt_schedules", "text_at_step"]


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
