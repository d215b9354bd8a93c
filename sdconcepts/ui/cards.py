"""Extra-network cards as the UI shows them: built from library records, filtered, sorted and rendered to HTML.

Pure functions (no gradio): the Textual Inversion and Hypernetworks tabs call these from their handlers. A card's
``prompt`` is the text a click toggles in the prompt (``javascript/sdconcepts.js`` does the toggling in the browser).
"""

from __future__ import annotations

import base64
import html
import io
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from sdconcepts.images import ImageProblem, opened_image

__all__ = [
    "Card",
    "PAGE_SIZE",
    "SORT_KEYS",
    "Skipped",
    "bundled_cards",
    "embedding_cards",
    "filter_cards",
    "format_multiplier",
    "hypernetwork_cards",
    "hypernetwork_tag",
    "page_count",
    "render_cards",
    "render_skipped",
    "sort_cards",
]

Kind = Literal["embedding", "hypernetwork"]
SORT_KEYS: tuple[str, ...] = ("Name", "Date")
THUMBNAIL_SIZE = 256
# Cards per page: a page of 10,000 cards is megabytes of HTML the browser lays out at once; this many render at once
# with their pictures (each picture is made once and cached).
PAGE_SIZE = 120


@dataclass(frozen=True)
class Card:
    """One usable file shown as a card: what it is called, what a click inserts and what the card says."""

    kind: Kind
    name: str
    prompt: str
    path: Path
    preview: Path | None
    details: tuple[str, ...]
    mtime: float
    search_text: str
    # From A1111's user metadata (``name.json``): shown on the card; ``negative`` goes to the negative prompt.
    description: str = ""
    negative: str = ""
    metadata_error: str | None = None
    # Listed by a lazy scan, header not read yet: the view reads it before showing the card.
    pending: bool = False
    # False for an embedding bundled in a LoRA file: it has no file of its own to keep metadata beside.
    editable: bool = True

    @property
    def allow_negative(self) -> bool:
        """A1111 lets textual inversion cards target the negative prompt; hypernetwork tags go to the prompt."""
        return self.kind == "embedding"


@dataclass(frozen=True)
class Skipped:
    """A file that did not load (or cannot be used with the model), and why."""

    path: Path
    reason: str
    # An SD 1.x/2.x embedding skipped on an SDXL model: the list offers to convert it (the embedding tools' convert).
    convertible: bool = False


def format_multiplier(value: float) -> str:
    """The multiplier as A1111's card JavaScript writes it: 1.0 -> ``1``, 0.75 -> ``0.75``."""
    number = float(value)
    if number.is_integer():
        return str(int(number))
    return repr(number)


def hypernetwork_tag(name: str, multiplier: float) -> str:
    return f"<hypernet:{name}:{format_multiplier(multiplier)}>"


def _with_activation(text: str, metadata: Any) -> str:
    """A1111 (Lora's card) appends the activation text after the tag, separated by a space."""
    activation = metadata.activation_text.strip() if metadata is not None else ""
    return f"{text} {activation}" if activation else text


def _negative(metadata: Any) -> str:
    """A1111 (Lora's card) adds the negative text to the negative prompt as ``(text:1)``."""
    negative = metadata.negative_text.strip() if metadata is not None else ""
    return f"({negative}:1)" if negative else ""


def _description(metadata: Any) -> str:
    return metadata.description.strip() if metadata is not None else ""


def _search_text(name: str, path: Path, roots: Sequence[Path], extra: Iterable[str] = ()) -> str:
    """A1111 searches a card by its path relative to the folder and its hash; we add the name."""
    relative = full = str(path)
    for root in roots:
        # String prefixes, not Path.relative_to: this runs for every card of a 10,000-file library.
        prefix = os.path.join(str(root), "")
        if full.startswith(prefix):
            relative = full[len(prefix) :]
            break
    return " ".join([name, relative, *extra]).lower()


CardCache = dict[str, tuple[tuple[Any, ...], Card]]


def embedding_cards(
    records: Iterable[Any], roots: Sequence[Path] = (), cache: CardCache | None = None
) -> tuple[list[Card], list[Skipped]]:
    """Cards for ``library.EmbeddingRecord`` values; records with a ``skipped`` reason go to the skipped list.

    ``cache`` (path -> (what the card was made from, card)) lets a caller rebuild 10,000 cards after a few files
    changed without making the other cards again.
    """
    cards: list[Card] = []
    skipped: list[Skipped] = []
    fresh: CardCache = {}
    for record in records:
        if record.skipped is not None:
            skipped.append(Skipped(record.path, record.skipped, bool(getattr(record, "convertible", False))))
            continue
        metadata = getattr(record, "user_metadata", None)
        key = (record.name, record.mtime, getattr(record, "size", 0), getattr(record, "pending", False), record.hash,
               record.vectors, record.width, record.preview, id(metadata), getattr(record, "metadata_error", None))
        path_key = str(record.path)
        known = cache.get(path_key) if cache is not None else None
        if known is not None and known[0] == key:
            cards.append(known[1])
            fresh[path_key] = known
            continue
        vectors = record.vectors or 0
        pending = bool(getattr(record, "pending", False))
        details: tuple[str, ...] = (
            ("not read yet",) if pending else (f"{vectors} vector{'s' if vectors != 1 else ''}, width {record.width}",)
        )
        if record.short_hash:
            details += (f"hash {record.short_hash}",)
        description = _description(metadata)
        cards.append(
            Card(
                kind="embedding",
                name=record.name,
                prompt=_with_activation(record.name, metadata),
                path=record.path,
                preview=record.preview,
                details=details,
                mtime=record.mtime,
                search_text=_search_text(record.name, record.path, roots, [record.hash or "", description]),
                description=description,
                negative=_negative(metadata),
                metadata_error=getattr(record, "metadata_error", None),
                pending=pending,
            )
        )
        fresh[path_key] = (key, cards[-1])
    if cache is not None:
        cache.clear()
        cache.update(fresh)
    return cards, skipped


