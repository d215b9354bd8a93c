"""Emphasis in a prompt: (x), (x:1.3), [x], escapes and BREAK (A1111 prompt_parser.parse_prompt_attention)."""

from __future__ import annotations

import re

__all__ = ["parse_prompt_attention"]

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
