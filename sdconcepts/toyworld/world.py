"""The toy world: one coloured shape on a plain background, drawn with PIL, and the captions that describe it.

Images are drawn at 4x and BOX-downsampled to 32x32 so edges are anti-aliased. Everything is driven by an explicit
``random.Random`` so that a seed fixes the images and captions exactly.
"""

from __future__ import annotations

import random
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

SIZE = 32
SCALE = 4

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "gray": (120, 120, 120),
    "navy": (20, 30, 110),
    "brown": (110, 70, 30),
    "teal": (20, 120, 120),
}
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "background": tuple(BACKGROUNDS),
}

COLOUR_JITTER = 12
BACKGROUND_JITTER = 8

# ImageNet-style templates as used by A1111's textual inversion files (style/subject templates). ``{}`` receives
# the caption body without its leading article, e.g. "red circle on a teal background".
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
    "a picture of a {}",
    "a picture of the {}",
    "an image of a {}",
    "a painting of a {}",
    "a drawing of a {}",
    "a sketch of a {}",
    "a {} in the style of a photo",
)


@dataclass(frozen=True)
class Attributes:
    """What one image shows."""

    shape: str
    colour: str
    background: str

    def as_dict(self) -> dict[str, str]:
        return {"shape": self.shape, "colour": self.colour, "background": self.background}


def _jitter(rgb: tuple[int, int, int], amount: int, rng: random.Random) -> tuple[int, int, int]:
    r, g, b = (max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)
    return (r, g, b)


def draw(shape: str, colour: str, background: str, rng: random.Random) -> Image.Image:
    """Draw one 32x32 RGB image of ``shape`` in ``colour`` on ``background`` with random size, position and jitter."""
    if shape not in SHAPES or colour not in COLOURS or background not in BACKGROUNDS:
        raise ValueError(f"unknown attribute in ({shape!r}, {colour!r}, {background!r})")
    big = SIZE * SCALE
    bg = _jitter(BACKGROUNDS[background], BACKGROUND_JITTER, rng)
    fg = _jitter(COLOURS[colour], COLOUR_JITTER, rng)
    image = Image.new("RGB", (big, big), bg)
    pen = ImageDraw.Draw(image)
    r = rng.uniform(0.16, 0.36) * big  # half-size
    cx = rng.uniform(r, big - r)
    cy = rng.uniform(r, big - r)
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif shape == "ring":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
        inner = 0.55 * r
        pen.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=bg)
    elif shape == "square":
        s = 0.85 * r
        pen.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fg)
    elif shape == "triangle":
        pen.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fg)
    else:  # cross
        w = 0.33 * r
        pen.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fg)
        pen.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fg)
    return image.resize((SIZE, SIZE), Image.Resampling.BOX)


def random_pictures(count: int, seed: int, avoid: Mapping[str, str]) -> list[tuple[Image.Image, Attributes]]:
    """``count`` random pictures (with their attributes), seeded, none of whose attributes equals ``avoid``'s (e.g.
    ``{"colour": "yellow"}``): pictures to edit toward a concept they do not show yet."""
    rng = random.Random(seed)
    out: list[tuple[Image.Image, Attributes]] = []
    while len(out) < count:
        attrs = random_attributes(rng)
        if any(getattr(attrs, name) == value for name, value in avoid.items()):
            continue
        out.append((draw(attrs.shape, attrs.colour, attrs.background, rng), attrs))
    return out


def random_attributes(
    rng: random.Random, *, shape: str | None = None, colour: str | None = None, background: str | None = None
) -> Attributes:
    """Pick attributes uniformly, keeping any that are given."""
    for name, value in (("shape", shape), ("colour", colour), ("background", background)):
        if value is not None and value not in ATTRIBUTES[name]:
            raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(ATTRIBUTES[name])}")
    return Attributes(
        shape=shape if shape is not None else rng.choice(SHAPES),
        colour=colour if colour is not None else rng.choice(tuple(COLOURS)),
        background=background if background is not None else rng.choice(tuple(BACKGROUNDS)),
    )


