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

from sdconcepts.backends.embedding_conversion import convert_skipped
from sdconcepts.embeddings.bundles import bundled_for_prompt, find_lora_files, list_bundled
from sdconcepts.embeddings.embedding import kind_mismatch
from sdconcepts.embeddings.library import usable_embeddings
from sdconcepts.generation import SAMPLERS, SEED_LIMIT, GenerationError, GenerationParams
from sdconcepts.images import next_image_path, save_png
from sdconcepts.toyworld.world import words_outside_the_world
from sdconcepts.ui.cards import (
    PAGE_SIZE,
    Card,
    Skipped,
    bundled_cards,
    embedding_cards,
    filter_cards,
    hypernetwork_cards,
    page_count,
    render_cards,
    render_skipped,
    sort_cards,
)
from sdconcepts.ui.ui_session import DEFAULT_MODEL_LABEL, XL_MODEL_LABEL, UiError, UiSession, whole_number
from sdconcepts.user_metadata import (
    SD_VERSIONS,
    UserMetadata,
    UserMetadataError,
    metadata_path,
    read_user_metadata,
    write_user_metadata,
)

__all__ = [
    "CardsView",
    "GenerateOutput",
    "MetadataForm",
    "embedding_cards_view",
    "generate",
    "generation_params",
    "hypernetwork_cards_view",
    "metadata_form",
    "random_seed",
    "reuse_seed",
    "save_metadata",
    "selected_infotext",
]

Progress = Callable[[int, int], None]


# -- cards ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CardsView:
    """What a card tab shows: one page of the cards' HTML, the skipped list's HTML and a one-line summary."""

    cards_html: str
    skipped_html: str
    summary: str
    page: int = 1
    pages: int = 1


@dataclass
class _CardList:
    """The cards of one library state, and their sorted orders (made once per state, sort and direction)."""

    key: tuple[Any, ...]
    cards: list[Card]
    skipped: list[Skipped]
    sorted: dict[tuple[str, bool], list[Card]]


def _card_list(session: UiSession, kind: str, key: tuple[Any, ...], build: Callable[[], tuple[Any, Any]]) -> _CardList:
    # Building 10,000 cards costs more than a keystroke may: keep them while the library and its settings are the same.
    cached = session.card_lists.get(kind)
    if cached is None or cached.key != key:
        cards, skipped = build()
        cached = _CardList(key, cards, skipped, {})
        session.card_lists[kind] = cached
    return cached


def _shown(listing: _CardList, query: str, sort: str, descending: bool, page: Any) -> tuple[list[Card], int, int]:
    order = listing.sorted.get((sort, descending))
    if order is None:
        order = listing.sorted[(sort, descending)] = sort_cards(listing.cards, sort, descending)
    shown = filter_cards(order, query) if query.strip() else order
    pages = page_count(len(shown))
    return shown, min(max(1, _page_number(page)), pages), pages


def _view(
    library: Any,
    list_cards: Callable[[], _CardList],
    query: str,
    sort: str,
    descending: bool,
    noun: str,
    page: Any,
) -> CardsView:
    listing = list_cards()
    shown, page, pages = _shown(listing, query, sort, descending, page)
    # A lazy scan lists files without reading them: read the page's (a page costs its own files, not the
    # library's), then list again, since a file may turn out to be skipped and another take its place.
    for _ in range(3):
        unread = [c.path for c in shown[(page - 1) * PAGE_SIZE : page * PAGE_SIZE] if c.pending]
        if not unread:
            break
        library.read(unread)
        listing = list_cards()
        shown, page, pages = _shown(listing, query, sort, descending, page)
    cards, skipped = listing.cards, listing.skipped
    empty = f"No {noun} files found. Put some in the {noun} folder and press Refresh."
    summary = f"{len(shown)} of {len(cards)} {noun}{'s' if len(cards) != 1 else ''}"
    if skipped:
        summary += f", {len(skipped)} skipped"
    if pages > 1:
        first = (page - 1) * PAGE_SIZE + 1
        summary += f"; cards {first}\u2013{min(len(shown), page * PAGE_SIZE)}, page {page} of {pages}"
    return CardsView(
        render_cards(shown, total=len(cards), empty=empty, page=page, query=query), render_skipped(skipped), summary, page, pages
    )


def _page_number(value: Any) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError, OverflowError):
        return 1


