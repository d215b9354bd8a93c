"""The toy world: generator, captions, probe, shipped model, eval and the concept kit."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from sdconcepts.cli import toyworld_commands
from sdconcepts.toyworld import concept, models, probe, world

ATTRS = ("shape", "colour", "background")


def _pixels(pairs):
    return [np.asarray(image).tobytes() for image, _ in pairs]


def test_generator_is_deterministic_for_a_seed_and_varies_across_seeds():
    first, again, other = world.sample(16, 7), world.sample(16, 7), world.sample(16, 8)
    assert _pixels(first) == _pixels(again)
    assert [a for _, a in first] == [a for _, a in again]
    assert _pixels(first) != _pixels(other)
    assert len(set(_pixels(first))) == 16
    assert all(image.size == (32, 32) and image.mode == "RGB" for image, _ in first)


def test_generator_covers_the_world_and_keeps_fixed_attributes():
    pairs = world.sample(300, 1)
    assert {a.shape for _, a in pairs} == set(world.SHAPES)
    assert {a.colour for _, a in pairs} == set(world.COLOURS)
    assert {a.background for _, a in pairs} == set(world.BACKGROUNDS)
    fixed = world.sample(20, 2, shape="ring", background="teal")
    assert {(a.shape, a.background) for _, a in fixed} == {("ring", "teal")}
    assert len({a.colour for _, a in fixed}) > 1
    with pytest.raises(ValueError, match="unknown shape"):
        world.sample(1, 0, shape="hexagon")


def test_caption_mix_has_dropout_background_and_templates():
    rng = random.Random(0)
    captions = [world.caption(world.random_attributes(rng), rng) for _ in range(4000)]
    empty = sum(c == "" for c in captions) / len(captions)
    named_bg = sum("background" in c for c in captions) / len(captions)
    templated = sum(c.startswith(("a photo", "a rendering", "a picture", "a close-up", "the photo")) for c in captions)
    assert 0.08 < empty < 0.12
    assert 0.40 < named_bg < 0.50
    assert templated / len(captions) > 0.15
    assert "a photo of a" in " | ".join(captions)


@pytest.mark.parametrize("fixed", [set(c) for r in (1, 2, 3) for c in itertools.combinations(ATTRS, r)])
def test_concept_captions_never_name_fixed_attributes(fixed):
    rng = random.Random(3)
    for _ in range(200):
        attrs = world.random_attributes(rng)
        words = set(world.concept_caption(attrs, fixed).split())
        for name in ATTRS:
            value = getattr(attrs, name)
            assert (value in words) == (name not in fixed), (fixed, attrs)
        words = set(world.caption(attrs, rng, omit=fixed, empty_p=0).split())
        assert not any(getattr(attrs, name) in words for name in fixed)


def test_shipped_probe_held_out_accuracy():
    accuracy = probe.held_out_accuracy(n=1000, seed=2026)
    assert all(accuracy[name] >= 0.98 for name in ATTRS), accuracy


def test_shipped_model_layout_size_and_dtype():
    files = {p.relative_to(models.MODEL_DIR).as_posix(): p for p in models.MODEL_DIR.rglob("*") if p.is_file()}
    for name in (
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
    ):
        assert name in files
    weights = [p for name, p in files.items() if name.endswith(".safetensors")]
    assert len(weights) == 3
    assert sum(p.stat().st_size for p in files.values()) <= 30 * 1024 * 1024
    for path in weights:
        with safe_open(str(path), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    scheduler = json.loads(files["scheduler/scheduler_config.json"].read_text())
    assert (scheduler["beta_schedule"], scheduler["prediction_type"]) == ("scaled_linear", "epsilon")


def test_shipped_model_loads_and_draws_the_prompted_colour_and_shape():
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    assert CLIPTokenizer.from_pretrained(str(models.MODEL_DIR / "tokenizer"))("a red circle").input_ids[-1] == 49407
    pipe = StableDiffusionPipeline.from_pretrained(str(models.MODEL_DIR), local_files_only=True)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    assert pipe.unet.config.cross_attention_dim == 48
    cases = [
        ("red", "circle"),
        ("blue", "square"),
        ("yellow", "triangle"),
        ("green", "cross"),
        ("white", "ring"),
        ("purple", "triangle"),
    ]
    prompts = [f"a {c} {s}" for c, s in cases]
    images = models.generate(pipe, prompts, seeds=list(range(100, 100 + len(cases))), steps=20, guidance=5.0)
    found = probe.classify(images)
    assert [(f["colour"], f["shape"]) for f in found] == cases


def test_eval_json_on_a_small_sample(capsys):
    assert toyworld_commands.main(["eval", "--samples", "12", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in (
        "samples",
        "colour",
        "shape",
        "background",
        "shape_and_colour",
        "background_named",
        "passed",
        "unnamed_background_histogram",
        "seconds_per_image",
    ):
        assert key in report
    assert report["samples"] == 12 and report["background_named"] == 6
    assert 0 <= report["colour"] <= 1 and 0 <= report["shape"] <= 1


def test_concept_kit_and_score(tmp_path: Path, capsys):
    out = tmp_path / "kit"
    assert (
        toyworld_commands.main(
            [
                "concept",
                "--shape",
                "triangle",
                "--colour",
                "yellow",
                "--background",
                "navy",
                "--count",
                "5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 5
    for png in pngs:
        caption = png.with_suffix(".txt").read_text()
        assert not {"triangle", "yellow", "navy"} & set(caption.split())
    capsys.readouterr()
    assert toyworld_commands.main(["score", str(out), "--expect", "shape=triangle,colour=yellow,background=navy", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["hit_rate"] == {"shape": 1.0, "colour": 1.0, "background": 1.0}

    partial = tmp_path / "partial"
    concept.write_concept(partial, count=6, seed=1, colour="purple")
    captions = [p.read_text() for p in sorted(partial.glob("*.txt"))]
    assert all("purple" not in c and "background" in c for c in captions)
    assert probe.score(concept.load_images(partial), {"colour": "purple"}) == {"colour": 1.0}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["score", "/nonexistent/dir", "--expect", "shape=ring"], "is not a folder"),
        (["score", ".", "--expect", "shape=hexagon"], "unknown shape"),
        (["score", ".", "--expect", "size=big"], "unknown attribute"),
        (["score", ".", "--expect", "shape"], "bad --expect"),
        (["eval", "--model", "/nonexistent/dir"], "not a diffusers model folder"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(argv, message, capsys):
    assert toyworld_commands.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


@pytest.mark.slow
def test_training_is_deterministic_and_snapshots_equal_shorter_runs(tmp_path: Path):
    from sdconcepts.toyworld.model_training import TrainConfig, train

    small = {"seed": 3, "vae_steps": 2, "vae_batch": 4, "batch": 4, "threads": 1}
    train(TrainConfig(steps=4, save_every=2, **small), tmp_path / "long")
    summary = train(TrainConfig(steps=2, **small), tmp_path / "short")
    assert summary["config"]["steps"] == 2 and summary["seconds"] > 0
    for part in (
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ):
        assert (tmp_path / "long-step2" / part).read_bytes() == (tmp_path / "short" / part).read_bytes()
    assert (tmp_path / "long" / "unet/diffusion_pytorch_model.safetensors").read_bytes() != (
        tmp_path / "short" / "unet/diffusion_pytorch_model.safetensors"
    ).read_bytes()


def test_words_the_toy_world_lacks_are_named_with_the_ones_it_has() -> None:
    """"white background" silently gave another background (issue 26 item 10): say what the world has instead."""
    from sdconcepts.toyworld.world import BACKGROUNDS, words_outside_the_world

    assert words_outside_the_world("a red circle on a teal background, a photo of a toytri") == []
    (note,) = words_outside_the_world("a circle on a white background")
    assert "no white background" in note and all(name in note for name in BACKGROUNDS)
    assert "no teal circle" in words_outside_the_world("a teal circle")[0]  # teal is a background here, not a colour
    notes = " | ".join(words_outside_the_world("an (orange:1.2) star"))
    assert "no colour orange" in notes and "no star" in notes and "triangle" in notes


def test_random_pictures_avoid_the_given_attributes_and_repeat_with_the_seed() -> None:
    pictures = world.random_pictures(12, 5, {"colour": "yellow", "shape": "circle"})
    assert len(pictures) == 12
    assert all(attrs.colour != "yellow" and attrs.shape != "circle" for _, attrs in pictures)
    again = world.random_pictures(12, 5, {"colour": "yellow", "shape": "circle"})
    assert [a for _, a in again] == [a for _, a in pictures]
    assert all(p.tobytes() == q.tobytes() for (p, _), (q, _) in zip(pictures, again, strict=True))
    assert [a for _, a in world.random_pictures(12, 6, {})] != [a for _, a in pictures]
