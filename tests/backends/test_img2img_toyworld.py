"""The edits work: img2img and inpainting with learned words and hypernetworks on the toy-world model, probe-scored.

- Inpainting: the shape's box of toy images (no yellow shapes) is inpainted with a word trained on yellow shapes
  (captions never say the colour); the probe must find yellow in >= 80 % of the results, and every pixel outside
  the box must be the original's (mask blur 0, "original" content, after the paste-back).
- Hypernetwork through inpainting: a hypernetwork trained on teal backgrounds, applied while inpainting everything
  but the shape (its pixels grown by one), must turn the background teal at least twice as often as the same
  inpainting without it, and leave the shape's pixels exactly as they were.
- Image variation: img2img of toy images at denoising strength 0.5 with "a <word> <shape>" keeps the probe's shape
  in >= 90 % while the colour becomes the word's in >= 80 % (the same prompt without the word: "a <shape>", which
  keeps the init's colour). With the shape left open ("a <word> shape") the shape survives far less often on the
  toy model (reported, not asserted).

Slow (a few minutes on one thread); CI runs them. ``python tests/backends/test_img2img_toyworld.py`` prints the figures.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from trained_style import STYLE_HYPERNETWORK, train_style_hypernetwork

from sdconcepts.backends.model_loading import DEFAULT_MODEL_DIR
from sdconcepts.toyworld import world

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "model_index.json").is_file(), reason="the embedded model is missing"),
]

WORD = {"name": "toycol", "colour": "yellow", "vectors": 2, "init": "colour", "images": 10, "batch": 5,
        "steps": 300, "learn_rate": "0.01:150, 0.005"}
HN = {k: STYLE_HYPERNETWORK[k] for k in ("name", "background", "images", "batch", "steps", "learn_rate")}
INPAINT = {"images": 20, "seeds": 2, "steps": 20, "sampler": "DDIM", "cfg_scale": 5.0, "strength": 1.0,
           "padding": 1}
VARIATION = {"images": 30, "steps": 20, "sampler": "DDIM", "cfg_scale": 5.0, "strength": 0.5}


def shape_mask(image: Image.Image, padding: int, *, box: bool = True) -> Image.Image:
    """White (L mask) on the shape's box, or on the shape's own pixels (``box=False``), grown by ``padding``.

    The shape's pixels are those that differ from the background (the corners' colour) by more than 40 levels.
    """
    array = np.asarray(image, dtype=np.int16)
    corners = np.stack([array[0, 0], array[0, -1], array[-1, 0], array[-1, -1]])
    background = np.median(corners, axis=0)
    differs = np.abs(array - background).max(axis=2) > 40
    if box:
        ys, xs = np.nonzero(differs)
        differs = np.zeros_like(differs)
        differs[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
    mask = Image.fromarray((differs * 255).astype(np.uint8), "L")
    return mask.filter(ImageFilter.MaxFilter(2 * padding + 1)) if padding else mask


def train_word(model: Any, work: Path) -> torch.Tensor:
    from sdconcepts.embeddings.files import load_embedding
    from sdconcepts.toyworld.concept import write_concept
    from sdconcepts.training import EmbeddingTrainingConfig, create_embedding_file, train_embedding
    from sdconcepts.training.training_model import TrainingModel

    write_concept(work / "concept", count=WORD["images"], seed=99, colour=WORD["colour"])
    rows = TrainingModel(model).token_rows(WORD["init"], WORD["vectors"])
    create_embedding_file(work / "embeddings", WORD["name"], rows, vectors=WORD["vectors"])
    config = EmbeddingTrainingConfig(dataset=str(work / "concept"), template="subject_filewords", width=32, height=32,
                                     batch_size=WORD["batch"], max_steps=WORD["steps"], learn_rate=WORD["learn_rate"],
                                     save_every=0, preview_every=0, log_directory=str(work / "log"))
    list(train_embedding(model, WORD["name"], config, embeddings_dir=work / "embeddings"))
    return load_embedding(work / "embeddings" / f"{WORD['name']}.pt").tensor()


def _inpaint_all(model: Any, cases: Sequence[tuple[Image.Image, Image.Image]], prompts: Sequence[str], *,
                 invert: bool, hypernetworks: Mapping[str, Any] | None = None, **kwargs: Any) -> list[Image.Image]:
    from sdconcepts.backends.sampling import img2img
    from sdconcepts.generation import GenerationParams
    from sdconcepts.hypernetworks.tags import resolve_in_memory
    from sdconcepts.img2img import Img2ImgOptions

    options = Img2ImgOptions(denoising_strength=INPAINT["strength"], mask_blur=0, inpainting_fill="original",
                             invert_mask=invert)
    out = []
    for i, ((image, mask), prompt) in enumerate(zip(cases, prompts, strict=True)):
        params = GenerationParams(prompt=prompt, steps=INPAINT["steps"], sampler=INPAINT["sampler"],
                                  cfg_scale=INPAINT["cfg_scale"], seed=300 + 10 * i, batch_size=INPAINT["seeds"])
        resolved = {"hypernetworks": resolve_in_memory(prompt, hypernetworks, model.unet)} if hypernetworks else {}
        out += img2img(model, params, image, mask=mask, options=options, **resolved, **kwargs).images
    return out


def _unchanged_outside(results: Sequence[Image.Image], cases: Sequence[tuple[Image.Image, Image.Image]],
                       *, inside: bool) -> bool:
    per_case = len(results) // len(cases)
    for k, result in enumerate(results):
        image, mask = cases[k // per_case]
        kept = (np.asarray(mask) > 0) if inside else (np.asarray(mask) == 0)
        if not np.array_equal(np.asarray(result)[kept], np.asarray(image)[kept]):
            return False
    return True


def measure(work: Path, style_hypernetwork: tuple[Path, float]) -> dict[str, Any]:
    """Every figure of this file; ``style_hypernetwork`` is ``trained_style.train_style_hypernetwork``'s result."""
    from sdconcepts.backends.model_loading import load_model
    from sdconcepts.backends.sampling import img2img
    from sdconcepts.generation import GenerationParams
    from sdconcepts.hypernetworks.files import load_hypernetwork
    from sdconcepts.img2img import Img2ImgOptions
    from sdconcepts.toyworld.probe import classify

    model = load_model(None, device="cpu")
    report: dict[str, Any] = {"word": WORD, "hypernetwork": HN, "inpaint": INPAINT, "variation": VARIATION}
    start = time.perf_counter()
    vectors = train_word(model, work / "word")
    report["word_train_seconds"] = round(time.perf_counter() - start, 1)
    embeddings = {WORD["name"]: vectors}
    colour = WORD["colour"]

    # Inpaint the shape's box with the learned word.
    sources = world.random_pictures(INPAINT["images"], 11, {"colour": colour})
    cases = [(image, shape_mask(image, INPAINT["padding"])) for image, _ in sources]
    start = time.perf_counter()
    prompts = [f"a {WORD['name']} shape"] * len(cases)
    learned = _inpaint_all(model, cases, prompts, invert=False, embeddings=embeddings)
    plain = _inpaint_all(model, cases, prompts, invert=False)
    report["inpaint_seconds"] = round(time.perf_counter() - start, 1)
    report["inpaint_word_colour_rate"] = sum(f["colour"] == colour for f in classify(learned)) / len(learned)
    report["inpaint_plain_colour_rate"] = sum(f["colour"] == colour for f in classify(plain)) / len(plain)
    report["inpaint_outside_unchanged"] = _unchanged_outside(learned, cases, inside=False)
    report["inpaint_generations"] = len(learned)

    # A hypernetwork through inpainting: everything but the shape's box is regenerated.
    style_path, style_seconds = style_hypernetwork  # the session's, shared with test_training_learns.py
    style = load_hypernetwork(style_path)
    report["hypernetwork_train_seconds"] = round(style_seconds, 1)
    bg_sources = world.random_pictures(INPAINT["images"], 12, {"background": HN["background"]})
    bg_cases = [(image, shape_mask(image, INPAINT["padding"], box=False)) for image, _ in bg_sources]
    start = time.perf_counter()
    # The prompt names what the box keeps, as the hypernetwork's training captions did.
    prompts = [f"a {attrs.colour} {attrs.shape}" for _, attrs in bg_sources]
    styled = _inpaint_all(model, bg_cases, [f"{p} <hypernet:{HN['name']}:1>" for p in prompts], invert=True,
                          hypernetworks={HN["name"]: style})
    unstyled = _inpaint_all(model, bg_cases, prompts, invert=True)
    report["hypernetwork_inpaint_seconds"] = round(time.perf_counter() - start, 1)
    bg = HN["background"]
    report["hypernetwork_background_rate"] = sum(f["background"] == bg for f in classify(styled)) / len(styled)
    report["plain_background_rate"] = sum(f["background"] == bg for f in classify(unstyled)) / len(unstyled)
    report["hypernetwork_box_unchanged"] = _unchanged_outside(styled, bg_cases, inside=True)

    # Image variation at strength 0.5: the prompt describes the image, the learned word stands for the colour.
    var_sources = world.random_pictures(VARIATION["images"], 13, {"colour": colour})
    options = Img2ImgOptions(denoising_strength=VARIATION["strength"])
    start = time.perf_counter()
    results: dict[str, list[Image.Image]] = {"word": [], "plain": [], "word_shape_unnamed": []}
    for i, (image, attrs) in enumerate(var_sources):
        prompts = {"word": f"a {WORD['name']} {attrs.shape}", "plain": f"a {attrs.shape}",
                   # Not asserted: with the shape left open the toy model (8x8 latents) keeps it less often at 0.5.
                   "word_shape_unnamed": f"a {WORD['name']} shape"}
        for kind, prompt in prompts.items():
            params = GenerationParams(prompt=prompt, steps=VARIATION["steps"], sampler=VARIATION["sampler"],
                                      cfg_scale=VARIATION["cfg_scale"], seed=700 + i)
            results[kind] += img2img(model, params, image, options=options,
                                     embeddings=embeddings if kind != "plain" else None).images
    report["variation_seconds"] = round(time.perf_counter() - start, 1)
    for kind, images in results.items():
        found = classify(images)
        pairs = list(zip(found, var_sources, strict=True))
        report[f"variation_{kind}_shape_kept"] = sum(f["shape"] == a.shape for f, (_, a) in pairs) / len(images)
        report[f"variation_{kind}_background_kept"] = sum(
            f["background"] == a.background for f, (_, a) in pairs) / len(images)
        report[f"variation_{kind}_colour_rate"] = sum(f["colour"] == colour for f in found) / len(images)
        report[f"variation_{kind}_colour_kept"] = sum(f["colour"] == a.colour for f, (_, a) in pairs) / len(images)
    return report


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, toyworld_style_hypernetwork: tuple[Path, float]) -> dict[str, Any]:
    result = measure(tmp_path_factory.mktemp("img2img-toyworld"), toyworld_style_hypernetwork)
    print(json.dumps(result, indent=1))
    return result


def test_inpainting_with_a_learned_word(report: dict[str, Any]) -> None:
    assert report["inpaint_outside_unchanged"], report
    assert report["inpaint_word_colour_rate"] >= 0.8, report
    assert report["inpaint_plain_colour_rate"] <= report["inpaint_word_colour_rate"] - 0.3, report


def test_hypernetwork_restyles_only_the_inpainted_region(report: dict[str, Any]) -> None:
    assert report["hypernetwork_box_unchanged"], report
    styled, plain = report["hypernetwork_background_rate"], report["plain_background_rate"]
    assert styled >= 2 * max(plain, 0.05) and styled >= plain + 0.1, report


def test_variation_keeps_the_shape_and_takes_the_words_colour(report: dict[str, Any]) -> None:
    assert report["variation_word_shape_kept"] >= 0.9, report
    assert report["variation_word_colour_rate"] >= 0.8, report
    assert report["variation_plain_colour_rate"] <= 0.2 and report["variation_plain_colour_kept"] >= 0.5, report


if __name__ == "__main__":
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        style = train_style_hypernetwork(Path(tmp) / "style")
        print(json.dumps(measure(Path(tmp), style), indent=1), flush=True)
    sys.exit(0)
