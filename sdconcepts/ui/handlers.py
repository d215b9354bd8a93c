"""The web UI's event handlers as plain functions: they take and return plain values, and never import gradio.

``ui.app`` wires them to components; tests call them directly.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from sdconcepts.generation import MAX_SEED, SAMPLERS, GenerationError, GenerationParams
from sdconcepts.prompts import parse_extra_network_tags
from sdconcepts.ui.cards import (
    embedding_cards,
    filter_cards,
    hypernetwork_cards,
    render_cards,
    render_skipped,
    sort_cards,
)
from sdconcepts.ui.session import UiError, UiSession

__all__ = [
    "CardsView",
    "GenerateOutput",
    "embedding_cards_view",
    "generate",
    "generation_params",
    "hypernetwork_cards_view",
    "random_seed",
    "reuse_seed",
    "selected_infotext",
]

Progress = Callable[[int, int], None]


# -- cards ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CardsView:
    """What a card tab shows: the cards' HTML, the skipped list's HTML and a one-line summary."""

    cards_html: str
    skipped_html: str
    summary: str


def _view(cards: list[Any], skipped: list[Any], query: str, sort: str, descending: bool, noun: str) -> CardsView:
    shown = sort_cards(filter_cards(cards, query), sort, descending)
    empty = f"No {noun} files found. Put some in the {noun} folder and press Refresh."
    summary = f"{len(shown)} of {len(cards)} {noun}{'s' if len(cards) != 1 else ''}"
    if skipped:
        summary += f", {len(skipped)} skipped"
    return CardsView(render_cards(shown, total=len(cards), empty=empty), render_skipped(skipped), summary)


def embedding_cards_view(
    session: UiSession,
    query: str = "",
    sort: str = "Name",
    descending: bool = False,
    *,
    model_label: str | None = None,
    refresh: bool = True,
) -> CardsView:
    """Textual Inversion tab: rescan (only changed files load again), then filter and sort.

    Files whose width does not fit the chosen model are listed as skipped, as A1111 does.
    """
    if refresh:
        session.embeddings.refresh()
    records = session.embeddings.records(session.context_width(model_label))
    cards, skipped = embedding_cards(records, session.embeddings.folders)
    return _view(cards, skipped, query, sort, descending, "embedding")


def hypernetwork_cards_view(
    session: UiSession, query: str = "", sort: str = "Name", descending: bool = False, *, refresh: bool = True
) -> CardsView:
    """Hypernetworks tab: rescan, then filter and sort; a click inserts ``<hypernet:name:M>``."""
    if refresh:
        session.hypernetworks.refresh()
    cards, skipped = hypernetwork_cards(
        session.hypernetworks.records(), session.config.multiplier(), session.hypernetworks.folders
    )
    return _view(cards, skipped, query, sort, descending, "hypernetwork")


# -- seeds and gallery selection ------------------------------------------------------------------------------


def random_seed() -> int:
    """The dice button: -1 asks for a new random seed on every run, as in A1111."""
    return -1


def reuse_seed(seeds: Sequence[int] | None, index: int | None, current: float | int = -1) -> int:
    """The recycle button: the seed of the selected image (the first one when none is selected)."""
    if not seeds:
        return int(current)
    if index is None or not 0 <= index < len(seeds):
        index = 0
    return int(seeds[index])


def selected_infotext(infotexts: Sequence[str] | None, index: int | None) -> str:
    """The infotext of the gallery image at ``index`` (empty when there is none)."""
    if not infotexts or index is None or not 0 <= index < len(infotexts):
        return ""
    return infotexts[index]


# -- txt2img -------------------------------------------------------------------------------------------------


def _whole(value: Any, label: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UiError(f"{label} must be a number, got {value!r}") from None
    if not number.is_integer():
        raise UiError(f"{label} must be a whole number, got {value}")
    return int(number)


def generation_params(
    prompt: str,
    negative_prompt: str,
    sampler: str,
    steps: Any,
    cfg_scale: Any,
    seed: Any,
    width: Any,
    height: Any,
    batch_size: Any,
    batch_count: Any,
) -> GenerationParams:
    """The form's values as ``GenerationParams``; width or height 0 means the model's own size."""
    if sampler not in SAMPLERS:
        raise UiError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    seed_value = _whole(seed if seed not in (None, "") else -1, "Seed")
    if seed_value > MAX_SEED:
        raise UiError(f"Seed must be at most {MAX_SEED}, got {seed_value}")
    try:
        cfg = float(cfg_scale)
    except (TypeError, ValueError):
        raise UiError(f"CFG scale must be a number, got {cfg_scale!r}") from None
    w, h = _whole(width, "Width"), _whole(height, "Height")
    if w < 0 or h < 0:
        raise UiError("Width and height must be positive (0: the model's own size)")
    return GenerationParams(
        prompt=prompt or "",
        negative_prompt=negative_prompt or "",
        steps=_whole(steps, "Steps"),
        sampler=sampler,
        cfg_scale=cfg,
        seed=seed_value,
        width=w or None,
        height=h or None,
        batch_size=_whole(batch_size, "Batch size"),
        batch_count=_whole(batch_count, "Batch count"),
    )


@dataclass(frozen=True)
class GenerateOutput:
    images: list[Image.Image]
    captions: list[str]
    infotexts: list[str]
    seeds: list[int]
    warnings: list[str]
    saved: list[Path]

    @property
    def gallery(self) -> list[tuple[Image.Image, str]]:
        return list(zip(self.images, self.captions, strict=True))

    @property
    def first_infotext(self) -> str:
        return self.infotexts[0] if self.infotexts else ""

    @property
    def warnings_html(self) -> str:
        return render_warnings(self.warnings)


def render_warnings(warnings: Sequence[str]) -> str:
    if not warnings:
        return ""
    items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
    return f'<div class="sdconcepts-warnings"><strong>Warnings</strong><ul>{items}</ul></div>'


def generate(
    session: UiSession, model_label: str, params: GenerationParams, progress: Progress | None = None,
    *, source: Any = None,
) -> GenerateOutput:
    """Run txt2img on the chosen model with the session's embeddings and hypernetworks; save PNGs when configured.

    ``source`` (an ``ImageSource``: init image, mask, img2img options) makes it img2img or inpainting, on the same
    path: embeddings, hypernetworks, seeds and saving are txt2img's.

    Bad values raise ``UiError`` with a one-line message; nothing is generated then.
    """
    from sdconcepts.backends.diffusers import txt2img
    from sdconcepts.images import next_image_path, save_png

    with session.generate_lock:
        model = session.model(model_label)
        width = int(model.context_width)
        session.embeddings.refresh()
        usable = {n: e for n, e in session.embeddings.usable(width).items() if not e.is_sdxl}
        taken = {n.lower() for n in usable}
        skipped_embeddings = {
            n: reason for n, reason in session.embeddings.skipped(width).items() if n.lower() not in taken
        }
        session.hypernetworks.refresh()
        records = session.hypernetworks.records()
        # A skipped file's name is known (the backend says it "could not be loaded"); say why, as the tab does.
        warnings = [
            f"hypernetwork file {r.path} was skipped: {r.error}"
            for r in records
            if r.item is None and f"<hypernet:{r.name}:" in params.prompt
        ]
        # The records hold metadata only; the hypernetworks the prompt names are loaded now (as A1111 does).
        _, tags = parse_extra_network_tags(params.prompt)
        named = [t.args[0] for t in tags if t.name == "hypernet" and t.args]
        loaded, load_warnings = session.load_hypernetworks(records, named)
        warnings += load_warnings
        try:
            result = txt2img(
                model,
                params,
                embeddings={n: e.tensor() for n, e in usable.items()},
                embedding_hashes={n: e.hash for n, e in usable.items() if e.hash},
                skipped_embeddings=skipped_embeddings,
                known_networks={"hypernet": [r.name for r in records]},
                hypernetworks=loaded,
                progress=progress,
                source=source,
            )
        except GenerationError as exc:
            raise UiError(str(exc)) from exc
    saved: list[Path] = []
    outputs = session.config.outputs_dir
    if outputs is not None:
        for image, infotext, seed in zip(result.images, result.infotexts, result.seeds, strict=True):
            saved.append(save_png(image, next_image_path(outputs, seed), infotext))
    return GenerateOutput(
        images=list(result.images),
        captions=[f"seed {s}" for s in result.seeds],
        infotexts=list(result.infotexts),
        seeds=list(result.seeds),
        warnings=[*warnings, *result.warnings],
        saved=saved,
    )
