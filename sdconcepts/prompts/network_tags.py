"""Extra-network tags in a prompt, ``<hypernet:name:strength>`` (A1111 modules/extra_networks.py,
modules/extra_networks_hypernet.py)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = [
    "ExtraNetworkTag",
    "HypernetworkTag",
    "hypernetwork_tags",
    "parse_extra_network_tags",
    "parse_hypernetwork_tags",
    "tag_name_problem",
    "without_tags",
]

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


def tag_name_problem(name: str) -> str | None:
    """Why no ``<kind:name:...>`` tag can name a file called ``name``, or None: the tag ends at the first ``>`` and
    its arguments are split on ``:`` (A1111 reads ``<hypernet:hn:5.pt>`` as hypernetwork ``hn`` at strength 5)."""
    bad = "".join(dict.fromkeys(c for c in name if c in ":>"))
    if bad:
        shown = " and ".join(repr(c) for c in bad)
        return f"its name has {shown}, which end a prompt tag's name: no tag can name it (rename the file)"
    return None


def without_tags(prompt: str, drop: Callable[[ExtraNetworkTag], bool]) -> str:
    """``prompt`` with the tags for which ``drop`` is true removed (the same tags ``parse_extra_network_tags`` finds),
    everything else as it is."""

    def keep_or_drop(match: re.Match[str]) -> str:
        return "" if drop(ExtraNetworkTag(match.group(1), tuple(match.group(2).split(":")))) else match.group(0)

    return _EXTRA_NETWORK_TAG.sub(keep_or_drop, prompt)


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
