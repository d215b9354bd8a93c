"""A prompt's ``<hypernet:name:strength>`` tags resolved once, by the caller, into the chain that sampling applies.

``resolve_hypernetworks`` is the one place that turns tags into ``[(Hypernetwork, strength), ...]`` (prompt order)
and words the warnings about them (unknown name, file that fails to load, file whose widths fit no attention layer
of the model), for the web UI, the CLI and the Forge adapter alike. The standalone engine (``backends.sampling``)
takes the result; Forge's adapter hands the chain to its UNet patch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from sdconcepts.hypernetworks.attach import attention_widths
from sdconcepts.hypernetworks.files import HypernetworkFileError
from sdconcepts.hypernetworks.hypernetwork import Hypernetwork, width_mismatch
from sdconcepts.prompts.network_tags import ExtraNetworkTag, hypernetwork_tags, parse_extra_network_tags

__all__ = ["ResolvedHypernetworks", "SkippedFile", "resolve_hypernetworks", "resolve_in_memory"]

F = TypeVar("F")  # what a name is found as: a file's Path (or, for a trainer's preview, the name itself)

Chain = list[tuple[Hypernetwork, float]]


@dataclass(frozen=True)
class SkippedFile(Generic[F]):
    """A file a tag names that failed to load: ``reason`` is the loader's message (it names the file)."""

    name: str
    file: F
    reason: str

    def cli_warning(self) -> str:
        """The CLI's stderr line for it (printed as it happens, before sampling)."""
        return f"warning: skipped hypernetwork {self.name}: {self.reason}"

    def ui_warning(self) -> str:
        """The web UI's warning for it: the reason without the path it starts with, the path said first."""
        prefix = f"{self.file}: "
        reason = self.reason[len(prefix) :] if self.reason.startswith(prefix) else self.reason
        return f"hypernetwork file {self.file} was skipped: {reason}"


@dataclass
class ResolvedHypernetworks(Generic[F]):
    """What a prompt's tags resolved to.

    ``chain``: (hypernetwork, strength) in prompt order, what sampling applies. ``warnings``: about the tags, in the
    order they are said. ``skipped``: named files that failed to load, first use first. ``used``: (name, file) of the
    hypernetworks loaded, first use first. ``error``: a tag that cannot be read (a strength that is not a finite
    number) on the standalone engine, which refuses the generation with it; the chain is then empty.
    """

    chain: Chain = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped: list[SkippedFile[F]] = field(default_factory=list)
    used: list[tuple[str, F]] = field(default_factory=list)
    error: str | None = None


def resolve_hypernetworks(
    tags: Iterable[ExtraNetworkTag],
    find: Callable[[str], F | None],
    load: Callable[[F], Hypernetwork],
    *,
    widths: Callable[[], Iterable[int]] | None = None,
    forge_folder: Callable[[], Path] | None = None,
) -> ResolvedHypernetworks[F]:
    """Resolve ``tags`` (a prompt's extra-network tags, prompt order) through ``find`` (name -> file, None when no
    file has that name) and ``load`` (file -> hypernetwork; ``HypernetworkFileError`` when it cannot).

    ``widths`` gives the model's attention key widths: a hypernetwork fitting none of them is warned about.

    The standalone engine (``forge_folder`` None) follows A1111's extra-network semantics: every tag is removed from
    the prompt, and one naming no known network (of any kind: only hypernetworks are known) is warned about; each
    name is loaded once; a hypernetwork that fits no layer stays in the chain (it has no effect) and is warned about
    once. Inside Forge (``forge_folder`` gives its hypernetwork folder) each ``hypernet`` tag is resolved on its own, a
    bad one warned about and left out, in tag order.
    """
    if forge_folder is not None:
        return _bounded(_resolve_forge(tags, find, load, widths, forge_folder))
    tags = list(tags)
    result: ResolvedHypernetworks[F] = ResolvedHypernetworks()
    loaded: dict[str, Hypernetwork] = {}
    known: set[str] = set()
    for tag in tags:
        name = tag.args[0] if tag.args else ""
        if tag.name != "hypernet" or name in known:
            continue
        file = find(name)
        if file is None:
            continue
        known.add(name)
        try:
            loaded[name] = load(file)
        except HypernetworkFileError as exc:
            result.skipped.append(SkippedFile(name, file, str(exc)))
            continue
        result.used.append((name, file))
    for tag in tags:
        name = tag.args[0] if tag.args else ""
        if tag.name != "hypernet" or name not in known:
            result.warnings.append(f"unknown {tag.name} {name!r}: the tag was removed from the prompt and has no effect")
        elif name not in loaded:
            result.warnings.append(
                f"hypernet {name!r} could not be loaded: the tag was removed from the prompt and has no effect"
            )
    try:
        used = hypernetwork_tags(tags)
    except ValueError as exc:
        result.error = str(exc)
        return _bounded(result)
    result.chain = [(loaded[t.name], t.strength) for t in used if t.name in loaded]
    if result.chain and widths is not None:
        model_widths = set(widths())
        for t in used:
            mismatch = width_mismatch(t.name, loaded[t.name], model_widths) if t.name in loaded else None
            if mismatch is not None and mismatch not in result.warnings:
                result.warnings.append(mismatch)
    return _bounded(result)