def bundled_cards(bundles: Iterable[Any], roots: Sequence[Path] = ()) -> list[Card]:
    """Cards for embeddings bundled in LoRA files (``embeddings.bundles.BundledEmbedding``): a click inserts the
    LoRA's tag with the word, since A1111 makes the word exist only while its LoRA is in the prompt."""
    cards = []
    for bundled in bundles:
        emb, lora = bundled.embedding, bundled.lora
        kind = "SDXL pair" if emb.is_sdxl else f"width {emb.width}"
        cards.append(Card(
            kind="embedding", name=emb.name, prompt=f"<lora:{lora.stem}:1> {emb.name}", path=lora, preview=None,
            details=(bundled.where, f"{emb.vector_count} vector{'s' if emb.vector_count != 1 else ''}, {kind}"),
            mtime=lora.stat().st_mtime if lora.exists() else 0.0,
            search_text=_search_text(emb.name, lora, roots, [bundled.where]), editable=False,
        ))
    return cards


def hypernetwork_cards(
    records: Iterable[Any], multiplier: float = 1.0, roots: Sequence[Path] = (), cache: CardCache | None = None
) -> tuple[list[Card], list[Skipped]]:
    """Cards for ``library.FileRecord`` values holding a ``HypernetworkInfo`` (or a ``Hypernetwork``: same fields);
    files that could not be read go to the skipped list. ``cache`` as for ``embedding_cards``."""
    cards: list[Card] = []
    skipped: list[Skipped] = []
    fresh: CardCache = {}
    for record in records:
        pending = bool(getattr(record, "pending", False))
        if record.item is None and not pending:
            skipped.append(Skipped(record.path, record.error or "did not load"))
            continue
        # A library keeps an unchanged file's record object: the same object (and multiplier) makes the same card.
        key = (id(record), multiplier, record)
        path_key = str(record.path)
        known = cache.get(path_key) if cache is not None else None
        if known is not None and known[0] == key:
            cards.append(known[1])
            fresh[path_key] = known
            continue
        hypernetwork = record.item
        details: tuple[str, ...] = ("not read yet",)
        if hypernetwork is not None:
            structure = ", ".join(format_multiplier(x) for x in hypernetwork.layer_structure)
            activation = hypernetwork.activation or "linear"
            details = (
                f"widths {', '.join(str(w) for w in hypernetwork.widths)}",
                f"structure [{structure}], {activation}"
                + (", layer norm" if hypernetwork.layer_norm else "")
                + (", dropout" if hypernetwork.use_dropout else ""),
            )
        if record.short_hash:
            details += (f"hash {record.hash[:10]}",)
        metadata = record.user_metadata
        # A1111 (Lora's card): a preferred weight other than 0 replaces the default multiplier.
        weight = metadata.preferred_weight if metadata is not None and metadata.preferred_weight else multiplier
        description = _description(metadata)
        cards.append(
            Card(
                kind="hypernetwork",
                name=record.name,
                prompt=_with_activation(hypernetwork_tag(record.name, weight), metadata),
                path=record.path,
                preview=record.preview,
                details=details,
                mtime=record.mtime,
                search_text=_search_text(record.name, record.path, roots, [record.hash or "", description]),
                description=description,
                negative=_negative(metadata),
                metadata_error=record.metadata_error,
                pending=pending,
            )
        )
        fresh[path_key] = (key, cards[-1])
    if cache is not None:
        cache.clear()
        cache.update(fresh)
    return cards, skipped


def filter_cards(cards: Iterable[Card], query: str) -> list[Card]:
    """Cards whose name, relative path or hash contains every word of ``query`` (case-insensitive)."""
    words = query.lower().split()
    return [card for card in cards if all(word in card.search_text for word in words)]


def sort_cards(cards: Iterable[Card], key: str = "Name", descending: bool = False) -> list[Card]:
    """Sort by ``Name`` (case-insensitive, then path) or ``Date`` (modification time, oldest first)."""
    if key == "Name":
        return sorted(cards, key=lambda c: (c.name.lower(), str(c.path)), reverse=descending)
    if key == "Date":
        return sorted(cards, key=lambda c: (c.mtime, c.name.lower()), reverse=descending)
    raise ValueError(f"unknown sort key {key!r}; choose one of: {', '.join(SORT_KEYS)}")


