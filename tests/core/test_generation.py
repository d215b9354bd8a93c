from __future__ import annotations

import pytest

from sdconcepts.generation import GenerationError, GenerationParams, format_infotext, parse_infotext


def test_infotext_has_a1111_layout_and_round_trips() -> None:
    params = GenerationParams(prompt="a (red:1.2) circle", negative_prompt="blurry", steps=20, sampler="Euler a",
                              cfg_scale=7.0, seed=42)
    text = format_infotext(params, prompt=params.prompt, negative_prompt=params.negative_prompt, seed=42,
                           width=512, height=512, model_name="toyworld", model_hash="0123456789")
    lines = text.split("\n")
    assert lines[0] == "a (red:1.2) circle"
    assert lines[1] == "Negative prompt: blurry"
    assert lines[2] == ("Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x512, "
                        "Model hash: 0123456789, Model: toyworld")
    prompt, negative, fields = parse_infotext(text)
    assert (prompt, negative) == ("a (red:1.2) circle", "blurry")
    assert fields["Seed"] == "42" and fields["Sampler"] == "Euler a" and fields["CFG scale"] == "7"


def test_infotext_quotes_values_with_commas_and_omits_empty_negative() -> None:
    params = GenerationParams(prompt="p", seed=1, cfg_scale=5.5, extra={"Note": 'a, b: "c"'})
    text = format_infotext(params, prompt="p", negative_prompt="", seed=1, width=32, height=32,
                           model_name="m", model_hash=None)
    assert "Negative prompt" not in text
    assert "CFG scale: 5.5" in text and "Model hash" not in text
    assert parse_infotext(text)[2]["Note"] == 'a, b: "c"'


def test_seeds_follow_a1111_numbering() -> None:
    params = GenerationParams(seed=100, batch_size=2, batch_count=3).validated()
    assert params.image_seeds() == [[100, 101], [102, 103], [104, 105]]


def test_seeds_past_2_to_the_32_are_written_and_read_back_as_a1111_does() -> None:
    # A1111 gives image i the seed seed + i without wrapping, writes it into the infotext and takes it back:
    # 4294967296 was written here too, and then refused by Reuse, PNG Info's paste and the CLI.
    params = GenerationParams(seed=2**32 - 1, batch_size=2).validated()
    assert params.image_seeds() == [[2**32 - 1, 2**32]]
    assert GenerationParams(seed=2**32).validated().seed == 2**32
    assert 0 <= GenerationParams(seed=-1).validated().seed < 2**32  # a random seed is still drawn below 2**32


def test_random_seed_is_resolved_once() -> None:
    params = GenerationParams(seed=-1).validated()
    assert 0 <= params.seed < 2**32


@pytest.mark.parametrize(
    ("change", "message"),
    [({"sampler": "Nope"}, "unknown sampler"), ({"steps": 0}, "steps"), ({"batch_size": 0}, "batch"),
     ({"seed": 2**53}, "seed must be at most 9007199254740991")],
)
def test_bad_parameters_are_named(change: dict[str, object], message: str) -> None:
    with pytest.raises(GenerationError, match=message):
        GenerationParams(**change).validated()  # type: ignore[arg-type]