# A prompt with 10,000 unknown tags printed 10,000 warning lines: the first ones say what is wrong.
MAX_TAG_WARNINGS = 10


def _bounded(result: ResolvedHypernetworks[F]) -> ResolvedHypernetworks[F]:
    """``result`` with each warning said once and at most MAX_TAG_WARNINGS of them, the rest counted."""
    unique = list(dict.fromkeys(result.warnings))
    if len(unique) > MAX_TAG_WARNINGS:
        rest = len(unique) - MAX_TAG_WARNINGS
        unique = [*unique[:MAX_TAG_WARNINGS], f"... and {rest} more warning{'s' if rest != 1 else ''} about tags"]
    result.warnings = unique
    return result


def resolve_in_memory(
    prompt: str, hypernetworks: Mapping[str, Hypernetwork], unet: Any = None
) -> ResolvedHypernetworks[str]:
    """The standalone engine's resolution of ``prompt``'s tags when the known hypernetworks are already loaded
    (name -> hypernetwork: a trainer's preview, tests); ``unet`` (None: no check) gives the widths they must fit."""
    _, tags = parse_extra_network_tags(prompt)

    def find(name: str) -> str | None:
        return name if name in hypernetworks else None

    return resolve_hypernetworks(
        tags, find, hypernetworks.__getitem__, widths=None if unet is None else (lambda: attention_widths(unet))
    )


def _resolve_forge(
    tags: Iterable[ExtraNetworkTag],
    find: Callable[[str], F | None],
    load: Callable[[F], Hypernetwork],
    widths: Callable[[], Iterable[int]] | None,
    folder: Callable[[], Path],
) -> ResolvedHypernetworks[F]:
    result: ResolvedHypernetworks[F] = ResolvedHypernetworks()
    model_widths: set[int] | None = None
    for extra in tags:
        if extra.name != "hypernet" or not extra.args:
            continue
        try:
            (tag,) = hypernetwork_tags([extra])
        except ValueError as exc:
            result.warnings.append(f"{exc}; the tag has no effect")
            continue
        file = find(tag.name)
        if file is None:
            result.warnings.append(f"unknown hypernet {tag.name!r}: no such file in {folder()}; the tag has no effect")
            continue
        try:
            hypernetwork = load(file)
        except (HypernetworkFileError, OSError) as exc:
            result.skipped.append(SkippedFile(tag.name, file, str(exc)))
            result.warnings.append(f"hypernet {tag.name!r} could not be loaded ({exc}); the tag has no effect")
            continue
        if model_widths is None:
            model_widths = set(widths()) if widths is not None else set()
        mismatch = width_mismatch(tag.name, hypernetwork, model_widths) if widths is not None else None
        if mismatch is not None:
            result.warnings.append(mismatch)
            continue
        result.chain.append((hypernetwork, tag.strength))
        if tag.name not in [n for n, _ in result.used]:
            result.used.append((tag.name, file))
    return result