def embedding_cards_view(
    session: UiSession,
    query: str = "",
    sort: str = "Name",
    descending: bool = False,
    *,
    model_label: str | None = None,
    refresh: bool = True,
    page: int = 1,
) -> CardsView:
    """Textual Inversion tab: rescan (only changed files are read again), then filter, sort and show one page.

    Files whose width does not fit the chosen model are listed as skipped, as A1111 does.
    """
    session.note_view()
    if refresh:
        session.embeddings.refresh(lazy=True)
        session.read_in_background()
    width = session.context_width(model_label)
    # SDXL or not, as generation decides it (an SD 1.x file as wide as an SDXL pair is still skipped there).
    sdxl = session.is_sdxl(model_label)

    loras = find_lora_files(session.config.lora_dirs) if session.config.lora_dirs else {}
    lora_state = tuple(sorted((str(p), p.stat().st_mtime) for p in loras.values() if p.exists()))

    def build() -> tuple[list[Card], list[Skipped]]:
        cards, skipped = embedding_cards(session.embeddings.records(width, sdxl=sdxl), session.embeddings.folders,
                                         session.card_cache.setdefault(("embedding", width), {}))
        if loras:
            bundles, problems = list_bundled(loras, session.card_cache.setdefault("bundles", {}))
            fit = [b for b in bundles if _bundle_misfit(b.embedding, width, sdxl) is None]
            cards += bundled_cards(fit, session.config.lora_dirs)
            skipped += [Skipped(path, reason) for path, reason in problems.items()]
            skipped += [Skipped(b.lora / b.embedding.name, f"bundled in {b.lora.name}: {why}")
                        for b in bundles if (why := _bundle_misfit(b.embedding, width, sdxl)) is not None]
        return cards, skipped

    def list_cards() -> _CardList:
        return _card_list(session, "embedding", (session.embeddings.version, width, sdxl, lora_state), build)

    return _view(session.embeddings.files, list_cards, query, sort, descending, "embedding", page)


def _bundle_misfit(embedding: Any, width: int | None, sdxl: bool | None) -> str | None:
    if sdxl is not None and (reason := kind_mismatch(embedding, sdxl=sdxl)) is not None:
        return reason
    if width is not None and embedding.width != width:
        return f"width {embedding.width} does not fit the model's {width}"
    return None


def hypernetwork_cards_view(
    session: UiSession,
    query: str = "",
    sort: str = "Name",
    descending: bool = False,
    *,
    refresh: bool = True,
    page: int = 1,
) -> CardsView:
    """Hypernetworks tab: rescan, then filter, sort and show one page; a click inserts ``<hypernet:name:M>``."""
    session.note_view()
    if refresh:
        session.hypernetworks.refresh(lazy=True)
        session.read_in_background()
    multiplier = session.config.multiplier()

    def list_cards() -> _CardList:
        return _card_list(
            session, "hypernetwork", (session.hypernetworks.version, multiplier),
            lambda: hypernetwork_cards(session.hypernetworks.records(), multiplier, session.hypernetworks.folders,
                                       session.card_cache.setdefault("hypernetwork", {})),
        )

    return _view(session.hypernetworks, list_cards, query, sort, descending, "hypernetwork", page)


# -- user metadata (A1111's name.json) ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MetadataForm:
    """The metadata editor's fields for one listed file (A1111's editor fields)."""

    path: str
    title: str
    description: str
    sd_version: str
    activation_text: str
    preferred_weight: float
    negative_text: str
    notes: str
    status: str


def _listed_path(session: UiSession, value: str) -> Path:
    """``value`` when it names a file the card tabs list (the editor writes only beside those), else UiError."""
    for folder_records in (session.embeddings.files.records(), session.hypernetworks.records()):
        for record in folder_records:
            if str(record.path) == value:
                return Path(record.path)
    raise UiError(f"{value!r} is not a listed embedding or hypernetwork file; press Refresh")


def metadata_form(session: UiSession, path: str) -> MetadataForm:
    """Open the editor on a card's file: its ``.json`` fields (empty when it has none, or when it is broken: the
    status says why, and saving is refused until the file is fixed or removed)."""
    target = _listed_path(session, path or "")
    status = ""
    try:
        metadata = read_user_metadata(target) or UserMetadata()
    except UserMetadataError as exc:
        metadata, status = UserMetadata(), str(exc)
    return MetadataForm(
        path=str(target), title=f"{target.stem} \u2014 {metadata_path(target).name}",
        description=metadata.description, sd_version=metadata.sd_version or "Unknown",
        activation_text=metadata.activation_text, preferred_weight=metadata.preferred_weight,
        negative_text=metadata.negative_text, notes=metadata.notes, status=status,
    )


