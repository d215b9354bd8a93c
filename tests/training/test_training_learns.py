"""It learns: textual inversion and hypernetwork training on the embedded toy-world models, scored by the probe.

Each test runs on the SD-1 toy model (``toyworld``) and on the SDXL-layout one (``toyworld-xl``, whose embeddings
have a ``clip_l`` and a ``clip_g`` half).

- Textual inversion: 5 images of a yellow triangle on a fixed background whose captions name nothing ("a shape");
  an embedding trained with the shipped ``subject`` template must hit shape, colour and background together in
  >= 80 % of generations from "a photo of a <word>" (60 % on toyworld-xl, see ``CONCEPT_BAR``), where the plain
  words hit all three far less often.
- Hypernetwork: images of every shape and colour on one background, captioned without the background ("a red
  circle", shipped ``filewords`` template); at strengths 0, 0.5 and 1 the background rate must rise monotonically to
  >= 3x its rate at 0 while shape and colour stay >= 95 %.

Slow (a few minutes each on 2 CPU cores); CI runs them. ``python tests/training/test_training_learns.py`` prints the figures.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from trained_style import STYLE_HYPERNETWORK

from sdconcepts.backends.model_loading import DEFAULT_MODEL_DIR, XL_MODEL_DIR

pytestmark = [pytest.mark.slow]

# Embedded model -> (folder, hypernetwork widths: the context first, then the attention channel widths).
MODELS = {"toyworld": (DEFAULT_MODEL_DIR, (48, 32, 64)), "toyworld-xl": (XL_MODEL_DIR, (80, 64, 96))}


@pytest.fixture
def embedded(request: pytest.FixtureRequest) -> str:
    if not (MODELS[request.param][0] / "model_index.json").is_file():
        pytest.skip(f"the embedded model {request.param} is missing")
    return str(request.param)

TI = {"shape": "triangle", "colour": "yellow", "background": "brown", "vectors": 4, "steps": 500, "batch": 5,
      "learn_rate": "0.01:200, 0.005", "init": "triangle"}
HN = {k: STYLE_HYPERNETWORK[k] for k in ("background", "images", "batch", "steps", "learn_rate")}
SAMPLES = 60


def generate(model: Any, prompt: str, count: int, *, embeddings: Mapping[str, torch.Tensor] | None = None,
             hypernetworks: Mapping[str, Any] | None = None, seed: int = 1000) -> list[Any]:
    from sdconcepts.backends.sampling import txt2img
    from sdconcepts.generation import GenerationParams
    from sdconcepts.hypernetworks.tags import resolve_in_memory

    batch = min(20, count)
    params = GenerationParams(prompt=prompt, steps=20, sampler="DDIM", cfg_scale=5.0, seed=seed, batch_size=batch,
                              batch_count=count // batch)
    # Batches of 20 (over the web UI's 8) keep the evaluation fast; asked for explicitly, as an API caller can.
    resolved = resolve_in_memory(prompt, hypernetworks or {}, model.unet)
    return txt2img(model, params, embeddings=embeddings, hypernetworks=resolved, size_limits=False).images


def rates(images: Sequence[Any], expect: Mapping[str, str]) -> dict[str, float]:
    from sdconcepts.toyworld.probe import classify

    found = classify(images)
    out = {name: sum(f[name] == value for f in found) / len(found) for name, value in expect.items()}
    out["all"] = sum(all(f[n] == v for n, v in expect.items()) for f in found) / len(found)
    return out


def train_ti(work: Path, *, short_prompt: bool = False, embedded: str = "toyworld") -> dict[str, Any]:
    from sdconcepts.backends.model_loading import load_model
    from sdconcepts.embeddings.files import load_embedding
    from sdconcepts.toyworld.concept import write_concept
    from sdconcepts.training import EmbeddingTrainingConfig, create_embedding_file, train_embedding
    from sdconcepts.training.training_model import TrainingModel

    model = load_model(MODELS[embedded][0], device="cpu")
    write_concept(work / "concept", count=5, seed=4242, shape=TI["shape"], colour=TI["colour"],
                  background=TI["background"])
    create_embedding_file(work / "embeddings", "toytri", TrainingModel(model).token_rows(TI["init"], TI["vectors"]),
                          vectors=TI["vectors"])
    config = EmbeddingTrainingConfig(dataset=str(work / "concept"), template="subject", width=32, height=32,
                                     batch_size=TI["batch"], max_steps=TI["steps"], learn_rate=TI["learn_rate"],
                                     save_every=0, preview_every=0, log_directory=str(work / "log"))
    start = time.perf_counter()
    events = list(train_embedding(model, "toytri", config, embeddings_dir=work / "embeddings"))
    seconds = time.perf_counter() - start
    # SD-1: toytri.pt; SDXL: toytri.safetensors with clip_l and clip_g, joined side by side as the context lays out.
    saved = next(p for p in (work / "embeddings" / f"toytri{ext}" for ext in (".pt", ".safetensors")) if p.is_file())
    vectors = load_embedding(saved).joined()
    expect = {k: TI[k] for k in ("shape", "colour", "background")}
    plain = f"a photo of a {TI['colour']} {TI['shape']}"
    report = {
        "train_seconds": round(seconds, 1),
        "final_loss": round(sum(e.loss for e in events[-51:-1]) / 50, 4),
        "with_word": rates(generate(model, "a photo of a toytri", SAMPLES, embeddings={"toytri": vectors}), expect),
        "plain_words": rates(generate(model, plain, SAMPLES), expect),
        "plain_words_prompt": plain,
        "settings": TI,
    }
    if short_prompt:  # a prompt form the template does not contain
        report["with_word_short"] = rates(generate(model, "a toytri", SAMPLES, embeddings={"toytri": vectors}), expect)
    return report


def train_hn(work: Path, *, embedded: str = "toyworld", trained: tuple[Path, float] | None = None) -> dict[str, Any]:
    """Train the style hypernetwork on ``embedded`` (or take ``trained``: the session's toy-model one, the same
    recipe) and score it at strengths 0, 0.5 and 1."""
    from sdconcepts.backends.model_loading import load_model
    from sdconcepts.hypernetworks.files import load_hypernetwork
    from sdconcepts.toyworld import world
    from sdconcepts.toyworld.concept import write_concept
    from sdconcepts.training import HypernetworkTrainingConfig, create_hypernetwork_file, train_hypernetwork

    model = load_model(MODELS[embedded][0], device="cpu")
    if trained is None:
        write_concept(work / "style", count=HN["images"], seed=77, background=HN["background"])
        create_hypernetwork_file(work / "hypernetworks", "bgstyle", widths=MODELS[embedded][1], seed=0)
        config = HypernetworkTrainingConfig(dataset=str(work / "style"), template="filewords", width=32, height=32,
                                            batch_size=HN["batch"], max_steps=HN["steps"],
                                            learn_rate=HN["learn_rate"], save_every=0, preview_every=0,
                                            log_directory=str(work / "log"))
        start = time.perf_counter()
        list(train_hypernetwork(model, "bgstyle", config, hypernetworks_dir=work / "hypernetworks"))
        trained = (work / "hypernetworks" / "bgstyle.pt", time.perf_counter() - start)
    path, seconds = trained
    hypernetwork = load_hypernetwork(path)
    results: dict[str, Any] = {"train_seconds": round(seconds, 1), "settings": HN}
    shapes, colours = world.SHAPES, tuple(world.COLOURS)
    from sdconcepts.toyworld.probe import classify

    pairs = [(s, c) for s in shapes for c in colours][::2]  # 15 of the 30 shape x colour prompts, 4 seeds each
    for strength in (0.0, 0.5, 1.0):
        found_bg, found_shape, found_colour = 0, 0, 0
        images, prompts = [], []
        for i, (shape, colour) in enumerate(pairs):
            images += generate(model, f"a {colour} {shape} <hypernet:bgstyle:{strength}>", 4,
                               hypernetworks={"bgstyle": hypernetwork}, seed=5000 + 4 * i)
            prompts += [(shape, colour)] * 4
        for found, (shape, colour) in zip(classify(images), prompts, strict=True):
            found_bg += found["background"] == HN["background"]
            found_shape += found["shape"] == shape
            found_colour += found["colour"] == colour
        n = len(prompts)
        results[str(strength)] = {"background": found_bg / n, "shape": found_shape / n, "colour": found_colour / n}
    return results


# The share of generations that must show the whole concept. toyworld-xl's is lower: the model draws a named
# background right in 76.7 % of its eval (bar 80 %, its training budget spent; MODEL_CARD.md), and an embedding
# there hits the whole concept in 76.7 % (shape 98.3 %, colour 100 %, the brown background 76.7 %; plain words
# 20.0 %). Its bar still fails when SDXL textual inversion stops placing the concept (plain words: 20 %).
CONCEPT_BAR = {"toyworld": 0.8, "toyworld-xl": 0.6}


@pytest.mark.parametrize("embedded", ["toyworld", "toyworld-xl"], indirect=True)
def test_embedding_learns_the_concept(tmp_path: Path, embedded: str) -> None:
    report = train_ti(tmp_path, embedded=embedded)
    print(json.dumps(report, indent=1))
    assert report["with_word"]["all"] >= CONCEPT_BAR[embedded], report
    assert report["plain_words"]["all"] <= report["with_word"]["all"] - 0.3, report


@pytest.mark.parametrize("embedded", ["toyworld", "toyworld-xl"], indirect=True)
def test_hypernetwork_shifts_the_style_with_strength(tmp_path: Path, embedded: str,
                                                     request: pytest.FixtureRequest) -> None:
    # The toy model's file is the session's (the img2img tests use the same one); toyworld-xl's is trained here.
    trained = request.getfixturevalue("toyworld_style_hypernetwork") if embedded == "toyworld" else None
    report = train_hn(tmp_path, embedded=embedded, trained=trained)
    print(json.dumps(report, indent=1))
    bg = [report[s]["background"] for s in ("0.0", "0.5", "1.0")]
    assert bg[0] < bg[1] < bg[2] and bg[2] >= 3 * max(bg[0], 1 / SAMPLES), report
    for s in ("0.0", "0.5", "1.0"):
        assert report[s]["shape"] >= 0.95 and report[s]["colour"] >= 0.95, report


if __name__ == "__main__":
    torch.set_num_threads(1)
    # python tests/training/test_training_learns.py [ti|hn ...] [toyworld|toyworld-xl]
    chosen = next((a for a in sys.argv[1:] if a in MODELS), "toyworld")
    which = [a for a in sys.argv[1:] if a not in MODELS] or ["ti", "hn"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in which:
            result = (train_ti(Path(tmp) / name, short_prompt=True, embedded=chosen) if name == "ti"
                      else train_hn(Path(tmp) / name, embedded=chosen))
            print(name, json.dumps(result, indent=1), flush=True)
