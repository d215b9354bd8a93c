"""Prompt templates: one prompt per line, ``[name]`` for the trained word and ``[filewords]`` for an image's caption.

The shipped files (subject, style, their ``_filewords`` variants, hypernetwork, none) are our own wording, in the
roles A1111's files play (a1111-compat §4.5).
"""

from __future__ import annotations

import random
from pathlib import Path

__all__ = ["TEMPLATE_DIR", "TemplateError", "available_templates", "fill_template", "read_template"]

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"


class TemplateError(ValueError):
    """A template that cannot be used (missing, empty, or without ``[name]`` where the word must appear)."""


def available_templates() -> dict[str, Path]:
    """Shipped template name (file stem) -> path."""
    return {p.stem: p for p in sorted(TEMPLATE_DIR.glob("*.txt"))}


def resolve_template(template: str | Path) -> Path:
    """A path to a template file, or the name of a shipped one (``subject``, ``style_filewords.txt``, ...)."""
    path = Path(template)
    if path.is_file():
        return path
    shipped = available_templates()
    stem = path.stem if path.suffix == ".txt" else str(template)
    if stem in shipped:
        return shipped[stem]
    raise TemplateError(
        f"template {str(template)!r} is neither a file nor a shipped template ({', '.join(shipped)})"
    )


def read_template(template: str | Path, *, require_name: bool = False) -> list[str]:
    """The non-empty lines of a template. ``require_name``: every line must contain ``[name]`` (textual inversion).

    Without ``[name]`` the trained word never reaches the text encoder and the embedding gets no gradient; A1111
    fails later with "No inf checks were recorded" (its issue #6705). Here it is refused before anything loads.
    """
    path = resolve_template(template)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(f"{path}: cannot read the template ({exc})") from None
    lines = [line for line in lines if line]
    if not lines:
        raise TemplateError(f"{path}: the template has no prompt lines")
    if require_name:
        missing = [line for line in lines if "[name]" not in line]
        if missing:
            raise TemplateError(
                f"{path}: {len(missing)} of {len(lines)} lines lack [name] (e.g. {missing[0]!r}); a textual inversion "
                "template must put the embedding's word in every prompt (use subject, style or their _filewords "
                "variants)"
            )
    return lines


def fill_template(
    line: str,
    *,
    name: str,
    filewords: str,
    rng: random.Random | None = None,
    shuffle_tags: bool = False,
    tag_dropout: float = 0.0,
) -> str:
    """A1111's create_text for a chosen line: split the file words on ``,``, drop tags with probability
    ``tag_dropout``, shuffle them if asked, re-join with ``,`` and substitute ``[filewords]`` then ``[name]``."""
    tags = filewords.split(",")
    if tag_dropout and rng is not None:
        tags = [tag for tag in tags if rng.random() > tag_dropout]
    if shuffle_tags and rng is not None:
        rng.shuffle(tags)
    return line.replace("[filewords]", ",".join(tags)).replace("[name]", name)