def sample(
    n: int, seed: int, *, shape: str | None = None, colour: str | None = None, background: str | None = None
) -> list[tuple[Image.Image, Attributes]]:
    """Draw ``n`` images (with their attributes) deterministically from ``seed``; given attributes are fixed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        attrs = random_attributes(rng, shape=shape, colour=colour, background=background)
        out.append((draw(attrs.shape, attrs.colour, attrs.background, rng), attrs))
    return out


def describe(attrs: Attributes, *, omit: Collection[str] = (), background: bool = True) -> str:
    """The caption body without its article: "red circle on a teal background", leaving out ``omit`` attributes.

    An omitted shape becomes the word "shape"; an omitted colour is simply not said.
    """
    words = []
    if "colour" not in omit:
        words.append(attrs.colour)
    words.append("shape" if "shape" in omit else attrs.shape)
    body = " ".join(words)
    if background and "background" not in omit:
        body += f" on a {attrs.background} background"
    return body


def caption(
    attrs: Attributes,
    rng: random.Random,
    *,
    omit: Collection[str] = (),
    empty_p: float = 0.10,
    background_p: float = 0.5,
    partial_p: float = 0.06,
    template_p: float = 0.3,
    templates: Sequence[str] = TEMPLATES,
) -> str:
    """A training caption for ``attrs``.

    With the defaults: 10 % empty (for classifier-free guidance), otherwise the background is named half the time,
    6 % of captions leave out the shape or the colour (so the model learns to leave it open), and 30 % are wrapped
    in an ImageNet-style template ("a photo of a ...") so the text encoder also learns the template words.
    Attributes in ``omit`` are never named (concept mode: pass the fixed attributes and ``empty_p=0``).
    """
    if rng.random() < empty_p:
        return ""
    omitted = set(omit)
    if rng.random() < partial_p:
        omitted.add(rng.choice(("shape", "colour")))
    body = describe(attrs, omit=omitted, background=rng.random() < background_p)
    if rng.random() < template_p:
        return rng.choice(templates).format(body)
    return f"a {body}"


def concept_caption(attrs: Attributes, fixed: Collection[str]) -> str:
    """The caption of a concept image: it names every attribute except the ``fixed`` ones."""
    return f"a {describe(attrs, omit=fixed)}"


# Words a prompt may use for a colour or a shape that this world does not have (the model then draws one it knows).
OTHER_COLOURS = frozenset({
    "orange", "pink", "cyan", "magenta", "violet", "indigo", "gold", "golden", "silver", "beige", "maroon", "lime",
    "olive", "turquoise", "crimson", "scarlet", "tan", "khaki", "lavender", "aqua", "grey", "azure", "amber",
})
OTHER_SHAPES = frozenset({
    "star", "hexagon", "pentagon", "octagon", "heart", "oval", "ellipse", "rectangle", "diamond", "rhombus",
    "arrow", "line", "dot", "crescent", "moon", "spiral", "cube", "sphere", "cone", "cylinder", "pyramid",
})


def words_outside_the_world(prompt: str) -> list[str]:
    """What the embedded toy-world model cannot draw of ``prompt``: one sentence per colour or shape word it lacks
    ("white background": white is a shape colour here, not a background), listing the words it knows instead."""
    words = re.findall(r"[a-z]+", prompt.lower())
    shape_colours, backgrounds = ", ".join(COLOURS), ", ".join(BACKGROUNDS)
    notes: list[str] = []
    for i, word in enumerate(words):
        after = words[i + 1] if i + 1 < len(words) else ""
        colour_word = word in OTHER_COLOURS or word in COLOURS or word in BACKGROUNDS
        if after == "background" and colour_word and word not in BACKGROUNDS:
            notes.append(f"the toy world has no {word} background; its backgrounds are {backgrounds}")
        elif after in SHAPES and colour_word and word not in COLOURS:
            notes.append(f"the toy world has no {word} {after}; its shapes are coloured {shape_colours}")
        elif word in OTHER_COLOURS and after != "background" and after not in SHAPES:
            notes.append(f"the toy world has no colour {word}; its shapes are coloured {shape_colours}, its "
                         f"backgrounds {backgrounds}")
        elif word in OTHER_SHAPES:
            notes.append(f"the toy world has no {word}; its shapes are {', '.join(SHAPES)}")
    return list(dict.fromkeys(notes))