class _Thumbnails:
    """Small JPEG data URIs of card pictures, cached by path and modification time (pictures change rarely)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, float], str | None] = {}
        self._lock = threading.Lock()

    def uri(self, path: Path) -> str | None:
        try:
            key = (str(path), path.stat().st_mtime)
        except OSError:
            return None
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        uri = _thumbnail_uri(path)
        with self._lock:
            self._cache[key] = uri
        return uri


def _thumbnail_uri(path: Path) -> str | None:
    try:
        # opened_image: a regular file only (a FIFO named x.preview.png blocked the web UI's start), size-checked.
        with opened_image(path) as image:
            image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
            rgba = image.convert("RGBA")
    except (ImageProblem, OSError, ValueError):
        return None  # an unreadable picture shows the placeholder, as a missing one does
    flat = Image.new("RGB", rgba.size, (255, 255, 255))
    flat.paste(rgba, mask=rgba.getchannel("A"))
    buffer = io.BytesIO()
    flat.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


THUMBNAILS = _Thumbnails()


def page_count(count: int, page_size: int = PAGE_SIZE) -> int:
    return max(1, -(-count // page_size))


def render_cards(
    cards: Sequence[Card],
    *,
    total: int | None = None,
    empty: str = "Nothing here.",
    page: int = 1,
    page_size: int = PAGE_SIZE,
    query: str = "",
) -> str:
    """One page of the cards as HTML (``page`` counts from 1 and is clamped to the pages there are). Pictures are
    inlined as data URIs, so nothing depends on how a gradio version serves files; only the page's are made.

    Every class is prefixed ``sdconcepts-``; the click is handled by ``javascript/sdconcepts.js`` through the
    ``data-prompt`` attribute (no inline script, so the HTML survives gradio's sanitiser). ``query`` is the search
    the cards answer: the page script compares it with the search box, so that an answer for older text that
    arrives late is filtered by the newer text instead of showing cards it excludes.
    """
    parts = [f'<div class="sdconcepts-cards" data-query="{html.escape(query)}">']
    if not cards:
        message = empty if not total else f"No card matches the search ({total} hidden)."
        parts.append(f'<div class="sdconcepts-empty">{html.escape(message)}</div>')
    page = min(max(1, page), page_count(len(cards), page_size))
    for card in cards[(page - 1) * page_size : page * page_size]:
        uri = THUMBNAILS.uri(card.preview) if card.preview is not None else None
        if uri:
            picture = f'<img class="sdconcepts-card-preview" src="{uri}" alt="" loading="lazy">'
        else:
            picture = f'<div class="sdconcepts-card-placeholder">{html.escape(card.name[:1].upper() or "?")}</div>'
        details = "".join(f'<span class="sdconcepts-card-detail">{html.escape(d)}</span>' for d in card.details)
        if card.description:
            details += f'<span class="sdconcepts-card-description">{html.escape(card.description)}</span>'
        if card.metadata_error:
            details += f'<span class="sdconcepts-card-warning">{html.escape(card.metadata_error)}</span>'
        title = f"{card.path}\nclick: toggle {card.prompt}"
        parts.append(
            f'<div class="sdconcepts-card sdconcepts-card-{card.kind}" role="button" tabindex="0"'
            f' data-name="{html.escape(card.name)}" data-prompt="{html.escape(card.prompt)}"'
            f' data-negative="{html.escape(card.negative)}" data-path="{html.escape(str(card.path))}"'
            f' data-search="{html.escape(card.search_text)}"'
            f' data-allow-negative="{1 if card.allow_negative else 0}" title="{html.escape(title)}">'
            f"{picture}"
            + ('<span class="sdconcepts-card-edit" role="button" tabindex="0" title="Edit metadata">&#9998;</span>'
               if card.editable else "")
            + f'<div class="sdconcepts-card-text"><span class="sdconcepts-card-name">{html.escape(card.name)}</span>'
            f"{details}</div></div>"
        )
    parts.append("</div>")
    return "".join(parts)


def render_skipped(skipped: Sequence[Skipped]) -> str:
    """The skipped files and their reasons as an HTML list (empty string when none)."""
    if not skipped:
        return ""
    items = "".join(
        f'<li><code>{html.escape(str(s.path))}</code>: {html.escape(s.reason)}'
        + (f' <span class="sdconcepts-skipped-convert" role="button" tabindex="0" '
           f'data-path="{html.escape(str(s.path), quote=True)}" title="Write an SDXL copy (clip_l + clip_g) of this '
           'embedding beside it">Convert for SDXL</span>' if s.convertible else "")
        + "</li>" for s in skipped
    )
    count = len(skipped)
    return (
        f'<details class="sdconcepts-skipped" open><summary>{count} file{"s" if count != 1 else ""} skipped'
        f"</summary><ul>{items}</ul></details>"
    )