def save_metadata(
    session: UiSession,
    path: str,
    description: str,
    sd_version: str,
    activation_text: str,
    preferred_weight: Any,
    negative_text: str,
    notes: str,
) -> str:
    """Write the editor's fields to the file's ``.json`` (A1111's format); returns a one-line status."""
    target = _listed_path(session, path or "")
    config = session.config
    read_only = [*config.extra_embeddings_dirs, *config.extra_hypernetworks_dirs]
    if any(target.resolve().is_relative_to(Path(folder).resolve()) for folder in read_only):
        # The shipped examples live inside the package: an upgrade would replace them and lose the user's edit.
        raise UiError(f"{target.name} is a shipped example (read-only); copy it to your own folder to edit its notes")
    try:
        weight = float(preferred_weight or 0)
    except (TypeError, ValueError):
        raise UiError(f"Preferred weight must be a number, got {preferred_weight!r}") from None
    if sd_version not in SD_VERSIONS:
        raise UiError(f"unknown Stable Diffusion version {sd_version!r}; choose one of: {', '.join(SD_VERSIONS)}")
    metadata = UserMetadata(
        description=description or "", activation_text=activation_text or "", preferred_weight=weight,
        negative_text=negative_text or "", notes=notes or "", sd_version=sd_version,
    )
    try:
        written = write_user_metadata(target, metadata)
    except UserMetadataError as exc:
        raise UiError(str(exc)) from None
    return f"Saved {written.name}"


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
    seed_value = whole_number(seed if seed not in (None, "") else -1, "Seed")
    if seed_value > SEED_LIMIT:
        raise UiError(f"Seed must be at most {SEED_LIMIT}, got {seed_value}")
    try:
        cfg = float(cfg_scale)
    except (TypeError, ValueError):
        raise UiError(f"CFG scale must be a number, got {cfg_scale!r}") from None
    w, h = whole_number(width, "Width"), whole_number(height, "Height")
    if w < 0 or h < 0:
        raise UiError("Width and height must be positive (0: the model's own size)")
    return GenerationParams(
        prompt=prompt or "",
        negative_prompt=negative_prompt or "",
        steps=whole_number(steps, "Steps"),
        sampler=sampler,
        cfg_scale=cfg,
        seed=seed_value,
        width=w or None,
        height=h or None,
        batch_size=whole_number(batch_size, "Batch size"),
        batch_count=whole_number(batch_count, "Batch count"),
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


def _outside_the_toy_world(model_label: str, prompt: str) -> list[str]:
    # The embedded model draws only its world: a colour or shape it lacks silently becomes one it has.
    if model_label not in (DEFAULT_MODEL_LABEL, XL_MODEL_LABEL):
        return []
    return [f"{note} (the embedded model draws one of those instead)" for note in words_outside_the_world(prompt)]


def generate(
    session: UiSession, model_label: str, params: GenerationParams, progress: Progress | None = None,
    *, source: Any = None, compile_unet: bool = False,
) -> GenerateOutput:
    """Run txt2img on the chosen model with the session's embeddings and hypernetworks; save PNGs when configured.

    ``source`` (an ``ImageSource``: init image, mask, img2img options) makes it img2img or inpainting, on the same
    path: embeddings, hypernetworks, seeds and saving are txt2img's. ``compile_unet``: the UNet through
    torch.compile (``backends.compiled``).

    Bad values raise ``UiError`` with a one-line message; nothing is generated then.
    """
    from sdconcepts.backends.sampling import txt2img  # lazy: transformers, diffusers

    with session.generate_lock:
        session.use_cpu_threads()
        model = session.model(model_label)
        width = int(model.context_width)
        session.embeddings.refresh(lazy=True)
        # Only the embeddings the prompts name are read (a scan reads headers only); the rest stay on disk.
        used_in = f"{params.prompt}\n{params.negative_prompt}"
        usable, skipped_embeddings = usable_embeddings(
            session.embeddings, width, sdxl=model.is_sdxl, used_in=used_in,
            encoder_widths=getattr(model, "encoder_widths", None),
        )
        if session.config.lora_dirs:  # A1111: a LoRA in the prompt brings its bundled embeddings
            bundled, bundle_skips = bundled_for_prompt(
                params.prompt, find_lora_files(session.config.lora_dirs), usable, width=width, sdxl=model.is_sdxl,
                encoder_widths=getattr(model, "encoder_widths", None))
            usable, skipped_embeddings = {**usable, **bundled}, {**skipped_embeddings, **bundle_skips}
        converted: dict[str, Any] = {}
        if session.convert_sd1_on_sdxl and model.is_sdxl and skipped_embeddings:
            converted, skipped_embeddings = convert_skipped(session.embeddings, model, session.token_maps,
                                                            skipped_embeddings, used_in)
            usable = {**usable, **converted}
        session.hypernetworks.refresh(lazy=True)
        resolved, warnings = session.resolve_hypernetworks(params.prompt, model.unet)
        try:
            result = txt2img(
                model,
                params,
                embeddings={n: e.joined() for n, e in usable.items()},
                embedding_hashes={n: e.hash for n, e in usable.items() if e.hash},
                skipped_embeddings=skipped_embeddings,
                hypernetworks=resolved,
                hypernetwork_hashes=session.hypernetwork_hashes(resolved),
                progress=progress,
                source=source,
                converted_embeddings=set(converted),
                compile_unet=compile_unet,
            )
        except GenerationError as exc:
            raise UiError(str(exc)) from exc
    saved: list[Path] = []
    outputs = session.config.outputs_dir
    if source is not None and session.config.img2img_outputs_dir is not None:
        outputs = session.config.img2img_outputs_dir
    if outputs is not None:
        for image, infotext, seed in zip(result.images, result.infotexts, result.seeds, strict=True):
            saved.append(save_png(image, next_image_path(outputs, seed), infotext))
    return GenerateOutput(
        images=list(result.images),
        captions=[f"seed {s}" for s in result.seeds],
        infotexts=list(result.infotexts),
        seeds=list(result.seeds),
        warnings=[session.readable(w) for w in
                  [*warnings, *result.warnings, *_outside_the_toy_world(model_label, params.prompt)]],
        saved=saved,
    )
