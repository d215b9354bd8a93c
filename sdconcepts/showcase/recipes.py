"""What the showcase learns: three textual-inversion words and one hypernetwork, each from a few toy pictures.

Every recipe is seeded; the pictures, their captions and the learned files are written to the showcase's folder
(``data/``, ``embeddings/``, ``hypernetworks/``) so that a user can look at them and load the files in the app.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdconcepts.toyworld import world

# The object word's own template: the captions name only the background ("on a navy background"), so the word
# learns the shape and the colour and leaves the background to the prompt.
OBJECT_TEMPLATE = ("a [name] [filewords]", "a photo of a [name] [filewords]", "a picture of the [name] [filewords]",
                   "a rendering of a [name] [filewords]", "a [name]")
# The balanced word's: the captions name the shape and the background, the word stands where the colour would.
BALANCED_TEMPLATE = ("a [name] [filewords]", "a photo of a [name] [filewords]", "a picture of the [name] [filewords]")


@dataclass(frozen=True)
class Object:
    """A shape and colour learned as a word from ``images`` pictures on the ``backgrounds`` in turn, named in the
    captions; the other backgrounds are contexts the word never saw."""

    name: str = "showobj"
    shape: str = "triangle"
    colour: str = "yellow"
    images: int = 5
    backgrounds: tuple[str, ...] = ("black", "gray", "brown")
    seed: int = 4243
    vectors: int = 4
    init: str = "triangle"
    steps: int = 300
    learn_rate: str = "0.01:200, 0.005"


@dataclass(frozen=True)
class Style:
    """A background learned as a style (a word and, separately, a hypernetwork) from ``images`` pictures of varied
    shapes and colours whose captions name the shape and the colour only."""

    name: str = "showstyle"
    hypernetwork: str = "showstyle_hn"
    background: str = "teal"
    images: int = 5
    seed: int = 77
    vectors: int = 2
    init: str = "style"
    steps: int = 300
    learn_rate: str = "0.01:150, 0.005"
    hn_steps: int = 400
    hn_learn_rate: str = "0.002"
    strength: float = 0.8  # the hypernetwork's multiplier in the measured prompts


@dataclass(frozen=True)
class Balanced:
    """A word learned from pictures of one shape spread evenly over every colour (captions name the shape and the
    background, never the colour), standing where the colour would be: "a showfair circle" against the plain "a
    circle", whose colours come out skewed."""

    name: str = "showfair"
    shape: str = "circle"
    per_colour: int = 2
    seed: int = 505
    vectors: int = 2
    init: str = "colour"
    steps: int = 400
    learn_rate: str = "0.01:150, 0.005"


@dataclass(frozen=True)
class Recipes:
    object: Object = Object()
    style: Style = Style()
    balanced: Balanced = Balanced()


# Hypernetwork widths per embedded model: the context's width, then the attention channel widths.
HYPERNETWORK_WIDTHS = {"toyworld": (48, 32, 64), "toyworld-xl": (80, 64, 96)}


def _write(folder: Path, pictures: list[tuple[Any, str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, text) in enumerate(pictures):
        image.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(text + "\n")


def object_pictures(recipe: Object) -> list[tuple[Any, world.Attributes]]:
    """The object's pictures: the fixed shape and colour on the recipe's backgrounds in turn."""
    rng = random.Random(recipe.seed)
    out = []
    for i in range(recipe.images):
        attrs = world.Attributes(recipe.shape, recipe.colour, recipe.backgrounds[i % len(recipe.backgrounds)])
        out.append((world.draw(attrs.shape, attrs.colour, attrs.background, rng), attrs))
    return out


def style_pictures(recipe: Style) -> list[tuple[Any, world.Attributes]]:
    return world.sample(recipe.images, recipe.seed, background=recipe.background)


def balanced_pictures(recipe: Balanced) -> list[tuple[Any, world.Attributes]]:
    rng = random.Random(recipe.seed)
    out = []
    for colour in world.COLOURS:
        for _ in range(recipe.per_colour):
            attrs = world.random_attributes(rng, shape=recipe.shape, colour=colour)
            out.append((world.draw(attrs.shape, attrs.colour, attrs.background, rng), attrs))
    return out


class Trainer:
    """Trains the recipes on one loaded model into ``folder``; ``seconds`` records each training's wall time."""

    def __init__(self, model: Any, model_name: str, folder: Path) -> None:
        self.model = model
        self.model_name = model_name
        self.folder = folder
        self.seconds: dict[str, float] = {}

    def word(self, name: str, pictures: list[tuple[Any, str]], *, template: str | Path, init: str, vectors: int,
             steps: int, learn_rate: str, batch: int = 5) -> Any:
        """Train the embedding ``name`` on (picture, caption) pairs; returns its vectors as the prompt takes them."""
        from sdconcepts.embeddings.files import load_embedding
        from sdconcepts.training import EmbeddingTrainingConfig, create_embedding_file, train_embedding
        from sdconcepts.training.training_model import TrainingModel

        data = self.folder / "data" / name
        _write(data, pictures)
        embeddings = self.folder / "embeddings"
        create_embedding_file(embeddings, name, TrainingModel(self.model).token_rows(init, vectors), vectors=vectors)
        config = EmbeddingTrainingConfig(dataset=str(data), template=str(template), width=32, height=32,
                                         batch_size=min(batch, len(pictures)), max_steps=steps, learn_rate=learn_rate,
                                         save_every=0, preview_every=0, log_directory=str(self.folder / "logs"))
        start = time.perf_counter()
        for _ in train_embedding(self.model, name, config, embeddings_dir=embeddings):
            pass
        self.seconds[name] = round(time.perf_counter() - start, 1)
        saved = next(p for p in (embeddings / f"{name}{ext}" for ext in (".pt", ".safetensors")) if p.is_file())
        return load_embedding(saved).joined()

    def hypernetwork(self, name: str, pictures: list[tuple[Any, str]], *, steps: int, learn_rate: str,
                     batch: int = 5) -> Any:
        """Train the hypernetwork ``name`` on (picture, caption) pairs with the ``filewords`` template."""
        from sdconcepts.hypernetworks.files import load_hypernetwork
        from sdconcepts.training import HypernetworkTrainingConfig, create_hypernetwork_file, train_hypernetwork

        data = self.folder / "data" / name
        _write(data, pictures)
        folder = self.folder / "hypernetworks"
        create_hypernetwork_file(folder, name, widths=HYPERNETWORK_WIDTHS[self.model_name], seed=0)
        config = HypernetworkTrainingConfig(dataset=str(data), template="filewords", width=32, height=32,
                                            batch_size=min(batch, len(pictures)), max_steps=steps,
                                            learn_rate=learn_rate, save_every=0, preview_every=0,
                                            log_directory=str(self.folder / "logs"))
        start = time.perf_counter()
        for _ in train_hypernetwork(self.model, name, config, hypernetworks_dir=folder):
            pass
        self.seconds[name] = round(time.perf_counter() - start, 1)
        return load_hypernetwork(folder / f"{name}.pt")

    def _template(self, name: str, lines: tuple[str, ...]) -> Path:
        template = self.folder / "data" / f"{name}_template.txt"
        template.parent.mkdir(parents=True, exist_ok=True)
        template.write_text("\n".join(lines) + "\n")
        return template

    def object_word(self, recipe: Object) -> Any:
        template = self._template(recipe.name, OBJECT_TEMPLATE)
        pairs = [(image, f"on a {attrs.background} background") for image, attrs in object_pictures(recipe)]
        return self.word(recipe.name, pairs, template=template, init=recipe.init, vectors=recipe.vectors,
                         steps=recipe.steps, learn_rate=recipe.learn_rate)

    def style_word(self, recipe: Style) -> Any:
        pairs = [(image, f"a {attrs.colour} {attrs.shape}") for image, attrs in style_pictures(recipe)]
        return self.word(recipe.name, pairs, template="style_filewords", init=recipe.init, vectors=recipe.vectors,
                         steps=recipe.steps, learn_rate=recipe.learn_rate)

    def style_hypernetwork(self, recipe: Style) -> Any:
        pairs = [(image, f"a {attrs.colour} {attrs.shape}") for image, attrs in style_pictures(recipe)]
        return self.hypernetwork(recipe.hypernetwork, pairs, steps=recipe.hn_steps, learn_rate=recipe.hn_learn_rate)

    def balanced_word(self, recipe: Balanced) -> Any:
        pairs = [(image, f"{attrs.shape} on a {attrs.background} background")
                 for image, attrs in balanced_pictures(recipe)]
        return self.word(recipe.name, pairs, template=self._template(recipe.name, BALANCED_TEMPLATE), init=recipe.init, vectors=recipe.vectors,
                         steps=recipe.steps, learn_rate=recipe.learn_rate)
